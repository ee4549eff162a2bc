"""The `probe` stage: how much of a user each embedder captures, side by side.

For every embedder of the `embed` output: user identification on held-out shot sets of seen users
(the paper's MLP, a nearest-centroid baseline, chance) and, on the synthetic world, archetype
accuracy for unseen users from centroids of seen users. The reference embedders (true preference,
true attribute differences of the 4 shots) sit in the same table as the ceiling.

With the encoder stage's image features, also the held-out pair accuracy of unseen users from their K
shots (:mod:`ppd_core.embed.pair_probe`), beside a population reward model; and, on the synthetic world,
the linear read of unseen users' true preference from their K-shot embeddings (``preference_unseen``), the
figure that tracked generation for new users where pair accuracy did not.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ppd_core.config import ProbeConfig
from ppd_core.embed.extract import read_embeddings
from ppd_core.embed.probe import run_probe
from ppd_core.manifest import atomic_write_bytes, load_manifest
from ppd_core.schemas import PROBE as PROBE_SCHEMA
from ppd_core.stage import Progress, ProgressCount


def _world_users(world_dir: Path | None) -> tuple[dict[int, int] | None, dict[int, np.ndarray] | None]:
    """(user id -> archetype, user id -> true preference vector) of the synthetic world; (None, None) without one."""
    if world_dir is None:
        return None, None
    users = pq.read_table(
        world_dir / "users.parquet", columns=["user_id", "archetype", "weights"]
    ).to_pylist()
    archetypes = {int(u["user_id"]): int(u["archetype"]) for u in users}
    return archetypes, {int(u["user_id"]): np.asarray(u["weights"], dtype=np.float64) for u in users}


def probe_stage(
    cfg: ProbeConfig,
    embed_dir: Path,
    fewshot_dir: Path,
    world_dir: Path | None,
    out_dir: Path,
    encoder_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Probe every embedder's embeddings; ``progress(done, total)`` counts the probes: one per embedder, then,
    with the encoder's features, the population model and each embedder's held-out pair fit."""
    manifest = load_manifest(embed_dir)
    embedders = manifest.counts["embedders"] if manifest else {}
    pair_fits = 1 + len(embedders) if encoder_dir is not None else 0  # the population model and each embedder
    probes = ProgressCount(progress, len(embedders) + pair_fits)
    archetypes, preferences = _world_users(world_dir)
    rows: list[dict] = []
    for name, info in embedders.items():
        table, emb = read_embeddings(embed_dir, name)
        if cfg.rows == "last" and emb.ndim == 3:
            emb = emb[:, -1]  # (N, hidden): the last hidden-state row, as the paper's probe
        unseen = np.asarray(table.column("split").to_pylist()) == "unseen"
        results = run_probe(
            emb,
            np.asarray(table.column("user_id").to_pylist(), dtype=np.int64),
            np.asarray(table.column("set_index").to_pylist(), dtype=np.int64),
            cfg,
            archetypes=archetypes,
            unseen_mask=unseen,
            preferences=preferences,
        )
        kind = str(info.get("identity", {}).get("kind", ""))
        rows += [
            {"embedder": name, "kind": kind, **{k: r[k] for k in PROBE_SCHEMA.names[2:]}} for r in results
        ]
        probes.add()
    if encoder_dir is not None:  # held-out pair accuracy needs the encoder stage's image features
        from ppd_core.embed.pair_probe import pair_diagnostics

        kinds = {name: str(info.get("identity", {}).get("kind", "")) for name, info in embedders.items()}
        rows += pair_diagnostics(cfg, embed_dir, fewshot_dir, encoder_dir, kinds, on_fit=probes.add)
    table = pa.Table.from_pylist(rows, schema=PROBE_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out_dir / "probe.parquet", sink.getvalue().to_pybytes())
    summary = summarize(rows)
    atomic_write_bytes(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return {"rows": len(rows), "embedders": len(embedders), "summary": summary}


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """{embedder: {"<task>/<method>@<k>": accuracy}}: the compact view shown in manifests and artifacts."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        out.setdefault(r["embedder"], {})[f"{r['task']}/{r['method']}@{r['k']}"] = round(
            float(r["accuracy"]), 4
        )
    return out


def stage1_view(probe_dir: Path | None, default: str, ceiling: str | None) -> dict:
    """What the report shows of the probe: per embedder its archetype, identification and held-out pair
    accuracies and (synthetic world) its read of unseen users' true preference; and the pair accuracy of the
    default embedder, the K-shot ceiling and the population model, and the preference read of the first two."""
    if probe_dir is None or not (Path(probe_dir) / "summary.json").is_file():
        return {}
    summary = json.loads((Path(probe_dir) / "summary.json").read_text())
    pick = {
        "archetype_unseen": "archetype_unseen/nearest_centroid@1",
        "user_id_top1": "user_id/mlp@1",
        "preference_unseen": "preference_unseen/ridge@1",
    }
    table = {}
    for name, scores in summary.items():
        row = {label: scores.get(key) for label, key in pick.items()}
        row["pairs_unseen"] = next((v for k, v in scores.items() if k.startswith("pairs_unseen/")), None)
        table[name] = row
    pairs = {
        "default": table.get(default, {}).get("pairs_unseen"),
        "ceiling": table.get(ceiling, {}).get("pairs_unseen") if ceiling else None,
        "population": table.get("(population)", {}).get("pairs_unseen"),
    }
    preference = {
        "default": table.get(default, {}).get("preference_unseen"),
        "ceiling": table.get(ceiling, {}).get("preference_unseen") if ceiling else None,
    }
    return {"embedders": table, "pairs_unseen": pairs, "preference_unseen": preference}
