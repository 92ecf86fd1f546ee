"""`--compile` runs each method exactly as eager does (CPU inductor; one file, so the compiler warms up once).

- IMM's zero-gap invariant (r = t gives an MMD of exactly the same particles, loss 0) with dropout 0.3, the online
  pass compiled and the target pass eager under the replayed RNG state: inductor's own RNG draws other dropout masks
  (loss ~1 before the fix, measured); `common.maybe_compile` makes it draw as eager PyTorch does.
- The same replay on a bare network: compiled and eager passes from the same RNG state agree (the property sCM's
  JVP pass relies on), and the control without the setting disagrees.
- flow_map.py trains its diagonal forward through the compiled module (it built one and never used it before).
"""
import os
import sys

import pytest
import torch
import torch._inductor.config as inductor_config

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import flow_map as FM  # noqa: E402
import imm  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _reset_compile():
    fb = inductor_config.fallback_random
    yield
    inductor_config.fallback_random = fb
    torch._dynamo.reset()


def dropout_mlp(seed=0):
    torch.manual_seed(seed)
    net = C.build_net(C.net_config("mlp", num_times=2, time_scale=1000.0, dropout=0.3)).train()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    return net


def test_compiled_dropout_replays_eager_masks_and_control_does_not():
    net = dropout_mlp()
    x, t = torch.randn(16, 2), torch.rand(16)
    s = 0.5 * t

    def replay(online):
        with torch.random.fork_rng():
            a = online(x, t, s)
        with torch.no_grad():
            return (a - net(x, t, s)).abs().max().item()

    inductor_config.fallback_random = False
    assert replay(torch.compile(net)) > 1e-2  # control: inductor's RNG, other masks
    torch._dynamo.reset()
    assert replay(C.maybe_compile(net, True)) < 1e-5 and inductor_config.fallback_random
    assert C.maybe_compile(net, False) is net


def test_label_dropout_alone_sets_eager_random_numbers():
    """EDM's label dropout (a torch.rand in the embedding; an EDM pickle may have it with dropout 0) draws in the
    compiled graph too: without fallback_random a replayed eager pass dropped other labels (measured: outputs 2.6
    apart on this MLP, 2e-6 with the setting)."""
    net = C.build_net(C.net_config("mlp", label_dim=3, label_dropout=0.5))
    inductor_config.fallback_random = False
    C.maybe_compile(net, True)  # (lazy: nothing is compiled until it is called)
    assert inductor_config.fallback_random
    inductor_config.fallback_random = False
    C.maybe_compile(C.build_net(C.net_config("mlp", label_dim=3)), True)
    assert not inductor_config.fallback_random


def test_imm_zero_gap_with_dropout_is_zero_under_compile():
    M, B = 4, 16
    net = dropout_mlp(1)
    g = torch.Generator().manual_seed(2)
    x, eps = 0.5 * torch.randn(B, 2, generator=g), 0.5 * torch.randn(B, 2, generator=g)
    t = (0.1 + 0.8 * torch.rand(B // M, generator=g)).repeat_interleave(M)
    s = 0.5 * t
    cfg, env = imm.Config(M=M), C.Env(0, 1, 0, CPU, True, "fp32")
    inductor_config.fallback_random = False  # the setting a fresh process has
    L = imm.imm_loss(C.maybe_compile(net, True), net, x, eps, s, t.clone(), t, cfg, env)[0]
    assert abs(L.item()) < 1e-6, L.item()  # r = t: the same particles on both sides


def test_flow_map_trains_through_the_compiled_module(tmp_path, monkeypatch):
    calls = []

    class Counting(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.inner, self._orig_mod = torch.compile(m, backend="eager"), m

        def forward(self, *a):
            calls.append(1)
            return self.inner(*a)

    monkeypatch.setattr(C, "maybe_compile", lambda m, on: Counting(m) if on else m)
    FM.main(["--data", "8gaussians", "--width", "32", "--depth", "1", "--batch", "16", "--iters", "2",
             "--eval_n", "8", "--eval_steps", "1", "--out", str(tmp_path / "r"), "--compile"])
    assert len(calls) >= 2  # the diagonal forward of each step
