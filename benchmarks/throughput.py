"""Training and sampling throughput of a `common.py` network (DESIGN "Benchmarks"; common.md §13).

Measures, for one method's training step on one device:
  * training images/s: one forward + backward + optimiser step per iteration on a batch already on the
    device (no data loading), timed with CUDA events on GPU and wall clock on CPU, warm-up excluded;
  * model FLOPs: the forward FLOPs of one image counted with torch.utils.flop_counter.FlopCounterMode
    (a multiply-add counts as 2 FLOPs; convolutions and matmuls only), training ~ 3x forward;
    achieved TFLOP/s = train FLOPs/img x img/s, and its fraction of the device's dense peak;
  * sampling images/s: forward passes under no_grad in eval mode for 1 and 2 Euler steps.

Usage
    python benchmarks/throughput.py --quick                              # CPU smoke check, < 1 min
    python benchmarks/throughput.py --precision bf16 --compile --save   # one GPU record
    python benchmarks/throughput.py --net tiny --batch 8 --iters 3 --warmup 1 --device cpu

`--save` merges the record into benchmarks/results/throughput.json (one record per device, torch version,
method, net, batch, precision and compile setting; a re-run replaces its old record) and rewrites
benchmarks/results/throughput.md. That folder holds real GPU measurements only, so `--save` refuses CPU
and `--quick` runs unless `--results DIR` names another folder.

Methods register in METHODS as a `Method(step, ...)`: `step(net, x)` returns the scalar training loss of
one batch x (the harness does autocast, backward, the optimiser step and the timing), `sample(net, z, k)`
turns noise into images with k network evaluations, `net` holds network overrides (e.g. num_times=2) and
`fwd_per_step` the cost of one training step in plain forward+backward passes (a forward without backward
counts 1/3), so FLOPs stay honest for methods with a teacher or several evaluations.
"""
import argparse, dataclasses, datetime, json, math, os, subprocess, sys, time
from typing import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # the repository root, for common.py

import torch
from torch.utils.flop_counter import FlopCounterMode

import common

RESULTS = os.path.join(HERE, "results")


# ==================================================================================== methods
@dataclasses.dataclass
class Method:
    step: Callable  # step(net, x) -> scalar loss (fp32); called under autocast
    sample: Callable  # sample(net, z, steps) -> images; called under no_grad, eval mode, autocast
    net: dict = dataclasses.field(default_factory=dict)  # net_config overrides
    # training FLOPs = 3 * fwd_per_step * forward FLOPs: network forwards+backwards per step, a forward
    # without backward (e.g. a frozen teacher's) counting 1/3
    fwd_per_step: float = 1.0


def fm_step(net, x):
    """Flow matching / 1-rectified flow: x_t = (1-t) x + t z, target v = z - x, MSE (t=1 noise)."""
    z = torch.randn_like(x)
    t = torch.rand(x.shape[0], device=x.device)
    tb = t[:, None, None, None]
    v = net((1 - tb) * x + tb * z, t)
    return (v.float() - (z - x).float()).square().mean()


def euler_sample(net, z, steps):
    """Euler from t=1 (noise) to t=0 (data) on a uniform grid: x <- x - (t_i - t_{i+1}) v(x, t_i)."""
    x, ts = z, torch.linspace(1.0, 0.0, steps + 1, device=z.device)
    for i in range(steps):
        x = x - (ts[i] - ts[i + 1]) * net(x, ts[i].expand(x.shape[0])).to(x.dtype)
    return x


_ENV = {}  # the Env of the running measurement (imm.py's f_map applies autocast itself)


def imm_step(net, x):
    """IMM (imm.py, cifar10 preset maths): x_t and x_r from one noise, online pass with gradient, target pass
    with the same weights under no_grad, grouped Laplace-kernel MMD (M = 4, k = 15)."""
    import imm
    cfg, env = imm.Config(k=15), _ENV["env"]
    eps = cfg.sigma_d * torch.randn_like(x)
    s, r, t = imm.sample_times(x.shape[0] // cfg.M, cfg.M, cfg, 0.0, x.device)
    return imm.imm_loss(net, common.unwrap(net), x, eps, s, r, t, cfg, env)[0]


def imm_sample(net, z, steps):
    """IMM pushforward on the 1-step / 2-step (eta = 1.4) grids: one network evaluation per step."""
    import imm
    cfg, x = imm.Config(), 0.5 * z
    grid = imm.time_steps(steps, cfg)
    for t, t_prev in zip(grid[:-1], grid[1:]):
        full = lambda v: torch.full((x.shape[0],), v, device=x.device)
        x = imm.f_map(net, x, full(t_prev), full(t), cfg, _ENV["env"]).float()
    return x


def scm_step(net, x, distil=False):
    """sCT / sCD (scm.py, cifar10 maths): fp32 JVP pass on the unwrapped network (dropout mask replayed), then the
    bf16 gradient pass; sCD adds a frozen teacher forward (a copy of the initial weights stands in for it)."""
    import copy, scm
    cfg, env, raw = scm.Config(weighting="none"), _ENV["env"], common.unwrap(net)
    teacher = _ENV.setdefault("teacher", copy.deepcopy(raw).eval().requires_grad_(False)) if distil else None
    z = cfg.sigma_d * torch.randn_like(x)
    t = scm.sample_t(x.shape[0], cfg.P_mean, cfg.P_std, cfg.sigma_d, x.device)
    return scm.cm_step_loss(scm.Student(net), raw, teacher, x, z, t, 1.0, cfg, env)[0]


def scm_sample(net, z, steps):
    """sCM multistep sampler: f at t_max = arctan(80/0.5), then re-noised to t = 1.1 (2 steps)."""
    import scm
    cfg, x = scm.Config(), None
    for k, tk in enumerate(scm.cm_times(steps, cfg)):
        x_t = cfg.sigma_d * z if k == 0 else math.cos(tk) * x + math.sin(tk) * cfg.sigma_d * z
        x = scm.consistency_fn(net, x_t, torch.full((z.shape[0],), tk, device=z.device), cfg.sigma_d).float()
    return x


METHODS = {
    "fm": Method(step=fm_step, sample=euler_sample, net=dict(time_scale=1000.0)),
    # IMM: one forward+backward plus one forward without backward (the target pass) = 4/3 (imm.md §10)
    "imm": Method(step=imm_step, sample=imm_sample, net=dict(num_times=2, time_scale=1000.0), fwd_per_step=4 / 3),
    # sCM: the JVP pass (primal + tangent, no backward) counts 2/3, the gradient pass 1; sCD adds a teacher
    # forward (1/3). scm.md §10 expects ~1.7x and ~2.1x a flow-matching step; the measured img/s tells.
    "sct": Method(step=scm_step, sample=scm_sample, net=dict(adn=True), fwd_per_step=5 / 3),
    "scd": Method(step=lambda net, x: scm_step(net, x, distil=True), sample=scm_sample, net=dict(adn=True),
                  fwd_per_step=2.0),
}

# Dense peak TFLOP/s by device-name fragment and precision (NVIDIA data sheets, without sparsity).
PEAKS = [
    ("H100 PCIe", dict(bf16=756.0, tf32=378.0, fp32=51.0)),
    ("H100 NVL", dict(bf16=835.0, tf32=418.0, fp32=60.0)),
    ("H100", dict(bf16=989.0, tf32=494.0, fp32=67.0)),  # SXM
    ("H200", dict(bf16=989.0, tf32=494.0, fp32=67.0)),
]


def default_peak(device_name, precision):
    for frag, peaks in PEAKS:
        if frag in device_name:
            return peaks[precision]
    return None


# ==================================================================================== measurement
def forward_flops(net, img_shape, device, num_times=1):
    """FlopCounterMode count of one forward of one image (B=1), in FLOPs (multiply-add = 2)."""
    x = torch.zeros(1, *img_shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    s = t if num_times == 2 else None
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        net(x, t, s) if s is not None else net(x, t)
    return int(fc.get_total_flops())


class Timer:
    """CUDA events on GPU (after a synchronise), perf_counter on CPU; seconds."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.b.record()
            torch.cuda.synchronize()
            self.seconds = self.a.elapsed_time(self.b) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


def _onoff(s):
    v = {"1": True, "true": True, "on": True, "yes": True, "0": False, "false": False, "off": False, "no": False}
    if s.lower() not in v:
        raise argparse.ArgumentTypeError(f"expected on/off, got '{s}'")
    return v[s.lower()]


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--method", default="fm", choices=sorted(METHODS))
    p.add_argument("--net", default=None, help="common.net_config name (default ddpmpp; tiny with --quick)")
    p.add_argument("--batch", type=int, default=None, help="training batch (default 128; 8 with --quick)")
    p.add_argument("--sample_batch", type=int, default=None, help="sampling batch (default: --batch)")
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default 50; 3 with --quick)")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations (default 10; 1 with --quick)")
    p.add_argument("--precision", default=None, choices=["fp32", "tf32", "bf16"],
                   help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--compile", default=False, nargs="?", const=True, type=_onoff,
                   help="torch.compile the network (--compile, or --compile on|off)")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="peak for the utilisation fraction (default: the device's dense peak, H100/H200 known)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="CPU-sized smoke check: tiny net, batch 8, 3 iterations")
    p.add_argument("--save", action="store_true", help="merge the record into --results")
    p.add_argument("--results", default=None, help=f"results folder (default {os.path.relpath(RESULTS)})")
    a = p.parse_args(argv)
    q = a.quick
    for k, full, quick in [("net", "ddpmpp", "tiny"), ("batch", 128, 8), ("iters", 50, 3), ("warmup", 10, 1)]:
        if getattr(a, k) is None:
            setattr(a, k, quick if q else full)
    a.sample_batch = a.sample_batch or a.batch
    if min(a.batch, a.sample_batch, a.iters) < 1 or a.warmup < 0:
        raise common.UserError("--batch, --sample_batch and --iters must be >= 1 and --warmup >= 0.")
    return a


def measure(a):
    """Run one configuration; return its record (a flat JSON-able dict)."""
    env = common.setup(a.device, a.seed, a.precision)
    dev, meth = env.device, METHODS[a.method]
    _ENV["env"] = env
    cfg = common.net_config(a.net, **meth.net)
    if cfg["kind"] != "unet":
        raise common.UserError(f"--net {a.net} is not an image network; use ddpmpp, small or tiny.")
    R, C = cfg["img_resolution"], cfg["in_channels"]
    net = common.build_net(cfg).to(dev)
    n_params = sum(p.numel() for p in net.parameters())
    fwd = forward_flops(net, (C, R, R), dev, cfg["num_times"])
    train_flops = int(round(3 * meth.fwd_per_step * fwd))  # forward + backward (~2x forward)

    model = common.maybe_compile(net, a.compile)
    opt = torch.optim.Adam(net.parameters(), lr=a.lr)
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    x = torch.rand(a.batch, C, R, R, device=dev, generator=gen) * 2 - 1  # data already on the device

    def train_step():
        with common.autocast(env):
            loss = meth.step(model, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    model.train()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with Timer(dev) as tw:
        for _ in range(a.warmup):
            train_step()
    with Timer(dev) as tt:
        for _ in range(a.iters):
            loss = train_step()
    if not math.isfinite(loss.item()):
        raise common.UserError(f"the training loss became {loss.item()} during the benchmark.")
    train_ips = a.iters * a.batch / tt.seconds
    mem = torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else None

    model.eval()
    z = torch.randn(a.sample_batch, C, R, R, device=dev, generator=gen)
    sample_ips = {}
    with torch.no_grad(), common.autocast(env):
        for k in (1, 2):
            for _ in range(a.warmup):
                meth.sample(model, z, k)
            with Timer(dev) as ts:
                for _ in range(a.iters):
                    meth.sample(model, z, k)
            sample_ips[k] = a.iters * a.sample_batch / ts.seconds

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({os.cpu_count()} cores, " \
        f"{torch.get_num_threads()} threads)"
    peak = a.peak_tflops if a.peak_tflops else default_peak(name, env.precision) if dev.type == "cuda" else None
    tflops = train_flops * train_ips / 1e12
    return dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        device=dev.type, device_name=name, torch=torch.__version__, cuda=torch.version.cuda,
        commit=_git_commit(), method=a.method, net=a.net, params=n_params, resolution=R,
        batch=a.batch, sample_batch=a.sample_batch, precision=env.precision, compile=bool(a.compile),
        iters=a.iters, warmup=a.warmup,
        fwd_flops_per_img=fwd, train_flops_per_img=train_flops,
        train_img_per_s=train_ips, train_tflops=tflops, peak_tflops=peak,
        peak_fraction=tflops / peak if peak else None,
        sample_img_per_s_1step=sample_ips[1], sample_img_per_s_2step=sample_ips[2],
        warmup_s=tw.seconds, max_mem_gib=mem, final_loss=loss.item(),
    )


def _git_commit():
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ==================================================================================== output
KEY = ("device_name", "torch", "method", "net", "batch", "sample_batch", "precision", "compile")
COLUMNS = [  # (header, record key, format)
    ("device", "device_name", "{}"), ("torch", "torch", "{}"), ("method", "method", "{}"), ("net", "net", "{}"),
    ("batch", "batch", "{}"), ("precision", "precision", "{}"), ("compile", "compile", "{}"),
    ("train img/s", "train_img_per_s", "{:,.0f}"), ("GFLOP/img fwd", "fwd_flops_per_img", "gflop"),
    ("TFLOP/s", "train_tflops", "{:.3g}"), ("of peak", "peak_fraction", "{:.1%}"),
    ("sample img/s 1 step", "sample_img_per_s_1step", "{:,.0f}"),
    ("sample img/s 2 steps", "sample_img_per_s_2step", "{:,.0f}"),
    ("mem GiB", "max_mem_gib", "{:.1f}"), ("date", "date", "{}"),
]


def _cell(rec, key, fmt):
    v = rec.get(key)
    if v is None:
        return "–"
    return f"{v / 1e9:.4g}" if fmt == "gflop" else fmt.format(v)


def table_header():
    return "| " + " | ".join(h for h, _, _ in COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def table_row(rec):
    return "| " + " | ".join(_cell(rec, k, f) for _, k, f in COLUMNS) + " |"


def save(rec, folder):
    """Merge `rec` into folder/throughput.json (same KEY replaces) and rewrite folder/throughput.md."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "throughput.json")
    recs = []
    if os.path.exists(path):
        with open(path) as f:
            recs = json.load(f)
    recs = [r for r in recs if tuple(r.get(k) for k in KEY) != tuple(rec[k] for k in KEY)] + [rec]
    recs.sort(key=lambda r: (r["device_name"], r["method"], r["net"], r["batch"], r["precision"], r["compile"]))
    for p, text in [(path, json.dumps(recs, indent=1) + "\n"), (os.path.join(folder, "throughput.md"), _markdown(recs))]:
        with open(p + ".tmp", "w") as f:
            f.write(text)
        os.replace(p + ".tmp", p)
    return recs


def _markdown(recs):
    lines = ["# Throughput (generated by benchmarks/throughput.py --save; do not edit)", "",
             "Training: one forward + backward + Adam step per iteration on a batch already on the device. "
             "FLOPs: FlopCounterMode forward count of one image (multiply-add = 2), training = 3x forward. "
             "Sampling: Euler under no_grad in eval mode at the sampling batch.", "", table_header()]
    lines += [table_row(r) for r in recs]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """Parse, measure, print one Markdown row, optionally save. Returns the record."""
    a = parse(argv)
    folder = a.results or RESULTS
    cuda = a.device.startswith("cuda") or (a.device == "auto" and torch.cuda.is_available())
    if a.save and (a.quick or not cuda) and os.path.abspath(folder) == os.path.abspath(RESULTS):
        raise common.UserError("benchmarks/results holds full GPU measurements only; pass --results DIR to save "
                               "a CPU or --quick run elsewhere.")
    rec = measure(a)
    print(table_header())
    print(table_row(rec))
    print(f"{rec['device_name']}: {rec['params']:,} params, {rec['fwd_flops_per_img'] / 1e9:.3f} GFLOP/img forward, "
          f"{rec['train_flops_per_img'] / 1e9:.3f} GFLOP/img training, warm-up {rec['warmup_s']:.1f} s")
    if rec["peak_fraction"] is None and rec["device"] == "cuda":
        print("peak fraction unknown for this GPU; pass --peak_tflops to set its dense peak.")
    if a.save:
        save(rec, folder)
        print(f"saved to {os.path.join(folder, 'throughput.json')} and throughput.md")
    return rec


if __name__ == "__main__":
    common.main_guard(main)
