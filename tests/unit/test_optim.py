"""Optimizer state across a resume: fused AdamW under ZeroRedundancyOptimizer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

import kd.core.optim
from kd.core.optim import load_optimizer_state, place_step_tensors


@pytest.fixture
def one_rank_group(request: pytest.FixtureRequest) -> Iterator[None]:
    backend = getattr(request, "param", "gloo")
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def zero_adamw(model: nn.Module) -> ZeroRedundancyOptimizer:
    return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=torch.optim.AdamW,
                                   lr=1e-3, fused=True)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    device = next(model.parameters()).device
    model(torch.ones(2, 4, device=device)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def saved_state(device: str) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = nn.Linear(4, 3).to(device)
    optimizer = zero_adamw(model)
    train_step(model, optimizer)
    optimizer.consolidate_state_dict(to=0)
    return model, optimizer.state_dict()


def test_zero_resume_places_the_steps_of_zeros_local_optimizer(
        one_rank_group: None, monkeypatch: pytest.MonkeyPatch) -> None:
    # On CUDA, ZeRO's load leaves `step` on the CPU, away from the parameters (the gpu test
    # below); on a CPU the devices coincide, so check that kd hands the right optimizer on.
    model, state = saved_state("cpu")
    resumed = zero_adamw(model)
    seen: list[torch.optim.Optimizer] = []
    monkeypatch.setattr(kd.core.optim, "place_step_tensors", seen.append)
    load_optimizer_state(resumed, state)
    assert seen == [resumed.optim]


def test_zero_resume_of_fused_adamw_steps_on(one_rank_group: None) -> None:
    model, state = saved_state("cpu")
    resumed = zero_adamw(model)
    load_optimizer_state(resumed, state)
    train_step(model, resumed)
    assert [float(s["step"]) for s in resumed.optim.state.values()] == [2.0, 2.0]


def test_place_step_tensors_moves_fused_and_capturable_groups_only() -> None:
    model = nn.Linear(4, 3, device="meta")
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    for p in model.parameters():
        optimizer.state[p]["step"] = torch.tensor(3.0)
    assert place_step_tensors(optimizer) == 0  # a CPU step is what unfused AdamW wants
    optimizer.param_groups[0]["capturable"] = True
    assert place_step_tensors(optimizer) == 2
    assert all(s["step"].device.type == "meta" for s in optimizer.state.values())


@pytest.mark.gpu
@pytest.mark.parametrize("one_rank_group", ["nccl"], indirect=True)
def test_zero_fused_adamw_resumes_on_cuda(one_rank_group: None) -> None:
    model, state = saved_state("cuda")
    resumed = zero_adamw(model)
    load_optimizer_state(resumed, state)
    train_step(model, resumed)  # failed with "Expected all tensors to be on the same device"
    assert all(s["step"].device.type == "cuda" for s in resumed.optim.state.values())
