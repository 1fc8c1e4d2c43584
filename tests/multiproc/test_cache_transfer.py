"""Transfer sets and teacher-output caches across processes (gloo on loopback): two processes
train what one does, and a cache written by two processes serves two processes and one."""

from __future__ import annotations

import json

import pytest

from tests.multiproc.helpers import ATOL, max_diff, ok, single, torchrun, weights

pytestmark = pytest.mark.multiproc

FEW = ("data.labels_per_class=8", "data.transfer_set=rest")
# The cache stores fp16 logits: a cached student differs from a live one by that rounding too.
CACHE_ATOL = 2 * ATOL


def test_transfer_set_two_processes_match_one(base, tmp_path):
    """Every rank sees the same subset and transfer set, and takes its share of each batch:
    2 × 8 trains what 1 × 16 does."""
    one, two = tmp_path / "one", tmp_path / "two"
    ok(single(*base, *FEW, f"output_dir={one}", "data.batch_size=16"))
    ok(torchrun(2, *base, *FEW, f"output_dir={two}", "data.batch_size=8"))
    assert json.loads((two / "summary.json").read_text())["world_size"] == 2
    # Both runs chose the same labelled images.
    subset = [json.loads((run / "labelled_subset.json").read_text()) for run in (one, two)]
    assert subset[0] == subset[1]
    assert max_diff(weights(one), weights(two)) < ATOL


def test_cache_written_by_two_processes_serves_two_and_one(base, reference, tmp_path):
    cache = tmp_path / "cache"
    ok(torchrun(2, *base, "data.batch_size=8", "--epochs", "2", "--top-k", "4", "--out",
                str(cache), command="cache-teacher"))
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["rows"] == 2 * 128
    assert sorted(s["file"] for s in manifest["shards"]) == [
        f"epoch{e:04d}-rank{r:02d}.safetensors" for e in range(2) for r in range(2)]
    # The reference is one live process at batch 16; both cached runs must train the same.
    for world, batch in ((2, 8), (1, 16)):
        out = tmp_path / f"cached{world}"
        args = (*base, f"output_dir={out}", f"data.batch_size={batch}",
                f"distill.teacher_cache={cache}")
        ok(torchrun(2, *args) if world == 2 else single(*args))
        assert json.loads((out / "summary.json").read_text())["world_size"] == world
        assert max_diff(weights(out), weights(reference)) < CACHE_ATOL, world
