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

A second fixture, meanflow_unet_golden.pt (--out-unet), runs the same forward_with_loss + backward on the
official network in its own seat: py-meanflow's SongUNet (`meanflow/models/unet.py`, the v0 configuration of
`models/model_configs.py`, augment_dim 6 as instantiate_model sets it for --use_edm_aug) at a tiny size
(resolution 8, model_channels 4, channel_mult [1, 2], one block per level, attention at 4x4) with dropout 0.3 in
train mode, fed EDM augmentation labels (drawn by this project's common.augment with flow_map.MEANFLOW_AUGMENT,
given to both sides as they are), batch 4, in float64. Its weights are the constructor's plus N(0, 0.1^2) offsets,
stored in float32 (exact in float64). It stores the global RNG state after the official draws of e, t and r:
the dropout masks inside the JVP are the next draws, so the test sets that state and flow_map.per_sample_loss
(which draws nothing before its network call) gets the same masks in the same order.
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
import common as C  # noqa: E402  (the shared tiny network; common.augment draws the U-Net case's labels)
from flow_map import MEANFLOW_AUGMENT  # noqa: E402  (py-meanflow's EDM augmentation options, augment_dim 6)

SHAPE = (2, 2, 2)
B = 8
SAMPLERS = {  # meanflow/scripts/cifar10_v0.sh and cifar10_v1.sh
    "v0": dict(P_mean_t=-2.0, P_std_t=2.0, P_mean_r=-2.0, P_std_r=2.0),
    "v1": dict(P_mean_t=-0.6, P_std_t=1.6, P_mean_r=-4.0, P_std_r=1.6),
}
UNET = dict(img_resolution=8, channel_mult=[1, 2], model_channels=4, num_blocks=1, attn_resolutions=[4],
            augment_dim=6, dropout=0.3)  # on top of models/model_configs.py MODEL_CONFIGS["unet"]
B_UNET = 4
AUG_P = 0.5


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
    ap.add_argument("--out-unet", default=os.path.join(ROOT, "tests", "golden", "meanflow_unet_golden.pt"))
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
    unet_case(args.out_unet, commit)


def unet_case(path, commit):
    """forward_with_loss + backward (v0, float64) on the official SongUNet with dropout and augmentation labels."""
    from models.meanflow import MeanFlow  # official
    from models.model_configs import MODEL_CONFIGS  # official
    from models.time_sampler import sample_two_timesteps  # official
    from models.unet import SongUNet  # official
    kw = {**MODEL_CONFIGS["unet"], **UNET}
    torch.manual_seed(7)
    net = SongUNet(**kw)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    state = {k: v.clone() for k, v in net.state_dict().items()}  # float32
    x = torch.rand(B_UNET, 3, kw["img_resolution"], kw["img_resolution"], generator=g) * 2 - 1
    x, aug = C.augment(x, AUG_P, 9, **MEANFLOW_AUGMENT)
    assert int((aug[:, 1:] != 0).any(1).sum()) >= 2, "want augmentation labels on several rows; pick another seed"
    x, aug = x.double(), aug.double()
    a = types.SimpleNamespace(tr_sampler="v0", ratio=0.75, norm_p=0.75, norm_eps=1e-3, ema_decay=0.9999, ema_decays=[],
                              **SAMPLERS["v0"])
    torch.set_default_dtype(torch.float64)  # the official time sampler draws in the default dtype
    try:
        model = MeanFlow(SongUNet, a, kw)
        model.net.load_state_dict(state)
        model.double().train()
        seed = 12
        torch.manual_seed(seed)
        e = torch.randn_like(x)
        t, r = sample_two_timesteps(a, B_UNET, torch.device("cpu"))
        rng = torch.get_rng_state()  # what the dropout masks are drawn from
        assert 1 <= int((t == r).sum()) <= B_UNET - 2, "want r = t rows and >= 2 r < t rows; pick another seed"
        torch.manual_seed(seed)
        loss = model.forward_with_loss(x, aug)
        loss.backward()
    finally:
        torch.set_default_dtype(torch.float32)
    params = dict(model.net.named_parameters())
    flat = lambda d: torch.cat([v.detach().flatten() for v in d.values()])  # noqa: E731  (one tensor: a small file)
    out = dict(repo="Gsunshine/py-meanflow", commit=commit, config=kw, aug_p=AUG_P,
               keys=list(state), shapes=[tuple(v.shape) for v in state.values()], state=flat(state),
               x=x, aug=aug, e=e, t=t, r=r, rng=rng, loss=loss.detach(),
               grad_keys=list(params), grads=flat({k: p.grad for k, p in params.items()}).float())
    torch.save(out, path)
    print(f"wrote {path} ({os.path.getsize(path) / 1024:.0f} KiB): SongUNet, dropout {kw['dropout']}, augment_dim "
          f"{kw['augment_dim']}; loss {loss.item():.10f}, r = t in {int((t == r).sum())}/{B_UNET} rows")


if __name__ == "__main__":
    main()
