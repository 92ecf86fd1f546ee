"""Golden fixture: how NVlabs/edm reads a dataset .zip (training/dataset.py ImageFolderDataset), images and labels.

Writes tests/golden/edm_dataset.zip, a small archive laid out as EDM's dataset_tool.py lays one out (PNGs in
numbered subfolders, a dataset.json with [path, label] pairs in another order than the files) plus what sorting
could get wrong ("b/10.png" before "b/9.png", an upper-case ".PNG", a text file that is no image), then
imports EDM's ImageFolderDataset from a checkout given on the command line (pyspng absent: PIL decodes) and stores
its raw images (N, C, H, W) uint8, its raw int64 labels and its label_dim in tests/golden/edm_dataset.npz.
tests/test_common.py reads the same .zip with common.load_data and compares. RGB images only: EDM keeps a grey image
as 1 channel and reads a palette PNG as its indices (its dataset_tool.py writes neither); this project makes both RGB
(docs/common.md).

    python tests/golden/make_edm_dataset_golden.py --edm /tmp/scratch/edm --commit 008a4e5316c8e3bfe61a62f874bddba254295afb
"""
import argparse
import io
import json
import os
import sys
import zipfile

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
ZIP, NPZ = os.path.join(HERE, "edm_dataset.zip"), os.path.join(HERE, "edm_dataset.npz")


def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--edm", required=True, help="a checkout of NVlabs/edm")
    ap.add_argument("--commit", required=True)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    names = ["00000/img00000000.png", "00000/img00000001.png", "00001/img00001000.png", "b/9.png", "b/10.png",
             "a.PNG"]
    labels = {n: int(v) for n, v in zip(names, rng.integers(0, 7, len(names)))}
    with zipfile.ZipFile(ZIP, "w", compression=zipfile.ZIP_STORED) as z:
        for n in reversed(names):  # archive order unlike the sorted order
            z.writestr(n, png(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)))
        z.writestr("readme.txt", "not an image")
        z.writestr("dataset.json", json.dumps({"labels": [[n, labels[n]] for n in sorted(names, reverse=True)]}))
    sys.modules.pop("pyspng", None)
    sys.path.insert(0, args.edm)
    import training.dataset as D
    D.pyspng = None
    ds = D.ImageFolderDataset(ZIP, use_labels=True, xflip=False)
    images = np.stack([ds._load_raw_image(i) for i in range(len(ds))])
    np.savez(NPZ, images=images, labels=ds._get_raw_labels(), label_dim=ds.label_dim,
             names=np.array(ds._image_fnames), commit=args.commit)
    print(f"wrote {ZIP} and {NPZ}: {images.shape}, labels {ds._get_raw_labels().tolist()}, label_dim {ds.label_dim}")


if __name__ == "__main__":
    main()
