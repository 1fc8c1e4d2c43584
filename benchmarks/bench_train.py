"""Training speed of kd's Trainer against a plain PyTorch loop and timm's LogitDistillationTask.

The same models (random-initialised timm models, no download), batch, precision and in-memory
data for all three; the loops alternate over several rounds and the table gives median images/s,
their range, the ratios kd ÷ plain and kd ÷ timm, and the model FLOP utilisation against a matmul
peak measured in the same run. The logic is ``kd.tools.bench`` (also ``kd bench``, same options).

    python benchmarks/bench_train.py [--teacher vit_small_patch16_224]
                                     [--student vit_tiny_patch16_224] [--image-size 112,224]
                                     [--batch 32] [--precision auto] [--steps 5] [--warmup 2]
                                     [--rounds 3] [--json FILE]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from kd.cli import add_bench_args, cmd_bench
from kd.errors import UserError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_bench_args(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args)
    except UserError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
