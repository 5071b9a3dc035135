"""
Every training stage of MobileDiffusion, nanoGPT-style: flags generated from the dataclasses, one visible
loop per stage, DDP from torchrun's environment variables, gradient accumulation, autocast (bf16 on GPUs
that support it, a no-op on CPU), optional torch.compile, checkpoints written atomically with everything
needed to resume bit-identically.

Stages (--stage):
  vae       3.5: train the VAE (L2 + KL + perceptual + adversarial)
  decoder   3.5: distil the light decoder from a trained VAE, encoder frozen
  diffusion 3 + 5.1: latent diffusion training of the MD UNet (v-prediction, CFG dropout, EMA)
  ufogen    4: one-step generator by UFOGen adversarial finetuning (ufogen.py), full or LoRA
  distill   abstract: 8-step student distilled from the guided DDIM-50 teacher (its loop: ufogen.train_distill)
  lora      5.4: a style LoRA on the frozen base model, from a small style set (its loop: plugins.train_plugin)
  adapter   5.4: a T2I-Adapter for edge maps on the frozen base model (plugins.train_plugin)
  all       (default) the tiny end-to-end run on synthetic data, on CPU: vae, decoder, diffusion, ufogen
            (distill is its own command: python train.py --stage distill, ~2.5 min more)

Tiny (CPU, minutes):     python train.py
One stage:               python train.py --stage vae --steps 2000
Paper scale (GPUs):      see README.md ("Paper-scale recipe")
Flags: every TrainConfig field, every UNetConfig field (md.py) and UFOGenConfig field (ufogen.py) as is,
every VAEConfig field (vae.py) with the prefix --vae_ (e.g. --vae_latent_channels 8), every TextConfig field
of the tiny text encoder with the prefix --text_ (e.g. --text_train false), every PluginConfig field
(plugins.py) with the prefix --plugin_ (e.g. --plugin_lora_rank 16).
"""

import argparse
import copy
import dataclasses
import json
import math
import os
import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import evaluate
import md
import plugins
import ufogen
import vae as vae_lib


@dataclass
class TrainConfig:
    stage: str = "all"               # vae | decoder | diffusion | ufogen | distill | lora | adapter | all (= vae..ufogen)
    preset: str = "tiny"             # model presets by name: tiny (CPU) or md / md-lite (paper)
    out_dir: str = "out/tiny"        # checkpoints, metrics.jsonl, loss curves, sample grids, eval.json
    data: str = "shapes"             # "shapes" (synthetic) or an image folder (metadata.jsonl or .txt sidecars)
    style: str = ""                  # shapes' style: plain | outlined | mixed; "" = the stage's (STAGE_STYLE)
    resolution: int = 64             # training resolution in px (5.1: 256 then 512)
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
                                     # empty = the preset's own (tiny: byte-level, trained jointly)
    p_uncond: float = 0.1            # classifier-free guidance: fraction of captions dropped to "" in training
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
STAGE_DEFAULTS = {                   # (steps, lr, batch_size) of the tiny CPU run for each stage
    "diffusion": (1150, 1e-3, 32),   # 5.1: AdamW lr 1e-3; ~6 min (1400 steps no longer fit beside 600 UFOGen steps)
    "ufogen": (600, 1e-4, 16),       # UFOGen's code: Adam lr 1e-4 for G and D; ~4.5 min (README "One step": 1200 steps
                                     # reach the base's colour accuracy within 10 points, 600 do not on this base)
    "distill": (300, 1e-4, 16),
    "vae": (850, 1e-3, 16),          # ~2.7 min on 2 cores -> ~25 dB held-out PSNR
    "decoder": (500, 1e-3, 16),      # ~1.1 min; the light decoder (0.45x the MACs) within 1.5 dB
    "lora": (2000, 3e-3, 16),        # 5.4 style LoRA on the base: ~6 min; outlined-style fraction 0.06 after 400
                                     # steps at 1e-3, 0.17 after 800 at 3e-3, 0.25 after 2000 (README "Plugins")
    "adapter": (800, 2e-3, 16),      # 5.4 edge adapter on the base: ~2.5 min; edge IoU 0.28 after 400 steps at 1e-3
}


# Which synthetic pictures each stage sees: plain shapes, except the 5.4 style LoRA's small style set. So the
# outlined style is new to the diffusion model and to everything distilled from it until the LoRA adds it.
STAGE_STYLE = {"lora": "outlined"}


def stage_config(cfg: "TrainConfig", stage: str) -> "TrainConfig":
    """cfg for one stage, its zero/empty fields (steps, lr, batch_size, style) filled with the stage's defaults."""
    steps, lr, batch = STAGE_DEFAULTS[stage]
    return dataclasses.replace(cfg, stage=stage, steps=cfg.steps or steps, lr=cfg.lr or lr,
                               batch_size=cfg.batch_size or batch, style=cfg.style or STAGE_STYLE.get(stage, "plain"))


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


def batches(dataset, cfg: TrainConfig, rank: int, world: int, start_step: int, device: str):
    """Yields this process's micro-batches, (images, captions), for optimizer steps start_step, start_step+1, ...
    The global order is a fixed function of (seed, step): a permutation of the dataset per epoch, step s
    taking the s-th slice of batch_size; process r takes its contiguous part. So a resumed run, a run on
    2 processes and a run on 1 process with the doubled batch all see the same images at the same step."""
    n, per_proc = len(dataset), cfg.batch_size // world
    micro = per_proc // cfg.grad_accum
    step = start_step

    perms = {}                                                    # epoch -> permutation (cached)

    def indices(s):
        first = s * cfg.batch_size + rank * per_proc
        out = []
        for g in range(first, first + per_proc):
            epoch, k = divmod(g, n)
            if epoch not in perms:
                perms.clear()
                perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100_003 + epoch))
            out.append(int(perms[epoch][k]))
        return out

    def collate(items):
        return torch.stack([im for im, _ in items]), [t for _, t in items]

    while True:
        idx = indices(step)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, idx), batch_size=micro,
                                             num_workers=cfg.num_workers, collate_fn=collate)
        for images, texts in loader:
            yield images.to(device, non_blocking=True), texts
        step += 1


def lr_at(step: int, cfg: TrainConfig, base_lr: float, steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr (nanoGPT) or constant. 5.1 states no schedule."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return base_lr
    progress = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return base_lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


class Diverged(FloatingPointError):
    """A non-finite loss, gradient norm or weight. The stage stops before the update or the write that would
    carry it, so the last checkpoint on disk stays the last good one; entry points exit with status 2."""


def diverged(stage: str, out_dir: str, what: str, value, step: int) -> Diverged:
    path = os.path.join(out_dir, f"{stage}.pt")
    kept = (f"the last good checkpoint {path} is kept as it was" if os.path.isfile(path) else
            "no checkpoint of this stage was written")
    return Diverged(f"{stage}: non-finite {what} ({value}) at step {step}; stopped before using it, {kept}. "
                    f"Lower --lr, or check the data")


def non_finite(obj, key: str = "") -> str | None:
    """The key of the first floating-point tensor in a (nested) payload holding NaN or inf, else None."""
    if torch.is_tensor(obj):
        return key if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        bad = non_finite(v, f"{key}.{k}" if key else str(k))
        if bad is not None:
            return bad
    return None


def save_checkpoint(path: str, payload: dict) -> None:
    """Atomic: write to a temporary file of this process, then rename over the old one, so a crash mid-write
    (or a second run writing the same path) never leaves a half-written checkpoint in place of the last good
    one. Refuses a payload with non-finite weights: the old file is kept."""
    bad = non_finite(payload)
    if bad is not None:
        raise Diverged(f"{path}: not written, {bad} holds NaN/inf values; the previous file (if any) is kept")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path!r} could not be read as a weights-only torch file: {e}") from e


def config_mismatch(saved: dict, current, ignore: tuple = ()) -> list[str]:
    """Fields whose values differ between a saved config dict and a current dataclass."""
    now = dataclasses.asdict(current)
    out = []
    for k in sorted(set(saved) | set(now)):
        if k in ignore:
            continue
        a, b = saved.get(k, "<absent>"), now.get(k, "<absent>")
        if (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            out.append(f"{k}: checkpoint {a!r} vs now {b!r}")
    return out


def refuse_if_mismatch(path: str, what: str, saved: dict, current, ignore: tuple = ()) -> None:
    diff = config_mismatch(saved, current, ignore)
    if diff:
        raise ValueError(f"{path}: the checkpoint's {what} config differs from this run's in "
                         f"{len(diff)} field(s): " + "; ".join(diff))


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


class Log:
    """metrics.jsonl (one JSON object per logged step) + a tqdm bar; rank 0 only."""

    def __init__(self, out_dir: str, stage: str, steps: int, start: int, rank: int):
        self.rank, self.stage = rank, stage
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.bar = tqdm(total=steps, initial=start, desc=stage, disable=rank != 0, dynamic_ncols=True)

    def step(self, step: int, metrics: dict, write: bool):
        for k, v in metrics.items():                           # every step, logged or not: stop at the first NaN
            if isinstance(v, float) and not math.isfinite(v):
                raise diverged(self.stage, os.path.dirname(self.path), k, v, step)
        self.bar.update(1)
        if self.rank == 0 and write:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, **metrics}, allow_nan=False) + "\n")

    def close(self):
        self.bar.close()


def plot_curves(metrics_path: str, png_path: str, stage: str, keys: list[str]) -> None:
    """A loss-curve PNG drawn with pillow (log-scale y), one colour per metric."""
    from PIL import Image, ImageDraw
    rows = [json.loads(l) for l in open(metrics_path)] if os.path.isfile(metrics_path) else []
    rows = [r for r in rows if r.get("stage") == stage]
    series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and r[k] > 0] for k in keys}
    series = {k: v for k, v in series.items() if len(v) > 1}
    W, H, m = 640, 360, 48
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((m, 8), f"{stage}: " + ", ".join(series), fill="black")
    if series:
        xs = [s for v in series.values() for s, _ in v]
        ys = [math.log10(y) for v in series.values() for _, y in v]
        x0, x1, y0, y1 = min(xs), max(max(xs), min(xs) + 1), min(ys), max(max(ys), min(ys) + 1e-3)
        d.rectangle([m, m, W - m, H - m], outline="gray")
        for frac in (0, 0.5, 1):
            y = y0 + frac * (y1 - y0)
            d.text((4, H - m - frac * (H - 2 * m) - 6), f"{10 ** y:.3g}", fill="gray")
        colours = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"]
        for (k, v), c in zip(series.items(), colours):
            pts = [(m + (s - x0) / (x1 - x0) * (W - 2 * m), H - m - (math.log10(y) - y0) / (y1 - y0) * (H - 2 * m))
                   for s, y in v]
            d.line(pts, fill=c, width=2)
            d.text((pts[-1][0] - 60, pts[-1][1] - 14), k, fill=c)
    im.save(png_path)


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


def vae_configs(cfg: TrainConfig, args) -> tuple:
    """(VAE config, light-decoder VAE config) for the preset, with --vae_* flags applied to both."""
    full = md.config_from_args(vae_lib.PRESETS[cfg.preset if cfg.preset in vae_lib.PRESETS else "md"], args, "vae_")
    light = md.config_from_args(vae_lib.PRESETS[f"{cfg.preset}-light" if f"{cfg.preset}-light" in vae_lib.PRESETS
                                                else "md-light"], args, "vae_")
    return full, light


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
    disc.load_state_dict(ck["disc"])
    opt.load_state_dict(ck["opt"])
    opt_d.load_state_dict(ck["opt_d"])
    torch.set_rng_state(ck["rng"]["torch"])
    return ck["step"]


# ----------------------------------------------------------------------------------------------------
# Stage: vae (3.5)
# ----------------------------------------------------------------------------------------------------

def train_vae(cfg: TrainConfig, vcfg: vae_lib.VAEConfig, rank: int, world: int, device: str) -> str:
    """3.5: 'our VAE is trained with a combination of loss functions, including L2 reconstruction loss, KL
    divergence for regularization, perceptual loss, and adversarial loss'. Returns the checkpoint path."""
    steps, base_lr = cfg.steps, cfg.lr
    ckpt_path = os.path.join(cfg.out_dir, "vae.pt")
    model = vae_lib.VAE(vcfg).to(device)
    disc = vae_lib.PatchDiscriminator(vcfg).to(device)
    # LDM trains its autoencoders with Adam(0.5, 0.9): a low beta1 keeps the GAN game from oscillating.
    opt = make_optimizer(model.parameters(), cfg, base_lr, betas=(0.5, 0.9))
    opt_d = make_optimizer(disc.parameters(), cfg, base_lr, betas=(0.5, 0.9))
    start = resume_vae_gan(cfg, ckpt_path, vcfg, model, disc, opt, opt_d, rank)
    perceptual = make_perceptual(cfg, vcfg, rank, device)
    net, dnet = wrap(model, cfg, world, device), wrap(disc, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    stream = batches(dataset, cfg, rank, world, start, device)
    log = Log(cfg.out_dir, "vae", steps, start, rank)
    last_layer = model.decoder.conv_out.weight
    t0 = time.time()
    for step in range(start, steps):
        lr = lr_at(step, cfg, base_lr, steps)
        for g in opt.param_groups + opt_d.param_groups:
            g["lr"] = lr
        use_disc = step >= vcfg.disc_start and vcfg.disc_weight > 0
        m = {}
        for _ in range(cfg.grad_accum):
            x, _ = next(stream)
            with autocast(cfg, device):
                recon, post = net(x)
                rec = vae_lib.l2_loss(recon, x)
                if perceptual is not None:
                    rec = rec + vcfg.perceptual_weight * perceptual(recon, x)
                kl = vae_lib.kl_loss(post)
                loss = rec + vcfg.kl_weight * kl
                if use_disc:
                    g_loss = vae_lib.g_hinge_loss(dnet(recon))
                    w = vcfg.disc_weight * vae_lib.adaptive_weight(rec, g_loss, last_layer)
                    loss = loss + w * g_loss
                    m["g_adv"] = float(g_loss)
            (loss / cfg.grad_accum).backward()
            if use_disc:                                          # D: real images vs (detached) reconstructions
                with autocast(cfg, device):
                    d_loss = vae_lib.d_hinge_loss(dnet(x), dnet(recon.detach()))
                (d_loss / cfg.grad_accum).backward()
                m["d_loss"] = float(d_loss)
        m.update(loss=float(loss.detach()), l2=float(vae_lib.l2_loss(recon.detach(), x)), kl=float(kl.detach()), lr=lr)
        clip_and_step(model.parameters(), opt, cfg, step)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step)
        log.step(step + 1, m, write=(step + 1) % cfg.log_every == 0 or step + 1 == steps)
        done = step + 1 == steps
        if rank == 0 and done:
            # SD's latent scaling: 1 / std of posterior samples on training images, stored with the weights.
            sample = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))]).to(device)
            vcfg.scaling_factor = vae_lib.estimate_scaling_factor(model, sample)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or done):
            save_checkpoint(ckpt_path, {"stage": "vae", "step": step + 1, "model": model.state_dict(),
                                        "disc": disc.state_dict(), "opt": opt.state_dict(),
                                        "opt_d": opt_d.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                        "config": {"vae": dataclasses.asdict(vcfg), "train": dataclasses.asdict(cfg)}})
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            evaluate.save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, f"vae_recon_{step + 1:06d}.png"))
    log.close()
    if rank == 0:
        held = evaluate.heldout_images(cfg, cfg.eval_images).to(device)
        p = evaluate.reconstruction_psnr(model, held)
        report = {"psnr_heldout_db": p, "scaling_factor": vcfg.scaling_factor, "minutes": (time.time() - t0) / 60}
        print(f"vae: {steps} steps in {report['minutes']:.1f} min; held-out reconstruction PSNR {p:.2f} dB; "
              f"latent scaling factor {vcfg.scaling_factor:.4f}")
        evaluate.write_json(os.path.join(cfg.out_dir, "vae_eval.json"), report)
        evaluate.save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, "vae_recon.png"))
        plot_curves(log.path, os.path.join(cfg.out_dir, "loss_vae.png"), "vae", ["loss", "l2", "kl", "d_loss"])
    return ckpt_path


def config_from_dict(cls, d: dict):
    """A config dataclass from its saved dict (lists back to tuples; fields a newer version dropped ignored)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names})


def load_vae(path: str) -> vae_lib.VAE:
    """A VAE from a vae.pt / decoder.pt checkpoint (config stored inside)."""
    ck = load_checkpoint(path)
    if "vae" not in ck.get("config", {}):
        raise ValueError(f"{path}: not a VAE checkpoint (no config['vae']); it was written by stage {ck.get('stage')!r}")
    model = vae_lib.VAE(config_from_dict(vae_lib.VAEConfig, ck["config"]["vae"]))
    model.load_state_dict(ck["model"], source=path)
    return model.eval()


# ----------------------------------------------------------------------------------------------------
# Stage: decoder (3.5 light-decoder distillation)
# ----------------------------------------------------------------------------------------------------

def train_decoder(cfg: TrainConfig, light_cfg: vae_lib.VAEConfig, teacher_path: str, rank: int, world: int,
                  device: str) -> str:
    """3.5: 'We train the lightweight decoder ... with the encoder frozen. We remove the unnecessary KL
    regularization in the objective, and reduce the weight of adversarial loss.' The light VAE keeps the
    teacher's encoder (bit-identical, frozen) and learns a pruned decoder that matches both the images
    and the full decoder's reconstructions."""
    steps, base_lr = cfg.steps, cfg.lr
    ckpt_path = os.path.join(cfg.out_dir, "decoder.pt")
    teacher = load_vae(teacher_path).to(device).requires_grad_(False)
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
    opt = make_optimizer(trainable, cfg, base_lr, betas=(0.5, 0.9))
    opt_d = make_optimizer(disc.parameters(), cfg, base_lr, betas=(0.5, 0.9))
    start = resume_vae_gan(cfg, ckpt_path, light_cfg, model, disc, opt, opt_d, rank)
    perceptual = make_perceptual(cfg, light_cfg, rank, device)
    dec = wrap(model.decoder, cfg, world, device)
    dnet = wrap(disc, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    stream = batches(dataset, cfg, rank, world, start, device)
    log = Log(cfg.out_dir, "decoder", steps, start, rank)
    t0 = time.time()
    for step in range(start, steps):
        lr = lr_at(step, cfg, base_lr, steps)
        for g in opt.param_groups + opt_d.param_groups:
            g["lr"] = lr
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
                m["d_loss"] = float(d_loss)
        m.update(loss=float(loss.detach()), l2=float(vae_lib.l2_loss(light.detach(), x)), lr=lr)
        clip_and_step(trainable, opt, cfg, step)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg, step)
        log.step(step + 1, m, write=(step + 1) % cfg.log_every == 0 or step + 1 == steps)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt_path, {"stage": "decoder", "step": step + 1, "model": model.state_dict(),
                                        "disc": disc.state_dict(), "opt": opt.state_dict(),
                                        "opt_d": opt_d.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                        "config": {"vae": dataclasses.asdict(light_cfg),
                                                   "train": dataclasses.asdict(cfg)}})
    log.close()
    if rank == 0:
        model.eval()
        held = evaluate.heldout_images(cfg, cfg.eval_images).to(device)
        p_full, p_light = evaluate.reconstruction_psnr(teacher, held), evaluate.reconstruction_psnr(model, held)
        report = {"psnr_full_db": p_full, "psnr_light_db": p_light, "minutes": (time.time() - t0) / 60}
        print(f"decoder: {steps} steps in {report['minutes']:.1f} min; held-out PSNR full {p_full:.2f} dB, "
              f"light {p_light:.2f} dB ({p_light - p_full:+.2f} dB)")
        evaluate.write_json(os.path.join(cfg.out_dir, "decoder_eval.json"), report)
        evaluate.save_recon_grid(cfg, [teacher, model], os.path.join(cfg.out_dir, "decoder_recon.png"))
        plot_curves(log.path, os.path.join(cfg.out_dir, "loss_decoder.png"), "decoder", ["loss", "l2", "d_loss"])
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Stage: diffusion (3: latent diffusion with the MD UNet; 5.1 optimisation; CFG training)
# ----------------------------------------------------------------------------------------------------

class Denoiser(torch.nn.Module):
    """What the diffusion stage trains: the UNet, plus the text encoder when it is trained jointly (tiny).
    One module, so DDP, EMA and checkpoints treat both alike. forward(x_t, t, token ids) -> v."""

    def __init__(self, unet: md.UNet, text: md.TextEncoder):
        super().__init__()
        self.unet, self.text = unet, text

    def forward(self, x, t, ids):
        if self.text.cfg.train:
            ctx = self.text.encode_ids(ids)
        else:
            with torch.no_grad():                                 # 3: CLIP stays frozen
                ctx = self.text.encode_ids(ids)
        return self.unet(x, t, ctx)


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
    return load_vae(path)


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


def train_diffusion(cfg: TrainConfig, unet_cfg: md.UNetConfig, rank: int, world: int, device: str,
                    text_cfg: md.TextConfig = md.TEXT_PRESETS["tiny"]) -> str:
    """Latent diffusion training of the MD UNet: v-prediction on VAE latents (sample.py explains the
    choice), text dropped with probability p_uncond for classifier-free guidance, AdamW (5.1), EMA."""
    import copy
    import sample as S
    steps, base_lr = cfg.steps, cfg.lr
    ckpt_path = os.path.join(cfg.out_dir, "diffusion.pt")
    vae = build_vae_for_diffusion(cfg).to(device).requires_grad_(False)
    text = build_text_encoder(cfg, text_cfg)
    check_compatible(unet_cfg, vae, text)
    model = Denoiser(md.UNet(unet_cfg), text).to(device)
    sched = S.make_schedule()
    if cfg.init_from:                                              # progressive 256->512, or softmax->relu (3.2)
        ck = load_checkpoint(cfg.init_from)
        if "unet" not in ck.get("config", {}):
            raise ValueError(f"{cfg.init_from}: not a diffusion checkpoint (no config['unet'])")
        refuse_if_mismatch(cfg.init_from, "UNet", ck["config"]["unet"], unet_cfg, ignore=("attn_act", "dropout"))
        load_denoiser_state(model, ck["ema"], cfg.init_from)      # the EMA weights are the model to continue from
    ema = copy.deepcopy(model).requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, base_lr)
    start, ck = 0, stage_checkpoint(cfg, ckpt_path, rank)
    if ck is not None:
        refuse_if_mismatch(ckpt_path, "UNet", ck["config"]["unet"], unet_cfg)
        refuse_if_mismatch(ckpt_path, "text encoder", ck["config"]["text"], text.cfg)
        load_denoiser_state(model, ck["model"], ckpt_path)
        load_denoiser_state(ema, ck["ema"], ckpt_path)
        opt.load_state_dict(ck["opt"])
        torch.set_rng_state(ck["rng"]["torch"])                   # (the noise itself comes from (seed, step))
        start = ck["step"]
    if rank == 0:
        n_unet, n_text = md.count_params(model.unet), sum(p.numel() for p in text.parameters() if p.requires_grad)
        print(f"diffusion: UNet {n_unet / 1e6:.1f}M params (+{n_text / 1e6:.2f}M trained text encoder), "
              f"{md.count_macs(model.unet, torch.zeros(1, unet_cfg.in_channels, cfg.resolution // 8, cfg.resolution // 8, device=device), torch.zeros(1, device=device), torch.zeros(1, 77, unet_cfg.context_dim, device=device)) / 1e9:.2f} GMACs/eval at {cfg.resolution}px")
    net = wrap(model, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    stream = batches(dataset, cfg, rank, world, start, device)
    log = Log(cfg.out_dir, "diffusion", steps, start, rank)
    per_proc, micro = cfg.batch_size // world, cfg.batch_size // world // cfg.grad_accum
    lat = (unet_cfg.in_channels, cfg.resolution // vae.cfg.factor, cfg.resolution // vae.cfg.factor)
    grid_prompts = evaluate.heldout_prompts(cfg, 8) + [dataset[i][1] for i in range(8)] if cfg.data == "shapes" else None
    t0, seen = time.time(), 0
    for step in range(start, steps):
        lr = lr_at(step, cfg, base_lr, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        # Per-step randomness for the *global* batch from (seed, step); each process takes its slice. So the
        # trajectory does not depend on the number of processes, and a resumed run repeats it bit for bit.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        t_all = torch.randint(0, len(sched["alpha"]), (cfg.batch_size,), generator=g)
        eps_all = torch.randn((cfg.batch_size, *lat), generator=g)
        drop_all = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = slice(rank * per_proc + k * micro, rank * per_proc + (k + 1) * micro)
            t, eps, drop = t_all[sl].to(device), eps_all[sl].to(device), drop_all[sl]
            texts = ["" if d else c for c, d in zip(texts, drop.tolist())]      # CFG: the empty prompt
            with torch.no_grad():
                # Posterior mean, not a sample: deterministic latents (the VAE's posterior std is tiny anyway).
                z0 = vae.encode(x).mode() * vae.cfg.scaling_factor        # (B, c, H/8, W/8), ~unit variance
            ids = text.tokenizer(texts).to(device)
            with autocast(cfg, device):
                x_t = S.q_sample(sched, z0, t, eps)
                loss = torch.nn.functional.mse_loss(net(x_t, t, ids).float(), S.v_target(sched, z0, t, eps))
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
        log.step(step + 1, m, write=(step + 1) % cfg.log_every == 0 or step + 1 == steps)
        done = step + 1 == steps
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or done):
            save_checkpoint(ckpt_path, {
                "stage": "diffusion", "step": step + 1, "model": trainable_state(model), "ema": trainable_state(ema),
                "opt": opt.state_dict(), "vae": vae.state_dict(), "rng": {"torch": torch.get_rng_state()},
                "config": {"unet": dataclasses.asdict(unet_cfg), "text": dataclasses.asdict(text.cfg),
                           "vae": dataclasses.asdict(vae.cfg), "train": dataclasses.asdict(cfg)}})
        if rank == 0 and grid_prompts and cfg.sample_every and ((step + 1) % cfg.sample_every == 0) and not done:
            pipe = S.Pipeline(ema.unet, vae, ema.text, sched, device, cfg.resolution)
            imgs = pipe.images(grid_prompts, steps=20, guidance_scale=cfg.guidance, seed=0)
            data.image_grid(imgs.cpu(), nrow=8).save(os.path.join(cfg.out_dir, f"samples_{step + 1:06d}.png"))
            model.train()
    log.close()
    if rank == 0:
        minutes = (time.time() - t0) / 60
        print(f"diffusion: {steps - start} steps in {minutes:.1f} min, {seen / (time.time() - t0):.1f} images/s")
        plot_curves(log.path, os.path.join(cfg.out_dir, "loss_diffusion.png"), "diffusion", ["loss"])
        if cfg.data == "shapes":
            pipe = S.Pipeline(ema.unet, vae, ema.text, sched, device, cfg.resolution)
            prompts = evaluate.heldout_prompts(cfg, cfg.eval_images)
            name = f"ddim{cfg.eval_steps}"
            res, imgs = evaluate.evaluate_t2i(pipe, prompts, steps=cfg.eval_steps, guidance_scale=cfg.guidance)
            evaluate.update_eval(os.path.join(cfg.out_dir, "eval.json"), name, res)
            data.image_grid(imgs[:32], nrow=8).save(os.path.join(cfg.out_dir, "samples_final.png"))
            print(f"eval ({len(prompts)} held-out prompts, {name} + CFG {cfg.guidance}): "
                  + ", ".join(f"{k} {v:.3f}" if k != "ms_per_image" else f"{v:.1f} ms/image" for k, v in res.items()))
    return ckpt_path


def load_denoiser_state(model: Denoiser, state: dict, source: str) -> None:
    """Load a Denoiser state; only the weights of a text encoder read from a folder may be absent."""
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (model.text.source and k.startswith("text."))]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def trainable_state(model: Denoiser) -> dict:
    """The Denoiser's weights, without a text encoder read from a local folder (real CLIP reloads from there)."""
    return {k: v for k, v in model.state_dict().items() if not (model.text.source and k.startswith("text."))}


def load_diffusion(path: str, ema: bool = True):
    """(unet, vae, text_encoder, saved config dict) from a diffusion.pt written by the diffusion stage
    (or a ufogen.pt / distill.pt, which share its format)."""
    ck = load_checkpoint(path)
    conf = ck.get("config", {})
    if "unet" not in conf:
        raise ValueError(f"{path}: not a diffusion checkpoint (stage {ck.get('stage')!r}, no config['unet'])")
    ucfg, tcfg = config_from_dict(md.UNetConfig, conf["unet"]), config_from_dict(md.TextConfig, conf["text"])
    vcfg, tr = config_from_dict(vae_lib.VAEConfig, conf["vae"]), conf["train"]
    text = md.TextEncoder.from_pretrained(tr["text_encoder"]) if tr.get("text_encoder") else md.TextEncoder(tcfg)
    model = Denoiser(md.UNet(ucfg), text)
    load_denoiser_state(model, ck["ema" if ema else "model"], path)
    vae = vae_lib.VAE(vcfg)
    vae.load_state_dict(ck["vae"], source=path)
    return model.unet.eval(), vae.eval(), model.text.eval(), conf


# ----------------------------------------------------------------------------------------------------
# Stage: ufogen (4: one-step generation by adversarial finetuning)
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def null_context(text) -> torch.Tensor:
    """The empty prompt's context (1, L, D), classifier-free guidance's unconditional input; the text encoder
    is frozen after the diffusion stage, so one encoding serves every batch (.expand(B, -1, -1))."""
    return text([""])


def latent_batch(x, texts, vae, text, device):
    """Data latents (posterior mean, scaled) and frozen text contexts for the post-training stages."""
    with torch.no_grad():
        z0 = vae.encode(x).mode() * vae.cfg.scaling_factor
        ctx = text(texts)
    return z0, ctx


def save_generator(path: str, step: int, gen: torch.nn.Module, gen_ema: torch.nn.Module, text, vae, cfg, extra: dict):
    """A checkpoint that Pipeline.from_checkpoint / load_diffusion read like a diffusion.pt (LoRA merged),
    plus the raw training state under `extra` for --resume."""
    import ufogen as U
    def merged(m):
        return trainable_state(Denoiser(U.merge_lora(copy.deepcopy(m)), text))
    payload = {"stage": cfg.stage, "step": step, "model": merged(gen), "ema": merged(gen_ema), "vae": vae.state_dict(),
               **extra}
    save_checkpoint(path, payload)


def load_base(cfg: TrainConfig, device: str):
    """The pretrained diffusion model the post-training stages start from (--init_from, else out_dir's
    diffusion.pt), its frozen VAE and text encoder on `device`, its saved config, and cfg with the base's
    text encoder folder (so the stage's checkpoint reloads with the same encoder)."""
    base = cfg.init_from or os.path.join(cfg.out_dir, "diffusion.pt")
    unet, vae, text, conf = load_diffusion(base, ema=True)
    cfg = dataclasses.replace(cfg, text_encoder=conf["train"].get("text_encoder", ""))
    return base, unet.to(device), vae.to(device).requires_grad_(False), text.to(device).requires_grad_(False), conf, cfg


def train_ufogen(cfg: TrainConfig, ucfg, rank: int, world: int, device: str) -> str:
    """4.1 Eq. 1 with the 4.2 reconstruction term of choice and optional 4.3 LoRA. One G forward per step
    serves both players: D learns on its detached output, G on the same output through the frozen D."""
    import ufogen as U
    import sample as S
    U.validate(ucfg)
    base, unet, vae, text, base_conf, cfg = load_base(cfg, device)
    sched = S.make_schedule()
    teacher = copy.deepcopy(unet).requires_grad_(False) if ucfg.recon == "distill" else None   # Eq. 2
    disc = U.Discriminator(unet).to(device)                                                   # 4.1: from the base
    gen = copy.deepcopy(unet).requires_grad_(True)
    g_params = U.add_lora(gen, ucfg.lora_rank, ucfg.lora_alpha, ucfg.lora_convs) if ucfg.lora_rank else list(gen.parameters())
    gen_ema = copy.deepcopy(gen).requires_grad_(False)                                        # Eq. 3, and sampling
    opt_g = torch.optim.Adam(g_params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    opt_d = torch.optim.Adam(disc.parameters(), lr=cfg.lr * ucfg.d_lr_mult, betas=(0.0, cfg.beta2))   # UFOGen: D beta1 0
    ckpt_path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = stage_checkpoint(cfg, ckpt_path, rank)
    if ck is not None:
        refuse_if_mismatch(ckpt_path, "UFOGen", ck["config"]["ufogen"], ucfg)
        gen.load_state_dict(ck["g_raw"])
        gen_ema.load_state_dict(ck["g_ema_raw"])
        disc.load_state_dict(ck["d"])
        opt_g.load_state_dict(ck["opt_g"])
        opt_d.load_state_dict(ck["opt_d"])
        start = ck["step"]
    if rank == 0:
        n = sum(p.numel() for p in g_params)
        print(f"ufogen: recon={ucfg.recon}, {'LoRA rank ' + str(ucfg.lora_rank) if ucfg.lora_rank else 'full finetuning'} "
              f"({n / 1e6:.2f}M trained G params), D {md.count_params(disc) / 1e6:.1f}M, gap {ucfg.gap}")
    g_net, d_net = wrap(gen, cfg, world, device), wrap(disc, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    stream = batches(dataset, cfg, rank, world, start, device)
    log = Log(cfg.out_dir, cfg.stage, cfg.steps, start, rank)
    per_proc, micro = cfg.batch_size // world, cfg.batch_size // world // cfg.grad_accum
    null, t0 = null_context(text), time.time()                                        # for a guided target
    for step in range(start, cfg.steps):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        t_all = U.sample_t(ucfg, cfg.batch_size, g)                                  # t in [1, T)
        d_step = step % ucfg.d_every == 0
        m = {}
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            z0, ctx = latent_batch(x, texts, vae, text, device)
            uncond = null.expand(ctx.shape[0], -1, -1)
            sl = slice(rank * per_proc + k * micro, rank * per_proc + (k + 1) * micro)
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
        log.step(step + 1, m, write=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            save_generator(ckpt_path, step + 1, gen, gen_ema, text, vae, cfg, {
                "g_raw": gen.state_dict(), "g_ema_raw": gen_ema.state_dict(), "d": disc.state_dict(),
                "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "lora": U.lora_state_dict(gen) if ucfg.lora_rank else {},
                "config": {**base_conf, "train": dataclasses.asdict(cfg), "ufogen": dataclasses.asdict(ucfg)}})
    log.close()
    if rank == 0:
        print(f"ufogen: {cfg.steps - start} steps in {(time.time() - t0) / 60:.1f} min")
        plot_curves(log.path, os.path.join(cfg.out_dir, f"loss_{cfg.stage}.png"), cfg.stage, ["d_loss", "g_adv", "recon"])
        if cfg.data == "shapes":
            evaluate.one_step_report(cfg, base, ckpt_path, device)
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

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
    if cfg.preset not in md.PRESETS:
        raise ValueError(f"--preset {cfg.preset!r}: expected one of {', '.join(sorted(md.PRESETS))}")
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise ValueError(f"--resolution {cfg.resolution}: expected a positive multiple of 8 (the VAE's f = 8)")
    at_least = {"grad_accum": 1, "log_every": 1, "ckpt_every": 1, "eval_images": 1, "eval_steps": 1, "sample_every": 0,
                "warmup": 0, "num_workers": 0, "weight_decay": 0, "grad_clip": 0, "guidance": 0}
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
    md.add_config_flags(p, TrainConfig, shown=TrainConfig(), choices=CHOICES, helps=helps)
    md.add_config_flags(p, md.UNetConfig, shown=md.PRESETS["tiny"], note="tiny preset")
    md.add_config_flags(p, vae_lib.VAEConfig, prefix="vae_", shown=vae_lib.PRESETS["tiny"], note="tiny preset")
    md.add_config_flags(p, ufogen.UFOGenConfig, shown=ufogen.PRESETS["tiny"], note="tiny preset")
    md.add_config_flags(p, md.TextConfig, prefix="text_", shown=md.TEXT_PRESETS["tiny"], note="tiny encoder")
    md.add_config_flags(p, plugins.PluginConfig, prefix="plugin_", shown=plugins.PluginConfig())
    args = p.parse_args(argv)
    cfg = md.config_from_args(TrainConfig(), args)
    try:
        validate(cfg, args)
    except ValueError as e:
        p.error(str(e))
    return cfg, args


@contextmanager
def out_dir_lock(out_dir: str, rank: int):
    """One run per out_dir: two runs would interleave metrics.jsonl and overwrite each other's checkpoints.
    Rank 0 holds out_dir/run.lock (host and pid) for the run's duration; a lock left by a dead process of this
    host is taken over, any other is refused with its owner named."""
    import socket
    if rank != 0:
        yield
        return
    path, me = os.path.join(out_dir, "run.lock"), f"{socket.gethostname()} {os.getpid()}"
    for attempt in (0, 1):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            owner = open(path).read().strip()
            host, _, pid = owner.partition(" ")
            if attempt == 0 and host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                os.remove(path)                                   # stale: its run died without cleaning up
                continue
            raise ValueError(f"{out_dir} is in use by another run (host {host}, pid {pid}; lock file {path}): wait for "
                             f"it, give another --out_dir, or delete {path} if that run is gone") from None
    os.write(fd, me.encode())
    os.close(fd)
    try:
        yield
    finally:
        os.remove(path)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def main(argv=None):
    cfg, args = parse_args(argv)
    rank, world, device = setup(stage_config(cfg, "vae" if cfg.stage == "all" else cfg.stage))
    os.makedirs(cfg.out_dir, exist_ok=True)
    with out_dir_lock(cfg.out_dir, rank):
        run_stages(cfg, args, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


def run_stages(cfg: TrainConfig, args, rank: int, world: int, device: str) -> None:
    vae_cfg, light_cfg = vae_configs(cfg, args)
    unet_cfg = md.config_from_args(md.PRESETS[cfg.preset], args)
    if rank == 0:
        print(f"stage {cfg.stage}, preset {cfg.preset}, {world} process(es) on {device}, out_dir {cfg.out_dir}")
    if not cfg.resume:                                          # refuse before any work, not at the third stage
        for st in ("vae", "decoder", "diffusion", "ufogen") if cfg.stage == "all" else (cfg.stage,):
            stage_checkpoint(dataclasses.replace(cfg, stage=st), os.path.join(cfg.out_dir, f"{st}.pt"))
    if cfg.stage in ("vae", "all"):
        train_vae(stage_config(cfg, "vae"), vae_cfg, rank, world, device)
    if cfg.stage in ("decoder", "all"):
        teacher = cfg.init_from if cfg.stage == "decoder" and cfg.init_from else os.path.join(cfg.out_dir, "vae.pt")
        train_decoder(stage_config(cfg, "decoder"), light_cfg, teacher, rank, world, device)
    if cfg.stage in ("diffusion", "all"):
        text_cfg = md.config_from_args(md.TEXT_PRESETS["tiny"], args, "text_")   # --text_* flags (tiny encoder)
        train_diffusion(stage_config(cfg, "diffusion"), unet_cfg, rank, world, device, text_cfg)
    ucfg = md.config_from_args(ufogen.PRESETS.get(cfg.preset, ufogen.PRESETS["paper"]), args)
    if cfg.stage in ("ufogen", "all"):
        train_ufogen(stage_config(cfg, "ufogen"), ucfg, rank, world, device)
    if cfg.stage == "distill":                                  # not in "all": it does not fit the 15-minute tiny run
        ufogen.train_distill(stage_config(cfg, "distill"), ucfg, rank, world, device)
    if cfg.stage in ("lora", "adapter"):                        # 5.4 plugins, on the frozen base
        pcfg = md.config_from_args(plugins.PluginConfig(), args, "plugin_")
        plugins.train_plugin(stage_config(cfg, cfg.stage), pcfg, rank, world, device)


if __name__ == "__main__":
    md.run_cli(main)
