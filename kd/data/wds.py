"""WebDataset tar shards on local disk, read by random access (``data.name=wds``).

A WebDataset shard is a plain (uncompressed) tar file whose members are grouped into samples by
key: the member's path up to the first dot of its file name (``shard/n01440764_10026.jpg`` and
``shard/n01440764_10026.cls`` form sample ``shard/n01440764_10026``). A sample needs one image
member (``jpg``, ``jpeg``, ``png`` or ``webp``; the first of these if there are several) and,
in a labelled split, one label member: ``cls`` or ``cls.txt`` (an integer as text) or ``json``
(an object with an integer ``"label"`` field). Keys without an image member (metadata only) are
not samples; they are counted in :attr:`WdsDataset.n_ignored_keys`.

Where the shards are (the split convention):

* ``data.train_shards`` / ``data.val_shards``: a shard pattern per split. A pattern is one path
  with optional brace ranges and lists (``/data/imagenet/train-{000000..001281}.tar``,
  ``shards/{a,b}.tar``), glob wildcards (``/data/train-*.tar``) or a directory (all its ``*.tar``
  files, sorted). Relative patterns are taken relative to ``data.root`` when it is set. A
  brace-expanded file that does not exist is an error: a range that overshoots is a typo, not
  something to skip.
* otherwise ``data.root`` is a directory holding the split's shards as ``<root>/train-*.tar``
  and ``<root>/val-*.tar``, or in sub-folders ``<root>/train/*.tar`` and ``<root>/val/*.tar``.

Why random access by default: at start-up every shard is scanned once with :mod:`tarfile`
(headers only, plus the few bytes of each label member) into an in-memory index of each sample's
image offset and size and its label; a sample is then read with one seek. That makes the dataset
an ordinary keyed dataset, so kd's index-based sampler gives exact mid-epoch resume, a global
shuffle, and each sample's augmentation is a pure function of its seed, in any worker, rank or
restart. For shards on shared storage, where seeks are slow, or splits too large to scan at
every start, ``data.stream=true`` reads the training shards front to back through a shuffle
buffer instead (:mod:`kd.data.stream`; resume stays exact there too).

Costs: the scan reads a 512-byte header per member and seeks past the data; Python's tarfile
parses about 10,000 headers a second per core (measured on a 2-core machine: 0.23 ms per
image + label sample, 2.3 s per 10,000 samples, page cache warm), so an ImageNet-sized split
(1.28 M samples) takes minutes. Every rank scans every shard. The index in memory holds four
numbers and the image member's name per sample.

Index files: a shard may have its index on disk beside it, ``<shard>.idx.json`` (``kd
prepare-data`` writes one per shard; :func:`read_shard_index`). It is used instead of the scan
when it is valid: ``format`` is :data:`INDEX_FORMAT`, ``bytes`` equals the shard's size, the
columns ``keys``, ``offsets``, ``sizes`` and ``labels`` (one entry per sample, in shard order;
the image member is ``<key>.<image_ext>``) have equal lengths and hold in-range numbers, and, a
cheap content check, the tar headers just before the first and the last sample's image data
name those members with those sizes (two 512-byte reads). ``sha256`` (of the whole shard) is
recorded for tools, not checked here: hashing a shard costs as much as reading it. Other keys
are the writer's and ignored. No index file means a scan, silently; an unreadable or stale one
(the shard was rewritten, copied in part, or changed) means a scan too, and one log warning
for all such shards of the dataset.

Unreadable data:

* a corrupt image member, a missing or unparseable label member (in a labelled split) or a
  failed read makes that *sample* unreadable: the base class skips it (counted in
  ``n_bad_samples``, reported as ``<shard>:<member>``) or fails with ``data.on_error=fail``;
* a shard that is not a readable tar file — truncated (an interrupted copy), compressed, or not
  a tar at all — is a :class:`~kd.errors.DataError` at start-up naming the shard, whatever
  ``data.on_error`` says: indexing only its first part would silently change the split's size
  and the meaning of every later index. Re-copy the shard or leave it out of the pattern.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from kd.data.datasets import (
    UNLABELLED,
    KeyedDataset,
    build_image_transform,
    label_out_of_range,
    load_image,
)
from kd.errors import DataError

log = logging.getLogger("kd")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # in order of preference within a sample
BLOCK = tarfile.BLOCKSIZE
LABEL_EXTS = ("cls", "cls.txt", "json")
MAX_OPEN_SHARDS = 64  # file handles kept open per process (least recently used closed first)
BAD_LABEL = -2  # index marker: this sample's label is missing or unreadable (see label_errors)
INDEX_SUFFIX = ".idx.json"  # a shard's index file: <shard>.idx.json beside it
INDEX_FORMAT = "kd-wds-index/1"
INDEX_COLUMNS = ("keys", "offsets", "sizes", "labels")


def expand_braces(pattern: str) -> list[str]:
    """Bash-style brace expansion: ``a-{00..02}.tar`` → ``a-00.tar``, ``a-01.tar``, ``a-02.tar``.

    Example:
        >>> expand_braces("s/{train,val}-{0..1}.tar")
        ['s/train-0.tar', 's/train-1.tar', 's/val-0.tar', 's/val-1.tar']
    """
    from braceexpand import braceexpand

    return list(braceexpand(pattern))


def expand_shards(pattern: str, root: str | None = None) -> list[Path]:
    """The shard files a pattern names, in order (see the module docstring for the syntax).

    Raises:
        DataError: a brace-expanded file is missing, or nothing matches.
    """
    shards: list[Path] = []
    for item in expand_braces(pattern):
        path = Path(item).expanduser()
        if root is not None and not path.is_absolute():
            path = Path(root) / path
        if path.is_dir():
            shards += sorted(path.glob("*.tar"))
        elif any(c in item for c in "*?["):
            shards += sorted(Path(p) for p in glob.glob(str(path)))
        elif path.is_file():
            shards.append(path)
        else:
            raise DataError(f"wds shard not found: {path} (from pattern '{pattern}')")
    if not shards:
        raise DataError(f"no wds shards match '{pattern}'")
    return shards


def find_shards(split: str, root: str | None, pattern: str | None) -> tuple[list[Path], str]:
    """A split's shards and a description of where they were looked for (for messages)."""
    key = "data.train_shards" if split == "train" else "data.val_shards"
    if pattern:
        return expand_shards(pattern, root), pattern
    if root is None or not Path(root).is_dir():
        raise DataError(f"data.root: folder not found: {root} (wds needs a folder of "
                        f"train-*.tar and val-*.tar shards, or set {key})")
    folder = Path(root)
    where = f"{folder / f'{split}-*.tar'} or {folder / split / '*.tar'}"
    shards = sorted(folder.glob(f"{split}-*.tar")) + sorted((folder / split).glob("*.tar"))
    if not shards:
        raise DataError(f"no wds shards for split '{split}': nothing matches {where} "
                        f"(or set {key} to a shard pattern)")
    return shards, where


def split_name(name: str) -> tuple[str, str]:
    """``dir/abc.cls.txt`` → (``dir/abc``, ``cls.txt``): WebDataset's key and extension."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


def parse_label(ext: str, data: bytes) -> int:
    """The integer label in a ``cls``/``cls.txt``/``json`` member; ValueError if there is none."""
    if ext == "json":
        obj = json.loads(data)  # JSONDecodeError is a ValueError
        value = obj.get("label") if isinstance(obj, dict) else None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"json label member has no integer 'label' field (got {value!r})")
        return value
    return int(data.decode("utf-8").strip())


class _ShardIndex:
    """The samples of one shard: image member names, offsets and sizes, labels (or errors)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []
        self.labels: list[int] = []
        self.label_errors: dict[int, str] = {}  # position in this shard → why it has no label
        self.n_ignored_keys = 0


def scan_shard(path: Path, labels: bool = True) -> _ShardIndex:
    """Index one shard: one pass over its headers, then a read of each sample's label member.

    Raises:
        DataError: the file is not a complete, readable, uncompressed tar file.
    """
    members: dict[str, dict[str, tarfile.TarInfo]] = {}
    index = _ShardIndex()
    try:
        file_size = path.stat().st_size
        end = 0  # where the end-of-archive marker should be: after the last member's data
        # "r:": uncompressed only, so that members can be read by seeking.
        with tarfile.open(path, "r:") as tar, open(path, "rb") as raw:
            for info in tar:  # reads headers; skips member data with a seek
                end = info.offset_data + -(-info.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if info.offset_data + info.size > file_size:
                    raise tarfile.ReadError(f"member {info.name} ends past the end of the file")
                if info.isfile():
                    key, ext = split_name(info.name)
                    members.setdefault(key, {})[ext] = info
            # tarfile takes a file cut at a header boundary for a complete archive: a complete
            # one ends with a zero block (two, by POSIX) right after the last member.
            raw.seek(end)
            if raw.read(tarfile.BLOCKSIZE) != tarfile.NUL * tarfile.BLOCKSIZE:
                raise tarfile.ReadError(f"no end-of-archive block after byte {end}")
            for key, exts in members.items():
                image = next((exts[e] for e in IMAGE_EXTS if e in exts), None)
                if image is None:
                    index.n_ignored_keys += 1
                    continue
                label = _read_label(raw, exts) if labels else UNLABELLED
                if isinstance(label, str):
                    index.label_errors[len(index.names)] = label
                    label = BAD_LABEL
                elif label < 0 and labels:
                    raise DataError(f"wds shard {path}: sample {key} has label {label}; labels "
                                    f"must be >= 0 (an unlabelled dataset is built with "
                                    f"labels=False)")
                index.names.append(image.name)
                index.offsets.append(image.offset_data)
                index.sizes.append(image.size)
                index.labels.append(label)
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"wds shard {path} is not a readable tar file ({e}): is it truncated "
                        f"or compressed? Re-copy it or leave it out of the shard pattern") from None
    return index


def index_path(shard: Path) -> Path:
    """Where a shard's index file is: ``train-000000.tar`` → ``train-000000.tar.idx.json``."""
    return shard.with_name(shard.name + INDEX_SUFFIX)


def read_shard_index(path: Path, labels: bool = True) -> _ShardIndex | None:
    """A shard's index from its index file (see the module docstring); None if it has none.

    Raises:
        ValueError: the index file is unreadable, malformed, or stale (does not describe the
            shard as it is now); the message says which.
    """
    try:
        text = index_path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read it: {e}") from None
    obj = json.loads(text)  # JSONDecodeError is a ValueError
    if not isinstance(obj, dict) or obj.get("format") != INDEX_FORMAT:
        raise ValueError(f"not a {INDEX_FORMAT} index")
    size = path.stat().st_size
    if obj.get("bytes") != size:
        raise ValueError(f"stale: it describes a shard of {obj.get('bytes')} bytes, the shard "
                         f"has {size}")
    ext = obj.get("image_ext")
    columns = [obj.get(c) for c in INDEX_COLUMNS]
    if ext not in IMAGE_EXTS or not all(isinstance(c, list) for c in columns) \
            or len({len(c) for c in columns}) != 1:
        raise ValueError(f"malformed: needs image_ext ({', '.join(IMAGE_EXTS)}) and equal-length "
                         f"lists {', '.join(INDEX_COLUMNS)}")
    keys, offsets, sizes, label_list = columns
    index = _ShardIndex()
    if not keys:
        return index
    try:
        index.names = [f"{k}.{ext}" for k in keys if isinstance(k, str)]
        index.offsets = [int(o) for o in offsets]
        index.sizes = [int(n) for n in sizes]
        label_list = [int(v) for v in label_list]
    except (TypeError, ValueError):
        raise ValueError("malformed: keys must be strings, the other columns integers") from None
    if len(index.names) != len(keys) or not all(
            o >= BLOCK and n >= 0 and o + n <= size for o, n in zip(index.offsets, index.sizes)):
        raise ValueError("malformed: a key is not a string or a member lies outside the shard")
    if labels and min(label_list) < 0:
        raise ValueError("it has samples without a label")
    index.labels = label_list if labels else [UNLABELLED] * len(keys)
    with open(path, "rb") as raw:
        for i in {0, len(keys) - 1}:
            raw.seek(index.offsets[i] - BLOCK)
            try:
                info = tarfile.TarInfo.frombuf(raw.read(BLOCK), "utf-8", "surrogateescape")
            except tarfile.HeaderError:
                info = None
            if info is None or info.name != index.names[i] or info.size != index.sizes[i]:
                raise ValueError(f"stale: the shard has no member {index.names[i]} of "
                                 f"{index.sizes[i]} bytes at byte {index.offsets[i]}")
    return index


def index_shard(path: Path, labels: bool = True) -> tuple[_ShardIndex, bool, str | None]:
    """One shard's index: from its index file when that is valid, else by
    :func:`scan_shard`; whether it came from the file; why an index file that exists was not
    used (None otherwise)."""
    try:
        index, problem = read_shard_index(path, labels), None
    except (OSError, ValueError) as e:
        index, problem = None, f"{index_path(path)}: {e}"
    if index is None:
        return scan_shard(path, labels), False, problem
    return index, True, None


def _read_label(raw: BinaryIO, exts: dict[str, tarfile.TarInfo]) -> int | str:
    """A sample's label, or the message why it has none (the sample is then unreadable)."""
    ext = next((e for e in LABEL_EXTS if e in exts), None)
    if ext is None:
        return "no label member (.cls, .cls.txt or .json with a 'label' field)"
    info = exts[ext]
    raw.seek(info.offset_data)  # cheaper than tar.extractfile for these few bytes
    try:
        return parse_label(ext, raw.read(info.size))
    except (ValueError, UnicodeDecodeError) as e:
        return f"unreadable label member {info.name}: {e}"


class WdsDataset(KeyedDataset):
    """Samples of WebDataset tar shards, read by seeking into the shards (see the module doc).

    Args:
        shards: the shard files, in order; sample indices run through them in this order.
        image_size: side of the output image.
        train: apply the training transform (with ``transform_kwargs``).
        num_classes: labels must lie in ``[0, num_classes)``.
        labels: False for an unlabelled dataset: no label members needed, every label is -1.
        transform_kwargs: timm ``create_transform`` arguments for training.
        pattern: where the shards came from, for messages.
        on_error: what an unreadable sample does, ``skip`` or ``fail`` (see
            :class:`~kd.data.datasets.KeyedDataset`).

    Example:
        >>> ds = WdsDataset(expand_shards("/data/train-{0000..0127}.tar"), image_size=224,
        ...                 train=True, num_classes=1000)  # doctest: +SKIP
        >>> image, label, bad = ds[(0, 1234)]  # doctest: +SKIP
    """

    channels = 3

    def __init__(self, shards: list[Path], *, image_size: int, train: bool, num_classes: int,
                 labels: bool = True, transform_kwargs: dict[str, Any] | None = None,
                 pattern: str = "", on_error: str = "skip") -> None:
        if not shards:
            raise DataError(f"no wds shards given ({pattern or 'an empty list'})")
        start = time.perf_counter()
        self.on_error = on_error
        self.shards = [str(s) for s in shards]
        names, shard_ids, offsets, sizes, label_list = [], [], [], [], []
        self.label_errors: dict[int, str] = {}
        self.n_ignored_keys = 0
        problems: list[str] = []
        self.n_index_files = 0  # shards whose index came from their index file, not a scan
        for i, path in enumerate(shards):
            index, from_file, problem = index_shard(Path(path), labels)
            self.n_index_files += from_file
            if problem is not None:
                problems.append(problem)
            base = len(names)
            names += index.names
            shard_ids += [i] * len(index.names)
            offsets += index.offsets
            sizes += index.sizes
            label_list += index.labels
            self.label_errors.update({base + k: v for k, v in index.label_errors.items()})
            self.n_ignored_keys += index.n_ignored_keys
        if not names:
            raise DataError(f"no samples in the wds shards of '{pattern or self.shards[0]}': "
                            f"a sample needs an image member ({', '.join(IMAGE_EXTS)})")
        # numpy arrays, not lists of Python objects: forked workers share them without copying.
        self.names = np.array([n.encode() for n in names], dtype=np.bytes_)
        self.shard_ids = np.array(shard_ids, dtype=np.int32)
        self.offsets = np.array(offsets, dtype=np.int64)
        self.sizes = np.array(sizes, dtype=np.int64)
        self.labels = np.array(label_list, dtype=np.int64)
        self.scan_seconds = time.perf_counter() - start
        if labels:
            self._check_labels(num_classes)
        self.transform = build_image_transform(image_size, train, transform_kwargs)
        self._pid: int | None = None
        self._handles: OrderedDict[int, BinaryIO] = OrderedDict()
        if problems:
            log.warning("wds: %d shard index file(s) not used, those shards were scanned instead "
                        "(rerun kd prepare-data to rewrite them); first: %s", len(problems),
                        problems[0])
        log.info("wds: indexed %d samples in %d shards in %.2f s (%d from index files; %s)",
                 len(self), len(self.shards), self.scan_seconds, self.n_index_files,
                 pattern or self.shards[0])

    def _check_labels(self, num_classes: int) -> None:
        top = int(self.labels.argmax())
        if self.labels[top] >= num_classes:
            raise label_out_of_range(num_classes, self.describe(top), int(self.labels[top]))

    def __len__(self) -> int:
        return len(self.offsets)

    def describe(self, index: int) -> str:
        return f"{self.shards[self.shard_ids[index]]}:{self.names[index].decode()}"

    def targets(self) -> np.ndarray:
        return self.labels  # BAD_LABEL (-2) where the label member is unreadable

    def __getstate__(self) -> dict[str, Any]:
        # Open files do not pickle (spawned workers): each process opens its own.
        return {**self.__dict__, "_pid": None, "_handles": OrderedDict()}

    def _shard_file(self, shard: int) -> BinaryIO:
        """This process's handle on a shard, opened on first use.

        A forked worker inherits its parent's handles, which share one file position with the
        parent's: seeking in them from several processes would interleave reads. So handles are
        kept per process id and opened anew in each process.
        """
        if self._pid != os.getpid():
            self._pid, self._handles = os.getpid(), OrderedDict()
        f = self._handles.get(shard)
        if f is None:
            f = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open; closed by the LRU)
            self._handles[shard] = f
            if len(self._handles) > MAX_OPEN_SHARDS:
                self._handles.popitem(last=False)[1].close()
        else:
            self._handles.move_to_end(shard)
        return f

    def read_bytes(self, index: int) -> bytes:
        """The raw bytes of sample ``index``'s image member."""
        f = self._shard_file(int(self.shard_ids[index]))
        size = int(self.sizes[index])
        f.seek(int(self.offsets[index]))
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"read {len(data)} of {size} bytes: was the shard changed after "
                          f"indexing?")
        return data

    def get(self, index: int, seed: int | None) -> tuple[torch.Tensor, int]:
        label = int(self.labels[index])
        if label == BAD_LABEL:
            raise ValueError(self.label_errors[index])
        return load_image(self.transform, self.read_bytes(index), seed, self.describe(index)), label


def build_wds_dataset(split: str, *, root: str | None, shards: str | None, image_size: int,
                      train: bool, num_classes: int, labels: bool = True,
                      transform_kwargs: dict[str, Any] | None = None,
                      on_error: str = "skip") -> WdsDataset:
    """One split of a WebDataset: ``shards`` is the split's pattern (or None: use ``root``)."""
    paths, where = find_shards(split, root, shards)
    return WdsDataset(paths, image_size=image_size, train=train, num_classes=num_classes,
                      labels=labels, transform_kwargs=transform_kwargs, pattern=where,
                      on_error=on_error)
