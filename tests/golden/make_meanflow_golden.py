"""Write tests/golden/meanflow_golden.pt from the official MeanFlow code (Gsunshine/py-meanflow), for
tests/test_golden_meanflow.py.

Run once by a developer against a local checkout of the official repository (see tests/golden/README.md):

    python tests/golden/make_meanflow_golden.py --meanflow /path/to/py-meanflow [--out tests/golden/meanflow_golden.pt]

What runs (CPU, fp32; the official autocast is CUDA-only): `meanflow/models/time_sampler.py` sample_two_timesteps
(v0 and v1, with the cifar10_v0.sh / cifar10_v1.sh parameters), `meanflow/models/meanflow.py`
MeanFlow.forward_with_loss (JVP target, adaptive weight p = 0.75, c = 1e-3) with its parameter gradient, and
MeanFlow.sample (1 step). The official U-Net is replaced by one shared tiny network, this project's common.py
MLP (width 32, depth 2, raw times) on images flattened to 8 numbers, with seeded random weights F(x; s, d).
py-meanflow has data at t = 0 and unit noise at t = 1 and calls net(z, (t, t - r)); flow_map.py has noise at
t = 0 (sigma0 = 1) and calls F(x; s, t - s), and flow_map.meanflow_to_flow_map says
u(z, t, r) = -phi(z, 1 - t, 1 - r). So the official code gets the adapter net(z, (t, h)) = -F(z; 1 - t, h): the
same function seen from the other convention. The global-RNG draws of the official code (noise e, the two
normals, the mask uniforms) are reproduced by re-seeding and stored, so the test can feed the same numbers to
flow_map.py.
This file contains no official code: it imports it from the path given on the command line.
"""
import argparse
import os
import subprocess
import sys
import types

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402  (the shared tiny network only)

SHAPE = (2, 2, 2)
B = 8
SAMPLERS = {  # meanflow/scripts/cifar10_v0.sh and cifar10_v1.sh
    "v0": dict(P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0),
    "v1": dict(P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6),
}


def tiny_config():
    return C.net_config("mlp", dim=8, width=32, depth=2, time_channels=16, num_times=2, time_scale=1.0)


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


STATE = randomise(C.build_net(tiny_config()), seed=3).state_dict()


class MeanFlowAdapter(nn.Module):
    """The official network seat: net(z, (t, h), aug_cond) = -F(z; 1 - t, h) with the shared tiny MLP F."""

    def __init__(self, **unused):
        super().__init__()
        self.mlp = C.build_net(tiny_config())
        self.mlp.load_state_dict(STATE)

    def forward(self, z, times, aug_cond=None):
        t, h = times
        return -self.mlp(z.flatten(1), 1 - t, h).reshape(z.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--meanflow", required=True, help="checkout of github.com/Gsunshine/py-meanflow")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "meanflow_golden.pt"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(args.meanflow), "meanflow"))
    from models.meanflow import MeanFlow  # official
    from models.time_sampler import sample_two_timesteps  # official
    commit = subprocess.run(["git", "-C", args.meanflow, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    torch.set_num_threads(1)
    out = dict(repo="Gsunshine/py-meanflow", commit=commit, shape=SHAPE, state=STATE)

    # time sampler: the draws (two normals, then the mask uniforms) and the official (t, r)
    for name, p in SAMPLERS.items():
        a = types.SimpleNamespace(tr_sampler=name, ratio=0.75, **p)
        torch.manual_seed(10)
        draws = (torch.randn(64), torch.randn(64), torch.rand(64))
        torch.manual_seed(10)
        t, r = sample_two_timesteps(a, 64, torch.device("cpu"))
        out[f"times/{name}"] = dict(n_t=draws[0], n_r=draws[1], u=draws[2], t=t, r=r)

    # the training loss (v0, the paper's CIFAR-10 setting) and its gradient
    a = types.SimpleNamespace(tr_sampler="v0", ratio=0.75, norm_p=0.75, norm_eps=1e-3, ema_decay=0.9999, ema_decays=[],
                              **SAMPLERS["v0"])
    model = MeanFlow(MeanFlowAdapter, a, {})
    g = torch.Generator().manual_seed(4)
    x = 0.7 * torch.randn(B, *SHAPE, generator=g)
    seed = 5
    torch.manual_seed(seed)
    e = torch.randn_like(x)
    n_t, n_r, u = torch.randn(B), torch.randn(B), torch.rand(B)
    torch.manual_seed(seed)
    torch.randn_like(x)
    t, r = sample_two_timesteps(a, B, torch.device("cpu"))
    assert 0 < int((t == r).sum()) < B, "want both r = t and r < t rows; pick another seed"
    torch.manual_seed(seed)
    loss = model.forward_with_loss(x, None)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.net.mlp.named_parameters()}
    out["loss"] = dict(x=x, e=e, n_t=n_t, n_r=n_r, u=u, t=t, r=r, loss=loss.detach(), grads=grads)

    # 1-step sampler
    torch.manual_seed(6)
    e1 = torch.randn(B, *SHAPE)
    torch.manual_seed(6)
    with torch.no_grad():
        z0 = model.sample((B, *SHAPE), net=model.net, device=torch.device("cpu"))
    out["sample"] = dict(e=e1, x=z0)

    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) from Gsunshine/py-meanflow@{commit}; "
          f"loss {loss.item():.6f}, r = t in {int((t == r).sum())}/{B} rows")


if __name__ == "__main__":
    main()
