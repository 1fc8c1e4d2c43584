"""Teacher-output cache: run the frozen teacher once, then distil for many epochs without it.

``kd cache-teacher`` runs the teacher over E epochs of the training split exactly as training
will see them: the same order seed, the same per-sample augmentation seeds and, with
Mixup/CutMix, the same mixed batches. Per image and epoch it stores the augmentation seed and
the teacher's top-K logits. A run with ``distill.teacher_cache: DIR`` never builds the teacher:
its data pipeline replays the recorded seeds (and mix pairs), and the loss reads the teacher's
outputs from the cache (TinyViT, Wu et al. 2022, made this practical for ImageNet).

**Layout of a cache folder**::

    plan.json                        what is being built (written first; a resumed build
                                     must match it)
    epoch0003-rank01.safetensors     the rows rank 1 computed for epoch 3
    epoch0003-rank01.json            that shard's rows, size, sha256 and build time (written
                                     after it: a shard without one is unfinished)
    manifest.json                    written last by rank 0: the plan, every shard's size and
                                     checksum, totals

**A row** (one image in one epoch) holds the dataset ``index`` (int32), the augmentation
``seed`` (int32), the top-K logits ``values`` (fp16, largest first), their class ``indices``
(int16, int32 beyond 32,767 classes) and ``rest``, the log-sum-exp of the other C − K logits
(fp32): 4K + 12 bytes.

**The distribution the student learns from.** :func:`densify` rebuilds a full logit vector: the
top-K classes get their stored logits and each of the other C − K classes the same logit,
``rest − log(C − K)``, so that they share the remaining probability mass equally. At
temperature 1 the teacher's top-K probabilities and the total mass of the rest are exact; at
another temperature the rest is still spread evenly (only its total differs from the full
teacher's, as if the other logits were equal). With K = C nothing is approximated beyond fp16
rounding. Hard KD uses the stored argmax (``indices[:, 0]``), the densified vector's argmax.

**Which samples an epoch holds.** Without Mixup/CutMix every rank writes its share of *every*
image of the epoch (no tail dropped), keyed by dataset index, so a cache built by any number of
processes serves a run with any number of processes and any batch size. With Mixup/CutMix a
row holds the teacher's output for a *mixed* image, which depends on the batch it was mixed in:
the cache then records exactly the training batches of ``data.batch_size`` × processes, and a
run must use the same two numbers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from kd import __version__
from kd.core.checkpoint import _fsync_dir, _sha256, atomic_write_text, save_weights
from kd.core.precision import autocast, resolve_precision
from kd.data.batch import BatchPreparer
from kd.errors import CacheError, ConfigError, output_error

log = logging.getLogger("kd")

# 2: kd's own posterize and random erasing (kd.data.augment) changed the augmented images of
# recipes with data.re_prob or RandAugment, so caches of format 1 no longer match their runs.
FORMAT = 2
PLAN_FILE, MANIFEST_FILE = "plan.json", "manifest.json"
# Config keys a cache must share with the run that reads it (checked one by one, named when
# they differ). ``seed`` orders the data and draws the augmentation seeds.
DATA_KEYS = ("data.name", "data.root", "data.train_shards", "data.hf_image_key",
             "data.hf_label_key", "data.num_classes", "data.labels_per_class",
             "data.subset_seed", "data.transfer_set", "data.image_size", "seed")
AUGMENT_KEYS = ("data.augment", "data.auto_augment", "data.color_jitter", "data.re_prob",
                "data.scale", "data.hflip", "data.mixup", "data.cutmix", "data.mixup_prob",
                "data.mixup_switch_prob", "data.mixup_mode")
TEACHER_KEYS = ("teacher.name", "teacher.kwargs", "teacher.checkpoint", "teacher.pretrained",
                "teacher.mean", "teacher.std", "teacher.image_size")
ROW_TENSORS = ("index", "seed", "values", "indices", "rest")


def row_bytes(top_k: int, num_classes: int) -> int:
    """Bytes one image-epoch takes in a shard (4K + 12 up to 32,767 classes).

    Example:
        >>> row_bytes(10, 1000), row_bytes(10, 50_000)
        (52, 72)
    """
    return 4 + 4 + 2 * top_k + index_dtype(num_classes).itemsize * top_k + 4


def index_dtype(num_classes: int) -> torch.dtype:
    """The narrowest integer type that holds every class index."""
    return torch.int16 if num_classes <= 32_767 else torch.int32


def mixes(data_cfg: Any) -> bool:
    """Whether training mixes images (Mixup/CutMix), so rows depend on batch composition."""
    return data_cfg.mixup > 0 or data_cfg.cutmix > 0


def cache_fields(cfg: Any, channels: int, dataset_size: int, world_size: int) -> dict[str, Any]:
    """The settings a cache and the run reading it must share, by config key."""
    fields = {key: _plain(OmegaConf.select(cfg, key)) for key in
              (*DATA_KEYS, *AUGMENT_KEYS, *TEACHER_KEYS)}
    fields["channels"] = channels
    fields["dataset size"] = dataset_size
    if mixes(cfg.data):  # mixed rows depend on how samples were batched
        fields["data.batch_size"] = cfg.data.batch_size
        fields["processes"] = world_size
    return fields


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def first_difference(cached: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting whose values differ, as ``key: cache has X, this run Y``."""
    for key in sorted(set(cached) | set(current)):
        if cached.get(key) != current.get(key):
            return (f"{key}: the cache has {json.dumps(cached.get(key))}, this run "
                    f"{json.dumps(current.get(key))}")
    return None


def teacher_hash(model: torch.nn.Module) -> str:
    """sha256 over the teacher's state dict (names, dtypes, shapes and bytes, in name order)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def checkpoint_sha256(cfg: Any) -> str | None:
    """sha256 of the ``teacher.checkpoint`` file, when one is set and present here."""
    from kd.core.models import resolve_path

    if not cfg.teacher.checkpoint:
        return None
    path = resolve_path(cfg.teacher.checkpoint)
    return _sha256(path) if path.is_file() else None


def shard_name(epoch: int, rank: int) -> str:
    return f"epoch{epoch:04d}-rank{rank:02d}.safetensors"


# ----------------------------------------------------------------------------------- rows
def top_k_rows(logits: torch.Tensor, top_k: int) -> dict[str, torch.Tensor]:
    """The stored form of a batch of teacher logits: top-K values and indices, and ``rest``
    (the log-sum-exp of the other logits; -inf when K is the number of classes)."""
    logits = logits.float()
    values, indices = logits.topk(top_k, dim=-1)
    rest = logits.scatter(1, indices, float("-inf")).logsumexp(dim=-1)
    return {"values": values.half(), "indices": indices.to(index_dtype(logits.shape[-1])),
            "rest": rest}


def densify(values: torch.Tensor, indices: torch.Tensor, rest: torch.Tensor,
            num_classes: int) -> torch.Tensor:
    """Full (B, C) fp32 teacher logits from top-K rows: the other C − K classes share the
    remaining mass equally (see the module docstring)."""
    top_k = values.shape[-1]
    if top_k == num_classes:
        fill = torch.zeros_like(rest)  # no class is left to fill
    else:
        fill = rest.float() - math.log(num_classes - top_k)
    dense = fill[:, None].expand(-1, num_classes).clone()
    return dense.scatter_(1, indices.long(), values.float())


# ----------------------------------------------------------------------------------- reading
class TeacherCache:
    """A finished cache, checked against the run that reads it.

    Rows are looked up by (data epoch, dataset index); an epoch's rows are read (and their
    checksums verified) the first time that epoch is asked for.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], cycle: bool) -> None:
        self.path, self.manifest, self.cycle = path, manifest, cycle
        self.epochs = int(manifest["epochs"])
        self.top_k = int(manifest["top_k"])
        self.num_classes = int(manifest["fields"]["data.num_classes"])
        self.size = int(manifest["fields"]["dataset size"])
        self._tables: dict[int, dict[str, torch.Tensor]] = {}

    @classmethod
    def open(cls, cfg: Any, channels: int, dataset_size: int, world_size: int) -> TeacherCache:
        """Open ``cfg.distill.teacher_cache``; any difference from this run's config, a missing
        or resized shard is a :class:`~kd.errors.CacheError` naming it."""
        path = Path(cfg.distill.teacher_cache)
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT:
            raise CacheError(f"distill.teacher_cache: {path} has cache format "
                             f"{manifest.get('format')}, this kd reads {FORMAT}; rebuild it "
                             f"with kd cache-teacher")
        current = cache_fields(cfg, channels, dataset_size, world_size)
        # The teacher's weights: compared when its checkpoint is on this machine too (a cache is
        # often trained from where the teacher is not).
        cached_sha = manifest["fields"].get("teacher.checkpoint sha256")
        here = checkpoint_sha256(cfg) if cached_sha else None
        current["teacher.checkpoint sha256"] = here if here else cached_sha
        diff = first_difference(manifest["fields"], current)
        if diff is not None:
            raise CacheError(f"distill.teacher_cache: {path} was built for another config: "
                             f"{diff}; rebuild it for this config (kd cache-teacher) or use "
                             f"the cache's setting")
        wanted = cfg.distill.cache_top_k
        if wanted is not None and wanted != manifest["top_k"]:
            raise CacheError(f"distill.cache_top_k={wanted} but {path} holds the top "
                             f"{manifest['top_k']} teacher logits; set distill.cache_top_k="
                             f"{manifest['top_k']} (or null) or rebuild it with --top-k {wanted}")
        for shard in manifest["shards"]:
            file = path / shard["file"]
            if not file.is_file():
                raise CacheError(f"distill.teacher_cache: shard {file} is missing; rebuild the "
                                 f"cache (kd cache-teacher resumes and rewrites missing shards)")
            if file.stat().st_size != shard["bytes"]:
                raise CacheError(f"distill.teacher_cache: shard {file} has "
                                 f"{file.stat().st_size} bytes, the manifest says "
                                 f"{shard['bytes']}: it is damaged; delete it and rerun kd "
                                 f"cache-teacher to rewrite it")
        return cls(path, manifest, bool(cfg.distill.cache_cycle))

    def check_epochs(self, needed: int) -> None:
        """Training for more epochs than were cached needs ``distill.cache_cycle``."""
        if needed > self.epochs and not self.cycle:
            raise CacheError(f"distill.teacher_cache: training runs {needed} epochs but "
                             f"{self.path} holds {self.epochs}; build more (kd cache-teacher "
                             f"--epochs {needed}), train fewer (train.epochs/train.max_steps), "
                             f"or set distill.cache_cycle=true to replay the cached epochs")

    def data_epoch(self, epoch: int) -> int:
        """The cached epoch that training epoch ``epoch`` replays."""
        return epoch % self.epochs

    def seeds(self, epoch: int) -> torch.Tensor:
        """The recorded augmentation seed of every sample in data epoch ``epoch``."""
        return self._table(epoch)["seed"]

    def lookup(self, epoch: int, index: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows of data epoch ``epoch`` for dataset indices ``index`` (CPU tensors)."""
        table = self._table(epoch)
        covered = table["covered"][index]
        if not bool(covered.all()):
            missing = int(index[~covered][0])
            raise CacheError(f"distill.teacher_cache: {self.path} holds no teacher output for "
                             f"sample {missing} of epoch {epoch}; the cache was built for "
                             f"other batches (data.batch_size, processes)")
        return table["values"][index], table["indices"][index], table["rest"][index]

    def _table(self, epoch: int) -> dict[str, torch.Tensor]:
        if epoch not in self._tables:
            if len(self._tables) >= 2:  # the current epoch and the next are enough
                self._tables.pop(next(iter(self._tables)))
            self._tables[epoch] = self._read_epoch(epoch)
        return self._tables[epoch]

    def _read_epoch(self, epoch: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load

        n, k = self.size, self.top_k
        table = {"values": torch.zeros(n, k, dtype=torch.float16),
                 "indices": torch.zeros(n, k, dtype=index_dtype(self.num_classes)),
                 "rest": torch.zeros(n), "seed": torch.zeros(n, dtype=torch.int64),
                 "covered": torch.zeros(n, dtype=torch.bool)}
        for shard in self.manifest["shards"]:
            if shard["epoch"] != epoch:
                continue
            file = self.path / shard["file"]
            data = file.read_bytes()
            if hashlib.sha256(data).hexdigest() != shard["sha256"]:
                raise CacheError(f"distill.teacher_cache: shard {file} is corrupt (its sha256 "
                                 f"differs from the manifest's); delete it and rerun kd "
                                 f"cache-teacher to rewrite it")
            rows = load(data)
            index = rows["index"].long()
            for key in ("values", "indices", "rest", "seed"):
                table[key][index] = rows[key].to(table[key].dtype)
            table["covered"][index] = True
        return table


def read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST_FILE
    if not path.is_dir():
        raise CacheError(f"distill.teacher_cache: folder not found: {path} (build it with kd "
                         f"cache-teacher -c <config> --epochs E --top-k K --out {path})")
    if not file.is_file():
        unfinished = " (an unfinished build: rerun kd cache-teacher to finish it)" if (
            path / PLAN_FILE).is_file() else ""
        raise CacheError(f"distill.teacher_cache: no {MANIFEST_FILE} in {path}{unfinished}")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise CacheError(f"distill.teacher_cache: {file} is not valid JSON ({e}); rebuild the "
                         f"cache with kd cache-teacher") from None
    missing = [k for k in ("fields", "shards", "epochs", "top_k") if k not in manifest] \
        if isinstance(manifest, dict) else ["fields"]
    if missing:
        raise CacheError(f"distill.teacher_cache: {file} is not a kd cache manifest (no "
                         f"'{missing[0]}'); rebuild the cache with kd cache-teacher")
    return manifest


# ----------------------------------------------------------------------------------- building
def rank_batches(size: int, batch_size: int, seed: int, epoch: int, rank: int, world_size: int,
                 mixing: bool) -> list[list[tuple[int, int]]]:
    """The ``(index, augmentation seed)`` batches rank ``rank`` computes for one epoch.

    Mixing: exactly this rank's training batches (:class:`~kd.data.TrainBatchSampler`).
    Otherwise every sample of the epoch, dealt round-robin from the epoch's order (the last
    batch may be short), so any training layout finds every index.
    """
    from kd.data.sampler import TrainBatchSampler, epoch_order

    if mixing:
        sampler = TrainBatchSampler(size, batch_size, seed, rank, world_size)
        sampler.set_epoch(epoch)
        return list(sampler)
    order, seeds = epoch_order(seed, epoch, size)
    mine = order[rank::world_size].tolist()
    aug = seeds.tolist()
    return [[(i, aug[i]) for i in mine[b:b + batch_size]]
            for b in range(0, len(mine), batch_size)]


class CacheBuilder:
    """Writes this rank's shards of a cache (see :func:`build_cache`)."""

    def __init__(self, cfg: Any, epochs: int, top_k: int, out: Path) -> None:
        from kd.core.dist import init_distributed
        from kd.core.models import build_teacher, check_model_input, teacher_dtype
        from kd.data.datasets import build_split

        self.cfg, self.epochs, self.out = cfg, epochs, out
        dc = cfg.data
        if dc.stream:
            raise ConfigError("kd cache-teacher needs an indexed training split (rows are "
                              "keyed by sample index); set data.stream=false")
        self.dist = init_distributed(cfg.dist, cfg.train.device)
        self.device = self.dist.device
        self.channels = cfg.student.kwargs.get("in_chans", 3)
        self.train_set = build_split(dc, "train", self.channels, seed=cfg.seed)
        if not 1 <= top_k <= dc.num_classes:
            raise ConfigError(f"--top-k {top_k}: choose 1 to data.num_classes={dc.num_classes}")
        self.top_k = top_k
        self.teacher = build_teacher(cfg.teacher, dc.num_classes)
        if self.teacher is None:
            raise ConfigError("kd cache-teacher needs a teacher: set teacher.checkpoint or "
                              "teacher.pretrained=true")
        # A teacher that cannot take the data fails here, before anything is written.
        check_model_input(self.teacher.model, self.teacher.norm, self.train_set[0][0][None],
                          section="teacher", name=cfg.teacher.name, image_size=dc.image_size,
                          teacher_image_size=cfg.teacher.image_size, grey_to_rgb=dc.grey_to_rgb)
        self.teacher.to(self.device)
        # The trainer's own preparer: cached rows belong to exactly the images training mixes.
        self.preparer = BatchPreparer(dc, cfg.seed, self.dist.rank, self.device,
                                      cfg.train.label_smoothing)
        self.precision = resolve_precision(cfg.train.precision, self.device)
        # The teacher as a live run holds it, so that cached and live logits agree.
        self.teacher.cast(teacher_dtype(cfg.teacher.dtype, self.precision))
        self.fields = cache_fields(cfg, self.channels, len(self.train_set), self.dist.world_size)
        self.fields["teacher.checkpoint sha256"] = checkpoint_sha256(cfg)

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
        from torch.utils.data import DataLoader

        from kd.core.task import teacher_input
        from kd.data.datasets import WithIndex, collate

        dc = self.cfg.data
        keys = rank_batches(len(self.train_set), dc.batch_size, self.cfg.seed, epoch,
                            self.dist.rank, self.dist.world_size, self.preparer.mixes)
        workers = self.num_workers
        loader = DataLoader(WithIndex(self.train_set), batch_sampler=keys, collate_fn=collate,
                            num_workers=workers, prefetch_factor=dc.prefetch_factor if workers
                            else None, pin_memory=self.device.type == "cuda")
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
                  "sha256": _sha256(shard), "build_s": round(time.perf_counter() - t0, 3)}
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
        _fsync_dir(self.out)
        return manifest

    @property
    def num_workers(self) -> int:
        if not hasattr(self, "_num_workers"):
            from kd.config import to_container
            from kd.data.tuning import resolve_num_workers

            dc = self.cfg.data
            self._num_workers = resolve_num_workers(
                dc.num_workers, self.train_set, dc.batch_size, self.dist.local_world_size,
                cache_key={"data": to_container(dc), "channels": self.channels},
                seed=self.cfg.seed, prefetch_factor=dc.prefetch_factor,
                pin_memory=self.device.type == "cuda")
        return self._num_workers


def build_cache(cfg: Any, epochs: int, top_k: int, out: str | Path) -> dict[str, Any] | None:
    """Run the teacher over ``epochs`` epochs and write a cache into ``out`` (every rank takes
    part). Finished shards of an interrupted build are kept. Returns the manifest on rank 0."""
    from tqdm import tqdm

    from kd.core.dist import barrier

    if epochs < 1:
        raise ConfigError(f"--epochs {epochs}: give at least 1")
    out = Path(out)
    builder = CacheBuilder(cfg, epochs, top_k, out)
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
                 human_size(est), out, len(todo), epochs, builder.dist.world_size)
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
             human_size(manifest["bytes"]), manifest["rows"], manifest["bytes_per_image_epoch"],
             manifest["build_s"])
    return manifest


def human_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable: the loop returns at TB")


def remove_temporaries(out: Path) -> None:
    """Delete the temporary files an interrupted build left (shards it had not finished)."""
    for tmp in out.glob(".*"):
        if tmp.is_file():
            tmp.unlink(missing_ok=True)
