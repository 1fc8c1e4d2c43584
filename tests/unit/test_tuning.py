"""Unit tests for kd.data.tuning: the choice rule, the start-up sweep, the per-machine cache and
how ranks on one node agree. Measurements are constructed (no timing assertions); the real
measuring function is only checked for the structure of what it returns."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from collections import namedtuple
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil
import pytest

from kd.data import build_dataset, build_train_loader, tuning
from kd.data.tuning import (
    Measurement,
    auto_candidates,
    auto_num_workers,
    choose_workers,
    recommend,
    resolve_num_workers,
)
from kd.errors import UserError

KEY = {"name": "synthetic", "image_size": 8, "batch_size": 4}


def m(workers: int, rate: float, prefetch: int | None = 2) -> Measurement:
    return Measurement(workers, prefetch if workers else None, rate, cpu_percent=50.0,
                       wait_ms=1.0, batches=4, batch_size=8, seconds=0.1)


def tiny_dataset(size: int = 32) -> Any:
    return build_dataset("synthetic", "train", root=None, image_size=8, num_classes=2,
                         augment=True, channels=3, synthetic_size=size)


class FakeMeasure:
    """Stands in for ``measure_throughput``: images/s from ``rate(workers)``, calls recorded."""

    def __init__(self, rate: Callable[[int], float]) -> None:
        self.rate, self.calls = rate, []

    def __call__(self, make_loader: Any, workers: int, prefetch_factor: int = 2,
                 **kwargs: Any) -> Measurement:
        self.calls.append(workers)
        return m(workers, self.rate(workers), prefetch_factor)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Callable[..., FakeMeasure]:
    """Replace the measurement with a fake and pretend this rank has ``cap`` workers' CPUs."""

    def install(rate: Callable[[int], float], cap: int = 8) -> FakeMeasure:
        f = FakeMeasure(rate)
        monkeypatch.setattr(tuning, "measure_throughput", f)
        monkeypatch.setattr(tuning, "max_workers", lambda local_world_size: cap)
        return f

    return install


def saturating(at: int) -> Callable[[int], float]:
    """Throughput that grows linearly up to ``at`` workers, then stays flat."""
    return lambda w: 100.0 * max(1, min(w, at))


# ------------------------------------------------------------------------------- choice rule
def test_fewest_workers_within_95_percent_of_the_best() -> None:
    ms = [m(0, 100), m(1, 180), m(2, 196), m(4, 205), m(6, 203)]
    assert choose_workers(ms) == 2  # 196 >= 0.95 * 205 = 194.75
    assert choose_workers(ms, tolerance=1.0) == 4
    assert choose_workers([m(0, 100), m(1, 180), m(2, 194), m(4, 205)]) == 4


def test_ties_and_all_equal_give_the_fewest() -> None:
    assert choose_workers([m(4, 200), m(1, 200), m(2, 200), m(0, 50)]) == 1  # order-free
    assert choose_workers([m(0, 100), m(1, 100), m(2, 100)]) == 0


def test_cap_is_respected() -> None:
    ms = [m(0, 100), m(1, 150), m(2, 300), m(4, 400), m(8, 800)]
    assert choose_workers(ms) == 8
    assert choose_workers(ms, cap=4) == 4
    assert choose_workers(ms, cap=2) == 2
    assert choose_workers(ms, cap=0) == 0
    assert choose_workers([m(4, 400)], cap=2) == 0  # nothing at or below the cap


def test_recommend_prefers_fewer_workers_then_less_prefetching() -> None:
    ms = [m(0, 100), m(2, 390, 2), m(2, 400, 4), m(2, 380, 8), m(4, 405, 2)]
    best = recommend(ms)
    assert (best.workers, best.prefetch_factor) == (2, 2)
    strict = recommend(ms, tolerance=0.985)  # 0.985 * 405 = 398.9: only 400 and 405 qualify
    assert (strict.workers, strict.prefetch_factor) == (2, 4)


@pytest.mark.parametrize("cap", [0, 1, 2, 3, 7, 8, 15, 31, 63, 127])
def test_auto_candidates_run_from_0_to_the_cap(cap: int) -> None:
    c = auto_candidates(cap)
    assert c == sorted(set(c))
    assert c[0] == 0 and c[-1] == cap
    assert set(c) >= {w for w in (0, 1, 2, 4, 6, 8) if w <= cap}
    assert len(c) <= 16  # a few seconds even on a 128-core node


# ------------------------------------------------------------------------------ the sweep
def test_sweep_stops_when_more_workers_stop_helping(fake: Callable[..., FakeMeasure],
                                                    tmp_path: Path) -> None:
    f = fake(saturating(4), cap=16)
    choice = auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)
    assert f.calls == [0, 1, 2, 4, 6]  # 6 adds nothing over 4: 8, 12, 16 are not measured
    assert choice.num_workers == 4 and not choice.cached
    assert [x.workers for x in choice.measurements] == f.calls


def test_one_worker_that_only_matches_the_main_process_does_not_end_the_sweep(
        fake: Callable[..., FakeMeasure], tmp_path: Path) -> None:
    f = fake(lambda w: {0: 100.0, 1: 100.0}.get(w, 100.0 * w), cap=4)
    assert auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path).num_workers == 4
    assert f.calls == [0, 1, 2, 4]


def test_sweep_respects_its_time_budget(fake: Callable[..., FakeMeasure]) -> None:
    f = fake(saturating(8), cap=8)
    out = tuning.sweep_workers(lambda w, p: [], 8, budget_s=0.0)
    assert [x.workers for x in out] == f.calls == [0]


def test_cap_of_zero_measures_nothing(fake: Callable[..., FakeMeasure], tmp_path: Path) -> None:
    f = fake(saturating(4), cap=0)
    assert resolve_num_workers("auto", tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path) == 0
    assert f.calls == []


def test_explicit_int_is_returned_unchanged(fake: Callable[..., FakeMeasure], tmp_path: Path,
                                            caplog: pytest.LogCaptureFixture) -> None:
    f = fake(saturating(4), cap=3)
    with caplog.at_level(logging.WARNING, logger="kd"):
        assert resolve_num_workers(2, tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path) == 2
        assert resolve_num_workers(0, tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path) == 0
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="kd"):
        assert resolve_num_workers(12, tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path) == 12
    assert "data.num_workers=12" in caplog.text and "saturate" in caplog.text
    assert f.calls == []
    assert not (tmp_path / "loader").exists()  # nothing cached for explicit settings


def test_invalid_setting_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"data\.num_workers"):
        resolve_num_workers("many", tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)


def test_max_workers_leaves_a_cpu_to_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "available_cpus", lambda: list(range(16)))
    monkeypatch.setattr(tuning, "node_cpus", lambda: 16)
    monkeypatch.setattr(tuning, "_cgroup_cpu_limit", lambda: None)
    assert tuning.max_workers(1) == 15
    assert tuning.max_workers(4) == 3  # 16 CPUs shared by 4 ranks
    assert tuning.max_workers(64) == 0
    assert tuning.cpus_per_rank(64) == 1
    monkeypatch.setattr(tuning, "_cgroup_cpu_limit", lambda: 4.5)  # a container's quota
    assert tuning.cpu_budget() == 4 and tuning.max_workers(1) == 3
    assert tuning.cpus_per_rank(2) == 2  # the quota is shared by the ranks too


# A p4d.24xlarge: 96 vCPUs, 8 GPUs, one rank per GPU.
@pytest.mark.parametrize(("affinity", "env", "expected"), [
    # srun --ntasks-per-node=8 --cpus-per-task=12: each task is bound to its own 12 CPUs
    (range(12, 24), {"SLURM_PROCID": "1", "SLURM_NTASKS_PER_NODE": "8",
                     "SLURM_CPUS_ON_NODE": "96"}, 12),
    # torchrun (or srun + torchrun): the 8 workers share the node's set
    (range(96), {"SLURM_CPUS_ON_NODE": "96"}, 12),
    (range(96), {}, 12),
    # torchrun in a quarter of a shared node (sbatch --cpus-per-task=24): 8 workers share 24
    (range(24), {"SLURM_CPUS_ON_NODE": "24"}, 3),
    # mpirun's default binding to a socket: 4 ranks on each of 2 sockets
    (range(48), {}, 12),
    # mpirun --bind-to core, 2 hardware threads each
    ((5, 53), {}, 2),
], ids=["srun-per-task", "torchrun-slurm", "torchrun", "torchrun-shared-node", "socket",
        "core"])
def test_an_affinity_set_is_divided_only_among_the_ranks_that_share_it(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, affinity: Iterable[int],
        env: dict[str, str], expected: int) -> None:
    for key in ("SLURM_CPUS_ON_NODE", "SLURM_PROCID", "SLURM_NTASKS_PER_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tuning, "available_cpus", lambda: list(affinity))
    monkeypatch.setattr(tuning, "_cgroup_cpu_limit", lambda: None)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    no_cgroup = tmp_path / "no-cgroup"
    node = tuning.node_cpus

    def node_cpus(env=None, root=no_cgroup, self_cgroup=no_cgroup / "cgroup"):
        return node(env, root, self_cgroup)

    monkeypatch.setattr(tuning, "node_cpus", node_cpus)
    assert tuning.cpus_per_rank(8) == expected
    assert tuning.max_workers(8) == expected - 1  # the srun case gave 0 before


@pytest.mark.parametrize(("files", "proc", "env", "expected"), [
    ({"cpuset.cpus.effective": "0-31\n"}, "0::/\n", {}, 32),  # a container (cgroup v2)
    ({"kubepods/pod1/cpuset.cpus.effective": "4-7,12-15\n",
      "cpuset.cpus.effective": "0-63\n"}, "0::/kubepods/pod1\n", {}, 8),  # its own cgroup
    ({"cpuset/cpuset.effective_cpus": "0-3,8\n"}, "3:cpuset:/\n0::/\n", {}, 5),  # v1
    ({"cpuset.cpus.effective": "0-31\n"}, "0::/\n", {"SLURM_CPUS_ON_NODE": "24"}, 24),
    ({}, "", {}, 96),  # nothing readable: every online CPU
], ids=["v2", "v2-own-cgroup", "v1", "slurm", "none"])
def test_node_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, files: dict[str, str],
                   proc: str, env: dict[str, str], expected: int) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / "self_cgroup").write_text(proc)
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    assert tuning.node_cpus(env, tmp_path, tmp_path / "self_cgroup") == expected


@pytest.mark.parametrize(("files", "cpus"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "400000 100000\n"}, 4.0),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "250000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 2.5),
    ({}, None),
], ids=["v2-unlimited", "v2-quota", "v1-unlimited", "v1-quota", "none"])
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], cpus: float | None) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert tuning._cgroup_cpu_limit(tmp_path) == cpus


# ------------------------------------------------------------------------------ the cache
def test_cache_hit_skips_the_sweep(fake: Callable[..., FakeMeasure], tmp_path: Path) -> None:
    f = fake(saturating(2), cap=6)
    first = resolve_num_workers("auto", tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)
    assert first == 2 and f.calls
    f.calls.clear()
    choice = auto_num_workers(tiny_dataset(), 4, 1, dict(reversed(KEY.items())),
                              cache_dir=tmp_path)  # same config, other key order
    assert f.calls == []
    assert choice.cached and choice.num_workers == first
    assert [x.workers for x in choice.measurements] == [0, 1, 2, 4]  # what was measured
    assert "cached in" in choice.describe()


def test_cache_key_changes_with_the_data_config(fake: Callable[..., FakeMeasure],
                                                tmp_path: Path) -> None:
    f = fake(saturating(2), cap=6)
    auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)
    n = len(f.calls)
    other = {**KEY, "image_size": 16}
    assert tuning.cache_fields(1, other) != tuning.cache_fields(1, KEY)
    assert tuning.cache_fields(2, KEY) != tuning.cache_fields(1, KEY)  # rank layout too
    auto_num_workers(tiny_dataset(), 4, 1, other, cache_dir=tmp_path)
    assert len(f.calls) > n  # measured again
    assert len(list((tmp_path / "loader").glob("*.json"))) == 2


def test_cache_key_names_the_machine_and_torch() -> None:
    import socket

    import torch

    fields = tuning.cache_fields(1, KEY)
    assert fields["host"] == socket.gethostname()
    assert fields["torch"] == torch.__version__
    assert fields["cpu_count"] == os.cpu_count()
    assert fields["cpus"] == tuning.cpu_budget()
    assert fields["local_world_size"] == 1


def test_cache_dir_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KD_CACHE_DIR", str(tmp_path / "kd"))
    assert tuning.default_cache_dir() == tmp_path / "kd"
    monkeypatch.delenv("KD_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.default_cache_dir() == tmp_path / "xdg" / "kd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.default_cache_dir() == Path.home() / ".cache" / "kd"


def test_cache_writes_are_atomic_and_leave_no_temporary_files(
        fake: Callable[..., FakeMeasure], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    fake(saturating(2), cap=4)
    choice = auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)
    folder = tmp_path / "loader"
    names = sorted(p.name for p in folder.iterdir())
    assert names == sorted([choice.cache_file.name, choice.cache_file.with_suffix(".lock").name])
    entry = json.loads(choice.cache_file.read_text())
    assert entry["num_workers"] == 2 and entry["key"] == tuning.cache_fields(1, KEY)
    assert entry["data_config"] == KEY

    # A write that fails half-way leaves the old entry whole and no temporary file behind.
    def broken_replace(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tuning.os, "replace", broken_replace)
    assert not tuning.write_cache(choice.cache_file, {"num_workers": 99})
    assert sorted(p.name for p in folder.iterdir()) == names
    assert json.loads(choice.cache_file.read_text()) == entry


@pytest.mark.parametrize("content", ["{not json", "", "[1, 2]", '{"num_workers": "3"}',
                                     '{"num_workers": -1}', '{"num_workers": 1, "key": {}}'],
                         ids=["truncated", "empty", "list", "string", "negative", "other-key"])
def test_corrupt_cache_is_ignored_and_rewritten(fake: Callable[..., FakeMeasure], tmp_path: Path,
                                                content: str) -> None:
    fields = tuning.cache_fields(1, KEY)
    path = tuning.cache_path(fields, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text(content)
    f = fake(saturating(2), cap=4)
    assert resolve_num_workers("auto", tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path) == 2
    assert f.calls  # measured again
    entry = json.loads(path.read_text())
    assert entry["num_workers"] == 2 and entry["key"] == fields
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_unwritable_cache_still_chooses(fake: Callable[..., FakeMeasure], tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache "folder" is a file: nothing can be written under it
    fake(saturating(2), cap=4)
    choice = auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=blocker)
    assert choice.num_workers == 2 and choice.cache_file is None


# --------------------------------------------------------------------- ranks on one node
def _rank(cache_dir: str, log_path: str, out_path: str) -> None:
    """One 'rank': its own measurements would choose pid-dependent counts, were it to sweep."""
    pick = os.getpid() % 3 + 1

    def measure(make_loader: Any, workers: int, prefetch_factor: int = 2,
                **kwargs: Any) -> Measurement:
        with open(log_path, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.05)  # long enough for the other ranks to arrive and wait
        return m(workers, 100.0 * max(1, min(workers, pick)), prefetch_factor)

    tuning.measure_throughput = measure
    tuning.max_workers = lambda local_world_size: 6
    n = tuning.resolve_num_workers("auto", None, 4, 3, KEY, cache_dir=cache_dir,
                                   make_loader=lambda w, p: [])
    Path(out_path).write_text(str(n))


def test_ranks_on_one_node_agree_and_sweep_once(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    log_path = tmp_path / "sweeps.log"
    procs = [ctx.Process(target=_rank, args=(str(tmp_path / "cache"), str(log_path),
                                             str(tmp_path / f"rank{i}")))
             for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    choices = {(tmp_path / f"rank{i}").read_text() for i in range(3)}
    assert len(choices) == 1  # all agree
    assert len(set(log_path.read_text().split())) == 1  # one process measured


def test_without_a_lock_the_first_rank_to_finish_wins(fake: Callable[..., FakeMeasure],
                                                      tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import contextlib

    @contextlib.contextmanager
    def no_lock(path: Path, timeout_s: float) -> Any:
        yield False

    monkeypatch.setattr(tuning, "_exclusive", no_lock)
    fields = tuning.cache_fields(1, KEY)
    path = tuning.cache_path(fields, tmp_path)

    def other_rank_finishes_first(w: int) -> float:
        if not path.exists():  # another rank writes its (different) choice meanwhile
            tuning.write_cache(path, {"key": fields, "num_workers": 3, "measurements": []})
        return saturating(1)(w)

    fake(other_rank_finishes_first, cap=4)
    choice = auto_num_workers(tiny_dataset(), 4, 1, KEY, cache_dir=tmp_path)
    assert choice.num_workers == 3 and choice.cached


# ------------------------------------------------------------------ the real measurement
def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE}


@pytest.mark.parametrize(("workers", "prefetch"), [(0, 2), (1, 2), (2, 3)])
def test_measure_throughput_structure(workers: int, prefetch: int) -> None:
    ds = tiny_dataset(24)
    before = _children()

    def make(w: int, p: int) -> Iterable[Any]:
        return build_train_loader(ds, 4, 0, 0, 1, w, False, p)

    got = tuning.measure_throughput(make, workers, prefetch, batches=3)
    assert got.workers == workers
    assert got.prefetch_factor == (prefetch if workers else None)
    assert got.batch_size == 4
    assert got.batches >= 3 and got.batches % max(1, workers) == 0  # whole rounds
    assert got.img_per_s > 0 and got.seconds > 0 and got.wait_ms >= 0
    assert 0 <= got.cpu_percent <= 100 and got.loader_cpus >= 0
    deadline = time.monotonic() + 10  # the workers are shut down after measuring
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _children() - before


def test_probe_batch_size_is_bounded() -> None:
    ds = tiny_dataset(24)
    assert 1 <= tuning.probe_batch_size(ds, 16) <= 16
    assert tuning.probe_batch_size(ds, 1000) <= 24
    assert tuning.probe_batch_size(ds, 16, target_s=0.0) == 1


def test_auto_on_a_real_loader(tmp_path: Path) -> None:
    choice = auto_num_workers(tiny_dataset(64), 8, 1, KEY, cache_dir=tmp_path, budget_s=2.0)
    assert 0 <= choice.num_workers <= tuning.max_workers(1)
    assert choice.measurements and choice.measurements[0].workers == 0
    assert choice.probe_batch_size is not None and choice.probe_batch_size <= 8


def test_busy_percent() -> None:
    T = namedtuple("T", "user system idle iowait")
    before = [T(0, 0, 0, 0), T(0, 0, 0, 0)]
    after = [T(3, 1, 4, 0), T(0, 0, 8, 0)]
    assert tuning._busy_percent(before, after, [0]) == pytest.approx(50.0)
    assert tuning._busy_percent(before, after, [0, 1]) == pytest.approx(25.0)
    assert tuning._busy_percent(before, after, [1]) == pytest.approx(0.0)


def test_simulated_step_is_part_of_each_batch() -> None:
    ds = tiny_dataset(24)
    got = tuning.measure_throughput(lambda w, p: build_train_loader(ds, 4, 0, 0, 1, w, False, p),
                                    0, batches=4, step_s=0.02)
    assert got.seconds >= got.batches * 0.02  # a lower bound: sleeps last at least that long
