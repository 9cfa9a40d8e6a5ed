"""Your own data on the first try (issue 16 items 1, 5, 8 and the README's "Train on your own images").

* Class folders, a label column + ``--class-names`` and a ``ClassLabel`` dataset give class text
  holding every synonym (sup. H); labels with no names, or text encoders with no text, stop
  precompute with exit 2 before anything is written.
* FID between two folders via the CLI equals the Python API's figure; a saved ``.npz`` reference
  holds the folder's statistics bit for bit.
* The README section's commands run as written on a tiny generated class tree.

Every FID is one 2048x2048 matrix square root (~15-30 s on a shared core): this file computes
two, in parallel (the CLI in a subprocess while the Python API runs here).
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from cleanfid.fid import get_files_features
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from test_train_e2e import _image, _tiny_vae

from snapgen_cli.core.text import EncoderSpec, TextEncoderStack
from snapgen_cli.data.shards import ClassText, read_manifest, read_tensors
from snapgen_cli.data.sources import FolderSource, open_source
from snapgen_cli.errors import ConfigError
from snapgen_cli.eval import metrics as M
from snapgen_cli.stages import precompute as pc
from snapgen_cli.stages.base import StageContext

README = Path(__file__).resolve().parents[1] / "README.md"
SHAPES = ("circle", "square", "triangle")


def _readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of each fenced block of the README's "Train on your own images" section."""
    text = README.read_text()
    section = text[text.index("## Train on your own images"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


def _commands(block: str) -> list[list[str]]:
    """The ``snapgen`` command lines of a bash block (continuations joined, $VARS expanded as bash would)."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(os.path.expandvars(line))[1:] for line in lines if line.startswith("snapgen ")]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread (as the subprocess)


@pytest.fixture(scope="module")
def vae(tmp_path_factory) -> Path:
    return _tiny_vae(tmp_path_factory.mktemp("own") / "vae")


def _tree(root: Path, classes, per_class: int = 3) -> Path:
    """``root/<class>/<i>.png``: 32x32 coloured shapes, one shape per class."""
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, color in enumerate(("red", "blue", "green", "yellow")[:per_class]):
            _image(SHAPES[c % 3], color).save(root / name / f"{i}.png")
    return root


def _class_prompts(shards: Path) -> list[str]:
    classes = read_manifest(shards)["classes"]
    return read_tensors(shards / classes["file"])[1]["prompts"]


def _drawn(table: ClassText, label: int, key: str, draws: int = 40) -> set[tuple]:
    return {tuple(table.sample(torch.tensor([label]), torch.Generator().manual_seed(s))[key][0, :6].tolist())
            for s in range(draws)}


# ------------------------------------------------------------------ the README, as written


def test_readme_own_images_commands_run_as_written(tmp_path, vae, run_cli, monkeypatch):
    """Class folders + a class-names object -> precompute -> pretrain; the class text is every
    synonym in the template, and pretraining draws each of them (decoded: equal to MiniLM's
    features of that prompt)."""
    (lang_names, names), (lang_train, train), (lang_fid, _) = _readme_blocks()
    assert (lang_names, lang_train, lang_fid) == ("json", "bash", "bash")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VAE", str(vae))
    Path("classes.json").write_text(names)
    _tree(tmp_path / "my_images", sorted(json.loads(names)))
    commands = _commands(train)
    assert [c[0] for c in commands] == ["precompute", "pretrain"]
    for argv in commands:
        code, out, err = run_cli(*argv, "--json")
        assert code == 0, err
        if argv[0] == "precompute":
            summary = json.loads(out)
            assert summary["classes"] == {"num_classes": 3, "num_prompts": 7, "names_from": "classes.json"}
        else:
            assert json.loads(out)["steps"] == 20

    shards = tmp_path / "my_shards"
    assert read_manifest(shards)["classes"]["names"] == [["cat", "kitty", "house cat"], ["dog", "puppy"],
                                                         ["goldfish", "Carassius auratus"]]
    assert _class_prompts(shards) == ["a photo of a cat", "a photo of a kitty", "a photo of a house cat",
                                      "a photo of a dog", "a photo of a puppy", "a photo of a goldfish",
                                      "a photo of a Carassius auratus"]
    assert json.loads((tmp_path / "my_pretrain" / "train_summary.json").read_text())["steps"] == 20
    # What pretraining draws for the label of "dog" (id 1): the features of both of its prompts.
    spec = EncoderSpec(**read_manifest(shards)["encoders"]["specs"]["minilm"])
    want = TextEncoderStack([spec]).encode(["a photo of a dog", "a photo of a puppy"])["minilm.pooled"]
    drawn = _drawn(ClassText(shards), 1, "minilm.pooled")
    assert len(drawn) == 2
    for row in drawn:  # each draw is one prompt's features (stored in fp16), far from the other's
        near, far = sorted(float((torch.tensor(row) - w[:6]).abs().max()) for w in want)
        assert near < 1e-3 < 1e-2 < far


# ------------------------------------------------------------------ the three layouts


def test_class_folders_number_classes_as_datasets_imagefolder(tmp_path):
    """Same class ids as ``load_dataset("imagefolder")`` for the same tree (its ClassLabel)."""
    import datasets

    tree = _tree(tmp_path / "tree", ["zebra", "ant", "moth"], per_class=2)
    src = FolderSource(tree, caption_column=None, label_column="label")
    ours = {s.key + ".png": s.label for s in src.iter_range()}
    hf = datasets.load_dataset("imagefolder", data_dir=str(tree), split="train", cache_dir=str(tmp_path / "cache"))
    names = hf.features["label"].names
    theirs = {Path(r["image"]["path"]).relative_to(tree).as_posix(): r["label"]
              for r in hf.cast_column("image", datasets.Image(decode=False))}
    assert names == ["ant", "moth", "zebra"] and src.label_names == [[n] for n in names]
    assert ours == theirs and sorted(set(ours.values())) == [0, 1, 2]
    assert src.names_from == "folders"


def test_label_column_with_class_names_file(tmp_path, vae):
    """Integer labels in metadata.jsonl + a JSON list of synonym strings -> class text of every synonym;
    string labels (metadata.csv, a dataset's string column) name the classes themselves."""
    import datasets

    root = tmp_path / "labelled"
    root.mkdir()
    rows = [{"file_name": f"{i}.png", "label": i % 2} for i in range(4)]
    for i in range(4):
        _image(SHAPES[i % 2], "red").save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "names.json").write_text(json.dumps(["circle, disk", ["square", "box, block"]]))
    cfg = pc.Config(source=str(root), label_column="label", caption_column="none",
                    class_names=str(tmp_path / "names.json"), vae=str(vae), vae_subfolder="none", encoders="minilm",
                    resolutions=[32], dtype="fp32")
    summary = pc.run(cfg, StageContext(out_dir=tmp_path / "out"))
    assert summary["num_samples"] == 4 and summary["classes"]["num_prompts"] == 5
    assert _class_prompts(tmp_path / "out") == ["a photo of circle", "a photo of disk", "a photo of square",
                                                "a photo of box", "a photo of block"]
    assert len(_drawn(ClassText(tmp_path / "out"), 1, "minilm.pooled")) == 3

    csv_root = tmp_path / "csv"
    csv_root.mkdir()
    for i in range(3):
        _image("circle", "blue").save(csv_root / f"{i}.png")
    (csv_root / "metadata.csv").write_text("file_name,label\n0.png,owl\n1.png,bat\n2.png,owl\n")
    src = open_source(str(csv_root), caption_column=None, label_column="label")
    assert src.label_names == [["bat"], ["owl"]] and [s.label for s in src.iter_range()] == [1, 0, 1]
    # a dataset's string column: the ids datasets' class_encode_column gives it
    ds = datasets.Dataset.from_dict({"image": [_image("circle", "red")] * 3, "label": ["owl", "bat", "owl"]})
    ds.save_to_disk(str(tmp_path / "strings"))
    src = open_source(str(tmp_path / "strings"), caption_column=None, label_column="label")
    encoded = ds.class_encode_column("label")
    assert src.label_names == [[n] for n in encoded.features["label"].names]
    assert [s.label for s in src.iter_range()] == encoded["label"] == [1, 0, 1]


def test_labels_without_names_and_text_without_source_are_exit_2(tmp_path, vae, run_cli):
    import datasets

    root = tmp_path / "ints"
    root.mkdir()
    for i in range(3):
        _image("circle", "red").save(root / f"{i}.png")
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f"{i}.png", "label": i}) + "\n"
                                                 for i in range(3)))
    hf = tmp_path / "hf"
    datasets.Dataset.from_dict({"image": [_image("square", "red")] * 2, "label": [0, 1]},
                               features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
                               ).save_to_disk(str(hf))
    base = ["precompute", "--vae", vae, "--vae-subfolder", "none", "--resolutions", 32, "--caption-column", "none"]
    for source in (root, hf):
        out = tmp_path / f"out-{source.name}"
        code, _, err = run_cli(*base, "--source", source, "--label-column", "label", "--encoders", "minilm",
                               "--out", out)
        assert code == 2 and not out.exists()
        assert err.strip().splitlines()[-1] == (  # (the lines above it: datasets' save_to_disk progress)
            f"error: label_column 'label': the labels of {source} are integers with no class names; pass "
            "--class-names FILE, a JSON list whose entry i names class id i (a name or comma-separated synonyms, "
            'e.g. ["tench, Tinca tinca", "goldfish"])')
    code, _, err = run_cli(*base, "--source", root, "--encoders", "minilm", "--out", tmp_path / "o2")
    assert code == 2 and "encoders: text encoders are set but the source gives no text" in err
    (tmp_path / "two.json").write_text('["a", "b"]')
    code, _, err = run_cli(*base, "--source", root, "--label-column", "label", "--class-names", tmp_path / "two.json",
                           "--out", tmp_path / "o3")
    assert code == 2 and "lists 2 classes, but the source has label 2" in err
    (tmp_path / "bad.json").write_text('["a", ')
    code, _, err = run_cli(*base, "--source", root, "--label-column", "label", "--class-names", tmp_path / "bad.json",
                           "--out", tmp_path / "o4")
    assert code == 2 and "bad.json: not valid JSON" in err
    code, _, err = run_cli(*base, "--source", root, "--class-template", "a photo", "--out", tmp_path / "o5")
    assert code == 2 and "--class-template: expected a text with one {} for the class name" in err
    # a streamed / hub label beyond the names: refused when the shard meets it
    (tmp_path / "one.json").write_text('["only"]')
    with pytest.raises(ConfigError, match=r"sample '1' \(index 1\) has label 1, but 1 classes are named"):
        pc.run(pc.Config(source=str(hf), label_column="label", caption_column="none",
                         class_names=str(tmp_path / "one.json"), vae=str(vae), vae_subfolder="none", encoders="none",
                         resolutions=[32]), StageContext(out_dir=tmp_path / "o6"))
    # named classes but --encoders none: latents and labels only, and pretraining says what is missing
    (tmp_path / "three.json").write_text('["a", "b", "c"]')
    code, _, err = run_cli(*base, "--source", root, "--label-column", "label", "--class-names",
                           tmp_path / "three.json", "--encoders", "none", "--out", tmp_path / "o7")
    assert code == 0, err
    with pytest.raises(ConfigError, match="class names but no class text features .*--encoders none"):
        ClassText(tmp_path / "o7")
    mixed = _tree(tmp_path / "mixed", ["a", "b"], per_class=1)
    _image("circle", "red").save(mixed / "loose.png")
    with pytest.raises(ConfigError, match="not all in class folders at one depth"):
        FolderSource(mixed, label_column="label")


def test_precompute_rate_is_the_mean_since_start():
    """One update per shard: rich's windowed speed had nothing to divide and showed 0.0."""
    clock = iter([0.0, 0.0, 2.0, 2.0, 2.0, 2.0, 2.0])
    with Progress(disable=True, get_time=lambda: next(clock)) as bar:
        task_id = bar.add_task("precompute", total=100)
        task = bar.tasks[0]
        assert str(pc._Rate().render(task)) == "- samples/s"
        bar.advance(task_id, 40)  # at t = 2 s
        assert task.speed is None  # what the old column showed as "0.0 samples/s"
        assert str(pc._Rate().render(task)) == "20.0 samples/s"


# ------------------------------------------------------------------ FID between folders, saved references


def _photo_crops(folder: Path, photo: str, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    image = getattr(skimage.data, photo)()
    folder.mkdir(parents=True)
    for i in range(n):
        y, x = rng.integers(0, min(image.shape[:2]) - 160, 2)
        Image.fromarray(image[y:y + 160, x:x + 160]).resize((32, 32), Image.BICUBIC).save(folder / f"{i:02d}.png")
    return folder


def test_fid_between_folders_cli_equals_python_api_and_the_saved_reference(tmp_path, monkeypatch, run_cli):
    """The README's FID command, with ``--inception`` pointing at a tiny TorchScript feature net
    (the user-facing way to bring one's own network; the real Inception's 2048^2 square root costs
    ~30 s per FID on this CPU, and the code path is the same), against the Python API on the same
    folders: equal FID and KID to the last bit. Its ``--save-reference`` npz holds the folder's mu /
    sigma / features bit for bit, with n and the extractor, and FID / KID against the npz equal
    FID / KID against the folder."""
    monkeypatch.chdir(tmp_path)
    _photo_crops(tmp_path / "my_images" / "cat", "chelsea", 5, 0)  # a class tree is listed recursively
    _photo_crops(tmp_path / "my_images" / "astronaut", "astronaut", 5, 1)
    _photo_crops(tmp_path / "my_samples", "coffee", 10, 2)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    torch.jit.save(torch.jit.script(net), tmp_path / "features.pt")
    (argv,) = _commands(_readme_blocks()[2][1])
    code, out, err = run_cli(*argv, "--inception", "features.pt", "--json")
    assert code == 0, err[-2000:]
    fid = json.loads(out)["metrics"]["fid"]

    inception = M.load_inception("features.pt")
    shown = io.StringIO()
    ref = M.feature_stats("my_images", inception, console=Console(file=shown, force_terminal=True, width=100))
    assert "features of images (my_images)" in shown.getvalue() and "10/10" in shown.getvalue()
    samples = M.feature_stats("my_samples", inception)
    api_fid, api_kid = M.frechet_distance(samples, ref), M.kernel_distance(samples, ref)  # what fid_kid returns
    # the extraction loop is clean-fid's get_files_features, with a rich progress bar instead of tqdm
    files = [str(f) for f in M.list_images("my_samples")][:3]
    assert np.array_equal(M.image_features(files, inception), get_files_features(
        files, model=inception, num_workers=0, batch_size=32, device=torch.device("cpu"), verbose=False))
    assert fid["fid"] == api_fid and fid["kid"] == api_kid and fid["fid"] > 0
    assert (fid["n_generated"], fid["n_reference"], fid["saved_reference"]) == (10, 10, "my_images.npz")

    saved = M.FeatureStats.load("my_images.npz", inception)
    assert saved.n == 10 and saved.extractor == inception.name == fid["extractor"]
    for a, b in ((saved.mu, ref.mu), (saved.sigma, ref.sigma), (saved.features, ref.features)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert M.frechet_distance(samples, saved) == fid["fid"] and M.kernel_distance(samples, saved) == fid["kid"]
    code, out, err = run_cli("eval", "--metrics", "fid", "--samples", "my_samples", "--reference", "my_images.npz",
                             "--inception", "features.pt", "--out", "from_npz", "--json")
    assert code == 0, err[-2000:]
    assert json.loads(out)["metrics"]["fid"]["fid"] == fid["fid"]


def test_saved_reference_is_validated(tmp_path):
    """Keys, shapes, n and the extractor, each a one-line ConfigError; KID needs the features."""
    rng = np.random.default_rng(0)
    feats = rng.standard_normal((5, 8)).astype(np.float32)
    net = M.InceptionFeatures(torch.jit.script(torch.nn.Identity()), "fid-helper", "inception sha256:aaaa resize:clean")
    good = M.FeatureStats.from_features(feats, extractor=net.name)
    good.save(tmp_path / "good.npz")
    assert M.FeatureStats.load(tmp_path / "good.npz", net).n == 5
    good.save(tmp_path / "fid_only.npz", features=False)
    assert M.FeatureStats.load(tmp_path / "fid_only.npz", net).features is None
    cases = {
        "keys": ({"mean": good.mu}, r"no mu and sigma \(keys: mean\)"),
        "shapes": ({"mu": good.mu, "sigma": good.sigma[:4]}, r"inconsistent shapes mu \(8,\), sigma \(4, 8\)"),
        "n": ({"mu": good.mu, "sigma": good.sigma, "feats": feats, "n": np.int64(3)}, r"n is 3, .*\(5 feature rows\)"),
        "nan": ({"mu": good.mu * np.nan, "sigma": good.sigma}, "NaN or inf"),
        "other": ({"mu": good.mu, "sigma": good.sigma, "extractor": np.str_("inception sha256:bbbb resize:clean")},
                  r"computed with 'inception sha256:bbbb.*but --inception fid-helper is 'inception sha256:aaaa"),
        "foreign": ({"mu": good.mu, "sigma": good.sigma}, r"no 'extractor' key.*pass --inception clean-fid"),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        with pytest.raises(ConfigError, match=message):
            M.FeatureStats.load(tmp_path / f"{name}.npz", net)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        M.FeatureStats.load(tmp_path / "junk.npz", net)
    # clean-fid's own stats (no extractor key) are read with clean-fid's Inception
    M.FeatureStats.load(tmp_path / "foreign.npz", M.InceptionFeatures(net.net, "clean-fid", "inception sha256:cccc"))
    with pytest.raises(ConfigError, match="KID needs features.*--no-kid"):
        M.fid_kid(None, tmp_path / "fid_only.npz", inception=net)
    assert M.fid_kid(None, tmp_path / "fid_only.npz", inception=net, kid=False)["n_reference"] == 5


def test_eval_fid_flags_are_checked(run_cli, tmp_path):
    code, _, err = run_cli("eval", "--metrics", "alignment", "--samples", tmp_path, "--out", tmp_path / "o")
    assert code == 2 and "--samples: is a setting of the fid metric; add --metrics fid" in err
    code, _, err = run_cli("eval", "--metrics", "fid", "--reference", tmp_path / "r.npz", "--save-reference",
                           tmp_path / "s.npz", "--out", tmp_path / "o")
    assert code == 2 and "is already a .npz" in err
    code, _, err = run_cli("eval", "--metrics", "fid", "--reference", tmp_path, "--save-reference", tmp_path / "s.np",
                           "--out", tmp_path / "o")
    assert code == 2 and "expected a file name ending in .npz" in err
    code, _, err = run_cli("eval", "--metrics", "fid", "--samples", tmp_path / "none", "--reference",
                           tmp_path / "nope.npz", "--out", tmp_path / "o")
    assert code == 2 and "nope.npz': no such file" in err
