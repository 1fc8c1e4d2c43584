"""The model card ``kd export`` writes (``README.md``, Hugging Face's format) and the upload.

The card says what a user of the exported student needs to decide on it: its accuracy next to
the teacher's on the same validation split, their sizes, FLOPs and latencies measured on the
machine that exported (device named, medians after warm-up), how it was distilled, and the
command that reproduces the latencies. ``--push-to-hub`` uploads the exported folder with
``huggingface_hub``.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from kd import __version__
from kd.config import KDConfig, teacher_sections
from kd.core.dist import single_process
from kd.core.teachers import build_teachers
from kd.errors import UserError
from kd.tools.evaluate import evaluate_checkpoint, teacher_weights_here
from kd.tools.profiler import cpu_model, forward_flops
from kd.units import format_duration, format_flops

log = logging.getLogger("kd")

LATENCY_BATCHES = (1, 32)
LATENCY_WARMUP, LATENCY_RUNS = 3, 10


@torch.inference_mode()
def latency(model: nn.Module, shape: tuple[int, int, int], batch: int,
            device: torch.device, warmup: int = LATENCY_WARMUP,
            runs: int = LATENCY_RUNS) -> float:
    """Median seconds of one forward of ``batch`` images of ``shape`` on ``device`` (fp32,
    eval mode), after ``warmup`` forwards; one device synchronisation per run."""
    x = torch.randn(batch, *shape, device=device)
    model = model.to(device).eval()
    times = []
    for i in range(warmup + runs):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    threads = torch.get_num_threads()
    return f"{cpu_model()} ({threads} thread{'s' * (threads > 1)})"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f} %"


def render(facts: dict[str, Any]) -> str:
    """The card: YAML front matter (``library_name: timm``, tags, metrics) and the tables."""
    cfg: KDConfig = facts["cfg"]
    s, teachers = facts["student"], facts["teachers"]
    metrics = [] if s["top1"] is None else [
        {"name": "top-1 accuracy", "type": "accuracy", "value": round(100 * s["top1"], 2)},
        {"name": "top-5 accuracy", "type": "accuracy", "value": round(100 * s["top5"], 2)}]
    front = {"library_name": "timm", "license": "other",
             "tags": ["image-classification", "timm", "knowledge-distillation", "kd"],
             "model-index": [{"name": facts["name"], "results": [{
                 "task": {"type": "image-classification"},
                 "dataset": {"name": cfg.data.name, "type": cfg.data.name,
                             "split": "validation"},
                 "metrics": metrics}]}]}
    batches = LATENCY_BATCHES
    head = ("| model | top-1 | top-5 | parameters | FLOPs / image | "
            + " | ".join(f"latency, batch {b}" for b in batches) + " |")
    rows = [head, "| --- " * (5 + len(batches)) + "|"]
    for m in [s, *teachers]:
        lat = " | ".join(format_duration(m["latency"][b]) if m.get("latency") else "not measured"
                         for b in batches)
        rows.append(f"| {m['role']}: `{m['name']}` | {_pct(m['top1'])} | {_pct(m.get('top5'))} | "
                    f"{m['params'] / 1e6:.2f} M | {format_flops(m['flops'])} | {lat} |")
    d = cfg.distill
    pairs = yaml.safe_dump([vars(p) for p in d.features], default_flow_style=True,
                           width=10_000).strip()
    exported = ("its EMA (train.ema_decay), exported" if facts["ema"] else
                "on; the student itself is exported" if cfg.train.ema_decay else "off")
    settings = [f"- loss: `{d.loss}` (T = {d.temperature}, alpha = {d.alpha})",
                f"- feature pairs: `{pairs}`, projector `{d.projector}`" if d.features else
                "- feature pairs: none",
                "- teachers: " + ", ".join(f"`{t.name}`" for t in teacher_sections(cfg)),
                f"- data: `{cfg.data.name}`, {cfg.data.num_classes} classes, "
                f"{cfg.data.image_size} px; labels per class: "
                f"{cfg.data.labels_per_class or 'all'}; transfer set: `{cfg.data.transfer_set}`",
                f"- training: {facts['steps']} optimizer steps, `{cfg.optim.name}` at lr "
                f"{cfg.optim.lr}; EMA: {exported}"]
    teacher_names = " and ".join(f"`{t['name']}`" for t in teachers) or "its teacher"
    onnx = " (or `model.onnx` with onnxruntime)" if facts["onnx"] else ""
    return "\n".join([
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# {facts['name']}", "",
        f"A `{s['name']}` student distilled with kd {__version__} from {teacher_names}. Load it "
        f"with timm: `timm.create_model(\"local-dir:<this folder>\", pretrained=True)`{onnx}.",
        "", "## Accuracy, size and speed", "",
        (f"Top-1/top-5 on the {cfg.data.name} validation split ({facts['images']} images), the "
         f"student and the teacher(s) on the same images." if facts["images"] else
         "Accuracy: not measured (the validation split was not readable where this was "
         "exported).") + " Latency: median of "
        f"{LATENCY_RUNS} fp32 forwards after {LATENCY_WARMUP} warm-up ones, on "
        f"{facts['device']}.", "",
        *rows, "",
        "Reproduce the latencies:", "", "```bash", facts["command"], "```", "",
        "## Distillation", "", *settings, "",
        f"Exported by kd {__version__} with torch {torch.__version__}.", ""])


def describe(cfg: KDConfig, checkpoint: Path, student: nn.Module, ema: bool, onnx: bool,
             command: str) -> str:
    """Measure what the card reports and render it (:func:`render`).

    Accuracy comes from a ``kd eval`` pass over the validation split (the student, or its EMA,
    and every teacher whose weights are on this machine); when the split cannot be read here,
    the card says so and reports size, FLOPs and latency alone.
    """
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.train.device != "cpu"
                          else "cpu")
    try:
        record: dict[str, Any] | None = evaluate_checkpoint(
            cfg, single_process(device.type), checkpoint, ema=ema)
    except (UserError, OSError) as e:  # no data, or no teacher weights, here
        log.warning("model card: accuracy not measured (%s)", str(e).splitlines()[0])
        record = None
    shape = (cfg.student.channels, cfg.data.image_size, cfg.data.image_size)
    try:
        teachers = build_teachers(cfg) if teacher_weights_here(cfg) else None
    except (UserError, OSError) as e:
        log.warning("model card: teachers not measured (%s)", str(e).splitlines()[0])
        teachers = None
    models = [("student", cfg.student.name, student, shape)]
    for section, teacher in zip(teacher_sections(cfg), teachers or [], strict=False):
        size = section.image_size or cfg.data.image_size
        models.append(("teacher", section.name, teacher.model.float(), (shape[0], size, size)))
    entries = []
    for i, (role, name, model, model_shape) in enumerate(models):
        x = torch.zeros(1, *model_shape)
        flops = forward_flops(model, x)
        results = record["teachers"][i - 1] if record and i else {}
        entries.append({
            "role": role, "name": name, "params": sum(p.numel() for p in model.parameters()),
            "flops": flops,
            "top1": (record or {}).get("student_top1") if i == 0 else results.get("top1"),
            "top5": (record or {}).get("student_top5") if i == 0 else None,
            "latency": {b: latency(model, model_shape, b, device) for b in LATENCY_BATCHES}})
    student_entry, teacher_entries = entries[0], entries[1:]
    if record is None:
        student_entry["top1"] = student_entry["top5"] = None
    return render({"cfg": cfg, "name": f"{cfg.student.name}-kd", "student": student_entry,
                   "teachers": teacher_entries, "images": record["images"] if record else 0,
                   "steps": record["step"] if record else "?",
                   "device": device_name(device), "command": command, "ema": ema,
                   "onnx": onnx})


def push_to_hub(folder: Path, repo_id: str) -> str:
    """Upload ``folder`` to the Hugging Face model repository ``repo_id`` (created if needed);
    returns its URL. Without network or credentials: a :class:`~kd.errors.UserError`."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                          commit_message=f"kd {__version__} export")
    except (LocalTokenNotFoundError, HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"--push-to-hub {repo_id}: the upload failed ({first}); check the "
                        f"network and `huggingface-cli login` (or HF_TOKEN), or export without "
                        f"--push-to-hub (the folder {folder} is written)") from None
    return str(url)
