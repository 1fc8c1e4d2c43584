"""Errors that end a `kd` command with a one-line message instead of a traceback."""

from __future__ import annotations

import errno


class UserError(Exception):
    """A mistake the user can fix (config, path, data, checkpoint); the CLI exits with code 2.

    The message is one line that names the problem and, where possible, the fix.
    """

    exit_code = 2


class ConfigError(UserError):
    """An unknown key, a wrong type or an invalid value in the configuration."""


class DataError(UserError):
    """A missing, empty or malformed dataset."""


class CheckpointError(UserError):
    """A missing, truncated, corrupt or incompatible checkpoint."""


class CacheError(UserError):
    """A teacher-output cache that does not fit the run, or a missing or damaged shard."""


class ExportError(UserError):
    """An exported graph that does not compute what the student computes."""


class TeacherError(UserError):
    """A teacher that fails the check before training (``distill.require_teacher_top1``)."""


class DistributedError(UserError):
    """Another rank died or hung, so a collective failed or timed out (``dist.timeout_s``).

    The message names the rank(s) at fault (:mod:`kd.core.watchdog`); the CLI exits with code 3.
    """

    exit_code = 3


class DivergedError(UserError):
    """Training stopped after ``train.max_skipped_steps`` consecutive non-finite steps."""

    exit_code = 4


class Preempted(Exception):
    """A stop signal (SIGTERM, SIGUSR1) ended training early after saving a checkpoint.

    Not a :class:`UserError`: nothing is wrong, and running the same command again resumes.
    """

    exit_code = 75  # EX_TEMPFAIL: a temporary failure, try again

    def __init__(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        where = f"checkpoint {checkpoint}" if checkpoint else "a checkpoint"
        super().__init__(f"stopped by {signal_name} at step {step} after saving {where}; run "
                         f"the same command again to resume")
        self.step, self.checkpoint = step, checkpoint


class AugmentationError(RuntimeError):
    """A training transform raised on a sample that was read and decoded.

    Not a :class:`UserError` and never a skipped sample (``data.on_error`` covers reading and
    decoding only): an augmentation that fails is a bug in kd or in the library it calls, so the
    run stops with a traceback (exit 1), naming the sample, the step and the exception.
    """


class OutputError(UserError):
    """An output kd cannot write: disk full, over quota, no permission, read-only, not a folder."""


# errno values that mean the disk or the path is at fault, never kd: one line, not a traceback.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS,
                 errno.EEXIST, errno.ENOTDIR, errno.EISDIR}


def output_error(what: str, e: OSError, setting: str = "output_dir") -> OutputError:
    """``e``, raised while doing ``what``, as one line that says how to fix it.

    Example:
        >>> e = OSError(errno.ENOSPC, "No space left on device", "runs/a/x")
        >>> print(output_error("cannot save checkpoint step_00000020", e))  # doctest: +ELLIPSIS
        cannot save checkpoint step_00000020: No space left on device (runs/a/x); free disk ...
    """
    reason = e.strerror or str(e) or type(e).__name__
    where = f" ({e.filename})" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = f"free disk space or set {setting} to a folder on another disk"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = f"make it writable or set {setting} to a writable folder"
    elif e.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
        fix = f"a file stands where a folder should be (or the reverse); set {setting} to " \
              f"another path"
    else:
        fix = f"check the disk, or set {setting} to another folder"
    return OutputError(f"{what}: {reason}{where}; {fix}")
