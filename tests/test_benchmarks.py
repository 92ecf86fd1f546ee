"""Smoke tests of benchmarks/throughput.py (CPU, a few seconds) and the FLOP count of the DDPM++ network.

Speed itself is never asserted here (speed targets live in benchmarks/, not in timed tests).
"""
import json
import math
import os
import re
import sys
import types

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import common  # noqa: E402
from cli import guarded  # noqa: E402


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmark scripts import as modules
import throughput as tp  # noqa: E402


def _forward_flops(name, **overrides):
    """FlopCounterMode count of one forward of one image on the CPU (B = 1). The network is built on the meta
    device and given empty CPU storage (zeroed): the FLOP count does not depend on the weights, and this skips
    the initialisation of 55M parameters. FlopCounterMode does not run on meta here (autocast has no meta)."""
    cfg = common.net_config(name, **overrides)
    with torch.device("meta"):
        net = common.build_net(cfg)
    net = net.to_empty(device="cpu")
    for p in net.parameters():
        p.data.zero_()
    R, C = cfg["img_resolution"], cfg["in_channels"]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(torch.zeros(1, C, R, R), torch.full((1,), 0.5))
    return fc.get_total_flops()


def test_throughput_smoke_tiny_cpu(capsys):
    rec = tp.main(["--method", "fm", "--net", "tiny", "--batch", "4", "--sample_batch", "4", "--iters", "2",
                   "--warmup", "1", "--device", "cpu", "--precision", "fp32"])
    for k in ("train_img_per_s", "sample_img_per_s_1step", "sample_img_per_s_2step", "train_tflops"):
        assert rec[k] > 0, k
    fwd = _forward_flops("tiny", **tp.METHODS["fm"].net)
    assert fwd > 0
    assert rec["fwd_flops_per_img"] == fwd
    assert rec["train_flops_per_img"] == 3 * fwd
    assert rec["params"] == 189_347  # EDM DDPM++ at 32x32, 2-D variant: see test_common item 1
    assert rec["peak_fraction"] is None and rec["device"] == "cpu"  # no peak on the CPU
    assert json.loads(json.dumps(rec)) == rec  # a plain JSON record
    row = capsys.readouterr().out
    assert "| fm | tiny | 4 | fp32 | False |" in row


def test_save_merges_and_refuses_cpu_in_results(tmp_path):
    base = dict(date="d", device="cuda", device_name="GPU X", torch="t", cuda=None, commit=None, method="fm",
                net="ddpmpp", params=1, resolution=32, batch=128, sample_batch=128, precision="bf16",
                compile=False, iters=1, warmup=0, fwd_flops_per_img=42_000_000_000,
                train_flops_per_img=126_000_000_000, train_img_per_s=1000.0, train_tflops=126.0, peak_tflops=989.0,
                peak_fraction=126 / 989, sample_img_per_s_1step=5000.0, sample_img_per_s_2step=2500.0,
                warmup_s=1.0, max_mem_gib=10.0, final_loss=1.0)
    tp.save(base, str(tmp_path))
    recs = tp.save({**base, "train_img_per_s": 2000.0}, str(tmp_path))  # same key: replaced
    assert len(recs) == 1 and recs[0]["train_img_per_s"] == 2000.0
    recs = tp.save({**base, "compile": True}, str(tmp_path))  # new key: appended
    assert len(recs) == 2
    assert json.load(open(tmp_path / "throughput.json")) == recs
    md = (tmp_path / "throughput.md").read_text()
    assert md.count("| GPU X |") == 2 and "2,000" in md and "12.7%" in md
    with pytest.raises(common.UserError):  # CPU numbers never go into benchmarks/results
        tp.main(["--net", "tiny", "--device", "cpu", "--quick", "--save"])


def test_ddpmpp_forward_flops_match_spec():
    """DDPM++ forward = 42.37 GFLOP per 32x32 image (multiply-add = 2 FLOPs)."""
    fwd = _forward_flops("ddpmpp")
    assert abs(fwd / 42.37e9 - 1) < 0.03, fwd / 1e9


def test_throughput_imm_step_counts_target_pass():
    """IMM registers two time inputs and 4/3 of a forward+backward per step (online pass + no-grad target)."""
    rec = tp.main(["--method", "imm", "--net", "tiny", "--batch", "8", "--sample_batch", "4", "--iters", "2",
                   "--warmup", "1", "--device", "cpu", "--precision", "fp32"])
    net = common.build_net(common.net_config("tiny", **tp.METHODS["imm"].net))
    fwd = tp.forward_flops(net, (3, 16, 16), torch.device("cpu"), num_times=2)
    assert fwd == rec["fwd_flops_per_img"] and fwd > _forward_flops("tiny")  # the second time branch costs FLOPs
    assert rec["params"] == 194_595 + 9 * 16  # tiny with a second time input and the 9 augmentation labels
    assert rec["fwd_flops_per_img"] == fwd and rec["train_flops_per_img"] == round(4 * fwd)
    assert rec["train_img_per_s"] > 0 and math.isfinite(rec["final_loss"]) and rec["final_loss"] >= 0


def _tiny_run(method, tmp_path, *extra):
    """One CPU measurement of `method` on the tiny net (batch 4, 1 + 2 iterations, fp32), reading and writing no
    results except in tmp_path. LPIPS at 32^2 instead of 224^2 keeps 2rf_lpips at a second."""
    return tp.main(["--method", method, "--net", "tiny", "--batch", "4", "--sample_batch", "4", "--iters", "2",
                    "--warmup", "1", "--device", "cpu", "--precision", "fp32", "--lpips_res", "32",
                    "--results", str(tmp_path), *extra])


@pytest.mark.parametrize("method", sorted(tp.METHODS))
def test_every_method_trains_and_samples_on_cpu(method, tmp_path):
    """Every registered step (the method's own code path) trains the tiny net on the CPU: finite positive img/s,
    a finite loss, both samplers run, and the training FLOPs follow the registered cost."""
    rec = _tiny_run(method, tmp_path)
    for k in ("train_img_per_s", "sample_img_per_s_1step", "sample_img_per_s_2step", "train_tflops"):
        assert math.isfinite(rec[k]) and rec[k] > 0, k
    assert math.isfinite(rec["final_loss"])
    cost = tp.METHODS[method].fwd_per_step
    assert rec["fwd_per_step"] == (cost if not callable(cost) else rec["fwd_per_step"]) and rec["fwd_per_step"] >= 1
    assert rec["train_flops_per_img"] == round(3 * rec["fwd_per_step"] * rec["fwd_flops_per_img"])
    assert rec["vs_fm"] == (1.0 if method == "fm" else None)  # no fm record in tmp_path
    assert rec["paper_precision"] == tp.METHODS[method].precision and rec["precision"] == "fp32"
    assert json.loads(json.dumps(rec)) == rec
    if method == "2rf_lpips":  # 1 + F_vgg / F_unet (docs/rectified_flow.md, cost), VGG16 at 32^2 >> the tiny U-Net
        assert rec["lpips_res"] == 32 and rec["fwd_per_step"] > 2
    if method == "gdd_i":  # GDD-I trains with its convolutions frozen (distributional.frozen, Zyriix/GDD's name rule)
        assert any(not p.requires_grad for p in tp._ENV["state"]["net"].parameters())


def test_flow_map_step_runs_its_forwards_through_the_network_given(tmp_path, monkeypatch):
    """flow_map.train passes its (compiled with --compile) network as per_sample_loss's `fast` for the diagonal and
    PSD terms; the benchmark's step passed none, so a compiled lsd/psd/lmd record would have measured eager code
    and gpu_check called them 'unsupported'."""
    import flow_map
    seen, real = [], flow_map.per_sample_loss
    monkeypatch.setattr(flow_map, "per_sample_loss", lambda *a, **k: seen.append(k.get("fast")) or real(*a, **k))
    _tiny_run("psd", tmp_path)
    assert seen and all(f is not None for f in seen)


def _preset_net(method):
    """The method file's own net_dict for its cifar10 preset, on a 3 x 16 x 16 data set with net tiny."""
    import flow_map, imm, rectified_flow as rf, scm
    data = types.SimpleNamespace(kind="images", shape=(3, 16, 16), num_classes=0)
    res = lambda mod, given, **sel: common.resolve_config(mod.Config, mod.PRESETS, "cifar10", dict(net="tiny", **given),
                                                          **sel)
    if method in ("fm", "2rf", "2rf_lpips", "gdd", "gdd_i"):
        nd = rf.net_dict(res(rf, {}, stage="1rf" if method in ("fm", "gdd", "gdd_i") else "2rf"), data)
        return {**nd, "dropout": 0.0} if method.startswith("gdd") else nd  # distributional.load_teacher: dropout 0
    if method == "imm":
        return imm.net_dict(res(imm, {}), data)
    if method in ("sct", "scd"):
        return scm.net_dict(res(scm, {}, mode=method), data)
    return flow_map.net_dict(res(flow_map, dict(teacher="t") if method == "lmd" else {}, mode=method), data)


@pytest.mark.parametrize("method", sorted(tp.METHODS))
def test_registered_net_is_the_cifar10_preset_net(method):
    """METHODS[m].net reproduces the file's cifar10 network (time inputs, time_scale, ADN, time channels, dropout)."""
    assert common.net_config("tiny", **tp.METHODS[method].net) == _preset_net(method)


def test_paper_precision_runs_bf16_gan_step(tmp_path):
    """--precision paper selects the method's precision: GDD's bf16 generator (its D stays fp32 inside)."""
    rec = _tiny_run("gdd", tmp_path, "--precision", "paper")
    assert rec["precision"] == "bf16" and math.isfinite(rec["final_loss"])


def test_measured_cost_vs_fm_in_saved_records(tmp_path):
    """The `cost vs fm, measured` column is fm img/s / method img/s of the record with the same device, torch, net,
    batch, precision and compile, recomputed on every save (an fm record saved later fills it in)."""
    base = dict(date="d", device="cuda", device_name="GPU X", torch="t", cuda=None, commit=None, method="imm",
                net="ddpmpp", params=1, resolution=32, batch=128, sample_batch=128, precision="bf16", compile=False,
                iters=1, warmup=0, fwd_flops_per_img=1, train_flops_per_img=4, fwd_per_step=4 / 3,
                train_img_per_s=400.0, train_tflops=1.0, peak_tflops=None, peak_fraction=None,
                sample_img_per_s_1step=1.0, sample_img_per_s_2step=1.0, warmup_s=1.0, max_mem_gib=1.0, final_loss=1.0)
    recs = tp.save(base, str(tmp_path))
    assert recs[0]["vs_fm"] is None  # no fm record yet
    tp.save({**base, "method": "imm", "batch": 64, "train_img_per_s": 100.0}, str(tmp_path))  # other batch
    old = {k: v for k, v in base.items() if k != "fwd_per_step"}  # a record written before the column existed
    tp.save({**old, "method": "sct", "precision": "fp32", "train_img_per_s": 50.0}, str(tmp_path))
    recs = tp.save({**base, "method": "fm", "train_img_per_s": 1000.0, "fwd_per_step": 1.0}, str(tmp_path))
    by = {(r["method"], r["batch"], r["precision"]): r for r in recs}
    assert by[("fm", 128, "bf16")]["vs_fm"] == 1.0
    assert by[("imm", 128, "bf16")]["vs_fm"] == pytest.approx(2.5)  # 1000 / 400: time per image, not img/s
    assert by[("imm", 64, "bf16")]["vs_fm"] is None and by[("sct", 128, "fp32")]["vs_fm"] is None
    assert json.load(open(tmp_path / "throughput.json")) == recs
    md = (tmp_path / "throughput.md").read_text()
    assert "| cost vs fm, counted | cost vs fm, measured |" in md
    assert "| imm | ddpmpp | 128 | bf16 | False | 400 | 1.33 | 2.50 |" in md
    assert "| sct | ddpmpp | 128 | fp32 | False | 50 | – | – |" in md


def test_main_reports_measured_cost_vs_fm(tmp_path, monkeypatch, capsys):
    """A run reads the fm record of its own setting from --results and reports fm img/s / its img/s."""
    monkeypatch.setattr(tp, "device_name", lambda dev: "CPU test")
    fm = dict(method="fm", device_name="CPU test", torch=torch.__version__, net="tiny", batch=4, precision="fp32",
              compile=False, train_img_per_s=1e6, date="d")
    (tmp_path / "throughput.json").write_text(json.dumps([fm, {**fm, "batch": 8, "train_img_per_s": 1.0}]))
    rec = _tiny_run("2rf", tmp_path)
    assert rec["vs_fm"] == pytest.approx(1e6 / rec["train_img_per_s"]) and rec["vs_fm"] > 1
    assert f"measured {rec['vs_fm']:.2f}x" in capsys.readouterr().out


def test_missing_fm_record_hint_is_a_command_that_works(tmp_path, monkeypatch, capsys):
    """Without its fm record a run prints the command that saves one (a CPU run: outside benchmarks/results, which
    refuses it); followed as printed, the run finds the record and measures its cost vs fm."""
    monkeypatch.setattr(tp, "CPU_RESULTS", str(tmp_path))
    argv = ["--quick", "--method", "imm", "--device", "cpu"]
    tp.main(argv)
    hint = re.search(r"`python benchmarks/throughput.py (.+?)`, then pass (--results \S+) here too",
                     capsys.readouterr().out)
    tp.main(hint.group(1).split())
    assert tp.main([*argv, *hint.group(2).split()])["vs_fm"] > 0


def test_unknown_method_is_one_sentence_and_exit_2():
    r = cli.run(os.path.join("benchmarks", "throughput.py"), "--method", "nope", "--device", "cpu", cwd=ROOT,
                timeout=120)
    assert cli.refused(r).startswith("unknown --method 'nope'; choose one of fm, ")


def test_non_finite_loss_is_a_user_error(monkeypatch, tmp_path):
    nan_step = lambda net, x: net(x, torch.rand(len(x))).float().mean() * float("nan")
    monkeypatch.setitem(tp.METHODS, "nan", tp.Method(step=nan_step, sample=tp.euler_sample))
    with pytest.raises(common.UserError, match="the training loss became nan"):
        _tiny_run("nan", tmp_path)


# ================================================================ cm_vs_ode.py (sCM against its teacher's ODE)
import cm_vs_ode as cvo  # noqa: E402
import scm  # noqa: E402

S = 0.8  # data std of the Gaussian oracle (not sigma_d = 0.5: with S = sigma_d the exact CM is f(x_t, t) = x_t)


class GaussianTrigFlow(torch.nn.Module):
    """F(u, t) of the exact teacher (or, cm=True, the exact consistency model) for data N(0, S^2 I) in TrigFlow:
    f(x_t, t) = cos t x_t - sin t sigma_d F. Teacher: f = D(x; sigma) = S^2 / (S^2 + sigma^2) x (the x0-prediction);
    CM: f = the ODE's end point S / sqrt(S^2 + sigma^2) x; x = x_t / cos t, sigma = sigma_d tan t. shift moves f."""

    def __init__(self, cm=False, shift=0.0):
        super().__init__()
        self.cm, self.shift = cm, shift

    def forward(self, u, t):
        x_t = 0.5 * u
        c, s = t.cos()[:, None], t.sin()[:, None]
        x, sig2 = x_t / c, (0.5 * t.tan()[:, None]) ** 2
        f = (S / (S ** 2 + sig2).sqrt() if self.cm else S ** 2 / (S ** 2 + sig2)) * x + self.shift
        return (c * x_t - f) / (0.5 * s)


def test_teacher_ode_matches_the_gaussian_flow_map():
    """From x_t at any t the exact Gaussian teacher's ODE ends at S / sqrt(S^2 + sigma^2) x_t / cos t, with Heun's
    second-order convergence down to the sigma_min = 0.002 floor; the control (x^EDM passed as x_t) misses it."""
    x_t = torch.randn(256, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    teacher = GaussianTrigFlow()
    for t in (1.5, 0.9, 0.3):
        sig = 0.5 * math.tan(t)
        want = S / math.sqrt(S ** 2 + sig ** 2) * x_t / math.cos(t)
        err = [((cvo.teacher_ode(teacher, x_t, t, K, 0.5) - want).abs().max() / want.abs().max()).item()
               for K in (60, 240)]
        assert err[0] < 5e-3 and (err[1] < err[0] / 8 or err[1] < 2e-5), (t, err)  # Heun: second order in 1/K
        assert (cvo.teacher_ode(teacher, x_t / math.cos(t), t, 60, 0.5) - want).abs().max() > 0.01  # control


def test_compare_measures_the_distance_to_the_ode():
    """The exact CM is at distance ~0 from its teacher's ODE at every t; a CM shifted by (0.1, 0) at exactly 0.1."""
    cms = dict(exact=GaussianTrigFlow(cm=True), shifted=GaussianTrigFlow(cm=True, shift=torch.tensor([0.1, 0.0])))
    rows = cvo.compare(GaussianTrigFlow(), cms, "8gaussians", [1.56, 0.9, 0.2], 512, 240, 0)
    for r in rows:
        assert r["exact"]["mean"] < 1e-3 and abs(r["shifted"]["median"] - 0.1) < 1e-3, r
        assert 0 <= r["ode"] <= 1 and 0 <= r["exact"]["score"] <= 1


def test_cm_vs_ode_on_a_scm_run_folder(tmp_path, capsys):
    """End to end on a 3-iteration `scm.py` run: one row per time and CM, the JSON written; bad input is one
    sentence."""
    run = str(tmp_path / "r")
    scm.main(["--iters", "3", "--H", "2", "--eval_n", "64", "--out", run])
    rows = cvo.main(["--run", run, "--n", "64", "--ode_steps", "4", "--times", "max,0.5", "--json", run + "/c.json"])
    assert [round(r["t"], 4) for r in rows] == [round(math.atan(80 / 0.5), 4), 0.5]
    assert set(rows[0]) == {"t", "ode", "sct", "scd"} and json.load(open(run + "/c.json"))["rows"] == rows
    wrong = tmp_path / "w"  # a CM checkpoint where the teacher should be
    (wrong / "diffusion").mkdir(parents=True)
    os.link(os.path.join(run, "sct", "ckpt.pt"), wrong / "diffusion" / "ckpt.pt")
    for argv in (["--run", str(tmp_path)], ["--run", run, "--times", "2.0"], ["--run", run, "--times", "x"],
                 ["--run", str(wrong)]):
        with pytest.raises(common.UserError):
            cvo.main(argv)


# ================================================================ bad arguments of the benchmark scripts
@pytest.mark.parametrize("script, argv, words", [
    ("throughput", ["--lr", "nan"], "--lr"), ("throughput", ["--lr", "-1"], "--lr"),
    ("throughput", ["--peak_tflops", "-1"], "--peak_tflops"), ("throughput", ["--iters", "a"], "--iters"),
    ("throughput", ["--precision", "fp8"], "--precision"), ("throughput", ["--compile", "maybe"], "--compile"),
    ("throughput", ["stray"], "stray"), ("throughput", ["--save", "--results", "/proc/x"], "--results"),
    ("gpu_check", ["--quick", "--device", "gpu"], "--device gpu"), ("gpu_check", ["--budget", "a"], "--budget"),
    ("gpu_check", ["--quick", "--results", "/proc/x"], "--results"), ("gpu_check", ["--foo"], "--foo"),
    ("cm_vs_ode", ["--run", "x", "--n", "0"], "--n"), ("cm_vs_ode", ["--run", "x", "--ode_steps", "0"], "--ode_steps"),
    ("cm_vs_ode", ["--run", "x", "--ode_steps", "1000000000"], "--ode_steps must be in [1, 100000]"),  # (ran for ever)
    ("cm_vs_ode", ["--run", "x", "--seed", "-1"], "--seed must be non-negative"),
    ("cm_vs_ode", ["--run", "x", "--json", ROOT], "is a folder"),
    ("gpu_check", ["--_child", "notjson"], "--_child"), ("fashion", ["--task", "bogus"], "--task"),
    ("throughput", ["--quick", "--results", os.path.join(ROOT, "README.md")], "is a file"),
    ("gpu_check", ["--quick", "--budget", "inf"], "--budget"),
    ("throughput", ["--quick", "--sample_batch", "0"], "--sample_batch"),
    ("fashion", ["--seed", "-1", "--results", "/proc/x"], "--seed"),
    ("fashion", ["--fd_seed", str(2 ** 63), "--results", "/proc/x"], "--fd_seed"),
    ("fashion", ["--ref_steps", "1000000", "--results", "/proc/x"], "--ref_steps must be in [1, 100000]"),
    ("toy", ["--seeds", "0,-1", "--results", "/proc/x"], "--seeds"),
])
def test_bad_arguments_are_one_sentence(script, argv, words, capsys):
    """Each script's argument errors end as one `error:` sentence, exit 2 (argparse's through common.Parser),
    before any measurement."""
    import importlib
    mod = importlib.import_module(script)
    guarded(capsys, lambda: mod.main(argv), words)  # (and nothing on stdout)


@pytest.mark.parametrize("content", ["{not json", '{"a": 1}', "[1, 2]", '[{"method": "fm"}]'])
def test_unusable_results_file_is_one_sentence_before_measuring(content, tmp_path, monkeypatch, capsys):
    """A throughput.json in --results that save() did not write ends in one sentence naming it, exit 2, before any
    measurement (it was read after one: a traceback, or a crash in save, once the GPU time was spent)."""
    (tmp_path / "throughput.json").write_text(content)
    monkeypatch.setattr(tp, "measure", lambda *a: pytest.fail("measured before the results file was read"))
    guarded(capsys, lambda: tp.main(["--quick", "--method", "imm", "--save", "--results", str(tmp_path)]),
            str(tmp_path / "throughput.json"))
    assert (tmp_path / "throughput.json").read_text() == content


@pytest.mark.parametrize("name, bf16", [("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0),
                                        ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200", 989.0),
                                        ("NVIDIA H200 NVL", 835.0), ("NVIDIA A100-SXM4-80GB", None)])
def test_dense_peak_by_device_name(name, bf16):
    """The dense bf16 peak of the names torch.cuda.get_device_name gives (data sheets, without sparsity): the PCIe
    and NVL boards have their own, lower ones; an unknown GPU none (--peak_tflops)."""
    assert tp.default_peak(name, "bf16") == bf16


# ======================================================================================== toy_defaults.py
def test_toy_defaults_runs_each_after_its_start_and_reports_what_the_runs_wrote(tmp_path, capsys):
    """benchmarks/toy_defaults.py, on a table of its own (tiny runs): each run is its file's command line; a run
    starts from the run it names of the same round (GDD's teacher: that round's 1-RF checkpoint), the longer runs
    from the last round's; the scores are the last row of the run's own metrics.jsonl, the wall-clock its `total`
    line, and two rounds of a seeded run agree (without their timings)."""
    import toy_defaults as TD
    q = ["--eval_n", "256"]
    default = {"rf": ("rectified_flow", ["--stage", "1rf", "--iters", "3", *q], None),
               "gdd": ("distributional", ["--teacher", "{rf}/ckpt.pt", "--iters", "2", *q], "rf")}
    longer = {"gdd long": ("distributional", ["--teacher", "{rf}/ckpt.pt", "--iters", "4", *q], "rf")}
    w, r = tmp_path / "w", tmp_path / "r"
    res = TD.main(["--repeat", "2", "--jobs", "2", "--results", str(r), "--work", str(w)], runs=(default, longer))
    for name, rounds in (("rf", 2), ("gdd", 2), ("gdd long", 1)):
        assert len(res[name]["wall_s"]) == rounds and all(x > 0 for x in res[name]["wall_s"]) and res[name]["same"]
    teacher = lambda d: json.loads((w / d / "config.json").read_text())["teacher"]
    assert teacher("r0/gdd") == str(w / "r0/rf/ckpt.pt") and teacher("r1/gdd") == str(w / "r1/rf/ckpt.pt")
    assert teacher("r0/gdd_long") == str(w / "r1/rf/ckpt.pt")
    last = json.loads((w / "r1/rf/metrics.jsonl").read_text().splitlines()[-1])
    assert res["rf"]["rows"]["."][-1] == last and res["gdd long"]["rows"]["."][-1]["step"] == 4
    md, saved = (r / "toy_defaults.md").read_text(), json.loads((r / "toy_defaults.json").read_text())
    assert f"| {last['in_mode_1']:.2f} | {last['in_mode_2']:.2f} | {last['in_mode_4']:.2f} | – |" in md
    assert "| gdd long | DIR (step 4) |" in md and md.count("| yes |") == 3 and "| NO |" not in md
    assert "18 Heun steps for the TrigFlow teacher" in md  # (scm's `18` key is Heun's, not Euler's as the 1-RF's 100)
    assert saved["meta"]["default"] == ["rf", "gdd"] and saved["meta"]["longer"] == ["gdd long"]
    # the comparison of rounds: timings aside, any other difference counts
    rows = {".": [dict(step=3, in_mode_1=0.5, eval_s=1.0)]}
    assert TD._seeded(rows) == TD._seeded({".": [dict(step=3, in_mode_1=0.5, eval_s=2.0)]})
    assert TD._seeded(rows) != TD._seeded({".": [dict(step=3, in_mode_1=0.6, eval_s=1.0)]})
    # a run that fails stops the benchmark, naming it and its output
    with pytest.raises(SystemExit, match=r"'bad' failed \(exit 2\); its output: .*bad\.log"):
        TD.main(["--results", str(r), "--work", str(w)], runs=({"bad": ("imm", ["--iters", "-1"], None)}, {}))
    capsys.readouterr()
    guarded(capsys, lambda: TD.main(["--repeat", "0", "--work", str(w)]), "--repeat and --jobs take a positive count")


class _FakeRun:
    """A stand-in for a method file's process in toy_defaults.run_all: it ends after `plan[(round, name)]` polls
    (round: 'r0', 'r1', ...), then writes its folder's ckpt.pt and one metrics row and its `total` line; a --teacher
    that does not exist yet makes it fail (exit 2), as the method files do."""
    plan, value, started = {}, {}, []

    def __init__(self, cmd, cwd=None, env=None, stdout=None, stderr=None):
        argv = cmd[1:]
        self.out, self.stdout, self.returncode, self.killed, self.waited = argv[argv.index("--out") + 1], stdout, \
            None, False, False
        self.key = (os.path.basename(os.path.dirname(self.out)), os.path.basename(self.out))
        self.polls = self.plan[self.key]
        teacher = argv[argv.index("--teacher") + 1] if "--teacher" in argv else None
        self.code = 2 if teacher and not os.path.exists(teacher) else 1 if self.key[1] == "bad" else 0
        _FakeRun.started.append(self)

    def poll(self):
        if self.returncode is None:
            self.polls -= 1
            if self.polls <= 0:
                os.makedirs(self.out, exist_ok=True)
                open(os.path.join(self.out, "ckpt.pt"), "w").close()
                with open(os.path.join(self.out, "metrics.jsonl"), "w") as f:
                    f.write("{" if self.key[1] == "broken" else json.dumps(dict(
                        step=1, in_mode_1=self.value.get(self.key, 0.5), eval_s=float(self.key[0][1:]) + 1)) + "\n")
                self.stdout.write("total 2.5 s wall (2.5 s CPU)\n")
                self.returncode = self.code
        return self.returncode

    def kill(self):
        self.killed = True
        self.returncode = -9

    def wait(self, timeout=None):
        self.waited = True
        return self.returncode


def test_toy_defaults_schedule_with_rounds_ending_out_of_order(tmp_path, monkeypatch):
    """run_all with --jobs 2 and a round 0 that ends after round 1 (fake processes, no training): each run starts
    after its own round's start run has finished (round 1's GDD does not take round 0's teacher, nor start before its
    own); the rows and command reported are the last round's, not the last to end; a difference between rounds other
    than a timing is reported; a failure, or an error while reading a run, kills and reaps the runs still going; a run
    that waits for one that never comes is an error, not an endless loop."""
    import toy_defaults as TD
    sleeps = []

    def sleep(s):
        sleeps.append(s)
        assert len(sleeps) < 500, "run_all never ends"
    monkeypatch.setattr(TD.subprocess, "Popen", _FakeRun)
    monkeypatch.setattr(TD.time, "sleep", sleep)
    runs = {"rf": ("rectified_flow", [], None), "gdd": ("distributional", ["--teacher", "{rf}/ckpt.pt"], "rf")}
    _FakeRun.plan = {("r0", "rf"): 6, ("r1", "rf"): 1, ("r0", "gdd"): 1, ("r1", "gdd"): 1}
    _FakeRun.value = {("r1", "gdd"): 0.6}
    w = str(tmp_path / "w")
    res = TD.run_all(runs, w, 2, 2, log=lambda s: None)
    assert res["rf"]["command"] == "python rectified_flow.py --out WORK/r1/rf"
    assert res["rf"]["rows"] == {".": [dict(step=1, in_mode_1=0.5, eval_s=2.0)]} and res["rf"]["same"]
    assert res["gdd"]["rows"]["."][0]["in_mode_1"] == 0.6 and not res["gdd"]["same"]
    assert res["rf"]["wall_s"] == [2.5, 2.5] and res["gdd"]["wall_s"] == [2.5, 2.5]
    # a failure (exit 1), or a malformed metrics row: the other run is killed and reaped
    for broken, match in (("bad", r"'bad' failed \(exit 1\)"), ("broken", None)):
        _FakeRun.plan, _FakeRun.started = {("r0", "slow"): 10 ** 6, ("r0", broken): 1}, []
        with pytest.raises((SystemExit, ValueError), match=match):
            TD.run_all({"slow": ("imm", [], None), broken: ("imm", [], None)}, w, 2, 1, log=lambda s: None)
        slow = next(p for p in _FakeRun.started if p.key[1] == "slow")
        assert slow.killed and slow.waited
    sleeps.clear()
    with pytest.raises(ValueError, match=r"\['x'\] wait for a run that never comes"):
        TD.run_all({"x": ("imm", [], "missing")}, w, 1, 1, log=lambda s: None)
