"""Reward models: the scorers (:mod:`ppd_core.rewards.scorers`: the world's oracle, PickScore, HPS, aesthetic,
CLIP score, ImageReward) and the `relabel` stage that uses them to relabel pairs
(:mod:`ppd_core.rewards.relabel`). Used by relabel and by evaluate; depends only on data and embed."""
