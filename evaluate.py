"""
Evaluation of the tiny setup, the stand-ins for 5.1's metrics that need no download: reconstruction PSNR
(3.5), attribute accuracy of generated images read by data.check_attributes, a Frechet distance on pixel
features (data.frechet_distance), milliseconds per image; the files they write (eval.json, grids).
The training stages in train.py call these at their end.
"""

from __future__ import annotations                              # cfg is a train.TrainConfig (no import cycle)

import json
import os
import time

import torch

import data
import vae as vae_lib


@torch.no_grad()
def reconstruction_psnr(model: vae_lib.VAE, images: torch.Tensor, batch: int = 64) -> float:
    out = [vae_lib.psnr(model.decode(model.encode(images[i:i + batch]).mode()), images[i:i + batch])
           for i in range(0, len(images), batch)]
    return float(torch.cat(out).mean())


def heldout_images(cfg: TrainConfig, n: int) -> torch.Tensor:
    ds = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


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


def heldout_prompts(cfg: TrainConfig, n: int) -> list[str]:
    """Captions of the held-out split: attribute combinations never seen in training."""
    ds = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    return [ds[i][1] for i in range(min(n, len(ds)))]


@torch.no_grad()
def evaluate_t2i(pipe, prompts: list[str], batch: int = 64, **sample_kw) -> dict:
    """Attribute accuracy (data.check_attributes vs the prompt) of generated images, and wall ms per image."""
    images, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        images.append(pipe.images(prompts[i:i + batch], seed=i, **sample_kw).cpu())
    ms = 1000 * (time.perf_counter() - t0) / len(prompts)
    images = torch.cat(images)
    return {**data.attribute_accuracy(images, prompts), "ms_per_image": ms}, images


def update_eval(path: str, name: str, result: dict) -> None:
    """eval.json: {"<sampler>": {"color": .., "background": .., "shape": .., "ms_per_image": ..}, ...}."""
    obj = json.load(open(path)) if os.path.isfile(path) else {}
    obj[name] = {k: v for k, v in result.items() if k in ("color", "background", "shape", "ms_per_image", "style", "fd")}
    write_json(path, obj)


@torch.no_grad()
def one_step_report(cfg: TrainConfig, base_path: str, ufo_path: str, device: str) -> None:
    """eval.json's "onestep" (UFOGen, 1 step, no CFG: 5.2 "UFOGen does not have cfg") and "ddim1" (the base
    model's 1-step DDIM, the blurry E[x0 | x_T] of 4.2), with a Frechet distance on pixel features; and one
    grid with, per prompt, the base model's DDIM-50 + CFG, its 1-step DDIM and 1-step UFOGen."""
    import sample as S
    prompts = heldout_prompts(cfg, cfg.eval_images)
    real = heldout_images(cfg, cfg.eval_images)
    base, ufo = S.Pipeline.from_checkpoint(base_path, device), S.Pipeline.from_checkpoint(ufo_path, device)
    rows = []
    for name, pipe, kw in [("onestep", ufo, dict(steps=1, guidance_scale=1.0, sampler="renoise")),
                           ("ddim1", base, dict(steps=1, guidance_scale=cfg.guidance))]:
        res, imgs = evaluate_t2i(pipe, prompts, **kw)
        res["fd"] = data.frechet_distance(data.pixel_features(imgs), data.pixel_features(real))
        update_eval(os.path.join(cfg.out_dir, "eval.json"), name, res)
        print(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        rows.append(imgs[:8])
    top = base.images(prompts[:8], steps=cfg.eval_steps, guidance_scale=cfg.guidance, seed=0).cpu()
    data.image_grid(torch.cat([top, rows[1], rows[0]]), nrow=8).save(os.path.join(cfg.out_dir, "onestep_vs_base.png"))
