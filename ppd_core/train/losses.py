"""Diffusion-DPO and SFT losses (Wallace et al., arXiv 2311.12908; the Diffusion-DPO conventions).

Conventions, named once here:
- A batch of P pairs is 2P samples ordered ``[w_1..w_P, l_1..l_P]``; each pair shares one noise tensor
  and one timestep (the caller draws them).
- Per-sample error is the squared error **averaged** over (C, H, W) for the policy and, under no-grad,
  for the reference (the same network with the user branch off).
- **beta_dpo uses the folded convention**: ``inside = -beta_dpo * ((mse_w - mse_l) - (ref_w - ref_l))``,
  i.e. diffusers' SD1.5 form, equal to 0.5 x Salesforce's beta (Salesforce 5000 == our 2500).
- loss = mean over pairs of ``-logsigmoid(inside)`` (never ``-logsigmoid(mean(inside))``, the known bug).
- **implicit accuracy** = fraction of pairs with inside > 0 plus half the fraction with inside == 0
  (diffusers' definition): exactly 0.5 when policy == reference, so "above 0.5" means learning.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) x2 -> (B,) squared error averaged over every non-batch dimension, in float32."""
    return (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)


@dataclass
class DPOOutput:
    loss: torch.Tensor  # scalar
    inside: torch.Tensor  # (P,) the logit whose sigmoid is the pair's preference probability
    implicit_acc: torch.Tensor  # scalar
    model_diff: torch.Tensor  # (P,) mse_w - mse_l of the policy
    ref_diff: torch.Tensor  # (P,) mse_w - mse_l of the reference

    def metrics(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "implicit_acc": float(self.implicit_acc),
            "model_diff": float(self.model_diff.detach().mean()),
            "ref_diff": float(self.ref_diff.mean()),
            "inside_mean": float(self.inside.detach().mean()),
        }


def implicit_accuracy(inside: torch.Tensor) -> torch.Tensor:
    inside = inside.detach()
    return (inside > 0).float().mean() + 0.5 * (inside == 0).float().mean()


def diffusion_dpo_loss(model_mse: torch.Tensor, ref_mse: torch.Tensor, beta_dpo: float) -> DPOOutput:
    """``model_mse``, ``ref_mse``: (2P,) per-sample errors ordered [winners, losers]."""
    if model_mse.shape != ref_mse.shape or model_mse.ndim != 1 or model_mse.shape[0] % 2:
        raise ValueError(
            f"expected two (2P,) tensors, got {tuple(model_mse.shape)} and {tuple(ref_mse.shape)}"
        )
    mse_w, mse_l = model_mse.chunk(2)  # (P,), (P,)
    ref_w, ref_l = ref_mse.detach().chunk(2)
    model_diff = mse_w - mse_l
    ref_diff = ref_w - ref_l
    inside = -beta_dpo * (model_diff - ref_diff)  # (P,)
    loss = -F.logsigmoid(inside).mean()
    return DPOOutput(loss, inside, implicit_accuracy(inside), model_diff, ref_diff)


def sft_loss(model_mse_winners: torch.Tensor) -> torch.Tensor:
    """Supervised fine-tuning baseline: plain denoising loss on the preferred images only."""
    return model_mse_winners.mean()
