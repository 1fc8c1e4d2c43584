"""``kd tune-loader``: sweep loader workers and prefetch depth for a data config, and say which
to use (the measurement and the rule are :mod:`kd.data.tuning`'s, as ``num_workers: auto`` uses
them)."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kd.config import DataConfig
from kd.data.pipeline import RunData
from kd.data.tuning import (
    TOLERANCE,
    LoaderFactory,
    Measurement,
    cpu_budget,
    cpus_per_rank,
    max_workers,
    measure_throughput,
    recommend,
    tune_candidates,
)
from kd.errors import DataError, UserError

log = logging.getLogger("kd")


@dataclass
class TuneResult:
    """A ``kd tune-loader`` sweep: every setting measured and the one recommended."""

    measurements: list[Measurement]
    recommended: Measurement
    max_workers: int
    cap: int
    local_world_size: int
    batch_size: int
    dataset: str

    @property
    def overrides(self) -> str:
        """The recommendation as ``kd`` config overrides."""
        r = self.recommended
        text = f"data.num_workers={r.workers}"
        return text + (f" data.prefetch_factor={r.prefetch_factor}" if r.workers else "")

    def to_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "batch_size": self.batch_size,
                "local_world_size": self.local_world_size, "cap": self.cap,
                "max_workers": self.max_workers, "host": socket.gethostname(),
                "cpu_count": os.cpu_count(), "cpus": cpu_budget(),
                "tolerance": TOLERANCE, "recommended": self.recommended.to_dict(),
                "overrides": self.overrides,
                "measurements": [m.to_dict() for m in self.measurements]}


def tune_loader(make_loader: LoaderFactory, *, max_workers: int, prefetch_factors: Sequence[int],
                batches: int, step_s: float = 0.0,
                progress: Callable[[Measurement], None] | None = None) -> list[Measurement]:
    """The full sweep: every worker count of :func:`tune_candidates` × every prefetch factor
    (0 workers once: it does not prefetch), ``batches`` batches each, no early stop."""
    out: list[Measurement] = []
    for n in tune_candidates(max_workers):
        for p in prefetch_factors if n > 0 else prefetch_factors[:1]:
            # Each setting reads other images (another epoch): comparable page-cache warmth.
            m = measure_throughput(make_loader, n, p, batches=batches, step_s=step_s,
                                   epoch=len(out))
            out.append(m)
            if progress is not None:
                progress(m)
    return out


def plot_sweep(measurements: Sequence[Measurement], recommended: Measurement, path: Path,
               title: str, cap: int | None = None) -> None:
    """images/s against workers, one line per prefetch factor, the recommendation circled and
    the cap (when settings above it were measured) dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # no font-cache chatter
    fig = Figure(figsize=(7, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    zero = [m for m in measurements if m.workers == 0]
    for p in sorted({m.prefetch_factor for m in measurements if m.prefetch_factor}):
        line = zero + sorted((m for m in measurements if m.prefetch_factor == p),
                             key=lambda m: m.workers)
        ax.plot([m.workers for m in line], [m.img_per_s for m in line], marker="o",
                label=f"prefetch_factor={p}")
    if not any(m.prefetch_factor for m in measurements):
        ax.plot([m.workers for m in zero], [m.img_per_s for m in zero], marker="o")
    ax.scatter([recommended.workers], [recommended.img_per_s], s=220, facecolors="none",
               edgecolors="black", zorder=3, label="recommended")
    if cap is not None:
        ax.axvline(cap, color="gray", linestyle="--", linewidth=1, label=f"cap ({cap})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("data.num_workers")
    ax.set_ylabel("images/s")
    ax.set_title(title, fontsize=9)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)


def print_table(result: TuneResult) -> None:
    """The sweep as a table on stdout."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"kd tune-loader: {result.dataset}, batch {result.batch_size}, "
                  f"{cpu_budget()} CPUs, {result.local_world_size} rank(s) per node, "
                  f"cap {result.cap}",
                  caption="CPU %: utilisation of this process's CPUs, all processes; loader "
                  "CPUs: CPUs busy in the loader (main + workers); per core: images/s ÷ loader "
                  "CPUs; wait/batch: time the consumer waited per batch")
    for name in ("workers", "prefetch", "images/s", "per core", "CPU %", "loader CPUs",
                 "wait/batch (ms)", "recommended"):
        table.add_column(name, justify="right")
    for m in result.measurements:
        table.add_row(str(m.workers), str(m.prefetch_factor or "-"), f"{m.img_per_s:.1f}",
                      f"{m.img_per_core:.1f}", f"{m.cpu_percent:.0f}", f"{m.loader_cpus:.2f}",
                      f"{m.wait_ms:.1f}",
                      "✓" if m is result.recommended else
                      "above cap" if m.workers > result.cap else "")
    Console(width=110).print(table)


def run_tune_loader(data_cfg: DataConfig, *, channels: int, seed: int, out_dir: Path,
                    worker_limit: int | None, prefetch_factors: Sequence[int], batches: int,
                    local_world_size: int, step_s: float = 0.0, pin_memory: bool = False
                    ) -> TuneResult:
    """``kd tune-loader``: sweep the config's training loader, print, plot and save the results.

    Writes ``tune_loader.json`` and ``tune_loader.png`` into ``out_dir``.
    """
    if batches < 1:
        raise UserError(f"--batches {batches}: must be >= 1")
    if any(p < 1 for p in prefetch_factors) or not prefetch_factors:
        raise UserError(f"--prefetch {','.join(map(str, prefetch_factors))}: prefetch factors "
                        f"must be integers >= 1")
    if worker_limit is not None and worker_limit < 0:
        raise UserError(f"--max-workers {worker_limit}: must be >= 0")
    if local_world_size < 1:
        raise UserError(f"--local-world-size {local_world_size}: must be >= 1")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out_dir}: cannot create it: {e.strerror}") from None
    data = RunData(data_cfg, channels, seed, pin_memory=pin_memory)
    dataset, batch_size = data.train_set, data_cfg.batch_size
    if len(dataset) < batch_size:
        raise DataError(f"the training split has {len(dataset)} images, fewer than one batch "
                        f"(data.batch_size={batch_size}); lower data.batch_size")
    cap = max_workers(local_world_size)
    limit = cap if worker_limit is None else worker_limit

    make_loader = data.loader_factory()

    def progress(m: Measurement) -> None:
        log.info("workers=%d prefetch=%s: %.1f images/s, CPU %.0f %%, wait %.1f ms/batch",
                 m.workers, m.prefetch_factor or "-", m.img_per_s, m.cpu_percent, m.wait_ms)

    measurements = tune_loader(make_loader, max_workers=limit, prefetch_factors=prefetch_factors,
                               batches=batches, step_s=step_s, progress=progress)
    # Settings above the cap are measured (to show where the CPUs saturate) but not recommended:
    # in training the main process needs its CPU, which a loader-only sweep leaves idle.
    result = TuneResult(measurements, recommend(measurements, cap=cap), limit, cap,
                        local_world_size, batch_size, f"{data_cfg.name} ({len(dataset)} train "
                        f"images, {data_cfg.image_size} px)")
    print_table(result)
    title = (f"{result.dataset}, batch {batch_size}\n{socket.gethostname()}: "
             f"{cpu_budget()} CPUs, {local_world_size} rank(s) per node, cap {cap}")
    plot_sweep(measurements, result.recommended, out_dir / "tune_loader.png", title,
               cap=cap if cap < limit else None)
    payload = {**result.to_dict(), "step_ms": 1000 * step_s}
    (out_dir / "tune_loader.json").write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {out_dir / 'tune_loader.json'} and {out_dir / 'tune_loader.png'}")
    above = max((m for m in measurements if m.workers > cap), key=lambda m: m.img_per_s,
                default=None)
    if above is not None and above.img_per_s * TOLERANCE > result.recommended.img_per_s:
        print(f"note: {above.workers} workers reached {above.img_per_s:.0f} images/s but exceed "
              f"the cap of {cap} ({cpus_per_rank(local_world_size)} CPUs per rank, one left to "
              f"the training process), where they would compete with the training step")
    print(f"recommended: {result.overrides}")
    return result
