"""``kd compare``: what distillation buys, measured with identical budgets.

Runs, for each of ``--seeds`` seeds, the arms the config allows:

* ``labels``: labels only (``distill.loss=none``), on the labelled training images;
* ``kd``: the configured distillation on the labelled images only;
* ``kd+transfer``: the configured distillation with ``data.transfer_set`` (when one is set);
* with ``distill.features``: ``features`` (the feature pairs alone, from the same teacher used
  headless) and ``kd+features`` (logits and features), both with the transfer set when one is
  set (``features+transfer``, ``kd+features+transfer``).

Every arm gets the same budget: the optimizer steps of the configured run, the same batch size
(shrunk for all arms when the labelled images cannot fill one batch per rank), the same warm-up
in steps, the same augmentation and seeds; arms differ only in their data and loss. Each run is
an ordinary kd run (checkpoints, metrics, summary) in ``<out>/<arm>/seed_<seed>``; the arms are
evaluated once, at the end. The table, ``compare.json`` and ``compare.png`` give the student's
top-1 per arm: mean ± standard deviation over seeds, per-seed values and the gain over
``labels``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kd.config import KDConfig, derive, is_headless, to_yaml
from kd.core.checkpoint import atomic_write_text
from kd.core.dist import DistInfo
from kd.core.trainer import Trainer
from kd.data.pipeline import RunData, steps_per_epoch
from kd.errors import ConfigError

log = logging.getLogger("kd")

EVAL_AT_END = 10**9  # train.eval_every_epochs: evaluate once, when the budget is spent


@dataclass
class Arm:
    """One arm's results over the seeds."""

    name: str
    top1: list[float] = field(default_factory=list)
    runs: list[str] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.top1)

    @property
    def sd(self) -> float:
        return statistics.stdev(self.top1) if len(self.top1) > 1 else 0.0


def arm_overrides(cfg: KDConfig, arm: str) -> dict[str, Any]:
    """How an arm's config differs from the configured run (dotted keys). An arm's name lists
    what it keeps: ``kd`` the logit loss, ``features`` the feature pairs (with the teacher
    headless when the arm has no logit loss), ``transfer`` the transfer set."""
    parts = set(arm.split("+"))
    out: dict[str, Any] = {}
    if "kd" not in parts:
        out["distill.loss"] = "none"
    if "features" not in parts:
        out["distill.features"] = []
    elif "kd" not in parts and not is_headless(cfg.teacher):
        out["teacher.kwargs.num_classes"] = 0  # the same teacher, used as a backbone
    if "transfer" not in parts:
        out["data.transfer_set"] = "none"
    return out


def arms_for(cfg: KDConfig) -> list[str]:
    """``labels``, then the distillation arms the config allows (see the module docstring)."""
    features, logits = bool(cfg.distill.features), cfg.distill.loss != "none"
    if not (features or logits):
        raise ConfigError("kd compare measures distillation against labels only: set "
                          "distill.loss (soft, hard, token or dkd) and a teacher, or "
                          "distill.features")
    transfer = "+transfer" if cfg.data.transfer_set != "none" else ""
    arms = ["labels"]
    if logits:
        arms += ["kd", *(["kd+transfer"] if transfer else [])]
    if features:
        arms += [f"features{transfer}", *([f"kd+features{transfer}"] if logits else [])]
    return arms


def _train_size(cfg: KDConfig) -> int:
    return len(RunData(cfg.data, cfg.student.channels, cfg.seed).train_set)


def plan(cfg: KDConfig, world_size: int) -> tuple[dict[str, Any], dict[str, KDConfig]]:
    """The shared budget and each arm's config (``cfg``: the resolved config of the command)."""
    if cfg.distill.teacher_cache:
        raise ConfigError("kd compare trains every arm with several seeds and its own data, but "
                          "distill.teacher_cache holds the teacher's outputs for one seed and one "
                          "training split: unset distill.teacher_cache (kd compare runs the "
                          "teacher)")
    arms = arms_for(cfg)
    accum = cfg.train.grad_accum_steps
    sizes = {arm: _train_size(derive(cfg, arm_overrides(cfg, arm), f"kd compare ({arm})"))
             for arm in arms}
    batch = min(cfg.data.batch_size, min(sizes.values()) // (world_size * accum))
    if batch < 1:
        raise ConfigError(f"kd compare: the labelled training split has {min(sizes.values())} "
                          f"images, fewer than one per process; raise data.labels_per_class")
    if batch < cfg.data.batch_size:
        log.info("kd compare: data.batch_size %d -> %d for every arm, so that the %d labelled "
                 "images fill a batch", cfg.data.batch_size, batch, min(sizes.values()))
    reference = arms[-1]
    ref_epoch_steps = steps_per_epoch(sizes[reference], batch, world_size, accum)
    steps = cfg.train.epochs * ref_epoch_steps
    if cfg.train.max_steps:
        steps = min(steps, cfg.train.max_steps)
    warmup_steps = cfg.sched.warmup_epochs * ref_epoch_steps
    budget = {"steps": steps, "batch_size": batch, "warmup_steps": warmup_steps,
              "reference_arm": reference, "train_images": sizes}
    configs = {}
    for arm in arms:
        epoch_steps = steps_per_epoch(sizes[arm], batch, world_size, accum)
        configs[arm] = derive(cfg, {
            **arm_overrides(cfg, arm), "data.batch_size": batch, "train.max_steps": steps,
            "train.epochs": math.ceil(steps / epoch_steps),
            "sched.warmup_epochs": warmup_steps / epoch_steps,
            "train.eval_every_epochs": EVAL_AT_END}, f"kd compare ({arm})")
    return budget, configs


def run_compare(cfg: KDConfig, info: DistInfo, seeds: int, out_dir: Path) -> dict[str, Any]:
    """Train every arm for every seed on the ranks of ``info``; write ``compare.json`` and
    ``compare.png``."""
    budget, configs = plan(cfg, info.world_size)
    log.info("kd compare: arms %s, %d seeds, %d steps of %d images per process each",
             ", ".join(configs), seeds, budget["steps"], budget["batch_size"])
    results = {arm: Arm(arm) for arm in configs}
    for k in range(seeds):
        seed = cfg.seed + k
        for arm, arm_cfg in configs.items():
            run_cfg = derive(arm_cfg, {"seed": seed,
                                       "output_dir": str(out_dir / arm / f"seed_{seed}")})
            summary = Trainer(run_cfg, info).train()
            results[arm].top1.append(float(summary["student_top1"]))
            results[arm].runs.append(run_cfg.output_dir)
            log.info("kd compare: %s, seed %d: student top-1 %.4f", arm, seed,
                     summary["student_top1"])
    report = _report(results, budget, [cfg.seed + k for k in range(seeds)])
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "compare.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out_dir / "config.yaml", to_yaml(cfg))
        plot(results, out_dir / "compare.png")
    return report


def _report(results: dict[str, Arm], budget: dict[str, Any], seeds: list[int]) -> dict:
    base = results["labels"].mean
    return {"budget": budget, "seeds": seeds, "arms": {
        name: {"student_top1_mean": arm.mean, "student_top1_sd": arm.sd,
               "student_top1": arm.top1, "gain_over_labels": arm.mean - base, "runs": arm.runs}
        for name, arm in results.items()}}


def print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    b = report["budget"]
    table = Table(title=f"kd compare: student top-1, {len(report['seeds'])} seeds, "
                        f"{b['steps']} steps x {b['batch_size']} images each")
    for column in ("arm", "top-1 (mean ± sd)", "per seed", "gain over labels"):
        table.add_column(column, justify="left" if column == "arm" else "right")
    for name, arm in report["arms"].items():
        sd = f"{100 * arm['student_top1_sd']:.2f}" if len(arm["student_top1"]) > 1 else "—"
        table.add_row(name, f"{100 * arm['student_top1_mean']:.2f} ± {sd} %",
                      " ".join(f"{100 * v:.2f}" for v in arm["student_top1"]),
                      "—" if name == "labels" else f"{100 * arm['gain_over_labels']:+.2f} pt")
    Console(width=110).print(table)


def plot(results: dict[str, Arm], path: Path) -> None:
    """A bar per arm (mean top-1, error bar one sd) with the per-seed values as dots."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    fig = Figure(figsize=(5, 3.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    names = list(results)
    means = [100 * results[n].mean for n in names]
    ax.bar(names, means, yerr=[100 * results[n].sd for n in names], capsize=4,
           color=["#999999", "#4c72b0", "#55a868"][:len(names)])
    for i, n in enumerate(names):
        ax.plot([i] * len(results[n].top1), [100 * v for v in results[n].top1], "k.", ms=4)
    low = min(100 * min(a.top1) for a in results.values())
    ax.set_ylim(max(0.0, low - 10), 100)
    ax.set_ylabel("student top-1 (%)")
    ax.set_title("kd compare")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
