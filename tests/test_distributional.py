"""Tests of distributional.py (GDD / GDD-I): its invariants (numbered in the
test names), the toy convergence with the step-0 generator as the must-fail control, and the `tiny` CLI smoke
(train with each image discriminator, sample, fid, resume, bad input).

Every teacher is built here: small checkpoints written directly in rectified_flow.py's format (perturbed random
networks, so that v is not zero), and for the toy convergence a 1-RF trained by the file's own in-file teacher
(distributional.train_teacher) in a module-scoped fixture. Nothing depends on runs/. One intra-op thread throughout
(a shared 2-core machine).
"""
import functools
import json
import re
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import distributional as D
from cli import assert_ok, guarded, refusal, refused, run, sentence, sha
from standin import standin_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "distributional.py")
CPU = torch.device("cpu")
F64 = torch.float64
RF = "x_t=(1-t)x+t*z, v=z-x, t=1 noise"


def env1(precision="fp32"):
    return C.Env(rank=0, world=1, local_rank=0, device=CPU, is_main=True, precision=precision, seed=0)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


class Log:
    def __init__(self):
        self.lines = []

    def info(self, m):
        self.lines.append(m)


def perturb(net, scale=0.1, seed=0):
    g = gen(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g).to(p.dtype))
    return net


def mlp_dict(**kw):
    return C.net_config("mlp", time_scale=1000.0, **kw)


def tiny_dict(res=8, **kw):
    return C.net_config("tiny", img_resolution=res, time_scale=1000.0, **kw)


def rf_ckpt(path, nd, method="rectified_flow", convention=RF, **cfg):
    """A teacher checkpoint in rectified_flow.py's format; `model` and `ema` differ so that the EMA is what is used."""
    torch.manual_seed(0)
    ema = perturb(C.build_net(nd), 0.1, 1)
    model = perturb(C.build_net(nd), 0.1, 2)
    config = {**dict(stage="1rf", t_eps=0.0, t_dist="ushape", data="8gaussians", net="mlp", cond=False), **cfg}
    C.save_checkpoint(str(path), dict(model=model.state_dict(), ema=ema.state_dict(), opt={}, step=7, config=config,
                                      net=nd, method=method, convention=convention), env1())
    return str(path), ema


def toy_cfg(**kw):
    return D.Config(**{**{k: v for k, v in D.PRESETS["toy"].items()}, **kw})


# ============================================================================== 1-3: generator and teacher
class Stub(nn.Module):
    """v(x, t) = A x + b, recording the time input."""

    def __init__(self, A, b):
        super().__init__()
        self.A, self.b, self.ts = A, b, []

    def forward(self, x, t, y=None):
        self.ts.append(t)
        return x @ self.A.T + self.b


def test_01_generator_formula_and_optimum():
    g = gen(0)
    A, b = torch.randn(3, 3, generator=g, dtype=F64), torch.randn(3, generator=g, dtype=F64)
    z = torch.randn(50, 3, generator=g, dtype=F64)
    stub = Stub(A, b)
    out = D.G(stub, z, 1.0)
    assert torch.allclose(out, z @ (torch.eye(3, dtype=F64) - A).T - b, atol=1e-12, rtol=0)
    assert torch.all(stub.ts[0] == 1.0) and stub.ts[0].shape == (50,)
    m = torch.randn(3, generator=g, dtype=F64)  # the exact 1-RF optimum at t = 1: v(z, 1) = z - m
    assert torch.allclose(D.G(Stub(torch.eye(3, dtype=F64), -m), z, 1.0), m.expand(50, 3), atol=1e-12, rtol=0)


def test_02_step0_generator_is_the_teacher(tmp_path):
    """Both the raw weights and the EMA of a fresh run equal the teacher's EMA (not its raw weights); G(z) equals the
    teacher's z - v(z, t_g) and its 1-step Euler sample bit for bit; t_g in every entry; deterministic."""
    import rectified_flow as R
    tpath, tema = rf_ckpt(tmp_path / "t.pt", mlp_dict())
    D.main(["--teacher", tpath, "--iters", "0", "--out", str(tmp_path / "g"), "--eval_n", "200"])
    ck = torch.load(tmp_path / "g" / "ckpt.pt", weights_only=True)
    tsd, traw = tema.state_dict(), torch.load(tpath, weights_only=True)["model"]
    assert ck["step"] == 0 and ck["t_g"] == 1.0 and ck["method"] == "distributional"
    assert ck["teacher"] == dict(path=tpath, step=7, method="rectified_flow", convention=RF)
    for k in tsd:
        assert torch.equal(ck["model"][k], tsd[k]) and torch.equal(ck["ema"][k], tsd[k]), k
    assert any(not torch.equal(traw[k], tsd[k]) for k in tsd)  # the test can tell EMA from raw
    g = C.build_net(ck["net"])
    g.load_state_dict(ck["ema"])
    teacher, _ = R.load_teacher(tpath, env1())
    z = torch.randn(64, 2, generator=gen(3))
    x = D.G(g, z, 1.0)
    assert x.shape == z.shape and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert torch.equal(x, z - teacher(z, torch.ones(64)))
    assert torch.equal(x, R.solve(lambda a, t: teacher(a, t), z, R.time_grid(1, "uniform"), "euler"))
    assert torch.equal(x, D.G(g, z, 1.0))  # deterministic
    spy = Stub(torch.eye(2), torch.zeros(2))
    D.G(spy, z, 1 - 1e-5)
    assert torch.all(spy.ts[0] == torch.tensor(1 - 1e-5, dtype=torch.float32))
    # images: a tiny U-Net teacher keeps the data shape
    tnet = perturb(C.build_net(tiny_dict()), 0.05)
    zi = torch.randn(3, 3, 8, 8, generator=gen(1))
    assert torch.equal(D.G(D.make_generator(tnet), zi, 1.0), zi - tnet(zi, torch.ones(3)))


def test_03_t_g_and_teacher_checks(tmp_path):
    log = Log()
    p, _ = rf_ckpt(tmp_path / "a.pt", mlp_dict())
    assert D.load_teacher(p, toy_cfg(), None, log)[2] == 1.0
    p, _ = rf_ckpt(tmp_path / "b.pt", mlp_dict(), stage="2rf")  # overrides below via a rewritten config
    ck = torch.load(p, weights_only=True)
    ck["config"]["t_eps"] = 1e-5
    torch.save(ck, p)
    net, _, t_g = D.load_teacher(p, toy_cfg(), None, log)
    assert t_g == 1 - 1e-5 and any("ablation" in m for m in log.lines)
    assert net.config["dropout"] == 0.0

    def fails(path, *words, cfg=None):
        with pytest.raises(C.UserError) as e:
            D.load_teacher(path, cfg or toy_cfg(), None, Log())
        for w in words:
            assert w in str(e.value), str(e.value)

    ck["config"]["t_eps"] = 0.02  # t_g = 0.98 < 0.99
    torch.save(ck, p)
    fails(p, "0.98")
    fails(rf_ckpt(tmp_path / "c.pt", mlp_dict(), convention="x_t=(1-t)x+t*z")[0], "convention")
    fails(rf_ckpt(tmp_path / "d.pt", mlp_dict(), method="imm")[0], "imm")
    fails(rf_ckpt(tmp_path / "e.pt", mlp_dict())[0], "map_label", cfg=toy_cfg(cond=True))
    fails(rf_ckpt(tmp_path / "f.pt", tiny_dict(label_dim=10))[0], "map_label")  # the reverse
    ck = torch.load(rf_ckpt(tmp_path / "g.pt", mlp_dict(), stage="2rf")[0], weights_only=True)
    ck["config"]["t_dist"] = "logit_normal"
    torch.save(ck, tmp_path / "g.pt")
    log = Log()
    D.load_teacher(str(tmp_path / "g.pt"), toy_cfg(), None, log)
    assert sum("warning" in m and "logit_normal" in m for m in log.lines) == 1
    log = Log()
    D.load_teacher(str(tmp_path / "a.pt"), toy_cfg(), None, log)
    assert log.lines == []  # a uniform-t 1-RF: no warning, no note
    ck = torch.load(tmp_path / "a.pt", weights_only=True)
    ck["ema"]["out_conv.bias"] = torch.zeros(3)  # a wrong shape: strict load names the key
    torch.save(ck, tmp_path / "h.pt")
    fails(str(tmp_path / "h.pt"), "out_conv.bias")


# ============================================================================== 4-5: GDD-I freezing
def test_04_freeze_predicate_on_the_cifar10_net():
    """GDD's rule (training/training_loop.py: 'block', 'up', 'down' or 'in' and 'conv' or 'proj' in the name) on
    DDPM++ and NCSN++: the 3x3 convolutions and attention projections of the residual, middle and resampling blocks;
    nothing else (norms, affines, skips, qkv, embeddings, stem, output)."""
    for arch in ("ddpmpp", "ncsnpp"):
        with torch.device("meta"):
            net = C.build_net(C.net_config(arch, time_scale=1000.0))
        mods = dict(net.named_modules())
        total = sum(p.numel() for p in net.parameters())
        fro = {n for n, _ in net.named_parameters() if D.frozen(n)}
        blocks = {n for n, _ in net.named_parameters() if n.split(".")[-2] in ("conv0", "conv1", "proj")}
        assert fro == blocks, arch
        assert any("_down." in n for n in fro) and any("_up." in n for n in fro)  # the resampling blocks too
        for n in fro:
            k = mods[n.rsplit(".", 1)[0]].kernel_size
            assert (n.split(".")[-2] == "proj" and k == (1, 1)) or (n.split(".")[-2] != "proj" and k == (3, 3)), n
        for n, _ in net.named_parameters():
            if any(s in n for s in ("norm", "affine", "map_", "skip", "qkv", "out_", "32x32_conv", "aux_")):
                assert n not in fro, n
        f = sum(p.numel() for n, p in net.named_parameters() if n in fro)
        assert f == 47_597_568 and abs(f / total - (0.8540 if arch == "ddpmpp" else 0.8440)) < 1e-4, arch
    # the rule read as loss.py alone ('block' or 'in') would leave the resampling blocks' 4.7M weights training
    with torch.device("meta"):
        net = C.build_net(C.net_config("ddpmpp", time_scale=1000.0))
    loss_only = sum(p.numel() for n, p in net.named_parameters()
                    if ("block" in n or "in" in n) and ("conv" in n or "proj" in n))
    assert loss_only == 42_876_928
    for name, want in (("tiny", 0.786), ("small", 0.846), ("mlp", 0.563)):
        with torch.device("meta"):
            n2 = C.build_net(C.net_config(name, time_scale=1000.0))
        frac = sum(p.numel() for k, p in n2.named_parameters() if D.frozen(k)) / sum(p.numel() for p in n2.parameters())
        assert abs(frac - want) < 1e-3, (name, frac)


def test_04b_freeze_set_matches_gdds_code():
    """GDD-I's frozen set as Zyriix/GDD's own optimiser set-up decides it (tests/golden/make_gdd_freeze_golden.py ran
    training_loop.py's block on GDDPrecond with train.py's ddpmpp/ncsnpp settings): the same names, counts and
    totals as distributional.frozen on this project's network of the same layout."""
    with open(os.path.join(os.path.dirname(__file__), "golden", "gdd_freeze.json")) as f:
        gold = json.load(f)
    assert gold["commit"] == "e9267e8afde48af83249bab05c245fb917340dfa"
    for arch, g in gold["archs"].items():
        with torch.device("meta"):
            net = C.build_net(C.net_config(arch, time_scale=1000.0))
        ours = sorted(n for n, _ in net.named_parameters() if D.frozen(n))
        assert ours == g["frozen"], arch
        assert sum(p.numel() for n, p in net.named_parameters() if n in set(ours)) == g["frozen_numel"], arch
        assert sum(p.numel() for p in net.parameters()) == g["total_numel"], arch


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gdd_imgs")
    np.save(root / "imgs.npy", np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
    return root


def test_05_freezing_holds_over_steps(imgs, tmp_path):
    out = tmp_path / "gi"
    D.main(["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--out", str(out), "--freeze", "gdd_i",
            "--iters", "3",
            "--ema_halflife_img", "1000", "--ema_rampup", "none", "--root", str(tmp_path), "--ckpt_every", "3"])
    ck = torch.load(out / "ckpt.pt", weights_only=True)
    t = torch.load(out / "teacher.pt", weights_only=True)["ema"]
    fro = [k for k in ck["model"] if D.frozen(k)]
    trn = [k for k, _ in C.build_net(ck["net"]).named_parameters() if not D.frozen(k)]
    assert fro and trn
    for k in fro:
        assert torch.equal(ck["model"][k], t[k]) and torch.equal(ck["ema"][k], t[k]), k
    assert any(not torch.equal(ck["model"][k], t[k]) for k in trn)
    assert any(not torch.equal(ck["ema"][k], t[k]) for k in trn)
    groups = ck["opt"]["g"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == len(trn) and len(ck["opt"]["g"]["state"]) == len(trn)
    g = D.make_generator(C.build_net(ck["net"]), "gdd_i")
    assert all(p.requires_grad == (not D.frozen(n)) for n, p in g.named_parameters())
    # the EMA update skips frozen tensors even when the (EMA) copy and the weights differ there
    ema = C.EMA(g, decay=0.5)
    with torch.no_grad():
        for n, p in ema.model.named_parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in ema.model.named_parameters()}
    ema.update(g, 0, 8)
    for n, p in ema.model.named_parameters():
        assert torch.equal(p, before[n]) == D.frozen(n), n


# ============================================================================== 6-8: losses, R1 scale
def test_06_loss_values_gradients_and_signs():
    z = torch.zeros(4, 3)
    assert abs(D.d_loss(z, z).item() - 2 * math.log(2)) < 1e-6 and abs(D.g_loss(z).item() - math.log(2)) < 1e-6
    assert D.d_loss(z, z, "hinge").item() == 2.0 and D.g_loss(z, "hinge").item() == 0.0
    B, K = 5, 4
    fr, ff = torch.randn(B, K, generator=gen(0), dtype=F64), torch.randn(B, K, generator=gen(1), dtype=F64)
    fr.requires_grad_(True), ff.requires_grad_(True)
    gr, = torch.autograd.grad(D.g_loss(ff.double()), ff)
    # the losses cast logits to fp32: compare at fp32 accuracy
    assert torch.allclose(gr.double(), -torch.sigmoid(-ff) / (B * K), atol=1e-7) and (gr < 0).all()
    a, b = torch.autograd.grad(D.d_loss(fr, ff), (fr, ff))
    assert torch.allclose(a.double(), -torch.sigmoid(-fr) / (B * K), atol=1e-7)
    assert torch.allclose(b.double(), torch.sigmoid(ff) / (B * K), atol=1e-7)
    for kind in ("ns", "hinge"):
        assert D.d_loss(fr, ff, kind) >= 0 and (kind == "hinge" or D.g_loss(ff, kind) >= 0)
        L = D.d_loss(fr, ff, kind)
        assert D.d_loss(fr + 1, ff, kind) < L and D.d_loss(fr, ff - 1, kind) < L


def test_07_batch_mean_reduction():
    torch.manual_seed(0)
    Dn = D.MlpD()
    x, fake = torch.randn(6, 2, generator=gen(0)), torch.randn(6, 2, generator=gen(1))
    x2, f2 = torch.cat([x, x]), torch.cat([fake, fake])

    def terms(a, f):
        Dn.zero_grad()
        L = D.d_loss(Dn(a), Dn(f)) + D.g_loss(Dn(f)) + D.r1_penalty(Dn, a, None, 0.3)
        L.backward()
        return L.detach(), [p.grad.clone() for p in Dn.parameters()]

    L1, g1 = terms(x, fake)
    L2, g2 = terms(x2, f2)
    assert abs(L1 - L2) < 1e-6 and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g1, g2))
    # logits averaged, not summed: K copies of the same logit give the same loss as one
    f = torch.randn(4, 1, generator=gen(2))
    assert torch.allclose(D.g_loss(f.repeat(1, 7)), D.g_loss(f))
    assert torch.allclose(D.d_loss(f.repeat(1, 7), f), D.d_loss(f, f))


def test_08_gamma_conversion():
    """gamma_from_gdd: GDD's R1 gamma in the batch-mean convention, gamma_GDD K^2 / B_gpu. Checked on a tiny D with
    two logit groups against GDD's objective written out as its code computes it (training/loss.py GDDLoss with its
    D's list of per-image, per-backbone rows): values, and every D parameter gradient, are B_gpu times ours."""
    assert abs(D.gamma_from_gdd(1e-4, 548, 64) - 0.469225) < 1e-12
    assert abs(D.gamma_from_gdd(1e-4, 484, 64) - 0.366025) < 1e-12
    assert abs(D.gamma_from_gdd(1e-4, 548, 256) - 0.469225 / 4) < 1e-12
    assert D.R1_DEFAULT == dict(mlp=0.1, scratch=0.01, teacher=0.013) and D.R1_GAMMA_GDD == 1e-4

    class TwoGroups(nn.Module):  # backbone a: 3 logits, backbone b: 2 logits, with BatchNorm coupling the batch
        logit_groups = [3, 2]

        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = nn.Linear(4, 3), nn.Linear(4, 2), nn.BatchNorm1d(4)

        def forward(self, x, y=None, amp=None):
            h = torch.tanh(self.bn(x.flatten(1)))
            return torch.cat([self.a(h), self.b(h * h)], 1)

    torch.manual_seed(0)
    Dn, Bg, gamma = TwoGroups(), 5, 0.3  # fp32: r1_penalty works in fp32
    real, fake = torch.randn(Bg, 1, 2, 2, generator=gen(1)), torch.randn(Bg, 1, 2, 2, generator=gen(2))
    K = sum(Dn.logit_groups)

    def gdd_rows(out):  # GDD's D returns a list: B rows of backbone a, then B rows of backbone b
        return list(out[:, :3]) + list(out[:, 3:])

    def gdd_objective():  # D step + R1 step (gain 1) as GDD writes them, on one GPU of Bg images
        L = sum(F.softplus(r).mean() for r in gdd_rows(Dn(fake))) + \
            sum(F.softplus(-r).mean() for r in gdd_rows(Dn(real)))
        xr = real.clone().requires_grad_(True)
        s = sum(r.sum() for r in gdd_rows(Dn(xr)))
        g, = torch.autograd.grad(s, xr, create_graph=True)
        return L, (g.square().sum((1, 2, 3)) * gamma / 2).mean()

    def ours():
        L = D.d_loss(Dn(real), Dn(fake), "ns", Dn.logit_groups)
        return L, D.r1_penalty(Dn, real, None, D.gamma_from_gdd(gamma, K, Bg))

    vals, grads = [], []
    for f, scale in ((gdd_objective, 1.0), (ours, float(Bg))):
        for i in range(2):  # the D-step loss, then R1
            Dn.zero_grad()
            v = f()[i] * scale
            v.backward()
            vals.append(v.item())
            grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in Dn.parameters()])
    for i in range(2):
        assert abs(vals[i] - vals[2 + i]) < 1e-5 * max(1, abs(vals[i])), (i, vals)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads[i], grads[2 + i]))
        assert max(g.abs().max() for g in grads[i]) > 1e-3  # not trivially zero
    # the per-backbone reduction matters: one mean over all K logits is not GDD's loss over B_gpu
    assert abs(D.d_loss(Dn(real), Dn(fake)).item() * Bg - vals[0]) > 1e-3


# ============================================================================== 9: gradient routing
def _img_setup(freeze="none"):
    torch.manual_seed(0)
    teacher = perturb(C.build_net(tiny_dict()), 0.05).eval().requires_grad_(False)
    g = D.make_generator(teacher, freeze)
    Dn = D.TeacherD(teacher, 0.1)
    d_params = [p for p in Dn.parameters() if p.requires_grad]
    opt_g = torch.optim.Adam([p for p in g.parameters() if p.requires_grad], lr=1e-3, betas=(0.0, 0.99))
    opt_d = torch.optim.Adam(d_params, lr=1e-3, betas=(0.0, 0.99))
    x = torch.rand(4, 3, 8, 8, generator=gen(5)) * 2 - 1
    return teacher, g, Dn, d_params, opt_g, opt_d, x


def snap(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_09_routing_between_G_and_D():
    amp = lambda: C.autocast(env1())
    teacher, g, Dn, d_params, opt_g, opt_d, x = _img_setup()
    frozen_d = [p for p in Dn.parameters() if not p.requires_grad]
    d0, g0 = snap(Dn), snap(g)
    D.g_step(g, Dn, d_params, [p for p in g.parameters()], opt_g, x, None, 1.0, "ns", env1(), amp)
    d1 = snap(Dn)
    sn = lambda k: k.endswith(("_u", "_v"))  # spectral-norm power-iteration vectors (no gradient, updated per forward)
    assert all(torch.equal(d0[k], d1[k]) for k in d0 if not sn(k))
    assert len(opt_d.state) == 0 and all(p.grad is None for p in Dn.parameters())
    assert all(p.requires_grad for p in d_params) and not any(p.requires_grad for p in frozen_d)
    assert any(not torch.equal(g0[k], v) for k, v in g.state_dict().items())
    for p in g.parameters():
        p.grad = None
    g1 = snap(g)
    seen = []
    fwd = Dn.forward
    Dn.forward = lambda a, y=None, amp=None: (seen.append((a is x, a.requires_grad)), fwd(a, y, amp))[1]
    D.d_step(g, Dn, d_params, opt_d, x, None, 1.0, "ns", env1(), amp)
    D.r1_step(Dn, d_params, opt_d, x, None, 0.1, 16, env1())
    Dn.forward = fwd
    # fakes, then the real batch, as GDD's training/loss.py (each training-mode pass advances the spectral-norm power
    # iteration and BatchNorm statistics); neither with a graph into G
    assert seen[:2] == [(False, False), (True, False)]
    assert all(torch.equal(g1[k], v) for k, v in g.state_dict().items())
    assert all(p.grad is None for p in g.parameters())
    assert any(not torch.equal(d1[k], v) for k, v in Dn.state_dict().items() if "heads" in k and not sn(k))


def test_09_labels_reach_G_and_D_in_both_steps():
    """Class-conditional GDD: G(z, y) and D(., y) get the real batch's labels in the G step and the D step (fake
    labels = the real batch's)."""
    seen = []

    class Gen(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.full((2,), 0.5))

        def forward(self, x, t, y=None):
            seen.append(("G", y))
            return x * self.w

    class Disc(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.ones(2))

        def forward(self, x, y=None, amp=None):
            seen.append(("D", y))
            return (x * self.w).sum(1, keepdim=True)
    g, d, x, y = Gen(), Disc(), torch.randn(4, 2), torch.tensor([0, 1, 2, 1])
    amp = lambda: C.autocast(env1())
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3)
    D.g_step(g, d, list(d.parameters()), list(g.parameters()), opt(g), x, y, 1.0, "ns", env1(), amp)
    D.d_step(g, d, list(d.parameters()), opt(d), x, y, 1.0, "ns", env1(), amp)
    assert [k for k, _ in seen] == ["G", "D", "G", "D", "D"] and all(v is y for _, v in seen)


# ============================================================================== 10: R1
class LinD(nn.Module):
    def __init__(self, w, b):
        super().__init__()
        self.w, self.b = nn.Parameter(w), nn.Parameter(b)

    def forward(self, x, y=None, amp=None):
        return (x.flatten(1) @ self.w)[:, None] + self.b[None]


class QuadD(nn.Module):
    def __init__(self, A):
        super().__init__()
        self.A = nn.Parameter(A)

    def forward(self, x, y=None, amp=None):
        return (0.5 * ((x @ self.A) * x).sum(1))[:, None]


def test_10_r1_closed_forms_and_properties():
    g = gen(0)
    w, b = torch.randn(6, generator=g), torch.randn(5, generator=g)
    x = torch.randn(7, 6, generator=g)
    assert abs(D.r1_penalty(LinD(w, b), x, None, 0.3).item() - 0.15 * w.square().sum().item()) < 1e-6
    S = torch.randn(6, 6, generator=g)
    A = S + S.T
    want = 0.15 * (x @ A).square().sum(1).mean()
    assert abs(D.r1_penalty(QuadD(A), x, None, 0.3).item() - want.item()) < 1e-6 * max(1, want.item())
    const = LinD(torch.zeros(6), b)
    const.forward = lambda a, y=None, amp=None: const.b[None].expand(len(a), -1)
    assert D.r1_penalty(const, x, None, 0.3).item() == 0.0
    torch.manual_seed(0)
    for _ in range(3):
        assert D.r1_penalty(D.MlpD(), torch.randn(8, 2), None, 1.0).item() >= 0
    # DiffAugment on: the gradient is taken with respect to the raw real tensor, augmentation inside D
    torch.manual_seed(1)
    sd = D.ScratchD(3, 8, policy="color,translation,cutout")
    xi = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    with torch.random.fork_rng():
        torch.manual_seed(5)
        r1 = D.r1_penalty(sd, xi, None, 2.0)
    with torch.random.fork_rng():
        torch.manual_seed(5)
        xr = xi.clone().requires_grad_(True)
        gr, = torch.autograd.grad(sd(xr).mean(1).sum(), xr)
    assert torch.allclose(r1, gr.square().flatten(1).sum(1).mean(), rtol=1e-6) and r1 > 0
    # gain r: with SGD(lr 1) the R1 update is exactly -r grad(R1)
    Dl = LinD(w.clone(), b.clone())
    opt = torch.optim.SGD(Dl.parameters(), lr=1.0)
    D.r1_step(Dl, list(Dl.parameters()), opt, x, None, 0.3, 16, env1())
    assert torch.allclose(Dl.w.detach(), w - 16 * 0.3 * w, atol=1e-6) and torch.equal(Dl.b.detach(), b)
    lr, betas = D.d_adam_hparams(1e-4, 16)
    assert abs(lr - 1e-4 * 16 / 17) < 1e-12 and betas[0] == 0.0 and abs(betas[1] - 0.990585) < 1e-6
    assert isinstance(betas[0], float)  # a float, not a tensor (Adam rejects tensor betas with a float lr)


def test_10_r1_schedule_and_optimisers(tmp_path, monkeypatch):
    steps, orig = [], D.r1_step
    calls = {"g": 0}
    og = D.g_step

    def spy_g(*a):
        calls["g"] += 1
        return og(*a)

    def spy_r1(*a):
        steps.append((calls["g"] - 1, a[6]))  # (step index, gain)
        return orig(*a)
    monkeypatch.setattr(D, "r1_step", spy_r1)
    monkeypatch.setattr(D, "g_step", spy_g)
    tpath, _ = rf_ckpt(tmp_path / "t.pt", mlp_dict())
    D.main(["--teacher", tpath, "--iters", "33", "--batch", "16", "--out", str(tmp_path / "r"), "--eval_n", "100",
            "--log_every", "11"])
    assert steps == [(16, 16), (32, 16)]
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    (gg,), (dg,) = ck["opt"]["g"]["param_groups"], ck["opt"]["d"]["param_groups"]
    assert gg["betas"] == (0.0, 0.99) and gg["lr"] == 1e-4 and gg["eps"] == 1e-8 and gg["weight_decay"] == 0
    assert abs(dg["lr"] - 1e-4 * 16 / 17) < 1e-15 and abs(dg["betas"][1] - 0.99 ** (16 / 17)) < 1e-15
    logs = [json.loads(ln) for ln in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [11, 22, 33] and logs[0]["R1"] == 0 and logs[1]["R1"] > 0
    assert all(0 < r["D_real"] < 1 and 0 < r["D_fake"] < 1 for r in logs)


def test_10_cifar10_preset_is_train_sh_gdd_i():
    """The `cifar10` preset resolves to Zyriix/GDD train.sh's "GDD-I / CIFAR-10 uncond" line: --freeze=1 --batch=256
    --lr=1e-4 --dlr=1e-4 --duration=5 (training_loop.py: steps until >= 5 Mimg, ceil(5e6 / 256)) --ema=0.5
    (--ema-warmup 0.05 by default) --loss-type=ns --r1-gamma=1e-4 at 64 images per GPU (--nproc_per_node=4)
    --diffaug=False, no x-flips, EDM's uncond VE pickle; lazy R1 every 16 (training_loop.py r1_interval); constant lrs
    (lr_rampup_kimg 0); snapshots every 250 kimg (--snap=10 ticks of --tick=25 kimg)."""
    c = C.resolve_config(D.Config, D.PRESETS, "cifar10", {})
    assert (c.freeze, c.disc, c.disc_backbones, c.cond, c.loss, c.diffaug) == ("gdd_i", "projected", "vgg,effnet",
                                                                             False, "ns", "")
    assert (c.batch, c.iters, c.lr_g, c.lr_d, c.lr_schedule) == (256, math.ceil(5e6 / 256), 1e-4, 1e-4, "const")
    assert (c.ema_halflife_img, c.ema_rampup, c.r1_interval, c.r1_gamma, c.r1_gdd_batch) == (5e5, 0.05, 16, None, 64)
    assert D.gdd_gamma(c, {}) == 1e-4 and c.teacher == "edm-cifar10-32x32-uncond-ve.pkl" and c.teacher_iters == 0
    assert c.ckpt_every == c.fid_every == round(250e3 / 256) and c.precision == "bf16"


# ============================================================================== 11-12: EMA, conditioning
def test_11_ema_ramp_values():
    assert D.ema_beta(0, 256, 5e5, 0.05) == 0.0
    assert abs(D.ema_beta(256, 256, 5e5, 0.05) - 0.5 ** 20) < 1e-12
    assert abs(D.ema_beta(5e6, 256, 5e5, 0.05) - 0.999290) < 1e-6
    ema = C.EMA(nn.Linear(2, 2), halflife_kimg=500, rampup=0.05)
    for n in (0, 256, 1e6, 5e6):
        assert ema.beta(n, 256) == D.ema_beta(n, 256, 5e5, 0.05)


def test_11_train_ema_images_and_cosine_lrs(monkeypatch, tmp_path):
    """The loop hands the EMA the images seen before each step (EDM's cur_nimg: h = min(H, rho n_img) starts at 0, so
    the first update copies G), and the cosine schedule scales both lrs (D's after the lazy-R1 factor r/(r+1))."""
    imgs, lrs = [], []
    update, step = C.EMA.update, C.Guard.step
    monkeypatch.setattr(C.EMA, "update", lambda e, m, n, b: (imgs.append((n, b)), update(e, m, n, b))[1])
    monkeypatch.setattr(C.Guard, "step", lambda g, opt, *a, **k: (lrs.append(opt.param_groups[0]["lr"]),
                                                                  step(g, opt, *a, **k))[1])
    D.main(["--teacher_iters", "2", "--teacher_batch", "16", "--batch", "16", "--eval_teacher_steps", "0",
            "--eval_n", "16", "--eval_steps", "1", "--iters", "3", "--r1_interval", "16", "--lr_g", "0.01",
            "--lr_d", "0.02", "--lr_schedule", "cosine", "--ema_halflife_img", "1000", "--ema_rampup", "0.05",
            "--out", str(tmp_path / "o")])
    assert imgs == [(0, 16), (16, 16), (32, 16)]
    cos = [0.5 * (1 + math.cos(math.pi * k / 3)) for k in range(3)]
    want = [v for k in range(3) for v in (0.01 * cos[k], 0.02 * 16 / 17 * cos[k])]  # G, then D, each step
    assert lrs == pytest.approx(want, rel=1e-12)


def test_12_conditional_projection_and_labels():
    proj = D.Projection(10)
    phi = torch.randn(3, 64, 2, 2, generator=gen(0))
    y = torch.tensor([1, 4, 4])
    e = proj.embed.weight.detach()
    want = (phi * e[y][:, :, None, None]).sum(1).flatten(1) / 8
    assert torch.allclose(proj(phi, y), want, atol=1e-6) and proj(phi, y).shape == (3, 4)
    assert not torch.allclose(proj(phi, torch.tensor([2, 4, 4]))[0], want[0])
    # fake labels = the real batch's labels in both steps
    torch.manual_seed(0)
    teacher = perturb(C.build_net(tiny_dict(label_dim=10)), 0.05).eval().requires_grad_(False)
    g, Dn = D.make_generator(teacher), D.ScratchD(3, 8, 10)
    seen = []
    fwd = Dn.forward
    Dn.forward = lambda a, y=None, amp=None: (seen.append(y), fwd(a, y, amp))[1]
    x, yr = torch.rand(4, 3, 8, 8) * 2 - 1, torch.tensor([3, 1, 4, 1])
    dp = list(Dn.parameters())
    amp = lambda: C.autocast(env1())
    D.g_step(g, Dn, dp, list(g.parameters()), torch.optim.Adam(g.parameters()), x, yr, 1.0, "ns", env1(), amp)
    D.d_step(g, Dn, dp, torch.optim.Adam(dp), x, yr, 1.0, "ns", env1(), amp)
    assert len(seen) == 3 and all(s is yr for s in seen)


# ============================================================================== 13-14: discriminators
def test_13_teacher_discriminator():
    teacher, g, Dn, d_params, opt_g, opt_d, x = _img_setup()
    enc = list(Dn.encoder.parameters())
    ptrs = {p.data_ptr() for p in enc}
    assert not ptrs & {p.data_ptr() for p in [*teacher.parameters(), *g.parameters()]}
    assert not any(p.requires_grad for p in enc) and not Dn.train().encoder.training
    assert not {id(p) for p in enc} & {id(p) for grp in opt_d.param_groups for p in grp["params"]}
    assert Dn.shapes == [(16, 8, 8), (32, 4, 4)] and Dn(x).shape == (4, 32)
    before = [p.clone() for p in enc]
    amp = lambda: C.autocast(env1())
    D.d_step(g, Dn, d_params, opt_d, x, None, 1.0, "ns", env1(), amp)
    D.r1_step(Dn, d_params, opt_d, x, None, 0.1, 16, env1())
    assert all(torch.equal(a, b) for a, b in zip(before, enc))
    with torch.device("meta"):
        big = C.build_net(C.net_config("ddpmpp", time_scale=1000.0))
        Db = D.TeacherD(big, 0.1)
        assert Db.shapes == [(256, 32, 32), (256, 16, 16), (256, 8, 8)]
        assert Db(torch.zeros(2, 3, 32, 32)).shape == (2, 48)


GOLDEN = os.path.join(ROOT, "tests", "golden")


def _golden_module():
    if GOLDEN not in sys.path:
        sys.path.insert(0, GOLDEN)
    import make_gdd_golden
    return make_gdd_golden


def _filled_projected(names):
    """distributional's `projected` D with every tensor set by the golden script's fill_value (backbones before GDD's
    BatchNorm update, as the script fills them before GDD's builder runs)."""
    mk = _golden_module()
    bbs = []
    for n in names:
        if n == "vgg":
            with torch.device("meta"):  # names and shapes only
                shapes = {k: tuple(t.shape) for k, t in D.vgg16_bn_features().state_dict().items()}
        else:
            import timm
            full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
            shapes = {k: tuple(t.shape) for k, t in full.state_dict().items()
                      if k.split(".")[0] in ("conv_stem", "bn1", "blocks")}
        sd = {k: mk.fill_value(f"backbones.{n}.net.{k}", s) for k, s in shapes.items()}
        sd = {k: torch.zeros((), dtype=torch.long) if v is None else v for k, v in sd.items()}
        bbs.append(D.make_backbone(n, sd, env1()))
    Dn = D.ProjectedD(bbs).train()
    keys = mk.fill_(Dn, lambda k: None if k.startswith("backbones.") else k)
    assert len(keys) == len([k for k in Dn.state_dict() if not k.startswith("backbones.")
                             and not k.endswith("num_batches_tracked")])
    return Dn


def _check_golden(tag, names):
    """Logits and R1 of our D at GDD's initial state equal GDD's (fixture from tests/golden/make_gdd_golden.py)."""
    fx = torch.load(os.path.join(GOLDEN, "gdd_projected_d.pt"), weights_only=True)
    ref = fx[tag]
    Dn = _filled_projected(names)
    assert Dn.logit_groups == ref["groups"] and sum(p.numel() for p in Dn.parameters() if p.requires_grad) == \
        ref["trainable"]
    B, K = fx["batch"], sum(ref["groups"])
    gamma = D.gamma_from_gdd(fx["gamma_gdd"], K, B)
    seen, flags = [], []

    def spy(x, y=None):
        seen.append(Dn(x, y))
        return seen[-1]
    hook = Dn.backbones["vgg"].net[0].register_forward_hook(lambda m, i, o: flags.append(
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.is_autocast_enabled("cpu"),
         o.dtype)))
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    with torch.autocast("cpu", dtype=torch.bfloat16):  # G's autocast around it: D must stay fp32 with TF32 off
        r1 = D.r1_penalty(spy, fx["x"], None, gamma)
    hook.remove()
    assert flags == [(False, False, False, torch.float32)]
    logits = seen[0].detach()
    err = (logits - ref["r1_logits"][0]).abs().max().item()
    assert logits.dtype == torch.float32 and logits.shape == (B, K) and err < 1e-4, err
    # R1: ours with gamma_from_gdd(1e-4, K, B) is GDD's R1 loss (gain 1) over its per-GPU batch. Tolerance 2e-3
    # relative: the squared input gradient through 13 VGG layers and batch-statistics BatchNorm carries fp32 rounding
    # of that order (the same D in fp64 differs from our fp32 value by up to 7e-4 and from GDD's by up to 6e-4).
    assert abs(r1.item() * B - ref["r1_loss"].item()) < 2e-3 * ref["r1_loss"].item(), (r1.item() * B, ref["r1_loss"])
    return err


def test_14_projected_d_matches_gdd_vgg_branch():
    """VGG16-BN alone (no timm needed): logits to 1e-4 and R1 in GDD's convention; D/G losses of the two-backbone
    D from GDD's own logits: ours times the per-GPU batch is GDD's (sum over backbones of per-backbone means)."""
    _check_golden("vgg", ["vgg"])
    fx = torch.load(os.path.join(GOLDEN, "gdd_projected_d.pt"), weights_only=True)
    for tag in ("full", "vgg"):
        ref, B = fx[tag], fx["batch"]
        fake, real = ref["d_logits"]
        assert abs(D.d_loss(real, fake, "ns", ref["groups"]).item() * B - ref["d_loss"].item()) < 1e-5
        assert abs(D.g_loss(ref["g_logits"][0], "ns", ref["groups"]).item() * B - ref["g_loss"].item()) < 1e-5
    ref = fx["full"]
    fake, real = ref["d_logits"]
    assert abs(D.d_loss(real, fake).item() * fx["batch"] - ref["d_loss"].item()) > 0.1  # one mean over all K: not GDD's


def test_14_projected_d_matches_gdd_both_backbones():
    """With timm (optional): EfficientNet-lite0 as the second backbone, all 548 logits and R1 to GDD's."""
    pytest.importorskip("timm")
    _check_golden("full", ["vgg", "effnet"])


def test_14_projected_d_structure_and_missing_pieces(monkeypatch, tmp_path):
    b = D.make_backbone("vgg", "random", env1(), seed=3)
    net = b.net
    # GDD's cut: each stage stops just before a max-pool; channels 128, 256, 512, 512
    assert [type(net[i]).__name__ for i in D.VGG_CUTS] == ["MaxPool2d"] * 4
    assert [s[-1] for s in b.stages] == [str(i - 1) for i in D.VGG_CUTS] and b.channels == (128, 256, 512, 512)
    assert [net[int(s[-2])].num_features for s in b.stages] == [128, 256, 512, 512]
    # GDD's BatchNorm update (one zero image in training mode) moved the running statistics
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in net if
               isinstance(m, nn.BatchNorm2d)) and all(m.num_batches_tracked == 1 for m in net
                                                      if isinstance(m, nn.BatchNorm2d))
    D1, D2, D3 = (D.ProjectedD([b], proj_seed=s, size=64) for s in (3, 3, 4))
    assert D1.head_sizes == {"vgg": [1, 1, 1, 1]} and D.ProjectedD([b]).head_sizes == {"vgg": [121] * 4}
    assert [D.head_logits(224, s, n) for s, n in zip(D.BACKBONES["effnet"][4], D.PROJ_NOMINAL)] == [16] * 4
    for a, c, e in zip(D1.projectors.parameters(), D2.projectors.parameters(), D3.projectors.parameters()):
        assert torch.equal(a, c) and not torch.equal(a, e)
    D1.train()
    assert not any(m.training for b in D1.backbones.values() for m in b.modules()) and all(
        m.training for m in D1.heads.modules() if isinstance(m, nn.BatchNorm2d))
    fixed = [*D1.backbones.parameters(), *D1.projectors.parameters()]
    d_params = [p for p in D1.parameters() if p.requires_grad]
    assert not any(p.requires_grad for p in fixed) and len(d_params) == len(list(D1.heads.parameters()))
    assert set(D.disc_state(D1)) and not any(k.startswith("backbones.") for k in D.disc_state(D1))
    # one lazy-R1 step (double backward through the heads' spectral norm and BatchNorm): heads move, the rest not
    before = [p.clone() for p in fixed] + [t.clone() for t in D1.backbones.buffers()]
    heads = [p.clone() for p in d_params]
    lr_d, betas = D.d_adam_hparams(1e-2, 16)
    x = torch.rand(2, 3, 16, 16, generator=gen(0)) * 2 - 1
    D.r1_step(D1, d_params, torch.optim.Adam(d_params, lr=lr_d, betas=betas), x, None, 10.0, 16, env1())
    assert all(torch.equal(a, c) for a, c in zip(before, [*fixed, *D1.backbones.buffers()]))
    assert any(not torch.equal(a, c) for a, c in zip(heads, d_params))
    # missing timm: one sentence naming the flag; --disc_backbones vgg is the explicit way to go on without it
    monkeypatch.setitem(sys.modules, "timm", None)
    data = C.Data("images", "x", x=torch.zeros(4, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(C.UserError, match=r"needs timm .*--disc_backbones vgg"):
        D.build_disc(D.Config(disc="projected", disc_weights="random"), data, None, env1(), Log())
    # missing VGG weights: one sentence naming the file, where to put it and the flags; never a silent fallback
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))

    def offline(*a, **kw):
        raise OSError("no network")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(C.UserError) as e:
        D.make_backbone("vgg", "imagenet", env1())
    sentence(e, "vgg16_bn-6c64b313.pth", str(tmp_path / "checkpoints"), "--disc_weights random", "--disc teacher")


def test_14_vgg_imagenet_weights_load_under_torchvisions_names(monkeypatch):
    """--disc_weights imagenet reads torchvision's VGG16_BN_Weights.IMAGENET1K_V1 file through torch hub (hash
    checked) and keeps its `features.` part: a state dict in torchvision's own vgg16_bn names (its real module's
    keys and shapes, seeded values) gives the backbone those values, as passing the features directly does.
    (No test had read this branch: a key mismatch would have surfaced only in a real GDD run.)"""
    import torchvision
    with torch.device("meta"):
        shapes = {k: (t.shape, t.dtype) for k, t in torchvision.models.vgg16_bn(weights=None).state_dict().items()}
    g = gen(5)
    sd = {k: torch.randint(0, 9, s, generator=g) if dt == torch.long else torch.rand(s, generator=g) + 0.5
          for k, (s, dt) in shapes.items() if not k.startswith("classifier.")}  # (the classifier: 120 M values)
    sd["classifier.6.bias"] = torch.zeros(1000)
    seen = []

    def cached(url, **kw):
        seen.append((url, kw.get("check_hash")))
        return sd
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", cached)
    got = D.make_backbone("vgg", "imagenet", env1()).state_dict()
    assert seen == [(torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1.url, True)]
    want = D.make_backbone("vgg", {k[9:]: v for k, v in sd.items() if k.startswith("features.")}, env1()).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)
    conv = [k for k in got if k.endswith("0.weight") and got[k].ndim == 4][0]  # features.0: the first convolution
    assert torch.equal(got[conv], sd["features." + conv.split(".", 1)[1]])
    rand = D.make_backbone("vgg", "random", env1()).state_dict()  # control: the seeded stand-in differs
    assert not torch.equal(rand[conv], got[conv])


def test_14_effnet_imagenet_weights_come_from_timm_or_one_sentence(monkeypatch):
    """The EfficientNet-lite0 backbone with --disc_weights imagenet asks timm for its pretrained model (a stand-in
    here records the call and returns a seeded model, whose weights the backbone then holds); when timm cannot load
    them (offline, nothing cached), one sentence naming timm's cache entry and the two ways on."""
    timm = pytest.importorskip("timm")  # (optional: requirements-extras.txt)
    real, asked = timm.create_model, []

    def create(name, pretrained=False, **kw):
        asked.append((name, pretrained))
        if pretrained == "fail":
            raise OSError("offline")
        torch.manual_seed(11)
        return real(name, pretrained=False, **kw)
    monkeypatch.setattr(timm, "create_model", create)
    got = D.make_backbone("effnet", "imagenet", env1()).state_dict()
    assert asked == [("tf_efficientnet_lite0", True)]
    with torch.random.fork_rng():  # (the global RNG as the other tests find it)
        torch.manual_seed(11)
        want = real("tf_efficientnet_lite0", pretrained=False).state_dict()
    stem = next(k for k in got if k.endswith("conv_stem.weight"))
    assert torch.equal(got[stem], want["conv_stem.weight"])
    monkeypatch.setattr(timm, "create_model", lambda name, pretrained=False, **kw: create(name, pretrained and "fail"))
    with pytest.raises(C.UserError) as e:
        D.make_backbone("effnet", "imagenet", env1())
    sentence(e, "(OSError)", "timm/tf_efficientnet_lite0.in1k", "--disc_backbones vgg", "--disc_weights random")


# ============================================================================== 15-16: DiffAugment, sampler
def test_15_diffaugment():
    x = torch.rand(4, 3, 8, 8, generator=gen(0)) * 2 - 1
    assert torch.equal(D.diff_augment(x, ""), x)
    for pol in ("color", "translation", "cutout", "color,translation,cutout"):
        xr = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y = D.diff_augment(xr, pol)
        assert y.shape == x.shape and not torch.equal(y, x)
        g, = torch.autograd.grad(y.square().sum(), xr)
        assert g.abs().sum() > 0
    torch.manual_seed(2)
    y = D._translation(x)
    for i in range(4):  # a pure shift with zero fill: every output pixel is an input pixel or zero
        vals = set(x[i].flatten().tolist()) | {0.0}
        assert set(y[i].flatten().tolist()) <= vals
    torch.manual_seed(3)
    zeros = (D._cutout(torch.ones(64, 3, 8, 8)) == 0).flatten(1).sum(1)
    assert zeros.max() == 3 * 16 and zeros.min() >= 3 * 4  # an H/2 x W/2 square, clipped at the border
    # DiffAugment's rand_cutout: an even size's centre reaches the far border (a 2 x 2 corner left at (8, 8))
    torch.manual_seed(3)
    assert (D._cutout(torch.ones(512, 1, 8, 8)) == 0).flatten(1).sum(1).min() == 4
    dot = torch.zeros(512, 1, 28, 28)  # shifts up to int(28 * 0.125 + 0.5) = 4 on 28 px (28 // 8 = 3 before)
    dot[:, :, 14, 14] = 1
    torch.manual_seed(4)
    at = D._translation(dot).flatten(1).argmax(1)
    assert set((at // 28 - 14).tolist()) == set((at % 28 - 14).tolist()) == set(range(-4, 5))
    # DiffAugment's ranges (Zhao et al., DiffAugment.py): shifts of at most H/8 = 2 pixels at 16 px, each one drawn;
    # contrast factors uniform in [0.5, 1.5) about the image mean
    one = torch.zeros(512, 1, 16, 16)
    one[:, :, 8, 8] = 1
    torch.manual_seed(4)
    at = D._translation(one).flatten(1).argmax(1)
    assert set((at // 16 - 8).tolist()) == set((at % 16 - 8).tolist()) == set(range(-2, 3))
    x = torch.rand(2000, 3, 4, 4, generator=gen(5))
    m = x.mean((1, 2, 3), keepdim=True)
    f = ((D._contrast(x) - m) / (x - m)).flatten(1)[:, 0]
    assert 0.5 - 1e-5 <= f.min() < 0.52 and 1.48 < f.max() < 1.5 + 1e-5


def test_15_diffaugment_colour_ranges():
    """DiffAugment's colour draws (Zhao et al., DiffAugment.py; Zyriix/GDD training/diffaug.py): brightness adds
    U[-0.5, 0.5) per image; saturation scales the deviation from the channel mean by U[0, 2)."""
    x = torch.rand(2000, 3, 4, 4, generator=gen(6))
    torch.manual_seed(6)
    b = (D._brightness(x) - x).flatten(1)
    assert (b - b[:, :1]).abs().max() < 1e-6  # one shift per image
    assert -0.5 <= b.min() < -0.48 and 0.48 < b.max() < 0.5
    m = x.mean(1, keepdim=True)
    torch.manual_seed(6)
    f = ((D._saturation(x) - m) / (x - m)).flatten(1)[:, 0]
    assert 0 <= f.min() < 0.02 and 1.98 < f.max() < 2 + 1e-5


def test_15_cutout_of_an_odd_size_stays_centred_inside():
    """DiffAugment's rand_cutout draws the centre in [0, H + 1 - s % 2): for an odd size s (H = 10: s = 5) the centre
    stays in [0, H - 1], so the smallest square left after clipping is 3 x 3 (an even one reaches H: test_15)."""
    torch.manual_seed(3)
    zeros = (D._cutout(torch.ones(2048, 1, 10, 10)) == 0).flatten(1).sum(1)
    assert zeros.min() == 9 and zeros.max() == 25


def test_16_sampler_grids_calls_and_batch_independence():
    assert D.time_grid(1, 1.0) == [1.0] and D.time_grid(2, 1.0) == [1.0, 0.5]
    assert max(abs(a - b) for a, b in zip(D.time_grid(4, 0.9), [0.9, 0.675, 0.45, 0.225])) < 1e-12
    assert max(abs(a - b) for a, b in zip(D.time_grid(8, 1.0), [1 - k / 8 for k in range(8)])) < 1e-12
    stub = Stub(0.3 * torch.eye(2), torch.zeros(2))
    D.sample(stub, C.IndexRNG(range(5), 0, CPU), (2,), 1, 1.0)
    assert len(stub.ts) == 1 and torch.all(stub.ts[0] == 1.0)
    stub.ts.clear()
    D.sample(stub, C.IndexRNG(range(5), 0, CPU), (2,), 4, 1.0)
    assert [float(t[0]) for t in stub.ts] == [1.0, 0.75, 0.5, 0.25]
    class Still(nn.Module):  # zero velocity: G(z) = z, and each further step is the re-noised point itself
        def forward(self, x, t, y=None):
            return torch.zeros_like(x)
    rng = C.IndexRNG(range(5), 0, CPU)
    z, e = rng.randn(5, 2), rng.randn(5, 2)  # drawn in the sampler's order: z, then eps_1
    x = D.sample(Still(), C.IndexRNG(range(5), 0, CPU), (2,), 2, 1.0)
    assert torch.allclose(x, 0.5 * z + 0.5 * e, atol=1e-6)  # x_tau = (1 - tau) x + tau eps at tau = 0.5
    x = D.sample(Still(), C.IndexRNG(range(5), 0, CPU), (2,), 2, 0.8)  # tau = 0.4: (1 - tau) and tau differ
    assert torch.allclose(x, 0.6 * z + 0.4 * e, atol=1e-6)
    torch.manual_seed(0)
    net = perturb(C.build_net(mlp_dict()), 0.1).eval()
    for K in (1, 2):
        a = torch.cat([D.sample(net, C.IndexRNG(i.tolist(), 0, CPU), (2,), K, 1.0) for i in torch.arange(64).split(7)])
        b = D.sample(net, C.IndexRNG(range(64), 0, CPU), (2,), K, 1.0)
        assert torch.allclose(a, b, atol=1e-6, rtol=0)


# ============================================================================== toy convergence
@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """In-file 1-RF teacher on 8 Gaussians, then GDD at a test budget (1,000 x 256, gamma 0.1).
    The teacher gets 1,000 x 512 instead of the preset's 2,000 to save ~20 s: it is as good at 100 Euler steps
    (MMD^2 0.026 against 0.032 measured), and GDD then reached MMD^2 0.025 / in-mode 0.77 (0.069 / 0.56 from the
    2,000-step teacher: GAN runs of this length vary, so the thresholds are kept loose, not tightened)."""
    root = tmp_path_factory.mktemp("gdd_toy")
    D.main(["--out", str(root / "gdd"), "--teacher_iters", "1000", "--iters", "1000", "--batch", "256",
            "--log_every", "250", "--eval_n", "4000", "--eval_teacher_steps", "25",
            "--ckpt_every", "1000"])
    recs = [json.loads(ln) for ln in (root / "gdd" / "metrics.jsonl").read_text().splitlines()]
    return dict(root=root, step0=recs[0], final=recs[-1])


def passes(m, key):
    return (m[f"mmd2_{key}"] < 0.08 and m[f"in_mode_{key}"] >= 0.55 and m[f"modes_{key}"] >= 7)


@pytest.mark.slow
def test_toy_gdd_covers_the_modes_and_step0_fails(toy):
    s0, m = toy["step0"], toy["final"]
    assert s0["step"] == 0 and m["step"] == 1000
    print({k: round(v, 4) for k, v in {**s0, **m}.items() if k != "step"})
    assert passes(m, "1") and m["mmd2_1"] <= 0.05 * s0["mmd2_init"], m
    assert not passes(s0, "init")  # control: the step-0 generator (the teacher's collapsed 1-step map)
    assert m["mmd2_init"] == s0["mmd2_init"]  # the final plot's step-0 panel is that same generator
    assert s0["modes_teacher"] >= 7  # the teacher itself is good at 25 Euler steps
    for f in ("ckpt.pt", "teacher.pt", "log.jsonl", "config.json", "samples.png", "samples_step0.png", "metrics.jsonl"):
        assert (toy["root"] / "gdd" / f).is_file(), f
    import rectified_flow as R  # the in-file teacher is a valid rectified_flow.py checkpoint
    net, tck = R.load_teacher(str(toy["root"] / "gdd" / "teacher.pt"), env1())
    assert tck["config"]["stage"] == "1rf" and tck["step"] == 1000


# ============================================================================== CLI smoke (tiny), resume, errors
cli = functools.partial(run, SCRIPT)  # its command line in a subprocess (one OpenMP thread)


def test_cli_tiny_train_sample_fid(imgs, capsys, monkeypatch):
    p = cli("--preset", "tiny", "--data", "imgs.npy", "--out", "run", "--root", "data", cwd=imgs)
    assert_ok(p)
    assert "frozen 0 of 189,347" in p.stdout and "disc scratch (K = 1" in p.stdout
    ck = torch.load(imgs / "run" / "ckpt.pt", weights_only=True)
    assert set(ck) >= {"model", "ema", "opt", "step", "config", "net", "method", "convention", "rng", "disc", "t_g",
                       "teacher"}
    assert set(ck["opt"]) == {"g", "d"} and ck["step"] == 4 and ck["config"]["disc"] == "scratch"
    assert ck["teacher"]["path"] == os.path.join("run", "teacher.pt") and ck["teacher"]["method"] == "rectified_flow"
    ckpt = str(imgs / "run" / "ckpt.pt")
    for b in (3, 16):  # in-process (a subprocess costs seconds of imports); per-index noise: batch-independent
        D.main(["sample", "--ckpt", ckpt, "--steps", "1,2", "--n", "10", "--batch", str(b),
                "--out", str(imgs / f"s{b}.npy")])
    assert "K > 1" in capsys.readouterr().out
    for K in (1, 2):
        a = np.load(imgs / f"s3_{K}step.npy")
        assert a.shape == (10, 16, 16, 3) and a.dtype == np.uint8
        assert np.abs(a.astype(int) - np.load(imgs / f"s16_{K}step.npy").astype(int)).max() <= 1
    monkeypatch.chdir(imgs)  # (the checkpoint names its data by its absolute path)
    D.main(["fid", "--ckpt", ckpt, "--steps", "1", "--n", "32", "--fid_detector", standin_path(),
            "--root", str(imgs / "data")])
    rec = json.loads((imgs / "run" / "fid.jsonl").read_text().splitlines()[-1])
    assert rec["steps"] == 1 and rec["detector"] == "standin" and math.isfinite(rec["fid"])


@pytest.mark.parametrize("extra", [["--disc", "teacher", "--freeze", "gdd_i"], ["--loss", "hinge", "--fid_every", "2",
                                                                               "--fid_detector", standin_path()]])
def test_tiny_other_discriminators_and_hinge(imgs, tmp_path, extra, capsys):
    D.main(["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--out", str(tmp_path / "r"), "--root", str(tmp_path),
            *extra])
    out = capsys.readouterr().out
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 4
    if "teacher" in extra:
        assert "K = 32 logits" in out and "fraction 0.7860" in out and any(k.startswith("encoder.") for k in ck["disc"])
    else:
        assert out.count("FID-0.016k proxy") == 3  # steps 0, 2 and 4


def test_14_tiny_projected_d_end_to_end_names_precisions_and_k(imgs, tmp_path, capsys):
    """`--preset tiny --disc projected` with fixed random VGG16-BN weights (no download) and VGG alone (explicit: timm
    is an optional extra) trains, checkpoints and logs K and the precisions of G and D."""
    D.main(["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--out", str(tmp_path / "p"), "--root", str(tmp_path),
            "--disc", "projected", "--disc_weights", "random", "--disc_backbones", "vgg", "--iters", "1",
            "--batch", "2", "--eval_n", "4"])
    out = capsys.readouterr().out
    ck = torch.load(tmp_path / "p" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 1 and ck["disc"] and not any(k.startswith("backbones.") for k in ck["disc"])
    assert "K = 484 logits" in out, out
    assert "fp32, TF32 off" in out and re.search(r"\bG\b.*(fp32|bf16)", out), out


def test_resume_refusals_print_alone(imgs, tmp_path, capsys):
    """A refused resume prints its `error:` line alone: the `projected` D's notes (--disc_backbones vgg, --disc_weights
    random) and the teacher's (a 2-RF checkpoint as DIR/teacher.pt) were printed at once, before the refusals that come
    after them (the saved D does not fit, the teacher holds other weights); now they wait for the run's first line. A
    changed --disc_backbones (the D's network, as --proj_seed) is refused by its name, not as a D that does not fit, and
    so is a changed --disc_weights (the frozen backbones, rebuilt from it on resume).
    Control: the run as saved resumes, its notes before its first line."""
    args = ["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--root", str(tmp_path), "--out", str(tmp_path / "g"),
            "--disc", "projected", "--disc_weights", "random", "--disc_backbones", "vgg", "--batch", "2", "--eval_n",
            "4"]
    D.main([*args, "--iters", "1"])
    path, tpath = tmp_path / "g" / "ckpt.pt", tmp_path / "g" / "teacher.pt"
    ck, tck = (torch.load(p, weights_only=True) for p in (path, tpath))

    def refuses(*words, argv=()):
        capsys.readouterr()
        guarded(capsys, lambda: D.main([*args, "--iters", "2", *argv]), *words)
    refuses("was trained with --disc_backbones vgg", "--disc_backbones vgg,effnet",
            argv=["--disc_backbones", "vgg,effnet"])
    refuses("was trained with --disc_weights random", argv=["--disc_weights", "imagenet"])  # the frozen backbones: not
    # in the checkpoint, so other ones would meet heads trained on these
    torch.save({**ck, "disc": {k: v for i, (k, v) in enumerate(ck["disc"].items()) if i}}, path)  # a D entry gone
    refuses("the checkpoint's discriminator does not fit --disc")
    torch.save(ck, path)
    other = {k: v + 0.01 if v.is_floating_point() else v for k, v in tck["ema"].items()}
    torch.save({**tck, "ema": other, "config": {**tck["config"], "stage": "2rf"}}, tpath)  # replaced in place
    refuses("holds other weights", str(tpath))
    torch.save(tck, tpath)
    capsys.readouterr()
    D.main([*args, "--iters", "2"])
    out = capsys.readouterr().out
    assert torch.load(path, weights_only=True)["step"] == 2
    assert out.index("note: --disc_backbones vgg leaves out") < out.index("note: --disc_weights random") < \
        out.index("distributional (GDD) |"), out


def test_resume_bitwise(imgs, tmp_path):
    """6 steps uninterrupted vs 3 + a resumed 3 (R1 at steps 2 and 4, EMA on, teacher D with its noise)."""
    base = ["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--root", str(tmp_path), "--ckpt_every", "3",
            "--disc", "teacher", "--ema_halflife_img", "100", "--eval_n", "4"]
    D.main([*base, "--out", str(tmp_path / "a"), "--iters", "6"])
    D.main([*base, "--out", str(tmp_path / "b"), "--iters", "3"])
    D.main([*base, "--out", str(tmp_path / "b"), "--iters", "6"])
    ca, cb = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in ("a", "b"))
    assert ca["step"] == cb["step"] == 6
    for k in ("model", "ema", "disc"):
        for n in ca[k]:
            assert torch.equal(ca[k][n], cb[k][n]), (k, n)
    for o in ("g", "d"):
        for i, st in ca["opt"][o]["state"].items():
            for n, v in st.items():
                assert torch.equal(v, cb["opt"][o]["state"][i][n]), (o, i, n)


def test_nan_loss_keeps_last_checkpoint(imgs, tmp_path, monkeypatch, capsys):
    args = ["--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--root", str(tmp_path), "--out", str(tmp_path / "n"),
            "--log_every", "1", "--ckpt_every", "2"]
    D.main([*args, "--iters", "2"])
    before = sha(tmp_path / "n" / "ckpt.pt")
    monkeypatch.setattr(D, "g_loss", lambda f, kind="ns", groups=None: f.float().mean() * float("nan"))
    with pytest.raises(SystemExit) as e:
        C.main_guard(lambda: D.main([*args, "--iters", "4"]))
    refusal(e.value.code, capsys.readouterr().err, "NaN")
    assert sha(tmp_path / "n" / "ckpt.pt") == before


def test_cli_bad_inputs(imgs, tmp_path, capsys):
    tpath, _ = rf_ckpt(tmp_path / "t.pt", mlp_dict())
    ipath = str(imgs / "imgs.npy")
    D.main(["--preset", "tiny", "--data", ipath, "--out", str(tmp_path / "ok"), "--root", str(tmp_path),
            "--iters", "1"])
    before = sha(tmp_path / "ok" / "ckpt.pt")
    cases = [
        (["--preset", "small", "--out", str(tmp_path / "s")], ["rectified_flow.py"]),  # no teacher
        (["--teacher", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "m")], ["missing.pt"]),
        # an MLP teacher on images (with an image discriminator, so that the teacher is what does not fit)
        (["--teacher", tpath, "--data", ipath, "--disc", "scratch", "--out", str(tmp_path / "x")], ["does not fit"]),
        (["--teacher", tpath, "--disc", "scratch", "--out", str(tmp_path / "y")], ["--disc mlp"]),
        (["--teacher", tpath, "--cond", "--out", str(tmp_path / "c")], ["--cond"]),
        (["--preset", "tiny", "--data", ipath, "--out", str(tmp_path / "ok"), "--root", str(tmp_path), "--freeze",
          "gdd_i"], ["another --out"]),
        (["--preset", "nope"], []),
        (["--diffaug", "zoom"], ["zoom"]),
        (["sample", "--ckpt", tpath], ["rectified_flow"]),
    ]
    capsys.readouterr()  # (the run above)
    for argv, words in cases:
        guarded(capsys, lambda: D.main(list(argv)), *words)
    assert sha(tmp_path / "ok" / "ckpt.pt") == before
    assert not (tmp_path / "m").exists()  # a missing teacher stopped the run before its first file (config.json)
    p = cli("--teacher", "nowhere.pt", "--out", "z", cwd=tmp_path)
    refused(p, "nowhere.pt")


# ============================================================================== 18: two gloo ranks
WORKER = """
import sys
sys.path.insert(0, {root!r})
import torch
import common as C
import distributional as D

orig = C.save_checkpoint


def spy(path, ck, env, gens=()):  # every rank keeps its own G, EMA and D next to the checkpoint
    if ck.get("method") == "distributional":
        torch.save({{k: ck[k] for k in ("model", "ema", "disc")}}, f"{{path}}.rank{{env.rank}}")
    return orig(path, ck, env, gens)


C.save_checkpoint = spy
C.main_guard(lambda: D.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_18_two_ranks_stay_identical(imgs, tmp_path):
    """torchrun, 2 gloo ranks, tiny preset with the `teacher` D (own init per rank before the broadcast, noise and
    data per rank), GDD-I, EMA on, 3 steps with R1 at step 2: G, EMA and D equal on both ranks."""
    (tmp_path / "worker.py").write_text(WORKER.format(root=ROOT))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "worker.py",
           "--preset", "tiny", "--data", str(imgs / "imgs.npy"), "--out", "run", "--root", "data", "--disc", "teacher",
           "--freeze", "gdd_i", "--iters", "3", "--ckpt_every", "3", "--ema_halflife_img", "100", "--eval_n", "4"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world 2 | global batch 8 = 2 x 4" in p.stdout
    r0, r1 = (torch.load(tmp_path / "run" / f"ckpt.pt.rank{r}", weights_only=True) for r in (0, 1))
    t = torch.load(tmp_path / "run" / "teacher.pt", weights_only=True)["ema"]
    for k in ("model", "ema", "disc"):
        for n in r0[k]:
            assert torch.equal(r0[k][n], r1[k][n]), (k, n)
    assert any(not torch.equal(r0["model"][n], t[n]) for n in t)  # it trained
    ck = torch.load(tmp_path / "run" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["rng"]["world"] == 2
