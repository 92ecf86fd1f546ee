"""The default toy runs (`python M.py`, README's gallery and table) and the longer runs README.md and docs/ quote.

    python benchmarks/toy_defaults.py                       # the five default runs, one at a time (~5 min, 2 cores)
    python benchmarks/toy_defaults.py --longer --repeat 3   # three rounds of them, then the longer runs (~25 min)
    python benchmarks/toy_defaults.py --jobs 2 --results /tmp/r   # two runs at once (wall-clock less clean)

Each run is a method file's own command line in a subprocess, as a user starts it (README, "Quick start"), with one
thread (OMP_NUM_THREADS=1: the files' CPU default on a 2-core machine) and its run folder under --work. The longer
runs start from the default runs' teachers, as the docs describe them: the 2-RF stage alone from the default 1-RF and
its pairs, sCT and sCD alone from the default TrigFlow teacher, LSD and GDD (from the default 1-RF) run again with
more iterations. Wall-clock is each command's own `total ... s wall` line; the scores are the last row of each
metrics.jsonl the run wrote (its final evaluation: common.toy_scores, docs/common.md "Toy metrics"), which are the
same in every round (seeded runs; the table says whether they were).

Writes DIR/toy_defaults.json (every run's command, every metrics row, wall-clock per round, machine, date, commit) and
DIR/toy_defaults.md (the tables), DIR = benchmarks/results unless --results says otherwise.
"""
import datetime, json, os, platform, re, shutil, statistics, subprocess, sys, time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch

import common as C
from toy import _commit  # the same commit stamp as toy.py and fashion.py

# name -> (method file, arguments, the run it starts from or None); "{NAME}" is that run's folder
DEFAULT = {
    "rectified_flow": ("rectified_flow", [], None),
    "imm": ("imm", [], None),
    "scm": ("scm", [], None),
    "flow_map": ("flow_map", [], None),
    "distributional": ("distributional", ["--teacher", "{rectified_flow}/ckpt.pt"], "rectified_flow"),
}
LONGER = {  # docs/rectified_flow.md, scm.md, flow_map.md, distributional.md: "longer training"
    "2-RF++ 4,800": ("rectified_flow", ["--stage", "2rf", "--teacher", "{rectified_flow}/ckpt.pt", "--pairs",
                                        "{rectified_flow}/pairs", "--iters", "4800"], "rectified_flow"),
    "sCT 920": ("scm", ["--mode", "sct", "--teacher", "{scm}/diffusion/ckpt.pt", "--iters", "920", "--H", "840"],
                "scm"),
    "sCD 1,120": ("scm", ["--mode", "scd", "--teacher", "{scm}/diffusion/ckpt.pt", "--iters", "1120", "--H", "920"],
                  "scm"),
    "sCD 1,120, lr 3e-4": ("scm", ["--mode", "scd", "--teacher", "{scm}/diffusion/ckpt.pt", "--iters", "1120", "--H",
                                   "920", "--lr", "3e-4"], "scm"),
    "LSD 4,000": ("flow_map", ["--iters", "4000"], None),
    "GDD 6,000": ("distributional", ["--teacher", "{rectified_flow}/ckpt.pt", "--iters", "6000"], "rectified_flow"),
}
SCORE = re.compile(r"(in_mode|in_square)_(\w+)$")  # the sharpness scores the tables show (8 Gaussians, checkerboard)


def _folder(work, name, rnd):
    return os.path.join(work, f"r{rnd}", re.sub(r"[^\w.-]+", "_", name))


def _command(runs, name, folder):
    """-> the argv of run `name`, the folders of the runs it starts from filled in (folder(name) -> its folder)."""
    file, args, _ = runs[name]
    return [f"{file}.py", *[re.sub(r"\{(\w+)\}", lambda m: folder(m.group(1)), x) for x in args], "--out", folder(name)]


def _read(folder, out):
    """-> {relative path of each metrics.jsonl: its rows} and the wall seconds of the command's `total` line."""
    rows = {}
    for d, _, files in sorted(os.walk(folder)):
        if "metrics.jsonl" in files:
            with open(os.path.join(d, "metrics.jsonl")) as f:
                rows[os.path.relpath(d, folder)] = [json.loads(line) for line in f if line.strip()]
    wall = re.findall(r"^total ([0-9.]+) s wall", out, re.M)
    return rows, float(wall[-1]) if wall else None


def _seeded(rows):  # what a seeded run repeats exactly: the rows without their timings (eval_s)
    return {k: [{m: v for m, v in r.items() if not m.endswith("_s")} for r in rs] for k, rs in rows.items()}


def run_all(runs, work, jobs, rounds, made=None, log=print):
    """Every run of `runs` in every round, `jobs` at a time, each after the run it starts from (in its round, or in
    `made`: {name: folder} of runs made before) -> {name: {"command", "rows" (the last round's), "wall_s" (one per
    round), "same" (the rows equal in every round)}}."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    made = made or {}
    todo, done, running = [(rnd, name) for rnd in range(rounds) for name in runs], set(), []
    out, first, t0 = {name: dict(wall_s=[], same=True) for name in runs}, {}, time.time()
    try:
        while todo or running:
            for rnd, name in list(todo):
                start = runs[name][2]
                if len(running) < jobs and (start is None or start in made or (rnd, start) in done):
                    todo.remove((rnd, name))
                    folder = lambda n, rnd=rnd: made.get(n) or _folder(work, n, rnd)
                    shutil.rmtree(folder(name), ignore_errors=True)  # never resume an old run
                    os.makedirs(os.path.dirname(folder(name)), exist_ok=True)
                    argv, f = _command(runs, name, folder), open(folder(name) + ".log", "w")
                    log(f"[{time.time() - t0:5.0f} s] round {rnd + 1}: python {' '.join(argv)}")
                    running.append((rnd, name, argv, f, subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env,
                                                                          stdout=f, stderr=subprocess.STDOUT)))
            if todo and not running:  # (a run that starts from one neither in the table nor made: it never would)
                raise ValueError(f"toy_defaults: {sorted({n for _, n in todo})} wait for a run that never comes.")
            time.sleep(0.2)
            for item in [r for r in running if r[4].poll() is not None]:
                rnd, name, argv, f, proc = item
                running.remove(item)
                f.close()
                if proc.returncode:
                    raise SystemExit(f"toy_defaults: '{name}' failed (exit {proc.returncode}); its output: {f.name}")
                with open(f.name) as g:
                    rows, wall = _read(_folder(work, name, rnd), g.read())
                rec = out[name]
                rec["same"] &= _seeded(first.setdefault(name, rows)) == _seeded(rows)
                if rnd == rounds - 1:  # (with --jobs > 1 the rounds may end in any order)
                    rec.update(command="python " + " ".join(argv).replace(work, "WORK"), rows=rows)
                rec["wall_s"].append(wall)
                done.add((rnd, name))
    finally:  # a failed run, an error here or Ctrl-C: no run goes on alone
        for *_, f, proc in running:
            proc.kill()
            proc.wait()
            f.close()
    return out


# =============================================================================== report
def _scores(row):
    """-> (score name, {K: value}) of one metrics row (the K that are not step counts, e.g. heun18, last)."""
    found = {m.group(2): (m.group(1), v) for k, v in row.items() if (m := SCORE.match(k))}
    order = sorted(found, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))
    return (found[order[0]][0] if order else "–"), {k: found[k][1] for k in order}


def _wall(w):
    w = [x for x in w if x is not None]
    if not w:
        return "–"
    return f"{statistics.median(w):.0f}" + (f" ({min(w):.0f}–{max(w):.0f}, n = {len(w)})" if len(w) > 1 else "")


def markdown(meta, results):
    L = ["# The default toy runs and the longer runs", "",
         f"`{meta['command']}`: {meta['device']}, torch {meta['torch']}, commit {meta['commit']}, {meta['date']}, "
         f"{meta['total_wall_s']:.0f} s in all. Each run is the method file's own command line (below; WORK is the "
         f"scratch folder), one thread. Wall-clock: the command's own `total` line, median (min–max) over the rounds. "
         f"Scores: the last row of each metrics.jsonl the run wrote (its final evaluation; docs/common.md, "
         f"\"Toy metrics\"): the in-mode fraction on 8 Gaussians, the in-square fraction on the checkerboard, at each "
         f"step count K (other keys: the sampler named, e.g. heun18 = Heun with 18 steps; a number: that many steps "
         f"of the run's many-step sampler, 100 Euler steps for the 1-RF, 18 Heun steps for the TrigFlow teacher).", ""]
    for title, names in (("Default runs (`python M.py`)", meta["default"]), ("Longer runs", meta["longer"])):
        if not names:
            continue
        L += [f"## {title}", "", "| run | stage (folder) | wall s | score | 1 | 2 | 4 | 8 | other | same every round |",
              "|" + "---|" * 10]
        for name in names:
            r = results[name]
            for i, (stage, rows) in enumerate(sorted(r["rows"].items())):
                kind, v = _scores(rows[-1]) if rows else ("–", {})
                cell = [f"{v[k]:.2f}" if k in v else "–" for k in ("1", "2", "4", "8")]
                other = ", ".join(f"{v[k]:.2f} ({k})" for k in v if k not in ("1", "2", "4", "8")) or "–"
                step = rows[-1].get("step", "?") if rows else "–"
                where = f"{'DIR' if stage == '.' else 'DIR/' + stage} (step {step})"
                L.append(f"| {name if i == 0 else ''} | {where} | {_wall(r['wall_s']) if i == 0 else ''} | {kind} | "
                         + " | ".join(cell) + f" | {other} | {'yes' if r['same'] else 'NO'} |")
        L += [""] + [f"- {name}: `{results[name]['command']}`" for name in names] + [""]
    return "\n".join(L)


def main(argv=None, runs=None):
    p = C.Parser(description=__doc__.split("\n")[0])  # argparse's errors as one `error:` sentence
    p.add_argument("--longer", action="store_true", help="also the longer runs (after the default ones)")
    p.add_argument("--repeat", type=int, default=1, help="rounds of the default runs (the wall-clock's median)")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (1: the wall-clock of an idle machine)")
    p.add_argument("--results", default=os.path.join(HERE, "results"), help="output folder")
    p.add_argument("--work", default="/tmp/toy_defaults", help="scratch folder of the runs")
    a = p.parse_args(argv)
    if a.repeat < 1 or a.jobs < 1:
        p.error(f"--repeat and --jobs take a positive count, got {a.repeat} and {a.jobs}.")
    for d, what in ((a.work, "--work"), (a.results, "--results")):
        C.check_dir(d, what)
    default, longer = runs or (DEFAULT, LONGER if a.longer else {})  # (runs: the tests' own two tables)
    work, t0, load0 = os.path.abspath(a.work), time.time(), os.getloadavg()[0]
    res = run_all(default, work, a.jobs, a.repeat)
    made = {n: _folder(work, n, a.repeat - 1) for n in default}  # the longer runs start from the last round's
    res.update(run_all(longer, work, a.jobs, 1, made))
    meta = dict(command="python benchmarks/toy_defaults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {a.jobs} run(s) at "
                       f"once)", commit=_commit(), torch=torch.__version__, rounds=a.repeat, jobs=a.jobs,
                default=list(default), longer=list(longer), total_wall_s=time.time() - t0,
                load_average_1min=dict(start=load0, end=os.getloadavg()[0]))
    os.makedirs(a.results, exist_ok=True)
    with open(os.path.join(a.results, "toy_defaults.json"), "w") as f:
        json.dump(dict(meta=meta, runs=res), f, indent=1)
    with open(os.path.join(a.results, "toy_defaults.md"), "w") as f:
        f.write(markdown(meta, res))
    print(f"wrote {a.results}/toy_defaults.json, toy_defaults.md ({time.time() - t0:.0f} s)")
    return res


if __name__ == "__main__":
    C.main_guard(main)
