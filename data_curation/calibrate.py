"""``calibrate``: choose the dedup and decontamination thresholds for *this* embedding, by planting copies.

A similarity threshold only means something for one model and one preprocessing: the paper's 0.6 is for
SSCD descriptors, where unrelated images sit near 0; the CLS features of a DINO model can put every pair
of photos above 0.9. So instead of trusting a number, the stage measures:

1. **Plant.** ``n_samples`` random pool images are copied once each with a near-copy transform of the
   kinds in ``calibrate.kinds``, assigned in turn (:mod:`dinov2.data.copy_augmentations`: crops of
   50–90 % of the area, mirror images, JPEG q20–60, colour jitter, small rotations, text / box overlays,
   and ``combo`` — several at once).
2. **Embed** the copies with the pool's own model, preprocessing and descriptor (the settings the embed
   stage recorded in ``embed_info.json``; its PCA-whitening too) and round them to the pool's storage
   dtype, so a copy is compared with its original exactly as a duplicate in the pool would be.
3. **Score.** Positives: the cosine of each copy with its original. Negatives: the ``k`` nearest pool
   images of each copy other than its original — the most similar images there are that are not it.
4. **Estimate precision** for a pool in which a fraction ρ (``duplicate_fraction``) of the images is a
   copy of another one: at threshold t, ρN·r(t) true pairs (r: recall of the planted copies) against
   N·c(t)/2 false pairs, where c(t) counts, per copy, the neighbours above t that dedup would wrongly
   join to its original's group — those not already joined to the original itself at t (a pool image
   the original is linked to is in its group anyway: a natural duplicate of it is not counted as a
   mistake, so duplicates already in the pool do not make the estimate pessimistic); each false pair
   has two ends, hence the 1/2: ``precision(t) = ρ r / (ρ r + c / 2)``. The dedup threshold is the
   lowest t from which the estimated precision stays at or above ``target_precision``; when no t
   reaches it the stage says so (``dedup.threshold=auto`` then stops with that message rather than guess).
5. **Decontamination** (when ``decontaminate.eval_sets`` are set): copies of evaluation images against
   their originals (positives) and against the other evaluation images not linked to the original
   (negatives); a pool image is flagged by mistake when some unrelated evaluation image is above t, at
   the rate q(t) the copies show: ``precision(t) = ρ r / (ρ r + (1 - ρ) q)`` with ρ =
   ``contamination_fraction``.

Copies are degraded images (a JPEG at quality 20, a half crop), so their false-link rate is, if
anything, higher than the pool's own: the estimate errs on the strict side.

Outputs (``<workdir>/calibrate/``): ``report.json`` (chosen thresholds; precision / recall per threshold,
overall and per copy kind), ``report.md``, ``similarities.png`` (histograms of copy pairs vs nearest
non-copies, with the chosen thresholds), ``copies.png`` (examples of what was planted), ``DONE``.
``dedup.threshold=auto`` / ``decontaminate.threshold=auto`` read it, running the stage first when it is
missing or stale (:func:`resolved_threshold`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from data_curation import embeddings as emb_io
from data_curation.atomic import write_json, write_text
from data_curation.config import CurationConfig, EmbedConfig
from data_curation.embed import PLAN_FILE, Preprocess, descriptor_model, load_model, model_fingerprint
from data_curation.errors import CurationError
from data_curation.images import RowImages, embed_config_of
from data_curation.index import index_from_config, search
from data_curation.plots import contact_sheet, similarity_histograms
from data_curation.whitening import WHITENING_FILE, Whitening
from data_curation.workdir import fingerprint, read_done, resolve_path, run_stage

log = logging.getLogger(__name__)

GRID = np.round(np.arange(0.0, 1.0, 0.001), 3)  # candidate thresholds
REPORT_STEP = 10  # report.json lists every 10th grid threshold (0.01 apart) and the ±0.01 around a choice


# ------------------------------------------------------------------------------------- estimation
@dataclass
class Curve:
    """Recall and estimated precision of a detector ``sim > t`` at each ``GRID`` threshold."""

    recall: np.ndarray  # fraction of the planted copies found
    false_rate: np.ndarray  # dedup: non-copy neighbours above t per image; decontaminate: fraction of images flagged
    precision: np.ndarray  # estimated for the assumed fraction of copies (nan where nothing is found)


def fraction_above(values: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """For each threshold of ``grid``: the fraction of ``values`` strictly above it."""
    values = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if values.size == 0:
        return np.zeros(len(grid))
    return 1.0 - np.searchsorted(values, grid, side="right") / values.size


def unlinked_above(to_copy: np.ndarray, to_original: np.ndarray, grid: np.ndarray = GRID) -> np.ndarray:
    """``(copies, grid)`` counts: for each copy and threshold t, its neighbours with ``to_copy > t`` (linked
    to the copy) and ``to_original <= t`` (not linked to its original). Both inputs are ``(copies, k)``
    similarities of the copy's k nearest neighbours (its original excluded; -inf pads missing ones)."""
    a = np.asarray(to_copy, dtype=np.float64)[..., None]
    b = np.asarray(to_original, dtype=np.float64)[..., None]
    return ((a > grid) & (b <= grid)).sum(axis=1)


def dedup_curve(positive: np.ndarray, to_copy: np.ndarray, to_original: np.ndarray, duplicate_fraction: float) -> Curve:
    """``precision = ρ r / (ρ r + c / 2)`` (module docstring, step 4), ``c`` the mean of :func:`unlinked_above`."""
    rho = duplicate_fraction
    recall = fraction_above(positive)
    false_links = unlinked_above(to_copy, to_original).mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = rho * recall / (rho * recall + false_links / 2)
    return Curve(recall, false_links, precision)


def decontaminate_curve(
    positive: np.ndarray, to_copy: np.ndarray, to_original: np.ndarray, contamination_fraction: float
) -> Curve:
    """``precision = ρ r / (ρ r + (1 - ρ) q)`` (module docstring, step 5), ``q`` the fraction of copies with an
    unlinked evaluation image above the threshold."""
    rho = contamination_fraction
    recall = fraction_above(positive)
    flagged = (unlinked_above(to_copy, to_original) > 0).mean(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = rho * recall / (rho * recall + (1 - rho) * flagged)
    return Curve(recall, flagged, precision)


def choose_threshold(curve: Curve, target: float) -> int | None:
    """Index into ``GRID`` of the lowest threshold from which the precision stays >= ``target`` wherever
    something is detected, with at least one planted copy found there; None when there is none."""
    detected = (curve.recall > 0) | (curve.false_rate > 0)
    ok = ~detected | (np.nan_to_num(curve.precision, nan=0.0) >= target)
    tail_ok = np.flip(np.logical_and.accumulate(np.flip(ok)))  # ok at this threshold and every higher one
    candidates = np.flatnonzero(tail_ok & (curve.recall > 0))
    return int(candidates[0]) if candidates.size else None


def _row(curve: Curve, i: int, per_kind: dict[str, Curve]) -> dict[str, Any]:
    p = curve.precision[i]
    return {
        "threshold": float(GRID[i]),
        "precision": None if np.isnan(p) else round(float(p), 4),
        "recall": round(float(curve.recall[i]), 4),
        "false_rate": round(float(curve.false_rate[i]), 5),
        "per_kind": {
            kind: {
                "precision": None if np.isnan(c.precision[i]) else round(float(c.precision[i]), 4),
                "recall": round(float(c.recall[i]), 4),
            }
            for kind, c in per_kind.items()
        },
    }


def summarize(curve: Curve, per_kind: dict[str, Curve], target: float, what: str) -> dict[str, Any]:
    """The chosen threshold (or why there is none) and the precision / recall table around it."""
    chosen = choose_threshold(curve, target)
    rows = set(range(0, len(GRID), REPORT_STEP))
    if chosen is not None:
        rows |= set(range(max(0, chosen - REPORT_STEP), min(len(GRID), chosen + REPORT_STEP + 1)))
    precision = np.nan_to_num(curve.precision, nan=-1.0)
    best = int(np.argmax(np.where(curve.recall > 0, precision, -1.0)))
    out = {
        "what": what,
        "target_precision": target,
        "threshold": None if chosen is None else float(GRID[chosen]),
        "at_threshold": None if chosen is None else _row(curve, chosen, per_kind),
        "best_precision": round(float(precision[best]), 4) if curve.recall[best] > 0 else None,
        "best_precision_threshold": float(GRID[best]),
        "table": [_row(curve, i, per_kind) for i in sorted(rows)],
    }
    return out


# ------------------------------------------------------------------------------------- embedding
class _Images:
    """A list of PIL images as a dataset of ``(image, 0)`` for ``extract_features``."""

    def __init__(self, images: list[Any]):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.images[i], 0


def check_same_model(emb_dir: Path, e: EmbedConfig) -> None:
    """Stop when the model file changed since ``emb_dir`` was embedded (copies would be embedded differently)."""
    plan = json.loads((emb_dir / PLAN_FILE).read_text())
    if model_fingerprint(e.model) != plan["settings"]["model"]:
        raise CurationError(
            f"the model {e.model.path} changed since {emb_dir} was embedded: re-run embed (--force) before calibrating"
        )


def embed_like(emb_dir: Path, images: list[Any], progress: bool = False) -> np.ndarray:
    """``images`` embedded exactly as the rows of ``emb_dir`` (model, preprocessing, descriptor,
    whitening, storage dtype): float32 ``(len(images), dim)``, L2-normalised."""

    from dinov2.device import amp_dtype, resolve_device  # lazy: torch (~2 s); curation modules import without it
    from dinov2.eval.features import extract_features

    e = embed_config_of(emb_dir)
    check_same_model(emb_dir, e)
    device = resolve_device(e.device or "auto")
    model = load_model(e.model, device)
    pre = Preprocess.resolve(e, model)
    feats, _ = extract_features(
        descriptor_model(model, e),
        _Images(images),
        transform=pre.transform(),
        batch_size=e.batch_size,
        device=device,
        amp_dtype=amp_dtype(e.amp, device),
        normalize=True,
        flip_average=e.flip_average,
        progress=progress,
    )
    x = feats.numpy()
    if e.whiten:
        x = Whitening.load(emb_dir / WHITENING_FILE).apply(x)
    dtype = emb_io.read_meta(emb_dir)["dtype"]
    return emb_io.l2_normalize(x).astype(dtype).astype(np.float32)


def plant_copies(
    source: RowImages, rows: np.ndarray, kinds: list[str], transforms: Any, seed: int
) -> tuple[list[Any], list[Any], list[str]]:
    """(originals, copies, kind of each copy): one copy per row, kinds assigned in turn."""
    from dinov2.data.copy_augmentations import make_copy  # lazy: torch (~2 s); curation modules import without it

    rng = np.random.default_rng(seed)
    originals, copies, copy_kinds = [], [], []
    for n, row in enumerate(rows):
        image = source.load(int(row))
        kind = kinds[n % len(kinds)]
        originals.append(image)
        copies.append(make_copy(image, kind, transforms, rng))
        copy_kinds.append(kind)
    return originals, copies, copy_kinds


# ------------------------------------------------------------------------------------------ stage
def copy_neighbours(
    index: Any, base: np.ndarray, copies: np.ndarray, originals: np.ndarray, k: int, batch: int
) -> tuple[np.ndarray, np.ndarray]:
    """For each copy, its ``k`` nearest rows of ``base`` other than its original (row ``originals[i]``):
    ``(to_copy, to_original)``, each ``(copies, k)``: their similarity to the copy and to the original
    (-inf where fewer than ``k`` rows exist)."""
    sims, ids = search(index, copies, k + 1, batch_size=batch)
    to_copy = np.full((len(copies), k), -np.inf)
    to_original = np.full((len(copies), k), -np.inf)
    for i in range(len(copies)):
        keep = (ids[i] != originals[i]) & (ids[i] >= 0)
        found, rows = sims[i][keep][:k], ids[i][keep][:k]
        to_copy[i, : len(found)] = found
        to_original[i, : len(found)] = np.asarray(base[rows], dtype=np.float32) @ np.asarray(
            base[originals[i]], dtype=np.float32
        )
    return to_copy, to_original


def _calibrate_dedup(cfg: CurationConfig, emb_dir: Path) -> tuple[dict[str, Any], dict, list[tuple[str, list[Any]]]]:
    c = cfg.calibrate
    x, _ = emb_io.load_embeddings(emb_dir)
    pool = np.flatnonzero(emb_io.valid_rows(x))
    if len(pool) < 3:
        raise CurationError(f"calibrate needs at least 3 usable embeddings in {emb_dir}, found {len(pool)}")
    rng = np.random.default_rng(c.seed)
    rows = np.sort(rng.choice(pool, size=min(c.n_samples, len(pool)), replace=False))
    originals, copies, kinds = plant_copies(RowImages(emb_dir), rows, list(c.kinds), c.transforms, c.seed + 1)
    log.info("calibrate: %d copies planted (%s), embedding them like the pool", len(copies), ", ".join(c.kinds))
    y = embed_like(emb_dir, copies, progress=cfg.progress)
    positive = np.einsum("nd,nd->n", y, np.asarray(x[rows], dtype=np.float32))
    pool_x = x if len(pool) == len(x) else x[pool]
    local = np.searchsorted(pool, rows)  # the sampled rows' positions in pool_x
    k = min(c.k, len(pool) - 1)
    index = index_from_config(pool_x, cfg.index)
    to_copy, to_original = copy_neighbours(index, pool_x, y, local, k, cfg.index.batch_size)
    rho, kinds_arr = c.duplicate_fraction, np.asarray(kinds)
    curve = dedup_curve(positive, to_copy, to_original, rho)
    per_kind = {kind: dedup_curve(positive[kinds_arr == kind], to_copy, to_original, rho) for kind in c.kinds}
    summary = summarize(curve, per_kind, c.target_precision, "dedup: planted copies vs their nearest other pool images")
    summary.update({"n_copies": len(rows), "k": k, "duplicate_fraction": rho})
    series = {"copy ↔ its original": positive, "copy ↔ nearest other image": to_copy[:, 0]}
    examples = []
    for kind in c.kinds:
        idx = np.flatnonzero(kinds_arr == kind)[:4]
        sims = " ".join(f"{positive[i]:.2f}" for i in idx)
        examples.append((f"{kind}\noriginal | copy\ncos {sims}", [im for i in idx for im in (originals[i], copies[i])]))
    return summary, series, examples


def _calibrate_decontaminate(cfg: CurationConfig, workdir: Path, emb_dir: Path) -> tuple[dict[str, Any], dict]:
    c = cfg.calibrate
    pool_plan = json.loads((emb_dir / PLAN_FILE).read_text())["settings"]
    rng = np.random.default_rng(c.seed + 2)
    positives, kinds, to_copy, to_original = [], [], [], []
    for eval_dir in (resolve_path(workdir, p) for p in cfg.decontaminate.eval_sets):
        plan_file = eval_dir / PLAN_FILE
        eval_plan = json.loads(plan_file.read_text())["settings"] if plan_file.is_file() else {}
        if (eval_plan.get("model"), eval_plan.get("feature")) != (pool_plan["model"], pool_plan["feature"]):
            raise CurationError(
                f"{eval_dir} was not embedded with the pool's model and descriptor: embed it the same way"
            )
        eval_x, _ = emb_io.load_embeddings(eval_dir)
        eval_rows = np.flatnonzero(emb_io.valid_rows(eval_x))
        if len(eval_rows) < 2:
            raise CurationError(f"calibrate needs at least 2 usable evaluation embeddings in {eval_dir}")
        rows = np.sort(rng.choice(eval_rows, size=min(c.n_eval_samples, len(eval_rows)), replace=False))
        _, copies, copy_kinds = plant_copies(RowImages(eval_dir), rows, list(c.kinds), c.transforms, c.seed + 3)
        y = embed_like(eval_dir, copies, progress=cfg.progress)
        positives.append(np.einsum("nd,nd->n", y, np.asarray(eval_x[rows], dtype=np.float32)))
        kinds.extend(copy_kinds)
        k = min(c.k, len(eval_x) - 1)
        a, b = copy_neighbours(index_from_config(eval_x, cfg.index), eval_x, y, rows, k, cfg.index.batch_size)
        to_copy.append(np.pad(a, ((0, 0), (0, c.k - k)), constant_values=-np.inf))
        to_original.append(np.pad(b, ((0, 0), (0, c.k - k)), constant_values=-np.inf))
    positive, kinds_arr = np.concatenate(positives), np.asarray(kinds)
    to_copy, to_original = np.concatenate(to_copy), np.concatenate(to_original)
    rho = c.contamination_fraction
    curve = decontaminate_curve(positive, to_copy, to_original, rho)
    per_kind = {kind: decontaminate_curve(positive[kinds_arr == kind], to_copy, to_original, rho) for kind in c.kinds}
    what = "decontaminate: copies of evaluation images vs their nearest other evaluation images"
    summary = summarize(curve, per_kind, c.target_precision, what)
    summary.update({"n_copies": len(positive), "contamination_fraction": rho})
    return summary, {"eval copy ↔ its original": positive, "eval copy ↔ nearest other eval image": to_copy[:, 0]}


def calibrate_fingerprint(workdir: Path, cfg: CurationConfig) -> str:
    emb_dir = resolve_path(workdir, cfg.embeddings)
    eval_dirs = [resolve_path(workdir, p) for p in cfg.decontaminate.eval_sets]
    return fingerprint(
        "calibrate",
        emb_io.embeddings_fingerprint(emb_dir),
        [emb_io.embeddings_fingerprint(p) for p in eval_dirs],
        cfg.calibrate,
        cfg.index.backend,
    )


def _check(cfg: CurationConfig) -> None:
    from dinov2.data.copy_augmentations import check_kinds  # lazy: torch (~2 s); curation modules import without it

    c = cfg.calibrate
    try:
        check_kinds(c.kinds)
    except ValueError as e:
        raise CurationError(f"calibrate.kinds: {e}") from None
    if c.n_samples < 1 or c.k < 1:
        raise CurationError("calibrate.n_samples and calibrate.k must be at least 1")
    if not 0 < c.target_precision < 1:
        raise CurationError(f"calibrate.target_precision must be in (0, 1), got {c.target_precision}")
    for name in ("duplicate_fraction", "contamination_fraction"):
        if not 0 < getattr(c, name) < 1:
            raise CurationError(f"calibrate.{name} must be in (0, 1), got {getattr(c, name)}")


def run_calibrate(workdir: str | Path, cfg: CurationConfig | None = None, force: bool = False) -> dict[str, Any]:
    """The ``calibrate`` stage (see the module docstring)."""
    cfg = cfg or CurationConfig()
    workdir = Path(workdir)
    _check(cfg)
    emb_dir = resolve_path(workdir, cfg.embeddings)
    fp = calibrate_fingerprint(workdir, cfg)

    def compute(out: Path) -> dict[str, Any]:
        dedup, series, examples = _calibrate_dedup(cfg, emb_dir)
        target = cfg.calibrate.target_precision
        panels = [(f"dedup (target precision {target})", series, dedup["threshold"])]
        decontaminate = None
        if cfg.decontaminate.eval_sets:
            decontaminate, eval_series = _calibrate_decontaminate(cfg, workdir, emb_dir)
            panels.append((f"decontaminate (target precision {target})", eval_series, decontaminate["threshold"]))
        similarity_histograms(out / "similarities.png", panels)
        contact_sheet(out / "copies.png", examples, thumb=48, label_width=150)
        report = {"dedup": dedup, "decontaminate": decontaminate}
        write_json(out / "report.json", report)
        write_text(out / "report.md", report_markdown(report))
        for name, part in report.items():
            if part is not None:
                log.info("calibrate: %s", headline(name, part))
        return {
            name: None
            if part is None
            else {
                k: part[k]
                for k in ("threshold", "target_precision", "best_precision", "best_precision_threshold", "at_threshold")
            }
            for name, part in report.items()
        }

    return run_stage(workdir, "calibrate", fp, compute, force)


def headline(stage: str, part: dict[str, Any]) -> str:
    """One line: the chosen threshold and its estimated precision / recall, or why there is none."""
    if part["threshold"] is None:
        best = part["best_precision"]
        return (
            f"{stage}: no threshold reaches precision {part['target_precision']} on this embedding (best "
            f"{'none' if best is None else f'{best:.2f}'} at {part['best_precision_threshold']:.3f})"
        )
    at = part["at_threshold"]
    estimate = f"estimated precision {at['precision']:.3f}, recall {at['recall']:.3f}"
    return f"{stage}: threshold {part['threshold']:.3f} ({estimate})"


def report_markdown(report: dict[str, Any]) -> str:
    lines = ["# Calibration", ""]
    for name, part in report.items():
        if part is None:
            continue
        lines += [f"## {name}", "", part["what"], "", f"**{headline(name, part)}**", ""]
        kinds = list(part["table"][0]["per_kind"]) if part["table"] else []
        lines.append("| threshold | precision | recall | " + " | ".join(f"{k} P / R" for k in kinds) + " |")
        lines.append("|---:|---:|---:|" + "---:|" * len(kinds))
        for row in part["table"]:
            fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            cells = [f"{fmt(row['per_kind'][k]['precision'])} / {fmt(row['per_kind'][k]['recall'])}" for k in kinds]
            mark = " ←" if row["threshold"] == part["threshold"] else ""
            lines.append(
                f"| {row['threshold']:.3f}{mark} | {fmt(row['precision'])} | {fmt(row['recall'])} | "
                + " | ".join(cells)
                + " |"
            )
        lines.append("")
    lines += ["![similarities](similarities.png)", "", "![planted copies](copies.png)", ""]
    return "\n".join(lines)


def resolved_threshold(workdir: str | Path, cfg: CurationConfig, stage: str) -> float:
    """``{stage}.threshold`` as a number: as set, or for ``auto`` the one ``calibrate`` chose (run first
    when missing or stale). Stops with one line when calibration found no threshold."""
    value = getattr(cfg, stage).threshold
    if value != "auto":
        value = float(value)
        if not -1.0 <= value <= 1.0:
            raise CurationError(f"{stage}.threshold must be a cosine similarity in [-1, 1] or auto, got {value}")
        return value
    workdir = Path(workdir)
    done = read_done(workdir, "calibrate")
    if done is None or done.get("fingerprint") != calibrate_fingerprint(workdir, cfg):
        log.info("%s.threshold=auto: running calibrate first", stage)
    summary = run_calibrate(workdir, cfg)
    part = summary.get(stage)
    if part is None:
        raise CurationError(f"{stage}.threshold=auto but calibrate has no {stage} result (no evaluation sets?)")
    if part["threshold"] is None:
        raise CurationError(
            f"{stage}.threshold=auto: {headline(stage, part).split(': ', 1)[1]}; embed with a copy-detection "
            f"descriptor (configs/train/copy_detection.yaml, or embed.model.kind=torchscript), lower "
            f"calibrate.target_precision, or set {stage}.threshold by hand (see {workdir}/calibrate/report.md)"
        )
    log.info("%s.threshold=auto -> %s", stage, headline(stage, part))
    return float(part["threshold"])
