"""
MobileDiffusion's diffusion UNet (Zhao et al., "MobileDiffusion: Instant Text-to-Image Generation on
Mobile Devices"), Section 3, Figure 2, Table 1 and Appendix B / Table 6.

What lives here, in the paper's order:
  3.1  a UViT-style UNet: convolutions at high resolution, transformers concentrated at the 16x16 bottleneck
  3.2  transformer optimisations, each a switch in UNetConfig:
         - scale up the backbone at 16x16 (channels[-1] = 1024, depth 3 after every innermost conv block)
         - decouple SA from CA (self_attn / cross_attn per level; SA only at 16x16)
         - shared key-value projection in self-attention (shared_kv, W_K = W_V)
         - swish instead of gelu in the gated linear unit (ff_act)
         - softmax -> relu attention, finetuned from a softmax model (attn_act; same weights load under both)
         - feed-forward expansion 3 instead of 4 (ff_mult)
  3.3  convolution optimisations: separable (ConvNeXt-like, 3x3 depthwise) blocks everywhere but the
       two outer levels (conv_type per level; Table 6, where 3.3's text says "the outermost level"), and
       pruned residual blocks (down_layers: 1 per level except the innermost; Table 6's 11, the text's "12")
  3    the text encoder: CLIP-ViT/L14's text transformer and BPE tokenizer, written out (TextEncoder,
       TextEncoder.from_pretrained for real weights), and a tiny word-level one (TEXT_PRESETS)
  3.4  the presets of Table 1 / Table 6 (PRESETS: "md", "md-lite", "sd" baseline, "tiny") and the cost
       accounting of Table 1 (count_macs, table1)

Run it:
  python md.py                                  # Table 1 by our own count: md, md-lite, sd at 512px
  python md.py --preset md-lite --resolution 256
  python md.py --preset tiny --resolution 64 --attn_act softmax   # any config field is a flag
  python md.py --preset tiny --resolution 64 --bench              # + CPU time of forward(+backward)
"""

import argparse
import dataclasses
import json
import math
import os
import re
import statistics
import time
import zlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import config


# ----------------------------------------------------------------------------------------------------
# Config (one dataclass; paper values as defaults; presets in PRESETS)
# ----------------------------------------------------------------------------------------------------

@dataclass
class UNetConfig:
    # --- I/O -----------------------------------------------------------------------------------------
    in_channels: int = 8             # 3.5: the VAE has c=8 latent channels (SD uses 4)
    context_dim: int = 768           # 3: CLIP-ViT/L14 text encoder, (B, 77, 768)
    # --- 3.1/Table 6 layout, one entry per resolution level (64x64, 32x32, 16x16 latent at 512px) ----
    # Where the paper's text and its tables disagree, the tables win: they are what Table 1's 386M params and
    # 182 GFLOPs count (within 1.5% by our count, `python md.py`), while the prose reads like an earlier draft.
    #  - 3.2 says SA is dropped "at 32x32 ... and the outer 16x16 stack", keeping full blocks only "in the
    #    inner 16x16 stack and the innermost bottleneck stack"; Table 6 has SA+CA in both 16x16 stacks
    #    (Down-3 and Up-3) and no separate bottleneck. We follow Table 6: self_attn only at 16x16, both stacks.
    #  - 3.3 says the residual blocks go "from 22 (in SD) to ... 12"; Table 6 counts 1+1+2+3+2+2 = 11 (conv_in
    #    and the resampling convs are not residual blocks). We build Table 6's 11.
    #  - 3.3 keeps full convs "except for the outermost level" (one level); Table 6 has FullConv at Down/Up-1
    #    and Down/Up-2, i.e. the two outer levels. We follow Table 6: conv_type ("full", "full", "sep").
    channels: tuple = (320, 640, 1024)          # Table 1; 3.2 "1024 is the best channel dimension"
    conv_type: tuple = ("full", "full", "sep")  # 3.3 + Table 6: separable conv except the two outer levels
    down_layers: tuple = (1, 1, 2)              # 3.3 pruning: 1 block per level except innermost; up = down+1
    down_depth: tuple = (0, 1, 3)               # Table 6: transformer layers after each down conv block
    up_depth: tuple = (0, 1, 3)                 # Table 6: ... after each up conv block (md-lite: 2 at 16x16)
    self_attn: tuple = (False, False, True)     # 3.2 decouple SA from CA: SA only in the 16x16 stacks
    cross_attn: tuple = (False, True, True)     # 3.2: CA kept at 32x32 (cheap: 77 text tokens)
    mid_block: bool = False                     # 3.4: MD merges SD's middle block into the innermost level
    mid_depth: int = 1                          # SA+CA layers in the mid block (SD: 1), if mid_block
    pooled_text: bool = False                   # add the mean text embedding to the time embedding (SDXL/Imagen
                                                # do; MD does not say so: off for md, see the tiny preset)
    # --- 3.2 transformer ----------------------------------------------------------------------------
    head_dim: int = 64               # channels per attention head (64/head is common), unless `heads` is set
    heads: int = 0                   # > 0: this many heads at every level instead (SD-1.5: 8, head_dim 40..160)
    attn_norm_eps: float = 1e-5      # eps of the GroupNorm before each transformer stack (SD's diffusers: 1e-6)
    shared_kv: bool = True           # 3.2: W_K = W_V in self-attention (~5% fewer params)
    attn_act: str = "relu"           # 3.2: "softmax" -> "relu", finetuned from a softmax model
    ff_act: str = "swish"            # 3.2: "gelu" -> "swish" in the GLU (fp16/int8-friendly)
    ff_mult: int = 3                 # 3.2: GLU expansion 4 -> 3 (~10% fewer params)
    # --- 3.3 convolution -----------------------------------------------------------------------------
    sep_kernel: int = 3              # 3.3: 3x3 depthwise; 7x7 / 9x9 "did not provide additional improvements"
    sep_mult: int = 3                # SPConv 1x1 expansion; unstated in the paper: 3 (like ff_mult) puts md within
                                     # 1.5% of Table 1 on params and GMACs, ConvNeXt's 4 within 2.5%
    norm_groups: int = 32            # GroupNorm groups in conv blocks and before each transformer stack
    dropout: float = 0.0             # residual-block dropout (SD: 0.0)


PRESETS = {
    # Table 6, MD: 11 conv blocks, 15 SA + 18 CA, 386M params, 182 GFLOPs (=GMACs) at 512px.
    "md": UNetConfig(),
    # Table 6, MD-Lite: innermost channels 896 and 2 transformer layers per Up-3 stack.
    "md-lite": UNetConfig(channels=(320, 640, 896), up_depth=(0, 1, 2)),
    # Stable Diffusion 1.5's UNet written with the same blocks (Table 1's baseline row, 862M, 392 GFLOPs):
    # 4 levels, 2 full residual blocks per level, SA+CA at the three outer levels, a middle block,
    # softmax attention, separate K/V, GEGLU with expansion 4, 4 latent channels.
    "sd": UNetConfig(in_channels=4, channels=(320, 640, 1280, 1280), conv_type=("full",) * 4,
                     down_layers=(2, 2, 2, 2), down_depth=(1, 1, 1, 0), up_depth=(1, 1, 1, 0),
                     self_attn=(True, True, True, False), cross_attn=(True, True, True, False),
                     mid_block=True, heads=8, attn_norm_eps=1e-6, shared_kv=False, attn_act="softmax",
                     ff_act="gelu", ff_mult=4),                 # = pretrained.load_unet of SD-1.5's config.json
    # The MD topology, narrow: a few million params, trains on a 2-core CPU at 32px (an 8x8 latent, f = 4).
    # Softmax attention because the tiny run trains from scratch; 3.2 finetunes into relu afterwards.
    # pooled_text: with cross-attention alone a run of minutes does not learn the shape's colour; adding the
    # mean text embedding to the time embedding gives every conv block the caption, at no extra cost
    # (the ablation: docs/results.md).
    "tiny": UNetConfig(context_dim=128, channels=(32, 64, 128), head_dim=32, norm_groups=8,
                       attn_act="softmax", pooled_text=True),
}


def validate(cfg: UNetConfig) -> None:
    """Fail early with a message that names the field, instead of a shape error deep in forward."""
    n = len(cfg.channels)
    for name in ("conv_type", "down_layers", "down_depth", "up_depth", "self_attn", "cross_attn"):
        if len(getattr(cfg, name)) != n:
            raise ValueError(f"UNetConfig.{name} has {len(getattr(cfg, name))} entries, expected {n} "
                             f"(one per level of channels={cfg.channels})")
    for i, (c, kind) in enumerate(zip(cfg.channels, cfg.conv_type)):
        if kind not in ("full", "sep"):
            raise ValueError(f"UNetConfig.conv_type[{i}] = {kind!r}, expected 'full' or 'sep'")
        if c % cfg.norm_groups:
            raise ValueError(f"UNetConfig.channels[{i}] = {c} is not divisible by norm_groups = {cfg.norm_groups}")
        has_tf = cfg.down_depth[i] or cfg.up_depth[i] or (cfg.mid_block and i == n - 1)
        split, what = (cfg.heads, "heads") if cfg.heads else (cfg.head_dim, "head_dim")
        if has_tf and c % split:
            raise ValueError(f"UNetConfig.channels[{i}] = {c} is not divisible by {what} = {split} "
                             f"(attention heads must split the channels evenly)")
    if cfg.channels[0] % 2:
        raise ValueError(f"UNetConfig.channels[0] = {cfg.channels[0]} must be even (sinusoidal time embedding)")
    if cfg.attn_act not in ("softmax", "relu"):
        raise ValueError(f"UNetConfig.attn_act = {cfg.attn_act!r}, expected 'softmax' or 'relu'")
    if cfg.ff_act not in ("swish", "gelu"):
        raise ValueError(f"UNetConfig.ff_act = {cfg.ff_act!r}, expected 'swish' or 'gelu'")
    if cfg.sep_kernel % 2 == 0:
        raise ValueError(f"UNetConfig.sep_kernel = {cfg.sep_kernel} must be odd (same-size padding)")


# ----------------------------------------------------------------------------------------------------
# Timestep embedding (DDPM/SD: sinusoidal features -> 2-layer MLP, shared by every conv block)
# ----------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Transformer sinusoidal features of the (possibly fractional) timestep, [cos | sin] like SD.
    t: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]                          # (B, dim/2)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)      # (B, dim)


# ----------------------------------------------------------------------------------------------------
# 3.3 Optimize convolution: full residual block vs separable block
# ----------------------------------------------------------------------------------------------------

class ResBlock(nn.Module):
    """'FullConv' of Table 6: SD's residual block, GN-SiLU-Conv3x3 (+time) GN-SiLU-Conv3x3, + skip.
    Kept only at the two outer levels, where channels are narrow (Table 6; 3.3's text says one level)."""

    def __init__(self, c_in: int, c_out: int, c_time: int, cfg: UNetConfig):
        super().__init__()
        self.norm1 = nn.GroupNorm(cfg.norm_groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.time = nn.Linear(c_time, c_out)
        self.norm2 = nn.GroupNorm(cfg.norm_groups, c_out)
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)       # zero-init: the block starts as the skip
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, temb):                                   # x (B, c_in, H, W), temb (B, c_time)
        h = self.conv1(F.silu(self.norm1(x)))                     # (B, c_out, H, W)
        h = h + self.time(F.silu(temb))[:, :, None, None]         # additive time conditioning, like SD
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))       # (B, c_out, H, W)
        return self.skip(x) + h


class SepConvBlock(nn.Module):
    """'SPConv' of Figure 2 / Table 6: a ConvNeXt-like block with a 3x3 (not 7x7) depthwise conv (3.3):
    DW kxk -> GroupNorm -> 1x1 expand (x sep_mult) -> swish -> 1x1 project, + skip.
    Separable convs cost 9*C + 2*mult*C^2 per pixel instead of 18*C^2 for two full 3x3 convs.
    A channel change (the concatenated skip connections of the up path) goes through a 1x1 conv
    first, as ConvNeXt changes width with a separate layer, so the block itself is width-preserving."""

    def __init__(self, c_in: int, c_out: int, c_time: int, cfg: UNetConfig):
        super().__init__()
        self.proj = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.dw = nn.Conv2d(c_out, c_out, cfg.sep_kernel, padding=cfg.sep_kernel // 2, groups=c_out)
        self.time = nn.Linear(c_time, c_out)
        self.norm = nn.GroupNorm(cfg.norm_groups, c_out)
        self.pw1 = nn.Conv2d(c_out, cfg.sep_mult * c_out, 1)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pw2 = nn.Conv2d(cfg.sep_mult * c_out, c_out, 1)     # zero-init: the block starts as the skip

    def forward(self, x, temb):                                   # x (B, c_in, H, W)
        x = self.proj(x)                                          # (B, c_out, H, W)
        h = self.dw(x) + self.time(F.silu(temb))[:, :, None, None]
        h = self.pw1(self.norm(h))                                # (B, mult*c_out, H, W)
        h = self.pw2(self.dropout(F.silu(h)))                     # (B, c_out, H, W)
        return x + h


# ----------------------------------------------------------------------------------------------------
# 3.2 Optimize transformer
# ----------------------------------------------------------------------------------------------------

class Attention(nn.Module):
    """Multi-head attention x = phi(Q K^T / sqrt(d)) V (3.2), self- or cross-.

    shared_kv (3.2, self-attention only): one projection W_K = W_V produces both keys and values, which
    removes one d x d matrix per SA layer. Cross-attention keeps separate K/V (the paper shares only in SA).

    attn_act (3.2):
      softmax: the usual normalisation over keys.
      relu:    phi(s) = relu(s) / L, L = number of keys. This is Wortsman et al. 2023 (the paper's [57]):
               the point-wise relu needs no exp and no cross-key reduction, and dividing by the sequence
               length keeps the attention weights summing to O(1) like softmax's, which is what lets a
               softmax-trained model be finetuned into a relu one (same parameters; only phi changes).
    The matmuls are written out (not F.scaled_dot_product_attention) so that one code path serves both
    nonlinearities and the FLOP counter sees Q K^T and A V. At the 16x16 bottleneck the sequence is only
    256 tokens, so the (B, heads, 256, 256) score tensor is small even at the paper's batch sizes."""

    def __init__(self, dim: int, context_dim: int, cfg: UNetConfig, cross: bool):
        super().__init__()
        self.heads, self.act = cfg.heads or dim // cfg.head_dim, cfg.attn_act
        self.scale = (dim // self.heads) ** -0.5
        self.shared_kv = cfg.shared_kv and not cross
        kv_in = context_dim if cross else dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        if self.shared_kv:
            self.to_kv = nn.Linear(kv_in, dim, bias=False)                 # W_K = W_V
        else:
            self.to_k = nn.Linear(kv_in, dim, bias=False)
            self.to_v = nn.Linear(kv_in, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)                                  # zero-init (residual branch)

    def forward(self, x, context=None):                          # x (B, N, dim), context (B, L, ctx) or None
        src = x if context is None else context
        q = self.to_q(x)                                         # (B, N, dim)
        if self.shared_kv:
            k = v = self.to_kv(src)                              # (B, L, dim), the same tensor twice
        else:
            k, v = self.to_k(src), self.to_v(src)                # (B, L, dim) each
        q, k, v = (rearrange(z, "b n (h d) -> b h n d", h=self.heads) for z in (q, k, v))
        s = (q * self.scale) @ k.transpose(-1, -2)               # (B, h, N, L) scores
        if self.act == "softmax":
            a = s.softmax(dim=-1)
        else:
            a = F.relu(s) / s.shape[-1]                          # [57]: relu(s) / L
        o = a @ v                                                # (B, h, N, d)
        return self.to_out(rearrange(o, "b h n d -> b n (h d)"))


class GLUFeedForward(nn.Module):
    """Gated linear unit feed-forward (Shazeer 2020, the paper's [50]): W_out (h * act(g)), where
    [h, g] = W_in x has 2 * ff_mult * dim outputs. 3.2: act = swish instead of gelu (gelu's tanh
    approximation has a cubic term that overflows/accumulates error in fp16/int8), expansion 3 not 4."""

    def __init__(self, dim: int, cfg: UNetConfig):
        super().__init__()
        self.act = F.silu if cfg.ff_act == "swish" else F.gelu
        self.proj_in = nn.Linear(dim, 2 * cfg.ff_mult * dim)
        self.proj_out = nn.Linear(cfg.ff_mult * dim, dim)                  # zero-init (residual branch)

    def forward(self, x):                                        # (B, N, dim)
        h, g = self.proj_in(x).chunk(2, dim=-1)                  # (B, N, mult*dim) each
        return self.proj_out(h * self.act(g))                    # (B, N, dim)


class TransformerLayer(nn.Module):
    """One layer: [SA] + [CA] + FF, pre-LayerNorm residuals (SD's BasicTransformerBlock).
    SA is optional (3.2 'decouple SA from CA'): at 32x32 the layer is CA + FF only."""

    def __init__(self, dim: int, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim) if self_attn else None
        self.sa = Attention(dim, dim, cfg, cross=False) if self_attn else None
        self.norm_ca = nn.LayerNorm(dim) if cross_attn else None
        self.ca = Attention(dim, cfg.context_dim, cfg, cross=True) if cross_attn else None
        self.norm_ff = nn.LayerNorm(dim)
        self.ff = GLUFeedForward(dim, cfg)

    def forward(self, x, context):                               # x (B, N, dim)
        if self.sa is not None:
            x = x + self.sa(self.norm_sa(x))
        if self.ca is not None:
            x = x + self.ca(self.norm_ca(x), context)
        return x + self.ff(self.norm_ff(x))


class Transformer2D(nn.Module):
    """A stack of `depth` TransformerLayers on a feature map: GroupNorm -> linear in -> layers -> linear out,
    added to the input (SD's Transformer2DModel). This is one '(SA x3 + CA x3)' entry of Table 6."""

    def __init__(self, dim: int, depth: int, cfg: UNetConfig, self_attn: bool, cross_attn: bool):
        super().__init__()
        self.norm = nn.GroupNorm(cfg.norm_groups, dim, eps=cfg.attn_norm_eps)
        self.proj_in = nn.Linear(dim, dim)
        self.layers = nn.ModuleList(TransformerLayer(dim, cfg, self_attn, cross_attn) for _ in range(depth))
        self.proj_out = nn.Linear(dim, dim)                                # zero-init (residual branch)

    def forward(self, x, context):                               # x (B, C, H, W)
        h, w = x.shape[-2:]
        z = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, HW, C)
        for layer in self.layers:
            z = layer(z, context)
        z = rearrange(self.proj_out(z), "b (h w) c -> b c h w", h=h, w=w)  # (B, C, H, W)
        return x + z


# ----------------------------------------------------------------------------------------------------
# 3.1 The UNet (Figure 2, Table 6)
# ----------------------------------------------------------------------------------------------------

class Downsample(nn.Module):
    """3x3 conv with stride 2 (SD)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, H/2, W/2)
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x then a 3x3 conv (SD)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):                                        # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Block(nn.Module):
    """One conv block followed (optionally) by one transformer stack: the unit Table 6 counts."""

    def __init__(self, c_in: int, c_out: int, level: int, depth: int, cfg: UNetConfig,
                 sa: bool | None = None, ca: bool | None = None):
        super().__init__()
        c_time = 4 * cfg.channels[0]
        block = SepConvBlock if cfg.conv_type[level] == "sep" else ResBlock
        self.conv = block(c_in, c_out, c_time, cfg)
        sa = cfg.self_attn[level] if sa is None else sa           # the level's 3.2 SA/CA switches,
        ca = cfg.cross_attn[level] if ca is None else ca          # unless given (SD's mid block has both)
        self.attn = Transformer2D(c_out, depth, cfg, sa, ca) if depth > 0 and (sa or ca) else None
        self.grad_checkpoint = False                              # set_grad_checkpointing

    def forward(self, x, temb, context):
        if self.grad_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, temb, context, use_reentrant=False)
        return self._forward(x, temb, context)

    def _forward(self, x, temb, context):
        x = self.conv(x, temb)
        return x if self.attn is None else self.attn(x, context)


def set_grad_checkpointing(model: nn.Module, on: bool = True) -> nn.Module:
    """Gradient checkpointing (Chen et al. 2016) of every Block in `model` (a UNet, or UFOGen's D built from
    one): a Block keeps only its inputs for the backward and recomputes its residual block and transformer
    stack there, so training activations shrink to about one Block's at a time for one more forward of
    compute (~1.33x a step's FLOPs). For 512px and UFOGen's full finetune, where activations do not fit
    (train.py --grad_checkpoint; the memory saved: docs/results.md). Dropout draws the same mask in the
    recomputation (checkpoint restores the RNG state). Returns model."""
    for m in model.modules():
        if isinstance(m, Block):
            m.grad_checkpoint = on
    return model


class UNet(nn.Module):
    """eps/v/x0-prediction network: unet(x (B, in_channels, H, W), t (B,), context (B, L, context_dim))
    -> (B, in_channels, H, W). What it predicts is the diffusion stage's choice, not the network's.

    Layout (md, 512px image -> 64x64 latent; Table 6):
      conv_in 8->320
      Down-1 64x64  FullConv x1                                   -> Downsample
      Down-2 32x32  FullConv x1 + (CA+FF)                         -> Downsample
      Down-3 16x16  SPConv x2, each + (SA+CA+FF) x3
      Up-3   16x16  SPConv x3, each + (SA+CA+FF) x3               -> Upsample
      Up-2   32x32  FullConv x2, each + (CA+FF)                   -> Upsample
      Up-1   64x64  FullConv x2
      GN-SiLU-conv_out 320->8
    Down-3 and Up-3 together are the '5 layers in the middle' of 3.4 (no separate middle block).
    Skip connections are SD's: every down-path output (and conv_in's) is concatenated into one up block,
    which is why each up level has one block more than its down level."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        ch, n = cfg.channels, len(cfg.channels)
        c_time = 4 * ch[0]
        self.time_mlp = nn.Sequential(nn.Linear(ch[0], c_time), nn.SiLU(), nn.Linear(c_time, c_time))
        self.text_to_time = nn.Linear(cfg.context_dim, c_time) if cfg.pooled_text else None
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)

        skips, c = [ch[0]], ch[0]                     # channels of every tensor pushed on the skip stack
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            stages = nn.ModuleList()
            for _ in range(cfg.down_layers[i]):
                stages.append(Block(c, ch[i], i, cfg.down_depth[i], cfg))
                c = ch[i]
                skips.append(c)
            self.down.append(stages)
            if i < n - 1:
                self.downsample.append(Downsample(c))
                skips.append(c)

        self.mid = None
        if cfg.mid_block:                             # SD's res-(SA+CA)-res bottleneck (3.4: MD drops it)
            self.mid = nn.ModuleList([Block(c, c, n - 1, cfg.mid_depth, cfg, sa=True, ca=True),
                                      Block(c, c, n - 1, 0, cfg)])

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i in reversed(range(n)):
            stages = nn.ModuleList()
            for _ in range(cfg.down_layers[i] + 1):
                stages.append(Block(c + skips.pop(), ch[i], i, cfg.up_depth[i], cfg))
                c = ch[i]
            self.up.append(stages)
            if i > 0:
                self.upsample.append(Upsample(c))
        assert not skips, "every skip connection is consumed"

        self.norm_out = nn.GroupNorm(cfg.norm_groups, c)
        self.conv_out = nn.Conv2d(c, cfg.in_channels, 3, padding=1)
        self.initialize_weights()

    def initialize_weights(self):
        """All initialisation in one place.
        - Linear layers: Xavier-uniform, biases zero (DiT); convs keep PyTorch's Kaiming-uniform default.
        - The last layer of every residual branch (ResBlock.conv2, SepConvBlock.pw2, Attention.to_out,
          GLUFeedForward.proj_out, Transformer2D.proj_out) is zero-initialised, so that at step 0 every
          block is the identity and the 33 attention layers of md cannot blow up the activations of a
          deep untrained stack (guided-diffusion's zero_module, DiT's adaLN-Zero idea).
        - conv_out stays random: with every branch at identity the network is then a small random
          function of its input, and the gradient reaches every branch from the first step on
          (zero-initialising conv_out too would delay that by one step)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, ResBlock):
                last = m.conv2
            elif isinstance(m, SepConvBlock):
                last = m.pw2
            elif isinstance(m, Attention):
                last = m.to_out
            elif isinstance(m, (GLUFeedForward, Transformer2D)):
                last = m.proj_out
            else:
                continue
            nn.init.zeros_(last.weight)
            if last.bias is not None:
                nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """features: 5.4's structure control, one tensor per level (B, C_i, H/2^i, W/2^i) from a T2I-Adapter
        (plugins.Adapter), added to the output of that level's first encoder block (diffusers'
        down_intrablock_additional_residuals), so the rest of the level and its skips carry it."""
        cfg, n = self.cfg, len(self.cfg.channels)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet input x: expected (B, in_channels={cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = 2 ** (n - 1)
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"UNet input x: latent size {tuple(x.shape[-2:])} is not divisible by {f} "
                             f"(= 2^{n - 1} downsamplings); the image resolution must be divisible by {8 * f}")
        if context.ndim != 3 or context.shape[-1] != cfg.context_dim:
            raise ValueError(f"UNet context: expected (B, L, context_dim={cfg.context_dim}), got {tuple(context.shape)}")
        t = t.expand(x.shape[0]) if t.ndim == 0 else t

        temb = self.time_mlp(timestep_embedding(t, cfg.channels[0]).to(x.dtype))  # (B, 4*C0)
        if self.text_to_time is not None:                         # global text conditioning of every conv block
            temb = temb + self.text_to_time(context.mean(dim=1))   # (B, L, ctx) -> (B, ctx) -> (B, 4*C0)
        h = self.conv_in(x)                                       # (B, C0, H, W)
        skips = [h]
        if features is not None and [tuple(f.shape[1:]) for f in features] != self.feature_shapes(x):
            raise ValueError(f"UNet features: expected shapes (B, C, h, w) with (C, h, w) = {self.feature_shapes(x)}, "
                             f"got {[tuple(f.shape[1:]) for f in features]}")
        for i in range(n):
            for j, stage in enumerate(self.down[i]):
                h = stage(h, temb, context)                       # (B, C_i, H/2^i, W/2^i)
                if features is not None and j == 0:
                    h = h + features[i]
                skips.append(h)
            if i < n - 1:
                h = self.downsample[i](h)                         # (B, C_i, H/2^(i+1), W/2^(i+1))
                skips.append(h)
        if self.mid is not None:
            for stage in self.mid:
                h = stage(h, temb, context)
        for j, stages in enumerate(self.up):                      # levels n-1 ... 0
            for stage in stages:
                h = stage(torch.cat([h, skips.pop()], dim=1), temb, context)  # (B, C_i + C_skip, ...) -> (B, C_i, ...)
            if j < n - 1:
                h = self.upsample[j](h)                           # (B, C_i, 2x, 2x)
        return self.conv_out(F.silu(self.norm_out(h)))           # (B, in_channels, H, W)

    @classmethod
    def from_diffusers(cls, folder: str) -> "UNet":
        """A diffusers UNet2DConditionModel folder of SD-1.x's layout (or a pipeline folder holding unet/):
        pretrained.load_unet, where the config conversion and the weight renames live."""
        import pretrained                                          # pretrained.py imports this file
        return pretrained.load_unet(folder)

    def feature_shapes(self, x: torch.Tensor) -> list[tuple]:
        """(C_i, H/2^i, W/2^i) of each level's encoder features for a latent x: what an adapter must produce."""
        return [(c, x.shape[-2] >> i, x.shape[-1] >> i) for i, c in enumerate(self.cfg.channels)]


# ----------------------------------------------------------------------------------------------------
# 3 (intro) The text encoder: "We employ the CLIP-ViT/L14 as the text encoder"
# ----------------------------------------------------------------------------------------------------

@dataclass
class TextConfig:
    tokenizer: str = "clip"          # "clip": CLIP's BPE (vocab.json + merges.txt); "bytes": UTF-8 bytes; "words":
                                     # a hashed word per token (Tokenizer); bytes and words need no files
    vocab_size: int = 49408          # CLIP; bytes: 256 + 3 specials; words: bos_id buckets + 3 specials
    max_len: int = 77                # CLIP's context: 77 tokens including <start>/<end>
    width: int = 768                 # CLIP-ViT/L14 text width = UNetConfig.context_dim
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    bos_id: int = 49406              # <|startoftext|>
    eos_id: int = 49407              # <|endoftext|>, also the padding token (SD's convention)
    pad_id: int = 49407
    train: bool = False              # 3: CLIP stays frozen; the tiny word-token encoder is trained jointly


TEXT_PRESETS = {
    "clip-l14": TextConfig(),
    # A small encoder for the synthetic captions: no files needed. Word tokens, as CLIP's BPE makes of these
    # common words, hashed into 1024 buckets (no vocabulary file); the bytes of a word would spread it over 3-6
    # positions, which the UNet must then learn to bind (docs/results.md has both ablations). Trained jointly
    # with the tiny UNet (the paper's CLIP is frozen, but a frozen *random* encoder is a harder read-out);
    # `--text_train false` reruns the frozen variant. 16 tokens: the longest caption ("... in outlined style")
    # is 12 with <start>/<end>; CLIP's 77 would spend most of the text and cross-attention work on padding.
    "tiny": TextConfig(tokenizer="words", vocab_size=1027, max_len=16, width=128, layers=2, heads=4, bos_id=1024,
                       eos_id=1025, pad_id=1026, train=True),
}


def _bytes_to_unicode() -> dict:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + list(range(ord("\xae"), ord("\xff") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# CLIP's word split: letter runs, single digits, punctuation runs. CLIP's pattern uses \p{L}/\p{N} (the `regex`
# package); [^\W\d_] / \d are the same classes in `re`.
WORD_PATTERN = re.compile(r"[^\W\d_]+|\d|[^\s\w]+|_+")


class Tokenizer:
    """CLIP's tokenizer, written out: lower-case, whitespace-clean, split into words (letters / single digits /
    punctuation runs), map bytes to unicode, apply BPE merges by rank with '</w>' marking word ends; then
    <start> ids <end>, truncated (with a warning) and padded to max_len. Without files:
    cfg.tokenizer == "bytes": the UTF-8 bytes are the ids;
    cfg.tokenizer == "words": CLIP's lower-cased word split, each word's id its CRC-32 mod bos_id (the buckets
    below the special ids). Two words may share a bucket; the tiny captions' 15 words do not (a test checks)."""

    def __init__(self, cfg: TextConfig, bpe: tuple[dict, list] | None = None):
        self.cfg, self.warned = cfg, False
        if cfg.tokenizer in ("bytes", "words"):
            return
        if cfg.tokenizer != "clip":
            raise ValueError(f"TextConfig.tokenizer = {cfg.tokenizer!r}: expected 'clip', 'bytes' or 'words'")
        if bpe is None:
            raise ValueError("TextConfig.tokenizer = 'clip' needs CLIP's vocabulary and merges (read_bpe of a local "
                             "CLIP tokenizer folder)")
        self.encoder, merges = bpe                                # token -> id, [(a, b), ...] by rank
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _bytes_to_unicode()
        self.cache = {}
        self.pat = re.compile(r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|" + WORD_PATTERN.pattern,
                              re.IGNORECASE)

    def bpe(self, word: str) -> list[str]:
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = [(self.ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
            rank, i = min(pairs)
            if rank == float("inf"):
                break
            a, b = parts[i], parts[i + 1]
            merged, j = [], 0                                     # merge every occurrence of (a, b)
            while j < len(parts):
                if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                    merged.append(a + b)
                    j += 2
                else:
                    merged.append(parts[j])
                    j += 1
            parts = merged
        self.cache[word] = parts
        return parts

    def ids(self, text: str) -> list[int]:
        if self.cfg.tokenizer == "bytes":
            return list(text.encode("utf-8"))
        if self.cfg.tokenizer == "words":
            return [zlib.crc32(w.encode("utf-8")) % self.cfg.bos_id for w in WORD_PATTERN.findall(text.lower())]
        text = " ".join(text.split()).lower()
        out = []
        for word in self.pat.findall(text):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            out += [self.encoder[p] for p in self.bpe(word)]
        return out

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        """(B, max_len) token ids: <start> ... <end> <pad> ..."""
        cfg, rows = self.cfg, []
        for p in prompts:
            ids = self.ids(p)
            if len(ids) > cfg.max_len - 2:
                if not self.warned:
                    print(f"warning: prompt truncated to {cfg.max_len} tokens: {p[:60]!r}...")
                    self.warned = True
                ids = ids[:cfg.max_len - 2]
            ids = [cfg.bos_id] + ids + [cfg.eos_id]
            rows.append(ids + [cfg.pad_id] * (cfg.max_len - len(ids)))
        return torch.tensor(rows, dtype=torch.long)


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(cfg.width, cfg.width) for _ in range(4))

    def forward(self, x, mask):                                   # x (B, L, D), mask (L, L) additive
        q, k, v = (rearrange(p(x), "b l (h d) -> b h l d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        a = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask).softmax(-1)   # (B, h, L, L)
        return self.out_proj(rearrange(a @ v, "b h l d -> b l (h d)"))


class CLIPLayer(nn.Module):
    """Pre-LN transformer layer with CLIP's quick-gelu MLP, x * sigmoid(1.702 x)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.layer_norm1, self.self_attn = nn.LayerNorm(cfg.width), CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.mlp.fc2 = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x, mask):
        x = x + self.self_attn(self.layer_norm1(x), mask)
        h = self.mlp.fc1(self.layer_norm2(x))
        return x + self.mlp.fc2(h * torch.sigmoid(1.702 * h))


def has_bpe_files(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, "vocab.json")) or os.path.isfile(os.path.join(folder, "tokenizer.json"))


def read_bpe(tokenizer_folder: str) -> tuple[dict, list]:
    """CLIP's (vocabulary, merges) from a tokenizer folder: vocab.json + merges.txt (what the hub's SD-1.5 and
    CLIP folders hold), else tokenizer.json, the only file transformers 5's save_pretrained writes (its
    model.vocab and model.merges, the same BPE)."""
    vocab_path, merges_path = (os.path.join(tokenizer_folder, f) for f in ("vocab.json", "merges.txt"))
    try:
        if os.path.isfile(vocab_path):
            with open(vocab_path, encoding="utf-8") as f:
                vocab = json.load(f)
            with open(merges_path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            return vocab, [tuple(l.split()) for l in lines[1:] if len(l.split()) == 2]   # line 0: a version header
        path = os.path.join(tokenizer_folder, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            model = json.load(f)["model"]
        return model["vocab"], [tuple(m.split() if isinstance(m, str) else m) for m in model["merges"]]
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{tokenizer_folder}: {e.filename} is missing (a CLIP tokenizer needs vocab.json and "
                                f"merges.txt, or tokenizer.json)") from None
    except (ValueError, KeyError, TypeError) as e:                 # bad JSON, or not a BPE tokenizer.json
        raise ValueError(f"{tokenizer_folder}: not a readable CLIP tokenizer ({type(e).__name__}: {e})") from None


def special_ids(tokenizer_folder: str, vocab: dict) -> tuple[int, int, int]:
    """(bos, eos, pad) token ids from the tokenizer's own files: the vocabulary's <|startoftext|> and
    <|endoftext|>, and tokenizer_config.json's pad_token (SD-1.5: <|endoftext|>; SD-2: "!"). The text encoder's
    config.json is not used for them: SD-1.5's still says transformers' legacy bos 0 / eos 2 / pad 1."""
    missing = [t for t in ("<|startoftext|>", "<|endoftext|>") if t not in vocab]
    if missing:
        raise ValueError(f"{tokenizer_folder}: no {', '.join(missing)} entry in the vocabulary (not a CLIP one)")
    pad = "<|endoftext|>"
    cfg_path = os.path.join(tokenizer_folder, "tokenizer_config.json")
    if os.path.isfile(cfg_path):
        p = config.read_json(cfg_path).get("pad_token", pad)
        pad = p.get("content", pad) if isinstance(p, dict) else (p or pad)
    if pad not in vocab:
        raise ValueError(f"{cfg_path}: pad_token {pad!r} is not in the vocabulary")
    return vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab[pad]


class TextEncoder(nn.Module):
    """CLIP's text transformer: token + position embeddings, causal pre-LN layers, final LayerNorm; the
    whole last hidden state (B, 77, D) conditions the UNet, as in SD. Parameter names match Hugging Face's
    CLIPTextModel ('text_model.*'), so real CLIP-ViT/L14 weights load as they are.
    Call it with a list of prompts: encoder(["a red circle ..."]) -> (B, max_len, width)."""

    def __init__(self, cfg: TextConfig, bpe: tuple[dict, list] | None = None):
        super().__init__()
        self.cfg = cfg
        self.source = None                                        # the local folder, if loaded by from_pretrained
        self.tokenizer = Tokenizer(cfg, bpe)
        self.text_model = nn.Module()
        self.text_model.embeddings = nn.Module()
        self.text_model.embeddings.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.text_model.embeddings.position_embedding = nn.Embedding(cfg.max_len, cfg.width)
        self.text_model.encoder = nn.Module()
        self.text_model.encoder.layers = nn.ModuleList(CLIPLayer(cfg) for _ in range(cfg.layers))
        self.text_model.final_layer_norm = nn.LayerNorm(cfg.width)
        # Causal mask: -1e4 rather than -inf (exp underflows to exactly 0 either way): an infinite constant
        # breaks weight compression and fp16 arithmetic in the on-device exports (export_coreml.py).
        self.register_buffer("causal", torch.full((cfg.max_len, cfg.max_len), -1e4).triu(1), persistent=False)
        nn.init.normal_(self.text_model.embeddings.token_embedding.weight, std=0.02)
        nn.init.normal_(self.text_model.embeddings.position_embedding.weight, std=0.01)

    def encode_ids(self, ids: torch.Tensor) -> torch.Tensor:     # (B, L) -> (B, L, D)
        tm, L = self.text_model, ids.shape[1]
        pos = torch.arange(L, device=ids.device)                  # position ids, as HF (a no-op slice of the
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding(pos)   # table would export as
        mask = (self.causal if L == self.cfg.max_len else self.causal[:L, :L]).to(x.dtype)  # an alias Core ML rejects)
        for layer in tm.encoder.layers:
            x = layer(x, mask)
        return tm.final_layer_norm(x)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.text_model.final_layer_norm.weight.device
        return self.encode_ids(self.tokenizer(list(prompts)).to(device))

    def pooled(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """CLIP's pooled text feature (B, D): the last hidden state at each prompt's first <|endoftext|>
        (transformers' CLIPTextModel pooler_output; for SD-1.5's legacy eos_token_id 2 it takes the argmax id,
        which is the same token, since <|endoftext|> is the vocabulary's last entry). SD conditions on the whole
        sequence; the pooled feature is what CLIP-score-like uses and SDXL-style conditioning need."""
        first_eos = (ids == self.cfg.eos_id).int().argmax(dim=-1)                 # (B,)
        return hidden[torch.arange(ids.shape[0], device=ids.device), first_eos]

    @classmethod
    def from_pretrained(cls, folder: str) -> "TextEncoder":
        """A local Hugging Face CLIP folder (openai/clip-vit-large-patch14 or an SD checkpoint's
        text_encoder/ + tokenizer/): config.json, model.safetensors or pytorch_model.bin, vocab.json +
        merges.txt or tokenizer.json (read_bpe). The weights are frozen (3: the paper keeps CLIP fixed)."""
        folder = os.path.join(folder, "text_encoder") if os.path.isdir(os.path.join(folder, "text_encoder")) else folder
        tok = next((d for d in (folder, os.path.join(os.path.dirname(folder.rstrip("/")), "tokenizer"))
                    if has_bpe_files(d)), None)
        if tok is None:
            raise FileNotFoundError(f"{folder}: no CLIP tokenizer (vocab.json + merges.txt, or tokenizer.json) here or "
                                    f"in ../tokenizer")
        cfg_path = os.path.join(folder, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{cfg_path}: missing (expected a Hugging Face CLIP folder)")
        hf = config.read_json(cfg_path)
        hf = hf.get("text_config", hf)                            # a full CLIPModel nests the text config
        if hf.get("hidden_act", "quick_gelu") != "quick_gelu":
            raise ValueError(f"{cfg_path}: hidden_act = {hf['hidden_act']!r}; this encoder implements CLIP's quick_gelu")
        bpe = read_bpe(tok)
        bos, eos, pad = special_ids(tok, bpe[0])
        cfg = TextConfig(vocab_size=hf.get("vocab_size", 49408), max_len=hf.get("max_position_embeddings", 77),
                         width=hf.get("hidden_size", 768), layers=hf.get("num_hidden_layers", 12),
                         heads=hf.get("num_attention_heads", 12),
                         mlp_ratio=hf.get("intermediate_size", 3072) // hf.get("hidden_size", 768),
                         bos_id=bos, eos_id=eos, pad_id=pad)
        model = cls(cfg, bpe)
        st, pt = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
        if os.path.isfile(st):
            sd = config.load_safetensors(st)
        elif os.path.isfile(pt):
            sd = torch.load(pt, map_location="cpu", weights_only=True)
        else:
            raise FileNotFoundError(f"{folder}: neither model.safetensors nor pytorch_model.bin")
        # Keys are "text_model.*" in CLIPModel and in transformers-4 CLIPTextModel files, bare ("encoder.*") in
        # transformers-5 ones; the vision tower and projections of a full CLIPModel are not needed.
        bare = ("embeddings.", "encoder.", "final_layer_norm.")
        sd = {("text_model." + k if k.startswith(bare) else k): v for k, v in sd.items()}
        sd = {k: v for k, v in sd.items() if k.startswith("text_model.") and "position_ids" not in k}
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if missing:
            raise ValueError(f"{folder}: weights do not fit a CLIP text model of width {cfg.width}, "
                             f"{cfg.layers} layers: missing {missing[:4]}")
        model.source = folder
        return model.requires_grad_(False).eval()


# ----------------------------------------------------------------------------------------------------
# 3.4 / Table 1: cost accounting by our own count
# ----------------------------------------------------------------------------------------------------

# Table 1 as printed in the paper (quoted, for comparison): #ConvBlocks, #SA, #CA, params (M), "GFLOPs".
# The paper's GFLOPs are multiply-accumulates: SD-1.5's UNet at 512px is ~400 G MACs (~800 G FLOPs).
PAPER_TABLE1 = {
    "SD-XL": ("(320, 640, 1280)", 17, 31, 31, 2600, 710),
    "SD-1.4/1.5": ("(320, 640, 1280, 1280)", 22, 16, 16, 862, 392),
    "SnapFusion": ("(320, 640, 1280, 1280)", 18, 14, 14, 848, 285),
    "DiT XL/2": ("(1152)", 0, 28, 0, 675, 525),
    "MobileDiffusion": ("(320, 640, 1024)", 11, 15, 18, 386, 182),
}


def count_blocks(cfg: UNetConfig) -> dict:
    """#conv blocks, #SA, #CA as Table 1 counts them (a transformer *layer* with SA counts one SA).
    Derived from the config alone, so the test can compare it with a count of the built modules."""
    n = len(cfg.channels)
    conv = sum(cfg.down_layers) + sum(d + 1 for d in cfg.down_layers) + (2 if cfg.mid_block else 0)
    sa = ca = 0
    for i in range(n):
        layers = cfg.down_layers[i] * cfg.down_depth[i] + (cfg.down_layers[i] + 1) * cfg.up_depth[i]
        sa += layers * cfg.self_attn[i]
        ca += layers * cfg.cross_attn[i]
    if cfg.mid_block:                                             # SD's middle transformer: SA + CA
        sa += cfg.mid_depth
        ca += cfg.mid_depth
    return {"conv": conv, "sa": sa, "ca": ca}


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, *inputs) -> int:
    """Multiply-accumulates of one forward, via torch.utils.flop_counter.FlopCounterMode (FLOPs / 2).
    It counts matmuls (linear layers and, because Attention writes them out, Q K^T and A V) and
    convolutions (grouped/depthwise convs correctly, by the weight's size); element-wise ops, norms and
    softmax are not counted, as in the paper's and SD's conventions. Run on the meta device, the count
    needs no memory and no compute, so md at 1024px counts in a second."""
    with FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops() // 2


def unet_cost(cfg: UNetConfig, resolution: int = 512, text_len: int = 77) -> dict:
    """Params (M), GMACs per UNet evaluation at `resolution` px (latent = resolution / 8) and block counts."""
    if resolution % 8:
        raise ValueError(f"resolution = {resolution} is not divisible by 8 (the VAE's downsampling factor f=8)")
    with torch.device("meta"):
        model = UNet(cfg)
        x = torch.zeros(1, cfg.in_channels, resolution // 8, resolution // 8)
        ctx = torch.zeros(1, text_len, cfg.context_dim)
        macs = count_macs(model, x, torch.zeros(1), ctx)
    return {**count_blocks(cfg), "params_m": count_params(model) / 1e6, "gmacs": macs / 1e9}


def table1(presets, resolution: int = 512, configs: dict | None = None) -> str:
    """Table 1 by our own count, with the paper's rows quoted beneath."""
    rows = [f"{'model':<16}{'#channels':<26}{'#conv':>6}{'#(SA+CA)':>10}{'params(M)':>11}{'GMACs':>9}   ({resolution}px)"]
    for name in presets:
        cfg = (configs or {}).get(name, PRESETS.get(name))
        c = unet_cost(cfg, resolution)
        rows.append(f"{name:<16}{str(tuple(cfg.channels)):<26}{c['conv']:>6}{str(c['sa']) + '+' + str(c['ca']):>10}"
                    f"{c['params_m']:>11.1f}{c['gmacs']:>9.2f}   measured")
    for name, (chs, conv, sa, ca, p, g) in PAPER_TABLE1.items():
        rows.append(f"{name:<16}{chs:<26}{conv:>6}{f'{sa}+{ca}':>10}{p:>11}{g:>9}   quoted (paper, 512px)")
    return "\n".join(rows)


def benchmark(cfg: UNetConfig, resolution: int, batch: int = 1, repeats: int = 5) -> dict:
    """Median wall time of one forward and one forward+backward on this machine's default device (CPU
    here), after a warm-up; the input is random, the weights freshly initialised."""
    model = UNet(cfg)
    x = torch.randn(batch, cfg.in_channels, resolution // 8, resolution // 8)
    t, ctx = torch.randint(0, 1000, (batch,)), torch.randn(batch, 77, cfg.context_dim)
    fwd, step = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(x, t, ctx)
        t1 = time.perf_counter()
        model(x, t, ctx).square().mean().backward()
        t2 = time.perf_counter()
        if i:                                                    # run 0 is the warm-up
            fwd.append(t1 - t0)
            step.append(t2 - t1)
    return {"forward_s": statistics.median(fwd), "fwd_bwd_s": statistics.median(step)}


def main():
    p = argparse.ArgumentParser(description="MobileDiffusion UNet: Table 1 by our own count (params, GMACs).")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="one preset (default: md, md-lite, sd)")
    p.add_argument("--resolution", type=int, default=512, help="image resolution in px (latent = resolution/8)")
    p.add_argument("--bench", action="store_true", help="also time forward and forward+backward (batch --batch)")
    p.add_argument("--batch", type=int, default=1, help="batch size for --bench")
    config.add_config_flags(p, UNetConfig, shown=UNetConfig(), note="md")
    args = p.parse_args()
    names = [args.preset] if args.preset else ["md", "md-lite", "sd"]
    configs = {name: config.config_from_args(PRESETS[name], args) for name in names}
    print(table1(names, args.resolution, configs))
    if args.bench:
        print(f"\nbenchmark on {torch.get_num_threads()} CPU threads, batch {args.batch}, {args.resolution}px:")
        for name in names:
            b = benchmark(configs[name], args.resolution, args.batch)
            print(f"  {name:<10} forward {1000 * b['forward_s']:9.1f} ms   forward+backward {1000 * b['fwd_bwd_s']:9.1f} ms")
    if args.preset is None:
        # 3.2's two parameter claims, on md, by the same count.
        md = configs["md"]
        base = unet_cost(md, args.resolution)["params_m"]
        sep_kv = unet_cost(dataclasses.replace(md, shared_kv=False), args.resolution)["params_m"]
        ff4 = unet_cost(dataclasses.replace(md, ff_mult=4), args.resolution)["params_m"]
        print(f"\n3.2 shared K/V in SA:  {sep_kv:.1f}M -> {base:.1f}M  (-{100 * (1 - base / sep_kv):.1f}%; paper: ~5%)")
        print(f"3.2 FF expansion 4->3: {ff4:.1f}M -> {base:.1f}M  (-{100 * (1 - base / ff4):.1f}%; paper: ~10%)")


if __name__ == "__main__":
    config.run_cli(main)
