"""
bench_data.py -- what real data costs at the paper's scale (5.1: 150M pairs; 0.75M steps at 256px x 4096, then
0.25M at 512px x 2048), measured here and extrapolated to GPUs:

  1. decoding and resizing JPEGs as img2dataset stores them, images/s per DataLoader worker, at 256 and 512px;
  2. the md VAE encoder, images/s on this machine, and its MACs per image against the md UNet's;
  3. one md diffusion step on this CPU at a small resolution, with the encoder in it (images) and without it
     (cached latents, --stage encode);
  4. from the MACs, at an assumed 40% of an H100's 989 TFLOP/s (bf16 dense): the images/s one GPU consumes,
     the DataLoader workers it needs, and the days of 5.1's recipe on 8 and 64 GPUs, with and without the cache.

  python bench_data.py                  # ~3 min on 2 cores; --quick for a smoke run; --json out.json
"""

import argparse
import io
import time

import numpy as np
import torch
from PIL import Image

import config
import data
import md
import sample
import vae as vae_lib

H100_BF16_TFLOPS = 989.0          # NVIDIA H100 SXM datasheet: dense BF16 tensor-core peak
MFU = 0.40                        # the assumed share of it a well-tuned training step reaches
RECIPE = [(256, 750_000, 4096), (512, 250_000, 2048)]     # 5.1: (resolution, steps, batch)


def photo_jpeg(seed: int, w: int, h: int) -> bytes:
    """A photo-like JPEG (smooth noise plus fine texture) of w x h at quality 95, as img2dataset writes."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (h // 16, w // 16, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    arr = np.asarray(small, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3))
    buf = io.BytesIO()
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def decode_rate(jpegs: list[bytes], resolution: int, seconds: float) -> float:
    """Images/s of one process (one DataLoader worker) turning JPEG bytes into (3, R, R) training tensors."""
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        data.decode_sample({"jpg": jpegs[n % len(jpegs)], "txt": b"a caption"}, resolution)
        n += 1
    return n / (time.perf_counter() - t0)


@torch.no_grad()
def encoder_rate(vae: vae_lib.VAE, resolution: int, batch: int, repeats: int) -> float:
    x = torch.randn(batch, 3, resolution, resolution)
    vae.encode(x)                                                     # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        vae.encode(x)
    return batch * repeats / (time.perf_counter() - t0)


def diffusion_step_seconds(unet, text_cfg, vae, resolution: int, batch: int, cached: bool, repeats: int) -> float:
    """One optimizer step of the md UNet (forward, backward, AdamW) on a batch at `resolution`, with the frozen
    VAE encoder in the step (cached=False) or latents given (cached=True)."""
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    sched = sample.make_schedule()
    f = vae.cfg.factor
    images = torch.randn(batch, 3, resolution, resolution)
    latents = torch.randn(batch, vae.cfg.latent_channels, resolution // f, resolution // f)
    ctx = torch.randn(batch, text_cfg.max_len, text_cfg.width)          # CLIP's output, frozen (3)
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        if cached:
            z0 = latents
        else:
            with torch.no_grad():
                z0 = vae.encode(images).mode() * vae.cfg.scaling_factor
        t = torch.randint(0, sample.T, (batch,))
        eps = torch.randn_like(z0)
        loss = sample.diffusion_loss(sched, unet(sample.q_sample(sched, z0, t, eps), t, ctx), z0, t, eps, 5.0)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:                                                             # the first one warms up
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: short timings, tiny step benchmark")
    p.add_argument("--json", default="", help="also write the numbers here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sec = 0.5 if args.quick else 4.0
    out = {"threads": torch.get_num_threads()}

    # 1. JPEG decode + resize + crop, one worker (torch threads do not help PIL)
    torch.set_num_threads(1)
    for res, (w, h) in ((256, (512, 683)), (512, (512, 683)), (512, (1024, 768))):
        jpegs = [photo_jpeg(i, w, h) for i in range(8)]
        out[f"decode_{w}x{h}_to_{res}"] = decode_rate(jpegs, res, sec)
    torch.set_num_threads(out["threads"])

    # 2. the md VAE encoder vs the md UNet, per image
    vae = vae_lib.VAE(vae_lib.PRESETS["md"]).eval()
    unet_cfg = md.PRESETS["md"]
    for res in (256, 512):
        with torch.device("meta"):
            enc = vae_lib.VAE(vae_lib.PRESETS["md"])
            out[f"encoder_gmacs_{res}"] = md.count_macs(enc.encoder, torch.zeros(1, 3, res, res)) / 1e9
        out[f"unet_gmacs_{res}"] = md.unet_cost(unet_cfg, res)["gmacs"]
    enc_res = 64 if args.quick else 256
    out[f"encoder_images_per_s_{enc_res}"] = encoder_rate(vae, enc_res, 2 if args.quick else 4, 1 if args.quick else 3)

    # 3. one md diffusion step at a small resolution, with and without the encoder in it
    step_res, batch = (32, 1) if args.quick else (64, 4)
    unet = md.UNet(unet_cfg)
    text_cfg = md.TEXT_PRESETS["clip-l14"]
    for cached in (False, True):
        key = f"md_step_s_{step_res}px_b{batch}_{'cached' if cached else 'encoder'}"
        out[key] = diffusion_step_seconds(unet, text_cfg, vae, step_res, batch, cached, 1 if args.quick else 3)

    # 4. GPU extrapolation: FLOPs per image = 2 x MACs, x3 for forward + backward; the encoder forward only
    gpu = H100_BF16_TFLOPS * 1e12 * MFU
    rows = []
    for res, steps, bs in RECIPE:
        unet_flops, enc_flops = 6e9 * out[f"unet_gmacs_{res}"], 2e9 * out[f"encoder_gmacs_{res}"]
        decode = out["decode_512x683_to_256"] if res == 256 else out["decode_512x683_to_512"]
        for cached in (True, False):
            ips = gpu / (unet_flops + (0 if cached else enc_flops))
            rows.append({"resolution": res, "cached": cached, "images_per_s_per_gpu": ips,
                         "workers_per_gpu": 0 if cached else ips / decode,
                         "days_8_gpus": steps * bs / (8 * ips) / 86400, "days_64_gpus": steps * bs / (64 * ips) / 86400})
    out["gpu_estimate"] = rows
    # the one pass of --stage encode that the cache costs, over 5.1's 150M pairs, at each resolution
    out["encode_pass_days_8_gpus"] = {res: 150e6 * 2e9 * out[f"encoder_gmacs_{res}"] / (8 * gpu) / 86400
                                      for res in (256, 512)}

    print(f"JPEG decode + resize, images/s per worker: 512x683 -> 256: {out['decode_512x683_to_256']:.0f}; "
          f"512x683 -> 512: {out['decode_512x683_to_512']:.0f}; 1024x768 -> 512: {out['decode_1024x768_to_512']:.0f}")
    print(f"md VAE encoder: {out['encoder_gmacs_256']:.1f} / {out['encoder_gmacs_512']:.1f} GMACs per image at "
          f"256 / 512px (md UNet: {out['unet_gmacs_256']:.1f} / {out['unet_gmacs_512']:.1f} per evaluation, x3 "
          f"with its backward); {out[f'encoder_images_per_s_{enc_res}']:.2f} images/s at {enc_res}px on this CPU")
    k_enc, k_cache = (f"md_step_s_{step_res}px_b{batch}_{k}" for k in ("encoder", "cached"))
    print(f"md diffusion step at {step_res}px, batch {batch}, this CPU: {out[k_enc]:.2f} s with the encoder in it, "
          f"{out[k_cache]:.2f} s on cached latents")
    print(f"One H100 at {MFU:.0%} of {H100_BF16_TFLOPS:.0f} TFLOP/s (bf16):")
    print("| px | latents | images/s per GPU | decode workers per GPU | days on 8 GPUs | days on 64 GPUs |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['resolution']} | {'cached' if r['cached'] else 'encoded each step'} | "
              f"{r['images_per_s_per_gpu']:.0f} | {r['workers_per_gpu']:.1f} | {r['days_8_gpus']:.1f} | "
              f"{r['days_64_gpus']:.1f} |")
    total = {c: sum(r["days_8_gpus"] for r in rows if r["cached"] == c) for c in (True, False)}
    print(f"5.1's whole recipe (256px then 512px) on 8 GPUs: {total[True]:.0f} days cached, {total[False]:.0f} "
          f"days encoding every step; on 64 GPUs: {total[True] / 8:.1f} and {total[False] / 8:.1f}")
    enc = out["encode_pass_days_8_gpus"]
    print(f"The cache's one encode pass over 150M pairs on 8 GPUs: {enc[256]:.2f} days at 256px, {enc[512]:.2f} at "
          f"512px (the recipe draws each image ~{RECIPE[0][1] * RECIPE[0][2] / 150e6:.0f} times at 256px)")
    if args.json:
        config.write_json(args.json, out)
    return out


if __name__ == "__main__":
    config.run_cli(main)
