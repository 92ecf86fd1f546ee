"""EDM checkpoints in common.py: the UNet against NVlabs/edm's own SongUNet / preconditioners / Heun sampler
(golden fixtures written by tests/golden/make_edm_golden.py, including pickles EDM itself wrote), the safe pickle
reader (fake pickles in EDM's layout, embedded source never run, foreign globals refused), and the network options
that express EDM's and py-meanflow's CIFAR-10 networks."""
import collections, copyreg, gzip, math, os, pickle, shutil, sys, types

import numpy as np
import pytest
import torch
import torch.nn as nn

import common as C
from cli import guarded, sentence

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def golden():
    return torch.load(os.path.join(GOLDEN, "edm_golden.pt"), weights_only=True)


def _unzip(name, tmp):
    path = os.path.join(tmp, name[:-3])
    with gzip.open(os.path.join(GOLDEN, name)) as f, open(path, "wb") as o:
        shutil.copyfileobj(f, o)
    return path


@pytest.fixture(scope="module")
def edm_nets(golden, tmp_path_factory):
    """The four pickles EDM wrote, each read by load_edm (no EDM code on the path)."""
    tmp = tmp_path_factory.mktemp("edm")
    return {case: C.load_edm(_unzip(g["pickle"], tmp)) for case, g in golden["cases"].items()}


# ======================================================================== golden: EDM's own outputs
@pytest.mark.parametrize("case", ["vp_ddpmpp_uncond", "vp_ddpmpp_cond", "ve_ncsnpp_uncond", "ve_ncsnpp_cond"])
def test_golden_network_and_preconditioning(golden, edm_nets, case):
    """F (SongUNet) to 1e-5 absolute; D = c_skip x + c_out F to 1e-5 max(1, sigma) (fp32 spacing at |D| ~ 300 is
    3e-5); with and without EDM's augmentation labels; label_dim 0 and 10."""
    g, (den, info) = golden["cases"][case], edm_nets[case]
    assert info["precond"] == case[:2] and info["label_dim"] == (10 if case.endswith("_cond") else 0)
    assert info["augment_dim"] == 9 and info["net"]["encoder"] == ("residual" if "ncsnpp" in case else "standard")
    assert (den.sigma_min, den.sigma_max) == (g["sigma_min"].item(), g["sigma_max"].item())
    x, sigma, aug = golden["x"], golden["sigma"], golden["aug"]
    y = golden["labels"] if info["label_dim"] else None
    _, _, c_in, c_noise = den.coefficients(sigma.reshape(-1, 1, 1, 1))
    with torch.no_grad():
        for a, key in ((None, ""), (aug, "_aug")):
            F = den.net(c_in * x, c_noise.flatten(), y=y, aug=a)
            assert (F - g["F" + key]).abs().max() < 1e-5, key
            D = den(x, sigma, y, aug=a)
            err = (D - g["D" + key]).abs().amax((1, 2, 3))
            assert (err <= 1e-5 * sigma.clamp(min=1)).all(), (key, err)
    assert g["F"].abs().max() > 0.5 and (g["F_aug"] - g["F"]).abs().max() > 1e-2  # a non-trivial net, aug matters


def test_golden_edm_preconditioning(golden, edm_nets):
    den = C.EDMDenoiser(edm_nets["ve_ncsnpp_cond"][0].net, "edm")
    assert (den.sigma_min, den.sigma_max, den.sigma_data) == (0.0, math.inf, 0.5)
    x, sigma, y, aug = golden["x"], golden["sigma"], golden["labels"], golden["aug"]
    with torch.no_grad():
        for a, key in ((None, "D"), (aug, "D_aug")):
            assert (den(x, sigma, y, aug=a) - golden["edm_precond"][key]).abs().max() < 1e-5


@pytest.mark.parametrize("case", ["vp_ddpmpp_cond", "ve_ncsnpp_uncond"])
def test_golden_heun_sampler(golden, edm_nets, case):
    """EDM's edm_sampler (18 steps, 35 evaluations; VE's grid starts at its sigma_min 0.02): float64 state over
    fp32 evaluations, to 1e-6 of the sample scale (observed: one fp32 spacing)."""
    h, den = golden["heun"][case], edm_nets[case][0]
    calls = []
    hook = den.register_forward_pre_hook(lambda m, a: calls.append(1))
    out = C.edm_heun(den, h["latents"], h["labels"])
    hook.remove()
    assert len(calls) == h["nfe"] == 35 and out.dtype == torch.float64
    assert (out - h["out"]).abs().max() <= 1e-6 * h["out"].abs().max()


def test_vp_default_sigma_range_is_the_one_edm_wrote(edm_nets):
    """EDMDenoiser('vp') without a range computes EDM's VPPrecond.sigma_min/max = sigma(epsilon_t), sigma(1)."""
    den = edm_nets["vp_ddpmpp_cond"][0]
    vp = C.EDMDenoiser(den.net, "vp")
    assert (vp.sigma_min, vp.sigma_max) == (den.sigma_min, den.sigma_max)
    assert 0.0009 < vp.sigma_min < 0.0011 and 152 < vp.sigma_max < 153  # sqrt(e^(beta_d/2 + beta_min) - 1) ~ 152.2


def test_edm_written_pickle_metadata(golden, edm_nets):
    _, info = edm_nets["ve_ncsnpp_cond"]
    assert info["dataset_kwargs"]["use_labels"] is True and info["use_fp16"] is False
    assert info["edm_kwargs"]["model_type"] == "SongUNet" and info["net"]["time_channels"] == 8
    assert info["net"]["embedding"] == "fourier" and info["net"]["resample_filter"] == [1, 3, 3, 1]
    den = C.EDMDenoiser.from_config(edm_nets["ve_ncsnpp_cond"][0].config())
    assert den.config() == edm_nets["ve_ncsnpp_cond"][0].config()


# ======================================================================== fake pickles in EDM's layout
def _fake_persistence(monkeypatch, run_source=False):
    """A stand-in `torch_utils.persistence` so that pickle can name `_reconstruct_persistent_obj` (as EDM's pickles
    do); with run_source it executes the embedded source the way an unrestricted load would."""
    def _reconstruct_persistent_obj(meta):
        if run_source:
            exec(meta["module_src"], {})
        return meta["class_name"]
    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    mod, pkg = types.ModuleType("torch_utils.persistence"), types.ModuleType("torch_utils")
    mod._reconstruct_persistent_obj, pkg.persistence = _reconstruct_persistent_obj, mod
    monkeypatch.setitem(sys.modules, "torch_utils", pkg)
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", mod)
    return _reconstruct_persistent_obj


class _Persistent:
    """Pickles as EDM's persistent_class does: _reconstruct_persistent_obj(meta) with the module source inside."""

    def __init__(self, fn, name, state, src):
        self.fn, self.meta = fn, dict(type="class", version=6, module_src=src, class_name=name, state=state)

    def __reduce__(self):
        return self.fn, (self.meta,)


class _TorchModule:
    """Pickles as a plain torch.nn container does: NEWOBJ of the class, then its __dict__."""

    def __init__(self, cls, state):
        self.cls, self.state = cls, state

    @property
    def __class__(self):  # pickle checks that NEWOBJ's class is the object's
        return self.cls

    def __reduce_ex__(self, proto):
        return copyreg.__newobj__, (self.cls,), self.state


def _module_state(params=(), buffers=(), modules=(), **attrs):
    return dict(training=False, _parameters=collections.OrderedDict(params), _buffers=collections.OrderedDict(buffers),
                _non_persistent_buffers_set=set(), _backward_hooks=collections.OrderedDict(),
                _forward_hooks=collections.OrderedDict(), _modules=collections.OrderedDict(modules), **attrs)


def _edm_tree(fn, sd, src, R):
    """A nested record tree from an EDM-keyed flat state dict (enc/dec are ModuleDicts, the rest persistent)."""
    tree = {}
    for k, v in sd.items():
        node = tree
        *path, leaf = k.split(".")
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = v

    def build(name, node):
        params = [(k, nn.Parameter(v, requires_grad=False)) for k, v in node.items()
                  if torch.is_tensor(v) and k != "resample_filter" and k != "freqs"]
        bufs = [(k, v) for k, v in node.items() if k in ("resample_filter", "freqs")]
        subs = [(k, build(k, v)) for k, v in node.items() if isinstance(v, dict)]
        state = _module_state(params, bufs, subs)
        if name in ("enc", "dec"):
            return _TorchModule(nn.ModuleDict, state)
        state["skip_scale"] = np.float64(np.sqrt(0.5))  # numpy scalars, as EDM's UNetBlock keeps them
        return _Persistent(fn, "UNetBlock" if "block" in name else "Module", state, src)
    return build("model", tree)


def _ours_to_edm(net):
    """Our state dict in EDM's key layout: out_norm / out_conv -> dec.{R}x{R}_aux_*, resample filters added."""
    d, R = net.config, net.config["img_resolution"]
    sd = {k.replace("out_norm.", f"dec.{R}x{R}_aux_norm.").replace("out_conv.", f"dec.{R}x{R}_aux_conv."): v
          for k, v in net.state_dict().items()}
    f = C._fir(d["resample_filter"])
    for where in ("enc", "dec"):
        for name, blk in getattr(net, where).items():
            if isinstance(blk, C.Block) and blk.resample:
                sd[f"{where}.{name}.conv0.resample_filter"] = sd[f"{where}.{name}.skip.resample_filter"] = f
            elif isinstance(blk, C.AuxResidual):
                sd[f"{where}.{name}.resample_filter"] = f
    return sd


def _edm_kwargs(d, precond_kw):
    return dict(img_resolution=d["img_resolution"], img_channels=d["in_channels"], label_dim=d["label_dim"],
                use_fp16=False, model_type="SongUNet", model_channels=d["ch"], channel_mult=d["mult"],
                num_blocks=d["nb"], attn_resolutions=d["attn_res"], augment_dim=d["augment_dim"], dropout=0.13,
                embedding_type=d["embedding"], channel_mult_noise=d["time_channels"] // d["ch"],
                encoder_type=d["encoder"], decoder_type="standard", resample_filter=d["resample_filter"],
                **precond_kw)


def _fake_pickle(path, fn, net, precond="VEPrecond", precond_kw=None, src="", extra=None, edit=None):
    kw, sd = _edm_kwargs(net.config, precond_kw or {}), _ours_to_edm(net)
    if edit:
        edit(kw, sd)
    model = _edm_tree(fn, sd, src, net.config["img_resolution"])
    state = _module_state(modules=[("model", model)], _init_args=(), _init_kwargs=kw,
                          **{k: float(v) for k, v in (precond_kw or {}).items()})
    ema = _Persistent(fn, precond, state, src)
    loss = _Persistent(fn, "VELoss", dict(sigma_min=0.02, sigma_max=100.0, _init_args=(), _init_kwargs={}), src)
    data = {**dict(ema=ema, loss_fn=loss, augment_pipe=None,
                   dataset_kwargs=dict(path="cifar10.zip", use_labels=True)), **(extra or {})}
    with open(path, "wb") as f:
        pickle.dump(data, f)
    return path


def _tiny_ncsnpp(seed=0, **kw):
    torch.manual_seed(seed)
    d = C.net_config("tiny", embedding="fourier", encoder="residual", resample_filter=[1, 3, 3, 1], time_channels=32,
                     label_dim=10, augment_dim=9, **kw)
    net = C.build_net(d)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return net.eval()


def test_fake_edm_pickle_loads_and_reproduces_our_network(tmp_path, monkeypatch):
    fn = _fake_persistence(monkeypatch)
    net = _tiny_ncsnpp()
    path = _fake_pickle(str(tmp_path / "network-snapshot-000000.pkl"), fn, net)
    monkeypatch.delitem(sys.modules, "torch_utils.persistence")  # the reader must not need it
    den, info = C.load_edm(path)
    want = {**net.config, "dropout": 0.13}
    assert info["net"] == want and info["precond"] == "ve" and (den.sigma_min, den.sigma_max) == (0.02, 100.0)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.1, 3.0, 40.0])
    y, aug = torch.tensor([1, 5, 9]), torch.randn(3, 9)
    with torch.no_grad():
        ref = x + sigma.reshape(-1, 1, 1, 1) * net(x, (0.5 * sigma).log(), y=y, aug=aug)  # VE: D = x + sigma F
        assert torch.equal(den(x, sigma, y, aug=aug), ref)
    assert all(not p.requires_grad for p in den.parameters()) and not den.training


def test_embedded_source_is_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "marker"
    src = f"open({str(marker)!r}, 'w').write('the embedded source ran')\n"
    net = _tiny_ncsnpp()
    path = _fake_pickle(str(tmp_path / "evil.pkl"), _fake_persistence(monkeypatch), net, src=src)
    den, _ = C.load_edm(path)  # loads fine ...
    assert isinstance(den, C.EDMDenoiser) and not marker.exists()  # ... without running the source
    _fake_persistence(monkeypatch, run_source=True)  # control: an unrestricted load of the same bytes runs it
    with open(path, "rb") as f:
        pickle.load(f)
    assert marker.read_text() == "the embedded source ran"


@pytest.mark.parametrize("payload, name", [((os.system, ("true",)), os.system.__module__ + ".system"),
                                           ((eval, ("1",)), "builtins.eval"),
                                           ((getattr, ("abc", "upper")), "builtins.getattr")])
def test_foreign_global_is_refused_in_one_sentence(tmp_path, monkeypatch, capsys, payload, name):
    class Evil:
        def __reduce__(self):
            return payload
    path = _fake_pickle(str(tmp_path / "bad.pkl"), _fake_persistence(monkeypatch), _tiny_ncsnpp(),
                        extra=dict(augment_pipe=Evil()))
    with pytest.raises(C.UserError) as e:
        C.load_edm(path)
    msg = str(e.value)
    assert msg == f"'{path}' names the global {name}, which an EDM network pickle never needs; refusing to load it."
    assert guarded(capsys, lambda: C.load_edm(path)) == msg  # a method file's CLI path: error: + exit 2, no traceback


def test_unsupported_and_broken_pickles_are_user_errors(tmp_path, monkeypatch):
    fn, net = _fake_persistence(monkeypatch), _tiny_ncsnpp()
    cases = {"does not exist": str(tmp_path / "missing.pkl"), "network-snapshot-": str(tmp_path / "d.pkl")}  # a folder
    os.mkdir(tmp_path / "d.pkl")  # (was "does not exist (download it first ...)", then "give ... (a run's ckpt.pt)")
    (tmp_path / "junk.pkl").write_bytes(b"not a pickle at all")
    cases["not a readable EDM pickle"] = str(tmp_path / "junk.pkl")
    with open(tmp_path / "plain.pkl", "wb") as f:
        pickle.dump({"ema": {"weights": torch.zeros(2)}}, f)
    cases["holds no EDM"] = str(tmp_path / "plain.pkl")
    # a run's checkpoint under a .pkl name (was the unpickler's "...encountered,\nbut no persistent_load functio")
    torch.save({"net": {"w": torch.zeros(2)}}, tmp_path / "ckpt.pkl")
    zipped = r"\(a torch.save zip file; a checkpoint of this project is read under a .pt name\)\.$"
    cases[zipped] = str(tmp_path / "ckpt.pkl")
    edits = {"DhariwalUNet": lambda kw, sd: kw.pop("model_type"),  # EDMPrecond's default network is ADM
             "decoder_type='skip'": lambda kw, sd: kw.update(decoder_type="skip"),
             "is not the filter": lambda kw, sd: sd.update({"enc.8x8_down.conv0.resample_filter": C._fir([1, 1])}),
             "missing": lambda kw, sd: sd.pop("enc.8x8_aux_residual.weight"),
             "shape mismatch": lambda kw, sd: kw.update(model_channels=8, channel_mult_noise=4)}
    for what, edit in edits.items():
        cases[what] = _fake_pickle(str(tmp_path / f"{len(cases)}.pkl"), fn, net, precond="EDMPrecond", edit=edit)
    for what, path in cases.items():
        with pytest.raises(C.UserError, match=what):
            C.load_edm(path)
    den, info = C.load_edm(_fake_pickle(str(tmp_path / "ok.pkl"), fn, net, precond="EDMPrecond"))  # the control
    assert info["precond"] == "edm" and (den.sigma_min, den.sigma_max, den.sigma_data) == (0.0, math.inf, 0.5)


def test_edm_records_of_the_wrong_type_are_user_errors(tmp_path, monkeypatch, capsys):
    """A pickle whose kwargs or records hold entries of another type (a size 'abc' or None, a number for a list, a
    size beyond torch's, a list for the kwargs dict) was a traceback (ValueError, TypeError, AttributeError); a size
    True or 16.5 was read as 1 or 16."""
    fn, net = _fake_persistence(monkeypatch), _tiny_ncsnpp()
    edits = [lambda kw, sd: kw.update(model_channels="abc"), lambda kw, sd: kw.update(img_resolution=None),
             lambda kw, sd: kw.update(channel_mult=3), lambda kw, sd: kw.update(img_channels=10 ** 30),
             lambda kw, sd: kw.pop("img_resolution"), lambda kw, sd: kw.update(sigma_min="x"),
             lambda kw, sd: kw.update(num_blocks=True), lambda kw, sd: kw.update(model_channels=kw["model_channels"]
                                                                                  + 0.5)]  # (read as 1, and cut)
    for i, edit in enumerate(edits):
        path = _fake_pickle(str(tmp_path / f"{i}.pkl"), fn, net, edit=edit)
        with pytest.raises(C.UserError, match="expected structure|out of range or of the wrong type"):
            C.load_edm(path)
    path = _fake_pickle(str(tmp_path / "list.pkl"), fn, net, extra=dict(ema=_Persistent(fn, "VEPrecond", dict(
        _init_kwargs=[1, 2], _modules=[]), "")))
    guarded(capsys, lambda: C.load_edm(path), "expected structure")  # the CLI's path: one error line, exit 2


def test_edm_pickle_with_non_finite_weights_or_sigma_range_is_refused(tmp_path, monkeypatch):
    """NaN weights, a NaN sigma_min or a negative sigma_max were loaded as a teacher (NaN samples, or a Heun grid
    clipped to nothing); each is one sentence."""
    fn, net = _fake_persistence(monkeypatch), _tiny_ncsnpp()
    k = "enc.8x8_aux_residual.weight"
    edits = {"non-finite weights": lambda kw, sd: sd.update({k: torch.full_like(sd[k], float("nan"))}),
             "sigma range \\[nan": lambda kw, sd: None, "sigma range \\[0.02, -1.0\\]": lambda kw, sd: None}
    kws = [None, dict(sigma_min=float("nan")), dict(sigma_max=-1.0)]
    for i, ((what, edit), pkw) in enumerate(zip(edits.items(), kws)):
        path = _fake_pickle(str(tmp_path / f"{i}.pkl"), fn, net, precond_kw=pkw, edit=edit)
        with pytest.raises(C.UserError, match=what):
            C.load_edm(path)


class _Call:
    """Pickles as the call f(*args) (a REDUCE of the global f)."""

    def __init__(self, f, *args):
        self.f, self.args = f, args

    def __reduce__(self):
        return self.f, self.args


def test_crafted_pickles_are_refused_in_one_sentence_naming_the_file(tmp_path, monkeypatch, capsys):
    """Each allowed global called with what EDM never writes (a persistent call without a class record, a tensor
    without a storage, a storage without bytes, a numpy scalar of object dtype or without its bytes, _codecs.encode
    of a non-string or to another encoding), or an object of a class outside torch.nn (NEWOBJ): refused in one
    sentence naming the file, and the embedded source never runs. Control: protocol 2's spelling of bytes (and so
    of a storage) reads back."""
    import _codecs
    marker = tmp_path / "marker"
    src = f"open({str(marker)!r}, 'w').write('the embedded source ran')\n"
    fn = _fake_persistence(monkeypatch, run_source=True)  # (an unrestricted load would run src)
    scalar = np.float64(0).__reduce__()[0]  # numpy's scalar rebuilder (numpy.core or, from numpy 2, numpy._core)
    cases = {"a persistent object without a class record": [
                 _Call(fn, [1, 2]), _Call(fn, dict(type="function", module_src=src, class_name="F", state={})),
                 _Call(fn, dict(type="class", module_src=src, class_name="F", state=None))],
             "a tensor without a storage": [_Call(torch._utils._rebuild_tensor_v2, "abc", 0, (1,), (1,), False,
                                                  collections.OrderedDict())],
             "a storage without bytes": [_Call(torch.storage._load_from_bytes, "abc")],
             "a numpy scalar that is not a plain number": [_Call(scalar, np.dtype(object), b"\0" * 8),
                                                           _Call(scalar, np.dtype("f8"))],
             "an encoded string other than latin1 bytes": [_Call(_codecs.encode, "abc", "utf8"),
                                                           _Call(_codecs.encode, 3, "latin1")],
             "names the global collections.Counter": [_TorchModule(collections.Counter, {})]}
    for what, objs in cases.items():
        for i, obj in enumerate(objs):
            path = str(tmp_path / f"{what[:12].replace(' ', '_')}{i}.pkl")
            with open(path, "wb") as f:
                pickle.dump({"ema": obj}, f, protocol=4)
            msg = guarded(capsys, lambda: C.load_edm(path), what)
            assert msg.startswith(f"'{path}' "), msg
    assert not marker.exists()
    with open(tmp_path / "p2.pkl", "wb") as f:
        pickle.dump({"b": b"\x00\xff", "t": torch.arange(3.0)}, f, protocol=2)  # _codecs.encode(s, 'latin1')
    got = C.read_edm_pickle(str(tmp_path / "p2.pkl"))
    assert got["b"] == b"\x00\xff" and torch.equal(got["t"], torch.arange(3.0))


def test_edm_records_that_do_not_hold_a_network_are_one_sentence(tmp_path, monkeypatch):
    """A preconditioner record built with positional arguments or without its 'model' submodule, a module record
    whose parameter is not a tensor or whose submodule is not a record; an EDMDenoiser config (a checkpoint's) with
    another preconditioning: one sentence each."""
    fn, net = _fake_persistence(monkeypatch), _tiny_ncsnpp()
    kw, R = _edm_kwargs(net.config, {}), net.config["img_resolution"]
    model = _edm_tree(fn, _ours_to_edm(net), "", R)

    def precond(model=model, **over):
        state = _module_state(modules=[("model", model)] if model else [], _init_args=(), _init_kwargs=kw)
        return _Persistent(fn, "VEPrecond", {**state, **over}, "")
    odd = lambda **st: _Persistent(fn, "Module", _module_state(**st), "")
    cases = {"VEPrecond was built with positional arguments (16,); EDM passes keywords.": precond(_init_args=(16,)),
             "the VEPrecond record has no 'model' submodule.": precond(model=None),
             "weight is not a tensor.": precond(model=odd(params=[("weight", "abc")])),
             "submodule enc is not a module record.": precond(model=odd(modules=[("enc", {"a": 1})]))}
    for i, (want, ema) in enumerate(cases.items()):
        path = _fake_pickle(str(tmp_path / f"{i}.pkl"), fn, net, extra=dict(ema=ema))
        with pytest.raises(C.UserError) as e:
            C.load_edm(path)
        msg = sentence(e)
        assert msg.startswith(f"'{path}'") and msg.endswith(want), msg
    den, _ = C.load_edm(_fake_pickle(str(tmp_path / "ok.pkl"), fn, net, extra=dict(ema=precond())))  # control
    with pytest.raises(C.UserError, match="^EDM preconditioning must be vp, ve or edm, got 'vv'.$"):
        C.EDMDenoiser.from_config({**den.config(), "precond": "vv"})


# ======================================================================== network options
@pytest.mark.parametrize("name, kw, total", [  # totals of NVlabs/edm's SongUNet with the same kwargs (counted once)
    ("ddpmpp", {}, 55_732_739), ("ddpmpp", dict(label_dim=10, augment_dim=9), 55_735_299),
    ("ncsnpp", {}, 56_395_523), ("ncsnpp", dict(augment_dim=9), 56_397_827),
    ("ncsnpp", dict(label_dim=10, augment_dim=9), 56_400_643),
    # py-meanflow's CIFAR-10 v0 network (its models/unet.py SongUNet with augment_dim 6): 55,932,419
    ("ddpmpp", dict(num_times=2, time_combine="concat", time_channels=256, resample_filter=[1, 3, 3, 1],
                    qkv_order="blocks", augment_dim=6, dropout=0.2), 55_932_419),
])
def test_param_counts_match_edm_and_py_meanflow(name, kw, total):
    with torch.device("meta"):
        net = C.build_net(C.net_config(name, **kw))
    assert sum(p.numel() for p in net.parameters()) == total


def test_meanflow_options_concat_times_and_block_qkv():
    """time_combine='concat': [PE(t), PE(s)] -> map_layer0 (py-meanflow); qkv_order='blocks': q | k | v."""
    torch.manual_seed(0)
    net = C.build_net(C.net_config("tiny", num_times=2, time_combine="concat", qkv_order="blocks", augment_dim=6))
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert net.map_layer0.in_features == 32 and net.map_augment.out_features == 32
    x, t, s, a = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2), torch.randn(2, 6)
    n = torch.cat([C._pe(t, 16), C._pe(s, 16)], 1) + net.map_augment(a)
    e = nn.functional.silu(net.map_layer1(nn.functional.silu(net.map_layer0(n))))
    assert torch.allclose(net.embed(x, t, s, aug=a), e, atol=1e-6)
    inter = C.build_net({**net.config, "qkv_order": "interleaved"})
    inter.load_state_dict(net.state_dict())
    assert (inter(x, t, s) - net(x, t, s)).abs().max() > 1e-3  # the order matters


def test_golden_py_meanflow_network():
    """py-meanflow's v0 network (golden from its own SongUNet, make_meanflow_net_golden.py): our UNet with
    num_times 2, time_combine 'concat', time_channels 2 x ch, filter [1,3,3,1], qkv_order 'blocks', augment_dim 6;
    the second time is py-meanflow's h = t - r. Its keys are EDM's."""
    g = torch.load(os.path.join(GOLDEN, "meanflow_net_golden.pt"), weights_only=True)
    nd = C.net_config("ddpmpp", img_resolution=8, ch=4, mult=[1, 2], nb=1, attn_res=[4], time_channels=8, num_times=2,
                      time_combine="concat", resample_filter=[1, 3, 3, 1], qkv_order="blocks", augment_dim=6)
    net = C.build_net(nd).eval()
    C.load_state_strict(net, C._edm_state_to_ours(g["state"], nd, "py-meanflow"))
    with torch.no_grad():
        assert (net(g["x"], g["t"], g["h"]) - g["out"]).abs().max() < 1e-5
        assert (net(g["x"], g["t"], g["h"], aug=g["aug"]) - g["out_aug"]).abs().max() < 1e-5
        assert (g["out_aug"] - g["out"]).abs().max() > 1e-2 and g["out"].abs().max() > 0.5


def test_label_dropout_and_zero_label():
    net = _tiny_ncsnpp(label_dropout=1.0)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([3, 4])
    assert torch.equal(net(x, t, y=y), net(x, t, y=torch.eye(10)[y]))
    assert not torch.equal(net(x, t, y=y), net(x, t))  # eval: labels count; None = the zero row (bias only)
    net.train()
    assert torch.equal(net(x, t, y=y), net(x, t))  # label_dropout 1: every label dropped


def test_jvp_ncsnpp_layout_matches_finite_differences():
    """Forward-mode AD through the Fourier embedding, FIR resampling, residual encoder and concatenated times."""
    net = _tiny_ncsnpp(num_times=2, time_combine="concat").double()
    x, t, s = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.rand(2, dtype=torch.float64) / 10, \
        torch.rand(2, dtype=torch.float64) / 10
    tan = [torch.randn_like(v) for v in (x, t, s)]
    f = lambda *a: net(*a)  # noqa: E731
    out, jv = torch.func.jvp(f, (x, t, s), tuple(tan))
    h = 1e-6
    fd = (f(*[a + h * v for a, v in zip((x, t, s), tan)]) - f(*[a - h * v for a, v in zip((x, t, s), tan)])) / (2 * h)
    assert jv.norm() > 1e-3 * out.norm() > 0 and (jv - fd).norm() / jv.norm() < 1e-6


def test_a_pickle_cannot_change_the_allowed_globals_for_later_loads(tmp_path):
    """A BUILD opcode sets attributes on the object it is given: on the one shared EasyDict class (its attributes, its
    __init__) or on an allowed function (its __defaults__), the change stayed for every later load in the process.
    Each reference is a new object now; a later load sees none of it."""
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(b"cdnnlib.util\nEasyDict\n(N}S'marker'\nI1\nstb0"  # setattr(EasyDict, 'marker', 1)
                     b"ctorch._utils\n_rebuild_tensor_v2\n(N}S'__defaults__'\n(I7\ntstb.")  # and its __defaults__
    C.read_edm_pickle(str(evil))
    plain = tmp_path / "plain.pkl"
    plain.write_bytes(b"cdnnlib.util\nEasyDict\n)R.")  # EasyDict()
    d = C.read_edm_pickle(str(plain))
    assert isinstance(d, dict) and not hasattr(d, "marker") and not hasattr(type(d), "marker")
    assert C._tensor.__defaults__ is None
