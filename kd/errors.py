"""Errors that end a `kd` command with a one-line message instead of a traceback."""

from __future__ import annotations


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
