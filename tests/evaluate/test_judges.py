"""Judges (ppd_core.evaluate.judges): the oracle, reward and VLM judges, the paper's both-orders
consistency rule, the seeded shot order, and judge agreement on labelled pairs.

Stub answerers stand in for a VLM where the rule, not the model, is under test; one tiny random
LLaVA-OneVision built per module runs the VLM judge end to end.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ppd_core.config import JudgeSpec, TinyModelsConfig, WorldConfig
from ppd_core.data.world_render import ATTRIBUTES, CAPTIONS, SyntheticWorld, render_images
from ppd_core.embed.base import Shot, ShotSet
from ppd_core.errors import ConfigError, InputError
from ppd_core.evaluate.judges import (
    ANSWER_LINE,
    Judge,
    OracleJudge,
    RewardJudge,
    TransformersAnswerer,
    VLMJudge,
    answer_positions,
    answer_tokens,
    combine_orders,
    judge_agreement,
    judge_prompt,
    load_judge,
    shot_order_rng,
)
from ppd_core.tiny.vlm import build_tiny_vlm

BRIGHT, DARK = 0, 1  # users of the test world: one likes a bright background, one a dark one


def styles(brightness: list[float]) -> np.ndarray:
    """(N, A) style latents: only brightness varies."""
    z = np.zeros((len(brightness), len(ATTRIBUTES)))
    z[:, ATTRIBUTES.index("brightness")] = brightness
    return z


def render(brightness: list[float]) -> np.ndarray:
    """uint8 (N, 16, 16, 3) red circles with the given background brightness latents."""
    return render_images([CAPTIONS[0]] * len(brightness), styles(brightness))


@pytest.fixture(scope="module")
def world() -> SyntheticWorld:
    weights = np.zeros((2, len(ATTRIBUTES)))
    weights[:, ATTRIBUTES.index("brightness")] = [1.0, -1.0]
    return SyntheticWorld(
        user_ids=np.array([BRIGHT, DARK]),
        user_archetype=np.array([0, 1]),
        user_weights=weights,
        archetypes=weights,
        mean=np.zeros(len(ATTRIBUTES)),
        std=np.ones(len(ATTRIBUTES)),
        config=WorldConfig(),
    )


def pil(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8))


def shot_set(user: int, shots: int = 4) -> ShotSet:
    pairs = tuple(
        Shot(
            f"{CAPTIONS[k]} <image>",
            pil(100 * user + 2 * k),
            pil(100 * user + 2 * k + 1),
            pair_id=f"p{user}-{k}",
        )
        for k in range(shots)
    )
    return ShotSet(shot_set_id=f"set{user}", user_id=user, shots=pairs)


# ----------------------------------------------------------------------------------- stand-ins


class MeanPixelReward:
    """The Reward interface (ppd_core.rewards.scorers): brightness scores; per user, user 1 flips it."""

    def __init__(self, per_user: bool = False) -> None:
        self.name = "mean-pixel"
        self.per_user = per_user
        self.calls: list = []

    def score(self, images: np.ndarray, prompts, user_ids=None) -> np.ndarray:
        self.calls.append(user_ids)
        score = images.reshape(len(images), -1).mean(1).astype(np.float64)  # (N,)
        return score if user_ids is None else np.where(np.asarray(user_ids) == 1, -score, score)


class StubAnswerer:
    """Records its queries; ``rule`` maps the two query images (shown 1st, 2nd) to logits of "1", "2"."""

    image_token = "<image>"

    def __init__(self, rule) -> None:
        self.rule = rule
        self.texts: list[str] = []
        self.images: list[list[Image.Image]] = []

    def answer_logits(self, texts, images) -> np.ndarray:
        self.texts += list(texts)
        self.images += [list(i) for i in images]
        return np.array([self.rule(np.asarray(i[-2], float), np.asarray(i[-1], float)) for i in images])


def brighter(first: np.ndarray, second: np.ndarray) -> list[float]:
    return [first.mean(), second.mean()]  # a consistent judge: prefers the brighter image


def always_first(first: np.ndarray, second: np.ndarray) -> list[float]:
    return [1.0, 0.0]  # pure position bias: "1" whatever is shown


def undecided(first: np.ndarray, second: np.ndarray) -> list[float]:
    return [0.5, 0.5]


def ask(judge: Judge, a: np.ndarray, b: np.ndarray, users=None) -> np.ndarray:
    users = list(users) if users is not None else [BRIGHT] * len(a)
    return judge.decide(users, [shot_set(u) for u in users], [CAPTIONS[0]] * len(a), a, b)


# --------------------------------------------------------------------------------- oracle judge


def test_oracle_judge_follows_each_users_world_reward(world):
    a, b = render([1.5, 1.5, -1.0, -1.0]), render([-1.5, -1.5, 1.0, 1.0])
    users = [BRIGHT, DARK, BRIGHT, DARK]
    decision = ask(OracleJudge(world), a, b, users)
    assert decision.dtype == np.int8
    assert decision.tolist() == [1, 0, 0, 1]
    expected = [
        int(world.reward(u, a[i : i + 1])[0] > world.reward(u, b[i : i + 1])[0]) for i, u in enumerate(users)
    ]
    assert decision.tolist() == expected


def test_oracle_judge_calls_identical_images_a_tie(world):
    a = render([0.5, 2.0])
    assert ask(OracleJudge(world), a, a.copy(), [BRIGHT, DARK]).tolist() == [-1, -1]


def test_judges_refuse_mismatched_inputs(world):
    a = render([0.0, 1.0])
    with pytest.raises(InputError):
        OracleJudge(world).decide([BRIGHT], [None], ["p"], a, a)
    with pytest.raises(InputError):
        OracleJudge(world).decide([BRIGHT, DARK], [None, None], ["p", "p"], a.astype(np.float32), a)


# --------------------------------------------------------------------------------- reward judge


def test_reward_judge_prefers_the_higher_score_and_calls_ties_undecided():
    a, b = render([1.0, -1.0, 0.0]), render([-1.0, 1.0, 0.0])
    reward = MeanPixelReward()
    assert ask(RewardJudge(reward), a, b).tolist() == [1, 0, -1]
    assert reward.calls == [None]  # a population reward is not told the user


def test_a_per_user_reward_judge_passes_the_users():
    a, b = render([1.0, 1.0]), render([-1.0, -1.0])
    reward = MeanPixelReward(per_user=True)
    judge = RewardJudge(reward, name="mine")
    assert ask(judge, a, b, users=[0, 1]).tolist() == [1, 0]
    assert reward.calls[0].tolist() == [0, 1, 0, 1]  # a then b, one call
    assert judge.name == "mine"


# ------------------------------------------------------------------------- consistency rule


@pytest.mark.parametrize(
    ("shown_ab", "shown_ba", "expected"),
    [
        (1, 2, 1),  # a picked in both orders
        (2, 1, 0),  # b picked in both orders
        (1, 1, -1),  # always the first position: inconsistent
        (2, 2, -1),  # always the second position: inconsistent
        (0, 2, -1),  # a tie in one order
        (1, 0, -1),
    ],
)
def test_combine_orders(shown_ab, shown_ba, expected):
    out = combine_orders(np.array([shown_ab], np.int8), np.array([shown_ba], np.int8))
    assert out.dtype == np.int8 and out.tolist() == [expected]


def test_answer_positions_compare_the_two_logits():
    assert answer_positions(np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 1.0]])).tolist() == [1, 2, 0]


@pytest.mark.parametrize(
    ("rule", "expected"),
    [(brighter, [1, 0]), (always_first, [-1, -1]), (undecided, [-1, -1])],
)
def test_vlm_judge_wins_only_when_both_orders_agree(rule, expected):
    judge = VLMJudge(None, answerer=StubAnswerer(rule))
    assert ask(judge, render([1.5, -1.5]), render([-1.5, 1.5])).tolist() == expected


def test_both_orders_see_the_same_shots_and_the_query_swapped():
    answerer = StubAnswerer(brighter)
    a, b = render([1.0, 0.0, -1.0]), render([0.0, -1.0, 1.0])
    ask(VLMJudge(None, answerer=answerer), a, b)
    n = len(a)
    assert answerer.texts[:n] == answerer.texts[n:]
    for i in range(n):
        ab, ba = answerer.images[i], answerer.images[n + i]
        assert all(x is y for x, y in zip(ab[:-2], ba[:-2], strict=True))
        assert np.array_equal(np.asarray(ab[-2]), a[i]) and np.array_equal(np.asarray(ab[-1]), b[i])
        assert np.array_equal(np.asarray(ba[-2]), b[i]) and np.array_equal(np.asarray(ba[-1]), a[i])


# ----------------------------------------------------------------------------------- the prompt


def test_judge_prompt_shows_every_shot_with_its_answer_then_the_query():
    shots = shot_set(3)
    prompt = judge_prompt(shots, "a blue square <image>", shot_order_rng(0, 3, 0))
    assert prompt.text.count("<image>") == 2 * len(shots.shots) + 2  # captions' placeholders were removed
    intro, *pairs, instruction, query = prompt.text.split("\n\n")
    assert len(pairs) == len(shots.shots) and ANSWER_LINE in instruction
    for k, (block, shot, answer) in enumerate(zip(pairs, shots.shots, prompt.shot_answers, strict=True)):
        assert block == (
            f"Here is Pair {k + 1}:\nCaption: {CAPTIONS[k]}\nImage 1: <image>\nImage 2: <image>\n"
            f"{ANSWER_LINE} {answer}"
        )
        shown = prompt.shot_images[2 * k : 2 * k + 2]  # the answer names where the preferred image landed
        assert np.array_equal(np.asarray(shown[answer - 1]), np.asarray(shot.preferred))
        assert np.array_equal(np.asarray(shown[2 - answer]), np.asarray(shot.dispreferred))
    assert query == "Here is the new pair:\nCaption: a blue square\nImage 1: <image>\nImage 2: <image>"


def test_without_shots_the_prompt_asks_the_query_alone():
    prompt = judge_prompt(None, "a red circle", shot_order_rng(0, 0, 0))
    assert prompt.shot_images == () and "Here is Pair" not in prompt.text
    assert prompt.text.count("<image>") == 2


def test_shot_order_is_seeded():
    shots = shot_set(5)

    def answers(seed: int, user: int = 5, index: int = 0) -> tuple[int, ...]:
        return judge_prompt(shots, "p", shot_order_rng(seed, user, index)).shot_answers

    assert answers(0) == answers(0)
    assert (
        judge_prompt(shots, "p", shot_order_rng(0, 5, 0)).text
        == judge_prompt(shots, "p", shot_order_rng(0, 5, 0)).text
    )
    assert len({answers(seed) for seed in range(8)}) > 1
    assert len({answers(0, index=i) for i in range(8)}) > 1  # every query draws its own order
    assert {a for seed in range(8) for a in answers(seed)} == {1, 2}


def test_vlm_judge_prompts_follow_its_seed():
    users, sets = [5, 5], [shot_set(5), shot_set(5)]

    def texts(seed: int) -> list[str]:
        return [
            q.text
            for q in VLMJudge(None, seed=seed, answerer=StubAnswerer(brighter)).prompts(
                users, sets, ["p"] * 2
            )
        ]

    assert texts(0) == texts(0)
    assert any(texts(0) != texts(s) for s in range(1, 6))


# ------------------------------------------------------------------------------- tiny VLM judge


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"), TinyModelsConfig(seed=0), corpus=CAPTIONS[:6])


def test_vlm_judge_runs_end_to_end_on_the_tiny_vlm(tiny_dir):
    judge = VLMJudge(tiny_dir, seed=0, batch_size=3)
    a, b = render([1.0, -0.5, 0.3]), render([-1.0, 0.5, 0.0])
    decision = ask(judge, a, b, users=[0, 1, 2])
    assert decision.dtype == np.int8 and decision.shape == (3,)
    assert set(decision.tolist()) <= {-1, 0, 1}


def test_tiny_vlm_answers_do_not_depend_on_the_batch(tiny_dir):
    judge = VLMJudge(tiny_dir, seed=0, batch_size=4)
    users = [0, 1, 2]
    queries = judge.prompts(
        users, [shot_set(u) for u in users], ["a red circle", "a blue square", "a purple cross"]
    )
    a, b = render([1.0, -0.5, 0.3]), render([-1.0, 0.5, 0.0])
    images = [q.images(Image.fromarray(a[i]), Image.fromarray(b[i])) for i, q in enumerate(queries)]
    texts = [q.text for q in queries]
    batched = judge.answerer.answer_logits(texts, images)  # (3, 2), left-padded together
    one_by_one = np.concatenate(
        [judge.answerer.answer_logits([t], [i]) for t, i in zip(texts, images, strict=True)]
    )
    assert batched.shape == (3, 2)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-4)


def test_answer_tokens_are_what_the_answer_line_tokenizes_to(tiny_dir):
    answerer = TransformersAnswerer(tiny_dir)
    tokenizer = answerer._load()[0].tokenizer
    shared, id_1, id_2 = answer_tokens(tokenizer)
    assert id_1 != id_2
    prefix = f"Here is the new pair.\n{ANSWER_LINE}"
    context = tokenizer.encode(prefix + shared, add_special_tokens=False)  # what the judge feeds
    for answer, token in (("1", id_1), ("2", id_2)):
        full = tokenizer.encode(f"{prefix} {answer}", add_special_tokens=False)
        assert full[: len(context) + 1] == [*context, token]


# ----------------------------------------------------------------------------------- load_judge


def test_load_judge_builds_each_kind(world, tiny_dir):
    rewards = {"mean-pixel": MeanPixelReward()}
    oracle = load_judge(JudgeSpec(name="truth", kind="oracle"), rewards, world, None)
    assert isinstance(oracle, OracleJudge) and oracle.name == "truth"
    reward = load_judge(JudgeSpec(name="r", kind="reward", reward="mean-pixel"), rewards, None, None)
    assert isinstance(reward, RewardJudge) and reward.reward is rewards["mean-pixel"]
    vlm = load_judge(JudgeSpec(name="vlm", kind="vlm"), rewards, None, tiny_dir, seed=3)
    assert isinstance(vlm, VLMJudge) and vlm.model_id == str(tiny_dir) and vlm.seed == 3
    hub = load_judge(JudgeSpec(name="vlm", kind="vlm", model="org/some-vlm"), rewards, None, tiny_dir)
    assert hub.model_id == "org/some-vlm"  # nothing is loaded until the first decision


@pytest.mark.parametrize(
    "spec",
    [
        JudgeSpec(name="o", kind="oracle"),  # no world
        JudgeSpec(name="r", kind="reward", reward="missing"),
        JudgeSpec(name="v", kind="vlm"),  # no model and no tiny VLM
    ],
)
def test_load_judge_refuses_what_it_cannot_build(spec):
    with pytest.raises(ConfigError):
        load_judge(spec, {}, None, None)


# ------------------------------------------------------------------------------ judge agreement


class BrightnessJudge(Judge):
    """Prefers the brighter image; undecided when both are equally bright; records what it was shown."""

    name = "brightness"

    def __init__(self) -> None:
        self.shown_a: np.ndarray | None = None

    def decide(self, users, shot_sets, prompts, images_a, images_b) -> np.ndarray:
        self.shown_a = images_a
        score_a, score_b = images_a.mean(axis=(1, 2, 3)), images_b.mean(axis=(1, 2, 3))
        return np.where(score_a == score_b, -1, (score_a > score_b).astype(int)).astype(np.int8)


def test_judge_agreement_arithmetic():
    """10 pairs: the winner is brighter in 6 (agree), darker in 2 (disagree), equal in 2 (undecided)."""
    winners = render([1.0] * 6 + [-1.0] * 2 + [0.0] * 2)
    losers = render([-1.0] * 6 + [1.0] * 2 + [0.0] * 2)
    n = len(winners)
    judge = BrightnessJudge()
    out = judge_agreement(judge, [0] * n, [None] * n, [CAPTIONS[0]] * n, winners, losers, rng_seed=0)
    assert out == {
        "n": 10,
        "n_consistent": 8,
        "agreement": pytest.approx(0.75),
        "inconsistency_rate": pytest.approx(0.2),
        "agreement_all": pytest.approx(0.6),
    }
    winner_first = [np.array_equal(judge.shown_a[i], winners[i]) for i in range(6)]
    assert 0 < sum(winner_first) < 6  # the winner is shown on both sides


def test_judge_agreement_is_seeded():
    winners, losers = render([1.0] * 8), render([-1.0] * 8)

    def sides(seed: int) -> list[bool]:
        judge = BrightnessJudge()
        judge_agreement(judge, [0] * 8, [None] * 8, ["p"] * 8, winners, losers, rng_seed=seed)
        return [np.array_equal(judge.shown_a[i], winners[i]) for i in range(8)]

    assert sides(1) == sides(1)
    assert any(sides(1) != sides(s) for s in range(2, 6))
