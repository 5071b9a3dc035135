"""
train_utils.py -- the plumbing under train.py's loops, so that each stage function there is mostly its loop:
devices and DDP, the learning rate and the optimiser step, the step's random numbers and this process's slice
of the batch, the data stream (and latents cached once), checkpoints and resume, the one way metrics are
logged (Meter), and the end-of-stage throughput report. Nothing here knows the paper's losses: those live in
vae.py, sample.py (the diffusion loss) and ufogen.py.

`cfg` below is always a train.TrainConfig of one stage (train.stage_config).
"""

import dataclasses
import math
import os
import random
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist

import config
import data
import evaluate
import md
import plugins
import pretrained
import sample
import vae as vae_lib
from config import diverged, load_checkpoint, refuse_if_mismatch, save_checkpoint

# ----------------------------------------------------------------------------------------------------
# Devices, DDP, mixed precision
# ----------------------------------------------------------------------------------------------------


def setup(cfg):
    """DDP from torchrun's env vars (nanoGPT); NCCL on GPUs, gloo on CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if cfg.device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    else:
        device = cfg.device
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    return rank, world, device


def amp_dtype(cfg, device: str) -> str:
    """The run's compute dtype: --dtype, with auto = bf16 on GPUs that have it, else fp32 (CPU: exact fp32)."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bf16" if device.startswith("cuda") and torch.cuda.is_bf16_supported() else "fp32"


def autocast(cfg, device: str):
    """bf16 / fp16 autocast (amp_dtype); a no-op context for fp32, so the tiny run on CPU is exact fp32."""
    dt = amp_dtype(cfg, device)
    if dt == "fp32":
        return nullcontext()
    return torch.autocast(device.split(":")[0], dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[dt])


class LossScaler:
    """fp16's dynamic loss scale (torch.amp.GradScaler, as nanoGPT and diffusers use it): fp16 has 5 exponent
    bits, so small gradients underflow to 0 unless the loss is multiplied by a large scale S before backward;
    the gradients are divided by S again (unscale) before clipping and the step. When a gradient overflows
    (inf / NaN) the step is skipped and S halved; after 2000 clean steps S doubles. bf16 has fp32's exponent
    range and needs none of this: then (and for fp32) every method is a pass-through. A step skipped for an
    overflow is counted (`skipped`, logged as skipped_steps with loss_scale), and the state goes into the
    stage's checkpoint, so a resumed run continues with the same S. MAX_IN_A_ROW skipped steps in a row are
    a divergence (S would only shrink towards 0), not an overflow."""

    MAX_IN_A_ROW = 25

    def __init__(self, cfg, device: str):
        self.cfg, self.device, self.enabled = cfg, device, amp_dtype(cfg, device) == "fp16"
        self.scaler = torch.amp.GradScaler(device.split(":")[0], init_scale=cfg.loss_scale, enabled=self.enabled)
        self.skipped, self.in_a_row, self.overflow = 0, 0, False
        self.opts = []                                       # the optimisers stepped so far (clip_and_step)

    def backward(self, loss: torch.Tensor) -> None:
        if self.cfg.bench and self.opts:                    # what the forward left for its backward (bench_report):
            grads = sum(p.grad.nbytes for o in self.opts for g in o.param_groups for p in g["params"]
                        if p.grad is not None)              # (UFOGen: D's, before G's backward; accumulation)
            used = memory_now(self.device) - BENCH["after_step"] - grads
            BENCH["activations"] = max(BENCH["activations"], used)
        self.scaler.scale(loss).backward()                  # fp16: (S * loss).backward(); else loss.backward()

    def update(self, step: int) -> dict:
        """After every optimiser of the step has stepped: the new scale; what the log gets (fp16 only)."""
        if not self.enabled:
            return {}
        self.scaler.update()
        self.skipped += self.overflow
        self.in_a_row = self.in_a_row + 1 if self.overflow else 0
        self.overflow = False
        if self.in_a_row >= self.MAX_IN_A_ROW:
            raise diverged(self.cfg.stage, self.cfg.out_dir, f"fp16 gradient ({self.in_a_row} overflows in a row; "
                           f"loss scale", self.scaler.get_scale(), step + 1)
        return {"loss_scale": self.scaler.get_scale(), "skipped_steps": self.skipped}

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """A checkpoint of an fp32 / bf16 run (or one from before the scaler existed) has no scale to restore:
        a run resumed in fp16 starts from --loss_scale."""
        if self.enabled and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self.skipped = state.get("skipped", 0)


def wrap(model, cfg, world: int, device: str):
    """torch.compile (--compile) and DDP around a trained network; the unwrapped module keeps the weights."""
    if cfg.compile:
        model = torch.compile(model)
    if world > 1:
        ids = [torch.device(device).index] if device.startswith("cuda") else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


# ----------------------------------------------------------------------------------------------------
# Learning rate and the optimiser step
# ----------------------------------------------------------------------------------------------------

def lr_at(step: int, cfg, base_lr: float, steps: int) -> float:
    """Linear warm-up, then cosine decay to min_lr_frac * lr (nanoGPT) or constant. 5.1 states no schedule."""
    if step < cfg.warmup:
        return base_lr * (step + 1) / cfg.warmup
    if cfg.lr_schedule == "constant":
        return base_lr
    progress = (step - cfg.warmup) / max(steps - cfg.warmup, 1)
    return base_lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(step: int, cfg, *opts) -> float:
    """lr_at(step) set on every optimiser; returned for the log."""
    lr = lr_at(step, cfg, cfg.lr, cfg.steps)
    for opt in opts:
        for group in opt.param_groups:
            group["lr"] = lr
    return lr


def fused(cfg, params) -> bool:
    """--fused: AdamW's fused kernel, one kernel over every parameter instead of a loop of ops per tensor.
    auto = on CUDA (as nanoGPT), off on CPU: the CPU kernel exists (7x faster over 100M params on 2 cores,
    docs/results.md) but rounds differently in the last bit, and the tiny run's documented numbers are the
    foreach kernel's; --fused on takes it on CPU."""
    if cfg.fused == "off":
        return False
    return cfg.fused == "on" or all(p.is_cuda for p in params)


def make_optimizer(params, cfg, lr: float, betas=None, kind=torch.optim.AdamW, weight_decay=None):
    """5.1: AdamW (weight decay cfg.weight_decay); fused where --fused says (fused)."""
    params = list(params)
    return kind(params, lr=lr, betas=betas or (cfg.beta1, cfg.beta2),
                weight_decay=cfg.weight_decay if weight_decay is None else weight_decay,
                fused=fused(cfg, params) or None)


def gan_optimizers(params, disc, cfg):
    """The autoencoder's and its discriminator's optimisers. LDM trains its autoencoders with Adam(0.5, 0.9):
    a low beta1 keeps the GAN game from oscillating."""
    return (make_optimizer(params, cfg, cfg.lr, betas=(0.5, 0.9)),
            make_optimizer(disc.parameters(), cfg, cfg.lr, betas=(0.5, 0.9)))


def clip_and_step(params, opt, cfg, step: int, scaler: LossScaler) -> float | None:
    """Unscale (fp16), clip the global gradient norm and step; returns the norm. A non-finite norm is an
    overflow under fp16's loss scale: the scaler skips the step (LossScaler) and None is returned. Otherwise
    (a NaN or inf loss) it stops the stage before the update reaches the weights (Diverged)."""
    params = list(params)
    if opt not in scaler.opts:
        scaler.opts.append(opt)
    scaler.scaler.unscale_(opt)
    norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    if not math.isfinite(float(norm)):
        if not scaler.enabled:
            raise diverged(cfg.stage, cfg.out_dir, "gradient norm", float(norm), step + 1)
        scaler.overflow = True                               # GradScaler.step below skips opt.step()
    scaler.scaler.step(opt)
    opt.zero_grad(set_to_none=True)
    if cfg.bench:
        BENCH["after_step"] = memory_now(scaler.device)
    return None if scaler.overflow else float(norm)


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            if e is not p:                                        # share_frozen's shared weights stay as they are
                e.lerp_(p.detach(), 1 - decay)


def share_frozen(ema: torch.nn.Module, model: torch.nn.Module) -> torch.nn.Module:
    """Point ema's frozen parameters at model's own tensors: with LoRA (4.3) only the factors train, so an EMA
    needs no second copy of the frozen base (SD-1.5: 3.2 GiB saved). Returns ema."""
    own = dict(model.named_parameters())
    for name, _ in list(ema.named_parameters()):
        if not own[name].requires_grad:
            parent, _, leaf = name.rpartition(".")
            setattr(ema.get_submodule(parent), leaf, own[name])
    return ema


def ema_warmup(cfg, step: int) -> float:
    """The EMA decay at `step`: cfg.ema_decay, lower at the start ((1 + step) / (10 + step)) for short runs."""
    return min(cfg.ema_decay, (1 + step) / (10 + step))


# ----------------------------------------------------------------------------------------------------
# The step's randomness, this process's slice of it, and the data stream
# ----------------------------------------------------------------------------------------------------

def step_generator(cfg, step: int) -> torch.Generator:
    """The step's randomness for the *global* batch, from (seed, step) alone: each process takes its slice
    (micro_slice), so the trajectory does not depend on the number of processes and a resumed run repeats it
    bit for bit."""
    return torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)


def micro_slice(cfg, rank: int, world: int, k: int) -> slice:
    """Where micro-batch k of this process sits in the global batch (the layout data.batches yields)."""
    per_proc = cfg.batch_size // world
    micro = per_proc // cfg.grad_accum
    return slice(rank * per_proc + k * micro, rank * per_proc + (k + 1) * micro)


def diffusion_noise(cfg, step: int, latent_shape: tuple):
    """(t, eps, drop) for the *global* batch of a denoiser-training step: timesteps, noise and the CFG caption
    dropout, drawn in that order from step_generator; each process takes its slice (micro_slice)."""
    rng = step_generator(cfg, step)
    t = torch.randint(0, sample.T, (cfg.batch_size,), generator=rng)
    eps = torch.randn((cfg.batch_size, *latent_shape), generator=rng)
    drop = torch.rand(cfg.batch_size, generator=rng) < cfg.p_uncond
    return t, eps, drop


def stage_data(cfg, rank: int, world: int, start: int, device: str, vae=None):
    """(dataset, batch stream from step `start`, Log) for cfg.stage. `vae`: the stage's frozen VAE when it trains
    on latents. Then cached latents (--data from --stage encode) are checked to come from this VAE's encoder,
    and with cfg.train_images = N a map-style dataset becomes its first N items as latents, encoded once (the
    stream then yields latents, not images; see to_latents). Without a `vae` the stage needs images."""
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style, cfg.min_size, cfg.shuffle_buffer)
    if yields_latents(dataset):
        if vae is None:
            raise ValueError(f"--data {cfg.data}: cached latents, but the {cfg.stage} stage trains on images; give "
                             f"the image folder or shards the latents were made from")
        check_latents(cfg.data, vae)
        if cfg.random_flip:
            raise ValueError("--random_flip: the flip of a cached latent is not the latent of the flipped image; "
                             "train on the images, or without flips")
    elif vae is not None and cfg.train_images > 0:
        if isinstance(dataset, torch.utils.data.IterableDataset):
            raise ValueError(f"--train_images {cfg.train_images}: keeps the first N items of a folder in memory; "
                             f"for shards, encode them once with --stage encode and train on --data <latents dir>")
        dataset = encode_dataset(dataset, cfg.train_images, vae, device)
    sized = not isinstance(dataset, torch.utils.data.IterableDataset)
    if rank == 0 and sized and len(dataset) < cfg.batch_size:      # said, not silently repeated
        print(f"{cfg.stage}: note: the training set has {len(dataset)} item(s), fewer than --batch_size "
              f"{cfg.batch_size}; every batch repeats them")
    stream = data.batches(dataset, cfg.batch_size, cfg.grad_accum, cfg.seed, rank, world, start, device,
                          cfg.num_workers, cfg.random_flip)
    log = config.Log(None if cfg.bench else cfg.out_dir, cfg.stage, cfg.steps, start, rank)
    if cfg.bench:                                                 # weights, EMA, frozen nets; no Adam state yet
        now = memory_now(device)
        BENCH.update(start=now, after_step=now, activations=0)
        reset_peak(device)
    return dataset, stream, log


def yields_latents(dataset) -> bool:
    """Whether a dataset's items are latents already (cached), not images."""
    return bool(getattr(dataset, "yields_latents", False))


def check_latents(folder: str, vae) -> None:
    """Refuse latents that another VAE's encoder made (they would be noise to this model)."""
    man = data.latents_manifest(folder)
    mine = vae_lib.encoder_fingerprint(vae)
    if man["vae"] != mine:
        raise ValueError(f"--data {folder}: these latents were made by a VAE with encoder fingerprint {man['vae']} "
                         f"({man.get('vae_source', '?')}), this stage's VAE has {mine}: encode again with --stage "
                         f"encode and this VAE")


@torch.no_grad()
def encode_dataset(dataset, n: int, vae, device: str, batch: int | None = None) -> data.Latents:
    """The first n items as (scaled posterior-mean latent, caption) pairs: the VAE runs once per image instead
    of once per step, and the images are rendered or decoded from disk once. batch: images per encoder call
    (default data.images_per_call: 256 at the tiny run's 32px, 4 at 512px)."""
    latents, captions = [], []
    batch = batch or data.images_per_call(dataset[0][0].shape[-1], 256)
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


def latent_batch(x, texts, vae, text, cached: bool):
    """Data latents (to_latents) and frozen text contexts for the post-training stages."""
    with torch.no_grad():
        return to_latents(x, vae, cached), text(texts)


def due(step: int, every: int, cfg) -> bool:
    """After optimiser step `step` (0-based): every `every` steps, and at the last."""
    return (step + 1) % every == 0 or step + 1 == cfg.steps


def save_due(step: int, cfg) -> bool:
    """Whether the stage's checkpoint is written after step `step`: every ckpt_every and at the last; never in
    a --bench run."""
    return not cfg.bench and due(step, cfg.ckpt_every, cfg)


def grid_prompts(cfg, dataset, n: int = 8) -> list[str]:
    """The prompts of the progress grids: --prompts FILE, else n held-out captions and n training captions."""
    if cfg.prompts:
        return evaluate.read_prompts(cfg.prompts)
    train = [] if isinstance(dataset, torch.utils.data.IterableDataset) else [dataset[i][1] for i in range(min(n, len(dataset)))]
    return evaluate.heldout_prompts(cfg, n) + train


@torch.no_grad()
def validation_batch(cfg, vae, n: int = 64):
    """(latents, captions, t, eps) of up to n held-out images, fixed for the stage: the validation loss compares
    like with like at every step (t and eps from a generator of their own; the training RNG is not touched)."""
    held = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    items = [held[i] for i in range(min(n, len(held)))]
    x = torch.stack([im for im, _ in items]).to(next(vae.parameters()).device)
    chunks = x.split(data.images_per_call(cfg.resolution, 64))                      # (one call at 32px)
    z0 = torch.cat([to_latents(c, vae, cached=False) for c in chunks])
    rng = torch.Generator().manual_seed(12345)
    t = torch.randint(0, sample.T, (len(items),), generator=rng).to(z0.device)
    eps = torch.randn(z0.shape, generator=rng).to(z0.device)
    return z0, [c for _, c in items], t, eps


@torch.no_grad()
def validation_loss(model, sched, batch, min_snr: float) -> float:
    """The denoiser's loss (sample.diffusion_loss) on the held-out validation batch."""
    z0, captions, t, eps = batch
    ids = model.text.tokenizer(captions).to(z0.device)
    return float(sample.diffusion_loss(sched, model(sample.q_sample(sched, z0, t, eps), t, ids), z0, t, eps, min_snr))


@torch.no_grad()
def progress_grid(cfg, unet, vae, text, sched, device: str, prompts: list[str], step: int, **sampling) -> None:
    """out_dir/<name>_<step>.png: the stage's model on the grid prompts, 8 a row (samples_ for the diffusion
    stage, <stage>_ for the others), seed 0 every time so that successive grids compare."""
    pipe = sample.Pipeline(unet, vae, text, sched, device, cfg.resolution)
    imgs = pipe.images(prompts, seed=0, **sampling)
    name = "samples" if cfg.stage == "diffusion" else cfg.stage
    data.image_grid(imgs.cpu(), nrow=8).save(os.path.join(cfg.out_dir, f"{name}_{step:06d}.png"))


# ----------------------------------------------------------------------------------------------------
# Metrics: one way for every stage
# ----------------------------------------------------------------------------------------------------

class Meter:
    """A step's metrics: add() once per micro-batch, mean() = the mean over the step's micro-batches and, under
    DDP, over the processes (one all-reduce per step); then it starts the next step empty."""

    def __init__(self, world: int, device: str):
        self.world, self.device, self.sums, self.counts = world, device, {}, {}

    def add(self, **values) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.detach() if torch.is_tensor(v) else v)
            self.counts[k] = self.counts.get(k, 0) + 1

    def mean(self) -> dict:
        keys = sorted(self.sums)
        out = {k: self.sums[k] / self.counts[k] for k in keys}
        if self.world > 1 and keys:
            vec = torch.tensor([out[k] for k in keys], dtype=torch.float64, device=self.device)
            dist.all_reduce(vec)
            out = {k: float(v) / self.world for k, v in zip(keys, vec.tolist())}
        self.sums, self.counts = {}, {}
        return out


# ----------------------------------------------------------------------------------------------------
# Checkpoints: resume, refuse mismatches, write each stage's payload
# ----------------------------------------------------------------------------------------------------

# TrainConfig fields a --resume may change: how long to train (steps; the cosine schedule stretches with it),
# how often to log / sample / save / evaluate, and where and how fast it runs. Any other difference (seed,
# batch size, lr, resolution, data, ...) would silently make the checkpoint a mix of two runs: refused.
RESUMABLE = ("steps", "resume", "overwrite", "log_every", "sample_every", "ckpt_every", "eval_images", "eval_steps",
             "guidance", "num_workers", "device", "compile", "dtype", "init_from", "out_dir", "fused",
             "grad_checkpoint", "loss_scale", "bench", "export_weights")


def stage_checkpoint(cfg, path: str, rank: int = 0) -> dict | None:
    """What a stage starts from: with --resume, its checkpoint (refused if its training config differs from this
    run's in a field outside RESUMABLE; a stage not begun yet starts fresh, so `--stage all --resume` goes on
    after any stage). Without --resume, None, refusing to replace an existing checkpoint unless --overwrite."""
    if cfg.bench:                                                  # a benchmark neither reads nor writes it
        return None
    if not cfg.resume:
        if os.path.isfile(path) and not cfg.overwrite:
            raise ValueError(f"{path} exists: give --resume to continue it, or --overwrite to train {cfg.stage} again "
                             f"from scratch (replacing it; the stages trained from it would no longer match)")
        return None
    if not os.path.isfile(path):
        if rank == 0:
            print(f"{cfg.stage}: --resume, but no {path} yet: starting this stage from step 0")
        return None
    ck = config.refuse_non_finite(load_checkpoint(path), path)      # a resumed run never goes on from NaN
    saved = ck.get("config", {}).get("train", ck.get("train"))
    if saved is None:
        raise ValueError(f"{path}: no training config saved in it; cannot check that --resume continues the same run")
    refuse_if_mismatch(path, "training", saved, cfg, ignore=RESUMABLE)
    return ck


def restore(ck: dict, **parts) -> int:
    """Load a resumed checkpoint's states into the given modules, optimisers and LossScaler (keyword = the
    checkpoint key; a checkpoint from before the scaler existed has none); returns the step to go on from."""
    for key, obj in parts.items():
        obj.load_state_dict(ck.get(key, {}) if key == "scaler" else ck[key])
    return ck["step"]


def resume_autoencoder(cfg, path: str, vcfg, model, disc, opt, opt_d, scaler, rank: int) -> int:
    """Restore a vae/decoder stage (VAE, discriminator, both optimisers, loss scale, RNG); returns the step to go
    on from."""
    ck = stage_checkpoint(cfg, path, rank)
    if ck is None:
        return 0
    refuse_if_mismatch(path, "VAE", ck["config"]["vae"], vcfg, ignore=("scaling_factor",))  # re-estimated
    model.load_state_dict(ck["model"], source=path)
    torch.set_rng_state(ck["rng"]["torch"])
    return restore(ck, disc=disc, opt=opt, opt_d=opt_d, scaler=scaler)


def save_autoencoder(path: str, cfg, step: int, model, vcfg, disc, opt, opt_d, scaler) -> None:
    """vae.pt / decoder.pt: what sample.load_vae reads (model, config['vae']) and what --resume needs."""
    save_checkpoint(path, keep_previous=True, payload={
        "stage": cfg.stage, "step": step, "model": model.state_dict(), "disc": disc.state_dict(),
        "opt": opt.state_dict(), "opt_d": opt_d.state_dict(), "scaler": scaler.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "config": {"vae": dataclasses.asdict(vcfg), "train": dataclasses.asdict(cfg)}})


def save_diffusion(path: str, cfg, step: int, model, ema, opt, scaler, vae, sched: dict) -> None:
    """diffusion.pt: the Denoiser and its EMA (without a text encoder read from a folder), the frozen VAE, the
    configs (what sample.load_diffusion reads: UNet, text, VAE, run, schedule) and the optimiser and RNG for
    --resume."""
    save_checkpoint(path, keep_previous=True, payload={
        "stage": cfg.stage, "step": step, "model": sample.trainable_state(model), "ema": sample.trainable_state(ema),
        "opt": opt.state_dict(), "scaler": scaler.state_dict(), "vae": vae.state_dict(),
        "rng": {"torch": torch.get_rng_state()},
        "config": {"unet": dataclasses.asdict(model.unet.cfg), "text": dataclasses.asdict(model.text.cfg),
                   "vae": dataclasses.asdict(vae.cfg), "train": dataclasses.asdict(cfg),
                   "schedule": dataclasses.asdict(sched["cfg"])}})


def save_generator(path: str, cfg, step: int, gen, gen_ema, text, vae, base_conf: dict, stage_conf: dict,
                   **raw) -> None:
    """ufogen.pt / distill.pt: read by Pipeline.from_checkpoint / load_diffusion like a diffusion.pt, plus the raw
    training state (`raw`: modules and optimisers by checkpoint key) for --resume. A LoRA generator's "model" and
    "ema" keep their LoRA layers unmerged (the same tensors as the raw state, so the file holds them once and
    no merged copy of the UNet is made: SD-1.5 sized, it would not fit beside the training state);
    sample.load_diffusion folds them in with "lora_scale". stage_conf: the stage's own configs by name
    ({"ufogen": ..., "schedule": ...})."""
    scale = next((m.scale for m in gen.modules() if isinstance(m, plugins.LoRA)), None)
    save_checkpoint(path, keep_previous=True, payload={
        "stage": cfg.stage, "step": step, "model": sample.trainable_state(sample.Denoiser(gen, text)),
        "ema": sample.trainable_state(sample.Denoiser(gen_ema, text)), "lora_scale": scale, "vae": vae.state_dict(),
        **{k: v.state_dict() for k, v in raw.items()},
        "lora": plugins.lora_state_dict(gen),
        "config": {**base_conf, "train": dataclasses.asdict(cfg),
                   **{k: dataclasses.asdict(v) for k, v in stage_conf.items()}}})


def export_weights(ckpt: str) -> str:
    """<stage>.safetensors beside a diffusion.pt / ufogen.pt / distill.pt (sample.save_weights): its EMA
    weights (a LoRA generator's folded in) and configs, none of the training state; what sample.py,
    evaluate.py and export_coreml.py load at the model's size in RAM. Written at the end of each of those
    stages, and by `train.py --export_weights` for any checkpoint already there. Returns its path."""
    unet, vae, text, conf = sample.load_diffusion(ckpt, ema=True)
    out = sample.weights_path(ckpt)
    sample.save_weights(out, unet, vae, text, conf)
    mib = lambda p: os.path.getsize(p) / 2 ** 20
    print(f"{conf['train'].get('stage', '?')}: inference weights -> {out} ({mib(out):.1f} MiB; the training "
          f"checkpoint {ckpt}: {mib(ckpt):.1f} MiB)")
    return out


# ----------------------------------------------------------------------------------------------------
# Models the stages start from
# ----------------------------------------------------------------------------------------------------

def make_perceptual(cfg, vcfg, rank: int, device: str):
    """The 3.5 perceptual loss if a local VGG16 file is given and the preset weights it; otherwise None,
    said once in the log (never substituted silently)."""
    if cfg.vgg_weights and vcfg.perceptual_weight > 0:
        return vae_lib.PerceptualLoss(cfg.vgg_weights).to(device)
    if rank == 0:
        why = "perceptual_weight = 0 in this preset" if vcfg.perceptual_weight == 0 else "no --vgg_weights file given"
        print(f"{cfg.stage}: perceptual loss OFF ({why}); training with the other loss terms only")
    return None


def light_from_teacher(light_cfg, teacher):
    """3.5's light VAE: the teacher's encoder (bit-identical, frozen) and a fresh pruned decoder."""
    t = teacher.cfg                                               # the encoder is the teacher's, field for field
    light_cfg = dataclasses.replace(light_cfg, in_channels=t.in_channels, latent_channels=t.latent_channels,
                                    channels=t.channels, layers=t.layers, mid_attn=t.mid_attn,
                                    scaling_factor=t.scaling_factor)
    model = vae_lib.VAE(light_cfg)
    model.encoder.load_state_dict(teacher.encoder.state_dict())
    model.quant_conv.load_state_dict(teacher.quant_conv.state_dict())
    model.post_quant_conv.load_state_dict(teacher.post_quant_conv.state_dict())
    model.encoder.requires_grad_(False)
    model.quant_conv.requires_grad_(False)
    return model


# --bench without --text_encoder: a random encoder of CLIP-ViT/L14's size, with word tokens (no vocabulary file).
BENCH_TEXT = dataclasses.replace(md.TEXT_PRESETS["clip-l14"], tokenizer="words")


def build_text_encoder(cfg, text_cfg: md.TextConfig) -> md.TextEncoder:
    if cfg.text_encoder:
        return md.TextEncoder.from_pretrained(cfg.text_encoder)
    if cfg.preset != "tiny" and cfg.bench:                      # a step's time needs CLIP's shape, not its files
        return md.TextEncoder(BENCH_TEXT).requires_grad_(False)     # frozen, as CLIP (3)
    if cfg.preset != "tiny":
        raise ValueError(f"--preset {cfg.preset} conditions on CLIP-ViT/L14 (3): give a local Hugging Face CLIP folder "
                         f"with --text_encoder path/to/clip-vit-large-patch14 (no downloads at run time)")
    return md.TextEncoder(text_cfg)


def build_vae_for_diffusion(cfg) -> vae_lib.VAE:
    """The frozen VAE of the diffusion stage: a diffusers folder (--vae_diffusers), --vae_ckpt, else the VAE of
    the --init_from model (a finetune stays in its base's latent space), else out_dir's decoder.pt, else its
    vae.pt."""
    if cfg.vae_diffusers:
        return vae_lib.VAE.from_diffusers(cfg.vae_diffusers).eval()
    if not cfg.vae_ckpt and cfg.init_from and os.path.isfile(cfg.init_from):
        return sample.load_diffusion(cfg.init_from)[1]
    candidates = (os.path.join(cfg.out_dir, "decoder.pt"), os.path.join(cfg.out_dir, "vae.pt"))
    path = cfg.vae_ckpt or next((p for p in candidates if os.path.isfile(p)), candidates[1])
    return sample.load_vae(path)


def check_compatible(unet_cfg: md.UNetConfig, vae: vae_lib.VAE, text: md.TextEncoder) -> None:
    if unet_cfg.in_channels != vae.cfg.latent_channels:
        raise ValueError(f"UNetConfig.in_channels = {unet_cfg.in_channels} but the VAE has {vae.cfg.latent_channels} "
                         f"latent channels (set --in_channels {vae.cfg.latent_channels})")
    if unet_cfg.context_dim != text.cfg.width:
        raise ValueError(f"UNetConfig.context_dim = {unet_cfg.context_dim} but the text encoder's width is "
                         f"{text.cfg.width} (set --context_dim {text.cfg.width})")


def from_pipeline_folder(cfg, unet_cfg: md.UNetConfig):
    """--stage diffusion --init_from a diffusers SD folder (finetuning SD-1.5): the UNet's architecture is the
    folder's (only attn_act and dropout may be changed by flags), and unless given otherwise the frozen VAE
    and CLIP are the folder's too. (cfg, unet_cfg) for the stage; other inits pass through unchanged."""
    if not (cfg.init_from and pretrained.is_pipeline_folder(cfg.init_from)):
        return cfg, unet_cfg
    folder = cfg.init_from
    own = pretrained.unet_config(folder)[1]
    unet_cfg = dataclasses.replace(own, attn_act=unet_cfg.attn_act, dropout=unet_cfg.dropout)
    return dataclasses.replace(cfg, text_encoder=cfg.text_encoder or folder,
                               vae_diffusers=cfg.vae_diffusers or folder), unet_cfg


def init_schedule(cfg) -> dict:
    """The diffusion stage's schedule: the --init_from model's (a finetune keeps its base's parameterisation:
    SD-1.5's eps-prediction, or this project's v), else this project's default (sample.ScheduleConfig)."""
    if not cfg.init_from:
        return sample.make_schedule()
    if os.path.isdir(cfg.init_from):
        return sample.make_schedule(sample.schedule_from_diffusers(cfg.init_from))
    return sample.make_schedule(sample.schedule_config(sample.saved_config(cfg.init_from)))


def init_denoiser(model: sample.Denoiser, path: str, unet_cfg: md.UNetConfig) -> None:
    """--init_from: another diffusion.pt's EMA weights (or its inference weights), or a diffusers SD folder's
    UNet, for a UNet that may differ only in attn_act / dropout."""
    if os.path.isdir(path):
        own = pretrained.unet_config(path)[1]
        refuse_if_mismatch(path, "UNet", dataclasses.asdict(own), unet_cfg, ignore=("attn_act", "dropout"))
        pretrained.load_unet(path, into=model.unet)               # no second SD-sized UNet in memory
        return
    state, _, conf = sample.read_denoiser(path, ema=True)
    refuse_if_mismatch(path, "UNet", conf["unet"], unet_cfg, ignore=("attn_act", "dropout"))
    sample.load_denoiser_state(model, state, path)


def resume_diffusion(cfg, path: str, model, ema, opt, scaler, rank: int, sched: dict) -> int:
    """Restore a diffusion stage (Denoiser, EMA, optimiser, loss scale, RNG), refusing a changed UNet, text
    encoder or schedule."""
    ck = stage_checkpoint(cfg, path, rank)
    if ck is None:
        return 0
    refuse_if_mismatch(path, "UNet", ck["config"]["unet"], model.unet.cfg)
    refuse_if_mismatch(path, "text encoder", ck["config"]["text"], model.text.cfg)
    refuse_if_mismatch(path, "schedule", ck["config"].get("schedule", {}), sched["cfg"])
    sample.load_denoiser_state(model, ck["model"], path)
    sample.load_denoiser_state(ema, ck["ema"], path)
    torch.set_rng_state(ck["rng"]["torch"])                       # (the noise itself comes from (seed, step))
    return restore(ck, opt=opt, scaler=scaler)


def default_base(out_dir: str, stage: str) -> str:
    """The base a stage starts from without --init_from: the relu stage's is the softmax diffusion.pt; every later
    stage's is the 3.2 ReLU model (relu.pt) when the relu stage has run, else diffusion.pt."""
    relu = os.path.join(out_dir, "relu.pt")
    return relu if stage != "relu" and os.path.isfile(relu) else os.path.join(out_dir, "diffusion.pt")


def load_base(cfg, device: str):
    """The pretrained diffusion model the post-training stages start from (--init_from: a diffusion.pt or a
    diffusers SD folder, else default_base), its frozen VAE and text encoder on `device`, its saved config (with
    its schedule), and cfg with the base's text encoder folder (so the stage's checkpoint reloads with the same
    encoder)."""
    base = cfg.init_from or default_base(cfg.out_dir, cfg.stage)
    unet, vae, text, conf = sample.load_diffusion(base, ema=True)
    cfg = dataclasses.replace(cfg, text_encoder=conf["train"].get("text_encoder", ""))
    return base, unet.to(device), vae.to(device).requires_grad_(False), text.to(device).requires_grad_(False), conf, cfg


def generator_schedule(base_conf: dict) -> dict:
    """The schedule of a one-step or few-step model made from a base (ufogen, distill): the base's noise levels and
    parameterisation, sampled with trailing spacing, so that its first step is t = T-1, where sampling from pure
    noise starts (Lin et al. 2024; SD-1.5's leading spacing would put one step at t = 1)."""
    return sample.make_schedule(dataclasses.replace(sample.schedule_config(base_conf), spacing="trailing",
                                                    steps_offset=0, set_alpha_to_one=True))


@torch.no_grad()
def null_context(text) -> torch.Tensor:
    """The empty prompt's context (1, L, D), classifier-free guidance's unconditional input; the text encoder
    is frozen after the diffusion stage, so one encoding serves every batch (.expand(B, -1, -1))."""
    return text([""])


def describe_denoiser(model: sample.Denoiser, cfg, vae, device: str) -> None:
    """The diffusion stage's opening line: UNet params, trained text-encoder params, GMACs per evaluation."""
    trained_text = sum(p.numel() for p in model.text.parameters() if p.requires_grad)
    context = torch.zeros(1, model.text.cfg.max_len, model.unet.cfg.context_dim, device=device)
    start = f", from {cfg.init_from}" if cfg.init_from else ""
    macs = latent_macs(model.unet, cfg, vae, context)
    print(f"{cfg.stage}: UNet {md.count_params(model.unet) / 1e6:.1f}M params (+{trained_text / 1e6:.2f}M trained text "
          f"encoder), {model.unet.cfg.attn_act} attention{start}, {macs / 1e9:.3f} GMACs/eval at {cfg.resolution}px "
          f"({tuple(one_latent(cfg, vae, device).shape[1:])} latent)")


# ----------------------------------------------------------------------------------------------------
# The end-of-stage throughput report: MACs of one forward, images/s, share of the machine's peak
# ----------------------------------------------------------------------------------------------------

def one_latent(cfg, vae, device: str) -> torch.Tensor:
    """A zero latent (1, c, H/f, W/f) of this run's resolution."""
    f = vae.cfg.factor
    return torch.zeros(1, vae.cfg.latent_channels, cfg.resolution // f, cfg.resolution // f, device=device)


@torch.no_grad()
def latent_macs(net, cfg, vae, cond: torch.Tensor) -> float:
    """MACs of one evaluation of a latent-space network, net(latent, t, cond), on one latent of this run's
    resolution: the UNet, UFOGen's G and D (cond: a text context (1, L, D)), or the Denoiser (cond: token ids)."""
    x = one_latent(cfg, vae, "cpu").to(cond.device)
    return float(md.count_macs(net, x, torch.ones(1, dtype=torch.long, device=x.device), cond))


@torch.no_grad()
def vae_macs(model: vae_lib.VAE, cfg, part: str = "all") -> float:
    """MACs of the VAE on one image of this run's resolution: the whole autoencoder, or its decoder alone."""
    device = next(model.parameters()).device
    x = torch.zeros(1, model.cfg.in_channels, cfg.resolution, cfg.resolution, device=device)
    if part == "decoder":
        return float(md.count_macs(model.decoder, model.encode(x).mode()))
    return float(md.count_macs(model, x))


def finish_stage(cfg, log, start: int, t0: float, device: str, flops_per_image: float, curves: list[str]) -> None:
    """Rank 0, after the loop: the stage's time, images/s and share of the machine's peak (times.json), and its
    loss curves (loss_<stage>.png). flops_per_image: 2 FLOPs per MAC of each forward, twice that per backward.
    A --bench run prints bench_report instead and ends the stage here (BenchDone)."""
    if cfg.bench:
        bench_report(cfg, log, flops_per_image, device)
        raise BenchDone
    evaluate.throughput_report(cfg, cfg.steps - start, time.time() - t0, flops_per_image, device)
    evaluate.plot_curves(log.path, os.path.join(cfg.out_dir, f"loss_{cfg.stage}.png"), cfg.stage, curves)


# Minutes of each stage of the default run (with its evaluation) on the 2-core machine the defaults were tuned
# on, whose fp32 matmul peak is REFERENCE_GFLOPS (docs/results.md); scaled by this machine's peak for the
# estimate the run prints at its start.
STAGE_MINUTES = {"vae": 3.0, "decoder": 0.75, "diffusion": 3.35, "relu": 1.3, "ufogen": 1.45, "distill": 0.75}
REFERENCE_GFLOPS = 307.0


def estimate_minutes(stage_cfgs: dict, default_steps: dict, device: str) -> str:
    """The default run's expected length on this machine, from STAGE_MINUTES at the default steps (other
    --steps scale it). stage_cfgs: each stage's resolved config; default_steps: each stage's default steps."""
    peak = evaluate.matmul_peak(device)
    scale = REFERENCE_GFLOPS / peak if device.startswith("cpu") else float("nan")
    per = {st: m * stage_cfgs[st].steps / default_steps[st] * scale for st, m in STAGE_MINUTES.items()}
    return (f"estimated total: {sum(per.values()):.1f} min on this CPU (matmul peak {peak:.0f} GFLOP/s; "
            + ", ".join(f"{st} {m:.1f}" for st, m in per.items()) + ")")


# ----------------------------------------------------------------------------------------------------
# The benchmark (train.py --stage S --bench N): a stage's own loop, timed, with MFU and memory
# ----------------------------------------------------------------------------------------------------

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s, (bf16, fp16, tf32), from the vendors' datasheets
# (NVIDIA H100 / H200 / A100 / L40S / L4 / A10 / V100 / T4 datasheets, the Ada and Ampere GeForce whitepapers'
# "FP16 Tensor TFLOPS with FP32 accumulate", AMD's MI300X datasheet); the sparse figures they headline are
# twice these. The first name contained in torch.cuda.get_device_name() wins (so "H100 PCIe" before "H100").
# None: no such tensor-core path (V100 and T4 have no bf16; their fp32 runs without tensor cores).
GPU_PEAKS = [
    ("H100 PCIe", (756.0, 756.0, 378.0)), ("H100", (989.4, 989.4, 494.7)), ("H200", (989.4, 989.4, 494.7)),
    ("A100", (312.0, 312.0, 156.0)), ("L40S", (362.1, 362.1, 183.0)), ("L4", (121.0, 121.0, 60.0)),
    ("A10", (125.0, 125.0, 62.5)), ("RTX 4090", (165.2, 165.2, 82.6)), ("RTX 3090", (71.0, 71.0, 35.6)),
    ("A6000", (154.8, 154.8, 77.4)), ("V100-PCIE", (None, 112.0, None)), ("V100", (None, 125.0, None)),
    ("T4", (None, 65.0, None)), ("MI300X", (1307.4, 1307.4, 653.7)),
]
BENCH_WARMUP = 3                     # untimed steps first: allocator warm-up, cuDNN autotuning, torch.compile
BENCH = {}                           # memory_now() at the loop's start and after each optimiser step; the most
                                     # memory a backward found in use beyond the last step's (LossScaler.backward)
GPU_SIZES_GB = (24, 40, 80, 141)     # the micro-batch table's memory sizes (L4/4090, A100-40, A100/H100-80, H200)


class BenchDone(Exception):
    """Raised by finish_stage in a --bench run: the stage stops after its timed loop (no report, no file)."""


def device_peak(cfg, device: str) -> tuple[float, str]:
    """(peak TFLOP/s for this run's dtype, where the number comes from) for MFU: --peak_tflops, else GPU_PEAKS
    by device name, else (CPU) the measured fp32 matmul peak (evaluate.matmul_peak). nan if unknown."""
    dt = amp_dtype(cfg, device)
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops, "--peak_tflops"
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        col = {"bf16": 0, "fp16": 1, "fp32": 2}[dt]
        for key, peaks in GPU_PEAKS:
            if key in name:
                if peaks[col] is None:
                    return float("nan"), f"{name} has no {dt} tensor cores"
                what = "tf32" if dt == "fp32" else dt
                return peaks[col], f"{name}, {what} dense, datasheet (GPU_PEAKS)"
        return float("nan"), f"{name} is not in GPU_PEAKS; give --peak_tflops"
    if device.startswith("cpu"):
        return evaluate.matmul_peak(device) / 1e3, "this CPU's measured fp32 matmul (evaluate.matmul_peak)"
    return float("nan"), f"no peak known for {device}; give --peak_tflops"


def memory_now(device: str) -> int:
    """Bytes in use: CUDA's allocated tensors, or this process's resident set (CPU)."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_peak(device: str) -> None:
    """Start memory_peak's high-water mark afresh (CPU: Linux's clear_refs 5 resets the process's VmHWM)."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    elif os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def release_freed_memory() -> None:
    """CPU: make glibc's malloc give every allocation over 64 KiB its own mapping, returned to the system when
    freed (mallopt M_MMAP_THRESHOLD), so that the resident set follows the live tensors and --bench's memory
    figures mean what CUDA's would; by default freed blocks stay in malloc's heap and the resident set only
    grows. A no-op where the C library is not glibc."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)                 # M_MMAP_THRESHOLD = 64 KiB
    except (OSError, AttributeError):
        pass


def memory_peak(device: str) -> int:
    """The high-water mark since reset_peak: CUDA's max allocated, or (CPU) the process's peak resident set."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:                              # (Linux; VmHWM in kB)
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def device_memory(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def fitting_micro_batch(capacity: int, fixed: int, per_image: float, headroom: float = 0.9) -> int:
    """The largest micro-batch whose memory, fixed + micro * per_image, stays under headroom * capacity (the
    rest: the allocator's fragmentation, NCCL's and cuDNN's buffers)."""
    return max(int((headroom * capacity - fixed) // per_image), 0) if per_image > 0 else 0


def grad_accum_for(per_process: int, fits: int) -> int:
    """The fewest micro-steps that split a process's share of the batch into micro-batches of at most `fits`
    images (a divisor of the share: every micro-batch the same size); 0 if not even one image fits."""
    if fits < 1:
        return 0
    return next(k for k in range(1, per_process + 1) if per_process % k == 0 and per_process // k <= fits)


def bench_report(cfg, log, flops_per_image: float, device: str) -> dict:
    """What --bench prints: the step time (median of the timed steps, after BENCH_WARMUP), images/s, the
    model's TFLOP/s (flops_per_image, as finish_stage: recomputation by --grad_checkpoint is not counted, as
    MFU is defined by Chowdhery et al. 2022) and MFU against device_peak; then memory: what the loop started
    with (weights, EMA, frozen networks), the optimiser state it added (= 2x the gradients for Adam), the
    peak, the activations per image (what a forward left in memory for its backward, per image of the
    micro-batch, less autocast's weight copies), and the micro-batch that fits each memory size, counting
    weights, optimiser state, gradients and activations all at once (an upper bound: the backward frees
    activations as gradients appear; with --grad_checkpoint, one block's recomputation is not counted), so
    that --grad_accum can be as small as memory allows."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    micro = cfg.batch_size // world // cfg.grad_accum
    steps = [b - a for a, b in zip(log.times, log.times[1:])][BENCH_WARMUP:]
    step_s = sorted(steps)[len(steps) // 2]
    ips = cfg.batch_size / step_s
    tflops = flops_per_image * ips / 1e12 / world                  # per device
    peak, source = device_peak(cfg, device)
    start, end, high = BENCH["start"], memory_now(device), memory_peak(device)
    grads = (end - start) / 2                                      # Adam's two moments per trained parameter
    # Under bf16 / fp16 autocast the forward keeps a half-precision copy of each trained weight it casts
    # (torch.autocast's cache): half the gradients' bytes, paid once per forward, not per image. Inside
    # checkpointed blocks it keeps none (measured: md at 256px, bf16, 4 images left 0.10 GiB in all).
    dtype = amp_dtype(cfg, device)
    cast = grads / 2 if dtype in ("bf16", "fp16") and not cfg.grad_checkpoint else 0
    fixed = end + grads + cast
    per_image = max(BENCH["activations"] - cast, 0) / micro       # (tiny models: within the CPU's noise)
    gib = 2 ** 30
    res = {"stage": cfg.stage, "preset": cfg.preset, "resolution": cfg.resolution, "batch_size": cfg.batch_size,
           "micro_batch": micro, "processes": world, "dtype": dtype, "compile": cfg.compile,
           "grad_checkpoint": cfg.grad_checkpoint, "step_s": step_s, "images_per_s": ips,
           "tflop_per_s": tflops, "peak_tflop_per_s": peak, "mfu": tflops / peak, "peak_source": source,
           "memory_gib": {"start": start / gib, "optimizer": (end - start) / gib, "peak": high / gib,
                          "activations_per_image": per_image / gib},
           "fits": {f"{g} GB": fitting_micro_batch(g * 1e9, fixed, per_image) for g in GPU_SIZES_GB}}
    print(f"bench {cfg.stage}: preset {cfg.preset}, {cfg.resolution}px, batch {cfg.batch_size} = {world} "
          f"process(es) x {cfg.grad_accum} micro-batch(es) of {micro}, {dtype}, compile "
          f"{'on' if cfg.compile else 'off'}, grad_checkpoint {'on' if cfg.grad_checkpoint else 'off'}, on {device}")
    print(f"  step {step_s:.3f} s (median of {len(steps)} after {BENCH_WARMUP} warm-up; min {min(steps):.3f}, max "
          f"{max(steps):.3f}), {ips:.3g} images/s, {tflops:.3g} TFLOP/s per device = {100 * res['mfu']:.1f}% MFU "
          f"(peak {peak:.4g} TFLOP/s: {source})")
    what = "allocated" if device.startswith("cuda") else "resident"
    print(f"  memory ({what}): {start / gib:.2f} GiB at the start, +{(end - start) / gib:.2f} GiB optimiser state, "
          f"peak {high / gib:.2f} GiB; activations {per_image / gib:.3f} GiB per image")
    here = fitting_micro_batch(device_memory(device), fixed, per_image)
    print("  micro-batch that fits: " + ", ".join(f"{k}: {v}" for k, v in res["fits"].items())
          + f" (this device: {here})" + ("; plus one block's recomputation in the backward (docs/results.md)"
                                          if cfg.grad_checkpoint else ""))
    share = cfg.batch_size // world
    print(f"  --batch_size {cfg.batch_size} on {world} process(es): --grad_accum "
          + ", ".join(f"{grad_accum_for(share, v) or '-'} on {k}" for k, v in res["fits"].items())
          + f" ({grad_accum_for(share, here) or '-'} here)")
    return res
