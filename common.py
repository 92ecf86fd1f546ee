"""common.py: the one module every method file shares (specs/common.md).

Networks (DDPM++-style U-Net, 2-D MLP, weighting head), data (2-D toys, CIFAR-10, (Fashion-)MNIST, .npy,
image folders; uint8 on the device), EMA, FID (Inception TorchScript, float64 statistics), distributed and
mixed-precision setup, atomic checkpoints, config parsing, logging, pictures and the toy metrics.
No method maths lives here: preconditioning, schedules, losses and samplers stay in the method files.
"""
import contextlib, copy, dataclasses, difflib, hashlib, inspect, json, math, os, re, sys, time, types, typing
from dataclasses import dataclass
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class UserError(Exception):
    """Bad input: printed as one sentence by `main_guard`, exit status 2."""


# ==================================================================================== networks (spec §3)
def _gn(c, affine=True, ln=False):
    if ln:  # the MLP's norm (§3.8)
        return nn.LayerNorm(c, eps=1e-6, elementwise_affine=affine)
    g = min(32, max(c // 4, 1))
    while c % g:  # nearest divisor of C (pitfall 1)
        g -= 1
    return nn.GroupNorm(g, c, eps=1e-6, affine=affine)


def _pe(c, n):  # (N6) PE_C(c) = [sin(c w_j), cos(c w_j)], w_j = 10^(-4 j / (C/2 - 1))
    j = torch.arange(n // 2, dtype=c.dtype, device=c.device)
    a = c[:, None] * (10.0 ** (-4.0 * j / (n // 2 - 1)))[None]
    return torch.cat([a.sin(), a.cos()], 1)


def _fp32(device):  # autocast off (the precision-critical paths); autocast knows no 'meta' device (shape runs)
    return torch.autocast(device.type, enabled=False) if device.type != "meta" else contextlib.nullcontext()


def _pnorm(a):  # (N3) pixel-norm of the ADN scale/shift, in fp32 (fp64 for double modules)
    a = a.to(torch.promote_types(a.dtype, torch.float32))
    return a / (a.square().mean(1, keepdim=True) + 1e-8).sqrt()


class Block(nn.Module):
    """Residual block (N1-N4) with optional attention (N5). 2-D (conv) or 1-D (linear, `mlp=True`)."""

    def __init__(self, cin, cout, emb, resample=None, attn=False, dropout=0.0, adn=False, mlp=False):
        super().__init__()
        lin = (lambda i, o, k: nn.Linear(i, o)) if mlp else (lambda i, o, k: nn.Conv2d(i, o, k, padding=k // 2))
        self.resample, self.dropout, self.adn, self.mlp = resample, dropout, adn, mlp
        self.norm0, self.conv0 = _gn(cin, ln=mlp), lin(cin, cout, 3)
        self.affine = nn.Linear(emb, cout * (2 if adn else 1))
        self.norm1, self.conv1 = _gn(cout, affine=not adn, ln=mlp), lin(cout, cout, 3)
        self.skip = lin(cin, cout, 1) if (cin != cout or resample) and not mlp else None
        self.attn = attn
        if attn:
            self.norm2, self.qkv, self.proj = _gn(cout), lin(cout, 3 * cout, 1), lin(cout, cout, 1)

    def _r(self, x):  # R: 2x2 average pool (down), nearest x2 (up), identity
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        return F.interpolate(x, scale_factor=2.0, mode="nearest") if self.resample == "up" else x

    def forward(self, x, e):
        h = self.conv0(self._r(F.silu(self.norm0(x))))  # (N1)
        a = self.affine(e) if self.mlp else self.affine(e)[:, :, None, None]
        if self.adn:  # (N3) sCM Sec. 4.1 adaptive double normalisation
            s, b = a.chunk(2, dim=1)
            h = F.silu(self.norm1(h) * _pnorm(s) + _pnorm(b))
        else:  # (N2) shift added before the norm, EDM DDPM++
            h = F.silu(self.norm1(h + a))
        h = self.conv1(F.dropout(h, self.dropout, self.training))  # (N4)
        y = (h + (self.skip(self._r(x)) if self.skip is not None else x)) / math.sqrt(2)
        if self.attn:  # (N5) one head, plain einsum + softmax in fp32 (forward-mode AD works)
            B, C = y.shape[:2]
            q, k, v = self.qkv(self.norm2(y)).reshape(B, 3, C, -1).unbind(1)
            with _fp32(y.device):
                ft = torch.promote_types(q.dtype, torch.float32)
                w = torch.einsum("bcn,bcm->bnm", q.to(ft), k.to(ft)).div(math.sqrt(C)).softmax(-1)
            o = torch.einsum("bnm,bcm->bcn", w.to(v.dtype), v).reshape(y.shape)
            y = (y + self.proj(o)) / math.sqrt(2)
        return y


class _Net(nn.Module):
    """Shared conditioning (N7): e = SiLU(M_t(PE(tau t)) + [M_s(PE(tau s))] + [W_y sqrt(K) onehot(y)])."""

    def _init_embedding(self, d, E):
        Ct = d["time_channels"]
        self.map_layer0, self.map_layer1 = nn.Linear(Ct, E), nn.Linear(E, E)
        if d["num_times"] == 2:  # second time branch, as lumalabs/imm training/unets.py
            self.map_layer0_s, self.map_layer1_s = nn.Linear(Ct, E), nn.Linear(E, E)
        self.map_label = nn.Linear(d["label_dim"], E, bias=False) if d["label_dim"] else None

    def _init_weights(self):  # (§3.4) Xavier-uniform, EDM scales, exactly-zero output layer
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
                last = name.rsplit(".", 1)[-1]
                if last in ("conv1", "proj"):
                    m.weight.data.mul_(1e-5)
                elif last == "qkv":
                    m.weight.data.mul_(math.sqrt(0.2))
        nn.init.zeros_(self.out_conv.weight), nn.init.zeros_(self.out_conv.bias)

    def embed(self, x, t, s=None, y=None):
        d = self.config
        if (s is None) != (d["num_times"] == 1):
            raise UserError(f"this network takes {d['num_times']} time input(s); pass s exactly when num_times=2.")
        dt = torch.promote_types(self.map_layer0.weight.dtype, torch.float32)
        B, tau, C = x.shape[0], d["time_scale"], d["time_channels"]
        with _fp32(x.device):  # embedding path in fp32 (fp64 for double)
            tt = torch.as_tensor(t, device=x.device).to(dt).reshape(-1).expand(B)
            e = self.map_layer1(F.silu(self.map_layer0(_pe(tau * tt, C))))
            if s is not None:
                ss = torch.as_tensor(s, device=x.device).to(dt).reshape(-1).expand(B)
                e = e + self.map_layer1_s(F.silu(self.map_layer0_s(_pe(tau * ss, C))))
            if y is not None and self.map_label is not None:
                K = d["label_dim"]
                oh = F.one_hot(y, K).to(dt) if not y.is_floating_point() else y.to(dt)
                e = e + self.map_label(oh * math.sqrt(K))
            return F.silu(e)


class UNet(_Net):
    """DDPM++-style U-Net (EDM SongUNet layout re-derived, spec §3.1). forward(x, t, s=None, y=None)."""

    def __init__(self, d):
        super().__init__()
        self.config = d
        ch, mult, nb, R = d["ch"], d["mult"], d["nb"], d["img_resolution"]
        E = ch * d["emb_mult"]
        self._init_embedding(d, E)
        kw = dict(emb=E, dropout=d["dropout"], adn=d["adn"])
        self.enc, self.dec, skips, self.levels_end = nn.ModuleDict(), nn.ModuleDict(), [], []
        cout = ch
        for lvl, m in enumerate(mult):
            r = R >> lvl
            if lvl == 0:
                self.enc[f"{r}x{r}_conv"] = nn.Conv2d(d["in_channels"], ch, 3, padding=1)
            else:
                self.enc[f"{r}x{r}_down"] = Block(cout, cout, resample="down", **kw)
            skips.append(cout)
            for i in range(nb):
                self.enc[f"{r}x{r}_block{i}"] = Block(cout, ch * m, attn=r in d["attn_res"], **kw)
                cout = ch * m
                skips.append(cout)
            self.levels_end.append(f"{r}x{r}_block{nb - 1}" if nb else list(self.enc)[-1])
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
        self.out_norm, self.out_conv = _gn(cout), nn.Conv2d(cout, d["out_channels"], 3, padding=1)
        self._init_weights()

    def _encode(self, x, e):
        h, hs = x, []
        for blk in self.enc.values():
            h = blk(h, e) if isinstance(blk, Block) else blk(h)
            hs.append(h)
        return hs

    def forward(self, x, t, s=None, y=None):
        e = self.embed(x, t, s, y)
        skips = self._encode(x, e)
        h = skips[-1]
        for name, blk in self.dec.items():
            h = blk(torch.cat([h, skips.pop()], 1) if "_block" in name else h, e)
        return self.out_conv(F.silu(self.out_norm(h))).to(x.dtype)

    def encoder_features(self, x, t, s=None, y=None):
        """(§3.6) output of the last encoder block of each level, high to low resolution."""
        hs = dict(zip(self.enc.keys(), self._encode(x, self.embed(x, t, s, y))))
        return [hs[k] for k in self.levels_end]


class MLP(_Net):
    """2-D network (§3.8): same forward/embedding/options; linears named conv0/conv1 (1x1 convs)."""

    def __init__(self, d):
        super().__init__()
        self.config, W = d, d["width"]
        self._init_embedding(d, W)
        self.inp = nn.Linear(d["dim"], W)
        self.blocks = nn.ModuleList(Block(W, W, W, dropout=d["dropout"], adn=d["adn"], mlp=True)
                                    for _ in range(d["depth"]))
        self.out_norm, self.out_conv = _gn(W, ln=True), nn.Linear(W, d["dim"])
        self._init_weights()

    def encoder_features(self, x, t, s=None, y=None):
        e, h, out = self.embed(x, t, s, y), self.inp(x), []
        for b in self.blocks:
            h = b(h, e)
            out.append(h)
        return out

    def forward(self, x, t, s=None, y=None):
        return self.out_conv(F.silu(self.out_norm(self.encoder_features(x, t, s, y)[-1]))).to(x.dtype)


class WeightHead(nn.Module):
    """(§3.9) logvar(t[, s]) = Linear([PE(tau t), PE(tau s)]) -> (B,), fp32, zero-initialised."""

    def __init__(self, num_times=1, channels=128, time_scale=1.0):
        super().__init__()
        self.channels, self.time_scale = channels, time_scale
        self.linear = nn.Linear(num_times * channels, 1)
        nn.init.zeros_(self.linear.weight), nn.init.zeros_(self.linear.bias)

    def forward(self, t, s=None):
        dt = torch.promote_types(self.linear.weight.dtype, torch.float32)
        with _fp32(t.device):
            u = [_pe(self.time_scale * t.to(dt).reshape(-1), self.channels)]
            if s is not None:
                u.append(_pe(self.time_scale * s.to(dt).reshape(-1), self.channels))
            return self.linear(torch.cat(u, 1))[:, 0]


_NETS = {  # (§3.7) sizes
    "ddpmpp": dict(kind="unet", img_resolution=32, in_channels=3, out_channels=3, ch=128, mult=[2, 2, 2], nb=4,
                   attn_res=[16], time_channels=128, emb_mult=4),
    "small": dict(kind="unet", img_resolution=32, in_channels=3, out_channels=3, ch=64, mult=[2, 2, 2], nb=2,
                  attn_res=[16], time_channels=64, emb_mult=4),
    "tiny": dict(kind="unet", img_resolution=16, in_channels=3, out_channels=3, ch=16, mult=[1, 2], nb=1,
                 attn_res=None, time_channels=16, emb_mult=4),
    "mlp": dict(kind="mlp", dim=2, width=128, depth=3, time_channels=64),
}
_NET_COMMON = dict(num_times=1, time_scale=1.0, label_dim=0, dropout=0.0, adn=False)


def net_config(name, **overrides):
    """(§3.10) plain JSON dict of constructor arguments; unknown keys are a UserError."""
    if name not in _NETS:
        raise UserError(f"unknown network '{name}'; choose one of {', '.join(_NETS)}.")
    d = {**_NETS[name], **_NET_COMMON}
    bad = set(overrides) - set(d)
    if bad:
        raise UserError(f"unknown network option(s) {sorted(bad)} for '{name}'.")
    if "in_channels" in overrides and "out_channels" not in overrides and d["kind"] == "unet":
        overrides["out_channels"] = overrides["in_channels"]
    d.update(overrides)
    if d.get("attn_res", 0) is None:  # tiny: attention at R/2
        d["attn_res"] = [d["img_resolution"] // 2]
    return d


def build_net(d):
    d = dict(d)
    kind = d.get("kind")
    if kind not in ("unet", "mlp"):
        raise UserError(f"network config has unknown kind {kind!r}.")
    want = set(_NETS["ddpmpp" if kind == "unet" else "mlp"]) | set(_NET_COMMON)
    if set(d) != want:
        raise UserError(f"network config keys differ from a {kind}'s: missing {sorted(want - set(d))}, "
                        f"unknown {sorted(set(d) - want)}.")
    if kind == "unet" and d["img_resolution"] % 2 ** (len(d["mult"]) - 1):
        raise UserError(f"image resolution {d['img_resolution']} is not divisible by 2^{len(d['mult']) - 1}.")
    return (UNet if kind == "unet" else MLP)(d)


def unwrap(m):
    """Strip DDP's `.module` and torch.compile's `._orig_mod`."""
    while True:
        if hasattr(m, "_orig_mod"):
            m = m._orig_mod
        elif isinstance(m, nn.parallel.DistributedDataParallel):
            m = m.module
        else:
            return m


# ======================================================================================== data (spec §4)
_TOY_RMS = {"checkerboard": math.sqrt(4 / 3), "8gaussians": math.sqrt(0.5 + 0.05 ** 2),
            "moons": math.sqrt(0.65625 - 1 / (2 * math.pi) + 0.05 ** 2),
            "spirals": math.sqrt(2.25 * math.pi ** 2 + 0.3 ** 2)}
_IMAGE_SETS = {"cifar10": ("CIFAR10", "cifar-10-python.tar.gz (MD5 c58f30108f718f92721af3b95e74349a)"),
               "mnist": ("MNIST", "MNIST/raw/train-images-idx3-ubyte.gz and train-labels-idx1-ubyte.gz"),
               "fashion_mnist": ("FashionMNIST", "FashionMNIST/raw/train-images-idx3-ubyte.gz and "
                                                 "train-labels-idx1-ubyte.gz")}


def toy_sample(name, n, generator=None):
    """(§4) a 2-D toy, centred by its exact mean and scaled to per-coordinate RMS std 0.5; float32 (n, 2)."""
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
    """[-1, 1] float -> uint8, rounding 127.5 x + 127.5 (§6.3)."""
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

    def _epoch(self, e):  # perm_e, flip_e from a CPU generator seeded by (seed, "data", e), kept on device
        if e not in self._perm:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "data", e))
            N = self.x.shape[0]
            self._perm = {k: v for k, v in self._perm.items() if k >= e - 1}
            self._perm[e] = (torch.randperm(N, generator=g).to(self.x.device),
                             (torch.rand(N, generator=g) < 0.5).to(self.x.device))
        return self._perm[e]

    def batch(self, b, step, part=0, parts=1):
        """(x, y): global position p = step*b*parts + part*b + j; a pure function of (seed, step)."""
        if self.kind == "toy":
            return toy_sample(self.key, b, self.gen).to(self.x.device), None
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


def _image_dataset(name, root, env):
    import torchvision
    cls, archive = _IMAGE_SETS[name]
    def get(download):
        return getattr(torchvision.datasets, cls)(root, train=True, download=download)
    if env.is_main:
        try:
            get(True)
        except Exception as e:  # offline, bad checksum, ...
            barrier(env)
            raise UserError(f"could not download {name} into '{root}' ({type(e).__name__}); place {archive} "
                            f"there by hand.") from None
    barrier(env)
    try:
        ds = get(False)
    except Exception:
        raise UserError(f"{name} is missing from '{root}'; place {archive} there.") from None
    x = torch.as_tensor(np.asarray(ds.data))
    if x.ndim == 3:  # MNIST-type 28x28 -> zero-pad 2 px per side to 32x32, 1 channel
        x = F.pad(x, (2, 2, 2, 2))[..., None]
    return x, torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), 10


def _read_images(spec):
    if spec.endswith(".npy"):
        a = np.load(spec)
        if a.dtype != np.uint8 and a.ndim == 2 and a.shape[1] == 2:
            return torch.from_numpy(a.astype(np.float32)), None
        if a.dtype != np.uint8 or a.ndim not in (3, 4) or (a.ndim == 4 and a.shape[3] not in (1, 3)) \
                or a.shape[1] != a.shape[2]:
            raise UserError(f"{spec}: expected float (N, 2) points or square uint8 NHWC images (C = 1 or 3), "
                            f"got {a.dtype} {a.shape}.")
        return torch.from_numpy(a if a.ndim == 4 else a[..., None]), None
    from torchvision.io import ImageReadMode, decode_image, read_file
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(spec) for f in fs
                   if f.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")))
    if not files:
        raise UserError(f"no images found in folder '{spec}'.")
    imgs = []
    for f in files:
        im = decode_image(read_file(f), mode=ImageReadMode.RGB)
        if imgs and im.shape != imgs[0].shape:
            raise UserError(f"{f} has size {tuple(im.shape[1:])}, unlike {tuple(imgs[0].shape[1:])} of {files[0]}.")
        imgs.append(im)
    x = torch.stack(imgs).permute(0, 2, 3, 1)
    if x.shape[1] != x.shape[2]:
        raise UserError(f"images in '{spec}' are not square ({tuple(x.shape[1:3])}); crop them first.")
    return x, None


def load_data(spec, root, env, seed, xflip):
    """(§4) a toy name, an image data set name, a .npy file or an image folder -> Data on env.device."""
    if spec in _TOY_RMS:
        g = torch.Generator().manual_seed(derive_seed(seed, "rank", env.rank))
        return Data("toy", spec, x=torch.empty(0, device=env.device), seed=seed, gen=g)
    if spec in _IMAGE_SETS:
        x, y, k = _image_dataset(spec, root, env)
        key = spec
    elif os.path.exists(spec):
        x, y = _read_images(spec)
        k, key = 0, "user-" + hashlib.md5(x.numpy().tobytes()).hexdigest()[:12]
        if x.dtype == torch.float32:
            m, s = x.mean(0).tolist(), x.var(0).mean().sqrt().item()  # per-coordinate RMS std
            if env.is_main:
                print(f"data {spec}: {len(x)} points, mean ({m[0]:.3f}, {m[1]:.3f}), RMS std {s:.3f}"
                      + ("  WARNING: std outside [0.25, 1]; the methods assume ~0.5" if not .25 <= s <= 1 else ""))
            return Data("points", key, x=x.to(env.device), seed=seed)
    else:
        raise UserError(f"data '{spec}' is neither a known data set ({', '.join([*_TOY_RMS, *_IMAGE_SETS])}) "
                        f"nor an existing .npy file or image folder.")
    return Data("images", key, x=x.permute(0, 3, 1, 2).contiguous().to(env.device),
                labels=None if y is None else y.to(env.device), num_classes=k, seed=seed, xflip=xflip)


# ========================================================================================= EMA (spec §5)
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
        pairs = [(pe, p) for pe, p in zip(self.model.parameters(), src.parameters()) if p.requires_grad]
        if pairs:
            ema_p, p = zip(*pairs)
            torch._foreach_lerp_(list(ema_p), [q.detach().to(e.dtype) for q, e in zip(p, ema_p)], 1 - b)
        for be, bs in zip(self.model.buffers(), src.buffers()):
            be.copy_(bs)


# ========================================================================================= FID (spec §6)
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"


class Detector:
    """Feature network: uint8 NCHW in (1 channel repeated to 3), (B, dim) fp32 out, no grad, no autocast."""

    def __init__(self, fn, name, dim):
        self.fn, self.name, self.dim = fn, name, dim

    @torch.no_grad()
    def __call__(self, u8):
        if u8.shape[1] == 1:
            u8 = u8.repeat(1, 3, 1, 1)
        with torch.autocast(u8.device.type, enabled=False):
            return self.fn(u8).float()


def load_detector(spec, env):
    """'inception' (downloaded once into torch hub's cache), 'standin' (tests), or a TorchScript path."""
    if spec == "standin":  # fixed-seed random projection of 4x4-average-pooled pixels to 32 features
        # float64, then rounded to fp32: the features do not depend on the batch size (BLAS blocking)
        w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(48)
        w = w.to(env.device)
        return Detector(lambda u8: F.adaptive_avg_pool2d(u8.double() / 127.5 - 1, 4).flatten(1) @ w, "standin", 32)
    path, why = spec, "file not found"
    if spec == "inception":
        path = os.path.join(torch.hub.get_dir(), "checkpoints", "inception-2015-12-05.pt")
        if env.is_main and not os.path.exists(path):
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                torch.hub.download_url_to_file(INCEPTION_URL, path, progress=False)
            except Exception as e:
                why = f"download failed: {type(e).__name__}"
        barrier(env)
    if not os.path.exists(path):
        raise UserError(f"FID detector unavailable ({why}); download {INCEPTION_URL} and place it at {path}."
                        if spec == "inception" else f"FID detector '{spec}' not found.")
    try:
        net = torch.jit.load(path, map_location=env.device).eval()
        fn = lambda u8: net(u8, return_features=True)
        dim = Detector(fn, "", 0)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8, device=env.device)).shape[1]
    except Exception as e:
        raise UserError(f"FID detector '{path}' is not a usable TorchScript feature network ({type(e).__name__}).")
    return Detector(fn, "inception" if spec == "inception" else os.path.splitext(os.path.basename(path))[0], dim)


class IndexRNG:
    """Randomness per sample index (EDM's StackedRandomGenerator idea): sample i draws from seed + i, so
    results do not depend on batch size or GPU count. Shapes include the batch dimension (= len(indices))."""

    def __init__(self, indices, seed, device):
        self.device = torch.device(device)
        self.gens = [torch.Generator(self.device).manual_seed(int(seed) + int(i)) for i in indices]

    def randn(self, *shape):
        assert shape[0] == len(self.gens), "IndexRNG shapes include the batch dimension"
        return torch.stack([torch.randn(shape[1:], generator=g, device=self.device) for g in self.gens])

    def randint(self, K):
        return torch.stack([torch.randint(K, (), generator=g, device=self.device) for g in self.gens])


def _feature_stats(images_of, n, detector, env, batch):
    """(§6.2-6.3) float64 mean and unbiased covariance of detector features over indices 0..n-1, sharded."""
    chunks = torch.arange(n).tensor_split(math.ceil(n / (batch * env.world)) * env.world)
    s1 = torch.zeros(detector.dim, dtype=torch.float64, device=env.device)
    s2 = torch.zeros(detector.dim, detector.dim, dtype=torch.float64, device=env.device)
    for idx in chunks[env.rank::env.world]:  # equal number of iterations on every rank
        if len(idx):
            f = detector(images_of(idx)).double()
            s1, s2 = s1 + f.sum(0), s2 + f.T @ f
    if env.world > 1:
        dist.all_reduce(s1), dist.all_reduce(s2)
    mu = s1 / n
    return mu, (s2 - n * torch.outer(mu, mu)) / (n - 1)


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """(F1) ||mu1-mu2||^2 + tr S1 + tr S2 - 2 sum sqrt(eig(A S2 A)), A = S1^(1/2); float64, no scipy."""
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
    detector it logs one line and training carries on. hook(step, {label: generate(rng, labels)}) -> {label: fid}."""

    def __init__(self, detector, data, env, root, n, log, num_classes=0):
        self.spec, self.data, self.env, self.root, self.n, self.log = detector, data, env, root, n, log
        self.num_classes, self.state = num_classes, None

    def __call__(self, step, gens):
        if self.state is None:
            try:
                det = load_detector(self.spec, self.env)
                self.state = (det, reference_stats(self.data, det, self.env, self.root))
            except UserError:
                self.state = False
                self.log.info("FID skipped: detector unavailable")
        out = {}
        for label, gen in (gens.items() if self.state else ()):
            out[label] = compute_fid(gen, self.n, self.state[1], self.state[0], self.env, 250, 0, self.num_classes)
            self.log.info(f"step {step} | FID-{self.n // 1000}k proxy ({label}) {out[label]:.3f}")
        return out


def reference_stats(data, detector, env, cache_dir, ref_path=None, batch=250):
    """(§6.4) training-set statistics: an explicit npz (mu, sigma) wins, else computed once and cached."""
    if ref_path:
        if not os.path.isfile(ref_path):
            raise UserError(f"FID reference '{ref_path}' does not exist.")
        z = np.load(ref_path)
        if "mu" not in z or "sigma" not in z or z["mu"].shape != (detector.dim,):
            raise UserError(f"FID reference '{ref_path}' needs keys mu ({detector.dim},) and sigma.")
        return z["mu"], z["sigma"]
    path = os.path.join(cache_dir, "fid_refs", f"{data.key}-{detector.name}.npz")
    hit = os.path.exists(path)
    barrier(env)  # every rank has looked before rank 0 may write
    if not hit:
        mu, sigma = _feature_stats(lambda idx: data.x[idx.to(data.x.device)], len(data.x), detector, env, batch)
        if env.is_main:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path + ".tmp", "wb") as f:
                np.savez(f, mu=mu.cpu().numpy(), sigma=sigma.cpu().numpy(), n=len(data.x))
            os.replace(path + ".tmp", path)
        barrier(env)
    z = np.load(path)
    return z["mu"], z["sigma"]


# ============================================================================ runtime (spec §7)
@dataclass
class Env:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    is_main: bool
    precision: str
    seed: int = 0


def derive_seed(*parts):
    """First 8 bytes of sha256(repr(parts)) mod 2^63: independent streams per (seed, purpose, index)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") % 2 ** 63


def setup(device="auto", seed=0, precision=None):
    """Process group under torchrun (NCCL on CUDA, gloo on CPU), device, precision flags, model-init seed."""
    cuda_ok = torch.cuda.is_available()
    device = ("cuda" if cuda_ok else "cpu") if device in ("auto", None) else device
    if device.startswith("cuda") and not cuda_ok:
        raise UserError(f"--device {device} was asked for but CUDA is not available here; use --device cpu.")
    rank, world, local = (int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if device.startswith("cuda"):
        device = f"cuda:{local}" if "WORLD_SIZE" in os.environ else device
        torch.cuda.set_device(torch.device(device))
        torch.backends.cudnn.benchmark = True
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    precision = precision or ("bf16" if device.startswith("cuda") else "fp32")
    if precision not in ("fp32", "tf32", "bf16", "fp16"):
        raise UserError(f"--precision must be one of fp32, tf32, bf16, fp16, got '{precision}'.")
    if precision == "fp16" and not device.startswith("cuda"):
        raise UserError("--precision fp16 needs CUDA (it uses a GradScaler); use bf16 or fp32 on the CPU.")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if not device.startswith("cuda") and "OMP_NUM_THREADS" not in os.environ:
        # half the cores per process: OpenMP spin-waits collapse (measured 20-50x slower) when threads outnumber
        # free cores, e.g. beside one other job on a 2-core machine; small CPU models lose little with fewer threads
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // (2 * int(os.environ.get("LOCAL_WORLD_SIZE", 1)))))
    torch.manual_seed(seed)  # identical model initialisation on every rank
    return Env(rank, world, local, torch.device(device), rank == 0, precision, seed)


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
    """Manual-mode gradient all-reduce (one flattened call, divided by the world size)."""
    if env.world == 1:
        return
    ps = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in ps])
    dist.all_reduce(flat)
    flat /= env.world
    for p, g in zip(ps, flat.split([p.numel() for p in ps])):
        p.grad = g.view_as(p).clone()


def all_mean(x, env):
    x = torch.as_tensor(x, device=env.device, dtype=torch.float32).clone()
    if env.world > 1:
        dist.all_reduce(x)
        x /= env.world
    return x


def barrier(env):
    if env.world > 1:
        dist.barrier()


def autocast(env):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(env.precision)
    return torch.autocast(env.device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


@contextlib.contextmanager
def strict_fp32(device):
    """Autocast off and TF32 off inside the block (the precision-critical blocks: JVPs, fp32 embeddings, GDD's
    discriminator); the previous TF32 flags are restored on exit."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with _fp32(torch.device(device)):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def make_scaler(env):
    """A GradScaler for fp16; a disabled pass-through otherwise (same calling code)."""
    return torch.amp.GradScaler(env.device.type, enabled=env.precision == "fp16")


def maybe_compile(m, on):
    return torch.compile(m) if on else m


# ====================================================================== checkpoints (spec §8)
_LAYOUT = ("model", "ema", "opt", "step", "config", "net", "method", "convention", "rng")


def _rng_states(env, generators):
    cuda = torch.cuda.get_rng_state(env.device) if env.device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda, "gens": [g.get_state() for g in generators]}


def save_checkpoint(path, ckpt, env, generators=()):
    """Called on every rank: gathers RNG states, refuses non-finite weights, rank 0 writes atomically."""
    bad = any(torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()
              for k in ("model", "ema") for v in (ckpt.get(k) or {}).values())
    bad = all_mean(float(bad), env).item() > 0
    if bad:
        raise UserError(f"weights became non-finite; not writing {path}, the last good checkpoint is kept.")
    states = [None] * env.world
    if env.world > 1:
        dist.all_gather_object(states, _rng_states(env, generators))
    else:
        states = [_rng_states(env, generators)]
    if env.is_main:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        torch.save({**ckpt, "rng": {"world": env.world, "ranks": states}}, path + ".tmp")
        os.replace(path + ".tmp", path)
    barrier(env)


def load_checkpoint(path):
    if not os.path.isfile(path):
        raise UserError(f"checkpoint '{path}' does not exist.")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"checkpoint '{path}' could not be read ({type(e).__name__}: {str(e)[:80]}).") from None
    missing = [k for k in _LAYOUT if not isinstance(ck, dict) or k not in ck]
    if missing:
        raise UserError(f"checkpoint '{path}' lacks the keys {missing}; it was not written by this project.")
    return ck


def load_state_strict(module, sd):
    """Strict load after stripping 'module.'/'_orig_mod.' prefixes; mismatches name the keys."""
    sd = {re.sub(r"^((module|_orig_mod)\.)+", "", k): v for k, v in sd.items()}
    own = module.state_dict()
    miss, extra = [k for k in own if k not in sd], [k for k in sd if k not in own]
    shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in sd
             and sd[k].shape != v.shape]
    if miss or extra or shape:
        raise UserError(f"state dict does not fit the network: missing {miss[:10]}, unexpected {extra[:10]}, "
                        f"shape mismatch {shape[:10]}.")
    module.load_state_dict(sd)


def restore_rng(ckpt, env, generators=()):
    """Each rank's RNG states when the world size matches, else reseed from (seed, rank, step)."""
    rng = ckpt.get("rng")
    if rng and rng["world"] == env.world:
        st = rng["ranks"][env.rank]
        torch.set_rng_state(st["cpu"])
        if st["cuda"] is not None and env.device.type == "cuda":
            torch.cuda.set_rng_state(st["cuda"], env.device)
        for g, s in zip(generators, st["gens"]):
            g.set_state(s)
        return
    s = derive_seed(ckpt["config"].get("seed", 0), "rank", env.rank, ckpt["step"])
    if env.is_main:
        print(f"warning: checkpoint saved with {rng and rng['world']} ranks, running {env.world}: RNG reseeded")
    torch.manual_seed(s)
    for i, g in enumerate(generators):
        g.manual_seed(derive_seed(s, i))


# ============================================================================ CLI and config (spec §9)
SAMPLE_OPTS = dict(ckpt=(str, None), steps=(list[int], [1, 2]), n=(int, None), out=(str, None), batch=(int, 256),
                   seed=(int, 0), device=(str, "auto"), precision=(typing.Optional[str], None), ema=(bool, True),
                   fid_ref=(typing.Optional[str], None), fid_detector=(str, "inception"), root=(str, "data"))


def _convert(name, typ, s):
    """Parse a command-line string by the dataclass type hint."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is typing.Union:
        if s.lower() == "none":
            return None
        typ = next(a for a in args if a is not type(None))
        return _convert(name, typ, s)
    if origin is typing.Literal:
        if s not in map(str, args):
            raise UserError(f"--{name} expects one of {', '.join(map(str, args))}, got '{s}'.")
        return next(a for a in args if str(a) == s)
    if origin is list:
        return [_convert(name, args[0], p) for p in s.split(",") if p != ""]
    try:
        if typ is bool:
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}[s.lower()]
        if typ is int:
            f = float(s)
            if not f.is_integer():
                raise ValueError
            return int(s) if s.lstrip("-").isdigit() else int(f)
        return typ(s)
    except (KeyError, ValueError):
        raise UserError(f"--{name} expects {getattr(typ, '__name__', typ)}, got '{s}'.") from None


def _split_argv(argv):
    raw, i = {}, 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise UserError(f"unexpected argument '{a}'; options look like --field value.")
        key, val = (a[2:].split("=", 1) + [None])[:2]
        if val is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            val, i = argv[i + 1], i + 1
        raw[key.replace("-", "_")], i = val, i + 1
    return raw


def _typed(name, hints, val):
    if name not in hints:
        close = difflib.get_close_matches(name, hints, 3)
        raise UserError(f"unknown option --{name}" + (f"; did you mean {', '.join('--' + c for c in close)}?"
                                                      if close else "."))
    if val is None:
        if hints[name] is not bool:
            raise UserError(f"--{name} needs a value.")
        return True
    return _convert(name, hints[name], val)


def _help(Config, method, presets):
    src, hints = inspect.getsource(Config), typing.get_type_hints(Config)
    notes = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", src, re.M))
    lines = [f"usage: python {method}.py [train|sample|fid] [--preset {'|'.join(presets)}] [--field value ...]",
             "fields (type, default):"]
    for f in dataclasses.fields(Config):
        t = re.sub(r"typing\.|<class '(\w+)'>", r"\1", str(hints[f.name]))
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        lines.append(f"  --{f.name:<16} {t:<14} {default!r:<14} {notes.get(f.name, '')}")
    lines.append("sample/fid options: " + " ".join(f"--{k}" for k in SAMPLE_OPTS) + " plus any field above.")
    return "\n".join(lines)


def resolve_config(Config, presets, preset, given, **select):
    """Preset flat part, then its part keyed by the selected mode/stage, then the command line (§9)."""
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
    cfg = Config(**values)
    if hasattr(cfg, "check"):
        try:
            cfg.check()
        except ValueError as e:
            raise UserError(str(e)) from None
    return cfg


def parse_cli(Config, presets, method, argv=None):
    """-> (cmd, cfg, given). train: cfg is a Config; sample/fid: cfg is a namespace of SAMPLE_OPTS and
    `given` holds Config fields to apply over the checkpoint's config (merge_config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cmd = argv.pop(0) if argv and argv[0] in ("train", "sample", "fid") else "train"
    hints = typing.get_type_hints(Config)
    for name, p in presets.items():  # unknown preset keys are found at start, for every preset
        for k, v in p.items():
            bad = [k] if not isinstance(v, dict) and k not in hints else [x for x in v if x not in hints] \
                if isinstance(v, dict) else []
            if bad:
                raise UserError(f"preset '{name}' sets unknown field(s) {bad}.")
    if "--help" in argv or "-h" in argv:
        print(_help(Config, method, presets))
        sys.exit(0)
    raw = _split_argv(argv)
    if cmd != "train":
        opts = {k: d for k, (t, d) in SAMPLE_OPTS.items()}
        for k in [k for k in raw if k in SAMPLE_OPTS]:
            opts[k] = _typed(k, {k: SAMPLE_OPTS[k][0]}, raw.pop(k))
        if not opts["ckpt"]:
            raise UserError(f"{cmd} needs --ckpt PATH.")
        opts["n"] = opts["n"] or (50_000 if cmd == "fid" else 64)
        return cmd, types.SimpleNamespace(**opts), {k: _typed(k, hints, v) for k, v in raw.items()}
    preset = raw.pop("preset", None) or "toy"
    given = {k: _typed(k, hints, v) for k, v in raw.items()}
    if "out" in hints and "out" not in given and "out" not in presets.get(preset, {}):
        mode = given.get("mode") or presets.get(preset, {}).get("mode") or \
            getattr(Config.__dataclass_fields__.get("mode"), "default", None)
        given = {**given, "out": f"runs/{method}-{mode}-{preset}" if "mode" in hints else f"runs/{method}-{preset}"}
    cfg = resolve_config(Config, presets, preset, given)
    if "preset" in hints:
        cfg.preset = preset
    return cmd, cfg, {k: v for k, v in given.items() if k in raw}


def merge_config(Config, base, given, log=print):
    """Config from a checkpoint's `config` dict with the command-line fields `given` on top (resume, sample)."""
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = set(base) - names
    if unknown:
        raise UserError(f"checkpoint config has fields {sorted(unknown)} that this file does not know.")
    for k, v in given.items():
        if k in base and base[k] != v:
            log(f"config: {k} = {v!r} (checkpoint had {base[k]!r})")
    return Config(**{**base, **given})


def main_guard(fn):
    """Run fn(); UserError -> 'error: ...' and exit 2, Ctrl-C -> 130; always tear the process group down."""
    code = 0
    try:
        fn()
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if code:
        sys.exit(code)


# ================================================================================== logging (spec §9)
class Logger:
    """Rank 0 prints and appends log.jsonl; `log` is called on every rank (one all_reduce, one host copy)."""

    def __init__(self, out, env, total_steps, global_batch, config=None, start_step=0):
        self.out, self.env, self.total, self.gb = out, env, total_steps, global_batch
        self.t_last, self.s_last = time.time(), start_step  # rates count from here (includes warm-up)
        if env.is_main:
            os.makedirs(out, exist_ok=True)
            if config is not None:
                with open(os.path.join(out, "config.json"), "w") as f:
                    json.dump(dataclasses.asdict(config), f, indent=1)

    def info(self, msg):
        if self.env.is_main:
            print(msg, flush=True)

    def log(self, step, **scalars):
        v = torch.stack([torch.as_tensor(x, device=self.env.device, dtype=torch.float32).detach().reshape(())
                         for x in scalars.values()])
        v = all_mean(v, self.env).tolist()  # the host transfer of this logging step
        vals = dict(zip(scalars, v))
        for k, x in vals.items():
            if not math.isfinite(x):
                raise UserError(f"{k} became NaN/inf at step {step}; last checkpoint kept.")
        now = time.time()
        rate = (step - self.s_last) * self.gb / max(now - self.t_last, 1e-9)
        eta = (self.total - step) * self.gb / rate if rate else 0.0
        self.t_last, self.s_last = now, step
        if self.env.is_main:
            rec = dict(step=step, kimg=step * self.gb / 1000, time=now, img_per_s=rate, eta_s=eta, **vals)
            with open(os.path.join(self.out, "log.jsonl"), "a") as f:
                f.write(json.dumps(rec) + "\n")
            body = " | ".join(f"{k} {x:.4g}" for k, x in vals.items())
            print(f"step {step}/{self.total} | {body} | {rate:,.0f} img/s | eta {int(eta) // 60}m{int(eta) % 60:02d}s",
                  flush=True)
        return vals


# ================================================================================= pictures
def _grid(u8, pad=2):
    u8 = np.asarray(u8)
    N, H, W, C = u8.shape
    cols = math.ceil(math.sqrt(N))
    rows = math.ceil(N / cols)
    g = np.zeros((rows * (H + pad) + pad, cols * (W + pad) + pad, C), np.uint8)
    for i in range(N):
        r, c = divmod(i, cols)
        g[pad + r * (H + pad):pad + r * (H + pad) + H, pad + c * (W + pad):pad + c * (W + pad) + W] = u8[i]
    return g[..., 0] if C == 1 else g


def save_panels(path, panels):
    """One row of panels: (title, (N,2) points) -> scatter in [-1.5, 1.5]^2; (title, uint8 NHWC) -> grid."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3 * len(panels), 3.3))
    for ax, (title, a) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        a = a.detach().cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
        if a.ndim == 2:
            ax.scatter(a[:, 0], a[:, 1], s=1, alpha=0.5)
            ax.set_xlim(-1.5, 1.5), ax.set_ylim(-1.5, 1.5), ax.set_aspect("equal")
        else:
            ax.imshow(_grid(a), cmap="gray"), ax.axis("off")
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)


def save_array(path, arr):
    """.npy (float32 points / uint8 NHWC images) or .png (scatter / grid)."""
    a = arr.detach().cpu().numpy() if torch.is_tensor(arr) else np.asarray(arr)
    a = a.astype(np.float32) if a.ndim == 2 else a.astype(np.uint8)
    if path.endswith(".npy"):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        np.save(path, a)
    elif path.endswith(".png"):
        save_panels(path, [(os.path.basename(path), a)])
    else:
        raise UserError(f"--out must end in .npy or .png, got '{path}'.")


# ================================================================== toy metrics (spec §9, one definition)
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

    def k(x, y):  # one distance matrix per pair, reused by every bandwidth
        d2 = torch.cdist(x, y).square()
        return sum(torch.exp(-d2 / (2 * h * h)) for h in hs).mean()
    return (k(a, a) + k(b, b) - 2 * k(a, b)).item()


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
