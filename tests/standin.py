"""The tests' stand-ins for files they cannot download. The FID detector: a TorchScript file that
`common.load_detector(path)` loads as it loads the Inception network (offline, small, deterministic): a fixed-seed
random projection of 4x4-average-pooled pixels to 32 features. The projection is in float64 and rounded to float32 by
common's Detector, so the features do not depend on the batch size (BLAS blocking). EDM's network pickles: the tiny
ones in tests/golden/ that NVlabs/edm's own persistence code wrote (`edm_pickle`)."""
import gzip
import math
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F


class Standin(torch.nn.Module):
    def __init__(self):
        super().__init__()
        w = torch.randn(48, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(48)
        self.register_buffer("w", w)

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.double() / 127.5 - 1, 4).flatten(1) @ self.w


def standin_path():
    """The path of standin.pt (detector name 'standin'), written once per machine, atomically (xdist workers and
    torchrun ranks may ask at the same time)."""
    path = os.path.join(tempfile.gettempdir(), "few-step-tests", "standin.pt")
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.jit.script(Standin()).save(tmp)
        os.replace(tmp, path)
    return path


def edm_pickle(folder, name="edm_ve_ncsnpp_uncond"):
    """tests/golden/<name>.pkl.gz unpacked to folder/<name>.pkl (uncond VE NCSN++ by default: augment_dim 9, as EDM's
    CIFAR-10 pickles); its path."""
    path = os.path.join(str(folder), f"{name}.pkl")
    with gzip.open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", f"{name}.pkl.gz")) as f, \
            open(path, "wb") as o:
        shutil.copyfileobj(f, o)
    return path
