"""Training from a teacher-output cache vs with the live teacher, in one run.

A ViT-S teacher (random weights saved to a local file: speed does not depend on them) and a
ViT-Ti student on generated images. The script

1. builds a cache of ``--epochs`` epochs with ``kd.tools.cache_builder.build_cache`` (timed:
   seconds and images/s of the teacher pass, bytes per image-epoch);
2. builds two Trainers from the same config, one with the live teacher and one with
   ``distill.teacher_cache``, and times their ``train_step`` in alternating rounds (so that a
   machine shared with other jobs slows both alike); medians over rounds.

Prints a Markdown table and, with ``--json``, writes every number.

    python benchmarks/bench_cache.py [--image-size 112] [--batch 32] [--images 256]
        [--steps 4] [--rounds 3] [--top-k 10]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.config import load_config
from kd.core.dist import single_process
from kd.core.teacher_cache import row_bytes
from kd.core.trainer import Trainer
from kd.tools.cache_builder import build_cache
from kd.units import format_bytes


def config(tmp: Path, args: argparse.Namespace, *extra: str):
    size = args.image_size
    return load_config(None, [
        f"output_dir={tmp / 'run'}", "seed=0",
        "student.name=vit_tiny_patch16_224", f"student.kwargs={{img_size: {size}}}",
        "teacher.name=vit_small_patch16_224", f"teacher.kwargs={{img_size: {size}}}",
        f"teacher.checkpoint={tmp / 'teacher.safetensors'}",
        "data.name=synthetic", f"data.synthetic_size={args.images}", f"data.image_size={size}",
        f"data.num_classes={args.num_classes}", f"data.batch_size={args.batch}",
        "data.num_workers=0", f"train.precision={args.precision}", "train.epochs=1",
        "distill.check_teacher=false", "train.log_every=1000", *extra])


def time_steps(trainer: Trainer, steps: int) -> float:
    """Seconds per optimizer step over ``steps`` steps of epoch 0 (after one untimed step)."""
    sampler = trainer.train_loader.batch_sampler
    sampler.set_epoch(0)
    batches = iter(trainer.train_loader)
    trainer.train_step(batches)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(batches)
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--images", type=int, default=256, help="training images (one epoch)")
    p.add_argument("--epochs", type=int, default=1, help="epochs to cache")
    p.add_argument("--steps", type=int, default=4, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--json", help="write the numbers here")
    args = p.parse_args()
    if args.steps + 1 > args.images // args.batch:
        p.error("--images must hold --steps + 1 batches")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        torch.manual_seed(0)
        teacher = timm.create_model("vit_small_patch16_224", num_classes=args.num_classes,
                                    img_size=args.image_size)
        save_file(teacher.state_dict(), str(tmp / "teacher.safetensors"))
        t0 = time.perf_counter()
        cfg = config(tmp, args)
        manifest = build_cache(cfg, single_process(cfg.train.device), args.epochs, args.top_k,
                               tmp / "cache")
        build_s = time.perf_counter() - t0
        assert manifest is not None
        live = Trainer(config(tmp, args))
        cached = Trainer(config(tmp, args, f"distill.teacher_cache={tmp / 'cache'}"))
        times: dict[str, list[float]] = {"live teacher": [], "teacher cache": []}
        for _ in range(args.rounds):
            times["live teacher"].append(time_steps(live, args.steps))
            times["teacher cache"].append(time_steps(cached, args.steps))
    med = {k: statistics.median(v) for k, v in times.items()}
    ips = {k: args.batch / v for k, v in med.items()}
    per_row = manifest["bytes_per_image_epoch"]
    imagenet = 1_281_167 * 300 * row_bytes(args.top_k, 1000)
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "threads": torch.get_num_threads(), "torch": torch.__version__,
                    "timm": timm.__version__},
        "settings": vars(args),
        "cache_build_s": round(build_s, 2),
        "cache_build_img_per_s": round(manifest["rows"] / build_s, 1),
        "bytes_per_image_epoch": per_row, "row_bytes": manifest["row_bytes"],
        "step_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
        "img_per_s": {k: round(v, 2) for k, v in ips.items()},
        "speedup": round(ips["teacher cache"] / ips["live teacher"], 3),
        "imagenet_300_epochs_bytes": imagenet,
    }
    print(f"ViT-S teacher -> ViT-Ti student, {args.image_size} px, batch {args.batch}, "
          f"{args.precision}, {torch.get_num_threads()} threads; top-{args.top_k} of "
          f"{args.num_classes} classes; medians of {args.rounds} rounds x {args.steps} steps\n")
    print("| training step | s/step | img/s | relative |")
    print("| --- | ---: | ---: | ---: |")
    for k in times:
        print(f"| {k} | {med[k]:.3f} | {ips[k]:.1f} | "
              f"{ips[k] / ips['live teacher']:.2f}x |")
    print(f"\ncache build: {manifest['rows']} image-epochs in {build_s:.1f} s "
          f"({result['cache_build_img_per_s']} img/s, teacher forward + top-k + write); "
          f"{per_row} bytes per image-epoch on disk ({manifest['row_bytes']} per row + file "
          f"headers); ImageNet-1k x 300 epochs at this K: {format_bytes(imagenet, si=True)}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
