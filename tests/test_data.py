"""Real data: image folders with the images real folders hold, metadata.jsonl confined to its folder, img2dataset's
WebDataset shards and folder output (written by img2dataset itself, from file:// URLs), the shard stream's order,
split and resume, and the encode stage's latent shards. Independent references: img2dataset and webdataset (the
formats' own writer and reader), PIL's own decoding of the same files, and hand-made expected pixels."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import vae as vae_lib


def photo(seed: int, w: int = 96, h: int = 72) -> Image.Image:
    """A smooth random RGB picture (bicubic-upsampled noise): photo-like enough for JPEG and the VAE."""
    small = np.random.default_rng(seed).integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.BICUBIC)


def pixel(img: torch.Tensor, y: int, x: int) -> list[int]:
    """An image tensor's pixel in 0..255 (the inverse of the loader's scaling)."""
    return [round(float(v)) for v in (img[:, y, x] + 1) * 127.5]


# --- images as real folders hold them -----------------------------------------------------------------

def test_real_image_modes_load_as_a_viewer_shows_them(tmp_path):
    # 16-bit greyscale at half scale: mid grey, not white (convert("RGB") alone clips it to 255)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    assert pixel(data.load_image(str(tmp_path / "grey16.png"), 8), 4, 4) == [128, 128, 128]
    # EXIF orientation 3 (rotated 180 degrees): stored red-left / blue-right, shown blue-left / red-right
    im = Image.new("RGB", (16, 8), (255, 0, 0))
    im.paste((0, 0, 255), (8, 0, 16, 8))
    exif = Image.Exif()
    exif[0x0112] = 3
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    x = data.load_image(str(tmp_path / "rot.jpg"), 8)                    # 16x8 -> 16x8 then centre crop 8x8
    big = data.resize_crop(data.to_rgb(Image.open(tmp_path / "rot.jpg")), 8)
    assert torch.equal(x, big)
    full = data.to_rgb(Image.open(tmp_path / "rot.jpg"))
    assert full.getpixel((2, 4))[2] > 200 and full.getpixel((13, 4))[0] > 200      # blue left, red right
    # a palette PNG whose index 0 is transparent: white there, not black
    p = Image.new("P", (8, 8), 0)
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.paste(1, (4, 0, 8, 8))
    p.save(tmp_path / "pal.png", transparency=0)
    y = data.load_image(str(tmp_path / "pal.png"), 8)
    assert pixel(y, 4, 1) == [255, 255, 255] and pixel(y, 4, 6) == [255, 0, 0]
    # RGBA at half alpha over white; greyscale with alpha; CMYK; plain greyscale
    Image.new("RGBA", (8, 8), (0, 0, 255, 128)).save(tmp_path / "rgba.png")
    assert pixel(data.load_image(str(tmp_path / "rgba.png"), 8), 2, 2) == [127, 127, 255]
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert pixel(data.load_image(str(tmp_path / "la.png"), 8), 2, 2) == [255, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = pixel(data.load_image(str(tmp_path / "cmyk.jpg"), 8), 4, 4)
    assert r > 230 and g < 30 and b < 30
    Image.new("L", (8, 8), 77).save(tmp_path / "grey.png")
    assert pixel(data.load_image(str(tmp_path / "grey.png"), 8), 4, 4) == [77, 77, 77]


def test_resize_shorter_side_then_centre_crop(tmp_path):
    im = Image.new("RGB", (40, 20), (0, 0, 0))
    im.paste((255, 255, 255), (10, 0, 30, 20))                         # the centre 20 columns white
    got = data.resize_crop(im, 10)                                     # 40x20 -> 20x10 -> the middle 10x10
    assert got.shape == (3, 10, 10) and float(got[:, :, 1:-1].min()) > 0.99   # (bicubic rings at the cut)
    assert float(data.resize_crop(im.crop((0, 0, 30, 20)), 10)[:, :, 0].max()) < -0.9  # off-centre: black


def test_metadata_jsonl_is_confined_to_its_folder_and_every_bad_line_is_named(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    photo(0).save(root / "a.jpg")
    (tmp_path / "outside.jpg").write_bytes((root / "a.jpg").read_bytes())
    meta = root / "metadata.jsonl"
    bad = [({"file_name": "/etc/hostname", "text": "x"}, "outside the folder"),
           ({"file_name": "../outside.jpg", "text": "x"}, "outside the folder"),
           ({"file_name": 7, "text": "x"}, 'a string "file_name"'),
           (["a.jpg", "x"], 'a string "file_name"'),
           ({"file_name": "a.jpg", "text": 3}, '"text" is int'),
           ("{not json", "not JSON")]
    for line, why in bad:
        meta.write_text(json.dumps({"file_name": "a.jpg", "text": "ok"}) + "\n"
                        + (line if isinstance(line, str) else json.dumps(line)) + "\n")
        with pytest.raises(ValueError, match=rf"metadata.jsonl:2: .*{why}"):
            data.ImageFolder(str(root), 16)
    meta.write_text(json.dumps({"file_name": "a.jpg", "text": None}) + "\n")
    assert data.ImageFolder(str(root), 16)[0][1] == ""                  # null: an empty caption, not "None"
    side = tmp_path / "side"
    side.mkdir()
    photo(1).save(side / "b.jpg")
    (side / "b.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption file .*b.txt: not UTF-8"):
        data.ImageFolder(str(side), 16)


def test_folder_split_min_size_and_subfolders(tmp_path, capsys):
    root = tmp_path / "ds"
    for i in range(120):                                               # img2dataset's numbered subfolders
        sub = root / f"{i // 50:05d}"
        sub.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4) if i == 3 else (12, 12), (i, 0, 0)).save(sub / f"{i:09d}.png")
        (sub / f"{i:09d}.txt").write_text(f"caption {i}")
    every = data.ImageFolder(str(root), 8, "all")
    train_split, held = data.ImageFolder(str(root), 8, "train"), data.ImageFolder(str(root), 8, "heldout")
    assert len(every) == 120 and [c for _, c in held.items] == ["caption 49", "caption 99"]
    assert set(train_split.items).isdisjoint(held.items) and len(train_split) + len(held) == 120
    small = data.ImageFolder(str(root), 8, "all", min_size=8)
    assert small[3][1] == "caption 4" and small.too_small == 1         # dropped, counted, the next one used
    assert data.ImageFolder(str(root), 8, "all")[3][1] == "caption 3"


# --- WebDataset shards, as img2dataset writes them -------------------------------------------------------

@pytest.fixture(scope="module")
def img2dataset_out(tmp_path_factory):
    """img2dataset's own outputs for 10 local pictures (file:// URLs): WebDataset shards of 3 samples and the
    'files' folder layout. One of the pictures is a corrupt file, which img2dataset itself drops."""
    i2d = pytest.importorskip("img2dataset")
    d = tmp_path_factory.mktemp("i2d")
    (d / "src").mkdir()
    rows = ["url\tcaption"]
    for i in range(10):
        photo(i).save(d / "src" / f"{i}.jpg", quality=90)
        rows.append(f"file://{d / 'src' / f'{i}.jpg'}\ta photo of thing {i}")
    (d / "urls.tsv").write_text("\n".join(rows) + "\n")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    for fmt in ("webdataset", "files"):
        i2d.download(url_list=str(d / "urls.tsv"), input_format="tsv", url_col="url", caption_col="caption",
                     output_format=fmt, output_folder=str(d / fmt), processes_count=1, thread_count=2,
                     image_size=48, resize_mode="keep_ratio", number_sample_per_shard=3, enable_wandb=False,
                     distributor="multiprocessing")
    return d


@pytest.mark.slow
def test_img2dataset_shards_read_as_webdataset_reads_them(img2dataset_out):
    wds = pytest.importorskip("webdataset")
    shards = data.shard_paths(str(img2dataset_out / "webdataset"))
    assert [os.path.basename(p) for p in shards] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    assert data.shard_paths(str(img2dataset_out / "webdataset" / "{00000..00003}.tar")) == shards
    ours = [(k, p["txt"].decode()) for s in shards for k, p in data.tar_samples(s, {})]
    theirs = [(os.path.basename(s["__key__"]), s["txt"].decode())
              for s in wds.WebDataset([str(p) for p in shards], shardshuffle=False)]
    assert [(os.path.basename(k), t) for k, t in ours] == theirs and len(theirs) == 10
    image, text = data.decode_sample(dict(next(data.tar_samples(shards[0], {}))[1]), 32)
    assert image.shape == (3, 32, 32) and text.startswith("a photo of thing")
    folder = data.ImageFolder(str(img2dataset_out / "files"), 32)       # its folder layout too
    assert sorted(c for _, c in folder.items) == sorted(t for _, t in theirs)


def write_shards(root, n_shards: int, per_shard: int, bad: set = frozenset()):
    """Tar shards in img2dataset's layout (key.jpg, key.txt, key.json); keys in `bad` get a corrupt image."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"{s:05d}.tar", "w") as tf:
            for i in range(per_shard):
                key = f"{s:05d}{i:04d}"
                buf = io.BytesIO()
                photo(s * 100 + i, 24, 24).save(buf, "JPEG", quality=90)
                img = b"not a jpeg" if key in bad else buf.getvalue()
                for ext, payload in (("jpg", img), ("txt", key.encode()), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tf.addfile(info, io.BytesIO(payload))
    return sorted(str(p) for p in root.glob("*.tar"))


def captions_of(stream, n):
    return [t for _, t in data.first_items(stream, n)]


def test_shard_stream_order_split_and_resume(tmp_path):
    shards = write_shards(tmp_path / "s", 4, 5)
    stream = data.ShardStream(shards, 16, shuffle_buffer=3)
    stream.configure(seed=1, rank=0, world=1, start_step=0, micro=2, grad_accum=1)
    first, again = captions_of(stream, 40), captions_of(stream, 40)
    assert first == again                                             # a function of (seed, epoch)
    assert sorted(first[:20]) == sorted(f"{s:05d}{i:04d}" for s in range(4) for i in range(5))   # one epoch
    assert first[:20] != first[20:40]                                 # the next epoch in another order
    stream.configure(seed=1, rank=0, world=1, start_step=3, micro=2, grad_accum=1)
    assert captions_of(stream, 20) == first[6:26]                     # resumed at step 3: 6 samples on
    halves = []
    for rank in (0, 1):                                               # DDP: disjoint shards, all of them
        stream.configure(seed=1, rank=rank, world=2, start_step=0, micro=2, grad_accum=1)
        halves.append(captions_of(stream, 10))
    assert set(halves[0]).isdisjoint(halves[1]) and len(set(halves[0]) | set(halves[1])) == 20
    few = data.ShardStream(shards[:1], 16, shuffle_buffer=2)          # fewer shards than readers: by sample
    parts = []
    for rank in range(3):
        few.configure(seed=0, rank=rank, world=3, start_step=0, micro=1, grad_accum=1)
        parts.append(set(captions_of(few, 1)))
    assert len(set.union(*parts)) == 3


def test_shard_stream_through_dataloader_workers_resumes_where_it_stopped(tmp_path):
    shards = write_shards(tmp_path / "s", 4, 6)
    ds = data.ShardStream(shards, 16, shuffle_buffer=4)
    straight = [t for _, (_, t) in zip(range(8), data.batches(ds, 4, 2, 0, 0, 1, 0, "cpu", num_workers=2))]
    resumed = [t for _, (_, t) in zip(range(4), data.batches(ds, 4, 2, 0, 0, 1, 2, "cpu", num_workers=2))]
    assert resumed == straight[4:]                                    # 2 steps x 2 micro-batches skipped


def test_bad_samples_are_counted_and_never_shift_the_order(tmp_path, capsys):
    good = write_shards(tmp_path / "good", 2, 4)
    bad = write_shards(tmp_path / "bad", 2, 4, bad={"000010002"})
    a, b = data.ShardStream(good, 16, shuffle_buffer=1), data.ShardStream(bad, 16, shuffle_buffer=1)
    for s in (a, b):
        s.configure(seed=0, rank=0, world=1, start_step=0, micro=1, grad_accum=1)
    ta, tb = captions_of(a, 8), captions_of(b, 8)
    k = ta.index("000010002")
    assert tb[:k] == ta[:k] and tb[k] == tb[k - 1] and tb[k + 1:] == ta[k + 1:]   # filled by the previous one
    assert "1 unreadable" in capsys.readouterr().out
    with open(bad[0], "r+b") as f:                                    # a shard cut off in the middle
        f.truncate(3000)
    assert len(list(data.tar_samples(bad[0], counts := {}))) < 4 and counts["bad_shards"] == 1


def test_shard_specs(tmp_path):
    shards = write_shards(tmp_path / "s", 3, 1)
    assert data.expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
    assert data.expand_braces("{x,y}{1..2}") == ["x1", "x2", "y1", "y2"]
    (tmp_path / "list.txt").write_text("s/00000.tar\n\ns/00002.tar\n")
    assert data.shard_paths(str(tmp_path / "list.txt")) == [shards[0], shards[2]]
    assert data.shard_paths(str(tmp_path / "s")) == shards
    assert data.shard_paths(str(tmp_path / "s" / "{00000..00002}.tar")) == shards
    with pytest.raises(FileNotFoundError, match=r"1 of 4 shards do not exist"):
        data.shard_paths(str(tmp_path / "s" / "{00000..00003}.tar"))
    assert data.shard_paths(str(tmp_path)) is None                    # no .tar here: an image folder
    held = data.make_dataset(str(tmp_path / "s"), "heldout", 16)
    assert [c for _, c in held] == ["000020000"]                      # the last shard is held out
    assert data.make_dataset(str(tmp_path / "s"), "train", 16).shards == shards[:2]


# --- cached latents: the encode stage ------------------------------------------------------------------------

def test_encode_stage_writes_latents_of_this_vae_and_refuses_another(tmp_path):
    shards = write_shards(tmp_path / "s", 3, 5, bad={"000000001"})
    out = tmp_path / "run"
    common = ["--out_dir", str(out), "--resolution", "16", "--batch_size", "4", "--eval_images", "3",
              "--sample_every", "0", "--warmup", "1", "--log_every", "1"]
    train.main(["--stage", "vae", "--data", str(tmp_path / "s"), "--steps", "1", *common])
    train.main(["--stage", "encode", "--data", str(tmp_path / "s"), "--vae_ckpt", str(out / "vae.pt"), *common])
    lat = out / "latents"
    man = json.load(open(lat / "latents.json"))
    vae = vae_lib.VAE(vae_lib.PRESETS["tiny"])
    vae.load_state_dict(torch.load(out / "vae.pt", weights_only=True)["model"])
    vae.cfg.scaling_factor = man["scaling_factor"]
    assert man["shards"] == ["00000.pt", "00001.pt"] and man["count"] == 9 and man["skipped"]["bad"] == 1
    assert man["vae"] == vae_lib.encoder_fingerprint(vae)
    shard = torch.load(lat / "00001.pt", weights_only=True)
    samples = list(data.tar_samples(shards[1], {}))
    x = torch.stack([data.decode_sample(p, 16)[0] for _, p in samples])
    with torch.no_grad():
        post = vae.eval().encode(x)
    torch.testing.assert_close(shard["mean"].float(), post.mean * man["scaling_factor"], atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(shard["std"].float(), post.std * man["scaling_factor"], atol=2e-3, rtol=2e-3)
    assert shard["captions"] == [k.split("/")[-1] for k, _ in samples]
    held = data.make_dataset(str(lat), "heldout", 16)
    assert [c for _, c in held] == ["000020000", "000020001", "000020002"]
    stamp = os.path.getmtime(lat / "00000.pt")                        # resumable: a written shard is kept
    train.main(["--stage", "encode", "--data", str(tmp_path / "s"), "--vae_ckpt", str(out / "vae.pt"), *common])
    assert os.path.getmtime(lat / "00000.pt") == stamp
    other = tmp_path / "other"
    train.main(["--stage", "vae", "--data", str(tmp_path / "s"), "--steps", "1", "--seed", "5", *common[:1],
                str(other), *common[2:]])
    with pytest.raises(ValueError, match=r"latents were made by a VAE with encoder fingerprint"):
        train.main(["--stage", "diffusion", "--data", str(lat), "--vae_ckpt", str(other / "vae.pt"), "--steps", "1",
                    "--eval_steps", "1", *common[:1], str(other), *common[2:]])
    with pytest.raises(ValueError, match=r"--resolution 32"):
        data.make_dataset(str(lat), "train", 32)


@pytest.mark.slow
def test_the_recipe_runs_on_a_real_folder_and_on_shards(tmp_path, img2dataset_out):
    """The README's paper-scale recipe, stage by stage, at toy scale: img2dataset's folder output through every
    stage (with cached latents for the post-VAE stages), and its shards streamed straight into diffusion."""
    folder, shards = str(img2dataset_out / "files"), str(img2dataset_out / "webdataset")
    out = tmp_path / "run"
    common = ["--out_dir", str(out), "--batch_size", "2", "--steps", "2", "--eval_images", "2", "--eval_steps", "2",
              "--sample_every", "1", "--warmup", "1", "--log_every", "1"]
    train.main(["--stage", "vae", "--data", folder, *common])
    train.main(["--stage", "decoder", "--data", folder, "--init_from", str(out / "vae.pt"), *common])
    train.main(["--stage", "encode", "--data", folder, *common])
    lat = str(out / "latents")
    for stage in ("diffusion", "relu", "ufogen", "distill", "lora"):                  # ufogen on: relu.pt
        train.main(["--stage", stage, "--data", lat, *common])
    train.main(["--stage", "adapter", "--data", folder, *common])
    for name in ("vae_eval.json", "vae_recon.png", "loss_vae.png", "decoder_eval.json", "samples_000001.png",
                 "samples_final.png", "relu_000001.png", "relu.safetensors", "ufogen_000001.png", "onestep_vs_base.png",
                 "distill_000001.png", "lora.pt",
                 "adapter.pt"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert any("val_loss" in r for r in rows) and any("val_psnr_db" in r for r in rows)
    assert "checker" not in json.dumps(json.load(open(out / "eval.json")))      # no shapes checker here
    assert json.load(open(out / "eval.json"))["relu"]["steps"] == 2
    train.main(["--stage", "diffusion", "--data", shards, "--num_workers", "2", "--overwrite", "true",
                "--shuffle_buffer", "4", *common])
    assert json.load(open(out / "eval.json"))["ddim2"]["ms_per_image"] > 0


def test_varied_shapes_free_position_and_size_and_the_checker_still_reads_them():
    """--data shapes-varied: the same captions, centres spread over the image and radii over 0.2-0.4 (the default
    keeps the centre within 0.03 of the middle); the checker reads every attribute of its images."""
    fixed, varied = data.Shapes("train", 32), data.Shapes("train", 32, geometry="shapes-varied")
    a = [varied.attributes(i) for i in range(400)]
    assert max(abs(x["cx"] - 0.5) for x in a) > 0.2 and min(x["r"] for x in a) < 0.22
    assert max(abs(fixed.attributes(i)["cx"] - 0.5) for i in range(400)) <= 0.03
    assert [varied[i][1] for i in range(5)] == [fixed[i][1] for i in range(5)]        # same captions, same order
    imgs = torch.stack([varied[i][0] for i in range(100)])
    assert data.attribute_accuracy(imgs, [varied[i][1] for i in range(100)])["shape"] == 1.0
    assert isinstance(data.make_dataset("shapes-varied", "heldout", 32), data.Shapes)
    with pytest.raises(ValueError, match="geometry = 'wobbly'"):
        data.Shapes("train", 32, geometry="wobbly")


def test_sharpness_by_hand():
    """A vertical step from -1 to 1 in an 8x8 image, averaged 2x2 to 4x4: one of the 3 horizontal neighbour pairs
    of each row differs by 2, no vertical pair does: (4 / 3 + 0) / 2. A step blurred over two pixels has less;
    pixel-level noise of +-0.1 on each 2x2 cell's pixels (summing to 0 in each cell) changes nothing."""
    step = torch.tensor([-1.0] * 4 + [1.0] * 4).expand(1, 3, 8, 8)
    assert data.sharpness(step) == pytest.approx((4 / 3 + 0) / 2)
    soft = torch.tensor([-1.0] * 3 + [-0.5, 0.5] + [1.0] * 3).expand(1, 3, 8, 8)
    assert data.sharpness(soft) < data.sharpness(step)
    noise = 0.1 * torch.tensor([[1.0, -1.0], [-1.0, 1.0]]).repeat(4, 4).expand(1, 3, 8, 8)
    assert data.sharpness(step + noise) == pytest.approx(data.sharpness(step))
