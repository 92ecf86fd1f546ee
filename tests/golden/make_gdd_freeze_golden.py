"""Golden fixture: the parameters GDD-I leaves frozen, decided by Zyriix/GDD's own code.

Imports Zyriix/GDD from a checkout given on the command line, builds its generator (training/networks.py
GDDPrecond around EDM's SongUNet) with train.py's CIFAR-10 settings for --arch=ddpmpp and --arch=ncsnpp, and runs
the optimiser set-up block of training/training_loop.py (the lines from `g_params = net.parameters()` up to the
DDP wrapper, read from the file and executed unchanged) with train.py's `--freeze=1` list ['conv', 'proj']. The
parameters it leaves out of G's optimiser never change (training/loss.py turns requires_grad back on for some of
them, but no optimiser steps them), so they are GDD-I's frozen set. The fixture stores, per architecture, the frozen
names (GDDPrecond's `model.` prefix removed), their element count and the network's total; tests/test_distributional.py
compares them with distributional.frozen on this project's network of the same layout.

    python tests/golden/make_gdd_freeze_golden.py --gdd /tmp/scratch/gdd --commit e9267e8afde48af83249bab05c245fb917340dfa
"""
import argparse
import json
import os
import subprocess
import sys
import types

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "gdd_freeze.json")
ARCHS = {  # train.py, "Network architecture" (CIFAR-10: 32x32, unconditional, dropout 0 as train.sh)
    "ddpmpp": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                   decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
    "ncsnpp": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                   decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1], model_channels=128,
                   channel_mult=[2, 2, 2]),
}


def optimiser_block(path):
    """training_loop.py's lines from `g_params = net.parameters()` to the line before `ddp_g = ...`, dedented."""
    lines = open(path).read().splitlines()
    a = next(i for i, l in enumerate(lines) if l.strip() == "g_params = net.parameters()")
    b = next(i for i, l in enumerate(lines) if l.strip().startswith("ddp_g ="))
    return "\n".join(l[4:] for l in lines[a:b])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gdd", required=True)
    ap.add_argument("--commit", required=True)
    a = ap.parse_args()
    head = subprocess.run(["git", "-C", a.gdd, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head == a.commit, (head, a.commit)
    sys.path.insert(0, a.gdd)
    from training.networks import GDDPrecond
    code = optimiser_block(os.path.join(a.gdd, "training", "training_loop.py"))
    out = dict(commit=a.commit, freeze_layer=["conv", "proj"], archs={})
    for arch, kw in ARCHS.items():
        torch.manual_seed(0)
        net = GDDPrecond(img_resolution=32, img_channels=3, label_dim=0, use_fp16=False, dropout=0.0, **kw)
        scope = dict(net=net, freeze_layer=["conv", "proj"], dist=types.SimpleNamespace(print0=lambda *x: None))
        exec(code, scope)
        kept = {id(p) for p in scope["g_params"]}
        names = sorted(n[len("model."):] for n, p in net.named_parameters() if id(p) not in kept)
        out["archs"][arch] = dict(frozen=names,
                                  frozen_numel=sum(p.numel() for p in net.parameters() if id(p) not in kept),
                                  total_numel=sum(p.numel() for p in net.parameters()))
        print(arch, len(names), out["archs"][arch]["frozen_numel"], out["archs"][arch]["total_numel"])
    with open(FIXTURE, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
