"""The few-shot preference encoder: K labelled pairs of a user -> a low-dimensional user vector z.

Following the amortized user encoders of VPL and the low-rank user spaces of PAL / LoRe:

- a **reward basis** g: standardised image features (D,) -> (z_dim,), linear; a user with vector z scores
  an image as ``r(z, x) = z . g(x)``, so a labelled pair is explained by ``z . (g(x_w) - g(x_l))``
  (Bradley-Terry);
- a **pair encoder** over (g(preferred), g(dispreferred), their difference) -> (hidden,): linear (the
  default) or a two-layer MLP; or ``difference``: linear over the difference g(preferred) - g(dispreferred)
  alone;
- a **permutation-invariant set pooling** over the K pairs (mean, or attention with one learned query);
- a head -> z (z_dim,) (linear, or GELU + linear after an MLP pair encoder), or a Gaussian over z (mean,
  log-variance) when variational; the embedding a shot set gets is the mean.

Why linear: the diffusion adapter reads z linearly, so what matters is how well a linear read of z
recovers the user's taste for users never trained on. On the synthetic world (where the truth is known)
a linear read of the true preference vector from unseen users' z reached cosine 0.52 with the linear pair
encoder and 0.34-0.48 with MLPs of the same held-out pair accuracy: the MLPs fit the training users'
contexts in ways that do not carry over. The ``difference`` encoder goes one step further: z is an affine
map of the mean basis difference of the K pairs (the direction one Bradley-Terry gradient step from a zero
prior takes), so a pair's shared base style cannot enter z. It reads unseen users' taste better on every
world tested, but new users' images did not follow (docs/encoder.md), so it is an option.

Shapes: B shot sets, K pairs per set (a mask marks real pairs when sets differ in size), D features.
The constructor arguments (``config()``) travel with the weights, so a saved encoder rebuilds itself.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

from ppd_core.weights import save_safetensors

WEIGHTS_FILE = "encoder.safetensors"
PAIR_ENCODERS = ("difference", "linear", "mlp")


class AttentionPool(nn.Module):
    """Softmax-weighted sum over the set with one learned query: (B, K, H) -> (B, H)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(hidden))
        self.key = nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        scores = self.key(h) @ self.query / math.sqrt(h.shape[-1])  # (B, K)
        scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1)[..., None] * h).sum(-2)  # (B, H)


def _linears(module: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a pair encoder or head, in order (one Linear, or those of a Sequential)."""
    return [
        m for m in (module if isinstance(module, nn.Sequential) else [module]) if isinstance(m, nn.Linear)
    ]


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real pairs: (B, K, H) -> (B, H)."""
    w = mask.to(h.dtype)[..., None]  # (B, K, 1)
    return (h * w).sum(-2) / w.sum(-2).clamp(min=1)


class PreferenceEncoder(nn.Module):
    def __init__(
        self,
        feature_dim: int,
        z_dim: int = 6,
        hidden: int = 64,
        pooling: str = "mean",
        variational: bool = False,
        pair_encoder: str = "linear",
    ):
        super().__init__()
        if pooling not in ("mean", "attention"):
            raise ValueError(f"pooling must be mean or attention, got {pooling!r}")
        if pair_encoder not in PAIR_ENCODERS:
            raise ValueError(f"pair_encoder must be one of {', '.join(PAIR_ENCODERS)}, got {pair_encoder!r}")
        self.feature_dim, self.z_dim, self.hidden = int(feature_dim), int(z_dim), int(hidden)
        self.pooling, self.variational, self.pair_encoder = pooling, bool(variational), pair_encoder
        # feature standardisation, fitted on the training users' images and stored with the weights
        self.register_buffer("feature_mean", torch.zeros(self.feature_dim))
        self.register_buffer("feature_std", torch.ones(self.feature_dim))
        self.basis = nn.Linear(self.feature_dim, self.z_dim, bias=False)  # g; a bias cancels in every pair
        out = self.z_dim * (2 if variational else 1)
        if pair_encoder != "mlp":
            self.pair = nn.Linear(self.pair_parts * self.z_dim, self.hidden)
            self.head = nn.Linear(self.hidden, out)
        else:
            self.pair = nn.Sequential(
                nn.Linear(self.pair_parts * self.z_dim, self.hidden),
                nn.GELU(),
                nn.Linear(self.hidden, self.hidden),
            )
            self.head = nn.Sequential(nn.GELU(), nn.Linear(self.hidden, out))
        self.pool = AttentionPool(self.hidden) if pooling == "attention" else None

    @property
    def pair_parts(self) -> int:
        """How many z_dim-wide parts the pair encoder reads: (g_w, g_l, g_w - g_l), or the difference alone."""
        return 1 if self.pair_encoder == "difference" else 3

    def config(self) -> dict:
        return {
            "feature_dim": self.feature_dim,
            "z_dim": self.z_dim,
            "hidden": self.hidden,
            "pooling": self.pooling,
            "variational": self.variational,
            "pair_encoder": self.pair_encoder,
        }

    def g(self, features: torch.Tensor) -> torch.Tensor:
        """Reward basis: (..., D) raw features -> (..., z_dim)."""
        return self.basis((features - self.feature_mean) / self.feature_std)

    def encode(
        self, preferred: torch.Tensor, dispreferred: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, K, D) features of each shot's two images -> z mean (B, z_dim) and log-variance (or None)."""
        return self.encode_basis(self.g(preferred), self.g(dispreferred), mask)

    def encode_basis(
        self, gw: torch.Tensor, gl: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode` from the basis outputs g(preferred), g(dispreferred), each (B, K, z_dim)."""
        if mask is None:
            mask = torch.ones(gw.shape[:2], dtype=torch.bool, device=gw.device)  # (B, K)
        pair = gw - gl if self.pair_parts == 1 else torch.cat([gw, gl, gw - gl], dim=-1)  # (B, K, parts * Z)
        h = self.pair(pair)  # (B, K, H)
        pooled = self.pool(h, mask) if self.pool is not None else mean_pool(h, mask)  # (B, H)
        out = self.head(pooled)  # (B, Z) or (B, 2Z)
        if self.variational:
            mu, logvar = out.chunk(2, dim=-1)
            return mu, logvar.clamp(-8.0, 8.0)
        return out, None

    def margin(self, z: torch.Tensor, preferred: torch.Tensor, dispreferred: torch.Tensor) -> torch.Tensor:
        """Bradley-Terry logit of preferring ``preferred``: z (..., Z) against features (..., D) -> (...)."""
        return (z * (self.g(preferred) - self.g(dispreferred))).sum(-1)

    def reward(self, z: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """r(z, x) = z . g(x): z (B, Z), features (B, N, D) -> (B, N)."""
        return (z[:, None, :] * self.g(features)).sum(-1)

    @torch.no_grad()
    def rescale_z(self, scale: torch.Tensor) -> None:
        """Divide z by ``scale`` (z_dim,) and multiply the basis by it: every margin z . g stays the same.

        The BT loss fixes only the product z . g, and training leaves z small (per-dimension std about 0.1 on
        the demo world) while the diffusion adapter's projection reads z at its raw scale: a user signal
        that small barely moves a freshly initialised projection in a short DPO run. Unit-scale z fixes that.
        """
        scale = scale.to(self.basis.weight)
        self.basis.weight.mul_(scale[:, None])  # (Z, D): g_i -> g_i * s_i
        first = _linears(self.pair)[0]
        first.weight.div_(scale.repeat(self.pair_parts)[None, :])  # its input (g_w, g_l, g_w - g_l) grew by s
        last = _linears(self.head)[-1]
        last.weight[: self.z_dim].div_(scale[:, None])  # the mean part of the head: z_i -> z_i / s_i
        last.bias[: self.z_dim].div_(scale)
        if self.variational:  # the log-variance of z / s is the log-variance of z minus 2 log s
            last.bias[self.z_dim :].sub_(2.0 * scale.log())

    @classmethod
    @torch.no_grad()
    def concatenate(cls, members: list[PreferenceEncoder]) -> PreferenceEncoder:
        """One encoder whose z is the members' z side by side and whose margin z . g is the sum of theirs.

        Exact for mean pooling: the bases are stacked, the pair encoders and heads become block diagonal,
        and the shared feature standardisation is the first member's. Each member's own standardisation
        (fitted on its own training users' images) folds into its block of the basis; the constant that
        this leaves on g(x) cancels in every pair's difference and is absorbed by the pair encoder's bias.
        """
        first = members[0]
        if first.pool is not None:
            raise ValueError(
                "only mean-pooled encoders concatenate exactly (attention pools one softmax per set)"
            )
        for m in members[1:]:
            if m.config() != first.config():
                raise ValueError("members must share their constructor arguments to concatenate")
        z, h, n = first.z_dim, first.hidden, len(members)
        out = cls(first.feature_dim, z * n, h * n, "mean", first.variational, first.pair_encoder)
        out.feature_mean.copy_(first.feature_mean)
        out.feature_std.copy_(first.feature_std)
        out.basis.weight.zero_()
        out_pair = _linears(out.pair)
        out_head = _linears(out.head)
        for layer in (*out_pair, *out_head):
            layer.weight.zero_()
            layer.bias.zero_()
        halves = 2 if first.variational else 1
        for i, m in enumerate(members):
            rows = slice(i * z, (i + 1) * z)
            # g_m(x) = B_m (x - mu_m) / s_m = B'(x - mu) / s + c, B' = B_m s / s_m, c = B_m (mu - mu_m) / s_m
            weight = m.basis.weight * (out.feature_std / m.feature_std)[None, :]  # (Z, D)
            offset = m.basis.weight @ ((out.feature_mean - m.feature_mean) / m.feature_std)  # c (Z,)
            out.basis.weight[rows] = weight
            pairs = _linears(m.pair)
            heads = _linears(m.head)
            for k, (src, dst) in enumerate(zip(pairs, out_pair, strict=True)):
                hid = slice(i * h, (i + 1) * h)
                if k == 0:  # input (g_w, g_l, g_w - g_l) or g_w - g_l, each part n * z wide when concatenated
                    parts = first.pair_parts
                    for part in range(parts):
                        dst.weight[hid, part * z * n + i * z : part * z * n + (i + 1) * z] = src.weight[
                            :, part * z : (part + 1) * z
                        ]
                    # g_w and g_l both carry the offset c; their difference does not
                    dst.bias[hid] = src.bias
                    if parts == 3:
                        dst.bias[hid] += src.weight[:, :z] @ offset + src.weight[:, z : 2 * z] @ offset
                else:
                    dst.weight[hid, hid] = src.weight
                    dst.bias[hid] = src.bias
            for src, dst in zip(heads, out_head, strict=True):
                if dst is out_head[-1]:  # output (mean, [log-variance]) halves, each n * z wide
                    for half in range(halves):
                        o_dst = slice(half * z * n + i * z, half * z * n + (i + 1) * z)
                        o_src = slice(half * z, (half + 1) * z)
                        dst.weight[o_dst, i * h : (i + 1) * h] = src.weight[o_src]
                        dst.bias[o_dst] = src.bias[o_src]
                else:
                    dst.weight[i * h : (i + 1) * h, i * h : (i + 1) * h] = src.weight
                    dst.bias[i * h : (i + 1) * h] = src.bias
        return out

    # ------------------------------------------------------------------------------------ saving
    def save(self, directory: Path, extra: dict | None = None) -> Path:
        """``encoder.safetensors`` with the constructor arguments (and ``extra``) in its metadata."""
        path = Path(directory) / WEIGHTS_FILE
        meta = {"config": json.dumps(self.config()), "extra": json.dumps(extra or {}, sort_keys=True)}
        return save_safetensors(
            {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path, meta
        )

    @classmethod
    def load(cls, directory: Path, device: str | torch.device = "cpu") -> tuple[PreferenceEncoder, dict]:
        """The encoder saved in ``directory`` and the ``extra`` metadata saved with it."""
        from safetensors import safe_open

        path = Path(directory) / WEIGHTS_FILE
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        model = cls(**json.loads(meta["config"]))
        model.load_state_dict(load_file(str(path)))
        return model.to(device).eval(), json.loads(meta.get("extra", "{}"))
