"""Golden outputs of NVlabs/edm's own networks, preconditioners and Heun sampler for tests/test_edm.py.

    python tests/golden/make_edm_golden.py /path/to/edm-checkout [--out tests/golden]

Imports EDM from the checkout given (it needs only torch, numpy, requests and, for generate.py, click, tqdm and
PIL, e.g. `pip install --target /tmp/site tqdm` and PYTHONPATH=/tmp/site). No EDM code lives in this file: it
builds four tiny SongUNets with EDM's constructors (DDPM++ under VPPrecond and NCSN++ under VEPrecond, each
unconditional and 10-class conditional, augment_dim 9), offsets every weight by N(0, 0.1^2) noise so that no
layer is near its 1e-5 init, and writes
  edm_<case>.pkl.gz   each network pickled exactly as EDM's training loop writes network-snapshot-*.pkl
                      (dict(ema, loss_fn, augment_pipe, dataset_kwargs), pickle.dump), gzip-compressed;
  edm_golden.pt       inputs and EDM's outputs: the raw network F(x, c_noise, labels[, augment labels]), D(x;
                      sigma, labels) with and without augment labels, EDMPrecond's D on the NCSN++ cond weights,
                      and edm_sampler (18 steps, 35 evaluations) on the VP cond and VE uncond networks;
plus the EDM commit (git rev-parse HEAD in the checkout) and the torch version.
"""
import argparse, copy, gzip, os, pickle, subprocess, sys

import torch

CASES = {  # tiny versions of EDM's train.py --arch ddpmpp / ncsnpp (resolution 8, 3 channels)
    "vp_ddpmpp_uncond": ("VPPrecond", 0, dict(embedding_type="positional", encoder_type="standard",
                                              channel_mult_noise=1, resample_filter=[1, 1], channel_mult=[1, 2])),
    "vp_ddpmpp_cond": ("VPPrecond", 10, dict(embedding_type="positional", encoder_type="standard",
                                             channel_mult_noise=1, resample_filter=[1, 1], channel_mult=[1, 2])),
    "ve_ncsnpp_uncond": ("VEPrecond", 0, dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                                              resample_filter=[1, 3, 3, 1], channel_mult=[1, 2, 2])),
    "ve_ncsnpp_cond": ("VEPrecond", 10, dict(embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                                             resample_filter=[1, 3, 3, 1], channel_mult=[1, 2, 2])),
}
COMMON = dict(img_resolution=8, img_channels=3, model_type="SongUNet", model_channels=4, num_blocks=1,
              attn_resolutions=[4], augment_dim=9, dropout=0.1, decoder_type="standard")
SIGMAS = [0.002, 0.05, 0.7, 5.0, 80.0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("edm", help="path of an NVlabs/edm checkout")
    ap.add_argument("--out", default=os.path.dirname(os.path.abspath(__file__)))
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.edm))
    import dnnlib  # noqa: F401  (EDM's)
    from training import networks, augment
    from generate import edm_sampler
    commit = subprocess.check_output(["git", "-C", a.edm, "rev-parse", "HEAD"], text=True).strip()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator().manual_seed(2024)
    B = len(SIGMAS)
    x = torch.randn(B, 3, 8, 8, generator=g) * torch.tensor(SIGMAS).clamp(min=1).reshape(-1, 1, 1, 1)
    sigma = torch.tensor(SIGMAS)
    y = torch.tensor([0, 3, 7, 9, 5])
    onehot = torch.eye(10)[y]
    aug = torch.randn(B, 9, generator=g)
    golden = dict(edm_commit=commit, torch=str(torch.__version__), x=x, sigma=sigma, labels=y, aug=aug, cases={})
    nets = {}
    for i, (case, (cls, label_dim, kw)) in enumerate(CASES.items()):
        torch.manual_seed(100 + i)
        net = getattr(networks, cls)(label_dim=label_dim, **COMMON, **kw)
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
        net = net.eval().requires_grad_(False)
        nets[case] = net
        lab = onehot if label_dim else None
        with torch.no_grad():
            s4 = sigma.reshape(-1, 1, 1, 1)
            if cls == "VPPrecond":
                c_in, c_noise = 1 / (s4 ** 2 + 1).sqrt(), (net.M - 1) * net.sigma_inv(sigma)
            else:
                c_in, c_noise = torch.ones_like(s4), (0.5 * sigma).log()
            F_raw = net.model(c_in * x, c_noise, class_labels=lab)
            F_aug = net.model(c_in * x, c_noise, class_labels=lab, augment_labels=aug)
            D = net(x, sigma, lab)
            D_aug = net(x, sigma, lab, augment_labels=aug)
        golden["cases"][case] = dict(pickle=f"edm_{case}.pkl.gz", F=F_raw, F_aug=F_aug, D=D, D_aug=D_aug,
                                     sigma_min=torch.tensor(float(net.sigma_min), dtype=torch.float64),
                                     sigma_max=torch.tensor(float(net.sigma_max), dtype=torch.float64))
        loss_fn = getattr(__import__("training.loss", fromlist=["x"]), cls.replace("Precond", "Loss"))()
        pipe = augment.AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
        data = dict(ema=copy.deepcopy(net).eval().requires_grad_(False).cpu(), loss_fn=loss_fn, augment_pipe=pipe,
                    dataset_kwargs=dict(class_name="training.dataset.ImageFolderDataset", path="tiny-8x8.zip",
                                        use_labels=bool(label_dim), xflip=False, cache=True, resolution=8,
                                        max_size=100))
        # gzip only to keep the fixture small (the bytes still differ run to run: torch's storage keys inside)
        with open(os.path.join(a.out, f"edm_{case}.pkl.gz"), "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as f:
            pickle.dump(data, f)
    # EDMPrecond around the NCSN++ cond network's weights
    src = nets["ve_ncsnpp_cond"]
    edm = networks.EDMPrecond(label_dim=10, **COMMON, **CASES["ve_ncsnpp_cond"][2]).eval()
    edm.model.load_state_dict(src.model.state_dict())
    with torch.no_grad():
        golden["edm_precond"] = dict(weights="ve_ncsnpp_cond", D=edm(x, sigma, onehot),
                                     D_aug=edm(x, sigma, onehot, augment_labels=aug))
    # Heun (edm_sampler's defaults: 18 steps, sigma 0.002..80, rho 7, S_churn 0)
    golden["heun"] = {}
    for case, lab in (("vp_ddpmpp_cond", torch.eye(10)[torch.tensor([2, 8])]), ("ve_ncsnpp_uncond", None)):
        lat = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
        calls = []
        net = nets[case]
        hook = net.register_forward_pre_hook(lambda m, a: calls.append(1))
        with torch.no_grad():
            out = edm_sampler(net, lat, lab)
        hook.remove()
        golden["heun"][case] = dict(latents=lat, labels=torch.tensor([2, 8]) if lab is not None else None,
                                    out=out, nfe=len(calls))
    torch.save(golden, os.path.join(a.out, "edm_golden.pt"))
    print(f"EDM {commit}: wrote {len(CASES)} pickles and edm_golden.pt to {a.out}; "
          f"Heun NFE {[v['nfe'] for v in golden['heun'].values()]}")


if __name__ == "__main__":
    main()
