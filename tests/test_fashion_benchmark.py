"""benchmarks/fashion.py on a fabricated Fashion-MNIST (CPU, one thread, no download): the end-to-end run with tiny
budgets, the classifier (learns the class signal; shuffled labels stay at chance; cached and reused), the Fréchet
distance (a set against itself ~ 0, a noised set clearly above a held-out real set) and the missing-data error.

Quality of the generative methods is never asserted here (targets live in benchmarks/, not in tests).
"""
import gzip
import json
import math
import os
import shutil
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import cli  # noqa: E402
import common  # noqa: E402
from cli import guarded  # noqa: E402


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmark scripts import as modules
import fashion as fb  # noqa: E402


def _write_idx_gz(path, a):
    """The IDX format of (Fashion-)MNIST: 0, 0, type 0x08 (uint8), ndim, big-endian dims, then the bytes; gzipped."""
    header = bytes([0, 0, 8, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(a, np.uint8).tobytes())


def fabricate(n, seed):
    """28x28 images of 10 classes: a bright 4-row band whose height position is the class, over uniform noise."""
    g = np.random.default_rng(seed)
    y = g.integers(0, 10, n).astype(np.uint8)
    x = g.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, k in enumerate(y):
        x[i, 2 + 2 * k:6 + 2 * k, 4:24] = 200 + g.integers(0, 40)
    return x, y


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A folder laid out like /usr/share/datasets/fashion-mnist with 320 training and 160 test images."""
    d = tmp_path_factory.mktemp("debian-fashion")
    for split, n, seed in (("train", 320, 0), ("t10k", 160, 1)):
        x, y = fabricate(n, seed)
        _write_idx_gz(d / f"{split}-images-idx3-ubyte.gz", x)
        _write_idx_gz(d / f"{split}-labels-idx1-ubyte.gz", y)
    return d


def test_end_to_end_tiny_budget(source, tmp_path):
    """fashion.py through the methods' own CLIs: 1-RF, LMD (1-RF teacher), sCD (TrigFlow teacher) and 2-RF++ (its
    pairs stage from the 1-RF teacher) -> JSON, MD, PNG with finite FDs; the unpacked data and the cached classifier
    are reused on a second look."""
    root, res = tmp_path / "root", tmp_path / "results"
    argv = ["--root", str(root), "--source", str(source), "--results", str(res), "--work", str(tmp_path / "work"),
            "--methods", "1-RF,LMD,sCD,2-RF++", "--net", "tiny", "--budget", "32", "--batch", "8", "--n_fd", "128",
            "--ref_steps", "3", "--jobs", "1", "--n_grid", "4"]
    out = fb.main(argv)
    for ext in ("json", "md", "png"):
        assert (res / f"fashion_cpu.{ext}").stat().st_size > 0
    rep = json.loads((res / "fashion_cpu.json").read_text())
    assert [r["method"] for r in rep["records"]] == ["1-RF", "LMD", "sCD", "2-RF++"]
    for r in rep["records"]:
        assert all(math.isfinite(r["fd"][k]) and r["fd"][k] >= 0 for k in ("1", "2")), r
        assert r["examples"] == 32 and r["wall_s"] > 0
    assert rep["records"][1]["teacher_examples"] == rep["records"][3]["teacher_examples"] == 16  # teacher + student
    assert math.isfinite(rep["records"][0]["fd_reference"]["3"]) and math.isfinite(rep["meta"]["fd_floor"])
    assert rep["meta"]["net"] == "tiny" and out["meta"]["budget"] == 32
    md = (res / "fashion_cpu.md").read_text()
    assert "| sCD |" in md and "network `tiny`" in md and "t10k accuracy" in md
    cls = root / "fashion_classifier.pt"
    before = cls.stat().st_mtime_ns
    path, meta = fb.classifier(str(root), fb.prepare_data(str(root), str(source)), torch.device("cpu"))
    assert meta["reused"] and cls.stat().st_mtime_ns == before and path == str(cls)


def test_classifier_learns_and_shuffled_labels_stay_at_chance():
    x, y = fabricate(400, 2)
    xt, yt = fabricate(200, 3)
    to = lambda a: torch.nn.functional.pad(torch.from_numpy(a), (2, 2, 2, 2))[:, None]
    x, xt, y, yt = to(x), to(xt), torch.from_numpy(y.astype(np.int64)), torch.from_numpy(yt.astype(np.int64))
    quiet = lambda *_: None
    _, acc = fb.fit_classifier(x, y, xt, yt, epochs=4, batch=32, lr=3e-3, seed=0, log=quiet)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    _, acc_shuffled = fb.fit_classifier(x, shuffled, xt, yt, epochs=4, batch=32, lr=3e-3, seed=0, log=quiet)
    assert acc > 0.9, acc
    assert acc_shuffled < 0.3, acc_shuffled  # chance is 0.1


def test_frechet_distance_self_zero_and_noised_set_far(source, tmp_path):
    """Through the cached TorchScript detector as common.load_detector loads it: the training set against its own
    statistics scores ~0, a held-out real set a little, and the same held-out set shifted and noised clearly more."""
    root = tmp_path / "root"
    raw = fb.prepare_data(str(root), str(source))
    path, _ = fb.classifier(str(root), raw, torch.device("cpu"))
    env = common.setup("cpu", 0, "fp32")
    torch.set_num_threads(1)
    det = common.load_detector(path, env)
    assert det.dim == fb.CLS_RECIPE["features"]
    (x, _), (xt, _) = fb.load_split(raw, "train"), fb.load_split(raw, "t10k")
    ref = fb.feature_stats(x, det)
    self_fd = fb.fd_of_images(x, det, ref)
    held_fd = fb.fd_of_images(xt, det, ref)
    g = torch.Generator().manual_seed(0)
    noised = (xt.float() * 0.6 + 60 + 40 * torch.randn(xt.shape, generator=g)).clamp(0, 255).to(torch.uint8)
    noised_fd = fb.fd_of_images(noised, det, ref)
    scale = ref[1].trace().item()
    assert self_fd < 1e-6 * scale, (self_fd, scale)
    assert noised_fd > 3 * held_fd and noised_fd > 0.1 * scale, (noised_fd, held_fd, scale)


def test_missing_data_is_one_sentence(tmp_path):
    r = cli.run(os.path.join("benchmarks", "fashion.py"), "--root", tmp_path / "r", "--source", tmp_path / "nothing",
                "--results", tmp_path / "res", cwd=ROOT, timeout=120)
    cli.refused(r, "apt-get install dataset-fashion-mnist")  # exit 2, and nothing before its one line
    assert not (tmp_path / "res" / "fashion_cpu.json").exists()


_LABELS_319 = bytes([0, 0, 8, 1]) + (319).to_bytes(4, "big") + bytes(319)  # one label short of the 320 images


@pytest.mark.parametrize("spoil, words", [
    (lambda b: b[:len(b) // 2], "train-labels-idx1-ubyte.gz is not a readable gzip file (EOFError)"),
    (lambda b: b"not gzip", "train-labels-idx1-ubyte.gz is not a readable gzip file (BadGzipFile)"),
    (lambda b: gzip.compress(b""), "train-labels-idx1-ubyte.gz does not hold a Fashion-MNIST IDX file"),
    (lambda b: gzip.compress(b"\0\0"), "train-labels-idx1-ubyte.gz does not hold a Fashion-MNIST IDX file"),
    (lambda b: gzip.compress(_LABELS_319), "320 images but 319 labels")],
    ids=["truncated", "not-gzip", "empty-idx", "2-byte-idx", "label-count"])
def test_bad_source_is_one_sentence_and_installs_nothing(source, tmp_path, capsys, spoil, words):
    """A truncated or non-gzip .gz, an empty or 2-byte IDX file, a label count that differs: one sentence naming
    the file, before anything is unpacked into --root or made in --work and --results."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    bad = src / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(spoil(bad.read_bytes()))
    dirs = [tmp_path / d for d in ("root", "work", "res")]
    guarded(capsys, lambda: fb.main(["--root", str(dirs[0]), "--source", str(src), "--work", str(dirs[1]),
                                     "--results", str(dirs[2])]), words)
    assert not any(d.exists() for d in dirs)


def test_bad_installed_file_is_named_until_deleted(source, tmp_path):
    root = tmp_path / "root"
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0")
    with pytest.raises(fb.Fail, match="t10k-labels-idx1-ubyte does not hold .* delete it"):
        fb.prepare_data(str(root), str(source))
    assert os.listdir(raw) == ["t10k-labels-idx1-ubyte"]  # nothing installed beside it
    (raw / "t10k-labels-idx1-ubyte").unlink()
    fb.prepare_data(str(root), str(source))
    assert sorted(os.listdir(raw)) == sorted(fb.RAW_FILES)
