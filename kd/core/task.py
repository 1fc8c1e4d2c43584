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
distillation term before weighting. All three are logged. With several teachers, ``teacher`` is
their mixture (:mod:`kd.core.teachers`). Feature pairs (``distill.features``,
:mod:`kd.core.features`) add ``Σ weight_i · loss_feat_i`` to ``loss``, each term logged too.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kd.config import DistillConfig
from kd.core.features import FeatureDistiller, WithFeatures
from kd.core.losses import dkd, hard_kd, soft_kd, soft_target_cross_entropy
from kd.core.models import FrozenTeacher, InputNorm, is_distilled_vit
from kd.core.teachers import TeacherSet
from kd.errors import ConfigError


class DistillationTask:
    """Owns forward passes and loss terms for a student and its teacher(s).

    Args:
        student: the trainable model (possibly wrapped for data parallelism).
        student_norm: the student's input normalisation.
        teacher: the frozen teacher, or the teachers (:class:`~kd.core.teachers.TeacherSet`),
            or None (only with ``distill.loss=none`` and no feature pairs).
        cfg: the ``distill`` section of the config.
        label_smoothing: smoothing of the task term.
        student_core: the unwrapped student (for DeiT checks); defaults to ``student``.
        teacher_image_size: the side a single ``teacher`` sees, when it is not the student's.
        cached_teacher: the teacher's logits come from a cache (:mod:`kd.core.teacher_cache`):
            ``teacher`` is None and the caller passes the cached logits to :meth:`loss`.
        features: the feature pairs (``distill.features``); ``student`` is then the
            :class:`~kd.core.features.FeatureStudent` (possibly wrapped), whose forward returns
            :class:`~kd.core.features.WithFeatures`.
    """

    def __init__(self, student: nn.Module, student_norm: InputNorm,
                 teacher: FrozenTeacher | TeacherSet | None, cfg: DistillConfig,
                 label_smoothing: float = 0.0, student_core: nn.Module | None = None,
                 teacher_image_size: int | None = None, cached_teacher: bool = False,
                 features: FeatureDistiller | None = None) -> None:
        if isinstance(teacher, FrozenTeacher):
            teacher = TeacherSet([teacher], image_sizes=[teacher_image_size])
        self.student, self.student_norm, self.teachers = student, student_norm, teacher
        self.features = features
        # Which teachers take the student's normalised batch as it is (decided once: comparing
        # the statistics synchronises with the device).
        self.shared = teacher.shares_input(student_norm) if teacher is not None else []
        if features is not None and teacher is None:
            raise ConfigError("distill.features needs a teacher: set teacher.checkpoint or "
                              "teacher.pretrained=true")
        self.cfg, self.label_smoothing = cfg, label_smoothing
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

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The first teacher (the only one in most runs), for tools that look at one."""
        return self.teachers[0] if self.teachers is not None else None

    @property
    def share_input(self) -> bool:
        """Whether the (first) teacher takes the student's normalised batch as it is."""
        return bool(self.shared and self.shared[0])

    @property
    def uses_teacher(self) -> bool:
        """Whether training runs the teacher (not for labels-only training)."""
        return self.cfg.loss != "none" or self.features is not None

    @property
    def teacher_predicts(self) -> bool:
        """Whether a teacher has a classifier to evaluate (not only headless ones)."""
        return self.teachers is not None and self.teachers.predicts

    @property
    def term_names(self) -> list[str]:
        """The extra loss terms :meth:`loss` returns: one per feature pair."""
        return self.features.names if self.features is not None else []

    def prepare(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Normalise a raw batch for the student and for each teacher (a teacher normalised
        like the student reuses the student's input).

        All get the same (augmented, mixed) images; a teacher with its own ``image_size`` gets
        that crop resized on the device.
        """
        x_student = self.student_norm(images)
        if not self.uses_teacher or self.teachers is None:  # labels only, or a teacher cache
            return x_student, None
        return x_student, self.teachers.inputs(images, x_student, self.shared)

    def teacher_forward(self, x_teachers: list[torch.Tensor] | None) -> Any:
        """The teachers' (mixture) logits without autograd (None when training on labels
        only); with feature pairs, :class:`~kd.core.features.WithFeatures` (the logits, None
        without a teacher that has a head, and each pair's teacher tokens)."""
        if x_teachers is None or self.teachers is None:
            return None
        temperature = self.cfg.temperature
        if self.features is None:
            return self.teachers.mix(self.teachers(x_teachers), temperature)
        logits, tokens = self.teachers.with_features(x_teachers, self.features.teacher_taps,
                                                     logits_needed=self.cfg.loss != "none")
        return WithFeatures(self.teachers.mix(logits, temperature),
                            self.features.teacher_tokens(tokens))

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
        """Evaluation logits of the student (DeiT heads averaged) and the teachers' mixture."""
        s, teachers = self.predict_all(images)
        return s, self.mix(teachers)

    @torch.no_grad()
    def predict_all(self, images: torch.Tensor, student: bool = True
                    ) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        """Evaluation logits of the student (None with ``student=False``) and of each teacher
        (None for a headless one; an empty list without teachers)."""
        x_student = self.student_norm(images)
        s = None
        if student:
            s = self.student_core(x_student)
            if isinstance(s, tuple):  # a distilled model in train mode; eval mode averages
                s = (s[0] + s[1]) / 2
        if self.teachers is None:
            return s, []
        return s, self.teachers(self.teachers.inputs(images, x_student, self.shared))

    @torch.no_grad()
    def predict_teacher(self, images: torch.Tensor) -> torch.Tensor | None:
        """Evaluation logits of the teachers' mixture alone (None without a head)."""
        return self.mix(self.predict_all(images, student=False)[1])

    def mix(self, logits: list[torch.Tensor | None]) -> torch.Tensor | None:
        """The teachers' mixture logits at ``distill.temperature`` (:meth:`TeacherSet.mix`)."""
        return self.teachers.mix(logits, self.cfg.temperature) if self.teachers else None
