"""Invariants of rectified_flow.py (numbered in the test names) plus the sampler defaults.

Every test compares against a closed form, a number from the papers, or a second independent route, so a
wrong formula, a wrong constant, a detached gradient or a mis-sharded pairs folder makes it fail. CPU only.
"""
import copy
import json
import math
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import common as C
import rectified_flow as R
from cli import guarded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RF = os.path.join(ROOT, "rectified_flow.py")
F64 = torch.float64
ENV = C.Env(0, 1, 0, torch.device("cpu"), True, "fp32")


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------ 1. interpolant
def test_interpolant_endpoints_and_estimates():
    g = gen(0)
    x, z = torch.randn(6, 3, 4, 4, generator=g, dtype=F64), torch.randn(6, 3, 4, 4, generator=g, dtype=F64)
    zero, one = torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64)
    assert torch.equal(R.interpolate(x, z, zero), x)
    assert torch.equal(R.interpolate(x, z, one), z)
    t = torch.rand(6, generator=g, dtype=F64)
    x_t = R.interpolate(x, z, t)
    tb = t.reshape(-1, 1, 1, 1)
    assert torch.allclose(x_t, (1 - tb) * x + tb * z, rtol=0, atol=1e-15)  # per-sample t broadcast, Liu et al. §2
    v = z - x
    assert (R.x_hat(x_t, t, v) - x).abs().max() < 1e-12
    assert (R.z_hat(x_t, t, v) - z).abs().max() < 1e-12
    pts = torch.randn(5, 2, generator=g, dtype=F64), torch.randn(5, 2, generator=g, dtype=F64)  # 2-D points too
    t2 = torch.rand(5, generator=g, dtype=F64)
    xt2 = R.interpolate(*pts, t2)
    assert (R.x_hat(xt2, t2, pts[1] - pts[0]) - pts[0]).abs().max() < 1e-12
    assert (R.z_hat(xt2, t2, pts[1] - pts[0]) - pts[1]).abs().max() < 1e-12


# ----------------------------------------------------------------------------------- 2. U-shaped density
def _quantile(q, a=4.0):
    lo, hi = torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64)
    for _ in range(80):  # bisection on the CDF: independent of the sampler's closed-form inverse
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if R.ushape_cdf(mid, a) < q else (lo, mid)
    return ((lo + hi) / 2).item()


def test_ushape_density_and_cdf():
    t = torch.linspace(0, 1, 200_001, dtype=F64)
    p = R.ushape_pdf(t)
    assert abs(torch.trapezoid(p, t).item() - 1) < 1e-6
    assert torch.allclose(p, R.ushape_pdf(1 - t), rtol=1e-12, atol=0)  # symmetric
    p0, ph = R.ushape_pdf(torch.tensor(0.0, dtype=F64)).item(), R.ushape_pdf(torch.tensor(0.5, dtype=F64)).item()
    assert abs(p0 - 2.07463) < 1e-4 and abs(ph - 0.55144) < 1e-4 and abs(p0 / ph - 3.76220) < 1e-4
    assert p[0] > p[50_000] > p[100_000]  # U-shaped (the paper's printed density is monotone, rfpp Fig. 3 / its code)
    F = R.ushape_cdf(t)
    assert abs(F[0].item()) < 1e-15 and abs(F[-1].item() - 1) < 1e-15
    dF = (F[2:] - F[:-2]) / (t[2:] - t[:-2])  # F' = p
    assert (dF - p[1:-1]).abs().max() < 1e-6
    assert abs(_quantile(0.1) - 0.053294) < 1e-6 and abs(_quantile(0.25) - 0.160764) < 1e-6


def _ks_one(x, cdf):
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    F = cdf(x)
    i = np.arange(1, n + 1)
    return max((i / n - F).max(), (F - (i - 1) / n).max())


def _ks_two(a, b):
    a, b = np.sort(np.asarray(a, np.float64)), np.sort(np.asarray(b, np.float64))
    allv = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, allv, "right") / len(a) - np.searchsorted(b, allv, "right") / len(b)).max()


def test_ushape_sampler_statistics():
    n = 200_000
    t = R.sample_t_ushape(n, 4.0, 1e-5, generator=gen(1))
    assert t.shape == (n,) and t.dtype == torch.float32
    cdf = lambda s: R.ushape_cdf(torch.from_numpy(s)).numpy()
    assert _ks_one(t.numpy(), cdf) < 0.006
    td = t.double()
    assert abs(td.mean().item() - 0.5) < 0.003
    assert abs(td.var().item() - 0.11567) < 0.002  # uniform would give 0.0833
    tails = ((td <= 0.1) | (td >= 0.9)).double().mean().item()
    assert abs(tails - 0.3450) < 0.005
    assert (t >= 1e-5).all() and (t <= 1 - 1e-5).all()
    # rfpp's mirrored truncated exponential draws the same law
    m = R.sample_t_mirrored_exp(n, 4.0, generator=gen(2))
    assert _ks_one(m.numpy(), cdf) < 0.006
    assert _ks_two(t.numpy(), m.numpy()) < 0.01
    # sensitivity: uniform t is rejected by the same statistic
    assert _ks_one(torch.rand(n, generator=gen(3)).numpy(), cdf) > 0.05


def test_ushape_affine_t_eps_map():
    t = R.sample_t_ushape(100_000, 4.0, 0.1, generator=gen(4))  # exaggerated t_eps: mapped, not clamped
    assert t.min() >= 0.1 - 1e-7 and t.max() <= 0.9 + 1e-7
    assert (t == 0.1).float().mean() < 1e-3 and (t == 0.9).float().mean() < 1e-3  # no pile-up at the ends
    u = ((t.double() - 0.1) / 0.8).numpy()
    assert _ks_one(u, lambda s: R.ushape_cdf(torch.from_numpy(s)).numpy()) < 0.01


def test_ushape_a_is_bounded_where_sinh_is_finite(capsys):
    """--a 1500 overflowed math.sinh(a / 2) at the first step (an OverflowError traceback); the range ends at 1400,
    where the draw is still finite and inside [t_eps, 1 - t_eps] (a tighter bound would refuse checkpoints that
    trained)."""
    t = R.sample_t_ushape(10_000, 1400.0, 1e-5, generator=gen(5))
    assert torch.isfinite(t).all() and t.min() >= 1e-5 - 1e-7 and t.max() <= 1 - 1e-5 + 1e-7
    assert guarded(capsys, lambda: R.main(["--a", "1500"])) == "--a must be in (0, 1400], got 1500.0."


def test_straight_k_is_a_step_count_bounded_as_the_samplers(tmp_path, capsys):
    """--straight_k 1e9 trained the 1-RF, then ran its straightness Euler loop for ever: it is a sampler's step count,
    bounded as --eval_steps and --pair_steps are, and refused before any work."""
    with pytest.raises(C.UserError, match="straight_k"):  # (without the bound the run below never ends)
        C.check_config(R.Config(straight_k=1_000_000_000), device=False)
    msg = guarded(capsys, lambda: R.main(["--straight_k", "1000000000", "--out", str(tmp_path / "run")]))
    assert msg == "--straight_k must be in [1, 100000], got 1000000000.", msg


def test_a_missing_stage_input_says_what_to_run(tmp_path, capsys):
    """A later stage without its input said only "does not exist": it names the stage to run first, and the 2-RF's
    missing EDM pickle names its download, as --stage pairs did."""
    np.save(tmp_path / "imgs.npy", np.zeros((4, 8, 8, 3), np.uint8))
    base = ["--data", str(tmp_path / "imgs.npy"), "--out", str(tmp_path / "none")]
    cases = {("--preset", "tiny", "--stage", "pairs"): "ckpt.pt' does not exist; train the 1-RF first (--stage 1rf)",
             ("--preset", "tiny", "--stage", "2rf"): "ckpt.pt' does not exist; train the 1-RF first (--stage 1rf)",
             ("--preset", "tiny", "--stage", "ft"): "2rf/ckpt.pt' does not exist; train the 2-RF first (--stage 2rf)",
             ("--preset", "cifar10", "--stage", "2rf", "--loss", "huber", "--fid_every", "0"):
                 "not found; download https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl"}
    for argv, words in cases.items():
        guarded(capsys, lambda: R.main([*argv, *base]), words)


# ------------------------------------------------------------------------------------------ 3. pseudo-Huber
def test_train_losses_are_the_stages_own(monkeypatch, tmp_path):
    """train()'s loss of each stage (its own lines, not only per_sample_loss): 1-RF's logged loss is
    mean |v(x_t, t) - (z - x)|^2 at x_t = (1 - t) x + t z with z ~ N(0, I), t in [0, 1); 2-RF++ draws t from
    sample_t (the U-shape) and the pseudo-Huber c = 0.00054 d (rfpp train.py); sample_t maps into [t_eps, 1 - t_eps]."""
    ev, lrs, build, interp, draw, psl = [], [], R.build, R.interpolate, R.sample_t, R.per_sample_loss
    step = C.Guard.step
    monkeypatch.setattr(C.Guard, "step", lambda g, opt, *a, **k: (lrs.append(opt.param_groups[0]["lr"]),
                                                                  step(g, opt, *a, **k))[1])

    def built(nd):
        net = build(nd)
        net.register_forward_hook(lambda m, i, o: ev.append(("v", o.detach().clone(), i[0].detach().clone())))
        return net
    monkeypatch.setattr(R, "build", built)
    monkeypatch.delitem(R.PRESETS["toy"], "huber_c")  # (the toy's 0.04): rfpp's default c
    monkeypatch.setattr(R, "interpolate", lambda x, z, t: (ev.append(("x", x, z, t)), interp(x, z, t))[1])
    monkeypatch.setattr(R, "sample_t", lambda n, cfg, d: (ev.append(("t", cfg.stage, cfg.t_dist)), draw(n, cfg, d))[1])
    monkeypatch.setattr(R, "per_sample_loss", lambda v, x, z, x_t, t, loss, c, lp=None: (
        ev.append(("2rf", x_t, t, c, ev[-1])), psl(v, x, z, x_t, t, loss, c, lp))[1])
    out = tmp_path / "o"
    R.main(["--stage", "all", "--iters", "3", "--batch", "256", "--n_pairs", "256", "--pair_block", "256",
            "--pair_batch", "256", "--pair_steps", "2", "--straight_k", "2", "--eval_n", "16", "--eval_steps", "1",
            "--log_every", "1", "--warmup", "4", "--out", str(out)])
    # warm-up lr min(1, k / 4), 0 at the first step (rfpp, score_sde); 1-RF (toy: 1e-3, cosine over 3 steps), 2-RF
    # (3e-4, const)
    assert lrs == pytest.approx([0.0, 1e-3 * 0.25 * 0.75, 1e-3 * 0.5 * 0.25, 0.0, 3e-4 * 0.25, 3e-4 * 0.5], rel=1e-12)
    i = [k for k, e in enumerate(ev) if e[0] == "x"][2]  # the third step (v = 0 at the zero-initialised start and
    # after the first step, at lr 0)
    (_, x, z, t), (tag, v, x_t) = ev[i], ev[i + 1]
    assert tag == "v" and float(t.min()) >= 0 and float(t.max()) < 1 and abs(z.std().item() - 1) < 0.1
    assert torch.equal(x_t, (1 - t[:, None]) * x + t[:, None] * z) and v.abs().max() > 1e-4
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[2])["loss"]
    assert math.isclose(logged, (v.float() - (z - x)).square().mean().item(), rel_tol=1e-5)
    (x_t2, t2, c, before), *_ = [e[1:] for e in ev if e[0] == "2rf"]
    assert c == pytest.approx(0.00054 * 2) and before[0] == "v" and ("t", "2rf", "ushape") in ev
    assert torch.equal(before[2], x_t2)  # the network sees x_t
    assert float(t2.min()) >= 1e-5 and (t2 - 0.5).abs().mean() > 0.3  # U-shaped: E|t - 1/2| = 0.31 (uniform 0.25)
    cfg = R.Config(stage="2rf", t_dist="uniform", t_eps=0.1)
    t3 = R.sample_t(4000, cfg, "cpu")
    assert 0.1 <= float(t3.min()) < 0.11 and 0.89 < float(t3.max()) <= 0.9


def test_pseudo_huber_numbers_and_gradient():
    d, c = 3072, 1.65888
    assert abs(0.00054 * d - c) < 1e-12
    r0 = torch.zeros(3, d)
    assert torch.equal(R.pseudo_huber(r0, c), torch.zeros(3))
    g = gen(5)
    r = torch.randn(4, d, generator=g)
    r = r / r.square().mean(1, keepdim=True).sqrt()  # per-element RMS exactly 1
    rms3, rms1 = R.pseudo_huber(1e-3 * r, c), R.pseudo_huber(r, c)
    assert rms3.shape == (4,)
    assert ((rms3 - 3.0132e-7).abs() / 3.0132e-7).max() < 1e-3
    assert abs(3.0132e-7 - d * 1e-6 / (2 * c * d)) / 3.0141e-7 < 1e-3  # quadratic limit |r|^2/(2cd)
    assert ((rms1 - 1.75103e-2).abs() / 1.75103e-2).max() < 1e-3
    assert abs((math.sqrt(d) - c) / d - 1.75022e-2) < 1e-6  # linear limit (|r| - c)/d
    # the 1/d in front: H scales like 1/d at fixed |r| (2-D toys need huber_c)
    assert ((R.pseudo_huber(torch.randn(50, 2, generator=g) * 3, 0.04)) >= 0).all()
    for scale in (1e-4, 1e-2, 1.0, 1e2, 1e4):
        rr = (scale * torch.randn(3, d, generator=g)).requires_grad_(True)
        H = R.pseudo_huber(rr, c)
        assert (H >= 0).all()
        H.sum().backward()
        gn = rr.grad.norm(dim=1)
        assert (gn <= (1 + 1e-5) / d).all()
        expect = rr.detach().norm(dim=1) / (d * torch.sqrt(rr.detach().square().sum(1) + c * c))
        assert torch.allclose(gn, expect, rtol=1e-4, atol=0)
    assert gn.min() > 0.999 / d  # large residuals: gradient norm -> 1/d (linear regime)


# ------------------------------------------------------------------------------------------------ 4. losses
@pytest.fixture(scope="module")
def lp32():
    return R.LPIPS("random", res=32)


def _dyadic(shape, g, bits=5):  # values k / 2^bits: (1 - t) x + t z - t (z - x) is exact in fp32 for dyadic t
    return torch.randint(-2 ** bits, 2 ** bits + 1, shape, generator=g).float() / 2 ** bits


def test_losses_zero_at_exact_velocity(lp32):
    g = gen(6)
    x, z = _dyadic((4, 3, 16, 16), g), _dyadic((4, 3, 16, 16), g) * 2
    t = torch.tensor([1 / 16, 0.25, 0.5, 15 / 16])
    x_t = R.interpolate(x, z, t)
    v = z - x
    assert torch.equal(R.x_hat(x_t, t, v), x)
    for loss in ("lpips-huber-1/t", "lpips-huber", "huber", "l2"):
        ell = R.per_sample_loss(v, x, z, x_t, t, loss, 0.00054 * 768, lp32)
        assert ell.shape == (4,) and torch.equal(ell, torch.zeros(4)), loss
    a = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1
    assert torch.equal(lp32(a, a), torch.zeros(3))  # LP(x, x) = 0 for these weights ...
    other = copy.deepcopy(lp32)
    with torch.no_grad():
        for p in other.features.parameters():
            p.normal_(generator=g)
    assert torch.equal(other(a, a), torch.zeros(3))  # ... and for any other VGG weights


def test_lpips_module_layout_and_taps(lp32):
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in lp32.modules())
    assert sum(isinstance(m, torch.nn.AvgPool2d) for m in lp32.modules()) == 4
    assert len(lp32.features) == 30  # up to relu5_3 (torchvision index 29)
    assert all(not p.requires_grad for p in lp32.parameters())
    assert not lp32.training
    for i, ch in enumerate((64, 128, 256, 512, 512)):
        w = getattr(lp32, f"w{i}")
        assert w.shape == (1, ch, 1, 1) and (w >= 0).all()
    x = torch.rand(1, 3, 16, 16, generator=gen(7)) * 2 - 1
    lp = copy.copy(lp32)  # shallow: same weights, own `res`
    lp.res = 224
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in lp.taps(x)]
    assert shapes == [(1, 64, 224, 224), (1, 128, 112, 112), (1, 256, 56, 56), (1, 512, 28, 28), (1, 512, 14, 14)]
    with torch.no_grad():
        f = lp32.taps(x)
    for ff in f:  # channel-unit-normalised taps
        n = ff.square().sum(1)
        assert ((n - 1).abs() < 1e-4).float().mean() > 0.5 and (n <= 1 + 1e-4).all()


def test_lpips_nonnegative_symmetric_and_grey(lp32):
    g = gen(8)
    a, b = torch.rand(5, 3, 16, 16, generator=g) * 2 - 1, torch.rand(5, 3, 16, 16, generator=g) * 2 - 1
    ab, ba = lp32(a, b), lp32(b, a)
    assert ab.shape == (5,) and (ab > 0).all()
    assert torch.allclose(ab, ba, rtol=1e-5, atol=0)
    g1, g2 = a[:, :1], b[:, :1]  # one-channel images are repeated to three channels
    assert torch.allclose(lp32(g1, g2), lp32(g1.repeat(1, 3, 1, 1), g2.repeat(1, 3, 1, 1)), rtol=1e-6, atol=0)


def test_lpips_float64_quadratic_small_t(lp32):
    lp = copy.deepcopy(lp32).double()
    g = gen(9)
    x = torch.rand(3, 3, 16, 16, generator=g, dtype=F64) * 1.6 - 0.8
    r = torch.randn(3, 3, 16, 16, generator=g, dtype=F64)
    with torch.no_grad():
        assert all(f.dtype == F64 for f in lp.taps(x))
        q = {t: lp(x - t * r, x) / t ** 2 for t in (1e-1, 1e-2, 1e-3, 1e-9)}
    assert all(v.dtype == F64 for v in q.values())
    ref = q[1e-3]
    for t in (1e-1, 1e-2, 1e-9):  # LP = O(t^2 |r|^2): LP/t^2 stays within a factor 2
        ratio = q[t] / ref
        assert ((ratio > 0.5) & (ratio < 2)).all(), (t, ratio)
    # t = 1e-9 is below fp32 resolution of x: it only holds if the module really computes in float64


def test_lpips_gradient_reaches_network_output(lp32):
    g = gen(10)
    x, z = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = R.interpolate(x, z, t)
    c = 0.00054 * 768

    def grad(loss, lpips=lp32):
        v = (z - x + 0.1 * torch.randn(3, 3, 16, 16, generator=gen(11))).requires_grad_(True)
        R.per_sample_loss(v, x, z, x_t, t, loss, c, lpips).sum().backward()
        return v.grad

    g_full, g_h = grad("lpips-huber-1/t"), grad("lpips-huber-1/t", lambda a, b: torch.zeros(len(a)))
    assert (g_full - g_h).abs().max() > 1e-3 * g_full.abs().max()  # the LP/t term contributes a gradient
    # float64 directional derivative of LP(x^(v), x) against a central difference
    lp = copy.deepcopy(lp32).double()
    xd, zd, td = x.double(), z.double(), t.double()
    xtd = R.interpolate(xd, zd, td)
    v0 = (zd - xd + 0.1 * torch.randn(3, 3, 16, 16, generator=gen(12), dtype=F64)).requires_grad_(True)
    f = lambda v: lp(R.x_hat(xtd, td, v), xd).sum()
    f(v0).backward()
    u = torch.randn(v0.shape, generator=gen(13), dtype=F64)
    h = 1e-5
    with torch.no_grad():
        fd = (f(v0 + h * u) - f(v0 - h * u)) / (2 * h)
    assert abs((v0.grad * u).sum().item() - fd.item()) < 1e-4 * abs(fd.item())


def test_loss_formulas_and_per_sample_weights(lp32):
    g = gen(14)
    x, z = torch.rand(3, 3, 16, 16, generator=g) * 2 - 1, torch.randn(3, 3, 16, 16, generator=g)
    t = torch.tensor([0.02, 0.5, 1 - 1e-5])
    x_t = R.interpolate(x, z, t)
    v = z - x + 0.3 * torch.randn(3, 3, 16, 16, generator=g)
    r, c = v - (z - x), 0.4
    H = R.pseudo_huber(r, c)
    sq = lambda a, b: (a - b).flatten(1).square().sum(1)  # a transparent stand-in for LPIPS
    one_m_t = 1 - t  # in fp32, as the loss computes it
    f = R.per_sample_loss(v, x, z, x_t, t, "lpips-huber-1/t", c, sq)
    assert torch.allclose(f, one_m_t * H + t * r.flatten(1).square().sum(1), rtol=1e-5)  # |x^ - x|^2 / t = t|r|^2
    e = R.per_sample_loss(v, x, z, x_t, t, "lpips-huber", c, sq)
    assert torch.allclose(e, one_m_t * H + t ** 2 * r.flatten(1).square().sum(1), rtol=1e-5)
    assert torch.equal(R.per_sample_loss(v, x, z, x_t, t, "huber", c), H)  # no (1 - t) factor
    assert torch.allclose(R.per_sample_loss(v, x, z, x_t, t, "l2", c), r.flatten(1).square().mean(1), rtol=1e-6)
    # at t = 1 - 1e-5 the Huber part carries weight 1e-5
    zero = lambda a, b: torch.zeros(len(a))
    w = R.per_sample_loss(v, x, z, x_t, t, "lpips-huber-1/t", c, zero) / H
    assert abs(w[2].item() - 1e-5) < 2e-3 * 1e-5 and torch.allclose(w, one_m_t, rtol=1e-6)
    full = R.per_sample_loss(v, x, z, x_t, t, "lpips-huber-1/t", c, lp32)
    with torch.no_grad():
        lp_t = lp32(R.x_hat(x_t, t, v), x) / t
    assert abs((full[2] - lp_t[2]).item() / H[2].item() - 1e-5) < 2e-3 * 1e-5


def test_batch_loss_is_mean_of_single_sample_losses(lp32):
    g = gen(15)
    n = 4
    x, z = torch.rand(n, 3, 16, 16, generator=g) * 2 - 1, torch.randn(n, 3, 16, 16, generator=g)
    t = torch.tensor([0.01, 0.3, 0.7, 0.999])
    x_t = R.interpolate(x, z, t)
    v = z - x + torch.randn(n, 3, 16, 16, generator=g) * torch.tensor([0.5, 0.1, 0.3, 0.05]).reshape(-1, 1, 1, 1)
    for loss in ("lpips-huber-1/t", "lpips-huber", "huber", "l2"):
        batch = R.per_sample_loss(v, x, z, x_t, t, loss, 0.4, lp32)
        single = torch.cat([R.per_sample_loss(v[i:i + 1], x[i:i + 1], z[i:i + 1], x_t[i:i + 1], t[i:i + 1], loss,
                                              0.4, lp32) for i in range(n)])
        assert batch.shape == (n,)
        assert torch.allclose(batch, single, rtol=1e-4, atol=0), loss
        assert abs(batch.mean().item() - single.mean().item()) < 1e-4 * single.mean().item()
    with torch.no_grad():  # the wrong reduction mean(LP) * mean(1/t) is far away: the check has teeth
        lp = lp32(R.x_hat(x_t, t, v), x)
    right = R.per_sample_loss(v, x, z, x_t, t, "lpips-huber-1/t", 0.4, lp32).mean()
    wrong = ((1 - t) * R.pseudo_huber(v - (z - x), 0.4)).mean() + lp.mean() * (1 / t).mean()
    assert abs(wrong - right) > 0.1 * right


def test_building_lpips_leaves_the_runs_random_numbers(monkeypatch):
    """LPIPS's VGG16 draws its initial weights on the CPU under a forked RNG; the stand-in's seed 0 is the CPU
    generator's alone (torch.manual_seed also reseeded every CUDA generator, which a forked CPU RNG does not restore:
    all ranks' CUDA noise at seed 0, and a resumed run off its stream)."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", seeded.append)
    torch.manual_seed(123)
    seeded.clear()
    state = torch.get_rng_state()
    R.LPIPS("random", 32)
    assert seeded == [] and torch.equal(torch.get_rng_state(), state)


def test_lpips_pretrained_reads_imagenet_vgg16_and_the_v01_heads(monkeypatch, tmp_path):
    """The pretrained LPIPS (never built by another test: its files are not here) asks torchvision for VGG16's
    IMAGENET1K_V1 weights and takes the LPIPS v0.1 linear heads from the `lpips` package's file when installed, else
    from torch hub (LIN_URL), in the file's own layout (lin{i}.model.1.weight, (1, C, 1, 1)): each head becomes its
    tap's channel weights. Both sources here are stand-ins that record how they were asked."""
    import torchvision
    asked, real_vgg16 = [], torchvision.models.vgg16
    monkeypatch.setattr(torchvision.models, "vgg16", lambda weights=None: asked.append(weights) or real_vgg16())
    g = gen(7)
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for i, c in enumerate(R.LPIPS.CH)}
    urls = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda url, **kw: urls.append(url) or heads)
    monkeypatch.setitem(sys.modules, "lpips", None)  # not installed: torch hub
    lp = R.LPIPS("pretrained", 32)
    assert asked == ["IMAGENET1K_V1"] and urls == [R.LPIPS.LIN_URL]
    assert all(torch.equal(getattr(lp, f"w{i}"), heads[f"lin{i}.model.1.weight"]) for i in range(5))
    pkg = tmp_path / "lpips"  # installed: the file it ships, torch hub not asked
    (pkg / "weights" / "v0.1").mkdir(parents=True)
    other = {k: 2 * v for k, v in heads.items()}
    torch.save(other, pkg / "weights" / "v0.1" / "vgg.pth")
    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(__file__=str(pkg / "__init__.py")))
    lp = R.LPIPS("pretrained", 32)
    assert urls == [R.LPIPS.LIN_URL] and all(torch.equal(getattr(lp, f"w{i}"), other[f"lin{i}.model.1.weight"])
                                             for i in range(5))


def test_lpips_offline_fallback(monkeypatch):
    def boom(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(R, "LPIPS", boom)
    msgs = []
    log = type("L", (), {"info": lambda self, m: msgs.append(m)})()
    cfg = R.Config(loss="lpips-huber-1/t")
    assert R.make_lpips(cfg, log) is None
    assert cfg.loss == "huber" and len(msgs) == 1 and "--loss huber" in msgs[0] and "unavailable" in msgs[0]
    assert R.make_lpips(R.Config(loss="huber"), log) is None and len(msgs) == 1
    # under torchrun a failure on another rank only (rank 0's download failed, this rank's own retry did not) is this
    # rank's too: every rank falls back to huber, or stops, not some with LPIPS and some without
    env = C.Env(rank=1, world=2, local_rank=1, device=torch.device("cpu"), is_main=False, precision="fp32")
    stub = type("LPIPS", (), dict(LIN_URL="vgg.pth", __init__=lambda self, *a: None))
    monkeypatch.setattr(R, "LPIPS", stub)  # this rank's load succeeds (after rank 0's turn, in common.rank0_first)
    monkeypatch.setattr(C, "wait_for_main", lambda env: None)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: t.fill_(1.0))  # another rank failed
    cfg = R.Config(loss="lpips-huber-1/t")
    assert R.make_lpips(cfg, log, env) is None and cfg.loss == "huber" and "another rank" in msgs[-1]
    with pytest.raises(C.UserError, match="another rank could not load them"):
        R.make_lpips(R.Config(loss="lpips-huber-1/t", fallback=False), log, env)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, group=None: t)  # none failed
    assert isinstance(R.make_lpips(R.Config(loss="lpips-huber-1/t"), log, env), stub)


# ------------------------------------------------------------------------------- 5. affine oracle (straight)
def _affine_oracle(d=4, n=64, seed=16):
    g = gen(seed)
    B = torch.randn(d, d, generator=g, dtype=F64)
    A = torch.eye(d, dtype=F64) + 0.5 * B @ B.T
    b = torch.randn(d, generator=g, dtype=F64)
    z = torch.randn(n, d, generator=g, dtype=F64)
    x = z @ A.T + b

    def v(y, t):
        tb = t.reshape(-1, 1, 1)
        M = (1 - tb) * A + tb * torch.eye(d, dtype=F64)
        zh = torch.linalg.solve(M, (y - (1 - t)[:, None] * b).unsqueeze(-1)).squeeze(-1)
        return zh - (zh @ A.T + b)
    return v, z, x


def test_affine_oracle_samplers_exact():
    v, z, x = _affine_oracle()
    for rule in ("default", "new"):
        for K in (1, 2, 4):
            for grid in ("uniform", "edm"):
                out = R.solve(v, z, R.time_grid(K, grid), "euler", rule)
                assert (out - x).abs().max() < 1e-12, (rule, K, grid)
        for K in (1, 2, 3, 5):
            out = R.solve(v, z, R.time_grid(K, "edm"), "heun", rule)
            assert (out - x).abs().max() < 1e-12, ("heun", rule, K)
    for K in (1, 2, 4):
        assert (R.solve(v, z, R.time_grid(K, "uniform"), "rk4") - x).abs().max() < 1e-12
    assert R.straightness(v, z, 100) < 1e-20
    assert R.straightness(v, z, 2) < 1e-20
    eps = z  # the inversion (rfpp v2) from the exact x_1e-3 = (1 - 1e-3) x + 1e-3 z returns z
    for K in (1, 2, 8):
        assert (R.invert(v, x, eps, K) - z).abs().max() < 1e-12


def test_inversion_grid_and_sampler_roundtrip():
    calls = []
    v = lambda y, t: (calls.append(t[0].item()), torch.zeros_like(y))[1]
    R.invert(v, torch.zeros(2, 3, dtype=F64), torch.zeros(2, 3, dtype=F64), 8)
    assert calls == pytest.approx([1e-3] + [i / 8 for i in range(1, 8)], abs=1e-12)  # ascending [1e-3, 1/8, ...]


# --------------------------------------------------------------------------------------- 6. update rules
@pytest.fixture(scope="module")
def mlp_field():
    torch.manual_seed(17)
    net = C.build_net(C.net_config("mlp", time_scale=1000.0)).double().eval()
    with torch.no_grad():
        for p in net.out_conv.parameters():  # a fresh net outputs exactly 0; make it a random field
            p.normal_(0, 0.3)
    return lambda x, t: net(x, t)


def test_new_update_rule(mlp_field):
    z = torch.randn(256, 2, generator=gen(18), dtype=F64)
    with torch.no_grad():
        for K in (1, 2):
            for solver in ("euler", "heun"):
                a = R.solve(mlp_field, z, R.time_grid(K, "uniform"), solver, "default")
                b = R.solve(mlp_field, z, R.time_grid(K, "uniform"), solver, "new")
                assert (a - b).abs().max() < 1e-12, (K, solver)
        with pytest.raises(C.UserError, match="--rule is read only at 3 steps or more, and --steps 1,2 holds none"):
            C.parse_cli(R.Config, R.PRESETS, R.METHOD, ["sample", "--ckpt", "c.pt", "--rule", "new"],
                        sampler=R.SAMPLER_FIELDS)  # (the default --steps 1,2: the same samples as without it)
        for solver in ("euler", "heun"):
            a = R.solve(mlp_field, z, R.time_grid(3, "uniform"), solver, "default")
            b = R.solve(mlp_field, z, R.time_grid(3, "uniform"), solver, "new")
            assert (a - b).abs().max() > 1e-4, solver
        # new rule by hand for K = 3: x^ = x - t v, x' = (1 - t') x^ + t' z
        x = z
        for t, t2 in zip([1, 2 / 3, 1 / 3], [2 / 3, 1 / 3, 0]):
            d = mlp_field(x, torch.full((256,), float(t), dtype=F64))
            x = (1 - t2) * (x - t * d) + t2 * z
        assert (x - R.solve(mlp_field, z, R.time_grid(3, "uniform"), "euler", "new")).abs().max() < 1e-12


# --------------------------------------------------------------------------- 7./8. Gaussian analytic field
MU, S = torch.tensor([0.3, -0.5, 1.0, 0.0], dtype=F64), 0.5


def _gauss_field(y, t):
    tb = t.reshape(-1, 1)
    V = (1 - tb) ** 2 * S ** 2 + tb ** 2
    c = y - (1 - tb) * MU
    return tb * c / V - (MU + (1 - tb) * S ** 2 * c / V)  # E[z | x_t] - E[x | x_t]


def test_gaussian_field_solver_orders():
    z = torch.randn(2000, 4, generator=gen(19), dtype=F64)
    exact = MU + S * z
    err = lambda K, solver: (R.solve(_gauss_field, z, R.time_grid(K, "uniform"), solver) - exact).abs().max().item()
    assert err(8, "rk4") < 1e-5
    e_ratio, h_ratio = err(16, "euler") / err(8, "euler"), err(16, "heun") / err(8, "heun")
    assert 0.4 <= e_ratio <= 0.6, e_ratio  # first order
    assert 0.15 <= h_ratio <= 0.35, h_ratio  # second order (last step Euler)
    one = R.solve(_gauss_field, z, R.time_grid(1, "uniform"), "euler")
    assert (one - MU).abs().max() < 1e-12  # 1-RF collapse: G(z) = z - v(z, 1) = E[x]


def test_edm_teacher_conversion():
    D = lambda y, sig: MU + S ** 2 * (y - MU) / (S ** 2 + sig.reshape(-1, 1) ** 2)
    y = torch.randn(50, 4, generator=gen(20), dtype=F64)
    for tv in (0.1, 0.37, 0.9):
        t = torch.full((50,), tv, dtype=F64)
        assert (R.edm_to_velocity(D, y, t) - _gauss_field(y, t)).abs().max() < 1e-12
    t = torch.linspace(0.05, 0.95, 50, dtype=F64)  # per-sample t
    assert (R.edm_to_velocity(D, y, t) - _gauss_field(y, t)).abs().max() < 1e-12


# ------------------------------------------------------------------------------------------ 9. straightness
def test_straightness_rotation_field():
    z = torch.randn(4000, 2, generator=gen(21), dtype=F64)
    for w in (1.0, 2.0):
        Om = torch.tensor([[0.0, -w], [w, 0.0]], dtype=F64)
        S_ = R.straightness(lambda x, t: x @ Om.T, z, 100)
        expect = (w ** 2 - 4 * math.sin(w / 2) ** 2) * z.square().sum(1).mean().item() / 2
        assert abs(S_ / expect - 1) < 0.02, (w, S_, expect)
    assert abs(0.080605 - (1 - 4 * math.sin(0.5) ** 2)) < 1e-6
    assert R.straightness(lambda x, t: torch.zeros_like(x), z, 100) == 0.0  # untrained net: perfectly straight


def test_straightness_definition(mlp_field):
    z = torch.randn(64, 2, generator=gen(23), dtype=F64)
    # straightness (Liu et al. §2) written out on a K-step uniform Euler path of a non-linear field
    for K in (2, 3, 5):
        xs = [z]
        for i in range(K):
            t = 1 - i / K
            xs.append(xs[-1] - mlp_field(xs[-1], torch.full((64,), t, dtype=F64)) / K)
        line = z - xs[-1]
        expect = sum((K * (a - b) - line).square().mean() for a, b in zip(xs, xs[1:])).item() / K
        with torch.no_grad():
            got = R.straightness(mlp_field, z, K)
        assert abs(got - expect) < 1e-12 * max(expect, 1e-300) and expect > 1e-6, (K, got, expect)


# ------------------------------------------------------------------------------------------ 10. grids, NFE
GRIDS = {("uniform", 1): [1, 0], ("uniform", 2): [1, 0.5, 0], ("uniform", 4): [1, .75, .5, .25, 0],
         ("uniform", 8): [1, .875, .75, .625, .5, .375, .25, .125, 0],
         ("edm", 18): [1, .98293, .97607, .96596, .95087, .92811, .89363, .84165, .76508, .65793, .52111, .36922,
                       .22866, .12243, .05656, .02242, .00747, .00200, 0],
         ("edm", 8): [1, .97222, .93197, .82260, .56267, .21103, .03399, .00200, 0],
         ("edm", 4): [1, .90674, .31972, .00200, 0]}


def test_time_grids():
    for (kind, K), ref in GRIDS.items():
        g = R.time_grid(K, kind)
        assert len(g) == K + 1 and np.abs(np.array(g) - ref).max() < 1e-5, (kind, K, g)
        assert g[0] == 1.0 and g[-1] == 0.0 and all(a > b for a, b in zip(g, g[1:]))
    assert R.time_grid(2, "uniform", 0.3) == [1.0, 0.3, 0.0]
    assert R.time_grid(1, "edm") == [1.0, 0.0]


def test_nfe_counts():
    for K in (1, 2, 3, 4, 8):
        for solver, expect in (("euler", K), ("heun", 2 * K - 1), ("rk4", 4 * K)):
            n = [0]

            def v(x, t):
                n[0] += 1
                assert t.shape == (x.shape[0],)
                return -x
            R.solve(v, torch.randn(3, 2), R.time_grid(K, "edm"), solver)
            assert n[0] == expect == R.nfe(K, solver), (K, solver, n[0])


def test_sampler_defaults():
    rf2, rf1, ft = R.Config(stage="2rf"), R.Config(stage="1rf"), R.Config(stage="ft")
    for K in (1, 2, 5):
        assert R.sampler_for(rf2, K) == R.sampler_for(ft, K) == ("euler", "uniform", "new")
    assert R.sampler_for(rf1, 1) == R.sampler_for(rf1, 2) == ("euler", "uniform", "default")
    assert R.sampler_for(rf1, 18) == ("heun", "edm", "default")
    assert R.sampler_for(R.Config(stage="1rf", solver="rk4"), 4) == ("rk4", "edm", "default")
    assert R.sampler_for(R.Config(stage="2rf", solver="rk4"), 4)[1] == "edm"
    assert R.sampler_for(R.Config(stage="2rf", grid="edm", rule="default"), 4) == ("euler", "edm", "default")


# ------------------------------------------------------------------------------------------- 11./12. pairs
PAIR_ARGS = ["--n_pairs", "40", "--pair_block", "16", "--pair_batch", "8"]  # 3 blocks, the last one partial


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny image teacher (4 steps with EMA 0.9, so raw weights != EMA) and its 1-rank pairs folder, with a
    record of the noise the teacher integrated for each pair index."""
    root = tmp_path_factory.mktemp("rf_tiny")
    imgs = np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8)
    npy = str(root / "imgs.npy")
    np.save(npy, imgs)
    base = ["--preset", "tiny", "--data", npy, "--root", str(root / "data")]
    R.main(["--stage", "1rf", "--out", str(root / "t"), *base])
    teacher = str(root / "t" / "ckpt.pt")
    used, orig = {}, R.pair_noise

    def spy(idx, seed, shape, env):
        z = orig(idx, seed, shape, env)
        for i, zi in zip(idx.tolist(), z):
            used.setdefault(i, zi.clone())
        return z
    R.pair_noise = spy
    omp = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # one thread, as each rank of the 2-rank run below: common.setup leaves
    try:  # conftest.py's one thread alone where OMP_NUM_THREADS is set (else half the cores: bitwise on 2 only)
        R.main(["--stage", "pairs", "--out", str(root / "p1"), "--teacher", teacher, *base, *PAIR_ARGS])
    finally:
        R.pair_noise = orig
        if omp is None:
            del os.environ["OMP_NUM_THREADS"]
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    return dict(root=root, base=base, teacher=teacher, pairs=str(root / "p1" / "pairs"), used=used)


def test_pair_noise_is_drawn_from_seed_plus_index():
    """z_i ~ N(0, I) from pair_seed + i on the CPU, as docs/rectified_flow.md says (a run that drew from seed + i + 1
    would still pass the pairs' own tests: the stored z is the one the teacher used)."""
    z = R.pair_noise(torch.tensor([0, 5]), 7, (2, 3), ENV)
    for row, i in zip(z, (0, 5)):
        assert torch.equal(row, torch.randn(2, 3, generator=torch.Generator().manual_seed(7 + i)))


def test_pairs_world_size_invariance_and_noise(tiny):
    root, base, teacher, used = tiny["root"], tiny["base"], tiny["teacher"], tiny["used"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", RF,
                        "--stage", "pairs", "--out", str(root / "p2"), "--teacher", teacher, *base, *PAIR_ARGS],
                       cwd=str(root), env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    f1, f2 = sorted(os.listdir(tiny["pairs"])), sorted(os.listdir(root / "p2" / "pairs"))
    assert f1 == f2 == ["meta.json", "x_00000.npy", "x_00001.npy", "x_00002.npy"]  # images: noise_mode seed
    for f in f1:
        assert (root / "p1" / "pairs" / f).read_bytes() == (root / "p2" / "pairs" / f).read_bytes(), f
    meta = json.loads((root / "p1" / "pairs" / "meta.json").read_text())
    assert meta["n"] == 40 and meta["block"] == 16 and meta["noise_mode"] == "seed" and meta["nfe"] == 3
    assert meta["convention"] == R.CONVENTION and meta["pair_seed"] == 10 ** 9
    # the z regenerated at load time equals the z the teacher integrated, bit for bit
    data, Z, _ = R.load_pairs(tiny["pairs"], ENV, 0)
    assert sorted(used) == list(range(40))
    z_gen = torch.stack([used[i] for i in range(40)])
    assert Z.dtype == torch.float16 and torch.equal(Z, z_gen.half())  # images keep z as fp16 (as rfpp stores pairs)
    assert torch.equal(R.pair_noise(torch.arange(40), 10 ** 9, (3, 16, 16), ENV), z_gen)  # any chunking
    assert data.x.shape == (40, 3, 16, 16) and data.x.dtype == torch.uint8
    # x_i is the teacher EMA's Heun solve of z_i (uint8-quantised)
    net, _ = R.load_teacher(teacher, ENV)
    with torch.no_grad():
        xs = R.solve(lambda y, t: net(y, t), z_gen[:8], R.time_grid(2, "edm"), "heun")
    assert torch.equal(C.to_uint8(xs), data.x[:8])


def _copy_pairs(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pairs_corruption_errors(tiny, tmp_path):
    src = tiny["pairs"]
    bad = _copy_pairs(src, str(tmp_path / "fp"))
    meta = json.loads(open(os.path.join(bad, "meta.json")).read())
    meta["fingerprint"][0] += 1e-3
    open(os.path.join(bad, "meta.json"), "w").write(json.dumps(meta))
    with pytest.raises(C.UserError, match="fingerprint"):
        R.load_pairs(bad, ENV, 0)
    seed = _copy_pairs(src, str(tmp_path / "seed"))  # noise that regenerates differently (other seed/device)
    meta = json.loads(open(os.path.join(seed, "meta.json")).read())
    meta["pair_seed"] += 1
    open(os.path.join(seed, "meta.json"), "w").write(json.dumps(meta))
    with pytest.raises(C.UserError, match="noise_mode stored"):
        R.load_pairs(seed, ENV, 0)
    gone = _copy_pairs(src, str(tmp_path / "gone"))
    os.remove(os.path.join(gone, "x_00001.npy"))
    with pytest.raises(C.UserError, match=r"\[1\]"):
        R.load_pairs(gone, ENV, 0)
    with pytest.raises(C.UserError, match="meta.json"):
        R.load_pairs(str(tmp_path / "nothing"), ENV, 0)


def test_pairs_folder_entries_that_hung_or_were_tracebacks(tiny, tmp_path):
    """Damaged pairs folders that hung (a FIFO meta.json or block, n 10**12 in blocks of 1) or ended in tracebacks (a
    meta.json nested 100,000 deep, a fingerprint of strings or of another length, a seed beyond 2^63, a float64 or
    uint64 block): each is one sentence."""
    def damaged(name, f):
        d = _copy_pairs(tiny["pairs"], str(tmp_path / name))
        meta = json.loads(open(os.path.join(d, "meta.json")).read())
        f(d, meta)
        return d

    def meta(**kw):
        return lambda d, m: open(os.path.join(d, "meta.json"), "w").write(json.dumps({**m, **kw}))

    def block(a):
        return lambda d, m: np.save(os.path.join(d, "x_00000.npy"), a(np.load(os.path.join(d, "x_00000.npy"))))

    def fifo(name):
        return lambda d, m: (os.remove(os.path.join(d, name)), os.mkfifo(os.path.join(d, name)))
    cases = dict(fifo_meta=(fifo("meta.json"), "is not the meta.json"), fifo_x=(fifo("x_00000.npy"), "unreadable"),
                 deep=(lambda d, m: open(os.path.join(d, "meta.json"), "w").write("[" * 100000 + "]" * 100000),
                       "is not the meta.json"),
                 n_huge=(meta(n=10 ** 12, block=1), "incomplete"), fp_str=(meta(fingerprint=["a", "b"]), "meta.json"),
                 fp_len=(meta(fingerprint=[1.0, 2.0, 3.0]), "meta.json"), seed=(meta(pair_seed=2 ** 70), "meta.json"),
                 f64=(block(lambda a: a.astype(np.float64)), "holds float64"),
                 u64=(block(lambda a: a.astype(np.uint64)), "holds uint64"))
    for name, (f, words) in cases.items():
        d = damaged(name, f)
        t = time.time()
        with pytest.raises(C.UserError, match=words):
            R.load_pairs(d, ENV, 0)
        assert time.time() - t < 20, name


def test_write_load_pairs_roundtrip(tmp_path):
    g = gen(22)
    x = torch.rand(50, 3, 8, 8, generator=g) * 2 - 1
    x[0, 0, 0, :4] = torch.tensor([-1.0, 1.0, 0.0, 1 / 255])
    z = torch.randn(50, 3, 8, 8, generator=g)
    calls = []

    def make(idx):
        calls.append(idx.tolist())
        return x[idx], z[idx]
    folder = str(tmp_path / "pairs")
    R.write_pairs(folder, 50, 16, make, True, "stored", ENV, dict(shape=[3, 8, 8], x_dtype="uint8"))
    assert calls == [list(range(0, 16)), list(range(16, 32)), list(range(32, 48)), [48, 49]]
    assert sorted(os.listdir(folder)) == ["meta.json"] + [f"{k}_{j:05d}.npy" for k in "xz" for j in range(4)]
    assert np.load(os.path.join(folder, "x_00000.npy")).shape == (16, 8, 8, 3)  # uint8 NHWC
    data, Z, meta = R.load_pairs(folder, ENV, 0)
    err = (data.x.float() / 127.5 - 1 - x).abs().max().item()
    assert err <= 1 / 255 + 1e-6
    assert Z.dtype == torch.float16 and torch.equal(Z, z.half())  # stored fp16 for images
    assert meta["n"] == 50 and meta["noise_mode"] == "stored"
    assert R.load_pairs(folder, ENV, 7)[0].seed == C.derive_seed(7, "pairs")  # the run's seed orders the stream
    R.write_pairs(folder, 50, 16, make, True, "stored", ENV, dict(shape=[3, 8, 8], x_dtype="uint8"))
    assert len(calls) == 4  # complete blocks are skipped on restart
    os.remove(os.path.join(folder, "z_00002.npy"))
    with pytest.raises(C.UserError, match=r"\[2\]"):
        R.load_pairs(folder, ENV, 0)
    # points: float32 x and z, stored exactly
    xp, zp = torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g)
    pf = str(tmp_path / "pts")
    R.write_pairs(pf, 30, 16, lambda i: (xp[i], zp[i]), False, "stored", ENV, dict(shape=[2], x_dtype="float32"))
    d2, Z2, _ = R.load_pairs(pf, ENV, 0)
    assert d2.kind == "points" and torch.equal(d2.x, xp) and torch.equal(Z2, zp)
    assert torch.equal(d2.batch(30, 0)[0], xp[d2.batch(30, 0)[1]])  # batches return pair indices as labels


def test_train_step_adam_clip_then_ema(monkeypatch, tmp_path):
    """One optimiser step of train() as the official loops take it: Adam betas (0.9, 0.999), eps 1e-8, no weight decay
    (Liu et al. ImageGeneration/losses.py get_optimizer with default_cifar10_configs.py; rfpp train.py main); the
    gradient clipped to total L2 norm `clip` over all the network's tensors before the step (losses.py
    optimization_manager); then the EMA, at a constant decay, from the weights after that step, every step from the
    first (rfpp EMA.py step, after optimizer.step; score_sde's ema.update after optimize_fn)."""
    seen, clip, step, update = [], torch.nn.utils.clip_grad_norm_, C.Guard.step, C.EMA.update

    def clipped(params, max_norm, *a, **k):
        params = list(params)
        pre = torch.cat([p.grad.flatten() for p in params]).norm()
        out = clip(params, max_norm, *a, **k)
        seen.append(("clip", len(params), max_norm, a, k, float(pre)))
        return out

    def stepped(g, opt, *a, **k):
        grp = opt.param_groups[0]
        seen.append(("adam", grp["betas"], grp["eps"], grp["weight_decay"], grp["amsgrad"],
                     float(torch.cat([p.grad.flatten() for p in grp["params"]]).norm())))
        out = step(g, opt, *a, **k)
        seen.append(("after", [p.detach().clone() for p in grp["params"]]))
        return out

    def ema_update(e, model, nimg, batch):
        before = [p.detach().clone() for p in e.model.parameters()]
        update(e, model, nimg, batch)
        seen.append(("ema", before, [p.detach().clone() for p in e.model.parameters()]))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clipped)
    monkeypatch.setattr(C.Guard, "step", stepped)
    monkeypatch.setattr(C.EMA, "update", ema_update)
    R.main(["--stage", "1rf", "--iters", "2", "--batch", "64", "--clip", "0.01", "--ema", "0.9", "--eval_n", "16",
            "--straight_k", "2", "--eval_steps", "1", "--out", str(tmp_path / "o")])
    assert [e[0] for e in seen] == ["clip", "adam", "after", "ema"] * 2
    n = sum(1 for _ in R.build(torch.load(tmp_path / "o" / "ckpt.pt", weights_only=True)["net"]).parameters())
    for k in range(2):
        c, o, (_, after), (_, before, ema) = seen[4 * k:4 * k + 4]
        (_, m, max_norm, a, kw, pre), (_, betas, eps, wd, ams, post) = c, o
        assert m == n and max_norm == 0.01 and a == () and kw.get("norm_type", 2.0) == 2.0  # all tensors, L2
        assert pre > 0.01 and post == pytest.approx(0.01, rel=1e-4)  # clipped before the step
        assert betas == (0.9, 0.999) and eps == 1e-8 and wd == 0 and not ams
        for b, w, e in zip(before, after, ema):  # EMA <- 0.9 EMA + 0.1 (weights after this step)
            assert torch.allclose(e, 0.9 * b + 0.1 * w, rtol=0, atol=1e-6)
        assert any(not torch.equal(b, w) for b, w in zip(before, after))


def test_cifar10_preset_is_the_official_recipe():
    """The `cifar10` stages resolve to the official runs' values. 2rf and pairs: rfpp README (train.py --batchsize 512
    --learning_rate 2e-4 --warmup_steps 5000 --iterations 800001 --ema_decay 0.9999 --a 4 --loss_type lpips-huber
    --lpips_divt; generate_edm.py --N 18 from EDM's VE pickle), train.py (Adam, no clipping, save_iter 50000),
    t_dist.py (t in [1e-5, 1 - 1e-5]), configs_unet/cifar10_ve_aug.json (dropout 0.13, no flips of the pairs).
    1rf: Liu et al. default_cifar10_configs.py (lr 2e-4, warm-up 5000, grad_clip 1, random_flip); its batch, length
    and EMA are the project's (preset comment)."""
    def stage(s):
        return C.resolve_config(R.Config, R.PRESETS, "cifar10", {}, stage=s)
    one, pairs, two = stage("1rf"), stage("pairs"), stage("2rf")
    assert (one.lr, one.warmup, one.lr_schedule, one.clip, one.xflip, one.t_eps) == (2e-4, 5000, "const", 1.0, True, 0)
    assert (two.batch, two.iters, two.lr, two.warmup, two.lr_schedule, two.clip, two.ema, two.xflip, two.accum) == \
        (512, 800_000, 2e-4, 5000, "const", None, 0.9999, False, 1)
    assert (two.t_dist, two.a, two.t_eps, two.loss, two.huber_c, two.lpips_res) == \
        ("ushape", 4.0, 1e-5, "lpips-huber-1/t", None, 224)
    assert two.teacher == pairs.teacher == R.EDM_CIFAR10 and two.ckpt_every == 50_000 and two.precision == "tf32"
    assert (pairs.n_pairs, pairs.pair_steps, pairs.pair_grid) == (1_000_000, 18, "edm")


def test_2rf_init_equals_teacher_ema(tiny, monkeypatch):
    root, base, teacher = tiny["root"], tiny["base"], tiny["teacher"]
    pairs = tiny["pairs"]
    out = str(root / "init")
    R.main(["--stage", "2rf", "--out", out, "--teacher", teacher, "--pairs", pairs, "--iters", "0", *base])
    tck = torch.load(teacher, weights_only=True)
    ck = torch.load(os.path.join(out, "2rf", "ckpt.pt"), weights_only=True)
    assert any(not torch.equal(tck["model"][k], tck["ema"][k]) for k in tck["ema"])  # raw != EMA in the teacher
    assert ck["step"] == 0 and ck["net"] == tck["net"] and ck["opt"]["state"] == {}
    for k, w in tck["ema"].items():
        assert torch.equal(ck["model"][k], w), k
        assert torch.equal(ck["ema"][k], w), k
    assert ck["method"] == R.METHOD and ck["convention"] == R.CONVENTION and ck["config"]["stage"] == "2rf"
    assert ck["config"]["t_eps"] == 1e-5 and ck["config"]["noise_std"] == 1.0
    # default pseudo-Huber c = 0.00054 d (d = 3 * 16 * 16): record what the training loss uses
    seen = []
    orig = R.pseudo_huber
    monkeypatch.setattr(R, "pseudo_huber", lambda r, c: (seen.append(c), orig(r, c))[1])
    R.main(["--stage", "2rf", "--out", str(root / "c"), "--teacher", teacher, "--pairs", pairs, "--iters", "1",
            *base])
    assert seen and all(abs(c - 0.00054 * 768) < 1e-12 for c in seen)
    assert "huber_c" not in R.PRESETS["cifar10"] and R.Config().huber_c is None
