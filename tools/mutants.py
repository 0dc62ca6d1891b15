"""``make mutants``: plant realistic bugs one at a time in a scratch copy and check the fast tests catch them.

A hand-written catalogue of semantic mutations of the recipe (meta-architecture, losses' wiring), the
trainer, checkpointing, the data pipeline and curation — the bugs we fear, not random operator swaps.
Each is a unique text replacement in one file of a scratch copy of the working tree (``/tmp``; the
checkout is never touched); the tests that should see it run there (``-x``, never ``slow``, ``slurm``
or ``gpu``). A mutant is *caught* when one of them fails; the table names the first failing test.

    python tools/mutants.py                 # the whole catalogue, table on stdout
    python tools/mutants.py --only ema-before-step,teacher-at-student-temp
    python tools/mutants.py --baseline      # first: the selected tests pass on the unmutated copy
    python tools/mutants.py --markdown docs/TESTING.md   # also rewrite the table there (dated)

A mutation whose text no longer occurs in the code is reported ``stale`` (the code moved: update the
catalogue), never counted as caught.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # benchmarks.tables (stdlib only)

from benchmarks.tables import update_markdown  # noqa: E402

FAST = "not slow and not slurm and not gpu"

WIRING = ["tests/test_wiring.py"]
RESUME = [
    "tests/test_resume.py::test_stopped_and_resumed_run_equals_the_uninterrupted_one",
    "tests/test_resume.py::test_resume_at_another_global_batch_continues_the_sample_stream",
]
MASKS = [
    "tests/test_data.py::test_masking_generator_usually_hits_its_target_exactly",
    "tests/test_data.py::test_mask_statistics",
    "tests/test_data.py::test_masking_generator_never_exceeds_its_target_and_is_reproducible",
]
EMA = ["tests/test_train.py::test_teacher_starts_equal_gets_no_grad_and_follows_ema"]
SKIPS = [
    "tests/test_data.py::test_collate_counts_every_skip_event_of_the_batch",
    "tests/test_data.py::test_loader_over_bad_files_keeps_batch_size_and_reports_skips",
    "tests/test_train.py::test_folder_with_corrupt_files_trains_and_reports",
]
SAMPLER = [
    "tests/test_data.py::test_sampler_resume_equals_uninterrupted_stream",
    "tests/test_data.py::test_sampler_shards_are_disjoint_and_cover_each_epoch",
    "tests/test_data.py::test_loader_ranks_split_the_global_batch",
    "tests/test_data.py::test_loader_resume_is_bit_identical",
]
COLLATE = ["tests/test_data.py::test_collate_is_view_major_with_consistent_masks"]
CURATION = ["tests/test_curation_core.py"]


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # file in the repository
    old: str  # the text replaced (it must occur exactly once, else the mutant is reported stale)
    new: str
    tests: tuple[str, ...]
    what: str  # one line for the table


def m(name: str, path: str, old: str, new: str, tests: list[str], what: str) -> Mutant:
    return Mutant(name, path, old, new, tuple(tests), what)


IBOT_CALL = 'parts["ibot"] = self.ibot_loss(ibot_logits, ibot_targets, batch["mask_weights"], n_global)'
# the centre's update is unconditional (a no-op under Sinkhorn-Knopp)
TARGETS = (
    "        dino_targets = self.dino_center(dino_logits, teacher_temp)\n"
    "        ibot_targets = self.ibot_center(ibot_logits, teacher_temp)\n"
)
UPDATES = (
    "        self.dino_center.update(dino_logits)  # the softmax centre's EMA; nothing under Sinkhorn-Knopp\n"
    "        self.ibot_center.update(ibot_logits)\n"
)


def ibot_normaliser(normaliser: str) -> tuple[str, str]:
    """The iBOT loss divided by ``normaliser`` instead of the 2B global crops."""
    return IBOT_CALL, IBOT_CALL.replace("n_global)", f"{normaliser})")


META = "dinov2/train/meta_arch.py"
TRAINER = "dinov2/train/trainer.py"
CKPT = "dinov2/train/checkpoint.py"

CATALOGUE: list[Mutant] = [
    # ------------------------------------------------------------------ recipe: meta_arch.py
    m("teacher-at-student-temp", META,
      "dino_targets = self.dino_center(dino_logits, teacher_temp)\n"
      "        ibot_targets = self.ibot_center(ibot_logits, teacher_temp)",
      "dino_targets = self.dino_center(dino_logits, self.loss_cfg.student_temp)\n"
      "        ibot_targets = self.ibot_center(ibot_logits, self.loss_cfg.student_temp)",
      WIRING, "teacher targets made at the student temperature"),
    m("student-unmasked", META,
      "outs = student.backbone(crops, [masks if self.student_masks else None] + [None] * (len(crops) - 1))",
      "outs = student.backbone(crops, [None] * len(crops))",
      WIRING, "student fed unmasked global crops (no mask tokens)"),
    m("ibot-norm-masked-patches", META, *ibot_normaliser("masks.sum()"),
      WIRING, "iBOT normaliser: number of masked patches"),
    m("ibot-norm-batch", META, *ibot_normaliser("masks.shape[0] // 2"),
      WIRING, "iBOT normaliser: B images"),
    m("ibot-norm-other-convention", META, *ibot_normaliser("masks.any(dim=1).sum()"),
      WIRING, "iBOT normaliser: the masked images (the other convention; the reference divides by all 2B)"),
    m("koleo-both-views-at-once", META,
      "sum(self.koleo_loss(view) for view in global_cls.chunk(2))", "self.koleo_loss(global_cls)",
      WIRING, "KoLeo over both global views together, not per view"),
    m("koleo-weight-ignored", META,
      'loss = loss + cfg.koleo_weight * parts["koleo"]', 'loss = loss + parts["koleo"]',
      WIRING, "KoLeo term added without its weight"),
    m("ibot-weight-ignored", META,
      'loss = loss + cfg.ibot_weight * parts["ibot"]', 'loss = loss + parts["ibot"]',
      WIRING, "iBOT term added without its weight"),
    m("local-crops-dropped", META,
      "student_local = student_local.reshape(-1, batch_size, k) if has_local else None",
      "student_local = None",
      WIRING, "local crops left out of the DINO loss"),
    m("teacher-views-sample-major", META,
      "dino_logits = dino_logits.reshape(2, -1, dino_logits.shape[-1])",
      "dino_logits = dino_logits.reshape(-1, 2, dino_logits.shape[-1]).transpose(0, 1)",
      WIRING, "teacher views split sample-major (targets paired with the wrong crops)"),
    m("centre-updated-before-targets", META, TARGETS + UPDATES, UPDATES + TARGETS,
      WIRING, "softmax centre updated with this batch before its targets"),
    m("ibot-uses-dino-centre", META,
      "ibot_targets = self.ibot_center(ibot_logits, teacher_temp)",
      "ibot_targets = self.dino_center(ibot_logits, teacher_temp)",
      WIRING, "iBOT targets centred with the DINO centre"),
    m("ema-weights-swapped", META,
      "torch._foreach_mul_(dst, momentum)\n    torch._foreach_add_(dst, src, alpha=1.0 - momentum)",
      "torch._foreach_mul_(dst, 1.0 - momentum)\n    torch._foreach_add_(dst, src, alpha=momentum)",
      EMA + WIRING, "EMA with m and 1 − m swapped"),
    m("teacher-in-train-mode", META,
      "        self.teacher.eval()  # the teacher never uses stochastic depth\n        return self",
      "        return self",
      WIRING, "teacher left in train mode (stochastic depth in the teacher)"),
    # ------------------------------------------------------------------ trainer.py
    m("ema-before-step", TRAINER,
      "    optimizer.step()\n    optimizer.zero_grad(set_to_none=True)\n    model.update_ema(values.momentum)",
      "    model.update_ema(values.momentum)\n    optimizer.step()\n    optimizer.zero_grad(set_to_none=True)",
      WIRING, "EMA update moved before optimizer.step()"),
    m("no-optimizer-step", TRAINER,
      "    optimizer.step()\n    optimizer.zero_grad(set_to_none=True)",
      "    optimizer.zero_grad(set_to_none=True)",
      [*RESUME, *WIRING], "optimizer.step() skipped altogether"),
    m("no-zero-grad", TRAINER,
      "    optimizer.step()\n    optimizer.zero_grad(set_to_none=True)", "    optimizer.step()",
      [*RESUME, *WIRING], "gradients never cleared (accumulate over steps)"),
    m("last-layer-never-frozen", TRAINER,
      "last_layer_lr = 0.0 if values.freeze_last_layer else values.lr", "last_layer_lr = values.lr",
      WIRING, "prototype layer not frozen during freeze_last_layer_epochs"),
    m("resume-ignores-sample-position", TRAINER,
      "    if sample_position is not None:", "    if False:",
      RESUME, "resume ignores the saved sample position"),
    m("resume-one-iteration-late", TRAINER,
      "start, sample_position = resumed.iteration, resumed.sample_position",
      "start, sample_position = resumed.iteration + 1, resumed.sample_position",
      RESUME, "resume skips an iteration"),
    m("schedule-one-ahead", TRAINER,
      "values = schedules.at(it)", "values = schedules.at(it + 1)",
      RESUME, "schedules read one iteration ahead"),
    # ------------------------------------------------------------------ checkpoint.py
    m("rng-not-restored", CKPT,
      'rng_applies = restore_rng and progress["world_size"] == world_size() and rng_saved', "rng_applies = False",
      RESUME, "RNG state not restored on resume (stochastic depth diverges)"),
    m("optimizer-not-restored", TRAINER,
      "resumed = checkpoints.resume(model, optimizer)", "resumed = checkpoints.resume(model, None)",
      RESUME, "AdamW moments and step count not restored on resume"),
    m("checkpoint-position-per-rank", TRAINER,
      'sample_position=loader.state_dict()["position"]',
      "sample_position=done * cfg.data.batch_size_per_gpu",
      RESUME, "checkpoint stores iterations × per-rank batch as the sample position"),
    # ------------------------------------------------------------------ data
    m("mask-one-patch-short", "dinov2/data/masking.py",
      "target = min(num_masking_patches, self.num_patches)",
      "target = min(num_masking_patches, self.num_patches) - 1",
      MASKS, "each iBOT mask one patch short of its target"),
    m("mask-top-stratum-dropped", "dinov2/data/masking.py",
      "bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 1)",
      "bounds = np.linspace(ratio_min_max[0], ratio_min_max[1], n_masked + 2)",
      MASKS, "top mask-ratio stratum never drawn"),
    m("masks-not-shuffled", "dinov2/data/masking.py",
      "return masks[rng.permutation(n_crops)]", "return masks",
      MASKS, "always the first crops masked"),
    m("repeated-skips-not-counted", "dinov2/data/collate.py",
      '"num_skipped": len(skipped_paths),', '"num_skipped": len(set(skipped_paths)),',
      SKIPS, "repeated decode failures of one batch counted once"),
    m("loader-counts-skip-events", "dinov2/data/loader.py",
      "self.num_skipped = len(self.skipped_paths)", 'self.num_skipped += batch["num_skipped"]',
      SKIPS, "the run counts skip events, not bad files (a file drawn 5 times counts 5)"),
    m("sample-major-crops", "dinov2/data/collate.py",
      "torch.stack([views[v] for v in range(num_views) for views in views_per_sample])",
      "torch.stack([view for views in views_per_sample for view in views])",
      COLLATE + WIRING, "crops stacked sample-major instead of view-major"),
    m("mask-weights-per-batch", "dinov2/data/collate.py",
      "mask_weights = (1.0 / per_crop).unsqueeze(-1).expand_as(masks)[masks]",
      "mask_weights = torch.full((int(masks.sum()),), 1.0 / max(int(masks.sum()), 1))",
      COLLATE, "iBOT weights 1/(masked patches of the batch), not of the crop"),
    m("sampler-ranks-overlap", "dinov2/data/samplers.py",
      "            position += self.world_size", "            position += 1",
      SAMPLER, "every rank reads every position"),
    m("same-permutation-every-epoch", "dinov2/data/samplers.py",
      "numpy_rng(seed, STREAM_PERMUTATION, epoch).shuffle(order)",
      "numpy_rng(seed, STREAM_PERMUTATION, 0).shuffle(order)",
      SAMPLER, "one permutation reused for every epoch"),
    m("augmentation-seeded-by-index", "dinov2/data/augmented.py",
      "derive_seed(self.seed, STREAM_AUGMENTATION, position)",
      "derive_seed(self.seed, STREAM_AUGMENTATION, index)",
      ["tests/test_data.py::test_crops_are_seeded_by_stream_position_not_by_image", *SAMPLER],
      "crops seeded by dataset index: the same crops every epoch"),
    # ------------------------------------------------------------------ curation
    m("dedup-self-pairs", "data_curation/dedup.py",
      "hit = (sims > threshold) & (ids >= 0) & (ids != rows)", "hit = (sims > threshold) & (ids >= 0)",
      CURATION, "dedup keeps each image's match with itself"),
    m("dedup-keeps-last", "data_curation/dedup.py",
      "        return _first_in_order(labels, index)\n",
      "        return _first_in_order(labels, index[::-1])\n",
      CURATION, "keep rule 'first' keeps the last member"),
    m("decontaminate-only-flagged-row", "data_curation/decontaminate.py",
      "return kept[~np.isin(labels[kept], bad_components)]",
      "return kept[~np.isin(kept, flagged_rows)]",
      CURATION, "decontamination drops the flagged image but keeps its duplicates"),
    m("water-fill-remainder-anywhere", "data_curation/sample.py",
      "room = np.flatnonzero(caps > lo)", "room = np.arange(len(caps))",
      CURATION, "balanced sampling gives the remainder to full (or empty) clusters too"),
    m("water-fill-no-remainder", "data_curation/sample.py",
      "        alloc[extra] += 1\n", "        pass\n",
      CURATION, "balanced sampling drops the remainder (under budget)"),
]  # fmt: skip


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # caught | NOT caught | stale | error
    by: str
    seconds: float


def scratch_copy(root: Path) -> Path:
    """The working tree's files (tracked and untracked-not-ignored) copied under ``root``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, check=True, capture_output=True,
    ).stdout.decode().split("\0")  # fmt: skip
    dest = root / "repo"
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_tests(copy: Path, tests: tuple[str, ...], timeout: int) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-rfE", "-p", "no:cacheprovider", "-m", FAST, *tests]
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return proc.returncode, proc.stdout + proc.stderr


def first_failure(output: str) -> str:
    found = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.M)
    return found.group(1).removeprefix("tests/") if found else "?"


def run_mutant(copy: Path, mutant: Mutant, timeout: int) -> Outcome:
    target = copy / mutant.path
    original = target.read_text()
    if original.count(mutant.old) != 1:
        return Outcome(mutant, "stale", "its text is not in the code (once)", 0.0)
    target.write_text(original.replace(mutant.old, mutant.new))
    start = time.perf_counter()
    try:
        rc, output = run_tests(copy, mutant.tests, timeout)
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - start
    if rc == 1:
        return Outcome(mutant, "caught", first_failure(output), seconds)
    if rc == 0:
        return Outcome(mutant, "NOT caught", "-", seconds)
    return Outcome(mutant, "error", f"pytest rc {rc}: {output.strip().splitlines()[-1:] or ''}", seconds)


def table(outcomes: list[Outcome]) -> str:
    rows = ["| mutant | file | bug planted | result | first failing test |", "|---|---|---|---|---|"]
    for o in outcomes:
        rows.append(f"| `{o.mutant.name}` | {o.mutant.path} | {o.mutant.what} | {o.status} | {o.by} |")
    caught = sum(o.status == "caught" for o in outcomes)
    rows.append("")
    rows.append(f"**{caught} of {len(outcomes)} caught** ({100 * caught / max(len(outcomes), 1):.0f} %).")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mutants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated mutant names")
    parser.add_argument("--list", action="store_true", help="print the catalogue and exit")
    parser.add_argument("--baseline", action="store_true", help="first check the selected tests pass unmutated")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per mutant")
    parser.add_argument("--markdown", type=Path, default=None, help="rewrite the table in this file")
    args = parser.parse_args(argv)
    mutants = CATALOGUE
    if args.only:
        names = set(args.only.split(","))
        unknown = names - {mu.name for mu in CATALOGUE}
        if unknown:
            parser.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [mu for mu in CATALOGUE if mu.name in names]
    if args.list:
        for mu in mutants:
            print(f"{mu.name:34s} {mu.path:34s} {mu.what}")
        return 0
    with tempfile.TemporaryDirectory(prefix="dinov2-mutants-") as tmp:
        copy = scratch_copy(Path(tmp))
        if args.baseline:
            tests = tuple(dict.fromkeys(t for mu in mutants for t in mu.tests))
            rc, output = run_tests(copy, tests, args.timeout * 3)
            if rc != 0:
                print(f"baseline: the selected tests fail without any mutation:\n{output[-3000:]}", file=sys.stderr)
                return 1
            print(f"baseline: {len(tests)} test selections pass unmutated", flush=True)
        outcomes = []
        for mu in mutants:
            outcome = run_mutant(copy, mu, args.timeout)
            print(f"{mu.name:34s} {outcome.status:10s} {outcome.seconds:6.1f}s  {outcome.by}", flush=True)
            outcomes.append(outcome)
    report = table(outcomes)
    print("\n" + report)
    if args.markdown is not None:
        stamp = datetime.date.today().isoformat()
        update_markdown(args.markdown, "mutants", f"Run on {stamp} (`make mutants`, {sys.platform}).\n\n{report}")
    caught = sum(o.status == "caught" for o in outcomes)
    return 0 if caught >= 0.9 * len(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
