"""common.py: the one module every method file shares (what each part does, for students: docs/common.md).

No method maths lives here: schedules, losses and samplers stay in the method files. UserError (bad input: one
sentence, exit 2) comes first; then the contents, in file order, each name that a method file uses listed (each
section starts at a line "# ==== <section>"):

  networks: blocks   FourierEmbedding, AuxResidual (NCSN++'s residual encoder path), Block (EDM's UNetBlock)
  networks: U-Net    UNet (EDM's SongUNet: DDPM++ and NCSN++)
  networks: MLP, ... MLP (2-D), WeightHead, net_config (the named sizes), build_net, unwrap (DDP, compile)
  data               TOYS, IMAGE_SETS, toy_sample, to_uint8, Data (uint8 images or float points on the device,
                     per-step batches)
  data: loading      load_data (a toy, a torchvision set, a .npy, an image folder or EDM's .zip), FID_OPTIONS,
                     refuse_unused, refuse_other
  augmentation       EDM_AUGMENT, augment_dim, augment (EDM's augment.py pipeline), augment_batch (seeded per step)
  EMA                EMA (EDM's half-life ramp)
  FID                load_detector, IndexRNG (noise per sample index), frechet_distance, compute_fid, FidHook,
                     require_detector, reference_stats
  runtime            Env, derive_seed, check_device, check_launch, setup (DDP, device, precision),
                     freeze_unfed_augment, distribute, sync_grads, all_mean, barrier, wait_for_main,
                     rank0_first (rank 0's downloads), agree (work of some ranks: a failure stops all), autocast,
                     strict_fp32, make_scaler, maybe_compile
  checkpoints        save_checkpoint (atomic), load_checkpoint (weights_only), check_resume_net, fingerprint,
                     teacher_id, no_file, check_teacher_data, same_file, load_state_strict, load_optimizer,
                     restore_rng
  non-finite steps   Guard (skips a non-finite step, never overwrites the last good checkpoint), sample_probe
  EDM pickles        read_edm_pickle (a restricted unpickler: no code executed)
  EDM denoiser       EDMDenoiser (VP, VE, EDM preconditioning), load_edm, edm_heun (EDM's sampler)
  config validation  STEPS, NET_SIZE, RANGES, check_value, check_config, check_rules, check_dir (a writable folder),
                     RUN_FILES, check_layout, preflight
  command line       Parser, resolve_config, Given, parse_cli (argparse over the Config fields; --help shows the
                     preset's values)
  resume and entry   saved_config, pipeline_data (a restarted pipeline keeps its data, seed, preset), note,
                     merge_config, resume_config (what a resumed run may change), check_not_beneath, main_guard
  logging            stopwatch, held_output (a download's lines, held until the first output), Logger
  pictures           save_panels, save_array
  evaluation and     n_steps ("1 step", "2 steps"), EvalSheet (panels and toy metrics of one evaluation),
    commands         sample_or_fid (the `sample` and `fid` commands of every method file, shared out over the ranks)
  toy metrics        swd, mmd2, modes_covered, in_mode, in_square, toy_scores
"""
import argparse, collections, contextlib, copy, dataclasses, datetime, difflib, errno, glob, hashlib, inspect, io, json
import functools, math, operator, os, pickle, re, shutil, socket, stat, struct, sys, tempfile, time, tokenize, types
import textwrap, typing, warnings, zipfile, zlib
from dataclasses import dataclass
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# torch 2.14 calls TorchScript deprecated: torch.func.jvp scripts its decompositions, the Inception detector is a
# TorchScript file; nothing here for a user to act on, and a warning must not precede an `error:` line
warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)


class UserError(Exception):
    """Bad input: printed as one sentence by `main_guard`, exit status 2."""


# ===================================================================================================== networks: blocks
def _gn(c, affine=True, ln=False):
    if ln:  # the MLP's norm
        return nn.LayerNorm(c, eps=1e-6, elementwise_affine=affine)
    g = min(32, max(c // 4, 1))  # EDM's GroupNorm: min(32, C // 4) groups (equal whenever that divides C)
    while c % g:  # nearest divisor of C (a channel count like 2 x 3 x 64 need not divide by 32)
        g -= 1
    return nn.GroupNorm(g, c, eps=1e-6, affine=affine)


def _pe(c, n):
    """PE_C(c) = [sin(c w_j), cos(c w_j)], w_j = 10^(-4 j / (C/2 - 1)): EDM's PositionalEmbedding with
    endpoint=True and its sin/cos swap (NVlabs/edm training/networks.py), frequencies computed the same way."""
    w = (1 / 10000) ** (torch.arange(n // 2, dtype=c.dtype, device=c.device) / (n // 2 - 1))
    a = c[:, None] * w[None]
    return torch.cat([a.sin(), a.cos()], 1)


class FourierEmbedding(nn.Module):
    """NCSN++'s time embedding (EDM FourierEmbedding): [sin(2 pi f c), cos(2 pi f c)], f ~ N(0, 16^2) fixed (a
    buffer, so it travels with the checkpoint)."""

    def __init__(self, n, scale=16.0):
        super().__init__()
        # drawn on the CPU, then moved to the default device (meta shape runs: no meta decompositions needed)
        self.register_buffer("freqs", (torch.randn(n // 2, device="cpu") * scale).to(torch.empty(0).device))

    def forward(self, c):
        a = c[:, None] * (2 * math.pi * self.freqs).to(c.dtype)[None]
        return torch.cat([a.sin(), a.cos()], 1)


def _fp32(device):  # autocast off (the precision-critical paths); autocast knows no 'meta' device (shape runs)
    return torch.autocast(device.type, enabled=False) if device.type != "meta" else contextlib.nullcontext()


def _pnorm(a):  # sCM Sec. 4.1: pixel-norm of the ADN scale/shift, in fp32 (fp64 for double modules)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return a / (a.square().mean(1, keepdim=True) + 1e-8).sqrt()


def _fir(f):
    """EDM's resampling filter: outer(f, f) / sum(f)^2 (float32, 1 x 1 x k x k)."""
    f = torch.as_tensor(f, dtype=torch.float32, device="cpu")
    return (f.ger(f) / f.sum().square())[None, None].to(torch.empty(0).device)


class AuxResidual(nn.Conv2d):
    """NCSN++'s residual encoder path (EDM encoder_type='residual'): a 3x3 conv of the running input pyramid, then
    the 2x down filter (EDM's fused_resample order: conv with padding 1 + filter pad, filter with stride 2), bias."""

    def __init__(self, cin, cout, f):
        super().__init__(cin, cout, 3)
        self.register_buffer("resample_filter", _fir(f), persistent=False)

    def forward(self, x):
        f = self.resample_filter.to(x.dtype)
        x = F.conv2d(x, self.weight, padding=1 + (f.shape[-1] - 1) // 2)
        x = F.conv2d(x, f.tile([x.shape[1], 1, 1, 1]), groups=x.shape[1], stride=2)
        return x + self.bias.to(x.dtype)[:, None, None]


class Block(nn.Module):
    """EDM's residual block (NVlabs/edm training/networks.py, UNetBlock) with optional attention. 2-D (conv) or 1-D
    (linear, `mlp=True`).
    resample_filter: EDM's FIR filter for up/down ([1,1]: average pooling / nearest); attention with `num_heads`
    heads and EDM's q/k/v channel order ('interleaved': qkv.reshape(B*heads, C/heads, 3, HW), NVlabs/edm UNetBlock)
    or py-meanflow's ('blocks': qkv.chunk(3) into q | k | v, its QKVAttention)."""

    def __init__(self, cin, cout, emb, resample=None, attn=False, dropout=0.0, adn=False, mlp=False,
                 resample_filter=(1, 1), num_heads=1, qkv_order="interleaved"):
        super().__init__()
        lin = (lambda i, o, k: nn.Linear(i, o)) if mlp else (lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2))
        self.resample, self.dropout, self.adn, self.mlp = resample, dropout, adn, mlp
        self.num_heads, self.qkv_order = num_heads, qkv_order
        fir = resample and list(resample_filter) != [1, 1]
        self.register_buffer("resample_filter", _fir(resample_filter) if fir else None, persistent=False)
        self.norm0, self.conv0 = _gn(cin, ln=mlp), lin(cin, cout, 3)
        self.affine = nn.Linear(emb, cout * (2 if adn else 1))
        self.norm1, self.conv1 = _gn(cout, affine=not adn, ln=mlp), lin(cout, cout, 3)
        self.skip = lin(cin, cout, 1) if (cin != cout or resample) and not mlp else None
        self.attn = attn
        if attn:
            self.norm2, self.qkv, self.proj = _gn(cout), lin(cout, 3 * cout, 1), lin(cout, cout, 1)

    def _r(self, x):
        """R: identity, 2x down (depthwise filter f, stride 2) or 2x up (transposed, filter 4 f), as EDM's Conv2d does
        it (NVlabs/edm training/networks.py); no filter is the [1,1] one, i.e. 2x2 average pooling / nearest x2."""
        if self.resample is None:
            return x
        if self.resample_filter is None:
            return F.avg_pool2d(x, 2) if self.resample == "down" else F.interpolate(x, scale_factor=2.0, mode="nearest")
        C, w = x.shape[1], self.resample_filter.to(x.dtype)
        if self.resample == "down":
            return F.conv2d(x, w.tile([C, 1, 1, 1]), groups=C, stride=2, padding=(w.shape[-1] - 1) // 2)
        return F.conv_transpose2d(x, w.mul(4).tile([C, 1, 1, 1]), groups=C, stride=2, padding=(w.shape[-1] - 1) // 2)

    def forward(self, x, e):
        h = self.conv0(self._r(F.silu(self.norm0(x))))  # norm, SiLU, resample, 3x3 conv
        with _fp32(h.device):  # the affine in e's precision, rounded once to the activations' (EDM, GDD: fp32 from
            a = _linear(self.affine, e).to(h.dtype)  # the fp32 embedding; autocast made it a bf16 matmul)
        a = a if self.mlp else a[:, :, None, None]
        if self.adn:  # sCM Sec. 4.1 adaptive double normalisation
            s, b = a.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * _pnorm(s) + _pnorm(b))
        else:  # shift added before the norm, EDM DDPM++
            h = F.silu(self.norm1(h + a))
        h = self.conv1(F.dropout(h, self.dropout, self.training))  # dropout, 3x3 conv
        y = (h + (self.skip(self._r(x)) if self.skip is not None else x)) / math.sqrt(2)
        if self.attn:  # attention: plain einsum + softmax in fp32 (forward-mode AD works)
            B, C, nh = y.shape[0], y.shape[1], self.num_heads
            qkv = self.qkv(self.norm2(y))
            if self.qkv_order == "interleaved":
                q, k, v = qkv.reshape(B * nh, C // nh, 3, -1).unbind(2)
            else:
                q, k, v = (u.reshape(B * nh, C // nh, -1) for u in qkv.chunk(3, dim=1))
            with _fp32(y.device):
                ft = torch.promote_types(q.dtype, torch.float32)
                w = torch.einsum("bcn,bcm->bnm", q.to(ft), k.to(ft)).div(math.sqrt(C // nh)).softmax(-1)
            o = torch.einsum("bnm,bcm->bcn", w.to(v.dtype), v).reshape(y.shape)
            y = (y + self.proj(o)) / math.sqrt(2)
        return y


# ====================================================================================================== networks: U-Net
class _Net(nn.Module):
    """Shared conditioning, EDM SongUNet's mapping: n = PE(tau t) + W_y sqrt(K) onehot(y) + W_a a, e = SiLU(M_t(n))
    (M = map_layer1(SiLU(map_layer0(.)))). A second time s either gets its own M_s: e = SiLU(M_t(n) + M_s(PE(tau s)))
    (time_combine='sum', lumalabs/imm training/unets.py), or PE(tau s) is concatenated to PE(tau t) in n before
    map_layer0 (time_combine='concat', py-meanflow's SongUNet); labels and augmentation labels then have the
    concatenated width."""

    def _init_embedding(self, d, E):
        Ct, two = d["time_channels"], d["num_times"] == 2
        Cn = Ct * (2 if two and d["time_combine"] == "concat" else 1)
        if d["embedding"] == "fourier":
            self.map_noise = FourierEmbedding(Ct)
        self.map_label = nn.Linear(d["label_dim"], Cn) if d["label_dim"] else None
        self.map_augment = nn.Linear(d["augment_dim"], Cn, bias=False) if d["augment_dim"] else None
        self.map_layer0, self.map_layer1 = nn.Linear(Cn, E), nn.Linear(E, E)
        if two and d["time_combine"] == "sum":  # second time branch, as lumalabs/imm training/unets.py
            self.map_layer0_s, self.map_layer1_s = nn.Linear(Ct, E), nn.Linear(E, E)

    def _init_weights(self):  # EDM's init: Xavier-uniform, zero biases, x 1e-5 output layers, x sqrt(0.2) qkv
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                last = name.rsplit(".", 1)[-1]
                if last in ("conv1", "proj", "out_conv"):
                    m.weight.data.mul_(1e-5)
                elif last == "qkv":
                    m.weight.data.mul_(math.sqrt(0.2))
        if isinstance(self, MLP):  # the 2-D MLP (ours, not EDM's) starts at exactly zero output
            nn.init.zeros_(self.out_conv.weight)

    def _noise(self, c):
        return self.map_noise(c) if self.config["embedding"] == "fourier" else _pe(c, self.config["time_channels"])

    def embed(self, x, t, s=None, y=None, aug=None):
        d = self.config
        if (s is None) != (d["num_times"] == 1):
            raise UserError(f"this network takes {d['num_times']} time input(s); pass s exactly when num_times=2.")
        dt = torch.promote_types(self.map_layer0.weight.dtype, torch.float32)
        B, tau = x.shape[0], d["time_scale"]
        # embedding path in fp32 with TF32 off (nearby times, e.g. IMM's t and r, stay apart); under torch.compile
        # the graph takes the run's TF32 setting (backend flags cannot change inside a graph), autocast stays off.
        # time_fp64 (IMM): lumalabs/imm training/unets.py PositionalEmbedding builds its frequencies in float64, so
        # the noise labels (fp32, tau t) are embedded, mapped (its Linear casts the weights to the input's dtype)
        # and fed to every block's affine in float64, whatever autocast and TF32 say
        pt = torch.float64 if d["time_fp64"] else dt
        lab = lambda v: (tau * torch.as_tensor(v, device=x.device).to(dt).reshape(-1).expand(B)).to(pt)
        fp32 = _fp32(x.device) if torch.compiler.is_compiling() or x.device.type == "meta" else strict_fp32(x.device)
        with fp32:
            n = self._noise(lab(t))
            if s is not None:
                ns = self._noise(lab(s))
                n = torch.cat([n, ns], 1) if d["time_combine"] == "concat" else n
            if self.map_label is not None:  # no labels = the zero vector (EDM's preconditioners do the same)
                K = d["label_dim"]
                oh = torch.zeros(B, K, dtype=dt, device=x.device) if y is None else \
                    F.one_hot(y, K).to(dt) if not y.is_floating_point() else y.to(dt).reshape(-1, K).expand(B, K)
                if self.training and d["label_dropout"]:
                    oh = oh * (torch.rand([B, 1], device=x.device) >= d["label_dropout"]).to(dt)
                n = n + self.map_label(oh * math.sqrt(K))
            if self.map_augment is not None and aug is not None:
                n = n + self.map_augment(aug.to(dt))
            e = _linear(self.map_layer1, F.silu(_linear(self.map_layer0, n)))
            if s is not None and d["time_combine"] == "sum":
                e = e + _linear(self.map_layer1_s, F.silu(_linear(self.map_layer0_s, ns)))
            return F.silu(e)


def _linear(m, x):
    """nn.Linear m at x's dtype (EDM's Linear casts its weights to the input's: fp64 inputs under time_fp64)."""
    if x.dtype == m.weight.dtype:
        return m(x)
    return F.linear(x, m.weight.to(x.dtype), None if m.bias is None else m.bias.to(x.dtype))


class UNet(_Net):
    """EDM's SongUNet (NVlabs/edm training/networks.py) re-derived: DDPM++ (positional embedding, standard encoder,
    filter [1,1]) and NCSN++ (Fourier embedding, residual encoder, filter [1,3,3,1]); decoder 'standard'.
    forward(x, t, s=None, y=None, aug=None): s the second time (num_times=2), y int labels or one-hot rows,
    aug the augmentation labels (None = no augmentation term, as at sampling)."""

    def __init__(self, d):
        super().__init__()
        self.config = d
        ch, mult, nb, R = d["ch"], d["mult"], d["nb"], d["img_resolution"]
        E = ch * d["emb_mult"]
        self._init_embedding(d, E)
        kw = dict(emb=E, dropout=d["dropout"], adn=d["adn"], resample_filter=d["resample_filter"],
                  num_heads=d["num_heads"], qkv_order=d["qkv_order"])
        self.enc, self.dec, skips, self.levels_end = nn.ModuleDict(), nn.ModuleDict(), [], []
        cout, caux = ch, d["in_channels"]
        for lvl, m in enumerate(mult):
            r = R >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = nn.Conv2d(d["in_channels"], ch, 3, padding=1)
            else:
                self.enc[f"{r}x{r}_down"] = Block(cout, cout, resample="down", **kw)
                if d["encoder"] == "residual":
                    self.enc[f"{r}x{r}_aux_residual"] = AuxResidual(caux, cout, d["resample_filter"])
                    caux = cout
            skips.append(cout)
            for i in range(nb):
                self.enc[f"{r}x{r}_block{i}"] = Block(cout, ch * m, attn=r in d["attn_res"], **kw)
                cout = ch * m
                skips.append(cout)
            self.levels_end.append(f"{r}x{r}_block{nb - 1}" if nb else [k for k in self.enc if "aux" not in k][-1])
        for lvl in reversed(range(len(mult))):
            r = R >> lvl
            if lvl == len(mult) - 1:
                self.dec[f"{r}x{r}_in0"] = Block(cout, cout, attn=True, **kw)  # attention always on (DDPM++)
                self.dec[f"{r}x{r}_in1"] = Block(cout, cout, **kw)
            else:
                self.dec[f"{r}x{r}_up"] = Block(cout, cout, resample="up", **kw)
            for i in range(nb + 1):
                attn = i == nb and r in d["attn_res"]
                self.dec[f"{r}x{r}_block{i}"] = Block(cout + skips.pop(), ch * mult[lvl], attn=attn, **kw)
                cout = ch * mult[lvl]
        # EDM names these dec['{R}x{R}_aux_norm'] / dec['{R}x{R}_aux_conv']; load_edm renames them
        self.out_norm, self.out_conv = _gn(cout), nn.Conv2d(cout, d["out_channels"], 3, padding=1)
        self._init_weights()

    def _encode(self, x, e):
        """Outputs of the non-aux encoder entries, by name; the residual path replaces the level's first output
        (EDM: x = skips[-1] = aux = (x + aux_residual(aux)) / sqrt(2))."""
        h, aux, hs, last = x, x, {}, None  # last: the level's previous entry (never an aux one)
        for name, blk in self.enc.items():
            if name.endswith("_aux_residual"):
                h = aux = hs[last] = (h + blk(aux)) / math.sqrt(2)
            else:
                h = hs[name] = blk(h, e) if isinstance(blk, Block) else blk(h)
                last = name
        return hs

    def forward(self, x, t, s=None, y=None, aug=None):
        e = self.embed(x, t, s, y, aug)
        skips = list(self._encode(x, e).values())
        h = skips[-1]
        for name, blk in self.dec.items():
            h = blk(torch.cat([h, skips.pop()], 1) if "_block" in name else h, e)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)

    def encoder_features(self, x, t, s=None, y=None, aug=None):
        """The output of the last encoder block of each level, high to low resolution."""
        hs = self._encode(x, self.embed(x, t, s, y, aug))
        return [hs[k] for k in self.levels_end]


# =============================================================================================== networks: MLP, configs
class MLP(_Net):
    """2-D network: same forward/embedding/options; linears named conv0/conv1 (1x1 convs)."""

    def __init__(self, d):
        super().__init__()
        self.config, W = d, d["width"]
        self._init_embedding(d, W)
        self.inp = nn.Linear(d["dim"], W)
        self.blocks = nn.ModuleList(Block(W, W, W, dropout=d["dropout"], adn=d["adn"], mlp=True)
                                    for _ in range(d["depth"]))
        self.out_norm, self.out_conv = _gn(W, ln=True), nn.Linear(W, d["dim"])
        self._init_weights()

    def encoder_features(self, x, t, s=None, y=None, aug=None):
        e, h, out = self.embed(x, t, s, y, aug), self.inp(x), []
        for b in self.blocks:
            h = b(h, e)
            out.append(h)
        return out

    def forward(self, x, t, s=None, y=None, aug=None):
        return self.out_conv(F.silu(self.out_norm(self.encoder_features(x, t, s, y, aug)[-1]))).to(x.dtype)


class WeightHead(nn.Module):
    """Learned loss weight (sCM's adaptive weighting w_phi(t); Boffi et al.'s w(s, t)): logvar(t[, s]) =
    Linear([PE(tau t), PE(tau s)]) -> (B,), fp32, zero-initialised."""

    def __init__(self, num_times=1, channels=128, time_scale=1.0):
        super().__init__()
        self.channels, self.time_scale = channels, time_scale
        self.linear = nn.Linear(num_times * channels, 1)
        nn.init.zeros_(self.linear.weight), nn.init.zeros_(self.linear.bias)

    def forward(self, t, s=None):
        dt = torch.promote_types(self.linear.weight.dtype, torch.float32)
        with _fp32(t.device):
            u = [_pe(self.time_scale * v.to(dt).reshape(-1), self.channels) for v in (t, s) if v is not None]
            return self.linear(torch.cat(u, 1))[:, 0]


# Sizes. ddpmpp / ncsnpp are EDM's CIFAR-10 networks (NVlabs/edm train.py --arch ddpmpp / ncsnpp); what each option
# means, with its DDPM++ and NCSN++ values: docs/common.md's table under "Networks" (_NET_CHOICES: the named values).
_UNET = dict(kind="unet", img_resolution=32, in_channels=3, out_channels=3, encoder="standard",
             resample_filter=[1, 1], num_heads=1, qkv_order="interleaved")
_NETS = {
    "ddpmpp": dict(_UNET, ch=128, mult=[2, 2, 2], nb=4, attn_res=[16], time_channels=128, emb_mult=4),
    "ncsnpp": dict(_UNET, ch=128, mult=[2, 2, 2], nb=4, attn_res=[16], time_channels=256, emb_mult=4,
                   encoder="residual", resample_filter=[1, 3, 3, 1], embedding="fourier"),
    "small": dict(_UNET, ch=64, mult=[2, 2, 2], nb=2, attn_res=[16], time_channels=64, emb_mult=4),
    "tiny": dict(_UNET, img_resolution=16, ch=16, mult=[1, 2], nb=1, attn_res=None, time_channels=16, emb_mult=4),
    "mlp": dict(kind="mlp", dim=2, width=128, depth=3, time_channels=64),
}
_NET_COMMON = dict(num_times=1, time_scale=1.0, label_dim=0, dropout=0.0, adn=False, embedding="positional",
                   time_combine="sum", augment_dim=0, label_dropout=0.0, time_fp64=False)
_NET_CHOICES = dict(embedding=("positional", "fourier"), time_combine=("sum", "concat"),
                    encoder=("standard", "residual"), qkv_order=("interleaved", "blocks"))


def net_config(name, **overrides):
    """A plain JSON dict of constructor arguments; unknown keys are a UserError."""
    if name not in _NETS:
        raise UserError(f"unknown network '{name}'; choose one of {', '.join(_NETS)}.")
    d = {**_NET_COMMON, **_NETS[name]}
    if bad := set(overrides) - set(d):
        raise UserError(f"unknown network option(s) {sorted(bad)} for '{name}'.")
    if "in_channels" in overrides and "out_channels" not in overrides and d["kind"] == "unet":
        overrides["out_channels"] = overrides["in_channels"]
    d.update(overrides)
    if d.get("attn_res", 0) is None:  # tiny: attention at R/2
        d["attn_res"] = [d["img_resolution"] // 2]
    return d


def _net_value_ok(k, v, r):
    """A network config value of the default r's type: sizes positive (labels, augmentation inputs: >= 0), lists of
    positive ints (attn_res may be empty), every int below 2^31 (10**30 overflowed torch's sizes: a traceback),
    dropout in [0, 1), label dropout in [0, 1], other floats positive."""
    if isinstance(r, list):
        return isinstance(v, list) and all(type(x) is int and 0 < x < 1 << 31 for x in v) and (
            bool(v) or k == "attn_res")
    if isinstance(r, (bool, str)):
        return type(v) is type(r)
    if isinstance(r, int):
        return type(v) is int and (0 if k in ("label_dim", "augment_dim") else 1) <= v < 1 << 31
    return type(v) in (int, float) and math.isfinite(v) and (0 <= v < 1 if k == "dropout" else 0 <= v <= 1
                                                             if k == "label_dropout" else v > 0)


def build_net(d):
    d = {"time_fp64": False, **d}  # (written before the option existed)
    kind = d.get("kind")
    if kind not in ("unet", "mlp"):
        raise UserError(f"network config has unknown kind {kind!r}.")
    ref = {**_NET_COMMON, **_NETS["ddpmpp" if kind == "unet" else "mlp"]}  # a network of this kind's keys and types
    if set(d) != set(ref):
        raise UserError(f"network config keys differ from a {kind}'s: missing {sorted(set(ref) - set(d))}, "
                        f"unknown {sorted(set(d) - set(ref))}.")
    for k, ok in _NET_CHOICES.items():
        if k in d and d[k] not in ok:
            raise UserError(f"network option {k}={d[k]!r} is not one of {', '.join(ok)}.")
    k = next((k for k, v in d.items() if not _net_value_ok(k, v, ref[k])), None)
    if k:  # (an edited checkpoint: the command line's values are checked before)
        raise UserError(f"a checkpoint's network config holds {k}={d[k]!r}, out of range or of the wrong type (it was "
                        f"edited, or not written by this project).")
    if kind == "unet":
        if d["img_resolution"] % 2 ** (len(d["mult"]) - 1):
            raise UserError(f"image resolution {d['img_resolution']} is not divisible by 2^{len(d['mult']) - 1}.")
        if len(d["resample_filter"]) % 2:  # (an empty one: _net_value_ok above)
            raise UserError(f"resample_filter {d['resample_filter']} needs an even, non-zero length.")
        if any(d["ch"] * m % d["num_heads"] for m in [1, *d["mult"]]):
            raise UserError(f"num_heads {d['num_heads']} does not divide every level's channels.")
    return (UNet if kind == "unet" else MLP)(d)


def unwrap(m):
    """Strip DDP's `.module` and torch.compile's `._orig_mod`."""
    while hasattr(m, "_orig_mod") or isinstance(m, nn.parallel.DistributedDataParallel):
        m = m._orig_mod if hasattr(m, "_orig_mod") else m.module
    return m


# ================================================================================================================= data
_TOY_RMS = {"checkerboard": math.sqrt(4 / 3), "8gaussians": math.sqrt(0.5 + 0.05 ** 2),
            "moons": math.sqrt(0.65625 - 1 / (2 * math.pi) + 0.05 ** 2),
            "spirals": math.sqrt(2.25 * math.pi ** 2 + 0.3 ** 2)}
_IDX = "the four files {{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte, unpacked (gunzip the .gz), under {0}/raw/"
_IMAGE_SETS = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz (MD5 c58f30108f718f92721af3b95e74349a, "
                                       "from https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz)"),
               "mnist": ("MNIST", _IDX.format("MNIST")),  # torchvision reads MNIST-type sets unpacked, all four files
               "fashion_mnist": ("FashionMNIST", _IDX.format("FashionMNIST"))}  # (a .gz only with its own MD5)
TOYS = tuple(_TOY_RMS)  # the 2-D toys by name
IMAGE_SETS = tuple(_IMAGE_SETS)  # the labelled image sets torchvision downloads
NAMED_DATA = (*TOYS, *IMAGE_SETS)  # --data by name (the others are files and folders)


def toy_sample(name, n, generator=None):
    """A 2-D toy, centred by its exact mean and scaled to per-coordinate RMS std 0.5; float32 (n, 2)."""
    g = dict(generator=generator)
    if name == "checkerboard":
        x1 = torch.rand(n, **g) * 4 - 2
        x2 = torch.rand(n, **g) - 2 * torch.randint(0, 2, (n,), **g) + torch.floor(x1) % 2
        x = torch.stack([x1, x2], 1)
    elif name == "moons":
        th, up = torch.rand(n, **g) * math.pi, torch.rand(n, **g) < 0.5
        x = torch.where(up[:, None], torch.stack([th.cos(), th.sin()], 1),
                        torch.stack([1 - th.cos(), 0.5 - th.sin()], 1)) + 0.05 * torch.randn(n, 2, **g)
        x = x - torch.tensor([0.5, 0.25])
    elif name == "8gaussians":
        a = torch.randint(0, 8, (n,), **g) * (2 * math.pi / 8)
        x = torch.stack([a.cos(), a.sin()], 1) + 0.05 * torch.randn(n, 2, **g)
    elif name == "spirals":
        th = 3 * math.pi * torch.rand(n, **g).sqrt()
        sign = torch.randint(0, 2, (n, 1), **g) * 2 - 1
        x = sign * torch.stack([-th * th.cos(), th * th.sin()], 1) + 0.3 * torch.randn(n, 2, **g)
    else:
        raise UserError(f"unknown toy dataset '{name}'; choose one of {', '.join(_TOY_RMS)}.")
    return (x * (0.5 / _TOY_RMS[name])).float()


def toy_modes(name):
    """Mode centres and std of a mixture toy (for `modes_covered`), or None."""
    if name != "8gaussians":
        return None
    a = torch.arange(8) * (2 * math.pi / 8)
    k = 0.5 / _TOY_RMS[name]
    return torch.stack([a.cos(), a.sin()], 1) * k, 0.05 * k


def to_uint8(x):
    """[-1, 1] float -> uint8, rounding 127.5 x + 127.5 (the rounding the Inception detector sees)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8)


@dataclass
class Data:
    """Training data on the device. kind: 'toy' (fresh draws), 'points' (float (N,2)) or 'images' (uint8 NCHW)."""
    kind: str
    key: str
    x: torch.Tensor = None
    labels: torch.Tensor = None
    num_classes: int = 0
    seed: int = 0
    xflip: bool = False
    gen: torch.Generator = None
    _perm: dict = dataclasses.field(default_factory=dict)

    @property
    def shape(self):
        return (2,) if self.kind != "images" else tuple(self.x.shape[1:])

    @property
    def scale(self):
        """1 for images ([-1, 1]) and the toys (RMS 0.5); for loaded points their largest |coordinate|, at least 1."""
        return max(1.0, float(self.x.abs().max())) if self.kind == "points" else 1.0

    def _epoch(self, e):  # perm_e, flip_e from a CPU generator seeded by (seed, "data", e), kept on device
        if e not in self._perm:  # (non_blocking: no stream synchronize; from pageable memory the host still stages)
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", e))
            N = self.x.shape[0]
            self._perm = {k: v for k, v in self._perm.items() if k >= e - 1}
            self._perm[e] = (torch.randperm(N, generator=g).to(self.x.device, non_blocking=True),
                             (torch.rand(N, generator=g) < 0.5).to(self.x.device, non_blocking=True))
        return self._perm[e]

    def batch(self, b, step, part=0, parts=1):
        """(x, y): global position p = step*b*parts + part*b + j; for stored data a pure function of (seed, step)
        whatever the rank layout (toys: fresh draws from this rank's generator)."""
        if self.kind == "toy":
            return toy_sample(self.key, b, self.gen).to(self.x.device, non_blocking=True), None  # (as in _epoch)
        N, p, idx, flip, got = self.x.shape[0], step * b * parts + part * b, [], [], 0
        while got < b:  # a batch may straddle epochs
            e, o = divmod(p, N)
            k = min(N - o, b - got)
            perm, fl = self._epoch(e)
            idx.append(perm[o:o + k]), flip.append(fl[o:o + k])
            p, got = p + k, got + k
        idx, flip = torch.cat(idx), torch.cat(flip)
        y = self.labels[idx] if self.labels is not None else None
        if self.kind == "points":
            return self.x[idx], y
        x = self.x[idx].float() / 127.5 - 1
        if self.xflip:  # flips as a tensor mask
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, y


# ======================================================================================================== data: loading
def _image_dataset(name, root, env):
    import torchvision
    cls, archive = _IMAGE_SETS[name]
    get = functools.partial(getattr(torchvision.datasets, cls), root, train=True)
    if env.is_main:
        try:
            with held_output():  # its progress bar waits for the command's first line
                get(download=True)
        except Exception as e:  # offline, bad checksum, ...
            wait_for_main(env)
            raise UserError(f"could not download {name} into '{root}' ({type(e).__name__}); place {archive} "
                            f"in '{root}' by hand.") from None
    wait_for_main(env)
    try:
        ds = get(download=False)
    except Exception:
        raise UserError(f"{name} is missing from '{root}'; place {archive} there.") from None
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:  # MNIST-type 28x28 -> zero-pad 2 px per side to 32x32, 1 channel
        x = F.pad(x, (2, 2, 2, 2))[..., None]
    return x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), 10


@contextlib.contextmanager
def _silent_fd2():  # C libraries write to file descriptor 2 directly; nothing may precede an `error:` line
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


_IMAGE_EXT = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".tif", ".tiff")  # a folder's images; others skipped
_PIL_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")  # what PIL may decode them as, whatever the name (else
# it decodes any format the bytes are: an EPS renamed .png through Ghostscript, where that is installed)


def _no_data(spec):  # a --data that names nothing (load_data; resume_config: before its data rules)
    return UserError(f"data '{spec}' is neither a known data set ({', '.join(NAMED_DATA)}) nor an existing .npy file, "
                     f"image folder or .zip of images.")


def _read_image(src, f):
    """One image of a folder or a .zip (`src`: a callable that opens it; `f`: its name in messages) -> uint8 (H, W, 3),
    read with PIL as EDM reads one (dataset_tool.py, training/dataset.py); what is converted and what is refused in
    one sentence, and where that differs from EDM: docs/common.md, "Data". Transparent pixels are those of RGBA,
    grey + alpha, a palette's or a GIF's transparent colour and a PNG's colour key."""
    from PIL import Image
    try:  # (libtiff prints its warnings to fd 2; PIL warns of huge images: nothing may precede an `error:` line;
        # record: Image.open's own warnings, before the filter below, a damaged TIFF's EXIF, are kept here too)
        with warnings.catch_warnings(record=True), _silent_fd2(), src() as fp, \
                Image.open(fp, formats=_PIL_FORMATS) as im:
            warnings.simplefilter("ignore")
            if getattr(im, "n_frames", 1) > 1:  # (torchvision's decode gave (frames, C, H, W): a traceback)
                raise UserError(f"the image '{f}' holds {im.n_frames} frames (an animation or a multi-page file); "
                                f"give one still image per file.")
            key, raw = im.info.get("transparency"), im.tile[0][3] if im.format == "PNG" and im.tile else ""
            if raw in ("L;2", "L;4", "I;16B", "RGB;16B") and key is not None:  # a PNG's colour key that PIL does not
                # apply (it trained unrefused): the file's value, but PIL scales 2- and 4-bit grey to 8 bits, reads
                # 16-bit grey opaque, and keeps 16-bit RGB's high bytes (a pixel within 1/256 of the key counts too)
                a, k = np.asarray(im), np.array(key)
                k = k * 255 // (2 ** int(raw[2]) - 1) if raw[:2] == "L;" else k >> 8 if raw == "RGB;16B" else k
                clear = (a.reshape(a.shape[0], a.shape[1], -1) == k).all(-1).any()
            else:
                clear = ("A" in im.getbands() or key is not None) and im.convert("RGBA").getextrema()[3][0] < 255
            if clear:
                raise UserError(f"the image '{f}' has transparent pixels, whose colours are undefined; flatten it onto "
                                f"a background first.")
            if im.mode == "F" or im.mode.startswith("I"):  # 16- or 32-bit grey (older PILs read 16-bit PNGs as "I")
                a = np.asarray(im).astype(np.float64 if im.mode == "F" else np.int64)
                if not (a.min() >= 0 and a.max() <= 65535 and im.mode != "F"):  # (a float image's scale is unknown)
                    what = "floating-point pixel values" if im.mode == "F" else "pixel values outside 16 bits"
                    raise UserError(f"the image '{f}' holds {what} (PIL mode {im.mode}); save it with 8 or 16 bits per "
                                    f"channel.")
                return np.repeat((a >> 8).astype(np.uint8)[..., None], 3, 2)
            return np.array(im.convert("RGB"))  # (a 16-bit RGB PNG: PIL keeps each channel's high byte)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError, zipfile.BadZipFile,
            zlib.error, IndexError, KeyError, TypeError, struct.error) as e:  # (zipfile's and zlib's: a damaged member
        # of a .zip; the last four: PIL's seek through a damaged later frame, counting a GIF's or a TIFF's, tracebacks)
        raise UserError(f"the image '{f}' could not be decoded ({type(e).__name__}).") from None


def _read_image_set(spec):
    """A folder or a .zip of images -> (uint8 (N, H, W, 3), int64 labels or None), read as EDM's training/dataset.py
    ImageFolderDataset reads one (dataset_tool.py writes the .zip): the images in the sorted order of their paths
    inside it, and the class labels of its dataset.json ({"labels": [[path, label], ...]} or null), if it has one."""
    if not (os.path.isdir(spec) or os.path.isfile(spec)):  # (a FIFO or a device named .zip: read for ever)
        raise UserError(f"data '{spec}' is neither a regular file nor a folder.")
    try:
        z = None if os.path.isdir(spec) else zipfile.ZipFile(spec)
    except (zipfile.BadZipFile, OSError, NotImplementedError, UnicodeDecodeError) as e:  # (the last two: a member
        # needing a zip version above 6.3, a name flagged UTF-8 that is not: tracebacks)
        raise UserError(f"data '{spec}' is not a readable .zip archive ({type(e).__name__}).") from None
    with z or contextlib.nullcontext():
        names = sorted(z.namelist() if z else (os.path.relpath(os.path.join(d, f), spec) for d, _, fs in os.walk(spec)
                                               for f in fs))

        def stream(n):  # PIL reads what it needs of an image, as EDM does (read whole first, a zip bomb's member or
            # a huge file named .png ran out of memory)
            if not (z or os.path.isfile(os.path.join(spec, n))):  # (a FIFO blocked for ever)
                raise UserError(f"'{os.path.join(spec, n)}' is not a regular file.")
            try:
                return z.open(n) if z else open(os.path.join(spec, n), "rb")
            except (RuntimeError, NotImplementedError) as e:  # (an encrypted member, or one packed by a method
                raise UserError(f"'{n}' in '{spec}' cannot be read: {e}.") from None  # zipfile does not read)
        files = [n for n in names if n.lower().endswith(_IMAGE_EXT)]
        if not files:
            raise UserError(f"no images found in '{spec}'.")
        imgs = []
        for n in files:
            im = torch.from_numpy(_read_image(lambda: stream(n), os.path.join(spec, n))).permute(2, 0, 1)
            if imgs and im.shape != imgs[0].shape:
                raise UserError(f"{os.path.join(spec, n)} has size {tuple(im.shape[1:])}, unlike "
                                f"{tuple(imgs[0].shape[1:])} of {os.path.join(spec, files[0])}.")
            imgs.append(im)
        y = None
        if "dataset.json" in names:
            try:
                with stream("dataset.json") as fp:
                    y = json.load(fp)["labels"]
                y = None if y is None else list(map(dict(y).get, files))
            except (ValueError, KeyError, TypeError, OSError, zipfile.BadZipFile, zlib.error, RecursionError,
                    EOFError):  # (the last two: JSON nested thousands deep, a member cut short: tracebacks)
                raise UserError(f"the dataset.json of '{spec}' is not {{\"labels\": [[path, label], ...]}} as EDM's "
                                f"dataset_tool.py writes it.") from None
            # a label sets the network's label_dim (the largest + 1), an int below 2^31 (build_net; --cond with 2^40
            # was "a checkpoint's network config holds label_dim=..." on a fresh run; 2^63 a traceback, int64)
            if y is not None and (n := next((n for n, v in zip(files, y)
                                             if type(v) is not int or not 0 <= v < 2 ** 31 - 1), None)):
                raise UserError(f"the dataset.json of '{spec}' gives '{n}' no class label (an integer from 0 to "
                                f"2^31 - 2).")
    x = torch.stack(imgs).permute(0, 2, 3, 1)
    if x.shape[1] != x.shape[2]:
        raise UserError(f"images in '{spec}' are not square ({tuple(x.shape[1:3])}); crop them first.")
    return x, None if y is None else torch.tensor(y, dtype=torch.int64)


def _read_images(spec):
    if spec.lower().endswith(".npy"):  # (as .zip: X.NPY was called 'a file but not a .npy array')
        if not os.path.isfile(spec):  # (a FIFO blocked np.load for ever)
            raise UserError(f"{spec} is not a regular file.")
        try:  # never unpickle: object arrays, pickles and text renamed .npy are refused
            with np.errstate(over="ignore"), warnings.catch_warnings(record=True):  # (numpy's warnings preceded
                # the error line or the run's first: a shape whose product overflows, a header written by Python 2)
                a = np.load(spec, mmap_mode="r", allow_pickle=False)  # mapped, then copied: a header that declares
            a = np.array(a) if isinstance(a, np.memmap) else a  # more than the file holds is not allocated first
        except (ValueError, OSError, EOFError, tokenize.TokenError) as e:  # (the last: a header's brace left open)
            if re.search("mmap length is greater than file size|array is too big", str(e)):  # (np.load allocated it:
                # out of memory; the second: a shape beyond any memory, called 'not a numeric .npy array')
                raise UserError(f"{spec} holds fewer bytes than its header declares (a truncated .npy file).") from None
            raise UserError(f"{spec} is not a numeric .npy array ({type(e).__name__}: object arrays, pickles and "
                            f"other files are refused).") from None
        if not isinstance(a, np.ndarray):  # np.load opens a zip (.npz) whatever the name
            raise UserError(f"{spec} is an .npz archive, not a .npy array; save one array with np.save.")
        if a.dtype.kind not in "iuf":  # (bool (N, 2) was read as points at the corners 0 and 1)
            raise UserError(f"{spec} holds {a.dtype} values, not numbers.")
        if a.dtype != np.uint8 and a.ndim == 2 and a.shape[1] == 2:
            with np.errstate(over="ignore"):
                a = a.astype(np.float32)
            if not np.isfinite(a).all():
                raise UserError(f"{spec} contains NaN or infinite points (or points beyond float32's range).")
            return torch.from_numpy(a), None
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)) \
                or a.shape[1] != a.shape[2]:
            raise UserError(f"{spec}: expected float (N, 2) points or square uint8 NHWC images (C = 1 or 3), "
                            f"got {a.dtype} {a.shape}.")
        return torch.from_numpy(a if a.ndim == 4 else a[..., None]), None
    if not (os.path.isdir(spec) or spec.lower().endswith(".zip")):  # (an image, an .npz: was "no images found")
        raise UserError(f"data '{spec}' is a file but not a .npy array or a .zip; give a .npy file, or a folder of "
                        f"images or a .zip of them.")
    return _read_image_set(spec)


def load_data(spec, root, env, seed, xflip):
    """A toy name, an image data set name, a .npy file, an image folder or a .zip of images -> Data on env.device."""
    if spec in _TOY_RMS:
        g = torch.Generator().manual_seed(derive_seed(seed, "rank", env.rank))
        return Data("toy", spec, x=torch.empty(0, device=env.device), seed=seed, gen=g)
    if spec in _IMAGE_SETS:
        x, y, k = _image_dataset(spec, root, env)
        key = spec
    elif os.path.exists(spec):
        x, y = _read_images(spec)
        if len(x) < 2:
            raise UserError(f"data '{spec}' holds {len(x)} sample(s); training needs at least 2.")
        if x.dtype == torch.uint8 and x.shape[1] < 2:
            raise UserError(f"the images in '{spec}' are {x.shape[1]} x {x.shape[2]} pixels; the U-Net needs at least "
                            f"2 x 2.")
        k = 0 if y is None else int(y.max()) + 1  # (EDM's label_dim: one-hot of the largest label + 1)
        key = "user-" + hashlib.md5(x.numpy().tobytes() + (b"" if y is None else y.numpy().tobytes())).hexdigest()[:12]
        if x.dtype == torch.float32:
            m, s = x.mean(0).tolist(), x.var(0).mean().sqrt().item()  # per-coordinate RMS std
            note(f"data {spec}: {len(x)} points, mean ({m[0]:.3f}, {m[1]:.3f}), RMS std {s:.3f}"  # printed
                 + ("  WARNING: std outside [0.25, 1]; the methods assume ~0.5" if not .25 <= s <= 1 else ""))
            return Data("points", key, x=x.to(env.device), seed=seed)  # with the run's first line (flush_notes)
    else:
        raise _no_data(spec)
    return Data("images", key, x=x.permute(0, 3, 1, 2).contiguous().to(env.device),
                labels=None if y is None else y.to(env.device), num_classes=k, seed=seed, xflip=xflip)


FID_OPTIONS = ("fid_every", "fid_n", "fid_detector")  # the in-training FID: images only, in every method file


def refuse_unused(given, kind, points=(), images=()):
    """An option given on the command line that this data kind (Data.kind) never reads (`points`: read for 2-D
    points only, `images`: for images only; FID_OPTIONS always, but --fid_every 0, "no FID", fits any data) is
    refused in one sentence instead of ignored; a preset's value is not one given."""
    unused = points if kind == "images" else (*images, *FID_OPTIONS)
    if k := next((k for k in unused if k in given and (k, given[k]) != ("fid_every", 0)), None):
        kind, other = ("images", "2-D points") if kind == "images" else ("2-D points", "images")
        raise UserError(f"--{k} applies to {other} only and this run trains on {kind}; drop it.")


def refuse_other(given, only, flag, value):
    """An option that only some values of a selector read (`only`: field -> the values of --`flag` that read it;
    rectified_flow's stages, flow_map's and scm's modes, GDD's discriminators), given with another: refused in one
    sentence instead of ignored and recorded; a preset's value is not one given."""
    if k := next((k for k, ok in only.items() if k in given and value not in ok), None):
        ok = " or ".join([", ".join(only[k][:-1]), only[k][-1]] if len(only[k]) > 2 else only[k])
        raise UserError(f"--{flag} {value} does not read --{k} (only --{flag} {ok} reads it); drop it.")


# ========================================================================================================= augmentation
# EDM's non-leaky augmentation (Karras et al. 2022, App. F.2; NVlabs/edm training/augment.py, AugmentPipe), what it
# does and why it does not leak: docs/common.md, "EDM's augmentation". EDM_AUGMENT: EDM's CIFAR-10 multipliers
# (train.py, with --augment 0.12); xflip = 1e8 makes the x-flip happen with probability 1/2 whatever p is.
EDM_AUGMENT = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
_AUG_DIMS = dict(xflip=1, yflip=1, scale=1, rotate_frac=2, aniso=2, translate_frac=2)  # label entries, in order
_AUG_RANGES = dict(scale_std=0.2, rotate_frac_max=1.0, aniso_std=0.2, aniso_rotate_prob=0.5,
                   translate_frac_std=0.125)  # AugmentPipe's defaults, which EDM's train.py keeps
# Daubechies' symlet-6 low-pass filter (PyWavelets 'sym6' dec_lo): the interpolation filter of the 2x resampling
_SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
         0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
         -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)


def _aug_options(probs):
    if bad := [k for k in probs if k not in _AUG_DIMS and k not in _AUG_RANGES]:
        raise TypeError(f"unknown augmentation option(s) {bad}; known: {[*_AUG_DIMS, *_AUG_RANGES]}")
    return {**dict.fromkeys(_AUG_DIMS, 0.0), **_AUG_RANGES, **{k: float(v) for k, v in probs.items()}}


def augment_dim(**probs):
    """Length of the augmentation labels for these multipliers: 1 per flip and for the isotropic scale, 2 for the
    rotation, the anisotropic scale and the translation (9 for EDM_AUGMENT, EDM's CIFAR-10 augment_dim)."""
    o = _aug_options(probs)
    return sum(d for k, d in _AUG_DIMS.items() if o[k] > 0)


def _affine(a, b, c, d, e, f):
    """(n, 3, 3) homogeneous 2-D matrices [[a, b, c], [d, e, f], [0, 0, 1]] from (n,) tensors and numbers."""
    ref = next(x for x in (a, b, c, d, e, f) if torch.is_tensor(x))
    return torch.stack([x if torch.is_tensor(x) else torch.full_like(ref, x)
                        for x in (a, b, c, d, e, f, 0.0, 0.0, 1.0)], -1).unflatten(-1, (3, 3))


def _aug_draws(n, H, W, p, o, g):
    """AugmentPipe's random draws, in its order, for n images -> (x-flip mask, y-flip mask, G, labels).
    G (n, 3, 3) or None maps output pixel coordinates to input ones, both about the image centre: the inverse
    transforms composed from the left in drawing order, as AugmentPipe builds G_inv."""
    labels, flips, mats = [], [], []
    for k in ("xflip", "yflip"):
        if o[k] > 0:
            w = torch.randint(2, (n, 1, 1, 1), **g)
            w = torch.where(torch.rand(n, 1, 1, 1, **g) < o[k] * p, w, 0)
            flips.append(w == 1), labels.append(w)
        else:
            flips.append(None)
    if o["scale"] > 0:  # isotropic scale 2^(0.2 w), w ~ N(0, 1)
        w = torch.randn(n, **g)
        w = torch.where(torch.rand(n, **g) < o["scale"] * p, w, 0)
        s = torch.exp2(w * o["scale_std"])
        mats.append(_affine(1 / s, 0.0, 0.0, 0.0, 1 / s, 0.0))
        labels.append(w)
    if o["rotate_frac"] > 0:  # rotation by w ~ U(-pi, pi) (counter-clockwise in x right, y down)
        w = (torch.rand(n, **g) * 2 - 1) * (math.pi * o["rotate_frac_max"])
        w = torch.where(torch.rand(n, **g) < o["rotate_frac"] * p, w, 0)
        c, s = torch.cos(w), torch.sin(w)
        mats.append(_affine(c, -s, 0.0, s, c, 0.0))
        labels += [c - 1, s]
    if o["aniso"] > 0:  # scale 2^(0.2 w) along the axis at angle r (r = 0 half the time), 2^(-0.2 w) across it
        w = torch.randn(n, **g)
        r = (torch.rand(n, **g) * 2 - 1) * math.pi
        w = torch.where(torch.rand(n, **g) < o["aniso"] * p, w, 0)
        r = torch.where(torch.rand(n, **g) < o["aniso_rotate_prob"], r, 0)
        s, c, sn = torch.exp2(w * o["aniso_std"]), torch.cos(r), torch.sin(r)  # (1 / (1 / s), not s: EDM's
        # scale2d_inv(s, 1 / s) inverts 1 / s, bit for bit)
        mats += [_affine(c, sn, 0.0, -sn, c, 0.0), _affine(1 / s, 0.0, 0.0, 0.0, 1 / (1 / s), 0.0),
                 _affine(c, -sn, 0.0, sn, c, 0.0)]
        labels += [w * c, w * sn]
    if o["translate_frac"] > 0:  # shift by (W, H) * 0.125 * w pixels, w ~ N(0, I_2)
        w = torch.randn(2, n, **g)
        w = torch.where(torch.rand(1, n, **g) < o["translate_frac"] * p, w, 0)
        mats.append(_affine(1.0, 0.0, -(w[0] * (W * o["translate_frac_std"])),
                            0.0, 1.0, -(w[1] * (H * o["translate_frac_std"]))))
        labels += [w[0], w[1]]
    G = functools.reduce(operator.matmul, mats) if mats else None
    return flips[0], flips[1], G, labels


def _const(rows, device, dtype=torch.float32):  # a small constant on the device without a blocking copy
    return torch.tensor(rows, dtype=dtype).to(device, non_blocking=True)


def _aug_margin(G, H, W):
    """AugmentPipe's padding [left, top, right, bottom] (whole pixels, as floats on G's device) for the batch of
    matrices G: how far the output corners' sources lie outside the image, plus 6 pixels for the filters,
    clipped to [0, size - 1] (the most a reflection can pad)."""
    dev, k = G.device, len(_SYM6) // 4
    cx, cy = (W - 1) / 2, (H - 1) / 2
    xy = (G @ _const([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], dev))[:, :2]
    m = torch.cat([-xy, xy], 1).amax((0, 2))  # farthest source of a corner from the centre: [-x, -y, +x, +y]
    m = (m + _const([2 * k - cx, 2 * k - cy] * 2, dev)).clamp(min=0).minimum(_const([W - 1, H - 1] * 2, dev))
    return m.ceil()


def _aug_warp(x, G, G_all):
    """Resample x (N, C, H, W) at G's coordinates as AugmentPipe does: reflect-pad, 2x upsample with the sym6
    filter, bilinear sampling (zeros outside), sym6 low-pass with 2x downsampling, crop. AugmentPipe pads by the
    margin its batch's transforms need, read back to the host; here the pad is the largest it allows (H-1, W-1)
    and whatever lies beyond that margin is zeroed (before and after upsampling), which gives its numbers without
    a host sync. G_all: the matrices of the whole batch, over which the margin is taken."""
    N, C, H, W = x.shape
    dev, k = x.device, len(_SYM6) // 4  # k = 3: border (input pixels) sampled around the image, cropped at the end
    f = _const(_SYM6, dev, x.dtype)
    m = _aug_margin(G_all, H, W)

    def keep(n, lo, hi, up):  # mask of the positions up*[lo, hi) on an axis of length n
        i = torch.arange(n, device=dev)
        return (i >= up * lo) & (i < up * hi)

    Wc, Hc = 3 * W - 2, 3 * H - 2
    lo_x, hi_x, lo_y, hi_y = W - 1 - m[0], 2 * W - 1 + m[2], H - 1 - m[1], 2 * H - 1 + m[3]
    x = F.pad(x, (W - 1, W - 1, H - 1, H - 1), mode="reflect")
    x = torch.where(keep(Hc, lo_y, hi_y, 1)[:, None] & keep(Wc, lo_x, hi_x, 1), x, 0)
    # 2x upsampling: out[j] = sum_i x[i] f[j + 5 - 2i], i.e. input pixel i sits at upsampled coordinate 2i + 1/2
    wx = f.view(1, 1, 1, -1).repeat(C, 1, 1, 1)
    wy = wx.transpose(2, 3)
    x = F.conv_transpose2d(x, wx, stride=(1, 2), padding=(0, 5), groups=C)
    x = F.conv_transpose2d(x, wy, stride=(2, 1), padding=(5, 0), groups=C)
    x = torch.where(keep(2 * Hc, lo_y, hi_y, 2)[:, None] & keep(2 * Wc, lo_x, hi_x, 2), x, 0)
    # sampling grid: output pixel (upsampled, with a k-pixel border) -> grid_sample's normalised coordinates in
    # the upsampled canvas; with align_corners=False a normalised output coordinate z is u = z Wo/4 + 1/4 input
    # pixels from the centre, and an input point v from the centre is at (2 v - 1/2) / Wc in the canvas
    Wo, Ho = 2 * (W + 2 * k), 2 * (H + 2 * k)
    L = _const([[2 / Wc, 0, -0.5 / Wc], [0, 2 / Hc, -0.5 / Hc], [0, 0, 1]], dev)
    R = _const([[Wo / 4, 0, 0.25], [0, Ho / 4, 0.25], [0, 0, 1]], dev)
    theta = (L @ G @ R)[:, :2].to(x.dtype)
    grid = F.affine_grid(theta, [N, C, Ho, Wo], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # low-pass and 2x downsampling: out[j] = sum_i x[i] f[i - 2j + 5], then crop the border
    x = F.conv2d(x, wx, stride=(1, 2), padding=(0, 5), groups=C)[:, :, :, k:-k]
    return F.conv2d(x, wy, stride=(2, 1), padding=(5, 0), groups=C)[:, :, k:-k, :]


def augment(images, p, generator=None, part=0, parts=1, **probs):
    """EDM's augmentation of float images (N, C, H, W) in [-1, 1] -> (images, labels (N, augment_dim)).

    p: the overall probability (EDM's --augment; 0: the images unchanged, zero labels). probs: AugmentPipe's
    multipliers and ranges, all transforms off by default. Labels: per enabled transform in the order xflip (0/1),
    yflip (0/1), scale (w), rotate_frac (cos - 1, sin), aniso (w cos r, w sin r), translate_frac (wx, wy).
    `generator` (a torch.Generator on the images' device, an int seed, or None: the global RNG) is drawn in
    AugmentPipe's order: seed s gives EDM's outputs after torch.manual_seed(s) on the same device. (part, parts) as
    in Data.batch, with the same seed on every rank (augment_batch): the draws and the padding margin are the whole
    step's (parts * N images) and this call keeps the rows of `part`, so the result does not depend on how the step
    is split over ranks and accumulation rounds. No loop over samples, no host sync (p, probs: Python numbers)."""
    o = _aug_options(probs)
    dim = augment_dim(**probs)
    if images.ndim != 4:
        raise ValueError(f"augment expects images (N, C, H, W), got shape {tuple(images.shape)}")
    if not 0 <= p <= 1:
        raise UserError(f"the augmentation probability must lie in [0, 1], got {p}.")
    N, C, H, W = images.shape
    if p == 0 or dim == 0:
        return images, torch.zeros(N, dim, device=images.device)
    dev = images.device
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = torch.Generator(dev).manual_seed(int(generator))
    xf, yf, G, labels = _aug_draws(N * parts, H, W, p, o, dict(generator=generator, device=dev))
    rows = slice(part * N, (part + 1) * N)
    if xf is not None:
        images = torch.where(xf[rows], images.flip(3), images)
    if yf is not None:
        images = torch.where(yf[rows], images.flip(2), images)
    if G is not None:
        low = images.dtype in (torch.float16, torch.bfloat16)
        images = _aug_warp(images.float() if low else images, G[rows], G).to(images.dtype)
    return images, torch.cat([v[rows].reshape(N, -1).float() for v in labels], 1)


def augment_batch(x, p, seed, step, part=0, parts=1, probs=EDM_AUGMENT):
    """A training batch through `augment` -> (images, labels), or (x, None) with p = 0 (no labels: the network's
    augment_dim is 0). The draws are seeded by (seed, "augment", step) and made for the whole step, so a run gets the
    same augmentation for any rank layout (noise and times stay per rank) and resumes exactly; `part`/`parts` as in
    Data.batch."""
    return augment(x, p, derive_seed(seed, "augment", step), part, parts, **probs) if p else (x, None)


# ================================================================================================================== EMA
class EMA:
    """p_ema <- p + beta (p_ema - p); beta = decay, or 0.5^(batch / (1000 halflife_kimg)) capped by rampup
    (EDM training_loop.py). Frozen parameters (requires_grad=False) are skipped; buffers are copied."""

    def __init__(self, model, decay=None, halflife_kimg=None, rampup=None):
        if (decay is None) == (halflife_kimg is None):
            raise UserError("EMA needs exactly one of decay and halflife_kimg.")
        self.decay, self.halflife_kimg, self.rampup = decay, halflife_kimg, rampup
        self.model = copy.deepcopy(unwrap(model)).eval().requires_grad_(False)

    def beta(self, nimg, batch):
        if self.decay is not None:
            return self.decay
        h = 1000 * self.halflife_kimg
        if self.rampup is not None:
            h = min(h, self.rampup * nimg)
        return 0.5 ** (batch / max(h, 1e-8))

    @torch.no_grad()
    def update(self, model, nimg, batch):
        b, src = self.beta(nimg, batch), unwrap(model)
        if pairs := [(pe, p) for pe, p in zip(self.model.parameters(), src.parameters()) if p.requires_grad]:
            ema_p, p = zip(*pairs)
            torch._foreach_lerp_(list(ema_p), [q.detach().to(e.dtype) for q, e in zip(p, ema_p)], 1 - b)
        for be, bs in zip(self.model.buffers(), src.buffers()):
            be.copy_(bs)


# ================================================================================================================== FID
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class Detector:
    """Feature network: uint8 NCHW in (1 channel repeated to 3), (B, dim) fp32 out, no grad, no autocast."""

    def __init__(self, fn, name, dim, key=None):
        self.fn, self.name, self.dim = fn, name, dim
        self.key = key or name  # names the cached reference statistics: name-<sha256 of the file> for a file

    @torch.no_grad()
    def features(self, u8):  # the network's rows as they come (dtype too: load_detector's probe), no autocast
        with torch.autocast(u8.device.type, enabled=False):
            return self.fn(u8)

    def __call__(self, u8):
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        try:
            return self.features(u8).float()
        except (RuntimeError, torch.jit.Error) as e:  # a TorchScript file that takes 32 x 32 images (load_detector's
            # probe) only; (an exception it raises itself is a torch.jit.Error, not a RuntimeError: was a traceback)
            if _out_of_memory(e):  # (main_guard's out-of-memory sentence, not the image shape's)
                raise
            last = isinstance(e, torch.jit.Error)  # (its last line names the exception the file raised)
            raise UserError(f"the FID detector '{self.name}' failed on images of shape {tuple(u8.shape[1:])} "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[-1 if last else 0][:80]}).") from None


def load_detector(spec, env):
    """'inception' (downloaded once into torch hub's cache) or the path of a TorchScript feature network called as
    net(uint8 images, return_features=True), as StyleGAN2-ADA's Inception file is; named after the file and keyed by
    its content (another network saved under the same name never reuses the first one's cached statistics)."""
    path, why = spec, "file not found"
    if spec == "inception":
        path = os.path.join(torch.hub.get_dir(), "checkpoints", "inception-2015-12-05.pt")
        if env.is_main and not os.path.exists(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=False)
            except Exception as e:
                why = f"download failed: {type(e).__name__}"
        wait_for_main(env)
    if spec == "inception" and not os.path.exists(path):
        raise UserError(f"FID detector unavailable ({why}); download {INCEPTION_URL} and place it at {path}.")
    if not os.path.isfile(path):
        raise no_file(path, "FID detector")
    at = "while loading it"  # (a file torch.jit.load cannot read never reaches the probe)
    try:
        net = torch.jit.load(path, map_location=env.device).eval()
        at = "on its probe, 2 random uint8 images of shape (2, 3, 32, 32)"
        fn = lambda u8: net(u8, return_features=True)
        probe = torch.randint(256, (2, 3, 32, 32), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
        f = Detector(fn, "", 0).features(probe.to(env.device))  # (random images: not all-zero, which a network
        # standardising each image would turn into NaN and be refused for)
        ok = f.ndim == 2 and len(f) == 2 and f.shape[1] > 0 and f.is_floating_point() and bool(f.isfinite().all())
    except Exception as e:
        if _out_of_memory(e):  # main_guard's sentence, as in
            raise  # Detector.__call__: not the file's fault (the FID hook loads it mid-run, the memory held)
        ok, f = False, f"{type(e).__name__} {at}"
    if not ok:
        raise UserError(f"FID detector '{path}' is not a usable TorchScript feature network (" + (
            f if isinstance(f, str) else
            f"2 images gave {f.dtype} features of shape {tuple(f.shape)}, not finite real (2, dim > 0)") + ").")
    dim = f.shape[1]
    name = "inception" if spec == "inception" else os.path.splitext(os.path.basename(path))[0]
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return Detector(fn, name, dim, f"{name}-{h.hexdigest()[:12]}")


class IndexRNG:
    """Randomness per sample index (EDM's StackedRandomGenerator idea): sample i draws from seed + i, so
    the noise does not depend on batch size or GPU count. Shapes include the batch dimension (= len(indices))."""

    def __init__(self, indices, seed, device):
        self.device = torch.device(device)
        self.gens = [torch.Generator(self.device).manual_seed(int(seed) + int(i)) for i in indices]

    def randn(self, *shape):
        assert shape[0] == len(self.gens), "IndexRNG shapes include the batch dimension"
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device) for g in self.gens])

    def randint(self, K):
        return torch.stack([torch.randint(K, (), generator=g, device=self.device) for g in self.gens])


def _shards(n, batch, env):
    """Indices 0..n-1 in batches of at most `batch`, a multiple of the world size of them: rank r takes batches
    r, r + world, ... (the same number of iterations on every rank). The FID's and `sample`'s sharing."""
    return torch.arange(n).tensor_split(math.ceil(n / (batch * env.world)) * env.world)


def _feature_stats(images_of, n, detector, env, batch):
    """Float64 mean and unbiased covariance of detector features over indices 0..n-1, sharded."""
    chunks = _shards(n, batch, env)
    s1 = torch.zeros(detector.dim, dtype=torch.float64, device=env.device)
    s2 = torch.zeros(detector.dim, detector.dim, dtype=torch.float64, device=env.device)
    for idx in chunks[env.rank::env.world]:  # equal number of iterations on every rank
        if len(idx):
            f = detector(images_of(idx)).double()
            if f.shape != (len(idx), detector.dim):  # (a network that drops or merges rows at another batch size)
                raise UserError(f"the FID detector '{detector.name}' gave features of shape {tuple(f.shape)} for "
                                f"{len(idx)} images, not ({len(idx)}, {detector.dim}).")
            s1, s2 = s1 + f.sum(0), s2 + f.T @ f
    if env.world > 1:
        dist.all_reduce(s1), dist.all_reduce(s2)
    if not bool(torch.isfinite(s1).all() and torch.isfinite(s2).all()):
        raise UserError(f"the FID detector '{detector.name}' gave non-finite features.")
    mu = s1 / n
    return mu, (s2 - n * torch.outer(mu, mu)) / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """Frechet distance (Heusel et al. 2017): ||mu1-mu2||^2 + tr S1 + tr S2 - 2 sum sqrt(eig(A S2 A)), A = S1^(1/2);
    float64, no scipy."""
    mu1, s1, mu2, s2 = (torch.as_tensor(np.asarray(a.cpu() if torch.is_tensor(a) else a), dtype=torch.float64)
                        for a in (mu1, sigma1, mu2, sigma2))
    ev, U = torch.linalg.eigh(s1)
    A = (U * ev.clamp(min=0).sqrt()) @ U.T
    M = A @ s2 @ A
    lam = torch.linalg.eigvalsh((M + M.T) / 2)
    fid = (mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * lam.clamp(min=0).sqrt().sum()
    return max(fid.item(), 0.0)


def compute_fid(generate, n, ref, detector, env, batch, seed=0, num_classes=0):
    """FID of n samples against ref = (mu, sigma). generate(rng, labels) -> float images in [-1, 1]."""
    def images_of(idx):
        rng = IndexRNG(idx, seed, env.device)
        return to_uint8(generate(rng, rng.randint(num_classes) if num_classes else None))
    return frechet_distance(*_feature_stats(images_of, n, detector, env, batch), *ref)


class FidHook:
    """In-training FID proxy (images): the detector and the reference statistics are loaded on first use; without a
    detector it logs one line and training carries on. hook(step, {label: generate(rng, labels)}) -> {label: fid},
    None for a sample set holding NaN or inf."""

    def __init__(self, detector, data, env, root, n, log, num_classes=0):
        self.spec, self.data, self.env, self.root, self.n, self.log = detector, data, env, root, n, log
        self.num_classes, self.state = num_classes, None

    def __call__(self, step, gens):
        if self.data.kind != "images":  # a preset's --fid_every on 2-D points (one given is refused: refuse_unused)
            return {}
        if self.state is None:
            try:
                det = load_detector(self.spec, self.env)
            except UserError:
                self.state = False
                self.log.info("FID skipped: detector unavailable")
            else:  # the statistics' own failures (a malformed cache, a full disk) stop the run, alike on every rank
                self.state = (det, reference_stats(self.data, det, self.env, self.root))
        out = {}
        for label, gen in (gens.items() if self.state else ()):
            g = _counted(gen, self.env)  # samples holding NaN or inf (black images to the detector) are not scored
            with strict_fp32(self.env.device):  # the network in fp32 with TF32 off, as `fid` by default
                fid = compute_fid(g, self.n, self.state[1], self.state[0], self.env, 250, 0, self.num_classes)
            out[label] = None if (bad := _bad_total(g, self.env)) else fid  # (a FID every few thousand steps)
            self.log.info(f"step {step} | FID-{self.n / 1000:g}k proxy ({label}) " +
                          (f"not scored: {bad} of {self.n} samples hold NaN or inf" if bad else f"{fid:.3f}"))
        folder = getattr(self.log, "out", None)  # a run's Logger: the history kept beside log.jsonl (trimmed on resume)
        if out and folder:
            row = json.dumps(dict(step=step, fid=out, n=self.n, detector=self.state[0].name))

            def write():  # rank 0 (a full disk stops every rank: agree)
                with open(os.path.join(folder, "fid_train.jsonl"), "a") as f:
                    f.write(row + "\n")
            agree(self.env, write)
        return out


def require_detector(cfg, env):
    """A run with the in-training FID and --fallback false (every cifar10 preset), or a detector file named by
    --fid_detector, loads its detector when a training stage starts (on the resumed config): a missing or unusable
    file stops it in one sentence before any work, not hours later. --fallback true forgives Inception's download."""
    named = getattr(cfg, "fid_detector", "inception") != "inception"
    if getattr(cfg, "fid_every", 0) and (named or not getattr(cfg, "fallback", True)) and cfg.data not in _TOY_RMS:
        try:
            load_detector(cfg.fid_detector, env)
        except UserError as e:
            raise UserError(f"{str(e).rstrip('.')}; or pass --fid_every 0 to train without the in-training FID" + (
                "." if named else " (--fallback true skips it with a warning instead).")) from None


def reference_stats(data, detector, env, cache_dir, ref_path=None, batch=250):
    """Training-set statistics: an explicit npz (mu, sigma) wins, else computed once and cached under the data's key
    and the detector's (its file's content)."""
    if ref_path:
        if not os.path.isfile(ref_path):
            raise no_file(ref_path, "FID reference")
        return _read_stats(ref_path, detector, "FID reference", "")
    path = os.path.join(cache_dir, "fid_refs", f"{data.key}-{detector.key}.npz")
    hit = os.path.exists(path)
    barrier(env)  # every rank has looked before rank 0 may write
    if not hit:  # the folder is checked before the features are computed (a read-only cache serves its hits only)
        check_dir(os.path.dirname(path), "--root's FID statistics folder")
        mu, sigma = _feature_stats(lambda idx: data.x[idx.to(data.x.device)], len(data.x), detector, env, batch)

        def write():  # rank 0 (a full disk stops every rank: agree)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                np.savez(f, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=len(data.x))
            os.replace(path + ".tmp", path)
        agree(env, write)
    return _read_stats(path, detector, "cached FID statistics", "; remove it to recompute them")


def _read_stats(path, detector, what, fix):
    """An .npz with finite float mu (dim,) and sigma (dim, dim), read without unpickling, else one sentence."""
    try:  # a .npy array, a text file, a folder or missing keys all fail here
        with np.load(path, allow_pickle=False) as z:
            mu, sigma = z["mu"], z["sigma"]
    except Exception:
        mu = sigma = np.zeros(0)
    if mu.shape != (detector.dim,) or sigma.shape != (detector.dim,) * 2 or mu.dtype.kind != "f" \
            or sigma.dtype.kind != "f" or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{what} '{path}' is not an .npz with finite float mu ({detector.dim},) and sigma "
                        f"({detector.dim}, {detector.dim}){fix}.")
    if np.abs(sigma - sigma.T).max() > 1e-5 * np.abs(sigma).max() or (np.diag(sigma) < 0).any():
        raise UserError(f"{what} '{path}' holds a sigma that is not a covariance (not symmetric, or a negative "
                        f"variance){fix}.")  # (frechet_distance reads one triangle: -I scored an FID of 0)
    return mu, sigma


# ============================================================================================================== runtime
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool
    precision: str
    seed: int = 0
    waits: typing.Any = None  # (torchrun) the gloo group of wait_for_main, with a 2-hour timeout


def derive_seed(*parts):
    """First 8 bytes of sha256(repr(parts)) mod 2^63: independent streams per (seed, purpose, index)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") % 2 ** 63


def check_device(device, precision=None):
    """auto, cpu, cuda or cuda:N that exists here, a known precision; fp16 only on CUDA."""
    m = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", str(device))
    if not m or (m.group(2) and m.group(1) != "cuda"):
        raise UserError(f"--device {device} is not one of auto, cpu, cuda, cuda:N.")
    if m.group(1) == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device} was asked for but CUDA is not available here; use --device cpu.")
    if m.group(2) and int(m.group(2)) >= torch.cuda.device_count():
        raise UserError(f"--device {device} does not exist here ({torch.cuda.device_count()} CUDA device(s)).")
    if precision is not None and precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise UserError(f"--precision must be one of fp32, tf32, bf16, fp16, got '{precision}'.")
    if precision == "fp16" and (device == "cpu" or not torch.cuda.is_available()):
        raise UserError("--precision fp16 runs on CUDA only; use bf16 or fp32 on the CPU.")


def _env_int(name, default):
    v = os.environ.get(name, str(default)).strip()
    return int(v) if re.fullmatch(r"\d+", v) else None


def check_launch():
    """torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT): all or none of
    the first two, whole numbers, a rank below the world size. -> (rank, world, local_rank)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, 0
    rank, world, local, lw = (_env_int(k, d) for k, d in (("RANK", -1), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0),
                                                          ("LOCAL_WORLD_SIZE", 1)))
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    port = _env_int("MASTER_PORT", 0)
    if missing or None in (rank, world, local, lw, port) or not (0 <= rank < world and lw >= 1 and port < 65536):
        why = f"{', '.join(missing)} unset" if missing else ", ".join(f"{k}={os.environ[k]!r}" for k in (
            "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT") if k in os.environ)
        raise UserError(f"WORLD_SIZE is set but torchrun's variables are not usable ({why}); start a distributed run "
                        f"with torchrun, or unset WORLD_SIZE for a single process.")
    try:  # (an unknown host: the rendezvous retried for minutes)
        socket.getaddrinfo(os.environ["MASTER_ADDR"], port)
    except (OSError, UnicodeError) as e:
        raise UserError(f"MASTER_ADDR={os.environ['MASTER_ADDR']!r} does not resolve ({type(e).__name__}); start a "
                        f"distributed run with torchrun, or unset WORLD_SIZE for a single process.") from None
    return rank, world, local


def setup(device="auto", seed=0, precision=None):
    """Process group under torchrun (NCCL on CUDA, gloo on CPU), device, precision flags, model-init seed."""
    check_device(device or "auto", precision)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device in ("auto", None) else device
    rank, world, local = check_launch()
    if device.startswith("cuda"):  # an index always (set_device refuses a bare "cuda": a ValueError)
        d = torch.device(f"cuda:{local}" if "WORLD_SIZE" in os.environ else device)
        n, procs = torch.cuda.device_count(), _env_int("LOCAL_WORLD_SIZE", 1) if "WORLD_SIZE" in os.environ else 0
        fix = f"start at most {n} process(es) per node (torchrun --nproc_per_node={n}), each seeing them all."
        if procs > n:  # torchrun: more processes per node than GPUs, refused on every rank of the node, rank 0 too
            # (it alone prints the error line: _speaks; a refusal on the other ranks alone was never printed)
            raise UserError(f"torchrun started {procs} processes on this node, which has {n} CUDA device(s) visible; "
                            f"{fix}")
        if d.index is not None and d.index >= n:  # (LOCAL_RANK past LOCAL_WORLD_SIZE: the variables set by hand)
            raise UserError(f"LOCAL_RANK {local} has no CUDA device here ({n} CUDA device(s) visible); {fix}")
        device = str(d if d.index is not None else torch.device("cuda", torch.cuda.current_device()))
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        cuda = device.startswith("cuda")  # (NCCL bound to this rank's GPU: barrier() warns on stderr otherwise)
        dist.init_process_group("nccl" if cuda else "gloo", device_id=torch.device(device) if cuda else None)
    waits = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2)) if dist.is_initialized() else None
    dist.barrier(group=waits) if waits is not None else None  # once at any world size: one that fails, fails here
    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        # half the cores per process: OpenMP spin-waits collapse (20-50x slower) when threads outnumber free cores
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * (_env_int("LOCAL_WORLD_SIZE", 1) or 1))))
    torch.manual_seed(seed)  # identical model initialisation on every rank
    return Env(rank, world, local, torch.device(device), rank == 0, precision, seed, waits)


def freeze_unfed_augment(net):
    """Freeze each map_augment of a network that the method feeds no augmentation labels (a student or 2-RF started
    from a teacher trained with EDM's augmentation): it would get no gradient, which DDP refuses at the second step
    ("Expected to have finished reduction"). Frozen, it keeps its weights (Adam and the EMA skip it)."""
    for m in net.modules():
        if getattr(m, "map_augment", None) is not None:
            m.map_augment.requires_grad_(False)


def distribute(model, env, manual=False):
    """Broadcast rank 0's weights; wrap in DDP unless `manual` (then call sync_grads after backward).
    Afterwards the global RNG is reseeded per rank with derive_seed(seed, "rank", rank)."""
    if env.world > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, 0)
        if not manual:
            ids = [env.device.index] if env.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    torch.manual_seed(derive_seed(env.seed, "rank", env.rank))
    return model


def sync_grads(model, env):
    """Manual-mode gradient all-reduce (one flattened call, divided by the world size); the gradients become views of
    the reduced buffer (no copy per tensor)."""
    if env.world == 1:
        return
    ps = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
    dist.all_reduce(flat)
    flat /= env.world
    for p, g in zip(ps, flat.split([p.numel() for p in ps])):
        p.grad = g.view_as(p)


def all_mean(x, env):
    x = torch.as_tensor(x, device=env.device, dtype=torch.float32).clone()
    if env.world > 1:
        dist.all_reduce(x)
        x /= env.world
    return x


def barrier(env):
    if env.world > 1:
        dist.barrier()


def wait_for_main(env):
    """The other ranks wait for rank 0's download here: on env.waits, a gloo group with a 2-hour timeout (NCCL's
    watchdog aborts a collective of the default group after 10 minutes: a slow link's download, retried, never ends)."""
    if env.world > 1:
        dist.barrier(group=env.waits)


def rank0_first(env, fn):
    """fn() on rank 0, then (wait_for_main) on the others: a download lands once in torch hub's cache, not once per
    rank at a fraction of the link; its lines held (held_output). A failure on one rank is every rank's (none goes on
    with a file the others lack). env None: fn() alone. -> (value, error)."""
    out, err = None, None
    for turn in (True, False):
        if (env is None or env.is_main) == turn:
            try:
                with held_output():
                    out = fn()
            except Exception as e:
                err = e
        if turn and env is not None:
            wait_for_main(env)
    if env is not None and env.world > 1:  # (on the gloo group: a retry may take long too)
        failed = torch.tensor([float(err is not None)])
        dist.all_reduce(failed, group=env.waits)
        err = err or (RuntimeError("another rank could not load them") if failed.item() else None)
    return out, err


def agree(env, fn, everywhere=False):
    """fn() on rank 0 alone (`everywhere`: on every rank), then one collective: a failure on any rank (a full disk)
    stops every rank with the first failing rank's sentence, printed once by rank 0 (why: docs/common.md, "Distributed
    training and precision"); a bug keeps its traceback on its rank. -> fn()'s value where it ran (None elsewhere)."""
    out, err = None, None
    try:
        if everywhere or env.is_main:
            out = fn()
    except Exception as e:
        err = e
    if env.world > 1 and all_mean(float(err is not None), env).item() > 0:
        msgs = [None] * env.world  # each rank's sentence, "" for a bug, None where nothing failed
        dist.all_gather_object(msgs, None if err is None else _sentence(err) or "")
        if err is not None and not msgs[env.rank]:
            raise err
        r = next(r for r, m in enumerate(msgs) if m is not None)
        raise UserError(msgs[r] or f"rank {r} stopped on an error (its traceback is above).")
    if err is not None:
        raise err
    return out


def autocast(env):
    """The run's autocast (bf16/fp16), off for fp32/tf32 and inside a strict_fp32 block."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env.precision)
    return torch.autocast(env.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None and not _STRICT[0])


_STRICT = [0]  # depth of strict_fp32 blocks: autocast(env) inside one stays off


@contextlib.contextmanager
def strict_fp32(device, tf32=False):
    """Autocast off and TF32 off inside the block, also for `autocast(env)` contexts opened inside it (who uses it:
    docs/common.md, "fp32 blocks"); the previous TF32 flags are restored on exit. tf32=True leaves the TF32 flags as
    the run set them (autocast off only: py-meanflow ran its JVPs with TF32)."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    if not tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    _STRICT[0] += 1
    try:
        with _fp32(torch.device(device)):
            yield
    finally:
        _STRICT[0] -= 1
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def make_scaler(env, ck=None):
    """A GradScaler for fp16; a disabled pass-through otherwise (same calling code). Checkpoints keep
    `scaler.state_dict()` ({} when disabled) and a resumed fp16 run takes the loss scale back from `ck`."""
    scaler = torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")
    state = (ck or {}).get("scaler")
    if scaler.is_enabled() and state:  # (a run saved in another precision has none)
        keys = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")
        if not isinstance(state, dict) or sorted(state) != sorted(keys) or not all(
                type(v) in (int, float) and math.isfinite(v) and v >= 0 for v in state.values()):
            raise UserError("the checkpoint's loss-scaler state is malformed; it was not written by this project.")
        scaler.load_state_dict(state)
    return scaler


def maybe_compile(m, on):
    """torch.compile(m) when `on`. A network with dropout (or EDM's label dropout, the embedding's torch.rand) makes
    inductor draw its random numbers as eager PyTorch does (`fallback_random`): a second pass replayed under the same
    RNG state (IMM's target pass, sCM's JVP pass, both eager) then draws the compiled pass's masks; inductor's own RNG
    would draw others."""
    if not on:
        return m
    if any(isinstance(getattr(x, "dropout", None), float) and x.dropout > 0 or isinstance(
            getattr(x, "config", None), dict) and x.config.get("label_dropout", 0) > 0 for x in m.modules()):
        import torch._inductor.config as inductor_config
        inductor_config.fallback_random = True
    return torch.compile(m)


# ========================================================================================================== checkpoints
_LAYOUT = dict(model=dict, ema=dict, opt=dict, step=int, config=dict, net=dict, method=str, convention=str,
               rng=(dict, type(None)))


def _to_cpu(x):  # a copy that later optimiser steps cannot change (a checkpoint written one step later)
    if torch.is_tensor(x):
        return x.detach().to("cpu", copy=True)
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    return [_to_cpu(v) for v in x] if isinstance(x, (list, tuple)) else copy.deepcopy(x)


def _non_finite_weights(ckpt):
    """Whether a floating tensor of the checkpoint's model or EMA weights holds NaN or inf."""
    return any(torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
               for k in ("model", "ema") for v in (ckpt.get(k) or {}).values())


def snapshot_checkpoint(ckpt, env, generators=(), copy_=False):
    """On every rank: refuses non-finite weights, gathers each rank's RNG states; `copy_`: detached CPU copies."""
    if all_mean(float(_non_finite_weights(ckpt)), env).item() > 0:
        raise UserError("weights became non-finite; not writing a checkpoint, the last good one is kept.")
    cuda = torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None
    states = [{"cpu": torch.get_rng_state(), "cuda": cuda, "gens": [g.get_state() for g in generators]}] * env.world
    if env.world > 1:
        dist.all_gather_object(states, states[0])  # (the list then holds each rank's, in rank order)
    snap = {**ckpt, "rng": {"world": env.world, "ranks": states}}
    return _to_cpu(snap) if copy_ and env.is_main else snap


def write_checkpoint(path, snap, env):
    """Rank 0 writes atomically (.tmp, then os.replace); a failed write (disk full) removes the .tmp and keeps the
    previous file."""
    err = None
    if env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            torch.save(snap, path + ".tmp")
        except (OSError, RuntimeError) as e:  # torch's zip writer raises RuntimeError on a full disk
            err = e
            with contextlib.suppress(OSError):
                os.remove(path + ".tmp")
        else:
            os.replace(path + ".tmp", path)
    if all_mean(float(err is not None), env).item() > 0:
        why = getattr(err, "strerror", None) or ("the write failed: is the disk full" if err else "failed on rank 0")
        raise UserError(f"could not write '{path}' ({why}); the previous checkpoint is kept.")
    barrier(env)


def save_checkpoint(path, ckpt, env, generators=()):
    """Called on every rank: gathers RNG states, refuses non-finite weights, rank 0 writes atomically."""
    write_checkpoint(path, snapshot_checkpoint(ckpt, env, generators), env)


def _optimiser_state(o):
    """An optimiser's state dict, a dict of them (GDD's G and D), or empty (a teacher's)."""
    return not o or isinstance(o.get("state"), dict) and isinstance(o.get("param_groups"), list) or \
        all(isinstance(v, dict) and v and _optimiser_state(v) for v in o.values())


def load_checkpoint(path):
    """A checkpoint of this project (weights only, no pickled code): its layout and the types of its entries checked."""
    if not os.path.isfile(path):
        raise no_file(path, "checkpoint")
    try:
        with warnings.catch_warnings():  # torch's notes on odd files (pickle protocol, ...) would precede the error
            warnings.simplefilter("ignore")
            ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' could not be read as a checkpoint of this project "
                        f"({type(e).__name__}).") from None
    bad = lambda what: UserError(f"checkpoint '{path}' {what}; it was not written by this project.")
    if not isinstance(ck, dict):  # (it was said to lack every key)
        raise bad(f"holds a {type(ck).__name__}, not a dict of weights and state")
    if missing := [k for k in _LAYOUT if k not in ck]:
        raise bad(f"lacks the keys {missing}")
    if wrong := [f"{k} is a {type(ck[k]).__name__}" for k, t in _LAYOUT.items() if not isinstance(ck[k], t)
                 or (t is int and isinstance(ck[k], bool))]:
        raise bad(f"is malformed ({', '.join(wrong)})")
    wrong = [k for k in ("model", "ema") if not all(isinstance(n, str) and torch.is_tensor(v) and v.layout ==
                                                    torch.strided for n, v in ck[k].items())]  # (sparse: a traceback)
    opt, rng = ck["opt"], ck["rng"]
    wrong += [] if _optimiser_state(opt) else ["opt"]
    wrong += [] if rng is None or isinstance(rng.get("world"), int) and isinstance(rng.get("ranks"), list) and all(
        isinstance(r, dict) and {"cpu", "cuda", "gens"} <= set(r) for r in rng["ranks"]) else ["rng"]
    if ck["step"] < 0 or wrong:
        raise bad("is malformed (" + (", ".join(f"its {k} entry" for k in wrong) or f"step {ck['step']}") + ")")
    nd = ck["net"]  # (a depth of 10**7 built ten million blocks before the weights were compared: a hang)
    with contextlib.suppress(TypeError):  # (a value of the wrong type: build_net names it)
        blocks = nd.get("depth") if nd.get("kind") == "mlp" else nd.get("nb") * len(nd.get("mult")) \
            if nd.get("kind") == "unet" else 0
        if blocks > len(ck["model"]):
            raise bad(f"holds a network config of {blocks} blocks and {len(ck['model'])} weight tensors")
    if _non_finite_weights(ck):  # save_checkpoint never writes such weights
        raise bad("holds non-finite weights")
    return ck


def check_resume_net(saved, built, path):
    """A resumed run keeps its network: the one built from this command line must be the checkpoint's (dropout
    aside); else one sentence naming the first difference."""
    if diff := [k for k in sorted({*saved, *built} - {"dropout"}) if saved.get(k) != built.get(k)]:
        k = diff[0]
        raise UserError(f"'{path}' holds a network with {k} {saved.get(k)!r} where this command line builds "
                        f"{built.get(k)!r}; a resumed run keeps its network and data shape (use another --out).")


def fingerprint(sd):
    """A short hash of a state dict's names and exact bytes: which weights made a stored result (a moved file keeps
    it, a retrained one changes it)."""
    h = hashlib.sha1()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # (reshape: a 0-dim tensor has no byte view)
    return h.hexdigest()[:16]


def teacher_id(ck, path, tpath, weights):
    """The fingerprint of the weights of the teacher a run started from, which its checkpoints record (`teacher_id`).
    On resume (`ck`, read from `path`) a teacher file whose weights are not those is refused (docs/common.md, "Resume
    semantics"); checkpoints older than the id are not checked."""
    tid, was = fingerprint(weights), ck.get("teacher_id") if ck else None
    if was is not None and was != tid:
        raise UserError(f"the teacher '{tpath}' holds other weights than those '{path}' started from (retrained or "
                        f"replaced since, or another file); a resumed run keeps its teacher: name the file that holds "
                        f"them, or use another --out.")
    return was or tid


def no_file(path, what, then=""):
    """The sentence for an input file that is not there (`then` follows "does not exist"); a folder is named one."""
    if os.path.isdir(path):
        inside = "EDM's network-snapshot-*.pkl" if path.endswith(".pkl") else "a run's ckpt.pt, ..."
        return UserError(f"{what} '{path}' is a folder, not a file; give the file in it ({inside}).")
    if os.path.exists(path):  # (a FIFO, a link to /dev/zero: "does not exist" was said of them)
        return UserError(f"{what} '{path}' is not a regular file (a pipe, a device, ...); give a file.")
    return UserError(f"{what} '{path}' does not exist{then}.")


def check_teacher_data(tconfig, key, path):
    """A distilled teacher's data is the run's: a teacher checkpoint of this project trained on one named data set (a
    toy or an image set) and a run on another named one is refused, since the student learns the teacher's
    distribution and would be scored against the other. Files and folders are not compared (no name to go by)."""
    td = (tconfig or {}).get("data")
    if isinstance(td, str) and td in NAMED_DATA and key in NAMED_DATA and td != key:
        raise UserError(f"the teacher '{path}' was trained on {td} and this run's data is {key}; a distilled "
                        f"teacher's data is the run's (--data {td}).")


def same_file(a, b):
    """Two paths naming the same file (runs/x, ./runs/x and a link to it; both None)."""
    return a == b or bool(a and b) and os.path.realpath(a) == os.path.realpath(b)


def load_state_strict(module, sd):
    """Strict load after stripping 'module.'/'_orig_mod.' prefixes; mismatches name the keys."""
    if not isinstance(sd, dict):  # (a checkpoint's entry edited away: weight_head None, ...)
        raise UserError(f"the checkpoint holds no {type(module).__name__} weights (a {type(sd).__name__}); it was "
                        f"edited, or not written by this project.")
    sd = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in sd.items()}
    own = module.state_dict()
    miss, extra = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd
             and sd[k].shape != v.shape]
    if miss or extra or shape:
        raise UserError(f"state dict does not fit the network: missing {miss[:10]}, unexpected {extra[:10]}, "
                        f"shape mismatch {shape[:10]}.")
    # (a tensor of another dtype or layout was loaded as it came: a complex one printed torch's warning and lost its
    # imaginary part, int64 / bool / fp16 weights were cast without a word, a sparse or quantized one a traceback)
    if odd := [f"{k} {sd[k].dtype}{'' if sd[k].layout == torch.strided else ' ' + str(sd[k].layout)}"
               for k, v in own.items() if sd[k].dtype != v.dtype or sd[k].layout != torch.strided]:
        raise UserError(f"state dict does not fit the network: {', '.join(odd[:3])} where it holds "
                        f"{own[odd[0].split()[0]].dtype} tensors; it was edited, or not written for this network.")
    module.load_state_dict(sd)


def _place_steps(opt):  # Adam's step counts: on the parameter's device when capturable (CUDA, see Guard), else CPU
    for g in opt.param_groups:
        for p in g["params"]:
            st = opt.state.get(p, {})
            if torch.is_tensor(st.get("step")):
                st["step"] = st["step"].to(p.device if g.get("capturable") or g.get("fused") else "cpu")


def load_optimizer(opt, state):
    """An optimiser's moments and step counts from a checkpoint, with this run's hyperparameters (lr, betas, eps,
    weight decay as built from the config): a changed --lr takes effect on resume instead of the saved one."""
    hyper = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    try:
        opt.load_state_dict(state)
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as e:
        if _out_of_memory(e):
            raise
        raise UserError(f"the checkpoint's optimiser state does not fit this run's parameters "
                        f"({type(e).__name__}).") from None
    # (load_state_dict takes moments of any shape, NaN and a negative step: an edited file failed at the first step,
    # after the run's first lines, with a traceback or as diverged weights)
    for p, st in opt.state.items():
        for k, v in st.items():
            n = torch.as_tensor(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            if not torch.is_tensor(n) or not torch.isfinite(n).all() or (n < 0).any() and k != "exp_avg" or (
                    k != "step" and n.shape != p.shape):
                raise UserError(f"the checkpoint's optimiser state does not fit this run's parameters ({k} "
                                f"{tuple(n.shape) if torch.is_tensor(n) else type(n).__name__} for a parameter of "
                                f"shape {tuple(p.shape)}, or not finite, or a negative count or square).")
    for g, h in zip(opt.param_groups, hyper):
        g.update(h)
    _place_steps(opt)


def restore_rng(ckpt, env, generators=()):
    """Each rank's RNG states when the world size matches, else reseed from (seed, rank, step)."""
    rng = ckpt.get("rng")
    if rng and rng["world"] == env.world:
        try:
            st = rng["ranks"][env.rank]
            torch.set_rng_state(st["cpu"])
            saved_cuda, on_cuda = st["cuda"] is not None, env.device.type == "cuda"
            if saved_cuda and on_cuda:
                torch.cuda.set_rng_state(st["cuda"], env.device)
            elif saved_cuda != on_cuda:  # written on another kind of device: a CUDA stream left at its seed would draw
                # step 0's noise again
                if on_cuda:
                    torch.cuda.manual_seed(derive_seed(ckpt["config"].get("seed", 0), "cuda", env.rank, ckpt["step"]))
                how = "CUDA's seeded from (seed, rank, step)" if on_cuda else "the CPU's"
                note(f"warning: checkpoint written on {'CUDA' if saved_cuda else 'the CPU'}, running on "
                     f"{env.device.type.upper()}: its noise comes from another generator ({how}); the run goes on, "
                     f"but does not reproduce an unstopped one")
            for g, s in zip(generators, st["gens"]):
                g.set_state(s)
        except (IndexError, KeyError, TypeError, ValueError, RuntimeError) as e:
            if _out_of_memory(e):
                raise
            raise UserError(f"the checkpoint's RNG state is malformed ({type(e).__name__}); it was not written by "
                            f"this project.") from None
        return
    s = derive_seed(ckpt["config"].get("seed", 0), "rank", env.rank, ckpt["step"])
    note(f"warning: checkpoint saved with {rng and rng['world']} rank(s), running {env.world}: RNG reseeded from "
         f"(seed, rank, step); the run goes on, but no longer reproduces an unstopped run at either world size")
    torch.manual_seed(s)
    for i, g in enumerate(generators):
        g.manual_seed(derive_seed(s, i))


# ===================================================================================================== non-finite steps
def _by_dtype(ts, most=1 << 24):
    """The tensors grouped by (device, dtype), in order, each group split into runs of at most `most` elements (or one
    larger tensor): a flat copy of a run is a bounded transient."""
    groups, out = collections.defaultdict(list), []
    for t in ts:
        groups[t.device, t.dtype].append(t)
    for g in groups.values():
        run, n = [], 0
        for t in g:
            if run and n + t.numel() > most:
                out.append(run)
                run, n = [], 0
            run, n = run + [t], n + t.numel()
        out.append(run)
    return out


def _put_back(ts, ok, old=None):
    """ts (of one device and dtype) <- where(ok, ts, old), NaN-safe; old: their values before, flattened into one
    tensor, or None: zeros. A few dozen kernel launches in all instead of three per tensor (DDPM++'s weights and Adam
    state are ~1,700 tensors: ~5,100 launches per step)."""
    new = torch.cat([t.reshape(-1) for t in ts])
    torch.where(ok.to(new.device), new, new.new_zeros(()) if old is None else old, out=new)
    torch._foreach_copy_(ts, [v.view_as(t) for v, t in zip(new.split([t.numel() for t in ts]), ts)])


class Guard:
    """Non-finite gradients and divergence, with no host sync per step: the flags stay on the device and are read
    where the loop syncs anyway (log lines, checkpoints); the rules and their reasons: docs/common.md, "Non-finite
    steps" and "No host sync inside a step".

    step(opt, scaler, ok): an optimiser step whose gradients are not all finite is skipped (with an fp16 scaler,
    after the caller's scaler.unscale_(opt), and scaler.update() after it): on CUDA (`sync_free`) parameters, moments
    and step counts are put back by torch.where on a device flag; on the CPU, where reading the flag stalls no queue,
    the step is simply not taken (the same result, ~5 ms less per step for a toy MLP's ~80 state tensors). Skipped
    steps are logged (`skipped`); `max_skips` in a row stop the run. end_step(*losses), once per iteration: a
    non-finite loss since the previous checkpoint, or in the step right after it, withholds that checkpoint, and so
    does `probe()` (sample_probe) finding the weights being saved diverged; a withheld final checkpoint ends the run."""

    def __init__(self, env, max_skips, log, path, start_step=None, sync_free=None, probe=None):
        self.env, self.max_skips, self.log, self.path, self.probe = env, max_skips, log, path, probe
        self.sync_free = env.device.type == "cuda" if sync_free is None else sync_free
        z = lambda dt: torch.zeros((), dtype=dt, device=env.device)
        self.now, self.bad, self.run, self.count = z(torch.bool), z(torch.bool), z(torch.int64), z(torch.int64)
        self.pending, self.good, self.since, self._ready = None, start_step, start_step or 0, set()
        self.bad_samples = False
        log.guard = self

    def finite(self, params):
        """Device flag: all gradients of `params` finite."""
        return torch.isfinite(nn.utils.get_total_norm([p.grad for p in params if p.grad is not None and p.numel()],
                                                      math.inf))  # (the inf-norm of an empty tensor is an error)

    def step(self, opt, scaler=None, ok=None):
        ps = [p for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if not ps:
            return
        if id(opt) not in self._ready:  # CUDA: Adam's step counts on the device, so that a skip needs no host sync
            for g in opt.param_groups:
                if "capturable" in g:
                    g["capturable"] = ps[0].is_cuda
            opt._warned_capturable_if_run_uncaptured = True  # torch's note that no CUDA graph is captured: none is
            _place_steps(opt)
            self._ready.add(id(opt))
        ok = self.finite(ps) if ok is None else ok
        if not self.sync_free:
            if ok:
                scaler.step(opt) if scaler is not None else opt.step()
            self.now |= ~ok
            return
        ts = [t for p in ps for t in [p, *opt.state.get(p, {}).values()] if torch.is_tensor(t)]
        keep = [(g, torch.cat([t.detach().reshape(-1) for t in g])) for g in _by_dtype(ts)]  # one copy per dtype
        known = {id(t) for t in ts}
        # opt.step(), not scaler.step(opt): that reads found_inf on the host (a sync per step); the caller's
        # scaler.unscale_(opt) has unscaled the gradients and recorded found_inf for scaler.update(), and a
        # non-finite step is put back here
        opt.step()
        with torch.no_grad():
            for g, old in keep:
                _put_back(g, ok, old)
            made = [v for p in ps for v in opt.state[p].values() if torch.is_tensor(v) and id(v) not in known]
            for g in _by_dtype(made):
                _put_back(g, ok)  # state created by this step: zeros
        self.now |= ~ok

    def end_step(self, *losses):
        for L in losses:
            self.bad |= ~torch.isfinite(torch.as_tensor(L, device=self.env.device)).all()
        self.run = torch.where(self.now, self.run + 1, torch.zeros_like(self.run))
        self.count += self.now
        self.now.zero_()
        if self.pending is not None:  # the loss right after the checkpoint is in: write it or withhold it
            step, snap = self.pending
            self.pending = None
            if not self._withheld(step, all_mean(self.bad.float(), self.env).item() > 0, False, reset=False):
                write_checkpoint(self.path, snap, self.env)
                self.good = step

    def check_run(self, step, run):
        if run >= self.max_skips:
            kept = f"the last good checkpoint (step {self.good}) is kept" if self.good is not None else \
                "no checkpoint was written"
            raise UserError(f"{int(run)} optimiser steps in a row had non-finite gradients (--max_skips "
                            f"{self.max_skips}); stopping at step {step}, {kept}.")

    def _withheld(self, step, bad, final, reset=True):
        if reset:
            self.bad.zero_()
        if not bad:
            return False
        kept = f"the last good one (step {self.good}) is kept" if self.good is not None else "none was written"
        what = f"the loss became NaN/inf after step {self.since}" if not self.bad_samples else \
            "the weights diverged (samples or network outputs NaN/inf or far beyond the data's scale)"
        if final:
            raise UserError(f"{what}; not writing the final checkpoint, {kept}.")
        self.log.info(f"checkpoint of step {step} withheld: {what}; {kept}")
        return True

    def checkpoint(self, step, final, make, generators=()):
        """At a checkpoint step: make() -> the checkpoint dict. Final: written now; else after the next step's loss."""
        self.bad_samples = torch.zeros((), dtype=torch.bool, device=self.env.device)
        if self.probe is not None:  # the saved weights' samples, without touching the run's RNG streams
            cuda = [self.env.device] if self.env.device.type == "cuda" else []
            with torch.no_grad(), torch.random.fork_rng(devices=cuda):
                self.bad_samples = ~self.probe()
        bad, run, bad_samples = all_mean(torch.stack([(self.bad | self.bad_samples).float(), self.run.float(),
                                                      self.bad_samples.float()]), self.env).tolist()
        self.bad_samples = bad_samples > 0
        self.check_run(step, run)
        withheld, self.since = self._withheld(step, bad > 0, final), step
        if withheld:
            return
        if final:
            save_checkpoint(self.path, make(), self.env, generators)
            self.good = step
        else:
            self.pending = (step, snapshot_checkpoint(make(), self.env, generators, copy_=True))


def sample_probe(generate_of, nets, env, data, num_classes=0, n=2):
    """Guard's probe -> a device flag, False when the weights diverged: n one-step samples of each net (the weights
    and the EMA) by the method's own sampler, generate_of(net) -> generate(rng, labels), with noise of its own
    (IndexRNG), and every output of the nets themselves (a forward hook: the image samplers clamp, and clamp(inf) = 1)
    must be finite and within 1e6 x the data's scale, 2-D points' samples within 1e3 x (images': 1e6 x; the bounds'
    reasons: docs/common.md, "Non-finite steps")."""
    sample_bound = 1e6 if data.kind == "images" else 1e3

    def probe():
        rng, outs = IndexRNG(range(n), 0, env.device), []
        y = rng.randint(num_classes) if num_classes else None
        hooks = [net.register_forward_hook(lambda m, i, o: outs.append(o.detach())) for net in nets]
        try:
            xs = [generate_of(net)(rng, y) for net in nets]
        finally:
            for h in hooks:
                h.remove()
        within = [(x.abs() <= sample_bound * data.scale).all() for x in xs]  # (False for NaN and inf too)
        within += [(o.abs() <= 1e6 * data.scale).all() for o in outs]
        return torch.stack(within).all()
    return probe


# ========================================================================================================== EDM pickles
# NVlabs/edm's network pickles (edm-cifar10-32x32-{cond,uncond}-{vp,ve}.pkl, network-snapshot-*.pkl) are a dict
# {'ema': network, 'loss_fn', 'augment_pipe', 'dataset_kwargs'} (edm training/training_loop.py). EDM's
# torch_utils/persistence.py writes every network object as the call _reconstruct_persistent_obj(meta), meta =
# {type, version, module_src, class_name, state}, and a plain unpickle *executes* module_src; read_edm_pickle never
# does (docs/common.md, "EDM checkpoints as teachers").
class _Record:
    """A pickled object kept as data: its class name and its state, never its class."""

    def __init__(self, name, state):
        self.name, self.state = name, state

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {"_state": state}


def _persistent(meta):
    if not isinstance(meta, dict) or meta.get("type") != "class" or not isinstance(meta.get("state"), dict):
        raise pickle.UnpicklingError("a persistent object without a class record")
    return _Record(str(meta.get("class_name")), meta["state"])  # meta['module_src'] is dropped unread


def _tensor(storage, offset, size, stride, *_):  # requires_grad, backward hooks and metadata are dropped
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), False, {})


def _storage(b):  # torch's own pickling of a storage: a legacy torch.save stream, read with weights_only
    if not isinstance(b, (bytes, bytearray)):
        raise pickle.UnpicklingError("a storage without bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage deprecation
        return torch.load(io.BytesIO(b), map_location="cpu", weights_only=True)


def _np_scalar(dtype, data=None):  # numpy scalars (EDM's np.sqrt(0.5) skip scale) -> Python numbers
    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise pickle.UnpicklingError("a numpy scalar that is not a plain number")
    return np.frombuffer(data, dtype, 1)[0].item()


def _latin1(s, enc="latin1"):  # protocol 2 spelling of bytes
    if not isinstance(s, str) or enc != "latin1":
        raise pickle.UnpicklingError("an encoded string other than latin1 bytes")
    return s.encode("latin1")


_EDM_GLOBALS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _tensor,
    ("torch._utils", "_rebuild_parameter"): lambda data, *_: data,
    ("torch._utils", "_rebuild_parameter_with_state"): lambda data, *_: data,
    ("torch.storage", "_load_from_bytes"): _storage,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _np_scalar, ("numpy._core.multiarray", "scalar"): _np_scalar,
    ("dnnlib.util", "EasyDict"): type("_EasyDict", (dict,), {}),  # a dict (a subclass: its pickle may set attributes)
    ("_codecs", "encode"): _latin1,
}


class _EDMUnpickler(pickle.Unpickler):
    def __init__(self, f, path):
        super().__init__(f)
        self.path = path

    def find_class(self, module, name):
        if (module, name) in _EDM_GLOBALS:  # a new object per reference: a BUILD opcode on it (a class's attributes,
            g = _EDM_GLOBALS[module, name]  # a function's defaults) changed the shared one for every later load
            if (module, name) == ("dnnlib.util", "EasyDict"):
                return type("_EasyDict", (dict,), {})
            return (lambda *a, **k: g(*a, **k)) if isinstance(g, types.FunctionType) else g  # (the rest: built-ins)
        if module.startswith("torch.nn.modules.") and name.isidentifier():  # torch.nn containers (ModuleDict, ...)
            return type("_Record_" + name, (_Record,), {"name": f"{module}.{name}", "state": {}})  # a record type
        raise UserError(f"'{self.path}' names the global {module}.{name}, which an EDM network pickle never needs; "
                        f"refusing to load it.")


def read_edm_pickle(path):
    """The pickle's content with tensors, numbers and containers rebuilt and every EDM/torch.nn object a _Record;
    no code from the file runs. Any other global -> UserError naming it."""
    if not os.path.isfile(path):
        raise no_file(path, "EDM pickle", " (download it first; these files are not fetched here)")
    try:
        with open(path, "rb") as f:
            return _EDMUnpickler(f, path).load()
    except UserError:
        raise
    except Exception as e:  # (torch.save's zip: e.g. a run's ckpt.pt copied under a .pkl name, which picks this reader)
        why = "a torch.save zip file; a checkpoint of this project is read under a .pt name" if zipfile.is_zipfile(
            path) else f"{type(e).__name__}: {' '.join(str(e).split())[:80]}"
        raise UserError(f"'{path}' is not a readable EDM pickle ({why}).") from None


def _edm_tensors(rec, where, prefix=""):
    """state_dict of a module record: parameters, persistent buffers, submodules (None entries skipped)."""
    st = rec.state
    skip = st.get("_non_persistent_buffers_set") or ()
    items = [*(st.get("_parameters") or {}).items(), *((k, v) for k, v in (st.get("_buffers") or {}).items()
                                                        if k not in skip)]
    for k, v in items:
        if v is not None and not torch.is_tensor(v):
            raise UserError(f"{where}: {prefix}{k} is not a tensor.")
    out = {prefix + k: v for k, v in items if v is not None}
    for k, m in (st.get("_modules") or {}).items():
        if m is not None:
            if not isinstance(m, _Record):
                raise UserError(f"{where}: submodule {prefix}{k} is not a module record.")
            out.update(_edm_tensors(m, where, f"{prefix}{k}."))
    return out


# SongUNet's and the preconditioners' defaults (NVlabs/edm training/networks.py), for kwargs a pickle leaves out
_SONG_DEFAULTS = dict(label_dim=0, augment_dim=0, model_channels=128, channel_mult=[1, 2, 2, 2], channel_mult_emb=4,
                      num_blocks=4, attn_resolutions=[16], dropout=0.10, label_dropout=0, embedding_type="positional",
                      channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=[1, 1])
# ========================================================================================================= EDM denoiser
_EDM_PRECONDS = {"VPPrecond": ("vp", dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5)),
                 "VEPrecond": ("ve", dict(sigma_min=0.02, sigma_max=100.0)),
                 "EDMPrecond": ("edm", dict(sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5))}


def _vp_sigma(t, beta_d, beta_min):  # EDM VPPrecond.sigma, in float32 as there
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * (t ** 2) + beta_min * t).exp() - 1).sqrt()


class EDMDenoiser(nn.Module):
    """D(x; sigma, y) of EDM (Karras et al. 2022, Table 1; NVlabs/edm training/networks.py VPPrecond, VEPrecond,
    EDMPrecond) around a UNet, computed in fp32 as there: D = c_skip x + c_out net(c_in x, c_noise, y[, aug]), the
    coefficients of each preconditioning in `coefficients` (the table: docs/common.md, "EDM preconditioning").
    sigma: a number or a (B,) tensor; y: int labels, one-hot rows, or None (= the zero row, as EDM); aug: EDM's
    augmentation labels (None at sampling). sigma_min / sigma_max are the network's supported range (EDM's
    attributes; the Heun sampler clips its grid to them)."""

    def __init__(self, net, precond, sigma_min=None, sigma_max=None, sigma_data=0.5, beta_d=19.9, beta_min=0.1,
                 M=1000, epsilon_t=1e-5):
        super().__init__()
        if precond not in ("vp", "ve", "edm"):
            raise UserError(f"EDM preconditioning must be vp, ve or edm, got {precond!r}.")
        self.net, self.precond = net, precond
        self.sigma_data, self.beta_d, self.beta_min, self.M, self.epsilon_t = sigma_data, beta_d, beta_min, M, epsilon_t
        if precond == "vp":  # EDM: float(sigma(epsilon_t)), float(sigma(1))
            sigma_min = float(_vp_sigma(epsilon_t, beta_d, beta_min)) if sigma_min is None else sigma_min
            sigma_max = float(_vp_sigma(1, beta_d, beta_min)) if sigma_max is None else sigma_max
        default = _EDM_PRECONDS["VEPrecond" if precond == "ve" else "EDMPrecond"][1]
        self.sigma_min = float(default["sigma_min"] if sigma_min is None else sigma_min)
        self.sigma_max = float(default["sigma_max"] if sigma_max is None else sigma_max)

    def config(self):
        """Plain dict that rebuilds this denoiser (untrained) with EDMDenoiser.from_config."""
        return dict(precond=self.precond, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                    sigma_data=self.sigma_data, beta_d=self.beta_d, beta_min=self.beta_min, M=self.M,
                    epsilon_t=self.epsilon_t, net=dict(self.net.config))

    @classmethod
    def from_config(cls, d):
        d = dict(d)
        return cls(build_net(d.pop("net")), **d)

    def coefficients(self, sigma):
        """(c_skip, c_out, c_in, c_noise) for a float32 sigma tensor, as NVlabs/edm computes them."""
        if self.precond == "vp":
            c_noise = (self.M - 1) * (((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt()
                                       - self.beta_min) / self.beta_d)
            return 1, -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise
        if self.precond == "ve":
            return 1, sigma, 1, (0.5 * sigma).log()
        s = self.sigma_data
        return (s ** 2 / (sigma ** 2 + s ** 2), sigma * s / (sigma ** 2 + s ** 2).sqrt(),
                1 / (s ** 2 + sigma ** 2).sqrt(), sigma.log() / 4)

    def forward(self, x, sigma, y=None, aug=None):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.net(c_in * x, c_noise.flatten(), y=y, aug=aug)
        return c_skip * x + c_out * F_x.to(torch.float32)


def _edm_state_to_ours(sd, nd, where):
    """EDM SongUNet state_dict -> ours: EDM's resample_filter buffers are checked against the filter the kwargs
    name and dropped (ours are fixed, not stored); dec.{R}x{R}_aux_norm / _aux_conv -> out_norm / out_conv."""
    R, f, out = nd["img_resolution"], _fir(nd["resample_filter"]), {}
    for k, v in sd.items():
        if k.endswith("resample_filter"):
            if v.shape != f.shape or not torch.equal(v.float().cpu(), f.cpu()):
                raise UserError(f"{where}: {k} is not the filter {nd['resample_filter']} its kwargs name.")
            continue
        out[re.sub(rf"^dec\.{R}x{R}_aux_(norm|conv)\.", r"out_\1.", k)] = v
    return out


def load_edm(path, key="ema"):
    """An EDM network pickle -> (EDMDenoiser in eval mode with the weights loaded strictly, info). Only EDM's
    SongUNet (DDPM++ / NCSN++) under VPPrecond / VEPrecond / EDMPrecond loads; nothing in the file is executed.
    info: precond ('vp' | 've' | 'edm'), sigma_min, sigma_max, sigma_data, label_dim, augment_dim, net (our
    net_config), edm_kwargs (the pickled constructor kwargs), use_fp16 (EDM's flag; we run fp32), dataset_kwargs."""
    raw = read_edm_pickle(path)
    try:
        return _edm_denoiser(raw, path, key)
    except (AttributeError, TypeError, KeyError, ValueError, OverflowError, RecursionError) as e:  # the records'
        # entries of another type or missing (int('abc') for a size, a list for a dict, ...) were tracebacks
        raise UserError(f"'{path}' does not hold an EDM network of the expected structure ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:80] if str(e) else ''}).") from None


def _whole(v):  # an integer kwarg of the pickle (True and 2.5 were read as 1 and 2)
    if isinstance(v, bool) or int(v) != v:
        raise TypeError(f"{v!r} where a whole number belongs")
    return int(v)


def _edm_denoiser(raw, path, key):
    obj = raw.get(key) if isinstance(raw, dict) else raw
    name = getattr(obj, "name", type(obj).__name__)
    if not isinstance(obj, _Record) or name not in _EDM_PRECONDS:
        raise UserError(f"'{path}' holds no EDM VPPrecond / VEPrecond / EDMPrecond network under '{key}' (found "
                        f"{name}).")
    precond, pdefaults = _EDM_PRECONDS[name]
    kw = dict(obj.state.get("_init_kwargs") or {})
    if args := obj.state.get("_init_args") or ():
        raise UserError(f"'{path}': {name} was built with positional arguments {args!r}; EDM passes keywords.")
    model_type = kw.get("model_type", "DhariwalUNet" if precond == "edm" else "SongUNet")
    if model_type != "SongUNet":
        raise UserError(f"'{path}' holds a {model_type}; only EDM's SongUNet (DDPM++ / NCSN++) loads here.")
    song = {**_SONG_DEFAULTS, **{k: v for k, v in kw.items() if k not in pdefaults and k not in
                                 ("img_resolution", "img_channels", "use_fp16", "model_type")}}
    unknown = sorted(set(song) - set(_SONG_DEFAULTS))
    if unknown or song["decoder_type"] != "standard" or song["encoder_type"] not in ("standard", "residual"):
        raise UserError(f"'{path}': SongUNet options {unknown or ''} encoder_type={song['encoder_type']!r} "
                        f"decoder_type={song['decoder_type']!r} are not supported (standard/residual encoder, "
                        f"standard decoder).")
    ch = _whole(song["model_channels"])
    nd = net_config("ddpmpp", img_resolution=_whole(kw["img_resolution"]), in_channels=_whole(kw["img_channels"]),
                    out_channels=_whole(kw["img_channels"]), ch=ch, mult=[_whole(m) for m in song["channel_mult"]],
                    nb=_whole(song["num_blocks"]), attn_res=[_whole(r) for r in song["attn_resolutions"]],
                    time_channels=ch * _whole(song["channel_mult_noise"]), emb_mult=_whole(song["channel_mult_emb"]),
                    label_dim=_whole(song["label_dim"]), augment_dim=_whole(song["augment_dim"]),
                    dropout=float(song["dropout"]), label_dropout=float(song["label_dropout"]),
                    embedding=song["embedding_type"], encoder=song["encoder_type"],
                    resample_filter=[_whole(v) for v in song["resample_filter"]])
    model = (obj.state.get("_modules") or {}).get("model")
    if not isinstance(model, _Record):
        raise UserError(f"'{path}': the {name} record has no 'model' submodule.")
    net = build_net(nd)
    load_state_strict(net, _edm_state_to_ours(_edm_tensors(model, f"'{path}'"), nd, f"'{path}'"))  # (quoted)
    p = {k: float(obj.state.get(k, kw.get(k, d))) for k, d in pdefaults.items()}
    if precond == "vp":
        p.update(M=int(p["M"]), sigma_min=obj.state.get("sigma_min"), sigma_max=obj.state.get("sigma_max"))
    den = EDMDenoiser(net, precond, **p).eval().requires_grad_(False)
    # (NaN weights, a NaN or negative sigma range were taken: a teacher whose samples are NaN or drawn on no grid)
    if not all(torch.isfinite(t).all() for t in net.state_dict().values() if t.is_floating_point()):
        raise UserError(f"'{path}' holds non-finite weights; it is not a trained EDM network.")
    if not (0 <= den.sigma_min < den.sigma_max) or not all(math.isfinite(v) and v > 0 for v in (
            den.sigma_data, den.beta_d, den.beta_min, den.M, den.epsilon_t)):
        raise UserError(f"'{path}': {name}'s sigma range [{den.sigma_min}, {den.sigma_max}] or its constants "
                        f"(sigma_data {den.sigma_data}, beta_d, beta_min, M, epsilon_t) are not those of a network.")
    info = dict(precond=precond, sigma_min=den.sigma_min, sigma_max=den.sigma_max, sigma_data=den.sigma_data,
                label_dim=nd["label_dim"], augment_dim=nd["augment_dim"], net=nd, edm_kwargs=kw,
                use_fp16=bool(kw.get("use_fp16", False)),
                dataset_kwargs=dict(raw.get("dataset_kwargs") or {}) if isinstance(raw, dict) else {})
    return den, info


@torch.no_grad()
def edm_heun(D, latents, y=None, num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1 with sigma(t) = t, s(t) = 1, which is Alg. 2 with
    S_churn = 0 as NVlabs/edm generate.py edm_sampler runs it): sigma_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) -
    s_max^(1/rho)))^rho, sigma_N = 0, an Euler step plus the trapezoidal correction except on the last step: 2N - 1
    evaluations (35 for N = 18). The grid is clipped to D's supported range (D.sigma_min / D.sigma_max when present:
    VE's 0.02). State in float64, D(x, sigma, y) called with float64 x and a 0-dim float64 sigma (EDMDenoiser
    computes in fp32). latents ~ N(0, I)."""
    sigma_min = max(sigma_min, getattr(D, "sigma_min", 0.0))
    sigma_max = min(sigma_max, getattr(D, "sigma_max", float("inf")))
    i = torch.arange(num_steps, dtype=torch.float64, device=latents.device)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros_like(t[:1])])
    x = latents.to(torch.float64) * t[0]
    for k in range(num_steps):
        tc, tn = t[k], t[k + 1]
        d = (x - D(x, tc, y).to(torch.float64)) / tc
        xn = x + (tn - tc) * d
        if k < num_steps - 1:
            xn = x + (tn - tc) * (0.5 * d + 0.5 * (xn - D(xn, tn, y).to(torch.float64)) / tn)
        x = xn
    return x


# ==================================================================================================== config validation
# Ranges by field name, shared by every Config and the sample/fid options; a method file adds its own in a RANGES dict
# beside its Config. "> 0", ">= 1" or an interval "[0, 1)"; for a list the rule applies to each element. Beyond these,
# every float must be finite and every int non-negative. check_config runs on every config a command builds (from
# presets and the command line, or from a checkpoint); preflight checks paths before any work.
STEPS = "[1, 100000]"  # a sampler's step count (more is a typo, and would run for days)
NET_SIZE = "[1, 2147483647]"  # a network size: build_net holds every int below 2^31 (beyond, torch's sizes overflow)
RANGES = dict(batch=">= 1", accum=">= 1", lr="> 0", dropout="[0, 1)", ema="[0, 1)", ema_rampup=">= 0", log_every=">= 1",
              ckpt_every=">= 1", eval_n=">= 1", eval_steps=STEPS, max_skips=">= 1", clip="> 0", steps=STEPS, n=">= 1",
              augment="[0, 1]", width=NET_SIZE, depth=NET_SIZE, ema_halflife_kimg=">= 0", lr_ramp_kimg=">= 0")


def _in_range(v, rule):
    if rule[0] in "[(":
        lo, hi = (float(s) for s in rule[1:-1].split(","))
        return (lo <= v if rule[0] == "[" else lo < v) and (v <= hi if rule[-1] == "]" else v < hi)
    op, x = rule.split()
    return {">=": v >= float(x), ">": v > float(x), "<=": v <= float(x), "<": v < float(x)}[op]


def check_value(name, typ, v, rule=None, who="--"):
    """One value against its type hint and range rule: a UserError naming the field, else the value."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:
        return None if v is None else check_value(name, next(a for a in args if a is not type(None)), v, rule, who)
    bad = lambda what: UserError(f"{who}{name} must be {what}, got {v!r}.")
    if origin is typing.Literal:
        if v not in args:
            raise bad("one of " + ", ".join(map(str, args)))
    elif origin is list:
        if not isinstance(v, (list, tuple)):
            raise bad("a comma-separated list")
        return [check_value(name, args[0], x, rule, who) for x in v]
    elif typ is bool or typ is str:
        if not isinstance(v, typ):
            raise bad("true or false" if typ is bool else "a string")
    elif typ in (int, float):
        if isinstance(v, bool) or not isinstance(v, (int, float) if typ is float else int):
            raise bad("an integer" if typ is int else "a number")
        if typ is float and not math.isfinite(v):
            raise bad("a finite number")
        if typ is int and abs(v) >= 2 ** 63:  # torch's seeds and sizes are 64-bit
            raise bad("below 2^63")
        if not _in_range(v, rule or (">= 0" if typ is int else "> -inf")):
            rule = rule or ">= 0"
            raise bad({"> 0": "positive", ">= 0": "non-negative"}.get(rule, f"in {rule}" if rule[0] in "[(" else
                                                                     rule.replace(">=", "at least")))
    return v


def _repeated(xs):
    """The first value of the list xs that an earlier entry already holds, else None (step counts given twice)."""
    return next((x for i, x in enumerate(xs) if x in xs[:i]), None)


def check_config(cfg, who=lambda name: "--", device=True, cross=True):
    """Every field of a Config against its type, RANGES and the method file's RANGES, the device, then (`cross`)
    cfg.check(), the rules between fields."""
    hints = typing.get_type_hints(type(cfg))
    rules = {**RANGES, **getattr(sys.modules.get(type(cfg).__module__), "RANGES", {})}
    for f in dataclasses.fields(cfg):
        check_value(f.name, hints[f.name], getattr(cfg, f.name), rules.get(f.name), who(f.name))
    if getattr(cfg, "eval_steps", None) == []:
        raise UserError(f"{who('eval_steps')}eval_steps needs at least one step count (such as 1,2).")
    if (twice := _repeated(getattr(cfg, "eval_steps", None) or [])) is not None:  # (as sample's --steps)
        raise UserError(f"{who('eval_steps')}eval_steps lists {twice} twice; give each step count once.")
    if getattr(cfg, "fid_every", 0) and getattr(cfg, "fid_n", 2) < 2:
        raise UserError(f"--fid_n must be at least 2 with --fid_every, got {cfg.fid_n}.")
    if device and hasattr(cfg, "device"):
        check_device(cfg.device, getattr(cfg, "precision", None))
    return check_rules(cfg) if cross else cfg


def check_rules(cfg):
    """cfg.check(), the Config's rules between fields (a ValueError there is a UserError here)."""
    try:
        cfg.check() if hasattr(cfg, "check") else None
    except ValueError as e:
        raise UserError(str(e)) from None
    return cfg


def check_names(names, folder, what, spare=0):
    """Names to be created in `folder` (with `spare` bytes more for a suffix) within the file system's name length."""
    try:
        most = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        most = 255
    if long := next((n for n in names if len(os.fsencode(n)) + spare > most), None):
        raise UserError(f"{what} cannot be created: the name '{long[:24]}...' is too long for the file system "
                        f"({most} bytes" + (", with room for the _Kstep suffix)." if spare else ")."))


def _dangling(link):
    """What to do with a symbolic link that resolves to nothing: create the folder it names, or remove a loop."""
    try:
        os.stat(link)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a loop of links: remove it"
    to = os.path.normpath(os.path.join(os.path.dirname(link), os.readlink(link)))
    return f"to '{to}', which does not exist: create that folder, or remove the link"


def check_dir(d, what):
    """A folder that exists or can be created, and can be written: else one sentence naming the obstacle."""
    d = os.path.abspath(d)
    if os.path.exists(d) and not os.path.isdir(d):
        raise UserError(f"{what} '{d}' is a file, not a folder.")
    a = d
    while not os.path.exists(a):
        if os.path.islink(a):  # (os.makedirs met it after the checks: a FileExistsError or ELOOP traceback)
            raise UserError(f"{what} '{d}' cannot be created: '{a}' is a broken symbolic link ({_dangling(a)}).")
        a = os.path.dirname(a)
    if not os.path.isdir(a):
        raise UserError(f"{what} '{d}' cannot be created: '{a}' is a file.")
    check_names(os.path.relpath(d, a).split(os.sep) if d != a else [], a, f"{what} '{d}'")
    try:
        os.rmdir(tempfile.mkdtemp(dir=a))
    except OSError as e:
        raise UserError(f"{what} '{d}' cannot be written ({e.strerror or type(e).__name__} in '{a}').") from None


RUN_FILES = ("ckpt.pt", "ckpt.pt.tmp", "config.json", "log.jsonl", "metrics.jsonl", "fid_train.jsonl",
             "samples.png")  # in DIR


def check_layout(layout):
    """{folder: the names (glob patterns) of the files a run writes in it}: a folder (or a FIFO, a broken link) where a
    file goes, or a file or a broken link where a folder goes (DIR/2rf, DIR/pairs), is refused before any work, not
    met as a traceback (or a hang) after it."""
    for d, names in layout.items():
        if os.path.islink(d) and not os.path.exists(d):  # (--pairs: os.makedirs met it after the checks)
            raise UserError(f"'{d}' is a broken symbolic link where the run keeps its {os.path.basename(d)} folder "
                            f"({_dangling(d)}).")
        if os.path.exists(d) and not os.path.isdir(d):
            raise UserError(f"'{d}' is a file where the run keeps its {os.path.basename(d)} folder; remove it or use "
                            f"another --out.")
        f = next((f for n in names for f in sorted(glob.glob(os.path.join(glob.escape(d), n)))  # (a FIFO hung the
                  if not os.path.exists(f) or os.path.isdir(f) or stat.S_ISFIFO(os.stat(f).st_mode)), None)  # run; a
        if f:  # broken link was a traceback; a device, /dev/full, is written to as a file: a full disk's sentence)
            what = "a folder" if os.path.isdir(f) else "a pipe or a broken link"
            raise UserError(f"'{f}' is {what} where the run writes its {os.path.basename(f)}; remove it or use "
                            f"another --out.")


def check_toolchain(device):
    """--compile builds kernels at the first step, after the run's first line: inductor's C++ compiler on the CPU;
    on CUDA, Triton and the C compiler that builds Triton's launcher (CC, else gcc or clang: triton's build.py)."""
    if str(device).startswith("cuda") or (device in ("auto", None) and torch.cuda.is_available()):
        from torch.utils._triton import has_triton_package
        if not has_triton_package():
            raise UserError("--compile on CUDA needs Triton (pip install triton); run without --compile.")
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            raise UserError("--compile on CUDA needs a C compiler for Triton (gcc, clang or $CC); run without "
                            "--compile.")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    try:
        get_cpp_compiler()
    except Exception as e:  # torch's InvalidCxxCompiler ("No working C++ compiler found in ...")
        why = next(iter(str(e).strip().splitlines()), "")[:120].rstrip(".")
        raise UserError(f"--compile on the CPU needs a working C++ compiler ({type(e).__name__}{': ' * bool(why)}"
                        f"{why}); install one (g++) or run without --compile.")


def preflight(cmd, cfg, layout=None):
    """Before any work: output folders and files writable (layout: check_layout's, by default --out's RUN_FILES),
    sample/fid input files present (data and teacher files are checked where they are read, before training), the
    toolchain of --compile."""
    if cmd == "train":
        if not cfg.out:
            raise UserError("--out needs a folder name.")
        if getattr(cfg, "compile", False):
            check_toolchain(cfg.device)
        if getattr(cfg, "root", None):
            check_dir(cfg.root, "--root")
            if getattr(cfg, "fid_every", 0):  # where the in-training FID caches its reference statistics (a file there
                check_dir(os.path.join(cfg.root, "fid_refs"), "--root's FID statistics folder")  # was a traceback)
        check_dir(cfg.out, "--out")
        return check_layout(layout or {cfg.out: RUN_FILES})
    if not os.path.isfile(cfg.ckpt):
        raise no_file(cfg.ckpt, "checkpoint")
    if cfg.out == "":
        raise UserError("--out needs a file name (or leave it out for the checkpoint's folder).")
    out = cfg.out or os.path.join(os.path.dirname(cfg.ckpt), "samples.png" if cmd == "sample" else "fid.jsonl")
    if cmd == "sample":
        check_sample_out(out)
    if cmd == "fid" and not out.endswith(".jsonl"):
        raise UserError(f"fid appends one JSON line per step count: --out must end in .jsonl, got '{out}'.")
    if os.path.isdir(out):
        raise UserError(f"--out '{out}' is a folder; give a file path.")
    if cmd == "fid" and os.path.exists(out) and not os.path.isfile(out):  # (fid reads, then appends to, the file: a
        # FIFO hung after the whole FID's work; sample writes a new file and renames it over the path)
        raise UserError(f"--out '{out}' is not a regular file (a pipe, a device, ...); give a .jsonl file path.")
    check_dir(os.path.dirname(os.path.abspath(out)), "the folder of --out")
    check_names([os.path.basename(out)], os.path.dirname(os.path.abspath(out)), f"--out '{out}'", len("_100000steps"))
    if cfg.fid_ref and not os.path.isfile(cfg.fid_ref):
        raise no_file(cfg.fid_ref, "FID reference")
    if cmd == "fid" and not cfg.fid_ref:  # (written only on a cache miss, and checked then: a read-only cache serves)
        for d, what in ((cfg.root, "--root"), (os.path.join(cfg.root, "fid_refs"), "--root's FID statistics folder")):
            if os.path.exists(d) and not os.path.isdir(d):
                raise UserError(f"{what} '{os.path.abspath(d)}' is a file, not a folder.")
    if cmd == "fid" and cfg.fid_detector != "inception" and not os.path.isfile(cfg.fid_detector):
        raise no_file(cfg.fid_detector, "FID detector")


# ========================================================================================================= command line
SAMPLE_OPTS = dict(  # sample / fid: (type, default, help); the sampler's Config fields follow (over the checkpoint's)
    ckpt=(str, None, "checkpoint to sample from"), steps=(list[int], [1, 2], "step counts, one output each"),
    n=(int, None, "number of samples (sample 64, fid 50,000)"), out=(str, None, ".npy/.npz/.png/.zip; fid .jsonl"),
    batch=(int, 256, "samples per batch"), seed=(int, 0, "sample i draws its noise from seed + i"),
    device=(str, "auto", "auto, cpu, cuda, cuda:N"), precision=(typing.Optional[str], None, "fp32, tf32, bf16, fp16"),
    ema=(bool, True, "the EMA weights"), fid_ref=(typing.Optional[str], None, "npz with mu, sigma (else computed)"),
    fid_detector=(str, "inception", "inception or a TorchScript path"), root=(str, "data", "data, FID statistics"))
FID_ONLY = ("fid_ref", "fid_detector", "root", "data")  # read by fid; `sample` refuses them
ALIASES = dict(n="n_samples")  # --n_samples is --n under torchrun, whose parser reads `--n` after the script as an
# ambiguous abbreviation of its --nnodes, --nproc_per_node, ... (argparse matches prefixes anywhere in the line)


def _tname(t):  # int, float, str, bool, {a,b}, int,... , X|none
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin is typing.Union:
        return _tname(next(a for a in args if a is not type(None))) + "|none"
    if origin is typing.Literal:
        return "{" + ",".join(map(str, args)) + "}"
    return f"{_tname(args[0])},..." if origin is list else getattr(t, "__name__", str(t))


class Parser(argparse.ArgumentParser):
    """argparse with its errors raised as UserError (one sentence, exit 2); the benchmark scripts parse with it too."""

    def error(self, message):  # argparse's own messages as one sentence, no usage dump
        raise UserError(re.sub(r"^argument (\S+?)(/\S+)?: ", r"\1: ", message).rstrip(".") + ".")


def _converter(name, typ):
    """str -> value by the dataclass type hint (none, Literal choices, comma lists, bool words, 1e4 as int)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:
        inner = _converter(name, next(a for a in args if a is not type(None)))
        return lambda s: None if s.lower() == "none" else inner(s)
    if origin is typing.Literal:
        def lit(s):
            if s not in map(str, args):
                raise UserError(f"--{name} expects one of {', '.join(map(str, args))}, got '{s}'.")
            return next(a for a in args if str(a) == s)
        return lit
    if origin is list:
        def items(s):  # '' is the empty list; '1,,2' or '1,2,' lost a value, not a shorter list
            parts = s.split(",") if s else []
            if "" in parts:
                raise UserError(f"--{name} has an empty entry in '{s}'; separate the values by single commas.")
            return [_converter(name, args[0])(p) for p in parts]
        return items

    def conv(s):
        try:
            if typ is bool:
                return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
            if typ in (int, float) and float(s) == 0 and re.search(r"[1-9]", re.split("[eE]", s)[0]):  # 1e-400: not
                if typ is int:  # an integer; for a float it was refused as "got 0.0"
                    raise ValueError
                raise UserError(f"--{name} {s} is too close to 0 for a float (it reads as 0).")
            if typ is int:
                if not float(s).is_integer():
                    raise ValueError
                return int(s) if s.strip().lstrip("+-").isdigit() else int(float(s))  # (float: "1e4" only)
            return typ(s)
        except (KeyError, ValueError, OverflowError):
            raise UserError(f"--{name} expects {_tname(typ)}, got '{s}'.") from None
    return conv


class _Help(argparse.RawDescriptionHelpFormatter):
    def _split_lines(self, text, width):  # never at a hyphen: a file name in a default stays whole to copy
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _parser(prog, options, epilog=None):
    """options: (name, type, default as shown, comment). Every option has default SUPPRESS: the namespace holds what
    was given."""
    p = Parser(prog=prog, add_help=False, allow_abbrev=False, epilog=epilog, formatter_class=lambda prog: _Help(
                prog, max_help_position=34, width=118))
    for name, typ, default, note in options:
        bare = typ is bool or typ == typing.Optional[bool]
        spellings = [f"--{name}"] + ([f"--{ALIASES[name]}"] if name in ALIASES else [])
        p.add_argument(*spellings, dest=name, default=argparse.SUPPRESS, type=_converter(name, typ),
                       metavar=_tname(typ), nargs="?" if bare else None, const=True if bare else None,
                       help=f"{note} (default {default})".replace("%", "%%"))
    return p


def _normalise(argv):
    """--a-b -> --a_b; '--key value' -> '--key=value' (values may start with '-', e.g. --lr -1e-3); bare flags stay."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--"):
            k, eq, v = a.partition("=")
            a = k.replace("-", "_").replace("__", "--", 1) + eq + v
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                a, i = f"{a}={argv[i + 1]}", i + 1
        out.append(a)
        i += 1
    return out


@functools.cache
def _field_options(Config):
    """(name, type, default, note) per field; the note is the field's comment in the class's source (its --help line),
    read once per class: inspect parses the file."""
    src, hints = inspect.getsource(Config), typing.get_type_hints(Config)
    notes = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*(?:\n\s+#  .*)*)$", src, re.M))  # ("#   ...": continued)
    return [(f.name, hints[f.name], f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default,
             re.sub(r"\s*\n\s+#\s+", " ", notes.get(f.name, ""))) for f in dataclasses.fields(Config)]


def _default_out(Config, presets, preset, given, method):
    """The run folder when neither the command line nor the preset names one: runs/<method>[-<mode>]-<preset>."""
    fields = Config.__dataclass_fields__
    if "out" not in fields or "out" in given or "out" in presets.get(preset, {}):
        return None
    mode = given.get("mode") or presets.get(preset, {}).get("mode") or getattr(fields.get("mode"), "default", None)
    return f"runs/{method}-{mode}-{preset}" if "mode" in fields else f"runs/{method}-{preset}"


def _preset_defaults(fields, Config, presets, argv, method):
    """The defaults `--help` shows: the preset's (the one --preset names, else toy), and a value its mode/stage parts
    set differently, e.g. "230 (sct), 280 (scd)"."""
    name = ([a.partition("=")[2] for a in _normalise(argv) if a.startswith("--preset=")] or ["toy"])[-1]  # the last
    if name not in presets:
        raise UserError(f"unknown preset '{name}'; choose one of {', '.join(presets)}.")
    p = {**presets[name]}
    modes = typing.get_args(typing.get_type_hints(Config).get("mode"))  # --mode M --help: M's folder
    mode = [m for m in [a.partition("=")[2] for a in _normalise(argv) if a.startswith("--mode=")][-1:] if m in modes]
    p["out"] = _default_out(Config, presets, name, {"mode": m for m in mode}, method) or p.get("out")
    out, flat = [], {k: v for k, v in p.items() if not isinstance(v, dict)}  # a dict: a stage's part (`pairs` too)
    for field, typ, default, note in fields:
        parts = ", ".join(f"{v[field]!r} ({k})" for k, v in p.items() if isinstance(v, dict) and field in v)
        out.append((field, typ, f"{flat.get(field, default)!r}" + (f"; {parts}" if parts else ""), note))
    return name, out


def resolve_config(Config, presets, preset, given, cross=True, **select):
    """Preset flat part, then its part keyed by the selected mode/stage, then the command line; validated (`cross`:
    with Config.check's rules between fields)."""
    if preset not in presets:
        raise UserError(f"unknown preset '{preset}'; choose one of {', '.join(presets)}.")
    p = presets[preset]
    values = {k: v for k, v in p.items() if not isinstance(v, dict)}
    names = {f.name for f in dataclasses.fields(Config)}
    for sel in ("mode", "stage"):
        if sel in names:
            val = select.get(sel) or given.get(sel) or values.get(sel) or Config.__dataclass_fields__[sel].default
            values.update(p.get(val, {}))
            values[sel] = val
    values.update({k: v for k, v in given.items() if k not in select})
    return check_config(Config(**values), cross=cross)


class Given(dict):
    """The Config fields given on the command line; .preset is the --preset given explicitly (else None)."""

    def __init__(self, items=(), preset=None):
        super().__init__(items)
        self.preset = preset


def parse_cli(Config, presets, method, argv=None, sampler=(), resumes=None):
    """-> (cmd, cfg, given). train: cfg is a Config; sample/fid: cfg is a namespace of SAMPLE_OPTS and `given` holds
    the Config fields to apply over the checkpoint's config (merge_config): only `sampler`, the fields the method's
    sampler reads (and fid's --data); any other field is the checkpoint's and giving it is refused, not ignored. A dict
    `sampler` maps a field to (reads(K), "the step counts that read it"), None where every step count reads it: a
    field that no --steps reads is refused too.
    resumes(cfg): the checkpoint a train command resumes (default --out's ckpt.pt; None: it never resumes a config);
    a run that starts afresh has its rules between fields checked here, a resumed one on its own config with the
    changes (resume_config). Bad input: UserError."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _NOTES.clear()  # a refused command's notes never reach the next command of the same process (tests, notebooks)
    named = bool(argv) and argv[0] in ("train", "sample", "fid")  # (a stray first word is named as one, below)
    cmd = argv.pop(0) if named else "train"
    hints = typing.get_type_hints(Config)
    for name, p in presets.items():  # unknown preset keys are found at start, for every preset
        for k, v in p.items():  # (a dict: the fields of one mode or stage)
            if bad := [x for x in (v if isinstance(v, dict) else [k]) if x not in hints]:
                raise UserError(f"preset '{name}' sets unknown field(s) {bad}.")
    fields = [s for s in _field_options(Config) if s[0] != "preset" or cmd != "train"]
    if cmd == "train":
        shown, fields = _preset_defaults(fields, Config, presets, argv, method)
        options = [("preset", str, repr(shown), "one of " + ", ".join(presets) + f" (the defaults below are {shown}'s; "
                    f"--preset NAME --help shows another's)"), *fields]
        epilog = (f"sample/fid: python {method}.py sample|fid --ckpt PATH [--steps 1,2 --n N --out PATH ...]" + (
            f" plus the\nsampler's fields (over the checkpoint's config); `python {method}.py sample --help` lists "
            f"them." if sampler else f"; the rest\nis the checkpoint's (`python {method}.py sample --help`)."))
    else:
        reads = (*sampler, "data") if cmd == "fid" else tuple(sampler)
        options = [(k, t, repr(d), note) for k, (t, d, note) in SAMPLE_OPTS.items() if cmd == "fid" or
                   k not in FID_ONLY] + [(k, t, "the checkpoint's", note) for k, t, d, note in fields if k in reads]
        epilog = None
    parser = _parser(f"{method}.py", options, epilog)
    parser.usage = f"python {method}.py {cmd} " + ("[--preset " + "|".join(presets) + "] " if cmd == "train" else
                                                   "--ckpt PATH ") + "[--field value ...]"
    if "--help" in argv or "-h" in argv:
        print(parser.format_help())
        sys.exit(0)
    ns, extra = parser.parse_known_args(_normalise(argv))  # a repeated option: the last one wins (wrappers rely on it)
    if extra:
        key = extra[0].partition("=")[0]
        if not key.startswith("--"):
            raise UserError(f"unexpected argument '{extra[0]}'; options look like --field value" + (
                ", and the command (train, sample or fid) comes first." if extra[0] == argv[0] and not named
                and not extra[0].startswith("-") else "."))  # (not after a command, nor for a one-dash option)
        if cmd != "train" and (key[2:] in hints or key[2:] in SAMPLE_OPTS):
            can = ", ".join(f"--{k}" for k in reads)
            raise UserError(f"sample does not read {key} (fid does); drop it." if key[2:] in FID_ONLY else
                            f"{cmd} takes {key} from the checkpoint (the run as it was trained) and changes only "
                            + (f"{can} of its fields" if can else "its own options") + f" (`python {method}.py {cmd} "
                            f"--help`); drop it" + (", and give step counts with --steps." if key.endswith("steps")
                                                    else "."))
        names = [s[0] for s in options] + [ALIASES[s[0]] for s in options if s[0] in ALIASES]  # (or a prefix: --it)
        close = difflib.get_close_matches(key[2:], names, 3) or [n for n in names if n.startswith(key[2:] or "-")][:3]
        raise UserError(f"unknown option {key}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                   if close else "."))
    raw = vars(ns)
    if empty := next((k for k in ("teacher", "pairs", "fid_ref") if raw.get(k) == ""), None):  # (some checks: none)
        raise UserError(f"--{empty} needs a {'folder' if empty == 'pairs' else 'file'} name (or leave it out).")
    for k in ("data", "teacher", "pairs"):  # a file or folder given is recorded where it is: a resume, or the fid
        if raw.get(k) and raw[k] not in NAMED_DATA and (k == "pairs" or os.path.exists(raw[k])):  # of its data, run
            raw[k] = os.path.abspath(raw[k])  # from another working directory, still finds it (--pairs: a folder the
            # pairs stage is yet to make; a missing --data or --teacher stays as given, for its refusal)
    if cmd != "train":
        return cmd, _sample_options(cmd, raw, sampler), Given(raw)
    given = Given(raw, raw.pop("preset", None))
    preset = given.preset or "toy"
    out = _default_out(Config, presets, preset, given, method)
    mode = None  # a run resumed without --mode is checked as its checkpoint's mode, not the preset's default
    ckpt = os.path.join(given.get("out") or out or "", "ckpt.pt")
    if "mode" in hints and "mode" not in given and given.get("resume") is not False:
        mode = saved_config(ckpt).get("mode")
        if mode not in typing.get_args(hints["mode"]):  # (none, or not a mode: the run's own checks say why)
            mode = None
    cfg = resolve_config(Config, presets, preset, {**given, "out": out} if out else given, cross=False,
                         **({"mode": mode} if mode else {}))
    if "preset" in hints:
        cfg.preset = preset
    path = (resumes or (lambda c: os.path.join(c.out, "ckpt.pt")))(cfg)
    if given.get("resume") is False or not (path and os.path.isfile(path)):  # a resumed run's rules between fields
        check_rules(cfg)  # hold for its own config with the changes (resume_config), not the preset's (IMM's --M)
    return cmd, cfg, given


# ===================================================================================================== resume and entry
def saved_config(path):
    """The config dict of the checkpoint at `path`, read without its tensors (mmap); {} when there is none or it is
    unreadable (the run that loads it says why)."""
    try:
        c = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["config"]
    except Exception:
        return {}
    return c if isinstance(c, dict) else {}


def pipeline_data(Config, presets, cfg, given, first, **select):
    """A pipeline (scm --mode all, rectified_flow --stage all) restarted over its first stage's checkpoint `first`
    takes that run's --data, --seed and --preset where none is given, and refuses another named data set before any
    stage (docs/common.md, "Resume semantics"). -> (cfg, given): the config resolved again with them (noted) and
    checked (check_rules), and `given` with them (.preset: the first stage's). --resume false: left alone."""
    if given.get("resume") is False:
        return cfg, given
    saved = saved_config(first)
    if "data" in given:
        check_teacher_data(saved, given["data"], first)
    keep = {k: saved[k] for k, t in (("data", str), ("seed", int)) if k not in given and isinstance(saved.get(k), t)}
    preset = getattr(given, "preset", None) or saved.get("preset")
    given = Given({**given, **keep}, preset if preset in presets else getattr(given, "preset", None))
    other = given.preset not in (None, cfg.preset)
    if other or keep:
        took = [f"--preset {given.preset}"] * other + [f"--{k} {v}" for k, v in keep.items()]
        note(f"config: {' '.join(took)} (from '{first}': a restarted pipeline keeps its first stage's)")
        name = given.preset or cfg.preset
        cfg = resolve_config(Config, presets, name, {**given, "out": cfg.out}, cross=False, **select)
        cfg.preset = name  # (as parse_cli: the preset label is not a preset's value)
    return check_rules(cfg), given  # (parse_cli left them to this restart: with its first stage's data, before any)


_NOTES = []  # the lines `note` holds back until `flush_notes`


def note(msg):
    """A line printed with the command's first output (flush_notes), after its checks."""
    _NOTES.append(msg)


def flush_notes(env):
    """Print the pending notes (config changes, the data line; rank 0): called where a command first prints, after
    its checks, so that nothing precedes a refusal's `error:` line."""
    if env.is_main:
        for m in _NOTES:
            print(m, flush=True)
    _NOTES.clear()


def merge_config(Config, base, given, log=None):
    """Config from a checkpoint's `config` dict with the command-line fields `given` on top (resume, sample);
    validated, a bad checkpoint value named as the checkpoint's. The changes are noted ("config: ..."; `log`, else
    held back until flush_notes)."""
    log = log or note
    if unknown := set(base) - {f.name for f in dataclasses.fields(Config)}:
        raise UserError(f"checkpoint config has fields {sorted(unknown)} that this file does not know.")
    for k, v in given.items():
        if k in base and base[k] != v:
            log(f"config: {k} = {v!r} (checkpoint had {base[k]!r})")
    try:
        cfg = Config(**{**base, **given})
    except TypeError as e:
        raise UserError(f"checkpoint config does not fit this file's Config ({e}).") from None
    return check_config(cfg, who=lambda k: "--" if k in given else "the checkpoint's ", device=False)


LOCATIONS = ("data", "root", "teacher", "pairs")  # where files are (a moved folder), not how a run trains


def resume_config(Config, ck, cfg, given, path, fixed=(), drop=(), log=None, iters="iters"):
    """The config of a resumed run: the checkpoint's with the command line's fields applied (out, device, precision and
    compile always this command line's, a changed precision or compile noted; the preset label stays the
    checkpoint's), by the rules of docs/common.md, "Resume semantics". `fixed`: the fields that
    cannot change on resume (the seed always: the RNG state is the checkpoint's); `drop`: given fields that are not
    config changes (the mode/stage selector); `iters`: the field that counts the steps (not below the checkpoint's
    step). Another explicit --preset or another data set is refused. A --teacher is compared by same_file, or, where
    the checkpoint records `teacher_id`, left to the method (`teacher_id`). A run that has trained all its steps
    applies no change but where its files are (LOCATIONS), and notes each other one as not applied."""
    base, preset, here = ck["config"], getattr(given, "preset", None), ("out", "device", "precision", "compile")
    if preset is not None and base.get("preset", preset) != preset:
        raise UserError(f"'{path}' was trained with --preset {base['preset']}; a resumed run keeps its config (change "
                        f"single fields, or use another --out for --preset {preset}).")
    for k in ("seed", *fixed):
        if k == "teacher" and ck.get("teacher_id") is not None and given.get("teacher"):
            continue  # (a path: the method checks its weights; none is compared, and refused, below)
        if k in given and not (same_file if k == "teacher" else operator.eq)(given[k], base.get(k)):
            raise UserError(f"'{path}' was trained with --{k} {base.get(k)}; a resumed run cannot change it (use "
                            f"another --out for --{k} {given[k]}).")
    was = base.get("data")  # another data set: named, or a named one for a file
    if "data" in given and given["data"] not in NAMED_DATA and not os.path.exists(given["data"]):
        raise _no_data(given["data"])  # (a mistyped path was said to change the resumed run's data)
    if "data" in given and not same_file(given["data"], was) and (was in NAMED_DATA or given["data"] in NAMED_DATA):
        raise UserError(f"'{path}' was trained on --data {was}; a resumed run keeps its data (use another --out for "
                        f"--data {given['data']}).")  # (two files: perhaps the same data moved; noted as a change)
    apply = {k: v for k, v in given.items() if k not in ("resume", *here, *drop)}
    if ck["step"] >= apply.get(iters, base.get(iters, 0)):  # finished: no step left that a change could reach, so it
        for k in [k for k, v in apply.items() if k in base and base[k] != v and k not in (iters, *LOCATIONS)]:
            (log or note)(f"config: --{k} {apply.pop(k)!r} not applied: '{path}' has trained its {ck['step']} steps")
    if "batch" in apply and "batch" in base and apply["batch"] != base["batch"]:  # (not finished: not popped above)
        fit = " (--accum splits each batch to fit memory)" if "accum" in {f.name for f in dataclasses.fields(Config)} \
            else ""
        raise UserError(f"'{path}' was trained with --batch {base['batch']}, and its data position, images seen (EMA, "
                        f"lr ramp) count steps x batch; a resumed run keeps it{fit}, or use another --out.")
    now = {k: getattr(cfg, k) for k in here if hasattr(cfg, k)}  # this command line's, checked with the rest (a
    new = merge_config(Config, {"preset": cfg.preset, **base, **now}, apply, log=log)  # saved compile that a rule
    # now refuses, flow_map's meanflow, is not this run's; config.json stays the run's)
    if iters in given and given[iters] < ck["step"]:
        raise UserError(f"'{path}' is at step {ck['step']}; --{iters} {given[iters]} would end before it (give at "
                        f"least {ck['step']}, or use another --out).")
    n, s = getattr(new, iters, None), ck["step"]  # a cosine decay to another end: the lr of every step left changes
    cosine = base.get("lr_schedule") == getattr(new, "lr_schedule", None) == "cosine"
    if cosine and base.get(iters) not in (n, None) and s < n:
        f = lambda end: 0.5 * (1 + math.cos(math.pi * s / end)) if end else 0.0
        (log or note)(f"config: the cosine lr decay now ends at step {n}, not {base[iters]}: its factor at step {s} "
                      f"goes from {f(base[iters]):.3g} to {f(n):.3g} (not a run of {n} steps from the start)")
    for k, v in now.items():  # where and how this process runs: this command line's, merged above (the saved config
        if k in ("precision", "compile") and k in base and base[k] != v:  # says what ran; numbers change: noted)
            show = lambda v: "auto" if v is None else repr(v)  # (None: the device's default)
            (log or note)(f"config: {k} = {show(v)} (checkpoint had {show(base[k])}; " + (
                "given" if k in given else "this command's default") + ")")
    return new


def check_not_beneath(out, path, given, made, what, instead):
    """A pipeline in `out` resumed with more --iters (scm --mode all, rectified_flow --stage all) would train its
    first stage (checkpoint `path`, `what`) on beneath the later stages it made (`made`): refused before any work."""
    ck = load_checkpoint(path)
    target = given.get("iters", ck["config"].get("iters", 0))
    if ck["step"] < target:
        raise UserError(f"'{out}' holds {' and '.join(made)} made from its {what} at step {ck['step']}, which this "
                        f"command would train on to step {target} beneath them; {instead}, or use another --out.")


def _speaks():
    """Under torchrun rank 0 alone prints the error line; everywhere when the launch itself is malformed."""
    try:
        return check_launch()[0] == 0
    except UserError:
        return True


def _out_of_memory(e):
    """torch.OutOfMemoryError, or a CUDA library's own allocation failing where the caching allocator holds the rest of
    the memory (cuBLAS / cuDNN handles and workspaces: CUBLAS_STATUS_ALLOC_FAILED, cuDNN 9's
    CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED, a bare "CUDA error: out of memory"), a plain RuntimeError
    but out of memory all the same: what every `except RuntimeError` that turns a file's fault into a sentence passes
    through to main_guard's out-of-memory sentence."""
    m = str(e)
    return isinstance(e, torch.OutOfMemoryError) or any(
        k in m for k in ("ALLOC_FAILED", "ALLOCATION_FAILED", "CUDA error: out of memory"))


def _sentence(e):
    """The error line of an exception that is the user's or the machine's situation, not a bug (else None): bad input,
    a full disk, out of memory, a torch.compile that cannot build its kernels here (no working C++ compiler, ...), a
    torchrun peer gone."""
    if isinstance(e, UserError):
        return str(e)
    if isinstance(e, OSError):
        return None if e.errno not in (errno.ENOSPC, errno.EDQUOT) else \
            e.strerror + (f" while writing '{e.filename}'." if e.filename else ".")
    m = str(e)
    if isinstance(e, MemoryError) or _out_of_memory(e) or "can't allocate memory" in m \
            or "Storage size calculation overflowed" in m:
        return "out of memory (or a size beyond any memory); lower --batch, --n, --eval_n or the network's size."
    if re.search(r"gloo.*Connection (closed|reset) by peer", m):  # a collective whose peer is gone under torchrun
        # (killed, interrupted, or stopped on an error it reported): a traceback here would say nothing more
        return "another process of this torchrun job stopped (its lines and torchrun's say why); this one stops too."
    if "cannot be converted to type" in m and "without overflow" in m:  # torch's optimisers on, e.g., --lr 1e38
        return "a value overflows float arithmetic (a learning rate such as 1e38); give a smaller one."
    if type(e).__name__ in ("InductorError", "BackendCompilerFailed") and re.search(
            r"InvalidCxxCompiler|CppCompileError|C\+\+ compile|working C\+\+ compiler|[Tt]riton", m):  # the toolchain
        first = next((ln.strip() for ln in m.splitlines() if ln.strip()), type(e).__name__)[:160].rstrip(".")
        return f"--compile failed on this machine ({first}); run without --compile."
    return None


def main_guard(fn):
    """Run fn(); UserError -> 'error: ...' and exit 2 (a full disk too), Ctrl-C -> 130; always tear the process
    group down. After a success every rank meets at a barrier first, so that no rank tears its connections down
    while another still finishes (a gloo rank that did so was seen to abort on a loaded machine)."""
    code = 0
    try:
        fn()
        if dist.is_initialized():
            dist.barrier()
    except BrokenPipeError:  # stdout closed early (`--help | head`): Python's documented recipe, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    except (UserError, OSError, MemoryError, RuntimeError) as e:
        msg = _sentence(e)
        if msg is None:  # a bug: the traceback is the report
            raise
        if _speaks():  # (a line break in a path given, "a\nb.npy", split the line in two)
            print("error: " + msg.replace("\r", "\\r").replace("\n", "\\n"), file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


# ============================================================================================================== logging
def stopwatch():
    """A function returning "total <wall> s wall (<CPU> s CPU)" since this call: the run's own times
    (time.process_time counts from the process start, which in a process running several runs is not the run's)."""
    w, c = time.time(), time.process_time()
    return lambda: f"total {time.time() - w:.1f} s wall ({time.process_time() - c:.1f} s CPU)"


@contextlib.contextmanager
def held_output():
    """What Python code prints inside the block (torch hub's "Downloading: ..." line for a weights file, torchvision's
    progress bar) is held back: a note after the block if it succeeds (printed with the command's first output, after
    its checks; a progress bar by its last state), dropped if it raises, so that nothing precedes an `error:` line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        yield
    lines = [ln.split("\r")[-1].rstrip() for ln in (out.getvalue() + err.getvalue()).split("\n")]
    if any(lines):
        note("\n".join(ln for ln in lines if ln))


def _trim_jsonl(path, keep, other=False):
    """Keep the rows of a .jsonl log that pass keep(row), atomically; a row keep cannot read (no "step", not an
    object) or that does not parse is kept when `other`."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        rows = f.readlines()
    kept = []
    for r in rows:
        try:  # (invalid UTF-8 is a ValueError)
            ok = keep(json.loads(r.decode()))
        except (ValueError, TypeError, KeyError, AttributeError, RecursionError):  # (a row that is not an object;
            # [[[...]]] nested 100,000 deep was a RecursionError traceback)
            ok = other
        if ok:
            kept.append(r if r.endswith(b"\n") else r + b"\n")  # (a kill between a row and its newline)
    with open(path + ".tmp", "wb") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


class Logger:
    """Rank 0 prints and appends log.jsonl; `log` is called on every rank (one all_reduce, one host copy; under DDP a
    second, of one flag, after rank 0's write: agree, so that its failure stops every rank; at log lines only, which
    read the device anyway). With a Guard attached, each line also holds `skipped` (optimiser steps skipped since the
    previous line), a NaN loss is logged as such, and the Guard decides when to stop; without one a non-finite value
    stops the run."""

    def __init__(self, out, env, total_steps, global_batch, config=None, start_step=0):
        fresh, start_step = start_step is None, start_step or 0  # None: a fresh run (no checkpoint resumed)
        self.out, self.env, self.total, self.gb, self.guard = out, env, total_steps, global_batch, None
        self.t_last, self.s_last = time.time(), start_step  # rates count from here (includes warm-up)

        def start():  # rank 0's files (a full disk stops every rank: agree)
            os.makedirs(out, exist_ok=True)
            if fresh and os.path.isfile(old := os.path.join(out, "ckpt.pt")):  # --resume false over an earlier run:
                # its checkpoint goes with its history (kept, a kill before this run's first checkpoint left it beside
                # this run's rows, and a plain restart resumed it with them as its own)
                os.remove(old)
                note(f"note: --resume false: the earlier run's checkpoint '{old}' is removed with its history.")
            if config is not None:
                with open(os.path.join(out, "config.json"), "w") as f:
                    json.dump(dataclasses.asdict(config), f, indent=1)
            for name in ("log.jsonl", "metrics.jsonl", "fid_train.jsonl"):  # this run's history only: a resumed
                # run's rows up to its step (a killed run's rows past it go), none of a fresh run's
                _trim_jsonl(os.path.join(out, name), lambda r: 0 < start_step and r["step"] <= start_step)
        agree(env, start)

    def info(self, msg):
        flush_notes(self.env)
        if self.env.is_main:
            print(msg, flush=True)

    def log(self, step, **scalars):
        g = self.guard
        if g is not None:
            scalars = {**scalars, "skipped": g.count, "_run": g.run}
        v = torch.stack([torch.as_tensor(x, device=self.env.device, dtype=torch.float32).detach().reshape(())
                         for x in scalars.values()])
        vals = dict(zip(scalars, all_mean(v, self.env).tolist()))  # the host transfer of this logging step
        run = vals.pop("_run", 0)
        for k, x in vals.items():
            if not math.isfinite(x) and g is None:
                raise UserError(f"{k} became NaN/inf at step {step}; last checkpoint kept.")
        now = time.time()
        rate = (step - self.s_last) * self.gb / max(now - self.t_last, 1e-9)
        eta = (self.total - step) * self.gb / rate if rate else 0.0
        self.t_last, self.s_last = now, step

        def write():  # rank 0's line (a full disk stops every rank: agree)
            rec = dict(step=step, kimg=step * self.gb / 1000, time=now, img_per_s=rate, eta_s=eta, **vals)
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            flush_notes(self.env)
            body = " | ".join(f"{k} {x:.4g}" for k, x in vals.items() if k != "skipped" or x)
            print(f"step {step}/{self.total} | {body} | {rate:,.0f} img/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s",
                  flush=True)
        agree(self.env, write)
        if g is not None:
            g.count.zero_()
            g.check_run(step, run)
        return vals


# ============================================================================================================= pictures
def _grid(u8, pad=2):
    """uint8 NHWC -> one HWC picture (torchvision's make_grid): ceil(sqrt(N)) columns, `pad` black pixels between."""
    import torchvision.utils
    t = torch.as_tensor(np.asarray(u8)).permute(0, 3, 1, 2)
    return torchvision.utils.make_grid(t, nrow=math.ceil(math.sqrt(len(t))), padding=pad).permute(1, 2, 0).numpy()


def save_panels(path, panels):
    """One row of panels: (title, (N,2) points) -> scatter in [-1.5, 1.5]^2; (title, uint8 NHWC) -> grid."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3 * len(panels), 3.3))
    for ax, (title, a) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
        if a.ndim == 2:
            ax.scatter(a[:, 0], a[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_aspect("equal")
            ax.set_xticks([-1, 0, 1]), ax.set_yticks([-1, 0, 1])
        else:
            ax.imshow(_grid(a), cmap="gray"), ax.axis("off")
        ax.set_title(title.encode(errors="surrogateescape").decode(errors="replace"), fontsize=9, parse_math=False)
        # (a file name that is not UTF-8 holds surrogates, which matplotlib's fonts refuse; '$' is not mathtext)
    n = len(panels)  # fixed margins and ticks: tight_layout's text measuring took most of a small run's plotting time
    fig.subplots_adjust(left=0.08 / n, right=1 - 0.02 / n, bottom=0.08, top=0.92, wspace=0.25)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with warnings.catch_warnings():  # a title in a script its font lacks (CJK): boxes, not a warning on stderr
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        fig.savefig(path, dpi=100)


SAMPLE_EXT = (".npy", ".npz", ".png", ".zip")  # what `sample --out` writes (save_array)


def check_sample_out(path):  # (preflight's check before any work, and save_array's own)
    if not path.endswith(SAMPLE_EXT):
        raise UserError(f"--out must end in {', '.join(SAMPLE_EXT[:-1])} or {SAMPLE_EXT[-1]}, got '{path}'.")


def save_array(path, arr):
    """.npy (float32 points / uint8 NHWC images), .npz (the same as arr_0: guided-diffusion's evaluator.py reads it),
    .png (scatter / grid) or .zip (images only, sample_or_fid checks: one PNG each, 000000.png on; EDM's fid.py
    --images and load_data read it), whole or not at all: written beside it under a short temporary name, then
    renamed over it (a full disk or Ctrl-C never leaves part of one in a good file's place)."""
    a = arr.detach().cpu().numpy() if torch.is_tensor(arr) else np.asarray(arr)
    a = a.astype(np.float32) if a.ndim == 2 else a.astype(np.uint8)
    check_sample_out(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, f".{os.getpid()}.tmp{path[-4:]}")  # (short: --out's name may be as long as names go)
    try:
        if path.endswith((".npy", ".npz")):
            with open(tmp, "wb") as f:  # (np.save appends .npy to a name without it)
                np.save(f, a) if path.endswith(".npy") else np.savez(f, arr_0=a)
        elif path.endswith(".zip"):
            from PIL import Image  # (torchvision's dependency)
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as z:  # (PNG is compressed already)
                for i, img in enumerate(a):
                    buf = io.BytesIO()
                    Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format="png")
                    z.writestr(f"{i:06d}.png", buf.getvalue())
        else:
            save_panels(tmp, [(os.path.basename(path), a)])
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ============================================================================================== evaluation and commands
def n_steps(K):
    """"1 step", "2 steps", ...: the step count in panel titles, printed sampler names and in-training FID labels."""
    return f"{K} step{'s' * (K > 1)}"


class EvalSheet:
    """One evaluation of a run (rank 0, no collectives): the reference points, one picture panel and (for points)
    SWD, MMD^2 and the toy scores per sample set, appended to metrics.jsonl. `g` draws the reference points
    (default: a generator seeded derive_seed(seed, "eval")); `extra` goes into the metrics row."""

    def __init__(self, data, shape, eval_n, seed, step, g=None, **extra):
        self.t0, self.data, self.seed = time.time(), data, seed
        self.n = eval_n if len(shape) == 1 else min(eval_n, 64)
        self.metrics, self.panels, self.ref = dict(step=step, **extra), [], None
        if len(shape) == 1:
            g = g or torch.Generator().manual_seed(derive_seed(seed, "eval"))
            self.ref = (toy_sample(data.key, self.n, g) if data.kind == "toy" else
                        data.x[torch.randperm(len(data.x), generator=g)[:self.n].to(data.x.device)]).cpu()
            self.panels.append(("data", self.ref))

    def rng(self, device, name="eval"):
        """The evaluation noise: sample indices 0..n-1, the same at every evaluation of a run."""
        return IndexRNG(range(self.n), derive_seed(self.seed, name), device)

    def add(self, key, title, xs):
        xs = xs.detach().float().cpu()
        if self.ref is None:
            self.panels.append((title, to_uint8(xs).permute(0, 2, 3, 1).numpy()))
            return
        m = min(len(xs), len(self.ref))
        self.metrics[f"swd_{key}"] = swd(xs[:m], self.ref[:m])
        self.metrics[f"mmd2_{key}"] = mmd2(xs[:2000], self.ref[:2000])
        if self.data.kind == "toy":  # modes / in_mode (8 Gaussians), in_square (checkerboard)
            self.metrics.update({f"{k}_{key}": v for k, v in toy_scores(xs, self.data.key).items()})
        self.panels.append((title, xs))

    def write(self, out, name="samples.png"):
        """The picture, and the metrics row, which replaces a row of the same step (a finished run or stage run again
        evaluates its last step again)."""
        self.metrics["eval_s"] = time.time() - self.t0
        save_panels(os.path.join(out, name), self.panels)
        _trim_jsonl(os.path.join(out, "metrics.jsonl"), lambda r: r["step"] != self.metrics["step"], other=True)
        with open(os.path.join(out, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(self.metrics) + "\n")
        return self.metrics


def _sample_options(cmd, raw, sampler):
    """parse_cli's sample/fid options (SAMPLE_OPTS), popped from `raw` and checked; a sampler field that none of
    --steps reads (`sampler` a dict: parse_cli) is refused."""
    opts = {k: raw.pop(k, d) for k, (t, d, _) in SAMPLE_OPTS.items()}
    for k, (t, d, _) in SAMPLE_OPTS.items():
        if opts[k] is not None:
            check_value(k, t, opts[k], RANGES.get(k) if k != "n" or cmd == "sample" else ">= 2")
    if not opts["ckpt"]:
        raise UserError(f"{cmd} needs --ckpt PATH.")
    if not opts["steps"]:
        raise UserError("--steps needs at least one step count (such as --steps 1,2).")
    if (twice := _repeated(opts["steps"])) is not None:
        raise UserError(f"--steps lists {twice} twice; give each step count once.")
    at = {k: v for k, v in (sampler.items() if isinstance(sampler, dict) else ()) if v and k in raw}
    if unread := next((k for k, (reads, _) in at.items() if not any(map(reads, opts["steps"]))), None):
        raise UserError(f"--{unread} is read only at {at[unread][1]}, and --steps {','.join(map(str, opts['steps']))}"
                        f" holds none; drop it, or add such a step count.")
    check_device(opts["device"], opts["precision"])
    opts["n"] = opts["n"] or (50_000 if cmd == "fid" else 64)
    return types.SimpleNamespace(**opts)


def _sharded(batch_of, n, batch, env, shape, dtype):
    """Samples 0..n-1 in index order: batch_of(idx) -> (len(idx), *shape) of dtype, the batches shared out over the
    ranks as the FID shares them (_shards), then gathered (each rank computes 1/world of them)."""
    chunks = _shards(n, batch, env)
    mine = [batch_of(idx) for idx in chunks[env.rank::env.world] if len(idx)]
    if env.world == 1:
        return torch.cat(mine)
    lengths = [[len(c) for c in chunks[r::env.world]] for r in range(env.world)]
    buf = torch.zeros(max(map(sum, lengths)), *shape, dtype=dtype, device=env.device)  # equal sizes for all_gather
    buf[:sum(lengths[env.rank])] = torch.cat(mine) if mine else buf[:0]
    parts = [torch.empty_like(buf) for _ in range(env.world)]
    dist.all_gather(parts, buf)
    pieces = [p[:sum(ls)].split(ls) for p, ls in zip(parts, lengths)]  # rank r holds chunks r, r + world, ...
    return torch.cat([pieces[j % env.world][j // env.world] for j in range(len(chunks))])


def _counted(generate, env):
    """generate, counting on the device (g.bad) its samples that hold a NaN or inf: to_uint8 turns them into black
    pixels and np.save keeps them, so a NaN would be written, or scored, without a word."""
    def g(rng, labels):
        x = generate(rng, labels)
        g.bad.add_((~torch.isfinite(x.reshape(len(x), -1)).all(1)).sum())
        return x
    g.bad = torch.zeros((), dtype=torch.int64, device=env.device)
    return g


def _bad_total(g, env):
    """_counted's count summed over the ranks, read once (every rank gets the same number)."""
    if env.world > 1:
        dist.all_reduce(g.bad)
    return g.bad.item()


def _refuse_non_finite(g, env, n, K):
    """After a step count's samples (g: _counted's): every rank refuses together (the counts summed) before anything
    is written."""
    if bad := _bad_total(g, env):
        raise UserError(f"{bad} of the {n} samples at {n_steps(K)} hold NaN or inf values (the weights, or a "
                        f"sampler field, out of range); nothing is written for them.")


def sample_or_fid(cmd, opts, env, cfg, ck, shape, gen, name, num_classes=0, record=None):
    """The `sample` and `fid` commands of every method file. gen(K) -> generate(rng, labels) for K steps; name(K)
    describes the sampler in the printed line; record(K): extra fields of the fid.jsonl row. Labels (class-
    conditional models) are drawn per sample index, as compute_fid draws them."""
    if cmd == "sample":
        base = opts.out or os.path.join(os.path.dirname(opts.ckpt), "samples.png")
        stem, ext = base[:-4], base[-4:]  # (preflight checked the ending; splitext calls '.npy' a name, no extension)
        paths = {K: f"{stem}_{K}step{ext}" if len(opts.steps) > 1 or not opts.out else base for K in opts.steps}
        if d := next((p for p in paths.values() if os.path.isdir(p)), None):
            raise UserError(f"'{d}' is a folder where sample would write its samples; remove it or give another --out.")
        points = len(shape) == 1  # stored as the file holds them: float32 points, uint8 NHWC images
        if points and base.endswith(".zip"):  # (before any sampling)
            raise UserError(f"--out '{base}': a .zip holds images; write 2-D points to .npy, .npz or .png.")
        stored, dtype = (shape, torch.float32) if points else ((*shape[1:], shape[0]), torch.uint8)
        for K in opts.steps:
            generate = _counted(gen(K), env)

            def batch_of(idx):
                rng = IndexRNG(idx.tolist(), opts.seed, env.device)
                x = generate(rng, rng.randint(num_classes) if num_classes else None)
                return x.float() if points else to_uint8(x).permute(0, 2, 3, 1)
            x = _sharded(batch_of, opts.n, opts.batch, env, stored, dtype)
            _refuse_non_finite(generate, env, opts.n, K)  # (a NaN never replaces a good file)
            flush_notes(env)
            said = f"wrote {paths[K]} ({opts.n} sample{'s' * (opts.n != 1)}, {name(K)})"
            agree(env, lambda: (save_array(paths[K], x), print(said)))
        return
    if len(shape) == 1:
        raise UserError("FID needs an image model; a 2-D run's metrics.jsonl beside its ckpt.pt holds its SWD and "
                        "MMD² per step count, and samples written with `sample --out s.npy` can be scored with "
                        "common.swd and common.mmd2.")
    if opts.fid_ref and cfg.data != ck["config"].get("data"):
        raise UserError("--data and --fid_ref both name the reference: fid reads the statistics of --fid_ref, so give "
                        "one of them.")
    det = load_detector(opts.fid_detector, env)
    data = None if opts.fid_ref else load_data(cfg.data, opts.root, env, cfg.seed, False)
    if data is not None and (data.kind != "images" or tuple(data.shape) != tuple(shape)):
        what = f"images of shape {tuple(data.shape)}" if data.kind == "images" else "2-D points"
        raise UserError(f"the data '{cfg.data}' are {what}, but the model generates images of shape {tuple(shape)}; "
                        f"FID compares the two, so give data of its shape.")
    ref = reference_stats(data, det, env, opts.root, opts.fid_ref)
    for K in opts.steps:
        generate = _counted(gen(K), env)
        fid = compute_fid(generate, opts.n, ref, det, env, opts.batch, opts.seed, num_classes)
        _refuse_non_finite(generate, env, opts.n, K)
        flush_notes(env)

        def write():  # rank 0 (a full disk stops every rank: agree)
            print(f"FID-{opts.n / 1000:g}k | {name(K)} | {fid:.4f}")
            row = dict(ckpt=os.path.abspath(opts.ckpt), step=ck["step"], steps=K, **(record(K) if record else {}),
                       n=opts.n, seed=opts.seed, detector=det.name, fid=fid, ema=opts.ema, precision=env.precision,
                       ref=os.path.abspath(opts.fid_ref) if opts.fid_ref else cfg.data)  # (rows against another
            # reference or precision looked alike)
            path = opts.out or os.path.join(os.path.dirname(opts.ckpt), "fid.jsonl")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # (preflight let --out name a new
            # folder: a traceback after the whole FID, its row lost). The row replaces one of the same measurement (all
            # but the score equal: a re-run after an interruption), other rows and lines that do not parse stay; its
            # ckpt is absolute (a relative one from another folder, into a shared --out, named another checkpoint)
            measured = lambda r: {k: v for k, v in r.items() if k != "fid"}  # what a row measured, its score aside
            same = measured(json.loads(json.dumps(row)))
            _trim_jsonl(path, lambda r: measured(r) != same, other=True)
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")
        agree(env, write)


# ========================================================================================================== toy metrics
def swd(a, b, n_dir=1024):
    """Sliced Wasserstein-1: mean over 1024 fixed (seed 0) unit directions of the 1-D W1 of projections."""
    a, b = (torch.as_tensor(v).detach().cpu().double() for v in (a, b))
    if len(a) != len(b):
        raise ValueError("swd needs equal-size sets")
    d = torch.randn(a.shape[1], n_dir, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    d = d / d.norm(dim=0, keepdim=True)
    pa, pb = (torch.from_numpy(np.sort((d.T @ v.T).numpy(), 1)) for v in (a, b))  # (n_dir, N), sorted along the
    return (pa - pb).abs().mean().item()  # contiguous dimension by numpy (5x faster than torch.sort on a CPU)


def mmd2(a, b, hs=(0.02, 0.05, 0.1, 0.2, 0.5)):
    """Biased (V-statistic) MMD^2 with a sum of RBF kernels exp(-|x-y|^2 / 2h^2)."""
    a, b = (torch.as_tensor(v).detach().cpu().double() for v in (a, b))

    def k(d2):  # kernel sum over the given squared distances, every bandwidth
        return sum(torch.exp(d2 * (-0.5 / (h * h))).sum() for h in hs)

    def k_self(x):  # mean over all n^2 pairs: the pairs i < j twice (pdist, half the work) plus the diagonal
        return (2 * k(torch.pdist(x).square()) + len(x) * len(hs)) / len(x) ** 2
    return (k_self(a) + k_self(b) - 2 * k(torch.cdist(a, b).square()) / (len(a) * len(b))).item()


def modes_covered(x, centres, std):
    """Modes holding at least 25% of their fair share of samples within 3 std of their centre."""
    d = torch.cdist(torch.as_tensor(x).detach().cpu().float(), torch.as_tensor(centres).float())
    counts = (d < 3 * std).sum(0)
    return int((counts >= 0.25 * len(d) / len(centres)).sum())


def in_mode(x, centres, std):
    """Fraction of samples within 3 std of some mode centre."""
    d = torch.cdist(torch.as_tensor(x).detach().cpu().float(), torch.as_tensor(centres).float())
    return (d.min(1).values < 3 * std).float().mean().item()


def in_square(x):
    """Checkerboard: fraction of samples inside one of its 8 filled unit squares (the data itself gives 1.0).
    In toy_sample's units a cell is 1/2 / RMS wide and cell (i, j) of [-2, 2)^2 is filled iff i + j is even."""
    u = torch.as_tensor(x).detach().cpu().double() * (_TOY_RMS["checkerboard"] / 0.5)
    inside = ((u >= -2) & (u < 2)).all(1) & (u.floor().sum(1) % 2 == 0)
    return inside.double().mean().item()


def toy_scores(x, name):
    """The sharpness scores of a named toy, keyed for metrics.jsonl: 8 Gaussians -> modes, in_mode;
    checkerboard -> in_square; other toys -> {}."""
    if name == "checkerboard":
        return dict(in_square=in_square(x))
    modes = toy_modes(name)
    return dict(modes=modes_covered(x, *modes), in_mode=in_mode(x, *modes)) if modes else {}
