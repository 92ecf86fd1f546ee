"""How closely sCM's consistency models follow their teacher's ODE on a 2-D toy (docs/scm.md, "Measured toy results").

A consistency model distilled from a diffusion teacher (sCD) should map x_t to where the teacher's probability-flow
ODE takes it, from every time t. For a `python scm.py` run folder DIR (DIR/diffusion, DIR/sct, DIR/scd; any of the
two CMs may be missing) this draws x0 from the run's toy data and z ~ N(0, I), forms x_t = cos t x0 + sin t sigma_d z
at several TrigFlow times t (t_max: pure noise sigma_d z), runs the teacher's ODE from x_t down to 0 (EDM's Heun
on EDM's grid from sigma = sigma_d tan t, --ode_steps steps, the teacher's EMA weights) and compares each CM's one-step
f(x_t, t) with that end point: the sharpness score of both (in_mode on 8 Gaussians, in_square on the checkerboard)
and the distance |f - ODE| (mean, median, 90th percentile).

    python benchmarks/cm_vs_ode.py --run runs/scm-all-toy        # after `python scm.py`
    python benchmarks/cm_vs_ode.py --run DIR --json DIR/cm_vs_ode.json

A CM that is biased (pulled towards something other than the teacher's flow) shows a distance that does not shrink
with training; one that is merely imprecise shows a distance that shrinks and a score that rises towards the ODE's.
"""
import json, math, os, sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402
import scm  # noqa: E402

METRIC = {"8gaussians": "in_mode", "checkerboard": "in_square"}  # the toys with a sharpness score (common.toy_scores)


@torch.no_grad()
def teacher_ode(teacher, x_t, t, steps, sigma_d):
    """The teacher's probability-flow ODE from x_t at TrigFlow time t (a float) to t = 0: EDM's Heun (common.edm_heun)
    in x^EDM = x_t / cos t with the denoiser D(x; sigma) = f(cos t' x, t'), t' = atan2(sigma, sigma_d), on EDM's
    rho = 7 grid from sigma_d tan t to 0.002, last step Euler; float64 state, the teacher in its own precision."""
    dt, sig0 = x_t.dtype, sigma_d * math.tan(t)

    def D(x, s, y=None):
        tt = scm.t_of(torch.full((len(x),), float(s), dtype=dt), sigma_d)
        return scm.consistency_fn(teacher, scm.from_edm(x.to(dt), tt), tt, sigma_d)
    return C.edm_heun(D, x_t / math.cos(t) / sig0, num_steps=steps, sigma_max=sig0).to(dt)


def compare(teacher, cms, toy, times, n, steps, seed, sigma_d=0.5):
    """Rows {t, ode: score, <cm>: {score, mean, median, p90}} for each t; x0 and z drawn per t from `seed`."""
    g = torch.Generator().manual_seed(seed)
    score = lambda x: C.toy_scores(x, toy)[METRIC[toy]]
    rows = []
    for t in times:
        x0, z = C.toy_sample(toy, n, g), torch.randn(n, 2, generator=g)
        x_t = math.cos(t) * x0 + math.sin(t) * sigma_d * z
        ref = teacher_ode(teacher, x_t, t, steps, sigma_d)
        row = dict(t=t, ode=score(ref))
        for name, net in cms.items():
            with torch.no_grad():
                f = scm.consistency_fn(net, x_t, torch.full((n,), t), sigma_d)
            d = (f - ref).norm(dim=1)
            row[name] = dict(score=score(f), mean=d.mean().item(), median=d.median().item(),
                             p90=d.quantile(0.9).item())
        rows.append(row)
    return rows


def load(path, mode):
    ck = C.load_checkpoint(path)
    scm.check_scm(ck, path, mode)  # another method's or mode's checkpoint: one sentence
    net = scm.build(ck["net"])
    C.load_state_strict(net, ck["ema"])
    return net.float().eval().requires_grad_(False), ck


def main(argv=None):
    p = C.Parser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a `python scm.py` run folder (DIR/diffusion/ckpt.pt, DIR/scd, ...)")
    p.add_argument("--times", default="max,1.3,0.9,0.5,0.2", help="TrigFlow times; 'max' = arctan(sigma_max / sigma_d)")
    p.add_argument("--n", type=int, default=4096, help="points per time")
    p.add_argument("--ode_steps", type=int, default=60, help="Heun steps of the teacher's ODE")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--json", default="", help="also write the rows to this file")
    a = p.parse_args(argv)
    for k, rule in (("n", ">= 2"), ("ode_steps", C.STEPS), ("seed", None)):  # (--ode_steps 1e9 ran for ever; a seed
        C.check_value(k, int, getattr(a, k), rule)  # as the method files take one: non-negative, below 2^63)
    if a.json:
        if os.path.isdir(a.json):
            raise C.UserError(f"--json '{a.json}' is a folder; give a file path.")
        C.check_dir(os.path.dirname(os.path.abspath(a.json)), "the folder of --json")
    tpath = os.path.join(a.run, "diffusion", "ckpt.pt")
    if not os.path.isfile(tpath):
        raise C.UserError(f"'{tpath}' not found; --run takes the folder of a `python scm.py` run.")
    teacher, tck = load(tpath, "diffusion")
    cfg = tck["config"]
    toy, sd = cfg["data"], cfg["sigma_d"]
    if toy not in METRIC:
        raise C.UserError(f"the run's data is '{toy}'; this comparison scores {' or '.join(METRIC)} runs.")
    t_max = math.atan(cfg["sigma_max"] / sd)
    try:
        times = [t_max if s.strip() == "max" else float(s) for s in a.times.split(",")]
    except ValueError:
        raise C.UserError(f"--times takes comma-separated numbers or 'max', got '{a.times}'.") from None
    if not all(0 < t <= t_max for t in times):
        raise C.UserError(f"--times must lie in (0, {t_max:.4f}].")
    cms = {m: load(os.path.join(a.run, m, "ckpt.pt"), m)[0] for m in ("sct", "scd")
           if os.path.isfile(os.path.join(a.run, m, "ckpt.pt"))}
    rows = compare(teacher, cms, toy, times, a.n, a.ode_steps, a.seed, sd)
    print(f"{toy}, {a.n} points per t, teacher ODE = Heun {a.ode_steps}; "
          f"{METRIC[toy]} and |f - ODE| mean / median / p90")
    for r in rows:
        print(f"t {r['t']:.3f} | ODE {r['ode']:.3f}" + "".join(
            f" | {m} {r[m]['score']:.3f}, {r[m]['mean']:.4f} / {r[m]['median']:.4f} / {r[m]['p90']:.4f}" for m in cms))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(run=a.run, toy=toy, n=a.n, ode_steps=a.ode_steps, seed=a.seed, rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    C.main_guard(main)
