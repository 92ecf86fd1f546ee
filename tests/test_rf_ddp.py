"""rectified_flow.py under a 2-process torchrun (gloo, CPU) on a *named* image data set.

Named sets (cifar10, mnist, fashion_mnist) go through common.load_data's download path, which holds a barrier.
Any rank-0-only call into it (e.g. loading evaluation data inside `if is_main`) desynchronises the collectives
and hangs the job at its end. The data set here is a fabricated Fashion-MNIST in torchvision's raw idx format,
so torchvision finds it and never downloads.
"""
import os
import struct
import subprocess
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_fashion_mnist(root, n=48, seed=0):
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw)
    rng = np.random.RandomState(seed)
    for prefix, count in (("train", n), ("t10k", 8)):
        with open(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), "wb") as f:
            f.write(struct.pack(">IIII", 2051, count, 28, 28)
                    + rng.randint(0, 256, (count, 28, 28), np.uint8).tobytes())
        with open(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
            f.write(struct.pack(">II", 2049, count) + rng.randint(0, 10, count, np.uint8).tobytes())


def test_two_process_pipeline_on_named_image_set(tmp_path):
    write_fashion_mnist(tmp_path / "data")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "rectified_flow.py"), "--preset", "tiny", "--data", "fashion_mnist",
           "--root", str(tmp_path / "data"), "--out", str(out), "--stage", "all", "--n_pairs", "16",
           "--pair_block", "8", "--pair_batch", "8", "--eval_n", "8"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "world 2 | global batch 8 = 2 x 4 x 1" in p.stdout  # both stages ran distributed
    teacher = torch.load(out / "ckpt.pt", weights_only=True)
    student = torch.load(out / "2rf" / "ckpt.pt", weights_only=True)
    assert teacher["net"]["in_channels"] == 1 and teacher["net"]["img_resolution"] == 32  # padded to 32x32
    assert teacher["step"] == 4 and student["step"] == 4 and student["rng"]["world"] == 2
    for stage_dir in (out, out / "2rf"):  # rank 0 evaluated each stage once
        assert (stage_dir / "samples.png").is_file() and (stage_dir / "metrics.jsonl").is_file()
    assert sorted(os.listdir(out / "pairs")) == ["meta.json", "x_00000.npy", "x_00001.npy"]  # one block per rank


def test_two_process_2rf_from_an_augmented_edm_pickle(tmp_path):
    """EDM's CIFAR-10 pickles were trained with EDM's augmentation (augment_dim 9): the 2-RF started from one feeds
    no augmentation labels, so map_augment got no gradient and DDP stopped at the second step ('Expected to have
    finished reduction in the prior iteration', the README's torchrun 2-RF command). It is frozen: the run ends and
    map_augment keeps the teacher's weights."""
    sys.path.insert(0, ROOT)
    import common as C
    from standin import edm_pickle
    pkl = edm_pickle(tmp_path)
    den, info = C.load_edm(pkl)
    assert info["augment_dim"] == 9  # the case
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).integers(0, 256, (16, 8, 8, 3), dtype=np.uint8))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = ["--preset", "tiny", "--data", str(tmp_path / "imgs.npy"), "--root", str(tmp_path), "--out",
            str(tmp_path / "run"), "--teacher", pkl]
    p = subprocess.run([sys.executable, os.path.join(ROOT, "rectified_flow.py"), *base, "--stage", "pairs",
                        "--n_pairs", "8", "--pair_block", "8", "--pair_batch", "4"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(ROOT, "rectified_flow.py"), *base, "--stage", "2rf", "--iters", "3", "--loss",
                        "huber"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    ck = torch.load(tmp_path / "run" / "2rf" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["rng"]["world"] == 2
    assert torch.equal(ck["model"]["den.net.map_augment.weight"], den.net.map_augment.weight)
