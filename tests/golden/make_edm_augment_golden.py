"""Golden fixture for common.augment: runs NVlabs/edm's own training/augment.py (AugmentPipe) once.

usage: python tests/golden/make_edm_augment_golden.py EDM_CHECKOUT [OUT]
  EDM_CHECKOUT: a checkout of github.com/NVlabs/edm (only torch and numpy are needed to import its
  training/augment.py); OUT defaults to tests/golden/edm_augment.pt next to this script.

Each case seeds the global CPU RNG with torch.manual_seed(seed), calls AugmentPipe(**kwargs) on fixed random
images in [-1, 1] and stores the images, the output images and augmentation labels, every random draw the pipe
made (function, shape, values, in order), and, for the geometric cases, the pipe's inverse matrix G_inv just
before padding, its four padding amounts and the theta it gives affine_grid (read by wrapping torch's pad and
affine_grid for the duration of the call). Nothing of EDM's code is copied here; it is imported.
"""
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

CIFAR = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)  # EDM train.py, p=0.12
ONLY = ["xflip", "yflip", "scale", "rotate_frac", "aniso", "translate_frac"]


def cases():
    out = [("p0_cifar", dict(p=0.0, **CIFAR), (4, 3, 12, 16), 1)]
    out += [(f"only_{k}", {"p": 1.0, k: 1}, (4, 3, 12, 16), 10 + i) for i, k in enumerate(ONLY)]
    out += [("all_p1", dict(p=1.0, **CIFAR), (6, 3, 12, 16), 20),  # every transform on every image
            ("all_p1_gray", dict(p=1.0, **CIFAR), (3, 1, 16, 16), 21),  # one channel, square
            ("cifar", dict(p=0.12, **CIFAR), (16, 3, 32, 32), 22),  # EDM's CIFAR-10 setting
            # a wider scale range whose sampling reaches the edge of the pipe's padding (seed picked for that)
            ("scale_wide", dict(p=1.0, scale=1, scale_std=0.5), (2, 3, 16, 16), 49),
            # a zoom-out by more than 2x: the bilinear taps reach past the upsampled padded image (seed picked)
            ("zoom_out", dict(p=1.0, scale=1, scale_std=0.7), (1, 3, 32, 32), 6)]
    return out


def main(argv):
    if len(argv) not in (1, 2):
        sys.exit(__doc__)
    edm = os.path.abspath(argv[0])
    out_path = argv[1] if len(argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                          "edm_augment.pt")
    sys.path.insert(0, edm)
    from training.augment import AugmentPipe  # EDM's code, imported from the checkout
    commit = subprocess.run(["git", "-C", edm, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    torch.set_num_threads(1)

    result = {"edm_commit": commit, "torch": str(torch.__version__), "cases": {}}
    for name, kw, shape, seed in cases():
        g = torch.Generator().manual_seed(1000 + seed)
        x = torch.rand(shape, generator=g) * 2 - 1
        rec = {"draws": []}
        orig = {n: getattr(torch, n) for n in ("rand", "randn", "randint")}
        orig_pad, orig_grid = F.pad, F.affine_grid

        def wrap(n):
            def f(*a, **k):
                v = orig[n](*a, **k)
                rec["draws"].append((n, tuple(v.shape), v.clone()))
                return v
            return f

        def pad(*a, **k):  # G_inv is a local of AugmentPipe.__call__ when it pads
            rec["G_inv"] = sys._getframe(1).f_locals["G_inv"].clone()
            rec["pad"] = torch.tensor([int(v) for v in k["pad"]])  # [left, right, top, bottom]
            return orig_pad(*a, **k)

        def affine_grid(theta, *a, **k):
            rec["theta"] = theta.clone()
            return orig_grid(theta, *a, **k)

        pipe = AugmentPipe(**kw)
        torch.manual_seed(seed)
        try:
            for n in orig:
                setattr(torch, n, wrap(n))
            F.pad, F.affine_grid = pad, affine_grid
            y, labels = pipe(x.clone())
        finally:
            for n, v in orig.items():
                setattr(torch, n, v)
            F.pad, F.affine_grid = orig_pad, orig_grid
        result["cases"][name] = dict(kwargs=kw, seed=seed, x=x, y=y, labels=labels, **rec)
        print(f"{name:16s} {tuple(shape)} seed {seed}: labels {tuple(labels.shape)}, {len(rec['draws'])} draws, "
              f"pad {rec.get('pad', torch.tensor([])).tolist()}, max |y - x| {(y - x).abs().max():.3f}")
    torch.save(result, out_path)
    print(f"wrote {out_path} ({os.path.getsize(out_path) / 1e3:.0f} kB), EDM {commit}")


if __name__ == "__main__":
    main(sys.argv[1:])
