"""Write tests/golden/flowmap_golden.npz: the flow-map self-distillation losses of the authors' JAX code, evaluated
on a tiny MLP with fixed random weights, for tests/test_golden_flowmap.py.

Official code: nmboffi/flow-maps (Boffi, Albergo, Vanden-Eijnden, "How to build a consistency model: learning flow
maps via self-distillation", arXiv 2505.18825; MIT licence), `py/common/losses.py` (`diagonal_term`, `lsd_term`,
`psd_term`, `esd_term`, `setup_loss`), `py/common/network_utils.py` (`FlowMapMLP`), `py/common/interpolant.py`
(`setup_interpolant`), `py/common/loss_args.py` (`_get_diag_offdiag_bs`) and `py/common/flow_map.py` (`FlowMap`,
`batch_sample`). This script only imports that code from the checkout given on the command line; it contains none
of it. See tests/golden/README.md for the commit used and how to get it.

Run it in a scratch environment with CPU JAX (never in this project's environment), e.g.

    python3 -m venv /tmp/jaxenv --system-site-packages
    /tmp/jaxenv/bin/pip install jax==0.4.26 jaxlib==0.4.26 flax==0.8.2 optax==0.2.2 ml_collections==0.1.1 "numpy<2"
    /tmp/jaxenv/bin/python tests/golden/make_flowmap_golden.py /path/to/flow-maps [--commit HASH]

tensorflow is imported by the official `state_utils.py` (through `loss_args.py`) only for a type annotation; when it
is not installed, the script puts an empty stand-in module in its place. Everything runs in float64
(jax_enable_x64), so the fixture holds the exact values of the official functions to ~1e-15.

What is stored (B = per-term batch, all arrays float64):
- the MLP: FlowMapMLP with n_hidden = 2, n_neurons = 16, GELU (jax.nn.gelu, tanh approximation), rescale
  (sigma0) = 0.5, input concat(s, t, x / rescale), phi = rescale * MLP(.), X = x + (t - s) phi; its parameters as
  `p/<Dense_k>/<kernel|bias>` (flax layout: kernel is (in, out)); FlowMapMLP.calc_weight is the constant 1.0, so
  every official term is exp(-1) * l + 1;
- per-term inputs x0, x1 (B, 2), s, t, h (B,) and the per-sample official terms `term/<name>` (B,) and the
  parameter gradient of their batch mean `grad/<name>/<Dense_k>/<kernel|bias>` (the gradient is not that of the
  printed loss wherever a stop-gradient sits: teacher_params is a separate argument, as in the official
  training step, so no gradient reaches it), for
    diag (diagonal_term), lsd (lsd_term, stopgrad convex), psd_uniform and psd_midpoint (psd_term, convex),
    esd_full and esd_convex (esd_term), each with the linear interpolant, plus <name>_trig for diag, lsd,
    psd_uniform and esd_full with the trig interpolant;
- the whole batch loss of setup_loss (diagonal rows first, diag_fraction 0.75) on inputs `full/x0`, `full/x1`,
  `full/s`, `full/t`, `full/h` (n = 16): `full/<name>/loss` and `full/<name>/grad/...` for lsd, psd_uniform,
  psd_midpoint, esd_full, esd_convex (linear interpolant);
- the batch split: `split/bs`, `split/diag_bs_<100 frac>` from _get_diag_offdiag_bs at diag_fraction 0.75, 0.5,
  0.29 and 0.35;
- the sampler: batch_sample on `sample/x0` at N = 1, 2, 4 as `sample/N<k>`;
- 64 off-diagonal time pairs from loss_args._sample_triangle as `pairs/s`, `pairs/t` (their order, s <= t or not);
- `meta/*`: source repository, commit, git blob hashes of the official files used, jax/flax/numpy versions.
"""
import argparse
import hashlib
import importlib
import importlib.util
import os
import subprocess
import sys
import types

import numpy as np

OFFICIAL_FILES = ("losses.py", "flow_map.py", "network_utils.py", "interpolant.py", "loss_args.py")
N_HIDDEN, N_NEURONS, RESCALE, DIM = 2, 16, 0.5, 2
B, B_FULL, DIAG_FRACTION = 8, 16, 0.75


def git_blob(path):
    """The git blob hash of a file (what `git hash-object` prints), to pin the exact official sources used."""
    data = open(path, "rb").read()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def load_official(root):
    """Import the checkout's py/common package under the name `boffi_common` (this project has a common.py)."""
    pkg = os.path.join(root, "py", "common")
    if not os.path.isfile(os.path.join(pkg, "losses.py")):
        sys.exit(f"error: {root} is not a checkout of nmboffi/flow-maps (no py/common/losses.py).")
    try:
        import tensorflow  # noqa: F401
    except ImportError:  # state_utils.py needs only the name tf.data.Dataset, in a class annotation
        tf = types.ModuleType("tensorflow")
        tf.data = types.SimpleNamespace(Dataset=object)
        sys.modules["tensorflow"] = tf
        print("note: tensorflow is not installed; an empty stand-in is used (only a type annotation needs it)")
    spec = importlib.util.spec_from_file_location("boffi_common", os.path.join(pkg, "__init__.py"),
                                                  submodule_search_locations=[pkg])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["boffi_common"] = mod
    spec.loader.exec_module(mod)
    return {name: importlib.import_module(f"boffi_common.{name}")
            for name in ("losses", "flow_map", "network_utils", "interpolant", "loss_args")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkout", help="root of a nmboffi/flow-maps checkout (the folder holding py/common)")
    ap.add_argument("--commit", default=None, help="commit of the checkout (default: git rev-parse HEAD in it)")
    ap.add_argument("--source", default="nmboffi/flow-maps", help="repository the checkout came from")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "flowmap_golden.npz"))
    args = ap.parse_args()

    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_platform_name", "cpu")
    import jax.numpy as jnp
    from ml_collections import config_dict

    commit = args.commit
    if commit is None:
        try:
            commit = subprocess.run(["git", "-C", args.checkout, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            sys.exit("error: the checkout is not a git work tree; give its commit with --commit HASH.")
    off = load_official(args.checkout)
    L, FM, IP, LA = off["losses"], off["flow_map"], off["interpolant"], off["loss_args"]

    # ---------------------------------------------------------------- the network: official FlowMapMLP, fixed weights
    net_cfg = config_dict.ConfigDict(dict(network_type="mlp", n_hidden=N_HIDDEN, n_neurons=N_NEURONS, output_dim=DIM,
                                          act="gelu", use_residual=False, rescale=RESCALE))
    net = FM.FlowMap(net_cfg)
    init = net.init({"params": jax.random.PRNGKey(0)}, 0.0, 0.0, jnp.zeros(DIM), None, train=False)
    rng = np.random.default_rng(20250518)
    layers = init["params"]["flow_map"]["phi_mlp"]
    np_params = {}
    for name in sorted(layers, key=lambda k: int(k.split("_")[1])):
        fan_in, fan_out = layers[name]["kernel"].shape
        np_params[name] = dict(kernel=rng.normal(0, 1.2 / np.sqrt(fan_in), (fan_in, fan_out)),
                               bias=rng.normal(0, 0.2, fan_out))
    np_params["Dense_0"]["kernel"][:2] *= 4.0  # strong (s, t) dependence: off-diagonal residuals of order 1
    params = {"params": {"flow_map": {**init["params"]["flow_map"],  # weight_mlp unused: calc_weight is 1.0
                                      "phi_mlp": {k: {kk: jnp.asarray(vv) for kk, vv in v.items()}
                                                  for k, v in np_params.items()}}}}
    out = {f"p/{k}/{kk}": vv for k, v in np_params.items() for kk, vv in v.items()}

    def grads_to_np(prefix, g):
        for k, v in g["params"]["flow_map"]["phi_mlp"].items():
            for kk, vv in v.items():
                out[f"{prefix}/{k}/{kk}"] = np.asarray(vv, dtype=np.float64)

    interps = {name: IP.setup_interpolant(config_dict.ConfigDict(dict(problem=dict(interp_type=name))))
               for name in ("linear", "trig")}

    # ---------------------------------------------------------------- per-term inputs
    x0 = RESCALE * rng.normal(size=(B, DIM))  # noise at t = 0 (same convention as flow_map.py)
    x1 = rng.normal(size=(B, DIM)) * np.array([0.6, 0.4]) + np.array([0.3, -0.2])  # "data" at t = 1
    a, b = rng.uniform(size=B), rng.uniform(size=B)
    s, t = np.minimum(a, b), np.maximum(a, b)
    s[-2:], t[-2:] = t[-2:].copy(), s[-2:].copy()  # two backward pairs (s > t): the terms take any order
    h = rng.uniform(size=B)
    out.update({"x0": x0, "x1": x1, "s": s, "t": t, "h": h})
    keys = jax.random.split(jax.random.PRNGKey(1), B)  # dropout keys (the MLP has no dropout)

    def term_fn(name, interp):
        """(per-sample official term)(params, teacher_params, x0, x1, s, t, h, key) for one sample."""
        if name == "diag":
            return lambda p, tp, x0, x1, s, t, h, k: L.diagonal_term(p, x0, x1, None, t, {"dropout": k},
                                                                     interp=interp, X=net)
        if name == "lsd":
            return lambda p, tp, x0, x1, s, t, h, k: L.lsd_term(p, tp, x0, x1, None, s, t, {"dropout": k},
                                                                interp=interp, X=net, stopgrad_type="convex")
        if name.startswith("psd"):
            kind = name.split("_")[1]

            def f(p, tp, x0, x1, s, t, h, k):
                hh = h if kind == "uniform" else 0.5
                u = hh * s + (1 - hh) * t  # as loss_args.get_loss_fn_args_randomness draws u from h
                return L.psd_term(p, tp, x0, x1, None, s, t, u, h if kind == "uniform" else None, {"dropout": k},
                                  interp=interp, X=net, psd_type=kind, stopgrad_type="convex")
            return f
        kind = name.split("_")[1]
        return lambda p, tp, x0, x1, s, t, h, k: L.esd_term(p, tp, x0, x1, None, s, t, {"dropout": k},
                                                            interp=interp, X=net, stopgrad_type=kind)

    cases = [(n, "linear") for n in ("diag", "lsd", "psd_uniform", "psd_midpoint", "esd_full", "esd_convex")]
    cases += [(n, "trig") for n in ("diag", "lsd", "psd_uniform", "esd_full")]
    J = lambda v: jnp.asarray(v)
    for name, ip in cases:
        tag = name if ip == "linear" else f"{name}_trig"
        f = jax.vmap(term_fn(name, interps[ip]), in_axes=(None, None, 0, 0, 0, 0, 0, 0))
        vals = f(params, params, J(x0), J(x1), J(s), J(t), J(h), keys)
        g = jax.grad(lambda p: jnp.mean(f(p, params, J(x0), J(x1), J(s), J(t), J(h), keys)))(params)
        out[f"term/{tag}"] = np.asarray(vals, dtype=np.float64)
        grads_to_np(f"grad/{tag}", g)
        print(f"{tag:18s} l = e (term - 1): {np.round(np.e * (np.asarray(vals) - 1), 4)}")

    # ---------------------------------------------------------------- whole batch loss (setup_loss)
    fx0 = RESCALE * rng.normal(size=(B_FULL, DIM))
    fx1 = rng.normal(size=(B_FULL, DIM)) * np.array([0.6, 0.4]) + np.array([0.3, -0.2])
    diag_bs = LA._get_diag_offdiag_bs(config_dict.ConfigDict(dict(optimization=dict(diag_fraction=DIAG_FRACTION))),
                                      B_FULL)[0]
    tau = rng.uniform(size=diag_bs)
    a, b = rng.uniform(size=B_FULL - diag_bs), rng.uniform(size=B_FULL - diag_bs)
    fs = np.concatenate([tau, np.minimum(a, b)])  # loss_args._sample_diagonal / _sample_triangle layout
    ft = np.concatenate([tau, np.maximum(a, b)])
    fh = rng.uniform(size=B_FULL)
    out.update({"full/x0": fx0, "full/x1": fx1, "full/s": fs, "full/t": ft, "full/h": fh,
                "full/diag_bs": np.array(diag_bs)})
    fkeys = jax.random.split(jax.random.PRNGKey(2), B_FULL)
    for name in ("lsd", "psd_uniform", "psd_midpoint", "esd_full", "esd_convex"):
        loss_type, kind = (name.split("_") + [None])[:2]
        cfg = config_dict.ConfigDict(dict(
            training=dict(loss_type=loss_type, stopgrad_type=kind if loss_type == "esd" else "convex",
                          psd_type=kind if loss_type == "psd" else None),
            optimization=dict(diag_fraction=DIAG_FRACTION)))
        loss = L.setup_loss(cfg, net, interps["linear"])
        if kind == "uniform":
            hh, u = J(fh), J(fh * fs + (1 - fh) * ft)
        elif kind == "midpoint":
            hh, u = None, J(0.5 * (fs + ft))
        else:
            hh, u = None, None
        args_ = (params, J(fx0), J(fx1), None, J(fs), J(ft), u, hh, fkeys)
        val, g = jax.value_and_grad(lambda p: loss(p, *args_))(params)
        out[f"full/{name}/loss"] = np.asarray(val, dtype=np.float64)
        grads_to_np(f"full/{name}/grad", g)
        print(f"full {name:13s} loss {float(val):.6f}")

    # ---------------------------------------------------------------- batch split and sampler
    sizes = np.array([1, 2, 3, 4, 7, 8, 16, 33, 100, 128, 180, 200])
    for frac in (0.75, 0.5, 0.29, 0.35):  # 0.29 and 0.35 are not exact in binary: int() of the float product
        c = config_dict.ConfigDict(dict(optimization=dict(diag_fraction=frac)))
        out[f"split/diag_bs_{round(frac * 100)}"] = np.array([LA._get_diag_offdiag_bs(c, int(n))[0] for n in sizes])
    out["split/bs"] = sizes
    sx0 = RESCALE * rng.normal(size=(B, DIM))
    out["sample/x0"] = sx0
    for N in (1, 2, 4):
        out[f"sample/N{N}"] = np.asarray(FM.batch_sample(net.apply, params, J(sx0), N, jnp.zeros(B, dtype=jnp.int32)),
                                         dtype=np.float64)

    # off-diagonal time pairs as the official training draws them (loss_args._sample_triangle, 64 pairs)
    ps, pt = LA._sample_triangle(jax.random.PRNGKey(3), jax.random.PRNGKey(4), 64, 0.0, 1.0)
    out["pairs/s"], out["pairs/t"] = np.asarray(ps, dtype=np.float64), np.asarray(pt, dtype=np.float64)

    out["meta/source"] = np.array(args.source)
    out["meta/commit"] = np.array(commit)
    out["meta/blobs"] = np.array([f"py/common/{f} {git_blob(os.path.join(args.checkout, 'py', 'common', f))}"
                                  for f in OFFICIAL_FILES])
    out["meta/versions"] = np.array(f"jax {jax.__version__}, flax {importlib.import_module('flax').__version__}, "
                                    f"numpy {np.__version__}")
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out} ({os.path.getsize(args.out)} bytes; {len(out)} arrays; {args.source}@{commit})")


if __name__ == "__main__":
    main()
