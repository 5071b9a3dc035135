"""
LoRA (4.3, on the UFOGen generator) and the 5.4 applications: plugins trained on the *base* diffusion model,
used unchanged on the one-step UFOGen model. One LoRA class serves both.

The paper (4 intro, 4.2, 5.4, Figures 1, 4, 7, 8): because UFOGen finetunes the diffusion model with a
diffusion-style reconstruction term, the one-step generator keeps the base model's weights close enough that
modules trained for the base -- a style LoRA, a structure-control adapter -- and the base's inpainting
machinery work on it without retraining. Here, each on the tiny setup:

  5.4 "personalized generation"  a style LoRA (Hu et al. [20]) finetuned on the base with a small style set
                                 (train.py --stage lora; synthetic: shapes "in outlined style"); load_lora
                                 folds it into any UNet of the same architecture, base or one-step
  5.4 "canny edge to image"      a T2I-Adapter (Mou et al. [39]): a small conv net from an edge map to features
                                 added to the UNet's encoder, trained with the UNet frozen (train.py --stage
                                 adapter); edges by Sobel + threshold in plain torch (edges)
  5.4 "inpainting"               the known latent written into every x0 prediction (inpaint_denoiser), so any
                                 sampler -- DDIM-50, k-step or 1-step UFOGen -- fills only the masked region

All three go through sample.Pipeline (load_lora, load_adapter, latents(cond=, init=, mask=, strength=)) and
the unchanged samplers; nothing is specific to one sampler or one model.

  python train.py --stage lora       # -> out/tiny/lora.pt     (~7 min on 2 cores)
  python train.py --stage adapter    # -> out/tiny/adapter.pt  (~3 min)
  python report.py --plugins         # the plugin metrics on base DDIM-50 and 1-step UFOGen, and a grid
  python sample.py --ckpt out/tiny/ufogen.pt --lora out/tiny/lora.pt --prompt "a red circle on a blue background in outlined style"
"""

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import config
import md


@dataclass
class PluginConfig:                  # train.py flags: --plugin_<field>
    lora_rank: int = 16              # style LoRA rank (4.3's LoRA, here on the base model)
    lora_alpha: float = 0.0          # 0 = alpha = rank (scale 1)
    lora_convs: bool = True          # a style is texture: the conv blocks get LoRA too, not only attention
    adapter_blocks: int = 2          # residual conv blocks per level in the T2I-Adapter (its "full" variant: 2)
    edge_threshold: float = 0.15     # Sobel magnitude (per unit colour step) above which a pixel is an edge


# ----------------------------------------------------------------------------------------------------
# 4.3 LoRA (Hu et al. 2021, the paper's [20]): on the UFOGen generator (4.3) and as the 5.4 style plugin
# ----------------------------------------------------------------------------------------------------

def fold(weight: torch.Tensor, up: torch.Tensor, down: torch.Tensor, scale: float) -> torch.Tensor:
    """W + scale * up @ down for a linear layer (out, in), or for a conv: up (out, r, 1, 1) after down (r, in, k, k)."""
    if weight.ndim == 2:
        return weight + scale * (up @ down)
    return weight + scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


class LoRA(nn.Module):
    """y = base(x) + (alpha / r) * up(down(x)), base frozen; `up` zero-initialised so a fresh LoRA is a null
    effect (4.3: "setting the LoRA layers to initialize with a null effect"). For a conv, `down` is a conv of
    the base's kernel with r outputs and `up` a 1x1 conv."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale = base.requires_grad_(False), (alpha or rank) / rank
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.scale * self.up(self.down(x))

    def merged_weight(self) -> torch.Tensor:
        """W + scale * up @ down: the base weight with the low-rank update folded in (a new tensor)."""
        return fold(self.base.weight, self.up.weight, self.down.weight, self.scale).detach()

    def merged(self) -> nn.Module:
        """The base layer with the low-rank update folded into its weight."""
        layer = copy.deepcopy(self.base)
        layer.weight.data = self.merged_weight()
        return layer.requires_grad_(True)


def lora_targets(model: nn.Module, convs: bool):
    """(parent, attribute) of every layer that gets LoRA: the attention and feed-forward projections and
    the transformer stacks' in/out projections; with convs, the conv blocks' convolutions too."""
    out = []
    for m in model.modules():
        names = []
        if isinstance(m, md.Attention):
            names = ["to_q", "to_kv"] if m.shared_kv else ["to_q", "to_k", "to_v"]
            names.append("to_out")
        elif isinstance(m, md.GLUFeedForward) or isinstance(m, md.Transformer2D):
            names = ["proj_in", "proj_out"]
        elif convs and isinstance(m, md.ResBlock):
            names = ["conv1", "conv2"]
        elif convs and isinstance(m, md.SepConvBlock):
            names = ["pw1", "pw2"]
        out += [(m, n) for n in names if isinstance(getattr(m, n), (nn.Linear, nn.Conv2d))]
    return out


def add_lora(model: nn.Module, rank: int, alpha: float = 0.0, convs: bool = False) -> list:
    """Freeze `model` and wrap its target layers in LoRA; returns the new trainable parameters."""
    model.requires_grad_(False)
    params = []
    for parent, name in lora_targets(model, convs):
        layer = LoRA(getattr(parent, name), rank, alpha)
        setattr(parent, name, layer)
        params += [layer.down.weight, layer.up.weight]
    return params


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA into its base layer (for export and for a plain UNet checkpoint); in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRA):
                setattr(parent, name, child.merged())
    return model


def fold_lora_state(state: dict, scale: float) -> dict:
    """A state dict of a model with LoRA layers (keys <layer>.base.weight / .down.weight / .up.weight) as the
    plain model's (keys <layer>.weight): what merge_lora(model).state_dict() gives, from the tensors alone. A
    LoRA generator's checkpoint stores its unmerged state (no second copy of the UNet is made to save it) and is
    folded here when loaded. A state without LoRA keys is returned as it is."""
    layers = {k[:-len(".base.weight")] for k in state if k.endswith(".base.weight")}
    out = {}
    for key, value in state.items():
        parts = key.rsplit(".", 2)                                # [layer, "base" | "down" | "up", leaf]
        if len(parts) == 3 and parts[0] in layers:
            layer, part, leaf = parts
            if part == "base":
                out[f"{layer}.{leaf}"] = (fold(value, state[f"{layer}.up.weight"], state[f"{layer}.down.weight"], scale)
                                          if leaf == "weight" else value)
            continue                                              # down / up: folded into the weight
        out[key] = value
    return out


def lora_state_dict(model: nn.Module) -> dict:
    """Only the LoRA factors, by the names state_dict() gives them (a small file that applies on top of the
    base model: plugins.load_lora)."""
    return {f"{name}.{part}.weight": getattr(m, part).weight.detach()
            for name, m in model.named_modules() if isinstance(m, LoRA) for part in ("down", "up")}


# ----------------------------------------------------------------------------------------------------
# 5.4 Personalised generation: a style LoRA on the base model, applied to any UNet of its architecture
# ----------------------------------------------------------------------------------------------------

def save_lora(path: str, unet: md.UNet, pcfg: PluginConfig, extra: dict | None = None) -> None:
    """Only the low-rank factors (a small file), with the rank/alpha/targets and the UNet config to check against."""
    config.save_checkpoint(path, {"kind": "lora", "rank": pcfg.lora_rank, "alpha": pcfg.lora_alpha,
                                 "convs": pcfg.lora_convs, "unet": dataclasses.asdict(unet.cfg),
                                 "state": lora_state_dict(unet), **(extra or {})})


def load_lora(unet: md.UNet, path: str, scale: float = 1.0, fuse: bool = True) -> md.UNet:
    """Put the LoRA from `path` on `unet` (in place) with weight `scale` (diffusers' lora_scale): W + scale *
    (alpha / r) * up @ down. fuse: fold it into the weights (no extra cost per step; a one-step model stays a
    plain UNet); else keep the LoRA layers (ufogen.merge_lora folds them later)."""
    ck = config.refuse_non_finite(config.load_checkpoint(path), path)
    if ck.get("kind") != "lora":
        raise ValueError(f"{path}: not a LoRA file (kind {ck.get('kind')!r}); train.py --stage lora writes one")
    diff = config.config_mismatch(ck["unet"], unet.cfg, ignore=("attn_act", "dropout"))
    if diff:
        raise ValueError(f"{path}: the LoRA was trained for a different UNet: " + "; ".join(diff))
    if any(isinstance(m, LoRA) for m in unet.modules()):
        raise ValueError(f"{path}: this UNet already carries unfused LoRA layers; fold them first (ufogen.merge_lora)")
    add_lora(unet, ck["rank"], ck["alpha"], ck["convs"])
    want = lora_state_dict(unet)
    if set(want) != set(ck["state"]):
        raise ValueError(f"{path}: LoRA weights do not fit this UNet: missing {sorted(set(want) - set(ck['state']))[:3]}, "
                         f"unexpected {sorted(set(ck['state']) - set(want))[:3]}")
    unet.load_state_dict(ck["state"], strict=False)
    for m in unet.modules():
        if isinstance(m, LoRA):
            m.scale *= scale
    if fuse:
        merge_lora(unet)
    return unet.requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# 5.4 Structure control: edges, and a T2I-Adapter (Mou et al. 2023, the paper's [39])
# ----------------------------------------------------------------------------------------------------

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]]) / 4   # unit step -> magnitude 1


def sobel(img: torch.Tensor) -> torch.Tensor:
    """Gradient magnitude (B, 1, H, W) of images (B, 3, H, W) in [-1, 1]: per colour channel, on [0, 1], the
    largest of the three (two colours of equal brightness still have an edge). Edges of the image itself
    are replicated, so the border is not an edge."""
    x = (img.float() + 1) / 2
    b, c, h, w = x.shape
    x = F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate")
    k = torch.stack([SOBEL_X, SOBEL_X.T])[:, None].to(x.device)                 # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(x, k)                                                          # (B*3, 2, H, W)
    return g.square().sum(1).sqrt().view(b, c, h, w).amax(1, keepdim=True)      # (B, 1, H, W)


def edges(img: torch.Tensor, threshold: float = PluginConfig.edge_threshold) -> torch.Tensor:
    """Binary edge map (B, 1, H, W) in {0, 1}: Sobel magnitude above `threshold` (the stand-in for Canny;
    without non-maximum suppression an anti-aliased edge is 2 pixels wide)."""
    return (sobel(img) > threshold).float()


def edge_iou(a: torch.Tensor, b: torch.Tensor, tolerance: int = 1) -> torch.Tensor:
    """Per image (B,): IoU of two edge maps (B, 1, H, W), each widened by `tolerance` pixels first, so an
    edge one pixel off still counts (edge maps are thin: without slack a 1-pixel shift scores 0)."""
    k = 2 * tolerance + 1
    a, b = (F.max_pool2d(m.float(), k, 1, tolerance) > 0 for m in (a, b))
    inter, union = (a & b).flatten(1).sum(1), (a | b).flatten(1).sum(1)
    return inter / union.clamp(min=1)


class AdapterBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(x)))


class Adapter(nn.Module):
    """T2I-Adapter: condition image (B, cond_channels, H, W) -> one feature map per UNet level,
    (B, C_i, H/8/2^i, W/8/2^i), which md.UNet adds to that level's encoder features (features=).
    Pixel-unshuffle by the VAE factor puts the condition on the latent grid; then per level a (strided)
    conv and residual blocks; each output a zero-initialised 1x1 conv (ControlNet's zero convolution), so
    an untrained adapter changes nothing and training starts from the base model's behaviour."""

    def __init__(self, unet_cfg: md.UNetConfig, factor: int = 8, cond_channels: int = 1, blocks: int = 2):
        super().__init__()
        ch = unet_cfg.channels
        if min(unet_cfg.down_layers) < 1:
            raise ValueError(f"Adapter: every UNet level needs an encoder block to add features to; down_layers = {unet_cfg.down_layers}")
        self.unshuffle = nn.PixelUnshuffle(factor)                          # (B, c, H, W) -> (B, c*f^2, H/f, W/f)
        self.conv_in = nn.Conv2d(cond_channels * factor ** 2, ch[0], 3, padding=1)
        self.levels = nn.ModuleList(
            nn.Sequential(*([nn.Conv2d(ch[i - 1], ch[i], 3, stride=2, padding=1)] if i else []),   # H/2^i
                          *[AdapterBlock(ch[i]) for _ in range(blocks)])
            for i in range(len(ch)))
        self.outs = nn.ModuleList(nn.Conv2d(c, c, 1) for c in ch)
        for out in self.outs:
            nn.init.zeros_(out.weight)
            nn.init.zeros_(out.bias)
        self.factor, self.cond_channels, self.blocks = factor, cond_channels, blocks

    def forward(self, cond: torch.Tensor) -> list[torch.Tensor]:
        h = self.conv_in(self.unshuffle(cond))                                   # (B, C0, H/8, W/8)
        feats = []
        for level, out in zip(self.levels, self.outs):
            h = level(h)                                                         # (B, C_i, H/8/2^i, W/8/2^i)
            feats.append(out(h))
        return feats


def with_features(unet: md.UNet, features: list[torch.Tensor], scale: float = 1.0):
    """The UNet with an adapter's features bound, called like one: (x, t, context) -> v. The features depend
    only on the condition, so they are computed once per image, not once per step (T2I-Adapter's point);
    a batch that classifier-free guidance doubled gets them repeated."""
    def call(x, t, context):
        reps = x.shape[0] // features[0].shape[0]
        return unet(x, t, context, features=[scale * f.repeat(reps, 1, 1, 1) for f in features])
    return call


def save_adapter(path: str, adapter: Adapter, unet: md.UNet, extra: dict | None = None) -> None:
    config.save_checkpoint(path, {"kind": "adapter", "factor": adapter.factor, "cond_channels": adapter.cond_channels,
                                 "blocks": adapter.blocks, "unet": dataclasses.asdict(unet.cfg),
                                 "state": adapter.state_dict(), **(extra or {})})


def load_adapter(path: str, unet: md.UNet) -> Adapter:
    """An adapter file written by train.py --stage adapter, checked against the UNet it will feed."""
    ck = config.refuse_non_finite(config.load_checkpoint(path), path)
    if ck.get("kind") != "adapter":
        raise ValueError(f"{path}: not an adapter file (kind {ck.get('kind')!r}); train.py --stage adapter writes one")
    if list(ck["unet"]["channels"]) != list(unet.cfg.channels):
        raise ValueError(f"{path}: the adapter feeds UNet channels {tuple(ck['unet']['channels'])}, this UNet has {unet.cfg.channels}")
    adapter = Adapter(unet.cfg, ck["factor"], ck["cond_channels"], ck["blocks"])
    adapter.load_state_dict(ck["state"])
    adapter.edge_threshold = ck.get("edge_threshold", PluginConfig.edge_threshold)   # edges as in its training
    return adapter.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------------
# 5.4 Inpainting with the base model's machinery
# ----------------------------------------------------------------------------------------------------
#
# The method: replace, in every x0 prediction, the latent cells outside the mask by the known image's latent
# (x0 <- keep * z_known + (1 - keep) * x0). Every sampler here moves from x0 predictions, so the known region
# is then exactly what each step would produce had the network predicted it perfectly:
#   - DDIM (deterministic): x_{t'} = alpha' x0 + sigma' eps(x_t, x0), which in the kept cells is the known
#     latent noised with the *same* noise as x_t -- a consistent forward trajectory of the known image
#     (blended latent diffusion, Avrahami et al. 2023, in x0 form);
#   - UFOGen's re-noising sampler: x_{t'} ~ q(x_{t'} | x0) re-noises the known latent afresh (RePaint's
#     known-region sample, Lugmayr et al. 2022), and the generator harmonises the masked region with it;
#   - one step from pure noise: x_T carries no trace of the image (alpha_T = 0), so the masked region is
#     generated blind; starting lower (strength < 1: x_{t_start} = q(z_known)) or taking a few steps lets
#     the known region inform it. The report measures all three.
# The returned latent equals z_known in every kept cell, exactly. A cell is kept only if none of its 8x8
# pixels is masked (latent_keep). The decoder then blurs across the boundary, so Pipeline.images pastes
# the original pixels back outside the mask (paste=True, A1111's and diffusers' apply_overlay), and the
# keep-region PSNR *without* the paste is bounded by the VAE's reconstruction.

def latent_keep(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask (B, 1, H, W), 1 = regenerate -> latent keep mask (B, 1, H/f, W/f), 1 = cell fully unmasked."""
    return 1 - F.max_pool2d(mask.float(), factor)


def inpaint_denoiser(denoise, z_known: torch.Tensor, keep: torch.Tensor):
    """A denoiser whose x0 is the known latent wherever keep = 1: (x, t) -> keep z_known + (1 - keep) x0."""
    def blended(x, t):
        return keep * z_known + (1 - keep) * denoise(x, t)
    return blended
