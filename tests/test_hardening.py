"""Hostile and careless use: nothing outside a run is touched, failures are one clear line.

Each test here failed on the main before issue 12's fixes (the note on the issue says how).
"""

from __future__ import annotations

import json
import os
import resource
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from test_recipe_cli import BENCH


def _recipe(tmp_path, name="a", out=None) -> Path:
    """test_recipe_cli's two-stage bench-device recipe, its first stage named ``name``."""
    p = tmp_path / "r.toml"
    p.write_text(BENCH.format(out=out or tmp_path / "run").replace('name = "a"', f"name = {json.dumps(name)}", 1))
    return p


def _one_line(code, err, exit_code, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == exit_code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]


# ------------------------------------------------------------------ 1. nothing outside the run


@pytest.mark.parametrize("name", ["..", ".", "../x", "a/b", ".hidden", "", "x" * 65, "a b"])
def test_unsafe_stage_names_are_refused_and_fresh_touches_nothing(tmp_path, run_cli, name):
    run = tmp_path / "parent" / "run"
    run.mkdir(parents=True)
    beside = tmp_path / "parent" / "keep.txt"
    beside.write_text("precious")
    (run / "other").mkdir()
    code, _, err = run_cli("run", _recipe(tmp_path, name=name, out=run), "--fresh")
    _one_line(code, err, 2, "stages[0].name")
    assert beside.read_text() == "precious" and (run / "other").is_dir()


def test_fresh_refuses_to_delete_a_stage_dir_that_resolves_outside_the_run(tmp_path, run_cli):
    """A stage folder replaced by a symlink to somewhere else is not followed by --fresh."""
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.bin").write_text("precious")
    run.mkdir()
    (run / "a").symlink_to(elsewhere)
    code, _, err = run_cli("run", _recipe(tmp_path, out=run), "--fresh")
    _one_line(code, err, 2, "refusing to delete", "not a folder inside the run dir")
    assert (elsewhere / "data.bin").read_text() == "precious"


# ------------------------------------------------------------------ 3. OS failures: one line


def test_out_under_a_file_is_one_line_exit_1(tmp_path, run_cli):
    (tmp_path / "file").write_text("x")
    code, _, err = run_cli("shapes-data", "--out", tmp_path / "file" / "sub", "--n-captioned", "2",
                           "--n-classes", "2", "--n-holdout", "2")
    _one_line(code, err, 1, str(tmp_path / "file"))


def test_unknown_tracker_is_a_usage_error(tmp_path, run_cli):
    code, _, err = run_cli("pretrain", "--data", tmp_path, "--out", tmp_path / "o", "--tracker", "bogus")
    _one_line(code, err, 2, "--tracker", "tensorboard", "wandb")


@pytest.fixture
def tiny_fs(tmp_path):
    """A 256 KiB tmpfs (root only; skipped with the reason elsewhere)."""
    mnt = tmp_path / "tiny_fs"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({res.stderr.strip() or 'mount failed'})")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_disk_full_is_one_line_exit_1_and_keeps_what_was_written(tiny_fs, run_cli):
    keep = tiny_fs / "keep.json"
    keep.write_text('{"ok": 1}')
    code, _, err = run_cli("shapes-data", "--out", tiny_fs / "data", "--n-captioned", "3000", "--n-classes", "2",
                           "--n-holdout", "2")
    _one_line(code, err, 1, "No space left on device", "free some space")
    assert json.loads(keep.read_text()) == {"ok": 1}
    assert not (tiny_fs / "data" / "captioned").exists()  # no half-written folder took the final name


def test_file_size_limit_is_one_line_exit_1(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    res = subprocess.run([sys.executable, "-m", "snapgen_cli", "shapes-data", "--out", str(tmp_path / "d"),
                          "--n-captioned", "2", "--n-classes", "400", "--n-holdout", "2"],
                         capture_output=True, text=True, preexec_fn=limit, timeout=300)
    _one_line(res.returncode, res.stderr, 1, "File too large", "ulimit -f")


# ------------------------------------------------------------------ 4. changed settings


def test_a_finished_stage_with_changed_settings_is_refused_not_skipped(tmp_path, run_cli):
    p = _recipe(tmp_path)
    assert run_cli("run", p)[0] == 0
    code, _, err = run_cli("run", p, "--set", "stages.a.resolution=96")
    _one_line(code, err, 2, "stage 'a' ran with other settings", "resolution: 64 then, 96 now",
              "--fresh --from a")
    code, out, err = run_cli("run", p, "--set", "stages.a.resolution=96", "--fresh", "--from", "a", "--json")
    assert code == 0, err
    assert [s["skipped"] for s in json.loads(out)["stages"]] == [False, False]
    # unchanged settings: skipped as before
    code, out, _ = run_cli("run", p, "--set", "stages.a.resolution=96", "--json")
    assert code == 0 and [s["skipped"] for s in json.loads(out)["stages"]] == [True, True]


# ------------------------------------------------------------------ 7. the umask


def test_written_files_follow_the_umask(tmp_path):
    from snapgen_cli.files import atomic_write_json

    atomic_write_json(tmp_path / "x.json", {"a": 1})
    mode = stat.S_IMODE((tmp_path / "x.json").stat().st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask, oct(mode)


# ------------------------------------------------------------------ 9. flags take recipe values


def test_optional_settings_can_be_unset_and_paths_stay_strings(tmp_path, run_cli):
    from snapgen_cli.stages import pretrain

    cfg = pretrain.Config(max_grad_norm="none", keep_checkpoints="null", data="123")
    assert cfg.max_grad_norm is None and cfg.keep_checkpoints is None and cfg.data == "123"
    code, out, err = run_cli("pretrain", "--data", "123", "--out", tmp_path / "o", "--max-grad-norm", "none",
                             "--keep-checkpoints", "none", "--seed", "none", "--dry-run")
    _one_line(code, err, 2, "data: 123 holds no manifest.json")  # the path reached the stage as "123"
    code, _, err = run_cli("pretrain", "--data", "x", "--out", tmp_path / "o", "--keep-checkpoints", "many")
    _one_line(code, err, 2, "--keep-checkpoints")
