"""The ``kd`` command: parse, call the package, map user errors to exit code 2.

    kd train  [-c preset.yaml] [key=value ...]     distil (no arguments: the digits demo)
    kd config [-c preset.yaml] [key=value ...]     print the resolved config
    kd eval   --checkpoint DIR [--best] [-c ...] [k=v ...]  evaluate a run's checkpoint
    kd export --checkpoint DIR [--best] --out DIR  student as timm-loadable safetensors
    kd tune-loader [-c preset.yaml] [key=value ...] data-loader workers sweep and advice
    kd profile [-c preset.yaml] [key=value ...]    profile a short run; report what to fix
    kd compare [-c preset.yaml] [k=v ...] --seeds K labels only vs distillation, same budget
    kd bench [--teacher T --student S ...]         training speed: kd vs plain PyTorch vs timm
    kd cache-teacher [-c ...] [k=v ...] --epochs E --top-k K --out DIR
                                                   store teacher outputs for cached training
    kd plan [-c ...] [k=v ...] --gpu G --nodes N   size a job: memory per GPU, batch, step time
    kd prepare-data [-c ...] [k=v ...] --out DIR   pre-resized WebDataset shards with indexes
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kd import __version__
from kd.config import (
    KDConfig,
    derive,
    load_command_config,
    load_config,
    reference_markdown,
    to_yaml,
)
from kd.core.checkpoint import CONFIG_FILE, atomic_write_text, find_checkpoint, verify
from kd.core.dist import process_group
from kd.core.trainer import Trainer
from kd.errors import OUTPUT_ERRNOS, Preempted, UserError, output_error
from kd.tools import bench, compare, plan
from kd.tools.cache_builder import build_cache
from kd.tools.evaluate import evaluate_checkpoint
from kd.tools.export import export_student
from kd.tools.model_card import push_to_hub
from kd.tools.prepare_data import PrepareSettings, parse_splits, prepare_data, print_report
from kd.tools.profiler import ProfileSettings, run_profile
from kd.tools.tune_loader import run_tune_loader
from kd.units import format_bytes, format_percent

log = logging.getLogger("kd")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="YAML preset (only what differs from the defaults); "
                   "without it, the embedded digits demo (kd://presets/demo.yaml), unless the "
                   "overrides set data.name, student.name or teacher.name to another value "
                   "than the demo's: then the schema defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=3 distill.temperature=2")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="a run directory or its checkpoints/ folder (the newest checkpoint that "
                   "passes its checks), or one checkpoints/step_* directory")
    p.add_argument("--best", action="store_true", help="with a run directory: the checkpoint "
                   "with the best student top-1 (checkpoints/best.json) instead of the newest")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kd", description="Knowledge distillation for ViTs.")
    parser.add_argument("--version", action="version", version=f"kd {__version__}")
    sub = parser.add_subparsers(dest="command")
    _add_config_args(sub.add_parser("train", help="distil a teacher into a student"))
    p = sub.add_parser("config", help="print the resolved config")
    _add_config_args(p)
    p.add_argument("--reference", action="store_true",
                   help="print the configuration reference (Markdown) instead")
    p = sub.add_parser("eval", help="evaluate a checkpoint on the validation split")
    _add_config_args(p)
    _add_checkpoint_args(p)
    p.add_argument("--out", help="metrics JSON to write (default: <run>/eval.json)")
    p = sub.add_parser("export", help="write the student as timm-loadable safetensors")
    _add_checkpoint_args(p)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ema", action="store_true", help="export the EMA of the student "
                   "(train.ema_decay) instead of the student")
    p.add_argument("--format", default="safetensors", metavar="FORMAT",
                   help="safetensors (timm's files, the default) or onnx (those and "
                   "model.onnx, checked with onnxruntime on the validation images)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported folder (model, "
                   "config, card) to this Hugging Face model repository (needs network and "
                   "`huggingface-cli login` or HF_TOKEN)")
    p.add_argument("--check-images", type=int, default=1024, metavar="N",
                   help="with --format onnx: validation images to check the graph on "
                   "(default 1024)")
    p = sub.add_parser("profile", help="profile a short training run and write a report "
                       "(traces, report.md, report.html)")
    _add_config_args(p)
    p.add_argument("--wait", type=int, default=1, help="steps before profiling (default 1)")
    p.add_argument("--warmup", type=int, default=2,
                   help="profiled but discarded warm-up steps (default 2)")
    p.add_argument("--active", type=int, default=5, help="steps in the report (default 5)")
    p.add_argument("--out", help="run directory (default: <output_dir>/profile)")
    p.add_argument("--top", type=int, default=15, help="operators in the table (default 15)")
    p.add_argument("--external-profiler", default="none", choices=("none", "nsys", "sagemaker"),
                   help="start/stop Nsight Systems (cudaProfilerApi) or SageMaker Profiler "
                   "around the active steps; torch.profiler then records CPU activity only")
    p = sub.add_parser("compare", help="labels only vs distillation (vs a transfer set), "
                       "same budget, several seeds: table, compare.json, compare.png")
    _add_config_args(p)
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (default 3)")
    p.add_argument("--out", help="output folder (default: <output_dir>/compare)")
    p = sub.add_parser("cache-teacher", help="run the teacher over E epochs of augmented "
                       "training data and store its top-K logits (distill.teacher_cache)")
    _add_config_args(p)
    p.add_argument("--epochs", type=int, help="epochs to cache (default: train.epochs)")
    p.add_argument("--top-k", type=int, help="logits kept per image (default: "
                   "distill.cache_top_k, else 10, at most data.num_classes)")
    p.add_argument("--out", required=True, help="cache folder (a resumed build keeps the "
                   "shards it finished)")
    p = sub.add_parser("tune-loader", help="sweep data-loader workers × prefetch factor; plot "
                       "and recommend settings")
    _add_config_args(p)
    p.add_argument("--max-workers", type=int, help="largest worker count to try (default: the "
                   "CPUs of one local rank minus one)")
    p.add_argument("--prefetch", default="2,4", help="prefetch factors to try (default: 2,4)")
    p.add_argument("--batches", type=int, default=20,
                   help="batches measured per setting, after a warm-up (default: 20)")
    p.add_argument("--local-world-size", type=int, help="ranks per node that will share the "
                   "CPUs (default: the number of GPUs, or 1)")
    p.add_argument("--step-ms", type=float, default=0.0, help="simulated training step after "
                   "each batch, in ms: shows whether the loader keeps up (default: 0)")
    p.add_argument("--out", help="output folder (default: <output_dir>/tune_loader)")
    p = sub.add_parser("bench", help="training speed: kd's Trainer vs a plain PyTorch loop vs "
                       "timm's LogitDistillationTask, same models and data (kd.tools.bench)")
    add_bench_args(p)
    p = sub.add_parser("plan", help="size a multi-node job before launching it: memory per "
                       "GPU, largest batch, step time (kd.tools.plan)")
    _add_config_args(p)
    p.add_argument("--gpu", help="GPU model: a100-40gb, a100-80gb, h100 (SXM 80GB), h200")
    p.add_argument("--instance", help="SageMaker instance p4d, p4de, p5 or p5e: sets --gpu, "
                   "--gpus-per-node and --network-gbps (explicit options win)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default 8)")
    p.add_argument("--network-gbps", type=float, help="network bandwidth per node between "
                   "nodes, Gbit/s (default: the SageMaker instance with this GPU)")
    p.add_argument("--cpus-per-gpu", type=float, help="vCPUs per GPU for its loader and "
                   "training process (default: the SageMaker instance with this GPU)")
    p.add_argument("--mfu", type=float, default=0.4,
                   help="achievable fraction of the GPU's dense peak FLOP/s (default 0.4)")
    p.add_argument("--json", metavar="FILE", help="also write the plan's numbers here")
    p = sub.add_parser("prepare-data", help="the train and val splits as pre-resized, "
                       "reproducible WebDataset shards with index files, for data.name=wds "
                       "(kd.tools.prepare_data)")
    _add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: "
                   "train-000000.tar, ..., val-000000.tar, ..., an .idx.json beside each, "
                   "prepare.json (a rerun keeps the shards it finished)")
    p.add_argument("--max-side", type=int, default=320, help="longer side, in pixels, larger "
                   "images are shrunk to (default 320; at least 32)")
    p.add_argument("--quality", type=int, default=90,
                   help="JPEG quality of re-encoded images (default 90)")
    p.add_argument("--shard-samples", type=int, default=1000,
                   help="samples per shard (default 1000)")
    p.add_argument("--splits", default="train,val", help="splits to write (default train,val)")
    return parser


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """``kd bench``'s options (also ``benchmarks/bench_train.py``'s)."""
    p.add_argument("--teacher", default="vit_small_patch16_224",
                   help="timm teacher, random-initialised (default: vit_small_patch16_224)")
    p.add_argument("--student", default="vit_tiny_patch16_224",
                   help="timm student (default: vit_tiny_patch16_224)")
    p.add_argument("--image-size", action="append", metavar="N[,N...]",
                   help="image side; repeat or give a comma list (default: 112,224)")
    p.add_argument("--batch", type=int, default=32, help="images per step (default 32)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="auto: as train.precision=auto, bf16 on GPUs and AMX CPUs, else fp32 "
                   "(default auto)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per loop and round "
                   "(default 5)")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps of each loop before the rounds (default 2)")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the three loops in turn; medians over them (default 3)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--num-classes", type=int, default=1000, help="classes (default 1000)")
    p.add_argument("--teacher-kwargs", metavar="YAML", help="timm.create_model arguments, "
                   "e.g. '{embed_dim: 48, depth: 1, num_heads: 2}'")
    p.add_argument("--student-kwargs", metavar="YAML", help="as --teacher-kwargs")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a speed option for kd's Trainer only (train.compile, "
                   "train.compile_mode, teacher.dtype, optim.zero, train.log_phases, "
                   "student.grad_checkpointing; repeatable): the plain loop in the same run is "
                   "the control; or distill.features / distill.projector, which kd's step "
                   "is then also timed without")
    p.add_argument("--json", metavar="FILE", help="write every number and the machine here")


def _load_config(args: argparse.Namespace) -> KDConfig:
    """The config of a command taking ``[-c preset] [key=value ...]``
    (:func:`kd.config.load_command_config`); remembers where the values the user did not name
    came from, so that :func:`main` can say so in an error about one of them."""
    cfg, args.origins = load_command_config(args.config, args.overrides)
    return cfg


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
    if summary.get("student_ema_top1") is not None:
        table.add_row("student EMA top-1", pct(summary.get("student_ema_top1")))
    table.add_row("agreement (top-1)", pct(summary.get("agreement")))
    if "steps" in summary:
        table.add_row("steps", str(summary["steps"]))
        table.add_row("wall time", f"{summary['wall_s']:.1f} s")
        if summary.get("img_per_s"):
            table.add_row("throughput", f"{summary['img_per_s']:.1f} img/s")
    console = Console(width=100)
    console.print(table)
    # Outside the table: rich would shorten a long path to fit the column.
    console.print(f"output: {summary.get('output_dir', '')}", soft_wrap=True, highlight=False)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    with process_group(cfg.dist, cfg.train.device) as info:
        summary = Trainer(cfg, info).train()
    if info.is_main:
        _print_results(summary)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    if args.reference:
        print(reference_markdown(), end="")
        return 0
    print(to_yaml(_load_config(args)), end="")
    return 0


def _checkpoint_config(path: str, config: str | None, overrides: list[str]) -> KDConfig:
    verify(path)
    return load_config(config or str(Path(path) / CONFIG_FILE), overrides)


def _find_checkpoint(args: argparse.Namespace) -> Path:
    """``--checkpoint`` (and ``--best``) resolved to one checkpoint directory, logged."""
    path = find_checkpoint(args.checkpoint, best=args.best)
    if path != Path(args.checkpoint):
        log.info("checkpoint: %s (%s in %s)", path, "the best" if args.best else "the newest",
                 args.checkpoint)
    return path


def cmd_eval(args: argparse.Namespace) -> int:
    checkpoint = _find_checkpoint(args)
    cfg = _checkpoint_config(str(checkpoint), args.config, args.overrides)
    with process_group(cfg.dist, cfg.train.device) as info:
        record = evaluate_checkpoint(cfg, info, checkpoint)
    if info.is_main:
        out = Path(args.out) if args.out else checkpoint.resolve().parent.parent / "eval.json"
        result = {**record, "checkpoint": str(checkpoint)}
        try:
            atomic_write_text(out, json.dumps(result, indent=2) + "\n")
        except OSError as e:
            raise output_error(f"--out {out}: cannot write it", e, setting="--out") from None
        _print_results({**record, "output_dir": str(out)})
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    command = "kd " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    out, check = export_student(_find_checkpoint(args), args.out, ema=args.ema,
                                fmt=args.format, check_images=args.check_images,
                                command=command if sys.argv[1:2] == ["export"] else None)
    print(f"exported the student{' (EMA)' if args.ema else ''} to {out}")
    if check is not None:
        print(f"model.onnx (opset {check['opset']}, dynamic batch): onnxruntime vs PyTorch on "
              f"{check['images']} validation images: max |logit difference| "
              f"{check['max_abs_logit_diff']:.3g} (tolerance {check['tolerance']:g}), top-1 "
              f"agreement {100 * check['top1_agreement']:.2f} %")
    print(f"model card: {out / 'README.md'}")
    if args.push_to_hub:
        print(f"uploaded to {push_to_hub(out, args.push_to_hub)}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    settings = ProfileSettings(wait=args.wait, warmup=args.warmup, active=args.active,
                               top=args.top, external=args.external_profiler)
    settings.validate()  # before the models are built
    cfg = _load_config(args)
    out = Path(args.out) if args.out else Path(cfg.output_dir) / "profile"
    # The profile's config and metrics records go beside its report.
    cfg = derive(cfg, {"output_dir": str(out)}, "kd profile --out")
    with process_group(cfg.dist, cfg.train.device) as info:
        analysis = run_profile(Trainer(cfg, info), out, settings)
    if analysis is not None:
        verdict = analysis["verdict"]
        print(f"kd profile: {verdict['kind']} ({verdict['reason']}); "
              f"{analysis['img_per_s']:.1f} img/s, "
              f"MFU {format_percent(analysis['mfu'], fine=True)}")
        for rec in analysis["recommendations"]:
            print(f"  - {rec['trigger']}: {rec['advice']}")
        print(f"report: {analysis['report_md']} and {analysis['report_html']}")
    return 0


def _one_line(error: UserError) -> str:
    """The error's own message, also when a data-loader worker raised it.

    PyTorch re-raises a worker's exception in the main process with the worker's traceback
    folded into the message; the original message is its last line.
    """
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    name = f"{type(error).__module__}.{type(error).__name__}: "
    return last.removeprefix(name)


def cmd_tune_loader(args: argparse.Namespace) -> int:
    import torch

    cfg = _load_config(args)
    try:
        prefetch = [int(p) for p in args.prefetch.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--prefetch {args.prefetch}: expected integers separated by commas "
                        f"(e.g. 2,4)") from None
    gpus = torch.cuda.device_count()
    run_tune_loader(cfg.data, channels=cfg.student.channels, seed=cfg.seed,
                    out_dir=Path(args.out or Path(cfg.output_dir) / "tune_loader"),
                    worker_limit=args.max_workers, prefetch_factors=prefetch,
                    batches=args.batches, local_world_size=args.local_world_size or gpus or 1,
                    step_s=args.step_ms / 1000, pin_memory=gpus > 0)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    if args.seeds < 1:
        raise UserError(f"--seeds {args.seeds}: give at least 1")
    cfg = _load_config(args)
    out = Path(args.out or Path(cfg.output_dir) / "compare")
    with process_group(cfg.dist, cfg.train.device) as info:
        report = compare.run_compare(cfg, info, args.seeds, out)
    if info.is_main:
        compare.print_table(report)
        print(f"output: {out}")
    return 0


def cmd_cache_teacher(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    top_k = args.top_k if args.top_k is not None else (
        cfg.distill.cache_top_k or min(10, cfg.data.num_classes))
    epochs = args.epochs if args.epochs is not None else cfg.train.epochs
    with process_group(cfg.dist, cfg.train.device) as info:
        manifest = build_cache(cfg, info, epochs, top_k, args.out)
    if manifest is not None:
        print(f"kd cache-teacher: {manifest['epochs']} epochs, {manifest['rows']} image-epochs, "
              f"top-{manifest['top_k']}: {format_bytes(manifest['bytes'], si=True)} "
              f"({manifest['bytes_per_image_epoch']} bytes per image-epoch), built in "
              f"{manifest['build_s']} s; train with distill.teacher_cache={args.out}")
    return 0


def _yaml_mapping(text: str | None, option: str) -> dict[str, Any]:
    import yaml

    try:
        value = yaml.safe_load(text) if text else {}
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise UserError(f"{option} {text}: expected a mapping, e.g. '{{embed_dim: 48}}'")
    return value


def cmd_bench(args: argparse.Namespace) -> int:
    bench.check_json_path(args.json)
    bench.check_kd_overrides(args.set)
    result = bench.run_bench(
        args.teacher, args.student, bench.parse_image_sizes(args.image_size), args.batch,
        args.precision, args.steps, args.warmup, args.rounds, args.device, args.num_classes,
        _yaml_mapping(args.teacher_kwargs, "--teacher-kwargs"),
        _yaml_mapping(args.student_kwargs, "--student-kwargs"), kd_overrides=args.set)
    bench.print_table(result)
    if args.json:
        bench.write_json(result, args.json)
        print(f"json: {args.json}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cluster = plan.resolve_cluster(args.gpu, args.instance, args.nodes, args.gpus_per_node,
                                   args.network_gbps, args.cpus_per_gpu)  # before the models
    cfg = _load_config(args)
    result = plan.run_plan(cfg, cluster, args.mfu)
    plan.print_plan(result)
    if args.json:
        plan.write_json(result, args.json)
        print(f"json: {args.json}")
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    settings = PrepareSettings(max_side=args.max_side, quality=args.quality,
                               shard_samples=args.shard_samples)
    settings.check()  # before the config and the data are read
    splits = parse_splits(args.splits)
    cfg = _load_config(args)
    print_report(prepare_data(cfg.data, args.out, settings, splits))
    return 0


COMMANDS = {"train": cmd_train, "config": cmd_config, "eval": cmd_eval, "export": cmd_export,
            "tune-loader": cmd_tune_loader, "profile": cmd_profile, "compare": cmd_compare,
            "cache-teacher": cmd_cache_teacher, "bench": cmd_bench,
            "plan": cmd_plan, "prepare-data": cmd_prepare_data}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kd`` console script; returns the exit code."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv or ["train"])  # no arguments: the embedded digits demo
    _setup_logging()
    try:
        return COMMANDS[args.command](args)
    except UserError as e:
        message = _one_line(e)
        origins = getattr(args, "origins", None)
        if origins is not None and origins.source not in message:
            message += origins.explain(message)
        print(f"kd: error: {message}", file=sys.stderr)
        return e.exit_code
    except OSError as e:
        if e.errno not in OUTPUT_ERRNOS:  # anything else may be a bug in kd: keep the traceback
            raise
        print(f"kd: error: {output_error('cannot read or write', e)}", file=sys.stderr)
        return UserError.exit_code
    except Preempted as e:
        print(f"kd: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("kd: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
