"""Stop signals agreed on by all ranks, and optimizer steps skipped on non-finite numbers."""

from __future__ import annotations

import os
import signal
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from kd.core import watchdog
from kd.core.dist import DistInfo
from kd.core.guard import SkipTracker, StopRequest
from kd.core.strategy import DDPStrategy
from kd.errors import DivergedError


def test_a_real_sigterm_sets_the_flag_and_close_restores_the_handler() -> None:
    before = signal.getsignal(signal.SIGTERM)
    stop = StopRequest(distributed=False)
    assert not stop.should_stop()
    os.kill(os.getpid(), signal.SIGTERM)  # delivered to this (main) thread before kill returns
    assert stop.should_stop() and stop.signal_name == "SIGTERM"
    stop.close()
    assert signal.getsignal(signal.SIGTERM) is before


def test_inside_the_loop_sigterm_is_a_stop_request_and_outside_it_the_watchdogs() -> None:
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    store = dist.HashStore()
    watchdog.start(rank=0, world_size=2, timeout_s=2.5, connect=lambda: store)
    try:
        stop = StopRequest(distributed=False)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.flag
        stop.close()
        with pytest.raises(watchdog.Terminated):
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        watchdog.stop()
    assert {sig: signal.getsignal(sig) for sig in before} == before


def _agree(rank: int, world: int, store_path: str, results: dict) -> None:
    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    stop = StopRequest(distributed=True, timeout_s=60)
    answers = []
    for call in range(6):
        if rank == 1 and call == 2:
            stop.request(signal.SIGTERM)  # only rank 1 is signalled
        answers.append(stop.should_stop())
    stop.close()
    results[rank] = (answers, stop.signal_name)
    dist.destroy_process_group()


def test_ranks_agree_one_step_after_any_of_them_is_signalled(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree, args=(2, str(tmp_path / "store"), results), nprocs=2, join=True)
        results = dict(results)
    # Rank 1 raises its flag before call 2; the all-reduce started at call 2 is read at call 3.
    assert results[0][0] == results[1][0] == [False, False, False, True, True, True]
    assert results[1][1] == "SIGTERM" and results[0][1] == "a stop signal on another rank"


def _agree_on_the_default_group(rank: int, world: int, store_path: str, results: dict) -> None:
    """As _agree, under a stand-in "smddp" backend that, like SageMaker's, allows no second
    process group."""
    def create(store, rank, size, timeout):
        return dist.ProcessGroupGloo(store, rank, size, timeout)

    def refuse(*args, **kwargs):
        raise RuntimeError("smddp supports no new_group()")

    dist.Backend.register_backend("smddp", create, devices=["cpu"])
    dist.new_group = refuse
    store = dist.FileStore(store_path, world)
    dist.init_process_group("smddp", store=store, rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    stop = StopRequest(distributed=True, timeout_s=60)
    answers = []
    for call in range(6):
        if rank == 0 and call == 2:
            stop.request(signal.SIGUSR1)
        answers.append(stop.should_stop())
    stop.close()
    results[rank] = (answers, stop.signal_name, stop.group)
    dist.destroy_process_group()


def test_under_smddp_the_ranks_agree_on_the_default_group(tmp_path: Path) -> None:
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_agree_on_the_default_group, args=(2, str(tmp_path / "store"), results),
                 nprocs=2, join=True)
        results = dict(results)
    assert results[0][0] == results[1][0] == [False, False, False, True, True, True]
    assert results[0][1] == "SIGUSR1" and results[1][1] == "a stop signal on another rank"
    assert results[0][2] is None and results[1][2] is None  # no group of its own


class _FakeWork:
    def __init__(self) -> None:
        self.waits = 0

    def wait(self) -> bool:
        self.waits += 1
        return True


def test_the_default_group_path_issues_one_all_reduce_per_boundary(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The smddp path's bookkeeping, in one process: never new_group, one all-reduce of the
    default group per step boundary, its result read at the next boundary."""
    calls = []

    def all_reduce(tensor: torch.Tensor, op=None, group=None, async_op=False) -> _FakeWork:
        calls.append((float(tensor.item()), group))
        tensor.mul_(2)  # "another rank" with the same flag
        return _FakeWork()

    monkeypatch.setattr(dist, "get_backend", lambda group=None: "smddp")
    monkeypatch.setattr(dist, "new_group", lambda *a, **k: pytest.fail("new_group under smddp"))
    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stop = StopRequest(distributed=True, device=torch.device("cpu"))
    assert [stop.should_stop(), stop.should_stop()] == [False, False]
    stop.request(signal.SIGTERM)
    assert [stop.should_stop(), stop.should_stop()] == [False, True]
    stop.close()
    assert calls == [(0.0, None), (0.0, None), (1.0, None), (1.0, None)]


@pytest.mark.gpu
def test_the_default_group_path_on_cuda_waits_for_the_previous_step_only(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The smddp path on a real CUDA collective (NCCL, one rank, forced onto the default-group
    path): a boundary waits for the device to finish the step before the previous boundary,
    never for the step just queued, and the flags still arrive one boundary late."""
    import time

    import kd.core.guard

    monkeypatch.setattr(kd.core.guard, "SINGLE_GROUP_BACKENDS", ("nccl",))
    device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1,
                            device_id=device)
    try:
        stop = StopRequest(distributed=True, device=device)
        assert stop.group is None
        assert not stop.should_stop()
        torch.cuda._sleep(2_000_000_000)  # a long "step" on the device (~1 s; no public API)
        stop.request(signal.SIGTERM)
        start = time.perf_counter()
        assert not stop.should_stop()  # reads the boundary before the step: no wait
        assert time.perf_counter() - start < 0.2
        assert stop.should_stop()  # waits for the step, then sees the flag
        stop.close()
    finally:
        dist.destroy_process_group()


def test_skip_tracker_counts_streaks_and_stops_past_the_limit() -> None:
    tracker = SkipTracker(torch.device("cpu"), max_consecutive=3)
    terms = torch.tensor([1.0, 0.5, 0.5, 2.0])
    for step, bad in enumerate([0, 1, 1, 0, 1, 0], start=1):
        tracker.update(step, torch.tensor(bool(bad)), terms)
    assert tracker.check() == 3  # total skipped; longest streak 2 < 3
    nan_terms = torch.tensor([float("nan"), float("nan"), 0.25, float("inf")])
    for step in (7, 8, 9):
        tracker.update(step, torch.tensor(True), nan_terms)
    with pytest.raises(DivergedError, match=r"3 consecutive.*step 9: loss=nan.*loss_kd=0\.25"):
        tracker.check()
    assert tracker.state() == {"n_skipped_steps": 6, "skip_streak": 3}
    never = SkipTracker(torch.device("cpu"), max_consecutive=0, skipped=6, streak=3)
    never.update(10, torch.tensor(True), nan_terms)
    assert never.check() == 7


def _strategy(optimizer: str, precision: str = "fp32"):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    if optimizer == "fused":
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=0.1, foreach=True)
    info = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1,
                    device=torch.device("cpu"), backend=None)
    return model, opt, DDPStrategy(model, opt, info, precision, grad_clip=None)


def _backward(model: nn.Module, strategy: DDPStrategy, poison: bool) -> torch.Tensor:
    loss = model(torch.ones(2, 4)).sum() * (float("nan") if poison else 1.0)
    strategy.backward(loss, 1, True)
    return loss.detach()


@pytest.mark.parametrize("optimizer", ["fused", "foreach"])
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_a_non_finite_step_leaves_weights_and_optimizer_state_alone(optimizer, precision) -> None:
    model, opt, strategy = _strategy(optimizer, precision)
    loss = _backward(model, strategy, poison=False)
    skipped, norm = strategy.step(loss)
    assert not skipped and torch.isfinite(norm)
    weights = [p.detach().clone() for p in model.parameters()]
    steps = [float(opt.state[p]["step"]) for p in model.parameters()]
    loss = _backward(model, strategy, poison=True)
    skipped, norm = strategy.step(loss)
    assert skipped and not torch.isfinite(norm)
    assert all(torch.equal(a, b) for a, b in zip(weights, model.parameters(), strict=True))
    assert [float(opt.state[p]["step"]) for p in model.parameters()] == steps
    assert all(p.grad is None for p in model.parameters())
    skipped, _ = strategy.step(_backward(model, strategy, poison=False))
    assert not skipped
    assert not torch.equal(weights[0], model.weight)


def test_the_fused_skip_needs_no_host_synchronisation(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, strategy = _strategy("fused")

    def no_sync(self):
        raise AssertionError("host synchronisation in the optimizer step")

    for poison in (False, True):
        loss = _backward(model, strategy, poison)
        with monkeypatch.context() as m:
            m.setattr(torch.Tensor, "item", no_sync)
            m.setattr(torch.Tensor, "__bool__", no_sync)
            m.setattr(torch.Tensor, "tolist", no_sync)
            strategy.step(loss)


def test_build_optimizer_picks_fused_kernels_unless_told_otherwise() -> None:
    from kd.config import OptimConfig
    from kd.core.optim import build_optimizer

    model = nn.Linear(4, 3)
    cfg = OptimConfig(name="adamw", lr=1e-3, weight_decay=0.05)
    assert build_optimizer(model, cfg).defaults["fused"] is True
    cfg.kwargs = {"foreach": True}
    assert not build_optimizer(model, cfg).defaults.get("fused")
    cfg.name, cfg.kwargs = "lamb", {}  # timm's own: no fused kernel
    assert "fused" not in build_optimizer(model, cfg).defaults


def test_the_default_group_flag_wait_is_bounded_by_the_timeout() -> None:
    # A peer that died leaves the all-reduce unfinished: the wait must end with an error, not
    # block the host (where no signal handler runs) for ever.
    from kd.core.guard import _DefaultGroupFlags

    flags = _DefaultGroupFlags(torch.device("cpu"), timeout_s=0.05)
    flags.copied = type("NeverDone", (), {"query": lambda self: False})()
    flags._pending = True
    with pytest.raises(RuntimeError, match=r"dist.timeout_s=0.05"):
        flags.result()
