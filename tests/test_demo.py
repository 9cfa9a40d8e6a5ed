"""The embedded default, shortened: `snapgen run` (the bundled demo recipe) with fewer steps.

Every stage of the paper's sequence really trains at toy scale; the test checks the run
report, and the tiny decoder's PSNR on the held-out images against a threshold an untrained
decoder does not reach (18 dB; untrained ~12 dB; the full demo reaches ~24 dB).

Known gap (issue 7): the alignment suite's figures are checked for presence and range only.
At this shortened length the UNet is far from trained (overall ~0.02 against a measured chance
level of ~0.2); the full demo reaches ~0.2, not yet clearly above chance.
"""

import json

import pytest

SHORT = [
    "data.n_captioned=600", "data.n_classes=300", "data.n_holdout=48",
    "autoencoder.steps=250", "decoder.steps=200", "decoder.adv_start_step=100",
    "pretrain.steps=100", "finetune-32.steps=150", "finetune-64.steps=350",
    "eval.alignment_n=60",
]


@pytest.mark.slow
def test_shortened_demo_trains_every_stage_and_passes_quality_thresholds(tmp_path, run_cli):
    args = ["run", "--out", tmp_path / "demo", "--json"]
    for s in SHORT:
        args += ["--set", f"stages.{s}"]
    code, out, err = run_cli(*args)
    assert code == 0, err[-3000:]
    stages = [s["stage"] for s in json.loads(out)["stages"]]
    assert stages == ["data", "autoencoder", "decoder", "precompute-classes", "precompute", "pretrain",
                      "finetune-32", "finetune-64", "generate", "eval"]

    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    md = (tmp_path / "demo" / "report.md").read_text()
    assert "![sample grid](generate/grid.png)" in md and "snapgen finetune --out" in md
    assert all(s["wall_s"] > 0 for s in report["stages"])

    tiny = report["decoder"]["decoder"]["tiny_decoder"]
    assert tiny["psnr"] > 18.0, tiny
    assert report["decoder"]["pipeline_recon"]["decoder"] == "TinyDecoder"

    al = report["alignment"]
    print("alignment", al["overall"], "chance", al["chance"], {k: v["accuracy"] for k, v in al["categories"].items()})
    assert 0.0 < al["chance"] < 0.35
    assert 0.0 <= al["overall"] <= 1.0 and al["total"] == 60
    assert set(al["categories"]) == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
