"""
Latent diffusion sampling for MobileDiffusion: the noise schedule, samplers as small pure functions that
share one signature, classifier-free guidance, and a text-to-image pipeline object.

  3 (intro)  latent diffusion: images are generated as VAE latents, then decoded
  5.2        "For DDIM, we achieved the lowest FID scores by adjusting the cfg scales around 3.0": DDIM with
             50 steps and guidance 3 is the base model's sampler (ddim, guided_denoiser)

  train.py's checkpoints as models: load_diffusion (UNet + text encoder + VAE), load_vae, Denoiser
  5.4        plugins trained on the base, used on any checkpoint: a style LoRA, an edge adapter, inpainting
             (Pipeline.load_lora / load_adapter / latents(cond=, init=, mask=, strength=); plugins.py)

Run it:
  python sample.py --ckpt out/tiny/diffusion.pt --prompt "a red circle on a blue background" --steps 50 --guidance 3 --seed 0
  python sample.py --ckpt out/tiny/ufogen.pt --prompt "..."              # one step, no CFG (the checkpoint's defaults)
  python sample.py --ckpt out/tiny/ufogen.pt --lora out/tiny/lora.pt --prompt "a red circle on a blue background in outlined style"
  python sample.py --ckpt out/tiny/ufogen.pt --adapter out/tiny/adapter.pt --cond edges.png --prompt "..."
  python sample.py --ckpt out/tiny/ufogen.pt --init image.png --mask mask.png --steps 4 --prompt "..."
  python sample.py --diffusers path/to/stable-diffusion-v1-5 --prompt "..."  # SD-1.5 from its local folder:
                                                   # DDIM 50 steps, CFG 7.5, its own eps-prediction schedule
"""

import argparse
import dataclasses
import importlib.util
import itertools
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

import config
import data
import md
import plugins
import pretrained
import vae as vae_lib

# ----------------------------------------------------------------------------------------------------
# Noise schedule and parameterisation
# ----------------------------------------------------------------------------------------------------
#
# Forward process: x_t = alpha_t x_0 + sigma_t eps, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).
# This project's schedule (ScheduleConfig's defaults): SD's "scaled linear" betas (sqrt(beta) linear from
# sqrt(0.00085) to sqrt(0.012), T = 1000), rescaled so that the last step has zero SNR (Lin et al. 2024,
# "Common diffusion noise schedules and sample steps are flawed"): abar_T = 0, so x_T is pure noise, exactly
# what sampling starts from.
# Prediction: v = alpha_t eps - sigma_t x_0 (Salimans & Ho 2022). Then x0 = alpha_t x_t - sigma_t v, which
# at t = T (alpha = 0, sigma = 1) is x0 = -v: a bounded, well-conditioned read-out. With eps-prediction
# x0 = (x_t - sigma eps) / alpha divides by alpha_T ~ 0 there, and the one-step generator of 4 (UFOGen),
# initialised from this model and asked for x0 from pure noise, would start from garbage.
# A pretrained Stable Diffusion 1.5 (pretrained.py) is the other setting, read from its folder's
# scheduler/scheduler_config.json (schedule_from_diffusers): eps-prediction on the plain scaled-linear
# schedule (abar_999 = 0.0047, not 0), sampled with "leading" spacing (steps_offset 1, set_alpha_to_one
# false). Every sampler, loss and read-out below takes the schedule dict, whose "cfg" says which.

T = 1000


@dataclass
class ScheduleConfig:
    T: int = 1000                    # training timesteps
    beta_start: float = 0.00085      # SD's betas
    beta_end: float = 0.012
    betas: str = "scaled_linear"     # "scaled_linear" (sqrt(beta) linear, SD) | "linear" (DDPM)
    zero_terminal_snr: bool = True   # Lin et al. 2024's rescale (abar_T = 0); SD-1.5: false
    prediction: str = "v"            # what the UNet outputs: "v" (this project) | "epsilon" (SD-1.5)
    spacing: str = "trailing"        # the sampling timesteps (Lin et al. 2024, Table 2): "trailing" (first step at
                                     # T-1; one-step models need it) | "leading" (SD-1.5) | "linspace"
    steps_offset: int = 0            # added to "leading" timesteps (SD-1.5: 1)
    set_alpha_to_one: bool = True    # the last DDIM step lands on abar = 1 (the model's x0) or on abar_0 (SD-1.5)


def validate_schedule(cfg: ScheduleConfig, where: str = "ScheduleConfig") -> None:
    for field, allowed in (("betas", ("scaled_linear", "linear")), ("prediction", ("v", "epsilon")),
                           ("spacing", ("trailing", "leading", "linspace"))):
        if getattr(cfg, field) not in allowed:
            raise ValueError(f"{where}: {field} = {getattr(cfg, field)!r}, expected one of {allowed}")
    if cfg.T < 2 or not 0 < cfg.beta_start < cfg.beta_end < 1 or not 0 <= cfg.steps_offset < cfg.T:
        raise ValueError(f"{where}: T = {cfg.T}, betas {cfg.beta_start} .. {cfg.beta_end}, steps_offset "
                         f"{cfg.steps_offset}: expected T >= 2, 0 < beta_start < beta_end < 1, 0 <= offset < T")
    if cfg.zero_terminal_snr and cfg.prediction == "epsilon":
        raise ValueError(f"{where}: zero_terminal_snr with epsilon-prediction: x0 = (x_T - eps) / alpha_T divides "
                         f"by alpha_T = 0; use v-prediction (Lin et al. 2024)")


def make_schedule(cfg: ScheduleConfig | None = None) -> dict:
    """The schedule as a dict of (T,) tensors plus its config: abar_t, alpha_t, sigma_t, and "cfg"."""
    cfg = cfg or ScheduleConfig()
    validate_schedule(cfg)
    if cfg.betas == "scaled_linear":
        betas = torch.linspace(cfg.beta_start ** 0.5, cfg.beta_end ** 0.5, cfg.T, dtype=torch.float64) ** 2
    else:
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, cfg.T, dtype=torch.float64)
    alphas_cumprod = torch.cumprod(1 - betas, 0)                   # abar_t
    sqrt_ab = alphas_cumprod.sqrt()
    if cfg.zero_terminal_snr:
        # Lin et al. 2024, Alg. 1: shift and scale sqrt(abar) so the last one is 0, the first kept.
        first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
        sqrt_ab = (sqrt_ab - last) * first / (first - last)
        alphas_cumprod = sqrt_ab ** 2
    return {
        "alphas_cumprod": alphas_cumprod.float(),                 # abar_t, t = 0 .. T-1
        "alpha": sqrt_ab.float(),                                 # alpha_t = sqrt(abar_t)
        "sigma": (1 - alphas_cumprod).sqrt().float(),             # sigma_t = sqrt(1 - abar_t)
        "cfg": cfg,
    }


def schedule_config(conf: dict) -> ScheduleConfig:
    """The schedule a checkpoint's saved config names (checkpoints from before it was saved: the defaults)."""
    return config.config_from_dict(ScheduleConfig, conf.get("schedule", {}))


def schedule_from_diffusers(folder: str) -> ScheduleConfig:
    """A diffusers scheduler_config.json (DDIM, PNDM, Euler, ... all share these fields) as a ScheduleConfig.
    What this project cannot reproduce (trained_betas, cosine betas, sample-prediction, clipping or
    thresholding of x0) is refused, naming the field."""
    folder, dc = config.read_diffusers_config(folder, "scheduler", "scheduler", "scheduler_config.json")
    where = os.path.join(folder, "scheduler_config.json")
    betas = {"scaled_linear": "scaled_linear", "linear": "linear"}.get(dc.get("beta_schedule", "linear"))
    prediction = {"epsilon": "epsilon", "v_prediction": "v"}.get(dc.get("prediction_type", "epsilon"))
    for field, bad in (("beta_schedule", betas is None), ("prediction_type", prediction is None),
                       ("trained_betas", dc.get("trained_betas") is not None),
                       ("clip_sample", dc.get("clip_sample", False)), ("thresholding", dc.get("thresholding", False)),
                       ("timestep_spacing",
                        dc.get("timestep_spacing", "leading") not in ("leading", "trailing", "linspace"))):
        if bad:
            raise ValueError(f"{where}: {field} = {dc.get(field)!r} is not supported (expected scaled_linear / linear "
                             f"betas, epsilon / v_prediction, no trained_betas, clip_sample or thresholding)")
    cfg = ScheduleConfig(T=dc.get("num_train_timesteps", 1000), beta_start=dc.get("beta_start", 0.0001),
                         beta_end=dc.get("beta_end", 0.02), betas=betas,
                         zero_terminal_snr=bool(dc.get("rescale_betas_zero_snr", False)), prediction=prediction,
                         spacing=dc.get("timestep_spacing", "leading"), steps_offset=dc.get("steps_offset", 0),
                         set_alpha_to_one=dc.get("set_alpha_to_one", True))
    validate_schedule(cfg, where)
    return cfg


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """values[t] broadcast to like's shape: (B,) -> (B, 1, 1, 1)."""
    return values.to(like.device)[t.long()].view(-1, *([1] * (like.ndim - 1))).to(like.dtype)


def q_sample(sched: dict, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Forward process q(x_t | x_0): x_t = alpha_t x_0 + sigma_t eps."""
    return _at(sched["alpha"], t, x0) * x0 + _at(sched["sigma"], t, x0) * eps


def v_target(sched: dict, x0, t, eps) -> torch.Tensor:
    """v = alpha_t eps - sigma_t x_0."""
    return _at(sched["alpha"], t, x0) * eps - _at(sched["sigma"], t, x0) * x0


def prediction_target(sched: dict, x0, t, eps) -> torch.Tensor:
    """What the network is trained to output: v (v_target) or eps itself, as the schedule's cfg says."""
    return eps if sched["cfg"].prediction == "epsilon" else v_target(sched, x0, t, eps)


def loss_weight(sched: dict, t: torch.Tensor, min_snr: float, like: torch.Tensor) -> torch.Tensor:
    """Per-sample weight of the MSE: 1 (min_snr = 0), or min-SNR-gamma (Hang et al. 2023), the weight that turns
    each parameterisation's loss into min(SNR_t, gamma) ||x0 - x0'||^2 up to a constant, so the easy low-noise
    steps stop dominating the gradient:
      v-prediction:   min(SNR_t + 1, gamma) / (SNR_t + 1) = min(1, gamma sigma_t^2). (The paper's printed form,
                      min(SNR, gamma) / (SNR + 1), is 0 at t = T, where zero terminal SNR puts the step that
                      chooses colour and layout; the +1 keeps it at 1.)
      eps-prediction: min(SNR_t, gamma) / SNR_t = min(1, gamma / SNR_t)."""
    if min_snr <= 0:
        return torch.ones_like(_at(sched["sigma"], t, like))
    a, s = _at(sched["alpha"], t, like), _at(sched["sigma"], t, like)
    if sched["cfg"].prediction == "epsilon":
        return (min_snr * s.square() / a.square()).clamp(max=1.0)
    return (min_snr * s.square()).clamp(max=1.0)


def diffusion_loss(sched: dict, pred: torch.Tensor, x0, t, eps, min_snr: float) -> torch.Tensor:
    """The loss of every stage that trains the denoiser (diffusion, and the 5.4 plugins on the frozen base): the
    MSE against prediction_target, per sample weighted by loss_weight (min-SNR-gamma, or 1), in fp32."""
    err = (pred.float() - prediction_target(sched, x0, t, eps)).square()
    return (loss_weight(sched, t, min_snr, err) * err).mean()


def x0_from_v(sched: dict, x_t, t, v) -> torch.Tensor:
    """x_0 = alpha_t x_t - sigma_t v (exact for alpha^2 + sigma^2 = 1)."""
    return _at(sched["alpha"], t, x_t) * x_t - _at(sched["sigma"], t, x_t) * v


def x0_from_output(sched: dict, x_t, t, out) -> torch.Tensor:
    """The network's output as x_0: x0_from_v, or x_0 = (x_t - sigma_t eps) / alpha_t for eps-prediction."""
    if sched["cfg"].prediction == "epsilon":
        return (x_t - _at(sched["sigma"], t, x_t) * out) / _at(sched["alpha"], t, x_t)
    return x0_from_v(sched, x_t, t, out)


def eps_from_x0(sched: dict, x_t, t, x0) -> torch.Tensor:
    """eps = (x_t - alpha_t x_0) / sigma_t; sigma_t > 0 at every t of both schedules (sigma_0 = 0.029)."""
    return (x_t - _at(sched["alpha"], t, x_t) * x0) / _at(sched["sigma"], t, x_t)


# ----------------------------------------------------------------------------------------------------
# Denoisers: x0 = denoise(x_t, t). Every sampler takes one, so CFG, LoRA, adapters or a one-step
# generator plug in without the samplers knowing.
# ----------------------------------------------------------------------------------------------------

def guided_denoiser(unet, sched: dict, context: torch.Tensor, uncond: torch.Tensor, scale: float):
    """Classifier-free guidance (Ho & Salimans 2022): out = out_uncond + s (out_cond - out_uncond) on the
    network's output (v or eps; linear, so either is the same guided x0), conditional and unconditional halves
    in one batch. 5.2: s ~ 3 gives the best FID for MD. s = 1 is the plain model."""
    def denoise(x, t):
        if scale == 1.0:
            out = unet(x, t, context)
        else:
            out_u, out_c = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, context])).chunk(2)
            out = out_u + scale * (out_c - out_u)
        return x0_from_output(sched, x, t, out)
    return denoise


# ----------------------------------------------------------------------------------------------------
# Samplers: sampler(denoise, x_T, sched, steps, generator=None, t_start=None, **options) -> x_0
# (x is x_{t_start}, pure noise by default)
# ----------------------------------------------------------------------------------------------------

def trailing_timesteps(steps: int, T: int = T, t_start: int | None = None) -> list[int]:
    """'Trailing' spacing (Lin et al. 2024, Table 2): the first step is always t = T-1 (pure noise under the
    zero-terminal-SNR schedule), so 1 step means one evaluation at the last timestep. t_start < T-1 starts
    lower, for image-to-image and inpainting (SDEdit, Meng et al. 2022): `steps` steps spaced over [0, t_start]."""
    n = T if t_start is None else t_start + 1
    if not 1 <= n <= T:
        raise ValueError(f"t_start = {t_start}: expected 0 .. {T - 1}")
    if not 1 <= steps <= n:
        raise ValueError(f"steps = {steps}: expected 1 .. {n}")
    return [int(round(n - i * n / steps)) - 1 for i in range(steps)]


def timesteps(sched: dict, steps: int, t_start: int | None = None) -> list[int]:
    """The sampling timesteps, high to low, in the schedule's spacing (diffusers' DDIMScheduler.set_timesteps):
    trailing (trailing_timesteps), leading (0, r, 2r, ... reversed, r = T // steps, plus steps_offset: SD-1.5's
    1, 21, ..., 981 at 50 steps) or linspace (round(linspace(0, T-1, steps)) reversed). With t_start, the same
    spacing over [0, t_start] instead of [0, T-1] (image-to-image)."""
    cfg, n_t = sched["cfg"], len(sched["alpha"])
    if cfg.spacing == "trailing":
        return trailing_timesteps(steps, n_t, t_start)
    n = n_t if t_start is None else t_start + 1
    if not 1 <= n <= n_t or not 1 <= steps <= n:
        raise ValueError(f"steps = {steps}, t_start = {t_start}: expected 1 <= steps <= t_start + 1 <= {n_t}")
    if cfg.spacing == "leading":
        return [min(i * (n // steps) + cfg.steps_offset, n - 1) for i in reversed(range(steps))]
    return [int(v) for v in np.linspace(0, n - 1, steps).round()[::-1]]


def final_alpha_sigma(sched: dict) -> tuple[float, float]:
    """Where the last DDIM step lands: abar = 1 (the model's x0; this project) or abar_0 (set_alpha_to_one
    false, SD-1.5's scheduler: one more small step of noise, sigma_0 = 0.029, kept in the sample)."""
    if sched["cfg"].set_alpha_to_one:
        return 1.0, 0.0
    return float(sched["alpha"][0]), float(sched["sigma"][0])


@torch.no_grad()
def ddim(denoise, x, sched: dict, steps: int = 50, generator=None, eta: float = 0.0, t_start=None):
    """DDIM (Song et al. 2021, Eq. 12): x_{t'} = alpha_{t'} x0 + sqrt(sigma_{t'}^2 - s^2) eps + s z, with
    s = eta * sqrt((sigma_{t'}^2 / sigma_t^2)(1 - alpha_t^2 / alpha_{t'}^2)). eta = 0: deterministic; eta = 1:
    DDPM-like. t' is the next of `timesteps` (diffusers: t - T // steps, the same whenever steps divides T);
    after the last step (t' = "-1") it lands where final_alpha_sigma says, the predicted x0 by default."""
    ts = timesteps(sched, steps, t_start)
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = denoise(x, tt)
        last = i == len(ts) - 1
        if last and sched["cfg"].set_alpha_to_one:
            return x0
        eps = eps_from_x0(sched, x, tt, x0)
        a_t, s_t = float(sched["alpha"][t]), float(sched["sigma"][t])
        if last:                                                  # SD-1.5: land on abar_0, deterministically
            a_p, s_p = final_alpha_sigma(sched)
            return a_p * x0 + s_p * eps
        a_p, s_p = float(sched["alpha"][ts[i + 1]]), float(sched["sigma"][ts[i + 1]])
        s = eta * math.sqrt(max(s_p ** 2 / s_t ** 2 * (1 - a_t ** 2 / a_p ** 2), 0.0)) if eta > 0 else 0.0
        x = a_p * x0 + math.sqrt(max(s_p ** 2 - s ** 2, 0.0)) * eps
        if s > 0:
            x = x + s * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def ddpm(denoise, x, sched: dict, steps: int = T, generator=None, t_start=None):
    """Ancestral DDPM (Ho et al. 2020, Alg. 2) on a trailing sub-sequence of timesteps: sample
    x_{t'} ~ q(x_{t'} | x_t, x0) with the posterior of the forward process; the reference sampler."""
    ts = timesteps(sched, steps, t_start)
    ab = sched["alphas_cumprod"]
    for i, t in enumerate(ts):
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        x0 = denoise(x, tt)
        if i == len(ts) - 1:
            return x0
        p = ts[i + 1]
        ab_t, ab_p = float(ab[t]), float(ab[p])
        beta = 1 - ab_t / ab_p                                    # the effective beta between t and t'
        mean = (ab_p ** 0.5 * beta / (1 - ab_t)) * x0 + ((1 - beta) ** 0.5 * (1 - ab_p) / (1 - ab_t)) * x
        var = beta * (1 - ab_p) / (1 - ab_t)                      # posterior variance (DDPM Eq. 7)
        x = mean + var ** 0.5 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


@torch.no_grad()
def renoise(denoise, x, sched: dict, steps: int = 1, generator=None, t_start=None):
    """UFOGen's sampler (4.1; Xu et al. 2023): predict x0 = G(x_t, t), then re-noise it to the next timestep
    with fresh noise, x_{t'} = q(x_{t'} | x0); steps = 1 is one-step generation from pure noise at t = T-1.
    With a diffusion model's denoiser this is the blurry E[x0 | x_T] of 4.2 at one step."""
    ts = timesteps(sched, steps, t_start)
    for i, t in enumerate(ts):
        x0 = denoise(x, torch.full((x.shape[0],), t, device=x.device, dtype=torch.long))
        if i == len(ts) - 1:
            return x0
        nxt = torch.full((x.shape[0],), ts[i + 1], device=x.device, dtype=torch.long)
        x = q_sample(sched, x0, nxt, torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype))


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "renoise": renoise}


# ----------------------------------------------------------------------------------------------------
# Checkpoints of train.py as models: the diffusion model (UNet + text encoder) and the VAE
# ----------------------------------------------------------------------------------------------------

def load_vae(path: str) -> vae_lib.VAE:
    """A VAE from a vae.pt / decoder.pt checkpoint (config stored inside)."""
    ck = config.load_checkpoint(path)
    if "vae" not in ck.get("config", {}):
        raise ValueError(f"{path}: not a VAE checkpoint (no config['vae']); it was written by stage {ck.get('stage')!r}")
    model = vae_lib.VAE(config.config_from_dict(vae_lib.VAEConfig, ck["config"]["vae"]))
    model.load_state_dict(config.refuse_non_finite(ck["model"], path, "model"), source=path)
    return model.eval()


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


def denoiser_weights(ck: dict, key: str, path: str) -> dict:
    """A checkpoint's Denoiser weights ("model" or "ema"), with the LoRA of a LoRA generator folded in
    (train_utils.save_generator keeps it unmerged), refused if not finite."""
    state = config.refuse_non_finite(ck[key], path, key)
    return plugins.fold_lora_state(state, ck["lora_scale"]) if ck.get("lora_scale") else state


def load_denoiser_state(model: Denoiser, state: dict, source: str, assign: bool = False) -> None:
    """Load a Denoiser state; only the weights of a text encoder read from a folder may be absent. assign: the
    model takes the state's tensors instead of copying them (load_diffusion's meta-device model)."""
    missing, unexpected = model.load_state_dict(state, strict=False, assign=assign)
    missing = [k for k in missing if not (model.text.source and k.startswith("text."))]
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not fit this model: missing {missing[:4]}, unexpected {unexpected[:4]}")


def trainable_state(model: Denoiser) -> dict:
    """The Denoiser's weights, without a text encoder read from a local folder (real CLIP reloads from there)."""
    return {k: v for k, v in model.state_dict().items() if not (model.text.source and k.startswith("text."))}


def load_diffusion(path: str, ema: bool = True):
    """(unet, vae, text_encoder, saved config dict) from a diffusion.pt written by the diffusion stage (or a
    ufogen.pt / distill.pt, which share its format), from its inference weights (<stage>.safetensors,
    save_weights), or from a diffusers Stable Diffusion pipeline folder (pretrained.py; its
    scheduler_config.json becomes conf["schedule"]). The UNet and VAE are built without memory (on the meta
    device) and take the file's memory-mapped tensors as their own (assign), so loading costs about the
    model's size in RAM, once: no random initialisation, no second copy."""
    if os.path.isdir(path):
        unet, vae, text, conf = pretrained.load_models(path)
        conf["schedule"] = dataclasses.asdict(schedule_from_diffusers(path))
        return unet, vae, text, conf
    den, vae_state, conf = read_denoiser(path, ema)
    vae_state = config.refuse_non_finite(vae_state, path, "vae")
    unet_cfg, tcfg = config.config_from_dict(md.UNetConfig, conf["unet"]), config.config_from_dict(md.TextConfig, conf["text"])
    vcfg, tr = config.config_from_dict(vae_lib.VAEConfig, conf["vae"]), conf["train"]
    text = md.TextEncoder.from_pretrained(tr["text_encoder"]) if tr.get("text_encoder") else md.TextEncoder(tcfg)
    with torch.device("meta"):                                    # shapes only: the weights come from the file
        model, vae = Denoiser(md.UNet(unet_cfg), text), vae_lib.VAE(vcfg)
    load_denoiser_state(model, den, path, assign=True)
    vae.load_state_dict(vae_state, assign=True)
    left = [n for n, t in itertools.chain(model.named_parameters(), model.named_buffers(), vae.named_parameters(),
                                          vae.named_buffers()) if t.is_meta]
    if left:
        raise ValueError(f"{path}: no weights for {left[:4]}")
    return model.unet.eval(), vae.eval(), model.text.eval(), conf


def read_denoiser(path: str, ema: bool = True) -> tuple[dict, dict, dict]:
    """(the Denoiser's state, the VAE's state, the saved config) of a diffusion.pt / ufogen.pt / distill.pt
    (its EMA or raw weights, a LoRA folded in) or of its inference weights (already the EMA's), memory-mapped:
    what load_diffusion builds the networks from and what --init_from starts a finetune from."""
    if is_weights_file(path):
        tensors, conf = read_weights(path)
        return (*split_weights(tensors), conf)
    ck = config.load_checkpoint(path)
    conf = ck.get("config", {})
    if "unet" not in conf:
        raise ValueError(f"{path}: not a diffusion checkpoint (stage {ck.get('stage')!r}, no config['unet'])")
    return denoiser_weights(ck, "ema" if ema else "model", path), ck["vae"], conf


# ----------------------------------------------------------------------------------------------------
# Inference weights: what sampling needs and nothing else (no discriminator, optimisers or raw weights)
# ----------------------------------------------------------------------------------------------------

WEIGHTS_FORMAT = "mobilediffusion-weights/1"


def weights_path(ckpt: str) -> str:
    """Where the inference weights of a train.py checkpoint go: <stage>.safetensors beside it, or
    <stage>.weights.pt where the optional safetensors package is missing."""
    stem = os.path.splitext(ckpt)[0]
    return stem + (".safetensors" if importlib.util.find_spec("safetensors") else ".weights.pt")


def is_weights_file(path: str) -> bool:
    return path.endswith((".safetensors", ".weights.pt")) and os.path.isfile(path)


def save_weights(path: str, unet: md.UNet, vae, text: md.TextEncoder, conf: dict) -> None:
    """The sampler's EMA weights (UNet, a trained text encoder; a CLIP read from a folder is named in conf
    and reloads from there), the whole VAE (the decoder samples, the encoder serves image-to-image and
    inpainting) and the configs (what load_diffusion reads: unet, text, vae, train, schedule) in one file,
    written atomically. safetensors keeps the configs as JSON in its header's metadata; a 386M md model
    is then 1.5 GB of fp32 weights (+ its VAE) instead of a ufogen.pt's ~10 GB."""
    tensors = {**trainable_state(Denoiser(unet, text)), **{f"vae.{k}": v for k, v in vae.state_dict().items()}}
    if path.endswith(".safetensors"):
        st = config.need("safetensors.torch", "safetensors")
        meta = {"format": WEIGHTS_FORMAT, "config": json.dumps(conf)}
        config.save_checkpoint(path, {k: v.contiguous() for k, v in tensors.items()},
                               write=lambda obj, tmp: st.save_file(obj, tmp, metadata=meta))
    else:
        config.save_checkpoint(path, {"format": WEIGHTS_FORMAT, "config": conf, "weights": tensors})


def split_weights(tensors: dict) -> tuple[dict, dict]:
    """A weights file's tensors as (the Denoiser's state, the VAE's state)."""
    den = {k: v for k, v in tensors.items() if not k.startswith("vae.")}
    return den, {k[len("vae."):]: v for k, v in tensors.items() if k.startswith("vae.")}


def saved_config(path: str) -> dict:
    """The config dict of a train.py checkpoint or of its inference weights."""
    return read_weights(path)[1] if is_weights_file(path) else config.load_checkpoint(path).get("config", {})


def read_weights(path: str) -> tuple[dict, dict]:
    """(tensors, config) of a save_weights file, memory-mapped; refused if not one or not finite."""
    if path.endswith(".safetensors"):
        tensors, meta = config.load_safetensors(path, metadata=True)
        fmt, conf = meta.get("format"), json.loads(meta.get("config", "{}"))
    else:
        ck = config.load_checkpoint(path)
        fmt, conf, tensors = ck.get("format"), ck.get("config", {}), ck.get("weights", {})
    if fmt != WEIGHTS_FORMAT:
        raise ValueError(f"{path}: not a MobileDiffusion weights file (format {fmt!r}, expected {WEIGHTS_FORMAT!r}; "
                         f"train.py --export_weights writes one)")
    return config.refuse_non_finite(tensors, path), conf


# ----------------------------------------------------------------------------------------------------
# The text-to-image pipeline
# ----------------------------------------------------------------------------------------------------

class Pipeline:
    """prompts -> PIL images: text encoder -> sampler over the UNet in latent space -> VAE decoder.
        pipe = Pipeline.from_checkpoint("out/tiny/diffusion.pt")
        images = pipe(["a red circle on a blue background"], steps=50, guidance_scale=3.0, seed=0)
    5.4's plugins, on a base or a one-step checkpoint alike (plugins.py):
        pipe.load_lora("out/tiny/lora.pt", scale=1.0)                  # style LoRA, folded into the UNet
        pipe.load_adapter("out/tiny/adapter.pt"); pipe(prompts, cond=edge_map)   # structure control
        pipe(prompts, init=image, mask=mask)                              # inpainting (mask 1 = regenerate)"""

    def __init__(self, unet, vae, text_encoder, sched: dict | None = None, device: str = "cpu", resolution: int = 512):
        self.unet, self.vae, self.text_encoder = unet.eval(), vae.eval(), text_encoder.eval()
        self.sched = sched or make_schedule()
        self.device, self.resolution = device, resolution
        self.adapter, self.stage = None, "diffusion"            # stage: which train.py stage made the UNet

    @classmethod
    def from_checkpoint(cls, path: str, device: str = "cpu", ema: bool = True,
                        resolution: int | None = None) -> "Pipeline":
        """A train.py checkpoint (diffusion.pt, ufogen.pt, distill.pt) or a diffusers pipeline folder; resolution:
        the default image size (else the one it was trained at: SD-1.5's folder says 512)."""
        unet, vae, text, conf = load_diffusion(path, ema=ema)
        pipe = cls(unet.to(device), vae.to(device), text.to(device), make_schedule(schedule_config(conf)), device,
                   resolution=resolution or conf["train"].get("resolution", 512))
        pipe.stage = "sd" if conf["train"].get("diffusers") else conf["train"].get("stage", "diffusion")
        return pipe

    @classmethod
    def from_diffusers(cls, folder: str, device: str = "cpu") -> "Pipeline":
        """A Stable Diffusion 1.x folder as StableDiffusionPipeline.save_pretrained writes it (pretrained.py):
        its UNet, VAE, CLIP and scheduler config; sampled like diffusers' pipeline with a DDIMScheduler."""
        pretrained.check_pipeline_folder(folder)
        return cls.from_checkpoint(folder, device)

    def load_lora(self, path: str, scale: float = 1.0) -> "Pipeline":
        """A style LoRA trained on the base model (train.py --stage lora), folded into this UNet with `scale`."""
        plugins.load_lora(self.unet, path, scale)
        return self

    def load_adapter(self, path: str) -> "Pipeline":
        """A T2I-Adapter trained on the base model (train.py --stage adapter); used when latents() gets cond."""
        self.adapter = plugins.load_adapter(path, self.unet).to(self.device)
        return self

    def _per_image(self, name: str, x, n: int, channels: int, height: int, width: int):
        """A per-image input (cond, init, mask) as (n, channels, height, width) on the device, one image
        broadcast to all; a clear error when its size is not the generated images'."""
        if x is None:
            return None
        x = x[None] if x.ndim == 3 else x
        if x.ndim != 4 or x.shape[1] != channels or tuple(x.shape[-2:]) != (height, width) or x.shape[0] not in (1, n):
            raise ValueError(f"{name}: expected ({n}{' or 1' if n > 1 else ''}, {channels}, {height}, {width}) to match "
                             f"the generated images, got {tuple(x.shape)}")
        return x.to(self.device).expand(n, -1, -1, -1)

    @torch.no_grad()
    def latents(self, prompts, steps=50, guidance_scale=3.0, seed=0, height=None, width=None,
                negative_prompt="", sampler="ddim", eta=0.0, cond=None, adapter_scale=1.0,
                init=None, mask=None, strength=1.0, latents=None):
        """The sampled latents (B, c, H/8, W/8), unscaled (ready for vae.decode).
        latents (B, c, H/8, W/8): the initial noise x_T in the scaled latent space, instead of drawing it from
        `seed` (diffusers' pipelines take the same argument; the seed still drives eta > 0 and re-noising).
        cond (B|1, 1, H, W): an edge map for the loaded adapter (5.4 structure control).
        init (B|1, 3, H, W) in [-1, 1]: start from it noised to t = strength * T (image-to-image, SDEdit);
        with mask (B|1, 1, H, W), 1 = regenerate, 0 = keep: inpainting (plugins.inpaint_denoiser)."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        n, f = len(prompts), self.vae.cfg.factor
        height = height or self.resolution
        width = width or height
        if height % f or width % f:
            raise ValueError(f"height/width = {height}/{width} must be divisible by {f}")
        if not 0 < strength <= 1:
            raise ValueError(f"strength = {strength}: expected 0 < strength <= 1")
        if init is None and (mask is not None or strength < 1):
            raise ValueError("mask and strength < 1 need an init image")
        cond, init, mask = (self._per_image(k, v, n, c, height, width)
                            for k, v, c in (("cond", cond, 1), ("init", init, 3), ("mask", mask, 1)))
        g = torch.Generator(self.device).manual_seed(seed)
        shape = (n, self.unet.cfg.in_channels, height // f, width // f)
        x = torch.randn(shape, generator=g, device=self.device)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents: expected {shape} for {n} prompt(s) at {height}x{width}, got "
                                 f"{tuple(latents.shape)}")
            x = latents.to(self.device, torch.float32)
        ctx = self.text_encoder(prompts)
        negs = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
        uncond = self.text_encoder(negs)
        unet = self.unet
        if cond is not None:
            if self.adapter is None:
                raise ValueError("cond given, but no adapter loaded (Pipeline.load_adapter)")
            unet = plugins.with_features(self.unet, self.adapter(cond), adapter_scale)
        denoise = guided_denoiser(unet, self.sched, ctx, uncond, guidance_scale)
        t_start = None
        if init is not None:
            z_init = self.vae.encode(init).mode() * self.vae.cfg.scaling_factor         # (B, c, H/8, W/8)
            if mask is not None:
                denoise = plugins.inpaint_denoiser(denoise, z_init, plugins.latent_keep(mask, f))
            if strength < 1:
                t_start = int(round(strength * len(self.sched["alpha"]))) - 1   # x_{t_start} ~ q(. | z_init)
                tt = torch.full((n,), t_start, device=self.device, dtype=torch.long)
                x = q_sample(self.sched, z_init, tt, x)
        kwargs = {"eta": eta} if sampler == "ddim" else {}
        z = SAMPLERS[sampler](denoise, x, self.sched, steps, generator=g, t_start=t_start, **kwargs)
        return z / self.vae.cfg.scaling_factor

    @torch.no_grad()
    def images(self, prompts, paste: bool = True, **kw) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1]. When inpainting, paste: the input's own pixels outside the mask (the
        decoder would blur them slightly; see plugins.py)."""
        img = self.vae.decode(self.latents(prompts, **kw))
        if paste and kw.get("mask") is not None:
            m = self._per_image("mask", kw["mask"], img.shape[0], 1, *img.shape[-2:])
            img = m * img + (1 - m) * self._per_image("init", kw["init"], img.shape[0], 3, *img.shape[-2:])
        return img

    def __call__(self, prompts, **kw):
        return [data.to_pil(im) for im in self.images(prompts, **kw)]


# The samplers of Table 2 (and the abstract's 8 steps) by name, as Pipeline keyword arguments: sample.py's
# defaults per kind of checkpoint, evaluate.py's --sampler and plugins.py's models all read them from here.
SAMPLING = {
    "ddim50": dict(steps=50, guidance_scale=3.0, sampler="ddim"),        # 5.2: DDIM 50 steps, CFG ~3
    "eight_step": dict(steps=8, guidance_scale=1.0, sampler="ddim"),     # the distilled student, CFG folded in
    "onestep": dict(steps=1, guidance_scale=1.0, sampler="renoise"),     # UFOGen: one step, no CFG (5.2)
    "sd": dict(steps=50, guidance_scale=7.5, sampler="ddim"),            # a diffusers SD folder: its pipeline's
}                                                                        # defaults
STAGE_SAMPLING = {"ufogen": "onestep", "distill": "eight_step",        # what each checkpoint was made for;
                  "sd": "sd"}                                            # any other: ddim50


def read_image(path: str, flag: str, size: int, kind: str) -> torch.Tensor:
    """A PNG/JPEG given on the command line as (1, C, size, size): kind "rgb" -> [-1, 1]; "gray" (an edge map or
    a mask, white = 1) -> {0, 1}. Refuses a file of another size rather than resizing it silently."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag} {path}: no such file")
    try:
        im = Image.open(path)
        im.load()
    except OSError as e:                                          # PIL.UnidentifiedImageError, truncated files
        raise ValueError(f"{flag} {path}: not a readable image ({e})") from None
    with im:
        if im.size != (size, size):
            raise ValueError(f"{flag} {path}: {im.width}x{im.height} pixels, expected {size}x{size} (the generated images' size; "
                             f"set --resolution or resize the file)")
        arr = torch.from_numpy(np.asarray(im.convert("RGB" if kind == "rgb" else "L"), dtype="float32").copy())
    if kind == "rgb":
        return (arr.permute(2, 0, 1) / 127.5 - 1)[None]
    return (arr > 127).float()[None, None]


def check_args(p: argparse.ArgumentParser, args) -> None:
    """Refuse bad values before loading anything or sampling (argparse's one-line error, exit status 2)."""
    if args.n < 1:
        p.error(f"--n {args.n}: expected >= 1 image per prompt")
    if args.steps is not None and args.steps < 1:
        p.error(f"--steps {args.steps}: expected >= 1")
    for name in ("guidance", "eta", "lora_scale", "adapter_scale", "strength"):   # nan / inf: black images
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            p.error(f"--{name} {value}: expected a finite number")
    if args.guidance is not None and args.guidance < 0:
        p.error(f"--guidance {args.guidance}: expected >= 0")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed {args.seed}: expected 0 <= seed < 2^32")
    if args.resolution is not None and (args.resolution <= 0 or args.resolution % 8):
        p.error(f"--resolution {args.resolution}: expected a positive multiple of 8")
    if not 0 < args.strength <= 1:
        p.error(f"--strength {args.strength}: expected 0 < strength <= 1")
    ext = os.path.splitext(args.out)[1].lower()
    if ext not in Image.registered_extensions():                  # checked now, not after minutes of sampling
        p.error(f"--out {args.out}: unknown image extension {ext or '(none)'!r}; use .png or .jpg")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.error(f"--out {args.out}: folder {folder} does not exist or is not writable")


def main(argv=None):
    p = argparse.ArgumentParser(description="Text-to-image with a trained MobileDiffusion checkpoint: writes the image "
                                            "(one) or a grid of them (several)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="a checkpoint written by train.py (diffusion.pt, ufogen.pt, distill.pt) or its "
                     "inference weights (<stage>.safetensors: loads in the model's size of RAM)")
    src.add_argument("--diffusers", help="a local Stable Diffusion 1.x folder in diffusers' save_pretrained layout")
    p.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--n", type=int, default=4, help="images per prompt")
    p.add_argument("--steps", type=int, default=None, help="default: 1 for ufogen.pt, 8 for distill.pt, else 50")
    p.add_argument("--guidance", type=float, default=None,
                   help="CFG scale; default 1 for ufogen/distill, 7.5 for --diffusers (diffusers'), else 3 (5.2)")
    p.add_argument("--sampler", default=None, choices=sorted(SAMPLERS), help="default: renoise for ufogen.pt, else ddim")
    p.add_argument("--eta", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resolution", type=int, default=None, help="default: the training resolution")
    p.add_argument("--no_ema", action="store_true", help="use the raw weights instead of the EMA")
    g = p.add_argument_group("5.4 plugins (trained on the base model, usable on any checkpoint of its architecture)")
    g.add_argument("--lora", default=None, help="a style LoRA file (train.py --stage lora)")
    g.add_argument("--lora_scale", type=float, default=1.0)
    g.add_argument("--adapter", default=None, help="a T2I-Adapter file (train.py --stage adapter)")
    g.add_argument("--cond", default=None, help="with --adapter: an edge map image (white edges on black)")
    g.add_argument("--edges_from", default=None, help="with --adapter: an image to take Sobel edges of instead")
    g.add_argument("--adapter_scale", type=float, default=1.0)
    g.add_argument("--init", default=None, help="an input image: inpainting with --mask, else image-to-image")
    g.add_argument("--mask", default=None, help="with --init: white = regenerate, black = keep")
    g.add_argument("--strength", type=float, default=1.0, help="with --init: start at t = strength * T (1 = from noise)")
    g.add_argument("--no_paste", action="store_true", help="inpainting: keep the decoder's pixels outside the mask too")
    p.add_argument("--out", default="samples.png")
    args = p.parse_args(argv)
    check_args(p, args)
    pipe = Pipeline.from_diffusers(args.diffusers) if args.diffusers else Pipeline.from_checkpoint(args.ckpt, ema=not args.no_ema)
    defaults = SAMPLING[STAGE_SAMPLING.get(pipe.stage, "ddim50")]
    sampler, steps, guidance = (args.sampler or defaults["sampler"], args.steps or defaults["steps"],
                                defaults["guidance_scale"] if args.guidance is None else args.guidance)
    size = args.resolution or pipe.resolution
    if args.lora:
        pipe.load_lora(args.lora, args.lora_scale)
    kw = {}
    if args.adapter:
        if bool(args.cond) == bool(args.edges_from):
            raise ValueError("--adapter needs exactly one of --cond (an edge map) or --edges_from (an image)")
        pipe.load_adapter(args.adapter)
        kw["cond"] = (read_image(args.cond, "--cond", size, "gray") if args.cond else
                      plugins.edges(read_image(args.edges_from, "--edges_from", size, "rgb"), pipe.adapter.edge_threshold))
        kw["adapter_scale"] = args.adapter_scale
    elif args.cond or args.edges_from:
        raise ValueError("--cond / --edges_from need --adapter")
    if args.init:
        kw["init"] = read_image(args.init, "--init", size, "rgb")
        kw["strength"] = args.strength
        if args.mask:
            kw["mask"] = read_image(args.mask, "--mask", size, "gray")
    elif args.mask:
        raise ValueError("--mask needs --init (the image to inpaint)")
    prompts = [q for q in args.prompt for _ in range(args.n)]
    imgs = pipe.images(prompts, steps=steps, guidance_scale=guidance, seed=args.seed, height=size,
                       negative_prompt=args.negative_prompt, sampler=sampler, eta=args.eta, paste=not args.no_paste, **kw)
    # One image is written at exactly the requested size; several as a grid (one row per prompt).
    (data.to_pil(imgs[0]) if len(imgs) == 1 else data.image_grid(imgs, nrow=args.n)).save(args.out)
    plug = ", ".join(x for x in (args.lora and f"LoRA {args.lora} x{args.lora_scale}", args.adapter and f"adapter {args.adapter}",
                                 args.init and ("inpainting" if args.mask else "image-to-image") + f" (strength {args.strength})") if x)
    print(f"wrote {args.out}: {len(args.prompt)} prompt(s) x {args.n}, {sampler} {steps} steps, guidance {guidance}"
          + (f"; {plug}" if plug else ""))


if __name__ == "__main__":
    config.run_cli(main)
