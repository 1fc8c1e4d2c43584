"""The distillation task: how inputs reach both models and how the loss terms combine.

The trainer calls the steps one by one (so each can be timed and annotated):
:meth:`DistillationTask.prepare` → :meth:`teacher_forward` → :meth:`student_forward` →
:meth:`loss`.

How terms combine (``distill.alpha`` = a)::

    none   loss = loss_task                                   (teacher not run in training)
    soft   loss = (1 - a) * CE(student, y) + a * soft_kd(student, teacher, T)
    hard   loss = (1 - a) * CE(student, y) + a * hard_kd(student, teacher)
    dkd    loss = (1 - a) * CE(student, y) + a * w(epoch) * dkd(student, teacher, y)
           w ramps linearly from 0 to 1 over distill.dkd_warmup_epochs (Zhao et al. 2022, §4)
    token  loss = (1 - a) * CE(class head, y) + a * {hard_kd|soft_kd}(distillation head, teacher)
           (DeiT, Touvron et al. 2021; at evaluation both heads are averaged)

``loss_task`` is the cross-entropy with ``train.label_smoothing``; ``loss_kd`` is the
distillation term before weighting. All three are logged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd.config import DistillConfig
from kd.core.features import FeatureDistiller, Tokens, WithFeatures
from kd.core.losses import dkd, hard_kd, soft_kd, soft_target_cross_entropy
from kd.core.models import FrozenTeacher, InputNorm, is_distilled_vit, resize
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


class DistillationTask:
    """Owns forward passes and loss terms for one student/teacher pair.

    Args:
        student: the trainable model (possibly wrapped for data parallelism).
        student_norm: the student's input normalisation.
        teacher: the frozen teacher, or None (only with ``distill.loss=none``).
        cfg: the ``distill`` section of the config.
        label_smoothing: smoothing of the task term.
        student_core: the unwrapped student (for DeiT checks); defaults to ``student``.
        teacher_image_size: the side the teacher sees, when it is not the student's.
        cached_teacher: the teacher's logits come from a cache (:mod:`kd.core.teacher_cache`):
            ``teacher`` is None and the caller passes the cached logits to :meth:`loss`.
        features: the feature pairs (``distill.features``); ``student`` is then the
            :class:`~kd.core.features.FeatureStudent` (possibly wrapped), whose forward returns
            :class:`~kd.core.features.WithFeatures`.
    """

    def __init__(self, student: nn.Module, student_norm: InputNorm,
                 teacher: FrozenTeacher | None, cfg: DistillConfig, label_smoothing: float = 0.0,
                 student_core: nn.Module | None = None,
                 teacher_image_size: int | None = None, cached_teacher: bool = False,
                 features: FeatureDistiller | None = None) -> None:
        self.student, self.student_norm, self.teacher = student, student_norm, teacher
        self.features = features
        if features is not None and teacher is None:
            raise ConfigError("distill.features needs a teacher: set teacher.checkpoint or "
                              "teacher.pretrained=true")
        self.cfg, self.label_smoothing = cfg, label_smoothing
        self.teacher_image_size = teacher_image_size
        core = student_core if student_core is not None else student
        self.student_core = core
        if cfg.loss != "none" and teacher is None and not cached_teacher:
            raise ConfigError(f"distill.loss={cfg.loss} needs a teacher: set teacher.checkpoint "
                              f"or teacher.pretrained=true (or use distill.loss=none)")
        if cfg.loss == "token":
            if not is_distilled_vit(core):
                raise ConfigError("distill.loss=token needs a student with a distillation token "
                                  "(a deit_*_distilled_* model)")
            core.set_distilled_training(True)  # training forward returns (class, dist) logits
        elif is_distilled_vit(core):
            core.set_distilled_training(False)
        self.share_input = teacher is not None and teacher.norm.same_as(student_norm)

    @property
    def uses_teacher(self) -> bool:
        """Whether training runs the teacher (not for labels-only training)."""
        return self.cfg.loss != "none" or self.features is not None

    @property
    def teacher_predicts(self) -> bool:
        """Whether there is a teacher with a classifier to evaluate (not a headless one)."""
        return self.teacher is not None and not self.teacher.headless

    @property
    def term_names(self) -> list[str]:
        """The extra loss terms :meth:`loss` returns: one per feature pair."""
        return self.features.names if self.features is not None else []

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalise a raw batch for the student and, when its statistics differ, the teacher.

        Both get the same (augmented, mixed) images; a teacher with its own
        ``teacher.image_size`` gets that crop resized on the device.
        """
        x_student = self.student_norm(images)
        if not self.uses_teacher or self.teacher is None:  # labels only, or a teacher cache
            return x_student, None
        return x_student, self._teacher_input(images, x_student)

    def _teacher_input(self, images: torch.Tensor, x_student: torch.Tensor) -> torch.Tensor:
        assert self.teacher is not None
        return teacher_input(self.teacher, images, self.teacher_image_size,
                             x_student if self.share_input else None)

    def teacher_forward(self, x_teacher: torch.Tensor | None) -> Any:
        """Teacher logits without autograd (None when training on labels only); with feature
        pairs, :class:`~kd.core.features.WithFeatures` (logits, None when headless, and the
        teacher's tokens)."""
        if x_teacher is None or self.teacher is None:
            return None
        if self.features is None:
            return self.teacher(x_teacher)
        logits, tokens = self.teacher.with_features(x_teacher, self.features.teacher_tap)
        # Out of inference mode: a loss may save them for backward (cosine does).
        return WithFeatures(logits, [Tokens(t.grid.clone(), None if t.prefix is None
                                            else t.prefix.clone()) for t in tokens])

    def student_forward(self, x_student: torch.Tensor) -> Any:
        """Student logits, or ``(class_logits, dist_logits)`` for a DeiT student with token KD;
        with feature pairs, :class:`~kd.core.features.WithFeatures` holding them and the
        student's projected tokens."""
        return self.student(x_student)

    def loss(self, student_out: Any, teacher_logits: torch.Tensor | None,
             targets: torch.Tensor, epoch: float,
             share: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss terms: ``loss`` (to minimise), ``loss_task``, ``loss_kd``; all fp32.

        ``share`` (with a transfer set): each sample's labelled share in ``[0, 1]`` (0 for an
        unlabelled image). Per sample the loss is then ``share * ((1 - alpha) * task +
        alpha * kd) + (1 - share) * kd``, averaged over the batch; ``loss_task`` is the task
        term's mean over the labelled shares and ``loss_kd`` the kd term's weighted mean.
        """
        feature_terms: dict[str, torch.Tensor] = {}
        if self.features is not None:
            student_out, student_tokens = student_out
            teacher_logits, teacher_tokens = teacher_logits
            feature_terms = self.features.terms(student_tokens, teacher_tokens)
        terms = self._logit_loss(student_out, teacher_logits, targets, epoch, share)
        if feature_terms:
            assert self.features is not None
            terms["loss"] = terms["loss"] + self.features.weighted_sum(feature_terms)
            terms.update(feature_terms)
        return terms

    def _logit_loss(self, student_out: Any, teacher_logits: torch.Tensor | None,
                    targets: torch.Tensor, epoch: float,
                    share: torch.Tensor | None) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if isinstance(student_out, tuple):
            logits, kd_logits = student_out
        else:
            logits = kd_logits = student_out
        if share is not None:
            return self._transfer_loss(logits, kd_logits, teacher_logits, targets, share)
        loss_task = soft_target_cross_entropy(logits, targets, self.label_smoothing)
        if cfg.loss == "none" or teacher_logits is None:
            return {"loss": loss_task, "loss_task": loss_task,
                    "loss_kd": torch.zeros_like(loss_task)}
        weight = 1.0
        if cfg.loss == "soft" or (cfg.loss == "token" and cfg.token_loss == "soft"):
            loss_kd = soft_kd(kd_logits, teacher_logits, cfg.temperature)
        elif cfg.loss in ("hard", "token"):
            loss_kd = hard_kd(kd_logits, teacher_logits)
        else:  # dkd
            loss_kd = dkd(kd_logits, teacher_logits, targets, cfg.dkd_alpha, cfg.dkd_beta,
                          cfg.temperature)
            if cfg.dkd_warmup_epochs > 0:
                weight = min(epoch / cfg.dkd_warmup_epochs, 1.0)
        loss = (1.0 - cfg.alpha) * loss_task + cfg.alpha * weight * loss_kd
        return {"loss": loss, "loss_task": loss_task, "loss_kd": loss_kd}

    def _transfer_loss(self, logits: torch.Tensor, kd_logits: torch.Tensor,
                       teacher_logits: torch.Tensor | None, targets: torch.Tensor,
                       share: torch.Tensor) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        if cfg.loss == "none" and self.features is not None:  # unlabelled images: features only
            share = share.float()
            loss_task = soft_target_cross_entropy(logits, targets, self.label_smoothing, share)
            return {"loss": share.mean() * loss_task, "loss_task": loss_task,
                    "loss_kd": torch.zeros_like(loss_task)}
        if teacher_logits is None or cfg.loss not in ("soft", "hard", "token"):
            raise ConfigError(f"data.transfer_set needs distill.loss soft, hard or token "
                              f"(got {cfg.loss})")
        share = share.float()
        kd_weight = cfg.alpha * share + (1.0 - share)
        loss_task = soft_target_cross_entropy(logits, targets, self.label_smoothing, share)
        if cfg.loss == "soft" or (cfg.loss == "token" and cfg.token_loss == "soft"):
            loss_kd = soft_kd(kd_logits, teacher_logits, cfg.temperature, kd_weight)
        else:
            loss_kd = hard_kd(kd_logits, teacher_logits, kd_weight)
        # mean_i(share_i (1 - a) task_i) + mean_i(w_i kd_i), written with the weighted means.
        loss = (1.0 - cfg.alpha) * share.mean() * loss_task + kd_weight.mean() * loss_kd
        return {"loss": loss, "loss_task": loss_task, "loss_kd": loss_kd}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Evaluation logits of the student (DeiT heads averaged) and the teacher, if any."""
        x_student = self.student_norm(images)
        s = self.student_core(x_student)
        if isinstance(s, tuple):  # a distilled model in train mode; eval mode already averages
            s = (s[0] + s[1]) / 2
        return s, self.predict_teacher(images, x_student)

    @torch.no_grad()
    def predict_teacher(self, images: torch.Tensor,
                        x_student: torch.Tensor | None = None) -> torch.Tensor | None:
        """Evaluation logits of the teacher alone (None without one); ``x_student``, when the
        caller has it, saves normalising the batch twice."""
        if self.teacher is None or self.teacher.headless:
            return None
        if x_student is None:
            x_student = self.student_norm(images)
        return self.teacher(self._teacher_input(images, x_student))
