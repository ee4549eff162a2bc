"""The evaluation report: headline figures and targets (summary.json), image grids, plots and one
self-contained HTML file (images inlined as base64, so the file can be mailed or attached).

Targets are the design's quality figures on the synthetic world, judged by the primary judge:
each is listed with its value and whether it was met, never hidden when it was not.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from ppd_core.config import PPDConfig  # noqa: E402
from ppd_core.evaluate.judging import COMPARISON_PAIRS  # noqa: E402
from ppd_core.models.grids import save_grid  # noqa: E402

GRID_USERS = 8  # rows per model grid


def _rows(table: pa.Table) -> list[dict]:
    return table.to_pylist() if table.num_columns else []


def headline(rates: pa.Table, judge: str) -> dict[str, dict]:
    """'<group>:<model>_vs_<baseline>' -> win rate, interval, reward gain, interval, users (one judge)."""
    out = {}
    for r in _rows(rates):
        if r["judge"] != judge or (r["model"], r["baseline"]) not in COMPARISON_PAIRS:
            continue
        out[f"{r['group']}:{r['model']}_vs_{r['baseline']}"] = {
            k: r[k]
            for k in (
                "win_rate",
                "win_rate_low",
                "win_rate_high",
                "reward_gain",
                "reward_gain_low",
                "reward_gain_high",
                "n",
                "n_users",
                "inconsistency_rate",
            )
        }
    return out


def targets(head: Mapping[str, dict], monotone: pa.Table, probe: Mapping | None = None) -> list[dict]:
    """The quality targets these figures can check (docs/quality.md); ``probe``: :func:`probe_view`."""

    def get(key: str, field: str = "win_rate") -> float | None:
        return head.get(key, {}).get(field)

    checks = []

    def check(name: str, value: float | None, ok: bool | None) -> None:
        checks.append({"target": name, "value": value, "met": ok})

    for group in ("seen", "unseen"):
        w, g = get(f"{group}:ppd_true_vs_base"), get(f"{group}:ppd_true_vs_base", "reward_gain")
        if w is not None:
            check(f"{group}: true-preference PPD beats base >= 0.85", w, w >= 0.85)
            check(f"{group}: true-preference PPD reward gain >= 0.2 std", g, g is not None and g >= 0.2)
    w, d = get("seen:ppd_vs_base"), get("seen:dpo_vs_base")
    if w is not None:
        g = get("seen:ppd_vs_base", "reward_gain")
        check("seen: PPD beats base >= 0.83", w, w >= 0.83)
        check("seen: PPD reward gain >= 0.6 std", g, g is not None and g >= 0.6)
        if d is not None:
            check("seen: PPD above population DPO by >= 0.05", w - d, w - d >= 0.05)
    w = get("unseen:ppd_vs_base")
    if w is not None:
        g, low = get("unseen:ppd_vs_base", "reward_gain"), get("unseen:ppd_vs_base", "reward_gain_low")
        check("unseen (K shots): PPD beats base >= 0.72", w, w >= 0.72)
        check("unseen (K shots): PPD reward gain >= 0.7 std", g, g is not None and g >= 0.7)
        check(
            "unseen (K shots): lower bound of the PPD reward gain > 0.3", low, low is not None and low > 0.3
        )
        ceiling = get("unseen:ppd_shots_vs_base", "reward_gain")
        if ceiling is not None and g is not None and ceiling > 0:
            check(
                "unseen (K shots): PPD gain >= 70% of the K-shot ceiling's", g / ceiling, g >= 0.7 * ceiling
            )
    w = get("unseen:ppd_vs_dpo")
    if w is not None:
        check("unseen (K shots): PPD beats population DPO >= 0.70", w, w >= 0.70)
    pairs = (probe or {}).get("pairs_unseen", {})
    default, ceiling = pairs.get("default"), pairs.get("ceiling")
    if default is not None and ceiling is not None:
        check(
            "unseen held-out pair accuracy of the default embedder within 0.03 of the K-shot ceiling's",
            default - ceiling,
            default >= ceiling - 0.03,
        )
    if monotone.num_rows:
        flags = monotone.column("monotone_within_noise").to_pylist()
        check(
            "interpolation monotone for each reward (rises > 2 paired SE end to end, no step against > 2 SE)",
            float(np.mean(flags)),
            all(flags),
        )
        strict = monotone.column("monotone").to_pylist()
        check(
            "interpolation strictly monotone (share of curves, no step against at all)",
            float(np.mean(strict)),
            None,
        )
    return checks


def summarize(
    cfg: PPDConfig,
    rates: pa.Table,
    agreement: pa.Table,
    monotone: pa.Table,
    skipped: dict,
    requests: pa.Table,
    probe: Mapping | None = None,
) -> dict:
    """The report's figures; ``probe``: the stage-1 diagnostics (:func:`ppd_core.embed.probe_stage.stage1_view`)."""
    judge = cfg.evaluate.primary_judge
    available = set(rates.column("judge").to_pylist()) if rates.num_columns else set()
    if judge not in available and available:
        judge = sorted(available)[0]
    head = headline(rates, judge)
    return {
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "primary_judge": judge,
        "headline": head,
        "targets": targets(head, monotone, probe),
        "stage1": probe or {},
        "judge_agreement": _rows(agreement),
        "monotonicity": _rows(monotone),
        "rewards_skipped": skipped,
        "requests": requests.num_rows,
        "users": len(set(requests.column("user_id").to_pylist())),
    }


# ------------------------------------------------------------------------------------------- figures


def model_grids(out_dir: Path, requests: pa.Table, images: Mapping[str, np.ndarray]) -> dict[str, Path]:
    """grids/<model>.png: the same users (rows) x prompts (columns, seed 0) for every model."""
    rows = _rows(requests)
    users: list[int] = []
    for group in ("seen", "unseen"):
        users += list(dict.fromkeys(r["user_id"] for r in rows if r["group"] == group))[: GRID_USERS // 2]
    cells = {u: [i for i, r in enumerate(rows) if r["user_id"] == u and r["seed"] == 0] for u in users}
    cols = max((len(c) for c in cells.values()), default=0)
    out = {}
    for model, imgs in images.items():
        blank = np.full_like(imgs[0], 255)
        tiles = [imgs[c[j]] if j < len(c) else blank for u in users for c in [cells[u]] for j in range(cols)]
        scale = max(1, 64 // imgs.shape[1])
        out[model] = save_grid(
            np.stack(tiles), len(users), cols, out_dir / "grids" / f"{model}.png", scale=scale
        )
    return out


def win_rate_plot(rates: pa.Table, judge: str, path: Path) -> Path | None:
    rows = [r for r in _rows(rates) if r["judge"] == judge]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, field, label in (
        (axes[0], "win_rate", "win rate"),
        (axes[1], "reward_gain", "reward gain (std)"),
    ):
        names = [f"{r['group']}\n{r['model']} vs {r['baseline']}" for r in rows]
        values = np.array([r[field] for r in rows], dtype=float)
        low = np.array([r[f"{field}_low"] for r in rows], dtype=float)
        high = np.array([r[f"{field}_high"] for r in rows], dtype=float)
        colours = ["tab:blue" if r["group"] == "seen" else "tab:orange" for r in rows]
        ax.bar(range(len(rows)), values, color=colours, yerr=[values - low, high - values], capsize=3)
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=7)
        ax.axhline(0.5 if field == "win_rate" else 0.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel(label)
    fig.suptitle(f"judge: {judge} (intervals: user-cluster bootstrap)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def training_plot(dirs: Mapping[str, Path], path: Path) -> Path | None:
    runs = {
        k: Path(v) for k, v in dirs.items() if k.startswith("train_") and (Path(v) / "metrics.jsonl").exists()
    }
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for name, run in runs.items():
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
        steps = [x["step"] for x in lines]
        axes[0].plot(steps, [x["loss"] for x in lines], label=name)
        if any("implicit_acc" in x for x in lines):
            axes[1].plot(steps, [x.get("implicit_acc", np.nan) for x in lines], label=f"{name} (train)")
        val = run / "validation.jsonl"
        if val.exists():
            v = [json.loads(x) for x in val.read_text().splitlines() if x.strip()]
            axes[1].plot(
                [x["step"] for x in v],
                [x["heldout_implicit_acc"] for x in v],
                "o--",
                label=f"{name} held-out",
            )
    axes[0].set(xlabel="step", ylabel="loss", title="training loss")
    axes[1].set(xlabel="step", ylabel="implicit accuracy", title="DPO implicit accuracy")
    axes[1].axhline(0.5, color="grey", lw=0.8, ls="--")
    for ax in axes:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interpolation_plot(table: pa.Table, path: Path) -> Path | None:
    rows = _rows(table)
    keys = list(dict.fromkeys((r["model"], r["user_a"], r["user_b"]) for r in rows))
    if not keys:
        return None
    fig, axes = plt.subplots(1, len(keys), figsize=(3.4 * len(keys), 3.2), squeeze=False)
    for ax, (model, a, b) in zip(axes[0], keys, strict=True):
        mine = [r for r in rows if (r["model"], r["user_a"], r["user_b"]) == (model, a, b)]
        for reward in dict.fromkeys(r["reward"] for r in mine):
            pts = sorted((r["alpha"], r["mean"]) for r in mine if r["reward"] == reward)
            alphas, means = np.array(pts).T
            ax.plot(
                alphas, means - means[0], "o-", label=reward
            )  # change from a = 0: rewards differ in scale
        ax.set(title=f"{model}: a*{a} + (1-a)*{b}", xlabel="a", ylabel="mean reward - value at a=0")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- HTML


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"><figcaption>{html.escape(alt)}</figcaption></figure>'


def _fmt(v) -> str:
    if isinstance(v, float):
        if not np.isfinite(v):
            return "nan"
        return f"{v:.3f}" if v == 0 or 1e-2 <= abs(v) < 1e4 else f"{v:.2e}"
    return html.escape(str(v))


def html_table(rows: list[dict], title: str, columns: list[str] | None = None) -> str:
    if not rows:
        return f"<h3>{html.escape(title)}</h3><p>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f'<h3>{html.escape(title)}</h3><table class="t" data-title="{html.escape(title)}"><tr>{head}</tr>{body}</table>'


STYLE = """body{font-family:sans-serif;margin:2em;max-width:1200px}table.t{border-collapse:collapse;font-size:12px;
margin-bottom:1em}table.t td,table.t th{border:1px solid #ccc;padding:3px 6px;text-align:right}
figure{display:inline-block;margin:0.5em}img{image-rendering:pixelated;max-width:100%}.met{color:#070}.miss{color:#a00}"""


def write_report(
    cfg: PPDConfig,
    out_dir: Path,
    dirs: Mapping[str, Path],
    requests: pa.Table,
    images: Mapping[str, np.ndarray],
    summary: dict,
    tables: Mapping[str, pa.Table],
) -> Path:
    """plots/*.png, grids/*.png and report.html under ``out_dir``."""
    grids = model_grids(out_dir, requests, images)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    judge = summary["primary_judge"]
    figures = [
        _img(
            win_rate_plot(tables["win_rates"], judge, plots / "win_rates.png"), f"win rates ({judge} judge)"
        ),
        _img(training_plot(dirs, plots / "training.png"), "training curves"),
        _img(
            interpolation_plot(tables["interpolation"], plots / "interpolation.png"),
            "interpolation between reward users",
        ),
    ]
    targets_rows = [
        {**t, "met": "yes" if t["met"] else ("no" if t["met"] is not None else "n/a")}
        for t in summary["targets"]
    ]
    parts = [
        f"<h1>PPD evaluation report</h1><p>Run root <code>{html.escape(str(cfg.run.root))}</code>, "
        f"{summary['users']} users, {summary['requests']} requests per model (same prompt and seed for every "
        f"model), primary judge <b>{html.escape(judge)}</b>. Created {summary['created_at']}.</p>",
        html_table(targets_rows, "Quality targets"),
        html_table([{"comparison": k, **v} for k, v in summary["headline"].items()], "Headline win rates"),
        html_table(
            [{"embedder": k, **v} for k, v in summary.get("stage1", {}).get("embedders", {}).items()],
            "Stage 1: what each embedder keeps of a user (archetype of unseen users, user identification, "
            "held-out pair accuracy of unseen users from their K shots)",
        ),
        *[f for f in figures if f],
        html_table(_rows(tables["win_rates"]), "Win rates, all judges"),
        html_table(summary["judge_agreement"], "Judge agreement with held-out user labels"),
        html_table(summary["monotonicity"], "Interpolation monotonicity"),
        "<h2>Generated images (rows: users; columns: held-out prompts; seed 0)</h2>",
        *[_img(p, f"model: {m}") for m, p in grids.items()],
        html_table(_rows(tables["win_rates_per_user"])[:400], "Per-user win rates"),
        html_table(
            [{"reward": k, "reason": v} for k, v in summary["rewards_skipped"].items()], "Rewards skipped"
        ),
    ]
    page = f'<!doctype html><html><head><meta charset="utf-8"><title>PPD report</title><style>{STYLE}</style></head><body>{"".join(parts)}</body></html>'
    path = out_dir / "report.html"
    path.write_text(page)
    return path
