"""Representation distillation (``distill.features``): named layers of the student and the
teacher, their outputs as aligned token grids, projectors and the feature losses.

A layer is a block index of timm's ``forward_intermediates`` (ViTs, DeiT, most timm CNNs through
their stages; negative counts from the end) or a module path (``blocks.3.mlp``) taken with a
forward hook, for any model. Block indices come out of the same forward pass that gives the
logits (``forward_intermediates`` and then ``forward_head``), so a feature pair costs no second
forward.

**Tokens.** Every layer output becomes a token grid: a ViT block's ``(B, N, C)`` splits into
its P prefix tokens (class, distillation and register tokens: the model's
``num_prefix_tokens``) and an H×W grid of patch tokens; a CNN's ``(B, C, H, W)`` map is an H×W
grid with no prefix tokens; a ``(B, C)`` output is a 1×1 grid.

**Alignment** of a pair, after the student's tokens went through the pair's projector (to the
teacher's width):

* ``patch``: the teacher's grid is resampled (bilinear) to the student's H×W, and the loss runs
  over the H·W tokens; so other patch sizes, other image sizes (``teacher.image_size``) and a
  CNN teacher for a ViT student all align;
* ``prefix``: the first prefix token (the class token) of each; both models need one;
* ``pooled``: each grid's mean over H×W, one vector per image;
* ``all``: the class tokens (when both models have one) and the patch tokens, together.

**Losses**, in fp32 over tokens of C channels: ``cosine`` (1 − cosine similarity, averaged over
tokens), ``mse`` (mean squared error over all elements) and ``smooth_l1`` (Huber with β = 1,
mean over all elements).
"""

from __future__ import annotations

import difflib
import inspect
import logging
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kd.config import FeaturePairConfig
from kd.core.annotate import annotate
from kd.errors import ConfigError

log = logging.getLogger("kd")


class Tokens(NamedTuple):
    """A layer's output: the patch grid ``(B, C, H, W)``, the prefix tokens ``(B, P, C)``
    (None without any) and, among them, the class token ``(B, 1, C)`` (None without one: a
    ViT whose prefix holds register tokens only has none)."""

    grid: torch.Tensor
    prefix: torch.Tensor | None
    cls: torch.Tensor | None = None


class WithFeatures(NamedTuple):
    """A model's output (logits, or DeiT's pair of logits; None for a headless teacher) and
    the tokens of its feature layers, in the order of ``distill.features``."""

    out: Any
    features: list[Tokens]


def pair_key(i: int, side: str | None = None) -> str:
    return f"distill.features[{i}]" + (f".{side}" if side else "")


def block_count(model: nn.Module) -> int | None:
    """The blocks ``forward_intermediates`` indexes (None when the model has none)."""
    if not hasattr(model, "forward_intermediates"):
        return None
    info = getattr(model, "feature_info", None)
    if isinstance(info, list) and info:
        return len(info)
    blocks = getattr(model, "blocks", None)
    return len(blocks) if blocks is not None else None


def as_tokens(out: Any, num_prefix: int, grid_size: tuple[int, int] | None = None,
              class_token: bool | None = None, channels_last: bool = False) -> Tokens:
    """A layer's output as :class:`Tokens` (see the module docstring). ``class_token``: the
    first prefix token is a class token (default: when there are prefix tokens);
    ``channels_last``: 4-D outputs are ``(B, H, W, C)`` (timm's NHWC models, e.g. Swin)."""
    has_class = num_prefix > 0 if class_token is None else class_token

    def with_class(grid: torch.Tensor, prefix: torch.Tensor | None) -> Tokens:
        cls = prefix[:, :1] if has_class and prefix is not None and prefix.shape[1] else None
        return Tokens(grid, prefix, cls)

    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], torch.Tensor) \
            and out[0].dim() == 4:  # forward_intermediates(return_prefix_tokens=True)
        return with_class(out[0], out[1])
    if isinstance(out, (tuple, list)):  # a module that returns several tensors: the first
        out = out[0]
    if out.dim() == 4:
        return Tokens(out.permute(0, 3, 1, 2) if channels_last else out, None)
    if out.dim() == 2:
        return Tokens(out[:, :, None, None], None)
    if out.dim() != 3:
        raise ValueError(f"an output of shape {tuple(out.shape)} is not a token grid")
    prefix = out[:, :num_prefix] if num_prefix else None
    patches = out[:, num_prefix:]
    n = patches.shape[1]
    h, w = grid_size if grid_size and grid_size[0] * grid_size[1] == n else (math.isqrt(n),) * 2
    if h * w != n:
        raise ValueError(f"{n} patch tokens do not form a square grid")
    grid = patches.transpose(1, 2).reshape(out.shape[0], out.shape[2], h, w)
    return with_class(grid, prefix)


class LayerTap:
    """Takes the outputs of a model's feature layers during its forward pass.

    Args:
        model: the (unwrapped) timm model.
        layers: one layer per pair: a block index or a module path.
        side: ``student`` or ``teacher``, for the config keys named in errors.
        name: the model's name (``student.name``), for errors.
    """

    def __init__(self, model: nn.Module, layers: Sequence[int | str], side: str,
                 name: str, pairs: Sequence[int] | None = None) -> None:
        self.model, self.layers = model, list(layers)
        numbers = list(pairs) if pairs is not None else list(range(len(self.layers)))
        self.num_prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
        # timm's ViTs say whether their prefix starts with a class token (register-only
        # prefixes do not); NHWC models (Swin) give channels-last maps from their modules.
        self.class_token = bool(getattr(model, "has_class_token", self.num_prefix > 0))
        self.channels_last = getattr(model, "output_fmt", "NCHW") == "NHWC"
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        self.grid_size = tuple(grid) if grid is not None else None
        self.blocks: dict[int, int] = {}  # pair → block index
        self.paths: dict[int, str] = {}  # pair → module path
        count = block_count(model)
        modules = dict(model.named_modules())
        for i, layer in enumerate(self.layers):
            key = pair_key(numbers[i], side)
            if isinstance(layer, int):
                if count is None:
                    raise ConfigError(f"{key}: {side} {name} has no forward_intermediates, so "
                                      f"its layers have no block index: name a module path "
                                      f"instead (e.g. {next(iter(_paths(model)), 'a module')})")
                if not -count <= layer < count:
                    raise ConfigError(f"{key}: {layer} is not a block of {side} {name} (it has "
                                      f"{count}: 0 to {count - 1}, or -{count} to -1)")
                self.blocks[i] = layer % count
            else:
                if layer not in modules or not layer:
                    near = difflib.get_close_matches(layer, list(_paths(model)), n=1)
                    hint = f" (did you mean '{near[0]}'?)" if near else ""
                    raise ConfigError(f"{key}: {side} {name} has no module '{layer}'{hint}")
                self.paths[i] = layer
        self._taken: dict[str, Any] = {}
        self._active = False
        for path in set(self.paths.values()):
            modules[path].register_forward_hook(self._hook(path))
        self._prefix_arg = "return_prefix_tokens" in inspect.signature(
            model.forward_intermediates).parameters if self.blocks else False

    def _hook(self, path: str) -> Any:
        def take(module: nn.Module, args: Any, output: Any) -> None:
            if self._active:
                self._taken[path] = output
        return take

    def __call__(self, x: torch.Tensor) -> WithFeatures:
        """The model's output and the tokens of each layer."""
        self._taken.clear()
        self._active = True
        try:
            if self.blocks:
                wanted = sorted(set(self.blocks.values()))
                kwargs: dict[str, Any] = {"indices": wanted, "output_fmt": "NCHW"}
                if self._prefix_arg:
                    kwargs["return_prefix_tokens"] = True
                final, intermediates = self.model.forward_intermediates(x, **kwargs)
                out = self.model.forward_head(final)
                by_block = dict(zip(wanted, intermediates, strict=True))
            else:
                out, by_block = self.model(x), {}
        finally:
            self._active = False
        tokens = []
        for i in range(len(self.layers)):
            if i in self.blocks:
                raw = by_block[self.blocks[i]]
            elif self.paths[i] in self._taken:
                raw = self._taken[self.paths[i]]
            else:
                raise ValueError(f"{self.paths[i]} did not run in the forward pass")
            tokens.append(as_tokens(raw, self.num_prefix, self.grid_size, self.class_token,
                                    self.channels_last and i in self.paths))
        self._taken.clear()
        return WithFeatures(out, tokens)


def _paths(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


# ------------------------------------------------------------------------------ projectors
def build_projector(kind: str, width: int, teacher_width: int, key: str) -> nn.Module:
    """``distill.projector`` for one pair: student width → teacher width on the channels."""
    if kind == "none":
        if width != teacher_width:
            raise ConfigError(f"distill.projector=none but {key} maps {width} student channels "
                              f"onto {teacher_width} teacher channels: use linear or mlp")
        return nn.Identity()
    if kind == "linear":
        return nn.Linear(width, teacher_width)
    return nn.Sequential(nn.Linear(width, teacher_width), nn.GELU(),
                         nn.Linear(teacher_width, teacher_width))


def project(projector: nn.Module, tokens: Tokens) -> Tokens:
    """``projector`` on the channels of every token (a 1×1 convolution on a grid)."""
    grid = projector(tokens.grid.movedim(1, -1)).movedim(-1, 1)
    prefix = projector(tokens.prefix) if tokens.prefix is not None else None
    cls = prefix[:, :1] if tokens.cls is not None and prefix is not None else None
    return Tokens(grid, prefix, cls)


class FeatureStudent(nn.Module):
    """The student and the projectors of its feature pairs as one module, so that DDP, ZeRO and
    DeepSpeed synchronise and shard both. Its forward returns :class:`WithFeatures`, the
    features already projected to the teachers' widths."""

    def __init__(self, student: nn.Module, tap: LayerTap, projectors: nn.ModuleList) -> None:
        super().__init__()
        self.student, self.projectors = student, projectors
        self.tap = tap

    def no_weight_decay(self) -> set[str]:
        """The student's parameters without weight decay (timm's ``no_weight_decay``: position
        embeddings, class and register tokens), under this module's names."""
        names = getattr(self.student, "no_weight_decay", lambda: set())()
        return {f"student.{n}" for n in names}

    def forward(self, x: torch.Tensor) -> WithFeatures:
        out, tokens = self.tap(x)
        return WithFeatures(out, [project(p, t) for p, t in zip(self.projectors, tokens,
                                                                  strict=True)])


# ------------------------------------------------------------------------------ alignment
def _class_token(tokens: Tokens) -> torch.Tensor | None:
    return tokens.cls


def align(student: Tokens, teacher: Tokens, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair's ``(B, N, C)`` token sets to compare (see the module docstring)."""
    if mode == "pooled":
        return (student.grid.mean(dim=(2, 3))[:, None],
                teacher.grid.to(student.grid.dtype).mean(dim=(2, 3))[:, None])
    s_cls, t_cls = _class_token(student), _class_token(teacher)
    if mode == "prefix":
        assert s_cls is not None and t_cls is not None
        return s_cls, t_cls.to(s_cls.dtype)
    t_grid = teacher.grid.to(student.grid.dtype)
    if t_grid.shape[-2:] != student.grid.shape[-2:]:  # antialiased when shrinking
        t_grid = F.interpolate(t_grid, size=student.grid.shape[-2:], mode="bilinear",
                               align_corners=False,
                               antialias=student.grid.shape[-1] < t_grid.shape[-1])
    s, t = student.grid.flatten(2).transpose(1, 2), t_grid.flatten(2).transpose(1, 2)
    if mode == "all" and s_cls is not None and t_cls is not None:
        s, t = torch.cat([s_cls, s], dim=1), torch.cat([t_cls.to(s.dtype), t], dim=1)
    return s, t


def check_alignment(student: Tokens, teacher: Tokens, mode: str, key: str) -> None:
    """A pair that cannot align (``prefix`` without class tokens) is a config error."""
    if mode == "prefix":
        for side, tokens in (("student", student), ("teacher", teacher)):
            if _class_token(tokens) is None:
                raise ConfigError(f"{key}.tokens=prefix but the {side} layer has no prefix "
                                  f"(class) token: use patch, pooled or all")


def feature_loss(kind: str, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``cosine``, ``mse`` or ``smooth_l1`` between ``(B, N, C)`` token sets, in fp32."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).mean()
    if kind == "mse":
        return F.mse_loss(s, t)
    return F.smooth_l1_loss(s, t, beta=1.0)


# ------------------------------------------------------------------------------ building
class FeatureDistiller:
    """The feature pairs of a run: the taps on the student and on the teachers they name, the
    projectors, the loss terms.

    Built with one probe batch (the check before training), which gives each layer's width and
    grid, so that the projectors can be sized and an impossible pair fails before training.

    Args:
        pairs: ``distill.features``.
        projector: ``distill.projector``.
        student: the unwrapped student.
        teachers: the teachers' models (unwrapped timm models), by ``teacher_index``.
        probe_student: one normalised image batch for the student.
        probe_teachers: the same batch as each teacher takes it.
        names: the student's model name and each teacher's, for errors.
    """

    def __init__(self, pairs: Sequence[FeaturePairConfig], projector: str,
                 student: nn.Module, teachers: Sequence[nn.Module],
                 probe_student: torch.Tensor, probe_teachers: Sequence[torch.Tensor],
                 names: tuple[str, Sequence[str]]) -> None:
        self.pairs = list(pairs)
        self.student_tap = LayerTap(student, [p.student for p in pairs], "student", names[0])
        # Each teacher named by a pair gets one tap over its pairs' layers; slot (t, k) is the
        # k-th layer of teacher t's tap.
        self.teacher_taps: dict[int, LayerTap] = {}
        for t in sorted({p.teacher_index for p in pairs}):
            mine = [i for i, p in enumerate(pairs) if p.teacher_index == t]
            self.teacher_taps[t] = LayerTap(teachers[t], [pairs[i].teacher for i in mine],
                                            "teacher", names[1][t], pairs=mine)
        self.slots: list[tuple[int, int]] = []
        for pair in pairs:
            t = pair.teacher_index
            self.slots.append((t, sum(1 for q in self.slots if q[0] == t)))
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                s_tokens = self._probe(self.student_tap, probe_student, "student")
                by_teacher = {t: self._probe(tap, probe_teachers[t], "teacher")
                              for t, tap in self.teacher_taps.items()}
        finally:
            student.train(was_training)
        t_tokens = [by_teacher[t][k] for t, k in self.slots]
        projectors = []
        for i, (pair, s, t) in enumerate(zip(self.pairs, s_tokens, t_tokens, strict=True)):
            check_alignment(s, t, pair.tokens, pair_key(i))
            projectors.append(build_projector(projector, s.grid.shape[1], t.grid.shape[1],
                                              pair_key(i)))
        self.projectors = nn.ModuleList(projectors)

    def teacher_tokens(self, by_teacher: dict[int, list[Tokens]]) -> list[Tokens]:
        """Each pair's teacher tokens, in the order of the pairs, cloned out of inference mode
        (a loss may save them for backward: cosine does)."""
        out = []
        for t, k in self.slots:
            tokens = by_teacher[t][k]
            prefix = None if tokens.prefix is None else tokens.prefix.clone()
            cls = prefix[:, :1] if tokens.cls is not None and prefix is not None else None
            out.append(Tokens(tokens.grid.clone(), prefix, cls))
        return out

    @staticmethod
    def _probe(tap: LayerTap, x: torch.Tensor, side: str) -> list[Tokens]:
        dtype = next(tap.model.parameters()).dtype  # a teacher held in bf16 takes bf16
        try:
            return tap(x.to(dtype)).features
        except ValueError as e:
            raise ConfigError(f"distill.features: a {side} layer's output {e}; name a block "
                              f"index or a module whose output is a token grid") from None

    @property
    def names(self) -> list[str]:
        """The loss terms' names, as logged: ``loss_feat_0``, ``loss_feat_1``, ..."""
        return [f"loss_feat_{i}" for i in range(len(self.pairs))]

    def student_module(self, student: nn.Module) -> FeatureStudent:
        return FeatureStudent(student, self.student_tap, self.projectors)

    def terms(self, student: list[Tokens], teacher: list[Tokens]) -> dict[str, torch.Tensor]:
        """Each pair's loss, by name (unweighted)."""
        out = {}
        for name, pair, s, t in zip(self.names, self.pairs, student, teacher, strict=True):
            with annotate(name):  # a profiler range per term (kd profile)
                s_set, t_set = align(s, t, pair.tokens)
                out[name] = feature_loss(pair.loss, s_set, t_set)
        return out

    def weighted_sum(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(p.weight * terms[n] for p, n in zip(self.pairs, self.names, strict=True))
