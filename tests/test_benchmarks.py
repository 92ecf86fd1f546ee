"""Smoke tests of benchmarks/throughput.py (CPU, a few seconds) and the FLOP count of the DDPM++ network.

Speed itself is never asserted here (DESIGN: speed targets live in benchmarks/, not in timed tests).
"""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402


def _load_throughput():
    spec = importlib.util.spec_from_file_location("throughput", os.path.join(ROOT, "benchmarks", "throughput.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


tp = _load_throughput()


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: these tests are small, and a 2-core machine shared with other jobs slows
    multi-threaded torch down several-fold. The previous setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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
    assert rec["params"] == 189_347  # spec §3.7
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
    """common.md §3.7: DDPM++ forward = 42.37 GFLOP per 32x32 image (multiply-add = 2 FLOPs)."""
    fwd = _forward_flops("ddpmpp")
    assert abs(fwd / 42.37e9 - 1) < 0.03, fwd / 1e9


def test_throughput_imm_step_counts_target_pass():
    """IMM registers two time inputs and 4/3 of a forward+backward per step (online pass + no-grad target)."""
    rec = tp.main(["--method", "imm", "--net", "tiny", "--batch", "8", "--sample_batch", "4", "--iters", "2",
                   "--warmup", "1", "--device", "cpu", "--precision", "fp32"])
    net = common.build_net(common.net_config("tiny", **tp.METHODS["imm"].net))
    fwd = tp.forward_flops(net, (3, 16, 16), torch.device("cpu"), num_times=2)
    assert fwd == rec["fwd_flops_per_img"] and fwd > _forward_flops("tiny")  # the second time branch costs FLOPs
    assert rec["params"] == 194_595  # tiny with a second time input, spec §3.7
    assert rec["fwd_flops_per_img"] == fwd and rec["train_flops_per_img"] == round(4 * fwd)
    assert rec["train_img_per_s"] > 0 and math.isfinite(rec["final_loss"]) and rec["final_loss"] >= 0


@pytest.mark.parametrize("method", ["sct", "scd"])
def test_throughput_scm_steps_run(method):
    """The sCT/sCD benchmark step (JVP pass + gradient pass) trains the tiny ADN U-Net on the CPU."""
    rec = tp.main(["--method", method, "--net", "tiny", "--batch", "4", "--sample_batch", "4", "--iters", "2",
                   "--warmup", "1", "--device", "cpu", "--precision", "fp32"])
    fwd = _forward_flops("tiny", **tp.METHODS[method].net)
    assert rec["train_flops_per_img"] == round(3 * tp.METHODS[method].fwd_per_step * fwd)
    assert math.isfinite(rec["final_loss"]) and rec["sample_img_per_s_2step"] > 0
