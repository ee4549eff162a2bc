"""What a trainer optimises: an objective is its conditioning (the user's shot-set embedding, or one constant
embedding for the population baselines) and its loss on a batch of pairs. The trainers of the compared-models
table (:mod:`ppd_core.compared`) are these objects; nothing else in training branches on a trainer's name.

- ``ppd``: Diffusion-DPO with the user branch reading each pair's conditioning shot set (the product);
- ``dpo``: the same loss on one constant (zero) embedding: population Diffusion-DPO;
- ``sft``: supervised fine-tuning on the preferred images only, on the constant embedding.

Every objective is scored on held-out pairs by the DPO implicit accuracy with its own conditioning, so the
three are compared on one figure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ppd_core.models.adapter import embedding_dropout
from ppd_core.train.losses import diffusion_dpo_loss, per_sample_mse, sft_loss


def draw(backbone, x0: torch.Tensor, pairs: int, generator: torch.Generator, dropout: float):
    """One noise draw and one timestep per pair, shared by its two images, then the null-user mask (P,):
    (x_t, t, target) for (2P, ...) and the mask, drawn in that order from ``generator``. Every objective
    draws the same, so runs trained together in one process (:mod:`ppd_core.train.worker`) share one draw."""
    noise = torch.randn((pairs, *x0.shape[1:]), generator=generator, device=x0.device).repeat(2, 1, 1, 1)
    t = backbone.sample_timesteps(pairs, generator=generator)
    t = t.repeat(2) if t.ndim == 1 else t.repeat(2, *([1] * (t.ndim - 1)))
    null = embedding_dropout(pairs, dropout, generator=generator).to(x0.device)
    return backbone.add_noise(x0, noise, t), t, backbone.target(x0, noise, t), null


def reference_mse(backbone, drawn, text: torch.Tensor) -> torch.Tensor:
    """The frozen reference's per-sample error on a draw: the same network with the user branch off."""
    x_t, t, target, _ = drawn
    with torch.no_grad():
        return per_sample_mse(backbone.denoise(x_t, t, text), target)


@dataclass(frozen=True)
class Objective:
    """A trainer: ``conditioned`` says whether it reads the user's embedding; :meth:`loss` is its loss."""

    name: str
    conditioned: bool

    needs_reference = False

    def loss(
        self, backbone, adapter, x0, text, emb, beta, generator, dropout, scale
    ) -> tuple[torch.Tensor, dict]:
        """One forward on P pairs (``x0``, ``text``: (2P, ...) as [winners | losers]; ``emb``: (P, ...));
        returns (loss, metrics). ``dropout``: the null-user rate; ``scale``: the adapter scale."""
        drawn = draw(backbone, x0, emb.shape[0], generator, dropout)
        ref = reference_mse(backbone, drawn, text) if self.needs_reference else None
        return self.loss_on(backbone, adapter, drawn, text, emb, beta, scale, ref)

    def loss_on(self, backbone, adapter, drawn, text, emb, beta, scale, ref_mse) -> tuple[torch.Tensor, dict]:
        """:meth:`loss` given the draw (:func:`draw`) and, when ``needs_reference``, the reference error
        (:func:`reference_mse`), so that several runs on one batch compute both once."""
        raise NotImplementedError

    def heldout(self, backbone, adapter, x0, text, emb, beta, generator, scale) -> dict:
        """Metrics on held-out pairs: the DPO implicit accuracy, with this objective's conditioning."""
        return DiffusionDPO(self.name, self.conditioned).loss(
            backbone, adapter, x0, text, emb, beta, generator, 0.0, scale
        )[1]


@dataclass(frozen=True)
class DiffusionDPO(Objective):
    """Diffusion-DPO against the same network with the user branch off (ppd_core.train.losses)."""

    needs_reference = True

    def loss_on(self, backbone, adapter, drawn, text, emb, beta, scale, ref_mse):
        x_t, t, target, null = drawn
        tokens, user_scale = adapter.condition(emb.repeat(2, *([1] * (emb.ndim - 1))), scale, null.repeat(2))
        model_mse = per_sample_mse(backbone.denoise(x_t, t, text, tokens, user_scale), target)
        out = diffusion_dpo_loss(model_mse, ref_mse, beta)
        return out.loss, out.metrics()


@dataclass(frozen=True)
class SupervisedFT(Objective):
    """The denoising loss on the preferred images only."""

    def loss_on(self, backbone, adapter, drawn, text, emb, beta, scale, ref_mse):
        p = emb.shape[0]
        x_t, t, target, null = drawn
        tokens, user_scale = adapter.condition(emb, scale, null)
        pred = backbone.denoise(x_t[:p], t[:p], text[:p], tokens, user_scale)
        loss = sft_loss(per_sample_mse(pred, target[:p]))
        return loss, {"loss": float(loss.detach())}


OBJECTIVES: dict[str, Objective] = {
    o.name: o for o in (DiffusionDPO("ppd", True), DiffusionDPO("dpo", False), SupervisedFT("sft", False))
}
