"""Real-image benchmark without downloads: every method on Fashion-MNIST, scored by a Fréchet distance in the features
of a small classifier trained once on the same data set.

Every method trains common.py's U-Net of its file's `small` preset (`--preset small --data fashion_mnist`; the 28x28
images are zero-padded to 32x32 by common.py, 1 channel) with the same number of training examples, exactly as a
user would run it through its own command line. The teacher scheme is benchmarks/toy.py's: the distillation methods
pay for their teacher out of the budget (teacher E/2 + student E/2 = E), 2-RF++ also pays its pair generation in
wall-clock time:

    method     file                command (E = examples budget)
    1-RF       rectified_flow.py   --stage 1rf, E examples (the baseline; Euler sampler, K NFE for K steps)
    2-RF++     rectified_flow.py   1-RF teacher (E/2) -> --stage pairs -> --stage 2rf (E/2)
    IMM        imm.py              E examples from scratch
    sCT, sCD   scm.py              TrigFlow diffusion teacher (E/2) -> --mode sct / scd from its EMA (E/2)
    LSD, PSD,  flow_map.py         E examples from scratch (--mode lsd / psd / meanflow)
    MeanFlow
    LMD        flow_map.py         1-RF teacher (E/2) -> --mode lmd (E/2)
    GDD, GDD-I distributional.py   1-RF teacher (E/2) -> GAN fine-tune (E/2), --freeze none / gdd_i

Overrides of the `small` presets, the same rule for every file (the presets' schedules are written for 14k-60k
iterations): --iters and --batch from the budget; EMA half-life = 5 % of the stage's training examples (as a decay,
a half-life in kimg or in images, whichever the file takes); learning-rate warm-up (rectified_flow, flow_map) and the
TrigFlow teacher's lr ramp = 5 % of the stage's iterations; sCM's tangent warm-up H = 20 % (toy.py's rule); 2-RF++
pairs = min(200k, student examples / 8); no in-training FID (--fid_every 0). On the CPU, --precision fp32 (the
presets ask for bf16/tf32, meant for GPUs).

Score: "FD-classifier", the Fréchet distance (common.frechet_distance) between N samples and the 60k training images
in the 64-d penultimate features of a small CNN (3 conv layers) trained once on the Fashion-MNIST training set and
cached as a TorchScript feature network at ROOT/fashion_classifier.pt (its t10k accuracy is reported; it is reused
while ROOT/fashion_classifier.json matches the data and the recipe). Each method is scored by its own
`M.py fid --ckpt CK --steps 1,2 --n N --fid_detector ROOT/fashion_classifier.pt --root ROOT`, with the same noise
seeds for every method; the 1-RF is also scored with more Euler steps (the many-step reference), and N test (t10k)
images give the floor of the statistic at that N. Samples of each method at 1 and 2 steps form the figure.

    python benchmarks/fashion.py                              # CPU: tiny U-Net, 2 processes, about 20 min on 2 cores
    python benchmarks/fashion.py --device cuda                # GPU: small U-Net, 40k steps x 128 per method (1-RF)
    python benchmarks/fashion.py --methods 1-RF,LSD --budget 3200 --n_fd 500 --results /tmp/r

The GPU budget (E = 5.12M examples: 40k steps of 128 for 1-RF, 20k + 20k for the distilled methods, N = 10k) is a
realistic short run per method on one H100; it has not been measured yet (no GPU number is claimed here).

Data: ROOT/FashionMNIST/raw/ (torchvision's layout, what common.py reads); when absent it is unpacked from --source
(default /usr/share/datasets/fashion-mnist, Debian's `dataset-fashion-mnist`). Nothing is downloaded.
Writes DIR/fashion_<device>.json (every number, settings, machine, date, commit), DIR/fashion_<device>.md (the table)
and DIR/fashion_<device>.png (one row per method, 1 and 2 steps), DIR = benchmarks/results unless --results says so.
"""
import argparse, contextlib, datetime, gzip, hashlib, importlib, json, math, os, platform, shutil, subprocess, sys
import time, warnings, zlib

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)  # benchmarks/toy.py

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import common as C

from toy import METHODS, TEACHERS, _commit  # the same methods, teacher scheme and commit stamp as toy.py

STEPS = (1, 2)
BUDGETS = {  # per device: network, batch, examples per method, FD samples, 1-RF reference Euler steps, jobs
    "cpu": dict(net="tiny", batch=32, budget=9_600, n_fd=500, ref_steps=8, jobs=2),
    "cuda": dict(net="small", batch=128, budget=5_120_000, n_fd=10_000, ref_steps=32, jobs=1),
}
EMA_FRAC, WARM_FRAC, H_FRAC = 0.05, 0.05, 0.2  # of a stage's examples / iterations (module docstring)
DEBIAN = "/usr/share/datasets/fashion-mnist"
RAW_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CLASSIFIER = "fashion_classifier"  # ROOT/fashion_classifier.pt (TorchScript) and .json (its recipe and accuracy)
CLS_RECIPE = dict(version=2, epochs=4, batch=128, lr=3e-3, seed=0, features=64)


class Fail(Exception):
    """Bad input or a failed run: one sentence, printed by main() with a non-zero exit."""


# =============================================================================== data: Debian files -> ROOT
def _idx_count(head, size, name, where, hint=""):
    """The number of entries a uint8 IDX file of RAW_FILES' `name` declares (images N x 28 x 28, labels N), from its
    first 16 bytes `head` and its byte `size`; Fail naming `where` unless the two agree."""
    ndim = 3 if "images" in name else 1
    dims = [int.from_bytes(head[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    if head[:4] != bytes([0, 0, 8, ndim]) or size != 4 + 4 * ndim + math.prod(dims) or not dims[0] \
            or dims[1:] not in ([], [28, 28]):
        kind = "N x 28 x 28 images" if ndim == 3 else "labels"
        raise Fail(f"{where} does not hold a Fashion-MNIST IDX file of uint8 {kind} ({size} bytes, header "
                   f"{head[:4].hex() or 'missing'}){hint}.")
    return dims[0]


def check_data(source, raw=None):
    """Check all of RAW_FILES, from `raw` where it holds them, else unpacked from source/NAME.gz (each an IDX file of
    its kind, a split's images and labels equal in number) before anything is written; -> {name: unpacked bytes}."""
    new, count = {}, {}
    for f in RAW_FILES:
        path = os.path.join(raw, f) if raw else ""
        if os.path.isfile(path):
            with open(path, "rb") as fh:
                count[f] = _idx_count(fh.read(16), os.path.getsize(path), f, path, "; delete it to unpack it again")
            continue
        path = os.path.join(source, f + ".gz")
        try:
            with gzip.open(path, "rb") as fh:
                new[f] = fh.read()
        except (OSError, EOFError, zlib.error) as e:  # (gzip.BadGzipFile is an OSError)
            raise Fail(f"{path} is not a readable gzip file ({type(e).__name__}).") from None
        count[f] = _idx_count(new[f][:16], len(new[f]), f, path)
    for s in ("train", "t10k"):
        n_x, n_y = count[f"{s}-images-idx3-ubyte"], count[f"{s}-labels-idx1-ubyte"]
        if n_x != n_y:
            raise Fail(f"the {s} files of Fashion-MNIST (in {raw or source}) hold {n_x} images but {n_y} labels.")
    return new


def prepare_data(root, source):
    """Unpack the four *-ubyte.gz files from `source` into ROOT/FashionMNIST/raw/ unless they are already there; every
    file is checked first (check_data), so that a bad one is never installed."""
    raw = os.path.join(root, "FashionMNIST", "raw")
    missing = [f for f in RAW_FILES if not os.path.isfile(os.path.join(raw, f))]
    absent = [f + ".gz" for f in missing if not os.path.isfile(os.path.join(source, f + ".gz"))]
    if absent:
        raise Fail(f"Fashion-MNIST is neither in {raw} nor in {source} (missing {', '.join(absent)}); install it with "
                   f"`sudo apt-get install dataset-fashion-mnist` or pass --source DIR holding the four "
                   f"*-ubyte.gz files.")
    new = check_data(source, raw)
    if not new:
        return raw
    os.makedirs(raw, exist_ok=True)
    for f, b in new.items():
        path = os.path.join(raw, f)
        try:
            with open(path + ".tmp", "wb") as dst:
                dst.write(b)
            os.replace(path + ".tmp", path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path + ".tmp")
    print(f"unpacked {', '.join(new)} from {source} into {raw}")
    return raw


def read_idx(path):
    """One of RAW_FILES (a uint8 IDX file, checked) -> numpy array of its declared shape."""
    with open(path, "rb") as f:
        b = f.read()
    images = "images" in os.path.basename(path)
    n = _idx_count(b[:16], len(b), os.path.basename(path), path)
    return np.frombuffer(b, np.uint8, offset=16 if images else 8).reshape((n, 28, 28) if images else (n,))


def load_split(raw, split):
    """-> (uint8 (N, 1, 32, 32) images zero-padded like common.py, int64 (N,) labels)."""
    x = torch.from_numpy(read_idx(os.path.join(raw, f"{split}-images-idx3-ubyte")).copy())
    y = torch.from_numpy(read_idx(os.path.join(raw, f"{split}-labels-idx1-ubyte")).astype(np.int64))
    if x.ndim != 3 or len(x) != len(y):
        raise Fail(f"the {split} images and labels in {raw} do not match ({tuple(x.shape)} vs {tuple(y.shape)}).")
    return F.pad(x, (2, 2, 2, 2))[:, None], y


# =============================================================================== the classifier and its features
class SmallCNN(nn.Module):
    """Three 3x3 conv layers (16, 32, 64 channels; batch norm, ReLU, 2x2 max-pool) -> 64-d features (ReLU) -> 10
    logits."""

    def __init__(self, features=64, classes=10):
        super().__init__()
        layer = lambda cin, cout: [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)]
        self.convs = nn.Sequential(*layer(1, 16), *layer(16, 32), *layer(32, 64))
        self.fc = nn.Linear(64 * 4 * 4, features)
        self.head = nn.Linear(features, classes)

    def features(self, x):
        return F.relu(self.fc(self.convs(x).flatten(1)))

    def forward(self, x):
        return self.head(self.features(x))


class FeatureNet(nn.Module):
    """What common.load_detector expects of a TorchScript file: uint8 (B, 3, H, W) in (common.Detector repeats a
    grey channel to 3), net(u8, return_features=True) -> (B, 64) float features; logits otherwise."""

    def __init__(self, cnn):
        super().__init__()
        self.cnn = cnn

    def forward(self, u8: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = u8.float().mean(1, keepdim=True) / 127.5 - 1  # grey, [-1, 1] like the training images
        if x.shape[-2] != 32 or x.shape[-1] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        f = self.cnn.features(x)
        return f if return_features else self.cnn.head(f)


def accuracy(cnn, x, y, batch=1000):
    cnn.eval()
    with torch.no_grad():
        hits = sum((cnn(xb.float() / 127.5 - 1).argmax(1) == yb).sum().item()
                   for xb, yb in zip(x.split(batch), y.split(batch)))
    return hits / len(y)


def fit_classifier(x, y, x_test, y_test, epochs, batch, lr, seed, features=64, log=print):
    """Adam on cross-entropy over uint8 (N, 1, 32, 32) images -> (SmallCNN, test accuracy)."""
    torch.manual_seed(seed)
    cnn = SmallCNN(features, int(max(y.max(), y_test.max())) + 1).to(x.device)
    opt = torch.optim.Adam(cnn.parameters(), lr=lr)
    steps = epochs * ((len(x) + batch - 1) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        cnn.train()
        for idx in torch.randperm(len(x), generator=g).to(x.device).split(batch):
            loss = F.cross_entropy(cnn(x[idx].float() / 127.5 - 1), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        log(f"classifier epoch {epoch + 1}/{epochs}: last loss {loss.item():.3f}, test accuracy "
            f"{accuracy(cnn, x_test, y_test):.4f}")
    return cnn.eval(), accuracy(cnn, x_test, y_test)


def _md5(paths):
    h = hashlib.md5()
    for p in paths:
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def classifier(root, raw, device, recipe=CLS_RECIPE):
    """Train the classifier once and cache it in ROOT; -> (path of the TorchScript file, its record). A recipe with
    `train_n` trains on the first train_n training images only (gpu_check.py --quick)."""
    path, meta_path = os.path.join(root, CLASSIFIER + ".pt"), os.path.join(root, CLASSIFIER + ".json")
    want = dict(recipe, data_md5=_md5([os.path.join(raw, f) for f in RAW_FILES]))
    meta = None
    if os.path.isfile(path) and os.path.isfile(meta_path):
        with open(meta_path) as f, contextlib.suppress(ValueError):  # an unreadable record: trained again
            meta = json.load(f)
    if isinstance(meta, dict) and {k: meta.get(k) for k in want} == want and "test_accuracy" in meta:
        print(f"reusing the classifier {path} (t10k accuracy {meta['test_accuracy']:.4f})")
        return path, dict(meta, reused=True)
    (x, y), (xt, yt) = load_split(raw, "train"), load_split(raw, "t10k")
    x, y = x[:recipe.get("train_n")], y[:recipe.get("train_n")]
    t0 = time.perf_counter()
    cnn, acc = fit_classifier(x.to(device), y.to(device), xt.to(device), yt.to(device), recipe["epochs"],
                              recipe["batch"], recipe["lr"], recipe["seed"], recipe["features"])
    with warnings.catch_warnings():  # torch.jit is deprecated, but it is what common.load_detector reads
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(torch.jit.script(FeatureNet(cnn.cpu())), path + ".tmp")
    os.replace(path + ".tmp", path)
    meta = dict(want, test_accuracy=acc, train_images=len(x), test_images=len(xt),
                train_wall_s=time.perf_counter() - t0, trained_on=str(device), date=_now())
    with open(meta_path, "w") as f:
        json.dump(meta, f, indent=1)
    print(f"trained the classifier: t10k accuracy {acc:.4f} in {meta['train_wall_s']:.0f} s -> {path}")
    return path, dict(meta, reused=False)


def feature_stats(u8, det, batch=500):
    """float64 mean and unbiased covariance of the detector's features of uint8 NCHW images."""
    f = torch.cat([det(xb).double().cpu() for xb in u8.split(batch)])
    mu = f.mean(0)
    return mu, (f - mu).T @ (f - mu) / (len(f) - 1)


def fd_of_images(u8, det, ref):
    """Fréchet distance of a set of real images against the reference statistics (the floor at that N)."""
    return C.frechet_distance(*feature_stats(u8, det), *ref)


# =============================================================================== one method (or one teacher)
def _cli(module, argv, log):
    """Run `module.main(argv)` in this process, its prints into `log`; returns the wall-clock seconds."""
    t0 = time.perf_counter()
    log.write(f"$ python {module}.py {' '.join(argv)}\n")
    log.flush()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            importlib.import_module(module).main(argv)
    except (C.UserError, ValueError) as e:
        raise Fail(f"`python {module}.py {' '.join(argv)}` failed ({e}); see {log.name}.") from None
    return time.perf_counter() - t0


def schedule_argv(file, part, iters, batch):
    """The budget-scaled EMA / warm-up overrides of the module docstring for one training stage."""
    h_img = EMA_FRAC * iters * batch  # EMA half-life in images
    decay, warm = 0.5 ** (batch / h_img), max(1, round(WARM_FRAC * iters))
    if file in ("rectified_flow", "flow_map"):
        return ["--ema", f"{decay:.6g}", "--warmup", str(warm)]
    if file == "imm":
        return ["--ema", f"{decay:.6g}"]
    if file == "scm":
        ramp = ["--lr_ramp_kimg", f"{warm * batch / 1000:.6g}"] if part == "diffusion" else \
            ["--H", str(max(1, round(H_FRAC * iters)))]
        return ["--ema_halflife_kimg", f"{h_img / 1000:.6g}", *ramp]
    return ["--ema_halflife_img", f"{h_img:.6g}"]  # distributional


def base_argv(a):
    """Flags of every run, the reflow pairs' included (--stage pairs trains nothing and refuses the others)."""
    return ["--preset", "small", "--data", "fashion_mnist", "--root", a.root, "--seed", str(a.seed), "--device",
            a.device] + (["--precision", "fp32"] if a.device == "cpu" else [])


def common_argv(a, iters, net):
    """Flags of every training run; `net`: the run builds its own network (not 2-RF++, sCT/sCD, GDD: the teacher's)."""
    argv = [*base_argv(a), "--batch", str(a.batch), "--iters", str(iters), "--fid_every", "0", "--eval_n", "16",
            "--log_every", str(max(1, iters // 10)), "--ckpt_every", str(max(1, iters))]
    return argv + (["--net", a.net] if net else [])


def run_teacher(key, a):
    """Train a teacher on half the budget; -> record with its checkpoint, wall seconds and examples."""
    file, argv = TEACHERS[key]
    work = os.path.join(a.work, f"teacher-{key}")
    shutil.rmtree(work, ignore_errors=True)  # never resume a stale run
    os.makedirs(work)
    iters = max(1, a.budget // (2 * a.batch))
    with open(os.path.join(a.work, f"teacher-{key}.log"), "w") as log:
        wall = _cli(file, [*argv, *common_argv(a, iters, True), *schedule_argv(file, argv[1], iters, a.batch),
                           "--out", work], log)
    return dict(task=f"teacher-{key}", ckpt=os.path.join(work, "ckpt.pt"), wall_s=wall, examples=iters * a.batch)


def run_method(name, a, det_path, teachers):
    """Train one method (its teacher already trained), score it with `M.py fid` and draw its grid samples."""
    file, key, argv = METHODS[name]
    work = os.path.join(a.work, name)
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    log = open(os.path.join(work, "log.txt"), "w")
    iters = max(1, (a.budget // 2 if key else a.budget) // a.batch)
    part = argv[1] if argv and argv[0] in ("--mode", "--stage") else None
    own_net = not key or file == "flow_map"  # LMD builds its own two-time network; the others take the teacher's
    run = [*argv, *common_argv(a, iters, own_net), *schedule_argv(file, part, iters, a.batch)]
    wall, pre = 0.0, 0
    if key:
        t = teachers[key]
        wall, pre = t["wall_s"], t["examples"]
        if name == "2-RF++":  # pairs from the 1-RF teacher, then 2-RF++ initialised from its EMA, both in `work`
            n_pairs = min(200_000, iters * a.batch // 8)
            pair = ["--n_pairs", str(n_pairs), "--pair_block", str(min(n_pairs, 50_000)), "--pair_batch",
                    str(min(n_pairs, 1000))]
            wall += _cli(file, ["--stage", "pairs", *base_argv(a), *pair, "--teacher", t["ckpt"], "--out", work], log)
            run += ["--teacher", t["ckpt"]]  # (the pairs' options: read by --stage pairs only)
        else:
            run += ["--teacher", t["ckpt"]]
    wall += _cli(file, [*run, "--out", work], log)
    ckpt = os.path.join(work, "2rf" if name == "2-RF++" else "", "ckpt.pt")
    extra = ["--solver", "euler"] if name == "1-RF" else []  # 1-RF: Euler, so K steps = K NFE
    steps = list(dict.fromkeys([*STEPS, a.ref_steps] if name == "1-RF" else STEPS))  # (--ref_steps 2: once)
    fid_out = os.path.join(work, "fd.jsonl")
    _cli(file, ["fid", "--ckpt", ckpt, "--steps", ",".join(map(str, steps)), "--n", str(a.n_fd), "--batch",
                str(min(a.n_fd, 500)), "--seed", str(a.fd_seed), "--fid_detector", det_path, "--root", a.root,
                "--device", a.device, "--out", fid_out, *extra], log)
    _cli(file, ["sample", "--ckpt", ckpt, "--steps", ",".join(map(str, STEPS)), "--n", str(a.n_grid), "--seed",
                str(a.fd_seed), "--device", a.device, "--out", os.path.join(work, "grid.npy"), *extra], log)
    log.close()
    with open(fid_out) as f:
        fd = {int(r["steps"]): r["fid"] for r in map(json.loads, f)}
    rec = dict(method=name, file=file, examples=pre + iters * a.batch, teacher_examples=pre, iters=iters,
               wall_s=wall, fd={K: fd[K] for K in STEPS}, log=os.path.join(work, "log.txt"))
    if name == "1-RF":
        rec["fd_reference"] = {a.ref_steps: fd[a.ref_steps]}
    return rec


def run_task(task, a, det_path):
    """A teacher (`teacher-rf`) or a method; teachers' records are read from a.work/<teacher>.json."""
    if task.startswith("teacher-"):
        rec = run_teacher(task[len("teacher-"):], a)
    else:
        key = METHODS[task][1]
        teachers = {}
        if key:
            with open(os.path.join(a.work, f"teacher-{key}.json")) as f:
                teachers[key] = json.load(f)
        rec = run_method(task, a, det_path, teachers)
    with open(os.path.join(a.work, f"{task}.json"), "w") as f:
        json.dump(rec, f)
    return rec


def run_all(a, det_path, argv_base):
    """Teachers first, then the methods, `a.jobs` at a time (1: in this process; more: one process each)."""
    keys = sorted({METHODS[m][1] for m in a.methods} - {None})
    todo = [f"teacher-{k}" for k in keys] + list(a.methods)
    done, running, t0 = set(), [], time.time()
    ready = lambda t: t.startswith("teacher-") or METHODS[t][1] is None or f"teacher-{METHODS[t][1]}" in done
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} if a.device == "cpu" else dict(os.environ)
    while todo or running:
        for t in [t for t in todo if ready(t)][:max(0, a.jobs - len(running))]:
            todo.remove(t)
            print(f"[{time.time() - t0:6.0f} s] start {t}", flush=True)
            if a.jobs == 1:
                run_task(t, a, det_path)
                done.add(t)
                print(f"[{time.time() - t0:6.0f} s] done  {t}", flush=True)
            else:
                running.append((t, subprocess.Popen([*argv_base, "--task", t], env=env, cwd=REPO)))
        time.sleep(0.5 if running else 0)
        for t, proc in [r for r in running if r[1].poll() is not None]:
            running.remove((t, proc))
            if proc.returncode:
                for _, p in running:
                    p.kill()
                raise Fail(f"the task {t} failed (exit {proc.returncode}); see its log under {a.work}.")
            done.add(t)
            print(f"[{time.time() - t0:6.0f} s] done  {t}", flush=True)
    recs = {}
    for t in [f"teacher-{k}" for k in keys] + list(a.methods):
        with open(os.path.join(a.work, f"{t}.json")) as f:
            recs[t] = json.load(f)
    return recs


# =============================================================================== report: JSON, table, figure
def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def write_markdown(path, meta, rows):
    m = meta
    L = [f"# Fashion-MNIST benchmark ({m['date']}, {m['device']})", "",
         f"Command: `{m['command']}` · commit `{m['commit']}` · torch {m['torch']} · network `{m['net']}` "
         f"({m['net_params'] / 1e6:.2f}M parameters, every method's `--preset small` with `--net {m['net']}`) · "
         f"{m['budget']:,} training examples per method (teacher + student) · batch {m['batch']} · seed {m['seed']}.",
         "",
         f"FD-classifier: Fréchet distance between {m['n_fd']:,} samples and the {m['classifier']['train_images']:,} "
         f"training images in the {m['classifier']['features']}-d features of a small CNN classifier "
         f"(t10k accuracy {m['classifier']['test_accuracy']:.4f}, `{m['classifier_file']}`); lower is better. "
         f"Floor: {m['n_fd']:,} real t10k images score {m['fd_floor']:.3f}. K steps = K network evaluations.", "",
         "| method | examples (teacher) | wall s | FD-classifier 1 step | 2 steps |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        ex = f"{r['examples']:,}" + (f" ({r['teacher_examples']:,})" if r.get("teacher_examples") else "")
        fd = [f"{r['fd'][k]:.3f}" if k in r["fd"] else "-" for k in ("1", "2")]
        L.append(f"| {r['method']} | {ex} | {r['wall_s']:.0f} | {fd[0]} | {fd[1]} |")
    ref = next(r for r in rows if r["method"] == "1-RF").get("fd_reference", {})
    for K, v in ref.items():
        L.append(f"| 1-RF, {K} Euler steps (reference) | | | {v:.3f} (K = {K}) | |")
    L.append(f"| real t10k images (floor) | | | {m['fd_floor']:.3f} | |")
    L += ["", "Wall seconds are training only (teacher, pair generation and student; not the scoring), measured with "
          f"{m['jobs']} process(es) at once; 1-minute load average {m['load_avg_1min']['start']:.1f} at the start and "
          f"{m['load_avg_1min']['end']:.1f} at the end (a load above {m['jobs']} means other jobs shared the machine)."]
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def plot(path, rows, data_u8, work, n_grid):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    strip = lambda u8: np.concatenate(list(np.pad(np.asarray(u8)[..., 0], ((0, 0), (1, 1), (1, 1)))), axis=1)
    names = ["data (t10k)"] + [r["method"] for r in rows]
    fig, axes = plt.subplots(len(names), len(STEPS), figsize=(1.0 * n_grid * len(STEPS), 1.1 * len(names)),
                             squeeze=False)
    for i, name in enumerate(names):
        for j, K in enumerate(STEPS):
            ax = axes[i][j]
            img = strip(data_u8[j * n_grid:(j + 1) * n_grid].permute(0, 2, 3, 1)) if i == 0 else \
                strip(np.load(os.path.join(work, name, f"grid_{K}step.npy")))
            ax.imshow(img, cmap="gray", vmin=0, vmax=255), ax.set_xticks([]), ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{C.n_steps(K)} (real images in the first row)", fontsize=8)
            if j == 0:
                ax.set_ylabel(name, fontsize=8, rotation=0, ha="right", va="center")
    fig.tight_layout(pad=0.2)
    fig.subplots_adjust(left=max(fig.subplotpars.left, 0.1))  # room for the horizontal row labels
    fig.savefig(path, dpi=80)
    plt.close(fig)


# =============================================================================== driver
def parse(argv):
    p = C.Parser(description=__doc__.split("\n")[0])  # argparse's errors as one `error:` sentence
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--net", default=None, help="U-Net of every method: tiny or small (default: cpu tiny, cuda small)")
    p.add_argument("--budget", type=int, default=None, help="training examples per method (cpu 9,600; cuda 5.12M)")
    p.add_argument("--batch", type=int, default=None, help="batch of every stage (cpu 32, cuda 128)")
    p.add_argument("--n_fd", type=int, default=None, help="samples per FD (cpu 500; cuda 10,000)")
    p.add_argument("--ref_steps", type=int, default=None, help="Euler steps of the 1-RF reference (cpu 8, cuda 32)")
    p.add_argument("--jobs", type=int, default=None, help="tasks at once (cpu 2 processes of 1 thread; cuda 1)")
    p.add_argument("--n_grid", type=int, default=8, help="samples per method and step count in the figure")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fd_seed", type=int, default=10_000, help="noise seed of the samples (the same for every method)")
    p.add_argument("--root", default="data", help="data sets, the classifier and FD reference statistics")
    p.add_argument("--source", default=DEBIAN, help="folder of the four *-ubyte.gz files when ROOT lacks them")
    p.add_argument("--work", default=None, help="scratch folder for checkpoints (default /tmp/fashion-benchmark-DEV)")
    p.add_argument("--results", default=os.path.join(HERE, "results"))
    p.add_argument("--task", default=None, help=argparse.SUPPRESS)  # internal: one teacher or method
    a = p.parse_args(argv)
    if a.task is not None and a.task not in [*METHODS, *(f"teacher-{k}" for k in TEACHERS)]:
        p.error(f"--task (internal) takes a method or teacher-KEY, got '{a.task}'.")
    for k, v in BUDGETS[a.device].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    a.methods = a.methods.split(",")
    a.work = a.work or os.path.join("/tmp", f"fashion-benchmark-{a.device}")
    a.root = os.path.abspath(a.root)
    bad = [m for m in a.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; methods: {', '.join(METHODS)}.")
    if "1-RF" not in a.methods:
        p.error("--methods must include 1-RF (the baseline every row is compared with).")
    if a.net not in ("tiny", "small", "ddpmpp"):
        p.error(f"--net must be tiny, small or ddpmpp, got {a.net}.")
    if a.budget < 2 * a.batch or min(a.jobs, a.n_grid, a.ref_steps) < 1 or a.n_fd < 2 * 64:
        p.error("--budget must be at least two batches, --jobs, --n_grid and --ref_steps positive, --n_fd >= 128.")
    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda was asked for but CUDA is not available here; use --device cpu.")
    for k, rule in (("seed", None), ("fd_seed", None), ("ref_steps", C.STEPS)):  # (the methods' command lines
        C.check_value(k, int, getattr(a, k), rule)  # refuse them too, but only after the classifier and training)
    for d, what in ((a.root, "--root"), (a.work, "--work"), (a.results, "--results")):
        C.check_dir(d, what)
    return a


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse(argv)
    if a.device == "cpu":
        torch.set_num_threads(1)
    try:
        return _main(a, argv)
    except Fail as e:
        raise C.UserError(str(e)) from None


def _main(a, argv):
    det_path = os.path.join(a.root, CLASSIFIER + ".pt")
    if a.task:  # a worker process: one teacher or one method
        return run_task(a.task, a, det_path)
    t0, commit, load0 = time.time(), _commit(), os.getloadavg()[0]
    raw = prepare_data(a.root, a.source)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.results, exist_ok=True)
    det_path, cls = classifier(a.root, raw, torch.device(a.device))
    env = C.setup(a.device, a.seed, "fp32")
    det = C.load_detector(det_path, env)
    ref = C.reference_stats(C.load_data("fashion_mnist", a.root, env, a.seed, False), det, env, a.root)  # cached once
    test_u8, _ = load_split(raw, "t10k")
    pick = torch.randperm(len(test_u8), generator=torch.Generator().manual_seed(a.seed))[:a.n_fd]
    floor = fd_of_images(test_u8[pick].to(env.device), det, ref)
    print(f"FD-classifier floor ({a.n_fd} t10k images against the training set): {floor:.4f}")

    base = [sys.executable, os.path.abspath(__file__), *argv,  # the workers' command, every default resolved
            "--net", a.net, "--budget", str(a.budget), "--batch", str(a.batch), "--n_fd", str(a.n_fd),
            "--ref_steps", str(a.ref_steps), "--jobs", str(a.jobs), "--work", a.work, "--root", a.root,
            "--methods", ",".join(a.methods)]
    recs = run_all(a, det_path, base)
    rows = [recs[m] for m in a.methods]
    net = C.build_net(C.net_config(a.net, img_resolution=32, in_channels=1))
    meta = dict(date=_now(), device=f"{a.jobs}-process " + (
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, 1 thread per process)"
        if a.device == "cpu" else f"GPU ({torch.cuda.get_device_name()})"),
        command="python benchmarks/fashion.py " + " ".join(argv), commit=commit, torch=torch.__version__,
        net=a.net, net_params=sum(p.numel() for p in net.parameters()), budget=a.budget, batch=a.batch,
        seed=a.seed, fd_seed=a.fd_seed, n_fd=a.n_fd, ref_steps=a.ref_steps, jobs=a.jobs, methods=a.methods,
        overrides=dict(ema_halflife_frac=EMA_FRAC, warmup_frac=WARM_FRAC, sCM_H_frac=H_FRAC,
                       precision="fp32" if a.device == "cpu" else "preset"),
        classifier=cls, classifier_file=os.path.relpath(det_path, REPO) if det_path.startswith(REPO) else det_path,
        fd_floor=floor, total_wall_s=time.time() - t0, load_avg_1min=dict(start=load0, end=os.getloadavg()[0]))
    stem = os.path.join(a.results, f"fashion_{a.device}")
    rows = json.loads(json.dumps(rows))  # step counts as strings, as they are read back from the JSON
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, records=rows, teachers={k: v for k, v in recs.items() if k.startswith("teacher-")}),
                  f, indent=1)
    write_markdown(stem + ".md", meta, rows)
    plot(stem + ".png", rows, test_u8[pick[:a.n_grid * len(STEPS)]], a.work, a.n_grid)
    print(f"wrote {stem}.json, .md, .png ({time.time() - t0:.0f} s)")
    return dict(meta=meta, records=rows)


if __name__ == "__main__":
    C.main_guard(main)
