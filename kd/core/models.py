"""Build the student and the frozen teacher with timm, and load weights safely.

Inputs arrive un-normalised (uint8 or [0, 1] floats); each model gets an :class:`InputNorm` with
its own mean and std, so a teacher trained with other statistics than the student sees inputs
normalised the way it was trained. :func:`check_model_input` runs one training image through each
model before anything else happens, so that a model that cannot take the data is a one-line error
naming the key to change, in every command that builds models.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import math
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

from kd.config import StudentConfig, TeacherConfig
from kd.core.features import LayerTap, WithFeatures
from kd.errors import CheckpointError, ConfigError

log = logging.getLogger("kd")

PACKAGE_DIR = Path(__file__).resolve().parents[1]  # kd/, where kd:// paths point


def resolve_path(path: str) -> Path:
    """Expand ``kd://relative/path`` to a file inside the installed package."""
    if path.startswith("kd://"):
        return PACKAGE_DIR / path.removeprefix("kd://")
    return Path(path).expanduser()


class InputNorm(nn.Module):
    """``(x / 255 if uint8) - mean) / std`` per channel, on the device, in float32.

    A one-channel batch for a model with several channels (grey images, an RGB model) has its
    channel replicated first: :func:`check_model_input` allows that only with
    ``data.grey_to_rgb`` and says so once.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1),
                             persistent=False)

    def same_as(self, other: InputNorm) -> bool:
        """Whether both apply the same statistics (then one normalised tensor serves both)."""
        return torch.equal(self.mean, other.mean) and torch.equal(self.std, other.std)

    @property
    def channels(self) -> int:
        """The channels of the model this normalises for."""
        return self.mean.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1 and self.channels > 1:  # grey → RGB: a view, no copy
            x = x.expand(-1, self.channels, -1, -1)
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


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a normalised (B, C, H, W) batch to ``size``² (bilinear, antialiased when shrinking).

    Normalisation is a per-channel affine map and resampling is linear, so resizing after
    normalising equals normalising the resized image.
    """
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=size < x.shape[-1])


def check_channels(data_channels: int, model: nn.Module, section: str,
                   grey_to_rgb: bool = True) -> None:
    """Refuse data whose channels the model cannot take, or say how they are converted.

    Grey data for a three-channel model is replicated to RGB (:class:`InputNorm`) when
    ``data.grey_to_rgb`` allows it, and the log says so; any other difference is a ConfigError
    naming ``<section>.kwargs.in_chans``.
    """
    channels = _in_chans(model) or data_channels
    if channels == data_channels:
        return
    key = f"{section}.kwargs.in_chans"
    if data_channels == 1 and channels == 3:
        if grey_to_rgb:
            log.info("the data has 1 channel and the %s takes 3 (%s=3): the grey channel is "
                     "replicated to RGB (data.grey_to_rgb=true; false refuses instead)", section,
                     key)
            return
        raise ConfigError(f"{key}: the data has 1 channel but the {section} takes 3 and "
                          f"data.grey_to_rgb=false; set {key}=1, or data.grey_to_rgb=true to "
                          f"replicate the grey channel")
    raise ConfigError(f"{key}: the data has {data_channels} channel"
                      f"{'s' if data_channels > 1 else ''} but the {section} takes {channels}; "
                      f"set {key}={data_channels}")


def check_model_input(model: nn.Module, norm: InputNorm, image: torch.Tensor, *, section: str,
                      name: str, image_size: int, teacher_image_size: int | None = None,
                      grey_to_rgb: bool = True) -> None:
    """One raw (1, C, H, W) training image through ``model`` (on the CPU, in fp32, no grad).

    ``section`` is ``student`` or ``teacher`` (whose input is resized to ``teacher_image_size``
    when set, as training does). A model that cannot take the image, its channels or its size is
    a ConfigError naming the key to change; every command that builds models calls this first.
    """
    size_key = "teacher.image_size" if teacher_image_size else "data.image_size"
    check_patch_grid(model, teacher_image_size or image_size, section, size_key)
    check_channels(image.shape[1], model, section, grey_to_rgb)
    was_training = model.training
    x = image
    try:
        with torch.no_grad():
            x = norm(image)
            if teacher_image_size:
                x = resize(x, teacher_image_size)
            model.eval()(x)
    except Exception as e:  # shape errors surface as many exception types
        msg = str(e).splitlines()[0].rstrip(".") if str(e) else type(e).__name__
        hint = "; set teacher.image_size to the size it was trained at" \
            if section == "teacher" else ""
        raise ConfigError(
            f"{section}.kwargs: {section} {name} cannot take {tuple(x.shape)} images "
            f"(data.image_size={image_size}): {msg}{hint}") from None
    finally:
        model.train(was_training)


def num_outputs(model: nn.Module) -> int | None:
    """Classes predicted by a timm classifier (None when unknown)."""
    n = getattr(model, "num_classes", None)
    return int(n) if n is not None else None


# Containers that training checkpoints hold beside their weights, safe to rebuild: timm's
# train.py saves its argparse.Namespace as "args"; PyTorch Lightning its hyper-parameters as an
# AttributeDict, read here as the plain dict it is (torch's weights-only unpickler fills no dict
# subclass), so reading a Lightning checkpoint needs neither Lightning nor weights_only=False.
_CHECKPOINT_GLOBALS = [argparse.Namespace, *(
    (dict, f"{module}.AttributeDict") for module in (
        "lightning.fabric.utilities.data", "lightning_fabric.utilities.data",
        "pytorch_lightning.utilities.parsing"))]
# The entries that hold a model's plain weights, tried in this order when
# ``<section>.checkpoint_key`` is null (timm and Lightning: state_dict; DeiT, MAE: model).
WEIGHT_KEYS = ("state_dict", "model", "module")


def _read_checkpoint(path: str, setting: str) -> Any:
    """The object in a weights file, read without executing code."""
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

            return load_file(str(p))
        safe = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with safe(_CHECKPOINT_GLOBALS) if safe else contextlib.nullcontext():
            return torch.load(p, map_location="cpu", weights_only=True)
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


def _is_weights(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values())


def _select_weights(obj: Any, path: str, setting: str, key: str | None
                    ) -> tuple[Mapping[str, torch.Tensor], str | None]:
    """The weights inside a (training) checkpoint, and the entry they came from (None: the
    file itself)."""
    key_setting = setting.replace(".checkpoint", ".checkpoint_key") \
        if setting.endswith(".checkpoint") else "checkpoint_key"
    if key is not None:
        if not isinstance(obj, Mapping) or not isinstance(obj.get(key), Mapping):
            entries = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, Mapping) else "none"
            raise CheckpointError(f"{key_setting}={key}: {path} has no '{key}' entry of weights "
                                  f"(its entries: {entries})")
        chosen, used = obj[key], key
    else:
        used = next((k for k in WEIGHT_KEYS if isinstance(obj, Mapping)
                     and isinstance(obj.get(k), Mapping)), None)
        chosen = obj[used] if used is not None else obj
        if used is None and isinstance(obj, Mapping) and not _is_weights(obj):
            ema = next((k for k in ("state_dict_ema", "model_ema") if isinstance(
                obj.get(k), Mapping)), None)  # an EMA alone: say how to choose it
            if ema is not None:
                raise CheckpointError(f"{setting}: {path} holds only EMA weights ('{ema}'); set "
                                      f"{key_setting}={ema} to load them")
    if used is not None and isinstance(chosen, Mapping) and "model" in chosen and \
            isinstance(chosen["model"], Mapping) and not _is_weights(chosen):
        chosen, used = chosen["model"], f"{used}.model"  # {"model": {"model": ...}} (DeiT)
    if not _is_weights(chosen):
        raise CheckpointError(f"{setting}: {path} is not a state dict of tensors (a mapping "
                              f"of parameter names to tensors)")
    return chosen, used


def _fitting_prefixes(names: Sequence[str], own: set[str]) -> dict[str, int]:
    """For each prefix ending in ``.`` (or none) that turns some of ``names`` into keys of
    ``own``, how many distinct keys of ``own`` it reaches."""
    reach: dict[str, set[str]] = {}
    for name in names:
        for i in [-1, *(i for i, c in enumerate(name) if c == ".")]:
            rest = name[i + 1:]
            if rest in own:
                reach.setdefault(name[:i + 1], set()).add(rest)
    return {prefix: len(keys) for prefix, keys in reach.items()}


def _strip_prefix(state: Mapping[str, torch.Tensor], own: set[str] | None, path: str,
                  setting: str, prefix: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """The state with the prefix that matches the model's names removed (Lightning's
    ``model.``, DDP's ``module.``, ...), and that prefix."""
    prefix_setting = setting.replace(".checkpoint", ".checkpoint_prefix") \
        if setting.endswith(".checkpoint") else "checkpoint_prefix"
    names = list(state)
    if prefix is None and own is None:  # no model to match: DDP's module. alone
        prefix = "module." if names and all(n.startswith("module.") for n in names) else ""
    elif prefix is None:
        fits = _fitting_prefixes(names, own)
        full = sorted(p for p, n in fits.items() if n == len(own))
        if len(full) > 1:
            shown = ", ".join(f"'{p}'" if p else "'' (none)" for p in full)
            raise CheckpointError(f"{setting}: the weights in {path} fit the model under "
                                  f"{len(full)} prefixes, {shown}; choose one with "
                                  f"{prefix_setting}=...")
        # No full fit: the best partial one, so the mismatch error names the real differences.
        prefix = full[0] if full else max(fits, key=lambda p: (fits[p], p == ""), default="")
    if prefix and not any(n.startswith(prefix) for n in names):
        raise CheckpointError(f"{prefix_setting}={prefix}: no weight name in {path} starts "
                              f"with it (e.g. '{names[0] if names else ''}')")
    if not prefix:
        return dict(state), ""
    return {n[len(prefix):]: v for n, v in state.items() if n.startswith(prefix)}, prefix


def load_state_dict(path: str, setting: str = "checkpoint", *, key: str | None = None,
                    prefix: str | None = None, expected: Sequence[str] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Read a state dict without executing code: safetensors, or ``torch.load(weights_only=True)``.

    A training checkpoint's weights are taken from its ``key`` entry, or with ``key=None`` from
    the first of :data:`WEIGHT_KEYS` it has (timm's ``train.py`` and PyTorch Lightning write
    ``state_dict``; timm's EMA weights need ``key="state_dict_ema"``). Their names lose
    ``prefix``, or with ``prefix=None`` the one prefix under which they match ``expected`` (the
    model's own names: Lightning's ``model.``, DDP's ``module.``, ...; without ``expected``,
    DDP's ``module.`` only). Entries outside the prefix (a Lightning module's other parts) are
    dropped. Which entry and prefix were used is logged.

    Raises:
        CheckpointError: a missing, empty, unreadable or unsafe file; no such entry; weights
            that fit under two prefixes (``<section>.checkpoint_prefix`` chooses).
    """
    obj = _read_checkpoint(path, setting)
    state, used = _select_weights(obj, path, setting, key)
    own = set(expected) if expected is not None else None
    found = len(state)
    state, stripped = _strip_prefix(state, own, path, setting, prefix)
    if used is not None or stripped:
        ignored = found - len(state)
        log.info("%s: weights from %s%s%s", setting,
                 f"the '{used}' entry of {path}" if used else path,
                 f", names without the prefix '{stripped}'" if stripped else "",
                 f" ({ignored} entries outside it ignored)" if ignored else "")
    return state


def load_weights(model: nn.Module, path: str, section: str, num_classes: int,
                 key: str | None = None, prefix: str | None = None) -> None:
    """Load ``path`` into ``model`` strictly; a classifier of another size is a clear error."""
    own = model.state_dict()
    state = load_state_dict(path, f"{section}.checkpoint", key=key, prefix=prefix,
                            expected=list(own))
    if num_classes == 0:
        state = drop_classifier(model, state, path, section)
    head = getattr(model, "get_classifier", lambda: None)()
    heads = head if isinstance(head, tuple) else (head,)  # DeiT: (head, head_dist)
    head_keys = {f"{n}.weight" for n, m in model.named_modules() if any(m is h for h in heads)}
    for name in head_keys & state.keys():
        if state[name].shape[0] != num_classes:
            raise CheckpointError(
                f"{section}.checkpoint {path} has a {state[name].shape[0]}-class classifier but "
                f"data.num_classes={num_classes}; use a teacher trained on these classes")
    mismatch = describe_mismatch(own, state)
    if mismatch:
        raise CheckpointError(f"{section}.checkpoint {path} does not fit {section}.name/"
                              f"{section}.kwargs: {mismatch}")
    model.load_state_dict(state, strict=True)


def drop_classifier(model: nn.Module, state: dict[str, torch.Tensor], path: str,
                    section: str) -> dict[str, torch.Tensor]:
    """A checkpoint with a classifier, for a model built without one (``num_classes: 0``):
    the classifier's weights (timm's ``pretrained_cfg["classifier"]``) are left out, logged."""
    names = getattr(model, "pretrained_cfg", {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    own = model.state_dict()
    dropped = sorted(k for k in state if k not in own
                     and any(k.startswith(f"{n}.") for n in names))
    if dropped:
        log.info("%s.checkpoint %s: classifier %s left out (%s.kwargs.num_classes=0 builds the "
                 "model headless)", section, path, ", ".join(dropped), section)
    return {k: v for k, v in state.items() if k not in dropped}


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


def build_student(cfg: StudentConfig, num_classes: int) -> nn.Module:
    """The trainable student: ``timm.create_model(cfg.name, num_classes=..., **cfg.kwargs)``,
    with timm's activation checkpointing when ``student.grad_checkpointing``."""
    model = create_timm_model(cfg.name, "student", pretrained=cfg.pretrained,
                              num_classes=num_classes, **dict(cfg.kwargs))
    if cfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ConfigError(f"student.grad_checkpointing: timm's {cfg.name} has no "
                              f"set_grad_checkpointing; set student.grad_checkpointing=false")
        try:
            model.set_grad_checkpointing(True)
        except (AssertionError, NotImplementedError) as e:
            raise ConfigError(f"student.grad_checkpointing: timm's {cfg.name} cannot checkpoint "
                              f"its activations ({str(e) or type(e).__name__}); set "
                              f"student.grad_checkpointing=false") from None
    return model


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
    def headless(self) -> bool:
        """Built without a classifier (``teacher.kwargs.num_classes: 0``): no logits."""
        return num_outputs(self.model) == 0

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

    @torch.inference_mode()
    def with_features(self, x: torch.Tensor, tap: LayerTap) -> WithFeatures:
        """Logits (None when headless) and the tokens of ``tap``'s layers, from one forward.
        Like the logits, the tokens are inference tensors (see :meth:`forward`)."""
        out, tokens = tap(x.to(self.dtype))
        logits = None if self.headless else out[0] if isinstance(out, tuple) else out
        return WithFeatures(logits, tokens)


def build_teacher(cfg: TeacherConfig, num_classes: int) -> FrozenTeacher | None:
    """The frozen teacher, or None when it has no weights configured.

    A teacher without a checkpoint and without pretrained weights would be random; kd refuses to
    distil from it (the trainer raises when the distillation loss needs one).
    """
    kwargs = dict(cfg.kwargs)
    headless = kwargs.get("num_classes") == 0  # a backbone: features only (distill.features)
    if cfg.checkpoint:
        classes = kwargs.pop("num_classes", num_classes)
        model = create_timm_model(cfg.name, "teacher", num_classes=classes, **kwargs)
        load_weights(model, cfg.checkpoint, "teacher", classes, key=cfg.checkpoint_key,
                     prefix=cfg.checkpoint_prefix)
    elif cfg.pretrained:
        # No num_classes here (unless 0): timm would silently replace a mismatched head with a
        # random one.
        model = create_timm_model(cfg.name, "teacher", pretrained=True, **kwargs)
        if not headless and num_outputs(model) != num_classes:
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
