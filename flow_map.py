"""Flow maps: Lagrangian/Eulerian/progressive self-distillation, MeanFlow, direct FMM, and LMD/EMD distillation.

Papers: Boffi, Albergo, Vanden-Eijnden, "Flow Map Matching", arXiv 2406.07507 (FMM, and LMD/EMD: Lagrangian/Eulerian
map distillation); Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: learning flow maps via
self-distillation", arXiv 2505.18825 (LSD, ESD, PSD); Geng, Deng, Bai, Kolter, He, "Mean Flows for One-step
Generative Modeling", arXiv 2505.13447.
Docs:   docs/flow_map.md (conventions, the objectives, derivations, the CIFAR-10 recipes with sources).

The method in a few lines. A flow map X_{s,t} sends the state at time s of the probability-flow ODE dx/dt = b_t(x)
to its state at time t. It is written X_{s,t}(x) = x + (t - s) phi(s, t, x) (Boffi et al. Eq. 6), so that the
tangent condition phi(t, t, .) = b_t (Eq. 7) makes one network learn two things: the velocity, by flow matching on
the diagonal s = t (Eq. 12; Boffi losses.py, diagonal_term), and the jumps off the diagonal, from an identity the
exact map satisfies (Proposition 2.2): the Lagrangian equation dX/dt = b(X) (Eq. 8; LSD, Eq. 13: losses.py
lsd_term; LMD and FMM: Flow Map Matching, arXiv 2406.07507), the Eulerian equation dX/ds + grad X . b = 0 (Eq. 9;
ESD, Eq. 14: losses.py esd_term; the MeanFlow Identity, MeanFlow Eq. 6, in this convention; EMD) or the semigroup
X_{u,t} o X_{s,u} = X_{s,t} (Eq. 10; PSD, Eq. 15: losses.py psd_term). "Boffi et al. Eq. n" numbers the equations
of arXiv 2505.18825; "Boffi losses.py" is the official flow-maps code's file. A sample is N composed jumps on the
uniform grid k/N from noise, N chosen at sampling time (Boffi sample); more steps never hurt the exact map.

Convention (written into every checkpoint): the stochastic interpolant I_t = alpha_t x0 + beta_t x1 with x0 ~ N(0,
sigma0^2 I) noise at t = 0 and x1 data at t = 1 (linear: alpha = 1 - t, beta = t); the network F gets (x / sigma0;
s, t - s) and phi = sigma0 F. MeanFlow (data at t = 0) and the rectified-flow teacher (noise at t = 1) are
converted into it by `meanflow_to_flow_map` (docs/flow_map.md, "MeanFlow in the t = 0-noise convention") and
`rf_velocity` (docs/flow_map.md, "A rectified-flow teacher as a flow-map velocity").

    python flow_map.py                                        # toy: LSD on the checkerboard, samples at 1/2/4/8 steps
    python flow_map.py --mode meanflow                        # other modes: psd, esd, fmm, lmd, emd
    python flow_map.py --data points.npy --out runs/fm-mine
    python flow_map.py --mode lmd --teacher runs/rectified_flow-toy/ckpt.pt --data 8gaussians
    torchrun --nproc_per_node=8 flow_map.py --preset cifar10 [--mode meanflow]
    python flow_map.py sample --ckpt runs/flow_map-lsd-toy/ckpt.pt --steps 1,2,4,8 --out s.png
    python flow_map.py fid --ckpt runs/flow_map-lsd-cifar10/ckpt.pt --steps 1,2,4,8
"""
import contextlib, dataclasses, math, os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

import common as C

METHOD = "flow_map"
RF_METHOD, RF_CONVENTION = "rectified_flow", "x_t=(1-t)x+t*z, v=z-x, t=1 noise"  # rectified_flow.py's own
MODES = ("lsd", "psd", "esd", "meanflow", "fmm", "lmd", "emd")


def convention(interpolant, sigma0):
    return (f"flow map: I_t=alpha_t*x0+beta_t*x1 ({interpolant}), x0~N(0,{sigma0:g}^2), t=0 noise, t=1 data; "
            f"X(s,t,x)=x+(t-s)*phi(s,t-s,x)")


# =============================================================================================================== config
@dataclass
class Config:
    preset: str = "toy"  # preset that filled the defaults (toy, tiny, small, cifar10)
    mode: Literal["lsd", "psd", "esd", "meanflow", "fmm", "lmd", "emd"] = "lsd"  # the objective
    data: str = "checkerboard"  # toy name, cifar10/mnist/fashion_mnist, .npy file, image folder or .zip
    root: str = "data"  # data sets and FID reference statistics are cached here
    out: str = "runs/flow_map-lsd-toy"  # run folder
    teacher: Optional[str] = None  # rectified_flow.py checkpoint or EDM .pkl (lmd, emd only)
    resume: Optional[bool] = None  # None: resume when DIR/ckpt.pt exists
    seed: int = 0  # seeds model init, data order and noise
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Optional[str] = None  # fp32, tf32 (JVPs too), bf16/fp16 (diagonal/PSD forwards only; JVPs fp32)
    compile: bool = False  # torch.compile the network for the diagonal forward (JVPs use the raw module; not meanflow)
    # network (common.net_config, two times (s, t - s), time_scale 1: both reference codes feed raw times)
    net: str = "mlp"  # mlp, tiny, small, ddpmpp
    width: Optional[int] = None  # MLP width (None: common's 128)
    depth: Optional[int] = None  # MLP depth (None: common's 3)
    time_channels: Optional[int] = None  # U-Net time-embedding channels (None: the net's; 256 on CIFAR-10)
    dropout: float = 0.0  # on in the diagonal term and MeanFlow, off in the other off-diagonal terms
    # the method
    interpolant: Literal["linear", "trig"] = "linear"  # Boffi et al. §2; trig only for lsd, psd, esd, fmm
    sigma0: Optional[float] = None  # base std = preconditioner; None: teacher's / data RMS / 0.5 / 1.0
    diag_frac: Optional[float] = None  # share of diagonal rows; None: 0.75 (Boffi), 0.25 for lmd/emd (project)
    pair_order: Literal["forward", "both"] = "forward"  # off-diagonal s <= t (Boffi _sample_triangle sorts) or both
    psd_type: Literal["uniform", "midpoint"] = "uniform"  # PSD (Boffi losses.py psd_term): h ~ U(0, 1) or h = 1/2
    esd_stopgrad: Literal["full", "convex"] = "full"  # ESD (esd_term): grad X . b under no_grad, or only b stopped
    lambda_inv: float = 1.0  # FMM (2406.07507): the direct loss's invertibility term (0: 2024 FMM code's lagrangian)
    time_sampler: Literal["v0", "v1"] = "v0"  # MeanFlow (s, t) sampler
    learned_weight: bool = False  # Boffi losses.py: l <- exp(-w(s,t)) l + w(s,t), a zero-initialised WeightHead
    adaptive_p: float = 0.75  # adaptive weighting l / sg(l + c)^p of meanflow and emd (MeanFlow §4.3)
    adaptive_c: float = 1e-3  # c of the adaptive weighting (MeanFlow §4.3)
    # optimisation
    iters: int = 2000  # optimiser steps
    batch: int = 1024  # global batch per optimiser step (split over ranks and accumulation rounds)
    accum: int = 1  # gradient accumulation rounds
    lr: float = 1e-3  # Adam learning rate, betas (0.9, 0.999), eps 1e-8, no weight decay
    warmup: int = 0  # linear learning-rate warm-up steps from 0
    lr_schedule: Literal["const", "sqrt", "cosine"] = "const"  # sqrt: lr max(step / lr_ref, 1)^(-1/2) (Boffi);
    #   cosine: lr x (1 + cos(pi step / iters)) / 2 (toy preset)
    lr_ref: int = 35_000  # reference step of the sqrt decay (Boffi)
    clip: Optional[float] = None  # gradient-norm clipping (network and weight head)
    ema: float = 0.999  # EMA decay (sampling only; the LSD teacher is the online network)
    xflip: bool = False  # random horizontal flips
    augment: float = 0.0  # EDM's augmentation probability p as py-meanflow v0 runs it (mode meanflow; 0 off)
    arch: Literal["edm", "py-meanflow"] = "edm"  # py-meanflow: its v0 SongUNet (concatenated times, [1,3,3,1], q|k|v)
    # sampling (Boffi sample)
    sampler: Literal["map", "ode"] = "map"  # map: N jumps on k/N; ode: Euler on b = phi(t, t, .) (diagnostic)
    # logging and evaluation
    log_every: int = 200  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample pictures (0: end only)
    eval_n: int = 4000  # evaluation samples (toy metrics)
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])  # step counts plotted
    fid_every: int = 0  # steps between FID proxies (images; 0: never)
    fid_n: int = 10_000  # samples of the in-training FID proxy
    fid_detector: str = "inception"  # inception or a TorchScript path
    fallback: bool = True  # a missing weights file (Inception; LPIPS): warn and go on without it (False stops)
    max_skips: int = 100  # stop after this many optimiser steps in a row with non-finite gradients (each is skipped)

    def check(self):
        if self.mode in ("lmd", "emd") and not self.teacher:
            raise ValueError(f"--mode {self.mode} distils a rectified_flow.py checkpoint or an EDM .pkl; give it "
                             f"with --teacher PATH.")
        if self.mode not in ("lmd", "emd") and self.teacher:
            raise ValueError(f"--teacher is only used by --mode lmd or emd, not by {self.mode}.")
        if self.interpolant == "trig" and self.mode in ("meanflow", "lmd", "emd"):
            raise ValueError(f"--interpolant trig is not available with --mode {self.mode} (its conversion is linear).")
        if self.augment and self.mode != "meanflow":
            raise ValueError(f"--augment is wired for --mode meanflow (py-meanflow's v0 recipe) only, not --mode "
                             f"{self.mode}.")
        if self.compile and self.mode == "meanflow":
            raise ValueError("--mode meanflow computes its whole loss as one JVP of the raw network: --compile would "
                             "compile nothing; drop it.")
        if self.learned_weight and self.mode in ("meanflow", "emd"):
            raise ValueError(f"--mode {self.mode} uses the adaptive weighting; drop --learned_weight.")
        if not self.data:
            raise ValueError("this preset needs --data (for example a uint8 (N, 16, 16, 3) .npy file).")


RANGES = dict(width=C.NET_SIZE, depth=C.NET_SIZE, time_channels="[4, 2147483647]", diag_frac="[0, 1]", sigma0="> 0",
              adaptive_c="> 0", lr_ref=">= 1")  # beside common.RANGES
# the objective's own options: another mode refuses them (common.refuse_other) instead of recording them unread
MODE_ONLY = {"psd_type": ("psd",), "esd_stopgrad": ("esd",), "lambda_inv": ("fmm",), "time_sampler": ("meanflow",),
             **dict.fromkeys(("adaptive_p", "adaptive_c"), ("meanflow", "emd")),  # (MeanFlow: the whole batch is
             "diag_frac": ("lsd", "psd", "esd", "fmm", "lmd", "emd"),  # one term; fmm keeps both pair orders)
             "pair_order": ("lsd", "psd", "esd", "lmd", "emd")}
# py-meanflow v0 (models/model_configs.py, models/unet.py): its SongUNet concatenates the two time embeddings,
# resamples with [1,3,3,1] and splits q|k|v in blocks; its augmentation (training/train_loop.py) is EDM's pipe
# without y-flips and rotations (augment_dim 6)
# ============================================================================================================== presets
PY_MEANFLOW_NET = dict(time_combine="concat", resample_filter=[1, 3, 3, 1], qkv_order="blocks")
MEANFLOW_AUGMENT = dict(xflip=1e8, scale=1, aniso=1, translate_frac=1)

_NO_LEARNED = dict(meanflow=dict(learned_weight=False), emd=dict(learned_weight=False))
PRESETS = {  # nested dicts apply to one --mode
    # toy: Boffi's 2-D setting (no weighting, clip 10). A 256x4 MLP at 2048 x 4000 takes ~15 min on one
    # CPU thread here, so the toy preset is the first minute: a 64 x 3 MLP at 512 x 1000 with a cosine learning-rate
    # decay (measured on the 2-core CPU machine, benchmarks/results/toy_defaults.md: 38 s, 36-47 over 3 runs; in-square
    # 0.74 / 0.78 / 0.79 / 0.81 at 1 / 2 / 4 / 8 steps; 128 x 3 with a constant lr, 2026-12-03, when this preset took
    # 52 s: ~70 s and 0.69 / 0.75 / 0.76 / 0.77); the bigger recipe stays available by flags.
    "toy": dict(data="checkerboard", net="mlp", width=64, depth=3, batch=512, iters=1000, lr=1e-3, clip=10.0,
                ema=0.99, log_every=100, lr_schedule="cosine"),
    "tiny": dict(data="", net="tiny", dropout=0.1, batch=8, iters=3, lr=1e-3, clip=1.0, ema=0.9, learned_weight=True,
                 log_every=1, ckpt_every=3, eval_n=16, eval_steps=[1, 2], fid_n=16, **_NO_LEARNED),
    "small": dict(data="cifar10", net="small", dropout=0.1, precision="bf16", batch=256, iters=35_000, lr=3e-4,
                  warmup=2000, clip=1.0, ema=0.9995, xflip=True, learned_weight=True, log_every=500,
                  ckpt_every=5000, eval_n=64, fid_every=5000, fid_n=10_000, **_NO_LEARNED),
    # cifar10: Boffi py/configs/cifar10.py for lsd/psd/esd/fmm (batch 512 x 400k, dropout 0.13, clip 1, learned
    # weight, EMA 0.9999, 75% diagonal); optimiser Adam 6e-4 with py-meanflow's warm-up (200 epochs of 48 steps x 1024
    # = 9.83 Mimg); time_channels 256 = py-meanflow's noise mult 2; x-flips (a project choice: Boffi's data has none).
    # The DDPM++ network and this optimiser are a project choice, never validated for LSD: Boffi et al. trained an
    # EDM2 magnitude-preserving U-Net with RAdam 1e-2 and the sqrt decay (docs/flow_map.md, "Deviations").
    # precision: fp32 with TF32 off (NVlabs/FastGen's MeanFlow config sets trainer.tf32_enabled False,
    # configs/methods/config_mean_flow.py; Boffi's JAX runs are fp32)
    "cifar10": dict(fallback=False,  # a missing weights file stops the run: no silent fallback
                    data="cifar10", net="ddpmpp", time_channels=256, dropout=0.13, batch=512, iters=400_000, lr=6e-4,
                    precision="fp32",
                    warmup=19_200, clip=1.0, ema=0.9999, xflip=True, learned_weight=True, log_every=500,
                    ckpt_every=10_000, eval_n=64, fid_every=50_000, fid_n=10_000,
                    # MeanFlow: py-meanflow cifar10_v0.sh and train.py (batch 128 x 8 GPUs; each rank's 6,250 images
                    # make 48 full batches an epoch (drop_last), so 16,000 epochs = 768,000 steps and 200 warm-up
                    # epochs = 9,600; dropout 0.2, no clipping, adaptive p = 0.75, LN(-2, 2) times, LN(2, 2) in this
                    # file's time: docs/flow_map.md), its network and data pipe: py-meanflow's SongUNet variant
                    # (arch), RandomHorizontalFlip on the data (training/data_transform.py) and then EDM's
                    # augmentation at p = 0.12 without y-flips and rotations (training/train_loop.py; augment_dim 6);
                    # TF32 matmuls and convolutions, JVP included (train.py: set_float32_matmul_precision('high'),
                    # cuDNN's default). Deviation: one EMA (0.9999) updated every step; py-meanflow keeps three
                    # (0.9999, 0.99995, 0.9996), each updated every 16 steps with decay^16 (models/ema.py)
                    meanflow=dict(dropout=0.2, batch=1024, iters=768_000, warmup=9_600, clip=None,
                                  learned_weight=False, time_sampler="v0", arch="py-meanflow", augment=0.12,
                                  xflip=True, precision="tf32"),
                    lmd=dict(iters=200_000), emd=dict(iters=200_000, learned_weight=False)),  # project, untested
}


# ==================================================================================================== method: the maths
def bc(v, x):
    """A per-sample vector (B,) broadcast against x (B, ...)."""
    return v.reshape(-1, *[1] * (x.ndim - 1))


def sumsq(r):
    """Per-sample sum over coordinates/pixels."""
    return r.square().flatten(1).sum(1)


def coeffs(t, interpolant="linear"):
    """The stochastic interpolant, Boffi et al. §2: alpha_t, beta_t and their time derivatives."""
    if interpolant == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    a = 0.5 * math.pi * t
    return a.cos(), a.sin(), -0.5 * math.pi * a.sin(), 0.5 * math.pi * a.cos()


def interpolate(x0, x1, t, interpolant="linear"):
    """The stochastic interpolant, Boffi et al. §2.1, Eq. 1: I_t = alpha_t x0 + beta_t x1 and dI_t/dt = alpha'_t x0 +
    beta'_t x1."""
    al, be, dal, dbe = (bc(c, x0) for c in coeffs(t, interpolant))
    return al * x0 + be * x1, dal * x0 + dbe * x1


def net_phi(net, sigma0, aug=None):
    """phi, the v_{s,t} of Boffi et al. Eq. 6, preconditioned as Boffi's edm2_net.py PrecondFlowMap: phi(x, s, t) =
    sigma0 F(x / sigma0; s, t - s): the network's two times are s and Delta = t - s (their App. G.2); `aug`:
    augmentation labels of the whole batch (mode meanflow only), None at sampling."""
    kw = {} if aug is None else dict(aug=aug)
    return lambda x, s, t: sigma0 * net(x / sigma0, s, t - s, **kw)


def flow_map(phi, x, s, t):
    """The map, Boffi et al. §2.2, Eq. 6: X_{s,t}(x) = x + (t - s) phi(s, t, x) (phi is the paper's v_{s,t}; the
    lambdas here take it as phi(x, s, t)). X_{s,s} = x exactly, and phi(t, t, .) = b_t (Eq. 7, from the tangent
    condition, Lemma 2.1: the map's derivative in t at s = t is the velocity)."""
    return x + bc(t - s, x) * phi(x, s, t)


def meanflow_to_flow_map(u):
    """Docs/flow_map.md, "MeanFlow in the t = 0-noise convention": a MeanFlow average velocity u(z, r, t) (data at
    time 0, r <= t, z_r = z_t - (t - r) u) as this file's phi(x, s, t) = -u(x, 1 - t, 1 - s): s = 1 - t_MF, t = 1 -
    r_MF."""
    return lambda x, s, t: -u(x, 1 - t, 1 - s)


def rf_velocity(v_T, t_eps=0.0):
    """Docs/flow_map.md, "A rectified-flow teacher as a flow-map velocity": b_T(t, y) = -v_T(y, 1 - t): a
    rectified-flow velocity (x_tau = (1 - tau) x + tau z, v = z - x, tau = 1 noise) in this file's convention (same
    noise std, linear interpolant: I_t = x_{tau = 1 - t}). tau is clamped to the teacher's training range [t_eps, 1
    - t_eps]."""
    return lambda t, y: -v_T(y, (1 - t).clamp(t_eps, 1 - t_eps))


def jvp(f, primals, tangents):
    """Forward-mode derivative with torch.func.jvp (never the double-VJP torch.autograd.functional.jvp)."""
    return torch.func.jvp(f, primals, tangents)


class LayerNormJVP(nn.LayerNorm):
    """nn.LayerNorm written out in elementary ops. torch's fused layer_norm returns wrong reverse-over-forward
    gradients (the gradient of a jvp tangent; measured on torch 2.14: 69% relative error on a 4x6 example, while
    group_norm and the written-out form agree with finite differences to 1e-10), so LSD/ESD/FMM/LMD would train
    the MLP with a wrong gradient. Same parameters and state-dict keys; statistics in >= fp32."""

    def forward(self, z):
        h = z.to(torch.promote_types(z.dtype, torch.float32))
        mu = h.mean(-1, keepdim=True)
        y = (h - mu) * torch.rsqrt((h - mu).square().mean(-1, keepdim=True) + self.eps)
        return y * self.weight + self.bias if self.weight is not None else y


def jvp_safe(net):
    """Swap every nn.LayerNorm of a common.py network (the MLP's norms) for LayerNormJVP, in place."""
    for m in net.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = LayerNormJVP
    return net


def diagonal_term(phi, I, target, t):
    """The diagonal (flow-matching) term, Boffi et al. Eq. 12 (Boffi losses.py, diagonal_term): l = |phi(t, t, I_t) -
    target|^2, target = dI_t/dt (or sg b_T(t, I_t) for lmd/emd)."""
    return sumsq(phi(I, t, t) - target)


def lsd_term(phi, b, I, s, t):
    """Lagrangian term, LSD (Boffi et al. Eq. 13, Alg. 2; Boffi losses.py, lsd_term) and LMD: l = |d/dt X(s, t, I_s) -
    sg b(t, sg X(s, t, I_s))|^2, with (X, dX/dt) from one jvp in t (Delta = t - s recomputed inside). b: the online
    network's phi(t, t, .) (LSD) or the teacher (LMD)."""
    X, dX = jvp(lambda tt: flow_map(phi, I, s, tt), (t,), (torch.ones_like(t),))
    with torch.no_grad():
        target = b(t, X.detach())
    return sumsq(dX - target)


def psd_term(phi, I, s, t, h):
    """Progressive term, PSD (Boffi et al. Eq. 15 in its preconditioned form Eq. 22, App. F.1; Alg. 4; Boffi losses.py,
    psd_term): u = h s + (1 - h) t (the paper's gamma is h), l = |phi(s, t, I_s) - sg[(1 - h) phi(s, u, I_s) + h
    phi(u, t, X(s, u, I_s))]|^2 (the semigroup residual divided by (t - s)^2)."""
    u = h * s + (1 - h) * t
    with torch.no_grad():
        target = bc(1 - h, I) * phi(I, s, u) + bc(h, I) * phi(flow_map(phi, I, s, u), u, t)
    return sumsq(phi(I, s, t) - target)


def esd_term(phi, I, s, t, stopgrad="full"):
    """Eulerian term, ESD (Boffi et al. Eq. 14, Alg. 3; Boffi losses.py, esd_term): R = d/ds X(s, t, I_s) (t fixed) +
    grad_x X(s, t, I_s) . b^, b^ = sg phi(s, s, I_s); l = |R|^2. full: grad X . b^ under no_grad (Alg. 3); convex:
    only b^ stopped."""
    with torch.no_grad():
        b_hat = phi(I, s, s)
    _, dXds = jvp(lambda ss: flow_map(phi, I, ss, t), (s,), (torch.ones_like(s),))
    with torch.no_grad() if stopgrad == "full" else contextlib.nullcontext():
        _, dXb = jvp(lambda x: flow_map(phi, x, s, t), (I,), (b_hat,))
    return sumsq(dXds + dXb)


def meanflow_term(phi, I, s, t, v):
    """MeanFlow's loss (its Eq. 9 with the target u_tgt of Eq. 10 and the total derivative of Eq. 8; Alg. 1), in this
    convention, and EMD: phi_tgt = sg[v + (t - s) (d_s phi + grad phi . v)] from one jvp of (s', x') -> phi(s', t, x')
    with tangent (1, v) at (s, I_s); l = |phi(s, t, I_s) - phi_tgt|^2. v = dI_s/ds (MeanFlow) or sg b_T(s, I_s)
    (EMD)."""
    ph, D = jvp(lambda ss, x: phi(x, ss, t), (s, I), (torch.ones_like(s), v))
    target = (v + bc(t - s, I) * D).detach()
    return sumsq(ph - target)


def fmm_term(phi, It, dIt, s, t, lambda_inv=1.0):
    """Direct flow map matching (FMM, arXiv 2406.07507): y = X(t, s, I_t) (map back), then (X(s, t, y), d/dt X(s, t,
    y)) from one jvp in t at fixed y; l = |d/dt X(s, t, y) - dI_t/dt|^2 + lambda_inv |X(s, t, y) - I_t|^2. The
    gradient flows through y and the jvp."""
    y = flow_map(phi, It, t, s)
    X, dX = jvp(lambda tt: flow_map(phi, y, s, tt), (t,), (torch.ones_like(t),))
    return sumsq(dX - dIt) + lambda_inv * sumsq(X - It)


def adaptive_weight(l, p=0.75, c=1e-3):
    """Adaptive weighting (MeanFlow §4.3, "Loss metrics"): l / sg(l + c)^p."""
    return l / (l.detach() + c) ** p


def learned_weight(l, w):
    """Learned weight (Boffi et al. Eq. 19; Boffi losses.py): exp(-w) l + w (EDM2-style uncertainty weighting: w
    estimates the log-variance of l; w = w(s, t), on the diagonal w(t, t))."""
    return torch.exp(-w) * l + w


def logit_normal(n, mu, sigma, device):
    """LN(mu, sigma) = sigmoid(mu + sigma n), n ~ N(0, 1)."""
    return torch.sigmoid(mu + sigma * torch.randn(n, device=device))


def diag_rows(B, diag_frac):
    """n_d = max(1, int(B diag_frac)) diagonal rows first (Boffi et al. Alg. 1: M_d = floor(eta M), eta the diagonal
    fraction), the float product truncated as Boffi's loss_args.py _get_diag_offdiag_bs does (0.29 x 100 -> 28 rows)."""
    return max(1, int(B * diag_frac))


def sample_times(B, cfg, device):
    """s, t, n_d: for one local batch; fp32 vectors.
    Flow-map modes (Boffi et al. §3, Eq. 20 with p_{s,t} = eta U_d + (1 - eta) U_od): rows [0, n_d) have s = t = tau
    ~ U[0, 1]; the rest s, t i.i.d. U[0, 1], sorted to s <= t with pair_order forward (fmm always keeps both orders).
    MeanFlow (§4.3; py-meanflow time_sampler.py sample_two_timesteps_t_r_v0/_v1, here s = 1 - t_MF, t = 1 - r_MF):
    v0: a, b ~ LN(2, 2), s = min, t = max, t := s w.p. 0.25; v1: s ~ LN(0.6, 1.6), t ~ LN(4, 1.6), t := s w.p. 0.25,
    t := max(t, s). (n_d = 0: the whole batch.)"""
    if cfg.mode == "meanflow":
        if cfg.time_sampler == "v0":
            a, b = logit_normal(B, 2.0, 2.0, device), logit_normal(B, 2.0, 2.0, device)
            s, t = torch.minimum(a, b), torch.maximum(a, b)
            t = torch.where(torch.rand(B, device=device) < 0.25, s, t)
        else:
            s, t = logit_normal(B, 0.6, 1.6, device), logit_normal(B, 4.0, 1.6, device)
            t = torch.maximum(torch.where(torch.rand(B, device=device) < 0.25, s, t), s)
        return s, t, 0
    nd = diag_rows(B, cfg.diag_frac)
    tau = torch.rand(nd, device=device)
    a, b = torch.rand(B - nd, device=device), torch.rand(B - nd, device=device)
    if cfg.pair_order == "forward" and cfg.mode != "fmm":
        a, b = torch.minimum(a, b), torch.maximum(a, b)
    return torch.cat([tau, a]), torch.cat([tau, b]), nd


def per_sample_loss(net, head, teacher_b, x0, x1, s, t, nd, cfg, env, fast=None, aug=None):
    """Per-sample weighted l_i (B,) and the unweighted l_i, of one local batch. `net` is the raw module (JVPs);
    `fast` (default `net`), e.g. the torch.compile'd network, runs the forwards without a JVP (diagonal, PSD);
    teacher_b: (docs/flow_map.md, "A rectified-flow teacher as a flow-map velocity") for lmd/emd; aug: EDM's
    augmentation labels of the batch (mode meanflow)."""
    phi = net_phi(net, cfg.sigma0, aug)
    phi_fast = net_phi(fast if fast is not None else net, cfg.sigma0)
    # every block with a JVP: fp32, autocast off; TF32 off unless the run is --precision tf32 (py-meanflow's JVPs)
    fp32 = lambda: C.strict_fp32(env.device, tf32=env.precision == "tf32")
    if cfg.mode == "meanflow":  # (MeanFlow Eq. 9 in this convention) whole batch, dropout on, fp32
        with fp32():
            I, dI = interpolate(x0, x1, s, cfg.interpolant)
            l = meanflow_term(phi, I, s, t, dI)
    else:
        parts = []
        Id, dId = interpolate(x0[:nd], x1[:nd], t[:nd], cfg.interpolant)  # diagonal rows: s = t
        if teacher_b is not None:
            with torch.no_grad(), fp32():
                dId = teacher_b(t[:nd], Id)  # lmd/emd: the teacher's velocity is the diagonal target
        with C.autocast(env):  # the diagonal term (Boffi losses.py diagonal_term): bf16 allowed, dropout on
            parts.append(diagonal_term(phi_fast, Id, dId, t[:nd]).float())
        if nd < len(x0):  # off-diagonal rows, dropout off (Boffi: train=True only in diagonal_term)
            x0o, x1o, so, to = x0[nd:], x1[nd:], s[nd:], t[nd:]
            Io = interpolate(x0o, x1o, so, cfg.interpolant)[0]  # (its velocity is not a target off the diagonal)
            was = net.training
            net.eval()
            try:
                if cfg.mode == "psd":
                    h = torch.rand_like(so) if cfg.psd_type == "uniform" else torch.full_like(so, 0.5)
                    with C.autocast(env):
                        parts.append(psd_term(phi_fast, Io, so, to, h).float())
                else:
                    with fp32():
                        if cfg.mode == "lsd":
                            parts.append(lsd_term(phi, lambda tt, y: phi(y, tt, tt), Io, so, to))
                        elif cfg.mode == "lmd":
                            parts.append(lsd_term(phi, teacher_b, Io, so, to))
                        elif cfg.mode == "esd":
                            parts.append(esd_term(phi, Io, so, to, cfg.esd_stopgrad))
                        elif cfg.mode == "emd":
                            with torch.no_grad():
                                bT = teacher_b(so, Io)
                            parts.append(meanflow_term(phi, Io, so, to, bT))
                        else:  # fmm
                            It, dIt = interpolate(x0o, x1o, to, cfg.interpolant)
                            parts.append(fmm_term(phi, It, dIt, so, to, cfg.lambda_inv))
            finally:
                net.train(was)
        l = torch.cat(parts)
    with fp32():
        if cfg.mode in ("meanflow", "emd"):
            return adaptive_weight(l, cfg.adaptive_p, cfg.adaptive_c), l.detach()
        if head is not None:
            return learned_weight(l, head(s, t)), l.detach()
    return l, l.detach()


# ============================================================================================================== sampler
def time_grid(N):
    """Boffi sample: uniform grid t_k = k / N, k = 0..N (0 noise, 1 data)."""
    return [k / N for k in range(N + 1)]


@torch.no_grad()
def sample(net, rng, shape, N, cfg, env, clip=True):
    """Boffi sample: x_0 = sigma0 eps (per sample index), x_{k+1} = X(t_k, t_{k+1}, x_k) on t_k = k / N: exactly N
    calls. sampler ode: Euler on b(t, x) = phi(t, t, x) instead (a diagnostic separating velocity and map errors)."""
    phi = net_phi(net, cfg.sigma0)
    x = cfg.sigma0 * rng.randn(len(rng.gens), *shape)
    grid = time_grid(N)
    full = lambda v: torch.full((x.shape[0],), v, device=x.device, dtype=torch.float32)
    with C.autocast(env):
        for k in range(N):
            s, t = full(grid[k]), full(grid[k + 1])
            if cfg.sampler == "map":
                x = flow_map(phi, x, s, t).float()
            else:
                x = (x + (grid[k + 1] - grid[k]) * phi(x, s, s)).float()
    return x.clamp(-1, 1) if clip and len(shape) == 3 else x


# ============================================================================================================= plumbing
def net_dict(cfg, data):
    """Two time inputs (s, then Delta = t - s), time_scale 1 (raw times), output ~0 at start (exactly 0 for
    the MLP, whose last layer is zero; x 1e-5 for a U-Net's, EDM's init)."""
    if data.kind == "images":
        if cfg.net == "mlp":
            raise C.UserError("--net mlp is for 2-D points; use tiny, small or ddpmpp for images.")
        extra = {"time_channels": cfg.time_channels} if cfg.time_channels else {}
        if cfg.arch == "py-meanflow":
            extra.update(PY_MEANFLOW_NET)
        return C.net_config(cfg.net, img_resolution=data.shape[1], in_channels=data.shape[0], num_times=2,
                            time_scale=1.0, dropout=cfg.dropout, **extra,
                            augment_dim=C.augment_dim(**MEANFLOW_AUGMENT) if cfg.augment else 0)
    if cfg.net != "mlp":
        raise C.UserError(f"--net {cfg.net} is an image network; 2-D points need --net mlp.")
    if cfg.augment:
        raise C.UserError("--augment is EDM's image augmentation; 2-D points take --augment 0.")
    extra = {k: v for k, v in (("width", cfg.width), ("depth", cfg.depth), ("time_channels", cfg.time_channels))
             if v is not None}
    return C.net_config("mlp", num_times=2, time_scale=1.0, dropout=cfg.dropout, **extra)


def sample_shape(nd):
    return (nd["dim"],) if nd["kind"] == "mlp" else (nd["in_channels"], nd["img_resolution"], nd["img_resolution"])


def edm_rf_velocity(D, tau_eps=1e-5):
    """An EDM denoiser D(y; sigma) as a rectified-flow velocity v(y, tau) (x_tau = (1 - tau) x + tau z, unit z):
    x_tau / (1 - tau) = x + sigma z with sigma = tau / (1 - tau), so v = (x_tau - D(x_tau / (1 - tau); sigma)) / tau
    (rfpp network_edm.py EDMPrecondVel; docs/rectified_flow.md, "EDM denoiser to rectified-flow velocity")."""
    def v(y, tau):
        tau = tau.clamp(tau_eps, 1 - tau_eps)
        tb = bc(tau, y)
        return (y - D(y / (1 - tb), tau / (1 - tau)).to(y.dtype)) / tb
    return v


EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"  # EDM's released network pickles


def load_teacher(path, env, shape, data_key=None):
    """A rectified_flow.py checkpoint -> (b_T(t, y) of (docs/flow_map.md, "A rectified-flow teacher as a flow-map
    velocity"), teacher noise std, its weights). Rebuilt from its `net` with its EMA weights; a wrong method or
    convention, another data shape or a class-conditional teacher is a UserError. An EDM network pickle (.pkl) -> its
    denoiser as a rectified-flow velocity (edm_rf_velocity), noise std 1. `data_key`: the run's Data.key, for
    common.check_teacher_data."""
    if path and path.endswith(".pkl") and (os.path.isfile(path) or os.path.basename(path).startswith("edm-")):
        if not os.path.isfile(path):
            raise C.UserError(f"EDM checkpoint '{path}' not found; download {EDM_URL}{os.path.basename(path)} and "
                              f"place it there.")
        den, info = C.load_edm(path)
        nd = info["net"]
        if (nd["in_channels"], nd["img_resolution"], nd["img_resolution"]) != tuple(shape) or info["label_dim"]:
            raise C.UserError(f"the EDM teacher '{path}' models {'class-conditional ' if info['label_dim'] else ''}"
                              f"data of shape {(nd['in_channels'], nd['img_resolution'], nd['img_resolution'])}; "
                              f"flow_map.py distils an unconditional teacher of the data's shape {tuple(shape)}.")
        den = den.to(env.device)
        return rf_velocity(edm_rf_velocity(den), 1e-5), 1.0, den.state_dict()
    if not path or not os.path.isfile(path):
        raise C.no_file(path or "", "the teacher checkpoint")
    try:
        ck = C.load_checkpoint(path)
    except C.UserError:  # common's message quotes torch's multi-sentence unpickling error; keep one sentence
        raise C.UserError(f"the teacher '{path}' is not a readable checkpoint of this project.") from None
    if ck["method"] != RF_METHOD or ck["convention"] != RF_CONVENTION:
        raise C.UserError(f"'{path}' is a checkpoint of {ck['method']} with convention '{ck['convention']}'; a "
                          f"{RF_METHOD} teacher with '{RF_CONVENTION}' is needed.")
    if tuple(sample_shape(ck["net"])) != tuple(shape):
        raise C.UserError(f"the teacher '{path}' models data of shape {tuple(sample_shape(ck['net']))}, but the data "
                          f"here has shape {tuple(shape)}.")
    if ck["net"].get("label_dim"):
        raise C.UserError(f"the teacher '{path}' is class-conditional; flow_map.py distils unconditional teachers.")
    C.check_teacher_data(ck["config"], data_key, path)
    net = C.build_net(ck["net"])
    C.load_state_strict(net, ck["ema"])
    net = net.to(env.device).eval().requires_grad_(False)
    t_eps = float(ck["config"].get("t_eps", 0.0) or 0.0)
    return rf_velocity(lambda y, tau: net(y, tau), t_eps), float(ck["config"].get("noise_std", 1.0)), ck["ema"]


def choose_sigma0(cfg, data, teacher_std):
    """The teacher's noise std (lmd/emd; a different --sigma0 is an error), the RMS of the per-coordinate
    std of 2-D data, 0.5 for images (1.0 for meanflow)."""
    if teacher_std is not None:
        if cfg.sigma0 is not None and abs(cfg.sigma0 - teacher_std) > 1e-12:
            raise C.UserError(f"--sigma0 {cfg.sigma0:g} differs from the teacher's noise std {teacher_std:g}; a "
                              f"different base noise is a different flow (drop --sigma0).")
        return teacher_std
    if cfg.sigma0 is not None:
        return cfg.sigma0
    if data.kind == "toy":
        return 0.5  # common.py toys have per-coordinate RMS std 0.5 exactly
    if data.kind == "points":
        s = float(data.x.float().var(0).mean().sqrt())
        if not s > 0:
            raise C.UserError(f"the points of --data {cfg.data} all coincide (RMS std 0), so they set no base noise "
                              f"std; give --sigma0 (and data with some spread).")
        return s
    return 1.0 if cfg.mode == "meanflow" else 0.5


@torch.no_grad()
def evaluate(net, cfg, data, env, out, step):
    """Samples at 1, 2, 4, 8 steps beside the data (PNG) and, for points, the common toy metrics."""
    shape = sample_shape(C.unwrap(net).config)
    sheet = C.EvalSheet(data, shape, cfg.eval_n, cfg.seed, step)
    for N in cfg.eval_steps:
        sheet.add(N, C.n_steps(N) + (f" ({cfg.mode})" if len(shape) == 1 else ""),
                  sample(net, sheet.rng(env.device), shape, N, cfg, env))
    return sheet.write(out)


def generator(net, cfg, shape, N, env):
    return lambda rng, labels: sample(net, rng, shape, N, cfg, env)


def resolve(cfg, data, teacher_std):
    """Fill the mode-dependent defaults (sigma0, diag_frac) so that the checkpoint's config records them."""
    cfg.sigma0 = choose_sigma0(cfg, data, teacher_std)
    if cfg.diag_frac is None:
        cfg.diag_frac = 0.25 if cfg.mode in ("lmd", "emd") else 0.75
    return cfg


# ============================================================================================================= training
def lr_at(cfg, step):
    lr = cfg.lr * (min(1.0, step / cfg.warmup) if cfg.warmup else 1.0)  # from 0 (py-meanflow train.py's LinearLR)
    if cfg.lr_schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
    return lr * max(step / cfg.lr_ref, 1.0) ** -0.5 if cfg.lr_schedule == "sqrt" else lr


def train(cfg, given):
    clock, env = C.stopwatch(), C.setup(cfg.device, cfg.seed, cfg.precision)
    path = os.path.join(cfg.out, "ckpt.pt")
    ck = None
    if cfg.resume or (cfg.resume is None and os.path.exists(path)):
        ck = C.load_checkpoint(path)
        if ck["method"] != METHOD:
            raise C.UserError(f"'{path}' is a checkpoint of {ck['method']}, not a {METHOD} one; use another --out.")
        if "mode" in given and given["mode"] != ck["config"]["mode"]:
            raise C.UserError(f"'{path}' was trained with --mode {ck['config']['mode']}; use another --out.")
        cfg = C.resume_config(Config, ck, cfg, given, path, fixed=("learned_weight", "interpolant", "sigma0",
                                                                   "teacher"))  # the distilled teacher: the same file
    C.refuse_other(given, MODE_ONLY, "mode", cfg.mode)
    C.refuse_other(given, {"lr_ref": ("sqrt",)}, "lr_schedule", cfg.lr_schedule)  # (read by the sqrt decay only)
    C.require_detector(cfg, env)  # --fallback false: a missing FID detector stops the run now, in one sentence
    data = C.load_data(cfg.data, cfg.root, env, cfg.seed, cfg.xflip)
    C.refuse_unused(given, data.kind, points=("width", "depth"), images=("xflip", "arch"))
    teacher_b, teacher_std, tid = None, None, None
    if cfg.mode in ("lmd", "emd"):
        teacher_b, teacher_std, tweights = load_teacher(cfg.teacher, env, data.shape, data.key)
        tid = C.teacher_id(ck, path, cfg.teacher, tweights)  # and with the same weights
    cfg = resolve(cfg, data, teacher_std)
    nd = net_dict(cfg, data)
    raw = jvp_safe(C.build_net(nd)).to(env.device)
    head = C.WeightHead(num_times=2, channels=128).to(env.device) if cfg.learned_weight else None
    if ck:
        C.check_resume_net(ck["net"], nd, path)
        C.load_state_strict(raw, ck["model"])
        if head is not None:
            C.load_state_strict(head, ck.get("weight_head"))
    model = C.distribute(C.maybe_compile(raw, cfg.compile), env, manual=True)  # jvp needs the bare module
    if head is not None:
        C.distribute(head, env, manual=True)
    ema = C.EMA(raw, decay=cfg.ema)
    params = [*raw.parameters(), *(head.parameters() if head is not None else [])]
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    if ck:
        C.load_state_strict(ema.model, ck["ema"])
        C.load_optimizer(opt, ck["opt"])  # moments from the checkpoint, lr from this run's config
    gens = [data.gen] if data.gen is not None else []
    if ck:
        C.restore_rng(ck, env, gens)
    step = ck["step"] if ck else 0

    per_rank = cfg.batch // (env.world * cfg.accum)
    if per_rank * env.world * cfg.accum != cfg.batch:
        raise C.UserError(f"--batch {cfg.batch} is not divisible by world size {env.world} x --accum {cfg.accum}.")
    conv = convention(cfg.interpolant, cfg.sigma0)
    if ck and ck["convention"] != conv:
        raise C.UserError(f"'{path}' has convention '{ck['convention']}', but its config's interpolant and sigma0 give "
                          f"'{conv}'; it was edited, or not written by this project.")
    scaler = C.make_scaler(env, ck)  # (fp16; a resumed run's loss scale, checked before anything is printed)
    log = C.Logger(cfg.out, env, cfg.iters, cfg.batch, cfg, start_step=ck and step)
    n_diag = per_rank if cfg.mode == "meanflow" else diag_rows(per_rank, cfg.diag_frac)
    log.info(f"{METHOD} {cfg.mode} | world {env.world} | global batch {cfg.batch} = {env.world} x {per_rank} x "
             f"{cfg.accum} | device {env.device} | precision {env.precision} (JVP blocks fp32, TF32 "
             f"{'on' if env.precision == 'tf32' else 'off'}) | params "
             f"{sum(p.numel() for p in raw.parameters()):,} | sigma0 {cfg.sigma0:g} | "
             + (f"times {cfg.time_sampler}" if cfg.mode == "meanflow" else f"diagonal rows {n_diag}/{per_rank}")
             + f" | weighting {'adaptive' if cfg.mode in ('meanflow', 'emd') else 'learned' if head else 'none'}"
             + f" | step {step}/{cfg.iters}")
    fid = C.FidHook(cfg.fid_detector, data, env, cfg.root, cfg.fid_n, log) \
        if cfg.fid_every and data.kind == "images" else None
    guard = C.Guard(env, cfg.max_skips, log, path, ck and step,  # skips non-finite steps, withholds bad checkpoints
                    probe=C.sample_probe(lambda n: generator(n, cfg, sample_shape(nd), 1, env), (raw, ema.model), env,
                                         data))

    def state():
        extra = dict(weight_head=head.state_dict()) if head is not None else {}
        return dict(model=raw.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), net=nd, method=METHOD,
                    convention=conv, teacher_id=tid, **extra)

    raw.train()
    while step < cfg.iters:
        for grp in opt.param_groups:
            grp["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(3, device=env.device)
        for rnd in range(cfg.accum):
            # ---- ALGO LOGIC: one flow-map loss (Boffi et al. Alg. 1-4; MeanFlow Alg. 1) ------------------------------
            part, parts = rnd * env.world + env.rank, env.world * cfg.accum
            x1, _ = data.batch(per_rank, step, part, parts)  # data at t = 1
            x1, aug = C.augment_batch(x1, cfg.augment, cfg.seed, step, part, parts, MEANFLOW_AUGMENT)
            x0 = cfg.sigma0 * torch.randn_like(x1)  # noise at t = 0
            s, t, nd_rows = sample_times(per_rank, cfg, env.device)
            l_w, l = per_sample_loss(raw, head, teacher_b, x0, x1, s, t, nd_rows, cfg, env, fast=model, aug=aug)
            # Boffi losses.py setup_loss: L = (1/B) sum_i l_i, diagonal and off-diagonal rows together (Alg. 1-4 write
            # L_b + L_D, each a mean over its own M_d or M_o rows, which at eta = 0.75 weighs an off-diagonal row 3x
            # a diagonal one; here both weigh 1/B)
            L = l_w.mean()
            scaler.scale(L / cfg.accum).backward()
            # ---- end of ALGO LOGIC -----------------------------------------------------------------------------------
            diag = (s == t).float()
            stats += torch.stack([L.detach(), (l * diag).sum() / diag.sum().clamp(min=1),
                                  (l * (1 - diag)).sum() / (1 - diag).sum().clamp(min=1)]) / cfg.accum
        C.sync_grads(raw, env)  # manual all-reduce (the jvp ran on the bare module), then clip, then step
        if head is not None:
            C.sync_grads(head, env)
        scaler.unscale_(opt)
        ok = guard.finite(params)  # before clipping
        if cfg.clip:
            nn.utils.clip_grad_norm_(params, cfg.clip)
        guard.step(opt, scaler, ok)  # skipped (weights and Adam state unchanged) if a gradient is not finite
        scaler.update()
        ema.update(raw, step * cfg.batch, cfg.batch)
        guard.end_step(stats[0])
        step += 1
        if step % cfg.log_every == 0 or step == cfg.iters:
            log.log(step, loss=stats[0], loss_diag=stats[1], loss_off=stats[2])
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            guard.checkpoint(step, step == cfg.iters, state, gens)
        if cfg.sample_every and step % cfg.sample_every == 0:  # rank 0 (a failure stops every rank: C.agree)
            C.agree(env, lambda: evaluate(ema.model, cfg, data, env, cfg.out, step))
        if fid and step % cfg.fid_every == 0:  # every step count from one checkpoint
            shape = sample_shape(ema.model.config)
            fid(step, {C.n_steps(N): generator(ema.model, cfg, shape, N, env) for N in cfg.eval_steps})
    if ck is None and cfg.iters == 0:
        guard.checkpoint(step, True, state, gens)
    def final():  # rank 0 (a failure stops every rank: C.agree, which every rank leaves after it)
        m = evaluate(ema.model, cfg, data, env, cfg.out, step)
        log.info("eval: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "step"))
    C.agree(env, final)
    log.info(clock())


# ============================================================================================================= commands
# sample and fid change only these Config fields over the checkpoint's (any other is refused)
SAMPLER_FIELDS = ("sampler",)  # the sampler's field (map, or Euler on the diagonal velocity)


def sample_or_fid(cmd, opts, given):
    env = C.setup(opts.device, opts.seed, opts.precision or "fp32")  # sample/fid: fp32, TF32 off
    ck = C.load_checkpoint(opts.ckpt)
    if ck["method"] != METHOD:
        raise C.UserError(f"'{opts.ckpt}' is a checkpoint of {ck['method']}; flow_map.py samples only flow_map ones.")
    cfg = C.merge_config(Config, {**ck["config"], "compile": False}, given)  # (sampling compiles nothing; meanflow
    if ck["convention"] != convention(cfg.interpolant, cfg.sigma0):  # runs saved compile true before its refusal)
        raise C.UserError(f"'{opts.ckpt}' has convention '{ck['convention']}', but its config's interpolant and "
                          f"sigma0 give '{convention(cfg.interpolant, cfg.sigma0)}'; it was edited, or not written "
                          f"by this project.")
    net = C.build_net(ck["net"])
    C.load_state_strict(net, ck["ema" if opts.ema else "model"])
    net, shape = net.to(env.device).eval(), sample_shape(ck["net"])
    C.sample_or_fid(cmd, opts, env, cfg, ck, shape, lambda N: generator(net, cfg, shape, N, env),
                    lambda N: f"{C.n_steps(N)} ({cfg.sampler}, {N} NFE)", record=lambda N: dict(mode=cfg.mode,
                                                                                            sampler=cfg.sampler))


def main(argv=None):
    cmd, cfg, given = C.parse_cli(Config, PRESETS, METHOD, argv, sampler=SAMPLER_FIELDS)
    C.preflight(cmd, cfg)
    train(cfg, given) if cmd == "train" else sample_or_fid(cmd, cfg, given)


if __name__ == "__main__":
    C.main_guard(main)
