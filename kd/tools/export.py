"""Export a trained student so plain timm loads it.

The output directory holds ``model.safetensors`` and timm's ``config.json`` (architecture,
model arguments, input size, mean/std), so either of these works without kd::

    timm.create_model("local-dir:/path/to/export", pretrained=True)
    timm.create_model(name, pretrained=True,
                      pretrained_cfg_overlay=dict(file="/path/to/export/model.safetensors",
                                                  num_classes=N),
                      num_classes=N, **kwargs)

(``num_classes`` belongs in the overlay too: timm drops a pretrained classifier whose class count
differs from the pretrained config's.)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from kd.config import load_config
from kd.core import checkpoint as ckpt
from kd.core.models import build_input_norm, build_student, describe_mismatch
from kd.errors import CheckpointError, UserError, output_error


def export_student(checkpoint: str | Path, out: str | Path, ema: bool = False) -> Path:
    """Write the checkpoint's student (its EMA with ``ema``) to ``out`` (replaced atomically);
    returns ``out``."""
    import timm.models

    student_state, state, config_yaml = ckpt.load(checkpoint)
    if ema:
        if "ema" not in state:
            raise UserError(f"--ema: checkpoint {checkpoint} holds no EMA of the student (its "
                            f"run had no train.ema_decay); export without --ema")
        student_state = state["ema"]
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        cfg_path = Path(tmp) / "config.yaml"
        cfg_path.write_text(config_yaml)
        cfg = load_config(str(cfg_path))
    model = build_student(cfg.student, cfg.data.num_classes)
    mismatch = describe_mismatch(model.state_dict(), student_state)
    if mismatch:  # weights and config.yaml of different students (one of them replaced)
        raise CheckpointError(f"checkpoint {checkpoint}: its student weights do not fit its "
                              f"config.yaml (student.name/student.kwargs): {mismatch}")
    model.load_state_dict(student_state)
    norm = build_input_norm(model, cfg.student.mean, cfg.student.std, "student")
    channels = int(norm.mean.numel())
    size = cfg.data.image_size
    data_config = {"input_size": (channels, size, size),
                   "mean": tuple(norm.mean.flatten().tolist()),
                   "std": tuple(norm.std.flatten().tolist()), "crop_pct": 1.0}
    model_args = {**dict(cfg.student.kwargs), "num_classes": cfg.data.num_classes}
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp"))
    except OSError as e:
        raise output_error(f"--out {out}: cannot write it", e, setting="--out") from None
    try:
        timm.models.save_for_hf(model, str(staging), model_args=model_args,
                                safe_serialization=True, data_config=data_config)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
