"""GDD / GDD-I: a diffusion (flow) teacher made a one-step generator by a GAN loss alone.

Paper: Zheng & Yang, "Diffusion Models Are Innate One-Step Generators", arXiv 2405.20750 (GDD, GDD-I); the ICML 2025
version, arXiv 2506.09376, calls them D2O and D2O-F. Derivations and the CIFAR-10 recipe with sources:
docs/distributional.md; "GDD §n" is the paper's, file names are Zyriix/GDD's.

The method in a few lines. A pretrained flow teacher's clean-data prediction at the pure-noise end is already a
one-step generator, G(z) = z - v(z, t_g), with t_g the teacher's largest time (see Convention): at step 0 it is
exactly the teacher (for a 1-rectified-flow (1-RF) teacher at t_g = 1, its one-step Euler sample, which has
collapsed onto the data mean). G starts as a copy of the teacher's EMA weights and is trained *only* with a
non-saturating GAN loss against real data (plus lazy R1 on the discriminator: a penalty on the squared gradient of
D at real data, every r1_interval = 16 steps): no regression, no distillation, and the teacher is never queried again.
GDD trains every weight; GDD-I freezes the two 3x3 convolutions and the attention output projections of the
residual, middle and resampling blocks (the paper says ~85%; by the official code's name rule, `frozen` below,
84.4% of the NCSN++ teacher) and trains norms, embeddings, affines, skips, qkv, stem and output only.
Discriminators: `mlp` (2-D), `scratch` (small images, DiffAugment), `teacher` (this project's own offline D:
trainable heads on a frozen copy of the teacher's encoder) and `projected` (GDD's: frozen ImageNet VGG16-BN and,
with timm, EfficientNet-lite0, fixed random projections and multi-scale heads, K = 548 logits; the `cifar10`
default).

Convention: the teacher's, checked verbatim: x_t = (1 - t) x + t z, t = 0 data, t = 1 noise, v = z - x; the network
gets raw t (its time_scale = 1000 lives inside). t_g = 1 - t_eps of the teacher (1 for a 1-RF).

    python rectified_flow.py && python distributional.py --teacher runs/rectified_flow-toy/ckpt.pt   # toy, CPU
    python distributional.py --out runs/gdd-infile            # toy with an in-file 1-RF teacher
    python distributional.py --data points.npy --out runs/gdd-mine [--freeze gdd_i]
    torchrun --nproc_per_node=8 distributional.py --preset cifar10   # EDM's edm-cifar10-32x32-uncond-ve.pkl here
    python distributional.py sample --ckpt runs/distributional-toy/ckpt.pt --steps 1 --n 4000 --out s.png
    python distributional.py fid --ckpt runs/distributional-cifar10/ckpt.pt --steps 1
"""
import contextlib, copy, dataclasses, math, os, types
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.parametrizations import spectral_norm

import common as C

METHOD = "distributional"
CONVENTION = "x_t=(1-t)x+t*z, v=z-x, t=1 noise; G(z)=z-v(z,t_g)"
TEACHER_METHOD, TEACHER_CONVENTION = "rectified_flow", "x_t=(1-t)x+t*z, v=z-x, t=1 noise"


# =============================================================================================================== config
@dataclass
class Config:
    preset: str = "toy"  # preset that filled the defaults (toy, tiny, small, cifar10)
    data: str = "8gaussians"  # toy name, cifar10/mnist/fashion_mnist, .npy file, image folder or .zip
    root: str = "data"  # data sets and FID reference statistics are cached here
    out: str = "runs/distributional-toy"  # run folder
    teacher: Optional[str] = None  # rectified_flow.py checkpoint or EDM .pkl; None: in-file 1-RF (toy/tiny only)
    resume: Optional[bool] = None  # None: resume when DIR/ckpt.pt exists
    seed: int = 0  # seeds model init, data order and noise
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Optional[str] = None  # autocast of G and the teacher D encoder (bf16 on CUDA); heads, losses, R1 fp32
    compile: bool = False  # torch.compile the generator
    # in-file teacher (toy/tiny only; project choice so that the file runs alone)
    teacher_net: str = "mlp"  # network of the in-file teacher: mlp (points) or tiny/small/ddpmpp (images)
    teacher_iters: int = 2000  # its flow-matching steps; 0: --teacher is required
    teacher_batch: int = 512  # its batch
    teacher_lr: float = 1e-3  # its Adam learning rate
    # the method
    freeze: Literal["none", "gdd_i"] = "none"  # none = GDD (all weights), gdd_i = GDD-I (freezes what `frozen` names)
    disc: Literal["mlp", "scratch", "teacher", "projected"] = "mlp"  # discriminator; `projected` is GDD's own
    cond: bool = False  # class-conditional G and D (fake labels = the real batch's labels)
    loss: Literal["ns", "hinge"] = "ns"  # non-saturating (GDD §3 / training/loss.py) or hinge
    r1_gamma: Optional[float] = None  # R1 gamma, batch-mean convention (Mescheder et al. 2018); None: from
    #   r1_gamma_gdd, or when both are None the D's default (R1_DEFAULT: mlp 0.1, scratch 0.01, teacher 0.013)
    r1_gamma_gdd: Optional[float] = None  # R1 gamma in GDD's convention (its --r1-gamma), converted with the real K
    #   (gamma_from_gdd); None (and r1_gamma None): 1e-4 (train.sh) for `projected`
    r1_gdd_batch: int = 0  # per-GPU batch at which r1_gamma_gdd is meant (GDD's CIFAR-10 run: 64); 0: this run's
    r1_interval: int = 16  # lazy R1 every r steps with gain r (lazy R1, StyleGAN2 §3.1)
    d_t: float = 0.1  # instance-noise level of the `teacher` D: x~ = (1 - d_t) x + d_t eps
    diffaug: str = ""  # DiffAugment policy inside D, e.g. "color,translation,cutout" (`scratch` default)
    proj_seed: int = 0  # seed of the `projected` D's fixed random projections (not --seed)
    disc_backbones: str = "vgg,effnet"  # `projected` D: GDD's two (effnet needs timm); "vgg" = VGG16-BN alone
    disc_weights: Literal["imagenet", "random"] = "imagenet"  # `projected` backbones; random: stand-in for tests
    # optimisation (StyleGAN2 §3.1, lazy regularisation; EDM's EMA ramp, training_loop.py)
    iters: int = 2000  # G/D iterations
    batch: int = 512  # global batch B per step (split over ranks)
    lr_g: float = 1e-4  # G Adam lr, betas (0, 0.99), eps 1e-8
    lr_d: float = 1e-4  # D Adam lr (x r/(r+1) for lazy R1), betas (0, 0.99^(r/(r+1)))
    lr_schedule: Literal["const", "cosine"] = "const"  # cosine: both lrs x (1 + cos(pi step / iters)) / 2
    ema_halflife_img: float = 5e5  # EMA half-life H in images (EDM training_loop.py); 0: no EMA (a copy of G)
    ema_rampup: Optional[float] = 0.05  # EMA ramp rho: h = min(H, rho n_img) (EDM's EMA ramp, training_loop.py)
    # logging and evaluation
    log_every: int = 200  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample grids (0: step 0 and end only)
    eval_n: int = 4000  # evaluation samples (toy metrics)
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2])  # step counts plotted (K = 1 is GDD)
    eval_teacher_steps: int = 100  # points: the teacher's own Euler sample at step 0, for reference (0: skip)
    fid_every: int = 0  # steps between FID proxies (images; 0: never); also at step 0
    fid_n: int = 10_000  # samples of the in-training FID proxy
    fid_detector: str = "inception"  # inception or a TorchScript path
    fallback: bool = True  # a missing weights file (Inception; LPIPS): warn and go on without it (False stops)
    max_skips: int = 100  # stop after this many iterations in a row with a skipped (non-finite gradient) G/D step

    def check(self):
        bad = set(filter(None, self.diffaug.split(","))) - set(AUGMENTS)
        if bad:
            raise ValueError(f"--diffaug knows {', '.join(AUGMENTS)}, not {', '.join(sorted(bad))}.")
        if not self.data:
            raise ValueError("this preset needs --data (for example a uint8 (N, 16, 16, 3) .npy file).")
        bb = self.disc_backbones.split(",")
        if not bb or set(bb) - set(BACKBONES) or len(set(bb)) != len(bb):
            raise ValueError(f"--disc_backbones takes a comma-separated subset of {', '.join(BACKBONES)}, "
                             f"not '{self.disc_backbones}'.")
        if self.precision == "fp16":  # (fp16 gradients without a loss scale underflow)
            raise ValueError("--precision fp16 needs loss scaling, which this file's two optimisers and R1 do not do; "
                             "use bf16 (what GDD's own --fp16=True runs) or fp32/tf32.")


RANGES = dict(teacher_batch=">= 1", r1_interval=">= 1", r1_gamma=">= 0", r1_gamma_gdd=">= 0", d_t="[0, 1)", lr_g="> 0",
              lr_d="> 0", teacher_lr="> 0", ema_halflife_img=">= 0",
              eval_teacher_steps="[0, 100000]")  # beside common.RANGES

R1_DEFAULT = dict(mlp=0.1, scratch=0.01, teacher=0.013)  # batch-mean gamma; `projected`: GDD's 1e-4, gamma_from_gdd
R1_GAMMA_GDD = 1e-4  # Zyriix/GDD train.sh --r1-gamma=1e-4 (every data set)

# ============================================================================================================== presets
PRESETS = {
    # toy: 8 Gaussians, the teacher's 128 x 3 MLP, `mlp` D, gamma 0.1; in-file teacher 2,000 x 512, Adam 1e-3.
    # 1,500 GAN iterations: the first minute (measured on the 2-core CPU machine from `python rectified_flow.py`'s
    # teacher, benchmarks/results/toy_defaults.md: 36 s, median of 3, in-mode 0.76 at 1 step; on 2026-12-03, when
    # these took 54 s: 2,000 iterations 69 s, 0.78; a cosine lr decay over 1,000: 0.44, too early)
    "toy": dict(data="8gaussians", teacher_net="mlp", teacher_iters=2000, teacher_batch=512, teacher_lr=1e-3,
                disc="mlp", freeze="none", batch=512, iters=1500, lr_g=1e-4, lr_d=1e-4, r1_interval=16,
                ema_halflife_img=5e5, ema_rampup=0.05, log_every=200, ckpt_every=1000, eval_n=4000),
    # tiny: CPU smoke on a uint8 (N, 16, 16, 3) .npy; `scratch` D with DiffAugment, R1 every 2 steps, no EMA
    "tiny": dict(data="", teacher_net="tiny", teacher_iters=4, teacher_batch=8, teacher_lr=1e-3, disc="scratch",
                 diffaug="color,translation,cutout", batch=8, iters=4, r1_interval=2, ema_halflife_img=0,
                 log_every=1, ckpt_every=2, eval_n=16, fid_n=16, eval_steps=[1, 2]),
    # small: one GPU-hour; teacher from `rectified_flow.py --preset small`; 1 Mimg, FID-10k every 0.25 Mimg
    "small": dict(data="cifar10", teacher_iters=0, disc="teacher", freeze="gdd_i", batch=128, iters=7813,
                  lr_g=1e-4, lr_d=1e-4, ema_halflife_img=1e5, ema_rampup=0.05, precision="bf16", log_every=100,
                  ckpt_every=1954, fid_every=1954, fid_n=10_000, eval_n=64),
    # cifar10: GDD-I on CIFAR-10 as Zyriix/GDD train.sh runs it ("GDD-I / CIFAR-10 uncond" line): --freeze=1 (GDD-I)
    # --backbone=1 (the projected D on VGG16-BN + EfficientNet-lite0, K = 548) --batch=256 --lr=1e-4 --dlr=1e-4
    # --duration=5 (training_loop.py stops at the first step with >= 5 Mimg seen: 19,532 steps of 256) --ema=0.5
    # (Mimg half-life; --ema-warmup 0.05 by default) --loss-type=ns --r1-gamma=1e-4 --dropout=0 --diffaug=False
    # --fp16=True (bf16 U-Net; D in fp32 with TF32 off, training_loop.py); lazy R1 every 16 and Adam (0, 0.99) with
    # D lr x 16/17 and beta2 = 0.99^(16/17) (training_loop.py). No augmentation: that line omits --augment=0, but
    # with --augment-p 0 and no ADA target training_loop.py builds no augment pipe; no x-flips. R1: gamma 1e-4 in
    # GDD's convention at GDD's per-GPU batch, 64 (--nproc_per_node=4 x 64), whatever this run's layout
    # (gamma_from_gdd: 0.469 here).
    # Snapshots / FID every 250 kimg (--snap=10 ticks of 25 kimg). Teacher: EDM's unconditional NCSN++ (--arch=ncsnpp,
    # edm-cifar10-32x32-uncond-ve.pkl), G(z) = D(80 z; 80). Deviations: the projections come from --proj_seed and
    # are identical on all ranks (GDD draws them per rank); the heads' BatchNorm normalises over 256/world images per
    # rank (GDD's 4 GPUs: 64); G runs under bf16 autocast (GroupNorm, softmax and time embedding fp32), where GDD
    # casts its whole U-Net to bf16; conditional heads (--cond) use a learned label embedding, GDD a pretrained
    # ImageNet one. `--disc teacher` is this project's offline discriminator (no ImageNet weights).
    "cifar10": dict(fallback=False,  # a missing weights file stops the run: no silent fallback
                    data="cifar10", teacher="edm-cifar10-32x32-uncond-ve.pkl", teacher_iters=0, disc="projected",
                    disc_backbones="vgg,effnet",
                    disc_weights="imagenet", r1_gdd_batch=64, freeze="gdd_i", batch=256, iters=19_532, lr_g=1e-4,
                    lr_d=1e-4, r1_interval=16, ema_halflife_img=5e5, ema_rampup=0.05, precision="bf16",
                    log_every=100, ckpt_every=977, fid_every=977, fid_n=10_000, eval_n=64),
}


# ==================================================================================================== method: the maths
def t_g_of(teacher_config):
    """The largest t the teacher was trained on: 1 - t_eps of its recorded range [t_eps, 1 - t_eps] (2-RF: 1e-5),
    1 for a 1-RF (t ~ U[0, 1] closed)."""
    return 1.0 - float(teacher_config.get("t_eps", 0.0) or 0.0)


def G(net, z, t_g, y=None):
    """GDD §3, the generator: x_fake = G(z, y) = z - v(z, t_g 1, y): the teacher's clean prediction at the noise
    end, one call."""
    return z - net(z, torch.full((z.shape[0],), t_g, device=z.device), y=y)


class EDMGenerator(nn.Module):
    """An EDM denoiser D (common.EDMDenoiser, e.g. EDM's released CIFAR-10 network) called as this file's velocity
    teacher, so that G(z) = z - v(z, 1) = D(sigma_max z; sigma_max), GDD's generator (Zyriix/GDD training/loss.py:
    the generator is D at sigma = 80 on 80 z; docs/distributional.md, "An EDM teacher: G(z) = D(80 z; 80)").
    For t < 1 it is rfpp's velocity v = (x_t - D(x_t / (1 - t); t / (1 - t))) / t (the K > 1 re-noising path); at
    t = 1, where sigma = t / (1 - t) is infinite, the noise end is EDM's: x_1 = z is the sample sigma_max z."""

    SIGMA_MAX = 80.0  # GDD's noise end, where EDM's sampler starts

    def __init__(self, den):
        super().__init__()
        self.den = den
        self.config = dict(kind="edm_generator", denoiser=den.config())

    def forward(self, x, t, y=None):
        x32 = x.float()
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        end = t >= 1
        sigma = torch.where(end, torch.full_like(t, self.SIGMA_MAX), t / (1 - t).clamp(min=1e-12))
        scale = torch.where(end, sigma, 1 / (1 - t).clamp(min=1e-12)).reshape(-1, *[1] * (x.ndim - 1))
        x_hat = self.den(scale * x32, sigma, y)
        return ((x32 - x_hat) / t.reshape(-1, *[1] * (x.ndim - 1))).to(x.dtype)


def build(nd):
    """A checkpoint's `net` dict -> the generator network (common.build_net, or EDMGenerator for an EDM teacher)."""
    return EDMGenerator(C.EDMDenoiser.from_config(nd["denoiser"])) if nd.get("kind") == "edm_generator" \
        else C.build_net(nd)


def inner(nd):
    """The U-Net's own config inside a `net` dict (the EDM denoiser's for kind 'edm_generator')."""
    return nd["denoiser"]["net"] if nd.get("kind") == "edm_generator" else nd


def frozen(name):
    """GDD-I as Zyriix/GDD's code decides it (train.py --freeze=1: freeze_layer = ['conv', 'proj']): frozen iff the
    parameter's name holds 'block', 'up', 'down' or 'in' and one of those (training/training_loop.py leaves such a
    parameter out of G's optimiser; training/loss.py turns requires_grad back on for the *_up/*_down ones, but Adam
    never steps them): the 3x3 convolutions and the attention output projections of the residual blocks (enc/dec
    *_block*, the middle dec *_in0/_in1; the MLP's blocks) and of the resampling blocks *_down/*_up."""
    return any(w in name for w in ("block", "up", "down", "in")) and ("conv" in name or "proj" in name)


def make_generator(teacher, freeze="none"):
    """GDD §3, initialisation: G's weights = a copy of the teacher's EMA weights (own storage); GDD-I applies
    `frozen` once: frozen tensors get requires_grad=False before any optimiser or gradient sync sees
    them, and nothing ever turns them back on."""
    g = copy.deepcopy(teacher).train().requires_grad_(True)
    if freeze == "gdd_i":
        for n, p in g.named_parameters():
            p.requires_grad_(not frozen(n))
    return g


def _mean(v, groups=None):
    """Mean over images and logits; with `groups` (logits per backbone, the `projected` D) the sum over backbones of
    each backbone's mean, as GDD: its D returns a list of per-image, per-backbone logit rows and its losses sum their
    means (training/loss.py), i.e. B_gpu times this."""
    return v.mean() if not groups else sum(part.mean() for part in v.split(list(groups), dim=1))


def d_loss(real, fake, kind="ns", groups=None):
    """GDD §3, the D loss: L_D = mean softplus(-D(x)) + mean softplus(D(sg[G(z')])); hinge: mean relu(1 - D(x)) +
    mean relu(1 + D). Means over images and all K logits (batch-mean convention; per backbone, summed, with
    `groups`), in fp32."""
    real, fake = real.float(), fake.float()
    if kind == "hinge":
        return _mean(F.relu(1 - real), groups) + _mean(F.relu(1 + fake), groups)
    return _mean(F.softplus(-real), groups) + _mean(F.softplus(fake), groups)


def g_loss(fake, kind="ns", groups=None):
    """GDD §3, the G loss: L_G = mean softplus(-D(G(z))) (non-saturating); hinge: -mean D(G(z)). `groups` as d_loss."""
    fake = fake.float()
    return -_mean(fake, groups) if kind == "hinge" else _mean(F.softplus(-fake), groups)


def r1_penalty(D, x, y, gamma):
    """R1 (Mescheder et al. 2018; GDD training/loss.py): R1 = (gamma/2) mean_i |grad_{x_i} Dbar(x_i, y_i)|^2, Dbar =
    mean_k D_k over all K logits, on the raw real tensor (augmentation, if any, happens inside D); create_graph for
    the double backward. fp32 (r1_step: TF32 off). gamma in this batch-mean convention; GDD's gamma converts with
    gamma_from_gdd."""
    x = x.detach().float().requires_grad_(True)
    dbar = D(x, y).float().mean(1)
    (g,) = torch.autograd.grad(dbar.sum(), x, create_graph=True, allow_unused=True)
    if g is None:  # a D that ignores its input has zero input gradient
        return 0.0 * dbar.sum()
    return 0.5 * gamma * g.square().flatten(1).sum(1).mean()


def gamma_from_gdd(gamma_gdd, K, B_gpu):
    """GDD's R1 gamma in this file's batch-mean convention: gamma = gamma_GDD K^2 / B_gpu.

    GDD's D objective on one GPU with B_gpu images (Zyriix/GDD training/loss.py, GDDLoss; its D returns a list of
    per-image, per-backbone logit rows, pg_modules/discriminator.py): the D step minimises
        sum_i sum_b mean_{k in b} [softplus(-D_k(x_i)) + softplus(D_k(G_i))]  =  B_gpu L_D
    (L_D as d_loss with groups), and the lazy R1 step (gain r) minimises r (gamma_GDD/2) mean_i |grad_{x_i} sum_k
    D_k|^2, the gradient of the *sum* of all K logits (both backbones). sum_k D_k = K Dbar, so that term is
    r (gamma_GDD K^2 / 2) mean_i |grad Dbar|^2. Dividing both steps by B_gpu (Adam, shared by the two steps, ignores
    one common factor up to its eps; DDP's gradient average across GPUs is the same in both codes) leaves L_D and
    r (gamma/2) mean_i |grad Dbar|^2 with gamma = gamma_GDD K^2 / B_gpu: r1_penalty with that gamma is GDD's R1 over
    B_gpu. B_gpu is GDD's per-GPU batch (its CIFAR-10 run: 256 over 4 GPUs = 64), not a global one: the same
    gamma_GDD means a B_gpu-times weaker R1 per image-mean loss on a larger per-GPU batch. CIFAR-10, K = 548,
    B_gpu = 64: 1e-4 -> 0.469225 (VGG alone, K = 484: 0.366025)."""
    return gamma_gdd * K ** 2 / B_gpu


def gdd_gamma(cfg, given):
    """R1's gamma in GDD's convention where this run takes it so (--r1_gamma_gdd, or the `projected` D's default
    without --r1_gamma), else None (batch-mean: --r1_gamma, or the other Ds' defaults). --r1_gamma and --r1_gamma_gdd
    exclude each other on the command line (a command-line one beats a preset's), and --r1_gdd_batch, which converts
    GDD's gamma, is refused where there is none: checked by check_disc before any work."""
    if "r1_gamma" in given and "r1_gamma_gdd" in given:
        raise C.UserError("give R1's gamma once: --r1_gamma (batch-mean convention) or --r1_gamma_gdd (GDD's).")
    g = cfg.r1_gamma_gdd if "r1_gamma_gdd" in given or cfg.r1_gamma is None else None
    g = R1_GAMMA_GDD if g is None and cfg.r1_gamma is None and cfg.disc == "projected" else g
    if g is None and "r1_gdd_batch" in given:
        raise C.UserError("--r1_gdd_batch converts GDD's gamma (--r1_gamma_gdd, the projected D's default), and this "
                          "run's gamma is batch-mean, so it is not read; drop it.")
    return g


def resolve_gamma(cfg, given, K, per_rank):
    """The batch-mean R1 gamma of this run and a sentence saying where it comes from (gdd_gamma's conversion)."""
    g_gdd = gdd_gamma(cfg, given)
    if g_gdd is None and cfg.r1_gamma is None:
        return R1_DEFAULT[cfg.disc], f"gamma {R1_DEFAULT[cfg.disc]:g} (batch-mean, the {cfg.disc} D's default)"
    if g_gdd is None:
        return cfg.r1_gamma, f"gamma {cfg.r1_gamma:g} (batch-mean)"
    b = cfg.r1_gdd_batch or per_rank
    g = gamma_from_gdd(g_gdd, K, b)
    return g, (f"gamma {g:.6g} (batch-mean) = GDD's {g_gdd:g} x K^2 / B_gpu with K = {K} logits, per-GPU batch "
               f"B_gpu = {b}")


def d_adam_hparams(lr_d, r):
    """Lazy regularisation (StyleGAN2 §3.1): D Adam lr c lr_D, beta2 0.99^c, c = r / (r + 1)."""
    c = r / (r + 1)
    return lr_d * c, (0.0, 0.99 ** c)


def ema_beta(n_img, B, H, rho):
    """EDM's EMA ramp (training/training_loop.py): h = min(H, rho n_img), beta = 0.5^(B / max(h, 1e-8)) (what
    common.EMA computes)."""
    h = H if rho is None else min(H, rho * n_img)
    return 0.5 ** (B / max(h, 1e-8))


# ---- DiffAugment (arXiv 2006.10738), per sample, differentiable in x
def _brightness(x):
    return x + (torch.rand(len(x), 1, 1, 1, device=x.device) - 0.5)


def _saturation(x):
    m = x.mean(1, keepdim=True)
    return (x - m) * (2 * torch.rand(len(x), 1, 1, 1, device=x.device)) + m


def _contrast(x):
    m = x.mean((1, 2, 3), keepdim=True)
    return (x - m) * (torch.rand(len(x), 1, 1, 1, device=x.device) + 0.5) + m


def _translation(x):  # integer shift <= H/8 (rounded, as DiffAugment's int(H * 0.125 + 0.5)) per sample and axis,
    B, _, H, W = x.shape  # zero fill
    s = max(int(H * 0.125 + 0.5), 1)
    dy, dx = (torch.randint(-s, s + 1, (B, 1), device=x.device) for _ in range(2))
    iy = (torch.arange(H, device=x.device)[None] + dy + s)  # rows of the zero-padded image
    ix = (torch.arange(W, device=x.device)[None] + dx + s)
    xp = F.pad(x, (s, s, s, s))
    b = torch.arange(B, device=x.device)[:, None, None]
    return xp.permute(0, 2, 3, 1)[b, iy[:, :, None], ix[:, None, :]].permute(0, 3, 1, 2)


def _cutout(x):  # one H/2 x W/2 square of zeros per sample, its centre in [0, H] (DiffAugment's rand_cutout: an
    B, _, H, W = x.shape  # even size's centre may sit on the far border, an odd one's not)
    sy, sx = int(H * 0.5 + 0.5), int(W * 0.5 + 0.5)
    cy, cx = (torch.randint(0, n + 1 - s % 2, (B, 1, 1), device=x.device) for n, s in ((H, sy), (W, sx)))
    gy, gx = torch.arange(H, device=x.device)[None, :, None], torch.arange(W, device=x.device)[None, None, :]
    dy, dx = gy - cy + sy // 2, gx - cx + sx // 2  # position inside the square: covered when in [0, s)
    keep = (dy < 0) | (dy >= sy) | (dx < 0) | (dx >= sx)
    return x * keep[:, None].to(x.dtype)


AUGMENTS = dict(color=(_brightness, _saturation, _contrast), translation=(_translation,), cutout=(_cutout,))


def diff_augment(x, policy):
    """Apply the comma-separated policy in order; the empty policy is the identity."""
    for p in filter(None, policy.split(",")):
        for f in AUGMENTS[p]:
            x = f(x)
    return x


# ---- discriminators: each returns [B, K] logits; conditional ones project onto e(y) (Miyato & Koyama 2018)
class Projection(nn.Module):
    """Projection D, Miyato & Koyama 2018: D_k(x, y) = <phi_k(x), e(y)> / sqrt(c_e), c_e = 64, e a learned
    Embedding(num_classes, 64) per head; unconditional heads emit one channel, passed through."""

    def __init__(self, num_classes, c_e=64):
        super().__init__()
        self.embed = nn.Embedding(num_classes, c_e) if num_classes else None

    def forward(self, phi, y):  # phi: [B, c, *positions] -> [B, K]
        if self.embed is None:
            return phi.flatten(1)
        e = self.embed(y).reshape(len(y), -1, *[1] * (phi.ndim - 2))
        return (phi * e).sum(1).reshape(len(y), -1) / math.sqrt(phi.shape[1])


class MlpD(nn.Module):
    """`mlp` D for 2-D points: 2 -> 128 -> 128 -> 128 -> 1 (64 with cond), LeakyReLU 0.2. K = 1."""

    def __init__(self, dim=2, num_classes=0, width=128):
        super().__init__()
        c = 64 if num_classes else 1
        self.net = nn.Sequential(nn.Linear(dim, width), nn.LeakyReLU(0.2), nn.Linear(width, width), nn.LeakyReLU(0.2),
                                 nn.Linear(width, width), nn.LeakyReLU(0.2), nn.Linear(width, c))
        self.proj = Projection(num_classes)

    def forward(self, x, y=None, amp=None):
        return self.proj(self.net(x), y)


class ScratchD(nn.Module):
    """`scratch` D: 3x3 conv to 64, residual blocks [conv3, LReLU, conv3, LReLU, avg-pool 2] + 1x1 skip, channels
    doubling to 256, down to 4x4, linear to 1 (64 with cond); no normalisation; DiffAugment inside forward. K = 1."""

    def __init__(self, in_ch, res, num_classes=0, policy=""):
        super().__init__()
        self.policy = policy
        self.stem, c, blocks = nn.Conv2d(in_ch, 64, 3, padding=1), 64, []
        while res > 4:
            co = min(2 * c, 256)
            blocks.append(nn.ModuleDict(dict(conv_a=nn.Conv2d(c, co, 3, padding=1),
                                             conv_b=nn.Conv2d(co, co, 3, padding=1),
                                             skip=nn.Conv2d(c, co, 1))))
            c, res = co, res // 2
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(c * res * res, 64 if num_classes else 1)
        self.proj = Projection(num_classes)

    def forward(self, x, y=None, amp=None):
        h = self.stem(diff_augment(x, self.policy))
        for b in self.blocks:
            r = F.leaky_relu(b["conv_b"](F.leaky_relu(b["conv_a"](h), 0.2)), 0.2)
            h = (F.avg_pool2d(r, 2) + F.avg_pool2d(b["skip"](h), 2)) / math.sqrt(2)
        return self.proj(self.head(h.flatten(1)), y)


def _sn_head(cin, res, cout, mid=128):
    """`teacher` D head: SN 1x1 conv to 128, LReLU, stride-2 4x4 SN convs + LReLU down to 4x4, SN 3x3 conv to cout."""
    layers = [spectral_norm(nn.Conv2d(cin, mid, 1)), nn.LeakyReLU(0.2)]
    while res > 4:
        layers += [spectral_norm(nn.Conv2d(mid, mid, 4, stride=2, padding=1)), nn.LeakyReLU(0.2)]
        res //= 2
    return nn.Sequential(*layers, spectral_norm(nn.Conv2d(mid, cout, 3, padding=1)))


NO_EDM_ENCODER = ("--disc teacher reads a rectified_flow.py teacher's encoder; with an EDM teacher use --disc "
                  "projected (GDD's) or --disc scratch.")


class TeacherD(nn.Module):
    """`teacher` D: a frozen deep copy of the teacher (own storage, eval mode) run through its encoder only on
    x~ = (1 - d_t) x + d_t eps at t = d_t (same labels); one trainable SN head per encoder resolution."""

    def __init__(self, teacher, d_t, num_classes=0, policy=""):
        super().__init__()
        self.encoder = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.d_t, self.policy = d_t, policy
        nd = teacher.config
        if nd["kind"] == "edm_generator":
            raise C.UserError(NO_EDM_ENCODER)
        if nd["kind"] != "unet":
            raise C.UserError("--disc teacher needs an image teacher; 2-D points use --disc mlp.")
        dev = next(teacher.parameters()).device  # the meta device works too (shape-only tests)
        with torch.no_grad():
            feats = self.encoder.encoder_features(
                torch.zeros(1, nd["in_channels"], nd["img_resolution"], nd["img_resolution"], device=dev),
                torch.zeros(1, device=dev), y=torch.zeros(1, dtype=torch.long, device=dev) if nd["label_dim"] else None)
        self.shapes = [tuple(f.shape[1:]) for f in feats]
        self.heads = nn.ModuleList(_sn_head(c, r, 64 if num_classes else 1) for c, r, _ in self.shapes)
        self.projs = nn.ModuleList(Projection(num_classes) for _ in self.shapes)

    def train(self, mode=True):  # the encoder copy stays in eval mode (no dropout)
        super().train(mode)
        self.encoder.eval()
        return self

    def forward(self, x, y=None, amp=None):
        x = diff_augment(x, self.policy)
        xt = (1 - self.d_t) * x + self.d_t * torch.randn_like(x)
        t = torch.full((len(x),), self.d_t, device=x.device)
        yt = y if self.encoder.config["label_dim"] else None
        with amp if amp is not None else contextlib.nullcontext():
            feats = self.encoder.encoder_features(xt, t, y=yt)
        return torch.cat([p(h(f.float()), y) for f, h, p in zip(feats, self.heads, self.projs)], 1)


# ---- GDD's projected discriminator: Projected GAN (arXiv 2111.01007) as Zyriix/GDD runs it on CIFAR-10
# (train.sh --backbone=1; pg_modules/discriminator.py ProjectedDiscriminator, pg_modules/projector.py F_RandomProj,
# feature_networks/pretrained_builder.py, pg_modules/blocks.py). Every logit of one image, in order:
#   vgg16_bn (ImageNet mean/std)            4 heads x 11 x 11 = 484
#   tf_efficientnet_lite0 (mean = std = 0.5) 4 heads x  4 x  4 =  64      K = 548
# The input, in [-1, 1], goes to (x + 1)/2, is normalised per backbone and resized to 224^2 (bilinear). Each backbone
# is frozen (eval mode) and cut into 4 stages; GDD cuts VGG16-BN *before* its 2nd-5th max-pool (128 ch at 112^2,
# 256 at 56^2, 512 at 28^2, 512 at 14^2) and EfficientNet-lite0 after blocks 1, 2, 4, 6 (24 at 56^2, 40 at 28^2,
# 112 at 14^2, 320 at 7^2). Fixed random 1x1 convolutions (with bias) mix channels to 64, 128, 256, 512; cross-scale
# mixing from the coarsest scale up, m_3 = W_3 Up2(c_3), m_k = W_k Up2(m_{k+1} + c_k) (bilinear x2 with
# align_corners=True, W_k 1x1 convolutions halving the channels, the finest keeping 64), gives 64, 64, 128, 256
# channels at twice each stage's resolution. One trainable head per scale, sized by GDD for a 256-pixel input
# (nominal 128, 64, 32, 16 for every backbone) but fed 224: [4x4 stride-2 spectral-norm conv, BatchNorm, LReLU 0.2]
# down to nominal 8 (channels 64, 128, 256, 512 by nominal size), then a 4x4 spectral-norm conv without padding.
PROJ_SIZE = 224  # GDD resizes every image below 224 px to 224 (interp224)
PROJ_NOMINAL = (128, 64, 32, 16)  # head input sizes GDD assumes (im_res 256: 256/4 ... 256/32, doubled by the mixing)
PROJ_WIDTH = {64: 64, 32: 128, 16: 256, 8: 512}  # head channels by nominal size (GDD SingleDisc's table)
PROJ_MIX = (64, 128, 256, 512)  # channel-mixing widths; after cross-scale mixing 64, 64, 128, 256
BACKBONES = {  # name -> GDD's name, input mean, std, channels of the 4 stages, stride of each stage
    "vgg": ("vgg16_bn", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), (128, 256, 512, 512), (2, 4, 8, 16)),
    "effnet": ("tf_efficientnet_lite0", (0.5,) * 3, (0.5,) * 3, (24, 40, 112, 320), (4, 8, 16, 32)),
}
VGG16_BN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG_CUTS = (13, 23, 33, 43)  # GDD's feature indices: stage k ends just before the max-pool at VGG_CUTS[k]
EFFNET_STAGES = (("conv_stem", "bn1", "act1", "blocks.0", "blocks.1"), ("blocks.2",), ("blocks.3", "blocks.4"),
                 ("blocks.5", "blocks.6"))  # GDD's _make_efficientnet cut (timm >= 0.9 folds act1 into bn1)


def vgg16_bn_features():
    """VGG16-BN's convolutional part, layer for layer (and index for index) torchvision's `vgg16_bn().features`, so
    that torchvision's ImageNet state dict loads; without the 120 M-parameter classifier. Random init as torchvision's
    (Kaiming-normal fan-out convolutions, zero biases, unit BatchNorm)."""
    layers, c = [], 3
    for v in VGG16_BN:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2))
            continue
        conv = nn.Conv2d(c, v, 3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
        c = v
    return nn.Sequential(*layers)


class FrozenBackbone(nn.Module):
    """A frozen feature network cut into 4 stages; `net` keeps the source model's parameter names (torchvision's
    `features.N` as `net.N`, timm's names as they are), `stages` lists the submodule paths each stage runs."""

    def __init__(self, name, net, stages):
        super().__init__()
        self.name, self.net, self.stages = name, net, [[p for p in s if _has(net, p)] for s in stages]
        self.gdd_name, mean, std, self.channels, self.strides = BACKBONES[name]
        self.register_buffer("mean", torch.tensor(mean).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).reshape(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)

    def train(self, mode=True):  # always eval mode: BatchNorm uses the running statistics
        return super().train(False)

    def forward(self, x):
        out = []
        for paths in self.stages:
            for p in paths:
                x = self.net.get_submodule(p)(x)
            out.append(x)
        return out

    @torch.no_grad()
    def gdd_bn_update(self):
        """GDD's builder measures the stages' channel counts by running one all-zero 256^2 image through them while the
        freshly built model is still in training mode (feature_networks/pretrained_builder.py, calc_dims): every
        BatchNorm's running statistics move 10 % (momentum 0.1) toward that image's. Its frozen features are those of
        the updated statistics, so the same update is made here, once, right after the weights are loaded."""
        nn.Module.train(self.net, True)
        self(torch.zeros(1, 3, 256, 256, device=self.mean.device))
        nn.Module.train(self.net, False)


def _has(net, path):
    try:
        net.get_submodule(path)
        return True
    except AttributeError:
        return False


def _hub_file(url):
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def make_backbone(name, weights, env, seed=0, log=None):
    """One of GDD's frozen backbones with GDD's cut. weights: "imagenet" (torchvision's VGG16_BN_Weights.IMAGENET1K_V1
    from the torch hub cache, downloaded into it when absent; timm's tf_efficientnet_lite0 ImageNet weights), "random"
    (a fixed, seeded stand-in for tests and offline smoke runs, never for numbers) or a state dict in the source model's
    names. Then GDD's BatchNorm update (FrozenBackbone.gdd_bn_update). Missing weights or timm: one sentence."""
    cuda = [env.device] if env.device.type == "cuda" else []  # manual_seed reseeds CUDA too: restore it as well
    with torch.random.fork_rng(devices=cuda):  # seeded stand-in; the run's RNG streams are left untouched
        torch.manual_seed(C.derive_seed(seed, "projected backbone", name))
        if name == "vgg":
            net = vgg16_bn_features()
            if weights == "imagenet":
                import torchvision
                url = torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url
                sd, err = C.rank0_first(env, lambda: torch.hub.load_state_dict_from_url(
                    url, progress=False, check_hash=True, map_location="cpu"))
                if err is not None:
                    raise C.UserError(
                        f"VGG16-BN's ImageNet weights are not in the torch hub cache and could not be downloaded "
                        f"({type(err).__name__}); place {os.path.basename(url)} (torchvision's {url}) in "
                        f"{os.path.dirname(_hub_file(url))}, or pass --disc_weights random (a fixed random stand-in, "
                        f"not GDD's discriminator) or, with a rectified_flow.py teacher, --disc teacher (this "
                        f"project's offline discriminator; an EDM teacher has no encoder for it).")
                weights = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
            stages = [[str(i) for i in range(a, b)] for a, b in zip((0,) + VGG_CUTS, VGG_CUTS)]
        else:
            try:
                import timm
            except ImportError:
                raise C.UserError("GDD's discriminator has a second backbone, EfficientNet-lite0, which needs timm "
                                  "(pip install timm); install it, or pass --disc_backbones vgg to train with VGG16-BN "
                                  "alone (484 of GDD's 548 logits).") from None
            full, err = (timm.create_model("tf_efficientnet_lite0", pretrained=False), None) if weights != "imagenet" \
                else C.rank0_first(env, lambda: timm.create_model("tf_efficientnet_lite0", pretrained=True))
            if err is not None:
                raise C.UserError(
                    f"timm could not load tf_efficientnet_lite0's ImageNet weights ({type(err).__name__}); put them in "
                    f"timm's cache (the Hugging Face hub entry timm/tf_efficientnet_lite0.in1k), or pass "
                    f"--disc_backbones vgg (VGG16-BN alone) or --disc_weights random (a fixed random stand-in).")
            net = nn.Module()
            for k in ("conv_stem", "bn1", "act1", "blocks"):
                if hasattr(full, k):
                    setattr(net, k, getattr(full, k))
            stages = EFFNET_STAGES
        if isinstance(weights, dict):
            C.load_state_strict(net, weights)
    b = FrozenBackbone(name, net, stages)
    b.gdd_bn_update()
    return b


class SNConv2d(nn.Conv2d):
    """Conv2d with spectral normalisation as the original torch.nn.utils.spectral_norm that GDD's heads use
    (pg_modules/blocks.py conv2d): weight / sigma, sigma = u^T W v (W the weight as out x rest); in training mode one
    power iteration first, v <- W^T u / |W^T u|, then u <- W v / |W v| (buffers updated, no gradient)."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        h, w = self.weight.shape[0], self.weight[0].numel()
        self.register_buffer("u", F.normalize(torch.randn(h), dim=0, eps=1e-12))
        self.register_buffer("v", F.normalize(torch.randn(w), dim=0, eps=1e-12))

    def forward(self, x):
        W, u, v = self.weight.flatten(1), self.u, self.v
        if self.training:
            with torch.no_grad():
                v = F.normalize(W.t() @ u, dim=0, eps=1e-12)
                u = F.normalize(W @ v, dim=0, eps=1e-12)
                self.u.copy_(u), self.v.copy_(v)
        return self._conv_forward(x, self.weight / torch.dot(u, W @ v), self.bias)


class RandomProjector(nn.Module):
    """GDD's fixed random projection of one backbone's 4 feature maps (channel mixing, then cross-scale mixing from the
    coarsest scale up); weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PyTorch's Conv2d default, which GDD
    keeps) drawn from `gen`, frozen."""

    def __init__(self, channels, gen):
        super().__init__()
        outs = [PROJ_MIX[0]] + list(PROJ_MIX[:3])  # 64, 64, 128, 256
        self.ccm = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(channels, PROJ_MIX))
        self.csm = nn.ModuleList(nn.Conv2d(ci, co, 1) for ci, co in zip(PROJ_MIX, outs))
        for m in [*self.ccm, *self.csm]:
            bound = 1 / math.sqrt(m.weight[0].numel())
            for p in (m.weight, m.bias):
                p.data = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
        self.requires_grad_(False)
        self.out_channels = tuple(outs)

    def forward(self, feats):
        c = [m(f) for m, f in zip(self.ccm, feats)]
        up = lambda h: F.interpolate(h, scale_factor=2, mode="bilinear", align_corners=True)
        m = [None] * 4
        m[3] = self.csm[3](up(c[3]))
        for k in (2, 1, 0):
            m[k] = self.csm[k](up(m[k + 1] + c[k]))
        return m


def projected_head(cin, nominal, cout):
    """GDD's per-scale head (pg_modules/discriminator.py SingleDisc, DownBlock): [4x4 stride-2 SN conv with bias,
    BatchNorm, LeakyReLU 0.2] while the nominal size exceeds 8, then a 4x4 SN conv without padding or bias."""
    layers, c = [], cin
    while nominal > 8:
        nominal //= 2
        co = PROJ_WIDTH[nominal]
        layers += [SNConv2d(c, co, 4, 2, 1), nn.BatchNorm2d(co), nn.LeakyReLU(0.2)]
        c = co
    return nn.Sequential(*layers, SNConv2d(c, cout, 4, 1, 0, bias=False))


def head_logits(size, stride, nominal):
    """Logits of one head: the mixed map is 2 size / stride wide, halved once per down block (floor), then - 3."""
    s = 2 * size // stride
    while nominal > 8:
        s, nominal = s // 2, nominal // 2
    return max(s - 3, 0) ** 2


class ProjectedD(nn.Module):
    """`projected` D: GDD's CIFAR-10 discriminator (see the block comment above); logits of all heads of all
    backbones, concatenated in GDD's order. `logit_groups` gives each backbone's count: GDD's loss is the sum over
    backbones of the per-backbone logit mean (d_loss, g_loss). Runs in fp32 with TF32 off (common.strict_fp32), as
    GDD (training_loop.py turns TF32 off). The same augmentation policy is drawn afresh for each backbone, as GDD;
    the policy (--diffaug) is this file's DiffAugment (arXiv 2006.10738: cutout of half the side), not GDD's
    training/diffaug.py (cutout ratio 0.2), and none of GDD's train.sh lines turns DiffAugment on."""

    strict_fp32 = True

    def __init__(self, backbones, num_classes=0, proj_seed=0, policy="", size=PROJ_SIZE):
        super().__init__()
        self.policy, self.size = policy, size
        gen = torch.Generator().manual_seed(C.derive_seed(proj_seed, "projections"))
        self.backbones = nn.ModuleDict((b.name, b) for b in backbones)
        self.projectors = nn.ModuleDict((b.name, RandomProjector(b.channels, gen)) for b in backbones)
        cout = 64 if num_classes else 1
        self.heads = nn.ModuleDict((b.name, nn.ModuleList(
            projected_head(c, n, cout) for c, n in zip(self.projectors[b.name].out_channels, PROJ_NOMINAL)))
            for b in backbones)
        self.projs = nn.ModuleDict((b.name, nn.ModuleList(Projection(num_classes) for _ in PROJ_NOMINAL))
                                   for b in backbones)
        self.head_sizes = {b.name: [head_logits(size, s, n) for s, n in zip(b.strides, PROJ_NOMINAL)]
                           for b in backbones}
        self.logit_groups = [sum(v) for v in self.head_sizes.values()]

    def forward(self, x, y=None, amp=None):  # `amp` ignored: GDD's D is fp32
        with C.strict_fp32(x.device):
            x = x.float()
            x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x
            out = []
            for name, b in self.backbones.items():
                xb = (diff_augment(x, self.policy) + 1) / 2
                xb = F.interpolate((xb - b.mean) / b.std, size=(self.size, self.size), mode="bilinear",
                                   align_corners=False)
                feats = self.projectors[name](b(xb))
                out += [p(h(f), y) for f, h, p in zip(feats, self.heads[name], self.projs[name])]
            return torch.cat(out, 1)

    def describe(self):
        parts = [f"{self.backbones[n].gdd_name} {len(s)} heads x {int(math.sqrt(s[0]))}^2 = {sum(s)}"
                 for n, s in self.head_sizes.items()]
        return f"{', '.join(parts)}; K = {sum(self.logit_groups)} logits"


# ============================================================================================================== sampler
def time_grid(K, t_g):
    """A project extension (the method is K = 1; docs/distributional.md, "Sampling"): tau_k = t_g (1 - k/K),
    k = 0..K-1."""
    return [t_g * (1 - k / K) for k in range(K)]


@torch.no_grad()
def sample(net, rng, shape, K, t_g, labels=None):
    """K = 1 is the method: x = G(z). K > 1 (a project extension): re-noise the clean estimate to tau_k and predict
    again, x_tau = (1 - tau) x + tau eps_k, x <- x_tau - tau v(x_tau, tau). Noise per sample index from rng (z,
    then eps_k)."""
    x = G(net, rng.randn(len(rng.gens), *shape), t_g, labels).float()
    for tau in time_grid(K, t_g)[1:]:
        x_tau = (1 - tau) * x + tau * rng.randn(*x.shape)
        x = (x_tau - tau * net(x_tau, torch.full((len(x),), tau, device=x.device), y=labels)).float()
    return x.clamp(-1, 1) if len(shape) == 3 else x


# ============================================================================================================= plumbing
def teacher_net_dict(cfg, data):
    """The in-file 1-RF teacher's network, exactly as rectified_flow.py's net_dict builds it."""
    if data.kind == "images":
        if cfg.teacher_net == "mlp":
            raise C.UserError("--teacher_net mlp is for 2-D points; use tiny, small or ddpmpp for images.")
        return C.net_config(cfg.teacher_net, img_resolution=data.shape[1], in_channels=data.shape[0], time_scale=1000.0,
                            label_dim=data.num_classes if cfg.cond else 0)
    if cfg.teacher_net != "mlp":
        raise C.UserError(f"--teacher_net {cfg.teacher_net} is an image network; 2-D points need mlp.")
    return C.net_config("mlp", time_scale=1000.0)


def train_teacher(cfg, data, env, path, log):
    """The in-file 1-RF teacher (toy/tiny only): L = E (1/d)|v(x_t, t) - (z - x)|^2, t ~ U[0, 1],
    x_t = (1 - t) x + t z. Written in rectified_flow.py's checkpoint format (method, convention, net, a subset of
    its Config, EMA = raw)."""
    nd = teacher_net_dict(cfg, data)
    raw = C.build_net(nd).to(env.device)
    net = C.distribute(raw, env)
    opt = torch.optim.Adam(raw.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    per_rank = cfg.teacher_batch // env.world
    log.info(f"teacher: 1-RF, {cfg.teacher_iters} x {cfg.teacher_batch}, Adam {cfg.teacher_lr:g} -> {path}")
    for step in range(cfg.teacher_iters):
        x, y = data.batch(per_rank, step, env.rank, env.world)
        z, t = torch.randn_like(x), torch.rand(len(x), device=env.device)
        tt = t.reshape(-1, *[1] * (x.ndim - 1))
        with C.autocast(env):
            v = net((1 - tt) * x + tt * z, t, y=y if cfg.cond else None)
        L = (v.float() - (z - x)).square().mean()
        opt.zero_grad(set_to_none=True)
        L.backward()
        opt.step()
        if (step + 1) % max(cfg.teacher_iters // 4, 1) == 0:
            log.info(f"teacher step {step + 1}/{cfg.teacher_iters} | loss {C.all_mean(L.detach(), env).item():.4f}")
    tcfg = dict(preset=cfg.preset, stage="1rf", data=cfg.data, root=cfg.root, out=os.path.dirname(path), seed=cfg.seed,
                net=cfg.teacher_net, dropout=0.0, cond=cfg.cond, iters=cfg.teacher_iters, batch=cfg.teacher_batch,
                lr=cfg.teacher_lr, ema=None, xflip=False, t_eps=0.0, noise_std=1.0, t_dist="uniform")
    sd = raw.state_dict()
    C.save_checkpoint(path, dict(model=sd, ema=sd, opt=opt.state_dict(), step=cfg.teacher_iters, config=tcfg, net=nd,
                                 method=TEACHER_METHOD, convention=TEACHER_CONVENTION), env,
                      [data.gen] if data.gen is not None else [])  # the RNG streams as training leaves them


def edm_teacher(path):  # an EDM network pickle: load_teacher reads it as EDM's; --disc teacher refuses it
    return str(path or "").endswith(".pkl")


def load_teacher(path, cfg, data, log):
    """A rectified_flow.py checkpoint -> (network with its EMA weights, dropout 0 (GDD §3, initialisation),
    checkpoint, t_g). Strict; the convention and method are checked verbatim; cond must match the teacher's label
    embedding."""
    if edm_teacher(path):
        return _load_edm_teacher(path, cfg, data)
    if not os.path.isfile(path):
        raise C.no_file(path, "the teacher")
    ck = C.load_checkpoint(path)
    if ck["method"] != TEACHER_METHOD or ck["convention"] != TEACHER_CONVENTION:
        raise C.UserError(f"'{path}' is a checkpoint of {ck['method']} with convention '{ck['convention']}'; a "
                          f"{TEACHER_METHOD} teacher with '{TEACHER_CONVENTION}' is needed.")
    tcfg, nd = ck["config"], dict(ck["net"])
    t_g = t_g_of(tcfg)
    if t_g < 0.99:
        raise C.UserError(f"the teacher was trained only up to t = {t_g:g}; the generator needs t_g >= 0.99.")
    if nd.get("num_times", 1) != 1:
        raise C.UserError(f"'{path}' has a two-time network; a one-time velocity teacher is needed.")
    has_labels = bool(nd.get("label_dim"))
    if has_labels != cfg.cond:
        raise C.UserError(f"--cond {str(cfg.cond).lower()} does not fit the teacher, which "
                          f"{'has' if has_labels else 'lacks'} the label embedding map_label.weight; set --cond "
                          f"{str(has_labels).lower()}.")
    if data is not None:
        want = (data.kind == "images", data.shape if data.kind == "images" else (nd.get("dim"),))
        got = (nd["kind"] == "unet", (nd.get("in_channels"), nd.get("img_resolution"), nd.get("img_resolution"))
               if nd["kind"] == "unet" else (nd.get("dim"),))
        if want != got:
            raise C.UserError(f"the teacher's network ({nd['kind']}, shape {got[1]}) does not fit the data "
                              f"'{cfg.data}' of shape {tuple(data.shape)}.")
        check_classes(path, nd, cfg, data)
    stage = tcfg.get("stage", "1rf")
    density = "uniform" if stage == "1rf" else tcfg.get("t_dist", "uniform")
    if density not in ("uniform", "ushape"):
        log.info(f"warning: the teacher's time density '{density}' puts almost no mass near t_g = {t_g:g}, so its "
                 f"step-0 generator is barely trained; a uniform-t 1-RF teacher is the tested setting.")
    if stage != "1rf":
        log.info(f"note: '{path}' is a {stage} checkpoint, already a one-step model; this run is an ablation "
                 f"outside the paper (its setting is a 1-RF teacher).")
    nd["dropout"] = 0.0  # (GDD §3, initialisation) the only allowed difference from the teacher's net dict
    net = C.build_net(nd)
    C.load_state_strict(net, ck["ema"])
    return net, ck, t_g


EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"  # EDM's released network pickles


def check_classes(path, nd, cfg, data):
    """A conditional teacher's class count is the data's (its classes beyond the data's would never be drawn, the
    data's beyond its own lie outside its label embedding)."""
    if nd.get("label_dim") and data is not None and nd["label_dim"] != data.num_classes:
        raise C.UserError(f"the teacher '{path}' has {nd['label_dim']} classes, but the data '{cfg.data}' has "
                          f"{data.num_classes}; give the data it was trained on.")


def _load_edm_teacher(path, cfg, data):
    """An EDM network pickle -> (EDMGenerator with dropout 0 (GDD §3, initialisation), a checkpoint-like dict, t_g
    = 1)."""
    if not os.path.exists(path) and os.path.basename(path).startswith("edm-"):
        raise C.UserError(f"EDM checkpoint '{path}' not found; download {EDM_URL}{os.path.basename(path)} and place "
                          f"it there.")
    den, info = C.load_edm(path)
    d = den.config()
    d["net"]["dropout"] = 0.0  # GDD train.sh --dropout=0: the only change to the teacher
    gen = EDMGenerator(C.EDMDenoiser.from_config(d))
    C.load_state_strict(gen.den, den.state_dict())
    nd = d["net"]
    if bool(nd["label_dim"]) != cfg.cond:
        raise C.UserError(f"--cond {str(cfg.cond).lower()} does not fit the EDM teacher ({nd['label_dim']} classes); "
                          f"set --cond {str(bool(nd['label_dim'])).lower()}.")
    if data is not None and (data.kind != "images" or tuple(data.shape) != (nd["in_channels"], nd["img_resolution"],
                                                                           nd["img_resolution"])):
        raise C.UserError(f"the EDM teacher makes {nd['in_channels']} x {nd['img_resolution']}^2 images; the data "
                          f"'{cfg.data}' has shape {tuple(data.shape)}.")
    check_classes(path, nd, cfg, data)
    sd = gen.state_dict()
    return gen, dict(config={}, step=0, net=gen.config, ema=sd, model=sd, method="edm", edm=info["edm_kwargs"],
                     convention=f"EDM {info['precond']} denoiser D(x; sigma); G(z) = D(80 z; 80)"), 1.0


DISC_ONLY = {"d_t": ("teacher",), "diffaug": ("scratch", "teacher", "projected"),
             **dict.fromkeys(("proj_seed", "disc_backbones", "disc_weights"), ("projected",))}  # what reads them


def check_disc(cfg, data, given=()):
    """--disc fits the data: mlp for 2-D points, the others for images, and a D's option given to another D is
    refused, not ignored (checked before any work)."""
    if data.kind != "images" and cfg.disc != "mlp":
        raise C.UserError(f"--disc {cfg.disc} is for images; 2-D points use --disc mlp.")
    if data.kind == "images" and cfg.disc == "mlp":
        raise C.UserError("--disc mlp is for 2-D points; images use scratch, teacher or projected.")
    if cfg.disc == "teacher" and edm_teacher(cfg.teacher):  # (TeacherD met it after the run's config.json, written
        raise C.UserError(NO_EDM_ENCODER)  # in --out)
    C.refuse_other(given, DISC_ONLY, "disc", cfg.disc)
    gdd_gamma(cfg, given)  # R1's gamma given twice, or --r1_gdd_batch with a batch-mean gamma


def projected_backbones(cfg, env, log=None):
    """The `projected` D's frozen backbones (--disc_backbones). Never a fallback: missing ImageNet weights or timm stop
    the run with one sentence naming the file and the flag that chooses the alternative."""
    return [make_backbone(n, cfg.disc_weights, env, cfg.proj_seed, log) for n in cfg.disc_backbones.split(",")]


def build_disc(cfg, data, teacher, env, log, backbones=None):
    """The discriminator named by cfg.disc for these data; `backbones`: the `projected` D's, if already built."""
    k = data.num_classes if cfg.cond else 0
    check_disc(cfg, data)
    if data.kind != "images":
        return MlpD(data.shape[0], k)
    if cfg.disc == "scratch":
        return ScratchD(data.shape[0], data.shape[1], k, cfg.diffaug)
    if cfg.disc == "projected":
        names, bbs = cfg.disc_backbones.split(","), backbones or projected_backbones(cfg, env, log)
        if log is not None:
            if "effnet" not in names:
                log.info("note: --disc_backbones vgg leaves out GDD's second backbone, EfficientNet-lite0 (64 of its "
                         "548 logits).")
            if cfg.disc_weights == "random":
                log.info("note: --disc_weights random: the backbones have fixed random weights (a stand-in for tests "
                         "and offline smoke runs), not GDD's ImageNet features.")
        return ProjectedD(bbs, k, cfg.proj_seed, cfg.diffaug)
    return TeacherD(teacher, cfg.d_t, k, cfg.diffaug)


def disc_state(D):
    """D's checkpoint entry: heads, fixed projections, the `teacher` D's encoder copy; never the `projected` D's
    backbones (rebuilt from their weights)."""
    return {k: v for k, v in D.state_dict().items() if not k.startswith("backbones.")}


def load_disc_state(D, sd):
    own = disc_state(D)
    if set(own) != set(sd) or any(own[k].shape != sd[k].shape for k in own):
        raise C.UserError(f"the checkpoint's discriminator does not fit --disc: missing "
                          f"{sorted(set(own) - set(sd))[:5]}, "
                          f"unexpected {sorted(set(sd) - set(own))[:5]}.")
    D.load_state_dict({**D.state_dict(), **sd})


def sample_shape(nd):
    nd = inner(nd)
    return (nd["dim"],) if nd["kind"] == "mlp" else (nd["in_channels"], nd["img_resolution"], nd["img_resolution"])


@torch.no_grad()
def euler(net, z, K, labels=None):
    """The teacher's own K-step Euler ODE sample from t = 1 to 0 (a reference for the toy log only)."""
    x = z
    for i in range(K):
        t, t_next = 1 - i / K, 1 - (i + 1) / K
        x = x + (t_next - t) * net(x, torch.full((len(x),), t, device=x.device), y=labels)
    return x.float()


def _labels(rng, nd):
    nd = inner(nd)
    return rng.randint(nd["label_dim"]) if nd["label_dim"] else None


@torch.no_grad()
def evaluate(net, init, cfg, data, env, out, step, t_g):
    """Rank 0: samples of the EMA generator at eval_steps beside the step-0 generator (`init`, the teacher) and the
    data (PNG); for points the common toy metrics (SWD, MMD^2, modes, in-mode) per K and for step 0 ('init')."""
    nd = C.unwrap(net).config
    shape = sample_shape(nd)
    sheet = C.EvalSheet(data, shape, cfg.eval_n, cfg.seed, step)
    n = sheet.n
    variant = "GDD-I" if cfg.freeze == "gdd_i" else "GDD"
    if step == 0:  # `net` is the step-0 generator itself (= the teacher); for points also the teacher's 100 Euler steps
        runs = [("init", net, 1, "step 0: teacher x-hat at t_g")]
        if len(shape) == 1 and cfg.eval_teacher_steps:
            runs.append(("teacher", net, 0, f"teacher, {cfg.eval_teacher_steps} Euler steps"))
    else:
        runs = ([("init", init, 1, "step 0: teacher x-hat at t_g")] if init is not None else []) + \
            [(str(K), net, K, f"{variant} step {step}, {C.n_steps(K)}") for K in cfg.eval_steps]
    for key, m, K, title in runs:
        rng, labels = sheet.rng(env.device), _labels(sheet.rng(env.device, "eval labels"), nd)
        sheet.add(key, title, sample(m.eval(), rng, shape, K, t_g, labels) if K else
                  euler(m, rng.randn(n, *shape), cfg.eval_teacher_steps, labels))
    return sheet.write(out, "samples.png" if step > 0 else "samples_step0.png")


# ============================================================================================================= training
def _step(opt, guard):
    """Adam step; with a common.Guard (training) a step with non-finite gradients is skipped and counted. GDD's code
    (StyleGAN2-ADA training_loop.py) instead zeroes non-finite gradient entries (nan_to_num) and steps; the skip keeps
    a NaN out of Adam's moments and is what the other files do."""
    guard.step(opt) if guard is not None else opt.step()


def _d_fp32(D, env):
    """The `projected` D runs in fp32 with TF32 off, as GDD (whose training_loop.py turns TF32 off for the whole run):
    its forward does so itself; the backward passes through it are wrapped here. Other Ds leave the flags alone."""
    return C.strict_fp32(env.device) if getattr(D, "strict_fp32", False) else contextlib.nullcontext()


def d_precision(D, env):
    """The D's precision, for the log."""
    if getattr(D, "strict_fp32", False):
        return "fp32, TF32 off"
    tf32 = " (TF32 on)" if env.device.type == "cuda" and env.precision != "fp32" else ""
    enc = f"encoder {env.precision} autocast, heads " if isinstance(D, TeacherD) and env.precision in ("bf16", "fp16") \
        else ""
    return f"{enc}fp32{tf32}"


def g_step(gen_model, D, d_params, g_params, opt_g, x, y, t_g, loss, env, amp, guard=None):
    """G step (GDD §3, the generator and its loss): fresh z; D's trainable tensors flagged off (the stored list, so
    a frozen backbone stays frozen), so L_G reaches G through D but updates no D tensor; gradients averaged over
    ranks; Adam step (see _step)."""
    for p in d_params:
        p.requires_grad_(False)
    with amp():
        fake = G(gen_model, torch.randn_like(x), t_g, y)
    L_G = g_loss(D(fake.float(), y, amp()), loss, getattr(D, "logit_groups", None))
    opt_g.zero_grad(set_to_none=True)
    with _d_fp32(D, env):
        L_G.backward()
    for p in d_params:
        p.requires_grad_(True)
    C.sync_grads(C.unwrap(gen_model), env)
    _step(opt_g, guard)
    return L_G.detach()


def d_step(gen_model, D, d_params, opt_d, x, y, t_g, loss, env, amp, guard=None):
    """D step (GDD §3, the D loss): fresh z', fakes made under no_grad (constants); fake and real through D in separate
    passes, fake first as GDD (each training-mode pass advances the heads' spectral-norm power iteration);
    fake labels = the real batch's labels."""
    with torch.no_grad(), amp():
        fake = G(gen_model, torch.randn_like(x), t_g, y).float()
    fake_logits = D(fake, y, amp())
    real_logits = D(x, y, amp())
    L_D = d_loss(real_logits, fake_logits, loss, getattr(D, "logit_groups", None))
    opt_d.zero_grad(set_to_none=True)
    with _d_fp32(D, env):
        L_D.backward()
    C.sync_grads(D, env)
    _step(opt_d, guard)
    return L_D.detach(), real_logits.detach(), fake_logits.detach()


def r1_step(D, d_params, opt_d, x, y, gamma, r, env, guard=None):
    """Lazy R1 (Mescheder et al. 2018; StyleGAN2 §3.1; GDD training/loss.py): one extra D update on r * R1 on the
    real batch (D only; G is not involved); fp32 with TF32 off for every D (R1 and its double backward
    are precision-critical)."""
    with C.strict_fp32(env.device):
        R1 = r1_penalty(D, x, y, gamma)
        opt_d.zero_grad(set_to_none=True)
        (r * R1).backward()
    C.sync_grads(D, env)
    _step(opt_d, guard)
    return R1.detach()


def check_in_file_teacher(cfg, given, ck):
    """--teacher_* shape the in-file teacher only; a fresh run beside an in-file teacher.pt already trained reuses it
    only if it is the one these settings ask for."""
    own = os.path.join(cfg.out, "teacher.pt")  # cfg.teacher is None for an in-file teacher, resumed runs too
    k = next((k for k in ("teacher_net", "teacher_iters", "teacher_batch", "teacher_lr")  # (--teacher_iters 0: none)
              if k in given and (k, given[k]) != ("teacher_iters", 0)), None)
    if k and cfg.teacher is not None:
        raise C.UserError(f"--{k} shapes the in-file teacher, and this run's teacher is '{cfg.teacher}'; drop it.")
    if cfg.teacher is None and not ck and os.path.exists(own):
        was = C.load_checkpoint(own)["config"]
        now = dict(data=cfg.data, seed=cfg.seed, net=cfg.teacher_net, cond=cfg.cond, iters=cfg.teacher_iters,
                   batch=cfg.teacher_batch, lr=cfg.teacher_lr)
        k = next((k for k in now if was.get(k) != now[k]), None)
        if k:
            raise C.UserError(f"'{own}' is an in-file teacher trained with {k} {was.get(k)!r}, not {now[k]!r}; "
                              f"remove it to train the teacher anew, or use another --out.")


def check_own(ck, path):
    """This file's own checkpoint entries (beside common.load_checkpoint's): t_g a float in [0.99, 1] (load_teacher's
    range), the teacher's record naming its path, D's state."""
    t_g, t = ck.get("t_g"), ck.get("teacher")
    if not (type(t_g) in (int, float) and 0.99 <= t_g <= 1 and isinstance(t, dict) and isinstance(t.get("path"), str)
            and isinstance(ck.get("disc"), dict)):
        raise C.UserError(f"checkpoint '{path}' is malformed (its t_g {t_g!r}, teacher or disc entry); it was not "
                          f"written by this project.")


def train(cfg, given):
    clock, env = C.stopwatch(), C.setup(cfg.device, cfg.seed, cfg.precision)
    path = os.path.join(cfg.out, "ckpt.pt")
    ck = None
    if cfg.resume or (cfg.resume is None and os.path.exists(path)):
        ck = C.load_checkpoint(path)
        if ck["method"] != METHOD or ck["convention"] != CONVENTION:
            raise C.UserError(f"'{path}' is a checkpoint of {ck['method']} of convention '{ck['convention']}', not one "
                              f"of this file's; use another --out.")
        check_own(ck, path)
        t = given.get("teacher", ck["teacher"]["path"])  # or another path to its weights (teacher_id checks them)
        same = C.same_file(t, ck["teacher"]["path"]) or t is None and ck["config"].get("teacher") is None  # in-file
        if not (same or t and ck.get("teacher_id") is not None):
            raise C.UserError(f"'{path}' was started from the teacher '{ck['teacher']['path']}'; use another --out.")
        late = "eval_teacher_steps"  # read by the step-0 evaluation only, which a resumed run is past: not applied
        if ck["step"] > 0 and late in given and given[late] != ck["config"].get(late):
            C.note(f"config: --{late} {given[late]} not applied: the teacher's reference sample is drawn at step 0, "
                   f"and '{path}' is at step {ck['step']}")
        keep = C.Given({k: v for k, v in given.items() if k != late or not ck["step"]}, given.preset)
        cfg = C.resume_config(Config, ck, cfg, keep, path, fixed=("freeze", "disc", "cond", "proj_seed",
                                "disc_backbones", "disc_weights", "teacher_net", "teacher_iters", "teacher_batch",
                                "teacher_lr"))
        for k, other in (("r1_gamma", "r1_gamma_gdd"), ("r1_gamma_gdd", "r1_gamma")):  # R1's gamma, given in one
            if k in given and getattr(cfg, k) == given[k] and getattr(cfg, other) is not None:  # convention, applied:
                C.note(f"config: {other} = None (checkpoint had {getattr(cfg, other)!r}; --{k} replaces it)")
                setattr(cfg, other, None)  # the other one goes, else a plain restart (gdd_gamma reads the command
                # line) took the checkpoint's gamma again while config.json held both
    C.require_detector(cfg, env)  # --fallback false: a missing FID detector stops the run now, in one sentence
    in_file = not (ck or cfg.teacher or os.path.exists(os.path.join(cfg.out, "teacher.pt"))) and cfg.teacher_iters > 0
    for k in ("batch", "teacher_batch") if in_file else ("batch",):  # before the in-file teacher trains
        if getattr(cfg, k) % env.world:
            raise C.UserError(f"--{k} {getattr(cfg, k)} is not divisible by the world size {env.world}.")
    if not (ck or cfg.teacher or cfg.teacher_iters):
        raise C.UserError(f"the {cfg.preset} preset needs --teacher; make one with `python rectified_flow.py "
                          f"--preset {cfg.preset} --stage 1rf`.")
    data = C.load_data(cfg.data, cfg.root, env, cfg.seed, False)  # GDD trains without flips or augmentation
    gens = [data.gen] if data.gen is not None else []  # the generators whose state checkpoints carry
    if cfg.cond and not data.num_classes:
        raise C.UserError(f"--cond needs labelled data; '{cfg.data}' has no labels.")
    C.refuse_unused(given, data.kind, points=("eval_teacher_steps",))  # --fid_every etc. on 2-D points (the
    # teacher's reference sample: points only)
    check_in_file_teacher(cfg, given, ck)
    check_disc(cfg, data, given)  # before the in-file teacher's training, as the `projected` D's backbones
    if in_file:  # its --teacher_net fits the data (train_teacher met it after the run's config.json, in --out)
        teacher_net_dict(cfg, data)
    bbs = projected_backbones(cfg, env) if cfg.disc == "projected" else None  # (their weights): missing ones stop now
    # a named teacher is read before the run's first file (a missing or incompatible one: its sentence, nothing written
    # in --out); its notes wait for the run's first line
    named = load_teacher(cfg.teacher, cfg, data, types.SimpleNamespace(info=C.note)) if cfg.teacher else None
    log = C.Logger(cfg.out, env, cfg.iters, cfg.batch, cfg, start_step=ck and ck["step"])

    # ---- teacher: a rectified_flow.py checkpoint, or the in-file 1-RF for toy/tiny
    # (resumed: the file it started from, or another path to the same weights, which teacher_id checks; the in-file
    # teacher is DIR/teacher.pt wherever DIR is now)
    tpath = cfg.teacher or os.path.join(cfg.out, "teacher.pt")
    if in_file:  # (no --teacher, no teacher_iters: refused above)
        train_teacher(cfg, data, env, tpath, log)
    elif not (ck or cfg.teacher):  # DIR/teacher.pt of a run stopped before its first checkpoint: the RNG streams
        # as that teacher's training left them, so the run goes on as if it had not stopped
        C.restore_rng(C.load_checkpoint(tpath), env, gens)
    notes = types.SimpleNamespace(info=C.note)  # a log whose lines wait for the first output (load_teacher, build_disc)
    teacher, tck, t_g = named or load_teacher(tpath, cfg, data, notes)
    tid = C.teacher_id(ck, path, tpath, teacher.state_dict())  # a resumed run reads it too (panels, t_g)
    teacher = teacher.to(env.device).eval().requires_grad_(False)

    # ---- generator (GDD §3, initialisation): raw weights and EMA both start as the teacher's EMA; GDD-I freezes once
    nd = teacher.config
    raw = make_generator(teacher, cfg.freeze)
    if ck:
        C.load_state_strict(raw, ck["model"])
    n_all = sum(p.numel() for p in raw.parameters())
    n_frozen = sum(p.numel() for p in raw.parameters() if not p.requires_grad)
    D = build_disc(cfg, data, teacher, env, notes, bbs).to(env.device).train()  # (its notes wait, so that a refusal
    # after them, the saved D that does not fit, prints alone)
    gen_model = C.distribute(C.maybe_compile(raw, cfg.compile), env, manual=True)  # StyleGAN3-style gradient sync
    C.distribute(D, env, manual=True)
    ema = C.EMA(raw, decay=0.0) if not cfg.ema_halflife_img else \
        C.EMA(raw, halflife_kimg=cfg.ema_halflife_img / 1000, rampup=cfg.ema_rampup)
    g_params = [p for p in raw.parameters() if p.requires_grad]
    d_params = [p for p in D.parameters() if p.requires_grad]  # the stored list toggled in the G step
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr_g, betas=(0.0, 0.99), eps=1e-8, foreach=True)  # GDD training_loop.py
    lr_d, betas_d = d_adam_hparams(cfg.lr_d, cfg.r1_interval)
    opt_d = torch.optim.Adam(d_params, lr=lr_d, betas=betas_d, eps=1e-8, foreach=True)
    if ck:
        C.load_state_strict(ema.model, ck["ema"])
        load_disc_state(D, ck["disc"])  # Adam moments from the checkpoint, lr and betas from this run's config
        C.load_optimizer(opt_g, ck["opt"].get("g", {})), C.load_optimizer(opt_d, ck["opt"].get("d", {}))  # (one
        # missing: load_optimizer's sentence, not a KeyError traceback)
        C.restore_rng(ck, env, gens)
    step = ck["step"] if ck else 0

    per_rank = cfg.batch // env.world  # (divisible: checked above)
    with torch.no_grad(), torch.random.fork_rng(devices=[env.device] if env.device.type == "cuda" else []):
        probe = torch.zeros(2, *data.shape, device=env.device)  # eval mode: no spectral-norm or BatchNorm update
        K = sum(D.logit_groups) if hasattr(D, "logit_groups") else \
            D.eval()(probe, torch.zeros(2, dtype=torch.long, device=env.device) if cfg.cond else None).shape[1]
        D.train()
    gamma, gamma_note = resolve_gamma(cfg, given, K, per_rank)
    variant = "GDD-I" if cfg.freeze == "gdd_i" else "GDD"
    log.info(f"{METHOD} ({variant}) | world {env.world} | global batch {cfg.batch} = {env.world} x {per_rank} | device "
             f"{env.device} | precision: G {env.precision}, D {d_precision(D, env)}, R1 fp32 (TF32 off) | teacher "
             f"{tpath} (step {tck['step']}, t_g {t_g:g}) | disc {cfg.disc} (K = {K} logits, "
             f"{sum(p.numel() for p in d_params):,} trainable) | loss {cfg.loss} | R1 every {cfg.r1_interval}, "
             f"{gamma_note} | step {step}/{cfg.iters}")
    if hasattr(D, "describe"):
        log.info(f"disc {cfg.disc}: {D.describe()}")
    log.info(f"frozen {n_frozen:,} of {n_all:,} generator parameters (fraction {n_frozen / n_all:.4f})")
    fid = C.FidHook(cfg.fid_detector, data, env, cfg.root, cfg.fid_n, log, inner(ema.model.config)["label_dim"]) \
        if cfg.fid_every and data.kind == "images" else None
    shape = sample_shape(ema.model.config)
    fid_gen = lambda: {"1 step": lambda rng, labels: sample(ema.model, rng, shape, 1, t_g, labels)}
    if step == 0:  # the step-0 generator, before any update
        def first():  # rank 0 (a failure stops every rank: C.agree)
            m = evaluate(ema.model, None, cfg, data, env, cfg.out, 0, t_g)
            log.info("step 0: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "step"))
        C.agree(env, first)
        if fid:
            fid(0, fid_gen())

    guard = C.Guard(env, cfg.max_skips, log, path, ck and step,  # skips non-finite steps, withholds bad checkpoints
                    probe=C.sample_probe(lambda n: lambda rng, labels: sample(n, rng, shape, 1, t_g, labels),
                                         (raw, ema.model), env, data, inner(nd)["label_dim"]))

    def state():
        return dict(model=raw.state_dict(), ema=ema.model.state_dict(),
                    opt=dict(g=opt_g.state_dict(), d=opt_d.state_dict()), step=step, config=dataclasses.asdict(cfg),
                    net=nd, method=METHOD, convention=CONVENTION, disc=disc_state(D), t_g=t_g,
                    teacher=dict(path=tpath, step=tck["step"], method=tck["method"], convention=tck["convention"]),
                    teacher_id=tid, r1=C.all_mean(r1, env))  # (the last lazy R1, logged until the next one)

    amp = lambda: C.autocast(env)
    r1 = torch.zeros((), device=env.device)
    if ck and torch.is_tensor(ck.get("r1")) and ck["r1"].numel() == 1:  # a resumed run logs the last R1 until the next
        r1 = ck["r1"].float().reshape(()).to(env.device)
    while step < cfg.iters:
        if cfg.lr_schedule == "cosine":
            decay = 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
            opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"] = cfg.lr_g * decay, lr_d * decay
        x, y = data.batch(per_rank, step, env.rank, env.world)
        y = y if cfg.cond else None  # fake labels = the real batch's labels
        # ---- ALGO LOGIC: one G / D / lazy-R1 step (GDD §3) -----------------------------------------------------------
        L_G = g_step(gen_model, D, d_params, g_params, opt_g, x, y, t_g, cfg.loss, env, amp, guard)
        L_D, real_logits, fake_logits = d_step(gen_model, D, d_params, opt_d, x, y, t_g, cfg.loss, env, amp, guard)
        if step % cfg.r1_interval == 0 and step > 0 and gamma > 0:  # lazy R1 (StyleGAN2 §3.1): steps r, 2r, ...
            r1 = r1_step(D, d_params, opt_d, x, y, gamma, cfg.r1_interval, env, guard)
        ema.update(raw, step * cfg.batch, cfg.batch)  # EDM's EMA ramp (ema_beta)
        # ---- end of ALGO LOGIC ---------------------------------------------------------------------------------------
        guard.end_step(L_G, L_D, r1)
        step += 1
        if step % cfg.log_every == 0 or step == cfg.iters:
            log.log(step, L_D=L_D, L_G=L_G, R1=r1, D_real=torch.sigmoid(real_logits.float()).mean(),
                    D_fake=torch.sigmoid(fake_logits.float()).mean())
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            guard.checkpoint(step, step == cfg.iters, state, gens)
        if cfg.sample_every and step % cfg.sample_every == 0:  # rank 0 (a failure stops every rank: C.agree)
            C.agree(env, lambda: evaluate(ema.model, teacher, cfg, data, env, cfg.out, step, t_g))
        if fid and (step % cfg.fid_every == 0 or step == cfg.iters):  # FID-10k proxy every fid_every and at the end
            fid(step, fid_gen())
    if ck is None and cfg.iters == 0:
        guard.checkpoint(step, True, state, gens)
    def final():  # rank 0 (a failure stops every rank: C.agree, which every rank leaves after it)
        m = evaluate(ema.model, teacher, cfg, data, env, cfg.out, step, t_g)
        log.info("eval: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "step"))
    C.agree(env, final if step > 0 else lambda: None)
    log.info(clock())


# ============================================================================================================= commands
# sample and fid change only these Config fields over the checkpoint's (any other is refused)
SAMPLER_FIELDS = ()  # the one-step generator has none


def sample_or_fid(cmd, opts, given):
    env = C.setup(opts.device, opts.seed, opts.precision or "fp32")  # sample/fid: fp32, TF32 off
    ck = C.load_checkpoint(opts.ckpt)
    if ck["method"] != METHOD or ck["convention"] != CONVENTION:
        raise C.UserError(f"'{opts.ckpt}' is a checkpoint of {ck['method']} of convention '{ck['convention']}'; "
                          f"distributional.py samples only its own.")
    check_own(ck, opts.ckpt)
    cfg = C.merge_config(Config, ck["config"], given)
    net = build(ck["net"])
    C.load_state_strict(net, ck["ema" if opts.ema else "model"])
    net, shape, t_g = net.to(env.device).eval(), sample_shape(ck["net"]), ck["t_g"]
    if any(K > 1 for K in opts.steps):
        C.note("note: the generator is trained at t_g only; K > 1 re-noises and re-predicts and is usually worse "
               "than K = 1.")
    def gen(K):  # --precision bf16: G under autocast, as it trained (was ignored); fp32 by default, autocast off
        def generate(rng, labels):
            with C.autocast(env):
                return sample(net, rng, shape, K, t_g, labels)
        return generate
    C.sample_or_fid(cmd, opts, env, cfg, ck, shape, gen, lambda K: f"{C.n_steps(K)}, t_g {t_g:g}",
                    inner(ck["net"])["label_dim"], record=lambda K: dict(freeze=cfg.freeze, disc=cfg.disc))


def main(argv=None):
    cmd, cfg, given = C.parse_cli(Config, PRESETS, METHOD, argv, sampler=SAMPLER_FIELDS)
    C.preflight(cmd, cfg, {cfg.out: (*C.RUN_FILES, "teacher.pt", "teacher.pt.tmp", "samples_step0.png")})
    train(cfg, given) if cmd == "train" else sample_or_fid(cmd, cfg, given)


if __name__ == "__main__":
    C.main_guard(main)
