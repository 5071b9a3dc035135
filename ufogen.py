"""
One-step and few-step MobileDiffusion: Section 4 (UFOGen adversarial finetuning, its reconstruction term
and LoRA) and the abstract's 8-step distillation.

  4.1  UFOGen (Xu et al. 2023, the paper's [62]), Eq. 1: a generator G (initialised from the diffusion
       model) predicts x0' = G(x_t, t); a discriminator D (the same UNet, initialised from the same model)
       tells real x_{t-1} ~ q(x_{t-1} | x0) from fake x'_{t-1} ~ q(x_{t-1} | x0'), and "aggregates logits
       across output locations" (Discriminator, d_loss, g_adv_loss).
  4.2  the reconstruction term, a switch (UFOGenConfig.recon):
         "diffusion"  Eq. 1: lambda gamma_t ||x0 - x0'||^2
         "distill"    Eq. 2: ||sg(G_teacher(x_t, t)) - x0'||^2, a frozen copy of the base model
         "ema"        Eq. 3: ||sg(G_EMA(x_t, t)) - x0'||^2, an EMA of G (decay 1 = "distill")
       only Eq. 1 carries gamma_t, as printed (recon_gamma); lambda weighs whichever term is chosen.
  4.3  LoRA on G only, null-initialised, D fully trained (plugins.LoRA: the same LoRA as 5.4's style plugin)
  abstract  "distillation ... to achieve 8-step ... inference": guided DDIM-50 teacher -> 8-step student
       (DistillConfig, distill_target), one stage of TRACT-style transitive distillation (Berthelot et al. 2023)
       with classifier-free guidance folded into the student (Meng et al. 2023, the paper's [38]).
The training loops are train.py's train_ufogen and train_distill; Table 5 is report.py --table5.

Choices the paper leaves open, taken from UFOGen's public code (xuyanwu/SIDDMs-UFOGen, UFO_DiT/train_ufo.py)
unless said otherwise: t uniform in [1, T), t' = max(t - gap, 0); real and fake x_{t'} both built with
q_sample; non-saturating BCE with the logits clamped (real <= 0.5, fake >= -0.5 for D; fake <= 0.5 for G),
so neither player is pushed further once it wins by a margin; Adam lr 1e-4 for both, D with beta1 = 0;
gradient clip 1.0; EMA of G for sampling. Two places where that code and Eq. 1 as printed differ are switches:
D's time input (d_time: t' as in the code, or t as printed) and how often D steps (d_every: 1 = every step,
ours; 2 = every other step, the code's).

Run it:
  python train.py --stage ufogen --init_from out/tiny/diffusion.pt            # one-step model
  python train.py --stage ufogen --init_from out/tiny/diffusion.pt --ufogen_lora_rank 8 --ufogen_recon distill
  python train.py --stage distill --init_from out/tiny/diffusion.pt --distill_target_steps 8
  python report.py --table5                                                    # Table 5 at toy scale
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import md
import sample


@dataclass
class UFOGenConfig:
    recon: str = "diffusion"         # 4.2: "diffusion" (Eq. 1) | "distill" (Eq. 2) | "ema" (Eq. 3); 5.3 picks diffusion
    lam: float = 1.0                 # lambda of Eq. 1 (weight of the reconstruction term)
    adv: bool = True                 # Eq. 1's adversarial term; false = the reconstruction term alone, D neither
                                     # trained nor run (what the term buys: Table 5's "no adversarial term" row)
    gap: int = 250                   # t' = t - gap; UFOGen's released gap is T/4 (its "4 steps"); a flag to measure
    g_ema_decay: float = 0.99        # EMA of G: Eq. 3's G^EMA and the weights sampled from (UFOGen's code: 0.99)
    lora_rank: int = 0               # 4.3: LoRA rank on G (attention + feed-forward projections); 0 = full finetuning
    lora_alpha: float = 0.0          # LoRA scale alpha / rank; 0 = alpha = rank (scale 1)
    lora_convs: bool = False         # also put LoRA on the conv blocks' convolutions
    logit_clamp: float = 0.5         # UFOGen's BCE logit clamp (0 = off)
    d_lr_mult: float = 1.0           # D's learning rate relative to G's
    recon_guidance: float = 1.0      # CFG scale of the distill/ema target (1 = Eq. 2/3 as printed; > 1 folds
                                     # guidance into G, as for the 8-step student, Meng et al. [38])
    t_power: float = 1.0             # t = T u^(1/t_power), u ~ U(0,1): 1 = uniform (UFOGen); > 1 favours the large t
                                     # that one-step sampling starts from
    recon_gamma: str = "diffusion"   # which reconstruction terms are weighted by gamma_t: "diffusion" (as printed:
                                     # Eq. 1 has lambda gamma_t, Eq. 2/3 have no weight) | "all" (Eq. 2/3 too, up to
                                     # gamma ~ 566 at t = 1; this project's earlier runs) | "none"
    d_time: str = "t_prev"           # the time D is conditioned on: "t_prev" = D(x_{t'}, t') (UFOGen's code; D judges a
                                     # sample at the noise level it was made at) | "t" = D(x_{t'}, t), Eq. 1 as printed
    d_every: int = 1                 # update D every d_every steps: 1 = D and G every step, sharing one G forward;
                                     # 2 = UFOGen's code (D on even steps only, G on every step)


@dataclass
class DistillConfig:                 # train.py --stage distill; flags --distill_<field>
    target_steps: int = 8            # the student's number of steps (abstract: 8)
    teacher_steps: int = 50          # the guided DDIM teacher's steps (5.2: 50)
    guidance: float = 3.0            # the teacher's CFG scale (5.2: ~3), folded into the student (Meng et al. [38])


# Presets, chosen by train.py's --preset (flags still override each field). "paper" is UFOGen's released
# recipe. "tiny" is what makes one step work in a few hundred steps on 2 cores (measured: docs/results.md):
# with the zero-terminal-SNR schedule, x_{t'} for t' = t - 250 is almost pure noise whenever t is large
# (at t' = 749, alpha = 0.18), so D cannot see what is wrong with G(x_T) -- its loss stays at 2 ln 2 -- while
# uniform t spends most of G's updates at small t, which one-step sampling never visits. Drawing t near T
# (t_power 4: 68% of t above 0.75 T) with t' = t - 750 (alpha 0.81 at t' = 249) gives D a clear view of
# one-step samples, and lambda 0.1 lets the adversarial term sharpen the blurry E[x0 | x_T] that the
# reconstruction term alone would converge to (4.2). D's lr is 0.3x G's (1e-4 at G's 3e-4, UFOGen's released
# D lr): at 5x, with Adam's beta1 = 0, D's steps are as large as its signal and it stays at chance (loss
# 2 ln 2) for all 200 steps, so G's adversarial gradient carries nothing. D steps on every other iteration,
# as in UFOGen's code: D is a whole UNet, so at d_every 1 it costs three times G's work per image.
PRESETS = {
    "paper": UFOGenConfig(),
    "tiny": UFOGenConfig(gap=750, t_power=4.0, lam=0.1, d_lr_mult=0.3, logit_clamp=0.0, d_every=2),
}
# The 8-step student's teacher: 5.2's DDIM-50, or for the tiny run a 16-step teacher, two teacher steps per
# student step as in progressive distillation (Salimans & Ho 2022): the teacher's guided steps are most of
# the stage's work (two UNet forwards each).
DISTILL_PRESETS = {
    "paper": DistillConfig(),
    "tiny": DistillConfig(teacher_steps=16),
}


def validate(cfg: UFOGenConfig) -> None:
    if cfg.recon not in ("diffusion", "distill", "ema"):
        raise ValueError(f"UFOGenConfig.recon = {cfg.recon!r}, expected 'diffusion', 'distill' or 'ema'")
    if cfg.recon_guidance != 1.0 and cfg.recon == "diffusion":
        raise ValueError(f"UFOGenConfig.recon_guidance = {cfg.recon_guidance} needs a model target: recon 'distill' or 'ema', "
                         f"not 'diffusion' (its target is the data x0)")
    if cfg.t_power <= 0:
        raise ValueError(f"UFOGenConfig.t_power = {cfg.t_power}, expected > 0")
    if not 0 <= cfg.gap < sample.T:
        raise ValueError(f"UFOGenConfig.gap = {cfg.gap}, expected 0 .. {sample.T - 1}")
    if cfg.recon_gamma not in ("diffusion", "all", "none"):
        raise ValueError(f"UFOGenConfig.recon_gamma = {cfg.recon_gamma!r}, expected 'diffusion', 'all' or 'none'")
    if cfg.d_time not in ("t_prev", "t"):
        raise ValueError(f"UFOGenConfig.d_time = {cfg.d_time!r}, expected 't_prev' or 't'")
    if cfg.d_every < 1:
        raise ValueError(f"UFOGenConfig.d_every = {cfg.d_every}, expected >= 1")


def validate_distill(cfg: DistillConfig) -> None:
    if cfg.target_steps < 1 or cfg.teacher_steps < cfg.target_steps:
        raise ValueError(f"DistillConfig.target_steps = {cfg.target_steps} must be >= 1 and <= teacher_steps = {cfg.teacher_steps}")
    if cfg.guidance < 0:
        raise ValueError(f"DistillConfig.guidance = {cfg.guidance}, expected >= 0")


# ----------------------------------------------------------------------------------------------------
# 4.1 The discriminator: the diffusion UNet with a one-channel, zero-initialised head
# ----------------------------------------------------------------------------------------------------

class Discriminator(nn.Module):
    """D(x_{t'}, t', text) -> a (B, 1, h, w) map of logits, one per latent location. 4.1: "the UNet
    discriminator aggregates logits across output locations": the losses average the per-location BCE.
    Initialised from the pretrained diffusion UNet (4.1, 4.3); its new head is zero-initialised, so D
    starts neutral (every logit 0, p = 1/2) and its first gradients come from the pretrained features."""

    def __init__(self, pretrained: md.UNet):
        super().__init__()
        self.unet = copy.deepcopy(pretrained).requires_grad_(True)
        c = self.unet.conv_out.in_channels
        self.unet.conv_out = nn.Conv2d(c, 1, 3, padding=1)
        nn.init.zeros_(self.unet.conv_out.weight)
        nn.init.zeros_(self.unet.conv_out.bias)

    def forward(self, x, t, context):                          # (B, c, h, w) -> (B, 1, h, w)
        return self.unet(x, t, context)


def _bce(logits, target: float, clamp_max: float | None = None, clamp_min: float | None = None):
    if clamp_max is not None or clamp_min is not None:
        logits = logits.clamp(min=clamp_min, max=clamp_max)
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, target))


def d_loss(d_real, d_fake, clamp: float = 0.5):
    """Eq. 1, max over D: -[log D(x_{t-1}) + log(1 - D(x'_{t-1}))], per location, averaged. With UFOGen's
    clamps a real logit above +clamp (or a fake one below -clamp) gives D no further gradient."""
    c = clamp or None
    return _bce(d_real, 1.0, clamp_max=c) + _bce(d_fake, 0.0, clamp_min=-c if c else None)


def d_accuracy(d_real, d_fake) -> torch.Tensor:
    """The fraction of locations D gets right (real logit > 0, fake < 0), over both: 0.5 is chance, where a D
    that has learned nothing sits (its loss then stays at 2 ln 2 = 1.386)."""
    return ((d_real > 0).float().mean() + (d_fake < 0).float().mean()) / 2


def g_adv_loss(d_fake, clamp: float = 0.5):
    """Eq. 1, min over G, in the non-saturating form -log D(x'_{t-1}) (Goodfellow et al. 2014): it gives G
    strong gradients exactly when D rejects its samples, where log(1 - D) would saturate."""
    return _bce(d_fake, 1.0, clamp_max=clamp or None)


# ----------------------------------------------------------------------------------------------------
# 4.2 The reconstruction term
# ----------------------------------------------------------------------------------------------------

def gamma(sched: dict, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """gamma_t of Eq. 1: the weight that makes lambda gamma_t ||x0 - x0'||^2 exactly the base model's own loss,
    the 'original diffusion loss' that UFOGen keeps. v-prediction: x0 - x0' = sigma_t (v' - v), so gamma_t =
    1 / sigma_t^2. eps-prediction (SD-1.5, UFOGen's own base): x0 - x0' = (sigma_t / alpha_t)(eps' - eps), so
    gamma_t = alpha_t^2 / sigma_t^2 = SNR_t."""
    g = sample._at(sched["sigma"], t, like) ** -2
    if sched["cfg"].prediction == "epsilon":
        g = g * sample._at(sched["alpha"], t, like) ** 2
    return g


def recon_target(cfg: UFOGenConfig, x0, x_t, t, context, sched, teacher=None, g_ema=None, uncond=None):
    """The x0 that G's prediction is pulled towards: data (Eq. 1), the frozen teacher's prediction
    (Eq. 2) or the EMA generator's (Eq. 3), all under stop-gradient. With cfg.recon_guidance > 1 the teacher's
    prediction is classifier-free guided (`uncond`: the empty prompt's context), so the one-step model
    learns the guided model that DDIM-50 + CFG samples from, although it is itself sampled without CFG."""
    if cfg.recon == "diffusion":
        return x0
    net = teacher if cfg.recon == "distill" else g_ema
    with torch.no_grad():
        return sample.guided_denoiser(net, sched, context, uncond, cfg.recon_guidance)(x_t, t)


def sample_t(cfg: UFOGenConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) training timesteps in [1, T). UFOGen draws them uniformly; t_power > 1 puts more of them near T,
    where a one-step sampler evaluates G, at the cost of the small t that multi-step sampling also uses."""
    u = torch.rand(n, generator=generator) ** (1.0 / cfg.t_power)
    return (1 + u * (sample.T - 1)).long().clamp(max=sample.T - 1)


def recon_loss(x0_pred, target, t, sched, weighted: bool = True):
    """||target - x0'||^2 per element, averaged; times gamma_t if `weighted` (Eq. 1). Eq. 2 and Eq. 3 print no
    gamma_t: a model target is already smooth at small t, and weighting it by 1 / sigma_t^2 (~566 at t = 1 here)
    would make the few small-t draws dominate the term (UFOGenConfig.recon_gamma picks)."""
    sq = (target - x0_pred).square()
    return (gamma(sched, t, x0_pred) * sq).mean() if weighted else sq.mean()


def recon_weighted(cfg: UFOGenConfig) -> bool:
    """Whether this run's reconstruction term carries gamma_t (UFOGenConfig.recon_gamma)."""
    return cfg.recon_gamma == "all" or (cfg.recon_gamma == "diffusion" and cfg.recon == "diffusion")


# ----------------------------------------------------------------------------------------------------
# 8-step distillation: the student's DDIM step matches the guided teacher's DDIM trajectory
# ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def distill_target(teacher_denoise, x_t, t: int, t_next: int, sched: dict, sub_steps: int):
    """The x0 target for a student that goes from t to t_next in one DDIM step (Salimans & Ho 2022, Alg. 2,
    generalised from 2 teacher steps to `sub_steps`, as TRACT does): run the (guided) teacher's DDIM from t
    to t_next, then solve the DDIM update x_next = alpha' x0 + sigma' (x_t - alpha x0) / sigma for x0:
        x0~ = (x_next - (sigma'/sigma) x_t) / (alpha' - (sigma'/sigma) alpha).
    At the last student step (t_next = -1) the target is the teacher's x0 at the end of its steps."""
    a_t, s_t = float(sched["alpha"][t]), float(sched["sigma"][t])
    ts = [round(t - i * (t - t_next) / sub_steps) for i in range(sub_steps)]   # t ... (t_next excluded)
    x = x_t
    for i, tt in enumerate(ts):
        tb = torch.full((x.shape[0],), tt, dtype=torch.long, device=x.device)
        x0 = teacher_denoise(x, tb)
        nxt = ts[i + 1] if i + 1 < len(ts) else t_next
        if nxt < 0:
            return x0
        eps = sample.eps_from_x0(sched, x, tb, x0)
        x = float(sched["alpha"][nxt]) * x0 + float(sched["sigma"][nxt]) * eps
    a_n, s_n = float(sched["alpha"][t_next]), float(sched["sigma"][t_next])
    return (x - (s_n / s_t) * x_t) / (a_n - (s_n / s_t) * a_t)


