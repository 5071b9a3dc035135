"""Fixtures and helpers shared by several test files."""

import json

import pytest
import torch

import md
import train


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base diffusion checkpoint (2 VAE steps, 2 diffusion steps) for the post-training stages."""
    d = tmp_path_factory.mktemp("base")
    common = ["--batch_size", "4", "--out_dir", str(d), "--sample_every", "0", "--eval_images", "4", "--warmup", "1"]
    train.main(["--stage", "vae", "--steps", "2", *common])
    train.main(["--stage", "diffusion", "--steps", "2", "--eval_steps", "2", *common])
    return d


@pytest.fixture(scope="session")
def random_unet():
    """random_unet(seed) -> the tiny UNet with every layer random: its zero-initialised layers would hide the
    paths under test."""
    def make(seed=0):
        torch.manual_seed(seed)
        unet = md.UNet(md.PRESETS["tiny"])
        for m in unet.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        return unet
    return make


def make_clip_folder(tmp_path, words):
    """A tiny CLIP tokenizer vocabulary (bytes + merges that build `words`) and a random CLIPTextModel."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    b2u = md._bytes_to_unicode()
    vocab = list(b2u.values()) + [c + "</w>" for c in b2u.values()]
    merges = []
    for w in words:
        parts = [b2u[b] for b in w.encode()]
        parts[-1] += "</w>"
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in merges:
                merges.append(pair)
                vocab.append(parts[0] + parts[1])
            parts = [parts[0] + parts[1]] + parts[2:]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder = tmp_path / "clip"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                                      bos_token_id=len(vocab) - 2, eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1)
    model = transformers.CLIPTextModel(cfg).eval()
    model.save_pretrained(folder)
    return folder, model, transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
