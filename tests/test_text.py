"""Text-encoder stack: real tokenizer, tiny random encoders saved and reloaded, SD3-style
combination, per-encoder dropout (sec. 4), offline MiniLM, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from snapgen_cli.core import text as T
from snapgen_cli.core.unet import unet_config
from snapgen_cli.errors import ConfigError, SnapgenError

CAPTIONS = ["a red circle", "a photo of a cat sitting on a wooden table", ""]
W_L, W_G, W_GEMMA, W_T5 = 32, 48, 96, 128  # CLIP-L/G-like concat (80) narrower than Gemma/T5, as for real


def _tiny(specs: list[T.EncoderSpec]) -> list[T.EncoderSpec]:
    """Named specs without their declared (full-size) widths: the tiny models' widths are read."""
    return [s.model_copy(update={"width": None, "pooled_width": None}) for s in specs]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD3.5-like pipeline repo (text_encoder{,_2,_3} + tokenizer{,_2,_3}) and a tiny Gemma."""
    root = tmp_path_factory.mktemp("encoders")
    sd = root / "sd35"
    T.make_tiny_clip(sd / "text_encoder", W_L, seed=1)
    T.make_tiny_clip(sd / "text_encoder_2", W_G, seed=2)
    T.make_tiny_t5(sd / "text_encoder_3", W_T5, seed=3)
    for sub in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        T.build_clip_tokenizer(sd / sub)
    T.make_tiny_gemma(root / "gemma", W_GEMMA, seed=4)
    return {"sd35": sd, "gemma": root / "gemma"}


@pytest.fixture(scope="module")
def student(models) -> T.TextEncoderStack:
    sd = models["sd35"]
    specs = _tiny(T.student(clip_l=str(sd / "text_encoder"), clip_g=str(sd / "text_encoder_2"),
                            gemma=str(models["gemma"])))
    return T.TextEncoderStack(specs)


@pytest.fixture(scope="module")
def feats(student) -> dict[str, torch.Tensor]:
    return student.encode(CAPTIONS)


# ---------------------------------------------------------------------------- tokenizer


def test_clip_tokenizer_real_ids_match_open_clip(tmp_path):
    tok = T.build_clip_tokenizer(tmp_path)
    assert len(tok) == 49408
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    reloaded = type(tok).from_pretrained(tmp_path)
    for text in ["A DSLR photo of an astronaut riding a horse, 4k!", "naïve café — 東京 2024", ""]:
        ids = [ref.sot_token_id, *ref.encode(text), ref.eot_token_id]
        assert tok(text).input_ids == ids
        assert reloaded(text).input_ids == ids
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").read_text().startswith("#version: 0.2\ni n\n")


# ---------------------------------------------------------------------------- layouts


def test_named_layouts_match_unet_presets_without_weights():
    stu = T.TextLayout.from_specs(T.student())
    assert (stu.seq_len, stu.context_dim, stu.pooled_dim) == (77 + 256, 2304, 2048)
    assert stu.channel_slices == {"clip_l": (0, 768), "clip_g": (768, 2048)}
    assert stu.sequence_slices == {"gemma": (77, 333)}
    assert stu.pooled_slices == {"clip_l": (0, 768), "clip_g": (768, 2048)}
    cfg = unet_config("snapgen-t2i")
    assert stu.unet_kwargs() == {"context_dim": cfg["context_dim"], "pooled_dim": cfg["pooled_dim"]}

    img = T.TextLayout.from_specs(T.imagenet())
    cfg = unet_config("snapgen-imagenet")
    assert (img.seq_len, *img.unet_kwargs().values()) == (77, cfg["context_dim"], cfg["pooled_dim"])

    tea = T.TextLayout.from_specs(T.teacher())
    assert (tea.seq_len, tea.context_dim, tea.pooled_dim) == (333, 4096, 2048)
    assert [(s.subfolder, s.tokenizer_location[1]) for s in tea.specs] == [
        ("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2"), ("text_encoder_3", "tokenizer_3")]
    assert [s.layer for s in tea.specs] == ["penultimate", "penultimate", "last"]

    mini = T.TextLayout.from_specs(T.minilm())
    assert (mini.seq_len, mini.context_dim, mini.pooled_dim) == (77, 384, 384)


def test_layout_checks():
    l, g, gemma = T.student()
    with pytest.raises(ConfigError, match="same max_length"):
        T.TextLayout.from_specs([l, g.model_copy(update={"max_length": 64})])
    with pytest.raises(ConfigError, match="unique"):
        T.TextLayout.from_specs([l, l])
    with pytest.raises(ConfigError, match="pooled"):
        T.TextLayout.from_specs([gemma])
    with pytest.raises(ConfigError, match="at least one"):
        T.TextLayout.from_specs([])


# ---------------------------------------------------------------------------- encoding + SD3 combination


def test_student_features_follow_specs(models, student, feats):
    from transformers import CLIPTextModelWithProjection

    b = len(CAPTIONS)
    assert feats["clip_l.tokens"].shape == (b, 77, W_L) and feats["clip_g.tokens"].shape == (b, 77, W_G)
    assert feats["clip_l.pooled"].shape == (b, W_L) and feats["clip_g.pooled"].shape == (b, W_G)
    assert feats["gemma.tokens"].shape == (b, 256, W_GEMMA) and "gemma.pooled" not in feats
    assert all(v.dtype == torch.bool for k, v in feats.items() if k.endswith(".mask"))

    # CLIP: penultimate hidden state and text_embeds, as StableDiffusion3Pipeline reads them
    ref = CLIPTextModelWithProjection.from_pretrained(models["sd35"] / "text_encoder")
    ids = student.encoders["clip_l"].tokenizer(CAPTIONS, padding="max_length", max_length=77,
                                                truncation=True, return_tensors="pt").input_ids
    out = ref(ids, output_hidden_states=True)
    torch.testing.assert_close(feats["clip_l.tokens"], out.hidden_states[-2])
    torch.testing.assert_close(feats["clip_l.pooled"], out.text_embeds)
    assert feats["clip_l.mask"].all()  # padding="attend" (SD3)
    # Gemma: padding masked; "" is BOS + EOS of the (CLIP) tokenizer used by the tiny model
    assert feats["gemma.mask"].sum(1).tolist() == [5, 12, 2]


def test_sd3_combination_layout(student, feats):
    ctx, pooled, mask = T.combine(feats, student.layout)
    b = len(CAPTIONS)
    assert student.layout.unet_kwargs() == {"context_dim": W_GEMMA, "pooled_dim": W_L + W_G}
    assert ctx.shape == (b, 77 + 256, W_GEMMA) and pooled.shape == (b, W_L + W_G) and mask.shape == (b, 333)
    sd3 = torch.cat([F.pad(torch.cat([feats["clip_l.tokens"], feats["clip_g.tokens"]], -1), (0, W_GEMMA - W_L - W_G)),
                     feats["gemma.tokens"]], dim=-2)
    torch.testing.assert_close(ctx, sd3)
    assert (ctx[:, :77, W_L + W_G:] == 0).all()  # zero padding of the CLIP block
    torch.testing.assert_close(pooled, torch.cat([feats["clip_l.pooled"], feats["clip_g.pooled"]], -1))
    assert torch.equal(mask, torch.cat([torch.ones(b, 77, dtype=torch.bool), feats["gemma.mask"]], 1))
    assert torch.equal(T.combine(feats, student.layout)[0], student(CAPTIONS)[0])


def test_dropped_encoder_zeroes_exactly_its_positions(student, feats):
    full_ctx, full_pooled, full_mask = T.combine(feats, student.layout)
    keep = {"clip_l": torch.tensor([False, True, True]), "clip_g": torch.tensor([True, True, False]),
            "gemma": torch.tensor([True, False, True])}
    ctx, pooled, mask = T.combine(feats, student.layout, keep)

    expected_zero = torch.zeros_like(ctx, dtype=torch.bool)
    expected_zero[0, :77, :W_L] = True  # clip_l channels of sample 0
    expected_zero[2, :77, W_L:W_L + W_G] = True  # clip_g channels of sample 2
    expected_zero[1, 77:] = True  # gemma's sequence block of sample 1
    assert (ctx[expected_zero] == 0).all()
    assert torch.equal(ctx[~expected_zero], full_ctx[~expected_zero])
    pooled_zero = torch.zeros_like(pooled, dtype=torch.bool)
    pooled_zero[0, :W_L], pooled_zero[2, W_L:] = True, True
    assert (pooled[pooled_zero] == 0).all() and torch.equal(pooled[~pooled_zero], full_pooled[~pooled_zero])
    # dropped tokens are attended zeros; kept rows keep their mask
    assert mask[1].all() and torch.equal(mask[[0, 2]], full_mask[[0, 2]])


def test_all_dropped_and_missing_encoders_are_the_unconditional_input(student, feats):
    b = len(CAPTIONS)
    none = {n: torch.zeros(b, dtype=torch.bool) for n in student.layout.names}
    ctx, pooled, mask = T.combine(feats, student.layout, none)
    assert not ctx.any() and not pooled.any() and mask.all()
    u_ctx, u_pooled, u_mask = T.unconditional(student.layout, b)
    assert torch.equal(ctx, u_ctx) and torch.equal(pooled, u_pooled) and torch.equal(mask, u_mask)
    # an encoder subset at inference == that encoder dropped in training
    subset = {k: v for k, v in feats.items() if not k.startswith("gemma.")}
    drop_gemma = {"gemma": torch.zeros(b, dtype=torch.bool)}
    for a, c in zip(T.combine(subset, student.layout), T.combine(feats, student.layout, drop_gemma)):
        assert torch.equal(a, c)
    with pytest.raises(SnapgenError, match="batch_size"):
        T.combine({}, student.layout)


def test_combine_rejects_features_of_other_specs(student, feats):
    bad = {**feats, "clip_g.tokens": feats["clip_g.tokens"][..., :8]}
    with pytest.raises(SnapgenError, match=r"clip_g.tokens: expected shape \(3, 77, 48\)"):
        T.combine(bad, student.layout)


def test_truncation_and_empty_captions(student):
    long = " ".join(["cat"] * 300)
    f = student.encode([long, "", None], names=["clip_l", "gemma"])
    assert set(f) == {"clip_l.tokens", "clip_l.pooled", "clip_l.mask", "gemma.tokens", "gemma.mask"}
    assert f["clip_l.tokens"].shape[1] == 77 and f["gemma.mask"][0].all()  # truncated to max_length
    ids = student.encoders["clip_l"].tokenizer([long], padding="max_length", max_length=77, truncation=True).input_ids[0]
    assert ids[0] == 49406 and ids[-1] == 49407 and len(ids) == 77
    for k in f:
        assert torch.equal(f[k][1], f[k][2])  # None == ""
    with pytest.raises(ConfigError, match="unknown text encoder 't5'"):
        student.encode(["x"], names=["t5"])


# ---------------------------------------------------------------------------- dropout (sec. 4)


def test_sample_keep_draws_per_sample_and_checks_p_drop():
    """Flags of sample i come from generator i alone (any batch split gives the same flags);
    the rate itself is measured through the training path in test_train_e2e.py."""
    names = ["clip_l", "clip_g", "gemma"]
    gens = lambda: [torch.Generator().manual_seed(s) for s in range(6)]  # noqa: E731
    whole = T.sample_keep(names, 0.464, gens())
    g = gens()
    split = [T.sample_keep(names, 0.464, g[:2]), T.sample_keep(names, 0.464, g[2:])]
    assert all(torch.equal(whole[n], torch.cat([s[n] for s in split])) for n in names)
    assert T.sample_keep(["a"], 0.0, gens())["a"].all() and not T.sample_keep(["a"], 1.0, gens())["a"].any()
    with pytest.raises(ConfigError, match="p_drop"):
        T.sample_keep(["a"], 1.5, gens())


# ---------------------------------------------------------------------------- teacher (SD3.5)


def test_teacher_layout_on_tiny_sd35_repo(models):
    sd = models["sd35"]
    stack = T.TextEncoderStack(_tiny(T.teacher(str(sd))))
    f = stack.encode(CAPTIONS)
    ctx, pooled, mask = T.combine(f, stack.layout)
    assert ctx.shape == (3, 77 + 256, W_T5) and pooled.shape == (3, W_L + W_G) and mask.all()
    assert (ctx[:, :77, W_L + W_G:] == 0).all()
    # T5 as encode_prompt runs it: 256 tokens, no attention mask
    from transformers import T5EncoderModel

    ids = stack.encoders["t5"].tokenizer(CAPTIONS, padding="max_length", max_length=256, truncation=True,
                                         return_tensors="pt").input_ids
    torch.testing.assert_close(ctx[:, 77:], T5EncoderModel.from_pretrained(sd / "text_encoder_3")(ids)[0])


def test_dtype_and_frozen(models):
    spec = _tiny(T.imagenet(str(models["sd35"] / "text_encoder")))[0].model_copy(update={"dtype": "bfloat16"})
    stack = T.TextEncoderStack([spec]).train()
    assert not stack.training and not any(p.requires_grad for p in stack.parameters())
    f = stack.encode(["a cat"])
    assert f["clip_l.tokens"].dtype == torch.bfloat16
    assert T.combine(f, stack.layout)[0].dtype == torch.float32


# ---------------------------------------------------------------------------- MiniLM (offline, pretrained)


def test_minilm_offline_embeddings_are_semantic():
    stack = T.TextEncoderStack(T.minilm())
    f = stack.encode(["a red circle", "a red disk", "a blue square", "a dog running on the beach"])
    assert f["minilm.tokens"].shape == (4, 77, 384) and f["minilm.mask"][0].sum() == 5  # [CLS] a red circle [SEP]
    p = F.normalize(f["minilm.pooled"], dim=-1)
    sim = p @ p.T
    assert sim[0, 1] > sim[0, 2] + 0.1 and sim[0, 2] > sim[0, 3] + 0.1


# ---------------------------------------------------------------------------- errors


def test_missing_models_are_config_errors_naming_the_option(models, tmp_path):
    spec = T.imagenet()[0]
    with pytest.raises(ConfigError, match=r"'clip_l'.*path=.*not a directory.*set `path`"):
        T.TextEncoderStack([spec.model_copy(update={"path": str(tmp_path / "nope")})])
    with pytest.raises(ConfigError, match=r"'clip_l' \(clip\): cannot load from .*subfolder 'text_encoder_9'.*set `path`"):
        T.TextEncoderStack([spec.model_copy(update={"path": str(models["sd35"]), "subfolder": "text_encoder_9",
                                                    "tokenizer_subfolder": "tokenizer"})])
    with pytest.raises(ConfigError, match="set `tokenizer_path`"):
        T.TextEncoderStack([spec.model_copy(update={"path": str(models["sd35"] / "text_encoder"),
                                                    "tokenizer_path": str(tmp_path)})])
    with pytest.raises(ConfigError, match=r"width=768 declared but the model .* gives 32; fix `width`"):
        T.TextEncoderStack([spec.model_copy(update={"path": str(models["sd35"] / "text_encoder")})])


def test_spec_validation_messages():
    with pytest.raises(ConfigError, match=r"text_encoders\[1\]\.kind: Input should be 'clip', 'gemma', 't5' or 'auto'"):
        T.parse_specs([T.imagenet()[0], {"name": "x", "kind": "bert", "path": "p"}])
    with pytest.raises(ConfigError, match=r"text_encoders\[0\]: .*pooled='projection' needs kind='clip'"):
        T.parse_specs([{"name": "t5", "kind": "t5", "path": "p", "pooled": "projection"}])
    with pytest.raises(ConfigError, match=r"text_encoders\[0\]\.name: .*letters, digits"):
        T.parse_specs([{"name": "clip.l", "kind": "clip", "path": "p"}])
    with pytest.raises(ConfigError, match=r"text_encoders\[0\]\.extra: Extra inputs"):
        T.parse_specs([{"name": "a", "kind": "clip", "path": "p", "extra": 1}])
    specs = T.parse_specs([{"name": "a", "kind": "CLIP", "path": "p"}, {"name": "b", "kind": "gemma", "path": "p"}])
    assert [s.padding for s in specs] == ["attend", "mask"] and specs[0].kind == "clip"
    assert T.EncoderSpec.model_validate(specs[1].model_dump()) == specs[1]  # TOML round trip
    with pytest.raises(ConfigError, match="unknown text encoder set 'sd4'"):
        T.spec_set("sd4")
