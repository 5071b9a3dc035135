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
  4. the activation memory of the G update at 256 and 512px (autograd's saved tensors, counted by a hook) and
     from it and the state, what fits on one 80 GB GPU at 512px.

  python bench_sd15.py                          # ~10 min on 2 cores; --json out.json; --keep FOLDER reuses one
Needs the dev dependencies (diffusers, transformers, safetensors) and ~5 GB of disk for the folder.
"""

import argparse
import json
import os
import resource
import shutil
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


def run_stage(folder: str, out: str, extra: list[str], resolution: int, steps: int, cap_bytes: int | None) -> dict:
    """One ufogen stage in a child process: its seconds per step (times.json: the loop, one checkpoint write
    included) and peak RSS, or the error it stopped with. cap_bytes: an address-space limit, so that a run that
    cannot fit fails at its first allocation past it (it also limits mmap, so it is not set for runs that fit)."""
    cmd = [sys.executable, "train.py", "--stage", "ufogen", "--preset", "sd", "--init_from", folder,
           "--resolution", str(resolution),
           "--batch_size", "1", "--steps", str(steps), "--train_images", "2", "--eval_images", "1",
           "--eval_steps", "1", "--sample_every", "0", "--warmup", "1", "--overwrite", "true", "--out_dir", out, *extra]

    def cap():
        resource.setrlimit(resource.RLIMIT_AS, (cap_bytes, cap_bytes))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=cap if cap_bytes else None)
    log = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    res = {"command": " ".join(cmd[1:]), "peak_rss_gib": usage.ru_maxrss * 1024 / GiB, "wall_s": time.time() - t0}
    times = os.path.join(out, "times.json")
    if os.WEXITSTATUS(status) == 0 and os.path.isfile(times):
        t = json.load(open(times))["ufogen"]
        res["s_per_step"] = t["minutes"] * 60 / t["steps"]
    elif os.WIFSIGNALED(status):
        res["error"] = f"killed by signal {os.WTERMSIG(status)} (the kernel's OOM killer, if 9)"
    else:
        lines = [l for l in log.splitlines() if "Error" in l or l.startswith("error:")]
        res["error"] = (lines[-1] if lines else log.strip().splitlines()[-1] if log.strip() else "no output")[-300:]
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


def saved_activation_bytes(resolution: int, batch: int = 1, grad_checkpoint: bool = False) -> int:
    """Bytes autograd keeps for the backward of UFOGen's G update at SD-1.5 size: G(x_t) -> x0' -> re-noised
    fake -> D(fake) -> loss (the larger of the stage's two graphs; D's own update sees detached inputs). Counted
    by a saved-tensors hook, each storage once: the activation memory, free of allocator and RSS noise. With
    grad_checkpoint (train.py --grad_checkpoint) what is kept is each block's input (checkpoint saves it
    through the same hook) and what lies between blocks; one block's recomputation in the backward comes on
    top, briefly."""
    torch.manual_seed(0)
    g, d = md.UNet(md.PRESETS["sd"]), md.UNet(md.PRESETS["sd"])
    md.set_grad_checkpointing(g, grad_checkpoint)
    md.set_grad_checkpointing(d, grad_checkpoint)
    h = resolution // 8
    x, ctx, t = torch.randn(batch, 4, h, h), torch.randn(batch, 77, 768), torch.full((batch,), 999)
    weights = {p.untyped_storage().data_ptr() for m in (g, d) for p in m.parameters()}   # saved, but not activations
    seen, total = set(), [0]

    def pack(tensor):
        key = (tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        if key[0] not in weights and key not in seen:
            seen.add(key)
            total[0] += key[1]
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        x0 = 0.068 * x - 0.998 * g(x, t, ctx)                        # eps -> x0 at t = 999 (SD-1.5's alpha, sigma)
        fake = 0.9 * x0 + 0.4 * torch.randn_like(x0)
        d(fake, torch.full((batch,), 249), ctx).mean().backward()
    return total[0]


def state_bytes(n_unet: int, n_lora: int, full: bool) -> dict:
    """fp32 bytes of the UFOGen stage's state: G (the base itself), G's grads and 2 Adam moments (of the trained
    params), G-EMA (a full copy; with LoRA only the factors, sharing G's frozen base), D (a full copy) with its
    grads and 2 moments."""
    trained = n_unet if full else n_lora
    return {"G": 4 * (n_unet + (0 if full else n_lora)), "G grads + Adam": 12 * trained, "G-EMA": 4 * trained,
            "D": 4 * n_unet, "D grads + Adam": 12 * n_unet}


def main(argv=None):
    p = argparse.ArgumentParser(description="UFOGen on SD-1.5 at full size: s/step and peak memory, full vs LoRA")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora_rank", type=int, default=64)
    p.add_argument("--mem_cap_gb", type=float, default=None,
                   help="address-space cap of the full-finetuning run (default 90%% of RAM)")
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
        limit = cap if name == "full" else None
        r = run_stage(folder, os.path.join(tmp, name), extra, args.resolution, args.steps, limit)
        results[name] = r
        capped = f" (address-space cap {cap / GiB:.1f} GiB)" if limit else ""
        print(f"{name}: " + (f"{r['s_per_step']:.1f} s/step" if "s_per_step" in r else f"FAILED ({r['error']})")
              + f", peak RSS {r['peak_rss_gib']:.1f} GiB{capped}", flush=True)
    ck = config.load_checkpoint(os.path.join(tmp, "lora", "ufogen.pt")) if "s_per_step" in results["lora"] else None
    n_lora = sum(t.numel() for t in ck["lora"].values()) if ck else 0
    del ck
    for name in results:                                          # the runs' checkpoints: ~14 GB each
        shutil.rmtree(os.path.join(tmp, name), ignore_errors=True)
    adam = adam_step_seconds(n_unet)
    print(f"Adam step over {n_unet / 1e6:.1f}M params on this CPU: {adam:.1f} s (in a full finetune, not in LoRA)")
    rows = []
    for name in ("lora", "full"):
        st = state_bytes(n_unet, n_lora, name == "full")
        rows.append((name, sum(st.values()) / GiB, st))
    act, act512 = (saved_activation_bytes(r) / GiB for r in (args.resolution, 512))
    act512_ck = saved_activation_bytes(512, grad_checkpoint=True) / GiB
    print(f"\ntraining state (fp32): LoRA rank {args.lora_rank} ({n_lora / 1e6:.1f}M params) {rows[0][1]:.1f} GiB, "
          f"full {rows[1][1]:.1f} GiB")
    print(f"activations of the G update (autograd's saved tensors, fp32): {act:.2f} GiB at {args.resolution}px, "
          f"{act512:.2f} GiB at 512px, per image; with --grad_checkpoint {act512_ck:.2f} GiB at 512px")
    for name, gib, _ in rows:
        fit, fit_ck = (int(max(80 - gib - 2, 0) // a) for a in (act512, act512_ck))
        print(f"  {name}: one 80 GB GPU holds the {gib:.0f} GiB state + ~{fit} images of 512px activations per "
              f"micro-batch ({fit_ck} with --grad_checkpoint)")
    res = {"resolution": args.resolution, "lora_rank": args.lora_rank, "lora_params": n_lora, "runs": results,
           "adam_step_s": adam, "state_gib": {n: g for n, g, _ in rows},
           "state_detail_gib": {n: {k: v / GiB for k, v in st.items()} for n, _, st in rows},
           "activation_gib_per_image": act, "activation_gib_per_image_512": act512,
           "activation_gib_per_image_512_grad_checkpoint": act512_ck}
    if args.json:
        config.write_json(args.json, res)


if __name__ == "__main__":
    main()
