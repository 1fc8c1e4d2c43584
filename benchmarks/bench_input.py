"""Input pipeline images/s per core: kd's training transform against timm's, in the same run.

Each pipeline turns JPEG bytes (held in memory, as the page cache holds a dataset's files) into
one training image, on one core (``torch.set_num_threads(1)``, as in a loader worker):

- **timm (reference)**: PIL decode, then ``timm.data.create_transform(size, is_training=True,
  ...)`` with the recipe's settings: what a timm training script runs per image (float,
  normalised, erased on the CPU). Its posterize op gets kd's fix (``kd.data.augment``): on
  Pillow 13 timm's raises for about 0.5 % of RandAugment images.
- **kd, data.pipeline=timm**: kd's dataset path with timm's PIL transform (uint8 out,
  normalised on the device).
- **kd, data.pipeline=kd**: kd's tensor transform (``kd.data.tensor_transform``): the same
  random draws, the crop decoded at a reduced JPEG scale when it allows, tensor resizing and
  affine ops.
- **kd, data.decode=device**: what is left in a loader worker (reading the JPEG's header and
  drawing the plan), and, for scale, the whole of it (decode and augmentation) run on this CPU,
  which on a GPU runs there instead (``benchmarks/gpu_check.sh`` measures that).
- with ``--max-side N``: the same pipelines on the images resized as ``kd prepare-data
  --max-side N`` writes them (re-encoded JPEG, quality 90).

Rounds alternate the pipelines (each round times every pipeline on the same images), so a
machine's drift hits them alike; the table gives the median images/s, the range, and each
pipeline's median ratio to the reference measured in the same round.

Without ``--data`` it generates ImageNet-like JPEGs: 500×375 px, quality 90, about 70 KB, smooth
shapes plus fine texture (pure-noise JPEGs decode unlike photographs).

    python benchmarks/bench_input.py [--data DIR] [--images 200] [--rounds 5]
                                     [--image-size 224] [--max-side 320] [--recipe deit|rrc]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.data.augment import fix_posterize
from kd.data.datasets import build_image_transform, decode_rgb, load_image
from kd.data.tensor_transform import EncodedBatch

RECIPES = {
    # DeiT's: random-resized crop, flip, RandAugment m9 with magnitude noise, erasing 0.25.
    "deit": {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "hflip": 0.5,
             "color_jitter": 0.0, "scale": (0.08, 1.0)},
    "rrc": {"auto_augment": None, "re_prob": 0.0, "hflip": 0.5, "color_jitter": 0.0,
            "scale": (0.08, 1.0)},
}


def photo_jpeg(rng: np.random.Generator, width: int = 500, height: int = 375,
               quality: int = 90) -> bytes:
    """A photo-like JPEG: octaves of smooth random colour (large shapes down to fine texture)
    plus a little sensor noise; about 70 KB at 500×375 and quality 90."""
    acc = np.zeros((height, width, 3), np.float32)
    for cells, amp in ((4, 90), (16, 50), (64, 30), (250, 28)):
        coarse = rng.integers(0, 256, (max(2, cells * height // width), cells, 3),
                              dtype=np.uint8)
        up = Image.fromarray(coarse).resize((width, height), Image.BICUBIC)
        acc += (np.asarray(up, np.float32) - 128) * amp / 128
    acc += 128 + rng.normal(0, 4, acc.shape)
    buf = io.BytesIO()
    Image.fromarray(acc.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def resized(data: bytes, max_side: int, quality: int = 90) -> bytes:
    """``data`` with its longer side at most ``max_side``, re-encoded (as prepared shards)."""
    img = decode_rgb(data)
    if max(img.size) > max_side:
        f = max_side / max(img.size)
        img = img.resize((max(1, round(img.size[0] * f)), max(1, round(img.size[1] * f))),
                         Image.BICUBIC, reducing_gap=3.0)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def load_images(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"--data {folder}: no .jpg files found")
    return [p.read_bytes() for p in files[:limit]]


def pipelines(size: int, recipe: dict) -> dict[str, Callable[[bytes, int], object]]:
    from timm.data import create_transform

    reference = create_transform(size, is_training=True, **recipe)
    fix_posterize(reference)
    timm_path = build_image_transform(size, True, {**recipe, "pipeline": "timm"})
    kd_path = build_image_transform(size, True, {**recipe, "pipeline": "kd"})
    device_path = build_image_transform(size, True, {**recipe, "pipeline": "kd",
                                                     "decode": "device"})
    cpu = torch.device("cpu")

    def device_side(data: bytes, seed: int) -> object:
        sample = load_image(device_path, data, seed, "bench")
        return EncodedBatch([sample]).decode(cpu)

    return {
        "timm (reference)": lambda data, seed: reference(decode_rgb(data)),
        "kd, data.pipeline=timm": lambda data, seed: load_image(timm_path, data, seed, "bench"),
        "kd, data.pipeline=kd": lambda data, seed: load_image(kd_path, data, seed, "bench"),
        "kd, data.decode=device: loader's share": lambda data, seed: load_image(
            device_path, data, seed, "bench"),
        "kd, data.decode=device, all of it on this CPU": device_side,
    }


def time_pipeline(fn: Callable[[bytes, int], object], images: list[bytes], seed0: int) -> float:
    """Images per second of ``fn`` over ``images`` (one pass)."""
    t = time.perf_counter()
    for i, data in enumerate(images):
        fn(data, seed0 + i)
    return len(images) / (time.perf_counter() - t)


def measure(sets: dict[str, list[bytes]], fns: dict[str, Callable], rounds: int
            ) -> dict[str, list[float]]:
    """Images/s per (pipeline, image set), ``rounds`` alternating rounds after a warm-up."""
    runs = {f"{name} | {label}": (fn, images) for label, images in sets.items()
            for name, fn in fns.items()}
    for fn, images in runs.values():
        time_pipeline(fn, images[:10], 0)  # warm-up: imports, allocator, caches
    results: dict[str, list[float]] = {key: [] for key in runs}
    for r in range(rounds):
        for key, (fn, images) in runs.items():
            results[key].append(time_pipeline(fn, images, r * len(images)))
    return results


def table(results: dict[str, list[float]], reference: str) -> list[str]:
    lines = ["| pipeline | images | images/s per core (median) | range | ÷ reference (same "
             "round) |", "| --- | --- | ---: | ---: | ---: |"]
    ref = results[reference]
    for key, values in results.items():
        name, label = key.split(" | ")
        ratio = statistics.median(v / r for v, r in zip(values, ref, strict=True))
        lines.append(f"| {name} | {label} | {statistics.median(values):,.0f} | "
                     f"{min(values):,.0f}–{max(values):,.0f} | {ratio:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a folder of JPEGs (searched recursively); "
                        "default: generated ImageNet-like JPEGs")
    parser.add_argument("--images", type=int, default=200, help="images per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="deit")
    parser.add_argument("--max-side", type=int, default=320,
                        help="also measure images resized to this longer side (0: do not)")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # one core, as a loader worker has
    t = time.perf_counter()
    if args.data:
        images = load_images(args.data, args.images)
        source = f"{len(images)} JPEGs from {args.data}"
    else:
        rng = np.random.default_rng(0)
        images = [photo_jpeg(rng) for _ in range(args.images)]
        source = f"{len(images)} generated photo-like 500×375 JPEGs"
    sizes = [decode_rgb(d).size for d in images[:50]]
    kbytes = sum(map(len, images)) / len(images) / 1024
    sets = {f"originals ({kbytes:.0f} KB)": images}
    if args.max_side:
        small = [resized(d, args.max_side) for d in images]
        sets[f"max side {args.max_side} ({sum(map(len, small)) / len(small) / 1024:.0f} KB)"] \
            = small
    print(f"prepared in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    fns = pipelines(args.image_size, RECIPES[args.recipe])
    results = measure(sets, fns, args.rounds)
    reference = f"timm (reference) | {next(iter(sets))}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mean_w = sum(w for w, _ in sizes) / len(sizes)
    mean_h = sum(h for _, h in sizes) / len(sizes)
    print(f"input pipeline, one core: {source} (mean {mean_w:.0f}×{mean_h:.0f} px) → "
          f"{args.image_size} px, recipe {args.recipe} ({RECIPES[args.recipe]}); "
          f"{args.rounds} alternating rounds of {len(images)} images")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; load average {load:.1f} when done\n")
    print("\n".join(table(results, reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
