"""
Every training stage of MobileDiffusion, nanoGPT-style: flags generated from the dataclasses, one visible
loop per stage, DDP from torchrun's environment variables, gradient accumulation, autocast (bf16 on GPUs
that support it, a no-op on CPU), optional torch.compile, checkpoints written atomically with everything
needed to resume bit-identically. The plumbing under the loops (devices, checkpoints, the data stream, the
metrics and the throughput report) is in train_utils.py.

Stages (--stage), in the order the paper trains them:
  vae       3.5: train the VAE (L2 + KL + perceptual + adversarial)
  decoder   3.5: distil the light decoder from a trained VAE, encoder frozen
  encode    run the frozen VAE encoder once over --data, writing latent shards for --data of the later stages
  diffusion 3 + 5.1: latent diffusion training of the MD UNet (v-prediction, CFG dropout, EMA); with
            --init_from and --attn_act relu it is 3.2's softmax -> ReLU finetune
  ufogen    4: one-step generator by UFOGen adversarial finetuning (losses in ufogen.py), full or LoRA
  distill   abstract: 8-step student distilled from the guided DDIM-50 teacher (target in ufogen.py)
  lora      5.4: a style LoRA on the frozen base model, from a small style set (plugins.py)
  adapter   5.4: a T2I-Adapter for edge maps on the frozen base model (plugins.py)
  all       (default) the tiny end-to-end run on synthetic data, on CPU: vae .. distill

Tiny (CPU, minutes):     python train.py
One stage:               python train.py --stage vae --steps 2000
Paper scale (GPUs):      see README.md ("Paper-scale recipe")
Flags, one per config field: TrainConfig (the run) and UNetConfig (md.py) without a prefix; VAEConfig (vae.py)
as --vae_*, TextConfig (md.py, the tiny encoder) as --text_*, UFOGenConfig and DistillConfig (ufogen.py) as
--ufogen_* and --distill_*, PluginConfig (plugins.py) as --plugin_*. --preset picks all of them (PRESETS).
"""

import argparse
import copy
import dataclasses
import functools
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

import config
import data
import evaluate
import md
import plugins
import pretrained
import sample
import ufogen
import vae as vae_lib            # `vae` is the model's name in every loop
from train_utils import (BENCH_WARMUP, BenchDone, LossScaler, Meter, autocast, build_text_encoder,
                         build_vae_for_diffusion, check_compatible, clip_and_step, describe_denoiser,
                         default_base, diffusion_noise, due, ema_update, ema_warmup, estimate_minutes, export_weights,
                         finish_stage, from_pipeline_folder, gan_optimizers, generator_schedule, grid_prompts,
                         init_denoiser, init_schedule, latent_batch, latent_macs, light_from_teacher,
                         load_base, make_optimizer, make_perceptual, micro_slice, null_context, one_latent,
                         progress_grid, restore, release_freed_memory, resume_autoencoder, resume_diffusion,
                         save_autoencoder, save_diffusion, save_due, save_generator, set_lr, setup,
                         share_frozen, stage_checkpoint, stage_data, step_generator, to_latents, vae_macs,
                         validation_batch, validation_loss, wrap, yields_latents)


@dataclass
class TrainConfig:
    stage: str = "all"               # one of STAGES, or all (ALL_STAGES: the tiny end-to-end run)
    preset: str = "tiny"             # model presets by name: tiny (CPU) or md / md-lite (paper)
    out_dir: str = "out/tiny"        # checkpoints, metrics.jsonl, loss curves, sample grids, eval.json
    data: str = "shapes"             # shapes | shapes-varied (synthetic, data.GEOMETRY) | an image folder
                                     # (metadata.jsonl / .txt captions) | tar shards ('s/{00000..00099}.tar', a
                                     # folder or a .txt list of .tar files) | a latents folder (--stage encode)
    min_size: int = 0                # real data: drop (and count) images whose shorter side is below this
    shuffle_buffer: int = 1000       # shards: samples mixed in each reader's shuffle buffer
    latents_dir: str = ""            # --stage encode writes here (default: out_dir/latents)
    prompts: str = ""                # progress grids: a prompts file (default: held-out captions)
    random_flip: bool = False        # real images: flip half of each batch left-right (train_text_to_image)
    style: str = "plain"             # shapes' style: plain | outlined | mixed (the lora stage: outlined)
    resolution: int = 32             # training px (5.1: 256 then 512; tiny: 32, an 8x8 latent)
    batch_size: int = 64             # per optimizer step, over processes and accumulation (STAGE_DEFAULTS)
    grad_accum: int = 1              # micro-steps per optimizer step
    steps: int = 600                 # optimizer steps of this stage (STAGE_DEFAULTS)
    lr: float = 1e-3                 # peak learning rate (STAGE_DEFAULTS; 5.1: 1e-3 for diffusion)
    weight_decay: float = 0.01       # 5.1: AdamW weight decay 0.01
    beta1: float = 0.9               # 5.1
    beta2: float = 0.999             # 5.1
    grad_clip: float = 1.0           # global gradient-norm clip (0 = off)
    warmup: int = 100                # linear learning-rate warm-up steps
    lr_schedule: str = "cosine"      # after warm-up: cosine (to min_lr_frac * lr at the end) or constant
    min_lr_frac: float = 0.1         # nanoGPT: min_lr = lr / 10
    dtype: str = "auto"              # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16
    loss_scale: float = 65536.0      # fp16: the loss scaler's initial scale (torch.amp.GradScaler's 2^16)
    fused: str = "auto"              # AdamW's fused kernel: auto (on CUDA) | on | off (train_utils.fused)
    grad_checkpoint: bool = False    # recompute each UNet block in the backward (md.set_grad_checkpointing):
                                     # ~10x less activation memory for ~1.3x the step time (results.md)
    compile: bool = False            # torch.compile the trained network
    resume: bool = False             # continue this stage from out_dir/<stage>.pt
    overwrite: bool = False          # train a stage again although out_dir/<stage>.pt exists (replaces it)
    init_from: str = ""              # weights to start from: decoder <- a vae.pt; diffusion <- a diffusion.pt
                                     # (5.1's 256 -> 512px schedule); relu <- the softmax base (default
                                     # out_dir/diffusion.pt); ufogen / distill / lora / adapter <- the base
                                     # (default: out_dir/relu.pt if the relu stage ran, else diffusion.pt)
    vae_ckpt: str = ""               # diffusion: our vae.pt / decoder.pt (default: out_dir's decoder, vae)
    vae_diffusers: str = ""          # diffusion: a local diffusers AutoencoderKL folder instead (SD's: c=4)
    text_encoder: str = ""           # diffusion: a local Hugging Face CLIP folder (3: CLIP-ViT/L14, frozen);
                                     # empty = the preset's own (tiny: word tokens, trained jointly)
    p_uncond: float = 0.1            # classifier-free guidance: fraction of captions dropped to ""
    min_snr: float = 5.0             # denoiser loss weight: 0 = plain v-MSE; gamma > 0 = min-SNR-gamma (5.1
                                     # names none; Hang et al.'s gamma; the ablation: docs/results.md)
    train_images: int = 0            # diffusion, ufogen, distill: N > 0 = the first N training images,
                                     # VAE-encoded once and kept as latents; 0 = fresh images every step
                                     # (the synthetic shapes' default: SHAPES_CACHE)
    ema_decay: float = 0.999         # EMA of the trained weights (paper scale: 0.9999)
    guidance: float = 3.0            # 5.2: CFG scale ~3 for the evaluation samples
    eval_steps: int = 50             # 5.2: DDIM 50 steps for the evaluation
    vgg_weights: str = ""            # local VGG16 state dict for 3.5's perceptual loss; empty = no such term
    log_every: int = 25
    sample_every: int = 500          # sample / reconstruction grid every N steps (0 = only at the end)
    val_every: int = 0               # diffusion / relu: held-out validation loss every N steps (0: at each
                                     # sample_every); the relu stage's recovery curve
    ckpt_every: int = 500
    eval_images: int = 128           # held-out images for the end-of-stage evaluation
    bench: int = 0                   # N > 0: time N steps of --stage (after BENCH_WARMUP), print step time,
                                     # images/s, TFLOP/s, MFU and memory; no file written (train_utils)
    peak_tflops: float = 0.0         # --bench: the device's dense peak for MFU (0: GPU_PEAKS / measured CPU)
    export_weights: bool = False     # only write <stage>.safetensors (inference weights) from out_dir's
                                     # diffusion.pt / ufogen.pt / distill.pt (--stage: which; all: each there)
    num_workers: int = 0             # DataLoader workers (real image folders)
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | mps


STAGES = ("vae", "decoder", "encode", "diffusion", "relu", "ufogen", "distill", "lora", "adapter")
ALL_STAGES = ("vae", "decoder", "diffusion", "relu", "ufogen", "distill")   # --stage all, the tiny end-to-end run
BENCH_STAGES = ("vae", "decoder", "diffusion", "relu", "ufogen", "distill", "lora", "adapter")   # --bench: one of these
WEIGHT_STAGES = ("diffusion", "relu", "ufogen", "distill")        # the stages with inference weights

# Each stage's values of the tiny CPU run (times: docs/results.md), over TrainConfig's defaults; a flag given
# on the command line wins over both.
STAGE_DEFAULTS = {
    "vae": dict(steps=1800, lr=1e-3, batch_size=8),        # batch 8: twice the steps of batch 16, +2 dB
    "decoder": dict(steps=800, lr=1e-3, batch_size=8),
    "encode": dict(batch_size=64),                         # images per encoder call (no steps)
    "diffusion": dict(steps=600, lr=1e-3, batch_size=64),  # 5.1: lr 1e-3; batch 64: 1.4x batch 32's images/s
    # 3.2: softmax -> relu, finetuned ("within 10,000 iterations" at paper scale); the validation loss every 25
    # steps is the recovery curve (eval.json's "relu"; docs/results.md)
    "relu": dict(steps=200, lr=1e-4, warmup=20, lr_schedule="constant", batch_size=64, val_every=25),
    "ufogen": dict(steps=200, lr=3e-4, batch_size=16),     # UFOGen's code: Adam lr 1e-4; 3e-4 for 200 steps
    "distill": dict(steps=150, lr=1e-3, batch_size=16),    # after the 100-step warm-up 1e-4 is too slow
    # 5.4: the LoRA needs longer than the adapter at this scale (docs/results.md). Its style set is outlined
    # shapes, new to the diffusion model and to everything distilled from it until the LoRA adds it.
    "lora": dict(steps=2000, lr=3e-3, batch_size=16, style="outlined"),
    "adapter": dict(steps=800, lr=2e-3, batch_size=16),
}

# The synthetic shapes' default for the stages that can train on cached latents (train_images): a fixed set of
# 8192, when the stage draws more images than that (the tiny diffusion stage draws 600 x 64 = 38400, each of
# the 8192 seen 4-5 times: 8192 VAE encodes instead of 38400). A stage that draws fewer sees fresh images.
CACHED_STAGES = ("diffusion", "relu", "ufogen", "distill")
SHAPES_CACHE = 8192
ENCODE_CHUNK = 4096                  # --stage encode on a folder: items per latent shard


def stage_config(given: dict, stage: str) -> TrainConfig:
    """One stage's config: TrainConfig's defaults, then STAGE_DEFAULTS[stage], then the flags given. --bench N:
    BENCH_WARMUP + N steps, no grids; on the shapes, one batch of cached latents, so that a step is the
    networks' own work (not the rendering and the VAE encoder)."""
    cfg = TrainConfig(**{**STAGE_DEFAULTS[stage], **given, "stage": stage})
    cacheable = data.is_shapes(cfg.data) and stage in CACHED_STAGES and cfg.steps * cfg.batch_size > SHAPES_CACHE
    if "train_images" not in given and cacheable:
        cfg = dataclasses.replace(cfg, train_images=SHAPES_CACHE)
    if cfg.bench:
        cached = cfg.batch_size if data.is_shapes(cfg.data) and stage in CACHED_STAGES else cfg.train_images
        cfg = dataclasses.replace(cfg, steps=BENCH_WARMUP + cfg.bench, sample_every=0,
                                  train_images=given.get("train_images", cached))
    return cfg


# ----------------------------------------------------------------------------------------------------
# Stage: vae (3.5)
# ----------------------------------------------------------------------------------------------------

def train_vae(cfg: TrainConfig, vcfg: vae_lib.VAEConfig, rank: int, world: int, device: str) -> str:
    """3.5: 'our VAE is trained with a combination of loss functions, including L2 reconstruction loss, KL
    divergence for regularization, perceptual loss, and adversarial loss'. Returns the checkpoint path."""
    path = os.path.join(cfg.out_dir, "vae.pt")
    model = vae_lib.VAE(vcfg).to(device)
    disc = vae_lib.PatchDiscriminator(vcfg).to(device)
    opt, opt_d = gan_optimizers(model.parameters(), disc, cfg)
    scaler = LossScaler(cfg, device)                                      # fp16 only
    start = resume_autoencoder(cfg, path, vcfg, model, disc, opt, opt_d, scaler, rank)
    perceptual = make_perceptual(cfg, vcfg, rank, device)
    net, dnet = wrap(model, cfg, world, device), wrap(disc, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device)
    meter, last_layer, t0 = Meter(world, device), model.decoder.conv_out.weight, time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt, opt_d)
        use_disc = step >= vcfg.disc_start and vcfg.disc_weight > 0
        for _ in range(cfg.grad_accum):
            x, _ = next(stream)                                               # (B, 3, H, W) in [-1, 1]
            with autocast(cfg, device):
                recon, post = net(x)                                          # recon (B, 3, H, W), q(z | x)
                rec = vae_lib.with_perceptual(vae_lib.l2_loss(recon, x), perceptual, vcfg.perceptual_weight,
                                              recon, x)
                kl = vae_lib.kl_loss(post, x[0].numel())
                loss = rec + vcfg.kl_weight * kl
                if use_disc:
                    adv, g_adv = vae_lib.adversarial_term(rec, dnet(recon), vcfg, last_layer)
                    loss = loss + adv
                    meter.add(g_adv=g_adv)
            scaler.backward(loss / cfg.grad_accum)
            if use_disc:                                                 # D: real vs detached reconstructions
                with autocast(cfg, device):
                    d_loss = vae_lib.d_hinge_loss(dnet(x), dnet(recon.detach()))
                scaler.backward(d_loss / cfg.grad_accum)
                meter.add(d_loss=d_loss)
            meter.add(loss=loss, l2=vae_lib.l2_loss(recon.detach(), x), kl=kl)
        clip_and_step(model.parameters(), opt, cfg, step, scaler)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step, scaler)
        log.step(step + 1, {**meter.mean(), "lr": lr, **scaler.update(step)}, write=due(step, cfg.log_every, cfg))
        done = step + 1 == cfg.steps
        if rank == 0 and done:
            # SD's latent scaling: 1 / std of posterior samples on training images, stored with the weights.
            images = torch.stack([x for x, _ in data.first_items(dataset, 256)]).to(device)
            vcfg.scaling_factor = vae_lib.estimate_scaling_factor(model, images, cfg.seed)
        if rank == 0 and save_due(step, cfg):
            save_autoencoder(path, cfg, step + 1, model, vcfg, disc, opt, opt_d, scaler)
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            evaluate.save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, f"vae_recon_{step + 1:06d}.png"))
            log.record(step + 1, {"val_psnr_db": evaluate.heldout_psnr(cfg, model, device)})
    log.close()
    if rank == 0:
        finish_stage(cfg, log, start, t0, device, 6 * vae_macs(model, cfg), ["loss", "l2", "kl", "d_loss"])
        evaluate.vae_report(cfg, model, (time.time() - t0) / 60, device)
    return path


# ----------------------------------------------------------------------------------------------------
# Stage: decoder (3.5 light-decoder distillation)
# ----------------------------------------------------------------------------------------------------

def train_decoder(cfg: TrainConfig, light_cfg: vae_lib.VAEConfig, teacher_path: str, rank: int, world: int,
                  device: str) -> str:
    """3.5: 'We train the lightweight decoder ... with the encoder frozen. We remove the unnecessary KL
    regularization in the objective, and reduce the weight of adversarial loss.' The light VAE keeps the
    teacher's encoder (bit-identical, frozen) and learns a pruned decoder that matches both the images
    and the full decoder's reconstructions."""
    path = os.path.join(cfg.out_dir, "decoder.pt")
    teacher = sample.load_vae(teacher_path).to(device).requires_grad_(False)
    model = light_from_teacher(light_cfg, teacher).to(device)
    light_cfg = model.cfg
    trainable = [p for p in model.parameters() if p.requires_grad]
    disc = vae_lib.PatchDiscriminator(light_cfg).to(device)
    opt, opt_d = gan_optimizers(trainable, disc, cfg)
    scaler = LossScaler(cfg, device)
    start = resume_autoencoder(cfg, path, light_cfg, model, disc, opt, opt_d, scaler, rank)
    perceptual = make_perceptual(cfg, light_cfg, rank, device)
    dec, dnet = wrap(model.decoder, cfg, world, device), wrap(disc, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device)
    meter, last_layer, t0 = Meter(world, device), model.decoder.conv_out.weight, time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt, opt_d)
        use_disc = step >= light_cfg.disc_start and light_cfg.disc_weight > 0
        for _ in range(cfg.grad_accum):
            x, _ = next(stream)
            with torch.no_grad():                                        # frozen encoder and teacher decoder
                z = teacher.encode(x).sample()                                # (B, c, H/f, W/f)
                full = teacher.decode(z, clamp=False)                         # (B, 3, H, W)
            with autocast(cfg, device):
                light = dec(model.post_quant_conv(z))                         # (B, 3, H, W)
                rec = vae_lib.with_perceptual(vae_lib.decoder_distill_loss(light, full, x), perceptual,
                                              light_cfg.perceptual_weight, light, x)
                loss = rec                                                    # 3.5: no KL term
                if use_disc:
                    adv, g_adv = vae_lib.adversarial_term(rec, dnet(light), light_cfg, last_layer)
                    loss = loss + adv
                    meter.add(g_adv=g_adv)
            scaler.backward(loss / cfg.grad_accum)
            if use_disc:
                with autocast(cfg, device):
                    d_loss = vae_lib.d_hinge_loss(dnet(x), dnet(light.detach()))
                scaler.backward(d_loss / cfg.grad_accum)
                meter.add(d_loss=d_loss)
            meter.add(loss=loss, l2=vae_lib.l2_loss(light.detach(), x))
        clip_and_step(trainable, opt, cfg, step, scaler)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step, scaler)
        log.step(step + 1, {**meter.mean(), "lr": lr, **scaler.update(step)}, write=due(step, cfg.log_every, cfg))
        if rank == 0 and save_due(step, cfg):
            save_autoencoder(path, cfg, step + 1, model, light_cfg, disc, opt, opt_d, scaler)
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < cfg.steps:
            grid = os.path.join(cfg.out_dir, f"decoder_recon_{step + 1:06d}.png")
            evaluate.save_recon_grid(cfg, [teacher, model], grid)
            log.record(step + 1, {"val_psnr_db": evaluate.heldout_psnr(cfg, model, device)})
    log.close()
    if rank == 0:
        flops = 2 * vae_macs(teacher, cfg) + 6 * vae_macs(model, cfg, "decoder")  # teacher fwd, light fwd+bwd
        finish_stage(cfg, log, start, t0, device, flops, ["loss", "l2", "d_loss"])
        evaluate.vae_report(cfg, model.eval(), (time.time() - t0) / 60, device, teacher=teacher)
    return path


# ----------------------------------------------------------------------------------------------------
# Stage: encode (cached latents: the frozen encoder runs once per image instead of once per step)
# ----------------------------------------------------------------------------------------------------

def train_encode(cfg: TrainConfig, rank: int, world: int, device: str) -> str:
    """The frozen VAE encoder once over --data (an image folder, the synthetic shapes or tar shards): latent
    shards that --data accepts for the diffusion, ufogen, distill and lora stages, since the encoder would
    otherwise cost as much per step as the md UNet's forward and backward together (docs/results.md). Each
    shard keeps the scaled posterior mean and std (fp16); latents.json records the encoder's fingerprint, so a
    stage whose VAE has another encoder refuses them; heldout.pt keeps the held-out images for the reports.
    Resumable: a shard already written is skipped. Under torchrun, rank r writes the shards r, r + world, ...
    --train_images N: encode only the first N items of a folder (0: all)."""
    vae = build_vae_for_diffusion(cfg).to(device).requires_grad_(False)
    out = cfg.latents_dir or os.path.join(cfg.out_dir, "latents")
    os.makedirs(out, exist_ok=True)
    source = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style, cfg.min_size)
    if yields_latents(source):
        raise ValueError(f"--data {cfg.data}: already latents")
    if isinstance(source, torch.utils.data.IterableDataset):         # one latent shard per tar shard
        chunks = [(os.path.basename(p)[:-4], p) for p in source.shards]
    else:                                                             # a folder: chunks of ENCODE_CHUNK items
        n = min(len(source), cfg.train_images or len(source))
        chunks = [(f"{i // ENCODE_CHUNK:05d}", range(i, min(i + ENCODE_CHUNK, n)))
                  for i in range(0, n, ENCODE_CHUNK)]
    t0, done, counts = time.time(), 0, {}
    for k, (name, part) in enumerate(chunks):
        path = os.path.join(out, f"{name}.pt")
        if k % world != rank or os.path.isfile(path):         # another rank's, or written before a stop
            continue
        if isinstance(part, str):
            readers = (functools.partial(data.decode_sample, p, cfg.resolution, cfg.min_size)
                       for _, p in data.tar_samples(part, counts))
        else:
            readers = (functools.partial(source.__getitem__, i) for i in part)
        means, stds, captions = [], [], []
        for images, texts in data.chunked(readers, cfg.batch_size, counts):
            with torch.no_grad(), autocast(cfg, device):
                post = vae.encode(images.to(device))                  # q(z | x): (B, c, H/f, W/f) each
            means.append((post.mean.float() * vae.cfg.scaling_factor).half().cpu())
            stds.append((post.std.float() * vae.cfg.scaling_factor).half().cpu())
            captions += texts
        if captions:
            shard = {"mean": torch.cat(means), "std": torch.cat(stds), "captions": captions}
            config.save_checkpoint(path, shard)
        done += len(captions)
        if rank == 0:
            print(f"encode: {name} ({len(captions)} latents), {done / (time.time() - t0):.1f} images/s")
    if world > 1:                                             # every rank's skip counts (and a barrier)
        keys = ("bad", "small", "bad_shards")
        total = torch.tensor([float(counts.get(k, 0)) for k in keys], device=device)   # (NCCL: on the GPU)
        dist.all_reduce(total)
        counts = {k: int(v) for k, v in zip(keys, total.tolist()) if v}
    if rank == 0:
        held = data.make_dataset(cfg.data, "heldout", cfg.resolution)
        items = [held[i] for i in range(min(cfg.eval_images, len(held)))]
        images = ((torch.stack([x for x, _ in items]) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
        held_out = {"images": images, "captions": [c for _, c in items]}
        config.save_checkpoint(os.path.join(out, "heldout.pt"), held_out)
        shards = [f"{name}.pt" for name, _ in chunks if os.path.isfile(os.path.join(out, f"{name}.pt"))]
        count = sum(len(config.load_checkpoint(os.path.join(out, s))["captions"]) for s in shards)  # mmap'd
        config.write_json(os.path.join(out, data.LATENTS_MANIFEST), {
            "shards": shards, "count": count, "resolution": cfg.resolution,
            "vae": vae_lib.encoder_fingerprint(vae), "latent_channels": vae.cfg.latent_channels,
            "vae_source": cfg.vae_diffusers or cfg.vae_ckpt or "out_dir",
            "scaling_factor": vae.cfg.scaling_factor, "source": cfg.data, "skipped": counts})
        print(f"encode: {count} latents in {len(shards)} shards -> {out} ({(time.time() - t0) / 60:.1f} min; "
              f"unreadable or too small, skipped: {counts.get('bad', 0) + counts.get('small', 0)})")
    return out


# ----------------------------------------------------------------------------------------------------
# Stage: diffusion (3: latent diffusion with the MD UNet; 5.1 optimisation; CFG training)
# ----------------------------------------------------------------------------------------------------

def train_diffusion(cfg: TrainConfig, unet_cfg: md.UNetConfig, rank: int, world: int, device: str,
                    text_cfg: md.TextConfig = md.TEXT_PRESETS["tiny"]) -> str:
    """Latent diffusion training of the MD UNet: v-prediction on VAE latents (sample.py explains the
    choice), text dropped with probability p_uncond for classifier-free guidance, AdamW (5.1), EMA.
    The relu stage (3.2) is this loop too, on the softmax base with attn_act = relu (relu_stage)."""
    path = os.path.join(cfg.out_dir, f"{cfg.stage}.pt")
    if cfg.stage == "relu":
        cfg, unet_cfg, text_cfg = relu_stage(cfg, unet_cfg, text_cfg)
    cfg, unet_cfg = from_pipeline_folder(cfg, unet_cfg)    # --init_from an SD folder: its UNet, VAE, CLIP
    vae = build_vae_for_diffusion(cfg).to(device).requires_grad_(False)
    text = build_text_encoder(cfg, text_cfg)
    check_compatible(unet_cfg, vae, text)
    model = sample.Denoiser(md.UNet(unet_cfg), text).to(device)
    sched = init_schedule(cfg)                          # the base's parameterisation (SD-1.5: eps), else v
    if cfg.init_from:                                   # 256 -> 512px, 3.2's softmax -> relu, or SD-1.5
        init_denoiser(model, cfg.init_from, unet_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    md.set_grad_checkpointing(model.unet, cfg.grad_checkpoint)
    params = [p for p in model.parameters() if p.requires_grad]
    opt, scaler = make_optimizer(params, cfg, cfg.lr), LossScaler(cfg, device)
    start = resume_diffusion(cfg, path, model, ema, opt, scaler, rank, sched)
    if rank == 0:
        describe_denoiser(model, cfg, vae, device)
    net = wrap(model, cfg, world, device)
    val = validation_batch(cfg, vae) if rank == 0 and not cfg.bench else None   # held-out latents, t, noise
    curve = {start: validation_loss(ema, sched, val, cfg.min_snr)} if val is not None else {}   # {step: val loss}
    softmax = softmax_val_loss(cfg, val, sched) if val is not None and cfg.stage == "relu" else None
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    latent_shape = tuple(one_latent(cfg, vae, "cpu").shape[1:])       # (c, H/f, W/f)
    prompts = grid_prompts(cfg, dataset)
    meter, t0, seen, val_every = Meter(world, device), time.time(), 0, cfg.val_every or cfg.sample_every
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt)
        t_all, eps_all, drop_all = diffusion_noise(cfg, step, latent_shape)   # the global batch's
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = micro_slice(cfg, rank, world, k)
            t, eps = t_all[sl].to(device), eps_all[sl].to(device)
            texts = ["" if d else c for c, d in zip(texts, drop_all[sl].tolist())]    # CFG: the empty prompt
            z0 = to_latents(x, vae, yields_latents(dataset))          # (B, c, H/f, W/f), ~unit var.
            ids = text.tokenizer(texts).to(device)                                   # (B, L)
            with autocast(cfg, device):
                x_t = sample.q_sample(sched, z0, t, eps)
                loss = sample.diffusion_loss(sched, net(x_t, t, ids), z0, t, eps, cfg.min_snr)
            scaler.backward(loss / cfg.grad_accum)
            meter.add(loss=loss)
        gnorm = clip_and_step(params, opt, cfg, step, scaler)
        ema_update(ema, model, ema_warmup(cfg, step))
        seen += cfg.batch_size
        m = {**meter.mean(), "lr": lr, "grad_norm": gnorm, "img_per_s": seen / (time.time() - t0),
             **scaler.update(step)}
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        done = step + 1 == cfg.steps
        if rank == 0 and save_due(step, cfg):
            save_diffusion(path, cfg, step + 1, model, ema, opt, scaler, vae, sched)
        if val is not None and val_every and (step + 1) % val_every == 0 and not done:
            curve[step + 1] = validation_loss(ema, sched, val, cfg.min_snr)
            log.record(step + 1, {"val_loss": curve[step + 1]})
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            progress_grid(cfg, ema.unet, vae, ema.text, sched, device, prompts, step + 1, steps=20,
                          guidance_scale=cfg.guidance)
            model.train()
    log.close()
    if rank == 0:
        ids = text.tokenizer([""]).to(device)
        macs = latent_macs(model, cfg, vae, ids)                      # the UNet and the text encoder
        if val is not None:
            curve[cfg.steps] = validation_loss(ema, sched, val, cfg.min_snr)
            log.record(cfg.steps, {"val_loss": curve[cfg.steps]})
        finish_stage(cfg, log, start, t0, device, 6 * macs, ["loss", "val_loss"])
        pipe = sample.Pipeline(ema.unet, vae, ema.text, sched, device, cfg.resolution)
        evaluate.diffusion_report(cfg, pipe)             # the checker on the synthetic shapes only
        if softmax is not None:
            evaluate.relu_report(cfg, softmax, curve)
        export_weights(path)
    return path


def relu_stage(cfg: TrainConfig, unet_cfg: md.UNetConfig, text_cfg: md.TextConfig):
    """3.2: "we finetune a softmax-attention model into ReLU attention". The relu stage's base is --init_from
    (default out_dir/diffusion.pt); its UNet and text encoder are the base's, with attn_act = relu: the only
    change (a ReLU kernel has no parameters of its own, so every weight carries over). (cfg, unet, text)."""
    cfg = dataclasses.replace(cfg, init_from=cfg.init_from or os.path.join(cfg.out_dir, "diffusion.pt"))
    if pretrained.is_pipeline_folder(cfg.init_from):             # from_pipeline_folder takes the folder's own
        return cfg, dataclasses.replace(unet_cfg, attn_act="relu"), text_cfg
    if not os.path.exists(cfg.init_from):
        raise FileNotFoundError(f"--stage relu: no softmax base {cfg.init_from} (train one first: python train.py "
                                f"--stage diffusion; or give --init_from)")
    conf = sample.saved_config(cfg.init_from)
    if "unet" not in conf:
        raise ValueError(f"--stage relu --init_from {cfg.init_from}: not a diffusion checkpoint (no config['unet'])")
    unet_cfg = dataclasses.replace(config.config_from_dict(md.UNetConfig, conf["unet"]), attn_act="relu",
                                   dropout=unet_cfg.dropout)
    text_cfg = config.config_from_dict(md.TextConfig, conf["text"])
    cfg = dataclasses.replace(cfg, text_encoder=cfg.text_encoder or conf["train"].get("text_encoder", ""))
    return cfg, unet_cfg, text_cfg


@torch.no_grad()
def softmax_val_loss(cfg: TrainConfig, val, sched: dict) -> float:
    """The relu stage's target: the validation loss of its softmax base (EMA weights, same batch, t and noise)."""
    unet, _, text, _ = sample.load_diffusion(cfg.init_from, ema=True)
    return validation_loss(sample.Denoiser(unet, text).to(val[0].device), sched, val, cfg.min_snr)


# ----------------------------------------------------------------------------------------------------
# Stage: ufogen (4: one-step generation by adversarial finetuning)
# ----------------------------------------------------------------------------------------------------

def train_ufogen(cfg: TrainConfig, ufo_cfg: ufogen.UFOGenConfig, rank: int, world: int, device: str) -> str:
    """4.1 Eq. 1 with the 4.2 reconstruction term of choice and optional 4.3 LoRA. One G forward per step
    serves both players: D learns on its detached output, G on the same output through the frozen D."""
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    sched = generator_schedule(base_conf)               # the base's noise levels and parameterisation
    teacher = copy.deepcopy(unet).requires_grad_(False) if ufo_cfg.recon == "distill" else None   # Eq. 2
    # 4.1: D from the base; none without the adversarial term (Table 5's last row), which never runs it
    disc = ufogen.Discriminator(unet).to(device) if ufo_cfg.adv else None
    gen = unet.requires_grad_(True)              # G is the base itself: no third copy (SD-1.5: 3.4 GB fp32)
    if ufo_cfg.lora_rank:                                                                     # 4.3
        g_params = plugins.add_lora(gen, ufo_cfg.lora_rank, ufo_cfg.lora_alpha, ufo_cfg.lora_convs)
    else:
        g_params = list(gen.parameters())
    gen_ema = share_frozen(copy.deepcopy(gen), gen).requires_grad_(False)        # Eq. 3, and sampling
    adam = dict(kind=torch.optim.Adam, weight_decay=0.0)                                   # UFOGen's code
    opt_g = make_optimizer(g_params, cfg, cfg.lr, **adam)
    md.set_grad_checkpointing(gen, cfg.grad_checkpoint)
    d_state = {}                                                   # D and its Adam, by checkpoint key
    if disc is not None:
        md.set_grad_checkpointing(disc, cfg.grad_checkpoint)                      # as G's
        opt_d = make_optimizer(disc.parameters(), cfg, cfg.lr * ufo_cfg.d_lr_mult, (0.0, cfg.beta2), **adam)  # beta1 0
        d_state = dict(d=disc, opt_d=opt_d)
    scaler = LossScaler(cfg, device)                                 # one scale for both players' losses
    path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = stage_checkpoint(cfg, path, rank)
    if ck is not None:
        config.refuse_if_mismatch(path, "UFOGen", ck["config"]["ufogen"], ufo_cfg)
        start = restore(ck, g_raw=gen, g_ema_raw=gen_ema, opt_g=opt_g, scaler=scaler, **d_state)
    if rank == 0:
        how = f"LoRA rank {ufo_cfg.lora_rank}" if ufo_cfg.lora_rank else "full finetuning"
        n_g = sum(p.numel() for p in g_params)
        print(f"ufogen: from {base}, recon={ufo_cfg.recon}, {how} ({n_g / 1e6:.2f}M trained G params), "
              + (f"D {md.count_params(disc) / 1e6:.1f}M" if disc is not None else "no D (--ufogen_adv false)")
              + f", gap {ufo_cfg.gap}")
    g_net, d_net = wrap(gen, cfg, world, device), wrap(disc, cfg, world, device) if disc is not None else None
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    prompts = grid_prompts(cfg, dataset)
    null, meter, t0 = null_context(text), Meter(world, device), time.time()   # null: (1, L, D)
    for step in range(start, cfg.steps):
        rng = step_generator(cfg, step)
        t_all = ufogen.sample_t(ufo_cfg, cfg.batch_size, rng)                    # t in [1, T)
        d_step = ufo_cfg.adv and step % ufo_cfg.d_every == 0
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            z0, ctx = latent_batch(x, texts, vae, text, yields_latents(dataset))  # (B,c,h,w) (B,L,D)
            uncond = null.expand(ctx.shape[0], -1, -1)
            t = t_all[micro_slice(cfg, rank, world, k)].to(device)
            t_prev = (t - ufo_cfg.gap).clamp(min=0)                               # t' = t - gap
            e_t, e_real, e_fake = (torch.randn(z0.shape, generator=rng).to(device) for _ in range(3))
            x_t = sample.q_sample(sched, z0, t, e_t)
            # D's time input: Eq. 1 prints D(x_{t-1}, t); UFOGen's code (our default) gives D the time t' of
            # the sample it judges, so D sees the (x, time) pairs a diffusion model was trained on (d_time).
            t_d = t_prev if ufo_cfg.d_time == "t_prev" else t
            with autocast(cfg, device):
                x0_pred = sample.x0_from_output(sched, x_t, t, g_net(x_t, t, ctx))  # x0' = G(x_t, t)
                real = sample.q_sample(sched, z0, t_prev, e_real)                # x_{t-1} ~ q(.|x0)
                fake = sample.q_sample(sched, x0_pred, t_prev, e_fake)           # x'_{t-1} ~ q(.|x0'), grad
                # D step: real vs detached fake. UFOGen's code steps D on every other iteration only
                # (d_every = 2) and draws fresh t and noise for it; we reuse G's forward, same distribution.
                if d_step:
                    disc.requires_grad_(True)
                    logits_real, logits_fake = d_net(real, t_d, ctx), d_net(fake.detach(), t_d, ctx)
                    loss_d = ufogen.d_loss(logits_real, logits_fake, ufo_cfg.logit_clamp)
            if d_step:
                scaler.backward(loss_d / cfg.grad_accum)
                meter.add(d_loss=loss_d, d_acc=ufogen.d_accuracy(logits_real, logits_fake))
            with autocast(cfg, device):
                # G step: adversarial through a frozen D, plus lambda * (gamma_t) * reconstruction.
                if ufo_cfg.adv:
                    disc.requires_grad_(False)
                    loss_adv = ufogen.g_adv_loss(d_net(fake, t_d, ctx), ufo_cfg.logit_clamp)
                else:
                    loss_adv = torch.zeros((), device=device)
                target = ufogen.recon_target(ufo_cfg, z0, x_t, t, ctx, sched, teacher, gen_ema, uncond)
                weighted = ufogen.recon_weighted(ufo_cfg)
                loss_rec = ufogen.recon_loss(x0_pred.float(), target, t, sched, weighted=weighted)
                loss_g = loss_adv + ufo_cfg.lam * loss_rec
            scaler.backward(loss_g / cfg.grad_accum)
            meter.add(g_adv=loss_adv, recon=loss_rec)
        if d_step:                                        # (G's backward left no grads in D: it was frozen)
            disc.requires_grad_(True)
            clip_and_step(disc.parameters(), opt_d, cfg, step, scaler)
        clip_and_step(g_params, opt_g, cfg, step, scaler)
        ema_update(gen_ema, gen, ufo_cfg.g_ema_decay)
        log.step(step + 1, {**meter.mean(), **scaler.update(step)}, write=due(step, cfg.log_every, cfg))
        if rank == 0 and save_due(step, cfg):
            save_generator(path, cfg, step + 1, gen, gen_ema, text, vae, base_conf,
                           {"ufogen": ufo_cfg, "schedule": sched["cfg"]},
                           g_raw=gen, g_ema_raw=gen_ema, opt_g=opt_g, scaler=scaler, **d_state)
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < cfg.steps:
            progress_grid(cfg, gen_ema, vae, text, sched, device, prompts, step + 1,
                          **sample.SAMPLING["onestep"])
    log.close()
    if rank == 0:
        # G forward + backward (6 G); D forwards real, fake, fake-through-G, backs all three (18 D / d_every).
        g_macs = latent_macs(gen, cfg, vae, null)
        flops = 6 * g_macs + (18 * latent_macs(disc, cfg, vae, null) / ufo_cfg.d_every if disc is not None else 0)
        finish_stage(cfg, log, start, t0, device, flops, ["d_loss", "d_acc", "g_adv", "recon"])
        # Free G, D and their optimisers first: at the md preset they are ~14 GB; the report loads two more.
        del gen, gen_ema, disc, g_net, d_net, opt_g, d_state, g_params, teacher, unet
        evaluate.one_step_report(cfg, base, path, device)
        export_weights(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Stage: distill (the abstract's 8-step model)
# ----------------------------------------------------------------------------------------------------

def train_distill(cfg: TrainConfig, dcfg: ufogen.DistillConfig, rank: int, world: int, device: str) -> str:
    """The student learns, at each of its `target_steps` timesteps, the x0 that makes one DDIM step land
    where `teacher_steps / target_steps` steps of the guided teacher land (ufogen.distill_target). Guidance is
    folded in (Meng et al. 2023): the student is sampled without CFG, at half the cost per step."""
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    teacher = unet.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student_ema = copy.deepcopy(student).requires_grad_(False)
    md.set_grad_checkpointing(student, cfg.grad_checkpoint)
    sched = generator_schedule(base_conf)
    ts = sample.timesteps(sched, dcfg.target_steps) + [-1]
    sub = max(dcfg.teacher_steps // dcfg.target_steps, 1)
    opt, scaler = make_optimizer(student.parameters(), cfg, cfg.lr), LossScaler(cfg, device)
    path, start = os.path.join(cfg.out_dir, "distill.pt"), 0
    ck = stage_checkpoint(cfg, path, rank)
    if ck is not None:
        config.refuse_if_mismatch(path, "distillation", ck["config"]["distill"], dcfg)
        start = restore(ck, g_raw=student, g_ema_raw=student_ema, opt_g=opt, scaler=scaler)
    if rank == 0:
        print(f"distill: from {base}, {dcfg.target_steps}-step student of the {dcfg.teacher_steps}-step teacher")
    net = wrap(student, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    prompts = grid_prompts(cfg, dataset)
    null, meter, t0 = null_context(text), Meter(world, device), time.time()
    for step in range(start, cfg.steps):
        rng = step_generator(cfg, step)
        i = int(torch.randint(0, dcfg.target_steps, (1,), generator=rng))        # one student step per batch
        t, t_next = ts[i], ts[i + 1]
        lr = set_lr(step, cfg, opt)
        for _ in range(cfg.grad_accum):
            x, texts = next(stream)
            z0, ctx = latent_batch(x, texts, vae, text, yields_latents(dataset))
            uncond = null.expand(ctx.shape[0], -1, -1)
            tb = torch.full((z0.shape[0],), t, dtype=torch.long, device=device)
            x_t = sample.q_sample(sched, z0, tb, torch.randn(z0.shape, generator=rng).to(device))
            teacher_denoise = sample.guided_denoiser(teacher, sched, ctx, uncond, dcfg.guidance)
            target = ufogen.distill_target(teacher_denoise, x_t, t, t_next, sched, sub)
            with autocast(cfg, device):
                x0_pred = sample.x0_from_output(sched, x_t, tb, net(x_t, tb, ctx))
                # gamma_t-weighted: the x0 error times gamma_t is the student's own loss (v: the weighting
                # progressive distillation uses, "SNR+1", Salimans & Ho 2022); not one of Eq. 2/3.
                loss = ufogen.recon_loss(x0_pred.float(), target, tb, sched, weighted=True)
            scaler.backward(loss / cfg.grad_accum)
            meter.add(loss=loss)
        clip_and_step(list(student.parameters()), opt, cfg, step, scaler)
        ema_update(student_ema, student, ema_warmup(cfg, step))
        log.step(step + 1, {**meter.mean(), "t": float(t), "lr": lr, **scaler.update(step)},
                 write=due(step, cfg.log_every, cfg))
        if rank == 0 and save_due(step, cfg):
            save_generator(path, cfg, step + 1, student, student_ema, text, vae, base_conf,
                           {"distill": dcfg, "schedule": sched["cfg"]},
                           g_raw=student, g_ema_raw=student_ema, opt_g=opt, scaler=scaler)
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and step + 1 < cfg.steps:
            progress_grid(cfg, student_ema, vae, text, sched, device, prompts, step + 1,
                          **sample.SAMPLING["eight_step"])
    log.close()
    if rank == 0:
        # student forward + backward (6 S); the guided teacher's `sub` DDIM steps, 2 forwards each (4 sub T).
        flops = (6 + 4 * sub) * latent_macs(student, cfg, vae, null)
        finish_stage(cfg, log, start, t0, device, flops, ["loss"])
        del student, student_ema, net, opt, teacher, unet                # room for the report (md: GBs)
        evaluate.few_step_report(cfg, sample.Pipeline.from_checkpoint(path, device), dcfg.target_steps)
        export_weights(path)
    return path


# ----------------------------------------------------------------------------------------------------
# Stages: lora and adapter (5.4), on the frozen base
# ----------------------------------------------------------------------------------------------------

def train_plugin(cfg: TrainConfig, pcfg: plugins.PluginConfig, rank: int, world: int, device: str) -> str:
    """The diffusion stage's loss (the base's prediction, min-SNR weighting, CFG dropout:
    sample.diffusion_loss), with the base frozen and only the plugin trained: LoRA factors (stage lora, on the
    style set) or the adapter (stage adapter, on (plugins.edges(image), image) pairs). 5.4: trained on the
    base, never on the one-step model."""
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    unet.requires_grad_(False)
    sched, adapter = sample.make_schedule(sample.schedule_config(base_conf)), None
    md.set_grad_checkpointing(unet, cfg.grad_checkpoint)         # the plugin's gradients pass through it
    if cfg.stage == "lora":
        params = plugins.add_lora(unet, pcfg.lora_rank, pcfg.lora_alpha, pcfg.lora_convs)
        net = wrap(unet, cfg, world, device)
    else:
        adapter = plugins.Adapter(unet.cfg, vae.cfg.factor, 1, pcfg.adapter_blocks).to(device)
        params = list(adapter.parameters())
        net = wrap(adapter, cfg, world, device)
    opt, scaler = make_optimizer(params, cfg, cfg.lr), LossScaler(cfg, device)
    path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = stage_checkpoint(cfg, path, rank)
    if ck is not None:
        if adapter is None:
            unet.load_state_dict(ck["state"], strict=False)                  # the LoRA factors only
        start = restore(ck, opt=opt, scaler=scaler, **({} if adapter is None else {"state": adapter}))
    if rank == 0:
        n = sum(p.numel() for p in params)
        print(f"{cfg.stage}: {n / 1e6:.3f}M trained params on the frozen base {base} ({cfg.style} data)")
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae if adapter is None else None)
    latent_shape = tuple(one_latent(cfg, vae, "cpu").shape[1:])
    meter, t0 = Meter(world, device), time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt)
        t_all, eps_all, drop_all = diffusion_noise(cfg, step, latent_shape)
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = micro_slice(cfg, rank, world, k)
            t, eps = t_all[sl].to(device), eps_all[sl].to(device)
            texts = ["" if d else c for c, d in zip(texts, drop_all[sl].tolist())]
            z0, ctx = latent_batch(x, texts, vae, text, yields_latents(dataset))
            with autocast(cfg, device):
                x_t = sample.q_sample(sched, z0, t, eps)
                if adapter is None:
                    v = net(x_t, t, ctx)
                else:
                    v = unet(x_t, t, ctx, features=net(plugins.edges(x, pcfg.edge_threshold)))
                loss = sample.diffusion_loss(sched, v, z0, t, eps, cfg.min_snr)
            scaler.backward(loss / cfg.grad_accum)
            meter.add(loss=loss)
        gnorm = clip_and_step(params, opt, cfg, step, scaler)
        m = {**meter.mean(), "lr": lr, "grad_norm": gnorm, **scaler.update(step)}
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        if rank == 0 and save_due(step, cfg):
            extra = dict(step=step + 1, opt=opt.state_dict(), scaler=scaler.state_dict(), base=base,
                         train=dataclasses.asdict(cfg))
            if adapter is None:
                plugins.save_lora(path, unet, pcfg, extra)
            else:
                plugins.save_adapter(path, adapter, unet, {**extra, "edge_threshold": pcfg.edge_threshold})
    log.close()
    if rank == 0:
        # The UNet's forward and backward (the plugin's gradients pass through it); the adapter's are small.
        flops = 6 * latent_macs(unet, cfg, vae, null_context(text))
        finish_stage(cfg, log, start, t0, device, flops, ["loss"])
        if data.is_shapes(cfg.data):                     # 5.4's metrics need the shapes' attributes
            base_pipe = sample.Pipeline.from_checkpoint(base, device, resolution=cfg.resolution)
            evaluate.plugin_stage_report(cfg, base_pipe, path, device)
        else:                                            # real data: held-out captions without / with it
            evaluate.plugin_grid(cfg, base, path, device)
    return path


# ----------------------------------------------------------------------------------------------------
# Entry point: --preset picks every network's config by one name; flags override single fields
# ----------------------------------------------------------------------------------------------------

# The text encoder is the tiny word-level one unless --text_encoder gives a local CLIP folder (paper scale).
PRESETS = {
    name: dict(unet=md.PRESETS[unet], vae=vae_lib.PRESETS[vae], light=vae_lib.PRESETS[light],
               text=md.TEXT_PRESETS["tiny"], ufogen=ufogen.PRESETS[ufo], distill=ufogen.DISTILL_PRESETS[ufo],
               plugin=plugins.PluginConfig())
    for name, (unet, vae, light, ufo) in {"tiny": ("tiny", "tiny", "tiny-light", "tiny"),
                                          "md": ("md", "md", "md-light", "paper"),
                                          "md-lite": ("md-lite", "md", "md-light", "paper"),
                                          "sd": ("sd", "sd", "md-light", "paper")}.items()}
# Flags: the run's own (TrainConfig) and the diffusion UNet's without a prefix; each other config with its
# own.
FLAG_GROUPS = {"unet": ("", md.UNetConfig), "vae": ("vae_", vae_lib.VAEConfig),
               "text": ("text_", md.TextConfig), "ufogen": ("ufogen_", ufogen.UFOGenConfig),
               "distill": ("distill_", ufogen.DistillConfig), "plugin": ("plugin_", plugins.PluginConfig)}


def preset_configs(preset: str, args) -> dict:
    """{unet, vae, light, text, ufogen, distill, plugin}: the preset's configs with the user's flags on top
    (the --vae_* flags apply to the VAE and its light decoder alike)."""
    out = {k: config.config_from_args(v, args, FLAG_GROUPS["vae" if k == "light" else k][0])
           for k, v in PRESETS[preset].items()}
    ufogen.validate(out["ufogen"])
    ufogen.validate_distill(out["distill"])
    return out


DTYPES = ("auto", "fp32", "bf16", "fp16")
CHOICES = {"stage": STAGES + ("all",), "dtype": DTYPES, "lr_schedule": ("cosine", "constant"),
           "style": ("plain", "outlined", "mixed"), "fused": ("auto", "on", "off")}


def validate(cfg: TrainConfig) -> None:
    """Ranges argparse cannot express, each error naming the flag, the value and what is allowed; run on every
    stage's resolved config before any work starts."""
    for f in dataclasses.fields(cfg):                      # --lr nan / inf would pass every range check
        if isinstance(getattr(cfg, f.name), float) and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"--{f.name} {getattr(cfg, f.name)}: expected a finite number")
    if cfg.loss_scale <= 0:
        raise ValueError(f"--loss_scale {cfg.loss_scale}: expected > 0")
    for name in ("steps", "batch_size", "lr"):
        if getattr(cfg, name) <= 0:
            raise ValueError(f"--{name} {getattr(cfg, name)}: expected > 0 (leave it out for the stage's "
                             f"default)")
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution}: expected a positive multiple of 8 (the paper's VAE "
                         f"has f = 8)")
    at_least = {"grad_accum": 1, "log_every": 1, "ckpt_every": 1, "eval_images": 1, "eval_steps": 1,
                "sample_every": 0, "warmup": 0, "num_workers": 0, "weight_decay": 0, "grad_clip": 0,
                "guidance": 0, "train_images": 0, "min_snr": 0, "min_size": 0, "shuffle_buffer": 1,
                "bench": 0, "peak_tflops": 0}
    for name, lo in at_least.items():
        if getattr(cfg, name) < lo:
            raise ValueError(f"--{name} {getattr(cfg, name)}: expected >= {lo}")
    for name in ("beta1", "beta2", "min_lr_frac", "p_uncond", "ema_decay"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name} {getattr(cfg, name)}: expected a value in [0, 1]")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ValueError(f"--seed {cfg.seed}: expected 0 <= seed < 2^32")
    for name, kind in (("prompts", "file"), ("vgg_weights", "file"), ("vae_ckpt", "file"),
                       ("text_encoder", "folder"), ("vae_diffusers", "folder"), ("init_from", "file or folder")):
        path = getattr(cfg, name)                                  # named now, not after minutes of work
        ok = {"file": os.path.isfile, "folder": os.path.isdir, "file or folder": os.path.exists}[kind](path)
        if path and not ok:
            raise FileNotFoundError(f"--{name} {path}: no such {kind}")
    if cfg.prompts:
        evaluate.read_prompts(cfg.prompts)                         # blank or malformed: refused now
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the checkpoint, or "
                         "replace it")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch_size {cfg.batch_size} (stage {cfg.stage}): not divisible by processes x "
                         f"grad_accum = {world} x {cfg.grad_accum}")


def run_stage_names(stage: str) -> tuple:
    return ALL_STAGES if stage == "all" else (stage,)


def parse_args(argv=None) -> tuple[dict, dict]:
    """(the TrainConfig fields given on the command line, the networks' configs); every stage that will run
    is validated."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {k: "default: the stage's (" + ", ".join(f"{st} {v[k]:g}" for st, v in STAGE_DEFAULTS.items()
                                                      if k in v) + ")" for k in ("steps", "lr", "batch_size")}
    helps["style"] = "default: plain (the lora stage: outlined)"
    config.add_config_flags(p, TrainConfig, shown=TrainConfig(), choices=CHOICES, helps=helps)
    for group, (prefix, cls) in FLAG_GROUPS.items():
        config.add_config_flags(p, cls, prefix, shown=PRESETS["tiny"][group], note="tiny preset")
    args = p.parse_args(argv)
    given = config.given_flags(TrainConfig, args)
    stage = given.get("stage", TrainConfig.stage)
    if given.get("bench") and stage not in BENCH_STAGES:
        p.error(f"--bench {given['bench']}: times one training stage; give --stage, one of {', '.join(BENCH_STAGES)}")
    if given.get("export_weights") and stage not in WEIGHT_STAGES + ("all",):
        p.error(f"--export_weights: for the denoiser stages: --stage one of {', '.join(WEIGHT_STAGES)} or all")
    try:
        for stage in run_stage_names(given.get("stage", TrainConfig.stage)):
            validate(stage_config(given, stage))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return given, preset_configs(given.get("preset", TrainConfig.preset), args)


def main(argv=None):
    given, nets = parse_args(argv)
    run = TrainConfig(**given)
    rank, world, device = setup(run)
    os.makedirs(run.out_dir, exist_ok=True)
    with config.out_dir_lock(run.out_dir, rank), tempfile.TemporaryDirectory() as tmp:
        if run.export_weights:
            export_stages(run)
        elif run.bench:
            if device == "cpu":
                release_freed_memory()
            given = {**given, **bench_inputs(run, nets, tmp, rank)}
            try:
                run_stages(TrainConfig(**given), given, nets, rank, world, device)
            except BenchDone:                                      # the timed loop is all a benchmark runs
                pass
        else:
            run_stages(run, given, nets, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


def export_stages(run: TrainConfig) -> None:
    """--export_weights: <stage>.safetensors from each denoiser checkpoint of out_dir that --stage names."""
    paths = [os.path.join(run.out_dir, f"{st}.pt") for st in run_stage_names(run.stage) if st in WEIGHT_STAGES]
    found = [p for p in paths if os.path.isfile(p)]
    if not found:
        raise FileNotFoundError(f"--export_weights: no checkpoint to export ({', '.join(paths)} not found)")
    for path in found:
        export_weights(path)


def bench_inputs(run: TrainConfig, nets: dict, tmp: str, rank: int) -> dict:
    """--bench: what the stage reads from out_dir (or its flags) and is not there, made at random in `tmp`
    (a step's time does not depend on the weights): the VAE of the diffusion stage and the decoder's teacher
    (vae.pt), the base of ufogen / distill / lora / adapter (inference weights of a random UNet). Returns
    the flags that point the stage at them. (Each process makes its own: the same seed, the same weights.)"""
    stage, out, say = run.stage, run.out_dir, (print if rank == 0 else lambda *a: None)
    torch.manual_seed(run.seed)

    def random_vae() -> str:                                     # a vae.pt as sample.load_vae reads it
        path = os.path.join(tmp, "vae.pt")
        config.save_checkpoint(path, {"model": vae_lib.VAE(nets["vae"]).state_dict(),
                                      "config": {"vae": dataclasses.asdict(nets["vae"])}})
        return path

    if stage == "decoder" and not run.init_from and not os.path.isfile(os.path.join(out, "vae.pt")):
        say(f"bench: no {out}/vae.pt: a random {run.preset} VAE as the teacher")
        return {"init_from": random_vae()}
    own_vae = [os.path.join(out, f) for f in ("decoder.pt", "vae.pt")] + [run.vae_ckpt, run.vae_diffusers]
    if stage == "diffusion" and not any(p and os.path.exists(p) for p in own_vae):
        say(f"bench: no VAE in {out}: a random {run.preset} VAE")
        return {"vae_ckpt": random_vae()}
    base = run.init_from or default_base(out, stage)
    if stage in ("relu", "ufogen", "distill", "lora", "adapter") and not os.path.exists(base):
        text = build_text_encoder(run, nets["text"])
        unet_cfg = dataclasses.replace(nets["unet"], context_dim=text.cfg.width, in_channels=nets["vae"].latent_channels)
        conf = {"unet": dataclasses.asdict(unet_cfg), "text": dataclasses.asdict(text.cfg),
                "vae": dataclasses.asdict(nets["vae"]), "schedule": dataclasses.asdict(sample.ScheduleConfig()),
                "train": {"stage": "diffusion", "resolution": run.resolution, "text_encoder": run.text_encoder}}
        path = sample.weights_path(os.path.join(tmp, "diffusion.pt"))
        sample.save_weights(path, md.UNet(unet_cfg), vae_lib.VAE(nets["vae"]), text, conf)
        say(f"bench: no {base}: a random {run.preset} base model")
        return {"init_from": path}
    return {}


def run_stages(run: TrainConfig, given: dict, nets: dict, rank: int, world: int, device: str) -> None:
    t_start, names = time.time(), run_stage_names(run.stage)
    if rank == 0:
        print(f"stage {run.stage}, preset {run.preset}, {world} process(es) on {device}, "
              f"out_dir {run.out_dir}")
    if not run.resume:                                      # refuse before any work, not at the third stage
        for st in names:
            stage_checkpoint(stage_config(given, st), os.path.join(run.out_dir, f"{st}.pt"))
    if rank == 0 and run.stage == "all" and run.preset == "tiny" and data.is_shapes(run.data):
        print(estimate_minutes({st: stage_config(given, st) for st in names},
                               {st: STAGE_DEFAULTS[st]["steps"] for st in names}, device))

    def staged(stage: str) -> TrainConfig:
        """The stage's config, with the global RNG re-seeded: a stage's random init does not depend on how
        much randomness the stages before it drew, so `--stage all` trains what separate commands do."""
        torch.manual_seed(run.seed)
        random.seed(run.seed)
        return stage_config(given, stage)

    if "vae" in names:
        train_vae(staged("vae"), nets["vae"], rank, world, device)
    if "decoder" in names:
        own = run.stage == "decoder" and run.init_from
        teacher = run.init_from if own else os.path.join(run.out_dir, "vae.pt")
        train_decoder(staged("decoder"), nets["light"], teacher, rank, world, device)
    if "encode" in names:
        train_encode(staged("encode"), rank, world, device)
    for st in ("diffusion", "relu"):
        if st in names:
            train_diffusion(staged(st), nets["unet"], rank, world, device, nets["text"])
    if "ufogen" in names:
        train_ufogen(staged("ufogen"), nets["ufogen"], rank, world, device)
    if "distill" in names:
        train_distill(staged("distill"), nets["distill"], rank, world, device)
    if rank == 0 and run.stage == "all":
        where = os.path.join(run.out_dir, "")
        print(f"total: {(time.time() - t_start) / 60:.1f} min (per stage: {where}times.json; held-out "
              f"numbers: {where}eval.json)")
    if run.stage in ("lora", "adapter"):                        # 5.4 plugins, on the frozen base
        train_plugin(staged(run.stage), nets["plugin"], rank, world, device)


if __name__ == "__main__":
    config.run_cli(main)
