"""Judges: given a user (and that user's shots), which of two images would this user prefer.

This module owns the one :class:`Judge` interface and its three kinds (the design):

- :class:`OracleJudge`: the synthetic world's oracle reward of the user, a against b.
- :class:`RewardJudge`: a reward model's score (per user when the reward is), a against b.
- :class:`VLMJudge`: the paper's protocol (the paper): a VLM sees the user's 4
  shots, each with its two images in a seeded random order and the position of the preferred one,
  then the query pair, asked in both orders; a is preferred only when both answers agree.

Every judge returns int8 (N,): 1 = a preferred, 0 = b preferred, -1 = undecided (an exact tie, or
answers that flip with the presentation order). :func:`judge_agreement` validates a judge on held-out
real labelled pairs, as the paper does before trusting a judge (83% for GPT-4o).
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from PIL import Image

from ppd_core.config import JudgeSpec
from ppd_core.embed.base import ShotSet
from ppd_core.embed.vlm import DEFAULT_IMAGE_TOKEN, _clean_caption
from ppd_core.errors import ConfigError, InputError
from ppd_core.weights import local_snapshot, resolve_device

if TYPE_CHECKING:
    from ppd_core.data.world_render import SyntheticWorld
    from ppd_core.rewards.scorers import Reward

A_WINS, B_WINS, UNDECIDED = 1, 0, -1


class Judge(abc.ABC):
    """(user, shots, prompt, image a, image b) -> which image the user prefers."""

    #: label used in tables (the JudgeSpec name)
    name: str = "judge"

    @abc.abstractmethod
    def decide(
        self,
        users: Sequence[int],
        shot_sets: Sequence[ShotSet | None],
        prompts: Sequence[str],
        images_a: np.ndarray,
        images_b: np.ndarray,
    ) -> np.ndarray:
        """images uint8 (N, H, W, 3) -> int8 (N,): 1 = a preferred, 0 = b preferred, -1 = undecided."""


def check_batch(users, shot_sets, prompts, images_a: np.ndarray, images_b: np.ndarray) -> int:
    """N, after checking that every argument describes the same N comparisons of uint8 RGB images."""
    n = len(users)
    if not (len(shot_sets) == len(prompts) == n):
        raise InputError(
            f"judge inputs disagree: {n} users, {len(shot_sets)} shot sets, {len(prompts)} prompts"
        )
    for name, images in (("images_a", images_a), ("images_b", images_b)):
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3 or len(images) != n:
            raise InputError(f"{name} must be uint8 ({n}, H, W, 3), got {images.dtype} {images.shape}")
    return n


def compare_scores(score_a: np.ndarray, score_b: np.ndarray) -> np.ndarray:
    """int8 (N,): 1 where a scores higher, 0 where b does, -1 on exact ties (and NaN)."""
    out = np.full(len(score_a), UNDECIDED, dtype=np.int8)
    out[score_a > score_b] = A_WINS
    out[score_a < score_b] = B_WINS
    return out


# ------------------------------------------------------------------------------ oracle and reward


class OracleJudge(Judge):
    """The synthetic world's truth: ``world.reward(user, a)`` against ``world.reward(user, b)``."""

    def __init__(self, world: SyntheticWorld, name: str = "oracle") -> None:
        self.world = world
        self.name = name

    def decide(self, users, shot_sets, prompts, images_a, images_b) -> np.ndarray:
        n = check_batch(users, shot_sets, prompts, images_a, images_b)
        users = np.asarray(users, dtype=np.int64).reshape(n)
        score_a, score_b = np.zeros(n), np.zeros(n)
        for user in np.unique(users):  # one attribute measurement per user's images
            rows = np.flatnonzero(users == user)
            score_a[rows] = self.world.reward(int(user), images_a[rows])
            score_b[rows] = self.world.reward(int(user), images_b[rows])
        return compare_scores(score_a, score_b)


class RewardJudge(Judge):
    """A reward model's score, a against b; a per-user reward is told whose preference it scores."""

    def __init__(self, reward: Reward, name: str | None = None) -> None:
        self.reward = reward
        self.name = name or reward.name

    def decide(self, users, shot_sets, prompts, images_a, images_b) -> np.ndarray:
        n = check_batch(users, shot_sets, prompts, images_a, images_b)
        images = np.concatenate([images_a, images_b])  # (2N, H, W, 3): one scoring call
        both_prompts = list(prompts) * 2
        if self.reward.per_user:
            user_ids = np.tile(np.asarray(users, dtype=np.int64), 2)
            scores = self.reward.score(images, both_prompts, user_ids=user_ids)
        else:
            scores = self.reward.score(images, both_prompts)
        scores = np.asarray(scores, dtype=np.float64)  # (2N,)
        return compare_scores(scores[:n], scores[n:])


# ------------------------------------------------------------------------------------ VLM prompt
# The paper's judge prompt (the paper), paraphrased: a system prompt, then one user turn with
# the K shots (images in random order, the preferred one's position as the answer) and the query pair;
# the assistant turn is pre-filled with the answer line so the next token is the answer.

JUDGE_SYSTEM_PROMPT = (
    "You are an expert in image aesthetics. You predict which of two images a specific user would "
    "prefer, judging by style, visual quality and aesthetics as this user does."
)
JUDGE_INTRO = (
    "Here are pairs of images that this user compared. Both images of a pair were generated from the "
    "same caption; after each pair comes the image this user preferred (1 or 2)."
)
JUDGE_PAIR = "Here is Pair {k}:\nCaption: {caption}\nImage 1: {image}\nImage 2: {image}"
ANSWER_LINE = "Prediction of user preference:"
JUDGE_INSTRUCTION = (
    "Predict which image of the new pair this user would prefer. Answer in the same format: "
    f'"{ANSWER_LINE} 1" or "{ANSWER_LINE} 2".'
)
JUDGE_QUERY = "Here is the new pair:\nCaption: {caption}\nImage 1: {image}\nImage 2: {image}"
ANSWERS = ("1", "2")


@dataclass(frozen=True)
class JudgePrompt:
    """One user turn: ``text`` with an image token where each image goes; ``shot_images`` (2K) in
    prompt order; ``shot_answers`` (K) the position (1 or 2) where each shot's preferred image landed.
    The query's two images follow the shots' (see :meth:`images`)."""

    text: str
    shot_images: tuple[Image.Image, ...]
    shot_answers: tuple[int, ...]

    def images(self, first: Image.Image, second: Image.Image) -> list[Image.Image]:
        """All 2K + 2 images in placeholder order, the query shown as (first, second)."""
        return [*self.shot_images, first, second]


def shot_order_rng(seed: int, user: int, query_index: int) -> np.random.Generator:
    """The generator that orders the shots' images for one query: seeded by (seed, user, query index)."""
    return np.random.default_rng([int(x) % (1 << 63) for x in (seed, user, query_index)])


def judge_prompt(
    shot_set: ShotSet | None, prompt: str, rng: np.random.Generator, image_token: str = DEFAULT_IMAGE_TOKEN
) -> JudgePrompt:
    """The judge's user turn for one query: intro, each shot with its two images in random order
    (one coin per shot from ``rng``) and its answer line, the instruction, then the query pair.
    ``shot_set=None`` asks without examples."""
    shots = shot_set.shots if shot_set is not None else ()
    flips = rng.random(len(shots)) < 0.5  # (K,) True: dispreferred image shown first
    blocks, images, answers = [JUDGE_INTRO], [], []
    for k, (shot, flip) in enumerate(zip(shots, flips, strict=True), start=1):
        pair = (shot.dispreferred, shot.preferred) if flip else (shot.preferred, shot.dispreferred)
        answer = 2 if flip else 1
        caption = _clean_caption(shot.caption, image_token)
        blocks.append(f"{JUDGE_PAIR.format(k=k, caption=caption, image=image_token)}\n{ANSWER_LINE} {answer}")
        images.extend(im.convert("RGB") for im in pair)
        answers.append(answer)
    blocks.append(JUDGE_INSTRUCTION)
    blocks.append(JUDGE_QUERY.format(caption=_clean_caption(prompt, image_token), image=image_token))
    return JudgePrompt("\n\n".join(blocks), tuple(images), tuple(answers))


def judge_messages(text: str) -> list[dict]:
    """Chat messages: the system prompt and one user turn whose text carries the images inline (as
    ppd_core.embed.vlm.build_messages does, so every chat template keeps the interleaved layout)."""
    return [
        {"role": "system", "content": [{"type": "text", "text": JUDGE_SYSTEM_PROMPT}]},
        {"role": "user", "content": [{"type": "text", "text": text}]},
    ]


def answer_positions(logits: np.ndarray) -> np.ndarray:
    """(B, 2) logits of the answers "1" and "2" -> int8 (B,): the position picked, 1 or 2; 0 on a tie."""
    out = np.zeros(len(logits), dtype=np.int8)
    out[logits[:, 0] > logits[:, 1]] = 1
    out[logits[:, 1] > logits[:, 0]] = 2
    return out


def combine_orders(shown_ab: np.ndarray, shown_ba: np.ndarray) -> np.ndarray:
    """Positions picked with the query shown as (a, b) and as (b, a) -> int8 (N,): 1 when both picked
    a (1 then 2), 0 when both picked b (2 then 1), -1 otherwise (position-dependent or a tie)."""
    out = np.full(len(shown_ab), UNDECIDED, dtype=np.int8)
    out[(shown_ab == 1) & (shown_ba == 2)] = A_WINS
    out[(shown_ab == 2) & (shown_ba == 1)] = B_WINS
    return out


# ------------------------------------------------------------------------------------ VLM answer


class Answerer(Protocol):
    """Reads the answer of a VLM: ``image_token`` is its placeholder; ``answer_logits`` maps user turns
    (with the images they name) to float (B, 2) next-token logits of "1" and "2"."""

    image_token: str

    def answer_logits(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> np.ndarray: ...


class TransformersAnswerer:
    """The answer of any ``AutoModelForImageTextToText`` checkpoint (hub id or local dir).

    The answer is read deterministically as greedy decoding of a one-token answer restricted to the
    two valid answers: the assistant turn is pre-filled with "Prediction of user preference:" and the
    next-token logits of "1" and "2" are compared. No text is generated or parsed, so any VLM, even a
    random tiny one, gives a valid answer; an exact tie counts as undecided.
    """

    def __init__(
        self,
        model: str | Path,
        device: str | torch.device = "cpu",
        dtype: str = "float32",
        batch_size: int = 4,
    ) -> None:
        self.model_id = str(model)
        self.device = resolve_device(device)
        self.dtype_name = dtype
        self.batch_size = int(batch_size)
        self._processor = None
        self._model = None
        self._answer: tuple[str, int, int] | None = None  # (shared answer prefix, id of "1", id of "2")

    @property
    def image_token(self) -> str:
        return self._load()[0].image_token

    def _load(self):
        if self._model is None:
            from transformers import AutoModelForImageTextToText, AutoProcessor

            source = local_snapshot(self.model_id) or self.model_id  # a cached snapshot loads offline
            processor = AutoProcessor.from_pretrained(source)
            processor.tokenizer.padding_side = "left"  # the answer is read at position -1
            model = AutoModelForImageTextToText.from_pretrained(source, dtype=getattr(torch, self.dtype_name))
            self._answer = answer_tokens(processor.tokenizer)
            self._processor, self._model = processor, model.to(self.device).eval()
        return self._processor, self._model

    def answer_logits(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> np.ndarray:
        self._load()
        chunks = [
            self._chunk_logits(texts[i : i + self.batch_size], images[i : i + self.batch_size])
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.concatenate(chunks) if chunks else np.zeros((0, 2))

    def _chunk_logits(self, texts: Sequence[str], images: Sequence[Sequence[Image.Image]]) -> np.ndarray:
        processor, model = self._processor, self._model
        shared, id_1, id_2 = self._answer
        prompts = [
            processor.apply_chat_template(judge_messages(t), add_generation_prompt=True, tokenize=False)
            + ANSWER_LINE
            + shared
            for t in texts
        ]
        # One nested image list per query: a flat list would be read as single-image samples.
        inputs = processor(images=[list(i) for i in images], text=prompts, padding=True, return_tensors="pt")
        if not bool(inputs["attention_mask"][:, -1].all()):
            raise InputError("the processor padded on the right; the answer read-out needs left padding")
        inputs = {
            k: (v.to(self.device, model.dtype) if v.is_floating_point() else v.to(self.device))
            for k, v in inputs.items()
        }
        # Positions count from each sequence's first real token, so left padding does not shift them.
        position_ids = (inputs["attention_mask"].long().cumsum(-1) - 1).clamp(min=0)  # (B, S)
        with torch.inference_mode():
            logits = model(**inputs, position_ids=position_ids, logits_to_keep=1).logits[:, -1]  # (B, V)
        return logits[:, [id_1, id_2]].float().cpu().numpy()  # (B, 2)


def answer_tokens(tokenizer) -> tuple[str, int, int]:
    """How " 1" and " 2" tokenize after the answer line: (the text both share, e.g. " " for Qwen2
    whose digits are single tokens, else ""; the first token of "1"; the first token of "2")."""
    ids = [tokenizer.encode(f" {a}", add_special_tokens=False) for a in ANSWERS]
    shared = 0
    while shared < min(map(len, ids)) and ids[0][shared] == ids[1][shared]:
        shared += 1
    if shared == min(map(len, ids)):
        raise ConfigError(f"the tokenizer cannot tell the answers apart: {ids}")
    return tokenizer.decode(ids[0][:shared]), ids[0][shared], ids[1][shared]


class VLMJudge(Judge):
    """The paper's VLM judge: the user's shots in seeded random order, the query asked in both orders,
    a decision only when both answers agree (the paper). ``answerer`` swaps the model (tests)."""

    def __init__(
        self,
        model: str | Path | None,
        device: str | torch.device = "cpu",
        seed: int = 0,
        *,
        dtype: str = "float32",
        batch_size: int = 4,
        name: str = "vlm",
        answerer: Answerer | None = None,
    ) -> None:
        if answerer is None and model is None:
            raise ConfigError("VLMJudge needs a model (local dir or hub id) or an answerer")
        self.model_id = None if model is None else str(model)
        self.answerer = answerer or TransformersAnswerer(model, device, dtype, batch_size)
        self.seed = int(seed)
        self.name = name

    def prompts(self, users, shot_sets, prompts) -> list[JudgePrompt]:
        """One JudgePrompt per query; the shot order of query i is seeded by (seed, users[i], i)."""
        token = self.answerer.image_token
        return [
            judge_prompt(s, p, shot_order_rng(self.seed, u, i), token)
            for i, (u, s, p) in enumerate(zip(users, shot_sets, prompts, strict=True))
        ]

    def decide(self, users, shot_sets, prompts, images_a, images_b) -> np.ndarray:
        n = check_batch(users, shot_sets, prompts, images_a, images_b)
        queries = self.prompts(users, shot_sets, prompts)
        a = [Image.fromarray(im) for im in images_a]
        b = [Image.fromarray(im) for im in images_b]
        texts = [q.text for q in queries] * 2  # (2N,): every query as (a, b), then as (b, a)
        images = [q.images(a[i], b[i]) for i, q in enumerate(queries)]
        images += [q.images(b[i], a[i]) for i, q in enumerate(queries)]
        picked = answer_positions(self.answerer.answer_logits(texts, images))  # (2N,)
        return combine_orders(picked[:n], picked[n:])


# ---------------------------------------------------------------------------------- construction


def load_judge(
    spec: JudgeSpec,
    rewards: Mapping[str, Reward],
    world: SyntheticWorld | None,
    tiny_vlm_dir: Path | None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> Judge:
    """Build the judge an ``evaluate.judges`` entry names; a vlm with ``model=None`` is the tiny VLM
    at ``tiny_vlm_dir`` (``<tiny_models>/vlm``); ``seed`` orders the VLM judge's shots."""
    if spec.kind == "oracle":
        if world is None:
            raise ConfigError(f"judge {spec.name!r} is an oracle, which needs the synthetic world")
        return OracleJudge(world, name=spec.name)
    if spec.kind == "reward":
        if spec.reward not in rewards:
            raise ConfigError(
                f"judge {spec.name!r} names reward {spec.reward!r}, not one of {sorted(rewards)}"
            )
        return RewardJudge(rewards[spec.reward], name=spec.name)
    if spec.kind == "vlm":
        model = spec.model if spec.model is not None else tiny_vlm_dir
        if model is None:
            raise ConfigError(f"judge {spec.name!r} names no model and no tiny default VLM was built")
        return VLMJudge(model, device=device, seed=seed, name=spec.name)
    raise ConfigError(f"unknown judge kind {spec.kind!r}")


# ------------------------------------------------------------------------------------ validation


def judge_agreement(
    judge: Judge,
    users: Sequence[int],
    shot_sets: Sequence[ShotSet | None],
    prompts: Sequence[str],
    winner_images: np.ndarray,
    loser_images: np.ndarray,
    rng_seed: int,
) -> dict:
    """How often the judge picks the real user's winner on held-out labelled pairs.

    Each pair is shown with the winner as a or b by a seeded coin, so a judge biased towards one side
    cannot score. ``agreement`` is over consistent answers (nan when there are none),
    ``agreement_all`` counts undecided answers as disagreement.
    """
    n = len(users)
    winner_is_a = np.random.default_rng(rng_seed).random(n) < 0.5  # (N,)
    side = winner_is_a[:, None, None, None]
    images_a = np.where(side, winner_images, loser_images)  # (N, H, W, 3)
    images_b = np.where(side, loser_images, winner_images)
    decision = judge.decide(users, shot_sets, prompts, images_a, images_b)  # (N,)
    correct = np.where(winner_is_a, decision == A_WINS, decision == B_WINS)
    consistent = int((decision != UNDECIDED).sum())
    return {
        "n": n,
        "n_consistent": consistent,
        "agreement": float(correct.sum() / consistent) if consistent else float("nan"),
        "inconsistency_rate": float(1 - consistent / n) if n else float("nan"),
        "agreement_all": float(correct.mean()) if n else float("nan"),
    }
