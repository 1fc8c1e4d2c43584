"""kd's tensor form of timm's training transform (data.pipeline=kd): the same random draws as
timm's PIL transform for every seed, the same pixels up to resampling details, per op and end to
end, and a pure function of the seed."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from kd.data.augment import seeded
from kd.data.datasets import build_image_transform, decode_rgb, load_image, transform_image
from kd.data.tensor_transform import (
    GEOMETRIC_OPS,
    TENSOR_OPS,
    TensorTrainTransform,
    dct_scale,
    tensor_transform,
)

DEIT = {"auto_augment": "rand-m9-mstd0.5-inc1", "re_prob": 0.25, "scale": (0.08, 1.0),
        "hflip": 0.5, "color_jitter": 0.0}


def photo(seed: int, w: int, h: int) -> bytes:
    """A photo-like JPEG: smooth shapes plus fine texture (noise would decode unlike photos)."""
    rng = np.random.default_rng(seed)
    acc = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 90), (12, 40), (max(2, w // 4), 20)):
        coarse = rng.integers(0, 256, (max(2, cells * h // w), cells, 3), dtype=np.uint8)
        up = Image.fromarray(coarse).resize((w, h), Image.BICUBIC)
        acc += (np.asarray(up, np.float32) - 128) * amp / 128
    buf = io.BytesIO()
    Image.fromarray((acc + 128).clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    return [photo(i, 160 + 8 * i, 120 + 4 * i) for i in range(8)]


def transforms(size: int = 64, **overrides) -> tuple[object, TensorTrainTransform]:
    timm = build_image_transform(size, True, {**DEIT, **overrides})
    fast = tensor_transform(timm)
    assert fast is not None
    return timm, fast


def recorded_timm_draws(timm, image: Image.Image, seed: int) -> tuple[tuple, list]:
    """The crop box and the (op, args) timm's transform draws for ``seed``."""
    crop = timm.transforms[0]
    ra = timm.transforms[2]
    seen: dict = {"ops": []}
    get_params = crop.get_params

    def record_crop(img, scale, ratio):
        seen["box"] = get_params(img, scale, ratio)
        return seen["box"]

    crop.get_params = record_crop
    originals = [op.aug_fn for op in ra.ops]
    for op in ra.ops:
        def record(img, *args, _op=op, _fn=op.aug_fn, **kwargs):
            seen["ops"].append((_op.name, args))
            return _fn(img, *args, **kwargs)
        op.aug_fn = record
    try:
        transform_image(timm, image, seed, "test")
    finally:
        crop.get_params = get_params
        for op, fn in zip(ra.ops, originals, strict=True):
            op.aug_fn = fn
    return seen["box"], seen["ops"]


def test_the_plan_is_what_timm_draws_for_every_seed(jpegs: list[bytes]) -> None:
    timm, fast = transforms()
    image = decode_rgb(jpegs[3])
    for seed in range(60):
        box, ops = recorded_timm_draws(timm, image, seed)
        plan = seeded(lambda: fast.plan(*image.size), seed)
        assert plan.box == box, seed
        assert [(op.name, args) for op, args, _ in plan.ops] == ops, seed


def test_end_to_end_pixels_match_timm_up_to_resampling(jpegs: list[bytes]) -> None:
    """Every seed draws the same crop, flip, ops and erasing, so images differ only by
    resampling and rounding (affine borders, ±1 levels that a later contrast or solarize
    threshold can amplify in a few pixels); a wrong draw would change most pixels."""
    timm, fast = transforms(re_prob=0.5)
    means, far = [], []
    for seed, data in enumerate(jpegs * 3):
        a = transform_image(timm, decode_rgb(data), seed, "timm")
        b = seeded(lambda data=data: fast(data), seed)
        assert a.shape == b.shape == (3, 64, 64) and b.dtype == torch.uint8
        diff = (a.float() - b.float()).abs()
        means.append(diff.mean().item())
        far.append((diff > 8).float().mean().item())
    assert np.mean(means) < 1.5 and sorted(far)[len(far) * 3 // 4] < 0.02, (means, far)
    assert sum(m < 0.05 for m in means) >= len(means) // 4  # many are (nearly) identical


@pytest.mark.parametrize("name", sorted(TENSOR_OPS))
def test_each_tensor_op_matches_timms_pil_op(name: str, jpegs: list[bytes]) -> None:
    """The tensor forms (used on the device): colour ops bit-exact, affine ops within a grey
    level on average (they differ only where the fill colour meets the image)."""
    from timm.data.auto_augment import AugmentOp

    hparams = {"translate_const": 40, "img_mean": (124, 116, 104), "magnitude_std": 0.5,
               "interpolation": Image.BILINEAR}
    op = AugmentOp(name, prob=1.0, magnitude=7, hparams=hparams)
    image = decode_rgb(jpegs[1]).resize((96, 80))
    x = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    random.seed(5)
    args = op.level_fn(7.0, op.hparams) if op.level_fn else ()
    expected = torch.from_numpy(np.array(op.aug_fn(image, *args, **op.kwargs))).permute(2, 0, 1)
    fn = TENSOR_OPS[name]
    got = (fn(x, args[0], op.kwargs["fillcolor"], "bilinear") if name in GEOMETRIC_OPS
           else fn(x, *args))
    diff = (expected.float() - got.float()).abs()
    if name in GEOMETRIC_OPS:
        assert diff.mean() < 1.5 and (diff > 2).float().mean() < 0.03, (diff.mean(), args)
    else:
        assert torch.equal(expected, got), (diff.mean(), args)


def test_a_seed_fixes_the_image_and_seeds_differ(jpegs: list[bytes]) -> None:
    _, fast = transforms()
    a, b = seeded(lambda: fast(jpegs[0]), 7), seeded(lambda: fast(jpegs[0]), 7)
    c = seeded(lambda: fast(jpegs[0]), 8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    state = random.getstate(), torch.get_rng_state(), np.random.get_state()[1].copy()
    # As datasets read it: NumPy's draws from the transform's own RandomState, seeded alike.
    for seed in range(12):
        assert torch.equal(load_image(fast, jpegs[1], seed, "x"),
                           seeded(lambda: fast(jpegs[1]), seed))
    assert random.getstate() == state[0] and torch.equal(torch.get_rng_state(), state[1])
    assert np.array_equal(np.random.get_state()[1], state[2])  # the callers' streams untouched


def test_large_crops_decode_at_a_reduced_jpeg_scale_with_the_same_result() -> None:
    """A crop at least twice the output's side is decoded by libjpeg at half scale or less:
    the same picture as decoding everything (only the resampling path differs)."""
    assert dct_scale(300, 300, (224, 224)) == 1
    assert dct_scale(460, 900, (224, 224)) == 2 and dct_scale(1800, 1900, (224, 224)) == 8
    timm, fast = transforms(size=32, scale=(0.9, 1.0), auto_augment=None, re_prob=0.0)
    data = photo(0, 400, 300)
    for seed in range(5):
        a = transform_image(timm, decode_rgb(data), seed, "timm").float()
        b = seeded(lambda: fast(data), seed).float()
        other = seeded(lambda: fast(data), seed + 100).float()  # another crop of the image
        assert seeded(lambda: fast.plan(400, 300), seed).box[2] >= 4 * 32  # scale 4 or 8
        assert (a - b).abs().mean() < min(8, (a - other).abs().mean() / 2)


def test_steps_without_a_tensor_form_keep_timms_transform() -> None:
    timm = build_image_transform(32, True, {**DEIT, "auto_augment": "augmix-m5-w4-d2",
                                            "pipeline": "kd"})
    assert not isinstance(timm, TensorTrainTransform)  # AugMix has no tensor form
    assert isinstance(build_image_transform(32, True, {**DEIT, "pipeline": "kd"}),
                      TensorTrainTransform)
    assert not isinstance(build_image_transform(32, False, {**DEIT, "pipeline": "kd"}),
                          TensorTrainTransform)  # evaluation stays timm's


def test_an_unreadable_image_is_an_oserror_and_a_failing_op_names_the_sample(
        jpegs: list[bytes]) -> None:
    from kd.errors import AugmentationError

    _, fast = transforms()
    with pytest.raises(OSError):
        seeded(lambda: fast(jpegs[0][:200]), 1)  # truncated
    with pytest.raises(OSError):
        seeded(lambda: fast(b"not an image"), 1)
    fast.size = (0, 0)  # an impossible resize
    with pytest.raises(AugmentationError, match="sample-7"):
        seeded(lambda: fast(jpegs[0], "sample-7"), 1)


# ------------------------------------------------------------------------------------------
# data.decode=device: the loader ships bytes and plans, the training process decodes
# ------------------------------------------------------------------------------------------


def device_transform(size: int = 32) -> TensorTrainTransform:
    fast = build_image_transform(size, True, {**DEIT, "pipeline": "kd", "decode": "device"})
    assert isinstance(fast, TensorTrainTransform) and fast.decode == "device"
    return fast


def test_device_decoding_gives_the_cpu_pipelines_images(jpegs: list[bytes]) -> None:
    """The same plans (drawn in the loader from the same seeds), decoded by torchvision in the
    training process (device=cpu here, nvJPEG on CUDA): the CPU path's images."""
    from kd.data.tensor_transform import EncodedBatch, EncodedImage

    fast = device_transform(96)  # crops under twice 96 px: the CPU path decodes at full scale
    cpu = build_image_transform(96, True, {**DEIT, "pipeline": "kd"})
    samples = [seeded(lambda d=d, i=i: fast(d, f"image {i}"), 50 + i)
               for i, d in enumerate(jpegs)]
    assert all(isinstance(s, EncodedImage) and s.encoded for s in samples)
    for s, d, i in zip(samples, jpegs, range(len(jpegs)), strict=True):
        plan = seeded(lambda d=d: cpu.plan(*decode_rgb(d).size), 50 + i)
        assert (s.plan.box, s.plan.flip) == (plan.box, plan.flip)
        assert [(op.name, a) for op, a, _ in s.plan.ops] == [(op.name, a) for op, a, _ in plan.ops]
    batch = EncodedBatch(samples).decode(torch.device("cpu"))
    expected = torch.stack([seeded(lambda d=d: cpu(d), 50 + i) for i, d in enumerate(jpegs)])
    assert batch.shape == expected.shape == (len(jpegs), 3, 96, 96)
    assert batch.dtype == torch.uint8
    assert (batch.float() - expected.float()).abs().mean() < 0.5


def test_device_decoding_takes_pngs_and_names_what_it_cannot_decode(jpegs: list[bytes]) -> None:
    from kd.data.tensor_transform import EncodedBatch
    from kd.errors import DataError

    fast = device_transform()
    buf = io.BytesIO()
    decode_rgb(jpegs[0]).save(buf, "PNG")
    png = seeded(lambda: fast(buf.getvalue()), 1)
    assert not png.encoded and png.data.shape[0] == 3  # decoded and cropped in the loader
    good = seeded(lambda: fast(jpegs[1]), 2)
    assert EncodedBatch([png, good]).decode(torch.device("cpu")).shape == (2, 3, 32, 32)
    truncated = jpegs[2][:len(jpegs[2]) // 2]  # the header parses, the pixels do not
    bad = seeded(lambda: fast(truncated, "broken.jpg"), 3)
    with pytest.raises(DataError, match=r"broken\.jpg.*data\.decode=cpu"):
        EncodedBatch([good, bad]).decode(torch.device("cpu"))


def test_the_device_path_reads_nothing_back_to_the_host(jpegs: list[bytes]) -> None:
    """Every tensor op, and a whole plan, runs on the meta device, where reading a value back to
    the host (``.item()``, ``.tolist()``, a data-dependent shape) raises: on a GPU the
    augmentation never synchronises."""
    from kd.data.tensor_transform import apply

    image = torch.empty(3, 60, 80, dtype=torch.uint8, device="meta")
    for name, fn in TENSOR_OPS.items():
        args = (0.3, (124, 116, 104), "bilinear") if name in GEOMETRIC_OPS else (
            () if name in ("AutoContrast", "Equalize", "Invert") else
            (3,) if "Posterize" in name else (1.5,))
        assert fn(image, *args).shape == image.shape, name
    _, fast = transforms(re_prob=1.0)
    for seed in range(20):  # plans with every kind of op, flips and erasing
        plan = seeded(lambda: fast.plan(80, 60), seed)
        assert apply(image, plan).shape == (3, 64, 64)


@pytest.mark.parametrize("name", ["AutoContrast", "Equalize", "ContrastIncreasing"])
def test_statistics_ops_match_pil_on_hard_images(name: str) -> None:
    """The ops that read image statistics, on a low-contrast image, one with a constant channel
    and one with two levels: bit-exact with PIL's."""
    from timm.data.auto_augment import AugmentOp

    rng = np.random.default_rng(1)
    low = rng.integers(100, 140, (30, 40, 3), dtype=np.uint8)
    constant = low.copy()
    constant[..., 1] = 77
    two_levels = np.where(rng.random((30, 40, 3)) < 0.5, 10, 200).astype(np.uint8)
    op = AugmentOp(name, prob=1.0, magnitude=7, hparams={"img_mean": (124, 116, 104)})
    for pixels in (low, constant, two_levels):
        image = Image.fromarray(pixels)
        args = op.level_fn(7.0, op.hparams) if op.level_fn else ()
        expected = torch.from_numpy(np.array(op.aug_fn(image, *args))).permute(2, 0, 1)
        got = TENSOR_OPS[name](torch.from_numpy(pixels).permute(2, 0, 1), *args)
        assert torch.equal(expected, got)
