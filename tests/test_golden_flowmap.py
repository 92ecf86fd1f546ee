"""Golden cross-check of flow_map.py's self-distillation losses against the authors' JAX code.

The fixture tests/golden/flowmap_golden.npz was written by tests/golden/make_flowmap_golden.py, which runs the
official functions of nmboffi/flow-maps (Boffi, Albergo, Vanden-Eijnden, arXiv 2505.18825; `py/common/losses.py`
`diagonal_term`, `lsd_term`, `psd_term`, `esd_term`, `setup_loss`; `py/common/flow_map.py` `batch_sample`) in
float64 on a tiny `FlowMapMLP` with fixed random weights (commit and file hashes in tests/golden/README.md). This
test needs no JAX: it rebuilds the same MLP in torch and feeds it to flow_map.py's own functions.

Conventions. Both codes put noise at t = 0 and data at t = 1 (I_t = alpha_t x0 + beta_t x1, linear or trig) and
write X(s, t, x) = x + (t - s) phi(s, t, x) with phi = sigma0 F(x / sigma0, ...), so no time or interpolant
conversion is needed. Two differences are bridged here, not in flow_map.py:
- the official MLP takes the raw times (s, t), flow_map.py calls its network as net(x / sigma0, s, t - s): the
  adapter below feeds the MLP (s, s + (t - s), x / sigma0), the same function (t differs by one rounding);
- the official MLP's learned weight (`FlowMapMLP.calc_weight`) is the constant 1.0, so each official term is
  exp(-1) l + 1: our l goes through flow_map.learned_weight(l, w = 1) before the comparison.
The official gradient is taken with respect to `params` with `teacher_params` a separate (equal) argument, as in
its training step, so it is the stop-gradient gradient, not the gradient of the printed loss.
"""
import math
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C
import flow_map as fm

G = np.load(os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "flowmap_golden.npz"))
SIGMA0 = 0.5  # the official MLP's `rescale`
LAYERS = sorted({k.split("/")[1] for k in G.files if k.startswith("p/")}, key=lambda n: int(n.split("_")[1]))
TERMS = ["diag", "lsd", "psd_uniform", "psd_midpoint", "esd_full", "esd_convex",
         "diag_trig", "lsd_trig", "psd_uniform_trig", "esd_full_trig"]
# Tolerances (max abs error; l up to ~8, parameter gradients up to ~0.8). Measured on CPU, torch 2.14: float64
# <= 3e-15 (l) and 1.3e-15 (gradients); fp32 terms <= 1.3e-6 (l) and 1.7e-7 (gradients); fp32 batch loss and its
# gradient <= 1.7e-7; fp32 sampler <= 3.8e-7.
TOL64 = 1e-12  # float64 terms and gradients against the float64 fixture
TOL32_L, TOL32_G = 1e-5, 2e-6  # fp32 terms, fp32 parameter gradients
TOL32_LOSS = 2e-6  # fp32 batch loss (per_sample_loss) and its gradient
TOL32_SAMPLE = 5e-6  # fp32 sampler


class BoffiMLP(nn.Module):
    """The official FlowMapMLP (network_utils.py: Dense-GELU stack, jax.nn.gelu = tanh approximation) behind
    flow_map.py's call convention net(x / sigma0, s, t - s): the MLP sees concat(s, t, x / sigma0)."""

    def __init__(self, dtype):
        super().__init__()
        shapes = [G[f"p/{n}/kernel"].shape for n in LAYERS]
        self.lin = nn.ModuleList(nn.Linear(i, o, dtype=dtype) for i, o in shapes)
        with torch.no_grad():
            for n, lin in zip(LAYERS, self.lin):
                lin.weight.copy_(torch.from_numpy(G[f"p/{n}/kernel"]).T)  # flax kernel is (in, out)
                lin.bias.copy_(torch.from_numpy(G[f"p/{n}/bias"]))

    def forward(self, x, s, d):
        h = torch.cat([s[:, None], (s + d)[:, None], x], 1)
        for k, lin in enumerate(self.lin):
            h = lin(h)
            h = F.gelu(h, approximate="tanh") if k < len(self.lin) - 1 else h
        return h


def arr(key, dtype):
    return torch.from_numpy(np.asarray(G[key])).to(dtype)


def grad_err(net, prefix):
    """Max abs difference between our parameter gradients and the stored official ones."""
    return max(max((lin.weight.grad.double().T - torch.from_numpy(G[f"{prefix}/{n}/kernel"])).abs().max().item(),
                   (lin.bias.grad.double() - torch.from_numpy(G[f"{prefix}/{n}/bias"])).abs().max().item())
               for n, lin in zip(LAYERS, net.lin))


def our_term(name, phi, x0, x1, s, t, h):
    """flow_map.py's term for the official function `name`, wired as per_sample_loss wires it."""
    ip = "trig" if name.endswith("_trig") else "linear"
    kind = name.removesuffix("_trig")
    if kind == "diag":
        It, dIt = fm.interpolate(x0, x1, t, ip)
        return fm.diagonal_term(phi, It, dIt, t)
    Is, _ = fm.interpolate(x0, x1, s, ip)
    if kind == "lsd":
        return fm.lsd_term(phi, lambda tt, y: phi(y, tt, tt), Is, s, t)  # teacher: the online phi(t, t, .)
    if kind.startswith("psd"):
        return fm.psd_term(phi, Is, s, t, h if kind == "psd_uniform" else torch.full_like(s, 0.5))
    return fm.esd_term(phi, Is, s, t, kind.split("_")[1])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("name", TERMS)
def test_term_and_gradient_match_official(name, dtype):
    """Per-sample LSD / PSD / ESD / diagonal terms and the parameter gradient of their mean."""
    net = BoffiMLP(dtype)
    phi = fm.net_phi(net, SIGMA0)
    x0, x1, s, t, h = (arr(k, dtype) for k in ("x0", "x1", "s", "t", "h"))
    l = our_term(name, phi, x0, x1, s, t, h)
    term = fm.learned_weight(l, torch.ones_like(l))  # the official MLP's weight is the constant 1
    term.mean().backward()
    official = torch.from_numpy(G[f"term/{name}"])
    tol_l, tol_g = (TOL64, TOL64) if dtype == torch.float64 else (TOL32_L, TOL32_G)
    err_l = (l.detach().double() - math.e * (official - 1)).abs().max().item()  # l = e (term - 1)
    err_term = (term.detach().double() - official).abs().max().item()
    err_g = grad_err(net, f"grad/{name}")
    assert err_l < tol_l and err_term < tol_l, (name, err_l, err_term)
    assert err_g < tol_g, (name, err_g)


@pytest.mark.parametrize("name", ["lsd", "psd_uniform", "psd_midpoint", "esd_full", "esd_convex"])
def test_batch_loss_matches_official_setup_loss(name, monkeypatch):
    """The training path in fp32: per_sample_loss (diagonal rows first, 75% of 16, learned weight) and its mean
    against the official setup_loss and its gradient (float64 fixture)."""
    mode, kind = (name.split("_") + [None])[:2]
    cfg = fm.Config(mode=mode, sigma0=SIGMA0, diag_frac=0.75, learned_weight=True,
                    **({"psd_type": kind} if mode == "psd" else {"esd_stopgrad": kind} if mode == "esd" else {}))
    x0, x1, s, t, h = (arr(f"full/{k}", torch.float32) for k in ("x0", "x1", "s", "t", "h"))
    nd = fm.diag_rows(len(x0), cfg.diag_frac)
    assert nd == int(G["full/diag_bs"])
    if kind == "uniform":  # per_sample_loss draws h ~ U(0, 1) for the off-diagonal rows: hand it the stored draws
        calls = []
        monkeypatch.setattr(fm.torch, "rand_like", lambda v: calls.append(1) or h[nd:].to(v))
    net = BoffiMLP(torch.float32)
    env = C.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"), is_main=True, precision="fp32")
    head = lambda s_, t_: torch.ones_like(s_)  # FlowMapMLP.calc_weight = 1.0
    lw, _ = fm.per_sample_loss(net, head, None, x0, x1, s, t, nd, cfg, env)
    L = lw.mean()
    L.backward()
    if kind == "uniform":
        assert calls == [1]
    err = abs(L.item() - float(G[f"full/{name}/loss"]))
    err_g = grad_err(net, f"full/{name}/grad")
    assert err < TOL32_LOSS and err_g < TOL32_LOSS, (name, err, err_g)


@pytest.mark.parametrize("frac", [0.75, 0.5, 0.29, 0.35])  # 0.29 x 100 = 28.999... -> 28 rows, as official
def test_diagonal_share_matches_official_split(frac):
    """diag_rows against loss_args._get_diag_offdiag_bs: max(1, int(B * diag_fraction)), 12 batch sizes."""
    ours = [fm.diag_rows(int(b), frac) for b in G["split/bs"]]
    assert ours == G[f"split/diag_bs_{round(frac * 100)}"].tolist(), frac


@pytest.mark.parametrize("N", [1, 2, 4])
def test_sampler_matches_official_batch_sample(N):
    """flow_map.sample on the grid k/N (fp32) against the official batch_sample (linspace(0, 1, N + 1))."""
    x0 = arr("sample/x0", torch.float32)

    class StoredNoise:  # sample() draws sigma0 * rng.randn(n, *shape): hand it the stored x0
        gens = [None] * len(x0)

        def randn(self, n, *shape):
            return x0 / SIGMA0

    env = C.Env(rank=0, world=1, local_rank=0, device=torch.device("cpu"), is_main=True, precision="fp32")
    x = fm.sample(BoffiMLP(torch.float32), StoredNoise(), (2,), N, fm.Config(sigma0=SIGMA0), env)
    assert (x.double() - torch.from_numpy(G[f"sample/N{N}"])).abs().max().item() < TOL32_SAMPLE


def test_default_pair_order_is_the_official_one():
    """The official off-diagonal pairs (loss_args._sample_triangle at this commit: min/max of two uniforms) all
    have s <= t, as flow_map.py's default pair_order="forward" draws them (Keely-Ai forks comment the sort out)."""
    ps, pt = G["pairs/s"], G["pairs/t"]
    assert (ps < pt).all() and len(np.unique(ps)) == len(ps)
    torch.manual_seed(0)
    s, t, nd = fm.sample_times(64, fm.Config(mode="lsd", diag_frac=0.75), torch.device("cpu"))
    assert (s[nd:] <= t[nd:]).all()
