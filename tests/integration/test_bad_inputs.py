"""Bad inputs: every row ends a ``kd`` command with exit code 2, one line, nothing half-written.

One table, one row per mistake a user can make: the config and the command line, model names and
arguments, datasets, teacher weights, checkpoints to resume, evaluate or export, and the output
directory (including a disk that fills up while a checkpoint is saved). Each row builds what it
needs under its own ``tmp_path`` (a preset, a broken dataset, a doctored checkpoint), runs the
command and checks the same things:

- the documented exit code (2: a user error; see the README's "Exit codes");
- exactly one stderr line ``kd: error: ...``, which contains the row's words (the setting to fix,
  the file, the reason), and no traceback;
- nothing written under ``tmp_path``: every file and folder as it was before the command (rows
  that fail after a run started check instead what the failure may leave: no temporary files,
  the previous checkpoint intact).

Rows call ``kd.cli.main`` in this process (the same code as the console script minus the
interpreter start-up); rows marked ``cli=True`` run the real ``kd`` in a subprocess, where the
whole of stderr is the subject.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

import kd.core.checkpoint
import kd.errors
from kd.cli import main
from tests.conftest import ROOT, TINY
from tests.integration.conftest import Run, assert_one_line_user_error, kd_cli, train_tiny

pytestmark = pytest.mark.usefixtures("one_thread")

LAST = 16  # the finished run's last step (2 epochs × 8 steps; checkpoints at 8, 12 and 16)


@pytest.fixture(scope="module")
def finished(tiny_teacher: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A finished tiny run, copied by the rows that resume, evaluate or export it."""
    return train_tiny(tiny_teacher, tmp_path_factory.mktemp("finished") / "run")


@dataclass
class Env:
    """What a row's setup gets."""

    tmp: Path
    teacher: str
    finished: Run
    monkeypatch: pytest.MonkeyPatch

    @property
    def out(self) -> Path:
        """The output directory of the row's command."""
        return self.tmp / "run"

    def train(self, *overrides: str) -> list[str]:
        """``kd train`` on configs/tiny.yaml with the tiny teacher, into :attr:`out`."""
        return ["train", "-c", TINY, f"teacher.checkpoint={self.teacher}",
                f"output_dir={self.out}", *overrides]


@dataclass(frozen=True)
class Row:
    """One bad input: the command (train overrides, or a setup returning the argv) and the words
    its error line must contain."""

    args: tuple[str, ...] | Callable[[Env], list[str]]
    mentions: tuple[str, ...]
    code: int = 2
    cli: bool = False  # the real `kd` in a subprocess
    writes: bool = False  # fails after the run started: ``check`` says what may be left
    check: Callable[[Env], None] | None = None  # more checks, after the command


def row(id: str, args: tuple[str, ...] | Callable[[Env], list[str]], *mentions: str,
        **kwargs: Any) -> Any:
    return pytest.param(Row(args, mentions, **kwargs), id=id)


# ------------------------------------------------------------------------------ what rows build
def tiny_entry(env: Env, extra_kwargs: str = "") -> str:
    """The tiny teacher as an entry of ``teachers`` (tiny.yaml's teacher section)."""
    kwargs = "img_size: 16, patch_size: 8, embed_dim: 48, depth: 1, num_heads: 2"
    return (f"{{name: vit_tiny_patch16_224, checkpoint: {env.teacher}, kwargs: {{{kwargs}"
            f"{', ' + extra_kwargs if extra_kwargs else ''}}}}}")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def preset(text: str) -> Callable[[Env], list[str]]:
    """A ``-c`` file with ``text`` (``{tiny}``: configs/tiny.yaml)."""

    def setup(env: Env) -> list[str]:
        path = write(env.tmp / "preset.yaml", text.format(tiny=TINY, tmp=env.tmp))
        return ["train", "-c", str(path), f"teacher.checkpoint={env.teacher}",
                f"output_dir={env.out}"]

    return setup


def image_folder(root: Path, classes: int, per_class: int) -> Path:
    """``root/{train,val}/class<i>/`` with ``per_class`` 16×16 PNGs each (0: empty folders)."""
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (16, 16), (60 * c, 0, 0)).save(folder / f"{i}.png")
    return root


def folder_run(classes: int, per_class: int, *overrides: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        root = image_folder(env.tmp / "images", classes, per_class)
        return env.train("data.name=imagefolder", f"data.root={root}", *overrides)

    return setup


def truncated_shard(env: Env) -> list[str]:
    """A WebDataset shard cut in half (an interrupted copy)."""
    root = env.tmp / "shards"
    root.mkdir()
    for split in ("train", "val"):
        with tarfile.open(root / f"{split}-000000.tar", "w") as tar:
            for i in range(8):
                buf = io.BytesIO()
                Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(buf, format="PNG")
                for name, data in ((f"s{i}.png", buf.getvalue()), (f"s{i}.cls", b"%d" % (i % 4))):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    shard = root / "train-000000.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return env.train("data.name=wds", f"data.root={root}")


def teacher_file(name: str, content: Callable[[Path], None],
                 *overrides: str) -> Callable[[Env], list[str]]:
    """A teacher checkpoint written by ``content``."""

    def setup(env: Env) -> list[str]:
        path = env.tmp / name
        content(path)
        return env.train(f"teacher.checkpoint={path}", *overrides)

    return setup


def tiny_teacher_weights() -> dict[str, torch.Tensor]:
    """Random weights of the tiny teacher's architecture (configs/tiny.yaml teacher.kwargs)."""
    return timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=16, patch_size=8,
                             embed_dim=48, depth=1, num_heads=2).state_dict()


class Exploit:
    """Unpickling this object opens (creates) a file: code execution from a checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


def marker(env: Env) -> Path:
    return env.tmp / "pwned"


def pickle_exploit(env: Env) -> list[str]:
    path = env.tmp / "teacher.pt"
    torch.save({"model": Exploit(marker(env))}, path)
    return env.train(f"teacher.checkpoint={path}")


def exploit_did_not_run(env: Env) -> None:
    assert not marker(env).exists()


def teacher_with_classes(env: Env) -> list[str]:
    """The tiny teacher's architecture (configs/tiny.yaml teacher.kwargs), but 7 classes."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=7, img_size=16, patch_size=8,
                              embed_dim=48, depth=1, num_heads=2)
    path = env.tmp / "teacher7.safetensors"
    save_file(model.state_dict(), str(path))
    return env.train(f"teacher.checkpoint={path}")


def copy_run(env: Env) -> Path:
    """The finished run, copied to :attr:`Env.out`."""
    shutil.copytree(env.finished.dir, env.out)
    return env.out


def checkpoint_dir(env: Env, step: int = LAST) -> Path:
    return env.out / "checkpoints" / f"step_{step:08d}"


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def rewrite_manifest(checkpoint: Path) -> None:
    """Make the manifest match the files again: the damage is then past the checksums."""
    manifest_path = checkpoint / kd.core.checkpoint.MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    for name in manifest["files"]:
        data = (checkpoint / name).read_bytes()
        manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest_path.write_text(json.dumps(manifest))


def doctored(damage: Callable[[Env, Path], None]) -> Callable[[Env], Path]:
    """A copy of the finished run's last checkpoint, damaged, with a manifest that matches."""

    def make(env: Env) -> Path:
        copy_run(env)
        path = checkpoint_dir(env)
        damage(env, path)
        rewrite_manifest(path)
        return path

    return make


def other_weights(env: Env, path: Path) -> None:
    """The student's weights replaced by another architecture's (the tiny teacher: width 48)."""
    shutil.copyfile(env.teacher, path / kd.core.checkpoint.STUDENT_FILE)


def garbage(name: str) -> Callable[[Env, Path], None]:
    def damage(env: Env, path: Path) -> None:
        (path / name).write_bytes(b"\x00\x01 not a tensor file " * 8)

    return damage


def resume(make: Callable[[Env], Path], *overrides: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return env.train(f"checkpoint.resume={make(env)}", *overrides)

    return setup


def resume_run(damage: Callable[[Path], None] | None,
               *overrides: str) -> Callable[[Env], list[str]]:
    """Resume (``checkpoint.resume=auto``) a copy of the finished run, its checkpoints damaged."""

    def setup(env: Env) -> list[str]:
        out = copy_run(env)
        if damage is not None:
            for path in (out / "checkpoints").glob("step_*"):
                damage(path)
        return env.train(*overrides)

    return setup


def flipped(env: Env) -> Path:
    copy_run(env)
    flip_byte(checkpoint_dir(env) / kd.core.checkpoint.STUDENT_FILE)
    return checkpoint_dir(env)


def copied(env: Env) -> Path:
    copy_run(env)
    return checkpoint_dir(env)


def evaluate(make: Callable[[Env], Path], *extra: str) -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return ["eval", "--checkpoint", str(make(env)), *extra]

    return setup


def export(make: Callable[[Env], Path], out: str = "{tmp}/export") -> Callable[[Env], list[str]]:
    def setup(env: Env) -> list[str]:
        return ["export", "--checkpoint", str(make(env)), "--out", out.format(tmp=env.tmp)]

    return setup


def out_under_a_file(name: str, out: str) -> Callable[[Env], list[str]]:
    """``kd eval`` or ``kd export`` of a good checkpoint, ``--out`` inside a file."""

    def setup(env: Env) -> list[str]:
        return [name, "--checkpoint", str(copied(env)), "--out", str(a_file(env) / out)]

    return setup


def not_a_checkpoint(env: Env) -> Path:
    return write(env.tmp / "notes" / "readme.txt", "not a checkpoint").parent


def missing(env: Env) -> Path:
    return env.tmp / "nowhere"


def a_file(env: Env) -> Path:
    return write(env.tmp / "a_file", "x")


def unwritable_parent(env: Env) -> list[str]:
    """output_dir inside a folder without write permission. root ignores the mode bits, so
    there the refusal is simulated where kd creates the folder."""
    locked = env.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    if os.geteuid() == 0:
        real_mkdir = Path.mkdir

        def mkdir(self: Path, mode: int = 0o777, parents: bool = False,
                  exist_ok: bool = False) -> None:
            if locked in self.parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
            real_mkdir(self, mode, parents, exist_ok)

        env.monkeypatch.setattr(Path, "mkdir", mkdir)
    return env.train(f"output_dir={locked / 'run'}")


def disk_full(only: Callable[[Path], bool]) -> Callable[..., None]:
    """A ``safetensors.save_file`` that fails like a full disk for the files ``only`` selects,
    after writing part of the file."""
    real = kd.core.checkpoint.save_file

    def save(tensors: dict[str, torch.Tensor], filename: str, metadata: Any = None) -> None:
        if not only(Path(filename)):
            return real(tensors, filename, metadata=metadata)
        Path(filename).write_bytes(b"\0" * 100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    return save


def full_at_checkpoint(env: Env) -> list[str]:
    """Extend the finished run by an epoch; the disk is full when step 20 is saved."""
    copy_run(env)
    env.monkeypatch.setattr(kd.core.checkpoint, "save_file", disk_full(lambda p: True))
    return env.train("train.epochs=3")


def previous_checkpoint_intact(env: Env) -> None:
    directory = env.out / "checkpoints"
    names = sorted(p.name for p in directory.iterdir())
    steps = [n for n in names if n.startswith("step_")]
    assert set(names) - set(steps) == {"latest", "best.json"}, names  # no temporary files
    assert steps[-3:] == ["step_00000008", "step_00000012", "step_00000016"], names
    manager = kd.core.checkpoint.CheckpointManager(directory, keep=3)
    assert manager.best()["checkpoint"] in steps  # the best one, kept besides the newest 3
    latest = manager.latest()
    assert latest == checkpoint_dir(env)
    kd.core.checkpoint.load(latest)  # verifies and reads


def full_at_final_weights(env: Env) -> list[str]:
    """Two steps and their checkpoint fit; the final student.safetensors does not."""
    env.monkeypatch.setattr(kd.core.checkpoint, "save_file", disk_full(
        lambda p: p.name.startswith(".student.safetensors.tmp")))
    return env.train("train.max_steps=2", "checkpoint.every_steps=0")


def final_weights_not_half_written(env: Env) -> None:
    names = {p.name for p in env.out.iterdir()}
    assert "student.safetensors" not in names and "summary.json" not in names, names
    assert not [n for n in names if n.startswith(".")], names
    manager = kd.core.checkpoint.CheckpointManager(env.out / "checkpoints", keep=3)
    assert manager.latest() == checkpoint_dir(env, 2)


def full_at_summary(env: Env) -> list[str]:
    """The disk fills up as summary.json is written (caught by the CLI, not by
    kd.core.checkpoint)."""
    real = kd.core.checkpoint.atomic_write_text

    def write_text(path: Path, text: str) -> None:
        if path.name == "summary.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, text)

    env.monkeypatch.setattr(kd.core.checkpoint, "atomic_write_text", write_text)
    return env.train("train.max_steps=2", "checkpoint.every_steps=0")


def no_summary(env: Env) -> None:
    assert (env.out / "student.safetensors").is_file()
    assert not (env.out / "summary.json").exists()


def command(name: str, *options: str) -> Callable[[Env], list[str]]:
    """``kd <name>`` on the tiny preset with ``options``."""
    return lambda env: [name, "-c", TINY, f"output_dir={env.out}", *options]


def cache_teacher(*options: str, teacher: bool = True,
                  overrides: tuple[str, ...] = ()) -> Callable[[Env], list[str]]:
    """``kd cache-teacher`` on the tiny preset into ``<tmp>/cache``."""
    return lambda env: ["cache-teacher", "-c", TINY, *(
        [f"teacher.checkpoint={env.teacher}"] if teacher else []), *overrides, "--out",
        str(env.tmp / "cache"), *options]


def not_a_cache(env: Env) -> list[str]:
    write(env.tmp / "cache" / "notes.txt", "mine")
    return cache_teacher()(env)


# ------------------------------------------------------------------------------------ the table
ROWS = [
    # The command line and the -c file.
    row("unknown-key", ("train.epoch=3",), "unknown config key 'train.epoch'", "'train.epochs'"),
    row("unknown-key-cli", ("train.epoch=3",), "unknown config key 'train.epoch'",
        "'train.epochs'", cli=True),
    row("unknown-section", ("trian.epochs=3",), "unknown config key 'trian", "'train"),
    row("unknown-key-in-preset", preset("_base_: {tiny}\ntrain:\n  epoch: 3\n"),
        "preset.yaml", "'train.epoch'", "'train.epochs'"),
    row("section-given-a-value", ("train=3",), "'train' is a section", "train.epochs="),
    row("override-without-equals", ("train.epochs",), "'train.epochs'", "key=value"),
    row("wrong-type-int", ("train.epochs=three",), "'train.epochs'", "three"),
    row("wrong-type-float", ("optim.lr=fast",), "'optim.lr'", "fast"),
    row("wrong-type-list", ("data.scale=big",), "'data.scale'", "expected a list"),
    row("bad-yaml-syntax", preset("data: {{name: [synthetic\n"), "preset.yaml",
        "not valid YAML", "line"),
    row("missing-config-file", lambda env: ["train", "-c", str(env.tmp / "nope.yaml")],
        "config file not found", "nope.yaml"),
    row("preset-not-a-mapping", preset("- train\n- epochs\n"), "preset.yaml", "mapping"),
    row("preset-base-loop", preset("_base_: {tmp}/preset.yaml\n"), "_base_", "loops"),
    # Values: choices, ranges, combinations.
    row("loss-unknown", ("distill.loss=foo",), "'distill.loss'", "'foo'", "soft"),
    row("precision-fp8", ("train.precision=fp8",), "'train.precision'", "'fp8'", "bf16"),
    row("on-error-maybe", ("data.on_error=maybe",), "'data.on_error'", "skip, fail"),
    row("dataset-unknown", ("data.name=imagenet",), "'data.name'", "imagefolder"),
    row("epochs-zero", ("train.epochs=0",), "'train.epochs'", "> 0"),
    row("lr-negative", ("optim.lr=-0.001",), "'optim.lr'", "> 0"),
    row("batch-size-zero", ("data.batch_size=0",), "'data.batch_size'", "> 0"),
    row("grad-accum-zero", ("train.grad_accum_steps=0",), "'train.grad_accum_steps'", "> 0"),
    row("temperature-zero", ("distill.temperature=0",), "'distill.temperature'", "> 0"),
    row("temperature-negative", ("distill.temperature=-2",), "'distill.temperature'"),
    row("alpha-above-one", ("distill.alpha=1.5",), "'distill.alpha'", "[0, 1]"),
    row("num-classes-negative", ("data.num_classes=-3",), "'data.num_classes'"),
    row("workers-negative", ("data.num_workers=-1",), "'data.num_workers'", ">= 0"),
    row("keep-zero", ("checkpoint.keep=0",), "'checkpoint.keep'"),
    row("zero-stage-3", ("dist.zero_stage=3",), "'dist.zero_stage'", "1, 2"),
    row("probability-above-one", ("data.hflip=2",), "'data.hflip'", "[0, 1]"),
    row("odd-batch-with-mixup", ("data.mixup=0.8", "data.batch_size=15"), "'data.batch_size'",
        "even"),
    row("num-classes-in-model-kwargs", ("student.kwargs.num_classes=10",),
        "student.kwargs.num_classes", "data.num_classes"),
    row("mean-of-two-channels", ("student.mean=[0.4,0.6]",), "student.mean", "3 channels"),
    row("std-zero", ("teacher.std=[0]",), "'teacher.std'", "> 0"),
    # Models.
    row("student-name-typo", ("student.name=vit_tiny_patch16_22",), "student.name",
        "'vit_tiny_patch16_22'", "vit_tiny_patch16_224"),
    row("teacher-name-unknown", ("teacher.name=not_a_model",), "teacher.name", "'not_a_model'"),
    row("model-argument-unknown", ("student.kwargs.bogus=1",), "student.kwargs", "bogus"),
    row("image-size-not-a-multiple-of-patch",
        ("data.image_size=20", "student.kwargs.img_size=20", "teacher.kwargs.img_size=20"),
        "data.image_size=20", "patch size 8", "16 or 24"),
    row("student-image-size", ("student.kwargs.img_size=32",), "student.kwargs",
        "data.image_size=16"),
    row("teacher-image-size", ("teacher.image_size=24",), "teacher", "teacher.image_size"),
    row("batch-larger-than-dataset", ("data.batch_size=129",), "data.batch_size", "128"),
    # Feature distillation.
    row("feature-layer-index", ("distill.features=[{{student: 5, teacher: -1}}]",),
        "distill.features[0].student", "not a block", "0 to 0"),
    row("feature-layer-path", ("distill.features=[{{student: -1, teacher: blocks.0.mlpp}}]",),
        "distill.features[0].teacher", "blocks.0.mlpp", "blocks.0.mlp"),
    row("feature-loss-name", ("distill.features=[{{loss: l2}}]",),
        "'distill.features[0].loss'", "cosine, mse, smooth_l1"),
    row("headless-teacher-with-a-logit-loss", ("teacher.kwargs.num_classes=0",
                                               "distill.features=[{{}}]"),
        "'distill.loss'", "headless", "distill.loss=none"),
    row("projector-none-with-other-widths", ("distill.features=[{{}}]", "distill.projector=none"),
        "distill.projector=none", "32 student channels onto 48"),
    row("ema-decay-above-one", ("train.ema_decay=1.5",), "'train.ema_decay'", "(0, 1)"),
    row("best-metric-ema-without-ema", ("checkpoint.best_metric=student_ema_top1",),
        "'checkpoint.best_metric'", "train.ema_decay"),
    row("repeated-aug-zero", ("data.repeated_aug=0",), "'data.repeated_aug'", ">= 1"),
    row("decode-device-without-images", ("data.decode=device",), "'data.decode'",
        "synthetic has no encoded images"),
    row("decode-device-with-timms-pipeline", ("data.name=imagefolder", "data.root={tmp}",
                                              "data.decode=device", "data.pipeline=timm"),
        "'data.decode'", "data.pipeline=kd"),
    row("layer-decay-negative", ("optim.layer_decay=-0.5",), "'optim.layer_decay'", "(0, 1]"),
    row("feature-teacher-index-out-of-range", ("distill.features=[{{teacher_index: 1}}]",),
        "'distill.features[0].teacher_index'", "1 teacher(s)"),
    row("headless-teacher-named-by-no-pair", lambda env: env.train(
        f"teachers=[{tiny_entry(env)}, {tiny_entry(env, 'num_classes: 0')}]"),
        "'teachers[1].kwargs.num_classes'", "no pair"),
    row("teachers-with-a-teacher-cache", ("teachers=[{{}}, {{}}]",
                                          "distill.teacher_cache=/nonexistent"),
        "'teachers'", "distill.teacher_cache"),
    row("a-teacher-of-teachers-without-weights", lambda env: env.train(
        f"teachers=[{tiny_entry(env)}, {{name: resnet10t}}]"), "teachers[1]", "checkpoint"),
    row("soft-without-teacher", ("teacher.checkpoint=null", "distill.loss=soft"),
        "distill.loss=soft", "teacher"),
    # Data.
    row("imagefolder-root-null", ("data.name=imagefolder",), "'data.root'", "train/ and val/"),
    row("imagefolder-root-missing", ("data.name=imagefolder", "data.root={tmp}/nowhere"),
        "data.root", "nowhere", "not found"),
    row("imagefolder-no-train-folder", ("data.name=imagefolder", "data.root={tmp}"),
        "data.root", "'train'"),
    row("imagefolder-empty", folder_run(4, 0), "data.root", "cannot read images", "train"),
    row("imagefolder-class-count", folder_run(3, 2), "data.num_classes=4", "3"),
    row("wds-shard-truncated", truncated_shard, "train-000000.tar", "truncated"),
    row("wds-no-shards", ("data.name=wds", "data.root={tmp}"), "no wds shards", "train"),
    row("wds-shard-missing", ("data.name=wds", "data.train_shards={tmp}/t-{{0..1}}.tar",
                              "data.val_shards={tmp}/v.tar"), "not found", "t-0.tar"),
    # Teacher weights.
    row("teacher-checkpoint-missing", ("teacher.checkpoint={tmp}/missing.safetensors",),
        "teacher.checkpoint", "not found", "missing.safetensors"),
    row("teacher-checkpoint-is-a-folder", ("teacher.checkpoint={tmp}",), "teacher.checkpoint",
        "is a folder", ".safetensors"),
    row("teacher-checkpoint-garbage",
        teacher_file("t.safetensors", lambda p: p.write_bytes(os.urandom(300))),
        "teacher.checkpoint", "cannot read", "t.safetensors"),
    row("teacher-checkpoint-empty", teacher_file("t.pt", lambda p: p.write_bytes(b"")),
        "teacher.checkpoint", "t.pt", "empty"),
    row("teacher-checkpoint-pickle-exploit", pickle_exploit, "teacher.checkpoint",
        "teacher.pt", "Python objects", "state_dict()", check=exploit_did_not_run),
    row("teacher-checkpoint-not-a-state-dict",
        teacher_file("t.pt", lambda p: torch.save([1, 2, 3], p)), "teacher.checkpoint",
        "not a state dict"),
    row("teacher-class-mismatch", ("data.num_classes=3",), "4-class", "data.num_classes=3"),
    row("teacher-class-mismatch-cli", teacher_with_classes, "data.num_classes", "7", cli=True),
    row("teacher-other-architecture", ("teacher.kwargs.embed_dim=32",),
        "teacher.checkpoint", "teacher.kwargs", "shape"),
    # Resume.
    row("resume-missing", ("checkpoint.resume={tmp}/nowhere",), "checkpoint", "not found",
        "nowhere"),
    row("resume-not-a-checkpoint", resume(not_a_checkpoint), "not a kd checkpoint",
        "manifest.json"),
    row("resume-corrupt", resume(flipped), "corrupt", "student.safetensors"),
    row("resume-auto-all-corrupt",
        resume_run(lambda p: flip_byte(p / kd.core.checkpoint.STUDENT_FILE)), "checkpoint",
        "corrupt", "step_00000016"),
    row("resume-other-student-shape", resume_run(None, "student.kwargs.embed_dim=48"),
        "student.kwargs", "shape", "step_00000016"),
    row("resume-none-over-checkpoints", resume_run(None, "checkpoint.resume=none"),
        "already holds checkpoints", "checkpoint.resume=auto"),
    row("resume-weights-unreadable", resume(doctored(garbage(kd.core.checkpoint.STUDENT_FILE))),
        "cannot read", "student.safetensors"),
    row("resume-state-unreadable", resume(doctored(garbage(kd.core.checkpoint.STATE_FILE))),
        "cannot read", "state.pt"),
    # Evaluate and export.
    row("eval-missing", evaluate(missing), "not found", "nowhere"),
    row("eval-not-a-checkpoint", evaluate(not_a_checkpoint), "not a kd checkpoint"),
    row("eval-corrupt", evaluate(flipped), "corrupt", "student.safetensors"),
    row("eval-other-student-shape", evaluate(copied, "student.kwargs.embed_dim=48"),
        "student.kwargs", "shape"),
    row("eval-weights-of-another-model", evaluate(doctored(other_weights)), "student.kwargs",
        "shape"),
    row("eval-out-under-a-file", out_under_a_file("eval", "eval.json"), "--out", "a_file",
        "cannot write"),
    row("export-not-a-checkpoint", export(not_a_checkpoint), "not a kd checkpoint"),
    row("export-corrupt", export(flipped), "corrupt", "student.safetensors"),
    row("export-weights-of-another-model", export(doctored(other_weights)), "student.kwargs",
        "shape"),
    row("export-out-under-a-file", out_under_a_file("export", "student"), "--out", "a_file",
        "cannot write"),
    # Other commands.
    row("tune-loader-prefetch", command("tune-loader", "--prefetch", "a,b"), "--prefetch",
        "integers"),
    row("profile-no-active-steps", command("profile", "--active", "0"), "--active"),
    # The output directory.
    row("output-dir-is-a-file", lambda env: env.train(f"output_dir={a_file(env)}"),
        "output_dir", "a_file"),
    row("output-dir-under-a-file", lambda env: env.train(f"output_dir={a_file(env)}/run"),
        "output_dir", "a_file"),
    row("output-dir-unwritable", unwritable_parent, "output_dir", "locked", "ermission"),
    row("disk-full-saving-a-checkpoint", full_at_checkpoint, "step_00000020",
        "No space left", "intact", "disk", writes=True, check=previous_checkpoint_intact),
    row("disk-full-saving-the-final-weights", full_at_final_weights, "student.safetensors",
        "No space left", "disk", writes=True, check=final_weights_not_half_written),
    # Teacher-output caches (kd cache-teacher, distill.teacher_cache).
    row("cache-without-a-teacher", cache_teacher(teacher=False), "needs a teacher",
        "teacher.checkpoint"),
    row("cache-top-k-zero", cache_teacher("--top-k", "0"), "--top-k 0", "data.num_classes=4"),
    row("cache-top-k-above-classes", cache_teacher("--top-k", "5"), "--top-k 5"),
    row("cache-zero-epochs", cache_teacher("--epochs", "0"), "--epochs 0"),
    row("cache-into-a-folder-of-other-files", not_a_cache, "is not empty", "holds no kd cache"),
    row("train-from-a-missing-cache", ("distill.teacher_cache={tmp}/nowhere",),
        "distill.teacher_cache: folder not found", "kd cache-teacher"),
    row("train-from-a-cache-without-loss", ("distill.teacher_cache={tmp}", "distill.loss=none"),
        "distill.loss", "unset distill.teacher_cache"),
    row("cache-top-k-zero-config", ("distill.cache_top_k=0",), "distill.cache_top_k"),
    # kd plan and kd bench.
    row("plan-unknown-gpu", lambda env: ["plan", "--gpu", "v100"], "--gpu v100", "a100-40gb"),
    row("plan-no-nodes", lambda env: ["plan", "--gpu", "h100", "--nodes", "0"], "--nodes 0"),
    row("bench-not-a-speed-option", lambda env: ["bench", "--set", "train.grad_accum_steps=2"],
        "--set train.grad_accum_steps=2", "train.compile"),
    row("cache-teacher-of-another-size", cache_teacher(overrides=("teacher.image_size=24",)),
        "teacher.image_size", "patch"),
    row("cache-teacher-cannot-take-the-images", cache_teacher(overrides=(
        "data.image_size=24", "student.kwargs.img_size=24")), "teacher", "cannot take"),
    row("cached-run-with-a-teacher-minimum", ("distill.teacher_cache={tmp}",
                                             "distill.require_teacher_top1=0.5"),
        "distill.require_teacher_top1", "never builds the teacher"),
    row("disk-full-writing-the-summary", full_at_summary, "summary.json", "No space left",
        "disk", writes=True, check=no_summary),
    # Newcomer paths: leaving the demo, checkpoints as users pass them, channels.
    row("no-preset-demo-value-named", lambda env: ["train", "data.image_size=32",
                                                   f"output_dir={env.out}"],
        "student.kwargs", "img_size: 16", "from the demo preset kd://presets/demo.yaml",
        "no -c was given"),
    row("no-preset-another-model", lambda env: ["train", "student.name=vit_small_patch16_224",
                                                f"output_dir={env.out}"],
        "data.root", "from the schema defaults", "student.name=vit_small_patch16_224"),
    row("plan-model-cannot-take-the-images", command("plan", "data.image_size=24", "--gpu",
                                                     "h100"), "student.kwargs", "cannot take",
        "data.image_size=24"),
    row("plan-teacher-of-another-size", command("plan", "teacher.image_size=20", "--gpu",
                                                "h100"), "teacher.image_size", "patch"),
    row("bench-bad-teacher-kwargs", lambda env: [
        "bench", "--teacher-kwargs", "{embed_dim: 30, num_heads: 4}", "--image-size", "32"],
        "--teacher-kwargs", "divisible"),
    row("export-best-of-one-checkpoint", lambda env: [
        "export", "--checkpoint", str(copied(env)), "--best", "--out", str(env.tmp / "x")],
        "--best", "run directory"),
    row("eval-best-json-file", lambda env: [
        "eval", "--checkpoint", str(copy_run(env) / "checkpoints" / "best.json")],
        "best.json", "--best"),
    row("export-folder-without-checkpoints", export(lambda env: write(
        env.tmp / "run" / "config.yaml", "seed: 0\n").parent), "nor a run with complete "
        "checkpoints"),
    row("eval-best-without-best-json", lambda env: [
        "eval", "--checkpoint", str(without_best(env)), "--best"], "no best.json"),
    row("rgb-data-for-a-grey-student", folder_run(4, 4, "student.kwargs.in_chans=1"),
        "student.kwargs.in_chans", "3 channels", "takes 1"),
    row("teacher-fits-under-two-prefixes", teacher_file("kd.ckpt", lambda p: torch.save(
        {"state_dict": {f"{part}.{k}": v for part in ("student", "teacher")
                        for k, v in tiny_teacher_weights().items()}}, p)),
        "teacher.checkpoint_prefix", "'student.'", "'teacher.'"),
    row("teacher-checkpoint-key-missing", teacher_file("t.pth", lambda p: torch.save(
        {"state_dict": tiny_teacher_weights(), "epoch": 1}, p), "teacher.checkpoint_key=ema"),
        "teacher.checkpoint_key=ema", "state_dict, epoch"),
    row("grey-data-refused-for-an-rgb-student", (
        "data.name=digits", "data.num_classes=10", "distill.loss=none",
        "teacher.checkpoint=null", "data.grey_to_rgb=false"), "student.kwargs.in_chans",
        "data.grey_to_rgb"),
]


def without_best(env: Env) -> Path:
    """The finished run, copied, without its best.json."""
    (copy_run(env) / "checkpoints" / "best.json").unlink()
    return env.out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``: (size, mtime) of files, (-1, 0) of folders."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file()
            else (-1, 0) for p in root.rglob("*")}


def run_row(r: Row, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run the command; assert the exit code, one error line and no traceback; the line."""
    if r.cli:
        return assert_one_line_user_error(kd_cli(*argv), *r.mentions)
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("kd: error: ")]
    assert rc == r.code, (rc, err[-3000:])
    assert len(errors) == 1, err
    for m in r.mentions:
        assert m in errors[0], (m, errors[0])
    return errors[0]


@pytest.mark.parametrize("r", ROWS)
def test_bad_input(r: Row, tmp_path: Path, tiny_teacher: str, finished: Run,
                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env = Env(tmp_path, tiny_teacher, finished, monkeypatch)
    # Overrides may name files under the row's folder as {tmp}.
    argv = r.args(env) if callable(r.args) else env.train(*(a.format(tmp=tmp_path)
                                                             for a in r.args))
    before = snapshot(tmp_path)
    line = run_row(r, argv, capsys)
    assert len(line) < 1000 and "\x1b" not in line, line  # short, no terminal escapes
    if not r.writes:
        assert snapshot(tmp_path) == before  # nothing created, changed or half-written
    if r.check is not None:
        r.check(env)
    assert not list(tmp_path.rglob(".tmp*")) and not list(tmp_path.rglob("*.tmp*"))


def test_the_table_has_a_row_for_each_kind_of_mistake() -> None:
    ids = [p.id for p in ROWS]
    assert len(ids) == len(set(ids)) >= 30


def test_every_exit_code_is_documented() -> None:
    """The README's "Exit codes" table: 0, 1 (a traceback), 130 (Ctrl-C) and the code of every
    outcome in kd.errors, no more."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    documented = {int(code) for code in re.findall(r"^\| (\d+) \|", section, flags=re.M)}
    defined = {cls.exit_code for cls in vars(kd.errors).values()
               if isinstance(cls, type) and issubclass(cls, Exception) and
               hasattr(cls, "exit_code")}
    assert documented == {0, 1, 130} | defined
