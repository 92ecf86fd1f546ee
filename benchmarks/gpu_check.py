"""Every GPU measurement the project lacks, in one prepared run of at most 10 minutes.

    python benchmarks/gpu_check.py --prepare     # once, where dataset-fashion-mnist is installed (CPU, ~5 min)
    python benchmarks/gpu_check.py               # on the GPU (no network needed): ~8.5 min, writes benchmarks/results
    python benchmarks/gpu_check.py --results DIR # the same into DIR (e.g. a folder the machine hands back)
    python benchmarks/gpu_check.py --results DIR --sections paths   # the second call, where ~3 min are left
    python benchmarks/gpu_check.py --quick --results /tmp/gc   # the first call's sections at smoke size, CPU (~45 s)
    python benchmarks/gpu_check.py --quick --results /tmp/gc --sections paths   # the second call's (~10 s)

Writes DIR/gpu_<device>.json (every number, settings, machine, date, commit, and each section's planned and used
seconds), DIR/gpu_<device>.md (the tables, regenerated from the JSON), DIR/gpu_<device>_throughput.png and
DIR/gpu_<device>_fashion.png; DIR = benchmarks/results, which takes full GPU runs only (--quick and CPU runs need
--results). The files are rewritten after every measurement, so a run cut short keeps what it measured; at the end
the tables are printed. `--sections` reruns some sections and keeps the others' results from the existing JSON.

Sections, in order of value, each with a deadline (the planned seconds of the sections so far, counted from the
start; time a section leaves unused passes to the next ones, and the last one runs to the end of the budget):

 1 throughput  training img/s, TFLOP/s, fraction of the dense peak and peak memory of the flow-matching step and of
               every method at batch 128 on DDPM++ (benchmarks/throughput.py's measure(): each method's own loss
               code with its `cifar10` preset's maths and network), in bf16 and in the method's cifar10 precision
               (`--precision paper`), with the cost of each method relative to the fm step beside its cost model
               (`fwd_per_step`); the fm step also with torch.compile (in a child process, killed at the deadline,
               so a compile that hangs costs its share only). With time left: fm compiled in its paper precision,
               then each method whose training step runs the compiled network (the flow-map methods in their
               diagonal and PSD terms; not MeanFlow, whose loss is one JVP of the raw module); a compile that fails
               is recorded and the run goes on.
 2 sampling    the methods' own one-step samplers (1-RF Euler, IMM, sCM, MeanFlow) at a large batch, 1 and 2
               network evaluations, bf16; and the wall-clock time of 50,000 one-step samples of the 1-RF (DDPM++,
               uint8 on the host), measured in full.
 3 precision   sCM's normalised tangent g with TF32 allowed against strict fp32 (cosine similarity, pass > 0.999),
               and the dropout mask of the bf16 gradient pass against the fp32 JVP pass's (RNG replay); IMM's time
               embedding difference e(t, s) - e(r, s) near T and its first block affine, the network's float64 path
               against an fp32 one (strict fp32; TF32 and bf16 for the affine);
               bf16 against fp32 one-step samples (RMS difference in uint8 levels). Networks with stand-in
               weights (Xavier-uniform everywhere: a fresh network's zero output layer would make every check
               trivially pass).
 4 fashion     1-RF, IMM and sCT (after its TrigFlow teacher) trained through their own command lines on
               Fashion-MNIST with the `small` U-Net for an equal share of the time left (at most 2 minutes each),
               scored by benchmarks/fashion.py's Fréchet distance in the cached classifier's features at 1 and 2
               steps and the 1-RF at 8 and 32 Euler steps; a sample grid.

 5 paths       a second call (`--sections paths`; not in the default run, whose 510 s it would overrun): each
               method file's toy run on the device stopped at 2 steps and resumed to 4 against 4 steps unstopped,
               every checkpoint tensor compared (fp16 with the GradScaler; GDD, which has no loss scaling, bf16);
               imm.py's toy run under `torchrun --nproc_per_node=1` (NCCL bound to the device, common's gloo group
               for rank 0's downloads beside it, DDP, the teardown; killed after 60 s); then the peak memory of one
               training step of every throughput method at its `cifar10` preset batch, halved until it fits (the
               --accum a one-GPU run needs). Planned 170 s + 10 s start-up: 5 resume checks x 3 toy runs (~4 s each
               with their evaluation), the torchrun run (~15 s: two interpreters' start, CUDA and NCCL set-up) and 12
               methods x 1-3 tries of a set-up (2-3 s) and 3 training steps at up to batch 1024 (IMM: the first tries
               at 4096 and 2048 are expected to run out of memory at once; these records take the time that is
               left); not yet run on a GPU.

Budget (seconds; printed at the start, `--budget` scales it). How it was estimated:
  * start-up 10: CUDA initialisation and device query.
  * throughput 230: a DDPM++ training step at batch 128 is 3 x 42.4 GFLOP x 128 = 16.3 TFLOP per fm unit. Assumed
    utilisation of the dense peak (H100 SXM / H200: 989 bf16, 494 tf32, 67 fp32 TFLOP/s): 30 % bf16, 35 % tf32,
    60 % fp32, i.e. ~55 ms, ~94 ms and ~0.4 s per fm unit, times each method's `fwd_per_step` (1 to 2.5), the
    share its code runs with autocast off (AUTOCAST_OFF) at TF32 / fp32 speed. The CPU ratios of
    benchmarks/throughput.py agree with these costs within a factor of two. A record = ~2 s set-up (network,
    prepare, FLOP count; + 1-3 s for a VGG16, teacher or discriminator) + 3 warm-up steps + max(1.5 s, 3 steps)
    timed + 2 x (3 warm-up + max(0.5 s, 3 calls)) sampler calls at a third of an fm unit per NFE. The 13 bf16 +
    4 tf32 + 4 fp32 eager records: ~126 s, + 3 s cuDNN autotuning per precision; then the fm step compiled in bf16
    (the last core item, so it gets what the eager records leave): ~75 s (8 s child start, ~60 s inductor compile
    of the training and the inference graphs, cold cache, assumed). Core ~210 s, ~20 s margin; the table printed
    at the start is this model. Stretch items (fm compiled in tf32, each method compiled) run only while the
    section's deadline allows.
  * sampling 35: 4 samplers x (2 s set-up + 3 warm-up calls + 0.75 s timed per NFE count) ~ 19 s at batch 1000
    (one DDPM++ forward of 1000 images = 42 TFLOP, ~0.14 s at 30 % of the bf16 peak), + 50k one-step samples:
    2.1 PFLOP ~ 7 s, ~8 s with the host copies.
  * precision 20: 6 network builds (~2 s each) and a few batched forwards and JVPs at batch 64-256.
  * fashion 215 (to the end of the 510 s): set-up ~5 s (unpack, classifier, reference statistics, the floor),
    step-time calibration ~9 s, scoring and command-line start-ups SCORE_S = 77 s (5,000 samples per FD, 6.4 GFLOP
    per `small` forward, sampled by the `fid` command in fp32 with TF32 off, its default: the 1-RF's 1 + 2 + 8 + 32
    steps are 1.4 PFLOP, ~35 s at 60 % of the 67 TFLOP/s fp32 peak), leaving ~125 s of training: 1-RF, IMM and
    sCT (teacher + student) ~40 s each, more when earlier sections finish early, at most 120 s.
  Total 510 s (8.5 min) of the 10-minute limit, leaving ~90 s for slower-than-assumed steps and the device's
  command overhead.

The Fashion-MNIST files (Debian's `dataset-fashion-mnist`), the cached classifier and its reference statistics
travel in benchmarks/.carry (git-ignored, 30 MiB), made by `--prepare`; the GPU machine has no network. The exact
device command (what to carry, the timeout, where the files come back) is in benchmarks/results/README.md.
"""
import argparse, contextlib, copy, dataclasses, datetime, gc, glob, io, json, math, os, re, shutil, subprocess, sys
import time, types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)
sys.path.insert(0, HERE)

import torch
import torch.nn as nn

import common
import throughput as tp

RESULTS = os.path.join(HERE, "results")
CARRY = os.path.join(HERE, ".carry")
DEBIAN = "/usr/share/datasets/fashion-mnist"
SECTIONS = ("throughput", "sampling", "precision", "fashion", "paths")
DEFAULT_SECTIONS = SECTIONS[:4]  # paths: a second call, where device time is left (module docstring)
STARTUP_S = 10
PLAN_S = dict(throughput=230, sampling=35, precision=20, fashion=215,  # + STARTUP_S = 510 s (module docstring)
              paths=170)  # the second call: 10 + 170 s
UTIL = dict(bf16=0.30, tf32=0.35, fp32=0.60)  # assumed fractions of the dense peak, for the printed estimate only
COMPILE_S = 70  # assumed child start + inductor compile of the DDPM++ graphs (module docstring)
PIPE_WAIT_S = 10  # after a compile child is killed, its output is read for at most this long
TORCHRUN_S = 60  # paths: the torchrun run is killed after this long (a hang at NCCL's set-up or a collective)
TORCHRUN_STOP_S = 40  # then torchrun is given this long to stop its worker (its own wait before a SIGKILL: 30 s)
NO_COMPILE = ("meanflow",)  # its whole loss is one JVP of the raw module (flow_map.per_sample_loss): --compile idle
COMPILE_ORDER = ("imm", "sct", "2rf", "gdd", "scd", "gdd_i", "2rf_lpips", "lsd", "psd", "lmd")  # stretch, in order
SAMPLERS = ("fm", "imm", "sct", "meanflow")  # one per sampler family: 1-RF Euler, IMM, sCM, flow map
QUICK_METHODS = ("fm", "imm", "sct", "meanflow")  # --quick: one per sampler family (every method: test_benchmarks.py)
QUICK_CLASSIFIER = dict(epochs=1, train_n=4096)  # --quick: fashion.py's classifier recipe at smoke size
FASHION = ("1-RF", "IMM", "sCT")
FASHION_SAMPLER = {"1-RF": "fm", "IMM": "imm", "sCT": "sct"}  # throughput.py's one-step sampler of each
SCORE_S = {"1-RF": 50, "IMM": 12, "sCT": 15}  # FD scoring (5,000 samples per FD, fp32) and grid + CLI start-ups


# =============================================================================== sizes: full GPU run / --quick
def sizes(quick):
    if quick:
        return types.SimpleNamespace(
            net="tiny", batch=8, sample_batch=8, iters=2, warmup=1, seconds=None, lpips_res=32, lo="fp32",
            big_batch=16, n_50k=32, tangent_batch=4, sample_check_batch=8,
            f_net="tiny", f_batch=8, f_budget=32, n_fd=64, ref_steps=(2, 3), n_grid=2, f_max_s=None)
    return types.SimpleNamespace(
        net="ddpmpp", batch=128, sample_batch=128, iters=400, warmup=3, seconds=1.5, lpips_res=224, lo="bf16",
        big_batch=1000, n_50k=50_000, tangent_batch=64, sample_check_batch=256,
        f_net="small", f_batch=128, f_budget=None, n_fd=5_000, ref_steps=(8, 32), n_grid=8, f_max_s=120.0)


class Clock:
    """Wall clock from the start; each section's deadline is the cumulative plan (unused time passes on)."""

    def __init__(self, plan, sections, startup):
        self.t0, self.ends, acc = time.time(), {}, startup
        for s in sections:
            acc += plan[s]
            self.ends[s] = acc
        self.total = acc

    def now(self):
        return time.time() - self.t0

    def left(self, section):
        return self.ends[section] - self.now()


def _err(e):
    s = f"{type(e).__name__}: {e}".strip().splitlines()
    return s[0][:300] if s else type(e).__name__


def _plain(o):
    """json.dumps' default: a number JSON does not know (numpy, a one-element tensor) as a float, else its str."""
    try:
        return float(o)
    except (TypeError, ValueError, RuntimeError):
        return str(o)


def _free():
    tp._ENV.clear()
    if torch.cuda.is_available():  # the device memory of the last measurement back before the next one
        gc.collect()
        with contextlib.suppress(Exception):  # after a sticky CUDA error (an illegal memory access) every CUDA call
            torch.cuda.empty_cache()  # raises it: the item that met it records it; here it would end the whole run


def _args(sz, device, method, precision, compile=False, net=None, batch=None):
    """throughput.py's arguments for one configuration."""
    return tp.parse(["--method", method, "--net", net or sz.net, "--batch", str(batch or sz.batch),
                     "--sample_batch", str(sz.sample_batch), "--iters", str(sz.iters), "--warmup", str(sz.warmup),
                     "--precision", precision, "--compile", "on" if compile else "off", "--device", device,
                     "--lpips_res", str(sz.lpips_res)])


def standin_weights(net, seed=0):
    """Xavier-uniform for every convolution and linear weight (the zero output layer and the 1e-5-scaled residual
    convolutions of a fresh network included), biases left at zero: O(1) outputs that depend on every layer."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                w = torch.empty(m.weight.shape)
                nn.init.xavier_uniform_(w, generator=g)
                m.weight.copy_(w)
    return net


def resolved(method, precision):
    return tp.METHODS[method].precision if precision == "paper" else precision


# =============================================================================== section 1: training throughput
def throughput_plan(sz, quick):
    """[(method, precision, compile, core)] in order of value; core items are inside the planned budget."""
    methods = [m for m in tp.METHODS if m != "fm" and (not quick or m in QUICK_METHODS)]
    lo = sz.lo
    plan = [("fm", lo, False, True), ("fm", "paper", False, True)]
    plan += [(m, lo, False, True) for m in methods]
    if not quick:
        plan += [(m, "paper", False, True) for m in methods]
    plan += [("fm", lo, True, True)]  # last of the core: it gets whatever the eager records left
    if not quick:
        plan += [("fm", "paper", True, False)]
        plan += [(m, lo, True, False) for m in COMPILE_ORDER + NO_COMPILE]
    out, seen = [], set()
    for m, p, c, core in plan:
        key = (m, resolved(m, p), c)
        if key not in seen:
            seen.add(key)
            out.append((m, resolved(m, p), c, core))
    return out


# Share of a method's step (in fm units) that its code runs with autocast off whatever --precision says (TF32
# allowed unless fp32): LPIPS's VGG16; sCM's JVP pass (2/3 of 5/3) and sCD's teacher; the flow maps' JVP blocks
# (LSD: 0.75 of 1.5 units, MeanFlow: all of them, LMD: most); GDD's discriminator (~1.4 of 5.4 / 4.6 F).
# For the printed estimate only (from the cost notes in throughput.py's METHODS).
AUTOCAST_OFF = dict(fm=0, imm=0, sct=0.4, scd=0.5, lsd=0.5, psd=0.1, meanflow=1.0, lmd=0.7, gdd=0.26, gdd_i=0.3,
                    **{"2rf": 0, "2rf_lpips": 0.4})


SETUP_EXTRA = {"2rf_lpips": 3, "lmd": 1, "gdd": 1, "gdd_i": 1}  # VGG16 / teacher / discriminator built on the host
AUTOTUNE_S = 3  # cuDNN autotuning (cudnn.benchmark) in the first record of each precision


def estimate_record_s(method, precision, compile, fwd_gflop=42.38, batch=128, peak=989.0):
    """The printed plan's model of one record's seconds (module docstring): set-up, warm-up, timing, sampling."""
    rate = {p: peak * f * UTIL[p] * 1e12 for p, f in (("bf16", 1), ("tf32", 0.5), ("fp32", 67 / 989))}
    cost = tp.METHODS[method].fwd_per_step
    cost = 1.7 if callable(cost) else cost  # 2-RF with LPIPS: 1 + VGG16 at 224 / DDPM++ (rectified_flow's cost note)
    off = AUTOCAST_OFF[method]
    unit = 3 * fwd_gflop * 1e9 * batch  # FLOPs of one fm step
    step = unit * cost * ((1 - off) / rate[precision] + off / rate["fp32" if precision == "fp32" else "tf32"])
    sample = unit / 3 / rate[precision]
    rec = 2 + 3 * step + max(1.5, 3 * step) + sum(3 * k * sample + max(0.5, 3 * k * sample) for k in (1, 2))
    return rec + SETUP_EXTRA.get(method, 0) + (COMPILE_S if compile else 0)


def run_child(job, timeout, quick):
    """One throughput record in a child process (the compiled ones), killed after `timeout` seconds."""
    out = os.path.join(job["work"], f"child-{job['argv'][1]}-{job['argv'][13]}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", json.dumps({**job, "out": out})]
    # the compilers' caches in the scratch folder: shared by the children, wiped after a kill (a half-written
    # kernel file would fail the next compile)
    caches = dict(TORCHINDUCTOR_CACHE_DIR=os.path.join(job["work"], "inductor-cache"),
                  TRITON_CACHE_DIR=os.path.join(job["work"], "triton-cache"))
    env = {**os.environ, **caches, **({"OMP_NUM_THREADS": "1"} if quick else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=None if timeout is None else max(1.0, timeout))
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):  # (the whole group may have exited since the timeout)
            os.killpg(proc.pid, 9)
        with contextlib.suppress(subprocess.TimeoutExpired):  # a process of another session may hold the pipe open:
            proc.communicate(timeout=PIPE_WAIT_S)  # not waited for (the run would hang in it)
        proc.wait()
        for d in caches.values():
            shutil.rmtree(d, ignore_errors=True)
        return dict(status="error", error=f"killed at the section deadline after {timeout:.0f} s (compile too slow)")
    if os.path.exists(out):
        with open(out) as f:
            return json.load(f)
    tail = " | ".join((log or "").strip().splitlines()[-3:])
    return dict(status="error", error=f"child exited {proc.returncode}: {tail[-300:]}")


def child_main(job):
    """--_child: measure one configuration, write its record (or the error) to job['out']."""
    argv = list(job["argv"])
    if job.get("quick"):  # smoke size: the child process path only (a CPU compile takes minutes)
        argv[argv.index("--compile") + 1] = "off"
        torch.set_num_threads(1)
    try:
        rec = dict(tp.measure(tp.parse(argv), job.get("seconds")), status="ok")
        if job.get("quick"):
            rec["compile_backend"] = "not compiled (--quick: the child process only)"
    except BaseException as e:  # noqa: BLE001  (a failed compile is a result)
        rec = dict(status="error", error=_err(e))
    with open(job["out"] + ".tmp", "w") as f:
        json.dump(rec, f)
    os.replace(job["out"] + ".tmp", job["out"])


def section_throughput(ctx):
    sz, clock, recs = ctx.sz, ctx.clock, ctx.sec["records"]
    for method, precision, comp, core in throughput_plan(sz, ctx.quick):
        label = dict(method=method, precision=precision, compile=comp, planned=core,
                     est_s=round(estimate_record_s(method, precision, comp), 1))
        left = clock.left("throughput")
        if comp and method in NO_COMPILE:
            recs.append(dict(label, status="unsupported", note="MeanFlow's loss is one JVP of the raw module: "
                                                                  "--compile does not apply"))
            continue
        need = 0.0 if ctx.quick else min(label["est_s"], 60) if comp else label["est_s"]  # --quick: any time left
        if left <= need:
            recs.append(dict(label, status="skipped", note=f"out of section time ({left:.0f} s left)"))
            continue
        t0 = time.time()
        argv = ["--method", method, "--net", sz.net, "--batch", str(sz.batch), "--sample_batch", str(sz.sample_batch),
                "--iters", str(sz.iters), "--warmup", str(sz.warmup), "--precision", precision, "--compile",
                "on" if comp else "off", "--device", ctx.device, "--lpips_res", str(sz.lpips_res)]
        if comp:
            _free()
            rec = run_child(dict(argv=argv, seconds=sz.seconds, quick=ctx.quick, work=ctx.work),
                            None if ctx.quick else left, ctx.quick)
        else:
            try:
                rec = dict(tp.measure(tp.parse(argv), sz.seconds), status="ok")
            except Exception as e:  # noqa: BLE001
                rec = dict(status="error", error=_err(e))
            _free()
        rec = {**label, **rec, "wall_s": time.time() - t0}
        recs.append(rec)
        ok = [r for r in recs if r.get("status") == "ok"]
        for r in ok:
            r["vs_fm"] = tp.cost_vs_fm(r, ok)
        print(f"  {method:9s} {precision:4s} compile {str(comp):5s} " + (
            f"{rec['train_img_per_s']:9,.0f} img/s, cost vs fm {_fmt(rec.get('vs_fm'), '{:.2f}')} "
            f"(model {rec['fwd_per_step']:.2f}), {rec['wall_s']:.0f} s" if rec["status"] == "ok" else
            f"{rec['status']}: {rec.get('error', '')}"), flush=True)
        ctx.save()


# =============================================================================== section 2: sampling
@torch.no_grad()
def section_sampling(ctx):
    sz, dev, recs = ctx.sz, ctx.dev, ctx.sec["records"]
    for method in SAMPLERS:
        if ctx.clock.left("sampling") <= (0 if ctx.quick else 5):
            recs.append(dict(method=method, status="skipped", note="out of section time"))
            continue
        try:
            b = tp.build(_args(ctx.sz, ctx.device, method, sz.lo))
            b.model.eval()
            z = torch.randn(sz.big_batch, *b.shape, device=dev, generator=b.gen)
            rec = dict(method=method, net=sz.net, batch=sz.big_batch, precision=b.env.precision, status="ok")
            with common.autocast(b.env):
                for k in (1, 2):
                    for _ in range(sz.warmup):
                        b.meth.sample(b.model, z, k)
                    n, sec, _ = tp.timed(lambda: b.meth.sample(b.model, z, k), sz.iters, dev,
                                         sz.seconds and sz.seconds / 2)
                    rec[f"img_per_s_{k}nfe"] = n * sz.big_batch / sec
                    rec[f"calls_{k}nfe"] = n
        except Exception as e:  # noqa: BLE001
            rec = dict(method=method, status="error", error=_err(e))
        recs.append(rec)
        _free()
        ctx.save()
    # 50k one-step samples of the 1-RF (Euler, one DDPM++ forward each), uint8 on the host, as an FID run needs them
    try:
        b = tp.build(_args(ctx.sz, ctx.device, "fm", sz.lo))
        b.model.eval()
        n_done, parts = 0, []
        with tp.Timer(dev) as t, common.autocast(b.env):
            while n_done < sz.n_50k:
                if ctx.clock.left("sampling") < 0:
                    break
                nb = min(sz.big_batch, sz.n_50k - n_done)
                z = torch.randn(nb, *b.shape, device=dev, generator=b.gen)
                parts.append(common.to_uint8(b.meth.sample(b.model, z, 1)).cpu())
                n_done += nb
        ctx.sec["one_step_50k"] = dict(method="fm", net=sz.net, batch=sz.big_batch, precision=b.env.precision,
                                       n=n_done, target=sz.n_50k, seconds=t.seconds, complete=n_done == sz.n_50k,
                                       img_per_s=n_done / t.seconds, status="ok")
        del parts
    except Exception as e:  # noqa: BLE001
        ctx.sec["one_step_50k"] = dict(status="error", error=_err(e))
    _free()
    ctx.save()


# =============================================================================== section 3: precision checks
def _tf32(on):
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on


def _cos(a, b):
    a, b = a.double().flatten(1), b.double().flatten(1)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-300)


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300)).item()


@torch.no_grad()
def check_scm_tangent(ctx):
    """scm.tangent (the JVP pass of cm_step_loss) with TF32 allowed against strict fp32, eval mode; then in train
    mode the dropout mask replay: F of the bf16 gradient pass against F- of the fp32 JVP pass with the RNG forked
    as cm_step_loss does, and without the fork (a control whose masks differ)."""
    import scm
    sz, dev = ctx.sz, ctx.dev
    b = tp.build(_args(sz, ctx.device, "sct", sz.lo))
    net, cfg, B = standin_weights(b.net).eval(), scm.Config(), sz.tangent_batch
    gen = torch.Generator(device=dev).manual_seed(1)
    x0 = torch.rand(B, *b.shape, device=dev, generator=gen) * 2 - 1
    z = cfg.sigma_d * torch.randn(B, *b.shape, device=dev, generator=gen)
    torch.manual_seed(1)
    t = scm.sample_t(B, cfg.P_mean, cfg.P_std, cfg.sigma_d, dev)
    x_t, dxdt = scm.interpolate(x0, z, t), scm.velocity(x0, z, t)
    g = {}
    for mode in ("tf32", "fp32"):  # as cm_step_loss: no_grad, autocast off; strict_fp32 also turns TF32 off
        _tf32(True)
        with common.strict_fp32(dev) if mode == "fp32" else torch.autocast(dev.type, enabled=False):
            g[mode] = scm.normalise(scm.tangent(net, x_t, t, dxdt, 1.0, cfg.sigma_d)[1], cfg.c, cfg.tangent_norm)
    cos = _cos(g["tf32"], g["fp32"])
    out = dict(batch=B, t_min=t.min().item(), t_max=t.max().item(), cos_min=cos.min().item(),
               cos_mean=cos.mean().item(), rel_diff=_rel(g["tf32"], g["fp32"]), threshold=0.999,
               passed=bool(cos.min().item() > 0.999), net=sz.net, weights="stand-in (Xavier everywhere)",
               tf32_available=dev.type == "cuda")
    # dropout replay (train mode, dropout 0.2 of the sct cifar10 net): F of the gradient pass (the run's precision)
    # against F- of the fp32 JVP pass, with the RNG forked as cm_step_loss does and without (control: other masks);
    # the precision noise alone is the same comparison in eval mode (no dropout). On CUDA the dropout kernel's
    # random stream could depend on the tensor's dtype; the same mask leaves only the precision noise.
    _tf32(b.env.precision != "fp32")
    devices = [dev] if dev.type == "cuda" else []
    rel = {}
    for case in ("noise", "replayed", "control"):
        net.train(case != "noise")
        torch.manual_seed(2)
        with torch.autocast(dev.type, enabled=False):
            with torch.random.fork_rng(devices=devices) if case != "control" else contextlib.nullcontext():
                F_minus, _ = scm.jvp_F(net, x_t, t, dxdt, cfg.sigma_d)
        with common.autocast(b.env):
            F = net(x_t / cfg.sigma_d, t)
        rel[case] = _rel(F.float(), F_minus.float())
    out.update(dropout_rel_diff_replayed=rel["replayed"], dropout_rel_diff_control=rel["control"],
               dropout_rel_diff_noise=rel["noise"], dropout_pass_precision=b.env.precision,
               dropout_same_mask=bool(rel["replayed"] <= 2 * rel["noise"] + 1e-3 < rel["control"]))
    return out


@torch.no_grad()
def check_imm_embedding(ctx):
    """IMM's time path with k = 15, r = r_of(s, t) drawn as the training step draws it (float64, then fp32): the
    difference Delta = e(t, s) - e(r, s) of the cifar10 net's embedding and the first block's affine of it, as the
    network computes them (time_fp64: float64, as lumalabs/imm's unets.py) against the same weights on an fp32 time
    path: strict fp32 (TF32 off) for the embedding; for the affine TF32 (the tf32 preset's blocks without time_fp64)
    and bf16 autocast."""
    import imm
    sz, dev = ctx.sz, ctx.dev
    b = tp.build(_args(sz, ctx.device, "imm", sz.lo))
    net, cfg, B = b.net.eval(), imm.Config(k=15), sz.tangent_batch
    net32 = copy.deepcopy(net)
    net32.config = {**net.config, "time_fp64": False}
    x = torch.zeros(B, *b.shape, device=dev)
    blk = next(m for m in net.modules() if isinstance(m, common.Block))
    rows = []
    g = torch.Generator(device=dev).manual_seed(3)
    for t_val in (cfg.T, 0.9, 0.5):
        t64 = torch.full((B,), t_val, dtype=torch.float64, device=dev)
        u = torch.rand(B, dtype=torch.float64, device=dev, generator=g)
        s64 = torch.minimum(cfg.t_min + (t64 - cfg.t_min) * u, t64 - 1e-6)
        r64 = imm.r_of(s64, t64, imm.delta_eta(cfg))
        t, s, r = t64.float(), s64.float(), r64.float()
        e64, e32 = net.embed(x, t, s), net32.embed(x, t, s)  # (the embedding sets its own precision)
        d64, d32 = e64 - net.embed(x, r, s), e32 - net32.embed(x, r, s)
        a = {"fp64": common._linear(blk.affine, e64) - common._linear(blk.affine, e64 - d64)}
        _tf32(True)
        with torch.autocast(dev.type, enabled=False):
            a["tf32"] = blk.affine(e32) - blk.affine(e32 - d32)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            a["bf16"] = (blk.affine(e32) - blk.affine(e32 - d32)).float()
        rows.append(dict(t=t_val, t_minus_r_fp32=(t - r).mean().item(),
                         zero_gap_fraction=(t == r).float().mean().item(),
                         delta_over_e=(d64.norm(dim=1) / e64.norm(dim=1)).mean().item(),
                         fp32_rel_err=_rel(d32, d64), fp32_cos_min=_cos(d32, d64).min().item(),
                         tf32_affine_rel_err=_rel(a["tf32"], a["fp64"]),
                         tf32_affine_cos_min=_cos(a["tf32"], a["fp64"]).min().item(),
                         bf16_affine_rel_err=_rel(a["bf16"], a["fp64"]),
                         bf16_affine_cos_min=_cos(a["bf16"], a["fp64"]).min().item()))
    return dict(batch=B, k=cfg.k, time_scale=net.config["time_scale"], time_fp64=net.config["time_fp64"], rows=rows,
                net=sz.net, weights="fresh (the embedding layers are Xavier-initialised)",
                tf32_available=dev.type == "cuda")


@torch.no_grad()
def bf16_vs_fp32(sample, net, z, env):
    """One-step samples sample(net, z, 1) (throughput.py's samplers) under bf16 autocast (TF32 allowed) against strict
    fp32 (autocast and TF32 off): RMS and max difference in uint8 levels, the samples' RMS about mid-grey and the
    share clipped by the uint8 conversion (a saturated sample would hide differences)."""
    dev = z.device
    tp._ENV["env"] = dataclasses.replace(env, precision="bf16")
    _tf32(True)
    with common.autocast(tp._ENV["env"]):
        lo = sample(net, z, 1).float()
    tp._ENV["env"] = dataclasses.replace(env, precision="fp32")
    with common.strict_fp32(dev):
        hi = sample(net, z, 1).float()
    u_lo, u_hi = common.to_uint8(lo).float(), common.to_uint8(hi).float()
    return dict(batch=len(z), rms_levels=(u_lo - u_hi).square().mean().sqrt().item(),
                max_levels=(u_lo - u_hi).abs().max().item(),
                sample_rms_levels=(u_hi - 127.5).square().mean().sqrt().item(),
                clipped_fraction=((hi < -1) | (hi > 1)).float().mean().item())


def check_bf16_samples(ctx):
    """bf16_vs_fp32 for each sampler family on the cifar10 networks with stand-in weights."""
    sz, dev, out = ctx.sz, ctx.dev, []
    for method in SAMPLERS:
        try:
            b = tp.build(_args(sz, ctx.device, method, "bf16"))
            z = torch.randn(sz.sample_check_batch, *b.shape, device=dev, generator=b.gen)
            out.append(dict(method=method, status="ok", net=sz.net,
                            **bf16_vs_fp32(b.meth.sample, standin_weights(b.net).eval(), z, b.env)))
        except Exception as e:  # noqa: BLE001
            out.append(dict(method=method, status="error", error=_err(e)))
        _free()
    return out


def section_precision(ctx):
    for key, fn in (("scm_tangent", check_scm_tangent), ("imm_embedding", check_imm_embedding),
                    ("bf16_samples", check_bf16_samples)):
        if ctx.clock.left("precision") <= (0 if ctx.quick else 2):
            ctx.sec[key] = dict(status="skipped", note="out of section time")
            continue
        try:
            ctx.sec[key] = fn(ctx)
        except Exception as e:  # noqa: BLE001
            ctx.sec[key] = dict(status="error", error=_err(e))
        _free()
        ctx.save()


# =============================================================================== section 4: Fashion-MNIST
def fashion_root(ctx):
    """A scratch data root holding the carried classifier and statistics, the Debian files unpacked into it."""
    import fashion as fb
    root = os.path.join(ctx.work, "fashion-root")
    os.makedirs(root, exist_ok=True)
    cached = os.path.join(ctx.carry, "data")
    if os.path.isdir(cached):
        shutil.copytree(cached, root, dirs_exist_ok=True)
    src = os.path.join(ctx.carry, "fashion-mnist")
    try:
        raw = fb.prepare_data(root, src if os.path.isdir(src) else ctx.source)
    except fb.Fail as e:  # (first what a device run lacks: the carry folder)
        if os.path.isdir(src):
            raise
        raise fb.Fail(f"{src}, which --prepare fills, is not on this machine (carry it), and the fall-back failed: "
                      f"{e}") from None
    return root, raw


def calibrate(ctx, sz):
    """Steps per second of the 1-RF, IMM and sCT training steps on the `small` net at the fashion batch, in the
    `small` presets' precision (throughput.build + timed; the loop's data, EMA and logging are not in it)."""
    import imm, rectified_flow, scm
    rates = {}
    for key, method, mod in (("fm", "fm", rectified_flow), ("imm", "imm", imm), ("sct", "sct", scm)):
        p = mod.PRESETS["small"].get("precision") or "bf16"
        b = tp.build(_args(sz, ctx.device, method, p, net=sz.f_net, batch=sz.f_batch))
        b.model.train()
        for _ in range(3):
            b.train_step()
        n, sec, _ = tp.timed(b.train_step, 200, ctx.dev, 1.0)
        rates[key] = n / sec
        del b
        _free()
    return rates


@contextlib.contextmanager
def smoke_evaluation(fb, quick):
    """--quick: the methods' end-of-training evaluation on 2 samples instead of fashion.py's 16 (a later --eval_n
    wins), restored on exit; the full run keeps fashion.py's command lines as they are."""
    orig = fb.common_argv
    if quick:
        fb.common_argv = lambda a, iters, net: [*orig(a, iters, net), "--eval_n", "2"]
    try:
        yield
    finally:
        fb.common_argv = orig


def section_fashion(ctx):
    import fashion as fb
    with smoke_evaluation(fb, ctx.quick):
        _section_fashion(ctx, fb)


def _section_fashion(ctx, fb):
    sz, sec, clock = ctx.sz, ctx.sec, ctx.clock
    t0 = time.time()
    root, raw = fashion_root(ctx)
    recipe = dict(fb.CLS_RECIPE, **QUICK_CLASSIFIER) if ctx.quick else fb.CLS_RECIPE
    det_path, cls = fb.classifier(root, raw, torch.device("cpu") if ctx.quick else ctx.dev, recipe)
    env = common.setup(ctx.device, 0, "fp32")
    det = common.load_detector(det_path, env)
    ref = common.reference_stats(common.load_data("fashion_mnist", root, env, 0, False), det, env, root)
    test_u8, _ = fb.load_split(raw, "t10k")
    pick = torch.randperm(len(test_u8), generator=torch.Generator().manual_seed(0))[:sz.n_fd]
    floor = fb.fd_of_images(test_u8[pick].to(env.device), det, ref)
    sec.update(classifier=dict(cls, file=os.path.basename(det_path)), fd_floor=floor, n_fd=sz.n_fd, net=sz.f_net,
               batch=sz.f_batch, ref_steps=list(sz.ref_steps), records=[], setup_s=time.time() - t0)
    rates = None if ctx.quick else calibrate(ctx, sz)
    sec["calibration_steps_per_s"] = rates
    ctx.save()
    work = os.path.join(ctx.work, "fashion")
    os.makedirs(work, exist_ok=True)
    a = types.SimpleNamespace(work=work, budget=sz.f_budget, batch=sz.f_batch, root=root, seed=0,
                              device=ctx.device, net=sz.f_net, n_fd=sz.n_fd, fd_seed=10_000,
                              ref_steps=sz.ref_steps[-1], n_grid=sz.n_grid)
    # planned training seconds = the bare step's rate (calibrate) x eff, eff = the command line's share of useful
    # step time (start-up, data, EMA, logging, final evaluation), assumed 0.75 and corrected after each run
    eff, rows = 0.75, []
    for i, name in enumerate(FASHION):
        left = clock.left("fashion") - sum(SCORE_S[n] for n in FASHION[i:])
        share = left / (len(FASHION) - i)
        if share < (0 if ctx.quick else 10):
            sec["records"].append(dict(method=name, status="skipped", note=f"out of section time ({left:.0f} s)"))
            continue
        train_s = None if ctx.quick else min(sz.f_max_s, share)
        try:
            if not ctx.quick:
                per_step = {"1-RF": 1 / rates["fm"], "IMM": 1 / rates["imm"],
                            "sCT": 0.5 / rates["fm"] + 0.5 / rates["sct"]}[name]  # teacher and student halves
                a.budget = max(2, int(train_s * eff / per_step)) * sz.f_batch
            teachers = {"trig": fb.run_teacher("trig", a)} if name == "sCT" else {}
            rec = fb.run_method(name, a, det_path, teachers)
            if name == "1-RF":
                extra = os.path.join(work, name, "fd_more.jsonl")
                with open(os.path.join(work, name, "log.txt"), "a") as log:
                    fb._cli("rectified_flow", ["fid", "--ckpt", os.path.join(work, name, "ckpt.pt"), "--steps",
                                               ",".join(map(str, sz.ref_steps[:-1])), "--n", str(sz.n_fd), "--batch",
                                               str(min(sz.n_fd, 500)), "--seed", str(a.fd_seed), "--fid_detector",
                                               det_path, "--root", root, "--device", ctx.device, "--out", extra,
                                               "--solver", "euler"], log)
                with open(extra) as f:
                    rec["fd_reference"].update({int(r["steps"]): r["fid"] for r in map(json.loads, f)})
            rec = json.loads(json.dumps(rec))
            rec.update(status="ok", planned_train_s=train_s)
            try:  # bf16 vs fp32 one-step samples of the trained network (its EMA weights)
                ck = common.load_checkpoint(os.path.join(work, name, "ckpt.pt"))
                net = common.build_net(ck["net"])
                common.load_state_strict(net, ck["ema"])
                shape = (ck["net"]["in_channels"], ck["net"]["img_resolution"], ck["net"]["img_resolution"])
                z = torch.randn(sz.sample_check_batch, *shape, device=ctx.dev,
                                generator=torch.Generator(ctx.dev).manual_seed(5))
                tp._ENV.update(env=env, state={})
                rec["bf16_vs_fp32"] = bf16_vs_fp32(tp.METHODS[FASHION_SAMPLER[name]].sample,
                                                   net.to(ctx.dev).eval(), z, env)
            except Exception as e:  # noqa: BLE001
                rec["bf16_vs_fp32"] = dict(error=_err(e))
            if train_s and rec["wall_s"] > 0:
                eff *= min(2.0, max(0.5, train_s / rec["wall_s"]))
            rows.append(rec)
        except Exception as e:  # noqa: BLE001
            rec = dict(method=name, status="error", error=_err(e))
        sec["records"].append(rec)
        _free()
        ctx.save()
    if rows:
        try:
            fb.plot(ctx.stem + "_fashion.png", rows, test_u8[pick[:sz.n_grid * len(fb.STEPS)]], work, sz.n_grid)
            sec["figure"] = os.path.basename(ctx.stem) + "_fashion.png"
        except Exception as e:  # noqa: BLE001
            sec["figure_error"] = _err(e)
    ctx.save()


# =============================================================================== section 5: CUDA paths (second call)
# The toy run of each method file (2-D points, small MLPs, the sizes of tests/test_robustness.py), 4 steps unstopped
# against 2 steps then resumed to 4: every tensor of the two checkpoints (weights, EMA, optimiser, RNG states) compared
# bitwise, CUDA's RNG restore, the Guard and the GradScaler on the device. The CPU suite shows it on the CPU (fp16
# through CPU autocast there); this is the CUDA half.
_EVAL = ["--eval_n", "16", "--eval_steps", "1"]
RESUME_RUNS = dict(
    imm=["--batch", "16", *_EVAL],
    scm=["--mode", "diffusion", "--batch", "16", "--width", "16", "--depth", "1", "--heun_steps", "1",
         "--lr_schedule", "const", "--eval_n", "16"],
    flow_map=["--batch", "16", "--width", "16", "--depth", "1", "--lr_schedule", "const", *_EVAL],
    rectified_flow=["--stage", "1rf", "--batch", "16", "--straight_k", "2", "--lr_schedule", "const", *_EVAL],
    distributional=["--teacher_iters", "2", "--teacher_batch", "16", "--batch", "16", "--eval_teacher_steps", "0",
                    *_EVAL])
RESUME_PRECISION = dict(distributional="bf16")  # fp16 with a GradScaler elsewhere; GDD refuses fp16 (no scaling)
# Each throughput method's `cifar10` preset batch (tests/test_gpu_check.py checks them against the presets): the
# memory of one training step at it, halved until it fits; the --accum a one-GPU run needs follows.
MEM_BATCH = dict(fm=512, imm=4096, sct=512, scd=512, lsd=512, psd=512, meanflow=1024, lmd=512, gdd=256, gdd_i=256,
                 **{"2rf": 512, "2rf_lpips": 512})
MEM_MIN_BATCH = 32


def _tensors(o, path=""):
    """{path: tensor} of every tensor in a checkpoint (nested dicts, lists and tuples)."""
    if torch.is_tensor(o):
        return {path: o}
    items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, (list, tuple)) else ()
    return {k: v for key, x in items for k, v in _tensors(x, f"{path}/{key}").items()}


def check_resume(ctx, name):
    """One method file's toy run on the device: 4 steps against 2 + resumed 2 (module comment above)."""
    import importlib
    mod = importlib.import_module(name)
    precision = "fp32" if ctx.quick else RESUME_PRECISION.get(name, "fp16")
    root = os.path.join(ctx.work, "resume", name)
    shutil.rmtree(root, ignore_errors=True)
    base = [*RESUME_RUNS[name], "--precision", precision, "--device", ctx.device]
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' own lines (the log keeps the record below)
        for out, iters in (("a", 4), ("b", 2), ("b", 4)):
            mod.main([*base, "--iters", str(iters), "--out", os.path.join(root, out)])
    a, b = (torch.load(os.path.join(root, d, "ckpt.pt"), map_location="cpu", weights_only=True) for d in "ab")
    ta, tb = _tensors(a), _tensors(b)
    differ = sorted(k for k in ta if k in tb and not (ta[k].shape == tb[k].shape and torch.equal(ta[k], tb[k])))
    missing = sorted(set(ta) ^ set(tb))
    return dict(method=name, status="ok", precision=precision, steps=[a.get("step"), b.get("step")],
                tensors=len(ta), differ=len(differ) + len(missing), first_differ=(differ + missing)[:5],
                scaler_equal=a.get("scaler") == b.get("scaler"), loss_scale=(a.get("scaler") or {}).get("scale"),
                bitwise=not differ and not missing and a.get("scaler") == b.get("scaler"), wall_s=time.time() - t0)


def check_torchrun(ctx, timeout):
    """imm.py's toy run under torchrun, one process on this device: NCCL bound to it (gloo on a CPU), common's
    wait_for_main group (gloo) beside it, DDP, rank 0's checkpoint, the groups' teardown; killed after `timeout` s."""
    out = os.path.join(ctx.work, "torchrun")
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           os.path.join(REPO, "imm.py"), *RESUME_RUNS["imm"], "--iters", "2", "--device", ctx.device, "--out", out]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                             "MASTER_ADDR", "MASTER_PORT")}
    t0, rec = time.time(), dict(method="imm", status="error")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            start_new_session=True, env={**env, "OMP_NUM_THREADS": "1"})  # (else torchrun's warning)
    try:
        log, err = proc.communicate(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:  # (a hang at a collective). SIGTERM: torchrun stops its worker, which runs in a
        proc.terminate()  # session of its own (a kill of the launcher's group alone left it running, GPU and all),
        with contextlib.suppress(subprocess.TimeoutExpired):  # then SIGKILLs it after 30 s
            proc.communicate(timeout=TORCHRUN_STOP_S)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait()
        return dict(rec, error=f"killed after {timeout:.0f} s (a hang?)", wall_s=time.time() - t0)
    path = os.path.join(out, "ckpt.pt")
    step = torch.load(path, map_location="cpu", weights_only=True)["step"] if os.path.exists(path) else None
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    rec.update(rc=proc.returncode, step=step, wall_s=time.time() - t0, stderr=lines[-5:],
               world=next((ln.split(" | ")[1] for ln in log.splitlines() if " | world " in ln), None))
    if proc.returncode == 0 and step == 2:
        return dict(rec, status="ok")
    why = next((ln for ln in lines if ln.startswith("error: ")), " | ".join(lines[-3:])[-300:])  # (torchrun's report
    return dict(rec, error=f"exit {proc.returncode}, checkpoint step {step}: {why}")  # of a failure follows it)


def _out_of_memory(e):
    """common._out_of_memory (the caching allocator's OutOfMemoryError, or a cuBLAS / cuDNN allocation failing when
    the caching allocator holds the rest), or any other message saying "out of memory"."""
    return common._out_of_memory(e) or "out of memory" in str(e)


def check_memory(ctx, method, left):
    """Peak memory of one training step of `method` (throughput.py's measure, the cifar10 network and maths, its
    paper precision) at its preset batch, halved on running out of memory; -> the largest batch that fits."""
    batch = ctx.sz.batch if ctx.quick else MEM_BATCH[method]
    rec = dict(method=method, status="ok", preset_batch=MEM_BATCH[method], tries=[])
    while batch >= (1 if ctx.quick else MEM_MIN_BATCH):
        if left() <= 0:
            rec.update(status="skipped", note="out of section time")
            break
        argv = ["--method", method, "--net", ctx.sz.net, "--batch", str(batch), "--sample_batch", "16", "--iters", "1",
                "--warmup", "1", "--precision", "paper", "--device", ctx.device, "--lpips_res", str(ctx.sz.lpips_res)]
        r = None
        try:
            r = tp.measure(tp.parse(argv))
        except RuntimeError as e:  # (its frames let go when the block ends, before the memory is freed)
            if not _out_of_memory(e):
                raise
        if r is None:
            rec["tries"].append(dict(batch=batch, result="out of memory"))
            _free()
            batch //= 2
            continue
        rec["tries"].append(dict(batch=batch, result="fits", max_mem_gib=r["max_mem_gib"]))
        rec.update(fits_batch=batch, max_mem_gib=r["max_mem_gib"], precision=r["precision"],
                   accum=None if ctx.quick else math.ceil(MEM_BATCH[method] / batch))
        break
    else:
        rec.update(status="error", error=f"out of memory down to batch {1 if ctx.quick else MEM_MIN_BATCH}")
    _free()
    return rec


def _why(rec):
    """A record's error, else its note (a skipped one's 'out of section time')."""
    return rec.get("error") or rec.get("note", "")


def section_paths(ctx):
    sec = ctx.sec
    sec["resume"], sec["records"] = [], []
    for name in RESUME_RUNS:
        try:
            rec = dict(method=name, status="skipped", note="out of section time") \
                if ctx.clock.left("paths") <= (0 if ctx.quick else 5) else check_resume(ctx, name)
        except BaseException as e:  # noqa: BLE001  (a run's SystemExit, its error sentence included)
            if isinstance(e, KeyboardInterrupt):
                raise
            rec = dict(method=name, status="error", error=_err(e))
        sec["resume"].append(rec)
        print(f"  resume {name:15s} " + (f"{rec['precision']}: {'bitwise' if rec['bitwise'] else 'DIFFERS'} "
                                         f"({rec['differ']} of {rec['tensors']} tensors differ), {rec['wall_s']:.0f} s"
                                         if rec["status"] == "ok" else f"{rec['status']}: {_why(rec)}"),
              flush=True)
        _free()
        ctx.save()
    left = ctx.clock.left("paths")
    sec["torchrun"] = dict(method="imm", status="skipped", note="out of section time") if left <= (
        0 if ctx.quick else 20) else check_torchrun(ctx, min(TORCHRUN_S, left))
    t = sec["torchrun"]
    print("  torchrun imm.py, 1 process: " + (f"ok ({t['world']}), {t['wall_s']:.0f} s" if t["status"] == "ok" else
                                                f"{t['status']}: {_why(t)}"), flush=True)
    ctx.save()
    for method in MEM_BATCH if not ctx.quick else QUICK_METHODS:
        try:
            rec = check_memory(ctx, method, lambda: ctx.clock.left("paths"))
        except Exception as e:  # noqa: BLE001
            rec = dict(method=method, status="error", error=_err(e))
            _free()
        sec["records"].append(rec)
        need = "GPUs" if method.startswith("gdd") else "--accum"  # (distributional.py has no --accum)
        print(f"  memory {method:9s} " + (f"batch {rec['fits_batch']} of {rec['preset_batch']}: "
                                          f"{_fmt(rec['max_mem_gib'], '{:.1f}')} GiB, {need} {rec['accum']}"
                                          if "fits_batch" in rec else f"{rec['status']}: {_why(rec)}"),
              flush=True)
        ctx.save()


# =============================================================================== report
def _fmt(v, f="{:.3g}"):
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f.format(v)


def _kept(m, S):
    """' Kept from the run of DATE (commit `C`): a, b.' for the sections a --sections rerun kept, grouped by the run
    that measured each (main records it in each section: a chain of reruns keeps sections of several runs)."""
    runs = {}
    for s in m.get("kept_sections", {}).get("sections", []):
        runs.setdefault((S[s].get("run_date"), S[s].get("run_commit")), []).append(s)
    return "".join(f" Kept from the run of {d} (commit `{c}`): {', '.join(ss)}." for (d, c), ss in runs.items())


def markdown(rep):
    m, S = rep["meta"], rep["sections"]
    cuda = f"CUDA {m['cuda']}" if m.get("cuda") else "no CUDA device (CPU run)"  # (a CPU run records cuda None)
    L = [f"# GPU check: {m['device_name']} ({m['date']})", "",
         f"Written by `{m['command']}` (do not edit; regenerated from the JSON) · commit `{m['commit']}` · torch "
         f"{m['torch']} · {cuda} · {m['total_wall_s']:.0f} s of the planned {m['planned_total_s']} s."
         + _kept(m, S), "",
         "| section | planned s (deadline) | used s | status |", "| --- | --- | --- | --- |"]
    for s in SECTIONS:
        sec = S.get(s, {})
        L.append(f"| {s} | {m['plan_s'].get(s, '–')} ({m['deadlines_s'].get(s, '–')}) | "
                 f"{_fmt(sec.get('wall_s'), '{:.0f}')} | {sec.get('status', 'not run')} |")
    t = S.get("throughput", {})
    if t.get("records"):
        L += ["", f"## 1. Training throughput ({t.get('net', '')}, batch {t.get('batch', '')})", "",
              "One step of each method's own loss code, backward and optimiser step on a batch already on the device "
              f"(benchmarks/throughput.py's measure: {t.get('warmup')} warm-up steps, then "
              + (f"about {t['timed_s']:g} s of timed steps" if t.get("timed_s") else f"{t.get('iters_cap')} timed "
                 "steps") + ", the sampler likewise). Cost vs fm: the cost model (`fwd_per_step`) and the measured fm "
              "img/s / method img/s at the same precision and compile setting. Of peak: achieved training TFLOP/s "
              "over the dense peak of that precision. Optimiser step: the step alone on one backward's gradients, "
              "plain and through common.Guard as the loops take it (on CUDA the Guard puts a skipped step back on the "
              "device).", "",
              "| method | precision | compile | train img/s | timed steps | TFLOP/s | of peak | cost vs fm, model | "
              "measured | sample img/s 1 NFE | 2 NFE | peak mem GiB | warm-up s | optimiser step ms, plain / Guard | "
              "note |",
              "|" + "---|" * 15]
        for r in t["records"]:
            if r.get("status") == "ok":
                L.append(f"| {r['method']} | {r['precision']} | {r['compile']} | "
                         f"{_fmt(r['train_img_per_s'], '{:,.0f}')} | {r['iters']} | {_fmt(r['train_tflops'])} | "
                         f"{_fmt(r.get('peak_fraction'), '{:.1%}')} | "
                         f"{_fmt(r['fwd_per_step'], '{:.2f}')} | {_fmt(r.get('vs_fm'), '{:.2f}')} | "
                         f"{_fmt(r['sample_img_per_s_1step'], '{:,.0f}')} | "
                         f"{_fmt(r['sample_img_per_s_2step'], '{:,.0f}')}"
                         f" | {_fmt(r.get('max_mem_gib'), '{:.1f}')} | {_fmt(r['warmup_s'], '{:.1f}')} | "
                         f"{_fmt(r.get('opt_step_ms'), '{:.2f}')} / {_fmt(r.get('guard_step_ms'), '{:.2f}')} | "
                         f"{r.get('compile_backend', '')} |")
            else:
                L.append(f"| {r['method']} | {r['precision']} | {r['compile']} | " + "– | " * 11 +
                         f"{r['status']}: {r.get('error') or r.get('note', '')} |")
    s2 = S.get("sampling", {})
    if s2.get("records") or s2.get("one_step_50k"):
        L += ["", "## 2. Sampling", "", "The method's own sampler (throughput.py's) under no_grad in eval mode.", "",
              "| sampler | net | batch | precision | img/s 1 NFE | img/s 2 NFE | note |", "|" + "---|" * 7]
        for r in s2.get("records", []):
            L.append(f"| {r['method']} | {r.get('net', '–')} | {r.get('batch', '–')} | {r.get('precision', '–')} "
                     f"| {_fmt(r.get('img_per_s_1nfe'), '{:,.0f}')} | {_fmt(r.get('img_per_s_2nfe'), '{:,.0f}')} | "
                     f"{'' if r['status'] == 'ok' else r['status'] + ': ' + (r.get('error') or r.get('note', ''))} |")
        o = s2.get("one_step_50k", {})
        if o.get("status") == "ok":
            L += ["", f"{o['n']:,} one-step samples of the 1-RF ({o['net']}, batch {o['batch']}, {o['precision']}, "
                      f"uint8 on the host): {o['seconds']:.1f} s ({o['img_per_s']:,.0f} img/s)"
                      + ("" if o["complete"] else f", stopped at the deadline before {o['target']:,}") + "."]
    s3 = S.get("precision", {})
    if any(k in s3 for k in ("scm_tangent", "imm_embedding", "bf16_samples")):
        L += ["", "## 3. Precision checks", ""]
        g = s3.get("scm_tangent", {})
        if "cos_min" in g:
            L += [f"- sCM tangent g (scm.tangent, {g['net']}, {g['weights']}, batch {g['batch']}, t in "
                  f"[{g['t_min']:.3f}, {g['t_max']:.3f}]): TF32 against strict fp32, cosine similarity min "
                  f"{g['cos_min']:.6f}, mean {g['cos_mean']:.6f}, relative difference {g['rel_diff']:.2e} -> "
                  f"{'PASS' if g['passed'] else 'FAIL'} (> {g['threshold']})"
                  + ("" if g["tf32_available"] else "; no TF32 on this device, so equal by construction") + ".",
                  f"- Dropout mask replay (train mode): F of the {g['dropout_pass_precision']} gradient pass against "
                  f"F- of the fp32 JVP pass, relative difference {g['dropout_rel_diff_replayed']:.3g} with the RNG "
                  f"replayed, {g['dropout_rel_diff_control']:.3g} without (control), "
                  f"{g['dropout_rel_diff_noise']:.3g} without dropout (the precision alone) -> "
                  f"{'same mask' if g['dropout_same_mask'] else 'MASKS DIFFER'}."]
        elif g:
            L.append(f"- sCM tangent: {g.get('status')}: {g.get('error') or g.get('note')}")
        e = s3.get("imm_embedding", {})
        if "rows" in e:
            L += ["", f"IMM time path ({e['net']}, time_scale {e['time_scale']:g}, k = {e['k']}, batch "
                      f"{e['batch']}): Delta = e(t, s) - e(r, s) and the first block's affine of Delta as the network "
                      "computes them (float64, lumalabs/imm's unets.py) against an fp32 time path: strict fp32 for "
                      "the embedding, TF32 and bf16 autocast for the affine.", "",
                  "| t | t - r (fp32) | share t = r | ‖Δ‖/‖e‖ | fp32 Δ rel. err | fp32 Δ cos min | "
                  "TF32 affine rel. err | TF32 affine cos min | bf16 affine rel. err | bf16 affine cos min |",
                  "|" + "---|" * 10]
            for r in e["rows"]:
                L.append(f"| {r['t']:g} | {r['t_minus_r_fp32']:.3g} | {r['zero_gap_fraction']:.2f} | "
                         f"{r['delta_over_e']:.3g} | {r['fp32_rel_err']:.3g} | {_fmt(r['fp32_cos_min'], '{:.6f}')} | "
                         f"{r['tf32_affine_rel_err']:.3g} | {_fmt(r['tf32_affine_cos_min'], '{:.6f}')} | "
                         f"{r['bf16_affine_rel_err']:.3g} | {_fmt(r['bf16_affine_cos_min'], '{:.6f}')} |")
        elif e:
            L.append(f"- IMM embedding: {e.get('status')}: {e.get('error') or e.get('note')}")
        bs = s3.get("bf16_samples")
        if isinstance(bs, list):
            L += ["", "One-step samples, bf16 autocast against strict fp32 (same noise, stand-in weights):", "",
                  "| sampler | batch | RMS diff (uint8 levels) | max diff | sample RMS about 127.5 | clipped | note |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
            for r in bs:
                L.append(f"| {r['method']} | {r.get('batch', '–')} | {_fmt(r.get('rms_levels'), '{:.3f}')} | "
                         f"{_fmt(r.get('max_levels'), '{:.0f}')} | {_fmt(r.get('sample_rms_levels'), '{:.1f}')} | "
                         f"{_fmt(r.get('clipped_fraction'), '{:.1%}')} | "
                         f"{'' if r['status'] == 'ok' else r['status'] + ': ' + r.get('error', '')} |")
        elif bs:
            L.append(f"- bf16 samples: {bs.get('status')}: {bs.get('error') or bs.get('note')}")
    f4 = S.get("fashion", {})
    if f4.get("records") is not None and "fd_floor" in f4:
        refs = f4.get("ref_steps", [])
        L += ["", f"## 4. Fashion-MNIST ({f4['net']} U-Net, batch {f4['batch']})", "",
              f"Each method's own command line (`--preset small --data fashion_mnist`, benchmarks/fashion.py's "
              f"overrides), training time as planned from a step-time calibration. FD-classifier: Fréchet distance of "
              f"{f4['n_fd']:,} samples to the training set in the {f4['classifier'].get('features', 64)}-d features "
              f"of the cached classifier (t10k accuracy {f4['classifier'].get('test_accuracy', float('nan')):.4f}); "
              f"{f4['n_fd']:,} real t10k images score {f4['fd_floor']:.3f} (the floor).", "",
              "| method | iterations | examples (teacher) | wall s | FD 1 step | FD 2 steps | " +
              " | ".join(f"FD {k} Euler steps" for k in refs) + " | bf16 vs fp32 1 step, RMS levels | note |",
              "|" + "---|" * (8 + len(refs))]
        for r in f4["records"]:
            if r.get("status") == "ok":
                ex = f"{r['examples']:,}" + (f" ({r['teacher_examples']:,})" if r.get("teacher_examples") else "")
                fr = r.get("fd_reference", {})
                bf = r.get("bf16_vs_fp32", {})
                L.append(f"| {r['method']} | {r['iters']:,} | {ex} | {r['wall_s']:.0f} | {_fmt(r['fd'].get('1'))} | "
                         f"{_fmt(r['fd'].get('2'))} | " + " | ".join(_fmt(fr.get(str(k))) for k in refs) +
                         f" | {_fmt(bf.get('rms_levels'), '{:.3f}')} | {bf.get('error', '')} |")
            else:
                L.append(f"| {r['method']} | " + "– | " * (6 + len(refs)) +
                         f"{r['status']}: {r.get('error') or r.get('note', '')} |")
        if f4.get("figure"):
            L += ["", f"![samples]({f4['figure']})"]
    p5 = S.get("paths", {})
    if p5.get("resume") or p5.get("records") or p5.get("torchrun"):
        L += ["", "## 5. CUDA paths", "",
              "Exact resume on the device: each method file's toy run, 4 steps against 2 steps then resumed to 4, "
              "every tensor of the two checkpoints compared (weights, EMA, optimiser, RNG states) and the loss "
              "scaler's state.", "",
              "| method file | precision | tensors | differ | loss scaler equal (scale) | result | s |",
              "|" + "---|" * 7]
        for r in p5.get("resume", []):
            if r.get("status") != "ok":
                L.append(f"| {r['method']} | " + "– | " * 4 + f"{r['status']}: {r.get('error') or r.get('note', '')} "
                         "| – |")
                continue
            res = "bitwise" if r["bitwise"] else "DIFFERS: " + ", ".join(r["first_differ"])
            L.append(f"| {r['method']} | {r['precision']} | {r['tensors']} | {r['differ']} | {r['scaler_equal']} "
                     f"({_fmt(r['loss_scale'], '{:g}')}) | {res} | {r['wall_s']:.0f} |")
        if t := p5.get("torchrun"):
            said = f"; stderr: {' | '.join(t['stderr'])}" if t.get("stderr") else ""
            res = f"ok ({t['world']}, {t['wall_s']:.0f} s{said})." if t["status"] == "ok" else \
                f"{t['status']}: {_why(t)}."
            L += ["", "`torchrun --standalone --nproc_per_node=1 imm.py` (toy, 2 steps; NCCL bound to the device, "
                      "common's gloo group for rank 0's downloads, DDP, checkpoint, teardown): " + res]
        L += ["", "Peak memory of one training step at each method's `cifar10` preset batch (throughput.py's step, "
                  "the method's paper precision), halved until it fits on this device; --accum is what a one-GPU run "
                  "of the preset needs (distributional.py has no --accum: for gdd/gdd_i, the GPUs its batch needs).",
              "", "| method | preset batch | fits | peak GiB | --accum (gdd: GPUs) | tried |", "|" + "---|" * 6]
        for r in p5.get("records", []):
            tried = ", ".join(f"{t['batch']}: {t['result']}" for t in r.get("tries", []))
            L.append(f"| {r['method']} | {r.get('preset_batch', '–')} | {r.get('fits_batch', '–')} | "
                     f"{_fmt(r.get('max_mem_gib'), '{:.1f}')} | {r.get('accum', '–')} | {tried}"
                     + ("" if r.get("status") == "ok" else f" ({r['status']}: {r.get('error') or r.get('note', '')})")
                     + " |")
    return "\n".join(L) + "\n"


def report(rep):
    """markdown(rep), or in its place the sentence that says why it could not be made (a report bug must not cost the
    measurements, nor end the run after them)."""
    try:
        return markdown(rep)
    except Exception as e:  # noqa: BLE001
        return f"# GPU check\n\nThe tables could not be written ({_err(e)}); every number is in the JSON.\n"


def plot_throughput(path, recs):
    """Bar chart: training img/s per method (eager, lowest precision and paper precision) with the measured and
    modelled cost vs fm printed above the bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in recs if r.get("status") == "ok" and not r["compile"]]
    if not ok:
        return False
    methods = list(dict.fromkeys(r["method"] for r in ok))
    precs = list(dict.fromkeys(r["precision"] for r in ok))
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(methods) + 2), 3.6))
    w = 0.8 / len(precs)
    for j, p in enumerate(precs):
        labelled = False
        for i, m in enumerate(methods):
            r = next((r for r in ok if r["method"] == m and r["precision"] == p), None)
            if r:
                ax.bar(i + j * w, r["train_img_per_s"], w, color=f"C{j}", label=None if labelled else p)
                labelled = True
                ax.text(i + j * w, r["train_img_per_s"], f"{_fmt(r.get('vs_fm'), '{:.1f}')}/{r['fwd_per_step']:.1f}",
                        ha="center", va="bottom", fontsize=6)
    ax.set_xticks([i + 0.4 - w / 2 for i in range(len(methods))], methods, fontsize=8)
    ax.set_ylabel("training img/s")
    ax.set_title("training throughput (labels: cost vs fm, measured / model)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


class Context:
    def __init__(self, a):
        self.quick, self.device, self.carry, self.source = a.quick, a.device, a.carry, a.source
        self.dev = torch.device(a.device)
        self.sz = sizes(a.quick)
        self.work = a.work
        self.results = a.results
        self.sec = None
        self.rep = None
        self.stem = None
        self.clock = None

    def save(self):
        """Rewrite the JSON, then the Markdown (each atomically) after every measurement; a Markdown that cannot
        be made says why in its place (report), the JSON stands (a value JSON has no type for is written as a number
        or its str)."""
        self.rep["meta"]["total_wall_s"] = self.clock.now()
        for p, text in ((self.stem + ".json", json.dumps(self.rep, indent=1, default=_plain, skipkeys=True) + "\n"),
                        (self.stem + ".md", report(self.rep))):
            with open(p + ".tmp", "w") as f:
                f.write(text)
            os.replace(p + ".tmp", p)


def device_slug(dev):
    if dev.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(dev).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "gpu"


# =============================================================================== --prepare
def prepare(a):
    """Fill the carry folder: the four Debian .gz files, the classifier and the reference statistics (CPU)."""
    import fashion as fb
    src = a.source
    missing = [f for f in fb.RAW_FILES if not os.path.isfile(os.path.join(src, f + ".gz"))]
    if missing:
        raise common.UserError(f"Fashion-MNIST is not in {src} (missing {', '.join(f + '.gz' for f in missing)}); "
                               f"install it with `apt-get install -y dataset-fashion-mnist` or pass --source DIR.")
    try:
        fb.check_data(src)  # before --carry and --work are made
    except fb.Fail as e:
        raise common.UserError(str(e)) from None
    dst = os.path.join(a.carry, "fashion-mnist")
    os.makedirs(dst, exist_ok=True)
    for f in fb.RAW_FILES:
        shutil.copyfile(os.path.join(src, f + ".gz"), os.path.join(dst, f + ".gz"))
    root = os.path.join(a.work, "prepare-root")
    raw = fb.prepare_data(root, dst)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    det_path, cls = fb.classifier(root, raw, torch.device("cpu"))
    env = common.setup("cpu", 0, "fp32")
    det = common.load_detector(det_path, env)
    common.reference_stats(common.load_data("fashion_mnist", root, env, 0, False), det, env, root)
    data = os.path.join(a.carry, "data")
    os.makedirs(os.path.join(data, "fid_refs"), exist_ok=True)
    for f in (fb.CLASSIFIER + ".pt", fb.CLASSIFIER + ".json"):
        shutil.copyfile(os.path.join(root, f), os.path.join(data, f))
    for f in glob.glob(os.path.join(root, "fid_refs", f"fashion_mnist-{det.key}.npz")):
        shutil.copyfile(f, os.path.join(data, "fid_refs", os.path.basename(f)))
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(a.carry) for f in fs)
    print(f"carry folder {os.path.relpath(a.carry, REPO)}: {size / 2 ** 20:.1f} MiB (classifier t10k accuracy "
          f"{cls['test_accuracy']:.4f}); the device command names it in its carry list.")


# =============================================================================== driver
def parse(argv):
    p = common.Parser(description=__doc__.split("\n")[0])  # argparse's errors as one `error:` sentence
    p.add_argument("--quick", action="store_true", help="the sections run at smoke size on the CPU (needs --results)")
    p.add_argument("--results", default=None, help=f"output folder (default {os.path.relpath(RESULTS, REPO)})")
    p.add_argument("--sections", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma list of {', '.join(SECTIONS)}, run in that order (default: all but paths)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"total planned seconds (default {STARTUP_S + sum(PLAN_S[s] for s in DEFAULT_SECTIONS)} "
                        f"and {STARTUP_S + PLAN_S['paths']} for paths; sections scaled)")
    p.add_argument("--device", default="auto")
    p.add_argument("--carry", default=CARRY, help="folder made by --prepare (default benchmarks/.carry)")
    p.add_argument("--source", default=DEBIAN, help="Debian's Fashion-MNIST folder (for --prepare)")
    p.add_argument("--work", default=None, help="scratch folder (default /tmp/gpu_check)")
    p.add_argument("--prepare", action="store_true", help="fill --carry here (CPU, ~5 min) and exit")
    p.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a._child is not None:  # internal: run_child's JSON job
        with contextlib.suppress(ValueError):
            a._child = json.loads(a._child)
        if not (isinstance(a._child, dict) and {"argv", "out"} <= a._child.keys()):
            raise common.UserError("--_child (internal) takes a JSON job with argv and out.")
    a.sections = [s for s in a.sections.split(",") if s]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad or not a.sections:
        raise common.UserError((f"unknown --sections {bad}" if bad else "--sections names none") +
                               f"; choose from {', '.join(SECTIONS)}.")
    a.sections = [s for s in SECTIONS if s in a.sections]
    if a.budget is not None and not (math.isfinite(a.budget) and a.budget > 0):
        raise common.UserError("--budget must be a positive, finite number of seconds.")
    a.work = os.path.abspath(a.work or os.path.join("/tmp", "gpu_check" + ("-quick" if a.quick else "")))
    a.carry = os.path.abspath(a.carry)
    common.check_device(a.device)
    cuda_ok = torch.cuda.is_available()
    if a.device == "auto":
        a.device = "cpu" if a.quick or not cuda_ok else "cuda"
    if a.device.startswith("cuda") and not cuda_ok:
        raise common.UserError(f"--device {a.device} was asked for but CUDA is not available here; use --quick.")
    folder = os.path.abspath(a.results or RESULTS)
    if not a.prepare and not a._child and (a.quick or not a.device.startswith("cuda")) and folder == RESULTS:
        raise common.UserError("benchmarks/results holds full GPU runs only; pass --results DIR for --quick or a "
                               "CPU run (a full run needs a GPU).")
    a.results = folder
    dirs = () if a._child else ((a.results, "--results"), (a.work, "--work"))  # (a child writes its job's out only)
    for d, what in dirs + (((a.carry, "--carry"),) if a.prepare else ()):
        common.check_dir(d, what)
    return a


def previous(path):
    """-> (sections, meta) of the JSON an earlier run wrote at `path`, or one sentence when it is not one."""
    prev = tp.read_json(path, ", whose other sections a --sections rerun keeps,", "run every section")
    if not (isinstance(prev, dict) and isinstance(prev.get("meta"), dict) and isinstance(prev.get("sections"), dict)
            and all(isinstance(v, dict) for v in prev["sections"].values())):
        raise common.UserError(f"'{path}', whose other sections a --sections rerun keeps, was not written by "
                               f"gpu_check.py (no meta and sections); move it away, or run every section.")
    return prev["sections"], prev["meta"]


def main(argv=None):
    a = parse(sys.argv[1:] if argv is None else argv)
    if a._child:
        return child_main(a._child)
    if a.prepare:
        return prepare(a)
    ctx = Context(a)
    if a.quick:
        torch.set_num_threads(1)
    os.makedirs(a.work, exist_ok=True)
    os.makedirs(a.results, exist_ok=True)
    plan, startup = dict(PLAN_S), STARTUP_S
    if a.budget:  # every share scaled, the start-up included
        scale = a.budget / (STARTUP_S + sum(plan[s] for s in a.sections))
        plan, startup = {s: round(v * scale, 3) for s, v in plan.items()}, STARTUP_S * scale
    ctx.clock = clock = Clock(plan, a.sections, startup)
    if ctx.dev.type == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=ctx.dev)
    name = tp.device_name(ctx.dev)
    ctx.stem = os.path.join(a.results, f"gpu_{device_slug(ctx.dev)}")
    old, old_meta = {}, {}
    if os.path.exists(ctx.stem + ".json") and not set(DEFAULT_SECTIONS) <= set(a.sections):
        old, old_meta = previous(ctx.stem + ".json")  # --sections reruns keep the other sections' results
    ctx.rep = rep = dict(meta=dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), device_name=name,
        torch=torch.__version__, cuda=torch.version.cuda if ctx.dev.type == "cuda" else None, commit=tp._git_commit(),
        command="python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
        quick=a.quick, sections_run=a.sections, plan_s=plan, startup_s=round(startup, 3),
        deadlines_s={s: round(v, 1) for s, v in clock.ends.items()}, planned_total_s=round(clock.total, 1),
        peak_tflops=next((pk for frag, pk in tp.PEAKS if frag in name), None),
        estimate_model=dict(utilisation=UTIL, compile_s=COMPILE_S, autotune_s=AUTOTUNE_S, autocast_off=AUTOCAST_OFF,
                            setup_extra_s=SETUP_EXTRA, fashion_score_s=SCORE_S),
        total_wall_s=0.0), sections={s: old[s] for s in SECTIONS if s in old and s not in a.sections})
    kept = old_meta.get("kept_sections") if isinstance(old_meta.get("kept_sections"), dict) else {}
    for s, sec in rep["sections"].items():  # each section keeps the run it came from: its own, or, in a file written
        src = kept if s in (kept.get("sections") or ()) else old_meta  # before sections carried it, the meta's kept
        for k in ("date", "commit", "torch"):  # sections' run (a rerun's) or the meta's
            sec.setdefault("run_" + k, src.get(k))
    if rep["sections"]:  # a --sections rerun: where the kept sections come from
        rep["meta"]["kept_sections"] = dict(sections=list(rep["sections"]), date=old_meta.get("date"),
                                            commit=old_meta.get("commit"), torch=old_meta.get("torch"))
    print(f"gpu_check on {name}: planned {clock.total:.0f} s "
          + " + ".join(f"{s} {plan[s]:g}" for s in a.sections) + f" (+ start-up {startup:g}); deadlines at "
          + ", ".join(f"{s} {clock.ends[s]:.0f} s" for s in a.sections), flush=True)
    if "fashion" in a.sections:  # what --prepare made, found here or not (without it: Debian's files, or an error)
        carry = rep["meta"]["carry"] = dict(
            folder=a.carry, data=os.path.isdir(os.path.join(a.carry, "fashion-mnist")),
            classifier=os.path.isfile(os.path.join(a.carry, "data", "fashion_classifier.pt")))
        print(f"carry folder {a.carry}: Fashion-MNIST {'found' if carry['data'] else f'MISSING (reads {a.source})'}, "
              f"classifier {'found' if carry['classifier'] else 'MISSING (trained in the fashion section)'}",
              flush=True)
    if "throughput" in a.sections:
        print("throughput plan (method, precision, compile, estimated s; * = stretch, only inside the deadline):")
        est = 0.0
        for m, p, c, core in throughput_plan(ctx.sz, a.quick):
            e = estimate_record_s(m, p, c) if not (c and m in NO_COMPILE) else 0.0
            est += e if core else 0.0
            print(f"  {m:9s} {p:4s} {str(c):5s} {e:5.0f}{'' if core else ' *'}")
        est += AUTOTUNE_S * 3
        print(f"  core items: {est:.0f} s estimated (+ {AUTOTUNE_S} s cuDNN autotuning per precision) of "
              f"{plan['throughput']:g} s planned", flush=True)
    runners = dict(throughput=section_throughput, sampling=section_sampling, precision=section_precision,
                   fashion=section_fashion, paths=section_paths)
    for s in a.sections:
        t0 = time.time()
        ctx.sec = rep["sections"][s] = dict(status="running", budget_s=plan[s], deadline_s=clock.ends[s],
                                            started_s=clock.now(), records=[], run_date=rep["meta"]["date"],
                                            run_commit=rep["meta"]["commit"], run_torch=rep["meta"]["torch"])
        if s == "throughput":
            ctx.sec.update(net=ctx.sz.net, batch=ctx.sz.batch, timed_s=ctx.sz.seconds, warmup=ctx.sz.warmup,
                           iters_cap=ctx.sz.iters)
        print(f"[{clock.now():5.0f} s] section {s} (deadline {clock.ends[s]:.0f} s)", flush=True)
        if clock.left(s) <= 0:
            ctx.sec.update(status="skipped: no time left", wall_s=0.0)
            ctx.save()
            continue
        try:
            runners[s](ctx)
            # the items: records, and the checks and results kept under their own keys (precision's, the 50k)
            recs = [r for v in ctx.sec.values() for r in (v if isinstance(v, list) else [v]) if isinstance(r, dict)]
            skipped = sum(r.get("status") == "skipped" for r in recs)
            failed = sum(r.get("status") == "error" for r in recs)
            ctx.sec["status"] = ("done" if not skipped else f"partial: {skipped} item(s) skipped at the deadline") \
                + (f", {failed} failed" if failed else "") + (" (past its deadline)" if clock.left(s) < 0 else "")
        except Exception as e:  # noqa: BLE001  (the next sections still run)
            ctx.sec["status"] = f"error: {_err(e)}"
        ctx.sec["wall_s"] = time.time() - t0
        _free()
        if s == "throughput":
            try:
                if plot_throughput(ctx.stem + "_throughput.png", ctx.sec["records"]):
                    ctx.sec["figure"] = os.path.basename(ctx.stem) + "_throughput.png"
            except Exception as e:  # noqa: BLE001
                ctx.sec["figure_error"] = _err(e)
        ctx.save()
    print("\n" + report(rep))
    print(f"wrote {ctx.stem}.json and .md ({clock.now():.0f} s)")
    return rep


if __name__ == "__main__":
    common.main_guard(main)
