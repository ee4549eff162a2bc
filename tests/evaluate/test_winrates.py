"""Win-rate statistics (ppd_core.evaluate.winrates) on hand-made comparison tables."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest

from ppd_core.errors import InputError, SchemaError
from ppd_core.evaluate.winrates import (
    bootstrap_counts,
    monotonicity,
    per_user,
    ratio_interval,
    spearman,
    win_rates,
)
from ppd_core.schemas import COMPARISONS, USER_WIN_RATES, WIN_RATES


def comparisons(rows, group="seen", model="ppd", baseline="base") -> pa.Table:
    """rows: (user_id, outcome) or (user_id, outcome, reward_model, reward_baseline, reward_std)."""
    records = []
    for i, row in enumerate(rows):
        user, outcome, r_model, r_base, std = (*row, 0.0, 0.0, 1.0) if len(row) == 2 else row
        records.append(
            {
                "user_id": user,
                "group": group,
                "model": model,
                "baseline": baseline,
                "prompt": f"prompt {i}",
                "seed": i,
                "outcome": outcome,
                "reward_model": r_model,
                "reward_baseline": r_base,
                "reward_std": std,
            }
        )
    return pa.Table.from_pylist(records, schema=COMPARISONS)


def only_row(table: pa.Table) -> dict:
    assert table.num_rows == 1
    return table.to_pylist()[0]


# ----------------------------------------------------------------------------------- win rates


def test_all_wins_give_one_with_a_degenerate_interval():
    out = win_rates(comparisons([(u, 1) for u in range(5) for _ in range(3)]), n_boot=200, seed=0)
    assert out.schema == WIN_RATES
    row = only_row(out)
    assert (row["n"], row["n_users"], row["n_consistent"], row["wins"]) == (15, 5, 15, 15)
    assert row["win_rate"] == row["win_rate_low"] == row["win_rate_high"] == 1.0
    assert row["inconsistency_rate"] == 0.0
    assert (row["confidence"], row["n_boot"]) == (0.95, 200)


def test_inconsistent_comparisons_leave_the_win_rate_but_count_in_the_inconsistency_rate():
    row = only_row(win_rates(comparisons([(0, 1), (0, 1), (0, 0), (1, -1), (1, -1)]), n_boot=50))
    assert (row["n"], row["n_consistent"], row["wins"]) == (5, 3, 2)
    assert row["win_rate"] == pytest.approx(2 / 3)
    assert row["inconsistency_rate"] == pytest.approx(0.4)


def test_only_inconsistent_comparisons_give_no_win_rate():
    row = only_row(win_rates(comparisons([(0, -1), (1, -1)]), n_boot=20))
    assert math.isnan(row["win_rate"]) and math.isnan(row["win_rate_low"])
    assert row["inconsistency_rate"] == 1.0


def test_the_bootstrap_resamples_users_not_comparisons():
    """One user with 40 wins, nine with 2 losses each: whether that user is drawn dominates a
    resample, so the user-level interval is far wider than a comparison-level one."""
    rows = [(0, 1)] * 40 + [(u, 0) for u in range(1, 10) for _ in range(2)]
    row = only_row(win_rates(comparisons(rows), n_boot=2000, seed=0))
    assert row["win_rate"] == pytest.approx(40 / 58)
    user_width = row["win_rate_high"] - row["win_rate_low"]

    wins = np.array([o == 1 for _, o in rows], dtype=float)  # every comparison its own cluster
    counts = bootstrap_counts(len(rows), 2000, np.random.default_rng(0))
    low, high = ratio_interval(counts, wins, np.ones(len(rows)), 0.95)
    assert user_width > 2 * (high - low)


def test_two_opposite_users_span_the_whole_interval():
    """Users {A, B}: resamples AA, AB, BB give 1, 0.5, 0 with probabilities 1/4, 1/2, 1/4."""
    row = only_row(win_rates(comparisons([(0, 1)] * 30 + [(1, 0)] * 30), n_boot=2000, seed=1))
    assert (row["win_rate"], row["win_rate_low"], row["win_rate_high"]) == (0.5, 0.0, 1.0)


def test_reward_gain_is_the_mean_gain_in_std_units():
    rows = [(1, 1, 2.0, 1.0, 2.0), (1, 0, 1.0, 1.0, 2.0), (2, -1, 3.0, 0.0, 1.0)]  # gains 0.5, 0, 3
    row = only_row(win_rates(comparisons(rows), n_boot=100))
    assert row["reward_gain"] == pytest.approx(3.5 / 3)
    assert row["reward_gain_low"] <= row["reward_gain"] <= row["reward_gain_high"]
    users = per_user(comparisons(rows)).to_pylist()
    assert [u["reward_gain"] for u in users] == pytest.approx([0.25, 3.0])


def test_a_constant_gain_has_a_degenerate_interval():
    rows = [(u, 1, 1.0 + u, 0.5 + u, 0.5) for u in range(4)]  # every gain exactly 1
    row = only_row(win_rates(comparisons(rows), n_boot=100))
    assert row["reward_gain"] == row["reward_gain_low"] == row["reward_gain_high"] == 1.0


def test_missing_rewards_drop_out_of_the_gain_only():
    rows = [(0, 1, 1.0, 0.0, 1.0), (1, 1, float("nan"), 0.0, 1.0)]
    row = only_row(win_rates(comparisons(rows), n_boot=20))
    assert row["reward_gain"] == 1.0
    assert (row["n"], row["wins"]) == (2, 2)


def test_groups_models_and_baselines_are_separate_rows_in_key_order():
    table = pa.concat_tables(
        [
            comparisons([(0, 1), (1, 1)], group="unseen", baseline="dpo"),
            comparisons([(0, 0), (1, 0)], group="seen", baseline="base"),
            comparisons([(0, 1), (1, 0)], group="seen", baseline="dpo"),
        ]
    )
    rows = win_rates(table, n_boot=20).to_pylist()
    assert [(r["group"], r["baseline"], r["win_rate"]) for r in rows] == [
        ("seen", "base", 0.0),
        ("seen", "dpo", 0.5),
        ("unseen", "dpo", 1.0),
    ]


def test_intervals_are_deterministic_for_a_seed_and_row_order_free():
    rng = np.random.default_rng(3)
    rows = [(int(u), int(o)) for u, o in zip(rng.integers(0, 8, 60), rng.integers(-1, 2, 60), strict=True)]
    table = comparisons(rows)
    first = win_rates(table, n_boot=300, seed=5)
    assert first.equals(win_rates(table, n_boot=300, seed=5))
    shuffled = table.take(rng.permutation(table.num_rows))
    assert first.equals(win_rates(shuffled, n_boot=300, seed=5))
    others = [only_row(win_rates(table, n_boot=300, seed=s))["win_rate_low"] for s in range(6, 10)]
    assert any(low != only_row(first)["win_rate_low"] for low in others)


def test_per_user_breakdown():
    table = comparisons([(3, 1), (3, -1), (3, 0), (3, 1), (1, 0)])
    out = per_user(table)
    assert out.schema == USER_WIN_RATES
    rows = out.to_pylist()
    assert [(r["user_id"], r["n"], r["n_consistent"], r["wins"]) for r in rows] == [
        (1, 1, 1, 0),
        (3, 4, 3, 2),
    ]
    assert rows[1]["win_rate"] == pytest.approx(2 / 3)
    assert rows[1]["inconsistency_rate"] == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda t: t.drop_columns(["reward_std"]), SchemaError),
        (lambda t: t.set_column(6, "outcome", pa.array([2], pa.int8())), InputError),
        (lambda t: t.set_column(9, "reward_std", pa.array([0.0])), InputError),
    ],
)
def test_bad_tables_are_refused(change, error):
    with pytest.raises(error):
        win_rates(change(comparisons([(0, 1)])), n_boot=10)


def test_an_empty_table_gives_an_empty_result():
    assert win_rates(comparisons([]), n_boot=10).num_rows == 0


# -------------------------------------------------------------------------------- monotonicity


@pytest.mark.parametrize(
    ("values", "tolerance", "rho", "monotone"),
    [
        ([0.0, 0.1, 0.3, 0.6, 1.0], 0.0, 1.0, True),  # increasing
        ([1.0, 0.6, 0.3, 0.1, 0.0], 0.0, -1.0, False),  # decreasing
        ([0.0, 0.3, 0.25, 0.6, 0.9], 0.0, 0.9, False),  # noisy: one drop of 0.05
        ([0.0, 0.3, 0.25, 0.6, 0.9], 0.1, 0.9, True),  # ... within the tolerance
        ([0.0, 0.2, 0.2, 0.5, 0.5], 0.0, 0.9486833, True),  # plateaus are non-decreasing
    ],
)
def test_monotonicity(values, tolerance, rho, monotone):
    out = monotonicity([0.0, 0.25, 0.5, 0.75, 1.0], values, tolerance=tolerance)
    assert out["spearman"] == pytest.approx(rho)
    assert out["monotone"] is monotone
    assert out["n"] == 5


def test_monotonicity_sorts_by_alpha_and_reports_the_largest_drop():
    out = monotonicity([1.0, 0.0, 0.5], [0.4, 0.0, 0.5])
    assert out["max_drop"] == pytest.approx(0.1)
    assert out["monotone"] is False


def test_a_constant_reward_has_no_rank_correlation():
    out = monotonicity([0.0, 0.5, 1.0], [2.0, 2.0, 2.0])
    assert math.isnan(out["spearman"]) and out["monotone"] is True


def test_spearman_averages_tied_ranks():
    assert spearman([1, 2, 3, 4], [1, 1, 2, 2]) == pytest.approx(4 / np.sqrt(20))


def test_monotonicity_refuses_mismatched_inputs():
    with pytest.raises(InputError):
        monotonicity([0.0, 1.0], [1.0])


def test_monotonicity_within_noise_forgives_a_small_reversal_but_not_a_real_one():
    rng = np.random.default_rng(0)
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    prompt_effect = rng.normal(0, 1.0, 8)  # shared by every alpha: the pairing removes it
    noise = rng.normal(0, 0.1, (5, 8))
    noise -= noise.mean(axis=1, keepdims=True)  # so each alpha's mean is exactly the designed value
    rising = np.array([0.0, 1.0, 0.99, 2.0, 3.0])[:, None] + prompt_effect + noise  # one step back by 0.01
    out = monotonicity(alphas, rising.mean(1), samples=rising)
    assert out["monotone"] is False  # strictly, the 0.01 step back fails
    assert out["monotone_within_noise"] is True and out["max_drop_z"] <= 2 and out["rise_z"] > 2

    reversal = np.array([0.0, 1.0, 0.5, 2.0, 3.0])[:, None] + prompt_effect + noise  # 0.5 back: 5 noise sd
    out = monotonicity(alphas, reversal.mean(1), samples=reversal)
    assert out["monotone_within_noise"] is False and out["max_drop_z"] > 2

    flat = np.zeros((5, 1)) + prompt_effect + noise  # no effect at all: not monotone, however smooth
    out = monotonicity(alphas, flat.mean(1), samples=flat)
    assert out["monotone_within_noise"] is False and abs(out["rise_z"]) < 3


def test_monotonicity_samples_must_pair_with_the_alphas():
    with pytest.raises(InputError):
        monotonicity([0.0, 1.0], [0.0, 1.0], samples=np.zeros((3, 4)))
    out = monotonicity([0.0, 1.0], [0.0, 1.0], samples=np.array([[0.0, 0.0], [1.0, 1.0]]))
    assert out["monotone_within_noise"] is True  # identical samples: an exact rise, zero noise


def test_tables_with_undefined_statistics_compare_equal_to_their_recomputation():
    """A judge with only inconsistent comparisons has an undefined (NaN) win rate: the same comparisons give
    the same table, NaN cells in the same places, for the output comparison of the fault benchmark (pyarrow's
    ``Table.equals`` takes NaN as unequal to itself); a changed or moved value still differs."""
    from benchmarks.bench_faults import tables_equal

    table = comparisons([(0, -1), (1, -1), (2, -1)])
    first = win_rates(table, n_boot=20)
    assert math.isnan(only_row(first)["win_rate"]) and not first.equals(first)
    assert tables_equal(first, win_rates(table, n_boot=20))
    other = win_rates(comparisons([(0, -1), (1, -1), (2, 1)]), n_boot=20)  # now 1/1 consistent wins
    assert not tables_equal(first, other)
    nulled = first.set_column(
        first.schema.get_field_index("win_rate"), "win_rate", pa.array([None], pa.float64())
    )
    assert not tables_equal(first, nulled)  # NaN (undefined) is not null (missing)
    assert not tables_equal(first, first.rename_columns([*first.column_names[:-1], "renamed"]))
