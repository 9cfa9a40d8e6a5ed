import os
import socket
import sys

import pytest
import torch

# Small, deterministic CPU runs: tests must give the same numbers on any 2-core machine.
torch.set_num_threads(min(2, os.cpu_count() or 1))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
    """argv prefix of a real 2-process CPU `accelerate launch` on a free port.

    CPU-only: `--multi_gpu` picks the torchrun launcher; `--cpu --num_processes 2` would start one process.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]
