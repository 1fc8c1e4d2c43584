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

**A row** (one image in one epoch) holds the dataset ``index`` (int32; with
``data.repeated_aug`` N the slot, image × N + copy, so each copy keeps its own row), the
augmentation ``seed`` (int32), the top-K logits ``values`` (fp16, largest first), their class
``indices`` (int16, int32 beyond 32,767 classes) and ``rest``, the log-sum-exp of the other
C − K logits
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

import copy
import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch

from kd.config import DataConfig, DistillConfig, TeacherConfig
from kd.core.checkpoint import sha256_file
from kd.core.models import resolve_path
from kd.errors import CacheError

log = logging.getLogger("kd")

# 2: kd's own posterize and random erasing (kd.data.augment) changed the augmented images of
# recipes with data.re_prob or RandAugment, so caches of format 1 no longer match their runs.
# 3: data.pipeline (kd's tensor transform, the default) changed the augmented pixels of image
# datasets.
FORMAT = 3
PLAN_FILE, MANIFEST_FILE = "plan.json", "manifest.json"
# Config keys a cache must share with the run that reads it (checked one by one, named when
# they differ). ``seed`` orders the data and draws the augmentation seeds.
DATA_KEYS = ("data.name", "data.root", "data.train_shards", "data.hf_image_key",
             "data.hf_label_key", "data.num_classes", "data.labels_per_class",
             "data.subset_seed", "data.transfer_set", "data.image_size")
AUGMENT_KEYS = ("data.augment", "data.pipeline", "data.decode", "data.auto_augment",
                "data.color_jitter",
                "data.re_prob", "data.scale", "data.hflip", "data.mixup", "data.cutmix",
                "data.mixup_prob", "data.mixup_switch_prob", "data.mixup_mode")
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


def mixes(data: DataConfig) -> bool:
    """Whether training mixes images (Mixup/CutMix), so rows depend on batch composition."""
    return data.mixup > 0 or data.cutmix > 0


def cache_fields(data: DataConfig, teacher: TeacherConfig, seed: int, channels: int,
                 dataset_size: int, world_size: int) -> dict[str, Any]:
    """The settings a cache and the run reading it must share, by config key."""
    sections = {"data": data, "teacher": teacher}
    fields: dict[str, Any] = {}
    for key in (*DATA_KEYS, *AUGMENT_KEYS, *TEACHER_KEYS):
        section, _, name = key.partition(".")
        fields[key] = copy.deepcopy(getattr(sections[section], name))
        if key == DATA_KEYS[-1]:
            fields["seed"] = seed
    if data.repeated_aug > 1:  # rows are slots (image × copy); absent when off, as in old caches
        fields["data.repeated_aug"] = data.repeated_aug
    fields["channels"] = channels
    fields["dataset size"] = dataset_size
    if mixes(data):  # mixed rows depend on how samples were batched
        fields["data.batch_size"] = data.batch_size
        fields["processes"] = world_size
    return fields


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


def checkpoint_sha256(checkpoint: str | None) -> str | None:
    """sha256 of the ``teacher.checkpoint`` file, when one is set and present here."""
    if not checkpoint:
        return None
    path = resolve_path(checkpoint)
    return sha256_file(path) if path.is_file() else None


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
    def open(cls, settings: DistillConfig, fields: dict[str, Any],
             teacher_checkpoint: str | None) -> TeacherCache:
        """Open ``settings.teacher_cache`` for a run whose :func:`cache_fields` are ``fields``;
        any difference from them, a missing or resized shard is a
        :class:`~kd.errors.CacheError` naming it."""
        assert settings.teacher_cache is not None
        path = Path(settings.teacher_cache)
        manifest = read_manifest(path)
        if manifest.get("format") != FORMAT:
            raise CacheError(f"distill.teacher_cache: {path} has cache format "
                             f"{manifest.get('format')}, this kd reads {FORMAT}; rebuild it "
                             f"with kd cache-teacher")
        current = dict(fields)
        # The teacher's weights: compared when its checkpoint is on this machine too (a cache is
        # often trained from where the teacher is not).
        cached_sha = manifest["fields"].get("teacher.checkpoint sha256")
        here = checkpoint_sha256(teacher_checkpoint) if cached_sha else None
        current["teacher.checkpoint sha256"] = here if here else cached_sha
        diff = first_difference(manifest["fields"], current)
        if diff is not None:
            raise CacheError(f"distill.teacher_cache: {path} was built for another config: "
                             f"{diff}; rebuild it for this config (kd cache-teacher) or use "
                             f"the cache's setting")
        wanted = settings.cache_top_k
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
        return cls(path, manifest, settings.cache_cycle)

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
        """Rows of data epoch ``epoch`` for dataset indices (slots) ``index`` (CPU tensors)."""
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
