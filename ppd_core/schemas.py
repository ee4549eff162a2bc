"""Arrow schemas of every table the pipeline reads or writes.

``PICKAPIC_V2`` is the exact schema of the Pick-a-Pic v2 Parquet files (19 columns, in file order);
the metadata-only twin (``pickapic_v2_no_images``) is the same minus ``jpg_0``/``jpg_1``.
"""

from __future__ import annotations

import pyarrow as pa

PICKAPIC_V2 = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
PICKAPIC_V2_METADATA = pa.schema([f for f in PICKAPIC_V2 if f.name not in IMAGE_COLUMNS])
# Columns a reader may do without (a pandas-free writer drops the leftover index).
OPTIONAL_COLUMNS = ("__index_level_0__",)

# ingest: one row per kept comparison, oriented winner/loser; hive-partitioned by created_date.
PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),  # stable content id of the comparison
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
        ("winner_model", pa.string()),
        ("loser_model", pa.string()),
        ("num_example_per_prompt", pa.int64()),
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
    ]
)
PAIRS_PARTITION = "created_date"  # YYYY-MM-DD, the hive partition key of `pairs/`

QUARANTINE = pa.schema(
    [
        ("source_file", pa.string()),
        ("source_row", pa.int64()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# ingest: where each image lives inside the webdataset shards (random access by uid).
IMAGE_INDEX = pa.schema(
    [
        ("image_uid", pa.string()),
        ("shard", pa.string()),  # file name under images/
        ("offset", pa.int64()),  # byte offset of the image member's data inside the tar
        ("nbytes", pa.int64()),
        ("format", pa.string()),  # PIL format name
        ("width", pa.int32()),
        ("height", pa.int32()),
    ]
)

# relabel: one row per reward user (the multi-reward experiment); its pairs/ table is PAIRS
REWARD_USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("reward", pa.string()),  # the evaluate.rewards entry whose scores label this user's pairs
        ("rows", pa.int64()),  # relabelled pairs written
        ("ties", pa.int64()),  # sampled pairs dropped because both images scored exactly the same
    ]
)

# fewshot outputs
SHOT_SETS = pa.schema(
    [
        ("shot_set_id", pa.string()),  # content hash of the ordered pair ids
        ("user_id", pa.int64()),
        ("split", pa.string()),  # "seen" | "unseen"
        ("set_index", pa.int32()),
        ("pair_ids", pa.list_(pa.string())),
        ("captions", pa.list_(pa.string())),
        ("winner_uids", pa.list_(pa.string())),
        ("loser_uids", pa.list_(pa.string())),
    ]
)
TRAIN_PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("user_id", pa.int64()),
        ("caption", pa.string()),
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
        ("shot_set_id", pa.string()),  # the shot set that conditions this pair; never one containing it
    ]
)
EVAL_PAIRS = pa.schema(
    [
        ("pair_id", pa.string()),
        ("user_id", pa.int64()),
        ("split", pa.string()),
        ("caption", pa.string()),
        ("winner_uid", pa.string()),
        ("loser_uid", pa.string()),
    ]
)
FEWSHOT_USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("split", pa.string()),  # "seen" | "unseen" | "excluded"
        ("reason", pa.string()),  # why excluded, else ""
        ("num_pairs", pa.int64()),
        ("num_shot_sets", pa.int64()),
        ("num_train_pairs", pa.int64()),
        ("num_eval_pairs", pa.int64()),
    ]
)

# synthesize: ground truth of the synthetic world
WORLD_USERS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("archetype", pa.int32()),
        ("weights", pa.list_(pa.float32())),  # preference weights over ATTRIBUTES, unit norm
    ]
)

# probe: one row per (embedder, task, method, k)
PROBE = pa.schema(
    [
        ("embedder", pa.string()),
        ("kind", pa.string()),
        ("task", pa.string()),
        ("method", pa.string()),
        ("k", pa.int32()),
        ("accuracy", pa.float64()),
        ("n_test", pa.int64()),
        ("n_classes", pa.int64()),
    ]
)


# embed: ``<embed_dir>/<embedder>/shard-*.parquet`` has a width that depends on the embedder, so its
# schema is built by ppd_core.embed.extract.shard_schema (fixed-size list<float32> "embedding" with
# "embedding_shape", "embedding_dtype" and "embedder_identity" in the schema metadata).

# evaluate: one row per judged comparison of a model against a baseline on the same user, prompt and
# seed (one judge per table). reward_* is the primary reward (e.g. the user's oracle reward);
# reward_std its population std for this row's user (a global std repeats one value), so that
# (reward_model - reward_baseline) / reward_std is the reward gain in reward-std units.
COMPARISONS = pa.schema(
    [
        ("user_id", pa.int64()),
        ("group", pa.string()),  # "seen" | "unseen"
        ("model", pa.string()),
        ("baseline", pa.string()),
        ("prompt", pa.string()),
        ("seed", pa.int64()),
        ("outcome", pa.int8()),  # 1 model wins, 0 baseline wins, -1 inconsistent / undecided
        ("reward_model", pa.float64()),
        ("reward_baseline", pa.float64()),
        ("reward_std", pa.float64()),
    ]
)
# evaluate: one row per (group, model, baseline); intervals are percentile cluster-bootstrap
# intervals resampling users.
WIN_RATES = pa.schema(
    [
        ("group", pa.string()),
        ("model", pa.string()),
        ("baseline", pa.string()),
        ("n", pa.int64()),  # comparisons
        ("n_users", pa.int64()),
        ("n_consistent", pa.int64()),
        ("wins", pa.int64()),
        ("win_rate", pa.float64()),  # wins / n_consistent
        ("win_rate_low", pa.float64()),
        ("win_rate_high", pa.float64()),
        ("inconsistency_rate", pa.float64()),  # 1 - n_consistent / n
        ("reward_gain", pa.float64()),  # mean (reward_model - reward_baseline) / reward_std
        ("reward_gain_low", pa.float64()),
        ("reward_gain_high", pa.float64()),
        ("confidence", pa.float64()),
        ("n_boot", pa.int64()),
    ]
)
# evaluate: the same statistics per (group, model, baseline, user), without intervals.
USER_WIN_RATES = pa.schema(
    [
        ("group", pa.string()),
        ("model", pa.string()),
        ("baseline", pa.string()),
        ("user_id", pa.int64()),
        ("n", pa.int64()),
        ("n_consistent", pa.int64()),
        ("wins", pa.int64()),
        ("win_rate", pa.float64()),
        ("inconsistency_rate", pa.float64()),
        ("reward_gain", pa.float64()),
    ]
)
# evaluate: the interpolation study between reward users (ppd_core.evaluate.interpolate)
INTERPOLATION = pa.schema(
    [
        ("model", pa.string()),
        ("user_a", pa.string()),  # reward user A (its reward's name)
        ("user_b", pa.string()),
        ("alpha", pa.float64()),  # weight of A
        ("reward", pa.string()),
        ("mean", pa.float64()),
        ("std", pa.float64()),
        ("n", pa.int64()),
    ]
)
MONOTONICITY = pa.schema(
    [
        ("model", pa.string()),
        ("user_a", pa.string()),
        ("user_b", pa.string()),
        ("reward", pa.string()),
        ("direction", pa.string()),  # "rises with a" (reward A) | "falls with a" (reward B)
        ("spearman", pa.float64()),  # signed so that +1 is the expected direction
        ("max_step_against", pa.float64()),
        ("monotone", pa.bool_()),  # strict: no step against the expected direction at all
        ("rise_z", pa.float64()),  # end-to-end change in its paired standard errors (same prompts and seeds)
        ("max_step_against_z", pa.float64()),  # largest step against, in its paired standard errors
        ("monotone_within_noise", pa.bool_()),  # rise_z > 2 and max_step_against_z <= 2
    ]
)
