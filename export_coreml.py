"""export_coreml.py -- on-device export and latency of MobileDiffusion (paper 5.2, Table 4).

Paper: Zhao et al., MobileDiffusion: Instant Text-to-Image Generation on Mobile Devices.
  3.2  "gelu -> swish" and "softmax -> ReLU": operations that are cheap and numerically safe in fp16/int8 on
       mobile hardware. The fp16-vs-fp32 check below measures that claim on our own modules (--numerics).
  5.2  Table 4: per-component on-device latency (text encoder, decoder, UNet per step, steps, overall), measured
       with apple/ml-stable-diffusion on an iPhone 15 Pro.
The Android route follows Choi et al., Squeezing Large-Scale Diffusion Models for Mobile (TFLite:
fp16-safe activations, weight quantisation, components exported and loaded one at a time).

Each component is exported on its own, with fixed shapes and named inputs/outputs, as ml-stable-diffusion does:
    text_encoder   input_ids (1, 77) int32                              -> last_hidden_state (1, 77, D)
    unet           sample (B, c, h, w), timestep (B,) float32,
                   encoder_hidden_states (B, 77, D)                     -> v_pred (B, c, h, w)   [v-prediction;
                                                                           eps for SD-1.5 folders: manifest.json]
    decoder        z (1, c, h, w), the sampler's (scaled) latent        -> image (1, 3, H, W) in [-1, 1]
B = 1 for one-step / distilled models, --unet_batch 2 for a classifier-free-guided sampler (cond + uncond).
The decoder divides by the VAE scaling factor itself; the light decoder (3.5) is used when present.

  python export_coreml.py --preset tiny --resolution 64 --out export/tiny            # random weights, Core ML
  python export_coreml.py --ckpt out/tiny/ufogen.pt --format both --out export/ufo   # a trained pipeline
  python export_coreml.py --preset md --format litert --quantize int8 --out export/md
  python export_coreml.py --preset md --benchmark --json table4.json                 # Table-4-shaped latency
  python export_coreml.py --preset md --numerics                                     # fp16 vs fp32 PSNR, 3.2

Optional packages (imported only here): coremltools (Core ML), litert-torch + ai-edge-litert (LiteRT).
Conversion goes through torch.export: coremltools 9's torch.jit.trace route fails with numpy >= 2.4.
"""

import argparse
import copy
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn as nn

import config
import md
import pretrained
import sample
import vae as vae_lib
from config import need                          # optional packages: a message naming them, not a traceback

# Table 4 of the paper (iPhone 15 Pro, Core ML; ms), quoted for context next to our measurements.
PAPER_TABLE4 = {
    "SD 1.5":      dict(text_encoder_ms=4, decoder_ms=285, unet_ms=357, steps=20, overall_ms=7429),
    "SnapFusion":  dict(text_encoder_ms=4, decoder_ms=112, unet_ms=203, steps=8, overall_ms=1740),
    "UFOGen":      dict(text_encoder_ms=4, decoder_ms=285, unet_ms=357, steps=1, overall_ms=646),
    "MD-UFO":      dict(text_encoder_ms=4, decoder_ms=92, unet_ms=142, steps=1, overall_ms=238),
}




# ----------------------------------------------------------------------------------------------------
# Export-friendly, weight-identical forms of two ops (squeezing paper: keep the graph on the fast delegate)
# ----------------------------------------------------------------------------------------------------
# On litert-torch, nn.GroupNorm lowers to a BROADCAST_TO that XNNPACK does not delegate, and F.interpolate's
# nearest upsample to RESIZE_NEAREST_NEIGHBOR, which it does not delegate either: every such op splits the
# graph into a new partition that runs on the slow reference kernels. Written with reshapes, mean, rsqrt and
# concatenation the same arithmetic delegates whole. Same parameters, same state dict, outputs equal to ~1e-6.

class ExportGroupNorm(nn.Module):
    def __init__(self, gn: nn.GroupNorm):
        super().__init__()
        self.groups, self.eps = gn.num_groups, gn.eps
        self.weight, self.bias = gn.weight, gn.bias                # shared, not copied

    def forward(self, x):                                          # (B, C, H, W)
        b, c, h, w = x.shape
        g = x.reshape(b, self.groups, (c // self.groups) * h * w)  # (B, G, C/G*H*W)
        mean = g.mean(-1, keepdim=True)
        var = (g - mean).square().mean(-1, keepdim=True)           # biased, as GroupNorm
        g = (g - mean) * torch.rsqrt(var + self.eps)
        return g.reshape(b, c, h, w) * self.weight.reshape(1, c, 1, 1) + self.bias.reshape(1, c, 1, 1)


def nearest2x(x):                                                  # (B, C, H, W) -> (B, C, 2H, 2W)
    b, c, h, w = x.shape
    x = torch.stack([x, x], dim=-1).reshape(b, c, h, 2 * w)        # repeat each column
    return torch.stack([x, x], dim=-2).reshape(b, c, 2 * h, 2 * w) # repeat each row


class ExportUpsample(nn.Module):
    def __init__(self, up: md.Upsample):
        super().__init__()
        self.conv = up.conv

    def forward(self, x):
        return self.conv(nearest2x(x))


def export_friendly(model: nn.Module) -> nn.Module:
    """Swap GroupNorm and md.Upsample (used by the UNet and the VAE) for the forms above, in place."""
    for name, child in list(model.named_children()):
        if isinstance(child, nn.GroupNorm):
            setattr(model, name, ExportGroupNorm(child))
        elif isinstance(child, md.Upsample):
            setattr(model, name, ExportUpsample(child))
        else:
            export_friendly(child)
    return model


# ----------------------------------------------------------------------------------------------------
# The three components with fixed, named I/O
# ----------------------------------------------------------------------------------------------------

class TextEncoderIO(nn.Module):
    def __init__(self, text: md.TextEncoder):
        super().__init__()
        self.text = text

    def forward(self, input_ids):                                  # (1, 77) int32 -> (1, 77, D)
        return self.text.encode_ids(input_ids)


class UNetIO(nn.Module):
    def __init__(self, unet: md.UNet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states):   # (B, c, h, w), (B,), (B, 77, D)
        return self.unet(sample, timestep, encoder_hidden_states)  # v (B, c, h, w)


class DecoderIO(nn.Module):
    def __init__(self, vae: vae_lib.VAE):
        super().__init__()
        self.vae = vae

    def forward(self, z):                                          # (1, c, h, w) scaled latent
        return self.vae.decode(z / self.vae.cfg.scaling_factor)    # (1, 3, 8h, 8w) in [-1, 1]


@dataclasses.dataclass
class Component:
    name: str
    module: nn.Module
    inputs: dict          # name -> example tensor (shape and dtype are what the exported model takes)
    output: str


def untrained_like_trained(model: nn.Module) -> nn.Module:
    """Random weights for export checks: the zero-initialised last layers (md.py's init) get N(0, 0.02) too.
    A zero layer would hide its branch from the numerics and be folded away by the converters, so sizes,
    graphs and fp16 errors would not be those of a trained model."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.any():
                p.normal_(0, 0.02)
    return model


def load_pipeline(ckpt: str | None, preset: str | None, decoder: str | None):
    """(unet, vae, text encoder, info) from a checkpoint written by train.py or a diffusers SD folder, or random
    weights of a preset. info["schedule"]: the sampling schedule the app must run (sample.ScheduleConfig)."""
    if ckpt:
        if not os.path.isfile(ckpt) and not pretrained.is_pipeline_folder(ckpt):
            raise FileNotFoundError(f"--ckpt {ckpt}: no such file (a diffusion.pt / ufogen.pt / distill.pt from train.py or its .safetensors, "
                                    f"or a diffusers pipeline folder with model_index.json)")
        unet, vae, text, conf = sample.load_diffusion(ckpt)
        light = decoder or os.path.join(os.path.dirname(ckpt.rstrip("/")), "decoder.pt")
        if os.path.isfile(light):                                  # 3.5: the distilled light decoder
            vae_light = sample.load_vae(light)
            vae_light.cfg = dataclasses.replace(vae_light.cfg, scaling_factor=vae.cfg.scaling_factor)
            vae = vae_light
        elif decoder:
            raise FileNotFoundError(f"--decoder {decoder}: no such file")
        return unet, vae, text, {"source": ckpt, "decoder": light if os.path.isfile(light) else "full VAE decoder",
                                 "resolution": conf["train"].get("resolution", 512),
                                 "schedule": sample.schedule_config(conf)}
    if preset not in md.PRESETS:
        raise ValueError(f"--preset {preset!r}: unknown; choose from {sorted(md.PRESETS)}")
    torch.manual_seed(0)
    unet_cfg = md.PRESETS[preset]
    vname = next(n for n in (f"{preset}-light", preset, "md-light") if n in vae_lib.PRESETS)
    vcfg = dataclasses.replace(vae_lib.PRESETS[vname], latent_channels=unet_cfg.in_channels)
    tcfg = md.TEXT_PRESETS["tiny" if preset == "tiny" else "clip-l14"]
    # Random weights need no vocabulary: only encode_ids (token ids -> features) is exported, so the byte
    # tokenizer stands in for CLIP's BPE (the tiny preset's word tokenizer needs no files); the network is the same.
    tcfg = dataclasses.replace(tcfg, tokenizer="bytes" if tcfg.tokenizer == "clip" else tcfg.tokenizer, width=unet_cfg.context_dim)
    unet, vae, text = (untrained_like_trained(m.eval()) for m in (md.UNet(unet_cfg), vae_lib.VAE(vcfg), md.TextEncoder(tcfg)))
    return unet, vae, text, \
        {"source": f"random weights, preset {preset}", "decoder": vname, "resolution": 512,
         "schedule": sample.ScheduleConfig()}


def components(unet, vae, text, resolution: int, unet_batch: int = 1) -> list[Component]:
    f = vae.cfg.factor
    if resolution % f:
        raise ValueError(f"--resolution {resolution}: must be divisible by the VAE factor {f}")
    h = resolution // f
    down = 2 ** (len(unet.cfg.channels) - 1)
    if h % down:
        raise ValueError(f"--resolution {resolution}: the latent {h}x{h} must be divisible by {down} "
                         f"(the UNet downsamples {len(unet.cfg.channels) - 1} times); use a multiple of {f * down}")
    g = torch.Generator().manual_seed(0)
    L, D, c = text.cfg.max_len, text.cfg.width, unet.cfg.in_channels
    ids = torch.randint(0, text.cfg.vocab_size, (1, L), generator=g, dtype=torch.int32)
    for m in (unet, vae, text):
        m.requires_grad_(False).eval()
    return [
        Component("text_encoder", TextEncoderIO(text), {"input_ids": ids}, "last_hidden_state"),
        Component("unet", UNetIO(unet), {"sample": torch.randn(unet_batch, c, h, h, generator=g),
                                         "timestep": torch.full((unet_batch,), 999.0),
                                         "encoder_hidden_states": torch.randn(unet_batch, L, D, generator=g)}, "v_pred"),
        Component("decoder", DecoderIO(vae), {"z": torch.randn(1, vae.cfg.latent_channels, h, h, generator=g)}, "image"),
    ]


def psnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """ml-stable-diffusion's correctness measure: 20 log10(max|ref| / RMSE)."""
    ref, x = ref.double(), x.double()
    mse = (ref - x).square().mean().item()
    return float("inf") if mse == 0 else 20 * torch.log10(ref.abs().max() / mse ** 0.5).item()


# ----------------------------------------------------------------------------------------------------
# Core ML (the paper's runtime): torch.export -> coremltools ML program, fp16, fixed shapes
# ----------------------------------------------------------------------------------------------------

def to_coreml(comp: Component, target: str, quantize: str = "none"):
    ct = need("coremltools", "coremltools")
    with torch.no_grad():
        ep = torch.export.export(comp.module, tuple(comp.inputs.values())).run_decompositions({})
    inputs = [ct.TensorType(name=k, shape=tuple(v.shape), dtype=np.int32 if v.dtype == torch.int32 else np.float32)
              for k, v in comp.inputs.items()]
    ml = ct.convert(ep, inputs=inputs, outputs=[ct.TensorType(name=comp.output)], convert_to="mlprogram",
                    compute_precision=ct.precision.FLOAT16, minimum_deployment_target=getattr(ct.target, target),
                    skip_model_load=sys.platform != "darwin")       # only macOS can compile/run the model
    return compress_coreml(ml, quantize)


def compress_coreml(ml, quantize: str):
    """Weight compression of a converted ML program (ml-stable-diffusion's --quantize-nbits / palettisation):
    int8 linear (symmetric, per channel) or k-means palettes of 2^bits entries per weight tensor."""
    ct = need("coremltools", "coremltools")
    if quantize == "int8":
        cfg = ct.optimize.coreml.OptimizationConfig(ct.optimize.coreml.OpLinearQuantizerConfig(mode="linear_symmetric"))
        ml = ct.optimize.coreml.linear_quantize_weights(ml, cfg)
    elif quantize.startswith("palettize"):
        bits = int(quantize[len("palettize"):])
        need("sklearn", "scikit-learn")                            # coremltools' k-means
        cfg = ct.optimize.coreml.OptimizationConfig(ct.optimize.coreml.OpPalettizerConfig(mode="kmeans", nbits=bits))
        ml = ct.optimize.coreml.palettize_weights(ml, cfg)
    return ml


def coreml_ops(ml) -> Counter:
    """Op histogram of the converted ML program (main function)."""
    return Counter(op.op_type for f in ml._mil_program.functions.values() for op in f.operations if op.op_type != "const")


def coreml_predict(ml, comp: Component) -> torch.Tensor:
    return torch.from_numpy(ml.predict({k: v.numpy() for k, v in comp.inputs.items()})[comp.output])


# ----------------------------------------------------------------------------------------------------
# LiteRT (Android CPU: XNNPACK) via litert-torch, with fp16 / dynamic-range int8 weights
# ----------------------------------------------------------------------------------------------------

def to_litert(comp: Component, path: str, quantize: str) -> str:
    litert_torch = need("litert_torch", "litert-torch")
    with torch.no_grad():
        edge = litert_torch.convert(comp.module.eval(), tuple(comp.inputs.values()))
    edge.export(path)
    if quantize != "none":
        quantize_litert(path, path, quantize)
    return path


def quantize_litert(src: str, dst: str, mode: str) -> str:
    """Squeezing paper: smaller weights. "fp16": fp16 weights, fp32 compute; "int8": dynamic-range int8
    (int8 weights per channel, activations quantised on the fly) of every supported op. ai-edge-quantizer
    0.10 fails on some of the md UNet's conv weights ("input operand has more dimensions than allowed by the
    axis remapping"); then only the fully connected layers are quantised -- the transformers, which hold most
    of MD's weights (md UNet: 1450 -> 637 MB) -- and the convolutions keep fp32 weights."""
    aq = need("ai_edge_quantizer", "ai-edge-quantizer")
    from ai_edge_quantizer import qtyping, recipe
    q = aq.quantizer.Quantizer(src)
    if mode == "int8":
        q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
        try:
            q.quantize().export_model(dst, overwrite=True)
            return dst
        except ValueError as e:
            print(f"{os.path.basename(src)}: int8 of every op failed ({str(e)[:120]}...); "
                  f"int8 on the fully connected layers only")
            q = aq.quantizer.Quantizer(src)
            q.add_dynamic_config(".*", qtyping.TFLOperationName.FULLY_CONNECTED, 8)
    else:
        q.add_weight_only_config(".*", qtyping.TFLOperationName.ALL_SUPPORTED, 16,
                                 algorithm_key=recipe.AlgorithmName.FLOAT_CASTING)
    q.quantize().export_model(dst, overwrite=True)
    return dst


def litert_runner(path: str, threads: int = 2):
    need("ai_edge_litert", "ai-edge-litert")
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=threads)        # XNNPACK is the default CPU delegate
    off = undelegated_ops(it)                                      # before the runner holds tensor references
    return it.get_signature_runner(), off


def litert_run(runner, comp: Component) -> torch.Tensor:
    # litert-torch names the signature's inputs args_0, args_1, ... in the order of the example inputs.
    out = runner(**{f"args_{i}": v.numpy() for i, v in enumerate(comp.inputs.values())})
    return torch.from_numpy(next(iter(out.values())))


def undelegated_ops(it) -> Counter:
    """Ops that run outside XNNPACK. After delegation the interpreter appends one DELEGATE node per partition;
    walking back from each partition's outputs to its inputs marks the original nodes it swallowed."""
    it.allocate_tensors()
    w = it._interpreter
    names = [w.NodeName(i) for i in range(w.NumNodes())]
    delegates = [i for i, n in enumerate(names) if n == "DELEGATE"]
    first = min(delegates, default=len(names))                     # original nodes come before the delegates
    producer = {int(o): i for i in range(first) for o in w.NodeOutputs(i)}
    inside = set()
    for d in delegates:
        stop, todo = {int(x) for x in w.NodeInputs(d)}, [int(x) for x in w.NodeOutputs(d)]
        while todo:
            tensor = todo.pop()
            node = producer.get(tensor)
            if tensor in stop or node is None or node in inside:
                continue
            inside.add(node)
            todo += [int(x) for x in w.NodeInputs(node) if int(x) >= 0]
    return Counter(names[i] for i in range(first) if i not in inside) + Counter(partitions=len(delegates))


def runtime_ms(run, repeats: int) -> float:
    """Median ms of `repeats` calls of run() after one warm-up call (every runtime is timed the same way)."""
    times = []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        run()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times[1:])


# ----------------------------------------------------------------------------------------------------
# 3.2 numerics: fp16 vs fp32 of each component, and of the ablated activations
# ----------------------------------------------------------------------------------------------------

def fp16_psnr(comp: Component) -> float:
    """PSNR of the module run in fp16 (weights and activations) against fp32, same inputs. On CPU, PyTorch
    runs fp16 convs/matmuls natively (slowly); what matters here is fp16's range and rounding."""
    with torch.no_grad():
        ref = comp.module(*comp.inputs.values()).float()
        half = [v.half() if v.is_floating_point() else v for v in comp.inputs.values()]
        out = copy.deepcopy(comp.module).half()(*half).float()
    return psnr(ref, out)


def numerics(unet_cfg: md.UNetConfig, resolution: int) -> dict:
    """3.2: gelu -> swish and softmax -> ReLU attention 'for mobile deployment'. The same random init (seed 0)
    under each switch, fp16 vs fp32 PSNR of one UNet forward."""
    rows = {}
    for name, change in [("paper (swish, relu attn)", dict(ff_act="swish", attn_act="relu")),
                         ("gelu FF", dict(ff_act="gelu", attn_act="relu")),
                         ("softmax attn", dict(ff_act="swish", attn_act="softmax"))]:
        torch.manual_seed(0)
        unet = untrained_like_trained(md.UNet(dataclasses.replace(unet_cfg, **change)).eval())
        h = resolution // 8
        g = torch.Generator().manual_seed(0)
        comp = Component("unet", UNetIO(unet), {"sample": torch.randn(1, unet_cfg.in_channels, h, h, generator=g),
                                                "timestep": torch.full((1,), 999.0),
                                                "encoder_hidden_states": 3 * torch.randn(1, 77, unet_cfg.context_dim, generator=g)},
                         "v_pred")
        rows[name] = fp16_psnr(comp)
    return rows


# ----------------------------------------------------------------------------------------------------
# Main: export, check, benchmark
# ----------------------------------------------------------------------------------------------------

def size_mb(path: str) -> float:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs) / 2 ** 20
    return os.path.getsize(path) / 2 ** 20


def table4(rows: dict) -> str:
    """Table 4's layout, one line per runtime (measured here) and the paper's rows (quoted)."""
    out = ["| runtime | text encoder ms | decoder ms | UNet ms/step | steps | overall ms | |",
           "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        out.append(f"| {name} | {r['text_encoder_ms']:.1f} | {r['decoder_ms']:.1f} | {r['unet_ms']:.1f} | {r['steps']} "
                   f"| {r['overall_ms']:.1f} | measured |")
    for name, r in PAPER_TABLE4.items():
        out.append(f"| {name} (iPhone 15 Pro) | {r['text_encoder_ms']} | {r['decoder_ms']} | {r['unet_ms']} | {r['steps']} "
                   f"| {r['overall_ms']} | quoted, paper Table 4 |")
    return "\n".join(out)


def write_manifest(out_dir: str, comps: list[Component], text, vae, info: dict, files: dict):
    """What an app needs besides the models: I/O shapes, the latent scaling, the tokenizer files."""
    tok = {"kind": text.cfg.tokenizer, "max_len": text.cfg.max_len, "bos_id": text.cfg.bos_id,
           "eos_id": text.cfg.eos_id, "pad_id": text.cfg.pad_id}
    if text.cfg.tokenizer == "words":                               # md.Tokenizer's rule, for an app to re-implement
        tok["words"] = {"split": md.WORD_PATTERN.pattern, "lowercase": True, "id": f"crc32(utf-8 word) mod {text.cfg.bos_id}"}
    if text.cfg.tokenizer == "clip":                               # ship CLIP's BPE files next to the models
        os.makedirs(os.path.join(out_dir, "tokenizer"), exist_ok=True)   # (as vocab.json + merges.txt, whichever
        bpe = text.tokenizer                                             # form the source folder held)
        config.write_json(os.path.join(out_dir, "tokenizer", "vocab.json"), bpe.encoder)
        merges = sorted(bpe.ranks, key=bpe.ranks.get)
        config.write_text(os.path.join(out_dir, "tokenizer", "merges.txt"),
                          "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tok["files"] = ["tokenizer/vocab.json", "tokenizer/merges.txt"]
    sched = info["schedule"]
    # The app's sampler needs the schedule (abar_t per timestep, as the training code makes it), what the UNet
    # predicts and which timesteps to visit (sample.timesteps): all of it is here.
    schedule = {**dataclasses.asdict(sched), "alphas_cumprod": [round(float(a), 9) for a in
                                                                sample.make_schedule(sched)["alphas_cumprod"]]}
    manifest = {"source": info["source"], "decoder": info["decoder"], "prediction": sched.prediction,
                "schedule": schedule, "latent_scaling_factor": vae.cfg.scaling_factor, "tokenizer": tok, "files": files,
                "components": {c.name: {"inputs": {k: [list(v.shape), str(v.dtype).replace("torch.", "")]
                                                   for k, v in c.inputs.items()}, "output": c.output} for c in comps}}
    with open(os.path.join(out_dir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2)


def main(argv=None):
    p = argparse.ArgumentParser(description="Export MobileDiffusion components to Core ML / LiteRT and time them (Table 4)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="a diffusion.pt / ufogen.pt / distill.pt written by train.py (or its <stage>.safetensors), or a diffusers "
                                    "Stable Diffusion 1.x folder")
    src.add_argument("--preset", help=f"random weights of a UNet preset: {sorted(md.PRESETS)}")
    p.add_argument("--decoder", help="a light decoder.pt (default: decoder.pt next to --ckpt, if any)")
    p.add_argument("--out", default="export", help="output folder")
    p.add_argument("--format", default="coreml", choices=["coreml", "litert", "both", "none"])
    p.add_argument("--resolution", type=int, default=None, help="image size (default: training resolution or 512)")
    p.add_argument("--unet_batch", type=int, default=1, help="1: one-step / no CFG; 2: CFG's cond + uncond")
    p.add_argument("--target", default="iOS17", help="Core ML minimum deployment target (coremltools ct.target name)")
    p.add_argument("--quantize", default="none",
                   help="Core ML: none | int8 | palettize6 | palettize4; LiteRT: none | fp16 | int8")
    p.add_argument("--compute_units", default="CPU_AND_NE", help="Core ML on macOS: CPU_AND_NE | ALL | CPU_ONLY")
    p.add_argument("--components", default="text_encoder,unet,decoder")
    p.add_argument("--benchmark", action="store_true", help="time each component (median of --repeats after warm-up)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=1, help="UNet evaluations per image for the overall column (1: MD-UFO)")
    p.add_argument("--threads", type=int, default=2, help="LiteRT interpreter threads (and torch's)")
    p.add_argument("--json", help="write the latency table as JSON here")
    p.add_argument("--numerics", action="store_true", help="3.2: fp16-vs-fp32 PSNR per component and per activation")
    args = p.parse_args(argv)
    if not args.ckpt and not args.preset:
        p.error("give --ckpt (a trained pipeline) or --preset (random weights)")
    known = ("text_encoder", "unet", "decoder")
    bad = [c for c in args.components.split(",") if c not in known]
    if bad or not args.components:
        p.error(f"--components {args.components!r}: unknown {', '.join(map(repr, bad)) or 'empty'}; expected a "
                f"comma list of {', '.join(known)}")
    for name in ("resolution", "unet_batch", "threads", "repeats", "steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name} {value}: expected >= 1")
    if args.resolution is not None and args.resolution % 8:
        p.error(f"--resolution {args.resolution}: expected a multiple of 8 (the VAE's f = 8)")
    torch.set_num_threads(args.threads)
    unet, vae, text, info = load_pipeline(args.ckpt, args.preset, args.decoder)
    args.resolution = args.resolution or info["resolution"]
    export_friendly(unet), export_friendly(vae)
    wanted = args.components.split(",")
    comps = [c for c in components(unet, vae, text, args.resolution, args.unet_batch) if c.name in wanted]
    fmts = {"both": ["coreml", "litert"], "none": []}.get(args.format, [args.format])
    valid = {"coreml": ("none", "int8", "palettize6", "palettize4"), "litert": ("none", "fp16", "int8")}
    for fmt in fmts:
        if args.quantize not in valid[fmt]:
            p.error(f"--quantize {args.quantize!r} is not available for {fmt}: choose from {valid[fmt]}")
    if "coreml" in fmts:                                          # checked before any conversion work
        targets = sorted(t for t in dir(need("coremltools", "coremltools").target) if not t.startswith("_"))
        if args.target not in targets:
            p.error(f"--target {args.target!r}: not a Core ML deployment target; choose from {', '.join(targets)}")
    print(f"{info['source']} | decoder: {info['decoder']} | {args.resolution}px, latent "
          f"{args.resolution // vae.cfg.factor}, UNet batch {args.unet_batch}")
    os.makedirs(args.out, exist_ok=True)
    latency = {"torch": {}}
    files, report = {}, []
    for comp in comps:
        with torch.no_grad():
            ref = comp.module(*comp.inputs.values())
        used = [comp.module.vae.post_quant_conv, comp.module.vae.decoder] if comp.name == "decoder" else [comp.module]
        line = f"{comp.name:13s} {sum(md.count_params(m) for m in used) / 1e6:7.1f}M params"
        if args.numerics:
            line += f" | fp16 vs fp32 PSNR {fp16_psnr(comp):.1f} dB"
        if args.benchmark:
            with torch.no_grad():
                latency["torch"][comp.name] = runtime_ms(lambda: comp.module(*comp.inputs.values()), args.repeats)
        for fmt in fmts:
            t0 = time.time()
            if fmt == "coreml":
                ml = to_coreml(comp, args.target, args.quantize)
                path = os.path.join(args.out, f"{comp.name}.mlpackage")
                if os.path.exists(path):
                    shutil.rmtree(path)
                ml.save(path)
                ops = coreml_ops(ml)
                line += f" | coreml {size_mb(path):.1f} MB ({time.time() - t0:.0f} s)"
                if comp.name == "unet":
                    line += f", softmax ops: {ops.get('softmax', 0)}"
                    report.append("unet ML program ops: " + ", ".join(f"{k} {v}" for k, v in ops.most_common()))
                if sys.platform == "darwin":                       # Core ML runs only on Apple platforms
                    ct = need("coremltools", "coremltools")
                    ml = ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, args.compute_units))
                    line += f", PSNR vs torch {psnr(ref, coreml_predict(ml, comp)):.1f} dB"
                    if args.benchmark:
                        latency.setdefault(f"coreml ({args.compute_units})", {})[comp.name] = runtime_ms(
                            lambda: ml.predict({k: v.numpy() for k, v in comp.inputs.items()}), args.repeats)
            else:
                path = to_litert(comp, os.path.join(args.out, f"{comp.name}.tflite"), args.quantize)
                runner, off = litert_runner(path, args.threads)
                parts = off.pop("partitions")
                out = litert_run(runner, comp)
                line += (f" | litert {size_mb(path):.1f} MB ({time.time() - t0:.0f} s), max|diff| vs torch "
                         f"{(out - ref).abs().max().item():.1e}, PSNR {psnr(ref, out):.1f} dB, fully delegated: "
                         f"{'yes' if not off and parts == 1 else 'no (' + str(parts) + ' partitions; ' + str(dict(off)) + ')'}")
                if args.benchmark:
                    latency.setdefault("litert", {})[comp.name] = runtime_ms(lambda: litert_run(runner, comp), args.repeats)
            files.setdefault(fmt, {})[comp.name] = os.path.basename(path)
        print(line, flush=True)
    for line in report:
        print(line)
    if fmts:
        write_manifest(args.out, comps, text, vae, info, files)
        print(f"wrote {args.out}/ ({', '.join(fmts)}) and manifest.json")
    if args.numerics and args.ckpt is None:
        print("3.2 numerics, UNet fp16 vs fp32 PSNR (same init): " +
              ", ".join(f"{k} {v:.1f} dB" for k, v in numerics(unet.cfg, args.resolution).items()))
    if args.benchmark:
        rows = {}
        for runtime, ms in latency.items():
            if all(c in ms for c in ("text_encoder", "unet", "decoder")):
                rows[runtime] = {"text_encoder_ms": ms["text_encoder"], "decoder_ms": ms["decoder"],
                                 "unet_ms": ms["unet"], "steps": args.steps,
                                 "overall_ms": ms["text_encoder"] + args.steps * ms["unet"] + ms["decoder"]}
        print(table4(rows))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
            print(f"wrote {args.json}")
    return latency


if __name__ == "__main__":
    config.run_cli(main)
