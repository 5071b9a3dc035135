"""
bench_sd15.py -- UFOGen (4) on Stable Diffusion 1.5 at its full size: what one step costs, measured on this
machine with the real command, and what that means for one 80 GB GPU.

  1. writes a random-weight SD-1.5 pipeline folder with diffusers (UNet2DConditionModel at SD-1.5's config,
     859.5M params; AutoencoderKL; a CLIP-ViT/L14-sized text model) and StableDiffusionPipeline.save_pretrained;
  2. runs `python train.py --stage ufogen --init_from FOLDER` in a child process for LoRA (4.3) and for full
     finetuning at --resolution (256) and batch 1, and reports seconds per step (the stage's own times.json)
     and the child's peak RSS (os.wait4). A run that does not fit under --mem_cap_gb (default: 90% of this
     machine's RAM) stops with an allocation error rather than the kernel's OOM killer;
  3. counts, from parameter numbers, the bytes of the training state (G, its gradients and Adam moments, G-EMA,
     D with its gradients and moments), and times one Adam step over 859.5M parameters, the part of a full
     finetune's step that LoRA does not have;
  4. from the measured activation memory (peak RSS minus state and model bytes) at 256px and batch 1, scaled by
     pixels and batch, what fits on one 80 GB GPU at 512px.

  python bench_sd15.py                          # ~10 min on 2 cores; --json out.json; --keep FOLDER reuses one
Needs the dev dependencies (diffusers, transformers, safetensors) and ~5 GB of disk for the folder.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

import config
import md

GiB = 2 ** 30


def make_sd15_folder(path: str) -> None:
    """A random SD-1.5: its UNet, VAE and scheduler configs as diffusers' defaults give them, a CLIP-L-sized text
    encoder over a byte-level vocabulary (random weights need no real merges; the vocabulary is CLIP's size)."""
    diffusers = config.need("diffusers", "diffusers")
    transformers = config.need("transformers", "transformers")
    torch.manual_seed(0)
    b2u = md._bytes_to_unicode()
    vocab = list(b2u.values()) + [c + "</w>" for c in b2u.values()] + ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = os.path.join(path, "_tok")
    os.makedirs(tok_dir, exist_ok=True)
    config.write_json(os.path.join(tok_dir, "vocab.json"), {t: i for i, t in enumerate(vocab)})
    config.write_text(os.path.join(tok_dir, "merges.txt"), "#version: 0.2\n")
    tok = transformers.CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                     model_max_length=77)
    text = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu"))
    vae = diffusers.AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2,
                                  sample_size=512)
    unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    sched = diffusers.PNDMScheduler.from_config(dict(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False,
        skip_prk_steps=True, steps_offset=1))
    diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tok, unet=unet, scheduler=sched,
                                      safety_checker=None, feature_extractor=None,
                                      requires_safety_checker=False).save_pretrained(path)


def run_stage(folder: str, out: str, extra: list[str], resolution: int, steps: int, cap_bytes: int) -> dict:
    """One ufogen stage in a child process: its seconds per step and peak RSS, or the error it stopped with."""
    cmd = [sys.executable, "train.py", "--stage", "ufogen", "--init_from", folder, "--resolution", str(resolution),
           "--batch_size", "1", "--steps", str(steps), "--train_images", "2", "--eval_images", "1",
           "--eval_steps", "1", "--sample_every", "0", "--warmup", "1", "--overwrite", "true", "--out_dir", out, *extra]

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=cap)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    res = {"command": " ".join(cmd[1:]), "peak_rss_gib": usage.ru_maxrss * 1024 / GiB, "wall_s": time.time() - t0}
    times = os.path.join(out, "times.json")
    if os.WEXITSTATUS(status) == 0 and os.path.isfile(times):
        t = json.load(open(times))["ufogen"]
        res["s_per_step"] = t["minutes"] * 60 / t["steps"]
    else:
        res["error"] = next((l for l in reversed(log.splitlines()) if l.strip()), "no output")[-300:]
    return res


def adam_step_seconds(n: int, repeats: int = 2) -> float:
    """One torch.optim.Adam step (UFOGen's optimiser) over n fp32 parameters with gradients, on this CPU."""
    p = torch.nn.Parameter(torch.zeros(n))
    p.grad = torch.randn(n) * 1e-3
    opt = torch.optim.Adam([p], lr=1e-4)
    opt.step()                                                   # allocates the moments
    t0 = time.time()
    for _ in range(repeats):
        opt.step()
    return (time.time() - t0) / repeats


def state_bytes(n_unet: int, n_lora: int, full: bool) -> dict:
    """fp32 bytes of the UFOGen stage's state: G (the base itself), G's grads and 2 Adam moments (of the trained
    params), G-EMA (a full copy), D (a full copy) with its grads and 2 moments."""
    trained = n_unet if full else n_lora
    return {"G": 4 * n_unet, "G grads + Adam": 12 * trained, "G-EMA": 4 * n_unet, "D": 4 * n_unet,
            "D grads + Adam": 12 * n_unet}


def main(argv=None):
    p = argparse.ArgumentParser(description="UFOGen on SD-1.5 at full size: s/step and peak memory, full vs LoRA")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--mem_cap_gb", type=float, default=None, help="address-space cap per run (default 90%% of RAM)")
    p.add_argument("--keep", default=None, help="write (or reuse) the random SD-1.5 folder here")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    cap = int((args.mem_cap_gb * GiB) if args.mem_cap_gb else 0.9 * ram)
    tmp = tempfile.mkdtemp(prefix="sd15_")
    folder = args.keep or os.path.join(tmp, "sd15")
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        t0 = time.time()
        make_sd15_folder(folder)
        print(f"wrote a random SD-1.5 folder to {folder} ({time.time() - t0:.0f} s)", flush=True)
    n_unet = 859_520_964
    results = {}
    for name, extra in (("lora", ["--ufogen_lora_rank", str(args.lora_rank)]), ("full", [])):
        r = run_stage(folder, os.path.join(tmp, name), extra, args.resolution, args.steps, cap)
        results[name] = r
        print(f"{name}: " + (f"{r['s_per_step']:.1f} s/step" if "s_per_step" in r else f"FAILED ({r['error']})")
              + f", peak RSS {r['peak_rss_gib']:.1f} GiB (cap {cap / GiB:.1f} GiB)", flush=True)
    ck = config.load_checkpoint(os.path.join(tmp, "lora", "ufogen.pt")) if "s_per_step" in results["lora"] else None
    n_lora = sum(t.numel() for t in ck["lora"].values()) if ck else 0
    adam = adam_step_seconds(n_unet)
    print(f"Adam step over {n_unet / 1e6:.1f}M params on this CPU: {adam:.1f} s (in a full finetune, not in LoRA)")
    rows = []
    for name in ("lora", "full"):
        st = state_bytes(n_unet, n_lora, name == "full")
        rows.append((name, sum(st.values()) / GiB, st))
    lora_state = rows[0][1]
    act = max(results["lora"]["peak_rss_gib"] - lora_state - 1.0, 0.0) if ck else float("nan")   # 1 GiB: VAE, CLIP,
    scale = (512 / args.resolution) ** 2                                                           # torch itself
    print(f"\ntraining state (fp32): LoRA rank {args.lora_rank} ({n_lora / 1e6:.1f}M params) {rows[0][1]:.1f} GiB, "
          f"full {rows[1][1]:.1f} GiB")
    print(f"activations, measured: ~{act:.1f} GiB at {args.resolution}px batch 1 -> ~{act * scale:.1f} GiB per "
          f"image at 512px")
    for name, gib, _ in rows:
        fit = int(max(80 - gib - 2, 0) // max(act * scale, 1e-9))
        print(f"  {name}: one 80 GB GPU holds the {gib:.0f} GiB state + ~{fit} images of 512px activations per "
              f"micro-batch (without gradient checkpointing)")
    res = {"resolution": args.resolution, "lora_rank": args.lora_rank, "lora_params": n_lora, "runs": results,
           "adam_step_s": adam, "state_gib": {n: g for n, g, _ in rows},
           "state_detail_gib": {n: {k: v / GiB for k, v in st.items()} for n, _, st in rows},
           "activation_gib_per_image": act, "activation_gib_per_image_512": act * scale}
    if args.json:
        config.write_json(args.json, res)


if __name__ == "__main__":
    main()
