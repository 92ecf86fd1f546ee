"""Golden outputs of py-meanflow's CIFAR-10 network (Gsunshine/py-meanflow meanflow/models/unet.py SongUNet, the
v0 configuration of models/model_configs.py: channel_mult_noise 2, resample_filter [1,3,3,1], its two time
embeddings concatenated, q | k | v attention split, augment_dim 6) at a tiny size, for tests/test_edm.py.

    python tests/golden/make_meanflow_net_golden.py /path/to/py-meanflow-checkout [--out tests/golden]

No py-meanflow code lives here: it builds the network with py-meanflow's constructor (resolution 8, model_channels
4, channel_mult [1,2], one block per level, attention at 4x4, dropout 0), offsets every weight by N(0, 0.1^2) and
stores the state dict, inputs (x, t, h = t - r, augmentation labels) and outputs with and without augmentation
labels, plus the commit, in meanflow_net_golden.pt.
"""
import argparse, os, subprocess, sys

import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("meanflow", help="path of a Gsunshine/py-meanflow checkout")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    sys.path.insert(0, os.path.join(os.path.abspath(a.meanflow), "meanflow"))
    from models.unet import SongUNet
    from models.model_configs import MODEL_CONFIGS
    commit = subprocess.check_output(["git", "-C", a.meanflow, "rev-parse", "HEAD"], text=True).strip()
    kw = {**MODEL_CONFIGS["unet"], "img_resolution": 8, "channel_mult": [1, 2]}
    torch.manual_seed(7)
    net = SongUNet(**kw, model_channels=4, num_blocks=1, attn_resolutions=[4], augment_dim=6, dropout=0.0).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    g = torch.Generator().manual_seed(1)
    x, t, r, aug = torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, generator=g), torch.rand(4, generator=g), \
        torch.randn(4, 6, generator=g)
    with torch.no_grad():
        out, out_aug = net(x, (t, t - r)), net(x, (t, t - r), aug)
    torch.save(dict(commit=commit, config={k: v for k, v in kw.items()}, state=net.state_dict(), x=x, t=t, h=t - r,
                    aug=aug, out=out, out_aug=out_aug), os.path.join(a.out, "meanflow_net_golden.pt"))
    print(f"py-meanflow {commit}: wrote meanflow_net_golden.pt")


if __name__ == "__main__":
    main()
