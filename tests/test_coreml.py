"""Core ML export (snapgen_cli/export/coreml.py, ane.py): converted programs, palettization,
the PyTorch twin, the neural-engine layout, UNet chunks, Apple's Swift resource layout.

Conversion time grows with the number of MIL ops (coremltools validates the whole program
after each of its ~110 passes), so the converted UNet is the tiny preset cut to two stages
(0.63M parameters; still every block kind: stage-1 cross-attention layers, residual blocks,
self-attention with QK-norm and 2D RoPE, the mid block). Parity tests that need no conversion
use the full tiny preset.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_export import pipe_dir  # noqa: F401  (the tiny pipeline fixture)
from torch import nn

from snapgen_cli.core.blocks import CrossAttnLayer, Transformer2D
from snapgen_cli.core.decoder import build_decoder
from snapgen_cli.core.unet import build_unet
from snapgen_cli.errors import ConfigError, SnapgenError
from snapgen_cli.export import coreml
from snapgen_cli.export.ane import ANECrossAttnLayer, ANETransformer2D, to_ane_layout
from snapgen_cli.export.parity import psnr

# fp16 kernels on CPU split these tiny tensors over threads badly (seconds per call on a busy
# 2-core machine); no figure here depends on the thread count
pytestmark = pytest.mark.usefixtures("one_thread")

TWO_STAGE = dict(block_channels=(32, 64), transformer_depth=(0, 1), self_attention=(False, True))


class UNetSignature(nn.Module):
    """The minimal export wrapper: (sample, timestep, context, pooled[, mask]) -> velocity."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, context, pooled, mask=None):
        return self.unet(sample, timestep, context, pooled, mask, return_dict=False)[0]


def _unet(seed=0, **overrides):
    torch.manual_seed(seed)
    return UNetSignature(build_unet("tiny", **overrides)).eval()


def _unet_inputs(batch=1, size=16, mask=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    out = {"sample": torch.randn(batch, 4, size, size, generator=g),
           "timestep": torch.tensor([987.3, 20.5][:batch]),  # sigma * 1000; fp16 would round 987.3
           "encoder_hidden_states": torch.randn(batch, 8, 64, generator=g),
           "pooled_projections": torch.randn(batch, 64, generator=g)}
    if mask:
        m = torch.ones(batch, 8, dtype=torch.bool)
        m[0, 5:] = False
        out["encoder_attention_mask"] = m
    return out


def _decoder(seed=0):
    torch.manual_seed(seed)
    return build_decoder("tiny").eval()


def _latent(seed=2):
    return torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def unet_package(tmp_path_factory):
    """The UNet as Apple ships it for the neural engine: (B, C, 1, S) layout, split_einsum
    attention, two chunks, fp16, written where the Swift package looks for it."""
    module, inputs = _unet(**TWO_STAGE), _unet_inputs()
    path = coreml.swift_resource_path(tmp_path_factory.mktemp("coreml") / "Resources", "unet")
    entry = coreml.export_coreml(module, inputs, ["velocity"], path, chunks=2, ane_layout=True,
                                 attention="split_einsum")
    return module, inputs, entry, path.parent


def _fp16_bytes(arrays) -> set[bytes]:
    return {np.ascontiguousarray(a, dtype=np.float16).tobytes() for a in arrays}


@pytest.fixture(scope="module")
def decoder_packages(tmp_path_factory):
    out = tmp_path_factory.mktemp("coreml")
    module, z = _decoder(), _latent()
    fp16 = coreml.export_coreml(module, {"z": z}, ["image"], out / "VAEDecoder.mlpackage")
    pal6 = coreml.export_coreml(module, {"z": z}, ["image"], out / "pal6" / "VAEDecoder.mlpackage", palettize_bits=6)
    return module, fp16, pal6


def test_unet_programs_inputs_outputs_and_fp16_weights(unet_package):
    module, inputs, entry, res = unet_package
    assert sorted(p.name for p in res.iterdir()) == ["UnetChunk1.mlpackage", "UnetChunk2.mlpackage"]
    one, two = (coreml.inspect_mlpackage(res / f"UnetChunk{i}.mlpackage") for i in (1, 2))
    assert [(x["name"], x["shape"], x["dtype"]) for x in one["inputs"]] == [
        ("sample", [1, 4, 16, 16], "float32"), ("timestep", [1], "float32"),
        ("encoder_hidden_states", [1, 8, 64], "float32"), ("pooled_projections", [1, 64], "float32")]
    assert [(x["name"], x["shape"], x["dtype"]) for x in two["outputs"]] == [("velocity", [1, 4, 16, 16], "float32")]
    # chunk 2 reads chunk 1's outputs and the original inputs by name and shape (Swift's Unet merge)
    available = {x["name"]: x["shape"] for x in one["outputs"]} | {k: list(v.shape) for k, v in inputs.items()}
    assert {x["name"]: x["shape"] for x in two["inputs"]}.items() <= available.items()
    assert [x["name"] for x in one["outputs"]][:2] == ["hidden", "temb"]
    assert entry["inputs"] == one["inputs"] and entry["outputs"] == two["outputs"]
    assert entry["sizes"] == {"UnetChunk1.mlpackage": one["size_bytes"], "UnetChunk2.mlpackage": two["size_bytes"]}
    assert entry["precision"] == "fp16" and entry["palettization"] is None and entry["attention"] == "split_einsum"
    weights = one["weights"] + two["weights"]
    layer_weights = [w for w in weights if set(w["consumers"]) & {"conv", "linear"}]
    assert len(layer_weights) > 50 and all(w["dtype"] == "float16" and w["bits"] == 16 for w in layer_weights)
    assert not any(w["palettized"] for w in weights)
    assert {"conv", "softmax", "einsum", "sin", "cos"} <= set(one["ops"]) | set(two["ops"])
    # every conv / linear weight of the ANE-layout module is in the two programs with its fp16 values
    packaged = set().union(*(_fp16_bytes(coreml.mlpackage_weights(res / f"UnetChunk{i}.mlpackage").values())
                             for i in (1, 2)))
    ane = to_ane_layout(module, "split_einsum")
    layers = [m.weight for m in ane.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) > 50 and all(_fp16_bytes([w.detach().numpy()]) <= packaged for w in layers)


def test_timestep_sinusoid_stays_fp32(unet_package):
    """The sin/cos of the timestep embedding (arguments up to 1000 rad) run in fp32; the layers
    after them run in fp16 (negative control: the selector does not keep everything fp32)."""
    from coremltools.converters.mil.mil import types

    _, program = coreml._load_program(unet_package[3] / "UnetChunk1.mlpackage")
    ops = list(coreml._operations(program.functions["main"]))
    dtypes = {op.op_type: types.builtin_to_string(op.outputs[0].dtype) for op in ops if op.op_type in ("sin", "cos")}
    assert dtypes == {"sin": "fp32", "cos": "fp32"}
    layers = {types.builtin_to_string(op.outputs[0].dtype) for op in ops if op.op_type in ("conv", "linear")}
    assert layers == {"fp16"}


def test_decoder_program_and_6bit_palettization(decoder_packages):
    module, fp16, pal6 = decoder_packages
    for entry in (fp16, pal6):
        assert [(x["name"], x["shape"]) for x in entry["inputs"]] == [("z", [1, 16, 8, 8])]
        assert [(x["name"], x["shape"], x["dtype"]) for x in entry["outputs"]] == [("image", [1, 3, 64, 64], "float32")]
    plain = coreml.inspect_mlpackage(fp16["files"][0])
    assert all(w["dtype"] == "float16" for w in plain["weights"] if "conv" in w["consumers"])
    info = coreml.inspect_mlpackage(pal6["files"][0])
    assert pal6["palettization"]["nbits"] == 6 and info["ops"]["constexpr_lut_to_dense"] > 0
    big = [w for w in info["weights"] if "conv" in w["consumers"] and np.prod(w["shape"]) > coreml.WEIGHT_THRESHOLD]
    small = [w for w in info["weights"] if "conv" in w["consumers"] and np.prod(w["shape"]) <= coreml.WEIGHT_THRESHOLD]
    assert big and all(w["palettized"] and w["bits"] == 6 and w["unique_values"] <= 64 for w in big)
    assert small and not any(w["palettized"] for w in small)  # small tensors stay fp16, by design
    # Size: each palettized tensor of n fp16 values (2n bytes) becomes 6n/8 bytes of indices plus a
    # 64-entry fp16 table; every other byte of the package stays. The measured saving must match
    # that to within 256 bytes per palettized tensor (blob headers and 64-byte alignment of the
    # table and index blobs, the constexpr op's entry in the program).
    n = [int(np.prod(w["shape"])) for w in big]
    predicted = sum(2 * k - (-(-6 * k // 8) + 2 * 64) for k in n)
    measured = fp16["size_bytes"] - pal6["size_bytes"]
    assert abs(measured - predicted) <= 256 * len(n), (measured, predicted)
    # the palettized tensors shrink by 16/6 up to their tables; the whole tiny package by less
    # (its 8k unpalettized values and the program text): measured 220.9 kB -> 128.7 kB, 1.72x
    assert 2 * sum(n) / sum(-(-6 * k // 8) + 128 for k in n) > 2.6
    assert 1.5 < fp16["size_bytes"] / pal6["size_bytes"] < 16 / 6


def test_twin_weights_equal_the_package_weights(decoder_packages):
    """coreml_twin palettizes with coremltools' own k-means: its weights are the package's, bit for bit."""
    module, _, pal6 = decoder_packages
    packaged = coreml.mlpackage_weights(pal6["files"][0])
    twin = coreml.coreml_twin(module, palettize_bits=6)
    checked = 0
    for name, p in twin.module.named_parameters():
        key = name.replace(".", "_") + "_to_fp16_palettized"
        if key in packaged:
            assert np.array_equal(packaged[key], p.detach().numpy()), name
            assert len(np.unique(p.detach().numpy())) <= 64
            checked += 1
    assert checked == sum(1 for m in module.modules() if isinstance(m, nn.Conv2d) and m.weight.numel() > 2048)


def test_twin_parity_and_negative_control():
    """fp16 and 6-bit twins stay above the 35 dB gate; 2-bit palettization falls below it."""
    unet, inputs = _unet(), _unet_inputs(batch=2)
    dec, z = _decoder(), _latent()
    with torch.no_grad():
        ref_u, ref_d = unet(*inputs.values()), dec(z)
        fp16_u = psnr(ref_u, coreml.coreml_twin(unet)(*inputs.values()))
        fp16_d = psnr(ref_d, coreml.coreml_twin(dec)(z))
        pal6 = psnr(ref_d, coreml.coreml_twin(dec, palettize_bits=6)(z))
        pal2 = psnr(ref_d, coreml.coreml_twin(dec, palettize_bits=2)(z))
        fp32 = psnr(ref_u, coreml.coreml_twin(unet, precision="fp32")(*inputs.values()))
    assert fp16_u >= 35 and fp16_d >= 35 and pal6 >= 35, (fp16_u, fp16_d, pal6)  # measured 70.5, 76.1, 50.8
    assert pal2 < 35, pal2  # measured 26.0
    assert fp32 == float("inf")  # fp32, no palettization: the module itself
    assert coreml.coreml_twin(dec).module.conv_in.weight.dtype == torch.float16
    assert dec.conv_in.weight.dtype == torch.float32  # the original is left alone


@pytest.mark.parametrize("attention, size", [("split_einsum", 16), ("original", 16), ("split_einsum_v2", 48)])
def test_ane_layout_equals_the_module(attention, size):
    """v2 at a 48x48 latent: the stage-1 layers' 2304 queries run as chunks of 512, 512, 512, 512, 256."""
    unet, inputs = _unet(), _unet_inputs(batch=2, size=size, mask=True)
    ane = to_ane_layout(unet, attention)
    rewritten = [m for m in ane.modules() if isinstance(m, (ANETransformer2D, ANECrossAttnLayer))]
    originals = [m for m in unet.modules() if isinstance(m, (Transformer2D, CrossAttnLayer))]
    assert len(rewritten) == len(originals) > 0
    assert not any(isinstance(x, nn.Linear) for m in rewritten for x in m.modules())
    assert any(isinstance(m, Transformer2D) for m in unet.modules())  # the original is left alone
    with torch.no_grad():
        ref = unet(*inputs.values())
        assert psnr(ref, ane(*inputs.values())) >= 60
        # negative control: the mask matters, so an implementation ignoring it would fail above
        assert psnr(ref, ane(*list(inputs.values())[:4])) < 60


@pytest.mark.parametrize("pooled", [True, False])  # False: the paper-size presets' UNet (no pooled_embedding)
def test_chunks_compose_to_the_whole_model(pooled):
    unet, inputs = _unet(pooled_conditioning=pooled), _unet_inputs(batch=2, mask=True)
    head, body = coreml.unet_chunks(unet, {k: coreml._example(k, v) for k, v in inputs.items()}, ["velocity"], "Unet")
    assert (head.file, body.file) == ("UnetChunk1.mlpackage", "UnetChunk2.mlpackage")
    assert list(head.inputs) == list(inputs)
    assert head.outputs[:2] == ["hidden", "temb"] and all(o.startswith("skip_") for o in head.outputs[2:])
    with torch.no_grad():
        passed = dict(zip(head.outputs, head.module(*head.inputs.values()), strict=True))
        feed = [passed[n] if n in passed else coreml._example(n, inputs[n]) for n in body.inputs]
        assert psnr(unet(*inputs.values()), body.module(*feed)) >= 60
    split = [sum(p.numel() for p in m.parameters()) for m in (head.module, body.module)]
    assert split[0] > 0 and split[1] > 0
    # a wrapper that changes its inputs before the UNet cannot be chunked blindly: refused
    shifted = UNetSignature(unet.unet)
    shifted.forward = lambda s, t, c, p, m=None: unet.unet(s, t * 0.5, c, p, m, return_dict=False)[0]
    with pytest.raises(SnapgenError, match="dB against the module"):
        coreml.unet_chunks(shifted, {k: coreml._example(k, v) for k, v in inputs.items()}, ["velocity"], "Unet")


def test_swift_resources(unet_package):
    from transformers import CLIPTokenizer

    from snapgen_cli.core.text import build_clip_tokenizer

    entry, res = unet_package[2], unet_package[3]
    assert coreml.swift_resource_path(res, "decoder").name == "VAEDecoder.mlpackage"
    files = coreml.write_swift_resources(res, {"unet": entry}, tokenizer=build_clip_tokenizer(),
                                         sampler={"num_inference_steps": 4, "shift": 3.0})
    assert sorted(p.name for p in files) == ["README.md", "merges.txt", "vocab.json"]
    again = CLIPTokenizer.from_pretrained(res)  # what Swift's BPETokenizer reads: vocab.json + merges.txt
    assert again("a red cube").input_ids == build_clip_tokenizer()("a red cube").input_ids
    readme = (res / "README.md").read_text()
    assert "xcrun coremlcompiler compile" in readme and "`UnetChunk2.mlpackage`: inputs `hidden`" in readme
    assert "`shift`: 3.0" in readme
    with pytest.raises(ConfigError, match="role 'vae'"):
        coreml.swift_resource_path(res, "vae")


def test_export_stage_writes_swift_resources(pipe_dir, tmp_path):  # noqa: F811  (test_export's fixture)
    """`snapgen export --formats coreml` of test_export's tiny pipeline (CLIP with masked padding,
    2-stage UNet, tiny decoder) at 256 px, the UNet in two chunks with the v2 neural-engine
    attention (its 1024 stage-1 queries run in two chunks of 512): every model passes the twin
    gate and the folder is what the Swift package loads."""
    import json

    from snapgen_cli.stages import export as E
    from snapgen_cli.stages.base import StageContext

    out = tmp_path / "export"
    E.run(E.Config(checkpoint=str(pipe_dir), formats=["coreml"], resolution=256, chunks=2, ane_layout=True,
                   attention="split_einsum_v2"), StageContext(out_dir=out))
    names = sorted(p.name for p in (out / "coreml").iterdir())
    assert names == ["README.md", "TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage",
                     "VAEDecoder.mlpackage", "merges.txt", "vocab.json"]
    artefacts = {a["model"]: a for a in json.loads((out / E.RESULT_FILE).read_text())["artefacts"]}
    assert set(artefacts) == {"text.clip_l", "unet", "decoder"}
    for a in artefacts.values():
        assert a["parity"][0]["min_db"] >= 35 and a["chunks"] == (2 if a["model"] == "unet" else 1)
        assert a["export"]["files"] == a["files"] and len(a["structure"]) == len(a["files"])
    unet = artefacts["unet"]
    assert unet["files"] == ["coreml/UnetChunk1.mlpackage", "coreml/UnetChunk2.mlpackage"]
    assert unet["export"]["inputs"][-1]["name"] == "encoder_attention_mask"
    assert "einsum" in unet["structure"][0]["ops"] and "constexpr_lut_to_dense" not in unet["structure"][1]["ops"]


def test_failed_conversion_keeps_the_previous_package(tmp_path):
    class Unconvertible(nn.Module):
        def forward(self, x):
            return torch.linalg.inv(x)

    path = tmp_path / "Model.mlpackage"
    path.mkdir()
    (path / "Manifest.json").write_text("old")
    with pytest.raises(SnapgenError, match="Core ML conversion of Model.mlpackage failed"):
        coreml.export_coreml(Unconvertible(), {"x": torch.eye(3)[None]}, ["y"], path)
    assert (path / "Manifest.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Model.mlpackage"]  # no temp dir left


@pytest.mark.parametrize("kwargs, message", [
    (dict(precision="bf16"), "precision: expected one of fp16, fp32"),
    (dict(palettize_bits=5), "palettize_bits: expected one of 1, 2, 3, 4, 6, 8"),
    (dict(minimum_target="iOS12"), "minimum_target: expected one of"),
    (dict(attention="split_einsum"), "set ane_layout=True"),
    (dict(chunks=3), "chunks: expected 1 or 2"),
])
def test_bad_options_are_config_errors(tmp_path, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        coreml.export_coreml(_decoder(), {"z": _latent()}, ["image"], tmp_path / "D.mlpackage", **kwargs)
    with pytest.raises(ConfigError, match="ending in .mlpackage"):
        coreml.export_coreml(_decoder(), {"z": _latent()}, ["image"], tmp_path / "D.mlmodel")
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(sys.platform != "darwin", reason="Core ML predict() exists only on macOS; elsewhere the "
                    "parity gate runs on the PyTorch twin (coreml_twin) and the program's structure")
def test_predict_matches_the_twin_on_macos(decoder_packages, unet_package):
    import coremltools as ct

    module, fp16, pal6 = decoder_packages
    z = _latent()
    for entry, bits in ((fp16, None), (pal6, 6)):
        model = ct.models.MLModel(entry["files"][0])
        out = model.predict({"z": z.numpy()})["image"]
        with torch.no_grad():
            assert psnr(coreml.coreml_twin(module, palettize_bits=bits)(z), out) >= 35
    unet, inputs, entry, res = unet_package
    feed = {k: v.numpy() for k, v in inputs.items()}
    for chunk in entry["chunks"]:  # what Swift's Unet does: each chunk gets the original inputs + the last outputs
        model = ct.models.MLModel(str(res / chunk["file"]))
        feed |= model.predict({x["name"]: feed[x["name"]] for x in chunk["inputs"]})
    with torch.no_grad():
        twin = coreml.coreml_twin(to_ane_layout(unet, "split_einsum"))
        assert psnr(twin(*inputs.values()), feed["velocity"]) >= 35


@pytest.mark.slow
def test_palettized_unet_matches_its_twin(tmp_path):
    """The whole UNet (one package, GPU attention) at 6 bits: every palettized weight is the twin's,
    with <= 64 values, and the twin stays above the gate."""
    module, inputs = _unet(**TWO_STAGE), _unet_inputs()
    entry = coreml.export_coreml(module, inputs, ["velocity"], tmp_path / "Unet.mlpackage", palettize_bits=6)
    info = coreml.inspect_mlpackage(entry["files"][0])
    palettized = [w for w in info["weights"] if w["palettized"]]
    assert len(palettized) >= 60 and all(w["bits"] == 6 and w["unique_values"] <= 64 for w in palettized)
    twin = coreml.coreml_twin(module, palettize_bits=6)
    packaged = coreml.mlpackage_weights(entry["files"][0])
    # compared as sets of fp16 tensors: MIL names are the torch names with "_" for ".", which can
    # collide (mid.res.* and mid_res.*) and then get a suffix
    palettized_values = [v for k, v in packaged.items() if "_palettized" in k]
    assert len(palettized_values) == len(palettized)
    assert _fp16_bytes(palettized_values) <= _fp16_bytes(p.detach().numpy() for p in twin.module.parameters())
    with torch.no_grad():
        assert psnr(module(*inputs.values()), twin(*inputs.values())) >= 35
