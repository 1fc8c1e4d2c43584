"""Data-loader throughput by worker count on generated JPEGs, and what ``num_workers=auto`` picks.

Generates an ImageFolder tree of JPEGs (smooth random colour fields plus noise, so they compress
and decode like photographs rather than like pure noise) in a temporary folder, then measures the
real training loader (``kd.data.build_train_loader``, as the trainer builds it, over kd's
ImageFolder dataset with timm's train transform: random-resized crop to 224 px and flip) for
every worker count from 0 to a few past the CPU count, and runs the ``auto`` sweep (with a
throw-away cache). Prints a Markdown table.

    python benchmarks/bench_loader.py [--images 2000] [--size 256] [--batch-size 64]
                                      [--max-workers N] [--batches 12] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.data import build_dataset
from kd.data.tuning import (
    auto_num_workers,
    available_cpus,
    max_workers,
    measure_throughput,
    train_loader_factory,
)


def generate_jpegs(root: Path, images: int, size: int, classes: int, seed: int = 0) -> None:
    """``images`` JPEGs of ``size``² px in ``root/train/class_<k>/``, round-robin over classes."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        (root / "train" / f"class_{k}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        smooth = np.asarray(coarse.resize((size, size), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(smooth + rng.normal(0, 12, smooth.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "train" / f"class_{i % classes}" / f"{i:06d}.jpg",
                                     quality=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000, help="JPEGs to generate")
    parser.add_argument("--size", type=int, default=256, help="side of the generated JPEGs")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--image-size", type=int, default=224, help="side after the transform")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch factor")
    parser.add_argument("--max-workers", type=int,
                        help="largest worker count measured (default: CPUs + 2)")
    parser.add_argument("--batches", type=int, default=12,
                        help="batches measured per worker count, after the warm-up")
    parser.add_argument("--root", help="generate into (or reuse) this folder instead of a "
                        "temporary one")
    args = parser.parse_args(argv)

    cpus = len(available_cpus())
    top = args.max_workers if args.max_workers is not None else cpus + 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or Path(tmp) / "jpegs")
        t = time.perf_counter()
        if not (root / "train").is_dir():
            generate_jpegs(root, args.images, args.size, args.classes)
        n_images = sum(1 for _ in (root / "train").rglob("*.jpg"))
        kbytes = sum(p.stat().st_size for p in (root / "train").rglob("*.jpg")) / n_images / 1024
        print(f"generated {n_images} JPEGs of {args.size} px ({kbytes:.0f} KB each on average) "
              f"in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        dataset = build_dataset("imagefolder", "train", root=str(root),
                                image_size=args.image_size, num_classes=args.classes,
                                augment=True, channels=3, synthetic_size=0, transform_kwargs={})

        make_loader = train_loader_factory(dataset, args.batch_size, seed=0)
        rows = []
        for n in range(top + 1):
            m = measure_throughput(make_loader, n, args.prefetch, batches=args.batches, epoch=n)
            rows.append(m)
            print(f"  {n} workers: {m.img_per_s:.0f} images/s", file=sys.stderr)

        t = time.perf_counter()
        choice = auto_num_workers(dataset, args.batch_size, 1, {"bench": vars(args)},
                                  cache_dir=Path(tmp) / "cache", prefetch_factor=args.prefetch)
        auto_s = time.perf_counter() - t

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\nkd data loader: {n_images} generated JPEGs ({args.size} px, {args.classes} "
          f"classes) -> timm train transform at {args.image_size} px, batch {args.batch_size}, "
          f"prefetch_factor {args.prefetch}")
    print(f"machine: {cpus} CPUs available to this process (os.cpu_count()={os.cpu_count()}), "
          f"{platform.processor() or platform.machine()}; load average {load:.1f} when done. "
          f"auto's cap for 1 rank per node: {max_workers(1)} workers (CPUs - 1)\n")
    print("| workers | images/s | CPU % | loader CPUs | wait/batch (ms) | chosen by auto |")
    print("| ---: | ---: | ---: | ---: | ---: | :---: |")
    for m in rows:
        mark = "✓" if m.workers == choice.num_workers else ""
        print(f"| {m.workers} | {m.img_per_s:.0f} | {m.cpu_percent:.0f} | {m.loader_cpus:.2f} | "
              f"{m.wait_ms:.1f} | {mark} |")
    print("\nCPU %: mean utilisation of the CPUs this process may use, all processes included; "
          "loader CPUs: CPUs kept busy by the loader (main process + workers).")
    measured = ", ".join(f"{m.workers}: {m.img_per_s:.0f}" for m in choice.measurements)
    print(f"auto: {choice.num_workers} workers, decided in {auto_s:.1f} s (probe batch "
          f"{choice.probe_batch_size}; images/s by workers: {measured})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
