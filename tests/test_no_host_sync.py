"""No host sync inside a training step ("fast": data on the device, the loop never waits for the GPU between steps).

On CUDA the host waits whenever it must read a value the device computes: a scalar (`.item()`, `bool(t)`, `float(t)`,
an `if` on a tensor), a size that depends on the data (`nonzero`, a boolean mask, `unique`, `repeat_interleave` by a
tensor), a copy to the host (`.cpu()`, `.numpy()`, `.tolist()`). CUDA's own check (`torch.cuda.set_sync_debug_mode`)
needs a GPU; here a dispatch mode sees those operations on the CPU, each counted where a project file called it.
Every method file trains, in each mode and stage (rectified_flow's optional ft runs the 2-RF's step on other pairs),
once for 3 steps and once for 5, logging, checkpointing and evaluating only at the end: the counts must be equal, i.e.
the two steps more read nothing back.

Two CPU stand-ins for the CUDA path: the Guard runs its `sync_free` branch (on the CPU it reads its flag, as the
control below shows), and reads inside `optimizer.step()` are not counted (CPU Adam reads its step counts; the Guard
makes them capturable on CUDA). What this cannot see: a copy to the host of a tensor that is already on it (`.to("cpu")`
on the CPU copies nothing), and syncs inside CUDA kernels' host code. On a machine with a GPU every case runs on it
too, with everything counted (the optimiser's step included) plus CUDA's own check (`set_sync_debug_mode`): one
command there, `python -m pytest -q tests/test_no_host_sync.py`.
"""
import collections
import contextlib
import os
import sys
import warnings

import numpy as np
import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils._python_dispatch import TorchDispatchMode

import common as C
import distributional
import flow_map
import imm
import rectified_flow
import scm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = tuple(os.path.join(ROOT, f) for f in ("common.py", "imm.py", "flow_map.py", "scm.py", "distributional.py",
                                                 "rectified_flow.py"))
READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique_dim", "_unique", "_unique2", "unique_consecutive"}


def caller():
    """file:line of the innermost project frame (the method or common.py line that asked for the read)."""
    f = sys._getframe(1)
    while f is not None and f.f_code.co_filename not in SOURCES:
        f = f.f_back
    return f"{os.path.basename(f.f_code.co_filename)}:{f.f_lineno}" if f else "torch"


class HostReads(TorchDispatchMode):
    """Counts the operations that read a device value back to the host, by calling line."""

    def __init__(self):
        super().__init__()
        self.seen, self.in_opt, self.count_opt = collections.Counter(), 0, False
        self.active, self.sync_free = False, True  # counting (the Python methods too); the Guard's branch

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name, overload = func._schema.name.split("::")[1], func._overloadname
        read = name in READS or (name == "repeat_interleave" and overload in ("Tensor", "self_Tensor")
                                 and kwargs.get("output_size") is None)
        read |= name in ("index", "index_put", "index_put_") and any(  # a boolean mask: nonzero inside the kernel
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None)
        if read and not (self.in_opt and not self.count_opt):
            self.seen[f"{caller()} {name}"] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_syncs(seen):
    """On a GPU, CUDA's own check as well: every synchronising call warns (sync debug mode 1), counted by line."""
    def show(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            seen[f"{caller()} cuda sync"] += 1
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode(1)
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)


@pytest.fixture
def watch(monkeypatch):
    """watch(main, argv, sync_free=True) -> Counter of host reads over a whole run (the Guard's CUDA branch)."""
    mode = HostReads()
    init = C.Guard.__init__
    monkeypatch.setattr(C.Guard, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "sync_free": mode.sync_free}))
    for m in ("tolist", "numpy", "cpu"):  # no aten operation on a CPU tensor: counted at the Python method
        def method(self, *a, _orig=getattr(torch.Tensor, m), _m=m, **k):
            if mode.active and not (mode.in_opt and not mode.count_opt):
                mode.seen[f"{caller()} {_m}"] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, m, method)

    def enter(*_):
        mode.in_opt += 1

    def leave(*_):
        mode.in_opt -= 1
    hooks = [register_optimizer_step_pre_hook(enter),
             register_optimizer_step_post_hook(leave)]

    def run(main, argv, sync_free=True, cuda=False):
        mode.seen.clear()
        mode.active, mode.sync_free, mode.count_opt = True, sync_free, cuda
        try:
            with mode, cuda_syncs(mode.seen) if cuda else contextlib.nullcontext():
                main([*argv, "--device", "cuda" if cuda else "cpu"])
        finally:
            mode.active = False
        return collections.Counter(mode.seen)
    yield run
    for h in hooks:
        h.remove()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """8x8 images; a tiny TrigFlow diffusion model, a tiny 1-RF and its pairs (the teachers), 3 steps each."""
    root = tmp_path_factory.mktemp("sync")
    np.save(root / "imgs.npy", np.random.default_rng(0).integers(0, 256, (24, 8, 8, 3), dtype=np.uint8))
    common = ["--preset", "tiny", "--data", str(root / "imgs.npy"), "--root", str(root)]
    scm.main([*common, "--mode", "diffusion", "--iters", "3", "--eval_n", "4", "--out", str(root / "diff")])
    rectified_flow.main([*common, "--stage", "1rf", "--iters", "3", "--eval_n", "4", "--out", str(root / "rf")])
    rectified_flow.main([*common, "--stage", "pairs", "--n_pairs", "16", "--out", str(root / "rf")])
    return root


IMG = lambda f: ["--preset", "tiny", "--data", str(f / "imgs.npy"), "--root", str(f), "--eval_n", "4"]  # noqa: E731
RF, DIFF = (lambda f: str(f / "rf" / "ckpt.pt")), (lambda f: str(f / "diff" / "ckpt.pt"))  # noqa: E731
CASES = {  # name: (main, argv of the files' folder); every mode and stage that trains, images or 2-D points
    "imm, EDM augmentation": (imm.main, lambda f: [*IMG(f), "--augment", "0.12"]),
    "imm 2-D": (imm.main, lambda f: ["--batch", "64", "--eval_n", "16"]),
    "flow_map lsd": (flow_map.main, lambda f: [*IMG(f), "--mode", "lsd"]),
    "flow_map psd": (flow_map.main, lambda f: [*IMG(f), "--mode", "psd"]),
    "flow_map esd": (flow_map.main, lambda f: [*IMG(f), "--mode", "esd"]),
    "flow_map meanflow": (flow_map.main, lambda f: [*IMG(f), "--mode", "meanflow", "--augment", "0.12"]),
    "flow_map lmd": (flow_map.main, lambda f: [*IMG(f), "--mode", "lmd", "--teacher", RF(f)]),
    "flow_map emd": (flow_map.main, lambda f: [*IMG(f), "--mode", "emd", "--teacher", RF(f)]),
    "flow_map fmm 2-D": (flow_map.main, lambda f: ["--mode", "fmm", "--batch", "64", "--eval_n", "16"]),
    "scm diffusion": (scm.main, lambda f: [*IMG(f), "--mode", "diffusion", "--augment", "0.12"]),
    "scm sct": (scm.main, lambda f: [*IMG(f), "--mode", "sct", "--teacher", DIFF(f)]),
    "scm scd": (scm.main, lambda f: [*IMG(f), "--mode", "scd", "--teacher", DIFF(f)]),
    "rectified_flow 1rf 2-D": (rectified_flow.main, lambda f: ["--stage", "1rf", "--batch", "64", "--eval_n", "16"]),
    "rectified_flow 2rf": (rectified_flow.main, lambda f: [*IMG(f), "--stage", "2rf", "--teacher", RF(f), "--pairs",
                                                           str(f / "rf" / "pairs")]),
    "distributional, teacher D": (distributional.main, lambda f: [*IMG(f), "--teacher", RF(f)]),
    # VGG alone (EfficientNet is one more frozen conv net), batch 2 and 64 px (the test below): ~80 s a run otherwise
    "distributional, projected D": (distributional.main, lambda f: [*IMG(f), "--teacher", RF(f), "--disc", "projected",
                                                                    "--disc_weights", "random", "--disc_backbones",
                                                                    "vgg", "--batch", "2"]),
}


def steps(argv, n, out):
    return [*argv, "--iters", str(n), "--log_every", "1000", "--ckpt_every", "1000", "--out", str(out)]


@pytest.mark.parametrize("device", ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
@pytest.mark.parametrize("case", CASES)
def test_two_more_steps_read_nothing_back(case, device, files, watch, tmp_path, monkeypatch):
    main, argv = CASES[case]
    init = distributional.ProjectedD.__init__  # the backbone at 64 px, not GDD's 224: the same operations
    monkeypatch.setattr(init, "__defaults__", (*init.__defaults__[:-1], 64))
    three, five = (watch(main, steps(argv(files), n, tmp_path / str(n)), cuda=device == "cuda") for n in (3, 5))
    assert sum(three.values()) > 0  # the run's own reads (evaluation, checkpoint) are seen
    assert five == three, f"{case}: reads in two more steps {dict(five - three)}"


def test_controls_a_read_in_the_step_is_seen(files, watch, tmp_path, monkeypatch):
    """The check can fail: a loss that calls .item() each step, and the Guard on its CPU branch (it reads its flag to
    decide whether to step), are each seen once per step."""
    main, argv = CASES["imm 2-D"]
    loss = imm.imm_loss

    def with_item(*a):
        out = loss(*a)
        out[0].item()
        return out
    monkeypatch.setattr(imm, "imm_loss", with_item)
    three, five = (watch(main, steps(argv(files), n, tmp_path / f"item{n}")) for n in (3, 5))
    assert list((five - three).values()) == [2] and next(iter(five - three)).startswith("imm.py:")
    monkeypatch.setattr(imm, "imm_loss", loss)
    three, five = (watch(main, steps(argv(files), n, tmp_path / f"cpu{n}"), sync_free=False) for n in (3, 5))
    assert list((five - three).values()) == [2] and next(iter(five - three)).startswith("common.py:")


def test_cuda_warnings_are_counted(monkeypatch):
    """The GPU branch's counter (CUDA's sync debug mode needs a GPU; its switch is replaced here): a synchronising
    call's warning is counted once, another warning is not, and the warning filters are restored."""
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    seen, filters = collections.Counter(), list(warnings.filters)
    with cuda_syncs(seen):
        warnings.warn("called a synchronizing CUDA operation")
        warnings.warn("something else")
    assert seen == {"torch cuda sync": 1} and modes == [1, 0] and warnings.filters == filters
