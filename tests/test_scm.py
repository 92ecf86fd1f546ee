"""scm.py: its invariants (maths, fp64 unless stated) and toy convergence (with
must-fail controls), plus the `tiny` CLI smoke (train every mode, sample, fid, resume, bad input)."""
import contextlib, json, math, os, shutil, subprocess, sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import common as C
import scm
from cli import guarded, refusal
from standin import standin_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SD = 0.5


def cfg_of(**kw):
    return scm.Config(**kw)


def mlp(time_scale=1.0, dropout=0.0, adn=False, seed=0, width=32, depth=2):
    torch.manual_seed(seed)
    d = C.net_config("mlp", width=width, depth=depth, time_channels=16, time_scale=time_scale, dropout=dropout,
                     adn=adn)
    net = C.build_net(d).double()
    with torch.no_grad():  # the zero output layer would make every derivative trivially 0
        net.out_conv.weight.normal_(0, 0.5), net.out_conv.bias.normal_(0, 0.1)
    return net


def unet(time_scale=1.0, seed=0):
    torch.manual_seed(seed)
    d = C.net_config("tiny", img_resolution=8, adn=True, time_scale=time_scale)
    net = C.build_net(d).double()
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.5)
        for n, p in net.named_parameters():  # lift the 1e-5-scaled conv1/proj so every path contributes
            if n.endswith(("conv1.weight", "proj.weight")):
                p.normal_(0, 0.1)
    assert any(isinstance(b, C.Block) and b.attn for b in net.modules())  # attention on 
    return net


class Dirac(nn.Module):
    """Exact TrigFlow field for data = x*: F* = (cos t z - sin t x*)/sigma_d, z = (x_t - cos t x*)/sin t."""

    def __init__(self, xstar):
        super().__init__()
        self.register_buffer("xstar", xstar)

    def forward(self, u, t):
        t = t.reshape(-1, *[1] * (u.ndim - 1))
        z = (SD * u - torch.cos(t) * self.xstar) / torch.sin(t)
        return (torch.cos(t) * z - torch.sin(t) * self.xstar) / SD


class GaussOracle(nn.Module):
    """Exact CM field for x0 ~ N(0, sigma_d^2 I): F*(u, t) = -tan(t/2) u, so f(x_t, t) = x_t."""

    def __init__(self):
        super().__init__()
        self.register_buffer("one", torch.ones((), dtype=torch.float64))

    def forward(self, u, t):
        return -torch.tan(t / 2).reshape(-1, *[1] * (u.ndim - 1)) * u * self.one


class Zero(nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.register_buffer("one", torch.ones((), dtype=dtype))

    def forward(self, u, t):
        return torch.zeros_like(u) * self.one


# ============================================================================ interpolant, proposal
def test_interpolant_ends_and_velocity():
    g = torch.Generator().manual_seed(0)
    x0, z = torch.randn(5, 2, generator=g, dtype=torch.float64), torch.randn(5, 2, generator=g, dtype=torch.float64)
    assert torch.equal(scm.interpolate(x0, z, torch.zeros(5, dtype=torch.float64)), x0)
    assert (scm.interpolate(x0, z, torch.full((5,), math.pi / 2, dtype=torch.float64)) - z).abs().max() < 1e-15
    t, h = torch.tensor([0.1, 0.5, 0.9, 1.3, 1.5], dtype=torch.float64), 1e-6
    fd = (scm.interpolate(x0, z, t + h) - scm.interpolate(x0, z, t - h)) / (2 * h)
    v = scm.velocity(x0, z, t)
    assert ((fd - v).norm() / v.norm()) < 1e-8


def test_proposal_is_lognormal_in_sigma():
    torch.manual_seed(0)
    for pm, ps in [(-1.0, 1.4), (-1.2, 1.2)]:
        t = scm.sample_t(100_000, pm, ps, SD, "cpu").double()
        assert (t > 0).all() and (t < math.pi / 2).all()
        ls = torch.log(SD * torch.tan(t))
        assert abs(ls.mean() - pm) < 0.02 and abs(ls.std() - ps) < 0.02
    t = scm.sample_t(200_000, -1.0, 1.4, SD, "cpu")  # sCM Sec. 4 log-normal proposal: median ~0.63, P(t > 1.1) ~0.24
    assert abs(t.median() - 0.63) < 0.01 and abs((t > 1.1).float().mean() - 0.24) < 0.01


# ============================================================================ boundary, Dirac oracle
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_is_exact(dtype):
    net = mlp().to(dtype)
    x = torch.randn(16, 2, dtype=dtype)
    assert torch.equal(scm.consistency_fn(net, x, torch.zeros(16, dtype=dtype), SD), x)
    assert not torch.equal(scm.consistency_fn(net, x, torch.full((16,), 1e-3, dtype=dtype), SD), x)  # control


def test_dirac_oracle_consistency_ddim_heun():
    g = torch.Generator().manual_seed(1)
    xstar = torch.randn(1, 2, generator=g, dtype=torch.float64)
    z = SD * torch.randn(64, 2, generator=g, dtype=torch.float64)
    net = Dirac(xstar)
    t = torch.rand(64, generator=g, dtype=torch.float64) * 1.5 + 0.05
    x_t = scm.interpolate(xstar.expand(64, 2), z, t)
    assert (scm.consistency_fn(net, x_t, t, SD) - xstar).abs().max() < 1e-12
    s = t * torch.rand(64, generator=g, dtype=torch.float64)
    want = scm.interpolate(xstar.expand(64, 2), z, s)
    assert (scm.ddim_step(net, x_t, t, s, SD) - want).abs().max() < 1e-12
    env = C.setup("cpu", 0, "fp32")
    x = scm.heun_sample(net, C.IndexRNG(range(32), 0, "cpu"), (2,), 18, cfg_of(), env)
    assert x.dtype == torch.float64 and (x - xstar).abs().max() < 1e-10
    wrong = Dirac(xstar + 0.1)  # control: another point is not recovered
    assert (scm.heun_sample(wrong, C.IndexRNG(range(32), 0, "cpu"), (2,), 18, cfg_of(), env) - xstar).abs().max() > 0.05


class GaussField(nn.Module):
    """TrigFlow F of the exact denoiser of N(0, s^2 I) data, D(x; sigma) = s^2 / (s^2 + sigma^2) x (s != sigma_d)."""

    def __init__(self, s):
        super().__init__()
        self.s = s
        self.register_buffer("one", torch.ones((), dtype=torch.float64))

    def forward(self, u, t):
        c, sn = torch.cos(t)[:, None], torch.sin(t)[:, None]
        x_t, sigma = SD * u, SD * sn / c
        D = self.s ** 2 / (self.s ** 2 + sigma ** 2) * (x_t / c)
        return (c * x_t - D) / (sn * SD) * self.one


def test_heun_is_edms_sampler():
    """The diffusion model's Heun (in TrigFlow's variables) is EDM's Alg. 2, the trapezoidal correction included: on a
    Gaussian whose trajectories curve (the Dirac test's last Euler step lands on x* whatever came before), it equals
    common.edm_heun (checked against EDM's own sampler in test_edm) given the same denoiser and latents."""
    s, env = 0.7, C.setup("cpu", 0, "fp32")
    x = scm.heun_sample(GaussField(s), C.IndexRNG(range(64), 0, "cpu"), (2,), 18, cfg_of(), env)
    latents = C.IndexRNG(range(64), 0, "cpu").randn(64, 2).double()
    want = C.edm_heun(lambda y, sigma, labels=None: s ** 2 / (s ** 2 + sigma ** 2) * y, latents)
    assert (x - want).abs().max() < 1e-9
    other = C.edm_heun(lambda y, sigma, labels=None: s ** 2 / (s ** 2 + sigma ** 2) * y, latents, num_steps=17)
    assert (x - other).abs().max() > 1e-4  # control: 1e-9 tells samplers apart (here: one step fewer)


# ============================================================================ JVP convention
def _fd_dF(net, x0, z, t, h=1e-6):
    F = lambda s: net(scm.interpolate(x0, z, s) / SD, s)
    return (F(t + h) - F(t - h)) / (2 * h)


@pytest.mark.parametrize("kind", ["mlp", "unet"])
@pytest.mark.parametrize("time_scale", [1.0, 10.0])
def test_jvp_matches_central_difference(kind, time_scale):
    net = mlp(time_scale) if kind == "mlp" else unet(time_scale)
    shape = (2,) if kind == "mlp" else (3, 8, 8)
    g = torch.Generator().manual_seed(2)
    x0 = 0.5 * torch.randn(4, *shape, generator=g, dtype=torch.float64)
    z = SD * torch.randn(4, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.6, 1.2, 1.55], dtype=torch.float64)
    x_t, dxdt = scm.interpolate(x0, z, t), scm.velocity(x0, z, t)
    with torch.no_grad():
        F, J = scm.jvp_F(net, x_t, t, dxdt, SD)
        fd = _fd_dF(net, x0, z, t)
    cs = scm._col(torch.cos(t) * torch.sin(t), x0)
    want = SD * cs * fd
    for i in range(4):  # per sample: relative error < 1e-6
        assert ((J[i] - want[i]).norm() / want[i].norm()) < 1e-6, (i, t[i])
    assert torch.allclose(F, net(x_t / SD, t), rtol=0, atol=1e-14)
    # the other convention (tangents divided by sigma_d) yields J / sigma_d: not the one the sCM gradient (Eq. 8)
    # expects
    _, J2 = torch.func.jvp(lambda u, s: net(u, s), (x_t / SD, t), (cs * dxdt / SD, torch.cos(t) * torch.sin(t)))
    assert torch.allclose(J2, J / SD, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(J2, J, rtol=1e-3)


# ============================================================================ assembly
def _fd_f(net, path, t, h=1e-6):
    f = lambda s: scm.consistency_fn(net, path(s), s, SD)
    return (f(t + h) - f(t - h)) / (2 * h)


def test_assembly_sct_equals_cos_t_df_dt():
    net = mlp(seed=3)
    g = torch.Generator().manual_seed(3)
    x0, z = 0.5 * torch.randn(6, 2, generator=g, dtype=torch.float64), SD * torch.randn(6, 2, generator=g,
                                                                                         dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.6, 0.9, 1.2, 1.5], dtype=torch.float64)
    with torch.no_grad():
        _, g_raw = scm.tangent(net, scm.interpolate(x0, z, t), t, scm.velocity(x0, z, t), 1.0, SD)
        want = scm._col(torch.cos(t), x0) * _fd_f(net, lambda s: scm.interpolate(x0, z, s), t)
        _, g_half = scm.tangent(net, scm.interpolate(x0, z, t), t, scm.velocity(x0, z, t), 0.5, SD)
    assert ((g_raw - want).norm() / want.norm()) < 1e-6
    assert ((g_half - want).norm() / want.norm()) > 1e-2  # control: warm-up r < 1 is not the full tangent


def test_assembly_scd_with_dirac_teacher():
    net = mlp(seed=4)
    g = torch.Generator().manual_seed(4)
    xstar = torch.randn(1, 2, generator=g, dtype=torch.float64)
    z = SD * torch.randn(5, 2, generator=g, dtype=torch.float64)
    teacher = Dirac(xstar)
    t = torch.tensor([0.1, 0.5, 0.8, 1.1, 1.4], dtype=torch.float64)
    path = lambda s: scm.interpolate(xstar.expand(5, 2), z, s)  # the teacher's exact ODE path
    x_t = path(t)
    with torch.no_grad():
        dxdt = SD * scm.F_net(teacher, x_t, t, SD)  # sCD velocity (sCM Sec. 3.2)
        assert torch.allclose(dxdt, scm.velocity(xstar.expand(5, 2), z, t), atol=1e-12)
        _, g_raw = scm.tangent(net, x_t, t, dxdt, 1.0, SD)
        want = scm._col(torch.cos(t), x_t) * _fd_f(net, path, t)
    assert ((g_raw - want).norm() / want.norm()) < 1e-6


# ============================================================================ warm-up, normalisation
def test_warmup_schedule_and_r0_ignores_jvp(monkeypatch):
    assert [scm.warmup_r(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert scm.warmup_r(0, 0) == 1.0  # H = 0: no warm-up
    net = mlp(seed=5)
    x = torch.randn(8, 2, dtype=torch.float64)
    t, v = torch.rand(8, dtype=torch.float64) + 0.2, torch.randn(8, 2, dtype=torch.float64)
    real = torch.func.jvp
    with torch.no_grad():
        base0, base1 = scm.tangent(net, x, t, v, 0.0, SD)[1], scm.tangent(net, x, t, v, 1.0, SD)[1]
        monkeypatch.setattr(torch.func, "jvp", lambda *a: (lambda F, J: (F, J + 123.0))(*real(*a)))
        pert0, pert1 = scm.tangent(net, x, t, v, 0.0, SD)[1], scm.tangent(net, x, t, v, 1.0, SD)[1]
    assert torch.equal(base0, pert0)  # exactly: at r = 0 the JVP term is gone
    assert not torch.allclose(base1, pert1)  # control: at r = 1 it is not


def test_train_lr_ramp_ema_images_and_noise(monkeypatch, tmp_path, capsys):
    """train()'s schedules read the images seen before each step, as EDM's training_loop.py (cur_nimg): the lr ramp
    lr min(1, n_img / (1000 lr_ramp_kimg)) (0 at the first step; the cosine decay on top) and the EMA's n_img
    (its ramp h = min(H, rho n_img)); the diffusion loss sees z ~ N(0, sigma_d^2 I) apart from the data."""
    lrs, imgs, seen = [], [], []
    step, update, vel = C.Guard.step, C.EMA.update, scm.velocity
    monkeypatch.setattr(C.Guard, "step", lambda g, opt, *a, **k: (lrs.append(opt.param_groups[0]["lr"]),
                                                                  step(g, opt, *a, **k))[1])
    monkeypatch.setattr(C.EMA, "update", lambda e, m, n, b: (imgs.append((n, b)), update(e, m, n, b))[1])
    monkeypatch.setattr(scm, "velocity", lambda x0, z, t: (seen.append((x0, z)), vel(x0, z, t))[1])
    scm.main(["--mode", "diffusion", "--batch", "256", "--width", "16", "--depth", "1", "--heun_steps", "1",
              "--eval_n", "16", "--iters", "4", "--lr", "0.1", "--lr_ramp_kimg", "0.512", "--lr_schedule", "cosine",
              "--out", str(tmp_path / "o")])
    start = capsys.readouterr().out.splitlines()[0]  # the diffusion teacher has no JVP to describe
    assert start.startswith("scm diffusion |") and "JVP" not in start
    cos = [0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(4)]
    assert lrs == pytest.approx([0.1 * min(1, k / 2) * cos[k] for k in range(4)], rel=1e-12, abs=1e-15)
    assert imgs == [(256 * k, 256) for k in range(4)]
    x0, z = seen[0]
    assert abs(z.std().item() / 0.5 - 1) < 0.15  # sigma_d = 0.5
    assert abs(torch.corrcoef(torch.stack([x0.flatten(), z.flatten()]))[0, 1]) < 0.2


def test_normalisation_bounds():
    g = torch.Generator().manual_seed(6)
    gr = torch.randn(32, 3, 4, 4, generator=g, dtype=torch.float64)
    n = lambda a: a.flatten(1).norm(dim=1)
    assert (n(scm.normalise(gr, 0.1)) < 1).all()
    assert (n(scm.normalise(gr * 1e6, 0.1)) > 1 - 1e-6).all()
    tiny = gr / n(gr)[:, None, None, None] * 1e-4
    assert torch.allclose(scm.normalise(tiny, 0.1), tiny / 0.1, rtol=1e-3)
    D = 48
    want = gr / (n(gr)[:, None, None, None] / math.sqrt(D) + 0.1)
    assert torch.allclose(scm.normalise(gr, 0.1, "rms"), want, rtol=1e-12)
    assert not torch.allclose(scm.normalise(gr, 0.1, "l2"), want)  # the two norms differ 


# ============================================================================ stop-gradient, weighting, dropout
def test_gradient_is_app_e_form_and_loss_value():
    torch.manual_seed(7)
    net = mlp(seed=7)
    head = C.WeightHead(1, 128, 1.0).double()
    with torch.no_grad():
        head.linear.weight.normal_(0, 0.3)
    student = scm.Student(net, head)
    x0 = 0.5 * torch.randn(16, 2, dtype=torch.float64)
    z = SD * torch.randn(16, 2, dtype=torch.float64)
    t = scm.sample_t(16, -1.0, 1.4, SD, "cpu").double()
    x_t = scm.interpolate(x0, z, t)
    with torch.no_grad():
        F_minus, g_raw = scm.tangent(net, x_t, t, scm.velocity(x0, z, t), 1.0, SD)
        g = scm.normalise(g_raw)
    assert F_minus.grad_fn is None and g_raw.grad_fn is None
    assert all(p.grad is None for p in net.parameters())  # the JVP pass touched no .grad
    F, w = student(x_t / SD, t)
    L = scm.cm_loss(F, g, w)
    D = 2
    assert abs(L.item() - (torch.exp(w) * g.square().sum(1) / D - w).mean().item()) < 1e-12
    L.backward()
    got = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    F2 = net(x_t / SD, t)  # sCM App. E: grad_theta = mean[-2 e^w / D g^T dF/dtheta]
    surrogate = (-2 * torch.exp(w.detach()) / D * (g * F2).sum(1)).mean()
    want = torch.autograd.grad(surrogate, list(net.parameters()))
    for a, b in zip(got, want):
        assert (a - b).abs().max() < 1e-10
    # control: a target built from F without detach has zero gradient on theta's residual -> differs
    net.zero_grad()
    F3, w3 = student(x_t / SD, t)
    L_bad = (torch.exp(w3) / D * (F3 - F3 - g).square().sum(1) - w3).mean()
    L_bad.backward()
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in net.parameters())


def test_teacher_gets_no_gradient():
    env = C.setup("cpu", 0, "fp32")
    net, teacher = mlp(seed=8).float(), mlp(seed=9).float().eval().requires_grad_(False)
    student = scm.Student(net, C.WeightHead(1, 128, 1.0))
    x0, z = 0.5 * torch.randn(8, 2), SD * torch.randn(8, 2)
    t = scm.sample_t(8, -1.0, 1.4, SD, "cpu")
    L, _ = scm.cm_step_loss(student, net, teacher, x0, z, t, 1.0, cfg_of(), env)
    L.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_weighting_optimum_and_zero_init():
    head = C.WeightHead(1, 128, 1.0)
    assert torch.equal(head(torch.rand(5)), torch.zeros(5))
    D, R = 3072, 0.7  # R = ||g||^2 for a fixed residual: L(w) = e^w R / D - w, so dL/dw = 0 at w = log(D/R)
    for w0, sign in [(math.log(D / R), 0), (math.log(D / R) + 0.5, 1), (math.log(D / R) - 0.5, -1)]:
        w = torch.tensor([w0], dtype=torch.float64, requires_grad=True)
        g = torch.full((1, D), math.sqrt(R / D), dtype=torch.float64)
        F = torch.zeros(1, D, dtype=torch.float64)
        scm.cm_loss(F, g, w).backward()
        assert (abs(w.grad.item()) < 1e-12) if sign == 0 else (math.copysign(1, w.grad.item()) == sign)


def test_diffusion_loss_with_the_learned_weight():
    """(EDM2's form, sCM Eq. 4 with w_phi) E[e^w term - w]: its value, and its minimum over w at w = -log(term)."""
    g = torch.Generator().manual_seed(0)
    F, v = (torch.randn(6, 3, generator=g, dtype=torch.float64) for _ in range(2))
    term = (SD * F - v).square().mean(1)
    w = (-term.log()).requires_grad_(True)
    L = scm.diffusion_loss(F, v, SD, w)
    assert torch.allclose(L, (torch.exp(w) * term - w).mean(), rtol=1e-12)
    (gw,) = torch.autograd.grad(L, w)
    assert gw.abs().max() < 1e-12
    assert torch.allclose(scm.diffusion_loss(F, v, SD), term.mean(), rtol=1e-12)  # without w: Eq. 4 itself


class Recorder(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net, self.out = net, None

    def forward(self, u, t):
        self.out = self.net(u, t)
        return self.out, torch.zeros_like(t)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_dropout_mask_shared_between_jvp_and_grad_pass(monkeypatch, precision):
    """fp32: bit for bit. bf16 (CPU autocast for the gradient pass, the JVP pass stays fp32): equal up to bf16
    rounding with the shared mask, far apart without it."""
    env = C.setup("cpu", 0, precision)
    net = C.build_net(C.net_config("mlp", width=64, depth=2, time_channels=16, dropout=0.5)).train()
    with torch.no_grad():  # lift the zero/1e-5 init of the layers after the dropout so the masks matter
        net.out_conv.weight.normal_(0, 0.5)
        for b in net.blocks:
            b.conv1.weight.normal_(0, 0.3)
    x0, z = 0.5 * torch.randn(32, 2), SD * torch.randn(32, 2)
    t = scm.sample_t(32, -1.0, 1.4, SD, "cpu")
    seen = {}
    real = scm.tangent
    monkeypatch.setattr(scm, "tangent", lambda *a: seen.setdefault("F", real(*a)))

    def run():
        rec = Recorder(net)
        scm.cm_step_loss(rec, net, None, x0, z, t, 1.0, cfg_of(weighting="none"), env)
        return seen.pop("F")[0], rec.out
    rel = lambda a, b: ((a - b.detach().float()).norm() / a.norm()).item()
    F_jvp, F_grad = run()
    if precision == "fp32":
        assert torch.equal(F_jvp, F_grad.detach())  # bit for bit: the same mask in both passes
    else:
        assert not torch.equal(F_jvp, F_grad.detach()) and rel(F_jvp, F_grad) < 0.03  # bf16 ran; same mask
    monkeypatch.setattr(torch.random, "fork_rng", lambda **k: contextlib.nullcontext())  # control
    F_jvp, F_grad = run()
    assert not torch.equal(F_jvp, F_grad.detach()) and (precision == "fp32" or rel(F_jvp, F_grad) > 0.2)


# ============================================================================ Gaussian oracle
def test_gaussian_oracle():
    g = torch.Generator().manual_seed(10)
    net = GaussOracle()
    x0 = SD * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    z = SD * torch.randn(1000, 2, generator=g, dtype=torch.float64)
    t = torch.rand(1000, generator=g, dtype=torch.float64) * 1.5 + 0.03
    x_t = scm.interpolate(x0, z, t)
    assert (scm.consistency_fn(net, x_t, t, SD) - x_t).abs().max() < 1e-12  # the exact CM is the identity
    with torch.no_grad():  # sCD with the exact (zero) teacher velocity: no tangent at all
        dxdt = SD * scm.F_net(Zero(), x_t, t, SD)
        _, g_raw = scm.tangent(net, x_t, t, dxdt, 1.0, SD)
    assert g_raw.abs().max() < 1e-12
    with torch.no_grad():  # control: the one-sample velocity (sCT) is not zero per sample ...
        _, g_sct = scm.tangent(net, x_t, t, scm.velocity(x0, z, t), 1.0, SD)
    assert g_sct.abs().mean() > 0.1
    N = 200_000  # ... but its normalised mean vanishes
    x0 = SD * torch.randn(N, 2, generator=g, dtype=torch.float64)
    z = SD * torch.randn(N, 2, generator=g, dtype=torch.float64)
    t = scm.sample_t(N, -1.0, 1.4, SD, "cpu").double()
    with torch.no_grad():
        _, g_raw = scm.tangent(net, scm.interpolate(x0, z, t), t, scm.velocity(x0, z, t), 1.0, SD)
    mean = scm.normalise(g_raw).mean(0)
    assert (mean.abs() < 5 / math.sqrt(N)).all(), mean


def test_gaussian_scd_regression_learns_minus_tan_half():
    """Optional Gaussian-oracle check: a(t) u trained by sCD from the exact zero-velocity teacher approaches
    -tan(t/2)."""

    class Lin(nn.Module):  # F(u, t) = a_phi(t) u with a small MLP in t
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Linear(1, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 1))

        def forward(self, u, t):
            return self.a(t.reshape(-1, 1)) * u

    torch.manual_seed(11)
    env = C.setup("cpu", 11, "fp32")
    net, teacher = Lin(), Zero(torch.float32)
    student = scm.Student(net, None)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    cfg = cfg_of(weighting="none")
    for step in range(1500):
        x0, z = SD * torch.randn(512, 2), SD * torch.randn(512, 2)
        t = torch.rand(512) * 1.4 + 0.1
        L, _ = scm.cm_step_loss(student, net, teacher, x0, z, t, 1.0, cfg, env)
        opt.zero_grad()
        L.backward()
        opt.step()
    tt = torch.linspace(0.2, 1.4, 13)
    with torch.no_grad():
        a = net.a(tt[:, None])[:, 0]
    err = (a + torch.tan(tt / 2)).abs().max().item()
    assert err < 0.05, err


# ============================================================================ sampler, conversions
def test_cm_sampler_grids():
    cfg = cfg_of()
    t_max = math.atan(160.0)
    assert abs(t_max - 1.564546) < 1e-6
    assert scm.cm_times(1, cfg) == [t_max]
    assert scm.cm_times(2, cfg) == [t_max, 1.1]
    assert np.allclose(scm.cm_times(4, cfg), [t_max, 1.1, 0.733333, 0.366667], atol=1e-6)
    assert np.allclose(scm.cm_times(8, cfg)[1:], [1.1, 0.942857, 0.785714, 0.628571, 0.471429, 0.314286, 0.157143],
                       atol=1e-6)
    sig = [0.5 * math.tan(t) for t in scm.cm_times(8, cfg)]
    assert np.allclose(sig, [80, 0.982, 0.689, 0.500, 0.364, 0.255, 0.163, 0.079], atol=2e-3)
    e = scm.edm_sigmas(18)
    assert len(e) == 19 and e[-1] == 0 and abs(e[0] - 80) < 1e-9 and abs(e[-2] - 0.002) < 1e-12
    assert scm.edm_sigmas(1) == [80.0, 0.0]
    assert [scm.nfe("diffusion", 18), scm.nfe("sct", 2)] == [35, 2]


def test_cm_sampler_with_zero_field_and_fresh_noise():
    env, cfg = C.setup("cpu", 0, "fp32"), cfg_of()
    t_max = math.atan(160.0)
    x1 = scm.cm_sample(Zero(), C.IndexRNG(range(5), 3, "cpu"), (2,), 1, cfg, env)
    x2 = scm.cm_sample(Zero(), C.IndexRNG(range(5), 3, "cpu"), (2,), 2, cfg, env)
    rng = C.IndexRNG(range(5), 3, "cpu")
    e0, e1 = rng.randn(5, 2).double(), rng.randn(5, 2).double()
    assert torch.allclose(x1, math.cos(t_max) * SD * e0, atol=1e-12)
    want = math.cos(1.1) * (math.cos(1.1) * math.cos(t_max) * SD * e0 + math.sin(1.1) * SD * e1)
    assert torch.allclose(x2, want, atol=1e-12)
    assert not torch.allclose(x2, math.cos(1.1) * (math.cos(1.1) * math.cos(t_max) * SD * e0
                                                   + math.sin(1.1) * SD * e0), atol=1e-3)  # not the reused noise


@pytest.mark.parametrize("sampler", ["cm", "heun"])
def test_samplers_do_not_depend_on_batch_size(sampler):
    env, cfg = C.setup("cpu", 0, "fp32"), cfg_of()
    net = mlp(seed=12).float().eval()
    fn = scm.cm_sample if sampler == "cm" else scm.heun_sample
    a = fn(net, C.IndexRNG(range(8), 5, "cpu"), (2,), 2, cfg, env)
    b = torch.cat([fn(net, C.IndexRNG(idx, 5, "cpu"), (2,), 2, cfg, env) for idx in ([0, 1, 2], [3, 4, 5], [6, 7])])
    # up to BLAS blocking (fp32 matmuls of different row counts round differently): equal noise per index
    assert (a - b).abs().max() < 1e-5
    assert (a - fn(net, C.IndexRNG(range(8), 6, "cpu"), (2,), 2, cfg, env)).abs().max() > 1e-2  # the seed matters


def test_conversions_round_trip():
    t = torch.tensor([1e-3, 0.3, 0.9, 1.3, 1.56], dtype=torch.float64)
    assert (scm.t_of(scm.sigma_of(t, SD), SD) - t).abs().max() < 1e-12
    x = torch.randn(5, 2, dtype=torch.float64)
    assert (scm.from_edm(scm.to_edm(x, t), t) - x).abs().max() < 1e-12
    x0, z = torch.randn(5, 2, dtype=torch.float64), SD * torch.randn(5, 2, dtype=torch.float64)
    edm = scm.to_edm(scm.interpolate(x0, z, t), t)  # x^EDM = x0 + sigma n with n = z / sigma_d
    assert (edm - (x0 + scm._col(scm.sigma_of(t, SD), x0) * z / SD)).abs().max() < 1e-10


# ============================================================================ teacher handling, CLI smoke (tiny)
def main(*args):
    """scm.main in-process through main_guard; returns the exit code (0, or 2 for a UserError)."""
    try:
        C.main_guard(lambda: scm.main([str(a) for a in args]))
    except SystemExit as e:
        return e.code
    return 0


def load(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """`--preset tiny` (tiny U-Net with ADN, 3 steps per mode) on a generated uint8 (64, 16, 16, 3) array:
    diffusion, then sct and scd initialised from it."""
    root = tmp_path_factory.mktemp("scm_cli")
    np.save(root / "imgs.npy", np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
    base = ["--preset", "tiny", "--data", root / "imgs.npy", "--root", root / "data"]
    assert main(*base, "--mode", "diffusion", "--out", root / "diff") == 0
    for m in ("sct", "scd"):
        assert main(*base, "--mode", m, "--teacher", root / "diff" / "ckpt.pt", "--out", root / m) == 0
    return root


def test_a_resumed_cm_keeps_its_tangent_norm(tiny, tmp_path, capsys):
    """The L2 and RMS tangent norms scale g (and so the loss) by sqrt(D) apart: a resume that switched them was only
    noted; it is refused, as the run's other fixed fields."""
    shutil.copytree(tiny / "sct", tmp_path / "sct")
    code = main("--preset", "tiny", "--data", tiny / "imgs.npy", "--root", tiny / "data", "--mode", "sct",
                "--out", tmp_path / "sct", "--iters", "5", "--tangent_norm", "rms")
    refusal(code, capsys.readouterr(), "trained with --tangent_norm l2; a resumed run cannot change it")


def test_cli_tiny_checkpoints(tiny):
    t = load(tiny / "diff" / "ckpt.pt")
    assert t["method"] == "scm" and t["config"]["mode"] == "diffusion" and t["sigma_d"] == 0.5
    assert t["convention"] == scm.CONVENTION and t["weight_head"] is None  # no head without adaptive weighting
    assert t["net"]["adn"] and t["net"]["time_scale"] == 1.0 and t["net"]["num_times"] == 1
    for m, p in (("sct", 0.1), ("scd", 0.0)):
        c = load(tiny / m / "ckpt.pt")
        assert c["config"]["mode"] == m and c["step"] == 3 and c["net"]["dropout"] == p  # dropout from the preset
        assert {k: v for k, v in c["net"].items() if k != "dropout"} == \
            {k: v for k, v in t["net"].items() if k != "dropout"}  # architecture from the teacher
        assert set(c["weight_head"]) == {"linear.weight", "linear.bias"}
        assert any(not torch.equal(c["model"][k], t["ema"][k]) for k in t["ema"])  # it trained
    for f in ("log.jsonl", "config.json", "samples.png", "metrics.jsonl"):
        assert (tiny / "sct" / f).exists()
    rec = [json.loads(l) for l in open(tiny / "sct" / "log.jsonl")]
    assert {"loss", "g_raw_norm", "r", "grad_norm", "w_0.1", "w_0.6", "w_1.2"} <= set(rec[-1])
    assert [r["r"] for r in rec] == [0.0, 0.5, 1.0]  # r = min(1, step/H) with H = 2, logged before each step


def test_init_copies_teacher_ema_exactly(tiny, tmp_path):
    t = load(tiny / "diff" / "ckpt.pt")
    assert main("--preset", "tiny", "--data", tiny / "imgs.npy", "--mode", "sct", "--iters", "0",
                "--teacher", tiny / "diff" / "ckpt.pt", "--out", tmp_path / "i") == 0
    c = load(tmp_path / "i" / "ckpt.pt")
    for k in t["ema"]:
        assert torch.equal(c["model"][k], t["ema"][k]) and torch.equal(c["ema"][k], t["ema"][k])
    assert any(not torch.equal(t["model"][k], t["ema"][k]) for k in t["ema"])  # the EMA, not the online weights
    assert all(torch.equal(v, torch.zeros_like(v)) for v in c["weight_head"].values())  # head starts at zero


def test_cm_from_an_augmented_teacher_leaves_no_trainable_parameter_without_gradient(tiny, tmp_path, monkeypatch):
    """A teacher trained with EDM's augmentation (the cifar10 preset's, or EDM's CIFAR-10 pickles) has map_augment
    (augment_dim 9), which the CMs never feed (no augmentation labels). A trainable parameter that gets no gradient
    stops DDP at the second step ('Expected to have finished reduction ...', two gloo ranks, tiny sCT): every
    trainable parameter of the student gets a gradient, and the frozen map_augment keeps the teacher's weights."""
    base = ["--preset", "tiny", "--data", tiny / "imgs.npy", "--root", tiny / "data"]
    assert main(*base, "--mode", "diffusion", "--augment", "0.12", "--iters", "1", "--out", tmp_path / "d") == 0
    seen = []
    real = C.distribute
    monkeypatch.setattr(C, "distribute", lambda model, env, **k: seen.append(model) or real(model, env, **k))
    for mode in ("sct", "scd"):
        assert main(*base, "--mode", mode, "--teacher", tmp_path / "d" / "ckpt.pt", "--iters", "1",
                    "--eval_steps", "1", "--out", tmp_path / mode) == 0
        student = seen.pop()
        assert student.net.map_augment is not None  # the case: a teacher with augment_dim > 0
        assert not [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
        t, c = load(tmp_path / "d" / "ckpt.pt")["ema"], load(tmp_path / mode / "ckpt.pt")
        assert torch.equal(c["model"]["map_augment.weight"], t["map_augment.weight"])


def test_cli_sample_and_fid(tiny, tmp_path, capsys):
    assert main("sample", "--ckpt", tiny / "sct" / "ckpt.pt", "--steps", "1,2", "--n", "10",
                "--out", tmp_path / "s.npy") == 0
    for K in (1, 2):
        a = np.load(tmp_path / f"s_{K}step.npy")
        assert a.shape == (10, 16, 16, 3) and a.dtype == np.uint8
    assert "CM, 2 NFE" in capsys.readouterr().out
    assert main("sample", "--ckpt", tiny / "diff" / "ckpt.pt", "--steps", "2", "--n", "4",
                "--out", tmp_path / "h.png") == 0
    assert "Heun, 3 NFE" in capsys.readouterr().out and (tmp_path / "h.png").exists()
    assert main("fid", "--ckpt", tiny / "scd" / "ckpt.pt", "--steps", "1", "--n", "16",
                "--fid_detector", standin_path(), "--root", tmp_path, "--out", tmp_path / "fid.jsonl") == 0
    rec = json.loads(open(tmp_path / "fid.jsonl").read())
    assert rec["mode"] == "scd" and rec["nfe"] == 1 and math.isfinite(rec["fid"]) and rec["fid"] > 0


def test_cli_resume_bitwise(tiny, tmp_path):
    """sct for 6 steps uninterrupted versus 3 steps, then a resume to 6: identical weights, EMA, head and Adam
    (dropout masks, flips, t and z all come from the restored RNG state; r continues from the saved step)."""
    base = ["--preset", "tiny", "--data", tiny / "imgs.npy", "--root", tmp_path, "--mode", "sct",
            "--teacher", tiny / "diff" / "ckpt.pt", "--eval_n", "4", "--H", "4"]
    assert main(*base, "--out", tmp_path / "a", "--iters", "6") == 0
    assert main(*base, "--out", tmp_path / "b", "--iters", "3") == 0
    assert main(*base, "--out", tmp_path / "b", "--iters", "6") == 0
    a, b = load(tmp_path / "a" / "ckpt.pt"), load(tmp_path / "b" / "ckpt.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "weight_head"):
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    ra = [json.loads(l)["r"] for l in open(tmp_path / "a" / "log.jsonl")]
    rb = [json.loads(l)["r"] for l in open(tmp_path / "b" / "log.jsonl")]
    assert ra == rb == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]


def test_resume_keeps_its_teacher(tiny, tmp_path, capsys, monkeypatch):
    """The teacher initialised the run (and is sCD's target at every step): its checkpoints record the fingerprint of
    its weights, and a resume naming a file with other weights, or whose teacher file was retrained in place since,
    is refused; the same weights under another path (a moved folder, another spelling) resume. sCT only started from
    the teacher: it resumes without reading it, even with the file gone."""
    import shutil
    base = ["--preset", "tiny", "--data", tiny / "imgs.npy", "--root", tiny / "data"]
    shutil.copy(tiny / "diff" / "ckpt.pt", tmp_path / "t.pt")
    for m in ("sct", "scd"):
        assert main(*base, "--mode", m, "--teacher", tmp_path / "t.pt", "--iters", "1", "--out", tmp_path / m) == 0
        assert load(tmp_path / m / "ckpt.pt")["teacher_id"] == C.fingerprint(load(tmp_path / "t.pt")["ema"])
    t = load(tmp_path / "t.pt")
    t["ema"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in t["ema"].items()}
    torch.save(t, tmp_path / "other.pt")  # other weights
    capsys.readouterr()
    for m in ("sct", "scd"):
        code = main(*base, "--mode", m, "--teacher", tmp_path / "other.pt", "--iters", "2", "--out", tmp_path / m)
        refusal(code, capsys.readouterr(), "other.pt", "holds other weights")
        assert load(tmp_path / m / "ckpt.pt")["step"] == 1
    code = main(*base, "--mode", "sct", "--teacher", "none", "--iters", "2", "--out", tmp_path / "sct")  # no teacher
    refusal(code, capsys.readouterr(), "--teacher", "cannot change it")  # is not another path to it
    monkeypatch.chdir(tmp_path)  # control: the same file by a relative path
    assert main(*base, "--mode", "scd", "--teacher", "./t.pt", "--iters", "2", "--out", tmp_path / "scd") == 0
    shutil.copy(tmp_path / "other.pt", tmp_path / "t.pt")  # retrained in place
    capsys.readouterr()
    code = main(*base, "--mode", "scd", "--iters", "3", "--out", tmp_path / "scd")
    refusal(code, capsys.readouterr(), "t.pt", "holds other weights")
    assert load(tmp_path / "scd" / "ckpt.pt")["step"] == 2
    was = load(tmp_path / "sct" / "ckpt.pt")["teacher_id"]
    assert main(*base, "--mode", "sct", "--iters", "2", "--out", tmp_path / "sct") == 0  # control: sCT resumes,
    assert load(tmp_path / "sct" / "ckpt.pt")["teacher_id"] == was  # recording the teacher it started from
    os.remove(tmp_path / "t.pt")  # sCT resumes without the file (its network is the checkpoint's); sCD needs it
    assert main(*base, "--mode", "sct", "--iters", "3", "--dropout", "0.3", "--out", tmp_path / "sct") == 0
    ck = load(tmp_path / "sct" / "ckpt.pt")
    assert ck["step"] == 3 and ck["teacher_id"] == was and ck["net"]["dropout"] == 0.3  # (a changed dropout is read)
    capsys.readouterr()
    code = main(*base, "--mode", "scd", "--iters", "3", "--out", tmp_path / "scd")
    refusal(code, capsys.readouterr(), "the teacher", "t.pt", "does not exist")
    os.makedirs(tmp_path / "moved")  # control: the teacher's weights under another path resume both, which keep it
    shutil.copy(tiny / "diff" / "ckpt.pt", tmp_path / "moved" / "t.pt")
    for m in ("scd", "sct"):
        assert main(*base, "--mode", m, "--teacher", "moved/t.pt", "--iters", "4", "--out", tmp_path / m) == 0
        ck = load(tmp_path / m / "ckpt.pt")
        assert ck["step"] == 4 and ck["teacher_id"] == was
        assert ck["config"]["teacher"] == str(tmp_path / "moved" / "t.pt")  # (recorded by its absolute path)


def test_bad_inputs(tiny, tmp_path, capsys):
    data = ["--data", tiny / "imgs.npy", "--root", tmp_path]
    cases = [
        (["--preset", "nope"], ["unknown preset"]),
        (["--preset", "tiny", *data, "--mode", "scd", "--out", tmp_path / "x"], ["--teacher"]),
        (["--preset", "tiny", *data, "--mode", "diffusion", "--teacher", tiny / "diff" / "ckpt.pt",
          "--out", tmp_path / "x"], ["drop --teacher"]),
        (["--preset", "tiny", *data, "--mode", "scd", "--teacher", tiny / "sct" / "ckpt.pt", "--out", tmp_path / "x"],
         ["mode is 'sct'"]),
        (["--preset", "tiny", *data, "--mode", "sct", "--teacher", tiny / "diff" / "ckpt.pt", "--sigma_d", "0.6",
          "--out", tmp_path / "x"], ["sigma_d"]),
        (["--preset", "tiny", *data, "--mode", "sct", "--teacher", tmp_path / "none.pt", "--out", tmp_path / "x"],
         ["does not exist"]),
        (["--preset", "tiny", *data, "--mode", "scd", "--teacher", tiny / "diff", "--out", tmp_path / "x"],
         ["diff' is a folder, not a file"]),
        (["--mode", "all", "--teacher", tiny / "diff" / "ckpt.pt", "--out", tmp_path / "x"],
         ["--mode all trains its own teacher"]),
        (["--preset", "tiny", "--data", tmp_path / "none.npy", "--out", tmp_path / "x"], ["neither"]),
        (["--preset", "tiny", *data, "--net", "mlp", "--out", tmp_path / "x"], ["2-D points"]),
        (["--preset", "tiny", *data, "--t_mid", "2.0", "--out", tmp_path / "x"], ["t_mid"]),
        (["--preset", "tiny", *data, "--mode", "sct", "--out", tiny / "scd"], ["mode is 'scd'"]),  # resume mismatch
        (["sample", "--ckpt", tmp_path / "none.pt"], ["does not exist"]),
    ]
    for args, words in cases:
        capsys.readouterr()
        refusal(main(*args), capsys.readouterr(), *words)


def test_wrong_method_teacher_is_refused(tmp_path, capsys):
    ck = dict(model={}, ema={}, opt={}, step=0, config=dict(stage="1rf", sigma_d=None), net={},
              method="rectified_flow", convention="x_t=(1-t)x+t*z, v=z-x, t=1 noise", rng=None)
    torch.save(ck, tmp_path / "rf.pt")
    with pytest.raises(C.UserError, match="method is 'rectified_flow'"):
        scm.load_teacher(str(tmp_path / "rf.pt"), cfg_of())
    for mode, words in ((None, "usable scm checkpoint: method"), ("sct", "usable scm sct checkpoint: method")):
        with pytest.raises(C.UserError, match=words):  # one space between the words, with a mode or without
            scm.check_scm(ck, "rf.pt", mode)


def test_sct_without_teacher_logs_the_deviation(tmp_path, capsys):
    assert main("--mode", "sct", "--iters", "2", "--batch", "16", "--eval_n", "64", "--eval_steps", "1",
                "--width", "16", "--depth", "1", "--out", tmp_path / "s") == 0
    assert "the paper initialises sCT from a TrigFlow teacher" in capsys.readouterr().out


def test_nan_loss_keeps_last_checkpoint(tiny, tmp_path, monkeypatch, capsys):
    base = ["--preset", "tiny", "--data", tiny / "imgs.npy", "--root", tmp_path, "--mode", "sct",
            "--teacher", tiny / "diff" / "ckpt.pt", "--out", tmp_path / "n"]
    assert main(*base, "--iters", "3") == 0
    before = open(tmp_path / "n" / "ckpt.pt", "rb").read()
    orig = scm.cm_step_loss
    monkeypatch.setattr(scm, "cm_step_loss", lambda *a: (lambda L, g: (L * float("nan"), g))(*orig(*a)))
    capsys.readouterr()
    refusal(main(*base, "--iters", "6"), capsys.readouterr().err, "NaN")
    assert open(tmp_path / "n" / "ckpt.pt", "rb").read() == before


# ============================================================================ toy convergence
# the recipe these thresholds were calibrated for, pinned (the toy preset itself is tuned for a one-minute
# `python scm.py`): constant lr, t_mid 1.1, teacher lr 1e-3 (DIFF_LR). eval_n only sizes each run's own closing
# evaluation (metrics.jsonl), which no test reads: the test scores the networks itself (_score, 2,048 samples).
TOY = dict(width=128, depth=3, batch=256, eval_n=256, eval_steps=[1, 2], log_every=50, H=100, seed=0,
           lr_schedule="const", t_mid=1.1)
DIFF_LR = 1e-3
TOY_ITERS = dict(diffusion=800, cm=200, control=50)
# Calibrated on the 2-core CPU (seeds 0-1; 2,048 samples; budgets from this one to 1,500/1,000 iterations): trained
# sCT/sCD 1- and 2-step SWD 0.025-0.056, in-mode 0.38-0.73, 8/8 modes (this budget, CMs 200 steps: SWD 0.036-0.056,
# in-mode 0.38-0.62 at seed 0, 0.035-0.049 and 0.41-0.65 at seed 1; 400 steps gave 0.029-0.039, 0.56-0.68);
# teacher with Heun 18: SWD 0.016-0.031; the controls (teacher at 1 step, sCD with r = 0, untrained) SWD 0.38-0.44,
# in-mode 0.00-0.10 (the r = 0 control scores as the teacher at one step whether it runs 50 or 150 steps). Thresholds
# near the geometric midpoints. A 400-step teacher (lr 2e-3) or a 600-step one (lr 1.5e-3) left a CM with 3-7 modes,
# and so did CMs of 150 steps. The fixture takes ~42 s on the shared 2-core CPU (~60 s at the earlier 400 steps).
SWD_TEACHER_HEUN, SWD_1STEP, IN_MODE = 0.08, 0.12, 0.22


def _train(out, mode, **kw):
    cfg = C.resolve_config(scm.Config, scm.PRESETS, "toy", {**TOY, "out": str(out), **kw}, mode=mode)
    scm.train(cfg, {}, C.setup("cpu", 0, "fp32"))
    ck = load(os.path.join(out, "ckpt.pt"))
    net = C.build_net(ck["net"])
    C.load_state_strict(net, ck["ema"])
    return net.eval(), [json.loads(l) for l in open(os.path.join(out, "log.jsonl"))]


def _score(net, mode, K):
    """SWD to 2,048 fresh data points, in-mode fraction and modes covered of 2,048 samples (common.py toy metrics)."""
    env, cfg = C.setup("cpu", 0, "fp32"), scm.Config()
    xs = scm.sampler(net, cfg, mode, (2,), K, env)(C.IndexRNG(range(2048), 123, "cpu"))
    ref = C.toy_sample("8gaussians", 2048, torch.Generator().manual_seed(321))
    centres, std = C.toy_modes("8gaussians")
    return C.swd(xs, ref), C.in_mode(xs, centres, std), C.modes_covered(xs, centres, std)


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
    """diffusion (800 x 256), then sCT and sCD (200 x 256, RAdam 2e-4) and the r = 0 sCD control (50 x 256: at
    r ~ 0 the update is a diffusion-style regression that keeps the collapsed 1-step map) from its EMA."""
    root = tmp_path_factory.mktemp("scm_toy")
    runs = {"diffusion": _train(root / "d", "diffusion", iters=TOY_ITERS["diffusion"], lr=DIFF_LR)}
    teacher = str(root / "d" / "ckpt.pt")
    for name, mode, kw in [("sct", "sct", {}), ("scd", "scd", {}),
                           ("scd_r0", "scd", dict(H=10 ** 12, iters=TOY_ITERS["control"]))]:
        runs[name] = _train(root / name, mode, **{"iters": TOY_ITERS["cm"], "teacher": teacher, "lr": 2e-4, **kw})
    return runs


@pytest.mark.slow
def test_toy_teacher_initialised_cms_beat_the_controls(toy_runs):
    teacher = toy_runs["diffusion"][0]
    t_heun = _score(teacher, "diffusion", 18)
    assert t_heun[0] < SWD_TEACHER_HEUN and t_heun[2] == 8  # the teacher itself is good with 35 NFE ...
    controls = {"teacher as 1-step CM (a)": _score(teacher, "diffusion", 1),
                "sCD with r = 0 (b)": _score(toy_runs["scd_r0"][0], "scd", 1),
                "untrained (c)": _score(mlp_toy(), "sct", 1)}
    scores = {name: (_score(toy_runs[name][0], name, 1), _score(toy_runs[name][0], name, 2)) for name in ("sct", "scd")}
    print("\nteacher heun", t_heun, "controls", controls, "trained", scores)
    for name, (swd, inm, modes) in controls.items():  # ... but every control collapses at one step
        assert swd > SWD_1STEP and inm < IN_MODE, (name, swd, inm)
    for name in ("sct", "scd"):
        s1, s2 = scores[name]
        assert s1[0] < SWD_1STEP and s1[1] > IN_MODE and s1[2] == 8, (name, s1)
        assert s2[0] < SWD_1STEP and s2[1] > IN_MODE and s2[2] == 8, (name, s2)
        assert s2[0] < 1.25 * s1[0], (name, s1, s2)  # K = 2 no worse than K = 1 (up to sampling noise)


def mlp_toy():
    net = C.build_net(C.net_config("mlp", width=128, depth=3))
    with torch.no_grad():  # a random output layer: the zero init would make the untrained model exactly f = cos t x
        net.out_conv.weight.normal_(0, 0.3)
    return net.eval()


@pytest.mark.slow
def test_toy_runs_are_finite_and_tangent_is_logged(toy_runs):
    for name in ("sct", "scd"):
        rec = toy_runs[name][1]
        assert all(math.isfinite(r["loss"]) and math.isfinite(r["g_raw_norm"]) for r in rec)
        assert rec[0]["r"] < 1 and rec[-1]["r"] == 1  # warm-up ran and finished (H = 100, TOY)
        g = [r["g_raw_norm"] for r in rec]
        assert 0 < min(g) and max(g) < 10 * SD, g  # the raw tangent norm settles at O(sigma_d), no spikes
        gn = [r["grad_norm"] for r in rec]
        assert max(gn) < 20 * float(np.median(gn)), gn  # no gradient spike


def test_all_mode_pipeline_with_network_flags(tmp_path, capsys):
    """`--mode all` with network flags: diffusion gets them, sCT/sCD inherit the teacher's net; side-by-side plot.
    A single mode aimed at the `all` folder (or `all` at a single-mode folder) is refused, not started beside it; the
    folder moved elsewhere resumes; an unreadable checkpoint of a later mode stops it before any output."""
    assert main("--mode", "all", "--width", "16", "--depth", "1", "--iters", "3", "--batch", "16", "--eval_n", "64",
                "--heun_steps", "2", "--out", tmp_path / "all") == 0
    for m in scm.MODES:
        c = load(tmp_path / "all" / m / "ckpt.pt")
        assert c["config"]["mode"] == m and c["net"]["width"] == 16 and c["step"] == 3
    assert load(tmp_path / "all" / "sct" / "ckpt.pt")["config"]["teacher"] == str(tmp_path / "all" / "diffusion" /
                                                                                  "ckpt.pt")
    assert (tmp_path / "all" / "samples.png").read_bytes()[:4] == b"\x89PNG"
    for argv, words in ((["--mode", "sct", "--out", tmp_path / "all"], ["holds a --mode all run",
                                                                        f"--out {tmp_path / 'all' / 'sct'}"]),
                        (["--mode", "all", "--out", tmp_path / "all" / "sct"], ["holds a single-mode run"])):
        capsys.readouterr()
        code = main(*argv, "--iters", "4")
        refusal(code, capsys.readouterr(), *words)
    assert not (tmp_path / "all" / "ckpt.pt").exists()
    os.rename(tmp_path / "all", tmp_path / "moved")  # a moved folder resumes: its CMs' teacher is DIR/diffusion now
    capsys.readouterr()
    assert main("--mode", "all", "--width", "16", "--depth", "1", "--iters", "3", "--batch", "16", "--eval_n", "64",
                "--heun_steps", "2", "--out", tmp_path / "moved") == 0
    assert capsys.readouterr().out.count(f"config: teacher = '{tmp_path / 'moved' / 'diffusion' / 'ckpt.pt'}'") == 2
    assert main("--out", tmp_path / "moved" / "sct", "--iters", "4") == 0  # without --mode: the run's own (not all)
    ck = load(tmp_path / "moved" / "sct" / "ckpt.pt")
    assert ck["step"] == 4 and ck["config"]["mode"] == "sct"
    open(tmp_path / "moved" / "scd" / "ckpt.pt", "wb").close()  # a later mode's checkpoint unreadable (a kill, a
    capsys.readouterr()  # full disk): refused before the modes ahead of it run again and print their lines
    code = main("--mode", "all", "--width", "16", "--depth", "1", "--iters", "3", "--batch", "16", "--eval_n", "64",
                "--heun_steps", "2", "--out", tmp_path / "moved")
    refusal(code, capsys.readouterr(), "scd/ckpt.pt' could not be read")


def test_a_malformed_loss_scale_is_refused_before_output(tmp_path, capsys, monkeypatch):
    """A resumed fp16 run reads its checkpoint's loss-scaler state (common.make_scaler): an edited one was refused after
    the run's first line had printed. Now before it; the state as saved resumes (control). fp16's CUDA-only check is
    lifted here, so that CPU autocast runs the same code path."""
    monkeypatch.setattr(C, "check_device", lambda device, precision=None: None)
    base = ["--mode", "diffusion", "--width", "16", "--depth", "1", "--batch", "16", "--heun_steps", "1", "--eval_n",
            "16", "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "r"]
    assert main(*base, "--iters", "1") == 0
    ck = load(tmp_path / "r" / "ckpt.pt")
    torch.save({**ck, "scaler": {**ck["scaler"], "scale": "65536"}}, tmp_path / "r" / "ckpt.pt")
    capsys.readouterr()
    code = main(*base, "--iters", "2")
    out, err = capsys.readouterr()
    refusal(code, err, "loss-scaler state is malformed")
    assert out == "", out
    torch.save(ck, tmp_path / "r" / "ckpt.pt")
    assert main(*base, "--iters", "2") == 0 and load(tmp_path / "r" / "ckpt.pt")["step"] == 2


def test_all_mode_checks_its_cms_resume_up_front(tmp_path, capsys, monkeypatch):
    """`--mode all` restarted over consistency models that a resume refuses (one continued alone past --iters, sCD's
    teacher DIR/diffusion continued alone since, a malformed loss-scaler state) refused them only when their mode
    came, after the modes before it had printed their lines. Now each CM checkpoint's resume rules, its teacher's
    weights and its scaler state are checked before any mode prints; a resume they allow runs (control)."""
    import shutil
    A = ["--mode", "all", "--width", "16", "--depth", "1", "--batch", "16", "--eval_n", "64", "--heun_steps", "2",
         "--out", tmp_path / "all"]

    def refused(*argv, words):
        capsys.readouterr()
        code = main(*A, *argv)
        out, err = capsys.readouterr()
        refusal(code, err, *words)
        assert out == "", out
    assert main(*A, "--iters", "2") == 0
    assert main("--out", tmp_path / "all" / "sct", "--iters", "3") == 0  # sCT continued alone to step 3
    refused("--iters", "2", words=[f"'{tmp_path / 'all' / 'sct' / 'ckpt.pt'}' is at step 3", "--iters 2"])
    scd = tmp_path / "all" / "scd" / "ckpt.pt"
    shutil.copy(scd, tmp_path / "scd.pt")
    ck = load(scd)
    ck["scaler"] = {"scale": "65536"}  # an edited state, read by an fp16 run (fp16's CUDA-only check lifted here)
    torch.save(ck, scd)
    monkeypatch.setattr(C, "check_device", lambda device, precision=None: None)
    refused("--precision", "fp16", "--device", "cpu", words=["loss-scaler state is malformed"])
    shutil.copy(tmp_path / "scd.pt", scd)
    capsys.readouterr()  # control: each mode at its own saved --iters (sCT's 3) resumes, finished, and compares
    assert main(*A) == 0 and f"wrote {tmp_path / 'all' / 'samples.png'}" in capsys.readouterr().out
    assert load(tmp_path / "all" / "sct" / "ckpt.pt")["step"] == 3 and load(scd)["step"] == 2
    assert main("--mode", "diffusion", "--out", tmp_path / "all" / "diffusion", "--iters", "3") == 0  # the teacher
    refused(words=[f"the teacher '{tmp_path / 'all' / 'diffusion' / 'ckpt.pt'}' holds other weights", "scd/ckpt.pt"])
    assert load(scd)["step"] == 2  # (sCT, which the teacher only initialised, would resume: sCD reads it every step)


# ============================================================================ DDP: two gloo ranks
WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
import common as C
import scm

orig = C.save_checkpoint


def spy(path, ck, env, gens=()):  # every rank keeps its own weights, EMA and weight head next to the checkpoint
    torch.save({{k: ck[k] for k in ("model", "ema", "weight_head")}}, f"{{path}}.rank{{env.rank}}")
    return orig(path, ck, env, gens)


C.save_checkpoint = spy
C.main_guard(lambda: scm.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_two_ranks_stay_identical(tiny, tmp_path):
    """torchrun, 2 gloo ranks, tiny sCT (dropout 0.1, x-flips, per-rank data, noise and masks; JVP on the unwrapped
    module, gradient pass through DDP with the weight head): network, EMA and head equal on both ranks."""
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "worker.py",
           "--preset", "tiny", "--mode", "sct", "--data", str(tiny / "imgs.npy"), "--out", "run", "--root", "data",
           "--teacher", str(tiny / "diff" / "ckpt.pt"), "--iters", "3", "--xflip", "true", "--eval_n", "4"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world 2 | global batch 8 = 2 x 4" in p.stdout
    r0, r1 = (torch.load(tmp_path / "run" / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
    for k in ("model", "ema", "weight_head"):
        for n in r0[k]:
            assert torch.equal(r0[k][n], r1[k][n]), (k, n)
    t = load(tiny / "diff" / "ckpt.pt")["ema"]
    assert any(not torch.equal(r0["model"][n], t[n]) for n in t)  # it trained
    assert any(not torch.equal(r0["weight_head"][n], torch.zeros_like(v)) for n, v in r0["weight_head"].items())


def test_all_mode_restart_sets_the_cms_tangent_norm_over_a_finished_teacher(tmp_path, capsys):
    """--tangent_norm is fixed on resume for the CMs, which read it; the diffusion teacher does not. A --mode all run
    stopped after its teacher, restarted with --tangent_norm rms for its CMs (not begun), was refused at the teacher
    ('trained with --tangent_norm l2; a resumed run cannot change it'). A begun CM still refuses the switch."""
    base = ["--mode", "all", "--width", "16", "--depth", "1", "--iters", "2", "--batch", "16", "--eval_n", "64",
            "--heun_steps", "2", "--eval_steps", "1", "--out", tmp_path / "all"]
    assert main(*base) == 0
    for m in ("sct", "scd"):  # stopped after the teacher
        shutil.rmtree(tmp_path / "all" / m)
    capsys.readouterr()
    assert main(*base, "--tangent_norm", "rms") == 0, capsys.readouterr().err
    assert load(tmp_path / "all" / "sct" / "ckpt.pt")["config"]["tangent_norm"] == "rms"
    capsys.readouterr()
    code = main(*base, "--tangent_norm", "l2")  # the CMs have begun with rms: refused
    refusal(code, capsys.readouterr(), "sct/ckpt.pt' was trained with --tangent_norm rms")


def test_the_cifar10_recipe_needs_its_mode_named(tmp_path, capsys):
    """The cifar10 preset's default --mode sct trained sCT from scratch with only a note in the log; the recipe
    (sCM App. G.2) starts sCT and sCD from a TrigFlow teacher, so the default is refused before any output, naming
    the recipe's modes, and an explicit --mode sct is that path (control: it trains, its note in the log)."""
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    argv = ["--preset", "cifar10", "--data", str(tmp_path / "imgs.npy"), "--net", "tiny", "--batch", "8", "--iters",
            "1", "--fid_every", "0", "--eval_n", "8", "--H", "1", "--out", str(tmp_path / "r")]
    guarded(capsys, lambda: scm.main(argv), "run --mode diffusion, then --mode sct or scd with --teacher ",
            "give --mode sct for that path")  # (one sentence: it said "sCM App. G.2", two to the rule's check)
    assert not os.path.exists(tmp_path / "r")
    scm.main(["--mode", "sct", *argv])
    assert "note: sCT from scratch" in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 1
