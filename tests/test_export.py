"""export_coreml.py: export-friendly ops equal the originals; the tiny pipeline converts to Core ML and LiteRT
with the documented I/O; LiteRT fp32 matches PyTorch; XNNPACK takes the whole UNet/decoder; bad input is named."""

import dataclasses

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import export_coreml as E
import md


def tiny_pipeline(**unet_changes):
    unet, vae, text, info = E.load_pipeline(None, "tiny", None)
    if unet_changes:
        torch.manual_seed(0)
        unet = md.UNet(dataclasses.replace(unet.cfg, **unet_changes)).eval()
    return unet, vae, text


def test_export_friendly_ops_equal_originals():
    torch.manual_seed(0)
    gn = nn.GroupNorm(8, 32)
    nn.init.normal_(gn.weight), nn.init.normal_(gn.bias)
    x = 3 * torch.randn(2, 32, 5, 7) + 1
    assert torch.allclose(E.ExportGroupNorm(gn)(x), gn(x), atol=1e-5)
    assert torch.equal(E.nearest2x(x), F.interpolate(x, scale_factor=2.0, mode="nearest"))
    unet, vae, text = tiny_pipeline()
    comps = {c.name: c for c in E.components(unet, vae, text, 64)}
    with torch.no_grad():
        before = {n: c.module(*c.inputs.values()) for n, c in comps.items()}
        keys = {n: list(c.module.state_dict()) for n, c in comps.items()}
        E.export_friendly(unet), E.export_friendly(vae)
        assert not any(isinstance(m, (nn.GroupNorm, md.Upsample)) for m in [*unet.modules(), *vae.modules()])
        for n, c in comps.items():
            assert list(c.module.state_dict()) == keys[n]                      # same weights, same names
            assert torch.allclose(c.module(*c.inputs.values()), before[n], atol=1e-5), n


def test_components_io_and_errors(tmp_path):
    unet, vae, text = tiny_pipeline()
    comps = {c.name: c for c in E.components(unet, vae, text, 32, unet_batch=2)}          # tiny VAE: f = 4
    assert comps["unet"].inputs["sample"].shape == (2, 8, 8, 8)
    assert comps["unet"].inputs["encoder_hidden_states"].shape == (2, 16, 128)           # tiny text: 16 tokens
    assert comps["text_encoder"].inputs["input_ids"].dtype == torch.int32
    with torch.no_grad():
        assert comps["decoder"].module(*comps["decoder"].inputs.values()).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by the VAE factor 4"):
        E.components(unet, vae, text, 30)
    with pytest.raises(ValueError, match="multiple of 16"):
        E.components(unet, vae, text, 24)                                      # latent 6 is not divisible by 4
    with pytest.raises(ValueError, match="unknown; choose from"):
        E.main(["--preset", "nope", "--format", "none"])
    with pytest.raises(FileNotFoundError, match="no such file"):
        E.main(["--ckpt", str(tmp_path / "missing.pt"), "--format", "none"])
    with pytest.raises(SystemExit, match="pip install not-a-package"):
        E.need("not_a_package_here", "not-a-package")


@pytest.mark.slow
def test_coreml_export_names_shapes_and_relu_has_no_softmax(tmp_path):
    pytest.importorskip("coremltools")               # optional back-end of export_coreml.py (requirements-dev.txt)
    ops = {}
    for act in ("relu", "softmax"):
        unet, vae, text = tiny_pipeline(attn_act=act)
        comp = E.components(E.export_friendly(unet), vae, text, 32)[1]
        ml = E.to_coreml(comp, "iOS17")
        ops[act] = E.coreml_ops(ml)
    spec = ml.get_spec()
    assert [i.name for i in spec.description.input] == ["sample", "timestep", "encoder_hidden_states"]
    assert list(spec.description.input[0].type.multiArrayType.shape) == [1, 8, 8, 8]      # 32px / f = 4
    assert [o.name for o in spec.description.output] == ["v_pred"]
    assert ops["relu"].get("softmax", 0) == 0 and ops["softmax"]["softmax"] > 0
    assert ops["relu"]["relu"] > 0
    ml.save(str(tmp_path / "u.mlpackage"))
    for q in ("int8", "palettize4"):                                          # weight compression shrinks it
        E.compress_coreml(ml, q).save(str(tmp_path / f"u{q}.mlpackage"))
        assert E.size_mb(str(tmp_path / f"u{q}.mlpackage")) < 0.7 * E.size_mb(str(tmp_path / "u.mlpackage"))


@pytest.mark.slow
def test_litert_matches_torch_and_delegates_fully(tmp_path):
    pytest.importorskip("litert_torch"), pytest.importorskip("ai_edge_litert")        # optional back-ends
    unet, vae, text = tiny_pipeline()
    E.export_friendly(unet), E.export_friendly(vae)
    for comp in E.components(unet, vae, text, 32):
        path = E.to_litert(comp, str(tmp_path / f"{comp.name}.tflite"), "none")
        runner, off = E.litert_runner(path)
        with torch.no_grad():
            ref = comp.module(*comp.inputs.values())
        out = E.litert_run(runner, comp)
        assert out.shape == ref.shape
        assert (out - ref).abs().max() < 1e-4, comp.name
        if comp.name == "unet":                                                # smaller weights still run
            for q, min_db in (("fp16", 60), ("int8", 25)):
                qpath = E.quantize_litert(path, str(tmp_path / f"unet_{q}.tflite"), q)
                assert E.size_mb(qpath) < 0.6 * E.size_mb(path), q
                assert E.psnr(ref, E.litert_run(E.litert_runner(qpath)[0], comp)) > min_db, q
        parts = off.pop("partitions")
        if comp.name == "text_encoder":
            assert set(off) <= {"EMBEDDING_LOOKUP", "RESHAPE"}                  # a gather: no XNNPACK kernel
        else:
            assert parts == 1 and not off, (comp.name, parts, off)


@pytest.mark.slow
def test_undelegated_ops_sees_the_original_groupnorm(tmp_path):
    """Without the export-friendly forms the decoder does not delegate whole: the check can fail."""
    pytest.importorskip("litert_torch"), pytest.importorskip("ai_edge_litert")
    unet, vae, text = tiny_pipeline()
    comp = E.components(unet, vae, text, 32)[2]
    runner, off = E.litert_runner(E.to_litert(comp, str(tmp_path / "u.tflite"), "none"))
    assert off.pop("partitions") > 1 and off


def test_fp16_psnr_is_high_for_the_tiny_unet():
    unet, vae, text = tiny_pipeline()
    comp = E.components(unet, vae, text, 32)[1]
    assert E.psnr(torch.ones(4), torch.ones(4)) == float("inf")
    assert abs(E.psnr(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0])) - 20 * torch.log10(torch.tensor(2 / 0.5 ** 0.5)).item()) < 1e-6
    assert E.fp16_psnr(comp) > 35
