"""Fixtures shared by several test files."""

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
