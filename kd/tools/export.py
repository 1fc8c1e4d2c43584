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

import contextlib
import importlib.util
import io
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.config import KDConfig, load_config
from kd.core import checkpoint as ckpt
from kd.core.models import build_input_norm, build_student, describe_mismatch
from kd.data.build import build_split
from kd.errors import CheckpointError, ExportError, UserError, output_error
from kd.tools.model_card import describe

FORMATS = ("safetensors", "onnx")
ONNX_OPSET = 18
# The largest |logit| difference between onnxruntime and PyTorch on the checked images: both run
# fp32, and a graph that differs by more computes something else (a wrong export).
ONNX_TOLERANCE = 1e-3
ONNX_CHECK_IMAGES = 1024  # validation images the exported graph is checked on


def export_student(checkpoint: str | Path, out: str | Path, ema: bool = False,
                   fmt: str = "safetensors", check_images: int = ONNX_CHECK_IMAGES,
                   command: str | None = None) -> tuple[Path, dict[str, Any] | None]:
    """Write the checkpoint's student (its EMA with ``ema``) to ``out`` (replaced atomically):
    timm's ``model.safetensors`` and ``config.json``, the model card ``README.md``
    (:mod:`kd.tools.model_card`), and with ``fmt="onnx"`` also ``model.onnx``
    (:func:`export_onnx`), checked before anything is written. Returns ``out`` and the ONNX
    check (None without ONNX). ``command``: what reproduces the export, for the card."""
    import timm.models

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if check_images < 1:
        raise UserError(f"--check-images {check_images}: check the graph on at least 1 image")
    if fmt == "onnx":
        require_onnx()

    student_state, _, config_yaml = ckpt.load(checkpoint, ema=ema)
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
    check = None
    try:
        timm.models.save_for_hf(model, str(staging), model_args=model_args,
                                safe_serialization=True, data_config=data_config)
        if fmt == "onnx":
            check = export_onnx(model.eval(), norm, cfg, staging / "model.onnx", check_images)
        command = command or f"kd export --checkpoint {checkpoint} --out {out}"
        (staging / "README.md").write_text(describe(cfg, Path(checkpoint), model, ema,
                                                    fmt == "onnx", command))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, check


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Loggers that narrate every pass (the ONNX exporter's) at WARNING for a while."""
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def require_onnx() -> None:
    """The ``onnx`` extra, or a one-line error naming it."""
    missing = [m for m in ("onnx", "onnxruntime", "onnxscript")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"--format onnx needs {', '.join(missing)}: pip install -e \".[onnx]\"")


def export_onnx(model: nn.Module, norm: nn.Module, cfg: KDConfig, path: Path,
                check_images: int = ONNX_CHECK_IMAGES) -> dict[str, Any]:
    """Export ``model`` (fp32, eval mode) to ONNX at ``path`` and check it.

    The graph takes normalised ``(batch, C, H, W)`` float32 images, as the timm model does,
    with a dynamic batch dimension; opset :data:`ONNX_OPSET`, through ``torch.onnx.export``'s
    ``torch.export`` path. It is checked with onnxruntime (CPU) against PyTorch on up to
    ``check_images`` images of the validation split: the largest absolute logit difference
    above :data:`ONNX_TOLERANCE` is an error; the top-1 agreement is reported.
    """
    import onnxruntime

    size, channels = cfg.data.image_size, int(norm.mean.numel())
    example = torch.zeros(2, channels, size, size)
    batch = torch.export.Dim("batch", min=1)
    # One file, unless the weights exceed what one protobuf holds (2 GiB; students are small).
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.5 * 2**30
    with contextlib.redirect_stdout(io.StringIO()), quiet("onnxscript", "onnx_ir", "torch.onnx"):
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                          input_names=["images"], output_names=["logits"],
                          dynamic_shapes={"x": {0: batch}}, external_data=external,
                          verbose=False)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    val = build_split(cfg.data, "val", channels)
    n = min(check_images, len(val))
    worst, agree, seen = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, n, 64):
            images = torch.stack([val[i][0] for i in range(start, min(start + 64, n))])
            x = norm(images).float()
            ours = model(x)
            theirs = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
            worst = max(worst, float((ours - theirs).abs().max()))
            agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
            seen += len(images)
    if not worst <= ONNX_TOLERANCE:
        raise ExportError(f"--format onnx: the exported graph's logits differ from PyTorch's by "
                          f"up to {worst:.3g} on {seen} validation images (tolerance "
                          f"{ONNX_TOLERANCE:g}); nothing was written: export without "
                          f"--format onnx")
    return {"opset": ONNX_OPSET, "images": seen, "max_abs_logit_diff": worst,
            "top1_agreement": agree / seen, "tolerance": ONNX_TOLERANCE}
