"""Tests for md.py: the 3 UNet, its switches, and Table 1 by our own count.

Independent references: the paper's Table 1 numbers, hand computations of attention and of the
parameter deltas of 3.2, and diffusers' UNet2DConditionModel (SD-1.5) counted by the same counter."""

import argparse
import dataclasses

import pytest
import torch

import config
import md
from md import PRESETS, UNet, UNetConfig


def tiny(**changes) -> UNetConfig:
    return dataclasses.replace(PRESETS["tiny"], **changes)


def inputs(cfg, batch=2, res=64, device=None):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, res // 8, res // 8, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    ctx = torch.randn(batch, 77, cfg.context_dim, generator=g)
    return x, t, ctx


# --- shapes -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("res", [32, 64, 96, 128])
def test_tiny_shapes_real_compute(res):
    cfg = PRESETS["tiny"]
    x, t, ctx = inputs(cfg, res=res)
    y = UNet(cfg)(x, t, ctx)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_tiny_non_square_and_scalar_t_and_short_context():
    cfg = PRESETS["tiny"]
    x = torch.randn(1, cfg.in_channels, 8, 12)
    y = UNet(cfg)(x, torch.tensor(10), torch.randn(1, 5, cfg.context_dim))
    assert y.shape == x.shape


@pytest.mark.parametrize("name", ["md", "md-lite", "sd"])
@pytest.mark.parametrize("res", [256, 512, 768])
def test_large_preset_shapes_on_meta(name, res):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = UNet(cfg)
        x = torch.zeros(2, cfg.in_channels, res // 8, res // 8)
        y = model(x, torch.zeros(2), torch.zeros(2, 77, cfg.context_dim))
    assert y.shape == x.shape


# --- Table 1 by our own count --------------------------------------------------------------------------

def test_md_reproduces_table1():
    c = md.unet_cost(PRESETS["md"], 512)
    assert (c["conv"], c["sa"], c["ca"]) == (11, 15, 18)                   # Table 1 / Table 6
    assert abs(c["params_m"] / 386 - 1) <= 0.05, c["params_m"]             # 386M +- 5%
    assert abs(c["gmacs"] / 182 - 1) <= 0.10, c["gmacs"]                   # 182 G +- 10%


@pytest.mark.slow
def test_md_lite_is_table6_and_cheaper():
    lite, full = md.unet_cost(PRESETS["md-lite"], 512), md.unet_cost(PRESETS["md"], 512)
    assert (lite["conv"], lite["sa"], lite["ca"]) == (11, 12, 15)          # Up-3: (SA x2 + CA x2) x3
    assert lite["params_m"] < full["params_m"] and lite["gmacs"] < full["gmacs"]


@pytest.mark.parametrize("name", ["md", "md-lite", "sd", "tiny"])
def test_block_count_formula_matches_built_modules(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = UNet(cfg)
    conv = sum(isinstance(m, (md.ResBlock, md.SepConvBlock)) for m in model.modules())
    sa = sum(l.sa is not None for l in model.modules() if isinstance(l, md.TransformerLayer))
    ca = sum(l.ca is not None for l in model.modules() if isinstance(l, md.TransformerLayer))
    assert md.count_blocks(cfg) == {"conv": conv, "sa": sa, "ca": ca}


def test_counter_counts_attention_matmuls_by_hand():
    # One SA layer on N tokens of width d: QK^T and AV are 2 * N^2 * d MACs on top of the projections.
    cfg = tiny(shared_kv=False)
    attn = md.Attention(64, 64, dataclasses.replace(cfg, head_dim=16), cross=False)
    n, d = 10, 64
    macs = md.count_macs(attn, torch.zeros(1, n, d))
    assert macs == 4 * n * d * d + 2 * n * n * d


# --- 3.2 claims on the counts ---------------------------------------------------------------------------

def test_shared_kv_removes_one_dxd_per_sa_layer():
    cfg = PRESETS["md"]
    with torch.device("meta"):
        shared, separate = UNet(cfg), UNet(dataclasses.replace(cfg, shared_kv=False))
    sa_dims = [l.sa.to_q.in_features for l in shared.modules() if isinstance(l, md.TransformerLayer) and l.sa]
    expected = sum(d * d for d in sa_dims)                                 # 15 layers x 1024^2
    delta = md.count_params(separate) - md.count_params(shared)
    assert delta == expected
    assert 0.03 <= delta / md.count_params(separate) <= 0.07                # the paper: "approximately 5%"


def test_ff_expansion_3_vs_4_removes_about_ten_percent():
    cfg = PRESETS["md"]
    with torch.device("meta"):
        e3, e4 = UNet(cfg), UNet(dataclasses.replace(cfg, ff_mult=4))
    dims = [l.ff.proj_out.out_features for l in e3.modules() if isinstance(l, md.TransformerLayer)]
    # GLU: d -> 2*e*d (+bias) and e*d -> d; one unit of e costs 3*d^2 + 2*d parameters.
    assert md.count_params(e4) - md.count_params(e3) == sum(3 * d * d + 2 * d for d in dims)
    assert 0.08 <= 1 - md.count_params(e3) / md.count_params(e4) <= 0.14    # the paper: "10% reduction"


@pytest.mark.slow
def test_counter_against_diffusers_sd15():
    """The counter itself, checked on an independent implementation: diffusers' SD-1.5 UNet with the
    plain-math attention processor (so Q K^T and A V are visible to the counter)."""
    diffusers = pytest.importorskip("diffusers")
    from diffusers.models.attention_processor import AttnProcessor
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)   # SD-1.5's config
        unet.set_attn_processor(AttnProcessor())
        x, ctx = torch.zeros(1, 4, 64, 64), torch.zeros(1, 77, 768)
        macs = md.count_macs(lambda *a: unet(*a).sample, x, torch.zeros(1), ctx)
    assert abs(macs / 1e9 / 392 - 1) <= 0.05, macs / 1e9                     # Table 1's SD-1.5 row
    ours = md.unet_cost(PRESETS["sd"], 512)
    assert abs(ours["gmacs"] * 1e9 / macs - 1) < 0.001                      # our "sd" preset is SD-1.5
    assert abs(ours["params_m"] * 1e6 / md.count_params(unet) - 1) < 0.001


# --- every switch changes the module --------------------------------------------------------------------

def test_relu_attention_by_hand_and_differs_from_softmax():
    torch.manual_seed(0)
    cfg = tiny(head_dim=8, shared_kv=False)
    sm = md.Attention(16, 16, cfg, cross=False)
    rl = md.Attention(16, 16, dataclasses.replace(cfg, attn_act="relu"), cross=False)
    for p in sm.parameters():
        torch.nn.init.normal_(p)
    rl.load_state_dict(sm.state_dict())
    x = torch.randn(1, 5, 16)
    q, k, v = (rearr(sm.to_q(x)), rearr(sm.to_k(x)), rearr(sm.to_v(x)))     # (1, 2 heads, 5, 8)
    s = q @ k.transpose(-1, -2) / 8 ** 0.5
    want_relu = sm.to_out(unrearr(torch.relu(s) / 5 @ v))                  # [57]: relu(s) / L, L = 5 keys
    want_soft = sm.to_out(unrearr(s.softmax(-1) @ v))
    torch.testing.assert_close(rl(x), want_relu)
    torch.testing.assert_close(sm(x), want_soft)
    assert not torch.allclose(rl(x), sm(x), atol=1e-3)


def rearr(z):
    return z.reshape(1, 5, 2, 8).transpose(1, 2)


def unrearr(z):
    return z.transpose(1, 2).reshape(1, 5, 16)


def test_shared_kv_has_no_separate_value_weight_and_ca_keeps_its_own():
    model = UNet(tiny(shared_kv=True))
    layer = next(m for m in model.modules() if isinstance(m, md.TransformerLayer) and m.sa is not None)
    assert hasattr(layer.sa, "to_kv") and not hasattr(layer.sa, "to_v") and not hasattr(layer.sa, "to_k")
    assert hasattr(layer.ca, "to_k") and hasattr(layer.ca, "to_v")          # 3.2 shares K/V in SA only
    sep = UNet(tiny(shared_kv=False))
    layer = next(m for m in sep.modules() if isinstance(m, md.TransformerLayer) and m.sa is not None)
    assert hasattr(layer.sa, "to_k") and hasattr(layer.sa, "to_v")


def randomised(model):
    """PyTorch's default random init everywhere, zero-initialised branches included (zero-init would hide
    the differences between switches that live inside the residual branches)."""
    torch.manual_seed(1)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return model


def test_swish_vs_gelu_changes_output_on_same_weights():
    a = randomised(UNet(tiny(ff_act="swish")))
    b = UNet(tiny(ff_act="gelu"))
    b.load_state_dict(a.state_dict())
    x, t, ctx = inputs(PRESETS["tiny"])
    assert not torch.allclose(a(x, t, ctx), b(x, t, ctx), atol=1e-5)


def test_softmax_state_dict_loads_into_relu_model():
    soft = randomised(UNet(tiny(attn_act="softmax")))
    relu = UNet(tiny(attn_act="relu"))
    relu.load_state_dict(soft.state_dict(), strict=True)                   # 3.2: finetune softmax -> relu
    x, t, ctx = inputs(PRESETS["tiny"])
    assert not torch.allclose(soft(x, t, ctx), relu(x, t, ctx), atol=1e-5)


def test_conv_type_and_sa_ca_switches_change_modules():
    full = UNet(tiny(conv_type=("full", "full", "full")))
    assert not any(isinstance(m, md.SepConvBlock) for m in full.modules())
    sep = UNet(PRESETS["tiny"])
    assert sum(isinstance(m, md.SepConvBlock) for m in sep.modules()) == 5  # Down-3 x2 + Up-3 x3
    k7 = UNet(tiny(sep_kernel=7))
    assert next(m for m in k7.modules() if isinstance(m, md.SepConvBlock)).dw.kernel_size == (7, 7)
    sa32 = md.count_blocks(tiny(self_attn=(False, True, True)))
    assert sa32["sa"] == 15 + 3                                            # SA back at 32x32: 1 + 2 layers
    no_ca = UNet(tiny(cross_attn=(False, False, True)))
    assert md.count_blocks(no_ca.cfg)["ca"] == 15


def test_zero_init_makes_every_transformer_stack_the_identity():
    model = UNet(PRESETS["tiny"])
    stack = next(m for m in model.modules() if isinstance(m, md.Transformer2D))
    x = torch.randn(2, stack.proj_in.in_features, 4, 4)
    assert torch.equal(stack(x, torch.randn(2, 7, model.cfg.context_dim)), x)


# --- training-readiness ---------------------------------------------------------------------------------

def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    model = UNet(PRESETS["tiny"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, t, ctx = inputs(model.cfg)
    # Zero-inits nest two deep (Transformer2D.proj_out around Attention.to_out), so the gradient needs
    # two updates to reach the projections inside; the third backward sees every parameter.
    for _ in range(3):
        opt.zero_grad()
        model(x, t, ctx).square().mean().backward()
        opt.step()
    dead = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not dead, dead


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_forward_is_finite(dtype):
    model = randomised(UNet(PRESETS["tiny"])).to(dtype)
    x, t, ctx = inputs(model.cfg)
    y = model(x.to(dtype), t, ctx.to(dtype))
    assert y.dtype == dtype and torch.isfinite(y).all()


# --- bad input -> a clear error naming the problem -------------------------------------------------------

def test_channels_not_divisible_by_heads_names_the_field():
    with pytest.raises(ValueError, match=r"channels\[2\] = 120 .*head_dim = 32"):
        UNet(tiny(channels=(32, 64, 120)))


def test_bad_per_level_tuple_and_enum_names_the_field():
    with pytest.raises(ValueError, match="down_layers"):
        UNet(tiny(down_layers=(1, 1)))
    with pytest.raises(ValueError, match="attn_act"):
        UNet(tiny(attn_act="sigmoid"))
    with pytest.raises(ValueError, match=r"conv_type\[1\]"):
        UNet(tiny(conv_type=("full", "depthwise", "sep")))


def test_resolution_not_divisible_is_a_clear_error():
    model = UNet(PRESETS["tiny"])
    with pytest.raises(ValueError, match="not divisible by 4.*divisible by 32"):
        model(torch.randn(1, 8, 10, 10), torch.zeros(1), torch.randn(1, 77, 128))
    with pytest.raises(ValueError, match="in_channels=8"):
        model(torch.randn(1, 4, 8, 8), torch.zeros(1), torch.randn(1, 77, 128))
    with pytest.raises(ValueError, match="context_dim=128"):
        model(torch.randn(1, 8, 8, 8), torch.zeros(1), torch.randn(1, 77, 768))
    with pytest.raises(ValueError, match="resolution = 100"):
        md.unet_cost(PRESETS["md"], 100)


# --- flags are config fields -------------------------------------------------------------------------

def test_flags_are_generated_from_config_fields():
    p = argparse.ArgumentParser()
    config.add_config_flags(p, UNetConfig)
    args = p.parse_args(["--attn_act", "softmax", "--channels", "64,128,256", "--shared_kv", "false",
                         "--self_attn", "false,true,true"])
    cfg = config.config_from_args(PRESETS["md"], args)
    assert cfg.attn_act == "softmax" and cfg.channels == (64, 128, 256) and cfg.shared_kv is False
    assert cfg.self_attn == (False, True, True)
    assert cfg.ff_mult == PRESETS["md"].ff_mult                            # untouched fields keep the preset
    assert {f.name for f in dataclasses.fields(UNetConfig)} <= {a.dest for a in p._actions}


def test_pooled_text_switch_adds_one_projection_and_conditions_the_conv_path():
    off, on = UNet(tiny(pooled_text=False)), UNet(tiny(pooled_text=True))
    assert md.count_params(on) - md.count_params(off) == 128 * 4 * 32 + 4 * 32     # Linear(context_dim, 4*C0)
    x, t, ctx = inputs(on.cfg)
    no_ca = UNet(tiny(pooled_text=True, cross_attn=(False, False, False)))       # only the pooled path sees text
    randomised(no_ca)
    with torch.no_grad():
        assert not torch.allclose(no_ca(x, t, ctx), no_ca(x, t, ctx.roll(1, 0)), atol=1e-5)
