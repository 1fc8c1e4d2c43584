"""The configuration schema, its merge order and its validation.

One typed tree of dataclasses. Every field carries its documentation in ``metadata["doc"]``; the
README's configuration reference is generated from it (``kd config --reference``) and a test keeps
the two in sync.

Merge order: schema defaults ← ``-c preset.yaml`` (only what differs) ← dotted CLI overrides
(``train.epochs=3 distill.temperature=2``). A preset may start from another with
``_base_: other.yaml`` (relative to the preset, or ``kd://`` inside the package). The schema's
defaults suit an ImageNet-style job. A ``kd`` command without ``-c`` starts from the embedded
digits demo preset (:data:`DEMO_PRESET`), unless its overrides name another dataset or model
(:data:`DEMO_SWITCH_KEYS`): then from the schema defaults (:func:`load_command_config`), and an
error about a value the user did not type says where it came from (:class:`ConfigOrigins`).

Example:
    >>> from kd.config import load_config
    >>> cfg = load_config(DEMO_PRESET, ["train.epochs=2", "distill.loss=hard"])
    >>> cfg.data.name, cfg.train.epochs, cfg.distill.loss
    ('digits', 2, 'hard')
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from kd.errors import ConfigError, UserError

log = logging.getLogger("kd")

def _field(default: Any, doc: str) -> Any:
    """A dataclass field with its documentation; mutable defaults get a factory."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


DEMO_PRESET = "kd://presets/demo.yaml"
# Without -c, an override of one of these to a value other than the demo's describes a run that
# is not the demo: it starts from the schema defaults (see load_command_config).
DEMO_SWITCH_KEYS = ("data.name", "student.name", "teacher.name")


@dataclass
class StudentConfig:
    name: str = _field("vit_tiny_patch16_224", "Any timm model name (`timm.list_models()`).")
    kwargs: dict[str, Any] = _field(
        {},
        "Keyword arguments for `timm.create_model` (img_size, patch_size, embed_dim, depth, "
        "num_heads, in_chans, ...). `num_classes` comes from `data.num_classes`.",
    )
    pretrained: bool = _field(False, "Start from timm / Hugging Face hub weights (needs network).")
    mean: list[float] | None = _field(
        None, "Per-channel input mean; null takes the model's pretrained config.")
    std: list[float] | None = _field(
        None, "Per-channel input std; null takes the model's pretrained config.")
    grad_checkpointing: bool = _field(
        False, "Activation checkpointing (timm's `set_grad_checkpointing`): each block's "
        "activations are recomputed in the backward pass instead of kept, for less memory per "
        "image and a slower step (both measured in the README).")

    @property
    def channels(self) -> int:
        """Channels of the images the student takes (``kwargs.in_chans``, timm's default 3);
        the data is built with it."""
        return int(self.kwargs.get("in_chans", 3))


@dataclass
class TeacherConfig:
    name: str = _field("vit_small_patch16_224", "Any timm model name.")
    kwargs: dict[str, Any] = _field(
        {}, "Keyword arguments for `timm.create_model`; `num_classes: 0` builds a headless "
        "teacher (a backbone without a classifier: it teaches through `distill.features`, with "
        "`distill.loss=none`; a checkpoint's classifier is left out).")
    checkpoint: str | None = _field(
        None,
        "Teacher weights: a local `.safetensors` or `.pt`/`.pth` state dict (loaded with "
        "`weights_only=True`). `kd://` paths point inside the installed package.",
    )
    checkpoint_key: str | None = _field(
        None, "The entry of a training checkpoint that holds the weights: null takes the plain "
        "weights (`state_dict`, as timm's train.py and PyTorch Lightning write them, else "
        "`model` or `module`, else the file itself); `state_dict_ema` for timm's EMA weights, "
        "or any other entry.")
    checkpoint_prefix: str | None = _field(
        None, "A prefix to strip from every weight name (e.g. `model.` of a Lightning module); "
        "null: the one prefix under which the names match the model's (none, DDP's `module.`, "
        "Lightning's `model.`, ...), logged; two that fit stop the run, naming both.")
    pretrained: bool = _field(
        False, "Load timm / Hugging Face hub weights (network). Its classifier must already "
        "have `data.num_classes` outputs: kd never re-initialises a teacher head.")
    mean: list[float] | None = _field(
        None, "Teacher input mean; when it differs from the student's, inputs are re-normalised.")
    std: list[float] | None = _field(None, "Teacher input std; null takes the model's config.")
    dtype: str = _field(
        "auto", "dtype of the frozen teacher's weights: `auto` (bf16 or fp16 when training under "
        "that autocast, so no fp32 copy is kept: half the memory and no per-forward weight "
        "casts; fp32 otherwise), `fp32`, `bf16` or `fp16`.")
    image_size: int | None = _field(
        None, "Side of the image the teacher sees; null: `data.image_size`. When it differs, the "
        "student's augmented (and mixed) batch is resized on the device, so both see the same "
        "crop.")


@dataclass
class TeacherEntry(TeacherConfig):
    """One teacher of ``teachers``: a teacher section and its weight in the mixture."""

    weight: float = _field(1.0, "Weight of this teacher's probabilities in the mixture that "
                           "logit losses distil (normalised over the teachers with a head).")


@dataclass
class DataConfig:
    name: str = _field("imagefolder", "Dataset: `digits` (ships with scikit-learn), `synthetic`, "
                       "`imagefolder`, `wds` (WebDataset tar shards on local disk) or `hf` (a "
                       "Hugging Face dataset saved with `save_to_disk`; `pip install -e "
                       "\".[hf]\"`).")
    root: str | None = _field(
        None, "Dataset root. imagefolder: a folder with `train/` and `val/` class sub-folders. "
        "wds: a folder of `train-*.tar` and `val-*.tar` shards (or `train/` and `val/` "
        "sub-folders of shards). hf: the `save_to_disk` folder, with `train` and `validation` "
        "(or `val`) splits.")
    train_shards: str | None = _field(
        None, "wds: the training shards, e.g. `/data/train-{000000..000127}.tar` (brace ranges "
        "and lists, `*` wildcards, or a folder of `.tar` files; relative to `data.root` when "
        "set); null: found in `data.root`.")
    val_shards: str | None = _field(
        None, "wds: the validation shards, as `data.train_shards`; null: found in `data.root`.")
    stream: bool = _field(
        False, "wds: stream the training shards front to back through a shuffle buffer, split "
        "by shard across ranks and loader workers, instead of indexing every sample at start-up "
        "(for shards on shared storage and very large splits; resume stays exact). Validation "
        "is always indexed.")
    shuffle_buffer: int = _field(
        1000, "wds with `data.stream`: samples each reader holds to shuffle from (memory: about "
        "this many encoded images per loader worker).")
    train_samples: int | None = _field(
        None, "wds with `data.stream`: samples per epoch across all ranks; null: counted once by "
        "a header scan of the shards (cached on disk by shard path, size and time).")
    hf_image_key: str = _field("image", "hf: the column holding the images (an Image feature).")
    hf_label_key: str = _field("label", "hf: the column holding the class indices.")
    num_classes: int = _field(1000, "Number of classes; teacher and student heads must match it.")
    labels_per_class: int | None = _field(
        None, "Few labels: train on a fixed, stratified subset of this many labelled images per "
        "class (chosen by `data.subset_seed`, the same in every run and on every rank); the "
        "other training images are dropped. null: all.")
    subset_seed: int = _field(0, "Seed of the `data.labels_per_class` subset (independent of "
                              "`seed`, so training seeds compare the same labelled images).")
    transfer_set: str = _field(
        "none", "Unlabelled images learnt from through the teacher alone: `none`; `rest` (the "
        "training images `data.labels_per_class` left without labels); or a folder of images "
        "(no class structure) or WebDataset shards without labels. An epoch is one pass over "
        "labelled and unlabelled images; batches mix them in proportion.")
    image_size: int = _field(224, "Side of the (square) image the student sees, in pixels.")
    batch_size: int = _field(128, "Images per process per micro-batch.")
    eval_batch_size: int | None = _field(None, "Evaluation batch size; null: `batch_size`.")
    num_workers: int | str = _field(
        "auto", "Data-loader worker processes per rank, or `auto`: a short measured sweep at "
        "start-up picks the fewest workers within 95 % of the best throughput (cached per "
        "machine and data config; see `kd tune-loader`).")
    prefetch_factor: int = _field(2, "Batches each worker prepares ahead (with workers > 0).")
    on_error: str = _field(
        "skip", "Unreadable or corrupt samples: `skip` (counted as `n_bad_samples`, replaced by "
        "the next readable sample of the split) or `fail` (stop, naming the file). Reading and "
        "decoding only: a failing augmentation always stops the run.")
    augment: bool = _field(True, "Training augmentation (digits: a mild random affine; "
                           "image datasets: timm's train transform below).")
    pipeline: str = _field(
        "kd", "How image datasets run the training transform below: `kd` (timm's transform in "
        "tensor form: the same random draws, a crop decoded at a reduced JPEG scale when it "
        "allows, antialiased tensor resizing and affine ops; falls back to timm's for steps it "
        "has no tensor form of) or `timm` (timm's PIL transform, the reference).")
    decode: str = _field(
        "cpu", "Where training images are decoded and augmented: `cpu` (in the loader workers) "
        "or `device` (the workers read the JPEG bytes and draw each sample's augmentation; the "
        "training process decodes the batch with `torchvision.io.decode_jpeg` on its device, "
        "nvJPEG on CUDA, then crops, resizes and augments there: for when loader CPUs, not "
        "the GPU, limit the step). Needs `data.pipeline: kd` and an image dataset; validation "
        "always decodes on the CPU.")
    auto_augment: str | None = _field(
        None, "timm auto-augment policy for image datasets, e.g. `rand-m9-mstd0.5-inc1` "
        "(RandAugment); null: none.")
    color_jitter: float = _field(0.0, "Colour jitter strength (timm); 0: off.")
    re_prob: float = _field(0.0, "Random-erasing probability (timm's, on the uint8 image "
                            "before either model sees it); 0: off.")
    scale: list[float] = _field([0.08, 1.0], "Random-resized-crop area range.")
    hflip: float = _field(0.5, "Horizontal flip probability.")
    mixup: float = _field(0.0, "Mixup alpha (timm `Mixup`); 0: off. Targets become soft.")
    cutmix: float = _field(0.0, "CutMix alpha; 0: off.")
    mixup_prob: float = _field(1.0, "Probability of mixing a batch when mixup/cutmix is on.")
    mixup_switch_prob: float = _field(0.5, "Probability of CutMix instead of Mixup when both "
                                      "are on.")
    mixup_mode: str = _field("batch", "Mix parameters per `batch`, `pair` or `elem`.")
    repeated_aug: int = _field(
        1, "Repeated augmentation (DeiT's sampler; DeiT uses 3): every training image appears "
        "this many times per epoch, each copy with its own augmentation, the copies side by "
        "side in the shuffled order so that with this many ranks or more they go to different "
        "ranks in the same step. An epoch is this many times longer (DeiT's sampler instead "
        "cuts each epoch to the split's size): to keep a recipe's length in images, divide "
        "`train.epochs` and `sched.warmup_epochs` by it. 1: off.")
    synthetic_size: int = _field(1024, "Number of training images of the `synthetic` dataset.")
    grey_to_rgb: bool = _field(
        True, "One-channel images (digits) for a model that takes three channels "
        "(`in_chans: 3`, timm's default): replicate the grey channel to RGB, and say so once in "
        "the log; false: stop instead (exit code 2), naming the model's `kwargs.in_chans`. Any "
        "other channel difference always stops.")


@dataclass
class FeaturePairConfig:
    """One pair of ``distill.features``: a student layer taught by a teacher layer."""

    student: int | str = _field(-1, "Student layer: a block index of timm's "
                                "`forward_intermediates` (negative counts from the end), or a "
                                "module path such as `blocks.3.mlp`.")
    teacher: int | str = _field(-1, "Teacher layer, as `student`.")
    teacher_index: int = _field(0, "With `teachers`: which teacher (0-based) this pair's "
                                "teacher layer belongs to.")
    loss: str = _field("cosine", "`cosine`, `mse` or `smooth_l1`.")
    weight: float = _field(1.0, "Weight of this term in the total loss.")
    tokens: str = _field("all", "`all`, `prefix`, `patch` or `pooled` (see the README).")


@dataclass
class DistillConfig:
    loss: str = _field(
        "soft",
        "`none` (labels only), `soft` (Hinton KL), `hard` (teacher argmax), `token` (DeiT "
        "distillation token) or `dkd` (decoupled KD). loss = (1 - alpha) * loss_task + "
        "alpha * loss_kd; with `none`, loss = loss_task.",
    )
    temperature: float = _field(1.0, "Softmax temperature T for `soft`, `dkd`, `token` (soft).")
    alpha: float = _field(0.5, "Weight of the distillation term, in [0, 1].")
    token_loss: str = _field("hard", "With `loss=token`: `hard` (DeiT) or `soft` on the "
                             "distillation head.")
    dkd_alpha: float = _field(1.0, "DKD weight of the target-class term (TCKD).")
    dkd_beta: float = _field(8.0, "DKD weight of the non-target-class term (NCKD).")
    dkd_warmup_epochs: float = _field(
        5.0, "DKD term ramps linearly from 0 to full weight over these epochs.")
    check_teacher: bool = _field(
        True, "Before training (not on resume), evaluate the teacher on the validation split "
        "(one pass, teacher only): its top-1 is logged and saved as `teacher_top1_before`, and "
        "near chance (below 2/`data.num_classes`, at most 0.75) is a warning naming the likely "
        "causes. false: skip it (a very large validation split).")
    require_teacher_top1: float | None = _field(
        None, "Stop before training (exit code 2, nothing written) when the teacher's top-1 "
        "measured by `distill.check_teacher` is below this fraction in [0, 1]; null: no minimum.")
    teacher_cache: str | None = _field(
        None, "A folder written by `kd cache-teacher`: train from the teacher's stored top-K "
        "logits, replaying the augmentation (and Mixup/CutMix) recorded for each image and "
        "epoch; the teacher is never built. Its data, augmentation and teacher settings must "
        "equal this run's (a difference is an error naming the key).")
    cache_top_k: int | None = _field(
        None, "K of `distill.teacher_cache` (the default of `kd cache-teacher --top-k`, "
        "otherwise 10); null: whatever the cache holds; set: the cache must hold this K.")
    cache_cycle: bool = _field(
        False, "With `distill.teacher_cache`: training longer than the cached epochs replays "
        "them in turn (epoch e uses cached epoch e mod E); false: an error.")
    features: list[FeaturePairConfig] = _field(
        [], "Representation distillation: a list of pairs `{student: LAYER, teacher: LAYER, "
        "loss: cosine, weight: 1.0, tokens: all}` (loss: `cosine`, `mse` or `smooth_l1`; tokens: "
        "`all`, `prefix`, `patch` or `pooled`), each adding `weight * loss` to the total (logged "
        "as `loss_feat_<i>`). LAYER: a block index of timm's `forward_intermediates` (negative "
        "from the end) or a module path (`blocks.3.mlp`); with `teachers`, `teacher_index` "
        "names the pair's teacher (default 0). Token grids that differ are aligned (see the "
        "README's feature distillation section).")
    projector: str = _field(
        "linear", "Maps each student feature to its teacher's width, trained with the student "
        "and saved in checkpoints (not exported): `linear`, `mlp` (linear, GELU, linear) or "
        "`none` (widths must match).")


@dataclass
class OptimConfig:
    name: str = _field("adamw", "Optimizer name for timm's `create_optimizer_v2`.")
    lr: float = _field(1e-3, "Peak learning rate.")
    weight_decay: float = _field(0.05, "Decoupled weight decay (not applied to norms and biases).")
    grad_clip: float | None = _field(None, "Clip the global gradient norm to this; null: off.")
    kwargs: dict[str, Any] = _field({}, "Extra optimizer arguments (e.g. betas, eps).")
    zero: bool = _field(
        False, "Shard optimizer state across ranks with PyTorch's ZeroRedundancyOptimizer (same "
        "optimizer class and parameter groups); no effect in a single process.")
    layer_decay: float | None = _field(
        None, "Layer-wise learning-rate decay d in (0, 1] (timm's `layer_decay`, as in BEiT and "
        "DeiT III fine-tuning): the block at depth k of L learns at lr · d^(L − k), the head at "
        "lr; null: off. Needs a student timm can group by layer (`group_matcher`).")


@dataclass
class SchedConfig:
    name: str = _field("cosine", "timm scheduler (stepped every optimizer step): `cosine`, "
                       "`tanh`, `poly`, or `none` (constant learning rate).")
    warmup_epochs: float = _field(5.0, "Linear warm-up length in epochs.")
    warmup_lr: float = _field(1e-6, "Learning rate at the start of warm-up.")
    min_lr: float = _field(1e-5, "Learning rate at the end of the schedule.")


@dataclass
class TrainConfig:
    epochs: int = _field(300, "Passes over the training split.")
    max_steps: int | None = _field(
        None, "Stop after this many optimizer steps (the schedule spans them); null: epochs.")
    precision: str = _field(
        "auto", "`bf16`, `fp16` (with a gradient scaler) or `fp32` autocast. `auto`: bf16 on "
        "GPUs of compute capability 8.0 and later (A100, H100; older ones such as V100 and T4 "
        "only emulate bf16, so fp16 there) and on CPUs with AMX (Sapphire Rapids and later), "
        "fp32 on other CPUs. Very small models run faster in fp32 even with AMX (the digits demo "
        "pins it).")
    tf32: bool = _field(
        True, "On GPUs of compute capability 8.0 and later, fp32 matrix multiplies (all of them "
        "with `train.precision=fp32`) use TF32 tensor cores: fp32 range, 10-bit mantissa inputs, "
        "fp32 accumulation, several times the fp32 speed. false: full fp32.")
    grad_accum_steps: int = _field(1, "Micro-batches per optimizer step.")
    label_smoothing: float = _field(0.0, "Label smoothing of the task (cross-entropy) term.")
    log_every: int = _field(50, "Optimizer steps between log lines / metrics records.")
    ema_decay: float | None = _field(
        None, "Keep an exponential moving average of the student's weights (timm's "
        "`ModelEmaV3`), updated on the device after every optimizer step, e.g. 0.9998; "
        "evaluated next to the student (`student_ema_top1`, `student_ema_top5`), saved in "
        "checkpoints, exported with `kd export --ema`. null: off.")
    ema_warmup: bool = _field(
        False, "timm's EMA warm-up: the decay grows as 1 − (1 + step)^(−2/3) up to "
        "`train.ema_decay`, so early averages are not dominated by the random start.")
    log_lr_groups: bool = _field(
        False, "At each log step, also record every parameter group's learning rate "
        "(`lr_group_<i>`; with `optim.layer_decay` they differ by layer).")
    log_phases: bool = _field(
        False, "At each log step, also print a timing line: `iter N`, then the mean seconds per "
        "step of data, teacher, forward, backward and optim since the previous log step, and "
        "img/s, the numbers of that step's `metrics.jsonl` record.")
    eval_every_epochs: int = _field(1, "Evaluate every N epochs (and always at the end).")
    max_skipped_steps: int = _field(
        20, "An optimizer step with a non-finite loss or gradient is skipped and counted "
        "(`n_skipped_steps`); this many consecutive skips stop the run (exit code 4), checked at "
        "log steps. 0: never stop.")
    device: str = _field("auto", "`auto` (cuda when present), `cpu`, `cuda`.")
    compile: bool = _field(
        False, "torch.compile the student and the teacher (in place, before DDP wraps the "
        "student; checkpoints keep their keys). The first steps pay the compilation (minutes for "
        "large models).")
    compile_mode: str = _field(
        "default", "torch.compile mode with `train.compile`: `default`, `reduce-overhead` (CUDA "
        "graphs; the teacher's static shapes suit it) or `max-autotune`.")


@dataclass
class CheckpointConfig:
    every_steps: int = _field(1000, "Save every N optimizer steps (and at the end); 0: end only.")
    keep: int = _field(3, "Checkpoints to keep (oldest deleted first), plus the one with the "
                       "best student top-1 so far.")
    resume: str = _field(
        "auto", "`auto`: resume from the latest checkpoint in `output_dir` if any; `none`: "
        "start fresh; or a checkpoint directory path.")
    best_metric: str = _field(
        "student_top1", "What makes a checkpoint the best (kept by pruning, `--best`): "
        "`student_top1`, or `student_ema_top1` (needs `train.ema_decay`).")


@dataclass
class DistConfig:
    backend: str = _field(
        "auto", "Process-group backend. `auto`: `smddp` when SageMaker's SMDDP launcher (its "
        "mpirun, not torchrun) started the job on ml.p4d.24xlarge or ml.p4de.24xlarge and the "
        "library imports; else `nccl` on GPUs, `gloo` on CPUs.")
    timeout_s: int = _field(1800, "Process-group timeout in seconds.")
    strategy: str = _field(
        "ddp", "`ddp`: DistributedDataParallel (with `optim.zero` for sharded optimizer state); "
        "`deepspeed`: the DeepSpeed engine with ZeRO (`pip install -e \".[deepspeed]\"`).")
    zero_stage: int = _field(1, "DeepSpeed ZeRO stage: 1 (optimizer state) or 2 (+ gradients).")


@dataclass
class KDConfig:
    output_dir: str = _field("runs/kd", "Where config, metrics, checkpoints and summary go.")
    seed: int = _field(0, "Seed for model init, data order and augmentation.")
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    teachers: list[TeacherEntry] = _field(
        [], "Several teachers, replacing `teacher` when given: a list of teacher sections (the "
        "keys of `teacher`, plus `weight`). Each is frozen, normalised with its own statistics, "
        "at its own `image_size` and in its own `dtype`; logit losses distil the weighted "
        "mixture of their probabilities at `distill.temperature`, feature pairs name theirs "
        "with `teacher_index` (see the README).")
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)


FEATURE_LOSSES = ("cosine", "mse", "smooth_l1")
FEATURE_TOKENS = ("all", "prefix", "patch", "pooled")
# The datasets of encoded images (files, shards, Hugging Face rows): the ones timm's transform,
# data.decode=device and kd prepare-data apply to.
IMAGE_DATASETS = ("imagefolder", "wds", "hf")
CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.dtype": ("auto", "fp32", "bf16", "fp16"),
    "train.compile_mode": ("default", "reduce-overhead", "max-autotune",
                           "max-autotune-no-cudagraphs"),
    "data.name": ("digits", "synthetic", *IMAGE_DATASETS),
    "data.on_error": ("skip", "fail"),
    "data.mixup_mode": ("batch", "pair", "elem"),
    "data.pipeline": ("kd", "timm"),
    "data.decode": ("cpu", "device"),
    "distill.loss": ("none", "soft", "hard", "token", "dkd"),
    "distill.token_loss": ("soft", "hard"),
    "distill.projector": ("linear", "mlp", "none"),
    "checkpoint.best_metric": ("student_top1", "student_ema_top1"),
    "sched.name": ("cosine", "tanh", "poly", "none"),
    "train.precision": ("auto", "bf16", "fp16", "fp32"),
    "train.device": ("auto", "cpu", "cuda"),
    "dist.backend": ("auto", "nccl", "gloo", "smddp"),
    "dist.strategy": ("ddp", "deepspeed"),
    "dist.zero_stage": (1, 2),
}


def iter_fields(cls: type = KDConfig, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    """All leaf fields of the schema as (dotted key, field), in declaration order."""
    out = []
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(f.type) or (
            isinstance(f.type, str) and f.type in _SECTIONS
        ):
            out += iter_fields(_SECTIONS[f.type] if isinstance(f.type, str) else f.type, f"{key}.")
        else:
            out.append((key, f))
    return out


_SECTIONS = {c.__name__: c for c in (StudentConfig, TeacherConfig, DataConfig, DistillConfig,
                                    OptimConfig, SchedConfig, TrainConfig, CheckpointConfig,
                                    DistConfig)}
_SECTION_KEYS = {f.name for f in dataclasses.fields(KDConfig)
                 if f.type in _SECTIONS or f.type in _SECTIONS.values()}


def _closest(key: str) -> str:
    valid = [k for k, _ in iter_fields()]
    valid += sorted({k.rpartition(".")[0] for k in valid} - {""})  # section names
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not match:  # a typo in the last part only: compare leaf names within the section
        section, _, leaf = key.rpartition(".")
        leaves = [k.rpartition(".")[2] for k in valid if k.rpartition(".")[0] == section]
        near = difflib.get_close_matches(leaf, leaves, n=1, cutoff=0.5)
        match = [f"{section}.{near[0]}" if section else near[0]] if near else []
    return f" (did you mean '{match[0]}'?)" if match else ""


def _section_given_a_value(other: Any) -> str | None:
    """The first top-level key of ``other`` that names a section but holds a plain value."""
    if not isinstance(other, (dict, DictConfig)):
        return None
    for key in other:
        if key in _SECTION_KEYS and not isinstance(other[key], (dict, DictConfig)):
            return str(key)
    return None


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except ConfigKeyError as e:
        key = e.full_key or str(e.key)
        raise ConfigError(f"{source}: unknown config key '{key}'{_closest(key)}") from None
    except ValidationError as e:
        section = _section_given_a_value(other)
        if not e.full_key and section:  # e.g. `train=3`: OmegaConf names neither key nor msg
            example = next(k for k, _ in iter_fields() if k.startswith(f"{section}."))
            raise ConfigError(f"{source}: '{section}' is a section, not a value; set its keys "
                              f"(e.g. {example}=...)") from None
        msg = (e.msg or str(e)).splitlines()[0]
        if "is not a ListConfig" in msg:  # OmegaConf names its node classes, not the fix
            msg = f"expected a list, e.g. {e.full_key or 'key'}=[1, 2]"
        raise ConfigError(f"{source}: invalid value for '{e.full_key or '?'}': {msg}") from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"{source}: {str(e).splitlines()[0]}") from None


def _resolve(path: str, relative_to: Path | None = None) -> Path:
    if path.startswith("kd://"):
        return Path(__file__).resolve().parent / path.removeprefix("kd://")
    p = Path(path).expanduser()
    return relative_to / p if relative_to is not None and not p.is_absolute() else p


def _read_yaml(path: str, relative_to: Path | None = None, seen: tuple[Path, ...] = ()) -> Any:
    """Read a preset, merging the ``_base_`` chain it names (base first)."""
    p = _resolve(path, relative_to)
    if not p.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to -c)")
    if p.resolve() in seen:
        raise ConfigError(f"{path}: _base_ chain loops back to itself")
    try:
        data = yaml.safe_load(p.read_text())  # safe_load: configs never evaluate code
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}; fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
    base = data.pop("_base_", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: _base_ must be one file path")
    merged = OmegaConf.merge(OmegaConf.create(_read_yaml(base, p.parent, (*seen, p.resolve()))),
                             OmegaConf.create(data))
    return OmegaConf.to_container(merged)


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        key, eq, _ = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"override '{item}' is not of the form key=value "
                              f"(e.g. train.epochs=3)")
    try:
        return OmegaConf.from_dotlist(overrides)
    except OmegaConfBaseException as e:
        raise ConfigError(f"command line: {str(e).splitlines()[0]}") from None


def load_config(path: str | None, overrides: Sequence[str] = ()) -> KDConfig:
    """Build the run configuration: defaults ← YAML preset ← dotted overrides, then validate.

    Args:
        path: a YAML preset (``kd://`` for presets inside the package), or None for the
            schema's defaults.
        overrides: ``key=value`` strings with dotted keys, values parsed as YAML.

    Returns:
        The validated config: plain dataclasses (:class:`KDConfig` and its sections).

    Raises:
        ConfigError: unknown key (with the closest valid key), wrong type or invalid value.
    """
    tree = OmegaConf.structured(KDConfig)
    if path is not None:
        tree = _merge(tree, _read_yaml(path), path)
    if overrides:
        tree = _merge(tree, _parse_overrides(list(overrides)), "command line")
    return _typed(tree)


def derive(cfg: KDConfig, changes: Mapping[str, Any], source: str = "derived config"
           ) -> KDConfig:
    """A new validated config: ``cfg`` with ``changes`` (``{dotted key: value}``) applied, type
    checked and validated as a loaded one; ``cfg`` itself is left as it is.

    Example:
        >>> cfg = load_config(DEMO_PRESET)
        >>> derive(cfg, {"distill.loss": "none", "train.epochs": 1}).distill.loss, cfg.distill.loss
        ('none', 'soft')
    """
    tree = OmegaConf.structured(cfg)
    if changes:
        nested: dict[str, Any] = {}
        for key, value in changes.items():
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        tree = _merge(tree, nested, source)
    return _typed(tree)


def _typed(tree: DictConfig) -> KDConfig:
    try:
        cfg = OmegaConf.to_object(tree)
    except OmegaConfBaseException as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    assert isinstance(cfg, KDConfig)
    validate(cfg)
    return cfg


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of every leaf of a nested mapping (dict-valued keys descend)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, (dict, DictConfig)):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _show(value: Any) -> str:
    """A config value as it would be typed on the command line (YAML)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000, sort_keys=False).strip() \
        .removesuffix("...").strip()


class ConfigOrigins:
    """Which values of a command's config came from a base the user did not name.

    Without ``-c`` a command starts from the demo preset (or, see :func:`load_command_config`,
    from the schema defaults); an error about one of those values then says where it came from,
    since the user never typed it.

    Example:
        >>> origins = ConfigOrigins({"student.kwargs.img_size": 16}, "the demo preset")
        >>> origins.explain("student.kwargs: student x cannot take (1, 1, 32, 32) images")
        '; student.kwargs.img_size=16 comes from the demo preset'
    """

    def __init__(self, values: dict[str, Any], source: str) -> None:
        self.values = values  # dotted key → value, for the keys the implicit base set
        self.source = source

    def _mentioned(self, key: str, message: str) -> bool:
        # The key, or its dict-valued parent (``student.kwargs`` for
        # ``student.kwargs.img_size``), as a whole word of the message.
        parts = key.split(".")
        for n in range(len(parts), 1, -1):
            name = re.escape(".".join(parts[:n]))
            if re.search(rf"(?<![\w.]){name}(?![\w])", message):
                return True
        return False

    def explain(self, message: str) -> str:
        """What to append to an error ``message``: where the values of the keys it names came
        from ('' when it names none of them)."""
        groups: dict[str, dict[str, Any]] = {}  # student.kwargs.depth → student.kwargs {depth}
        for key, value in self.values.items():
            if self._mentioned(key, message):
                parent, _, leaf = key.rpartition(".") if key.count(".") > 1 else (key, "", "")
                groups.setdefault(parent, {})[leaf] = value
        if not groups:
            return ""
        named = [f"{k}.{next(iter(v))}={_show(next(iter(v.values())))}".replace(".=", "=")
                 if len(v) == 1 else f"{k} {_show(v)}" for k, v in groups.items()]
        verb = "comes" if len(named) == 1 and len(next(iter(groups.values()))) == 1 else "come"
        return f"; {', '.join(named)} {verb} from {self.source}"


def _switching_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that name another dataset or model than the demo's (DEMO_SWITCH_KEYS)."""
    given = _leaves(_parse_overrides(list(overrides)))
    demo = _leaves(_read_yaml(DEMO_PRESET))
    return [f"{key}={_show(given[key])}" for key in DEMO_SWITCH_KEYS
            if key in given and given[key] != demo.get(key)]


def load_command_config(path: str | None, overrides: Sequence[str] = ()
                        ) -> tuple[KDConfig, ConfigOrigins | None]:
    """The config of a ``kd`` command given ``[-c path] [key=value ...]``, and where the values
    it did not name came from.

    With ``path``, as :func:`load_config`. Without it, the embedded digits demo
    (:data:`DEMO_PRESET`), which the overrides tweak — unless they set ``data.name``,
    ``student.name`` or ``teacher.name`` to another value than the demo's: such a run is not the
    demo, and it starts from the schema defaults instead (nothing of the demo's models, data or
    schedule leaks into it). Either way, a :class:`~kd.errors.UserError` about a value that
    came from that implicit base says so (:meth:`ConfigOrigins.explain`).

    Example:
        >>> cfg, origins = load_command_config(None, ["train.epochs=2"])
        >>> cfg.data.name, origins.source.split(",")[0]
        ('digits', 'the demo preset kd://presets/demo.yaml')
    """
    if path is not None:
        return load_config(path, overrides), None
    switching = _switching_overrides(overrides)
    if switching:
        base = None
        named = " and ".join(switching) + (" is" if len(switching) == 1 else " are")
        source = f"the schema defaults, used because no -c was given and {named} not the demo's"
        log.info("%s not the digits demo's, so this run starts from the schema defaults, not "
                 "from the demo (pass -c configs/demo.yaml to change the demo itself)", named)
        values = _leaves(to_container(KDConfig()))
    else:
        base = DEMO_PRESET
        source = f"the demo preset {DEMO_PRESET}, used because no -c was given"
        values = _leaves(_read_yaml(DEMO_PRESET))
    typed = _leaves(_parse_overrides(list(overrides)))
    origins = ConfigOrigins({k: v for k, v in values.items() if k not in typed}, source)
    try:
        return load_config(base, overrides), origins
    except UserError as e:
        message = str(e)
        raise type(e)(message + origins.explain(message)) from None


def _check(ok: bool, key: str, value: Any, need: str) -> None:
    if not ok:
        raise ConfigError(f"invalid value for '{key}': {value!r} ({need})")


def _check_choices(section: str, values: Any, named: str | None = None) -> None:
    """The keys of ``section`` that take one of :data:`CHOICES` (named ``named.key`` in errors,
    for a list entry such as ``teachers[1]``)."""
    for key, choices in CHOICES.items():
        prefix, _, name = key.partition(".")
        if prefix == section:
            value = getattr(values, name)
            _check(value in choices, f"{named or prefix}.{name}", value,
                   "choose one of: " + ", ".join(map(str, choices)))


def _check_signs(section: str, values: Any, positive: Sequence[str] = (),
                 optional_positive: Sequence[str] = (), non_negative: Sequence[str] = (),
                 probabilities: Sequence[str] = ()) -> None:
    """Range checks shared by the sections: ``> 0``, ``> 0 or null``, ``>= 0``, ``[0, 1]``."""
    for name in positive:
        value = getattr(values, name)
        _check(value > 0, f"{section}.{name}", value, "must be > 0")
    for name in optional_positive:
        value = getattr(values, name)
        _check(value is None or value > 0, f"{section}.{name}", value, "must be > 0 or null")
    for name in non_negative:
        value = getattr(values, name)
        _check(value >= 0, f"{section}.{name}", value, "must be >= 0")
    for name in probabilities:
        value = getattr(values, name)
        _check(0 <= value <= 1, f"{section}.{name}", value, "a probability in [0, 1]")


def _check_model(section: str, model: StudentConfig | TeacherConfig) -> None:
    """What the student and teacher sections share: kwargs and input statistics."""
    teacher = section.startswith("teacher")
    headless_ok = teacher and model.kwargs.get("num_classes") == 0
    _check("num_classes" not in model.kwargs or headless_ok, f"{section}.kwargs.num_classes",
           model.kwargs.get("num_classes"), "set data.num_classes instead" + (
               "; 0 builds a headless teacher" if teacher else ""))
    for stat in ("mean", "std"):
        value = getattr(model, stat)
        _check(value is None or len(value) > 0, f"{section}.{stat}", value,
               "a list with one value per channel, or null")
    _check(model.std is None or all(s > 0 for s in model.std), f"{section}.std", model.std,
           "every value must be > 0")


def _validate_student(s: StudentConfig) -> None:
    _check_model("student", s)


def _validate_teacher(t: TeacherConfig, section: str = "teacher") -> None:
    _check_choices("teacher", t, section)
    _check_signs(section, t, optional_positive=["image_size"])
    _check_model(section, t)


def _validate_teachers(teachers: list[TeacherEntry]) -> None:
    for i, entry in enumerate(teachers):
        _validate_teacher(entry, f"teachers[{i}]")
        _check(entry.weight > 0, f"teachers[{i}].weight", entry.weight, "must be > 0")


def _validate_data(d: DataConfig) -> None:
    _check_choices("data", d)
    _check_signs("data", d, positive=["num_classes", "image_size", "batch_size", "synthetic_size",
                                      "prefetch_factor"],
                 optional_positive=["eval_batch_size", "train_samples"],
                 non_negative=["mixup", "cutmix", "color_jitter"],
                 probabilities=["mixup_prob", "mixup_switch_prob", "re_prob", "hflip"])
    workers = d.num_workers
    _check(workers == "auto" or (isinstance(workers, int) and workers >= 0), "data.num_workers",
           workers, "an integer >= 0 or auto")
    scale = list(d.scale)
    _check(len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1, "data.scale", scale,
           "[min, max] with 0 < min <= max <= 1")
    if d.mixup > 0 or d.cutmix > 0:
        _check(d.batch_size % 2 == 0, "data.batch_size", d.batch_size,
               "must be even with mixup/cutmix (samples are mixed with the batch's reverse)")
    _check(d.name != "imagefolder" or bool(d.root), "data.root", d.root,
           "imagefolder needs a root folder with train/ and val/")
    _check(d.name != "hf" or bool(d.root), "data.root", d.root,
           "hf needs the folder of a dataset saved with save_to_disk")
    _check(d.name != "wds" or bool(d.root) or bool(d.train_shards and d.val_shards),
           "data.root", d.root,
           "wds needs a folder of shards, or both data.train_shards and data.val_shards")
    _check(not d.stream or d.name == "wds", "data.stream", d.stream,
           "only wds shards can be streamed; set data.stream=false")
    _check(d.labels_per_class is None or d.labels_per_class > 0, "data.labels_per_class",
           d.labels_per_class, "must be > 0 or null (all)")
    _check(not (d.labels_per_class and d.stream), "data.labels_per_class", d.labels_per_class,
           "needs an indexed split; set data.stream=false")
    if d.transfer_set != "none":
        _check(not d.stream, "data.stream", d.stream,
               "a transfer set needs an indexed training split; set data.stream=false")
        _check(d.transfer_set != "rest" or bool(d.labels_per_class), "data.transfer_set", "rest",
               "rest is the images data.labels_per_class drops: set data.labels_per_class too")
    _check(isinstance(d.repeated_aug, int) and d.repeated_aug >= 1, "data.repeated_aug",
           d.repeated_aug, "an integer >= 1 (1: off; DeiT uses 3)")
    _check(d.repeated_aug == 1 or not d.stream, "data.repeated_aug", d.repeated_aug,
           "repeats images of an indexed training split; set data.stream=false")
    _check(d.decode == "cpu" or d.pipeline == "kd", "data.decode", d.decode,
           "device decoding runs kd's tensor transform: set data.pipeline=kd")
    _check(d.decode == "cpu" or d.name in IMAGE_DATASETS, "data.decode",
           d.decode, f"{d.name} has no encoded images to decode: set data.decode=cpu")
    _check(d.shuffle_buffer > 0, "data.shuffle_buffer", d.shuffle_buffer,
           "must be > 0 (1: no shuffling within a reader)")


def _validate_distill(d: DistillConfig) -> None:
    _check_choices("distill", d)
    _check_signs("distill", d, positive=["temperature"], optional_positive=["cache_top_k"],
                 non_negative=["dkd_alpha", "dkd_beta", "dkd_warmup_epochs"])
    _check(0.0 <= d.alpha <= 1.0, "distill.alpha", d.alpha, "must be in [0, 1]")
    _check(d.require_teacher_top1 is None or (
        0.0 <= d.require_teacher_top1 <= 1.0 and d.check_teacher),
        "distill.require_teacher_top1", d.require_teacher_top1,
        "a fraction in [0, 1] measured with distill.check_teacher=true, or null")
    for i, pair in enumerate(d.features):
        key = f"distill.features[{i}]"
        _check(pair.loss in FEATURE_LOSSES, f"{key}.loss", pair.loss,
               "choose one of: " + ", ".join(FEATURE_LOSSES))
        _check(pair.tokens in FEATURE_TOKENS, f"{key}.tokens", pair.tokens,
               "choose one of: " + ", ".join(FEATURE_TOKENS))
        _check(pair.weight >= 0, f"{key}.weight", pair.weight, "must be >= 0")
        _check(pair.teacher_index >= 0, f"{key}.teacher_index", pair.teacher_index,
               "must be >= 0")
        for side in ("student", "teacher"):
            layer = getattr(pair, side)
            _check(isinstance(layer, int) or bool(layer.strip()), f"{key}.{side}", layer,
                   "a block index or a module path such as blocks.3")
    if d.teacher_cache:
        _check(not d.features, "distill.features", d.features,
               "distill.teacher_cache holds the teacher's logits, not its features: unset one")
        _check(d.loss != "none", "distill.loss", d.loss,
               "distill.teacher_cache holds teacher outputs: choose soft, hard, token or dkd, "
               "or unset distill.teacher_cache")
        _check(d.require_teacher_top1 is None, "distill.require_teacher_top1",
               d.require_teacher_top1, "a run from distill.teacher_cache never builds the "
               "teacher, so it cannot check it: check it with a short live run, and unset this")


def _validate_optim(o: OptimConfig) -> None:
    _check_signs("optim", o, positive=["lr"], optional_positive=["grad_clip"],
                 non_negative=["weight_decay"])
    _check(o.layer_decay is None or 0 < o.layer_decay <= 1, "optim.layer_decay", o.layer_decay,
           "a factor in (0, 1], or null")


def _validate_sched(s: SchedConfig) -> None:
    _check_choices("sched", s)
    _check_signs("sched", s, non_negative=["warmup_epochs", "min_lr", "warmup_lr"])


def _validate_train(t: TrainConfig) -> None:
    _check_choices("train", t)
    _check_signs("train", t, positive=["epochs", "grad_accum_steps", "log_every",
                                       "eval_every_epochs"],
                 optional_positive=["max_steps"])
    _check(0.0 <= t.label_smoothing < 1.0, "train.label_smoothing", t.label_smoothing,
           "must be in [0, 1)")
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", t.max_skipped_steps,
           "must be >= 0 (0: never stop)")
    _check(t.ema_decay is None or 0 < t.ema_decay < 1, "train.ema_decay", t.ema_decay,
           "a decay in (0, 1), e.g. 0.9998, or null")


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _check_choices("checkpoint", c)
    _check_signs("checkpoint", c, positive=["keep"], non_negative=["every_steps"])


def _validate_dist(d: DistConfig) -> None:
    _check_choices("dist", d)
    _check_signs("dist", d, positive=["timeout_s"])


SECTION_CHECKS: dict[str, Callable[[Any], None]] = {
    "student": _validate_student, "teacher": _validate_teacher, "teachers": _validate_teachers,
    "data": _validate_data,
    "distill": _validate_distill, "optim": _validate_optim, "sched": _validate_sched,
    "train": _validate_train, "checkpoint": _validate_checkpoint, "dist": _validate_dist,
}


def is_headless(teacher: TeacherConfig) -> bool:
    """Whether the teacher is built without a classifier (``teacher.kwargs.num_classes: 0``)."""
    return teacher.kwargs.get("num_classes") == 0


def teacher_sections(cfg: KDConfig) -> list[TeacherConfig]:
    """The run's teachers: ``teachers`` when given, else the one ``teacher``."""
    return list(cfg.teachers) if cfg.teachers else [cfg.teacher]


def teacher_key(cfg: KDConfig, index: int) -> str:
    """The config section of teacher ``index``: ``teachers[i]``, or ``teacher``."""
    return f"teachers[{index}]" if cfg.teachers else "teacher"


def _check_teachers(cfg: KDConfig) -> None:
    """Headless teachers teach through feature pairs only; pairs name existing teachers."""
    sections = teacher_sections(cfg)
    headless = [is_headless(t) for t in sections]
    what = "the teachers are" if cfg.teachers else "the teacher is"
    if all(headless):
        _check(cfg.distill.loss == "none", "distill.loss", cfg.distill.loss,
               f"{what} headless (kwargs.num_classes=0) and has no logits: use "
               f"distill.loss=none with distill.features")
        _check(bool(cfg.distill.features), "distill.features", cfg.distill.features,
               f"{what} headless (kwargs.num_classes=0) and teaches through feature pairs "
               f"only: name at least one")
    for i, pair in enumerate(cfg.distill.features):
        _check(pair.teacher_index < len(sections), f"distill.features[{i}].teacher_index",
               pair.teacher_index, f"the run has {len(sections)} teacher(s): 0 to "
               f"{len(sections) - 1}")
    named = {pair.teacher_index for pair in cfg.distill.features}
    for i, flag in enumerate(headless):
        _check(not flag or i in named, f"{teacher_key(cfg, i)}.kwargs.num_classes", 0,
               "a headless teacher teaches through feature pairs only, and no pair of "
               "distill.features names it (teacher_index)")


def check_combinations(cfg: KDConfig) -> None:
    """The checks that span sections (each section is valid on its own by then)."""
    if cfg.dist.strategy == "deepspeed":
        _check(not cfg.optim.zero, "optim.zero", cfg.optim.zero,
               "PyTorch's ZeRO; with dist.strategy=deepspeed set dist.zero_stage instead")
        _check(cfg.train.precision != "fp16", "train.precision", cfg.train.precision,
               "dist.strategy=deepspeed runs kd's bf16 or fp32 autocast")
    _check_teachers(cfg)
    _check(cfg.checkpoint.best_metric != "student_ema_top1" or cfg.train.ema_decay is not None,
           "checkpoint.best_metric", cfg.checkpoint.best_metric,
           "student_ema_top1 needs train.ema_decay (the EMA of the student)")
    if cfg.teachers:
        _check(not cfg.distill.teacher_cache, "teachers", f"{len(cfg.teachers)} teachers",
               "distill.teacher_cache holds one teacher's logits: unset one of them")
    if cfg.data.transfer_set != "none":
        _check(cfg.distill.loss in ("soft", "hard", "token") or (
            cfg.distill.loss == "none" and bool(cfg.distill.features)), "distill.loss",
            cfg.distill.loss, "data.transfer_set needs soft, hard or token, or distill.features "
            "with none: unlabelled images have no label for the task term (none) or for DKD's "
            "target class (dkd)")
    if cfg.distill.teacher_cache:
        _check(not cfg.data.stream, "data.stream", cfg.data.stream,
               "distill.teacher_cache looks its rows up by sample index; set data.stream=false")


def validate(cfg: KDConfig) -> None:
    """Check what types alone cannot (ranges, choices, combinations): every section on its own
    (:data:`SECTION_CHECKS`), then the combinations (:func:`check_combinations`).

    Raises:
        ConfigError: the first invalid value, naming its key and what it must be.
    """
    for section, check in SECTION_CHECKS.items():
        check(getattr(cfg, section))
    check_combinations(cfg)


def to_yaml(cfg: KDConfig) -> str:
    """The resolved config as YAML, as printed by ``kd config`` and saved as config.yaml."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_container(cfg: Any) -> dict:
    """A config (or one of its sections) as plain dicts and lists."""
    tree = OmegaConf.structured(cfg)
    return OmegaConf.to_container(tree, resolve=True)  # type: ignore[return-value]


def reference_markdown() -> str:
    """The configuration reference table for the README, generated from the schema."""
    rows = ["| key | default | description |", "| --- | --- | --- |"]
    defaults = to_container(KDConfig())
    for key, f in iter_fields():
        value: Any = defaults
        for part in key.split("."):
            value = value[part]
        shown = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
        shown = shown.removesuffix("\n...").removesuffix("...").strip()
        doc = f.metadata["doc"]
        choices = CHOICES.get(key)
        if choices and "`" not in doc:
            doc += " One of: " + ", ".join(f"`{c}`" for c in choices) + "."
        rows.append(f"| `{key}` | `{shown}` | {doc} |")
    return "\n".join(rows) + "\n"
