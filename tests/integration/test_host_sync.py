"""No host-device traffic in a training step outside the data phase and log steps.

On CUDA, a tensor built from host data (``torch.tensor([...], device=...)``) is a blocking copy
from pageable memory and ``.item()`` / ``.tolist()`` / ``.cpu()`` wait for the device: either
stops the CPU from running ahead of the GPU. On a CPU both are visible as operators (a
``TorchDispatchMode`` sees ``lift_fresh`` and ``_local_scalar_dense``) or as method calls, so
this audit runs here. The data phase and the start of an epoch's loader are left out: they build
the batch on the host and copy it once, which is the transfer a step needs.
"""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kd.core.trainer import Trainer
from tests.integration.conftest import tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

aten = torch.ops.aten
HOST_OPS = {aten.lift_fresh.default: "a tensor from host data",
            aten._local_scalar_dense.default: "a read of a device value (.item())"}
HOST_METHODS = ("item", "tolist", "cpu", "numpy")


def where_from() -> str:
    """The innermost kd frame of the current stack."""
    frames = [f for f in traceback.extract_stack() if "/kd/" in f.filename]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"


class HostTraffic(TorchDispatchMode):
    """Records host-device traffic while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active, self.seen = False, []

    @contextlib.contextmanager
    def paused(self, pause: bool = True) -> Iterator[None]:
        """Stop recording (while ``pause``) inside the block; the previous state after."""
        was = self.active
        self.active = was and not pause
        try:
            yield
        finally:
            self.active = was

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
        kwargs = kwargs or {}
        if self.active and func in HOST_OPS:
            self.seen.append(f"{HOST_OPS[func]} at {where_from()}")
        elif self.active and func in (aten._to_copy.default, aten.copy_.default):
            # On CUDA: a copy between host and device (nothing to see on a CPU).
            source, target = args[1 if func is aten.copy_.default else 0], (
                args[0].device if func is aten.copy_.default else kwargs.get("device"))
            if target is not None and torch.device(target).type != source.device.type:
                self.seen.append(f"a copy {source.device.type} -> {torch.device(target).type} "
                                 f"at {where_from()}")
        return func(*args, **kwargs)


def audit(trainer: Trainer, monkeypatch: pytest.MonkeyPatch, steps: int = 5) -> list[str]:
    """Train ``steps + 1`` steps; record the traffic from the end of step 1 to that of step
    ``steps`` (no log step in between), outside the data phase."""
    traffic = HostTraffic()
    for name in HOST_METHODS:
        original = getattr(torch.Tensor, name)

        def spy(t: torch.Tensor, *a: Any, _name: str = name, _f: Any = original, **k: Any):
            if traffic.active:
                traffic.seen.append(f".{_name}() at {where_from()}")
            return _f(t, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    phase = trainer.timer.phase

    @contextlib.contextmanager
    def phase_outside_data(name: str, host: bool = False) -> Iterator[None]:
        with traffic.paused(name == "data"), phase(name, host):
            yield

    monkeypatch.setattr(trainer.timer, "phase", phase_outside_data)
    # Starting an epoch's loader iterator draws its base seed on the host (a CPU tensor):
    # data work, like the data phase.
    loader_iter = torch.utils.data.DataLoader.__iter__

    def iter_outside(loader: Any) -> Any:
        with traffic.paused():
            return loader_iter(loader)

    monkeypatch.setattr(torch.utils.data.DataLoader, "__iter__", iter_outside)

    def on_step(t: Trainer) -> None:
        traffic.active = 1 <= t.step < steps

    with traffic:
        trainer.train(evaluate=False, save=False, on_step=on_step)
    monkeypatch.undo()
    return traffic.seen


@pytest.mark.parametrize("overrides", [
    (),
    ("train.precision=bf16", "distill.loss=dkd", "optim.grad_clip=1.0"),
    ("train.precision=fp16", "train.grad_accum_steps=2", "data.mixup=0.8"),
    ("distill.features=[{}, {student: 0, teacher: 0, tokens: pooled}]", "optim.layer_decay=0.7",
     "train.ema_decay=0.99", "train.ema_warmup=true"),
], ids=["fp32-soft", "bf16-dkd-clip", "fp16-accum-mixup", "features-layer-decay-ema"])
def test_a_training_step_does_not_touch_the_host(tiny_teacher: str, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 overrides: tuple[str, ...]) -> None:
    cfg = tiny_config(tiny_teacher, tmp_path, "train.max_steps=6", "train.log_every=100",
                      "checkpoint.every_steps=0", *overrides)
    assert audit(Trainer(cfg), monkeypatch) == []


def test_the_audit_sees_host_traffic(tiny_teacher: str, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(tiny_config(tiny_teacher, tmp_path, "train.max_steps=6",
                                  "train.log_every=100", "checkpoint.every_steps=0"))
    update = trainer.skips.update

    def old_update(step: int, skipped: torch.Tensor, terms: torch.Tensor) -> None:
        torch.tensor([float(step)], device=terms.device)  # what SkipTracker.update did
        update(step, skipped, terms)

    monkeypatch.setattr(trainer.skips, "update", old_update)
    seen = audit(trainer, monkeypatch)
    assert seen and all(s.startswith("a tensor from host data") for s in seen)


@pytest.mark.parametrize("mix", ["data.mixup=0.8", "data.cutmix=1.0"])
def test_mixing_a_batch_on_the_device_does_not_touch_the_host(tiny_teacher: str, tmp_path: Path,
                                                              mix: str) -> None:
    # The data phase's device half: Mixup/CutMix ('batch' mode draws on the host with NumPy and
    # passes plain numbers) and the models' input normalisation.
    from kd.data.mix import apply_mixup, build_mixup

    cfg = tiny_config(tiny_teacher, tmp_path, mix, "data.mixup_prob=1.0")
    trainer = Trainer(cfg)
    mixup = build_mixup(cfg.data, cfg.data.num_classes, 0.1)
    images = torch.stack([trainer.train_set[(i, i)][0] for i in range(4)])
    targets = torch.arange(4)
    traffic = HostTraffic()
    traffic.active = True
    with traffic:
        mixed, soft = apply_mixup(mixup, images, targets, seed=3)
        trainer.task.prepare(mixed)
    assert soft.shape == (4, cfg.data.num_classes) and traffic.seen == []


@pytest.mark.gpu
def test_a_training_step_on_cuda_does_not_touch_the_host(tiny_teacher: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_config(tiny_teacher, tmp_path, "train.max_steps=6", "train.log_every=100",
                      "checkpoint.every_steps=0", "train.precision=bf16")
    trainer = Trainer(cfg)
    assert trainer.device.type == "cuda"
    assert audit(trainer, monkeypatch) == []
