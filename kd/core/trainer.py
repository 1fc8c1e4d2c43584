"""The training loop: a ``Trainer`` whose steps are named after what they do.

Building happens once, in a fixed order: device and distributed → data → models → task →
optimizer → checkpoint (resume) → metrics. A training step is
data → teacher forward → student forward → loss → backward → optimizer, each timed and wrapped
in a range of that name (``kd.core.annotate.annotate``: torch.profiler, NVTX on CUDA, SageMaker
Profiler where present).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from timm.utils import ModelEmaV3
from torch import nn

from kd.config import KDConfig, teacher_key, to_yaml
from kd.core import checkpoint as ckpt
from kd.core.annotate import annotate
from kd.core.dist import DistInfo, all_reduce_sum, barrier, single_process
from kd.core.evaluation import eval_record, teacher_results, val_counts
from kd.core.features import FeatureDistiller
from kd.core.guard import (
    SkipTracker,
    StopRequest,
    ignored_shutdown_timeout,
    report_preemption_save,
)
from kd.core.metrics import build_metrics
from kd.core.models import (
    FrozenTeacher,
    build_input_norm,
    build_student,
    check_model_input,
    describe_mismatch,
)
from kd.core.optim import build_optimizer, build_scheduler
from kd.core.precision import autocast, maybe_enable_tf32, resolve_precision
from kd.core.strategy import build_strategy
from kd.core.task import DistillationTask
from kd.core.teacher_cache import TeacherCache, cache_fields, densify
from kd.core.teachers import (
    TeacherSet,
    build_teachers,
    check_teacher_inputs,
    hold_as_trained,
)
from kd.core.watchdog import report_step
from kd.data.batch import BatchPreparer
from kd.data.pipeline import Ranks, RunData
from kd.data.stream import StreamBatchSampler
from kd.data.subset import SubsetDataset, subset_record
from kd.errors import ConfigError, Preempted, TeacherError, UserError, output_error

log = logging.getLogger("kd")

PHASES = ("data", "teacher_forward", "student_forward", "loss", "backward", "optimizer")
# metrics.jsonl names of the per-step phase times (seconds per optimizer step).
PHASE_KEYS = {"data": "t_data", "teacher_forward": "t_teacher", "student_forward": "t_student_fwd",
              "loss": "t_loss", "backward": "t_backward", "optimizer": "t_optim"}
# What a wrong teacher usually is; named by the teacher check's warning and error.
TEACHER_CAUSES = ("a wrong teacher.checkpoint, inputs normalised unlike the teacher's training "
                  "(teacher.mean/std), a class order or data.num_classes other than the "
                  "teacher's, or a teacher.image_size it was not trained at")


def near_chance(num_classes: int) -> float:
    """The top-1 below which a classifier is "near chance": twice chance (1/num_classes), capped
    at 0.75 so that two classes do not ask for perfection.

    Example:
        >>> near_chance(10), near_chance(2)
        (0.2, 0.75)
    """
    return min(2.0 / num_classes, 0.75)


class PhaseTimer:
    """Per-phase seconds, accumulated between log steps without host synchronisation.

    On CUDA, phases are timed with events read only at :meth:`flush` (a log step); the data phase
    is host time spent waiting for the loader. On CPU, kernels are synchronous and wall time is
    exact.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = dict.fromkeys(PHASES, 0.0)
        self._marks = dict(self.totals)  # totals at the end of the last step (end_step)
        self.pending: list[tuple[str, Any, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str, host: bool = False) -> Iterator[None]:
        with annotate(name):
            if self.cuda and not host:
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                yield
                end.record()
                self.pending.append((name, start, end))
            else:
                t0 = time.perf_counter()
                yield
                self.totals[name] += time.perf_counter() - t0

    def _collect(self) -> None:
        if self.pending:
            torch.cuda.synchronize()
            for name, start, end in self.pending:
                self.totals[name] += start.elapsed_time(end) / 1000.0
            self.pending.clear()

    def end_step(self) -> dict[str, float]:
        """Seconds per phase of the step that just ended (synchronises the GPU once: for
        profiling, not training); :meth:`flush` still counts them."""
        self._collect()
        out = {k: v - self._marks[k] for k, v in self.totals.items()}
        self._marks = dict(self.totals)
        return out

    def flush(self) -> dict[str, float]:
        """Seconds per phase since the last flush (synchronises the GPU once)."""
        self._collect()
        out, self.totals = self.totals, dict.fromkeys(PHASES, 0.0)
        self._marks = dict(self.totals)
        return out


class Interval(NamedTuple):
    """The steps since the last log step: loss terms summed on the device, count, seconds."""

    sums: torch.Tensor
    steps: int
    elapsed: float


class LogInterval:
    """Counts training between log steps without host synchronisation, and the run's total.

    :meth:`add` sums each step's loss terms on the device (steps that were skipped add
    nothing); :meth:`close` hands the interval to a log step; :meth:`restart` leaves time spent
    outside training (saving, evaluating) out of the interval's seconds.
    """

    def __init__(self, device: torch.device, extra: Sequence[str] = ()) -> None:
        # loss, loss_task, loss_kd, grad_norm and the ``extra`` terms (feature losses) summed
        # over the steps that updated the weights, and their number.
        self.names = [*SkipTracker.TERMS, *extra]
        self.sums = torch.zeros(len(self.names) + 1, device=device)
        self.steps = 0
        self.start = time.perf_counter()
        self.train_s, self.steps_total = 0.0, 0  # over the whole run

    def add(self, terms: dict[str, torch.Tensor]) -> torch.Tensor:
        """Count one step's ``terms`` (:meth:`Trainer.train_step`); returns them stacked in
        :attr:`SkipTracker.TERMS` order."""
        values = torch.stack([terms[k] for k in self.names])
        self.sums += torch.where(terms["skipped"], 0.0, torch.cat([values, values.new_ones(1)]))
        self.steps += 1
        return values[:len(SkipTracker.TERMS)]

    def close(self) -> Interval:
        elapsed = time.perf_counter() - self.start
        out = Interval(self.sums.clone(), self.steps, elapsed)
        self.train_s += elapsed
        self.steps_total += self.steps
        self.sums.zero_()
        self.steps, self.start = 0, time.perf_counter()
        return out

    def restart(self) -> None:
        self.start = time.perf_counter()

    def end(self) -> None:
        """At the end of training: count the steps after the last log step."""
        if self.steps:
            self.close()


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    """Distils ``cfg.teacher`` into ``cfg.student``; see :func:`Trainer.train`.

    Example:
        >>> from kd.config import DEMO_PRESET, load_config
        >>> trainer = Trainer(load_config(DEMO_PRESET, ["train.max_steps=20"]))  # doctest: +SKIP
        >>> summary = trainer.train()  # doctest: +SKIP
    """

    def __init__(self, cfg: KDConfig, info: DistInfo | None = None) -> None:
        """Build the run.

        Args:
            cfg: the validated config (:func:`kd.config.load_config`).
            info: this process's place in the job, from :func:`kd.core.dist.process_group`
                (which owns the process group); None: this process alone
                (:func:`kd.core.dist.single_process`).
        """
        self.cfg = cfg
        tc = cfg.train
        # 1. Device and process group (opened by the caller).
        self.dist: DistInfo = info if info is not None else single_process(tc.device)
        self.device = self.dist.device
        self.precision = resolve_precision(tc.precision, self.device)
        maybe_enable_tf32(self.device, tc.tf32)
        # 2. Data.
        self._build_data()
        # 3. Models: the same seed on every rank gives the same student initialisation.
        torch.manual_seed(cfg.seed)
        student = build_student(cfg.student, cfg.data.num_classes)
        self.student_norm = build_input_norm(student, cfg.student.mean, cfg.student.std,
                                             "student").to(self.device)
        # Training from a teacher-output cache never builds the teacher.
        teachers = None if self.cache else build_teachers(cfg)
        self._check_models(student, teachers)
        self.student_core = student.to(self.device).train()
        self.teachers = teachers.to(self.device) if teachers is not None else None
        self._speed_up_models()
        # Feature pairs: the student's projectors train with it, in one module.
        self.features = self._build_features() if cfg.distill.features else None
        trainable = (self.features.student_module(self.student_core).to(self.device)
                     if self.features is not None else self.student_core)
        # 4. Optimizer and schedule, then the strategy that wraps only the student (DDP, ZeRO or
        #    DeepSpeed); the teacher stays a frozen replica on every rank.
        ddp_zero_world = self.dist.world_size if cfg.dist.strategy == "ddp" else 1
        optimizer = build_optimizer(trainable, cfg.optim, ddp_zero_world)
        self.scheduler = build_scheduler(optimizer, cfg.sched, self.total_steps,
                                         self.steps_per_epoch)
        self.strategy = build_strategy(trainable, optimizer, self.dist, cfg.dist,
                                       self.precision, grad_clip=cfg.optim.grad_clip,
                                       micro_batch=cfg.data.batch_size,
                                       grad_accum_steps=tc.grad_accum_steps)
        self.optimizer = self.strategy.optimizer
        # The student's EMA (train.ema_decay): of the unwrapped student, on its device.
        self.ema = ModelEmaV3(self.student_core, decay=tc.ema_decay,
                              use_warmup=tc.ema_warmup) if tc.ema_decay is not None else None
        torch.manual_seed(cfg.seed + self.dist.rank)  # per-rank dropout / drop-path streams
        # 5. Task: forward passes and loss terms.
        # With Mixup/CutMix, label smoothing is applied to the mixed targets by Mixup itself
        # (except with a transfer set: see kd.data.batch).
        smoothing = 0.0 if self.preparer.smooths_targets else tc.label_smoothing
        self.task = DistillationTask(self.strategy.model, self.student_norm, self.teachers,
                                     cfg.distill, smoothing, student_core=self.student_core,
                                     cached_teacher=self.cache is not None,
                                     features=self.features)
        # 6. Checkpoints and resume.
        self.output_dir = Path(cfg.output_dir)
        self.checkpoints = ckpt.CheckpointManager(self.output_dir / "checkpoints",
                                                  cfg.checkpoint.keep)
        self.step = 0  # optimizer steps taken; advanced by train_step only
        self.n_bad_samples = 0  # unreadable samples skipped by this rank (data.on_error=skip)
        self._bad_logged: set[str] = set()
        self._saved_step = -1  # step of the newest checkpoint this process wrote
        self._last_eval: dict[str, Any] = {}
        self._last_teachers: list[dict[str, Any]] = []  # each teacher's name and top-1
        self.teacher_top1_before: float | None = None  # see check_teacher; kept on resume
        self.skips = SkipTracker(self.device, cfg.train.max_skipped_steps)
        self._maybe_resume(cfg.checkpoint.resume)
        self._best_top1 = self._best_so_far()
        if self.scheduler is not None:
            self.scheduler.step_update(self.step)
        self.timer = PhaseTimer(self.device)

    # ----------------------------------------------------------------------------- building
    def _build_data(self) -> None:
        cfg, info = self.cfg, self.dist
        self.data = RunData(cfg.data, cfg.student.channels, cfg.seed,
                            Ranks(info.rank, info.world_size, info.local_world_size),
                            pin_memory=self.device.type == "cuda",
                            grad_accum_steps=cfg.train.grad_accum_steps)
        self.data.check_steps()
        self.train_set, self.val_set = self.data.train_set, self.data.val_set
        self.cache: TeacherCache | None = None
        if cfg.distill.teacher_cache:  # its rows replay the recorded augmentation seeds
            fields = cache_fields(cfg.data, cfg.teacher, cfg.seed, cfg.student.channels,
                                  len(self.train_set), info.world_size)
            self.cache = TeacherCache.open(cfg.distill, fields, cfg.teacher.checkpoint)
        self.num_workers = self.data.num_workers
        self.train_loader = self.data.train_loader(
            recorded_seeds=self.cache.seeds if self.cache else None)
        self.val_loader = self.data.val_loader()
        self.preparer = BatchPreparer(cfg.data, cfg.seed, info.rank, self.device,
                                      cfg.train.label_smoothing)
        self.steps_per_epoch = self.data.steps_per_epoch
        self.global_batch = self.data.global_batch  # images per optimizer step, all ranks
        epoch_steps = cfg.train.epochs * self.steps_per_epoch
        max_steps = cfg.train.max_steps
        self.total_steps = min(epoch_steps, max_steps) if max_steps else epoch_steps
        if self.cache is not None:
            self.cache.check_epochs(-(-self.total_steps // self.steps_per_epoch))

    @property
    def teacher(self) -> FrozenTeacher | None:
        """The first teacher (the only one in most runs)."""
        return self.teachers[0] if self.teachers is not None else None

    def data_epoch(self, epoch: int) -> int:
        """The epoch of the data order (and augmentation) training epoch ``epoch`` reads: itself,
        or the cached epoch it replays (``distill.cache_cycle``)."""
        return self.cache.data_epoch(epoch) if self.cache is not None else epoch

    def _check_models(self, student: nn.Module, teachers: TeacherSet | None) -> None:
        """Fail before training, with the config key to fix, if a model cannot take the data."""
        image = self.train_set[0][0][None]
        cfg = self.cfg
        check_model_input(student, self.student_norm, image, section="student",
                          name=cfg.student.name, image_size=cfg.data.image_size,
                          grey_to_rgb=cfg.data.grey_to_rgb)
        if teachers is not None:
            check_teacher_inputs(cfg, teachers, image)

    def _speed_up_models(self) -> None:
        """The teacher's weights in the training dtype (``teacher.dtype``); ``train.compile``
        compiles both models in place, before the strategy wraps the student."""
        cfg = self.cfg
        teachers = list(self.teachers or [])
        if self.teachers is not None:
            for line in hold_as_trained(cfg, self.teachers, self.precision):
                log.info(line)
        if cfg.train.compile:
            mode = cfg.train.compile_mode
            self.student_core.compile(mode=mode)
            for teacher in teachers:
                teacher.model.compile(mode=mode)
            log.info("train.compile: student%s compiled (mode %s); the first steps compile",
                     " and teacher" + "s" * (len(teachers) > 1) if teachers else "", mode)
            if any(isinstance(layer, int) for p in cfg.distill.features
                   for layer in (p.student, p.teacher)):
                log.warning("train.compile: feature pairs with block indices run the models "
                            "through forward_intermediates, which compile does not cover: "
                            "those forwards run eagerly")

    def _build_features(self) -> FeatureDistiller:
        """The feature pairs, sized with one training image (an impossible pair fails here)."""
        cfg = self.cfg
        if self.teachers is None:
            raise ConfigError("distill.features needs a teacher: set teacher.checkpoint or "
                              "teacher.pretrained=true")
        image = self.train_set[0][0][None].to(self.device)
        return FeatureDistiller(cfg.distill.features, cfg.distill.projector, self.student_core,
                                [t.model for t in self.teachers], self.student_norm(image),
                                self.teachers.inputs(image),
                                (cfg.student.name, self.teachers.names))

    def _restore_stream_slots(self, saved: int | None) -> None:
        """A streamed split resumes exactly only with the readers that began its epoch."""
        sampler = self.train_loader.batch_sampler
        if saved is None or not isinstance(sampler, StreamBatchSampler) or saved == sampler.slots:
            return
        log.warning("data.stream: keeping the checkpoint's %d readers per rank (this run has %d "
                    "loader workers) so that the data order continues exactly; reading costs "
                    "more unless data.num_workers=%d", saved, self.num_workers, saved)
        self.train_loader = self.data.train_loader(stream_slots=saved)

    def _maybe_resume(self, resume: str) -> None:
        if resume == "none":
            existing = self.checkpoints.list()
            if existing:  # a fresh run here would interleave its checkpoints with the old run's
                raise UserError(
                    f"output_dir {self.output_dir} already holds checkpoints (newest: "
                    f"{existing[-1].name}) and checkpoint.resume=none starts a new run: choose "
                    f"another output_dir, delete {self.checkpoints.directory}, or resume with "
                    f"checkpoint.resume=auto")
            return
        path = self.checkpoints.resumable() if resume == "auto" else Path(resume)
        if self.dist.is_distributed:  # rank 0 decides, so every rank resumes from the same one
            choice = [str(path) if path is not None else None]
            dist.broadcast_object_list(choice, src=0)
            path = Path(choice[0]) if choice[0] is not None else None
        if path is None:
            return
        student_state, state, _ = ckpt.load(path)
        if bool(state.get("sharded")) != self.strategy.sharded_checkpoint:
            raise UserError(f"checkpoint {path} was written with another dist.strategy; resume "
                            f"it with the strategy that wrote it")
        self._restore_stream_slots(state.get("stream_slots"))
        saved_batch = state.get("global_batch", self.global_batch)
        if saved_batch != self.global_batch:
            log.warning("resuming with a global batch of %d images per step (checkpoint: %d): "
                        "the step count carries over, the position in the epoch is "
                        "approximate", self.global_batch, saved_batch)
        mismatch = describe_mismatch(self.student_core.state_dict(), student_state)
        if mismatch:
            raise UserError(f"checkpoint {path} does not fit student.name/student.kwargs: "
                            f"{mismatch}")
        self._load_projectors(state, path)
        if self.ema is not None:
            if "ema" not in state:
                raise UserError(f"checkpoint {path} holds no EMA of the student (it was written "
                                f"without train.ema_decay): resume it without train.ema_decay")
            self.ema.module.load_state_dict(state["ema"])
        try:
            self.student_core.load_state_dict(student_state)
            self.strategy.load_state_dict(state, path)
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(f"checkpoint {path} does not match this config's optimizer "
                            f"(optim.*): {str(e).splitlines()[0]}") from None
        # The schedule is not restored from the checkpoint: it is a function of the step, and
        # rebuilding it from this config (step_update below) keeps an extended run (more
        # train.epochs) on its new schedule.
        rng = state["rng"]
        if len(rng) == self.dist.world_size:
            _set_rng_state(rng[self.dist.rank])
        self.step = self._saved_step = int(state["step"])
        self.teacher_top1_before = state.get("teacher_top1_before")
        self.skips = SkipTracker(self.device, self.cfg.train.max_skipped_steps,
                                 int(state.get("n_skipped_steps", 0)),
                                 int(state.get("skip_streak", 0)))
        log.info("resumed from %s at step %d", path, self.step)

    # ----------------------------------------------------------------------------- training
    def train(self, *, evaluate: bool = True, save: bool = True, steps: int | None = None,
              on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
        """Train to ``total_steps`` (or ``steps`` more), evaluating and checkpointing on the way.

        Args:
            evaluate: check the teacher before training (:meth:`check_teacher`), evaluate
                every ``train.eval_every_epochs`` and at the end.
            save: write checkpoints, the final student and ``summary.json``.
            steps: train exactly this many optimizer steps from the current one (a profile),
                instead of up to ``total_steps``.
            on_step: called after every optimizer step (a profiler steps its schedule there,
                and reads the step's phase times with ``trainer.timer.end_step()``).

        Returns:
            The summary (also written to ``summary.json`` when ``save``).
        """
        cfg = self.cfg
        t_start = time.perf_counter()
        until = self.step + steps if steps is not None else self.total_steps
        if self.cache is not None:  # before output_dir exists: read (and verify) the rows of
            self.cache.seeds(self.data_epoch(self.step // self.steps_per_epoch))  # 1st epoch
        if evaluate:  # likewise: a teacher that fails leaves nothing written
            self.check_teacher()
        if self.dist.is_main:
            self._write_run_files()
        metrics = build_metrics(self.output_dir, self.dist.is_main, until, self.step,
                                log_phases=cfg.train.log_phases)
        log_steps = LogInterval(self.device, self.task.term_names)
        stop = StopRequest(self.dist.is_distributed, cfg.dist.timeout_s, device=self.device)
        if self.dist.is_main and (ignored := ignored_shutdown_timeout()):
            log.warning(ignored)
        try:
            while self.step < until:
                epoch, done = divmod(self.step, self.steps_per_epoch)
                self.train_loader.batch_sampler.set_epoch(
                    self.data_epoch(epoch), start_batch=done * cfg.train.grad_accum_steps)
                batches = iter(self.train_loader)
                for _ in range(min(self.steps_per_epoch - done, until - self.step)):
                    terms = self.train_step(batches)
                    values = log_steps.add(terms)
                    report_step(self.step)  # for the heartbeats (kd.core.watchdog)
                    self.skips.update(self.step, terms["skipped"], values)
                    if on_step is not None:
                        on_step(self)
                    if self.step % cfg.train.log_every == 0 or self.step == until:
                        skipped = self.skips.check()  # raises after too many in a row
                        metrics.log(self._train_record(log_steps.close(), until, skipped))
                    every = cfg.checkpoint.every_steps
                    if save and every and self.step % every == 0:
                        self.save_checkpoint()
                        log_steps.restart()  # saving is not training time
                    if stop.should_stop():
                        self._stop_for(stop, save)
                epoch_done = self.step % self.steps_per_epoch == 0
                if evaluate and epoch_done and (epoch + 1) % cfg.train.eval_every_epochs == 0:
                    self._evaluate_and_keep(metrics, epoch + 1, save)
                    log_steps.restart()
            log_steps.end()  # steps since the last log line (max_steps not on a log step)
            if evaluate and self._last_eval.get("step") != self.step:
                self._evaluate_and_keep(metrics, -(-self.step // self.steps_per_epoch), save)
            if save and self._saved_step != self.step:
                self.save_checkpoint()
        finally:
            stop.close()
            metrics.close()
        summary = self._summary(time.perf_counter() - t_start, log_steps)
        if save and self.dist.is_main:
            ckpt.save_weights(self.output_dir / "student.safetensors",
                              self.student_core.state_dict(),
                              {"name": cfg.student.name, "step": str(self.step)})
            ckpt.atomic_write_text(self.output_dir / "summary.json",
                                   json.dumps(summary, indent=2) + "\n")
        return summary

    def _write_run_files(self) -> None:
        """Rank 0, before the first step: the run's config (and its labelled subset)."""
        cfg = self.cfg
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.atomic_write_text(self.output_dir / "config.yaml", to_yaml(cfg))
            images = self.data.train_images
            labelled = getattr(images, "labelled", images)  # transfer set
            if isinstance(labelled, SubsetDataset):
                ckpt.atomic_write_text(self.output_dir / "labelled_subset.json",
                                       subset_record(labelled, cfg.data))
        except OSError as e:
            raise output_error(f"output_dir {cfg.output_dir}: cannot create it or write "
                               f"config.yaml into it", e) from None

    def _stop_for(self, stop: StopRequest, save: bool) -> None:
        """A stop signal (preemption): save a checkpoint, then end the run with Preempted."""
        t_save = time.perf_counter()
        path = self.save_checkpoint() if save else None
        if path is not None:
            log.warning(report_preemption_save(time.perf_counter() - t_save))
        raise Preempted(stop.signal_name or "a stop signal", self.step,
                        str(path) if path else None)

    def _evaluate_and_keep(self, metrics: Any, epoch: int, save: bool) -> None:
        metrics.log(self.evaluate(epoch))
        if save:
            self._keep_if_best()

    def _summary(self, wall_s: float, log_steps: LogInterval) -> dict[str, Any]:
        final = self._last_eval
        train_s, images = log_steps.train_s, log_steps.steps_total * self.global_batch
        return {
            **{k: final.get(k) for k in ("student_top1", "student_top5", "teacher_top1",
                                         "agreement")},
            **({k: final.get(k) for k in ("student_ema_top1", "student_ema_top5")}
               if self.ema is not None else {}),
            "teachers": self._last_teachers,
            "teacher_top1_before": self.teacher_top1_before,
            "steps": self.step, "epochs": round(self.step / self.steps_per_epoch, 3),
            "wall_s": round(wall_s, 3),
            "img_per_s": round(images / train_s, 2) if train_s > 0 else None,
            "world_size": self.dist.world_size, "backend": self.dist.backend,
            "precision": self.precision,
            "n_bad_samples": self.total_bad_samples(),
            "n_skipped_steps": self.skips.check(),
            "output_dir": str(self.output_dir),
        }

    def train_step(self, batches: Iterator) -> dict[str, torch.Tensor]:
        """Optimizer step ``step + 1`` over ``train.grad_accum_steps`` micro-batches of
        ``batches``; advances :attr:`step`, and returns the mean loss terms, ``skipped`` and
        ``grad_norm`` as detached device tensors (no host synchronisation)."""
        accum = self.cfg.train.grad_accum_steps
        timer, task = self.timer, self.task
        totals: dict[str, torch.Tensor] = {}
        epoch_float = self.step / self.steps_per_epoch
        epoch, done = divmod(self.step, self.steps_per_epoch)
        data_epoch = self.data_epoch(epoch)
        for micro in range(accum):
            with timer.phase("data", host=True):
                images, targets, bad, *index = next(batches)
                if bad:
                    self._count_bad(bad)
                cached = self._cached_logits(data_epoch, index[0]) if self.cache else None
                batch = self.preparer(images, targets, data_epoch, done * accum + micro)
                x_student, x_teacher = task.prepare(batch.images)
            last = micro == accum - 1
            with self.strategy.maybe_no_sync(last):
                with self._autocast():
                    with timer.phase("teacher_forward"):
                        teacher_logits = cached if self.cache else task.teacher_forward(x_teacher)
                    with timer.phase("student_forward"):
                        student_out = task.student_forward(x_student)
                    with timer.phase("loss"):
                        terms = task.loss(student_out, teacher_logits, batch.targets,
                                          epoch_float, batch.share)
                with timer.phase("backward"):
                    self.strategy.backward(terms["loss"], accum, last)
            for k, v in terms.items():
                totals[k] = totals[k] + v.detach() / accum if k in totals else v.detach() / accum
        with timer.phase("optimizer"):
            totals["skipped"], totals["grad_norm"] = self.optimizer_step(totals["loss"])
            if self.ema is not None:  # on the device; the decay is a host number of the step
                self.ema.update(self.student_core, step=self.step + 1)
        self.step += 1
        return totals

    def _cached_logits(self, data_epoch: int, index: torch.Tensor) -> torch.Tensor:
        """The teacher's logits for a batch, rebuilt on the device from the cache's top-K."""
        assert self.cache is not None
        values, indices, rest = self.cache.lookup(data_epoch, index)
        to = {"device": self.device, "non_blocking": True}
        return densify(values.to(**to), indices.to(**to), rest.to(**to),
                       self.cfg.data.num_classes)

    def total_bad_samples(self) -> int:
        """Unreadable samples skipped so far, summed over ranks (a collective: call on all)."""
        count = torch.tensor([float(self.n_bad_samples)], device=self.device)
        return int(all_reduce_sum(count).item())

    def _count_bad(self, bad: list[str]) -> None:
        """Count unreadable samples (replaced by readable ones); name the first few."""
        for description in bad:
            if len(self._bad_logged) < 5 and description not in self._bad_logged:
                self._bad_logged.add(description)
                log.warning("rank %d: skipped unreadable sample %s", self.dist.rank, description)
        self.n_bad_samples += len(bad)

    def optimizer_step(self, loss: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Step the optimizer through the strategy (clipping, scaling, skipping a non-finite
        step), advance the schedule; returns ``(skipped, grad_norm)`` as device tensors."""
        skipped, norm = self.strategy.step(loss)
        if self.scheduler is not None:
            self.scheduler.step_update(self.step + 1)
        return skipped, norm

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.device, self.precision)

    def _train_record(self, interval: Interval, until: int, n_skipped: int) -> dict[str, Any]:
        """A metrics record for a log step; the only place training synchronises with the host."""
        times = self.timer.flush()
        sums, steps, elapsed = interval
        # Means over the steps that updated the weights (NaN, logged as null, if none did).
        means = torch.where(sums[-1] > 0, sums[:-1] / sums[-1].clamp(min=1), float("nan"))
        values = torch.cat([means, torch.tensor([times[p] / steps for p in PHASES],
                                                device=sums.device)])
        values = all_reduce_sum(values) / self.dist.world_size  # mean over ranks
        v = [x if math.isfinite(x) else None for x in values.tolist()]
        extra = self.task.term_names
        img_per_s = steps * self.global_batch / elapsed if elapsed > 0 else 0.0
        record: dict[str, Any] = {
            "step": self.step, "epoch": round(self.step / self.steps_per_epoch, 4),
            "loss": v[0], "loss_task": v[1], "loss_kd": v[2],
            **{name: v[4 + i] for i, name in enumerate(extra)},
            # The schedule's value: the largest group's (layer decay scales the others down).
            "lr": max(g["lr"] for g in self.optimizer.param_groups), "img_per_s": img_per_s,
        }
        if self.cfg.train.log_lr_groups:
            record.update({f"lr_group_{i}": g["lr"]
                           for i, g in enumerate(self.optimizer.param_groups)})
        record["grad_norm"] = v[3]
        phases = 4 + len(extra)
        record.update({PHASE_KEYS[p]: v[phases + i] for i, p in enumerate(PHASES)})
        record["eta_s"] = (until - self.step) * elapsed / steps
        record["n_bad_samples"] = self.total_bad_samples()
        record["n_skipped_steps"] = n_skipped
        return record

    # --------------------------------------------------------------------------- evaluation
    def _val_counts(self, student: bool = True) -> list[float]:
        return val_counts(self.task, self.val_loader, self.device, self.precision,
                          self.cfg.data.num_classes, student=student, on_bad=self._count_bad,
                          ema=self.ema.module if self.ema is not None and student else None)

    def evaluate(self, epoch: int) -> dict[str, Any]:
        """Student top-1/top-5, teacher top-1 and student–teacher top-1 agreement on val."""
        counts = self._val_counts()
        self._last_teachers = teacher_results(self.task, counts)
        record = eval_record(counts, self.step, epoch, self.task.teacher_predicts,
                             self._last_teachers, ema=self.ema is not None)
        self._last_eval = record
        return record

    def check_teacher(self) -> float | None:
        """Before training: the teacher's top-1 on val (one pass, the teacher alone), logged and
        kept as ``teacher_top1_before``; returns it.

        Near chance (:func:`near_chance`) is a warning naming the likely causes; below
        ``distill.require_teacher_top1`` it is a :class:`~kd.errors.TeacherError`. Every rank
        gets the same all-reduced number, so all warn or stop together. Skipped silently without
        a teacher; skipped, saying why, with ``distill.check_teacher=false``, when training does
        not run the teacher (``distill.loss=none``) and on resume (the number from the run's
        start is kept in its checkpoints).
        """
        distill = self.cfg.distill
        if self.cache is not None:
            log.info("teacher check skipped: training from distill.teacher_cache (the teacher "
                     "is not built)")
            return None
        if self.teacher is None:  # labels only: nothing to check, nothing to say
            return None
        skip = ("the teacher is headless (kwargs.num_classes=0): it has no classes to check"
                if not self.teachers.predicts else
                "distill.check_teacher=false" if not distill.check_teacher else
                "the teacher does not run in training (distill.loss=none)"
                if not self.task.uses_teacher else
                f"resuming at step {self.step}" if self.step > 0 else None)
        if skip is not None:
            before = self.teacher_top1_before
            log.info("teacher check skipped: %s%s", skip, "" if before is None else
                     f" (teacher top-1 before training was {before:.4f})")
            return before
        t0, rng = time.perf_counter(), _rng_state()
        counts = self._val_counts(student=False)
        _set_rng_state(rng)  # iterating a loader draws a seed: training stays as without the check
        n = counts[0]
        several = len(self.teachers) > 1
        for i, result in enumerate(teacher_results(self.task, counts)):
            if result["top1"] is not None:  # a headless teacher has no classes to check
                self._check_teacher_top1(result["top1"], n, teacher_key(self.cfg, i) + (
                    f" ({result['name']})" if several else ""), time.perf_counter() - t0)
        self.teacher_top1_before = counts[3] / n
        if several:
            log.info("teachers' mixture top-1 before training: %.4f", self.teacher_top1_before)
        return self.teacher_top1_before

    def _check_teacher_top1(self, top1: float, n: float, who: str, seconds: float) -> None:
        """Log one teacher's top-1 before training; stop below ``distill.require_teacher_top1``,
        warn near chance."""
        num_classes = self.cfg.data.num_classes
        required = self.cfg.distill.require_teacher_top1
        if required is not None and top1 < required:  # the error line alone says it all
            raise TeacherError(f"distill.require_teacher_top1={required}: the {who}'s top-1 on "
                               f"the validation split is {top1:.4f} before training (chance "
                               f"{1 / num_classes:.4f}); likely causes: {TEACHER_CAUSES} (or "
                               f"lower distill.require_teacher_top1)")
        log.info("%s top-1 before training: %.4f on %d val images (chance %.4f; %.2f s)",
                 who, top1, n, 1 / num_classes, seconds)
        if top1 < near_chance(num_classes) and self.dist.is_main:
            log.warning("WARNING: the %s's top-1 before training is %.4f, near chance "
                        "(%.4f with data.num_classes=%d): distilling it teaches the student "
                        "noise. Likely causes: %s. Set distill.require_teacher_top1 to stop "
                        "instead.", who, top1, 1 / num_classes, num_classes, TEACHER_CAUSES)

    # --------------------------------------------------------------------------- checkpoints
    def _best_so_far(self) -> float:
        """The best student top-1 among this run's checkpoints (rank 0's view, on every rank)."""
        best = self.checkpoints.best() if self.dist.is_main else None
        metric = self.cfg.checkpoint.best_metric
        value = [float(best[metric]) if best and metric in best else float("-inf")]
        if self.dist.is_distributed:
            dist.broadcast_object_list(value, src=0)
        return value[0]

    def _keep_if_best(self) -> None:
        """After an evaluation: a new best ``checkpoint.best_metric`` gets a checkpoint that
        pruning keeps (``checkpoint.keep`` newest plus the best). Every rank calls it; they
        agree, since the evaluation's numbers are all-reduced."""
        metric = self.cfg.checkpoint.best_metric
        top1 = self._last_eval.get(metric)
        if top1 is None or top1 <= self._best_top1:
            return
        if self._saved_step != self.step:
            self.save_checkpoint()
        self._best_top1 = top1
        if self.dist.is_main:
            self.checkpoints.mark_best(self.step, metric, top1)

    def _projector_state(self) -> dict[str, Any]:
        """The feature pairs' projectors, saved beside the student (``student.safetensors``
        stays the student alone, as ``kd export`` exports it)."""
        if self.features is None:
            return {}
        return {"projectors": {k: v.detach().cpu() for k, v in
                               self.features.projectors.state_dict().items()}}

    def _load_projectors(self, state: dict[str, Any], path: Path) -> None:
        saved = state.get("projectors")
        if (saved is None) != (self.features is None):
            how = "without" if saved is None else "with"
            raise UserError(f"checkpoint {path} was written {how} distill.features: resume it "
                            f"with the distill.features that wrote it")
        if self.features is not None:
            mismatch = describe_mismatch(self.features.projectors.state_dict(), saved)
            if mismatch:
                raise UserError(f"checkpoint {path} does not fit distill.features/"
                                f"distill.projector: {mismatch}")
            self.features.projectors.load_state_dict(saved)

    def save_checkpoint(self) -> Path | None:
        """Every rank takes part (RNG states are gathered); rank 0 writes."""
        state = {"step": self.step, "global_batch": self.global_batch,
                 "sharded": self.strategy.sharded_checkpoint, "rng": [_rng_state()],
                 "stream_slots": getattr(self.train_loader.batch_sampler, "slots", None),
                 "teacher_top1_before": self.teacher_top1_before,
                 **self._projector_state(),
                 **({"ema": {k: v.detach().cpu() for k, v in
                             self.ema.module.state_dict().items()}} if self.ema else {}),
                 **self.skips.state(),
                 **self.strategy.state_dict()}
        if self.dist.is_distributed:
            gathered: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(gathered, state["rng"][0])
            state["rng"] = gathered
        tmp = self.checkpoints.begin(self.step) if self.dist.is_main else None
        if self.strategy.sharded_checkpoint:  # every rank writes its shard into rank 0's tmp
            if self.dist.is_distributed:
                shared = [str(tmp) if tmp else None]
                dist.broadcast_object_list(shared, src=0)
                tmp = Path(shared[0])
            self.strategy.save_sharded(tmp / "deepspeed")
            barrier()
        path = None
        if self.dist.is_main:
            path = self.checkpoints.commit(tmp, self.step, self.student_core.state_dict(), state,
                                           to_yaml(self.cfg))
        self._saved_step = self.step
        return path
