"""The paper's Stage 1 embedder: a LLaVA-OneVision-style VLM reads a user's K labelled pairs and its
hidden states become the user embedding (the paper).

This module owns the prompt (:func:`build_prompt_text`, :func:`build_messages`) and
:class:`VLMEmbedder`, which loads any transformers image-text-to-text checkpoint through
``AutoProcessor`` / ``AutoModelForImageTextToText`` (a hub id such as
``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``, or a local directory such as the tiny default built
by :mod:`ppd_core.tiny.vlm`) and offers three read-outs, each (rows, hidden) per shot set
with rows = text layers + 1 (embedding output, then one row per decoder layer; the last row is
post-final-norm in HF Qwen2):

- ``generate`` (the paper's): greedy decoding; the hidden states of the last decoding step, i.e.
  of the input position that produced the last generated token. The decoded text is the profile.
- ``prefill``: one forward pass; the hidden states at the last prompt token (no decoding).
- ``image_diff``: one forward pass; each image's token run mean-pooled, preferred minus
  dispreferred, averaged over the shots. A random VLM cannot bind "this is the preferred image" to
  an image, so offline only this read-out carries the preference (the toy-world measurements).

Batches are left-padded by the processor; position ids follow the attention mask, so a batch gives
the same embeddings as one set at a time (up to float rounding).
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch

from ppd_core.config import EmbedderSpec
from ppd_core.embed.base import Embedder, EmbedOutput, ShotSet
from ppd_core.errors import ConfigError, InputError
from ppd_core.weights import files_digest, local_snapshot, resolve_device

Readout = Literal["generate", "prefill", "image_diff"]

# ------------------------------------------------------------------------------------------- prompt
# The paper's prompt (the paper), paraphrased; its layout is kept: one user turn, K pairs, the
# preferred image always first within a pair, images inline in the text (the paper's code places the
# image token inside the prompt string; see build_messages for why we keep it there).

SYSTEM_PROMPT = "You are a helpful assistant."
INTRO = (
    "You will see examples of images that a user preferred and images that the same user "
    "dispreferred. Each example is a pair of images generated from the same caption."
)
PAIR_HEADER = "Here is the {i}st pair of images:"
CAPTION_LINE = "Here is the caption: {caption}"
PREFERRED_LINE = "{image} This is the preferred image."
DISPREFERRED_LINE = "{image} This is the dispreferred image."
INSTRUCTION = (
    "Judge the images by their style, visual quality and aesthetics. "
    "(1) Describe both images of each pair. "
    "(2) Explain the differences between the preferred and the dispreferred image of each pair. "
    "(3) Summarise what this user likes and dislikes into a User Profile.\n"
    "Answer in this format:"
)
ANSWER_PAIR = "Pair {k}:\nPreferred Image: ...\nDispreferred Image: ...\nDifferences: ..."
ANSWER_PROFILE = "User Profile: ..."
DEFAULT_IMAGE_TOKEN = "<image>"


def _clean_caption(caption: str | None, image_token: str) -> str:
    """A caption must not smuggle in an image placeholder: the processor would count it as an image."""
    text = caption or ""
    for token in (image_token, DEFAULT_IMAGE_TOKEN, "<video>"):
        text = text.replace(token, " ")
    return " ".join(text.split())  # one line, no stray whitespace


def prompt_text(captions: Sequence[str | None], image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """The user turn for pairs with these captions: intro, K pair blocks, instruction.

    Blocks are separated by a blank line, lines within a block by a newline.
    """
    blocks = [INTRO]
    for i, caption in enumerate(captions, start=1):
        blocks.append(
            "\n".join(
                [
                    # Literal "st" for every i ("2st", "3st", ...): the paper's code has this ordinal
                    # bug and we keep it so the prompt reproduces the paper's exactly.
                    PAIR_HEADER.format(i=i),
                    CAPTION_LINE.format(caption=_clean_caption(caption, image_token)),
                    PREFERRED_LINE.format(image=image_token),
                    DISPREFERRED_LINE.format(image=image_token),
                ]
            )
        )
    answer = "\n".join([ANSWER_PAIR.format(k=k) for k in range(1, len(captions) + 1)] + [ANSWER_PROFILE])
    blocks.append(f"{INSTRUCTION}\n{answer}")
    return "\n\n".join(blocks).strip()


def build_prompt_text(shots: ShotSet | Sequence, image_token: str = DEFAULT_IMAGE_TOKEN) -> str:
    """The user turn of one shot set (a ShotSet or its shots), with ``image_token`` where each image goes."""
    shots = shots.shots if isinstance(shots, ShotSet) else shots
    return prompt_text([s.caption for s in shots], image_token)


def build_messages(shots: ShotSet | Sequence, image_token: str = DEFAULT_IMAGE_TOKEN) -> list[dict]:
    """Chat messages of one shot set: the system prompt (the paper's qwen_1_5 conversation) and one user
    turn whose single text entry carries the 2K image placeholders inline.

    Images stay inside the text rather than as separate ``{"type": "image"}`` entries because the
    published llava-hf LLaVA-OneVision chat templates render all image entries *before* all text;
    inline placeholders keep the paper's interleaved layout under any template. The processor then
    takes the images in placeholder order: preferred_1, dispreferred_1, preferred_2, ...
    """
    return [
        {"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": build_prompt_text(shots, image_token)}]},
    ]


def prompt_corpus(captions: Sequence[str] = ()) -> list[str]:
    """Texts a tiny tokenizer should know: the chat roles, and the prompt for K = 1..5 shots."""
    captions = list(captions) or ["a caption"]
    texts = [SYSTEM_PROMPT, "system", "user", "assistant"]
    for k in range(1, 6):
        texts.append(prompt_text([captions[(k + j) % len(captions)] for j in range(k)]))
    return texts


def shot_images(shot_set: ShotSet) -> list:
    """The 2K images of a set in prompt order (preferred first within each pair), as RGB."""
    return [im.convert("RGB") for s in shot_set.shots for im in (s.preferred, s.dispreferred)]


# ----------------------------------------------------------------------------------------- embedder


class VLMEmbedder(Embedder):
    """Shot sets -> hidden states of an image-text-to-text model (LLaVA-OneVision or alike).

    ``layers`` picks rows of the (text layers + 1) hidden states (0 = embedding output, -1 = last
    layer; None keeps all); ``layer_pooling="mean"`` averages the kept rows into one row. The output
    is always 2-D, ``(rows, hidden)`` with rows = 1 after mean pooling, so ``emb[-1]`` is the row a
    probe reads whichever pooling is chosen.
    """

    def __init__(
        self,
        model: str | Path,
        readout: Readout = "image_diff",
        layers: tuple[int, ...] | None = None,
        layer_pooling: Literal["none", "mean"] = "none",
        max_new_tokens: int = 64,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        name: str | None = None,
    ) -> None:
        from transformers import AutoConfig

        if readout not in ("generate", "prefill", "image_diff"):
            raise ConfigError(f"unknown VLM read-out {readout!r} (generate, prefill or image_diff)")
        if layer_pooling not in ("none", "mean"):
            raise ConfigError(f"unknown layer_pooling {layer_pooling!r} (none or mean)")
        self.model_id = str(model)
        self.readout = readout
        self.layer_pooling = layer_pooling
        self.max_new_tokens = int(max_new_tokens)
        self.dtype_name = dtype
        self.device = resolve_device(device)
        self.name = name or f"vlm-{readout}"

        config = AutoConfig.from_pretrained(self.model_id)
        text_config = config.get_text_config()
        self.hidden_size = int(text_config.hidden_size)
        self.num_rows = int(text_config.num_hidden_layers) + 1  # embedding output + one per layer
        rows = list(range(self.num_rows))
        if layers is not None:
            if not layers:
                raise ConfigError("layers must name at least one hidden-state row (or be None for all)")
            bad = [i for i in layers if not -self.num_rows <= i < self.num_rows]
            if bad:
                raise ConfigError(
                    f"layers {bad} out of range: {self.model_id} has {self.num_rows} hidden-state rows "
                    f"(0..{self.num_rows - 1}, or negative from the end)"
                )
            rows = [rows[i] for i in layers]
        self.layers = None if layers is None else tuple(layers)
        self.rows = rows  # non-negative indices into the (num_rows) hidden states
        self._commit_hash = getattr(config, "_commit_hash", None)
        self._digest: str | None = None
        self._processor = None
        self._model = None
        self._load_lock = threading.Lock()  # shard tasks in threads may share one instance

    @classmethod
    def from_spec(
        cls, spec: EmbedderSpec, model_dir: Path | None, device: str | torch.device = "cpu"
    ) -> VLMEmbedder:
        """Build from an ``embed.embedders`` entry; ``spec.model=None`` means the tiny default at ``model_dir``."""
        if spec.kind != "vlm":
            raise ConfigError(f"embedder {spec.name!r} has kind {spec.kind!r}, not vlm")
        if spec.model is None and model_dir is None:
            raise ConfigError(f"embedder {spec.name!r} names no model and no tiny default model was built")
        return cls(
            model=spec.model if spec.model is not None else model_dir,
            readout=spec.readout,
            layers=spec.layers,
            layer_pooling=spec.layer_pooling,
            max_new_tokens=spec.max_new_tokens,
            dtype=spec.dtype,
            device=device,
            name=spec.name,
        )

    # -------------------------------------------------------------------------------- interface
    @property
    def output_shape(self) -> tuple[int, ...]:
        rows = 1 if self.layer_pooling == "mean" else len(self.rows)
        return (rows, self.hidden_size)

    def identity(self) -> dict:
        ident = {
            "kind": "vlm",
            "model_id": self.model_id,
            "weights_digest": self.weights_digest(),
            "readout": self.readout,
            "layers": None if self.layers is None else list(self.layers),
            "layer_pooling": self.layer_pooling,
            "dtype": self.dtype_name,
        }
        if self.readout == "generate":
            ident["max_new_tokens"] = self.max_new_tokens
        return ident

    def weights_digest(self) -> str:
        """sha256 of the checkpoint's *.safetensors (else *.bin) files; ``commit:<hash>`` when only a hub
        revision is known."""
        if self._digest is None:
            local = local_snapshot(self.model_id)
            files = []
            if local is not None:
                files = sorted(local.glob("*.safetensors")) or sorted(local.glob("*.bin"))
            if files:
                self._digest = files_digest(files)
            elif self._commit_hash:
                self._digest = f"commit:{self._commit_hash}"
            else:
                raise InputError(f"cannot identify the weights of {self.model_id}: no weight files found")
        return self._digest

    def embed(self, batch: Sequence[ShotSet]) -> EmbedOutput:
        if not batch:
            raise InputError("embed() needs at least one shot set")
        _, model = self._load()
        inputs = self._encode(batch)
        with torch.inference_mode():
            if self.readout == "generate":
                hidden, profiles = self._generate(inputs)
            elif self.readout == "prefill":
                hidden, profiles = self._prefill(model, inputs), None
            else:
                hidden, profiles = self._image_diff(model, inputs, batch), None
            # hidden: (B, num_rows, H)
            out = hidden[:, self.rows]  # (B, rows, H)
            if self.layer_pooling == "mean":
                out = out.mean(dim=1, keepdim=True)  # (B, 1, H)
        return EmbedOutput(embeddings=out.float().cpu().contiguous(), profiles=profiles)

    # ---------------------------------------------------------------------------------- loading
    def _load(self):
        with self._load_lock:
            if self._model is None:
                from transformers import AutoModelForImageTextToText, AutoProcessor

                processor = AutoProcessor.from_pretrained(self.model_id)
                processor.tokenizer.padding_side = "left"  # read-outs index position -1
                model = AutoModelForImageTextToText.from_pretrained(
                    self.model_id, dtype=getattr(torch, self.dtype_name)
                )
                self._processor, self._model = processor, model.to(self.device).eval()
        return self._processor, self._model

    def _encode(self, batch: Sequence[ShotSet]) -> dict:
        processor = self._processor
        texts = [
            processor.apply_chat_template(
                build_messages(s, processor.image_token), add_generation_prompt=True, tokenize=False
            )
            for s in batch
        ]
        # One nested image list per set: a flat list would be read as single-image samples (anyres
        # patching, a different token count).
        images = [shot_images(s) for s in batch]
        inputs = processor(images=images, text=texts, padding=True, return_tensors="pt")
        if not bool(inputs["attention_mask"][:, -1].all()):
            raise InputError("the processor padded on the right; the read-outs need left padding")
        model_dtype = self._model.dtype
        return {
            k: (v.to(self.device, model_dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }

    def _forward_hidden(self, model, inputs: dict) -> tuple[torch.Tensor, ...]:
        """num_rows tensors of (B, S, H). Positions are counted from each sequence's first real token,
        so left padding does not shift them; logits only for the last position (they are unused)."""
        position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        out = model(**inputs, position_ids=position_ids, output_hidden_states=True, logits_to_keep=1)
        return out.hidden_states

    # --------------------------------------------------------------------------------- read-outs
    def _prefill(self, model, inputs: dict) -> torch.Tensor:
        hidden = self._forward_hidden(model, inputs)
        return torch.stack([h[:, -1] for h in hidden], dim=1)  # (B, num_rows, H): last prompt token

    def _image_diff(self, model, inputs: dict, batch: Sequence[ShotSet]) -> torch.Tensor:
        shots = torch.tensor([len(s.shots) for s in batch], device=self.device)  # (B,) K per set
        weights = image_run_weights(inputs["input_ids"], self._processor.image_token_id, 2 * shots, batch)
        hidden = self._forward_hidden(model, inputs)
        pooled = torch.stack(
            [torch.einsum("bsn,bsh->bnh", weights, h.float()) for h in hidden], dim=1
        )  # (B, R, 2K, H): runs in prompt order preferred_1, dispreferred_1, preferred_2, ...
        diff = pooled[:, :, 0::2] - pooled[:, :, 1::2]  # (B, R, K, H)
        real = (torch.arange(diff.shape[2], device=self.device) < shots[:, None]).float()  # (B, K)
        return (diff * real[:, None, :, None]).sum(2) / shots[:, None, None]  # (B, R, H)

    def _generate(self, inputs: dict) -> tuple[torch.Tensor, list[str]]:
        processor, model = self._processor, self._model
        tokenizer = processor.tokenizer
        gen = model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
        pad_id = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
        out = model.generate(
            **inputs,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            output_hidden_states=True,
            return_dict_in_generate=True,
            pad_token_id=pad_id,
        )
        new_tokens = out.sequences[:, inputs["input_ids"].shape[1] :]  # (B, T), pad after EOS
        steps = last_decoding_step(new_tokens, eos)  # (B,)
        # out.hidden_states[t]: num_rows tensors of (B, S_t, H); the last position of step t is the
        # input that produced new_tokens[:, t].
        rows = torch.arange(new_tokens.shape[0], device=new_tokens.device)
        hidden = torch.stack(
            [torch.stack([layer[:, -1] for layer in step], dim=1) for step in out.hidden_states], dim=1
        )[rows, steps]  # (B, T, num_rows, H) -> (B, num_rows, H)
        profiles = [
            tokenizer.decode(new_tokens[b, : int(steps[b]) + 1], skip_special_tokens=True).strip()
            for b in range(new_tokens.shape[0])
        ]
        return hidden, profiles


def last_decoding_step(new_tokens: torch.Tensor, eos_token_id: int | Sequence[int] | None) -> torch.Tensor:
    """(B,) index of the step whose output is each sequence's last real token: its first EOS, else the
    last step.

    A batch decodes until every sequence has stopped; one that emits EOS earlier is padded while the
    others run on. Taking the step that produced its EOS gives what decoding it alone (stopping at EOS,
    as the paper does with batch size 1) ends on. Keying on EOS, not on the pad id, stays right when a
    random model emits the pad token as an ordinary token.
    """
    num_steps = new_tokens.shape[1]
    eos_ids = (
        [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    )
    is_eos = torch.zeros_like(new_tokens, dtype=torch.bool)
    for token_id in eos_ids:
        is_eos |= new_tokens == token_id
    first_eos = is_eos.long().argmax(dim=1)  # 0 when there is none; masked below
    return torch.where(is_eos.any(dim=1), first_eos, torch.full_like(first_eos, num_steps - 1))


def image_run_weights(
    input_ids: torch.Tensor, image_token_id: int, expected_runs: torch.Tensor, batch: Sequence[ShotSet]
) -> torch.Tensor:
    """(B, S, N) averaging weights, N = max expected runs: 1/len over the tokens of each image's
    contiguous run of image tokens. Raises when a sequence does not hold ``expected_runs`` runs."""
    is_image = input_ids == image_token_id  # (B, S)
    starts = is_image & ~torch.nn.functional.pad(is_image, (1, 0))[:, :-1]  # first token of each run
    found = starts.sum(-1)  # (B,)
    wrong = torch.nonzero(found != expected_runs).flatten().tolist()
    if wrong:
        b = wrong[0]
        raise InputError(
            f"shot set {batch[b].shot_set_id}: found {int(found[b])} image-token runs, expected "
            f"{int(expected_runs[b])} (2 per shot); each image must expand to one contiguous run"
        )
    run_id = (starts.long().cumsum(-1) - 1).clamp(min=0)  # (B, S); pads before run 0 are masked below
    weights = torch.nn.functional.one_hot(run_id, int(expected_runs.max())).float()  # (B, S, N)
    weights = weights * is_image[..., None]
    return weights / weights.sum(1, keepdim=True).clamp(min=1)
