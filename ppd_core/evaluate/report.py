"""The evaluation report: headline figures and targets (summary.json), image grids, plots and one
self-contained HTML file (images inlined as base64, so the file can be mailed or attached).

Targets are the design's quality figures on the synthetic world, judged by the primary judge:
each is listed with its value and whether it was met, never hidden when it was not.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from ppd_core.config import PPDConfig  # noqa: E402
from ppd_core.errors import InputError  # noqa: E402
from ppd_core.evaluate.judging import COMPARISON_PAIRS, win_rate_tables  # noqa: E402
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
    read = (probe or {}).get("preference_unseen", {})
    default, ceiling = read.get("default"), read.get("ceiling")
    if default is not None and ceiling is not None:
        check(
            "unseen: linear read of the true preference from the default embedder, cosine minus the K-shot "
            "ceiling's (diagnostic)",
            default - ceiling,
            None,
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


def pooled(cfg: PPDConfig, evaluate_dirs: Sequence[Path]) -> dict:
    """Headline figures and targets of several evaluations of the same users judged as one, e.g. one run per
    trainers' seed (``train.seed``), so that a target is not decided by one training run.

    The runs' comparisons are concatenated and win rates computed as the evaluate stage does (same judge,
    bootstrap and confidence from ``cfg``); every user's rows from all runs form one bootstrap cluster, so the
    interval covers the users, not the runs. The Stage-1 figures are the first run's (the probe does not depend
    on the trainers); the interpolation check is per run and not pooled."""
    if not evaluate_dirs:
        raise InputError("no evaluation to pool")
    summaries = [json.loads((Path(d) / "summary.json").read_text()) for d in evaluate_dirs]
    tables = [pq.read_table(Path(d) / "comparisons.parquet") for d in evaluate_dirs]
    users = [
        sorted(set(zip(*(t.column(c).to_pylist() for c in ("group", "user_id")), strict=True)))
        for t in tables
    ]
    judges = {s["primary_judge"] for s in summaries}
    if any(u != users[0] for u in users) or len(judges) != 1:
        raise InputError(
            f"cannot pool {[str(d) for d in evaluate_dirs]}: they evaluate different users or judges "
            "(pool only runs of one world that differ in the trainers)"
        )
    rates, _ = win_rate_tables(cfg, pa.concat_tables(tables))
    head = headline(rates, judges.pop())
    stage1 = summaries[0]["stage1"]
    return {
        "runs": len(tables),
        "headline": head,
        "targets": targets(head, pa.table({}), stage1),
        "stage1": stage1,
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
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
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
        ax.set_xticks(range(len(rows)), names, rotation=60, ha="right", fontsize=9)
        ax.axhline(0.5 if field == "win_rate" else 0.0, color="grey", lw=0.8, ls="--")
        ax.set_ylabel(label)
        ax.set_xlabel("comparison (blue: seen users, orange: new users)")
    fig.suptitle(f"judge: {judge} (intervals: user-cluster bootstrap)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def training_plot(dirs: Mapping[str, Path], path: Path) -> Path | None:
    runs = {
        k: Path(v) for k, v in dirs.items() if k.startswith("train_") and (Path(v) / "metrics.jsonl").exists()
    }
    if not runs:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
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
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def interpolation_plots(table: pa.Table, directory: Path) -> list[tuple[Path, str]]:
    """One figure per pair of reward users (a, b): every interpolated model's mean reward under each reward
    as the embedding moves from b (a = 0) to a (a = 1), relative to its value at a = 0."""
    rows = _rows(table)
    out = []
    for a, b in dict.fromkeys((r["user_a"], r["user_b"]) for r in rows):
        mine = [r for r in rows if (r["user_a"], r["user_b"]) == (a, b)]
        models = list(dict.fromkeys(r["model"] for r in mine))
        fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 3.8), squeeze=False)
        for ax, model in zip(axes[0], models, strict=True):
            for reward in dict.fromkeys(r["reward"] for r in mine if r["model"] == model):
                pts = sorted(
                    (r["alpha"], r["mean"]) for r in mine if r["model"] == model and r["reward"] == reward
                )
                alphas, means = np.array(pts).T
                ax.plot(alphas, means - means[0], "o-", label=reward)  # rewards differ in scale
            ax.set(
                title=f"{model}: embedding a * user {a} + (1 - a) * user {b}",
                xlabel="mixing weight a",
                ylabel="mean reward minus its value at a = 0",
            )
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.legend(fontsize=8, title="reward")
        fig.tight_layout()
        path = directory / f"interpolation_{a}_{b}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        out.append((path, f"interpolation between reward users {a} and {b}"))
    return out


# ------------------------------------------------------------------------------------------- HTML


def _img(path: Path | None, alt: str) -> str:
    if path is None or not Path(path).exists():
        return ""
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return (
        f'<figure><img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(alt)}</figcaption></figure>"
    )


def _png_uri(image) -> str:
    """A PIL image or a uint8 (H, W, 3) array as an inline PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image, dtype=np.uint8))
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


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


def folded_table(rows: list[dict], title: str, files: list[str] = (), shown: int = 200) -> str:
    """A table inside ``<details>`` (closed), the first ``shown`` rows, with links to its full files."""
    links = " ".join(f'<a href="{html.escape(f)}">{html.escape(f)}</a>' for f in files)
    more = f" (first {shown} of {len(rows)} rows)" if len(rows) > shown else f" ({len(rows)} rows)"
    return (
        f'<details class="fold"><summary>{html.escape(title)}{more}'
        f"{' &mdash; full table: ' + links if links else ''}</summary>"
        f"{html_table(rows[:shown], title)}</details>"
    )


# ------------------------------------------------------------------------------------------- people


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _interval(r: Mapping, field: str, pct: bool) -> str:
    low, high = r.get(f"{field}_low"), r.get(f"{field}_high")
    if low is None or high is None:
        return ""
    return f" [{_pct(low)}, {_pct(high)}]" if pct else f" [{low:+.2f}, {high:+.2f}]"


def _beats(r: Mapping) -> str:
    gain = r.get("reward_gain")
    text = f"{_pct(r['win_rate'])}{_interval(r, 'win_rate', True)} of the time"
    if gain is not None:
        text += f", a reward gain of {gain:+.2f} std{_interval(r, 'reward_gain', False)}"
    return text


def headline_sentences(head: Mapping[str, dict], shots: int) -> list[str]:
    """One plain sentence per group: PPD against base and population DPO, beside the two ceilings."""
    out = []
    groups = (
        ("unseen", f"New users, given {shots} labelled pairs each"),
        ("seen", "Seen users (their pairs were trained on)"),
    )
    for group, who in groups:
        r = head.get(f"{group}:ppd_vs_base")
        if not r:
            continue
        text = f"{who}: PPD's images beat the base model's {_beats(r)}, over {r.get('n_users')} users"
        dpo = head.get(f"{group}:ppd_vs_dpo")
        if dpo:
            text += (
                f"; against population DPO they win {_pct(dpo['win_rate'])}{_interval(dpo, 'win_rate', True)}"
            )
        ceilings = []
        ceiling = head.get(f"{group}:ppd_shots_vs_base")
        if ceiling:
            ceilings.append(
                f"the same {shots} pairs read perfectly (the {shots}-shot ceiling) beat base {_beats(ceiling)}"
            )
        true = head.get(f"{group}:ppd_true_vs_base")
        if true:
            ceilings.append(f"the user's true preference vector beats base {_beats(true)}")
        if ceilings:
            text += ". For comparison, " + "; ".join(ceilings)
        out.append(text + ".")
    return out


def _verdicts(targets_list: list[dict]) -> str:
    items = []
    for t in targets_list:
        met = t["met"]
        mark, cls = (
            ("met", "met")
            if met
            else (("not met", "miss") if met is not None else ("for information", "info"))
        )
        items.append(
            f'<li class="{cls}"><b>{mark}</b>: {html.escape(t["target"])} (value {_fmt(t["value"])})</li>'
        )
    return '<ul class="verdicts">' + "".join(items) + "</ul>"


PANEL_MODELS = ("base", "ppd", "ppd_shots", "ppd_true")  # what a person compares for one user
PANEL_LABELS = {
    "base": "base model",
    "ppd": "PPD",
    "ppd_shots": "K-shot ceiling",
    "ppd_true": "true-vector ceiling",
}


def user_panels(
    requests: pa.Table,
    images: Mapping[str, np.ndarray],
    shot_sets: Mapping[str, object],
    rewards: Mapping[str, np.ndarray],
    per_group: int = 2,
    prompts: int = 4,
) -> str:
    """Per-user panels for a few seen and a few new users: their shot pairs (preferred | dispreferred,
    caption), then for the same prompts and seed 0 the base, PPD and ceiling images, each with the user's
    primary reward (the world's oracle on the synthetic world) under it when there is one."""
    rows = _rows(requests)
    models = [m for m in PANEL_MODELS if m in images]
    parts = []
    for group, title in (("seen", "seen user"), ("unseen", "new user")):
        users = list(dict.fromkeys(r["user_id"] for r in rows if r["group"] == group))[:per_group]
        for user in users:
            mine = [i for i, r in enumerate(rows) if r["user_id"] == user and r["seed"] == 0][:prompts]
            shot_set = shot_sets.get(rows[mine[0]]["shot_set_id"]) if mine else None
            shots_html = ""
            if shot_set is not None:
                shots_html = (
                    '<table class="shots"><tr><th>caption</th><th>preferred</th><th>dispreferred</th></tr>'
                )
                for shot in shot_set.shots:
                    shots_html += (
                        f"<tr><td>{html.escape(shot.caption or '(no caption)')}</td>"
                        f'<td><img class="cell" alt="preferred" src="{_png_uri(shot.preferred)}"></td>'
                        f'<td><img class="cell" alt="dispreferred" src="{_png_uri(shot.dispreferred)}"></td></tr>'
                    )
                shots_html += "</table>"
            head = "".join(f"<th>{html.escape(rows[i]['prompt'])}</th>" for i in mine)
            body = ""
            for model in models:
                cells = ""
                for i in mine:
                    score = rewards.get(model)
                    under = f'<br><span class="r">{score[i]:.2f}</span>' if score is not None else ""
                    cells += f'<td><img class="cell gen" alt="{model}" src="{_png_uri(images[model][i])}">{under}</td>'
                body += f"<tr><th>{html.escape(PANEL_LABELS[model])}</th>{cells}</tr>"
            parts.append(
                f'<section class="panel" data-user="{user}" data-group="{group}"><h3>{title} {user}</h3>'
                f'<div class="cols"><div><h4>their shot pairs</h4>{shots_html}</div>'
                f"<div><h4>images for held-out prompts (seed 0){'; the user' + chr(39) + 's reward under each' if rewards else ''}</h4>"
                f'<table class="gen"><tr><th></th>{head}</tr>{body}</table></div></div></section>'
            )
    return "".join(parts)


def full_tables(out_dir: Path, tables: Mapping[str, pa.Table]) -> dict[str, list[str]]:
    """Write each table as CSV beside its Parquet file (``tables/<name>.csv``); name -> relative links."""
    import pyarrow.csv as pacsv

    links = {}
    (out_dir / "tables").mkdir(parents=True, exist_ok=True)
    for name, table in tables.items():
        simple = table.select(
            [c for c in table.column_names if not pa.types.is_nested(table.schema.field(c).type)]
        )
        pacsv.write_csv(simple, out_dir / "tables" / f"{name}.csv")
        links[name] = [f"tables/{name}.csv"] + (
            [f"{name}.parquet"] if (out_dir / f"{name}.parquet").exists() else []
        )
    return links


STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1300px;line-height:1.4}
table.t{border-collapse:collapse;font-size:12px;margin-bottom:1em}table.t td,table.t th{border:1px solid #ccc;
padding:3px 6px;text-align:right}p.lead{font-size:17px}ul.verdicts li{margin:2px 0}.met{color:#070}
.miss{color:#a00}.info{color:#555}figure{display:inline-block;margin:0.5em}img.plot{max-width:100%}
img.cell{width:96px;height:96px;image-rendering:pixelated;border:1px solid #ddd}section.panel{border-top:1px
solid #ccc;margin:1em 0;padding-top:0.5em}.cols{display:flex;gap:2em;flex-wrap:wrap}table.gen td,table.gen th,
table.shots td,table.shots th{padding:3px;text-align:center;font-size:12px;vertical-align:top}
span.r{font-family:monospace}details.fold{margin:0.4em 0}details.fold summary{cursor:pointer;font-weight:bold}"""


def write_report(
    cfg: PPDConfig,
    out_dir: Path,
    dirs: Mapping[str, Path],
    requests: pa.Table,
    images: Mapping[str, np.ndarray],
    summary: dict,
    tables: Mapping[str, pa.Table],
    shot_sets: Mapping[str, object] | None = None,
    rewards: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """plots/*.png, grids/*.png, tables/*.csv and report.html under ``out_dir``. ``shot_sets`` (id -> ShotSet)
    and ``rewards`` (model -> the primary reward of each request) feed the per-user panels."""
    grids = model_grids(out_dir, requests, images)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    judge = summary["primary_judge"]
    shots = cfg.fewshot.shots
    links = full_tables(out_dir, tables)
    figures = [
        _img(
            win_rate_plot(tables["win_rates"], judge, plots / "win_rates.png"), f"win rates ({judge} judge)"
        ),
        _img(training_plot(dirs, plots / "training.png"), "training curves"),
        *[_img(path, alt) for path, alt in interpolation_plots(tables["interpolation"], plots)],
    ]
    sentences = "".join(
        f'<p class="lead">{html.escape(t)}</p>' for t in headline_sentences(summary["headline"], shots)
    )
    targets_rows = [
        {**t, "met": "yes" if t["met"] else ("no" if t["met"] is not None else "n/a")}
        for t in summary["targets"]
    ]
    stage1 = [{"embedder": k, **v} for k, v in summary.get("stage1", {}).get("embedders", {}).items()]
    parts = [
        "<h1>PPD evaluation report</h1>",
        '<section id="headline"><h2>Headline</h2>',
        sentences or "<p>(no PPD comparison in this run)</p>",
        f"<p>Judged by <b>{html.escape(judge)}</b> on the same prompt and seed for every model; intervals are 95% "
        f"user-bootstrap intervals; a reward gain is in units of each user's reward standard deviation. Run root "
        f"<code>{html.escape(str(cfg.run.root))}</code>, {summary['users']} users, {summary['requests']} images per "
        f"model. Created {summary['created_at']}.</p>",
        "<h3>The project's targets</h3>",
        _verdicts(summary["targets"]),
        "</section>",
        '<section id="users"><h2>What users gave, and what each model made for them</h2>',
        user_panels(requests, images, shot_sets or {}, rewards or {}),
        "</section>",
        '<section id="plots"><h2>Plots</h2>',
        *[f for f in figures if f],
        "</section>",
        '<section id="tables"><h2>Tables</h2>',
        html_table(targets_rows, "Quality targets"),
        html_table([{"comparison": k, **v} for k, v in summary["headline"].items()], "Headline win rates"),
        folded_table(
            stage1,
            "Stage 1: what each embedder keeps of a user (archetype of unseen users, user identification, "
            "held-out pair accuracy of unseen users from their K shots, and on the synthetic world the cosine of "
            "a linear read of unseen users' true preference)",
        ),
        folded_table(_rows(tables["win_rates"]), "Win rates, all judges", links.get("win_rates", [])),
        folded_table(
            summary["judge_agreement"],
            "Judge agreement with held-out user labels",
            links.get("judge_agreement", []),
        ),
        folded_table(summary["monotonicity"], "Interpolation monotonicity", links.get("monotonicity", [])),
        folded_table(
            _rows(tables["win_rates_per_user"]), "Per-user win rates", links.get("win_rates_per_user", [])
        ),
        folded_table(
            [{"reward": k, "reason": v} for k, v in summary["rewards_skipped"].items()], "Rewards skipped"
        ),
        "</section>",
        '<details class="fold"><summary>Image grids of every model (rows: users; columns: held-out prompts; seed 0)</summary>',
        *[_img(p, f"model: {m}") for m, p in grids.items()],
        "</details>",
    ]
    page = (
        '<!doctype html><html><head><meta charset="utf-8"><title>PPD report</title>'
        f"<style>{STYLE}</style></head><body>{''.join(parts)}</body></html>"
    )
    path = out_dir / "report.html"
    path.write_text(page)
    return path
