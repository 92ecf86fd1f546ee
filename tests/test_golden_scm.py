"""Golden cross-check of scm.py's sCT / sCD step against NVlabs/FastGen's sCM
(fastgen/methods/consistency_model/sCM.py).

The fixture tests/golden/scm_golden.pt was written by tests/golden/make_scm_golden.py, which ran FastGen's
SCMModel._compute_scm_loss (its _jvp and _scm_pred_to_loss) and .mean().backward() with the shared tiny networks
(common.py MLPs with seeded random weights: student F, teacher F for sCD, and a WeightHead for w(t)).

Conventions. Both codes use TrigFlow x_t = cos t x0 + sin t z, z ~ N(0, sigma_d^2), and F(x_t / sigma_d, t); FastGen
starts from an EDM sigma and sets t = atan2(sigma, sigma_d), which is scm.t_of. FastGen's loss is
e^{-logvar}/D ||F - sg F - g||^2 + logvar with logvar = -w(t) (scm.py: e^{w}/D ||.||^2 - w); the script turned
off FastGen's extra 1/sigma prior weight and second 1/D (prior_weighting_enabled, divide_x_0_spatial_dim: its
defaults, not the paper's Eq. 8). FastGen's JVP output is dF/dt along the path times cos t sin t; scm.jvp_F's J
carries one more sigma_d (its tangent convention, scm.jvp_F), so J / sigma_d is compared. The loss's value
is mean(e^w ||g||^2 / D - w) while its gradient is -2 e^w / (B D) g through F only (stop-gradients), so the
gradient with respect to F, the parameter gradients of F and of the weight head are compared, not just values.
"""
import os
import types

import pytest
import torch
import torch.nn as nn

import common as C
import scm

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "scm_golden.pt")
ENV = types.SimpleNamespace(device=torch.device("cpu"), precision=None)
CASES = ["sct/l2/r0.3", "sct/rms/r1", "scd/l2/r1", "scd/rms/r0.5"]
# FastGen computes t in float64 and its loss in float64; scm.py computes both in float32 (the network is fp32 in
# both). Tangent entries are O(1) before normalisation (up to ~1e2 for the raw JVP at large t).
TOL_X = 1e-6  # x_t, dx_t/dt (sCT), relative to max(1, |.|)
TOL_JVP = 1e-5  # J / sigma_d and dx_t/dt (sCD), relative to max(1, |.|)
TOL_LOSS = 1e-5  # per-sample ||g||^2 / D and the batch loss, relative to max(1, |.|)
TOL_GRAD = 1e-5  # dL/dF and the parameter gradients, relative to max(1, max |grad|)


@pytest.fixture(scope="module")
def gold():
    return torch.load(FIX, weights_only=False)


def close(a, b, tol):
    b = b.to(a.dtype)
    return ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() < tol


class Flat(nn.Module):
    """The shared tiny MLP on flattened images; records dL/dF on the grad pass."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp, self.F_grad = mlp, None

    def forward(self, u, t):
        F = self.mlp(u.flatten(1), t).reshape(u.shape)
        if F.requires_grad:
            F.register_hook(lambda g: setattr(self, "F_grad", g.detach().clone()))
        return F


def nets(gold):
    cfg = scm.Config(width=32, depth=2)
    nd = {**scm.net_dict(cfg, types.SimpleNamespace(kind="points")), "dim": 8, "time_channels": 16}
    student, teacher = C.build_net(nd), C.build_net(nd)
    C.load_state_strict(student, gold["student"]), C.load_state_strict(teacher, gold["teacher"])
    head = C.WeightHead(1, 128, 1.0)  # as scm.train builds it for sct/scd
    C.load_state_strict(head, gold["head"])
    return Flat(student), head, Flat(teacher).eval()


@pytest.mark.parametrize("case", CASES)
def test_tangent_loss_and_gradients_match_fastgen(gold, case):
    """sCM Alg. 1 / Eq. 6-8: x_t, dx_t/dt (sCT velocity, sCD teacher), the JVP, the warmed-up tangent g and its
    normalisation (L2 or FastGen's RMS), the weighted loss, dL/dF and the parameter gradients of F and w."""
    ref = gold[case]
    mode, norm, _ = case.split("/")
    net, head, teacher = nets(gold)
    model = scm.Student(net, head)
    cfg = scm.Config(sigma_d=gold["sigma_d"], c=0.1, tangent_norm=norm, H=gold["H"])
    sd = cfg.sigma_d
    t = scm.t_of(ref["sigma"].float(), sd)
    assert (t.double() - ref["t_hat"]).abs().max() < 1e-6
    r = scm.warmup_r(ref["iteration"], cfg.H)
    assert r == pytest.approx(ref["r"], abs=1e-12)

    # pieces: x_t, dx_t/dt, the JVP (FastGen _jvp = J / sigma_d), then g's per-sample squared RMS (FastGen's
    # unweighted loss, mean((F - sg F - g)^2) = |g|^2 / D)
    x0, z = ref["x0"], ref["z"]
    x_t = scm.interpolate(x0, z, t)
    assert close(x_t, ref["x_t_hat"], TOL_X)
    with torch.no_grad():
        dxdt = scm.velocity(x0, z, t) if mode == "sct" else sd * scm.F_net(teacher, x_t, t, sd)
        assert close(dxdt, ref["dxt_dt"], TOL_X if mode == "sct" else TOL_JVP)
        _, J = scm.jvp_F(net, x_t, t, dxdt, sd)
        assert close(J / sd, ref["F_jvp"], TOL_JVP)
        _, g_raw = scm.tangent(net, x_t, t, dxdt, r, sd)
        g = scm.normalise(g_raw, cfg.c, cfg.tangent_norm)
        assert close(g.square().flatten(1).mean(1), ref["unweighted"], TOL_LOSS)

    # the full step as training runs it, and its gradients
    L, _ = scm.cm_step_loss(model, net, teacher if mode == "scd" else None, x0, z, t, r, cfg, ENV)
    L.backward()
    assert close(L.detach(), ref["loss_mean"], TOL_LOSS)
    assert close(net.F_grad, ref["F_grad"], TOL_GRAD)
    for k, p in net.mlp.named_parameters():
        assert close(p.grad, ref["grads"][k], TOL_GRAD), k
    for k, p in head.named_parameters():
        assert close(p.grad, ref["head_grads"][k], TOL_GRAD), k
