"""``kd prepare-data``: a dataset's splits as pre-resized, reproducible WebDataset shards.

Training decodes every image of every epoch at its full size, only to crop and shrink it to
224 px or so. ``kd prepare-data -c CONFIG --out DIR`` does the shrinking once: it reads the
encoded images of the ``train`` and ``val`` splits that ``data`` describes (``imagefolder``,
``wds`` or ``hf``, through :func:`kd.data.build_dataset`; nothing is augmented) and writes
them as shards that kd reads with ``data.name=wds data.root=DIR``.

What each image becomes (the choices):

* **Longer side above** ``--max-side``: shrunk with the aspect ratio kept, the longer side
  becoming exactly ``max_side`` (the shorter rounded). A JPEG is first decoded with
  ``Image.draft``, which lets libjpeg-turbo scale by 1/2, 1/4 or 1/8 inside the inverse DCT
  (much cheaper than decoding every pixel), but never below twice the target size, so the last
  factor of two or more is always done by the filter. The filter is Pillow's Lanczos with
  ``reducing_gap=3``: where the remaining factor is over 3, an integer box reduction does the
  bulk first, with a Lanczos step of at least 3x after it (Pillow's own speed/quality trade-off;
  the result is indistinguishable from a pure Lanczos here).
* **Within** ``--max-side`` **and a plain baseline JPEG** (three-channel, not progressive, no
  EXIF rotation): the original bytes, byte for byte (after checking that they decode). Nothing
  is lost, and nothing gained by re-encoding.
* **Anything else** (PNG, WebP, grey or CMYK or palette images, progressive JPEGs, JPEGs with an
  EXIF orientation): converted to RGB as kd's reader does (``decode_rgb``: alpha dropped, CMYK
  inverted naively, EXIF orientation *not* applied, so the prepared pixels are the ones kd would
  have trained on) and encoded.
* **Encoding** (every re-encoded image): baseline JPEG at ``--quality`` (default 90), 4:2:0
  chroma subsampling, optimised Huffman tables (a few % smaller, same decode speed), no EXIF,
  no ICC profile, no comment. libjpeg-turbo's encoder is deterministic, so equal inputs give
  equal bytes (with the same Pillow and libjpeg-turbo; another version may round differently).
* **Unreadable images** (do not decode, a missing label in a wds or hf source) are left out and
  listed in the shard's index under ``unreadable`` (``data.on_error=skip``, the default), or
  stop the command naming the file (``data.on_error=fail``).

The output folder, ``DIR``:

* ``train-000000.tar``, ``train-000001.tar``, ..., ``val-000000.tar``, ...: ``--shard-samples``
  samples of the split each (default 1,000; the last shard of a split takes the rest), in the
  split's order. Sample ``i`` of a split is ``<key>.jpg`` then ``<key>.cls`` (the label as
  decimal text), ``key`` being ``i`` in eight (or more) digits, so a left-out image leaves a gap.
  Tar members are plain USTAR headers with fixed metadata (mode 0644, uid/gid 0, empty user
  and group names, mtime 0); the archive ends with two zero blocks, padded to tar's
  10,240-byte record. Same input and options: same bytes, whatever the machine or the time.
* ``train-000000.tar.idx.json`` beside each shard: its index, the format
  :mod:`kd.data.wds` reads instead of scanning the shard (``kd.data.wds.INDEX_FORMAT``: the
  shard's size and sha256, and per sample its key, image offset and size, label), plus what
  this command needs to resume: the ``sources`` of its samples (the file under the split's
  folder, ``<shard>:<member>`` or the hf row), a ``plan`` digest of the sources, labels and
  options the shard was made from, the images left out, and the shard's ``stats``.
* ``prepare.json``: the report (samples, bytes and mean image size before and after per split,
  how many images were copied, resized or re-encoded, and the decode throughput of originals
  against prepared images). It holds timings, so it is the one file that differs between runs.

Atomic and resumable: a shard and its index are written under temporary names
(``.<name>.partial``), flushed and fsynced, then renamed into place (shard first, index last,
then the folder is fsynced); ``prepare.json`` likewise. A run that is killed leaves complete
shards and temporaries; the next run deletes the temporaries and skips every shard whose index
matches its plan and whose bytes match the index's sha256 (hashing a shard is cheap next to
making it), so it continues where the last one stopped and ends with the very bytes of an
uninterrupted run. A source image edited in place under the same name is not noticed: delete
its shard to redo it. Shards numbered beyond a split's new count (a smaller source or a larger
``--shard-samples``) are deleted. Run one ``kd prepare-data`` per folder at a time.

Decode gain: after writing, up to 200 images spread over the splits are decoded to RGB by
Pillow on one thread, as kd's reader decodes them: an untimed warm-up pass, then 5 rounds in
which each original and its prepared copy are decoded back to back, in alternating order, so a
burst of other work on the machine hits both alike. Each image counts with its fastest round
(CPU time of the decoding thread), which gives images/s per core and the gain
(:func:`measure_decode`). On a busy shared machine the gain still varies by 10-20 % from run to
run (seen on a 2-vCPU virtual machine), so compare the median of a few runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import tarfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from kd.config import IMAGE_DATASETS, DataConfig
from kd.core.checkpoint import atomic_write, fsync_dir, sha256_file
from kd.data.build import build_dataset, source_kwargs
from kd.data.datasets import SAMPLE_ERRORS, ImageFolderDataset, decode_rgb
from kd.data.hf import HFDiskDataset
from kd.data.wds import INDEX_FORMAT, WdsDataset, index_path
from kd.errors import DataError, UserError, output_error
from kd.units import format_bytes

log = logging.getLogger("kd")

SPLITS = ("train", "val")
MIN_SIDE = 32
PARTIAL = ".partial"  # temporary files are .<final name>.partial
REPORT_FILE = "prepare.json"
KEY_DIGITS = 8
DRAFT_GAP = 2  # JPEG DCT scaling stops at twice the target size (see the module docstring)
REDUCING_GAP = 3.0
BENCH_IMAGES = 200
BENCH_ROUNDS = 5
SHOWN_UNREADABLE = 3  # unreadable images named in the log


@dataclass(frozen=True)
class PrepareSettings:
    """The options that decide the bytes written (all of them are in each shard's plan)."""

    max_side: int = 320
    quality: int = 90
    shard_samples: int = 1000

    def check(self) -> None:
        """Raise UserError for a value no run can use (before anything is read or written)."""
        if self.max_side < MIN_SIDE:
            raise UserError(f"--max-side {self.max_side}: give at least {MIN_SIDE} (the longer "
                            f"side, in pixels, larger images are shrunk to; e.g. 320)")
        if not 1 <= self.quality <= 100:
            raise UserError(f"--quality {self.quality}: give a JPEG quality from 1 to 100 "
                            f"(e.g. 90)")
        if self.shard_samples < 1:
            raise UserError(f"--shard-samples {self.shard_samples}: give at least 1 (e.g. 1000)")


def parse_splits(text: str) -> list[str]:
    """``--splits``: ``train,val`` → ``['train', 'val']`` (each once, in the order given)."""
    splits = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise UserError(f"--splits {text}: unknown split '{unknown[0] if unknown else ''}'; "
                        f"give train, val or train,val")
    return list(dict.fromkeys(splits))


# ------------------------------------------------------------------------------- the input
@dataclass
class Source:
    """One split of the input as encoded images: each one's name, label and bytes."""

    names: list[str]  # where each image came from, relative to the split (deterministic)
    labels: list[int]
    read: Callable[[int], bytes]  # raises a SAMPLE_ERRORS error for an unreadable image
    describe: Callable[[int], str]  # for messages
    shards: list[Path] = field(default_factory=list)  # a wds source's shards
    classes: list[str] | None = None  # class names by label, where the source has them

    def __len__(self) -> int:
        return len(self.names)


def open_source(cfg: DataConfig, split: str) -> Source:
    """The encoded images of one split of the dataset ``cfg`` describes (not augmented)."""
    if cfg.name not in IMAGE_DATASETS:
        raise UserError(f"data.name={cfg.name}: kd prepare-data converts image files; give "
                        f"data.name imagefolder, wds or hf")
    ds = build_dataset(cfg.name, split, root=cfg.root, image_size=cfg.image_size,
                       num_classes=cfg.num_classes, augment=False, channels=3,
                       synthetic_size=cfg.synthetic_size, on_error=cfg.on_error,
                       **source_kwargs(cfg))
    if isinstance(ds, ImageFolderDataset):
        reader = ds.reader

        def read_file(i: int) -> bytes:
            return Path(reader.filename(i, absolute=True)).read_bytes()

        return Source([str(reader.filename(i)) for i in range(len(ds))], ds.targets(),
                      read_file, ds.describe, classes=ds.classes)
    if isinstance(ds, WdsDataset):
        labels = [int(v) for v in ds.targets()]

        def read_member(i: int) -> bytes:
            if labels[i] < 0:
                raise ValueError(ds.label_errors.get(i, "no label"))
            return ds.read_bytes(i)

        names = [f"{Path(ds.shards[s]).name}:{n.decode()}" for s, n in zip(ds.shard_ids,
                                                                            ds.names)]
        return Source(names, labels, read_member, ds.describe, [Path(s) for s in ds.shards])
    if isinstance(ds, HFDiskDataset):
        labels = ds.targets()

        def read_row(i: int) -> bytes:
            if labels[i] < 0:
                raise ValueError(f"no label ({ds.label_key}={labels[i]})")
            image = ds.data[i][ds.image_key]
            if image is None:
                raise ValueError(f"no image ({ds.image_key} is null)")
            return image["bytes"] if image["bytes"] is not None else \
                Path(image["path"]).read_bytes()

        return Source([f"[{i}]" for i in range(len(ds))], labels, read_row, ds.describe)
    raise UserError(f"data.name={cfg.name}: kd prepare-data cannot read its images")


# ---------------------------------------------------------------------------- one image
@dataclass
class PreparedImage:
    data: bytes
    action: str  # copied, resized or converted
    size_in: tuple[int, int]
    size_out: tuple[int, int]


def target_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """The size an image is shrunk to: the longer side ``max_side``, aspect ratio kept.

    Example:
        >>> target_size(500, 375, 320), target_size(375, 500, 320), target_size(100, 50, 320)
        ((320, 240), (240, 320), (100, 50))
    """
    scale = max_side / max(width, height)
    if scale >= 1:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def is_plain_jpeg(img: Any) -> bool:
    """A baseline three-channel JPEG without an EXIF rotation: kept byte for byte."""
    return (img.format == "JPEG" and img.mode == "RGB" and not img.info.get("progressive")
            and not img.info.get("progression") and img.getexif().get(0x0112, 1) == 1)


def encode_jpeg(img: Any, quality: int) -> bytes:
    """``img`` as a baseline JPEG with kd's fixed encoder settings (see the module docstring)."""
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, subsampling=2, optimize=True,
             progressive=False)
    return buf.getvalue()


def prepare_image(data: bytes, max_side: int, quality: int) -> PreparedImage:
    """One encoded image as it goes into a shard (see the module docstring).

    Raises:
        OSError: the bytes are not an image Pillow can decode (or are truncated).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            size = img.size
            target = target_size(*size, max_side)
            if target == size and is_plain_jpeg(img):
                img.load()  # decodes: a truncated or corrupt file fails here, not in training
                return PreparedImage(data, "copied", size, size)
            box = None
            if target != size:
                drafted = img.draft(None, (DRAFT_GAP * target[0], DRAFT_GAP * target[1]))
                box = drafted[1] if drafted else None
            rgb = img.convert("RGB")
    except UnidentifiedImageError:
        raise OSError("not an image file PIL can decode") from None
    except Image.DecompressionBombError as e:
        raise OSError(str(e)) from None
    if target != size:
        rgb = rgb.resize(target, Image.Resampling.LANCZOS, box=box, reducing_gap=REDUCING_GAP)
    action = "resized" if target != size else "converted"
    return PreparedImage(encode_jpeg(rgb, quality), action, size, target)


# ------------------------------------------------------------------------ shards on disk
class TarWriter:
    """A tar file written member by member, with fixed metadata, its sha256 and positions."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.pos, self.hash = f, 0, hashlib.sha256()

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.pos += len(data)

    def add(self, name: str, data: bytes) -> int:
        """Append member ``name``; returns where its data starts."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        offset = self.pos
        self._write(data + tarfile.NUL * (-len(data) % tarfile.BLOCKSIZE))
        return offset

    def close(self) -> None:
        """End the archive: two zero blocks, then zeros up to a whole record (as tar does)."""
        end = self.pos + 2 * tarfile.BLOCKSIZE
        self._write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + -end % tarfile.RECORDSIZE))


def write_atomically(path: Path, write: Callable[[BinaryIO], Any]) -> Any:
    """:func:`kd.core.checkpoint.atomic_write` under the temporary name ``.<name>.partial``
    (which a rerun removes, see :func:`remove_leftovers`)."""
    return atomic_write(path, write, temporary=path.with_name(f".{path.name}{PARTIAL}"))


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, separators=(",", ":")) + "\n").encode()


@dataclass
class ShardPlan:
    """One shard to make: which samples of which split, and the digest of what decides its
    bytes (compared with the digest in an existing shard's index on a rerun)."""

    split: str
    number: int
    start: int
    stop: int
    key_digits: int
    digest: str

    @property
    def name(self) -> str:
        return f"{self.split}-{self.number:06d}.tar"

    def key(self, i: int) -> str:
        return f"{i:0{self.key_digits}d}"


def plan_shards(split: str, source: Source, settings: PrepareSettings) -> list[ShardPlan]:
    """The shards of one split, in order."""
    n, per = len(source), settings.shard_samples
    digits = max(KEY_DIGITS, len(str(n - 1)))
    plans = []
    for number, start in enumerate(range(0, n, per)):
        stop = min(start + per, n)
        digest = hashlib.sha256(json_bytes({
            "format": INDEX_FORMAT, "settings": asdict(settings), "key_digits": digits,
            "range": [start, stop], "sources": source.names[start:stop],
            "labels": [int(v) for v in source.labels[start:stop]]})).hexdigest()
        plans.append(ShardPlan(split, number, start, stop, digits, digest))
    return plans


def read_complete_index(out: Path, plan: ShardPlan) -> dict[str, Any] | None:
    """The index of ``plan``'s shard if the shard on disk is complete and made from this plan:
    the index's plan digest matches and the shard's size and sha256 match the index."""
    shard = out / plan.name
    try:
        index = json.loads(index_path(shard).read_text())
        if not isinstance(index, dict) or index.get("plan") != plan.digest \
                or shard.stat().st_size != index.get("bytes"):
            return None
        return index if sha256_file(shard) == index.get("sha256") else None
    except (OSError, ValueError):
        return None


def write_shard(out: Path, plan: ShardPlan, source: Source, settings: PrepareSettings,
                on_error: str, progress: Any) -> dict[str, Any]:
    """Make one shard and its index (atomically, see the module docstring); returns the index."""
    keys: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    labels: list[int] = []
    sources: list[str] = []
    unreadable: list[str] = []
    stats = {"copied": 0, "resized": 0, "converted": 0, "bytes_before": 0, "bytes_after": 0,
             "width_before": 0, "height_before": 0, "width_after": 0, "height_after": 0}

    def fill(f: BinaryIO) -> TarWriter:
        tar = TarWriter(f)
        for i in range(plan.start, plan.stop):
            try:
                original = source.read(i)
                image = prepare_image(original, settings.max_side, settings.quality)
            except SAMPLE_ERRORS as e:
                if on_error == "fail":
                    raise DataError(f"cannot read {source.describe(i)}: {e} (data.on_error=fail; "
                                    f"set data.on_error=skip to leave unreadable images "
                                    f"out)") from None
                unreadable.append(source.names[i])
                if len(unreadable) <= SHOWN_UNREADABLE:
                    log.warning("kd prepare-data: left out unreadable %s: %s",
                                source.describe(i), e)
                progress.update(1)
                continue
            key, label = plan.key(i), int(source.labels[i])
            offsets.append(tar.add(f"{key}.jpg", image.data))
            tar.add(f"{key}.cls", str(label).encode())
            keys.append(key)
            sizes.append(len(image.data))
            labels.append(label)
            sources.append(source.names[i])
            stats[image.action] += 1
            stats["bytes_before"] += len(original)
            stats["bytes_after"] += len(image.data)
            for name, value in zip(("width", "height"), image.size_in):
                stats[f"{name}_before"] += value
            for name, value in zip(("width", "height"), image.size_out):
                stats[f"{name}_after"] += value
            progress.update(1)
        tar.close()
        return tar

    shard = out / plan.name
    tar = write_atomically(shard, fill)
    index = {"format": INDEX_FORMAT, "shard": plan.name, "bytes": tar.pos,
             "sha256": tar.hash.hexdigest(), "image_ext": "jpg", "keys": keys,
             "offsets": offsets, "sizes": sizes, "labels": labels, "sources": sources,
             "unreadable": unreadable, "plan": plan.digest, "stats": stats}
    write_atomically(index_path(shard), lambda f: f.write(json_bytes(index)))
    fsync_dir(out)
    return index


# ------------------------------------------------------------------------ the output folder
def check_out(out: Path, sources: dict[str, Source]) -> None:
    """Make ``out`` (if needed) and make sure it is writable and holds nothing that kd would
    take for part of a split; before anything is written into it.

    Raises:
        OutputError: ``out`` cannot be made or written.
        UserError: ``out`` holds the input shards, or other shards of a split.
    """
    for split, source in sources.items():
        if any(s.resolve().parent == out.resolve() for s in source.shards):
            raise UserError(f"--out {out}: it holds the {split} shards being read; write the "
                            f"prepared shards to another folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".kd-prepare-data-probe{PARTIAL}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise output_error(f"--out {out}: cannot write there", e, setting="--out") from None
    for split in sources:
        foreign = [p.name for p in out.glob(f"{split}-*.tar")
                   if not re.fullmatch(rf"{split}-\d{{6}}\.tar", p.name)]
        foreign += [f"{split}/{p.name}" for p in (out / split).glob("*.tar")]
        if foreign:
            raise UserError(f"--out {out}: {foreign[0]} was not written by kd prepare-data, and "
                            f"data.root={out} would read it as part of the {split} split; move "
                            f"it away or choose another --out")


def remove_leftovers(out: Path, plans: dict[str, list[ShardPlan]]) -> None:
    """Delete an interrupted run's temporary files, and shards (with their indexes) numbered
    beyond a split's shard count."""
    (out / f".{REPORT_FILE}{PARTIAL}").unlink(missing_ok=True)
    for split, split_plans in plans.items():
        for tmp in out.glob(f".{split}-*{PARTIAL}"):
            tmp.unlink(missing_ok=True)
        for shard in out.glob(f"{split}-*.tar"):
            if int(shard.name[len(split) + 1:-4]) >= len(split_plans):
                index_path(shard).unlink(missing_ok=True)
                shard.unlink()
                log.info("kd prepare-data: deleted %s (beyond the %d shards of the %s split)",
                         shard, len(split_plans), split)


# ------------------------------------------------------------------------------ the report
def split_report(indexes: list[dict[str, Any]]) -> dict[str, Any]:
    """Samples, bytes and mean sizes of one split, from its shards' indexes."""
    total = {k: sum(ix["stats"][k] for ix in indexes) for k in indexes[0]["stats"]}
    n = max(1, total["copied"] + total["resized"] + total["converted"])
    return {
        "samples": sum(len(ix["keys"]) for ix in indexes),
        "unreadable": sum(len(ix["unreadable"]) for ix in indexes),
        "shards": len(indexes),
        "shard_bytes": sum(ix["bytes"] for ix in indexes),
        **{k: total[k] for k in ("copied", "resized", "converted", "bytes_before",
                                 "bytes_after")},
        "mean_bytes_before": round(total["bytes_before"] / n, 1),
        "mean_bytes_after": round(total["bytes_after"] / n, 1),
        "mean_size_before": [round(total["width_before"] / n, 1),
                             round(total["height_before"] / n, 1)],
        "mean_size_after": [round(total["width_after"] / n, 1),
                            round(total["height_after"] / n, 1)],
    }


def measure_decode(originals: list[bytes], prepared: list[bytes],
                   rounds: int = BENCH_ROUNDS) -> dict[str, Any]:
    """Images/s per core decoding ``originals`` and ``prepared`` (pairs: the same images) to
    RGB, as kd's reader does (``decode_rgb``), on this thread.

    After an untimed warm-up pass, each round decodes every pair, original and prepared back to
    back in alternating order, so the two sets share whatever else the machine is doing at that
    moment. Each image's time is its fastest round (CPU time of this thread): other work on the
    machine only ever adds time, so the minimum is the least disturbed measurement.
    """
    for data in originals + prepared:  # warm-up: allocator and caches settle, untimed
        decode_rgb(data)
    best = [[float("inf")] * len(originals), [float("inf")] * len(prepared)]
    for r in range(rounds):
        for i, pair in enumerate(zip(originals, prepared)):
            for which in (0, 1) if (i + r) % 2 == 0 else (1, 0):
                start = time.thread_time()
                decode_rgb(pair[which])
                best[which][i] = min(best[which][i], time.thread_time() - start)
    before, after = max(sum(best[0]), 1e-9), max(sum(best[1]), 1e-9)
    n = len(originals)
    return {"images": n, "rounds": rounds, "before_images_per_s": round(n / before, 1),
            "after_images_per_s": round(n / after, 1), "speedup": round(before / after, 2)}


def decode_sample(out: Path, indexes: dict[str, list[dict[str, Any]]],
                  sources: dict[str, Source]) -> tuple[list[bytes], list[bytes]]:
    """Up to :data:`BENCH_IMAGES` (original, prepared) image pairs spread evenly over the
    prepared samples of all splits."""
    where = [(split, ix, k) for split, split_indexes in indexes.items()
             for ix in split_indexes for k in range(len(ix["keys"]))]
    m = min(BENCH_IMAGES, len(where))
    originals, prepared = [], []
    for j in range(m):
        split, ix, k = where[j * len(where) // m]
        originals.append(sources[split].read(int(ix["keys"][k])))
        with open(out / ix["shard"], "rb") as f:
            f.seek(ix["offsets"][k])
            prepared.append(f.read(ix["sizes"][k]))
    return originals, prepared


# -------------------------------------------------------------------------------- the command
def prepare_data(cfg: DataConfig, out: str | Path, settings: PrepareSettings,
                 splits: Sequence[str] = SPLITS) -> dict[str, Any]:
    """Write ``splits`` of the dataset ``cfg`` describes into ``out`` as pre-resized WebDataset
    shards with index files; returns the report (also written to ``out/prepare.json``).

    Example:
        >>> from kd.config import load_config
        >>> cfg = load_config("my_job.yaml")  # doctest: +SKIP
        >>> report = prepare_data(cfg.data, "/data/imagenet-320",
        ...                       PrepareSettings(max_side=320))  # doctest: +SKIP
        >>> report["decode"]["speedup"]  # doctest: +SKIP
        2.7

    Raises:
        UserError: bad options, a dataset kd cannot read, or an ``out`` it cannot write.
    """
    from tqdm import tqdm

    settings.check()
    start = time.perf_counter()
    out = Path(out)
    sources = {split: open_source(cfg, split) for split in splits}
    for split, source in sources.items():
        if not len(source):
            raise DataError(f"data.root: the {split} split of {cfg.root} has no images")
    check_out(out, sources)
    plans = {split: plan_shards(split, sources[split], settings) for split in splits}
    remove_leftovers(out, plans)
    done = {p.name: ix for split in splits for p in plans[split]
            if (ix := read_complete_index(out, p)) is not None}
    todo = [p for split in splits for p in plans[split] if p.name not in done]
    total = sum(len(s) for s in sources.values())
    log.info("kd prepare-data: %s from %s %s into %s: %d shards to write, %d already complete",
             ", ".join(f"{s} {len(sources[s]):,} images" for s in splits), cfg.name, cfg.root,
             out, len(todo), len(done))
    written: dict[str, dict[str, Any]] = {}
    write_start = time.perf_counter()
    try:
        with tqdm(total=total, initial=total - sum(p.stop - p.start for p in todo),
                  unit="img", desc="kd prepare-data", dynamic_ncols=True) as progress:
            for plan in todo:
                written[plan.name] = write_shard(out, plan, sources[plan.split], settings,
                                                 cfg.on_error, progress)
    except OSError as e:
        raise output_error(f"--out {out}: cannot write a shard", e, setting="--out") from None
    indexes = {split: [{**done, **written}[p.name] for p in plans[split]] for split in splits}
    report: dict[str, Any] = {
        "out": str(out), "source": {"name": cfg.name, "root": cfg.root},
        "settings": asdict(settings),
        "splits": {split: split_report(indexes[split]) for split in splits},
        "shards_written": len(todo), "shards_kept": len(done),
        "images_written": sum(p.stop - p.start for p in todo),
        "write_seconds": round(time.perf_counter() - write_start, 2)}
    classes = next((s.classes for s in sources.values() if s.classes is not None), None)
    if classes is not None:
        report["classes"] = classes
    originals, prepared = decode_sample(out, indexes, sources)
    report["decode"] = measure_decode(originals, prepared) if originals else None
    report["seconds"] = round(time.perf_counter() - start, 1)
    try:
        write_atomically(out / REPORT_FILE,
                         lambda f: f.write(json.dumps(report, indent=2).encode() + b"\n"))
    except OSError as e:
        raise output_error(f"--out {out}: cannot write {REPORT_FILE}", e,
                           setting="--out") from None
    return report


def _size(wh: list[float]) -> str:
    return f"{wh[0]:.0f}×{wh[1]:.0f}"


def print_report(report: dict[str, Any]) -> None:
    """The report as a few lines on stdout."""
    rate = report["images_written"] / max(report["write_seconds"], 1e-9)
    print(f"kd prepare-data: {report['out']}: {report['shards_written']} shard(s) written "
          f"({report['images_written']:,} images in {report['write_seconds']:.1f} s, "
          f"{rate:,.0f} images/s), {report['shards_kept']} already complete")
    for split, r in report["splits"].items():
        shards = f"{r['shards']} shard{'s' if r['shards'] != 1 else ''}"
        print(f"{split}: {r['samples']:,} images in {shards} ({r['resized']:,} "
              f"resized, {r['copied']:,} copied, {r['converted']:,} re-encoded, "
              f"{r['unreadable']:,} unreadable left out); images "
              f"{format_bytes(r['bytes_before'], si=True)} → "
              f"{format_bytes(r['bytes_after'], si=True)}, mean "
              f"{format_bytes(r['mean_bytes_before'], si=True)} "
              f"{_size(r['mean_size_before'])} → {format_bytes(r['mean_bytes_after'], si=True)} "
              f"{_size(r['mean_size_after'])}")
    d = report["decode"]
    if d is None:
        print("decode: not measured (no images were written)")
    else:
        print(f"decode: {d['before_images_per_s']:,.0f} → {d['after_images_per_s']:,.0f} "
              f"images/s per core ({d['speedup']:.1f}×; {d['images']} images, PIL to RGB, one "
              f"thread, fastest of {d['rounds']} interleaved rounds per image)")
    print(f"report: {Path(report['out']) / REPORT_FILE}; train with data.name=wds "
          f"data.root={report['out']}")
