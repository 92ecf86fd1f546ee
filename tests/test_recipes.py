"""The CIFAR-10 recipes: no silent fallback in a reproduction preset, precision as the reference code ran it.

- A missing weights file (Inception for the in-training FID, LPIPS's VGG and linear heads) stops a `--fallback false`
  run (every `cifar10` preset) with one sentence naming the file and the flag that chooses the fallback; with the
  default `--fallback true` (toy, tiny, small) the run warns and goes on.
- `sample` and `fid` run the network in fp32 with TF32 off unless `--precision` says otherwise; `strict_fp32` holds
  the run's autocast off inside it (the FID hook, the JVP passes and the time embedding rely on it).
- Each `cifar10` preset's precision is the reference implementation's (see README, "CIFAR-10: the papers' recipes").
- The in-training FID of flow_map and rectified_flow (a row per --fid_every step) is the `fid` of the run's EMA.
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import distributional  # noqa: E402
import flow_map  # noqa: E402
import imm  # noqa: E402
import rectified_flow as RF  # noqa: E402
import scm  # noqa: E402
from cli import guarded, sentence  # noqa: E402

FILES = dict(imm=imm, rectified_flow=RF, scm=scm, flow_map=flow_map, distributional=distributional)


@pytest.fixture
def imgs(tmp_path):
    path = tmp_path / "imgs.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    return str(path)


def test_cifar10_presets_stop_instead_of_falling_back_and_name_their_precision():
    want = dict(imm="tf32", rectified_flow="tf32", scm="fp32", flow_map="fp32", distributional="bf16")
    for name, mod in FILES.items():
        p = mod.PRESETS["cifar10"]
        assert p["fallback"] is False and all(mod.PRESETS[k].get("fallback", True) for k in ("toy", "tiny", "small"))
        assert p["precision"] == want[name], name
        assert mod.Config().fallback is True


@pytest.mark.parametrize("name", ["imm", "scm"])
def test_missing_fid_detector_stops_a_strict_run_and_warns_otherwise(name, imgs, tmp_path, monkeypatch, capsys):
    """Inception missing offline: a strict run stops, a default one warns and trains. A detector file named by
    --fid_detector that is missing (or unusable) stops any run, --fallback true too (it was skipped with the warning
    meant for Inception's download)."""
    mod = FILES[name]
    base = ["--preset", "tiny", "--data", imgs, "--iters", "1", "--fid_every", "1", "--fid_n", "4",
            "--root", str(tmp_path)] + (["--mode", "diffusion"] if name == "scm" else [])
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    err = guarded(capsys, lambda: mod.main([*base, "--out", str(tmp_path / "a"), "--fallback", "false"]))
    assert "inception" in err and "--fid_every 0" in err and "--fallback true" in err
    assert not os.path.exists(tmp_path / "a" / "ckpt.pt")  # stopped before training
    for fallback in ("false", "true"):
        err = guarded(capsys, lambda: mod.main([*base, "--fid_detector", str(tmp_path / "nowhere.pt"), "--out",
                                                str(tmp_path / "n"), "--fallback", fallback]))
        assert "nowhere.pt" in err and "--fid_every 0" in err and "--fallback" not in err  # (it cannot help)
        assert not os.path.exists(tmp_path / "n")
    mod.main([*base, "--out", str(tmp_path / "b")])  # the default warns and trains
    assert "FID skipped" in capsys.readouterr().out and os.path.exists(tmp_path / "b" / "ckpt.pt")


@pytest.mark.parametrize("name", sorted(FILES))
def test_a_strict_run_checks_its_weights_before_any_output(name, imgs, tmp_path, monkeypatch, capsys):
    """The missing detector is found right after setup: nothing printed (no start line, no in-file teacher's
    training), no file written; for rectified_flow `--stage all`, missing LPIPS weights stop the run before the
    1-RF trains (they were first needed at the 2-RF, after the pairs)."""
    out = tmp_path / "a"
    base = ["--preset", "tiny", "--data", imgs, "--iters", "1", "--fallback", "false", "--out", str(out),
            "--root", str(tmp_path)]
    err = guarded(capsys, lambda: FILES[name].main([*base, "--fid_every", "1", "--fid_n", "4", "--fid_detector",
                                                    str(tmp_path / "nowhere.pt")]))
    assert "nowhere.pt" in err and "--fid_every 0" in err
    assert not os.path.exists(out)
    if name == "rectified_flow":  # offline: torch hub prints its "Downloading: ..." line, then fails
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

        def offline(*a, **k):
            raise OSError("no network")
        monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
        seen, first = [], C.rank0_first  # under torchrun this check's download is rank 0's, the others waiting: the
        monkeypatch.setattr(C, "rank0_first", lambda env, fn: (seen.append(env), first(env, fn))[1])  # run's env
        err = guarded(capsys, lambda: RF.main([*base, "--stage", "all", "--fid_every", "0", "--loss",
                                               "lpips-huber-1/t"]))
        assert "LPIPS weights unavailable" in err and "--loss huber" in err
        assert not os.path.exists(out)
        assert seen and all(isinstance(e, C.Env) for e in seen), seen  # (None: every rank downloaded at once)


def test_missing_projected_d_weights_stop_gdd_before_the_in_file_teacher_trains(imgs, tmp_path, monkeypatch, capsys):
    """GDD's `projected` D needs ImageNet weights; offline they are missing. The run stops in one sentence before the
    in-file teacher's training (it was found after it, when the D was built), nothing printed or written; the same
    run with the random stand-in builds its D, trains its teacher and writes its step-0 checkpoint (the control)."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # after torch hub's "Downloading: ..." line
    out = tmp_path / "g"
    base = ["--preset", "tiny", "--data", imgs, "--iters", "1", "--teacher_iters", "2", "--out", str(out),
            "--root", str(tmp_path), "--disc", "projected", "--disc_backbones", "vgg", "--disc_weights"]
    err = guarded(capsys, lambda: distributional.main([*base, "imagenet"]))
    assert "vgg16_bn" in err and "--disc_weights random" in err
    assert not os.path.exists(out)
    distributional.main([*base, "random", "--iters", "0"])  # (no step: the stand-in's VGG at 224 px costs ~20 s a step)
    assert os.path.exists(out / "teacher.pt") and torch.load(out / "ckpt.pt", weights_only=True)["step"] == 0


def test_a_resumed_run_checks_the_detector_with_its_own_config(imgs, tmp_path, capsys):
    """The check runs on the resumed config: --fallback false saved in the checkpoint and --fid_every given now
    is refused; a run saved with --fid_every 0 and resumed without it needs no detector."""
    base = ["--preset", "tiny", "--data", imgs, "--root", str(tmp_path), "--out", str(tmp_path / "r")]
    imm.main([*base, "--iters", "1", "--fallback", "false", "--fid_every", "0"])
    capsys.readouterr()
    err = guarded(capsys, lambda: imm.main([*base, "--iters", "2", "--fid_every", "1", "--fid_n", "4",
                                            "--fid_detector", str(tmp_path / "nowhere.pt")]))
    assert "nowhere.pt" in err
    imm.main([*base, "--iters", "2", "--fid_detector", str(tmp_path / "nowhere.pt")])
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 2


def test_missing_lpips_stops_a_strict_run_and_falls_back_otherwise(tmp_path, monkeypatch, capsys):
    """Offline (torch hub prints "Downloading: ..." before it fails): a strict run's one sentence, a default run's
    one warning line; neither shows the download line."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def offline(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = RF.Config(loss="lpips-huber-1/t", fallback=False)
    with pytest.raises(C.UserError) as e:
        RF.make_lpips(cfg, None)
    sentence(e, "vgg16-397923af.pth", "vgg.pth", "--loss huber",
             "https://download.pytorch.org/models/vgg16-397923af.pth")  # (where to get VGG16 offline)

    class Log:
        lines = []

        def info(self, m):
            self.lines.append(m)
    cfg, log = RF.Config(loss="lpips-huber-1/t"), Log()
    assert RF.make_lpips(cfg, log) is None and cfg.loss == "huber" and log.lines[0].startswith("warning: LPIPS")
    assert capsys.readouterr() == ("", "")


@pytest.mark.parametrize("name", ["imm", "flow_map"])
def test_sample_defaults_to_strict_fp32_and_precision_overrides(name, monkeypatch, tmp_path):
    mod, seen = FILES[name], []
    real = C.setup
    mod.main(["--iters", "1", "--batch", "16", "--eval_n", "8", "--eval_steps", "1", "--out", str(tmp_path / "r")])
    monkeypatch.setattr(C, "setup", lambda device, seed, precision: seen.append(precision) or real(device, seed,
                                                                                                 precision))
    ck = str(tmp_path / "r" / "ckpt.pt")
    mod.main(["sample", "--ckpt", ck, "--steps", "1", "--n", "4", "--out", str(tmp_path / "s.npy")])
    mod.main(["sample", "--ckpt", ck, "--steps", "1", "--n", "4", "--out", str(tmp_path / "t.npy"), "--precision",
              "bf16"])
    assert seen == ["fp32", "bf16"]
    real("cpu", 0, "fp32")
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32


def test_strict_fp32_holds_the_runs_autocast_off():
    env = C.Env(0, 1, 0, torch.device("cpu"), True, "bf16")
    lin = torch.nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with C.autocast(env):
        assert lin(x).dtype == torch.bfloat16
        with C.strict_fp32("cpu"), C.autocast(env):
            assert lin(x).dtype == torch.float32
        assert lin(x).dtype == torch.bfloat16


def _images(res=32):
    return C.Data("images", "x", x=torch.zeros(4, 3, res, res, dtype=torch.uint8))


def test_cifar10_presets_augment_where_their_reference_did():
    """EDM's pipe: IMM (Table 5) and sCM's diffusion teacher at p = 0.12 with EDM's multipliers (augment_dim 9);
    MeanFlow as py-meanflow v0 (no y-flip, no rotation: augment_dim 6) on py-meanflow's network, after a random
    x-flip of the data (training/data_transform.py: RandomHorizontalFlip) and with TF32 (train.py); IMM's Table 5
    lists x-flip as well as EDM augment; EDM's runs have no data x-flip."""
    def cfg(mod, **sel):
        return C.resolve_config(mod.Config, mod.PRESETS, "cifar10", {}, **sel)
    for mod, c, dim, flip in ((imm, cfg(imm), 9, True), (scm, cfg(scm, mode="diffusion"), 9, False),
                              (flow_map, cfg(flow_map, mode="meanflow"), 6, True)):
        assert c.augment == 0.12 and c.xflip == flip, mod.__name__
        nd = mod.net_dict(c, _images())
        assert nd["augment_dim"] == dim, mod.__name__
    nd = flow_map.net_dict(cfg(flow_map, mode="meanflow"), _images())
    assert (nd["time_combine"], nd["resample_filter"], nd["qkv_order"], nd["time_channels"]) == \
        ("concat", [1, 3, 3, 1], "blocks", 256)
    mf = cfg(flow_map, mode="meanflow")
    assert (mf.precision, mf.iters, mf.warmup, mf.batch) == ("tf32", 16_000 * 48, 200 * 48, 8 * 128)  # 48 = 6250 // 128
    for mod, c in ((scm, cfg(scm, mode="sct")), (flow_map, cfg(flow_map, mode="lsd")), (RF, cfg(RF, stage="1rf"))):
        assert not getattr(c, "augment", 0), mod.__name__  # their references did not augment
    with pytest.raises(C.UserError, match="2-D points"):
        imm.net_dict(imm.Config(augment=0.1), C.Data("points", "p", x=torch.zeros(4, 2)))


def test_imm_both_passes_see_the_same_augmentation_labels(monkeypatch):
    torch.manual_seed(0)
    nd = C.net_config("tiny", img_resolution=8, num_times=2, time_scale=1000.0, augment_dim=9)
    net = C.build_net(nd)
    seen = []
    real = net.forward
    monkeypatch.setattr(net, "forward", lambda *a, **k: seen.append(k.get("aug")) or real(*a, **k))
    x = torch.rand(8, 3, 8, 8) * 2 - 1
    xa, aug = C.augment_batch(x, 1.0, 0, 3)
    assert aug.shape == (8, 9) and not torch.equal(xa, x)
    s, r, t = (torch.full((8,), v) for v in (0.2, 0.5, 0.6))
    imm.imm_loss(net, net, xa, 0.5 * torch.randn_like(xa), s, r, t, imm.Config(M=4), C.Env(0, 1, 0,
                 torch.device("cpu"), True, "fp32"), aug)
    assert len(seen) == 2 and seen[0] is aug and seen[1] is aug


def test_augmented_run_resumes_exactly(imgs, tmp_path):
    base = ["--preset", "tiny", "--data", imgs, "--augment", "0.5", "--root", str(tmp_path), "--ckpt_every", "2",
            "--eval_n", "4", "--eval_steps", "1"]
    imm.main([*base, "--out", str(tmp_path / "a"), "--iters", "4"])
    imm.main([*base, "--out", str(tmp_path / "b"), "--iters", "2"])
    imm.main([*base, "--out", str(tmp_path / "b"), "--iters", "4"])
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert a["net"]["augment_dim"] == 9 and a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_strict_fp32_turns_tf32_off_unless_told_and_flow_map_keeps_it_for_tf32_runs(monkeypatch, tmp_path):
    """strict_fp32 turns TF32 off inside and restores the flags; tf32=True leaves them (autocast off only). flow_map's
    JVP blocks pass tf32=True exactly for a --precision tf32 run (py-meanflow's JVPs ran with TF32)."""
    flags = lambda: (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    old = flags()
    try:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        env = C.Env(0, 1, 0, torch.device("cpu"), True, "bf16")
        lin, x = torch.nn.Linear(4, 4), torch.randn(2, 4)
        for tf32, inside in ((False, (False, False)), (True, (True, True))):
            with C.strict_fp32("cpu", tf32=tf32), C.autocast(env):
                assert flags() == inside and lin(x).dtype == torch.float32
            assert flags() == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
    seen, real = [], C.strict_fp32
    def spy(device, tf32=False):  # flow_map.py's calls only (common's time embedding and evaluation stay strict)
        if os.path.basename(sys._getframe(1).f_code.co_filename) == "flow_map.py":
            seen.append(tf32)
        return real(device, tf32)
    monkeypatch.setattr(C, "strict_fp32", spy)
    for precision in ("tf32", "fp32", "bf16"):
        seen.clear()
        flow_map.main(["--mode", "meanflow", "--iters", "1", "--batch", "16", "--eval_n", "8", "--eval_steps", "1",
                       "--precision", precision, "--out", str(tmp_path / precision)])
        assert seen and all(s == (precision == "tf32") for s in seen), (precision, seen)


@pytest.mark.parametrize("name", ["flow_map", "rectified_flow"])
def test_the_in_training_fid_scores_the_ema_at_its_steps(name, imgs, tmp_path, capsys):
    """--fid_every in flow_map and rectified_flow (imm's, scm's and GDD's run in other tests; these two never ran):
    a row per FID step in fid_train.jsonl, scored by the named detector, the sampler's step count as its label (the
    1-RF at 18 Euler steps, a flow map at each --eval_steps), and the score that of the run's EMA weights: `fid` of
    the final checkpoint with the same detector, samples and seed gives the last row's number."""
    from standin import standin_path
    out, det = tmp_path / "r", standin_path()
    # (flow_map: an EMA that moves in 2 steps, else its 1- and 2-step samples round to the same uint8 images from its
    # zero-initialised output layer and a swap of the two labels would pass)
    extra = ["--eval_steps", "1,2", "--ema", "0.9", "--lr", "1e-2"] if name == "flow_map" else ["--stage", "1rf"]
    FILES[name].main(["--preset", "tiny", "--data", imgs, "--iters", "2", "--fid_every", "1", "--fid_n", "8",
                      "--fid_detector", det, "--root", str(tmp_path), "--out", str(out), *extra])
    with open(out / "fid_train.jsonl") as f:
        rows = [json.loads(ln) for ln in f]
    labels = ["1 step", "2 steps"] if name == "flow_map" else ["18 steps"]
    assert [r["step"] for r in rows] == [1, 2] and all(r["detector"] == "standin" for r in rows), rows
    assert all(sorted(r["fid"]) == labels and all(v > 0 for v in r["fid"].values()) for r in rows), rows
    steps = "1,2" if name == "flow_map" else "18"
    FILES[name].main(["fid", "--ckpt", str(out / "ckpt.pt"), "--steps", steps, "--n", "8", "--fid_detector", det,
                      "--root", str(tmp_path)])
    with open(out / "fid.jsonl") as f:
        got = {C.n_steps(r["steps"]): r["fid"] for r in map(json.loads, f)}
    assert got == pytest.approx(rows[-1]["fid"], rel=1e-9, abs=0), (got, rows[-1])
    assert len(set(got.values())) == len(labels), got  # each label's own number
    capsys.readouterr()
