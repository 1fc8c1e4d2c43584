"""Unit tests for kd.core.losses against independent float64 references.

The references below are written with plain numpy (float64) math from the papers'
definitions and deliberately use different code paths from the implementation (e.g.
deleting the target column instead of masking it, probabilities instead of log-space).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kd.core.losses import dkd, hard_kd, soft_kd, soft_target_cross_entropy

# ----------------------------------------------------------------------------------------
# float64 numpy references
# ----------------------------------------------------------------------------------------


def np64(x: torch.Tensor) -> np.ndarray:
    """Exact float64 copy of a tensor (bf16/fp16/fp32 values are representable)."""
    return x.detach().to(torch.float64).cpu().numpy()


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_logsumexp(z: np.ndarray) -> np.ndarray:
    m = z.max(axis=-1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[..., 0]


def np_kl_rows(log_p: np.ndarray, log_q: np.ndarray) -> np.ndarray:
    """Row-wise KL(p || q) with the 0 * log 0 = 0 convention."""
    p = np.exp(log_p)
    out = np.zeros_like(p)
    nz = p > 0
    out[nz] = p[nz] * (log_p[nz] - log_q[nz])
    return out.sum(axis=-1)


def np_reduce(per_sample: np.ndarray, w: np.ndarray | None) -> float:
    if w is None:
        return float(per_sample.mean())
    if w.sum() == 0:
        return 0.0
    return float((w * per_sample).sum() / w.sum())


def ref_soft_kd(s, t, T, w=None) -> float:
    kl = np_kl_rows(np_log_softmax(t / T), np_log_softmax(s / T))  # KL(p_t || p_s)
    return np_reduce(kl, w) * T * T


def ref_hard_kd(s, t, w=None) -> float:
    y = t.argmax(axis=-1)
    ce = -np_log_softmax(s)[np.arange(len(y)), y]
    return np_reduce(ce, w)


def ref_dkd(s, t, y, alpha, beta, T, w=None) -> float:
    """DKD (Zhao et al. 2022, Eq. 7) per sample, non-target classes by column deletion."""
    per = []
    for i in range(s.shape[0]):
        zs, zt, c = s[i] / T, t[i] / T, int(y[i])
        ls, lt = np_log_softmax(zs), np_log_softmax(zt)
        others_s, others_t = np.delete(ls, c), np.delete(lt, c)
        b_s = np.array([ls[c], np_logsumexp(others_s)])
        b_t = np.array([lt[c], np_logsumexp(others_t)])
        tckd = np_kl_rows(b_t, b_s)
        nckd = np_kl_rows(np_log_softmax(np.delete(zt, c)), np_log_softmax(np.delete(zs, c)))
        per.append(alpha * tckd + beta * nckd)
    return np_reduce(np.array(per), w) * T * T


def ref_ce(z, targets, eps=0.0, w=None) -> float:
    C = z.shape[1]
    q = np.eye(C)[targets.astype(int)] if targets.ndim == 1 else targets.astype(np.float64)
    q = (1 - eps) * q + eps / C
    ce = -(q * np_log_softmax(z)).sum(axis=-1)
    return np_reduce(ce, w)


def mdistiller_dkd(s, t, y, alpha, beta, T) -> torch.Tensor:
    """The authors' reference implementation (mdistiller), float64, for moderate logits."""
    gt = F.one_hot(y, s.shape[1]).to(s.dtype)
    other = 1 - gt
    ps, pt = F.softmax(s / T, dim=1), F.softmax(t / T, dim=1)

    def cat_mask(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * other).sum(1, keepdim=True)], 1)

    ps2, pt2 = cat_mask(ps), cat_mask(pt)
    tckd = F.kl_div(torch.log(ps2), pt2, reduction="sum") * T**2 / s.shape[0]
    pt_nc = F.softmax(t / T - 1000.0 * gt, dim=1)
    ls_nc = F.log_softmax(s / T - 1000.0 * gt, dim=1)
    nckd = F.kl_div(ls_nc, pt_nc, reduction="sum") * T**2 / s.shape[0]
    return alpha * tckd + beta * nckd


def check(value: torch.Tensor, expected: float, rtol=1e-5, atol=1e-6) -> None:
    value = value.detach()
    assert value.dtype == torch.float32
    assert value.dim() == 0
    assert torch.isfinite(value)
    np.testing.assert_allclose(value.item(), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------

B, C = 6, 10
TEMPS = [1.0, 2.0, 4.0]


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(B, C, generator=g) * 3
    t = torch.randn(B, C, generator=g) * 3
    y = torch.randint(0, C, (B,), generator=g)
    w = torch.rand(B, generator=g)
    return s, t, y, w


def soft_targets(y: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Mixup-like soft targets: lam * onehot(y) + (1 - lam) * onehot(y rolled)."""
    lam = 0.7
    return lam * F.one_hot(y, C).float() + (1 - lam) * F.one_hot(y.roll(1), C).float()


# ----------------------------------------------------------------------------------------
# values against references
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TEMPS)
def test_soft_kd_matches_reference(logits, T):
    s, t, _, w = logits
    check(soft_kd(s, t, temperature=T), ref_soft_kd(np64(s), np64(t), T))
    check(soft_kd(s, t, temperature=T, weight=w), ref_soft_kd(np64(s), np64(t), T, np64(w)))


def test_soft_kd_value_is_not_trivial(logits):
    s, t, _, _ = logits
    # Guard against a silently-zero loss passing the reference comparisons.
    assert float(soft_kd(s, t, temperature=2.0)) > 0.1


def test_hard_kd_matches_reference(logits):
    s, t, _, w = logits
    check(hard_kd(s, t), ref_hard_kd(np64(s), np64(t)))
    check(hard_kd(s, t, weight=w), ref_hard_kd(np64(s), np64(t), np64(w)))


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("alpha,beta", [(1.0, 8.0), (0.5, 2.0), (1.0, 0.0), (0.0, 1.0)])
def test_dkd_matches_reference(logits, T, alpha, beta):
    s, t, y, w = logits
    ref = ref_dkd(np64(s), np64(t), np64(y).astype(int), alpha, beta, T)
    check(dkd(s, t, y, alpha=alpha, beta=beta, temperature=T), ref)
    ref_w = ref_dkd(np64(s), np64(t), np64(y).astype(int), alpha, beta, T, np64(w))
    check(dkd(s, t, y, alpha=alpha, beta=beta, temperature=T, weight=w), ref_w)


@pytest.mark.parametrize("T", TEMPS)
def test_dkd_matches_authors_implementation(logits, T):
    s, t, y, _ = logits
    expected = mdistiller_dkd(s.double(), t.double(), y, 1.0, 8.0, T)
    check(dkd(s, t, y, alpha=1.0, beta=8.0, temperature=T), float(expected))


def test_dkd_default_hyperparameters(logits):
    s, t, y, _ = logits
    ref = ref_dkd(np64(s), np64(t), np64(y).astype(int), 1.0, 8.0, 4.0)
    check(dkd(s, t, y), ref)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_cross_entropy_index_targets(logits, eps):
    s, _, y, w = logits
    check(soft_target_cross_entropy(s, y, label_smoothing=eps), ref_ce(np64(s), np64(y), eps))
    check(
        soft_target_cross_entropy(s, y, label_smoothing=eps, weight=w),
        ref_ce(np64(s), np64(y), eps, np64(w)),
    )
    # Same convention as torch's F.cross_entropy(label_smoothing=...).
    torch_ref = F.cross_entropy(s.double(), y, label_smoothing=eps)
    check(soft_target_cross_entropy(s, y, label_smoothing=eps), float(torch_ref))


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_soft_targets(logits, eps):
    s, _, y, w = logits
    q = soft_targets(y)
    check(soft_target_cross_entropy(s, q, label_smoothing=eps), ref_ce(np64(s), np64(q), eps))
    check(
        soft_target_cross_entropy(s, q, label_smoothing=eps, weight=w),
        ref_ce(np64(s), np64(q), eps, np64(w)),
    )
    torch_ref = F.cross_entropy(s.double(), q.double(), label_smoothing=eps)
    check(soft_target_cross_entropy(s, q, label_smoothing=eps), float(torch_ref))


def test_cross_entropy_one_hot_soft_targets_equal_index_targets(logits):
    s, _, y, _ = logits
    a = soft_target_cross_entropy(s, y, label_smoothing=0.1)
    b = soft_target_cross_entropy(s, F.one_hot(y, C).float(), label_smoothing=0.1)
    torch.testing.assert_close(a, b)


def test_cross_entropy_soft_targets_zero_prob_on_neg_inf_logit():
    z = torch.tensor([[0.0, float("-inf"), 1.0]])
    q = torch.tensor([[0.5, 0.0, 0.5]])
    out = soft_target_cross_entropy(z, q)
    check(out, ref_ce(np.array([[0.0, -1e300, 1.0]]), np64(q)))


def test_dkd_soft_targets_use_argmax(logits):
    s, t, y, w = logits
    q = soft_targets(y)  # lam = 0.7 on y, so argmax is y
    assert torch.equal(q.argmax(-1), y)
    torch.testing.assert_close(dkd(s, t, q), dkd(s, t, y), rtol=0, atol=0)
    ref = ref_dkd(np64(s), np64(t), np64(y).astype(int), 1.0, 8.0, 4.0, np64(w))
    check(dkd(s, t, q, weight=w), ref)
    # And the minority class of the mix is *not* used.
    assert not torch.allclose(dkd(s, t, q), dkd(s, t, y.roll(1)))


# ----------------------------------------------------------------------------------------
# edge cases
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TEMPS)
def test_identical_logits_give_zero(logits, T):
    s, _, y, _ = logits
    assert float(soft_kd(s, s.clone(), temperature=T)) == 0.0
    assert float(dkd(s, s.clone(), y, temperature=T)) == 0.0


def test_hard_kd_identical_logits_is_self_argmax_ce(logits):
    s, _, _, _ = logits
    out = hard_kd(s, s.clone())
    expected = float(-np.log(np.exp(np_log_softmax(np64(s))).max(axis=-1)).mean())
    check(out, expected)
    assert float(out) > 0


@pytest.mark.parametrize("scale", [1e3, 1e4])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_large_logits_are_finite_and_correct(scale, T):
    g = torch.Generator().manual_seed(3)
    s = torch.randn(B, C, generator=g) * scale
    t = torch.randn(B, C, generator=g) * scale
    y = torch.randint(0, C, (B,), generator=g)
    S, Tt, Y = np64(s), np64(t), np64(y).astype(int)
    # Absolute error of fp32 log-probs is ~ ulp(scale / T); results are O(scale * T).
    atol = 1e-3 * scale / T
    check(soft_kd(s, t, temperature=T), ref_soft_kd(S, Tt, T), rtol=1e-4, atol=atol)
    check(hard_kd(s, t), ref_hard_kd(S, Tt), rtol=1e-4, atol=atol)
    check(dkd(s, t, y, temperature=T), ref_dkd(S, Tt, Y, 1.0, 8.0, T), rtol=1e-4, atol=atol)
    check(soft_target_cross_entropy(s, y, 0.1), ref_ce(S, np64(y), 0.1), rtol=1e-4, atol=atol)


def test_dkd_saturated_binary_probabilities():
    # Teacher and student put all their (fp32) mass on the target: p_target == 1.0 exactly
    # in fp32, so log(1 - p_target) must come from log-space math, not log(0).
    s = torch.zeros(4, C)
    t = torch.zeros(4, C)
    y = torch.tensor([0, 3, 5, 9])
    s[torch.arange(4), y] = 300.0
    t[torch.arange(4), y] = 500.0
    t[:, 1] += 2.0  # make the non-target distribution of the teacher non-uniform
    s = s.requires_grad_()
    out = dkd(s, t, y, temperature=1.0)
    ref = ref_dkd(np64(s), np64(t), np64(y).astype(int), 1.0, 8.0, 1.0)
    check(out, ref, rtol=1e-4, atol=1e-5)
    assert ref > 1.0  # NCKD part is non-trivial despite the saturation
    out.backward()
    assert torch.isfinite(s.grad).all()


def test_dkd_large_logits_where_reference_mask_is_inexact():
    # Logits ~1e4: mdistiller's "- 1000 * one_hot" mask would not remove the target class.
    s = torch.tensor([[1e4, 0.0, -5.0, 3.0]])
    t = torch.tensor([[2e4, 1.0, -2.0, 0.0]])
    y = torch.tensor([0])
    out = dkd(s, t, y, temperature=1.0)
    check(out, ref_dkd(np64(s), np64(t), np64(y), 1.0, 8.0, 1.0), rtol=1e-5, atol=1e-4)


# ----------------------------------------------------------------------------------------
# dtypes and autocast
# ----------------------------------------------------------------------------------------

ALL_LOSSES = ["soft_kd", "hard_kd", "dkd", "ce_index", "ce_soft"]


def run_loss(name, s, t, y, w=None):
    if name == "soft_kd":
        return soft_kd(s, t, temperature=2.0, weight=w)
    if name == "hard_kd":
        return hard_kd(s, t, weight=w)
    if name == "dkd":
        return dkd(s, t, y, weight=w)
    if name == "ce_index":
        return soft_target_cross_entropy(s, y, label_smoothing=0.1, weight=w)
    if name == "ce_soft":
        return soft_target_cross_entropy(s, soft_targets(y).to(s.dtype), weight=w)
    raise AssertionError(name)


def run_ref(name, s, t, y, w=None):
    S, Tt, Y = np64(s), np64(t), np64(y).astype(int)
    W = None if w is None else np64(w)
    if name == "soft_kd":
        return ref_soft_kd(S, Tt, 2.0, W)
    if name == "hard_kd":
        return ref_hard_kd(S, Tt, W)
    if name == "dkd":
        return ref_dkd(S, Tt, Y, 1.0, 8.0, 4.0, W)
    if name == "ce_index":
        return ref_ce(S, Y, 0.1, W)
    if name == "ce_soft":
        return ref_ce(S, np64(soft_targets(y).to(s.dtype)), 0.0, W)
    raise AssertionError(name)


@pytest.mark.parametrize("name", ALL_LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_give_fp32_result(logits, name, dtype):
    s, t, y, w = logits
    s, t, w = s.to(dtype), t.to(dtype), w.to(dtype)
    # Reference from the *rounded* low-precision values, in float64.
    check(run_loss(name, s, t, y), run_ref(name, s, t, y), rtol=1e-5, atol=1e-5)
    check(run_loss(name, s, t, y, w), run_ref(name, s, t, y, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_fp32_result_inside_autocast(logits, name):
    s, t, y, _ = logits
    layer = torch.nn.Linear(C, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s_ac = layer(s)  # bf16 activations, as produced by a model under autocast
        t_ac = layer(t)
        assert s_ac.dtype == torch.bfloat16
        out = run_loss(name, s_ac, t_ac, y)
        out_fp32_inputs = run_loss(name, s, t, y)
    assert out.dtype == torch.float32
    check(out, run_ref(name, s_ac, t_ac, y), rtol=1e-5, atol=1e-5)
    check(out_fp32_inputs, run_ref(name, s, t, y))


# ----------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TEMPS)
def test_soft_kd_gradient_matches_analytic(logits, T):
    s, t, _, _ = logits
    s = s.clone().requires_grad_()
    soft_kd(s, t, temperature=T).backward()
    # d/ds [T^2 * mean_i KL(p_t || softmax(s/T))] = T * (softmax(s/T) - softmax(t/T)) / B
    S, Tt = np64(s), np64(t)
    expected = T * (np.exp(np_log_softmax(S / T)) - np.exp(np_log_softmax(Tt / T))) / B
    np.testing.assert_allclose(np64(s.grad), expected, rtol=1e-4, atol=1e-7)
    assert t.grad is None


def test_ce_and_hard_kd_gradients_match_analytic(logits):
    s, t, y, _ = logits
    S = np64(s)
    p = np.exp(np_log_softmax(S))
    for target, loss_fn in [
        (np.eye(C)[np64(y).astype(int)], lambda x: soft_target_cross_entropy(x, y)),
        (np.eye(C)[np64(t).argmax(-1)], lambda x: hard_kd(x, t)),
        (np64(soft_targets(y)), lambda x: soft_target_cross_entropy(x, soft_targets(y))),
    ]:
        x = s.clone().requires_grad_()
        loss_fn(x).backward()
        np.testing.assert_allclose(np64(x.grad), (p - target) / B, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_gradient_matches_float64_autograd(logits, T):
    s, t, y, w = logits

    def torch_ref(s64):  # probability-space DKD with column deletion, float64
        per = []
        for i in range(B):
            c = int(y[i])
            keep = [j for j in range(C) if j != c]
            ps, pt = F.softmax(s64[i] / T, -1), F.softmax(t[i].double() / T, -1)
            bs = torch.stack([ps[c], ps[keep].sum()])
            bt = torch.stack([pt[c], pt[keep].sum()])
            tckd = (bt * (bt.log() - bs.log())).sum()
            hs, ht = F.softmax(s64[i, keep] / T, -1), F.softmax(t[i, keep].double() / T, -1)
            nckd = (ht * (ht.log() - hs.log())).sum()
            per.append(tckd + 8.0 * nckd)
        per = torch.stack(per)
        return (w.double() * per).sum() / w.double().sum() * T * T

    s64 = s.double().requires_grad_()
    torch_ref(s64).backward()
    x = s.clone().requires_grad_()
    dkd(x, t, y, temperature=T, weight=w).backward()
    assert t.grad is None
    assert torch.isfinite(x.grad).all()
    torch.testing.assert_close(x.grad.double(), s64.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_gradients_flow_to_student_only(logits, name):
    s, t, y, w = logits
    s = s.clone().requires_grad_()
    t = t.clone()
    assert not t.requires_grad
    out = run_loss(name, s, t, y, w)
    assert out.requires_grad
    out.backward()
    assert s.grad is not None
    assert torch.isfinite(s.grad).all()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


# ----------------------------------------------------------------------------------------
# per-sample weights
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_weight_of_ones_equals_unweighted(logits, name):
    s, t, y, _ = logits
    ones = torch.ones(B)
    torch.testing.assert_close(run_loss(name, s, t, y, ones), run_loss(name, s, t, y))


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_zero_weights_give_zero_not_nan(logits, name):
    s, t, y, _ = logits
    s = s.clone().requires_grad_()
    out = run_loss(name, s, t, y, torch.zeros(B))
    assert float(out.detach()) == 0.0
    out.backward()
    assert torch.isfinite(s.grad).all()
    assert float(s.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("name", ALL_LOSSES)
def test_weight_scale_invariance_and_reference(logits, name):
    s, t, y, w = logits
    torch.testing.assert_close(run_loss(name, s, t, y, 5.0 * w), run_loss(name, s, t, y, w))
    check(run_loss(name, s, t, y, w), run_ref(name, s, t, y, w))


def test_weighted_mean_selects_samples(logits):
    s, t, _, _ = logits
    w = torch.zeros(B)
    w[2] = 3.0
    torch.testing.assert_close(
        soft_kd(s, t, temperature=2.0, weight=w), soft_kd(s[2:3], t[2:3], temperature=2.0)
    )


def test_zero_weight_sample_with_infinite_loss_is_ignored():
    s = torch.tensor([[float("-inf"), 0.0, 0.0], [1.0, 2.0, 3.0]])
    t = torch.tensor([[5.0, 0.0, 0.0], [3.0, 2.0, 1.0]])
    assert torch.isinf(soft_kd(s, t))  # KL is genuinely infinite for sample 0
    out = soft_kd(s, t, weight=torch.tensor([0.0, 1.0]))
    check(out, ref_soft_kd(np64(s[1:]), np64(t[1:]), 1.0))


# ----------------------------------------------------------------------------------------
# DeiT scaling, validation
# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", TEMPS)
@pytest.mark.parametrize("num_classes", [10, 100, 1000])
def test_deit_scaling_relation(T, num_classes):
    g = torch.Generator().manual_seed(7)
    s = torch.randn(4, num_classes, generator=g)
    t = torch.randn(4, num_classes, generator=g)
    s64, t64 = s.double(), t.double()
    deit = (
        F.kl_div(
            F.log_softmax(s64 / T, dim=1),
            F.log_softmax(t64 / T, dim=1),
            reduction="sum",
            log_target=True,
        )
        * (T * T)
        / s64.numel()
    )
    check(soft_kd(s, t, temperature=T), num_classes * float(deit))


def test_invalid_arguments_raise(logits):
    s, t, y, _ = logits
    with pytest.raises(ValueError):
        soft_kd(s, t[:, :-1])
    with pytest.raises(ValueError):
        soft_kd(s, t, temperature=0.0)
    with pytest.raises(ValueError):
        hard_kd(s[0], t[0])
    with pytest.raises(ValueError):
        soft_kd(s, t, weight=torch.ones(B + 1))
    with pytest.raises(ValueError):
        dkd(s, t, y.float())
    with pytest.raises(ValueError):
        dkd(s, t, torch.zeros(B, C + 1))
    with pytest.raises(ValueError):
        soft_target_cross_entropy(s, y, label_smoothing=1.5)
    with pytest.raises(ValueError):
        soft_target_cross_entropy(s, torch.zeros(B, C - 1))


def test_no_host_sync_on_meta_tensors():
    # Meta tensors have no data: any .item(), .cpu() value access or Python branch on a
    # tensor value raises, so this checks the losses are free of host synchronisations.
    s = torch.empty(B, C, device="meta")
    t = torch.empty(B, C, device="meta")
    y = torch.empty(B, dtype=torch.long, device="meta")
    w = torch.empty(B, device="meta")
    q = torch.empty(B, C, device="meta")
    outs = [
        soft_kd(s, t, temperature=2.0, weight=w),
        hard_kd(s, t, weight=w),
        dkd(s, t, y, weight=w),
        dkd(s, t, q, weight=w),
        soft_target_cross_entropy(s, y, label_smoothing=0.1, weight=w),
        soft_target_cross_entropy(s, q, label_smoothing=0.1, weight=w),
    ]
    for out in outs:
        assert out.shape == () and out.dtype == torch.float32


def test_docstring_math_example():
    # log(C) for uniform logits, a sanity anchor independent of the references above.
    z = torch.zeros(3, 7)
    y = torch.tensor([0, 1, 6])
    check(soft_target_cross_entropy(z, y), math.log(7))
