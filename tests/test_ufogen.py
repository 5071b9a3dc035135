"""Tests for ufogen.py (4) and the ufogen / distill stages: the adversarial game's gradients, the three
reconstruction terms, LoRA's parameter count / null init / merge, and the distillation target against an
oracle teacher (a hand-checkable fixed point)."""

import copy
import json
import os

import pytest
import torch

import config
import md
import plugins as P
import sample as S
import train
import train_utils
import ufogen as U


def batch(n=4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 8, 8, 8, generator=g), torch.randint(1, 1000, (n,), generator=g),
            torch.randn(n, 77, 128, generator=g))


@pytest.mark.slow
def test_discriminator_starts_neutral_and_d_loss_falls_with_g_frozen(random_unet):
    unet, sched = random_unet(), S.make_schedule()
    disc = U.Discriminator(unet)
    z0, t, ctx = batch()
    assert torch.equal(disc(z0, t, ctx), torch.zeros(4, 1, 8, 8))   # zero-init head: logit 0 everywhere
    gen = copy.deepcopy(unet).requires_grad_(False)
    tp = (t - 250).clamp(min=0)
    with torch.no_grad():
        fake = S.q_sample(sched, S.x0_from_v(sched, z0, t, gen(S.q_sample(sched, z0, t, z0.flip(0)), t, ctx)), tp, z0.roll(1, 0))
    real = S.q_sample(sched, z0, tp, z0.roll(2, 0))
    opt = torch.optim.Adam(disc.parameters(), lr=1e-4, betas=(0.0, 0.999))
    first = float(U.d_loss(disc(real, tp, ctx), disc(fake, tp, ctx), clamp=0))
    for _ in range(5):
        loss = U.d_loss(disc(real, tp, ctx), disc(fake, tp, ctx), clamp=0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(U.d_loss(disc(real, tp, ctx), disc(fake, tp, ctx), clamp=0)) < first


@pytest.mark.slow
def test_generator_gets_a_nonzero_adversarial_gradient_and_its_loss_falls_with_d_frozen(random_unet):
    """The known bug of some reimplementations: building x'_{t-1} under no_grad leaves G without any
    adversarial gradient. Here the fake is built with grad, and D is frozen but random (non-neutral)."""
    unet, sched = random_unet(), S.make_schedule()
    disc = U.Discriminator(unet)
    torch.nn.init.normal_(disc.unet.conv_out.weight, std=0.05)
    disc.requires_grad_(False)
    gen = copy.deepcopy(unet).requires_grad_(True)
    z0, t, ctx = batch()
    tp = (t - 250).clamp(min=0)
    x_t = S.q_sample(sched, z0, t, z0.flip(0))

    def adv():
        fake = S.q_sample(sched, S.x0_from_v(sched, x_t, t, gen(x_t, t, ctx)), tp, z0.roll(1, 0))
        return U.g_adv_loss(disc(fake, tp, ctx), clamp=0)

    loss = adv()
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in gen.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in disc.parameters())
    opt = torch.optim.Adam(gen.parameters(), lr=1e-4)
    first = float(loss)
    for _ in range(5):
        opt.zero_grad()
        l = adv()
        l.backward()
        opt.step()
    assert float(adv()) < first


def test_ema_distill_with_decay_one_equals_distill(random_unet):
    """Eq. 3 with decay 1: G^EMA never moves from the pretrained weights, i.e. it is Eq. 2's teacher."""
    unet, sched = random_unet(), S.make_schedule()
    teacher = copy.deepcopy(unet).requires_grad_(False)
    gen = copy.deepcopy(unet)
    gen_ema = copy.deepcopy(gen).requires_grad_(False)
    with torch.no_grad():
        for p in gen.parameters():                                     # G has trained away from the base
            p.add_(torch.randn_like(p) * 0.01)
    train_utils.ema_update(gen_ema, gen, decay=1.0)
    z0, t, ctx = batch()
    x_t = S.q_sample(sched, z0, t, z0.flip(0))
    distill = U.recon_target(U.UFOGenConfig(recon="distill"), z0, x_t, t, ctx, sched, teacher=teacher)
    ema = U.recon_target(U.UFOGenConfig(recon="ema"), z0, x_t, t, ctx, sched, g_ema=gen_ema)
    assert torch.equal(distill, ema)
    assert torch.equal(U.recon_target(U.UFOGenConfig(recon="diffusion"), z0, x_t, t, ctx, sched), z0)


def test_gamma_makes_the_diffusion_term_the_v_loss():
    sched = S.make_schedule()
    z0, t, ctx = batch()
    eps, v_pred = z0.flip(0), torch.randn_like(z0)
    x_t = S.q_sample(sched, z0, t, eps)
    rec = U.recon_loss(S.x0_from_v(sched, x_t, t, v_pred), z0, t, sched)
    torch.testing.assert_close(rec, (v_pred - S.v_target(sched, z0, t, eps)).square().mean(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("convs", [False, True])
def test_lora_parameter_count_null_init_and_merge(convs, random_unet):
    unet = random_unet()
    targets = P.lora_targets(unet, convs)
    r = 4
    expected = 0
    for parent, name in targets:
        layer = getattr(parent, name)
        if isinstance(layer, torch.nn.Linear):
            expected += r * (layer.in_features + layer.out_features)
        else:
            k = layer.kernel_size[0] * layer.kernel_size[1]
            expected += r * layer.in_channels * k + layer.out_channels * r
    z0, t, ctx = batch()
    with torch.no_grad():
        before = unet(z0, t, ctx)
    n_before = md.count_params(unet)
    params = P.add_lora(unet, r, convs=convs)
    assert sum(p.numel() for p in params) == expected == md.count_params(unet) - n_before
    is_lora = lambda name: ".down." in name or ".up." in name       # top-level "down.*"/"up.*" have no leading dot
    assert all(p.requires_grad == is_lora(n) for n, p in unet.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(unet(z0, t, ctx), before)         # null effect at init (4.3)
        for p in params:                                              # now give the LoRA an effect
            p.add_(torch.randn_like(p) * 0.05)
        unmerged = unet(z0, t, ctx)
        assert not torch.allclose(unmerged, before, atol=1e-4)
        merged = P.merge_lora(copy.deepcopy(unet))
        assert not any(isinstance(m, P.LoRA) for m in merged.modules())
        torch.testing.assert_close(merged(z0, t, ctx), unmerged, atol=1e-5, rtol=0)
    assert set(P.lora_state_dict(unet)) and all(".down." in k or ".up." in k for k in P.lora_state_dict(unet))


def test_distill_target_of_an_oracle_teacher_is_its_x0():
    """If the teacher always predicts the same x0*, DDIM moves along one straight path and a single student
    DDIM step reproduces the teacher's k steps exactly with x0~ = x0*."""
    sched = S.make_schedule()
    x0_star = torch.randn(2, 8, 4, 4)
    oracle = lambda x, t: x0_star
    x_t = S.q_sample(sched, x0_star, torch.tensor([874, 874]), torch.randn(2, 8, 4, 4))
    target = U.distill_target(oracle, x_t, 874, 749, sched, sub_steps=6)
    torch.testing.assert_close(target, x0_star, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(U.distill_target(oracle, x_t, 124, -1, sched, 6), x0_star)


def test_one_step_sampling_is_deterministic_for_a_seed(random_unet):
    unet, sched = random_unet(), S.make_schedule()
    ctx = torch.randn(2, 77, 128)
    den = S.guided_denoiser(unet, sched, ctx, ctx, 1.0)   # the plain model
    a = S.renoise(den, torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)), sched, 1)
    b = S.renoise(den, torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)), sched, 1)
    assert torch.equal(a, b)
    with torch.no_grad():
        want = S.x0_from_v(sched, torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)),
                           torch.full((2,), 999), unet(torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(3)), torch.full((2,), 999), ctx))
    torch.testing.assert_close(a, want)


def test_bad_ufogen_config_names_the_field():
    with pytest.raises(ValueError, match="recon"):
        U.validate(U.UFOGenConfig(recon="gan"))
    with pytest.raises(ValueError, match="gap"):
        U.validate(U.UFOGenConfig(gap=1000))
    with pytest.raises(ValueError, match="recon_guidance = 3.0 needs a model target"):
        U.validate(U.UFOGenConfig(recon="diffusion", recon_guidance=3.0))
    with pytest.raises(ValueError, match="t_power"):
        U.validate(U.UFOGenConfig(t_power=0))
    with pytest.raises(ValueError, match="recon_gamma = 'some'"):
        U.validate(U.UFOGenConfig(recon_gamma="some"))
    with pytest.raises(ValueError, match="d_time"):
        U.validate(U.UFOGenConfig(d_time="t-1"))
    with pytest.raises(ValueError, match="d_every = 0"):
        U.validate(U.UFOGenConfig(d_every=0))


def test_only_eq1_carries_gamma():
    """As printed: lambda gamma_t on Eq. 1's term, none on Eq. 2 / Eq. 3; recon_gamma 'all' / 'none' override."""
    want = {("diffusion", "diffusion"): True, ("distill", "diffusion"): False, ("ema", "diffusion"): False,
            ("distill", "all"): True, ("ema", "all"): True, ("diffusion", "none"): False}
    for (recon, mode), w in want.items():
        assert U.recon_weighted(U.UFOGenConfig(recon=recon, recon_gamma=mode)) is w, (recon, mode)
    sched = S.make_schedule()
    pred, target = torch.zeros(2, 1, 1, 1), torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    t = torch.tensor([1, 500])
    assert float(U.recon_loss(pred, target, t, sched, weighted=False)) == pytest.approx((1 + 4) / 2)
    by_hand = (1 / float(sched["sigma"][1]) ** 2 * 1 + 1 / float(sched["sigma"][500]) ** 2 * 4) / 2
    assert float(U.recon_loss(pred, target, t, sched, weighted=True)) == pytest.approx(by_hand, rel=1e-5)
    assert by_hand > 100                                              # gamma_1 alone is in the hundreds


def test_guided_distill_target_is_cfg_of_the_teacher(random_unet):
    """recon_guidance w: target = x0(uncond) + w (x0(cond) - x0(uncond)), by hand; w = 1 is Eq. 2 as printed."""
    unet, sched = random_unet(), S.make_schedule()
    z0, t, ctx = batch()
    uncond = torch.zeros_like(ctx)
    x_t = S.q_sample(sched, z0, t, z0.flip(0))
    with torch.no_grad():
        x0_c = S.x0_from_v(sched, x_t, t, unet(x_t, t, ctx))
        x0_u = S.x0_from_v(sched, x_t, t, unet(x_t, t, uncond))
    plain = U.recon_target(U.UFOGenConfig(recon="distill"), z0, x_t, t, ctx, sched, teacher=unet)
    torch.testing.assert_close(plain, x0_c)
    guided = U.recon_target(U.UFOGenConfig(recon="distill", recon_guidance=3.0), z0, x_t, t, ctx, sched,
                            teacher=unet, uncond=uncond)
    torch.testing.assert_close(guided, x0_u + 3.0 * (x0_c - x0_u), atol=1e-5, rtol=1e-5)


def test_timestep_sampling_power():
    """t_power 1: uniform over [1, T); t_power p: P(t > s) = 1 - (s/T)^p, so p = 4 puts ~68% above 0.75 T."""
    g = torch.Generator().manual_seed(0)
    for power, want in [(1.0, 0.25), (4.0, 1 - 0.75 ** 4)]:
        t = U.sample_t(U.UFOGenConfig(t_power=power), 20000, g)
        assert t.min() >= 1 and t.max() <= S.T - 1 and t.dtype == torch.long
        assert abs((t > 0.75 * S.T).float().mean().item() - want) < 0.02, power


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--ufogen_lora_rank", "4", "--ufogen_recon", "ema"]])
def test_ufogen_stage_end_to_end(tiny_base, tmp_path, extra):
    out = tmp_path / "ufo"
    train.main(["--stage", "ufogen", "--init_from", str(tiny_base / "diffusion.pt"), "--vae_ckpt", str(tiny_base / "vae.pt"),
                "--steps", "2", "--batch_size", "4", "--out_dir", str(out), "--eval_images", "4", "--eval_steps", "2",
                "--log_every", "1", *extra])
    ev = json.load(open(out / "eval.json"))
    assert {"onestep", "ddim1"} <= set(ev) and {"color", "background", "shape", "ms_per_image", "fd"} <= set(ev["onestep"])
    pipe = S.Pipeline.from_checkpoint(str(out / "ufogen.pt"))
    img = pipe(["a red circle on a blue background"], steps=1, guidance_scale=1.0, sampler="renoise", seed=0)[0]
    assert img.size == (32, 32) and os.path.isfile(out / "onestep_vs_base.png")


@pytest.mark.slow
def test_ufogens_d_every_2_steps_d_on_even_steps_only(tiny_base, tmp_path):
    """UFOGen's code schedule (--ufogen_d_every 2): D steps at step 0, not at step 1, while G steps at both; D
    conditioned on t as Eq. 1 prints (--ufogen_d_time t) runs too."""
    def run(steps, out):
        train.main(["--stage", "ufogen", "--init_from", str(tiny_base / "diffusion.pt"), "--vae_ckpt", str(tiny_base / "vae.pt"),
                    "--steps", str(steps), "--batch_size", "4", "--out_dir", str(tmp_path / out), "--eval_images", "2",
                    "--ufogen_d_every", "2", "--ufogen_d_time", "t", "--ufogen_recon", "distill"])
        return config.load_checkpoint(str(tmp_path / out / "ufogen.pt"))
    one, two = run(1, "a"), run(2, "b")
    assert one["d"]["unet.conv_out.weight"].abs().sum() > 0           # D stepped at step 0 (its head starts at 0)
    assert all(torch.equal(one["d"][k], two["d"][k]) for k in one["d"])  # ... and not at step 1
    assert any(not torch.equal(one["g_raw"][k], two["g_raw"][k]) for k in one["g_raw"])   # G stepped at both


@pytest.mark.slow
def test_distill_stage_end_to_end(tiny_base, tmp_path):
    out = tmp_path / "dist"
    train.main(["--stage", "distill", "--init_from", str(tiny_base / "diffusion.pt"), "--steps", "2", "--batch_size", "4",
                "--out_dir", str(out), "--eval_images", "4", "--distill_target_steps", "4", "--distill_teacher_steps", "8"])
    ev = json.load(open(out / "eval.json"))
    assert {"color", "background", "shape", "ms_per_image"} <= set(ev["4step"])


def test_d_accuracy_by_hand():
    """Right on 3 of 4 real locations and 1 of 4 fake ones: (0.75 + 0.25) / 2; a neutral D (logits 0) is at 0."""
    real, fake = torch.tensor([1.0, 2.0, 0.5, -1.0]), torch.tensor([-1.0, 1.0, 2.0, 0.0])
    assert U.d_accuracy(real, fake).item() == 0.5
    assert U.d_accuracy(torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 1.0])).item() == 0.75
    assert U.d_accuracy(torch.zeros(4), torch.zeros(4)).item() == 0.0


@pytest.mark.slow
def test_ufogen_without_the_adversarial_term_trains_g_on_reconstruction_alone(tiny_base, tmp_path):
    """--ufogen_adv false: G's adversarial loss is 0 and there is no D (none built, none saved, no d_loss logged);
    with the term, D's loss and accuracy are logged every step and D moves off its zero head."""
    def run(adv, out):
        train.main(["--stage", "ufogen", "--init_from", str(tiny_base / "diffusion.pt"), "--steps", "2", "--batch_size",
                    "4", "--out_dir", str(tmp_path / out), "--eval_images", "2", "--log_every", "1", "--ufogen_d_every",
                    "1", "--ufogen_adv", adv])
        rows = [json.loads(x) for x in open(tmp_path / out / "metrics.jsonl") if '"ufogen"' in x]
        return config.load_checkpoint(str(tmp_path / out / "ufogen.pt")), rows
    off, rows_off = run("false", "off")
    on, rows_on = run("true", "on")
    assert "d" not in off and "opt_d" not in off and on["d"]["unet.conv_out.weight"].abs().sum() > 0
    assert all(r.get("g_adv") == 0 and "d_loss" not in r for r in rows_off if "recon" in r)
    assert all(0 <= r["d_acc"] <= 1 and r["d_loss"] > 0 for r in rows_on if "recon" in r)
    ev = json.load(open(tmp_path / "off" / "eval.json"))["onestep"]
    assert ev["sharpness"] > 0
    train.main(["--stage", "ufogen", "--init_from", str(tiny_base / "diffusion.pt"), "--steps", "3", "--batch_size",
                "4", "--out_dir", str(tmp_path / "off"), "--eval_images", "2", "--ufogen_d_every", "1",
                "--ufogen_adv", "false", "--resume", "true"])            # a D-less checkpoint resumes
    assert config.load_checkpoint(str(tmp_path / "off" / "ufogen.pt"))["step"] == 3
