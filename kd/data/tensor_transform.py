"""timm's training transform in tensor form: the same random draws, torch kernels, any device.

``data.pipeline: kd`` (the default) trains image datasets through :class:`TensorTrainTransform`
instead of timm's PIL transform. It is built *from* timm's transform
(:func:`kd.data.datasets.build_image_transform`), whose steps it reads for their settings, and it
works in two stages:

1. :meth:`TensorTrainTransform.plan` draws every random parameter of one sample — crop box,
   interpolation, flip, colour jitter, the RandAugment / AutoAugment ops and their magnitudes,
   the erased rectangle and its noise — from Python's, NumPy's and torch's generators in the
   order timm's own steps draw them. Under :func:`kd.data.augment.seeded` the plan is therefore
   the one timm would have drawn for that seed (tested against timm), and it needs only the
   source image's size, not its pixels.
2. :func:`apply` runs the plan on a uint8 (C, H, W) tensor on any device: crop and antialiased
   resize (``F.interpolate``), flips, affine ops by ``affine_grid`` / ``grid_sample`` with PIL's
   pixel-centre convention and fill colour, and the colour ops with PIL's formulas.

On the CPU (:meth:`TensorTrainTransform.__call__`) the JPEG is decoded at a reduced scale when the
crop allows it (libjpeg's DCT scaling through PIL's ``draft``: the crop must still have at least
the output's side at that scale, so no pixel is upsampled that would not have been), otherwise
by torchvision's libjpeg-turbo call, and the image stays uint8 from the decoder to the loader's
batch. With ``data.decode: device`` the loader ships the JPEG's bytes and the plan
(:class:`EncodedImage`) and the training process decodes and augments on its device
(:meth:`EncodedBatch.decode`).

Pixels differ from timm's PIL output only by resampling and rounding details (a mean absolute
difference of about one grey level, tested per op); the distribution of every parameter is
timm's. Steps kd has no tensor form for (AugMix, a vertical flip, custom transforms) make
:func:`tensor_transform` return None, and the dataset keeps timm's PIL transform. RandAugment /
AutoAugment ops without a tensor form (``GaussianBlur``, ``Desaturate``, ...; :data:`TENSOR_OPS`
names those that have one) run through PIL one by one. On the CPU the colour ops run through
PIL too: its lookup tables beat tensor arithmetic on one image there, with the same pixels.
"""

from __future__ import annotations

import contextlib
import io
import math
import random
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from kd.data.augment import ERASE_MEAN, ERASE_STD, PixelErasing, run_steps, transform_steps
from kd.errors import DataError

# ------------------------------------------------------------------------------ colour and shape
# The RandAugment / AutoAugment ops kd runs as tensors, by timm's op name. Each takes the uint8
# image, timm's level arguments, the fill colour and the interpolation.


def _blend(degenerate: torch.Tensor, image: torch.Tensor, factor: float) -> torch.Tensor:
    """PIL's ``Image.blend(degenerate, image, factor)``: clipped, truncated to uint8."""
    out = degenerate.float() + factor * (image.float() - degenerate.float())
    return out.clamp_(0, 255).to(torch.uint8)


def _grey(image: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L conversion (ITU-R 601-2 luma, rounded), as a (1, H, W) uint8 tensor."""
    r, g, b = image.int().unbind(0)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).to(torch.uint8)[None]


def affine(image: torch.Tensor, matrix: tuple[float, ...], fill: tuple[int, ...],
           mode: str) -> torch.Tensor:
    """PIL's ``Image.transform(size, AFFINE, matrix)``: output pixel (x, y) samples the input at
    ``(a·x' + b·y' + c, d·x' + e·y' + f)`` with x' = x + ½ (pixel centres); outside, ``fill``.

    The matrix is rewritten for ``affine_grid``'s normalised coordinates (align_corners=False:
    u = 2x'/W − 1), so the sampling grid is built by one kernel.
    """
    _, h, w = image.shape
    a, b, c, d, e, f = matrix
    theta = torch.tensor([[a, b * h / w, a + b * h / w + 2 * c / w - 1],
                          [d * w / h, e, d * w / h + e + 2 * f / h - 1]],
                         dtype=torch.float32, device=image.device)
    grid = F.affine_grid(theta[None], [1, 1, h, w], align_corners=False)
    x = torch.cat((image.float(), torch.ones((1, h, w), device=image.device)))[None]
    out = F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)[0]
    colour = torch.tensor(fill, dtype=torch.float32, device=image.device).view(-1, 1, 1)
    out = out[:-1].add_((1 - out[-1:]) * colour)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def rotation_matrix(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """The affine matrix of PIL's ``Image.rotate(degrees)`` about the image centre."""
    angle = -math.radians(degrees % 360.0)
    cos, sin = round(math.cos(angle), 15), round(math.sin(angle), 15)
    cx, cy = w / 2.0, h / 2.0
    return (cos, sin, cos * -cx + sin * -cy + cx, -sin, cos, -sin * -cx + cos * -cy + cy)


def _lookup(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Per-channel lookup tables ``table`` (C, 256) applied to a uint8 (C, H, W) image."""
    c = image.shape[0]
    return torch.gather(table, 1, image.reshape(c, -1).long()).reshape(image.shape)


def _autocontrast(image: torch.Tensor, *_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.autocontrast``: per channel the table ``int(x · scale + offset)`` in
    double precision, stretching [lo, hi] to [0, 255]; a constant channel stays as it is. No
    value is read back to the host (on a GPU nothing synchronises)."""
    flat_image = image.reshape(image.shape[0], -1)
    lo, hi = flat_image.amin(1).double(), flat_image.amax(1).double()
    flat = hi <= lo
    span = torch.where(flat, torch.ones_like(hi), hi - lo)
    scale = torch.full_like(span, 255.0) / span  # tensor by tensor: IEEE division, as PIL's
    offset = -lo * scale
    levels = torch.arange(256, dtype=torch.float64, device=image.device)
    table = (levels[None] * scale[:, None] + offset[:, None]).floor_().clamp_(0, 255)
    table = torch.where(flat[:, None], levels[None], table)
    return _lookup(image, table.to(torch.uint8))


def _equalize(image: torch.Tensor, *_: Any) -> torch.Tensor:
    """PIL's ``ImageOps.equalize``: per channel the table ``(step // 2 + pixels below) //
    step`` with ``step`` = (pixels − those of the last level present) // 255; a channel with
    one level, or too few pixels, stays as it is. No value is read back to the host."""
    c = image.shape[0]
    values = image.reshape(c, -1).long()
    hist = torch.zeros(c, 256, dtype=torch.long, device=image.device)
    hist.scatter_add_(1, values, torch.ones_like(values))
    levels = torch.arange(256, device=image.device)
    last = torch.where(hist > 0, levels, -1).amax(1)  # the highest level present
    step = (hist.sum(1) - hist.gather(1, last.clamp(min=0)[:, None])[:, 0]) // 255
    safe = step.clamp(min=1)[:, None]
    table = (hist.cumsum(1) - hist + safe // 2) // safe
    table = torch.where((step > 0)[:, None], table.clamp_(0, 255), levels[None])
    return _lookup(image, table.to(torch.uint8))


def _posterize(image: torch.Tensor, bits: int, *_: Any) -> torch.Tensor:
    if bits >= 8:
        return image
    mask = 0 if bits <= 0 else 0xFF & ~(2 ** (8 - bits) - 1)  # as kd.data.augment.posterize
    return image & mask


def _solarize(image: torch.Tensor, thresh: float, *_: Any) -> torch.Tensor:
    return torch.where(image >= thresh, 255 - image, image)


def _solarize_add(image: torch.Tensor, add: int, thresh: int = 128, *_: Any) -> torch.Tensor:
    return torch.where(image < thresh, (image.int() + add).clamp_(max=255).to(torch.uint8),
                       image)


def _colour(image: torch.Tensor, factor: float, *_: Any) -> torch.Tensor:
    return _blend(_grey(image).expand_as(image), image, factor)


def _contrast(image: torch.Tensor, factor: float, *_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Contrast``: a blend with the grey image's mean level, rounded
    (kept on the device)."""
    mean = (_grey(image).double().mean() + 0.5).floor()
    return _blend(mean.float().expand_as(image), image, factor)


def _brightness(image: torch.Tensor, factor: float, *_: Any) -> torch.Tensor:
    return _blend(torch.zeros_like(image), image, factor)


def _sharpness(image: torch.Tensor, factor: float, *_: Any) -> torch.Tensor:
    """PIL's ``ImageEnhance.Sharpness``: a blend with the SMOOTH-filtered image, whose border
    pixels PIL leaves unfiltered."""
    x = image.float()[None]
    # SMOOTH is (3×3 box sum + 4 × centre) / 13: a box filter, not a general convolution.
    smooth = (F.avg_pool2d(x, 3, stride=1) * 9 + 4 * x[..., 1:-1, 1:-1]).div_(13)[0].round_()
    degenerate = image.float().clone()
    degenerate[:, 1:-1, 1:-1] = smooth
    return _blend(degenerate, image, factor)


def _invert(image: torch.Tensor, *_: Any) -> torch.Tensor:
    return 255 - image


def _geometric(kind: str) -> Any:
    def op(image: torch.Tensor, level: float, fill: tuple[int, ...], mode: str) -> torch.Tensor:
        _, h, w = image.shape
        matrix = {"rotate": lambda: rotation_matrix(level, w, h),
                  "shear_x": lambda: (1, level, 0, 0, 1, 0),
                  "shear_y": lambda: (1, 0, 0, level, 1, 0),
                  "translate_x": lambda: (1, 0, level, 0, 1, 0),
                  "translate_y": lambda: (1, 0, 0, 0, 1, level),
                  "translate_x_rel": lambda: (1, 0, level * w, 0, 1, 0),
                  "translate_y_rel": lambda: (1, 0, 0, 0, 1, level * h)}[kind]()
        return affine(image, matrix, fill, mode)
    return op


GEOMETRIC_OPS = {"Rotate": "rotate", "ShearX": "shear_x", "ShearY": "shear_y",
                 "TranslateX": "translate_x", "TranslateY": "translate_y",
                 "TranslateXRel": "translate_x_rel", "TranslateYRel": "translate_y_rel"}
TENSOR_OPS: dict[str, Any] = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert,
    "Posterize": _posterize, "PosterizeIncreasing": _posterize, "PosterizeOriginal": _posterize,
    "Solarize": _solarize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "Color": _colour, "ColorIncreasing": _colour, "Contrast": _contrast,
    "ContrastIncreasing": _contrast, "Brightness": _brightness,
    "BrightnessIncreasing": _brightness, "Sharpness": _sharpness,
    "SharpnessIncreasing": _sharpness,
    **{name: _geometric(kind) for name, kind in GEOMETRIC_OPS.items()},
}
_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL resampling filters by value


def _mode(interpolation: Any) -> str:
    """grid_sample / interpolate mode of a PIL or torchvision interpolation."""
    value = getattr(interpolation, "value", interpolation)
    if isinstance(value, str):
        return {"bilinear": "bilinear", "bicubic": "bicubic", "nearest": "nearest"}[value]
    return _MODES[int(value)]


# ----------------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """Every random choice of one sample's augmentation (see the module docstring)."""

    box: tuple[int, int, int, int]  # top, left, height, width in source pixels
    size: tuple[int, int]  # the output's height and width
    interpolation: str
    flip: bool = False
    jitter: tuple[Any, ...] | None = None  # torchvision ColorJitter's (order, b, c, s, h)
    ops: list[tuple[Any, tuple[Any, ...], str]] = field(default_factory=list)  # op, args, mode
    erase: tuple[int, int, torch.Tensor] | None = None  # top, left, N(0, 1) noise (C, h, w)


class TensorTrainTransform:
    """timm's training transform ``timm_transform`` (built by kd) in tensor form.

    Build it with :func:`tensor_transform`, which returns None when a step has no tensor form.
    """

    def __init__(self, timm_transform: Any) -> None:
        self.steps: list[tuple[str, Any]] = []
        for step in transform_steps(timm_transform):
            kind = step_kind(step)
            if kind is None:
                raise NotImplementedError(f"no tensor form of {type(step).__name__}")
            if kind:  # "": the image is a tensor already
                self.steps.append((kind, step))
        if not self.steps or self.steps[0][0] != "crop":
            raise NotImplementedError("the transform does not start with a random-resized crop")
        self.size: tuple[int, int] = tuple(self.steps[0][1].size)  # type: ignore[assignment]
        self.decode = "cpu"  # or "device": the loader ships JPEG bytes (see encode)
        self._numpy = np.random.RandomState(0)  # reseeded per sample (plan)

    # -- drawing
    def plan(self, width: int, height: int, seed: int | None = None) -> Plan:
        """Draw one sample's parameters for a ``width`` × ``height`` source, in timm's order
        (call it under :func:`kd.data.augment.seeded`). NumPy's draws (RandAugment's choice of
        ops) come from this transform's own ``RandomState`` seeded with ``seed`` as ``seeded``
        seeds NumPy's global one (the same numbers, without saving and restoring that global
        state), or from the global one when ``seed`` is None."""
        numpy: Any = np.random
        if seed is not None:
            numpy = self._numpy
            numpy.seed(seed % 2**32)
        crop = self.steps[0][1]
        sized = torch.empty(1, 1, 1).expand(1, height, width)  # timm only asks for the size
        top, left, h, w = crop.get_params(sized, crop.scale, crop.ratio)
        interpolation = crop.interpolation
        if isinstance(interpolation, (list, tuple)):
            interpolation = random.choice(interpolation)
        plan = Plan((top, left, h, w), self.size, _mode(interpolation))
        for kind, step in self.steps[1:]:
            if kind == "hflip":
                plan.flip = bool(torch.rand(1) < step.p)
            elif kind == "jitter":
                plan.jitter = step.get_params(step.brightness, step.contrast, step.saturation,
                                              step.hue)
            elif kind == "randaugment":
                # The draw of np.random.choice(step.ops, ...), by index: no object array to
                # build at every sample.
                chosen = numpy.choice(len(step.ops), step.num_layers,
                                      replace=step.choice_weights is None,
                                      p=step.choice_weights)
                plan.ops += [drawn for i in chosen if (drawn := self._draw_op(step.ops[i]))]
            elif kind == "autoaugment":
                plan.ops += [drawn for op in random.choice(step.policy)
                             if (drawn := self._draw_op(op))]
            elif kind == "erase":
                plan.erase = self._draw_erase(step)
        return plan

    @staticmethod
    def _draw_op(op: Any) -> tuple[Any, tuple[Any, ...], str] | None:
        """timm's ``AugmentOp.__call__`` without the image: the coin, the magnitude (with its
        noise, clipped), the level arguments and, for geometric ops, the resampling filter."""
        if op.prob < 1.0 and random.random() > op.prob:
            return None
        magnitude = op.magnitude
        if op.magnitude_std == float("inf"):
            magnitude = random.uniform(0, magnitude)
        elif op.magnitude_std > 0:
            magnitude = random.gauss(magnitude, op.magnitude_std)
        magnitude = max(0.0, min(magnitude, op.magnitude_max or 10))
        args = op.level_fn(magnitude, op.hparams) if op.level_fn is not None else ()
        resample = op.kwargs.get("resample")
        if op.name in GEOMETRIC_OPS and isinstance(resample, (list, tuple)):
            resample = random.choice(resample)  # as timm's _interpolation, after the level
        return op, tuple(args), _mode(resample) if op.name in GEOMETRIC_OPS else "bilinear"

    def _draw_erase(self, step: PixelErasing) -> list[tuple[int, int, torch.Tensor]] | None:
        """PixelErasing's coin, then timm's ``RandomErasing`` draws on the output image: the
        rectangles and their N(0, 1) noise."""
        if random.random() > step.probability:
            return None
        erase = step.erase
        random.random()  # RandomErasing's own coin, at probability 1
        out_h, out_w = self.size
        count = erase.min_count if erase.min_count == erase.max_count else random.randint(
            erase.min_count, erase.max_count)
        rects = []
        for _ in range(count):
            for _attempt in range(10):
                target = random.uniform(erase.min_area, erase.max_area) * out_h * out_w / count
                aspect = math.exp(random.uniform(*erase.log_aspect_ratio))
                h = round(math.sqrt(target * aspect))
                w = round(math.sqrt(target / aspect))
                if w < out_w and h < out_h:
                    top, left = random.randint(0, out_h - h), random.randint(0, out_w - w)
                    rects.append((top, left, torch.empty((3, h, w)).normal_()))
                    break
        return rects

    # -- in the loader, from the encoded image
    def __call__(self, source: str | Path | bytes | BinaryIO, where: str = "an image",
                 seed: int | None = None) -> torch.Tensor | EncodedImage:
        """One training sample from ``source`` (a path, file or bytes; call it under
        :func:`kd.data.augment.seeded`).

        ``decode == "cpu"``: decoded at the smallest JPEG scale the planned crop allows and
        augmented here, a uint8 (C, H, W) tensor. ``"device"``: an :class:`EncodedImage`, the
        JPEG's bytes and the plan, for :meth:`EncodedBatch.decode` in the training process
        (an image nvJPEG cannot take, such as a PNG or a CMYK JPEG, is decoded and cropped
        here). An unreadable image raises OSError; a failing augmentation step an
        :class:`~kd.errors.AugmentationError` naming ``where``.
        """
        if self.decode == "device":
            return self.encoded(source, where, seed)
        return self.decoded(source, where, seed)

    def encoded(self, source: str | Path | bytes | BinaryIO, where: str,
                seed: int | None = None) -> EncodedImage:
        """The sample's bytes and plan, for decoding on the device (see :meth:`__call__`)."""
        data = read_bytes(source)
        img = open_image(data)
        plan = self.plan(*img.size, seed)
        if img.format == "JPEG" and img.mode in ("RGB", "L"):
            return EncodedImage(torch.frombuffer(bytearray(data), dtype=torch.uint8), plan,
                                where)
        return EncodedImage(crop_of(img.convert("RGB"), plan.box), plan, where)

    def decoded(self, source: str | Path | bytes | BinaryIO, where: str,
                seed: int | None = None) -> torch.Tensor:
        """The sample decoded and augmented here, on the CPU (see :meth:`__call__`)."""
        data = read_bytes(source)
        img = open_image(data)
        width, height = img.size
        plan = self.plan(width, height, seed)
        top, left, h, w = plan.box
        scale = dct_scale(h, w, self.size)
        if img.format == "JPEG" and img.mode in ("RGB", "L") and scale == 1:
            # torchvision's libjpeg-turbo call is faster than PIL's decoding and conversion.
            crop = decode_jpeg_cpu(data)[:, top:top + h, left:left + w]
            return run_steps([_Augment(plan)], crop, where)
        if scale > 1 and img.format == "JPEG":
            img.draft("RGB", (width // scale, height // scale))
        img = img.convert("RGB")  # decodes: truncated or corrupt data raise OSError here
        fx, fy = img.size[0] / width, img.size[1] / height
        box = (int(top * fy), int(left * fx), max(1, round(h * fy)), max(1, round(w * fx)))
        return run_steps([_Augment(plan)], crop_of(img, box), where)


def decode_jpeg_cpu(data: bytes) -> torch.Tensor:
    """An RGB uint8 (3, H, W) tensor from JPEG bytes; corrupt data raise OSError (an
    unreadable sample, as from PIL)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with quiet_deprecation():
            return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                               mode=ImageReadMode.RGB)
    except RuntimeError as e:
        reason = str(e).splitlines()[0].rsplit(", ", 1)[-1]  # without torchvision's source line
        raise OSError(f"cannot decode the JPEG: {reason}") from None


def crop_of(img: Any, box: tuple[int, int, int, int]) -> torch.Tensor:
    """The ``(top, left, height, width)`` box of a decoded RGB PIL image: a (C, H, W) uint8
    view of a channels-last copy of just that box."""
    top, left, h, w = box
    pixels = np.array(np.asarray(img)[top:top + h, left:left + w])  # a writable copy
    return torch.from_numpy(pixels).permute(2, 0, 1)


def read_bytes(source: str | Path | bytes | BinaryIO) -> bytes:
    """The encoded image behind ``source``."""
    if isinstance(source, bytes):
        return source
    if isinstance(source, (str, Path)):
        return Path(source).read_bytes()
    source.seek(0)
    return source.read()


@dataclass
class EncodedImage:
    """A training sample for ``data.decode: device``: ``data`` is the JPEG's bytes (1-D uint8)
    or, for an image the device decoder cannot take, the planned crop decoded in the loader
    ((C, h, w) uint8); ``plan`` is its augmentation."""

    data: torch.Tensor
    plan: Plan
    where: str

    @property
    def encoded(self) -> bool:
        return self.data.dim() == 1


class EncodedBatch:
    """A batch of :class:`EncodedImage` (what the loader collates with ``data.decode:
    device``); :meth:`decode` turns it into the uint8 (B, C, H, W) batch on a device."""

    def __init__(self, images: list[EncodedImage]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def decode(self, device: torch.device) -> torch.Tensor:
        """Decode the JPEGs on ``device`` in one call (nvJPEG on CUDA), then crop and run each
        sample's plan there. An image the device cannot decode is decoded by PIL instead; one
        nothing can decode is a :class:`~kd.errors.DataError` (it cannot be skipped here)."""
        jpegs = [i for i, image in enumerate(self.images) if image.encoded]
        decoded = dict(zip(jpegs, decode_jpegs([self.images[i] for i in jpegs], device),
                           strict=True))
        out = []
        for i, image in enumerate(self.images):
            if i in decoded:
                out.append(apply(decoded[i], image.plan))
            else:  # cropped in the loader
                out.append(finish(image.data.to(device, non_blocking=True), image.plan))
        return torch.stack(out)


def decode_jpegs(images: list[EncodedImage], device: torch.device) -> list[torch.Tensor]:
    """RGB uint8 (3, H, W) tensors on ``device`` (torchvision's ``decode_jpeg``; batched)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    if not images:
        return []
    data = [image.data for image in images]
    with quiet_deprecation():
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError:  # one bad image fails the batch: decode them one by one
            return [_decode_one(image, device) for image in images]


@contextlib.contextmanager
def quiet_deprecation() -> Iterator[None]:
    """torchvision 0.29 marks its image decoders deprecated in favour of TorchCodec (a
    DeprecationWarning at every call); they remain the way to reach nvJPEG from PyTorch that
    kd's tests cover, so the warning is silenced around the calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def _decode_one(image: EncodedImage, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with quiet_deprecation():
            return decode_jpeg(image.data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        pass
    try:  # what the device decoder refuses, PIL may still read
        img = open_image(image.data.numpy().tobytes()).convert("RGB")
    except OSError as e:
        raise DataError(f"cannot decode {image.where}: {e} (data.decode=device decodes in the "
                        f"training process, where an unreadable image cannot be skipped; set "
                        f"data.decode=cpu to skip it with data.on_error=skip)") from None
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device)


class _Augment:
    """One sample's planned augmentation as a step :func:`kd.data.augment.run_steps` can name."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan

    def __call__(self, crop: torch.Tensor) -> torch.Tensor:
        return finish(crop, self.plan)


def apply(image: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Run ``plan`` on a uint8 (C, H, W) image of the planned source size, on its device."""
    top, left, h, w = plan.box
    return finish(image[:, top:top + h, left:left + w], plan)


def finish(crop: torch.Tensor, plan: Plan) -> torch.Tensor:
    """Everything of ``plan`` after cropping, on ``crop``'s device: the resize to the output
    size, flip, colour jitter, RandAugment / AutoAugment ops and erasing; a contiguous uint8
    (C, H, W) tensor."""
    mode = plan.interpolation
    batch = crop[None]
    if crop.device.type == "cpu":  # torch's uint8 antialiased resize is fastest channels-last
        batch = batch.contiguous(memory_format=torch.channels_last)
    x = F.interpolate(batch, size=plan.size, mode=mode, antialias=mode != "nearest",
                      align_corners=None if mode == "nearest" else False)[0]
    if plan.flip:
        x = x.flip(-1)
    if plan.jitter is not None:
        x = _jitter(x, plan.jitter)
    on_cpu = x.device.type == "cpu"
    img = None  # the image as PIL, while colour ops run there
    for op, args, op_mode in plan.ops:
        fn = TENSOR_OPS.get(op.name)
        if fn is None or (on_cpu and op.name not in GEOMETRIC_OPS):
            # No tensor form, or a colour op on the CPU: PIL's lookup tables are faster
            # there than tensor arithmetic (and give the same pixels, tested).
            img = img if img is not None else _to_pil(x)
            img = op.aug_fn(img, *args, **op.kwargs)
            continue
        if img is not None:
            x, img = _from_pil(img, x.device), None
        if op.name in GEOMETRIC_OPS:
            x = fn(x, args[0], op.kwargs["fillcolor"], op_mode)
        else:
            x = fn(x, *args)
    if img is not None:
        x = _from_pil(img, x.device)
    if plan.erase:
        mean = torch.tensor(ERASE_MEAN, device=x.device).view(3, 1, 1) * 255
        std = torch.tensor(ERASE_STD, device=x.device).view(3, 1, 1) * 255
        for top, left, noise in plan.erase:
            patch = noise.to(x.device).mul(std).add_(mean).round_().clamp_(0, 255)
            x[:, top:top + noise.shape[1], left:left + noise.shape[2]] = patch.to(torch.uint8)
    return x.contiguous()


def dct_scale(h: int, w: int, size: tuple[int, int]) -> int:
    """The largest JPEG decoding scale (8, 4, 2 or 1) at which an ``h`` × ``w`` crop still
    covers ``size`` (nothing is upsampled that full-size decoding would have downsampled).

    Example:
        >>> dct_scale(300, 300, (224, 224)), dct_scale(448, 460, (224, 224))
        (1, 2)
    """
    for scale in (8, 4, 2):
        if h // scale >= size[0] and w // scale >= size[1]:
            return scale
    return 1


def open_image(source: str | Path | bytes | BinaryIO) -> Any:
    """A PIL image opened lazily (header read, pixels not yet decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise OSError("not an image file PIL can decode") from None


def _jitter(x: torch.Tensor, params: tuple[Any, ...]) -> torch.Tensor:
    """torchvision's ``ColorJitter`` with drawn parameters, on a tensor."""
    from torchvision.transforms import functional as TF

    order, brightness, contrast, saturation, hue = params
    for i in order.tolist():
        if i == 0 and brightness is not None:
            x = TF.adjust_brightness(x, brightness)
        elif i == 1 and contrast is not None:
            x = TF.adjust_contrast(x, contrast)
        elif i == 2 and saturation is not None:
            x = TF.adjust_saturation(x, saturation)
        elif i == 3 and hue is not None:
            x = TF.adjust_hue(x, hue)
    return x


def _to_pil(x: torch.Tensor) -> Any:
    from PIL import Image

    # (H, W, C) memory for PIL: a torch copy when x is (C, H, W) in memory (numpy's strided
    # copy inside fromarray is ten times slower).
    return Image.fromarray(x.permute(1, 2, 0).cpu().contiguous().numpy())


def _from_pil(img: Any, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).to(device)


def step_kind(step: Any) -> str | None:
    """What the tensor form does for a step of timm's training transform: ``crop``, ``hflip``,
    ``jitter``, ``randaugment``, ``autoaugment``, ``erase``, ``""`` (nothing: the image is a
    tensor already) or None (the step has no tensor form)."""
    from timm.data.auto_augment import AutoAugment, RandAugment
    from timm.data.transforms import MaybePILToTensor, RandomResizedCropAndInterpolation
    from torchvision import transforms as T

    kinds = ((RandomResizedCropAndInterpolation, "crop"), (T.RandomHorizontalFlip, "hflip"),
             (T.ColorJitter, "jitter"), (RandAugment, "randaugment"),
             (AutoAugment, "autoaugment"), (MaybePILToTensor, ""), (PixelErasing, "erase"))
    return next((kind for cls, kind in kinds if isinstance(step, cls)), None)


def unsupported_steps(timm_transform: Any) -> str:
    """The steps of ``timm_transform`` kd has no tensor form of, by class name."""
    return ", ".join(type(step).__name__ for step in transform_steps(timm_transform)
                     if step_kind(step) is None) or "its first step"


def tensor_transform(timm_transform: Any) -> TensorTrainTransform | None:
    """kd's tensor form of a training transform, or None when a step has none (the dataset
    then keeps ``timm_transform``)."""
    try:
        return TensorTrainTransform(timm_transform)
    except NotImplementedError:
        return None
