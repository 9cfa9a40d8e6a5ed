import os
import socket
import sys
import tempfile

import pytest
import torch

# Small, deterministic CPU runs: tests must give the same numbers on any 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Derived files (the Inception's ONNX conversion) in one test cache, not the user's ~/.cache/snapgen.
os.environ.setdefault("SNAPGEN_CACHE", os.path.join(tempfile.gettempdir(), "snapgen-test-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a test module (``pytestmark = pytest.mark.usefixtures("one_thread")``): tiny
    models run fastest on one; two spin-waiting threads on a busy 2-core machine make a 4x4 conv ~300x
    slower and a tiny UNet's training step ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_cli(capsys):
    """Run the console entry point in-process; return (exit code, stdout, stderr)."""
    from snapgen_cli.cli import main

    def _run(*args):
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return _run


@pytest.fixture
def accelerate_launch():
    """argv prefix of a real 2-process CPU `accelerate launch` on a free port."""
    return launch_argv()


def launch_argv() -> list[str]:
    """argv prefix of a real 2-process CPU `accelerate launch` on a free port (for module-scoped fixtures).

    CPU-only: `--multi_gpu` picks the torchrun launcher; `--cpu --num_processes 2` would start one process.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def kill_after(proc, path, timeout: float = 300) -> None:
    """SIGKILL ``proc`` as soon as ``path`` exists (e.g. a checkpoint dir); fail if the process
    ends first or nothing appears within ``timeout`` seconds. Reaps the process."""
    import signal
    import time

    try:
        deadline = time.monotonic() + timeout
        while not path.is_dir():
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"the process ended before {path} appeared: {err[-2000:] if err else ''}")
            assert time.monotonic() < deadline, f"{path} did not appear"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL


# ------------------------------------------------------------------ distillation fixtures

FAST = dict(resolution=32, lr_reference_batch=4, tracker="none", ema_decay=0.9, checkpoint_every=1000)


@pytest.fixture(scope="session")
def kd(tmp_path_factory):
    """Shards with student and teacher text (MiniLM for both: stored once), a tiny DiT teacher
    trained on the teacher's features, and a tiny UNet student trained briefly."""
    from test_train_e2e import _tiny_vae, captioned_images

    from snapgen_cli.stages import finetune, precompute
    from snapgen_cli.stages.base import StageContext

    root = tmp_path_factory.mktemp("kd")
    vae = _tiny_vae(root / "vae")
    images = captioned_images(root / "images")
    precompute.run(precompute.Config(source=str(images), resolutions=[32], vae=str(vae), vae_subfolder=None,
                                     encoders="minilm", teacher_encoders="minilm", text_max_length=8, dtype="fp32"),
                   StageContext(out_dir=root / "pre"))
    finetune.run(finetune.Config(data=str(root / "pre"), init_from=None, model="sd3-tiny", text_role="teacher",
                                 steps=120, batch_size=4, lr=2e-3, **FAST), StageContext(out_dir=root / "teacher"))
    finetune.run(finetune.Config(data=str(root / "pre"), init_from=None, model="tiny", steps=10, batch_size=4,
                                 lr=1e-3, **FAST), StageContext(out_dir=root / "student"))
    return root
