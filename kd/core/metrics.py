"""One processor for metrics, with pluggable sinks: console, JSONL, TensorBoard.

Only the main process builds sinks; other ranks get a processor with none, so calling it
anywhere is safe.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Protocol

from kd.core.checkpoint import atomic_write_text
from kd.units import format_seconds

log = logging.getLogger("kd")


class Sink(Protocol):
    def write(self, record: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line; flushed at once so a killed run keeps what it logged.

    A run that starts at ``initial_step`` (a resume) first drops the records of later steps:
    a crashed run may have logged steps after its last checkpoint, which the resumed run logs
    again.
    """

    def __init__(self, path: Path, initial_step: int = 0) -> None:
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and _step_of(line) <= initial_step]
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
        self.file = open(path, "a", buffering=1)  # noqa: SIM115 (open for the run's lifetime)

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.file.close()


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # an unreadable (half-written) line is dropped


class TensorBoardSink:
    """Every numeric value as a scalar, tagged ``train/<key>`` or ``val/<key>``.

    On a resume, events after ``initial_step`` are purged (TensorBoard's ``purge_step``).
    """

    def __init__(self, directory: Path, initial_step: int = 0) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(directory),
                                    purge_step=initial_step + 1 if initial_step else None)

    def write(self, record: dict[str, Any]) -> None:
        split = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "epoch", "split") and isinstance(value, (int, float)):
                self.writer.add_scalar(f"{split}/{key}", value, record["step"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class ConsoleSink:
    """A tqdm progress bar on a terminal; plain log lines otherwise (files, CI, schedulers)."""

    def __init__(self, total_steps: int, initial_step: int,
                 interactive: bool | None = None, log_phases: bool = False) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.bar = None
        self.total = total_steps
        self.log_phases = log_phases
        if self.interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    def write(self, record: dict[str, Any]) -> None:
        if record.get("split") == "val":
            msg = (f"eval epoch {record['epoch']} | student top-1 {record['student_top1']:.4f} "
                   f"top-5 {record['student_top5']:.4f}")
            if record.get("teacher_top1") is not None:
                msg += (f" | teacher top-1 {record['teacher_top1']:.4f} | agreement "
                        f"{record['agreement']:.4f}")
            if record.get("student_ema_top1") is not None:
                msg += f" | EMA top-1 {record['student_ema_top1']:.4f}"
            self._print(msg)
            return
        loss, task, kd = (_num(record.get(k)) for k in ("loss", "loss_task", "loss_kd"))
        features = "".join(f", {k.removeprefix('loss_')} {_num(v)}" for k, v in record.items()
                           if k.startswith("loss_feat_"))
        skipped = record.get("n_skipped_steps") or 0
        if self.bar is not None:
            self.bar.set_postfix(loss=loss, img_s=f"{record['img_per_s']:.0f}", refresh=False)
            self.bar.update(record["step"] - self.bar.n)
        else:
            self._print(f"step {record['step']}/{self.total} | epoch {record['epoch']} | "
                        f"loss {loss} (task {task}, kd {kd}{features}) | lr {record['lr']:.2e} | "
                        f"{record['img_per_s']:.1f} img/s | eta {_eta(record.get('eta_s'))}"
                        + (f" | skipped steps {skipped}" if skipped else ""))
        if self.log_phases:
            self._print(phase_line(record))

    def _print(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            log.info(msg)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _num(value: float | None) -> str:
    """A loss for the console: None (no step of the interval updated the weights) as "nan"."""
    return "nan" if value is None else f"{value:.4f}"


# The per-iteration timing line: (label, metrics.jsonl key), in step order.
PHASE_LINE_FIELDS = (("data", "t_data"), ("teacher", "t_teacher"), ("forward", "t_student_fwd"),
                     ("backward", "t_backward"), ("optim", "t_optim"))


def phase_line(record: dict[str, Any]) -> str:
    """``iter N | data 0.0005s | teacher 0.61s | forward 0.83s | backward 8.41s | optim 0.12s |
    812 img/s`` from a training record (``train.log_phases``)."""
    parts = [f"iter {record['step']}"]
    parts += [f"{label} {format_seconds(record[key])}" for label, key in PHASE_LINE_FIELDS]
    parts.append(f"{record['img_per_s']:.0f} img/s")
    return " | ".join(parts)


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return time.strftime("%H:%M:%S", time.gmtime(max(seconds, 0)))


class MetricsProcessor:
    """Fan records out to sinks; the trainer builds records, sinks format them.

    Example:
        >>> metrics = MetricsProcessor([])
        >>> metrics.log({"step": 1, "loss": 0.5})
    """

    def __init__(self, sinks: list[Sink]) -> None:
        self.sinks = sinks

    def log(self, record: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def build_metrics(output_dir: Path, is_main: bool, total_steps: int,
                  initial_step: int, log_phases: bool = False) -> MetricsProcessor:
    """Console, ``metrics.jsonl`` and TensorBoard (``tb/``) sinks on the main process.

    ``log_phases`` (``train.log_phases``) adds the per-iteration timing line to the console.
    """
    if not is_main:
        return MetricsProcessor([])
    return MetricsProcessor([
        ConsoleSink(total_steps, initial_step, log_phases=log_phases),
        JsonlSink(output_dir / "metrics.jsonl", initial_step),
        TensorBoardSink(output_dir / "tb", initial_step),
    ])
