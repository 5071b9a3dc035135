"""
evaluate.py -- the paper's metrics (5.1 "Metrics", Tables 2 and 3) and 5.2's FID-vs-CLIP sweep over CFG scales.

For the tiny setup, stand-ins that need no download: reconstruction PSNR (3.5), attribute accuracy of generated
images read by data.check_attributes, a Frechet distance on pixel features (data.frechet_distance: 8x8
area-averaged thumbnails, no network), milliseconds per image; train.py's stages call these at their end.
For real data, 5.1's zero-shot FID-30K (InceptionV3 pool features, from torch-fidelity) and CLIP score
(OpenCLIP ViT-g/14), both optional packages with weights read from local files.

  python evaluate.py --ckpt out/tiny/ufogen.pt --sampler onestep                     # tiny: held-out prompts
  python evaluate.py --ckpt md.pt --prompts coco_val2014_30k.txt --ref_dir coco_val2014/ --sampler ddim50 \
      --n 30000 --inception_weights weights-inception-2015-12-05-6726825d.pth \
      --clip_model ViT-g-14 --clip_weights open_clip_vit_g14.bin                       # FID-30K + CLIP score
  python evaluate.py --ckpt out/tiny/diffusion.pt --guidance 1,2,3,5,8               # 5.2: quality vs alignment
The paper's tables at toy scale, built from these metrics: report.py.
"""

import argparse
import copy
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import config
import data
import plugins
import pretrained
import sample
import vae as vae_lib

# The functions below that take `cfg` read only cfg.data, cfg.resolution (and cfg.eval_images, cfg.out_dir,
# cfg.guidance, cfg.eval_steps where said): a train.TrainConfig, or an argparse.Namespace with those fields.


@torch.no_grad()
def reconstruct(model: vae_lib.VAE, images: torch.Tensor) -> torch.Tensor:
    """decode(encode(x).mode()), batched (data.images_per_call): (N, 3, H, W) -> (N, 3, H, W)."""
    batch = data.images_per_call(images.shape[-1], 64)
    return torch.cat([model.decode(model.encode(images[i:i + batch]).mode()) for i in range(0, len(images), batch)])


def heldout_images(cfg, n: int) -> torch.Tensor:
    ds = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    return torch.stack([ds[i][0] for i in range(min(n, len(ds)))])


@torch.no_grad()
def save_recon_grid(cfg, models: list, path: str, n: int = 8) -> None:
    """Figure 3 layout: a row of held-out inputs, then one row of reconstructions per model."""
    x = heldout_images(cfg, n).to(next(models[0].parameters()).device)
    rows = [x] + [m.decode(m.encode(x).mode()) for m in models]
    data.image_grid(torch.cat(rows).cpu(), nrow=len(x)).save(path)


def heldout_prompts(cfg, n: int) -> list[str]:
    """Captions of the held-out split: attribute combinations never seen in training."""
    ds = data.make_dataset(cfg.data, "heldout", cfg.resolution)
    return [ds[i][1] for i in range(min(n, len(ds)))]


@torch.no_grad()
def evaluate_t2i(pipe, prompts: list[str], batch: int = 64, real: torch.Tensor | None = None, checker: bool = True,
                 seed: int = 0, **sample_kw) -> dict:
    """Attribute accuracy (data.check_attributes vs the prompt; `checker`: the synthetic shapes only) of generated
    images, wall ms per image, and with `real` images the Frechet distance on pixel features ("fd"). Per-image
    tensors among sample_kw (cond, init, mask: one row per prompt) are batched with their prompts, in batches
    of at most `batch` (fewer at high resolutions: data.images_per_call). The batch from prompt i starts from the
    noise of seed + i: every call with the same seed reads the same prompts from the same initial noise."""
    images, t0 = [], time.perf_counter()
    batch = data.images_per_call(sample_kw.get("height") or pipe.resolution, batch)
    for i in range(0, len(prompts), batch):
        kw = {k: v[i:i + batch] if torch.is_tensor(v) and len(v) == len(prompts) else v for k, v in sample_kw.items()}
        images.append(pipe.images(prompts[i:i + batch], seed=seed + i, **kw).cpu())
    ms = 1000 * (time.perf_counter() - t0) / len(prompts)
    images = torch.cat(images)
    res = {**(data.attribute_accuracy(images, prompts) if checker else {}), "ms_per_image": ms}
    if real is not None and min(len(real), len(images)) > 1:      # a covariance needs two or more of each
        res["fd"] = pixel_fd(images, real)
        res["sharpness"] = data.sharpness(images.clamp(-1, 1)) / data.sharpness(real)   # 1: as sharp as the data
    return res, images


def pixel_fd(images: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance between generated and real images on 8x8 thumbnails (data.pixel_features)."""
    return data.frechet_distance(data.pixel_features(images), data.pixel_features(real))


def update_eval(path: str, name: str, result: dict) -> None:
    """eval.json: {"<sampler>": {"color": .., "background": .., "shape": .., "ms_per_image": ..}, ...}."""
    obj = json.load(open(path)) if os.path.isfile(path) else {}
    keep = ("color", "background", "shape", "ms_per_image", "style", "fd", "sharpness")
    obj[name] = {k: v for k, v in result.items() if k in keep}
    config.write_json(path, obj)


@torch.no_grad()
def one_step_report(cfg, base_path: str, ufo_path: str, device: str) -> None:
    """eval.json's "onestep" (UFOGen, 1 step, no CFG: 5.2 "UFOGen does not have cfg") and "ddim1" (the base
    model's 1-step DDIM, the blurry E[x0 | x_T] of 4.2), with a Frechet distance on pixel features; and one
    grid with, per prompt, the base model's DDIM-50 + CFG, its 1-step DDIM and 1-step UFOGen."""
    prompts = heldout_prompts(cfg, cfg.eval_images)
    real = heldout_images(cfg, cfg.eval_images)
    base = sample.Pipeline.from_checkpoint(base_path, device, resolution=cfg.resolution)   # at the stage's size
    ufo = sample.Pipeline.from_checkpoint(ufo_path, device)
    rows = []
    for name, pipe, kw in [("onestep", ufo, sample.SAMPLING["onestep"]),
                           ("ddim1", base, dict(steps=1, guidance_scale=cfg.guidance))]:
        res, imgs = evaluate_t2i(pipe, prompts, real=real, checker=data.is_shapes(cfg.data), **kw)
        update_eval(os.path.join(cfg.out_dir, "eval.json"), name, res)
        print(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        rows.append(imgs[:8])
    top = base.images(prompts[:8], steps=cfg.eval_steps, guidance_scale=cfg.guidance, seed=0).cpu()
    data.image_grid(torch.cat([top, rows[1], rows[0]]), nrow=8).save(os.path.join(cfg.out_dir, "onestep_vs_base.png"))


# ----------------------------------------------------------------------------------------------------
# 5.4 plugin metrics on held-out prompts (style, edge IoU, inpainting), for any pipeline and sampler
# ----------------------------------------------------------------------------------------------------

def plugin_heldout(resolution: int, n: int, device: str = "cpu", geometry: str = "shapes") -> dict:
    """The evaluation set: n held-out Shapes items with, for each, the style prompt, the edge condition and an
    inpainting task: the shape's bounding box (+3 px) masked and the prompt asking for another colour."""
    ds = data.Shapes("heldout", resolution, geometry=geometry)
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
    return torch.nn.functional.interpolate(1 - plugins.latent_keep(mask, factor), scale_factor=factor, mode="nearest")


def keep_psnr(out: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> float:
    """PSNR (dB, images in [-1, 1]) over the kept pixels (mask = 0) of all images together."""
    keep = (1 - mask).expand_as(out)
    mse = ((out - ref).square() * keep).sum() / keep.sum()
    return float(10 * torch.log10(4 / mse.clamp(min=1e-12)))


@torch.no_grad()
def measure_plugin(kind: str, pipe, plugin: str | None, kw: dict, ev: dict,
                   threshold: float = plugins.PluginConfig.edge_threshold, return_images: bool = False):
    """One plugin's metrics for one pipeline and sampler (kw), on the held-out set ev:
      lora:    style (fraction read as outlined), colour/background/shape accuracy, for the style prompts
      adapter: edge IoU with the condition edges, colour/background accuracy
      inpaint: keep-region PSNR of the decoded latent (no paste) and colour/background accuracy
    plugin: the file (LoRA or adapter), loaded here and taken off again; None = without it."""
    unet = pipe.unet
    if kind == "lora" and plugin:
        pipe.unet = plugins.load_lora(copy.deepcopy(unet), plugin)
    try:
        if kind == "lora":
            res, imgs = evaluate_t2i(pipe, ev["style_prompts"], **kw)
            out = {k: res[k] for k in ("style", "color", "background", "shape")}
        elif kind == "adapter":
            if plugin:
                threshold = pipe.load_adapter(plugin).adapter.edge_threshold
            cond = plugins.edges(ev["images"], threshold)
            res, imgs = evaluate_t2i(pipe, ev["prompts"], **kw, **({"cond": cond} if plugin else {}))
            out = {"edge_iou": float(plugins.edge_iou(plugins.edges(imgs.to(cond.device), threshold), cond).mean()),
                   **{k: res[k] for k in ("color", "background", "shape")}}
        elif kind == "inpaint":
            res, imgs = evaluate_t2i(pipe, ev["inpaint_prompts"], init=ev["images"], mask=ev["mask"],
                                     paste=False, **kw)
            out = {"keep_psnr": keep_psnr(imgs, ev["images"].cpu(), ev["mask"].cpu()),
                   "cell_psnr": keep_psnr(imgs, ev["images"].cpu(), cell_mask(ev["mask"].cpu(), pipe.vae.cfg.factor)),
                   **{k: res[k] for k in ("color", "background", "shape")}}
        else:
            raise ValueError(f"measure: kind = {kind!r}, expected lora, adapter or inpaint")
    finally:
        pipe.unet, pipe.adapter = unet, None
    return (out, imgs) if return_images else out


# ----------------------------------------------------------------------------------------------------
# End-of-stage reports (train.py calls these on rank 0) and loss curves
# ----------------------------------------------------------------------------------------------------

_PEAK = {}


@torch.no_grad()
def matmul_peak(device: str = "cpu", n: int = 2048, repeats: int = 10) -> float:
    """GFLOP/s of an n x n fp32 matmul on `device`, best of `repeats` (measured once per process and device; any
    "cpu:N" is the CPU): the practical peak the stages' throughput is compared with (2 cores here: 123-191 GFLOP/s
    from run to run, docs/results.md)."""
    device = "cpu" if device.startswith("cpu") else device
    if device not in _PEAK:
        a = torch.randn(n, n, device=device)
        best = float("inf")
        for _ in range(repeats + 1):                              # the first run warms up
            t0 = time.perf_counter()
            (a @ a).sum().item()
            best = min(best, time.perf_counter() - t0)
        _PEAK[device] = 2 * n ** 3 / best / 1e9
    return _PEAK[device]


def throughput_report(cfg, steps: int, seconds: float, flops_per_image: float, device: str) -> dict:
    """A stage's time and speed, printed and kept in out_dir/times.json: images/s (cfg.batch_size per step) and
    the compute rate, flops_per_image (the stage's count from MACs: a forward is 2 FLOPs per MAC, a backward
    twice that) times images/s, as a fraction of matmul_peak. Element-wise ops (norms, activations, the
    optimiser) are not counted, as in count_macs: the fraction is of useful matmul/conv work."""
    ips = steps * cfg.batch_size / max(seconds, 1e-9)
    gflops = flops_per_image * ips / 1e9
    peak = matmul_peak(device)
    res = {"steps": steps, "minutes": seconds / 60, "images_per_s": ips, "gflop_per_s": gflops,
           "peak_gflop_per_s": peak, "peak_fraction": gflops / peak}
    print(f"{cfg.stage}: {steps} steps in {seconds / 60:.1f} min, {ips:.3g} images/s, ~{gflops:.0f} GFLOP/s = "
          f"{100 * gflops / peak:.0f}% of this machine's {peak:.0f} GFLOP/s matmul peak")
    path = os.path.join(cfg.out_dir, "times.json")
    obj = json.load(open(path)) if os.path.isfile(path) else {}
    obj[cfg.stage] = res
    config.write_json(path, obj)
    return res


@torch.no_grad()
def heldout_psnr(cfg, model, device: str, n: int = 64) -> float:
    """Mean reconstruction PSNR (dB) on up to n held-out images: the VAE stages' validation number."""
    held = heldout_images(cfg, n).to(device)
    return float(vae_lib.psnr(reconstruct(model, held), held).mean())


@torch.no_grad()
def vae_report(cfg, model, minutes: float, device: str, teacher=None) -> dict:
    """End of the vae stage (teacher None) or the decoder stage (teacher: the full VAE): held-out PSNR, printed and
    written to <stage>_eval.json (cfg.out_dir, cfg.stage, cfg.steps, cfg.eval_images), and the Figure 3 grid."""
    held = heldout_images(cfg, cfg.eval_images).to(device)
    prompts = heldout_prompts(cfg, cfg.eval_images)
    recon = reconstruct(model, held)
    p = float(vae_lib.psnr(recon, held).mean())
    # The checker on reconstructions: what a perfect diffusion model could reach through this decoder.
    def checker(images):                                      # the synthetic shapes only
        if not data.is_shapes(cfg.data):
            return {}
        return {k: v for k, v in data.attribute_accuracy(images.cpu(), prompts).items() if k != "style"}
    acc = checker(recon)
    checked = ", ".join(f"{k} {v:.3f}" for k, v in acc.items())
    if teacher is None:
        report = {"psnr_heldout_db": p, "checker": acc, "scaling_factor": model.cfg.scaling_factor, "minutes": minutes}
        print(f"vae: held-out reconstruction PSNR {p:.2f} dB{', checker ' + checked if acc else ''}; latent "
              f"scaling factor {model.cfg.scaling_factor:.4f}")
    else:
        full = reconstruct(teacher, held)
        p_full = float(vae_lib.psnr(full, held).mean())
        acc_full = checker(full)
        report = {"psnr_full_db": p_full, "psnr_light_db": p, "checker_full": acc_full, "checker_light": acc,
                  "minutes": minutes}
        print(f"decoder: held-out PSNR full {p_full:.2f} dB, "
              f"light {p:.2f} dB ({p - p_full:+.2f} dB){'; checker on light reconstructions ' + checked if acc else ''}")
    config.write_json(os.path.join(cfg.out_dir, f"{cfg.stage}_eval.json"), report)
    save_recon_grid(cfg, [m for m in (teacher, model) if m is not None], os.path.join(cfg.out_dir, f"{cfg.stage}_recon.png"))
    return report


def diffusion_report(cfg, pipe) -> dict:
    """End of the diffusion stage: DDIM-<cfg.eval_steps> + CFG <cfg.guidance> on the held-out prompts, into
    eval.json, and samples_final.png."""
    prompts = heldout_prompts(cfg, cfg.eval_images)
    name = f"ddim{cfg.eval_steps}" + ("" if cfg.stage == "diffusion" else f"_{cfg.stage}")     # relu: ddim50_relu
    res, imgs = evaluate_t2i(pipe, prompts, steps=cfg.eval_steps, guidance_scale=cfg.guidance,
                             checker=data.is_shapes(cfg.data))
    update_eval(os.path.join(cfg.out_dir, "eval.json"), name, res)
    final = "samples_final.png" if cfg.stage == "diffusion" else f"samples_final_{cfg.stage}.png"
    data.image_grid(imgs[:32], nrow=8).save(os.path.join(cfg.out_dir, final))
    print(f"eval ({len(prompts)} held-out prompts, {name} + CFG {cfg.guidance}): "
          + ", ".join(f"{k} {v:.3f}" if k != "ms_per_image" else f"{v:.1f} ms/image" for k, v in res.items()))
    if data.is_shapes(cfg.data):
        print(checker_resolution(len(prompts), res["shape"]))
    return res


def binomial_se(p: float, n: int) -> float:
    """The binomial standard error, in points, of an accuracy p read on n independent prompts."""
    return 100 * (p * (1 - p) / n) ** 0.5


def checker_resolution(n: int, p: float) -> str:
    """What one reading p of the checker on n held-out shapes prompts can resolve: one prompt, one of the held-out
    combinations (a model tends to get a combination right or wrong as a whole), the binomial standard error."""
    k = len(data.heldout_combos())
    return (f"  resolution: one prompt = {100 / n:.1f} points, one of the {k} held-out combinations ~{100 / k:.0f}; "
            f"binomial s.e. at {p:.2f}: {binomial_se(p, n):.1f} points (seed spread: docs/results.md)")


def relu_report(cfg, softmax: float, curve: dict) -> dict:
    """End of the relu stage (3.2): eval.json's "relu", the held-out validation loss of the softmax base, of the
    same weights with ReLU attention before any finetuning (the curve's first point), along the finetune
    (every cfg.val_every steps), and the first step at which it is back at the softmax base's level."""
    steps = sorted(curve)
    back = next((s for s in steps if s > steps[0] and curve[s] <= softmax), None)
    res = {"softmax_val_loss": softmax, "swapped_val_loss": curve[steps[0]], "final_val_loss": curve[steps[-1]],
           "recovered_at": back, "steps": steps[-1], "val_loss": {str(s): curve[s] for s in steps}}
    path = os.path.join(cfg.out_dir, "eval.json")
    obj = json.load(open(path)) if os.path.isfile(path) else {}
    config.write_json(path, {**obj, "relu": res})
    print(f"eval relu: held-out val loss softmax {softmax:.4f}, swapped to relu {res['swapped_val_loss']:.4f}, after "
          f"{steps[-1]} steps {res['final_val_loss']:.4f}; "
          + (f"back at the softmax level by step {back}" if back else "not back at the softmax level"))
    return res


def few_step_report(cfg, pipe, steps: int) -> dict:
    """End of the distill stage: the student's `steps`-step DDIM without CFG (folded in), into eval.json."""
    res, _ = evaluate_t2i(pipe, heldout_prompts(cfg, cfg.eval_images), real=heldout_images(cfg, cfg.eval_images),
                          checker=data.is_shapes(cfg.data),
                          steps=steps, guidance_scale=1.0)
    update_eval(os.path.join(cfg.out_dir, "eval.json"), f"{steps}step", res)
    print(f"eval {steps}step: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
    return res


def plugin_stage_report(cfg, pipe, path: str, device: str) -> None:
    """End of the lora / adapter stage: the base's DDIM-50 + CFG without and with the new plugin."""
    ev = plugin_heldout(cfg.resolution, cfg.eval_images, device, cfg.data)
    for label, plugin in (("without", None), ("with", path)):
        res = measure_plugin(cfg.stage, pipe, plugin, sample.SAMPLING["ddim50"], ev)
        print(f"eval {label} the {cfg.stage} ({cfg.eval_images} held-out prompts, base DDIM-"
              f"{sample.SAMPLING['ddim50']['steps']} + CFG): " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))


@torch.no_grad()
def plugin_grid(cfg, base_path: str, plugin_path: str, device: str, n: int = 8) -> None:
    """End of the lora / adapter stage on real data: <stage>_final.png, the base's DDIM-<eval_steps> + CFG on
    n held-out captions without the plugin (top row), with it (LoRA folded in; the adapter conditioned on the
    held-out images' edges), and the held-out images themselves."""
    held = data.first_items(data.make_dataset(cfg.data, "heldout", cfg.resolution), n)
    images, prompts = torch.stack([x for x, _ in held]).to(device), [c for _, c in held]
    kw = dict(sample.SAMPLING["ddim50"], steps=cfg.eval_steps, guidance_scale=cfg.guidance, seed=0)
    pipe = sample.Pipeline.from_checkpoint(base_path, device, resolution=cfg.resolution)
    rows = [pipe.images(prompts, **kw)]
    if cfg.stage == "lora":
        rows.append(pipe.load_lora(plugin_path).images(prompts, **kw))
    else:
        rows.append(pipe.load_adapter(plugin_path).images(prompts, cond=plugins.edges(images), **kw))
    grid = data.image_grid(torch.cat(rows + [images]).cpu(), nrow=len(prompts))
    grid.save(os.path.join(cfg.out_dir, f"{cfg.stage}_final.png"))
    print(f"{cfg.stage}: {len(prompts)} held-out captions without / with it -> {cfg.stage}_final.png")


def plot_curves(metrics_path: str, png_path: str, stage: str, keys: list[str]) -> None:
    """A loss-curve PNG drawn with pillow (log-scale y), one colour per metric."""
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


# ----------------------------------------------------------------------------------------------------
# 5.1 Metrics for real data: FID-30K and CLIP score, on images generated (resumably) to a folder
# ----------------------------------------------------------------------------------------------------

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"           # torch-fidelity's converted TF-FID weights


def read_prompts(path: str) -> list[str]:
    """captions.txt (one per line) or metadata.jsonl (diffusers' layout: a "text" or "caption" field); a bad
    line or a file without a prompt is an error naming the file and line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"--prompts {path}: not UTF-8 text ({e})") from None
    prompts = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if not path.endswith(".jsonl"):
            prompts.append(line)
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"--prompts {path}: line {i} is not JSON ({e})") from None
        text = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"{path}: line {i} has no 'text' or 'caption' string")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts in it (every line is blank)")
    return prompts


def file_sha256(path: str) -> str:
    """The sha256 of a checkpoint file, or of a diffusers folder's files (relative names and contents, sorted)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(d, f) for d, _, names in os.walk(path) for f in names)
    for name in files:
        if name != path:
            h.update(os.path.relpath(name, path).encode())
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def run_fingerprint(ckpt_sha256: str, prompts: list[str], batch: int, seed: int, sample_kw: dict) -> dict:
    """What fixes every image of a generation folder: the checkpoint's bytes (their SHA-256, file_sha256), the
    prompts, the seeding (seed and batch: batch i is seeded seed + i) and the sampler settings. Saved as
    fingerprint.json beside the images."""
    return {"ckpt_sha256": ckpt_sha256, "n": len(prompts), "seed": seed, "batch": batch,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "sampling": {k: v for k, v in sorted(sample_kw.items())}}


def check_fingerprint(folder: str, fp: dict, overwrite: bool) -> None:
    """A folder holding images of another checkpoint / seed / sampler / prompt set is never reused: refuse,
    naming what differs, or with `overwrite` delete its images and start over."""
    path = os.path.join(folder, "fingerprint.json")
    pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
    old = json.load(open(path)) if os.path.isfile(path) else None
    if old is None and not pngs:
        config.write_json(path, fp)
        return
    diff = ["no fingerprint.json (written by an older version?)"] if old is None else \
           [f"{k}: folder {old.get(k)!r} vs now {fp[k]!r}" for k in fp if old.get(k) != fp[k]]
    if not diff:
        return
    if not overwrite:
        raise ValueError(f"{folder} holds {len(pngs)} images from another run ({'; '.join(diff)}); give another "
                         f"--out_dir, or --overwrite to delete them and generate again")
    for f in pngs:
        os.remove(os.path.join(folder, f))
    config.write_json(path, fp)


def generate(pipe, prompts: list[str], folder: str, batch: int = 16, seed: int = 0, fingerprint: dict | None = None,
             overwrite: bool = False, **sample_kw) -> list[str]:
    """Write prompts[i] -> folder/000000i.png, in fixed batches seeded by their first index, so a resumed run
    skips finished batches and reproduces the rest exactly. Files appear atomically (tmp + rename). With a
    `fingerprint` (run_fingerprint) the folder is only resumed if it was made by the same run."""
    os.makedirs(folder, exist_ok=True)
    if fingerprint is not None:
        check_fingerprint(folder, fingerprint, overwrite)
    paths = [os.path.join(folder, f"{i:07d}.png") for i in range(len(prompts))]
    for p in paths:                                               # a damaged file (zero bytes, not PNG): redone
        if os.path.isfile(p) and not readable_image(p):
            print(f"generate: {p} is not a readable image; generating it again")
            os.remove(p)
    todo = [i for i in range(0, len(prompts), batch) if not all(os.path.isfile(p) for p in paths[i:i + batch])]
    done = sum(os.path.isfile(p) for p in paths)
    for i in tqdm(todo, desc=f"generate ({done} of {len(paths)} already written)"):
        images = pipe.images(prompts[i:i + batch], seed=seed + i, **sample_kw).cpu()
        for path, img in zip(paths[i:i + batch], images):
            if not os.path.isfile(path):
                tmp = f"{path}.{os.getpid()}.tmp.png"
                data.to_pil(img).save(tmp)
                os.replace(tmp, path)
    return paths


def readable_image(path: str) -> bool:
    """Whether the file opens as an image (its header only: fast enough for a 30K-image folder; generate's own
    files are written atomically, so a damaged one is a foreign or emptied file, not a cut-off write)."""
    try:
        with Image.open(path):
            return True
    except OSError:
        return False


def load_folder(paths: list[str], size: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 from image files (resized to `size` if given)."""
    out = []
    for p in paths:
        try:
            im = Image.open(p).convert("RGB")
        except OSError as e:                                      # zero-byte, truncated, not an image
            raise ValueError(f"{p}: not a readable image ({e}); remove or replace it") from None
        if size:
            im = im.resize((size, size), Image.BICUBIC)
        out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    return torch.stack(out)


def inception_features(paths: list[str], weights: str | None, batch: int = 50, device: str = "cpu") -> torch.Tensor:
    """(N, 2048) InceptionV3 pool3 features, the FID network (Heusel et al. 2017), as torch-fidelity computes
    them (TF-FID's graph ported to PyTorch, bilinear resize to 299 as TF 1.x). Weights: a local file."""
    if not weights or not os.path.isfile(weights):
        raise SystemExit(f"FID needs the InceptionV3 weights file {INCEPTION_FILE} (torch-fidelity's, from its "
                         f"GitHub releases), given with --inception_weights; got {weights!r}. It cannot be "
                         f"downloaded here; without it use the pixel Frechet distance (--ref_dir still works).")
    fe = config.need("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity")
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights).to(device)
    feats = []
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), batch), desc="inception features"):
            feats.append(net(load_folder(paths[i:i + batch]).to(device))[0].cpu())
    return torch.cat(feats)


def clip_score(paths: list[str], prompts: list[str], model: str, weights: str | None, device: str = "cpu") -> float:
    """5.1: CLIP score with OpenCLIP (ViT-g/14 in the paper): mean over images of max(cos(image, text), 0)
    (the paper reports it unscaled, 0.32; torchmetrics multiplies by 100)."""
    if not weights or not os.path.isfile(weights):
        raise SystemExit(f"CLIP score needs local OpenCLIP weights for {model} (--clip_weights FILE); got {weights!r}")
    open_clip = config.need("open_clip", "open_clip_torch")
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device)
    tok = open_clip.get_tokenizer(model)
    scores = []
    with torch.no_grad():
        for i in tqdm(range(0, len(paths), 32), desc="clip score"):
            ims = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[i:i + 32]]).to(device)
            a = torch.nn.functional.normalize(net.encode_image(ims), dim=-1)
            b = torch.nn.functional.normalize(net.encode_text(tok(prompts[i:i + 32]).to(device)), dim=-1)
            scores.append((a * b).sum(-1).clamp_min(0).cpu())
    return float(torch.cat(scores).mean())


def list_images(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"--ref_dir {folder}: no such folder")
    paths = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(data.IMAGE_EXTS))
    if not paths:
        raise FileNotFoundError(f"--ref_dir {folder}: no images ({', '.join(data.IMAGE_EXTS)})")
    return paths


def eval_setup(args) -> dict:
    """What every run of evaluate_cli on one checkpoint shares, done once per command (a guidance sweep
    reuses it for every scale): the pipeline, the prompts, the checkpoint's hash, and the real images the
    Frechet distances compare against (--ref_dir, else the tiny held-out images)."""
    pipe = sample.Pipeline.from_checkpoint(args.ckpt)
    tiny = args.prompts is None
    if tiny:                                                      # synthetic shapes: checker + pixel Frechet
        cfg = argparse.Namespace(data="shapes", resolution=pipe.resolution)
        prompts = heldout_prompts(cfg, args.n or 128)
        real = heldout_images(cfg, len(prompts))
    else:
        prompts, real = read_prompts(args.prompts)[:args.n or None], None
    refs = list_images(args.ref_dir) if args.ref_dir else None
    if refs and len(refs) < 2:                                    # checked before anything is generated
        raise ValueError(f"--ref_dir {args.ref_dir}: {len(refs)} image; a Frechet distance needs at least 2 "
                         f"reference images (FID-30K uses 30,000)")
    if refs:
        real = load_folder(refs, size=pipe.resolution).float() / 127.5 - 1
    return {"pipe": pipe, "prompts": prompts, "tiny": tiny, "real": real, "refs": refs,
            "ckpt_sha256": file_sha256(args.ckpt)}


def evaluate_cli(args, guidance: float | None = None, setup: dict | None = None) -> dict:
    """Generate for --prompts (or the tiny held-out prompts) with --sampler (its CFG scale replaced by
    `guidance` if given), then every metric available. `setup`: eval_setup(args), made here if not given."""
    setup = setup or eval_setup(args)
    pipe, prompts = setup["pipe"], setup["prompts"]
    kw = {**sample.SAMPLING[args.sampler], **({} if guidance is None else {"guidance_scale": guidance})}
    name = f"eval_{args.sampler}" + ("" if guidance is None else f"_cfg{guidance:g}")
    if guidance is None:                                          # one folder: --out_dir itself
        folder = args.out_dir or os.path.join(os.path.dirname(args.ckpt.rstrip("/")), name)
    else:                                                         # a sweep: one folder per scale under --out_dir
        folder = os.path.join(args.out_dir or os.path.dirname(args.ckpt.rstrip("/")), name)
    t0 = time.perf_counter()
    fp = run_fingerprint(setup["ckpt_sha256"], prompts, args.batch, args.seed, kw)
    paths = generate(pipe, prompts, folder, args.batch, args.seed, fingerprint=fp, overwrite=args.overwrite, **kw)
    result = {"sampler": args.sampler, "guidance_scale": kw.get("guidance_scale", 1.0), "n": len(paths), "images": folder}
    images = load_folder(paths).float() / 127.5 - 1                  # [-1, 1], as the checker reads them
    if setup["tiny"]:
        result.update(data.attribute_accuracy(images, prompts))
    if setup["real"] is not None:
        result["fd_pixels"] = pixel_fd(images, setup["real"])
    if setup["refs"] and (args.inception_weights or not args.no_fid):
        if "ref_features" not in setup:                           # once per command, not once per scale
            setup["ref_features"] = inception_features(setup["refs"], args.inception_weights)
        result["fid"] = data.frechet_distance(inception_features(paths, args.inception_weights), setup["ref_features"])
    if args.clip_weights:
        result["clip_score"] = clip_score(paths, prompts, args.clip_model, args.clip_weights)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    config.write_json(os.path.join(folder, "metrics.json"), result)
    return result


# ----------------------------------------------------------------------------------------------------
# 5.2 "FID vs. CLIP curve ... by varying cfg scales": one point per guidance scale
# ----------------------------------------------------------------------------------------------------

def sweep_axes(r: dict) -> tuple[str, float, str, float]:
    """(x name, x, y name, y) of one sweep point: the paper's FID and CLIP score when measured, else the toy's
    stand-ins, the pixel Frechet distance and the checker's mean attribute accuracy (text alignment)."""
    x = ("FID", r["fid"]) if "fid" in r else ("Fréchet (8×8 pixels)", r.get("fd_pixels", float("nan")))
    if "clip_score" in r:
        y = ("CLIP score", r["clip_score"])
    else:
        acc = [r[k] for k in ("color", "background", "shape") if k in r]
        y = ("mean attribute accuracy", sum(acc) / len(acc) if acc else float("nan"))
    return x[0], x[1], y[0], y[1]


def ascii_text(text: str) -> str:
    """pillow's built-in bitmap font draws ASCII only."""
    return text.replace("é", "e").replace("×", "x")


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """The 5.2 figure's layout with pillow: quality (FID or its stand-in) on x, alignment (CLIP score or the
    checker) on y, one labelled point per CFG scale, joined in order of scale."""
    pts = [tuple(ascii_text(v) if isinstance(v, str) else v for v in sweep_axes(r)) for r in rows]
    xs, ys = [p[1] for p in pts], [p[3] for p in pts]
    W, H, m = 640, 420, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((m, 10), ascii_text(title), fill="black")
    d.rectangle([m, m, W - m, H - m], outline="gray")
    d.text((W // 2 - 60, H - m + 24), f"{pts[0][0]} (lower is better)", fill="black")
    d.text((6, m - 24), f"{pts[0][2]}", fill="black")
    x0, x1 = min(xs), max(max(xs), min(xs) + 1e-6)
    y0, y1 = min(ys), max(max(ys), min(ys) + 1e-6)
    for v, frac in ((x0, 0), (x1, 1)):
        d.text((m + frac * (W - 2 * m) - 10, H - m + 6), f"{v:.3g}", fill="gray")
    for v, frac in ((y0, 0), (y1, 1)):
        d.text((8, H - m - frac * (H - 2 * m) - 6), f"{v:.3g}", fill="gray")
    xy = [(m + 20 + (x - x0) / (x1 - x0) * (W - 2 * m - 40), H - m - 20 - (y - y0) / (y1 - y0) * (H - 2 * m - 40))
          for x, y in zip(xs, ys)]
    d.line(xy, fill="#1f77b4", width=2)
    for (px, py), r in zip(xy, rows):
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill="#d62728")
        d.text((px + 6, py - 14), f"cfg {r['guidance_scale']:g}", fill="black")
    im.save(path)


def guidance_sweep(args, scales: list[float]) -> list[dict]:
    """5.2: the same prompts and seeds sampled at each CFG scale; writes guidance_<sampler>.json / .md / .png
    next to the per-scale image folders (<out_dir or ckpt dir>/eval_<sampler>_cfg<s>/)."""
    setup = eval_setup(args)
    rows = [evaluate_cli(args, guidance=g, setup=setup) for g in scales]
    out = args.out_dir or os.path.dirname(args.ckpt.rstrip("/"))
    stem = os.path.join(out, f"guidance_{args.sampler}")
    config.write_json(stem + ".json", {"ckpt": args.ckpt, "sampler": args.sampler, "rows": rows})
    xn, _, yn, _ = sweep_axes(rows[0])
    lines = [f"| cfg scale | {yn} | {xn} | colour | background | shape |", "|---|---|---|---|---|---|"]
    for r in rows:
        _, x, _, y = sweep_axes(r)
        lines.append(f"| {r['guidance_scale']:g} | {y:.3f} | {x:.2f} | " +
                     " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("color", "background", "shape")) + " |")
    config.write_text(stem + ".md", "\n".join(lines) + "\n")
    plot_sweep(rows, stem + ".png", f"{os.path.basename(args.ckpt)}, {args.sampler}: {yn} vs {xn} over CFG scales")
    print("\n".join(lines) + f"\nwrote {stem}.md / .json / .png")
    return rows


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="MobileDiffusion evaluation: FID / CLIP score / checker accuracy, and "
                                            "5.2's sweep over guidance scales (the paper's tables: report.py)")
    p.add_argument("--ckpt", help="a checkpoint written by train.py (diffusion.pt, distill.pt, ufogen.pt, or its "
                   "<stage>.safetensors inference weights) or a diffusers "
                                  "SD-1.x folder (outputs go beside it unless --out_dir)")
    p.add_argument("--sampler", default="ddim50", choices=sorted(sample.SAMPLING))
    p.add_argument("--prompts", help="captions.txt or metadata.jsonl (default: the synthetic held-out prompts)")
    p.add_argument("--ref_dir", help="real images for FID / pixel Frechet")
    p.add_argument("--n", type=int, default=0, help="number of prompts (5.1: 30000); 0 = all")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out_dir", help="where generated images go (default: next to --ckpt, eval_<sampler>/)")
    p.add_argument("--inception_weights", help=f"local {INCEPTION_FILE} for FID")
    p.add_argument("--no_fid", action="store_true", help="with --ref_dir: only the pixel Frechet distance")
    p.add_argument("--clip_model", default="ViT-g-14", help="OpenCLIP model name (5.1: ViT-g/14)")
    p.add_argument("--clip_weights", help="local OpenCLIP weights file for the CLIP score")
    p.add_argument("--guidance", help="5.2 sweep: comma-separated CFG scales (e.g. 1,2,3,5); one folder and one "
                                      "point per scale, plus guidance_<sampler>.md/.json/.png")
    p.add_argument("--overwrite", action="store_true", help="regenerate a folder that holds another run's images")
    args = p.parse_args(argv)
    if args.batch < 1 or args.n < 0:
        p.error(f"--batch {args.batch} / --n {args.n}: expected --batch >= 1 and --n >= 0 (0 = all prompts)")
    if not 0 <= args.seed < 2 ** 32:
        p.error(f"--seed {args.seed}: expected 0 <= seed < 2^32")
    if not args.ckpt:
        p.error("give --ckpt")
    if not os.path.isfile(args.ckpt) and not pretrained.is_pipeline_folder(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file (a train.py checkpoint or a diffusers pipeline folder)")
    if args.guidance:
        return guidance_sweep(args, parse_scales(args.guidance))
    return evaluate_cli(args)


def parse_scales(text: str) -> list[float]:
    try:
        scales = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--guidance {text!r}: expected comma-separated numbers, e.g. 1,2,3,5") from None
    if not scales or any(g < 0 for g in scales):
        raise ValueError(f"--guidance {text!r}: expected one or more scales >= 0")
    return scales


if __name__ == "__main__":
    config.run_cli(main)
