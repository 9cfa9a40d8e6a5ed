"""Issue 16 items 2, 3, 4, 6 and 8 on one shrunk run of the demo recipe (every stage runs, for a
step or two, on a few images): the report's standalone commands plan what the recipe planned,
``model`` + ``init_from`` is refused, the report shows every metric the eval stages wrote next to
its reference, ``--threads`` and its default, the generate grid and the eval contact sheet.

FID runs with a tiny TorchScript feature net passed as ``--inception PATH`` (the user-facing way
to bring one's own Inception): the real Inception costs ~20 s per eval on this CPU, and the
report only has to carry the figures the eval stage wrote.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from snapgen_cli.cli import main
from snapgen_cli.core import denoiser

FID_EVALS = ("eval", "eval-4step-before", "eval-8step-before", "eval-4step", "eval-8step")
SHRINK = [
    "data.n_captioned=48", "data.n_classes=24", "data.n_holdout=6",
    *[f"{s}.{k}" for s in ("autoencoder", "decoder") for k in ("steps=2", "batch_size=4")],
    "autoencoder.latent_stats_batches=1", "decoder.adv_start_step=1",
    "teacher-start.steps=1", "teacher-start.batch_size=4",  # the teacher's first step; "teacher" resumes it
    *[f"{s}.{k}" for s in ("pretrain", "finetune-32", "finetune-64", "teacher", "distill", "step-distill")
      for k in ("steps=2", "batch_size=4")],
    *[f"{s}.{k}" for s in ("eval-finetune", "eval-teacher", *FID_EVALS) for k in ("alignment_n=6", "steps=1")],
    "generate.steps=1",
    # the export of the final pipeline: its decoder to ONNX only (the full export runs in the slow demo test)
    'export.components=["decoder"]', 'export.formats=["onnx"]', "bench-export.runs=1",
]


def _cli(*args) -> tuple[int, str, str]:
    """The console entry point in-process: (exit code, stdout, stderr); usable in module fixtures."""
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, out.getvalue(), err.getvalue()


def _sets(inception: Path) -> list[str]:
    args = []
    for s in SHRINK + [f'{e}.inception="{inception}"' for e in ("fid-reference", *FID_EVALS)]:
        args += ["--set", f"stages.{s}"]
    return args


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> tuple[Path, list[str]]:
    """The demo recipe, shrunk, run to the end: (run dir, the --set arguments it ran with)."""
    root = tmp_path_factory.mktemp("ux")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 13, stride=13), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten())
    torch.jit.save(torch.jit.script(net), root / "features.pt")
    sets = _sets(root / "features.pt")
    code, _, err = _cli("run", "--out", root / "demo", "--set", "run.threads=1", *sets)  # 2 jobs (the recipe's)
    assert code == 0, err[-3000:]
    assert "elapsed" in err and "start teacher" in err
    return root / "demo", sets


def _rows(plan: list[dict]) -> list[tuple]:
    return [(r["model"], r["params"], r["inputs"], r["outputs"], r["notes"]) for r in plan]


# ----------------------------------------------------------------------------- item 2


def test_printed_standalone_commands_plan_what_the_recipe_planned(demo):
    run, sets = demo
    report = json.loads((run / "report.json").read_text())
    code, out, err = _cli("run", "--out", run, *sets, "--dry-run", "--json")
    assert code == 0, err
    recipe_plan = json.loads(out)["plan"]
    assert [s["stage"] for s in report["stages"]] == list(dict.fromkeys(r["stage"] for r in recipe_plan))
    for s in report["stages"]:
        argv = shlex.split(s["command"])
        assert argv[:4] == ["snapgen", s["kind"], "--out", str(run / s["stage"])]
        code, out, err = _cli(*argv[1:], "--dry-run", "--json")
        assert code == 0, (s["command"], err)
        want = _rows([r for r in recipe_plan if r["stage"] == s["stage"]])
        assert _rows(json.loads(out)["plan"]) == want, s["command"]

    # the fine-tune that says init_from = "previous" continues the trained UNet: the tiny preset
    # (2.6M), not the default model (snapgen-t2i, ~390M) that a command without --init-from plans
    ft = next(s for s in report["stages"] if s["stage"] == "finetune-64")
    argv = shlex.split(ft["command"])
    assert argv[argv.index("--init-from") + 1] == str(run / "finetune-32")
    assert argv[argv.index("--seed") + 1] == "0"
    trained = sum(p.numel() for p in denoiser.load(run / "finetune-64" / "unet").parameters())
    planned = [r for r in recipe_plan if r["stage"] == "finetune-64"][0]
    assert planned["params"] == trained
    i = argv.index("--init-from")
    code, out, err = _cli(*argv[1:i], *argv[i + 2:], "--dry-run", "--json")  # negative control: the old command
    assert code == 0, err
    assert json.loads(out)["plan"][0]["params"] > 100 * trained
    # "init_from = none" is printed as such (the teacher is built from its preset)
    teacher = shlex.split(next(s["command"] for s in report["stages"] if s["stage"] == "teacher"))
    assert teacher[teacher.index("--init-from") + 1] == "none" and "sd3-tiny" in teacher
    # it resumes the first part's newest checkpoint on all cores, as the recipe stage did
    assert teacher[teacher.index("--resume") + 1] == str(run / "teacher-start")
    assert teacher[teacher.index("--threads") + 1] == "all"
    summary = json.loads((run / "teacher" / "train_summary.json").read_text())
    assert summary["resumed_from"] == str(run / "teacher-start" / "checkpoints" / "step_000001")
    assert summary["steps"] == 2


# ----------------------------------------------------------------------------- item 3


def test_model_with_init_from_is_refused_naming_both_keys(demo):
    run, sets = demo
    code, _, err = _cli("run", "--out", run, *sets, "--set", 'stages.finetune-64.model="tiny"', "--dry-run")
    assert code == 2 and err.count("\n") == 1, err
    from snapgen_cli.recipe import DEMO_RECIPE, load_recipe

    i = [st.name for st in load_recipe(DEMO_RECIPE).stages].index("finetune-64")
    assert err.startswith(f"error: stages[{i}].model: set together with init_from") and 'init_from = "none"' in err
    flags = ("finetune", "--out", run / "x", "--data", run / "precompute", "--resolution", "32", "--dry-run", "--json")
    code, _, err = _cli(*flags, "--init-from", run / "finetune-32", "--set", "model_overrides={layers_per_block=1}")
    assert code == 2 and err.startswith("error: model_overrides: set together with init_from"), err
    code, out, err = _cli(*flags, "--init-from", "none", "--model", "tiny")  # from scratch: model is used
    assert code == 0 and json.loads(out)["plan"][0]["model"] == "unet:tiny", err
    code, out, err = _cli(*flags, "--init-from", run / "finetune-32")  # no model given: the checkpoint's
    assert code == 0 and "its saved architecture" in json.loads(out)["plan"][0]["model"], err


# ----------------------------------------------------------------------------- items 4, 8 (report)


def test_report_shows_every_metric_the_eval_stages_wrote_with_its_reference(demo):
    run, _ = demo
    report = json.loads((run / "report.json").read_text())
    md = (run / "report.md").read_text()
    rows = {e["stage"]: e for e in report["evaluations"]}
    assert list(rows) == ["eval-finetune", "eval-teacher", *FID_EVALS]
    for stage, row in rows.items():
        written = json.loads((run / stage / "eval_report.json").read_text())["metrics"]
        assert row["metrics"] == written  # everything the eval stage wrote, unchanged
    ev = rows["eval"]
    assert set(ev["metrics"]) == {"alignment", "fid", "recon"}
    fid = ev["metrics"]["fid"]
    assert (ev["fid"], ev["kid"]) == (fid["fid"], fid["kid"]) and fid["fid"] > 0
    # the five FID evals read the statistics the fid-reference stage saved once
    assert ev["fid_reference_set"] == str(run / "fid-reference" / "holdout.npz") and ev["fid_reference"] == 6
    saved = json.loads((run / "fid-reference" / "eval_report.json").read_text())["metrics"]["fid"]
    assert saved["reference"] == str(run / "data" / "holdout") and saved["n_reference"] == 6

    section = md.split("## Every metric of every evaluation")[1].split("\n## ")[0]
    table = {line.split(" | ")[0].strip("| "): [c.strip() for c in line.strip("| \n").split(" | ")[1:]]
             for line in section.strip().splitlines()[2:]}
    stages = [c.strip() for c in section.strip().splitlines()[0].strip("| ").split(" | ")[1:]]
    assert stages == list(rows)
    col = stages.index("eval")
    assert table["FID"][col] == f"{fid['fid']:.2f}" and table["KID"][col] == f"{fid['kid']:.4f}"
    assert table["FID / KID reference"][col] == "fid-reference/holdout.npz (6 images)"
    assert table["FID / KID generated"][col] == "6 images (samples)"
    recon = ev["metrics"]["recon"]
    assert table["recon PSNR (dB)"][col] == f"{recon['psnr']:.2f}"
    assert table["recon images"][col] == "data/holdout (6 images, TinyDecoder decoder)"
    al = ev["metrics"]["alignment"]
    assert table["alignment"][col] == f"{al['overall']:.3f} ({al['correct']}/6; chance {al['chance']:.3f})"
    assert table["FID"][stages.index("eval-teacher")] == "-"  # alignment only there
    assert "FID / KID against `fid-reference/holdout.npz` (6 images)." in md
    # the decoder table names the decoder in its own column (it read "autoencoder autoencoder")
    assert "autoencoder autoencoder" not in md
    assert "| autoencoder | AutoencoderKL (its own decoder) | data/holdout (6) |" in md
    assert "| decoder | tiny decoder | data/holdout (6) |" in md and "| eval | TinyDecoder (the pipeline's) |" in md


def test_single_eval_report_still_shows_fid(demo, tmp_path):
    """One eval stage (a user's recipe): FID / KID were left out of the report before."""
    from snapgen_cli.report import write_run_report

    run, _ = demo
    record = json.loads((run / "eval" / ".snapgen-done.json").read_text())
    report = write_run_report(tmp_path, "one", [{**record, "stage": "eval"}], {})
    assert report["evaluations"][0]["fid"] == record["summary"]["metrics"]["fid"]["fid"]
    assert "| FID |" in (tmp_path / "report.md").read_text()


# ----------------------------------------------------------------------------- item 8


def test_generate_grid_has_one_row_per_prompt(demo, tmp_path):
    run, _ = demo
    prompts = ["a photo of a red circle", "a photo of two squares", "a photo of a blue triangle"]
    code, out, err = _cli("generate", *prompts, "--checkpoint", run / "distill", "--images-per-prompt", 4,
                          "--steps", 1, "--out", tmp_path / "g", "--json")
    assert code == 0, err
    w, h = Image.open(tmp_path / "g" / "00000.png").size
    assert Image.open(tmp_path / "g" / "grid.png").size == (4 * w, 3 * h)


def test_eval_contact_sheet_samples_every_prompt(demo, tmp_path):
    run, _ = demo
    prompts = [f"a photo of {c}" for c in ("a red circle", "two squares", "a blue triangle")]
    code, out, err = _cli("eval", "--checkpoint", run / "distill", "--metrics", "fid", "--reference",
                          run / "data" / "holdout", "--inception", run.parent / "features.pt", "--steps", 1,
                          *[a for p in prompts for a in ("--prompts", p)], "--images-per-prompt", 8,
                          "--out", tmp_path / "e", "--json")
    assert code == 0, err
    shown = json.loads(out)["meta"]["contact_sheet_images"]
    by_file = {json.loads(line)["file"]: json.loads(line)["prompt"]
               for line in (tmp_path / "e" / "samples" / "prompts.jsonl").read_text().splitlines()}
    # 16 cells: 3 prompts x 5 images, one row each (it showed the first 16 images: 8 + 8 of two prompts)
    assert [by_file[Path(f).name] for f in shown] == [p for p in prompts for _ in range(5)]
    sheet = Image.open(tmp_path / "e" / "contact_sheet.png")
    assert sheet.width == 5 * (256 + 8) + 8


# ----------------------------------------------------------------------------- item 6


def test_threads_flag_sets_the_stage_threads_and_restores_the_callers(demo, tmp_path, monkeypatch):
    """The training loop records torch's thread count while it trains (its summary)."""
    from snapgen_cli import cpu

    run, _ = demo
    torch.set_num_threads(2)  # the caller's count, which --threads must override and restore
    args = ("pretrain", "--data", run / "precompute-classes", "--model", "tiny", "--resolution", 32,
            "--steps", 1, "--batch-size", 2, "--tracker", "none", "--json")
    code, out, err = _cli(*args, "--threads", 1, "--out", tmp_path / "t")
    assert code == 0, err
    assert json.loads(out)["threads"] == 1 and f"threads: 1 (--threads); {cpu.describe_wait()}" in err
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(cpu, "available_cpus", lambda root=None: 3)  # --threads all: every available core
    code, out, err = _cli(*args, "--threads", "all", "--out", tmp_path / "all")
    assert code == 0, err
    assert json.loads(out)["threads"] == 3 and "threads: 3 (--threads all); " in err
    assert torch.get_num_threads() == 2


def test_default_threads_follow_the_affinity_mask_and_bounded_spinning(demo, tmp_path):
    run, _ = demo
    if not shutil.which("taskset") or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs taskset and affinity masks")
    from snapgen_cli.cpu import SPIN_COUNT

    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "LOCAL_WORLD_SIZE")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    cpu = sorted(os.sched_getaffinity(0))[0]
    proc = subprocess.run(["taskset", "-c", str(cpu), sys.executable, "-m", "snapgen_cli", "pretrain", "--data",
                           str(run / "precompute-classes"), "--model", "tiny", "--resolution", "32", "--steps", "1",
                           "--batch-size", "2", "--tracker", "none", "--out", str(tmp_path / "t"), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout)["threads"] == 1
    assert f"threads: 1 (1 core available); OpenMP wait: spin {SPIN_COUNT} then sleep (GOMP_SPINCOUNT)" in proc.stderr


@pytest.mark.parametrize("given, expected", [
    ({}, "2000 None 10000"),                           # the default: bounded spinning, longer in run's workers
    ({"OMP_WAIT_POLICY": "PASSIVE"}, "None PASSIVE None"),  # the user's policy is kept, no spin count added
    ({"GOMP_SPINCOUNT": "500"}, "500 None 500"),            # the user's spin count is kept, in the workers too
])
def test_bounded_spin_wait_leaves_the_users_choice(given, expected):
    """GOMP_SPINCOUNT of a command, its OMP_WAIT_POLICY, and GOMP_SPINCOUNT of `snapgen run --jobs`'s workers."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(given, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    code = ("import os; from snapgen_cli.cpu import bounded_spin_wait, runner_wait_env, SPIN_COUNT, RUNNER_SPIN_COUNT; "
            "assert (SPIN_COUNT, RUNNER_SPIN_COUNT) == (2000, 10000); bounded_spin_wait(); "
            "print(os.environ.get('GOMP_SPINCOUNT'), os.environ.get('OMP_WAIT_POLICY'), "
            "runner_wait_env(dict(os.environ)).get('GOMP_SPINCOUNT'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == expected.split()


def test_default_threads_divide_the_cores_and_honour_quotas(tmp_path, monkeypatch):
    from snapgen_cli import cpu

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cores = len(os.sched_getaffinity(0))
    none = tmp_path / "none"  # no cgroup files: the affinity mask decides
    none.mkdir()
    assert cpu.default_threads(none) == (cores, f"{cores} core{'s' if cores > 1 else ''} available")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert cpu.default_threads(none)[0] == max(1, cores // 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu.default_threads(none) == (3, "$OMP_NUM_THREADS")
    v2, v1 = tmp_path / "v2", tmp_path / "v1"
    v2.mkdir()
    (v1 / "cpu").mkdir(parents=True)
    (v2 / "cpu.max").write_text("150000 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu.cgroup_cpu_limit(v2) == 1.5 and cpu.cgroup_cpu_limit(v1) == 1.0
    assert cpu.available_cpus(v2) == 1 and cpu.available_cpus(v1) == 1  # rounded down
    (v2 / "cpu.max").write_text("max 100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cpu.cgroup_cpu_limit(v2) is None and cpu.cgroup_cpu_limit(v1) is None


def test_run_threads_reach_every_stage_and_its_printed_command(tmp_path):
    from snapgen_cli.recipe import DEMO_RECIPE, _context, load_recipe, resolve_stage
    from snapgen_cli.report import standalone_command

    rec = load_recipe(DEMO_RECIPE, ("run.threads=2", "stages.eval.threads=1"))
    cfgs = {st.name: resolve_stage(rec, st, _context(rec, st, tmp_path, True, None)) for st in rec.stages}
    # [run] threads fills every stage that sets none; the demo's own settings stay
    own = {"eval": 1, "teacher-start": 1, "autoencoder": "all", "teacher": "all", "distill": "all"}
    assert {n: c.threads for n, c in cfgs.items()} == {n: own.get(n, 2) for n in cfgs}
    assert "--threads 2" in standalone_command("pretrain", cfgs["pretrain"], tmp_path / "pretrain")
    assert "--threads all" in standalone_command("teacher", cfgs["teacher"], tmp_path / "teacher")
    assert load_recipe(DEMO_RECIPE).run.threads is None


# ----------------------------------------------------------------------------- item 7: stages side by side


def test_demo_stage_graph_lets_the_teacher_train_beside_the_student():
    from snapgen_cli.recipe import DEMO_RECIPE, load_recipe
    from snapgen_cli.schedule import stage_dependencies

    after = stage_dependencies(load_recipe(DEMO_RECIPE), Path("runs/x"))
    assert after["teacher-start"] == ["precompute"]  # not the student's chain, nor the tiny decoder
    assert after["teacher"] == ["precompute", "teacher-start"]  # resumes its checkpoint
    assert after["eval-teacher"] == ["teacher", "decoder"]
    assert after["finetune-64"] == ["precompute", "decoder", "finetune-32"]  # init_from = "previous"
    assert after["pretrain"] == ["precompute-classes"]
    assert after["distill"] == ["precompute", "teacher", "decoder", "finetune-64"]
    assert after["eval-4step"] == ["data", "fid-reference", "step-distill"]  # reads the saved FID reference
    assert after["eval-4step-before"] == ["data", "fid-reference", "distill"] and after["fid-reference"] == ["data"]
    assert after["data"] == [] and after["bench-export"] == ["export"]
    assert load_recipe(DEMO_RECIPE).run.jobs == 2


def test_two_jobs_give_bitwise_the_results_of_one(demo, tmp_path):
    """The fixture ran the shrunk demo with the recipe's 2 jobs (one worker process per job); here
    the same recipe runs in order in this process. Every weight file and every metric is equal."""
    run, sets = demo
    code, _, err = _cli("run", "--out", tmp_path / "seq", "--set", "run.threads=1", "--jobs", 1, *sets)
    assert code == 0, err[-3000:]
    assert "start teacher" not in err and not (tmp_path / "seq" / "logs").exists()
    weights = sorted(p.relative_to(run) for p in run.rglob("*.safetensors"))
    assert len(weights) > 20 and weights == sorted(p.relative_to(tmp_path / "seq")
                                                   for p in (tmp_path / "seq").rglob("*.safetensors"))
    differ = [str(w) for w in weights if (run / w).read_bytes() != (tmp_path / "seq" / w).read_bytes()]
    assert not differ, differ
    for stage in FID_EVALS:
        a = json.loads((run / stage / "eval_report.json").read_text())["metrics"]
        b = json.loads((tmp_path / "seq" / stage / "eval_report.json").read_text())["metrics"]
        assert a["alignment"] == b["alignment"] and a["fid"]["fid"] == b["fid"]["fid"], stage
    par, seq = (json.loads((d / "report.json").read_text()) for d in (run, tmp_path / "seq"))
    assert par["jobs"] == 2 and seq["jobs"] == 1
    assert par["elapsed_s"] > 0 and "elapsed with 2 stages at once" in (run / "report.md").read_text()
    assert (run / "logs" / "teacher.log").stat().st_size > 0
    spans = sorted((s["start_s"], s["end_s"]) for s in seq["stages"])  # in order: no two stages overlap
    assert all(b[0] >= a[1] - 0.05 for a, b in zip(spans, spans[1:], strict=False)), spans


def test_the_report_times_each_stage_and_its_dependencies_end_before_it_starts(demo):
    """report.json gives each stage its threads and its start and end (seconds after the run's first
    stage started); with 2 jobs every stage starts after the stages it reads have ended, some stages
    overlap, and the stages held at most all the cores."""
    from snapgen_cli.cpu import available_cpus
    from snapgen_cli.recipe import DEMO_RECIPE, load_recipe
    from snapgen_cli.schedule import stage_dependencies

    run, _ = demo
    report = json.loads((run / "report.json").read_text())
    stages = {s["stage"]: s for s in report["stages"]}
    assert all(s["threads"] >= 1 and 0 <= s["start_s"] < s["end_s"] for s in stages.values()), stages
    assert stages["teacher"]["threads"] == min(2, available_cpus()) and stages["pretrain"]["threads"] == 1  # "all", 1
    assert min(s["start_s"] for s in stages.values()) == 0
    assert max(s["end_s"] for s in stages.values()) <= report["elapsed_s"]
    after = stage_dependencies(load_recipe(DEMO_RECIPE), run)
    late = [(name, dep) for name, deps in after.items() for dep in deps
            if stages[name]["start_s"] < stages[dep]["end_s"] - 0.05]
    assert not late, late
    if available_cpus() >= 2:
        overlapping = [(a, b) for a in stages for b in stages if a < b and stages[a]["start_s"] < stages[b]["end_s"]
                       and stages[b]["start_s"] < stages[a]["end_s"]]
        assert overlapping
    assert 0 < report["cores_busy"] <= 1.0, report["cores_busy"]
    md = (run / "report.md").read_text()
    assert "| # | stage | kind | threads | start (s) | end (s) | wall time (s) | |" in md
    assert f"of the {report['cores']} cores' time" in md


def test_a_failing_stage_stops_new_starts_and_names_itself_and_its_log(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('''
[run]
jobs = 2
[[stages]]
name = "a"
kind = "shapes-data"
n_captioned = 8
n_classes = 4
n_holdout = 2
[[stages]]
name = "gen"
kind = "generate"
checkpoint = "@a/captioned"
prompts = ["a red circle"]
[[stages]]
name = "b"
kind = "shapes-data"
n_captioned = 8
n_classes = 4
n_holdout = 2
[[stages]]
name = "after-gen"
kind = "generate"
checkpoint = "@gen"
prompts = ["a red circle"]
''')
    code, _, err = _cli("run", recipe, "--out", tmp_path / "run")
    lines = [ln for ln in err.splitlines() if "error" in ln.lower()]
    assert code == 2, err[-2000:]
    assert lines and "stage 'gen' failed:" in lines[-1] and "logs/gen.log" in lines[-1], err[-2000:]
    # "b" started beside "a" (it reads nothing of "a") and finished after "gen" failed
    assert all((tmp_path / "run" / s / ".snapgen-done.json").is_file() for s in ("a", "b"))
    assert not (tmp_path / "run" / "after-gen").exists()  # never started
    assert "no model_index.json" in (tmp_path / "run" / "logs" / "gen.log").read_text()


def test_a_stage_waits_for_the_cores_its_threads_need_and_nothing_overtakes_it(tmp_path, monkeypatch):
    """Threads are a budget (2 cores here): "big" (threads = "all") waits until "a" is done, and "c"
    (ready, one thread, listed after "big") does not take the free core meanwhile; nothing runs
    beside "big"; then "c" and "d" run side by side."""
    from snapgen_cli import cpu

    monkeypatch.setattr(cpu, "available_cpus", lambda root=None: 2)
    body = 'kind = "shapes-data"\nn_captioned = 8\nn_classes = 4\nn_holdout = 2\n'
    recipe = tmp_path / "r.toml"
    recipe.write_text("[run]\njobs = 2\n" + "".join(
        f'[[stages]]\nname = "{n}"\n{body}' + (f"threads = {t}\n" if t else "")
        for n, t in (("a", "1"), ("big", '"all"'), ("c", None), ("d", None))))
    code, _, err = _cli("run", recipe, "--out", tmp_path / "run")
    assert code == 0, err[-2000:]
    events = [" ".join(ln.split()[:2]) if ln.startswith("start") else f"done {ln.split()[2]}"
              for ln in err.splitlines() if ln.startswith(("start ", "done ["))]
    assert events[:4] == ["start a", "done a", "start big", "done big"], events
    assert sorted(events[4:6]) == ["start c", "start d"], events  # then two at once again
    assert "start big (shapes-data, 2 threads (all);" in err


def test_jobs_are_refused_under_a_distributed_launch(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _cli("run", "--out", tmp_path / "run", "--only", "data", "--jobs", 2, "--dry-run")
    assert code == 0, err  # a dry run starts nothing
    code, _, err = _cli("run", "--out", tmp_path / "run", "--jobs", 2, "--set", "stages.data.n_captioned=8")
    assert code == 2 and err.count("\n") == 1 and "WORLD_SIZE" in err and "--jobs 1" in err, err
    assert not (tmp_path / "run" / "data").exists()
