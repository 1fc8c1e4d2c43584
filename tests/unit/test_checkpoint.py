"""Unit tests for kd.core.checkpoint: atomic saves, verification, fallback and pruning."""

from __future__ import annotations

import json
import os
import random
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import kd
from kd.core import checkpoint as ckpt
from kd.core.checkpoint import (
    CONFIG_FILE,
    MANIFEST_FILE,
    STATE_FILE,
    STUDENT_FILE,
    CheckpointManager,
    atomic_write_text,
    load,
    save_weights,
    verify,
)
from kd.errors import CheckpointError

CONFIG_YAML = "train:\n  epochs: 2\n"


def student_state(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {"w": torch.randn(4, 3, generator=g), "b": torch.randn(4, generator=g),
            "n": torch.tensor(step)}


def train_state(step: int) -> dict:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    return {"step": step, "optimizer": opt.state_dict(), "python_rng": random.getstate(),
            "torch_rng": torch.get_rng_state(), "data": {"epoch": 1, "batch": 3}}


def save(manager: CheckpointManager, step: int) -> Path:
    return manager.save(step, student_state(step), train_state(step), CONFIG_YAML)


def assert_tensors_equal(a: object, b: object) -> None:
    """Deep equality of nested dicts/lists/tuples with tensors."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_tensors_equal(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_tensors_equal(x, y)
    else:
        assert a == b


@pytest.fixture
def manager(tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "checkpoints", keep=3)


# ------------------------------------------------------------------------------------------
# round trip
# ------------------------------------------------------------------------------------------


def test_empty_directory(manager: CheckpointManager) -> None:
    assert manager.list() == []
    assert manager.latest() is None


def test_save_list_latest_load_round_trip(manager: CheckpointManager) -> None:
    state = train_state(10)
    path = manager.save(10, student_state(10), state, CONFIG_YAML)
    assert path == manager.directory / "step_00000010"
    assert manager.list() == [path]
    assert manager.latest() == path
    assert (manager.directory / "latest").read_text().strip() == "step_00000010"
    assert sorted(p.name for p in path.iterdir()) == sorted(
        [STUDENT_FILE, STATE_FILE, CONFIG_FILE, MANIFEST_FILE])

    student, loaded, config_yaml = load(path)
    assert_tensors_equal(student, student_state(10))
    assert_tensors_equal(loaded, state)
    assert loaded["python_rng"] == state["python_rng"]
    random.setstate(loaded["python_rng"])  # usable as a Python RNG state
    assert config_yaml == CONFIG_YAML

    manifest = verify(path)
    assert manifest["step"] == 10
    assert manifest["kd_version"] == kd.__version__
    assert set(manifest["files"]) == {STUDENT_FILE, STATE_FILE, CONFIG_FILE}
    assert manifest["files"][STATE_FILE]["bytes"] == (path / STATE_FILE).stat().st_size


def test_state_file_loads_with_weights_only(manager: CheckpointManager) -> None:
    path = save(manager, 1)
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    assert state["step"] == 1
    assert isinstance(state["python_rng"], tuple)


def test_student_file_has_metadata(manager: CheckpointManager) -> None:
    path = save(manager, 7)
    with safe_open(str(path / STUDENT_FILE), "pt") as f:
        assert f.metadata() == {"kd_version": kd.__version__, "step": "7"}


def test_latest_is_the_newest(manager: CheckpointManager) -> None:
    for step in (5, 10, 15):
        save(manager, step)
    assert [p.name for p in manager.list()] == ["step_00000005", "step_00000010",
                                                "step_00000015"]
    assert manager.latest() == manager.path_for(15)
    assert torch.equal(load(manager.latest())[0]["n"], torch.tensor(15))


def test_saving_the_same_step_again_replaces_it(manager: CheckpointManager) -> None:
    save(manager, 4)
    new = {k: v + 1 for k, v in student_state(4).items()}
    manager.save(4, new, train_state(4), "other: 1\n")
    assert manager.list() == [manager.path_for(4)]
    student, _, config_yaml = load(manager.latest())
    assert_tensors_equal(student, new)
    assert config_yaml == "other: 1\n"


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_the_oldest(tmp_path: Path, keep: int) -> None:
    manager = CheckpointManager(tmp_path / "c", keep=keep)
    for step in range(1, 6):
        save(manager, step)
    assert [p.name for p in manager.list()] == [f"step_{s:08d}" for s in range(6 - keep, 6)]
    assert sorted(p.name for p in manager.directory.glob("step_*")) == \
        [p.name for p in manager.list()]
    assert manager.latest() == manager.path_for(5)


def test_steps_sort_numerically(manager: CheckpointManager) -> None:
    for step in (9, 100, 20):
        save(manager, step)
    assert [p.name for p in manager.list()] == ["step_00000009", "step_00000020",
                                                "step_00000100"]


# ------------------------------------------------------------------------------------------
# crashes and stale temporaries
# ------------------------------------------------------------------------------------------


def test_stale_tmp_is_ignored_then_removed(manager: CheckpointManager) -> None:
    save(manager, 1)
    stale = manager.directory / ".tmp_step_00000002_abc"
    stale.mkdir()
    (stale / STUDENT_FILE).write_bytes(b"half")
    (stale / MANIFEST_FILE).write_text("{}")
    assert manager.list() == [manager.path_for(1)]
    assert manager.latest() == manager.path_for(1)
    save(manager, 2)
    assert not stale.exists()
    assert manager.list() == [manager.path_for(1), manager.path_for(2)]


def test_step_dir_without_manifest_is_ignored(manager: CheckpointManager) -> None:
    save(manager, 1)
    half = manager.path_for(2)
    half.mkdir()
    (half / STUDENT_FILE).write_bytes(b"x")
    assert manager.list() == [manager.path_for(1)]
    assert manager.latest() == manager.path_for(1)


class Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["torch.save", "save_file", "manifest"])
def test_crash_during_save_keeps_the_previous_checkpoint(
        manager: CheckpointManager, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    save(manager, 1)
    before = {p.name: p.read_bytes() for p in manager.path_for(1).iterdir()}

    if where == "torch.save":
        def broken(obj: object, f: object, *args: object, **kwargs: object) -> None:
            Path(f).write_bytes(b"partial")  # type: ignore[arg-type]
            raise Crash("disk full")

        monkeypatch.setattr(torch, "save", broken)
    elif where == "save_file":
        def broken_sf(tensors: object, filename: str, metadata: object = None) -> None:
            Path(filename).write_bytes(b"partial")
            raise Crash("disk full")

        monkeypatch.setattr(ckpt, "save_file", broken_sf)
    else:
        real_dumps = json.dumps

        def broken_dumps(obj: object, **kwargs: object) -> str:
            if isinstance(obj, dict) and "files" in obj:
                raise Crash("killed")
            return real_dumps(obj, **kwargs)

        monkeypatch.setattr(json, "dumps", broken_dumps)

    with pytest.raises(Crash):
        save(manager, 2)
    monkeypatch.undo()

    assert not manager.path_for(2).exists()
    assert list(manager.directory.glob(".tmp_*")) == []
    assert manager.list() == [manager.path_for(1)]
    assert manager.latest() == manager.path_for(1)
    assert (manager.directory / "latest").read_text().strip() == "step_00000001"
    assert {p.name: p.read_bytes() for p in manager.path_for(1).iterdir()} == before
    # and the next save works normally
    save(manager, 2)
    assert manager.latest() == manager.path_for(2)


def test_state_with_arbitrary_objects_is_refused_on_load(manager: CheckpointManager) -> None:
    path = manager.save(1, student_state(1), {"step": 1, "obj": Crash("x")}, CONFIG_YAML)
    with pytest.raises(CheckpointError, match="cannot read"):
        load(path)


# ------------------------------------------------------------------------------------------
# verification and fallback
# ------------------------------------------------------------------------------------------


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", [STUDENT_FILE, STATE_FILE, CONFIG_FILE])
def test_flipped_byte_fails_verify_and_latest_falls_back(manager: CheckpointManager,
                                                         name: str) -> None:
    save(manager, 1)
    save(manager, 2)
    flip_byte(manager.path_for(2) / name)
    with pytest.raises(CheckpointError, match="corrupt") as info:
        verify(manager.path_for(2))
    assert name in str(info.value)
    with pytest.raises(CheckpointError):
        load(manager.path_for(2))
    assert manager.latest() == manager.path_for(1)


def test_truncated_file_fails_verify(manager: CheckpointManager) -> None:
    save(manager, 1)
    f = manager.path_for(1) / STUDENT_FILE
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="corrupt"):
        verify(manager.path_for(1))
    assert manager.latest() is None


@pytest.mark.parametrize("name", [STUDENT_FILE, STATE_FILE, CONFIG_FILE])
def test_deleted_file_is_incomplete(manager: CheckpointManager, name: str) -> None:
    save(manager, 1)
    save(manager, 2)
    (manager.path_for(2) / name).unlink()
    with pytest.raises(CheckpointError, match="incomplete") as info:
        verify(manager.path_for(2))
    assert name in str(info.value)
    assert manager.latest() == manager.path_for(1)


@pytest.mark.parametrize("text", ["{not json", "{}", "[]", "null", "{\"files\": []}",
                                  "{\"files\": {}}", "{\"files\": {\"student.safetensors\": 1}}"])
def test_corrupt_manifest(manager: CheckpointManager, text: str) -> None:
    save(manager, 1)
    save(manager, 2)
    (manager.path_for(2) / MANIFEST_FILE).write_text(text)
    with pytest.raises(CheckpointError, match="corrupt"):
        verify(manager.path_for(2))
    assert manager.latest() == manager.path_for(1)


def test_verify_rejects_a_non_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a kd checkpoint"):
        verify(tmp_path)
    with pytest.raises(CheckpointError, match="not a kd checkpoint"):
        load(tmp_path / "missing")


def test_latest_pointer_to_a_missing_dir_falls_back(manager: CheckpointManager) -> None:
    save(manager, 1)
    save(manager, 2)
    (manager.directory / "latest").write_text("step_00000099\n")
    assert manager.latest() == manager.path_for(2)


# ------------------------------------------------------------------------------------------
# atomic writes and file modes
# ------------------------------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    """Run under the usual default umask, whatever the test runner's is."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_write_text_leaves_no_temp_file(tmp_path: Path, umask_022: None) -> None:
    target = tmp_path / "sub" / "latest"
    atomic_write_text(target, "one\n")
    atomic_write_text(target, "two\n")
    assert target.read_text() == "two\n"
    assert [p.name for p in target.parent.iterdir()] == ["latest"]
    assert mode(target) & 0o044 == 0o044


def test_atomic_write_text_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "dir"
    target.mkdir()
    (target / "keep").write_text("x")  # a non-empty directory cannot be replaced by a file
    with pytest.raises(OSError):
        atomic_write_text(target, "text")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir"]
    assert (target / "keep").read_text() == "x"


def test_checkpoint_files_are_world_readable(manager: CheckpointManager, umask_022: None) -> None:
    path = save(manager, 1)
    assert mode(path) & 0o055 == 0o055  # directory readable and listable
    for f in [*path.iterdir(), manager.directory / "latest"]:
        assert mode(f) & 0o044 == 0o044, f"{f.name}: {oct(mode(f))}"


def test_file_modes_follow_a_strict_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        manager = CheckpointManager(tmp_path / "c", keep=2)
        path = save(manager, 1)
        save_weights(tmp_path / "w.safetensors", student_state(1), {})
    finally:
        os.umask(old)
    for f in [path, *path.iterdir(), manager.directory / "latest", tmp_path / "w.safetensors"]:
        assert mode(f) & 0o077 == 0, f"{f.name}: {oct(mode(f))}"


def test_save_weights_round_trip(tmp_path: Path, umask_022: None) -> None:
    base = torch.randn(3, 4)
    state = {"a": base, "a_t": base.t(), "tied": base, "i": torch.arange(5)}
    target = tmp_path / "out" / "student.safetensors"
    save_weights(target, state, {"arch": "vit"})
    loaded = load_file(str(target))
    assert loaded.keys() == state.keys()
    for k in state:
        assert torch.equal(loaded[k], state[k])
    with safe_open(str(target), "pt") as f:
        assert f.metadata() == {"arch": "vit"}
    assert [p.name for p in target.parent.iterdir()] == ["student.safetensors"]
    assert mode(target) & 0o044 == 0o044


def test_save_weights_failure_keeps_the_old_file(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "student.safetensors"
    save_weights(target, {"a": torch.zeros(2)}, {})
    before = target.read_bytes()

    def broken(tensors: object, filename: str, metadata: object = None) -> None:
        Path(filename).write_bytes(b"partial")
        raise Crash("disk full")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(Crash):
        save_weights(target, {"a": torch.ones(2)}, {})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["student.safetensors"]


# ------------------------------------------------------------------ what --checkpoint accepts
@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """A run with checkpoints 10, 20 and 30; best.json names 20."""
    manager = CheckpointManager(tmp_path / "run" / "checkpoints", keep=3)
    for step in (10, 20, 30):
        save(manager, step)
    manager.mark_best(20, "student_top1", 0.9)
    return tmp_path / "run"


def test_find_checkpoint_takes_a_run_its_folder_or_one_checkpoint(run_dir: Path) -> None:
    folder = run_dir / "checkpoints"
    assert ckpt.find_checkpoint(run_dir) == folder / "step_00000030"
    assert ckpt.find_checkpoint(folder) == folder / "step_00000030"
    assert ckpt.find_checkpoint(folder / "step_00000010") == folder / "step_00000010"
    assert ckpt.find_checkpoint(run_dir, best=True) == folder / "step_00000020"
    assert ckpt.find_checkpoint(folder, best=True) == folder / "step_00000020"


def test_find_checkpoint_skips_a_damaged_newest(run_dir: Path) -> None:
    flip_byte(run_dir / "checkpoints" / "step_00000030" / STUDENT_FILE)
    assert ckpt.find_checkpoint(run_dir) == run_dir / "checkpoints" / "step_00000020"


@pytest.mark.parametrize("what, best, needle", [
    ("checkpoints/best.json", False, "--best"),
    ("checkpoints/step_00000010", True, "pass its run directory with --best"),
    ("nowhere", False, "not found"),
    ("empty", False, "nor a run with complete checkpoints"),
])
def test_find_checkpoint_refuses_anything_else(run_dir: Path, what: str, best: bool,
                                               needle: str) -> None:
    (run_dir / "empty").mkdir()
    with pytest.raises(CheckpointError, match=needle):
        ckpt.find_checkpoint(run_dir / what, best=best)


def test_best_needs_a_best_json(tmp_path: Path) -> None:
    save(CheckpointManager(tmp_path / "checkpoints", keep=3), 10)
    with pytest.raises(CheckpointError, match=r"no best\.json"):
        ckpt.find_checkpoint(tmp_path, best=True)


def test_importing_kd_leaves_the_umask_alone() -> None:
    # Reading the umask used to set it to 0 and back at import: a window in which another
    # thread's files were created world-writable.
    code = ("import os\ncalls = []\nreal = os.umask\n"
            "os.umask = lambda mask: calls.append(mask) or real(mask)\n"
            "import kd.core.checkpoint, kd.core.trainer, kd.cli\nprint(calls)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_umask_is_read_without_changing_it() -> None:
    from kd.core.checkpoint import umask

    mask = os.umask(0o027)
    try:
        assert umask() == 0o027 and os.umask(0o027) == 0o027
    finally:
        os.umask(mask)
