"""Tests for vae.py (3.5) and the vae / decoder stages of train.py.

Independent references: diffusers' AutoencoderKL on the same random weights, the closed-form KL of a
standard normal, and hand checks of the loss functions."""

import dataclasses
import os

import pytest
import torch

import config
import sample as S
import train
import vae as V


def tiny_vae(**changes):
    torch.manual_seed(0)
    return V.VAE(dataclasses.replace(V.PRESETS["tiny"], **changes)).eval()


# --- shapes, scaling -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-light"])
def test_shapes_and_range(name):
    model = V.VAE(V.PRESETS[name]).eval()
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    post = model.encode(x)
    assert post.mean.shape == (2, 8, 16, 12) and post.sample().shape == (2, 8, 16, 12)    # tiny: f = 4
    y = model.decode(post.mean * 50)                               # far out of range on purpose
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1


@pytest.mark.parametrize("name", ["md", "md-light", "sd"])
def test_large_presets_shapes_on_meta(name):
    cfg = V.PRESETS[name]
    with torch.device("meta"):
        model = V.VAE(cfg)
        z = model.encode(torch.zeros(1, 3, 256, 256)).mean
        assert z.shape == (1, cfg.latent_channels, 32, 32)
        assert model.decode(z).shape == (1, 3, 256, 256)


def test_scaling_factor_gives_unit_variance_latents():
    model = tiny_vae()
    x = torch.rand(16, 3, 64, 64) * 2 - 1
    s = V.estimate_scaling_factor(model, x, seed=1)                   # its posterior samples: seed 1's
    z = model.encode(x).sample(torch.Generator().manual_seed(1)) * s
    assert abs(float(z.detach().flatten().std()) - 1.0) < 1e-4


# --- losses ----------------------------------------------------------------------------------------

def test_kl_is_zero_for_standard_normal_and_matches_closed_form():
    post = V.DiagonalGaussian(torch.zeros(2, 16, 4, 4))            # mean 0, logvar 0 -> N(0, I)
    assert float(V.kl_loss(post, 3 * 16 * 16)) == 0.0
    moments = torch.cat([torch.full((1, 1, 1, 1), 2.0), torch.full((1, 1, 1, 1), 0.0)], 1)
    post = V.DiagonalGaussian(moments)                              # KL(N(2,1) || N(0,1)) = 2^2 / 2 = 2
    assert float(V.kl_loss(post, 3 * 8 * 8)) == pytest.approx(2.0 / 192)  # per element of a 3x8x8 image


def test_discriminator_step_pushes_real_and_fake_apart():
    torch.manual_seed(0)
    disc = V.PatchDiscriminator(V.PRESETS["tiny"])
    opt = torch.optim.Adam(disc.parameters(), lr=1e-3)
    real = torch.rand(8, 3, 64, 64) * 2 - 1
    fake = real.roll(7, dims=-1) * 0.5                              # a different, duller picture
    gap0 = float(disc(real).mean() - disc(fake).mean())
    for _ in range(5):
        loss = V.d_hinge_loss(disc(real), disc(fake))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(disc(real).mean() - disc(fake).mean()) > gap0 + 0.1
    assert float(V.d_hinge_loss(torch.full((4,), 2.0), torch.full((4,), -2.0))) == 0.0   # beyond both margins


def test_perceptual_loss_reads_local_vgg_weights(tmp_path):
    torch.manual_seed(0)
    sd, c, i = {}, 3, 0
    for v in V.PerceptualLoss.LAYERS:                              # a VGG16 'features' state dict, random
        if v == "M":
            i += 1
            continue
        sd[f"features.{i}.weight"], sd[f"features.{i}.bias"] = torch.randn(v, c, 3, 3) * 0.1, torch.zeros(v)
        c, i = v, i + 2
    path = tmp_path / "vgg16.pth"
    torch.save(sd, path)
    loss = V.PerceptualLoss(str(path))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    assert float(loss(x, x)) == 0.0 and float(loss(x, x.flip(-1))) > 0
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pth: not a VGG16"):
        V.PerceptualLoss(str(bad))


def test_psnr_by_hand():
    x = torch.zeros(1, 3, 4, 4)
    assert float(V.psnr(x, x + 0.2)[0]) == pytest.approx(10 * torch.log10(torch.tensor(4 / 0.04)).item(), abs=1e-4)


# --- the light decoder (3.5, Table 4) ----------------------------------------------------------------

def test_light_decoder_is_at_most_a_third_of_sd_decoder_macs():
    cost = {n: V.decoder_cost(V.PRESETS[n], 512, time_it=False) for n in ("sd", "md-light")}
    assert cost["md-light"]["decoder_gmacs"] <= cost["sd"]["decoder_gmacs"] / 3
    assert cost["md-light"]["decoder_m"] < cost["sd"]["decoder_m"] / 3


# --- parity with diffusers' AutoencoderKL (the "sd" layout), and loading a local SD folder -------------

@pytest.mark.slow
def test_sd_layout_parity_with_diffusers(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=2, latent_channels=4,
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 4,
                                  up_block_types=("UpDecoderBlock2D",) * 4).eval()
    for p in ref.parameters():                                      # make every weight matter
        p.data.add_(torch.randn_like(p) * 0.02)
    ref.save_pretrained(tmp_path / "vae")
    ours = V.VAE.from_diffusers(str(tmp_path))                      # finds the vae/ subfolder
    assert ours.cfg.latent_channels == 4 and ours.cfg.scaling_factor == pytest.approx(0.18215)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a, b = ref.encode(x).latent_dist, ours.encode(x)
        torch.testing.assert_close(b.mean, a.mean, atol=1e-4, rtol=0)
        torch.testing.assert_close(b.logvar, a.logvar, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.decode(z, clamp=False), ref.decode(z).sample, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fp16_variant_and_legacy_attention_names_load_as_diffusers_loads_them(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(block_out_channels=(32, 64), layers_per_block=1, latent_channels=4,
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2).eval()
    for p in ref.parameters():
        p.data.add_(torch.randn_like(p) * 0.02)
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")    # only diffusion_pytorch_model.fp16.safetensors
    assert [p.name for p in (tmp_path / "fp16").glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    ref.float()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        want = ref.decode(z).sample
        ours = V.VAE.from_diffusers(str(tmp_path / "fp16"))
        torch.testing.assert_close(ours.decode(z, clamp=False), want, atol=5e-2, rtol=0)   # fp16 weights
    old = tmp_path / "old"                                          # the names before diffusers' rename
    old.mkdir()
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, t in ref.state_dict().items():
        for new, was in renames.items():
            if new in k:
                k = k.replace(new, was)
        legacy[k] = t
    torch.save(legacy, old / "diffusion_pytorch_model.bin")
    (old / "config.json").write_text((tmp_path / "fp16" / "config.json").read_text())
    theirs = diffusers.AutoencoderKL.from_pretrained(str(old)).eval()  # diffusers itself loads it
    with torch.no_grad():
        torch.testing.assert_close(theirs.decode(z).sample, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(V.VAE.from_diffusers(str(old)).decode(z, clamp=False), want, atol=1e-4, rtol=0)
    (old / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no block_out_channels"):
        V.VAE.from_diffusers(str(old))


def test_wrong_architecture_weights_named_in_error(tmp_path):
    small = tiny_vae()
    other = V.VAE(dataclasses.replace(V.PRESETS["tiny"], latent_channels=4))
    with pytest.raises(ValueError, match=r"does not fit this VAE.*wrong shapes.*encoder.conv_out.weight"):
        small.load_state_dict(other.state_dict(), source="other.pt")
    with pytest.raises(FileNotFoundError, match="config.json"):
        V.VAE.from_diffusers(str(tmp_path))


def test_bad_images_are_clear_errors():
    model = tiny_vae()
    with pytest.raises(ValueError, match="not divisible by 4"):
        model.encode(torch.zeros(1, 3, 62, 64))
    with pytest.raises(ValueError, match=r"expected images \(B, 3, H, W\)"):
        model.encode(torch.zeros(1, 4, 64, 64))
    with pytest.raises(ValueError, match=r"expected latents \(B, 8"):
        model.decode(torch.zeros(1, 4, 8, 8))


# --- training stages ---------------------------------------------------------------------------------

def run_args(tmp_path, stage, steps=2, *extra):
    return ["--stage", stage, "--steps", str(steps), "--batch_size", "4", "--out_dir", str(tmp_path),
            "--log_every", "1", "--sample_every", "0", "--eval_images", "8", "--warmup", "1", *extra]


@pytest.mark.slow
def test_vae_stage_checkpoint_roundtrip_and_decoder_freezes_encoder(tmp_path, capsys):
    train.main(run_args(tmp_path, "vae"))
    assert "perceptual loss OFF" in capsys.readouterr().out       # said once, not substituted silently
    vae = S.load_vae(str(tmp_path / "vae.pt"))
    ck = config.load_checkpoint(str(tmp_path / "vae.pt"))
    assert ck["step"] == 2 and ck["config"]["vae"]["scaling_factor"] == vae.cfg.scaling_factor != 1.0
    for k, v in vae.state_dict().items():                          # weights survive the round trip
        assert torch.equal(v, ck["model"][k])

    train.main(run_args(tmp_path, "decoder", 2, "--init_from", str(tmp_path / "vae.pt")))
    light = S.load_vae(str(tmp_path / "decoder.pt"))
    assert light.cfg.decoder_channels == V.PRESETS["tiny-light"].decoder_channels
    for k, v in vae.encoder.state_dict().items():                  # 3.5: encoder frozen, bit-identical
        assert torch.equal(v, light.encoder.state_dict()[k]), k
    assert not torch.equal(vae.decoder.conv_in.weight[:8], light.decoder.conv_in.weight[:8])
    assert os.path.isfile(tmp_path / "decoder_recon.png") and os.path.isfile(tmp_path / "loss_decoder.png")


@pytest.mark.slow
def test_resume_refuses_a_different_config(tmp_path):
    train.main(run_args(tmp_path, "vae"))
    with pytest.raises(ValueError, match=r"differs from this run's in 1 field\(s\): latent_channels: checkpoint 8 vs now 4"):
        train.main(run_args(tmp_path, "vae", 3, "--resume", "true", "--vae_latent_channels", "4"))


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:                           # refused with the flags, before any work
        train.main(run_args(tmp_path, "decoder", 2, "--init_from", str(tmp_path / "nope.pt")))
    assert e.value.code == 2 and f"--init_from {tmp_path / 'nope.pt'}: no such file" in capsys.readouterr().err


@pytest.mark.slow
def test_vae_stage_resumes_bit_identically(tmp_path):
    """The VAE stage draws its posterior samples from the global RNG, saved in the checkpoint: a run stopped and
    resumed must draw the same numbers as one that did not stop (nothing else, e.g. the data loader, may draw)."""
    common = ["--stage", "vae", "--batch_size", "2", "--sample_every", "0", "--eval_images", "2", "--warmup", "1",
              "--log_every", "1", "--lr_schedule", "constant"]
    train.main([*common, "--steps", "4", "--out_dir", str(tmp_path / "straight")])
    train.main([*common, "--steps", "2", "--ckpt_every", "2", "--out_dir", str(tmp_path / "split")])
    train.main([*common, "--steps", "4", "--resume", "true", "--out_dir", str(tmp_path / "split")])
    a = config.load_checkpoint(str(tmp_path / "straight" / "vae.pt"))
    b = config.load_checkpoint(str(tmp_path / "split" / "vae.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
