"""The tiny offline default VLM: a random-weight LLaVA-OneVision built from configs and saved like a
real checkpoint (the CPU measurements).

:func:`build_tiny_vlm` trains a byte-level BPE tokenizer on the prompt texts (plus any corpus, e.g.
the synthetic world's captions), assembles the LLaVA-OneVision processor around it and a seeded
SigLIP + Qwen2 model, and writes both with ``save_pretrained``. The directory then loads through
``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly as a hub checkpoint does, so the embedder
has a single loading path. Same config and corpus -> byte-identical weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ppd_core.config import TinyModelsConfig
from ppd_core.embed.vlm import DEFAULT_IMAGE_TOKEN, prompt_corpus

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", DEFAULT_IMAGE_TOKEN, "<video>")
VISION_HIDDEN = 64
VISION_LAYERS = 2
TEXT_HEADS = 4
TEXT_KV_HEADS = 2

# Qwen-style turns; content is a string or a list of text/image/video entries rendered in order.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>' }}"
    "{% elif item['type'] == 'video' %}{{ '<video>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _train_tokenizer(vocab_size: int, texts: Sequence[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    # padding_side in the constructor: an attribute set later is not saved (transformers 5).
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": DEFAULT_IMAGE_TOKEN, "video_token": "<video>"},
        padding_side="left",
    )


def _corpus(corpus: Sequence[str]) -> list[str]:
    """Prompt texts then the given corpus, duplicates dropped, order kept (training is order-stable)."""
    texts = prompt_corpus(sorted(set(corpus))[:16]) + list(corpus)
    return list(dict.fromkeys(t for t in texts if t))


def build_tiny_vlm(out_dir: Path, cfg: TinyModelsConfig, corpus: Sequence[str] = ()) -> Path:
    """Build, seed and save the tiny LLaVA-OneVision (model + processor) into ``out_dir``; returns it."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        Qwen2Config,
        SiglipVisionConfig,
    )

    if cfg.vlm_image_size % cfg.vlm_patch_size:
        raise ValueError(
            f"vlm_image_size {cfg.vlm_image_size} must be a multiple of vlm_patch_size {cfg.vlm_patch_size}"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(cfg.vlm_vocab, _corpus(corpus))

    side = cfg.vlm_image_size
    # Small pinpoints in both processor and model: the 384..2304 defaults explode single-image inputs.
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side], [2 * side, 2 * side]]
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": side, "width": side}, image_grid_pinpoints=pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": side, "width": side})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        # must equal the vision tower's patch count or the model raises a token/feature mismatch
        num_image_tokens=(side // cfg.vlm_patch_size) ** 2,
        vision_feature_select_strategy="full",
        chat_template=CHAT_TEMPLATE,
    )

    vision = SiglipVisionConfig(
        hidden_size=VISION_HIDDEN,
        intermediate_size=4 * VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=4,
        image_size=side,
        patch_size=cfg.vlm_patch_size,
        vision_use_head=False,
    )
    text = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.vlm_hidden,
        intermediate_size=4 * cfg.vlm_hidden,
        num_hidden_layers=cfg.vlm_layers,
        num_attention_heads=TEXT_HEADS,
        num_key_value_heads=TEXT_KV_HEADS,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(DEFAULT_IMAGE_TOKEN),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        image_grid_pinpoints=pinpoints,
    )
    with torch.random.fork_rng(devices=[]):  # seed the weights without touching the caller's RNG
        torch.manual_seed(cfg.seed)
        model = LlavaOnevisionForConditionalGeneration(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
