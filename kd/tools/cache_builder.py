"""``kd cache-teacher``: run the frozen teacher over E epochs and write a teacher-output cache.

The format, and how a run reads it, are :mod:`kd.core.teacher_cache`'s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kd import __version__
from kd.config import KDConfig
from kd.core.checkpoint import atomic_write_text, fsync_dir, save_weights, sha256_file
from kd.core.dist import DistInfo, barrier
from kd.core.models import build_teacher, check_model_input, teacher_dtype
from kd.core.precision import autocast, resolve_precision
from kd.core.teacher_cache import (
    FORMAT,
    MANIFEST_FILE,
    PLAN_FILE,
    ROW_TENSORS,
    cache_fields,
    checkpoint_sha256,
    first_difference,
    index_dtype,
    row_bytes,
    shard_name,
    teacher_hash,
    top_k_rows,
)
from kd.core.teachers import teacher_input
from kd.data.batch import BatchPreparer
from kd.data.pipeline import Ranks, RunData
from kd.data.sampler import TrainBatchSampler, epoch_order
from kd.errors import CacheError, ConfigError, output_error
from kd.units import format_bytes

log = logging.getLogger("kd")


# ----------------------------------------------------------------------------------- building
def rank_batches(size: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 mixing: bool, repeats: int = 1) -> list[list[tuple[int, int]]]:
    """The ``(index, augmentation seed)`` batches rank ``rank`` computes for one epoch of
    ``size`` samples (slots, with ``repeats`` > 1: ``data.repeated_aug``).

    Mixing: exactly this rank's training batches (:class:`~kd.data.TrainBatchSampler`).
    Otherwise every sample of the epoch, dealt round-robin from the epoch's order (the last
    batch may be short), so any training layout finds every index.
    """
    if mixing:
        sampler = TrainBatchSampler(size, batch_size, seed, rank, world_size, repeats=repeats)
        sampler.set_epoch(epoch)
        return list(sampler)
    order, seeds = epoch_order(seed, epoch, size, repeats)
    mine = order[rank::world_size].tolist()
    aug = seeds.tolist()
    return [[(i, aug[i]) for i in mine[b:b + batch_size]]
            for b in range(0, len(mine), batch_size)]


class CacheBuilder:
    """Writes this rank's shards of a cache (see :func:`build_cache`)."""

    def __init__(self, cfg: KDConfig, info: DistInfo, epochs: int, top_k: int,
                 out: Path) -> None:
        self.cfg, self.dist, self.epochs, self.out = cfg, info, epochs, out
        data = cfg.data
        if cfg.teachers:
            raise ConfigError(f"kd cache-teacher stores one teacher's logits, and the config "
                              f"names {len(cfg.teachers)} teachers: unset teachers (set teacher)")
        if data.stream:
            raise ConfigError("kd cache-teacher needs an indexed training split (rows are "
                              "keyed by sample index); set data.stream=false")
        self.device = info.device
        self.channels = cfg.student.channels
        # The trainer's own data builder and batch preparer: cached rows belong to exactly the
        # images training reads and mixes.
        self.data = RunData(data, self.channels, cfg.seed,
                            Ranks(info.rank, info.world_size, info.local_world_size),
                            pin_memory=self.device.type == "cuda")
        self.train_set = self.data.train_set
        if not 1 <= top_k <= data.num_classes:
            raise ConfigError(f"--top-k {top_k}: choose 1 to data.num_classes={data.num_classes}")
        self.top_k = top_k
        self.teacher = build_teacher(cfg.teacher, data.num_classes)
        if self.teacher is None:
            raise ConfigError("kd cache-teacher needs a teacher: set teacher.checkpoint or "
                              "teacher.pretrained=true")
        if self.teacher.headless:
            raise ConfigError("kd cache-teacher stores a teacher's logits, and a headless teacher "
                              "(teacher.kwargs.num_classes=0) has none: unset it")
        # A teacher that cannot take the data fails here, before anything is written.
        check_model_input(self.teacher.model, self.teacher.norm, self.train_set[0][0][None],
                          section="teacher", name=cfg.teacher.name, image_size=data.image_size,
                          teacher_image_size=cfg.teacher.image_size,
                          grey_to_rgb=data.grey_to_rgb)
        self.teacher.to(self.device)
        self.preparer = BatchPreparer(data, cfg.seed, info.rank, self.device,
                                      cfg.train.label_smoothing)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        # The teacher as a live run holds it, so that cached and live logits agree.
        self.teacher.cast(teacher_dtype(cfg.teacher.dtype, self.precision))
        self.fields = cache_fields(data, cfg.teacher, cfg.seed, self.channels,
                                   len(self.train_set), info.world_size)
        self.fields["teacher.checkpoint sha256"] = checkpoint_sha256(cfg.teacher.checkpoint)

    # -- the plan and its resumption
    def plan(self) -> dict[str, Any]:
        return {"format": FORMAT, "fields": self.fields, "top_k": self.top_k,
                "world_size": self.dist.world_size, "precision": self.precision,
                "teacher_dtype": str(self.teacher.dtype).removeprefix("torch.")}

    def check_out(self) -> None:
        """A resumed build must be the same cache; rank 0 writes the plan of a new one."""
        plan_file = self.out / PLAN_FILE
        plan = self.plan()
        if plan_file.is_file():
            try:
                old = json.loads(plan_file.read_text())
            except ValueError:
                old = None
            if not isinstance(old, dict) or "fields" not in old:
                raise CacheError(f"--out {self.out}: {plan_file} is not a kd cache plan; use "
                                 f"another --out")
            # Every shard of a cache comes from the same teacher, weights and precision.
            keys = {"top_k": "--top-k", "world_size": "processes (of the build)",
                    "precision": "train.precision (resolved)", "teacher_dtype": "teacher.dtype"}
            diff = first_difference(
                {**old["fields"], **{name: old.get(k) for k, name in keys.items()}},
                {**plan["fields"], **{name: plan[k] for k, name in keys.items()}})
            if diff is not None:
                raise CacheError(f"--out {self.out} holds a cache begun for other settings "
                                 f"({diff}); resume it with the same settings, or use another "
                                 f"--out")
        elif self.out.exists() and any(self.out.iterdir()):
            raise CacheError(f"--out {self.out} is not empty and holds no kd cache; use an "
                             f"empty or new folder")

    def write_plan(self) -> None:
        plan_file = self.out / PLAN_FILE
        if self.dist.is_main and not plan_file.is_file():
            try:
                atomic_write_text(plan_file, json.dumps(self.plan(), indent=2) + "\n")
            except OSError as e:
                raise output_error(f"--out {self.out}: cannot write {PLAN_FILE}", e,
                                   setting="--out") from None

    def rows_per_epoch(self) -> int:
        """Rows all ranks write per epoch."""
        n, b, w = len(self.train_set), self.cfg.data.batch_size, self.dist.world_size
        return (n // (b * w)) * b * w if self.preparer.mixes else n

    def rank_rows_per_epoch(self) -> int:
        """Rows this rank writes per epoch."""
        n, w, r = self.rows_per_epoch(), self.dist.world_size, self.dist.rank
        return n // w + (r < n % w)

    def done(self, epoch: int) -> bool:
        """Whether this rank's shard of ``epoch`` is complete (shard and its record)."""
        shard = self.out / shard_name(epoch, self.dist.rank)
        record = shard.with_suffix(".json")
        if not (shard.is_file() and record.is_file()):
            return False
        try:
            return json.loads(record.read_text())["bytes"] == shard.stat().st_size
        except (ValueError, KeyError):
            return False

    # -- computing
    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(indices, seeds, teacher input) per batch of this rank's share of ``epoch``."""
        keys = rank_batches(len(self.train_set), self.cfg.data.batch_size, self.cfg.seed, epoch,
                            self.dist.rank, self.dist.world_size, self.preparer.mixes,
                            self.cfg.data.repeated_aug)
        loader = self.data.keyed_loader(keys)
        for b, (images, targets, _bad, index) in enumerate(loader):
            # With mixing, `keys` are this rank's training batches: b is the trainer's
            # micro-batch index in the epoch, so the mix seeds agree.
            batch = self.preparer(images, targets, epoch, b)
            seeds = torch.tensor([s for _, s in keys[b]], dtype=torch.int32)
            yield index, seeds, teacher_input(self.teacher, batch.images,
                                              self.cfg.teacher.image_size)

    @torch.no_grad()
    def write_epoch(self, epoch: int, progress: Any) -> dict[str, Any]:
        """Compute and write this rank's shard of ``epoch``; returns its record."""
        t0 = time.perf_counter()
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ROW_TENSORS}
        for index, seeds, x in self._batches(epoch):
            with self._autocast():
                logits = self.teacher(x)
            rows = top_k_rows(logits, self.top_k)  # stays on the device until the shard ends
            for key, value in (("index", index.int()), ("seed", seeds), *rows.items()):
                parts[key].append(value)
            progress.update(len(index))
        tensors = {k: torch.cat(v).cpu() if v else torch.empty(0) for k, v in parts.items()}
        shard = self.out / shard_name(epoch, self.dist.rank)
        # One metadata key: safetensors writes several in a random order, and a rebuilt shard
        # should have the same bytes (and checksum).
        save_weights(shard, tensors, {"kd_cache": f"format={FORMAT} epoch={epoch} "
                                                  f"rank={self.dist.rank}"})
        record = {"file": shard.name, "epoch": epoch, "rank": self.dist.rank,
                  "rows": len(tensors["index"]), "bytes": shard.stat().st_size,
                  "sha256": sha256_file(shard), "build_s": round(time.perf_counter() - t0, 3)}
        try:
            atomic_write_text(shard.with_suffix(".json"), json.dumps(record) + "\n")
        except OSError as e:
            raise output_error(f"--out {self.out}: cannot write {shard.name}'s record", e,
                               setting="--out") from None
        return record

    def _autocast(self) -> Any:
        return autocast(self.device, self.precision)

    def write_manifest(self, build_s: float) -> dict[str, Any]:
        """Rank 0, after every rank finished: the manifest that makes the cache usable."""
        shards = []
        for epoch in range(self.epochs):
            for rank in range(self.dist.world_size):
                record_file = (self.out / shard_name(epoch, rank)).with_suffix(".json")
                shards.append(json.loads(record_file.read_text()))
        rows = sum(s["rows"] for s in shards)
        total = sum(s["bytes"] for s in shards)
        manifest = {
            **self.plan(), "kd_version": __version__, "epochs": self.epochs,
            "teacher_sha256": teacher_hash(self.teacher.model),
            "teacher_dtype": str(self.teacher.dtype).removeprefix("torch."),
            "values_dtype": "float16", "indices_dtype": str(index_dtype(
                self.cfg.data.num_classes)).removeprefix("torch."),
            "row_bytes": row_bytes(self.top_k, self.cfg.data.num_classes),
            "rows": rows, "bytes": total,
            "bytes_per_image_epoch": round(total / max(rows, 1), 2),
            "build_s": round(build_s, 3),
            "teacher_s": round(sum(s["build_s"] for s in shards), 3),
            "shards": shards,
        }
        atomic_write_text(self.out / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        fsync_dir(self.out)
        return manifest

def build_cache(cfg: KDConfig, info: DistInfo, epochs: int, top_k: int,
                out: str | Path) -> dict[str, Any] | None:
    """Run the teacher over ``epochs`` epochs and write a cache into ``out`` (every rank of
    ``info`` takes part). Finished shards of an interrupted build are kept. Returns the manifest
    on rank 0."""
    from tqdm import tqdm

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: give at least 1")
    out = Path(out)
    builder = CacheBuilder(cfg, info, epochs, top_k, out)
    builder.check_out()
    if builder.dist.is_main:
        remove_temporaries(out)
    barrier()  # every rank has read the old plan before rank 0 writes a new one
    builder.write_plan()
    todo = [e for e in range(epochs) if not builder.done(e)]
    n = builder.rows_per_epoch()
    est = n * epochs * row_bytes(top_k, cfg.data.num_classes)
    if builder.dist.is_main:
        log.info("kd cache-teacher: %d images x %d epochs x %d bytes (top-%d of %d classes) = "
                 "%s in %s; %d of %d epochs to compute (%d processes)", n, epochs,
                 row_bytes(top_k, cfg.data.num_classes), top_k, cfg.data.num_classes,
                 format_bytes(est, si=True), out, len(todo), epochs, builder.dist.world_size)
    t0 = time.perf_counter()
    with tqdm(total=builder.rank_rows_per_epoch() * len(todo), unit="img",
              disable=not builder.dist.is_main, desc="teacher outputs",
              dynamic_ncols=True) as progress:
        for epoch in todo:
            builder.write_epoch(epoch, progress)
    barrier()
    if not builder.dist.is_main:
        return None
    try:
        manifest = builder.write_manifest(time.perf_counter() - t0)
    except OSError as e:
        raise output_error(f"--out {out}: cannot write {MANIFEST_FILE}", e,
                           setting="--out") from None
    log.info("kd cache-teacher: wrote %s (%d rows, %.1f bytes per image-epoch) in %.1f s",
             format_bytes(manifest["bytes"], si=True), manifest["rows"],
             manifest["bytes_per_image_epoch"],
             manifest["build_s"])
    return manifest


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files an interrupted build left (shards it had not finished)."""
    for tmp in out.glob(".*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
