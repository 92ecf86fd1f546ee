"""Training and sampling throughput of each method on a `common.py` network .

Measures, for one method's training step on one device:
  * training images/s: one training step per iteration (the method's loss, backward and optimiser step, the step
    through common.Guard as the training loops take it) on a batch already on the device (no data loading), timed
    with CUDA events on GPU and wall clock on CPU, warm-up excluded; and the optimiser step alone, plain and through
    the Guard (`opt_step_ms`, `guard_step_ms`: on CUDA the Guard's put-back of a skipped step costs the difference);
  * its cost relative to a flow-matching step: the count of network passes in the method's step (`fwd_per_step`,
    "cost vs fm, counted") beside the measured ratio fm img/s / method img/s ("cost vs fm, measured") when the
    results file holds an `fm` record of the same device, torch, net, batch, precision and compile setting
    (`--save` recomputes it for every record);
  * model FLOPs: the forward FLOPs of one image counted with torch.utils.flop_counter.FlopCounterMode
    (a multiply-add counts as 2 FLOPs; convolutions and matmuls only), training ~ 3x forward x fwd_per_step;
    achieved TFLOP/s = train FLOPs/img x img/s, and its fraction of the device's dense peak;
  * sampling images/s: the method's own sampler under no_grad in eval mode at 1 and 2 network evaluations.

Usage
    python benchmarks/throughput.py --quick                              # CPU smoke check, < 1 min
    python benchmarks/throughput.py --precision bf16 --compile --save   # one GPU record
    python benchmarks/throughput.py --method lsd --precision paper --save
    python benchmarks/throughput.py --net tiny --batch 8 --iters 3 --warmup 1 --device cpu --method gdd_i

`--save` merges the record into benchmarks/results/throughput.json (one record per device, torch version,
method, net, batch, sampling batch, precision and compile setting; a re-run replaces its old record) and rewrites
benchmarks/results/throughput.md. That folder holds real GPU measurements only, so `--save` refuses CPU
and `--quick` runs unless `--results DIR` names another folder.

Methods register in METHODS as a `Method(step, sample, ...)`: `step(net, x)` returns the scalar training loss of
one batch x (the harness does backward, the optimiser step and the timing), `sample(net, z, k)` turns noise into
images with k network evaluations, `net` holds the network overrides of the method's `cifar10` preset (what the
file's net_dict builds: time inputs, time_scale, ADN, time channels, dropout), `fwd_per_step` the cost of one
training step in flow-matching steps, counted from the method's algorithm (a forward without backward counts
1/3), `precision` what `--precision paper` selects. Each step imports its method file and calls its own functions,
so the timed code is the training loop's; teachers, discriminators and weight heads are built once by `prepare`.
Left out for every method alike: data loading, EMA, gradient clipping, learning-rate schedules and DDP.

  method     code path (the file's own functions)                      paper precision (--precision paper)
  fm         1-RF flow-matching loss (rectified_flow.py cifar10 1rf)   tf32 (the rectified_flow.py cifar10 preset)
  2rf        rectified_flow 2rf: sample_t (U-shaped), per_sample_loss  tf32 as rfpp; t, H and the loss fp32 in code
             with the pseudo-Huber loss; the pair batch (z, x) is randn  (docs/rectified_flow.md)
             and the batch (the teacher's pairs cost nothing per step)
  2rf_lpips  as 2rf with the preset's LPIPS-Huber-1/t loss. LPIPS has   tf32; LPIPS never under autocast (rfpp)
             seeded random VGG16 weights: the same layers at the same resolution (--lpips_res, 224 as rfpp), hence the
             same cost as the pretrained network; the loss value means nothing
  imm        imm.imm_loss, online pass + no-grad target pass            tf32 (IMM App. I.6); U-Net time path fp64
  sct, scd   scm.cm_step_loss: fp32 JVP pass, then the gradient pass;   fp32, TF32 off (scm.py cifar10 preset, as
             sCD's teacher is a frozen copy of the initial weights      FastGen); JVP pass and loss fp32 in code
  lsd, psd,  flow_map.sample_times + per_sample_loss: JVPs of the bare  lsd, psd, lmd fp32 (Boffi trains fp32);
  meanflow,  module, the diagonal and PSD terms through the network    meanflow tf32 (py-meanflow: no autocast, TF32
  lmd        as given (compiled with --compile), as flow_map.train;    matmuls and convolutions, JVP included; the
             learned weight head as the preset; lmd's 1-RF teacher: a   flow_map.py cifar10 preset); in code every JVP
             frozen net built like rectified_flow.py's cifar10 1rf      block is fp32 (TF32 only in a tf32 run), only
             net, through rf_velocity                                   the diagonal and PSD terms take bf16 autocast
  gdd,       distributional.g_step + d_step (+ r1_step every 16th       bf16 G as GDD's --fp16 (docs/distributional.md),
  gdd_i      step, as the loop) with the `teacher` D; G =               and the D's encoder; D heads, losses and R1
             make_generator(net, freeze), gdd_i freezing as `frozen`    fp32 (GDD's D is fp32 with TF32 off)
"""
import argparse, contextlib, dataclasses, datetime, json, math, os, subprocess, sys, time, types
from typing import Callable, Optional, Union

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for common.py

import torch
from torch.utils.flop_counter import FlopCounterMode

import common

RESULTS = os.path.join(HERE, "results")
CPU_RESULTS = "/tmp/throughput"  # where the fm hint saves a CPU or --quick record (RESULTS refuses those)


# ==================================================================================== methods
@dataclasses.dataclass
class Method:
    step: Callable  # step(net, x) -> scalar loss (fp32); under the harness's autocast unless autocast=False
    sample: Callable  # sample(net, z, steps) -> images; called under no_grad, eval mode, autocast
    net: dict = dataclasses.field(default_factory=dict)  # net_config overrides: the cifar10 preset's network
    # training FLOPs = 3 * fwd_per_step * forward FLOPs: the cost of one step in flow-matching steps (network
    # forward+backward passes, a forward without backward counting 1/3), counted from the method's algorithm. A callable
    # fwd_per_step(fwd_flops, state) serves costs that depend on the network (an auxiliary net of fixed size).
    fwd_per_step: Union[float, Callable] = 1.0
    precision: str = "bf16"  # what `--precision paper` selects: the trained network's precision in the paper
    autocast: bool = True  # False: the method's code sets each block's precision itself, as its training loop
    prepare: Optional[Callable] = None  # prepare(net, env, args) -> state dict, before compile and optimiser:
    # teachers, discriminators, weight heads, configs; "net" replaces the trained network, "params" joins Adam
    own_update: bool = False  # True: step() runs its own backward passes and optimiser steps (GANs)


_ENV = {}  # the running measurement: env (imm.py's f_map applies autocast itself), args, prepare()'s state


class _Noise:
    """The `rng` argument of the methods' own samplers (common.IndexRNG's interface): the harness's noise z on
    the first draw, plain batched randn after it (re-noising). Per-index generators would time the noise
    generation, not the network."""

    def __init__(self, z):
        self.z, self.device, self.gens = z, z.device, range(len(z))

    def randn(self, *shape):
        z, self.z = self.z, None
        return z if z is not None and tuple(z.shape) == shape else torch.randn(shape, device=self.device)


def _images(net=None):
    """The fields of a common.load_data result that the methods' net_dict / resolve / build_disc read: unlabelled
    images of the network's shape."""
    c = net.config if net is not None else None
    shape = (c["in_channels"], c["img_resolution"], c["img_resolution"]) if c else None
    return types.SimpleNamespace(kind="images", shape=shape, num_classes=0)


def fm_step(net, x):
    """Flow matching / 1-rectified flow: x_t = (1-t) x + t z, target v = z - x, MSE (t=1 noise)."""
    z = torch.randn_like(x)
    t = torch.rand(x.shape[0], device=x.device)
    tb = t[:, None, None, None]
    v = net((1 - tb) * x + tb * z, t)
    return (v.float() - (z - x).float()).square().mean()


def euler_sample(net, z, steps):
    """Euler from t=1 (noise) to t=0 (data) on a uniform grid: x <- x - (t_i - t_{i+1}) v(x, t_i)."""
    x, ts = z, torch.linspace(1.0, 0.0, steps + 1, device=z.device)
    for i in range(steps):
        x = x - (ts[i] - ts[i + 1]) * net(x, ts[i].expand(x.shape[0])).to(x.dtype)
    return x


# ---------------------------------------------------------------------------------- rectified_flow.py: 2-RF++
def rf2_prepare(loss):
    """The `cifar10` preset's 2rf stage with `loss`; LPIPS with seeded random VGG16 weights (its cost is that of
    the pretrained one: same layers, same resolution) and the preset's pseudo-Huber c = 0.00054 d (rfpp train.py)."""
    def prepare(net, env, args):
        import rectified_flow as RF
        cfg = common.resolve_config(RF.Config, RF.PRESETS, "cifar10",
                                    dict(loss=loss, lpips_weights="random", lpips_res=args.lpips_res), stage="2rf")
        d = math.prod(_images(net=net).shape)
        state = dict(cfg=cfg, c=cfg.huber_c if cfg.huber_c is not None else 0.00054 * d, lpips=None)
        if loss.startswith("lpips"):
            state["lpips"] = lp = RF.LPIPS(cfg.lpips_weights, cfg.lpips_res).to(env.device)
            with FlopCounterMode(display=False) as fc, torch.no_grad():
                lp.taps(torch.zeros(1, *_images(net=net).shape, device=env.device))
            state["lpips_flops"] = int(fc.get_total_flops())  # one VGG16 forward at lpips_res, one image
        return state
    return prepare


def rf2_step(net, x):
    """2-RF++ (rectified_flow.py loss_fn, 2rf stage): a pair batch (z, x) (the teacher's pairs cost nothing
    per step; randn and the data batch stand in), U-shaped t (2-RF++ §4.1), the U-Net under autocast, then the loss
    (2-RF++ §4.2) in fp32 (LPIPS never under autocast)."""
    import rectified_flow as RF
    st, env = _ENV["state"], _ENV["env"]
    z = torch.randn_like(x)
    t = RF.sample_t(len(x), st["cfg"], x.device)
    x_t = RF.interpolate(x, z, t)
    with common.autocast(env):
        v = net(x_t, t)
    return RF.per_sample_loss(v, x, z, x_t, t, st["cfg"].loss, st["c"], st["lpips"]).mean()


def rf2_sample(net, z, steps):
    """rectified_flow.sampler for the 2rf stage: Euler on the uniform grid with rfpp's new update rule (Fig. 4)."""
    import rectified_flow as RF
    return RF.sampler(net, _ENV["state"]["cfg"], tuple(z.shape[1:]), steps, _ENV["env"])(_Noise(z), None)


# ------------------------------------------------------------------------------------------------- imm.py
def imm_step(net, x):
    """IMM (imm.py, cifar10 preset maths): x_t and x_r from one noise, online pass with gradient, target pass
    with the same weights under no_grad, grouped Laplace-kernel MMD (M = 4, k = 15)."""
    import imm
    cfg, env = imm.Config(k=15), _ENV["env"]
    eps = cfg.sigma_d * torch.randn_like(x)
    s, r, t = imm.sample_times(x.shape[0] // cfg.M, cfg.M, cfg, 0.0, x.device)
    return imm.imm_loss(net, common.unwrap(net), x, eps, s, r, t, cfg, env)[0]


def imm_sample(net, z, steps):
    """IMM pushforward on the 1-step / 2-step (eta = 1.4) grids: one network evaluation per step."""
    import imm
    cfg, x = imm.Config(), 0.5 * z
    grid = imm.time_steps(steps, cfg)
    for t, t_prev in zip(grid[:-1], grid[1:]):
        full = lambda v: torch.full((x.shape[0],), v, device=x.device)
        x = imm.f_map(net, x, full(t_prev), full(t), cfg, _ENV["env"]).float()
    return x


# ------------------------------------------------------------------------------------------------- scm.py
def scm_step(net, x, distil=False):
    """sCT / sCD (scm.py, cifar10 maths): fp32 JVP pass on the unwrapped network (dropout mask replayed), then the
    bf16 gradient pass; sCD adds a frozen teacher forward (a copy of the initial weights stands in for it)."""
    import copy, scm
    cfg, env, raw = scm.Config(weighting="none"), _ENV["env"], common.unwrap(net)
    teacher = _ENV.setdefault("teacher", copy.deepcopy(raw).eval().requires_grad_(False)) if distil else None
    z = cfg.sigma_d * torch.randn_like(x)
    t = scm.sample_t(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_d, x.device)
    return scm.cm_step_loss(scm.Student(net), raw, teacher, x, z, t, 1.0, cfg, env)[0]


def scm_sample(net, z, steps):
    """sCM multistep sampler: f at t_max = arctan(80/0.5), then re-noised to t = 1.1 (2 steps)."""
    import scm
    cfg, x = scm.Config(), None
    for k, tk in enumerate(scm.cm_times(steps, cfg)):
        x_t = cfg.sigma_d * z if k == 0 else math.cos(tk) * x + math.sin(tk) * cfg.sigma_d * z
        x = scm.consistency_fn(net, x_t, torch.full((z.shape[0],), tk, device=z.device), cfg.sigma_d).float()
    return x


# ------------------------------------------------------------------------------------------- flow_map.py
def flow_map_prepare(mode):
    """The `cifar10` preset of flow_map.py for `mode`, resolved by the module (sigma0 0.5, or 1 for meanflow and the
    teacher's 1 for lmd; diagonal share 0.75, or 0.25 for lmd), the learned weight head where the preset has it,
    and for lmd a frozen 1-RF teacher: a network built like rectified_flow.py's cifar10 1rf net (one time input,
    time_scale 1000, eval mode) with this run's random weights, seen through flow_map.rf_velocity."""
    def prepare(net, env, args):
        import flow_map as FM
        cfg = common.resolve_config(FM.Config, FM.PRESETS, "cifar10",
                                    dict(mode=mode, **(dict(teacher="(stand-in)") if mode == "lmd" else {})))
        state = dict(cfg=cfg, teacher_b=None, head=None, params=[])
        teacher_std = None
        if mode == "lmd":
            import rectified_flow as RF
            rf_cfg = common.resolve_config(RF.Config, RF.PRESETS, "cifar10", dict(net=args.net), stage="1rf")
            teacher = common.build_net(RF.net_dict(rf_cfg, _images(net=net))).to(env.device)
            teacher.eval().requires_grad_(False)
            state["teacher_b"], teacher_std = FM.rf_velocity(lambda y, tau: teacher(y, tau)), rf_cfg.noise_std
        FM.resolve(cfg, _images(), teacher_std)
        FM.jvp_safe(net)  # as flow_map.train (a no-op for the U-Nets' GroupNorm)
        if cfg.learned_weight:
            state["head"] = common.WeightHead(num_times=2, channels=128).to(env.device)
            state["params"] = list(state["head"].parameters())
        return state
    return prepare


def flow_map_step(net, x):
    """One flow_map.py loss (its training loop): data x1 at t = 1, noise x0 = sigma0 eps, (s, t) from sample_times,
    per_sample_loss with the JVPs on the bare module and the diagonal and PSD terms through `net` (compiled with
    --compile), as flow_map.train passes them (the diagonal term under autocast, every JVP block, the teacher and the
    weighting in fp32), L = mean."""
    import flow_map as FM
    st, env = _ENV["state"], _ENV["env"]
    cfg = st["cfg"]
    x0 = cfg.sigma0 * torch.randn_like(x)
    s, t, nd = FM.sample_times(len(x), cfg, x.device)
    return FM.per_sample_loss(common.unwrap(net), st["head"], st["teacher_b"], x0, x, s, t, nd, cfg, env,
                              fast=net)[0].mean()


def flow_map_sample(net, z, steps):
    """flow_map.sample: x_0 = sigma0 z, `steps` jumps X(t_k, t_{k+1}) on t_k = k / steps."""
    import flow_map as FM
    return FM.sample(net, _Noise(z), tuple(z.shape[1:]), steps, _ENV["state"]["cfg"], _ENV["env"])


# ---------------------------------------------------------------------------------------- distributional.py
def gdd_prepare(freeze):
    """The `cifar10` preset of distributional.py: the benchmark's network stands in for the 1-RF teacher's EMA weights
    (dropout 0, as load_teacher builds it), G = make_generator(teacher, freeze) (gdd_i freezes what `frozen` names), the
    `teacher` discriminator from build_disc (frozen encoder copy + SN heads), and Adam for G and for D with the lazy-R1
    correction (StyleGAN2 §3.1, d_adam_hparams), as distributional.train builds them."""
    def prepare(net, env, args):
        import distributional as GD
        cfg = common.resolve_config(GD.Config, GD.PRESETS, "cifar10",  # (a 1-RF teacher, not the preset's EDM pickle)
                                    dict(freeze=freeze, disc="teacher", teacher="(stand-in)"))
        teacher = net.eval().requires_grad_(False)
        gen = GD.make_generator(teacher, cfg.freeze).to(env.device)
        D = GD.build_disc(cfg, _images(net=net), teacher, env, None).to(env.device).train()
        g_params = [p for p in gen.parameters() if p.requires_grad]
        d_params = [p for p in D.parameters() if p.requires_grad]
        lr_d, betas_d = GD.d_adam_hparams(cfg.lr_d, cfg.r1_interval)
        return dict(net=gen, cfg=cfg, D=D, g_params=g_params, d_params=d_params, t_g=GD.t_g_of({}),
                    opt_g=torch.optim.Adam(g_params, lr=cfg.lr_g, betas=(0.0, 0.99), eps=1e-8),
                    opt_d=torch.optim.Adam(d_params, lr=lr_d, betas=betas_d, eps=1e-8),
                    gamma=cfg.r1_gamma if cfg.r1_gamma is not None else GD.R1_DEFAULT[cfg.disc],
                    # the loop's R1 runs at steps r, 2r, ...; counting from r puts the first one (and its cuDNN
                    # autotuning) in the untimed warm-up, and every r-th timed step has one, as in training
                    step=cfg.r1_interval)
    return prepare


def gdd_step(net, x):
    """One iteration of distributional.train: g_step (G forward in autocast, D in fp32, G's Adam), d_step (a G
    forward under no_grad, D on real and fake, D's Adam) and, every r = 16 steps, r1_step (the lazy R1 double
    backward). Returns L_G + L_D (both must be finite); the EMA update is left out, as for every method here."""
    import distributional as GD
    st, env = _ENV["state"], _ENV["env"]
    cfg, D, amp = st["cfg"], st["D"], lambda: common.autocast(env)
    L_G = GD.g_step(net, D, st["d_params"], st["g_params"], st["opt_g"], x, None, st["t_g"], cfg.loss, env, amp)
    L_D = GD.d_step(net, D, st["d_params"], st["opt_d"], x, None, st["t_g"], cfg.loss, env, amp)[0]
    if st["step"] % cfg.r1_interval == 0 and st["step"] > 0 and st["gamma"] > 0:
        GD.r1_step(D, st["d_params"], st["opt_d"], x, None, st["gamma"], cfg.r1_interval, env)
    st["step"] += 1
    return L_G + L_D


def gdd_sample(net, z, steps):
    """distributional.sample: K = 1 is G(z) = z - v(z, t_g); K = 2 re-noises the estimate and predicts again."""
    import distributional as GD
    return GD.sample(net, _Noise(z), tuple(z.shape[1:]), steps, _ENV["state"]["t_g"])


# The network overrides are each file's net_dict for its `cifar10` preset (tests/test_benchmarks.py checks them).
# Cost unit: one forward of the network; a flow-matching step (forward + backward) is 3 units, fwd_per_step = units / 3.
_FLOW_MAP_NET = dict(num_times=2, time_scale=1.0, time_channels=256, dropout=0.13)
METHODS = {
    # 1-RF / flow matching, rectified_flow.py cifar10 1rf: 1 by definition.
    "fm": Method(step=fm_step, sample=euler_sample, net=dict(time_scale=1000.0, dropout=0.13), precision="tf32"),
    # 2-RF++ with the pseudo-Huber loss: the U-Net's forward+backward only, 1.0x (as with l2). TF32 as rfpp (its
    # train script); t, H and LPIPS in fp32 whatever --precision says (rfpp).
    "2rf": Method(step=rf2_step, sample=rf2_sample, net=dict(time_scale=1000.0, dropout=0.13), precision="tf32",
                  autocast=False, prepare=rf2_prepare("huber")),
    # 2-RF++ with LPIPS-Huber-1/t (the cifar10 preset's loss): per image 3 U-Net units plus VGG16 forward on the
    # target and forward + backward-to-input on x^ = 3 VGG forwards, i.e. 1 + F_vgg / F_unet with F_vgg counted at
    # --lpips_res (rf2_prepare counts F_vgg).
    "2rf_lpips": Method(step=rf2_step, sample=rf2_sample, net=dict(time_scale=1000.0, dropout=0.13),
                        fwd_per_step=lambda fwd, st: 1 + st["lpips_flops"] / fwd, precision="tf32", autocast=False,
                        prepare=rf2_prepare("lpips-huber-1/t")),
    # IMM: one forward+backward plus one forward without backward (the target pass) = 4/3.
    # TF32 (IMM App. I.6); the network's time path in fp64 (lumalabs/imm unets.py), the kernel fp32 in imm.py.
    "imm": Method(step=imm_step, sample=imm_sample,  # EDM's augmentation labels (augment_dim 9), IMM Table 5
                  net=dict(num_times=2, time_scale=1000.0, dropout=0.2, augment_dim=9, time_fp64=True),
                  fwd_per_step=4 / 3, precision="tf32"),
    # sCM: the JVP pass (primal + tangent, no backward) counts 2/3, the gradient pass 1; sCD adds a teacher
    # forward (1/3): 5/3 ~ 1.7x and 2x a flow-matching step by this count; the measured img/s tells.
    # fp32 with TF32 off (scm.py cifar10 preset, as NVlabs/FastGen's sCT/sCD CIFAR-10 configs; docs/scm.md); the
    # JVP pass and loss are fp32 whatever the flag.
    "sct": Method(step=scm_step, sample=scm_sample, net=dict(adn=True, dropout=0.2), fwd_per_step=5 / 3,
                  precision="fp32"),
    "scd": Method(step=lambda net, x: scm_step(net, x, distil=True), sample=scm_sample, net=dict(adn=True),
                  fwd_per_step=2.0, precision="fp32"),
    # Flow maps, cost per step (per row: FM 3 units; LSD off-diagonal
    # ~9 = JVP 2-3 + its backward 4-6 + target forward 1; PSD off-diagonal 5; MeanFlow 6 on every row):
    # lsd (0.75 * 3 + 0.25 * 9) / 3 = 1.5; psd (0.75 * 3 + 0.25 * 5) / 3 ~ 1.2; meanflow 6 / 3 = 2.0; lmd "as lsd
    # plus a teacher forward" with 75% off-diagonal rows ~ 2.5.
    # Precision: Boffi trains in fp32; py-meanflow in fp32 with TF32 matmuls and convolutions, JVP included
    # (docs/flow_map.md); flow_map.py runs every JVP block without autocast (TF32 only in a tf32 run), bf16 only on the
    # diagonal and PSD terms.
    "lsd": Method(step=flow_map_step, sample=flow_map_sample, net=_FLOW_MAP_NET, fwd_per_step=1.5, precision="fp32",
                  autocast=False, prepare=flow_map_prepare("lsd")),
    "psd": Method(step=flow_map_step, sample=flow_map_sample, net=_FLOW_MAP_NET, fwd_per_step=1.2, precision="fp32",
                  autocast=False, prepare=flow_map_prepare("psd")),
    "meanflow": Method(step=flow_map_step, sample=flow_map_sample,  # py-meanflow's v0 network, augment_dim 6
                       net={**_FLOW_MAP_NET, "dropout": 0.2, "augment_dim": 6, "time_combine": "concat",
                            "resample_filter": [1, 3, 3, 1], "qkv_order": "blocks"},
                       fwd_per_step=2.0, precision="tf32", autocast=False, prepare=flow_map_prepare("meanflow")),
    "lmd": Method(step=flow_map_step, sample=flow_map_sample, net=_FLOW_MAP_NET, fwd_per_step=2.5, precision="fp32",
                  autocast=False, prepare=flow_map_prepare("lmd")),
    # GDD / GDD-I with the `teacher` D, cost (F = one generator forward; FM = 3F):
    # G step 4F / 3.2F (GDD-I's frozen convs need no weight gradients) + D step ~1.4F (G forward under no_grad 1F,
    # encoder ~0.32F per pass, lazy R1 amortised) = 5.4F / 4.6F, i.e. 1.8x / ~1.5x a flow-matching step.
    # Precision: G and the teacher D's encoder in bf16 (G as GDD's --fp16); D heads, losses and R1 in fp32.
    "gdd": Method(step=gdd_step, sample=gdd_sample, net=dict(time_scale=1000.0), fwd_per_step=5.4 / 3,
                  autocast=False, prepare=gdd_prepare("none"), own_update=True),
    "gdd_i": Method(step=gdd_step, sample=gdd_sample, net=dict(time_scale=1000.0), fwd_per_step=4.6 / 3,
                    autocast=False, prepare=gdd_prepare("gdd_i"), own_update=True),
}

# Dense peak TFLOP/s by device-name fragment and precision (NVIDIA data sheets, without sparsity).
PEAKS = [
    ("H100 PCIe", dict(bf16=756.0, tf32=378.0, fp32=51.0)),
    ("H100 NVL", dict(bf16=835.0, tf32=418.0, fp32=60.0)),
    ("H100", dict(bf16=989.0, tf32=494.0, fp32=67.0)),  # SXM ("NVIDIA H100 80GB HBM3")
    ("H200 NVL", dict(bf16=835.0, tf32=418.0, fp32=60.0)),  # (the first fragment in a device's name wins)
    ("H200", dict(bf16=989.0, tf32=494.0, fp32=67.0)),  # SXM
]


def default_peak(device_name, precision):
    for frag, peaks in PEAKS:
        if frag in device_name:
            return peaks[precision]
    return None


# ==================================================================================== measurement
def forward_flops(net, img_shape, device, num_times=1):
    """FlopCounterMode count of one forward of one image (B=1), in FLOPs (multiply-add = 2)."""
    x = torch.zeros(1, *img_shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    s = t if num_times == 2 else None
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, t, s) if s is not None else net(x, t)
    return int(fc.get_total_flops())


class Timer:
    """CUDA events on GPU (after a synchronise), perf_counter on CPU; seconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.seconds = self.a.elapsed_time(self.b) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def _onoff(s):
    v = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}
    if s.lower() not in v:
        raise argparse.ArgumentTypeError(f"expected on/off, got '{s}'")
    return v[s.lower()]


def parse(argv=None):
    p = common.Parser(description=__doc__.split("\n")[0])  # argparse's errors as one `error:` sentence
    p.add_argument("--method", default="fm", metavar="|".join(METHODS), help="the training step to time (default fm)")
    p.add_argument("--net", default=None, help="common.net_config name (default ddpmpp; tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 128; 8 with --quick)")
    p.add_argument("--sample_batch", type=int, default=None, help="sampling batch (default: --batch)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 50; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10; 1 with --quick)")
    p.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16", "paper"],
                   help="default: bf16 on CUDA, fp32 on CPU; paper: the method's paper precision (see the docstring)")
    p.add_argument("--compile", default=False, nargs="?", const=True, type=_onoff,
                   help="torch.compile the network (--compile, or --compile on|off)")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak for the utilisation fraction (default: the device's dense peak, H100/H200 known)")
    p.add_argument("--lpips_res", type=int, default=None,
                   help="LPIPS input resolution of 2rf_lpips (default 224 as rfpp's cifar10; 32 with --quick)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="CPU-sized smoke check: tiny net, batch 8, 3 iterations, LPIPS at 32x32")
    p.add_argument("--save", action="store_true", help="merge the record into --results")
    p.add_argument("--results", default=None, help=f"results folder (default {os.path.relpath(RESULTS)})")
    a = p.parse_args(argv)
    q = a.quick
    for k, full, quick in [("net", "ddpmpp", "tiny"), ("batch", 128, 8), ("iters", 50, 3), ("warmup", 10, 1),
                           ("lpips_res", 224, 32)]:
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.sample_batch = a.batch if a.sample_batch is None else a.sample_batch
    if a.method not in METHODS:
        raise common.UserError(f"unknown --method '{a.method}'; choose one of {', '.join(METHODS)}.")
    if min(a.batch, a.sample_batch, a.iters, a.lpips_res) < 1 or a.warmup < 0:
        raise common.UserError("--batch, --sample_batch, --iters and --lpips_res must be >= 1 and --warmup >= 0.")
    if not (math.isfinite(a.lr) and a.lr > 0) or (a.peak_tflops is not None and not (math.isfinite(a.peak_tflops)
                                                                                       and a.peak_tflops > 0)):
        raise common.UserError("--lr and --peak_tflops must be positive, finite numbers.")
    common.check_value("seed", int, a.seed)
    if a.save:
        common.check_dir(a.results or RESULTS, "--results")
    elif a.results and os.path.exists(a.results) and not os.path.isdir(a.results):  # (read for the fm record)
        raise common.UserError(f"--results '{a.results}' is a file, not a folder.")
    return a


def build(a):
    """One configuration ready to time (what measure() times; benchmarks/gpu_check.py reuses it): the precision
    flags and seed (common.setup), the method's network with its `cifar10` overrides, prepare()'s state, the FLOP
    counts, the network compiled when a.compile, the optimiser, a data batch already on the device and
    train_step() (one loss, backward and optimiser step). The method's functions read _ENV, set here."""
    meth = METHODS[a.method]
    env = common.setup(a.device, a.seed, meth.precision if a.precision == "paper" else a.precision)
    dev = env.device
    _ENV.clear()
    _ENV.update(env=env, args=a, state={})
    cfg = common.net_config(a.net, **meth.net)
    if cfg["kind"] != "unet":
        raise common.UserError(f"--net {a.net} is not an image network; use ddpmpp, small or tiny.")
    R, C = cfg["img_resolution"], cfg["in_channels"]
    net = common.build_net(cfg).to(dev)
    state = _ENV["state"] = meth.prepare(net, env, a) if meth.prepare else {}
    net = state.get("net", net)
    fwd = forward_flops(net, (C, R, R), dev, cfg["num_times"])
    fwd_per_step = meth.fwd_per_step(fwd, state) if callable(meth.fwd_per_step) else meth.fwd_per_step

    model = common.maybe_compile(net, a.compile)
    opt = None if meth.own_update else torch.optim.Adam([*net.parameters(), *state.get("params", [])], lr=a.lr)
    # the optimiser steps through common.Guard as in the training loops (on CUDA: skipped steps put back on the device)
    guard = common.Guard(env, 2 ** 62, types.SimpleNamespace(), None) if opt is not None else None
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    x = torch.rand(a.batch, C, R, R, device=dev, generator=gen) * 2 - 1  # data already on the device

    def loss_of():
        with common.autocast(env) if meth.autocast else contextlib.nullcontext():
            return meth.step(model, x)

    def train_step():
        loss = loss_of()
        if opt is not None:
            loss.backward()
            guard.step(opt)
            guard.end_step(loss)
            opt.zero_grad(set_to_none=True)
        return loss

    return types.SimpleNamespace(
        meth=meth, env=env, device=dev, net=net, model=model, state=state, opt=opt, guard=guard, gen=gen, x=x,
        shape=(C, R, R), n_params=sum(p.numel() for p in net.parameters()), fwd=fwd, fwd_per_step=fwd_per_step,
        train_flops=int(round(3 * fwd_per_step * fwd)),  # forward + backward (~2x forward)
        loss_of=loss_of, train_step=train_step)


def timed(fn, iters, dev, seconds=None):
    """-> (calls, seconds, the last call's result) of `iters` timed calls of fn. With `seconds`: about that long
    instead, at least 3 and at most `iters` calls, the count set by 2 timed calls (counted in the result)."""
    if seconds is None:
        with Timer(dev) as t:
            for _ in range(iters):
                out = fn()
        return iters, t.seconds, out
    with Timer(dev) as t0:
        for _ in range(2):
            out = fn()
    n = int(min(max(3, iters) - 2, max(1, round(seconds / (t0.seconds / 2)) - 2)))
    with Timer(dev) as t1:
        for _ in range(n):
            out = fn()
    return n + 2, t0.seconds + t1.seconds, out


def measure(a, seconds=None):
    """Run one configuration; return its record (a flat JSON-able dict). `seconds`: time about that long per
    phase (training; sampling at 1 and at 2 steps each take a third of it) instead of a.iters calls, a.iters
    being the cap (the record's iters is the count that ran)."""
    b = build(a)
    meth, env, dev, model, state = b.meth, b.env, b.device, b.model, b.state
    C, R, _ = b.shape
    fwd, fwd_per_step, train_flops = b.fwd, b.fwd_per_step, b.train_flops

    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with Timer(dev) as tw:
        for _ in range(a.warmup):
            b.train_step()
    iters, train_s, loss = timed(b.train_step, a.iters, dev, seconds)
    if not math.isfinite(loss.item()):
        raise common.UserError(f"the training loss became {loss.item()} during the benchmark.")
    train_ips = iters * a.batch / train_s
    mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None
    step_ms = {}  # the optimiser step alone on one backward's gradients: plain, and through the Guard
    if b.opt is not None:
        b.loss_of().backward()
        for k, fn in (("opt", b.opt.step), ("guard", lambda: b.guard.step(b.opt))):
            fn()
            n, sec, _ = timed(fn, max(3, min(a.iters, 10)), dev)
            step_ms[k] = 1e3 * sec / n
        b.opt.zero_grad(set_to_none=True)

    model.eval()
    z = torch.randn(a.sample_batch, C, R, R, device=dev, generator=b.gen)
    sample_ips = {}
    with torch.no_grad(), common.autocast(env):
        for k in (1, 2):
            for _ in range(a.warmup):
                meth.sample(model, z, k)
            n, sec, _ = timed(lambda: meth.sample(model, z, k), a.iters, dev, seconds and seconds / 3)
            sample_ips[k] = n * a.sample_batch / sec

    name = device_name(dev)
    peak = a.peak_tflops if a.peak_tflops else default_peak(name, env.precision) if dev.type == "cuda" else None
    tflops = train_flops * train_ips / 1e12
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=dev.type, device_name=name, torch=torch.__version__,
        cuda=torch.version.cuda if dev.type == "cuda" else None, commit=_git_commit(),
        method=a.method, net=a.net, params=b.n_params, resolution=R,
        batch=a.batch, sample_batch=a.sample_batch, precision=env.precision, compile=bool(a.compile),
        iters=iters, warmup=a.warmup, paper_precision=meth.precision,
        lpips_res=a.lpips_res if state.get("lpips") is not None else None,
        fwd_flops_per_img=fwd, train_flops_per_img=train_flops, fwd_per_step=fwd_per_step, vs_fm=None,
        train_img_per_s=train_ips, train_tflops=tflops, peak_tflops=peak,
        peak_fraction=tflops / peak if peak else None,
        sample_img_per_s_1step=sample_ips[1], sample_img_per_s_2step=sample_ips[2],
        warmup_s=tw.seconds, max_mem_gib=mem, final_loss=loss.item(),
        opt_step_ms=step_ms.get("opt"), guard_step_ms=step_ms.get("guard"),
    )


def device_name(dev):
    """The record's device name: the GPU's name, or the CPU with its core and thread counts."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    n = torch.get_num_threads()
    return f"CPU ({os.cpu_count()} cores, {n} thread{'s' * (n != 1)})"


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ==================================================================================== output
KEY = ("device_name", "torch", "method", "net", "batch", "sample_batch", "precision", "compile")
COLUMNS = [  # (header, record key, format)
    ("device", "device_name", "{}"), ("torch", "torch", "{}"), ("method", "method", "{}"), ("net", "net", "{}"),
    ("batch", "batch", "{}"), ("precision", "precision", "{}"), ("compile", "compile", "{}"),
    ("train img/s", "train_img_per_s", "{:,.0f}"),
    ("cost vs fm, counted", "fwd_per_step", "{:.2f}"), ("cost vs fm, measured", "vs_fm", "{:.2f}"),
    ("GFLOP/img fwd", "fwd_flops_per_img", "gflop"),
    ("TFLOP/s", "train_tflops", "{:.3g}"), ("of peak", "peak_fraction", "{:.1%}"),
    ("sample img/s 1 step", "sample_img_per_s_1step", "{:,.0f}"),
    ("sample img/s 2 steps", "sample_img_per_s_2step", "{:,.0f}"),
    ("mem GiB", "max_mem_gib", "{:.1f}"), ("date", "date", "{}"),
]


# The flow-matching record a method's measured cost is divided by: same device, torch, net, batch, precision and
# compile setting (the sampling batch does not enter the training time; the latest such record wins).
REF_KEY = ("device_name", "torch", "net", "batch", "precision", "compile")


def fm_reference(rec, recs):
    """The latest `fm` record of `recs` with rec's REF_KEY, or None."""
    same = [r for r in recs if r.get("method") == "fm" and all(r.get(k) == rec.get(k) for k in REF_KEY)]
    return max(same, key=lambda r: r.get("date") or "") if same else None


def cost_vs_fm(rec, recs):
    """Measured cost of one training image relative to flow matching: fm img/s / this method's img/s (time per
    image, so 2.0 = half the throughput), or None without a matching fm record. An fm record is its own 1.0."""
    ref = rec if rec.get("method") == "fm" else fm_reference(rec, recs)
    return ref["train_img_per_s"] / rec["train_img_per_s"] if ref and rec.get("train_img_per_s") else None


def read_json(path, what, instead):
    """The JSON at `path`, or one sentence naming `what` the file is and what to do `instead`."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise common.UserError(f"'{path}'{what} is not readable JSON ({type(e).__name__}); move it away, or "
                               f"{instead}.") from None


def load_records(folder):
    """The records of folder/throughput.json ([] without one); one sentence when it is not what save() writes."""
    path = os.path.join(folder, "throughput.json")
    if not os.path.exists(path):
        return []
    recs = read_json(path, "", "pass --results DIR")
    need = ("device_name", "method", "net", "batch", "precision", "compile", "train_img_per_s")
    if not (isinstance(recs, list) and all(isinstance(r, dict) and all(k in r for k in need) for r in recs)):
        raise common.UserError(f"'{path}' is not a list of records as --save writes them (each with "
                               f"{', '.join(need)}); move it away, or pass --results DIR.")
    return recs


def _cell(rec, key, fmt):
    v = rec.get(key)
    if v is None:
        return "–"
    return f"{v / 1e9:.4g}" if fmt == "gflop" else fmt.format(v)


def table_header():
    return "| " + " | ".join(h for h, _, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(rec):
    return "| " + " | ".join(_cell(rec, k, f) for _, k, f in COLUMNS) + " |"


def save(rec, folder):
    """Merge `rec` into folder/throughput.json (same KEY replaces), recompute every record's measured cost vs fm,
    and rewrite folder/throughput.md."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "throughput.json")
    recs = [r for r in load_records(folder) if tuple(r.get(k) for k in KEY) != tuple(rec[k] for k in KEY)] + [rec]
    for r in recs:  # a new fm record changes the ratio of every record measured against it
        r["vs_fm"] = cost_vs_fm(r, recs)
    recs.sort(key=lambda r: (r["device_name"], r["method"], r["net"], r["batch"], r["precision"], r["compile"]))
    for p, text in [(path, json.dumps(recs, indent=1) + "\n"),
                    (os.path.join(folder, "throughput.md"), _markdown(recs))]:
        with open(p + ".tmp", "w") as f:
            f.write(text)
        os.replace(p + ".tmp", p)
    return recs


def _markdown(recs):
    lines = ["# Throughput (generated by benchmarks/throughput.py --save; do not edit)", "",
             "Training: one step of the method's own loss code, backward and Adam per iteration on a batch already on "
             "the device. "
             "FLOPs: FlopCounterMode forward count of one image (multiply-add = 2), training = 3x forward x the "
             "counted cost of the method's step in flow-matching steps (`cost vs fm, counted`). "
             "`cost vs fm, measured` = "
             "fm train img/s / the method's train img/s on the same device, torch, net, batch, precision and compile "
             "setting. Sampling: the method's own sampler under no_grad in eval mode at the sampling batch.", "",
             table_header()]
    lines += [table_row(r) for r in recs]
    return "\n".join(lines) + "\n"


def fm_hint(a, rec, folder, cuda):
    """The command that saves the fm record this run is compared with (a CPU or --quick one outside
    benchmarks/results, which refuses it), and where this run then finds it."""
    own = (a.quick or not cuda) and os.path.abspath(folder) == os.path.abspath(RESULTS)
    dest = CPU_RESULTS if own else a.results  # (None: the default folder)
    cmd = (f"python benchmarks/throughput.py --method fm --net {a.net} --batch {a.batch} --precision "
           f"{rec['precision']}{' --compile on' if a.compile else ''} --device {a.device}"
           f"{' --quick' if a.quick else ''} --save" + (f" --results {dest}" if dest else ""))
    return f"measure it with `{cmd}`" + (f", then pass --results {dest} here too" if own else "")


def main(argv=None):
    """Parse, measure, print one Markdown row, optionally save. Returns the record."""
    a = parse(argv)
    folder = a.results or RESULTS
    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    if a.save and (a.quick or not cuda) and os.path.abspath(folder) == os.path.abspath(RESULTS):
        raise common.UserError("benchmarks/results holds full GPU measurements only; pass --results DIR to save "
                               "a CPU or --quick run elsewhere.")
    recs = load_records(folder)  # (before the measurement: an unusable file costs no GPU time)
    rec = measure(a)
    rec["vs_fm"] = cost_vs_fm(rec, recs)
    print(table_header())
    print(table_row(rec))
    print(f"{rec['device_name']}: {rec['params']:,} params, {rec['fwd_flops_per_img'] / 1e9:.3f} GFLOP/img forward, "
          f"{rec['train_flops_per_img'] / 1e9:.3f} GFLOP/img training, warm-up {rec['warmup_s']:.1f} s")
    if rec["method"] != "fm":
        print(f"cost vs a flow-matching step: counted {rec['fwd_per_step']:.2f}x, measured "
              + (f"{rec['vs_fm']:.2f}x" if rec["vs_fm"] is not None else
                 f"unknown (no fm record with the same device, torch, net, batch, precision and compile in "
                 f"{os.path.relpath(os.path.join(folder, 'throughput.json'))}; {fm_hint(a, rec, folder, cuda)})"))
    if rec["peak_fraction"] is None and rec["device"] == "cuda":
        print("peak fraction unknown for this GPU; pass --peak_tflops to set its dense peak.")
    if a.save:
        save(rec, folder)
        print(f"saved to {os.path.join(folder, 'throughput.json')} and throughput.md")
    return rec


if __name__ == "__main__":
    common.main_guard(main)
