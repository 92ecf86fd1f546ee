"""Golden cross-check of flow_map.py --mode meanflow against the official MeanFlow code (Gsunshine/py-meanflow).

The fixture tests/golden/meanflow_golden.pt was written by tests/golden/make_meanflow_golden.py: the official
sample_two_timesteps (v0, v1), MeanFlow.forward_with_loss (loss and parameter gradient) and MeanFlow.sample, with
one shared tiny network F(x; s, d) (common.py's MLP, seeded random weights) in the U-Net's seat.

Convention conversion (flow_map.meanflow_to_flow_map): py-meanflow has data at t = 0 and unit noise at t = 1, with
u(z, t, r) for r <= t; flow_map.py has noise at 0 (sigma0 = 1 here, as py-meanflow) and data at 1, with phi(x, s, t),
and u(z, t_MF, r_MF) = -phi(z, 1 - t_MF, 1 - r_MF). So the official side was given net(z, (t, h)) = -F(z; 1 - t, h),
and flow_map.py uses F directly; the noise e is our x0 and the data x our x1; our (s, t) = (1 - t_MF, 1 - r_MF).
The official logit-normal LN(P_mean, P_std) on t_MF = sigmoid(P_mean + P_std n) is our LN(-P_mean, P_std) on
s = 1 - t_MF = sigmoid(-P_mean + P_std (-n)): so our sampler is fed the official normals with their sign flipped
(the mask uniforms as they are). The MeanFlow loss's gradient is not the gradient of its printed value (the
target is a stop-gradient and the adaptive weight is sg(l + c)^p), so the parameter gradient is compared too.

tests/golden/meanflow_unet_golden.pt (same script) has the loss and gradient of the official network itself,
py-meanflow's SongUNet (v0 configuration, tiny), with dropout 0.3 in train mode and EDM augmentation labels
(augment_dim 6), in float64. Here the official weights are loaded into our U-Net G built by flow_map.net_dict
(--arch py-meanflow) and flow_map.py trains F(x; s, d, aug) = -G(x; 1 - s, d, aug) (the same conversion, on our
side this time); the stored RNG state gives per_sample_loss the official dropout masks.
"""
import math
import os
import types

import pytest
import torch
import torch.nn as nn

import common as C
import flow_map as FM

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "meanflow_golden.pt")
UNET_FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "meanflow_unet_golden.pt")
ENV = types.SimpleNamespace(device=torch.device("cpu"), precision=None)
TOL_T = 1e-6  # times: the same float32 sigmoid on negated arguments (1 - sigmoid(a) vs sigmoid(-a))
TOL_LOSS = 1e-5  # loss ~2 (relative 5e-6): official JVP on the fused LayerNorm, ours on LayerNormJVP
TOL_GRAD = 1e-5  # parameter gradients, |g| <= ~0.5
TOL_SAMPLE = 1e-6
TOL_UNET_LOSS = 1e-8  # relative, float64 (the official time embedding's frequencies are float32, ours float64)
TOL_UNET_GRAD = 1e-6  # official gradients stored in float32, |g| <= ~1


@pytest.fixture(scope="module")
def gold():
    return torch.load(FIX, weights_only=False)


class Flat(nn.Module):
    """The shared tiny MLP on flattened images: F(x; s, d)."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp

    def forward(self, x, s, d):
        return self.mlp(x.flatten(1), s, d).reshape(x.shape)


def our_net(gold):
    cfg = FM.Config(mode="meanflow", width=32, depth=2, time_channels=16)
    nd = {**FM.net_dict(cfg, types.SimpleNamespace(kind="points")), "dim": 8}
    mlp = FM.jvp_safe(C.build_net(nd))  # as flow_map.train builds it
    C.load_state_strict(mlp, gold["state"])
    return Flat(mlp)


def fed(monkeypatch, normals, uniforms):
    """Replace torch.randn / torch.rand by the recorded draws, in order (flow_map.sample_times draws a, b, mask)."""
    qn, qu = list(normals), list(uniforms)
    monkeypatch.setattr(torch, "randn", lambda *a, **k: qn.pop(0).clone())
    monkeypatch.setattr(torch, "rand", lambda *a, **k: qu.pop(0).clone())
    return qn, qu


@pytest.mark.parametrize("version", ["v0", "v1"])
def test_time_sampler_matches_official(gold, monkeypatch, version):
    """py-meanflow models/time_sampler.py sample_two_timesteps_t_r_{v0,v1} (cifar10_v0/v1.sh parameters) and
    flow_map.sample_times given the same normals and uniforms: s = 1 - t_MF, t = 1 - r_MF."""
    ref = gold[f"times/{version}"]
    qn, qu = fed(monkeypatch, [-ref["n_t"], -ref["n_r"]], [ref["u"]])
    s, t, nd = FM.sample_times(len(ref["u"]), FM.Config(mode="meanflow", time_sampler=version), "cpu")
    monkeypatch.undo()
    assert not qn and not qu and nd == 0
    assert (s - (1 - ref["t"])).abs().max() < TOL_T
    assert (t - (1 - ref["r"])).abs().max() < TOL_T
    assert ((t == s) == (ref["t"] == ref["r"])).all()  # the 25 % r = t rows are the same rows


def test_loss_and_gradient_match_official(gold, monkeypatch):
    """py-meanflow models/meanflow.py MeanFlow.forward_with_loss (v0): JVP target u_tgt = v - (t - r) du/dt, squared
    error summed per sample, adaptive weight l / sg(l + 1e-3)^0.75, batch mean; and its parameter gradient."""
    ref = gold["loss"]
    net = our_net(gold)
    cfg = FM.Config(mode="meanflow", sigma0=1.0, time_sampler="v0", adaptive_p=0.75, adaptive_c=1e-3)
    fed(monkeypatch, [-ref["n_t"], -ref["n_r"]], [ref["u"]])
    s, t, nd = FM.sample_times(len(ref["x"]), cfg, "cpu")
    monkeypatch.undo()
    assert (s - (1 - ref["t"])).abs().max() < TOL_T and (t - (1 - ref["r"])).abs().max() < TOL_T
    lw, _ = FM.per_sample_loss(net, None, None, ref["e"], ref["x"], s, t, nd, cfg, ENV)  # x0 = noise, x1 = data
    L = lw.mean()
    L.backward()
    assert abs(L.item() - ref["loss"].item()) < TOL_LOSS
    grads = dict(net.mlp.named_parameters())
    assert set(grads) == set(ref["grads"])
    for k, g in ref["grads"].items():
        assert (grads[k].grad - g).abs().max() < TOL_GRAD, k


def test_one_step_sampler_matches_official(gold):
    """py-meanflow MeanFlow.sample: z_0 = e - u(e, t = 1, r = 0); flow_map.sample N = 1: x = e + phi(e, 0, 1)."""
    ref = gold["sample"]
    rng = types.SimpleNamespace(gens=[None] * len(ref["e"]), randn=lambda *shape: ref["e"].clone())
    cfg = FM.Config(mode="meanflow", sigma0=1.0)
    x = FM.sample(our_net(gold), rng, tuple(gold["shape"]), 1, cfg, ENV, clip=False)  # the official has no clamp
    assert (x - ref["x"]).abs().max() < TOL_SAMPLE


class TimeFlip(nn.Module):
    """flow_map.py's network from a MeanFlow u-network G(z, t_MF, h): F(x; s, d, aug) = -G(x; 1 - s, d, aug)."""

    def __init__(self, G):
        super().__init__()
        self.G = G

    def forward(self, x, s, d, aug=None):
        return -self.G(x, 1 - s, d, aug=aug)


def test_unet_loss_and_gradient_with_dropout_and_augment_labels_match_official():
    """py-meanflow MeanFlow.forward_with_loss (v0) + backward on its SongUNet with dropout 0.3 and augmentation
    labels, float64, vs flow_map.per_sample_loss (mode meanflow) on our U-Net of --arch py-meanflow with the same
    weights, inputs, labels and dropout masks. Fails if the primal and the JVP tangent see different dropout masks,
    if the labels do not reach the network, or if the target is not a stop-gradient."""
    gold = torch.load(UNET_FIX, weights_only=True)
    off = gold["config"]
    assert off["dropout"] > 0 and off["augment_dim"] == 6 and (gold["aug"] != 0).any(1).all()
    assert int((gold["t"] > gold["r"]).sum()) >= 2 and (gold["t"] == gold["r"]).any()  # JVP term and r = t rows
    R = off["img_resolution"]
    cfg = FM.Config(mode="meanflow", net="tiny", arch="py-meanflow", dropout=off["dropout"], augment=gold["aug_p"],
                    time_channels=off["model_channels"] * off["channel_mult_noise"], sigma0=1.0, time_sampler="v0",
                    adaptive_p=0.75, adaptive_c=1e-3)
    nd = {**FM.net_dict(cfg, types.SimpleNamespace(kind="images", shape=(off["in_channels"], R, R))),
          "ch": off["model_channels"]}
    assert (nd["mult"], nd["nb"], nd["attn_res"], nd["resample_filter"], nd["augment_dim"], nd["encoder"]) == \
        (off["channel_mult"], off["num_blocks"], off["attn_resolutions"], off["resample_filter"], off["augment_dim"],
         off["encoder_type"]) and nd["emb_mult"] == 4  # SongUNet's default channel_mult_emb
    state = dict(zip(gold["keys"], [v.reshape(sh) for v, sh in zip(
        gold["state"].split([math.prod(sh) for sh in gold["shapes"]]), gold["shapes"])]))
    G = FM.jvp_safe(C.build_net(nd))  # as flow_map.train builds it
    C.load_state_strict(G, C._edm_state_to_ours(state, nd, "meanflow_unet_golden.pt"))
    net = TimeFlip(G.double().train())
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(gold["rng"])  # after the official e, t, r draws: the dropout masks come next
        lw, _ = FM.per_sample_loss(net, None, None, gold["e"], gold["x"], 1 - gold["t"], 1 - gold["r"], 0, cfg, ENV,
                                   aug=gold["aug"])  # x0 = noise, x1 = data, (s, t) = (1 - t_MF, 1 - r_MF)
        L = lw.mean()
        L.backward()
    assert abs(L.item() - gold["loss"].item()) < TOL_UNET_LOSS * gold["loss"].item()
    ref = C._edm_state_to_ours(dict(zip(gold["grad_keys"], gold["grads"].split(
        [math.prod(state[k].shape) for k in gold["grad_keys"]]))), nd, "grads")
    ours = dict(G.named_parameters())
    assert set(ours) == set(ref)
    for k, g in ref.items():
        assert (ours[k].grad.flatten() - g).abs().max() < TOL_UNET_GRAD, k
