"""Tests for the text-to-image path: data.py, the CLIP text encoder (md.py), sample.py and the diffusion
stage of train.py. Independent references: Hugging Face transformers' CLIPTokenizer / CLIPTextModel on a
small random config and a generated vocabulary; closed-form properties of the schedule and of DDIM."""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

import config
import data
import md
import sample as S
import train
import train_utils
from conftest import make_clip_folder


# --- data -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_checker_reads_the_datasets_own_images():
    for split, style in (("train", "plain"), ("heldout", "plain"), ("train", "mixed")):
        ds = data.Shapes(split, 64, style=style)
        images = torch.stack([ds[i][0] for i in range(300)])
        acc = data.attribute_accuracy(images, [ds[i][1] for i in range(300)])
        assert min(acc.values()) >= 0.98, (split, style, acc)


def test_checker_reads_soft_edges_and_tells_shapes_apart():
    # What a decoder draws: the shape with its edges blurred (Gaussian, sigma 1 px). The checker must still read
    # the drawn shape, for every shape, over the radius range and at the dataset's outermost centres.
    k = torch.exp(-torch.arange(-3, 4.0).square() / 2)
    k = (k / k.sum()).view(1, 1, 7)
    def blur(img):                                              # (3, H, W), separable, edges replicated
        rows = torch.nn.functional.conv1d(torch.nn.functional.pad(img.reshape(-1, 1, 32), (3, 3), "replicate"), k)
        cols = rows.view(3, 32, 32).transpose(1, 2).reshape(-1, 1, 32)
        return torch.nn.functional.conv1d(torch.nn.functional.pad(cols, (3, 3), "replicate"), k).view(3, 32, 32).transpose(1, 2)
    for shape in data.SHAPES:
        for r in data.RADIUS:
            for c in (0.5 - data.JITTER, 0.5, 0.5 + data.JITTER):
                img = data.render(shape, "red", "blue", c, 1 - c, r, 32)
                for im in (img, blur(img)):
                    got = data.check_attributes(im)
                    assert (got["shape"], got["color"], got["background"]) == (shape, "red", "blue"), (shape, r, c)
    # Specks a decoder leaves in the background are not part of the shape: a square with two stray pixels of its
    # colour near two corners still reads square (with them, the box grows and another template fits better).
    img = data.render("square", "green", "white", 0.5, 0.5, 0.3, 32)
    img[:, 3, 3] = img[:, 28, 28] = img[:, 16, 16]
    assert data.check_attributes(img)["shape"] == "square"
    m = torch.zeros(6, 6, dtype=torch.bool)
    m[0, 0] = True                                              # a 1-pixel region ...
    m[2:5, 2:4] = True                                          # ... and a 6-pixel one
    assert data.largest_component(m).sum() == 6 and not data.largest_component(m)[0, 0]
    # A shape with no edges (flat background) reads no shape.
    flat = (torch.tensor(data.COLORS["blue"]) / 127.5 - 1).view(3, 1, 1).expand(3, 32, 32)
    assert data.check_attributes(flat) == {"shape": None, "color": None, "background": "blue", "style": None}


@pytest.mark.slow
def test_heldout_combinations_never_appear_in_training():
    held = set(data.heldout_combos())
    ds = data.Shapes("train", 64)
    seen = {tuple(data.parse_caption(ds[i][1]).values()) for i in range(2000)}
    assert not seen & held and len(held) == 9
    assert ds[5][1] == ds[5][1] and torch.equal(ds[5][0], data.Shapes("train", 64)[5][0])   # deterministic


def test_image_folder_layouts_and_bad_data(tmp_path, capsys):
    from PIL import Image
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.ImageFolder(str(tmp_path / "missing"), 32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable images"):
        data.ImageFolder(str(tmp_path / "empty"), 32)
    side = tmp_path / "side"
    side.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(side / "a.png")
    (side / "a.txt").write_text("a red thing")
    (side / "b.png").write_bytes(b"not a png at all")              # corrupt
    ds = data.ImageFolder(str(side), 32)
    img, text = ds[0]
    assert img.shape == (3, 32, 32) and text == "a red thing" and img[0].mean() > 0.9
    img, text = ds[1]                                               # corrupt: skipped, counted, next one used
    assert ds.skipped == 1 and text == "a red thing" and "skipping unreadable image" in capsys.readouterr().out
    meta = tmp_path / "meta"
    meta.mkdir()
    Image.new("RGB", (64, 64), (0, 0, 255)).save(meta / "x.jpg")
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "x.jpg", "text": "blue"}) + "\n")
    assert data.ImageFolder(str(meta), 16)[0][1] == "blue"


# --- the CLIP text encoder: parity with transformers -----------------------------------------------

@pytest.mark.slow
def test_clip_tokenizer_and_encoder_match_transformers(tmp_path):
    prompts = ["a red circle on a blue background", "A  RED square, on 2 backgrounds!", "circle"]
    folder, ref, ref_tok = make_clip_folder(tmp_path, ["red", "circle", "blue", "background", "square", "on"])
    ours = md.TextEncoder.from_pretrained(str(folder))
    ids = ours.tokenizer(prompts)
    want = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, want)
    assert not any(p.requires_grad for p in ours.parameters())     # frozen, as the paper keeps CLIP
    with torch.no_grad():
        torch.testing.assert_close(ours(prompts), ref(want).last_hidden_state, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_clip_special_ids_come_from_the_vocabulary_not_sd15s_legacy_config(tmp_path):
    """SD-1.5's text_encoder/config.json says bos 0, eos 2, pad 1 (transformers' legacy values); the ids that
    CLIPTokenizer emits, and that the model was trained on, are the vocabulary's <|startoftext|> / <|endoftext|>."""
    prompts = ["a red circle on a blue background", "circle"]
    folder, ref, ref_tok = make_clip_folder(tmp_path, ["red", "circle", "blue", "background", "on"])
    cfg = json.load(open(folder / "config.json"))
    cfg.update(bos_token_id=0, eos_token_id=2, pad_token_id=1)
    (folder / "config.json").write_text(json.dumps(cfg))
    ours = md.TextEncoder.from_pretrained(str(folder))
    n = len(json.load(open(folder / "vocab.json")))
    assert (ours.cfg.bos_id, ours.cfg.eos_id, ours.cfg.pad_id) == (n - 2, n - 1, n - 1)
    want = ref_tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(prompts), want)
    with torch.no_grad():
        out = ref(want)                                            # transformers pools at the argmax id here
        torch.testing.assert_close(ours(prompts), out.last_hidden_state, atol=1e-4, rtol=0)
        torch.testing.assert_close(ours.pooled(want, ours(prompts)), out.pooler_output, atol=1e-4, rtol=0)
    (folder / "tokenizer_config.json").write_text(json.dumps({"pad_token": "red</w>"}))    # SD-2 pads with "!"
    assert md.TextEncoder.from_pretrained(str(folder)).cfg.pad_id == ref_tok.convert_tokens_to_ids("red</w>")


def test_long_prompts_are_truncated_with_a_warning(capsys):
    enc = md.TextEncoder(md.TEXT_PRESETS["tiny"])
    ids = enc.tokenizer([" ".join(["x"] * 200)])
    assert ids.shape == (1, enc.cfg.max_len) == (1, 16) and ids[0, -1] == enc.cfg.eos_id and "truncated" in capsys.readouterr().out


def test_word_tokenizer_gives_each_caption_word_its_own_id():
    import zlib
    cfg = md.TEXT_PRESETS["tiny"]
    tok = md.Tokenizer(cfg)
    words = {w for combo in data.all_combos() for style in data.STYLES for w in data.caption(*combo, style=style).split()}
    ids = {w: tok.ids(w) for w in words}
    assert all(len(v) == 1 and 0 <= v[0] < cfg.bos_id for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(words) == 15           # no two caption words share a bucket
    assert ids["red"] == [zlib.crc32(b"red") % cfg.bos_id]                  # the rule an app re-implements
    assert tok.ids("A  RED, circle") == ids["a"] + ids["red"] + [zlib.crc32(b",") % cfg.bos_id] + ids["circle"]
    row = tok(["a red circle on a blue background"])[0].tolist()
    assert row[:2] == [cfg.bos_id, *ids["a"]] and row[8] == cfg.eos_id and set(row[9:]) == {cfg.pad_id}
    with pytest.raises(ValueError, match="'wordpiece'"):
        md.Tokenizer(md.TextConfig(tokenizer="wordpiece"))


# --- schedule and samplers ---------------------------------------------------------------------------

def test_schedule_has_zero_terminal_snr_and_unit_variance():
    s = S.make_schedule()
    assert float(s["alpha"][-1]) == 0.0 and float(s["sigma"][-1]) == 1.0
    torch.testing.assert_close(s["alpha"] ** 2 + s["sigma"] ** 2, torch.ones(S.T))
    x0, eps, t = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.tensor([0, 10, 500, 999])
    xt = S.q_sample(s, x0, t, eps)
    torch.testing.assert_close(S.x0_from_v(s, xt, t, S.v_target(s, x0, t, eps)), x0, atol=1e-5, rtol=0)


def test_trailing_spacing_and_one_step_ddim_returns_the_models_x0():
    assert S.trailing_timesteps(1) == [999] and S.trailing_timesteps(4) == [999, 749, 499, 249]
    s = S.make_schedule()
    calls = []

    def denoise(x, t):
        calls.append(int(t[0]))
        return torch.full_like(x, 0.25) + x * 0                    # a model whose x0 is known

    x = torch.randn(2, 4, 8, 8)
    assert torch.equal(S.ddim(denoise, x, s, steps=1), torch.full_like(x, 0.25)) and calls == [999]


def test_ddim_with_exact_x0_recovers_x0_and_ddpm_converges():
    s = S.make_schedule()
    target = torch.randn(1, 2, 4, 4)
    exact = lambda x, t: target.expand_as(x)                      # an oracle denoiser
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(S.ddim(exact, x, s, steps=10), target.expand_as(x))
    out = S.ddpm(exact, x, s, steps=20, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand_as(x))


# --- the diffusion stage -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_vae_ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("vae")
    train.main(["--stage", "vae", "--steps", "2", "--batch_size", "4", "--out_dir", str(d), "--sample_every", "0",
                "--eval_images", "4", "--warmup", "1"])
    return str(d / "vae.pt")


def diffusion_args(out, vae_ckpt, steps, *extra):
    return ["--stage", "diffusion", "--steps", str(steps), "--batch_size", "8", "--out_dir", str(out),
            "--vae_ckpt", vae_ckpt, "--log_every", "1", "--sample_every", "0", "--ckpt_every", "1000",
            "--eval_images", "4", "--eval_steps", "2", "--warmup", "1", "--lr_schedule", "constant", *extra]


def losses(out):
    rows = map(json.loads, open(os.path.join(out, "metrics.jsonl")))
    return [r["loss"] for r in rows if r["stage"] == "diffusion" and "loss" in r]      # not the val_loss rows


@pytest.mark.slow
def test_training_lowers_the_loss_on_a_fixed_batch(tiny_vae_ckpt):
    import sample
    unet, text = md.UNet(md.PRESETS["tiny"]), md.TextEncoder(md.TEXT_PRESETS["tiny"])
    model, vae, sched = S.Denoiser(unet, text), S.load_vae(tiny_vae_ckpt), sample.make_schedule()
    ds = data.Shapes("train", 64)
    x = torch.stack([ds[i][0] for i in range(8)])
    ids = text.tokenizer([ds[i][1] for i in range(8)])
    with torch.no_grad():
        z0 = vae.encode(x).mode() * vae.cfg.scaling_factor
    g = torch.Generator().manual_seed(0)
    t, eps = torch.randint(0, 1000, (8,), generator=g), torch.randn(z0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(model(sample.q_sample(sched, z0, t, eps), t, ids), sample.v_target(sched, z0, t, eps))
        first = first if first is not None else float(loss.detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.7 * first


@pytest.mark.slow
def test_stage_writes_eval_and_pipeline_is_deterministic(tmp_path, tiny_vae_ckpt):
    train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 2))
    ev = json.load(open(tmp_path / "eval.json"))
    assert set(ev["ddim2"]) == {"color", "background", "shape", "style", "ms_per_image"}
    pipe = S.Pipeline.from_checkpoint(str(tmp_path / "diffusion.pt"))
    a = pipe(["a red circle on a blue background"], steps=3, seed=7)
    b = pipe(["a red circle on a blue background"], steps=3, seed=7)
    assert a[0].size == (32, 32) and a[0].tobytes() == b[0].tobytes()
    c = pipe(["a red circle on a blue background"], steps=3, seed=8)
    assert a[0].tobytes() != c[0].tobytes()


@pytest.mark.slow
@pytest.mark.parametrize("cached", ["0", "12"])                     # fresh images, or 12 cached latents
def test_resume_continues_bit_identically(tmp_path, tiny_vae_ckpt, cached):
    straight, split = tmp_path / "straight", tmp_path / "split"
    train.main(diffusion_args(straight, tiny_vae_ckpt, 4, "--train_images", cached))
    train.main(diffusion_args(split, tiny_vae_ckpt, 2, "--ckpt_every", "2", "--train_images", cached))
    train.main(diffusion_args(split, tiny_vae_ckpt, 4, "--resume", "true", "--train_images", cached))
    a = config.load_checkpoint(str(straight / "diffusion.pt"))
    b = config.load_checkpoint(str(split / "diffusion.pt"))
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert losses(straight) == losses(split)                         # 2 logged before the stop + 2 after


def test_cached_training_set_is_the_vae_encoding_of_the_first_images(tiny_vae_ckpt):
    vae, ds = S.load_vae(tiny_vae_ckpt), data.Shapes("train", 32)
    cached = train_utils.encode_dataset(ds, 5, vae, "cpu", batch=2)
    x = torch.stack([ds[i][0] for i in range(5)])
    with torch.no_grad():
        want = vae.encode(x).mode() * vae.cfg.scaling_factor           # what a streamed step computes
    torch.testing.assert_close(cached.latents, want, rtol=1e-5, atol=1e-5)
    assert len(cached) == 5 and [cached[i][1] for i in range(5)] == [ds[i][1] for i in range(5)]
    assert train_utils.to_latents(cached.latents, vae, cached=True) is cached.latents
    torch.testing.assert_close(train_utils.to_latents(x, vae, cached=False), want)


def test_train_images_default_is_resolved_per_stage():
    # no flags: the tiny defaults, 600 x 64 images > 8192
    assert train.stage_config({}, "diffusion").train_images == train.SHAPES_CACHE
    assert train.stage_config({"steps": 10}, "diffusion").train_images == 0                        # no repeats
    assert train.stage_config({}, "vae").train_images == 0                                         # trains on pixels
    assert train.stage_config({"data": "/my/folder"}, "diffusion").train_images == 0
    assert train.stage_config({"train_images": 100}, "ufogen").train_images == 100


def test_min_snr_weight_is_min_snr_plus_one_gamma_over_snr_plus_one():
    sched, t = S.make_schedule(), torch.tensor([0, 100, 500, 900, 999])
    snr = (sched["alpha"][t].double() / sched["sigma"][t].double()) ** 2    # SNR_t from the schedule itself
    want = torch.minimum(snr + 1, torch.tensor(5.0, dtype=torch.float64)) / (snr + 1)
    got = S.loss_weight(sched, t, 5.0, torch.zeros(5, 1, 1, 1)).flatten()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    assert got[-1] == 1.0 and got[0] < 0.01                           # zero-SNR step kept; easy steps down-weighted
    assert torch.equal(S.loss_weight(sched, t, 0.0, torch.zeros(5, 1, 1, 1)).flatten(), torch.ones(5))


@pytest.mark.slow
def test_resume_with_a_different_config_is_refused_by_field(tmp_path, tiny_vae_ckpt):
    train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 1))
    with pytest.raises(ValueError, match=r"UNet config differs .*ff_mult: checkpoint 3 vs now 4"):
        train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 2, "--resume", "true", "--ff_mult", "4"))


@pytest.mark.slow
def test_init_from_softmax_into_relu_attention(tmp_path, tiny_vae_ckpt):
    """3.2: a softmax checkpoint initialises a relu-attention run (the only allowed architecture change)."""
    train.main(diffusion_args(tmp_path / "a", tiny_vae_ckpt, 1))
    train.main(diffusion_args(tmp_path / "b", tiny_vae_ckpt, 1, "--attn_act", "relu",
                              "--init_from", str(tmp_path / "a" / "diffusion.pt")))
    unet, _, _, _ = S.load_diffusion(str(tmp_path / "b" / "diffusion.pt"))
    assert unet.cfg.attn_act == "relu"
    with pytest.raises(ValueError, match="channels"):
        train.main(diffusion_args(tmp_path / "c", tiny_vae_ckpt, 1, "--channels", "32,64,96",
                                  "--init_from", str(tmp_path / "a" / "diffusion.pt")))


def _ddp_worker(rank, out, vae_ckpt, port, cached):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    train.main(diffusion_args(out, vae_ckpt, 3, "--device", "cpu", "--train_images", cached))


@pytest.mark.slow
@pytest.mark.parametrize("cached", ["0", "12"])
def test_ddp_two_processes_match_one_process(tmp_path, tiny_vae_ckpt, cached):
    one, two = tmp_path / "one", tmp_path / "two"
    train.main(diffusion_args(one, tiny_vae_ckpt, 3, "--train_images", cached))
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(str(two), tiny_vae_ckpt, port, cached), nprocs=2, join=True,
                       start_method="spawn")
    l1, l2 = losses(one), losses(two)
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-6)


@pytest.mark.slow
def test_mismatched_components_are_clear_errors(tmp_path, tiny_vae_ckpt):
    with pytest.raises(ValueError, match="in_channels = 4 but the VAE has 8"):
        train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 1, "--in_channels", "4"))
    with pytest.raises(ValueError, match="--text_encoder"):
        train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 1, "--preset", "md"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        train.main(diffusion_args(tmp_path, tiny_vae_ckpt, 1, "--data", str(tmp_path / "nowhere")))


@pytest.mark.slow
def test_stage_all_trains_what_separate_commands_train(tmp_path):
    """Each stage re-seeds the global RNG: the diffusion model of `--stage all` does not depend on how much
    randomness the VAE and decoder stages drew before it, so it equals the one trained by separate commands."""
    common = ["--steps", "2", "--batch_size", "4", "--sample_every", "0", "--eval_images", "2", "--eval_steps", "2",
              "--warmup", "1"]
    train.main(["--out_dir", str(tmp_path / "all"), *common])
    for stage in ("vae", "decoder", "diffusion"):
        train.main(["--stage", stage, "--out_dir", str(tmp_path / "apart"), *common])
    a = config.load_checkpoint(str(tmp_path / "all" / "diffusion.pt"))["model"]
    b = config.load_checkpoint(str(tmp_path / "apart" / "diffusion.pt"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ev = json.load(open(tmp_path / "all" / "eval.json"))
    assert {"8step", "onestep", "ddim2", "ddim2_relu", "relu"} <= set(ev)                          # all six ran
    # 3.2: the relu stage finetuned the diffusion stage's model, and the one-step and 8-step models start from it
    relu = config.load_checkpoint(str(tmp_path / "all" / "relu.pt"))
    assert relu["config"]["unet"]["attn_act"] == "relu" and ev["relu"]["steps"] == 2
    assert ev["relu"]["swapped_val_loss"] == ev["relu"]["val_loss"]["0"] != ev["relu"]["softmax_val_loss"]
    for stage in ("ufogen", "distill"):
        assert config.load_checkpoint(str(tmp_path / "all" / f"{stage}.pt"))["config"]["unet"]["attn_act"] == "relu"


@pytest.mark.slow
def test_sample_py_writes_one_image_at_exactly_its_size(tiny_base, tmp_path):
    from PIL import Image
    one, grid = tmp_path / "one.png", tmp_path / "grid.png"
    S.main(["--ckpt", str(tiny_base / "diffusion.pt"), "--prompt", "a red circle on a blue background", "--n", "1",
            "--steps", "2", "--resolution", "48", "--out", str(one)])
    assert Image.open(one).size == (48, 48)                          # no grid padding around a single image
    S.main(["--ckpt", str(tiny_base / "diffusion.pt"), "--prompt", "x", "--prompt", "y", "--n", "2", "--steps", "2",
            "--out", str(grid)])
    assert Image.open(grid).size == (2 * 34 + 2, 2 * 34 + 2)          # 2 x 2 tiles of 32 px with 2 px gutters


def test_the_relu_stage_needs_a_softmax_base_and_later_stages_prefer_its_model(tmp_path):
    """--stage relu without a diffusion.pt names the missing base; after a relu stage, every later stage's base
    (without --init_from) is relu.pt, while the relu stage itself still starts from diffusion.pt."""
    with pytest.raises(FileNotFoundError, match="--stage relu: no softmax base .*diffusion.pt"):
        train.main(["--stage", "relu", "--out_dir", str(tmp_path), "--steps", "1"])
    assert train.default_base(str(tmp_path), "ufogen") == str(tmp_path / "diffusion.pt")
    (tmp_path / "relu.pt").write_bytes(b"")
    assert train.default_base(str(tmp_path), "ufogen") == str(tmp_path / "relu.pt")
    assert train.default_base(str(tmp_path), "lora") == str(tmp_path / "relu.pt")
    assert train.default_base(str(tmp_path), "relu") == str(tmp_path / "diffusion.pt")
