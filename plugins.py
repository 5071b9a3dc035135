"""
5.4 Applications: plugins trained on the *base* diffusion model, used unchanged on the one-step UFOGen model.

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
  python plugins.py --report         # the plugin metrics on base DDIM-50 and 1-step UFOGen, and a grid
  python sample.py --ckpt out/tiny/ufogen.pt --lora out/tiny/lora.pt --prompt "a red circle on a blue background in outlined style"
"""

import argparse
import copy
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import data
import evaluate
import md
import sample as S
import ufogen as U


@dataclass
class PluginConfig:                  # train.py flags: --plugin_<field>
    lora_rank: int = 16              # style LoRA rank (4.3's LoRA, here on the base model)
    lora_alpha: float = 0.0          # 0 = alpha = rank (scale 1)
    lora_convs: bool = True          # a style is texture: the conv blocks get LoRA too, not only attention
    adapter_blocks: int = 2          # residual conv blocks per level in the T2I-Adapter (its "full" variant: 2)
    edge_threshold: float = 0.15     # Sobel magnitude (per unit colour step) above which a pixel is an edge


# ----------------------------------------------------------------------------------------------------
# 5.4 Personalised generation: a style LoRA on the base model, applied to any UNet of its architecture
# ----------------------------------------------------------------------------------------------------

def save_lora(path: str, unet: md.UNet, pcfg: PluginConfig, extra: dict | None = None) -> None:
    """Only the low-rank factors (a small file), with the rank/alpha/targets and the UNet config to check against."""
    import train
    train.save_checkpoint(path, {"kind": "lora", "rank": pcfg.lora_rank, "alpha": pcfg.lora_alpha,
                                 "convs": pcfg.lora_convs, "unet": dataclasses.asdict(unet.cfg),
                                 "state": U.lora_state_dict(unet), **(extra or {})})


def load_lora(unet: md.UNet, path: str, scale: float = 1.0, fuse: bool = True) -> md.UNet:
    """Put the LoRA from `path` on `unet` (in place) with weight `scale` (diffusers' lora_scale): W + scale *
    (alpha / r) * up @ down. fuse: fold it into the weights (no extra cost per step; a one-step model stays a
    plain UNet); else keep the LoRA layers (ufogen.merge_lora folds them later)."""
    import train
    ck = train.load_checkpoint(path)
    if ck.get("kind") != "lora":
        raise ValueError(f"{path}: not a LoRA file (kind {ck.get('kind')!r}); train.py --stage lora writes one")
    diff = train.config_mismatch(ck["unet"], unet.cfg, ignore=("attn_act", "dropout"))
    if diff:
        raise ValueError(f"{path}: the LoRA was trained for a different UNet: " + "; ".join(diff))
    if any(isinstance(m, U.LoRA) for m in unet.modules()):
        raise ValueError(f"{path}: this UNet already carries unfused LoRA layers; fold them first (ufogen.merge_lora)")
    U.add_lora(unet, ck["rank"], ck["alpha"], ck["convs"])
    want = U.lora_state_dict(unet)
    if set(want) != set(ck["state"]):
        raise ValueError(f"{path}: LoRA weights do not fit this UNet: missing {sorted(set(want) - set(ck['state']))[:3]}, "
                         f"unexpected {sorted(set(ck['state']) - set(want))[:3]}")
    unet.load_state_dict(ck["state"], strict=False)
    for m in unet.modules():
        if isinstance(m, U.LoRA):
            m.scale *= scale
    if fuse:
        U.merge_lora(unet)
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
    import train
    train.save_checkpoint(path, {"kind": "adapter", "factor": adapter.factor, "cond_channels": adapter.cond_channels,
                                 "blocks": adapter.blocks, "unet": dataclasses.asdict(unet.cfg),
                                 "state": adapter.state_dict(), **(extra or {})})


def load_adapter(path: str, unet: md.UNet) -> Adapter:
    """An adapter file written by train.py --stage adapter, checked against the UNet it will feed."""
    import train
    ck = train.load_checkpoint(path)
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


# ----------------------------------------------------------------------------------------------------
# Stages: lora and adapter (train.py --stage lora | adapter), one loop
# ----------------------------------------------------------------------------------------------------

def train_plugin(cfg, pcfg: PluginConfig, rank: int, world: int, device: str) -> str:
    """The diffusion loss of the base model's stage (v-prediction, CFG dropout), with the base frozen and only
    the plugin trained: LoRA factors (stage lora, on the style set) or the adapter (stage adapter, on
    (edges(image), image) pairs). 5.4: trained on the base, never on the one-step model."""
    import train as tr
    base, unet, vae, text, base_conf, cfg = tr.load_base(cfg, device)
    unet.requires_grad_(False)
    sched, adapter = S.make_schedule(), None
    if cfg.stage == "lora":
        params = U.add_lora(unet, pcfg.lora_rank, pcfg.lora_alpha, pcfg.lora_convs)
        net = tr.wrap(unet, cfg, world, device)
    else:
        adapter = Adapter(unet.cfg, vae.cfg.factor, 1, pcfg.adapter_blocks).to(device)
        params = list(adapter.parameters())
        net = tr.wrap(adapter, cfg, world, device)
    opt = tr.make_optimizer(params, cfg, cfg.lr)
    path, start = os.path.join(cfg.out_dir, f"{cfg.stage}.pt"), 0
    ck = tr.stage_checkpoint(cfg, path, rank)
    if ck is not None:
        if adapter is None:
            unet.load_state_dict(ck["state"], strict=False)                  # the LoRA factors only
        else:
            adapter.load_state_dict(ck["state"])
        opt.load_state_dict(ck["opt"])
        start = ck["step"]
    if rank == 0:
        print(f"{cfg.stage}: {sum(p.numel() for p in params) / 1e6:.3f}M trained params on the frozen base {base} "
              f"({cfg.style} data)")
    dataset = data.make_dataset(cfg.data, "train", cfg.resolution, cfg.style)
    stream = tr.batches(dataset, cfg, rank, world, start, device)
    log = tr.Log(cfg.out_dir, cfg.stage, cfg.steps, start, rank)
    per_proc, micro = cfg.batch_size // world, cfg.batch_size // world // cfg.grad_accum
    lat = (unet.cfg.in_channels, cfg.resolution // vae.cfg.factor, cfg.resolution // vae.cfg.factor)
    t0 = time.time()
    for step in range(start, cfg.steps):
        lr = tr.lr_at(step, cfg, cfg.lr, cfg.steps)
        for grp in opt.param_groups:
            grp["lr"] = lr
        # The global batch's randomness from (seed, step), each process taking its slice (as the diffusion stage).
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
        t_all = torch.randint(0, len(sched["alpha"]), (cfg.batch_size,), generator=g)
        drop_all = torch.rand(cfg.batch_size, generator=g) < cfg.p_uncond
        eps_all = torch.randn((cfg.batch_size, *lat), generator=g)
        loss_sum = 0.0
        for k in range(cfg.grad_accum):
            x, texts = next(stream)
            sl = slice(rank * per_proc + k * micro, rank * per_proc + (k + 1) * micro)
            t, eps = t_all[sl].to(device), eps_all[sl].to(device)
            texts = ["" if d else c for c, d in zip(texts, drop_all[sl].tolist())]
            z0, ctx = tr.latent_batch(x, texts, vae, text, device)
            with tr.autocast(cfg, device):
                x_t = S.q_sample(sched, z0, t, eps)
                if adapter is None:
                    v = net(x_t, t, ctx)
                else:
                    v = unet(x_t, t, ctx, features=net(edges(x, pcfg.edge_threshold)))
                loss = F.mse_loss(v.float(), S.v_target(sched, z0, t, eps))
            (loss / cfg.grad_accum).backward()
            loss_sum += float(loss.detach()) / cfg.grad_accum
        gnorm = tr.clip_and_step(params, opt, cfg, step)
        log.step(step + 1, {"loss": loss_sum, "lr": lr, "grad_norm": gnorm},
                 write=(step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps)
        if rank == 0 and ((step + 1) % cfg.ckpt_every == 0 or step + 1 == cfg.steps):
            extra = {"step": step + 1, "opt": opt.state_dict(), "base": base, "train": dataclasses.asdict(cfg)}
            if adapter is None:
                save_lora(path, unet, pcfg, extra)
            else:
                save_adapter(path, adapter, unet, {**extra, "edge_threshold": pcfg.edge_threshold})
    log.close()
    if rank == 0:
        print(f"{cfg.stage}: {cfg.steps - start} steps in {(time.time() - t0) / 60:.1f} min -> {path}")
        tr.plot_curves(log.path, os.path.join(cfg.out_dir, f"loss_{cfg.stage}.png"), cfg.stage, ["loss"])
        if cfg.data == "shapes":
            pipe, ev = S.Pipeline.from_checkpoint(base, device), heldout(cfg.resolution, cfg.eval_images, device)
            for label, plugin in (("without", None), ("with", path)):
                res = measure(cfg.stage, pipe, plugin, S.SAMPLING["ddim50"], ev)
                print(f"eval {label} the {cfg.stage} ({cfg.eval_images} held-out prompts, base DDIM-"
                      f"{S.SAMPLING['ddim50']['steps']} + CFG): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return path


# ----------------------------------------------------------------------------------------------------
# Measuring it: the plugin metrics on held-out prompts, for any pipeline and sampler
# ----------------------------------------------------------------------------------------------------

INPAINT_VARIANTS = {                                            # how the one-step model inpaints (see above)
    "1 step": dict(steps=1),
    "1 step, strength 0.6": dict(steps=1, strength=0.6),
    "4 steps": dict(steps=4),
}


def heldout(resolution: int, n: int, device: str = "cpu") -> dict:
    """The evaluation set: n held-out Shapes items with, for each, the style prompt, the edge condition and an
    inpainting task: the shape's bounding box (+3 px) masked and the prompt asking for another colour."""
    ds = data.Shapes("heldout", resolution)
    names = list(data.COLORS)
    items = [ds.attributes(i) for i in range(n)]
    images = torch.stack([ds[i][0] for i in range(n)])
    recolour = []
    for a in items:                                           # the next palette colour that is neither fg nor bg
        j = names.index(a["color"])
        recolour.append(next(c for c in names[j + 1:] + names[:j] if c not in (a["color"], a["background"])))
    mask = torch.zeros(n, 1, resolution, resolution)
    for k, a in enumerate(items):
        lo = [max(int((c - a["r"]) * resolution) - 3, 0) for c in (a["cy"], a["cx"])]
        hi = [min(int((c + a["r"]) * resolution) + 4, resolution) for c in (a["cy"], a["cx"])]
        mask[k, 0, lo[0]:hi[0], lo[1]:hi[1]] = 1
    return {"images": images.to(device), "prompts": [ds[i][1] for i in range(n)],
            "style_prompts": [data.caption(a["shape"], a["color"], a["background"], "outlined") for a in items],
            "inpaint_prompts": [data.caption(a["shape"], c, a["background"]) for a, c in zip(items, recolour)],
            "mask": mask.to(device)}


def cell_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """The pixel mask grown to whole latent cells: 0 only on the pixels of cells that inpainting keeps exactly."""
    return F.interpolate(1 - latent_keep(mask, factor), scale_factor=factor, mode="nearest")


def keep_psnr(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, images in [-1, 1]) over the kept pixels (mask = 0) of all images together."""
    keep = (1 - mask).expand_as(out)
    mse = ((out - ref).square() * keep).sum() / keep.sum()
    return float(10 * torch.log10(4 / mse.clamp(min=1e-12)))


@torch.no_grad()
def measure(kind: str, pipe, plugin: str | None, kw: dict, ev: dict, threshold: float = PluginConfig.edge_threshold,
            return_images: bool = False):
    """One plugin's metrics for one pipeline and sampler (kw), on the held-out set ev:
      lora:    style (fraction read as outlined), colour/background/shape accuracy, for the style prompts
      adapter: edge IoU with the condition edges, colour/background accuracy
      inpaint: keep-region PSNR of the decoded latent (no paste) and colour/background accuracy
    plugin: the file (LoRA or adapter), loaded here and taken off again; None = without it."""
    unet = pipe.unet
    if kind == "lora" and plugin:
        pipe.unet = load_lora(copy.deepcopy(unet), plugin)
    try:
        if kind == "lora":
            res, imgs = evaluate.evaluate_t2i(pipe, ev["style_prompts"], **kw)
            out = {k: res[k] for k in ("style", "color", "background", "shape")}
        elif kind == "adapter":
            if plugin:
                threshold = pipe.load_adapter(plugin).adapter.edge_threshold
            cond = edges(ev["images"], threshold)
            res, imgs = evaluate.evaluate_t2i(pipe, ev["prompts"], **kw, **({"cond": cond} if plugin else {}))
            out = {"edge_iou": float(edge_iou(edges(imgs.to(cond.device), threshold), cond).mean()),
                   **{k: res[k] for k in ("color", "background", "shape")}}
        elif kind == "inpaint":
            res, imgs = evaluate.evaluate_t2i(pipe, ev["inpaint_prompts"], init=ev["images"], mask=ev["mask"],
                                              paste=False, **kw)
            out = {"keep_psnr": keep_psnr(imgs, ev["images"].cpu(), ev["mask"].cpu()),
                   "cell_psnr": keep_psnr(imgs, ev["images"].cpu(), cell_mask(ev["mask"].cpu(), pipe.vae.cfg.factor)),
                   **{k: res[k] for k in ("color", "background", "shape")}}
        else:
            raise ValueError(f"measure: kind = {kind!r}, expected lora, adapter or inpaint")
    finally:
        pipe.unet, pipe.adapter = unet, None
    return (out, imgs) if return_images else out


def report(base: str, onestep: dict, lora: str, adapter: str, out_dir: str, n: int, device: str = "cpu") -> str:
    """The 5.4 table on the tiny setup: every plugin with and without it, for the base (DDIM-50 + CFG) and for
    each one-step model in `onestep` ({row name: ufogen.pt}); plus a Figure-4-like grid."""
    os.makedirs(out_dir, exist_ok=True)
    base_pipe = S.Pipeline.from_checkpoint(base, device)
    ev = heldout(base_pipe.resolution, n, device)
    models = [("base, DDIM-50 + CFG 3", base_pipe, S.SAMPLING["ddim50"])]
    models += [(name, S.Pipeline.from_checkpoint(path, device), S.SAMPLING["onestep"]) for name, path in onestep.items()]
    rows, grid, results = [], [], {}
    for name, pipe, kw in models:
        r = {}
        t0 = time.time()
        for kind, plugin in (("lora", lora), ("adapter", adapter)):
            r[kind] = {}
            for label, p in (("without", None), ("with", plugin)):
                r[kind][label], imgs = measure(kind, pipe, p, kw, ev, return_images=True)
                if len(results) < 2:
                    grid.append(imgs[:8])
        variants = {"": {}} if kw["sampler"] == "ddim" else INPAINT_VARIANTS
        r["inpaint"] = {}
        for label, v in variants.items():
            r["inpaint"][label], imgs = measure("inpaint", pipe, None, {**kw, **v}, ev, return_images=True)
            if len(results) < 2 and label in ("", "4 steps"):
                grid.append(imgs[:8])
        results[name] = r
        print(f"{name}: {(time.time() - t0) / 60:.1f} min")
    # VAE ceilings: the checker on reconstructions of the real style images / of the inpainting inputs.
    vae = base_pipe.vae
    styled_ds = data.Shapes("heldout", base_pipe.resolution, style="outlined")      # the same items, outlined
    styled = torch.stack([styled_ds[i][0] for i in range(n)])
    recon = vae.decode(vae.encode(styled.to(device)).mode()).cpu()
    ceil_style = data.attribute_accuracy(recon, ev["style_prompts"])
    rec = vae.decode(vae.encode(ev["images"]).mode()).cpu()
    ceil_psnr = keep_psnr(rec, ev["images"].cpu(), ev["mask"].cpu())
    ceil_cell = keep_psnr(rec, ev["images"].cpu(), cell_mask(ev["mask"].cpu(), vae.cfg.factor))

    def f(v):
        return f"{v:.2f}"
    lines = [f"# 5.4 plugins on the tiny setup ({n} held-out prompts; plugins trained on the base only)", "",
             "| model | style w/o → with LoRA | colour w/o → with LoRA | edge IoU w/o → with adapter | colour w/o → with adapter "
             "| inpainting | new colour | bg | keep PSNR, pixels / cells (dB) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lw, la = r["lora"]["without"], r["lora"]["with"]
        aw, aa = r["adapter"]["without"], r["adapter"]["with"]
        for i, (label, ip) in enumerate(r["inpaint"].items()):
            head = [name, f"{f(lw['style'])} → {f(la['style'])}", f"{f(lw['color'])} → {f(la['color'])}",
                    f"{f(aw['edge_iou'])} → {f(aa['edge_iou'])}", f"{f(aw['color'])} → {f(aa['color'])}"] if i == 0 else [""] * 5
            lines.append("| " + " | ".join(head + [label or "DDIM-50", f(ip["color"]), f(ip["background"]),
                                                   f"{ip['keep_psnr']:.1f} / {ip['cell_psnr']:.1f}"]) + " |")
    lines += ["", "style: fraction of samples the checker reads as outlined, for prompts \"... in outlined style\"; "
                  "edge IoU: Sobel edges of the sample vs the condition's, 1 px tolerance; inpainting: the shape's box "
                  "masked, the prompt asks for another colour; new colour / bg: checker accuracy; keep PSNR of the "
                  "decoded latent *before* pasting, over the unmasked pixels / over the latent cells that the method "
                  "keeps exactly (inpaint_denoiser). After the paste that Pipeline.images does by default, the "
                  "unmasked pixels are the input's exactly.", "",
              f"VAE ceilings (encode + decode of real images): outlined images read as outlined {ceil_style['style']:.2f}, "
              f"colour {ceil_style['color']:.2f}; keep PSNR of the inpainting inputs {ceil_psnr:.1f} / {ceil_cell:.1f} dB.", "",
              "Grid (plugins.png), 8 prompts per row: base without / with LoRA, without / with adapter, inpainted; "
              "the same for the first one-step model (inpainted with 4 steps); the edge conditions; the inpainting "
              "inputs, with the mask grey; the originals."]
    cond = edges(ev["images"][:8]).cpu().expand(-1, 3, -1, -1) * 2 - 1
    masked = ev["images"][:8].cpu() * (1 - ev["mask"][:8].cpu())
    data.image_grid(torch.cat(grid + [cond, masked, ev["images"][:8].cpu()]), nrow=8).save(os.path.join(out_dir, "plugins.png"))
    text = "\n".join(lines)
    with open(os.path.join(out_dir, "plugins.md"), "w") as fh:
        fh.write(text + "\n")
    with open(os.path.join(out_dir, "plugins.json"), "w") as fh:
        json.dump({"results": results, "vae_ceiling": {"style": ceil_style, "keep_psnr": ceil_psnr,
                                                       "cell_psnr": ceil_cell}}, fh, indent=2)
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="5.4 plugins (style LoRA, edge adapter, inpainting) on base and one-step models")
    p.add_argument("--report", action="store_true", help="measure every plugin on every model, write plugins.md/.png")
    p.add_argument("--base", default="out/tiny/diffusion.pt")
    p.add_argument("--onestep", action="append", default=None, metavar="NAME=CKPT",
                   help="one-step models to compare (repeat); default: out/tiny/ufogen.pt and, when present, the "
                        "three full-finetuning Table-5 runs in out/tiny/table5/")
    p.add_argument("--lora", default="out/tiny/lora.pt")
    p.add_argument("--adapter", default="out/tiny/adapter.pt")
    p.add_argument("--out_dir", default="out/tiny/plugins")
    p.add_argument("--n", type=int, default=128, help="held-out prompts")
    args = p.parse_args(argv)
    if not args.report:
        p.print_help()
        return
    if args.n < 1:
        p.error(f"--n {args.n}: expected >= 1")
    if args.onestep:
        bad = [s for s in args.onestep if "=" not in s or not s.split("=", 1)[0] or not s.split("=", 1)[1]]
        if bad:
            p.error(f"--onestep {bad[0]!r}: expected NAME=CKPT, e.g. --onestep 'my run=out/x/ufogen.pt'")
        onestep = dict(s.split("=", 1) for s in args.onestep)
    else:
        onestep = {"1-step UFOGen (default run)": "out/tiny/ufogen.pt"}
        onestep.update({f"1-step, recon {r} (Table 5 run)": f"out/tiny/table5/{r}-full/ufogen.pt"
                        for r in ("diffusion", "distill", "ema") if os.path.isfile(f"out/tiny/table5/{r}-full/ufogen.pt")})
    for path in [args.base, args.lora, args.adapter, *onestep.values()]:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: missing; make it with: python train.py (base, ufogen), python train.py --stage lora, "
                             f"python train.py --stage adapter, python ufogen.py --table5")
    print(report(args.base, onestep, args.lora, args.adapter, args.out_dir, args.n))


if __name__ == "__main__":
    md.run_cli(main)
