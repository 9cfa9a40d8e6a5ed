"""Recipes and the CLI contract: validation errors (one line, exit 2), overrides, stage selection, markers."""

import json
from pathlib import Path

import pytest

from snapgen_cli.errors import ConfigError
from snapgen_cli.recipe import apply_override, load_recipe

ROOT = Path(__file__).resolve().parents[1]

BENCH = """
[run]
name = "t"
out_dir = "{out}"

[[stages]]
name = "a"
kind = "bench-device"
preset = "tiny"
resolution = 64
runs = 0

[[stages]]
name = "b"
kind = "bench-device"
preset = "tiny"
resolution = 128
runs = 0
"""


def _recipe(tmp_path, text=BENCH):
    p = tmp_path / "r.toml"
    p.write_text(text.format(out=tmp_path / "run"))
    return p


def _one_error_line(code, err, *needles):
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


def test_malformed_toml(tmp_path, run_cli):
    p = tmp_path / "bad.toml"
    p.write_text("[run\nname = 'x'\n")
    code, out, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, "bad.toml", "malformed TOML")
    assert out == ""


def test_unknown_key(tmp_path, run_cli):
    p = _recipe(tmp_path, BENCH.replace('runs = 0\n', 'runs = 0\nspeed = 3\n', 1))
    code, _, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, "stages[0].speed: unknown key", "allowed keys:", "resolution")


def test_wrong_type(tmp_path, run_cli):
    p = _recipe(tmp_path, BENCH.replace("resolution = 64", 'resolution = "fast"'))
    code, _, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, 'stages[0].resolution: expected an integer, got "fast"')


def test_negative_value_names_the_constraint(tmp_path, run_cli):
    p = _recipe(tmp_path, BENCH.replace("resolution = 64", "resolution = -64"))
    code, _, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, "stages[0].resolution: expected a positive number, got -64")


def test_unknown_preset(tmp_path, run_cli):
    p = _recipe(tmp_path, BENCH.replace('preset = "tiny"', 'preset = "huge"', 1))
    code, _, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, "unknown UNet preset 'huge'", "snapgen-t2i")


def test_unknown_stage_kind(tmp_path, run_cli):
    p = _recipe(tmp_path, BENCH.replace('kind = "bench-device"', 'kind = "teleport"', 1))
    code, _, err = run_cli("run", p, "--dry-run")
    _one_error_line(code, err, "stages[0].kind: unknown stage kind 'teleport'")


def test_missing_recipe_file(tmp_path, run_cli):
    code, _, err = run_cli("run", tmp_path / "nope.toml", "--dry-run")
    _one_error_line(code, err, "nope.toml: recipe file not found")


def test_missing_checkpoint_dir(tmp_path, run_cli):
    code, _, err = run_cli("bench-device", "--checkpoint", tmp_path / "missing", "--runs", "0", "--out", tmp_path / "b")
    _one_error_line(code, err, "missing", "no such file or directory")


def test_bad_flag_value_names_the_flag(tmp_path, run_cli):
    code, _, err = run_cli("bench-device", "--resolution", "100", "--runs", "0", "--out", tmp_path)
    _one_error_line(code, err, "--resolution: expected a multiple of 32")
    code, _, err = run_cli("bench-device", "--model", "gpt", "--out", tmp_path)
    assert code == 2 and "Invalid value for '--model'" in err
    code, _, err = run_cli("bench-device", "--compare", "gpt", "--out", tmp_path)
    assert code == 2 and "Invalid value for '--compare'" in err
    assert not any(tmp_path.iterdir())


def test_set_overrides_by_name_and_index(tmp_path):
    p = _recipe(tmp_path)
    r = load_recipe(p, ("stages.b.resolution=256", "stages[0].runs=3", "run.seed=7"))
    assert r.stages[1].config.resolution == 256 and r.stages[0].config.runs == 3 and r.run.seed == 7
    with pytest.raises(ConfigError, match="no stage with index or name 'zzz'"):
        load_recipe(p, ("stages.zzz.runs=1",))
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_override({}, "novalue")


def test_dry_run_plan_json(tmp_path, run_cli):
    code, out, err = run_cli("run", _recipe(tmp_path), "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)["plan"]
    assert [r["stage"] for r in plan] == ["a", "b"]
    assert plan[0]["params"] > 0 and plan[0]["model"] == "unet:tiny"
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_run_marks_stages_and_skips_them_on_rerun(tmp_path, run_cli):
    p = _recipe(tmp_path)
    code, out, _ = run_cli("run", p, "--json")
    assert code == 0
    res = json.loads(out)["stages"]
    assert [s["skipped"] for s in res] == [False, False]
    marker = tmp_path / "run" / "a" / ".snapgen-done.json"
    assert json.loads(marker.read_text())["summary"]["latent"] == 8
    code, out, _ = run_cli("run", p, "--json")
    assert [s["skipped"] for s in json.loads(out)["stages"]] == [True, True]
    code, out, _ = run_cli("run", p, "--json", "--only", "b", "--fresh")
    assert [(s["stage"], s["skipped"]) for s in json.loads(out)["stages"]] == [("b", False)]
    code, out, _ = run_cli("run", p, "--json", "--from", "b")
    assert [s["stage"] for s in json.loads(out)["stages"]] == ["b"]
    code, _, err = run_cli("run", p, "--only", "zzz")
    _one_error_line(code, err, "no stage named 'zzz'")


def test_from_refuses_when_an_earlier_stage_is_not_done(tmp_path, run_cli):
    p = _recipe(tmp_path)
    code, _, err = run_cli("run", p, "--from", "b")
    _one_error_line(code, err, "--from b: earlier stage(s) a not done")
    assert not (tmp_path / "run" / "b").exists()  # nothing ran
    assert run_cli("run", p, "--only", "a")[0] == 0
    code, out, err = run_cli("run", p, "--from", "b", "--json")
    assert code == 0, err
    assert [s["stage"] for s in json.loads(out)["stages"]] == ["b"]
    # the run's report still covers the stage done before --from, marked as such
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert [(s["stage"], s["skipped"]) for s in report["stages"]] == [("a", True), ("b", False)]
    assert report["stages"][0]["command"].startswith("snapgen ")


def test_paper_recipe_dry_runs(run_cli):
    code, out, err = run_cli("run", ROOT / "recipes" / "paper.toml", "--dry-run", "--json")
    assert code == 0, err
    stages = {r["stage"] for r in json.loads(out)["plan"]}
    assert {"bench", "bench-imagenet", "bench-ladder"} <= stages


def _plan_params(run_cli, recipe) -> dict[tuple[str, str], int]:
    """(stage, kind of model: unet / autoencoder / tiny-decoder) -> the plan's parameter count."""
    code, out, err = run_cli("run", recipe, "--dry-run", "--json")
    assert code == 0, err
    kinds = {"unet": "unet", "AutoencoderKL:": "autoencoder", "tiny decoder": "tiny-decoder", "teacher": "teacher",
             "discriminator heads": "heads"}
    return {(r["stage"], kind): r["params"] for r in json.loads(out)["plan"]
            for prefix, kind in kinds.items() if r["model"].startswith(prefix)}


def _meta_params(build, *args, **kw) -> int:
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build(*args, **kw).parameters())


def test_dry_run_reports_the_models_the_demo_stages_build(run_cli):
    """The demo's UNet stages build the tiny preset with the 4-channel latent and MiniLM's 384-wide
    text (not the preset's defaults); fine-tunes continue that model (init_from). The real runs
    are compared with the built models in tests/test_demo.py."""
    from snapgen_cli.core.decoder import build_decoder
    from snapgen_cli.core.unet import build_unet
    from snapgen_cli.train.decoder_task import build_autoencoder

    plan = _plan_params(run_cli, ROOT / "recipes" / "demo.toml")
    unet = _meta_params(build_unet, "tiny", in_channels=4, out_channels=4, context_dim=384, pooled_dim=384)
    assert unet < 3e6 and unet != _meta_params(build_unet, "tiny")
    for stage in ("pretrain", "finetune-32", "finetune-64"):
        assert plan[(stage, "unet")] == unet, stage
    assert plan[("autoencoder", "autoencoder")] == _meta_params(build_autoencoder, "tiny-ae", latent_channels=4)
    assert plan[("decoder", "tiny-decoder")] == _meta_params(build_decoder, "tiny", latent_channels=4)


def test_dry_run_reports_the_models_the_paper_stages_build(run_cli):
    from snapgen_cli.core.decoder import build_decoder
    from snapgen_cli.core.text import TextLayout, student
    from snapgen_cli.core.unet import build_unet

    plan = _plan_params(run_cli, ROOT / "recipes" / "paper.toml")
    layout = TextLayout.from_specs(student())
    unet = _meta_params(build_unet, "snapgen-t2i", in_channels=16, out_channels=16, **layout.unet_kwargs())
    for stage in ("pretrain", "finetune-256", "finetune-512", "finetune-1024", "distill", "step-distill"):
        assert plan[(stage, "unet")] == unet, stage
    assert plan[("train-decoder", "tiny-decoder")] == _meta_params(build_decoder, "snapgen-decoder")
    assert round(plan[("distill", "teacher")] / 1e9, 2) == 8.06  # SD3.5-Large built on meta (+ its 0.09B pos. table)
    # step-distill: SD3.5-Large-Turbo (the same architecture) on meta, and four heads on its 2432-wide tokens
    assert plan[("step-distill", "teacher")] == plan[("distill", "teacher")]
    from snapgen_cli.core.discriminator import FeatureHeads

    assert plan[("step-distill", "heads")] == _meta_params(FeatureHeads, 2432, (9, 18, 27, 37), 256)


def test_bench_device_json_and_compare(tmp_path, run_cli):
    code, out, err = run_cli("bench-device", "--preset", "tiny", "--resolution", "64", "--runs", "2",
                             "--warmup", "0", "--compare", "unet", "--json", "--out", tmp_path / "b")
    assert code == 0, err
    r = json.loads(out)
    assert r["params"] > 0 and r["macs"] > 0 and r["latency_ms_median"] > 0
    assert r["latency_ms_p25"] <= r["latency_ms_median"] <= r["latency_ms_p75"]
    assert r["ratios"]["tiny"]["macs"] == 1.0
    assert json.loads((tmp_path / "b" / "bench.json").read_text()) == r  # the file holds the printed result
    assert "latency ms (median)" in err  # the table goes to stderr


def test_bench_device_prints_the_path_of_bench_json_in_its_default_out_dir(tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli("bench-device", "--preset", "tiny", "--resolution", "64", "--set", "runs=0")
    assert code == 0, err
    assert out == str(Path("runs", "bench-device", "bench.json")) + "\n"
    r = json.loads((tmp_path / out.strip()).read_text())
    assert r["name"] == "tiny" and r["latent"] == 8 and r["params"] > 0
    assert "latency_ms_median" not in r  # --set runs=0: parameters and MACs only
    assert [p.name for p in (tmp_path / "runs" / "bench-device").iterdir()] == ["bench.json"]  # no temp file left


def test_bench_device_dry_run_prints_a_plan_and_writes_nothing(tmp_path, run_cli):
    out_dir = tmp_path / "b"
    code, out, err = run_cli("bench-device", "--preset", "tiny", "--resolution", "64", "--compare", "decoder",
                             "--out", out_dir, "--dry-run", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["stage"] == "bench-device" and r["config"]["compare"] == ["decoder"]
    assert [p["model"] for p in r["plan"]] == ["unet:tiny", "decoder:tiny"]
    assert all(p["params"] > 0 and p["outputs"] == [str(out_dir / "bench.json")] for p in r["plan"])
    assert not out_dir.exists()
    code, out, _ = run_cli("bench-device", "--preset", "tiny", "--out", out_dir, "--dry-run")
    assert code == 0 and out == f"{out_dir / 'bench.json'}\n" and not out_dir.exists()


def test_bench_device_help_names_choices_defaults_and_the_result_file(run_cli):
    code, out, _ = run_cli("bench-device", "--help")
    text = "".join(out.split())  # click wraps lines, also at hyphens
    assert code == 0
    for needle in ("--model [unet|decoder|sd3-decoder|sdxl-unet]", "--dtype [float32|float16|bfloat16]",
                   "cpu, cuda[:i] or mps", "timed runs (0: parameters and MACs only) [default: 5]",
                   "bench.json", "[default: runs/bench-device]", "--set KEY=VALUE", "--dry-run", "--json"):
        assert "".join(needle.split()) in text, needle


def test_bench_device_ladder_json(tmp_path, run_cli):
    code, out, _ = run_cli("bench-device", "--ablation-ladder", "--json", "--out", tmp_path)
    rows = json.loads(out)["ablation_ladder"]
    assert code == 0 and [r["step"] for r in rows][:2] == ["ladder-a", "ladder-b"]
    assert rows[1]["paper"] == {"macs": -17.0} and rows[1]["delta_macs_pct"] == pytest.approx(-16.9, abs=0.5)
    claims = {r["step"]: r["paper_claim"] for r in rows if "paper_claim" in r}  # stated without a number
    assert list(claims) == ["ladder-e", "ladder-f"] and "smaller" in claims["ladder-e"]
    assert rows[5]["delta_params_pct"] < 0 and rows[5]["delta_macs_pct"] < 0  # (e) as claimed
    assert json.loads((tmp_path / "bench.json").read_text())["ablation_ladder"] == rows


def test_shapes_data_subcommand_writes_the_demo_folders(tmp_path, run_cli):
    import shlex

    import datasets

    from snapgen_cli.report import standalone_command
    from snapgen_cli.stages import shapes_data

    out_dir = tmp_path / "shapes"
    flags = ("--n-captioned", "4", "--n-classes", "3", "--n-holdout", "2", "--resolution", "32")
    code, out, err = run_cli("shapes-data", "--out", out_dir, *flags, "--dry-run")
    assert code == 0 and out == f"{out_dir}\n" and not out_dir.exists(), err
    code, out, err = run_cli("shapes-data", "--out", out_dir, *flags)
    assert code == 0 and out == f"{out_dir}\n", err
    assert sorted(p.name for p in out_dir.iterdir()) == ["captioned", "classes", "holdout"]
    for sub, n in (("captioned", 4), ("holdout", 2)):
        lines = (out_dir / sub / "metadata.jsonl").read_text().splitlines()
        assert len(lines) == n and len(list((out_dir / sub).glob("*.png"))) == n
        assert all(json.loads(line)["text"] for line in lines)
    classes = datasets.load_from_disk(str(out_dir / "classes"))
    assert len(classes) == 3 and classes.features["label"].names == ["circle", "square", "triangle"]
    # the run report's command for this stage (it used to say `snapgen run RECIPE --only`) reproduces it
    cfg = shapes_data.Config(n_captioned=4, n_classes=3, n_holdout=2, resolution=32)
    argv = shlex.split(standalone_command("shapes-data", cfg, tmp_path / "again"))
    assert argv[:2] == ["snapgen", "shapes-data"] and run_cli(*argv[1:])[0] == 0
    assert (tmp_path / "again" / "captioned" / "metadata.jsonl").read_text() == \
        (out_dir / "captioned" / "metadata.jsonl").read_text()


def test_report_command_round_trips_nested_specs(tmp_path, run_cli):
    """The run report's standalone command for a stage whose config holds nested models (encoder
    specs) passes them as one TOML value that the generated flag parses back to the same config."""
    import shlex

    from snapgen_cli.core.text import spec_set
    from snapgen_cli.report import standalone_command
    from snapgen_cli.stages import precompute

    (tmp_path / "src").mkdir()
    cfg = precompute.Config(source=str(tmp_path / "src"), encoders=[s.model_dump() for s in spec_set("minilm")],
                            resolutions=[32])
    argv = shlex.split(standalone_command("precompute", cfg, tmp_path / "out"))
    assert argv[:4] == ["snapgen", "precompute", "--out", str(tmp_path / "out")]
    code, out, err = run_cli(*argv[1:], "--dry-run", "--json")
    assert code == 0, err
    assert precompute.Config.model_validate(json.loads(out)["config"]) == cfg


DISTRIBUTED = """
[run]
name = "dist"
out_dir = "{out}"
jobs = 2                     # for single-process runs: a launch runs the stages one at a time

[[stages]]
name = "data"
kind = "shapes-data"
resolution = 64
n_captioned = 64
n_classes = 40
n_holdout = 8

[[stages]]
name = "autoencoder"
kind = "train-decoder"
mode = "autoencoder"
data = "@data/captioned"
autoencoder_overrides = {{latent_channels = 4}}
patch_size = 32
eval_resolution = 64
eval_images = "@data/holdout"
steps = 3
batch_size = 4
lr_reference_batch = 8
lpips_weight = 0.0
tracker = "none"

[[stages]]
name = "precompute"
kind = "precompute"
source = "@data/captioned"
resolutions = [64]
vae = "@autoencoder/model_ema"
vae_subfolder = "none"
encoders = "minilm"
text_max_length = 16
dtype = "fp32"
batch_size = 16

[[stages]]
name = "finetune"
kind = "finetune"
data = "@precompute"
init_from = "none"
model = "tiny"
resolution = 64
steps = 2
batch_size = 4
lr_reference_batch = 8
tracker = "none"

[[stages]]
name = "eval"
kind = "eval"
checkpoint = "@finetune"
metrics = ["alignment"]
alignment_n = 16
steps = 2
batch_size = 8
"""


def test_a_recipe_runs_whole_under_a_two_process_launch(tmp_path):
    """``accelerate launch`` (2 CPU processes) of ``snapgen run RECIPE``: the training stages and precompute run in
    both processes (one global batch), eval's generation is split between them, data runs in the main process
    alone, each output written once. Before: both processes built the data folder ("Directory not empty"), and train-decoder's held-out
    PSNR (torchmetrics, which gathers every process's states) hung the main process's evaluation. A re-run with
    ``--fresh --from`` deletes the stages' old outputs once. The recipe's ``jobs = 2`` does not apply to a launch
    (an explicit ``--jobs 2`` is refused: ``test_report_ux.py``)."""
    import os
    import signal
    import subprocess

    from conftest import launch_argv

    p = _recipe(tmp_path, DISTRIBUTED)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def launch(*args):
        proc = subprocess.Popen([*launch_argv(), "-m", "snapgen_cli", "run", str(p), "--json", *args], env=env,
                                cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:  # a hung collective: the launcher and both workers go
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
        assert proc.returncode == 0, stderr[-3000:]
        return [json.loads(line) for line in stdout.splitlines()]  # rank 0 alone prints

    (out,) = launch()
    assert [(s["stage"], s["skipped"]) for s in out["stages"]] == [
        ("data", False), ("autoencoder", False), ("precompute", False), ("finetune", False), ("eval", False)]
    summaries = {s["stage"]: s["summary"] for s in out["stages"]}
    for stage in ("autoencoder", "finetune"):
        assert (summaries[stage]["num_processes"], summaries[stage]["global_batch"]) == (2, 8), stage
    assert summaries["autoencoder"]["eval"]["autoencoder"]["psnr"] > 0
    run = tmp_path / "run"
    assert len(list((run / "data" / "captioned").rglob("*.png"))) == 64
    # eval: each process generated its half of the 16 alignment images; the main process scored them all
    assert summaries["eval"]["meta"]["generated"] == 16 and summaries["eval"]["metrics"]["alignment"]["total"] == 16
    assert len(list((run / "eval" / "alignment").glob("*.png"))) == 16
    assert (run / "eval" / "eval_report.json").is_file() and (run / "report.md").is_file()
    (again,) = launch("--fresh", "--from", "finetune")
    assert [(s["stage"], s["skipped"]) for s in again["stages"]] == [("finetune", False), ("eval", False)]
