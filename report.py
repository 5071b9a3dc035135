"""
report.py -- the paper's comparisons at toy scale, measured on what `python train.py` (and the optional stages)
left in out/tiny, each row marked measured or quoted:

  python report.py --paper_tables     Tables 1, 2, 4, 5 and 5.4 in one file: out/report/report.md (~1 min)
  python report.py --table5           5.3 / Table 5: 3 reconstruction losses x {full, LoRA}, 300 UFOGen steps each
                                      from out/tiny/diffusion.pt -> out/tiny/table5/table5.md (~20 min on 2 cores)
  python report.py --plugins          5.4: every plugin x {base DDIM-50, the one-step models} ->
                                      out/tiny/plugins/plugins.md / .json / .png (~3 min)

It sits on top of every other file (config.py lists the layers) and holds no method of the paper itself.
"""

import argparse
import json
import os
import time

import torch

import config
import data
import export_coreml
import md
import plugins
import sample
import train
from evaluate import cell_mask, evaluate_t2i, heldout_images, heldout_prompts, keep_psnr, measure_plugin, plugin_heldout

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
            ("8-step student", "distill.pt", sample.SAMPLING["eight_step"]),
            ("1-step UFOGen", "ufogen.pt", sample.SAMPLING["onestep"]),
            ("1-step DDIM + CFG 3 (base)", "diffusion.pt", dict(steps=1, guidance_scale=3.0, sampler="ddim"))]
    out += [f"## Table 2 (toy): {len(prompts)} held-out prompts (unseen attribute combinations), 2 CPU cores", "",
            "| model | colour | background | shape | Fréchet (8×8 pixels) | ms / image | |", "|---|---|---|---|---|---|---|"]
    grid = []
    for name, file, kw in rows:
        path = os.path.join(run_dir, file)
        if not os.path.isfile(path):
            out.append(f"| {name} | | | | | | not run: no {path} (python train.py{' --stage distill' if file == 'distill.pt' else ''}) |")
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


def table5(base_ckpt: str, out_dir: str, steps: int, eval_images: int) -> str:
    """Runs the 3 reconstruction losses x {full, LoRA} on the tiny setup and prints Table 5's shape: for
    1-step samples on held-out prompts, attribute accuracy and a Frechet distance on pixel features."""
    results = {}
    for recon in ("diffusion", "distill", "ema"):
        for rank in (0, 8):
            name = f"{recon}-{'lora' if rank else 'full'}"
            out = os.path.join(out_dir, name)
            # Eq. 1-3 as printed: unguided targets, whatever --ufogen_recon_guidance a preset sets.
            train.main(["--stage", "ufogen", "--init_from", base_ckpt, "--out_dir", out, "--ufogen_recon", recon,
                        "--ufogen_recon_guidance", "1", "--ufogen_lora_rank", str(rank), "--steps", str(steps),
                        "--eval_images", str(eval_images), "--sample_every", "0",
                        "--overwrite", "true"])                            # a fresh measurement each time
            results[name] = json.load(open(os.path.join(out, "eval.json")))["onestep"]
    lines = [f"{'reconstruction loss':<22}{'No LoRA':>28}{'LoRA':>28}",
             f"{'':<22}{'col/bg/shape   FD':>28}{'col/bg/shape   FD':>28}"]
    paper = PAPER_TABLE5
    for recon in ("diffusion", "distill", "ema"):
        cells = []
        for kind in ("full", "lora"):
            r = results[f"{recon}-{kind}"]
            cells.append(f"{r['color']:.2f}/{r['background']:.2f}/{r['shape']:.2f} {r['fd']:7.2f}")
        lines.append(f"{recon + ' loss':<22}{cells[0]:>28}{cells[1]:>28}   paper FID {paper[recon][0]} / {paper[recon][1]}")
    text = "\n".join(lines)
    config.write_text(os.path.join(out_dir, "table5.md"), "```\n" + text + "\n```\n")
    return text


# ----------------------------------------------------------------------------------------------------
# 5.4 plugins (--plugins): each plugin with and without it, on the base and on one-step models
# ----------------------------------------------------------------------------------------------------

INPAINT_VARIANTS = {                                    # how the one-step model inpaints (plugins.py, 5.4)
    "1 step": dict(steps=1),
    "1 step, strength 0.6": dict(steps=1, strength=0.6),
    "4 steps": dict(steps=4),
}


def plugins_report(base: str, onestep: dict, lora: str, adapter: str, out_dir: str, n: int, device: str = "cpu") -> str:
    """The 5.4 table on the tiny setup: every plugin with and without it, for the base (DDIM-50 + CFG) and for
    each one-step model in `onestep` ({row name: ufogen.pt}); plus a Figure-4-like grid."""
    os.makedirs(out_dir, exist_ok=True)
    base_pipe = sample.Pipeline.from_checkpoint(base, device)
    ev = plugin_heldout(base_pipe.resolution, n, device)
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
    cond = plugins.edges(ev["images"][:8]).cpu().expand(-1, 3, -1, -1) * 2 - 1
    masked = ev["images"][:8].cpu() * (1 - ev["mask"][:8].cpu())
    data.image_grid(torch.cat(grid + [cond, masked, ev["images"][:8].cpu()]), nrow=8).save(os.path.join(out_dir, "plugins.png"))
    text = "\n".join(lines)
    config.write_text(os.path.join(out_dir, "plugins.md"), text + "\n")
    config.write_json(os.path.join(out_dir, "plugins.json"), {"results": results, "vae_ceiling": {
        "style": ceil_style, "keep_psnr": ceil_psnr, "cell_psnr": ceil_cell}})
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's tables at toy scale (Tables 1, 2, 4, 5; 5.4's plugins)")
    job = p.add_mutually_exclusive_group(required=True)
    job.add_argument("--paper_tables", action="store_true", help="Tables 1, 2, 4, 5 and 5.4 -> --report_dir/report.md")
    job.add_argument("--table5", action="store_true", help="train and measure 3 reconstruction losses x {full, LoRA}")
    job.add_argument("--plugins", action="store_true", help="measure every plugin on every model -> --out_dir")
    p.add_argument("--run_dir", default="out/tiny", help="where the tiny run wrote its checkpoints")
    p.add_argument("--report_dir", default="out/report", help="--paper_tables: where report.md goes")
    p.add_argument("--no_litert", action="store_true", help="--paper_tables: Table 4 with PyTorch eager only")
    p.add_argument("--steps", type=int, default=300, help="--table5: UFOGen steps per variant")
    p.add_argument("--n", type=int, default=128, help="held-out prompts per measurement")
    p.add_argument("--onestep", action="append", default=None, metavar="NAME=CKPT",
                   help="--plugins: one-step models to compare (repeat); default: run_dir/ufogen.pt and, when present, "
                        "the three full-finetuning Table 5 runs in run_dir/table5/")
    p.add_argument("--out_dir", default=None, help="--table5: default run_dir/table5; --plugins: default run_dir/plugins")
    args = p.parse_args(argv)
    if args.n < 1 or args.steps < 1:
        p.error(f"--n {args.n} / --steps {args.steps}: expected >= 1")
    run = args.run_dir
    t0 = time.time()
    if args.paper_tables:
        text = paper_tables(run, args.report_dir, args.n, litert=not args.no_litert)
        where = os.path.join(args.report_dir, "report.md")
    elif args.table5:
        base = os.path.join(run, "diffusion.pt")
        if not os.path.isfile(base):
            raise FileNotFoundError(f"{base}: no such file (train it first: python train.py)")
        text = table5(base, args.out_dir or os.path.join(run, "table5"), args.steps, args.n)
        where = os.path.join(args.out_dir or os.path.join(run, "table5"), "table5.md")
    else:
        if args.onestep:
            bad = [s for s in args.onestep if "=" not in s or not s.split("=", 1)[0] or not s.split("=", 1)[1]]
            if bad:
                p.error(f"--onestep {bad[0]!r}: expected NAME=CKPT, e.g. --onestep 'my run=out/x/ufogen.pt'")
            onestep = dict(s.split("=", 1) for s in args.onestep)
        else:
            onestep = {"1-step UFOGen (default run)": os.path.join(run, "ufogen.pt")}
            onestep.update({f"1-step, recon {r} (Table 5 run)": os.path.join(run, "table5", f"{r}-full", "ufogen.pt")
                            for r in ("diffusion", "distill", "ema")
                            if os.path.isfile(os.path.join(run, "table5", f"{r}-full", "ufogen.pt"))})
        base, lora, adapter = (os.path.join(run, f) for f in ("diffusion.pt", "lora.pt", "adapter.pt"))
        for path in [base, lora, adapter, *onestep.values()]:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path}: missing; make it with: python train.py (base, ufogen), python train.py "
                                        f"--stage lora, python train.py --stage adapter, python report.py --table5")
        out = args.out_dir or os.path.join(run, "plugins")
        text = plugins_report(base, onestep, lora, adapter, out, args.n)
        where = os.path.join(out, "plugins.md")
    print(text)
    print(f"wrote {where} in {(time.time() - t0) / 60:.1f} min")
    return text


if __name__ == "__main__":
    config.run_cli(main)
