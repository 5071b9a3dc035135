"""Stable Diffusion 1.x from a local diffusers folder (pretrained.py, sample.py's schedule, train.py's
--init_from FOLDER). Independent reference: diffusers itself -- UNet2DConditionModel, AutoencoderKL,
DDIMScheduler and StableDiffusionPipeline built here at random weights and saved with their own
save_pretrained; nothing is downloaded."""

import json
import os

import numpy as np
import pytest
import torch

import config
import md
import pretrained
import sample as S
import train
from conftest import make_clip_folder

WORDS = ["red", "circle", "blue", "background", "square", "on", "green", "triangle", "a"]
# SD-1.5's scheduler/scheduler_config.json (a PNDMScheduler), as the hub's runwayml/stable-diffusion-v1-5 has it
SD15_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      set_alpha_to_one=False, skip_prk_steps=True, steps_offset=1, clip_sample=False)


def randomize(model, scale=0.02):
    """Every layer random (diffusers zero-initialises none of SD's, but a trained model has no exact zeros)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    """A small SD-1.5-topology pipeline (4 UNet levels, the cross-attention mid block, 8 heads at every level,
    a 4-level AutoencoderKL: f = 8, a CLIP text model), saved by StableDiffusionPipeline.save_pretrained. Its
    UNet's sample_size says 128px; the tests sample and train at 64px, as a user at 256px would with SD-1.5."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    d = tmp_path_factory.mktemp("sd")
    clip, text_model, _ = make_clip_folder(d, WORDS)
    tok = transformers.CLIPTokenizer(str(clip / "vocab.json"), str(clip / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    unet = randomize(diffusers.UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3))
    vae = randomize(diffusers.AutoencoderKL(
        block_out_channels=(16, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        sample_size=64))
    pipe = diffusers.StableDiffusionPipeline(vae=vae, text_encoder=text_model, tokenizer=tok, unet=unet,
                                             scheduler=diffusers.PNDMScheduler.from_config(SD15_SCHEDULER),
                                             safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(d / "sd15")
    return d / "sd15"


def diffusers_ddim(folder, **scheduler_changes):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None,
                                                            requires_safety_checker=False)
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config, **scheduler_changes)
    ref.set_progress_bar_config(disable=True)
    return ref


# --- the schedule: equal to diffusers' --------------------------------------------------------------

def test_sd15_schedule_and_spacings_equal_diffusers_ddim(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    sched_dir = tmp_path / "scheduler"
    diffusers.PNDMScheduler.from_config(SD15_SCHEDULER).save_pretrained(sched_dir)
    cfg = S.schedule_from_diffusers(str(tmp_path))                   # a pipeline folder: finds scheduler/
    assert (cfg.prediction, cfg.spacing, cfg.steps_offset, cfg.set_alpha_to_one, cfg.zero_terminal_snr) == \
        ("epsilon", "leading", 1, False, False)
    ours = S.make_schedule(cfg)
    ref = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER)
    torch.testing.assert_close(ours["alphas_cumprod"], ref.alphas_cumprod, rtol=2e-6, atol=0)
    assert abs(float(ours["alphas_cumprod"][-1]) - 0.0047) < 1e-4                # not zero terminal SNR
    assert S.final_alpha_sigma(ours) == (float(ours["alpha"][0]), float(ours["sigma"][0]))
    for spacing in ("leading", "trailing", "linspace"):
        for steps in (1, 4, 8, 50, 999):
            s = S.make_schedule(S.ScheduleConfig(**{**vars(cfg), "spacing": spacing}))
            r = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER, timestep_spacing=spacing)
            r.set_timesteps(steps)
            assert S.timesteps(s, steps) == r.timesteps.tolist(), (spacing, steps)
    zsnr = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER, rescale_betas_zero_snr=True)
    torch.testing.assert_close(S.make_schedule()["alphas_cumprod"], zsnr.alphas_cumprod, rtol=1e-5, atol=1e-7)


def test_unsupported_scheduler_fields_are_named(tmp_path):
    for field, value in (("clip_sample", True), ("prediction_type", "sample"), ("beta_schedule", "squaredcos_cap_v2"),
                         ("thresholding", True), ("timestep_spacing", "karras")):
        (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD15_SCHEDULER, field: value}))
        with pytest.raises(ValueError, match=f"scheduler_config.json: {field} = "):
            S.schedule_from_diffusers(str(tmp_path))
    (tmp_path / "scheduler_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="scheduler_config.json: not JSON"):
        S.schedule_from_diffusers(str(tmp_path))
    with pytest.raises(ValueError, match="zero_terminal_snr with epsilon-prediction"):
        S.make_schedule(S.ScheduleConfig(prediction="epsilon"))


def test_eps_prediction_losses_and_gamma_by_hand():
    """eps-prediction: the target is eps; x0 read back exactly; min-SNR weight min(1, gamma / SNR); UFOGen's
    gamma_t = SNR_t, which makes gamma ||x0 - x0'||^2 the eps-MSE."""
    import ufogen
    sched = S.make_schedule(S.ScheduleConfig(prediction="epsilon", zero_terminal_snr=False))
    g = torch.Generator().manual_seed(0)
    x0, eps, out = (torch.randn(4, 2, 3, 3, generator=g) for _ in range(3))
    t = torch.tensor([1, 100, 500, 999])
    x_t = S.q_sample(sched, x0, t, eps)
    assert torch.equal(S.prediction_target(sched, x0, t, eps), eps)
    torch.testing.assert_close(S.x0_from_output(sched, x_t, t, eps), x0, atol=1e-4, rtol=0)
    a, s = sched["alpha"][t].double(), sched["sigma"][t].double()
    want = torch.clamp(5.0 / (a / s) ** 2, max=1.0)
    torch.testing.assert_close(S.loss_weight(sched, t, 5.0, x0).flatten().double(), want, rtol=1e-5, atol=0)
    rec = ufogen.recon_loss(S.x0_from_output(sched, x_t, t, out), x0, t, sched)
    torch.testing.assert_close(rec, (out - eps).square().mean(), rtol=1e-4, atol=1e-6)


# --- unet/: one to one with diffusers' UNet2DConditionModel ------------------------------------------

@pytest.mark.slow
def test_unet_from_diffusers_matches_diffusers_forward(tmp_path):
    """A small UNet of SD-1.5's topology (3 cross-attention levels + a plain one, the mid block, 8 heads at
    every level, diffusers' legacy attention_head_dim), saved by diffusers' own save_pretrained."""
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("safetensors")
    torch.manual_seed(0)
    ref = randomize(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64, 64, 64), layers_per_block=2, cross_attention_dim=32,
        attention_head_dim=8, norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)).eval()
    ref.save_pretrained(tmp_path / "unet")
    ours = pretrained.load_unet(str(tmp_path)).eval()                # a pipeline folder: finds unet/
    assert ours.cfg.heads == 8 and ours.cfg.context_dim == 32 and md.count_params(ours) == md.count_params(ref)
    x, t, ctx = torch.randn(2, 4, 16, 16), torch.tensor([10, 700]), torch.randn(2, 7, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x, t, ctx), ref(x, t, ctx).sample, atol=1e-5, rtol=0)
    ref.half().save_pretrained(tmp_path / "fp16", variant="fp16")   # only the fp16 variant on disk
    with torch.no_grad():
        torch.testing.assert_close(md.UNet.from_diffusers(str(tmp_path / "fp16"))(x, t, ctx), ours(x, t, ctx),
                                   atol=5e-2, rtol=0)


def test_sd15_full_config_maps_key_for_key():
    """SD-1.5's full UNet config: every one of diffusers' weights maps to one of ours with its shape (on the
    meta device: no weights are made), and the parameter count is SD-1.5's 859,520,964."""
    diffusers = pytest.importorskip("diffusers")
    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)   # SD-1.5's defaults
        ours = md.UNet(pretrained.unet_config_from_diffusers(dict(ref.config), "sd15/config.json"))
    theirs = {pretrained.diffusers_unet_key(k): v.shape for k, v in ref.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert set(theirs) == set(mine) and len(mine) == 686
    reshaped = [k for k in mine if theirs[k] != mine[k]]
    assert len(reshaped) == 32 and all(k.endswith(("proj_in.weight", "proj_out.weight")) for k in reshaped)
    assert md.count_params(ours) == md.count_params(ref) == 859_520_964
    sdxl = dict(ref.config, addition_embed_type="text_time")
    with pytest.raises(ValueError, match=r"addition_embed_type = 'text_time'"):
        pretrained.unet_config_from_diffusers(sdxl, "sdxl/config.json")
    dit = dict(ref.config, down_block_types=["DownBlock2D", "SimpleCrossAttnDownBlock2D"])
    with pytest.raises(ValueError, match=r"down_block_types"):
        pretrained.unet_config_from_diffusers(dit, "x/config.json")


@pytest.mark.slow
def test_sd15_full_size_unet_ddim_with_cfg_equals_diffusers():
    """SD-1.5's full UNet config (859.5M parameters, random weights) at a small 8x8 latent: 3 DDIM steps with CFG
    7.5 on SD-1.5's schedule, ours (sample.ddim + guided_denoiser) against diffusers' UNet + DDIMScheduler loop."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()
    ours = pretrained.unet_from_diffusers_state(dict(ref.config), ref.state_dict(), "sd15").eval()
    g = torch.Generator().manual_seed(1)
    x_T, ctx, uncond = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 768, generator=g), \
        torch.randn(1, 77, 768, generator=g)
    sch = diffusers.DDIMScheduler.from_config(SD15_SCHEDULER)
    sch.set_timesteps(3)
    x = x_T.clone()
    with torch.no_grad():
        for t in sch.timesteps:
            e_u, e_c = ref(torch.cat([x, x]), t, torch.cat([uncond, ctx])).sample.chunk(2)
            x = sch.step(e_u + 7.5 * (e_c - e_u), t, x).prev_sample
        sched = S.make_schedule(S.ScheduleConfig(**{**vars(S.ScheduleConfig()), "prediction": "epsilon",
                                                    "zero_terminal_snr": False, "spacing": "leading",
                                                    "steps_offset": 1, "set_alpha_to_one": False}))
        mine = S.ddim(S.guided_denoiser(ours, sched, ctx, uncond, 7.5), x_T.clone(), sched, steps=3)
    err = (mine - x).abs().max().item()
    print(f"SD-1.5 full UNet, 3 DDIM steps + CFG 7.5: max |latent diff| {err:.2e}")
    assert err < 1e-4


# --- the pipeline: equal to StableDiffusionPipeline + DDIMScheduler ---------------------------------

@pytest.mark.slow
def test_pipeline_from_diffusers_equals_stable_diffusion_pipeline(sd_folder, tmp_path):
    ours = S.Pipeline.from_diffusers(str(sd_folder))
    assert ours.sched["cfg"].prediction == "epsilon" and ours.resolution == 128 and ours.stage == "sd"
    prompts = ["a red circle on a blue background", "a green triangle"]
    lat = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sf = ours.vae.cfg.scaling_factor
    cases = [({}, 50, 7.5),                                         # SD-1.5's own: leading, offset 1, eps
             ({"timestep_spacing": "trailing"}, 10, 3.0)]           # trailing
    for changes, steps, cfg_scale in cases:
        ref = diffusers_ddim(sd_folder, **changes)
        if changes:
            ours.sched = S.make_schedule(S.ScheduleConfig(**{**vars(S.schedule_from_diffusers(str(sd_folder))),
                                                             "spacing": "trailing"}))
        kw = dict(latents=lat, num_inference_steps=steps, guidance_scale=cfg_scale, height=64, width=64)
        want = ref(prompts, output_type="latent", **kw).images
        got = ours.latents(prompts, steps=steps, guidance_scale=cfg_scale, latents=lat, height=64) * sf
        err = (got - want).abs().max().item()
        pix_ref = (ref(prompts, output_type="np", **kw).images * 255).round().astype(np.int16)
        pix = np.stack([np.asarray(im, dtype=np.int16) for im in ours(prompts, steps=steps, guidance_scale=cfg_scale,
                                                                      latents=lat, height=64)])
        diff = np.abs(pix - pix_ref)
        print(f"{changes or 'SD-1.5 scheduler'}, {steps} steps, CFG {cfg_scale}: max |latent diff| {err:.2e}, "
              f"pixels mean {diff.mean():.3f} max {diff.max()} levels")
        assert err < 1e-4 and diff.mean() <= 1.0 and pix.shape == pix_ref.shape == (2, 64, 64, 3)
        assert pix_ref.std() > 10                                    # images, not a flat clamp
    # v-prediction on the zero-terminal-SNR schedule with trailing spacing (this project's, SD-2.x-like)
    ref = diffusers_ddim(sd_folder, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                         timestep_spacing="trailing", set_alpha_to_one=True, steps_offset=0)
    ours.sched = S.make_schedule()
    want = ref(prompts, output_type="latent", latents=lat, num_inference_steps=8, guidance_scale=3.0, height=64,
               width=64).images
    got = ours.latents(prompts, steps=8, guidance_scale=3.0, latents=lat, height=64) * sf
    assert (got - want).abs().max().item() < 1e-4
    with pytest.raises(ValueError, match=r"latents: expected \(2, 4, 8, 8\)"):
        ours.latents(prompts, latents=lat[:1], height=64)


@pytest.mark.slow
def test_sample_py_diffusers_folder(sd_folder, tmp_path, capsys):
    out = tmp_path / "sd.png"
    S.main(["--diffusers", str(sd_folder), "--prompt", "a red circle", "--n", "1", "--steps", "4", "--resolution", "64",
            "--out", str(out)])
    assert "ddim 4 steps, guidance 7.5" in capsys.readouterr().out
    from PIL import Image
    got = np.asarray(Image.open(out))
    want = S.Pipeline.from_diffusers(str(sd_folder))(["a red circle"], steps=4, guidance_scale=7.5, seed=0,
                                                     height=64)[0]
    assert got.shape == (64, 64, 3) and np.array_equal(got, np.asarray(want))
    with pytest.raises(FileNotFoundError, match="not a diffusers Stable Diffusion pipeline folder: missing unet/"):
        S.Pipeline.from_diffusers(str(tmp_path))


# --- training from it: every post-training stage, finetuning, export ---------------------------------

@pytest.mark.slow
def test_every_stage_trains_from_a_diffusers_folder_and_exports(sd_folder, tmp_path):
    out = tmp_path / "run"
    common = ["--init_from", str(sd_folder), "--resolution", "64", "--batch_size", "2", "--steps", "2",
              "--out_dir", str(out), "--eval_images", "2", "--eval_steps", "2", "--sample_every", "0",
              "--warmup", "1", "--train_images", "4"]
    train.main(["--stage", "ufogen", "--ufogen_lora_rank", "2", *common])
    ck = config.load_checkpoint(str(out / "ufogen.pt"))
    assert ck["config"]["schedule"]["prediction"] == "epsilon" and ck["config"]["schedule"]["spacing"] == "trailing"
    assert ck["config"]["train"]["text_encoder"] == str(sd_folder)
    pipe = S.Pipeline.from_checkpoint(str(out / "ufogen.pt"))
    assert pipe.stage == "ufogen" and pipe(["a red circle"], **S.SAMPLING["onestep"])[0].size == (64, 64)
    train.main(["--stage", "distill", "--distill_target_steps", "2", "--distill_teacher_steps", "4", *common])
    assert config.load_checkpoint(str(out / "distill.pt"))["config"]["schedule"]["prediction"] == "epsilon"
    train.main(["--stage", "lora", "--plugin_lora_rank", "2", *common])
    train.main(["--stage", "adapter", "--plugin_adapter_blocks", "1", *common])
    S.Pipeline.from_diffusers(str(sd_folder)).load_lora(str(out / "lora.pt"))
    # diffusion finetuning from SD-1.5 at lr 1e-30 (no change in fp32): diffusion.pt samples exactly as the
    # folder does (its UNet, VAE, CLIP and eps schedule carried over)
    train.main(["--stage", "diffusion", "--lr", "1e-30", *common])
    tuned, base = S.Pipeline.from_checkpoint(str(out / "diffusion.pt")), S.Pipeline.from_diffusers(str(sd_folder))
    assert tuned.sched["cfg"] == base.sched["cfg"]
    assert tuned.resolution == 64 and base.resolution == 128
    assert torch.equal(tuned.latents(["a red circle"], steps=4), base.latents(["a red circle"], steps=4, height=64))
    import export_coreml
    pytest.importorskip("coremltools")
    export_coreml.main(["--ckpt", str(sd_folder), "--components", "text_encoder", "--out", str(tmp_path / "exp")])
    manifest = json.load(open(tmp_path / "exp" / "manifest.json"))
    assert manifest["prediction"] == "epsilon" and manifest["schedule"]["spacing"] == "leading"
    transformers = pytest.importorskip("transformers")
    ref_tok = transformers.CLIPTokenizer.from_pretrained(str(sd_folder / "tokenizer"))   # from tokenizer.json only
    exp = tmp_path / "exp" / "tokenizer"                     # written out as vocab.json + merges.txt for the app
    app_tok = transformers.CLIPTokenizer(str(exp / "vocab.json"), str(exp / "merges.txt"))
    assert (manifest["tokenizer"]["bos_id"], manifest["tokenizer"]["eos_id"]) == (ref_tok.bos_token_id, ref_tok.eos_token_id)
    assert app_tok("a red circle on a blue background").input_ids == ref_tok("a red circle on a blue background").input_ids
    np.testing.assert_allclose(manifest["schedule"]["alphas_cumprod"],
                               diffusers_ddim(sd_folder).scheduler.alphas_cumprod.numpy(), rtol=2e-6)
    assert os.path.isfile(tmp_path / "exp" / "text_encoder.mlpackage" / "Manifest.json")
