"""The teacher-output cache's pure parts: rows, the sparse distribution, sizes, batches."""

from __future__ import annotations

import math

import pytest
import torch

from kd.core.losses import hard_kd, soft_kd
from kd.core.teacher_cache import densify, first_difference, row_bytes, top_k_rows
from kd.data.sampler import TrainBatchSampler
from kd.tools.cache_builder import rank_batches


def test_row_bytes_is_4k_plus_12() -> None:
    assert row_bytes(10, 1000) == 52
    # Above 32,767 classes the indices need int32.
    assert row_bytes(10, 40_000) == 4 + 4 + 20 + 40 + 4


def test_rows_hold_sorted_top_k_and_the_rest_mass() -> None:
    logits = torch.randn(6, 20) * 3
    rows = top_k_rows(logits, 5)
    values, indices = logits.topk(5, dim=-1)
    assert rows["values"].dtype == torch.float16 and rows["indices"].dtype == torch.int16
    torch.testing.assert_close(rows["values"].float(), values, atol=1e-2, rtol=1e-3)
    assert torch.equal(rows["indices"].long(), indices)
    rest = torch.logsumexp(logits.scatter(1, indices, float("-inf")), dim=-1)
    torch.testing.assert_close(rows["rest"], rest)
    # With K = C nothing is left over.
    assert torch.isinf(top_k_rows(logits, 20)["rest"]).all()


def test_densify_keeps_top_k_probabilities_and_spreads_the_rest_evenly() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 12) * 2
    rows = top_k_rows(logits, 3)
    dense = densify(rows["values"], rows["indices"], rows["rest"], 12)
    p_true, p = logits.softmax(-1), dense.softmax(-1)
    top = rows["indices"].long()
    # At T = 1: the top-K probabilities (up to fp16 rounding of the logits) ...
    torch.testing.assert_close(p.gather(1, top), p_true.gather(1, top), atol=2e-3, rtol=2e-3)
    # ... and the total mass of the other classes, spread equally among them.
    others = torch.ones_like(p, dtype=torch.bool).scatter_(1, top, False)
    rest_p = p[others].view(4, 9)
    torch.testing.assert_close(rest_p.sum(-1), p_true[others].view(4, 9).sum(-1), atol=2e-3,
                               rtol=2e-3)
    assert torch.allclose(rest_p, rest_p[:, :1].expand_as(rest_p))
    # Hard KD reads the stored argmax.
    assert torch.equal(dense.argmax(-1), logits.argmax(-1))


def test_densify_with_every_class_is_the_teacher_up_to_fp16() -> None:
    torch.manual_seed(1)
    teacher, student = torch.randn(8, 10) * 4, torch.randn(8, 10)
    rows = top_k_rows(teacher, 10)
    dense = densify(rows["values"], rows["indices"], rows["rest"], 10)
    torch.testing.assert_close(dense, teacher, atol=4e-3, rtol=1e-3)
    for t in (1.0, 4.0):
        assert soft_kd(student, dense, t).item() == pytest.approx(
            soft_kd(student, teacher, t).item(), rel=1e-3)
    assert hard_kd(student, dense).item() == hard_kd(student, teacher).item()
    assert math.isfinite(soft_kd(student, dense, 2.0).item())


def test_first_difference_names_the_key_and_both_values() -> None:
    cached = {"data.image_size": 32, "seed": 0, "teacher.name": "vit_small"}
    assert first_difference(cached, dict(cached)) is None
    diff = first_difference(cached, {**cached, "data.image_size": 64})
    assert diff == "data.image_size: the cache has 32, this run 64"
    assert first_difference(cached, {**cached, "processes": 2}).startswith("processes:")


@pytest.mark.parametrize("world", [1, 2, 3])
def test_without_mixing_every_sample_is_written_once_per_epoch(world: int) -> None:
    size, batch = 50, 8  # 50 is no multiple of 8 x world: nothing of the tail is dropped
    rows = [key for rank in range(world)
            for b in rank_batches(size, batch, seed=3, epoch=2, rank=rank, world_size=world,
                                  mixing=False) for key in b]
    assert sorted(i for i, _ in rows) == list(range(size))
    # The seeds are the ones training draws for that epoch, whatever its batch layout.
    sampler = TrainBatchSampler(size, 5, seed=3, rank=0, world_size=1)
    sampler.set_epoch(2)
    trained = {i: s for b in sampler for i, s in b}
    assert all(trained[i] == s for i, s in rows if i in trained)


def test_with_mixing_the_batches_are_the_training_batches() -> None:
    for rank in range(2):
        sampler = TrainBatchSampler(50, 8, seed=1, rank=rank, world_size=2)
        sampler.set_epoch(4)
        assert rank_batches(50, 8, 1, 4, rank, 2, mixing=True) == list(sampler)


def test_teacher_hash_covers_every_tensor_including_0_dim_ones() -> None:
    from kd.core.teacher_cache import teacher_hash

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    first = teacher_hash(model)  # BatchNorm's num_batches_tracked is 0-dim
    assert len(first) == 64 and teacher_hash(model) == first
    model[1].num_batches_tracked += 1
    assert teacher_hash(model) != first
