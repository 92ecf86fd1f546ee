"""Golden cross-check of imm.py against the official IMM code (lumalabs/imm, inference code).

The fixture tests/golden/imm_golden.pt was written by tests/golden/make_imm_golden.py, which ran the official
IMMPrecond.forward (training/preconds.py) and pushforward_generator_fn / restart_generator_fn (generate_images.py)
with one shared tiny network (common.py's MLP, seeded random weights) in the U-Net's seat. Here imm.py's f_map
and sample run the same network with the same weights and the same noises and must return the same numbers.
Conventions agree (x_t = (1 - t) x + t eps, eps ~ N(0, 0.5^2), t = 1 noise; f_{s,t} maps t to s), so nothing is
converted. Two plumbing differences, neither numerical: the official network is handed c_noise = 1000 t (its copy
of the MLP has time_scale 1) while ours gets raw t and multiplies by the time_scale that imm.net_dict sets; the
official sampler has no clamp (the decoder clips later), so ours is called with clip=False.
"""
import os
import types

import pytest
import torch
import torch.nn as nn

import common as C
import imm

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "imm_golden.pt")
ENV = types.SimpleNamespace(device=torch.device("cpu"), precision=None)
# fp32 on both sides; the official samplers keep x in float64 between steps and apply the Simple-EDM
# coefficients in float64, imm.py in float32: measured differences are ~1e-7.
TOL_F = 1e-6  # f_{s,t}, c_in x, c_noise (relative for c_noise ~ 1e3)
TOL_SAMPLE = 5e-6  # samplers (up to 4 chained network calls)


@pytest.fixture(scope="module")
def gold():
    return torch.load(FIX, weights_only=False)


class Flat(nn.Module):
    """The shared tiny MLP on flattened images, recording what it is fed (c_in x and c_noise = time_scale * t)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.calls = mlp, []

    def forward(self, x, t, s):
        tau = self.mlp.config["time_scale"]
        self.calls.append((x.detach().clone(), tau * t.detach().reshape(-1), tau * s.detach().reshape(-1)))
        return self.mlp(x.flatten(1), t, s).reshape(x.shape)


def our_net(gold):
    # imm.py's own network dict for points (num_times 2, time_scale 1000 = c_noise of IMM Eq. 5), resized to the
    # fixture's tiny MLP; the weights are the fixture's
    nd = {**imm.net_dict(imm.Config(), types.SimpleNamespace(kind="points")), "dim": 8, "width": 32, "depth": 2,
          "time_channels": 16}
    mlp = C.build_net(nd)
    C.load_state_strict(mlp, gold["state"])
    return Flat(mlp.eval())


class FixedRNG:
    """Stands in for common.IndexRNG: the prior noise first, then the recorded restart noises, in order."""

    def __init__(self, z, later):
        self.gens, self.queue = [None] * len(z), [z, *later]

    def randn(self, *shape):
        out = self.queue.pop(0)
        assert tuple(out.shape) == shape
        return out.clone()


@pytest.mark.parametrize("key", ["simple_edm/s", "simple_edm/t_minus_s", "euler_fm/s"])
def test_f_map_matches_official_precond(gold, key):
    """IMM Eq. 4/5 (preconds.py IMMPrecond.forward): f_{s,t}(x_t), the network input c_in(t) x_t and c_noise(t),
    c_noise(s)."""
    param, second = key.split("/")
    cfg = imm.Config(param=param, second_time=second)
    net, ref = our_net(gold), gold["fmap"][key]
    y = imm.f_map(net, gold["x"], gold["s"], gold["t"], cfg, ENV)
    (xin, cn_t, cn_s), = net.calls
    assert (y - ref["y"]).abs().max() < TOL_F
    assert (xin - ref["net_in"]).abs().max() < TOL_F
    assert ((cn_t - ref["c_noise_t"]) / ref["c_noise_t"]).abs().max() < TOL_F
    assert ((cn_s - ref["c_noise_s"]) / ref["c_noise_s"].clamp(min=1.0)).abs().max() < TOL_F


@pytest.mark.parametrize("key", ["pushforward/1/uniform", "pushforward/2/uniform", "pushforward/4/uniform",
                                 "pushforward/4/edm", "restart/2/uniform", "restart/4/uniform", "restart/4/edm"])
def test_samplers_match_official(gold, key):
    """IMM Alg. 2 (pushforward) and the restart sampler (generate_images.py), grids: N = 1, N = 2 with
    eta_mid 1.4 (configs/cifar10_generate_images.yaml), N = 4 uniform and edm."""
    sampler, N, schedule = key.split("/")
    cfg = imm.Config(sampler=sampler, schedule=schedule)
    rng = FixedRNG(gold["z"], list(gold["restart_noise"]))
    x = imm.sample(our_net(gold), rng, tuple(gold["shape"]), int(N), cfg, ENV, clip=False)
    assert len(rng.queue) == 3 - (int(N) - 1 if sampler == "restart" else 0)  # every recorded noise used once
    assert (x - gold["samples"][key]).abs().max() < TOL_SAMPLE
