"""Golden outputs of IMM's CIFAR-10 network (lumalabs/imm training/unets.py SongUNet with the DDPM++ settings of
configs/cifar10_generate_images.yaml: positional embedding, s_embed true, the second time branch summed) at a tiny
size, for tests/test_imm.py: the network output and, above all, its time path, which IMM's code runs in float64
(PositionalEmbedding's frequencies are float64, so the embedding, the mapping layers and every block's affine follow).

    python tests/golden/make_imm_net_golden.py /path/to/imm-checkout [--out tests/golden]

No IMM code lives here: it builds the network with IMM's constructor (resolution 8, model_channels 8,
channel_mult [1,2], one block per level, attention at 4x4, dropout 0), offsets every weight by N(0, 0.1^2), and
stores the state dict, inputs and, for pairs of nearby times (t, r) with a shared s as IMM's training step draws
them near T (k = 15: t - r ~ 2e-7, a few fp32 ulps) and far from it: the noise labels 1000 t, 1000 s in fp32 (as
IMMPrecond.forward_model computes them), the network outputs, and the first encoder block's affine input (the
embedding) and output, recorded in their own (float64) dtype by forward hooks.
"""
import argparse, os, subprocess, sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("imm", help="path of a lumalabs/imm checkout")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.imm))
    from training.unets import SongUNet
    commit = subprocess.check_output(["git", "-C", a.imm, "rev-parse", "HEAD"], text=True).strip()
    kw = dict(img_resolution=8, in_channels=3, out_channels=3, embedding_type="positional", encoder_type="standard",
              decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1], model_channels=8,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], dropout=0.0, s_embed=True)
    torch.manual_seed(11)
    net = SongUNet(**kw).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    blk = net.enc["8x8_block0"]
    rec = []
    blk.affine.register_forward_hook(lambda m, i, o: rec.append((i[0].detach().clone(), o.detach().clone())))
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 8, 8, generator=g)
    # t near T = 0.994 and a few fp32 ulps below it (IMM's r at k = 15), and a far pair; s below both
    t = torch.tensor([0.994, 0.994, 0.9, 0.5], dtype=torch.float32)
    r = torch.tensor([0.994 - 1.8e-7, 0.994 - 3e-7, 0.9 - 5e-5, 0.49], dtype=torch.float32)
    s = torch.tensor([0.3, 0.9, 0.2, 0.1], dtype=torch.float32)
    out = {}
    with torch.no_grad():
        for name, tt in (("t", t), ("r", r)):
            rec.clear()
            out["out_" + name] = net(x, (tt * 1000).flatten(), (s * 1000).flatten())  # IMMPrecond: c_noise = t * time_scale
            out["emb_" + name], out["affine_" + name] = rec[0]
    assert out["emb_t"].dtype == torch.float64 and out["affine_t"].dtype == torch.float64
    torch.save(dict(commit=commit, config=kw, state=net.state_dict(), x=x, t=t, r=r, s=s, **out),
               os.path.join(a.out, "imm_net_golden.pt"))
    print(f"lumalabs/imm {commit}: wrote imm_net_golden.pt")


if __name__ == "__main__":
    main()
