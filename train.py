"""
Every training stage of MobileDiffusion, nanoGPT-style: flags generated from the dataclasses, one visible
loop per stage, DDP from torchrun's environment variables, gradient accumulation, autocast (bf16 on GPUs
that support it, a no-op on CPU), optional torch.compile, checkpoints written atomically with everything
needed to resume bit-identically.

Stages (--stage):
  vae       3.5: train the VAE (L2 + KL + perceptual + adversarial)
  decoder   3.5: distil the light decoder from a trained VAE, encoder frozen
  all       (default) the tiny end-to-end run on synthetic data: every stage above in order, on CPU

Tiny (CPU, minutes):     python train.py
One stage:               python train.py --stage vae --steps 2000
Paper scale (GPUs):      see README.md ("Paper-scale recipe")
Flags: every TrainConfig field, every UNetConfig field (md.py) as is, every VAEConfig field (vae.py)
with the prefix --vae_ (e.g. --vae_latent_channels 8).
"""

import argparse
import dataclasses
import json
import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import data
import md
import vae as vae_lib


@dataclass
class TrainConfig:
    stage: str = "all"               # vae | decoder | all
    preset: str = "tiny"             # model presets by name: tiny (CPU) or md / md-lite (paper)
    out_dir: str = "out/tiny"        # checkpoints, metrics.jsonl, loss curves, sample grids, eval.json
    data: str = "shapes"             # "shapes" (synthetic) or an image folder (metadata.jsonl or .txt sidecars)
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
    init_from: str = ""              # weights to start from (decoder: the trained VAE checkpoint)
    vgg_weights: str = ""            # local VGG16 state dict for the perceptual loss (3.5); empty = no perceptual term
    log_every: int = 25
    sample_every: int = 500          # sample / reconstruction grid every N steps (0 = only at the end)
    ckpt_every: int = 500
    eval_images: int = 128           # held-out images for the end-of-stage evaluation
    num_workers: int = 0             # DataLoader workers (real image folders)
    seed: int = 0
    device: str = "auto"             # auto | cpu | cuda | mps


STAGE_DEFAULTS = {                   # (steps, lr, batch_size) of the tiny CPU run for each stage
    "vae": (850, 1e-3, 16),          # ~2.7 min on 2 cores -> ~25 dB held-out PSNR
    "decoder": (1000, 1e-3, 16),     # ~2.7 min; the light decoder (0.45x the MACs) within 1.5 dB
}


def stage_config(cfg: "TrainConfig", stage: str) -> "TrainConfig":
    """cfg for one stage, its zero fields (steps, lr, batch_size) filled with the stage's defaults."""
    steps, lr, batch = STAGE_DEFAULTS[stage]
    return dataclasses.replace(cfg, stage=stage, steps=cfg.steps or steps, lr=cfg.lr or lr,
                               batch_size=cfg.batch_size or batch)


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


def save_checkpoint(path: str, payload: dict) -> None:
    """Atomic: write to a temporary file, then rename over the old one, so a crash mid-write never leaves
    a half-written checkpoint in place of the last good one."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


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


class Log:
    """metrics.jsonl (one JSON object per logged step) + a tqdm bar; rank 0 only."""

    def __init__(self, out_dir: str, stage: str, steps: int, start: int, rank: int):
        self.rank, self.stage = rank, stage
        self.path = os.path.join(out_dir, "metrics.jsonl")
        self.bar = tqdm(total=steps, initial=start, desc=stage, disable=rank != 0, dynamic_ncols=True)

    def step(self, step: int, metrics: dict, write: bool):
        self.bar.update(1)
        if self.rank == 0 and write:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items() if isinstance(v, float)})
            with open(self.path, "a") as f:
                f.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")

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


def unwrap(model):
    model = getattr(model, "module", model)                      # DDP
    return getattr(model, "_orig_mod", model)                    # torch.compile


def wrap(model, cfg: TrainConfig, world: int, device: str):
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def make_optimizer(params, cfg: TrainConfig, lr: float, betas=None):
    return torch.optim.AdamW(params, lr=lr, betas=betas or (cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)


def clip_and_step(params, opt, cfg: TrainConfig) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    opt.step()
    opt.zero_grad(set_to_none=True)
    return float(norm)


def vae_configs(cfg: TrainConfig, args) -> tuple:
    """(VAE config, light-decoder VAE config) for the preset, with --vae_* flags applied to both."""
    full = md.config_from_args(vae_lib.PRESETS[cfg.preset if cfg.preset in vae_lib.PRESETS else "md"], args, "vae_")
    light = md.config_from_args(vae_lib.PRESETS[f"{cfg.preset}-light" if f"{cfg.preset}-light" in vae_lib.PRESETS
                                                else "md-light"], args, "vae_")
    return full, light


@torch.no_grad()
def reconstruction_psnr(model: vae_lib.VAE, images: torch.Tensor, batch: int = 64) -> float:
    out = [vae_lib.psnr(model.decode(model.encode(images[i:i + batch]).mode()), images[i:i + batch])
           for i in range(0, len(images), batch)]
    return float(torch.cat(out).mean())


def heldout_images(cfg: TrainConfig, n: int) -> torch.Tensor:
    ds = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


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
    start = 0
    if cfg.resume:
        ck = load_checkpoint(ckpt_path)
        refuse_if_mismatch(ckpt_path, "VAE", ck["config"]["vae"], vcfg, ignore=("scaling_factor",))  # re-estimated
        model.load_state_dict(ck["model"], source=ckpt_path)
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        torch.set_rng_state(ck["rng"]["torch"])
        start = ck["step"]
    perceptual = None
    if cfg.vgg_weights and vcfg.perceptual_weight > 0:
        perceptual = vae_lib.PerceptualLoss(cfg.vgg_weights).to(device)
    elif rank == 0:
        why = "perceptual_weight = 0 in this preset" if vcfg.perceptual_weight == 0 else "no --vgg_weights file given"
        print(f"vae: perceptual loss OFF ({why}); training with L2 + KL + adversarial only")
    net, dnet = wrap(model, cfg, world, device), wrap(disc, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution)
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
        clip_and_step(model.parameters(), opt, cfg)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg)
        log.step(step + 1, m, write=(step + 1) % cfg.log_every == 0 or step + 1 == steps)
        done = step + 1 == steps
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or done):
            save_checkpoint(ckpt_path, {"stage": "vae", "step": step + 1, "model": model.state_dict(),
                                        "disc": disc.state_dict(), "opt": opt.state_dict(),
                                        "opt_d": opt_d.state_dict(), "rng": {"torch": torch.get_rng_state()},
                                        "config": {"vae": dataclasses.asdict(vcfg), "train": dataclasses.asdict(cfg)}})
        if rank == 0 and cfg.sample_every and (step + 1) % cfg.sample_every == 0 and not done:
            save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, f"vae_recon_{step + 1:06d}.png"))
    log.close()
    if rank == 0:
        # SD's latent scaling: 1 / std of posterior samples on training images, stored with the weights.
        model.eval()
        sample = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))]).to(device)
        vcfg.scaling_factor = vae_lib.estimate_scaling_factor(model, sample)
        ck = load_checkpoint(ckpt_path)
        ck["config"]["vae"] = dataclasses.asdict(vcfg)
        save_checkpoint(ckpt_path, ck)
        held = heldout_images(cfg, cfg.eval_images).to(device)
        p = reconstruction_psnr(model, held)
        report = {"psnr_heldout_db": p, "scaling_factor": vcfg.scaling_factor, "minutes": (time.time() - t0) / 60}
        print(f"vae: {steps} steps in {report['minutes']:.1f} min; held-out reconstruction PSNR {p:.2f} dB; "
              f"latent scaling factor {vcfg.scaling_factor:.4f}")
        write_json(os.path.join(cfg.out_dir, "vae_eval.json"), report)
        save_recon_grid(cfg, [model], os.path.join(cfg.out_dir, "vae_recon.png"))
        plot_curves(log.path, os.path.join(cfg.out_dir, "loss_vae.png"), "vae", ["loss", "l2", "kl", "d_loss"])
    return ckpt_path


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


@torch.no_grad()
def save_recon_grid(cfg: TrainConfig, models: list, path: str, n: int = 8) -> None:
    """Figure 3 layout: a row of held-out inputs, then one row of reconstructions per model."""
    x = heldout_images(cfg, n).to(next(models[0].parameters()).device)
    rows = [x] + [m.decode(m.encode(x).mode()) for m in models]
    data.image_grid(torch.cat(rows).cpu(), nrow=len(x)).save(path)


def load_vae(path: str, light: bool = False) -> vae_lib.VAE:
    """A VAE from a vae.pt / decoder.pt checkpoint (config stored inside)."""
    ck = load_checkpoint(path)
    if "vae" not in ck.get("config", {}):
        raise ValueError(f"{path}: not a VAE checkpoint (no config['vae']); it was written by stage {ck.get('stage')!r}")
    fields = {f.name for f in dataclasses.fields(vae_lib.VAEConfig)}
    vcfg = vae_lib.VAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ck["config"]["vae"].items()
                                if k in fields})
    model = vae_lib.VAE(vcfg)
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
    start = 0
    if cfg.resume:
        ck = load_checkpoint(ckpt_path)
        refuse_if_mismatch(ckpt_path, "VAE", ck["config"]["vae"], light_cfg)
        model.load_state_dict(ck["model"], source=ckpt_path)
        disc.load_state_dict(ck["disc"])
        opt.load_state_dict(ck["opt"])
        opt_d.load_state_dict(ck["opt_d"])
        torch.set_rng_state(ck["rng"]["torch"])
        start = ck["step"]
    perceptual = vae_lib.PerceptualLoss(cfg.vgg_weights).to(device) if cfg.vgg_weights and light_cfg.perceptual_weight > 0 else None
    dec = wrap(model.decoder, cfg, world, device)
    dnet = wrap(disc, cfg, world, device)
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution)
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
        clip_and_step(trainable, opt, cfg)
        if use_disc:
            clip_and_step(disc.parameters(), opt_d, cfg)
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
        held = heldout_images(cfg, cfg.eval_images).to(device)
        p_full, p_light = reconstruction_psnr(teacher, held), reconstruction_psnr(model, held)
        report = {"psnr_full_db": p_full, "psnr_light_db": p_light, "minutes": (time.time() - t0) / 60}
        print(f"decoder: {steps} steps in {report['minutes']:.1f} min; held-out PSNR full {p_full:.2f} dB, "
              f"light {p_light:.2f} dB ({p_light - p_full:+.2f} dB)")
        write_json(os.path.join(cfg.out_dir, "decoder_eval.json"), report)
        save_recon_grid(cfg, [teacher, model], os.path.join(cfg.out_dir, "decoder_recon.png"))
        plot_curves(log.path, os.path.join(cfg.out_dir, "loss_decoder.png"), "decoder", ["loss", "l2", "d_loss"])
    return ckpt_path


# ----------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    md.add_config_flags(p, TrainConfig)
    md.add_config_flags(p, md.UNetConfig)
    md.add_config_flags(p, vae_lib.VAEConfig, prefix="vae_")
    args = p.parse_args(argv)
    cfg = md.config_from_args(TrainConfig(), args)
    if cfg.stage not in ("vae", "decoder", "all"):
        p.error(f"--stage {cfg.stage!r}: expected vae, decoder or all")
    if cfg.preset not in md.PRESETS:
        p.error(f"--preset {cfg.preset!r}: expected one of {sorted(md.PRESETS)}")
    return cfg, args


def main(argv=None):
    cfg, args = parse_args(argv)
    rank, world, device = setup(stage_config(cfg, "vae" if cfg.stage == "all" else cfg.stage))
    os.makedirs(cfg.out_dir, exist_ok=True)
    vae_cfg, light_cfg = vae_configs(cfg, args)
    if rank == 0:
        print(f"stage {cfg.stage}, preset {cfg.preset}, {world} process(es) on {device}, out_dir {cfg.out_dir}")
    if cfg.stage in ("vae", "all"):
        train_vae(stage_config(cfg, "vae"), vae_cfg, rank, world, device)
    if cfg.stage in ("decoder", "all"):
        teacher = cfg.init_from if cfg.stage == "decoder" and cfg.init_from else os.path.join(cfg.out_dir, "vae.pt")
        train_decoder(stage_config(cfg, "decoder"), light_cfg, teacher, rank, world, device)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
