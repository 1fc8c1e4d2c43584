"""``train.precision=auto`` picks bf16 where hardware multiplies bf16 matrices, else fp32."""

from __future__ import annotations

import pytest
import torch

import kd.trainer
from kd.trainer import resolve_precision

CPU = torch.device("cpu")


@pytest.mark.parametrize(("amx", "expected"), [(True, "bf16"), (False, "fp32")])
def test_auto_on_cpu_follows_amx(monkeypatch: pytest.MonkeyPatch, amx: bool,
                                 expected: str) -> None:
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    assert resolve_precision("auto", CPU) == expected
    for explicit in ("fp32", "bf16", "fp16"):  # a chosen precision is kept
        assert resolve_precision(explicit, CPU) == explicit


def test_amx_check_never_stops_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> bool:
        raise RuntimeError("private API changed")

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", broken, raising=False)
    assert not kd.trainer.cpu_has_amx_bf16()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_precision("auto", CPU) == "fp32"
