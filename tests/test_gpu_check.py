"""benchmarks/gpu_check.py --quick on the CPU (one thread, a fabricated Fashion-MNIST, a temporary results folder):
every section writes finite numbers into the JSON and the Markdown; a run past its deadline keeps what it measured
and marks the rest skipped; benchmarks/results takes no CPU run.

Speed itself is never asserted here (speed targets live in benchmarks/, not in timed tests).
"""
import contextlib
import gzip
import json
import math
import os
import sys
import time
import types

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
from cli import guarded  # noqa: E402


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmark scripts import as modules
import fashion as fb  # noqa: E402
import gpu_check as gc  # noqa: E402
import throughput as tp  # noqa: E402


def _carry(d):
    """A carry folder as --prepare lays it out, with 320 / 160 fabricated 28x28 images of 10 classes (a bright band
    whose height is the class, over noise) in Debian's gzipped IDX files; no classifier (the run trains one)."""
    src = d / "fashion-mnist"
    src.mkdir(parents=True)
    g = np.random.default_rng(0)
    for split, n in (("train", 320), ("t10k", 160)):
        y = g.integers(0, 10, n).astype(np.uint8)
        x = g.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, k in enumerate(y):
            x[i, 2 + 2 * k:6 + 2 * k, 4:24] = 220
        for kind, a in (("images-idx3", x), ("labels-idx1", y)):
            header = bytes([0, 0, 8, a.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in a.shape)
            with gzip.open(src / f"{split}-{kind}-ubyte.gz", "wb") as f:
                f.write(header + a.tobytes())
    return d


def _numbers(x):
    if isinstance(x, dict):
        return [v for y in x.values() for v in _numbers(y)]
    if isinstance(x, list):
        return [v for y in x for v in _numbers(y)]
    return [x] if isinstance(x, (int, float)) and not isinstance(x, bool) else []


def test_quick_run_writes_every_section(tmp_path):
    res = tmp_path / "res"
    rep = gc.main(["--quick", "--results", str(res), "--carry", str(_carry(tmp_path / "carry")), "--work",
                   str(tmp_path / "work")])
    on_disk = json.loads((res / "gpu_cpu.json").read_text())
    assert on_disk["sections"].keys() == set(gc.DEFAULT_SECTIONS) and json.loads(json.dumps(rep)) == on_disk
    assert all(math.isfinite(v) for v in _numbers(on_disk))  # no NaN or inf anywhere
    S = on_disk["sections"]
    assert all(S[s]["status"] == "done" for s in gc.DEFAULT_SECTIONS), {s: S[s]["status"] for s in gc.DEFAULT_SECTIONS}
    thr = S["throughput"]["records"]
    assert {r["method"] for r in thr} == set(gc.QUICK_METHODS)
    for r in thr:
        assert r["status"] == "ok" and r["train_img_per_s"] > 0 and r["sample_img_per_s_2step"] > 0, r
        assert r["vs_fm"] > 0 and r["train_flops_per_img"] == round(3 * r["fwd_per_step"] * r["fwd_flops_per_img"])
        assert (r["opt_step_ms"] is None) == (r["guard_step_ms"] is None) == tp.METHODS[r["method"]].own_update, r
    assert any(r.get("compile_backend") for r in thr)  # the child-process record came back
    # rates only (no timing comparison in a test: on a loaded CPU the 1-NFE timing can come out slower)
    assert all(r["status"] == "ok" and math.isfinite(r["img_per_s_1nfe"]) and r["img_per_s_1nfe"] > 0
               and math.isfinite(r["img_per_s_2nfe"]) and r["img_per_s_2nfe"] > 0 for r in S["sampling"]["records"])
    o = S["sampling"]["one_step_50k"]
    assert o["complete"] and o["n"] == gc.sizes(True).n_50k and o["seconds"] > 0
    P = S["precision"]
    assert P["scm_tangent"]["passed"] and P["scm_tangent"]["dropout_same_mask"]  # no TF32 on a CPU: equal
    assert P["scm_tangent"]["dropout_rel_diff_control"] > 0.1  # the control's masks differ
    near_T = P["imm_embedding"]["rows"][0]
    assert 0 < near_T["t_minus_r_fp32"] < 1e-6 and near_T["delta_over_e"] > 0  # k = 15: t - r ~ 1.8e-7
    assert P["imm_embedding"]["time_fp64"] and near_T["fp32_rel_err"] > 1e-3  # an fp32 path loses part of Delta
    for r in P["bf16_samples"]:
        assert r["status"] == "ok" and r["sample_rms_levels"] > 1 and r["rms_levels"] >= 0, r
    F = S["fashion"]
    assert [r["method"] for r in F["records"]] == list(gc.FASHION) and F["fd_floor"] >= 0
    for r in F["records"]:
        assert r["status"] == "ok" and all(r["fd"][k] >= 0 for k in ("1", "2")), r
        assert r["bf16_vs_fp32"]["rms_levels"] >= 0 and r["bf16_vs_fp32"]["batch"] > 0, r
    assert set(F["records"][0]["fd_reference"]) == {str(k) for k in gc.sizes(True).ref_steps}
    assert F["classifier"]["epochs"] == 1 and F["classifier"]["train_n"] == gc.QUICK_CLASSIFIER["train_n"]  # smoke size
    md = (res / "gpu_cpu.md").read_text()
    assert on_disk["meta"]["cuda"] is None and "· no CUDA device (CPU run) ·" in md  # not the CUDA build's version
    for head in ("## 1. Training throughput", "## 2. Sampling", "## 3. Precision checks", "## 4. Fashion-MNIST"):
        assert head in md
    assert (res / "gpu_cpu_throughput.png").stat().st_size > 0 and (res / "gpu_cpu_fashion.png").stat().st_size > 0


def test_deadline_keeps_what_was_measured(tmp_path):
    """A budget far too small: the first record runs, the others are skipped at the deadline, and the section after
    it is skipped; the files are written all the same. Then a rerun of that section alone keeps the first's."""
    res = tmp_path / "res"
    gc.main(["--quick", "--results", str(res), "--sections", "throughput,sampling", "--budget", "0.5", "--work",
             str(tmp_path / "work")])
    S = json.loads((res / "gpu_cpu.json").read_text())["sections"]
    st = [r["status"] for r in S["throughput"]["records"]]
    assert st[0] == "ok" and st[-1] == "skipped" and set(st) == {"ok", "skipped"}, st
    assert S["throughput"]["status"].startswith("partial")
    assert S["sampling"]["status"].startswith("skipped") and "fashion" not in S
    md = (res / "gpu_cpu.md").read_text()
    assert "| fm | fp32 | False |" in md
    table = md[md.index("| method | precision | compile | train img/s"):].split("\n\n")[0].splitlines()
    assert len({ln.count("|") for ln in table}) == 1 and any("skipped" in ln for ln in table), table  # as many
    # cells in a skipped record's row as in the header (GitHub drops the cells past the header's)
    # a rerun of one section keeps the others' results
    gc.main(["--quick", "--results", str(res), "--sections", "sampling", "--work", str(tmp_path / "work")])
    rep = json.loads((res / "gpu_cpu.json").read_text())
    assert rep["sections"]["throughput"] == S["throughput"] and rep["sections"]["sampling"]["status"] == "done"
    assert rep["meta"]["kept_sections"]["sections"] == ["throughput"]
    assert "Kept from the run of" in (res / "gpu_cpu.md").read_text()


def test_timed_fills_about_the_given_seconds():
    """throughput.timed with `seconds`: the call count follows the first two calls' duration, at least 3 and at
    most `iters`; without it, exactly `iters` calls."""
    import time
    import throughput as tp
    calls = []
    fn = lambda: (time.sleep(0.01), calls.append(1))[1] or len(calls)  # noqa: E731
    n, sec, last = tp.timed(fn, 100, torch.device("cpu"), seconds=0.08)
    assert 3 <= n <= 12 and len(calls) == n == last and sec >= 0.01 * n
    assert tp.timed(fn, 4, torch.device("cpu"), seconds=10.0)[0] == 4  # capped by iters
    assert tp.timed(fn, 2, torch.device("cpu"), seconds=1e-6)[0] == 3  # at least 3
    assert tp.timed(fn, 5, torch.device("cpu"))[0] == 5


def test_results_folder_takes_gpu_runs_only(tmp_path):
    with pytest.raises(common.UserError, match="full GPU runs only"):
        gc.parse(["--quick"])
    res, work = str(tmp_path / "r"), str(tmp_path / "w")
    with pytest.raises(common.UserError, match="unknown --sections"):
        gc.parse(["--quick", "--results", res, "--work", work, "--sections", "nope"])
    with pytest.raises(common.UserError, match="--sections names none; choose from throughput"):
        gc.parse(["--quick", "--results", res, "--work", work, "--sections", ","])  # (was 'unknown --sections []')


def test_prepare_refuses_a_bad_source_before_making_folders(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for f in fb.RAW_FILES:
        (src / f"{f}.gz").write_bytes(b"not gzip")
    carry, work = tmp_path / "carry", tmp_path / "work"
    guarded(capsys, lambda: gc.main(["--prepare", "--source", str(src), "--carry", str(carry), "--work", str(work)]),
            "train-images-idx3-ubyte.gz is not a readable gzip file (BadGzipFile)")
    assert not carry.exists() and not work.exists()


def _ctx(tmp_path):
    """A Context as main() makes it for a --quick run into tmp_path (no section run yet), with a minimal meta."""
    a = types.SimpleNamespace(quick=True, device="cpu", carry=str(tmp_path / "carry"), source=str(tmp_path / "src"),
                              work=str(tmp_path / "work"), results=str(tmp_path))
    ctx = gc.Context(a)
    ctx.clock = gc.Clock(gc.PLAN_S, gc.SECTIONS, gc.STARTUP_S)
    ctx.stem = str(tmp_path / "gpu_cpu")
    ctx.rep = dict(meta=dict(date="d", device_name="CPU", torch="t", cuda=None, commit="c", command="x",
                             plan_s=gc.PLAN_S, deadlines_s=ctx.clock.ends, planned_total_s=ctx.clock.total,
                             total_wall_s=0.0), sections={})
    return ctx


def test_save_writes_json_whatever_the_values(tmp_path):
    """A value JSON has no type for (a numpy number, a one-element tensor, a torch.device) is written as a number or
    its str: the JSON file stays JSON with every number in it (the Markdown's fallback sentence never replaces it)."""
    ctx = _ctx(tmp_path)
    rec = dict(method="fm", status="ok", img_per_s_1nfe=np.float32(2.5), seconds=torch.tensor(1.5),
               where=torch.device("cpu"))
    ctx.rep["sections"]["sampling"] = dict(status="done", records=[rec])
    ctx.save()
    rec = json.loads((tmp_path / "gpu_cpu.json").read_text())["sections"]["sampling"]["records"][0]
    assert rec["img_per_s_1nfe"] == 2.5 and rec["seconds"] == 1.5 and rec["where"] == "cpu", rec
    assert "| fm |" in (tmp_path / "gpu_cpu.md").read_text()


def test_a_report_bug_costs_no_measurement(tmp_path, monkeypatch, capsys):
    """markdown() failing (a report bug) leaves the JSON whole, puts its reason in the Markdown's place, and neither
    stops a section nor the run at its end (the tables printed last)."""
    def bug(rep):
        raise KeyError("a report bug")
    monkeypatch.setattr(gc, "markdown", bug)
    rep = gc.main(["--quick", "--results", str(tmp_path), "--sections", "precision", "--budget", "1e-6", "--work",
                   str(tmp_path / "work")])
    assert json.loads((tmp_path / "gpu_cpu.json").read_text()) == json.loads(json.dumps(rep))
    assert rep["sections"]["precision"]["status"].startswith("skipped")
    assert "could not be written (KeyError: 'a report bug')" in (tmp_path / "gpu_cpu.md").read_text()
    assert "could not be written" in capsys.readouterr().out


def test_throughput_heading_when_the_first_record_did_not_run(tmp_path):
    """The section's network heads its table even when its first record failed or was skipped (such a record has
    no `net` of its own)."""
    ctx = _ctx(tmp_path)
    ctx.rep["sections"]["throughput"] = dict(status="partial", net="ddpmpp", batch=128, warmup=3, timed_s=1.5, records=[
        dict(method="fm", precision="bf16", compile=False, status="error", error="CUDA error")])
    assert "## 1. Training throughput (ddpmpp, batch 128)" in gc.markdown(ctx.rep)


@pytest.mark.parametrize("kept", ["{broken", "[]", '{"meta": {}, "sections": {"throughput": []}}'])
def test_sections_rerun_refuses_an_unreadable_json(kept, tmp_path, capsys):
    """A --sections rerun reads the earlier JSON to keep the other sections: one that is not gpu_check's ends in one
    sentence, exit 2, before anything is measured or printed, and stays as it was."""
    (tmp_path / "gpu_cpu.json").write_text(kept)
    guarded(capsys, lambda: gc.main(["--quick", "--results", str(tmp_path), "--sections", "precision", "--work",
                                     str(tmp_path / "work")]), "a --sections rerun keeps")
    assert (tmp_path / "gpu_cpu.json").read_text() == kept


def test_child_gone_at_its_deadline_is_a_record(tmp_path, monkeypatch):
    """A compile child whose process group has exited between the timeout and the kill (ProcessLookupError) is
    recorded as killed at the deadline like any other, not an error that ends the throughput section."""
    kill = os.killpg

    def gone(pgid, sig):
        kill(pgid, sig)
        raise ProcessLookupError(3, "No such process")
    monkeypatch.setattr(gc.os, "killpg", gone)
    argv = ["--method", "fm", "--net", "tiny", "--batch", "2", "--sample_batch", "2", "--iters", "100000", "--warmup",
            "0", "--precision", "fp32", "--compile", "off", "--device", "cpu", "--lpips_res", "32"]
    rec = gc.run_child(dict(argv=argv, seconds=None, quick=True, work=str(tmp_path)), 1.0, True)
    assert rec["status"] == "error" and rec["error"].startswith("killed at the section deadline"), rec


def test_missing_carry_folder_is_named(tmp_path, capsys):
    """Without the carry folder (and without Debian's files) the fashion section's error names the folder
    --prepare fills, and the run's first lines and its meta say it is missing."""
    carry = tmp_path / "carry"
    rep = gc.main(["--quick", "--results", str(tmp_path), "--sections", "fashion", "--carry", str(carry),
                   "--source", str(tmp_path / "none"), "--work", str(tmp_path / "work")])
    status = rep["sections"]["fashion"]["status"]
    assert status.startswith("error: ") and f"{carry / 'fashion-mnist'}, which --prepare fills" in status, status
    assert rep["meta"]["carry"] == dict(folder=str(carry), data=False, classifier=False)
    assert f"carry folder {carry}: Fashion-MNIST MISSING" in capsys.readouterr().out


def test_section_status_counts_checks_that_failed(tmp_path, monkeypatch):
    """A precision check (kept under its own key, not in `records`) that raised makes its section 'done, 1 failed',
    not 'done'; the other checks still run."""
    def oom(ctx):
        raise torch.OutOfMemoryError("CUDA out of memory")
    monkeypatch.setattr(gc, "check_imm_embedding", oom)
    rep = gc.main(["--quick", "--results", str(tmp_path), "--sections", "precision", "--work", str(tmp_path / "w")])
    P = rep["sections"]["precision"]
    assert P["status"] == "done, 1 failed" and P["imm_embedding"]["status"] == "error", P["status"]
    assert P["scm_tangent"]["passed"] and all(r["status"] == "ok" for r in P["bf16_samples"])


def test_a_sticky_cuda_error_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    """After a sticky CUDA error (an illegal memory access) every CUDA call raises it, torch.cuda.empty_cache too:
    _free, run after each item and each section, raised it again outside any handler, so the run ended with a
    traceback and the failing section's status was never written. The item records the error, the section says so,
    the next checks and sections run (CUDA emulated: is_available and empty_cache)."""
    sticky = "CUDA error: an illegal memory access was encountered"

    def boom(*_):
        raise RuntimeError(sticky)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", boom)
    monkeypatch.setattr(gc, "check_imm_embedding", boom)
    rep = gc.main(["--quick", "--device", "cpu", "--results", str(tmp_path), "--sections", "precision",
                   "--work", str(tmp_path / "w")])
    P = rep["sections"]["precision"]
    assert P["status"] == "done, 1 failed" and P["imm_embedding"]["error"] == f"RuntimeError: {sticky}", P
    assert P["scm_tangent"]["passed"] and all(r["status"] == "ok" for r in P["bf16_samples"])
    assert json.load(open(tmp_path / "gpu_cpu.json"))["sections"]["precision"]["status"] == "done, 1 failed"


def test_child_needs_no_results_folder(tmp_path, monkeypatch):
    """A compile child writes its job's `out` file only: an unwritable benchmarks/results (or default scratch
    folder) on the GPU machine does not fail every compiled record."""
    monkeypatch.setattr(gc, "RESULTS", "/proc/results")
    job = json.dumps(dict(argv=["--method", "fm"], out=str(tmp_path / "o.json")))
    assert gc.parse(["--_child", job, "--work", "/proc/work"])._child["out"] == str(tmp_path / "o.json")


def test_child_killed_while_its_pipe_stays_open(tmp_path, monkeypatch):
    """A child killed at its deadline whose output pipe a process outside its process group still holds (its own
    session) costs a few seconds, not the run: the pipe is not read to its end."""
    child = tmp_path / "child.py"
    pid = tmp_path / "holder.pid"
    child.write_text(f"import subprocess, time\np = subprocess.Popen(['sleep', '40'], start_new_session=True)\n"
                     f"open({str(pid)!r}, 'w').write(str(p.pid))\ntime.sleep(40)\n")
    monkeypatch.setattr(gc, "__file__", str(child))
    monkeypatch.setattr(gc, "PIPE_WAIT_S", 0.5)
    argv = ["--method", "fm"] + ["x"] * 12
    t0 = time.time()
    rec = gc.run_child(dict(argv=argv, seconds=None, quick=True, work=str(tmp_path)), 1.0, True)
    wall = time.time() - t0
    with contextlib.suppress(OSError, ValueError):  # the pipe's holder, ended here
        os.kill(int(pid.read_text()), 9)
    assert rec["error"].startswith("killed at the section deadline") and wall < 20, rec


def test_paths_section_resumes_bitwise_and_measures_memory(tmp_path):
    """The second call's section (--sections paths) at smoke size: every method file's toy run stopped at 2 steps and
    resumed to 4 is its 4-step run, tensor for tensor; one memory record per quick method; the first call's sections
    are kept from the JSON, and the Markdown has section 5 with rows as wide as its headers."""
    res, work = tmp_path / "res", str(tmp_path / "work")
    gc.main(["--quick", "--results", str(res), "--sections", "precision", "--work", work])
    gc.main(["--quick", "--results", str(res), "--sections", "paths", "--work", work])
    rep = json.loads((res / "gpu_cpu.json").read_text())
    P = rep["sections"]["paths"]
    assert P["status"] == "done" and rep["meta"]["kept_sections"]["sections"] == ["precision"]
    assert [r["method"] for r in P["resume"]] == list(gc.RESUME_RUNS)
    assert all(r["bitwise"] and r["differ"] == 0 and r["tensors"] > 50 and r["steps"] == [4, 4] for r in P["resume"])
    t = P["torchrun"]  # imm.py under torchrun, one process (gloo here, NCCL on a GPU): its checkpoint, no stderr line
    assert t["status"] == "ok" and t["rc"] == 0 and t["step"] == 2 and t["world"] == "world 1" and t["stderr"] == [], t
    assert [r["method"] for r in P["records"]] == list(gc.QUICK_METHODS)
    assert all(r["status"] == "ok" and r["fits_batch"] == gc.sizes(True).batch for r in P["records"])
    md = (res / "gpu_cpu.md").read_text()
    assert "## 5. CUDA paths" in md and "| imm | fp32 |" in md and "--nproc_per_node=1 imm.py` (toy" in md
    for head in ("| method file |", "| method | preset batch |"):
        table = md[md.index(head):].split("\n\n")[0].splitlines()
        assert len({ln.count("|") for ln in table}) == 1, table


def test_paths_resume_check_sees_a_resume_that_loses_the_rng(tmp_path, monkeypatch):
    """The control: with the RNG states not restored, the resumed run draws other noise and the check says so."""
    ctx = types.SimpleNamespace(quick=True, device="cpu", work=str(tmp_path))
    monkeypatch.setattr(common, "restore_rng", lambda *a, **k: None)
    rec = gc.check_resume(ctx, "imm")
    assert not rec["bitwise"] and rec["differ"] > 0 and rec["first_differ"]


def test_memory_batches_are_the_presets():
    """MEM_BATCH: each throughput method's cifar10 preset batch, from the method files' presets."""
    import distributional, flow_map, imm, rectified_flow, scm  # noqa: E401

    def batch(mod, **given):
        return common.resolve_config(mod.Config, mod.PRESETS, "cifar10", given).batch
    want = dict(fm=batch(rectified_flow, stage="1rf"), imm=batch(imm), sct=batch(scm, mode="sct"),
                scd=batch(scm, mode="scd"), lsd=batch(flow_map, mode="lsd"), psd=batch(flow_map, mode="psd"),
                meanflow=batch(flow_map, mode="meanflow"), lmd=flow_map.PRESETS["cifar10"]["batch"],
                gdd=batch(distributional), gdd_i=batch(distributional),
                **{"2rf": batch(rectified_flow, stage="2rf"), "2rf_lpips": batch(rectified_flow, stage="2rf")})
    assert gc.MEM_BATCH == want and set(want) == set(tp.METHODS)


def test_the_default_run_leaves_out_paths(tmp_path):
    """(Folders under tmp_path: parse checks that --results and --work can be written, and a shared /tmp may hold a
    file of a short name such as /tmp/x.)"""
    args = ["--quick", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "work")]
    a = gc.parse(args)
    assert a.sections == list(gc.DEFAULT_SECTIONS) and "paths" not in a.sections
    assert gc.parse([*args, "--sections", "paths"]).sections == ["paths"]


def test_paths_section_out_of_time_says_why(tmp_path, capsys):
    """With no section time left every resume and memory item is skipped, and its printed line says why (it printed
    'skipped: ' and nothing after it: the note was not the error it read)."""
    ctx = _ctx(tmp_path)
    ctx.clock.left = lambda s: -1.0
    ctx.sec = ctx.rep["sections"]["paths"] = {}
    gc.section_paths(ctx)
    out = capsys.readouterr().out
    assert all(r["status"] == "skipped" for r in ctx.sec["resume"] + ctx.sec["records"] + [ctx.sec["torchrun"]])
    assert out.count("skipped: out of section time") == len(gc.RESUME_RUNS) + 1 + len(gc.QUICK_METHODS), out


def test_torchrun_check_records_a_failure_and_kills_a_hang(tmp_path, monkeypatch):
    """check_torchrun: a run that exits with an error is a record with its exit status and stderr's last lines; one
    that hangs (a collective never answered) is killed at the timeout with its worker, not waited for."""
    ctx = _ctx(tmp_path)
    monkeypatch.setitem(gc.RESUME_RUNS, "imm", ["--batch", "15"])  # not a multiple of M = 4: refused
    rec = gc.check_torchrun(ctx, 60)
    assert rec["status"] == "error" and rec["rc"] != 0 and rec["step"] is None, rec
    assert "--batch 15 must be a multiple of --M 4" in rec["error"], rec
    hang = tmp_path / "hang"  # an imm.py that hangs, its pid written first
    hang.mkdir()
    (hang / "imm.py").write_text(f"import os, time\nopen({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid()))\n"
                                 f"time.sleep(120)\n")
    monkeypatch.setattr(gc, "REPO", str(hang))
    t0 = time.time()  # 15 s: torchrun's launcher starts its worker ~2 s in here, unloaded (5 s killed it unstarted
    rec = gc.check_torchrun(ctx, 15)  # on a loaded machine: no pid file, a FileNotFoundError below)
    assert rec["status"] == "error" and rec["error"].startswith("killed after 15 s") and time.time() - t0 < 40, rec
    pid = int((tmp_path / "pid").read_text())
    with pytest.raises(ProcessLookupError):  # the worker too, not only torchrun's launcher
        for _ in range(50):
            os.kill(pid, 0)
            time.sleep(0.1)


def test_memory_check_halves_on_each_kind_of_out_of_memory(tmp_path, monkeypatch):
    """check_memory halves the batch on torch's OutOfMemoryError and on a library's own failed allocation near the
    limit (cuBLAS's CUBLAS_STATUS_ALLOC_FAILED, a bare "CUDA error: out of memory": RuntimeErrors, which ended the
    method's record as an error); any other error still propagates."""
    ctx, seen = _ctx(tmp_path), []
    errors = {8: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
              4: RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
              2: RuntimeError("CUDA error: out of memory")}

    def measure(a):
        seen.append(a.batch)
        if a.batch in errors:
            raise errors[a.batch]
        return dict(max_mem_gib=None, precision="fp32")
    monkeypatch.setattr(tp, "measure", measure)
    rec = gc.check_memory(ctx, "fm", lambda: 1.0)
    assert seen == [8, 4, 2, 1] and rec["fits_batch"] == 1 and rec["status"] == "ok", rec
    assert [t["result"] for t in rec["tries"]] == ["out of memory"] * 3 + ["fits"]
    assert gc._out_of_memory(RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED"))  # 9's
    errors[8] = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    with pytest.raises(RuntimeError, match="shapes"):
        gc.check_memory(ctx, "fm", lambda: 1.0)



def test_a_chain_of_reruns_names_each_kept_sections_own_run(tmp_path, monkeypatch):
    """A --sections rerun after another rerun keeps sections of two earlier runs: each is named with the run that
    measured it (the meta held one date and commit, the last JSON's, for all of them)."""
    res, work = tmp_path / "res", str(tmp_path / "work")
    for sec in ("precision", "sampling"):
        gc.main(["--quick", "--results", str(res), "--sections", sec, "--work", work])
    rep = json.loads((res / "gpu_cpu.json").read_text())
    rep["sections"]["precision"]["run_date"], rep["meta"]["date"] = "2000-01-01 00:00 UTC", "2000-01-02 00:00 UTC"
    rep["sections"]["sampling"]["run_date"] = "2000-01-02 00:00 UTC"
    (res / "gpu_cpu.json").write_text(json.dumps(rep))
    monkeypatch.setattr(gc, "check_torchrun", lambda ctx, timeout: dict(  # (its run: the test above)
        method="imm", status="ok", rc=0, step=2, wall_s=0.0, stderr=[], world="world 1"))
    gc.main(["--quick", "--results", str(res), "--sections", "paths", "--work", work])
    rep = json.loads((res / "gpu_cpu.json").read_text())
    assert rep["sections"]["precision"]["run_date"] == "2000-01-01 00:00 UTC"
    assert rep["sections"]["paths"]["run_date"] == rep["meta"]["date"]
    md = (res / "gpu_cpu.md").read_text()
    assert "Kept from the run of 2000-01-01 00:00 UTC" in md and "Kept from the run of 2000-01-02 00:00 UTC" in md


def test_a_file_from_before_section_runs_names_its_kept_sections_run(tmp_path):
    """A JSON written before sections carried their run (run_date, ...) and itself a --sections rerun: the sections it
    kept were measured by the run its meta's kept_sections names, not by the run of its meta's date."""
    res, work = tmp_path / "res", str(tmp_path / "work")
    gc.main(["--quick", "--results", str(res), "--sections", "precision,sampling", "--budget", "1e-6", "--work", work])
    rep = json.loads((res / "gpu_cpu.json").read_text())
    for sec in rep["sections"].values():  # as the earlier code wrote it: precision kept from run A by rerun B
        for k in ("run_date", "run_commit", "run_torch"):
            sec.pop(k)
    rep["meta"].update(date="2000-01-02 00:00 UTC", commit="bbb",
                       kept_sections=dict(sections=["precision"], date="2000-01-01 00:00 UTC", commit="aaa", torch="t"))
    (res / "gpu_cpu.json").write_text(json.dumps(rep))
    gc.main(["--quick", "--results", str(res), "--sections", "throughput", "--budget", "1e-6", "--work", work])
    S = json.loads((res / "gpu_cpu.json").read_text())["sections"]
    assert (S["precision"]["run_date"], S["precision"]["run_commit"]) == ("2000-01-01 00:00 UTC", "aaa")
    assert (S["sampling"]["run_date"], S["sampling"]["run_commit"]) == ("2000-01-02 00:00 UTC", "bbb")
    md = (res / "gpu_cpu.md").read_text()
    assert "Kept from the run of 2000-01-01 00:00 UTC (commit `aaa`): precision." in md
    assert "Kept from the run of 2000-01-02 00:00 UTC (commit `bbb`): sampling." in md


def test_the_fashion_calibration_times_three_training_steps(tmp_path, monkeypatch):
    """calibrate (the full run's fashion section only: --quick skips it) builds the 1-RF, IMM and sCT training steps
    at the fashion net and batch in their `small` presets' precision and returns positive steps per second; each
    rate is the one tp.timed reports (a stand-in clock: n steps in n / rate seconds)."""
    built, fake = [], {"fm": 4.0, "imm": 2.0, "sct": 1.0}

    def timed(step, iters, dev, seconds):
        step()
        return 8, 8 / fake[built[-1].method], None
    real_build = tp.build
    monkeypatch.setattr(tp, "build", lambda a: built.append(a) or real_build(a))
    monkeypatch.setattr(tp, "timed", timed)
    sz = gc.sizes(True)
    assert gc.calibrate(_ctx(tmp_path), sz) == pytest.approx(fake)
    assert [(a.method, a.net, a.batch) for a in built] == [(m, sz.f_net, sz.f_batch) for m in ("fm", "imm", "sct")]
    assert [a.precision for a in built] == ["bf16", "tf32", "bf16"]  # the small presets' (IMM's: TF32, as imm's)


def test_prepare_fills_a_carry_the_device_run_reuses(tmp_path, capsys):
    """--prepare (the CPU half of a GPU run) copies the four .gz files, trains the full-recipe classifier once and
    computes its reference statistics into the carry folder; on the device fashion_root unpacks that carry into a
    fresh work folder, where the full run's classifier call reuses the file (not trained again) and the reference
    statistics are a cache hit (never computed on the device)."""
    src = _carry(tmp_path / "debian") / "fashion-mnist"
    carry = tmp_path / "carry"
    gc.main(["--prepare", "--source", str(src), "--carry", str(carry), "--work", str(tmp_path / "w1")])
    assert sorted(os.listdir(carry / "fashion-mnist")) == sorted(f + ".gz" for f in fb.RAW_FILES)
    assert all((carry / "fashion-mnist" / f).read_bytes() == (src / f).read_bytes() for f in os.listdir(src))
    refs = os.listdir(carry / "data" / "fid_refs")
    assert len(refs) == 1 and refs[0].startswith("fashion_mnist-fashion_classifier-"), refs
    assert "carry folder" in capsys.readouterr().out
    a = types.SimpleNamespace(quick=False, device="cpu", carry=str(carry), source=str(tmp_path / "nowhere"),
                              work=str(tmp_path / "w2"), results=str(tmp_path))
    root, raw = gc.fashion_root(gc.Context(a))
    det_path, cls = fb.classifier(root, raw, torch.device("cpu"), fb.CLS_RECIPE)
    assert cls["reused"] and cls["epochs"] == fb.CLS_RECIPE["epochs"]
    env = common.setup("cpu", 0, "fp32")
    det = common.load_detector(det_path, env)
    data = common.load_data("fashion_mnist", root, env, 0, False)
    assert os.listdir(os.path.join(root, "fid_refs")) == refs == [f"{data.key}-{det.key}.npz"]


def test_memory_record_names_gpus_for_gdd_and_accum_elsewhere(tmp_path, capsys, monkeypatch):
    """The memory record's number is ceil(preset batch / the batch that fits): the --accum a one-GPU run needs, but for
    gdd/gdd_i (distributional.py has no --accum) the GPUs the preset's batch of 256 needs; the printed line and the
    Markdown say which."""
    ctx = _ctx(tmp_path)
    ctx.quick = False
    ctx.sec = ctx.rep["sections"]["paths"] = {}
    monkeypatch.setattr(gc, "RESUME_RUNS", ())
    monkeypatch.setattr(gc, "check_torchrun", lambda ctx, s: dict(method="imm", status="skipped", note="n"))
    monkeypatch.setattr(gc, "MEM_BATCH", dict(fm=512, gdd=256))
    monkeypatch.setattr(tp, "measure", lambda a: dict(max_mem_gib=30.0, precision="bf16") if a.batch <= 64 else
                        (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")))
    monkeypatch.setattr(gc, "_free", lambda: None)
    gc.section_paths(ctx)
    out = capsys.readouterr().out
    assert "memory fm        batch 64 of 512: 30.0 GiB, --accum 8" in out, out
    assert "memory gdd       batch 64 of 256: 30.0 GiB, GPUs 4" in out, out
    md = gc.markdown(ctx.rep)
    assert "| --accum (gdd: GPUs) |" in md and "for gdd/gdd_i, the GPUs its batch needs" in md
    assert "| gdd | 256 | 64 | 30.0 | 4 |" in md and "| fm | 512 | 64 | 30.0 | 8 |" in md, md
