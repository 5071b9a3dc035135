"""
bench_weights.py -- what one-step sampling of the md model at 512px costs in RAM: from the training checkpoint
(ufogen.pt: G, G-EMA, D and both Adam states) against its inference weights (ufogen.safetensors, written by
the stage or `train.py --export_weights`). Random weights (the memory does not depend on them), a random text
encoder of CLIP-ViT/L14's size (train_utils.BENCH_TEXT).

  python bench_weights.py                      # writes ~12 GB into --work, then samples from each file
  python bench_weights.py --old_code ../old    # also sample.py of another checkout on the same ufogen.pt

Each sample runs in its own process (sample.py, one image of 512x512, 1 step); its peak resident set (VmHWM)
is read by a wrapper, so the figure is the whole process's: Python, torch, the weights, the activations.
"""

import argparse
import dataclasses
import os
import subprocess
import sys
import time

import torch

import md
import sample
import train
import train_utils
import ufogen
import vae as vae_lib

PEAK = ("import runpy, sys\nsys.argv = sys.argv[1:]\nsys.path.insert(0, '.')\n"
        "try:\n    runpy.run_path('sample.py', run_name='__main__')\nfinally:\n"
        "    hwm = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:'))\n"
        "    print(f'PEAK_KB {hwm}', file=sys.stderr)\n")


def make_ufogen_checkpoint(path: str, resolution: int) -> None:
    """A ufogen.pt as train.py's ufogen stage writes it (save_generator) for the md preset, full finetuning,
    with both optimisers' Adam moments allocated (one step on zero gradients)."""
    nets = train.PRESETS["md"]
    torch.manual_seed(0)
    text = md.TextEncoder(train_utils.BENCH_TEXT)
    gen = md.UNet(nets["unet"])
    gen_ema, disc = train_utils.share_frozen(md.UNet(nets["unet"]), gen), ufogen.Discriminator(gen)
    vae = vae_lib.VAE(nets["vae"])
    cfg = train.TrainConfig(stage="ufogen", preset="md", resolution=resolution)
    opts = []
    for params in (list(gen.parameters()), list(disc.parameters())):
        opt = torch.optim.Adam(params, lr=1e-6)
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
        opts.append(opt)
    base_conf = {"unet": dataclasses.asdict(gen.cfg), "text": dataclasses.asdict(text.cfg),
                 "vae": dataclasses.asdict(vae.cfg)}
    scaler = train_utils.LossScaler(cfg, "cpu")
    train_utils.save_generator(path, cfg, 1, gen, gen_ema, text, vae, base_conf,
                               {"ufogen": nets["ufogen"], "schedule": sample.ScheduleConfig()},
                               g_raw=gen, g_ema_raw=gen_ema, d=disc, opt_g=opts[0], opt_d=opts[1], scaler=scaler)


def peak_of_sample(code_dir: str, ckpt: str, resolution: int, out: str) -> tuple[float, float]:
    """(peak resident GiB, seconds) of one `sample.py` process of code_dir: one 512px image, one step."""
    argv = [sys.executable, "-c", PEAK, "sample.py", "--ckpt", os.path.abspath(ckpt), "--prompt", "a red circle",
            "--n", "1", "--resolution", str(resolution), "--out", os.path.abspath(out)]
    t0 = time.time()
    res = subprocess.run(argv, cwd=code_dir, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"sample.py in {code_dir} failed:\n{res.stderr[-2000:]}")
    kb = next(int(line.split()[1]) for line in res.stderr.splitlines() if line.startswith("PEAK_KB"))
    return kb / 2 ** 20, time.time() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="out/bench_weights", help="where the ~12 GB of files go")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--old_code", default="", help="another checkout whose sample.py also samples ufogen.pt")
    args = p.parse_args(argv)
    os.makedirs(args.work, exist_ok=True)
    ckpt = os.path.join(args.work, "ufogen.pt")
    if not os.path.isfile(ckpt):
        make_ufogen_checkpoint(ckpt, args.resolution)
    weights = sample.weights_path(ckpt)
    if not os.path.isfile(weights):
        train_utils.export_weights(ckpt)
    gib = lambda f: os.path.getsize(f) / 2 ** 30
    here = os.path.dirname(os.path.abspath(__file__))
    runs = [("this code, ufogen.pt", here, ckpt), ("this code, inference weights", here, weights)]
    if args.old_code:
        runs.insert(0, (f"{args.old_code}, ufogen.pt", args.old_code, ckpt))
    print(f"md one-step sample at {args.resolution}px: ufogen.pt {gib(ckpt):.2f} GiB, {os.path.basename(weights)} "
          f"{gib(weights):.2f} GiB ({md.count_params(md.UNet(train.PRESETS['md']['unet'])) / 1e6:.0f}M-param UNet)")
    for name, code, path in runs:
        peak, secs = peak_of_sample(code, path, args.resolution, os.path.join(args.work, "sample.png"))
        print(f"  {name}: peak RSS {peak:.2f} GiB, {secs:.0f} s")


if __name__ == "__main__":
    main()
