"""The distillation teacher: a frozen SD3-family DiT (paper sec. 3.3, Eq. 4-8, Fig. 5).

The teacher is ``diffusers.SD3Transformer2DModel`` -- SD3.5-Large in the paper ("powerful
SD3.5-Large model [4] can be used as the teacher for output distillation"). This module
names its configs (:data:`TEACHER_PRESETS`), loads it frozen (:func:`load_teacher`) and
calls it once per training step for both distillation targets (:func:`teacher_forward`):

* the **output** target of Eq. 4, ``v_{theta_T}(x_t, t)``: SD3's output is the rectified-flow
  velocity ``noise - x_0``, the student's target (Eq. 2). Sign convention checked in
  diffusers: ``FlowMatchEulerDiscreteScheduler.scale_noise`` noises as
  ``x_t = sigma * noise + (1 - sigma) * x_0`` and ``step`` integrates
  ``x_{next} = x_t + (sigma_next - sigma) * v`` (so ``v = dx_t/dsigma = noise - x_0``);
  diffusers' SD3 DreamBooth script trains on ``target = noise - model_input``. The teacher
  gets ``timestep = sigma * 1000`` (the scheduler's ``timesteps``), the student's convention
  (``core.flow.RectifiedFlow.model_timestep``), with the same shifted sigma;
* the **feature** target of Eq. 5, ``f^{l_T}_{theta_T}(x_t, t)`` at "the last layer": the
  image-token output of the last ``JointTransformerBlock``, i.e. the tokens that
  ``norm_out -> proj_out -> unpatchify`` turn into the velocity, as a feature map
  (B, heads x head_dim, H/p, W/p) -- tokens are row-major on the (H/p, W/p) patch grid
  (``PatchEmbed``: conv, ``flatten(2).transpose(1, 2)``). The student's projector psi
  ("two Conv layers") maps its last feature map to this width and grid.

Conditioning is SD3.5's own: ``context`` (B, 77 + 256, 4096) and ``pooled`` (B, 2048), as
``core.text.combine`` builds them with the ``teacher()`` spec set (CLIP-L + CLIP-G
penultimate states zero-padded to 4096, then T5-XXL; pooled = the two CLIP projections).
SD3 takes no attention mask (``encode_prompt`` passes none), so ``combine``'s mask is not used.

Presets, from the published ``transformer/config.json`` of the hub repos (the values are
also in the public loaders that rebuild these models offline, e.g. single-file / fp8
loaders, which agree with each other):

* ``sd35-large`` -- ``stabilityai/stable-diffusion-3.5-large``: 38 layers, 38 heads x 64
  (inner 2432), ``caption_projection_dim`` 2432, ``joint_attention_dim`` 4096,
  ``pooled_projection_dim`` 2048, patch 2, 16 in/out channels, ``pos_embed_max_size`` 192,
  ``qk_norm`` "rms_norm", ``sample_size`` 128, no ``dual_attention_layers`` (plain MMDiT).
  8,056,627,520 parameters + the 192^2 x 2432 positional table (89,653,248, a persistent
  buffer saved in the checkpoint) = **8,146,280,768**: the published "8.1B".
* ``sd35-medium`` -- ``stabilityai/stable-diffusion-3.5-medium``: 24 layers, 24 heads x 64
  (inner 1536), ``caption_projection_dim`` 1536, ``dual_attention_layers`` 0..12 (MMDiT-X:
  a second, image-only self-attention), ``pos_embed_max_size`` 384, the rest as Large.
  2,243,171,520 parameters + 384^2 x 1536 table (226,492,416) = **2,469,663,936**: the
  published "2.5B" (the figure counts the table: without it 2.24B would round to 2.2B).
* ``tiny`` -- tests and the CPU demo: 3 layers, 2 heads x 32, the first block dual-attention
  (MMDiT-X as in Medium; both block kinds exercised): 467,344 parameters + a 64^2 x 64 table
  (262,144) at 4 channels and 64-wide text; ``in_channels`` / ``out_channels`` /
  ``joint_attention_dim`` / ``pooled_projection_dim`` come from the data
  (:func:`data_overrides`: latent channels and the teacher's text layout).

Memory at the paper's scale (sup. G: batch 32 per 80 GB A100 at 1024^2 with distillation,
48 without, gradient checkpointing; 1024^2 px = a 128^2 latent = 64^2 = 4096 image tokens,
+ 333 text tokens). Estimates, not measurements:

* teacher weights, bf16: 8.15B x 2 B = **16.3 GB**; no gradients, no optimizer state;
* student (379M) with AdamW: fp32 weights (the master copy under bf16 autocast) 1.5 GB +
  grads 1.5 GB + two moments 3.0 GB + an fp32 EMA copy 1.5 GB = **~7.6 GB**;
* teacher activations under ``no_grad``, one block alive at a time: one hidden state
  (32, 4429, 2432) bf16 is 0.69 GB and a block holds ~10 of that size at its peak (x, the
  normed x, q/k/v, attention out, the 4x-wide MLP hidden) -> **~7-9 GB transient**
  (~2 GB if the teacher runs the batch in chunks of 8) -- with a fused attention kernel
  (flash / memory-efficient SDPA, PyTorch's default for bf16 on A100): the plain math path
  would materialise (32, 38, 4429, 4429) scores, 48 GB; the returned fp32 feature map
  (32, 2432, 64, 64) is 1.3 GB;
* student activations with checkpointing: what is left. Without distillation 48 samples
  fit in 80 - 7.6 GB, i.e. <= ~1.5 GB a sample; the teacher costs 16.3 + ~8 + 1.3 ~ 26 GB,
  about 17 samples' worth -- the paper's drop from 48 to 32 a GPU. So **teacher and student
  fit together on one 80 GB GPU at batch 32 with the teacher in bf16**, tightly.

Compute: the teacher forward at batch 32 is ~2.5 PFLOP (2 x 8.05B x 4429 x 32 + attention),
~15x the student's forward + backward + checkpoint recompute (645 GMACs a sample: 2 x 645G
x 4 passes x 32 = 0.17 PFLOP) -- the teacher dominates the step. What helps
when memory does not fit (a larger batch, a smaller GPU):

* ``load_teacher(device="cuda:1")``: the teacher on its own GPU; :func:`teacher_forward`
  moves the inputs there and the outputs back to the student's device;
* ``load_teacher(offload=True)``: accelerate's ``cpu_offload``: weights stay in CPU RAM and
  stream to the GPU one layer at a time (tens of MB on the GPU). It copies 16.3 GB host ->
  device per teacher call (~0.7-1.6 s at 10-25 GB/s), small next to the teacher's own
  compute at batch 32 (seconds); needs ~17 GB of CPU RAM per process;
* sharding: FSDP of the teacher across the node's 8 GPUs (~2 GB each; the paper uses FSDP for
  step distillation) -- the trainer's business (accelerate's FSDP plugin), not this module's.

Step distillation (sec. 3.4) uses the few-step teacher as the discriminator's frozen feature
extractor: :func:`teacher_block_features` returns the image tokens after chosen blocks and
stops the forward after the last of them.

Decisions where the paper is silent:

* **Which tensor is the last-layer feature.** The image stream of the last block (before
  ``norm_out``), not the text stream: a ``JointTransformerBlock`` returns
  ``(encoder_hidden_states, hidden_states)`` and the last one (``context_pre_only``) returns
  ``None`` for the text, so ``output[1]`` is taken by a forward hook, removed after the call
  (diffusers' forward is not copied). ``layer`` picks another block (index into
  ``transformer_blocks``).
* **Precision.** Inputs are cast to the teacher's dtype (bf16 on GPU by default, float32 on
  CPU), the timestep stays float32 (as SD3's pipeline passes it); outputs come back float32.
* **Gradients.** A frozen teacher (``eval()``, ``requires_grad_(False)``) runs under
  ``torch.no_grad()``; ``grad=True`` keeps autograd to the inputs (a frozen teacher as a
  differentiable critic, e.g. LADD's discriminator of sec. 3.4).
* **Parameter counts** include the positional table (see the presets): that is what the
  published checkpoints hold and what their published sizes count.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from diffusers import SD3Transformer2DModel

from ..errors import ConfigError
from ..files import model_location
from .blocks import rms_norm
from .presets import preset_config

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}

_SD35 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
             joint_attention_dim=4096, pooled_projection_dim=2048, qk_norm="rms_norm")

TEACHER_PRESETS: dict[str, dict] = {
    # stabilityai/stable-diffusion-3.5-large, transformer/config.json
    "sd35-large": dict(_SD35, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                       pos_embed_max_size=192, dual_attention_layers=()),
    # stabilityai/stable-diffusion-3.5-medium, transformer/config.json
    "sd35-medium": dict(_SD35, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                        pos_embed_max_size=384, dual_attention_layers=tuple(range(13))),
    # tests / CPU demo; channels and text widths come from the data (data_overrides)
    "tiny": dict(sample_size=32, patch_size=2, in_channels=4, out_channels=4, attention_head_dim=32,
                 num_layers=3, num_attention_heads=2, caption_projection_dim=64, joint_attention_dim=64,
                 pooled_projection_dim=64, pos_embed_max_size=64, qk_norm="rms_norm", dual_attention_layers=(0,)),
}

#: Published sizes (hub model cards); :func:`count_teacher_params` rounds to them at one decimal (in B).
PUBLISHED_PARAMS = {"sd35-large": 8.1e9, "sd35-medium": 2.5e9}


def teacher_config(preset: str, **overrides) -> dict:
    """The ``SD3Transformer2DModel`` config of a named preset, with ``overrides`` applied."""
    return preset_config(TEACHER_PRESETS, "teacher", preset, **overrides)


def build_teacher(preset: str = "sd35-large", **overrides) -> SD3Transformer2DModel:
    """A randomly initialised teacher of a preset (build on the meta device to count it)."""
    return SD3Transformer2DModel(**teacher_config(preset, **overrides))


def data_overrides(layout: Any, latent_channels: int) -> dict[str, int]:
    """The config keys the data fixes: latent channels in and out, and the text layout's
    widths (a ``core.text.TextLayout``: ``context_dim``, ``pooled_dim``)."""
    return dict(in_channels=int(latent_channels), out_channels=int(latent_channels),
                joint_attention_dim=int(layout.context_dim), pooled_projection_dim=int(layout.pooled_dim))


def count_teacher_params(model: torch.nn.Module) -> int:
    """Parameters + the positional table (a persistent buffer): the checkpoint's size."""
    return sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())


def check_teacher(teacher: SD3Transformer2DModel, layout: Any = None, latent_channels: int | None = None,
                  option: str = "--teacher") -> None:
    """One ConfigError line if the teacher does not take this data's latents or text layout."""
    c = teacher.config
    want = {} if latent_channels is None else {"in_channels": latent_channels, "out_channels": latent_channels}
    if layout is not None:
        want.update(joint_attention_dim=layout.context_dim, pooled_projection_dim=layout.pooled_dim)
    bad = [f"{k} {c[k]} (data: {v})" for k, v in want.items() if c[k] != v]
    if bad:
        raise ConfigError(f"{option.lstrip('-')}: this teacher does not fit the data: {', '.join(bad)}; pass "
                          f"{option} a teacher for these latents and text encoders (SD3.5 needs 16-channel latents "
                          "and the 'teacher' text encoder set)")


# ----------------------------------------------------------------------------------------
# Loading.


def _dtype(dtype: torch.dtype | str | None, device: torch.device | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device is not None and device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"teacher dtype: expected one of {', '.join(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    return dtype


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``owner/name``): absolute, ``.``/``~``-relative,
    or not exactly one ``/``."""
    return path.startswith(("/", ".", "~")) or path.count("/") != 1 or Path(path).exists()


# ----------------------------------------------------------------------------------------
# Attention: diffusers' joint attention, its QK norms computed before the head transpose.


class JointAttnProcessor:
    """diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention: image and text tokens
    projected apart, attended together) with the same function and the same forward bits,
    in fewer kernel passes:

    * QK RMSNorm runs on the projections' contiguous (B, tokens, heads, D) view, before the
      head transpose, instead of on the transposed (B, heads, tokens, D) one: the same
      per-head normalisation over D, without strided passes;
    * on the CPU training path it uses ``blocks.rms_norm``'s fused backward (the demo's DiT
      teacher trains on the CPU; diffusers' ``RMSNorm`` runs about a dozen kernels backward).

    Measured on the demo teacher (4 blocks, 4 x 32 heads, 80 tokens, batch 32, one thread): the
    16 QK norms took 2.1 ms each forward + backward, 1.2 ms this way. Not taken: diffusers'
    ``fuse_qkv_projections`` (its ``FusedJointAttnProcessor2_0`` skips ``norm_q``/``norm_k``,
    so it computes another function for SD3.5's ``qk_norm``; its speed-up on the teacher, ~15 %,
    is those norms), and fused projections with the norms kept (the weights concatenated per
    call: 205 vs 199 ms a step, slower). :func:`use_joint_attn_processor` installs it; it holds
    no state, so saved checkpoints are unchanged."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs):
        tokens = hidden_states.shape[1]

        def project(x, to_q, to_k, to_v, norm_q, norm_k):
            q, k, v = (lin(x).unflatten(-1, (attn.heads, -1)) for lin in (to_q, to_k, to_v))
            q = q if norm_q is None else rms_norm(q, norm_q.weight, norm_q.eps, norm_q)
            k = k if norm_k is None else rms_norm(k, norm_k.weight, norm_k.eps, norm_k)
            return [t.transpose(1, 2) for t in (q, k, v)]  # (B, heads, tokens, D)

        q, k, v = project(hidden_states, attn.to_q, attn.to_k, attn.to_v, attn.norm_q, attn.norm_k)
        if encoder_hidden_states is not None:
            text = project(encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj,
                           attn.norm_added_q, attn.norm_added_k)
            q, k, v = (torch.cat([a, b], dim=2) for a, b in zip((q, k, v), text, strict=True))
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if encoder_hidden_states is not None:
            out, text_out = out[:, :tokens], out[:, tokens:]
            if not attn.context_pre_only:
                text_out = attn.to_add_out(text_out)
        out = attn.to_out[1](attn.to_out[0](out))
        return (out, text_out) if encoder_hidden_states is not None else out


def use_joint_attn_processor(model: torch.nn.Module) -> torch.nn.Module:
    """Every ``JointAttnProcessor2_0`` of an SD3 DiT replaced by :class:`JointAttnProcessor`, in
    place, MMDiT-X's image-only second attention included (diffusers runs it with the same processor,
    without text tokens: plain self-attention); returns the model."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    processors = model.attn_processors
    if any(isinstance(p, JointAttnProcessor2_0) for p in processors.values()):
        model.set_attn_processor({name: JointAttnProcessor() if isinstance(p, JointAttnProcessor2_0) else p
                                  for name, p in processors.items()})
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """``eval()`` and no gradients, in place."""
    return model.eval().requires_grad_(False)


def load_teacher(path: str | Path, subfolder: str | None = "transformer", *, dtype: torch.dtype | str | None = None,
                 device: torch.device | str | None = None, offload: bool = False,
                 option: str = "--teacher") -> SD3Transformer2DModel:
    """A frozen ``SD3Transformer2DModel`` from a hub id or a local dir: an SD3/SD3.5 pipeline
    dir (its ``transformer/``) or the transformer dir itself; any failure is one ConfigError
    line naming ``option``.

    ``dtype``: default bf16 on a CUDA ``device``, else float32. ``device``: where it runs
    (e.g. its own GPU, ``"cuda:1"``); default: where it loads (CPU). ``offload``: keep the
    weights in CPU RAM and stream them to ``device`` (default CUDA if there is one) module by
    module at each call (accelerate's ``cpu_offload``; see the module doc).
    """
    dev = torch.device(device) if device is not None else None
    if offload and dev is None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = _dtype(dtype, dev)
    where, sub = model_location(str(path), subfolder)
    fix = (f"pass {option} a local SD3/SD3.5 diffusers pipeline dir (or its transformer dir), or a hub id already "
           "in the local cache (the SD3.5 repos are gated: accept the license and log in to download)")
    if _looks_local(where) and not Path(where).expanduser().is_dir():
        raise ConfigError(f"{option.lstrip('-')}: no such directory {where!r}; {fix}")
    try:
        cls = SD3Transformer2DModel.load_config(where, subfolder=sub).get("_class_name", SD3Transformer2DModel.__name__)
        if cls != SD3Transformer2DModel.__name__:
            raise ValueError(f"its config is a {cls}, not an SD3Transformer2DModel")
        model = SD3Transformer2DModel.from_pretrained(where, subfolder=sub, torch_dtype=torch_dtype)
    except Exception as exc:  # noqa: BLE001 - offline hub, bad folder, wrong class: all a bad option value
        at = f"{where!r}" + (f" (subfolder {sub!r})" if sub else "")
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        name = option.lstrip("-")
        raise ConfigError(f"{name}: cannot load an SD3Transformer2DModel from {at}: {reason}; {fix}") from None
    freeze(use_joint_attn_processor(model))
    if offload:
        from accelerate import cpu_offload

        cpu_offload(model, execution_device=dev)
    elif dev is not None:
        model.to(dev)
    return model


# ----------------------------------------------------------------------------------------
# Calling the teacher.


def _grad_context(teacher: torch.nn.Module, grad: bool):
    trainable = any(p.requires_grad for p in teacher.parameters())
    return contextlib.nullcontext() if grad or trainable else torch.no_grad()


def _inputs_device(teacher: SD3Transformer2DModel, fallback: torch.device) -> torch.device:
    """The teacher's device; an offloaded teacher (meta weights) takes inputs anywhere."""
    dev = teacher.device
    return fallback if dev.type == "meta" else dev


def _timesteps(timestep: torch.Tensor | float, batch: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32, device=device).reshape(-1)
    if t.numel() == 1:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timestep: expected a scalar or ({batch},), got {tuple(t.shape)}")
    return t


def tokens_to_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, H*W, C) row-major patch tokens -> (B, C, H, W)."""
    b, n, c = tokens.shape
    if n != height * width:
        raise ValueError(f"{n} tokens do not tile a {height}x{width} grid")
    return tokens.transpose(1, 2).reshape(b, c, height, width)


def teacher_forward(teacher: SD3Transformer2DModel, x_t: torch.Tensor, timestep: torch.Tensor | float,
                    context: torch.Tensor, pooled: torch.Tensor, *, return_features: bool = True, layer: int = -1,
                    grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(velocity, features)`` of the teacher at ``x_t`` (B, C, H, W).

    ``timestep``: ``sigma * 1000`` (B,) or a scalar; ``context`` (B, L, joint_attention_dim)
    and ``pooled`` (B, pooled_projection_dim): SD3.5's conditioning. ``velocity`` (B, C, H, W)
    is ``noise - x_0`` (Eq. 4's target); ``features`` (B, inner_dim, H/p, W/p) the image-token
    output of block ``layer`` (default the last: Eq. 5's target), or ``None`` when
    ``return_features`` is False. Both float32 on ``x_t``'s device.
    """
    out_device, b = x_t.device, x_t.shape[0]
    dev, dtype = _inputs_device(teacher, out_device), teacher.dtype
    p = teacher.config.patch_size
    grid = (x_t.shape[-2] // p, x_t.shape[-1] // p)
    captured: list[torch.Tensor] = []
    handle = None
    if return_features:
        def hook(module, args, output):  # (encoder_hidden_states, hidden_states): the image stream is [1]
            captured.append(output[1])

        handle = teacher.transformer_blocks[layer].register_forward_hook(hook)
    try:
        with _grad_context(teacher, grad):
            velocity = teacher(hidden_states=x_t.to(dev, dtype), timestep=_timesteps(timestep, b, dev),
                               encoder_hidden_states=context.to(dev, dtype), pooled_projections=pooled.to(dev, dtype),
                               return_dict=False)[0]
    finally:
        if handle is not None:
            handle.remove()
    velocity = velocity.to(out_device, torch.float32)
    if not return_features:
        return velocity, None
    if len(captured) != 1:
        raise RuntimeError(f"teacher block {layer} ran {len(captured)} times in one forward (expected once)")
    return velocity, tokens_to_map(captured[0], *grid).to(out_device, torch.float32)


class _Enough(Exception):
    """Raised by the hook of the last block a caller needs: the rest of the teacher is skipped."""


def block_indices(teacher: SD3Transformer2DModel, blocks: list[int], option: str = "disc_blocks") -> list[int]:
    """``blocks`` (indices into ``transformer_blocks``, negative from the end) as 0..n-1; one
    ConfigError line naming ``option`` for an empty list or an index the teacher does not have."""
    n = len(teacher.transformer_blocks)
    if not blocks or any(not -n <= b < n for b in blocks):
        raise ConfigError(f"{option}: the teacher has {n} blocks (indices 0..{n - 1} or negative), got "
                          f"{list(blocks)}")
    return [b % n for b in blocks]


def teacher_block_features(teacher: SD3Transformer2DModel, x_t: torch.Tensor, timestep: torch.Tensor | float,
                           context: torch.Tensor, pooled: torch.Tensor, blocks: list[int], *,
                           grad: bool = False) -> list[torch.Tensor]:
    """The image tokens (B, H/p * W/p, inner_dim) after each block in ``blocks`` (indices into
    ``transformer_blocks``), in that order, float32 on ``x_t``'s device. The teacher runs only
    up to the last of them (sec. 3.4: the frozen teacher as the discriminator's feature
    extractor; LADD); a hook on that block stops the forward, so diffusers' forward is not
    copied. ``grad=True`` keeps autograd to the inputs (the generator's adversarial loss)."""
    n = len(teacher.transformer_blocks)
    index = sorted(set(block_indices(teacher, blocks)))
    out_device, b = x_t.device, x_t.shape[0]
    dev, dtype = _inputs_device(teacher, out_device), teacher.dtype
    captured: dict[int, torch.Tensor] = {}

    def hook_for(i: int):
        def hook(module, args, output):  # (encoder_hidden_states, hidden_states): the image stream is [1]
            captured[i] = output[1]
            if i == index[-1]:
                raise _Enough

        return hook

    handles = [teacher.transformer_blocks[i].register_forward_hook(hook_for(i)) for i in index]
    try:
        with _grad_context(teacher, grad):
            teacher(hidden_states=x_t.to(dev, dtype), timestep=_timesteps(timestep, b, dev),
                    encoder_hidden_states=context.to(dev, dtype), pooled_projections=pooled.to(dev, dtype),
                    return_dict=False)
    except _Enough:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(captured) != len(index):
        raise RuntimeError(f"teacher blocks {index}: only {sorted(captured)} ran")
    return [captured[b % n].to(out_device, torch.float32) for b in blocks]


def teacher_head(teacher: SD3Transformer2DModel, features: torch.Tensor, timestep: torch.Tensor | float,
                 pooled: torch.Tensor, *, grad: bool = False) -> torch.Tensor:
    """The teacher's own head on a feature map (B, inner_dim, h, w): ``norm_out(., temb)`` ->
    ``proj_out`` -> unpatchify, as in ``SD3Transformer2DModel.forward``; (B, C, h*p, w*p) float32.
    On the last block's features this is the teacher's velocity."""
    out_device = features.device
    b, _, h, w = features.shape
    dev, dtype = _inputs_device(teacher, out_device), teacher.dtype
    p, c = teacher.config.patch_size, teacher.out_channels
    with _grad_context(teacher, grad):
        temb = teacher.time_text_embed(_timesteps(timestep, b, dev), pooled.to(dev, dtype))
        x = teacher.proj_out(teacher.norm_out(features.to(dev, dtype).flatten(2).transpose(1, 2), temb))
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(b, h, w, p, p, c)).reshape(b, c, h * p, w * p)
    return x.to(out_device, torch.float32)


__all__ = [
    "PUBLISHED_PARAMS", "TEACHER_PRESETS", "block_indices", "build_teacher", "check_teacher", "count_teacher_params",
    "data_overrides", "freeze", "JointAttnProcessor", "load_teacher", "teacher_block_features", "teacher_config",
    "teacher_forward", "teacher_head", "tokens_to_map", "use_joint_attn_processor",
]
