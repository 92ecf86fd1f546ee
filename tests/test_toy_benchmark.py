"""benchmarks/toy.py: the budget bookkeeping, the report and the verdict against the 1-RF (CPU, ~40 s).

The benchmark's numbers themselves are produced by `python benchmarks/toy.py --quick` (benchmarks/results/toy.*);
each method's convergence is tested in its own test file. Here: a tiny end-to-end run (two seeds, three methods,
one of them distilled) checks that every method sees the same number of examples with the teacher's share
counted, that the outputs exist and hold finite scores, and that the summary and the verdict are right on
hand-made records, including the control where a method loses to the 1-RF and must be named.
"""
import json
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


sys.path.insert(0, os.path.join(ROOT, "benchmarks"))  # the benchmark scripts import as modules
import toy  # noqa: E402
import common as C  # noqa: E402
from cli import guarded  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("toybench")
    argv = ["--datasets", "moons", "--seeds", "0,1", "--budget", "2048", "--batch", "256", "--n_eval", "256",
            "--methods", "1-RF,LSD,GDD", "--jobs", "2", "--work", str(d / "work"), "--results", str(d / "res")]
    summ = toy.main(argv)
    return d / "res", summ


def test_outputs_exist_and_scores_are_finite(tiny_run):
    res, summ = tiny_run
    for f in ("toy.json", "toy.md", "toy_samples.png", "toy_curves.png"):
        assert (res / f).stat().st_size > 0, f
    data = json.loads((res / "toy.json").read_text())
    recs = data["records"]
    by = {(r["method"], r["seed"]): r for r in recs}
    assert set(by) == {(m, s) for m in ("data floor", "1-RF", "1-RF, 100 Euler steps", "LSD", "GDD") for s in (0, 1)}
    for r in recs:
        vals = [r["swd"], r["mmd"]] if r["method"] == "data floor" else \
            [v for sc in r["steps"].values() for v in sc.values()]
        assert all(math.isfinite(v) for v in vals), r["method"]
    for s in (0, 1):  # the same budget: 8 x 256 from scratch; 4 x 256 teacher + 4 x 256 student for GDD
        assert by[("1-RF", s)]["examples"] == by[("LSD", s)]["examples"] == 2048
        assert by[("GDD", s)]["examples"] == 2048 and by[("GDD", s)]["teacher_examples"] == 1024
        assert sorted(map(int, by[("LSD", s)]["steps"])) == [1, 2, 4, 8]
        assert by[("GDD", s)]["wall_s"] > 0
    md = (res / "toy.md").read_text()
    assert "## moons" in md and "| LSD | 2k |" in md and "| GDD | 2k (1k) |" in md
    assert summ["moons"]["LSD"]["seeds"] == 2


def test_two_seeds_differ(tiny_run):
    """Seeds are real repetitions: different seeds give different scores (else the spread would be fake)."""
    res, _ = tiny_run
    recs = json.loads((res / "toy.json").read_text())["records"]
    lsd = [r["steps"]["1"]["swd"] for r in recs if r["method"] == "LSD"]
    assert len(lsd) == 2 and lsd[0] != lsd[1]


def _rec(method, seed, swd1, swd2):
    return dict(dataset="d", seed=seed, method=method, examples=10, teacher_examples=0, wall_s=1.0,
                steps={str(K): dict(swd=v, mmd=v / 10) for K, v in zip(toy.STEPS, (swd1, swd2, swd2, swd2))})


def test_summary_mean_std_and_verdict_names_the_loser():
    recs = [dict(dataset="d", seed=0, method="data floor", swd=0.01, mmd=0.001),
            _rec("1-RF", 0, 0.30, 0.20), _rec("1-RF", 1, 0.32, 0.22),
            _rec("good", 0, 0.05, 0.04), _rec("good", 1, 0.07, 0.06),
            _rec("bad", 0, 0.40, 0.10), _rec("bad", 1, 0.36, 0.12)]  # loses at K = 1 only
    summ = toy.summarise(recs)
    m, s = summ["d"]["good"]["swd"][1]
    assert m == pytest.approx(0.06) and s == pytest.approx(math.sqrt(2) * 0.01)
    assert summ["d"]["bad"]["mmd"][2][0] == pytest.approx(0.011)
    bad = toy.verdicts(summ)
    assert bad == {"bad": [("d", [1])]}  # the control is named, with the data set and the step count
    summ["d"]["bad"]["swd"][1] = (0.2, 0.0)
    assert toy.verdicts(summ) == {}


@pytest.mark.parametrize("argv, words", [(["--methods", "1-RF,DDPM"], "DDPM"),
                                         (["--methods", "LSD"], "must include 1-RF"),
                                         (["--datasets", "swiss"], "swiss"),
                                         (["--budget", "10"], "at least two batches"),
                                         (["--seeds", "a"], "--seeds"), (["--batch", "0"], "--batch"),
                                         (["--results", "/proc/x"], "--results"), (["--iters", "3"], "--iters"),
                                         (["--replot", "--results", os.path.join(ROOT, "docs")], "toy.json"),
                                         (["--cell", "bogus"], "--cell"), (["--cell", "moons:x"], "--cell"),
                                         (["--cell", "bogus:0"], "--cell"),
                                         (["--cell", "moons:0", "--budget", "1024", "--methods", "1-RF"],
                                          "--cell_out")])
def test_bad_arguments_one_sentence_and_exit_2(argv, words, capsys, tmp_path):
    """One `error:` line, nothing on stdout, and neither --work nor --results made (a later --results wins)."""
    dirs = [tmp_path / "work", tmp_path / "res"]
    guarded(capsys, lambda: toy.main(["--work", str(dirs[0]), "--results", str(dirs[1]), *argv]), words)
    assert not any(d.exists() for d in dirs)


@pytest.mark.parametrize("flag, value", [("--datasets", ""), ("--seeds", ""), ("--datasets", "moons,")])
def test_empty_list_is_refused_not_the_default(flag, value):
    with pytest.raises(C.UserError, match=f"{flag} has an empty entry"):
        toy.parse([flag, value])


@pytest.mark.parametrize("drop", ["seeds", "datasets", "date"])
def test_replot_of_a_malformed_results_file_writes_nothing(tiny_run, tmp_path, capsys, drop):
    """toy.json without meta['seeds'] / ['datasets'] (read first) or ['date'] (read by the table, after the summary):
    one sentence, and no file written or rewritten."""
    data = json.loads((tiny_run[0] / "toy.json").read_text())
    del data["meta"][drop]
    text = json.dumps(data)
    (tmp_path / "toy.json").write_text(text)
    msg = guarded(capsys, lambda: toy.main(["--replot", "--results", str(tmp_path), "--work", str(tmp_path / "w")]),
                  f"KeyError: '{drop}'")
    assert msg.startswith("--replot needs "), msg
    assert os.listdir(tmp_path) == ["toy.json"] and (tmp_path / "toy.json").read_text() == text


def test_every_other_method_runs_in_the_benchmark(tmp_path):
    """The methods the fixture leaves out, each through the benchmark's own command lines (2-RF++'s pairs stage from
    the 1-RF teacher, sCT/sCD's --H, the teachers shared): finite scores at every step count and the budget split as
    the module docstring says (a teacher-trained method: half the examples to its teacher)."""
    others = [m for m in toy.METHODS if m not in ("1-RF", "LSD", "GDD")]
    summ = toy.main(["--datasets", "moons", "--seeds", "0", "--budget", "1024", "--batch", "128", "--n_eval", "128",
                     "--methods", ",".join(["1-RF", *others]), "--jobs", "1", "--work", str(tmp_path / "work"),
                     "--results", str(tmp_path / "res")])
    recs = {r["method"]: r for r in json.loads((tmp_path / "res" / "toy.json").read_text())["records"]}
    assert set(others) <= set(recs) and set(others) <= set(summ["moons"])
    for m in others:
        r = recs[m]
        assert sorted(map(int, r["steps"])) == list(toy.STEPS), m
        assert all(math.isfinite(v) for sc in r["steps"].values() for v in sc.values()), m
        assert r["examples"] == 1024 and r["teacher_examples"] == (512 if toy.METHODS[m][1] else 0), m
    with open(tmp_path / "work" / "moons-0" / "log.txt") as f:
        sct = [ln for ln in f if ln.startswith("$ python scm.py --mode sct")]
    assert len(sct) == 1 and "--H 1 " in sct[0], sct  # 20 % of its 4 iterations, at least 1
