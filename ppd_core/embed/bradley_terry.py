"""Low-rank Bradley-Terry fits shared by the encoder's reward basis and the probe's pair diagnostics.

A pair (preferred x_w, dispreferred x_l) of a user with vector v gets the logit ``v . (g(x_w) - g(x_l))``
with ``g(x) = B (x - mean) / std`` a linear reward basis over image features; the logit is therefore
``v . B d`` with d the standardised feature difference of the pair, computed once before fitting (the
fit then costs one (P, D) x (D, rank) product per step instead of gathering 2P feature rows).
:func:`fit_bradley_terry` fits B and the module that gives each pair its user vector (free vectors per
user, a linear read of a fixed embedding, or one shared vector for a population model) full batch, with
an L2 penalty on both.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def standardised_differences(X: torch.Tensor, pairs: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """(P, D) ``(X[winner] - X[loser]) / std`` for ``pairs`` (P, 2) rows of ``X``."""
    return (X[pairs[:, 0]] - X[pairs[:, 1]]) / std


def fit_bradley_terry(
    basis: nn.Linear,
    users: nn.Module,
    user_inputs: torch.Tensor,
    diffs: torch.Tensor,
    steps: int,
    lr: float,
    l2: float,
) -> dict[str, float]:
    """Fit ``basis`` and ``users`` on standardised pair differences ``diffs`` (P, D), the p-th pair's user
    vector being ``users(user_inputs[p])``. Returns the final loss and training accuracy."""
    params = [basis.weight, *users.parameters()]
    opt = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        margin = (users(user_inputs) * basis(diffs)).sum(-1)  # (P,)
        loss = -F.logsigmoid(margin).mean() + l2 * sum(p.square().sum() for p in params)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        margin = (users(user_inputs) * basis(diffs)).sum(-1)
    return {"loss": float(loss.detach()), "train_accuracy": float((margin > 0).float().mean())}
