"""common.augment against NVlabs/edm's own AugmentPipe (training/augment.py), stored in tests/golden/edm_augment.pt
by tests/golden/make_edm_augment_golden.py: the same seeds give the same random draws in the same order, the
same geometric matrices, padding, output images and augmentation labels."""
import math
import os

import pytest
import torch

import common

GOLDEN = torch.load(os.path.join(os.path.dirname(__file__), "golden", "edm_augment.pt"), weights_only=True)
CASES = GOLDEN["cases"]
IMG_TOL = 5e-5  # measured max 1.0e-5 (float rounding of the sampling positions and of the filters' sums)


def run(case, **over):
    kw = {**case["kwargs"], **over}
    p = kw.pop("p")
    return common.augment(case["x"], p, torch.Generator().manual_seed(case["seed"]), **kw)


def errors(case):
    y, labels = run(case)
    assert y.shape == case["y"].shape and labels.shape == case["labels"].shape
    return (y - case["y"]).abs().max().item(), (labels - case["labels"]).abs().max().item()


def test_fixture_records_edm_commit():
    assert len(GOLDEN["edm_commit"]) == 40 and {"cifar", "all_p1", "p0_cifar"} <= set(CASES)


def test_label_dimension():
    assert common.augment_dim(**common.EDM_AUGMENT) == 9  # EDM train.py: augment_dim = 9
    assert common.EDM_AUGMENT == dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    assert [common.augment_dim(**{k: 1}) for k in common.EDM_AUGMENT] == [1, 1, 1, 2, 2, 2]
    assert common.augment_dim() == 0 and common.augment_dim(scale=1, scale_std=0.5) == 1
    with pytest.raises(TypeError):
        common.augment_dim(hue=1)  # a colour transform: not part of EDM's setting, refused
    with pytest.raises(common.UserError):
        common.augment(torch.zeros(1, 3, 8, 8), 1.5, **common.EDM_AUGMENT)


def test_p0_is_the_identity():
    c = CASES["p0_cifar"]
    y, labels = run(c)
    assert torch.equal(y, c["x"]) and labels.shape == (4, 9) and not labels.any()
    # EDM's pipe at p = 0 still resamples (an identity up to rounding); EDM's train.py builds no pipe then
    assert (y - c["y"]).abs().max() < 1e-5 and not c["labels"].any()


@pytest.mark.parametrize("name", [n for n in CASES if n != "p0_cifar"])
def test_matches_edm(name):
    img, lab = errors(CASES[name])
    assert img < IMG_TOL and lab < 1e-6, (img, lab)


def test_draws_matrices_and_padding_match_edm():
    c = CASES["all_p1"]
    drawn, orig = [], {n: getattr(torch, n) for n in ("rand", "randn", "randint")}

    def wrap(n):
        def f(*a, **k):
            v = orig[n](*a, **k)
            drawn.append((n, tuple(v.shape), v))
            return v
        return f
    N, _, H, W = c["x"].shape
    o = common._aug_options({k: v for k, v in c["kwargs"].items() if k != "p"})
    g = dict(generator=torch.Generator().manual_seed(c["seed"]), device="cpu")
    try:
        for n in orig:
            setattr(torch, n, wrap(n))
        _, _, G, _ = common._aug_draws(N, H, W, 1.0, o, g)
    finally:
        for n, v in orig.items():
            setattr(torch, n, v)
    assert [d[:2] for d in drawn] == [d[:2] for d in c["draws"]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(drawn, c["draws"]))
    assert (G - c["G_inv"]).abs().max() < 1e-6
    left, right, top, bottom = c["pad"].tolist()
    assert common._aug_margin(G, H, W).tolist() == [left, top, right, bottom]
    assert max(c["pad"][2:]) == H - 1  # the case reaches the clipping of the padding


def test_label_layout():
    """Columns: xflip, yflip, scale w, cos(a) - 1, sin(a), w cos r, w sin r, tx, ty: rebuild the matrix from them."""
    c = CASES["all_p1"]
    N, _, H, W = c["x"].shape
    lab, G = c["labels"].double(), c["G_inv"].double()
    assert set(lab[:, :2].flatten().tolist()) <= {0.0, 1.0}
    eye = torch.eye(3, dtype=torch.float64)

    def m(a, b, cc, d, e, f):
        return torch.tensor([[a, b, cc], [d, e, f], [0, 0, 1]], dtype=torch.float64)
    for i in range(N):
        s = 2 ** (0.2 * lab[i, 2].item())
        a = math.atan2(lab[i, 4], 1 + lab[i, 3])
        assert abs((1 + lab[i, 3]) ** 2 + lab[i, 4] ** 2 - 1) < 1e-6
        rot = m(math.cos(a), -math.sin(a), 0, math.sin(a), math.cos(a), 0)
        tr = m(1, 0, -W * 0.125 * lab[i, 7].item(), 0, 1, -H * 0.125 * lab[i, 8].item())
        w = math.hypot(lab[i, 5], lab[i, 6])  # the label gives (w, r) up to (-w, r + pi): try both
        best = math.inf
        for sw in (w, -w):
            r = math.atan2(lab[i, 6] / sw, lab[i, 5] / sw) if w > 0 else 0.0
            sa, cr, sr = 2 ** (0.2 * sw), math.cos(r), math.sin(r)
            an = m(cr, sr, 0, -sr, cr, 0) @ m(1 / sa, 0, 0, 0, sa, 0) @ m(cr, -sr, 0, sr, cr, 0)
            best = min(best, (eye @ m(1 / s, 0, 0, 0, 1 / s, 0) @ rot @ an @ tr - G[i]).abs().max().item())
        assert best < 1e-5, (i, best)
    c = CASES["only_xflip"]  # the flip label says which images were mirrored left-right
    y, labels = run(c)
    assert torch.equal(y, torch.where(labels[:, :, None, None] == 1, c["x"].flip(3), c["x"]))
    assert 0 < labels.sum() < len(labels)


def test_split_over_parts_and_seeds():
    c = CASES["all_p1"]
    x, kw = c["x"], {k: v for k, v in c["kwargs"].items() if k != "p"}
    whole, lw = common.augment(x, 1.0, 7, **kw)
    halves = [common.augment(x[3 * i:3 * i + 3], 1.0, 7, part=i, parts=2, **kw) for i in range(2)]
    assert (torch.cat([h[0] for h in halves]) - whole).abs().max() < 1e-6
    assert torch.equal(torch.cat([h[1] for h in halves]), lw)
    state = torch.get_rng_state()
    again, _ = common.augment(x, 1.0, torch.Generator().manual_seed(7), **kw)  # an int seed = a Generator
    assert torch.equal(again, whole) and torch.equal(torch.get_rng_state(), state)  # global RNG untouched
    other, _ = common.augment(x, 1.0, 8, **kw)
    assert (other - whole).abs().max() > 0.1
    yb, lb = common.augment(x.bfloat16(), 1.0, 7, **kw)  # half-precision images are resampled in fp32
    assert yb.dtype == torch.bfloat16 and (yb.float() - whole).abs().max() < 0.05 and torch.equal(lb, lw)


def test_augment_batch_draws_per_step_for_the_whole_step():
    """augment_batch (the training loops' call): step s's draws are augment's with seed derive_seed(seed, "augment",
    s), so another step gets other draws, and a step split into parts (ranks, accumulation rounds) gets the rows of
    the whole step's draws (the same augmentation for any rank layout)."""
    x = CASES["all_p1"]["x"]
    whole, lw = common.augment_batch(x, 1.0, 5, 3)
    want, lwant = common.augment(x, 1.0, common.derive_seed(5, "augment", 3), **common.EDM_AUGMENT)
    assert torch.equal(whole, want) and torch.equal(lw, lwant) and lw.shape == (len(x), 9)
    assert not torch.equal(common.augment_batch(x, 1.0, 5, 4)[1], lw)  # the next step: other draws
    halves = [common.augment_batch(x[3 * i:3 * i + 3], 1.0, 5, 3, part=i, parts=2) for i in range(2)]
    assert (torch.cat([h[0] for h in halves]) - whole).abs().max() < 1e-6
    assert torch.equal(torch.cat([h[1] for h in halves]), lw)
    same, none = common.augment_batch(x, 0.0, 5, 3)  # p = 0: the batch as it is, no labels
    assert same is x and none is None


@pytest.mark.parametrize("mutation", ["filter_tap", "no_margin_mask"])
def test_golden_catches_mutations(monkeypatch, mutation):
    """Controls: small deliberate errors must break the match with EDM."""
    if mutation == "filter_tap":
        taps = list(common._SYM6)
        taps[3] = -taps[3]
        monkeypatch.setattr(common, "_SYM6", tuple(taps))
    else:  # pad the maximum without zeroing what lies beyond EDM's margin
        monkeypatch.setattr(common, "_aug_margin", lambda G, H, W: torch.tensor([W - 1.0, H - 1.0] * 2))
    assert errors(CASES["all_p1" if mutation == "filter_tap" else "scale_wide"])[0] > 10 * IMG_TOL


def test_traces_as_one_graph():
    """No host sync: the whole pipe traces as one graph (a .item(), a tensor in an `if` or a size read back from
    the device would break it); the global RNG here, as dynamo does not trace explicit generators."""
    import torch._dynamo
    f = torch.compile(lambda x: common.augment(x, 0.5, None, **common.EDM_AUGMENT), backend="eager",
                      fullgraph=True)
    try:
        y, labels = f(CASES["all_p1"]["x"])
    finally:
        torch._dynamo.reset()
    assert y.shape == CASES["all_p1"]["x"].shape and labels.shape == (6, 9)
