"""The built-in alignment suite: captioned shapes (data/shapes.py) + GenEval-style scorer (eval/alignment.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from snapgen_cli.data.shapes import (
    BACKGROUND,
    CATEGORIES,
    COLORS,
    NUMBERS,
    PALETTE,
    SHAPES,
    ShapeObject,
    ShapesClassDataset,
    ShapesDataset,
    ShapeSpec,
    relative_position,
    render,
    sample_spec,
    write_folder,
)
from snapgen_cli.errors import ConfigError
from snapgen_cli.eval.alignment import (
    detect,
    evaluate,
    geneval_metadata,
    parse_caption,
    score,
    score_folder,
    score_image,
)

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def _samples(n: int, resolution: int, seed: int) -> tuple[list[Image.Image], list[ShapeSpec]]:
    ds = ShapesDataset(n, resolution, seed)
    items = [ds[i] for i in range(n)]
    return [it["image"] for it in items], [it["spec"] for it in items]


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """What a lossy generator does: Gaussian blur sigma 0.7 px, a colour jitter (per-channel
    gain 0.9-1.1 and offset +-10), Gaussian noise of std 8 (0-255 scale)."""
    a = np.asarray(image.filter(ImageFilter.GaussianBlur(0.7)), dtype=np.float32)
    a = a * rng.uniform(0.9, 1.1, size=3) + rng.uniform(-10, 10, size=3) + rng.normal(0, 8, a.shape)
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def _accuracies(report: dict) -> dict[str, float]:
    return {c: v["accuracy"] for c, v in report["categories"].items()}


# ---------------------------------------------------------------------------- data set


def test_samples_are_deterministic_and_cycle_categories():
    a, b = ShapesDataset(12, 32, seed=3), ShapesDataset(12, 32, seed=3)
    assert [a.spec(i) for i in range(12)] == [b.spec(i) for i in range(12)]
    assert a[5]["image"].tobytes() == b[5]["image"].tobytes()
    assert [a.spec(i).category for i in range(12)] == list(CATEGORIES) * 2
    assert ShapesDataset(12, 32, seed=4).spec(0) != a.spec(0)
    # Golden captions: a change of the sampler (or of numpy's streams) shows up here.
    assert [ShapesDataset(6, 64, seed=0).spec(i).caption for i in range(6)] == [
        "a photo of a triangle",
        "a photo of a square and a triangle",
        "a photo of two triangles",
        "a photo of a purple square",
        "a photo of a triangle left of a circle",
        "a photo of a green square and a blue triangle",
    ]


def test_item_fields_transform_and_range():
    ds = ShapesDataset(3, 48, seed=0, categories=["counting"], transform=np.asarray)
    item = ds[1]
    assert set(item) == {"image", "text", "spec"}
    assert item["image"].shape == (48, 48, 3) and item["image"].dtype == np.uint8
    assert item["spec"].category == "counting" and item["text"] == item["spec"].caption
    assert len(item["spec"].objects) in NUMBERS
    with pytest.raises(IndexError):
        ds[3]


def test_layouts_keep_margins_gaps_and_relations():
    rng = np.random.default_rng(0)
    for category in CATEGORIES * 20:
        spec = sample_spec(rng, category)
        boxes = [o.box for o in spec.objects]
        for x0, y0, x1, y1 in boxes:
            assert 0.06 <= x0 < x1 <= 0.94 and 0.06 <= y0 < y1 <= 0.94
            assert x1 - x0 == pytest.approx(y1 - y0)
        for i, a in enumerate(boxes):
            for b in boxes[i + 1 :]:  # separated by >= GAP along some axis
                assert max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3]) >= 0.06 - 1e-9
        if category == "position":
            for threshold in (0.0, 0.1, 0.2):
                assert relative_position(boxes[0], boxes[1], threshold) == {spec.relation}
        if category == "color_attr":
            assert spec.objects[0].color != spec.objects[1].color
        if category in ("two_object", "position", "color_attr"):
            assert spec.objects[0].shape != spec.objects[1].shape


def test_render_draws_palette_shapes_on_background():
    spec = ShapeSpec(
        "two_object",
        (
            ShapeObject("square", "red", (0.125, 0.125, 0.375, 0.375)),
            ShapeObject("circle", "blue", (0.5, 0.5, 0.875, 0.875)),
        ),
    )
    for res in (32, 64, 128, 256):
        a = np.asarray(render(spec, res))
        assert a.shape == (res, res, 3)
        assert tuple(a[0, 0]) == BACKGROUND and tuple(a[res // 2 - 1, 0]) == BACKGROUND
        assert tuple(a[res // 4, res // 4]) == PALETTE["red"]
        assert tuple(a[res * 11 // 16, res * 11 // 16]) == PALETTE["blue"]
        assert tuple(a[res // 2, res // 2]) == BACKGROUND  # the circle's box corner is outside it
        red = (a == PALETTE["red"]).all(-1).sum()
        assert red == (res // 4) ** 2  # a pixel-aligned square: exactly its area in full colour


def test_class_dataset_for_pretrain():
    ds = ShapesClassDataset(7, 32, seed=1)
    assert ds.class_names == SHAPES
    items = [ds[i] for i in range(7)]
    assert [it["label"] for it in items] == [0, 1, 2, 0, 1, 2, 0]
    assert [it["text"] for it in items[:3]] == [f"a photo of a {s}" for s in SHAPES]
    for it in items:
        assert len(it["spec"].objects) == 1 and it["spec"].objects[0].color in COLORS
        assert score_image(it["image"], it["text"])


def test_write_folder_is_byte_deterministic_imagefolder(tmp_path: Path):
    a = write_folder(tmp_path / "a", ShapesDataset(12, 32, seed=5))
    b = write_folder(tmp_path / "b", ShapesDataset(12, 32, seed=5))
    c = write_folder(tmp_path / "c", ShapesDataset(12, 32, seed=6))
    names = sorted(p.name for p in a.iterdir())
    assert names == [f"{i:06d}.png" for i in range(12)] + ["metadata.jsonl", "prompts.txt"]
    assert all((a / n).read_bytes() == (b / n).read_bytes() for n in names)
    assert (a / "metadata.jsonl").read_bytes() != (c / "metadata.jsonl").read_bytes()
    rows = [json.loads(line) for line in (a / "metadata.jsonl").read_text().splitlines()]
    assert (a / "prompts.txt").read_text().splitlines() == [r["text"] for r in rows]  # eval's --prompt-file
    ds = ShapesDataset(12, 32, seed=5)
    for i, row in enumerate(rows):
        assert set(row) == {"file_name", "text", "spec"}
        assert ShapeSpec.from_dict(row["spec"]) == ds.spec(i) and row["text"] == ds.spec(i).caption
    assert score_folder(a)["overall"] == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]  # no temp dirs left
    with pytest.raises(ConfigError, match="not empty"):
        write_folder(a, ds)


def test_write_folder_class_labels_and_caption_only_scoring(tmp_path: Path):
    out = write_folder(tmp_path / "cls", ShapesClassDataset(6, 32, seed=0))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == [0, 1, 2, 0, 1, 2]
    # Prompts alone (no spec) are enough to score.
    lines = [json.dumps({"file_name": r["file_name"], "text": r["text"]}) for r in rows]
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    assert score_folder(out) == {
        "overall": 1.0,
        "categories": {"single_object": {"accuracy": 1.0, "correct": 6, "total": 6}},
        "correct": 6,
        "total": 6,
    }


def test_bad_inputs_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="resolution"):
        ShapesDataset(4, 16)
    with pytest.raises(ConfigError, match="categories"):
        ShapesDataset(4, 32, categories=["counting", "bogus"])
    with pytest.raises(ConfigError, match="n: expected a positive integer"):
        ShapesDataset(0, 32)
    with pytest.raises(ConfigError, match=r"objects\[1\].shape"):
        ShapeSpec.from_dict({"category": "two_object", "objects": [{"shape": "circle"}, {"shape": "hexagon"}]})
    with pytest.raises(ConfigError, match="relation"):
        objects = [{"shape": "circle"}, {"shape": "square"}]
        ShapeSpec.from_dict({"category": "position", "objects": objects, "relation": "near"})
    with pytest.raises(ConfigError, match="differ in number"):
        score([render(ShapesDataset(1, 32).spec(0), 32)], ["a photo of a circle", "a photo of a square"])
    with pytest.raises(ConfigError, match="metadata.jsonl"):
        score_folder(tmp_path)
    with pytest.raises(ConfigError, match="no box"):
        render(parse_caption("a photo of a circle"), 32)


# ---------------------------------------------------------------------------- scorer


@pytest.mark.parametrize("resolution,seeds", [(32, (0, 1, 2)), (64, (3, 4)), (128, (5,)), (256, (6,))])
def test_ground_truth_scores_one_in_every_category(resolution: int, seeds: tuple[int, ...]):
    n = 48 if resolution <= 64 else 24 if resolution == 128 else 12
    for seed in seeds:
        report = score(*_samples(n, resolution, seed))
        assert _accuracies(report) == {c: 1.0 for c in CATEGORIES}, seed
        assert report["overall"] == 1.0 and report["correct"] == report["total"] == n


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_robust_to_blur_noise_and_colour_jitter(resolution: int):
    images, specs = _samples(36, resolution, seed=10 + resolution)
    rng = np.random.default_rng(resolution)
    report = score([_degrade(im, rng) for im in images], specs)
    assert _accuracies(report) == {c: 1.0 for c in CATEGORIES}


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_blank_and_noise_images_score_zero(resolution: int):
    _, specs = _samples(24, resolution, seed=0)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (resolution, resolution, 3), dtype=np.uint8)) for _ in specs]
    blank = [Image.new("RGB", (resolution, resolution), BACKGROUND)] * len(specs)
    assert score(noise, specs)["overall"] == 0.0
    assert score(blank, specs)["overall"] == 0.0
    assert detect(blank[0]) == []


def test_prompt_ignoring_images_score_near_chance():
    images, specs = _samples(120, 32, seed=99)
    shuffled = specs[6:] + specs[:6]  # another prompt of the same category
    report = score(images, shuffled)
    assert 0.08 < report["overall"] < 0.3
    assert report["categories"]["color_attr"]["accuracy"] < report["categories"]["two_object"]["accuracy"]


def _corrupt(spec: ShapeSpec) -> ShapeSpec:
    """A prompt the image of ``spec`` does not satisfy under the category's rule."""
    objs = list(spec.objects)
    absent = next(s for s in SHAPES if s not in {o.shape for o in objs})
    if spec.category == "counting":
        n = len(objs) + 1 if len(objs) < max(NUMBERS) else len(objs) - 1
        return ShapeSpec("counting", (objs[0],) * n)
    if spec.category == "position":
        return dataclasses.replace(spec, relation=OPPOSITE[spec.relation])
    if spec.category == "colors":
        other = next(c for c in COLORS if c != objs[0].color)
        return dataclasses.replace(spec, objects=(dataclasses.replace(objs[0], color=other),))
    if spec.category == "color_attr":  # swap the colours between the two shapes
        a, b = objs
        swapped = (dataclasses.replace(a, color=b.color), dataclasses.replace(b, color=a.color))
        return dataclasses.replace(spec, objects=swapped)
    return dataclasses.replace(spec, objects=(*objs[:-1], dataclasses.replace(objs[-1], shape=absent)))


def test_wrong_prompts_fail():
    images, specs = _samples(48, 64, seed=21)
    assert score(images, [_corrupt(s) for s in specs])["correct"] == 0


def test_detections_match_the_rendered_objects():
    truth = [("red", (0.1, 0.1, 0.35, 0.35)), ("yellow", (0.6, 0.1, 0.85, 0.35)), ("purple", (0.3, 0.6, 0.55, 0.85))]
    spec = ShapeSpec("counting", tuple(ShapeObject("triangle", c, b) for c, b in truth))
    for res in (32, 128):
        found = sorted(detect(render(spec, res)), key=lambda d: d.box)
        assert [(d.shape, d.color) for d in found] == [("triangle", c) for c in ("red", "purple", "yellow")]
        for d, box in zip(found, sorted(o.box for o in spec.objects)):
            assert np.allclose(np.array(d.box) / res, box, atol=0.75 / res)  # sub-pixel boxes
            assert d.confidence > 0.95
        assert evaluate(found, geneval_metadata(spec)) == (True, "")
        ok, reason = evaluate(found[:2], geneval_metadata(spec))
        assert not ok and reason == "expected triangle>=3, found 2"


def test_geneval_metadata_golden():
    spec = parse_caption("a photo of a square left of a triangle")
    assert geneval_metadata(spec) == {
        "tag": "position",
        "prompt": "a photo of a square left of a triangle",
        "include": [{"class": "triangle", "count": 1}, {"class": "square", "count": 1, "position": ["left of", 0]}],
        "exclude": [],
    }
    assert geneval_metadata(parse_caption("a photo of four circles"))["exclude"] == [{"class": "circle", "count": 5}]
    assert geneval_metadata(parse_caption("a photo of a red square and a blue circle"))["include"] == [
        {"class": "square", "count": 1, "color": "red"},
        {"class": "circle", "count": 1, "color": "blue"},
    ]


def test_relative_position_follows_geneval():
    a = (0.0, 0.0, 10.0, 10.0)
    assert relative_position(a, (20.0, 0.0, 30.0, 10.0)) == {"left of"}
    assert relative_position((20.0, 0.0, 30.0, 10.0), a) == {"right of"}
    assert relative_position(a, (0.0, 20.0, 10.0, 30.0)) == {"above"}
    assert relative_position(a, (20.0, 20.0, 30.0, 30.0)) == {"left of", "above"}
    assert relative_position(a, (1.5, 1.0, 11.5, 11.0)) == set()  # within 0.1 x (sizes) on both axes
    assert relative_position(a, (30.0, 5.0, 40.0, 15.0)) == {"left of"}


# ---------------------------------------------------------------------------- captions


def test_parse_caption_round_trips_and_scores_like_the_spec():
    images, specs = _samples(36, 32, seed=2)
    for spec in specs:
        assert parse_caption(spec.caption) == spec.prompt_only()
    assert score(images, [s.caption for s in specs]) == score(images, specs)


def test_parse_caption_grammar():
    assert parse_caption("A photo of three triangles.") == ShapeSpec("counting", (ShapeObject("triangle"),) * 3)
    assert parse_caption("a purple circle") == ShapeSpec("colors", (ShapeObject("circle", "purple"),))
    assert parse_caption("a photo of a circle above a square") == ShapeSpec(
        "position", (ShapeObject("circle"), ShapeObject("square")), "above"
    )
    for bad in (
        "a photo of a dog",
        "a photo of a red circle and a square",
        "a photo of a red circle below a square",
        "a photo of one circle",
    ):
        with pytest.raises(ConfigError, match="caption"):
            parse_caption(bad)
    with pytest.raises(ConfigError, match="different shapes"):
        parse_caption("a photo of a circle and a circle")


def test_chance_level_is_measured_and_low():
    from snapgen_cli.eval.alignment import chance_level

    res = chance_level(n=60, resolution=64, seed=0)
    assert 0.05 < res["overall"] < 0.35, res["overall"]
    assert set(res["categories"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
