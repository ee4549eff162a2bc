"""The toy backbone's text side: an offline CLIP tokenizer and a tiny random CLIP text encoder.

The tokenizer is the real CLIP BPE (the one Stable Diffusion uses), built from the vocabulary file
that ships inside open_clip, so nothing is downloaded (the CPU measurements): merge
lines 1..48,894 of ``default_bpe()``; vocabulary = the 256 byte-unicode characters, the same with
``</w>``, the joined merges, ``<|startoftext|>`` and ``<|endoftext|>`` (49,408 tokens). Ids match
open_clip's tokenizer except padding (open_clip pads with 0, transformers with ``<|endoftext|>``).

transformers 5 gotcha: ``CLIPTokenizer(vocab_file=..., merges_file=...)`` silently ignores both files
and yields a 2-3 token vocabulary, so the tokenizer is always read back with ``from_pretrained(dir)``.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ppd_core.config import PretrainConfig

NUM_MERGES = 48_894  # CLIP's merges: 49,408 tokens - 2 * 256 byte tokens - 2 special tokens
VOCAB_SIZE = 49_408
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
BOS_ID, EOS_ID = VOCAB_SIZE - 2, VOCAB_SIZE - 1
CLIP_MAX_LENGTH = 77  # CLIP's context length (position embeddings of the text encoder)
TEXT_HEADS = 4


def _write_bpe_files(out_dir: Path, vocab: dict[str, int], merges: list[str]) -> None:
    """``vocab.json`` + ``merges.txt`` (merges as "a b" lines after a version header), as CLIP ships them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def build_offline_clip_tokenizer(
    out_dir: str | Path, model_max_length: int = CLIP_MAX_LENGTH
) -> CLIPTokenizer:
    """Write CLIP's BPE as ``vocab.json`` + ``merges.txt`` into ``out_dir``, load it with
    ``CLIPTokenizer.from_pretrained`` and save it there (:func:`save_clip_tokenizer`)."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    if not 1 <= model_max_length <= CLIP_MAX_LENGTH:
        raise ValueError(f"model_max_length must be in [1, {CLIP_MAX_LENGTH}], got {model_max_length}")
    out_dir = Path(out_dir)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is the file's version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges), BOS, EOS]
    if len(tokens) != VOCAB_SIZE or len(set(tokens)) != VOCAB_SIZE:
        raise RuntimeError(
            f"open_clip's BPE file gave {len(set(tokens))} distinct tokens, expected {VOCAB_SIZE}"
        )
    _write_bpe_files(out_dir, {tok: i for i, tok in enumerate(tokens)}, merges)
    tokenizer = CLIPTokenizer.from_pretrained(out_dir, model_max_length=model_max_length)
    if len(tokenizer) != VOCAB_SIZE:  # the transformers-5 failure mode above shows up as a tiny vocabulary
        raise RuntimeError(
            f"CLIPTokenizer read {len(tokenizer)} tokens from {out_dir}, expected {VOCAB_SIZE}"
        )
    save_clip_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_clip_tokenizer(tokenizer: CLIPTokenizer, out_dir: str | Path) -> None:
    """``save_pretrained`` (transformers 5 writes ``tokenizer.json`` + ``tokenizer_config.json`` only)
    plus ``vocab.json`` + ``merges.txt`` taken from the BPE model, so slow and older loaders read it too."""
    out_dir = Path(out_dir)
    tokenizer.save_pretrained(out_dir)
    bpe = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]
    _write_bpe_files(out_dir, bpe["vocab"], merges)


def tiny_text_config(cfg: PretrainConfig) -> CLIPTextConfig:
    """CLIP text transformer of width ``cfg.cross_attention_dim``, ``cfg.text_layers`` layers, 4 heads."""
    width = cfg.cross_attention_dim
    if width % TEXT_HEADS:
        raise ValueError(
            f"pretrain.cross_attention_dim ({width}) must be a multiple of {TEXT_HEADS} text heads"
        )
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=width,
        intermediate_size=4 * width,
        projection_dim=width,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,  # != 2, so the pooled output is taken at the first <|endoftext|>
        pad_token_id=EOS_ID,
    )


def build_tiny_text_encoder(cfg: PretrainConfig, seed: int) -> CLIPTextModel:
    """A randomly initialised tiny ``CLIPTextModel`` (seeded; same seed -> same weights)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIPTextModel(tiny_text_config(cfg))
