"""``train.precision=auto`` picks bf16 where hardware multiplies bf16 matrices, else fp32."""

from __future__ import annotations

import pytest
import torch

import kd.core.precision
from kd.core.precision import resolve_precision

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
    assert not kd.core.precision.cpu_has_amx_bf16()
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported", raising=False)
    assert resolve_precision("auto", CPU) == "fp32"


CUDA = torch.device("cuda", 0)


@pytest.mark.parametrize(("capability", "expected"),
                         [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((8, 6), "bf16"),
                          ((9, 0), "bf16")])
def test_auto_on_cuda_follows_compute_capability(monkeypatch: pytest.MonkeyPatch,
                                                 capability: tuple[int, int],
                                                 expected: str) -> None:
    # is_bf16_supported() counts emulation: True on a V100 or T4. kd must not ask it.
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", CUDA) == expected


@pytest.mark.parametrize(("capability", "enabled", "on"),
                         [((8, 0), True, True), ((9, 0), True, True), ((7, 0), True, False),
                          ((8, 0), False, False)])
def test_tf32_on_ampere_and_later_when_asked(monkeypatch: pytest.MonkeyPatch,
                                             capability: tuple[int, int], enabled: bool,
                                             on: bool) -> None:
    matmul = torch.backends.cuda.matmul  # a module whose attributes are cuBLAS settings
    name = "fp32_precision" if hasattr(matmul, "fp32_precision") else "allow_tf32"
    off, tf32 = ("ieee", "tf32") if name == "fp32_precision" else (False, True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    saved = getattr(matmul, name)
    setattr(matmul, name, off)
    try:
        assert kd.core.precision.maybe_enable_tf32(CUDA, enabled) is on
        assert getattr(matmul, name) == (tf32 if on else off)
        assert not kd.core.precision.maybe_enable_tf32(CPU, True)
    finally:
        setattr(matmul, name, saved)


@pytest.mark.gpu
def test_auto_precision_and_tf32_on_this_gpu() -> None:
    capability = torch.cuda.get_device_capability()
    assert resolve_precision("auto", CUDA) == ("bf16" if capability >= (8, 0) else "fp16")
    assert kd.core.precision.maybe_enable_tf32(CUDA, True) is (capability >= (8, 0))
