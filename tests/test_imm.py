"""Tests of imm.py: its invariants (numbered in the test names), the toy
convergence with its two must-fail controls, IMM against the project's 1-RF on a user .npy point set at
an equal training budget, the `tiny` CLI smoke (train, sample, fid, resume, bad input) and two DDP ranks.

Budgets, measured on the 2-core CPU machine (one thread, other jobs running): the 5,000 x 512 recipe takes
~190 s, too long for CI next to the rest, so CI runs a cheap 100-step variant plus the 128-wide, k = 12 recipe
for 1,500 steps with the full criteria (the `toy` preset itself is now 2,800 steps of a 64-wide MLP, k = 10);
the IMM-vs-1-RF comparison (1,000 x 256 examples each) is marked `slow` and still runs by default. The whole file
takes ~3.5 minutes. Everything trains in-process with one
intra-op thread: on a shared 2-core machine two OpenMP threads per process slow the small MLP steps down by an
order of magnitude, and the maths does not depend on it.
"""
import functools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common as C
import imm
from cli import assert_ok, guarded, refusal, refused, run, sentence, sha
from standin import standin_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMM = os.path.join(ROOT, "imm.py")
CPU = torch.device("cpu")
F64 = torch.float64
T_MIN, T_MAX, SD = 0.006, 0.994, 0.5


@pytest.fixture
def keep_backend_flags():
    """C.setup toggles the TF32 flags; put them back so other tests see the state they expect."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def env1(precision="fp32"):
    return C.Env(rank=0, world=1, local_rank=0, device=CPU, is_main=True, precision=precision, seed=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def perturb(net, scale=0.1, seed=0):
    """Random offsets on every weight, so the (exactly zero at init) output G is non-trivial."""
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return net


def mlp(seed=0, dtype=torch.float32, dropout=0.0, scale=0.1):
    torch.manual_seed(seed)
    net = C.build_net(C.net_config("mlp", num_times=2, time_scale=1000.0, dropout=dropout)).to(dtype)
    return perturb(net, scale, seed) if scale else net


def unet(seed=0, dtype=torch.float32, dropout=0.0, scale=0.05, res=8):
    torch.manual_seed(seed)
    net = C.build_net(C.net_config("tiny", img_resolution=res, num_times=2, time_scale=1000.0, dropout=dropout))
    return perturb(net.to(dtype), scale, seed) if scale else net.to(dtype)


def group_times(n_groups, M, seed=0, dtype=F64, k=12):
    """Per-group (s, r, t) drawn as IMM App. C.7 does (t, s uniform; r = r(s, t), App. C.6) in float64, repeated M
    times (the test's own draw)."""
    u = torch.rand(2, n_groups, generator=gen(seed), dtype=F64)
    t = T_MIN + (T_MAX - T_MIN) * u[0]
    s = T_MIN + (t - T_MIN) * u[1]
    r = imm.r_of(s, t, imm.delta_eta(imm.Config(k=k)))
    return tuple(v.repeat_interleave(M).to(dtype) for v in (s, r, t))


class Recorder(nn.Module):
    """Calls the wrapped network and keeps every (input, t, second time, output, autocast state)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, s):
        out = self.net(x, t, s)
        self.calls.append(dict(x=x, t=t, s=s, out=out, autocast=torch.is_autocast_enabled("cpu")))
        return out


# ---- closed forms written out from IMM's paper (OT-FM line, sigma_d = 0.5), independent of imm.py
def nt_(t):
    return torch.sqrt((1 - t) ** 2 + t ** 2)


def c_skip_(s, t, param="simple_edm"):
    return torch.ones_like(t) if param == "euler_fm" else ((1 - s) * (1 - t) + s * t) / nt_(t) ** 2


def c_out_(s, t, param="simple_edm", sd=SD):
    return -sd * (t - s) if param == "euler_fm" else -sd * (t - s) / nt_(t)


def c_in_(t, sd=SD):
    return 1 / (sd * nt_(t))


def weight_(t, a=1.0, b=5.0):
    lam = 2 * torch.log((1 - t) / t)
    return torch.sigmoid(b - lam) * (1 - t) ** a / (t * (1 - t) * ((1 - t) ** 2 + t ** 2))


def ref_loss(net, x, eps, s, r, t, M, param="simple_edm", second="s", a=1.0, b=5.0, target_grad=False):
    """The IMM loss (Eq. 12 weighted by Eq. 13, estimated as App. C Eq. 67; Alg. 1) written out group by group with
    explicit loops (V-statistic, Laplace kernel over D)."""
    B, D = x.shape[0], x[0].numel()
    total, mmds = 0.0, []
    for i in range(B // M):
        rows = slice(i * M, (i + 1) * M)
        si, ri, ti = s[i * M], r[i * M], t[i * M]
        xi, ei = x[rows], eps[rows]

        def f(src, xs):  # f_{s,src}(x_src) of IMM App. C.5
            sec = si if second == "s" else src - si
            G = net(c_in_(src) * xs, src.expand(M), sec.expand(M))
            return c_skip_(si, src, param) * xs + c_out_(si, src, param) * G

        y_t = f(ti, (1 - ti) * xi + ti * ei)
        with torch.set_grad_enabled(target_grad and torch.is_grad_enabled()):
            y_r = f(ri, (1 - ri) * xi + ri * ei)
        w_tilde = 1 / c_out_(si, ti, param).abs()
        k = lambda u, v: torch.exp(-w_tilde * torch.clamp((u - v).square().sum(), min=1e-16).sqrt() / D)
        yt, yr = y_t.reshape(M, -1), y_r.reshape(M, -1)
        mmd = sum(k(yt[j], yt[l]) + k(yr[j], yr[l]) - 2 * k(yt[j], yr[l]) for j in range(M) for l in range(M)) / M ** 2
        mmds.append(mmd)
        total = total + weight_(ti, a, b) * mmd
    return total / (B // M), torch.stack(mmds)


# ============================================================================ 1. boundary f_{s,s} = id
@pytest.mark.parametrize("param", ["simple_edm", "euler_fm"])
@pytest.mark.parametrize("dtype, tol", [(F64, 1e-12), (torch.float32, 1e-6)])
def test_01_boundary_f_ss_is_identity(param, dtype, tol):
    s = torch.linspace(T_MIN, T_MAX, 64, dtype=dtype)
    c_skip, c_out, _ = imm.coeffs(s, s, param)
    assert c_skip.dtype == dtype and c_out.dtype == dtype
    assert (c_skip - 1).abs().max() <= tol and c_out.abs().max() <= tol
    net = mlp(dtype=dtype, scale=0.3)
    x = torch.randn(64, 2, generator=gen(1), dtype=dtype)
    assert net(x, s, s).abs().min() > 1e-3  # G is far from 0, so only the coefficients can make f the identity
    y = imm.f_map(net, x, s, s, imm.Config(param=param), env1())
    assert (y - x).abs().max() <= tol


# ============================================================================ 2. coefficients
@pytest.mark.parametrize("param", ["simple_edm", "euler_fm"])
def test_02_coefficients_equal_closed_forms(param):
    t = torch.linspace(T_MIN, T_MAX, 41, dtype=F64)[:, None].expand(41, 41)
    s = T_MIN + (t - T_MIN) * torch.linspace(0, 1, 41, dtype=F64)[None]
    s, t = s.reshape(-1), t.reshape(-1)
    c_skip, c_out, c_in = imm.coeffs(s, t, param)
    torch.testing.assert_close(c_skip, c_skip_(s, t, param), rtol=0, atol=1e-12)
    torch.testing.assert_close(c_out, c_out_(s, t, param), rtol=0, atol=1e-12)
    torch.testing.assert_close(c_in, c_in_(t), rtol=0, atol=1e-12)
    # sigma_d is a real parameter: c_out scales with it, c_in with its inverse
    c2 = imm.coeffs(s, t, param, sigma_d=1.0)
    torch.testing.assert_close(c2[1], c_out / SD, rtol=1e-12, atol=0)
    torch.testing.assert_close(c2[2], c_in * SD, rtol=1e-12, atol=0)


def test_02_coefficient_reference_values():
    s, t = torch.tensor([0.3], dtype=F64), torch.tensor([0.8], dtype=F64)
    c_skip, c_out, c_in = imm.coeffs(s, t)
    assert abs(c_skip.item() - 0.558824) < 1e-6
    assert abs(c_out.item() - (-0.303170)) < 1e-6
    assert abs(1 / c_out.abs().item() - 3.298485) < 1e-6  # w~ = 1 / |c_out|
    assert abs(c_in.item() - 1 / (0.5 * math.sqrt(0.68))) < 1e-12  # appendix c_in, not the main-text typo
    c_skip, c_out, _ = imm.coeffs(s, t, "euler_fm")
    assert c_skip.item() == 1.0 and abs(c_out.item() + 0.25) < 1e-15


# ============================================================================ 3. DDIM
@pytest.mark.parametrize("shape", [(50, 2), (50, 3, 4, 4)])
def test_03_ddim_forms_composition_and_line(shape):
    g = gen(3)
    x, eps = torch.randn(shape, generator=g, dtype=F64), SD * torch.randn(shape, generator=g, dtype=F64)
    u = torch.rand(3, shape[0], generator=g, dtype=F64).sort(0).values
    s, r, t = (T_MIN + (T_MAX - T_MIN) * v for v in u)  # s <= r <= t per row, all different
    col = lambda v: v.reshape(-1, *[1] * (len(shape) - 1))
    x_t = imm.interpolate(x, eps, t)
    torch.testing.assert_close(x_t, (1 - col(t)) * x + col(t) * eps, rtol=0, atol=1e-15)  # IMM App. C.1
    d_ts = imm.ddim(x_t, x, t_src=t, t_dst=s)
    torch.testing.assert_close(d_ts, (1 - col(s) / col(t)) * x + col(s) / col(t) * x_t,
                               rtol=0, atol=1e-12)  # Eq. 11, OT
    a_s, s_s, a_t, s_t = 1 - col(s), col(s), 1 - col(t), col(t)
    torch.testing.assert_close(d_ts, (a_s - s_s * a_t / s_t) * x + (s_s / s_t) * x_t, rtol=0, atol=1e-12)  # general
    via_r = imm.ddim(imm.ddim(x_t, x, t_src=t, t_dst=r), x, t_src=r, t_dst=s)
    torch.testing.assert_close(via_r, d_ts, rtol=0, atol=1e-12)  # t -> r -> s = t -> s
    torch.testing.assert_close(imm.ddim(x_t, x, t_src=t, t_dst=r), (1 - col(r)) * x + col(r) * eps, rtol=0,
                               atol=1e-12)  # DDIM(x_t, x; t -> r) = alpha_r x + sigma_r eps
    # the order of the keywords is the meaning: swapping them is a different (wrong) map
    assert (imm.ddim(x_t, x, t_src=s, t_dst=t) - d_ts).abs().max() > 0.1


# ============================================================================ 4. closed-form oracle
class Oracle(nn.Module):
    """G* from the pair (x, eps) it closes over, at the source time it is given; checks its own input."""

    def __init__(self, x, eps, param):
        super().__init__()
        self.x, self.eps, self.param, self.n = x, eps, param, 0

    def forward(self, xin, t, second):
        self.n += 1
        tc = t.to(self.x.dtype).reshape(-1, *[1] * (self.x.ndim - 1))
        x_t = (1 - tc) * self.x + tc * self.eps
        torch.testing.assert_close(xin, c_in_(tc) * x_t, rtol=1e-5, atol=1e-6)  # receives c_in(t) x_t
        if self.param == "euler_fm":
            return (self.eps - self.x) / SD
        return ((1 - tc) * self.eps - tc * self.x) / nt_(tc) / SD


@pytest.mark.parametrize("param", ["simple_edm", "euler_fm"])
def test_04_oracle_lands_on_the_line_and_zeroes_the_loss(param):
    B = 400
    g = gen(4)
    x, eps = C.toy_sample("8gaussians", B, g), SD * torch.randn(B, 2, generator=g)
    u = torch.rand(2, B, generator=g, dtype=F64)
    t = T_MIN + (T_MAX - T_MIN) * u[0]
    s = torch.minimum(T_MIN + (t - T_MIN) * u[1], t - 1e-6)
    s, t = s.float(), t.float()
    cfg, env = imm.Config(param=param), env1()
    G = Oracle(x, eps, param)
    y = imm.f_map(G, imm.interpolate(x, eps, t), s, t, cfg, env)
    target = (1 - s[:, None]) * x + s[:, None] * eps
    assert (y - target).abs().max() < 1e-5
    # with G* in both passes, y_t = y_r and the loss vanishes (float64: the kernel width 1/|c_out| reaches 1e6
    # where s is near t, so fp32 rounding of y alone would give |L| ~ 1e-6)
    x, eps = x.double(), eps.double()
    G = Oracle(x, eps, param)
    s, r, t = group_times(B // 4, 4, seed=4)
    L, mmd, frac = imm.imm_loss(G, G, x, eps, s, r, t, cfg, env)
    assert G.n == 2 and abs(L.item()) < 1e-6 and abs(mmd.item()) < 1e-6 and 0 < frac.item() < 0.5
    # a wrong network is not mistaken for the oracle
    L_bad = imm.imm_loss(mlp(scale=0.3, dtype=F64), mlp(scale=0.3, dtype=F64), x, eps, s, r, t, cfg, env)[0]
    assert L_bad.item() > 1e-3


# ============================================================================ 5. c_in
@pytest.mark.parametrize("data", ["gauss", "8gaussians"])
def test_05_c_in_gives_unit_variance(data):
    g, n = gen(5), 100_000
    x = (SD * torch.randn(n, 2, generator=g) if data == "gauss" else C.toy_sample("8gaussians", n, g)).double()
    eps = SD * torch.randn(n, 2, generator=g, dtype=F64)
    for tv in (0.01, 0.5, 0.99):
        t = torch.full((n,), tv, dtype=F64)
        c_in = imm.coeffs(t, t)[2]
        v = (c_in[:, None] * imm.interpolate(x, eps, t)).var(0)
        assert ((v - 1).abs() < 0.02).all(), (tv, v)


# ============================================================================ 6. eta
def test_06_eta_round_trip_and_decrement():
    t = torch.linspace(T_MIN, T_MAX, 100_001, dtype=F64)
    assert (imm.eta_inv(imm.eta(t)) - t).abs().max() < 1e-12
    torch.testing.assert_close(imm.eta(t), t / (1 - t), rtol=1e-15, atol=0)
    assert abs(imm.eta(T_MAX) - 165.667) < 1e-3 and abs(imm.eta(T_MIN) - 0.00604) < 1e-5
    assert abs(imm.delta_eta(imm.Config(k=15)) / 5.0556e-3 - 1) < 1e-4
    assert abs(imm.delta_eta(imm.Config(k=12)) / 4.0444e-2 - 1) < 1e-4
    # the range follows overrides of T and t_min
    assert abs(imm.delta_eta(imm.Config(k=10, T=0.99, t_min=0.01)) - (99 - 1 / 99) / 1024) < 1e-12


# ============================================================================ 7. r(s, t)
def st_grid(n=1000, seed=7):
    u = torch.rand(2, n, generator=gen(seed), dtype=F64)
    t = T_MIN + (T_MAX - T_MIN) * u[0]
    return T_MIN + (t - T_MIN) * u[1], t


@pytest.mark.parametrize("k", [4, 6, 8, 12, 15])
def test_07_r_between_s_and_t_and_one_decrement_below_t(k):
    s, t = st_grid()
    d = imm.delta_eta(imm.Config(k=k))
    r = imm.r_of(s, t, d)
    assert r.dtype == F64 and (s <= r).all() and (r <= t).all()  # coarse k: r(s, t)'s clamp at 0
    at_s = imm.eta(t) - d <= imm.eta(s)
    assert torch.equal(r == s, at_s)
    err = (imm.eta(t) - imm.eta(r) - d).abs()[~at_s]
    assert (err < 1e-9 * (1 + imm.eta(t[~at_s]))).all()
    if k <= 7:  # without the inner clamp eta^-1 of eta_t - d_eta < -1 would give r > 1 here
        e = imm.eta(t) - d
        assert (e < -1).any()
    # non-decreasing in t for fixed s
    tt = torch.linspace(T_MIN, T_MAX, 2001, dtype=F64)
    for sv in (T_MIN, 0.2, 0.5, 0.9):
        ss = torch.full_like(tt, sv)
        rr = imm.r_of(torch.minimum(ss, tt), tt, d)
        assert (rr.diff() >= 0).all()
    # with the minimum gap (7'): either r = s or t - r >= gap
    rg = imm.r_of(s, t, d, 1e-4)
    assert (s <= rg).all() and (rg <= t).all()
    assert ((rg == s) | (t - rg >= 1e-4 * (1 - 1e-9))).all()


def test_07_reference_gaps_and_min_gap_has_teeth():
    for k, tv, gap in ((15, 0.5, 1.2671e-3), (15, 0.9, 5.058e-5), (15, 0.994, 1.820e-7), (12, 0.5, 1.0320e-2)):
        t = torch.tensor([tv], dtype=F64)
        r = imm.r_of(torch.tensor([T_MIN], dtype=F64), t, imm.delta_eta(imm.Config(k=k)))
        assert abs((t - r).item() / gap - 1) < 1e-3, (k, tv)
    s, t = st_grid()
    d = imm.delta_eta(imm.Config(k=15))
    r0, r1 = imm.r_of(s, t, d), imm.r_of(s, t, d, 1e-4)
    small = (r0 > s) & (t - r0 < 1e-4)
    assert small.any() and (t - r1)[small].min() >= 1e-4 * (1 - 1e-9)


def test_07_sample_times_distribution():
    """t ~ U(t_min, T), s | t ~ U(t_min, t) (not log-normal), r = s for ~11.5 % (k=12) / ~2.4 % (k=15) of groups."""
    torch.manual_seed(0)
    for k, frac in ((12, 0.1155), (15, 0.024)):
        s, r, t = imm.sample_times(200_000, 1, imm.Config(k=k), 0.0, CPU)
        assert s.dtype == r.dtype == t.dtype == torch.float32
        assert t.min() >= T_MIN and t.max() <= T_MAX and (s >= T_MIN - 1e-6).all()  # s <= t - 1e-6 may pass t_min
        assert (s < t).all() and (r < t).all() and (s <= r).all()  # s <= t - 1e-6 survives the fp32 cast
        assert abs(t.double().mean().item() - 0.5) < 0.005
        assert abs(((s - T_MIN) / (t - T_MIN)).double().mean().item() - 0.5) < 0.005
        assert abs((r == s).double().mean().item() - frac) < 0.004, k
    # r is computed in float64 and then cast: it equals the float64 formula applied to the float32 (s, t)
    # up to the float32 rounding of s and t themselves
    torch.manual_seed(1)
    s, r, t = imm.sample_times(10_000, 1, imm.Config(k=15), 0.0, CPU)
    r64 = imm.r_of(s.double(), t.double(), imm.delta_eta(imm.Config(k=15)))
    assert (r.double() - r64).abs().max() < 2e-7


def test_07_fp32_cast_keeps_r_below_t_up_to_k16():
    """The fp32 cast of sample_times never merges r into t for k <= 16 (CIFAR-10's k = 15 included); from k ~ 17 on
    some groups near T get r = t (a zero loss, no gradient), as the comment beside RANGES says."""
    torch.manual_seed(0)
    for k, lo, hi in ((15, 0, 0), (16, 0, 0), (18, 5e-4, 3e-3), (24, 0.03, 0.07)):
        s, r, t = imm.sample_times(200_000, 1, imm.Config(k=k), 0.0, CPU)
        frac = (r == t).double().mean().item()
        assert lo <= frac <= hi, (k, frac)


# ============================================================================ 8. grouping
def test_08_times_shared_within_groups_of_M():
    torch.manual_seed(8)
    for M in (1, 4, 8):
        s, r, t = imm.sample_times(64, M, imm.Config(), 0.0, CPU)
        for v in (s, r, t):
            g = v.reshape(64, M)
            assert v.shape == (64 * M,) and (g == g[:, :1]).all()
        assert len(torch.unique(t)) == 64 and len(torch.unique(s)) == 64


def test_08_batch_not_multiple_of_M_is_one_sentence():
    with pytest.raises(ValueError) as e:
        imm.Config(batch=30, M=4).check()
    assert sentence(e, "multiple").endswith(".")
    with pytest.raises(C.UserError, match="multiple"):
        imm.main(["--batch", "30", "--out", "unused-never-written"])
    assert not os.path.exists("unused-never-written")


@pytest.mark.parametrize("param, second, M, a, b", [
    ("simple_edm", "s", 4, 1.0, 5.0), ("simple_edm", "t_minus_s", 4, 2.0, 5.0), ("euler_fm", "s", 2, 1.0, 3.0),
    ("simple_edm", "s", 8, 1.0, 5.0)])
def test_08_loss_equals_equations_with_consecutive_groups(param, second, M, a, b):
    """imm_loss (groups of M consecutive rows) equals the IMM loss written out group by group (ref_loss), for both
    parameterisations, both second-time inputs (s; t - s online and r - s in the target pass) and (a, b)."""
    B = 16
    net = mlp(dtype=F64, scale=0.3)
    g = gen(9)
    x, eps = torch.randn(B, 2, generator=g, dtype=F64) * SD, SD * torch.randn(B, 2, generator=g, dtype=F64)
    s, r, t = group_times(B // M, M, seed=9)
    cfg = imm.Config(M=M, param=param, second_time=second, a=a, b=b)
    L, mmd, frac = imm.imm_loss(net, net, x, eps, s, r, t, cfg, env1())
    Lr, mmds = ref_loss(net, x, eps, s, r, t, M, param, second, a, b)
    torch.testing.assert_close(L, Lr, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(mmd, mmds.mean(), rtol=1e-10, atol=1e-14)
    assert frac.item() == (r[::M] == s[::M]).double().mean().item()
    perm = torch.randperm(B, generator=g)  # rows mixed across groups: a different loss
    Lp = imm.imm_loss(net, net, x[perm], eps[perm], s, r, t, cfg, env1())[0]
    assert abs(Lp.item() - L.item()) > 1e-6


# ============================================================================ 9. kernel
def test_09_laplace_kernel_values_and_width():
    g = gen(10)
    for D in (2, 16):  # D = 16 tells /D from /sqrt(D)
        a, b = torch.randn(5, 4, D, generator=g, dtype=F64), torch.randn(5, 4, D, generator=g, dtype=F64)
        w = 0.5 + torch.rand(5, generator=g, dtype=F64)
        K = imm.laplace_kernel(a, b, w, D)
        ref = torch.exp(-w[:, None, None] * torch.cdist(a, b) / D)
        torch.testing.assert_close(K, ref, rtol=1e-12, atol=0)
        Kaa = imm.laplace_kernel(a, a, w, D)
        assert (Kaa.diagonal(dim1=1, dim2=2) - 1).abs().max() < 1e-7
        assert (Kaa > 0).all() and (Kaa <= 1).all() and (K > 0).all() and (K <= 1).all()
        assert torch.equal(Kaa, Kaa.transpose(1, 2))
    # decreasing in the distance
    u = torch.randn(1, 1, 3, generator=g, dtype=F64)
    d = torch.linspace(0, 3, 50, dtype=F64)
    far = u + d[None, :, None] * torch.tensor([1.0, 0, 0], dtype=F64)
    k = imm.laplace_kernel(u, far, torch.ones(1, dtype=F64), 3)[0, 0]
    assert k[0] > 1 - 1e-7 and (k.diff() < 0).all()


def test_09_coincident_points_give_zero_finite_gradient():
    p = torch.randn(3, 1, 2, dtype=F64, requires_grad=True)
    a = p.expand(3, 4, 2)  # all four particles of each group at one point
    K = imm.laplace_kernel(a, a, torch.ones(3, dtype=F64), 2)
    K.sum().backward()
    assert torch.isfinite(p.grad).all() and (p.grad == 0).all()
    q = torch.randn(2, 4, 2, dtype=F64, requires_grad=True)
    imm.group_mmd2(q, q.detach().clone(), torch.ones(2, dtype=F64)).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().max() < 1e-12


def test_09_loss_kernel_width_is_one_over_abs_c_out(monkeypatch):
    seen = []
    orig = imm.laplace_kernel
    monkeypatch.setattr(imm, "laplace_kernel", lambda a, b, w, D: seen.append((w, D)) or orig(a, b, w, D))
    for param in ("simple_edm", "euler_fm"):
        seen.clear()
        net = mlp(dtype=F64)
        x = torch.randn(12, 2, generator=gen(11), dtype=F64)
        s, r, t = group_times(3, 4, seed=11)
        imm.imm_loss(net, net, x, SD * x.flip(0), s, r, t, imm.Config(param=param), env1())
        assert len(seen) == 3  # the same width for the three kernel matrices of each group
        want = nt_(t[::4]) / (SD * (t[::4] - s[::4])) if param == "simple_edm" else 1 / (SD * (t[::4] - s[::4]))
        for w, D in seen:
            assert D == 2 and (w > 0).all()
            torch.testing.assert_close(w, want, rtol=1e-12, atol=0)


# ============================================================================ 10-11. MMD
def test_10_mmd_v_statistic_properties():
    g = gen(12)
    G, M, D = 1000, 4, 2
    y_t = torch.randn(G, M, D, generator=g, dtype=F64) * (0.05 + torch.rand(G, 1, 1, generator=g, dtype=F64))
    y_r = torch.randn(G, M, D, generator=g, dtype=F64) * (0.05 + torch.rand(G, 1, 1, generator=g, dtype=F64))
    w = 0.1 + 20 * torch.rand(G, generator=g, dtype=F64)
    m = imm.group_mmd2(y_t, y_r, w)
    assert m.shape == (G,) and (m >= -1e-6).all()
    # the MMD^2 estimate of App. C Eq. 67 written out (diagonal included) on a few groups
    for i in range(5):
        k = lambda a, b: torch.exp(-w[i] * torch.clamp((a - b).norm(), min=1e-8) / D)
        want = sum(k(y_t[i, j], y_t[i, l]) + k(y_r[i, j], y_r[i, l]) - 2 * k(y_t[i, j], y_r[i, l])
                   for j in range(M) for l in range(M)) / M ** 2
        assert abs(m[i].item() - want.item()) < 1e-12
    perm = torch.randperm(M, generator=g)
    assert imm.group_mmd2(y_t, y_t[:, perm], w).abs().max() < 1e-7
    torch.testing.assert_close(imm.group_mmd2(y_r, y_t, w), m, rtol=0, atol=1e-12)
    p2 = torch.randperm(M, generator=g)
    torch.testing.assert_close(imm.group_mmd2(y_t[:, perm], y_r[:, p2], w), m, rtol=0, atol=1e-12)
    assert (imm.group_mmd2(y_t, y_t + 3.0, w) > 1e-2).all()


def test_11_M1_is_two_minus_two_kernel():
    g = gen(13)
    y_t, y_r = torch.randn(50, 1, 3, generator=g, dtype=F64), torch.randn(50, 1, 3, generator=g, dtype=F64)
    w = 0.5 + torch.rand(50, generator=g, dtype=F64)
    m = imm.group_mmd2(y_t, y_r, w)
    want = 2 - 2 * torch.exp(-w * (y_t - y_r)[:, 0].norm(dim=1) / 3)
    assert (m - want).abs().max() < 1e-7
    # the full loss with M = 1 is the weighted consistency loss of IMM Lemma 1
    net = mlp(dtype=F64)
    x, eps = torch.randn(6, 2, generator=g, dtype=F64), SD * torch.randn(6, 2, generator=g, dtype=F64)
    s, r, t = group_times(6, 1, seed=13)
    L = imm.imm_loss(net, net, x, eps, s, r, t, imm.Config(M=1), env1())[0]
    y_t = imm.f_map(net, imm.interpolate(x, eps, t), s, t, imm.Config(), env1())
    y_r = imm.f_map(net, imm.interpolate(x, eps, r), s, r, imm.Config(), env1())
    w_tilde = nt_(t) / (SD * (t - s))
    diag = torch.exp(-w_tilde * 1e-8 / 2)  # k(y, y) = exp(-w~ eps_k / D): 1 up to the clamp (w~ reaches 1e6)
    lemma = weight_(t) * (2 * diag - 2 * torch.exp(-w_tilde * (y_t - y_r).norm(dim=1) / 2))
    assert abs(L.item() - lemma.mean().item()) < 1e-12


# ============================================================================ 12. weighting
def test_12_weight_closed_form_generic_and_values():
    t = torch.tensor([0.006, 0.1, 0.5, 0.9, 0.994], dtype=F64)
    want = torch.tensor([0.90724, 7.88933, 3.97323, 1.35490, 1.01818], dtype=F64)
    assert ((imm.weight(t, 1.0, 5.0) / want - 1).abs() < 1e-4).all()
    assert abs(imm.weight(torch.tensor(0.5, dtype=F64), 2.0, 5.0).item() / 1.98661 - 1) < 1e-4
    # generic IMM Eq. 13: 1/2 sigmoid(b - lambda) (-d lambda / dt) alpha^a / (alpha^2 + sigma^2), d lambda by autograd
    tg = torch.linspace(T_MIN, T_MAX, 200, dtype=F64, requires_grad=True)
    lam = 2 * torch.log((1 - tg) / tg)
    dlam, = torch.autograd.grad(lam.sum(), tg)
    tg = tg.detach()
    for a, b in ((1.0, 5.0), (2.0, 5.0), (1.0, 2.0)):
        generic = 0.5 * torch.sigmoid(b - lam.detach()) * (-dlam) * (1 - tg) ** a / ((1 - tg) ** 2 + tg ** 2)
        torch.testing.assert_close(imm.weight(tg, a, b), generic, rtol=1e-12, atol=0)


# ============================================================================ 13. stop-gradient
def test_13_stop_gradient_equals_constant_target():
    B, M = 16, 4
    net = mlp(dtype=F64, scale=0.3)
    g = gen(14)
    x, eps = SD * torch.randn(B, 2, generator=g, dtype=F64), SD * torch.randn(B, 2, generator=g, dtype=F64)
    s, r, t = group_times(B // M, M, seed=14)
    rec = Recorder(net)
    L = imm.imm_loss(rec, rec, x, eps, s, r, t, imm.Config(M=M), env1())[0]
    assert len(rec.calls) == 2 and rec.calls[0]["out"].requires_grad and not rec.calls[1]["out"].requires_grad
    params = list(net.parameters())
    g_imm = torch.autograd.grad(L, params)
    g_const = torch.autograd.grad(ref_loss(net, x, eps, s, r, t, M, target_grad=False)[0], params)
    g_both = torch.autograd.grad(ref_loss(net, x, eps, s, r, t, M, target_grad=True)[0], params)
    for a, b in zip(g_imm, g_const):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
    assert max((a - b).abs().max().item() for a, b in zip(g_imm, g_both)) > 1e-4  # the control differs


# ============================================================================ 14. shared dropout, zero gap
@pytest.mark.parametrize("kind", ["mlp", "tiny"])
def test_14_shared_dropout_zero_gap_gives_zero_loss_and_gradient(kind):
    M, B = 4, 8
    net = (mlp(dtype=F64, dropout=0.3, scale=0.3) if kind == "mlp" else unet(dtype=F64, dropout=0.3, scale=0.05))
    net.train()
    shape = (B, 2) if kind == "mlp" else (B, 3, 8, 8)
    g = gen(15)
    x, eps = torch.randn(shape, generator=g, dtype=F64) * SD, SD * torch.randn(shape, generator=g, dtype=F64)
    s, _, t = group_times(B // M, M, seed=15)
    r = t.clone()  # r = t, hence x_r = x_t
    # the dropout is live: two plain passes with fresh masks differ
    inp = imm.coeffs(s, t)[2].reshape(-1, *[1] * (x.ndim - 1)) * x
    assert not torch.equal(net(inp, t, s), net(inp, t, s))
    rec = Recorder(net)
    L, mmd, frac = imm.imm_loss(rec, rec, x, eps, s, r, t, imm.Config(M=M), env1())
    assert len(rec.calls) == 2 and torch.equal(rec.calls[0]["out"], rec.calls[1]["out"])
    assert L.item() == 0.0 and mmd.item() == 0.0 and frac.item() == 0.0
    L.backward()
    worst = max(p.grad.abs().max().item() for p in net.parameters() if p.grad is not None)
    assert worst < 1e-9
    # control: the same pair of passes at a real gap has a non-zero gradient
    net.zero_grad()
    s2, r2, t2 = group_times(B // M, M, seed=15, k=4)
    imm.imm_loss(net, net, x, eps, s2, r2, t2, imm.Config(M=M), env1())[0].backward()
    assert max(p.grad.abs().max().item() for p in net.parameters() if p.grad is not None) > 1e-6


# ============================================================================ 15. grids and samplers
GRIDS = {
    (1, "uniform"): [0.994, 0.006],
    (2, "uniform"): [0.994, 7 / 12, 0.006],
    (2, "edm"): [0.994, 7 / 12, 0.006],
    (4, "uniform"): [0.994, 0.747, 0.5, 0.253, 0.006],
    (8, "uniform"): [0.994, 0.8705, 0.747, 0.6235, 0.5, 0.3765, 0.253, 0.1295, 0.006],
    (4, "edm"): [0.994, 0.97387, 0.84810, 0.29044, 0.006],
    (8, "edm"): [0.994, 0.98792, 0.97387, 0.93895, 0.84810, 0.63053, 0.29044, 0.06364, 0.006],
}


@pytest.mark.parametrize("N, schedule", list(GRIDS))
def test_15_time_grids(N, schedule):
    grid = imm.time_steps(N, imm.Config(schedule=schedule))
    assert len(grid) == N + 1 and all(a > b for a, b in zip(grid, grid[1:]))
    tol = 6e-6 if schedule == "edm" else 1e-9  # the expected edm grid is written to 5 decimals
    assert max(abs(a - b) for a, b in zip(grid, GRIDS[N, schedule])) < tol
    if schedule == "edm" and N > 2:  # Eq. 118 recomputed in float64
        hi, lo = (165.66666666666666) ** (1 / 7), (0.006 / 0.994) ** (1 / 7)
        e = [(hi + (N - i) / N * (lo - hi)) ** 7 for i in range(N, -1, -1)]
        assert max(abs(a - v / (1 + v)) for a, v in zip(grid, e)) < 1e-12
    assert imm.time_steps(N, imm.Config(), schedule) == grid  # the argument overrides cfg.schedule


def reference_sampler(net, idx, seed, N, cfg, shape):
    """Alg. 2 / Alg. 5 written out with the test's own grid loop and the same per-index noise."""
    grid = imm.time_steps(N, cfg)
    rng = C.IndexRNG(idx, seed, CPU)
    x = SD * rng.randn(len(idx), *shape)
    full = lambda v: torch.full((len(idx),), v, dtype=torch.float32)
    for i in range(N):
        t, nxt = grid[i], grid[i + 1]
        if cfg.sampler == "pushforward":
            x = imm.f_map(net, x, full(nxt), full(t), cfg, env1())
        else:
            x0 = imm.f_map(net, x, full(T_MIN), full(t), cfg, env1())
            if i == N - 1:
                return x0
            x = (1 - nxt) * x0 + nxt * SD * rng.randn(*x.shape)
    return x


@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_15_sampler_calls_network_N_times_with_the_grid(sampler, N):
    cfg = imm.Config(sampler=sampler)
    rec = Recorder(mlp(scale=0.3).eval())
    out = imm.sample(rec, C.IndexRNG(range(32), 3, CPU), (2,), N, cfg, env1())
    assert len(rec.calls) == N  # one network evaluation per step
    grid = imm.time_steps(N, cfg)
    for i, c in enumerate(rec.calls):
        assert (c["t"] == torch.tensor(grid[i], dtype=torch.float32)).all()
        dst = grid[i + 1] if sampler == "pushforward" else T_MIN
        assert (c["s"] == torch.tensor(dst, dtype=torch.float32)).all()
    ref = reference_sampler(rec, list(range(32)), 3, N, cfg, (2,))
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    if sampler == "restart" and N > 1:  # the last step returns x~ itself: re-noising it to t_min would differ
        x1 = rec.calls[-1]["x"] / imm.coeffs(torch.tensor([grid[-2]]), torch.tensor([grid[-2]]))[2]
        x_tilde = imm.f_map(rec.net, x1, torch.full((32,), T_MIN), torch.full((32,), grid[-2]), cfg, env1())
        torch.testing.assert_close(out, x_tilde, rtol=0, atol=1e-6)


def test_15_prior_restart_one_step_and_clipping():
    cfg = imm.Config()
    net0 = mlp(scale=0)  # zero output layer: f = c_skip x_T, so the prior's std is visible
    z = C.IndexRNG(range(4000), 0, CPU).randn(4000, 2)
    x = imm.sample(net0, C.IndexRNG(range(4000), 0, CPU), (2,), 1, cfg, env1())
    c_skip = imm.coeffs(torch.tensor([T_MIN]), torch.tensor([T_MAX]))[0]
    torch.testing.assert_close(x, c_skip * SD * z, rtol=0, atol=1e-6)  # x_T ~ N(0, 0.5^2 I)
    net = mlp(scale=0.3).eval()
    a = imm.sample(net, C.IndexRNG(range(64), 1, CPU), (2,), 1, imm.Config(sampler="restart"), env1())
    b = imm.sample(net, C.IndexRNG(range(64), 1, CPU), (2,), 1, imm.Config(sampler="pushforward"), env1())
    assert torch.equal(a, b)  # one restart step is one pushforward step: --sampler at --steps 1 alone is refused
    with pytest.raises(C.UserError, match="--sampler is read only at 2 steps or more, and --steps 1 holds none"):
        C.parse_cli(imm.Config, imm.PRESETS, imm.METHOD, ["sample", "--ckpt", "c.pt", "--steps", "1", "--sampler",
                                                          "restart"], sampler=imm.SAMPLER_FIELDS)
    assert C.parse_cli(imm.Config, imm.PRESETS, imm.METHOD, ["sample", "--ckpt", "c.pt", "--steps", "1,2", "--sampler",
                                                             "restart"], sampler=imm.SAMPLER_FIELDS)[2] == dict(
        sampler="restart")
    a2 = imm.sample(net, C.IndexRNG(range(64), 1, CPU), (2,), 2, imm.Config(sampler="restart"), env1())
    b2 = imm.sample(net, C.IndexRNG(range(64), 1, CPU), (2,), 2, imm.Config(sampler="pushforward"), env1())
    assert (a2 - b2).abs().max() > 1e-3  # restart differs from pushforward at N > 1
    # images are clipped to [-1, 1], points are not
    big = perturb(mlp(scale=0), 2.0, seed=3).eval()
    p = imm.sample(big, C.IndexRNG(range(256), 0, CPU), (2,), 2, cfg, env1())
    assert p.abs().max() > 1
    img_net = unet(scale=0.5).eval()
    im = imm.sample(img_net, C.IndexRNG(range(4), 0, CPU), (3, 8, 8), 2, cfg, env1())
    raw = imm.sample(img_net, C.IndexRNG(range(4), 0, CPU), (3, 8, 8), 2, cfg, env1(), clip=False)
    assert raw.abs().max() > 1 and im.abs().max() <= 1 and torch.equal(im, raw.clamp(-1, 1))


# ============================================================================ 16. seeding per index
@pytest.mark.parametrize("sampler", ["pushforward", "restart"])
def test_16_samples_independent_of_batch_size(sampler):
    cfg = imm.Config(sampler=sampler)
    net = mlp(scale=0.3).eval()
    for N in (2, 4):
        one = imm.sample(net, C.IndexRNG(range(64), 5, CPU), (2,), N, cfg, env1())
        parts = torch.cat([imm.sample(net, C.IndexRNG(idx.tolist(), 5, CPU), (2,), N, cfg, env1())
                           for idx in torch.arange(64).split(7)])
        assert (one - parts).abs().max() < 1e-5
        other = imm.sample(net, C.IndexRNG(range(64), 6, CPU), (2,), N, cfg, env1())
        assert (one - other).abs().max() > 1e-2  # the seed matters
    img = unet(scale=0.05).eval()
    one = imm.sample(img, C.IndexRNG(range(16), 5, CPU), (3, 8, 8), 2, cfg, env1())
    parts = torch.cat([imm.sample(img, C.IndexRNG(idx.tolist(), 5, CPU), (3, 8, 8), 2, cfg, env1())
                       for idx in torch.arange(16).split(7)])
    assert (one - parts).abs().max() < 1e-5


# ============================================================================ 17. precision
def test_17_bf16_keeps_times_coefficients_kernels_and_loss_fp32(monkeypatch, keep_backend_flags):
    env = C.setup("cpu", 0, "bf16")
    assert env.precision == "bf16" and env.device == CPU
    seen = dict(coeffs=[], kernel=[])
    oc, ok = imm.coeffs, imm.laplace_kernel

    def coeffs(*a, **k):
        out = oc(*a, **k)
        seen["coeffs"].append([v.dtype for v in out])
        return out

    def kernel(*a, **k):
        out = ok(*a, **k)
        seen["kernel"].append(out.dtype)
        return out

    monkeypatch.setattr(imm, "coeffs", coeffs)
    monkeypatch.setattr(imm, "laplace_kernel", kernel)
    cfg = imm.Config(k=15)
    s, r, t = imm.sample_times(32, 4, cfg, 1e-4, CPU)
    assert s.dtype == r.dtype == t.dtype == torch.float32
    net = Recorder(mlp(scale=0.3))
    x = C.toy_sample("8gaussians", 128, gen(17))
    L, mmd, frac = imm.imm_loss(net, net, x, SD * torch.randn(128, 2, generator=gen(18)), s, r, t, cfg, env)
    assert L.dtype == torch.float32 and mmd.dtype == torch.float32 and torch.isfinite(L)
    assert all(c["autocast"] for c in net.calls)  # the network did run under bf16 autocast
    assert all(c["t"].dtype == torch.float32 and c["s"].dtype == torch.float32 for c in net.calls)
    assert len(seen["coeffs"]) >= 3 and all(d == [torch.float32] * 3 for d in seen["coeffs"])
    assert len(seen["kernel"]) == 3 and all(d == torch.float32 for d in seen["kernel"])
    with C.autocast(env):  # the weighting under autocast stays fp32 too
        assert imm.weight(t).dtype == torch.float32


def test_17_bf16_sets_min_gap_unless_given(monkeypatch, tmp_path, capsys, keep_backend_flags):
    gaps = []
    orig = imm.sample_times
    monkeypatch.setattr(imm, "sample_times", lambda n, M, cfg, min_gap, dev: gaps.append(min_gap)
                        or orig(n, M, cfg, min_gap, dev))
    base = ["--iters", "1", "--batch", "64", "--eval_n", "32", "--eval_steps", "1", "--seed", "0"]
    for i, (extra, want) in enumerate(((["--precision", "bf16"], 1e-4), (["--precision", "bf16", "--min_gap", "0.003"],
                                                                         0.003), (["--precision", "fp32"], 0.0))):
        gaps.clear()
        imm.main([*base, *extra, "--out", str(tmp_path / f"r{i}")])
        out = capsys.readouterr().out
        assert gaps == [want], extra
        assert f"min_gap {want:g} |" in out
        assert ("bf16 is outside" in out) == ("bf16" in extra)


def test_17_golden_network_and_its_float64_time_path():
    """IMM's own network (golden from lumalabs/imm training/unets.py SongUNet, DDPM++ with s_embed, at a tiny size:
    tests/golden/make_imm_net_golden.py): our U-Net with imm.net_dict's options gives its outputs, and its time path
    (embedding, and the first block's affine of it) in float64 as IMM's code computes it, so that t and r a few
    fp32 ulps apart near T keep their difference. Control: the same weights on an fp32 time path lose it."""
    g = torch.load(os.path.join(os.path.dirname(__file__), "golden", "imm_net_golden.pt"), weights_only=True)
    assert g["commit"] == "c9473e9395910d3dd03ffffb6b0a8b4fb760c3a1"
    nd = imm.net_dict(imm.Config(net="ddpmpp"), C.Data("images", "x", x=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)))
    nd.update(ch=8, mult=[1, 2], nb=1, attn_res=[4], time_channels=8, dropout=0.0, augment_dim=0)
    assert nd["time_fp64"] and nd["num_times"] == 2 and nd["time_scale"] == 1000.0 and nd["time_combine"] == "sum"
    net, net32 = (C.build_net(d).eval() for d in (nd, {**nd, "time_fp64": False}))
    for n in (net, net32):
        C.load_state_strict(n, C._edm_state_to_ours(g["state"], nd, "imm"))
    x, s = g["x"], g["s"]
    e, blk = {}, net.enc["8x8_block0"]
    with torch.no_grad():
        for k in ("t", "r"):
            assert (net(x, g[k], s) - g["out_" + k]).abs().max() < 1e-5
            e[k] = net.embed(x, g[k], s)
            assert e[k].dtype == torch.float64 and (e[k] - g["emb_" + k]).abs().max() < 1e-12
            assert (C._linear(blk.affine, e[k]) - g["affine_" + k]).abs().max() < 1e-12
        d_ref = (g["emb_t"] - g["emb_r"])[:2]  # the two near-T pairs (t - r ~ 2e-7, 3e-7)
        assert d_ref.abs().max() > 0 and ((e["t"] - e["r"])[:2] - d_ref).norm() < 1e-9 * d_ref.norm()
        d32 = (net32.embed(x, g["t"], s) - net32.embed(x, g["r"], s))[:2].double()
        assert (d32 - d_ref).norm() > 1e-3 * d_ref.norm()  # the fp32 path: rounding of 1000 t w and of the layers
    seen, real = [], C._linear  # every block's affine runs in float64 inside the forward, as IMM's UNetBlock
    with pytest.MonkeyPatch.context() as mp, torch.no_grad():
        mp.setattr(C, "_linear", lambda m, v: seen.append((m, v.dtype)) or real(m, v))
        net(x, g["t"], s)
    affines = [m.affine for m in net.modules() if isinstance(m, C.Block)]
    assert len(affines) > 4 and [(m, torch.float64) for m in affines] == [c for c in seen if c[0] in affines]


def test_13_train_uses_online_weights_as_target(monkeypatch, tmp_path):
    """The training loop hands imm_loss the online network (unwrapped) as the target, never the EMA."""
    seen, orig = [], imm.imm_loss

    def spy(model, target, *a):
        seen.append((C.unwrap(model) is target, all(p.requires_grad for p in target.parameters())))
        return orig(model, target, *a)
    monkeypatch.setattr(imm, "imm_loss", spy)
    imm.main(["--iters", "2", "--batch", "64", "--eval_n", "32", "--eval_steps", "1", "--out", str(tmp_path / "o")])
    assert seen == [(True, True)] * 2


def test_13_train_draws_the_prior_noise_at_sigma_d(monkeypatch, tmp_path):
    """The training loop's eps is N(0, sigma_d^2 I) (IMM Alg. 1; sigma_d = 0.5 here), drawn apart from the data, and
    each group's (s, r, t) obey t_min <= s <= r <= t <= T: the loop's draws, not only sample_times's; the cosine
    schedule's lr at step k is lr (1 + cos(pi k / iters)) / 2."""
    seen, lrs, orig, step = [], [], imm.imm_loss, C.Guard.step
    monkeypatch.setattr(C.Guard, "step", lambda g, opt, *a, **k: (lrs.append(opt.param_groups[0]["lr"]),
                                                                  step(g, opt, *a, **k))[1])

    def spy(model, target, x, eps, s, r, t, cfg, *a, **k):
        seen.append((x.clone(), eps.clone(), s, r, t, cfg.sigma_d, cfg.t_min, cfg.T))
        return orig(model, target, x, eps, s, r, t, cfg, *a, **k)
    monkeypatch.setattr(imm, "imm_loss", spy)
    imm.main(["--iters", "4", "--batch", "256", "--eval_n", "32", "--eval_steps", "1", "--lr", "0.01",
              "--lr_schedule", "cosine", "--out", str(tmp_path / "o")])
    assert lrs == pytest.approx([0.01 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)], rel=1e-12)
    (x, eps, s, r, t, sd, lo, hi) = seen[0]
    assert sd == 0.5 and abs(eps.std().item() / sd - 1) < 0.15 and abs(eps.mean().item()) < 0.1
    assert not torch.equal(eps, x) and abs(torch.corrcoef(torch.stack([eps.flatten(), x.flatten()]))[0, 1]) < 0.2
    assert bool((lo <= s).all() and (s <= r).all() and (r <= t).all() and (t <= hi).all())


# ============================================================================ 18. initial loss
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_18_initial_toy_loss_finite_and_order_one(seed):
    cfg = imm.Config()
    data = C.load_data("8gaussians", "data", env1(), seed, False)
    torch.manual_seed(seed)
    net = C.build_net(imm.net_dict(cfg, data))
    x, _ = data.batch(cfg.batch, 0)
    eps = SD * torch.randn_like(x)
    s, r, t = imm.sample_times(cfg.batch // cfg.M, cfg.M, cfg, 0.0, CPU)
    L = imm.imm_loss(net, net, x, eps, s, r, t, cfg, env1())[0]
    assert torch.isfinite(L) and 0 < L.item() < 5


# ==================================================================================== toy convergence
# The full toy recipe (5,000 steps x 512, EMA 0.999) takes ~190 s on one thread here, too long for CI next to
# the rest of the suite; run by hand it passes the criteria below. CI runs (i) a cheap variant: after 100 steps the
# 2-step MMD^2 must drop >= 3x from the untrained network's (measured, 2-core CPU: 0.883 -> 0.170 at seed 0, 5.2x;
# 0.874 -> 0.151 at seed 1, 5.8x; 300 steps gave 7.7x; the zero-gap control stays at 0.883, 1.0x), and (ii) the
# 128-wide, k = 12 recipe for 1,500 x 512 with the full pass criteria (seed 0: MMD^2 0.081 / 0.022, in-mode 0.66 /
# 0.86 at 1 / 2 steps; seed 1: 0.075 / 0.022, 0.71 / 0.87; the earlier 2,000 x 512 with EMA 0.995 gave 0.095 / 0.018,
# 0.64 / 0.86 at seed 0 and 0.117 / 0.015, 0.71 / 0.88 at seed 1). Its cost goes with the examples (~26k img/s at any
# batch here); a 64-wide net, or k = 10, at 1,200-2,000 x 512 missed the 1-step in-mode 0.6 at one of the seeds, and
# 1,000 x 512 (lr 2e-3, cosine) or 1,200 x 256 missed it at seed 0. Both shorten the EMA horizon with the budget
# (0.97 for 100 steps, 0.993 for 1,500; the preset's 0.999 is a 1,000-step horizon): a constant-decay EMA still
# holds 0.999^1500 = 22 % of the initial weights after 1,500 steps, and 0.999^100 = 90 % after 100.
SHORT, MID = 100, 1500
TOY_ARGS = ["--seed", "0", "--eval_n", "4000", "--log_every", "100"]


def last_metrics(folder):
    with open(os.path.join(folder, "metrics.jsonl")) as f:
        return json.loads(f.read().splitlines()[-1])


def run_imm(out, *args):
    imm.main(["--out", str(out), *TOY_ARGS, *args])
    return last_metrics(out)


def cheap_pass(m, init):
    """Cheap variant: the 2-step MMD^2 dropped at least 3x from its value at initialisation."""
    return m["mmd2_2"] * 3 <= init["mmd2_2"]


def full_pass(m):
    """Pass criteria at 2 steps (MMD^2 < 0.05, in-mode >= 0.85, >= 7/8 modes) and 1 step."""
    return (m["mmd2_2"] < 0.05 and m["in_mode_2"] >= 0.85 and m["modes_2"] >= 7
            and m["mmd2_1"] < 0.15 and m["in_mode_1"] >= 0.6)


def zero_delta_eta(cfg):
    return 0.0  # control (b): Delta eta = 0, so r = t and x_r = x_t


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("imm_toy")
    runs = dict(root=root)
    quick = ["--eval_n", "2000", "--eval_steps", "1,2"]  # MMD^2 uses 2,000 samples at most anyway
    runs["init"] = run_imm(root / "init", "--iters", "0", *quick)  # control (a): untrained
    short = ["--iters", str(SHORT), "--ema", "0.97", "--log_every", "25", *quick]
    runs["short"] = run_imm(root / "short", *short)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(imm, "delta_eta", zero_delta_eta)
        runs["gap0"] = run_imm(root / "gap0", *short)  # the same budget as `short`, which it is compared with
    runs["mid"] = run_imm(root / "mid", "--iters", str(MID), "--ema", "0.993", "--k", "12", "--width", "128",
                          "--eval_steps", "1,2")
    return runs


def test_toy_run_writes_its_files(toy):
    run = toy["root"] / "mid"
    for f in ("ckpt.pt", "log.jsonl", "config.json", "samples.png", "metrics.jsonl"):
        assert (run / f).is_file(), f
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert ck["method"] == "imm" and ck["convention"] == imm.CONVENTION and ck["step"] == MID
    assert ck["net"]["kind"] == "mlp" and ck["net"]["num_times"] == 2 and ck["net"]["time_scale"] == 1000.0
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == list(range(100, MID + 1, 100))
    assert all(math.isfinite(r["loss"]) and 0 < r["loss"] < 5 for r in logs)  # item 18 along the run
    assert all(0.05 < r["r_eq_s"] < 0.2 for r in logs)  # ~11.5 % of groups have r = s at k = 12


def test_toy_cheap_variant_100_steps(toy):
    init, short = toy["init"], toy["short"]
    assert init["mmd2_2"] > 0.3  # the untrained network is far from the data (measured: 0.88)
    assert cheap_pass(short, init), (short["mmd2_2"], init["mmd2_2"])


def test_toy_1500_steps_passes_spec_criteria(toy):
    m = toy["mid"]
    assert full_pass(m), {k: m[k] for k in sorted(m) if k[-1].isdigit()}


def test_toy_controls_fail(toy):
    init, gap0 = toy["init"], toy["gap0"]
    assert not full_pass(init) and not cheap_pass(init, init)  # (a) untrained
    assert not full_pass(gap0) and not cheap_pass(gap0, init), gap0  # (b) zero gap
    # (b) is inert because its gradients vanish (item 14): its weights never left the initialisation
    # (Adam turns exactly zero gradients into zero steps), while the real run moved them
    c0, cg, cs = (torch.load(toy["root"] / d / "ckpt.pt", weights_only=True) for d in ("init", "gap0", "short"))
    moved = lambda c: max((c["model"][k] - c0["model"][k]).abs().max().item() for k in c0["model"])
    assert cg["step"] == cs["step"] == SHORT and c0["step"] == 0
    assert moved(cg) < 1e-6 and moved(cs) > 1e-2, (moved(cg), moved(cs))
    gaps = [json.loads(ln)["r_eq_s"] for ln in (toy["root"] / "gap0" / "log.jsonl").read_text().splitlines()]
    assert gaps == [0.0] * 4  # r = t, never s


# ================================================================================ IMM vs 1-RF on a .npy file
@pytest.mark.slow
def test_npy_points_imm_vs_1rf_at_equal_budget(tmp_path):
    """A 2-D data set given as a .npy file, the same number of training examples for both (iters x batch):
    IMM's 2-step SWD is within 2x of the 1-RF's 100-step Euler SWD, and IMM's 1-step samples are >= 3x
    closer (SWD) than the 1-RF's 1-step samples. Both files write their metrics themselves. At 1,000 x 256 (half the
    examples of docs/imm.md's 1,000-step row; ~15 % faster) measured on the 2-core CPU: IMM 1 / 2 steps SWD 0.079 /
    0.027, 1-RF 1 / 100 steps 0.414 / 0.022 at seed 0 (ratios 5.3 and 1.22); 0.094 / 0.036 and 0.409 / 0.033 at seed 1
    (4.4 and 1.10). 1,000 x 512 gave 6.8 and 1.43 at seed 0; 600 x 512 only 3.5 (1-step) at seed 1."""
    import rectified_flow as R
    npy = str(tmp_path / "points.npy")
    np.save(npy, C.toy_sample("8gaussians", 20_000, gen(123)).numpy())
    iters, batch = 1000, 256
    common = ["--data", npy, "--iters", str(iters), "--batch", str(batch), "--seed", "0", "--eval_n", "4000",
              "--eval_steps", "1,2"]
    # IMM's EMA horizon shortened to the budget as in the toy runs above; the 1-RF toy recipe samples its raw
    # weights (no EMA), which is its best case at this budget
    imm.main([*common, "--out", str(tmp_path / "imm"), "--ema", "0.995", "--log_every", "500"])
    R.main([*common, "--out", str(tmp_path / "rf"), "--stage", "1rf", "--log_every", "500"])
    mi, mr = last_metrics(tmp_path / "imm"), last_metrics(tmp_path / "rf")
    ci, cr = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("imm", "rf"))
    seen = lambda c: c["step"] * c["config"]["batch"] * c["config"].get("accum", 1)
    assert seen(ci) == seen(cr) == iters * batch
    assert ci["config"]["data"] == cr["config"]["data"] == npy
    print(f"IMM swd_1 {mi['swd_1']:.4f} swd_2 {mi['swd_2']:.4f} | 1-RF swd_1 {mr['swd_1']:.4f} "
          f"swd_100 {mr['swd_100']:.4f}")
    assert mi["swd_2"] <= 2 * mr["swd_100"], (mi["swd_2"], mr["swd_100"])
    assert 3 * mi["swd_1"] <= mr["swd_1"], (mi["swd_1"], mr["swd_1"])


# ======================================================================================== CLI smoke (tiny)
cli = functools.partial(run, IMM)  # its command line in a subprocess (one OpenMP thread)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`python imm.py --preset tiny --data imgs.npy` (20 steps of the tiny U-Net) in a subprocess."""
    root = tmp_path_factory.mktemp("imm_cli")
    np.save(root / "imgs.npy", np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
    p = cli("--preset", "tiny", "--data", "imgs.npy", "--out", "run", cwd=root)
    assert_ok(p)
    (root / "train.out").write_text(p.stdout)
    return root


def test_cli_tiny_train(tiny):
    run = tiny / "run"
    for f in ("ckpt.pt", "log.jsonl", "config.json", "samples.png", "metrics.jsonl"):
        assert (run / f).is_file(), f
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert set(ck) == {"model", "ema", "opt", "scaler", "step", "config", "net", "method", "convention", "rng"}
    assert ck["method"] == "imm" and ck["step"] == 20
    assert ck["convention"] == "x_t=(1-t)x+t*e, e~N(0,0.5^2 I), t=1 noise; f_{s,t} maps t->s"
    cfg = ck["config"]
    assert (cfg["sigma_d"], cfg["T"], cfg["t_min"], cfg["param"], cfg["second_time"]) == \
        (0.5, 0.994, 0.006, "simple_edm", "s")
    assert (cfg["batch"], cfg["M"], cfg["k"], cfg["a"], cfg["b"], cfg["xflip"]) == (16, 4, 12, 1.0, 5.0, True)
    nd = ck["net"]
    assert nd["kind"] == "unet" and nd["num_times"] == 2 and nd["time_scale"] == 1000.0 and nd["dropout"] == 0.1
    assert nd["img_resolution"] == 16 and nd["in_channels"] == 3
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    assert any(not torch.equal(ck["model"][k], ck["ema"][k]) for k in ck["model"])  # EMA 0.99 lags the weights
    net = C.build_net(nd)
    C.load_state_strict(net, ck["ema"])  # `sample` can rebuild f from the checkpoint alone
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [5, 10, 15, 20] and all(math.isfinite(r["loss"]) for r in logs)
    out = (tiny / "train.out").read_text()
    assert "global batch 16 = 1 x 16 x 1 (4 groups of M = 4" in out and "min_gap 0 " in out


def test_cli_tiny_sample_and_fid(tiny):
    p = cli("sample", "--ckpt", "run/ckpt.pt", "--steps", "1,2", "--n", "10", "--out", "s.npy", cwd=tiny)
    assert_ok(p)  # the printed sampler names what its step count reads: the grid only from 3 steps
    assert " 1 step (pushforward))" in p.stdout and " 2 steps (pushforward, eta_mid 1.4))" in p.stdout, p.stdout
    for N in (1, 2):
        a = np.load(tiny / f"s_{N}step.npy")
        assert a.shape == (10, 16, 16, 3) and a.dtype == np.uint8
    p = cli("sample", "--ckpt", "run/ckpt.pt", "--steps", "4", "--n", "9", "--sampler", "restart", "--schedule", "edm",
            "--out", "r.png", cwd=tiny)
    assert_ok(p)
    assert "restart, edm grid" in p.stdout and (tiny / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    p = cli("sample", "--ckpt", "run/ckpt.pt", "--steps", "4", "--n", "9", "--sampler", "restart", "--schedule", "edm",
            "--out", "r.npy", cwd=tiny)
    assert_ok(p)
    q = cli("sample", "--ckpt", "run/ckpt.pt", "--steps", "4", "--n", "9", "--out", "p.npy", cwd=tiny)
    assert_ok(q)
    assert np.load(tiny / "r.npy").shape == (9, 16, 16, 3)
    assert not np.array_equal(np.load(tiny / "r.npy"), np.load(tiny / "p.npy"))  # the options took effect
    p = cli("fid", "--ckpt", "run/ckpt.pt", "--steps", "1,2", "--n", "32", "--fid_detector", standin_path(),
            "--root", "data", cwd=tiny)
    assert_ok(p)
    recs = [json.loads(ln) for ln in (tiny / "run" / "fid.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in recs] == [1, 2] and all(r["n"] == 32 and r["detector"] == "standin" for r in recs)
    assert all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in recs)
    with open(tiny / "run" / "fid.jsonl", "a") as f:
        f.write("a line of the user's\n")
    p = cli("fid", "--ckpt", "run/ckpt.pt", "--steps", "1", "--n", "32", "--fid_detector", standin_path(),
            "--root", "data", cwd=tiny)  # the same measurement again (a re-run after an interruption): its row is
    assert_ok(p)  # replaced, not appended a second time; the other step count's row and a line that is no row stay
    lines = (tiny / "run" / "fid.jsonl").read_text().splitlines()
    assert lines[1] == "a line of the user's" and [json.loads(lines[i]) for i in (0, 2)] == recs[::-1], lines


def test_fid_refuses_a_reference_it_would_misread(tiny, tmp_path, capsys):
    """fid --data of another kind or shape than the model's images was a traceback (2-D points) or an FID against
    other images without a word; --data beside --fid_ref was noted and ignored. One sentence each; control: the
    model's own data."""
    np.save(tmp_path / "big.npy", np.zeros((8, 32, 32, 3), np.uint8))
    fid = ["fid", "--ckpt", tiny / "run" / "ckpt.pt", "--steps", "1", "--n", "8", "--fid_detector", standin_path(),
           "--root", tmp_path, "--out", tmp_path / "f.jsonl"]
    np.savez(tmp_path / "ref.npz", mu=np.zeros(4), sigma=np.eye(4))
    for extra, words in ((["--data", "moons"], ["2-D points", "(3, 16, 16)"]),
                         (["--data", tmp_path / "big.npy"], ["(3, 32, 32)", "(3, 16, 16)"]),
                         (["--data", "moons", "--fid_ref", tmp_path / "ref.npz"], ["--fid_ref", "one of them"])):
        capsys.readouterr()
        try:
            C.main_guard(lambda: imm.main([str(a) for a in fid + extra]))
            code = 0
        except SystemExit as e:
            code = e.code
        refusal(code, capsys.readouterr(), *words)
    imm.main([str(a) for a in fid + ["--data", tiny / "imgs.npy"]])  # control


def test_sample_writes_npz_and_zip_as_the_npy(tiny, tmp_path):
    """`sample --out` also writes .npz (arr_0: guided-diffusion's evaluator.py) and .zip (one PNG per image, 000000.png
    on: EDM's fid.py --images reads it, and so does load_data): the same uint8 images as the .npy, in index order."""
    for ext in ("npy", "npz", "zip"):
        imm.main(["sample", "--ckpt", str(tiny / "run" / "ckpt.pt"), "--steps", "1", "--n", "5",
                  "--out", str(tmp_path / f"s.{ext}")])
    want = np.load(tmp_path / "s.npy")
    assert want.shape == (5, 16, 16, 3) and want.std() > 0
    with np.load(tmp_path / "s.npz") as z:
        assert list(z.keys()) == ["arr_0"] and np.array_equal(z["arr_0"], want)
    import zipfile
    from PIL import Image
    with zipfile.ZipFile(tmp_path / "s.zip") as z:
        assert z.namelist() == [f"{i:06d}.png" for i in range(5)]
        got = np.stack([np.asarray(Image.open(z.open(n))) for n in z.namelist()])
    assert np.array_equal(got, want)
    env = C.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"), is_main=True, precision="fp32", seed=0)
    d = C.load_data(str(tmp_path / "s.zip"), str(tmp_path), env, 0, False)
    assert np.array_equal(d.x.permute(0, 2, 3, 1).numpy(), want)  # (the loader keeps the names' order)


def test_sample_independent_of_batch(tiny, tmp_path):
    for b in (3, 16):
        imm.main(["sample", "--ckpt", str(tiny / "run" / "ckpt.pt"), "--steps", "2", "--n", "10", "--batch", str(b),
                  "--sampler", "restart", "--out", str(tmp_path / f"b{b}.npy")])
    a, b = np.load(tmp_path / "b3.npy"), np.load(tmp_path / "b16.npy")
    assert a.shape == (10, 16, 16, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert (a == b).mean() > 0.999  # per-index noise; at most a rare uint8 rounding tie differs
    # `sample` uses the EMA weights (eval mode), seeded per index from --seed (default 0)
    ck = torch.load(tiny / "run" / "ckpt.pt", weights_only=True)
    cfg = imm.Config(**{**ck["config"], "sampler": "restart"})
    for key, same in (("ema", True), ("model", False)):
        net = C.build_net(ck["net"])
        net.load_state_dict(ck[key])
        x = imm.sample(net.eval(), C.IndexRNG(range(10), 0, CPU), (3, 16, 16), 2, cfg, env1())
        u8 = C.to_uint8(x).permute(0, 2, 3, 1).numpy().astype(int)
        assert (np.abs(u8 - a).max() <= 1) == same, key


def test_cli_bad_inputs(tiny, capsys):
    np.save(tiny / "float_imgs.npy", np.random.default_rng(1).random((8, 16, 16, 3)).astype(np.float32))
    before = sha(tiny / "run" / "ckpt.pt")
    base = ["--preset", "tiny", "--data", "imgs.npy"]
    # the real command line, end to end
    for argv, words in (([*base, "--teacher", "x", "--out", "run"], ["from scratch"]),
                        ([*base, "--batch", "10", "--iters", "99", "--out", "run"], ["--batch 16", "keeps it"]),
                        # (steps left: a finished run applies no change, noted; a resumed one keeps its batch)
                        (["--preset", "tiny", "--data", "missing.npy", "--out", "run"], ["missing.npy"])):
        p = cli(*argv, cwd=tiny)
        refused(p, *words)
    cases = [
        (["--preset", "tiny", "--data", "float_imgs.npy", "--out", "bad1"], []),
        (["--preset", "tiny", "--out", "bad2"], ["--data"]),
        ([*base, "--batch", "24", "--accum", "4", "--out", "bad3"], ["multiple"]),  # micro-batch 6, M = 4
        ([*base, "--T", "1.0", "--out", "bad4"], []),
        ([*base, "--net", "mlp", "--out", "bad5"], []),
        (["--data", "imgs.npy", "--out", "bad6"], []),  # toy preset's MLP on images
        (["--preset", "nope"], []),
        (["sample", "--ckpt", "missing.pt"], []),
    ]
    cwd = os.getcwd()
    os.chdir(tiny)
    try:
        for argv, words in cases:
            guarded(capsys, lambda: imm.main(list(argv)), *words)
    finally:
        os.chdir(cwd)
    assert sha(tiny / "run" / "ckpt.pt") == before  # no checkpoint touched by bad input


def test_nan_loss_keeps_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    args = ["--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--root", str(tmp_path), "--out", str(tmp_path / "n"),
            "--log_every", "1", "--ckpt_every", "2"]
    imm.main([*args, "--iters", "2"])
    before = sha(tmp_path / "n" / "ckpt.pt")
    orig = imm.imm_loss
    monkeypatch.setattr(imm, "imm_loss", lambda *a: (lambda L, m, f: (L * float("nan"), m, f))(*orig(*a)))
    with pytest.raises(SystemExit) as e:
        C.main_guard(lambda: imm.main([*args, "--iters", "4"]))
    refusal(e.value.code, capsys.readouterr().err, "NaN")
    assert sha(tmp_path / "n" / "ckpt.pt") == before


# ================================================================================================= DDP: two gloo ranks
WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
import common as C
import imm

save, distribute, loss, calls = C.save_checkpoint, C.distribute, imm.imm_loss, []


def spy(path, ck, env, gens=()):  # every rank keeps its own weights and EMA next to the checkpoint
    torch.save({{k: ck[k] for k in ("model", "ema")}}, f"{{path}}.rank{{env.rank}}")
    return save(path, ck, env, gens)


def nan_on_rank1(*a):  # rank 1's loss (so its gradients) is NaN in the first round of step 2; rank 0's stays finite
    L, mmd, frac = loss(*a)
    calls.append(1)
    return (L * float("nan") if a[8].rank == 1 and len(calls) == 3 else L), mmd, frac


def runs():
    imm.main(sys.argv[1:] + ["--out", "run"])
    imm.imm_loss = loss  # the control: the same run with no gradient all-reduce (no DDP wrapper) must split
    C.distribute = lambda model, env, manual=False: distribute(model, env, True)
    imm.main(sys.argv[1:] + ["--out", "nosync"])
    imm.main(["sample", "--ckpt", "run/ckpt.pt", "--steps", "1,2", "--n", "7", "--batch", "2", "--out", "s.npy"])


C.save_checkpoint, imm.imm_loss = spy, nan_on_rank1
C.main_guard(runs)
"""


@pytest.mark.slow
def test_two_ranks_stay_identical_and_withhold_together(tiny, tmp_path):
    """torchrun, 2 gloo ranks, tiny IMM (dropout, x-flips, per-rank data, noise and times) with 2 accumulation rounds
    (DDP's no_sync on the first): weights and EMA equal on both ranks. A NaN loss on rank 1 alone skips the step on
    both (the gradients are all-reduced) and withholds the next checkpoint on both (Guard's flag is averaged), though
    rank 0, which writes it, saw only finite losses. Control: without the all-reduce the ranks part. `sample` on two
    ranks writes one process's samples."""
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "worker.py",
           "--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--root", "data", "--iters", "4", "--accum", "2",
           "--log_every", "1", "--ckpt_every", "2", "--eval_n", "4"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("world 2 | global batch 16 = 2 x 4 x 2") == 2
    assert p.stdout.count("checkpoint of step 2 withheld: the loss became NaN/inf after step 0") == 1
    logs = [json.loads(ln) for ln in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4] and [r.get("skipped", 0) for r in logs] == [0, 1, 0, 0]
    assert torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)["step"] == 4
    for out, same in (("run", True), ("nosync", False)):
        r0, r1 = (torch.load(tmp_path / out / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
        equal = [torch.equal(r0[k][n], r1[k][n]) for k in ("model", "ema") for n in r0[k]]
        assert all(equal) if same else not any(equal[:len(r0["model"])]), out
    # `sample` shares its batches out over the ranks; the samples are one process's (noise per sample index)
    imm.main(["sample", "--ckpt", str(tmp_path / "run" / "ckpt.pt"), "--steps", "1,2", "--n", "7", "--out",
              str(tmp_path / "one.npy")])
    for K in (1, 2):
        two, one = (np.load(tmp_path / f"{s}_{K}step.npy") for s in ("s", "one"))
        assert two.shape == (7, 16, 16, 3) and np.array_equal(two, one)


# ================================================================================================= resume
def assert_same_state(a, b, step):
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == step
    for k in ("model", "ema"):
        assert ca[k].keys() == cb[k].keys()
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)
    for i, st in ca["opt"]["state"].items():
        for n, v in st.items():
            assert torch.equal(v, cb["opt"]["state"][i][n]), (i, n)


def test_cli_resume_bitwise(tiny):
    """N = 8 steps uninterrupted versus 4 steps, then a second command that resumes to 8 (CPU, seed 0; dropout,
    flips, data order and (s, r, t) all depend on the restored RNG state)."""
    base = ["--preset", "tiny", "--data", "imgs.npy", "--root", "data", "--ckpt_every", "100", "--eval_n", "4"]
    assert_ok(cli(*base, "--out", "ra", "--iters", "8", cwd=tiny))
    assert_ok(cli(*base, "--out", "rb", "--iters", "4", cwd=tiny))
    c4 = torch.load(tiny / "rb" / "ckpt.pt", weights_only=True)
    p = cli(*base, "--out", "rb", "--iters", "8", cwd=tiny)
    assert_ok(p)
    assert "step 4/8" in p.stdout  # it did resume
    assert_same_state(tiny / "ra" / "ckpt.pt", tiny / "rb" / "ckpt.pt", 8)
    c8 = torch.load(tiny / "rb" / "ckpt.pt", weights_only=True)
    assert c4["step"] == 4 and any(not torch.equal(c4["model"][k], c8["model"][k]) for k in c4["model"])


def test_resume_after_interruption_bitwise(tiny, tmp_path, monkeypatch):
    """A run killed in the middle of step 6 (checkpoint at step 4) and restarted ends equal to a clean run."""
    base = ["--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--root", str(tmp_path), "--ckpt_every", "4",
            "--iters", "8", "--eval_n", "4"]
    imm.main([*base, "--out", str(tmp_path / "a")])
    calls, orig = [], imm.imm_loss

    def crash(*a):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return orig(*a)
    monkeypatch.setattr(imm, "imm_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        imm.main([*base, "--out", str(tmp_path / "b")])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(imm, "imm_loss", orig)
    imm.main([*base, "--out", str(tmp_path / "b")])
    assert_same_state(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt", 8)
