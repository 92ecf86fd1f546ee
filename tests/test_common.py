"""Tests of common.py: its invariants (numbered below), plus the runtime, CLI and toy-metric
helpers. CPU only; item 18 launches a 2-process gloo job through torchrun (tests/ddp_worker.py)."""
import contextlib
import copy
import dataclasses
import errno
import hashlib
import io
import json
import math
import os
import pickle
import re
import subprocess
import sys
import time
import types
import typing

import numpy as np
import pytest
import torch
import torch.nn as nn

import common as C
from cli import guarded, sentence
from standin import standin_path

CPU = torch.device("cpu")
GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
FREEZE = ("conv0", "conv1", "proj")  # freeze a parameter iff its module name is one of these


def env1(precision="fp32"):
    return C.Env(rank=0, world=1, local_rank=0, device=CPU, is_main=True, precision=precision, seed=0)


def meta_net(name, **kw):
    with torch.device("meta"):
        return C.build_net(C.net_config(name, **kw))


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def n_frozen(m):
    return sum(p.numel() for k, p in m.named_parameters() if k.split(".")[-2] in FREEZE)


def perturb(net, scale=0.1, seed=0):
    """Random offsets on every weight, so the (exactly zero at init) output is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return net


def tiny(seed=0, **kw):
    torch.manual_seed(seed)
    return C.build_net(C.net_config("tiny", **kw))


def mlp(seed=0, **kw):
    torch.manual_seed(seed)
    return C.build_net(C.net_config("mlp", **kw))


def image_data(n=24, c=3, r=8, seed=0, xflip=True, labels=False):
    u8 = torch.randint(0, 256, (n, c, r, r), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    y = torch.arange(n) % 10 if labels else None
    return C.Data("images", f"test{seed}", x=u8, labels=y, num_classes=10 if labels else 0, seed=seed, xflip=xflip)


# ======================================================================== 1. parameter counts
@pytest.mark.parametrize("name, kw, total", [
    ("ddpmpp", {}, 55_732_739),
    ("ddpmpp", dict(num_times=2), 56_061_443),
    ("ddpmpp", dict(adn=True), 60_049_667),
    ("ddpmpp", dict(label_dim=10), 55_732_739 + 1_408),  # EDM's map_label: 10 -> 128 with bias
    ("ddpmpp", dict(num_times=2, adn=True), 60_378_371),
    ("small", {}, 8_797_187),
    ("small", dict(adn=True), 9_482_627),
    ("tiny", {}, 189_347),
    ("tiny", dict(num_times=2), 194_595),
    ("mlp", {}, 175_874),
    ("mlp", dict(num_times=2), 200_706),
])
def test_param_counts_on_meta(name, kw, total):
    net = meta_net(name, **kw)
    assert all(p.device.type == "meta" for p in net.parameters())
    assert n_params(net) == total


def test_param_count_deltas_and_frozen_fractions():
    base = n_params(meta_net("ddpmpp"))
    assert n_params(meta_net("ddpmpp", num_times=2)) - base == 328_704
    assert n_params(meta_net("ddpmpp", adn=True)) - base == 4_316_928
    assert n_params(meta_net("ddpmpp", label_dim=10)) - base == 1_408
    assert n_frozen(meta_net("ddpmpp")) == 47_597_568
    for name, pct, nd in (("ddpmpp", 85.40, 2), ("small", 84.6, 1), ("tiny", 78.6, 1), ("mlp", 56.3, 1)):
        net = meta_net(name)
        assert round(100 * n_frozen(net) / n_params(net), nd) == pct, name


def test_unet_layout_names():
    """Module names: stem, down blocks, in0 (attention always) / in1, up blocks, attention placement."""
    net = meta_net("ddpmpp")
    enc, dec = list(net.enc), list(net.dec)
    assert enc == ["32x32_conv", *[f"32x32_block{i}" for i in range(4)], "16x16_down",
                   *[f"16x16_block{i}" for i in range(4)], "8x8_down", *[f"8x8_block{i}" for i in range(4)]]
    assert dec == ["8x8_in0", "8x8_in1", *[f"8x8_block{i}" for i in range(5)], "16x16_up",
                   *[f"16x16_block{i}" for i in range(5)], "32x32_up", *[f"32x32_block{i}" for i in range(5)]]
    attn = {f"{w}.{k}" for w in ("enc", "dec") for k, b in getattr(net, w).items() if getattr(b, "attn", False)}
    assert attn == {*[f"enc.16x16_block{i}" for i in range(4)], "dec.8x8_in0", "dec.16x16_block4"}
    assert len(net.dec["8x8_in0"].norm0.weight) == 256 and net.out_conv.out_channels == 3
    no_attn = meta_net("ddpmpp", attn_res=[])
    assert [k for k, b in no_attn.dec.items() if b.attn] == ["8x8_in0"]
    assert not any(b.attn for b in no_attn.enc.values() if isinstance(b, C.Block))


def _ref_block(blk, x, e):
    """EDM's UNetBlock (norm, SiLU, conv, conditioning, dropout, conv, skip, attention) written out by hand, with
    the block's own weights (eval mode, no dropout)."""
    F = nn.functional
    gn = lambda norm, h: F.group_norm(h, norm.num_groups, norm.weight, norm.bias, 1e-6)  # noqa: E731
    R = {"down": lambda h: F.avg_pool2d(h, 2), "up": lambda h: F.interpolate(h, scale_factor=2.0, mode="nearest"),
         None: lambda h: h}[blk.resample]
    h = blk.conv0(R(F.silu(gn(blk.norm0, x))))
    a = blk.affine(e)[:, :, None, None]
    if blk.adn:  # sCM Sec. 4.1 ADN
        pn = lambda v: v / (v.square().mean(1, keepdim=True) + 1e-8).sqrt()  # noqa: E731
        sc, sh = a[:, :a.shape[1] // 2], a[:, a.shape[1] // 2:]
        h = F.silu(gn(blk.norm1, h) * pn(sc) + pn(sh))
    else:  # shift before the norm
        h = F.silu(gn(blk.norm1, h + a))
    h = blk.conv1(h)
    y = (h + (blk.skip(R(x)) if blk.skip is not None else x)) / math.sqrt(2)
    if blk.attn:
        B, Co, H, W = y.shape
        qkv = blk.qkv(gn(blk.norm2, y)).reshape(B, Co, 3, H * W)  # EDM's order: q, k, v interleaved per channel
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        Wt = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(Co), dim=-1)  # (B, N queries, N keys)
        y = (y + blk.proj((v @ Wt.transpose(1, 2)).reshape(B, Co, H, W))) / math.sqrt(2)
    return y


@pytest.mark.parametrize("cin, cout, resample, attn, adn", [
    (16, 16, None, False, False), (16, 32, None, True, False), (32, 32, "down", False, True),
    (48, 24, "up", True, True), (24, 24, None, True, True)])
def test_block_matches_spec_equations(cin, cout, resample, attn, adn):
    torch.manual_seed(0)
    blk = perturb(C.Block(cin, cout, 20, resample=resample, attn=attn, adn=adn), scale=0.2).double().eval()
    assert blk.norm1.num_groups == min(32, cout // 4) and blk.norm1.eps == 1e-6 and (blk.norm1.weight is None) == adn
    x, e = torch.randn(2, cin, 8, 8, dtype=torch.float64), torch.randn(2, 20, dtype=torch.float64)
    out, ref = blk(x, e), _ref_block(blk, x, e)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_group_norm_divisor_rule():
    for c, g in ((16, 4), (48, 12), (256, 32), (384, 32), (200, 25), (36, 9), (4, 1)):
        n = C._gn(c)
        assert (n.num_groups, n.eps) == (g, 1e-6), c


def test_embedding_matches_spec():
    """Embedding: PE with sin first and frequencies 1 .. 1e-4, time_scale inside, maps, sqrt(K) one-hot labels."""
    pe = C._pe(torch.tensor([0.7], dtype=torch.float64), 8)
    w = torch.tensor([1.0, 10 ** (-4 / 3), 10 ** (-8 / 3), 1e-4], dtype=torch.float64)
    assert torch.allclose(pe[0], torch.cat([(0.7 * w).sin(), (0.7 * w).cos()]), rtol=1e-14)
    net = perturb(tiny(num_times=2, label_dim=10, time_scale=250.0)).double()
    t, s, y = torch.rand(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([0, 3, 9])
    F = nn.functional
    Ct = net.config["time_channels"]
    j = torch.arange(Ct // 2, dtype=torch.float64)
    pe = lambda c: torch.cat([(c[:, None] * 10 ** (-4 * j / (Ct // 2 - 1))).sin(),  # noqa: E731
                              (c[:, None] * 10 ** (-4 * j / (Ct // 2 - 1))).cos()], 1)
    n = pe(250 * t) + net.map_label(F.one_hot(y, 10).double() * math.sqrt(10))  # EDM: labels before map_layer0
    e = net.map_layer1(F.silu(net.map_layer0(n))) + net.map_layer1_s(F.silu(net.map_layer0_s(pe(250 * s))))
    e = F.silu(e)
    x = torch.zeros(3, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(net.embed(x, t, s, y), e, rtol=1e-12, atol=1e-14)
    unscaled = C.build_net({**net.config, "time_scale": 1.0}).double()
    unscaled.load_state_dict(net.state_dict())
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    assert torch.allclose(net(x, t, s, y), unscaled(x, 250 * t, 250 * s, y), rtol=1e-12, atol=1e-14)


# ======================================================================== 2. near-zero output at init
@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_fresh_output_near_zero_then_not_after_sgd(kind):
    """U-Net: EDM's init, the output layer Xavier-uniform x 1e-5 with a zero bias; the 2-D MLP: exactly zero."""
    net = tiny() if kind == "unet" else mlp()
    w = net.out_conv.weight
    fan = w[0].numel() + w[:, 0].numel()
    assert w.abs().max() <= 1e-5 * math.sqrt(6 / fan) and torch.count_nonzero(net.out_conv.bias) == 0
    x = torch.randn(3, 3, 16, 16) if kind == "unet" else torch.randn(3, 2)
    t = torch.rand(3)
    out = net(x, t)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert (0 < out.abs().max() < 1e-4) if kind == "unet" else torch.count_nonzero(out) == 0
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    (net(x, t) - torch.randn_like(x)).square().mean().backward()
    opt.step()
    assert torch.count_nonzero(net(x, t)) == out.numel() and net(x, t).abs().max() > 1e-3


def test_unet_init_is_edms():
    """EDM's init (NVlabs/edm training/networks.py SongUNet/UNetBlock): Xavier-uniform, qkv x sqrt(0.2) (init_attn),
    conv1 x 1e-5 (init_zero), the rest x 1: the largest of a few thousand uniform draws lies within 5% of the bound."""
    net = tiny()
    for name, gain in (("8x8_block0.qkv", math.sqrt(0.2)), ("8x8_block0.conv0", 1.0), ("8x8_block0.conv1", 1e-5)):
        w = net.enc.get_submodule(name).weight
        bound = gain * math.sqrt(6 / (w[0].numel() + w[:, 0].numel()))
        assert 0.95 * bound < w.abs().max() <= bound, name


# ======================================================================== 3. JVP vs central differences
def _jvp_rel_errors(net, args, seed_dropout=None):
    """Relative error of torch.func.jvp against a central difference (h = 1e-5), per input and jointly."""
    def f(*a):
        if seed_dropout is not None:  # the same dropout mask in every evaluation
            torch.manual_seed(seed_dropout)
        return net(*a)
    g = torch.Generator().manual_seed(1)
    tangents = [torch.randn(a.shape, generator=g, dtype=a.dtype) for a in args]
    h, errs = 1e-5, []
    for which in [*range(len(args)), None]:  # each input alone, then all together
        tan = [v if which is None or i == which else torch.zeros_like(v) for i, v in enumerate(tangents)]
        out, jv = torch.func.jvp(f, tuple(args), tuple(tan))
        assert torch.equal(out, f(*args))  # the primal is the plain forward (same mask)
        fd = (f(*[a + h * v for a, v in zip(args, tan)]) - f(*[a - h * v for a, v in zip(args, tan)])) / (2 * h)
        assert jv.norm() > 1e-3 * out.norm() > 0  # every input really moves the output
        errs.append(((jv - fd).norm() / jv.norm()).item())
    return errs


def test_jvp_unet_matches_finite_differences_fp64():
    net = perturb(tiny(num_times=2, adn=True, dropout=0.0)).double().eval()
    assert net.enc["16x16_block0"].attn is False and net.enc["8x8_block0"].attn and net.dec["8x8_in0"].attn
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t, s = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    assert max(_jvp_rel_errors(net, [x, t, s])) < 1e-6


def test_jvp_mlp_matches_finite_differences_fp64():
    net = perturb(mlp(num_times=2, adn=True)).double().eval()
    x = torch.randn(16, 2, dtype=torch.float64)
    t, s = torch.rand(16, dtype=torch.float64), torch.rand(16, dtype=torch.float64)
    assert max(_jvp_rel_errors(net, [x, t, s])) < 1e-6
    plain = perturb(mlp(num_times=1)).double().eval()  # plain (shift) conditioning, one time
    assert max(_jvp_rel_errors(plain, [x, t])) < 1e-6


def test_jvp_train_mode_with_dropout():
    net = perturb(tiny(num_times=2, adn=True, dropout=0.3)).double().train()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    t, s = torch.rand(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64)
    torch.manual_seed(5)
    a = net(x, t, s)
    torch.manual_seed(6)
    assert not torch.equal(a, net(x, t, s))  # dropout is active
    with torch.random.fork_rng():  # fork_rng reproduces the mask 
        torch.manual_seed(5)
        assert torch.equal(a, net(x, t, s))
    assert max(_jvp_rel_errors(net, [x, t, s], seed_dropout=7)) < 1e-6
    m = perturb(mlp(num_times=2, dropout=0.3)).double().train()
    xm, tm = torch.randn(8, 2, dtype=torch.float64), torch.rand(8, dtype=torch.float64)
    assert max(_jvp_rel_errors(m, [xm, tm, tm.flip(0)], seed_dropout=7)) < 1e-6


# ======================================================================== 4. dtypes
def test_double_module_runs_in_double():
    for net, x in ((perturb(tiny(adn=True)).double(), torch.randn(2, 3, 16, 16, dtype=torch.float64)),
                   (perturb(mlp()).double(), torch.randn(4, 2, dtype=torch.float64))):
        seen = []
        net.map_layer0.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
        out = net(x, torch.rand(len(x), dtype=torch.float64))
        assert out.dtype == torch.float64 and seen == [(torch.float64, torch.float64)]


def test_cpu_bf16_autocast_keeps_embedding_fp32():
    """The embedding and each block's affine of it run in fp32 under autocast, rounded once to the activations'
    dtype (EDM, GDD: the affine is an fp32 matmul of the fp32 embedding; autocast made it a bf16 matmul)."""
    net = perturb(tiny())
    seen, inner, aff = [], [], []
    net.map_layer0.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    net.enc["16x16_block0"].conv0.register_forward_hook(lambda m, i, o: inner.append(o.dtype))
    net.enc["16x16_block0"].affine.register_forward_hook(lambda m, i, o: aff.append((i[0], o)))
    x = torch.randn(2, 3, 16, 16)
    with C.autocast(env1("bf16")):
        out = net(x, torch.rand(2))
    assert out.dtype == torch.float32
    assert seen == [(torch.float32, torch.float32)]
    assert inner == [torch.bfloat16]  # autocast really was on for the blocks
    (e, a), = aff
    assert a.dtype == torch.float32 and torch.equal(a, net.enc["16x16_block0"].affine(e))  # an fp32 matmul


# ======================================================================== 5. channels_last
@pytest.mark.parametrize("adn", [False, True])
def test_channels_last_matches_contiguous(adn):
    net = perturb(tiny(adn=adn, num_times=2), scale=0.05).eval()
    x, t, s = torch.randn(2, 3, 16, 16), torch.rand(2), torch.rand(2)
    ref = net(x, t, s)
    cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
    xc = x.contiguous(memory_format=torch.channels_last)
    assert xc.is_contiguous(memory_format=torch.channels_last) and not xc.is_contiguous()
    out = cl(xc, t, s)
    assert ref.abs().max() > 1e-2
    assert (out - ref).abs().max() < 1e-5


# ======================================================================== 6. config rebuild, misuse, labels
def test_build_net_rebuilds_same_keys_and_shapes():
    for net in (tiny(num_times=2, adn=True, label_dim=10), mlp(num_times=2)):
        d = json.loads(json.dumps(net.config))  # a plain JSON dict, as stored in checkpoints
        again = C.build_net(d)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    cfg = C.net_config("tiny")
    assert cfg["attn_res"] == [8] and C.net_config("tiny", img_resolution=32)["attn_res"] == [16]
    assert C.net_config("tiny", in_channels=1)["out_channels"] == 1


def test_net_config_errors():
    with pytest.raises(C.UserError, match="wdith"):
        C.net_config("mlp", wdith=3)
    with pytest.raises(C.UserError, match="huge"):
        C.net_config("huge")
    d = C.net_config("tiny")
    with pytest.raises(C.UserError, match="extra"):
        C.build_net({**d, "extra": 1})
    with pytest.raises(C.UserError, match="adn"):
        C.build_net({k: v for k, v in d.items() if k != "adn"})
    with pytest.raises(C.UserError):
        C.build_net({**d, "kind": "transformer"})
    with pytest.raises(C.UserError, match="divisible"):
        C.build_net({**d, "img_resolution": 15})
    # a value an edited checkpoint holds that no network takes: one sentence in build_net, not a traceback later
    m = C.net_config("mlp")
    for net, k, v in ((m, "width", -4), (m, "depth", 2.0), (m, "dropout", 1.5), (m, "time_scale", math.nan),
                      (m, "adn", 1), (d, "ch", 0), (d, "mult", []), (d, "attn_res", [0]), (d, "label_dim", -1),
                      (d, "resample_filter", [1, "1"])):
        with pytest.raises(C.UserError, match=f"network config holds {k}="):
            C.build_net({**net, k: v})
    C.build_net({**m, "dropout": 0, "time_scale": 1000}), C.build_net({**d, "attn_res": [], "label_dim": 10})  # control


def test_second_time_misuse_is_user_error():
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    with pytest.raises(C.UserError):
        tiny()(x, t, s=t)
    with pytest.raises(C.UserError):
        tiny(num_times=2)(x, t)
    with pytest.raises(C.UserError):
        mlp(num_times=2).encoder_features(torch.randn(2, 2), t)


def test_labels_int_equal_one_hot_and_zero_row_is_no_label():
    for net, x in ((perturb(tiny(label_dim=10)), torch.randn(3, 3, 16, 16)),
                   (perturb(mlp(label_dim=10)), torch.randn(3, 2))):
        t, y = torch.rand(3), torch.tensor([1, 4, 9])
        a = net(x, t, y=y)
        assert torch.equal(a, net(x, t, y=nn.functional.one_hot(y, 10).float()))
        assert not torch.equal(a, net(x, t, y=torch.tensor([2, 4, 9])))  # labels matter
        assert torch.equal(net(x, t, y=torch.zeros(3, 10)), net(x, t))  # null label = no label term
        # scalar time broadcasts
        assert torch.equal(net(x, 0.3), net(x, torch.full((3,), 0.3)))


def test_build_net_refuses_a_choice_an_odd_filter_and_heads_that_do_not_divide():
    """A network config's option outside its choices, a resample filter of odd length, a head count that does not
    divide a level's channels: one sentence each (an edited checkpoint; the command line never sets them)."""
    d = C.net_config("tiny")
    for k, v, want in (("embedding", "sinusoidal",
                        "network option embedding='sinusoidal' is not one of positional, fourier."),
                       ("resample_filter", [1, 3, 3], "resample_filter [1, 3, 3] needs an even, non-zero length."),
                       ("num_heads", 3, "num_heads 3 does not divide every level's channels.")):
        with pytest.raises(C.UserError) as e:
            C.build_net({**d, k: v})
        assert sentence(e) == want
    C.build_net({**d, "embedding": "fourier", "resample_filter": [1, 3, 3, 1], "num_heads": 2})  # control


# ======================================================================== 7. encoder features, freezing
def test_encoder_feature_shapes():
    net = meta_net("ddpmpp")
    feats = net.encoder_features(torch.empty(2, 3, 32, 32, device="meta"), torch.empty(2, device="meta"))
    assert [tuple(f.shape) for f in feats] == [(2, 256, 32, 32), (2, 256, 16, 16), (2, 256, 8, 8)]
    feats = tiny().encoder_features(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 16, 16), (2, 32, 8, 8)]
    feats = mlp().encoder_features(torch.randn(5, 2), torch.rand(5))
    assert [tuple(f.shape) for f in feats] == [(5, 128)] * 3
    net, got = tiny(nb=2), {}  # each level's LAST encoder block (with nb = 1 the first is the last)
    for k in ("16x16_block1", "8x8_block1"):
        net.enc[k].register_forward_hook(lambda m, a, out, k=k: got.__setitem__(k, out))
    feats = net.encoder_features(torch.randn(2, 3, 16, 16), torch.rand(2))
    assert torch.equal(feats[0], got["16x16_block1"]) and torch.equal(feats[1], got["8x8_block1"])


@pytest.mark.parametrize("kind", ["unet", "mlp"])
def test_encoder_features_differentiable_wrt_x_with_frozen_weights(kind):
    net = (tiny() if kind == "unet" else mlp()).requires_grad_(False)
    x = (torch.randn(2, 3, 16, 16) if kind == "unet" else torch.randn(4, 2)).requires_grad_(True)
    feats = net.encoder_features(x, torch.rand(len(x)))
    sum(f.square().sum() for f in feats).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())


def test_freeze_rule_selects_block_convs_only():
    net = meta_net("ddpmpp", num_times=2, adn=True, label_dim=10)
    mods = dict(net.named_modules())
    for k, _ in net.named_parameters():
        parent, owner = k.rsplit(".", 2)[0], k.split(".")[-2]
        if owner in FREEZE:
            assert isinstance(mods[parent], C.Block), k
        else:
            assert re.search(r"(_conv|skip|qkv|affine|norm\d|out_norm|out_conv|map_\w+)$", owner), k


# ======================================================================== 8. WeightHead
@pytest.mark.parametrize("num_times", [1, 2])
def test_weight_head(num_times):
    head = C.WeightHead(num_times=num_times, channels=16, time_scale=10.0)
    t, s = torch.rand(5), torch.rand(5)
    out = head(t, s if num_times == 2 else None)
    assert out.shape == (5,) and out.dtype == torch.float32 and torch.count_nonzero(out) == 0
    (out * torch.randn(5)).sum().backward()
    assert head.linear.weight.grad.abs().sum() > 0 and head.linear.bias.grad.abs().sum() > 0
    with C.autocast(env1("bf16")):
        assert head(t.double(), s.double() if num_times == 2 else None).dtype == torch.float32
    perturb(head)  # logvar = Linear([PE(tau t), PE(tau s)]) with tau = time_scale
    u = torch.cat([C._pe(10.0 * v, 16) for v in (t, s)[:num_times]], 1)
    assert torch.allclose(head(t, s if num_times == 2 else None), head.linear(u)[:, 0], atol=1e-6)


# ======================================================================== 9. toys
@pytest.mark.parametrize("name", ["checkerboard", "moons", "8gaussians", "spirals"])
def test_toy_moments_and_extent(name):
    x = C.toy_sample(name, 1_000_000, torch.Generator().manual_seed(0)).double()
    assert x.shape == (1_000_000, 2)
    assert x.mean(0).abs().max() < 0.01
    rms = x.var(0).mean().sqrt().item()
    assert abs(rms - 0.5) < 0.005
    assert x.abs().max() < 1.5
    same = C.toy_sample(name, 10, torch.Generator().manual_seed(3))
    assert same.dtype == torch.float32 and torch.equal(same, C.toy_sample(name, 10, torch.Generator().manual_seed(3)))


def test_toy_errors_and_modes():
    with pytest.raises(C.UserError, match="checkerboard"):
        C.toy_sample("circles", 10)
    centres, std = C.toy_modes("8gaussians")
    x = C.toy_sample("8gaussians", 20_000, torch.Generator().manual_seed(0))
    assert C.modes_covered(x, centres, std) == 8
    assert C.in_mode(x, centres, std) > 0.98
    assert C.toy_modes("moons") is None
    k = 0.5 / math.sqrt(0.5 + 0.05 ** 2)  # toy_sample's scale: centres on the circle of radius k, std 0.05 k
    assert torch.allclose(centres.norm(dim=1), torch.full((8,), k)) and std == pytest.approx(0.05 * k)
    assert C.in_mode(x, centres, std) == pytest.approx(1 - math.exp(-4.5), abs=0.004)  # P(|N(0, I_2)| < 3)


# ======================================================================== 10. uint8 round trip
def test_to_uint8_round_trip():
    u8 = torch.arange(256, dtype=torch.uint8)
    x = u8.float() / 127.5 - 1
    assert x[0] == -1 and x[255] == 1
    assert torch.equal(C.to_uint8(x), u8)
    assert torch.equal(C.to_uint8(torch.tensor([-5.0, 5.0])), torch.tensor([0, 255], dtype=torch.uint8))
    assert torch.equal(C.to_uint8(torch.tensor([0.0])), torch.tensor([128], dtype=torch.uint8))  # 127.5 rounds up


# ======================================================================== 11. data stream and loaders
def _indexed_images(n):
    """uint8 (n, 1, 4, 4): row 0 = [i // 256, i % 256, 0, 255], so index and flip can be read back."""
    u8 = torch.zeros(n, 1, 4, 4, dtype=torch.uint8)
    i = torch.arange(n)
    u8[:, 0, 0, 0], u8[:, 0, 0, 1], u8[:, 0, 0, 3] = i // 256, i % 256, 255
    u8[:, 0, 1:] = (i[:, None, None] * 7 % 251).to(torch.uint8)
    return u8


def _read_back(x):
    u8 = C.to_uint8(x)
    flipped = u8[:, 0, 0, 0] == 255
    u8 = torch.where(flipped[:, None, None, None], u8.flip(-1), u8)
    return u8[:, 0, 0, 0].long() * 256 + u8[:, 0, 0, 1].long(), flipped


def test_stream_parts_concatenate_to_single_process_batch():
    data = C.Data("images", "k", x=_indexed_images(10), labels=torch.arange(10) * 3, seed=4, xflip=True)
    for step in range(6):  # N = 10 is not a multiple of the batch: batches straddle epochs
        x1, y1 = data.batch(6, step)
        parts = [data.batch(3, step, part=r, parts=2) for r in range(2)]
        assert torch.equal(torch.cat([p[0] for p in parts]), x1)
        assert torch.equal(torch.cat([p[1] for p in parts]), y1)
        quarter = [data.batch(2, step, part=r, parts=3) for r in range(3)]  # rounds x ranks
        assert torch.equal(torch.cat([p[0] for p in quarter]), x1)
    fresh = C.Data("images", "k", x=_indexed_images(10), seed=4, xflip=True)
    assert torch.equal(fresh.batch(6, 5)[0], data.batch(6, 5)[0])  # a pure function of (seed, step)
    other = C.Data("images", "k", x=_indexed_images(10), seed=5, xflip=True)
    assert not torch.equal(other.batch(6, 0)[0], data.batch(6, 0)[0])


def test_stream_each_index_once_per_epoch():
    data = C.Data("images", "k", x=_indexed_images(10), seed=0, xflip=True)
    idx = torch.cat([_read_back(data.batch(4, step)[0])[0] for step in range(5)])  # positions 0..19
    e0, e1 = idx[:10], idx[10:]
    assert sorted(e0.tolist()) == list(range(10)) and sorted(e1.tolist()) == list(range(10))
    assert not torch.equal(e0, e1)  # a new permutation per epoch
    x, y = data.batch(4, 0)
    assert y is None and x.dtype == torch.float32 and x.shape == (4, 1, 4, 4)


def test_stream_flips_are_exact_mirror_images_on_half():
    u8 = _indexed_images(10_000)
    data = C.Data("images", "k", x=u8, seed=1, xflip=True)
    x, _ = data.batch(10_000, 0)
    idx, flipped = _read_back(x)
    assert sorted(idx.tolist()) == list(range(10_000))
    orig = u8[idx].float() / 127.5 - 1
    assert torch.equal(x, torch.where(flipped[:, None, None, None], orig.flip(-1), orig))
    assert 0.48 < flipped.float().mean().item() < 0.52
    data.xflip = False
    assert not _read_back(data.batch(1000, 0)[0])[1].any()


@pytest.mark.parametrize("name, cls", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_padding(monkeypatch, tmp_path, name, cls):
    import torchvision
    calls = []

    class Fake:
        def __init__(self, root, train=True, download=False):
            calls.append((str(root), train, download))
            self.data = torch.randint(1, 256, (6, 28, 28), generator=torch.Generator().manual_seed(0),
                                      dtype=torch.uint8)
            self.targets = torch.tensor([3, 1, 4, 1, 5, 9])
    monkeypatch.setattr(torchvision.datasets, cls, Fake)
    data = C.load_data(name, str(tmp_path), env1(), 0, False)
    assert calls and all(c[0] == str(tmp_path) and c[1] is True for c in calls)
    assert data.kind == "images" and data.key == name and data.num_classes == 10
    x = data.x
    assert x.shape == (6, 1, 32, 32) and x.dtype == torch.uint8
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (x[:, :, border] == 0).all()
    assert torch.equal(x[:, 0, 2:30, 2:30], Fake("", True, False).data)
    assert torch.equal(data.labels, torch.tensor([3, 1, 4, 1, 5, 9])) and data.labels.dtype == torch.int64
    xb, yb = data.batch(4, 0)
    assert xb.shape == (4, 1, 32, 32) and yb.shape == (4,)


@pytest.mark.parametrize("name, cls, archive", [("cifar10", "CIFAR10", "cifar-10-python.tar.gz"),
                                                ("mnist", "MNIST", "t10k}-{images-idx3,labels-idx1}-ubyte, "
                                                 "unpacked (gunzip the .gz), under MNIST/raw/")])  # all four files
def test_offline_download_is_user_error_naming_folder(monkeypatch, tmp_path, name, cls, archive):
    import torchvision

    class Offline:
        def __init__(self, root, train=True, download=False):
            raise RuntimeError("Error downloading: no network" if download else "Dataset not found")
    monkeypatch.setattr(torchvision.datasets, cls, Offline)
    root = str(tmp_path / "my data")
    with pytest.raises(C.UserError) as e:
        C.load_data(name, root, env1(), 0, False)
    assert root in str(e.value) and archive in str(e.value) and name in str(e.value)


def test_download_lines_wait_for_the_first_output(monkeypatch, tmp_path, capsys):
    """A download's lines (torch hub's "Downloading: ...", torchvision's progress bar on stderr) were written at once,
    so a refusal after them (a stray option, a missing teacher) printed them before its `error:` line: they are a note
    now, printed with the command's first output (a progress bar by its last state), and dropped if the block
    raises."""
    import torchvision

    class Fetching:
        def __init__(self, root, train=True, download=False):
            if download:
                print("Downloading: mnist")
                sys.stderr.write("\r  0%|          |\r100%|##########|\n")
            self.data, self.targets = torch.zeros(2, 28, 28, dtype=torch.uint8), torch.tensor([0, 1])
    monkeypatch.setattr(torchvision.datasets, "MNIST", Fetching)
    C.flush_notes(env1())
    C.load_data("mnist", str(tmp_path), env1(), 0, False)
    assert capsys.readouterr() == ("", "")  # held until the first output
    C.flush_notes(env1())
    assert capsys.readouterr().out == "Downloading: mnist\n100%|##########|\n"
    with pytest.raises(ValueError):
        with C.held_output():
            print("Downloading: lost")
            raise ValueError
    C.flush_notes(env1())
    assert capsys.readouterr() == ("", "")  # a block that raised leaves nothing


def _fake_cifar(root, n=3):
    """A real cifar-10-batches-py folder (pickled batches, small) and its train images/labels/MD5s."""
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows, labels, md5 = [], [], {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        lab = [int(v) for v in rng.integers(0, 10, n)]
        with open(base / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": d, "labels": lab, "filenames": [f"{i}.png" for i in range(n)]}, f)
        if name != "test_batch":
            rows.append(d), labels.extend(lab)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": n, "num_vis": 3072}, f)
    for name in os.listdir(base):
        md5[name] = hashlib.md5((base / name).read_bytes()).hexdigest()
    return np.concatenate(rows), labels, md5


def test_an_image_set_that_downloaded_but_does_not_load_is_one_sentence(monkeypatch, tmp_path):
    """torchvision's download=True went through (or rank 0's did) but reading the files does not: one sentence naming
    the folder and the archive to place there."""
    import torchvision

    class Unreadable:
        def __init__(self, root, train=True, download=False):
            if not download:
                raise RuntimeError("Dataset not found or corrupted.")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Unreadable)
    root = str(tmp_path / "data")
    with pytest.raises(C.UserError) as e:
        C.load_data("cifar10", root, env1(), 0, False)
    assert sentence(e).startswith(f"cifar10 is missing from '{root}'; place cifar-10-python.tar.gz (MD5 ")
    assert "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz" in sentence(e)  # where to get it offline


def test_augment_refuses_a_batch_that_is_not_nchw():
    with pytest.raises(ValueError, match=r"augment expects images \(N, C, H, W\), got shape \(3, 8, 8\)"):
        C.augment(torch.zeros(3, 8, 8), 0.5, xflip=1)


def test_cifar10_from_fabricated_archive_folder(monkeypatch, tmp_path):
    import torchvision
    from torchvision.datasets import cifar
    rows, labels, md5 = _fake_cifar(tmp_path)
    # torchvision checks the real MD5s of each file; point it at ours, so its own integrity check and loader run
    monkeypatch.setattr(cifar.CIFAR10, "train_list", [[f"data_batch_{i}", md5[f"data_batch_{i}"]] for i in range(1, 6)])
    monkeypatch.setattr(cifar.CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    monkeypatch.setattr(cifar.CIFAR10, "meta", {"filename": "batches.meta", "key": "label_names",
                                                "md5": md5["batches.meta"]})

    def no_network(*a, **k):
        raise AssertionError("tried to download although the files are present")
    monkeypatch.setattr(cifar, "download_and_extract_archive", no_network)
    assert torchvision.datasets.CIFAR10 is cifar.CIFAR10
    data = C.load_data("cifar10", str(tmp_path), env1(), 0, True)
    assert data.kind == "images" and data.key == "cifar10" and data.num_classes == 10 and data.xflip
    assert data.x.shape == (15, 3, 32, 32) and data.x.dtype == torch.uint8
    assert torch.equal(data.x, torch.from_numpy(rows.reshape(-1, 3, 32, 32)))  # CHW planes as stored by CIFAR
    assert data.labels.tolist() == labels
    assert data.shape == (3, 32, 32)


def test_npy_arrays_accepted_and_rejected(tmp_path, capsys):
    rng = np.random.default_rng(0)
    u8 = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)  # noqa: E731
    ok = {"hw": u8(5, 8, 8), "hw1": u8(5, 8, 8, 1), "hw3": u8(5, 8, 8, 3)}
    for k, a in ok.items():
        p = str(tmp_path / f"{k}.npy")
        np.save(p, a)
        d = C.load_data(p, "data", env1(), 0, False)
        want = torch.from_numpy(a if a.ndim == 4 else a[..., None]).permute(0, 3, 1, 2)
        assert d.kind == "images" and d.key.startswith("user-") and torch.equal(d.x, want), k
    pts = (rng.normal(size=(100, 2)) * 0.5).astype(np.float64)
    np.save(tmp_path / "pts.npy", pts)
    d = C.load_data(str(tmp_path / "pts.npy"), "data", env1(), 0, False)
    assert d.kind == "points" and d.x.dtype == torch.float32 and torch.allclose(d.x.double(), torch.from_numpy(pts))
    assert d.batch(7, 0)[0].shape == (7, 2)
    np.save(tmp_path / "wide.npy", pts * 10)
    capsys.readouterr()
    C.load_data(str(tmp_path / "wide.npy"), "data", env1(), 0, False)
    assert capsys.readouterr().out == ""  # the data line waits for the run's first output (nothing before an error)
    C.flush_notes(env1())
    assert "WARNING: std outside" in capsys.readouterr().out
    bad = {"float_images": rng.random((5, 8, 8, 3)).astype(np.float32), "nchw": u8(5, 3, 8, 8), "c2": u8(5, 8, 8, 2),
           "nonsquare": u8(5, 8, 6, 3), "points3": rng.random((10, 3)).astype(np.float32)}
    for k, a in bad.items():
        np.save(tmp_path / f"{k}.npy", a)
        with pytest.raises(C.UserError, match="uint8 NHWC"):
            C.load_data(str(tmp_path / f"{k}.npy"), "data", env1(), 0, False)
    with pytest.raises(C.UserError, match="nope.npy"):
        C.load_data(str(tmp_path / "nope.npy"), "data", env1(), 0, False)
    np.savez(tmp_path / "arch.npz", x=u8(5, 8, 8, 3))  # np.load opens the zip whatever its name (a traceback)
    os.replace(tmp_path / "arch.npz", tmp_path / "arch.npy")
    with pytest.raises(C.UserError, match=r"arch.npy is an .npz archive, not a .npy array"):
        C.load_data(str(tmp_path / "arch.npy"), "data", env1(), 0, False)


def test_bool_npy_is_not_points(tmp_path):
    """A bool (N, 2) array (a mask, not coordinates) was trained on as points at the corners 0 and 1."""
    np.save(tmp_path / "mask.npy", np.random.default_rng(0).random((8, 2)) < 0.5)
    with pytest.raises(C.UserError, match="mask.npy holds bool values, not numbers"):
        C.load_data(str(tmp_path / "mask.npy"), "data", env1(), 0, False)


def write_png(t, path):
    """A (C, H, W) uint8 tensor as an 8-bit PNG (C = 1: grey)."""
    from PIL import Image
    Image.fromarray(t.permute(1, 2, 0).squeeze(2).numpy()).save(path)


def test_a_file_that_is_not_npy_is_not_called_a_folder(tmp_path):
    """A single image or an .npz given as --data was refused as 'no images found in folder'."""
    write_png(torch.zeros(3, 8, 8, dtype=torch.uint8), tmp_path / "one.png")
    np.savez(tmp_path / "pts.npz", x=np.zeros((8, 2)))
    for name in ("one.png", "pts.npz"):
        with pytest.raises(C.UserError, match=f"{name}' is a file but not a .npy array"):
            C.load_data(str(tmp_path / name), "data", env1(), 0, False)
    np.save(tmp_path / "PTS.npy", np.zeros((8, 2), np.float32))  # an upper-case name, as .ZIP is read: was refused so
    os.replace(tmp_path / "PTS.npy", tmp_path / "PTS.NPY")
    assert C.load_data(str(tmp_path / "PTS.NPY"), "data", env1(), 0, False).kind == "points"


def test_an_npy_header_left_open_is_one_sentence(tmp_path):
    """A header whose dict is never closed (its last byte damaged): numpy's tokenize.TokenError was a traceback."""
    head = b"{'descr': '<f4', 'fortran_order': False, 'shape': (8, 2), "
    head += b" " * (127 - 10 - len(head)) + b"\n"
    (tmp_path / "open.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head + bytes(64))
    with pytest.raises(C.UserError, match=r"open.npy is not a numeric .npy array \(TokenError"):
        C.load_data(str(tmp_path / "open.npy"), "data", env1(), 0, False)


def test_an_npy_written_by_python_2_is_read_without_a_warning(tmp_path):
    """Its header's Python 2 longs (8L): numpy's UserWarning ('created on Python 2') was printed before the run's first
    line, or before the error line of an array of the wrong shape."""
    import warnings
    for name, shape, n in (("good", "(8L, 2L)", 16), ("bad", "(8L, 3L)", 24)):
        head = ("{'descr': '<f4', 'fortran_order': False, 'shape': %s, }" % shape).encode()
        head += b" " * (127 - 10 - len(head)) + b"\n"
        (tmp_path / f"{name}.npy").write_bytes(b"\x93NUMPY\x01\x00" + len(head).to_bytes(2, "little") + head
                                               + np.full(n, 0.5, "<f4").tobytes())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert C.load_data(str(tmp_path / "good.npy"), "data", env1(), 0, False).x.shape == (8, 2)
        with pytest.raises(C.UserError, match=r"bad.npy: expected float \(N, 2\) points"):
            C.load_data(str(tmp_path / "bad.npy"), "data", env1(), 0, False)
    assert not w, w[0].message


def test_npy_declaring_more_than_it_holds_is_refused(tmp_path):
    """A header declaring 2 x 10^12 floats in a file of a few bytes: refused as truncated, not allocated (np.load's
    MemoryError read as 'out of memory; lower --batch'); a shape whose product overflows (numpy's RuntimeWarning
    preceded the error line) likewise."""
    import warnings
    from numpy.lib import format as npf
    for name, shape in (("huge", (10 ** 12, 2)), ("short", (8, 2)), ("overflow", (2 ** 62, 2 ** 62, 2))):
        with open(tmp_path / f"{name}.npy", "wb") as f:
            npf.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": shape})
            f.write(b"\0" * 12)
        with pytest.raises(C.UserError, match=f"{name}.npy holds fewer bytes than its header declares"), \
                warnings.catch_warnings():
            warnings.simplefilter("error")
            C.load_data(str(tmp_path / f"{name}.npy"), "data", env1(), 0, False)


def test_image_folder_round_trip_and_size_error(tmp_path):
    g = torch.Generator().manual_seed(0)
    imgs = {"b/2.png": torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8),
            "a.png": torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8),
            "b/1.png": torch.randint(0, 256, (1, 8, 8), generator=g, dtype=torch.uint8)}  # grey -> RGB
    for k, v in imgs.items():
        (tmp_path / "imgs" / os.path.dirname(k)).mkdir(parents=True, exist_ok=True)
        write_png(v, tmp_path / "imgs" / k)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    d = C.load_data(str(tmp_path / "imgs"), "data", env1(), 0, False)
    want = torch.stack([imgs[k].expand(3, 8, 8) for k in ("a.png", "b/1.png", "b/2.png")])  # sorted paths
    assert d.kind == "images" and torch.equal(d.x, want)
    write_png(torch.zeros(3, 6, 6, dtype=torch.uint8), tmp_path / "imgs" / "c.png")
    with pytest.raises(C.UserError, match="c.png"):
        C.load_data(str(tmp_path / "imgs"), "data", env1(), 0, False)
    (tmp_path / "wide").mkdir()
    write_png(torch.zeros(3, 6, 8, dtype=torch.uint8), tmp_path / "wide" / "w.png")
    with pytest.raises(C.UserError, match="square"):
        C.load_data(str(tmp_path / "wide"), "data", env1(), 0, False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(C.UserError):
        C.load_data(str(tmp_path / "empty"), "data", env1(), 0, False)
    # 16-bit PNGs: scaled to 8 bits (the high byte), not read as values up to 65535 (x/127.5 - 1 ~ 513) nor truncated
    from PIL import Image
    (tmp_path / "deep").mkdir()
    v = np.array([[0, 300, 32800, 65535]] * 4, dtype=np.uint16)
    for i in range(2):
        Image.fromarray(v).save(tmp_path / "deep" / f"{i}.png")
    d = C.load_data(str(tmp_path / "deep"), "data", env1(), 0, False)
    assert d.x.dtype == torch.uint8 and d.x[0, 0, 0].tolist() == [0, 1, 128, 255]


def test_transparent_pixels_in_a_folder_are_refused_and_an_opaque_alpha_dropped(tmp_path):
    """The RGB decode kept the colours beneath transparent pixels (RGBA, grey + alpha, a palette's transparent index)
    and trained on them without a word; an alpha channel that is 255 everywhere is dropped."""
    from PIL import Image
    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    (tmp_path / "opaque").mkdir()
    for i in range(2):
        Image.fromarray(np.dstack([rgb + i, np.full((8, 8), 255, np.uint8)])).save(tmp_path / "opaque" / f"{i}.png")
    d = C.load_data(str(tmp_path / "opaque"), "data", env1(), 0, False)
    assert d.x.shape == (2, 3, 8, 8) and torch.equal(d.x[1], torch.from_numpy(rgb + 1).permute(2, 0, 1))
    pal = Image.fromarray(rgb).convert("P")
    pal.info["transparency"] = int(np.asarray(pal)[0, 0])
    for name, im in (("rgba", Image.fromarray(np.dstack([rgb, np.full((8, 8), 254, np.uint8)]))),
                     ("la", Image.fromarray(np.zeros((8, 8, 2), np.uint8), "LA")), ("palette", pal)):
        (tmp_path / name).mkdir()
        for i in range(2):
            im.save(tmp_path / name / f"{i}.png")
        with pytest.raises(C.UserError, match=f"{name}/0.png' has transparent pixels"):
            C.load_data(str(tmp_path / name), "data", env1(), 0, False)


def test_a_png_colour_key_at_2_4_or_16_bits_is_transparency_too(tmp_path):
    """A PNG's tRNS colour key in grey of 2, 4 or 16 bits or in 16-bit RGB: PIL does not apply it (it scales low-depth
    grey to 8 bits but not the key, reads 16-bit grey opaque, compares 16-bit RGB's key with 8-bit pixels), so images
    transparent everywhere trained without a word; a key no pixel holds still reads."""
    import struct
    import zlib

    def png(path, depth, ctype, v, key):  # 8 x 8 pixels of the sample value(s) v, the colour key `key`
        def chunk(kind, data):
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        px = int(format(v[0], f"0{depth}b") * 8, 2).to_bytes(depth, "big") if depth < 8 else \
            b"".join(c.to_bytes(depth // 8, "big") for c in v) * 8
        head = chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, depth, ctype, 0, 0, 0))
        trns = chunk(b"tRNS", struct.pack(f">{len(key)}H", *key))
        body = head + trns + chunk(b"IDAT", zlib.compress((b"\0" + px) * 8))
        path.write_bytes(b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))
    for name, depth, ctype, v, want in (("grey2", 2, 0, (2,), 170), ("grey4", 4, 0, (14,), 238),
                                        ("grey16", 16, 0, (300,), 1), ("rgb16", 16, 2, (300, 1, 2), 1)):
        for hit in (True, False):
            (tmp_path / f"{name}{hit}").mkdir()
            for i in range(2):
                key = v if hit else (v[0] - 1, *v[1:]) if depth < 16 else (v[0] + 256, *v[1:])
                png(tmp_path / f"{name}{hit}" / f"{i}.png", depth, ctype, v, key)
            if hit:
                with pytest.raises(C.UserError, match=f"{name}True/0.png' has transparent pixels"):
                    C.load_data(str(tmp_path / f"{name}{hit}"), "data", env1(), 0, False)
            else:
                assert C.load_data(str(tmp_path / f"{name}{hit}"), "data", env1(), 0, False).x[0, 0, 0, 0] == want


def _png16(path, a):
    """A 16-bit RGB PNG written by hand (PIL writes 16 bits for grey only): (H, W, 3) uint16, big-endian rows."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in a)
    head = struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_a_folder_reads_bmp_tiff_jpeg_and_16_bit_rgb_and_refuses_what_it_cannot(tmp_path):
    """The folder is read with PIL, as EDM's dataset_tool.py reads one: BMP and TIFF (which torchvision's decoder
    refused) beside PNGs, a 16-bit RGB PNG scaled to its high bytes; a damaged file, a truncated JPEG and 32-bit
    pixels are one sentence each."""
    from PIL import Image
    rgb = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3)
    (tmp_path / "mixed").mkdir()
    for i, ext in enumerate(("png", "BMP", "tif")):
        Image.fromarray(rgb + i).save(tmp_path / "mixed" / f"{i}.{ext}")
    _png16(tmp_path / "mixed" / "3.png", (rgb.astype(np.uint16) + 3) * 256 + 100)  # high bytes rgb + 3
    Image.fromarray(rgb).save(tmp_path / "mixed" / "4.png", format="JPEG", quality=100)  # (named .png: read as JPEG)
    Image.fromarray(np.full((8, 8), 255 * 256 + 7, np.int32)).save(tmp_path / "mixed" / "5.tif")  # mode I, in 16 bits
    d = C.load_data(str(tmp_path / "mixed"), "data", env1(), 0, False)
    want = torch.stack([torch.from_numpy(rgb + i).permute(2, 0, 1) for i in range(4)])
    assert d.x.shape == (6, 3, 8, 8) and torch.equal(d.x[:4], want) and (d.x[5] == 255).all()
    assert (d.x[4].int() - want[0].int()).abs().max() <= 8  # (JPEG: lossy even at quality 100)
    jpg = (tmp_path / "mixed" / "4.png").read_bytes()
    buf = io.BytesIO()  # a format outside the list, named .png: an icon here, an EPS (Ghostscript) in the wild
    Image.fromarray(rgb).save(buf, format="ICO")
    cases = {"icon": ("x.png", buf.getvalue(), "could not be decoded"),
             "damaged": ("x.bmp", b"BM not a bitmap", "could not be decoded"),
             "truncated": ("x.jpg", jpg[:len(jpg) // 2], "could not be decoded"),
             "deep": ("x.tif", 70000, "holds pixel values outside 16 bits"),
             "float": ("x.tif", 0.5, "holds floating-point pixel values")}
    for name, (f, data, words) in cases.items():
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(rgb).save(tmp_path / name / f"{i}.png")
        if not isinstance(data, bytes):  # (mode I, 32-bit grey, or F)
            a = np.full((8, 8), data, np.int32 if isinstance(data, int) else np.float32)
            Image.fromarray(a).save(tmp_path / name / f)
        else:
            (tmp_path / name / f).write_bytes(data)
        with pytest.raises(C.UserError, match=f"{f}' {words}"):
            C.load_data(str(tmp_path / name), "data", env1(), 0, False)


def test_an_edm_dataset_zip_reads_as_edm_reads_it_and_its_folder_alike(tmp_path):
    """--data X.zip, the archive EDM's dataset_tool.py writes and the official codes train from: images in the sorted
    order of their paths and dataset.json's labels, as NVlabs/edm training/dataset.py ImageFolderDataset reads them
    (tests/golden/edm_dataset.npz, made by its code at the commit it records: make_edm_dataset_golden.py); the same
    files unpacked into a folder give the same data, labels and key."""
    import zipfile
    gold = np.load(os.path.join(GOLDEN, "edm_dataset.npz"))
    zpath = os.path.join(GOLDEN, "edm_dataset.zip")
    d = C.load_data(zpath, "data", env1(), 0, False)
    assert torch.equal(d.x, torch.from_numpy(gold["images"])) and d.x.dtype == torch.uint8
    assert torch.equal(d.labels, torch.from_numpy(gold["labels"])) and d.num_classes == int(gold["label_dim"])
    with zipfile.ZipFile(zpath) as z:
        z.extractall(tmp_path / "unpacked")
    f = C.load_data(str(tmp_path / "unpacked"), "data", env1(), 0, False)
    assert torch.equal(f.x, d.x) and torch.equal(f.labels, d.labels) and f.key == d.key
    (tmp_path / "unpacked" / "dataset.json").write_text('{"labels": null}')  # (dataset_tool.py's unlabelled sets)
    u = C.load_data(str(tmp_path / "unpacked"), "data", env1(), 0, False)
    assert u.labels is None and u.num_classes == 0 and torch.equal(u.x, d.x) and u.key != d.key
    (tmp_path / "unpacked" / "dataset.json").unlink()
    assert C.load_data(str(tmp_path / "unpacked"), "data", env1(), 0, False).key == u.key


def test_a_bad_zip_or_dataset_json_is_one_sentence(tmp_path):
    import zipfile
    from PIL import Image
    rgb = np.zeros((8, 8, 3), np.uint8)
    names = ("0.png", "1.png")
    for n in names:
        Image.fromarray(rgb).save(tmp_path / n)
    cases = {"unlisted": ({"labels": [["0.png", 1]]}, "gives '1.png' no class label"),
             "float": ({"labels": [["0.png", 1], ["1.png", 0.5]]}, "gives '1.png' no class label"),
             "negative": ({"labels": [["0.png", -1], ["1.png", 0]]}, "gives '0.png' no class label"),
             "vector": ({"labels": [["0.png", [1, 0]], ["1.png", [0, 1]]]}, "gives '0.png' no class label"),
             "int64": ({"labels": [["0.png", 0], ["1.png", 2 ** 63]]}, "gives '1.png' no class label"),  # (a traceback)
             "int32": ({"labels": [["0.png", 2 ** 31 - 1], ["1.png", 0]]}, "gives '0.png' no class label"),  # (--cond
             # built a network of 2^31 classes: "a checkpoint's network config holds label_dim=...", on a fresh run)
             "no_key": ({"classes": []}, "is not {\"labels\""), "text": ("not json", "is not {\"labels\""),
             "deep": ('{"labels": ' + "[" * 10 ** 5 + "]" * 10 ** 5 + "}", "is not {\"labels\"")}  # (RecursionError)
    for case, (js, words) in cases.items():
        with zipfile.ZipFile(tmp_path / f"{case}.zip", "w") as z:
            for n in names:
                z.write(tmp_path / n, n)
            z.writestr("dataset.json", js if isinstance(js, str) else json.dumps(js))
        with pytest.raises(C.UserError, match=f"dataset.json of '.*{case}.zip' {re.escape(words)}"):
            C.load_data(str(tmp_path / f"{case}.zip"), "data", env1(), 0, False)
    (tmp_path / "fifo").mkdir()
    Image.fromarray(rgb).save(tmp_path / "fifo" / "0.png")
    os.mkfifo(tmp_path / "fifo" / "1.png")  # (reading it waited for a writer for ever)
    with pytest.raises(C.UserError, match="fifo/1.png' is not a regular file"):
        C.load_data(str(tmp_path / "fifo"), "data", env1(), 0, False)
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(C.UserError, match="text.zip' is not a readable .zip archive"):
        C.load_data(str(tmp_path / "text.zip"), "data", env1(), 0, False)
    os.mkfifo(tmp_path / "fifo.zip")  # a FIFO, or a device, named .zip: zipfile read it for ever
    os.symlink("/dev/zero", tmp_path / "zero.zip")
    for name in ("fifo.zip", "zero.zip"):
        with pytest.raises(C.UserError, match=f"{name}' is neither a regular file nor a folder"):
            C.load_data(str(tmp_path / name), "data", env1(), 0, False)
    with zipfile.ZipFile(tmp_path / "crc.zip", "w") as z:  # a member whose bytes no longer match its CRC
        for n in names:
            z.write(tmp_path / n, n)
    raw = bytearray((tmp_path / "crc.zip").read_bytes())
    at = raw.index(b"IDAT") + 6
    raw[at] ^= 0xFF
    (tmp_path / "crc.zip").write_bytes(bytes(raw))
    with pytest.raises(C.UserError, match=r"crc.zip/0.png' could not be decoded \(BadZipFile\)"):
        C.load_data(str(tmp_path / "crc.zip"), "data", env1(), 0, False)
    import struct  # an encrypted member, and one packed by a method zipfile does not read (AES, 99): were tracebacks
    for case, words in (("encrypted", "is encrypted"), ("method", "compression method is not supported")):
        with zipfile.ZipFile(tmp_path / f"{case}.zip", "w") as z:
            for n in names:
                z.write(tmp_path / n, n)
        raw = bytearray((tmp_path / f"{case}.zip").read_bytes())
        for sig, flags, method in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):  # local and central headers
            at = raw.index(sig)
            if case == "encrypted":
                raw[at + flags] |= 1
            else:
                raw[at + method:at + method + 2] = struct.pack("<H", 99)
        (tmp_path / f"{case}.zip").write_bytes(bytes(raw))
        with pytest.raises(C.UserError, match=f"'0.png' in '.*{case}.zip' cannot be read: .*{words}"):
            C.load_data(str(tmp_path / f"{case}.zip"), "data", env1(), 0, False)


def test_a_zip_whose_directory_zipfile_refuses_is_one_sentence(tmp_path):
    """A member that needs a zip version above 6.3 (NotImplementedError) or a name flagged UTF-8 that is not
    (UnicodeDecodeError): zipfile.ZipFile raised them on opening the archive, tracebacks both; so was a dataset.json
    member whose bytes end before its declared size (EOFError)."""
    import struct
    import zipfile
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "0.png")
    for case in ("utf8", "version"):
        with zipfile.ZipFile(tmp_path / f"{case}.zip", "w") as z:
            z.write(tmp_path / "0.png", "\u00e9.png")  # (zipfile flags a non-ASCII name UTF-8)
            z.write(tmp_path / "0.png", "1.png")
        raw = bytearray((tmp_path / f"{case}.zip").read_bytes())
        if case == "version":  # the central directory's "version needed to extract" of the first member
            at = raw.index(b"PK\x01\x02") + 6
            raw[at:at + 2] = struct.pack("<H", 64)
        else:
            raw = bytearray(bytes(raw).replace("\u00e9".encode(), b"\xff\xfe"))
        (tmp_path / f"{case}.zip").write_bytes(bytes(raw))
        with pytest.raises(C.UserError, match=f"{case}.zip' is not a readable .zip archive"):
            C.load_data(str(tmp_path / f"{case}.zip"), "data", env1(), 0, False)
    with zipfile.ZipFile(tmp_path / "short.zip", "w") as z:  # a dataset.json whose bytes end before its declared size
        z.write(tmp_path / "0.png", "0.png")
        z.write(tmp_path / "0.png", "1.png")
        z.writestr("dataset.json", '{"labels": null}')
    raw = bytearray((tmp_path / "short.zip").read_bytes())
    at = raw.rindex(b"PK\x01\x02") + 20  # its central directory entry's compressed and uncompressed sizes
    raw[at:at + 8] = struct.pack("<II", 1000, 1000)
    (tmp_path / "short.zip").write_bytes(bytes(raw))
    with pytest.raises(C.UserError, match="dataset.json of '.*short.zip' is not {\"labels\""):  # (EOFError)
        C.load_data(str(tmp_path / "short.zip"), "data", env1(), 0, False)


def test_an_image_member_that_unpacks_to_gigabytes_is_not_read_whole(tmp_path):
    """A .zip member (a zip bomb: megabytes that unpack to gigabytes of zeros) or a huge file named .png was read into
    memory whole before PIL looked at it ('out of memory; lower --batch', or the process killed); PIL now reads what it
    needs of a stream, as EDM does (peak memory well below the 128 MiB here)."""
    import tracemalloc
    import zipfile
    from PIL import Image
    Image.new("RGB", (8, 8)).save(tmp_path / "1.png")
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        z.write(tmp_path / "1.png", "1.png")
        with z.open("0.png", "w") as f:
            for _ in range(8):
                f.write(bytes(16 << 20))
    (tmp_path / "big").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "big" / "1.png")
    with open(tmp_path / "big" / "0.png", "wb") as f:  # (sparse: no disk used)
        f.truncate(128 << 20)
    for case in ("bomb.zip", "big"):
        tracemalloc.start()
        try:
            with pytest.raises(C.UserError, match=f"{case}/0.png' could not be decoded"):
                C.load_data(str(tmp_path / case), "data", env1(), 0, False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 32 << 20, (case, peak)


def test_an_animated_image_in_a_folder_is_one_sentence(tmp_path):
    """An animated GIF decodes to (frames, C, H, W): two of them stacked to 5-D were a traceback (permute), one beside
    a PNG a size error that named the frame count as a size."""
    from PIL import Image
    frames = [Image.new("RGB", (8, 8), (40 * i, 0, 0)) for i in range(3)]
    for name in ("a", "b"):
        frames[0].save(tmp_path / f"{name}.gif", save_all=True, append_images=frames[1:])
    with pytest.raises(C.UserError, match=r"a.gif' holds 3 frames \(an animation or a multi-page file\)"):
        C.load_data(str(tmp_path), "data", env1(), 0, False)
    (tmp_path / "a.gif").unlink()
    (tmp_path / "b.gif").unlink()
    for name in ("a", "b"):  # a multi-page TIFF: not an animation, the same refusal
        frames[0].save(tmp_path / f"{name}.tif", save_all=True, append_images=frames[1:2])
    with pytest.raises(C.UserError, match=r"a.tif' holds 2 frames"):
        C.load_data(str(tmp_path), "data", env1(), 0, False)


def test_a_damaged_later_frame_is_one_sentence(tmp_path):
    """Every cut of a 2-frame GIF and of a 2-page TIFF, and a TIFF whose second page names an unknown compression:
    PIL counting the frames raised IndexError, struct.error, TypeError ('Missing dimensions') or KeyError,
    tracebacks; and the warnings Image.open gives (a cut TIFF's 'Corrupt EXIF data') came before the 'ignore' filter
    (only fd 2's redirection kept them off the terminal)."""
    import struct
    import warnings
    from PIL import Image
    base = Image.fromarray(np.arange(8 * 8 * 3, dtype=np.uint8).reshape(8, 8, 3))
    base.convert("P").save(tmp_path / "a.gif", save_all=True, append_images=[base.convert("P").rotate(90)])
    base.save(tmp_path / "a.tif", save_all=True, append_images=[base])
    t = bytearray((tmp_path / "a.tif").read_bytes())
    ifd = struct.unpack("<I", t[4:8])[0]
    ifd = struct.unpack("<I", t[ifd + 2 + 12 * t[ifd]:][:4])[0]  # the second page's tags (fewer than 256)
    at = next(ifd + 2 + 12 * i for i in range(t[ifd]) if t[ifd + 2 + 12 * i:][:2] == struct.pack("<H", 259))
    t[at + 8:at + 10] = struct.pack("<H", 10825)  # (its Compression)
    cases = {"compression.tif": bytes(t)}
    for name in ("a.gif", "a.tif"):
        data = (tmp_path / name).read_bytes()
        cases.update({f"{k}{name}": data[:k] for k in range(1, len(data))})
    with warnings.catch_warnings(record=True) as w:  # (PIL's warnings while opening one: kept inside, unprinted)
        warnings.simplefilter("always")
        for name, data in cases.items():
            try:
                C._read_image(lambda: io.BytesIO(data), name)
            except C.UserError:
                pass
    assert not w, w[0].message


def test_toy_data_stream():
    d = C.load_data("moons", "data", env1(), 3, False)
    x, y = d.batch(64, 0)
    assert d.kind == "toy" and x.shape == (64, 2) and y is None and d.shape == (2,)
    assert not torch.equal(x, d.batch(64, 1)[0])  # fresh draws
    with pytest.raises(C.UserError):
        C.load_data("no_such_data", "data", env1(), 0, False)


# ======================================================================== 12. EMA
def _lin(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()


def test_ema_constant_decay_closed_form():
    m = _lin()
    ema = C.EMA(m, decay=0.9)
    assert ema.model is not m and not ema.model.training
    assert all(not p.requires_grad for p in ema.model.parameters())
    p0 = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(2.0)
    for _ in range(5):
        ema.update(m, nimg=0, batch=10)
    for pe, q in zip(ema.model.parameters(), p0):
        assert torch.allclose(pe, 2.0 + 0.9 ** 5 * (q - 2.0), rtol=0, atol=1e-12)


def test_ema_halflife_step_response():
    m = _lin()
    ema = C.EMA(m, halflife_kimg=0.5)  # h = 500 images
    p0 = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1.0)
    k, B = 7, 50
    for i in range(k):
        ema.update(m, nimg=i * B, batch=B)
    want = 1 - 0.5 ** (k * B / 500)
    for pe, q in zip(ema.model.parameters(), p0):
        assert torch.allclose(pe - q, torch.full_like(q, want), rtol=0, atol=1e-12)


def test_ema_rampup_and_buffers():
    m = _lin()
    ema = C.EMA(m, halflife_kimg=10, rampup=0.05)
    for nimg in (1, 100, 1000, 10**6):
        assert ema.beta(nimg, 64) == pytest.approx(0.5 ** (64 / max(min(10_000, 0.05 * nimg), 1e-8)), rel=1e-12)
    assert ema.beta(0, 64) == 0.0
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(3.0).add_(1.0)
    m.train()(torch.randn(16, 4, dtype=torch.float64))  # changes the BatchNorm running statistics
    ema.update(m, nimg=0, batch=64)  # beta = 0: the EMA becomes a copy
    for (k, a), b in zip(ema.model.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(C.UserError):
        C.EMA(m)
    with pytest.raises(C.UserError):
        C.EMA(m, decay=0.9, halflife_kimg=1.0)


def test_ema_skips_frozen_parameters_and_copies_buffers():
    m = _lin()
    m[0].weight.requires_grad_(False)
    ema = C.EMA(m, decay=0.5)
    w0 = ema.model[0].weight.clone()
    with torch.no_grad():
        m[0].weight.add_(1.0), m[0].bias.add_(1.0)
    m.train()(torch.randn(16, 4, dtype=torch.float64))
    ema.update(m, nimg=0, batch=8)
    assert torch.equal(ema.model[0].weight, w0)  # bit-identical
    assert not torch.equal(ema.model[0].bias, m[0].bias) and not torch.equal(ema.model[0].bias, m[0].bias - 1)
    assert torch.equal(ema.model[1].running_mean, m[1].running_mean)
    assert torch.equal(ema.model[1].num_batches_tracked, m[1].num_batches_tracked)


# ======================================================================== 13. Fréchet distance
def _spd(d, seed, rank=None):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d, rank or d, generator=g, dtype=torch.float64)
    return A @ A.T / (rank or d)


def test_frechet_identical_diagonal_symmetric_rotation():
    g = torch.Generator().manual_seed(0)
    d = 12
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    s1, s2 = _spd(d, 1), _spd(d, 2)
    assert abs(C.frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    a, b = torch.rand(d, generator=g, dtype=torch.float64) * 3, torch.rand(d, generator=g, dtype=torch.float64)
    want = (mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum()
    assert C.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(want.item(), rel=1e-9)
    f12, f21 = C.frechet_distance(mu1, s1, mu2, s2), C.frechet_distance(mu2, s2, mu1, s1)
    assert f12 > 1 and f12 == pytest.approx(f21, rel=1e-9)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    rot = C.frechet_distance(Q @ mu1, Q @ s1 @ Q.T, Q @ mu2, Q @ s2 @ Q.T)
    assert rot == pytest.approx(f12, rel=1e-9)
    # numpy inputs (as loaded from npz) work too
    assert C.frechet_distance(mu1.numpy(), s1.numpy(), mu2.numpy(), s2.numpy()) == pytest.approx(f12, rel=1e-12)


def test_frechet_rank_deficient_is_finite():
    d = 16
    s1, s2 = _spd(d, 3, rank=5), _spd(d, 4, rank=3)
    mu = torch.zeros(d, dtype=torch.float64)
    f = C.frechet_distance(mu, s1, mu + 0.1, s2)
    assert math.isfinite(f) and f > 0
    assert math.isfinite(C.frechet_distance(mu, s1, mu, s1)) and C.frechet_distance(mu, s1, mu, s1) < 1e-6
    zero = torch.zeros(d, d, dtype=torch.float64)
    assert C.frechet_distance(mu, zero, mu, zero) == 0


def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    d = 20
    g = torch.Generator().manual_seed(5)
    mu1, mu2 = (torch.randn(d, generator=g, dtype=torch.float64) * 2 for _ in range(2))
    s1, s2 = _spd(d, 6) * 2, _spd(d, 7) * 2
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy()).real
    want = float(((mu1 - mu2) ** 2).sum() + s1.trace() + s2.trace() - 2 * np.trace(covmean))
    assert want > 20
    assert C.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)


# ======================================================================== 14. FID statistics and path
class _Rows:
    """A 'detector' returning fixed float64 feature rows for the indices it is given (counts its calls)."""

    def __init__(self, F, name="rows"):
        self.F, self.dim, self.name, self.calls = F, F.shape[1], name, 0

    def __call__(self, idx):
        self.calls += 1
        return self.F[idx]


class _Counting:
    def __init__(self, det):
        self.det, self.dim, self.name, self.key, self.calls = det, det.dim, det.name, det.key, 0

    def __call__(self, u8):
        self.calls += 1
        return self.det(u8)


def _index_of(rng, seed):
    return torch.tensor([g.initial_seed() - seed for g in rng.gens])


def test_streaming_stats_equal_numpy():
    F = torch.from_numpy(np.random.default_rng(0).normal(3.0, 2.0, (101, 6)))
    for batch in (7, 16, 500):
        mu, sigma = C._feature_stats(lambda idx: idx, 101, _Rows(F), env1(), batch)
        assert np.abs(mu.numpy() - np.mean(F.numpy(), 0)).max() < 1e-10
        assert np.abs(sigma.numpy() - np.cov(F.numpy(), rowvar=False, ddof=1)).max() < 1e-10


def test_shards_cover_the_indices_in_the_same_number_of_batches_per_rank():
    for n, batch, world in ((10, 4, 2), (101, 7, 3), (5, 250, 4)):
        chunks = C._shards(n, batch, C.Env(0, world, 0, CPU, True, "fp32"))
        assert torch.equal(torch.cat(chunks), torch.arange(n)) and max(map(len, chunks)) <= batch
        assert len(chunks) % world == 0, (n, batch, world)  # rank r takes chunks r, r + world, ...


def test_standin_detector():
    det = C.load_detector(standin_path(), env1())
    assert det.name == "standin" and det.dim == 32
    u8 = torch.randint(0, 256, (5, 1, 16, 16), dtype=torch.uint8)
    f = det(u8)
    assert f.shape == (5, 32) and f.dtype == torch.float32
    assert torch.equal(f, det(u8.repeat(1, 3, 1, 1)))  # one channel repeated to three
    assert torch.equal(f, C.load_detector(standin_path(), env1())(u8))  # deterministic
    assert not torch.equal(f[0], f[1])


def test_fid_path_with_standin(tmp_path):
    env, det = env1(), C.load_detector(standin_path(), env1())
    data = image_data(n=40, seed=1)
    ref = C.reference_stats(data, det, env, str(tmp_path))
    feats = det(data.x).double().numpy()  # all at once
    assert np.abs(ref[0] - feats.mean(0)).max() < 1e-10
    assert np.abs(ref[1] - np.cov(feats, rowvar=False, ddof=1)).max() < 1e-10
    images = data.x.float() / 127.5 - 1
    self_fid = C.compute_fid(lambda rng, y: images[_index_of(rng, 0)], 40, ref, det, env, batch=7)
    assert self_fid < 1e-6
    const = C.compute_fid(lambda rng, y: torch.zeros(len(rng.gens), 3, 8, 8), 40, ref, det, env, batch=16)
    f0 = det(torch.full((1, 3, 8, 8), 128, dtype=torch.uint8)).double().numpy()[0]
    assert const == pytest.approx(((f0 - ref[0]) ** 2).sum() + np.trace(ref[1]), rel=1e-6)
    assert const > 0.5

    def noise(rng, y):
        return torch.tanh(rng.randn(len(rng.gens), 3, 8, 8))
    f7 = C.compute_fid(noise, 50, ref, det, env, batch=7, seed=11)
    f16 = C.compute_fid(noise, 50, ref, det, env, batch=16, seed=11)
    assert f7 == pytest.approx(f16, rel=1e-9, abs=1e-9)
    assert C.compute_fid(noise, 50, ref, det, env, batch=16, seed=12) != f16  # the seed matters


def test_fid_hook_in_training(tmp_path):
    """C.FidHook: one FID per labelled generator, equal to compute_fid's, one log line each; without a detector a
    single 'FID skipped' line, no FID, and training carries on (the detector is not looked up again)."""
    env, data, lines = env1(), image_data(n=40, seed=1), []
    log = type("L", (), {"info": lambda self, m: lines.append(m)})()
    images = data.x.float() / 127.5 - 1
    gens = {"copy": lambda rng, y: images[_index_of(rng, 0)],
            "zeros": lambda rng, y: torch.zeros(len(rng.gens), 3, 8, 8)}
    hook = C.FidHook(standin_path(), data, env, str(tmp_path), 40, log)
    got = hook(7, gens)
    det = C.load_detector(standin_path(), env)
    ref = C.reference_stats(data, det, env, str(tmp_path))
    assert got["copy"] < 1e-6 and got["zeros"] == C.compute_fid(gens["zeros"], 40, ref, det, env, 250)
    assert lines == [f"step 7 | FID-0.04k proxy (copy) {got['copy']:.3f}",
                     f"step 7 | FID-0.04k proxy (zeros) {got['zeros']:.3f}"]
    assert not (tmp_path / "fid_train.jsonl").exists()  # (a log without a run folder: printed only)
    run = C.Logger(str(tmp_path / "run"), env, 10, 4)  # a run's Logger: every FID also a row of fid_train.jsonl
    C.FidHook(standin_path(), data, env, str(tmp_path), 40, run)(5, gens)
    rows = [json.loads(r) for r in (tmp_path / "run" / "fid_train.jsonl").read_text().splitlines()]
    assert rows == [dict(step=5, fid=got, n=40, detector="standin")]
    C.Logger(str(tmp_path / "run"), env, 10, 4, start_step=4)  # resumed at step 4: the row of step 5 goes
    assert (tmp_path / "run" / "fid_train.jsonl").read_text() == ""
    lines.clear()  # a sample set holding NaN (black images to the detector) is not scored: said, None in the row
    half_nan = lambda rng, y: torch.where(_index_of(rng, 0)[:, None, None, None] % 2 == 0, float("nan"), images[:1])
    assert C.FidHook(standin_path(), data, env, str(tmp_path), 40, run)(8, {"nan": half_nan}) == {"nan": None}
    assert lines == [] and json.loads((tmp_path / "run" / "fid_train.jsonl").read_text())["fid"] == {"nan": None}
    C.FidHook(standin_path(), data, env, str(tmp_path), 40, log)(8, {"nan": half_nan})
    assert lines == ["step 8 | FID-0.04k proxy (nan) not scored: 20 of 40 samples hold NaN or inf"]
    lines.clear()
    off = C.FidHook(str(tmp_path / "missing.pt"), data, env, str(tmp_path), 40, log)
    assert off(1, gens) == {} and off(2, gens) == {} and lines == ["FID skipped: detector unavailable"]
    # the detector is there but its cached statistics are not usable: that is said, not taken for a missing detector
    np.savez(tmp_path / "fid_refs" / f"{data.key}-{det.key}.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(C.UserError, match="remove it to recompute"):
        C.FidHook(standin_path(), data, env, str(tmp_path), 40, log)(3, gens)


def test_fid_per_index_seeds_and_labels():
    seen = []

    def gen(rng, labels):
        seen.append((_index_of(rng, 5), labels))
        return torch.zeros(len(rng.gens), 3, 8, 8)
    det = C.load_detector(standin_path(), env1())
    ref = (np.zeros(32), np.eye(32))
    C.compute_fid(gen, 23, ref, det, env1(), batch=6, seed=5, num_classes=10)
    idx = torch.cat([s[0] for s in seen])
    assert idx.tolist() == list(range(23)) and max(len(s[0]) for s in seen) <= 6
    labels = torch.cat([s[1] for s in seen])
    want = torch.stack([torch.randint(10, (), generator=torch.Generator().manual_seed(5 + i)) for i in range(23)])
    assert torch.equal(labels, want)
    rng = C.IndexRNG([3, 4], 10, "cpu")
    z = rng.randn(2, 5)
    assert torch.equal(z[1], torch.randn(5, generator=torch.Generator().manual_seed(14)))


def test_a_sample_with_one_non_finite_value_is_counted():
    """_counted counts a sample that holds a single NaN or inf value, not only one that is NaN throughout."""
    x = torch.zeros(4, 3, 2, 2)
    x[1, 2, 0, 1], x[3, 0, 1, 1] = math.nan, math.inf
    g = C._counted(lambda rng, y: x, env1())
    g(None, None), g(None, None)
    assert int(g.bad) == 4  # two samples a call, summed over the calls


def test_samples_with_a_nan_are_never_written_or_scored(tmp_path, capsys):
    """sample and fid refuse a step count whose samples hold a NaN (weights that overflow): np.save wrote it over a
    good file, and to_uint8 turned NaN images into black ones, saved and scored as if fine."""
    bad = lambda rng, y: torch.where((_index_of(rng, 0) == 1)[:, None, None, None], math.nan,  # sample 1's NaN
                                     rng.randn(len(rng.gens), 3, 4, 4))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(32), sigma=np.eye(32))
    ck, cfg = {"config": {"data": "d"}, "step": 0}, types.SimpleNamespace(data="d")
    opts = lambda out: types.SimpleNamespace(out=str(tmp_path / out), ckpt="c.pt", steps=[1], n=3, batch=2, seed=0,
                                             ema=True, fid_ref=str(tmp_path / "ref.npz"), fid_detector=standin_path(),
                                             root=str(tmp_path))
    for cmd, shape, out in (("sample", (2,), "s.npy"), ("sample", (3, 4, 4), "s.npy"), ("fid", (3, 4, 4), "f.jsonl")):
        (tmp_path / out).write_text("good")
        gen = lambda K: (lambda rng, y: bad(rng, y)[:, :2, 0, 0] if len(shape) == 1 else bad(rng, y))
        with pytest.raises(C.UserError, match="1 of the 3 samples at 1 step hold NaN or inf values"):
            C.sample_or_fid(cmd, opts(out), env1(), cfg, ck, shape, gen, str)
        assert (tmp_path / out).read_text() == "good" and capsys.readouterr().out == ""


def test_fid_writes_its_row_into_a_new_folder(tmp_path, capsys):
    """preflight lets fid's --out name a folder that does not exist yet (it can be created): the row was then opened
    there after the whole FID, a FileNotFoundError traceback and the number lost. The row names its reference and
    precision (an FID against another --fid_ref or --data, or in bf16, was written as the same row)."""
    np.savez(tmp_path / "ref.npz", mu=np.zeros(32), sigma=np.eye(32))
    out = tmp_path / "new" / "sub" / "f.jsonl"
    opts = types.SimpleNamespace(out=str(out), ckpt="c.pt", steps=[1], n=3, batch=2, seed=0, ema=True, root="r",
                                 fid_ref=str(tmp_path / "ref.npz"), fid_detector=standin_path())
    C.sample_or_fid("fid", opts, env1(), types.SimpleNamespace(data="d"), {"config": {"data": "d"}, "step": 4},
                    (3, 4, 4), lambda K: (lambda rng, y: rng.randn(len(rng.gens), 3, 4, 4).tanh()), str)
    row = json.loads(out.read_text())
    assert (row["step"], row["steps"], row["n"]) == (4, 1, 3) and "FID-0.003k" in capsys.readouterr().out
    assert (row["precision"], row["ref"]) == ("fp32", str(tmp_path / "ref.npz"))


def test_fid_rows_of_two_checkpoints_named_alike_both_stay(tmp_path, monkeypatch):
    """fid replaces a row of the same measurement: two runs' checkpoints given as `c.pt` from their own folders into
    one --out file looked the same, so the second run's row replaced the first's (its number lost). A row names its
    checkpoint and --fid_ref by their absolute paths; the same measurement again still replaces its row."""
    np.savez(tmp_path / "ref.npz", mu=np.zeros(32), sigma=np.eye(32))
    out = tmp_path / "all.jsonl"
    for d, scale in (("a", 1.0), ("b", 0.3), ("a", 1.0)):
        (tmp_path / d).mkdir(exist_ok=True)
        monkeypatch.chdir(tmp_path / d)
        opts = types.SimpleNamespace(out=str(out), ckpt="c.pt", steps=[1], n=3, batch=2, seed=0, ema=True, root="r",
                                     fid_ref="../ref.npz", fid_detector=standin_path())
        C.sample_or_fid("fid", opts, env1(), types.SimpleNamespace(data="d"), {"config": {"data": "d"}, "step": 4},
                        (3, 4, 4), lambda K: (lambda rng, y: (scale * rng.randn(len(rng.gens), 3, 4, 4)).tanh()), str)
    rows = [json.loads(ln) for ln in out.read_text().splitlines()]
    assert [r["ckpt"] for r in rows] == [str(tmp_path / "b" / "c.pt"), str(tmp_path / "a" / "c.pt")]
    assert rows[0]["fid"] != rows[1]["fid"] and {r["ref"] for r in rows} == {str(tmp_path / "ref.npz")}


def test_reference_cache_hit_and_edm_npz(tmp_path):
    env = env1()
    det = _Counting(C.load_detector(standin_path(), env))
    data = image_data(n=30, seed=2)
    mu, sigma = C.reference_stats(data, det, env, str(tmp_path), batch=8)
    assert det.calls == 4
    path = tmp_path / "fid_refs" / f"{data.key}-{det.key}.npz"
    assert det.key.startswith("standin-")  # the file's name and its content
    z = np.load(path)
    assert set(z.files) == {"mu", "sigma", "n"} and int(z["n"]) == 30
    assert not os.path.exists(str(path) + ".tmp")
    det.calls = 0
    mu2, sigma2 = C.reference_stats(data, det, env, str(tmp_path))
    assert det.calls == 0 and np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2)
    edm = tmp_path / "edm.npz"
    np.savez(edm, mu=np.arange(32.0), sigma=np.eye(32))  # EDM's layout: mu and sigma only
    m, s = C.reference_stats(data, det, env, str(tmp_path), ref_path=str(edm))
    assert det.calls == 0 and np.array_equal(m, np.arange(32.0)) and np.array_equal(s, np.eye(32))
    np.savez(tmp_path / "wrong.npz", mu=np.zeros(2048), sigma=np.eye(3))
    with pytest.raises(C.UserError, match="mu"):
        C.reference_stats(data, det, env, str(tmp_path), ref_path=str(tmp_path / "wrong.npz"))
    with pytest.raises(C.UserError, match="missing.npz"):
        C.reference_stats(data, det, env, str(tmp_path), ref_path=str(tmp_path / "missing.npz"))
    # never unpickled, never a traceback: a text file, a pickled object array, a plain .npy, sigma of a wrong shape
    (tmp_path / "text.txt").write_text("mu sigma\n")
    np.save(tmp_path / "obj.npy", np.array([{"mu": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "plain.npy", np.zeros(32))
    np.savez(tmp_path / "sig.npz", mu=np.zeros(32), sigma=np.eye(31))
    np.savez(tmp_path / "nan.npz", mu=np.full(32, np.nan), sigma=np.eye(32))  # FID nan, written as NaN
    np.savez(tmp_path / "inf.npz", mu=np.zeros(32), sigma=np.full((32, 32), np.inf))  # eigh's LinAlgError
    np.savez(tmp_path / "str.npz", mu=np.array(["a"] * 32), sigma=np.eye(32))  # a TypeError
    for bad in ("text.txt", "obj.npy", "plain.npy", "sig.npz", "nan.npz", "inf.npz", "str.npz"):
        with pytest.raises(C.UserError, match="is not an .npz with finite float mu"):
            C.reference_stats(data, det, env, str(tmp_path), ref_path=str(tmp_path / bad))
    # a sigma that is no covariance: frechet_distance reads one triangle, and -I scored an FID of exactly 0
    upper = np.eye(32)
    upper[0, 5] = 1.0
    np.savez(tmp_path / "neg.npz", mu=np.zeros(32), sigma=-np.eye(32))
    np.savez(tmp_path / "upper.npz", mu=np.zeros(32), sigma=upper)
    for bad in ("neg.npz", "upper.npz"):
        with pytest.raises(C.UserError, match="holds a sigma that is not a covariance"):
            C.reference_stats(data, det, env, str(tmp_path), ref_path=str(tmp_path / bad))
    # a damaged cache file (or a folder in its place) names itself and the fix; it was a BadZipFile/KeyError
    cache = tmp_path / "fid_refs" / f"{data.key}-{det.key}.npz"
    cache.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(C.UserError, match="cached FID statistics .* remove it to recompute"):
        C.reference_stats(data, det, env, str(tmp_path))
    cache.unlink()
    cache.mkdir()
    with pytest.raises(C.UserError, match="cached FID statistics"):
        C.reference_stats(data, det, env, str(tmp_path))


def test_a_read_only_fid_cache_serves_its_hits(tmp_path, monkeypatch):
    """A shared, read-only --root/fid_refs: `fid` was refused before any work even when the statistics it needed were
    cached there. Only a miss writes the folder, and is refused before the features are computed."""
    env, root = env1(), tmp_path / "root"
    det = _Counting(C.load_detector(standin_path(), env))
    ref = C.reference_stats(image_data(n=30, seed=2), det, env, str(root), batch=8)

    def read_only(d, what):  # (tests run as root, whom chmod does not stop)
        if os.path.abspath(d).startswith(str(root)):
            raise C.UserError(f"{what} '{d}' cannot be written (read-only file system).")
    monkeypatch.setattr(C, "check_dir", read_only)
    (tmp_path / "c.pt").write_bytes(b"")
    C.preflight("fid", types.SimpleNamespace(ckpt=str(tmp_path / "c.pt"), out=None, fid_ref=None, root=str(root),
                                             fid_detector="inception"))
    det.calls = 0
    hit = C.reference_stats(image_data(n=30, seed=2), det, env, str(root))
    assert det.calls == 0 and np.array_equal(hit[0], ref[0]) and np.array_equal(hit[1], ref[1])
    with pytest.raises(C.UserError, match="FID statistics folder .* cannot be written"):
        C.reference_stats(image_data(n=30, seed=3), det, env, str(root))
    assert det.calls == 0 and sorted(os.listdir(root / "fid_refs")) == [f"test2-{det.key}.npz"]


def test_non_finite_detector_features_are_one_sentence(tmp_path):
    nan_det = C.Detector(lambda u8: torch.full((len(u8), 4), float("nan")), "nandet", 4)
    with pytest.raises(C.UserError, match="'nandet' gave non-finite features"):
        C.reference_stats(image_data(n=10, seed=2), nan_det, env1(), str(tmp_path))
    rows = C.Detector(lambda u8: torch.zeros(min(len(u8), 3), 4), "rows", 4)  # rows dropped at a batch of 4
    with pytest.raises(C.UserError, match=r"'rows' gave features of shape \(3, 4\) for 4 images"):
        C.reference_stats(image_data(n=8, seed=2), rows, env1(), str(tmp_path), batch=4)


class _TinyFeatures(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 5)

    def forward(self, x, return_features: bool = False):
        f = self.lin(x.float().mean(dim=(2, 3)) / 255.0)
        if return_features:
            return f
        return f.sum(1)


class _Images(nn.Module):
    def forward(self, x, return_features: bool = False):
        return x.float()


class _NoFeatures(nn.Module):  # (B, 0): an FID of exactly 0 for any samples
    def forward(self, x, return_features: bool = False):
        return x.float().flatten(1)[:, :0]


class _Complex(nn.Module):  # complex rows, which a cast to float32 silently makes real
    def forward(self, x, return_features: bool = False):
        return torch.complex(x.float().flatten(1)[:, :4], x.float().flatten(1)[:, 4:8])


class _NaN(nn.Module):  # NaN features: every FID would be NaN, found only at the first in-training evaluation
    def forward(self, x, return_features: bool = False):
        return torch.full((x.shape[0], 4), float("nan"))


class _Standardise(_TinyFeatures):  # each image standardised: NaN on a constant image (the probe's were all zero)
    def forward(self, x, return_features: bool = False):
        x = x.float().flatten(1)
        return self.lin(((x - x.mean(1, keepdim=True)) / x.std(1, keepdim=True)).reshape(len(x), 3, -1).mean(2))


class _Only32(_TinyFeatures):  # passes load_detector's 32 x 32 probe, fails on other sizes
    def forward(self, x, return_features: bool = False):
        return self.lin(x.float().reshape(len(x), 3, 1024).mean(2))


class _Only16(_TinyFeatures):  # a network for 16 x 16 images only: refused by the 32 x 32 probe, which the error names
    def forward(self, x, return_features: bool = False):
        return self.lin(x.float().reshape(len(x), 3, 256).mean(2))


class _FirstRow(_TinyFeatures):
    def forward(self, x, return_features: bool = False):
        return self.lin(x.float().mean(dim=(2, 3)))[:1]


class _RaisesOff32(_TinyFeatures):  # raises an exception of its own on sizes other than its probe's 32 x 32
    def forward(self, x, return_features: bool = False):
        if x.shape[2] != 32:
            raise ValueError("this network takes 32 x 32 images")
        return self.lin(x.float().mean(dim=(2, 3)))


def test_torchscript_detector_raising_its_own_exception_is_one_sentence(tmp_path):
    """An exception a TorchScript detector raises itself reaches Python as torch.jit.Error, not a RuntimeError: the
    FID statistics of images of another size ended in a traceback."""
    torch.jit.script(_RaisesOff32()).save(str(tmp_path / "raises.pt"))
    det = C.load_detector(str(tmp_path / "raises.pt"), env1())
    with pytest.raises(C.UserError, match=r"'raises' failed on images of shape \(3, 16, 16\) \(Error: .*ValueError: "
                                          r"this network takes 32 x 32 images\)"):
        C.reference_stats(image_data(n=4, seed=3, r=16), det, env1(), str(tmp_path))


def test_torchscript_detector_from_path(tmp_path):
    torch.manual_seed(0)
    m = _TinyFeatures()
    path = tmp_path / "feat.pt"
    torch.jit.script(m).save(str(path))
    det = C.load_detector(str(path), env1())
    assert det.name == "feat" and det.dim == 5
    u8 = torch.randint(0, 256, (4, 1, 12, 12), dtype=torch.uint8)
    with torch.no_grad():
        want = m(u8.repeat(1, 3, 1, 1), return_features=True)
    assert torch.allclose(det(u8), want, rtol=0, atol=1e-6) and det(u8).dtype == torch.float32
    data = image_data(n=12, seed=3)
    ref = C.reference_stats(data, det, env1(), str(tmp_path))
    assert ref[0].shape == (5,) and (tmp_path / "fid_refs" / f"{data.key}-{det.key}.npz").exists()
    # another network saved under the same name (a retrained detector) never reuses the first one's statistics
    torch.manual_seed(1)
    torch.jit.script(_TinyFeatures()).save(str(path))
    det2 = C.load_detector(str(path), env1())
    assert det2.name == "feat" and det2.key != det.key
    ref2 = C.reference_stats(data, det2, env1(), str(tmp_path))
    f = det2(data.x).double()
    assert not np.allclose(ref2[0], ref[0]) and np.allclose(ref2[0], f.mean(0).numpy(), atol=1e-9)
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(C.UserError, match=r"junk.pt' is not a usable TorchScript feature network \(RuntimeError while "
                                          r"loading it\)\.$"):  # (not "on its probe": it never ran)
        C.load_detector(str(tmp_path / "junk.pt"), env1())
    with pytest.raises(C.UserError, match="nothing.pt"):
        C.load_detector(str(tmp_path / "nothing.pt"), env1())
    with pytest.raises(C.UserError, match="is a folder, not a file"):
        C.load_detector(str(tmp_path), env1())
    # a network that returns images (4-D) or drops rows was a traceback in the statistics, or an FID of fewer samples
    for bad, words in ((_Images(), r"features of shape \(2, 3, 32, 32\)"), (_FirstRow(), r"shape \(1, 5\)"),
                       (_NoFeatures(), r"shape \(2, 0\), not finite real \(2, dim > 0\)"), (_Complex(), "complex64"),
                       (_NaN(), r"float32 features of shape \(2, 4\), not finite")):
        torch.jit.script(bad).save(str(tmp_path / "bad.pt"))
        with pytest.raises(C.UserError, match="not a usable TorchScript feature network .*" + words):
            C.load_detector(str(tmp_path / "bad.pt"), env1())
    torch.jit.script(_Standardise()).save(str(tmp_path / "std.pt"))  # a usable network the zero probe refused
    assert C.load_detector(str(tmp_path / "std.pt"), env1()).dim == 5
    torch.jit.script(_Only32()).save(str(tmp_path / "only32.pt"))  # (a traceback in the statistics or the hook)
    det = C.load_detector(str(tmp_path / "only32.pt"), env1())
    with pytest.raises(C.UserError, match=r"'only32' failed on images of shape \(3, 16, 16\) \(RuntimeError"):
        C.reference_stats(image_data(n=4, seed=3, r=16), det, env1(), str(tmp_path))
    torch.jit.script(_Only16()).save(str(tmp_path / "only16.pt"))
    with pytest.raises(C.UserError, match=r"feature network \(RuntimeError on its probe, 2 random uint8 images of "
                                          r"shape \(2, 3, 32, 32\)\)\.$"):
        C.load_detector(str(tmp_path / "only16.pt"), env1())


def test_detector_download_failure_is_user_error(monkeypatch, tmp_path):
    def offline(url, dst, *a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(C.UserError) as e:
        C.load_detector("inception", env1())
    msg = str(e.value)
    assert C.INCEPTION_URL in msg and str(tmp_path / "hub" / "checkpoints" / "inception-2015-12-05.pt") in msg
    # the in-training hook catches exactly this error type and logs one skip line (method files)
    assert isinstance(e.value, C.UserError)


def test_a_detector_out_of_memory_is_not_called_a_failure_on_the_image_shape():
    """Out of memory in the detector (a RuntimeError) passes through as itself (main_guard's out-of-memory sentence),
    not as 'the FID detector failed on images of shape ...'; control: another RuntimeError is that sentence."""
    def oom(u8):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(torch.OutOfMemoryError):
        C.Detector(oom, "det.pt", 8)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))

    def cublas(u8):  # cuBLAS's own allocation failing (a RuntimeError, not torch.OutOfMemoryError)
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")
    with pytest.raises(RuntimeError, match="CUBLAS_STATUS_ALLOC_FAILED") as e:
        C.Detector(cublas, "det.pt", 8)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))
    assert not isinstance(e.value, C.UserError) and C._sentence(e.value).startswith("out of memory")
    for m in ("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED",  # cuDNN 9's name (torch 2.14's)
              "CUDA error: out of memory"):
        assert C._sentence(RuntimeError(m)).startswith("out of memory"), m
    with pytest.raises(C.UserError, match="the FID detector 'det.pt' failed on images of shape"):
        C.Detector(lambda u8: u8.view(-1, 7), "det.pt", 8)(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


class _CublasOOM(_TinyFeatures):  # its probe meets cuBLAS's own allocation failing (as a TorchScript file reports it)
    def forward(self, x, return_features: bool = False):
        raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")


def test_a_detector_out_of_memory_on_its_probe_is_not_called_unusable(tmp_path):
    """load_detector's probe out of memory (the in-training hook loads the detector at its first FID step, the memory
    held by the run) passes through as itself, main_guard's out-of-memory sentence: as 'not a usable TorchScript
    feature network' it was a file's fault, and the hook of a --fallback true run skipped FID for the whole run."""
    torch.jit.script(_CublasOOM()).save(str(tmp_path / "oom.pt"))
    with pytest.raises((RuntimeError, torch.jit.Error), match="CUBLAS_STATUS_ALLOC_FAILED") as e:
        C.load_detector(str(tmp_path / "oom.pt"), env1())
    assert not isinstance(e.value, C.UserError) and C._sentence(e.value).startswith("out of memory")


# ======================================================================== 15. config parsing
@dataclasses.dataclass
class Cfg:
    mode: typing.Literal["fast", "slow"] = "fast"  # which variant to train
    iters: int = 100  # training iterations
    batch: int = 8  # global batch
    lr: float = 1e-3  # learning rate
    ema: bool = True  # keep an EMA
    flag: bool = False  # a switch
    steps: list[int] = dataclasses.field(default_factory=lambda: [1, 2])  # step counts to plot
    names: list[str] = dataclasses.field(default_factory=list)  # some names
    teacher: typing.Optional[str] = None  # teacher checkpoint
    dropout: float = 0.0  # dropout probability
    fid_n: int = 0  # samples of the FID proxy
    out: str = ""  # output folder
    seed: int = 0  # random seed

    def check(self):
        if self.lr <= 0:
            raise ValueError("--lr must be positive.")


PRESETS = {"toy": {"iters": 10},
           "cifar10": {"iters": 1000, "batch": 64, "fast": {"dropout": 0.1}, "slow": {"dropout": 0.2}}}


def _cli(*argv, presets=PRESETS):
    return C.parse_cli(Cfg, presets, "m", list(argv), sampler=("dropout",))


def test_a_data_file_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """--data rel.npy was saved as given: a resume or `fid` from another working directory did not find it."""
    import imm
    monkeypatch.chdir(tmp_path)
    np.save("rel.npy", np.zeros((8, 2), np.float32))
    want = str(tmp_path / "rel.npy")
    assert C.parse_cli(imm.Config, imm.PRESETS, "imm", ["--data", "rel.npy"])[1].data == want
    assert C.parse_cli(imm.Config, imm.PRESETS, "imm", ["fid", "--ckpt", "c.pt", "--data", "rel.npy"])[2] == \
        {"data": want}
    assert C.parse_cli(imm.Config, imm.PRESETS, "imm", ["--data", "moons"])[1].data == "moons"  # names stay names
    import rectified_flow as rf  # a teacher checkpoint and a pairs folder too
    os.mkdir("pairs")
    (tmp_path / "t.pt").write_bytes(b"")
    cfg = C.parse_cli(rf.Config, rf.PRESETS, "rectified_flow", ["--stage", "2rf", "--teacher", "t.pt", "--pairs",
                                                                  "pairs"])[1]
    assert (cfg.teacher, cfg.pairs) == (str(tmp_path / "t.pt"), str(tmp_path / "pairs"))
    # a pairs folder the run is yet to make (--stage all or pairs): its 2-RF's checkpoint recorded it as given
    for stage in ("all", "pairs"):
        cfg = C.parse_cli(rf.Config, rf.PRESETS, "rectified_flow", ["--stage", stage, "--pairs", "new"])[1]
        assert cfg.pairs == str(tmp_path / "new") and not os.path.exists("new")


def test_cli_presets_and_overrides():
    cmd, cfg, given = _cli()
    assert cmd == "train" and cfg.iters == 10 and cfg.batch == 8 and cfg.out == "runs/m-fast-toy" and given == {}
    cmd, cfg, given = _cli("train", "--preset", "cifar10", "--mode", "slow", "--lr", "2e-4", "--batch", "32")
    assert (cfg.iters, cfg.batch, cfg.dropout, cfg.lr, cfg.mode) == (1000, 32, 0.2, 2e-4, "slow")
    assert cfg.out == "runs/m-slow-cifar10" and given == {"mode": "slow", "lr": 2e-4, "batch": 32}
    assert _cli("--preset", "cifar10")[1].dropout == 0.1  # the nested part of the default mode
    assert _cli("--preset", "cifar10", "--mode", "slow", "--dropout", "0.3")[1].dropout == 0.3  # command line wins
    assert _cli("--out", "x", "--fid-n", "5")[1:] == (Cfg(iters=10, out="x", fid_n=5), {"out": "x", "fid_n": 5})
    assert _cli("--lr=0.5")[1].lr == 0.5


def test_a_mistyped_command_is_named_as_the_command():
    """`M.py sampel` said only that options look like --field value; a stray word first names the commands too."""
    with pytest.raises(C.UserError, match=r"'sampel'; .* and the command \(train, sample or fid\) comes first"):
        _cli("sampel")
    with pytest.raises(C.UserError, match=r"'foo'; options look like --field value\.$"):
        _cli("--iters", "3", "foo")
    for argv in (("sample", "foo"), ("train", "foo"), ("-lr", "3")):  # a command came first; a one-dash option
        with pytest.raises(C.UserError, match=r"'(foo|-lr)'; options look like --field value\.$"):
            _cli(*argv)


def test_cli_value_types():
    assert _cli("--flag")[1].flag is True
    for s, v in (("true", True), ("1", True), ("yes", True), ("YES", True), ("false", False), ("0", False),
                 ("no", False)):
        assert _cli("--ema", s)[1].ema is v and _cli(f"--flag={s}")[1].flag is v
    assert _cli("--flag", "--iters", "3")[1].flag is True  # a bare flag before another option
    assert _cli("--steps", "1,2,4")[1].steps == [1, 2, 4]
    assert _cli("--names", "a,b")[1].names == ["a", "b"]
    assert _cli("--iters", "1e4")[1].iters == 10_000 and isinstance(_cli("--iters", "1e4")[1].iters, int)
    assert _cli("--teacher", "none")[1].teacher is None and _cli("--teacher", "t.pt")[1].teacher == "t.pt"
    assert _cli("--mode", "slow")[1].mode == "slow"


def test_check_value_ranges_and_types():
    """A value that reaches check_value without the command line's converter (a preset, a saved config)."""
    ok = [("ema", float, 0.0, "[0, 1)"), ("ema", float, 0.999, "[0, 1)"), ("augment", float, 1.0, "[0, 1]"),
          ("seed", int, 2 ** 63 - 1, None), ("steps", list[int], [1, 100000], C.STEPS)]
    for name, typ, v, rule in ok:
        assert C.check_value(name, typ, v, rule) == v
    bad = [("ema", float, 1.0, "[0, 1)", r"--ema must be in \[0, 1\), got 1.0"),
           ("batch", int, True, ">= 1", "integer"), ("lr", float, 0.0, "> 0", "positive"),
           ("seed", int, 2 ** 63, None, "below 2"), ("steps", list[int], [1, 0], C.STEPS, r"in \[1, 100000\], got 0"),
           ("lr", float, math.inf, "> 0", "finite")]
    for name, typ, v, rule, words in bad:
        with pytest.raises(C.UserError, match=words):
            C.check_value(name, typ, v, rule)


def test_cli_errors(capsys):
    with pytest.raises(C.UserError, match="--lr"):
        _cli("--lrr", "1")
    with pytest.raises(C.UserError) as e:
        _cli("--lr", "abc")
    assert "--lr" in str(e.value) and "float" in str(e.value) and "'abc'" in str(e.value)
    for argv in (("--iters", "1.5"), ("--flag", "maybe"), ("--mode", "medium"), ("--steps", "1,x"), ("--iters",)):
        with pytest.raises(C.UserError):
            _cli(*argv)
    with pytest.raises(C.UserError, match="fast, slow"):
        _cli("--mode", "medium")
    with pytest.raises(C.UserError) as e:
        _cli("--preset", "huge")
    assert "toy" in str(e.value) and "cifar10" in str(e.value)
    with pytest.raises(C.UserError, match="itters"):
        _cli(presets={**PRESETS, "bad": {"itters": 5}})
    with pytest.raises(C.UserError, match="drop"):
        _cli(presets={**PRESETS, "bad": {"slow": {"drop": 0.1}}})
    with pytest.raises(C.UserError, match="positive"):
        _cli("--lr", "-1")
    with pytest.raises(C.UserError):
        _cli("stray")
    for v in ("1e-400", "-2.5E-999", "0.001e-400"):  # below the smallest float: said so, not "got 0.0"
        with pytest.raises(C.UserError, match=f"--lr {v} is too close to 0 for a float"):
            _cli("--lr", v)
    with pytest.raises(C.UserError, match="positive, got 0.0"):  # a zero written as one is a zero
        _cli("--lr", "0.0e5")
    with pytest.raises(C.UserError, match="--iters expects int, got '1e-400'"):
        _cli("--iters", "1e-400")
    for v in ("9007199254740993", "+9007199254740993", " 9007199254740993"):  # 2^53 + 1: exact, never via a float
        assert C._converter("seed", int)(v) == 2 ** 53 + 1, v
    assert C._converter("seed", int)("-1e4") == -10_000


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        _cli("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    for s in ("--iters", "int", "training iterations", "--lr", "float", "0.001", "learning rate",
              "--steps", "[1, 2]", "step counts to plot", "--teacher", "teacher checkpoint", "--mode", "toy",
              "cifar10"):
        assert s in out, s
    assert "MISSING" not in out

    def line(out, flag):  # an option's help, its wrapped lines joined
        m = re.search(rf"^  {flag} .*?(?=^  --|\Z)", out, re.M | re.S)
        return " ".join(m.group(0).split())
    # the defaults shown are what the run uses: the preset's (toy unless --preset names another), the parts per mode
    assert line(out, "--iters").endswith("(default 10)") and line(out, "--out").endswith("(default 'runs/m-fast-toy')")
    with pytest.raises(SystemExit):
        _cli("--preset", "cifar10", "--help")
    out = capsys.readouterr().out
    assert line(out, "--iters").endswith("(default 1000)") and line(out, "--batch").endswith("(default 64)")
    assert line(out, "--dropout").endswith("(default 0.0; 0.1 (fast), 0.2 (slow))")
    assert line(out, "--preset").startswith("--preset str one of toy, cifar10 (the defaults below are cifar10's")
    with pytest.raises(C.UserError, match="unknown preset 'huge'"):
        _cli("--preset", "huge", "--help")
    with pytest.raises(SystemExit):
        _cli("sample", "--help")
    assert line(capsys.readouterr().out, "--batch").endswith("(default 256)")  # sample/fid: their own defaults


def test_cli_sample_and_fid_options():
    cmd, o, given = _cli("sample", "--ckpt", "a.pt", "--steps", "1,4", "--n", "16", "--ema", "false",
                         "--dropout", "0.5")
    assert cmd == "sample" and o.ckpt == "a.pt" and o.steps == [1, 4] and o.n == 16 and o.ema is False
    assert o.batch == 256 and o.fid_detector == "inception" and given == {"dropout": 0.5}
    cmd, o, given = _cli("fid", "--ckpt", "a.pt", "--seed", "3", "--batch", "8")
    assert cmd == "fid" and o.n == 50_000 and o.seed == 3 and o.batch == 8 and o.steps == [1, 2] and given == {}
    assert _cli("sample", "--ckpt", "a.pt")[1].n == 64
    with pytest.raises(C.UserError, match="--ckpt"):
        _cli("fid")
    with pytest.raises(C.UserError, match="unknown option --nope"):
        _cli("sample", "--ckpt", "a.pt", "--nope", "1")
    # a Config field the sampler does not read is the checkpoint's: refused, not ignored; fid's options on sample
    with pytest.raises(C.UserError, match=r"sample takes --lr from the checkpoint .* changes only --dropout"):
        _cli("sample", "--ckpt", "a.pt", "--lr", "-1")
    for k in ("root", "fid_ref", "fid_detector"):  # (--data: tests/test_robustness.py)
        with pytest.raises(C.UserError, match=f"sample does not read --{k} "):
            _cli("sample", "--ckpt", "a.pt", f"--{k}", "x")
    assert _cli("fid", "--ckpt", "a.pt", "--root", "r")[1].root == "r"
    # a step count given twice would write one output twice; a step count past 100,000 was killed for its memory
    with pytest.raises(C.UserError, match="--steps lists 2 twice"):
        _cli("sample", "--ckpt", "a.pt", "--steps", "2,1,2")
    with pytest.raises(C.UserError, match=r"--steps must be in \[1, 100000\], got 100000000000"):
        _cli("fid", "--ckpt", "a.pt", "--steps", "1e11")
    assert _cli("fid", "--ckpt", "a.pt", "--steps", "100000,1")[1].steps == [100000, 1]


def test_sample_count_under_torchrun():
    """torchrun's parser stops at `--n` after the script (an ambiguous abbreviation of its --nnodes, --nproc_per_node,
    ...); --n_samples (and --n-samples) passes through to the script and means --n."""
    from torch.distributed.run import get_args_parser
    line = ["--nproc_per_node=2", "imm.py", "sample", "--ckpt", "a.pt"]
    with pytest.raises(SystemExit):
        with contextlib.redirect_stderr(io.StringIO()):
            get_args_parser().parse_args([*line, "--n", "16"])
    script = get_args_parser().parse_args([*line, "--n_samples", "16"]).training_script_args
    assert script == ["sample", "--ckpt", "a.pt", "--n_samples", "16"]
    assert _cli(*script)[1].n == 16 and _cli("fid", "--ckpt", "a.pt", "--n-samples", "8")[1].n == 8
    with pytest.raises(C.UserError, match="did you mean --n_samples"):
        _cli("sample", "--ckpt", "a.pt", "--n_sample", "16")


def test_an_unknown_option_gets_its_close_names_or_those_it_begins():
    """'did you mean': difflib's close names, else the names the option begins (--it is too short for difflib to find
    --iters), three at most; a name nothing resembles gets none."""
    import imm
    for given, words in (("--iter", "did you mean --iters?"), ("--it", "did you mean --iters?"),
                         ("--ev", "did you mean --eval_n, --eval_steps?"), ("--zzz", "unknown option --zzz.")):
        with pytest.raises(C.UserError) as e:
            C.parse_cli(imm.Config, imm.PRESETS, "imm", [given, "1"])
        assert str(e.value).endswith(words), (given, str(e.value))


def test_same_file_and_teacher_id(tmp_path):
    (tmp_path / "t.pt").write_text("x")
    os.symlink(tmp_path / "t.pt", tmp_path / "link.pt")
    assert C.same_file(str(tmp_path / "t.pt"), str(tmp_path / "." / "link.pt")) and C.same_file(None, None)
    assert not C.same_file(str(tmp_path / "t.pt"), str(tmp_path / "u.pt")) and not C.same_file(None, "t.pt")
    w = {"a": torch.ones(2), "s": torch.tensor(3.0)}  # (a 0-dim tensor too)
    tid = C.teacher_id(None, "ck.pt", "t.pt", w)
    assert tid == C.fingerprint(w) and C.teacher_id({"teacher_id": tid}, "ck.pt", "t.pt", w) == tid
    other = {**w, "s": torch.tensor(4.0)}
    with pytest.raises(C.UserError, match="'t.pt' holds other weights than those 'ck.pt' started from"):
        C.teacher_id({"teacher_id": tid}, "ck.pt", "t.pt", other)
    assert C.teacher_id({}, "ck.pt", "t.pt", other) == C.fingerprint(other)  # a checkpoint older than the id


def test_merge_config():
    logs = []
    cfg = C.merge_config(Cfg, dataclasses.asdict(Cfg(iters=7)), {"lr": 0.5}, log=logs.append)
    assert cfg.iters == 7 and cfg.lr == 0.5 and len(logs) == 1 and "lr" in logs[0]
    with pytest.raises(C.UserError, match="old_field"):
        C.merge_config(Cfg, {**dataclasses.asdict(Cfg()), "old_field": 1}, {})


def test_merge_config_names_a_bad_checkpoint_value_as_the_checkpoints():
    """A value the checkpoint's config holds that this file refuses is named as the checkpoint's, not as an option
    the command line did not give; a given one is named as the option."""
    with pytest.raises(C.UserError, match="^the checkpoint's mode must be one of fast, slow, got 'medium'"):
        C.merge_config(Cfg, {**dataclasses.asdict(Cfg()), "mode": "medium"}, {"lr": 0.5})
    with pytest.raises(C.UserError, match="^--iters must be non-negative, got -1"):
        C.merge_config(Cfg, dataclasses.asdict(Cfg()), {"iters": -1})


def test_main_guard(capsys):
    def bad():
        raise C.UserError("the file is missing.")
    assert guarded(capsys, bad) == "the file is missing."

    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(SystemExit) as e:
        C.main_guard(interrupted)
    assert e.value.code == 130
    assert C.main_guard(lambda: None) is None
    with pytest.raises(ZeroDivisionError):  # real bugs keep their traceback
        C.main_guard(lambda: 1 / 0)


@pytest.mark.parametrize("exc, words", [
    (RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you tried to "
                  "allocate 8000000000000 bytes."), ["out of memory", "--batch"]),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"), ["out of memory"]),
    # a CUDA library's own allocation where the caching allocator holds the rest: RuntimeErrors (were tracebacks)
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), ["out of memory"]),
    (RuntimeError("CUDA error: out of memory\nCUDA kernel errors might be asynchronously reported"), ["out of memory"]),
    (RuntimeError("Storage size calculation overflowed with sizes=[1000000000000000000, 64]"), ["out of memory"]),
    (MemoryError(), ["out of memory"]),
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), [os.strerror(errno.ENOSPC)]),  # no file named: no 'None'
    (type("InductorError", (RuntimeError,), {})("CppCompileError: C++ compile error\n\nCommand: g++ ..."),
     ["--compile failed", "C++ compile error", "without --compile"]),  # no working compiler (torch's class name)
    *[(RuntimeError(f"[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:{m}. This is typically "
                    f"caused by a remote worker crashing."), ["another process", "torchrun", "stops too"])
      for m in ("561] Connection closed by peer [127.0.0.1]:30621", "545] Read error [127.0.0.1]:17290: Connection "
                "reset by peer")],  # gloo, in a collective after another rank was interrupted, killed (SIGTERM, the
])  # OOM killer) or stopped on its own error: it was a traceback on every rank left waiting
def test_memory_and_disk_exhaustion_are_one_sentence(exc, words, capsys):
    """`sample --n 1e12` or `--eval_n 1e18` ran out of memory with a traceback; an ENOSPC without a file name read
    "while writing 'None'". Any other RuntimeError stays a traceback (a bug to report, not bad input)."""
    def boom():
        raise exc
    msg = guarded(capsys, boom, *words)
    assert "None" not in msg
    with pytest.raises(RuntimeError, match="a bug"):
        C.main_guard(lambda: (_ for _ in ()).throw(RuntimeError("a bug")))
    lowering = type("InductorError", (RuntimeError,), {})("LoweringException: AssertionError: a bug in inductor")
    with pytest.raises(RuntimeError, match="LoweringException"):  # inductor's own bug: not "this machine"
        C.main_guard(lambda: (_ for _ in ()).throw(lowering))


def test_empty_step_lists_fid_n_below_2_and_sample_fid_outputs_are_refused_before_any_work(tmp_path, capsys,
                                                                                          monkeypatch):
    """imm's command line: an empty --eval_steps or --steps, --fid_n 1 with --fid_every, fid/sample --out naming a
    folder, a --fid_ref that is not there: one sentence each, before any training or checkpoint read."""
    import imm
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.pt").write_text("not read: the refusal comes first")
    os.mkdir("d.jsonl")
    os.mkdir("d.png")
    train = lambda *a: lambda: C.parse_cli(imm.Config, imm.PRESETS, "imm", list(a))  # (refused in parse_cli: no run)
    cmd = lambda *a: lambda: imm.main(list(a))
    for fn, want in ((train("--eval_steps", ""), "--eval_steps needs at least one step count (such as 1,2)."),
                     (train("--fid_every", "5", "--fid_n", "1"), "--fid_n must be at least 2 with --fid_every, got 1."),
                     (cmd("sample", "--ckpt", "c.pt", "--steps", ""), "--steps needs at least one step count (such as "
                      "--steps 1,2)."),
                     (cmd("fid", "--ckpt", "c.pt", "--out", "d.jsonl"), "--out 'd.jsonl' is a folder; give a file "
                      "path."),
                     (cmd("sample", "--ckpt", "c.pt", "--out", "d.png"), "--out 'd.png' is a folder; give a file "
                      "path."),
                     (cmd("fid", "--ckpt", "c.pt", "--fid_ref", "no.npz"), "FID reference 'no.npz' does not exist.")):
        assert guarded(capsys, fn) == want


def test_a_checkpoint_value_of_another_type_or_a_config_it_cannot_fill_is_one_sentence():
    """Values that never come from the command line (its converter refuses them first): a checkpoint's config
    holding a mode outside the Literal, a number for a list, a word for a bool or a number for a str; a Config with
    a field the checkpoint lacks; a preset name resolve_config is called with directly (parse_cli refuses it first)."""
    base = dataclasses.asdict(Cfg())
    for k, v, want in (("mode", "medium", "the checkpoint's mode must be one of fast, slow, got 'medium'."),
                       ("steps", 3, "the checkpoint's steps must be a comma-separated list, got 3."),
                       ("flag", "yes", "the checkpoint's flag must be true or false, got 'yes'."),
                       ("out", 5, "the checkpoint's out must be a string, got 5.")):
        with pytest.raises(C.UserError) as e:
            C.merge_config(Cfg, {**base, k: v}, {})
        assert sentence(e) == want

    @dataclasses.dataclass
    class Needs:
        lr: float  # a field without a default
        iters: int = 3
    with pytest.raises(C.UserError) as e:
        C.merge_config(Needs, {"iters": 3}, {})
    assert sentence(e).startswith("checkpoint config does not fit this file's Config (") and "'lr'" in str(e.value)
    with pytest.raises(C.UserError) as e:
        C.resolve_config(Cfg, PRESETS, "huge", {})
    assert sentence(e) == "unknown preset 'huge'; choose one of toy, cifar10."


# ======================================================================== 16. checkpoints
def _log(lines=None):
    """A stand-in for the run's Logger: info() appends its line to `lines`, or drops it."""
    return type("Log", (), {"info": staticmethod(lambda m: None if lines is None else lines.append(m))})()


def _ckpt(net, step=0, **extra):
    return dict(model=net.state_dict(), ema=net.state_dict(), opt={}, step=step, config={"seed": 0},
                net=net.config, method="test", convention="x_t=(1-t)x+t*z", **extra)


def test_guard_stops_at_max_skips_in_a_row(tmp_path):
    env = C.Env(0, 1, 0, torch.device("cpu"), True, "fp32")
    g = C.Guard(env, 3, _log(), str(tmp_path / "ckpt.pt"))
    g.check_run(10, 2)  # two skips in a row of --max_skips 3: the run goes on
    with pytest.raises(C.UserError, match="^3 optimiser steps in a row had non-finite gradients"):
        g.check_run(10, 3)


def test_guard_counts_skips_in_a_row_and_in_all(tmp_path):
    """`run` (what --max_skips stops on) counts skipped steps in a row, a good step resets it; `count` counts them
    all (the log's `skipped`)."""
    env = C.Env(0, 1, 0, torch.device("cpu"), True, "fp32")
    g = C.Guard(env, 10, _log(), str(tmp_path / "ckpt.pt"))
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for ok in (False, False, True, False):
        w.grad = torch.ones(2)
        g.step(opt, ok=torch.tensor(ok))
        g.end_step(torch.tensor(0.0))
    assert (int(g.run), int(g.count)) == (1, 3) and torch.equal(w.detach(), torch.full((2,), 0.9))


@pytest.mark.parametrize("bad_step,optim,run", [(0, "adam", None), (2, "adam", None), (2, "radam", None),
                                                (0, "adam", 7), (2, "radam", 7)])
def test_guard_skip_paths_agree(tmp_path, monkeypatch, bad_step, optim, run):
    """Guard's two ways of skipping a step with a non-finite gradient (torch.where on a device flag, as on CUDA; not
    stepping, as on the CPU) leave the same weights and Adam (RAdam) state, bit for bit, also when the first step is
    the bad one and with parameters of two dtypes (put back per dtype, in runs of at most `run` elements); without
    the Guard the same NaN reaches the weights."""
    import functools
    if run:
        monkeypatch.setattr(C, "_by_dtype", functools.partial(C._by_dtype, most=run))
    env = C.Env(0, 1, 0, torch.device("cpu"), True, "fp32")
    log = _log()

    def train(guard_mode):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
        net.register_parameter("scale", nn.Parameter(torch.ones(2, dtype=torch.float64)))
        opt = (torch.optim.Adam if optim == "adam" else torch.optim.RAdam)(net.parameters(), lr=0.1, foreach=True)
        g = C.Guard(env, 10, log, str(tmp_path / "c.pt"), sync_free=guard_mode) if guard_mode is not None else None
        for k in range(5):
            net.zero_grad()
            out = net(torch.randn(8, 3, generator=torch.Generator().manual_seed(k))) * net.scale.float()
            loss = out.square().mean()
            loss.backward()
            if k == bad_step:
                net[0].weight.grad[1, 2] = float("nan")
            g.step(opt) if g is not None else opt.step()
            if g is not None:
                g.end_step(loss)
        steps = {float(s["step"]) for s in opt.state_dict()["state"].values()}
        return net.state_dict(), opt.state_dict()["state"], steps, g and int(g.count)

    (w1, s1, n1, c1), (w2, s2, n2, c2) = train(True), train(False)
    assert n1 == n2 == {4.0} and c1 == c2 == 1
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and all(torch.isfinite(v).all() for v in w1.values())
    assert all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])
    assert not all(torch.isfinite(v).all() for v in train(None)[0].values())  # control: no Guard, NaN weights


def test_guard_with_an_fp16_scaler_needs_no_host_read(tmp_path):
    """fp16 (CUDA's GradScaler, here on the CPU): Guard's device-flag path stepped through scaler.step, which reads
    found_inf on the host (`.item()`: a sync per step on a GPU). It now steps the optimiser itself after the caller's
    unscale_: the scaler adds no host read to guard.step (on the CPU, Adam reads its own step counts, which CUDA keeps
    on the device: counted without a scaler), an overflowing step is put back and halves the scale, and the weights,
    Adam state and loss scale equal the host-read path's (sync_free=False: scaler.step) bit for bit."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Reads.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    log = _log()

    def train(sync_free, precision="fp16"):
        env = C.Env(0, 1, 0, torch.device("cpu"), True, precision)
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 2))
        opt = torch.optim.Adam(net.parameters(), lr=0.1, foreach=True)
        scaler, g = C.make_scaler(env), C.Guard(env, 10, log, str(tmp_path / "c.pt"), sync_free=sync_free)
        scales, Reads.n = [], 0
        for k in range(4):
            net.zero_grad()
            loss = net(torch.randn(8, 3, generator=torch.Generator().manual_seed(k))).square().mean()
            scaler.scale(loss * (1e35 if k == 1 else 1)).backward()  # step 1 overflows
            scaler.unscale_(opt)
            with Reads():
                g.step(opt, scaler)
            scaler.update()
            g.end_step(loss)
            scales.append(scaler.get_scale())
        return net.state_dict(), opt.state_dict()["state"], scales, Reads.n, int(g.count)

    (w1, s1, sc1, n1, c1), (w2, s2, sc2, _, c2) = train(True), train(False)
    assert n1 == train(True, "fp32")[3]  # the scaler adds no host read to the device-flag path
    assert sc1 == sc2 == [65536.0, 32768.0, 32768.0, 32768.0] and c1 == c2 == 1
    assert (all(torch.equal(w1[k], w2[k]) for k in w1)
            and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i]))


def test_guard_a_non_finite_loss_right_after_a_checkpoint_withholds_it_and_the_next(tmp_path):
    """A checkpoint that is not the last waits for the next step's loss (taken at the weights it saves): a NaN there
    withholds it and the previous file stays; it is also a NaN since the previous checkpoint, so the next checkpoint
    is withheld too, and the one after it, with finite losses since, is written. Control: a finite loss writes it.
    (Diverged weights are caught by the probe first in the method files' tests: this path ran there unseen.)"""
    path, lines = str(tmp_path / "ckpt.pt"), []
    g = C.Guard(env1(), 10, _log(lines), path)
    net, nan, one = mlp(), torch.tensor(float("nan")), torch.tensor(1.0)
    saved = lambda: torch.load(path, weights_only=True)["step"]
    g.checkpoint(2, False, lambda: _ckpt(net, step=2))
    assert not os.path.exists(path)  # not before the next step's loss
    g.end_step(one)
    assert saved() == 2
    g.checkpoint(4, False, lambda: _ckpt(net, step=4))
    g.end_step(nan)
    assert saved() == 2 and lines[-1].startswith("checkpoint of step 4 withheld: the loss became NaN/inf")
    g.end_step(one)
    g.checkpoint(6, False, lambda: _ckpt(net, step=6))
    g.end_step(one)
    assert saved() == 2 and lines[-1].startswith("checkpoint of step 6 withheld") and len(lines) == 2
    g.checkpoint(8, False, lambda: _ckpt(net, step=8))
    g.end_step(one)
    assert saved() == 8 and len(lines) == 2


def test_guard_a_non_finite_loss_among_the_steps_losses_withholds_the_checkpoint(tmp_path):
    """end_step takes every loss of the step (GDD's generator's, discriminator's and R1 penalty): a NaN in any of
    them, the last as the first, withholds the checkpoint waiting for it. Control: all finite writes it."""
    nan, one, net = torch.tensor(float("nan")), torch.tensor(1.0), mlp()
    for i, losses in enumerate([(nan, one, one), (one, one, nan), (one, one, one)]):
        path = str(tmp_path / f"{i}.pt")
        g = C.Guard(env1(), 10, _log(), path)
        g.checkpoint(2, False, lambda: _ckpt(net, step=2))
        g.end_step(*losses)
        assert os.path.exists(path) == (i == 2), losses


def test_guard_max_skips_in_a_row_stop_the_run_at_a_checkpoint(tmp_path):
    """--max_skips is checked at checkpoints as well as at log lines (which may lie further apart): max_skips skipped
    steps in a row (finite losses) before a checkpoint stop the run in one sentence and nothing is written, not even
    the final checkpoint. Control: one skip fewer writes it."""
    for skips in (3, 2):
        path = str(tmp_path / f"{skips}.pt")
        g = C.Guard(env1(), 3, _log(), path)
        w, net = nn.Parameter(torch.ones(2)), mlp()
        opt = torch.optim.SGD([w], lr=0.1)
        for _ in range(skips):
            w.grad = torch.ones(2)
            g.step(opt, ok=torch.tensor(False))
            g.end_step(torch.tensor(0.0))
        if skips == 3:
            with pytest.raises(C.UserError, match="^3 optimiser steps in a row .* stopping at step 5, no checkpoint"):
                g.checkpoint(5, True, lambda: _ckpt(net, step=5))
            assert not os.path.exists(path)
        else:
            g.checkpoint(5, True, lambda: _ckpt(net, step=5))
            assert torch.load(path, weights_only=True)["step"] == 5


def test_guard_takes_a_step_whose_gradients_are_huge_but_finite(tmp_path):
    """Guard.finite asks whether every gradient is finite, not whether their norm is: gradients of 1e30 (whose 2-norm
    overflows float32) are finite, so their step is taken; one NaN or inf among them is not."""
    g = C.Guard(env1(), 10, _log(), str(tmp_path / "c.pt"))
    a, b = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(2))
    a.grad, b.grad = torch.full((3,), 1e30), torch.full((2,), -1e30)
    assert bool(g.finite([a, b]))
    for bad in (float("nan"), float("inf")):
        b.grad[0] = bad
        assert not bool(g.finite([a, b]))


def test_the_probe_bound_follows_the_datas_scale():
    """Finite but diverged: the probe refuses network outputs beyond 1e6 x the data's scale and, for 2-D points, samples
    beyond 1e3 x (a sampler that clamps, as the image samplers do, shows only the outputs); the scale is 1 for images
    and the toys and the largest |coordinate| of loaded points (at least 1), so that points in km are not 'diverged'."""
    env = C.setup("cpu", 0, "fp32")
    net = torch.nn.Linear(2, 2)
    gen = lambda net: lambda rng, y: net(torch.ones(2, 2))
    clamped = lambda net: lambda rng, y: net(torch.ones(2, 2)).clamp(-1, 1)
    points = lambda scale: C.Data("points", "p", x=torch.tensor([[scale, -0.5], [0.1, 0.2]]))
    images = C.Data("images", "i", x=torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    for big, data, ok, g in [(2e3, points(1.0), False, gen), (5e2, points(1.0), True, gen),
                             (2e5, points(1e3), True, gen), (2e6, points(1e3), False, gen),
                             (1e5, points(1.0), True, clamped), (2e6, points(1.0), False, clamped),
                             (2e8, points(1e3), True, clamped), (2e3, images, True, gen), (2e6, images, False, gen)]:
        with torch.no_grad():
            net.weight.fill_(0), net.bias.fill_(big)
        assert bool(C.sample_probe(g, (net,), env, data)()) == ok, (big, data.kind, data.scale)
    assert C.Data("points", "p", x=torch.full((3, 2), 1e-3)).scale == 1.0
    assert C.load_data("8gaussians", "data", env, 0, False).scale == 1.0


def test_the_probe_leaves_no_hook_on_the_nets():
    """sample_probe's forward hooks (which see the nets' own outputs) are removed after each probe, also when the
    sampler fails: a hook left behind would keep the output of every later forward (each training step's)."""
    env = C.setup("cpu", 0, "fp32")
    net = torch.nn.Linear(2, 2)
    data = C.Data("points", "p", x=torch.tensor([[1.0, 0.5]]))
    assert bool(C.sample_probe(lambda n: lambda rng, y: n(torch.ones(2, 2)), (net,), env, data)())
    assert not net._forward_hooks

    def failing(n):
        def g(rng, y):
            n(torch.ones(2, 2))
            raise RuntimeError("the sampler failed")
        return g
    with pytest.raises(RuntimeError, match="the sampler failed"):
        C.sample_probe(failing, (net,), env, data)()
    assert not net._forward_hooks


def test_checkpoint_atomic_and_nan_refused(tmp_path, monkeypatch):
    env, path = env1(), str(tmp_path / "run" / "ckpt.pt")
    net = mlp()
    C.save_checkpoint(path, _ckpt(net, step=1), env)
    ck = torch.load(path, map_location="cpu", weights_only=True)
    assert ck["step"] == 1 and ck["rng"]["world"] == 1 and set(C._LAYOUT) <= set(ck)
    before = open(path, "rb").read()

    def crash(src, dst):
        raise OSError("simulated crash before os.replace")
    monkeypatch.setattr(C.os, "replace", crash)
    with pytest.raises(OSError):
        C.save_checkpoint(path, _ckpt(net, step=2), env)
    monkeypatch.undo()
    assert open(path, "rb").read() == before and C.load_checkpoint(path)["step"] == 1
    os.remove(path + ".tmp")
    bad = mlp()
    with torch.no_grad():
        bad.inp.weight[0, 0] = float("nan")
    with pytest.raises(C.UserError, match="non-finite"):
        C.save_checkpoint(path, _ckpt(bad, step=3), env)
    ck = _ckpt(net, step=3)
    ck["ema"] = {k: v.clone() for k, v in ck["ema"].items()}
    ck["ema"]["out_conv.bias"][0] = float("inf")
    with pytest.raises(C.UserError):
        C.save_checkpoint(path, ck, env)
    assert open(path, "rb").read() == before and not os.path.exists(path + ".tmp")


def test_checkpoint_load_errors(tmp_path):
    with pytest.raises(C.UserError, match="nothing.pt"):
        C.load_checkpoint(str(tmp_path / "nothing.pt"))
    (tmp_path / "junk.pt").write_bytes(b"garbage")
    with pytest.raises(C.UserError, match="junk.pt"):
        C.load_checkpoint(str(tmp_path / "junk.pt"))
    torch.save({"model": {}, "step": 1}, tmp_path / "partial.pt")
    with pytest.raises(C.UserError) as e:
        C.load_checkpoint(str(tmp_path / "partial.pt"))
    assert "ema" in str(e.value) and "rng" in str(e.value)
    torch.save([1, 2], tmp_path / "list.pt")  # (was said to lack all nine keys)
    with pytest.raises(C.UserError, match="list.pt' holds a list, not a dict"):
        C.load_checkpoint(str(tmp_path / "list.pt"))
    torch.save({**_ckpt(mlp()), "rng": np.zeros(3)}, tmp_path / "numpy.pt")  # a numpy array: not weights_only-safe
    with pytest.raises(C.UserError):
        C.load_checkpoint(str(tmp_path / "numpy.pt"))
    # hand-edited files that save_checkpoint never writes: a negative step, non-finite weights (model or EMA)
    good = _ckpt(mlp(), step=2, rng=None)
    torch.save(good, tmp_path / "good.pt")
    assert C.load_checkpoint(str(tmp_path / "good.pt"))["step"] == 2
    torch.save({**good, "step": -5}, tmp_path / "neg.pt")
    with pytest.raises(C.UserError, match="step -5"):
        C.load_checkpoint(str(tmp_path / "neg.pt"))
    for key in ("model", "ema"):
        sd = {k: v.clone() for k, v in good[key].items()}
        sd["out_conv.bias"][0] = float("nan")
        torch.save({**good, key: sd}, tmp_path / f"nan_{key}.pt")
        with pytest.raises(C.UserError, match="non-finite weights"):
            C.load_checkpoint(str(tmp_path / f"nan_{key}.pt"))


def test_a_checkpoint_holding_pickled_code_is_refused_without_running_it(tmp_path):
    """load_checkpoint reads weights and plain data only (torch.load with weights_only): a checkpoint whose pickle
    calls a function (here os.mkdir) is refused in one sentence, and the call never runs."""
    class Call:
        def __reduce__(self):
            return os.mkdir, (str(tmp_path / "ran"),)
    torch.save({**_ckpt(mlp(), step=1), "rng": None, "x": Call()}, tmp_path / "ck.pt")
    with pytest.raises(C.UserError, match="ck.pt' could not be read as a checkpoint of this project"):
        C.load_checkpoint(str(tmp_path / "ck.pt"))
    assert not (tmp_path / "ran").exists()


def test_a_pipe_or_device_given_as_a_file_is_named_so(tmp_path):
    """A FIFO or a link to /dev/zero given as --ckpt (or as a run's ckpt.pt) was said not to exist."""
    os.mkfifo(tmp_path / "fifo.pt")
    os.symlink("/dev/zero", tmp_path / "zero.pt")
    for name in ("fifo.pt", "zero.pt"):
        with pytest.raises(C.UserError, match="is not a regular file"):
            C.load_checkpoint(str(tmp_path / name))
    with pytest.raises(C.UserError, match="does not exist"):
        C.load_checkpoint(str(tmp_path / "missing.pt"))


def test_checkpoint_with_more_blocks_than_weights_is_refused_at_once(tmp_path):
    """A checkpoint's network config edited to depth 10**7 (nb 10**7 for a U-Net) built ten million blocks before its
    44 weight tensors were compared (`sample --ckpt` hung): refused on reading, before any network is built."""
    good = _ckpt(mlp(), step=2, rng=None)
    torch.save({**good, "net": {**good["net"], "depth": 10 ** 7}}, tmp_path / "deep.pt")
    unet = C.net_config("tiny")
    torch.save({**good, "net": {**unet, "nb": 10 ** 7}}, tmp_path / "deep_unet.pt")
    for name in ("deep.pt", "deep_unet.pt"):
        t = time.time()
        with pytest.raises(C.UserError, match="network config of [0-9]+ blocks and [0-9]+ weight tensors"):
            C.load_checkpoint(str(tmp_path / name))
        assert time.time() - t < 10
    torch.save({**good, "net": {**good["net"], "depth": "3"}}, tmp_path / "str.pt")  # the wrong type: build_net's
    assert C.load_checkpoint(str(tmp_path / "str.pt"))["net"]["depth"] == "3"


def test_load_state_strict_prefixes_and_mismatch():
    src, dst = perturb(mlp(seed=1)), mlp(seed=2)
    sd = src.state_dict()
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        fresh = mlp(seed=2)
        C.load_state_strict(fresh, {prefix + k: v for k, v in sd.items()})
        assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), sd.values()))
    bad = {k: v for k, v in sd.items() if k != "inp.bias"}
    bad["blocks.9.conv0.weight"] = torch.zeros(1)
    bad["out_conv.weight"] = torch.zeros(3, 128)
    with pytest.raises(C.UserError) as e:
        C.load_state_strict(dst, bad)
    msg = str(e.value)
    assert "inp.bias" in msg and "blocks.9.conv0.weight" in msg and "out_conv.weight" in msg and "(3, 128)" in msg
    with pytest.raises(C.UserError):
        C.load_state_strict(tiny(), sd)


def test_weights_of_another_dtype_or_layout_are_refused(tmp_path, recwarn):
    """A checkpoint edited to hold int64 / bool / fp16 / complex / quantized weights was loaded by casting them (a
    complex one printed torch's warning before anything else), a sparse one was a traceback: each is one sentence."""
    good = _ckpt(mlp(), step=2, rng=None)
    w = good["ema"]["inp.weight"]
    for t in (w.long(), w > 0, w.half(), w.to(torch.complex64), torch.quantize_per_tensor(w, 0.1, 0, torch.qint8)):
        with pytest.raises(C.UserError, match=f"inp.weight {t.dtype} where it holds torch.float32"):
            C.load_state_strict(mlp(), {**good["ema"], "inp.weight": t})
    torch.save({**good, "ema": {**good["ema"], "inp.weight": w.to_sparse()}}, tmp_path / "sparse.pt")
    with pytest.raises(C.UserError, match="malformed \\(its ema entry\\)"):
        C.load_checkpoint(str(tmp_path / "sparse.pt"))
    assert not [x for x in recwarn if "Casting complex" in str(x.message)]


def test_optimiser_state_of_another_shape_or_non_finite_is_refused():
    """Adam's load_state_dict takes moments of any shape, NaN moments, a negative square or step: an edited checkpoint
    resumed and failed at its first step, after the run's first lines (a traceback, or 'the weights diverged')."""
    net = mlp()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 2), torch.rand(4)).square().mean().backward()
    opt.step()
    good = copy.deepcopy(opt.state_dict())
    edits = [("exp_avg", lambda t: t.reshape(-1)[:3]), ("exp_avg_sq", lambda t: t * float("nan")),
             ("step", lambda t: -t), ("exp_avg_sq", lambda t: -1 - t)]
    for k, f in edits:
        state = copy.deepcopy(good)
        state["state"][0][k] = f(state["state"][0][k])
        with pytest.raises(C.UserError, match=f"optimiser state does not fit.*{k}"):
            C.load_optimizer(torch.optim.Adam(mlp().parameters(), lr=1e-3), state)
    C.load_optimizer(torch.optim.Adam(mlp().parameters(), lr=1e-3), copy.deepcopy(good))  # the control


def test_compiled_model_saves_clean_keys(tmp_path):
    net = perturb(mlp())
    comp = torch.compile(net, backend="eager")
    x, t = torch.randn(4, 2), torch.rand(4)
    assert torch.equal(comp(x, t), net(x, t))
    assert all(k.startswith("_orig_mod.") for k in comp.state_dict())
    assert C.unwrap(comp) is net and C.maybe_compile(net, False) is net
    path = str(tmp_path / "ckpt.pt")
    C.save_checkpoint(path, _ckpt(C.unwrap(comp)), env1())
    ck = C.load_checkpoint(path)
    assert set(ck["model"]) == set(net.state_dict())
    fresh = mlp(seed=9)
    C.load_state_strict(fresh, comp.state_dict())  # prefixed keys are accepted too
    assert torch.equal(fresh(x, t), net(x, t))


class _Run:
    """Tiny U-Net + Adam + EMA + data stream + a data generator: enough state to test bitwise resume."""

    def __init__(self, seed):
        torch.manual_seed(seed)
        self.net = C.build_net(C.net_config("tiny", img_resolution=8, dropout=0.2))
        with torch.no_grad():
            self.net.out_conv.weight.normal_(0, 0.05)
        self.ema = C.EMA(self.net, halflife_kimg=0.01, rampup=0.1)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=1e-3)
        self.gen = torch.Generator().manual_seed(seed + 1)
        self.data = image_data(n=10, seed=0)

    def step(self, k, b=4):
        x, _ = self.data.batch(b, k)
        t = torch.rand(b, generator=self.gen)[:, None, None, None]
        z = torch.randn_like(x)  # global RNG, as is the dropout mask
        loss = (self.net((1 - t) * x + t * z, t.flatten()) - (z - x)).square().mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.ema.update(self.net, nimg=k * b, batch=b)

    def state(self):
        sd = {"model." + k: v for k, v in self.net.state_dict().items()}
        sd.update({"ema." + k: v for k, v in self.ema.model.state_dict().items()})
        for i, st in self.opt.state_dict()["state"].items():
            sd.update({f"opt.{i}.{k}": v for k, v in st.items()})
        return sd

    def ckpt(self, step):
        return dict(model=self.net.state_dict(), ema=self.ema.model.state_dict(), opt=self.opt.state_dict(),
                    step=step, config={"seed": 0}, net=self.net.config, method="test", convention="none")

    def resume(self, ck, env, rng=True):
        C.load_state_strict(self.net, ck["model"])
        C.load_state_strict(self.ema.model, ck["ema"])
        self.opt.load_state_dict(ck["opt"])
        if rng:
            C.restore_rng(ck, env, [self.gen])


def test_resume_is_bitwise_identical(tmp_path):
    env, path, total, cut = env1(), str(tmp_path / "ckpt.pt"), 5, 3
    a = _Run(0)
    for k in range(total):
        a.step(k)
    want = a.state()
    b = _Run(0)
    for k in range(cut):
        b.step(k)
    C.save_checkpoint(path, b.ckpt(cut), env, [b.gen])
    for control in (False, True):
        torch.manual_seed(12345)  # the resumed process starts from other weights and RNG states
        c = _Run(7)
        ck = C.load_checkpoint(path)
        c.resume(ck, env, rng=not control)
        for k in range(ck["step"], total):
            c.step(k)
        got = c.state()
        assert set(got) == set(want)
        same = all(torch.equal(got[k], want[k]) for k in want)
        assert same is not control  # identical with the RNG restored; different without (the test has teeth)


def test_restore_rng_other_world_size_reseeds(capsys):
    ck = {"rng": {"world": 2, "ranks": [None, None]}, "config": {"seed": 3}, "step": 10}
    g = torch.Generator()
    C.restore_rng(ck, env1(), [g])
    a, ga = torch.rand(3), torch.rand(3, generator=g)
    assert capsys.readouterr().out == ""  # held back until the command's first line, after its checks
    C.flush_notes(env1())
    assert "warning: checkpoint saved with 2 rank(s), running 1: RNG reseeded" in capsys.readouterr().out
    C.restore_rng(ck, env1(), [g])
    assert torch.equal(a, torch.rand(3)) and torch.equal(ga, torch.rand(3, generator=g))
    C.restore_rng({**ck, "step": 11}, env1(), [g])
    assert not torch.equal(a, torch.rand(3))


def test_restore_rng_reseeds_each_generator_on_a_stream_of_its_own(capsys):
    """At another world size the global RNG and each generator (a toy's data stream) are reseeded from (seed, rank,
    step), each on a stream of its own: the data's draws are not the noise's, nor one generator's another's."""
    ck = {"rng": {"world": 2, "ranks": [None, None]}, "config": {"seed": 3}, "step": 10}
    g1, g2 = torch.Generator(), torch.Generator()
    C.restore_rng(ck, env1(), [g1, g2])
    C.flush_notes(env1())
    assert "RNG reseeded" in capsys.readouterr().out
    a, b, c = torch.rand(8), torch.rand(8, generator=g1), torch.rand(8, generator=g2)
    assert not torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(b, c)


def test_restore_rng_from_another_kind_of_device_says_so(capsys, monkeypatch):
    """A checkpoint written on the CPU and resumed on CUDA left CUDA's generator at its seed, so the run drew step 0's
    noise again, without a word: CUDA's is now seeded from (seed, rank, step) and a warning says the run no longer
    reproduces an unstopped one (CUDA's seeding recorded here, no GPU); the other way, a warning too. Control: the
    same kind of device restores silently."""
    state = {"cpu": torch.get_rng_state(), "cuda": None, "gens": []}
    ck = {"rng": {"world": 1, "ranks": [state]}, "config": {"seed": 3}, "step": 10}
    seeds = []
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    cuda_env = C.Env(rank=0, world=1, local_rank=0, device=torch.device("cuda", 0), is_main=True, precision="fp32",
                     seed=3)
    C.restore_rng(ck, cuda_env)
    C.restore_rng({**ck, "step": 11}, cuda_env)
    assert len(seeds) == 2 and seeds[0] != seeds[1]
    C.flush_notes(env1())
    assert "written on the CPU, running on CUDA" in capsys.readouterr().out
    C.restore_rng(ck, env1())
    C.flush_notes(env1())
    assert capsys.readouterr().out == "" and len(seeds) == 2
    C.restore_rng({**ck, "rng": {"world": 1, "ranks": [{**state, "cuda": torch.zeros(16, dtype=torch.uint8)}]}},
                  env1())
    C.flush_notes(env1())
    got = capsys.readouterr().out
    assert "written on CUDA, running on CPU" in got and "the CPU's" in got and "seeded" not in got


def test_other_world_size_warning_follows_the_checks(tmp_path, capsys):
    """A resume at another world size warns that the RNG was reseeded, with the run's first line: a resume refused
    after restore_rng (IMM's batch split) prints its `error:` line alone."""
    import imm
    out = str(tmp_path / "run")
    imm.main(["--iters", "1", "--out", out, "--eval_n", "64", "--log_every", "1"])
    path = os.path.join(out, "ckpt.pt")
    ck = torch.load(path, weights_only=True)
    ck["rng"] = {"world": 2, "ranks": ck["rng"]["ranks"] * 2}  # as if saved by two ranks
    torch.save(ck, path)
    capsys.readouterr()
    msg = guarded(capsys, lambda: imm.main(["--iters", "2", "--out", out, "--accum", "3"]))  # 128 groups in 3 rounds
    assert msg.startswith("--batch 512 must split"), msg
    imm.main(["--iters", "2", "--out", out, "--eval_n", "64"])
    lines = capsys.readouterr().out.splitlines()
    warn = [i for i, m in enumerate(lines) if "running 1: RNG reseeded" in m and "no longer reproduces" in m]
    assert warn and warn[0] < 2 and lines[0].startswith("config: iters = 2")  # with the other notes, before the run


def test_out_of_memory_while_loading_optimiser_or_rng_state_is_not_called_malformed(monkeypatch):
    """load_optimizer and restore_rng turn the errors of a malformed state into one sentence; out of memory (a
    RuntimeError) passes through as itself, a CUDA library's own (cuBLAS: a plain RuntimeError) too. Controls: a
    RuntimeError is the sentence."""
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w])
    state = opt.state_dict()
    ck = {"rng": {"world": 1, "ranks": [{"cpu": torch.get_rng_state(), "cuda": None, "gens": []}]},
          "config": {"seed": 0}, "step": 1}
    for exc, want in ((torch.OutOfMemoryError("out of memory"), torch.OutOfMemoryError),
                      (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
                       RuntimeError), (RuntimeError("bad state"), C.UserError)):
        def fail(*a, exc=exc):
            raise exc
        monkeypatch.setattr(opt, "load_state_dict", fail)
        with pytest.raises(want, match="out of memory|ALLOC_FAILED|optimiser state does not fit this run's "
                                       "parameters") as e:
            C.load_optimizer(opt, state)
        assert type(e.value) is type(exc) or want is C.UserError
        monkeypatch.setattr(torch, "set_rng_state", fail)
        with pytest.raises(want, match="out of memory|ALLOC_FAILED|RNG state is malformed") as e:
            C.restore_rng(ck, env1())
        assert type(e.value) is type(exc) or want is C.UserError


# ======================================================================== 17. logger and pictures
def test_logger_jsonl_and_nan(tmp_path, capsys):
    out = str(tmp_path / "run")
    lg = C.Logger(out, env1(), total_steps=100, global_batch=32, config=Cfg(iters=100))
    assert json.load(open(os.path.join(out, "config.json"))) == dataclasses.asdict(Cfg(iters=100))
    lg.info("world size 1, global batch 32")
    vals = [lg.log(step, loss=torch.tensor(0.25), other=2.0) for step in (10, 20)]
    assert vals[-1] == {"loss": 0.25, "other": 2.0}
    recs = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    assert [r["step"] for r in recs] == [10, 20]
    for r in recs:
        assert set(r) == {"step", "kimg", "time", "img_per_s", "eta_s", "loss", "other"}
        assert r["kimg"] == r["step"] * 32 / 1000 and r["loss"] == 0.25
    assert recs[1]["img_per_s"] > 0 and recs[1]["eta_s"] > 0
    printed = capsys.readouterr().out
    assert "world size 1, global batch 32" in printed
    assert re.search(r"step 20/100 \| loss 0\.25 \| other 2 \| [\d,]+ img/s \| eta \d+m\d\ds", printed)
    with pytest.raises(C.UserError, match="step 30"):
        lg.log(30, loss=torch.tensor(float("nan")))
    with pytest.raises(C.UserError):
        lg.log(40, loss=float("inf"))


def test_logger_with_a_guard_logs_its_skips_not_its_run(tmp_path, capsys):
    """With a Guard, each log row holds `skipped` (the steps skipped since the previous row) and not the Guard's
    internal count of skips in a row (`_run`, which the Logger reads to check --max_skips), in log.jsonl or printed."""
    out = str(tmp_path / "run")
    lg = C.Logger(out, env1(), total_steps=10, global_batch=4)
    g = C.Guard(env1(), 10, lg, os.path.join(out, "ckpt.pt"))
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    for ok in (False, False):
        w.grad = torch.ones(2)
        g.step(opt, ok=torch.tensor(ok))
        g.end_step(torch.tensor(0.5))
    assert lg.log(2, loss=torch.tensor(0.5)) == {"loss": 0.5, "skipped": 2.0}
    rec = json.loads(open(os.path.join(out, "log.jsonl")).read())
    assert set(rec) == {"step", "kimg", "time", "img_per_s", "eta_s", "loss", "skipped"} and rec["skipped"] == 2
    assert "_run" not in capsys.readouterr().out


def test_a_deeply_nested_log_row_is_dropped_not_a_traceback(tmp_path):
    """A log.jsonl / metrics.jsonl row nested 100,000 deep ([[[...]]]) ended the resume in a RecursionError traceback
    (json's decoder); it is a row that cannot be read, dropped as such."""
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"step": 1}\n' + b"[" * 100000 + b"]" * 100000 + b'\n{"step": 2}\n')
    C._trim_jsonl(str(p), lambda r: r["step"] <= 2)
    assert p.read_bytes() == b'{"step": 1}\n{"step": 2}\n'


def test_a_kept_last_row_without_its_newline_is_ended(tmp_path):
    """A kill between a row and its newline: the kept row had the resumed run's first row glued onto it (two JSON
    objects on one line, the log unreadable). Control: a row with its newline is kept byte for byte."""
    p = tmp_path / "log.jsonl"
    p.write_bytes(b'{"step": 1}\n\xff\xfe torn\n{"step": 2}')
    C._trim_jsonl(str(p), lambda r: r["step"] <= 2)
    with open(p, "a") as f:
        f.write('{"step": 3}\n')
    assert p.read_bytes() == b'{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    assert [json.loads(r)["step"] for r in open(p)] == [1, 2, 3]


def test_pictures_and_arrays(tmp_path):
    g = torch.Generator().manual_seed(0)
    pts = torch.randn(200, 2, generator=g) * 0.5
    rgb = torch.randint(0, 256, (5, 8, 8, 3), generator=g, dtype=torch.uint8)
    grey = torch.randint(0, 256, (4, 8, 8, 1), generator=g, dtype=torch.uint8).numpy()
    p = tmp_path / "sub" / "panels.png"
    C.save_panels(str(p), [("data", pts), ("1 step", rgb), ("grey", grey)])
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    im = matplotlib.image.imread(str(p))
    assert im.shape[1] > 2 * im.shape[0] and im.std() > 0
    grid = C._grid(rgb.numpy())
    assert grid.shape == (2 * 10 + 2, 3 * 10 + 2, 3) and np.array_equal(grid[2:10, 2:10], rgb[0].numpy())
    for name, arr, dtype in (("pts.npy", pts.double(), np.float32), ("imgs.npy", rgb, np.uint8)):
        C.save_array(str(tmp_path / name), arr)
        back = np.load(tmp_path / name)
        assert back.dtype == dtype and np.allclose(back, np.asarray(arr, dtype=np.float64), atol=1e-6)
    for name, arr in (("pts.png", pts), ("imgs.png", rgb)):
        C.save_array(str(tmp_path / name), arr)
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(C.UserError, match=".jpg"):
        C.save_array(str(tmp_path / "x.jpg"), pts)


def test_a_failed_sample_write_keeps_the_previous_file(tmp_path, monkeypatch):
    """save_array writes whole or not at all: a full disk (or Ctrl-C) halfway through np.save or the picture truncated
    the good file of the same name to the bytes written so far."""
    def half(f, *a):  # the disk is full after 4 bytes
        with contextlib.nullcontext(f) if hasattr(f, "write") else open(f, "wb") as h:
            h.write(b"part")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(np, "save", half)
    monkeypatch.setattr(C, "save_panels", half)
    for name in ("s.npy", "s.png"):
        (tmp_path / name).write_bytes(b"good")
        with pytest.raises(OSError):
            C.save_array(str(tmp_path / name), torch.zeros(3, 2))
        assert (tmp_path / name).read_bytes() == b"good"
    assert sorted(os.listdir(tmp_path)) == ["s.npy", "s.png"]  # (no temporary file left)


# ======================================================================== runtime
def test_setup_on_one_gpu_names_its_index(monkeypatch):
    """Without torchrun, --device auto or cuda kept the bare "cuda", which torch.cuda.set_device refuses (a ValueError,
    a traceback before any work: every single-GPU command and gpu_check). The device gets its index. CUDA is
    emulated: set_device applies torch's own index check and records what it was given."""
    from torch.cuda._utils import _get_device_index
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(_get_device_index(d)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        for device in ("auto", "cuda", "cuda:0"):
            env = C.setup(device, 0, None)
            assert env.device == torch.device("cuda:0") and env.precision == "bf16" and seen.pop() == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_setup_single_process_and_precision_table(monkeypatch):
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        env = C.setup("cpu", 5, None)
        assert (env.rank, env.world, env.is_main, env.precision, env.device) == (0, 1, True, "fp32", CPU)
        assert torch.initial_seed() == 5 and not torch.backends.cuda.matmul.allow_tf32
        assert C.setup("cpu", 0, "tf32").precision == "tf32" and torch.backends.cuda.matmul.allow_tf32
        assert torch.backends.cudnn.allow_tf32
        C.setup("cpu", 0, "fp32")
        assert not torch.backends.cuda.matmul.allow_tf32
        for bad in ("fp16", "fp64"):
            with pytest.raises(C.UserError):
                C.setup("cpu", 0, bad)
        if not torch.cuda.is_available():
            with pytest.raises(C.UserError, match="CUDA"):
                C.setup("cuda", 0, None)
            assert C.setup("auto", 0, None).device == CPU
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with C.autocast(env1("fp32")):
        assert (a @ b).dtype == torch.float32
    with C.autocast(env1("bf16")):
        assert (a @ b).dtype == torch.bfloat16
    assert not C.make_scaler(env1("fp32")).is_enabled() and not C.make_scaler(env1("bf16")).is_enabled()


def test_single_process_collectives_are_identity():
    env = env1()
    net = mlp()
    assert C.distribute(net, env) is net and C.distribute(net, env, manual=True) is net
    assert torch.initial_seed() == C.derive_seed(0, "rank", 0)  # the per-rank stream after distribute
    (net(torch.randn(3, 2), torch.rand(3)).square().sum() + sum(p.sum() for p in net.parameters())).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    C.sync_grads(net, env)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, net.parameters()))
    assert C.all_mean(3.5, env).item() == 3.5 and C.all_mean(torch.tensor([1.0, 2.0]), env).tolist() == [1.0, 2.0]
    C.barrier(env)


def test_stopwatch_counts_from_its_call():
    """The run's "total ... s CPU" is its own: CPU spent before the call (imports, an earlier run in the same
    process) is not counted (it was: time.process_time() since the process started)."""
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    clock = C.stopwatch()
    wall, cpu = map(float, re.fullmatch(r"total (\S+) s wall \((\S+) s CPU\)", clock()).groups())
    assert 0 <= cpu < 0.2 and 0 <= wall < 0.2, (wall, cpu)


def test_derive_seed():
    want = int.from_bytes(hashlib.sha256(repr((0, "rank", 1)).encode()).digest()[:8], "big") % 2 ** 63
    assert C.derive_seed(0, "rank", 1) == want
    seeds = {C.derive_seed(s, p, i) for s in range(3) for p in ("rank", "data") for i in range(20)}
    assert len(seeds) == 120 and all(0 <= s < 2 ** 63 for s in seeds)


def test_a_cuda_index_beyond_the_devices_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(C.UserError) as e:
        C.check_device("cuda:1")
    assert sentence(e) == "--device cuda:1 does not exist here (1 CUDA device(s))."
    C.check_device("cuda:0")  # control


def test_torchrun_with_more_processes_than_gpus_is_one_sentence(monkeypatch, capsys):
    """Under torchrun the device is cuda:LOCAL_RANK whatever --device says; a LOCAL_RANK past the visible GPUs
    (--nproc_per_node 2 on one GPU) went to torch.cuda.set_device, whose "invalid device ordinal" was a traceback on
    that rank. Every rank of the node refuses (LOCAL_WORLD_SIZE against the GPUs), rank 0 too: rank 0 alone prints
    the error line (_speaks), and a refusal on rank 1 alone exited 2 without a word while rank 0 went on to wait in
    the rendezvous. CUDA and the process group are emulated; control: two GPUs, rank 1 gets cuda:1 and NCCL bound to
    it (device_id: else torch 2.14's dist.barrier warns "using the device under current context" on rank 0, a line
    on stderr that can precede a refusal's error line)."""
    from torch.cuda._utils import _get_device_index
    for k, v in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="localhost", MASTER_PORT="29500").items():
        monkeypatch.setenv(k, v)
    seen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: seen.append(_get_device_index(d)))
    monkeypatch.setattr(C.dist, "init_process_group", lambda backend, device_id: seen.append((backend, device_id)))
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        for rank in (1, 0):
            monkeypatch.setenv("RANK", str(rank)), monkeypatch.setenv("LOCAL_RANK", str(rank))
            with pytest.raises(C.UserError) as e:
                C.setup("cuda", 0, None)
            assert sentence(e) == ("torchrun started 2 processes on this node, which has 1 CUDA device(s) visible; "
                                   "start at most 1 process(es) per node (torchrun --nproc_per_node=1), each seeing "
                                   "them all.")
            assert seen == []  # (neither set_device nor the process group reached)
        assert guarded(capsys, lambda: C.setup("cuda", 0, None)) == str(e.value)  # rank 0 says it
        monkeypatch.setenv("RANK", "1"), monkeypatch.setenv("LOCAL_RANK", "1")
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
        env = C.setup("cuda", 0, None)
        assert (env.device, env.rank, env.world, seen) == (torch.device("cuda:1"), 1, 2,
                                                           [1, ("nccl", torch.device("cuda:1"))])
        seen.clear()
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # (torchrun's variables set by hand, LOCAL_RANK past them)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        with pytest.raises(C.UserError, match=r"^LOCAL_RANK 1 has no CUDA device here \(1 CUDA device\(s\) visible\)"):
            C.setup("cuda", 0, None)
        assert seen == []
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def test_agree_reraises_a_failure_as_it_came(monkeypatch):
    """One process: fn's exception itself. Two ranks (collectives stood in for): a bug on this rank keeps its own
    exception (traceback), a sentence on another rank becomes this rank's UserError."""
    def bug():
        raise ZeroDivisionError("a bug")
    with pytest.raises(ZeroDivisionError):
        C.agree(env1(), bug)
    with pytest.raises(C.UserError, match="^the disk is full.$"):
        C.agree(env1(), lambda: (_ for _ in ()).throw(C.UserError("the disk is full.")))
    env2 = C.Env(rank=0, world=2, local_rank=0, device=CPU, is_main=True, precision="fp32")
    monkeypatch.setattr(C, "all_mean", lambda x, env: torch.tensor(1.0))

    def gather(msgs, obj):  # the other rank's outcome: a sentence
        msgs[:] = [obj, "the disk is full."]
    monkeypatch.setattr(C.dist, "all_gather_object", gather)
    for mine, want in ((bug, ZeroDivisionError), (lambda: None, C.UserError)):
        with pytest.raises(want, match="a bug|^the disk is full.$"):
            C.agree(env2, mine)


@pytest.mark.parametrize("sync_free", [False, True])
def test_guard_step_with_no_gradient_is_no_step(tmp_path, sync_free):
    """An optimiser none of whose parameters has a gradient (a part that took no part in the loss): no step, no
    skip counted, no error (the inf-norm of nothing is one)."""
    g = C.Guard(env1(), 3, _log(), str(tmp_path / "ckpt.pt"), sync_free=sync_free)
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.1)
    g.step(opt)
    g.end_step(torch.tensor(0.0))
    assert not opt.state and torch.equal(w.detach(), torch.ones(2)) and (int(g.run), int(g.count)) == (0, 0)


# ======================================================================== toy metrics
def test_toy_metrics():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 2, generator=g) * 0.5, torch.randn(600, 2, generator=g) * 0.5
    assert C.swd(a, a) == 0 and C.mmd2(a, a) == pytest.approx(0, abs=1e-12)
    shift = torch.tensor([0.3, -0.4])  # |v| = 0.5; mean |<d, v>| over unit directions = 2|v|/pi
    assert C.swd(a, a + shift) == pytest.approx(2 * 0.5 / math.pi, rel=0.03)
    assert C.swd(a, b) < 0.06 < C.swd(a, a + shift)
    assert C.mmd2(a, b) < 0.02 < C.mmd2(a, a * 2)
    assert C.mmd2(a, b) == pytest.approx(C.mmd2(b, a), rel=1e-9)
    u, v = a[:7].double(), (b[:5] * 0.3).double()  # the V-statistic written out, every pair and bandwidth explicit
    kern = lambda x, y: sum(math.exp(-float((p - q).square().sum()) / (2 * h * h)) for p in x for q in y
                            for h in (0.02, 0.05, 0.1, 0.2, 0.5))
    direct = kern(u, u) / 49 + kern(v, v) / 25 - 2 * kern(u, v) / 35
    assert C.mmd2(u, v) == pytest.approx(direct, rel=1e-12)
    centres = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    x = centres[torch.tensor([0, 1, 2] * 100)] + 0.01 * torch.randn(300, 2, generator=g)
    assert C.modes_covered(x, centres, 0.01) == 3
    x = torch.cat([x, centres[3:].expand(10, 2)])  # 10 of 310: under 25% of a fair share (77.5)
    assert C.modes_covered(x, centres, 0.01) == 3
    for extra, covered in ((30, 4), (20, 4), (19, 3)):  # the threshold itself: 25% of the fair share, reached or not
        x = centres[torch.tensor([0, 1, 2] * 100 + [3] * extra)]  # fair share (300 + extra) / 4: 20 of 320 is 25%
        assert C.modes_covered(x, centres, 0.01) == covered, extra
    with pytest.raises(ValueError):
        C.swd(a, a[:10])
    ring = lambda r: centres[:1] + r * 0.01 * torch.tensor([[0.6, 0.8]])  # one point r std from centre 0
    assert C.in_mode(ring(2.9), centres, 0.01) == 1 and C.in_mode(ring(3.1), centres, 0.01) == 0
    far = torch.cat([centres[torch.tensor([1, 2, 3] * 10)], ring(2.9).expand(10, 2)])
    assert C.modes_covered(far, centres, 0.01) == 4
    assert C.modes_covered(torch.cat([far[:30], ring(3.1).expand(10, 2)]), centres, 0.01) == 3
    x = C.toy_sample("checkerboard", 4000, g)
    cell = 0.5 / math.sqrt(4 / 3)  # one unit square in toy_sample's units
    assert C.in_square(x) == 1.0 and C.in_square(x + torch.tensor([cell, 0.0])) == 0.0  # the empty squares
    assert C.in_square(torch.tensor([[-0.5, -0.5], [0.5, 0.5], [-0.5, 0.5], [2.5, 2.5], [-2.5, -2.5]]) * cell) == 0.4


def test_an_evaluation_replaces_only_its_own_steps_row(tmp_path):
    """EvalSheet.write replaces a metrics row of its step (a finished run started again); a row without a step (a
    note added by hand) and the other steps' rows stay."""
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "a": 1}\n{"note": "fid by hand"}\n{"step": 2, "a": 2}\n')
    C.EvalSheet(C.Data("toy", "8gaussians", x=torch.empty(0)), (2,), 16, 0, 2).write(str(tmp_path))
    rows = [json.loads(r) for r in open(p)]
    assert [r.get("step") for r in rows] == [1, None, 2] and rows[1] == {"note": "fid by hand"} and "a" not in rows[2]


def test_every_evaluation_of_a_run_scores_against_the_same_points_and_noise():
    """EvalSheet: the reference points are drawn by the run's seed, not the step, so that the metrics of its
    evaluations compare (another seed: other points); the noise streams are each the same at every evaluation and
    distinct by name (distributional's "eval labels" are not drawn from the seeds of the samples' noise)."""
    data = C.Data("toy", "8gaussians", x=torch.empty(0))
    a, b = (C.EvalSheet(data, (2,), 64, 3, step) for step in (2, 4))
    assert torch.equal(a.ref, b.ref) and not torch.equal(a.ref, C.EvalSheet(data, (2,), 64, 4, 2).ref)
    noise = a.rng("cpu").randn(64, 2)
    assert torch.equal(noise, b.rng("cpu").randn(64, 2))
    assert torch.equal(a.rng("cpu", "eval labels").randn(64, 2), b.rng("cpu", "eval labels").randn(64, 2))
    assert not torch.equal(a.rng("cpu", "eval labels").randn(64, 2), noise)


# ======================================================================== 18. DDP on CPU (torchrun, gloo)
def _ddp_worker(phase, out):
    """tests/ddp_worker.py PHASE OUT under torchrun, 2 processes on the CPU (fresh processes; a torchrun variable of an
    enclosing launch removed); fails the test on a non-zero exit, showing both streams' ends."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", worker,
                        phase, str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{phase} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"


def test_ddp_two_processes(tmp_path):
    import ddp_worker as W
    out = tmp_path / "ddp"
    out.mkdir()
    images = np.random.default_rng(0).integers(0, 256, (40, 8, 8, 3), dtype=np.uint8)
    np.save(out / "data.npy", images)
    for phase in ("train", "resume"):  # the resume runs in fresh processes
        _ddp_worker(phase, out)
    res = json.loads((out / "train.json").read_text())
    assert res["world"] == 2
    # weights and EMA equal on both ranks before training (rank 1 was skewed) and after every step
    for mode in ("ddp", "manual"):
        rows = res[mode]
        assert [r["step"] for r in rows] == [-1, 0, 1, 2, 3]
        assert all(r["params"] and r["ema"] for r in rows), rows
        assert res[f"{mode}_moved"]
    assert res["ddp_is_ddp"] == [True, True] and res["manual_is_ddp"] == [False, False]
    assert all(r["raw_grads_equal"] is False for r in res["manual"][1:])  # ranks saw different data: sync mattered
    assert all(r["grads_are_mean"] is True for r in res["manual"][1:])  # sync_grads leaves the mean over ranks
    assert res["manual_equals_ddp"] == [True, True]  # manual averaging reproduces DDP's trajectory bitwise
    # the checkpoint was written once, by rank 0, atomically, with both ranks' RNG states
    assert res["ckpt_writes"] == [["ckpt.pt.tmp"], []] and not res["tmp_left"]
    assert res["ckpt_rng_world"] == 2 and res["ckpt_rng_ranks_differ"]
    # FID shards partition range(n) evenly; the 2-process value equals the single-process one
    shards = res["shards"]
    assert sorted(shards[0] + shards[1]) == list(range(W.FID_N)) and abs(len(shards[0]) - len(shards[1])) <= W.FID_BATCH
    assert res["fid"][0] == res["fid"][1]
    assert res["sample_made"] == shards and res["sample_in_order"] == [True, True]  # `sample` shares out the same way
    assert res["sample_one"] == [[[0.0, 0.0]], [[0.0, 0.0]]]
    # work that one rank does alone, onto a full disk: both ranks stop with its sentence (a failing rank 1's too)
    fails = res["one_rank_failures"]
    assert fails[0] == fails[1] and sorted(fails[0]) == ["distributional", "flow_map", "imm", "log", "pairs",
                                                         "rectified_flow", "scm"], fails
    assert all(v and v.startswith(os.strerror(errno.ENOSPC)) for v in fails[0].values()), fails
    e1 = env1()
    data = C.load_data(str(out / "data.npy"), str(out), e1, 0, True)
    det = C.load_detector(standin_path(), e1)
    ref = C.reference_stats(data, det, e1, str(tmp_path / "single"))
    cached = np.load(out / "fid_refs" / f"{data.key}-{det.key}.npz")
    assert np.abs(cached["mu"] - ref[0]).max() < 1e-12 and np.abs(cached["sigma"] - ref[1]).max() < 1e-12
    single = C.compute_fid(W.fid_generate(), W.FID_N, ref, det, e1, W.FID_BATCH, seed=W.FID_SEED)
    assert single > 0.1 and abs(res["fid"][0] - single) <= 1e-9 * max(1.0, single)
    # 2-process resume from the checkpoint plus one step equals the uninterrupted run, bitwise on each rank
    rs = json.loads((out / "resume.json").read_text())
    assert rs["start"] == W.CKPT_STEP and rs["n_compared"] > 100 and rs["mismatch"] == [[], []], rs


def test_the_other_ranks_wait_out_rank_0s_downloads(tmp_path):
    """Rank 0 downloads CIFAR-10, Inception and GDD's backbones while the other ranks wait: on common.wait_for_main's
    gloo group (2 hours), not at a barrier of the default group, whose timeout (NCCL's watchdog: 10 minutes) a slow
    link's download outlasts, killing the run. The worker's default group times out in 2 s and the stand-in downloads
    take 3 s: both ranks get the data and the detector; the control, a barrier of that group, times out in ~2 s."""
    import ddp_worker as W
    _ddp_worker("waits", tmp_path)
    res = [json.loads((tmp_path / f"waits{k}.json").read_text()) for k in (0, 1)]
    assert all(x["images"] == [4, 8, 8, 3] and x["detector"] == 32 for x in res), res
    assert [x["backbone"] for x in res] == [True, True]  # common.rank0_first: rank 0, then the others
    assert "Timed out" in res[1]["control"] and res[1]["control_s"] < W.WAIT_S, res[1]
