"""Tests of flow_map.py: its invariants (numbered in the test names) with the
analytic Gaussian flow map as the oracle network, and the CLI (tiny U-Net in every mode, sample, fid, resume, bad
input). The toy convergence (with its must-fail controls) and the end-to-end distillation from a trained
1-RF checkpoint live in tests/test_flow_map_toy.py.

Everything runs in-process with one intra-op thread (small MLPs on a busy 2-core machine), except one subprocess
for the real command line and one two-rank torchrun (every mode under DDP).
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

import common as C
import flow_map as fm
from cli import assert_ok, guarded, refusal, refused, run, sha
from standin import standin_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FM = os.path.join(ROOT, "flow_map.py")
CPU = torch.device("cpu")
F64 = torch.float64


def env1(precision="fp32"):
    return C.Env(rank=0, world=1, local_rank=0, device=CPU, is_main=True, precision=precision, seed=0)


# ============================================================================== the analytic oracle
MU = torch.tensor([1.5, -0.5], dtype=F64)
A = torch.tensor([[0.8, 0.3], [0.0, 0.4]], dtype=F64)
SIGMA = A @ A.T  # [[0.73, 0.12], [0.12, 0.16]]
X_TEST = torch.tensor([[0.3, -1.2]], dtype=F64)


class Oracle:
    """The exact flow map of x0 ~ N(0, sigma0^2 I) -> x1 ~ N(mu, Sigma) along the interpolant (Boffi et al. §2), in
    float64, batched over per-sample times. C_t = alpha^2 sigma0^2 I + beta^2 Sigma shares Sigma's eigenbasis U
    (isotropic base)."""

    def __init__(self, mu=MU, Sigma=SIGMA, sigma0=1.0, interpolant="linear"):
        self.mu, self.Sigma, self.s0, self.interp = mu, Sigma, sigma0, interpolant
        self.lam, self.U = torch.linalg.eigh(Sigma)

    def co(self, t):
        return [c.to(F64)[:, None] for c in fm.coeffs(t.to(F64).reshape(-1), self.interp)]

    def c(self, t):  # eigenvalues of C_t
        al, be, _, _ = self.co(t)
        return al ** 2 * self.s0 ** 2 + be ** 2 * self.lam

    def X(self, x, s, t):  # X*_{s,t}(x) = m_t + C_t^{1/2} C_s^{-1/2} (x - m_s)
        bs, bt = self.co(s)[1], self.co(t)[1]
        y = ((x - bs * self.mu) @ self.U) * (self.c(t) / self.c(s)).sqrt()
        return bt * self.mu + y @ self.U.T

    def b(self, t, x):  # b_t(x) = beta' mu + K_t C_t^{-1} (x - m_t)
        al, be, dal, dbe = self.co(t)
        k = dal * al * self.s0 ** 2 + dbe * be * self.lam
        return dbe * self.mu + (((x - be * self.mu) @ self.U) * k / self.c(t)) @ self.U.T

    def phi(self, x, s, t):  # phi* = (X* - x) / (t - s), b_s on the diagonal (never divide there)
        d = (t - s).reshape(-1, 1)
        diag = d == 0
        return torch.where(diag, self.b(s, x), (self.X(x, s, t) - x) / torch.where(diag, torch.ones_like(d), d))

    def v_rf(self, y, tau):  # analytic rectified-flow velocity, tau = 1 noise (batched over samples)
        ti = tau.to(F64).reshape(-1, 1, 1)
        I2 = torch.eye(2, dtype=F64)
        M = (ti * self.s0 ** 2 * I2 - (1 - ti) * self.Sigma) @ torch.linalg.inv(
            (1 - ti) ** 2 * self.Sigma + ti ** 2 * self.s0 ** 2 * I2)
        return -self.mu + (M @ (y - (1 - ti[:, 0]) * self.mu)[:, :, None])[:, :, 0]

    def irreducible(self, t):  # tr[Cov(dI) - K C^-1 K^T]
        al, be, dal, dbe = self.co(t)
        k = dal * al * self.s0 ** 2 + dbe * be * self.lam
        cov = dal ** 2 * self.s0 ** 2 + dbe ** 2 * self.lam
        return (cov - k ** 2 / self.c(t)).sum().item()


def tt(*v):
    return torch.tensor(v, dtype=F64)


def central(f, h=1e-5):
    return (f(h) - f(-h)) / (2 * h)


# ------------------------------------------------------------------------------------------ item 4: oracle
@pytest.mark.parametrize("interp", ["linear", "trig"])
def test_04_oracle_reference_values(interp):
    o = Oracle(interpolant=interp)
    ref = {"linear": [(1.638245, -0.936564), (0.978362, -0.906169), (1.356724, 0.587661), (0.883266, 0.290166),
                      (1.2, 0.7), 2.508534, 0.862182],
           "trig": [(1.638245, -0.936564), (1.124606, -1.080505), (1.649211, 0.238991), (1.106255, 0.604584),
                    (2.356194, -0.785398), 3.379339, 1.241117]}[interp]
    got = [o.X(X_TEST, tt(0.0), tt(1.0)), o.X(X_TEST, tt(0.2), tt(0.7)), o.phi(X_TEST, tt(0.2), tt(0.7)),
           o.b(tt(0.7), X_TEST), o.b(tt(0.0), X_TEST)]
    for g, r in zip(got, ref):
        assert torch.allclose(g[0], tt(*r), atol=1e-6), (g, r)
    assert abs(o.irreducible(tt(0.7)) - ref[5]) < 1e-6
    assert abs(Oracle(sigma0=0.5, interpolant=interp).irreducible(tt(0.7)) - ref[6]) < 1e-6


@pytest.mark.parametrize("interp", ["linear", "trig"])
def test_04_oracle_satisfies_lagrangian_eulerian_semigroup(interp):
    o = Oracle(interpolant=interp)
    s, t, u = tt(0.2), tt(0.7), tt(0.45)
    x = X_TEST
    lag = central(lambda h: o.X(x, s, t + h)) - o.b(t, o.X(x, s, t))  # dX/dt = b(X)
    eul = central(lambda h: o.X(x, s + h, t)) + central(lambda h: o.X(x + h * o.b(s, x), s, t))  # dX/ds + grad X b
    assert lag.abs().max() < 1e-8 and eul.abs().max() < 1e-8, (lag, eul)
    assert (o.X(o.X(x, s, u), u, t) - o.X(x, s, t)).abs().max() < 1e-12  # semigroup
    h = 0.3  # the PSD phi-identity (Boffi et al. Prop. 3.6; docs/flow_map.md) at u = h s + (1 - h) t
    u = h * s + (1 - h) * t
    rhs = (1 - h) * o.phi(x, s, u) + h * o.phi(o.X(x, s, u), u, t)
    assert (o.phi(x, s, t) - rhs).abs().max() < 1e-12


# ------------------------------------------------------------------------------- items 1-3: map and JVPs
def mlp(seed=0, dtype=F64, dropout=0.0, scale=0.3):
    torch.manual_seed(seed)
    net = fm.jvp_safe(C.build_net(C.net_config("mlp", num_times=2, time_scale=1.0, dropout=dropout))).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(dtype))
    return net


def test_03_layer_norm_swap_keeps_the_forward():
    """jvp_safe swaps the MLP's LayerNorms for a written-out form (torch's fused one has a wrong reverse-over-forward
    gradient, which item 3e catches); the forward and the state dict are unchanged."""
    torch.manual_seed(0)
    a = C.build_net(C.net_config("mlp", num_times=2))
    b = fm.jvp_safe(C.build_net(C.net_config("mlp", num_times=2)))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in a.parameters():
            p.add_(0.3 * torch.randn_like(p))
    b.load_state_dict(a.state_dict())
    x, s, d = torch.randn(64, 2), torch.rand(64), torch.rand(64)
    assert (sum(isinstance(m, fm.LayerNormJVP) for m in b.modules()) == 7
            and a.state_dict().keys() == b.state_dict().keys())
    assert torch.allclose(a(x, s, d), b(x, s, d), atol=1e-5) and a(x, s, d).abs().max() > 1e-2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert b(x, s, d).dtype == torch.float32 and torch.allclose(a(x, s, d), b(x, s, d), rtol=0.03, atol=0.03)


def test_01_identity_on_the_diagonal_fp32():
    net = mlp(dtype=torch.float32)
    phi = fm.net_phi(net, 0.5)
    x, s = torch.randn(16, 2), torch.rand(16)
    assert phi(x, s, s).abs().max() > 1e-3  # a non-trivial network
    assert torch.equal(fm.flow_map(phi, x, s, s), x)


def test_02_tangent_at_t_equal_s_is_phi():
    phi = fm.net_phi(mlp(), 0.5)
    x, s = torch.randn(8, 2, dtype=F64), torch.rand(8, dtype=F64)
    _, dX = fm.jvp(lambda t: fm.flow_map(phi, x, s, t), (s,), (torch.ones_like(s),))
    assert (dX - phi(x, s, s)).abs().max() < 1e-12


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_03_jvps_against_central_differences():
    net = mlp()
    phi = fm.net_phi(net, 0.5)
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(8, 2, generator=g, dtype=F64), torch.randn(8, 2, generator=g, dtype=F64)
    s, t = 0.1 + 0.3 * torch.rand(8, generator=g, dtype=F64), 0.5 + 0.4 * torch.rand(8, generator=g, dtype=F64)
    one, h = torch.ones_like(s), 1e-4
    # (a) d/dt X
    _, a = fm.jvp(lambda tq: fm.flow_map(phi, x, s, tq), (t,), (one,))
    assert rel(a, central(lambda e: fm.flow_map(phi, x, s, t + e), h)) < 1e-6
    # (b) d/ds X at fixed t: Delta = t - s moves with s
    _, b = fm.jvp(lambda sq: fm.flow_map(phi, x, sq, t), (s,), (one,))
    fd = central(lambda e: fm.flow_map(phi, x, s + e, t), h)
    assert rel(b, fd) < 1e-6
    # ... and the mistake of passing Delta as a separate input with tangent 0 is caught
    d = t - s
    _, wrong = fm.jvp(lambda sq: x + fm.bc(t - sq, x) * 0.5 * net(x / 0.5, sq, d), (s,), (one,))
    assert rel(wrong, fd) > 1e-2, rel(wrong, fd)
    # (c) the (s, x) tangent (1, v) of phi (MeanFlow's total derivative)
    _, c = fm.jvp(lambda sq, xq: phi(xq, sq, t), (s, x), (one, v))
    assert rel(c, central(lambda e: phi(x + e * v, s + e, t), h)) < 1e-6
    # (d) grad_x X . v
    _, dd = fm.jvp(lambda xq: fm.flow_map(phi, xq, s, t), (x,), (v,))
    assert rel(dd, central(lambda e: fm.flow_map(phi, x + e * v, s, t), h)) < 1e-6


def test_03e_reverse_over_forward_gradient_matches_finite_difference():
    net = mlp()
    phi = fm.net_phi(net, 0.5)
    x, s, t = torch.randn(8, 2, dtype=F64), torch.full((8,), 0.2, dtype=F64), torch.full((8,), 0.8, dtype=F64)
    c = torch.randn(8, 2, dtype=F64)

    def loss():
        _, dX = fm.jvp(lambda tq: fm.flow_map(phi, x, s, tq), (t,), (torch.ones_like(t),))
        return (dX - c).square().sum()

    w = net.blocks[1].conv0.weight
    loss().backward()
    g = w.grad[3, 5].item()
    with torch.no_grad():
        def at(e):
            w[3, 5] += e
            out = loss()
            w[3, 5] -= e
            return out
        fd = central(at, 1e-5).item()
    assert abs(g) > 1e-4 and abs(g - fd) / abs(fd) < 1e-6, (g, fd)


# ------------------------------------------------------------------------- item 5: zero residuals at phi*
S, T = tt(0.2, 0.2, 0.2), tt(0.7, 0.7, 0.7)
XS = torch.tensor([[0.3, -1.2], [1.0, 0.5], [-0.7, 0.2]], dtype=F64)


@pytest.mark.parametrize("interp", ["linear", "trig"])
def test_05_zero_residuals_at_the_oracle(interp):
    o = Oracle(interpolant=interp)
    assert fm.lsd_term(o.phi, o.b, XS, S, T).max() < 1e-8  # LSD with teacher b
    assert fm.lsd_term(o.phi, lambda t, y: o.phi(y, t, t), XS, S, T).max() < 1e-8  # LSD, self-teacher
    for h in (torch.rand(3, dtype=F64), torch.full((3,), 0.5, dtype=F64)):  # PSD uniform and midpoint
        assert fm.psd_term(o.phi, XS, S, T, h).max() < 1e-12
    full, convex = fm.esd_term(o.phi, XS, S, T, "full"), fm.esd_term(o.phi, XS, S, T, "convex")
    assert full.max() < 1e-8 and torch.allclose(full, convex, atol=1e-14)
    assert fm.meanflow_term(o.phi, XS, S, T, o.b(S, XS)).max() < 1e-8  # MeanFlow / EMD with b in place of v^
    # a wrong network is not at zero (the residuals have teeth)
    bad = lambda x, s, t: o.phi(x, s, t) * 1.05
    assert fm.lsd_term(bad, o.b, XS, S, T).min() > 1e-4
    assert fm.psd_term(bad, XS, S, T, torch.full((3,), 0.5, dtype=F64)).min() > 1e-6
    assert fm.esd_term(bad, XS, S, T).min() > 1e-4 and fm.meanflow_term(bad, XS, S, T, o.b(S, XS)).min() > 1e-4


def test_05_lmd_zero_with_the_converted_rf_teacher():
    o = Oracle()
    bT = fm.rf_velocity(o.v_rf)  # the analytic RF velocity, converted
    assert fm.lsd_term(o.phi, bT, XS, S, T).max() < 1e-8
    bad = fm.rf_velocity(lambda y, tau: -o.v_rf(y, tau))  # a sign error in the conversion is caught
    assert fm.lsd_term(o.phi, bad, XS, S, T).min() > 1e-2


def test_06_fmm_floor_is_the_irreducible_value():
    o = Oracle()
    n = 400_000
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 2, generator=g, dtype=F64)
    x1 = MU + torch.randn(n, 2, generator=g, dtype=F64) @ A.T
    s, t = torch.full((n,), 0.2, dtype=F64), torch.full((n,), 0.7, dtype=F64)
    It, dIt = fm.interpolate(x0, x1, t)
    first = fm.fmm_term(o.phi, It, dIt, s, t, lambda_inv=0.0)
    inv = fm.fmm_term(o.phi, It, dIt, s, t, lambda_inv=1.0) - first
    assert inv.abs().max() < 1e-10
    assert abs(first.mean().item() / 2.508534 - 1) < 0.01, first.mean().item()


def test_06_fmm_terms_by_hand_for_a_linear_map():
    """A non-invertible map phi(x, s, t) = a x, by hand: y = X(t, s, I_t) = (1 - (t - s) a) I_t, d/dt X(s, t, y) = a y,
    X(s, t, y) = (1 - (t - s)^2 a^2) I_t; l = |a y - dI_t|^2 + lambda_inv (t - s)^4 a^4 |I_t|^2 (lambda_inv linear)."""
    g = torch.Generator().manual_seed(0)
    It, dIt = torch.randn(5, 3, generator=g, dtype=F64), torch.randn(5, 3, generator=g, dtype=F64)
    s, t, a = tt(0.1, 0.2, 0.0, 0.5, 0.3), tt(0.7, 0.9, 1.0, 0.5, 0.4), 0.8
    phi = lambda x, s_, t_: a * x
    d = (t - s)[:, None]
    y = (1 - d * a) * It
    for lam in (0.0, 0.5, 3.0):
        want = (a * y - dIt).square().sum(1) + lam * (d ** 2 * a ** 2 * It).square().sum(1)
        assert torch.allclose(fm.fmm_term(phi, It, dIt, s, t, lambda_inv=lam), want, rtol=1e-12, atol=1e-12), lam


# ------------------------------------------------------------------------------ item 7: conversions
def test_07_rf_teacher_conversion_and_clamp():
    o = Oracle()
    y = torch.randn(5, 2, dtype=F64)
    for t in (0.1, 0.5, 0.9):
        tv = torch.full((5,), t, dtype=F64)
        assert (fm.rf_velocity(o.v_rf)(tv, y) - o.b(tv, y)).abs().max() < 1e-12
    seen = []
    fm.rf_velocity(lambda y_, tau: seen.append(tau) or y_, t_eps=1e-3)(tt(0.0, 0.5, 1.0), y[:3])
    assert torch.allclose(seen[0], tt(1 - 1e-3, 0.5, 1e-3))  # clamped to the teacher's training range


def mf_u_by_integration(o, z, r, t, K=200):
    """MeanFlow's average velocity computed in MeanFlow time (data at 0): integrate dz/dtau = v_MF(z, tau) =
    -b_{1 - tau}(z) from tau = t down to r with RK4; u = (z_t - z_r) / (t - r)."""
    v = lambda zz, tau: -o.b(torch.full((len(zz),), 1 - tau, dtype=F64), zz)
    zz, hstep = z.clone(), (r - t) / K
    for k in range(K):
        tau = t + k * hstep
        k1 = v(zz, tau)
        k2 = v(zz + hstep / 2 * k1, tau + hstep / 2)
        k3 = v(zz + hstep / 2 * k2, tau + hstep / 2)
        k4 = v(zz + hstep * k3, tau + hstep)
        zz = zz + hstep / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    return (z - zz) / (t - r)


def test_07_meanflow_conversion_round_trip_and_identity():
    o = Oracle()
    r_mf, t_mf = 0.3, 0.8  # MeanFlow times, r <= t
    u = lambda z, r, t: mf_u_by_integration(o, z, float(r[0]), float(t[0]))
    phi = fm.meanflow_to_flow_map(u)
    s, t = tt(1 - t_mf, 1 - t_mf, 1 - t_mf), tt(1 - r_mf, 1 - r_mf, 1 - r_mf)
    assert (phi(XS, s, t) - o.phi(XS, s, t)).abs().max() < 1e-10
    # MeanFlow's identity u = v - (t - r)(du/dz v + du/dt) for u(z, r, t) = -phi*(z, 1 - t, 1 - r)
    uo = lambda z, tq: -o.phi(z, 1 - tq, 1 - torch.full_like(tq, r_mf))
    tq = torch.full((3,), t_mf, dtype=F64)
    vmf = -o.b(1 - tq, XS)
    uu, du = fm.jvp(uo, (XS, tq), (vmf, torch.ones_like(tq)))
    assert (uu - (vmf - (t_mf - r_mf) * du)).abs().max() < 1e-8


# ---------------------------------------------------------------------------- item 8: time samplers
def cfg_for(mode="lsd", **kw):
    c = fm.Config(mode=mode, teacher="x" if mode in ("lmd", "emd") else None, **kw)
    c.diag_frac = c.diag_frac if c.diag_frac is not None else (0.25 if mode in ("lmd", "emd") else 0.75)
    c.sigma0 = c.sigma0 or 1.0
    return c


def test_08_time_samplers():
    assert [fm.diag_rows(B, 0.75) for B in (1, 2, 4, 5, 8, 1024)] == [1, 1, 3, 3, 6, 768]
    assert fm.diag_rows(7, 0.25) == 1 and fm.diag_rows(8, 1.0) == 8
    torch.manual_seed(0)
    s, t, nd = fm.sample_times(1000, cfg_for(), CPU)
    assert nd == 750 and torch.equal(s[:nd], t[:nd]) and (s[nd:] < t[nd:]).all()
    assert s.dtype == torch.float32 and 0 <= s.min() and t.max() <= 1
    s, t, nd = fm.sample_times(1000, cfg_for(pair_order="both"), CPU)
    assert (s[nd:] > t[nd:]).float().mean().item() == pytest.approx(0.5, abs=0.08)
    s, t, nd = fm.sample_times(1000, cfg_for("fmm"), CPU)  # fmm always keeps both orders
    assert (s[nd:] > t[nd:]).any() and (s[nd:] < t[nd:]).any()
    for kind in ("v0", "v1"):
        s, t, nd = fm.sample_times(100_000, cfg_for("meanflow", time_sampler=kind), CPU)
        assert nd == 0 and (s <= t).all()
        frac = (s == t).float().mean().item()
        assert (abs(frac - 0.25) < 0.01) if kind == "v0" else 0.25 <= frac < 0.32, frac
    s, t, _ = fm.sample_times(100_000, cfg_for("meanflow"), CPU)  # v0: LN(2, 2) pairs, data end heavy
    assert s.median() > 0.7 and t.median() > 0.9
    s, t = torch.rand(1000), torch.rand(1000)
    s, t = torch.minimum(s, t), torch.maximum(s, t)
    h = torch.rand(1000)
    u = h * s + (1 - h) * t
    seen = []
    fm.psd_term(lambda x, a, b: seen.append((a, b)) or torch.zeros_like(x), torch.zeros(1000, 2), s, t, h)
    assert torch.equal(seen[0][1], u) and (s <= u).all() and (u <= t).all()


# -------------------------------------------------------------------------------- item 9: stop-gradients
def grads(net, L):
    net.zero_grad()
    L.backward(retain_graph=True)
    return torch.cat([p.grad.reshape(-1) for p in net.parameters()])


def batch64(n=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=F64)
    s, t = 0.1 + 0.3 * torch.rand(n, generator=g, dtype=F64), 0.5 + 0.4 * torch.rand(n, generator=g, dtype=F64)
    return x, s, t, torch.randn(n, 2, generator=g, dtype=F64)


def test_09_lsd_gradient_only_through_dX_dt():
    net = mlp()
    phi = fm.net_phi(net, 0.5)
    x, s, t, _ = batch64()
    b = lambda tq, y: phi(y, tq, tq)
    g = grads(net, fm.lsd_term(phi, b, x, s, t).sum())
    X, dX = fm.jvp(lambda tq: fm.flow_map(phi, x, s, tq), (t,), (torch.ones_like(t),))
    target = phi(X, t, t)
    ref = grads(net, (dX - target.detach()).square().sum())
    leak = grads(net, (dX - target).square().sum())  # the target not stopped: a different gradient
    assert torch.allclose(g, ref, rtol=1e-10, atol=1e-12) and (leak - ref).norm() > 1e-3 * ref.norm()


def test_09_psd_meanflow_emd_gradient_only_through_phi_s_t():
    net = mlp()
    phi = fm.net_phi(net, 0.5)
    x, s, t, v = batch64()
    h = torch.full_like(s, 0.3)
    u = h * s + (1 - h) * t
    with torch.no_grad():  # the targets written out independently (finite differences for the derivative)
        c_psd = (1 - h)[:, None] * phi(x, s, u) + h[:, None] * phi(fm.flow_map(phi, x, s, u), u, t)
        D = central(lambda e: phi(x + e * v, s + e, t), 1e-5)
        c_mf = v + (t - s)[:, None] * D
    ref = lambda c: grads(net, (phi(x, s, t) - c).square().sum())
    assert rel(grads(net, fm.psd_term(phi, x, s, t, h).sum()), ref(c_psd)) < 1e-10
    assert rel(grads(net, fm.meanflow_term(phi, x, s, t, v).sum()), ref(c_mf)) < 1e-7


def test_09_esd_full_and_convex_stop_gradients():
    net = mlp()
    phi = fm.net_phi(net, 0.5)
    x, s, t, _ = batch64()
    with torch.no_grad():
        b_hat = phi(x, s, s)
        c = central(lambda e: fm.flow_map(phi, x + e * b_hat, s, t), 1e-5)  # grad X . b^, detached
    _, dXds = fm.jvp(lambda sq: fm.flow_map(phi, x, sq, t), (s,), (torch.ones_like(s),))
    ref = grads(net, (dXds + c).square().sum())
    full = grads(net, fm.esd_term(phi, x, s, t, "full").sum())
    convex = grads(net, fm.esd_term(phi, x, s, t, "convex").sum())
    assert rel(full, ref) < 1e-7 and rel(convex, ref) > 1e-3


# ---------------------------------------------------------------------------------------- item 10: weights
def test_10_weights():
    l = torch.tensor([0.5, 2.0, 1e-4], dtype=F64, requires_grad=True)
    fm.adaptive_weight(l, 0.75, 1e-3).sum().backward()
    assert torch.allclose(l.grad, 1 / (l.detach() + 1e-3) ** 0.75, rtol=1e-12)
    w = torch.log(l.detach()).requires_grad_()
    fm.learned_weight(l.detach(), w).sum().backward()
    assert w.grad.abs().max() < 1e-12  # d/dw (exp(-w) l + w) = 0 at w = log l
    # the zero-initialised head reproduces the unweighted loss and its gradient reaches the head
    cfg = cfg_for(learned_weight=True)
    net, head = mlp(dtype=torch.float32), C.WeightHead(num_times=2, channels=128)
    x0, x1 = torch.randn(16, 2), torch.randn(16, 2)
    s, t, nd = fm.sample_times(16, cfg, CPU)
    lw, l0 = fm.per_sample_loss(net, head, None, x0, x1, s, t, nd, cfg, env1())
    assert torch.allclose(lw, l0) and lw.shape == (16,)
    lw.mean().backward()
    assert head.linear.weight.grad.abs().sum() > 0


def test_10_per_sample_loss_assembles_the_terms():
    """The training loss is the diagonal term on the first n_d rows and the mode's term on the rest, reduced
    by the mean; checked for lsd against the pure functions, and meanflow/emd are adaptively weighted."""
    net = mlp(dtype=torch.float32, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(8, 2, generator=g), torch.randn(8, 2, generator=g)
    cfg = cfg_for(sigma0=0.5)
    s, t, nd = fm.sample_times(8, cfg, CPU)
    lw, l = fm.per_sample_loss(net, None, None, x0, x1, s, t, nd, cfg, env1())
    phi = fm.net_phi(net, 0.5)
    Id, dId = fm.interpolate(x0[:nd], x1[:nd], t[:nd])
    Io, _ = fm.interpolate(x0[nd:], x1[nd:], s[nd:])
    want = torch.cat([fm.diagonal_term(phi, Id, dId, t[:nd]),
                      fm.lsd_term(phi, lambda a, y: phi(y, a, a), Io, s[nd:], t[nd:])])
    assert torch.allclose(lw, want, rtol=1e-5, atol=1e-7) and torch.equal(lw.detach(), l)
    cfg = cfg_for("meanflow", sigma0=0.5)
    s, t, _ = fm.sample_times(8, cfg, CPU)
    lw, l = fm.per_sample_loss(net, None, None, x0, x1, s, t, 0, cfg, env1())
    assert torch.allclose(lw, l / (l + 1e-3) ** 0.75)


def test_10_lmd_emd_use_the_teacher_on_the_diagonal():
    o = Oracle()
    phi32 = lambda x, s, t: o.phi(x.double(), s.double(), t.double()).float()

    class OracleNet(torch.nn.Module):  # F(x/sigma0; s, Delta) = phi*/sigma0 with sigma0 = 1
        def forward(self, x, s, d):
            return phi32(x, s, s + d)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 2, generator=g)
    x1 = (MU + torch.randn(64, 2, generator=g, dtype=F64) @ A.T).float()
    bT = fm.rf_velocity(lambda y, tau: o.v_rf(y.double(), tau.double()).float())
    for mode in ("lmd", "emd"):
        cfg = cfg_for(mode, sigma0=1.0)
        s, t, nd = fm.sample_times(64, cfg, CPU)
        _, l = fm.per_sample_loss(OracleNet(), None, bT, x0, x1, s, t, nd, cfg, env1())
        assert nd == 16 and l.max() < 1e-6, (mode, l.max())  # the oracle is the teacher's exact flow map


# -------------------------------------------------------------------------------------- item 11: sampler
def test_10_train_noise_loss_mean_and_lr_schedule(monkeypatch, tmp_path):
    """The training loop's noise x0 ~ N(0, sigma0^2 I) apart from the data, the logged loss the batch mean of the
    per-sample weighted losses (Boffi losses.py setup_loss), and lr_at's warm-up, cosine and sqrt decays."""
    seen, orig = [], fm.per_sample_loss

    def spy(net, head, teacher_b, x0, x1, s, t, nd, cfg, *a, **k):
        out = orig(net, head, teacher_b, x0, x1, s, t, nd, cfg, *a, **k)
        seen.append((x0.clone(), x1.clone(), cfg.sigma0, out[0].detach().mean().item()))
        return out
    monkeypatch.setattr(fm, "per_sample_loss", spy)
    out = tmp_path / "o"
    fm.main(["--iters", "1", "--batch", "256", "--eval_n", "32", "--eval_steps", "1", "--log_every", "1",
             "--out", str(out)])
    (x0, x1, s0, mean), = seen
    assert s0 == 0.5 and abs(x0.std().item() / s0 - 1) < 0.15 and abs(x0.mean().item()) < 0.1
    assert abs(torch.corrcoef(torch.stack([x0.flatten(), x1.flatten()]))[0, 1]) < 0.2
    logged = json.loads((out / "log.jsonl").read_text().splitlines()[0])["loss"]
    assert math.isclose(logged, mean, rel_tol=1e-5)
    cfg = lambda **k: fm.Config(**{"lr": 1.0, "iters": 100, **k})
    assert [fm.lr_at(cfg(warmup=4), i) for i in (0, 1, 3, 4, 50)] == [0.0, 0.25, 0.75, 1.0, 1.0]  # from 0
    assert fm.lr_at(cfg(), 0) == 1.0 and fm.lr_at(cfg(lr_schedule="cosine"), 50) == 0.5
    assert [fm.lr_at(cfg(lr_schedule="sqrt", lr_ref=10), i) for i in (0, 10, 40)] == [1.0, 1.0, 0.5]


class Recorder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.calls = []
        self.config = C.net_config("mlp", num_times=2)

    def forward(self, x, s, d):
        self.calls.append((s[0].item(), (s + d)[0].item()))
        return torch.zeros_like(x)


@pytest.mark.parametrize("sampler", ["map", "ode"])
@pytest.mark.parametrize("N", [1, 2, 4, 8])
def test_11_sampler_grid(N, sampler):
    """map: X_{k/N, (k+1)/N} on the uniform grid; ode (the diagnostic): Euler on the diagonal phi(x, k/N, k/N)."""
    net = Recorder()
    cfg = cfg_for(sampler=sampler)
    fm.sample(net, C.IndexRNG(range(3), 0, CPU), (2,), N, cfg, env1())
    assert len(net.calls) == N
    end = (lambda k: (k + 1) / N) if sampler == "map" else (lambda k: k / N)
    assert all(abs(a - k / N) < 1e-7 and abs(b - end(k)) < 1e-7 for k, (a, b) in enumerate(net.calls))


class OracleNet64(torch.nn.Module):
    def __init__(self, o):
        super().__init__()
        self.o = o

    def forward(self, x, s, d):
        return self.o.phi(x * self.o.s0, s.double(), (s + d).double()) / self.o.s0


def test_11_sampler_composes_the_exact_map():
    o = Oracle()
    net = OracleNet64(o)
    cfg = cfg_for()
    x0 = C.IndexRNG(range(50), 0, CPU).randn(50, 2).double()
    ref = o.X(x0, torch.zeros(50, dtype=F64), torch.ones(50, dtype=F64))
    for N in (1, 2, 4, 8):
        phi = fm.net_phi(net, 1.0)
        x = x0
        for k in range(N):
            x = fm.flow_map(phi, x, torch.full((50,), k / N, dtype=F64), torch.full((50,), (k + 1) / N, dtype=F64))
        assert (x - ref).abs().max() < 1e-10
    # the 1-step pushforward of noise has the target's moments
    rng = C.IndexRNG(range(100_000), 0, CPU)
    x = fm.sample(net, rng, (2,), 1, cfg, env1()).double()
    assert (x.mean(0) - MU).abs().max() < 0.01 and (torch.cov(x.T) - SIGMA).abs().max() < 0.01


def test_11_samples_do_not_depend_on_batch_size():
    net = mlp(dtype=torch.float32).eval()
    cfg = cfg_for(sigma0=0.5)
    a = fm.sample(net, C.IndexRNG(range(10), 7, CPU), (2,), 4, cfg, env1())
    b = torch.cat([fm.sample(net, C.IndexRNG(range(i, min(i + 3, 10)), 7, CPU), (2,), 4, cfg, env1())
                   for i in range(0, 10, 3)])
    assert torch.allclose(a, b, atol=1e-6)


# ================================================================================ CLI (tiny), item 12
cli = functools.partial(run, FM)  # its command line in a subprocess (one OpenMP thread)


def write_rf_checkpoint(path, net_cfg, **over):
    """A checkpoint in rectified_flow.py's format (its layout, method, convention, EMA key and config fields)."""
    torch.manual_seed(0)
    net = C.build_net(net_cfg)
    with torch.no_grad():  # a non-zero velocity (a fresh network returns exactly 0)
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sd = net.state_dict()
    ck = dict(model=sd, ema=sd, opt={}, step=0, config=dict(noise_std=1.0, t_eps=0.0, stage="1rf"), net=net_cfg,
              method="rectified_flow", convention="x_t=(1-t)x+t*z, v=z-x, t=1 noise", rng={"world": 1, "ranks": []})
    ck.update(over)
    torch.save(ck, path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`python flow_map.py --preset tiny --data imgs.npy` (LSD, learned weight) in a subprocess, plus a 16x16
    rectified-flow checkpoint for the distillation modes."""
    root = tmp_path_factory.mktemp("fm_cli")
    np.save(root / "imgs.npy", np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    p = cli("--preset", "tiny", "--data", "imgs.npy", "--out", "run", cwd=root)
    assert_ok(p)
    (root / "train.out").write_text(p.stdout)
    rf = C.net_config("tiny", img_resolution=16, in_channels=3, time_scale=1000.0)
    write_rf_checkpoint(root / "rf.pt", rf)
    return root


def test_cli_tiny_train(tiny):
    run = tiny / "run"
    for f in ("ckpt.pt", "log.jsonl", "config.json", "samples.png", "metrics.jsonl"):
        assert (run / f).is_file(), f
    ck = torch.load(run / "ckpt.pt", weights_only=True)
    assert set(ck) == {"model", "ema", "opt", "scaler", "step", "config", "net", "method", "convention", "rng",
                       "weight_head", "teacher_id"} and ck["teacher_id"] is None  # no teacher
    assert ck["method"] == "flow_map" and ck["step"] == 3
    assert ck["convention"] == ("flow map: I_t=alpha_t*x0+beta_t*x1 (linear), x0~N(0,0.5^2), t=0 noise, t=1 data; "
                                "X(s,t,x)=x+(t-s)*phi(s,t-s,x)")
    cfg = ck["config"]
    assert (cfg["mode"], cfg["sigma0"], cfg["diag_frac"], cfg["learned_weight"], cfg["interpolant"]) == \
        ("lsd", 0.5, 0.75, True, "linear")
    nd = ck["net"]
    assert nd["kind"] == "unet" and nd["num_times"] == 2 and nd["time_scale"] == 1.0 and nd["dropout"] == 0.1
    assert set(ck["weight_head"]) == {"linear.weight", "linear.bias"}
    assert ck["weight_head"]["linear.weight"].abs().sum() > 0  # the head trained
    net = C.build_net(nd)
    C.load_state_strict(net, ck["ema"])
    logs = [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in logs for k in ("loss", "loss_diag", "loss_off"))
    assert "global batch 8 = 1 x 8 x 1" in (tiny / "train.out").read_text()
    assert "diagonal rows 6/8" in (tiny / "train.out").read_text()


@pytest.mark.parametrize("mode", ["psd", "esd", "meanflow", "fmm", "lmd", "emd"])
def test_tiny_every_mode_runs(tiny, tmp_path, mode):
    """Every JVP path through the U-Net (attention, dropout on) for a few steps; finite and logged."""
    extra = ["--teacher", str(tiny / "rf.pt")] if mode in ("lmd", "emd") else []
    if mode == "esd":
        extra = ["--esd_stopgrad", "convex"]
    fm.main(["--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--mode", mode, "--out", str(tmp_path / mode),
             "--eval_steps", "1", *extra])
    ck = torch.load(tmp_path / mode / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["config"]["mode"] == mode
    assert ck["config"]["sigma0"] == (1.0 if mode in ("meanflow", "lmd", "emd") else 0.5)
    assert ck["config"]["diag_frac"] == (0.25 if mode in ("lmd", "emd") else 0.75)
    assert ("weight_head" in ck) == (mode not in ("meanflow", "emd"))
    assert any(not torch.equal(ck["model"][k], v) for k, v in ck["ema"].items())
    logs = [json.loads(ln) for ln in (tmp_path / mode / "log.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in logs)


def test_cli_tiny_sample_and_fid(tiny):
    p = cli("sample", "--ckpt", "run/ckpt.pt", "--steps", "1,2,4,8", "--n", "6", "--out", "s.npy", cwd=tiny)
    assert_ok(p)
    for N in (1, 2, 4, 8):
        a = np.load(tiny / f"s_{N}step.npy")
        assert a.shape == (6, 16, 16, 3) and a.dtype == np.uint8
    p = cli("fid", "--ckpt", "run/ckpt.pt", "--steps", "1,2", "--n", "16", "--fid_detector", standin_path(),
            "--root", "data", cwd=tiny)
    assert_ok(p)
    recs = [json.loads(ln) for ln in (tiny / "run" / "fid.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in recs] == [1, 2] and all(math.isfinite(r["fid"]) and r["fid"] > 0 for r in recs)


def test_12_bad_inputs(tiny, capsys):
    rf2d = C.net_config("mlp", time_scale=1000.0)
    write_rf_checkpoint(tiny / "rf2d.pt", rf2d)
    write_rf_checkpoint(tiny / "wrongconv.pt", C.net_config("tiny", img_resolution=16, in_channels=3),
                        convention="x_t=t x+(1-t) z")
    (tiny / "garbage.pt").write_bytes(b"not a checkpoint")
    before = sha(tiny / "run" / "ckpt.pt")
    base = ["--preset", "tiny", "--data", "imgs.npy"]
    p = cli(*base, "--mode", "lmd", "--teacher", "missing.pt", "--out", "bad0", cwd=tiny)
    refused(p, "missing.pt")
    cases = [
        ([*base, "--mode", "lmd", "--out", "bad1"], ["--teacher"]),
        ([*base, "--mode", "emd", "--teacher", "garbage.pt", "--out", "bad2"], ["garbage.pt"]),
        ([*base, "--mode", "lmd", "--teacher", "wrongconv.pt", "--out", "bad3"], ["convention"]),
        ([*base, "--mode", "lmd", "--teacher", "rf2d.pt", "--out", "bad4"], ["shape"]),
        ([*base, "--mode", "lmd", "--teacher", "rf.pt", "--sigma0", "0.5", "--out", "bad5"], ["noise std"]),
        ([*base, "--mode", "meanflow", "--interpolant", "trig", "--out", "bad6"], ["trig"]),
        ([*base, "--mode", "lmd", "--teacher", "rf.pt", "--interpolant", "trig", "--out", "bad7"], ["trig"]),
        ([*base, "--mode", "emd", "--teacher", "rf.pt", "--interpolant", "trig", "--out", "bad8"], ["trig"]),
        ([*base, "--teacher", "rf.pt", "--out", "bad9"], ["--teacher"]),
        ([*base, "--mode", "meanflow", "--learned_weight", "--out", "bad10"], ["adaptive"]),
        ([*base, "--mode", "meanflow", "--compile", "--out", "bad10c"], ["JVP", "--compile"]),  # idle: refused
        ([*base, "--batch", "9", "--accum", "2", "--out", "bad11"], ["divisible"]),
        ([*base, "--net", "mlp", "--out", "bad12"], []),
        (["--preset", "tiny", "--out", "bad13"], ["--data"]),
        ([*base, "--mode", "nope"], ["lsd"]),
        ([*base, "--out", "run", "--mode", "psd"], ["--mode lsd"]),  # resuming another mode's run
        (["sample", "--ckpt", "rf.pt"], ["rectified_flow"]),
    ]
    cwd = os.getcwd()
    os.chdir(tiny)
    try:
        for argv, words in cases:
            guarded(capsys, lambda: fm.main(list(argv)), *words)
            out = argv[argv.index("--out") + 1] if "--out" in argv else None
            assert out in (None, "run") or not os.path.exists(os.path.join(out, "ckpt.pt")), argv
    finally:
        os.chdir(cwd)
    assert sha(tiny / "run" / "ckpt.pt") == before


def test_nan_loss_keeps_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    args = ["--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--out", str(tmp_path / "n"), "--ckpt_every", "2"]
    fm.main([*args, "--iters", "2"])
    before = sha(tmp_path / "n" / "ckpt.pt")
    orig = fm.per_sample_loss
    monkeypatch.setattr(fm, "per_sample_loss", lambda *a, **k: tuple(v * float("nan") for v in orig(*a, **k)))
    with pytest.raises(SystemExit) as e:
        C.main_guard(lambda: fm.main([*args, "--iters", "4"]))
    refusal(e.value.code, capsys.readouterr().err, "NaN")
    assert sha(tmp_path / "n" / "ckpt.pt") == before


def assert_same_state(a, b, step):
    ca, cb = (torch.load(p, weights_only=True) for p in (a, b))
    assert ca["step"] == cb["step"] == step
    for k in ("model", "ema", "weight_head"):
        assert ca[k].keys() == cb[k].keys()
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)
    for i, st in ca["opt"]["state"].items():
        for n, v in st.items():
            assert torch.equal(v, cb["opt"]["state"][i][n]), (i, n)


WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
import common as C
import flow_map as fm

save = C.save_checkpoint


def spy(path, ck, env, gens=()):  # every rank keeps its own weights, EMA and weight head next to the checkpoint
    torch.save({{k: ck[k] for k in ("model", "ema", "weight_head") if k in ck}}, f"{{path}}.rank{{env.rank}}")
    return save(path, ck, env, gens)


def runs():
    for mode in ("lsd", "psd", "esd", "fmm", "meanflow", "lmd", "emd"):
        fm.main(sys.argv[1:] + ["--mode", mode, "--out", mode] + ["--teacher", "rf.pt"] * (mode in ("lmd", "emd")))
    C.sync_grads = lambda model, env: None  # the control: meanflow again without the manual all-reduce must split
    fm.main(sys.argv[1:] + ["--mode", "meanflow", "--out", "nosync"])


C.save_checkpoint = spy
C.main_guard(runs)
"""


@pytest.mark.slow
def test_two_ranks_stay_identical_in_every_mode(tiny, tmp_path):
    """torchrun, 2 gloo ranks, the tiny U-Net (dropout, per-rank data, noise and times) in all seven modes: every JVP
    runs on the bare module and the gradients, the weight head's too, are all-reduced by hand (common.sync_grads);
    weights, EMA and head equal on both ranks. Control: meanflow without the all-reduce parts the ranks."""
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
    os.symlink(tiny / "rf.pt", tmp_path / "rf.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "worker.py",
           "--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--root", "data", "--eval_n", "4",
           "--eval_steps", "1"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert p.stdout.count("| world 2 | global batch 8 = 2 x 4 x 1") == 8
    for out in ("lsd", "psd", "esd", "fmm", "meanflow", "lmd", "emd", "nosync"):
        r0, r1 = (torch.load(tmp_path / out / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
        assert ("weight_head" in r0) == (out not in ("meanflow", "emd", "nosync"))
        equal = [torch.equal(r0[k][n], r1[k][n]) for k in r0 for n in r0[k]]
        assert all(equal) if out != "nosync" else not any(equal[:len(r0["model"])]), out
        assert torch.load(tmp_path / out / "ckpt.pt", weights_only=True)["step"] == 3


@pytest.mark.parametrize("mode", ["lsd", "psd"])
def test_resume_after_interruption_bitwise(tiny, tmp_path, monkeypatch, mode):
    """A run killed in step 4 (checkpoint at 2) and restarted ends equal to a clean run: data order, noise, times,
    PSD's h and the dropout masks all come from the restored RNG states."""
    base = ["--preset", "tiny", "--data", str(tiny / "imgs.npy"), "--ckpt_every", "2", "--iters", "6", "--mode", mode,
            "--eval_steps", "1"]
    fm.main([*base, "--out", str(tmp_path / "a")])
    calls, orig = [], fm.per_sample_loss

    def crash(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return orig(*a, **k)
    monkeypatch.setattr(fm, "per_sample_loss", crash)
    with pytest.raises(KeyboardInterrupt):
        fm.main([*base, "--out", str(tmp_path / "b")])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    monkeypatch.setattr(fm, "per_sample_loss", orig)
    fm.main([*base, "--out", str(tmp_path / "b")])
    assert_same_state(tmp_path / "a" / "ckpt.pt", tmp_path / "b" / "ckpt.pt", 6)


def test_a_meanflow_checkpoint_saved_with_compile_samples_and_resumes(tmp_path):
    """--compile is refused for --mode meanflow on the command line (it compiled nothing), but a meanflow run trained
    with it before that refusal keeps compile true in its saved config: sample, fid and a resume merge that config
    and were refused with 'drop it' though no --compile was given. compile is this command line's (resume_config)."""
    out = tmp_path / "mf"
    args = ["--mode", "meanflow", "--batch", "64", "--eval_n", "32", "--eval_steps", "1", "--out", str(out)]
    fm.main([*args, "--iters", "1"])
    ck = torch.load(out / "ckpt.pt", weights_only=False)
    ck["config"]["compile"] = True  # as a run of yesterday's code with --compile saved it
    torch.save(ck, out / "ckpt.pt")
    fm.main(["sample", "--ckpt", str(out / "ckpt.pt"), "--steps", "1", "--n", "8", "--out", str(tmp_path / "s.npy")])
    assert np.load(tmp_path / "s.npy").shape[0] == 8
    fm.main([*args, "--iters", "2"])
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 2


def test_a_resumed_meanflow_run_refuses_compile(tmp_path, capsys):
    """c2df946's refusal of --compile for meanflow sat in Config.check, which parse_cli leaves to resume_config for a
    resumed run, and resume_config checked the checkpoint's compile, then set the command line's unchecked: a resume
    with --compile was accepted (compiling nothing) and saved compile true, which then stopped sample and fid."""
    out = tmp_path / "mf"
    args = ["--mode", "meanflow", "--batch", "64", "--eval_n", "32", "--eval_steps", "1", "--out", str(out)]
    fm.main([*args, "--iters", "1"])
    capsys.readouterr()
    guarded(capsys, lambda: fm.main([*args, "--iters", "2", "--compile"]), "--compile would compile nothing")
    assert torch.load(out / "ckpt.pt", weights_only=False)["step"] == 1
