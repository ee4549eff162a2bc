"""The user-identification probe: splits, features, top-k arithmetic, the MLP and nearest centroid, and
the seen/unseen discipline of the archetype tasks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ppd_core.config import ProbeConfig
from ppd_core.embed.probe import (
    ProbeMLP,
    features,
    nearest_centroid,
    predict,
    preference_read,
    run_probe,
    split_sets,
    topk_accuracy,
    train_probe,
)
from ppd_core.errors import StageError

CFG = ProbeConfig(hidden=64, blocks=2, epochs=30)


def clustered(users: int, sets: int, dim: int, spread: float, seed: int = 0):
    """Each user a Gaussian cluster: (users*sets, dim) embeddings, user ids, set indices."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(users, dim))
    user_ids = np.repeat(np.arange(100, 100 + users), sets)
    set_index = np.tile(np.arange(sets), users)
    emb = centres[user_ids - 100] + spread * rng.normal(size=(users * sets, dim))
    return emb.astype(np.float32), user_ids, set_index


def row(rows: list[dict], task: str, method: str, k: int = 1) -> dict:
    (match,) = [r for r in rows if r["task"] == task and r["method"] == method and r["k"] == k]
    return match


# ------------------------------------------------------------------------------------ pieces


def test_probe_mlp_layout():
    model = ProbeMLP(in_dim=10, hidden=16, blocks=3, dropout=0.1, num_classes=7)
    assert model(torch.zeros(5, 10)).shape == (5, 7)
    assert len(model.blocks) == 3
    kinds = [type(m).__name__ for m in model.blocks[0].body]
    assert kinds == ["Linear", "GELU", "LayerNorm", "Dropout"]


def test_residual_blocks_add_to_their_input():
    model = ProbeMLP(in_dim=4, hidden=8, blocks=2, dropout=0.0, num_classes=3).eval()
    for block in model.blocks:
        torch.nn.init.zeros_(block.body[2].weight)  # LayerNorm scale 0, bias 0: the body adds nothing
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), model.head(model.stem(x)))


def test_features_standardise_with_train_rows_only():
    rng = np.random.default_rng(0)
    emb = rng.normal(3.0, 2.0, size=(40, 2, 3))
    train = np.arange(40) < 30
    x = features(emb, train)
    assert x.shape == (40, 6) and x.dtype == np.float32
    np.testing.assert_allclose(x[train].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(x[train].std(axis=0), 1, atol=1e-5)
    emb[~train] += 100.0  # test rows never move the statistics
    np.testing.assert_allclose(features(emb, train)[train], x[train], atol=1e-6)


def test_features_leave_constant_dimensions_at_zero():
    emb = np.ones((5, 3))
    emb[:, 0] = np.arange(5)
    x = features(emb)
    assert np.all(np.isfinite(x)) and np.all(x[:, 1:] == 0)


@pytest.mark.parametrize(
    ("user_ids", "set_index", "test_sets", "expected_test"),
    [
        ([1, 1, 1, 2, 2], [0, 1, 2, 0, 1], 1, [0, 0, 1, 0, 1]),
        ([1, 1, 1, 2, 2], [2, 0, 1, 1, 0], 1, [1, 0, 0, 1, 0]),  # by set index, not by row order
        ([1, 2, 2], [0, 0, 1], 1, [0, 0, 1]),  # a single-set user only trains
        ([1, 1, 1, 2, 2], [0, 1, 2, 0, 1], 2, [0, 1, 1, 0, 0]),  # needs test_sets + 1 sets
        ([5, 3, 5, 3], [7, 9, 8, 4], 1, [0, 1, 1, 0]),
    ],
)
def test_split_sets(user_ids, set_index, test_sets, expected_test):
    test = split_sets(np.array(user_ids), np.array(set_index), test_sets)
    assert test.tolist() == [bool(t) for t in expected_test]


def test_split_sets_never_puts_a_test_set_in_train():
    rng = np.random.default_rng(1)
    user_ids = rng.integers(0, 30, size=300)
    set_index = rng.permutation(300)
    test = split_sets(user_ids, set_index, 2)
    for user in np.unique(user_ids):
        mine = user_ids == user
        if mine.sum() >= 3:
            assert test[mine].sum() == 2
            assert set_index[mine & test].min() > set_index[mine & ~test].max()
        else:
            assert not test[mine].any()


def test_topk_accuracy_on_hand_made_logits():
    logits = np.array(
        [
            [0.9, 0.1, 0.0, 0.0],  # true 0: rank 0
            [0.1, 0.2, 0.9, 0.3],  # true 1: rank 2
            [0.4, 0.3, 0.2, 0.1],  # true 3: rank 3
            [0.0, 0.0, 0.0, 1.0],  # true 3: rank 0
        ]
    )
    y = np.array([0, 1, 3, 3])
    assert topk_accuracy(logits, y, (1, 2, 3, 4, 16)) == {1: 0.5, 2: 0.5, 3: 0.75, 4: 1.0, 16: 1.0}


def test_nearest_centroid_scores_cosine_to_class_means():
    x_train = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    y_train = np.array([0, 0, 2])
    scores = nearest_centroid(x_train, y_train, np.array([[1.0, 1.0], [5.0, 0.1]]), num_classes=3)
    np.testing.assert_allclose(scores[:, [0, 2]], [[2**-0.5, 2**-0.5], [0.99980, 0.019996]], atol=1e-4)
    assert np.all(scores[:, 1] == -np.inf)  # class 1 has no training rows
    assert topk_accuracy(scores, np.array([2, 0]), (1,)) == {1: 0.5}


def test_train_probe_is_deterministic_for_a_seed():
    emb, user_ids, _ = clustered(users=5, sets=8, dim=6, spread=0.5)
    x, y = features(emb), user_ids - 100
    threads, rng_state = torch.get_num_threads(), torch.get_rng_state()
    a = predict(train_probe(x, y, CFG), x)
    assert torch.get_num_threads() == threads  # the one-thread training restores the setting
    assert torch.equal(torch.get_rng_state(), rng_state)  # and leaves the caller's RNG alone
    b = predict(train_probe(x, y, CFG), x)
    c = predict(train_probe(x, y, CFG.model_copy(update={"seed": 1})), x)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


# ------------------------------------------------------------------------------------ run_probe


def test_probe_identifies_clustered_users():
    emb, user_ids, set_index = clustered(users=20, sets=6, dim=16, spread=0.5)
    rows = run_probe(emb, user_ids, set_index, CFG)
    chance = row(rows, "user_id", "chance")
    assert chance["accuracy"] == pytest.approx(1 / 20) and chance["n_classes"] == 20
    assert row(rows, "user_id", "chance", 4)["accuracy"] == pytest.approx(4 / 20)
    assert row(rows, "user_id", "mlp")["accuracy"] >= 0.8
    assert row(rows, "user_id", "nearest_centroid")["accuracy"] >= 0.9
    assert all(r["n_test"] == 20 for r in rows)
    assert {(r["method"], r["k"]) for r in rows} == {
        (m, k) for m in ("mlp", "nearest_centroid", "chance") for k in CFG.topk
    }


def test_probe_stays_near_chance_on_noise():
    rng = np.random.default_rng(3)
    _, user_ids, set_index = clustered(users=40, sets=6, dim=16, spread=1.0)
    emb = rng.normal(size=(len(user_ids), 16))
    rows = run_probe(emb, user_ids, set_index, CFG.model_copy(update={"test_sets_per_user": 2}))
    chance = row(rows, "user_id", "chance")["accuracy"]
    assert row(rows, "user_id", "mlp")["n_test"] == 80
    for method in ("mlp", "nearest_centroid"):
        assert row(rows, "user_id", method)["accuracy"] < 3 * chance


def test_probe_needs_a_user_with_held_out_sets():
    with pytest.raises(StageError, match="test_sets_per_user"):
        run_probe(np.zeros((3, 2)), np.array([1, 2, 3]), np.zeros(3), CFG)


def archetype_world(seed: int = 0):
    """Seen users: archetype 0 around e1, archetype 1 around e2. Unseen users (archetype 1) live around
    e3 + 0.3 e1: seen-only centroids call them archetype 0; centroids that saw them would not."""
    rng = np.random.default_rng(seed)
    seen_users, unseen_users, sets = 8, 4, 5
    users = np.arange(seen_users + unseen_users)
    arch = {int(u): int(u % 2) if u < seen_users else 1 for u in users}
    user_ids = np.repeat(users, sets)
    set_index = np.tile(np.arange(sets), len(users))
    unseen = user_ids >= seen_users
    e = np.eye(3)
    centre = np.where(unseen[:, None], e[2] + 0.3 * e[0], np.where((user_ids % 2 == 0)[:, None], e[0], e[1]))
    emb = centre + 0.05 * rng.normal(size=(len(user_ids), 3))
    return emb, user_ids, set_index, arch, unseen


def test_archetype_unseen_centroids_come_from_seen_users_only():
    emb, user_ids, set_index, arch, unseen = archetype_world()
    rows = run_probe(emb, user_ids, set_index, CFG, archetypes=arch, unseen_mask=unseen)
    assert row(rows, "archetype_unseen", "nearest_centroid") | {"accuracy": None} == {
        "task": "archetype_unseen",
        "method": "nearest_centroid",
        "k": 1,
        "accuracy": None,
        "n_test": 20,
        "n_classes": 2,
    }
    assert row(rows, "archetype_unseen", "nearest_centroid")["accuracy"] == 0.0
    assert row(rows, "archetype_unseen", "chance")["accuracy"] == 0.5
    assert row(rows, "archetype_seen_heldout", "nearest_centroid")["accuracy"] == 1.0
    assert row(rows, "archetype_seen_heldout", "nearest_centroid")["n_test"] == 8
    # the user task knows only the seen users
    assert row(rows, "user_id", "chance")["n_classes"] == 8


def test_unseen_sets_never_touch_the_seen_results():
    emb, user_ids, set_index, arch, unseen = archetype_world()
    rows = run_probe(emb, user_ids, set_index, CFG, archetypes=arch, unseen_mask=unseen)
    moved = emb.copy()
    moved[unseen] = 1000.0 * moved[unseen] - 50.0
    rows_moved = run_probe(moved, user_ids, set_index, CFG, archetypes=arch, unseen_mask=unseen)
    keep = [r for r in rows if r["task"] != "archetype_unseen"]
    assert keep == [r for r in rows_moved if r["task"] != "archetype_unseen"]


def test_no_unseen_sets_means_no_unseen_rows():
    emb, user_ids, set_index, arch, _ = archetype_world()
    rows = run_probe(emb, user_ids, set_index, CFG, archetypes=arch)
    assert {r["task"] for r in rows} == {"user_id", "archetype_seen_heldout"}
    assert row(rows, "user_id", "chance")["n_classes"] == 12


# ------------------------------------------------------------------------------ preference read


def preference_world(users: int = 40, unseen_users: int = 20, sets: int = 4, seed: int = 0):
    """Unit true vectors in 5-D; each set's embedding a fixed random linear map (5 -> 12) of its user's
    vector plus noise. Returns embeddings, user ids, set indices, unseen mask, {user: vector}, the map."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(size=(users + unseen_users, 5))
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    mixing = rng.normal(size=(5, 12))
    user_ids = np.repeat(np.arange(users + unseen_users), sets)
    emb = truth[user_ids] @ mixing + 0.1 * rng.normal(size=(len(user_ids), 12))
    unseen = user_ids >= users
    return emb, user_ids, np.tile(np.arange(sets), users + unseen_users), unseen, dict(enumerate(truth))


def test_preference_read_recovers_a_linear_map_of_the_truth_for_new_users():
    emb, user_ids, _, unseen, prefs = preference_world()
    truth = np.stack([prefs[int(u)] for u in user_ids])
    cosine, penalty = preference_read(features(emb, ~unseen), truth, user_ids, ~unseen, unseen)
    assert cosine > 0.95 and penalty in (0.1, 1.0, 10.0)
    noise = np.random.default_rng(1).normal(size=emb.shape)
    cosine_noise, penalty_noise = preference_read(features(noise, ~unseen), truth, user_ids, ~unseen, unseen)
    assert abs(cosine_noise) < 0.4 and penalty_noise >= 100.0  # cross-validation shrinks a useless read


def test_preference_row_reads_from_seen_users_only_and_skips_users_without_a_vector():
    emb, user_ids, set_index, unseen, prefs = preference_world()
    del prefs[max(prefs)]  # an unseen user without a true vector (a reward user) takes no part
    rows = run_probe(emb, user_ids, set_index, CFG, unseen_mask=unseen, preferences=prefs)
    read = row(rows, "preference_unseen", "ridge")
    assert read["n_test"] == 19 * 4 and read["n_classes"] == 0 and read["accuracy"] > 0.95
    # the read never learns from unseen users: their vectors can be anything without changing it
    scrambled = {u: (-v if unseen[list(user_ids).index(u)] else v) for u, v in prefs.items()}
    flipped = row(
        run_probe(emb, user_ids, set_index, CFG, unseen_mask=unseen, preferences=scrambled),
        "preference_unseen",
        "ridge",
    )
    assert flipped["accuracy"] == pytest.approx(-read["accuracy"])
    assert "preference_unseen" not in {
        r["task"] for r in run_probe(emb, user_ids, set_index, CFG, unseen_mask=unseen)
    }
