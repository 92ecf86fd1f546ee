"""EDM's checkpoints as teachers, in each method's own convention (offline: the tiny EDM-written pickles of
tests/golden/, made by NVlabs/edm's own persistence code; see tests/golden/README.md).

- rectified_flow.py: `--stage pairs --teacher X.pkl` samples EDM's Heun (rfpp generate_edm.py) and `--stage 2rf`
  starts from the EDM weights wrapped as rfpp's EDMPrecondVel: at step 0 the 2-RF is the teacher's velocity field;
  its checkpoint rebuilds for `sample`.
"""
import json
import re
import os
import types
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common as C  # noqa: E402
import rectified_flow as RF  # noqa: E402
from cli import guarded  # noqa: E402
from standin import edm_pickle  # noqa: E402

CPU = torch.device("cpu")


@pytest.fixture
def imgs(tmp_path):
    path = tmp_path / "imgs.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    return str(path)


def test_edm_velocity_is_the_denoiser_in_rf_time():
    """v(x_t, t) = (x_t - D(x_t / (1 - t); t / (1 - t))) / t; on x_t = (1 - t) x + t z with an exact denoiser
    (D = x, known) it returns z - x."""
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    tb = t.reshape(-1, 1, 1, 1)
    v = RF.edm_to_velocity(lambda u, sigma: x, (1 - tb) * x + tb * z, t)
    assert (v - (z - x)).abs().max() < 1e-5


def test_rf_pairs_and_2rf_from_an_edm_pickle(tmp_path, imgs, capsys):
    pkl = edm_pickle(tmp_path)
    den, info = C.load_edm(pkl)
    out = str(tmp_path / "run")
    base = ["--preset", "tiny", "--data", imgs, "--out", out, "--teacher", pkl, "--root", str(tmp_path)]
    for flag, value in (("--pair_solver", "euler"), ("--pair_grid", "uniform")):  # read by no EDM teacher's pairs
        guarded(capsys, lambda: RF.main([*base, "--stage", "pairs", flag, value]), f"does not read {flag}; drop it.")
        assert not os.path.exists(out)
    RF.main([*base, "--stage", "pairs", "--n_pairs", "6", "--pair_block", "6", "--pair_batch", "3"])
    steps = C.resolve_config(RF.Config, RF.PRESETS, "tiny", {"data": imgs}, stage="pairs").pair_steps
    assert f"(edm_heun K={steps}, {2 * steps - 1} NFE," in capsys.readouterr().out  # the sampler that ran
    folder = os.path.join(out, "pairs")
    data, Z, _ = RF.load_pairs(folder, C.Env(0, 1, 0, CPU, True, "fp32"), 0)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert meta["solver"] == "edm_heun" and meta["nfe"] == 2 * meta["steps"] - 1
    z = RF.pair_noise(torch.arange(6), meta["pair_seed"], (3, 8, 8), C.Env(0, 1, 0, CPU, True, "fp32"))
    want = C.to_uint8(C.edm_heun(den, z, num_steps=meta["steps"]).float())
    assert (data.x.int() - want.int()).abs().max() <= 1  # stored as uint8, as rfpp's pair images
    RF.main([*base, "--stage", "2rf", "--iters", "0", "--loss", "huber"])
    ck = torch.load(os.path.join(out, "2rf", "ckpt.pt"), weights_only=True)
    assert ck["net"]["kind"] == "edm_velocity" and ck["net"]["denoiser"]["precond"] == info["precond"]
    net = RF.build(ck["net"]).eval()
    C.load_state_strict(net, ck["ema"])
    xt, t = torch.randn(4, 3, 8, 8), torch.tensor([0.05, 0.3, 0.7, 0.98])
    with torch.no_grad():
        ref = RF.edm_to_velocity(lambda u, s: den(u, s), xt, t)
        assert (net(xt, t) - ref).abs().max() < 1e-5  # step 0: the 2-RF is the teacher's velocity field
    RF.main(["sample", "--ckpt", os.path.join(out, "2rf", "ckpt.pt"), "--steps", "1", "--n", "4",
             "--out", str(tmp_path / "s.npy")])
    assert np.load(tmp_path / "s.npy").shape == (4, 8, 8, 3)


def test_missing_edm_checkpoint_names_the_download(tmp_path, capsys):
    guarded(capsys, lambda: RF.main(["--stage", "pairs", "--teacher", str(tmp_path / "edm-cifar10-32x32-uncond-ve.pkl"),
                                     "--out", str(tmp_path / "r")]),
            "nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-ve.pkl")


def test_pairs_from_a_class_conditional_edm_pickle_name_the_unconditional_one(tmp_path, imgs, capsys):
    """Reflow from EDM's class-conditional pickle is refused; the sentence said 'train the 1-RF without --cond', which
    a run that trained no 1-RF cannot follow (found by the 2-process DDP matrix): it names the unconditional pickle."""
    pkl = edm_pickle(tmp_path, "edm_vp_ddpmpp_cond")
    msg = guarded(capsys, lambda: RF.main(["--preset", "tiny", "--stage", "pairs", "--teacher", pkl, "--data", imgs,
                                           "--out", str(tmp_path / "r"), "--root", str(tmp_path)]),
                  "class-conditional EDM pickle", "uncond")
    assert "--cond" not in msg, msg


# ============================================================================ distributional.py (GDD)
def test_gdd_generator_from_an_edm_pickle_is_d_at_sigma_max(tmp_path, imgs, capsys):
    """G(z) = z - v(z, 1) = D(80 z; 80) exactly (GDD's generator), the step-0 generator of a run is the teacher's
    one-step denoise, and the checkpoint rebuilds it for `sample`; K > 1 re-noises along rfpp's velocity."""
    import distributional as GD
    pkl = edm_pickle(tmp_path)
    den, info = C.load_edm(pkl)
    gen, tck, t_g = GD.load_teacher(pkl, GD.Config(data=imgs, cond=False), None, None)
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    # relative to the outputs' scale (~100 at sigma = 80, where one fp32 ulp is ~1e-5): a few ulps; the max over 30
    # seeds was 6e-8 and 2.5e-7
    rel = lambda a, b: ((a - b).abs().max() / b.abs().max()).item()
    with torch.no_grad():
        assert t_g == 1.0 and rel(GD.G(gen, z, t_g), den(80 * z, 80.0)) < 1e-6
        t = torch.tensor([0.3, 0.6, 0.9])
        tb = t.reshape(-1, 1, 1, 1)
        assert rel(gen(z, t), (z - den(z / (1 - tb), t / (1 - t))) / tb) < 2e-6
    out = str(tmp_path / "g")
    GD.main(["--preset", "tiny", "--data", imgs, "--teacher", pkl, "--disc", "scratch", "--iters", "0",
             "--out", out, "--root", str(tmp_path), "--freeze", "gdd_i"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    g0 = GD.build(ck["net"]).eval()
    C.load_state_strict(g0, ck["ema"])
    with torch.no_grad():
        assert rel(GD.G(g0, z, ck["t_g"]), den(80 * z, 80.0)) < 1e-6  # step 0 = the teacher
    frac = float(re.search(r"\(fraction ([0-9.]+)\)", capsys.readouterr().out).group(1))
    names = [n for n, _ in g0.named_parameters() if GD.frozen(n)]  # GDD-I's rule on the NCSN++ layout
    assert 0.5 < frac < 0.9 and names and all(n.startswith("den.net.") for n in names)
    assert any("_down." in n for n in names) and any("_up." in n for n in names)  # the resampling blocks too
    GD.main(["sample", "--ckpt", os.path.join(out, "ckpt.pt"), "--steps", "1,2", "--n", "4",
             "--out", str(tmp_path / "s.npy")])
    assert np.load(tmp_path / "s_1step.npy").shape == (4, 8, 8, 3)


# ============================================================================ flow_map.py (lmd, emd) and scm.py (scd)
def test_flow_map_teacher_velocity_from_an_edm_pickle(tmp_path, imgs):
    """b_T(t, y) = -v(y, 1 - t) with v the EDM denoiser's rectified-flow velocity: on the line of an exact
    denoiser (D returns x) it is x - z, the data-ward velocity of flow_map.py's t = 0-noise convention."""
    import flow_map as FM
    x, z = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.1, 0.4, 0.7, 0.95])
    I = FM.bc(1 - t, z) * z + FM.bc(t, x) * x  # flow_map's linear interpolant, noise at t = 0
    b = FM.rf_velocity(FM.edm_rf_velocity(lambda u, sigma: x), 1e-5)(t, I)
    assert (b - (x - z)).abs().max() < 1e-4
    pkl = edm_pickle(tmp_path)
    bT, std, _ = FM.load_teacher(pkl, C.Env(0, 1, 0, CPU, True, "fp32"), (3, 8, 8))
    den, _ = C.load_edm(pkl)
    with torch.no_grad():
        tau = 1 - t
        ref = -(I - den(I / FM.bc(1 - tau, I), tau / (1 - tau))) / FM.bc(tau, I)
        assert std == 1.0 and (bT(t, I) - ref).abs().max() < 1e-4
    FM.main(["--preset", "tiny", "--data", imgs, "--mode", "lmd", "--teacher", pkl, "--iters", "1",
             "--out", str(tmp_path / "l"), "--root", str(tmp_path)])
    assert os.path.exists(tmp_path / "l" / "ckpt.pt")


def test_scm_trigflow_of_the_gaussian_denoiser_is_the_posterior_velocity():
    """Data x ~ N(0, v I), z ~ N(0, sigma_d^2 I): EDM's optimal denoiser D(y; sigma) = v y / (v + sigma^2), and
    E[cos t z - sin t x | x_t] = cos t sin t (sigma_d^2 - v) x_t / (v cos^2 t + sigma_d^2 sin^2 t), which sigma_d F must
    be (an input-independent denoiser cannot see D's input scaling 1 / cos t or its sigma = sigma_d tan t)."""
    import scm
    sd, v = 0.5, 1.0

    class Gauss(torch.nn.Module):
        def forward(self, y, sigma, y_label=None):
            return v * y / (v + sigma.reshape(-1, 1, 1, 1) ** 2)
    x_t = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=torch.float64)
    c, s = (w.reshape(-1, 1, 1, 1) for w in (t.cos(), t.sin()))
    F = scm.EDMTrigFlow.forward(types.SimpleNamespace(den=Gauss(), sigma_d=sd), x_t / sd, t)
    want = c * s * (sd ** 2 - v) * x_t / (v * c ** 2 + sd ** 2 * s ** 2)
    assert (sd * F.double() - want).abs().max() < 1e-5


def test_scm_trigflow_teacher_from_an_edm_pickle(tmp_path, imgs):
    """F = (cos t x_t - D(x_t / cos t; sigma_d tan t)) / (sigma_d sin t): with an exact denoiser on
    x_t = cos t x + sin t z it is the TrigFlow velocity (cos t z - sin t x) / sigma_d; sCD from the pickle starts
    its student at the teacher and trains."""
    import scm
    sd, x, z = 0.5, torch.randn(4, 3, 8, 8), 0.5 * torch.randn(4, 3, 8, 8)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4])
    c, s = (v.reshape(-1, 1, 1, 1) for v in (t.cos(), t.sin()))
    x_t = c * x + s * z

    class Exact(torch.nn.Module):
        def config(self):
            return {}

        def forward(self, u, sigma, y=None):
            return x
    F = scm.EDMTrigFlow.forward(types.SimpleNamespace(den=Exact(), sigma_d=sd), x_t / sd, t)
    assert (F - (c * z - s * x) / sd).abs().max() < 1e-4
    pkl = edm_pickle(tmp_path)
    out = str(tmp_path / "d")
    scm.main(["--preset", "tiny", "--data", imgs, "--mode", "scd", "--teacher", pkl, "--iters", "1", "--out", out,
              "--root", str(tmp_path), "--eval_steps", "1"])
    ck = torch.load(os.path.join(out, "ckpt.pt"), weights_only=True)
    assert ck["net"]["kind"] == "edm_trigflow" and ck["step"] == 1
    net = scm.build(ck["net"])
    C.load_state_strict(net, ck["ema"])
