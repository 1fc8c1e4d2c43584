"""Numeric precision of a run: ``train.precision=auto`` resolved for the device, autocast, TF32.

Used by the trainer, the teacher-cache builder, ``kd bench`` and ``kd plan`` alike, so that each
runs the models in the precision training does.
"""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("kd")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def cpu_has_amx_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware (Intel AMX: Sapphire Rapids and
    later), where bf16 autocast trains ViTs faster than fp32 (kd bench: 72 vs 48 img/s for
    ViT-S → ViT-Ti at 112 px on 2 cores). torch exposes the check only privately."""
    check = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(check()) if check is not None else False
    except Exception:  # a private API: never let it stop a run
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on GPUs of compute capability 8.0 and later (else fp16) and on CPUs with
    AMX, fp32 on other CPUs; the choice and its reason are logged."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        # Not torch.cuda.is_bf16_supported(): it counts emulation by default and says True on
        # V100 (7.0) and T4 (7.5), whose tensor cores have no bf16.
        capability = torch.cuda.get_device_capability(device)
        choice = "bf16" if capability >= (8, 0) else "fp16"
        log.info("train.precision=auto: %s (compute capability %d.%d: bf16 tensor cores from "
                 "8.0)", choice, *capability)
        return choice
    choice = "bf16" if cpu_has_amx_bf16() else "fp32"
    log.info("train.precision=auto: %s (%s)", choice,
             "this CPU multiplies bf16 in hardware (AMX)" if choice == "bf16" else "no AMX")
    return choice


def maybe_enable_tf32(device: torch.device, enabled: bool) -> bool:
    """TF32 for fp32 matrix multiplies on GPUs of compute capability 8.0 and later
    (``train.tf32``); returns whether it is on. The cuDNN convolutions already default to it."""
    if not enabled or device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
    log.info("train.tf32: fp32 matrix multiplies use TF32 tensor cores")
    return True


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for a resolved precision: a bf16 or fp16 region, or nothing for fp32."""
    dtype = DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
