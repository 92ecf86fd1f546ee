"""Inductive Moment Matching (IMM): a one/few-step generator trained from scratch with an MMD loss.

Paper: Zhou, Ermon, Song, "Inductive Moment Matching", arXiv 2503.07565 (ICML 2025).
Equations: "IMM Eq. n / Alg. n / App. X" are the paper's (arXiv 2503.07565 v2); derivations the code relies on are
in docs/imm.md.

The method in a few lines. The network defines a one-step map f_{s,t} that carries a noisy sample x_t at
time t to time s <= t along the DDIM interpolant. For groups of M samples sharing (s, r, t), with r slightly
below t, training matches the *distribution* of f_{s,t}(x_t) (with gradient) to that of f_{s,r}(x_r) (current
weights, no gradient) by a Laplace-kernel MMD (maximum mean discrepancy: a distance between two sample sets
from the mean kernel similarity within each set and across them). When r reaches s the target is exactly x_s
(f_{s,s} = id), so correctness spreads by induction from short jumps to long ones (IMM Theorem 1). Sampling chains
f from the prior at T down to t_min in 1, 2, 4 or 8 steps. No teacher, no GAN.

Convention (written into every checkpoint): x_t = (1 - t) x + t eps, eps ~ N(0, sigma_d^2 I), sigma_d = 0.5,
t = 1 is noise, times in [t_min, T] = [0.006, 0.994]; f_{s,t} maps time t to time s. eta_t = t / (1 - t) is the
noise-to-signal ratio (EDM's sigma / sigma_d), the scale on which r(s, t) steps below t. The network gets raw
times (t, s) and multiplies them by its time_scale = 1000 (c_noise(t) = 1000 t, IMM §4.2, Table 5).

    python imm.py                                             # toy: 8 Gaussians, CPU, samples at 1/2/4/8 steps
    python imm.py --data points.npy --out runs/imm-mine
    torchrun --nproc_per_node=8 imm.py --preset cifar10       # paper recipe (B 4096, M 4, k 15, 400k iters)
    python imm.py sample --ckpt runs/imm-toy/ckpt.pt --steps 1,2,4,8 --sampler restart --out s.png
    python imm.py fid --ckpt runs/imm-cifar10/ckpt.pt --steps 1,2,4,8
"""
import contextlib, dataclasses, math, os
from dataclasses import dataclass
from typing import Literal, Optional

import torch
import torch.nn as nn

import common as C

METHOD = "imm"
CONVENTION = "x_t=(1-t)x+t*e, e~N(0,0.5^2 I), t=1 noise; f_{s,t} maps t->s"


# =============================================================================================================== config
@dataclass
class Config:
    preset: str = "toy"  # preset that filled the defaults (toy, tiny, small, cifar10)
    data: str = "8gaussians"  # toy name, cifar10/mnist/fashion_mnist, .npy file, image folder or .zip
    root: str = "data"  # data sets and FID reference statistics are cached here
    out: str = "runs/imm-toy"  # run folder
    teacher: Optional[str] = None  # not accepted: IMM trains from scratch
    resume: Optional[bool] = None  # None: resume when DIR/ckpt.pt exists
    seed: int = 0  # seeds model init, data order and noise
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    precision: Optional[str] = None  # fp32/tf32 (paper: TF32); bf16/fp16 set min_gap 1e-4 (App. I.6)
    compile: bool = False  # torch.compile the network (the online pass)
    # network (common.net_config, two time inputs)
    net: str = "mlp"  # mlp, tiny, small, ddpmpp
    dropout: float = 0.0  # 0.2 on CIFAR-10 (Table 5)
    width: Optional[int] = None  # MLP width (2-D data only; None: common's 128)
    # the method
    param: Literal["simple_edm", "euler_fm"] = "simple_edm"  # parameterisation (IMM App. C.5: Simple-EDM / Euler-FM)
    second_time: Literal["s", "t_minus_s"] = "s"  # 2nd time: s, or t - s (Table 5, last column; I.6 prints r - s)
    sigma_d: float = 0.5  # data/prior std (IMM §4.1)
    T: float = 0.994  # largest time (App. I.1)
    t_min: float = 0.006  # smallest time (App. I.1)
    M: int = 4  # particles per group (Table 5)
    k: int = 12  # r(s,t) decrement 2^-k of the eta range (IMM App. C.6); 15 for CIFAR-10 (Table 5)
    a: float = 1.0  # weighting exponent of w(s,t) (IMM Eq. 13, Table 5)
    b: float = 5.0  # weighting shift of w(s,t) (IMM Eq. 13, Table 5)
    min_gap: Optional[float] = None  # minimum t - r (IMM App. I.6); None: 0, or 1e-4 under bf16/fp16
    # optimisation
    iters: int = 2000  # optimiser steps
    batch: int = 512  # global batch B per step (split over ranks and accumulation rounds)
    accum: int = 1  # gradient accumulation rounds
    optim: Literal["adam", "radam"] = "adam"  # RAdam on CIFAR-10 (Table 5)
    lr: float = 1e-3  # learning rate, betas (0.9, 0.999), eps 1e-8, no weight decay
    lr_schedule: Literal["const", "cosine"] = "const"  # cosine: lr x (1 + cos(pi step / iters)) / 2
    ema: float = 0.995  # EMA decay (evaluation only, never the target)
    xflip: bool = False  # random horizontal flips
    augment: float = 0.0  # EDM's non-leaky augmentation probability p (common.augment_batch; 0 off), augment_dim 9
    # sampling
    sampler: Literal["pushforward", "restart"] = "pushforward"  # IMM Alg. 2 / Alg. 5
    schedule: Literal["uniform", "edm"] = "uniform"  # time grid for N >= 3 (Eq. 117 / Eq. 118)
    eta_mid: float = 1.4  # 2-step middle time t_1 = eta^-1(1.4) = 7/12 (App. I.2)
    # logging and evaluation
    log_every: int = 500  # steps between log lines
    ckpt_every: int = 1000  # steps between checkpoints (and at the end)
    sample_every: int = 0  # steps between sample grids (0: end only)
    eval_n: int = 4000  # evaluation samples (toy metrics)
    eval_steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2, 4, 8])  # step counts plotted
    fid_every: int = 0  # steps between FID proxies (images; 0: never)
    fid_n: int = 10_000  # samples of the in-training FID proxy
    fid_detector: str = "inception"  # inception or a TorchScript path
    fallback: bool = True  # a missing weights file (Inception; LPIPS): warn and go on without it (False stops)
    max_skips: int = 100  # stop after this many optimiser steps in a row with non-finite gradients (each is skipped)

    def check(self):
        if self.teacher:
            raise ValueError("IMM trains from scratch; --teacher is not accepted.")
        if not 0 < self.t_min < self.T < 1:
            raise ValueError(f"need 0 < t_min < T < 1 (the eta decrement explodes at T = 1), got {self.t_min}, "
                             f"{self.T}.")
        if self.M < 1 or self.batch % self.M:
            raise ValueError(f"--batch {self.batch} must be a multiple of --M {self.M} (groups share (s, r, t)).")
        if not eta(self.t_min) < self.eta_mid < eta(self.T):  # t_1 = eta^-1(eta_mid) must lie in (t_min, T)
            raise ValueError(f"--eta_mid must lie in (eta(t_min), eta(T)) = ({eta(self.t_min):.4g}, "
                             f"{eta(self.T):.4g}), so that the 2-step middle time lies between t_min and T; "
                             f"got {self.eta_mid:g}.")
        if not self.data:
            raise ValueError("this preset needs --data (for example a uint8 (N, 16, 16, 3) .npy file).")


# beside common.RANGES; k <= 24: at k = 24 the gap t - r near t = 0.5 is ~2.5e-6, a few dozen fp32 ulps, but near T
# it falls below one fp32 ulp from k ~ 17 on: those groups get r = t, a zero loss and no gradient (0.1 % of groups
# at k = 18, 4.7 % at k = 24; none at k <= 16); far beyond, r rounds to t everywhere and nothing is learned (k = 100
# logged a loss of exactly 0)
RANGES = dict(M=">= 1", k="[1, 24]", min_gap="[0, 1)", eta_mid="> 0", sigma_d="> 0")

# ============================================================================================================== presets
PRESETS = {  # cifar10 = IMM Table 5
    # toy: under a minute on one CPU thread; a 64-wide MLP takes more steps in the time (2,800), k = 10 and EMA 0.99
    # sharpen the 2-step samples (in_mode 0.92 against 0.88 for the 128-wide, 2,000-step k = 12 recipe)
    "toy": dict(data="8gaussians", net="mlp", width=64, batch=512, M=4, k=10, iters=2800, optim="adam", lr=1e-3,
                ema=0.99, precision="fp32"),  # fp32 on a GPU too (its default, bf16, is outside IMM's settings)
    "tiny": dict(data="", net="tiny", dropout=0.1, batch=16, M=4, k=12, iters=20, optim="adam", lr=2e-4,
                 ema=0.99, precision="fp32", xflip=True, log_every=5, ckpt_every=10, eval_n=16, eval_steps=[1, 2],
                 fid_n=16),
    "small": dict(data="cifar10", net="small", dropout=0.1, batch=256, M=4, k=12, iters=30_000, optim="radam",
                  lr=2e-4, ema=0.9995, xflip=True, precision="tf32", log_every=500, ckpt_every=5000,
                  fid_every=5000, fid_n=10_000, eval_n=64),
    # IMM Table 5: DDPM++ 55M, dropout 0.2, B 4096, M 4, k 15, RAdam 1e-4, 400k iterations, EMA 0.9999, a 1, b 5,
    # Table 5's x-flip and EDM augment rows, both on: data x-flips, then EDM's pipe (p = 0.12 with EDM train.py's
    # CIFAR-10 multipliers, whose own labelled x-flip is separate), as py-meanflow's CIFAR-10 run pairs them too.
    # precision: TF32 as the paper trained (App. I.6); the U-Net's time path runs in float64 (net_dict: time_fp64)
    "cifar10": dict(fallback=False,  # a missing weights file stops the run: no silent fallback
                    data="cifar10", net="ddpmpp", dropout=0.2, batch=4096, M=4, k=15, iters=400_000,
                    optim="radam", lr=1e-4, ema=0.9999, xflip=True, augment=0.12, precision="tf32", log_every=500,
                    ckpt_every=10_000, fid_every=20_000, fid_n=10_000, eval_n=64),
}


# ==================================================================================================== method: the maths
def alpha(t):
    return 1 - t  # OT-FM line


def sigma(t):
    return t


def eta(t):
    """eta_t = sigma_t / alpha_t = t / (1 - t)."""
    return t / (1 - t)


def eta_inv(e):
    return e / (1 + e)


def _col(v, x):
    return v.reshape(-1, *[1] * (x.ndim - 1))


def interpolate(x, eps, t):
    """x_t = alpha_t x + sigma_t eps (IMM §4.1, App. C.1)."""
    return _col(alpha(t), x) * x + _col(sigma(t), x) * eps


def ddim(x_t, x, t_src, t_dst):
    """IMM Eq. 11: DDIM(x_t, x; t_src -> t_dst) = (alpha_s - sigma_s alpha_t / sigma_t) x + (sigma_s / sigma_t) x_t
    (keyword arguments because sources disagree on the order of the times)."""
    t, s = _col(t_src, x), _col(t_dst, x)
    return (alpha(s) - sigma(s) * alpha(t) / sigma(t)) * x + (sigma(s) / sigma(t)) * x_t


def coeffs(s, t, param="simple_edm", sigma_d=0.5):
    """IMM App. C.5: c_skip(s,t), c_out(s,t) of f_{s,t} = DDIM(x_t, g; t -> s), and c_in(t) (appendix form 1 /
    (sigma_d sqrt(alpha_t^2 + sigma_t^2)); docs/imm.md, "Input scaling c_in"). In fp32 at least (fp64 for fp64
    times)."""
    s, t = (v.to(torch.promote_types(v.dtype, torch.float32)) for v in (s, t))
    nt = torch.sqrt(alpha(t) ** 2 + sigma(t) ** 2)
    c_in = 1 / (sigma_d * nt)
    if param == "euler_fm":  # IMM App. C.5, Euler-FM: f = x_t - (t - s) sigma_d G
        return torch.ones_like(t), -sigma_d * (t - s), c_in
    c_skip = (alpha(s) * alpha(t) + sigma(s) * sigma(t)) / nt ** 2
    c_out = -sigma_d * (alpha(s) * sigma(t) - sigma(s) * alpha(t)) / nt
    return c_skip, c_out, c_in


def f_map(net, x_t, s, t, cfg, env, aug=None):
    """The one-step map (IMM §4.2, App. C.5): f_{s,t}(x_t) = c_skip(s,t) x_t + c_out(s,t) G(c_in(t) x_t, c_noise(t),
    c_noise(s)); the second time is s, or t - s with second_time = "t_minus_s" (Table 5); c_noise(t) = 1000 t (§4.2,
    Table 5). Coefficients in fp32, the network under autocast."""
    c_skip, c_out, c_in = coeffs(s, t, cfg.param, cfg.sigma_d)
    second = s if cfg.second_time == "s" else t - s
    with C.autocast(env):  # aug: EDM's augmentation labels of x_t's images (training only)
        G = net(_col(c_in, x_t).to(x_t.dtype) * x_t, t, second, **({} if aug is None else dict(aug=aug)))
    return _col(c_skip, x_t) * x_t + _col(c_out, x_t) * G.to(c_out.dtype)


def delta_eta(cfg):
    """The decrement of r(s, t) (IMM App. C.6): Delta eta = (eta(T) - eta(t_min)) / 2^k (= 5.0556e-3 for k =
    15)."""
    return (eta(cfg.T) - eta(cfg.t_min)) / 2 ** cfg.k


def r_of(s, t, d_eta, min_gap=0.0):
    """r(s, t) (IMM App. C.6; the gap: App. I.6) = max(s, min(t - gap, eta^-1(max(eta_t - d_eta, 0)))); the inner
    clamp at 0 keeps r in [s, t] for coarse k (a project addition; docs/imm.md, "The decrement r(s, t) and its
    clamp"). Float64 in, float64 out."""
    r = eta_inv(torch.clamp(eta(t) - d_eta, min=0))
    if min_gap:
        r = torch.minimum(t - min_gap, r)
    return torch.maximum(s, r)


def sample_times(n_groups, M, cfg, min_gap, device):
    """Per group (IMM App. C.4, C.7): t ~ U(t_min, T), s ~ U(t_min, t) (s <= t - 1e-6 keeps c_out non-zero), r(s,
    t); drawn and computed in float64, cast to fp32, repeated for the M members of each group."""
    u = torch.rand(2, n_groups, dtype=torch.float64, device=device)
    t = cfg.t_min + (cfg.T - cfg.t_min) * u[0]
    s = torch.minimum(cfg.t_min + (t - cfg.t_min) * u[1], t - 1e-6)
    r = r_of(s, t, delta_eta(cfg), min_gap)
    return tuple(v.float().repeat_interleave(M) for v in (s, r, t))


def laplace_kernel(a, b, w_tilde, D):
    """The Laplace kernel of IMM §4.2, App. C.4/C.8: k(a, b) = exp(-w~ max(|a - b|, 1e-8) / D) for every pair of
    particles in each group. a, b: (G, M, D); w_tilde: (G,). The squared distance is clamped before the square root
    (zero gradient on the diagonal, not NaN)."""
    d2 = (a[:, :, None, :] - b[:, None, :, :]).square().sum(-1)
    return torch.exp(-w_tilde[:, None, None] * torch.sqrt(torch.clamp(d2, min=1e-16)) / D)


def group_mmd2(y_t, y_r, w_tilde):
    """MMD^2 per group (the IMM objective, Eq. 12, estimated as App. C Eq. 67), V-statistic with the diagonal: mean
    k(y_t, y_t) + mean k(y_r, y_r) - 2 mean k(y_t, y_r)."""
    D = y_t.shape[-1]
    k = lambda a, b: laplace_kernel(a, b, w_tilde, D).mean((1, 2))
    return k(y_t, y_t) + k(y_r, y_r) - 2 * k(y_t, y_r)


def weight(t, a=1.0, b=5.0):
    """IMM Eq. 13: w(s,t) = 1/2 sigmoid(b - lambda_t) (-d lambda_t/dt) alpha_t^a / (alpha_t^2 + sigma_t^2), for OT-FM
    sigmoid(b - lambda_t) (1 - t)^a / (t (1 - t) ((1 - t)^2 + t^2)), lambda_t = 2 log((1 - t) / t), the log
    signal-to-noise ratio."""
    lam = 2 * torch.log((1 - t) / t)
    return torch.sigmoid(b - lam) * (1 - t) ** a / (t * (1 - t) * ((1 - t) ** 2 + t ** 2))


def imm_loss(model, target, x, eps, s, r, t, cfg, env, aug=None):
    """The IMM loss (Eq. 12 with the weighting of Eq. 13, estimated as App. C Eq. 67; IMM Alg. 1). model: the online
    network with gradient (maybe DDP/compiled); target: the same weights, unwrapped, evaluated under no_grad with the
    same dropout masks (RNG state replayed; docs/imm.md, "Pitfalls we found"). Returns (L, mean unweighted MMD^2,
    fraction of groups with r = s)."""
    B, M = x.shape[0], cfg.M
    x_t, x_r = interpolate(x, eps, t), interpolate(x, eps, r)  # the same eps on both (App. C.2, re-using x_t)
    devices = [env.device] if env.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the online pass's draws are replayed by the target pass
        y_t = f_map(model, x_t, s, t, cfg, env, aug)  # with gradient
    with torch.no_grad():
        y_r = f_map(target, x_r, s, r, cfg, env, aug)  # stop-gradient (App. C.4), online weights (not the EMA)
    g = slice(None, None, M)  # one row per group
    w_tilde = 1 / coeffs(s[g], t[g], cfg.param, cfg.sigma_d)[1].abs()  # kernel width 1 / |c_out(s,t)| (App. C.8)
    ft = torch.promote_types(y_t.dtype, torch.float32)
    mmd = group_mmd2(y_t.to(ft).reshape(B // M, M, -1), y_r.to(ft).reshape(B // M, M, -1), w_tilde.to(ft))
    L = (weight(t[g].to(ft), cfg.a, cfg.b) * mmd).mean()  # App. C Eq. 67: L = (M/B) sum_i w_i MMD^2_i
    return L, mmd.mean().detach(), (r[g] == s[g]).float().mean()


# ============================================================================================================== sampler
def time_steps(N, cfg, schedule=None):
    """The sampling grid t_N = T > ... > t_0 = t_min (float64): N = 2 uses eta = 1.4 (t_1 = 7/12; the CIFAR config's
    mid_nt); uniform is t_i = T + (N - i)/N (t_min - T) (Eq. 117); edm: rho = 7 in eta (Eq. 118), as the
    discretization branches of lumalabs/imm generate_images.py build them."""
    schedule = schedule or cfg.schedule
    if N == 1:
        return [cfg.T, cfg.t_min]
    if N == 2:
        return [cfg.T, eta_inv(cfg.eta_mid), cfg.t_min]
    if schedule == "uniform":
        return [cfg.T + (N - i) / N * (cfg.t_min - cfg.T) for i in range(N, -1, -1)]
    hi, lo = eta(cfg.T) ** (1 / 7), eta(cfg.t_min) ** (1 / 7)
    return [eta_inv((hi + (N - i) / N * (lo - hi)) ** 7) for i in range(N, -1, -1)]


@torch.no_grad()
def sample(net, rng, shape, N, cfg, env, clip=True):
    """Pushforward (IMM Alg. 2; lumalabs/imm generate_images.py pushforward_generator_fn): x_{t_{i-1}} =
    f_{t_{i-1}, t_i}(x_{t_i}) from x_T ~ N(0, sigma_d^2 I). Restart (Alg. 5; restart_generator_fn): x~ = f_{t_0,
    t_i}(x_{t_i}), re-noised to t_{i-1} with fresh noise except at the last step. All noise comes from rng (per sample
    index: the prior first, then the restart noises in order)."""
    grid = time_steps(N, cfg)
    x = cfg.sigma_d * rng.randn(len(rng.gens), *shape)
    full = lambda v: torch.full((x.shape[0],), v, device=x.device, dtype=torch.float32)
    for i in range(N, 0, -1):
        t, t_prev = grid[N - i], grid[N - i + 1]
        if cfg.sampler == "pushforward":
            x = f_map(net, x, full(t_prev), full(t), cfg, env).float()
        else:
            x0 = f_map(net, x, full(cfg.t_min), full(t), cfg, env).float()
            x = x0 if i == 1 else interpolate(x0, cfg.sigma_d * rng.randn(*x.shape), full(t_prev))
    return x.clamp(-1, 1) if clip and len(shape) == 3 else x


# ============================================================================================================= plumbing
def net_dict(cfg, data):
    """Two time inputs (t, then s or t - s), time_scale 1000 (c_noise = 1000 t, §4.2, Table 5), no labels, zero output;
    the U-Net's time path in float64 as lumalabs/imm's training/unets.py runs it (time_fp64: docs/imm.md, "Nearby
    times in low precision")."""
    if data.kind == "images":
        if cfg.net == "mlp":
            raise C.UserError("--net mlp is for 2-D points; use tiny, small or ddpmpp for images.")
        return C.net_config(cfg.net, img_resolution=data.shape[1], in_channels=data.shape[0], num_times=2,
                            time_scale=1000.0, dropout=cfg.dropout, time_fp64=True,
                            augment_dim=C.augment_dim(**C.EDM_AUGMENT) if cfg.augment else 0)
    if cfg.net != "mlp":
        raise C.UserError(f"--net {cfg.net} is an image network; 2-D points need --net mlp.")
    if cfg.augment:
        raise C.UserError("--augment is EDM's image augmentation; 2-D points take --augment 0.")
    return C.net_config("mlp", num_times=2, time_scale=1000.0, dropout=cfg.dropout,
                        **({"width": cfg.width} if cfg.width else {}))


def sample_shape(nd):
    return (nd["dim"],) if nd["kind"] == "mlp" else (nd["in_channels"], nd["img_resolution"], nd["img_resolution"])


@torch.no_grad()
def evaluate(net, cfg, data, env, out, step):
    """Samples at cfg.eval_steps steps beside the data (PNG) and, for points, the common toy metrics."""
    shape = sample_shape(C.unwrap(net).config)
    sheet = C.EvalSheet(data, shape, cfg.eval_n, cfg.seed, step)
    for N in cfg.eval_steps:
        sheet.add(N, C.n_steps(N) + (f" ({cfg.sampler})" if len(shape) == 1 else ""),
                  sample(net, sheet.rng(env.device), shape, N, cfg, env))
    return sheet.write(out)


def generator(net, cfg, shape, N, env):
    return lambda rng, labels: sample(net, rng, shape, N, cfg, env)


# ============================================================================================================= training
def train(cfg, given):
    clock, env = C.stopwatch(), C.setup(cfg.device, cfg.seed, cfg.precision)
    path = os.path.join(cfg.out, "ckpt.pt")
    ck = None
    if cfg.resume or (cfg.resume is None and os.path.exists(path)):
        ck = C.load_checkpoint(path)
        if ck["method"] != METHOD or ck["convention"] != CONVENTION:
            raise C.UserError(f"'{path}' is a checkpoint of {ck['method']} of convention '{ck['convention']}', not one "
                              f"of this file's; use another --out.")
        cfg = C.resume_config(Config, ck, cfg, given, path, fixed=("sigma_d", "param", "second_time"))
    C.require_detector(cfg, env)  # --fallback false: a missing FID detector stops the run now, in one sentence
    data = C.load_data(cfg.data, cfg.root, env, cfg.seed, cfg.xflip)
    C.refuse_unused(given, data.kind, points=("width",), images=("xflip",))
    nd = net_dict(cfg, data)
    raw = C.build_net(nd).to(env.device)
    if ck:
        C.check_resume_net(ck["net"], nd, path)
        C.load_state_strict(raw, ck["model"])
    model = C.distribute(C.maybe_compile(raw, cfg.compile), env)
    ema = C.EMA(raw, decay=cfg.ema)
    opt_cls = torch.optim.RAdam if cfg.optim == "radam" else torch.optim.Adam
    opt = opt_cls(raw.parameters(), lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, foreach=True)
    if ck:
        C.load_state_strict(ema.model, ck["ema"])
        C.load_optimizer(opt, ck["opt"])  # moments from the checkpoint, lr and betas from this run's config
    gens = [data.gen] if data.gen is not None else []
    if ck:
        C.restore_rng(ck, env, gens)
    step = ck["step"] if ck else 0

    per_rank = cfg.batch // (env.world * cfg.accum)
    if per_rank * env.world * cfg.accum != cfg.batch or per_rank % cfg.M:
        raise C.UserError(f"--batch {cfg.batch} must split into {env.world} rank(s) x {cfg.accum} round(s) of a "
                          f"multiple of M = {cfg.M} (each micro-batch forms its own groups).")
    low = env.precision in ("bf16", "fp16")
    min_gap = cfg.min_gap if cfg.min_gap is not None else (1e-4 if low else 0.0)
    scaler = C.make_scaler(env, ck)  # (fp16; a resumed run's loss scale, checked before anything is printed)
    log = C.Logger(cfg.out, env, cfg.iters, cfg.batch, cfg, start_step=ck and step)
    if env.precision == "bf16":
        log.info("warning: bf16 is outside IMM's tested settings (nearby t and r collapse); min_gap "
                 f"{min_gap:g}; the paper's low-precision recipe is fp16 with --second_time t_minus_s --a 2.")
    log.info(f"{METHOD} | world {env.world} | global batch {cfg.batch} = {env.world} x {per_rank} x {cfg.accum} "
             f"({per_rank // cfg.M} groups of M = {cfg.M} per micro-batch) | device {env.device} | precision "
             f"{env.precision} | params {sum(p.numel() for p in raw.parameters()):,} | k {cfg.k} "
             f"(delta eta {delta_eta(cfg):.4g}) | min_gap {min_gap:g} | step {step}/{cfg.iters}")
    fid = C.FidHook(cfg.fid_detector, data, env, cfg.root, cfg.fid_n, log) if cfg.fid_every else None
    guard = C.Guard(env, cfg.max_skips, log, path, ck and step,  # skips non-finite steps, withholds bad checkpoints
                    probe=C.sample_probe(lambda n: generator(n, cfg, sample_shape(nd), 1, env), (raw, ema.model), env,
                                         data))

    def state():
        return dict(model=raw.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(),
                    scaler=scaler.state_dict(), step=step, config=dataclasses.asdict(cfg), net=nd, method=METHOD,
                    convention=CONVENTION)

    ddp = isinstance(model, nn.parallel.DistributedDataParallel)
    model.train()
    while step < cfg.iters:
        if cfg.lr_schedule == "cosine":
            for grp in opt.param_groups:
                grp["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * step / cfg.iters))
        opt.zero_grad(set_to_none=True)
        stats = torch.zeros(3, device=env.device)
        for rnd in range(cfg.accum):
            with model.no_sync() if ddp and rnd < cfg.accum - 1 else contextlib.nullcontext():
                # ---- ALGO LOGIC: one IMM step (Alg. 1; loss Eq. 12) --------------------------------------------------
                part, parts = rnd * env.world + env.rank, env.world * cfg.accum
                x, _ = data.batch(per_rank, step, part, parts)
                x, aug = C.augment_batch(x, cfg.augment, cfg.seed, step, part, parts)  # EDM's pipe (Table 5)
                eps = cfg.sigma_d * torch.randn_like(x)  # prior noise N(0, sigma_d^2 I), drawn before both passes
                s, r, t = sample_times(per_rank // cfg.M, cfg.M, cfg, min_gap, env.device)
                L, mmd, frac = imm_loss(model, raw, x, eps, s, r, t, cfg, env, aug)
                scaler.scale(L / cfg.accum).backward()
                # ---- end of ALGO LOGIC -------------------------------------------------------------------------------
            stats += torch.stack([L.detach(), mmd, frac]) / cfg.accum
        scaler.unscale_(opt)
        guard.step(opt, scaler)  # skipped (weights and Adam state unchanged) if a gradient is not finite
        scaler.update()
        ema.update(raw, step * cfg.batch, cfg.batch)
        guard.end_step(stats[0])
        step += 1
        if step % cfg.log_every == 0 or step == cfg.iters:
            log.log(step, loss=stats[0], mmd2=stats[1], r_eq_s=stats[2])
        if step % cfg.ckpt_every == 0 or step == cfg.iters:
            guard.checkpoint(step, step == cfg.iters, state, gens)
        if cfg.sample_every and step % cfg.sample_every == 0:  # rank 0 (a failure stops every rank: C.agree)
            C.agree(env, lambda: evaluate(ema.model, cfg, data, env, cfg.out, step))
        if fid and step % cfg.fid_every == 0:
            fid(step, {C.n_steps(N): generator(ema.model, cfg, sample_shape(ema.model.config), N, env)
                       for N in (1, 2)})
    if ck is None and cfg.iters == 0:
        guard.checkpoint(step, True, state, gens)
    def final():  # rank 0 (a failure stops every rank: C.agree, which every rank leaves after it)
        m = evaluate(ema.model, cfg, data, env, cfg.out, step)
        log.info("eval: " + " | ".join(f"{k} {v:.4g}" for k, v in m.items() if k != "step"))
    C.agree(env, final)
    log.info(clock())


# ============================================================================================================= commands
# sample and fid change only these Config fields over the checkpoint's (any other is refused)
SAMPLER_FIELDS = dict(  # the sampler's fields (Alg. 2 / Alg. 5, the grid), and the step counts that read them
    sampler=(lambda N: N > 1, "2 steps or more"),  # (N = 1: one restart step is the pushforward step)
    schedule=(lambda N: N > 2, "3 steps or more"), eta_mid=(lambda N: N == 2, "2 steps"))


def sample_or_fid(cmd, opts, given):
    env = C.setup(opts.device, opts.seed, opts.precision or "fp32")  # sample/fid: fp32, TF32 off
    ck = C.load_checkpoint(opts.ckpt)
    if ck["method"] != METHOD or ck["convention"] != CONVENTION:
        raise C.UserError(f"'{opts.ckpt}' is a checkpoint of {ck['method']} of convention '{ck['convention']}'; imm.py "
                          f"samples only its own.")
    cfg = C.merge_config(Config, ck["config"], given)
    net = C.build_net(ck["net"])
    C.load_state_strict(net, ck["ema" if opts.ema else "model"])
    net, shape = net.to(env.device).eval(), sample_shape(ck["net"])
    C.sample_or_fid(cmd, opts, env, cfg, ck, shape, lambda N: generator(net, cfg, shape, N, env),
                    lambda N: f"{C.n_steps(N)} ({cfg.sampler}" + ("" if N == 1 else f", eta_mid {cfg.eta_mid:g}" if
                                                                  N == 2 else f", {cfg.schedule} grid") + ")",
                    record=lambda N: dict(sampler=cfg.sampler))


def main(argv=None):
    cmd, cfg, given = C.parse_cli(Config, PRESETS, METHOD, argv, sampler=SAMPLER_FIELDS)
    C.preflight(cmd, cfg)
    train(cfg, given) if cmd == "train" else sample_or_fid(cmd, cfg, given)


if __name__ == "__main__":
    C.main_guard(main)
