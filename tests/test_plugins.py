"""Tests for plugins.py (5.4): zero plugins change nothing, a LoRA file loads onto the base and onto a one-step
model with the hand-computed weight change, Sobel edges of a square lie on its boundary, inpainting keeps the
known latents exactly where the method says, and bad inputs are named; the lora / adapter stages end to end."""

import copy
import dataclasses
import json
import sys

import pytest
import torch
import torch.nn.functional as F

import config
import md
import plugins as P
import sample as S
import train
import vae as vae_lib


def inputs(n=2, size=8):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, 8, size, size, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.randn(n, 77, 128, generator=g))


# --- zero plugins ---------------------------------------------------------------------------------

def test_zero_adapter_and_zero_lora_leave_outputs_unchanged(random_unet):
    unet = random_unet()
    x, t, ctx = inputs()
    cond = (torch.rand(2, 1, 64, 64) > 0.9).float()
    with torch.no_grad():
        ref = unet(x, t, ctx)
        adapter = P.Adapter(unet.cfg)
        feats = adapter(cond)
        assert [tuple(f.shape[1:]) for f in feats] == unet.feature_shapes(x) == [(32, 8, 8), (64, 4, 4), (128, 2, 2)]
        assert torch.equal(unet(x, t, ctx, features=feats), ref)
        for out in adapter.outs:                   # the same adapter, trained a little: now it must matter
            torch.nn.init.normal_(out.weight, std=0.1)
        assert (unet(x, t, ctx, features=adapter(cond)) - ref).abs().max() > 1e-3
        lora = copy.deepcopy(unet)
        P.add_lora(lora, 4, convs=True)
        # Equal up to float rounding: on some CPUs, oneDNN sums the deep copy's convolutions in another order
        # (a last-digit difference); a LoRA that did anything would move the output by far more than 1e-5.
        torch.testing.assert_close(lora(x, t, ctx), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="UNet features: expected shapes"):
        unet(x, t, ctx, features=feats[:2])


# --- LoRA files -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_folding_a_lora_state_equals_merging_the_model(random_unet):
    """A LoRA generator's checkpoint keeps its LoRA unmerged (no copy of the UNet is made to save it);
    fold_lora_state, applied when it loads, gives bit for bit the merged model's state."""
    import copy
    unet = random_unet()
    P.add_lora(unet, 4, 8.0, True)
    for name, p in unet.named_parameters():
        if name.endswith("up.weight"):
            p.data.normal_(0, 0.1)                                 # a trained LoRA, not the null init
    want, got = P.merge_lora(copy.deepcopy(unet)).state_dict(), P.fold_lora_state(unet.state_dict(), 2.0)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert P.fold_lora_state(want, 2.0) == want                    # a plain state passes through


def test_lora_file_loads_onto_the_base_and_a_one_step_model(tmp_path, random_unet):
    base = random_unet(0)
    onestep = copy.deepcopy(base)                   # a finetuned generator: same architecture, other weights
    with torch.no_grad():
        for p in onestep.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = copy.deepcopy(base)
    P.add_lora(trained, 4, alpha=8.0, convs=True)   # scale alpha / r = 2
    for m in trained.modules():
        if isinstance(m, P.LoRA):
            torch.nn.init.normal_(m.up.weight, std=0.05)
    path = str(tmp_path / "lora.pt")
    P.save_lora(path, trained, P.PluginConfig(lora_rank=4, lora_alpha=8.0, lora_convs=True))
    q = trained.down[2][0].attn.layers[0].sa.to_q                     # one LoRA'd linear layer, checked by hand
    delta = 2.0 * q.up.weight @ q.down.weight
    x, t, ctx = inputs()
    for model in (base, onestep):
        w0 = model.down[2][0].attn.layers[0].sa.to_q.weight.clone()
        fused = P.load_lora(copy.deepcopy(model), path, scale=0.5)
        assert torch.allclose(fused.down[2][0].attn.layers[0].sa.to_q.weight, w0 + 0.5 * delta, atol=1e-6)
        unfused = P.load_lora(copy.deepcopy(model), path, scale=0.5, fuse=False)
        with torch.no_grad():
            assert torch.allclose(fused(x, t, ctx), unfused(x, t, ctx), atol=1e-4)
            assert (fused(x, t, ctx) - model(x, t, ctx)).abs().max() > 1e-3
    with torch.no_grad():                            # scale 0 is the model itself
        assert torch.allclose(P.load_lora(copy.deepcopy(onestep), path, scale=0.0)(x, t, ctx), onestep(x, t, ctx), atol=1e-5)
    other = md.UNet(md.UNetConfig(**{**md.PRESETS["tiny"].__dict__, "channels": (32, 64, 96)}))
    with pytest.raises(ValueError, match="different UNet: channels"):
        P.load_lora(other, path)
    with pytest.raises(ValueError, match="already carries unfused LoRA"):
        P.load_lora(unfused, path)
    config.save_checkpoint(str(tmp_path / "x.pt"), {"kind": "adapter"})
    with pytest.raises(ValueError, match="not a LoRA file"):
        P.load_lora(copy.deepcopy(base), str(tmp_path / "x.pt"))


# --- edges ----------------------------------------------------------------------------------------

def test_sobel_edges_of_a_square_are_on_its_boundary():
    img = torch.empty(1, 3, 32, 32)
    img[:] = torch.tensor([-1.0, -1.0, 1.0]).view(3, 1, 1)          # blue ...
    img[:, :, 8:24, 10:26] = torch.tensor([1.0, -1.0, -1.0]).view(3, 1, 1)   # ... with a red square
    e = P.edges(img)[0, 0].bool()
    inside = torch.zeros(32, 32)
    inside[8:24, 10:26] = 1
    # Independent: a pixel is on the boundary when its 3x3 neighbourhood holds both inside and outside pixels.
    hi = F.max_pool2d(inside[None, None], 3, 1, 1)[0, 0]
    lo = -F.max_pool2d(-F.pad(inside[None, None], (1, 1, 1, 1), mode="replicate"), 3, 1)[0, 0]
    assert torch.equal(e, (hi != lo))
    assert e[7, 10:26].all() and e[8, 10:26].all() and e[23, 10:26].all() and e[24, 10:26].all()
    assert not e[12:20, 12:24].any() and not e[:, :8].any()         # nothing inside, nothing far outside
    assert P.edge_iou(e[None, None], e[None, None]).item() == 1.0
    assert P.edge_iou(e[None, None], e.roll(1, 1)[None, None]).item() > 0.6                # 1 px off: tolerated
    assert P.edge_iou(e[None, None], torch.zeros(1, 1, 32, 32)).item() == 0.0


# --- inpainting -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_pipe(random_unet):
    torch.manual_seed(0)
    f8 = dataclasses.replace(vae_lib.PRESETS["tiny"], channels=(16, 32, 64, 64), decoder_channels=(16, 32, 64, 64))
    vae = vae_lib.VAE(f8).eval()                                   # f = 8, as in 3.5: 64px -> an 8x8 latent
    text = md.TextEncoder(md.TEXT_PRESETS["tiny"])
    return S.Pipeline(random_unet(), vae, text, resolution=64)


@pytest.mark.parametrize("kw", [dict(steps=3, sampler="ddim"), dict(steps=1, sampler="renoise", guidance_scale=1.0),
                                dict(steps=2, sampler="renoise", strength=0.6), dict(steps=4, sampler="ddpm")])
def test_inpainting_keeps_the_known_latents_exactly(tiny_pipe, kw):
    pipe = tiny_pipe
    init = torch.rand(2, 3, 64, 64) * 2 - 1
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 20:40, 9:30] = 1                                     # latent cells rows 2..4, cols 1..3
    keep = P.latent_keep(mask, 8)
    assert keep[0, 0].sum() == 64 - 3 * 3 and keep[0, 0, 2:5, 1:4].sum() == 0
    z = pipe.latents(["a red circle on a blue background"] * 2, init=init, mask=mask, seed=3, **kw)
    z_init = pipe.vae.encode(init).mode()
    assert torch.equal(z * keep, z_init * keep) or torch.allclose(z * keep, z_init * keep, atol=1e-6, rtol=0)
    assert (z - z_init)[..., 2:5, 1:4].abs().min() > 0               # the masked cells are generated
    img = pipe.images(["a red circle on a blue background"] * 2, init=init, mask=mask, seed=3, **kw)
    assert torch.equal(img * (1 - mask), init * (1 - mask))         # paste: kept pixels are the input's


def test_inpainting_denoiser_blends_in_x0():
    z_known, keep = torch.full((1, 1, 2, 2), 5.0), torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    out = P.inpaint_denoiser(lambda x, t: x * 2, z_known, keep)(torch.ones(1, 1, 2, 2), None)
    assert out.tolist() == [[[[5.0, 2.0], [2.0, 5.0]]]]


def test_wrong_sized_cond_or_mask_is_named(tiny_pipe, tmp_path, monkeypatch):
    pipe, prompt = tiny_pipe, ["a red circle on a blue background"]
    init = torch.zeros(1, 3, 64, 64)
    with pytest.raises(ValueError, match=r"mask: expected \(1, 1, 64, 64\) to match the generated images, got \(1, 1, 32, 32\)"):
        pipe.latents(prompt, steps=1, init=init, mask=torch.ones(1, 1, 32, 32))
    with pytest.raises(ValueError, match="mask and strength < 1 need an init image"):
        pipe.latents(prompt, steps=1, mask=torch.ones(1, 1, 64, 64))
    with pytest.raises(ValueError, match="no adapter loaded"):
        pipe.latents(prompt, steps=1, cond=torch.ones(1, 1, 64, 64))
    pipe.adapter = P.Adapter(pipe.unet.cfg)
    try:
        with pytest.raises(ValueError, match=r"cond: expected \(1, 1, 64, 64\) to match the generated images, got \(1, 1, 48, 48\)"):
            pipe.latents(prompt, steps=1, cond=torch.ones(1, 1, 48, 48))
    finally:
        pipe.adapter = None
    from PIL import Image
    Image.new("L", (48, 48)).save(tmp_path / "edges.png")
    with pytest.raises(ValueError, match=r"--cond .*edges.png: 48x48 pixels, expected 64x64"):
        S.read_image(str(tmp_path / "edges.png"), "--cond", 64, "gray")


# --- the stages and the command line, end to end --------------------------------------------------

@pytest.mark.slow
def test_lora_and_adapter_stages_then_sample_py_with_every_plugin(tiny_base, tmp_path, monkeypatch, capsys):
    out = tmp_path / "plug"
    common = ["--init_from", str(tiny_base / "diffusion.pt"), "--steps", "2", "--batch_size", "4", "--out_dir", str(out),
              "--eval_images", "4", "--warmup", "1", "--log_every", "1"]
    train.main(["--stage", "lora", "--plugin_lora_rank", "2", *common])
    train.main(["--stage", "adapter", "--plugin_adapter_blocks", "1", *common])
    log = capsys.readouterr().out
    assert "(outlined data)" in log and "eval with the lora" in log and "edge_iou" in log
    lora = config.load_checkpoint(str(out / "lora.pt"))
    assert lora["kind"] == "lora" and lora["rank"] == 2 and lora["step"] == 2
    train.main(["--stage", "lora", "--plugin_lora_rank", "2", *common[:3], "3", *common[4:], "--resume", "true"])
    straight = tmp_path / "straight"                 # 2 steps + resume to 3 == 3 steps straight, bit for bit
    train.main(["--stage", "lora", "--plugin_lora_rank", "2", *common[:3], "3", *common[4:7], str(straight), *common[8:]])
    resumed, want = config.load_checkpoint(str(out / "lora.pt")), config.load_checkpoint(str(straight / "lora.pt"))
    assert resumed["step"] == 3 and all(torch.equal(resumed["state"][k], want["state"][k]) for k in want["state"])
    assert any(not torch.equal(resumed["state"][k], lora["state"][k]) for k in lora["state"])
    logged = [r["step"] for r in map(json.loads, open(out / "metrics.jsonl")) if r["stage"] == "lora"]
    assert logged == [1, 2, 3]                       # the resumed run did step 3 only
    assert any(v.abs().sum() > 0 for k, v in lora["state"].items() if k.endswith("up.weight"))   # it trained
    ad = P.load_adapter(str(out / "adapter.pt"), md.UNet(md.PRESETS["tiny"]))
    assert len(ad.levels[0]) == 1 and any(o.weight.abs().sum() > 0 for o in ad.outs)
    from PIL import Image
    Image.new("RGB", (32, 32), (40, 70, 220)).save(tmp_path / "init.png")    # the tiny run's 32px
    m = Image.new("L", (32, 32))
    m.paste(255, (8, 8, 24, 24))
    m.save(tmp_path / "mask.png")
    png = tmp_path / "s.png"
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tiny_base / "diffusion.pt"), "--prompt",
                                      "a red circle on a blue background", "--n", "2", "--steps", "2",
                                      "--lora", str(out / "lora.pt"), "--lora_scale", "0.8",
                                      "--adapter", str(out / "adapter.pt"), "--edges_from", str(tmp_path / "init.png"),
                                      "--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.png"),
                                      "--out", str(png)])
    S.main()
    assert "LoRA" in capsys.readouterr().out and Image.open(png).size == (2 * 34 + 2, 34 + 2)
    monkeypatch.setattr(sys, "argv", ["sample.py", "--ckpt", str(tiny_base / "diffusion.pt"), "--prompt", "x",
                                      "--mask", str(tmp_path / "mask.png")])
    with pytest.raises(ValueError, match="--mask needs --init"):
        S.main()
