"""Side-by-side 2-D benchmark of every method on equal terms.

Every method trains common.py's MLP (residual blocks, 64 time channels; IMM and the flow maps feed it a second time)
at its file's `toy` preset size: width 128 x 3 blocks for 1-RF, 2-RF++ and GDD / GDD-I (the 1-RF teacher's network),
64 x 3 for IMM, LSD, PSD, MeanFlow and LMD, 64 x 4 for sCT and sCD (their TrigFlow teacher's), on the same 2-D data
sets with the same number of training examples seen.
The distillation methods pay for their teacher out of that budget: the teacher sees half of it and the student the other
half (teacher + student = the budget), and 2-RF++ additionally pays its teacher's pair generation in wall-clock time.
Each method is run through its own command line (README, "The command-line contract"), exactly as a user would:

    method     file                command (B = batch, E = examples budget)
    1-RF       rectified_flow.py   --stage 1rf, E examples (the baseline; Euler sampler, K NFE for K steps)
    2-RF++     rectified_flow.py   1-RF teacher (E/2) -> --stage pairs (Heun 18) -> --stage 2rf (E/2)
    IMM        imm.py              E examples from scratch
    sCT, sCD   scm.py              TrigFlow diffusion teacher (E/2) -> --mode sct / scd from its EMA (E/2)
    LSD, PSD,  flow_map.py         E examples from scratch (--mode lsd / psd / meanflow)
    MeanFlow
    LMD        flow_map.py         1-RF teacher (E/2) -> --mode lmd (E/2)
    GDD, GDD-I distributional.py   1-RF teacher (E/2) -> GAN fine-tune (E/2), --freeze none / gdd_i

Other hyper-parameters are each file's `toy` preset (its paper-derived 2-D recipe), except sCM's tangent warm-up
H, given in iterations: 20 % of the student's iterations here (the toy presets' H = 210 of 230 iterations for sCT and
230 of 280 for sCD are written for those run lengths). Samples come from `M.py sample` of the EMA weights
with the same noise seed for every method, K in {1, 2, 4, 8}; the scores are the sliced Wasserstein distance
(common.swd) and the MMD^2 (common.mmd2) to a held-out draw of the data set, with the floor of the same
statistics between two independent held-out draws, and the 1-RF with 100 Euler steps as the many-step
reference. Each (data set, seed) cell runs in its own process (`--jobs` at a time, one thread each).

    python benchmarks/toy.py --quick          # 2 CPU cores, ~12 min: 3 data sets x 2 seeds, 300k examples
    python benchmarks/toy.py                  # full: 4 data sets x 3 seeds, 600k examples (about 1.5 h on 2 cores)
    python benchmarks/toy.py --datasets moons --seeds 0 --budget 100000 --methods 1-RF,LSD --results /tmp/r

Writes DIR/toy.json (every raw number, settings, machine, date, commit), DIR/toy.md (mean +- std over seeds) and
DIR/toy_samples.png (one row per method, one column per step count; seed 0) and DIR/toy_curves.png (SWD against
steps, one panel per data set), DIR = benchmarks/results unless --results says otherwise.
"""
import argparse, contextlib, datetime, importlib, io, json, math, os, platform, re, shutil, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import numpy as np
import torch

import common as C

STEPS = (1, 2, 4, 8)
DATASETS = ("8gaussians", "moons", "checkerboard", "spirals")
# name -> (file, teacher key or None, argv of the student run); a teacher takes half the budget
METHODS = {
    "1-RF": ("rectified_flow", None, ["--stage", "1rf"]),
    "2-RF++": ("rectified_flow", "rf", ["--stage", "2rf"]),
    "IMM": ("imm", None, []),
    "sCT": ("scm", "trig", ["--mode", "sct"]),
    "sCD": ("scm", "trig", ["--mode", "scd"]),
    "LSD": ("flow_map", None, ["--mode", "lsd"]),
    "PSD": ("flow_map", None, ["--mode", "psd"]),
    "MeanFlow": ("flow_map", None, ["--mode", "meanflow"]),
    "LMD": ("flow_map", "rf", ["--mode", "lmd"]),
    "GDD": ("distributional", "rf", ["--freeze", "none", "--teacher_iters", "0"]),
    "GDD-I": ("distributional", "rf", ["--freeze", "gdd_i", "--teacher_iters", "0"]),
}
TEACHERS = {  # teacher key -> (file, argv); trained once per cell on half the budget
    "rf": ("rectified_flow", ["--stage", "1rf"]),
    "trig": ("scm", ["--mode", "diffusion"]),
}
QUIET = ["--log_every", "1000000", "--ckpt_every", "1000000", "--eval_n", "256"]  # no mid-run evaluation
SAMPLE_EXTRA = {"rectified_flow": ["--solver", "euler"]}  # 1-RF: Euler, so K steps = K NFE (2-RF: its own rule)


# =============================================================================== one cell: data set x seed
def _cli(module, argv, log):
    """Run `module.main(argv)` in this process, its prints into `log`; returns the wall-clock seconds."""
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        log.write(f"$ python {module}.py {' '.join(argv)}\n")
        importlib.import_module(module).main(argv)
    return time.perf_counter() - t0


def _samples(module, ckpt, steps, n, seed, path, log, extra=()):
    """`module.py sample` at each K -> {K: (n, 2) float tensor}."""
    argv = ["sample", "--ckpt", ckpt, "--steps", ",".join(map(str, steps)), "--n", str(n), "--batch", str(n),
            "--seed", str(seed), "--device", "cpu", "--out", path, *extra]
    _cli(module, argv, log)
    stem = os.path.splitext(path)[0]
    one = len(steps) == 1
    return {K: torch.from_numpy(np.load(path if one else f"{stem}_{K}step.npy")) for K in steps}


def scores(x, ref):
    return dict(swd=C.swd(x, ref), mmd=C.mmd2(x, ref))


def run_cell(dataset, seed, budget, batch, n_eval, methods, work):
    """Train the teachers and every method on one (data set, seed); returns a list of records."""
    torch.set_num_threads(1)
    shutil.rmtree(work, ignore_errors=True)  # the method files resume from DIR/ckpt.pt: never reuse an old run
    os.makedirs(work)
    log = open(os.path.join(work, "log.txt"), "a")
    g = torch.Generator().manual_seed(C.derive_seed(seed, "toy-benchmark", dataset))
    held, held2 = C.toy_sample(dataset, n_eval, g), C.toy_sample(dataset, n_eval, g)
    common_argv = ["--data", dataset, "--seed", str(seed), "--device", "cpu", "--batch", str(batch), *QUIET]
    full, half = max(1, budget // batch), max(1, budget // (2 * batch))
    sample_seed = 10_000 + seed
    recs = [dict(dataset=dataset, seed=seed, method="data floor", **scores(held2, held))]

    teachers = {}  # key -> (ckpt, wall seconds, examples)
    for key in sorted({METHODS[m][1] for m in methods} - {None}):
        file, argv = TEACHERS[key]
        out = os.path.join(work, f"teacher-{key}")
        wall = _cli(file, [*argv, *common_argv, "--iters", str(half), "--out", out], log)
        teachers[key] = (os.path.join(out, "ckpt.pt"), wall, half * batch)
    for name in methods:
        file, key, argv = METHODS[name]
        iters = half if key else full
        out = os.path.join(work, name)
        extra, wall, pre = [], 0.0, 0
        if key:
            ckpt, t_wall, pre = teachers[key]
            wall += t_wall
            if name == "2-RF++":  # pairs from the 1-RF teacher (Heun 18), then 2-RF++ initialised from its EMA
                out = os.path.dirname(ckpt)
                pair_argv = common_argv[:6]  # data, seed, device: --stage pairs refuses the training options
                wall += _cli(file, ["--stage", "pairs", *pair_argv, "--out", out], log)
                out = os.path.join(out, "2rf")
            else:
                extra = ["--teacher", ckpt]
        if file == "scm":
            extra += ["--H", str(max(1, iters // 5))]  # 20 % (module docstring; the toy presets: 210 / 230, 230 / 280)
        stage_out = os.path.dirname(out) if name == "2-RF++" else out
        wall += _cli(file, [*argv, *common_argv, *extra, "--iters", str(iters), "--out", stage_out], log)
        ckpt = os.path.join(out, "ckpt.pt")
        xs = _samples(file, ckpt, STEPS, n_eval, sample_seed, os.path.join(work, f"{name}.npy"), log,
                      SAMPLE_EXTRA.get(file, []) if name == "1-RF" else [])
        rec = dict(dataset=dataset, seed=seed, method=name, examples=pre + iters * batch, teacher_examples=pre,
                   wall_s=wall, nfe={K: K for K in STEPS}, steps={})
        for K, x in xs.items():
            rec["steps"][K] = scores(x, held)
        recs.append(rec)
        if name == "1-RF":  # the many-step reference: the same checkpoint with 100 Euler steps
            x = _samples(file, ckpt, [100], n_eval, sample_seed, os.path.join(work, "1-RF-100.npy"), log,
                         SAMPLE_EXTRA[file])[100]
            recs.append(dict(dataset=dataset, seed=seed, method="1-RF, 100 Euler steps", examples=iters * batch,
                             wall_s=wall, nfe={100: 100}, steps={100: scores(x, held)}))
    log.close()
    return recs


# =============================================================================== report: table and figures
def _ms(vals):
    vals = [v for v in vals if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    s = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return m, s


def summarise(recs):
    """{dataset: {method: {swd: {K: (mean, std)}, mmd: ..., examples, wall_s}}} over seeds."""
    out = {}
    for r in recs:
        out.setdefault(r["dataset"], {}).setdefault(r["method"], []).append(r)
    summ = {}
    for ds, by in out.items():
        summ[ds] = {}
        for m, rs in by.items():
            if m == "data floor":
                summ[ds][m] = dict(swd=_ms([r["swd"] for r in rs]), mmd=_ms([r["mmd"] for r in rs]))
                continue
            Ks = sorted({int(K) for r in rs for K in r["steps"]})
            summ[ds][m] = dict(
                swd={K: _ms([r["steps"][str(K) if str(K) in r["steps"] else K]["swd"] for r in rs]) for K in Ks},
                mmd={K: _ms([r["steps"][str(K) if str(K) in r["steps"] else K]["mmd"] for r in rs]) for K in Ks},
                swd_range={K: (min(v), max(v)) for K in Ks
                           for v in [[r["steps"][str(K) if str(K) in r["steps"] else K]["swd"] for r in rs]]},
                examples=rs[0]["examples"], teacher_examples=rs[0].get("teacher_examples", 0),
                wall_s=_ms([r["wall_s"] for r in rs]), seeds=len(rs))
    return summ


def verdicts(summ, small=(1, 2)):
    """Methods that do not beat the 1-RF (mean SWD) at every small step count, per data set."""
    bad = {}
    for ds, by in summ.items():
        base = by["1-RF"]["swd"]
        for m, s in by.items():
            if m in ("1-RF", "data floor") or "100" in m:
                continue
            lost = [K for K in small if s["swd"][K][0] >= base[K][0]]
            if lost:
                bad.setdefault(m, []).append((ds, lost))
    return bad


def _f(ms, scale=1.0):
    m, s = ms
    return "-" if m is None else f"{m * scale:.3f} ± {s * scale:.3f}"


def markdown(meta, summ, bad):
    L = [f"# Toy benchmark ({meta['date']}, {meta['device']})", "",
         f"Command: `{meta['command']}` · commit `{meta['commit']}` · torch {meta['torch']} · "
         f"{meta['budget']:,} training examples per method (teacher + student) · batch {meta['batch']} · "
         f"seeds {meta['seeds']} · {meta['n_eval']:,} samples against {meta['n_eval']:,} held-out points · "
         f"{meta['total_wall_s'] / 60:.0f} min in all (1-min load average {meta['load_average_1min']['start']:.1f} at "
         f"the start, {meta['load_average_1min']['end']:.1f} at the end: other jobs inflate the wall-clock column).",
         "",
         "SWD = sliced Wasserstein-1 (lower is better), MMD² × 10³ (RBF mix); mean ± std over seeds. Every "
         "few-step method uses K network evaluations for K steps (NFE = K); the 1-RF row uses Euler.", ""]
    for ds, by in summ.items():
        fl = by["data floor"]
        L += [f"## {ds}", "", f"Data-vs-data floor: SWD {_f(fl['swd'])}, MMD² × 10³ {_f(fl['mmd'], 1e3)}.", "",
              "| method | examples (teacher) | wall s | SWD K=1 | K=2 | K=4 | K=8 | MMD² K=1 | K=2 | K=4 | K=8 |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for m, s in by.items():
            if m == "data floor":
                continue
            Ks = [100] if "100" in m else list(STEPS)
            sw = [_f(s["swd"][K]) for K in Ks] + [""] * (4 - len(Ks))
            mm = [_f(s["mmd"][K], 1e3) for K in Ks] + [""] * (4 - len(Ks))
            ex = f"{s['examples'] / 1e3:.0f}k" + (f" ({s['teacher_examples'] / 1e3:.0f}k)" if s["teacher_examples"]
                                                  else "")
            L.append(f"| {m} | {ex} | {s['wall_s'][0]:.0f} | " + " | ".join(sw + mm) + " |")
        L.append("")
    L += ["## Few-step methods against the 1-RF at the same number of steps (K = 1, 2)", ""]
    L += [f"- {m}: not better than the 1-RF on " + "; ".join(f"{ds} at K = {', '.join(map(str, ks))}" for ds, ks in v)
          for m, v in bad.items()] or ["- every few-step method beats the 1-RF at K = 1 and K = 2 on every data set."]
    return "\n".join(L) + "\n"


def _png(fig, dpi=80):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def plot(summ, samples, methods):
    """-> {file name: PNG bytes}: toy_curves.png, and toy_samples.png when there are samples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = {}
    if samples:  # one figure: rows = methods, columns = data set x K
        dss = list(samples)
        cols = [(ds, K) for ds in dss for K in STEPS]
        rows = ["data"] + [m for m in methods if all(m in samples[ds] for ds in dss)]
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.3 * len(cols), 1.3 * len(rows)), squeeze=False)
        for i, m in enumerate(rows):
            for j, (ds, K) in enumerate(cols):
                ax = axes[i][j]
                x = samples[ds]["data"] if m == "data" else samples[ds][m][K]
                ax.scatter(x[:, 0], x[:, 1], s=0.3, alpha=0.5, c="k" if m == "data" else "C0", linewidths=0)
                ax.set_xlim(-1.6, 1.6), ax.set_ylim(-1.6, 1.6), ax.set_xticks([]), ax.set_yticks([])
                if i == 0:
                    ax.set_title(f"{ds}\nK = {K}" if K == STEPS[0] else f"K = {K}", fontsize=7)
                if j == 0:
                    ax.set_ylabel(m, fontsize=7)
        fig.tight_layout(pad=0.1)
        out["toy_samples.png"] = _png(fig)
        plt.close(fig)
    dss = list(summ)
    fig, axes = plt.subplots(1, len(dss), figsize=(4 * len(dss), 3.4), squeeze=False)
    for ax, ds in zip(axes[0], dss):
        by = summ[ds]
        for i, m in enumerate(m for m in methods if m in by):  # mean over seeds, bars from min to max
            mean = [by[m]["swd"][K][0] for K in STEPS]
            lo = [mu - by[m]["swd_range"][K][0] for mu, K in zip(mean, STEPS)]
            hi = [by[m]["swd_range"][K][1] - mu for mu, K in zip(mean, STEPS)]
            ax.errorbar(STEPS, mean, yerr=[lo, hi], label=m, marker="os^Dv<>ph*XP"[i % 12], ms=3,
                        color=plt.cm.tab20(2 * i % 20 + (2 * i >= 20)), capsize=2)
        ax.axhline(by["data floor"]["swd"][0], color="k", ls=":", label="data floor")
        ref = [v for k, v in by.items() if "100" in k]
        if ref:
            ax.axhline(ref[0]["swd"][100][0], color="gray", ls="-.", label="1-RF, 100 steps")
        ax.set_xscale("log", base=2), ax.set_yscale("log"), ax.set_xticks(STEPS, [str(k) for k in STEPS])
        ax.set_title(ds), ax.set_xlabel("steps K (= NFE)"), ax.set_ylabel("SWD to held-out data (mean, min-max)")
    axes[0][-1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    out["toy_curves.png"] = _png(fig)
    plt.close(fig)
    return out


def _commit():
    try:
        return subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# =============================================================================== driver
def _cell(s):
    """--cell DATASET:SEED (internal: the worker of one cell) -> (data set, seed)."""
    ds, _, seed = s.partition(":")
    if ds not in DATASETS or not re.fullmatch(r"-?[0-9]+", seed):
        raise argparse.ArgumentTypeError(f"(internal) takes DATASET:SEED, got '{s}'")
    return ds, int(seed)


def parse(argv):
    p = C.Parser(description=__doc__.split("\n")[0])  # argparse's errors as one `error:` sentence
    p.add_argument("--quick", action="store_true", help="3 data sets, 2 seeds, 300k examples (~12 min, 2 cores)")
    p.add_argument("--datasets", default=None, help="comma list (default all four; --quick without spirals)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seeds", default=None, help="comma list (default 0,1,2; --quick 0,1)")
    p.add_argument("--budget", type=int, default=None, help="training examples per method (default 600k; quick 300k)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--n_eval", type=int, default=None, help="samples and held-out points (default 4000; quick 2000)")
    p.add_argument("--jobs", type=int, default=2, help="cells trained at once (one process and thread each)")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints (default /tmp/toy-benchmark)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--replot", action="store_true", help="rewrite toy.md and the figures from DIR/toy.json")
    p.add_argument("--cell", default=None, type=_cell, help=argparse.SUPPRESS)  # internal: writes --cell_out
    p.add_argument("--cell_out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    for k in ("datasets", "methods", "seeds"):  # an empty list ('', or ',') is refused, not taken as the default
        if getattr(a, k) is not None and "" in getattr(a, k).split(","):
            p.error(f"--{k} has an empty entry in '{getattr(a, k)}'; give a comma list without empty entries.")
    try:
        a.seeds = [int(s) for s in (a.seeds or ("0,1" if a.quick else "0,1,2")).split(",")]
    except ValueError:
        p.error(f"--seeds takes comma-separated integers, got '{a.seeds}'")
    for s in a.seeds:  # (each cell's command line would refuse it, after the other cells' work)
        C.check_value("seeds", int, s)
    a.budget = (300_000 if a.quick else 600_000) if a.budget is None else a.budget
    a.n_eval = (2000 if a.quick else 4000) if a.n_eval is None else a.n_eval
    a.datasets = (a.datasets or ",".join(DATASETS[:3] if a.quick else DATASETS)).split(",")
    a.methods = a.methods.split(",")
    a.work = a.work or os.path.join("/tmp", "toy-benchmark")
    if a.cell and not a.cell_out:
        p.error("--cell (internal) needs --cell_out FILE.")
    bad = [d for d in a.datasets if d not in DATASETS] + [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown data set(s) or method(s) {bad}; data sets: {', '.join(DATASETS)}; "
                f"methods: {', '.join(METHODS)}.")
    if "1-RF" not in a.methods:
        p.error("--methods must include 1-RF (the baseline every row is compared with).")
    if a.batch < 1 or a.budget < 2 * a.batch or a.jobs < 1 or a.n_eval < 10:
        p.error("--budget must be at least two batches, --batch and --jobs positive, --n_eval at least 10.")
    for d, what in ((a.work, "--work"), (a.results, "--results")):
        C.check_dir(d, what)
    return a


def main(argv=None):
    a = parse(argv)
    if a.cell:  # a worker: one (data set, seed)
        ds, seed = a.cell
        recs = run_cell(ds, seed, a.budget, a.batch, a.n_eval, a.methods, os.path.join(a.work, f"{ds}-{seed}"))
        with open(a.cell_out, "w") as f:
            json.dump(recs, f)
        return recs
    if a.replot:  # table and figures again from DIR/toy.json (and the scratch folder's samples if still there)
        path = os.path.join(a.results, "toy.json")
        try:  # everything made in memory first: a malformed file writes nothing
            with open(path) as f:
                old = json.load(f)
            summ, files = render(a.work, old["meta"], old["records"])
        except (OSError, ValueError, LookupError, TypeError, AttributeError, ArithmeticError) as e:
            raise C.UserError(f"--replot needs '{path}' as this script writes it (meta, records; here "
                              f"{type(e).__name__}: {e}).") from None
        write(a.results, files)
        return summ
    t0, load0, commit = time.time(), os.getloadavg()[0], _commit()  # load: other jobs inflate wall-clock
    cells = [(ds, s) for s in a.seeds for ds in a.datasets]
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.results, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    base = [sys.executable, os.path.abspath(__file__), "--budget", str(a.budget), "--batch", str(a.batch),
            "--n_eval", str(a.n_eval), "--methods", ",".join(a.methods), "--work", a.work]
    pending, running, recs = list(cells), [], []
    while pending or running:
        while pending and len(running) < a.jobs:
            ds, s = pending.pop(0)
            out = os.path.join(a.work, f"{ds}-{s}.json")
            print(f"[{time.time() - t0:6.0f} s] start {ds} seed {s}", flush=True)
            running.append(((ds, s), out, subprocess.Popen([*base, "--cell", f"{ds}:{s}", "--cell_out", out],
                                                           env=env, cwd=ROOT)))
        time.sleep(0.5)
        for item in [r for r in running if r[2].poll() is not None]:
            (ds, s), out, proc = item
            running.remove(item)
            if proc.returncode:
                raise SystemExit(f"toy benchmark: the cell {ds} seed {s} failed (exit {proc.returncode}); see "
                                 f"{os.path.join(a.work, f'{ds}-{s}', 'log.txt')}.")
            with open(out) as f:
                recs += json.load(f)
            print(f"[{time.time() - t0:6.0f} s] done  {ds} seed {s}", flush=True)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                       f"{a.jobs} cells at once, 1 thread each)",
                command="python benchmarks/toy.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                commit=commit, torch=torch.__version__, budget=a.budget, batch=a.batch, seeds=a.seeds,
                n_eval=a.n_eval, datasets=a.datasets, methods=a.methods, total_wall_s=time.time() - t0,
                load_average_1min=dict(start=load0, end=os.getloadavg()[0]))
    summ = report(a.results, a.work, meta, recs)
    print(f"wrote {a.results}/toy.json, toy.md, toy_samples.png, toy_curves.png ({time.time() - t0:.0f} s)")
    return summ


def report(results, work, meta, recs):
    """Write toy.json, toy.md and the figures of the records into RESULTS; -> the summary."""
    summ, files = render(work, meta, recs)
    write(results, files)
    return summ


def write(results, files):
    for name, data in files.items():
        with open(os.path.join(results, name), "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)


def render(work, meta, recs):
    """-> (summary, {file name: contents}): toy.json, toy.md and the figures from the records (the sample figure from
    WORK's seed-0 .npy files when they are there), made in memory."""
    seed0, samples = min(meta["seeds"]), {}
    for ds in meta["datasets"]:
        w = os.path.join(work, f"{ds}-{seed0}")
        if not all(os.path.exists(os.path.join(w, f"{m}_{K}step.npy")) for m in meta["methods"] for K in STEPS):
            samples = None  # --replot without the scratch folder: curves and table only
            break
        g = torch.Generator().manual_seed(C.derive_seed(seed0, "toy-benchmark", ds))
        samples[ds] = {"data": C.toy_sample(ds, meta["n_eval"], g).numpy()}
        for m in meta["methods"]:
            samples[ds][m] = {K: np.load(os.path.join(w, f"{m}_{K}step.npy")) for K in STEPS}
    summ = summarise(recs)
    order = ["data floor", "1-RF, 100 Euler steps", *meta["methods"]]
    summ = {ds: {m: summ[ds][m] for m in order if m in summ[ds]} for ds in meta["datasets"]}
    bad = verdicts(summ)
    files = {"toy.json": json.dumps(dict(meta=meta, records=recs, not_better_than_1rf=bad), indent=1),
             "toy.md": markdown(meta, summ, bad)}
    return summ, {**files, **plot(summ, samples, ["1-RF", *[m for m in meta["methods"] if m != "1-RF"]])}

if __name__ == "__main__":
    C.main_guard(main)
