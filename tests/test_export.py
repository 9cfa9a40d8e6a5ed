"""``snapgen export`` (issue 15): wrappers, ONNX export with the parity gate, export.json,
generation on ONNX Runtime, bench-device on the artefacts, the run report.

A tiny demo-like pipeline (tiny SnapGen UNet, tiny decoder, one tiny random CLIP with the real
tokenizer and masked padding, so the UNet takes the attention mask; a 4-step sampler with CFG
2.0, as the demo's step-distilled model) is built and exported once to ONNX (fp32 + fp16).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapgen_cli.core.decoder import build_decoder, latents_to_images
from snapgen_cli.core.denoiser import denoise
from snapgen_cli.core.flow import RectifiedFlow
from snapgen_cli.core.pipeline import SnapGenPipeline, load_pipeline
from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip
from snapgen_cli.core.unet import build_unet
from snapgen_cli.export import onnx as ox
from snapgen_cli.export.parity import psnr
from snapgen_cli.export.wrappers import decoder_exportable, text_exportables, unet_exportable
from snapgen_cli.stages import export as E
from snapgen_cli.stages.base import StageContext

RES = 64


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("export-pipe")
    make_tiny_clip(root / "clip", hidden_size=32, num_layers=1)
    torch.manual_seed(0)
    # two stages (the demo's tiny preset has three): half the graph, half the export time
    unet = build_unet("tiny", block_channels=(16, 32), transformer_depth=(0, 1), self_attention=(False, True),
                      attention_head_dim=16, context_dim=32, pooled_dim=32, in_channels=4, out_channels=4)
    clip = EncoderSpec(name="clip_l", kind="clip", path=str(root / "clip"), max_length=16, layer="penultimate",
                       role="channel", pooled="projection", padding="mask")
    SnapGenPipeline(unet=unet, scheduler=RectifiedFlow(shift=1.0).scheduler(1), text_encoder=TextEncoderStack([clip]),
                    decoder=build_decoder("tiny", latent_channels=4), resolution=RES,
                    latent=dict(channels=4, downsample=8),
                    sampler=dict(num_inference_steps=4, guidance_scale=2.0)).save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(scope="module")
def exported(pipe_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("export") / "export"
    return out, E.run(E.Config(checkpoint=str(pipe_dir), formats=["onnx"]), StageContext(out_dir=out))


def _manifest(out: Path) -> dict:
    return json.loads((out / E.RESULT_FILE).read_text(), parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))


def _one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------ wrappers


def test_wrappers_compute_what_the_pipeline_computes(pipe_dir):
    from snapgen_cli.core.blocks import rope_2d

    pipe = load_pipeline(pipe_dir)
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([900.0, 250.0])
    ctx, pooled = torch.randn(2, 16, 32, generator=g), torch.randn(2, 32, generator=g)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 6:] = False
    with torch.no_grad():
        ref = denoise(pipe.unet, x, t, (ctx, pooled, mask))[0]  # before the wrapper installs its RoPE tables
        unet = unet_exportable(pipe, RES)
        out = unet.module(x, t, ctx, pooled, mask.float())
        unmasked = unet.module(x, t, ctx, pooled, torch.ones(2, 16))
    assert unet.input_names[-1] == "encoder_attention_mask"
    assert psnr(ref, out) >= 60.0
    assert psnr(ref, unmasked) < 60.0  # negative control: the mask input is really used
    tables = [n[:-4] for n, _ in unet.module.named_buffers() if n.endswith("_cos")]
    assert tables
    for h, w in [(2, 2), (1, 2), (2, 1)]:  # the lowest stage of an 8x8 latent is 2x2; slices of smaller ones
        sliced = unet.module._rope_slice(tables[0], h, w)
        exact = rope_2d(h, w, 16, 10000.0)
        assert all(torch.equal(a, b) for a, b in zip(sliced, exact, strict=True))

    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        assert psnr(latents_to_images(pipe.decoder, z), decoder_exportable(pipe).module(z)) >= 60.0
    text = text_exportables(pipe)[0]
    ids, attn = text.make_inputs(2, RES, 0)  # the gate's prompts 0 and 1: a sentence and the empty prompt
    with torch.no_grad():
        tokens, m, pooled_out = text.module(ids, attn)
    assert text.output_names == ["tokens", "mask", "pooled"] and attn[1].sum() < attn[0].sum()
    feats = pipe.text_encoder.encode(["a photo of a red circle left of a blue square", ""])
    assert psnr(feats["clip_l.tokens"], tokens) >= 60.0 and psnr(feats["clip_l.pooled"], pooled_out) >= 60.0
    assert torch.equal(feats["clip_l.mask"], m > 0.5)


# ----------------------------------------------------------------------------- ONNX and the gate


def test_onnx_parity_at_two_input_sizes_and_fp16(exported, pipe_dir):
    out, summary = exported
    m = _manifest(out)
    arts = {(a["model"], a["precision"]): a for a in m["artefacts"]}
    assert set(arts) == {(n, p) for n in ("text.clip_l", "unet", "decoder") for p in ("fp32", "fp16")}
    unet = arts[("unet", "fp32")]
    # the gate ran at the export size (the CFG batch 2) and at half the resolution with another batch
    assert [p["where"] for p in unet["parity"]] == ["batch 2, 64px", "batch 3, 32px"]
    for (model, precision), a in arts.items():
        floor = 60.0 if precision == "fp32" else 35.0
        assert all(p["min_db"] >= floor and p["threshold_db"] == floor for p in a["parity"]), (model, a["parity"])
    # dynamic axes: batch and latent size are symbolic in the graph
    sample = next(i for i in unet["inputs"] if i["name"] == "sample")
    assert isinstance(sample["shape"][0], str) and isinstance(sample["shape"][2], str) and sample["shape"][1] == 4
    # and one more size the gate did not use, straight from the file
    item = unet_exportable(load_pipeline(pipe_dir), RES)
    inputs = item.inputs(1, 32, seed=11)
    got = ox.run(ox.session(out / unet["path"]), inputs)[0]
    assert got.shape == (1, 4, 4, 4) and psnr(item.reference(inputs)[0], got) >= 60.0
    assert arts[("unet", "fp16")]["size_bytes"] < 0.65 * unet["size_bytes"]
    assert summary["artefacts"] and all(a["parity_min_db"] >= a["threshold_db"] for a in summary["artefacts"])


def test_manifest_holds_what_a_runtime_needs(exported):
    out, _ = exported
    m = _manifest(out)
    assert m["pipeline"]["resolution"] == RES and m["pipeline"]["size_multiple"] == 16
    assert m["pipeline"]["latent"]["channels"] == 4
    s = m["sampler"]
    assert (s["steps"], s["guidance"], s["cfg"], s["objective"], s["shift"]) == (4, 2.0, True, "flow", 1.0)
    assert s["sigmas"] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert s["timesteps"] == pytest.approx([1000.0, 750.0, 500.0, 250.0])
    assert (out / s["scheduler"] / "scheduler_config.json").is_file()
    enc = m["text"]["encoders"][0]
    assert (enc["name"], enc["max_length"], enc["padding"], enc["width"], enc["pooled_width"]) == \
        ("clip_l", 16, "mask", 32, 32)
    from transformers import AutoTokenizer

    assert len(AutoTokenizer.from_pretrained(out / enc["tokenizer"])("a red circle").input_ids) == 5
    assert m["text"]["layout"]["seq_len"] == 16 and m["text"]["layout"]["pooled_dim"] == 32
    for a in m["artefacts"]:
        files = [out / f for f in a["files"]]
        assert all(f.is_file() for f in files) and a["size_bytes"] == sum(f.stat().st_size for f in files)
        assert a["opset"] >= 18 and a["inputs"] and a["outputs"] and a["palettize_bits"] is None
    dec = next(a for a in m["artefacts"] if a["model"] == "decoder")
    assert [o["name"] for o in dec["outputs"]] == ["image"] and dec["example_shapes"]["latents"] == [1, 4, 8, 8]
    assert not list(out.glob(".export-*"))  # the temporary build folder is gone


def test_negative_control_one_perturbed_weight_fails_the_gate(exported, pipe_dir, tmp_path, run_cli, monkeypatch):
    import onnx
    from onnx import numpy_helper

    out, _ = exported
    target = tmp_path / "export"
    shutil.copytree(out, target)
    before = (target / E.RESULT_FILE).read_bytes()
    original = ox.export_onnx

    def perturbed(item, path, *args, **kwargs):
        original(item, path, *args, **kwargs)
        model = onnx.load(path)
        w = next(t for t in model.graph.initializer if t.name.endswith("conv_out.weight"))
        arr = numpy_helper.to_array(w).copy()
        arr.flat[0] += 0.5  # one weight of the decoder's last conv
        w.CopyFrom(numpy_helper.from_array(arr, w.name))
        onnx.save(model, path)

    monkeypatch.setattr(ox, "export_onnx", perturbed)
    code, stdout, err = run_cli("export", "--checkpoint", pipe_dir, "--components", "decoder", "--formats", "onnx",
                                "--out", target)
    assert code == 1 and stdout == ""
    line = _one_error_line(err)
    assert "parity gate: decoder (onnx fp32, batch 1, 64px) output 'image' is" in line
    assert "below the 60 dB threshold" in line
    db = float(line.split("output 'image' is ")[1].split(" dB")[0])
    assert db < 60.0
    assert (target / E.RESULT_FILE).read_bytes() == before  # the earlier export is intact
    assert not list(target.glob(".export-*")) and (target / "onnx" / "unet.onnx").is_file()


# ------------------------------------------------------------------------ ONNX Runtime generation


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)


def test_generate_on_onnxruntime_reproduces_the_pytorch_images(exported, pipe_dir, tmp_path, run_cli):
    out, _ = exported
    prompts = ["a photo of a red circle", "a blue square"]
    runs = {}
    for name, extra in (("torch", ["--checkpoint", pipe_dir]),
                        ("ort", ["--checkpoint", out, "--backend", "onnxruntime"]),
                        ("ort16", ["--checkpoint", out, "--backend", "onnxruntime", "--onnx-precision", "fp16"])):
        code, _, err = run_cli("generate", *prompts, *extra, "--out", tmp_path / name, "--no-grid")
        assert code == 0, err[-2000:]
        runs[name] = [_png(tmp_path / name / f"{i:05d}.png") for i in range(2)]
    for i in range(2):
        ref = runs["torch"][i]
        assert ref.shape == (RES, RES, 3)
        assert psnr(ref, runs["ort"][i]) >= 60.0
        assert psnr(ref, runs["ort16"][i]) >= 35.0
        assert psnr(ref, runs["ort"][1 - i]) < 35.0  # negative control: the other prompt and seed is another image


def test_bad_inputs_are_one_line_exit_2(pipe_dir, exported, tmp_path, run_cli):
    out, _ = exported
    cases = [
        (["export", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "x"], "no model_index.json"),
        (["export", "--checkpoint", pipe_dir, "--resolution", 72, "--out", tmp_path / "x"],
         "resolution: expected a multiple of 16 for this pipeline"),
        (["export", "--checkpoint", pipe_dir, "--parity-resolutions", 40, "--out", tmp_path / "x"],
         "parity_resolutions: 40 is not a positive multiple of 16"),
        (["export", "--checkpoint", pipe_dir, "--palettize-bits", 5, "--out", tmp_path / "x"],
         "--palettize-bits: expected 4, 6 or 8"),
        (["generate", "a cat", "--checkpoint", pipe_dir, "--backend", "onnxruntime", "--out", tmp_path / "x"],
         "no export.json"),
        (["generate", "a cat", "--checkpoint", out, "--backend", "onnxruntime", "--size", 128, "--out", tmp_path / "x"],
         "--size: the exported models take multiples of 16 up to the export resolution 64"),
    ]
    for args, needle in cases:
        code, stdout, err = run_cli(*args)
        assert code == 2 and stdout == "", (args, err[-1500:])
        assert needle in _one_error_line(err), err
    assert not (tmp_path / "x" / E.RESULT_FILE).exists()


# ---------------------------------------------------------------------- bench-device, run report


def test_bench_device_times_onnxruntime_next_to_pytorch_and_lists_sizes(exported, tmp_path, run_cli):
    out, _ = exported
    code, stdout, err = run_cli("bench-device", "--export-dir", out, "--runs", 2, "--warmup", 0, "--out", tmp_path,
                                "--json")
    assert code == 0, err[-2000:]
    r = json.loads(stdout)
    got = {(x["model"], x["runtime"], x["precision"]): x for x in r["latency"]}
    assert set(got) == {(m, rt, p) for m in ("unet", "decoder")
                        for rt, p in (("pytorch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "fp16"))}
    assert got[("unet", "onnxruntime", "fp32")]["batch"] == 2 and got[("decoder", "pytorch", "fp32")]["batch"] == 1
    assert all(x["latency_ms_median"] > 0 for x in r["latency"])
    assert got[("unet", "pytorch", "fp32")]["paper_device_ms"] == 274.0
    sizes = {(x["model"], x["precision"]): x for x in r["sizes"]}
    assert sizes[("unet", "fp16")]["paper_implied_bytes"] == pytest.approx(379e6 * 2)
    assert sizes[("decoder", "fp32")]["paper_implied_bytes"] == pytest.approx(1.38e6 * 4)
    assert sizes[("unet", "fp32")]["predicted_vs_fp16"] == 2.0 and 1.5 < sizes[("unet", "fp32")]["size_vs_fp16"] < 2.1
    assert json.loads((tmp_path / "bench.json").read_text()) == r


def test_run_report_lists_the_artefacts_with_parity_and_sizes(exported, tmp_path):
    from snapgen_cli.report import write_run_report

    _, summary = exported
    report = write_run_report(tmp_path, "demo", [dict(stage="export", kind="export", wall_s=1.0, summary=summary)], {})
    assert report["export"]["export"]["artefacts"] == summary["artefacts"]
    md = (tmp_path / "report.md").read_text()
    assert "## Exported models" in md
    unet = next(a for a in summary["artefacts"] if (a["model"], a["precision"]) == ("unet", "fp32"))
    row = f"| export | unet | onnx | fp32 | {unet['size_bytes'] / 2**20:.2f} | {unet['parity_min_db']:.1f} | 60 |"
    assert row in md
