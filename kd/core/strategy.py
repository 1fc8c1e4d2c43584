"""How the student's gradients are synchronised and its optimizer stepped.

Two strategies with one interface, chosen by ``dist.strategy``:

- :class:`DDPStrategy` — PyTorch DistributedDataParallel (nothing in one process), optionally
  with ``ZeroRedundancyOptimizer`` (``optim.zero``), and a gradient scaler for fp16;
- :class:`DeepSpeedStrategy` — the DeepSpeed engine with ZeRO stage 1 or 2, its config generated
  from kd's; mixed precision stays kd's autocast, so both strategies compute the same numbers.

The teacher is never handed to either: it stays a frozen replica on every rank.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer

from kd.config import DistConfig
from kd.core.dist import DistInfo
from kd.core.optim import load_optimizer_state, optimizer_state_dict
from kd.errors import ConfigError


class Strategy(Protocol):
    """What the trainer asks of a strategy; :class:`DDPStrategy` and :class:`DeepSpeedStrategy`
    both provide it."""

    model: nn.Module  # the module to call forward on (wrapped: DDP, the DeepSpeed engine)
    optimizer: Any  # what the schedule drives (its param_groups) and checkpoints hold
    sharded_checkpoint: bool  # whether every rank writes part of a checkpoint

    def maybe_no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip gradient synchronisation on all but the last micro-batch of a step."""
        ...

    def backward(self, loss: torch.Tensor, accum_steps: int, last_micro_batch: bool) -> None:
        ...

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Clip, step and zero the gradients; ``(skipped, grad_norm)`` as device tensors."""
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        ...

    def save_sharded(self, directory: Path) -> None:
        ...


class DDPStrategy:
    """DDP (several ranks) or a plain module (one), with the optimizer and an fp16 scaler."""

    sharded_checkpoint = False

    def __init__(self, model: nn.Module, optimizer: Optimizer, info: DistInfo, precision: str,
                 grad_clip: float | None) -> None:
        self.core, self.optimizer, self.grad_clip = model, optimizer, grad_clip
        self.model: nn.Module = model
        if info.is_distributed:
            # Gradients as views into DDP's all-reduce buckets: no second gradient-sized copy
            # (ViT-B student, 2 ranks: peak RSS 2.41 -> 2.16 GiB per rank).
            self.model = DistributedDataParallel(
                model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                gradient_as_bucket_view=True)
        self.scaler = torch.amp.GradScaler(info.device.type, enabled=precision == "fp16")

    def maybe_no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient all-reduce on all but the last micro-batch of a step."""
        if last_micro_batch or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def backward(self, loss: torch.Tensor, accum_steps: int, last_micro_batch: bool) -> None:
        self.scaler.scale(loss / accum_steps).backward()

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unscale, clip, step and zero gradients; skip the update if anything is not finite.

        Returns ``(skipped, grad_norm)`` as device tensors. The skip costs no host
        synchronisation with an optimizer that takes a ``found_inf`` tensor (PyTorch's fused
        ones, kd's default where available) or in fp16 (the gradient scaler skips by itself);
        any other optimizer needs one ``.item()`` per step to decide. ``loss`` joins the
        decision in one process only: under DDP the gradients are all-reduced, hence the same
        on every rank, and deciding on them alone keeps the ranks' weights identical.
        """
        self.scaler.unscale_(self.optimizer)  # no-op unless fp16
        params = [p for p in self.core.parameters() if p.grad is not None]
        if self.grad_clip:
            norm = torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        else:
            norm = _total_norm([p.grad for p in params])
        skipped = ~torch.isfinite(norm)
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)  # skips on non-finite gradients, lowers the scale
            self.scaler.update()
        else:
            if loss is not None and not isinstance(self.model, DistributedDataParallel):
                skipped = skipped | ~torch.isfinite(loss)
            local = getattr(self.optimizer, "optim", self.optimizer)  # ZeRO's local optimizer
            if getattr(local, "_step_supports_amp_scaling", False):
                local.grad_scale, local.found_inf = None, skipped.float()
                try:
                    self.optimizer.step()
                finally:
                    del local.grad_scale, local.found_inf
            elif not skipped.item():  # the one host synchronisation, for other optimizers
                self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return skipped, norm.detach()

    def state_dict(self) -> dict[str, Any]:
        """Optimizer (consolidated on rank 0 when sharded) and scaler; every rank calls this."""
        return {"optimizer": optimizer_state_dict(self.optimizer),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        load_optimizer_state(self.optimizer, state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def save_sharded(self, directory: Path) -> None:
        """Nothing beyond ``state_dict`` for DDP."""


def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of ``grads`` (NaN or inf if any element is), on their device."""
    if not grads:
        return torch.zeros(())
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


# DeepSpeed's default reduce_bucket_size and allgather_bucket_size, in elements
# (deepspeed/runtime/zero/config.py: 5e8).
DEEPSPEED_DEFAULT_BUCKET = 500_000_000
# torch DDP's default bucket, 25 MiB (torch/nn/parallel/distributed.py, _DEFAULT_BUCKET_CAP_MB):
# the size PyTorch uses so that each collective moves enough bytes to run at full bandwidth.
DDP_BUCKET_BYTES = 25 * 1024**2


def deepspeed_bucket_size(trainable_params: int, world_size: int) -> int:
    """``reduce_bucket_size`` (and ``allgather_bucket_size``) for a student, in elements.

    The student's gradients divided by the world size (one rank's ZeRO partition), but at least
    DDP's 25 MiB of fp32 and at most the student's gradients or DeepSpeed's 5e8; rounded up to
    even, the NCCL alignment DeepSpeed asserts.

    Why: with ``contiguous_gradients`` ZeRO-1 and -2 allocate the reduce bucket whole, on the
    device and in the parameters' dtype (fp32 under kd's autocast), at the first gradient of a
    step (``setup_buckets`` in deepspeed/runtime/zero/stage_1_and_2.py; a second one with
    ``overlap_comm``, which kd leaves off). At the default that is 2 GB (1.86 GiB) per GPU even
    for a 5.7 M-parameter ViT-Ti. A bucket larger than the student's gradients is never filled;
    one of the gradients' size would still cancel what ZeRO-2 saves (each rank keeps only its
    partition of the gradients, P/N, but the bucket would hold P). Partition-sized, the bucket
    costs no more than the gradients ZeRO-2 keeps, and at ZeRO-1 (full gradients) it lowers the
    end-of-backward peak from 2P to P + P/N. The 25 MiB floor keeps each reduction of a large
    world out of the latency-bound regime; the reductions are at most N per step. The all-gather
    bucket allocates nothing (it cuts the all-gather of updated weights into views, and the
    all_gather_into_tensor path ignores it: ``all_gather_dp_groups`` in
    deepspeed/runtime/utils.py); it gets the same size so that no default-sized figure remains.
    """
    params = max(1, trainable_params)
    floor = DDP_BUCKET_BYTES // 4  # fp32 elements
    size = min(DEEPSPEED_DEFAULT_BUCKET, params, max(-(-params // max(1, world_size)), floor))
    return size + size % 2


def deepspeed_config(batch_size: int, accum_steps: int, world_size: int,
                     grad_clip: float | None, zero_stage: int, *,
                     trainable_params: int) -> dict[str, Any]:
    """The DeepSpeed config kd generates from its own.

    Mixed precision is not configured here: kd runs the forward passes under its own autocast
    (fp32 master weights and gradients, bf16 matmuls), exactly as with DDP. The ZeRO buckets are
    sized from the student (:func:`deepspeed_bucket_size`).
    """
    bucket = deepspeed_bucket_size(trainable_params, world_size)
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": accum_steps,
        "train_batch_size": batch_size * accum_steps * world_size,
        "gradient_clipping": float(grad_clip or 0.0),
        "zero_optimization": {"stage": zero_stage, "overlap_comm": False,
                              "contiguous_gradients": True, "reduce_bucket_size": bucket,
                              "allgather_bucket_size": bucket},
        "zero_allow_untested_optimizer": True,  # timm's optimizers are plain torch optimizers
        "steps_per_print": 2**31 - 1,  # kd logs
        "wall_clock_breakdown": False,
    }


class DeepSpeedStrategy:
    """The DeepSpeed engine (ZeRO 1 or 2) around the student and kd's optimizer.

    kd's learning-rate schedule keeps driving the optimizer's parameter groups, which DeepSpeed's
    ZeRO optimizer shares. Checkpoints hold DeepSpeed's own sharded files (written through its
    API by every rank) next to kd's files.
    """

    sharded_checkpoint = True
    TAG = "state"

    def __init__(self, model: nn.Module, optimizer: Optimizer, info: DistInfo, precision: str,
                 grad_clip: float | None, batch_size: int, accum_steps: int,
                 zero_stage: int) -> None:
        try:
            import deepspeed
        except ImportError:
            raise ConfigError('dist.strategy=deepspeed needs DeepSpeed: pip install -e '
                              '".[deepspeed]"') from None
        if precision == "fp16":
            raise ConfigError("dist.strategy=deepspeed supports train.precision bf16 or fp32 "
                              "(kd's autocast); use bf16")
        if not dist.is_initialized():  # DeepSpeed always wants a process group, even of one
            backend = "nccl" if info.device.type == "cuda" else "gloo"
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
        # DeepSpeed reads LOCAL_RANK from the environment and asserts it is set, which no
        # launcher does for a single `kd train` process.
        os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.config = deepspeed_config(batch_size, accum_steps, info.world_size, grad_clip,
                                       zero_stage, trainable_params=trainable)
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config, dist_init_required=False)
        self.core, self.model = model, self.engine

    def maybe_no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine defers reduction to the step boundary

    def backward(self, loss: torch.Tensor, accum_steps: int, last_micro_batch: bool) -> None:
        self.engine.backward(loss)  # divides by gradient_accumulation_steps itself
        if not last_micro_batch:
            self.engine.step()  # counts the micro-step; updates only at the boundary

    def step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The boundary: the engine reduces, clips, updates and zeroes gradients.

        DeepSpeed applies the update itself: a step with a non-finite loss is counted (and
        stops the run after ``train.max_skipped_steps``) but not skipped. The gradient norm
        is DeepSpeed's business; it is reported as NaN.
        """
        self.engine.step()
        device = loss.device if loss is not None else torch.device("cpu")
        bad = ~torch.isfinite(loss) if loss is not None else torch.zeros((), dtype=torch.bool)
        return bad, torch.full((), float("nan"), device=device)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": None, "scaler": None}  # held in DeepSpeed's sharded files

    def save_sharded(self, directory: Path) -> None:
        """Every rank writes its shard through DeepSpeed's API."""
        self.engine.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)

    def load_state_dict(self, state: dict[str, Any], checkpoint_dir: Path) -> None:
        path, _ = self.engine.load_checkpoint(
            str(checkpoint_dir / "deepspeed"), tag=self.TAG, load_optimizer_states=True,
            load_lr_scheduler_states=False, load_module_strict=True)
        if path is None:
            raise ConfigError(f"{checkpoint_dir} holds no DeepSpeed state; resume it with "
                              f"dist.strategy=ddp")


def build_strategy(model: nn.Module, optimizer: Optimizer, info: DistInfo, cfg: DistConfig,
                   precision: str, *, grad_clip: float | None, micro_batch: int,
                   grad_accum_steps: int) -> Strategy:
    """The strategy named by ``dist.strategy`` (``cfg``), for ``micro_batch`` images per
    process per micro-batch and ``grad_accum_steps`` micro-batches per optimizer step."""
    if cfg.strategy == "deepspeed":
        return DeepSpeedStrategy(model, optimizer, info, precision, grad_clip, micro_batch,
                                 grad_accum_steps, cfg.zero_stage)
    return DDPStrategy(model, optimizer, info, precision, grad_clip)
