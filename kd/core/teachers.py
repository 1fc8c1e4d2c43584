"""The frozen teachers of a run: one (``teacher``), or several (``teachers``) mixed by weight.

Each teacher keeps its own input normalisation, image size (``image_size``) and weight dtype
(``dtype``). Logit losses distil the mixture of the teachers' probabilities at the distillation
temperature T, over the teachers that have a classifier (headless ones teach through feature
pairs only), with weights ``w_i`` normalised over them::

    p = Σ_i w_i · softmax(t_i / T) / Σ_i w_i        mixture logits = T · log p

so that every logit loss, written for one teacher's logits, distils the mixture unchanged:
``softmax((T · log p) / T) = p`` for the soft and DKD terms, ``argmax p`` for the hard one. One
teacher's logits pass through as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from kd.config import KDConfig, TeacherConfig, teacher_key, teacher_sections
from kd.core.features import LayerTap, Tokens, WithFeatures
from kd.core.models import (
    FrozenTeacher,
    InputNorm,
    build_teacher,
    check_model_input,
    resize,
    teacher_dtype,
)
from kd.errors import ConfigError


def teacher_input(teacher: FrozenTeacher, images: torch.Tensor, image_size: int | None,
                  normalised: torch.Tensor | None = None) -> torch.Tensor:
    """A raw (augmented, mixed) batch normalised for the teacher and resized to its
    ``image_size``; ``normalised`` is the batch already normalised with the teacher's statistics
    (the student's, when they are the same), which saves normalising it again."""
    x = normalised if normalised is not None else teacher.norm(images)
    if image_size and image_size != x.shape[-1]:
        x = resize(x, image_size)
    return x


class TeacherSet(nn.Module):
    """One or several frozen teachers with their weights, image sizes and names.

    Args:
        teachers: the frozen teachers.
        weights: each teacher's weight in the logit mixture (default: equal).
        image_sizes: each teacher's ``image_size`` (None: the student's).
        names: each teacher's model name, for logs and summaries.
    """

    def __init__(self, teachers: Sequence[FrozenTeacher], weights: Sequence[float] | None = None,
                 image_sizes: Sequence[int | None] | None = None,
                 names: Sequence[str] | None = None) -> None:
        super().__init__()
        n = len(teachers)
        self.members = nn.ModuleList(teachers)
        self.weights = list(weights) if weights is not None else [1.0] * n
        self.image_sizes = list(image_sizes) if image_sizes is not None else [None] * n
        self.names = list(names) if names is not None else [f"teacher {i}" for i in range(n)]

    @classmethod
    def from_sections(cls, teachers: Sequence[FrozenTeacher],
                      sections: Sequence[TeacherConfig]) -> TeacherSet:
        """The teachers with the weights, image sizes and names of their config sections."""
        return cls(teachers, [getattr(s, "weight", 1.0) for s in sections],
                   [s.image_size for s in sections], [s.name for s in sections])

    def __len__(self) -> int:
        return len(self.members)

    def __iter__(self) -> Iterator[FrozenTeacher]:
        return iter(self.members)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> FrozenTeacher:
        return self.members[index]  # type: ignore[return-value]

    def train(self, mode: bool = True) -> TeacherSet:
        """Stays in eval mode whatever the caller asks (see :class:`FrozenTeacher`)."""
        return super().train(False)

    @property
    def predicts(self) -> bool:
        """Whether at least one teacher has a classifier (logits to distil and evaluate)."""
        return any(not t.headless for t in self)

    def shares_input(self, student_norm: InputNorm) -> list[bool]:
        """Which teachers are normalised like the student (compares the statistics: one host
        synchronisation, so ask once, when building)."""
        return [teacher.norm.same_as(student_norm) for teacher in self]

    def inputs(self, images: torch.Tensor, x_student: torch.Tensor | None = None,
               shared: Sequence[bool] | None = None) -> list[torch.Tensor]:
        """Each teacher's input for a raw batch; a teacher that ``shared`` marks (see
        :meth:`shares_input`) reuses the student's normalised ``x_student``."""
        shared = shared if shared is not None and x_student is not None else [False] * len(self)
        return [teacher_input(teacher, images, size, x_student if share else None)
                for teacher, size, share in zip(self, self.image_sizes, shared, strict=True)]

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor | None]:
        """Each teacher's logits (None for a headless one, which still runs: it teaches feature
        pairs), without autograd."""
        out = [t(x) for t, x in zip(self, inputs, strict=True)]
        return [None if t.headless else o for t, o in zip(self, out, strict=True)]

    def with_features(self, inputs: Sequence[torch.Tensor], taps: dict[int, LayerTap],
                      logits_needed: bool = True
                      ) -> tuple[list[torch.Tensor | None], dict[int, list[Tokens]]]:
        """Each teacher's logits, and the tokens of the teachers with feature layers (by
        teacher index), from one forward each; without ``logits_needed`` (no logit loss), a
        teacher no feature pair reads does not run."""
        logits: list[torch.Tensor | None] = []
        tokens: dict[int, list[Tokens]] = {}
        for i, (teacher, x) in enumerate(zip(self, inputs, strict=True)):
            if i in taps:
                out: WithFeatures = teacher.with_features(x, taps[i])
                logits.append(out.out)
                tokens[i] = out.features
            else:
                run = logits_needed and not teacher.headless
                logits.append(teacher(x) if run else None)
        return logits, tokens

    def mix(self, logits: Sequence[torch.Tensor | None], temperature: float
            ) -> torch.Tensor | None:
        """The mixture logits (see the module docstring); None without a teacher that has a
        classifier; one teacher's logits unchanged."""
        heads = [(w, t) for w, t in zip(self.weights, logits, strict=True) if t is not None]
        if not heads:
            return None
        if len(heads) == 1:
            return heads[0][1]
        total = sum(w for w, _ in heads)
        p = sum((w / total) * torch.softmax(t.float() / temperature, dim=-1) for w, t in heads)
        return temperature * p.clamp_min(torch.finfo(torch.float32).tiny).log()


def build_teachers(cfg: KDConfig) -> TeacherSet | None:
    """The run's frozen teachers (``teachers``, or the one ``teacher``) on the CPU, in fp32;
    None for one ``teacher`` without weights (labels-only training)."""
    sections = teacher_sections(cfg)
    built = [build_teacher(section, cfg.data.num_classes) for section in sections]
    for i, teacher in enumerate(built):
        if teacher is None and cfg.teachers:
            raise ConfigError(f"teachers[{i}]: set its checkpoint or pretrained=true (a teacher "
                              f"without weights would be random)")
    if built[0] is None:
        return None
    return TeacherSet.from_sections([t for t in built if t is not None], sections)


def check_teacher_inputs(cfg: KDConfig, teachers: TeacherSet, image: torch.Tensor) -> None:
    """Each teacher takes the data (:func:`~kd.core.models.check_model_input`), or a
    :class:`~kd.errors.ConfigError` naming its config section."""
    for i, (teacher, section) in enumerate(zip(teachers, teacher_sections(cfg), strict=True)):
        check_model_input(teacher.model, teacher.norm, image, section=teacher_key(cfg, i),
                          name=section.name, image_size=cfg.data.image_size,
                          teacher_image_size=section.image_size,
                          grey_to_rgb=cfg.data.grey_to_rgb)


def hold_as_trained(cfg: KDConfig, teachers: TeacherSet, precision: str) -> list[str]:
    """Each teacher's weights in the dtype training holds them in (its ``dtype``: bf16 or fp16
    under that autocast with ``auto``); returns a line per teacher cast, for the log."""
    cast = []
    for i, (teacher, section) in enumerate(zip(teachers, teacher_sections(cfg), strict=True)):
        dtype = teacher_dtype(section.dtype, precision)
        if dtype != torch.float32:
            teacher.cast(dtype)
            key = teacher_key(cfg, i)
            cast.append(f"{key} weights held in {str(dtype).removeprefix('torch.')} "
                        f"({key}.dtype={section.dtype})")
    return cast
