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

Every pipeline runs each image under the same per-sample seed (kd's pipelines as kd's datasets
do; timm's with the global generators seeded, not restored), so all do the same augmentation of
an image, and they take
turns image by image, so a machine's drift hits them alike. The table gives each pipeline's
median round (and range) with its ratio to the reference in the same round, and its rate when
every image counts its fastest round, which removes most of a shared machine's noise.

Without ``--data`` it generates ImageNet-like JPEGs: 500×375 px, quality 90, about 70 KB, smooth
shapes plus fine texture (pure-noise JPEGs decode unlike photographs).

    python benchmarks/bench_input.py [-c CONFIG [key=value ...]] [--data DIR] [--images 200]
                                     [--rounds 5] [--max-side 320]
                                     [--image-size 224] [--recipe deit|rrc]  (without a config)
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
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
from kd.tools.prepare_data import prepare_image

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
    """``data`` as ``kd prepare-data --max-side`` writes it (longer side at most ``max_side``)."""
    return prepare_image(data, max_side, quality).data


def load_images(folder: Path, limit: int) -> list[bytes]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"--data {folder}: no .jpg files found")
    return [p.read_bytes() for p in files[:limit]]


def reference_call(reference: Callable, data: bytes, seed: int) -> object:
    """timm's transform on ``data`` with the global generators seeded from ``seed`` (and not
    restored: a timm script keeps no streams to protect, so the reference pays only the
    seeding, 0.02 ms, for drawing what kd draws for that seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)
    return reference(decode_rgb(data))


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
        "timm (reference)": lambda data, seed: reference_call(reference, data, seed),
        "kd, data.pipeline=timm": lambda data, seed: load_image(timm_path, data, seed, "bench"),
        "kd, data.pipeline=kd": lambda data, seed: load_image(kd_path, data, seed, "bench"),
        "kd, data.decode=device: loader's share": lambda data, seed: load_image(
            device_path, data, seed, "bench"),
        "kd, data.decode=device, all of it on this CPU": device_side,
    }


def measure(sets: dict[str, list[bytes]], fns: dict[str, Callable], rounds: int
            ) -> dict[str, np.ndarray]:
    """Seconds per (pipeline, image set): an array of rounds × images, after a warm-up.

    Within a round the pipelines take turns image by image, each with the image's seed for that
    round, so at any moment every pipeline meets the same machine and does the same
    augmentation of the same image.
    """
    runs = {f"{name} | {label}": (fn, images) for label, images in sets.items()
            for name, fn in fns.items()}
    for fn, images in runs.values():  # warm-up: imports, allocator, caches
        for i, data in enumerate(images[:10]):
            fn(data, i)
    n = min(len(images) for _, images in runs.values())
    times = {key: np.zeros((rounds, n)) for key in runs}
    for r in range(rounds):
        for i in range(n):
            for key, (fn, images) in runs.items():
                t = time.perf_counter()
                fn(images[i], r * n + i)
                times[key][r, i] = time.perf_counter() - t
    return times


def table(times: dict[str, np.ndarray], reference: str) -> list[str]:
    """Per pipeline: images/s of its median round and range over rounds; images/s when each
    image takes its fastest round (the machine's noise removed); both ÷ the reference's."""
    lines = ["| pipeline | images | images/s per core, median round (range) | ÷ reference, "
             "same round | fastest round per image | ÷ reference |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    ref = times[reference]
    ref_rounds = ref.shape[1] / ref.sum(axis=1)
    ref_best = ref.shape[1] / ref.min(axis=0).sum()
    for key, t in times.items():
        name, label = key.split(" | ")
        per_round = t.shape[1] / t.sum(axis=1)
        best = t.shape[1] / t.min(axis=0).sum()
        ratio = statistics.median(per_round / ref_rounds)
        lines.append(f"| {name} | {label} | {statistics.median(per_round):,.0f} "
                     f"({per_round.min():,.0f}–{per_round.max():,.0f}) | {ratio:.2f} | "
                     f"{best:,.0f} | {best / ref_best:.2f} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-c", "--config", help="a kd config: its data.* recipe and image size, "
                        "and its imagefolder's training JPEGs (data.root/train) unless --data")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, as for kd train")
    parser.add_argument("--data", type=Path, help="a folder of JPEGs (searched recursively); "
                        "default: the config's, or generated ImageNet-like JPEGs")
    parser.add_argument("--images", type=int, default=200, help="images (each round)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224, help="without a config")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="deit",
                        help="without a config")
    parser.add_argument("--max-side", type=int, default=320,
                        help="also measure images resized to this longer side (0: do not)")
    args = parser.parse_args(argv)

    recipe, recipe_name, size = RECIPES[args.recipe], args.recipe, args.image_size
    if args.config or args.overrides:
        from kd.config import load_config
        from kd.data.datasets import train_transform_kwargs

        cfg = load_config(args.config, args.overrides)
        recipe = {k: v for k, v in train_transform_kwargs(cfg.data).items()
                  if k not in ("pipeline", "decode")}
        recipe_name, size = f"of {args.config or 'the default config'}", cfg.data.image_size
        if args.data is None and cfg.data.name == "imagefolder" and cfg.data.root:
            args.data = Path(cfg.data.root) / "train"

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

    fns = pipelines(size, recipe)
    results = measure(sets, fns, args.rounds)
    reference = f"timm (reference) | {next(iter(sets))}"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    mean_w = sum(w for w, _ in sizes) / len(sizes)
    mean_h = sum(h for _, h in sizes) / len(sizes)
    print(f"input pipeline, one core: {source} (mean {mean_w:.0f}×{mean_h:.0f} px) → "
          f"{size} px, recipe {recipe_name} ({recipe}); "
          f"{args.rounds} alternating rounds of {len(images)} images")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; load average {load:.1f} when done\n")
    print("\n".join(table(results, reference)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
