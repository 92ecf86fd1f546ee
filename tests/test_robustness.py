"""Bad input, resume and divergence, the same cases in all five method files (imm, scm, flow_map, rectified_flow,
distributional). Tiny toy runs (MLP on 2-D points, a few steps); most refusals happen before any training and run
in-process through common.main_guard: exit status 2 and exactly one `error:` line holding one sentence on stderr.
Two refusals run as real subprocesses (no warning line may precede the error).

Cases per file (the count is asserted in test_case_table; every bad-input case must end in one sentence, exit 2):

    category                                              imm  scm  flow_map  rectified_flow  distributional
    train options: ranges, types, NaN/inf, unknown, stray,  17   17     17          17              17
      a seed of 2^63 or more, no eval step, an empty list
      entry (1,,2), a step count above 100,000
    devices (tpu, cuda or cuda:7 absent)                    2    2      2           2               2
    --out below a file, equal to a file, unwritable,        6    6      6           6               6
      empty, a name too long; --root a file
    --data: object / text / pickle .npy, 0 and 1 points,    9    9      9           9               9
      an undecodable image in a folder, float64 beyond
      float32's range, 1 x 1 images, a FIFO
    --teacher missing, or its config of the wrong type;     2    5      6           9               8
      --width 0; (rectified_flow) --cond on a toy, --xflip
      and --width on the 2-RF; (flow_map) data without
      spread (no sigma0); (distributional) a --disc that
      does not fit the data, other Ds' options on points,
      R1's gamma twice, --r1_gdd_batch with a batch-mean
      gamma (both refused after its in-file teacher ran);
      another mode's or stage's option (scm --H and
      --eval_steps on diffusion, flow_map --psd_type on
      lsd and --diag_frac on meanflow, rectified_flow
      --t_dist on the 1-RF, --batch on the pairs, LPIPS
      options beside another loss)
    sample/fid options (steps 0 / -1, n 0, fid n 1,        28   28     28          28              27
      batch 0, .jpg, a .zip of points, out below a file, ckpt missing /
      text / pickle / malformed / other method, detector
      missing, seed 2^63, fid --root a file, steps 1,2,
      (an empty entry), --out '', fid --out not .jsonl; a
      Config field the sampler never reads (the learning
      rate, a network field, --iters, --preset), sample
      --data / --root (fid's), a sampler field out of range,
      an --out name too long, fid of a 2-D model)
    resume (each with a changed lr, which must not be      6    7      8           6               7
      noted before the refusal): changed seed, explicit
      other preset, --iters below the saved step, another
      named data set or a file for it, a file that is not
      there (named so, not as a change of data), file-specific
      fixed fields (network, weighting, interpolant,
      freeze)
    ----------------------------------------------------------------------------------------------------
    bad-input cases, all one sentence and exit 2           73   77     79          80              79

    Beside the table: each refusal branch of the five files that no other test reached (found by a coverage run),
    once, in test_every_refusal_branch_is_one_sentence.

    behaviour tests (each in all five files): resume with a changed learning rate applies it (optimiser param groups
    and saved config); a non-finite gradient (finite loss) skips exactly that step (Adam's step count and moments
    untouched, `skipped` logged) and the run ends with its checkpoint; a NaN loss at every step stops after
    --max_skips steps in a row, keeping the last good checkpoint. Plus: a 1e30 learning rate at --ckpt_every 1 never
    overwrites the checkpoint (the step after a checkpoint must have a finite loss), nor does a diverged last step
    (its weights' samples must be finite); a full disk during a save (also a real one, /dev/full) removes the .tmp
    and keeps the previous checkpoint; every preset of every file passes the validation; an evaluation during
    training (--sample_every) leaves the weights, their EMA and the last evaluation as they are without it.
"""
import errno
import json
import math
import os
import pickle
import shutil
import subprocess
import sys
import types
import warnings

import numpy as np
import pytest
import torch

import cli
import common as C
from cli import refusal, refused
import distributional
import flow_map
import imm
import rectified_flow
import scm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODS = dict(imm=imm, scm=scm, flow_map=flow_map, rectified_flow=rectified_flow, distributional=distributional)
EVAL = ["--eval_n", "16", "--eval_steps", "1"]
BASE = dict(  # a few toy steps, 2-D points, small MLPs
    imm=["--batch", "16", *EVAL],
    scm=["--mode", "diffusion", "--batch", "16", "--width", "16", "--depth", "1", "--heun_steps", "1",
         "--lr_schedule", "const", "--eval_n", "16"],  # (the diffusion mode is evaluated by Heun, not --eval_steps)
    flow_map=["--batch", "16", "--width", "16", "--depth", "1", "--lr_schedule", "const", *EVAL],
    rectified_flow=["--stage", "1rf", "--batch", "16", "--straight_k", "2", "--lr_schedule", "const", *EVAL],
    distributional=["--teacher_iters", "2", "--teacher_batch", "16", "--batch", "16", "--eval_teacher_steps", "0",
                    *EVAL])
LR = dict(distributional="--lr_g")  # the learning-rate flag of each file (default --lr)
DROP = dict(distributional="--d_t")  # a [0, 1) probability of each file (default --dropout)
SAMPLER_BAD = dict(imm=["--eta_mid", "-1"], scm=["--sigma_max", "0"], flow_map=["--sampler", "nope"],  # a sampler
                   rectified_flow=["--t_mid", "2"])  # field out of its range (GDD's generator has none)
FIXED = dict(imm=["--width", "32"], scm=["--width", "32"], flow_map=["--width", "32"],  # the network: sampling
             rectified_flow=["--width", "32"], distributional=["--cond", "true"])  # cannot change it


def run(name, *argv):
    """main() through main_guard -> (exit code, stderr lines); stdout is left to capsys."""
    try:
        C.main_guard(lambda: MODS[name].main([str(a) for a in argv]))
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad input files, and one finished 2-step toy run per method file (ckpt at step 2)."""
    d = tmp_path_factory.mktemp("robust")
    (d / "afile").write_text("a regular file\n")
    (d / "root").mkdir()  # its FID statistics folder a file: rank 0 met it after the FID's work, in a traceback
    (d / "root" / "fid_refs").write_text("a regular file\n")
    np.save(d / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    (d / "text.npy").write_text("1 2\n3 4\n")
    with open(d / "pickle.npy", "wb") as f:
        pickle.dump(np.zeros((8, 2), np.float32), f)
    np.save(d / "empty.npy", np.zeros((0, 2), np.float32))
    np.save(d / "one.npy", np.zeros((1, 2), np.float32))
    np.save(d / "f64big.npy", np.full((8, 2), 1e300))  # finite in float64, inf in float32
    np.save(d / "same.npy", np.ones((8, 2), np.float32))  # no spread
    np.save(d / "pixel.npy", np.zeros((8, 1, 1, 3), np.uint8))  # 1 x 1 images
    os.mkfifo(d / "fifo.npy")  # np.load waited for a writer for ever
    os.makedirs(d / "imgs")
    from PIL import Image
    for i in range(2):
        Image.new("RGB", (8, 8), (40 * i,) * 3).save(d / "imgs" / f"ok{i}.png")
    (d / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    with open(d / "plain.pt", "wb") as f:
        pickle.dump({"model": {}}, f, protocol=5)  # torch.load would note the protocol: no such line may appear
    for name in MODS:
        assert run(name, *BASE[name], "--iters", "2", "--log_every", "1", "--out", d / name) == 0
    ck = torch.load(d / "imm" / "ckpt.pt", weights_only=True)
    torch.save({**ck, "config": [1, 2]}, d / "badcfg.pt")  # right layout, config of the wrong type
    return d


def train_cases(name, d):
    """(argv, words) of command lines that must be refused before any training."""
    lr, drop, out = LR.get(name, "--lr"), DROP.get(name, "--dropout"), ["--out", d / "never"]
    cases = [
        (["--iters", "-5", *out], ["--iters", "non-negative"]), (["--batch", "0", *out], ["--batch"]),
        ([lr, "nan", *out], [lr, "finite"]), ([lr, "inf", *out], [lr]), ([lr, "0", *out], [lr, "positive"]),
        ([lr, "-1e-3", *out], [lr, "positive", "-0.001"]),  # a value that starts with '-' is still the value
        ([drop, "1.5", *out], [drop]), (["--eval_steps", "0", *out], ["--eval_steps"]),
        (["--eval_steps", "2,-1", *out], ["--eval_steps"]), (["--ckpt_every", "0", *out], ["--ckpt_every"]),
        (["--eval_steps", "1,2,1", *out], ["--eval_steps", "lists 1 twice"]),  # (as sample's --steps)
        (["--max_skips", "0", *out], ["--max_skips"]), ([lr + "x", "1e-3"], [lr + "x", "did you mean " + lr]),
        (["stray"], ["stray"]),
        (["--device", "tpu"], ["tpu"]), (["--device", "cuda:7"], ["cuda:7"]),
        (["--out", d / "afile" / "run"], ["afile", "is a file"]), (["--out", d / "afile"], ["is a file"]),
        (["--out", "/proc/no/such/run"], ["cannot be written"]),
        (["--seed", "99999999999999999999999", *out], ["--seed", "2^63"]), (["--out", ""], ["--out", "folder name"]),
        (["--root", d / "afile", *out], ["--root", "is a file"]), (["--eval_steps", ",", *out], ["--eval_steps"]),
        (["--eval_steps", "1,,2", *out], ["--eval_steps", "empty entry", "'1,,2'"]),  # not read as 1,2
        (["--eval_steps", "1000000000", *out], ["--eval_steps", "100000"]),  # (it trained, then never ended)
        (["--out", d / "new" / ("x" * 300)], ["too long", "255"]),  # (a traceback from os.makedirs)
    ]
    for f, words in (("obj.npy", ["numeric"]), ("text.npy", ["numeric"]), ("pickle.npy", ["numeric"]),
                     ("empty.npy", ["0 sample"]), ("one.npy", ["1 sample"]), ("imgs", ["broken.png"]),
                     ("f64big.npy", ["infinite", "float32"]),  # (it trained until the loss was NaN)
                     ("pixel.npy", ["1 x 1", "2 x 2"]), ("fifo.npy", ["not a regular file"]),
                     ("two\nlines\r.npy", ["two\\nlines\\r.npy"])):  # (the name's line break split the line)
        cases.append((["--data", d / f, *out], words))
    teacher = dict(scm=["--mode", "sct"], flow_map=["--mode", "lmd"], rectified_flow=["--stage", "2rf"])
    if name != "distributional":  # the MLP's width: 0 is not "the default"
        cases.append((["--width", "0", *out], ["--width", "in [1, 2147483647]"]))
    if name == "rectified_flow":  # a toy has no labels; the 2-RF takes its network from the 1-RF, never flips pairs
        cases.append((["--cond", "true", *out], ["--cond", "no labels"]))
        cases += [(["--stage", "2rf", "--teacher", d / name / "ckpt.pt", f, v, *out],
                   [f"--{f[2:]}", "only --stage 1rf or all"])
                  for f, v in (("--xflip", "true"), ("--width", "32"))]
    if name == "distributional":  # refused before the in-file teacher trains (no teacher lines on stdout)
        cases.append((["--disc", "projected", *out], ["--disc projected", "--disc mlp"]))
        cases += [([f, v, *out], [f, "--disc mlp does not read"]) for f, v in (("--diffaug", "color"), ("--d_t", "0.2"),
                  ("--proj_seed", "1"))]  # options of other Ds were ignored on points
        cases += [(["--r1_gamma", "0.1", "--r1_gamma_gdd", "1e-4", *out], ["give R1's gamma once"]),  # (after the
                  (["--r1_gdd_batch", "64", *out], ["--r1_gdd_batch", "batch-mean"])]  # in-file teacher trained)
    if name == "flow_map":  # sigma0 from data without spread was 0 (a NaN loss at every step)
        cases.append((["--data", d / "same.npy", *out], ["coincide", "--sigma0"]))
    # an option another mode or stage reads (MODE_ONLY, STAGE_ONLY) was recorded in the config and never read
    diff = ["--mode", "diffusion"]
    cases += dict(scm=[([*diff, "--H", "5", *out], ["--mode diffusion does not read --H", "sct, scd or all"]),
                       ([*diff, "--eval_steps", "1,2", *out], ["--mode diffusion does not read --eval_steps"])],
                  flow_map=[(["--psd_type", "midpoint", *out], ["--mode lsd does not read --psd_type", "--mode psd"]),
                            (["--mode", "meanflow", "--diag_frac", "0.5", *out], ["--mode meanflow", "--diag_frac"])],
                  rectified_flow=[(["--stage", "1rf", "--t_dist", "uniform", *out],
                                   ["--stage 1rf does not read --t_dist"]),
                                  (["--stage", "pairs", "--teacher", d / name / "ckpt.pt", "--batch", "8", *out],
                                   ["--stage pairs does not read --batch", "1rf, 2rf, ft or all"]),
                                  (["--stage", "2rf", "--teacher", d / name / "ckpt.pt", "--lpips_res", "64", *out],
                                   ["--lpips_res", "LPIPS losses only", "--loss is huber"])]).get(name, [])
    if name == "imm":
        cases.append((["--teacher", d / "badcfg.pt", *out], ["from scratch"]))
    else:
        t = teacher.get(name, [])
        cases += [([*t, "--teacher", d / "missing.pt", *out], ["missing.pt"]),
                  ([*t, "--teacher", d / "badcfg.pt", *out], ["badcfg.pt"])]
    return cases


def sample_cases(name, d):
    ck, other = d / name / "ckpt.pt", d / ("scm" if name == "imm" else "imm") / "ckpt.pt"
    s = lambda *a, cmd="sample", c=ck: [cmd, "--ckpt", c, *a]
    return [
        (s("--steps", "0"), ["--steps"]), (s("--steps", "-1"), ["--steps"]), (s("--n", "0"), ["--n"]),
        (s("--n", "1", cmd="fid"), ["--n", "at least 2"]), (s("--batch", "0"), ["--batch"]),
        (s("--out", d / "s.jpg"), [".jpg"]), (s("--out", d / "afile" / "s.png"), ["is a file"]),
        (s("--out", d / "s.zip"), [".zip holds images", ".npz"]),  # (the toy runs' models make 2-D points)
        (s(c=d / "missing.pt"), ["missing.pt"]), (s(c=d / "text.npy"), ["text.npy"]), (s(c=d / "plain.pt"), ["plain"]),
        (s(c=d / "badcfg.pt"), ["malformed"]), (s(c=other), [str(other)]),
        (s("--fid_detector", d / "det.pt", cmd="fid"), ["det.pt"]),
        (s(LR.get(name, "--lr"), "-1"), [LR.get(name, "--lr"), "from the checkpoint"]),
        (s("--seed", "99999999999999999999999"), ["--seed", "2^63"]), (s("--root", d / "afile", cmd="fid"), ["--root"]),
        (s("--root", d / "root", cmd="fid"), ["--root's FID statistics folder", "fid_refs", "is a file"]),
        (s(*FIXED[name]), [FIXED[name][0], "from the checkpoint"]),
        (s("--steps", "1,2,"), ["--steps", "empty entry"]),
        (s("--out", ""), ["--out", "file name"]),  # it fell back to the checkpoint's folder
        (s("--out", d / "x.png", cmd="fid"), [".jsonl", "x.png"]),  # fid appended JSON to any file, a ckpt.pt too
        (s("--iters", "5"), ["--iters", "from the checkpoint"]), (s("--preset", "cifar10"), ["--preset", "checkpoint"]),
        (s("--data", "moons"), ["--data", "fid does"]), (s("--root", d), ["--root", "fid does"]),  # sample never reads
        (s("--out", d / ("y" * 250 + ".npy")), ["too long", "_Kstep"]),  # (a traceback from np.save)
        # (GDD printed its K > 1 note before it; the sentence points to the run's own SWD / MMD²)
        (s("--n", "8", "--batch", "4", cmd="fid"), ["image model", "metrics.jsonl"]),
    ] + ([(s(*SAMPLER_BAD[name]), [SAMPLER_BAD[name][0]])] if name in SAMPLER_BAD else [])


def test_scm_all_never_trains_the_teacher_beneath_its_cms(tmp_path, capsys):
    """scm --mode all with more --iters would train DIR/diffusion on beneath the sCT and sCD distilled from it (sCD
    could then never resume: its teacher's weights changed): refused before any work; the same --iters resumes, and
    --resume false with more --iters (every mode anew) starts over."""
    argv = ["--mode", "all", "--batch", "16", "--width", "16", "--depth", "1", "--heun_steps", "1", "--lr_schedule",
            "const", *EVAL, "--out", tmp_path / "a"]
    assert run("scm", *argv, "--iters", "2") == 0
    before = {m: os.path.getmtime(tmp_path / "a" / m / "ckpt.pt") for m in ("diffusion", "sct", "scd")}
    capsys.readouterr()
    code = run("scm", *argv, "--iters", "3")
    refusal(code, capsys.readouterr(), "sct and scd", "step 2", "step 3")
    assert before == {m: os.path.getmtime(tmp_path / "a" / m / "ckpt.pt") for m in before}
    assert run("scm", *argv, "--iters", "2") == 0  # control
    # a fresh start trains every mode anew: nothing is beneath (it was refused so, and an unreadable sCD checkpoint
    # it would overwrite stopped it)
    (tmp_path / "a" / "scd" / "ckpt.pt").write_text("not a checkpoint")
    assert run("scm", *argv, "--iters", "3", "--resume", "false") == 0
    assert [torch.load(tmp_path / "a" / m / "ckpt.pt", weights_only=True)["step"] for m in before] == [3, 3, 3]


def test_fourth_fuzz_findings_are_one_sentence(files, tmp_path, capsys):
    """Found by a fuzzer of the command line: GDD's own checkpoint entries (t_g, teacher, disc) edited away were a
    traceback in sample and resume (a NaN t_g wrote NaN samples); an edited convention was refused by sample but
    resumed and rewritten; --lr 1e38 overflowed Adam with a traceback; imm's --eta_mid outside (eta(t_min), eta(T))
    ran its 2-step grid backwards; rectified_flow --stage all with more --iters trained the 1-RF on beneath its pairs
    and 2-RF, then failed. Controls: the unedited checkpoint samples and the same --stage all resumes."""
    import shutil

    def edited(name, change):
        shutil.rmtree(tmp_path / "e", ignore_errors=True)
        shutil.copytree(files / name, tmp_path / "e")
        ck = torch.load(tmp_path / "e" / "ckpt.pt", weights_only=True)
        change(ck)
        torch.save(ck, tmp_path / "e" / "ckpt.pt")
        return tmp_path / "e" / "ckpt.pt"
    d = "distributional"
    gdd = ["--batch", "16", "--eval_teacher_steps", "0", *EVAL, "--out", tmp_path / "e", "--iters", "3"]
    for change, words in ((lambda c: c.pop("t_g"), ["t_g"]), (lambda c: c.update(teacher=None), ["teacher"]),
                          (lambda c: c.update(disc=None), ["disc"]),
                          (lambda c: c["teacher"].update(path=3), ["teacher or disc entry"])):  # resumed
        edited(d, change)
        capsys.readouterr()
        code = run(d, *gdd)
        refusal(code, capsys.readouterr(), *words)
    for name in ("imm", "flow_map", "rectified_flow", "distributional"):  # an edited convention, resumed
        edited(name, lambda c: c.update(convention="other"))
        argv = gdd if name == d else [*BASE[name], "--out", tmp_path / "e", "--iters", "3"]
        capsys.readouterr()
        code = run(name, *argv)
        out, err = capsys.readouterr()  # nothing before it (flow_map printed its run line first)
        assert out == "", (name, out)
        refusal(code, err, "other" if name != "rectified_flow" else "rectified_flow")
    for name, argv, words in (
            ("distributional", ["sample", "--ckpt", edited(d, lambda c: c.update(t_g=math.nan)), "--out",
                                tmp_path / "s.npy"], ["t_g nan"]),
            ("imm", [*BASE["imm"], "--lr", "1e38", "--iters", "2", "--out", tmp_path / "lr"], ["overflows"]),
            ("imm", ["sample", "--ckpt", files / "imm" / "ckpt.pt", "--eta_mid", "1000"], ["--eta_mid", "eta(T)"]),
            ("imm", ["sample", "--ckpt", files / "imm"], ["is a folder", "ckpt.pt"])):
        capsys.readouterr()
        code = run(name, *argv)
        io = capsys.readouterr()  # (--lr 1e38 overflows in the first step, after the run's first line)
        refusal(code, io.err if "--lr" in argv else io, *words)
    with pytest.raises(C.UserError, match="holds no Linear weights"):
        C.load_state_strict(torch.nn.Linear(1, 1), None)  # (scm's and flow_map's weight_head edited to None)
    assert run(d, "sample", "--ckpt", files / d / "ckpt.pt", "--out", tmp_path / "s.npy") == 0  # control
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2", *EVAL, "--batch", "16",
         "--out", tmp_path / "all"]
    assert run("rectified_flow", *P, "--iters", "2") == 0
    capsys.readouterr()
    code = run("rectified_flow", *P, "--iters", "3")
    refusal(code, capsys.readouterr(), "pairs and 2rf", "step 2", "step 3")
    assert torch.load(tmp_path / "all" / "ckpt.pt", weights_only=True)["step"] == 2
    assert run("rectified_flow", *P, "--iters", "2") == 0  # control


def test_rectified_flow_fid_of_an_edm_pickle_data_and_fid_ref(files, tmp_path, capsys):
    """rectified_flow fid of an EDM network pickle (config {}) without --data asks for --data: it named Config's
    default, '8gaussians are 2-D points', a data set the user never gave."""
    from standin import edm_pickle, standin_path
    pkl = edm_pickle(tmp_path)
    code = run("rectified_flow", "fid", "--ckpt", pkl, "--n", "4", "--steps", "1", "--root", tmp_path,
               "--fid_detector", standin_path(), "--out", tmp_path / "f.jsonl")
    msg = refusal(code, capsys.readouterr(), "records no data set", "--data")
    assert "8gaussians" not in msg
    np.savez(tmp_path / "ref.npz", mu=np.zeros(32), sigma=np.eye(32))  # --fid_ref alone: the reference (it was
    # refused as '--data and --fid_ref both name the reference', --data never given: no FID of a pickle could run)
    args = ["fid", "--ckpt", pkl, "--n", "4", "--steps", "1", "--fid_detector", standin_path(),
            "--out", tmp_path / "f.jsonl"]
    assert run("rectified_flow", *args, "--fid_ref", tmp_path / "ref.npz") == 0
    capsys.readouterr()
    code = run("rectified_flow", *args, "--fid_ref", tmp_path / "ref.npz", "--data", "cifar10")
    refusal(code, capsys.readouterr(), "--data and --fid_ref both name the reference")


def test_fid_out_not_a_regular_file(files, tmp_path, capsys):
    """fid --out a FIFO (or a device) named .jsonl is refused before any work: fid reads the file, then appends its
    row to it, and a FIFO hung there after the whole FID (an image model waited for ever; here the 2-D fixture, whose
    refusal came later and said nothing of --out)."""
    os.mkfifo(tmp_path / "fifo.jsonl")
    code = run("imm", "fid", "--ckpt", files / "imm" / "ckpt.pt", "--out", tmp_path / "fifo.jsonl",
               "--root", tmp_path)
    refusal(code, capsys.readouterr(), "--out", "fifo.jsonl", "not a regular file")


def test_scm_sigma_max_below_the_checkpoints_t_mid(files, tmp_path, capsys):
    """A CM's --sigma_max whose t_max = arctan(sigma_max / sigma_d) falls below the checkpoint's t_mid: at --steps 1
    (which reads no t_mid, and refuses a --t_mid) it samples; at 2 steps it names the checkpoint's t_mid and asks for a
    --t_mid (it was refused at any --steps, as '--t_mid must lie in (0, t_max)', a flag not given)."""
    assert run("scm", "--batch", "16", "--lr_schedule", "const", *EVAL, "--mode", "sct",
               "--teacher", files / "scm" / "ckpt.pt", "--iters", "1", "--out", tmp_path / "sct") == 0
    ck, out = tmp_path / "sct" / "ckpt.pt", tmp_path / "s.npy"
    capsys.readouterr()
    assert run("scm", "sample", "--ckpt", ck, "--sigma_max", "0.1", "--steps", "1", "--n", "3", "--out", out) == 0
    assert np.load(out).shape == (3, 2) and np.isfinite(np.load(out)).all()
    capsys.readouterr()
    code = run("scm", "sample", "--ckpt", ck, "--sigma_max", "0.1", "--steps", "1,2", "--out", out)
    refusal(code, capsys.readouterr(), "the checkpoint's t_mid", "--sigma_max 0.1", "--t_mid")
    assert run("scm", "sample", "--ckpt", ck, "--sigma_max", "0.1", "--t_mid", "0.1", "--steps", "1,2", "--n", "3",
               "--out", out) == 0


def test_every_sampler_field_changes_the_samples(files, tmp_path, capsys):
    """SAMPLER_FIELDS, the only Config fields sample/fid accept, are read: each, changed at a step count where it
    applies, changes the samples of the fixture run (a field accepted but never read would be ignored in silence).
    scm's --t_mid, the CMs' middle time, on a one-step sCT made from the diffusion fixture (refused on the latter)."""
    assert run("scm", "--batch", "16", "--lr_schedule", "const", *EVAL, "--mode", "sct",
               "--teacher", files / "scm" / "ckpt.pt", "--iters", "1", "--out", tmp_path / "sct") == 0
    cases = dict(imm=[("--sampler", "restart", 2), ("--schedule", "edm", 4), ("--eta_mid", "1.2", 2)],
                 scm=[("--sigma_max", "40", 2), ("--t_mid", "1.0", 2, tmp_path / "sct" / "ckpt.pt")],
                 flow_map=[("--sampler", "ode", 2)],
                 rectified_flow=[("--solver", "heun", 2), ("--grid", "edm", 4), ("--rule", "new", 3),
                                 ("--t_mid", "0.3", 2)])
    g = torch.Generator().manual_seed(0)

    def noisy(path):  # the fixture's weights + noise: a 2-step run's nearly-zero output layer hides a time input
        ck = torch.load(path, weights_only=True)
        ck["ema"] = {k: v + 0.3 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
                     for k, v in ck["ema"].items()}
        torch.save(ck, tmp_path / "noisy.pt")
        return tmp_path / "noisy.pt"
    for name in MODS:
        assert [c[0][2:] for c in cases.get(name, [])] == list(MODS[name].SAMPLER_FIELDS), name  # each one, once
        for flag, value, K, *ck in cases.get(name, []):
            got, ck = [], noisy(ck[0] if ck else files / name / "ckpt.pt")
            for extra in ([], [flag, value]):
                out = tmp_path / f"{name}-{flag[2:]}-{len(extra)}.npy"
                assert run(name, "sample", "--ckpt", ck, "--steps", K, "--n", "8", "--out", out, *extra) == 0
                got.append(np.load(out))
            assert np.isfinite(got[1]).all() and not np.allclose(got[0], got[1], rtol=0, atol=1e-3), (name, flag)
    capsys.readouterr()
    code = run("scm", "sample", "--ckpt", files / "scm" / "ckpt.pt", "--t_mid", "0.5", "--out", tmp_path / "s.npy")
    refusal(code, capsys.readouterr(), "--t_mid", "diffusion")
    for name, flag, value, steps, words in (  # a field that none of --steps reads is refused, not ignored
            ("imm", "--eta_mid", "1.2", "1,4", "--eta_mid is read only at 2 steps, and --steps 1,4 holds none"),
            ("imm", "--schedule", "edm", "1,2", "at 3 steps or more"),
            ("scm", "--t_mid", "1.0", "1", "2 steps or more"),
            ("rectified_flow", "--grid", "edm", "1", "2 steps or more"),
            ("rectified_flow", "--t_mid", "0.3", "1,4", "read only at 2 steps"),
            ("rectified_flow", "--rule", "new", "1,2", "at 3 steps or more")):
        code = run(name, "sample", "--ckpt", tmp_path / "sct" / "ckpt.pt" if name == "scm" else
                   files / name / "ckpt.pt", "--steps", steps, flag, value, "--out", tmp_path / "s.npy")
        refusal(code, capsys.readouterr(), words)
    code = run("rectified_flow", "sample", "--ckpt", files / "rectified_flow" / "ckpt.pt", "--steps", "1,2", "--grid",
               "edm", "--t_mid", "0.3", "--out", tmp_path / "s.npy")  # the edm grid's 2 steps never read it
    refusal(code, capsys.readouterr(), "--t_mid", "edm grid", "--grid uniform")
    code = run("rectified_flow", "sample", "--ckpt", files / "rectified_flow" / "ckpt.pt", "--solver", "rk4", "--rule",
               "new", "--steps", "3", "--out", tmp_path / "s.npy")  # rk4 never reads the rule
    refusal(code, capsys.readouterr(), "--rule new", "rk4")
    # control: a diffusion model's Heun takes any sigma_max (the CMs' t_mid < arctan(sigma_max / sigma_d) is not its)
    assert run("scm", "sample", "--ckpt", files / "scm" / "ckpt.pt", "--sigma_max", "0.5", "--steps", "2", "--n", "2",
               "--out", tmp_path / "s.npy") == 0


def resume_cases(name, d):
    """Refused on resume of the fixture run (d / name, trained with seed 0, the toy preset)."""
    at = [*BASE[name], "--out", d / name, "--iters", "4", LR.get(name, "--lr"), "5e-4"]  # a change it would note
    extra = dict(scm=[(["--width", "32"], ["width"])],
                 flow_map=[(["--width", "32"], ["width"]), (["--learned_weight", "true"], ["learned_weight"])],
                 distributional=[(["--freeze", "gdd_i"], ["--freeze"])])
    return [([*at, "--seed", "1"], ["--seed"]), ([*at, "--preset", "small"], ["--preset small"]),
            ([*at[:-4], "--iters", "1"], ["at step 2", "--iters 1"]),
            ([*at, "--data", "spirals"], ["trained on --data", "keeps its data", "--data spirals"]),
            ([*at, "--data", d / "same.npy"], ["trained on --data", "same.npy"]),
            ([*at, "--data", d / "typo.npy"], ["typo.npy' is neither a known data set"])] + \
        [([*at, *a], w) for a, w in extra.get(name, [])]


def test_a_hidden_file_name_is_a_sample_name(files, tmp_path, capsys):
    """`sample --out DIR/.npy` names the file '.npy' (os.path.splitext calls it a name without an extension): one
    step count writes DIR/.npy, several write DIR/_1step.npy, ...; it was refused as '.npy_1step', after GDD's note."""
    ck = files / "imm" / "ckpt.pt"
    assert run("imm", "sample", "--ckpt", ck, "--out", tmp_path / "a" / ".npy", "--n", "2", "--steps", "1") == 0
    assert run("imm", "sample", "--ckpt", ck, "--out", tmp_path / "b" / ".npy", "--n", "2") == 0
    assert sorted(os.listdir(tmp_path / "a")) == [".npy"]
    assert sorted(os.listdir(tmp_path / "b")) == ["_1step.npy", "_2step.npy"]
    assert np.load(tmp_path / "b" / "_2step.npy").shape == (2, 2)


def test_every_sampler_reads_the_precision(files, tmp_path):
    """`sample --precision bf16` (and fid's) runs each file's network under bf16 autocast: GDD's generator ignored it
    and wrote its fp32 samples."""
    for name in MODS:
        got = {}
        for p in ("fp32", "bf16"):
            out = tmp_path / f"{name}-{p}.npy"
            assert run(name, "sample", "--ckpt", files / name / "ckpt.pt", "--steps", "1", "--n", "8", "--precision",
                       p, "--out", out) == 0
            got[p] = np.load(out)
        assert not np.array_equal(got["fp32"], got["bf16"]), name


@pytest.mark.parametrize("name", MODS)
def test_bad_input_is_one_sentence(name, files, capsys):
    before = open(files / name / "ckpt.pt", "rb").read()
    cases = train_cases(name, files) + sample_cases(name, files) + resume_cases(name, files)
    for argv, words in cases:
        capsys.readouterr()
        code = run(name, *argv)
        out, err = capsys.readouterr()
        refusal(code, err, *words)
        assert out == "", (argv, out)  # nothing before the error, e.g. no "config: lr = ..." line of a refused resume
    assert not os.path.exists(files / "never")  # nothing written in --out, not even config.json
    assert open(files / name / "ckpt.pt", "rb").read() == before  # no refusal touched the run


@pytest.mark.parametrize("name, flag", [("imm", "--width"), ("scm", "--width"), ("scm", "--depth"),
                                        ("flow_map", "--width"), ("flow_map", "--depth"),
                                        ("flow_map", "--time_channels"), ("rectified_flow", "--width")])
def test_a_network_size_beyond_2_31_is_named_as_the_option(name, flag, tmp_path, capsys):
    """A size build_net cannot hold (2^31 and beyond) given on the command line was refused as "a checkpoint's network
    config holds width=..., (it was edited, or not written by this project)" on a fresh run: it is the option's
    range."""
    code = run(name, flag, "1e15", "--out", tmp_path / "never")
    out, err = capsys.readouterr()
    refusal(code, err, flag, "2147483647", "1000000000000000")
    assert out == "" and "checkpoint" not in err


@pytest.mark.parametrize("name, argv, flag", [
    ("scm", ["--mode", "sct", "--teacher", ""], "--teacher"), ("distributional", ["--teacher", ""], "--teacher"),
    ("imm", ["--teacher", ""], "--teacher"), ("rectified_flow", ["--stage", "2rf", "--pairs", ""], "--pairs"),
    ("imm", ["fid", "--ckpt", "x.pt", "--fid_ref", ""], "--fid_ref")])
def test_an_empty_path_is_refused_not_read_as_none(name, argv, flag, tmp_path, capsys):
    """`--teacher ''` (a script's unset variable) was no teacher to the checks that ask `if cfg.teacher` and a teacher
    to those that ask `is not None`: sCT trained from scratch, GDD refused --teacher_iters "as its teacher is ''" or
    reused DIR/teacher.pt without comparing its settings, --fid_ref '' computed the statistics. One sentence now."""
    code = run(name, *argv, *(["--out", tmp_path / "never"] if argv[0] != "fid" else []))
    refusal(code, capsys.readouterr(), flag, "name (or leave it out)")
    assert not os.path.exists(tmp_path / "never")


def test_every_mode_and_stage_refuses_the_options_only_others_read(files, tmp_path, capsys):
    """The tables behind common.refuse_other, end to end: each option in flow_map.MODE_ONLY, scm.MODE_ONLY and
    rectified_flow.STAGE_ONLY, given to every mode or stage that does not read it, is one sentence naming it (they
    were recorded in the config and never read: found by resuming and starting every mode with each field changed,
    ~450 toy runs compared tensor by tensor); the helper lets the readers' values through."""
    import dataclasses, typing
    teacher = dict(flow_map=files / "rectified_flow" / "ckpt.pt", scm=files / "scm" / "ckpt.pt",
                   rectified_flow=files / "rectified_flow" / "ckpt.pt")
    value = dict(huber_c="0.1", ema="0.9", clip="1", diag_frac="0.5", noise_mode="seed", width="16", eval_steps="1")
    n = 0
    for name, table, flag in (("flow_map", flow_map.MODE_ONLY, "mode"), ("scm", scm.MODE_ONLY, "mode"),
                              ("rectified_flow", rectified_flow.STAGE_ONLY, "stage")):
        M = MODS[name]
        fields = {f.name: f for f in dataclasses.fields(M.Config)}
        selectors = typing.get_args(fields[flag].type)
        for k, readers in table.items():
            assert set(readers) <= set(selectors), (name, k)
            v = value.get(k, str(fields[k].default).lower() if isinstance(fields[k].default, bool) else
                          str(fields[k].default))
            for sel in selectors:
                if sel in readers:
                    C.refuse_other({k: v}, table, flag, sel)  # a reader: no refusal
                    continue
                if (name, sel, k) == ("rectified_flow", "ft", "iters"):  # (ft's own sentence)
                    continue
                extra = ["--teacher", teacher[name]] if sel in ("lmd", "emd", "sct", "scd", "pairs", "2rf") else []
                extra += ["--data", "8gaussians"] if sel in ("lmd", "emd") else []
                capsys.readouterr()
                code = run(name, f"--{flag}", sel, f"--{k}", v, *extra, "--out", tmp_path / "never")
                refusal(code, capsys.readouterr(), f"--{flag} {sel} does not read --{k} ")
                n += 1
    assert not os.path.exists(tmp_path / "never") and n > 100, n


def test_a_file_where_the_fid_statistics_go_is_refused_before_training(files, tmp_path):
    """--root/fid_refs a file: the in-training FID (as `fid`, in the table above) met it after its work, in a traceback
    from rank 0's os.makedirs (the other ranks waiting for it); preflight refuses it where the FID runs."""
    cfg = dict(out=str(tmp_path / "run"), root=str(files / "root"), fid_every=1)
    with pytest.raises(C.UserError, match="FID statistics folder .*fid_refs' is a file"):
        C.preflight("train", types.SimpleNamespace(**cfg))
    C.preflight("train", types.SimpleNamespace(**{**cfg, "fid_every": 0}))  # no FID, nothing written there


def test_case_table(files):
    """The docstring's table: bad-input cases per file (every one ends in one sentence and exit 2)."""
    got = {n: len(train_cases(n, files) + sample_cases(n, files) + resume_cases(n, files)) for n in MODS}
    assert got == dict(imm=73, scm=77, flow_map=79, rectified_flow=80, distributional=79), got


def test_every_refusal_branch_is_one_sentence(files, tmp_path, capsys, monkeypatch):
    """The refusals of the method files that no other test reached (a coverage run of the suite), each from the input
    that reaches it: one sentence naming the option, file or value, exit 2, nothing on stdout or in --out. Teachers
    and checkpoints are the fixture's toy runs, edited where a branch needs another network (a conditional or
    two-time one, a U-Net of 3 classes), and the tiny EDM-written pickles of tests/golden/."""
    from PIL import Image
    from standin import edm_pickle
    d, t = files, tmp_path
    rng = np.random.default_rng(0)
    img8, img16, lab = t / "img8.npy", t / "img16.npy", t / "lab"
    np.save(img8, rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8))  # the pickles' shape, 3 x 8 x 8
    np.save(img16, rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    lab.mkdir()  # 8 x 8 images of 2 classes (EDM's dataset.json)
    for i in range(4):
        Image.new("RGB", (8, 8), (60 * i,) * 3).save(lab / f"{i}.png")
    (lab / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", i % 2] for i in range(4)]}))
    unc, cnd, missing = edm_pickle(t), edm_pickle(t, "edm_ve_ncsnpp_cond"), t / "edm-cifar10-32x32-uncond-ve.pkl"
    rf = torch.load(d / "rectified_flow" / "ckpt.pt", weights_only=True)

    def edited(name, ck, **entries):
        torch.save({**ck, **entries}, t / name)
        return t / name
    labels = edited("labels.pt", rf, net={**rf["net"], "label_dim": 3})  # a conditional rectified_flow teacher
    two = edited("two.pt", rf, net={**rf["net"], "num_times": 2})
    unet3 = edited("unet3.pt", rf, net=C.net_config("tiny", img_resolution=8, in_channels=3, label_dim=3))  # (its
    # weights stay the MLP's: the refusal reads no further than the net dict)
    fm = torch.load(d / "flow_map" / "ckpt.pt", weights_only=True)
    conv = edited("conv.pt", fm, convention=fm["convention"].replace("(linear)", "(trig)"))
    (t / "other").mkdir()
    shutil.copy(d / "imm" / "ckpt.pt", t / "other" / "ckpt.pt")  # another method's run in --out
    (t / "ft" / "2rf").mkdir(parents=True)
    shutil.copy(d / "rectified_flow" / "ckpt.pt", t / "ft" / "2rf" / "ckpt.pt")  # a 2-RF of 2-D points

    def offline(*a, **k):
        raise OSError("offline")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)  # VGG16-BN's download (never fetched here)
    out = ["--out", t / "never"]
    lmd8 = ["--mode", "lmd", "--data", img8]
    cases = [
        ("imm", ["--net", "tiny", *out], ["--net tiny is an image network", "--net mlp"]),
        ("flow_map", ["--augment", "0.5", *out], ["--augment", "--mode meanflow", "not --mode lsd"]),
        ("flow_map", ["--net", "tiny", *out], ["--net tiny is an image network", "--net mlp"]),
        ("flow_map", ["--mode", "meanflow", "--augment", "0.5", *out], ["--augment", "2-D points"]),
        ("flow_map", [*lmd8, "--teacher", missing, *out],
         [str(missing), "not found", "pretrained/" + missing.name]),
        ("flow_map", ["--mode", "lmd", "--data", img16, "--teacher", unc, *out],
         [unc, "(3, 8, 8)", "(3, 16, 16)"]),
        ("flow_map", [*lmd8, "--teacher", cnd, *out], [cnd, "class-conditional"]),
        ("flow_map", ["--mode", "lmd", "--teacher", labels, *out], [str(labels), "class-conditional"]),
        ("flow_map", [*BASE["flow_map"], "--out", t / "other"], ["checkpoint of imm", "another --out"]),
        ("flow_map", ["sample", "--ckpt", conv, "--out", t / "never.npy"], [str(conv), "(trig)", "edited"]),
        ("scm", ["--net", "tiny", *out], ["--net tiny is an image network", "--net mlp"]),
        ("scm", ["--mode", "diffusion", "--augment", "0.5", *out], ["--augment", "2-D points"]),
        ("scm", ["--mode", "sct", "--data", img8, "--teacher", missing, *out], [str(missing), "not found"]),
        ("scm", ["--mode", "sct", "--data", img8, "--teacher", cnd, *out], [cnd, "class-conditional"]),
        ("scm", ["--mode", "sct", "--teacher", d / "scm" / "ckpt.pt", "--width", "32", *out],
         ["--mode sct takes its network from", "drop --net/--width"]),
        ("scm", ["--mode", "sct", "--data", img8, "--teacher", d / "scm" / "ckpt.pt", *out],
         ["generates (2,)", "(3, 8, 8)"]),  # a 2-D teacher beside images
        ("scm", ["--mode", "sct", "--data", img16, "--teacher", unc, *out], [unc, "(3, 8, 8)", "(3, 16, 16)"]),
        ("scm", ["--mode", "diffusion", "--batch", "10", "--accum", "3", *out], ["--batch 10", "--accum 3"]),
        ("distributional", ["--preset", "tiny", *out], ["needs --data"]),
        ("distributional", ["--disc_backbones", "vgg,foo", *out], ["--disc_backbones", "'vgg,foo'"]),
        ("distributional", ["--r1_gamma_gdd", "-1", *out], ["--r1_gamma_gdd must be non-negative", "-1.0"]),  # RANGES
        ("distributional", ["--data", img8, "--teacher", unc, "--disc", "teacher", *out],
         ["--disc teacher", "EDM teacher", "--disc projected"]),  # check_disc (TeacherD's refusal wrote config.json)
        ("distributional", ["--data", img8, "--teacher_net", "tiny", "--disc", "projected", "--disc_backbones", "vgg",
                            *out],
         ["VGG16-BN's ImageNet weights", "(OSError)", "--disc_weights random"]),
        ("distributional", ["--data", img8, "--teacher_net", "mlp", "--disc", "scratch", *out],
         ["--teacher_net mlp", "tiny, small or ddpmpp"]),  # (both wrote config.json in --out first)
        ("distributional", ["--teacher_net", "tiny", *out], ["--teacher_net tiny", "need mlp"]),
        ("distributional", ["--teacher", two, *out], [str(two), "two-time"]),
        ("distributional", ["--data", lab, "--cond", "true", "--teacher", unet3, "--disc", "scratch", *out],
         [str(unet3), "3 classes", str(lab), "has 2"]),
        ("distributional", ["--data", lab, "--cond", "true", "--teacher", cnd, "--disc", "scratch", "--iters", "0",
                            *out], [cnd, "10 classes", str(lab), "has 2"]),  # (it trained: --iters 0 bounds that)
        ("distributional", ["--data", img8, "--teacher", missing, "--disc", "scratch", *out],
         [str(missing), "not found"]),
        ("distributional", ["--data", img8, "--teacher", cnd, "--disc", "scratch", *out],
         ["--cond false does not fit", "10 classes", "set --cond true"]),
        ("distributional", ["--data", img16, "--teacher", unc, "--disc", "scratch", *out],
         ["3 x 8^2", "(3, 16, 16)"]),
        ("distributional", ["--data", img8, "--disc", "mlp", *out], ["--disc mlp is for 2-D points"]),
        ("rectified_flow", ["--preset", "tiny", *out], ["needs --data"]),
        ("rectified_flow", ["--stage", "1rf", "--data", img8, "--net", "mlp", *out], ["--net mlp is for 2-D"]),
        ("rectified_flow", ["--stage", "1rf", "--net", "tiny", *out], ["--net tiny is an image network"]),
        ("rectified_flow", ["--stage", "1rf", "--batch", "10", "--accum", "3", *out],
         ["--batch 10", "--accum 3"]),
        ("rectified_flow", ["--stage", "ft", "--out", t / "ft"], ["--stage ft", "image data set"]),
    ]
    for name, argv, words in cases:
        capsys.readouterr()
        code = run(name, *argv)
        got, err = capsys.readouterr()
        refusal(code, err, *map(str, words))
        assert got == "", (name, argv, got)
        assert not os.path.exists(t / "never"), (name, argv, os.listdir(t / "never"))  # not even config.json
    assert not os.path.exists(t / "never.npy")
    assert os.listdir(t / "ft") == ["2rf"] and os.listdir(t / "other") == ["ckpt.pt"]
    # distributional.py: an explicit --r1_gamma is the run's gamma as given (resolve_gamma's batch-mean branch), and
    # TeacherD (a library class; the command line builds it from a U-Net teacher only) refuses an EDM generator and a
    # 2-D network
    G = distributional
    assert G.resolve_gamma(G.Config(r1_gamma=0.2), {"r1_gamma": 0.2}, 548, 16) == (0.2, "gamma 0.2 (batch-mean)")
    for net, words in ((G.load_teacher(unc, G.Config(), None, None)[0], "EDM teacher use --disc projected"),
                       (C.build_net(C.net_config("mlp")), "needs an image teacher")):
        with pytest.raises(C.UserError, match=words):
            G.TeacherD(net, 0.1)


@pytest.mark.parametrize("name", ["imm", "scm", "flow_map", "rectified_flow"])
def test_an_option_the_data_kind_never_reads_is_refused(name, tmp_path, capsys):
    """--width/--depth (the MLP) on images and --xflip/--arch on 2-D points were ignored without a word; now one
    sentence, with nothing before it, not even load_data's line about a points file (it waits for the run's first
    line). The preset's own values for the other kind (the cifar10 presets' xflip) are not refused."""
    np.save(tmp_path / "imgs.npy", np.zeros((4, 8, 8, 3), np.uint8))
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(0, 0.5, (64, 2)).astype(np.float32))
    mode = dict(scm=["--mode", "diffusion"], rectified_flow=["--stage", "1rf"]).get(name, [])
    out = ["--out", tmp_path / "never", *mode]
    cases = [(["--data", tmp_path / "imgs.npy", "--net", "tiny", "--width", "8", *out], "--width applies to 2-D"),
             (["--data", tmp_path / "pts.npy", "--xflip", "true", *out], "--xflip applies to images")]
    if name in ("scm", "flow_map"):
        cases.append((["--data", tmp_path / "imgs.npy", "--net", "tiny", "--depth", "2", *out], "--depth"))
    if name == "flow_map":
        cases.append((["--arch", "py-meanflow", *out], "--arch applies to images"))
    for argv, words in cases:
        capsys.readouterr()
        code = run(name, *argv)
        out_, err = capsys.readouterr()
        refusal(code, err, words)
        assert out_ == "", (argv, out_)
    assert not os.path.exists(tmp_path / "never" / "ckpt.pt")
    # a points file's data line is printed once, with the run's first line, not lost
    assert run(name, *BASE[name], "--data", tmp_path / "pts.npy", "--iters", "1", "--out", tmp_path / "ok") == 0
    out_ = capsys.readouterr().out
    assert out_.startswith(f"data {tmp_path / 'pts.npy'}: 64 points") and out_.count("data ") == 1, out_
    # control: the toy preset's own MLP sizes (and the cifar10-style xflip of a preset) are not options given
    assert run(name, *mode, "--data", tmp_path / "imgs.npy", "--net", "tiny", "--iters", "0", "--eval_n", "4",
               "--out", tmp_path / "img") == 0


@pytest.mark.parametrize("name", sorted(MODS))
def test_the_in_training_fid_options_are_refused_on_2d_points(name, files, tmp_path, capsys):
    """--fid_every on a toy or a points file crashed imm, scm and rectified_flow with a traceback once a detector was
    found (the FID hook fed 2-D points to it; flow_map and GDD ignored it without a word): one sentence now, as for
    --fid_n and --fid_detector, also on rectified_flow's 2-RF of a 2-D teacher. --fid_every 0 ("no FID") runs."""
    from standin import standin_path
    np.save(tmp_path / "pts.npy", np.random.default_rng(0).normal(0, 0.5, (64, 2)).astype(np.float32))
    fid, out = ["--fid_every", "1", "--fid_n", "4", "--fid_detector", standin_path()], ["--out", tmp_path / "never"]
    cases = [([*fid, *out], "--fid_every applies to images"),
             (["--data", tmp_path / "pts.npy", *fid, *out], "--fid_every applies to images"),
             (["--fid_n", "8", *out], "--fid_n applies to images"),
             (["--fid_detector", standin_path(), *out], "--fid_detector applies to images")]
    if name == "rectified_flow":
        cases.append((["--stage", "2rf", "--teacher", files / name / "ckpt.pt", *fid, *out], "--fid_every"))
    for argv, words in cases:
        capsys.readouterr()
        code = run(name, *BASE[name], "--iters", "1", *argv)
        out_, err = capsys.readouterr()
        refusal(code, err, words)
        assert out_ == "", (argv, out_)
    assert not os.path.exists(tmp_path / "never")
    assert run(name, *BASE[name], "--iters", "1", "--fid_every", "0", "--out", tmp_path / "ok") == 0  # control
    # a preset's --fid_every on 2-D points (not given, so not refused) is skipped by the hook, no detector loaded
    data = C.load_data(str(tmp_path / "pts.npy"), str(tmp_path), C.setup("cpu", 0, None), 0, False)
    assert C.FidHook(str(tmp_path / "nowhere.pt"), data, None, str(tmp_path), 4, None)(1, {"x": None}) == {}


def test_scm_values_it_read_as_something_else_are_refused(tmp_path, capsys):
    """--augment in a CM mode was ignored (only the diffusion teacher reads it); a negative EMA half-life or lr
    ramp ran as "none". One sentence each; the diffusion mode's --augment is checked by the data (points: 0)."""
    for argv, words in ((["--mode", "sct", "--augment", "0.5"], "--mode diffusion only"),
                        (["--mode", "scd", "--augment", "0.5"], "--mode diffusion only"),
                        (["--ema_halflife_kimg", "-1"], "--ema_halflife_kimg must be non-negative"),
                        (["--lr_ramp_kimg", "-1"], "--lr_ramp_kimg must be non-negative")):
        capsys.readouterr()
        i = BASE["scm"].index("--heun_steps")  # (sCT/sCD do not read it)
        base = [*BASE["scm"][:i], *BASE["scm"][i + 2:]] if "--augment" in argv else BASE["scm"]
        code = run("scm", *base, *argv, "--out", tmp_path / "never")
        refusal(code, capsys.readouterr(), words)
    assert not os.path.exists(tmp_path / "never")


def test_an_edited_checkpoint_is_one_sentence(files, tmp_path, capsys):
    """Entries of the right top-level type but wrong inside (the RNG state, the optimiser state, the weights) ended in
    KeyError/TypeError/AttributeError/RuntimeError tracebacks on resume."""
    ck = torch.load(files / "imm" / "ckpt.pt", weights_only=True)
    bad = dict(rng_ranks={"world": 1, "ranks": [{}]}, rng_keys={"foo": 1},
               rng_state={"world": 1, "ranks": [{"cpu": torch.zeros(3, dtype=torch.uint8), "cuda": None, "gens": []}]},
               opt={"state": {}, "param_groups": "x"}, model={k: "x" for k in ck["model"]})
    for name, value in bad.items():
        d = tmp_path / name
        d.mkdir()
        torch.save({**ck, name.split("_")[0]: value}, d / "ckpt.pt")
        capsys.readouterr()
        code = run("imm", *BASE["imm"], "--out", d, "--iters", "3")
        out, err = capsys.readouterr()
        refusal(code, err, "malformed")
        assert out == "", (name, out)


def test_a_folder_where_a_run_writes_a_file_is_one_sentence(files, tmp_path, capsys):
    """A folder named config.json (log.jsonl, ckpt.pt.tmp, ...) in --out, or named like one of sample's per-step
    files, ended in IsADirectoryError/RuntimeError tracebacks after the work."""
    for f in ("config.json", "log.jsonl", "ckpt.pt.tmp"):
        os.makedirs(tmp_path / f / f)
        capsys.readouterr()
        code = run("imm", *BASE["imm"], "--iters", "1", "--out", tmp_path / f)
        refusal(code, capsys.readouterr(), f"is a folder where the run writes its {f}")
    os.makedirs(tmp_path / "s_1step.npy")
    capsys.readouterr()
    code = run("imm", "sample", "--ckpt", files / "imm" / "ckpt.pt", "--steps", "1,2", "--out", tmp_path / "s.npy")
    refusal(code, capsys.readouterr(), "s_1step.npy", "is a folder")
    assert not os.path.exists(tmp_path / "s_2step.npy")


def test_a_pipe_or_a_broken_link_where_a_run_writes_a_file_is_one_sentence(tmp_path, capsys):
    """A FIFO named log.jsonl (config.json, metrics.jsonl) in --out hung the run (its open for writing waits for a
    reader); a broken link named so was a FileNotFoundError traceback after the work."""
    for f, make in (("log.jsonl", os.mkfifo), ("metrics.jsonl", os.mkfifo),
                    ("config.json", lambda p: os.symlink(tmp_path / "nowhere" / "x", p))):
        d = tmp_path / f"r_{f}"
        d.mkdir()
        make(d / f)
        capsys.readouterr()
        code = run("imm", *BASE["imm"], "--iters", "1", "--out", d)
        # (a device, a link to /dev/full, is written to as a file: the full disk's sentence, below)
        refusal(code, capsys.readouterr(), f"is a pipe or a broken link where the run writes its {f}")


def test_a_broken_link_where_a_folder_goes_is_one_sentence(files, tmp_path, capsys):
    """A broken symbolic link (or a loop of them) named as --out, above it, or as the folder of sample's --out passed
    check_dir (it does not exist) and met os.makedirs after the checks: a FileExistsError or ELOOP traceback."""
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "broken")
    os.symlink(tmp_path / "loop", tmp_path / "loop")
    sample = ["sample", "--ckpt", files / "imm" / "ckpt.pt", "--out", tmp_path / "broken" / "s.png"]
    create = f"to '{tmp_path / 'nowhere' / 'x'}', which does not exist: create that folder, or remove the link"
    for argv, at, what in ((["--out", tmp_path / "broken"], "broken", create),
                           (["--out", tmp_path / "loop" / "run"], "loop", "a loop of links: remove it"),
                           (sample, "broken", create)):
        code = run("imm", *argv)
        refusal(code, capsys.readouterr(), f"'{tmp_path / at}' is a broken symbolic link ({what}).")


def test_a_broken_link_where_a_stage_folder_goes_is_one_sentence(files, tmp_path, capsys):
    """A broken link named as --pairs (or DIR/pairs) passed check_layout (it does not exist) and met os.makedirs after
    the checks: a FileExistsError traceback."""
    os.symlink(tmp_path / "nowhere" / "x", tmp_path / "broken")
    (tmp_path / "run").mkdir()
    os.symlink(tmp_path / "nowhere" / "y", tmp_path / "run" / "pairs")
    teacher = ["--teacher", files / "rectified_flow" / "ckpt.pt", "--n_pairs", "32", "--pair_block", "16"]
    for argv, at, to in ((["--pairs", tmp_path / "broken", "--out", tmp_path / "other"], tmp_path / "broken", "x"),
                         (["--out", tmp_path / "run"], tmp_path / "run" / "pairs", "y")):
        code = run("rectified_flow", "--stage", "pairs", *teacher, *argv)
        # (the link's target to create: "remove it or use another --out" was all it said, which another --out does
        # not mend for a --pairs given)
        refusal(code, capsys.readouterr(), f"'{at}' is a broken symbolic link where the run keeps its {at.name} folder "
                f"(to '{tmp_path / 'nowhere' / to}', which does not exist: create that folder, or remove the link).")


def test_a_resumed_run_refuses_another_batch(tmp_path, capsys):
    """--batch changed on resume was noted and applied, but the data position (step x batch), the images an EMA
    half-life or an lr ramp counts (step x batch) and the logged kimg all read the new batch for the steps already
    trained: data skipped or replayed, the EMA's decay jumped. Refused now (imm, whose --accum is named; GDD has none);
    controls: the same --batch resumes, and a finished run notes another one as not applied."""
    argv = ["--eval_n", "16", "--eval_steps", "1", "--out", tmp_path / "r"]
    assert run("imm", *argv, "--batch", "12", "--iters", "1") == 0
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    refusal(run("imm", *argv, "--batch", "8", "--iters", "2"), capsys.readouterr(), "--batch 12",
             "steps x batch", "--accum")
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    assert run("imm", *argv, "--batch", "8", "--iters", "1") == 0  # finished: not applied, said so
    assert "config: --batch 8 not applied" in capsys.readouterr().out
    assert run("imm", *argv, "--batch", "12", "--iters", "2") == 0
    d = tmp_path / "g"
    g = ["--teacher_iters", "2", "--eval_n", "16", "--out", d]
    assert run("distributional", *g, "--batch", "8", "--iters", "1") == 0
    capsys.readouterr()
    msg = refusal(run("distributional", *g, "--batch", "16", "--iters", "2"), capsys.readouterr(),
                   "--batch 8")
    assert "--accum" not in msg


def test_a_gdd_gamma_changed_on_resume_stays_on_a_plain_restart(tmp_path, capsys):
    """A GDD run of --r1_gamma 0.3 resumed with --r1_gamma_gdd 0.5 trained on at GDD's gamma, but its config held both,
    and gdd_gamma picks the convention by the command line: the next plain restart went back to 0.3 with no word
    (config.json unchanged). The given convention now replaces the other in the config, noted."""
    d = tmp_path / "g"
    argv = [*BASE["distributional"], "--out", d]
    header = lambda out: next(ln for ln in out.splitlines() if "R1 every" in ln).split("R1 every")[1].split(" | ")[0]
    assert run("distributional", *argv, "--r1_gamma", "0.3", "--iters", "1") == 0
    assert "gamma 0.3 (batch-mean)" in header(capsys.readouterr().out)
    assert run("distributional", *argv, "--r1_gamma_gdd", "0.5", "--iters", "2") == 0
    out = capsys.readouterr().out
    assert "config: r1_gamma = None (checkpoint had 0.3; --r1_gamma_gdd replaces it)" in out
    assert "GDD's 0.5" in (was := header(out))
    assert run("distributional", *argv, "--iters", "3") == 0
    assert header(capsys.readouterr().out) == was
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["r1_gamma"], cfg["r1_gamma_gdd"]) == (None, 0.5)


def test_a_1rf_on_images_refuses_the_pair_solver_it_never_reads(tmp_path, capsys):
    """--stage 1rf reads --pair_solver/--pair_steps/--pair_grid in its 2-D evaluation only (the pairs' solver beside
    its samples): on images a fresh run took them without a word, and a resume noted 'config: pair_steps = 3' and
    recorded it, unread. Refused now; controls: the same options on points, and --stage all (its pairs read them)."""
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    img = ["--preset", "tiny", "--data", tmp_path / "imgs.npy", "--root", tmp_path / "data", "--eval_n", "8"]
    i = ["--stage", "1rf", *img, "--out", tmp_path / "i"]
    for k, v in (("pair_steps", "3"), ("pair_solver", "euler"), ("pair_grid", "uniform")):
        refusal(run("rectified_flow", *i, "--iters", "1", f"--{k}", v), capsys.readouterr(), f"--{k}",
                "2-D points only")
    assert run("rectified_flow", *i, "--iters", "1") == 0
    before = cli.sha(tmp_path / "i" / "ckpt.pt")
    capsys.readouterr()
    refusal(run("rectified_flow", *i, "--iters", "2", "--pair_steps", "3"), capsys.readouterr(), "--pair_steps")
    assert cli.sha(tmp_path / "i" / "ckpt.pt") == before
    assert run("rectified_flow", *BASE["rectified_flow"], "--iters", "1", "--pair_steps", "3", "--out",
               tmp_path / "p") == 0
    assert run("rectified_flow", "--stage", "all", *img, "--iters", "1", "--pair_steps", "3", "--n_pairs", "8",
               "--pair_block", "8", "--pair_batch", "8", "--out", tmp_path / "a") == 0
    assert json.loads((tmp_path / "a" / "pairs" / "meta.json").read_text())["steps"] == 3


def test_gdd_notes_a_teacher_reference_it_will_not_draw(files, tmp_path, capsys):
    """GDD draws the teacher's reference sample (--eval_teacher_steps) in its step-0 evaluation on points only: a
    resumed run, past step 0, noted 'config: eval_teacher_steps = 5' and recorded it, never read, and an image run
    took it without a word. Now the resume notes it as not applied (config.json stays the checkpoint's) and images
    refuse it."""
    import shutil
    shutil.copytree(files / "distributional", tmp_path / "r")
    assert run("distributional", *BASE["distributional"], "--out", tmp_path / "r", "--iters", "3",
               "--eval_teacher_steps", "5") == 0
    out = capsys.readouterr().out
    assert "config: --eval_teacher_steps 5 not applied: the teacher's reference sample is drawn at step 0" in out
    assert "config: eval_teacher_steps =" not in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["eval_teacher_steps"] == 0
    np.save(tmp_path / "imgs.npy", np.random.default_rng(0).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8))
    refusal(run("distributional", "--preset", "tiny", "--data", tmp_path / "imgs.npy", "--eval_teacher_steps", "5",
                "--out", tmp_path / "i"), capsys.readouterr(), "--eval_teacher_steps", "2-D points only")


def test_a_resumed_run_checks_a_change_against_its_own_config(tmp_path, capsys):
    """IMM resumed with --M 6 over a run of --batch 12 was refused as '--batch 512 must be a multiple of --M 6': the
    rules between fields were checked on the preset's values before the merge with the checkpoint. Now they are
    checked on the run's config with the change; control: --M 5 does not divide the run's 12 and is refused."""
    argv = ["--batch", "12", "--eval_n", "16", "--eval_steps", "1", "--out", tmp_path / "r"]
    assert run("imm", *argv, "--iters", "1") == 0
    capsys.readouterr()
    assert run("imm", "--out", tmp_path / "r", "--iters", "2", "--M", "6") == 0
    assert "config: M = 6 (checkpoint had 4)" in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]["M"] == 6
    refusal(run("imm", "--out", tmp_path / "r", "--iters", "3", "--M", "5"), capsys.readouterr(),
             "--batch 12 must be a multiple of --M 5")


def test_a_fresh_stage_beside_a_finished_1rf_checks_its_own_rules(tmp_path, capsys):
    """The rules between fields are left to resume_config at parse time for a run that resumes, and rectified_flow's
    DIR/ckpt.pt is the 1-RF's: a fresh --stage 2rf with --solver rk4 --rule new trained a 2-RF that could then be
    neither sampled nor resumed, and --stage pairs wrote pairs of --noise_std 3. parse_cli now asks the file which
    checkpoint the stage resumes (rectified_flow.resumed_ckpt). Control: the 2-RF of its own, resumed, is refused
    the same rule on its config and takes a valid change."""
    import shutil
    argv = [a for a in BASE["rectified_flow"] if a not in ("--stage", "1rf")] + ["--out", tmp_path / "r"]
    assert run("rectified_flow", *argv, "--stage", "all", "--iters", "2", "--n_pairs", "16", "--pair_block", "16",
               "--pair_batch", "16", "--pair_steps", "2") == 0
    shutil.move(tmp_path / "r" / "2rf", tmp_path / "2rf")
    capsys.readouterr()
    refusal(run("rectified_flow", *argv, "--stage", "2rf", "--iters", "2", "--solver", "rk4", "--rule", "new"),
             capsys.readouterr(), "--rule new", "rk4")
    assert not (tmp_path / "r" / "2rf").exists()
    shutil.move(tmp_path / "r" / "pairs", tmp_path / "pairs")
    refusal(run("rectified_flow", *argv, "--stage", "pairs", "--noise_std", "3"), capsys.readouterr(),
             "--noise_std is fixed at 1")
    assert not (tmp_path / "r" / "pairs").exists()
    assert rectified_flow.resumed_ckpt(rectified_flow.Config(out="D", stage="all")) == os.path.join("D", "ckpt.pt")
    assert rectified_flow.resumed_ckpt(rectified_flow.Config(out="D", stage="pairs")) is None
    shutil.move(tmp_path / "2rf", tmp_path / "r" / "2rf"), shutil.move(tmp_path / "pairs", tmp_path / "r" / "pairs")
    refusal(run("rectified_flow", *argv, "--stage", "2rf", "--iters", "4", "--solver", "rk4", "--rule", "new"),
             capsys.readouterr(), "--rule new", "rk4")
    assert run("rectified_flow", *argv, "--stage", "2rf", "--iters", "3", "--solver", "rk4") == 0
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["config"]["solver"] == "rk4"


def test_stage_all_refuses_pairs_it_would_not_make_before_any_stage(files, tmp_path, capsys):
    """rectified_flow --stage all restarted over a finished 1-RF with another pair option (or a --pairs folder of
    another teacher's pairs) ran the 1-RF stage, printed it, and refused at the pairs stage. Now it is refused
    before any stage, nothing printed. Control: the same restart with the pairs' own options goes on."""
    import shutil
    shutil.copytree(files / "rectified_flow", tmp_path / "r")
    rf = ["--batch", "16", "--straight_k", "2", "--lr_schedule", "const", *EVAL, "--n_pairs", "16", "--iters", "2"]
    pairs = ["--stage", "pairs", "--n_pairs", "16", "--pair_steps", "3", "--out", tmp_path / "r"]
    assert run("rectified_flow", *pairs) == 0
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    torch.save({**ck, "ema": {k: v + 1 for k, v in ck["ema"].items()}}, tmp_path / "t2.pt")  # another teacher
    assert run("rectified_flow", *pairs, "--pairs", tmp_path / "p2", "--teacher", tmp_path / "t2.pt") == 0
    for argv, words in [(["--pair_steps", "4"], "made with steps 3, not 4"),
                        (["--pair_steps", "3", "--pairs", tmp_path / "p2"], "made by another teacher")]:
        capsys.readouterr()
        code = run("rectified_flow", *rf, "--stage", "all", "--out", tmp_path / "r", *argv)
        refusal(code, capsys.readouterr(), words)
        assert not os.path.exists(tmp_path / "r" / "2rf")
    assert run("rectified_flow", *rf, "--stage", "all", "--out", tmp_path / "r", "--pair_steps", "3") == 0
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["step"] == 2


def test_stage_all_refuses_a_conditional_teacher_before_its_1rf(tmp_path, capsys, monkeypatch):
    """rectified_flow --stage all --cond true on labelled data trained the whole 1-RF, printed it, and only then
    refused at the pairs stage (reflow from a class-conditional teacher is not supported). Now it is refused before
    any stage, nothing printed and no checkpoint written; so is a restart without --cond over a conditional 1-RF.
    Control: --stage 1rf --cond true trains the conditional teacher alone."""
    x = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (32, 16, 16, 3), dtype=np.uint8))
    monkeypatch.setattr(C, "_image_dataset", lambda name, root, env: (x, torch.arange(32) % 10, 10))  # a labelled set
    argv = ["--preset", "tiny", "--data", "mnist", "--root", tmp_path, "--out", tmp_path / "r"]
    for extra in (["--cond", "true"], ["--stage", "1rf", "--cond", "true"], []):
        capsys.readouterr()
        code = run("rectified_flow", *argv, *extra)
        out, err = capsys.readouterr()
        if "1rf" in extra:  # the control
            assert code == 0 and torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["net"]["label_dim"] == 10
            before = os.path.getmtime(tmp_path / "r" / "ckpt.pt")
            continue
        refusal(code, err, "class-conditional", "--cond")
        assert out == "" and not os.path.exists(tmp_path / "r" / "pairs")
        assert not os.path.exists(tmp_path / "r" / "ckpt.pt") if extra else \
            os.path.getmtime(tmp_path / "r" / "ckpt.pt") == before
    from PIL import Image  # a folder labelled by its dataset.json (EDM's layout) likewise
    (tmp_path / "imgs").mkdir()
    for i in range(8):
        Image.fromarray(x[i].numpy()).save(tmp_path / "imgs" / f"{i}.png")
    (tmp_path / "imgs" / "dataset.json").write_text(json.dumps({"labels": [[f"{i}.png", i % 3] for i in range(8)]}))
    capsys.readouterr()
    code = run("rectified_flow", *argv[:2], "--data", tmp_path / "imgs", "--out", tmp_path / "f", "--cond", "true")
    refusal(code, capsys.readouterr(), "class-conditional", "--cond")
    assert not os.path.exists(tmp_path / "f")


def test_stage_all_checks_a_pairs_folder_before_its_1rf_trains(files, tmp_path, capsys):
    """rectified_flow --stage all --pairs X checked X up front only over a finished 1-RF: with pairs of other options
    in X (another --pair_seed), or pairs of a teacher at another step, or files that are no pairs at all, it trained
    the 1-RF, printed it, and refused at the pairs stage (or kept the unrelated blocks). Now what can be known before
    the 1-RF exists is refused before any stage (its weights cannot be: pairs_plan compares them after it), and a
    --pairs folder made by this run's unfinished 1-RF counts as its own pairs (check_not_beneath). Control: the pairs
    of the same options from the same 1-RF (same seed, bitwise) are taken."""
    import shutil
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    rf = [a for a in BASE["rectified_flow"] if a not in ("--stage", "1rf")] + ["--iters", "2", *P]
    teacher = files / "rectified_flow" / "ckpt.pt"
    assert run("rectified_flow", "--stage", "pairs", *P, "--pair_seed", "5", "--teacher", teacher, "--pairs",
               tmp_path / "p", "--out", tmp_path / "x") == 0
    os.makedirs(tmp_path / "junk")
    (tmp_path / "junk" / "x_00000.npy").write_text("not pairs")
    shutil.copytree(files / "rectified_flow", tmp_path / "q")  # a 1-RF at step 2 and pairs made from it elsewhere
    assert run("rectified_flow", "--stage", "pairs", *P, "--out", tmp_path / "q", "--pairs", tmp_path / "p2") == 0
    for out_dir, argv, words in [("r", ["--pairs", tmp_path / "p"], ["pair_seed 5, not 1000000000"]),
                                 ("r", ["--pairs", tmp_path / "p", "--pair_seed", "5", "--pair_steps", "3"],
                                  ["steps 2, not 3"]),
                                 ("r", ["--pairs", tmp_path / "p", "--pair_seed", "5", "--iters", "3"],
                                  ["another teacher", "at step 2", "stops at step 3"]),
                                 ("r", ["--pairs", tmp_path / "junk"], ["junk' holds pair blocks", "meta.json"]),
                                 ("q", ["--pairs", tmp_path / "p2", "--iters", "3"],
                                  ["pairs (--pairs", "p2')", "at step 2", "to step 3 beneath them"])]:
        capsys.readouterr()
        code = run("rectified_flow", *rf, "--out", tmp_path / out_dir, *argv)
        refusal(code, capsys.readouterr(), *words)
        assert not os.path.exists(tmp_path / "r" / "ckpt.pt")
        assert torch.load(tmp_path / "q" / "ckpt.pt", weights_only=True)["step"] == 2
    assert (tmp_path / "junk" / "x_00000.npy").read_text() == "not pairs"
    assert run("rectified_flow", *rf, "--out", tmp_path / "r", "--pairs", tmp_path / "p", "--pair_seed", "5") == 0
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["step"] == 2
    # the run's own folder as --pairs, or the folder above it: its run files are no pair blocks (a first version of
    # this check refused them after the 1-RF had trained); nor is an empty started.json a kill left in DIR/pairs
    for out_dir, pairs in (("s", "s"), ("u/run", "u")):
        assert run("rectified_flow", *rf, "--out", tmp_path / out_dir, "--pairs", tmp_path / pairs) == 0
        assert torch.load(tmp_path / out_dir / "2rf" / "ckpt.pt", weights_only=True)["step"] == 2
    shutil.copytree(files / "rectified_flow", tmp_path / "k")  # a finished 1-RF, killed as it began its pairs
    os.makedirs(tmp_path / "k" / "pairs")
    (tmp_path / "k" / "pairs" / "started.json").write_text("")
    assert run("rectified_flow", *rf, "--out", tmp_path / "k") == 0


def test_stage_all_resume_false_never_retrains_the_teacher_of_its_pairs(files, tmp_path, capsys):
    """rectified_flow --stage all --resume false over a folder holding a 1-RF and its pairs trained a new 1-RF over
    the old checkpoint (the pairs' and the 2-RF's teacher), printed it, and then its pairs stage refused the pairs as
    another teacher's. Now it is refused before any stage, nothing printed, the 1-RF kept. Control: without the
    pairs, --resume false starts the whole pipeline anew."""
    import shutil
    shutil.copytree(files / "rectified_flow", tmp_path / "r")
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    rf = [a for a in BASE["rectified_flow"] if a not in ("--stage", "1rf")] + ["--iters", "2", *P]
    assert run("rectified_flow", "--stage", "pairs", *P, "--out", tmp_path / "r") == 0
    before = (tmp_path / "r" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code = run("rectified_flow", *rf, "--out", tmp_path / "r", "--resume", "false", "--lr", "2e-3")
    refusal(code, capsys.readouterr(), "holds the pairs of the 1-RF", "--resume false would train anew")
    assert (tmp_path / "r" / "ckpt.pt").read_bytes() == before
    assert not os.path.exists(tmp_path / "r" / "2rf")
    shutil.rmtree(tmp_path / "r" / "pairs")
    assert run("rectified_flow", *rf, "--out", tmp_path / "r", "--resume", "false", "--lr", "2e-3") == 0
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["step"] == 2
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]["lr"] == 2e-3
    # a 2-RF alone beside the 1-RF: --resume false with more --iters was refused as training the 1-RF on beneath it
    shutil.rmtree(tmp_path / "r" / "pairs")
    assert run("rectified_flow", *rf, "--out", tmp_path / "r", "--resume", "false", "--iters", "3") == 0
    assert [torch.load(tmp_path / "r" / f / "ckpt.pt", weights_only=True)["step"] for f in ("", "2rf")] == [3, 3]


def test_stage_all_checks_its_resumed_2rf_before_the_stages_before_it(files, tmp_path, capsys):
    """rectified_flow --stage all restarted over a 2-RF that cannot resume (its pairs regenerated since, so pairs_id
    differs; or the 2-RF continued alone past --iters) ran the finished 1-RF and the pairs stage, printed their lines,
    and refused at the 2-RF. Now both are refused before any stage, nothing printed. Control: the same restart with
    the 2-RF's own pairs goes on."""
    import shutil
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    base = [a for a in BASE["rectified_flow"] if a not in ("--stage", "1rf")] + ["--out", tmp_path / "r"]
    rf, two = [*base, *P], [*base, "--stage", "2rf"]
    assert run("rectified_flow", *rf, "--iters", "2") == 0
    assert run("rectified_flow", *two, "--iters", "3") == 0  # the 2-RF continued alone
    for argv, words in [(["--iters", "2"], ["2rf/ckpt.pt' is at step 3", "--iters 2"]),
                        (["--pair_seed", "5"], ["are not those", "2rf/ckpt.pt' started from"])]:
        if "--pair_seed" in argv:  # the pairs regenerated with another seed since the 2-RF started
            shutil.move(tmp_path / "r" / "pairs", tmp_path / "kept")
            assert run("rectified_flow", "--stage", "pairs", *P, "--pair_seed", "5", "--out", tmp_path / "r") == 0
        capsys.readouterr()
        code = run("rectified_flow", *rf, *argv)
        refusal(code, capsys.readouterr(), *words)
    shutil.rmtree(tmp_path / "r" / "pairs")
    shutil.move(tmp_path / "kept", tmp_path / "r" / "pairs")
    capsys.readouterr()
    assert run("rectified_flow", *rf) == 0 and "eval:" in capsys.readouterr().out


def test_a_2rf_checks_its_evaluation_data_before_any_output(files, tmp_path, capsys):
    """rectified_flow --stage 2rf loaded its evaluation data after the run's first line and config.json: a bad
    --data printed that line before its error, and image --data beside a 2-D teacher's pairs trained and then ended
    in a traceback (a shape mismatch in the evaluation). Both are one sentence before any output now. Control: the
    teacher's own data trains."""
    import shutil
    shutil.copytree(files / "rectified_flow", tmp_path / "r")
    assert run("rectified_flow", "--stage", "pairs", "--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16",
               "--pair_steps", "2", "--out", tmp_path / "r") == 0
    np.save(tmp_path / "img.npy", np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    two = ["--stage", "2rf", "--batch", "16", "--straight_k", "2", *EVAL, "--iters", "2", "--out", tmp_path / "r"]
    for data, words in [(tmp_path / "img.npy", ["images of shape (3, 16, 16)", "shape (2,)"]),
                        (tmp_path / "missing.npy", ["missing.npy", "neither"])]:
        capsys.readouterr()
        code = run("rectified_flow", *two, "--data", data)
        refusal(code, capsys.readouterr(), *words)
        assert not os.path.exists(tmp_path / "r" / "2rf")
    assert run("rectified_flow", *two) == 0
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["step"] == 2


def test_a_picture_name_that_is_not_utf8_is_written(files, tmp_path):
    """`sample --out` named with bytes that are not UTF-8 (Python holds them as surrogates) ended in matplotlib's
    traceback: the picture's title is the file name, and its fonts refuse surrogates. The file is written now."""
    out = os.path.join(str(tmp_path), os.fsdecode(b"s\xff.png"))
    assert run("imm", "sample", "--ckpt", files / "imm" / "ckpt.pt", "--steps", "1", "--out", out) == 0
    assert os.listdir(tmp_path) == [os.fsdecode(b"s\xff.png")] and os.path.getsize(out) > 1000
    out = os.path.join(str(tmp_path), "a$^$b.png")  # matplotlib read '$^$' as mathtext: a traceback
    assert run("imm", "sample", "--ckpt", files / "imm" / "ckpt.pt", "--steps", "1", "--out", out) == 0
    assert os.path.getsize(out) > 1000


def test_a_picture_name_its_font_lacks_writes_no_warning(files, tmp_path, capsys):
    """A CJK --out name (the picture's title) printed matplotlib's "UserWarning: Glyph ... missing from font(s)" and
    its source line on stderr of a run that succeeded."""
    out = str(tmp_path / "名.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a warning already shown once in this process is shown again)
        assert run("imm", "sample", "--ckpt", files / "imm" / "ckpt.pt", "--steps", "1", "--out", out) == 0
    assert capsys.readouterr().err == "" and os.path.getsize(out) > 1000


@pytest.mark.parametrize("name, argv, folders, files, words", [
    ("rectified_flow", ["--stage", "all"], [], ["2rf"], "keeps its 2rf folder"),
    ("rectified_flow", ["--stage", "all"], [], ["pairs"], "keeps its pairs folder"),
    ("rectified_flow", ["--stage", "pairs"], ["pairs/x_00000.npy"], [], "writes its x_00000.npy"),
    ("rectified_flow", ["--stage", "all"], ["pairs/meta.json"], [], "writes its meta.json"),
    ("rectified_flow", ["--stage", "2rf"], ["2rf/log.jsonl"], [], "writes its log.jsonl"),
    ("rectified_flow", ["--stage", "ft"], ["ft/pairs/z_00000.npy"], [], "writes its z_00000.npy"),
    ("scm", ["--mode", "all"], [], ["sct"], "keeps its sct folder"),
    ("scm", ["--mode", "all"], ["diffusion/ckpt.pt.tmp"], [], "writes its ckpt.pt.tmp"),
    ("distributional", [], ["samples_step0.png"], [], "writes its samples_step0.png"),
    ("distributional", [], ["teacher.pt"], [], "writes its teacher.pt")])
def test_a_run_folder_of_the_wrong_kind_is_refused_before_any_work(name, argv, folders, files, words, tmp_path,
                                                                     capsys, monkeypatch):
    """A name a pipeline uses that is the wrong kind of thing (DIR/2rf, DIR/pairs or DIR/sct a file; a pairs block,
    a sub-run's file or GDD's step-0 picture a folder) ended in a traceback after a stage had trained and printed.
    Now it is one sentence before any output. Control: the same folder with the names as they should be starts."""
    for f in folders:
        os.makedirs(tmp_path / "r" / f)
    for f in files:
        os.makedirs(tmp_path / "r", exist_ok=True)
        open(tmp_path / "r" / f, "w").close()
    capsys.readouterr()
    code = run(name, *BASE[name], *argv, "--out", tmp_path / "r", "--iters", "1")
    refusal(code, capsys.readouterr(), words)
    import shutil
    shutil.rmtree(tmp_path / "r")
    for f in folders + files:  # the control: the same folders, each name of the kind the run writes there
        os.makedirs(tmp_path / "r" / (os.path.dirname(f) if f in folders else f), exist_ok=True)
    started = []
    monkeypatch.setattr(MODS[name], "train" if name == "distributional" else "run", lambda *a: started.append(1))
    assert run(name, *BASE[name], *argv, "--out", tmp_path / "r", "--iters", "1") == 0 and started


def test_the_logs_hold_this_runs_history_only(files, tmp_path):
    """A resumed run appended to log.jsonl after the lines a killed run had written past its checkpoint, and a fresh
    run in a folder without a checkpoint appended to the old run's log: now the logs keep the steps up to the
    checkpoint's (a fresh run: none), so each step appears once; a finished run started again evaluates its last
    step again and replaces that row. A line that is not UTF-8 is dropped like any other line that is not JSON."""
    import shutil
    shutil.copytree(files / "imm", tmp_path / "r")
    steps = lambda f: [json.loads(r)["step"] for r in open(tmp_path / "r" / f)]
    assert steps("log.jsonl") == [1, 2]
    with open(tmp_path / "r" / "log.jsonl", "a") as f:  # a killed run's lines past its step-2 checkpoint
        f.write(json.dumps(dict(step=3, loss=1.0)) + "\n" + json.dumps(dict(step=4, loss=1.0)) + "\n")
    with open(tmp_path / "r" / "metrics.jsonl", "ab") as f:  # a torn write: invalid UTF-8 (was a traceback)
        f.write(b'{"step": 1, "swd_1": "\xff\xfe"}\n')
    assert run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "3", "--log_every", "1") == 0
    assert steps("log.jsonl") == [1, 2, 3] and steps("metrics.jsonl")[-1] == 3
    # the finished run started again evaluates its last step again: that row replaces the first (it was appended)
    assert run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "3", "--log_every", "1") == 0
    assert steps("log.jsonl") == [1, 2, 3] and steps("metrics.jsonl").count(3) == 1
    os.remove(tmp_path / "r" / "ckpt.pt")  # a fresh run in the same folder
    assert run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "1", "--log_every", "1") == 0
    assert steps("log.jsonl") == [1] and steps("metrics.jsonl") == [1]


def test_a_teacher_is_never_swapped_or_ignored_without_a_word(files, tmp_path, capsys):
    """A teacher option a stage never reads was ignored (rectified_flow --stage 1rf/all --teacher, ft --pairs; GDD's
    --teacher_* beside --teacher); a changed teacher on resume was recorded but not used (the 2-RF's) or used from
    then on (flow_map lmd); a fresh GDD run reused an in-file teacher.pt trained with other settings. All refused; the
    same weights under another path are the same teacher."""
    import shutil
    rf, P = files / "rectified_flow" / "ckpt.pt", ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16",
                                                   "--pair_steps", "2"]
    shutil.copy(rf, tmp_path / "moved.pt")
    other = torch.load(rf, weights_only=True)
    other["ema"] = {k: v * 1.01 for k, v in other["ema"].items()}
    torch.save(other, tmp_path / "other.pt")
    shutil.copytree(files / "distributional", tmp_path / "g")
    os.remove(tmp_path / "g" / "ckpt.pt")
    run("rectified_flow", "--stage", "pairs", *P, "--teacher", rf, "--out", tmp_path / "r")
    for name, argv in (("rectified_flow", ["--stage", "2rf", "--teacher", rf, "--iters", "1"]),
                       ("flow_map", ["--mode", "lmd", "--data", "8gaussians", "--teacher", rf, "--iters", "1"])):
        assert run(name, *BASE[name], *argv, "--out", tmp_path / "r") == 0
    cases = [
        ("rectified_flow", ["--stage", "1rf", "--teacher", rf, "--out", tmp_path / "n"], "1rf does not read --teacher"),
        ("rectified_flow", ["--stage", "all", "--teacher", rf, "--out", tmp_path / "n"], "all does not read --teacher"),
        ("rectified_flow", ["--stage", "ft", "--pairs", tmp_path, "--out", tmp_path / "n"], "ft does not read --pairs"),
        ("distributional", ["--teacher", rf, "--out", tmp_path / "n"], "--teacher_iters shapes the in-file teacher"),
        ("rectified_flow", ["--stage", "2rf", "--teacher", tmp_path / "moved.pt", "--iters", "2", "--out",
                            tmp_path / "r"], "does not read --teacher"),
        ("rectified_flow", ["--stage", "2rf", "--pairs", tmp_path, "--iters", "2", "--out", tmp_path / "r"],
         "no pairs in"),  # (a folder of other pairs: tests/test_rf_pipeline.py)
        ("rectified_flow", ["--stage", "2rf", "--pair_seed", "7", "--iters", "2", "--out", tmp_path / "r"],
         "2rf does not read --pair_seed"),  # (it trained on the stored pairs and recorded seed 7)
        ("flow_map", ["--mode", "lmd", "--teacher", tmp_path / "other.pt", "--iters", "2", "--out", tmp_path / "r"],
         "holds other weights"),
        ("rectified_flow", ["--stage", "2rf", "--teacher", tmp_path / "other.pt", "--pairs", tmp_path / "r" / "pairs",
                            "--out", tmp_path / "n"], "made by another teacher"),  # (it started from other weights)
        ("distributional", ["--teacher_iters", "3", "--iters", "1", "--out", tmp_path / "g"], "with iters 2, not 3"),
    ]
    for name, argv, words in cases:
        capsys.readouterr()
        code = run(name, *BASE[name], *argv)
        out, err = capsys.readouterr()
        refusal(code, err, words)
        assert out == "", (argv, out)
    assert not os.path.exists(tmp_path / "n")
    assert torch.load(tmp_path / "r" / "2rf" / "ckpt.pt", weights_only=True)["step"] == 1
    # controls: the same teacher resumes (flow_map's by another path to its weights); the in-file teacher asked for is
    # reused
    assert run("rectified_flow", *BASE["rectified_flow"], "--stage", "2rf", "--teacher", rf, "--iters", "2",
               "--out", tmp_path / "r") == 0
    assert run("flow_map", *BASE["flow_map"], "--mode", "lmd", "--teacher", tmp_path / "moved.pt", "--iters", "2",
               "--out", tmp_path / "r") == 0
    assert run("distributional", *BASE["distributional"], "--iters", "1", "--out", tmp_path / "g") == 0


def test_a_distilled_teacher_of_other_named_data_is_refused(files, tmp_path, capsys):
    """flow_map lmd/emd, sCD and reflow (pairs, 2rf) learn their teacher's distribution: a teacher trained on one named
    data set (its checkpoint's --data) and a run on another (flow_map's toy default is the checkerboard, the 1-RF's 8
    Gaussians) is refused before any training; a teacher that only initialises (sCT) and data given as a file are not
    compared."""
    rf, sd = files / "rectified_flow" / "ckpt.pt", files / "scm" / "ckpt.pt"
    scm = ["--batch", "16", *EVAL]
    for name, argv in (("flow_map", [*BASE["flow_map"], "--mode", "lmd", "--teacher", rf]),
                       ("rectified_flow", [*BASE["rectified_flow"], "--stage", "2rf", "--teacher", rf, "--data",
                                           "checkerboard"]),
                       ("scm", [*scm, "--mode", "scd", "--teacher", sd, "--data", "checkerboard"]),
                       ("rectified_flow", ["--stage", "pairs", "--teacher", rf, "--data", "checkerboard"])):
        capsys.readouterr()
        code = run(name, *argv, "--out", tmp_path / "n")
        refusal(code, capsys.readouterr(), "trained on 8gaussians", "checkerboard", "--data 8gaussians")
    assert not os.path.exists(tmp_path / "n")
    np.save(tmp_path / "pts.npy", C.toy_sample("checkerboard", 64).numpy())
    for name, argv in (("flow_map", [*BASE["flow_map"], "--mode", "lmd", "--teacher", rf, "--data",
                                     tmp_path / "pts.npy"]),
                       ("scm", [*scm, "--mode", "sct", "--teacher", sd, "--data", "checkerboard"])):
        assert run(name, *argv, "--iters", "1", "--out", tmp_path / name) == 0


def test_a_restarted_pipeline_keeps_its_data(tmp_path, capsys):
    """A pipeline restarted without --data (--seed) over its first stage (scm --mode all over DIR/diffusion,
    rectified_flow --stage all over the 1-RF) trains every stage on that stage's data (seed): the stages not begun took
    the preset's data (sCT trained on the 8 Gaussians from a moons teacher, then sCD was refused) and seed 0. Another
    named data set given on the restart is refused before any stage runs; a fresh start (--resume false) is not."""
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    first = dict(scm=(["--out", tmp_path / "s" / "diffusion"], ["--mode", "all", "--out", tmp_path / "s"], "sct",
                      "scd"),
                 rectified_flow=(["--out", tmp_path / "r"], ["--stage", "all", *P, "--out", tmp_path / "r"], "2rf"))
    for name, (one, pipe, *later) in first.items():
        assert run(name, *BASE[name], "--data", "moons", "--seed", "5", "--iters", "1", *one) == 0
        capsys.readouterr()
        code = run(name, *BASE[name], "--iters", "1", *pipe, "--data", "checkerboard")
        refusal(code, capsys.readouterr(), "trained on moons", "--data moons")
        assert not any(os.path.exists(pipe[-1] / d) for d in (*later, "pairs"))
        assert run(name, *BASE[name], "--iters", "1", *pipe) == 0
        assert "config: --data moons --seed 5 (from " in capsys.readouterr().out
        for d in later:  # (the seed, and the preset: test_rf_pipeline)
            c = torch.load(pipe[-1] / d / "ckpt.pt", weights_only=True)["config"]
            assert (c["data"], c["seed"]) == ("moons", 5), (name, d)
    # control: a fresh start over the folder (--resume false) trains on the data it is given
    assert run("scm", *BASE["scm"], "--iters", "1", *first["scm"][1], "--resume", "false",
               "--data", "checkerboard") == 0
    assert torch.load(tmp_path / "s" / "scd" / "ckpt.pt", weights_only=True)["config"]["data"] == "checkerboard"


def test_a_restarted_scm_pipeline_of_a_preset_without_data_takes_its_teachers(tmp_path, capsys):
    """scm --mode all restarted over DIR/diffusion without --data, under a preset with no data (tiny), was refused
    at parse time ('this preset needs --data'): parse_cli looked for DIR/ckpt.pt, which --mode all never writes, so
    pipeline_data never filled the data in. parse_cli now asks scm for DIR/diffusion/ckpt.pt, and the pipeline's
    rules are checked once the data are in, before any mode trains: --sigma_max 0.1 (t_mid beyond t_max) is refused
    with the teacher's checkpoint untouched. Control: a fresh --mode all of that preset without --data is refused."""
    np.save(tmp_path / "imgs.npy", np.random.RandomState(0).randint(0, 256, (32, 16, 16, 3)).astype(np.uint8))
    S = tmp_path / "S"
    assert run("scm", "--preset", "tiny", "--data", tmp_path / "imgs.npy", "--mode", "diffusion", "--iters", "1",
               "--out", S / "diffusion") == 0
    before = (S / "diffusion" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    for data in ([], ["--data", tmp_path / "imgs.npy", "--seed", "0"]):  # (the data from the teacher, or given again)
        refusal(run("scm", "--preset", "tiny", "--mode", "all", "--iters", "2", "--sigma_max", "0.1", *data,
                     "--out", S), capsys.readouterr(), "--t_mid must lie in (0, t_max)")
        assert (S / "diffusion" / "ckpt.pt").read_bytes() == before and sorted(os.listdir(S)) == ["diffusion"]
    assert run("scm", "--preset", "tiny", "--mode", "all", "--iters", "1", "--out", S) == 0
    assert "config: --data " in capsys.readouterr().out
    assert torch.load(S / "scd" / "ckpt.pt", weights_only=True)["config"]["data"] == str(tmp_path / "imgs.npy")
    refusal(run("scm", "--preset", "tiny", "--mode", "all", "--iters", "1", "--out", tmp_path / "fresh"),
             capsys.readouterr(), "this preset needs --data")


def test_a_resumed_run_keeps_its_data(tmp_path, capsys, monkeypatch):
    """A resumed run with another named data set was taken with a "config: data" note; the 2-RF, which trains on its
    stored pairs, then scored itself against the other set and recorded it as its data. Now refused (resume_cases);
    here the controls: the same file by another path resumes, another file resumes and is noted (it may be the same
    data moved), and a resumed 2-RF given its own data set trains on."""
    np.save(tmp_path / "a.npy", C.toy_sample("moons", 64).numpy())
    np.save(tmp_path / "b.npy", C.toy_sample("moons", 64).numpy())
    monkeypatch.chdir(tmp_path)
    assert run("imm", *BASE["imm"], "--data", "a.npy", "--iters", "1", "--out", "i") == 0
    capsys.readouterr()
    assert run("imm", *BASE["imm"], "--data", tmp_path / "a.npy", "--iters", "2", "--out", "i") == 0
    capsys.readouterr()
    assert run("imm", *BASE["imm"], "--data", "b.npy", "--iters", "3", "--out", "i") == 0
    assert f"config: data = '{tmp_path / 'b.npy'}' (checkpoint had " in capsys.readouterr().out  # (recorded absolute)
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    rf = [*BASE["rectified_flow"][2:], "--out", "r"]
    assert run("rectified_flow", "--stage", "all", "--iters", "1", *P, *rf, "--data", "moons") == 0
    capsys.readouterr()
    code = run("rectified_flow", "--stage", "2rf", "--iters", "2", *rf, "--data", "8gaussians")
    refusal(code, capsys.readouterr(), "r/2rf/ckpt.pt", "trained on --data moons", "--data 8gaussians")
    assert torch.load("r/2rf/ckpt.pt", weights_only=True)["step"] == 1
    assert run("rectified_flow", "--stage", "2rf", "--iters", "2", *rf, "--data", "moons") == 0
    ck = torch.load("r/2rf/ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["config"]["data"] == "moons"


def test_a_run_on_a_file_resumed_with_a_named_data_set_is_refused(tmp_path, capsys, monkeypatch):
    """The other way round from resume_cases' file for a named set: a run trained on a points file, resumed with
    --data moons, is refused (another data set), its checkpoint untouched."""
    np.save(tmp_path / "a.npy", C.toy_sample("moons", 64).numpy())
    monkeypatch.chdir(tmp_path)
    assert run("imm", *BASE["imm"], "--data", "a.npy", "--iters", "1", "--out", "i") == 0
    capsys.readouterr()
    code = run("imm", *BASE["imm"], "--data", "moons", "--iters", "2", "--out", "i")
    refusal(code, capsys.readouterr(), f"trained on --data {tmp_path / 'a.npy'}", "keeps its data",
             "--data moons")
    assert torch.load("i/ckpt.pt", weights_only=True)["step"] == 1


def test_a_resumed_run_may_change_its_dropout(tmp_path, capsys):
    """check_resume_net compares the network a resumed run builds with its checkpoint's, dropout aside: a changed
    --dropout (not a weight) resumes, noted, and the checkpoint records it; another --width is refused
    (resume_cases)."""
    assert run("imm", *BASE["imm"], "--iters", "1", "--out", tmp_path / "r") == 0
    capsys.readouterr()
    assert run("imm", *BASE["imm"], "--iters", "2", "--dropout", "0.1", "--out", tmp_path / "r") == 0
    assert "config: dropout = 0.1 (checkpoint had 0.0)" in capsys.readouterr().out
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["net"]["dropout"] == ck["config"]["dropout"] == 0.1


def test_a_1rf_continued_by_stage_all_stays_a_1rf(tmp_path, capsys):
    """--stage is a selector, not a config change (resume_config's `drop`): a 1-RF trained alone and continued by
    --stage all keeps stage 1rf in its checkpoint, with no note of it (recorded as 'all', the next restart refused it
    as not a 1rf checkpoint), and the finished pipeline started again notes no stage 'not applied'."""
    P = ["--n_pairs", "16", "--pair_block", "16", "--pair_batch", "16", "--pair_steps", "2"]
    rf = [*BASE["rectified_flow"][2:], "--out", tmp_path / "r"]
    assert run("rectified_flow", "--stage", "1rf", "--iters", "1", *rf) == 0
    capsys.readouterr()
    assert run("rectified_flow", "--stage", "all", "--iters", "2", *P, *rf) == 0
    assert "config: stage" not in capsys.readouterr().out
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]["stage"] == "1rf"
    assert run("rectified_flow", "--stage", "all", "--iters", "2", *P, *rf) == 0
    assert "not applied" not in capsys.readouterr().out


def test_gdd_checks_its_batches_against_the_world_size_before_its_teacher_trains(tmp_path, capsys, monkeypatch):
    """GDD refused a --batch that the ranks do not divide only after its in-file teacher had trained and written its
    files, and never checked --teacher_batch (512 over 3 ranks trained the teacher on 510 a step). Two ranks faked
    (setup's world; nothing reaches a collective): each refused first."""
    import dataclasses
    setup = C.setup
    monkeypatch.setattr(C, "setup", lambda *a, **k: dataclasses.replace(setup(*a, **k), world=2))
    base = ["--teacher_iters", "2", "--iters", "1", "--out", tmp_path / "g"]
    for argv, words in ((["--batch", "15", "--teacher_batch", "16"], "--batch 15"),
                        (["--batch", "16", "--teacher_batch", "15"], "--teacher_batch 15")):
        code = run("distributional", *argv, *base)
        refusal(code, capsys.readouterr(), words, "world size 2")
        assert not os.path.exists(tmp_path / "g")
    rf = tmp_path / "rf"
    monkeypatch.setattr(C, "setup", setup)
    assert run("rectified_flow", *BASE["rectified_flow"], "--iters", "1", "--out", rf) == 0
    monkeypatch.setattr(C, "setup", lambda *a, **k: dataclasses.replace(setup(*a, **k), world=2))
    capsys.readouterr()  # (the teacher's run)
    code = run("distributional", "--batch", "15", "--teacher", rf / "ckpt.pt", *base[2:])
    refusal(code, capsys.readouterr(), "--batch 15")  # (the same check with a teacher file)
    monkeypatch.setattr(C, "setup", setup)  # control: one rank divides any batch
    assert run("distributional", "--batch", "15", "--teacher_batch", "15", "--eval_teacher_steps", "0", *EVAL,
               *base) == 0

def test_a_teacher_retrained_in_place_is_refused_on_resume(files, tmp_path, capsys):
    """flow_map lmd reads its teacher at every step, GDD its t_g and step-0 panel: a resume whose teacher file holds
    other weights than when the run started (retrained or replaced under the same path) is refused; the restored file
    resumes, and so does a moved one named by --teacher (GDD's in-file teacher moves with its folder)."""
    import shutil
    rf, t = files / "rectified_flow" / "ckpt.pt", tmp_path / "t.pt"
    shutil.copy(rf, t)
    argv = dict(flow_map=[*BASE["flow_map"], "--mode", "lmd", "--data", "8gaussians", "--teacher", t, "--out",
                          tmp_path / "f"],
                distributional=["--batch", "16", "--eval_teacher_steps", "0", *EVAL, "--teacher", t, "--out",
                                tmp_path / "d"])
    for name in argv:
        assert run(name, *argv[name], "--iters", "1") == 0
    ck = torch.load(t, weights_only=True)
    ck["ema"] = {k: v * 1.01 for k, v in ck["ema"].items()}
    torch.save(ck, t)
    capsys.readouterr()
    for name, d in (("flow_map", "f"), ("distributional", "d")):
        code = run(name, *argv[name], "--iters", "2")
        refusal(code, capsys.readouterr(), "t.pt", "holds other weights")
        assert torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["step"] == 1
    shutil.copy(rf, t)  # control: restored
    for name in argv:
        assert run(name, *argv[name], "--iters", "2") == 0
    capsys.readouterr()  # GDD's teacher named "none" (its in-file one) is not another path to it
    code = run("distributional", *argv["distributional"][:-4], "--teacher", "none", "--out", tmp_path / "d")
    refusal(code, capsys.readouterr(), "was started from the teacher")
    ck = torch.load(tmp_path / "d" / "ckpt.pt", weights_only=True)
    torch.save({**ck, "teacher_id": None}, tmp_path / "d" / "nid.pt")  # an id edited to None: paths compared
    os.makedirs(tmp_path / "nid")
    os.rename(tmp_path / "d" / "nid.pt", tmp_path / "nid" / "ckpt.pt")
    code = run("distributional", *argv["distributional"][:-4], "--teacher", rf, "--out", tmp_path / "nid")
    refusal(code, capsys.readouterr(), "was started from the teacher")
    os.makedirs(tmp_path / "moved")  # control: moved, and named anew (a file of other weights is refused above)
    os.rename(t, tmp_path / "moved" / "t.pt")
    for name, d in (("flow_map", "f"), ("distributional", "d")):
        assert run(name, *argv[name][:-4], "--teacher", tmp_path / "moved" / "t.pt", "--out", tmp_path / d,
                   "--iters", "3") == 0
        assert torch.load(tmp_path / d / "ckpt.pt", weights_only=True)["step"] == 3
    assert run("flow_map", *BASE["flow_map"], "--teacher", tmp_path / "moved" / "t.pt", "--out", tmp_path / "f",
               "--iters", "4") == 0  # without --mode: checked as the run's lmd, not the preset's lsd
    assert run("distributional", *BASE["distributional"], "--iters", "1", "--out", tmp_path / "g") == 0
    os.rename(tmp_path / "g", tmp_path / "g2")  # GDD's in-file teacher moves with its folder
    assert run("distributional", *BASE["distributional"], "--iters", "2", "--out", tmp_path / "g2") == 0
    ck = torch.load(tmp_path / "g2" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 2 and ck["teacher"]["path"] == str(tmp_path / "g2" / "teacher.pt")


@pytest.mark.parametrize("argv, words", [
    (["imm.py", "sample", "--ckpt", "plain.pt"], ["plain.pt"]),  # torch would note the pickle protocol
    (["scm.py", "--data", "text.npy", "--out", "x"], ["text.npy"]),
])
def test_subprocess_prints_only_the_sentence(files, argv, words):
    p = cli.run(argv[0], *argv[1:], cwd=files, timeout=120)
    refused(p, *words)
    assert p.stderr.count("\n") == 1  # not even a blank line or a warning before it


def test_help_shows_the_defaults_a_run_uses(capsys):
    """`M.py --help` shows the toy preset's values (what `python M.py` runs), per mode/stage where those differ;
    `--preset cifar10 --help` that preset's."""
    for M in MODS.values():
        for preset in ("toy", "cifar10"):
            with pytest.raises(SystemExit) as e:
                M.main(["--preset", preset, "--help"])
            assert e.value.code == 0
            text = " ".join(capsys.readouterr().out.split())
            p = M.PRESETS[preset]
            want = f"(default {p.get('iters', M.Config.iters)!r}" + "".join(
                f"{', ' if i else '; '}{v['iters']!r} ({k})"
                for i, (k, v) in enumerate((k, v) for k, v in p.items() if isinstance(v, dict) and "iters" in v))
            assert f"{want})" in text, (M.__name__, preset, want)
            assert "(default {'" not in text, (M.__name__, preset)  # a stage part shown as a field's value
    with pytest.raises(SystemExit):
        flow_map.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # a field comment continued on a "#   ..." line is shown whole
    assert "(Boffi); cosine: lr x (1 + cos(pi step / iters)) / 2 (toy preset) (default 'cosine')" in text
    for M, argv, out in [(scm, ["--mode", "sct"], "runs/scm-sct-toy"), (scm, [], "runs/scm-all-toy"),
                         (flow_map, ["--mode=meanflow", "--preset", "tiny"], "runs/flow_map-meanflow-tiny")]:
        with pytest.raises(SystemExit):  # the folder of the --mode given (was the default mode's)
            M.main([*argv, "--help"])
        assert f"run folder (default '{out}')" in " ".join(capsys.readouterr().out.split()), (argv, out)
    with pytest.raises(SystemExit):  # a line never breaks at a hyphen: a file name shown stays whole to copy
        rectified_flow.main(["--preset", "cifar10", "--help"])
    assert capsys.readouterr().out.count("'edm-cifar10-32x32-uncond-ve.pkl'") == 2


def test_help_into_a_closed_pipe_is_quiet():
    """`python M.py --help | head -1`: the pipe closes before the help is written; no traceback follows."""
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "imm.py"), "--help"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    p.stdout.close()  # long before the child has imported torch
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 1 and err == "", err


def test_every_preset_passes_validation():
    for M in MODS.values():
        for preset, p in M.PRESETS.items():
            sels = [k for k, v in p.items() if isinstance(v, dict)] or [None]
            key = "mode" if "mode" in M.Config.__dataclass_fields__ else "stage"
            for sel in sels:
                given = {**({} if p.get("data") else {"data": "8gaussians"}),
                         **({"teacher": "t.pt"} if sel in ("lmd", "emd") else {})}
                C.resolve_config(M.Config, M.PRESETS, preset, given, **({key: sel} if sel else {}))


# ============================================================================================ resume
@pytest.mark.parametrize("name", MODS)
def test_resume_applies_a_changed_learning_rate(name, files, tmp_path, capsys):
    """The optimiser state comes from the checkpoint, its learning rate from the command line (imm, scm and
    distributional used to restore the old one); the saved config says what ran."""
    import shutil
    shutil.copytree(files / name, tmp_path / "r")
    lr = LR.get(name, "--lr")
    assert run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "3", lr, "3e-4") == 0
    assert "(checkpoint had" in capsys.readouterr().out
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    assert ck["step"] == 3 and ck["config"][lr[2:]] == 3e-4
    opt = ck["opt"]["g"] if name == "distributional" else ck["opt"]
    assert [g["lr"] for g in opt["param_groups"]] == [3e-4]
    assert {float(s["step"]) for s in opt["state"].values()} == {3.0}  # the moments continued
    if name == "distributional":  # D's lr keeps the lazy-R1 factor of this run's r1_interval
        assert ck["opt"]["d"]["param_groups"][0]["lr"] == pytest.approx(1e-4 * 16 / 17, rel=1e-12)


# ================================================================================ non-finite gradients
class NaNGrad(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def inject(name, monkeypatch, when):
    """From the `when(call)`-th loss evaluation on: a NaN gradient (finite loss) or a NaN loss, per file."""
    calls = []

    def bad(x, loss_nan):
        calls.append(1)
        if not when(len(calls)):
            return x
        return x * float("nan") if loss_nan else NaNGrad.apply(x)

    def patch(mod, fn, wrap):
        orig = getattr(mod, fn)
        monkeypatch.setattr(mod, fn, lambda *a, **k: wrap(orig(*a, **k)))

    def go(loss_nan):
        if name == "imm":
            patch(imm, "imm_loss", lambda r: (bad(r[0], loss_nan), *r[1:]))
        elif name == "scm":
            patch(scm, "diffusion_loss", lambda r: bad(r, loss_nan))
        elif name == "flow_map":
            patch(flow_map, "per_sample_loss", lambda r: (bad(r[0], loss_nan), r[1]))
        elif name == "distributional":
            patch(distributional, "g_loss", lambda r: bad(r, loss_nan))
        else:  # rectified_flow 1rf: the loss is inline; the network's training output carries the NaN instead
            orig = C.build_net

            def build(d):
                net = orig(d)
                net.register_forward_hook(lambda m, i, o: bad(o, loss_nan) if m.training and torch.is_grad_enabled()
                                          else o)
                return net
            monkeypatch.setattr(C, "build_net", build)
    return go


@pytest.mark.parametrize("name", MODS)
def test_a_non_finite_gradient_skips_that_step(name, files, tmp_path, monkeypatch, capsys):
    """One step with NaN gradients (finite loss) in 4: skipped (the optimiser's step count says 3, all finite),
    logged, and the run ends normally with its checkpoint at step 4."""
    inject(name, monkeypatch, lambda k: k == 2)(loss_nan=False)
    assert run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "4", "--log_every", "1", "--ckpt_every", "2") \
        == 0
    ck = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)
    opt = ck["opt"]["g"] if name == "distributional" else ck["opt"]
    assert ck["step"] == 4 and {float(s["step"]) for s in opt["state"].values()} == {3.0}
    assert all(torch.isfinite(v).all() for v in [*ck["model"].values(), *ck["ema"].values()])
    assert all(torch.isfinite(t).all() for s in opt["state"].values() for t in s.values())
    logs = [json.loads(ln) for ln in open(tmp_path / "r" / "log.jsonl")]
    assert [r["skipped"] for r in logs] == [0, 1, 0, 0]
    assert "skipped 1" in capsys.readouterr().out


@pytest.mark.parametrize("name", MODS)
def test_nan_loss_every_step_stops_after_max_skips(name, files, tmp_path, monkeypatch, capsys):
    """From step 3 on the loss is NaN at every step: each step is skipped, the run stops after --max_skips 2 in a
    row with one sentence, and the checkpoint of step 2 is kept byte for byte."""
    import shutil
    shutil.copytree(files / name, tmp_path / "r")
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()
    inject(name, monkeypatch, lambda k: True)(loss_nan=True)
    capsys.readouterr()
    code = run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "9", "--log_every", "1", "--max_skips", "2")
    refusal(code, capsys.readouterr().err, "2 optimiser steps in a row", "step 4", "(step 2) is kept")
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before


# ================================================================================ divergence, full disk
@pytest.mark.parametrize("name", ["imm", "rectified_flow"])
def test_exploding_weights_never_overwrite_the_checkpoint(name, files, tmp_path, capsys):
    """--lr 1e30 at --ckpt_every 1: the first step leaves finite weights of ~1e30 (its loss, taken before the
    update, is finite); the next step's loss at those weights is not, so that checkpoint is withheld, every later
    step is skipped and the run stops after --max_skips 3, with the step-2 checkpoint intact."""
    import shutil
    shutil.copytree(files / name, tmp_path / "r")
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()
    capsys.readouterr()
    code = run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "12", "--lr", "1e30", "--ckpt_every", "1",
               "--log_every", "1", "--max_skips", "3")
    io = capsys.readouterr()
    refusal(code, io.err, "in a row", "(step 2) is kept")
    assert "checkpoint of step 3 withheld" in io.out
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before


@pytest.mark.parametrize("name", sorted(MODS))
def test_a_diverged_last_step_never_overwrites_the_checkpoint(name, files, tmp_path, capsys):
    """--lr 1e30 on the run's last step: its loss, taken before the update, is finite and no step follows to show
    the blown-up weights, so the final checkpoint was written (weights ~1e29, samples NaN). The final weights'
    samples (Guard's probe) now withhold it: one sentence, the step-2 checkpoint intact. Control: the same last
    step at the preset's lr writes step 3."""
    import shutil
    shutil.copytree(files / name, tmp_path / "r")
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()
    capsys.readouterr()
    code = run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "3", LR.get(name, "--lr"), "1e30")
    refusal(code, capsys.readouterr().err, "not writing the final checkpoint", "(step 2) is kept")
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before
    assert run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "3") == 0
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["step"] == 3


def test_the_probe_sees_through_the_samplers_clamp():
    """Image samplers clamp to [-1, 1], and clamp(inf) = 1: weights that overflow the output (finite, ~1e38) gave
    'finite' samples. The probe also returns the nets' own outputs (a forward hook); control: normal weights."""
    env = C.setup("cpu", 0, "fp32")
    nd = C.net_config("tiny", img_resolution=8, num_times=2)
    net = C.build_net(nd)
    probe = C.sample_probe(lambda n: imm.generator(n, imm.Config(), (3, 8, 8), 1, env), (net,), env,
                           C.Data("images", "x", x=torch.zeros(1, 3, 8, 8, dtype=torch.uint8)))
    with torch.no_grad():
        assert bool(probe())
        net.out_conv.weight.fill_(1e38)
        assert imm.generator(net, imm.Config(), (3, 8, 8), 1, env)(C.IndexRNG(range(2), 0, env.device), None
                                                                   ).abs().max() <= 1  # the clamp hides it
        assert not bool(probe())


def test_a_fresh_run_whose_weights_diverge_with_a_finite_loss_writes_no_checkpoint(tmp_path, capsys):
    """IMM's loss is a kernel MMD, bounded: at --lr 1e30 the weights reach ~1e31 while the loss and the gradients
    stay finite, so nothing was skipped or withheld, and a fresh run exited 0 with a checkpoint of diverged
    weights (evaluation NaN). The probe at each checkpoint now withholds them: the step-2 checkpoint is withheld,
    the final one refused in one sentence. Control: the same run at the preset's lr writes its checkpoint."""
    capsys.readouterr()
    code = run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "4", "--ckpt_every", "2", "--lr", "1e30")
    io = capsys.readouterr()
    refusal(code, io.err, "the weights diverged", "not writing the final checkpoint", "none was written")
    assert "checkpoint of step 2 withheld: the weights diverged" in io.out
    assert not (tmp_path / "r" / "ckpt.pt").exists()
    assert run("imm", *BASE["imm"], "--out", tmp_path / "c", "--iters", "4", "--ckpt_every", "2") == 0
    assert torch.load(tmp_path / "c" / "ckpt.pt", weights_only=True)["step"] == 4


def test_a_really_full_disk_is_one_sentence(files, tmp_path, capsys):
    """torch.save onto a full disk raises torch's RuntimeError (its zip writer), not OSError: it ended in a
    traceback. Here the .tmp file is Linux's /dev/full, which accepts no byte."""
    import shutil
    shutil.copytree(files / "imm", tmp_path / "r")
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()
    os.symlink("/dev/full", tmp_path / "r" / "ckpt.pt.tmp")
    capsys.readouterr()
    code = run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "3")
    refusal(code, capsys.readouterr().err, "could not write", "previous checkpoint is kept")
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before
    assert not os.path.lexists(tmp_path / "r" / "ckpt.pt.tmp")


@pytest.mark.parametrize("env, words", [
    (dict(WORLD_SIZE="2"), ["RANK, MASTER_ADDR, MASTER_PORT unset", "torchrun"]),
    (dict(WORLD_SIZE="abc", RANK="0", MASTER_ADDR="x", MASTER_PORT="1"), ["WORLD_SIZE='abc'"]),
    (dict(WORLD_SIZE="2", RANK="3", MASTER_ADDR="x", MASTER_PORT="1"), ["RANK='3', WORLD_SIZE='2'"]),  # rank 3 speaks
    (dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="x", MASTER_PORT="1", LOCAL_WORLD_SIZE="0"), ["LOCAL_WORLD_SIZE='0'"]),
    (dict(WORLD_SIZE="1", RANK="0", MASTER_ADDR="x", MASTER_PORT="notaport"), ["MASTER_PORT='notaport'"]),
    (dict(WORLD_SIZE="1", RANK="0", MASTER_ADDR="no.such.host.invalid", MASTER_PORT="29500"),  # (RFC 2606: never
     ["MASTER_ADDR='no.such.host.invalid'", "does not resolve"]),  # resolves; the rendezvous retried for minutes)
])
def test_a_malformed_launch_is_one_sentence(env, words, tmp_path, monkeypatch, capsys):
    """torchrun's variables without torchrun (or malformed) ended in tracebacks from int() or init_process_group, and
    a RANK other than 0 silenced the error line; outside torchrun (no WORLD_SIZE) stray RANK/LOCAL_WORLD_SIZE values
    are ignored (the control)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    capsys.readouterr()
    code = run("imm", *BASE["imm"], "--iters", "1", "--out", tmp_path / "never")
    refusal(code, capsys.readouterr(), *words)
    assert not os.path.exists(tmp_path / "never")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.setenv("RANK", "abc")
    assert run("imm", *BASE["imm"], "--iters", "1", "--out", tmp_path / "ok") == 0


def test_full_disk_keeps_the_previous_checkpoint(files, tmp_path, monkeypatch, capsys):
    import shutil
    shutil.copytree(files / "imm", tmp_path / "r")
    before = open(tmp_path / "r" / "ckpt.pt", "rb").read()
    orig = torch.save

    def full(obj, path, *a, **k):  # half a file, then the disk is full
        with open(path, "wb") as f:
            f.write(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    monkeypatch.setattr(torch, "save", full)
    capsys.readouterr()
    code = run("imm", *BASE["imm"], "--out", tmp_path / "r", "--iters", "3")
    refusal(code, capsys.readouterr().err, "No space left on device", "previous checkpoint is kept")
    monkeypatch.setattr(torch, "save", orig)
    assert open(tmp_path / "r" / "ckpt.pt", "rb").read() == before
    assert not os.path.exists(tmp_path / "r" / "ckpt.pt.tmp")


@pytest.mark.parametrize("name", sorted(MODS))
def test_every_file_probes_the_weights_it_saves(name, tmp_path, capsys, monkeypatch):
    """Each file's Guard gets sample_probe over its weights and their EMA, with its own one-step sampler: here the
    probe's bounds (1e3 and 1e6 x the data's scale) are made ~1e-12, so every real sample counts as diverged and no
    checkpoint may be written (GDD's generator had no probe: a G that diverged with a finite GAN loss would have been
    saved). Control: the same run with the real bounds writes its checkpoint."""
    import types
    real, seen = C.sample_probe, []

    def strict(generate_of, nets, env, data, *a):
        seen.append(len(nets))
        return real(generate_of, nets, env, types.SimpleNamespace(scale=1e-15, kind=data.kind), *a)
    monkeypatch.setattr(C, "sample_probe", strict)
    capsys.readouterr()
    code = run(name, *BASE[name], "--out", tmp_path / "r", "--iters", "2")
    refusal(code, capsys.readouterr().err, "the weights diverged", "not writing the final checkpoint")
    assert not (tmp_path / "r" / "ckpt.pt").exists() and seen and set(seen) == {2}
    monkeypatch.setattr(C, "sample_probe", real)
    assert run(name, *BASE[name], "--out", tmp_path / "c", "--iters", "2") == 0
    assert (tmp_path / "c" / "ckpt.pt").exists()


def test_gdd_stopped_after_its_teacher_goes_on_as_if_not_stopped(files, tmp_path):
    """distributional.py stopped after writing its in-file teacher.pt, before its first checkpoint, went on from
    other random numbers than the run that was not stopped (the RNG streams where the teacher's training had left
    them were lost): now teacher.pt holds them, and the run's checkpoint is the unstopped run's, bit for bit."""
    import shutil
    os.makedirs(tmp_path / "g")
    shutil.copy(files / "distributional" / "teacher.pt", tmp_path / "g" / "teacher.pt")  # what the stop leaves
    assert run("distributional", *BASE["distributional"], "--iters", "2", "--log_every", "1", "--out",
               tmp_path / "g") == 0
    a, b = (torch.load(p / "ckpt.pt", weights_only=True) for p in (files / "distributional", tmp_path / "g"))
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])


def test_gdd_resumed_logs_the_last_r1_until_the_next(tmp_path):
    """GDD's lazy R1 runs every r1_interval steps and the log shows the last value; a resumed run logged 0 until
    its next R1 step. Now the checkpoint keeps it: the resumed run's rows equal the unstopped run's."""
    argv = [*BASE["distributional"], "--r1_interval", "3", "--log_every", "1"]
    assert run("distributional", *argv, "--iters", "5", "--out", tmp_path / "a") == 0
    assert run("distributional", *argv, "--iters", "4", "--out", tmp_path / "b") == 0
    assert run("distributional", *argv, "--iters", "5", "--out", tmp_path / "b") == 0
    r1 = lambda d: [json.loads(r)["R1"] for r in open(tmp_path / d / "log.jsonl")]
    assert r1("a")[3] == r1("a")[4] > 0 and r1("b") == r1("a")  # R1 of step 4 (index 3) is logged again at step 5


def test_a_gan_that_diverges_with_finite_outputs_keeps_its_last_good_checkpoint(tmp_path, capsys):
    """GDD resumed at --lr_g 1e4 on 2-D points: the generator's samples settled at 4e3-9e3 x the data's scale, finite
    and under the probe's bound (1e6 x), so the run overwrote its good checkpoint with diverged weights and exited 0.
    Samples of points beyond 1e3 x now count as diverged: every later checkpoint is withheld and the final one
    refused, the good one kept."""
    argv = ["--teacher_iters", "40", "--batch", "512", "--eval_n", "128", "--eval_steps", "1", "--eval_teacher_steps",
            "0", "--out", tmp_path / "g"]
    assert run("distributional", *argv, "--iters", "20") == 0
    before = (tmp_path / "g" / "ckpt.pt").read_bytes()
    capsys.readouterr()
    code = run("distributional", *argv, "--iters", "32", "--lr_g", "1e4", "--ckpt_every", "1", "--max_skips", "3")
    refusal(code, capsys.readouterr().err, "the weights diverged", "not writing the final checkpoint",
             "(step 20) is kept")
    assert (tmp_path / "g" / "ckpt.pt").read_bytes() == before


def test_an_lpips_loss_on_points_is_one_sentence(files, tmp_path, capsys):
    """LPIPS compares images: rectified_flow --loss lpips-* on 2-D points was a traceback from F.interpolate at the
    2-RF's first step (a 2-RF alone, or after the 1-RF and the pairs of --stage all). Now one sentence, before any
    work."""
    rf = files / "rectified_flow" / "ckpt.pt"
    for argv in (["--stage", "2rf", "--teacher", rf], ["--stage", "all"]):
        capsys.readouterr()
        code = run("rectified_flow", *argv, "--loss", "lpips-huber", "--lpips_weights", "random", "--out",
                   tmp_path / "n")
        io = capsys.readouterr()
        refusal(code, io.err, "--loss lpips-huber compares images", "2-D points")
        assert io.out == "" and not os.path.exists(tmp_path / "n")


def test_a_finished_run_applies_no_change_and_says_so(files, tmp_path, capsys):
    """A run started again at its last step trains nothing: a changed --lr was noted as a change ("config: lr =
    ...") and written to config.json, while the checkpoint kept the old one. Now it is noted as not applied and
    config.json stays the checkpoint's; more --iters still applies it. (rectified_flow --stage ft never read --warmup,
    which it listed as read, and flow_map's --lr_ref is read by the sqrt schedule only: both refused elsewhere now.)"""
    import shutil
    shutil.copytree(files / "flow_map", tmp_path / "r")
    was = torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]["lr"]
    capsys.readouterr()
    assert run("flow_map", *BASE["flow_map"], "--out", tmp_path / "r", "--iters", "2", "--lr", "0.0123") == 0
    out = capsys.readouterr().out
    assert f"config: --lr 0.0123 not applied: '{tmp_path / 'r' / 'ckpt.pt'}' has trained its 2 steps" in out
    assert "config: lr =" not in out and json.loads((tmp_path / "r" / "config.json").read_text())["lr"] == was != 0.0123
    assert run("flow_map", *BASE["flow_map"], "--out", tmp_path / "r", "--iters", "3", "--lr", "0.0123") == 0
    assert torch.load(tmp_path / "r" / "ckpt.pt", weights_only=True)["config"]["lr"] == 0.0123
    capsys.readouterr()  # the precision is this command's (default or given), and a change of it is noted too
    assert run("flow_map", *BASE["flow_map"], "--out", tmp_path / "r", "--iters", "4", "--precision", "bf16") == 0
    assert "config: precision = 'bf16' (checkpoint had auto; given)" in capsys.readouterr().out
    assert run("flow_map", *BASE["flow_map"], "--out", tmp_path / "r", "--iters", "5") == 0
    assert "config: precision = auto (checkpoint had 'bf16'; this command's default)" in capsys.readouterr().out
    capsys.readouterr()
    code = run("rectified_flow", "--stage", "ft", "--warmup", "10", "--out", tmp_path / "n")
    refusal(code, capsys.readouterr(), "--stage ft does not read --warmup")
    code = run("flow_map", *BASE["flow_map"], "--lr_ref", "100", "--out", tmp_path / "n")  # (the const schedule)
    refusal(code, capsys.readouterr(), "--lr_schedule const does not read --lr_ref")


def test_a_finished_run_started_again_reads_its_moved_data_file(tmp_path, capsys, monkeypatch):
    """A finished run started again applies no change but where its files are (LOCATIONS): its points file moved,
    the new --data is taken (noted as a change, not as 'not applied') and the run evaluates again from it."""
    np.save(tmp_path / "a.npy", C.toy_sample("moons", 64).numpy())
    monkeypatch.chdir(tmp_path)
    assert run("imm", *BASE["imm"], "--data", "a.npy", "--iters", "1", "--out", "i") == 0
    os.rename("a.npy", "b.npy")
    capsys.readouterr()
    assert run("imm", *BASE["imm"], "--data", "b.npy", "--iters", "1", "--out", "i") == 0
    out = capsys.readouterr().out
    assert f"config: data = '{tmp_path / 'b.npy'}'" in out and "not applied" not in out


def test_a_cosine_decay_given_another_end_on_resume_says_so():
    """A run of a cosine learning-rate decay resumed with other --iters changes the lr of every step left (a finished
    run's factor 0 rises again), and its steps so far decayed towards the old end: only "config: iters = ..." was
    printed. Now a note gives the factor's jump at the resumed step. Control: none for a constant lr, or the same
    --iters."""
    import dataclasses
    for name, M in MODS.items():
        for sched, iters, words in [("cosine", 20, "its factor at step 10 goes from 0 to 0.5 (not a run of 20 steps"),
                                    ("cosine", 10, None), ("const", 20, None)]:
            cfg = C.resolve_config(M.Config, M.PRESETS, "toy", {"iters": 10, "lr_schedule": sched},
                                   **({"stage": "1rf"} if name == "rectified_flow" else {}))
            notes = []
            C.resume_config(M.Config, dict(config=dataclasses.asdict(cfg), step=10), cfg, C.Given({"iters": iters}),
                            "r/ckpt.pt", log=notes.append)
            cos = [n for n in notes if "cosine" in n]
            assert (cos == [f"config: the cosine lr decay now ends at step 20, not 10: {words} from the start)"]
                    if words else cos == []), (name, sched, notes)


@pytest.mark.parametrize("name", ["imm", "scm", "flow_map", "rectified_flow"])
def test_an_fp16_run_resumes_with_its_loss_scale(name, tmp_path, monkeypatch):
    """An fp16 run's GradScaler (loss scale, growth count) is part of its state: the checkpoint keeps it and a resumed
    run takes it back, so stopped at step 2 and resumed it ends as the unstopped run, the scaler included (it
    restarted at 65,536 with a zero growth count). fp16 needs CUDA; its check is lifted here so that CPU autocast
    runs the same fp16 code path."""
    monkeypatch.setattr(C, "check_device", lambda device, precision=None: None)
    fp16 = [*BASE[name], "--precision", "fp16", "--device", "cpu"]
    assert run(name, *fp16, "--iters", "4", "--out", tmp_path / "a") == 0
    assert run(name, *fp16, "--iters", "2", "--out", tmp_path / "b") == 0
    assert run(name, *fp16, "--iters", "4", "--out", tmp_path / "b") == 0
    a, b = (torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab")
    assert a["scaler"]["_growth_tracker"] == 4 and a["scaler"] == b["scaler"]  # (2 without the restore)
    assert all(torch.equal(a[k][n], b[k][n]) for k in ("model", "ema") for n in a[k])
    ck = {"scaler": {**a["scaler"], "scale": "65536"}}  # an edited checkpoint: one sentence, not a traceback later
    with pytest.raises(C.UserError, match="loss-scaler state is malformed"):
        C.make_scaler(C.Env(0, 1, 0, torch.device("cpu"), True, "fp16"), ck)


def test_gdd_optimiser_state_without_g_or_d_is_one_sentence(files, tmp_path, capsys):
    """An edited GDD checkpoint whose opt lacks G's or D's state (a load_checkpoint-valid layout: {} is a teacher's)
    was a KeyError traceback on resume; it is load_optimizer's sentence, as in the other files."""
    ck = torch.load(files / "distributional" / "ckpt.pt", weights_only=True)
    for opt in ({}, {"g": ck["opt"]["g"]}):
        d = tmp_path / str(len(opt))
        shutil.copytree(files / "distributional", d)  # (its teacher.pt too)
        torch.save({**ck, "opt": opt}, d / "ckpt.pt")
        code = run("distributional", *BASE["distributional"], "--iters", "3", "--out", d)
        refusal(code, capsys.readouterr(), "optimiser state does not fit")


def test_a_malformed_loss_scaler_state_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    """rectified_flow built its loss scaler after the run's first line: a resumed fp16 checkpoint with a malformed
    scaler state printed that line, then the error. Now nothing precedes the one sentence. Control: the unedited
    checkpoint resumes."""
    monkeypatch.setattr(C, "check_device", lambda device, precision=None: None)  # (fp16 on CPU autocast, as above)
    fp16 = [*BASE["rectified_flow"], "--precision", "fp16", "--device", "cpu", "--out", tmp_path / "a"]
    assert run("rectified_flow", *fp16, "--iters", "2") == 0
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    torch.save({**ck, "scaler": {**ck["scaler"], "scale": "65536"}}, tmp_path / "a" / "ckpt.pt")
    capsys.readouterr()
    code = run("rectified_flow", *fp16, "--iters", "3")
    refusal(code, capsys.readouterr(), "loss-scaler state is malformed")
    torch.save(ck, tmp_path / "a" / "ckpt.pt")
    assert run("rectified_flow", *fp16, "--iters", "3") == 0
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["step"] == 3


def test_gdd_refuses_fp16_it_cannot_scale(tmp_path, capsys, monkeypatch):
    """distributional.py has no loss scaling (two optimisers and R1's double backward): --precision fp16 would train
    with gradients that underflow, so it is refused in one sentence (GDD's own --fp16=True runs bf16); on a CUDA
    machine, where fp16 passes the device check (lifted here)."""
    monkeypatch.setattr(C, "check_device", lambda device, precision=None: None)
    code = run("distributional", *BASE["distributional"], "--precision", "fp16", "--out", tmp_path / "r")
    refusal(code, capsys.readouterr(), "--precision fp16 needs loss scaling", "bf16")


def test_compile_without_its_toolchain_is_refused_before_any_output(tmp_path, capsys, monkeypatch):
    """--compile on a machine without inductor's C++ compiler printed the run's first line, then failed at the first
    step; the toolchain is now checked before any output (CPU: inductor's compiler search; CUDA: Triton and a C
    compiler for its launcher, checked here by hiding them)."""
    import torch._inductor.config as inductor_config
    monkeypatch.setattr(inductor_config.cpp, "cxx", (None, "no-such-c++-compiler"))
    code = run("imm", *BASE["imm"], "--iters", "1", "--compile", "--out", tmp_path / "never")
    refusal(code, capsys.readouterr(), "--compile", "C++ compiler", "without --compile")
    assert not os.path.exists(tmp_path / "never")
    from torch.utils import _triton
    monkeypatch.setattr(_triton, "has_triton_package", lambda: False)
    with pytest.raises(C.UserError, match="needs Triton"):
        C.check_toolchain("cuda:0")
    monkeypatch.setattr(_triton, "has_triton_package", lambda: True)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(C.shutil, "which", lambda name: None)
    with pytest.raises(C.UserError, match="a C compiler"):
        C.check_toolchain("cuda")
    monkeypatch.setenv("CC", "/usr/bin/cc")
    C.check_toolchain("cuda")


@pytest.mark.parametrize("name", list(MODS))
def test_a_fresh_start_killed_before_its_first_checkpoint_leaves_no_earlier_run(name, tmp_path, capsys, monkeypatch):
    """--resume false over a finished run: the earlier run's rows went at the start, its ckpt.pt stayed until this run's
    first checkpoint, so a kill before it left the old checkpoint beside this run's rows, and a plain restart resumed
    the old run with them as its history. Its checkpoint now goes with its rows (noted). Control: a resume killed
    at the same point keeps its checkpoint and rows."""
    out = tmp_path / "run"
    assert run(name, *BASE[name], "--iters", "1", "--log_every", "1", "--out", out) == 0
    info = C.Logger.info

    def killed(self, msg):  # Ctrl-C at the run's first line
        info(self, msg)
        raise KeyboardInterrupt
    monkeypatch.setattr(C.Logger, "info", killed)
    for fresh in (False, True):
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            MODS[name].main([str(a) for a in (*BASE[name], "--iters", "2", "--log_every", "1", "--out", out,
                                              *(["--resume", "false"] if fresh else []))])
        printed = capsys.readouterr().out
        rows = (out / "log.jsonl").read_text().splitlines()
        assert (out / "ckpt.pt").exists() == (not fresh) and len(rows) == (0 if fresh else 1), (fresh, rows)
        assert ("the earlier run's checkpoint" in printed) == fresh, printed


@pytest.mark.parametrize("name", sorted(MODS))
def test_an_evaluation_during_training_leaves_the_training_alone(name, tmp_path, capsys):
    """--sample_every evaluates at its steps (a metrics row each, the picture) and changes nothing of the training:
    the weights, their EMA and the last step's metrics equal those of the same run without it (an evaluation that
    drew from the training's RNG streams, or left the network in eval mode, would change them). No test ran it."""
    rows = {}
    for d, extra in (("a", ["--sample_every", "2"]), ("b", [])):
        assert run(name, *BASE[name], "--iters", "4", *extra, "--out", tmp_path / d) == 0
        with open(tmp_path / d / "metrics.jsonl") as f:
            rows[d] = [{k: v for k, v in json.loads(ln).items() if k != "eval_s"} for ln in f]
    steps = {d: [r["step"] for r in rows[d]] for d in "ab"}  # (GDD evaluates its step 0 too)
    assert steps["b"][-1] == 4 and 2 not in steps["b"] and steps["a"] == sorted(steps["b"] + [2]), steps
    assert [r for r in rows["a"] if r["step"] != 2] == rows["b"]
    ck = {d: torch.load(tmp_path / d / "ckpt.pt", weights_only=True) for d in "ab"}
    for key in ("model", "ema"):
        sa, sb = ck["a"][key], ck["b"][key]
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), (name, key)
