"""Golden fixture: GDD's projected discriminator, its loss reduction and its R1, run once with Zyriix/GDD's own code.

Imports Zyriix/GDD from a checkout given on the command line (pg_modules/discriminator.py ProjectedFeatureOnly and
ProjectedDiscriminatorOnly, built with the settings of its training/training_loop.py for CIFAR-10 and train.sh
--backbone=1; training/loss.py GDDLoss.accumulate_gradients) and stores, for two fixed 32x32 batches (real x, fake):

  * the logits of the D at its initial state (heads in training mode: batch-statistics BatchNorm, one spectral-norm
    power iteration), [B, K] with GDD's per-backbone rows side by side;
  * GDD's R1 (r1_gamma 1e-4, gain 1): the per-image penalty |grad_x sum_k D_k|^2 and the loss it backpropagates;
  * GDD's D-step and G-step losses with the logits they were computed from;

for the two-backbone D (VGG16-BN + EfficientNet-lite0) and for VGG16-BN alone (so that the R1 check runs without
timm). No download: torchvision's vgg16_bn and timm's create_model are wrapped to build random models and then set
every tensor by `fill_value` (a seeded function of this project's parameter name, shared with the test), and GDD's
projection and head tensors are set the same way, so the test rebuilds identical weights without storing them.

    # scratch: GDD's requirements pin timm 0.5.4 (it also needs ftfy, tqdm, requests, setuptools' pkg_resources)
    pip install --target /tmp/scratch/timm054 --no-deps timm==0.5.4
    PYTHONPATH=/tmp/scratch/timm054:/tmp/scratch/gdd_deps python tests/golden/make_gdd_golden.py \\
        --gdd /tmp/scratch/gdd --commit e9267e8afde48af83249bab05c245fb917340dfa
"""
import argparse
import math
import os
import re
import subprocess
import sys
import zlib

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "gdd_projected_d.pt")
B, GAMMA_GDD, SEED = 2, 1e-4, 0
GDD_TO_OURS = {"vgg16_bn": "vgg", "tf_efficientnet_lite0": "effnet"}


def fill_value(key, shape):
    """The value of the tensor named `key` (distributional.ProjectedD's state-dict name): a function of the name only.
    Convolutions He-normal (activations keep their scale through 13 VGG layers), biases and BatchNorm shifts small,
    BatchNorm scales near 1, running variances in [0.5, 1.5], spectral-norm vectors unit. None: leave as it is."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "num_batches_tracked":
        return None
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    r = torch.randn(shape, generator=g)
    if leaf in ("u", "v"):
        return F.normalize(r, dim=0, eps=1e-12)
    if leaf == "running_var":
        return 0.5 + torch.rand(shape, generator=g)
    if len(shape) >= 2:
        return r * math.sqrt(2 / math.prod(shape[1:]))
    return 1 + 0.1 * r if leaf == "weight" else 0.1 * r


@torch.no_grad()
def fill_(module, key_of):
    """Set every tensor of `module` whose name key_of maps to a key; returns the keys set."""
    done = []
    for name, t in module.state_dict(keep_vars=True).items():
        key = key_of(name)
        v = None if key is None else fill_value(key, tuple(t.shape))
        if v is not None:
            t.data.copy_(v)
            done.append(key)
    return done


def ours(name):
    """GDD's name of a projection or head tensor -> distributional.ProjectedD's; None for backbone tensors."""
    m = re.fullmatch(r"feature_networks\.(\w+)\.scratch\.layer(\d)_(ccm|csm)\.(?:out_conv\.)?(weight|bias)", name)
    if m:
        return f"projectors.{GDD_TO_OURS[m[1]]}.{m[3]}.{m[2]}.{m[4]}"
    leaf = dict(weight_orig="weight", weight_u="u", weight_v="v")
    m = re.fullmatch(r"discriminators\.(\w+)\.mini_discs\.(\d)\.main\.(\d+)\.main\.([01])\.(\w+)", name)
    if m:  # down block j: [spectral-norm conv, BatchNorm, LeakyReLU] -> indices 3j, 3j + 1
        return f"heads.{GDD_TO_OURS[m[1]]}.{m[2]}.{3 * int(m[3]) + int(m[4])}.{leaf.get(m[5], m[5])}"
    m = re.fullmatch(r"discriminators\.(\w+)\.mini_discs\.(\d)\.main\.(\d+)\.(\w+)", name)
    if m:  # the last conv after n down blocks -> index 3n
        return f"heads.{GDD_TO_OURS[m[1]]}.{m[2]}.{3 * int(m[3])}.{leaf[m[4]]}"
    if re.fullmatch(r"feature_networks\.\w+\.pretrained\..*", name):
        return None
    raise KeyError(f"unmapped GDD tensor {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gdd", required=True, help="path of a Zyriix/GDD checkout")
    ap.add_argument("--commit", default=None, help="its commit (default: git rev-parse HEAD in --gdd)")
    ap.add_argument("--out", default=FIXTURE)
    a = ap.parse_args()
    commit = a.commit or subprocess.run(["git", "-C", a.gdd, "rev-parse", "HEAD"], capture_output=True,
                                        text=True).stdout.strip()
    sys.path.insert(0, os.path.abspath(a.gdd))
    import timm
    import torchvision
    import torch_utils.training_stats as training_stats
    from pg_modules.discriminator import ProjectedDiscriminatorOnly, ProjectedFeatureOnly
    from training.loss import DO_DMAIN, DO_DR1, DO_GMAIN, GDDLoss

    # backbones: GDD calls torchvision.models.vgg16_bn(True) and timm.create_model(name, pretrained=True); build them
    # without weights and fill every tensor under this project's name for it (before GDD's builder touches them)
    vgg_orig, timm_orig = torchvision.models.vgg16_bn, timm.create_model

    def vgg16_bn(*args, **kw):
        m = vgg_orig(weights=None)
        fill_(m, lambda n: "backbones.vgg.net." + n[len("features."):] if n.startswith("features.") else None)
        return m

    def create_model(name, pretrained=False, **kw):
        assert name == "tf_efficientnet_lite0", name
        m = timm_orig(name, pretrained=False, **kw)
        fill_(m, lambda n: "backbones.effnet.net." + n)
        return m
    torchvision.models.vgg16_bn, timm.create_model = vgg16_bn, create_model

    g = torch.Generator().manual_seed(SEED)
    x = torch.rand(B, 3, 32, 32, generator=g) * 2 - 1
    fake = torch.rand(B, 3, 32, 32, generator=g) * 2 - 1

    rec = {}
    report_orig, backward_orig = training_stats.report, torch.Tensor.backward

    def report(name, value):
        rec[name] = value.detach().clone() if torch.is_tensor(value) else value
        return report_orig(name, value)

    def backward(self, *args, **kw):
        rec.setdefault("loss", []).append(self.detach().clone())
        return backward_orig(self, *args, **kw)
    training_stats.report, torch.Tensor.backward = report, backward

    class FixedG(nn.Module):  # the generator's output is the stored fake batch (times a parameter for the G step)
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, v, t, class_labels=None, augment_labels=None):
            return fake * self.scale

    out = dict(gdd_repo="Zyriix/GDD", gdd_commit=commit, timm=timm.__version__, torchvision=str(torchvision.__version__),
               torch=str(torch.__version__), batch=B, gamma_gdd=GAMMA_GDD, x=x, fake=fake)
    for tag, backbones in (("full", ["vgg16_bn", "tf_efficientnet_lite0"]), ("vgg", ["vgg16_bn"])):
        torch.manual_seed(SEED)
        # training/training_loop.py: cout 64, expand, proj_type 2, 4 discs, unconditional, im_res 256 (interp224)
        kw = dict(cout=64, expand=True, proj_type=2, num_discs=4, cond=0, rand_embedding=False, im_res=256)
        feat = ProjectedFeatureOnly(backbones=backbones, diffaug=False, interp224=True,
                                    backbone_kwargs=kw).train().requires_grad_(False)
        disc = ProjectedDiscriminatorOnly(backbones=backbones,
                                          channels=[f.CHANNELS for f in feat.feature_networks.values()],
                                          resolutions=[f.RESOLUTIONS for f in feat.feature_networks.values()],
                                          diffaug=False, interp224=True, backbone_kwargs=kw).train().requires_grad_(True)
        keys = fill_(feat, ours) + fill_(disc, ours)
        init = {k: v.clone() for k, v in disc.state_dict().items()}
        n_heads = sum(p.numel() for p in disc.parameters())
        groups = []

        def forward(features, c, _orig=disc.forward):  # record GDD's list of per-image rows as a [B, K] matrix
            rows = _orig(features, c)
            per_bb = [torch.stack(rows[i * B:(i + 1) * B]) for i in range(len(rows) // B)]
            groups[:] = [r.shape[1] for r in per_bb]
            rec.setdefault("logits", []).append(torch.cat(per_bb, 1).detach().clone())
            return rows
        disc.forward = forward
        loss = GDDLoss(g=FixedG(), d=disc, lpips_net=None, feature_net=feat, score_net=None, freeze_layer=[],
                       cond=False, loss_type="ns", r1_type="r1", r1_gamma=GAMMA_GDD, use_gp=True)
        res = dict(backbones=backbones, trainable=n_heads, keys=len(keys))
        for stage, name in ((DO_DR1, "r1"), (DO_DMAIN, "d"), (DO_GMAIN, "g")):
            disc.load_state_dict(init)  # every stage from the same initial state
            rec.clear()
            loss.accumulate_gradients(images=x, class_labels=None, stage=stage, gain=1)
            res[f"{name}_logits"] = rec["logits"]  # D-step: [fake, real] in GDD's call order
            res[f"{name}_loss"] = rec["loss"][0]
            if stage == DO_DR1:
                res["r1_penalty"] = rec["Loss/r1_penalty"]
        res["groups"] = list(groups)
        out[tag] = res
        print(tag, backbones, "groups", groups, "K", sum(groups), "trainable", n_heads, "r1", res["r1_loss"].item(),
              "d", res["d_loss"].item(), "g", res["g_loss"].item())
    torch.save(out, a.out)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1024:.0f} KiB), GDD {commit}")


if __name__ == "__main__":
    main()
