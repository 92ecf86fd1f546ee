"""Write tests/golden/imm_golden.pt from the official IMM code (lumalabs/imm), for tests/test_golden_imm.py.

Run once by a developer against a local checkout of the official repository (see tests/golden/README.md):

    PYTHONPATH=<site with omegaconf hydra-core timm einops> \
        python tests/golden/make_imm_golden.py --imm /path/to/lumalabs-imm [--out tests/golden/imm_golden.pt]

What runs: the official `training/preconds.py` IMMPrecond.forward (Simple-EDM and Euler-FM f_{s,t}, c_in, c_noise,
the second time s or t - s) and `generate_images.py` pushforward_generator_fn / restart_generator_fn, on CPU in
fp32 (their autocast is CUDA-only and off without mixed precision). The official U-Net is replaced by one shared
tiny network: this project's common.py MLP (width 32, depth 2) on images flattened to 8 numbers, with seeded
random weights. The official code hands the network c_in x and c_noise = 1000 t, so its copy is built with
time_scale 1; ours (tests) gets raw times and multiplies by its own time_scale. The official restart sampler
draws its re-noising with torch.randn_like; here IMMPrecond.add_noise is wrapped to take recorded noises instead
(the same draws are fed to imm.sample by the test), so both codes see identical randomness.
This file contains no official code: it imports it from the path given on the command line.
"""
import argparse
import os
import subprocess
import sys

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402  (the shared tiny network only)

SHAPE = (2, 2, 2)  # image shape (C, H, W); flattened to 8 for the MLP
B = 6
T_MIN, T_MAX, SIGMA_D = 0.006, 0.994, 0.5


def tiny_config(time_scale):
    return C.net_config("mlp", dim=8, width=32, depth=2, time_channels=16, num_times=2, time_scale=time_scale)


def randomise(net, seed):
    """Seeded non-trivial weights (the MLP's output layer is zero at init, which would make every check vacuous)."""
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


class OfficialAdapter(nn.Module):
    """The tiny MLP in the official U-Net's seat: model(c_in x, c_noise_t, c_noise_s, class_labels=None).
    Records its inputs so the test can compare c_in x and c_noise separately."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.calls = mlp, []

    def forward(self, x, noise_t, noise_s, class_labels=None, **kw):
        self.calls.append((x.detach().clone(), noise_t.detach().clone(), noise_s.detach().clone()))
        return self.mlp(x.flatten(1), noise_t, noise_s).reshape(x.shape)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--imm", required=True, help="checkout of github.com/lumalabs/imm")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "imm_golden.pt"))
    args = ap.parse_args()
    sys.path.insert(0, os.path.abspath(args.imm))
    import training.preconds as P  # official
    import generate_images as G  # official
    commit = subprocess.run(["git", "-C", args.imm, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(1)

    mlp = randomise(C.build_net(tiny_config(1.0)), seed=1).eval()
    state = {k: v.clone() for k, v in mlp.state_dict().items()}
    adapter = OfficialAdapter(mlp)

    def official_net(f_type, temb_type):
        P.GoldenTiny = lambda **kw: nn.Identity()  # placeholder; replaced by the adapter below
        net = P.IMMPrecond(img_resolution=SHAPE[1], img_channels=SHAPE[0], label_dim=0, mixed_precision=None,
                           noise_schedule="fm", model_type="GoldenTiny", sigma_data=SIGMA_D, f_type=f_type,
                           T=T_MAX, eps=T_MIN, temb_type=temb_type, time_scale=1000.0)
        net.model = adapter
        return net.eval()

    g = torch.Generator().manual_seed(2)
    # f_{s,t}: random (s <= t) pairs in [t_min, T] plus the extremes, s = t and the 2-step middle time
    t = torch.cat([torch.tensor([T_MAX, T_MAX, 7 / 12, 0.3]), T_MIN + (T_MAX - T_MIN) * torch.rand(B - 4, generator=g)])
    s = torch.cat([torch.tensor([T_MIN, 7 / 12, 7 / 12, 0.3]),
                   T_MIN + (t[4:] - T_MIN) * torch.rand(B - 4, generator=g)])
    x = 0.8 * torch.randn(B, *SHAPE, generator=g)
    fmap = {}
    for key, f_type, temb in [("simple_edm/s", "simple_edm", "identity"),
                              ("simple_edm/t_minus_s", "simple_edm", "stride"), ("euler_fm/s", "euler_fm", "identity")]:
        net = official_net(f_type, temb)
        adapter.calls.clear()
        with torch.no_grad():  # IMMPrecond.forward broadcasts the times against x itself: pass them as (B, 1, 1, 1)
            y = net(x, t.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1))
        (xin, cn_t, cn_s), = adapter.calls
        fmap[key] = dict(y=y, net_in=xin, c_noise_t=cn_t, c_noise_s=cn_s)

    # samplers: prior z (unit normal, latents = sigma_d z) and the restart noises, all recorded
    z = torch.randn(B, *SHAPE, generator=g)
    restart_noise = torch.randn(3, B, *SHAPE, generator=g)  # N = 4 restart needs 3 re-noisings
    net = official_net("simple_edm", "identity")
    orig_add_noise = net.add_noise
    used = []

    def add_noise_recorded(y, t, noise=None):  # the official add_noise, fed the recorded noise
        n = restart_noise[len(used)]
        used.append(1)
        return orig_add_noise(y, t, noise=SIGMA_D * n.to(y.dtype))

    net.add_noise = add_noise_recorded
    runs = {}
    for name, fn in [("pushforward", G.pushforward_generator_fn), ("restart", G.restart_generator_fn)]:
        for N, disc in [(1, None), (2, None), (4, "uniform"), (4, "edm")]:
            if name == "restart" and N == 1:
                continue  # identical to pushforward N = 1
            mid = [1.4] if N == 2 else None  # configs/cifar10_generate_images.yaml 2_steps: mid_nt [1.4]
            used.clear()
            with torch.no_grad():
                out = fn(net, SIGMA_D * z, None, discretization=disc, mid_nt=mid, num_steps=N if disc else None)
            runs[f"{name}/{N}/{disc or 'uniform'}"] = out.float()
            assert len(used) == (N - 1 if name == "restart" else 0)

    torch.save(dict(repo="lumalabs/imm", commit=commit, shape=SHAPE, state=state, x=x, s=s, t=t, fmap=fmap,
                    z=z, restart_noise=restart_noise, samples=runs), args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) from lumalabs/imm@{commit}")


if __name__ == "__main__":
    main()
