"""The tests' FID detector, a TorchScript file that `common.load_detector(path)` loads as it loads the Inception
network (offline, small, deterministic): a fixed-seed random projection of 4x4-average-pooled pixels to 32 features.
The projection is in float64 and rounded to float32 by common's Detector, so the features do not depend on the batch
size (BLAS blocking)."""
import math
import os
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
