"""What scaling up needs (issue 26), checked on CPU: fp16's loss scaler (a skipped step after an overflow,
resumed with its scale), gradient checkpointing (the same gradients from fewer saved tensors), AdamW's fused
kernel, the inference weights file (size, load memory, the same images), and the --bench report."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import config
import data
import md
import sample
import train
import train_utils
import ufogen

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def stage_cfg(**kw):
    return train.TrainConfig(**{"stage": "diffusion", "out_dir": "/nonexistent", **kw})


# ----------------------------------------------------------------------------------------------------
# fp16: the loss scaler
# ----------------------------------------------------------------------------------------------------

def linear_step(scaler, cfg, grad_value):
    """One backward (through the scaler) and clip_and_step of a 2x2 layer whose every gradient is `grad_value`:
    returns (the returned norm, whether the weight changed)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(2, 2)
    opt = train_utils.make_optimizer(lin.parameters(), cfg, 0.1)
    before = lin.weight.detach().clone()
    scaler.backward(sum((p * grad_value).sum() for p in lin.parameters()))   # d loss / d p = grad_value
    norm = train_utils.clip_and_step(lin.parameters(), opt, cfg, 0, scaler)
    return norm, not torch.equal(before, lin.weight.detach())


def test_fp16_overflow_skips_the_step_and_halves_the_scale():
    cfg = stage_cfg(dtype="fp16", loss_scale=1024.0)
    scaler = train_utils.LossScaler(cfg, "cpu")
    assert scaler.enabled
    norm, changed = linear_step(scaler, cfg, float("inf"))
    assert norm is None and not changed                               # the weights never saw the overflow
    assert scaler.update(0) == {"loss_scale": 512.0, "skipped_steps": 1}
    norm, changed = linear_step(scaler, cfg, 0.5)                      # unscaled before clipping: norm of 0.5s
    assert changed and norm == pytest.approx(math.sqrt(6 * 0.25), rel=1e-6)
    assert scaler.update(1) == {"loss_scale": 512.0, "skipped_steps": 1}


def test_fp16_overflows_in_a_row_are_a_divergence(monkeypatch):
    monkeypatch.setattr(train_utils.LossScaler, "MAX_IN_A_ROW", 3)
    cfg = stage_cfg(dtype="fp16")
    scaler = train_utils.LossScaler(cfg, "cpu")
    for step in range(2):
        linear_step(scaler, cfg, float("nan"))
        scaler.update(step)
    linear_step(scaler, cfg, float("nan"))
    with pytest.raises(config.Diverged, match="3 overflows in a row"):
        scaler.update(2)


def test_bf16_and_fp32_need_no_scaler_and_a_nan_still_diverges():
    for dtype in ("bf16", "fp32"):
        cfg = stage_cfg(dtype=dtype)
        scaler = train_utils.LossScaler(cfg, "cpu")
        assert not scaler.enabled and scaler.update(0) == {}
        assert linear_step(scaler, cfg, 0.5)[1]
        with pytest.raises(config.Diverged, match="gradient norm"):
            linear_step(scaler, cfg, float("nan"))


@pytest.mark.slow
def test_fp16_stage_logs_skipped_steps_and_resumes_with_its_scale(tiny_base, tmp_path):
    """A loss scale of 1e30 overflows fp16's gradients on every step: each is skipped (AdamW never steps, so it
    has no state), the scale halves each time, and a resumed run continues from the saved scale and count."""
    out = tmp_path / "fp16"
    common = ["--stage", "diffusion", "--vae_ckpt", str(tiny_base / "vae.pt"), "--batch_size", "4", "--out_dir",
              str(out), "--sample_every", "0", "--eval_images", "4", "--eval_steps", "2", "--warmup", "1",
              "--dtype", "fp16", "--log_every", "1", "--loss_scale", "1e30"]
    train.main([*common, "--steps", "2"])
    ck = torch.load(out / "diffusion.pt", weights_only=True)
    assert ck["opt"]["state"] == {} and ck["scaler"]["skipped"] == 2
    train.main([*common, "--steps", "3", "--resume", "true"])
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = {r["step"]: r for r in rows if r["stage"] == "diffusion" and "loss_scale" in r}
    assert [steps[s]["skipped_steps"] for s in (1, 2, 3)] == [1, 2, 3]
    assert steps[3]["loss_scale"] == pytest.approx(1e30 / 8, rel=1e-6)     # not 1e30 / 2: the scale was resumed
    assert all("grad_norm" not in steps[s] for s in (1, 2, 3))            # no norm of a skipped step
    # The default scale (2^16) trains: fp16 autocast on CPU, finite losses, AdamW stepped.
    train.main([*common[:-2], "--out_dir", str(tmp_path / "ok"), "--steps", "3"])
    ok = torch.load(tmp_path / "ok" / "diffusion.pt", weights_only=True)
    assert ok["opt"]["state"] and ok["scaler"]["skipped"] < 3


def test_fused_adamw_on_cuda_only_by_default_and_equal_to_foreach_on_cpu():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(64, 32)), torch.nn.Parameter(torch.randn(32))]
    assert not train_utils.fused(stage_cfg(), params)               # CPU, auto: the foreach kernel
    assert train_utils.fused(stage_cfg(fused="on"), params) and not train_utils.fused(stage_cfg(fused="off"), params)
    results = []
    for mode in ("off", "on"):
        ps = [torch.nn.Parameter(p.detach().clone()) for p in params]
        opt = train_utils.make_optimizer(ps, stage_cfg(fused=mode), 1e-2)
        assert opt.defaults["fused"] is (True if mode == "on" else None)
        for i in range(5):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i))
            opt.step()
        results.append(torch.cat([p.detach().flatten() for p in ps]))
    assert torch.allclose(results[0], results[1], atol=1e-6)          # the same AdamW, to the last bits


# ----------------------------------------------------------------------------------------------------
# Gradient checkpointing
# ----------------------------------------------------------------------------------------------------

def saved_bytes(fn, params) -> int:
    """Bytes of the tensors autograd saves for the backward while fn() runs (each storage once, weights not)."""
    weights = {p.untyped_storage().data_ptr() for p in params}
    seen = set()

    def pack(t):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key[0] not in weights:
            seen.add(key)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for _, n in seen)


def test_grad_checkpointing_gives_the_same_gradients_from_fewer_saved_tensors(random_unet):
    unet = random_unet(0)
    x, t, ctx = torch.randn(2, 8, 16, 16), torch.tensor([10, 500]), torch.randn(2, 16, 128)
    grads, stored = [], []
    for on in (False, True):
        md.set_grad_checkpointing(unet, on)
        unet.zero_grad()
        stored.append(saved_bytes(lambda: unet(x, t, ctx).square().mean().backward(), unet.parameters()))
        grads.append(torch.cat([p.grad.flatten() for p in unet.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)
    assert stored[1] < 0.2 * stored[0]                                 # only what lies between the Blocks
    # In UFOGen both players are UNets: the switch reaches D's blocks too.
    disc = md.set_grad_checkpointing(ufogen.Discriminator(unet), True)
    assert all(b.grad_checkpoint for b in disc.modules() if isinstance(b, md.Block))
    with torch.no_grad():                                                # sampling: no recomputation at all
        assert unet(x, t, ctx).shape == x.shape


# ----------------------------------------------------------------------------------------------------
# Inference weights: what sampling needs, loaded at the model's size
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_weights_file_samples_the_same_images_and_is_a_fraction_of_the_checkpoint(tiny_base, tmp_path, capsys):
    pytest.importorskip("safetensors")
    weights = tiny_base / "diffusion.safetensors"
    assert weights.is_file()                                        # the diffusion stage wrote it at its end
    ckpt = tiny_base / "diffusion.pt"
    assert os.path.getsize(weights) < 0.45 * os.path.getsize(ckpt)   # no raw weights, optimiser, RNG
    prompts = ["a red circle on a blue background"]
    a = sample.Pipeline.from_checkpoint(str(ckpt)).images(prompts, steps=3, seed=1)
    b = sample.Pipeline.from_checkpoint(str(weights)).images(prompts, steps=3, seed=1)
    assert torch.equal(a, b)
    # --export_weights makes it again from the checkpoint alone, byte-identical tensors
    before = config.load_safetensors(str(weights))
    os.remove(weights)
    train.main(["--export_weights", "true", "--stage", "diffusion", "--out_dir", str(tiny_base)])
    assert "inference weights ->" in capsys.readouterr().out
    after = config.load_safetensors(str(weights))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # sample.py reads it like a checkpoint, and writes exactly the asked size
    png = tmp_path / "one.png"
    sample.main(["--ckpt", str(weights), "--prompt", "a red circle", "--n", "1", "--steps", "2",
                 "--resolution", "48", "--out", str(png)])
    from PIL import Image
    assert Image.open(png).size == (48, 48)
    # export_coreml.py and evaluate.py take it as --ckpt: the same networks as from the checkpoint
    import evaluate
    import export_coreml
    unet_w = export_coreml.load_pipeline(str(weights), None, None)[0]
    unet_c = export_coreml.load_pipeline(str(ckpt), None, None)[0]
    assert all(torch.equal(a, b) for a, b in zip(unet_w.state_dict().values(), unet_c.state_dict().values()))
    res = evaluate.main(["--ckpt", str(weights), "--n", "4", "--sampler", "eight_step", "--out_dir", str(tmp_path / "ev")])
    assert res["n"] == 4 and "shape" in res
    # a stage starts from it as from the checkpoint (--init_from): the softmax -> relu finetune of 3.2
    out = tmp_path / "relu"
    train.main(["--stage", "diffusion", "--init_from", str(weights), "--attn_act", "relu", "--steps", "1",
                "--batch_size", "4", "--out_dir", str(out), "--vae_ckpt", str(tiny_base / "vae.pt"),
                "--sample_every", "0", "--eval_images", "4", "--eval_steps", "2", "--warmup", "1"])
    assert torch.load(out / "diffusion.pt", weights_only=True)["config"]["unet"]["attn_act"] == "relu"
    # a file that is not one is named
    bad = tmp_path / "other.safetensors"
    import safetensors.torch
    safetensors.torch.save_file({"x": torch.zeros(2)}, str(bad))
    with pytest.raises(ValueError, match="not a MobileDiffusion weights file"):
        sample.load_diffusion(str(bad))


LOAD_PEAK = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {root!r})
    import sample
    def hwm():
        return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
    torch.zeros(1)
    base = hwm()
    unet, vae, text, conf = sample.load_diffusion({path!r})
    with torch.no_grad():                                                  # touch every weight once
        unet(torch.zeros(1, unet.cfg.in_channels, 16, 16), torch.zeros(1, dtype=torch.long),
             torch.zeros(1, 4, unet.cfg.context_dim))
    print(hwm() - base)
""")


@pytest.mark.slow
def test_loading_weights_costs_about_the_models_size(tmp_path):
    """A ~60M-parameter UNet (240 MB): loading it and running a forward raises the peak resident set by about
    the model's size, not twice (a random initialisation plus a copy) or more."""
    pytest.importorskip("safetensors")
    cfg = md.UNetConfig(**{**md.PRESETS["tiny"].__dict__, "channels": (256, 512, 768), "context_dim": 128})
    unet = md.UNet(cfg)
    size = sum(p.numel() * 4 for p in unet.parameters())
    import vae as vae_lib
    v = vae_lib.VAE(vae_lib.PRESETS["tiny"])
    text = md.TextEncoder(md.TEXT_PRESETS["tiny"])
    conf = {"unet": cfg.__dict__, "text": md.TEXT_PRESETS["tiny"].__dict__, "vae": vae_lib.PRESETS["tiny"].__dict__,
            "train": {"stage": "diffusion", "resolution": 64, "text_encoder": ""},
            "schedule": sample.ScheduleConfig().__dict__}
    path = str(tmp_path / "big.safetensors")
    sample.save_weights(path, unet, v, text, json.loads(json.dumps(conf)))
    del unet
    out = subprocess.run([sys.executable, "-c", LOAD_PEAK.format(root=ROOT, path=path)], capture_output=True,
                         text=True, check=True)
    grew = int(out.stdout.split()[-1])
    assert size > 200e6 and grew < 1.35 * size, (grew, size)


# ----------------------------------------------------------------------------------------------------
# --bench
# ----------------------------------------------------------------------------------------------------

def test_bench_prints_step_time_throughput_mfu_and_memory_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"stage": "diffusion", "step": 5, "loss": 0.5}\n')
    train.main(["--stage", "diffusion", "--bench", "2", "--batch_size", "4", "--out_dir", str(out)])
    text = capsys.readouterr().out
    assert "bench diffusion: preset tiny, 32px, batch 4 = 1 process(es) x 1 micro-batch(es) of 4, fp32" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("step "))
    assert "median of 2 after 3 warm-up" in line and "images/s" in line and "% MFU" in line
    assert "matmul" in line                                          # on CPU: against the measured peak
    assert "micro-batch that fits: 24 GB:" in text and "--batch_size 4 on 1 process(es): --grad_accum" in text
    assert sorted(os.listdir(out)) == ["metrics.jsonl"]               # no checkpoint, grid or times.json
    assert (out / "metrics.jsonl").read_text() == '{"stage": "diffusion", "step": 5, "loss": 0.5}\n'


@pytest.mark.slow
def test_bench_of_ufogen_needs_no_base(tmp_path, capsys):
    train.main(["--stage", "ufogen", "--bench", "1", "--batch_size", "2", "--out_dir", str(tmp_path),
                "--grad_checkpoint", "true", "--dtype", "bf16"])
    text = capsys.readouterr().out
    assert "a random tiny base model" in text and "bench ufogen" in text and "bf16" in text
    assert os.listdir(tmp_path) == []


def test_gpu_peaks_by_device_name(monkeypatch):
    cfg = stage_cfg(dtype="bf16")
    for name, peak in (("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA A100-SXM4-80GB", 312.0),
                       ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda d, n=name: n)
        assert train_utils.device_peak(cfg, "cuda:0")[0] == peak
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla T4")
    assert math.isnan(train_utils.device_peak(cfg, "cuda:0")[0])                       # no bf16 on a T4
    assert train_utils.device_peak(stage_cfg(dtype="fp16"), "cuda:0")[0] == 65.0
    assert train_utils.device_peak(stage_cfg(peak_tflops=100.0), "cuda:0") == (100.0, "--peak_tflops")
    # 80 GB, 10 GB fixed, 2 GB an image: (0.9 * 80 - 10) / 2 = 31; 512 images a process in micro-batches of at
    # most 31: 32 of 16 (16 micro-steps; 8 of 64 would not fit); 6 a process with 4 fitting: 2 of 3
    assert train_utils.fitting_micro_batch(80e9, 10e9, 2e9) == 31
    assert train_utils.grad_accum_for(512, 31) == 32 and train_utils.grad_accum_for(6, 4) == 2
    assert train_utils.grad_accum_for(512, 600) == 1 and train_utils.grad_accum_for(8, 0) == 0


def test_bench_and_export_flags_are_checked(capsys):
    for argv, what in ((["--bench", "2"], "--bench 2: times one training stage"),
                       (["--stage", "encode", "--bench", "2"], "--bench 2"),
                       (["--stage", "vae", "--export_weights", "true"], "--export_weights"),
                       (["--loss_scale", "0"], "--loss_scale 0")):
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert what in capsys.readouterr().err


def test_image_batches_shrink_with_resolution_but_not_at_the_tiny_runs_size():
    """The VAE and the reports take whole images in batches of at most CALL_PIXELS pixels (64 images of 512px in
    one md VAE call would need ~9 GB a tensor); the tiny run's 32px batches are what they always were."""
    assert data.images_per_call(32, 64) == 64 and data.images_per_call(32, 256) == 256
    assert data.images_per_call(256, 64) == 16 and data.images_per_call(512, 64) == 4
    assert data.images_per_call(2048, 64) == 1
