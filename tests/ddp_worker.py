"""Two-process CPU DDP check of common.py (test_common.py item 18); run by tests/test_common.py as

    OMP_NUM_THREADS=1 python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_worker.py PHASE OUT

PHASE train:  DDP and manual-mode (`sync_grads`) training of a tiny U-Net with Adam and EMA, 4 steps each, checking
              after every step that rank 1's parameters and EMA equal rank 0's; a checkpoint before the last DDP
              step (counting the files written); reference statistics and a sharded FID with the stand-in
              detector; `sample`'s sharding (common._sharded); work that one rank does alone failing on a full
              disk (common.agree: rank 0's log line and each method file's final evaluation, rank 1's pair block).
              Rank 0 writes OUT/train.json; every rank writes its final state to OUT/final{rank}.pt.
PHASE resume: fresh processes rebuild everything from OUT/ckpt.pt, run the remaining step and compare bitwise with
              OUT/final{rank}.pt. Rank 0 writes OUT/resume.json.
PHASE waits:  rank 0's downloads (CIFAR-10 through torchvision, Inception through torch hub, common.rank0_first's
              for LPIPS and GDD's backbones; stand-ins that sleep WAIT_S) outlast the default group's timeout
              (DEFAULT_TIMEOUT_S here, NCCL's 10 minutes on a GPU): the other rank waits for them on
              common.wait_for_main's group; then, the control, a barrier of the default group that rank 0 does not
              join times out in less. Each rank writes OUT/waits{rank}.json.
OUT must hold data.npy (uint8 NHWC images), written by the test (train, resume).
"""
import datetime
import gc
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402
import distributional  # noqa: E402
import flow_map  # noqa: E402
import imm  # noqa: E402
import rectified_flow  # noqa: E402
import scm  # noqa: E402
from standin import standin_path  # noqa: E402

B, STEPS, CKPT_STEP = 4, 4, 3  # per-rank batch, optimiser steps, the checkpoint is taken before this step
FID_N, FID_BATCH, FID_SEED = 37, 5, 3
EMA_KW = dict(halflife_kimg=0.02, rampup=0.5)
WAIT_S, DEFAULT_TIMEOUT_S = 3, 2  # phase waits: rank 0's download time, the default group's timeout


def fid_generate(seen=None):
    """generate(rng, labels) for compute_fid: a pure function of the sample indices; records the indices seen."""
    def generate(rng, labels):
        if seen is not None:
            seen.extend(g.initial_seed() - FID_SEED for g in rng.gens)
        return torch.tanh(rng.randn(len(rng.gens), 3, 8, 8))
    return generate


def equal_on_ranks(tensors):
    """True on every rank iff each tensor equals rank 0's copy exactly (torch.equal after a broadcast)."""
    ok = True
    for t in tensors:
        r0 = t.detach().clone()
        dist.broadcast(r0, 0)
        ok = ok and torch.equal(r0, t.detach())
    flag = torch.tensor(float(ok))
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def state(model, ema, opt):
    """Everything a resumed run must reproduce bitwise: weights, EMA (with buffers), Adam moments and steps."""
    sd = {"model." + k: v for k, v in C.unwrap(model).state_dict().items()}
    sd.update({"ema." + k: v for k, v in ema.model.state_dict().items()})
    for i, st in opt.state_dict()["state"].items():
        sd.update({f"opt.{i}.{k}": v for k, v in st.items()})
    return sd


def new_net(env, seed=0, skew_rank1=False):
    torch.manual_seed(seed)
    net = C.build_net(C.net_config("tiny", img_resolution=8, dropout=0.1))
    with torch.no_grad():
        net.out_conv.weight.normal_(0, 0.05)  # non-zero output, so every layer has a gradient from step 0
        if skew_rank1 and env.rank == 1:  # distribute() must replace these by rank 0's weights
            for p in net.parameters():
                p.add_(1.0)
    return net


def train_step(model, ema, opt, gen, data, env, k, manual):
    """One rectified-flow-like step. Manual mode returns whether the raw gradients agreed across ranks before
    sync_grads and whether sync_grads left exactly their mean."""
    x, _ = data.batch(B, k, part=env.rank, parts=env.world)
    t = torch.rand(B, generator=gen)[:, None, None, None]
    z = torch.randn_like(x)  # the global RNG is per rank after distribute()
    loss = (model((1 - t) * x + t * z, t.flatten()) - (z - x)).square().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    raw_equal = is_mean = None
    if manual:
        params = list(C.unwrap(model).parameters())
        raw_equal = equal_on_ranks([p.grad for p in params])
        summed = [p.grad.clone() for p in params]
        for g in summed:
            dist.all_reduce(g)
        C.sync_grads(C.unwrap(model), env)
        is_mean = all(torch.equal(p.grad, g / env.world) for p, g in zip(params, summed))
    opt.step()
    ema.update(model, nimg=k * B * env.world, batch=B * env.world)
    return raw_equal, is_mean


def checkpoint_counted(path, ckpt, env, gens):
    """save_checkpoint with torch.save spied on: returns the files this rank wrote."""
    calls, orig = [], torch.save

    def spy(obj, f, *a, **kw):
        if isinstance(f, (str, os.PathLike)):  # all_gather_object pickles through torch.save into buffers
            calls.append(os.path.basename(f))
        return orig(obj, f, *a, **kw)
    torch.save = spy
    try:
        C.save_checkpoint(path, ckpt, env, gens)
    finally:
        torch.save = orig
    return calls


def gather(obj, env):
    out = [None] * env.world
    dist.all_gather_object(out, obj)
    return out


def one_rank_failures(env, out):
    """Work that one rank does alone, onto a full disk (Linux's /dev/full): every rank must stop with that rank's
    sentence (common.agree), where the others waited at their next collective (gloo: a traceback) and a failing rank 1
    said nothing. -> {case: the UserError of this rank, or None}."""
    full = os.path.join(out, "full")
    methods = dict(imm=(imm, ["--M", "2"]), flow_map=(flow_map, []), scm=(scm, ["--mode", "diffusion"]),
                   distributional=(distributional, ["--teacher_iters", "1"]),
                   rectified_flow=(rectified_flow, ["--stage", "1rf"]))
    if env.is_main:
        for p in ["log/log.jsonl", "pairs/x_00001.npy.tmp", *(f"{m}/samples.png" for m in methods)]:
            os.makedirs(os.path.dirname(os.path.join(full, p)), exist_ok=True)
            os.symlink("/dev/full", os.path.join(full, p))
    C.barrier(env)

    def error(fn):
        try:
            fn()
            msg = None
        except C.UserError as e:
            msg = str(e)
        gc.collect()  # (a failed run's DDP model, held by its traceback, goes before the process group does)
        return msg
    log = lambda: C.Logger(os.path.join(full, "log"), env, 1, 8).log(1, loss=torch.ones(()))  # rank 0 appends
    pair = lambda idx: (torch.zeros(len(idx), 2), torch.zeros(len(idx), 2))  # block j is rank j % 2's
    res = dict(log=error(log), pairs=error(lambda: rectified_flow.write_pairs(
        os.path.join(full, "pairs"), 4, 1, pair, False, "stored", env, {})))
    for name, (m, extra) in methods.items():  # 1 toy step, then the final evaluation's samples.png on rank 0
        res[name] = error(lambda: m.main(["--out", os.path.join(full, name), "--iters", "1", "--batch", "8",
                                          "--eval_n", "16", "--device", "cpu", *extra]))
    return res


def phase_train(env, out):
    data = C.load_data(os.path.join(out, "data.npy"), out, env, 0, True)
    res = {"world": env.world}
    for mode in ("ddp", "manual"):
        manual = mode == "manual"
        model = C.distribute(new_net(env, skew_rank1=True), env, manual=manual)
        res[f"{mode}_is_ddp"] = gather(isinstance(model, torch.nn.parallel.DistributedDataParallel), env)
        ema = C.EMA(model, **EMA_KW)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        gen = torch.Generator().manual_seed(C.derive_seed(0, "t", env.rank))
        rows = [dict(step=-1, params=equal_on_ranks(list(C.unwrap(model).parameters())),
                     ema=equal_on_ranks(list(ema.model.state_dict().values())))]
        for k in range(STEPS):
            if mode == "ddp" and k == CKPT_STEP:
                m = C.unwrap(model)
                ck = dict(model=m.state_dict(), ema=ema.model.state_dict(), opt=opt.state_dict(), step=k,
                          config={"seed": 0}, net=m.config, method="ddp-test", convention="none")
                res["ckpt_writes"] = gather(checkpoint_counted(os.path.join(out, "ckpt.pt"), ck, env, [gen]), env)
                res["tmp_left"] = os.path.exists(os.path.join(out, "ckpt.pt.tmp"))
            raw, is_mean = train_step(model, ema, opt, gen, data, env, k, manual)
            rows.append(dict(step=k, raw_grads_equal=raw, grads_are_mean=is_mean,
                             params=equal_on_ranks(list(C.unwrap(model).parameters())),
                             ema=equal_on_ranks(list(ema.model.state_dict().values()))))
        res[mode] = rows
        res[f"{mode}_moved"] = not torch.equal(ema.model.out_conv.weight, new_net(env).out_conv.weight)
        final = state(model, ema, opt)
        if mode == "ddp":
            torch.save(final, os.path.join(out, f"final{env.rank}.pt"))
            ddp_final = final
        else:  # same init, data and RNG streams: averaging by hand must reproduce DDP's trajectory
            res["manual_equals_ddp"] = gather(all(torch.equal(final[k], ddp_final[k]) for k in final), env)
    ck = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=True)
    res["ckpt_rng_world"] = ck["rng"]["world"]
    res["ckpt_rng_ranks_differ"] = not torch.equal(ck["rng"]["ranks"][0]["cpu"], ck["rng"]["ranks"][1]["cpu"])
    det = C.load_detector(standin_path(), env)
    ref = C.reference_stats(data, det, env, out)  # rank 0 writes the cache; the other rank waits and loads it
    seen = []
    fid = C.compute_fid(fid_generate(seen), FID_N, ref, det, env, FID_BATCH, seed=FID_SEED)
    res["shards"] = gather(seen, env)
    res["fid"] = gather(fid, env)
    made = []  # `sample`: each rank makes the batches the FID gave it; every rank gets all of them in index order

    def batch_of(idx):
        made.extend(idx.tolist())
        return idx.view(-1, 1, 1, 1).expand(-1, 2, 2, 3).to(torch.uint8)
    x = C._sharded(batch_of, FID_N, FID_BATCH, env, (2, 2, 3), torch.uint8)
    res["sample_made"] = gather(made, env)
    res["sample_in_order"] = gather(x.shape == (FID_N, 2, 2, 3) and x[:, 1, 1, 2].tolist() == list(range(FID_N)), env)
    one = C._sharded(lambda idx: idx[:, None].float().expand(-1, 2), 1, FID_BATCH, env, (2,), torch.float32)
    res["sample_one"] = gather(one.tolist(), env)  # fewer samples than ranks: rank 1 makes none
    res["one_rank_failures"] = gather(one_rank_failures(env, out), env)
    if env.is_main:
        with open(os.path.join(out, "train.json"), "w") as f:
            json.dump(res, f)


def phase_resume(env, out):
    data = C.load_data(os.path.join(out, "data.npy"), out, env, 0, True)
    ck = C.load_checkpoint(os.path.join(out, "ckpt.pt"))
    torch.manual_seed(1234)  # a different initialisation and RNG: everything must come from the checkpoint
    net = C.build_net(ck["net"])
    C.load_state_strict(net, ck["model"])
    model = C.distribute(net, env)
    ema = C.EMA(model, **EMA_KW)
    C.load_state_strict(ema.model, ck["ema"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.load_state_dict(ck["opt"])
    gen = torch.Generator().manual_seed(999)
    C.restore_rng(ck, env, [gen])
    for k in range(ck["step"], STEPS):
        train_step(model, ema, opt, gen, data, env, k, False)
    want, got = torch.load(os.path.join(out, f"final{env.rank}.pt"), weights_only=True), state(model, ema, opt)
    bad = sorted(set(want) ^ set(got)) + [k for k in want if k in got and not torch.equal(want[k], got[k])]
    res = dict(start=ck["step"], mismatch=gather(bad[:10], env), n_compared=len(want))
    if env.is_main:
        with open(os.path.join(out, "resume.json"), "w") as f:
            json.dump(res, f)


def phase_waits(env, out):
    import numpy as np
    import torchvision

    marker = os.path.join(out, "downloaded")

    class SlowCIFAR10:  # torchvision.datasets.CIFAR10 as _image_dataset calls it; its download takes WAIT_S
        def __init__(self, root, train=True, download=False):
            if download:
                time.sleep(WAIT_S)
                open(marker, "w").close()
            if not os.path.exists(marker):
                raise RuntimeError("Dataset not found")
            self.data, self.targets = np.zeros((4, 8, 8, 3), np.uint8), [0, 1, 2, 3]

    def slow_download(url, path, progress=False):
        time.sleep(WAIT_S)
        shutil.copy(standin_path(), path)

    def fetched(path):  # rank 0 downloads (WAIT_S), the others find its file, or not had they not waited for it
        if env.is_main:
            time.sleep(WAIT_S)
            open(path, "w").close()
        return os.path.exists(path)
    torchvision.datasets.CIFAR10, torch.hub.download_url_to_file = SlowCIFAR10, slow_download
    torch.hub.set_dir(os.path.join(out, "hub"))
    res = dict(rank=env.rank, images=list(C._image_dataset("cifar10", out, env)[0].shape),
               detector=C.load_detector("inception", env).dim,  # and LPIPS's and GDD's weights, rank 0 first:
               backbone=C.rank0_first(env, lambda: fetched(os.path.join(out, "backbone")))[0])
    if not env.is_main:  # the control: a barrier of the default group that rank 0 does not join times out sooner
        t = time.time()  # than the downloads took (its group, which held the first barrier, is broken by it)
        try:
            dist.barrier()
            res["control"] = "passed"
        except RuntimeError as e:
            res["control"] = f"{type(e).__name__}: {e}"
        res["control_s"] = time.time() - t
    with open(os.path.join(out, f"waits{env.rank}.json"), "w") as f:
        json.dump(res, f)
    dist.barrier(group=env.waits)
    os._exit(0)  # (main_guard's teardown would use the default group the control broke)


if __name__ == "__main__":
    phase, out_dir = sys.argv[1], sys.argv[2]
    if phase == "waits":  # the default group with a short timeout, as NCCL's 10 minutes against a slow download,
        ready = [os.path.join(out_dir, f"ready{r}") for r in range(2)]  # formed once both ranks have started (a
        open(ready[int(os.environ["RANK"])], "w").close()  # rank slower to import torch would outlast it)
        while not all(map(os.path.exists, ready)):
            time.sleep(0.02)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=DEFAULT_TIMEOUT_S))
    env = C.setup("cpu", 0, "fp32")
    assert env.world == 2 and dist.is_initialized() and dist.get_backend() == "gloo"

    def run():  # progress lines on stderr say where a failed run stopped
        {"train": phase_train, "resume": phase_resume, "waits": phase_waits}[phase](env, out_dir)
        print(f"rank {env.rank}: {phase} done", file=sys.stderr, flush=True)
    C.main_guard(run)
    print(f"rank {env.rank}: {phase} finished, process group destroyed", file=sys.stderr, flush=True)
