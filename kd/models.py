"""Build the student and the frozen teacher with timm, and load weights safely.

Inputs arrive un-normalised (uint8 or [0, 1] floats); each model gets an :class:`InputNorm` with
its own mean and std, so a teacher trained with other statistics than the student sees inputs
normalised the way it was trained.
"""

from __future__ import annotations

import difflib
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from kd.errors import CheckpointError, ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent


def resolve_path(path: str) -> Path:
    """Expand ``kd://relative/path`` to a file inside the installed package."""
    if path.startswith("kd://"):
        return PACKAGE_DIR / path.removeprefix("kd://")
    return Path(path).expanduser()


class InputNorm(nn.Module):
    """``(x / 255 if uint8) - mean) / std`` per channel, on the device, in float32."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)

    def same_as(self, other: InputNorm) -> bool:
        """Whether both apply the same statistics (then one normalised tensor serves both)."""
        return torch.equal(self.mean, other.mean) and torch.equal(self.std, other.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std


def _in_chans(model: nn.Module) -> int | None:
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else None


def build_input_norm(model: nn.Module, mean: Sequence[float] | None,
                     std: Sequence[float] | None, section: str) -> InputNorm:
    """Normalisation for ``model``: the config's mean/std, else the model's pretrained config.

    A single value is used for every channel; a pretrained config with three equal values is
    broadcast to a one-channel model, but unequal ones need an explicit setting.
    """
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    channels = _in_chans(model) or 3
    stats = {}
    for key, given in (("mean", mean), ("std", std)):
        values = list(given) if given is not None else list(cfg.get(key, (0.5,) * channels))
        if len(values) != channels:
            if len(values) == 1 or len(set(values)) == 1:
                values = values[:1] * channels
            else:
                raise ConfigError(f"{section}.{key} has {len(values)} values but the model takes "
                                  f"{channels} channels; set {section}.{key} explicitly")
        stats[key] = values
    return InputNorm(stats["mean"], stats["std"])


def create_timm_model(name: str, section: str, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` with one-line errors for unknown names and bad arguments."""
    if not timm.is_model(name):
        near = difflib.get_close_matches(name, timm.list_models(), n=1, cutoff=0.6)
        hint = f" (did you mean '{near[0]}'?)" if near else " (see timm.list_models())"
        raise ConfigError(f"{section}.name: unknown timm model '{name}'{hint}")
    try:
        return timm.create_model(name, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{section}.kwargs: timm rejected an argument for {name}: {e}") from None
    except (AssertionError, ValueError) as e:
        raise ConfigError(f"{section}.kwargs: invalid model arguments for {name}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def check_patch_grid(model: nn.Module, image_size: int, section: str, setting: str) -> None:
    """Refuse an image side that a ViT's patches do not tile.

    timm's patch embedding is a strided convolution: on a 20-pixel image with 8-pixel patches it
    silently ignores the last 4 rows and columns (it pads only with ``dynamic_img_pad``).
    """
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return
    step = math.lcm(*((patch,) if isinstance(patch, int) else tuple(patch)))
    if image_size % step:
        lower = image_size // step * step
        sizes = f"{lower} or {lower + step}" if lower else str(step)
        raise ConfigError(f"{setting}={image_size} is not a multiple of the {section}'s patch "
                          f"size {step} ({section}.kwargs.patch_size): the last "
                          f"{image_size % step} pixel rows and columns would be ignored; use "
                          f"{setting}={sizes}")


def num_outputs(model: nn.Module) -> int | None:
    """Classes predicted by a timm classifier (None when unknown)."""
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else None


def load_state_dict(path: str, setting: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or ``torch.load(weights_only=True)``.

    Wrapped state dicts (``{"state_dict": ...}``, ``{"model": ...}``, EMA) are unwrapped and a
    ``module.`` prefix from DistributedDataParallel is stripped.
    """
    p = resolve_path(path)
    if p.is_dir():
        raise CheckpointError(f"{setting}: {path} is a folder; point it at a .safetensors or "
                              f".pt/.pth file")
    if not p.is_file():
        raise CheckpointError(f"{setting}: checkpoint not found: {path}")
    if p.stat().st_size == 0:
        raise CheckpointError(f"{setting}: cannot read checkpoint {path}: the file is empty (an "
                              f"interrupted copy?)")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused it before running anything
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found is None:  # torch's message would say "re-run with weights_only=False"
            raise CheckpointError(f"{setting}: cannot read checkpoint {path}: not a PyTorch "
                                  f"file, or a damaged one") from None
        raise CheckpointError(
            f"{setting}: cannot read checkpoint {path}: it holds Python objects besides tensors "
            f"({found.group(1)}), which kd does not unpickle (they could run code); save the "
            f"weights alone (torch.save(model.state_dict(), ...)) or as .safetensors") from None
    except Exception as e:  # corrupt or truncated files raise many different types
        raise CheckpointError(f"{setting}: cannot read checkpoint {path}: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{setting}: {path} is not a state dict of tensors (a mapping "
                              f"of parameter names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights(model: nn.Module, path: str, section: str, num_classes: int) -> None:
    """Load ``path`` into ``model`` strictly; a classifier of another size is a clear error."""
    state = load_state_dict(path, f"{section}.checkpoint")
    own = model.state_dict()
    head = getattr(model, "get_classifier", lambda: None)()
    heads = head if isinstance(head, tuple) else (head,)  # DeiT: (head, head_dist)
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if any(m is h for h in heads)}
    for key in head_keys & state.keys():
        if state[key].shape[0] != num_classes:
            raise CheckpointError(
                f"{section}.checkpoint {path} has a {state[key].shape[0]}-class classifier but "
                f"data.num_classes={num_classes}; use a teacher trained on these classes")
    mismatch = describe_mismatch(own, state)
    if mismatch:
        raise CheckpointError(f"{section}.checkpoint {path} does not fit {section}.name/"
                              f"{section}.kwargs: {mismatch}")
    model.load_state_dict(state, strict=True)


def describe_mismatch(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> str:
    """What keeps ``state`` from loading into a model whose state dict is ``own`` ('' if none)."""
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if wrong:
        k = wrong[0]
        parts.append(f"shape of {k}: {tuple(state[k].shape)} vs model {tuple(own[k].shape)}")
    return "; ".join(parts)


def build_student(cfg: Any, num_classes: int) -> nn.Module:
    """The trainable student: ``timm.create_model(cfg.name, num_classes=..., **cfg.kwargs)``."""
    return create_timm_model(cfg.name, "student", pretrained=cfg.pretrained,
                             num_classes=num_classes, **dict(cfg.kwargs))


class FrozenTeacher(nn.Module):
    """A teacher in eval mode with no gradients; it runs without autograd.

    It is never wrapped for data parallelism: each rank holds a replica, and nothing of it is
    synchronised.
    """

    def __init__(self, model: nn.Module, norm: InputNorm) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.norm = norm
        self.eval()  # the wrapper too, not only the wrapped model

    def train(self, mode: bool = True) -> FrozenTeacher:
        """Stays in eval mode whatever the caller asks (dropout and drop-path off)."""
        return super().train(False)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the teacher's weights (see :meth:`cast`)."""
        return next(self.model.parameters()).dtype

    def cast(self, dtype: torch.dtype) -> FrozenTeacher:
        """Hold the weights in ``dtype`` (bf16 or fp16 when training under that autocast: half
        the memory of fp32, and no cast of every weight at every forward). The normalisation
        stays fp32; inputs are cast at the model's door."""
        self.model.to(dtype)
        return self

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for inputs already normalised with ``self.norm``.

        Runs under ``torch.inference_mode`` (no autograd records and no version counters). The
        logits are inference tensors: read them freely, but do not modify them in place.
        """
        out = self.model(x.to(self.dtype))
        return out[0] if isinstance(out, tuple) else out


def build_teacher(cfg: Any, num_classes: int) -> FrozenTeacher | None:
    """The frozen teacher, or None when it has no weights configured.

    A teacher without a checkpoint and without pretrained weights would be random; kd refuses to
    distil from it (the trainer raises when the distillation loss needs one).
    """
    if cfg.checkpoint:
        model = create_timm_model(cfg.name, "teacher", num_classes=num_classes,
                                  **dict(cfg.kwargs))
        load_weights(model, cfg.checkpoint, "teacher", num_classes)
    elif cfg.pretrained:
        # No num_classes here: timm would silently replace a mismatched head with a random one.
        model = create_timm_model(cfg.name, "teacher", pretrained=True, **dict(cfg.kwargs))
        if num_outputs(model) != num_classes:
            raise ConfigError(f"teacher {cfg.name} predicts {num_outputs(model)} classes but "
                              f"data.num_classes={num_classes}; use teacher.checkpoint with a "
                              f"teacher fine-tuned on these classes")
    else:
        return None
    norm = build_input_norm(model, cfg.mean, cfg.std, "teacher")
    return FrozenTeacher(model, norm)


TEACHER_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def teacher_dtype(setting: str, precision: str) -> torch.dtype:
    """``teacher.dtype`` resolved for a run's (resolved) ``train.precision``.

    Example:
        >>> teacher_dtype("auto", "bf16"), teacher_dtype("auto", "fp32")
        (torch.bfloat16, torch.float32)
    """
    if setting == "auto":
        return TEACHER_DTYPES.get(precision, torch.float32)
    return TEACHER_DTYPES[setting]


def is_distilled_vit(model: nn.Module) -> bool:
    """Whether the model has a DeiT distillation token and head."""
    return hasattr(model, "set_distilled_training") and hasattr(model, "head_dist")
