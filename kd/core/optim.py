"""Optimizer and learning-rate schedule, through timm's factories."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from kd.config import OptimConfig, SchedConfig
from kd.core.features import FeatureStudent
from kd.errors import ConfigError


def build_optimizer(model: nn.Module, cfg: OptimConfig, world_size: int = 1) -> Optimizer:
    """``timm.optim.create_optimizer_v2`` with the ``optim`` section, sharded when asked.

    Weight decay skips biases and normalisation parameters (timm's ``filter_bias_and_bn``).
    With ``cfg.zero`` and several ranks, the same optimizer class and parameter groups are
    wrapped in :class:`~torch.distributed.optim.ZeroRedundancyOptimizer`, so each rank keeps
    the state of only its share of the parameters.
    """
    from timm.optim import create_optimizer_v2

    kwargs = dict(cfg.kwargs)

    def params() -> nn.Module | list[dict[str, Any]]:
        # Fresh groups for each optimizer built: torch writes its defaults into them.
        return model if cfg.layer_decay is None else layer_decay_groups(model, cfg)

    try:
        optimizer = create_optimizer_v2(params(), opt=cfg.name, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, **kwargs)
    except (AssertionError, ValueError, TypeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"optim.name/optim.kwargs: timm cannot build optimizer "
                          f"'{cfg.name}': {msg}") from None
    if _can_fuse(optimizer, kwargs):
        # PyTorch's fused kernels (Adam, AdamW, SGD, ...): one kernel for all parameters (3.7x
        # faster than foreach for ViT-Ti's AdamW step on 2 CPU cores), and a step that takes
        # a found_inf tensor, so skipping a non-finite step needs no host synchronisation.
        optimizer = create_optimizer_v2(params(), opt=cfg.name, lr=cfg.lr,
                                        weight_decay=cfg.weight_decay, fused=True, **kwargs)
    if not (cfg.zero and world_size > 1):
        return optimizer
    from torch.distributed.optim import ZeroRedundancyOptimizer

    groups = [dict(g) for g in optimizer.param_groups]
    # `defaults` can hold keys the constructor does not take (AdamW's decoupled_weight_decay).
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(optimizer), **defaults)


def layer_decay_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Parameter groups with layer-wise learning-rate decay (``optim.layer_decay`` = d): timm's
    ``param_groups_layer_decay`` gives the layer at depth k of L the scale d^(L - k) (``lr_scale``,
    which timm's schedulers multiply in), weight decay as ``build_optimizer``'s. The projectors of
    feature pairs (:class:`~kd.core.features.FeatureStudent`) train at the full rate, like the
    head."""
    from timm.optim import param_groups_layer_decay

    student = model.student if isinstance(model, FeatureStudent) else model
    if not hasattr(student, "group_matcher"):
        raise ConfigError(f"optim.layer_decay={cfg.layer_decay}: timm cannot group the layers of "
                          f"{type(student).__name__} (it has no group_matcher); set "
                          f"optim.layer_decay=null")
    no_decay = student.no_weight_decay() if hasattr(student, "no_weight_decay") else ()
    groups = param_groups_layer_decay(student, cfg.weight_decay, no_weight_decay_list=no_decay,
                                      layer_decay=cfg.layer_decay)
    if isinstance(model, FeatureStudent):
        params = [p for p in model.projectors.parameters() if p.requires_grad]
        groups += [{"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.weight_decay,
                    "lr_scale": 1.0},
                   {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0,
                    "lr_scale": 1.0}]
    return [g for g in groups if g["params"]]


def _can_fuse(optimizer: Optimizer, kwargs: dict[str, Any]) -> bool:
    """A PyTorch optimizer with a fused implementation for these parameters, not told otherwise."""
    if "fused" in kwargs or "foreach" in kwargs or not type(optimizer).__module__.startswith(
            "torch.optim"):
        return False
    if "fused" not in inspect.signature(type(optimizer).__init__).parameters:
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # a private helper: without it, stay with the default implementation
        return False
    supported = _get_fused_kernels_supported_devices()
    return all(p.device.type in supported and p.dtype.is_floating_point
               for g in optimizer.param_groups for p in g["params"])


def optimizer_state_dict(optimizer: Optimizer) -> dict[str, Any] | None:
    """The full optimizer state on rank 0 (None elsewhere); every rank must call it.

    A sharded optimizer is consolidated first. The result has the layout of the unsharded
    optimizer's state dict, so it loads at any world size, with or without sharding.
    """
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
        return optimizer.state_dict() if dist.get_rank() == 0 else None
    return optimizer.state_dict()


def load_optimizer_state(optimizer: Optimizer, state: dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, with each ``step`` where the optimizer steps it.

    ``ZeroRedundancyOptimizer.load_state_dict`` moves every 0-dim state tensor to the CPU
    ("Force zero-dimensional tensors (like Adam "step") on CPU", torch/distributed/optim/
    zero_redundancy_optimizer.py), but fused and capturable optimizers keep ``step`` on the
    parameter's device (``Optimizer._process_value_according_to_param_policy``): on CUDA the
    first fused AdamW step after a resume fails with "Expected all tensors to be on the same
    device ... state_steps" (pytorch/pytorch#124133). Puts them back.
    """
    optimizer.load_state_dict(state)
    place_step_tensors(getattr(optimizer, "optim", optimizer))  # ZeRO's local optimizer


def place_step_tensors(optimizer: Optimizer) -> int:
    """Move ``step`` of fused or capturable parameter groups to their parameter's device (as
    float32, as torch keeps it there); returns how many moved."""
    moved = 0
    for group in optimizer.param_groups:
        if not (group.get("fused") or group.get("capturable")):
            continue
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step) and step.device != p.device:
                optimizer.state[p]["step"] = step.to(device=p.device, dtype=torch.float32)
                moved += 1
    return moved


def build_scheduler(optimizer: Optimizer, cfg: SchedConfig, total_steps: int,
                    steps_per_epoch: int) -> Any | None:
    """A per-step schedule spanning ``total_steps``, or None for a constant learning rate.

    timm's factory counts in "epochs"; kd passes optimizer steps as its epochs (one update
    each), so warm-up and decay are exact even when ``train.max_steps`` cuts an epoch.
    Call ``scheduler.step_update(step)`` with the number of optimizer steps done.
    """
    if cfg.name == "none":  # constant: each group at its layer-decay scale, once
        for group in optimizer.param_groups:
            group["lr"] = group["lr"] * group.get("lr_scale", 1.0)
        return None
    from timm.scheduler import create_scheduler_v2

    warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    # warmup_prefix: warm up to the peak, then decay over the remaining steps.
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.name, num_epochs=total_steps - warmup_steps,
        warmup_epochs=warmup_steps, warmup_prefix=True, warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr, step_on_epochs=False, updates_per_epoch=1)
    return scheduler
