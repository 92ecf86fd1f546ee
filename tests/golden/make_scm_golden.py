"""Write tests/golden/scm_golden.pt from NVlabs/FastGen's sCM (fastgen/methods/consistency_model/sCM.py), for
tests/test_golden_scm.py.

Why FastGen: the sCM authors released no training code; NVlabs/FastGen (Apache-2.0) is NVIDIA's public
implementation of sCT/sCD (with CIFAR-10 configs and reported FIDs), so it is the closest to an official one.

Run once by a developer against a local checkout (see tests/golden/README.md):

    PYTHONPATH=<site with omegaconf loguru ftfy imageio einops> \
        python tests/golden/make_scm_golden.py --fastgen /path/to/FastGen [--out tests/golden/scm_golden.pt]

What runs (CPU, fp32 network, the official fp64 loss): SCMModel._compute_scm_loss, which calls SCMModel._jvp
(torch.func.jvp of the TrigFlow network with tangents (cos t sin t dx_t/dt, cos t sin t)) and
SCMModel._scm_pred_to_loss (tangent g with warm-up r, its normalisation, the weighted loss with the learned
log-variance), followed by .mean().backward(), for sCT (dx_t/dt the conditional velocity) and sCD (dx_t/dt =
sigma_d times a teacher's F). The SCMModel instance is built without its constructor (which loads a full
FastGen network and configs); the attributes those methods read are set by hand:
- net_trigflow / teacher_trigflow: the shared tiny network F(x_t / sigma_d, t) (common.py's MLP, seeded
  random weights, raw TrigFlow time; our convention, scm.py F_net) and, for the student, logvar = -w(t) from
  common.WeightHead (FastGen's loss is e^{-logvar}/D' ||.||^2 + logvar, scm.py's e^{w}/D ||.||^2 - w). FastGen's
  TrigFlowPrecond, which converts an EDM x0-predictor into this F, is bypassed: our networks are TrigFlow-native.
- net.noise_scheduler: FastGen's own EDMNoiseSchedule (sigma = t), so t_hat = atan2(sigma, sigma_d) as in
  training; net_trigflow.noise_scheduler: FastGen's TrigNoiseSchedule.
- loss_config: FastGen's LossConfig fields, with prior_weighting_enabled = False and divide_x_0_spatial_dim = False
  (the paper's loss, Eq. 8, which scm.py implements; FastGen's defaults add a 1/sigma weight and a second 1/D),
  g_norm_spatial_invariance False (paper's L2 norm, tangent_norm "l2") and True (FastGen's RMS, "rms").
Heavy FastGen imports that these methods never use (diffusers, the package's model registry) are stubbed.
This file contains no official code: it imports it from the path given on the command line.
"""
import argparse
import importlib
import os
import subprocess
import sys
import types

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import common as C  # noqa: E402  (the shared tiny networks only)

SHAPE = (2, 2, 2)
B = 6
SD = 0.5
CASES = [  # name, use_cd, g_norm_spatial_invariance (rms), iteration (H = 10k: r = min(1, it / H))
    ("sct/l2/r0.3", False, False, 3000),
    ("sct/rms/r1", False, True, 20000),
    ("scd/l2/r1", True, False, 10000),
    ("scd/rms/r0.5", True, True, 5000),
]


def tiny_config():
    return C.net_config("mlp", dim=8, width=32, depth=2, time_channels=16, num_times=1, time_scale=1.0)


def randomise(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return module


class TrigFlowAdapter(nn.Module):
    """FastGen's net_trigflow seat: (x_t_hat, t_hat) -> F(x_t_hat / sigma_d, t_hat) [, logvar = -w(t), x0_pred]."""

    def __init__(self, mlp, head, schedule):
        super().__init__()
        self.mlp, self.head, self.noise_scheduler, self.F_grad = mlp, head, schedule, None

    def forward(self, x_t_hat, t_hat, condition=None, return_logvar=False, return_x0_pred=False, **kw):
        F = self.mlp((x_t_hat / SD).flatten(1), t_hat).reshape(x_t_hat.shape)
        if F.requires_grad:  # the grad pass: record dLoss/dF (a function of the normalised tangent only)
            F.register_hook(lambda g: setattr(self, "F_grad", g.detach().clone()))
        out = [F]
        if return_logvar:
            out.append(-self.head(t_hat)[:, None])
        if return_x0_pred:
            out.append(None)
        return out[0] if len(out) == 1 else tuple(out)


def load_fastgen(path):
    """Import sCM.py and noise_schedule.py from the checkout, stubbing what they import but never use here."""
    sys.path.insert(0, os.path.abspath(path))
    stub = types.ModuleType("diffusers")  # only other noise schedules use it
    stub.DDIMScheduler = stub.CogVideoXDPMScheduler = object
    sys.modules["diffusers"] = stub
    methods = types.ModuleType("fastgen.methods")  # the real __init__ imports every method's model zoo
    methods.__path__ = [os.path.join(os.path.abspath(path), "fastgen", "methods")]
    methods.CMModel = type("CMModel", (), {})
    sys.modules["fastgen.methods"] = methods
    scm = importlib.import_module("fastgen.methods.consistency_model.sCM")
    ns = importlib.import_module("fastgen.networks.noise_schedule")
    return scm, ns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fastgen", required=True, help="checkout of github.com/NVlabs/FastGen")
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden", "scm_golden.pt"))
    args = ap.parse_args()
    scm, ns = load_fastgen(args.fastgen)
    commit = subprocess.run(["git", "-C", args.fastgen, "rev-parse", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    torch.set_num_threads(1)

    student = randomise(C.build_net(tiny_config()), seed=7)
    head = randomise(C.WeightHead(1, 128, 1.0), seed=8)
    teacher = randomise(C.build_net(tiny_config()), seed=9)
    out = dict(repo="NVlabs/FastGen", commit=commit, shape=SHAPE, sigma_d=SD, H=10000,
               student={k: v.clone() for k, v in student.state_dict().items()},
               head={k: v.clone() for k, v in head.state_dict().items()},
               teacher={k: v.clone() for k, v in teacher.state_dict().items()})
    g = torch.Generator().manual_seed(11)
    for i, (name, use_cd, rms, it) in enumerate(CASES):
        x0 = 0.5 * torch.randn(B, *SHAPE, generator=g)
        sigma = torch.exp(-1.0 + 1.4 * torch.randn(B, generator=g, dtype=torch.float64)).clamp(0.002, 80.0)
        sigma[0], sigma[1] = 0.01, 60.0  # both ends of the tangent's range
        m = scm.SCMModel.__new__(scm.SCMModel)
        m.sample_t_cfg = types.SimpleNamespace(quantize=False)
        m.sigma_data = SD
        m.config = types.SimpleNamespace(guidance_scale=None, skip_layers=None)
        m.precision_amp_jvp = None
        m.device = torch.device("cpu")
        m.loss_config = types.SimpleNamespace(use_cd=use_cd, tangent_warmup_steps=10000, tangent_warmup_const=0.1,
                                              prior_weighting_enabled=False, g_norm_spatial_invariance=rms,
                                              divide_x_0_spatial_dim=False, use_jvp_finite_diff=False,
                                              jvp_finite_diff_eps=1e-3)
        m.net = types.SimpleNamespace(noise_scheduler=ns.EDMNoiseSchedule())
        trig = ns.TrigNoiseSchedule()
        m.net_trigflow = TrigFlowAdapter(student, head, trig)
        m.teacher_trigflow = TrigFlowAdapter(teacher, None, trig) if use_cd else None
        jvp_io = {}
        real_jvp = m._jvp

        def recording_jvp(real_data, z, x_t_hat, t_hat, dxt_dt, condition=None):
            J = real_jvp(real_data, z, x_t_hat, t_hat, dxt_dt, condition=condition)
            jvp_io.update(x_t_hat=x_t_hat.clone(), t_hat=t_hat.clone(), dxt_dt=dxt_dt.clone(), F_jvp=J.clone())
            return J

        m._jvp = recording_jvp
        student.zero_grad(set_to_none=True), head.zero_grad(set_to_none=True)
        torch.manual_seed(100 + i)
        z = torch.randn_like(x0) * SD  # the draw _compute_scm_loss makes next (re-seeded below)
        torch.manual_seed(100 + i)
        loss, unweighted, logvar, _, r = m._compute_scm_loss(x0, sigma, iteration=it)
        loss.mean().backward()
        out[name] = dict(x0=x0, sigma=sigma, z=z, iteration=it, r=r, loss=loss.detach(), unweighted=unweighted.detach(),
                         loss_mean=loss.mean().detach(), F_grad=m.net_trigflow.F_grad, **jvp_io,
                         grads={k: p.grad.clone() for k, p in student.named_parameters()},
                         head_grads={k: p.grad.clone() for k, p in head.named_parameters()})
        th = jvp_io["t_hat"].float()[:, None, None, None]
        assert torch.allclose(jvp_io["x_t_hat"], th.cos() * x0 + th.sin() * z, atol=1e-6)  # the recorded z was used
    torch.save(out, args.out)
    print(f"wrote {args.out} ({os.path.getsize(args.out) / 1024:.0f} KiB) from NVlabs/FastGen@{commit}")


if __name__ == "__main__":
    main()
