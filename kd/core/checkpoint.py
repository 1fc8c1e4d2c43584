"""Checkpoints that cannot be half-written, and resume.

Layout under ``<output_dir>/checkpoints/``::

    step_00000450/
        student.safetensors   student weights (safetensors: loading cannot execute code)
        state.pt              optimizer, scheduler, scaler, step, data position, RNG states
                              (read back with torch.load(weights_only=True))
        config.yaml           the resolved config of the run that wrote it
        deepspeed/            DeepSpeed's sharded files (dist.strategy=deepspeed only)
        manifest.json         size and sha256 of every file above, kd version, step
    latest                    name of the newest complete checkpoint
    best.json                 which checkpoint has the best student top-1 so far (pruning
                              keeps the newest ``checkpoint.keep`` plus that one)

A checkpoint is written into a temporary sibling directory, every file flushed and fsynced,
then renamed into place; ``latest`` is replaced atomically after that. A crash while saving
leaves the previous checkpoint intact, and a directory without a valid manifest is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors.torch import load_file, save_file

import kd
from kd.errors import CheckpointError, output_error

STUDENT_FILE = "student.safetensors"
STATE_FILE = "state.pt"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"
BEST_FILE = "best.json"  # which checkpoint has the best student top-1 so far
_PREFIX = "step_"


def umask() -> int:
    """This process's file-mode creation mask, read without changing it.

    Linux reports it in /proc/self/status (since 4.7); elsewhere the only way is to set it and
    put it back, which happens here when a file is written, never at import.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    os.chmod(path, 0o666 & ~umask())  # safetensors creates 0600 files; keep the usual mode
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def atomic_write(path: Path, write: Callable[[BinaryIO], Any],
                 temporary: Path | None = None) -> Any:
    """Replace ``path`` with what ``write(file)`` writes, so readers see the old or the new
    content, never half: a temporary file beside it, flushed, fsynced and renamed into place
    (removed on any failure). Returns what ``write`` returned.

    ``temporary``: the name to write under, for callers that clear what an interrupted run
    left (``kd prepare-data``); default a unique hidden name beside ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if temporary is None:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp makes 0600 files; keep the usual mode
        tmp, file = Path(name), os.fdopen(fd, "wb")
    else:
        tmp, file = temporary, open(temporary, "wb")  # noqa: SIM115 (closed below)
    try:
        with file:
            result = write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def atomic_write_text(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8) atomically (:func:`atomic_write`)."""
    atomic_write(path, lambda f: f.write(text.encode()))


def contiguous_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict safetensors can store: detached, contiguous, CPU, no shared storage."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def save_weights(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically (temporary file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_file(tmp, lambda p: save_file(contiguous_state(state), str(p), metadata=metadata))
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, permissions: the old file (if any) stays
        tmp.unlink(missing_ok=True)
        raise output_error(f"cannot write {path}", e) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class CheckpointManager:
    """Save, list, verify and load checkpoints of one run.

    Example:
        >>> manager = CheckpointManager("runs/demo/checkpoints", keep=3)  # doctest: +SKIP
        >>> manager.save(100, student.state_dict(), {"step": 100}, config_yaml)  # doctest: +SKIP
        >>> manager.load(manager.latest())  # doctest: +SKIP
    """

    def __init__(self, directory: str | Path, keep: int) -> None:
        self.directory = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.directory / f"{_PREFIX}{step:08d}"

    def save(self, step: int, student_state: dict[str, torch.Tensor],
             train_state: dict[str, Any], config_yaml: str) -> Path:
        """Write checkpoint ``step`` atomically, point ``latest`` at it, prune old ones."""
        return self.commit(self.begin(step), step, student_state, train_state, config_yaml)

    def begin(self, step: int) -> Path:
        """A fresh temporary directory for checkpoint ``step``; others may write shards into it
        (on a file system every rank sees) before :meth:`commit`."""
        prefix = f".tmp_{self.path_for(step).name}_"
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=self.directory, prefix=prefix))
        except OSError as e:
            raise output_error(f"cannot save checkpoint {self.path_for(step)}", e) from None

    def commit(self, tmp: Path, step: int, student_state: dict[str, torch.Tensor],
               train_state: dict[str, Any], config_yaml: str) -> Path:
        """Add kd's files and a manifest of everything in ``tmp``, then rename it into place."""
        final = self.path_for(step)
        try:
            meta = {"kd_version": kd.__version__, "step": str(step)}
            _write_file(tmp / STUDENT_FILE,
                        lambda p: save_file(contiguous_state(student_state), str(p), metadata=meta))
            _write_file(tmp / STATE_FILE, lambda p: torch.save(train_state, p))
            _write_file(tmp / CONFIG_FILE, lambda p: p.write_text(config_yaml))
            files = {}
            for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
                if f.parent != tmp:  # shards written by other ranks' libraries
                    with open(f, "rb+") as handle:
                        os.fsync(handle.fileno())
                files[f.relative_to(tmp).as_posix()] = {"bytes": f.stat().st_size,
                                                        "sha256": sha256_file(f)}
            manifest = {"kd_version": kd.__version__, "step": step, "files": files}
            _write_file(tmp / MANIFEST_FILE,
                        lambda p: p.write_text(json.dumps(manifest, indent=2)))
            os.chmod(tmp, 0o777 & ~umask())  # mkdtemp makes 0700 directories
            fsync_dir(tmp)
            if final.exists():  # the same step saved again (e.g. end of a resumed, finished run)
                shutil.rmtree(final)
            os.rename(tmp, final)
            fsync_dir(self.directory)
        except OSError as e:  # e.g. a full disk: the half-written directory goes, older stay
            shutil.rmtree(tmp, ignore_errors=True)
            # Without the file name: it lay in the temporary directory, now removed.
            raise output_error(f"cannot save checkpoint {final} (earlier checkpoints are "
                               f"intact)", OSError(e.errno, e.strerror)) from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        try:
            atomic_write_text(self.directory / "latest", final.name + "\n")
        except OSError as e:  # the checkpoint is complete; latest() finds it without a pointer
            raise output_error(f"saved checkpoint {final} but cannot update "
                               f"{self.directory / 'latest'}", e) from None
        self._prune()
        return final

    def mark_best(self, step: int, metric: str, value: float) -> None:
        """Record checkpoint ``step`` as the best so far (kept by pruning, whatever its age)."""
        record = {"checkpoint": self.path_for(step).name, "step": step, metric: value}
        try:
            atomic_write_text(self.directory / BEST_FILE, json.dumps(record) + "\n")
        except OSError as e:
            raise output_error(f"cannot record the best checkpoint in {self.directory}", e
                               ) from None
        self._prune()

    def best(self) -> dict[str, Any] | None:
        """The best-checkpoint record (see :meth:`mark_best`), if any and still on disk."""
        try:
            record = json.loads((self.directory / BEST_FILE).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or not (self.directory / str(
                record.get("checkpoint"))).is_dir():
            return None
        return record

    def _prune(self) -> None:
        best = self.best()
        keep_best = self.directory / best["checkpoint"] if best else None
        for path in self.list()[:-self.keep]:
            if path != keep_best:
                shutil.rmtree(path, ignore_errors=True)
        for stale in self.directory.glob(".tmp_*"):  # left by a crash during an earlier save
            shutil.rmtree(stale, ignore_errors=True)

    def list(self) -> list[Path]:
        """Complete checkpoints (with a manifest), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [p for p in self.directory.glob(f"{_PREFIX}*")
                 if p.is_dir() and (p / MANIFEST_FILE).is_file()]
        return sorted(found, key=lambda p: p.name)

    def resumable(self) -> Path | None:
        """:meth:`latest`, or None when there is no checkpoint at all.

        Raises:
            CheckpointError: there are checkpoints but none verifies; starting over silently
                would mix a new run's checkpoints and metrics with the damaged run's.
        """
        path = self.latest()
        found = self.list()
        if path is None and found:
            try:
                verify(found[-1])
                reason = ""
            except CheckpointError as e:
                reason = f" ({e})"
            raise CheckpointError(
                f"none of the {len(found)} checkpoints in {self.directory} passes its checks, "
                f"newest {found[-1].name}{reason}; restore a good copy, or delete "
                f"{self.directory} to start over")
        return path

    def latest(self) -> Path | None:
        """The newest checkpoint that verifies; corrupt ones are skipped (newest first)."""
        pointer = self.directory / "latest"
        candidates = self.list()[::-1]
        if pointer.is_file():
            named = self.directory / pointer.read_text().strip()
            if named in candidates:  # trust the pointer first, then fall back by step
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                verify(path)
                return path
            except CheckpointError:
                continue
        return None


def verify(path: str | Path) -> dict[str, Any]:
    """Check a checkpoint's files against its manifest; return the manifest."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is not a kd checkpoint: not found; pass a "
                              f"checkpoints/step_* directory")
    if not manifest_path.is_file():
        raise CheckpointError(f"{path} is not a kd checkpoint (no {MANIFEST_FILE}); pass a "
                              f"checkpoints/step_* directory")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = {name: (int(want["bytes"]), str(want["sha256"]))
                 for name, want in manifest["files"].items()}
        if not {STUDENT_FILE, STATE_FILE, CONFIG_FILE} <= files.keys():
            raise KeyError("files")
    except (ValueError, KeyError, TypeError, AttributeError):  # valid JSON of the wrong shape
        raise CheckpointError(f"{manifest_path} is corrupt") from None
    for name, (size, sha256) in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {name} is missing")
        if f.stat().st_size != size or sha256_file(f) != sha256:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its "
                                  f"manifest (size or sha256)")
    return manifest


def find_checkpoint(path: str | Path, best: bool = False) -> Path:
    """The checkpoint directory a user means by ``path`` (``kd eval``/``kd export --checkpoint``).

    ``path`` is a ``checkpoints/step_*`` directory (used as it is), a run's ``checkpoints/``
    folder, or the run directory holding it. In the last two cases the newest checkpoint that
    passes its checks (as resuming picks it), or with ``best`` the one ``best.json`` names (the
    best student top-1 so far).

    Raises:
        CheckpointError: anything else, or a folder with no usable checkpoint; the message says
            what to pass.
    """
    path = Path(path)
    usage = "pass a run directory, its checkpoints/ folder or a checkpoints/step_* directory"
    if (path / MANIFEST_FILE).is_file() or path.name.startswith(_PREFIX):
        if best:
            raise CheckpointError(f"--best picks among a run's checkpoints, but {path} is one "
                                  f"checkpoint; pass its run directory with --best, or drop "
                                  f"--best")
        return path
    if not path.exists():
        raise CheckpointError(f"{path} is not a kd checkpoint: not found; {usage}")
    directory = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    manager = CheckpointManager(directory, keep=1)
    found = manager.list()
    if not path.is_dir() or not found:
        hint = " (with --best for the best one)" if path.name == BEST_FILE else ""
        raise CheckpointError(f"{path} is not a kd checkpoint (no {MANIFEST_FILE}) nor a run "
                              f"with complete checkpoints; {usage}{hint}")
    if best:
        record = manager.best()
        if record is None:
            raise CheckpointError(f"--best: {directory} has no {BEST_FILE} naming a checkpoint "
                                  f"still on disk (it is written when the run evaluates); pass "
                                  f"a checkpoint directory instead")
        return directory / record["checkpoint"]
    chosen = manager.latest()
    if chosen is None:
        raise CheckpointError(f"none of the {len(found)} checkpoints in {directory} passes its "
                              f"checks; pass a checkpoints/step_* directory to see why")
    return chosen


def _first_line(e: Exception) -> str:
    return str(e).splitlines()[0] if str(e).strip() else "unreadable"


def load(path: str | Path, ema: bool = False
         ) -> tuple[dict[str, torch.Tensor], dict[str, Any], str]:
    """Verify and read a checkpoint: ``(student_state, train_state, config_yaml)``; with
    ``ema``, the student's EMA (``train.ema_decay``) stands in for the student."""
    path = Path(path)
    verify(path)
    # The checksums match, yet the files may have been written wrong (or the manifest rewritten):
    # a reader's exception becomes one line.
    try:
        student = load_file(str(path / STUDENT_FILE))
    except Exception as e:
        raise CheckpointError(f"cannot read {path / STUDENT_FILE}: {type(e).__name__}: "
                              f"{_first_line(e)}") from None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read {path / STATE_FILE}: {type(e).__name__}") from None
    if ema:
        if "ema" not in state:
            raise CheckpointError(f"--ema: checkpoint {path} holds no EMA of the student (its "
                                  f"run had no train.ema_decay); export without --ema")
        student = state["ema"]
    return student, state, (path / CONFIG_FILE).read_text()
