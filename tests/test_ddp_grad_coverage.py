"""Every module that a method file wraps in DDP (common.distribute without `manual`) gives each trainable parameter a
gradient in a training step, single-process and on the CPU.

DDP stops at its second step when a trainable parameter got no gradient ("Expected to have finished reduction in
the prior iteration"): sCT/sCD and the 2-RF from a teacher trained with EDM's augmentation (augment_dim 9) did, until
common.freeze_unfed_augment. A one-process run cannot see it, so this file spies on common.distribute and checks the
wrapped module after the run, for each path that DDP wraps: IMM and scm's diffusion with --augment (map_augment fed),
sCT / sCD started from EDM's pickle, the 1-RF with --cond, the 2-RF and its fine-tune from EDM's pickle, and the
distributional file's in-file teacher. (test_scm.py and test_rf_ddp.py hold sCT / sCD from this project's augmented
teacher and a 2-process 2-RF from EDM's pickle.) flow_map.py and distributional.py's G and D sync by hand
(common.sync_grads fills a missing gradient with zeros), so no such stop can happen there.
"""
import io
import json
import os
import sys
import zipfile

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import distributional  # noqa: E402
import imm  # noqa: E402
import rectified_flow  # noqa: E402
import scm  # noqa: E402
from standin import edm_pickle  # noqa: E402


@pytest.fixture
def spy(monkeypatch):
    """The modules handed to common.distribute for DDP (manual ones left out)."""
    wrapped, real = [], C.distribute

    def distribute(model, env, manual=False):
        if not manual:
            wrapped.append(model)
        return real(model, env, manual)
    monkeypatch.setattr(C, "distribute", distribute)
    return wrapped


def unfed(model):
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


@pytest.fixture
def data(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "imgs.npy", rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    with zipfile.ZipFile(tmp_path / "lab.zip", "w") as z:  # EDM's dataset.json labels
        names = []
        for i in range(16):
            b = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(b, "PNG")
            names.append([f"img{i:05d}.png", i % 4])
            z.writestr(names[-1][0], b.getvalue())
        z.writestr("dataset.json", json.dumps({"labels": names}))
    return tmp_path


def run(module, *argv):
    C.main_guard(lambda: module.main([str(a) for a in argv]))


def test_augmented_imm_and_scm_diffusion_feed_every_parameter(data, spy):
    base = ["--preset", "tiny", "--data", data / "imgs.npy", "--root", data, "--eval_n", 4, "--iters", 1]
    run(imm, *base, "--batch", 8, "--augment", 0.12, "--out", data / "imm")
    run(scm, *base, "--mode", "diffusion", "--augment", 0.12, "--out", data / "d")
    assert len(spy) == 2 and not [n for m in spy for n in unfed(m)]
    assert all(any("map_augment" in n for n, _ in m.named_parameters()) for m in spy)


def test_students_of_an_edm_pickle_feed_every_trainable_parameter(data, spy):
    pkl = edm_pickle(data)
    base = ["--preset", "tiny", "--data", data / "imgs.npy", "--root", data]
    for mode in ("sct", "scd"):
        run(scm, *base, "--eval_n", 4, "--mode", mode, "--teacher", pkl, "--iters", 1, "--out", data / mode)
    run(rectified_flow, *base, "--teacher", pkl, "--stage", "pairs", "--n_pairs", 8, "--pair_block", 8,
        "--out", data / "rf")
    run(rectified_flow, *base, "--eval_n", 4, "--teacher", pkl, "--stage", "2rf", "--iters", 1, "--out", data / "rf")
    run(rectified_flow, *base, "--eval_n", 4, "--stage", "ft", "--ft_iters", 1, "--ft_n", 8, "--out", data / "rf")
    assert len(spy) == 4
    for model in spy:
        assert not unfed(model)
        assert not [n for n, p in model.named_parameters() if "map_augment" in n and p.requires_grad]  # frozen


def test_conditional_1rf_and_the_in_file_gdd_teacher_feed_every_parameter(data, spy):
    base = ["--preset", "tiny", "--root", data, "--eval_n", 4]
    run(rectified_flow, *base, "--data", data / "lab.zip", "--cond", "--stage", "1rf", "--iters", 1,
        "--out", data / "rfc")
    run(distributional, *base, "--data", data / "lab.zip", "--cond", "--teacher_iters", 1, "--iters", 1,
        "--out", data / "gdd")
    assert len(spy) == 2
    for model in spy:
        assert not unfed(model)
