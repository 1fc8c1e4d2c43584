"""How long torchrun lets a signalled worker save before SIGKILL, by torch version."""

from __future__ import annotations

import pytest

from kd.core.guard import ignored_shutdown_timeout, report_preemption_save, torchrun_kill_after_s

TORCHRUN = {"TORCHELASTIC_RUN_ID": "job", "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "110"}


@pytest.mark.parametrize(("env", "version", "seconds"), [
    ({}, "2.14.1", None),  # not under torchrun: the scheduler's grace time is the limit
    (TORCHRUN, "2.14.1", 110.0),
    (TORCHRUN, "2.12.0+cu126", 110.0),
    (TORCHRUN, "2.11.0", 30.0),  # pytorch/pytorch#172596 landed in 2.12
    (TORCHRUN, "2.4.1+cu124", 30.0),
    ({"TORCHELASTIC_RUN_ID": "job"}, "2.14.1", 30.0),
    ({**TORCHRUN, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "soon"}, "2.14.1", 30.0),
])
def test_torchrun_kill_deadline(env: dict, version: str, seconds: float | None) -> None:
    assert torchrun_kill_after_s(env, version) == seconds


def test_an_ignored_shutdown_timeout_is_named() -> None:
    warning = ignored_shutdown_timeout(TORCHRUN, "2.3.0")
    assert warning and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=110 is ignored" in warning
    assert "torch 2.3.0" in warning and "30 s" in warning
    assert ignored_shutdown_timeout(TORCHRUN, "2.12.0") is None
    assert ignored_shutdown_timeout({"TORCHELASTIC_RUN_ID": "job"}, "2.3.0") is None
    assert ignored_shutdown_timeout({"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "110"}, "2.3.0") is None


def test_the_save_time_is_reported_against_the_deadline() -> None:
    assert report_preemption_save(4.21, {}, "2.14.1") == "preemption checkpoint saved in 4.2 s"
    calm = report_preemption_save(4.0, TORCHRUN, "2.14.1")
    assert calm.endswith("of the 110 s torchrun allows before SIGKILL")
    tight = report_preemption_save(20.0, TORCHRUN, "2.5.1")
    assert "of the 30 s" in tight and "too close to the deadline" in tight
