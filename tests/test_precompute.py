"""``snapgen precompute`` (sec. 4, sup. H): images + captions -> latent / text shards.

Tiny AutoencoderKL (16 latent channels, f = 8) and a tiny CLIP text encoder built from
configs with random weights; tiny images; every test a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from snapgen_cli.core.text import EncoderSpec, TextEncoderStack, make_tiny_clip
from snapgen_cli.data import images as im
from snapgen_cli.data.shards import ClassText, ShardDataset, encoder_features, read_manifest
from snapgen_cli.data.sources import FolderSource, HFSource, WebDatasetSource, detect_kind
from snapgen_cli.errors import ConfigError, SnapgenError
from snapgen_cli.stages import precompute as pc
from snapgen_cli.stages.base import StageContext

RNG = np.random.default_rng(0)


def _rgb(h: int, w: int) -> Image.Image:
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _enc(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def _png_header_only(width: int, height: int, depth: int = 8, color: int = 2) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height`` (a decompression bomb needs no pixels)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _rgb16_png(h: int, w: int) -> bytes:
    arr = RNG.integers(0, 65536, (h, w, 3), dtype=np.uint16)
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    data = _png_header_only(w, h, depth=16)
    head, tail = data.split(b"IDAT")[0][:-4], data[data.index(b"IEND") - 4:]
    chunk = struct.pack(">I", len(comp := zlib.compress(raw))) + b"IDAT" + comp + struct.pack(
        ">I", zlib.crc32(b"IDAT" + comp) & 0xFFFFFFFF)
    return head + chunk + tail


BAD_IMAGES = {  # file name -> (bytes, reason)
    "bad_corrupt.png": (b"this is not an image at all" * 10, "corrupt"),
    "bad_trunc.jpg": (_enc(_rgb(64, 64), "JPEG")[:-600], "truncated"),
    "bad_trunc.png": (_enc(_rgb(64, 64))[:1500], "truncated"),
    "bad_zero.png": (b"", "zero_byte"),
    "bad_cmyk.jpg": (_enc(_rgb(64, 64).convert("CMYK"), "JPEG"), "cmyk"),
    "bad_gray16.png": (_enc(Image.fromarray(RNG.integers(0, 65535, (64, 64), dtype=np.uint16))), "16bit"),
    "bad_rgb16.png": (_rgb16_png(64, 64), "16bit"),
    "bad_bomb.png": (_png_header_only(200_000, 200_000), "huge"),
    "bad_small.png": (_enc(_rgb(20, 64)), "too_small"),
}


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory) -> Path:
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=16, norm_num_groups=8,
                        scaling_factor=1.5305, shift_factor=0.0609, mid_block_add_attention=False)
    path = tmp_path_factory.mktemp("vae") / "sd3-like"
    vae.save_pretrained(path / "vae")  # nested like the hub repo: exercises --vae-subfolder
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> list[EncoderSpec]:
    path = tmp_path_factory.mktemp("clip") / "clip"
    make_tiny_clip(path)
    return [EncoderSpec(name="clip_l", kind="clip", path=str(path), max_length=16, layer="penultimate",
                        role="channel", pooled="projection")]


@pytest.fixture(scope="module")
def clip_stack(tiny_clip) -> TextEncoderStack:
    return TextEncoderStack(tiny_clip)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """8 good images (metadata captions, side-file captions, an empty and a missing caption,
    a too-long one, a palette image), plus every kind of bad image."""
    root = tmp_path_factory.mktemp("folder")
    (root / "sub").mkdir()
    meta = []
    for i in range(6):
        _rgb(48 + 8 * i, 40 + 4 * i).save(root / f"good_{i}.png")
        meta.append({"file_name": f"good_{i}.png", "text": f"  a photo number {i}  "})
    meta[4]["text"] = ""
    meta[5]["text"] = " ".join(["very long caption"] * 20)
    _rgb(40, 56).convert("P").save(root / "sub" / "palette.png")
    (root / "sub" / "palette.txt").write_text("a palette image\n")
    _rgb(64, 40).save(root / "sub" / "uncaptioned.jpg", quality=95)
    for name, (data, _) in BAD_IMAGES.items():
        (root / name).write_bytes(data)
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(m) for m in meta) + "\n")
    return root


def _cfg(source, vae: Path, **kw) -> pc.Config:
    return pc.Config(source=str(source), vae=str(vae), **{"resolutions": [32], "encoders": [], "shard_size": 4,
                                                        "batch_size": 3, "num_workers": 2, **kw})


def _run(cfg: pc.Config, out: Path) -> dict:
    return pc.run(cfg, StageContext(out_dir=out, seed=0))


def _all(out: Path) -> dict:
    """Every sample of a precompute output, stacked (keys as a list)."""
    ds = ShardDataset(out)
    items = [ds[i] for i in range(len(ds))]
    return {k: [it[k] for it in items] if isinstance(items[0][k], str) else torch.stack([it[k] for it in items])
            for k in items[0]} if items else {}


# --- images -------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
def test_open_image_skips_bad_image_with_its_reason(name):
    data, reason = BAD_IMAGES[name]
    with pytest.raises(im.ImageSkipped) as exc:
        im.open_image(data, min_side=32)
    assert exc.value.reason == reason


def test_open_image_max_pixels_is_configurable_and_conversions_are_counted():
    with pytest.raises(im.ImageSkipped, match="huge"):
        im.open_image(_enc(_rgb(64, 64)), max_pixels=64 * 63)
    stats = im.ImageStats()
    pal = im.open_image(_enc(_rgb(8, 8).convert("P")), stats=stats)
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    composited = im.open_image(_enc(rgba), stats=stats)
    gray = im.open_image(_enc(_rgb(8, 8).convert("L")), stats=stats)
    assert pal.mode == composited.mode == gray.mode == "RGB"
    assert composited.getpixel((1, 1)) == (255, 255, 255) and composited.getpixel((0, 0)) == (10, 20, 30)
    assert stats.converted == {"palette": 1, "alpha": 1, "grayscale": 1} and not stats.skipped


def test_an_animated_image_is_its_first_frame_and_counted_as_converted():
    frames = [Image.new("RGB", (16, 16), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    stats = im.ImageStats()
    img = im.open_image(buf.getvalue(), stats=stats)
    assert stats.converted["animated"] == 1 and not stats.skipped
    assert np.abs(np.asarray(img, dtype=int) - (200, 10, 10)).max() <= 8  # the first frame


def test_resize_crop_center_random_and_tensor_range():
    img = _rgb(80, 40)  # h=80, w=40 -> resized 64 x 32 for size 32
    view, crop = im.resize_crop(img, 32, crop="center")
    assert view.size == (32, 32) and (crop.top, crop.left, crop.original) == (16, 0, (80, 40))
    crops = {im.resize_crop(img, 32, crop="random", rng=im.sample_rng(7, i))[1].top for i in range(20)}
    assert len(crops) > 3 and all(0 <= t <= 32 for t in crops)
    assert im.resize_crop(img, 32, crop="random", rng=im.sample_rng(7, 3))[1] == \
        im.resize_crop(img, 32, crop="random", rng=im.sample_rng(7, 3))[1]
    t = im.to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], dtype=np.uint8)))
    assert t.shape == (3, 1, 1) and t.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1], abs=1e-6)


# --- sources ------------------------------------------------------------------------------------


def test_folder_source_order_captions_and_detection(folder):
    src = FolderSource(folder)
    samples = list(src.iter_range())
    keys = [s.key for s in samples]
    assert keys == sorted(keys) and [s.index for s in samples] == list(range(len(samples)))
    by_key = {s.key: s for s in samples}
    assert by_key["good_0"].caption == "a photo number 0"
    assert by_key["good_4"].caption == "" and by_key["sub/uncaptioned"].caption is None
    assert by_key["sub/palette"].caption == "a palette image"
    assert [s.key for s in src.iter_range(3, 5)] == keys[3:5]
    assert detect_kind(str(folder)) == "folder" and detect_kind("laion/some-dataset") == "hf"
    assert FolderSource(folder, max_samples=4).num_samples == 4


def test_hf_source_bad_column_is_a_config_error(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"image": [_enc(_rgb(8, 8))], "text": ["x"]},
                               features=datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
                               ).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(ConfigError, match="caption_column: column 'caption' is not in .*--caption-column"):
        HFSource(str(tmp_path / "ds"), caption_column="caption")


# --- end to end ---------------------------------------------------------------------------------


def test_folder_precompute_skips_counts_shapes_and_golden_latents(folder, tiny_vae, tiny_clip, clip_stack, tmp_path):
    cfg = _cfg(folder, tiny_vae, resolutions=[32, 64], min_side=32, encoders=tiny_clip)
    summary = _run(cfg, tmp_path / "out")
    man = read_manifest(tmp_path / "out")
    expected_skips = {}
    for _, reason in BAD_IMAGES.values():
        expected_skips[reason] = expected_skips.get(reason, 0) + 1
    assert summary["skipped"] == man["skipped"] == expected_skips
    listed = [json.loads(line) for line in (tmp_path / "out" / man["skipped_list"]).read_text().splitlines()]
    assert sorted((s["key"], s["reason"]) for s in listed) == sorted(
        (Path(name).stem, reason) for name, (_, reason) in BAD_IMAGES.items())  # which files, and why
    assert [s["index"] for s in listed] == sorted(s["index"] for s in listed)
    assert man["converted"] == {"palette": 1}
    assert man["captions"] == {"empty": 1, "missing": 1, "truncated": 1}
    assert summary["num_samples"] == man["num_samples"] == 8 and man["source_samples"] == 8 + len(BAD_IMAGES)
    assert man["latent"]["channels"] == 16 and man["latent"]["downsample"] == 8 and man["latent"]["subfolder"] == "vae"
    assert all(len(s["sha256"]) == 64 for s in man["shards"])

    data = _all(tmp_path / "out")
    assert data["latents.32"].shape == (8, 16, 4, 4) and data["latents.64"].shape == (8, 16, 8, 8)
    assert data["latents.32"].dtype == torch.float16
    assert data["clip_l.tokens"].shape[:2] == (8, 16) and data["clip_l.mask"].dtype == torch.bool
    assert data["key"] == sorted(data["key"]) and "good_0" in data["key"]
    # Golden: latents equal the AE's posterior mean of the centre crop, SD3-normalised.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae")
    i = data["key"].index("good_3")
    pixels = im.to_tensor(im.resize_crop(Image.open(folder / "good_3.png").convert("RGB"), 64)[0])[None]
    with torch.no_grad():
        ref = (vae.encode(pixels).latent_dist.mean - 0.0609) * 1.5305
    torch.testing.assert_close(data["latents.64"][i].float(), ref[0], atol=2e-3, rtol=2e-3)
    i = data["key"].index("good_1")
    ref_text = clip_stack.encode(["a photo number 1"])
    torch.testing.assert_close(data["clip_l.tokens"][i].float(), ref_text["clip_l.tokens"][0], atol=2e-3, rtol=2e-3)
    assert data["caption"][i] == "a photo number 1"


def test_teacher_encoders_are_shared_when_identical_and_prefixed_otherwise(folder, tiny_vae, tiny_clip, tmp_path):
    other = tiny_clip[0].model_copy(update={"name": "clip_g", "layer": "last"})
    cfg = _cfg(folder, tiny_vae, encoders=tiny_clip, teacher_encoders=[tiny_clip[0], other], max_samples=11)
    _run(cfg, tmp_path / "out")
    man = read_manifest(tmp_path / "out")
    assert man["encoders"]["student"] == [["clip_l", "clip_l"]]
    assert man["encoders"]["teacher"] == [["clip_l", "clip_l"], ["clip_g", "teacher_clip_g"]]  # spec order kept
    item = ShardDataset(tmp_path / "out")[0]
    assert {k for k in item if k.endswith(".tokens")} == {"clip_l.tokens", "teacher_clip_g.tokens"}
    nbytes = lambda prefix: sum(v.numel() * v.element_size() for k, v in item.items()  # noqa: E731
                                if isinstance(v, torch.Tensor) and k.startswith(prefix))
    size = man["bytes_per_sample"]  # what the teacher's own features cost, reported apart
    assert size["teacher_text"] == nbytes("teacher_clip_g.") > 0 and size["student_text"] == nbytes("clip_l.")
    assert size["latents"] == nbytes("latents.") and size["total"] == sum(v for k, v in size.items() if k != "total")
    teacher = encoder_features(item, man, "teacher")
    assert set(teacher) == {f"{n}.{p}" for n in ("clip_l", "clip_g") for p in ("tokens", "pooled", "mask")}
    assert torch.equal(teacher["clip_g.tokens"], item["teacher_clip_g.tokens"])
    assert not torch.allclose(teacher["clip_g.tokens"], teacher["clip_l.tokens"])  # last vs penultimate layer


def test_fp32_storage_and_latent_sampling_are_options(folder, tiny_vae, tmp_path):
    cfg = _cfg(folder, tiny_vae, dtype="fp32", max_samples=11)  # the first 9 (sorted) are bad
    _run(cfg, tmp_path / "mean")
    _run(cfg.model_copy(update={"latent": "sample"}), tmp_path / "sample")
    mean, sample = _all(tmp_path / "mean")["latents.32"], _all(tmp_path / "sample")["latents.32"]
    assert mean.dtype == torch.float32 and not torch.equal(mean, sample)
    _run(cfg.model_copy(update={"latent": "sample"}), tmp_path / "sample2")
    assert torch.equal(sample, _all(tmp_path / "sample2")["latents.32"])  # seeded per sample


def _imagenet_like(tmp_path: Path) -> Path:
    import datasets

    names = ["tench, Tinca tinca", "goldfish, Carassius auratus", "great white shark"]
    feats = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    ds = datasets.Dataset.from_dict({"image": [_enc(_rgb(40, 48)) for _ in range(7)] + [b"broken"],
                                     "label": [0, 1, 2, 1, 0, 2, 1, 0]}, features=feats)
    ds.save_to_disk(str(tmp_path / "imagenet"))
    return tmp_path / "imagenet"


def test_hf_classlabel_synonyms_and_class_text(tmp_path, tiny_vae, tiny_clip, clip_stack):
    src = _imagenet_like(tmp_path)
    cfg = _cfg(src, tiny_vae, caption_column=None, label_column="label", encoders=tiny_clip)
    summary = _run(cfg, tmp_path / "out")
    man = read_manifest(tmp_path / "out")
    assert summary["skipped"] == {"corrupt": 1} and man["num_samples"] == 7
    assert man["classes"]["names"] == [["tench", "Tinca tinca"], ["goldfish", "Carassius auratus"],
                                       ["great white shark"]]
    data = _all(tmp_path / "out")
    assert data["label"].tolist() == [0, 1, 2, 1, 0, 2, 1] and "clip_l.tokens" not in data and "caption" not in data
    table = ClassText(tmp_path / "out")
    prompts = {p: clip_stack.encode([p])["clip_l.pooled"][0]
               for p in ("a photo of goldfish", "a photo of Carassius auratus", "a photo of great white shark")}
    g = torch.Generator().manual_seed(0)
    picked = [table.sample(torch.tensor([1, 2]), generator=g)["clip_l.pooled"].float() for _ in range(12)]
    seen = set()
    for p in picked:
        torch.testing.assert_close(p[1], prompts["a photo of great white shark"], atol=2e-3, rtol=2e-3)
        seen |= {n for n in ("a photo of goldfish", "a photo of Carassius auratus")
                 if torch.allclose(p[0], prompts[n], atol=2e-3, rtol=2e-3)}
    assert len(seen) == 2  # both synonyms of class 1 get drawn

    # Streaming the same dataset gives the same shards.
    _run(cfg.model_copy(update={"streaming": True, "encoders": []}), tmp_path / "streamed")
    streamed = _all(tmp_path / "streamed")
    assert torch.equal(streamed["latents.32"], data["latents.32"]) and streamed["key"] == data["key"]


def test_webdataset_source(tmp_path, tiny_vae):
    import webdataset as wds

    (tmp_path / "wds").mkdir()
    for t in range(2):
        with wds.TarWriter(str(tmp_path / "wds" / f"part-{t}.tar")) as sink:
            for i in range(3):
                rec = {"__key__": f"s{i}", "png": _enc(_rgb(36, 40))}
                rec.update({"txt": f"tar {t} sample {i}"} if i else {"json": {"text": f"json caption {t}"}})
                sink.write(rec)
    assert detect_kind(str(tmp_path / "wds")) == "webdataset"
    src = WebDatasetSource(str(tmp_path / "wds"))
    assert [s.key for s in src.iter_range(2, 4)] == ["part-0/s2", "part-1/s0"]
    _run(_cfg(tmp_path / "wds", tiny_vae, shard_size=4), tmp_path / "out")
    data = _all(tmp_path / "out")
    assert data["key"] == [f"part-{t}/s{i}" for t in range(2) for i in range(3)]
    assert data["caption"][0] == "json caption 0" and data["caption"][4] == "tar 1 sample 1"
    assert read_manifest(tmp_path / "out")["num_shards"] == 2


# --- resume, checksums, config guards -------------------------------------------------------------

_CHILD = """
import sys, time
from pathlib import Path
from snapgen_cli.data import shards
from snapgen_cli.stages import precompute
from snapgen_cli.stages.base import StageContext

real = shards.write_shard
def write_then_hang(out_dir, shard_id, *args, **kwargs):  # freeze after shard 1, then get SIGKILLed
    record = real(out_dir, shard_id, *args, **kwargs)
    if shard_id == 1:
        print("shard 1 written", flush=True)
        time.sleep(600)
    return record
shards.write_shard = write_then_hang
precompute.run(precompute.Config.model_validate_json(sys.argv[1]), StageContext(out_dir=Path(sys.argv[2]), seed=0))
"""


def _eleven_images(root: Path) -> Path:
    root.mkdir()
    for i in range(11):
        _rgb(40 + 3 * i, 48).save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(f"caption {i}")
    return root


def _resume_and_compare(cfg: pc.Config, crashed: Path, clean: Path) -> None:
    """Resume ``crashed`` (2 shards done, shard 2 half written) and compare with a clean run."""
    assert sorted(p.name for p in crashed.glob("shard-*.json")) == ["shard-00000.json", "shard-00001.json"]
    assert not (crashed / "manifest.json").exists()
    (crashed / ".shard-00002.safetensors.tmp123").write_bytes(b"partial")  # a write cut short
    (crashed / "shard-00002.safetensors").write_bytes(b"half a shard")  # a shard without its record
    _run(cfg, crashed)
    _run(cfg, clean)
    resumed, ref = _all(crashed), _all(clean)
    assert resumed["key"] == ref["key"] == [f"{i:02d}" for i in range(11)]
    for k, v in ref.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(resumed[k], v), k
    assert read_manifest(crashed)["num_samples"] == 11 and not list(crashed.glob(".shard-*"))
    # Byte for byte: the shard files (and their records, which hold their sha256) of both runs.
    files = sorted(p.name for p in clean.glob("shard-*"))
    assert files == sorted(p.name for p in crashed.glob("shard-*")) and len(files) == 8
    for name in files:
        assert (crashed / name).read_bytes() == (clean / name).read_bytes(), name


def test_crashed_run_resumes_to_exactly_the_uninterrupted_result(tiny_vae, tmp_path, monkeypatch):
    from snapgen_cli.data import shards

    cfg = _cfg(_eleven_images(tmp_path / "src"), tiny_vae, crop="random", shard_size=3)
    real = shards.write_shard

    def write_then_crash(out_dir, shard_id, *args, **kwargs):
        if shard_id == 2:
            raise RuntimeError("crash")
        return real(out_dir, shard_id, *args, **kwargs)

    monkeypatch.setattr(shards, "write_shard", write_then_crash)
    with pytest.raises(RuntimeError, match="crash"):
        _run(cfg, tmp_path / "crashed")
    monkeypatch.undo()
    _resume_and_compare(cfg, tmp_path / "crashed", tmp_path / "clean")


@pytest.mark.slow
def test_sigkilled_run_resumes_to_exactly_the_uninterrupted_result(tiny_vae, tmp_path):
    cfg = _cfg(_eleven_images(tmp_path / "src"), tiny_vae, crop="random", shard_size=3)
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same kernels as this process
    child = subprocess.Popen([sys.executable, "-c", _CHILD, cfg.model_dump_json(), str(killed)],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    try:
        assert child.stdout.readline().strip() == b"shard 1 written"
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        child.kill()
    _resume_and_compare(cfg, killed, tmp_path / "clean")


_LAUNCHED = """
import sys
from pathlib import Path
from snapgen_cli.stages import precompute
from snapgen_cli.stages.base import StageContext
precompute.run(precompute.Config.model_validate_json(sys.argv[1]), StageContext(out_dir=Path(sys.argv[2]), seed=0))
from accelerate import PartialState
state = PartialState()  # one file per rank: two processes sharing a stdout pipe may interleave their lines
(Path(sys.argv[2]) / f"rank{state.process_index}.txt").write_text(f"rank {state.process_index} of {state.num_processes}")
"""


@pytest.mark.slow
def test_accelerate_launch_two_processes_split_shards_and_match_one_process(tiny_vae, tmp_path, accelerate_launch):
    cfg = _cfg(_eleven_images(tmp_path / "src"), tiny_vae, crop="random", shard_size=2)
    (tmp_path / "job.py").write_text(_LAUNCHED)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    subprocess.run([*accelerate_launch, str(tmp_path / "job.py"), cfg.model_dump_json(), str(tmp_path / "two")],
                   check=True, env=env, capture_output=True, text=True, timeout=240)
    assert [(tmp_path / "two" / f"rank{r}.txt").read_text() for r in (0, 1)] == ["rank 0 of 2", "rank 1 of 2"]
    _run(cfg, tmp_path / "one")
    two, one = _all(tmp_path / "two"), _all(tmp_path / "one")
    assert two["key"] == one["key"] and torch.equal(two["latents.32"], one["latents.32"])
    assert read_manifest(tmp_path / "two")["num_shards"] == 6


def test_corrupt_or_missing_shard_is_a_clear_error_and_a_rerun_repairs_it(folder, tiny_vae, tmp_path):
    cfg = _cfg(folder, tiny_vae)
    out = tmp_path / "out"
    _run(cfg, out)
    before = _all(out)
    assert [s["num_samples"] for s in read_manifest(out)["shards"]] == [0, 0, 3, 4, 1]  # 9 bad images first
    shard = out / "shard-00003.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    ds = ShardDataset(out)
    assert ds[0]["key"] == before["key"][0]  # shard 2 is fine
    with pytest.raises(SnapgenError, match=r"shard-00003.safetensors: checksum mismatch .* re-run `snapgen precompute`"
                       ):
        ds[3]
    shard.unlink()
    with pytest.raises(SnapgenError, match="shard-00003.safetensors: missing; re-run"):
        ShardDataset(out)[3]
    _run(cfg, out)  # resume: shard 3 fails verification and is rebuilt
    after = _all(out)
    assert after["key"] == before["key"] and torch.equal(after["latents.32"], before["latents.32"])


def test_resume_with_other_settings_is_refused(folder, tiny_vae, tmp_path):
    _run(_cfg(folder, tiny_vae, max_samples=4), tmp_path / "out")
    with pytest.raises(ConfigError, match=r"out: .* other settings \(resolutions differ\)"):
        _run(_cfg(folder, tiny_vae, max_samples=4, resolutions=[64]), tmp_path / "out")
    _run(_cfg(folder, tiny_vae, max_samples=4, batch_size=1), tmp_path / "out")  # runtime-only: fine


def test_shards_of_an_older_format_are_refused_with_the_fix(folder, tiny_vae, tmp_path):
    out = tmp_path / "out"
    _run(_cfg(folder, tiny_vae, max_samples=4), out)
    run_config = json.loads((out / "precompute.json").read_text())
    del run_config["format"]  # as format-2 precompute wrote it
    (out / "precompute.json").write_text(json.dumps(run_config))
    with pytest.raises(ConfigError, match=rf"^out: {out} holds shards of format 2 or older, this snapgen writes 3; "
                                          r"use a new --out$"):
        _run(_cfg(folder, tiny_vae, max_samples=4), out)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "format": 2}))
    with pytest.raises(ConfigError, match=r"manifest.json: shard format 2, this snapgen reads 3; re-run `snapgen "
                                          r"precompute` into a new --out$"):
        ShardDataset(out)


def test_missing_vae_and_bad_options_are_config_errors(folder, tmp_path, tiny_vae):
    with pytest.raises(ConfigError, match=r"^vae: cannot load an AutoencoderKL from .*nope.*; pass --vae"):
        _run(_cfg(folder, tmp_path / "nope"), tmp_path / "out")
    with pytest.raises(ConfigError, match="resolutions: .*downsampling factor 8"):
        _run(_cfg(folder, tiny_vae, resolutions=[36]), tmp_path / "out2")
    with pytest.raises(ValueError, match="positive resolutions"):
        _cfg(folder, tiny_vae, resolutions=[0])
    with pytest.raises(ConfigError, match="source: .* is not a directory"):
        _run(_cfg(tmp_path / "missing", tiny_vae, source_kind="folder"), tmp_path / "out3")


def test_cli_runs_from_flags_and_prints_the_summary(run_cli, folder, tiny_vae, tmp_path):
    code, out, _ = run_cli("precompute", "--source", folder, "--vae", tiny_vae, "--encoders", "none",
                           "--caption-column", "none", "--resolutions", 32, "--shard-size", 8, "--max-samples", 12,
                           "--out", tmp_path / "out", "--json")
    summary = json.loads(out)
    assert code == 0 and summary["num_samples"] == 3 and summary["skipped"]["16bit"] == 2
    assert read_manifest(tmp_path / "out")["source"]["caption_column"] is None


def test_plan_builds_the_vae_on_meta_without_reading_data(folder, tiny_vae, tmp_path):
    items = pc.plan(_cfg(folder, tiny_vae), StageContext(out_dir=tmp_path / "out"))
    assert items[0].params == 71435 and "manifest.json" in items[0].outputs[1]
    assert not (tmp_path / "out").exists()
    hub = pc.plan(_cfg(folder, "org/not-cached-anywhere"), StageContext(out_dir=tmp_path / "out"))
    assert hub[0].params is None and "config is not available locally" in hub[0].notes
    assert hub[0].provides["latent_channels"] is None  # later plans say the channels are not known yet
    assert items[0].provides["latent_channels"] == 16 and items[0].provides["resolutions"] == [32]


def test_shard_dataset_rank_slices(folder, tiny_vae, tmp_path):
    _run(_cfg(folder, tiny_vae, shard_size=3), tmp_path / "out")
    full = ShardDataset(tmp_path / "out")
    parts = [ShardDataset(tmp_path / "out", rank=r, world_size=3) for r in range(3)]
    keys = [[p[i]["key"] for i in range(len(p))] for p in parts]
    assert [len(k) for k in keys] == [len(full) // 3] * 3
    assert sum(keys, []) == [full[i]["key"] for i in range(3 * (len(full) // 3))]
    batch = next(iter(DataLoader(full, batch_size=4)))  # the default collate (and accelerate's prepare) works
    assert batch["latents.32"].shape == (4, 16, 4, 4) and len(batch["key"]) == 4
    with pytest.raises(ConfigError, match="fields: nope not in"):
        ShardDataset(tmp_path / "out", fields=["nope"])
    assert set(ShardDataset(tmp_path / "out", fields=["latents.32"])[0]) == {"latents.32", "key", "caption"}
