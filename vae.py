"""
The VAE of MobileDiffusion, Section 3.5, Figure 3 and Table 4 (decoder latency).

  3.5  "VAE converts a H x W x 3 image to a H/f x W/f x c latent ... we choose f = 8 and c = 8"
       (SD: c = 4, EMU: c = 16): VAEConfig.latent_channels.
  3.5  "trained with a combination of loss functions, including L2 reconstruction loss, KL divergence for
       regularization, perceptual loss, and adversarial loss": l2_loss, kl_loss, PerceptualLoss,
       PatchDiscriminator + hinge losses, adaptive_weight.
  3.5  "a lightweight decoder architecture by pruning model width and depth ... trained with the encoder
       frozen. We remove the unnecessary KL regularization in the objective, and reduce the weight of
       adversarial loss": the "md-light" preset (decoder_channels, decoder_layers, decoder_mid_attn) and
       decoder_distill_loss; the loop is `python train.py --stage decoder`.
  Table 4  decoder 92 ms (MD) vs 285 ms (SD) on iPhone 15 Pro; `python vae.py` prints the proxy on this
       machine: decoder GMACs at 512px and CPU latency.

The module layout and parameter names follow Stable Diffusion's AutoencoderKL (as diffusers names it),
so a local SD VAE folder loads as is: VAE.from_diffusers("path/to/sd/vae").

Run it:
  python vae.py                      # params, decoder GMACs at 512px, CPU decoder latency per preset
  python train.py --stage vae        # train the tiny VAE on the synthetic shapes (CPU, minutes)
  python train.py --stage decoder --init_from out/tiny/vae.pt   # 3.5 light-decoder distillation
"""

import argparse
import hashlib
import os
import re
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

import config
from md import Upsample, count_macs, count_params     # Upsample: nearest 2x + 3x3 conv, the same in SD's VAE


# ----------------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------------

@dataclass
class VAEConfig:
    in_channels: int = 3
    latent_channels: int = 8                     # 3.5: c = 8 (SD: 4) for better reconstruction
    channels: tuple = (128, 256, 512, 512)       # encoder widths per level: SD's; 3 downsamplings -> f = 8
    layers: int = 2                              # residual blocks per encoder level (SD: 2)
    decoder_channels: tuple = (128, 256, 512, 512)  # 3.5: the light decoder prunes width ...
    decoder_layers: int = 3                      # ... and depth (blocks per decoder level; SD: layers + 1 = 3)
    decoder_mid_attn: bool = True                # SD's single-head attention at the decoder's 1/8 bottleneck
    mid_attn: bool = True                        # ... and at the encoder's
    norm_groups: int = 32
    scaling_factor: float = 0.18215              # latent * scaling_factor has ~unit variance (estimate_scaling_factor)
    # --- losses (3.5) ---
    kl_weight: float = 1e-6                      # LDM's kl-f8 weight (kl_loss: KL per image element)
    perceptual_weight: float = 1.0               # LPIPS weight in LDM
    disc_weight: float = 0.5                     # adversarial weight (LDM: 0.5), times the adaptive weight
    disc_start: int = 50001                      # generator step at which D starts (LDM: 50001)
    disc_channels: int = 64                      # PatchGAN width (pix2pix / taming: 64, 3 layers)
    disc_layers: int = 3

    @property
    def factor(self) -> int:
        return 2 ** (len(self.channels) - 1)


PRESETS = {
    # 3.5: SD's widths and depth, 8 latent channels.
    "md": VAEConfig(),
    # 3.5 light decoder: the same encoder (frozen during distillation); decoder at half width, 2 blocks per
    # level instead of 3, no bottleneck attention (attention at 64x64 is 4096 tokens: costly on device).
    "md-light": VAEConfig(decoder_channels=(64, 128, 256, 256), decoder_layers=2, decoder_mid_attn=False,
                          disc_weight=0.1),
    # Stable Diffusion's AutoencoderKL (kl-f8, c = 4): loads real SD VAE weights from a local folder.
    "sd": VAEConfig(latent_channels=4),
    # 32px synthetic shapes on a 2-core CPU in minutes. A toy-only departure: 3 levels, so f = 4 where SD and
    # 3.5 have f = 8. It keeps the UNet's 8x8 latent grid while the VAE costs a quarter of a 64px / f = 8 one.
    # The adversarial loss starts at step 1100 of the run's 1800 (3.5's four losses; LDM starts it after 50k
    # steps); no perceptual term without a local VGG file. Scaling factor re-estimated after training. A toy-only departure: KL weight
    # 1e-4 (LDM: 1e-6), for a posterior noise that teaches the decoder to forgive small latent errors, at the
    # same PSNR; its effect on the samples was within the run-to-run spread (docs/results.md).
    "tiny": VAEConfig(channels=(32, 64, 64), layers=1, decoder_channels=(32, 64, 64), decoder_layers=2,
                      norm_groups=8, scaling_factor=1.0, disc_channels=32, disc_layers=2, disc_start=1100,
                      perceptual_weight=0.0, kl_weight=1e-4),
    # The tiny light decoder (distilled from "tiny" with `--stage decoder`): half the width, one block per level.
    "tiny-light": VAEConfig(channels=(32, 64, 64), layers=1, decoder_channels=(16, 32, 32), decoder_layers=1,
                            decoder_mid_attn=False, norm_groups=8, scaling_factor=1.0, disc_channels=32,
                            disc_layers=2, disc_start=500, perceptual_weight=0.0, disc_weight=0.1),
}


def validate(cfg: VAEConfig) -> None:
    for name in ("channels", "decoder_channels"):
        for i, c in enumerate(getattr(cfg, name)):
            if c % cfg.norm_groups:
                raise ValueError(f"VAEConfig.{name}[{i}] = {c} is not divisible by norm_groups = {cfg.norm_groups}")
    if len(cfg.decoder_channels) != len(cfg.channels):
        raise ValueError(f"VAEConfig.decoder_channels has {len(cfg.decoder_channels)} levels, channels has "
                         f"{len(cfg.channels)}: both must give the same downsampling factor")


# ----------------------------------------------------------------------------------------------------
# Building blocks (SD's AutoencoderKL; names match diffusers' for weight loading)
# ----------------------------------------------------------------------------------------------------

class ResnetBlock(nn.Module):
    """GN-SiLU-Conv3x3-GN-SiLU-Conv3x3 + (1x1) shortcut; no time input in a VAE."""

    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, c_in, eps=1e-6)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, c_out, eps=1e-6)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):                                         # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels at the 1/8 bottleneck (SD's VAE mid block)."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.to_q, self.to_k, self.to_v = nn.Linear(c, c), nn.Linear(c, c), nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])            # a list only to match diffusers' key "to_out.0"

    def forward(self, x):                                         # (B, C, H, W)
        h, w = x.shape[-2:]
        z = rearrange(self.group_norm(x), "b c h w -> b (h w) c")
        a = (self.to_q(z) @ self.to_k(z).transpose(1, 2) * z.shape[-1] ** -0.5).softmax(-1)  # (B, HW, HW)
        z = self.to_out[0](a @ self.to_v(z))                      # (B, HW, C)
        return x + rearrange(z, "b (h w) c -> b c h w", h=h, w=w)


class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int, attn: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(c, c, groups), ResnetBlock(c, c, groups)])
        self.attentions = nn.ModuleList([AttnBlock(c, groups)] if attn else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for a in self.attentions:
            x = a(x)
        return self.resnets[1](x)


class AsymmetricDownsample(nn.Module):
    """3x3 stride-2 conv with SD's asymmetric (right/bottom) zero padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):                                         # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Level(nn.Module):
    """One resolution level: `resnets`, then an optional down/up sampler (diffusers' Down/UpBlock names)."""

    def __init__(self, c_in: int, c_out: int, n: int, groups: int, sampler: type | None):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(c_in if i == 0 else c_out, c_out, groups) for i in range(n))
        self.sampler_name = "downsamplers" if sampler is AsymmetricDownsample else "upsamplers"
        setattr(self, self.sampler_name, nn.ModuleList([sampler(c_out)] if sampler else []))

    def forward(self, x):
        for r in self.resnets:
            x = r(x)
        for s in getattr(self, self.sampler_name):
            x = s(x)
        return x


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = cfg.channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.layers, g, AsymmetricDownsample if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_attn)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)  # mean and log-variance

    def forward(self, x):                                         # (B, 3, H, W)
        h = self.conv_in(x)
        for level in self.down_blocks:
            h = level(h)                                          # ... -> (B, C, H/8, W/8)
        h = self.mid_block(h)
        return self.conv_out(F.silu(self.conv_norm_out(h)))       # (B, 2c, H/8, W/8)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = tuple(reversed(cfg.decoder_channels)), cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.decoder_mid_attn)
        self.up_blocks = nn.ModuleList(
            Level(ch[max(i - 1, 0)], ch[i], cfg.decoder_layers, g, Upsample if i < len(ch) - 1 else None)
            for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):                                         # (B, c, h, w)
        h = self.mid_block(self.conv_in(z))
        for level in self.up_blocks:
            h = level(h)                                          # ... -> (B, C0, 8h, 8w)
        return self.conv_out(F.silu(self.conv_norm_out(h)))       # (B, 3, 8h, 8w)


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))), the posterior the encoder outputs."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)               # (B, c, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)                   # as SD: keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps                          # reparameterised: gradients reach the encoder

    def mode(self) -> torch.Tensor:
        return self.mean


class VAE(nn.Module):
    """encode(x in [-1, 1], (B, 3, H, W)) -> DiagonalGaussian over (B, c, H/8, W/8);
    decode(z) -> images (B, 3, H, W), clamped to [-1, 1] unless clamp=False (training, parity tests).
    The diffusion model works on z * scaling_factor (see estimate_scaling_factor)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        cfg = self.cfg
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"VAE.encode: expected images (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % cfg.factor or x.shape[-1] % cfg.factor:
            raise ValueError(f"VAE.encode: image size {tuple(x.shape[-2:])} is not divisible by {cfg.factor} "
                             f"(the VAE's downsampling factor f)")
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        if z.ndim != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"VAE.decode: expected latents (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        x = self.decoder(self.post_quant_conv(z))
        return x.clamp(-1, 1) if clamp else x

    def forward(self, x, sample: bool = True, generator=None):
        """Reconstruction (unclamped, for the losses) and the posterior."""
        post = self.encode(x)
        z = post.sample(generator) if sample else post.mode()
        return self.decode(z, clamp=False), post

    # --- loading real SD weights ---------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, folder: str) -> "VAE":
        """Load an AutoencoderKL saved by diffusers: `folder` holds (or has a `vae/` subfolder holding)
        config.json and diffusion_pytorch_model.safetensors (or .bin)."""
        folder, dc = config.read_diffusers_config(folder, "vae", "AutoencoderKL")
        cfg_path = os.path.join(folder, "config.json")
        if not dc.get("block_out_channels"):
            raise ValueError(f"{cfg_path}: no block_out_channels; not an AutoencoderKL config")
        cfg = VAEConfig(in_channels=dc.get("in_channels", 3), latent_channels=dc.get("latent_channels", 4),
                        channels=tuple(dc["block_out_channels"]), layers=dc.get("layers_per_block", 2),
                        decoder_channels=tuple(dc["block_out_channels"]),
                        decoder_layers=dc.get("layers_per_block", 2) + 1,
                        mid_attn=dc.get("mid_block_add_attention", True),
                        decoder_mid_attn=dc.get("mid_block_add_attention", True),
                        norm_groups=dc.get("norm_num_groups", 32), scaling_factor=dc.get("scaling_factor", 0.18215))
        vae = cls(cfg)
        vae.load_state_dict({rename_legacy(k): t for k, t in load_weights_file(folder).items()}, source=folder)
        return vae

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False, source: str = "state dict"):
        """nn.Module.load_state_dict with an error that says which weights do not fit, and how."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        shapes = [f"{k}: expected {tuple(own[k].shape)}, got {tuple(state_dict[k].shape)}"
                  for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
        if strict and (missing or unexpected or shapes):
            raise ValueError(f"{source} does not fit this VAE ({self.cfg.latent_channels} latent channels, "
                             f"channels {self.cfg.channels}): {len(missing)} missing, {len(unexpected)} unexpected, "
                             f"{len(shapes)} wrong shapes; e.g. missing {missing[:3]}, unexpected {unexpected[:3]}, "
                             f"shapes {shapes[:3]}")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


# diffusers still loads AutoencoderKL files saved before its attention blocks were renamed; the same renames:
LEGACY_ATTENTION = [(re.compile(r"\.query\.(weight|bias)$"), r".to_q.\1"), (re.compile(r"\.key\.(weight|bias)$"), r".to_k.\1"),
                    (re.compile(r"\.value\.(weight|bias)$"), r".to_v.\1"),
                    (re.compile(r"\.proj_attn\.(weight|bias)$"), r".to_out.0.\1")]


def rename_legacy(key: str) -> str:
    for pattern, new in LEGACY_ATTENTION:
        key = pattern.sub(new, key)
    return key


def load_weights_file(folder: str, name: str = "diffusion_pytorch_model") -> dict:
    """The weights of a diffusers model folder: <name>.safetensors (needs the optional `safetensors`) or .bin,
    or their fp16 variants (<name>.fp16.safetensors, as save_pretrained(variant="fp16") writes), in that order;
    an fp16 file loads into the fp32 model."""
    for file in (f"{name}.safetensors", f"{name}.bin", f"{name}.fp16.safetensors", f"{name}.fp16.bin"):
        path = os.path.join(folder, file)
        if not os.path.isfile(path):
            continue
        if path.endswith(".bin"):                                 # (not mmap: older .bin files are not zip)
            return torch.load(path, map_location="cpu", weights_only=True)
        return config.load_safetensors(path)
    raise FileNotFoundError(f"{folder}: no {name}.safetensors, .bin or .fp16 variant of either")


@torch.no_grad()
def encoder_fingerprint(vae: "VAE") -> str:
    """A hash of what makes a latent: the encoder's and quant_conv's weights and the scaling factor. The light
    decoder keeps its teacher's encoder bit for bit, so both VAEs give one fingerprint (cached latents made
    with one are valid for the other)."""
    h = hashlib.sha256(repr(float(vae.cfg.scaling_factor)).encode())
    for prefix in ("encoder.", "quant_conv."):
        for k, t in sorted((k, t) for k, t in vae.state_dict().items() if k.startswith(prefix)):
            h.update(k.encode())
            h.update(t.detach().cpu().contiguous().float().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def estimate_scaling_factor(vae: VAE, images: torch.Tensor, seed: int = 0) -> float:
    """SD's recipe: 1 / std of the encoder's posterior samples on a batch of training images, so the
    diffusion model sees latents of ~unit variance (SD 1.x got 0.18215 this way). The samples come from a
    generator of their own: the training RNG, saved for --resume, is not touched."""
    rng = torch.Generator(images.device).manual_seed(seed)
    return float(1.0 / vae.encode(images).sample(rng).flatten().std())


# ----------------------------------------------------------------------------------------------------
# 3.5 Losses: "L2 reconstruction loss, KL divergence for regularization, perceptual loss, and adversarial loss"
# ----------------------------------------------------------------------------------------------------

def l2_loss(recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """3.5 'L2 reconstruction loss', mean over pixels."""
    return F.mse_loss(recon, target)


def kl_loss(post: DiagonalGaussian, image_numel: int) -> torch.Tensor:
    """3.5 'KL divergence for regularization': KL(q(z|x) || N(0, I)), summed over the latent of each image,
    averaged over the batch and divided by the image's element count (3 x H x W), so that it shares the
    per-element scale of l2_loss. LDM sums both terms over each image instead; the ratio is the same, so
    kl_weight means what it means there (kl-f8: 1e-6)."""
    kl = 0.5 * (post.mean.square() + post.logvar.exp() - 1.0 - post.logvar)   # (B, c, h, w)
    return kl.flatten(1).sum(1).mean() / image_numel


class PerceptualLoss(nn.Module):
    """3.5 'perceptual loss': LPIPS-style distance on VGG16 features (Zhang et al. 2018): per layer, unit-
    normalise the channel vector at each pixel, take the squared difference, average; sum over the 5
    layers (relu1_2 ... relu5_3), with uniform layer weights (LPIPS' learned 'lin' weights are not used).
    The VGG16 weights must come from a local file (torchvision's vgg16 state dict, keys 'features.N.*'):
    nothing can be downloaded at run time. Built from scratch so torchvision is not needed."""

    LAYERS = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
    TAPS = (3, 8, 15, 22, 29)                                     # indices of relu1_2, 2_2, 3_3, 4_3, 5_3

    def __init__(self, weights_path: str):
        super().__init__()
        layers, c = [], 3
        for v in self.LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        sd = torch.load(weights_path, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if k.startswith("features.")}
        try:
            self.load_state_dict(sd)
        except RuntimeError as e:
            raise ValueError(f"{weights_path}: not a VGG16 state dict with 'features.N.weight' keys: {e}") from e
        self.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):                                      # images in [-1, 1]
        h = torch.cat([x, y]) * 0.5 + 0.5
        h = (h - self.mean) / self.std
        loss = 0.0
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in self.TAPS:
                a, b = F.normalize(h, dim=1).chunk(2)
                loss = loss + (a - b).square().sum(1).mean()
            if i == self.TAPS[-1]:
                break
        return loss


class PatchDiscriminator(nn.Module):
    """pix2pix / taming PatchGAN: strided 4x4 convs -> a map of logits, each judging one image patch.
    Used with hinge losses (taming/LDM's choice): the hinge stops pushing a logit once it is beyond the
    margin, so a confident D does not produce the exploding gradients of the saturated BCE."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c, layers = cfg.disc_channels, [nn.Conv2d(cfg.in_channels, cfg.disc_channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        for i in range(1, cfg.disc_layers + 1):
            c_out = cfg.disc_channels * min(2 ** i, 8)
            stride = 2 if i < cfg.disc_layers else 1
            layers += [nn.Conv2d(c, c_out, 4, stride, 1, bias=False), nn.GroupNorm(min(32, c_out // 4), c_out),
                       nn.LeakyReLU(0.2)]
            c = c_out
        layers.append(nn.Conv2d(c, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x):                                         # (B, 3, H, W) -> (B, 1, h', w') logits
        return self.net(x)


def d_hinge_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge: push real logits above +1 and fake ones below -1."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def g_hinge_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise D's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss, g_loss, last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """VQGAN's balance (Esser et al. 2021, used by LDM): scale the adversarial term so its gradient at the
    decoder's last layer has the norm of the reconstruction gradient there."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, max_weight).detach()


def with_perceptual(rec: torch.Tensor, perceptual, weight: float, recon: torch.Tensor, target: torch.Tensor):
    """3.5's perceptual term added to a reconstruction loss, when a PerceptualLoss is at hand (else rec as is)."""
    return rec if perceptual is None else rec + weight * perceptual(recon, target)


def adversarial_term(rec_loss: torch.Tensor, logits_fake: torch.Tensor, cfg: VAEConfig, last_layer: torch.Tensor):
    """3.5's adversarial term of the autoencoder's loss: disc_weight x the adaptive weight x the hinge G loss.
    Returns (the term to add, the unweighted G loss for the log)."""
    g_loss = g_hinge_loss(logits_fake)
    return cfg.disc_weight * adaptive_weight(rec_loss, g_loss, last_layer) * g_loss, g_loss


def decoder_distill_loss(light_recon, full_recon, target) -> torch.Tensor:
    """3.5 decoder distillation: match both the image and the frozen full decoder's reconstruction (the
    teacher supplies a target free of the student's capacity limits); no KL term, since the encoder is frozen."""
    return l2_loss(light_recon, target) + l2_loss(light_recon, full_recon.detach())


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2), per image: (B,)."""
    mse = (x.float() - y.float()).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-12))


# ----------------------------------------------------------------------------------------------------
# Table 4 by proxy: decoder cost on this machine
# ----------------------------------------------------------------------------------------------------

def decoder_cost(cfg: VAEConfig, resolution: int = 512, repeats: int = 5, time_it: bool = True) -> dict:
    with torch.device("meta"):
        meta = VAE(cfg)
        z = torch.zeros(1, cfg.latent_channels, resolution // cfg.factor, resolution // cfg.factor)
        gmacs = count_macs(meta.decode, z) / 1e9
    out = {"encoder_m": count_params(meta.encoder) / 1e6 + count_params(meta.quant_conv) / 1e6,
           "decoder_m": count_params(meta.decoder) / 1e6 + count_params(meta.post_quant_conv) / 1e6,
           "decoder_gmacs": gmacs}
    if time_it:
        vae = VAE(cfg).eval()
        z = torch.randn(1, cfg.latent_channels, resolution // cfg.factor, resolution // cfg.factor)
        times = []
        with torch.no_grad():
            for i in range(repeats + 1):
                t0 = time.perf_counter()
                vae.decode(z)
                if i:
                    times.append(time.perf_counter() - t0)
        out["decoder_ms"] = 1000 * statistics.median(times)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="VAE cost per preset: params, decoder GMACs and CPU latency (Table 4 proxy)")
    p.add_argument("--presets", default="sd,md,md-light", help="comma-separated presets")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--repeats", type=int, default=5, help="timed decoder runs (median reported), after a warm-up")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    unknown = [n for n in names if n not in PRESETS]
    if unknown or not names:
        p.error(f"--presets {args.presets!r}: unknown {', '.join(map(repr, unknown)) or 'empty list'}; "
                f"expected names from {', '.join(sorted(PRESETS))}")
    if args.resolution <= 0 or args.resolution % 8 or args.repeats < 1:
        p.error(f"--resolution {args.resolution} / --repeats {args.repeats}: expected a positive multiple of 8 / >= 1")
    print(f"{'preset':<10}{'c':>3}{'enc(M)':>9}{'dec(M)':>9}{'dec GMACs':>11}{'dec CPU ms':>12}   ({args.resolution}px, "
          f"{torch.get_num_threads()} threads, median of {args.repeats})")
    rows = {n: decoder_cost(PRESETS[n], args.resolution, args.repeats) for n in names}
    for n, r in rows.items():
        print(f"{n:<10}{PRESETS[n].latent_channels:>3}{r['encoder_m']:>9.1f}{r['decoder_m']:>9.1f}"
              f"{r['decoder_gmacs']:>11.1f}{r['decoder_ms']:>12.0f}")
    if "sd" in rows and "md-light" in rows:
        s, l = rows["sd"], rows["md-light"]
        print(f"\nmd-light / sd decoder: GMACs {l['decoder_gmacs'] / s['decoder_gmacs']:.2f}x, "
              f"CPU latency {l['decoder_ms'] / s['decoder_ms']:.2f}x   (paper, Table 4 on iPhone 15 Pro: 92/285 = 0.32x)")


if __name__ == "__main__":
    config.run_cli(main)
