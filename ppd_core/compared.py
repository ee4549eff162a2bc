"""The one table of compared models: each model's train stage, the trainer (objective) that makes it, and
the embedder whose vectors condition it. Training, evaluation and ``ppd generate`` all read it.

- ``base``: the backbone with the user branch off;
- ``ppd``: the adapter trained with user-conditioned Diffusion-DPO on the default embedder (the product);
- ``ppd_true`` / ``ppd_shots``: the same trainer on a ceiling embedder (by default the world's true preference
  vector, and the true attribute differences of the same K shots: the K-shot ceiling);
- ``dpo`` / ``sft``: the same adapter trained on one constant embedding (population DPO and supervised
  fine-tuning on the preferred images), so they ignore the user.
"""

from __future__ import annotations

from dataclasses import dataclass

from ppd_core.config import PPDConfig


@dataclass(frozen=True)
class ComparedModel:
    name: str
    train_stage: str | None  # None: nothing is trained (base)
    trainer: str | None  # the objective: "ppd", "dpo" or "sft"
    embedder_key: str | None  # dotted config key naming the conditioning embedder; None: ignores the user

    @property
    def ceiling(self) -> bool:
        """A ceiling model: trained on a reference embedder named in the train section."""
        return self.embedder_key is not None and self.embedder_key.startswith("train.")

    def embedder(self, cfg: PPDConfig) -> str | None:
        """The embedder whose vectors condition this model under ``cfg`` (None: it ignores the user)."""
        if self.embedder_key is None:
            return None
        section, name = self.embedder_key.split(".")
        return getattr(getattr(cfg, section), name)


COMPARED: dict[str, ComparedModel] = {
    m.name: m
    for m in (
        ComparedModel("base", None, None, None),
        ComparedModel("ppd", "train_ppd", "ppd", "embed.default"),
        ComparedModel("ppd_true", "train_ppd_true", "ppd", "train.ceiling_embedder"),
        ComparedModel("ppd_shots", "train_ppd_shots", "ppd", "train.shots_ceiling_embedder"),
        ComparedModel("dpo", "train_dpo", "dpo", None),
        ComparedModel("sft", "train_sft", "sft", None),
    )
}
MODELS: tuple[str, ...] = tuple(COMPARED)
# train stage -> model, in pipeline order: the product and its population baselines, then the ceilings
TRAINED: dict[str, ComparedModel] = {
    m.train_stage: m for m in sorted(COMPARED.values(), key=lambda m: m.ceiling) if m.train_stage
}
