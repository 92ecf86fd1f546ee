"""Rectified flow: 1-rectified flow (flow matching), reflow pairs, and 2-rectified flow++.

Papers: Liu, Gong, Liu, "Flow Straight and Fast", arXiv 2209.03003 (1-RF, reflow);
        Lee, Lin, Fanti, "Improving the Training of Rectified Flows", arXiv 2405.20320 (2-RF++).
Docs:   docs/rectified_flow.md (conventions, derivations, the CIFAR-10 recipe with a source per value).

The method in a few lines. A velocity field v(x_t, t) is trained to carry noise z (t = 1) to data x (t = 0)
along straight lines x_t = (1 - t) x + t z. Trained on independent (x, z) it is flow matching, the 1-RF: good
with many ODE steps, poor at one step because its paths are curved. Reflow integrates that ODE once per noise
to get a deterministic coupling (z, x) and trains a second flow on the straight lines between these fixed
pairs: the 2-RF is nearly straight, so one or two Euler steps suffice. 2-RF++ initialises from the teacher,
samples t from a U-shaped density and replaces the squared error by a pseudo-Huber velocity loss plus a perceptual
(LPIPS, VGG-feature) loss on the implied clean image, weighted by 1/t.

Convention (written into every checkpoint): x_t = (1 - t) x + t z, v = z - x, t = 1 is noise, z ~ N(0, I).
The network output is v itself; it is called with raw t in [0, 1] (time_scale = 1000 lives in the network).

Stages (--stage): 1rf (teacher, DIR/ckpt.pt) -> pairs (DIR/pairs/) -> 2rf (DIR/2rf/ckpt.pt) [-> ft (DIR/ft/):
an optional fine-tune on real images paired with their inverted noise, 2-RF++ v2]; `all` runs 1rf, pairs and 2rf
in one process (default of the toy preset).

    python rectified_flow.py                                   # toy: all stages on 8 Gaussians, ~1 min CPU
    python rectified_flow.py --data points.npy --out runs/rf-mine
    wget https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl   # rfpp's teacher
    torchrun --nproc_per_node=8 rectified_flow.py --preset cifar10 --stage pairs   # EDM Heun, 1M pairs; then 2rf
    python rectified_flow.py sample --ckpt runs/rectified_flow-toy/2rf/ckpt.pt --steps 1,2 --out s.png
    python rectified_flow.py fid --ckpt runs/rectified_flow-cifar10/2rf/ckpt.pt --steps 1,2
"""
import contextlib, dataclasses, hashlib, json, math, operator, os, re, time, types
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

CONVENTION = "x_t=(1-t)x+t*z, v=z-x, t=1 noise"
METHOD = "rectified_flow"
# options of the 1-RF alone: the 2-RF and ft take their network from the stage before and train on stored pairs,
# never flipped (`--stage all` gives them to its 1-RF only)
ONE_RF_ONLY = ("net", "dropout", "cond", "width", "xflip")
# options some stages read (another stage refuses them, common.refuse_other): the pairs' by --stage pairs (and all),
# their solver also by the 1-RF's evaluation on 2-D points, their block size also by ft's inverted pairs; the
# fine-tuning's by ft; the 2-RF++ loss by 2rf and ft; the optimiser, logging and evaluation by the training stages
# (--stage pairs trains nothing; ft counts its steps with --ft_iters)
TRAINING = ("1rf", "2rf", "ft", "all")
STAGE_ONLY = {**dict.fromkeys(("n_pairs", "pair_batch", "pair_seed", "noise_mode"), ("pairs", "all")),
              **dict.fromkeys(("pair_solver", "pair_steps", "pair_grid"), ("pairs", "all", "1rf")),
              "pair_block": ("pairs", "all", "ft"), **dict.fromkeys(("ft_iters", "ft_n", "inv_steps"), ("ft",)),
              **dict.fromkeys(ONE_RF_ONLY, ("1rf", "all")), **dict.fromkeys(("iters", "warmup"), ("1rf", "2rf", "all")),
              **dict.fromkeys(("t_dist", "a", "loss", "huber_c", "lpips_weights", "lpips_res"), ("2rf", "ft", "all")),
              **dict.fromkeys(("batch", "accum", "lr", "lr_schedule", "clip", "ema", "t_eps", "solver",
                               "grid", "rule", "t_mid", "log_every", "ckpt_every", "sample_every", "eval_n",
                               "eval_steps", "straight_k", "fid_every", "fid_n", "fid_detector", "fallback",
                               "max_skips"), TRAINING)}


# =============================================================================================================== config
@dataclass
class Config:
    preset: str = "toy"  # preset that filled the defaults (toy, tiny, small, cifar10)
    stage: Literal["1rf", "pairs", "2rf", "ft", "all"] = "all"  # which stage to run
    data: str = "8gaussians"  # toy name, cifar10/mnist/fashion_mnist, .npy file, image folder or .zip
    root: str = "data"  # data sets and FID reference statistics are cached here
    out: str = "runs/rectified_flow-toy"  # run folder DIR (1rf in DIR, pairs in DIR/pairs, 2rf in DIR/2rf)
    teacher: Optional[str] = None  # teacher for pairs/2rf: a 1rf checkpoint (default DIR/ckpt.pt) or an EDM .pkl
    pairs: Optional[str] = None  # pairs folder for 2rf (default DIR/pairs)
    resume: Optional[bool] = None  # None: resume when the stage's ckpt.pt exists
    seed: int = 0  # seeds model init, data order and noise
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Optional[str] = None  # fp32, tf32, bf16, fp16 (default bf16 on CUDA, fp32 on CPU)
    compile: bool = False  # torch.compile the network
    # network (common.net_config)
    net: str = "mlp"  # mlp, tiny, small, ddpmpp
    dropout: float = 0.0  # 0.13 on CIFAR-10 (EDM's value, kept by rfpp)
    cond: bool = False  # class-conditional 1-RF teacher (label_dim = number of classes)
    width: Optional[int] = None  # MLP width (2-D data only; None: common's 128)
    # optimisation (per stage, see PRESETS)
    iters: int = 2000  # optimiser steps
    batch: int = 512  # global batch per optimiser step (split over ranks and accumulation rounds)
    accum: int = 1  # gradient accumulation rounds
    lr: float = 1e-3  # Adam learning rate, betas (0.9, 0.999), eps 1e-8
    warmup: int = 0  # linear learning-rate warm-up steps from 0
    lr_schedule: Literal["const", "cosine"] = "const"  # cosine: lr x (1 + cos(pi step / iters)) / 2 (toy presets)
    clip: Optional[float] = None  # gradient-norm clipping
    ema: Optional[float] = None  # EMA decay; None keeps the EMA equal to the raw weights
    xflip: bool = False  # random horizontal flips (1rf only; never in 2rf, it breaks the pairs)
    t_eps: float = 0.0  # training t range [t_eps, 1 - t_eps]; 1rf 0, 2rf 1e-5
    noise_std: float = 1.0  # std of z (fixed by the convention; recorded for consumers)
    # reflow pairs (Liu et al. §2.2, reflow)
    n_pairs: int = 10_000  # number of (z, x) pairs
    pair_block: int = 5_000  # pairs per file block (blocks are sharded over ranks)
    pair_batch: int = 1_000  # teacher batch while generating pairs
    pair_seed: int = 10 ** 9  # z_i from seed pair_seed + i (disjoint from FID seeds)
    pair_solver: Literal["euler", "heun", "rk4"] = "heun"  # deterministic teacher solver
    pair_steps: int = 18  # solver steps K (Heun: 2K - 1 NFE)
    pair_grid: Literal["uniform", "edm"] = "edm"  # time grid of the pair solver
    noise_mode: Optional[Literal["seed", "stored"]] = None  # z regenerated or stored (default: seed for images)
    # 2-RF++ (§4.1, §4.2)
    t_dist: Literal["ushape", "uniform"] = "ushape"  # 2rf time density; 1rf is always uniform
    a: float = 4.0  # U-shape parameter (rfpp README --a 4)
    loss: Literal["lpips-huber-1/t", "lpips-huber", "huber", "l2"] = "huber"  # (2-RF++ §4.2)
    huber_c: Optional[float] = None  # pseudo-Huber c; None = 0.00054 d (rfpp)
    lpips_weights: Literal["pretrained", "random"] = "pretrained"  # random: test-only stand-in
    lpips_res: int = 224  # LPIPS input resolution (224 as rfpp; tests use 32)
    # real-data fine-tune (stage ft)
    ft_iters: int = 5_000  # fine-tune steps on inverted real pairs
    ft_n: int = 50_000  # real images inverted
    inv_steps: int = 8  # Euler steps of the inversion (rfpp v2, inversion)
    # sampling (Euler to RK4); "auto" picks the stage's default
    solver: Literal["auto", "euler", "heun", "rk4"] = "auto"  # 1rf: heun for K >= 3; 2rf: euler
    grid: Literal["auto", "uniform", "edm"] = "auto"  # rk4 (any stage) and 1rf heun: edm; else uniform
    rule: Literal["auto", "default", "new"] = "auto"  # 2rf: rfpp's new update rule (Fig. 4); 1rf: plain Euler
    t_mid: float = 0.5  # middle time of the 2-step uniform grid
    # logging and evaluation
    log_every: int = 200  # steps between log lines
    ckpt_every: int = 500  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample grids / straightness (0: end only)
    eval_n: int = 4000  # evaluation noises (toy metrics, straightness)
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4])  # step counts plotted
    straight_k: int = 100  # Euler steps of the straightness metric (Liu et al. §2, straightness)
    fid_every: int = 0  # steps between FID proxies (images; 0: never)
    fid_n: int = 10_000  # samples of the in-training FID proxy
    fid_detector: str = "inception"  # inception or a TorchScript path
    fallback: bool = True  # a missing weights file (Inception; LPIPS): warn and go on without it (False stops)
    max_skips: int = 100  # stop after this many optimiser steps in a row with non-finite gradients (each is skipped)

    def check(self):
        if self.noise_std != 1.0:
            raise ValueError("--noise_std is fixed at 1 by this file's convention.")
        if self.solver == "rk4" and self.rule == "new":
            raise ValueError("--rule new (rfpp's update) applies to the euler and heun solvers; rk4 takes plain steps.")
        if not self.data:
            raise ValueError("this preset needs --data (for example a uint8 (N, 16, 16, 3) .npy file).")


RANGES = dict(t_eps="[0, 0.5)", t_mid="(0, 1)", n_pairs=">= 1", pair_block=">= 1", pair_batch=">= 1",
              pair_steps=C.STEPS, a="(0, 1400]", huber_c="> 0", lpips_res=">= 16", ft_n=">= 1", inv_steps=C.STEPS,
              straight_k=C.STEPS)  # beside common.RANGES; a: math.sinh(a / 2) (sample_t_ushape) overflows beyond ~1420

EDM_CIFAR10 = "edm-cifar10-32x32-uncond-ve.pkl"  # EDM's unconditional NCSN++ (VE architecture, EDM preconditioning)
# ============================================================================================================== presets
PRESETS = {  # flat fields, then per-stage parts
    # toy: `python rectified_flow.py` in under a minute on one CPU thread. The 1-RF decays its lr to 0 (cosine): its
    # samples sharpen far more than with more constant-lr steps. Heun runs on the uniform grid (grid, pair_grid): on
    # 8 Gaussians the EDM grid (rho = 7, built for images) spends its steps at t > 0.9 and t < 0.01 and is worse
    # at every K (in-mode at K = 3 / 6 / 18: 0.01 / 0.06 / 0.93 against 0.11 / 0.69 / 0.96; docs/rectified_flow.md).
    # 2rf: 600 iterations.
    "toy": dict(data="8gaussians", net="mlp", batch=512, ckpt_every=500, eval_n=4000, straight_k=100, grid="uniform",
                n_pairs=10_000, pair_block=5_000, pair_batch=5_000, pair_solver="heun", pair_steps=18,
                pair_grid="uniform", huber_c=0.04,  # same per-element transition RMS as c = 0.00054 d on CIFAR
                **{"1rf": dict(iters=1500, lr=1e-3, lr_schedule="cosine"),
                   "2rf": dict(iters=600, lr=3e-4, t_eps=1e-5)}),
    "tiny": dict(data="", net="tiny", batch=8, log_every=2, ckpt_every=2, eval_n=16, straight_k=4, fid_n=16,
                 n_pairs=32, pair_block=16, pair_batch=16, pair_steps=2, ft_iters=2, ft_n=16, inv_steps=2,
                 lpips_res=32, eval_steps=[1, 2],
                 **{"1rf": dict(iters=4, lr=1e-3, clip=1.0, ema=0.9),
                    "2rf": dict(iters=4, lr=1e-3, ema=0.9, t_eps=1e-5), "ft": dict(lr=1e-3, ema=0.9, t_eps=1e-5)}),
    "small": dict(data="cifar10", net="small", dropout=0.1, precision="bf16", batch=256, log_every=500,
                  ckpt_every=5000, eval_n=256, straight_k=32, fid_n=10_000, eval_steps=[1, 2, 4],
                  n_pairs=200_000, pair_block=50_000, pair_batch=2_000, pair_steps=12, pair_grid="edm",
                  **{"1rf": dict(iters=60_000, lr=2e-4, warmup=1000, clip=1.0, ema=0.9995, xflip=True),
                     "2rf": dict(iters=20_000, lr=2e-4, warmup=1000, ema=0.9995, loss="huber", t_eps=1e-5)}),
    # cifar10: the paper's recipe. Sources: rfpp README / train.py / t_dist.py (2rf, pairs), EDM CIFAR config
    # (ddpmpp, dropout 0.13), Liu et al. default_cifar10_configs.py (1rf lr, warm-up, clip); the 1rf's batch,
    # length and EMA 0.9999 are project choices (Liu et al. ran batch 128 x 1.3M steps with EMA 0.999999).
    # precision: tf32 (rfpp's train.py runs EDMPrecondVel with use_fp16 False, no autocast: fp32 weights and
    # activations with cuDNN's default TF32 convolutions; --precision tf32 also allows TF32 matmuls, which PyTorch's
    # defaults leave off: attention and linear layers, a small share); LPIPS always without autocast
    "cifar10": dict(fallback=False,  # a missing weights file stops the run: no silent fallback
                    data="cifar10", net="ddpmpp", dropout=0.13, precision="tf32", batch=512, log_every=500,
                    ckpt_every=50_000, fid_every=50_000, fid_n=10_000, eval_n=256, straight_k=32,
                    n_pairs=1_000_000, pair_block=50_000, pair_batch=2_000, pair_steps=18, pair_grid="edm",
                    # pairs and the 2-RF start from EDM's released NCSN++ checkpoint, as rfpp's README runs it
                    # (generate_edm.py --ckpt edm_cifar_ve_uncond.pth --N 18; train.py --ckpt ... EDMPrecondVel);
                    # the from-scratch path: --teacher runs/rectified_flow-cifar10/ckpt.pt (the 1rf stage)
                    **{"1rf": dict(iters=400_000, lr=2e-4, warmup=5000, clip=1.0, ema=0.9999, xflip=True),
                       "pairs": dict(teacher=EDM_CIFAR10),
                       "2rf": dict(iters=800_000, lr=2e-4, warmup=5000, ema=0.9999, loss="lpips-huber-1/t",
                                   t_eps=1e-5, teacher=EDM_CIFAR10),
                       # ft: 2-RF++ v2's 5k steps on 50k real images paired with their inverted noise (as summaries of
                       # v2 read it); the inverting model (the 2-RF's EMA), its 8 Euler steps and the optimiser (the
                       # 2-RF run's, continued) are a project reconstruction (docs/rectified_flow.md, "Deviations")
                       "ft": dict(lr=2e-4, ema=0.9999, loss="lpips-huber-1/t", t_eps=1e-5, ft_iters=5000,
                                  ft_n=50_000, inv_steps=8)}),
}


# ==================================================================================================== method: the maths
def interpolate(x, z, t):
    """Liu et al. §2: x_t = (1 - t) x + t z."""
    t = t.reshape(-1, *[1] * (x.ndim - 1))
    return (1 - t) * x + t * z


def x_hat(x_t, t, v):
    """Data estimate x^ = x_t - t v (exact for v = z - x)."""
    return x_t - t.reshape(-1, *[1] * (x_t.ndim - 1)) * v


def z_hat(x_t, t, v):
    """Noise estimate z^ = x_t + (1 - t) v."""
    return x_t + (1 - t.reshape(-1, *[1] * (x_t.ndim - 1))) * v


def ushape_pdf(t, a=4.0):
    """2-RF++ §4.1: p(t) = a cosh(a (t - 1/2)) / (2 sinh(a/2)) on [0, 1] (rfpp t_dist.py; the paper's printed
    formula is monotone)."""
    return a * torch.cosh(a * (t - 0.5)) / (2 * math.sinh(a / 2))


def ushape_cdf(t, a=4.0):
    """2-RF++ §4.1: F(t) = [sinh(a (t - 1/2)) + sinh(a/2)] / (2 sinh(a/2))."""
    return (torch.sinh(a * (t - 0.5)) + math.sinh(a / 2)) / (2 * math.sinh(a / 2))


def sample_t_ushape(n, a=4.0, t_eps=1e-5, device="cpu", generator=None):
    """2-RF++ §4.1: inverse CDF t = 1/2 + asinh((2u - 1) sinh(a/2)) / a, then mapped affinely into
    [t_eps, 1 - t_eps]."""
    u = torch.rand(n, device=device, generator=generator, dtype=torch.float64)
    t = 0.5 + torch.asinh((2 * u - 1) * math.sinh(a / 2)) / a
    return (t_eps + (1 - 2 * t_eps) * t).float()


def sample_t_mirrored_exp(n, a=4.0, generator=None):
    """rfpp's draw of the same law (§4.1): s = ln(1 + u (e^a - 1)) / a has density a e^(a s) / (e^a - 1) on [0, 1];
    t = s or 1 - s with probability 1/2 has density a cosh(a (t - 1/2)) / (2 sinh(a/2))."""
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    s = torch.log1p(u * math.expm1(a)) / a
    flip = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    return torch.where(flip, 1 - s, s).float()


def sample_t(n, cfg, device):
    if cfg.stage == "1rf" or cfg.t_dist == "uniform":  # uniform on [t_eps, 1 - t_eps) (1-RF: [0, 1))
        return cfg.t_eps + (1 - 2 * cfg.t_eps) * torch.rand(n, device=device)
    return sample_t_ushape(n, cfg.a, cfg.t_eps, device)


def pseudo_huber(r, c):
    """2-RF++ §4.2: H(r) = (sqrt(|r|^2 + c^2) - c) / d per sample, |.| the L2 norm over all d elements; fp32."""
    r = r.float().flatten(1)
    return (torch.sqrt(r.square().sum(1) + c * c) - c) / r.shape[1]


class LPIPS(nn.Module):
    """2-RF++ §4.2, LPIPS: LPIPS-VGG as rfpp uses it (piq LPIPS(replace_pooling=True)): VGG16 features up to relu5_3
    with every MaxPool replaced by 2x2 AvgPool, taps relu1_2..relu5_3, channel-unit-normalised, squared difference
    weighted by the LPIPS v0.1 linear weights, summed over channels, averaged over space, summed over taps. Per
    sample, fp32. A frozen object beside the model: not in its state dict, EMA, optimiser or DDP."""

    TAPS, CH = (3, 8, 15, 22, 29), (64, 128, 256, 512, 512)
    LIN_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth"

    def __init__(self, weights="pretrained", res=224):
        super().__init__()
        import torchvision
        with torch.random.fork_rng(devices=[]):  # VGG16 draws initial weights (on the CPU) before its files are read,
            if weights == "pretrained":  # or fail to be: the run's random numbers are left as they were
                vgg = torchvision.models.vgg16(weights="IMAGENET1K_V1").features  # 528 MB VGG16 + LPIPS v0.1 linear
                lin = self._linear_weights()  # heads, cached by torch hub
            else:  # seeded random VGG and uniform weights: a test-only stand-in
                torch.default_generator.manual_seed(0)  # (the CPU's only: torch.manual_seed reseeds CUDA's too)
                vgg = torchvision.models.vgg16(weights=None).features
                lin = [torch.full((c,), 1.0 / c) for c in self.CH]
        self.features = nn.Sequential(*[nn.AvgPool2d(2, 2) if isinstance(m, nn.MaxPool2d) else m
                                        for m in list(vgg)[:self.TAPS[-1] + 1]])
        for i, w in enumerate(lin):
            self.register_buffer(f"w{i}", w.reshape(1, -1, 1, 1).float())
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.res = res
        self.requires_grad_(False).eval()

    def _linear_weights(self):
        try:
            import lpips  # the package ships the weights
            path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except ImportError:
            sd = torch.hub.load_state_dict_from_url(self.LIN_URL, map_location="cpu", progress=False)
        return [sd[f"lin{i}.model.1.weight"].flatten() for i in range(5)]

    def taps(self, y):
        y = y.to(self.mean.dtype)  # fp32 (float64 only when the module was cast with .double())
        if y.shape[1] == 1:
            y = y.repeat(1, 3, 1, 1)
        y = F.interpolate(y, size=(self.res, self.res), mode="bilinear", align_corners=False)
        h, out = ((y + 1) / 2 - self.mean) / self.std, []
        for i, m in enumerate(self.features):
            h = m(h)
            if i in self.TAPS:
                out.append(h / (h.square().sum(1, keepdim=True).sqrt() + 1e-10))  # unit-normalise channels
        return out

    def forward(self, a, b):
        """LP(a, b) per sample; the target b's features carry no gradient."""
        with torch.autocast(a.device.type, enabled=False):  # never in bf16/fp16
            with torch.no_grad():
                fb = self.taps(b)
            return sum((getattr(self, f"w{i}") * (fa - f).square()).sum(1).mean((1, 2))
                       for i, (fa, f) in enumerate(zip(self.taps(a), fb)))


def per_sample_loss(v, x, z, x_t, t, loss, c, lpips=None):
    """2-RF++ §4.2: per-sample 2-RF++ losses; r = v - (z - x), x^ = x_t - t v (the LPIPS term). lpips-huber-1/t is
    Config F of 2-RF++ Table 1, lpips-huber Config E (rfpp train.py with and without --lpips_divt). All in fp32."""
    v, t = v.float(), t.float()
    r = v - (z - x)
    if loss == "l2":  # vanilla reflow: squared error per element (rfpp's l2-squared)
        return r.square().flatten(1).mean(1)
    H = pseudo_huber(r, c)
    if loss == "huber":  # rfpp's huber branch has no (1 - t) factor
        return H
    lp = lpips(x_hat(x_t, t, v), x)  # gradient flows through VGG into x^
    return (1 - t) * H + (lp / t if loss == "lpips-huber-1/t" else lp)


# ============================================================================================================== sampler
def time_grid(K, kind="uniform", t_mid=0.5):
    """Sampling grids: t_0 = 1 > ... > t_K = 0. uniform: 1 - i/K (K = 2: [1, t_mid, 0]); edm: EDM's rho = 7 sigma grid
    (Karras et al. arXiv 2206.00364 Eq. 5) mapped by t = sigma / (1 + sigma), with t_0 := 1 and t_K = 0."""
    if kind == "uniform":
        return [1.0, t_mid, 0.0] if K == 2 else [1 - i / K for i in range(K + 1)]
    if K == 1:
        return [1.0, 0.0]
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    sig = [(a + i / (K - 1) * (b - a)) ** 7 for i in range(K)]
    return [1.0] + [s / (1 + s) for s in sig[1:]] + [0.0]


def _update(x, z, t, t2, d, rule):
    if rule == "new":  # (rfpp Fig. 4, new update) x_t' = (1 - t') x^ + t' z with the initial noise z
        return (1 - t2) * (x - t * d) + t2 * z
    return x + (t2 - t) * d  # Euler step


def solve(v, z, grid, solver="euler", rule="default"):
    """Integrate dx/dt = v(x, t) from x = z at t = grid[0] = 1 down the grid. Euler (the plain step, or rfpp's new
    update rule of Fig. 4), Heun (its last step, to t = 0, is Euler), classical RK4 (plain steps only). v(x, t) takes
    t as a (B,) tensor."""
    x = z
    tt = lambda s: torch.full((z.shape[0],), s, device=z.device, dtype=z.dtype)
    for t, t2 in zip(grid[:-1], grid[1:]):
        d = v(x, tt(t))
        if solver == "rk4":
            h = t2 - t
            k2 = v(x + h / 2 * d, tt(t + h / 2))
            k3 = v(x + h / 2 * k2, tt(t + h / 2))
            k4 = v(x + h * k3, tt(t2))
            x = x + h * (d + 2 * k2 + 2 * k3 + k4) / 6
        elif solver == "heun" and t2 > 0:
            d2 = v(_update(x, z, t, t2, d, rule), tt(t2))
            x = _update(x, z, t, t2, (d + d2) / 2, rule)
        else:
            x = _update(x, z, t, t2, d, rule)
    return x


def nfe(K, solver):
    return {"euler": K, "heun": 2 * K - 1, "rk4": 4 * K}[solver]


def straightness(v, z, K, end=False):
    """Liu et al. §2, straightness: S = (1/K) sum_i mean over samples and elements of (K (x_{t_{i-1}} - x_{t_i}) -
    (z - x_{t_K}))^2 (as rfpp utils.py) on a K-step uniform Euler path; end=True also returns the path's end x_{t_K}
    (the K-step Euler sample)."""
    xs, x, grid = [z], z, time_grid(K, "uniform")  # K = 2: [1, 0.5, 0] (t_mid default)
    for t, t2 in zip(grid[:-1], grid[1:]):
        x = x + (t2 - t) * v(x, torch.full((z.shape[0],), t, device=z.device, dtype=z.dtype))
        xs.append(x)
    line = z - xs[-1]
    S = sum((K * (a - b) - line).square().mean() for a, b in zip(xs[:-1], xs[1:])).item() / K
    return (S, xs[-1]) if end else S


def edm_to_velocity(D, x_t, t):
    """EDM denoiser D(y; sigma) -> rectified-flow velocity (rfpp network_edm.py EDMPrecondVel; docs/rectified_flow.md,
    "EDM denoiser to rectified-flow velocity"): x_t / (1 - t) = x + sigma z with sigma = t / (1 - t), so
    v = z - x = (x_t - D(x_t / (1 - t); t / (1 - t))) / t."""
    tb = t.reshape(-1, *[1] * (x_t.ndim - 1))
    return (x_t - D(x_t / (1 - tb), t / (1 - t))) / tb


class EDMVelocity(nn.Module):
    """An EDM denoiser (common.EDMDenoiser, e.g. EDM's released CIFAR-10 network) as this file's velocity network
    v(x_t, t[, y]), the way rfpp initialises its 2-RF. t is clamped to [T_EPS, 1 - T_EPS] (rfpp's range: sigma =
    t / (1 - t) is infinite at t = 1, where the samplers start). config: the checkpoint's `net` dict."""

    T_EPS = 1e-5

    def __init__(self, den):
        super().__init__()
        self.den = den
        self.config = dict(kind="edm_velocity", denoiser=den.config())

    def forward(self, x, t, y=None):
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        t = t.clamp(self.T_EPS, 1 - self.T_EPS)
        return edm_to_velocity(lambda u, sigma: self.den(u, sigma, y), x.float(), t).to(x.dtype)


def invert(v, x, eps, K):
    """rfpp v2, inversion: ODE inversion data -> noise: Euler up the grid [1e-3, 1/K, ..., 1] from x_1e-3 = (1 -
    1e-3) x + 1e-3 eps."""
    grid = [1e-3] + [i / K for i in range(1, K + 1)]
    y = (1 - grid[0]) * x + grid[0] * eps
    for t, t2 in zip(grid[:-1], grid[1:]):
        y = y + (t2 - t) * v(y, torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype))
    return y


def sampler_for(cfg, K):
    """Sampler defaults: 2rf/ft Euler, uniform grid, new rule; 1rf Heun on the edm grid for K >= 3, else Euler. A
    chosen rk4 takes the edm grid and the default rule in every stage."""
    reflow = cfg.stage in ("2rf", "ft")
    solver = cfg.solver if cfg.solver != "auto" else ("euler" if reflow or K <= 2 else "heun")
    grid = cfg.grid if cfg.grid != "auto" else ("edm" if solver == "rk4" or (solver == "heun" and not reflow)
                                                else "uniform")
    rule = cfg.rule if cfg.rule != "auto" else ("new" if reflow and solver != "rk4" else "default")
    return solver, grid, rule


# ============================================================================================================= plumbing
def net_dict(cfg, data):
    """Network constructor dict for the data: a U-Net for images, the MLP for points; v is the raw output."""
    if cfg.cond and not data.num_classes:
        raise C.UserError(f"--cond needs labelled data; '{cfg.data}' has no labels.")
    if data.kind == "images":
        if cfg.net == "mlp":
            raise C.UserError("--net mlp is for 2-D points; use tiny, small or ddpmpp for images.")
        ch, res = data.shape[0], data.shape[1]
        return C.net_config(cfg.net, img_resolution=res, in_channels=ch, time_scale=1000.0, dropout=cfg.dropout,
                            label_dim=data.num_classes if cfg.cond else 0)
    if cfg.net != "mlp":
        raise C.UserError(f"--net {cfg.net} is an image network; 2-D points need --net mlp.")
    return C.net_config("mlp", time_scale=1000.0, dropout=cfg.dropout, **({"width": cfg.width} if cfg.width else {}))


def build(nd):
    """A checkpoint's `net` dict -> the velocity network: common.build_net, or an EDM denoiser wrapped as a
    velocity (kind 'edm_velocity', a 2-RF started from EDM's checkpoint)."""
    return EDMVelocity(C.EDMDenoiser.from_config(nd["denoiser"])) if nd.get("kind") == "edm_velocity" \
        else C.build_net(nd)


def inner(nd):
    """The U-Net's own config inside a `net` dict (the EDM denoiser's for kind 'edm_velocity')."""
    return nd["denoiser"]["net"] if nd.get("kind") == "edm_velocity" else nd


def sample_shape(nd):
    nd = inner(nd)
    return (nd["dim"],) if nd["kind"] == "mlp" else (nd["in_channels"], nd["img_resolution"], nd["img_resolution"])


EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"  # EDM's released network pickles
NO_1RF = "; train the 1-RF first (--stage 1rf), or name a teacher with --teacher"  # (a missing DIR/ckpt.pt)


def load_teacher(path, env, weights="ema"):
    """A rectified-flow checkpoint -> (network in eval mode with its EMA weights, checkpoint); an EDM network pickle
    (.pkl) -> (EDMVelocity around it, a checkpoint-like dict: net, model = ema = its weights, step 0)."""
    if path.endswith(".pkl"):
        if not os.path.exists(path) and os.path.basename(path).startswith("edm-"):
            raise C.UserError(f"EDM checkpoint '{path}' not found; download {EDM_URL}{os.path.basename(path)} and "
                              f"place it there.")
        den, info = C.load_edm(path)
        net = EDMVelocity(den)
        sd = net.state_dict()
        ck = dict(net=net.config, model=sd, ema=sd, step=0, config={}, method="edm", edm=info["edm_kwargs"])
        return net.to(env.device).eval().requires_grad_(False), ck
    ck = C.load_checkpoint(path)
    if ck["method"] != METHOD or ck["convention"] != CONVENTION:
        raise C.UserError(f"'{path}' is a checkpoint of {ck['method']} with convention '{ck['convention']}'; "
                          f"a {METHOD} checkpoint with '{CONVENTION}' (or an EDM network pickle) is needed.")
    net = build(ck["net"])
    C.load_state_strict(net, ck[weights])
    return net.to(env.device).eval().requires_grad_(False), ck


def _save_npy(path, a):
    with open(path + ".tmp", "wb") as f:
        np.save(f, a)
    os.replace(path + ".tmp", path)


def _fingerprint(z):
    z = torch.as_tensor(z[:16]).double()
    return [z.sum().item(), z.square().sum().item()]


def write_pairs(folder, n, block, make, images, mode, env, meta):
    """Blocks j of `block` indices, rank r writes j = r (mod world); complete blocks are skipped on restart.
    make(idx) -> (x, z) on the device. x: uint8 NHWC (images) / float32; z stored only in mode 'stored'."""
    nblk = math.ceil(n / block)

    def blocks():  # each rank its own (a full disk on one rank stops every rank: C.agree)
        os.makedirs(folder, exist_ok=True)
        for j in range(env.rank, nblk, env.world):
            xp, zp = os.path.join(folder, f"x_{j:05d}.npy"), os.path.join(folder, f"z_{j:05d}.npy")
            if os.path.exists(xp):
                continue
            x, z = make(torch.arange(j * block, min((j + 1) * block, n)))
            if mode == "stored":  # z first: an x file implies a complete block
                _save_npy(zp, z.cpu().half().numpy() if images else z.cpu().float().numpy())
            _save_npy(xp, C.to_uint8(x).permute(0, 2, 3, 1).cpu().numpy() if images else x.cpu().float().numpy())
    C.agree(env, blocks, everywhere=True)

    def record():  # rank 0
        z16 = meta.pop("z16", None)  # seed mode: the regenerated noise; stored mode: what was written
        if mode == "stored":  # the first 16 noises, across blocks (a block may hold fewer)
            z16 = np.concatenate([np.load(os.path.join(folder, f"z_{j:05d}.npy"))
                                  for j in range(min(nblk, math.ceil(16 / block)))])[:16]
        meta.update(n=n, block=block, noise_mode=mode, fingerprint=_fingerprint(z16), convention=CONVENTION,
                    torch=torch.__version__)
        with open(os.path.join(folder, "meta.json.tmp"), "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(os.path.join(folder, "meta.json.tmp"), os.path.join(folder, "meta.json"))
    C.agree(env, record)


def pair_noise(idx, seed, shape, env):
    """Liu et al. §2.2, reflow: z_i ~ N(0, I) from seed + i, drawn on the CPU (CPU and CUDA generators differ),
    then moved."""
    return C.IndexRNG(idx.tolist(), seed, "cpu").randn(len(idx), *shape).to(env.device)


PAIRS_MADE = ("shape", "pair_seed", "solver", "steps", "grid", "n", "block", "noise_mode")  # how pairs were made


def pairs_id(meta):
    """Which pairs a folder's meta.json describes, by how they were made (the teacher's weights, the noise and its
    fingerprint, the solver, ...), not where they lie: a 2-RF's checkpoints record it, so that a moved folder resumes
    and a regenerated one is refused."""
    keep = {k: meta.get(k) for k in ("teacher_id", "teacher_step", *PAIRS_MADE, "fingerprint")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make_pairs(cfg, env):
    """Stage `pairs`, the reflow coupling (Liu et al. §2.2, reflow): x_i = Solve_teacher(z_i; 1 -> 0),
    deterministic, teacher EMA in eval mode, no autocast."""
    teacher, tck, folder, meta, new = pairs_plan(cfg, env)
    shape, edm, mode = sample_shape(tck["net"]), isinstance(teacher, EDMVelocity), new["noise_mode"]
    images, grid, t0 = len(shape) == 3, time_grid(cfg.pair_steps, cfg.pair_grid), time.time()

    @torch.no_grad()
    def make(idx):
        xs, zs = [], []
        for chunk in idx.split(cfg.pair_batch):
            z = pair_noise(chunk, cfg.pair_seed, shape, env)
            if edm:  # rfpp generate_edm.py: EDM's Heun sampler from sigma_max z (18 steps, 35 NFE, rho 7)
                xs.append(C.edm_heun(teacher.den, z, num_steps=cfg.pair_steps).float())
            else:
                xs.append(solve(lambda x, t: teacher(x, t), z, grid, cfg.pair_solver))
            zs.append(z)
        return torch.cat(xs), torch.cat(zs)

    def start():  # what these blocks are, before the first one: a restart checks it (rank 0; C.agree)
        if _pairs_record(folder) is None:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, "started.json.tmp"), "w") as f:  # (atomic: a kill leaves no empty record)
                json.dump({k: new[k] for k in ("teacher_id", "teacher_step", "teacher", *PAIRS_MADE)}, f)
            os.replace(os.path.join(folder, "started.json.tmp"), os.path.join(folder, "started.json"))
    C.agree(env, start)
    write_pairs(folder, cfg.n_pairs, cfg.pair_block, make, images, mode, env, meta)
    if env.is_main:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, "started.json"))
    if env.is_main:
        print(f"pairs: {cfg.n_pairs} pairs in {folder} ({meta['solver']} K={cfg.pair_steps}, {meta['nfe']} NFE, "
              f"{time.time() - t0:.1f}s)", flush=True)


def pairs_plan(cfg, env):
    """The pairs stage's teacher and what its pairs will be -> (teacher, tck, folder, meta, new); pairs already
    in the folder (finished, or stopped part-way) are refused unless they are the pairs asked for (--stage all
    checks this before its 1-RF stage)."""
    tpath = cfg.teacher or os.path.join(cfg.out, "ckpt.pt")
    if not (cfg.teacher or os.path.exists(tpath)):
        raise C.no_file(tpath, "the teacher checkpoint", NO_1RF)
    teacher, tck = load_teacher(tpath, env)
    C.check_teacher_data(tck["config"], cfg.data, tpath)  # the pairs are the teacher's coupling of its own data
    edm = isinstance(teacher, EDMVelocity)
    if inner(tck["net"])["label_dim"]:
        raise C.UserError("reflow from a class-conditional teacher is not supported; " + (
            f"'{tpath}' is a class-conditional EDM pickle: name an unconditional one (such as "
            f"edm-cifar10-32x32-uncond-vp.pkl) with --teacher."
            if edm else "train the 1-RF without --cond."))
    shape, folder = sample_shape(tck["net"]), cfg.pairs or os.path.join(cfg.out, "pairs")
    images = len(shape) == 3
    mode = cfg.noise_mode or ("seed" if images else "stored")
    meta = dict(shape=list(shape), x_dtype="uint8" if images else "float32", pair_seed=cfg.pair_seed,
                solver="edm_heun" if edm else cfg.pair_solver, steps=cfg.pair_steps,
                grid="edm_sigma" if edm else cfg.pair_grid, nfe=nfe(cfg.pair_steps, "heun" if edm else cfg.pair_solver),
                teacher=tpath, teacher_step=tck["step"], teacher_id=C.fingerprint(tck["ema"]),
                z16=pair_noise(torch.arange(min(16, cfg.n_pairs)), cfg.pair_seed, shape, env).cpu())
    new = dict(meta, n=cfg.n_pairs, block=cfg.pair_block, noise_mode=mode)
    old = _stored_pairs(folder)  # finished, or stopped part-way
    if old is not None:  # stored pairs are kept only when they are the pairs asked for
        who = "teacher_id" if "teacher_id" in old else "teacher_step"  # (pairs written before the id: by step)
        diff = [k for k in (who, *PAIRS_MADE) if old.get(k) != new[k]]  # the teacher by its weights, not its path
        if diff and diff[0] in ("teacher_id", "teacher_step"):
            raise C.UserError(f"'{folder}' holds pairs made by another teacher ('{old.get('teacher')}' at step "
                              f"{old.get('teacher_step')}), not by '{tpath}' at step {tck['step']}; remove that folder "
                              f"or give --pairs another one.")
        if diff:
            k = diff[0]
            raise C.UserError(f"'{folder}' holds pairs made with {k} {old.get(k)!r}, not {new[k]!r}; remove that "
                              f"folder or give --pairs another one.")
    return teacher, tck, folder, meta, new


def _stored_pairs(folder):
    """What a pairs folder records: its meta.json (finished) or started.json (stopped part-way) as a dict; None for a
    folder without pair blocks (absent, empty, or a run folder given as --pairs). Blocks without either record are
    refused (another folder's, or damaged pairs): the pairs stage would keep them under a new meta.json."""
    old = _pairs_record(folder)
    blocks = os.path.isdir(folder) and any(re.fullmatch(r"[xz]_\d{5}\.npy", f) for f in os.listdir(folder))
    if old is None and blocks:
        raise C.UserError(f"'{folder}' holds pair blocks but no readable meta.json or started.json of this file's "
                          f"pairs; remove that folder or give --pairs another one.")
    return old


def pairs_foreseen(cfg, net, step):
    """--stage all before its 1-RF is finished (pairs_plan checks a finished one): pairs already in the pairs folder
    that the pairs stage would refuse after the 1-RF trained are refused now, as far as they can be known before the
    teacher exists (its weights cannot): another teacher step than `step` (where the 1-RF stops), count, block size,
    seed, solver, steps or grid, and another shape or noise mode where the samples' shape is known (`net`: the resumed
    1-RF's net dict; a toy's 2-D points)."""
    folder = cfg.pairs or os.path.join(cfg.out, "pairs")
    old = _stored_pairs(folder)
    if old is None:
        return
    if old.get("teacher_step") != step:
        raise C.UserError(f"'{folder}' holds pairs made by another teacher ('{old.get('teacher')}' at step "
                          f"{old.get('teacher_step')}) than this run's 1-RF, which stops at step {step}; remove that "
                          f"folder or give --pairs another one.")
    new = dict(pair_seed=cfg.pair_seed, solver=cfg.pair_solver, steps=cfg.pair_steps, grid=cfg.pair_grid,
               n=cfg.n_pairs, block=cfg.pair_block)
    shape = sample_shape(net) if net else (2,) if cfg.data in C.TOYS else None
    if shape or cfg.noise_mode:  # the noise mode's default follows the shape (seed for images)
        new["noise_mode"] = cfg.noise_mode or ("seed" if len(shape) == 3 else "stored")
    if shape:
        new["shape"] = list(shape)
    k = next((k for k in PAIRS_MADE if k in new and old.get(k) != new[k]), None)
    if k:
        raise C.UserError(f"'{folder}' holds pairs made with {k} {old.get(k)!r}, not {new[k]!r}; remove that folder "
                          f"or give --pairs another one.")


def _pair_block(folder, kind, j, rows, shape):
    """One stored block, read without unpickling and checked: `rows` rows of `shape`, finite numbers."""
    p = os.path.join(folder, f"{kind}_{j:05d}.npy")
    try:
        if not os.path.isfile(p):  # (a FIFO hung np.load)
            raise IsADirectoryError if os.path.isdir(p) else FileNotFoundError
        a = np.load(p, allow_pickle=False)
    except Exception as e:
        raise C.UserError(f"the pairs block '{p}' is unreadable ({type(e).__name__}); regenerate the pairs.") from None
    # (uint64, float64 or longdouble blocks, which the pairs stage never writes, were tracebacks in training)
    if a.shape != (rows, *shape) or a.dtype not in (np.uint8, np.float16, np.float32) or (
            a.dtype.kind == "f" and not np.isfinite(a).all()):
        raise C.UserError(f"the pairs block '{p}' holds {a.dtype} {a.shape}, not finite numbers of shape "
                          f"{(rows, *shape)} as meta.json says; regenerate the pairs.")
    return a


def _read_meta(folder, name="meta.json"):
    """The pairs folder's meta.json (or started.json) as a dict, or None when there is none (or it cannot be read)."""
    p = os.path.join(folder, name)
    if not os.path.isfile(p) or os.path.getsize(p) > 1 << 20:  # (a FIFO hung, /dev/zero was read until killed)
        return None
    try:
        with open(p) as f:
            m = json.load(f)
        return m if isinstance(m, dict) else None
    except (OSError, ValueError, RecursionError):  # ([[[...]]] nested 100,000 deep was a traceback)
        return None


def _pairs_record(folder):
    """What a pairs folder records of how its pairs are made: meta.json (finished) or started.json (stopped part-way),
    or None."""
    return _read_meta(folder) or _read_meta(folder, "started.json")


def load_pairs(folder, env, seed, shape=None):
    """All pairs on the device: x as common.Data (index stream per epoch, no flips) and z indexed alongside.
    `shape`: the network's sample shape, which the pairs must have."""
    mp = os.path.join(folder, "meta.json")
    if not os.path.exists(mp):
        raise C.UserError(f"no pairs in '{folder}' (meta.json missing); run --stage pairs first.")
    meta = _read_meta(folder)
    try:
        n, S, mode, pshape = int(meta["n"]), int(meta["block"]), meta["noise_mode"], tuple(meta["shape"])
        fp, pseed = meta.get("fingerprint"), meta.get("pair_seed", 0)  # (a fingerprint of strings or of another
        # length, a seed beyond 2^63 were tracebacks)
        ok = n >= 1 and S >= 1 and mode in ("seed", "stored") and all(isinstance(d, int) for d in pshape) \
            and isinstance(fp, list) and len(fp) == 2 and all(type(v) in (int, float) for v in fp) \
            and type(pseed) is int and 0 <= pseed < 1 << 63
    except (ValueError, TypeError, KeyError):  # TypeError also for meta None (unreadable)
        ok = False
    if not ok:
        raise C.UserError(f"'{mp}' is not the meta.json of this file's pairs (n, block, noise_mode, shape, "
                          f"fingerprint); regenerate the pairs.")
    if shape is not None and pshape != tuple(shape):
        raise C.UserError(f"the pairs in '{folder}' have shape {pshape} where the network makes {tuple(shape)}; "
                          f"use the pairs of this teacher.")
    nblk = math.ceil(n / S)
    if nblk > len(os.listdir(folder)):  # (n 10**12 in blocks of 1: a trillion lookups, a hang)
        raise C.UserError(f"pairs in '{folder}' are incomplete: meta.json counts {nblk} blocks, the folder holds "
                          f"fewer files.")
    missing = [j for j in range(nblk) if not os.path.exists(os.path.join(folder, f"x_{j:05d}.npy"))
               or (mode == "stored" and not os.path.exists(os.path.join(folder, f"z_{j:05d}.npy")))]
    if missing:
        raise C.UserError(f"pairs in '{folder}' are incomplete: blocks {missing[:10]} are missing.")
    rows = [min(S, n - j * S) for j in range(nblk)]
    xshape = (*pshape[1:], pshape[0]) if len(pshape) == 3 else pshape  # images are stored NHWC
    x = torch.from_numpy(np.concatenate([_pair_block(folder, "x", j, rows[j], xshape) for j in range(nblk)]))
    images = x.dtype == torch.uint8
    if mode == "stored":
        z = torch.from_numpy(np.concatenate([_pair_block(folder, "z", j, rows[j], pshape) for j in range(nblk)]))
        z16 = z[:16]
    else:  # regenerate per-index noise on the CPU; images keep it on the device as fp16
        z = torch.cat([pair_noise(c, meta["pair_seed"], meta["shape"], env).cpu().to(
            torch.float16 if images else torch.float32) for c in torch.arange(n).split(10_000)])
        z16 = pair_noise(torch.arange(min(16, n)), meta["pair_seed"], meta["shape"], env).cpu()
    if not np.allclose(_fingerprint(z16), meta["fingerprint"], rtol=1e-9, atol=1e-9):
        raise C.UserError(f"the noise of '{folder}' does not match its fingerprint (another device or torch "
                          f"version?); regenerate the pairs with --noise_mode stored.")
    xs = x.permute(0, 3, 1, 2).contiguous() if images else x
    data = C.Data("images" if images else "points", "pairs", x=xs.to(env.device),
                  labels=torch.arange(n, device=env.device), seed=C.derive_seed(seed, "pairs"))
    return data, z.to(env.device), meta


def make_lpips(cfg, log, env=None):
    """LPIPS for the lpips-* losses (under torchrun rank 0 first: its weights download once). Offline, a reproduction
    preset (--fallback false) stops with one sentence naming the files; the others fall back to --loss huber with one
    warning line (every rank, when any rank failed)."""
    if not cfg.loss.startswith("lpips"):
        return None
    lpips, e = C.rank0_first(env, lambda: LPIPS(cfg.lpips_weights, cfg.lpips_res))  # (torch hub's "Downloading: ..."
    if e is None:  # line must not precede the error or the warning; one rank's failure is every rank's: no rank
        return lpips  # trains with another loss)
    why = f"{type(e).__name__}: {str(e)[:60]}"
    if not cfg.fallback:
        hub = os.path.join(torch.hub.get_dir(), "checkpoints")
        import torchvision
        vgg = torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
        raise C.UserError(f"LPIPS weights unavailable ({why}); place torchvision's vgg16-397923af.pth ({vgg}) and "
                          f"LPIPS v0.1 vgg.pth ({LPIPS.LIN_URL}) in {hub}, or pass --loss huber to train without "
                          f"LPIPS.")
    log.info(f"warning: LPIPS weights unavailable ({why}); training with --loss huber")
    cfg.loss = "huber"
    return None


def lpips_on_points(loss):
    return C.UserError(f"--loss {loss} compares images (VGG16 features) and this run trains on 2-D points; use --loss "
                       f"huber or l2.")


@torch.no_grad()
def evaluate(net, cfg, data, env, out, step):
    """Samples at several step counts next to the data (PNG), straightness (Liu et al. §2, straightness) and, for
    points, the toy metrics of docs/common.md (SWD, MMD^2, modes). Runs on rank 0 only; no collectives inside."""
    nd = C.unwrap(net).config
    shape = sample_shape(nd)
    g = torch.Generator().manual_seed(C.derive_seed(cfg.seed, "eval"))
    z = torch.randn(cfg.eval_n, *shape, generator=g).to(env.device)
    K = inner(nd)["label_dim"]
    y = torch.randint(K, (cfg.eval_n,), generator=g).to(env.device) if K else None
    v = lambda x, t: net(x, t, y=None if y is None else y[:len(x)])
    sheet = C.EvalSheet(data, shape, cfg.eval_n, cfg.seed, step, g=g)
    n = sheet.n
    runs = [(K, *sampler_for(cfg, K), str(K)) for K in cfg.eval_steps]
    if cfg.stage == "1rf" and len(shape) == 1:  # the teacher with many steps: 100 Euler steps and the pairs' solver
        runs += [(100, "euler", "uniform", "default", "100"),
                 (cfg.pair_steps, cfg.pair_solver, cfg.pair_grid, "default", f"{cfg.pair_solver}{cfg.pair_steps}")]
    S, x_end = straightness(v, z, cfg.straight_k, end=True)
    for K, solver, grid, rule, key in runs:
        if (K, solver, grid, rule) == (cfg.straight_k, "euler", "uniform", "default") and K != 2 and n == len(z):
            xs = x_end  # the straightness path (Liu et al. §2, straightness) is this K-step Euler sample
        else:
            xs = solve(v, z[:n], time_grid(K, grid, cfg.t_mid), solver, rule)
        edm = ", edm grid" if grid == "edm" else ""
        sheet.add(key, f"{C.n_steps(K)} ({solver}{edm}, {nfe(K, solver)} NFE)", xs)
    sheet.metrics["straightness"] = S
    return sheet.write(out)


def sampler(net, cfg, shape, K, env):
    """generate(rng, labels) for common.compute_fid and `sample`: per-index noise, the stage's default solver."""
    solver, grid, rule = sampler_for(cfg, K)
    tg = time_grid(K, grid, cfg.t_mid)

    @torch.no_grad()
    def generate(rng, labels):
        with C.autocast(env):
            return solve(lambda x, t: net(x, t, y=labels), rng.randn(len(rng.gens), *shape), tg, solver, rule).float()
    return generate


# ============================================================================================================= training
def stage_dir(cfg, stage):
    return cfg.out if stage == "1rf" else os.path.join(cfg.out, stage)


def resumed_ckpt(cfg):
    """The checkpoint a train command resumes (common.parse_cli): its stage's; --stage pairs resumes no config (its
    blocks are matched by pairs_plan), --stage all its 1-RF's (each later stage's config is checked as it starts)."""
    return None if cfg.stage == "pairs" else os.path.join(stage_dir(cfg, "1rf" if cfg.stage == "all" else cfg.stage),
                                                          "ckpt.pt")


def run_layout(cfg):
    """The folders the train command writes in, each with the names of its files (common.check_layout)."""
    layout = {cfg.out: C.RUN_FILES}
    pairs = ("[xz]_*.npy", "*.tmp", "meta.json", "started.json")  # write_pairs' blocks, the .tmp files of _save_npy
    add = lambda d, names: layout.update({d: (*layout.get(d, ()), *names)})  # and meta.json, make_pairs' started.json
    for s in ["1rf", "pairs", "2rf"] if cfg.stage == "all" else [cfg.stage]:
        if s == "pairs":
            add(cfg.pairs or os.path.join(cfg.out, "pairs"), pairs)
        else:
            add(stage_dir(cfg, s), C.RUN_FILES)
    if cfg.stage == "ft":  # its inverted pairs (invert_data)
        add(os.path.join(stage_dir(cfg, "ft"), "pairs"), pairs)
    return layout


def resumed(cfg, given, path, log=None):
    """The checkpoint a training stage resumes and the stage's config -> (ck, cfg); (None, cfg) for a fresh stage. Its
    resume rules (another stage's or method's checkpoint, a 2-RF's teacher or pairs, common.resume_config) are one
    sentence; `log` takes resume_config's notes (run() checks a later stage of --stage all up front with a no-op)."""
    stage = cfg.stage
    if not (cfg.resume or (cfg.resume is None and os.path.exists(path))):
        return None, cfg
    ck = C.load_checkpoint(path)
    if ck["method"] != METHOD or ck["config"].get("stage") != stage or ck["convention"] != CONVENTION:
        raise C.UserError(f"'{path}' is not a {METHOD} {stage} checkpoint; use another --out.")
    if stage == "2rf":  # the teacher only started the run (not read on resume: the checkpoint holds the network)
        was = ck["config"].get("teacher") or os.path.join(cfg.out, "ckpt.pt")
        if "teacher" in given and not C.same_file(given["teacher"], was):
            raise C.UserError(f"'{path}' was started from the teacher '{was}', and a resumed 2-RF does not read "
                              f"--teacher; drop it (or use another --out for --teacher {given['teacher']}).")
        was = ck["config"].get("pairs") or os.path.join(cfg.out, "pairs")  # the pairs: by pairs_id (check_pairs_id)
        if given.get("pairs") and not C.same_file(given["pairs"], was) and "pairs_id" not in ck:  # where recorded
            raise C.UserError(f"'{path}' was started from the pairs '{was}'; a resumed 2-RF cannot change them "
                              f"(use another --out for --pairs {given['pairs']}).")
    return ck, C.resume_config(Config, ck, cfg, given, path, drop=("stage",), log=log,
                               iters="ft_iters" if stage == "ft" else "iters")


def check_pairs_id(folder, meta, ck, path):
    """A resumed 2-RF (checkpoint `ck` at `path`) trains on the pairs it started from: the pairs in `folder` (their
    meta.json `meta`; None: load_pairs says why) are known by pairs_id, and others are one sentence."""
    now, pid = pairs_id(meta) if meta is not None else None, ck.get("pairs_id") if ck else None
    if None not in (now, pid) and now != pid:
        raise C.UserError(f"the pairs in '{folder}' are not those '{path}' started from (regenerated since, or "
                          f"another folder); name the folder that holds them with --pairs, or use another --out.")
    return pid or now


def train(cfg, given, env, alone=True):
    """One training stage (1rf, 2rf or ft): data, optimiser, EMA, logging, checkpoints, periodic samples. `alone`:
    --stage names this stage (not all, whose pairs stage reads the pair solver's fields)."""
    stage = cfg.stage
    out = stage_dir(cfg, stage)
    path = os.path.join(out, "ckpt.pt")
    ck, cfg = resumed(cfg, given, path)
    C.require_detector(cfg, env)  # --fallback false: a missing FID detector stops the run now, in one sentence
    init, pid = {}, None  # weights (and optimiser state) a fresh run starts from; the 2-RF's pairs_id
    if stage == "1rf":
        data = C.load_data(cfg.data, cfg.root, env, cfg.seed, cfg.xflip)
        C.refuse_unused(given, data.kind, images=("xflip",), points=("width", *(
            ("pair_solver", "pair_steps", "pair_grid") if alone else ())))  # (read by its 2-D evaluation only)
        nd = net_dict(cfg, data)
    else:
        if stage == "2rf":
            src = cfg.teacher or os.path.join(cfg.out, "ckpt.pt")
        else:
            src = os.path.join(cfg.out, "2rf", "ckpt.pt")
        if stage == "2rf" and ck:  # the teacher only started the run: a resume reads neither its file nor its weights
            nd = ck["net"]
        elif not os.path.isfile(src) and not src.endswith(".pkl"):  # (a missing EDM pickle: load_teacher names
            raise C.no_file(src, f"the {'teacher' if stage == '2rf' else '2-RF'} checkpoint",  # its download)
                            "" if cfg.teacher else NO_1RF if stage == "2rf" else "; train the 2-RF first (--stage 2rf)")
        else:
            src_net, sck = load_teacher(src, env)
            C.check_teacher_data(sck["config"], cfg.data, src)
            nd = sck["net"]
        C.refuse_unused(given, "points" if inner(nd)["kind"] == "mlp" else "images")  # --fid_every etc. on 2-D points
        if inner(nd)["kind"] == "mlp" and stage != "1rf" and cfg.loss.startswith("lpips"):
            raise lpips_on_points(cfg.loss)
        # real data for evaluation and FID (2rf/ft train on pairs), before any output: a bad --data is one sentence,
        # and so is data of another shape than the network's samples (a 2-D teacher's pairs beside an image set);
        # loaded on every rank: load_data holds a barrier
        ref = C.load_data(cfg.data, cfg.root, env, cfg.seed, False)
        if tuple(ref.shape) != tuple(sample_shape(nd)):
            raise C.UserError(f"--data {cfg.data} holds {'images' if ref.kind == 'images' else '2-D points'} of "
                              f"shape {tuple(ref.shape)} and the network makes samples of shape "
                              f"{tuple(sample_shape(nd))}; give the data its teacher was trained on.")
        if stage == "2rf":  # 2-RF++ initialisation: raw weights and EMA = the teacher's EMA; fresh Adam
            init = {} if ck else dict(model=sck["ema"], ema=sck["ema"])
            folder = cfg.pairs or os.path.join(cfg.out, "pairs")
            meta = _read_meta(folder)  # (none: load_pairs says so)
            made_by = (meta or {}).get("teacher_id")  # (pairs written before the id: not compared)
            if not ck and made_by and made_by != C.fingerprint(sck["ema"]):
                raise C.UserError(f"the pairs in '{folder}' were made by another teacher than '{src}' (other "
                                  f"weights); 2-RF++ starts from the teacher whose pairs it learns: name that one with "
                                  f"--teacher, or make pairs with this one (--stage pairs).")
            pid = check_pairs_id(folder, meta, ck, path)
        else:  # ft: continue the 2-RF (model, EMA, Adam) on real images paired with their inverted noise
            init = dict(model=sck["model"], ema=sck["ema"], opt=sck["opt"])
            folder = os.path.join(out, "pairs")
            invert_data(cfg, env, src_net, folder)
        data, Z, _ = load_pairs(folder, env, cfg.seed, sample_shape(nd))

    raw = build(nd).to(env.device)
    if ck:
        C.check_resume_net(ck["net"], nd, path)
    C.load_state_strict(raw, ck["model"] if ck else init.get("model", raw.state_dict()))
    C.freeze_unfed_augment(raw)  # no stage feeds augmentation labels: an EDM teacher's map_augment stays its own
    model = C.distribute(C.maybe_compile(raw, cfg.compile), env)
    ema = C.EMA(raw, decay=cfg.ema if cfg.ema is not None else 0.0)
    if ck or "ema" in init:
        C.load_state_strict(ema.model, ck["ema"] if ck else init["ema"])
    opt = torch.optim.Adam(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    if ck or "opt" in init:  # moments from the checkpoint, lr from this run's config
        C.load_optimizer(opt, ck["opt"] if ck else init["opt"])
    gens = [data.gen] if data.gen is not None else []
    if ck:
        C.restore_rng(ck, env, gens)
    step = ck["step"] if ck else 0
    iters = cfg.ft_iters if stage == "ft" else cfg.iters

    per_rank = cfg.batch // (env.world * cfg.accum)
    if per_rank * env.world * cfg.accum != cfg.batch:
        raise C.UserError(f"--batch {cfg.batch} is not divisible by world size {env.world} x --accum {cfg.accum}.")
    # the loss scaler before the Logger: a malformed saved scaler state is refused before the run's first line
    scaler, ddp = C.make_scaler(env, ck), isinstance(model, nn.parallel.DistributedDataParallel)
    # LPIPS before the Logger writes config.json (an offline fallback to huber is the loss this run trains with); its
    # warning waits for the run's first line
    lpips = make_lpips(cfg, types.SimpleNamespace(info=C.note), env) if stage != "1rf" else None
    log = C.Logger(out, env, iters, cfg.batch, cfg, start_step=ck and step)
    if lpips is not None:
        lpips = lpips.to(env.device)
    d = math.prod(data.shape)
    c = cfg.huber_c if cfg.huber_c is not None else 0.00054 * d  # c = 0.00054 d (rfpp train.py)
    log.info(f"{METHOD} {stage} | world {env.world} | global batch {cfg.batch} = {env.world} x {per_rank} x "
             f"{cfg.accum} | device {env.device} | precision {env.precision} | "
             f"params {sum(p.numel() for p in raw.parameters()):,} | step {step}/{iters}"
             + (f" | loss {cfg.loss}" if stage != "1rf" else ""))
    ref = data if stage == "1rf" else ref
    fid = C.FidHook(cfg.fid_detector, ref, env, cfg.root, cfg.fid_n, log, inner(ema.model.config)["label_dim"]) \
        if cfg.fid_every else None

    def loss_fn(part):
        # ---- ALGO LOGIC: one 1-RF / 2-RF++ loss (2-RF++ §4) ----------------------------------------------------------
        if stage == "1rf":
            x, y = data.batch(per_rank, step, part, env.world * cfg.accum)
            z = torch.randn_like(x)
            t = sample_t(len(x), cfg, env.device)  # uniform on [t_eps, 1 - t_eps): [0, 1) at the default t_eps 0
            with C.autocast(env):
                v = model(interpolate(x, z, t), t, y=y)  # (Liu et al. §2)
            return (v.float() - (z - x)).square().mean()  # (Liu et al. §2, flow matching)
        # the fixed reflow pairs (x_i, z_i), x_i = ODE_teacher(z_i) made by the pairs stage (make_pairs; Liu et al.
        # §2.2), or for ft real images and their inverted noise (invert_data); no flips: they would break the pairs
        x, idx = data.batch(per_rank, step, part, env.world * cfg.accum)
        z = Z[idx].float()
        t = sample_t(len(x), cfg, env.device)  # (2-RF++ §4.1) U-shaped
        x_t = interpolate(x, z, t)
        with C.autocast(env):
            v = model(x_t, t)
        return per_sample_loss(v, x, z, x_t, t, cfg.loss, c, lpips).mean()  # (2-RF++ §4.2)
        # ---- end of ALGO LOGIC ---------------------------------------------------------------------------------------

    guard = C.Guard(env, cfg.max_skips, log, path, ck and step,  # skips non-finite steps, withholds bad checkpoints
                    probe=C.sample_probe(lambda n: sampler(n, cfg, sample_shape(nd), 1, env), (raw, ema.model), env,
                                         data, inner(nd)["label_dim"]))

    def state():
        return dict(model=raw.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), net=nd, method=METHOD,
                    convention=CONVENTION, **({"pairs_id": pid} if stage == "2rf" else {}))

    model.train()
    while step < iters:
        for grp in opt.param_groups:  # linear warm-up from 0 (lr x step / warmup: rfpp train.py, Liu et al.'s
            # score_sde-based optimization_manager), then constant or a cosine decay to 0
            grp["lr"] = (cfg.lr * min(1.0, step / cfg.warmup) if cfg.warmup and stage != "ft" else cfg.lr) * (
                0.5 * (1 + math.cos(math.pi * step / iters)) if cfg.lr_schedule == "cosine" else 1.0)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for r in range(cfg.accum):
            sync = not ddp or r == cfg.accum - 1
            with model.no_sync() if not sync else contextlib.nullcontext():
                loss = loss_fn(r * env.world + env.rank) / cfg.accum
                scaler.scale(loss).backward()
            total = total + loss.detach()
        scaler.unscale_(opt)
        ok = guard.finite(raw.parameters())  # before clipping
        if cfg.clip:
            nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip)
        guard.step(opt, scaler, ok)  # skipped (weights and Adam state unchanged) if a gradient is not finite
        scaler.update()
        ema.update(raw, step * cfg.batch, cfg.batch)
        guard.end_step(total)
        step += 1
        if step % cfg.log_every == 0 or step == iters:
            log.log(step, loss=total)
        if step % cfg.ckpt_every == 0 or step == iters:
            guard.checkpoint(step, step == iters, state, gens)
        if cfg.sample_every and step % cfg.sample_every == 0:  # rank 0 (a failure stops every rank: C.agree)
            C.agree(env, lambda: log.info(f"eval: {evaluate(ema.model, cfg, ref, env, out, step)}"))
        if fid and step % cfg.fid_every == 0:
            K = 1 if stage != "1rf" else 18
            fid(step, {C.n_steps(K): sampler(ema.model, cfg, sample_shape(ema.model.config), K, env)})
    if ck is None and iters == 0:
        guard.checkpoint(step, True, state, gens)
    def final():  # rank 0 (a failure stops every rank: C.agree, which every rank leaves after it)
        m = evaluate(ema.model, cfg, ref, env, out, step)
        log.info("eval: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "step"))
    C.agree(env, final)
    return cfg


def invert_data(cfg, env, net2, folder):
    """Stage ft data: the first ft_n training images (unflipped) and their noise by ODE inversion (rfpp v2,
    inversion) with the frozen 2-RF EMA, written like a pairs folder with stored noise."""
    data = C.load_data(cfg.data, cfg.root, env, cfg.seed, False)
    if data.kind != "images":
        raise C.UserError("--stage ft fine-tunes on real images; it needs an image data set.")
    n = min(cfg.ft_n, len(data.x))

    @torch.no_grad()
    def make(idx):
        x = data.x[idx.to(data.x.device)].float() / 127.5 - 1
        eps = pair_noise(idx, 2 * 10 ** 9, data.shape, env)  # per-index, disjoint from pair and FID seeds
        return x, invert(lambda y, t: net2(y, t), x, eps, cfg.inv_steps)

    now, made = dict(n=n, inv_steps=cfg.inv_steps, source=cfg.data), _read_meta(folder)
    same = lambda k: (C.same_file if k == "source" else operator.eq)(made.get(k), now[k])
    if not os.path.exists(os.path.join(folder, "meta.json")):
        write_pairs(folder, n, cfg.pair_block, make, True, "stored", env,
                    dict(shape=list(data.shape), x_dtype="uint8", **now))
    elif made is not None and not all(map(same, now)):  # (an unreadable meta.json: load_pairs says so)
        opt = dict(n="ft_n", inv_steps="inv_steps", source="data")
        raise C.UserError(f"the inverted pairs in '{folder}' were made with " + ", ".join(
            f"--{opt[k]} {made.get(k)}" for k in now) + "; the fine-tuning trains on them: give those again, or remove "
            "that folder (or use another --out).")


# ============================================================================================================= commands
# sample and fid change only these Config fields over the checkpoint's (any other is refused)
SAMPLER_FIELDS = dict(  # the ODE solver's fields (sampler_for), and the step counts that read them (K = 1: [1, 0];
    # the rules coincide on the first step, from z at t = 1, and on the last, to t = 0: K <= 2, test_new_update_rule)
    solver=None, grid=(lambda K: K > 1, "2 steps or more"), rule=(lambda K: K > 2, "3 steps or more"),
    t_mid=(lambda K: K == 2, "2 steps"))


def run(cfg, given):
    k = next((k for k in ("teacher", "pairs") if given.get(k)), None)
    if cfg.stage in ("1rf", "ft") and k or cfg.stage == "all" and "teacher" in given:
        raise C.UserError(f"--stage {cfg.stage} does not read --{k or 'teacher'} (" + (
            "the 1-RF trains on the data" if cfg.stage == "1rf" else "the fine-tuning continues DIR/2rf" if
            cfg.stage == "ft" else "its pairs come from the 1-RF it trains") + "; --stage pairs and 2rf read it); "
            "drop it.")
    if cfg.stage == "all" and "stage" not in given and any(isinstance(v, dict) and v.get("teacher") for v in
                                                           PRESETS[cfg.preset].values()):  # (cifar10's: EDM's)
        raise C.UserError(f"the {cfg.preset} recipe makes its pairs with, and starts its 2-RF from, the teacher its "
                          f"preset names (rfpp: EDM's checkpoint): run --stage pairs, then --stage 2rf; the default "
                          f"--stage all would first train a 1-RF from scratch and learn from that (give --stage all "
                          f"for that path).")
    if cfg.stage == "ft" and "iters" in given:  # (it was accepted, and ignored)
        raise C.UserError("--stage ft counts its steps with --ft_iters, not --iters; drop --iters.")
    C.refuse_other(given, STAGE_ONLY, "stage", cfg.stage)  # (a 2-RF given --pair_seed recorded the new value)
    k = next((k for k in ("pair_solver", "pair_grid") if k in given), None)
    if cfg.stage == "pairs" and str(cfg.teacher).endswith(".pkl") and k:  # (accepted, and ignored)
        raise C.UserError(f"an EDM teacher's pairs are made by EDM's Heun sampler on EDM's sigma grid (rfpp "
                          f"generate_edm.py; --pair_steps sets its steps), which does not read --{k}; drop it.")
    first = os.path.join(cfg.out, "ckpt.pt")
    if cfg.stage == "all":  # restarted without --data/--seed/--preset: every stage takes the 1-RF's
        cfg, given = C.pipeline_data(Config, PRESETS, cfg, given, first, stage="all")
    ck1 = C.load_checkpoint(first) if cfg.stage == "all" and os.path.exists(first) else None  # the 1-RF's
    resumes = ck1 is not None and cfg.resume is not False  # (--resume false: a fresh 1-RF)
    # a conditional teacher: pairs_plan refuses it, which was after the 1-RF had trained (a toy or a .npy has no
    # labels: there net_dict refuses --cond, before any output; a folder or .zip may have them, in its dataset.json)
    labelled = not (cfg.data in C.TOYS or cfg.data.lower().endswith(".npy"))
    if cfg.stage == "all" and (cfg.cond and labelled or resumes and ck1["config"].get("cond") is True):
        raise C.UserError("--stage all makes its pairs from the 1-RF it trains, and reflow from a class-conditional "
                          "teacher is not supported; train the 1-RF without --cond (--stage 1rf trains it alone).")
    pdir = cfg.pairs or os.path.join(cfg.out, "pairs")  # another --pairs folder counts where this 1-RF made its pairs
    own = C.same_file(pdir, os.path.join(cfg.out, "pairs"))
    mine = own or ck1 is not None and (_pairs_record(pdir) or {}).get("teacher_id") == C.fingerprint(ck1["ema"])
    after = [p if p == "2rf" or own else f"pairs (--pairs '{pdir}')" for p, d in
             (("pairs", pdir), ("2rf", os.path.join(cfg.out, "2rf"))) if os.path.exists(d) and (p == "2rf" or mine)]
    if cfg.stage == "all" and after and ck1 is not None:  # the 1-RF made them: it must not train on beneath them
        if cfg.resume is not False:
            C.check_not_beneath(cfg.out, first, given, after, "1-RF", "continue one stage with --stage 2rf")
        elif mine and _pairs_record(pdir) is not None:  # nor a new one in place of their teacher: refused now, not
            # by the pairs stage after it trained (the old 1-RF overwritten by then); a 2-RF alone starts anew too
            raise C.UserError(f"'{pdir}' holds the pairs of the 1-RF in '{cfg.out}', which --resume false would "
                              f"train anew and overwrite; drop --resume false to continue the run, remove that "
                              f"folder, or use another --out.")
    clock, env = C.stopwatch(), C.setup(cfg.device, cfg.seed, cfg.precision)
    plan = []
    for s in (["1rf", "pairs", "2rf"] if cfg.stage == "all" else [cfg.stage]):
        scfg = cfg
        if cfg.stage == "all":  # each stage re-resolves its own preset part (iterations, lr, EMA); the pairs and
            scfg = C.resolve_config(Config, PRESETS, cfg.preset, {**given, "out": cfg.out}, stage=s)
            scfg.preset, scfg.teacher = cfg.preset, None  # the 2-RF learn from its 1-RF, not a preset's teacher
        plan.append((s, scfg))
    k = next((k for k in ("lpips_weights", "lpips_res") if k in given), None)
    for s, scfg in plan:
        if s not in ("2rf", "ft"):
            continue
        ckpt = os.path.join(stage_dir(scfg, s), "ckpt.pt")
        if k:  # the LPIPS options are read by an LPIPS loss only (a resumed stage: its saved loss)
            loss = scfg.loss if "loss" in given else C.saved_config(ckpt).get("loss", scfg.loss)
            if not str(loss).startswith("lpips"):
                raise C.UserError(f"--{k} is read by the LPIPS losses only, and the {s} stage's --loss is {loss}; "
                                  f"drop it.")
        if cfg.stage == "all" and cfg.net == "mlp" and scfg.loss.startswith("lpips"):  # (the 1-RF's network)
            raise lpips_on_points(scfg.loss)
        if not scfg.fallback and not os.path.exists(ckpt):  # a fresh stage's missing LPIPS weights (--fallback
            make_lpips(scfg, None, env)  # false) stop the run before the 1-RF (a resumed one: its config's loss)
    if cfg.stage == "all":  # pairs already there that its 1-RF would not make (another teacher, other pair options)
        ends = given.get("iters", ck1["config"].get("iters", 0)) if resumes else plan[0][1].iters  # are refused now,
        if resumes and ck1["step"] >= ends:  # not after a stage: all of it for a finished 1-RF, what can be known
            pairs_plan(plan[1][1], env)  # before the teacher exists for one that will train (not its weights)
        else:
            pairs_foreseen(plan[1][1], ck1["net"] if resumes else None, ends)
    for s, scfg in plan[1:] if cfg.stage == "all" else ():  # a later stage's unreadable checkpoint stops the run
        ckpt = os.path.join(stage_dir(scfg, s), "ckpt.pt")  # now, not after the stages before it ran again
        if s != "pairs" and os.path.exists(ckpt):  # and so does a resumed 2-RF's refusal (its resume rules, other
            ck, _ = resumed(scfg, {k: v for k, v in given.items() if k not in ONE_RF_ONLY}, ckpt, log=lambda m: None)
            if ck is not None:  # pairs than it started from)
                check_pairs_id(pdir, _read_meta(pdir), ck, ckpt)
    for s, scfg in plan:
        if s == "pairs":
            make_pairs(scfg, env)
        else:  # with `all`, the network flags shape the 1-RF; the 2-RF takes its network from it
            train(scfg, given if s == "1rf" or cfg.stage != "all" else
                  {k: v for k, v in given.items() if k not in ONE_RF_ONLY}, env, alone=cfg.stage != "all")
    if env.is_main:
        print(clock(), flush=True)


def sample_or_fid(cmd, opts, given):
    env = C.setup(opts.device, opts.seed, opts.precision or "fp32")  # sample/fid: fp32, TF32 off
    net, ck = load_teacher(opts.ckpt, env, "ema" if opts.ema else "model")
    if ck["method"] == "edm" and "data" not in given:  # an EDM pickle records no data set (its config is {})
        if cmd == "fid" and not opts.fid_ref:  # (Config's default, 8gaussians, was named as the reference)
            raise C.UserError(f"EDM's network pickle '{opts.ckpt}' records no data set; give fid --data (the images "
                              f"it was trained on, such as cifar10).")
        ck = {**ck, "config": {**ck["config"], "data": Config.data}}  # none given: common's --data-beside-
        # --fid_ref check compares the default with itself (a --data given differs from the pickle's none: refused)
    cfg = C.merge_config(Config, ck["config"], given)
    if "t_mid" in given and (grid := sampler_for(cfg, 2)[1]) != "uniform":  # (--steps holds 2: _sample_options)
        raise C.UserError(f"--t_mid is the middle time of the 2-step uniform grid, and 2 steps sample on the "
                          f"{grid} grid here (--grid {cfg.grid}, --solver {cfg.solver}); drop it, "
                          f"or pass --grid uniform.")
    shape, classes = sample_shape(ck["net"]), inner(ck["net"])["label_dim"]
    solver = lambda K: sampler_for(cfg, K)[0]
    C.sample_or_fid(cmd, opts, env, cfg, ck, shape, lambda K: sampler(net, cfg, shape, K, env),
                    lambda K: f"{C.n_steps(K)} ({', '.join(sampler_for(cfg, K))}, {nfe(K, solver(K))} NFE)",
                    classes, record=lambda K: dict(nfe=nfe(K, solver(K))))


def main(argv=None):
    cmd, cfg, given = C.parse_cli(Config, PRESETS, METHOD, argv, sampler=SAMPLER_FIELDS, resumes=resumed_ckpt)
    C.preflight(cmd, cfg, run_layout(cfg) if cmd == "train" else None)
    run(cfg, given) if cmd == "train" else sample_or_fid(cmd, cfg, given)


if __name__ == "__main__":
    C.main_guard(main)
