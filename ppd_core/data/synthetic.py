"""The synthetic preference world (the design): users, labelled pairs and real-data quirks,
written in the exact Pick-a-Pic v2 schema, plus the ground truth that judges any image.

Users belong to a few well-separated archetypes (each weights two style attributes by +-1) plus
individual noise. A row shows one user two images of the same caption that share a base style
and differ clearly (``shift_min``..``shift_max`` std) in one or two attributes; the user prefers
image 0 with probability ``sigmoid(bt_scale * (r0 - r1))`` where ``r = weights . z(pixels)`` is the
oracle reward measured from the rendered pixels (:mod:`ppd_core.data.world_render`). Quirks
(ties, unlabeled rows, identical pairs, missing captions, duplicates, bad image bytes, reused
images) appear at the configured rates. Lessons behind these choices: the toy-world measurements.

Output of :func:`synthesize`::

    out_dir/data/part-00000.parquet ...   PICKAPIC_V2, rows sorted by created_at
    out_dir/world/users.parquet           WORLD_USERS: user id, archetype, unit weights
    out_dir/world/world.json              attributes, z-scoring stats, archetypes, captions, config

:class:`SyntheticWorld` (defined beside the renderer, re-exported here) reads ``world/`` back and
is the oracle: rewards, true preference vectors, and the attribute differences of a shot set
(the information limit of the shots).
"""

from __future__ import annotations

import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ppd_core.config import WorldConfig
from ppd_core.data.world_render import (
    ATTRIBUTES,
    CAPTIONS,
    LATENT_LIMIT,
    WORLD_DIR,
    SyntheticWorld,
    decode_jpeg,
    encode_jpeg,
    measure_attributes,
    render_images,
)
from ppd_core.errors import ConfigError
from ppd_core.schemas import PICKAPIC_V2
from ppd_core.stage import Progress, ProgressCount

__all__ = [
    "ATTRIBUTES",
    "CAPTIONS",
    "SyntheticWorld",
    "decode_jpeg",
    "encode_jpeg",
    "measure_attributes",
    "choose_archetypes",
    "preference_vectors",
    "render_images",
    "synthesize",
]

DATA_DIR = "data"
REFERENCE_IMAGES = 2048  # base-style images whose measured attributes define the z-scoring
BASE_STYLE_LIMIT = 2.5  # base latents are clipped here, leaving room for the pair shift
SESSION_SECONDS = 3600  # a user's rows come in sessions of up to an hour
ROWS_PER_SESSION = 20
MODELS = ("synthetic/painter-v1", "synthetic/painter-v2", "synthetic/sketcher-xl")
URL_PREFIX = "https://images.synthetic-pickapic.invalid/"
PROGRESS_CHUNK = 2048  # images rendered and encoded between two progress reports
QUIRKS = ("tie", "unlabeled", "identical", "missing_caption", "bad_image")  # exclusive per row
_ARCHETYPE_RESTARTS = 64


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per concern, so changing one part leaves the others alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(stream.encode())]))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    return v / np.where(norm > 0, norm, 1.0)


# ---------------------------------------------------------------------------------------------- users


def choose_archetypes(count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit preference vectors (count, A), each +-1 on two attributes, as separated as possible.

    Greedy picks from all two-attribute sign patterns (random restarts), minimising the largest
    pairwise cosine first, the norm of their sum second (a population without a shared taste, so
    one global shift, what population DPO learns, cannot stand in for personalisation), and how
    unevenly attributes are used third.
    """
    a = len(ATTRIBUTES)
    cands = []
    for i in range(a):
        for j in range(i + 1, a):
            for si in (1.0, -1.0):
                for sj in (1.0, -1.0):
                    v = np.zeros(a)
                    v[i], v[j] = si, sj
                    cands.append(v)
    cands = _unit(np.array(cands))
    if count > len(cands):  # more archetypes than patterns: add random directions
        cands = np.concatenate([cands, _unit(rng.standard_normal((count - len(cands), a)))])
    cos = cands @ cands.T
    used = (np.abs(cands) > 0).astype(np.float64)

    best, best_score = None, None
    for restart in range(_ARCHETYPE_RESTARTS):
        order = rng.permutation(len(cands))
        chosen = [int(order[0])]
        for _ in range(count - 1):
            rest = np.array([c for c in order if c not in chosen])
            worst_cos = np.round(cos[np.ix_(rest, chosen)].max(axis=1), 6)
            # half the restarts spread attributes greedily, half leave ties to the random order
            # (even spreading early can block the best-separated sets, e.g. 8 archetypes on 4 attributes)
            spread = ((used[chosen].sum(axis=0) + used[rest]) ** 2).sum(axis=1) * (restart % 2 == 0)
            chosen.append(int(rest[np.lexsort((spread, worst_cos))[0]]))
        pair_cos = cos[np.ix_(chosen, chosen)][np.triu_indices(count, 1)]
        imbalance = round(
            float(np.linalg.norm(cands[chosen].sum(axis=0))), 6
        )  # the population's shared taste
        score = (
            round(float(pair_cos.max(initial=-1.0)), 6),
            imbalance,
            float((used[chosen].sum(axis=0) ** 2).sum()),
        )
        if best_score is None or score < best_score:
            best, best_score = chosen, score
    return cands[best]


def preference_vectors(archetypes: np.ndarray, assigned: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Unit preference vectors, float64 (N, A): each one's archetype weights (``archetypes[assigned]``) plus its
    noise, normalised. The world's users are drawn with it, and the ``true_posterior`` reference draws its prior
    with it."""
    return _unit(np.asarray(archetypes, dtype=np.float64)[assigned] + noise)


def _users(cfg: WorldConfig, archetypes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user_ids int64 (U,), archetype index (U,), unit weights float64 (U, A))."""
    rng = _rng(cfg.seed, "users")
    user_ids = rng.choice(9_900_000, size=cfg.num_users, replace=False).astype(np.int64) + 100_000
    assigned = rng.permutation(np.arange(cfg.num_users) % cfg.num_archetypes)  # balanced archetypes
    noise = cfg.user_noise * rng.standard_normal((cfg.num_users, len(ATTRIBUTES)))
    # stored as float32: the labels are drawn with those
    weights = preference_vectors(archetypes, assigned, noise).astype(np.float32)
    return user_ids, assigned, weights.astype(np.float64)


def _rows_per_user(cfg: WorldConfig, rng: np.random.Generator) -> np.ndarray:
    """Long-tailed counts (log-normal with mean ``mean_pairs_per_user``, clipped)."""
    mu = np.log(cfg.mean_pairs_per_user) - cfg.pairs_per_user_sigma**2 / 2
    counts = np.rint(rng.lognormal(mu, cfg.pairs_per_user_sigma, cfg.num_users))
    return np.clip(counts, cfg.min_rows_per_user, cfg.max_rows_per_user).astype(np.int64)


def _row_times_us(cfg: WorldConfig, counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Microseconds since start_date for every row (user-major): rows come in sessions."""
    span = max(cfg.days * 86_400 - SESSION_SECONDS, 1)
    times = []
    for count in counts:
        sessions = min(int(count), 1 + int(rng.poisson(count / ROWS_PER_SESSION)))
        starts = rng.uniform(0, span, sessions)
        seconds = starts[rng.integers(sessions, size=count)] + rng.uniform(0, SESSION_SECONDS, count)
        times.append(np.floor(seconds * 1e6).astype(np.int64))
    return np.concatenate(times)


# --------------------------------------------------------------------------------------------- pairs


def _uids(rng: np.random.Generator, n: int) -> list[str]:
    """UUID-v4-looking strings from the seeded stream (never uuid4(): the world is reproducible)."""
    raw = np.frombuffer(rng.bytes(16 * n), dtype=np.uint8).reshape(n, 16).copy()
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    return [str(uuid.UUID(bytes=row.tobytes())) for row in raw]


def _shift(base: np.ndarray, rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """Move one or two random attributes by +-U(shift_min, shift_max) std, staying in range."""
    style = base.copy()
    for attr in rng.permutation(len(ATTRIBUTES))[: rng.integers(1, 3)]:
        step = rng.uniform(cfg.shift_min, cfg.shift_max) * rng.choice((-1.0, 1.0))
        if abs(style[attr] + step) > LATENT_LIMIT:  # flip rather than clip, so the pair keeps its difference
            step = -step
        style[attr] = np.clip(style[attr] + step, -LATENT_LIMIT, LATENT_LIMIT)
    return style


class _Images:
    """Registry of image slots (uid, model) and of renders (caption, style); slots may share a render."""

    def __init__(self) -> None:
        self.render_caption: list[int] = []
        self.render_style: list[np.ndarray] = []
        self.slot_render: list[int] = []
        self.slot_model: list[int] = []

    def new(self, caption: int, style: np.ndarray, model: int) -> int:
        self.render_caption.append(caption)
        self.render_style.append(style)
        return self.alias(len(self.render_style) - 1, model)

    def alias(self, render: int, model: int) -> int:
        """A new slot (new uid) showing an existing render (same bytes)."""
        self.slot_render.append(render)
        self.slot_model.append(model)
        return len(self.slot_render) - 1


def _assign_quirks(cfg: WorldConfig, n: int, rng: np.random.Generator) -> np.ndarray:
    """Exclusive quirk per row: index into QUIRKS, -1 for a clean row. Counts are round(rate * n)."""
    counts = [int(round(getattr(cfg.quirks, q) * n)) for q in QUIRKS]
    if sum(counts) > n:
        raise ConfigError(f"world.quirks: rates of {', '.join(QUIRKS)} add up to more than 1")
    quirk = np.full(n, -1, dtype=np.int64)
    quirk[rng.permutation(n)[: sum(counts)]] = np.repeat(np.arange(len(QUIRKS)), counts)
    return quirk


def _duplicate_sources(
    cfg: WorldConfig, row_user: np.ndarray, counts: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Sorted rows to repeat (round(rate * n) of them), never pushing a user past max_rows_per_user."""
    room = cfg.max_rows_per_user - counts  # (U,) rows each user can still take
    wanted, sources = int(round(cfg.quirks.duplicate * len(row_user))), []
    for row in rng.permutation(len(row_user)):
        if len(sources) == wanted:
            break
        if room[row_user[row]] > 0:
            room[row_user[row]] -= 1
            sources.append(row)
    return np.sort(np.array(sources, dtype=np.int64))


def _corrupt(jpeg: bytes, kind: int, rng: np.random.Generator) -> bytes:
    """0: empty bytes; 1: a truncated JPEG; 2: garbage that is no image at all."""
    if kind == 0:
        return b""
    if kind == 1:
        return jpeg[: len(jpeg) // 2]
    return rng.bytes(int(rng.integers(64, 256)))


# ------------------------------------------------------------------------------------------ the stage


def _reference_stats(cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Mean/std of measured attributes over base-style images: z-scores are in population-std units."""
    rng = _rng(cfg.seed, "reference")
    captions = [CAPTIONS[i] for i in rng.integers(len(CAPTIONS), size=REFERENCE_IMAGES)]
    styles = np.clip(
        rng.standard_normal((REFERENCE_IMAGES, len(ATTRIBUTES))), -BASE_STYLE_LIMIT, BASE_STYLE_LIMIT
    )
    images = render_images(captions, styles, cfg.image_size, cfg.supersample)
    raw = measure_attributes(np.stack([decode_jpeg(encode_jpeg(img)) for img in images]))
    return raw.mean(axis=0), np.maximum(raw.std(axis=0), 1e-9)


def _schedule(cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Who and when: (user index per row, microseconds since start_date, rows per user); rows in time order."""
    rng = _rng(cfg.seed, "rows")
    counts = _rows_per_user(cfg, rng)
    row_user = np.repeat(np.arange(len(counts)), counts)
    times_us = _row_times_us(cfg, counts, rng)
    order = np.lexsort((np.arange(len(times_us)), times_us))
    return row_user[order], times_us[order], counts


@dataclass
class _Pairs:
    caption: np.ndarray  # (n,) index into CAPTIONS
    slot0: np.ndarray  # (n,) image slot shown first
    slot1: np.ndarray  # (n,) image slot shown second
    reused: np.ndarray  # (n,) bool: image 0 is an earlier image of the same caption
    images: _Images


def _draw_pairs(cfg: WorldConfig, quirk: np.ndarray) -> _Pairs:
    """Per row: a base image (new, or an earlier good one of the same caption) and a shifted partner."""
    n = len(quirk)
    rng = _rng(cfg.seed, "images")
    caption = rng.integers(len(CAPTIONS), size=n)
    base = np.clip(rng.standard_normal((n, len(ATTRIBUTES))), -BASE_STYLE_LIMIT, BASE_STYLE_LIMIT)
    reuse_draw = rng.uniform(size=n)
    bad, identical = quirk == QUIRKS.index("bad_image"), quirk == QUIRKS.index("identical")
    images, pool = _Images(), {c: [] for c in range(len(CAPTIONS))}
    pairs = _Pairs(caption, np.empty(n, np.int64), np.empty(n, np.int64), np.zeros(n, bool), images)
    for i in range(n):
        c = int(caption[i])
        if reuse_draw[i] < cfg.image_reuse and not bad[i] and pool[c]:
            pairs.slot0[i], pairs.reused[i] = pool[c][int(rng.integers(len(pool[c])))], True
        else:
            pairs.slot0[i] = images.new(c, base[i], int(rng.integers(len(MODELS))))
        render0 = images.slot_render[pairs.slot0[i]]
        if identical[i]:  # same bytes under a new uid
            pairs.slot1[i] = images.alias(render0, images.slot_model[pairs.slot0[i]])
            continue
        style1 = _shift(images.render_style[render0], rng, cfg)
        pairs.slot1[i] = images.new(c, style1, int(rng.integers(len(MODELS))))
        if not bad[i]:  # only good images are reused: a uid never has two byte strings
            pool[c].extend(
                [int(pairs.slot1[i])] if pairs.reused[i] else [int(pairs.slot0[i]), int(pairs.slot1[i])]
            )
    return pairs


def _labels(cfg: WorldConfig, r0: np.ndarray, r1: np.ndarray, quirk: np.ndarray) -> tuple[np.ndarray, ...]:
    """Bradley-Terry on the oracle rewards, then ties and unlabeled rows: (label_0, label_1, has_label)."""
    p0 = 1.0 / (1.0 + np.exp(-cfg.bt_scale * (r0 - r1)))  # P(image 0 preferred)
    label_0 = (_rng(cfg.seed, "labels").uniform(size=len(p0)) < p0).astype(np.float64)
    label_0[quirk == QUIRKS.index("tie")] = 0.5
    has_label = quirk != QUIRKS.index("unlabeled")
    label_0[~has_label] = 0.0
    label_1 = np.where(has_label, 1.0 - label_0, 0.0)
    return label_0, label_1, has_label


def _pickapic_table(
    cfg: WorldConfig,
    user_ids: np.ndarray,
    row_user: np.ndarray,
    times_us: np.ndarray,
    quirk: np.ndarray,
    pairs: _Pairs,
    jpegs: list[bytes],
    labels: tuple[np.ndarray, ...],
) -> pa.Table:
    """The rows in PICKAPIC_V2 column order, with captions and image bytes damaged where the quirks say."""
    n = len(row_user)
    rng = _rng(cfg.seed, "metadata")
    label_0, label_1, has_label = labels
    uids = _uids(_rng(cfg.seed, "uids"), len(pairs.images.slot_render))
    uid0, uid1 = [uids[s] for s in pairs.slot0], [uids[s] for s in pairs.slot1]
    best = [u1 if lab == 0.0 else u0 for u0, u1, lab in zip(uid0, uid1, label_0, strict=True)]
    best = [b if has else "" for b, has in zip(best, has_label, strict=True)]  # ties: image 0's uid

    captions: list[str | None] = [CAPTIONS[c] for c in pairs.caption]
    for k, i in enumerate(np.flatnonzero(quirk == QUIRKS.index("missing_caption"))):
        captions[i] = None if k % 2 == 0 else ""
    slot_render, slot_model = np.array(pairs.images.slot_render), np.array(pairs.images.slot_model)
    jpg = [[jpegs[r] for r in slot_render[pairs.slot0]], [jpegs[r] for r in slot_render[pairs.slot1]]]
    for k, i in enumerate(np.flatnonzero(quirk == QUIRKS.index("bad_image"))):
        kind = 0 if k % 2 == 0 else (1 if k % 4 == 1 else 2)  # half empty, half truncated or garbage
        side = int(rng.integers(2))
        jpg[side][i] = _corrupt(jpg[side][i], kind, rng)

    columns = {
        "are_different": quirk != QUIRKS.index("identical"),
        "best_image_uid": best,
        "caption": captions,
        "created_at": np.datetime64(cfg.start_date, "ns").astype(np.int64) + times_us * 1000,
        "has_label": has_label,
        "image_0_uid": uid0,
        "image_0_url": [f"{URL_PREFIX}{u}.jpg" for u in uid0],
        "image_1_uid": uid1,
        "image_1_url": [f"{URL_PREFIX}{u}.jpg" for u in uid1],
        "jpg_0": jpg[0],
        "jpg_1": jpg[1],
        "label_0": label_0,
        "label_1": label_1,
        "model_0": [MODELS[m] for m in slot_model[pairs.slot0]],
        "model_1": [MODELS[m] for m in slot_model[pairs.slot1]],
        "ranking_id": 100_000 + np.cumsum(rng.integers(1, 40, size=n)),  # increasing with time
        "user_id": user_ids[row_user],
        "num_example_per_prompt": rng.choice(np.array([1, 2], dtype=np.int64), size=n, p=[0.3, 0.7]),
        "__index_level_0__": np.arange(n, dtype=np.int64),
    }
    return pa.Table.from_arrays(
        [pa.array(columns[f.name], type=f.type) for f in PICKAPIC_V2], schema=PICKAPIC_V2
    )


def synthesize(cfg: WorldConfig, out_dir: Path, progress: Progress | None = None) -> dict:
    """Write the world's Pick-a-Pic v2 shards and ground truth under ``out_dir``; return counts.
    ``progress(done, total)`` counts the images rendered and encoded, a chunk at a time."""
    out_dir = Path(out_dir)
    archetypes = choose_archetypes(cfg.num_archetypes, _rng(cfg.seed, "archetypes"))
    user_ids, user_archetype, user_weights = _users(cfg, archetypes)
    world = SyntheticWorld(user_ids, user_archetype, user_weights, archetypes, *_reference_stats(cfg), cfg)

    row_user, times_us, counts = _schedule(cfg)
    quirk = _assign_quirks(cfg, len(row_user), _rng(cfg.seed, "quirks"))
    pairs = _draw_pairs(cfg, quirk)

    # render each unique image once, encode it, and score the decoded pixels the files will carry
    images = pairs.images
    captions, styles = [CAPTIONS[c] for c in images.render_caption], np.array(images.render_style)
    rendered = ProgressCount(progress, len(captions))
    jpegs = []
    for start in range(
        0, len(captions), PROGRESS_CHUNK
    ):  # each image is drawn on its own: chunks change nothing
        stop = start + PROGRESS_CHUNK
        pixels = render_images(captions[start:stop], styles[start:stop], cfg.image_size, cfg.supersample)
        jpegs += [encode_jpeg(img) for img in pixels]
        rendered.add(len(pixels))
    z = world.standardise(measure_attributes(np.stack([decode_jpeg(b) for b in jpegs])))  # (R, A)
    slot_render = np.array(images.slot_render)
    r0 = np.einsum("na,na->n", user_weights[row_user], z[slot_render[pairs.slot0]])  # (n,) oracle rewards
    r1 = np.einsum("na,na->n", user_weights[row_user], z[slot_render[pairs.slot1]])
    labels = _labels(cfg, r0, r1, quirk)

    table = _pickapic_table(cfg, user_ids, row_user, times_us, quirk, pairs, jpegs, labels)
    # duplicates: exact copies (all 19 columns) right after their source, so time order holds
    sources = _duplicate_sources(cfg, row_user, counts, _rng(cfg.seed, "duplicates"))
    table = table.take(np.sort(np.concatenate([np.arange(len(row_user)), sources]), kind="stable"))

    data_dir = out_dir / DATA_DIR
    data_dir.mkdir(parents=True, exist_ok=True)
    starts = range(0, table.num_rows, cfg.rows_per_file)
    for part, start in enumerate(starts):
        pq.write_table(
            table.slice(start, cfg.rows_per_file),
            data_dir / f"part-{part:05d}.parquet",
            row_group_size=cfg.row_group_rows,
            compression="snappy",
        )
    world.save(out_dir / WORLD_DIR)

    quirk_counts = {q: int(np.sum(quirk == k)) for k, q in enumerate(QUIRKS)}
    quirk_counts.update(duplicate=len(sources), image_reuse=int(pairs.reused.sum()))
    uid_columns = pa.concat_arrays(
        [table.column("image_0_uid").combine_chunks(), table.column("image_1_uid").combine_chunks()]
    )
    return {
        "rows": table.num_rows,
        "users": cfg.num_users,
        "files": len(starts),
        "unique_images": len(pc.unique(uid_columns)),
        "rendered_images": len(jpegs),
        "quirks": quirk_counts,
    }
