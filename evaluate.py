"""
evaluate.py -- the paper's metrics (5.1 "Metrics", Tables 2 and 3) and the toy-scale report.

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
  python evaluate.py --paper_tables                                                  # out/report/report.md
"""

from __future__ import annotations                              # cfg is a train.TrainConfig (no import cycle)

import argparse
import json
import os
import time

import torch
from tqdm import tqdm

import data
import md
import sample as S
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
    tmp = f"{path}.{os.getpid()}.tmp"                        # per process: two writers never share a temp file
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
def evaluate_t2i(pipe, prompts: list[str], batch: int = 64, real: torch.Tensor | None = None, **sample_kw) -> dict:
    """Attribute accuracy (data.check_attributes vs the prompt) of generated images, wall ms per image, and
    with `real` images the Frechet distance on pixel features ("fd"). Per-image tensors among sample_kw
    (cond, init, mask: one row per prompt) are batched with their prompts."""
    images, t0 = [], time.perf_counter()
    for i in range(0, len(prompts), batch):
        kw = {k: v[i:i + batch] if torch.is_tensor(v) and len(v) == len(prompts) else v for k, v in sample_kw.items()}
        images.append(pipe.images(prompts[i:i + batch], seed=i, **kw).cpu())
    ms = 1000 * (time.perf_counter() - t0) / len(prompts)
    images = torch.cat(images)
    res = {**data.attribute_accuracy(images, prompts), "ms_per_image": ms}
    if real is not None:
        res["fd"] = pixel_fd(images, real)
    return res, images


def pixel_fd(images: torch.Tensor, real: torch.Tensor) -> float:
    """Frechet distance between generated and real images on 8x8 thumbnails (data.pixel_features)."""
    return data.frechet_distance(data.pixel_features(images), data.pixel_features(real))


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
    prompts = heldout_prompts(cfg, cfg.eval_images)
    real = heldout_images(cfg, cfg.eval_images)
    base, ufo = S.Pipeline.from_checkpoint(base_path, device), S.Pipeline.from_checkpoint(ufo_path, device)
    rows = []
    for name, pipe, kw in [("onestep", ufo, S.SAMPLING["onestep"]),
                           ("ddim1", base, dict(steps=1, guidance_scale=cfg.guidance))]:
        res, imgs = evaluate_t2i(pipe, prompts, real=real, **kw)
        update_eval(os.path.join(cfg.out_dir, "eval.json"), name, res)
        print(f"eval {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))
        rows.append(imgs[:8])
    top = base.images(prompts[:8], steps=cfg.eval_steps, guidance_scale=cfg.guidance, seed=0).cpu()
    data.image_grid(torch.cat([top, rows[1], rows[0]]), nrow=8).save(os.path.join(cfg.out_dir, "onestep_vs_base.png"))


# ----------------------------------------------------------------------------------------------------
# 5.1 Metrics for real data: FID-30K and CLIP score, on images generated (resumably) to a folder
# ----------------------------------------------------------------------------------------------------

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"           # torch-fidelity's converted TF-FID weights


def need(package: str, pip_name: str):
    """Import an optional package or stop with a message naming it (not a traceback)."""
    import importlib
    try:
        return importlib.import_module(package)
    except ImportError:
        raise SystemExit(f"this needs the optional package {pip_name!r}: pip install {pip_name}") from None


def read_prompts(path: str) -> list[str]:
    """captions.txt (one per line) or metadata.jsonl (diffusers' layout: a "text" or "caption" field)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--prompts {path}: no such file")
    with open(path) as f:
        if path.endswith(".jsonl"):
            rows = [json.loads(line) for line in f if line.strip()]
            bad = [i for i, r in enumerate(rows) if not isinstance(r.get("text", r.get("caption")), str)]
            if bad:
                raise ValueError(f"{path}: line {bad[0] + 1} has no 'text' or 'caption' string")
            return [r.get("text", r.get("caption")) for r in rows]
        return [line.rstrip("\n") for line in f if line.strip()]


def file_sha256(path: str) -> str:
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_fingerprint(ckpt: str, prompts: list[str], batch: int, seed: int, sample_kw: dict) -> dict:
    """What fixes every image of a generation folder: the checkpoint's bytes, the prompts, the seeding (seed and
    batch: batch i is seeded seed + i) and the sampler settings. Saved as fingerprint.json beside the images."""
    import hashlib
    return {"ckpt_sha256": file_sha256(ckpt), "n": len(prompts), "seed": seed, "batch": batch,
            "prompts_sha256": hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
            "sampling": {k: v for k, v in sorted(sample_kw.items())}}


def check_fingerprint(folder: str, fp: dict, overwrite: bool) -> None:
    """A folder holding images of another checkpoint / seed / sampler / prompt set is never reused: refuse,
    naming what differs, or with `overwrite` delete its images and start over."""
    path = os.path.join(folder, "fingerprint.json")
    pngs = [f for f in os.listdir(folder) if f.endswith(".png")]
    old = json.load(open(path)) if os.path.isfile(path) else None
    if old is None and not pngs:
        write_json(path, fp)
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
    write_json(path, fp)


def generate(pipe, prompts: list[str], folder: str, batch: int = 16, seed: int = 0, fingerprint: dict | None = None,
             overwrite: bool = False, **sample_kw) -> list[str]:
    """Write prompts[i] -> folder/000000i.png, in fixed batches seeded by their first index, so a resumed run
    skips finished batches and reproduces the rest exactly. Files appear atomically (tmp + rename). With a
    `fingerprint` (run_fingerprint) the folder is only resumed if it was made by the same run."""
    os.makedirs(folder, exist_ok=True)
    if fingerprint is not None:
        check_fingerprint(folder, fingerprint, overwrite)
    paths = [os.path.join(folder, f"{i:07d}.png") for i in range(len(prompts))]
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


def load_folder(paths: list[str], size: int | None = None) -> torch.Tensor:
    """(N, 3, H, W) uint8 from image files (resized to `size` if given)."""
    from PIL import Image
    import numpy as np
    out = []
    for p in paths:
        im = Image.open(p).convert("RGB")
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
    fe = need("torch_fidelity.feature_extractor_inceptionv3", "torch-fidelity")
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
    open_clip = need("open_clip", "open_clip_torch")
    net, _, preprocess = open_clip.create_model_and_transforms(model, pretrained=weights, device=device)
    tok = open_clip.get_tokenizer(model)
    from PIL import Image
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


def evaluate_cli(args, guidance: float | None = None) -> dict:
    """Generate for --prompts (or the tiny held-out prompts) with --sampler (its CFG scale replaced by
    `guidance` if given), then every metric available."""
    from train import TrainConfig
    pipe = S.Pipeline.from_checkpoint(args.ckpt)
    tiny = args.prompts is None
    if tiny:                                                      # synthetic shapes: checker + pixel Frechet
        cfg = TrainConfig(resolution=pipe.resolution)
        prompts = heldout_prompts(cfg, args.n or cfg.eval_images)
    else:
        prompts = read_prompts(args.prompts)[:args.n or None]
    kw = {**S.SAMPLING[args.sampler], **({} if guidance is None else {"guidance_scale": guidance})}
    name = f"eval_{args.sampler}" + ("" if guidance is None else f"_cfg{guidance:g}")
    folder = os.path.join(args.out_dir, name) if args.out_dir and guidance is not None else \
        args.out_dir or os.path.join(os.path.dirname(args.ckpt), name)
    t0 = time.perf_counter()
    fp = run_fingerprint(args.ckpt, prompts, args.batch, args.seed, kw)
    paths = generate(pipe, prompts, folder, args.batch, args.seed, fingerprint=fp, overwrite=args.overwrite, **kw)
    result = {"sampler": args.sampler, "guidance_scale": kw.get("guidance_scale", 1.0), "n": len(paths), "images": folder}
    images = load_folder(paths).float() / 127.5 - 1                  # [-1, 1], as the checker reads them
    if tiny:
        result.update(data.attribute_accuracy(images, prompts))
        result["fd_pixels"] = pixel_fd(images, heldout_images(TrainConfig(resolution=pipe.resolution), len(prompts)))
    if args.ref_dir:
        refs = list_images(args.ref_dir)
        result["fd_pixels"] = pixel_fd(images, load_folder(refs, size=pipe.resolution).float() / 127.5 - 1)
        if args.inception_weights or not args.no_fid:
            result["fid"] = data.frechet_distance(inception_features(paths, args.inception_weights),
                                                  inception_features(refs, args.inception_weights))
    if args.clip_weights:
        result["clip_score"] = clip_score(paths, prompts, args.clip_model, args.clip_weights)
    result["wall_s"] = time.perf_counter() - t0
    print(json.dumps(result, indent=2))
    write_json(os.path.join(folder, "metrics.json"), result)
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


def plot_sweep(rows: list[dict], path: str, title: str) -> None:
    """The 5.2 figure's layout with pillow: quality (FID or its stand-in) on x, alignment (CLIP score or the
    checker) on y, one labelled point per CFG scale, joined in order of scale."""
    from PIL import Image, ImageDraw
    pts = [sweep_axes(r) for r in rows]
    xs, ys = [p[1] for p in pts], [p[3] for p in pts]
    W, H, m = 640, 420, 60
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    d.text((m, 10), title, fill="black")
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
    """5.2: the same prompts and seeds sampled at each CFG scale; writes guidance.json / .md / .png next to
    the per-scale image folders (<out_dir or ckpt dir>/eval_<sampler>_cfg<s>/)."""
    rows = [evaluate_cli(args, guidance=g) for g in scales]
    out = args.out_dir or os.path.dirname(args.ckpt)
    stem = os.path.join(out, f"guidance_{args.sampler}")
    write_json(stem + ".json", {"ckpt": args.ckpt, "sampler": args.sampler, "rows": rows})
    xn, _, yn, _ = sweep_axes(rows[0])
    lines = [f"| cfg scale | {yn} | {xn} | colour | background | shape |", "|---|---|---|---|---|---|"]
    for r in rows:
        _, x, _, y = sweep_axes(r)
        lines.append(f"| {r['guidance_scale']:g} | {y:.3f} | {x:.2f} | " +
                     " | ".join(f"{r[k]:.2f}" if k in r else "" for k in ("color", "background", "shape")) + " |")
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plot_sweep(rows, stem + ".png", f"{os.path.basename(args.ckpt)}, {args.sampler}: {yn} vs {xn} over CFG scales")
    print("\n".join(lines) + f"\nwrote {stem}.md / .json / .png")
    return rows


# ----------------------------------------------------------------------------------------------------
# --paper_tables: the paper's comparisons at toy scale, one report
# ----------------------------------------------------------------------------------------------------

PAPER_TABLE2 = {"MD, DDIM 50 steps": (8.65, 0.325), "MD, 1 step (UFOGen)": (11.67, 0.320)}   # FID-30K, CLIP
PAPER_TABLE5 = {"diffusion": (11.67, 13.45), "distill": (11.20, 13.24), "ema": (12.08, 14.05)}  # full / LoRA FID


def paper_tables(run_dir: str, report_dir: str, eval_images: int = 128, litert: bool = True) -> str:
    """Tables 1, 2, 4, 5 and the 5.4 plugins from what the tiny run left in run_dir, each row measured or quoted."""
    import export_coreml
    from train import TrainConfig
    os.makedirs(report_dir, exist_ok=True)
    t_start, out = time.time(), ["# MobileDiffusion at toy scale: the paper's tables", ""]
    out += ["## Table 1: UNet cost (measured: our count of our presets; quoted: the paper)", "", "```",
            md.table1(["sd", "md", "md-lite"]), "```", ""]

    # Table 2: samplers on the held-out prompts, same prompts and seeds for every row.
    cfg = TrainConfig()
    prompts, real = heldout_prompts(cfg, eval_images), heldout_images(cfg, eval_images)
    rows = [("DDIM 50 + CFG 3 (base)", "diffusion.pt", S.SAMPLING["ddim50"]),
            ("8-step student", "distill.pt", S.SAMPLING["eight_step"]),
            ("1-step UFOGen", "ufogen.pt", S.SAMPLING["onestep"]),
            ("1-step DDIM + CFG 3 (base)", "diffusion.pt", dict(steps=1, guidance_scale=3.0, sampler="ddim"))]
    out += [f"## Table 2 (toy): {len(prompts)} held-out prompts (unseen attribute combinations), 2 CPU cores", "",
            "| model | colour | background | shape | Fréchet (8×8 pixels) | ms / image | |", "|---|---|---|---|---|---|---|"]
    grid = []
    for name, file, kw in rows:
        path = os.path.join(run_dir, file)
        if not os.path.isfile(path):
            out.append(f"| {name} | | | | | | not run: no {path} (python train.py{' --stage distill' if file == 'distill.pt' else ''}) |")
            continue
        res, imgs = evaluate_t2i(S.Pipeline.from_checkpoint(path), prompts, real=real, **kw)
        out.append(f"| {name} | {res['color']:.2f} | {res['background']:.2f} | {res['shape']:.2f} | {res['fd']:.1f} "
                   f"| {res['ms_per_image']:.1f} | measured |")
        grid.append(imgs[:8])
    for name, (fid, clip) in PAPER_TABLE2.items():
        out.append(f"| {name} (MS-COCO 30K) | FID {fid} | CLIP {clip} | | | | quoted, paper Table 2 |")
    if grid:
        data.image_grid(torch.cat(grid), nrow=8).save(os.path.join(report_dir, "table2_samples.png"))
        out += ["", "Rows of `table2_samples.png`: the measured rows above, in order, first 8 prompts.", ""]

    # Table 4: per-component latency of the exported pipeline on this machine.
    ckpt = next((os.path.join(run_dir, f) for f in ("ufogen.pt", "diffusion.pt") if os.path.isfile(os.path.join(run_dir, f))), None)
    argv = ["--ckpt", ckpt] if ckpt else ["--preset", "tiny", "--resolution", "64"]
    fmt = "none"                                                  # PyTorch eager only, unless LiteRT is here
    if litert:
        try:
            need("ai_edge_litert", "ai-edge-litert"), need("litert_torch", "litert-torch")
            fmt = "litert"
        except SystemExit as e:
            print(f"Table 4: {e}; PyTorch eager only")
    argv += ["--format", fmt, "--benchmark", "--out", os.path.join(report_dir, "export"),
             "--json", os.path.join(report_dir, "table4.json")]
    export_coreml.main(argv)
    rows4 = json.load(open(os.path.join(report_dir, "table4.json")))
    out += ["## Table 4 (toy): per-component latency on this machine, 1 step "
            f"({'a trained checkpoint, ' + os.path.basename(ckpt) if ckpt else 'random tiny weights'})", "",
            export_coreml.table4(rows4), ""]

    # Table 5: the six UFOGen variants (python ufogen.py --table5 writes run_dir/table5/table5.md).
    t5 = os.path.join(run_dir, "table5", "table5.md")
    out += ["## Table 5 (toy): reconstruction loss x {full, LoRA}, 1-step samples", ""]
    if os.path.isfile(t5):
        out += [open(t5).read().strip(), "", "(measured: colour/background/shape accuracy and pixel Fréchet distance)"]
    else:
        out += [f"not run: no {t5} (python ufogen.py --table5, ~25 min on 2 cores)"]
    out += ["", "| reconstruction loss | No LoRA FID | LoRA FID | |", "|---|---|---|---|"]
    out += [f"| {k} loss | {a} | {b} | quoted, paper Table 5 |" for k, (a, b) in PAPER_TABLE5.items()]

    # 5.4: plugins on the base and one-step models (python plugins.py --report writes run_dir/plugins/).
    p54 = os.path.join(run_dir, "plugins", "plugins.md")
    out += ["", "## 5.4 (toy): a style LoRA, an edge adapter and inpainting, trained on the base, used on one step", ""]
    out += ([open(p54).read().strip().split("\n", 2)[2]] if os.path.isfile(p54) else
            [f"not run: no {p54} (python train.py --stage lora; python train.py --stage adapter; python plugins.py --report)"])
    out += ["", f"Report written in {(time.time() - t_start) / 60:.1f} min."]
    text = "\n".join(out)
    with open(os.path.join(report_dir, "report.md"), "w") as f:
        f.write(text + "\n")
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="MobileDiffusion evaluation: FID / CLIP score / checker accuracy, or the toy report")
    p.add_argument("--paper_tables", action="store_true", help="the tiny run's Tables 1, 2, 4, 5 -> --report_dir")
    p.add_argument("--run_dir", default="out/tiny", help="--paper_tables: where the tiny run wrote its checkpoints")
    p.add_argument("--report_dir", default="out/report")
    p.add_argument("--no_litert", action="store_true", help="--paper_tables: Table 4 with PyTorch eager only")
    p.add_argument("--ckpt", help="a checkpoint written by train.py (diffusion.pt, distill.pt, ufogen.pt)")
    p.add_argument("--sampler", default="ddim50", choices=sorted(S.SAMPLING))
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
    if args.paper_tables:
        t0 = time.time()
        text = paper_tables(args.run_dir, args.report_dir, litert=not args.no_litert)
        print(text)
        print(f"wrote {args.report_dir}/report.md in {(time.time() - t0) / 60:.1f} min")
        return text
    if not args.ckpt:
        p.error("give --ckpt (or --paper_tables)")
    if not os.path.isfile(args.ckpt):
        raise FileNotFoundError(f"--ckpt {args.ckpt}: no such file")
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
    md.run_cli(main)
