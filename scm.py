"""sCM: continuous-time consistency models with TrigFlow (TrigFlow diffusion, sCT and sCD: consistency training
and consistency distillation).

Paper: Lu & Song, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", arXiv 2410.11081 (ICLR
2025). "sCM Eq. n / Alg. n / App. X" below are the paper's; derivations in docs/scm.md.

The method in a few lines. TrigFlow puts data and noise on a circle, x_t = cos t x0 + sin t z (sCM Sec. 3), and a
network F predicts the velocity of the probability-flow ODE (PF-ODE) dx_t/dt = sigma_d F(x_t / sigma_d, t) (sCM
Eq. 3). A consistency model (CM) maps any x_t to the trajectory's clean end f(x_t, t) = cos t x_t - sin t sigma_d F
(sCM Eq. 5, App. E.1), so f(x, 0) = x. The continuous-time CM gradient needs only the derivative of f along the ODE
path, df/dt, a Jacobian-vector product (JVP) computed exactly with forward-mode automatic differentiation (sCM
Sec. 5.1). sCT takes dx_t/dt from the data (the one-sample velocity); sCD from a TrigFlow diffusion teacher.
Stability comes from TrigFlow, c_noise(t) = t, adaptive double normalisation in the U-Net, a warmed-up and
normalised tangent (sCM Sec. 4.2, Alg. 1), and a learned weight w(t) (sCM Eq. 8). Samples take 1 or 2 network
evaluations.

Convention (written into every checkpoint): x_t = cos(t) x + sin(t) z, z ~ N(0, sigma_d^2 I), sigma_d = 0.5, t in
[0, pi/2], t = pi/2 noise, dx/dt = sigma_d F(x / sigma_d, t). EDM view: sigma = sigma_d tan t.

Modes (--mode): diffusion (TrigFlow teacher, Eq. 4) -> sct (Alg. 1, data velocity) | scd (Alg. 1, teacher
velocity); `all` runs diffusion, then sCT and sCD initialised from it, in DIR/{diffusion,sct,scd} (default of the
toy preset).

    python scm.py                                                     # toy: diffusion -> sCT, sCD; CPU
    python scm.py --mode sct                                          # sCT from scratch (not the paper's init)
    torchrun --nproc_per_node=8 scm.py --preset cifar10 --mode diffusion
    torchrun --nproc_per_node=8 scm.py --preset cifar10 --mode sct --teacher runs/scm-diffusion-cifar10/ckpt.pt
    torchrun --nproc_per_node=8 scm.py --preset cifar10 --mode scd --teacher edm-cifar10-32x32-uncond-vp.pkl
    python scm.py sample --ckpt runs/scm-all-toy/sct/ckpt.pt --steps 1,2 --out s.png
    python scm.py fid --ckpt runs/scm-sct-cifar10/ckpt.pt --steps 1,2
"""
import contextlib, dataclasses, json, math, os
from dataclasses import dataclass
from typing import Literal, Optional

import warnings

import torch
import torch.nn as nn

import common as C

# torch.func.jvp scripts its own decompositions on first use and warns about that; nothing to act on here
warnings.filterwarnings("ignore", message="`torch.jit.script` is deprecated", category=FutureWarning)

METHOD = "scm"
CONVENTION = "x_t=cos(t)*x+sin(t)*z, z~N(0,sigma_d^2), t in [0,pi/2], t=pi/2 noise, dx/dt=sigma_d*F(x/sigma_d,t)"
MODES = ("diffusion", "sct", "scd")


# =============================================================================================================== config
@dataclass
class Config:
    preset: str = "toy"  # preset that filled the defaults (toy, tiny, small, cifar10)
    mode: Literal["diffusion", "sct", "scd", "all"] = "sct"  # what to train; all = diffusion -> sct, scd
    #   (--preset cifar10 needs it named: its sCT starts from a teacher, from scratch only by --mode sct)
    data: str = "8gaussians"  # toy name, cifar10/mnist/fashion_mnist, .npy file, image folder or .zip
    root: str = "data"  # data sets and FID reference statistics are cached here
    out: str = "runs/scm-sct-toy"  # run folder
    teacher: Optional[str] = None  # scm diffusion checkpoint or EDM .pkl: init of sct/scd (its EMA), scd's velocity
    resume: Optional[bool] = None  # None: resume when DIR/ckpt.pt exists
    seed: int = 0  # seeds model init, data order and noise
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Optional[str] = None  # grad pass precision (default bf16 on CUDA); JVP and loss are always fp32
    compile: bool = False  # torch.compile the grad pass only (the JVP pass runs eagerly on the same masks)
    # network (common.net_config, one time input, time_scale 1: c_noise(t) = t)
    net: str = "mlp"  # mlp, tiny, small, ddpmpp
    width: int = 128  # MLP width (2-D data only)
    depth: int = 3  # MLP residual blocks (2-D data only)
    adn: bool = False  # adaptive double normalisation (Sec. 4.1); on for the U-Net presets
    dropout: float = 0.0  # per mode in the presets: 0.13 / 0.20 / 0 on CIFAR-10 (G.1, G.2)
    xflip: bool = False  # random horizontal flips (images)
    augment: float = 0.0  # EDM's non-leaky augmentation probability p (diffusion mode; 0 off), augment_dim 9
    # TrigFlow
    sigma_d: float = 0.5  # data std (Sec. 3)
    P_mean: float = -1.0  # log-normal proposal of sigma = sigma_d tan t (sCM Alg. 1); diffusion -1.2
    P_std: float = 1.4  # (sCM Alg. 1); diffusion 1.2
    # sCT / sCD (sCM Sec. 4.2, Alg. 1, Eq. 8)
    c: float = 0.1  # tangent normalisation constant (sCM Sec. 4.2, Alg. 1)
    H: int = 10_000  # tangent warm-up iterations, r = min(1, step/H) (sCM Alg. 1, Sec. 4.2); 0 = no warm-up
    tangent_norm: Literal["l2", "rms"] = "l2"  # per-sample L2 norm (paper) or RMS (FastGen) in (sCM Sec. 4.2, Alg. 1)
    weighting: Literal["adaptive", "none"] = "adaptive"  # learned w_phi(t) (sCM Eq. 8) or w = 0
    diffusion_adaptive_weight: bool = False  # EDM2-style w_phi in the diffusion loss (sCM Eq. 4); off in cifar10 (G.1)
    # optimisation (per mode, see PRESETS)
    iters: int = 3000  # optimiser steps
    batch: int = 256  # global batch per optimiser step (split over ranks and accumulation rounds)
    accum: int = 1  # gradient accumulation rounds
    optim: Literal["adam", "radam"] = "radam"  # diffusion: Adam; CMs: RAdam (G.2)
    lr: float = 3e-4  # learning rate
    beta2: float = 0.99  # Adam/RAdam beta_2 (beta_1 = 0.9, eps 1e-8, no weight decay)
    lr_ramp_kimg: float = 0.0  # linear learning-rate ramp over this many kimg (EDM; 10 Mimg for the teacher)
    lr_schedule: Literal["const", "cosine"] = "const"  # cosine: lr x (1 + cos(pi step / iters)) / 2 (toy preset)
    ema_halflife_kimg: float = 20.0  # EMA half-life (EDM/G.2: 500 kimg on CIFAR-10)
    ema_rampup: Optional[float] = 0.05  # EMA half-life ramp-up ratio (EDM)
    # sampling
    sigma_max: float = 80.0  # t_max = arctan(sigma_max / sigma_d) (G.2)
    t_mid: float = 1.1  # the CMs' 2-step middle time (G.2); K > 2: t_k = t_mid (K - k)/(K - 1) (project's choice)
    heun_steps: int = 18  # diffusion sampler: EDM Heun, 2K - 1 NFE (G.1)
    # logging and evaluation
    log_every: int = 250  # steps between log lines (loss, raw tangent norm, w(t), r, grad norm)
    ckpt_every: int = 1000  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample plots (0: end only)
    eval_n: int = 4096  # evaluation samples (toy metrics)
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])  # CM step counts evaluated
    fid_every: int = 0  # steps between FID proxies (images; 0: never)
    fid_n: int = 10_000  # samples of the in-training FID proxy
    fid_detector: str = "inception"  # inception or a TorchScript path
    fallback: bool = True  # a missing weights file (Inception; LPIPS): warn and go on without it (False stops)
    max_skips: int = 100  # stop after this many optimiser steps in a row with non-finite gradients (each is skipped)

    def check(self):
        if self.mode != "diffusion" and not 0 < self.t_mid < math.atan(self.sigma_max / self.sigma_d) <= math.pi / 2:
            raise ValueError(f"--t_mid must lie in (0, t_max), t_max = arctan(sigma_max / sigma_d) = "
                             f"{math.atan(self.sigma_max / self.sigma_d):.4f} (--sigma_max {self.sigma_max:g}, "
                             f"--sigma_d {self.sigma_d:g}).")
        if not self.data:
            raise ValueError("this preset needs --data (for example a uint8 (N, 16, 16, 3) .npy file).")


RANGES = dict(width=C.NET_SIZE, depth=C.NET_SIZE, sigma_d="> 0", P_std="> 0", c="> 0", beta2="(0, 1)", sigma_max="> 0",
              heun_steps=C.STEPS)  # beside common.RANGES
# a mode's own options: another refuses them (common.refuse_other) instead of recording them unread (the diffusion
# model is evaluated by Heun and as a 1-step CM; the CMs at --eval_steps with the 2-step middle time t_mid)
MODE_ONLY = {**dict.fromkeys(("c", "H", "tangent_norm", "weighting", "t_mid", "eval_steps"), ("sct", "scd", "all")),
             **dict.fromkeys(("diffusion_adaptive_weight", "heun_steps"), ("diffusion", "all"))}

# ============================================================================================================== presets
_DIFF = dict(optim="adam", beta2=0.999, P_mean=-1.2, P_std=1.2)  # teacher: EDM settings (G.1)
_CM = dict(optim="radam", beta2=0.99, P_mean=-1.0, P_std=1.4)  # CMs: RAdam, (-1.0, 1.4) (G.2)
PRESETS = {  # flat fields, then per-mode parts
    # toy (`python scm.py` within a minute): MLP 64 x 4, batch 1,024, cosine lr decay to 0; diffusion 700 steps (Adam
    # 2e-3), sCT 230 (RAdam 1.5e-3, H = 210, t_mid = 0.5), sCD 280 (RAdam 7e-4, H = 230, t_mid = 0.9). On 2 CPU cores a
    # CM step costs ~30-40 ms almost independently of the batch (the JVP's per-op overhead), so the preset takes few
    # large batches. A constant CM lr of 1e-3 collapses after the warm-up (sCD 2-step in-mode 0.76 at r = 1, 0.17 400
    # steps later), hence the decay to 0 and an H over most of the run; width 128 was slower and no sharper (sCD 0.71).
    # t_mid (2-step sampling only): sCT 0.84 at 0.5 against 0.66 at 1.1, sCD flat over 0.7-1.0.
    # sCD's lr 7e-4 is the best of 3e-4-7e-4 at 280 steps; longer runs want less (1,120 steps: 7e-4 0.84, 3e-4 0.88 at
    # 2 steps; benchmarks/results/toy_defaults.md, cm_vs_ode.md).
    # Measured on the 2-core CPU machine (idle, seed 0, benchmarks/results/toy_defaults.md): 38 s wall, median of
    # three runs, 36-41 s ("total" line, as README and docs/scm.md); in-mode of 4,096 samples: teacher Heun 18 steps
    # 0.956; sCT 1 / 2 / 4 steps 0.46 / 0.84 / 0.88; sCD 0.70 / 0.85 / 0.87 (all 8 modes). 0.90 at 2 steps is not
    # reached in this budget (sCD with 400 steps: 0.87). The previous preset (MLP 128 x 3, batch 256, constant lr,
    # diffusion 2,000 x Adam 1e-3, CMs 1,500 x RAdam 1e-4, H = 300, t_mid 1.1) took two to three and a half minutes
    # (docs/scm.md has its table) for teacher 0.94, sCT / sCD 0.79 / 0.82 at 2 steps.
    "toy": dict(mode="all", data="8gaussians", net="mlp", width=64, depth=4, batch=1024, lr_schedule="cosine",
                ema_halflife_kimg=20.0, eval_n=4096,
                diffusion=dict(**_DIFF, lr=2e-3, iters=700),
                sct=dict(**_CM, lr=1.5e-3, iters=230, H=210, t_mid=0.5),
                scd=dict(**_CM, lr=7e-4, iters=280, H=230, t_mid=0.9)),
    "tiny": dict(data="", net="tiny", adn=True, batch=8, iters=3, H=2, ema_halflife_kimg=1.0, log_every=1,
                 ckpt_every=3, eval_n=16, eval_steps=[1, 2], heun_steps=2, fid_n=16,
                 diffusion=dict(**_DIFF, lr=1e-3, dropout=0.1), sct=dict(**_CM, lr=1e-4, dropout=0.1),
                 scd=dict(**_CM, lr=1e-4, dropout=0.0)),
    # small: GPU suggestion, ~30 min diffusion + ~25 min CM at an *estimated* ~4k img/s; iteration
    # counts to be re-derived from benchmarks/ once measured.
    "small": dict(data="cifar10", net="small", adn=True, xflip=True, precision="bf16", batch=256, H=2000,
                  ema_halflife_kimg=500.0, log_every=500, ckpt_every=5000, eval_n=256, fid_n=10_000,
                  diffusion=dict(**_DIFF, lr=1e-3, lr_ramp_kimg=2000.0, dropout=0.1, iters=28_000),
                  sct=dict(**_CM, lr=1e-4, dropout=0.1, iters=14_000), scd=dict(**_CM, lr=1e-4, dropout=0.0,
                                                                               iters=14_000)),
    # cifar10: paper App. G.1 (teacher: DDPM++ + ADN + positional c_noise, dropout 0.13, Adam 1e-3, EDM lr ramp
    # 10 Mimg, batch 512, 400k iters) and App. G.2 (CMs: RAdam 1e-4 betas (0.9, 0.99), eps 1e-8, constant lr,
    # (P_mean, P_std) = (-1.0, 1.4), c = 0.1, H = 10k, EMA half-life 0.5 Mimg, dropout 0.20 sCT / 0 sCD, teacher
    # init). No weight decay (G.2 names none: RAdam's default). CM iteration count is not given by the paper: 400k.
    # precision: fp32 with TF32 off, as NVlabs/FastGen's sCT/sCD CIFAR-10 configs (configs/methods/config_scm.py:
    # trainer.tf32_enabled False, no precision_amp in experiments/EDM/config_sc{t,d}_cifar10.py) and, for the
    # teacher, EDM (training_loop.py turns TF32 off; train.py --fp16 False by default)
    "cifar10": dict(fallback=False,  # a missing weights file stops the run: no silent fallback
                    data="cifar10", net="ddpmpp", adn=True, xflip=True, precision="fp32", batch=512, iters=400_000,
                    H=10_000, ema_halflife_kimg=500.0, log_every=500, ckpt_every=20_000, fid_every=50_000,
                    eval_n=256, fid_n=10_000,
                    # the teacher follows EDM's CIFAR-10 recipe: augmentation p = 0.12 (EDM train.py), no data x-flip
                    diffusion=dict(**_DIFF, lr=1e-3, lr_ramp_kimg=10_000.0, dropout=0.13, augment=0.12, xflip=False),
                    sct=dict(**_CM, lr=1e-4, dropout=0.20), scd=dict(**_CM, lr=1e-4, dropout=0.0)),
}


# ===================================================================================================== method: TrigFlow
def _col(v, x):  # (B,) -> (B, 1, ...) broadcastable against x
    return v.reshape(-1, *[1] * (x.ndim - 1))


def interpolate(x0, z, t):
    """(sCM Sec. 3) x_t = cos t x0 + sin t z."""
    return _col(torch.cos(t), x0) * x0 + _col(torch.sin(t), x0) * z


def velocity(x0, z, t):
    """(sCM Eq. 4) v_t = dx_t/dt = cos t z - sin t x0, the diffusion loss's target."""
    return _col(torch.cos(t), x0) * z - _col(torch.sin(t), x0) * x0


def sample_t(n, P_mean, P_std, sigma_d, device):
    """(sCM Alg. 1) tau ~ N(P_mean, P_std^2), t = arctan(e^tau / sigma_d): EDM sigma = e^tau is log-normal (Alg. 1)."""
    return torch.atan(torch.exp(P_mean + P_std * torch.randn(n, device=device)) / sigma_d)


def sigma_of(t, sigma_d=0.5):
    """EDM noise level of TrigFlow time t: sigma = sigma_d tan t."""
    return sigma_d * torch.tan(t)


def t_of(sigma, sigma_d=0.5):
    """TrigFlow time of an EDM noise level: t = atan2(sigma, sigma_d) (t_of(inf) = pi/2)."""
    return torch.atan2(sigma, torch.full_like(sigma, sigma_d))


def to_edm(x_t, t):
    """x^EDM = x_t / cos t = x0 + sigma z/sigma_d."""
    return x_t / _col(torch.cos(t), x_t)


def from_edm(x, t):
    """x_t = cos t x^EDM (inverse of to_edm)."""
    return x * _col(torch.cos(t), x)


def F_net(net, x_t, t, sigma_d):
    """F_theta(x_t / sigma_d, t): the raw network, c_in = 1/sigma_d, c_noise(t) = t."""
    return net(x_t / sigma_d, t)


def consistency_fn(net, x_t, t, sigma_d):
    """(sCM Sec. 3, App. E.1) f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t) (Eq. 5); f(x,
    0) = x exactly."""
    return _col(torch.cos(t), x_t) * x_t - _col(torch.sin(t), x_t) * sigma_d * F_net(net, x_t, t, sigma_d).to(x_t.dtype)


def ddim_step(net, x_t, t, s, sigma_d):
    """TrigFlow DDIM (App. E.1): x_s = cos(t - s) x_t - sin(t - s) sigma_d F(x_t / sigma_d, t); s = 0 gives
    the one-step map f(x_t, t) = cos t x_t - sin t sigma_d F (sCM Sec. 3, App. E.1)."""
    F = F_net(net, x_t, t, sigma_d).to(x_t.dtype)
    return _col(torch.cos(t - s), x_t) * x_t - _col(torch.sin(t - s), x_t) * sigma_d * F


def diffusion_loss(F, v_t, sigma_d, w=None):
    """(sCM Eq. 4) L_diff = E[||sigma_d F - v_t||^2], here with 1/D (a mean over elements, as Eq. 8's e^w / D; Eq. 4
    prints no 1/D); with w_phi: E[e^w term - w] (EDM2 form). fp32."""
    F = F.to(torch.promote_types(F.dtype, torch.float32))
    term = (sigma_d * F - v_t.to(F.dtype)).square().flatten(1).mean(1)
    return (term if w is None else torch.exp(w) * term - w).mean()


# ========================================================================= method: the continuous-time CM step (Sec. 4)
def warmup_r(step, H):
    """(sCM Alg. 1, Sec. 4.2) tangent warm-up r = min(1, step / H) (Alg. 1); H = 0: no warm-up."""
    return 1.0 if H <= 0 else min(1.0, step / H)


def jvp_F(net, x_t, t, dxdt, sigma_d):
    """(sCM Sec. 5.1) (F^-, J) with J = sigma_d cos t sin t dF^-/dt: torch.func.jvp of (u, s) -> F(u, s) at the
    primal (x_t/sigma_d, t) with tangents (cos t sin t dx_t/dt, sigma_d cos t sin t). The u-tangent has no
    1/sigma_d; the per-sample t-tangent has shape (B,); cos t sin t is applied before the forward-mode pass so
    intermediate tangents stay O(1). On the *unwrapped, eager* network with the live weights."""
    cs = torch.cos(t) * torch.sin(t)
    return torch.func.jvp(lambda u, s: net(u, s), (x_t / sigma_d, t), (_col(cs, dxdt) * dxdt, sigma_d * cs))


def tangent(net, x_t, t, dxdt, r, sigma_d):
    """(sCM Alg. 1, Sec. 4.2) g_raw = -cos^2 t (sigma_d F^- - dx_t/dt) - r (cos t sin t x_t + J); at r = 1 it
    equals cos t df^-/dt, with df^-/dt the CM's derivative along the ODE path (sCM Eq. 6), and the loss's gradient
    then points where that of the continuous-time objective (sCM Eq. 2) does (docs/scm.md, "Which way the loss moves
    F"). Call under no_grad: returns (F^-, g_raw), both without grad_fn."""
    cos, sin = torch.cos(t), torch.sin(t)
    F_minus, J = jvp_F(net, x_t, t, dxdt, sigma_d)  # (sCM Sec. 5.1)
    g_raw = -_col(cos * cos, x_t) * (sigma_d * F_minus - dxdt) - r * (_col(cos * sin, x_t) * x_t + J)
    return F_minus, g_raw


def normalise(g_raw, c=0.1, kind="l2"):
    """(sCM Sec. 4.2, Alg. 1) g = g_raw / (||g_raw|| + c), ||.|| the per-sample L2 norm over all D elements
    (pinned), or the RMS norm ||g_raw|| / sqrt(D) with kind = "rms" (FastGen)."""
    n = g_raw.flatten(1).norm(dim=1)
    if kind == "rms":
        n = n / math.sqrt(g_raw[0].numel())
    return g_raw / (_col(n, g_raw) + c)


def cm_loss(F, g, w):
    """(sCM Eq. 8) L = mean_batch[e^{w(t)}/D ||F_theta - sg(F_theta) - g||^2 - w(t)] (Eq. 8), in fp32. F is the grad
    pass's output; sg(F) is the same tensor detached, so the residual is exactly -g in value and the gradient is
    mean[-2 e^w / D g^T dF/dtheta] (derived, not printed in the paper: docs/scm.md, "Which way the loss moves F")."""
    F = F.to(torch.promote_types(F.dtype, torch.float32))  # fp32 at least (fp64 in the tests)
    D = F[0].numel()
    return (torch.exp(w) / D * (F - F.detach() - g).square().flatten(1).sum(1) - w).mean()


def cm_step_loss(model, net, teacher, x0, z, t, r, cfg, env):
    """One sCT/sCD loss (sCM Alg. 1). model: the student (maybe DDP/compiled) returning
    (F_theta, w_phi); net: the same network unwrapped (JVP pass); teacher: TrigFlow teacher for sCD, else None.
    Returns (L, mean ||g_raw||)."""
    sd = cfg.sigma_d
    x_t = interpolate(x0, z, t)  # (sCM Sec. 3)
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.no_grad(), C.strict_fp32(env.device):  # the JVP pass in fp32 with TF32 off
        if teacher is None:
            dxdt = velocity(x0, z, t)  # (sCM Alg. 1) sCT: the one-sample velocity
        else:
            dxdt = sd * F_net(teacher, x_t, t, sd).float()  # (sCM Alg. 1) sCD: teacher's EMA, eval, fp32, no grad
        with torch.random.fork_rng(devices=devices):  # the grad pass replays the same dropout mask
            _, g_raw = tangent(net, x_t, t, dxdt, r, sd)  # (sCM Alg. 1, Sec. 4.2; the JVP: Sec. 5.1)
        g = normalise(g_raw, cfg.c, cfg.tangent_norm)  # (sCM Sec. 4.2, Alg. 1)
    with C.autocast(env):
        F, w = model(x_t / sd, t)  # grad pass (bf16 on CUDA), F_theta and w_phi(t)
    return cm_loss(F, g, w), g_raw.flatten(1).norm(dim=1).mean()  # (sCM Eq. 8)


class Student(nn.Module):
    """The trained modules: the network F_theta and the weight head w_phi(t) (common WeightHead); one
    DDP unit. forward(u, t) -> (F_theta(u, t), w_phi(t)); w = 0 when there is no head."""

    def __init__(self, net, head=None):
        super().__init__()
        self.net, self.head = net, head

    def forward(self, u, t, aug=None):
        F = self.net(u, t, **({} if aug is None else dict(aug=aug)))  # aug: EDM's augmentation labels
        return F, self.head(t) if self.head is not None else torch.zeros_like(t, dtype=torch.float32)


# ============================================================================================================== sampler
def _dtype(net):  # samplers follow the network's precision (fp64 in the oracle tests)
    return next((p.dtype for p in [*net.parameters(), *net.buffers()] if p.is_floating_point()), torch.float32)


def cm_times(K, cfg):
    """Sampling times (sCM App. G.2): t_0 = t_max = arctan(sigma_max / sigma_d); K = 2 adds cfg.t_mid (1.1 in
    cifar10); K > 2 uses t_k = t_mid (K - k)/(K - 1), k = 1..K-1 (project's choice)."""
    t_max = math.atan(cfg.sigma_max / cfg.sigma_d)
    return [t_max] + [cfg.t_mid * (K - k) / (K - 1) for k in range(1, K)]


@torch.no_grad()
def cm_sample(net, rng, shape, K, cfg, env, clip=True):
    """Multistep CM sampling (Song et al. 2023) in TrigFlow form: x = f(sigma_d e_0, t_0), then
    x = f(cos t_k x + sin t_k sigma_d e_k, t_k) with *fresh* per-index noise e_k."""
    B, sd, dt = len(rng.gens), cfg.sigma_d, _dtype(net)
    full = lambda v: torch.full((B,), v, device=env.device, dtype=dt)
    x = None
    for k, tk in enumerate(cm_times(K, cfg)):
        e = sd * rng.randn(B, *shape).to(dt)
        x_t = e if k == 0 else math.cos(tk) * x + math.sin(tk) * e
        with C.autocast(env):
            x = consistency_fn(net, x_t, full(tk), sd).to(dt)
    return x.clamp(-1, 1) if clip and len(shape) == 3 else x


def edm_sigmas(K, sigma_max=80.0, sigma_min=0.002, rho=7.0):
    """EDM grid sigma_i = (s_max^(1/rho) + i/(K-1) (s_min^(1/rho) - s_max^(1/rho)))^rho, i < K, then 0; K = 1:
    [s_max, 0]."""
    if K == 1:
        return [sigma_max, 0.0]
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return [(a + i / (K - 1) * (b - a)) ** rho for i in range(K)] + [0.0]


@torch.no_grad()
def heun_sample(net, rng, shape, K, cfg, env, clip=True):
    """Diffusion sampler: EDM Heun in x^EDM = x_t / cos t with the denoiser D(x; sigma) = f_theta(cos t x, t),
    t = atan2(sigma, sigma_d); the last step is Euler (2K - 1 NFE). K = 1 is the teacher used as a 1-step CM."""
    B, sd = len(rng.gens), cfg.sigma_d
    sig = edm_sigmas(K, cfg.sigma_max)
    x = sig[0] * rng.randn(B, *shape).to(_dtype(net))

    def D(x, s):
        t = t_of(torch.full((B,), s, device=env.device, dtype=x.dtype), sd)
        with C.autocast(env):
            return consistency_fn(net, from_edm(x, t), t, sd).to(x.dtype)
    for s_cur, s_next in zip(sig[:-1], sig[1:]):
        d = (x - D(x, s_cur)) / s_cur
        x_next = x + (s_next - s_cur) * d
        if s_next > 0:
            x_next = x + (s_next - s_cur) * 0.5 * (d + (x_next - D(x_next, s_next)) / s_next)
        x = x_next
    return x.clamp(-1, 1) if clip and len(shape) == 3 else x


def sampler(net, cfg, mode, shape, K, env):
    """rng -> samples: the CM sampler for sct/scd, Heun with K steps for a diffusion model (sCM App. G.1)."""
    fn = heun_sample if mode == "diffusion" else cm_sample
    return lambda rng, labels=None: fn(net, rng, shape, K, cfg, env)


def nfe(mode, K):
    return 2 * K - 1 if mode == "diffusion" else K


# ============================================================================================================= plumbing
def net_dict(cfg, data):
    """One time input, time_scale 1 (c_noise(t) = t through the positional embedding), no labels."""
    if data.kind == "images":
        if cfg.net == "mlp":
            raise C.UserError("--net mlp is for 2-D points; use tiny, small or ddpmpp for images.")
        return C.net_config(cfg.net, img_resolution=data.shape[1], in_channels=data.shape[0], adn=cfg.adn,
                            dropout=cfg.dropout, augment_dim=C.augment_dim(**C.EDM_AUGMENT) if cfg.augment else 0)
    if cfg.net != "mlp":
        raise C.UserError(f"--net {cfg.net} is an image network; 2-D points need --net mlp.")
    if cfg.augment:
        raise C.UserError("--augment is EDM's image augmentation; 2-D points take --augment 0.")
    return C.net_config("mlp", width=cfg.width, depth=cfg.depth, adn=cfg.adn, dropout=cfg.dropout)


def sample_shape(nd):
    nd = nd["denoiser"]["net"] if nd.get("kind") == "edm_trigflow" else nd
    return (nd["dim"],) if nd["kind"] == "mlp" else (nd["in_channels"], nd["img_resolution"], nd["img_resolution"])


def check_scm(ck, path, mode=None, sigma_d=None):
    """Refuse a checkpoint of another method, mode, sigma_d or convention in one sentence."""
    got = dict(method=ck["method"], mode=ck["config"].get("mode"), sigma_d=ck["config"].get("sigma_d"),
               convention=ck["convention"])
    want = dict(method=METHOD, mode=mode, sigma_d=sigma_d, convention=CONVENTION)
    bad = [k for k, v in want.items() if v is not None and got[k] != v]
    if bad:
        raise C.UserError(f"'{path}' is not a usable scm {mode + ' ' if mode else ''}checkpoint: " + ", ".join(
            f"{k} is {got[k]!r}, expected {want[k]!r}" for k in bad) + ".")


class EDMTrigFlow(nn.Module):
    """An EDM denoiser D (common.EDMDenoiser, e.g. EDM's released CIFAR-10 network) as this file's network:
    F(x_t / sigma_d, t) = (cos t x_t - D(x_t / cos t; sigma_d tan t)) / (sigma_d sin t), the TrigFlow velocity of
    EDM's x-prediction (sCM App. B.2, Eq. 30: sigma = sigma_d tan t; docs/scm.md, "TrigFlow and EDM"), as
    NVlabs/FastGen's TrigFlowPrecond wraps EDM networks. Used as an sCD teacher and, trained, as the student it
    initialises."""

    def __init__(self, den, sigma_d=0.5):
        super().__init__()
        self.den, self.sigma_d = den, sigma_d
        self.config = dict(kind="edm_trigflow", denoiser=den.config(), sigma_d=sigma_d)

    def forward(self, u, t):
        x_t = self.sigma_d * u.float()
        t = torch.as_tensor(t, device=u.device, dtype=torch.float32).reshape(-1).expand(u.shape[0])
        t = t.clamp(1e-4, math.pi / 2 - 1e-4)  # sin t > 0 and cos t > 0: D's sigma stays finite and non-zero
        c, s = _col(t.cos(), x_t), _col(t.sin(), x_t)
        x_hat = self.den(x_t / c, self.sigma_d * t.tan())
        return ((c * x_t - x_hat) / (self.sigma_d * s)).to(u.dtype)


def build(nd):
    """A checkpoint's `net` dict -> the network (common.build_net, or EDMTrigFlow around an EDM denoiser)."""
    if nd.get("kind") == "edm_trigflow":
        return EDMTrigFlow(C.EDMDenoiser.from_config(nd["denoiser"]), nd["sigma_d"])
    return C.build_net(nd)


def with_dropout(nd, p):
    """The net dict with dropout p (the EDM denoiser's own network for kind 'edm_trigflow')."""
    if nd.get("kind") == "edm_trigflow":
        return {**nd, "denoiser": {**nd["denoiser"], "net": {**nd["denoiser"]["net"], "dropout": p}}}
    return {**nd, "dropout": p}


EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"  # EDM's released network pickles


def load_teacher(path, cfg):
    """A TrigFlow diffusion checkpoint written by this file (EMA weights, eval, frozen) and its checkpoint dict; an EDM
    network pickle (.pkl) -> EDMTrigFlow around it and a checkpoint-like dict (net, ema = its weights)."""
    if path.endswith(".pkl"):
        if not os.path.exists(path) and os.path.basename(path).startswith("edm-"):
            raise C.UserError(f"EDM checkpoint '{path}' not found; download {EDM_URL}{os.path.basename(path)} and "
                              f"place it there.")
        den, info = C.load_edm(path)
        if info["label_dim"]:
            raise C.UserError(f"'{path}' is class-conditional; scm.py distils unconditional teachers.")
        net = EDMTrigFlow(den, cfg.sigma_d)
        return net.eval().requires_grad_(False), dict(net=net.config, ema=net.state_dict(), step=0, config={})
    if not os.path.isfile(path):
        raise C.no_file(path, "the teacher")
    ck = C.load_checkpoint(path)
    check_scm(ck, path, "diffusion", cfg.sigma_d)
    net = build(ck["net"])
    C.load_state_strict(net, ck["ema"])  # G.2: the teacher's EMA
    return net.eval().requires_grad_(False), ck


@torch.no_grad()
def evaluate(net, cfg, mode, data, env, out, step):
    """Samples beside the data (PNG) and, for points, the common toy metrics (metrics.jsonl). CMs at
    cfg.eval_steps; a diffusion model with Heun (heun_steps) and as a 1-step CM (a must-fail control of the toy
    test)."""
    shape = sample_shape(C.unwrap(net).config)
    sheet = C.EvalSheet(data, shape, cfg.eval_n, cfg.seed, step, mode=mode)
    for K in ([cfg.heun_steps, 1] if mode == "diffusion" else cfg.eval_steps):
        title = f"{mode} {C.n_steps(K)}" + (" (Heun)" if mode == "diffusion" else "")
        sheet.add(K, title, sampler(net, cfg, mode, shape, K, env)(sheet.rng(env.device)))
    return sheet.write(out)


# ============================================================================================================= training
def resumed(cfg, given, log=None):
    """-> (the checkpoint this run resumes, or None; the run's config): DIR/ckpt.pt read and checked, and the command
    line applied by the resume rules (common.resume_config; `log` takes its notes, else common.note). `--mode all`
    calls it for its consistency models' checkpoints before any mode runs (run)."""
    path = os.path.join(cfg.out, "ckpt.pt")
    if not (cfg.resume or (cfg.resume is None and os.path.exists(path))):
        return None, cfg
    ck = C.load_checkpoint(path)
    check_scm(ck, path, cfg.mode)
    fixed = [k for k in ("sigma_d", "weighting", "tangent_norm", "diffusion_adaptive_weight", "teacher")
             if cfg.mode in MODE_ONLY.get(k, (cfg.mode,))]  # (a field this mode does not read: --mode all gives it
    return ck, C.resume_config(Config, ck, cfg, given, path, fixed=fixed, drop=("mode",), log=log)  # to every mode)


def train(cfg, given, env):
    """One mode (diffusion, sct or scd): data, init, optimiser, EMA, logging, checkpoints, evaluation."""
    mode, path = cfg.mode, os.path.join(cfg.out, "ckpt.pt")
    ck, cfg = resumed(cfg, given)
    if cfg.preset == "cifar10" and mode == "sct" and "mode" not in given and not cfg.teacher and not ck:
        raise C.UserError("the cifar10 recipe starts sCT and sCD from a TrigFlow teacher's EMA (sCM, Appendix G.2): "
                          "run --mode diffusion, then --mode sct or scd with --teacher "
                          "runs/scm-diffusion-cifar10/ckpt.pt (or --mode all); the default --mode sct would train sCT "
                          "from scratch (give --mode sct for that path).")
    C.require_detector(cfg, env)  # --fallback false: a missing FID detector stops the run now, in one sentence
    data = C.load_data(cfg.data, cfg.root, env, cfg.seed, cfg.xflip)
    C.refuse_unused(given, data.kind, points=("width", "depth"), images=("xflip",))
    if given.get("augment") and cfg.mode != "diffusion":  # (a saved value, as old sCT runs have, is not refused)
        raise C.UserError("--augment (EDM's augmentation) is read by --mode diffusion only; the consistency models "
                          "train without it.")
    teacher, init, tid = None, None, None
    if mode == "scd" and not cfg.teacher:
        raise C.UserError(f"--mode scd distils a TrigFlow teacher: pass --teacher with the ckpt.pt of a --mode "
                          f"diffusion run (runs/scm-diffusion-{cfg.preset}/ckpt.pt by default) or an EDM network "
                          f"pickle, or run --mode all.")
    if mode == "diffusion" and cfg.teacher:
        raise C.UserError("--mode diffusion trains from scratch; drop --teacher.")
    if cfg.teacher and mode != "diffusion" and any(k in given for k in ("net", "width", "depth", "adn")):
        raise C.UserError(f"--mode {mode} takes its network from '{cfg.teacher}'; drop --net/--width/--depth/--adn.")
    # sCT only started from its teacher: a resume reads neither its file nor its weights, unless it is named at another
    # path (then its weights are checked); sCD reads it at every step, so a resumed sCD needs the same weights
    if cfg.teacher and mode == "sct" and ck and C.same_file(cfg.teacher, ck["config"].get("teacher")):
        nd, tid = with_dropout(ck["net"], cfg.dropout), ck.get("teacher_id")
    elif cfg.teacher and mode != "diffusion":
        teacher, tck = load_teacher(cfg.teacher, cfg)
        tid = C.teacher_id(ck, path, cfg.teacher, tck["ema"])
        # architecture from the teacher, dropout from the preset (sCM App. G)
        nd = with_dropout(tck["net"], cfg.dropout)
        init = tck["ema"]
        if mode == "scd":  # sCT's teacher only initialises it (another data set is a fine-tune)
            C.check_teacher_data(tck["config"], data.key, cfg.teacher)
        teacher = teacher.to(env.device) if mode == "scd" else None
    else:
        nd = net_dict(cfg, data)
    if cfg.teacher and sample_shape(nd) != tuple(data.shape):
        raise C.UserError(f"teacher '{cfg.teacher}' generates {sample_shape(nd)}, the data is {tuple(data.shape)}.")
    net = build(nd).to(env.device)
    use_head = cfg.weighting == "adaptive" if mode != "diffusion" else cfg.diffusion_adaptive_weight
    head = C.WeightHead(1, 128, 1.0).to(env.device) if use_head else None
    if ck:
        C.check_resume_net(ck["net"], nd, path)
        C.load_state_strict(net, ck["model"])
        if head is not None:
            C.load_state_strict(head, ck.get("weight_head"))
    elif init is not None:
        C.load_state_strict(net, init)  # G.2: online and EMA weights start at the teacher's EMA; head at zero
    if mode != "diffusion":  # the CMs feed no augmentation labels: a teacher's map_augment (the cifar10 teacher's,
        C.freeze_unfed_augment(net)  # EDM's pickles') stays the teacher's (DDP refuses a parameter without gradient)
    params = [*net.parameters(), *(head.parameters() if head is not None else [])]  # theta and phi
    model = C.distribute(Student(C.maybe_compile(net, cfg.compile), head), env)
    ema = C.EMA(net, halflife_kimg=cfg.ema_halflife_kimg, rampup=cfg.ema_rampup)
    opt_cls = torch.optim.RAdam if cfg.optim == "radam" else torch.optim.Adam
    opt = opt_cls(params, lr=cfg.lr, betas=(0.9, cfg.beta2), eps=1e-8, weight_decay=0.0, foreach=True)
    if ck:
        C.load_state_strict(ema.model, ck["ema"])
        C.load_optimizer(opt, ck["opt"])  # moments from the checkpoint, lr and betas from this run's config
    gens = [data.gen] if data.gen is not None else []
    if ck:
        C.restore_rng(ck, env, gens)
    step = ck["step"] if ck else 0

    per_rank = cfg.batch // (env.world * cfg.accum)
    if per_rank * env.world * cfg.accum != cfg.batch:
        raise C.UserError(f"--batch {cfg.batch} is not divisible by world size {env.world} x --accum {cfg.accum}.")
    scaler = C.make_scaler(env, ck)  # (a malformed saved state: its sentence before the run's first line)
    log = C.Logger(cfg.out, env, cfg.iters, cfg.batch, cfg, start_step=ck and step)
    if mode == "sct" and not cfg.teacher and not ck:
        log.info(f"note: sCT from scratch; the paper initialises sCT from a TrigFlow teacher's EMA (App. G.2): pass "
                 f"--teacher with a --mode diffusion run's ckpt.pt (runs/scm-diffusion-{cfg.preset}/ckpt.pt by "
                 f"default) for that, or run --mode all.")
    log.info(f"{METHOD} {mode} | world {env.world} | global batch {cfg.batch} = {env.world} x {per_rank} x "
             f"{cfg.accum} | device {env.device} | precision {env.precision}"
             f"{' (JVP fp32, TF32 off)' if mode != 'diffusion' else ''} | "
             f"params {sum(p.numel() for p in net.parameters()):,} | step {step}/{cfg.iters}"
             + (f" | c {cfg.c} {cfg.tangent_norm} | H {cfg.H} | weighting {cfg.weighting}"
                if mode != "diffusion" else "")
             + (f" | init {cfg.teacher}" if init is not None and not ck else ""))
    fid = C.FidHook(cfg.fid_detector, data, env, cfg.root, cfg.fid_n, log) if cfg.fid_every else None
    sd = cfg.sigma_d
    probe_t = torch.tensor([0.1, 0.6, 1.2], device=env.device)
    guard = C.Guard(env, cfg.max_skips, log, path, ck and step,  # skips non-finite steps, withholds bad checkpoints
                    probe=C.sample_probe(lambda n: sampler(n, cfg, mode, sample_shape(nd), 1, env), (net, ema.model),
                                         env, data))

    def state():
        return dict(model=net.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), net=nd, method=METHOD,
                    convention=CONVENTION, sigma_d=sd, teacher_id=tid,
                    weight_head=head.state_dict() if head is not None else None)

    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    model.train()
    while step < cfg.iters:
        if cfg.lr_ramp_kimg > 0 or cfg.lr_schedule == "cosine":  # host-side floats: no sync
            ramp = min(1.0, step * cfg.batch / (cfg.lr_ramp_kimg * 1000)) if cfg.lr_ramp_kimg > 0 else 1.0  # EDM (G.1)
            decay = 0.5 * (1 + math.cos(math.pi * step / cfg.iters)) if cfg.lr_schedule == "cosine" else 1.0
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * ramp * decay
        r = warmup_r(step, cfg.H)  # (sCM Alg. 1, Sec. 4.2), from this run's saved step: exact after a resume
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(2, device=env.device)
        for rnd in range(cfg.accum):
            with model.no_sync() if ddp and rnd < cfg.accum - 1 else contextlib.nullcontext():
                # ---- ALGO LOGIC: one sCT / sCD / diffusion loss (sCM Alg. 1) -----------------------------------------
                part, parts = rnd * env.world + env.rank, env.world * cfg.accum
                x0, _ = data.batch(per_rank, step, part, parts)
                z = sd * torch.randn_like(x0)  # z ~ N(0, sigma_d^2 I)
                if mode == "diffusion":
                    x0, aug = C.augment_batch(x0, cfg.augment, cfg.seed, step, part, parts)  # EDM's pipe
                    t = sample_t(len(x0), cfg.P_mean, cfg.P_std, sd, env.device)  # as sCM Alg. 1 (EDM's P_mean, P_std)
                    with C.autocast(env):
                        F, w = model(interpolate(x0, z, t) / sd, t, aug)  # (sCM Sec. 3), (sCM Eq. 3)
                    L = diffusion_loss(F, velocity(x0, z, t), sd, w if head is not None else None)  # (sCM Eq. 4)
                    gn = torch.zeros((), device=env.device)
                else:
                    t = sample_t(len(x0), cfg.P_mean, cfg.P_std, sd, env.device)  # (sCM Alg. 1)
                    L, gn = cm_step_loss(model, net, teacher, x0, z, t, r, cfg, env)  # (sCM Alg. 1, Eq. 8)
                scaler.scale(L / cfg.accum).backward()
                # ---- end of ALGO LOGIC -------------------------------------------------------------------------------
            stats += torch.stack([L.detach(), gn]) / cfg.accum
        logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.iters
        scaler.unscale_(opt)
        if logging:
            grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None]))
        guard.step(opt, scaler)  # skipped (weights and optimiser state unchanged) if a gradient is not finite
        scaler.update()
        ema.update(net, step * cfg.batch, cfg.batch)
        guard.end_step(stats[0])
        step += 1
        if logging:
            scalars = dict(loss=stats[0], grad_norm=grad_norm)
            if mode != "diffusion":
                scalars.update(g_raw_norm=stats[1], r=r)  # judge by the raw tangent, not the loss
            if head is not None:
                with torch.no_grad():
                    scalars.update({f"w_{v:g}": x for v, x in zip(probe_t.tolist(), head(probe_t))})
            log.log(step, **scalars)
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            guard.checkpoint(step, step == cfg.iters, state, gens)
        if cfg.sample_every and step % cfg.sample_every == 0:  # rank 0 (a failure stops every rank: C.agree)
            C.agree(env, lambda: evaluate(ema.model, cfg, mode, data, env, cfg.out, step))
        if fid and step % cfg.fid_every == 0:  # Heun 18 for the teacher, 1 and 2 steps for the CMs
            fid(step, {f"{nfe(mode, K)} NFE": sampler(ema.model, cfg, mode, sample_shape(ema.model.config), K, env)
                       for K in ([cfg.heun_steps] if mode == "diffusion" else [1, 2])})
    if ck is None and cfg.iters == 0:
        guard.checkpoint(step, True, state, gens)
    def final():  # rank 0 (a failure stops every rank: C.agree, which every rank leaves after it)
        m = evaluate(ema.model, cfg, mode, data, env, cfg.out, step)
        log.info("eval: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k not in ("step", "mode")))
    C.agree(env, final)
    return cfg


# ============================================================================================================= commands
# sample and fid change only these Config fields over the checkpoint's (any other is refused)
SAMPLER_FIELDS = dict(  # the samplers' fields (the first time, the CMs' middle times), the step counts that read them
    sigma_max=None, t_mid=(lambda K: K > 1, "2 steps or more"))


def stages(cfg, given):
    """`--mode all`'s modes -> [(mode, its config, its given fields)]: diffusion in DIR/diffusion, then sCT and sCD in
    DIR/sct and DIR/scd with DIR/diffusion/ckpt.pt as their teacher."""
    plan = []
    for mode in MODES:  # --augment (EDM's pipe) is the teacher's, as in the cifar10 preset: the CMs train without it
        mg = {k: v for k, v in given.items() if mode == "diffusion" or k != "augment"}
        mcfg = C.resolve_config(Config, PRESETS, cfg.preset, {**mg, "out": os.path.join(cfg.out, mode)}, mode=mode)
        mcfg.preset = cfg.preset
        mgiven = C.Given({**mg, "mode": mode}, getattr(given, "preset", None))
        if mode != "diffusion":  # the CMs take the network from the teacher (network flags went to diffusion)
            mcfg.teacher = os.path.join(cfg.out, "diffusion", "ckpt.pt")  # (given: a moved DIR resumes from here)
            mgiven = C.Given({**{k: v for k, v in mgiven.items() if k not in ("net", "width", "depth", "adn")},
                              "teacher": mcfg.teacher}, mgiven.preset)
        plan.append((mode, mcfg, mgiven))
    return plan


def check_resumes(cfg, plan, cms):
    """`--mode all` restarted over the consistency models `cms` (their checkpoints exist): each one's resume, checked
    now as train will (train checks it again), not after the modes before it have printed: the resume rules
    (common.resume_config, its notes dropped) and, where the mode reads its teacher on resume (sCD always, sCT at
    another path), DIR/diffusion's EMA against the weights it started from (`teacher_id`). -> their loss-scaler states
    (for common.make_scaler once the device is set up; not the weights, which train reads again)."""
    cks = [resumed(mcfg, mgiven, log=lambda m: None)[0] for mode, mcfg, mgiven in plan if mode in cms]
    if any(cks):
        tpath = os.path.join(cfg.out, "diffusion", "ckpt.pt")
        tck = C.load_checkpoint(tpath)
        for m, ck in zip(cms, cks):
            if ck and (m == "scd" or not C.same_file(tpath, ck["config"].get("teacher"))):
                C.teacher_id(ck, os.path.join(cfg.out, m, "ckpt.pt"), tpath, tck["ema"])
    return [dict(scaler=ck.get("scaler")) for ck in cks if ck]


def run(cfg, given):
    """One mode, or `all`: diffusion in DIR/diffusion, then sCT and sCD from its EMA in DIR/sct and DIR/scd."""
    began = lambda d: any(os.path.exists(os.path.join(d, f)) for f in ("ckpt.pt", "config.json"))  # a run's files
    parts, single = [m for m in MODES if began(os.path.join(cfg.out, m))], began(cfg.out)
    if cfg.mode != "all" and parts and not single:  # else a new run would start beside the one the folder holds
        raise C.UserError(f"'{cfg.out}' holds a --mode all run (its {', '.join(parts)} in subfolders); continue one "
                          f"mode with --out {os.path.join(cfg.out, cfg.mode)}, or use another --out.")
    if cfg.mode == "all" and single:  # (without --mode, a single-mode run resumes its own: common.parse_cli)
        raise C.UserError(f"'{cfg.out}' holds a single-mode run; use another --out for --mode all (its three runs go "
                          f"in subfolders).")
    if cfg.mode == "all" and "teacher" in given:
        raise C.UserError("--mode all trains its own teacher (DIR/diffusion); drop --teacher, or distil that file "
                          "with --mode scd.")
    C.refuse_other(given, MODE_ONLY, "mode", cfg.mode)
    if cfg.mode == "all":  # restarted without --data/--seed/--preset: every mode takes the diffusion model's
        cfg, given = C.pipeline_data(Config, PRESETS, cfg, given, os.path.join(cfg.out, "diffusion", "ckpt.pt"),
                                     mode="all")
    cms = [m for m in MODES[1:] if os.path.exists(os.path.join(cfg.out, m, "ckpt.pt"))
           and cfg.resume is not False]  # the CMs it resumes (--resume false: every mode starts anew)
    for m in cms if cfg.mode == "all" else ():  # an unreadable one stops the run now, not after the modes before it
        C.load_checkpoint(os.path.join(cfg.out, m, "ckpt.pt"))
    if cfg.mode == "all" and cms:  # their teacher is DIR/diffusion: it must not train on beneath them
        C.check_not_beneath(cfg.out, os.path.join(cfg.out, "diffusion", "ckpt.pt"), given, cms, "diffusion model",
                            f"continue one mode with --out {os.path.join(cfg.out, '<mode>')}")
    plan = stages(cfg, given) if cfg.mode == "all" else []
    scalers = check_resumes(cfg, plan, cms)
    clock, env = C.stopwatch(), C.setup(cfg.device, cfg.seed, cfg.precision)
    total = lambda: env.is_main and print(clock(), flush=True)
    for st in scalers:  # (and their loss-scaler states, read by this process's precision)
        C.make_scaler(env, st)
    if cfg.mode != "all":
        train(cfg, given, env)
        return total()
    for mode, mcfg, mgiven in plan:
        train(mcfg, mgiven, env)
    C.agree(env, lambda: compare(cfg, env))  # rank 0 (a failure stops every rank)
    total()


@torch.no_grad()
def compare(cfg, env):
    """DIR/samples.png: data | teacher (Heun) | teacher as a 1-step CM | sCT and sCD at 1 and 2 steps."""
    rows = [json.loads(open(os.path.join(cfg.out, m, "metrics.jsonl")).read().splitlines()[-1]) for m in MODES]
    panels = []
    for mode in MODES:
        ck = C.load_checkpoint(os.path.join(cfg.out, mode, "ckpt.pt"))
        net = build(ck["net"])
        C.load_state_strict(net, ck["ema"])
        net = net.to(env.device).eval()
        mcfg = C.merge_config(Config, ck["config"], {}, log=lambda m: None)
        shape = sample_shape(ck["net"])
        n = mcfg.eval_n if len(shape) == 1 else min(mcfg.eval_n, 64)
        if mode == "diffusion" and len(shape) == 1:
            g = torch.Generator().manual_seed(C.derive_seed(cfg.seed, "eval"))
            data = C.load_data(mcfg.data, mcfg.root, env, mcfg.seed, False)
            panels.append(("data", C.toy_sample(data.key, n, g) if data.kind == "toy" else
                           data.x[torch.randperm(len(data.x), generator=g)[:n].to(data.x.device)].cpu()))
        for K in ([mcfg.heun_steps, 1] if mode == "diffusion" else [1, 2]):
            xs = sampler(net, mcfg, mode, shape, K, env)(C.IndexRNG(range(n), C.derive_seed(cfg.seed, "eval"),
                                                                    env.device)).cpu()
            m = next(r for r in rows if r["mode"] == mode)
            label = {"diffusion": "teacher"}.get(mode, mode) + f" {C.n_steps(K)}"
            label += f"\nSWD {m[f'swd_{K}']:.3f}" if f"swd_{K}" in m else ""
            panels.append((label, xs if len(shape) == 1 else C.to_uint8(xs).permute(0, 2, 3, 1).numpy()))
    C.save_panels(os.path.join(cfg.out, "samples.png"), panels)
    print(f"wrote {os.path.join(cfg.out, 'samples.png')}")


def sample_or_fid(cmd, opts, given):
    env = C.setup(opts.device, opts.seed, opts.precision or "fp32")  # sample/fid: fp32, TF32 off
    ck = C.load_checkpoint(opts.ckpt)
    check_scm(ck, opts.ckpt)
    if "t_mid" in given and ck["config"].get("mode") == "diffusion":  # a sampler field of the CMs' sampler only
        raise C.UserError("--t_mid is the consistency models' middle time; a diffusion checkpoint samples with EDM's "
                          "Heun (--steps, --sigma_max).")
    base, s = ck["config"], given.get("sigma_max")
    if base.get("mode") != "diffusion" and "t_mid" not in given and isinstance(s, float) and 0 < s < math.inf:
        t_max = math.atan(s / base["sigma_d"])
        if base["t_mid"] >= t_max:  # a --sigma_max whose t_max falls below the checkpoint's t_mid
            if max(opts.steps) > 1:
                raise C.UserError(f"the checkpoint's t_mid {base['t_mid']:g} does not lie below t_max = arctan("
                                  f"sigma_max / sigma_d) = {t_max:.4f} of --sigma_max {s:g}; give a --t_mid in (0, "
                                  f"t_max) too.")
            base = {**base, "t_mid": t_max / 2}  # 1 step reads no t_mid (and refuses a --t_mid): a placeholder
    cfg = C.merge_config(Config, base, given)
    net = build(ck["net"])
    C.load_state_strict(net, ck["ema" if opts.ema else "model"])
    net, mode, shape = net.to(env.device).eval(), cfg.mode, sample_shape(ck["net"])
    name = lambda K: f"{C.n_steps(K)} ({'Heun, ' if mode == 'diffusion' else 'CM, '}{nfe(mode, K)} NFE)"
    C.sample_or_fid(cmd, opts, env, cfg, ck, shape, lambda K: sampler(net, cfg, mode, shape, K, env), name,
                    record=lambda K: dict(mode=mode, nfe=nfe(mode, K)))


def main(argv=None):
    cmd, cfg, given = C.parse_cli(Config, PRESETS, METHOD, argv, sampler=SAMPLER_FIELDS, resumes=lambda c: os.path.join(
        c.out, "diffusion" if c.mode == "all" else "", "ckpt.pt"))  # (--mode all: its teacher's; pipeline_data checks)
    parts = [os.path.join(cfg.out, m) for m in MODES] if cmd == "train" and cfg.mode == "all" else []
    C.preflight(cmd, cfg, {cfg.out: C.RUN_FILES, **dict.fromkeys(parts, C.RUN_FILES)})  # (--mode all: a run each)
    run(cfg, given) if cmd == "train" else sample_or_fid(cmd, cfg, given)


if __name__ == "__main__":
    C.main_guard(main)
