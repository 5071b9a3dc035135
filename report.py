"""
report.py -- the paper's comparisons at toy scale, measured on what `python train.py` (and the optional stages)
left in out/tiny, each row marked measured or quoted:

  python report.py --paper_tables     Tables 1, 2, 4, 5 and 5.4 in one file: out/report/report.md (~1 min)
  python report.py --table5           5.3 / Table 5: 3 reconstruction losses x {full, LoRA}, 300 UFOGen steps each
                                      from the base (out/tiny/relu.pt, else diffusion.pt) -> out/tiny/table5/table5.md
                                      (~20 min on 2 cores)
  python report.py --plugins          5.4: every plugin x {base DDIM-50, the one-step models} ->
                                      out/tiny/plugins/plugins.md / .json / .png (~3 min)
  python report.py --ablations        3.2 / 3.3: every architecture choice against the MD design, each trained at one
                                      toy budget (600 steps; --steps) for 3 seeds -> out/tiny/ablations/
                                      ablations.md (~40 min: 12 min a seed measured with --workers 2)

It sits on top of every other file (config.py lists the layers) and holds no method of the paper itself.
"""

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import time
from concurrent import futures

import numpy as np
import torch

import config
import data
import export_coreml
import md
import plugins
import sample
import train
from evaluate import (binomial_se, cell_mask, evaluate_t2i, heldout_images, heldout_prompts, keep_psnr, measure_plugin,
                      plugin_heldout)

# ----------------------------------------------------------------------------------------------------
# Tables 1, 2, 4 and 5 and 5.4 in one report (--paper_tables)
# ----------------------------------------------------------------------------------------------------

PAPER_TABLE2 = {"MD, DDIM 50 steps": (8.65, 0.325), "MD, 1 step (UFOGen)": (11.67, 0.320)}   # FID-30K, CLIP
PAPER_TABLE5 = {"diffusion": (11.67, 13.45), "distill": (11.20, 13.24), "ema": (12.08, 14.05)}  # full / LoRA FID


def paper_tables(run_dir: str, report_dir: str, eval_images: int = 128, litert: bool = True) -> str:
    """Tables 1, 2, 4, 5 and the 5.4 plugins from what the tiny run left in run_dir, each row measured or quoted."""
    os.makedirs(report_dir, exist_ok=True)
    t_start, out = time.time(), ["# MobileDiffusion at toy scale: the paper's tables", ""]
    out += ["## Table 1: UNet cost (measured: our count of our presets; quoted: the paper)", "", "```",
            md.table1(["sd", "md", "md-lite"]), "```", ""]

    # Table 2: samplers on the held-out prompts, same prompts and seeds for every row.
    cfg = train.TrainConfig()
    prompts, real = heldout_prompts(cfg, eval_images), heldout_images(cfg, eval_images)
    rows = [("DDIM 50 + CFG 3 (base)", "diffusion.pt", sample.SAMPLING["ddim50"]),
            ("DDIM 50 + CFG 3 (ReLU base, 3.2)", "relu.pt", sample.SAMPLING["ddim50"]),
            ("8-step student", "distill.pt", sample.SAMPLING["eight_step"]),
            ("1-step UFOGen", "ufogen.pt", sample.SAMPLING["onestep"]),
            ("1-step DDIM + CFG 3 (base)", "diffusion.pt", dict(steps=1, guidance_scale=3.0, sampler="ddim"))]
    out += [f"## Table 2 (toy): {len(prompts)} held-out prompts (unseen attribute combinations), 2 CPU cores", "",
            "| model | colour | background | shape | Fréchet (8×8 pixels) | ms / image | |", "|---|---|---|---|---|---|---|"]
    grid = []
    for name, file, kw in rows:
        path = os.path.join(run_dir, file)
        if not os.path.isfile(path):
            how = f" --stage {file[:-3]}" if file in ("distill.pt", "relu.pt") else ""
            out.append(f"| {name} | | | | | | not run: no {path} (python train.py{how}) |")
            continue
        res, imgs = evaluate_t2i(sample.Pipeline.from_checkpoint(path), prompts, real=real, **kw)
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
            config.need("ai_edge_litert", "ai-edge-litert"), config.need("litert_torch", "litert-torch")
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

    # Table 5: the six UFOGen variants (python report.py --table5 writes run_dir/table5/table5.md).
    t5 = os.path.join(run_dir, "table5", "table5.md")
    out += ["## Table 5 (toy): reconstruction loss x {full, LoRA}, 1-step samples", ""]
    if os.path.isfile(t5):
        out += [open(t5).read().strip(), "", "(measured: colour/background/shape accuracy and pixel Fréchet distance)"]
    else:
        out += [f"not run: no {t5} (python report.py --table5, ~20 min on 2 cores)"]
    out += ["", "| reconstruction loss | No LoRA FID | LoRA FID | |", "|---|---|---|---|"]
    out += [f"| {k} loss | {a} | {b} | quoted, paper Table 5 |" for k, (a, b) in PAPER_TABLE5.items()]

    # 5.4: plugins on the base and one-step models (python report.py --plugins writes run_dir/plugins/).
    p54 = os.path.join(run_dir, "plugins", "plugins.md")
    out += ["", "## 5.4 (toy): a style LoRA, an edge adapter and inpainting, trained on the base, used on one step", ""]
    out += ([open(p54).read().strip().split("\n", 2)[2]] if os.path.isfile(p54) else
            [f"not run: no {p54} (python train.py --stage lora; python train.py --stage adapter; python report.py --plugins)"])
    out += ["", f"Report written in {(time.time() - t_start) / 60:.1f} min."]
    text = "\n".join(out)
    config.write_text(os.path.join(report_dir, "report.md"), text + "\n")
    return text


TABLE5_RUNS = [(recon, rank, True) for recon in ("diffusion", "distill", "ema") for rank in (0, 8)] + \
    [("diffusion", 0, False)]                       # + Eq. 1's reconstruction term alone: what the game buys


def last_logged(metrics: str, stage: str, keys: tuple, last: int = 2) -> dict:
    """The mean of each key over a stage's last `last` logged lines in a metrics.jsonl (nan where never logged)."""
    rows = [json.loads(line) for line in open(metrics)]
    return {k: float(np.mean([r[k] for r in rows if r.get("stage") == stage and k in r][-last:] or [float("nan")]))
            for k in keys}


TABLE5_STEPS = 300                  # --table5's UFOGen steps per variant unless --steps gives them


def table5(base_ckpt: str, out_dir: str, steps: int, eval_images: int, data_name: str = "shapes") -> str:
    """Runs the 3 reconstruction losses x {full, LoRA}, and Eq. 1's reconstruction term without the adversarial
    one, on the tiny setup; prints Table 5's shape: for 1-step samples on held-out prompts, attribute accuracy,
    a Frechet distance on pixel features, the sharpness against the data's, and D's loss and accuracy, the mean
    of the last two metrics.jsonl lines that logged D (2 ln 2 = 1.386 and 0.5: a D that learned nothing)."""
    results = {}
    for recon, rank, adv in TABLE5_RUNS:
        name = f"{recon}-{'lora' if rank else 'full'}" + ("" if adv else "-noadv")
        out = os.path.join(out_dir, name)
        # Eq. 1-3 as printed: unguided targets, whatever --ufogen_recon_guidance a preset sets.
        train.main(["--stage", "ufogen", "--init_from", base_ckpt, "--out_dir", out, "--ufogen_recon", recon,
                    "--ufogen_recon_guidance", "1", "--ufogen_lora_rank", str(rank), "--steps", str(steps),
                    "--ufogen_adv", str(adv).lower(), "--eval_images", str(eval_images), "--sample_every", "0",
                    "--data", data_name,
                    "--overwrite", "true"])                            # a fresh measurement each time
        results[name] = {**json.load(open(os.path.join(out, "eval.json")))["onestep"],
                         **last_logged(os.path.join(out, "metrics.jsonl"), "ufogen", ("d_loss", "d_acc"))}
    config.write_json(os.path.join(out_dir, "table5.json"), results)

    def cell(r):
        return f"{r['color']:.2f} / {r['background']:.2f} / {r['shape']:.3f} | {r['fd']:.2f} | {r['sharpness']:.2f}"

    def game(r):
        return "off" if np.isnan(r["d_loss"]) else f"{r['d_loss']:.3f} / {r['d_acc']:.2f}"
    lines = [f"Base {base_ckpt}, data {data_name}, {steps} UFOGen steps each, {eval_images} held-out prompts, one "
             f"step. Sharpness: the samples' edge sharpness over the data's (data.sharpness). D: loss / accuracy, "
             f"the mean of its last two logged steps (chance: 1.386 / 0.50).", "",
             "| reconstruction loss | full: col / bg / shape | Fréchet | sharpness | D | LoRA r8: col / bg / shape | "
             "Fréchet | sharpness | D | paper FID, full / LoRA |", "|" + "---|" * 10]
    for recon in ("diffusion", "distill", "ema"):
        full, lora = results[f"{recon}-full"], results[f"{recon}-lora"]
        paper = PAPER_TABLE5[recon]
        eq = {"diffusion": 1, "distill": 2, "ema": 3}[recon]
        lines.append(f"| {recon} (Eq. {eq}) | {cell(full)} | {game(full)} | {cell(lora)} | {game(lora)} "
                     f"| {paper[0]} / {paper[1]} |")
    none = results["diffusion-full-noadv"]
    lines.append(f"| Eq. 1's reconstruction term alone (no adversarial term) | {cell(none)} | off | | | | "
                 f"| not in the paper |")
    text = "\n".join(lines)
    config.write_text(os.path.join(out_dir, "table5.md"), text + "\n")
    return text


# ----------------------------------------------------------------------------------------------------
# 5.4 plugins (--plugins): each plugin with and without it, on the base and on one-step models
# ----------------------------------------------------------------------------------------------------

INPAINT_VARIANTS = {                                    # how the one-step model inpaints (plugins.py, 5.4)
    "1 step": dict(steps=1),
    "1 step, strength 0.6": dict(steps=1, strength=0.6),
    "4 steps": dict(steps=4),
}


def plugins_report(base: str, onestep: dict, lora: str, adapter: str, out_dir: str, n: int, device: str = "cpu",
                   geometry: str = "shapes") -> str:
    """The 5.4 table on the tiny setup: every plugin with and without it, for the base (DDIM-50 + CFG) and for
    each one-step model in `onestep` ({row name: ufogen.pt}); plus a Figure-4-like grid."""
    os.makedirs(out_dir, exist_ok=True)
    base_pipe = sample.Pipeline.from_checkpoint(base, device)
    ev = plugin_heldout(base_pipe.resolution, n, device, geometry)
    models = [("base, DDIM-50 + CFG 3", base_pipe, sample.SAMPLING["ddim50"])]
    models += [(name, sample.Pipeline.from_checkpoint(path, device), sample.SAMPLING["onestep"]) for name, path in onestep.items()]
    grid, results = [], {}
    for name, pipe, kw in models:
        r = {}
        t0 = time.time()
        for kind, plugin in (("lora", lora), ("adapter", adapter)):
            r[kind] = {}
            for label, p in (("without", None), ("with", plugin)):
                r[kind][label], imgs = measure_plugin(kind, pipe, p, kw, ev, return_images=True)
                if len(results) < 2:
                    grid.append(imgs[:8])
        variants = {"": {}} if kw["sampler"] == "ddim" else INPAINT_VARIANTS
        r["inpaint"] = {}
        for label, v in variants.items():
            r["inpaint"][label], imgs = measure_plugin("inpaint", pipe, None, {**kw, **v}, ev, return_images=True)
            if len(results) < 2 and label in ("", "4 steps"):
                grid.append(imgs[:8])
        results[name] = r
        print(f"{name}: {(time.time() - t0) / 60:.1f} min")
    # VAE ceilings: the checker on reconstructions of the real style images / of the inpainting inputs.
    vae = base_pipe.vae
    styled_ds = data.Shapes("heldout", base_pipe.resolution, style="outlined", geometry=geometry)   # the same, outlined
    styled = torch.stack([styled_ds[i][0] for i in range(n)])
    with torch.no_grad():
        recon = vae.decode(vae.encode(styled.to(device)).mode()).cpu()
        rec = vae.decode(vae.encode(ev["images"]).mode()).cpu()
    ceil_style = data.attribute_accuracy(recon, ev["style_prompts"])
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
    cond = plugins.edges(ev["images"][:8]).cpu().expand(-1, 3, -1, -1) * 2 - 1
    masked = ev["images"][:8].cpu() * (1 - ev["mask"][:8].cpu())
    data.image_grid(torch.cat(grid + [cond, masked, ev["images"][:8].cpu()]), nrow=8).save(os.path.join(out_dir, "plugins.png"))
    text = "\n".join(lines)
    config.write_text(os.path.join(out_dir, "plugins.md"), text + "\n")
    config.write_json(os.path.join(out_dir, "plugins.json"), {"results": results, "vae_ceiling": {
        "style": ceil_style, "keep_psnr": ceil_psnr, "cell_psnr": ceil_cell}})
    return text


# ----------------------------------------------------------------------------------------------------
# 3.2 / 3.3 at toy scale (--ablations): each architecture choice against the MD design, same budget, 3 seeds
# ----------------------------------------------------------------------------------------------------

# (row, UNetConfig fields over the design (the tiny preset at toy scale, md at 512px; "md" / "tiny": the row's
# own values where the two differ), the paper's claim: section and sentence). "finetune": no config of its own,
# the design's model of the same seed finetuned into relu attention (train.py --stage relu).
ABLATIONS = [
    ("MD design, softmax attention (tiny preset; md at 512px)", {}, ""),
    ("+ self-attention at the middle level (md: 32x32)", {"self_attn": (False, True, True)},
     "3.2: retaining cross-attention layers while discarding only the self-attention layers at high resolutions "
     "does not result in a performance drop"),
    ("separate K and V projections", {"shared_kv": False},
     "3.2: setting W_K = W_V for self-attention layers does not adversely affect model performance"),
    ("FF expansion 4 (instead of 3)", {"ff_mult": 4},
     "3.2: trimming the expansion ratio to 3 results in nearly identical performance"),
    ("gelu GLU (instead of swish)", {"ff_act": "gelu"},
     "3.2: this replacement does not lead to a degradation in metrics or perceptual quality"),
    ("ReLU attention, trained from scratch", {"attn_act": "relu"},
     "3.2: there is no need to train a relu-attention model from scratch"),
    ("ReLU attention, finetuned from the design", "finetune",
     "3.2: finetuning from a pre-trained softmax-attention model proves sufficient"),
    ("full convolution at the inner level", {"conv_type": ("full", "full", "full")},
     "3.3: replacing vanilla convolution layers with separable ones in the deeper segments yields similar performance"),
    ("deeper, narrower bottleneck (inner channels / 2, depth x 2)",
     {"tiny": {"channels": (32, 64, 64), "down_depth": (0, 1, 6), "up_depth": (0, 1, 6)},
      "md": {"channels": (320, 640, 512), "down_depth": (0, 1, 6), "up_depth": (0, 1, 6)}},
     "3.2: stacking more transformer blocks with a large reduction of channel dimension proves detrimental"),
]
# Per run (--steps overrides steps); the default run's stage is 600 x 64. 600 steps, not 300: at 300 a run's
# all-90 shape is 0.65 and seeds differ by 4.3 points (which combinations it has learned yet), too much for a paired
# test to call 3 points in 10 seeds; at 600 it is 0.91, paired differences spread by 2.6 and 6 seeds call 2.7
# points (median over rows; docs/results.md).
ABLATION_BUDGET = dict(steps=600, batch_size=32, train_images=4096)
RELU_FINETUNE_STEPS = 100                                          # the finetuned row, on top of the design's run
ABLATION_DDIM = 25                  # DDIM steps of the evaluation (+ CFG 3): half DDIM-50's time
ABLATION_ALL = 4                    # prompts over all 90 combinations per held-out prompt: 512 at --n 128 (its
                                    # reading's noise, re-read from other initial noise: 1.0 point at 600
                                    # steps; at 300 steps 1.7, and 0.5 at 1024 prompts)
ABLATION_NOISE = (1_000_000, 2_000_000)  # evaluate_t2i seeds: the design's seed-0 model re-read from other noise
ABLATION_QUICK = dict(steps=2, batch_size=4, train_images=8)       # --quick: the tests' plumbing check
ABLATION_WARMUP = 3                 # untimed UNet forwards before the latency is measured (allocator, caches)


def ablation_config(preset: str, fields) -> md.UNetConfig:
    """The row's UNet at a preset's size: md.PRESETS[preset] with softmax attention (the design as it is trained,
    before 3.2's finetune; the tiny preset's own choice) and the row's fields."""
    design = dataclasses.replace(md.PRESETS[preset], attn_act="softmax")
    if fields == "finetune":
        return dataclasses.replace(design, attn_act="relu")
    own = fields.get(preset, {} if "md" in fields or "tiny" in fields else fields)
    return dataclasses.replace(design, **own)


def unet_latency_ms(cfg: md.UNetConfig, latent: int, text_len: int, repeats: int) -> float:
    """Median wall ms of one UNet forward (batch 1, fp32, this CPU) on a latent of latent x latent."""
    torch.manual_seed(0)
    unet = md.UNet(cfg).eval()
    x, ctx = torch.randn(1, cfg.in_channels, latent, latent), torch.randn(1, text_len, cfg.context_dim)
    times = []
    with torch.no_grad():
        for i in range(repeats + ABLATION_WARMUP):                   # the first calls warm up, untimed
            t0 = time.perf_counter()
            unet(x, torch.full((1,), 500), ctx)
            times.append(1000 * (time.perf_counter() - t0))
    return float(np.median(times[ABLATION_WARMUP:]))


@functools.lru_cache(maxsize=2)              # once per process: the report's, and each --workers process's
def ablation_eval_sets(resolution: int, n: int) -> dict:
    """The ablations' evaluation: n held-out prompts (9 unseen combinations) and ABLATION_ALL x n prompts over all
    90 combinations (new images of the 81 seen ones too), with their real images for the Frechet distance. Every
    run reads the same prompts from the same initial noise (evaluate_t2i seeds each batch by its index), so two
    rows of one training seed differ by their models only: the verdicts compare them seed by seed."""
    sets = {}
    for split, k in (("heldout", n), ("all", ABLATION_ALL * n)):
        ds = data.Shapes(split, resolution)
        items = [ds[i] for i in range(k)]
        sets[split] = ([c for _, c in items], torch.stack([im for im, _ in items]))
    return sets


def ablation_run(out_dir: str, i: int, seed: int, flags: list, ft_steps: int, ddim: int, n: int) -> dict:
    """One run of the ablations: row i of ABLATIONS trained with training seed `seed` into out_dir/row<i>_seed<s>
    (the finetuned row: the design's run of that seed + ft_steps relu steps) and read on ablation_eval_sets.
    Keeps the inference weights (.safetensors); only the design's runs keep their training checkpoint."""
    fields = ABLATIONS[i][1]
    t0, d = time.time(), os.path.join(out_dir, f"row{i}_seed{seed}")
    if fields == "finetune":                                            # the design's model of this seed, + relu
        base = os.path.join(out_dir, f"row0_seed{seed}", "diffusion.pt")
        train.main(["--stage", "relu", "--init_from", base, "--out_dir", d, "--seed", str(seed), *flags,
                    "--steps", str(ft_steps)])
        ckpt = os.path.join(d, "relu.pt")
    else:
        cfg = ablation_config("tiny", fields)
        own = [x for k, v in dataclasses.asdict(cfg).items() if v != getattr(md.PRESETS["tiny"], k)
               for x in (f"--{k}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v))]
        train.main(["--stage", "diffusion", "--out_dir", d, "--seed", str(seed), *flags, *own])
        ckpt = os.path.join(d, "diffusion.pt")
    pipe = sample.Pipeline.from_checkpoint(ckpt)
    sets = ablation_eval_sets(train.TrainConfig().resolution, n)
    res = {split: ablation_read(pipe, prompts_real, ddim) for split, prompts_real in sets.items()}
    if i != 0:                                                          # its .safetensors stays; 4x smaller
        os.remove(ckpt)
    return {**res, "minutes": (time.time() - t0) / 60, "threads": torch.get_num_threads()}


def worker_threads(workers: int) -> None:
    """A --workers process's torch threads: the machine's cores shared out. The toy UNet's ops are too small for
    one run to use many cores well; on 2 cores it is a wash (88 images/s of training per worker at 1 thread, 179
    for one run at 2); it is meant for machines with more (not measured here)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def ablations(run_dir: str, out_dir: str, seeds: int, n: int, quick: bool = False, rows: list | None = None,
              workers: int = 1, steps: int | None = None) -> str:
    """Trains every ABLATIONS row at the same toy budget for `seeds` seeds (a fresh diffusion stage each, on the
    default run's VAE) and measures it: params and GMACs (md at 512px and the toy), CPU ms of one forward, and
    DDIM-25 + CFG 3 quality (the checker and the pixel Frechet distance) as mean and spread over the seeds.
    rows: indices into ABLATIONS (default all; row 0, the design, always runs: every verdict compares with it and
    the finetuned row starts from it). steps: diffusion steps a run (default ABLATION_BUDGET's; an out_dir holding
    another budget's runs is refused, not overwritten: they do not compare). workers: runs side by side in that
    many processes (a finetuned run waits for the design's run of its seed); this process alone writes
    out_dir/ablations.json, after every run, so a stopped report continues where it was. The latencies are
    measured after the last run, on an idle machine."""
    vae = next((p for p in (os.path.join(run_dir, f) for f in ("decoder.pt", "vae.pt")) if os.path.isfile(p)), None)
    if vae is None:
        raise FileNotFoundError(f"--ablations: no VAE in {run_dir} (decoder.pt / vae.pt); train it first: "
                                f"python train.py --stage vae; python train.py --stage decoder")
    os.makedirs(out_dir, exist_ok=True)
    budget = ABLATION_QUICK if quick else {**ABLATION_BUDGET, "steps": steps or ABLATION_BUDGET["steps"]}
    t_start = time.time()
    ft_steps, ddim = (2, 2) if quick else (RELU_FINETUNE_STEPS, ABLATION_DDIM)
    store = os.path.join(out_dir, "ablations.json")
    done = json.load(open(store)) if os.path.isfile(store) else {}
    setting = {**budget, "finetune": ft_steps, "ddim": ddim, "n": n, "all": ABLATION_ALL * n}
    if done and done.get("budget") != setting:          # another budget's runs do not compare; keep them
        raise ValueError(f"{store}: its runs were trained and read at {done.get('budget')}, this call's setting is "
                         f"{setting}; give another --out_dir (or remove {out_dir} to start afresh)")
    done = done or {"budget": setting, "runs": {}}
    flags = ["--vae_ckpt", vae, "--sample_every", "0", "--eval_images", "1", "--eval_steps", "1", "--overwrite", "true",
             *(x for k, v in budget.items() for x in (f"--{k}", str(v)))]
    rows = sorted({0, *(range(len(ABLATIONS)) if rows is None else rows)})   # the design: every verdict's reference
    def key(i, seed):
        return f"{ABLATIONS[i][0]} / seed {seed}"
    todo = [(i, seed) for seed in range(seeds) for i in rows if key(i, seed) not in done["runs"]]   # seed by seed
    pool = (futures.ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), worker_threads, (workers,))
            if workers > 1 and todo else None)
    running = {}                                                         # future -> (row, seed)
    try:
        while todo or running:
            ready = [t for t in todo if ABLATIONS[t[0]][1] != "finetune" or key(0, t[1]) in done["runs"]]
            for i, seed in ready[:workers - len(running)]:              # at most `workers` runs at a time, in order
                todo.remove((i, seed))
                args = (out_dir, i, seed, flags, ft_steps, ddim, n)
                if pool is None:                                        # one worker: this process, run at once
                    f = futures.Future()
                    f.set_result(ablation_run(*args))
                else:
                    f = pool.submit(ablation_run, *args)
                running[f] = (i, seed)
            for f in futures.wait(running, return_when=futures.FIRST_COMPLETED).done:
                k, res = key(*running.pop(f)), f.result()
                done["runs"][k] = res
                config.write_json(store, done)
                print(f"ablations: {k}: " + ", ".join(f"{s} shape {res[s]['shape']:.3f} fd {res[s]['fd']:.2f}"
                                                      for s in ("heldout", "all")) + f" ({res['minutes']:.1f} min)")
    finally:
        if pool is not None:                                            # after a failed run: the runs in flight end
            pool.shutdown(cancel_futures=True)
    sets = ablation_eval_sets(train.TrainConfig().resolution, n)
    if "eval_noise" not in done:
        done["eval_noise"] = eval_noise(os.path.join(out_dir, "row0_seed0", "diffusion.pt"), done["runs"],
                                        sets["all"], ddim)
        config.write_json(store, done)
    text = ablation_table(done, seeds, sets, quick, (time.time() - t_start) / 60)
    config.write_text(os.path.join(out_dir, "ablations.md"), text + "\n")
    return text


def ablation_read(pipe, prompts_real: tuple, ddim: int, seed: int = 0) -> dict:
    """One reading of the ablations' evaluation: DDIM-ddim + CFG 3 on a set's (prompts, real images), from
    evaluate_t2i's initial noise `seed`: the checker's accuracies and the pixel Frechet distance."""
    prompts, real = prompts_real
    r, _ = evaluate_t2i(pipe, prompts, real=real, seed=seed, steps=ddim, guidance_scale=3.0)
    return {k: r[k] for k in ("shape", "color", "background", "fd")}


def eval_noise(ckpt: str, runs: dict, all_set: tuple, ddim: int) -> dict:
    """The evaluation's own noise, measured: the design's seed-0 model read on the all-90 prompts from its run's
    initial noise (ablations.json has it) and from len(ABLATION_NOISE) other draws. {"shape": [..], "fd": [..]}:
    their spread is what a re-read of one model moves; the rest of a row's seed spread is its training's."""
    pipe = sample.Pipeline.from_checkpoint(ckpt)
    first = runs[f"{ABLATIONS[0][0]} / seed 0"]["all"]                  # its run's own reading, from seed 0
    reads = [first, *(ablation_read(pipe, all_set, ddim, offset) for offset in ABLATION_NOISE)]
    return {k: [r[k] for r in reads] for k in ("shape", "fd")}


def mean_spread(values: list) -> str:
    """'mean ± sample std' over the seeds (± half the range for 2 seeds is the same number)."""
    v = np.array(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.3f}"


# Student's t at 97.5% by degrees of freedom: a paired difference over k seeds counts when its mean is beyond
# T975[k - 1] standard errors (a two-sided 95% paired t-test); 1.96 past the table.
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086,
        21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042}


RESOLVE = 0.03                      # the difference (shape accuracy) the resolution line says how to call


def seeds_needed(sd: float, diff: float) -> str:
    """The fewest seeds k with which a paired t-test at 95% calls a difference `diff` whose seed-by-seed
    differences spread by `sd`: T975[k - 1] x sd / sqrt(k) <= diff; "> 31" past the table (or no spread known)."""
    k = None if np.isnan(sd) else next((k for k in range(2, 32) if T975[k - 1] * sd / k ** 0.5 <= diff), None)
    return str(k) if k is not None else "> 31"


def paired(a: list, b: list) -> tuple[float, float, float]:
    """Seed-by-seed differences a - b: their mean, sample std, and the smallest |mean| a paired t-test at 95%
    calls (T975 x std / sqrt(k)); inf with one seed."""
    d = np.array(a, dtype=float) - np.array(b, dtype=float)
    if len(d) < 2:
        return float(d.mean()), float("nan"), float("inf")
    sd = float(d.std(ddof=1))
    return float(d.mean()), sd, T975.get(len(d) - 1, 1.96) * sd / len(d) ** 0.5


def ablation_table(done: dict, seeds: int, sets: dict, quick: bool, minutes: float) -> str:
    """The ablation table (markdown) with every row's cost, quality over the seeds and its verdict against the
    design (row 0) seed by seed."""
    b = done["budget"]
    n_held, n_all = (len(sets[s][0]) for s in ("heldout", "all"))
    lines = [f"# 3.2 / 3.3 ablations at toy scale (report.py --ablations{' --quick' if quick else ''})", "",
             f"Each row: a diffusion stage of {b['steps']} steps x batch {b['batch_size']} ({b['train_images']} cached "
             f"latents), seeds 0..{seeds - 1}; the finetuned row adds {b['finetune']} relu steps to the design's run. "
             f"Quality: DDIM-{b['ddim']} + CFG 3 on {n_held} held-out prompts (9 unseen combinations) and {n_all} "
             f"prompts over all 90 combinations, the same prompts and initial noise for every run; mean ± std over "
             f"the seeds. Verdict: the row minus the design, seed by seed, on the all-90 set (mean ± std of the "
             f"differences; a paired t-test at 95%). Cost: params (M) and GMACs of one UNet evaluation, md at 512px "
             f"(64x64 latent, 77 tokens) and the toy (8x8 latent, 16 tokens); ms: one UNet forward on this CPU, "
             f"batch 1, fp32.", "",
             "| choice | md params (M) | md GMACs | md ms | toy params (M) | toy GMACs | toy ms | held-out shape | "
             "all-90 shape | all-90 colour | all-90 Fréchet | verdict |", "|" + "---|" * 12]
    ref, row_sd, pair_sd, called = None, [], [], []
    for i, (name, fields, claim) in enumerate(ABLATIONS):
        runs = [done["runs"].get(f"{name} / seed {s}") for s in range(seeds)]
        if any(r is None for r in runs):
            lines.append(f"| {name} | | | | | | | not run | | | | |")
            continue
        md_cfg, tiny_cfg = ablation_config("md", fields), ablation_config("tiny", fields)
        md_cost, toy_cost = md.unet_cost(md_cfg, 512), md.unet_cost(tiny_cfg, 64, text_len=16)
        md_ms = unet_latency_ms(md_cfg, 64, 77, 3) if not quick else float("nan")
        toy_ms = unet_latency_ms(tiny_cfg, 8, 16, 5 if quick else 100)
        q = {(s, k): [r[s][k] for r in runs] for s in ("heldout", "all") for k in ("shape", "color", "fd")}
        if seeds > 1:
            row_sd.append(float(np.std(q["all", "shape"], ddof=1)))
        if i == 0:                                                   # ablations() always runs the design
            ref, verdict = q, "reference"
        else:
            verdict = ablation_verdict(q, ref, claim)
            _, sd, least = paired(q["all", "shape"], ref["all", "shape"])
            pair_sd.append(sd)
            called.append(least)
        lines.append(f"| {name} | {md_cost['params_m']:.1f} | {md_cost['gmacs']:.1f} | {md_ms:.0f} | "
                     f"{toy_cost['params_m']:.2f} | {toy_cost['gmacs']:.4f} | {toy_ms:.1f} | "
                     f"{mean_spread(q['heldout', 'shape'])} | {mean_spread(q['all', 'shape'])} | "
                     f"{mean_spread(q['all', 'color'])} | {mean_spread(q['all', 'fd'])} | {verdict} |")
    def med(v):                                                      # median over rows, in points
        return 100 * float(np.median(v)) if v else float("nan")
    p = float(np.mean(ref["all", "shape"])) if ref else 0.5          # the design's all-90 shape
    noise = done["eval_noise"]
    lines += ["", f"Resolution (shape, in points): on the held-out set one unseen combination drawn wrongly moves "
                  f"shape by about {100 / 9:.0f}; on the all-90 set one combination by {100 / 90:.1f} and one prompt "
                  f"by {100 / n_all:.2f}, and one reading's binomial s.e. at the design's {p:.2f} is "
                  f"{binomial_se(p, n_all):.1f}. "
                  f"Seed spread on the all-90 set, median over rows: {med(row_sd):.1f} (std of one row over the "
                  f"seeds), {med(pair_sd):.1f} (std of a row's difference from the design, seed by seed); the "
                  f"smallest difference the verdict calls: {med(called):.1f} (median over rows); at that spread a "
                  f"{100 * RESOLVE:.0f}-point difference is called with {seeds_needed(med(pair_sd) / 100, RESOLVE)} "
                  f"seeds. Re-reading the design's seed-0 model from {len(noise['shape'])} initial noises moves "
                  f"shape by {100 * np.std(noise['shape'], ddof=1):.1f} (std; Fréchet by "
                  f"{np.std(noise['fd'], ddof=1):.3f}): the evaluation's own noise; the rest of the seed spread is "
                  f"training's (seeds differ in which combinations they have learned), which no finer evaluation "
                  f"removes.",
              f"Training and evaluating the runs took {sum(r['minutes'] for r in done['runs'].values()):.1f} min in "
              f"all (ablations.json: each run's minutes); this call, {minutes:.1f} min."]
    return "\n".join(lines)


def ablation_verdict(q: dict, ref: dict, claim: str) -> str:
    """The row against the design on the all-90 set, seed by seed: better / worse / same by a paired t-test at 95%
    on shape accuracy and the Frechet distance (mean ± std of the differences); then the paper's claim."""
    words = []
    for key, sign, what in ((("all", "shape"), 1, "shape"), (("all", "fd"), -1, "Fréchet")):
        d, sd, least = paired(q[key], ref[key])
        words.append(f"{what} {'better' if sign * d > least else 'worse' if -sign * d > least else 'same'} "
                     f"({d:+.3f} ± {sd:.3f})")
    return ", ".join(words) + f"; paper {claim}"


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's tables at toy scale (Tables 1, 2, 4, 5; 5.4's plugins)")
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--paper_tables", action="store_true", help="Tables 1, 2, 4, 5 and 5.4 -> --report_dir/report.md")
    job.add_argument("--table5", action="store_true", help="train and measure 3 reconstruction losses x {full, LoRA}")
    job.add_argument("--plugins", action="store_true", help="measure every plugin on every model -> --out_dir")
    job.add_argument("--ablations", action="store_true", help="3.2/3.3: every architecture choice vs the design, "
                                                              "trained at one toy budget over --seeds seeds")
    p.add_argument("--seeds", type=int, default=3, help="--ablations: training seeds per row")
    p.add_argument("--workers", type=int, default=1, help="--ablations: runs side by side, each in its own process "
                                                         "with cores / workers torch threads")
    p.add_argument("--data", default="shapes", choices=sorted(data.GEOMETRY),
                   help="--table5 / --plugins: the synthetic data the run was trained on (train.py --data)")
    p.add_argument("--quick", action="store_true", help="--ablations: 2 steps a run (the tests' plumbing check)")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="--ablations: only these rows of report.ABLATIONS, e.g. 0,2 (default: all)")
    p.add_argument("--run_dir", default="out/tiny", help="where the tiny run wrote its checkpoints")
    p.add_argument("--report_dir", default="out/report", help="--paper_tables: where report.md goes")
    p.add_argument("--no_litert", action="store_true", help="--paper_tables: Table 4 with PyTorch eager only")
    p.add_argument("--steps", type=int, default=None, help="--table5: UFOGen steps per variant (report.TABLE5_STEPS); "
                                                            "--ablations: diffusion steps a run "
                                                            "(report.ABLATION_BUDGET's)")
    p.add_argument("--n", type=int, default=128, help="held-out prompts per measurement")
    p.add_argument("--onestep", action="append", default=None, metavar="NAME=CKPT",
                   help="--plugins: one-step models to compare (repeat); default: those present of run_dir/ufogen.pt, "
                        "the three full-finetuning Table 5 runs in run_dir/table5/ and its no-adversarial-term run")
    p.add_argument("--out_dir", default=None, help="--table5 / --plugins / --ablations: default run_dir/table5, "
                                                  "run_dir/plugins, run_dir/ablations")
    args = p.parse_args(argv)
    for flag in ("n", "steps", "seeds", "workers"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag} {getattr(args, flag)}: expected >= 1")
    if args.rows and not all(0 <= i < len(ABLATIONS) for i in args.rows):
        p.error(f"--rows {','.join(map(str, args.rows))}: expected indices 0..{len(ABLATIONS) - 1} of report.ABLATIONS")
    run = args.run_dir
    t0 = time.time()
    if args.paper_tables:
        text = paper_tables(run, args.report_dir, args.n, litert=not args.no_litert)
        where = os.path.join(args.report_dir, "report.md")
    elif args.ablations:
        out = args.out_dir or os.path.join(run, "ablations")
        if args.quick and args.steps:
            p.error("--ablations: --quick sets its own 2 steps; give --quick or --steps, not both")
        text = ablations(run, out, args.seeds, args.n, args.quick, args.rows, args.workers, args.steps)
        where = os.path.join(out, "ablations.md")
    elif args.table5:
        base = train.default_base(run, "ufogen")
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{base}: no such file (train it first: python train.py)")
        text = table5(base, args.out_dir or os.path.join(run, "table5"), args.steps or TABLE5_STEPS, args.n,
                      args.data)
        where = os.path.join(args.out_dir or os.path.join(run, "table5"), "table5.md")
    else:
        if args.onestep:
            bad = [s for s in args.onestep if "=" not in s or not s.split("=", 1)[0] or not s.split("=", 1)[1]]
            if bad:
                p.error(f"--onestep {bad[0]!r}: expected NAME=CKPT, e.g. --onestep 'my run=out/x/ufogen.pt'")
            onestep = dict(s.split("=", 1) for s in args.onestep)
        else:
            table5_runs = {f"1-step, recon {r} (Table 5 run)": f"{r}-full" for r in ("diffusion", "distill", "ema")}
            table5_runs["1-step, recon diffusion, no adversarial term (Table 5 run)"] = "diffusion-full-noadv"
            candidates = {"1-step UFOGen (default run)": os.path.join(run, "ufogen.pt"),
                          **{k: os.path.join(run, "table5", v, "ufogen.pt") for k, v in table5_runs.items()}}
            present = {k: v for k, v in candidates.items() if os.path.isfile(v)}
            onestep = present or dict([next(iter(candidates.items()))])   # none: the error below names ufogen.pt
        base = train.default_base(run, "lora")
        lora, adapter = os.path.join(run, "lora.pt"), os.path.join(run, "adapter.pt")
        for path in [base, lora, adapter, *onestep.values()]:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing; make it with: python train.py (base, ufogen), python train.py "
                                        f"--stage lora, python train.py --stage adapter, python report.py --table5")
        out = args.out_dir or os.path.join(run, "plugins")
        text = plugins_report(base, onestep, lora, adapter, out, args.n, geometry=args.data)
        where = os.path.join(out, "plugins.md")
    print(text)
    print(f"wrote {where} in {(time.time() - t0) / 60:.1f} min")
    return text


if __name__ == "__main__":
    config.run_cli(main)
