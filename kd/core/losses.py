"""Distillation and task losses.

Every function in this module is a *pure* function of its tensor arguments and returns a
0-dim (scalar) ``torch.float32`` tensor, whatever the input dtype:

* inputs are upcast with ``.float()`` and all math runs with autocast **disabled**, so the
  result is fp32 even when called inside a ``torch.autocast(...)`` region with bf16/fp16
  activations;
* reductions and masking are done with tensor ops only: there are no host synchronisations
  (no ``.item()``, ``.cpu()`` or Python branching on tensor values), so the losses can be
  used inside CUDA graphs / ``torch.compile`` without graph breaks on data;
* every loss accepts an optional per-sample ``weight`` of shape ``(B,)`` with the same
  semantics (see :func:`_weighted_mean`): a weight of all ones gives exactly the unweighted
  loss and a weight of all zeros gives ``0`` (never ``NaN``).

Logits are expected with shape ``(B, C)`` (batch, classes). Teacher logits are used as
given: nothing is detached here, so produce them under ``torch.no_grad()`` (or pass
``teacher_logits.detach()``) if no gradient must reach the teacher.

Functions:
    soft_kd: Hinton et al. (2015) temperature-scaled KL distillation.
    hard_kd: DeiT (Touvron et al., 2021) hard-label distillation.
    dkd: Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).
    soft_target_cross_entropy: the task loss, for index or Mixup/CutMix soft targets.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dkd", "hard_kd", "soft_kd", "soft_target_cross_entropy"]


# ----------------------------------------------------------------------------------------
# private helpers
# ----------------------------------------------------------------------------------------


def _fp32_region(x: Tensor) -> contextlib.AbstractContextManager:
    """Context manager that disables autocast on ``x``'s device type.

    Inside it, ops on fp32 tensors stay fp32 even if the caller is inside an
    ``torch.autocast`` region (which would otherwise downcast e.g. matmuls, or on some
    backends keep ops in the autocast dtype).
    """
    device_type = x.device.type
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # pragma: no cover - device type without autocast support
        return contextlib.nullcontext()


def _check_logits(student_logits: Tensor, teacher_logits: Tensor | None = None) -> None:
    """Validate logits shapes (shape checks are host-side metadata, not syncs)."""
    if student_logits.dim() != 2:
        raise ValueError(
            f"expected logits of shape (B, C), got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            "student and teacher logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _xlogy_diff(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Elementwise KL integrand ``p * (log p - log q)`` with the convention ``0 * ... = 0``.

    Computed in log space from ``log_p`` (target / teacher) and ``log_q`` (student).
    Entries where ``p == 0`` (including ``log_p == -inf``, e.g. masked classes) contribute
    exactly ``0`` instead of ``0 * (-inf - -inf) = NaN``.
    """
    p = log_p.exp()
    # Mask the log-ratio (not the product) so that no NaN appears in either the forward
    # value or any backward path (0 * (-inf) never happens).
    log_ratio = torch.where(p > 0, log_p - log_q, torch.zeros_like(p))
    return p * log_ratio


def _weighted_mean(per_sample: Tensor, weight: Tensor | None) -> Tensor:
    """Reduce a per-sample loss of shape ``(B,)`` to a scalar, optionally weighted.

    Without ``weight`` this is ``per_sample.mean()``. With a weight ``w`` of shape ``(B,)``
    it is::

        mean_i(w_i * l_i) / mean_i(w_i)  ==  sum_i(w_i * l_i) / sum_i(w_i)

    so a weight of all ones gives exactly the unweighted mean, and a scaled weight
    ``c * w`` (``c > 0``) gives the same value as ``w``. When every weight is zero the
    result is ``0`` (not ``NaN``), and samples with zero weight never contribute, even if
    their loss is ``inf``/``NaN``. Weights are expected to be non-negative.

    Args:
        per_sample: Per-sample losses, shape ``(B,)``, fp32.
        weight: Optional per-sample weights, shape ``(B,)``, any float dtype.

    Returns:
        Scalar fp32 tensor.
    """
    if weight is None:
        return per_sample.mean()
    if weight.shape != per_sample.shape:
        raise ValueError(
            f"weight must have shape {tuple(per_sample.shape)}, got {tuple(weight.shape)}"
        )
    w = weight.to(device=per_sample.device, dtype=torch.float32)
    # Mask the losses of zero-weight samples so that a non-finite loss there adds 0
    # (plain w * l would give 0 * inf = NaN).
    masked = torch.where(w != 0, per_sample, torch.zeros_like(per_sample))
    num = (w * masked).sum()
    den = w.sum()
    # When all weights are 0 the result is exactly 0; tensor-side select, no Python
    # branch on tensor values (no host sync).
    safe_den = torch.where(den != 0, den, torch.ones_like(den))
    return torch.where(den != 0, num / safe_den, torch.zeros_like(num))


def _target_indices(targets: Tensor, num_classes: int, batch: int) -> Tensor:
    """Return int64 class indices ``(B,)`` from index targets or soft ``(B, C)`` targets."""
    if targets.dim() == 1:
        if targets.is_floating_point() or targets.is_complex():
            raise ValueError("1-D targets must be integer class indices")
        if targets.shape[0] != batch:
            raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
        return targets.long()
    if targets.dim() == 2:
        if targets.shape != (batch, num_classes):
            raise ValueError(
                f"soft targets must have shape ({batch}, {num_classes}), got {tuple(targets.shape)}"
            )
        return targets.argmax(dim=-1)
    raise ValueError(f"targets must be (B,) indices or (B, C) probabilities, got {targets.dim()}-D")


# ----------------------------------------------------------------------------------------
# public losses
# ----------------------------------------------------------------------------------------


def soft_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Soft-label knowledge distillation (Hinton et al., 2015).

    "Distilling the Knowledge in a Neural Network", Hinton, Vinyals & Dean, 2015:

    .. math::

        \mathcal{L} = T^2 \cdot \frac{1}{B} \sum_i
            \mathrm{KL}\big(\mathrm{softmax}(t_i / T) \,\|\, \mathrm{softmax}(s_i / T)\big)

    i.e. the KL divergence is **summed over classes and averaged over the batch**
    (``F.kl_div(..., reduction="batchmean")``). The :math:`T^2` factor keeps the gradient
    magnitude w.r.t. the student logits roughly independent of :math:`T` (the soft-target
    gradients scale as :math:`1/T^2`).

    Difference from DeiT / timm's soft distillation:
        DeiT (``DistillationLoss`` with ``distillation_type='soft'``) computes
        ``F.kl_div(log_softmax(s/T), log_softmax(t/T), reduction='sum', log_target=True)
        * T * T / s.numel()``, i.e. it divides by ``B * C`` instead of ``B``. Its value is
        therefore exactly ``C`` (number of classes) times *smaller* than this one:
        ``soft_kd(s, t, T) == C * deit_soft(s, t, T)``. Consequently a distillation weight
        ``alpha`` tuned for DeiT is not interchangeable with the same number here (for
        ImageNet-1k, DeiT's ``alpha`` corresponds to ``alpha / 1000`` in this convention).

    Args:
        student_logits: Student logits, shape ``(B, C)``, any float dtype.
        teacher_logits: Teacher logits (un-normalised, *not* probabilities), shape
            ``(B, C)``. Not detached here.
        temperature: Softmax temperature ``T > 0`` applied to both distributions.
        weight: Optional non-negative per-sample weights, shape ``(B,)``. The loss is then
            ``mean(w_i * kl_i) / mean(w_i) * T^2``; all ones equals the unweighted loss,
            all zeros gives ``0``.

    Returns:
        Scalar fp32 tensor.

    Example:
        >>> import torch
        >>> from kd.core.losses import soft_kd
        >>> s = torch.tensor([[2.0, 0.5, -1.0]])
        >>> t = torch.tensor([[1.0, 1.0, 0.0]])
        >>> loss = soft_kd(s, t, temperature=2.0)
        >>> loss.shape, loss.dtype
        (torch.Size([]), torch.float32)
        >>> soft_kd(s, s)
        tensor(0.)
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    with _fp32_region(student_logits):
        log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        # KL(p_t || p_s) per sample, summed over classes.
        kl = _xlogy_diff(log_p_t, log_p_s).sum(dim=-1)
        return _weighted_mean(kl, weight) * (temperature * temperature)


def hard_kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Hard-label distillation (DeiT, Touvron et al., 2021).

    "Training data-efficient image transformers & distillation through attention",
    Touvron et al., ICML 2021, Eq. for :math:`\mathcal{L}^{\text{hardDistill}}`: the
    cross-entropy of the student against the teacher's top-1 prediction,

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_i \mathrm{CE}\big(s_i, \arg\max_c t_{i,c}\big).

    Note that this is **not** zero when ``student_logits == teacher_logits``: it is then the
    cross-entropy of the student against its own argmax (``-log max_c softmax(s_i)_c``).
    Ties in the teacher's argmax resolve to the first maximal index (``torch.argmax``).

    Args:
        student_logits: Student logits, shape ``(B, C)``, any float dtype.
        teacher_logits: Teacher logits (or probabilities: only the argmax is used), shape
            ``(B, C)``. Receives no gradient (argmax is not differentiable).
        weight: Optional non-negative per-sample weights, shape ``(B,)``; the loss is
            ``mean(w_i * ce_i) / mean(w_i)``, ``0`` when all weights are zero.

    Returns:
        Scalar fp32 tensor.

    Example:
        >>> import torch
        >>> from kd.core.losses import hard_kd
        >>> s = torch.tensor([[0.0, 0.0]])
        >>> t = torch.tensor([[3.0, -1.0]])
        >>> torch.allclose(hard_kd(s, t), torch.log(torch.tensor(2.0)))
        True
    """
    _check_logits(student_logits, teacher_logits)
    with _fp32_region(student_logits):
        pseudo_labels = teacher_logits.detach().float().argmax(dim=-1)
        log_p_s = F.log_softmax(student_logits.float(), dim=-1)
        ce = -log_p_s.gather(1, pseudo_labels.unsqueeze(1)).squeeze(1)
        return _weighted_mean(ce, weight)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    targets: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

    "Decoupled Knowledge Distillation", Zhao, Cui, Song, Qiu & Liang, CVPR 2022, Eq. (7):

    .. math::

        \mathcal{L}_{\text{DKD}} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD},

    both terms computed at temperature :math:`T`, multiplied by :math:`T^2` and averaged
    over the batch (as in the authors' reference implementation, ``mdistiller``):

    * **TCKD** (target-class KD): ``KL(b^T || b^S)`` between the binary distributions
      ``b = [p_target, 1 - p_target]`` of teacher and student.
    * **NCKD** (non-target-class KD): ``KL(p̂^T || p̂^S)`` between the teacher's and the
      student's distributions *renormalised over the non-target classes only*.

    Numerics: everything is in log space. ``log p_target`` is read from ``log_softmax`` and
    ``log(1 - p_target)`` is the ``logsumexp`` of the non-target log-probabilities, so the
    binary distribution never saturates to ``log(0)`` even when ``p_target`` rounds to 1.
    The non-target softmax masks the target logit with ``-inf`` (instead of the reference
    implementation's ``- 1000 * one_hot``, which is not a true mask for logits of
    magnitude ~1000) and zero-probability entries contribute exactly 0, so there are no
    ``NaN`` values for large logits. This deviates from ``mdistiller`` only where its
    ``-1000`` mask or ``log(softmax)`` were inexact. The warm-up factor used in the paper's
    training recipe is not part of this function; multiply the result by it if needed.

    Args:
        student_logits: Student logits, shape ``(B, C)`` with ``C >= 2``.
        teacher_logits: Teacher logits, shape ``(B, C)``. Not detached here.
        targets: Ground-truth labels, either int64 class indices of shape ``(B,)`` or
            soft targets of shape ``(B, C)`` (e.g. Mixup/CutMix probabilities). For soft
            targets the target class is ``targets.argmax(-1)`` (for a Mixup pair, the
            class with the larger mixing coefficient; ties go to the first index).
        alpha: Weight of TCKD.
        beta: Weight of NCKD (the paper uses 8.0 on ImageNet / most CIFAR pairs).
        temperature: Softmax temperature ``T > 0`` (the paper uses 4.0 on CIFAR, 1.0 on
            ImageNet).
        weight: Optional non-negative per-sample weights, shape ``(B,)``; each term is
            reduced as ``mean(w_i * l_i) / mean(w_i)``, ``0`` when all weights are zero.

    Returns:
        Scalar fp32 tensor.

    Example:
        >>> import torch
        >>> from kd.core.losses import dkd
        >>> s = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0]])
        >>> t = torch.tensor([[3.0, 0.0, -2.0], [0.5, 2.0, 0.1]])
        >>> y = torch.tensor([0, 1])
        >>> dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0).dtype
        torch.float32
        >>> dkd(s, s, y)
        tensor(0.)
    """
    _check_logits(student_logits, teacher_logits)
    _check_temperature(temperature)
    batch, num_classes = student_logits.shape
    if num_classes < 2:
        raise ValueError("dkd needs at least 2 classes")
    target_idx = _target_indices(targets, num_classes, batch).to(student_logits.device)

    with _fp32_region(student_logits):
        z_s = student_logits.float() / temperature
        z_t = teacher_logits.float() / temperature
        # Boolean (B, C) mask of the target class, built without one_hot (which may
        # validate indices with a host sync on some devices).
        classes = torch.arange(num_classes, device=z_s.device)
        gt_mask = classes.unsqueeze(0) == target_idx.unsqueeze(1)
        idx = target_idx.unsqueeze(1)

        def _binary_log_probs(z: Tensor) -> Tensor:
            # log [p_target, 1 - p_target], shape (B, 2), computed in log space.
            log_p = F.log_softmax(z, dim=-1)
            log_p_gt = log_p.gather(1, idx).squeeze(1)
            log_p_other = torch.logsumexp(log_p.masked_fill(gt_mask, float("-inf")), dim=-1)
            return torch.stack([log_p_gt, log_p_other], dim=-1)

        # TCKD: KL between binary target/non-target distributions (paper Eq. 7, first term).
        tckd = _xlogy_diff(_binary_log_probs(z_t), _binary_log_probs(z_s)).sum(dim=-1)

        # NCKD: KL between distributions over non-target classes (paper Eq. 7, second term).
        log_hat_s = F.log_softmax(z_s.masked_fill(gt_mask, float("-inf")), dim=-1)
        log_hat_t = F.log_softmax(z_t.masked_fill(gt_mask, float("-inf")), dim=-1)
        nckd = _xlogy_diff(log_hat_t, log_hat_s).sum(dim=-1)

        per_sample = alpha * tckd + beta * nckd
        return _weighted_mean(per_sample, weight) * (temperature * temperature)


def soft_target_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    label_smoothing: float = 0.0,
    weight: Tensor | None = None,
) -> Tensor:
    r"""Cross-entropy against index or soft (Mixup/CutMix) targets, in fp32.

    .. math::

        \mathcal{L} = \frac{1}{B} \sum_i \sum_c -q_{i,c} \log \mathrm{softmax}(z_i)_c

    where ``q`` is the one-hot (index targets) or given (soft targets) distribution, mixed
    with the uniform distribution when ``label_smoothing = ε > 0``:
    ``q ← (1 - ε) q + ε / C`` (Szegedy et al., 2016), matching ``F.cross_entropy``'s
    ``label_smoothing`` for both kinds of target.

    Note:
        timm's ``Mixup`` already folds label smoothing into the soft targets it returns.
        Pass ``label_smoothing=0.0`` with such targets, otherwise smoothing is applied
        twice.

    Args:
        logits: Logits, shape ``(B, C)``, any float dtype.
        targets: Either int64 class indices of shape ``(B,)`` (no ``ignore_index``), or
            float probabilities of shape ``(B, C)`` (rows summing to 1).
        label_smoothing: Smoothing ``ε`` in ``[0, 1]``.
        weight: Optional non-negative per-sample weights, shape ``(B,)``; the loss is
            ``mean(w_i * ce_i) / mean(w_i)``, ``0`` when all weights are zero.

    Returns:
        Scalar fp32 tensor.

    Example:
        >>> import torch
        >>> from kd.core.losses import soft_target_cross_entropy
        >>> z = torch.zeros(2, 4)
        >>> y = torch.tensor([1, 3])
        >>> torch.allclose(soft_target_cross_entropy(z, y), torch.log(torch.tensor(4.0)))
        True
        >>> q = torch.tensor([[0.7, 0.3, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
        >>> torch.allclose(soft_target_cross_entropy(z, q), torch.log(torch.tensor(4.0)))
        True
    """
    _check_logits(logits)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    batch, num_classes = logits.shape
    with _fp32_region(logits):
        log_p = F.log_softmax(logits.float(), dim=-1)
        if targets.dim() == 1:
            idx = _target_indices(targets, num_classes, batch).to(log_p.device)
            nll = -log_p.gather(1, idx.unsqueeze(1)).squeeze(1)
            if label_smoothing > 0.0:
                # (1 - ε) * CE(one_hot) + ε * CE(uniform), as in F.cross_entropy.
                smooth = -log_p.mean(dim=-1)
                ce = (1.0 - label_smoothing) * nll + label_smoothing * smooth
            else:
                ce = nll
        elif targets.dim() == 2:
            if targets.shape != logits.shape:
                raise ValueError(
                    f"soft targets must have shape {tuple(logits.shape)}, "
                    f"got {tuple(targets.shape)}"
                )
            q = targets.to(device=log_p.device, dtype=torch.float32)
            if label_smoothing > 0.0:
                q = (1.0 - label_smoothing) * q + label_smoothing / num_classes
            # Entries with q == 0 contribute 0 even where log_p == -inf.
            safe_log_p = torch.where(q != 0, log_p, torch.zeros_like(log_p))
            ce = -(q * safe_log_p).sum(dim=-1)
        else:
            raise ValueError(
                f"targets must be (B,) indices or (B, C) probabilities, got {targets.dim()}-D"
            )
        return _weighted_mean(ce, weight)
