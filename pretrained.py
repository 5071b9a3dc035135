"""
Pretrained weights in the layout people hold them: a Stable Diffusion 1.x pipeline folder as diffusers'
`StableDiffusionPipeline.save_pretrained` writes it (unet/ vae/ text_encoder/ tokenizer/ scheduler/ and
model_index.json), read from local files only, into this project's own networks.

  4 (intro)  UFOGen's one-step finetuning was made on SD-1.5, and Table 4's "UFOGen" row is SD-1.5 made one-step:
             with this loader SD-1.5 is a base like out/<run>/diffusion.pt for every post-training stage
             (train.py --init_from FOLDER: ufogen, distill, lora, adapter, diffusion finetuning), for sampling
             (sample.py --diffusers FOLDER) and for export (export_coreml.py --ckpt FOLDER).
  3.4        the "sd" preset of Table 1 is this UNet's architecture; unet_config_from_diffusers reads any SD-1.x-like
             UNet2DConditionModel config into a UNetConfig and refuses what the UNet cannot represent.

What goes where:
  unet/         load_unet: config.json -> UNetConfig, every weight renamed by DIFFUSERS_UNET_KEYS, loaded strictly
  vae/          vae.VAE.from_diffusers (AutoencoderKL, incl. fp16 variants and legacy attention names)
  text_encoder/ md.TextEncoder.from_pretrained (CLIP; special ids from the tokenizer's vocabulary)
  scheduler/    sample.schedule_from_diffusers (prediction type, betas, spacing), done by sample.load_diffusion
"""

import dataclasses
import os
import re

import config
import md
import vae as vae_lib

PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def is_pipeline_folder(path: str) -> bool:
    """A diffusers pipeline folder (what save_pretrained writes: model_index.json beside the parts)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "model_index.json"))


def check_pipeline_folder(folder: str) -> None:
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: no such folder (expected a diffusers pipeline folder: "
                                f"{', '.join(p + '/' for p in PIPELINE_PARTS)}, model_index.json)")
    missing = [p for p in PIPELINE_PARTS if not os.path.isdir(os.path.join(folder, p))]
    if missing or not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"{folder}: not a diffusers Stable Diffusion pipeline folder: missing "
                                f"{', '.join(m + '/' for m in missing) or 'model_index.json'}")


def load_models(folder: str):
    """(unet, vae, text encoder, conf) of an SD-1.x pipeline folder; conf has the shape of a train.py
    checkpoint's saved config (unet, text, vae, train) without the schedule, which sample.load_diffusion adds."""
    check_pipeline_folder(folder)
    unet = load_unet(folder)
    vae = vae_lib.VAE.from_diffusers(folder)
    text = md.TextEncoder.from_pretrained(folder)
    check_fit(folder, unet, vae, text)
    _, unet_json = config.read_diffusers_config(folder, "unet", "UNet2DConditionModel")
    resolution = int(unet_json.get("sample_size", 64)) * vae.cfg.factor          # SD-1.5: 64 x 8 = 512
    conf = {"unet": dataclasses.asdict(unet.cfg), "text": dataclasses.asdict(text.cfg),
            "vae": dataclasses.asdict(vae.cfg),
            "train": {"stage": "diffusion", "text_encoder": folder, "resolution": resolution, "diffusers": folder}}
    return unet.eval(), vae.eval(), text.eval(), conf


def check_fit(folder: str, unet: md.UNet, vae: vae_lib.VAE, text: md.TextEncoder) -> None:
    if unet.cfg.in_channels != vae.cfg.latent_channels or unet.cfg.context_dim != text.cfg.width:
        raise ValueError(f"{folder}: the parts do not fit together: UNet in_channels {unet.cfg.in_channels} vs VAE "
                         f"latent_channels {vae.cfg.latent_channels}, cross_attention_dim {unet.cfg.context_dim} vs "
                         f"text width {text.cfg.width}")


# ----------------------------------------------------------------------------------------------------
# unet/: a diffusers UNet2DConditionModel (Stable Diffusion 1.x's layout) as md.UNet
# ----------------------------------------------------------------------------------------------------

def unet_config(folder: str) -> tuple[str, md.UNetConfig]:
    """(the UNet's folder, its UNetConfig) of a diffusers UNet folder or a pipeline folder holding unet/."""
    folder, dc = config.read_diffusers_config(folder, "unet", "UNet2DConditionModel")
    return folder, unet_config_from_diffusers(dc, os.path.join(folder, "config.json"))


def load_unet(folder: str, into: md.UNet | None = None) -> md.UNet:
    """A diffusers `save_pretrained` UNet folder (or a pipeline folder holding unet/): config.json read into
    a UNetConfig (unet_config_from_diffusers), every weight loaded strictly through DIFFUSERS_UNET_KEYS
    (.safetensors, .bin or their fp16 variants). into: load into this UNet (built for that config by the
    caller) instead of building one, so that no second copy of the weights is made."""
    folder, cfg = unet_config(folder)
    model = md.UNet(cfg) if into is None else into
    load_diffusers_weights(model, vae_lib.load_weights_file(folder), folder)
    return model


def unet_from_diffusers_state(dc: dict, weights: dict, where: str) -> md.UNet:
    """md.UNet from a UNet2DConditionModel's config dict and state dict (as load_unet reads them from disk)."""
    model = md.UNet(unet_config_from_diffusers(dc, os.path.join(where, "config.json")))
    load_diffusers_weights(model, weights, where)
    return model


def load_diffusers_weights(model: md.UNet, weights: dict, where: str) -> None:
    """A UNet2DConditionModel's state dict, renamed by DIFFUSERS_UNET_KEYS, loaded strictly into model."""
    own, state = model.state_dict(), {}
    for key, t in weights.items():
        name = diffusers_unet_key(key)
        if name in own and t.ndim == 4 and own[name].ndim == 2:   # proj_in/out as 1x1 convs (SD-1.x)
            t = t[:, :, 0, 0]
        state[name] = t
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(f"{where}: the weights do not fit the UNet its config.json describes: missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]}, shapes {shapes[:3]}")
    model.load_state_dict(state)


# diffusers' UNet2DConditionModel names -> ours, applied in order (minGPT's from_pretrained lists its renames).
DIFFUSERS_UNET_KEYS = [
    (r"^time_embedding\.linear_1\.", "time_mlp.0."), (r"^time_embedding\.linear_2\.", "time_mlp.2."),
    (r"^down_blocks\.(\d+)\.downsamplers\.0\.", r"downsample.\1."),
    (r"^up_blocks\.(\d+)\.upsamplers\.0\.", r"upsample.\1."),
    (r"^down_blocks\.(\d+)\.resnets\.(\d+)\.", r"down.\1.\2.conv."),
    (r"^down_blocks\.(\d+)\.attentions\.(\d+)\.", r"down.\1.\2.attn."),
    (r"^up_blocks\.(\d+)\.resnets\.(\d+)\.", r"up.\1.\2.conv."),
    (r"^up_blocks\.(\d+)\.attentions\.(\d+)\.", r"up.\1.\2.attn."),
    (r"^mid_block\.resnets\.0\.", "mid.0.conv."), (r"^mid_block\.attentions\.0\.", "mid.0.attn."),
    (r"^mid_block\.resnets\.1\.", "mid.1.conv."),
    (r"\.time_emb_proj\.", ".time."), (r"\.conv_shortcut\.", ".skip."),
    (r"\.transformer_blocks\.(\d+)\.", r".layers.\1."),
    (r"(layers\.\d+)\.norm1\.", r"\1.norm_sa."), (r"(layers\.\d+)\.norm2\.", r"\1.norm_ca."),
    (r"(layers\.\d+)\.norm3\.", r"\1.norm_ff."),
    (r"\.attn1\.", ".sa."), (r"\.attn2\.", ".ca."), (r"\.to_out\.0\.", ".to_out."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."), (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"^conv_norm_out\.", "norm_out."),
]


def diffusers_unet_key(key: str) -> str:
    for pattern, new in DIFFUSERS_UNET_KEYS:
        key = re.sub(pattern, new, key)
    return key


def unet_config_from_diffusers(dc: dict, where: str) -> md.UNetConfig:
    """A diffusers UNet2DConditionModel config as a UNetConfig: SD-1.x's layout (cross-attention down/up blocks
    and plain ones, an optional cross-attention mid block, additive time embedding). Anything else (SDXL's added
    conditioning, a class embedding, other block types ...) is refused, naming the field."""
    def refuse(field, why):
        raise ValueError(f"{where}: {field} = {dc.get(field)!r}: {why}; this UNet implements SD-1.x's layout")
    if not isinstance(dc.get("block_out_channels"), (list, tuple)) or not dc["block_out_channels"]:
        refuse("block_out_channels", "a list of channels per level is needed")
    known = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    down, up = dc.get("down_block_types", ()), dc.get("up_block_types", ())
    if not down or any(b not in known for b in down):
        refuse("down_block_types", "expected CrossAttnDownBlock2D / DownBlock2D only")
    if list(up) != [b.replace("Down", "Up") for b in reversed(down)]:
        refuse("up_block_types", "expected the down blocks' mirror (CrossAttnUpBlock2D / UpBlock2D)")
    for field, ok in (("addition_embed_type", None), ("class_embed_type", None), ("encoder_hid_dim", None),
                      ("time_cond_proj_dim", None), ("num_class_embeds", None), ("dual_cross_attention", False),
                      ("only_cross_attention", False), ("center_input_sample", False), ("flip_sin_to_cos", True),
                      ("freq_shift", 0), ("act_fn", "silu"), ("time_embedding_type", "positional"),
                      ("resnet_time_scale_shift", "default"), ("conv_in_kernel", 3), ("conv_out_kernel", 3),
                      ("norm_eps", 1e-5), ("attention_type", "default")):
        if dc.get(field, ok) not in (ok, [ok]):
            refuse(field, f"only {ok!r} is supported")
    if dc.get("mid_block_type", "UNetMidBlock2DCrossAttn") not in ("UNetMidBlock2DCrossAttn", None):
        refuse("mid_block_type", "expected UNetMidBlock2DCrossAttn or none")
    n, per = len(down), lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v,) * len(down)
    # diffusers' legacy naming: without num_attention_heads, "attention_head_dim" is the number of heads
    heads = set(per(dc.get("num_attention_heads") or dc.get("attention_head_dim", 8)))
    if len(heads) != 1:
        refuse("attention_head_dim", "one head count at every level is supported")
    depth = per(dc.get("transformer_layers_per_block", 1))
    if dc.get("in_channels", 4) != dc.get("out_channels", 4):
        refuse("out_channels", f"differs from in_channels = {dc.get('in_channels')}")
    attn = tuple(known[b] for b in down)
    return md.UNetConfig(
        in_channels=dc.get("in_channels", 4), context_dim=dc.get("cross_attention_dim", 768),
        channels=tuple(dc["block_out_channels"]), conv_type=("full",) * n, down_layers=per(dc.get("layers_per_block", 2)),
        down_depth=tuple(d if a else 0 for d, a in zip(depth, attn)),
        up_depth=tuple(d if a else 0 for d, a in zip(depth, attn)), self_attn=attn, cross_attn=attn,
        mid_block=dc.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None, mid_depth=depth[-1] or 1,
        heads=heads.pop(), attn_norm_eps=1e-6, shared_kv=False, attn_act="softmax", ff_act="gelu", ff_mult=4,
        norm_groups=dc.get("norm_num_groups", 32))
