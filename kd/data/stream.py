"""WebDataset shards streamed through a shuffle buffer (``data.name=wds``, ``data.stream=true``).

Streaming reads each shard front to back, once per epoch, instead of indexing every sample at
start-up (:mod:`kd.data.wds`). That suits shards on shared storage (FSx for Lustre, EFS, NFS,
a FUSE mount of S3), where sequential reads are fast and random seeks are not, and splits too
large to scan at every start.

How an epoch is read:

* **Readers.** A rank's loader runs ``slots`` readers (one per data-loader worker, or one in
  the main process without workers), so a job has ``units = world_size * slots`` readers.
* **Shard split.** Each epoch (and each further pass over the shards, see below) the shard list
  is shuffled with ``(seed, epoch, pass)``; reader ``u`` takes shards ``u, u + units, …`` of it.
  With fewer shards than readers, every reader reads every shard and keeps every ``units``-th
  sample (a warning says so: it multiplies the reading ``units`` times over).
* **Shuffle buffer.** Each reader feeds its samples through a buffer of ``data.shuffle_buffer``
  samples and emits a random one of them for each sample read in (the usual WebDataset
  shuffle), then the rest in random order at the end of its shards; the buffer's generator is
  seeded with ``(seed, epoch, unit)`` and also draws each emitted sample's augmentation seed.
* **Equal steps.** Every rank takes ``data.train_samples // (world_size * batch_size)`` batches
  per epoch, so collectives stay in lock-step whatever the shard sizes: a reader that runs out
  of shards starts another pass over a new shuffle of them, and a reader with samples left over
  at the end of the epoch drops them. ``data.train_samples`` defaults to the split's real size,
  counted by a header scan of the shards that is cached on disk by shard path, size and
  modification time, so only the first run of a split pays for it.

**Exact resume.** Batch ``i`` of a rank comes from reader ``i % slots`` of that rank, as the
``i // slots``-th batch of its stream, whichever worker process builds it: the sampler hands
out *keys* ``(epoch, units, unit, position)`` and the dataset reads the reader's stream up to
that position, keeping each reader's stream open between batches. The stream is a pure
function of the seed, the epoch and the reader, so a resumed run reads its readers' streams
again up to the batch it resumes from (reading the skipped samples' bytes without decoding
them) and continues with exactly the batches an uninterrupted run would have seen. That holds
when the resumed run has the same world size and the same number of readers; the number of
readers is saved in checkpoints and reused on resume, whatever ``data.num_workers`` now says
(with a warning when that costs extra reading, see :class:`StreamBatchSampler`).

**Unreadable data.** A shard that is not a complete tar file (its size is not a multiple of 512
bytes, or it does not end with the two zero blocks that close a tar archive: an interrupted
copy) is a :class:`~kd.errors.DataError` at start-up. A sample whose image does not decode or
whose label member is missing or unreadable is replaced by another sample of the same batch and
counted as bad (``data.on_error=skip``), or stops the run naming it (``fail``). A shard that
turns out unreadable part-way (damaged inside) ends that shard for the reader: counted as one
bad entry naming the shard, or a DataError with ``fail``.

Validation stays on the indexed reader (:class:`kd.data.wds.WdsDataset`): evaluation needs every
sample exactly once across ranks, and validation splits are small enough to index.
"""

from __future__ import annotations

import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from kd.data.cache_dir import default_cache_dir
from kd.data.datasets import (
    SAMPLE_ERRORS,
    KeyedDataset,
    build_image_transform,
    label_out_of_range,
    load_image,
)
from kd.data.wds import IMAGE_EXTS, LABEL_EXTS, find_shards, parse_label, scan_shard, split_name
from kd.errors import DataError

log = logging.getLogger("kd")

StreamKey = tuple[int, int, int, int]  # (epoch, units, unit, position in the unit's stream)
END_OF_ARCHIVE = tarfile.NUL * (2 * tarfile.BLOCKSIZE)
MAX_STREAMS = 4  # reader streams kept open per process (a worker normally needs one)


def check_complete(path: Path) -> None:
    """Raise DataError unless ``path`` looks like a whole tar file (see the module docstring).

    A copy cut anywhere, even between two members, fails: its size is not a multiple of the tar
    block size, or its last two blocks are not the zero blocks that end an archive (the last
    block of a member's data holds at least one byte of it).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            f.seek(max(size - len(END_OF_ARCHIVE), 0))
            tail = f.read()
    except OSError as e:
        raise DataError(f"wds shard {path} cannot be read: {e.strerror}") from None
    if size % tarfile.BLOCKSIZE or size < len(END_OF_ARCHIVE) or tail != END_OF_ARCHIVE:
        raise DataError(f"wds shard {path} is not a complete tar file ({size} bytes, no "
                        f"end-of-archive blocks): is it truncated or compressed? Re-copy it or "
                        f"leave it out of the shard pattern")


# ------------------------------------------------------------------------- sample counts
def _count_cache_path() -> Path:
    return default_cache_dir() / "wds_counts.json"


def count_samples(shards: list[Path]) -> int:
    """Samples in ``shards`` (keys with an image member), by a header scan cached on disk.

    The cache maps a shard's absolute path, size and modification time to its count, so a
    changed shard is counted again. It is a convenience: any failure to read or write it only
    costs a scan.
    """
    path = _count_cache_path()
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    total, scanned, start = 0, 0, time.perf_counter()
    for shard in shards:
        st = shard.stat()
        key = f"{shard.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        if key not in cache:
            cache[key] = len(scan_shard(shard, labels=False).names)
            scanned += 1
        total += cache[key]
    if scanned:
        log.info("wds: counted %d samples in %d shards in %.1f s (cached; set "
                 "data.train_samples=%d to skip counting)", total, scanned,
                 time.perf_counter() - start, total)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, path)
        except OSError as e:
            log.warning("wds: could not cache shard sample counts in %s: %s", path, e)
    return total


# ------------------------------------------------------------------------------ reading
@dataclass
class RawSample:
    """One sample as read from a shard: the image bytes and the label (or why it has none)."""

    where: str  # "<shard>:<key>", for messages
    image: bytes | None
    label: int
    error: str | None = None


def read_shard(path: str, labels: bool) -> Iterator[RawSample]:
    """The samples of one shard, in file order (members of a sample are adjacent, by key).

    Raises:
        tarfile.TarError, OSError: the shard is damaged (the caller decides what that means).
    """
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, group = None, {}
        for info in tar:
            if not info.isfile():
                continue
            k, ext = split_name(info.name)
            if k != key:
                if group:
                    yield _raw_sample(path, key, group, labels)
                key, group = k, {}
            member = tar.extractfile(info)
            group[ext] = member.read() if member is not None else b""
        if group:
            yield _raw_sample(path, key, group, labels)
        # tarfile ends an archive quietly at an invalid header: the end is real only where the
        # end-of-archive zero blocks are.
        f.seek(tar.offset)
        if f.read(len(END_OF_ARCHIVE)) != END_OF_ARCHIVE:
            raise tarfile.ReadError(f"invalid tar header at byte {tar.offset}")


def _raw_sample(path: str, key: str | None, group: dict[str, bytes], labels: bool) -> RawSample:
    where = f"{path}:{key}"
    image = next((group[e] for e in IMAGE_EXTS if e in group), None)
    if image is None:
        return RawSample(where, None, -1, "")  # metadata only: not a sample (dropped)
    if not labels:
        return RawSample(where, image, -1)
    ext = next((e for e in LABEL_EXTS if e in group), None)
    if ext is None:
        return RawSample(where, image, -1, "no label member (.cls, .cls.txt or .json)")
    try:
        label = parse_label(ext, group[ext])
    except (ValueError, UnicodeDecodeError) as e:
        return RawSample(where, image, -1, f"unreadable label member: {e}")
    if label < 0:
        return RawSample(where, image, -1, f"negative label {label}")
    return RawSample(where, image, label)


@dataclass
class _Emitted:
    sample: RawSample
    seed: int


@dataclass
class ReaderStream:
    """The endless, deterministic sample stream of one reader ``unit`` of ``units`` in an epoch."""

    shards: list[str]
    seed: int
    epoch: int
    units: int
    unit: int
    buffer_size: int
    labels: bool
    on_error: str
    position: int = 0  # samples emitted so far
    bad: list[str] = field(default_factory=list)  # damaged shards met since the last take
    _it: Iterator[_Emitted] | None = None

    def _shard_pass(self, pass_: int) -> Iterator[RawSample]:
        g = np.random.default_rng([self.seed, self.epoch, pass_, 0x5A4D])
        order = [self.shards[i] for i in g.permutation(len(self.shards))]
        few = len(order) < self.units
        mine = order if few else order[self.unit::self.units]
        n = 0  # samples seen in this pass (for the split by sample when shards are few)
        for path in mine:
            try:
                for s in read_shard(path, self.labels):
                    if s.image is None:
                        continue
                    if not few or n % self.units == self.unit:
                        yield s
                    n += 1
            except (tarfile.TarError, OSError, EOFError) as e:
                msg = f"wds shard {path} is damaged part-way ({e})"
                if self.on_error == "fail":
                    raise DataError(f"{msg} (data.on_error=fail; set data.on_error=skip to "
                                    f"skip the rest of it)") from None
                log.warning("%s: skipping the rest of it", msg)
                self.bad.append(f"{path}: damaged part-way ({e})")

    def _emit(self) -> Iterator[_Emitted]:
        g = np.random.default_rng([self.seed, self.epoch, self.unit, 0xB0F])
        for pass_ in range(1_000_000):  # endless: the epoch's length is the sampler's business
            buffer: list[RawSample] = []
            for s in self._shard_pass(pass_):
                if len(buffer) < self.buffer_size:
                    buffer.append(s)
                    continue
                j = int(g.integers(len(buffer)))
                out, buffer[j] = buffer[j], s
                yield _Emitted(out, int(g.integers(2**31 - 1)))
            if not buffer:
                raise DataError(f"wds reader {self.unit} of {self.units} found no samples in "
                                f"its shards")
            # Drained at the end of each pass: a reader whose shards hold exactly its share of
            # the epoch emits each of its samples once.
            for j in g.permutation(len(buffer)):
                yield _Emitted(buffer[j], int(g.integers(2**31 - 1)))

    def take(self, n: int) -> list[_Emitted]:
        """The next ``n`` samples of the stream."""
        if self._it is None:
            self._it = self._emit()
        out = [next(self._it) for _ in range(n)]
        self.position += n
        return out

    def skip(self, n: int) -> None:
        """Read past ``n`` samples without decoding them."""
        self.take(n)


class WdsStreamDataset(KeyedDataset):
    """The training split of a WebDataset, streamed (see the module docstring).

    Indexed by :data:`StreamKey` batches from :class:`StreamBatchSampler` (``__getitems__``);
    ``dataset[(i, seed)]`` reads sample ``i`` of a single reader's stream of epoch 0 (for
    checks and probes), augmented with ``seed`` (None: not augmented).
    """

    channels = 3

    def __init__(self, shards: list[Path], *, image_size: int, train: bool, num_classes: int,
                 seed: int, buffer_size: int, num_samples: int | None = None,
                 labels: bool = True, transform_kwargs: dict[str, Any] | None = None,
                 pattern: str = "", on_error: str = "skip") -> None:
        if not shards:
            raise DataError(f"no wds shards given ({pattern or 'an empty list'})")
        for s in shards:
            check_complete(Path(s))
        self.shards = [str(s) for s in shards]
        self.num_samples = num_samples if num_samples else count_samples(list(map(Path, shards)))
        if self.num_samples == 0:
            raise DataError(f"no samples in the wds shards of '{pattern or self.shards[0]}': "
                            f"a sample needs an image member ({', '.join(IMAGE_EXTS)})")
        self.seed, self.buffer_size, self.labels = seed, buffer_size, labels
        self.num_classes, self.on_error = num_classes, on_error
        self.transform = build_image_transform(image_size, train, transform_kwargs)
        self._streams: dict[tuple[int, int, int], ReaderStream] = {}
        log.info("wds: streaming %d samples from %d shards, shuffle buffer %d (%s)",
                 self.num_samples, len(self.shards), buffer_size, pattern or self.shards[0])

    def __len__(self) -> int:
        return self.num_samples

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_streams": {}}  # open shard readers stay in their process

    def stream(self, epoch: int, units: int, unit: int, position: int) -> ReaderStream:
        """This process's stream of reader ``unit``, advanced to ``position``."""
        key = (epoch, units, unit)
        s = self._streams.get(key)
        if s is None or s.position > position:
            s = ReaderStream(self.shards, self.seed, epoch, units, unit, self.buffer_size,
                             self.labels, self.on_error)
            self._streams[key] = s
            while len(self._streams) > MAX_STREAMS:
                del self._streams[next(iter(self._streams))]  # the oldest
        if s.position < position:
            s.skip(position - s.position)
        return s

    def _decode(self, sample: RawSample, seed: int | None) -> tuple[torch.Tensor, int]:
        if sample.error:
            raise ValueError(sample.error)
        if sample.label >= self.num_classes:
            raise label_out_of_range(self.num_classes, sample.where, sample.label)
        return load_image(self.transform, sample.image, seed, sample.where), sample.label

    def __getitems__(self, keys: list[StreamKey]) -> list[tuple[torch.Tensor, int, list[str]]]:
        epoch, units, unit, first = keys[0]
        stream = self.stream(epoch, units, unit, first)
        emitted = stream.take(len(keys))
        bad, stream.bad = stream.bad, []  # damaged shards met while reading this batch
        decoded: list[tuple[torch.Tensor, int] | None] = []
        for e in emitted:
            try:
                decoded.append(self._decode(e.sample, e.seed))
            except SAMPLE_ERRORS as err:
                if self.on_error == "fail":
                    raise DataError(f"cannot read {e.sample.where}: {err} (data.on_error=fail; "
                                    f"set data.on_error=skip to skip unreadable samples)"
                                    ) from None
                bad.append(f"{e.sample.where}: {err}")
                decoded.append(None)
        good = [d for d in decoded if d is not None]
        if not good:
            raise DataError(f"a whole batch of unreadable samples from wds reader {unit} "
                            f"(first: {bad[0]}): are these the shards you meant?")
        # An unreadable sample is replaced by a readable one of the same batch: deterministic,
        # and every later position of the stream stays where it was.
        filled = [d if d is not None else good[k % len(good)] for k, d in enumerate(decoded)]
        return [(image, label, bad if k == 0 else []) for k, (image, label) in enumerate(filled)]

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int, list[str]]:
        if isinstance(key, tuple) and len(key) == 4:
            return self.__getitems__([key])[0]
        index, seed = (key, None) if isinstance(key, int) else key
        e = self.stream(0, 1, 0, index).take(1)[0]
        image, label = self._decode(e.sample, seed)
        return image, label, []


class StreamBatchSampler(Sampler[list[StreamKey]]):
    """A rank's batches of stream keys: batch ``i`` is read by reader ``i % slots``.

    With as many loader workers as ``slots``, the loader's round-robin gives each worker one
    reader, which it reads straight through. With another number of workers (a resumed run
    that keeps the checkpoint's ``slots``), a worker gets batches of several readers and reads
    past the batches the others build: still exact, at up to ``workers`` times the reading.

    Example:
        >>> s = StreamBatchSampler(100, batch_size=4, rank=1, world_size=2, slots=2)
        >>> s.set_epoch(3, start_batch=1)
        >>> len(s), next(iter(s))[:2]
        (12, [(3, 4, 3, 0), (3, 4, 3, 1)])
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 slots: int = 1) -> None:
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.slots = rank, world_size, max(1, slots)
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.size // (self.batch_size * self.world_size)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[StreamKey]]:
        units = self.world_size * self.slots
        for i in range(self.start_batch, len(self)):
            unit = self.rank * self.slots + i % self.slots
            first = (i // self.slots) * self.batch_size
            yield [(self.epoch, units, unit, first + j) for j in range(self.batch_size)]


def build_stream_dataset(*, root: str | None, shards: str | None, image_size: int, train: bool,
                         num_classes: int, seed: int, buffer_size: int,
                         num_samples: int | None, labels: bool = True,
                         transform_kwargs: dict[str, Any] | None = None,
                         on_error: str = "skip") -> WdsStreamDataset:
    """The streamed training split (``shards``: its pattern; None: found in ``root``)."""
    paths, where = find_shards("train", root, shards)
    return WdsStreamDataset(paths, image_size=image_size, train=train, num_classes=num_classes,
                            seed=seed, buffer_size=buffer_size, num_samples=num_samples,
                            labels=labels, transform_kwargs=transform_kwargs, pattern=where,
                            on_error=on_error)
