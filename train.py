"""
Every training stage of MobileDiffusion, nanoGPT-style: flags generated from the dataclasses, one visible
loop per stage, DDP from torchrun's environment variables, gradient accumulation, autocast (bf16 on GPUs
that support it, a no-op on CPU), optional torch.compile, checkpoints written atomically with everything
needed to resume bit-identically.

Stages (--stage):
  vae       3.5: train the VAE (L2 + KL + perceptual + adversarial)
  decoder   3.5: distil the light decoder from a trained VAE, encoder frozen
  diffusion 3 + 5.1: latent diffusion training of the MD UNet (v-prediction, CFG dropout, EMA)
  ufogen    4: one-step generator by UFOGen adversarial finetuning (losses in ufogen.py), full or LoRA
  distill   abstract: 8-step student distilled from the guided DDIM-50 teacher (target in ufogen.py)
  lora      5.4: a style LoRA on the frozen base model, from a small style set (plugins.py)
  adapter   5.4: a T2I-Adapter for edge maps on the frozen base model (plugins.py)
  all       (default) the tiny end-to-end run on synthetic data, on CPU: vae, decoder, diffusion, ufogen, distill

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
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

import config
import data
import evaluate
import md
import plugins as P
import sample as S
import ufogen as U
import vae as vae_lib
from config import diverged, load_checkpoint, refuse_if_mismatch, save_checkpoint


@dataclass
class TrainConfig:
    stage: str = "all"               # vae | decoder | diffusion | ufogen | distill | lora | adapter | all (= vae..ufogen)
    preset: str = "tiny"             # model presets by name: tiny (CPU) or md / md-lite (paper)
    out_dir: str = "out/tiny"        # checkpoints, metrics.jsonl, loss curves, sample grids, eval.json
    data: str = "shapes"             # "shapes" (synthetic) or an image folder (metadata.jsonl or .txt sidecars)
    style: str = ""                  # shapes' style: plain | outlined | mixed; "" = the stage's (STAGE_STYLE)
    resolution: int = 32             # training resolution in px (5.1: 256 then 512; tiny: 32, an 8x8 latent)
    batch_size: int = 0              # per optimizer step, summed over processes and accumulation; 0 = stage default
    grad_accum: int = 1              # micro-steps per optimizer step
    steps: int = 0                   # optimizer steps of this stage; 0 = the stage's tiny default
    lr: float = 0.0                  # 0 = the stage's default (vae 1e-3 tiny; diffusion 1e-3, 5.1)
    weight_decay: float = 0.01       # 5.1: AdamW weight decay 0.01
    beta1: float = 0.9               # 5.1
    beta2: float = 0.999             # 5.1
    grad_clip: float = 1.0           # global gradient-norm clip (0 = off)
    warmup: int = 100                # linear learning-rate warm-up steps
    lr_schedule: str = "cosine"      # after warm-up: "cosine" (to min_lr_frac * lr at the last step) or "constant"
    min_lr_frac: float = 0.1         # nanoGPT: min_lr = lr / 10
    dtype: str = "auto"              # auto (bf16 on capable GPUs, else fp32) | fp32 | bf16 | fp16
    compile: bool = False            # torch.compile the trained network
    resume: bool = False             # continue this stage from out_dir/<stage>.pt
    overwrite: bool = False          # train a stage from scratch although out_dir/<stage>.pt exists (replaces it)
    init_from: str = ""              # weights to start from: decoder <- a vae.pt; diffusion <- a diffusion.pt
                                     # (5.1's 256 -> 512px schedule; 3.2's softmax -> relu finetune)
    vae_ckpt: str = ""               # diffusion: our vae.pt / decoder.pt (default: out_dir/decoder.pt, else vae.pt)
    vae_diffusers: str = ""          # diffusion: a local diffusers AutoencoderKL folder instead (e.g. SD's, c=4)
    text_encoder: str = ""           # diffusion: a local Hugging Face CLIP folder (3: CLIP-ViT/L14, frozen);
                                     # empty = the preset's own (tiny: word tokens, trained jointly)
    p_uncond: float = 0.1            # classifier-free guidance: fraction of captions dropped to "" in training
    min_snr: float = 5.0             # diffusion loss weighting: 0 = plain v-MSE; gamma > 0 = min-SNR-gamma (5.1
                                     # names none; 5 is Hang et al.'s gamma; the tiny run's ablation: docs/results.md)
    train_images: int = -1           # diffusion, ufogen, distill: N = a fixed set of the first N training images,
                                     # VAE-encoded once and kept as latents; 0 = fresh images every step;
                                     # -1 = auto: 8192 for the synthetic shapes if the stage sees more, else 0
    ema_decay: float = 0.999         # EMA of the trained weights (paper scale: 0.9999)
    guidance: float = 3.0            # 5.2: CFG scale ~3 for the evaluation samples
    eval_steps: int = 50             # 5.2: DDIM 50 steps for the evaluation
    vgg_weights: str = ""            # local VGG16 state dict for the perceptual loss (3.5); empty = no perceptual term
    log_every: int = 25
    sample_every: int = 500          # sample / reconstruction grid every N steps (0 = only at the end)
    ckpt_every: int = 500
    eval_images: int = 128           # held-out images for the end-of-stage evaluation
    num_workers: int = 0             # DataLoader workers (real image folders)
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | mps


STAGES = ("vae", "decoder", "diffusion", "ufogen", "distill", "lora", "adapter")
ALL_STAGES = STAGES[:5]              # --stage all, the tiny end-to-end run; the 5.4 plugins are their own commands
STAGE_DEFAULTS = {                   # (steps, lr, batch_size) of the tiny CPU run (times: docs/results.md)
    "vae": (1800, 1e-3, 8),          # batch 8: twice the steps for the same images as batch 16, +2 dB
    "decoder": (800, 1e-3, 8),
    "diffusion": (600, 1e-3, 64),    # 5.1: AdamW lr 1e-3; batch 64: 1.4x the images/s of batch 32 on 2 cores
    "ufogen": (200, 3e-4, 16),       # UFOGen's code: Adam lr 1e-4 for G and D; 3e-4 for a 200-step toy run
    "distill": (150, 1e-3, 16),      # 1e-3: the 100-step warm-up leaves 1e-4 no time to fold in guidance
    "lora": (2000, 3e-3, 16),        # 5.4: the LoRA needs longer than the adapter at this scale (docs/results.md)
    "adapter": (800, 2e-3, 16),
}


# The stages that can train on cached latents (TrainConfig.train_images), and the auto size: the tiny diffusion
# stage draws 600 x 64 = 38400 images; a fixed set of 8192, each seen 4-5 times, is 8192 VAE encodes instead.
CACHED_STAGES = ("diffusion", "ufogen", "distill")
AUTO_TRAIN_IMAGES = 8192

# Which synthetic pictures each stage sees: plain shapes, except the 5.4 style LoRA's small style set. So the
# outlined style is new to the diffusion model and to everything distilled from it until the LoRA adds it.
STAGE_STYLE = {"lora": "outlined"}


# Minutes of each stage of the default run (with its evaluation) on the 2-core machine the defaults were tuned
# on, whose fp32 matmul peak is REFERENCE_GFLOPS (docs/results.md); scaled by this machine's peak for the
# estimate the run prints at its start.
STAGE_MINUTES = {"vae": 3.0, "decoder": 0.75, "diffusion": 3.35, "ufogen": 1.45, "distill": 0.75}
REFERENCE_GFLOPS = 307.0


def estimate_minutes(cfg: "TrainConfig", device: str) -> str:
    """The default run's expected length on this machine, from STAGE_MINUTES (the defaults' steps; longer
    --steps scale it)."""
    peak = evaluate.matmul_peak(device)
    scale = REFERENCE_GFLOPS / peak if device.startswith("cpu") else float("nan")
    per = {st: m * (cfg.steps or STAGE_DEFAULTS[st][0]) / STAGE_DEFAULTS[st][0] * scale for st, m in STAGE_MINUTES.items()}
    return (f"estimated total: {sum(per.values()):.1f} min on this CPU (matmul peak {peak:.0f} GFLOP/s; "
            + ", ".join(f"{st} {m:.1f}" for st, m in per.items()) + ")")


def stage_config(cfg: "TrainConfig", stage: str) -> "TrainConfig":
    """cfg for one stage, its zero/empty fields (steps, lr, batch_size, style) filled with the stage's defaults."""
    steps, lr, batch = STAGE_DEFAULTS[stage]
    cfg = dataclasses.replace(cfg, stage=stage, steps=cfg.steps or steps, lr=cfg.lr or lr,
                              batch_size=cfg.batch_size or batch, style=cfg.style or STAGE_STYLE.get(stage, "plain"))
    if cfg.train_images < 0:         # auto, resolved here so that the checkpoint records what the stage used
        auto = cfg.data == "shapes" and stage in CACHED_STAGES and cfg.steps * cfg.batch_size > AUTO_TRAIN_IMAGES
        cfg = dataclasses.replace(cfg, train_images=AUTO_TRAIN_IMAGES if auto else 0)
    return cfg


# ----------------------------------------------------------------------------------------------------
# Plumbing shared by every stage: devices, DDP, batches, checkpoints, logs
# ----------------------------------------------------------------------------------------------------

def setup(cfg: TrainConfig):
    """DDP from torchrun's env vars (nanoGPT); NCCL on GPUs, gloo on CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device = cfg.device
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend)
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size = {cfg.batch_size} is not divisible by processes x grad_accum = "
                         f"{world} x {cfg.grad_accum}")
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return rank, world, device


def autocast(cfg: TrainConfig, device: str):
    """bf16 autocast where it helps (GPUs); a no-op context on CPU, so the tiny run is exact fp32."""
    dt = cfg.dtype
    if dt == "auto":
        dt = "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"
    if dt == "fp32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dt])


def lr_at(step: int, cfg: TrainConfig, base_lr: float, steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr (nanoGPT) or constant. 5.1 states no schedule."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return base_lr
    progress = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return base_lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


# TrainConfig fields a --resume may change: how long to train (steps; the cosine schedule stretches with it),
# how often to log / sample / save / evaluate, and where and how fast it runs. Any other difference (seed,
# batch size, lr, resolution, data, ...) would silently make the checkpoint a mix of two runs: refused.
RESUMABLE = ("steps", "resume", "overwrite", "log_every", "sample_every", "ckpt_every", "eval_images", "eval_steps",
             "guidance", "num_workers", "device", "compile", "dtype", "init_from", "out_dir")


def stage_checkpoint(cfg: TrainConfig, path: str, rank: int = 0) -> dict | None:
    """What a stage starts from: with --resume, its checkpoint (refused if its training config differs from this
    run's in a field outside RESUMABLE; a stage not begun yet starts fresh, so `--stage all --resume` goes on
    after any stage). Without --resume, None, refusing to replace an existing checkpoint unless --overwrite."""
    if not cfg.resume:
        if os.path.isfile(path) and not cfg.overwrite:
            raise ValueError(f"{path} exists: give --resume to continue it, or --overwrite to train {cfg.stage} again "
                             f"from scratch (replacing it; the stages trained from it would no longer match)")
        return None
    if not os.path.isfile(path):
        if rank == 0:
            print(f"{cfg.stage}: --resume, but no {path} yet: starting this stage from step 0")
        return None
    ck = load_checkpoint(path)
    saved = ck.get("config", {}).get("train", ck.get("train"))
    if saved is None:
        raise ValueError(f"{path}: no training config saved in it; cannot check that --resume continues the same run")
    refuse_if_mismatch(path, "training", saved, cfg, ignore=RESUMABLE)
    return ck


def restore(ck: dict, **parts) -> int:
    """Load a resumed checkpoint's states into the given modules and optimisers (keyword = the checkpoint key);
    returns the step to go on from."""
    for key, obj in parts.items():
        obj.load_state_dict(ck[key])
    return ck["step"]


def wrap(model, cfg: TrainConfig, world: int, device: str):
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def make_optimizer(params, cfg: TrainConfig, lr: float, betas=None):
    return torch.optim.AdamW(params, lr=lr, betas=betas or (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def clip_and_step(params, opt, cfg: TrainConfig, step: int) -> float:
    """Clip the global gradient norm and step; a non-finite norm (a NaN or inf loss, or an overflow) stops the
    stage before the update reaches the weights (Diverged)."""
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not math.isfinite(float(norm)):
        raise diverged(cfg.stage, cfg.out_dir, "gradient norm", float(norm), step + 1)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


# The skeleton every stage loop shares: the step's learning rate, its random numbers, this process's slice
# of the global batch, the data stream from the step it starts at, and when to log / save.

def set_lr(step: int, cfg: TrainConfig, *opts) -> float:
    """lr_at(step) set on every optimiser; returned for the log."""
    lr = lr_at(step, cfg, cfg.lr, cfg.steps)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = lr
    return lr


def step_generator(cfg: TrainConfig, step: int) -> torch.Generator:
    """The step's randomness for the *global* batch, from (seed, step) alone: each process takes its slice
    (micro_slice), so the trajectory does not depend on the number of processes and a resumed run repeats it
    bit for bit."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def micro_slice(cfg: TrainConfig, rank: int, world: int, k: int) -> slice:
    """Where micro-batch k of this process sits in the global batch (the layout data.batches yields)."""
    per_proc = cfg.batch_size // world
    micro = per_proc // cfg.grad_accum
    return slice(rank * per_proc + k * micro, rank * per_proc + (k + 1) * micro)


def stage_data(cfg: TrainConfig, rank: int, world: int, start: int, device: str, vae=None):
    """(dataset, batch stream from step `start`, Log) for cfg.stage. Given the stage's frozen `vae` and
    cfg.train_images = N, the dataset is the first N training images as latents, encoded once (the stream then
    yields latents, not images; see to_latents)."""
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    if vae is not None and cfg.train_images > 0:
        dataset = encode_dataset(dataset, cfg.train_images, vae, device)
    stream = data.batches(dataset, cfg.batch_size, cfg.grad_accum, cfg.seed, rank, world, start, device, cfg.num_workers)
    return dataset, stream, config.Log(cfg.out_dir, cfg.stage, cfg.steps, start, rank)


@torch.no_grad()
def encode_dataset(dataset, n: int, vae, device: str, batch: int = 256) -> data.Latents:
    """The first n items as (scaled posterior-mean latent, caption) pairs: the VAE runs once per image instead
    of once per step, and the images are rendered or decoded from disk once."""
    latents, captions = [], []
    for i in range(0, min(n, len(dataset)), batch):
        items = [dataset[j] for j in range(i, min(i + batch, n, len(dataset)))]
        x = torch.stack([im for im, _ in items]).to(device)
        latents.append(to_latents(x, vae, cached=False).cpu())
        captions += [c for _, c in items]
    return data.Latents(torch.cat(latents), captions)


def to_latents(x: torch.Tensor, vae, cached: bool) -> torch.Tensor:
    """A batch from stage_data as diffusion latents (B, c, H/f, W/f): encoded here (posterior mean, not a
    sample: deterministic; the posterior std is tiny anyway), or already encoded (`cached`: cfg.train_images)."""
    if cached:
        return x
    with torch.no_grad():
        return vae.encode(x).mode() * vae.cfg.scaling_factor


@torch.no_grad()
def forward_macs(model, *inputs) -> float:
    """MACs of one forward on these (batch-1) inputs: the unit of each stage's throughput report."""
    return float(md.count_macs(model, *inputs))


def one_latent(cfg: TrainConfig, vae, device: str) -> torch.Tensor:
    """A zero latent (1, c, H/f, W/f) of this run's resolution, for forward_macs."""
    f = vae.cfg.factor
    return torch.zeros(1, vae.cfg.latent_channels, cfg.resolution // f, cfg.resolution // f, device=device)


def speed_report(cfg: TrainConfig, start: int, t0: float, device: str, flops_per_image: float) -> None:
    """The stage's time, images/s and fraction of the machine's peak (evaluate.throughput_report)."""
    evaluate.throughput_report(cfg, cfg.steps - start, time.time() - t0, flops_per_image, device)


def due(step: int, every: int, cfg: TrainConfig) -> bool:
    """After optimiser step `step` (0-based): every `every` steps, and at the last."""
    return (step + 1) % every == 0 or step + 1 == cfg.steps


def make_perceptual(cfg: TrainConfig, vcfg: vae_lib.VAEConfig, rank: int, device: str):
    """The 3.5 perceptual loss if a local VGG16 file is given and the preset weights it; otherwise None,
    said once in the log (never substituted silently)."""
    if cfg.vgg_weights and vcfg.perceptual_weight > 0:
        return vae_lib.PerceptualLoss(cfg.vgg_weights).to(device)
    if rank == 0:
        why = "perceptual_weight = 0 in this preset" if vcfg.perceptual_weight == 0 else "no --vgg_weights file given"
        print(f"{cfg.stage}: perceptual loss OFF ({why}); training with the other loss terms only")
    return None


def resume_vae_gan(cfg: TrainConfig, ckpt_path: str, vcfg: vae_lib.VAEConfig, model, disc, opt, opt_d, rank: int) -> int:
    """Restore a vae/decoder stage (VAE, discriminator, both optimisers, RNG); returns the step to go on from."""
    ck = stage_checkpoint(cfg, ckpt_path, rank)
    if ck is None:
        return 0
    refuse_if_mismatch(ckpt_path, "VAE", ck["config"]["vae"], vcfg, ignore=("scaling_factor",))  # re-estimated
    model.load_state_dict(ck["model"], source=ckpt_path)
    torch.set_rng_state(ck["rng"]["torch"])
    return restore(ck, disc=disc, opt=opt, opt_d=opt_d)


# ----------------------------------------------------------------------------------------------------
# Stage: vae (3.5)
# ----------------------------------------------------------------------------------------------------

def train_vae(cfg: TrainConfig, vcfg: vae_lib.VAEConfig, rank: int, world: int, device: str) -> str:
    """3.5: 'our VAE is trained with a combination of loss functions, including L2 reconstruction loss, KL
    divergence for regularization, perceptual loss, and adversarial loss'. Returns the checkpoint path."""
    ckpt_path = os.path.join(cfg.out_dir, "vae.pt")
    model = vae_lib.VAE(vcfg).to(device)
    disc = vae_lib.PatchDiscriminator(vcfg).to(device)
    # LDM trains its autoencoders with Adam(0.5, 0.9): a low beta1 keeps the GAN game from oscillating.
    opt = make_optimizer(model.parameters(), cfg, cfg.lr, betas=(0.5, 0.9))
    opt_d = make_optimizer(disc.parameters(), cfg, cfg.lr, betas=(0.5, 0.9))
    start = resume_vae_gan(cfg, ckpt_path, vcfg, model, disc, opt, opt_d, rank)
    perceptual = make_perceptual(cfg, vcfg, rank, device)
    net, dnet = wrap(model, cfg, world, device), wrap(disc, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device)
    last_layer = model.decoder.conv_out.weight
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt, opt_d)
        use_disc = step >= vcfg.disc_start and vcfg.disc_weight > 0
        m = {}
        for _ in range(cfg.grad_accum):
            x, _ = next(stream)
            with autocast(cfg, device):
                recon, post = net(x)
                rec = vae_lib.l2_loss(recon, x)
                if perceptual is not None:
                    rec = rec + vcfg.perceptual_weight * perceptual(recon, x)
                kl = vae_lib.kl_loss(post, x[0].numel())
                loss = rec + vcfg.kl_weight * kl
                if use_disc:
                    g_loss = vae_lib.g_hinge_loss(dnet(recon))
                    w = vcfg.disc_weight * vae_lib.adaptive_weight(rec, g_loss, last_layer)
                    loss = loss + w * g_loss
                    m["g_adv"] = float(g_loss.detach())
            (loss / cfg.grad_accum).backward()
            if use_disc:                                          # D: real images vs (detached) reconstructions
                with autocast(cfg, device):
                    d_loss = vae_lib.d_hinge_loss(dnet(x), dnet(recon.detach()))
                (d_loss / cfg.grad_accum).backward()
                m["d_loss"] = float(d_loss.detach())
        m.update(loss=float(loss.detach()), l2=float(vae_lib.l2_loss(recon.detach(), x)), kl=float(kl.detach()), lr=lr)
        clip_and_step(model.parameters(), opt, cfg, step)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step)
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        done = step + 1 == cfg.steps
        if rank == 0 and done:
            # SD's latent scaling: 1 / std of posterior samples on training images, stored with the weights.
            sample = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))]).to(device)
            vcfg.scaling_factor = vae_lib.estimate_scaling_factor(model, sample)
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            save_checkpoint(ckpt_path, {"stage": "vae", "step": step + 1, "model": model.state_dict(),
                                        "disc": disc.state_dict(), "opt": opt.state_dict(),
                                        "opt_d": opt_d.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                        "config": {"vae": dataclasses.asdict(vcfg), "train": dataclasses.asdict(cfg)}})
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            evaluate.save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, f"vae_recon_{step + 1:06d}.png"))
    log.close()
    if rank == 0:
        x1 = torch.zeros(1, vcfg.in_channels, cfg.resolution, cfg.resolution, device=device)
        speed_report(cfg, start, t0, device, 6 * forward_macs(model, x1))          # VAE forward + backward
        evaluate.vae_report(cfg, model, (time.time() - t0) / 60, device)
        evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, "loss_vae.png"), "vae", ["loss", "l2", "kl", "d_loss"])
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Stage: decoder (3.5 light-decoder distillation)
# ----------------------------------------------------------------------------------------------------

def train_decoder(cfg: TrainConfig, light_cfg: vae_lib.VAEConfig, teacher_path: str, rank: int, world: int,
                  device: str) -> str:
    """3.5: 'We train the lightweight decoder ... with the encoder frozen. We remove the unnecessary KL
    regularization in the objective, and reduce the weight of adversarial loss.' The light VAE keeps the
    teacher's encoder (bit-identical, frozen) and learns a pruned decoder that matches both the images
    and the full decoder's reconstructions."""
    ckpt_path = os.path.join(cfg.out_dir, "decoder.pt")
    teacher = S.load_vae(teacher_path).to(device).requires_grad_(False)
    t = teacher.cfg                                               # the encoder is the teacher's, field for field
    light_cfg = dataclasses.replace(light_cfg, in_channels=t.in_channels, latent_channels=t.latent_channels,
                                    channels=t.channels, layers=t.layers, mid_attn=t.mid_attn,
                                    scaling_factor=t.scaling_factor)
    model = vae_lib.VAE(light_cfg).to(device)
    model.encoder.load_state_dict(teacher.encoder.state_dict())
    model.quant_conv.load_state_dict(teacher.quant_conv.state_dict())
    model.post_quant_conv.load_state_dict(teacher.post_quant_conv.state_dict())
    model.encoder.requires_grad_(False)
    model.quant_conv.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    disc = vae_lib.PatchDiscriminator(light_cfg).to(device)
    opt = make_optimizer(trainable, cfg, cfg.lr, betas=(0.5, 0.9))
    opt_d = make_optimizer(disc.parameters(), cfg, cfg.lr, betas=(0.5, 0.9))
    start = resume_vae_gan(cfg, ckpt_path, light_cfg, model, disc, opt, opt_d, rank)
    perceptual = make_perceptual(cfg, light_cfg, rank, device)
    dec = wrap(model.decoder, cfg, world, device)
    dnet = wrap(disc, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device)
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt, opt_d)
        use_disc = step >= light_cfg.disc_start and light_cfg.disc_weight > 0
        m = {}
        for _ in range(cfg.grad_accum):
            x, _ = next(stream)
            with torch.no_grad():                                 # frozen encoder and teacher decoder
                z = teacher.encode(x).sample()
                full = teacher.decode(z, clamp=False)
            with autocast(cfg, device):
                light = dec(model.post_quant_conv(z))
                rec = vae_lib.decoder_distill_loss(light, full, x)
                if perceptual is not None:
                    rec = rec + light_cfg.perceptual_weight * perceptual(light, x)
                loss = rec
                if use_disc:
                    g_loss = vae_lib.g_hinge_loss(dnet(light))
                    loss = loss + light_cfg.disc_weight * vae_lib.adaptive_weight(
                        rec, g_loss, model.decoder.conv_out.weight) * g_loss
            (loss / cfg.grad_accum).backward()
            if use_disc:
                with autocast(cfg, device):
                    d_loss = vae_lib.d_hinge_loss(dnet(x), dnet(light.detach()))
                (d_loss / cfg.grad_accum).backward()
                m["d_loss"] = float(d_loss.detach())
        m.update(loss=float(loss.detach()), l2=float(vae_lib.l2_loss(light.detach(), x)), lr=lr)
        clip_and_step(trainable, opt, cfg, step)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step)
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            save_checkpoint(ckpt_path, {"stage": "decoder", "step": step + 1, "model": model.state_dict(),
                                        "disc": disc.state_dict(), "opt": opt.state_dict(),
                                        "opt_d": opt_d.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                        "config": {"vae": dataclasses.asdict(light_cfg),
                                                   "train": dataclasses.asdict(cfg)}})
    log.close()
    if rank == 0:
        x1 = torch.zeros(1, light_cfg.in_channels, cfg.resolution, cfg.resolution, device=device)
        z1 = teacher.encode(x1).mode()
        speed_report(cfg, start, t0, device, 2 * forward_macs(teacher, x1) + 6 * forward_macs(model.decoder, z1))
        evaluate.vae_report(cfg, model.eval(), (time.time() - t0) / 60, device, teacher=teacher)
        evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, "loss_decoder.png"), "decoder", ["loss", "l2", "d_loss"])
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Stage: diffusion (3: latent diffusion with the MD UNet; 5.1 optimisation; CFG training)
# ----------------------------------------------------------------------------------------------------

def build_text_encoder(cfg: TrainConfig, text_cfg: md.TextConfig) -> md.TextEncoder:
    if cfg.text_encoder:
        return md.TextEncoder.from_pretrained(cfg.text_encoder)
    if cfg.preset != "tiny":
        raise ValueError(f"--preset {cfg.preset} conditions on CLIP-ViT/L14 (3): give a local Hugging Face CLIP folder "
                         f"with --text_encoder path/to/clip-vit-large-patch14 (no downloads at run time)")
    return md.TextEncoder(text_cfg)


def build_vae_for_diffusion(cfg: TrainConfig) -> vae_lib.VAE:
    if cfg.vae_diffusers:
        return vae_lib.VAE.from_diffusers(cfg.vae_diffusers).eval()
    path = cfg.vae_ckpt or next((p for p in (os.path.join(cfg.out_dir, "decoder.pt"), os.path.join(cfg.out_dir, "vae.pt"))
                                 if os.path.isfile(p)), os.path.join(cfg.out_dir, "vae.pt"))
    return S.load_vae(path)


def check_compatible(unet_cfg: md.UNetConfig, vae: vae_lib.VAE, text: md.TextEncoder) -> None:
    if unet_cfg.in_channels != vae.cfg.latent_channels:
        raise ValueError(f"UNetConfig.in_channels = {unet_cfg.in_channels} but the VAE has {vae.cfg.latent_channels} "
                         f"latent channels (set --in_channels {vae.cfg.latent_channels})")
    if unet_cfg.context_dim != text.cfg.width:
        raise ValueError(f"UNetConfig.context_dim = {unet_cfg.context_dim} but the text encoder's width is "
                         f"{text.cfg.width} (set --context_dim {text.cfg.width})")


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)


def describe(model: S.Denoiser, cfg: TrainConfig, vae, device: str) -> None:
    c, n = model.unet.cfg, md.count_params(model.unet)
    x, t = one_latent(cfg, vae, device), torch.zeros(1, device=device)
    macs = md.count_macs(model.unet, x, t, torch.zeros(1, model.text.cfg.max_len, c.context_dim, device=device))
    print(f"diffusion: UNet {n / 1e6:.1f}M params (+{sum(p.numel() for p in model.text.parameters() if p.requires_grad) / 1e6:.2f}M "
          f"trained text encoder), {macs / 1e9:.3f} GMACs/eval at {cfg.resolution}px ({tuple(x.shape[1:])} latent)")


def init_denoiser(model: S.Denoiser, path: str, unet_cfg: md.UNetConfig) -> None:
    """--init_from: another diffusion.pt's EMA weights, for a UNet that may differ only in attn_act / dropout."""
    ck = load_checkpoint(path)
    if "unet" not in ck.get("config", {}):
        raise ValueError(f"{path}: not a diffusion checkpoint (no config['unet'])")
    refuse_if_mismatch(path, "UNet", ck["config"]["unet"], unet_cfg, ignore=("attn_act", "dropout"))
    S.load_denoiser_state(model, ck["ema"], path)


def train_diffusion(cfg: TrainConfig, unet_cfg: md.UNetConfig, rank: int, world: int, device: str,
                    text_cfg: md.TextConfig = md.TEXT_PRESETS["tiny"]) -> str:
    """Latent diffusion training of the MD UNet: v-prediction on VAE latents (sample.py explains the
    choice), text dropped with probability p_uncond for classifier-free guidance, AdamW (5.1), EMA."""
    ckpt_path = os.path.join(cfg.out_dir, "diffusion.pt")
    vae = build_vae_for_diffusion(cfg).to(device).requires_grad_(False)
    text = build_text_encoder(cfg, text_cfg)
    check_compatible(unet_cfg, vae, text)
    model = S.Denoiser(md.UNet(unet_cfg), text).to(device)
    sched = S.make_schedule()
    if cfg.init_from:                                              # progressive 256->512, or softmax->relu (3.2)
        init_denoiser(model, cfg.init_from, unet_cfg)
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, cfg.lr)
    start, ck = 0, stage_checkpoint(cfg, ckpt_path, rank)
    if ck is not None:
        refuse_if_mismatch(ckpt_path, "UNet", ck["config"]["unet"], unet_cfg)
        refuse_if_mismatch(ckpt_path, "text encoder", ck["config"]["text"], text.cfg)
        S.load_denoiser_state(model, ck["model"], ckpt_path)
        S.load_denoiser_state(ema, ck["ema"], ckpt_path)
        torch.set_rng_state(ck["rng"]["torch"])                   # (the noise itself comes from (seed, step))
        start = restore(ck, opt=opt)
    if rank == 0:
        describe(model, cfg, vae, device)
    net = wrap(model, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    lat = (unet_cfg.in_channels, cfg.resolution // vae.cfg.factor, cfg.resolution // vae.cfg.factor)
    grid_prompts = evaluate.heldout_prompts(cfg, 8) + [dataset[i][1] for i in range(8)] if cfg.data == "shapes" else None
    t0, seen = time.time(), 0
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt)
        # t, noise and caption dropout for the *global* batch; this process takes its slice (step_generator).
        g = step_generator(cfg, step)
        t_all = torch.randint(0, len(sched["alpha"]), (cfg.batch_size,), generator=g)
        eps_all = torch.randn((cfg.batch_size, *lat), generator=g)
        drop_all = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = micro_slice(cfg, rank, world, k)
            t, eps, drop = t_all[sl].to(device), eps_all[sl].to(device), drop_all[sl]
            texts = ["" if d else c for c, d in zip(texts, drop.tolist())]      # CFG: the empty prompt
            z0 = to_latents(x, vae, isinstance(dataset, data.Latents))          # (B, c, H/f, W/f), ~unit var.
            ids = text.tokenizer(texts).to(device)
            with autocast(cfg, device):
                x_t = S.q_sample(sched, z0, t, eps)
                err = (net(x_t, t, ids).float() - S.v_target(sched, z0, t, eps)).square()
                loss = (S.v_loss_weight(sched, t, cfg.min_snr, err) * err).mean()
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        if world > 1:                                             # log the global mean loss
            lt = torch.tensor([loss_sum], device=device)
            dist.all_reduce(lt)
            loss_sum = float(lt) / world
        gnorm = clip_and_step(params, opt, cfg, step)
        ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)))   # EMA warm-up for short runs
        seen += cfg.batch_size
        m = {"loss": loss_sum, "lr": lr, "grad_norm": gnorm, "img_per_s": seen / (time.time() - t0)}
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        done = step + 1 == cfg.steps
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            save_checkpoint(ckpt_path, {
                "stage": "diffusion", "step": step + 1, "model": S.trainable_state(model), "ema": S.trainable_state(ema),
                "opt": opt.state_dict(), "vae": vae.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "config": {"unet": dataclasses.asdict(unet_cfg), "text": dataclasses.asdict(text.cfg),
                           "vae": dataclasses.asdict(vae.cfg), "train": dataclasses.asdict(cfg)}})
        if rank == 0 and grid_prompts and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            pipe = S.Pipeline(ema.unet, vae, ema.text, sched, device, cfg.resolution)
            imgs = pipe.images(grid_prompts, steps=20, guidance_scale=cfg.guidance, seed=0)
            data.image_grid(imgs.cpu(), nrow=8).save(os.path.join(cfg.out_dir, f"samples_{step + 1:06d}.png"))
            model.train()
    log.close()
    if rank == 0:
        ids1 = text.tokenizer(["a red circle on a blue background"]).to(device)
        speed_report(cfg, start, t0, device, 6 * forward_macs(model, torch.zeros(1, *lat, device=device),
                                                              torch.zeros(1, dtype=torch.long, device=device), ids1))
        evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, "loss_diffusion.png"), "diffusion", ["loss"])
        if cfg.data == "shapes":
            evaluate.diffusion_report(cfg, S.Pipeline(ema.unet, vae, ema.text, sched, device, cfg.resolution))
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Stage: ufogen (4: one-step generation by adversarial finetuning)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def null_context(text) -> torch.Tensor:
    """The empty prompt's context (1, L, D), classifier-free guidance's unconditional input; the text encoder
    is frozen after the diffusion stage, so one encoding serves every batch (.expand(B, -1, -1))."""
    return text([""])


def latent_batch(x, texts, vae, text, cached: bool):
    """Data latents (to_latents) and frozen text contexts for the post-training stages."""
    with torch.no_grad():
        return to_latents(x, vae, cached), text(texts)


def save_generator(path: str, step: int, gen: torch.nn.Module, gen_ema: torch.nn.Module, text, vae, cfg, extra: dict):
    """A checkpoint that Pipeline.from_checkpoint / load_diffusion read like a diffusion.pt (LoRA merged),
    plus the raw training state under `extra` for --resume."""
    def merged(m):
        return S.trainable_state(S.Denoiser(P.merge_lora(copy.deepcopy(m)), text))
    payload = {"stage": cfg.stage, "step": step, "model": merged(gen), "ema": merged(gen_ema), "vae": vae.state_dict(),
               **extra}
    save_checkpoint(path, payload)


def load_base(cfg: TrainConfig, device: str):
    """The pretrained diffusion model the post-training stages start from (--init_from, else out_dir's
    diffusion.pt), its frozen VAE and text encoder on `device`, its saved config, and cfg with the base's
    text encoder folder (so the stage's checkpoint reloads with the same encoder)."""
    base = cfg.init_from or os.path.join(cfg.out_dir, "diffusion.pt")
    unet, vae, text, conf = S.load_diffusion(base, ema=True)
    cfg = dataclasses.replace(cfg, text_encoder=conf["train"].get("text_encoder", ""))
    return base, unet.to(device), vae.to(device).requires_grad_(False), text.to(device).requires_grad_(False), conf, cfg


def train_ufogen(cfg: TrainConfig, ucfg, rank: int, world: int, device: str) -> str:
    """4.1 Eq. 1 with the 4.2 reconstruction term of choice and optional 4.3 LoRA. One G forward per step
    serves both players: D learns on its detached output, G on the same output through the frozen D."""
    U.validate(ucfg)
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    sched = S.make_schedule()
    teacher = copy.deepcopy(unet).requires_grad_(False) if ucfg.recon == "distill" else None   # Eq. 2
    disc = U.Discriminator(unet).to(device)                                                   # 4.1: from the base
    gen = copy.deepcopy(unet).requires_grad_(True)
    g_params = P.add_lora(gen, ucfg.lora_rank, ucfg.lora_alpha, ucfg.lora_convs) if ucfg.lora_rank else list(gen.parameters())
    gen_ema = copy.deepcopy(gen).requires_grad_(False)                                        # Eq. 3, and sampling
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr * ucfg.d_lr_mult, betas=(0.0, cfg.beta2))   # UFOGen: D beta1 0
    ckpt_path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = stage_checkpoint(cfg, ckpt_path, rank)
    if ck is not None:
        refuse_if_mismatch(ckpt_path, "UFOGen", ck["config"]["ufogen"], ucfg)
        start = restore(ck, g_raw=gen, g_ema_raw=gen_ema, d=disc, opt_g=opt_g, opt_d=opt_d)
    if rank == 0:
        n = sum(p.numel() for p in g_params)
        print(f"ufogen: recon={ucfg.recon}, {'LoRA rank ' + str(ucfg.lora_rank) if ucfg.lora_rank else 'full finetuning'} "
              f"({n / 1e6:.2f}M trained G params), D {md.count_params(disc) / 1e6:.1f}M, gap {ucfg.gap}")
    g_net, d_net = wrap(gen, cfg, world, device), wrap(disc, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    null, t0 = null_context(text), time.time()                                        # for a guided target
    for step in range(start, cfg.steps):
        g = step_generator(cfg, step)
        t_all = U.sample_t(ucfg, cfg.batch_size, g)                                  # t in [1, T)
        d_step = step % ucfg.d_every == 0
        m = {}
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            z0, ctx = latent_batch(x, texts, vae, text, isinstance(dataset, data.Latents))
            uncond = null.expand(ctx.shape[0], -1, -1)
            sl = micro_slice(cfg, rank, world, k)
            t = t_all[sl].to(device)
            t_prev = (t - ucfg.gap).clamp(min=0)                                      # t' = t - gap
            e_t, e_real, e_fake = (torch.randn(z0.shape, generator=g).to(device) for _ in range(3))
            x_t = S.q_sample(sched, z0, t, e_t)
            # D's time input: Eq. 1 prints D(x_{t-1}, t); UFOGen's code (our default) gives D the time t' of the
            # sample it judges, so D sees the same (x, time) pairs a diffusion model was trained on (d_time).
            t_d = t_prev if ucfg.d_time == "t_prev" else t
            with autocast(cfg, device):
                x0_pred = S.x0_from_v(sched, x_t, t, g_net(x_t, t, ctx))              # x0' = G(x_t, t)
                real = S.q_sample(sched, z0, t_prev, e_real)                         # x_{t-1} ~ q(.|x0)
                fake = S.q_sample(sched, x0_pred, t_prev, e_fake)                    # x'_{t-1} ~ q(.|x0'), with grad
                # D step: real vs detached fake. UFOGen's code steps D on every other iteration only
                # (d_every = 2) and draws fresh t and noise for it; we reuse G's forward, same distribution.
                disc.requires_grad_(True)
                loss_d = U.d_loss(d_net(real, t_d, ctx), d_net(fake.detach(), t_d, ctx), ucfg.logit_clamp) if d_step else None
            if d_step:
                (loss_d / cfg.grad_accum).backward()
            with autocast(cfg, device):
                # G step: adversarial through a frozen D, plus lambda * (gamma_t) * reconstruction.
                disc.requires_grad_(False)
                loss_adv = U.g_adv_loss(d_net(fake, t_d, ctx), ucfg.logit_clamp)
                target = U.recon_target(ucfg, z0, x_t, t, ctx, sched, teacher, gen_ema, uncond)
                loss_rec = U.recon_loss(x0_pred.float(), target, t, sched, weighted=U.recon_weighted(ucfg))
                loss_g = loss_adv + ucfg.lam * loss_rec
            (loss_g / cfg.grad_accum).backward()
            m = {"g_adv": float(loss_adv.detach()), "recon": float(loss_rec.detach())}
            if d_step:
                m["d_loss"] = float(loss_d.detach())
        disc.requires_grad_(True)
        if d_step:                                        # (G's backward left no grads in D: it was frozen)
            clip_and_step(disc.parameters(), opt_d, cfg, step)
        clip_and_step(g_params, opt_g, cfg, step)
        ema_update(gen_ema, gen, ucfg.g_ema_decay)
        log.step(step + 1, m, write=due(step, cfg.log_every, cfg))
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            save_generator(ckpt_path, step + 1, gen, gen_ema, text, vae, cfg, {
                "g_raw": gen.state_dict(), "g_ema_raw": gen_ema.state_dict(), "d": disc.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "lora": P.lora_state_dict(gen) if ucfg.lora_rank else {},
                "config": {**base_conf, "train": dataclasses.asdict(cfg), "ufogen": dataclasses.asdict(ucfg)}})
    log.close()
    if rank == 0:
        # G forward + backward (6 G); D forwards real, fake and fake-through-G and backs all three (18 D / d_every).
        z1, t1, c1 = one_latent(cfg, vae, device), torch.ones(1, dtype=torch.long, device=device), null
        speed_report(cfg, start, t0, device, 6 * forward_macs(gen, z1, t1, c1) + 18 * forward_macs(disc, z1, t1, c1) / ucfg.d_every)
        evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, f"loss_{cfg.stage}.png"), cfg.stage, ["d_loss", "g_adv", "recon"])
        if cfg.data == "shapes":
            evaluate.one_step_report(cfg, base, ckpt_path, device)
    return ckpt_path


def train_distill(cfg: TrainConfig, dcfg: U.DistillConfig, rank: int, world: int, device: str) -> str:
    """The student learns, at each of its `target_steps` timesteps, the x0 that makes one DDIM step land
    where `teacher_steps / target_steps` steps of the guided teacher land (U.distill_target). Guidance is
    folded in (Meng et al. 2023): the student is sampled without CFG, at half the cost per step."""
    U.validate_distill(dcfg)
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    teacher = unet.requires_grad_(False)
    student = copy.deepcopy(teacher).requires_grad_(True)
    student_ema = copy.deepcopy(student).requires_grad_(False)
    sched = S.make_schedule()
    ts = S.trailing_timesteps(dcfg.target_steps) + [-1]
    sub = max(dcfg.teacher_steps // dcfg.target_steps, 1)
    opt = make_optimizer(student.parameters(), cfg, cfg.lr)
    ckpt_path, start = os.path.join(cfg.out_dir, "distill.pt"), 0
    ck = stage_checkpoint(cfg, ckpt_path, rank)
    if ck is not None:
        refuse_if_mismatch(ckpt_path, "distillation", ck["config"]["distill"], dcfg)
        start = restore(ck, g_raw=student, g_ema_raw=student_ema, opt_g=opt)
    net = wrap(student, cfg, world, device)
    dataset, stream, log = stage_data(cfg, rank, world, start, device, vae)
    null, t0 = null_context(text), time.time()
    for step in range(start, cfg.steps):
        g = step_generator(cfg, step)
        i = int(torch.randint(0, dcfg.target_steps, (1,), generator=g))          # one student step per batch
        t, t_next = ts[i], ts[i + 1]
        lr = set_lr(step, cfg, opt)
        for _ in range(cfg.grad_accum):
            x, texts = next(stream)
            z0, ctx = latent_batch(x, texts, vae, text, isinstance(dataset, data.Latents))
            uncond = null.expand(ctx.shape[0], -1, -1)
            tb = torch.full((z0.shape[0],), t, dtype=torch.long, device=device)
            x_t = S.q_sample(sched, z0, tb, torch.randn(z0.shape, generator=g).to(device))
            target = U.distill_target(S.guided_denoiser(teacher, sched, ctx, uncond, dcfg.guidance), x_t, t, t_next,
                                      sched, sub)
            with autocast(cfg, device):
                x0_pred = S.x0_from_v(sched, x_t, tb, net(x_t, tb, ctx))
                # gamma_t-weighted: the x0 error times 1 / sigma_t^2 is the student's own v-loss, the weighting
                # progressive distillation uses ("SNR+1", Salimans & Ho 2022); not one of Eq. 2/3.
                loss = U.recon_loss(x0_pred.float(), target, tb, sched, weighted=True)
            (loss / cfg.grad_accum).backward()
        clip_and_step(list(student.parameters()), opt, cfg, step)
        ema_update(student_ema, student, min(cfg.ema_decay, (1 + step) / (10 + step)))
        log.step(step + 1, {"loss": float(loss.detach()), "t": float(t), "lr": lr},
                 write=due(step, cfg.log_every, cfg))
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            save_generator(ckpt_path, step + 1, student, student_ema, text, vae, cfg, {
                "g_raw": student.state_dict(), "g_ema_raw": student_ema.state_dict(), "opt_g": opt.state_dict(),
                "config": {**base_conf, "train": dataclasses.asdict(cfg), "distill": dataclasses.asdict(dcfg)}})
    log.close()
    if rank == 0:
        # student forward + backward (6 S); the guided teacher's `sub` DDIM steps, two forwards each (4 sub T).
        z1, t1, c1 = one_latent(cfg, vae, device), torch.ones(1, dtype=torch.long, device=device), null
        speed_report(cfg, start, t0, device, (6 + 4 * sub) * forward_macs(student, z1, t1, c1))
        if cfg.data == "shapes":
            evaluate.few_step_report(cfg, S.Pipeline.from_checkpoint(ckpt_path, device), dcfg.target_steps)
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Stages: lora and adapter (5.4), on the frozen base
# ----------------------------------------------------------------------------------------------------

def train_plugin(cfg, pcfg: P.PluginConfig, rank: int, world: int, device: str) -> str:
    """The diffusion loss of the base model's stage (v-prediction, CFG dropout), with the base frozen and only
    the plugin trained: LoRA factors (stage lora, on the style set) or the adapter (stage adapter, on
    (P.edges(image), image) pairs). 5.4: trained on the base, never on the one-step model."""
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    unet.requires_grad_(False)
    sched, adapter = S.make_schedule(), None
    if cfg.stage == "lora":
        params = P.add_lora(unet, pcfg.lora_rank, pcfg.lora_alpha, pcfg.lora_convs)
        net = wrap(unet, cfg, world, device)
    else:
        adapter = P.Adapter(unet.cfg, vae.cfg.factor, 1, pcfg.adapter_blocks).to(device)
        params = list(adapter.parameters())
        net = wrap(adapter, cfg, world, device)
    opt = make_optimizer(params, cfg, cfg.lr)
    path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = stage_checkpoint(cfg, path, rank)
    if ck is not None:
        if adapter is None:
            unet.load_state_dict(ck["state"], strict=False)                  # the LoRA factors only
        start = restore(ck, opt=opt, **({} if adapter is None else {"state": adapter}))
    if rank == 0:
        print(f"{cfg.stage}: {sum(p.numel() for p in params) / 1e6:.3f}M trained params on the frozen base {base} "
              f"({cfg.style} data)")
    dataset, stream, log = stage_data(cfg, rank, world, start, device)
    lat = (unet.cfg.in_channels, cfg.resolution // vae.cfg.factor, cfg.resolution // vae.cfg.factor)
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = set_lr(step, cfg, opt)
        # t, caption dropout and noise for the *global* batch, as in the diffusion stage (step_generator).
        g = step_generator(cfg, step)
        t_all = torch.randint(0, len(sched["alpha"]), (cfg.batch_size,), generator=g)
        drop_all = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        eps_all = torch.randn((cfg.batch_size, *lat), generator=g)
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = micro_slice(cfg, rank, world, k)
            t, eps = t_all[sl].to(device), eps_all[sl].to(device)
            texts = ["" if d else c for c, d in zip(texts, drop_all[sl].tolist())]
            z0, ctx = latent_batch(x, texts, vae, text, isinstance(dataset, data.Latents))
            with autocast(cfg, device):
                x_t = S.q_sample(sched, z0, t, eps)
                if adapter is None:
                    v = net(x_t, t, ctx)
                else:
                    v = unet(x_t, t, ctx, features=net(P.edges(x, pcfg.edge_threshold)))
                loss = torch.nn.functional.mse_loss(v.float(), S.v_target(sched, z0, t, eps))
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        gnorm = clip_and_step(params, opt, cfg, step)
        log.step(step + 1, {"loss": loss_sum, "lr": lr, "grad_norm": gnorm},
                 write=due(step, cfg.log_every, cfg))
        if rank == 0 and due(step, cfg.ckpt_every, cfg):
            extra = {"step": step + 1, "opt": opt.state_dict(), "base": base, "train": dataclasses.asdict(cfg)}
            if adapter is None:
                P.save_lora(path, unet, pcfg, extra)
            else:
                P.save_adapter(path, adapter, unet, {**extra, "edge_threshold": pcfg.edge_threshold})
    log.close()
    if rank == 0:
        print(f"{cfg.stage}: {cfg.steps - start} steps in {(time.time() - t0) / 60:.1f} min -> {path}")
        evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, f"loss_{cfg.stage}.png"), cfg.stage, ["loss"])
        if cfg.data == "shapes":
            evaluate.plugin_stage_report(cfg, S.Pipeline.from_checkpoint(base, device), path, device)
    return path


# ----------------------------------------------------------------------------------------------------
# Entry point: --preset picks every network's config by one name; flags override single fields
# ----------------------------------------------------------------------------------------------------

# The text encoder is the tiny word-level one unless --text_encoder gives a local CLIP folder (paper scale).
PRESETS = {
    name: dict(unet=md.PRESETS[unet], vae=vae_lib.PRESETS[vae], light=vae_lib.PRESETS[light], text=md.TEXT_PRESETS["tiny"],
               ufogen=U.PRESETS[ufo], distill=U.DISTILL_PRESETS[ufo], plugin=P.PluginConfig())
    for name, (unet, vae, light, ufo) in {"tiny": ("tiny", "tiny", "tiny-light", "tiny"),
                                          "md": ("md", "md", "md-light", "paper"),
                                          "md-lite": ("md-lite", "md", "md-light", "paper"),
                                          "sd": ("sd", "sd", "md-light", "paper")}.items()}
# Flags: the run's own (TrainConfig) and the diffusion UNet's without a prefix; every other config with its own.
FLAG_GROUPS = {"unet": ("", md.UNetConfig), "vae": ("vae_", vae_lib.VAEConfig), "text": ("text_", md.TextConfig),
               "ufogen": ("ufogen_", U.UFOGenConfig), "distill": ("distill_", U.DistillConfig),
               "plugin": ("plugin_", P.PluginConfig)}


def preset_configs(cfg: TrainConfig, args) -> dict:
    """{unet, vae, light, text, ufogen, distill, plugin}: the preset's configs with the user's flags on top
    (the --vae_* flags apply to the VAE and its light decoder alike)."""
    out = {k: config.config_from_args(v, args, FLAG_GROUPS["vae" if k == "light" else k][0])
           for k, v in PRESETS[cfg.preset].items()}
    U.validate(out["ufogen"])
    U.validate_distill(out["distill"])
    return out


DTYPES = ("auto", "fp32", "bf16", "fp16")
CHOICES = {"stage": STAGES + ("all",), "dtype": DTYPES, "lr_schedule": ("cosine", "constant"),
           "style": ("", "plain", "outlined", "mixed")}


def validate(cfg: TrainConfig, given: argparse.Namespace) -> None:
    """Ranges argparse cannot express, each error naming the flag, the value and what is allowed. `given`: the
    parsed flags (None = not given), so an explicit --steps 0 is refused rather than read as 'stage default'."""
    for name in ("steps", "batch_size", "lr"):
        v = getattr(given, name, None)
        if v is not None and v <= 0:
            raise ValueError(f"--{name} {v}: expected > 0 (leave it out for the stage's default)")
    if cfg.preset not in PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: expected one of {', '.join(sorted(PRESETS))}")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution}: expected a positive multiple of 8 (the paper's VAE has f = 8)")
    at_least = {"grad_accum": 1, "log_every": 1, "ckpt_every": 1, "eval_images": 1, "eval_steps": 1, "sample_every": 0,
                "warmup": 0, "num_workers": 0, "weight_decay": 0, "grad_clip": 0, "guidance": 0,
                "train_images": -1, "min_snr": 0}
    for name, lo in at_least.items():
        if getattr(cfg, name) < lo:
            raise ValueError(f"--{name} {getattr(cfg, name)}: expected >= {lo}")
    for name in ("beta1", "beta2", "min_lr_frac", "p_uncond", "ema_decay"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"--{name} {getattr(cfg, name)}: expected a value in [0, 1]")
    if not 0 <= cfg.seed < 2 ** 32:
        raise ValueError(f"--seed {cfg.seed}: expected 0 <= seed < 2^32")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the checkpoint, or replace it")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {k: "default: the stage's (" + ", ".join(f"{st} {v[i]:g}" for st, v in STAGE_DEFAULTS.items()) + ")"
             for i, k in enumerate(("steps", "lr", "batch_size"))}        # (steps, lr, batch) per stage
    helps["style"] = "default: the stage's (" + ", ".join(f"{k}: {v}" for k, v in STAGE_STYLE.items()) + "; else plain)"
    config.add_config_flags(p, TrainConfig, shown=TrainConfig(), choices=CHOICES, helps=helps)
    for group, (prefix, cls) in FLAG_GROUPS.items():
        config.add_config_flags(p, cls, prefix, shown=PRESETS["tiny"][group], note="tiny preset")
    args = p.parse_args(argv)
    cfg = config.config_from_args(TrainConfig(), args)
    try:
        validate(cfg, args)
    except ValueError as e:
        p.error(str(e))
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    rank, world, device = setup(stage_config(cfg, "vae" if cfg.stage == "all" else cfg.stage))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with config.out_dir_lock(cfg.out_dir, rank):
        run_stages(cfg, args, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


def run_stages(cfg: TrainConfig, args, rank: int, world: int, device: str) -> None:
    c, t_start = preset_configs(cfg, args), time.time()
    if rank == 0:
        print(f"stage {cfg.stage}, preset {cfg.preset}, {world} process(es) on {device}, out_dir {cfg.out_dir}")
    if not cfg.resume:                                          # refuse before any work, not at the third stage
        for st in ALL_STAGES if cfg.stage == "all" else (cfg.stage,):
            stage_checkpoint(dataclasses.replace(cfg, stage=st), os.path.join(cfg.out_dir, f"{st}.pt"))
    if rank == 0 and cfg.stage == "all" and cfg.preset == "tiny" and cfg.data == "shapes":
        print(estimate_minutes(cfg, device))

    def staged(stage: str) -> TrainConfig:
        """The stage's config, with the global RNG re-seeded: a stage's random init does not depend on how much
        randomness the stages before it in this process drew, so `--stage all` trains what separate commands do."""
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        return stage_config(cfg, stage)

    if cfg.stage in ("vae", "all"):
        train_vae(staged("vae"), c["vae"], rank, world, device)
    if cfg.stage in ("decoder", "all"):
        teacher = cfg.init_from if cfg.stage == "decoder" and cfg.init_from else os.path.join(cfg.out_dir, "vae.pt")
        train_decoder(staged("decoder"), c["light"], teacher, rank, world, device)
    if cfg.stage in ("diffusion", "all"):
        train_diffusion(staged("diffusion"), c["unet"], rank, world, device, c["text"])
    if cfg.stage in ("ufogen", "all"):
        train_ufogen(staged("ufogen"), c["ufogen"], rank, world, device)
    if cfg.stage in ("distill", "all"):
        train_distill(staged("distill"), c["distill"], rank, world, device)
    if rank == 0 and cfg.stage == "all":
        print(f"total: {(time.time() - t_start) / 60:.1f} min (per stage: {os.path.join(cfg.out_dir, 'times.json')}; "
              f"held-out numbers: {os.path.join(cfg.out_dir, 'eval.json')})")
    if cfg.stage in ("lora", "adapter"):                        # 5.4 plugins, on the frozen base
        train_plugin(staged(cfg.stage), c["plugin"], rank, world, device)


if __name__ == "__main__":
    config.run_cli(main)
