"""The ``kd`` command: parse, call the package, map user errors to exit code 2.

    kd train  [-c preset.yaml] [key=value ...]     distil (no arguments: the digits demo)
    kd config [-c preset.yaml] [key=value ...]     print the resolved config
    kd eval   --checkpoint DIR [-c ...] [k=v ...]  evaluate a checkpoint
    kd export --checkpoint DIR --out DIR           student as timm-loadable safetensors
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd.errors import UserError

log = logging.getLogger("kd")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML preset (only what differs from the defaults); "
                   "without it, the embedded digits demo (kd://presets/demo.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=3 distill.temperature=2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd", description="Knowledge distillation for ViTs.")
    parser.add_argument("--version", action="version", version=f"kd {_version()}")
    sub = parser.add_subparsers(dest="command")
    _add_config_args(sub.add_parser("train", help="distil a teacher into a student"))
    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.add_argument("--reference", action="store_true",
                   help="print the configuration reference (Markdown) instead")
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    _add_config_args(p)
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_* directory")
    p.add_argument("--out", help="metrics JSON to write (default: <run>/eval.json)")
    p = sub.add_parser("export", help="write the student as timm-loadable safetensors")
    p.add_argument("--checkpoint", required=True, help="a checkpoints/step_* directory")
    p.add_argument("--out", required=True, help="output directory")
    return parser


def _version() -> str:
    from kd import __version__

    return __version__


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)


def _print_results(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    def pct(v: float | None) -> str:
        return "—" if v is None else f"{100 * v:.2f} %"

    table = Table(title="kd: distillation results", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("teacher top-1", pct(summary.get("teacher_top1")))
    table.add_row("student top-1", pct(summary.get("student_top1")))
    table.add_row("student top-5", pct(summary.get("student_top5")))
    table.add_row("agreement (top-1)", pct(summary.get("agreement")))
    if "steps" in summary:
        table.add_row("steps", str(summary["steps"]))
        table.add_row("wall time", f"{summary['wall_s']:.1f} s")
        if summary.get("img_per_s"):
            table.add_row("throughput", f"{summary['img_per_s']:.1f} img/s")
    table.add_row("output", str(summary.get("output_dir", "")))
    Console(width=100).print(table)


def cmd_train(args: argparse.Namespace) -> int:
    from kd.config import DEMO_PRESET, load_config
    from kd.dist import cleanup
    from kd.trainer import Trainer

    cfg = load_config(args.config or DEMO_PRESET, args.overrides)
    try:
        trainer = Trainer(cfg)
        summary = trainer.train()
    finally:
        cleanup()
    if trainer.dist.is_main:
        _print_results(summary)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from kd.config import DEMO_PRESET, load_config, reference_markdown, to_yaml

    if args.reference:
        print(reference_markdown(), end="")
        return 0
    print(to_yaml(load_config(args.config or DEMO_PRESET, args.overrides)), end="")
    return 0


def _checkpoint_config(path: str, config: str | None, overrides: list[str]) -> Any:
    from kd.checkpoint import CONFIG_FILE, verify
    from kd.config import load_config

    verify(path)
    return load_config(config or str(Path(path) / CONFIG_FILE), overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    from kd.dist import cleanup
    from kd.trainer import Trainer

    cfg = _checkpoint_config(args.checkpoint, args.config, args.overrides)
    cfg.checkpoint.resume = str(args.checkpoint)
    try:
        trainer = Trainer(cfg)
        record = trainer.evaluate(epoch=round(trainer.step / trainer.steps_per_epoch))
    finally:
        cleanup()
    if trainer.dist.is_main:
        out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent.parent / \
            "eval.json"
        result = {**record, "checkpoint": str(args.checkpoint)}
        from kd.checkpoint import atomic_write_text

        try:
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise UserError(f"--out {out}: cannot write: {e.strerror}") from None
        _print_results({**record, "output_dir": str(out)})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from kd.export import export_student

    out = export_student(args.checkpoint, args.out)
    print(f"exported the student to {out}")
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "export": cmd_export}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kd`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["train"])  # no arguments: the embedded digits demo
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"kd: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
