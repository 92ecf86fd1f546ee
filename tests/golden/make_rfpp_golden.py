"""Write tests/golden/rfpp_golden.pt from the official 2-rectified flow++ code (sangyun884/rfpp), for
tests/test_golden_rfpp.py.

Run once by a developer against a local checkout (see tests/golden/README.md):

    PYTHONPATH=<site with piq==0.8.0 tqdm> \
        python tests/golden/make_rfpp_golden.py --rfpp /path/to/rfpp [--out tests/golden/rfpp_golden.pt]

What runs (CPU, fp32):
- t_dist.py: sample_t (the U-shaped time draw: scipy's ExponentialPDF.rvs, mirrored with cat + randperm, mapped to
  [1e-5, 1 - 1e-5]) with its uniforms and permutation recorded; exponential_pdf and the distribution's numerical
  cdf on a grid (the law).
- train.py: train_rectified_flow itself, for exactly one backward pass of `--loss_type lpips-huber --lpips_divt
  --a 4` (the README's CIFAR-10 command), on one batch of fixed pairs, with the shared tiny velocity network (this
  project's common.py MLP on flattened 3x8x8 images, time_scale 1000, seeded random weights). Recorded: t (its own
  draw), the per-sample LPIPS, the loss value, dLoss/dv and the parameter gradients (a stand-in optimiser records
  them at step(); the loader then ends the loop). rank = 1 skips its logging, plots and checkpoints
  (tensorboardX, imported for them, is stubbed).
- piq 0.8.0 LPIPS(replace_pooling=True, reduction="none"), which rfpp uses (requirements.txt), directly, at a low
  resolution with full-width VGG16 features.
- generate.py: sample_ode_generative (Euler and Heun, sampler "new" and "default"), the way generate.py's sample()
  calls it (z1 = (1 - 1e-5) z, grid from 1 - 1e-5).
LPIPS weights: piq downloads ImageNet VGG16 and its LPIPS heads; here its `vgg16` is replaced by torchvision's
VGG16 feature layout (torchvision.models.vgg.make_layers) with seeded random weights, and the head download by
seeded random positive weights, and the test builds the same. The train-loop check uses the VGG16 layout with
1/8 of the channels (the 224x224 resize rfpp hard-codes makes a full VGG16 cost ~10 s per check on a CPU); the
direct LPIPS check uses the full widths at 32x32. The weights are regenerated from their seeds (the same
function in the test); the fixture keeps per-tensor checksums.
This file contains no official code: it imports it from the path given on the command line.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402  (the shared tiny network only)

SHAPE = (3, 8, 8)
B = 3
A = 4.0  # README: --a 4
VGG_FULL = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]  # VGG16 ("D")
VGG_SLIM = [c // 8 if c != "M" else c for c in VGG_FULL]
TAP_CH = lambda cfg: [cfg[i] for i in (1, 4, 8, 12, 16)]  # channels at relu1_2 ... relu5_3


def seeded_vgg(cfg, seed):
    """torchvision's VGG feature layout with He-scaled seeded normal weights (regenerated identically by the test)."""
    import torchvision
    feats = torchvision.models.vgg.make_layers(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in feats:
            if isinstance(m, nn.Conv2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * (2 / m.weight[0].numel()) ** 0.5)
                m.bias.copy_(0.01 * torch.randn(m.bias.shape, generator=g))
    return feats


def seeded_heads(cfg, seed):
    """LPIPS linear heads: positive weights, one per channel at each tap, shaped (1, C, 1, 1) as piq uses them."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(c, generator=g) * 2 / c).reshape(1, c, 1, 1) for c in TAP_CH(cfg)]


def checksums(feats):
    return [float(p.detach().double().sum()) for p in feats.parameters()]


def tiny_config():
    return C.net_config("mlp", dim=int(np.prod(SHAPE)), width=32, depth=2, time_channels=16, time_scale=1000.0)


def randomise(net, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return net


class VelocityAdapter(nn.Module):
    """rfpp's model(z_t, t, label) seat: v = MLP(z_t flattened, t); records t and dLoss/dv."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.config, self.ts, self.v_grad = mlp, {"label_dim": 0}, [], None

    def forward(self, x, t, label=None):
        self.ts.append(t.detach().clone().reshape(-1))
        v = self.mlp(x.flatten(1), t).reshape(x.shape)
        if v.requires_grad:
            v.register_hook(lambda g: setattr(self, "v_grad", g.detach().clone()))
        return v


class RecordingOptimiser:
    def __init__(self, params, lr):
        self.params, self.param_groups, self.grads = list(params), [{"lr": lr}], None

    def step(self):
        self.grads = [p.grad.detach().clone() for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rfpp", required=True, help="checkout of github.com/sangyun884/rfpp")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "rfpp_golden.pt"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.rfpp))
    import piq.perceptual  # rfpp's LPIPS (piq 0.8.0)
    import t_dist  # official
    import generate  # official
    tbx = types_module("tensorboardX")  # train.py imports it for rank-0 logging only (rank 1 here)
    tbx.SummaryWriter = None
    sys.modules.setdefault("tensorboardX", tbx)
    import train  # official (sets torch.manual_seed(0) on import)
    commit = subprocess.run(["git", "-C", args.rfpp, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    torch.set_num_threads(1)
    out = dict(repo="sangyun884/rfpp", commit=commit, shape=SHAPE, a=A, vgg_full=VGG_FULL, vgg_slim=VGG_SLIM,
               piq_version=getattr(piq, "__version__", "?"))

    # --- the U-shaped time law and rfpp's draw
    dist = t_dist.ExponentialPDF(a=0, b=1, name="ExponentialPDF")
    grid = np.linspace(0.0, 1.0, 2001)
    out["law"] = dict(grid=torch.from_numpy(grid), pdf=torch.from_numpy(t_dist.exponential_pdf(grid, A)),
                      cdf=torch.from_numpy(dist.cdf(grid, A)))
    n = 16
    np.random.seed(1)
    u = np.random.uniform(size=n)  # scipy's generic rvs: U = random_state.uniform(size), then ppf(U)
    torch.manual_seed(2)
    perm = torch.randperm(2 * n)
    np.random.seed(1)
    torch.manual_seed(2)
    t = t_dist.sample_t(dist, n, A)
    out["draw"] = dict(u=torch.from_numpy(u), perm=perm, t=t)

    # --- one rfpp training step: lpips-huber, lpips_divt
    mlp = randomise(C.build_net(tiny_config()), seed=21)
    out["state"] = {k: v.clone() for k, v in mlp.state_dict().items()}
    model = VelocityAdapter(mlp)
    vgg_slim, heads_slim = seeded_vgg(VGG_SLIM, 31), seeded_heads(VGG_SLIM, 32)
    out["slim"] = dict(vgg_seed=31, head_seed=32, checksums=checksums(vgg_slim))
    piq.perceptual.vgg16 = lambda *a, **k: types_ns(features=seeded_vgg(VGG_SLIM, 31))
    torch.hub.load_state_dict_from_url = lambda *a, **k: [h.clone() for h in heads_slim]
    lp_rec = []

    class RecordingLPIPS(piq.perceptual.LPIPS):
        def forward(self, x, y):
            d = super().forward(x, y)
            lp_rec.append(d.detach().clone())
            return d

    train.LPIPS = RecordingLPIPS
    g = torch.Generator().manual_seed(22)
    x = torch.rand(B, *SHAPE, generator=g) * 2 - 1
    z = torch.randn(B, *SHAPE, generator=g)
    arg = types_ns(effective_batchsize=B, batchsize=B, loss_type="lpips-huber", lpips_divt=True, compile=False, a=A,
                   label_dim=0, loss_scaling=1)
    opt = RecordingOptimiser(model.parameters(), 1e-4)
    loss_rec = []
    real_backward = torch.Tensor.backward

    def backward(self, *a, **k):
        loss_rec.append(self.detach().clone())
        return real_backward(self, *a, **k)

    torch.Tensor.backward = backward
    try:
        with tempfile.TemporaryDirectory() as d:
            train.train_rectified_flow(1, arg, model, opt, [(x, z, torch.zeros(B), torch.arange(B))], 1,
                                       torch.device("cpu"), 0, 0, d, 1e-4, 0, False, 4, 1, 10 ** 9)
    except StopIteration:  # the one-batch loader ends the loop after the first optimiser step
        pass
    finally:
        torch.Tensor.backward = real_backward
    assert len(loss_rec) == 1 and len(lp_rec) == 1 and opt.grads is not None and len(model.ts) == 1
    names = [k for k, _ in mlp.named_parameters()]
    out["step"] = dict(x=x, z=z, t=model.ts[0], lpips=lp_rec[0], loss=loss_rec[0], v_grad=model.v_grad,
                       grads=dict(zip(names, opt.grads)))

    # --- piq LPIPS directly, full-width VGG16 features, 32x32
    vgg_full, heads_full = seeded_vgg(VGG_FULL, 41), seeded_heads(VGG_FULL, 42)
    out["full"] = dict(vgg_seed=41, head_seed=42, checksums=checksums(vgg_full))
    piq.perceptual.vgg16 = lambda *a, **k: types_ns(features=seeded_vgg(VGG_FULL, 41))
    torch.hub.load_state_dict_from_url = lambda *a, **k: [h.clone() for h in heads_full]
    lp = piq.perceptual.LPIPS(replace_pooling=True, reduction="none")
    a01 = torch.rand(2, 3, 32, 32, generator=g).requires_grad_(True)
    b01 = torch.rand(2, 3, 32, 32, generator=g)
    d = lp(a01, b01)
    d.sum().backward()
    out["lpips"] = dict(a=a01.detach(), b=b01, d=d.detach(), grad_a=a01.grad.clone(),
                        heads=[h.flatten() for h in heads_full])
    out["slim"]["heads"] = [h.flatten() for h in heads_slim]

    # --- sampling: generate.py sample(): z1 = (1 - 1e-5) z, time schedule from 1 - 1e-5
    zs = torch.randn(B, *SHAPE, generator=g)
    runs = {}
    for solver, N, rule in [("euler", 1, "new"), ("euler", 2, "new"), ("euler", 4, "new"), ("heun", 3, "new"),
                            ("euler", 2, "default")]:
        model.ts.clear()
        traj, _ = generate.sample_ode_generative(model, z1=zs * (1 - 1e-5), N=N, use_tqdm=False, solver=solver,
                                                 sampler=rule)
        runs[f"{solver}/{N}/{rule}"] = dict(x=traj[-1], call_ts=[float(t[0]) for t in model.ts])
    out["sample"] = dict(z=zs, runs=runs)

    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) from sangyun884/rfpp@{commit}; "
          f"loss {loss_rec[0].item():.6f}, t {model_ts_str(out['step']['t'])}")


def types_module(name):
    import types
    return types.ModuleType(name)


def types_ns(**kw):
    import types
    return types.SimpleNamespace(**kw)


def model_ts_str(t):
    return ", ".join(f"{v:.4f}" for v in t.tolist())


if __name__ == "__main__":
    main()
