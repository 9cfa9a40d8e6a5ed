"""Tiny training tasks for the loop tests; also runnable as a script, so tests can kill it
or start it under ``accelerate launch``:

    python tests/_loop_script.py --out DIR --steps 15 --checkpoint-every 5 [--step-delay 0.2]
    accelerate launch --multi_gpu --num_processes 2 tests/_loop_script.py --out DIR --batch-size 2 [--fsdp]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from PIL import Image
from torch import nn
from torch.utils.data import TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from snapgen_cli.core.flow import RectifiedFlow, sample  # noqa: E402
from snapgen_cli.core.unet import build_unet  # noqa: E402
from snapgen_cli.cpu import close_process_group  # noqa: E402
from snapgen_cli.train.loop import LoopConfig, StepContext, TrainTask, train  # noqa: E402


class ToyVelocity(ModelMixin, ConfigMixin):
    """A few-hundred-parameter velocity net: two 3x3 convs with a timestep scale/shift."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, channels: int = 4, hidden: int = 16):
        super().__init__()
        self.conv_in = nn.Conv2d(channels, hidden, 3, padding=1)
        self.time = nn.Linear(1, 2 * hidden)
        self.conv_out = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        scale, shift = self.time(timestep.reshape(-1, 1).to(x.dtype) / 1000).chunk(2, dim=1)
        h = F.silu(self.conv_in(x) * (1 + scale[..., None, None]) + shift[..., None, None])
        return self.conv_out(h)


class ShardedTensors(TensorDataset):
    """A TensorDataset cut into shards of ``shard`` samples (as ``ShardDataset.shard_ranges``
    reports them), so the loop shuffles it in shard windows."""

    def __init__(self, *tensors: torch.Tensor, shard: int = 3):
        super().__init__(*tensors)
        self.shard = shard

    def shard_ranges(self) -> list[range]:
        return [range(i, min(i + self.shard, len(self))) for i in range(0, len(self), self.shard)]


class FlowTask(TrainTask):
    """Rectified-flow regression of a fixed set of random 4x8x8 "latents" (Eq. 1-2), with
    :class:`ToyVelocity` or (``unet=True``) the tiny SnapGen UNet on a fixed random context."""

    def __init__(self, n: int = 16, step_delay: float = 0.0, nan_at: int | None = None, unet: bool = False):
        torch.manual_seed(0)
        self.model = build_unet("tiny", block_channels=(16, 32, 32), attention_head_dim=16) if unet else ToyVelocity()
        self.context = (torch.randn(1, 3, 64), torch.randn(1, 64)) if unet else None
        self.data = ShardedTensors(torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.3)
        self.objective = RectifiedFlow()
        self.step_delay, self.nan_at = step_delay, nan_at

    def trainables(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def dataset(self):
        return self.data

    def collate(self, items):
        return torch.stack([x for (x,) in items])

    def loss(self, phase: str, batch: torch.Tensor, ctx: StepContext):
        x0 = batch.to(ctx.device)
        t = self.objective.sample_timesteps(len(x0), ctx.generators, ctx.device)
        noise = ctx.randn(*x0.shape[1:])
        pred = self._predict(ctx.models["model"], self.objective.noisy(x0, noise, t), self.objective.model_timestep(t))
        mse = F.mse_loss(pred.float(), self.objective.target(x0, noise, t))
        if ctx.step == self.nan_at:
            mse = mse * float("nan")
        time.sleep(self.step_delay)
        return mse, {"mse": mse, "sigma_mean": t.mean()}

    def _predict(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.context is None:
            return model(x, t)
        ctx, pooled = (c.to(x.device).expand(len(x), *c.shape[1:]) for c in self.context)
        return model(x, t, ctx, pooled).sample

    def sample_grid(self, model: nn.Module, step: int) -> Image.Image:
        noise = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        x = sample(lambda x, t, c: self._predict(model, x, t), noise, steps=4, cond=None)
        row = torch.cat(list(x[:, 0]), dim=1)
        pixels = ((row.clamp(-1, 1) + 1) * 127.5).to(torch.uint8).numpy()
        return Image.fromarray(pixels).resize((row.shape[1] * 8, row.shape[0] * 8), Image.NEAREST)


class GanTask(TrainTask):
    """A toy GAN on 2-D points: alternating generator / discriminator phases."""

    main = "generator"

    def __init__(self):
        torch.manual_seed(0)
        self.g, self.d = nn.Linear(4, 2), nn.Sequential(nn.Linear(2, 8), nn.SiLU(), nn.Linear(8, 1))
        self.data = ShardedTensors(torch.randn(64, 2, generator=torch.Generator().manual_seed(1)) * 0.5 + 3, shard=8)
        self.calls: list[tuple[str, dict[str, bool]]] = []

    def trainables(self):
        return {"generator": self.g, "discriminator": self.d}

    def phases(self):
        return {"generator": ("generator",), "discriminator": ("discriminator",)}

    def dataset(self):
        return self.data

    def collate(self, items):
        return torch.stack([x for (x,) in items])

    def loss(self, phase: str, batch: torch.Tensor, ctx: StepContext):
        self.calls.append((phase, {n: all(p.requires_grad for p in m.parameters())
                                   for n, m in self.trainables().items()}))
        g, d = ctx.models["generator"], ctx.models["discriminator"]
        fake = g(ctx.randn(4))
        if phase == "generator":
            return F.softplus(-d(fake)).mean(), {}
        real_term, fake_term = F.softplus(-d(batch.to(ctx.device))).mean(), F.softplus(d(fake.detach())).mean()
        return real_term + fake_term, {"real": real_term, "fake": fake_term}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--task", default="flow", help="flow, gan, or both (into OUT/flow and OUT/gan)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--checkpoint-every", type=int, default=5)
    ap.add_argument("--step-delay", type=float, default=0.0)
    ap.add_argument("--sample-every", type=int, default=0)
    ap.add_argument("--resume", default=None)
    ap.add_argument("--fsdp", action="store_true")
    a = ap.parse_args(argv)
    cfg = LoopConfig(steps=a.steps, batch_size=a.batch_size, grad_accum=a.grad_accum, lr=1e-2, lr_reference_batch=4,
                     checkpoint_every=a.checkpoint_every, sample_every=a.sample_every, keep_checkpoints=None,
                     tracker="none", shuffle_window_shards=2, fsdp=a.fsdp)
    names = ["flow", "gan"] if a.task == "both" else [a.task]
    for name in names:
        task = FlowTask(step_delay=a.step_delay) if name == "flow" else GanTask()
        summary = train(task, cfg, Path(a.out) / name if len(names) > 1 else a.out, resume=a.resume)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(summary))


if __name__ == "__main__":
    done = False
    try:
        main()
        done = True
    finally:
        close_process_group(wait=done)  # as the console entry point does
