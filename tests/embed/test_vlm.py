"""The tiny offline VLM (ppd_core.tiny.vlm) and the VLM embedder (ppd_core.embed.vlm).

One tiny LLaVA-OneVision is built per module and loaded back through the Auto* classes, the path
a real checkpoint takes; every read-out runs on it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from ppd_core.config import EmbedderSpec, TinyModelsConfig
from ppd_core.embed.base import Shot, ShotSet
from ppd_core.embed.vlm import (
    VLMEmbedder,
    build_messages,
    build_prompt_text,
    image_run_weights,
    last_decoding_step,
)
from ppd_core.errors import ConfigError, InputError
from ppd_core.tiny.vlm import build_tiny_vlm

CFG = TinyModelsConfig(seed=0)
CAPTIONS = ["a red circle", "a blue square", "an orange cross", "a green triangle", "a purple diamond"]
TOKENS_PER_IMAGE = (CFG.vlm_image_size // CFG.vlm_patch_size) ** 2 + 1  # + the image-newline token
ROWS = CFG.vlm_layers + 1  # embedding output + one per decoder layer


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), CFG, corpus=CAPTIONS)


@pytest.fixture(scope="module")
def embedders(tiny_dir) -> dict[str, VLMEmbedder]:
    """One embedder per read-out, shared so the model is loaded once each."""
    return {
        readout: VLMEmbedder(tiny_dir, readout=readout, max_new_tokens=6)
        for readout in ("prefill", "image_diff", "generate")
    }


def image(seed: int) -> Image.Image:
    """16x16 RGB: a random solid colour plus a horizontal gradient."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 200, size=3)
    ramp = np.linspace(0, 55, 16)[None, :, None]
    pixels = np.broadcast_to(base + ramp, (16, 16, 3)).astype(np.uint8)
    return Image.fromarray(pixels)


def shot_set(index: int, shots: int = 4, swap: bool = False) -> ShotSet:
    """Captions of varied length so a batch needs padding; ``swap`` exchanges the images of every pair."""
    pairs = []
    for i in range(shots):
        a, b = image(100 * index + 2 * i), image(100 * index + 2 * i + 1)
        caption = " and ".join(CAPTIONS[(index + i) % len(CAPTIONS)] for _ in range(1 + (index + i) % 3))
        pairs.append(Shot(caption, *((b, a) if swap else (a, b)), pair_id=f"p{index}-{i}"))
    return ShotSet(shot_set_id=f"set{index}", user_id=index, shots=tuple(pairs))


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------- tiny model


def test_build_writes_a_loadable_checkpoint(tiny_dir):
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json"):
        assert (tiny_dir / name).is_file(), name
    assert (tiny_dir / "processor_config.json").is_file() or (tiny_dir / "preprocessor_config.json").is_file()
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(tiny_dir)
    assert type(model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert model.config.text_config.hidden_size == CFG.vlm_hidden
    assert model.config.text_config.num_hidden_layers == CFG.vlm_layers
    assert model.config.text_config.vocab_size == len(processor.tokenizer) <= CFG.vlm_vocab
    assert model.config.image_token_id == processor.image_token_id
    assert processor.tokenizer.padding_side == "left"
    assert processor.tokenizer.eos_token == "<|im_end|>"
    assert processor.tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == processor.tokenizer.eos_token_id


def test_loaded_weights_are_bit_identical_to_the_file(tiny_dir, tmp_path):
    """Every saved tensor comes back bit for bit, and a second save/load round trip changes nothing."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_dir, dtype=torch.float32)

    def contents(tensors) -> list[str]:  # key names differ between file and module layouts
        return sorted(hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest() for t in tensors)

    assert contents(load_file(tiny_dir / "model.safetensors").values()) == contents(
        model.state_dict().values()
    )
    model.save_pretrained(tmp_path)
    again = AutoModelForImageTextToText.from_pretrained(tmp_path, dtype=torch.float32).state_dict()
    assert again.keys() == model.state_dict().keys()
    assert all(torch.equal(again[k], v) for k, v in model.state_dict().items())


def test_build_is_deterministic(tiny_dir, tmp_path):
    same = build_tiny_vlm(tmp_path / "same", CFG, corpus=CAPTIONS)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert file_digest(same / name) == file_digest(tiny_dir / name), name
    other = build_tiny_vlm(tmp_path / "other", CFG.model_copy(update={"seed": 1}), corpus=CAPTIONS)
    assert file_digest(other / "model.safetensors") != file_digest(tiny_dir / "model.safetensors")


def test_processor_round_trip_gives_identical_ids(tiny_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    sets = [shot_set(0), shot_set(1)]
    texts = [processor.apply_chat_template(build_messages(s), add_generation_prompt=True) for s in sets]
    images = [[im for shot in s.shots for im in (shot.preferred, shot.dispreferred)] for s in sets]
    a = processor(images=images, text=texts, padding=True, return_tensors="pt")
    b = reloaded(images=images, text=texts, padding=True, return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    assert (a["attention_mask"][:, 0] == 0).any()  # the sets differ in length: left padding happened


def test_chat_template_renders_image_entries_in_place(tiny_dir):
    """Interleaved image entries and inline placeholders render to the same ids on the tiny template."""
    processor = AutoProcessor.from_pretrained(tiny_dir)
    s = shot_set(2)
    inline = build_messages(s)
    text = inline[1]["content"][0]["text"]
    pieces = text.split(processor.image_token)
    entries = [{"type": "text", "text": pieces[0]}]
    for piece in pieces[1:]:
        entries += [{"type": "image"}, {"type": "text", "text": piece}]
    interleaved = [inline[0], {"role": "user", "content": entries}]
    render = [processor.apply_chat_template(m, add_generation_prompt=True) for m in (inline, interleaved)]
    assert render[0] == render[1]
    images = [[im for shot in s.shots for im in (shot.preferred, shot.dispreferred)]]
    ids = [processor(images=images, text=[r], return_tensors="pt")["input_ids"] for r in render]
    assert torch.equal(ids[0], ids[1])


# ------------------------------------------------------------------------------------ the prompt


def test_prompt_follows_the_paper_layout():
    s = shot_set(0)
    text = build_prompt_text(s)
    assert text.startswith("You will see examples of images")
    assert text.count("<image>") == 8
    # the paper's ordinal bug is kept: "1st", "2st", "3st", "4st"
    assert re.findall(r"Here is the (\d+st) pair of images:", text) == ["1st", "2st", "3st", "4st"]
    markers = re.findall(
        r"Here is the caption: ([^\n]*)|(<image> This is the preferred image\.)|"
        r"(<image> This is the dispreferred image\.)",
        text,
    )
    expected = []
    for shot in s.shots:
        expected += [(shot.caption, "", ""), ("", "<image> This is the preferred image.", "")]
        expected += [("", "", "<image> This is the dispreferred image.")]
    assert markers == expected
    tail = text[text.rindex("dispreferred image.") :]
    assert "User Profile" in tail and "Pair 4:" in tail and "Pair 5:" not in tail
    for piece in ("Preferred Image:", "Dispreferred Image:", "Differences:", "style", "aesthetics"):
        assert piece in tail


def test_prompt_is_one_user_turn_with_eight_images(tiny_dir):
    processor = AutoProcessor.from_pretrained(tiny_dir)
    s = shot_set(0)
    messages = build_messages(s)
    assert [m["role"] for m in messages] == ["system", "user"]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<|im_start|>assistant\n")
    assert rendered.count("<|im_start|>user") == 1 and rendered.count("<image>") == 8
    images = [[im for shot in s.shots for im in (shot.preferred, shot.dispreferred)]]
    ids = processor(images=images, text=[rendered], return_tensors="pt")["input_ids"]
    assert int((ids == processor.image_token_id).sum()) == 8 * TOKENS_PER_IMAGE


def test_caption_cannot_inject_an_image_placeholder():
    s = ShotSet("x", 0, (Shot("a <image> red <video> circle", image(0), image(1)),))
    text = build_prompt_text(s)
    assert text.count("<image>") == 2 and "<video>" not in text
    assert "Here is the caption: a red circle" in text


# ------------------------------------------------------------------------------------- read-outs


@pytest.mark.parametrize("readout", ["prefill", "image_diff", "generate"])
def test_readout_shape_and_determinism(embedders, readout):
    embedder = embedders[readout]
    batch = [shot_set(0), shot_set(1)]
    first, second = embedder.embed(batch), embedder.embed(batch)
    assert embedder.output_shape == (ROWS, CFG.vlm_hidden)
    assert first.embeddings.shape == (2, ROWS, CFG.vlm_hidden)
    assert first.embeddings.dtype == torch.float32 and first.embeddings.device.type == "cpu"
    assert torch.isfinite(first.embeddings).all()
    assert torch.equal(first.embeddings, second.embeddings)
    assert not torch.equal(first.embeddings[0], first.embeddings[1])  # the input matters
    if readout == "generate":
        assert len(first.profiles) == 2 and all(isinstance(p, str) for p in first.profiles)
        assert first.profiles == second.profiles
    else:
        assert first.profiles is None


@pytest.mark.parametrize("readout", ["prefill", "image_diff", "generate"])
def test_batch_equals_one_at_a_time(embedders, readout):
    embedder = embedders[readout]
    batch = [shot_set(i) for i in range(3)]
    together = embedder.embed(batch)
    alone = [embedder.embed([s]) for s in batch]
    torch.testing.assert_close(
        together.embeddings, torch.cat([a.embeddings for a in alone]), atol=1e-4, rtol=1e-4
    )
    if readout == "generate":
        assert together.profiles == [a.profiles[0] for a in alone]


def test_image_diff_flips_sign_when_pairs_are_swapped(embedders):
    """Exactly at the embedding row (image tokens there are context-free vision features); deeper rows
    also see the surrounding text and earlier images, so there the flip is approximate."""
    embedder = embedders["image_diff"]
    straight = embedder.embed([shot_set(0), shot_set(1)]).embeddings  # (2, ROWS, H)
    swapped = embedder.embed([shot_set(0, swap=True), shot_set(1, swap=True)]).embeddings
    assert straight[:, 0].abs().max() > 1e-3
    torch.testing.assert_close(swapped[:, 0], -straight[:, 0], atol=1e-6, rtol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(swapped[:, 1:], -straight[:, 1:], dim=-1)
    assert (cosine > 0.5).all(), cosine


def test_image_diff_is_preferred_minus_dispreferred_image_tokens(embedders):
    """Recomputed another way: cut the image-token positions into 8 runs of TOKENS_PER_IMAGE."""
    embedder = embedders["image_diff"]
    s = shot_set(3)
    emb = embedder.embed([s]).embeddings[0]  # (ROWS, H)
    inputs = embedder._encode([s])
    with torch.inference_mode():
        hidden = embedder._model(**inputs, output_hidden_states=True).hidden_states
    where = (inputs["input_ids"][0] == embedder._processor.image_token_id).nonzero().flatten()
    for row, h in enumerate(hidden):
        per_image = h[0, where].reshape(8, TOKENS_PER_IMAGE, -1).mean(1)  # (8, H) in prompt order
        expected = (per_image[0::2] - per_image[1::2]).mean(0)
        torch.testing.assert_close(emb[row], expected, atol=1e-5, rtol=1e-5)


def test_image_diff_handles_sets_of_different_sizes(embedders):
    embedder = embedders["image_diff"]
    small, large = shot_set(0, shots=2), shot_set(1, shots=4)
    together = embedder.embed([small, large]).embeddings
    alone = torch.cat([embedder.embed([small]).embeddings, embedder.embed([large]).embeddings])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)


def test_prefill_is_the_last_prompt_token(embedders):
    """Row -1 of prefill equals the model's own last hidden state at the final prompt position."""
    embedder = embedders["prefill"]
    s = shot_set(0)
    emb = embedder.embed([s]).embeddings
    inputs = embedder._encode([s])
    with torch.inference_mode():
        last = embedder._model(**inputs, output_hidden_states=True).hidden_states[-1][0, -1]
    torch.testing.assert_close(emb[0, -1], last, atol=1e-5, rtol=1e-5)


def test_generate_with_sequences_finishing_at_different_steps(tiny_dir):
    """Make a token the random model really emits the EOS, so the sets stop at different steps: the
    batch must still equal one-at-a-time decoding, which stops at EOS."""
    embedder = VLMEmbedder(tiny_dir, readout="generate", max_new_tokens=6)
    batch = [shot_set(i) for i in range(4)]
    embedder.embed(batch[:1])  # load
    with torch.inference_mode():
        out = embedder._model.generate(
            **embedder._encode(batch), do_sample=False, max_new_tokens=6, pad_token_id=0
        )
    tokens = out[:, -6:]
    # a token that first appears at different steps in different sequences (or not at all)
    candidates = [
        t
        for t in tokens.unique().tolist()
        if len({(row == t).nonzero()[0].item() if (row == t).any() else 6 for row in tokens}) > 1
    ]
    assert candidates, "the tiny model's greedy outputs should differ between sets"
    embedder._model.generation_config.eos_token_id = candidates[0]
    together = embedder.embed(batch)
    alone = [embedder.embed([s]) for s in batch]
    torch.testing.assert_close(
        together.embeddings, torch.cat([a.embeddings for a in alone]), atol=1e-4, rtol=1e-4
    )
    assert together.profiles == [a.profiles[0] for a in alone]


@pytest.mark.parametrize(
    ("tokens", "eos", "expected"),
    [
        ([[5, 6, 7], [5, 6, 7]], 9, [2, 2]),  # no EOS: the last step
        ([[5, 9, 0], [5, 6, 9]], 9, [1, 2]),  # first EOS, pad afterwards
        ([[9, 0, 0], [5, 6, 7]], [8, 9], [0, 2]),  # several EOS ids
        ([[5, 0, 9], [0, 0, 0]], 9, [2, 2]),  # the pad id mid-sequence is an ordinary token
        ([[5, 9, 9], [8, 6, 9]], [8, 9], [1, 0]),
    ],
)
def test_last_decoding_step(tokens, eos, expected):
    assert last_decoding_step(torch.tensor(tokens), eos).tolist() == expected


def test_image_runs_are_pooled_and_counted():
    ids = torch.tensor([[0, 0, 7, 7, 1, 7, 1], [7, 7, 7, 1, 7, 7, 1]])  # image token 7; left pad 0
    weights = image_run_weights(ids, 7, torch.tensor([2, 2]), [shot_set(0), shot_set(1)])
    assert weights.shape == (2, 7, 2)
    assert weights[0, :, 0].tolist() == [0, 0, 0.5, 0.5, 0, 0, 0]
    assert weights[0, :, 1].tolist() == [0, 0, 0, 0, 0, 1, 0]
    torch.testing.assert_close(weights[1].sum(0), torch.ones(2))
    with pytest.raises(InputError, match="found 2 image-token runs, expected 4"):
        image_run_weights(ids, 7, torch.tensor([2, 4]), [shot_set(0), shot_set(1)])


@pytest.mark.parametrize(
    ("layers", "pooling", "shape"),
    [
        (None, "none", (ROWS, CFG.vlm_hidden)),
        ((-1,), "none", (1, CFG.vlm_hidden)),
        ((0, -1), "none", (2, CFG.vlm_hidden)),
        ((1, 2), "mean", (1, CFG.vlm_hidden)),
        (None, "mean", (1, CFG.vlm_hidden)),
    ],
)
def test_layer_selection_and_pooling(tiny_dir, embedders, layers, pooling, shape):
    embedder = VLMEmbedder(tiny_dir, readout="prefill", layers=layers, layer_pooling=pooling)
    batch = [shot_set(0)]
    emb = embedder.embed(batch).embeddings
    assert embedder.output_shape == shape and emb.shape == (1, *shape)
    full = embedders["prefill"].embed(batch).embeddings[0]  # (ROWS, H)
    picked = full[list(layers)] if layers is not None else full
    expected = picked.mean(0, keepdim=True) if pooling == "mean" else picked
    torch.testing.assert_close(emb[0], expected)


def test_out_of_range_layers_are_a_config_error(tiny_dir):
    with pytest.raises(ConfigError, match="out of range"):
        VLMEmbedder(tiny_dir, layers=(ROWS,))


# -------------------------------------------------------------------------------- spec, identity


def test_from_spec_resolves_the_tiny_default(tiny_dir):
    spec = EmbedderSpec(name="vlm-x", kind="vlm", readout="prefill", layers=(-1,), layer_pooling="mean")
    embedder = VLMEmbedder.from_spec(spec, model_dir=tiny_dir, device="cpu")
    assert embedder.name == "vlm-x" and embedder.model_id == str(tiny_dir)
    assert (embedder.readout, embedder.layers, embedder.layer_pooling) == ("prefill", (-1,), "mean")
    with pytest.raises(ConfigError, match="not vlm"):
        VLMEmbedder.from_spec(EmbedderSpec(name="c", kind="clip_diff"), model_dir=tiny_dir)
    with pytest.raises(ConfigError, match="names no model"):
        VLMEmbedder.from_spec(spec, model_dir=None)
    hub = spec.model_copy(update={"model": str(tiny_dir)})  # an explicit model wins over the default
    assert VLMEmbedder.from_spec(hub, model_dir=None).model_id == str(tiny_dir)


def test_identity_tracks_readout_settings_and_weights(tiny_dir, tmp_path):
    base = VLMEmbedder(tiny_dir, readout="image_diff").identity()
    assert base["kind"] == "vlm" and base["model_id"] == str(tiny_dir)
    assert len(base["weights_digest"]) == 64 and "max_new_tokens" not in base
    assert VLMEmbedder(tiny_dir, readout="image_diff").identity() == base
    variants = [
        VLMEmbedder(tiny_dir, readout="prefill").identity(),
        VLMEmbedder(tiny_dir, readout="image_diff", layers=(-1,)).identity(),
        VLMEmbedder(tiny_dir, readout="image_diff", layer_pooling="mean").identity(),
        VLMEmbedder(tiny_dir, readout="image_diff", dtype="bfloat16").identity(),
    ]
    assert all(v != base for v in variants)
    generate = [VLMEmbedder(tiny_dir, readout="generate", max_new_tokens=n).identity() for n in (4, 8)]
    assert generate[0]["max_new_tokens"] == 4 and generate[0] != generate[1]

    reseeded = build_tiny_vlm(tmp_path, CFG.model_copy(update={"seed": 3}), corpus=CAPTIONS)
    other = VLMEmbedder(reseeded, readout="image_diff").identity()
    assert other["weights_digest"] != base["weights_digest"]
