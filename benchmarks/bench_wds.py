"""WebDataset shards: indexed (random access) vs streamed (``data.stream``), on generated JPEGs.

Writes ``--samples`` JPEG + label samples into ``--shards`` tar shards in a temporary folder, then
measures for each mode, with the trainer's own loader (``kd.data.build_train_loader``):

* start-up: building the dataset (the index scan; for streaming, the shard checks and the sample
  count, uncached and cached);
* time to the first batch and images/s over one epoch, by worker count;
* for streaming, the time to the first batch of a run resumed half-way through an epoch (the
  readers re-read the skipped part without decoding it).

Prints a Markdown table. Timings vary with the machine and the page cache (the shards are
freshly written, so they are in memory: this measures CPU cost, not storage).

    python benchmarks/bench_wds.py [--samples 4000] [--shards 16] [--size 160] [--workers 0,2]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.data import build_train_loader
from kd.data.stream import WdsStreamDataset
from kd.data.wds import WdsDataset, expand_shards


def write_shards(root: Path, samples: int, shards: int, size: int, classes: int = 10) -> None:
    """JPEGs of smooth colour fields plus noise (they compress like photographs)."""
    rng = np.random.default_rng(0)
    per = -(-samples // shards)
    for s in range(shards):
        with tarfile.open(root / f"train-{s:04d}.tar", "w") as tar:
            for i in range(s * per, min(samples, (s + 1) * per)):
                base = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
                img = Image.fromarray(base).resize((size, size), Image.BILINEAR)
                arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, (size, size, 3))
                buf = io.BytesIO()
                Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
                for name, data in ((f"{i:08d}.jpg", buf.getvalue()),
                                   (f"{i:08d}.cls", str(i % classes).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def epoch(loader, start: int = 0) -> tuple[float, float, int]:
    """(seconds to the first batch, images/s after it, images) for one epoch from ``start``."""
    loader.batch_sampler.set_epoch(0, start_batch=start)
    t0 = time.perf_counter()
    it = iter(loader)
    n = len(next(it)[1])
    first = time.perf_counter() - t0
    t1 = time.perf_counter()
    for _, labels, _ in it:
        n += len(labels)
    return first, n / max(time.perf_counter() - t1, 1e-9), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--size", type=int, default=160, help="side of the generated JPEGs")
    parser.add_argument("--image-size", type=int, default=128, help="side after the transform")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--buffer", type=int, default=1000, help="stream shuffle buffer")
    parser.add_argument("--workers", default="0,2", help="worker counts to measure")
    args = parser.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["KD_CACHE_DIR"] = str(root / "cache")  # a throw-away count cache
        t = time.perf_counter()
        write_shards(root, args.samples, args.shards, args.size)
        print(f"# wds: {args.samples} samples ({args.size} px JPEG) in {args.shards} shards, "
              f"written in {time.perf_counter() - t:.1f} s; {os.cpu_count()} CPUs, "
              f"{platform.processor() or platform.machine()}\n")
        paths = expand_shards(str(root / "train-*.tar"))
        kwargs = {"image_size": args.image_size, "train": True, "num_classes": 10}
        rows = []

        t = time.perf_counter()
        indexed = WdsDataset(paths, **kwargs)
        rows.append(("indexed", "start-up (index scan)", f"{time.perf_counter() - t:.2f} s"))
        t = time.perf_counter()
        streamed = WdsStreamDataset(paths, seed=0, buffer_size=args.buffer, **kwargs)
        rows.append(("streamed", "start-up (checks + count)", f"{time.perf_counter() - t:.2f} s"))
        t = time.perf_counter()
        WdsStreamDataset(paths, seed=0, buffer_size=args.buffer, **kwargs)
        rows.append(("streamed", "start-up, count cached", f"{time.perf_counter() - t:.3f} s"))

        for w in workers:
            for name, ds in (("indexed", indexed), ("streamed", streamed)):
                loader = build_train_loader(ds, args.batch_size, 0, 0, 1, w, False)
                first, rate, _ = epoch(loader)
                rows.append((name, f"{w} workers: first batch / img/s",
                             f"{first:.2f} s / {rate:.0f}"))
                if name == "streamed":
                    half = len(loader.batch_sampler) // 2
                    loader = build_train_loader(ds, args.batch_size, 0, 0, 1, w, False)
                    first, _, _ = epoch(loader, start=half)
                    rows.append((name, f"{w} workers: first batch resumed at {half}/"
                                 f"{len(loader.batch_sampler)}", f"{first:.2f} s"))

        print("| mode | measure | value |\n| --- | --- | --- |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
