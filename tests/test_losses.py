"""Tests for w2s.losses, against values worked out by hand (not against the implementation)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from w2s import losses
from w2s.losses import Loss, build_loss, describe_loss, loss_names, loss_params, register_loss

LN3 = math.log(3.0)
LN9 = math.log(9.0)


def t(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def logit_for(p0: float) -> list[float]:
    """Logits [ln(p0/(1-p0)), 0] whose softmax is [p0, 1-p0]."""
    return [math.log(p0 / (1.0 - p0)), 0.0]


def h(*pairs: tuple[float, float]) -> float:
    """-sum target * ln(pred) over (target, pred) pairs: a hand-written cross entropy."""
    return -sum(q * math.log(p) for q, p in pairs if q > 0)


def close(x: torch.Tensor, expected: float) -> bool:
    return math.isclose(float(x.detach()), expected, rel_tol=1e-5, abs_tol=1e-6)


# --------------------------------------------------------------------------------------------- registry


def test_builtin_names() -> None:
    assert loss_names() == sorted(loss_names())
    assert {"entropy", "kl", "logconf", "product", "window", "xent"} <= set(loss_names())


def test_params_and_descriptions() -> None:
    assert loss_params("xent") == {}
    assert loss_params("kl") == {}
    assert loss_params("logconf") == {"aux_coef": 0.5, "warmup_frac": 0.1}
    assert loss_params("product") == {"alpha": 1.0, "beta": 1.0, "warmup_frac": 0.1}
    assert loss_params("window") == {"radius": 0.15}
    assert loss_params("entropy") == {"aux_coef": 0.5, "warmup_frac": 0.1}
    for name in loss_names():
        text = describe_loss(name)
        assert text and "\n" not in text


def test_unknown_loss_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown loss 'foo'; choose one of: entropy, kl, logconf"):
        build_loss("foo")
    for fn in (loss_params, describe_loss):
        with pytest.raises(ValueError, match="unknown loss 'foo'"):
            fn("foo")


def test_unknown_param_names_param_and_allowed() -> None:
    with pytest.raises(ValueError, match=r"'coef'.*'logconf'.*aux_coef, warmup_frac"):
        build_loss("logconf", {"coef": 0.3})
    with pytest.raises(ValueError, match=r"'radius'.*allowed: \(none\)"):
        build_loss("xent", {"radius": 0.3})


@pytest.mark.parametrize(
    ("name", "params", "field"),
    [
        ("logconf", {"aux_coef": -0.1}, "aux_coef"),
        ("logconf", {"aux_coef": 1.5}, "aux_coef"),
        ("logconf", {"warmup_frac": 1.2}, "warmup_frac"),
        ("logconf", {"warmup_frac": -0.1}, "warmup_frac"),
        ("logconf", {"aux_coef": "0.5"}, "aux_coef"),
        ("logconf", {"aux_coef": True}, "aux_coef"),
        ("logconf", {"aux_coef": float("nan")}, "aux_coef"),
        ("entropy", {"aux_coef": -1}, "aux_coef"),
        ("product", {"alpha": -1.0}, "alpha"),
        ("product", {"beta": None}, "beta"),
        ("window", {"radius": -0.01}, "radius"),
    ],
)
def test_bad_param_values_name_the_field(name: str, params: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        build_loss(name, params)


def test_build_with_params_and_int_coercion() -> None:
    loss = build_loss("logconf", {"aux_coef": 1, "warmup_frac": 0})
    assert isinstance(loss, Loss)
    assert loss_params("logconf") == {"aux_coef": 0.5, "warmup_frac": 0.1}  # defaults unchanged
    assert vars(loss) == {"aux_coef": 1.0, "warmup_frac": 0.0}


@pytest.fixture
def scratch_names() -> Iterator[list[str]]:
    """Names registered by a test, removed from the global registry afterwards."""
    names: list[str] = []
    yield names
    for name in names:
        losses._REGISTRY.pop(name, None)


def test_register_custom_loss(scratch_names: list[str]) -> None:
    scratch_names.append("test_scaled_xent")

    @register_loss("test_scaled_xent")
    @dataclass(frozen=True)
    class ScaledXent:
        """Cross entropy times a constant."""

        scale: float = 1.0

        def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
            return self.scale * torch.nn.functional.cross_entropy(logits, labels)

    assert "test_scaled_xent" in loss_names()
    assert loss_params("test_scaled_xent") == {"scale": 1.0}
    assert describe_loss("test_scaled_xent") == "Cross entropy times a constant."
    loss = build_loss("test_scaled_xent", {"scale": 2.0})
    # logits [0, 0] -> preds [1/2, 1/2]; any label row gives cross entropy ln 2.
    assert close(loss(t([[0.0, 0.0]]), t([[1.0, 0.0]]), 0.0), 2 * math.log(2))
    with pytest.raises(ValueError, match="scale"):
        build_loss("test_scaled_xent", {"scale": "big"})


def test_duplicate_registration_errors(scratch_names: list[str]) -> None:
    with pytest.raises(ValueError, match="'xent' is already registered"):

        @register_loss("xent")
        class Again:
            pass

    scratch_names.append("test_dup")

    @register_loss("test_dup")
    class First:
        def __call__(self, logits: torch.Tensor, labels: torch.Tensor, step_frac: float) -> torch.Tensor:
            return logits.sum()

    with pytest.raises(ValueError, match="already registered"):
        register_loss("test_dup")(First)
    assert loss_params("test_dup") == {}


# --------------------------------------------------------------------------------------------- every loss


@pytest.mark.parametrize("name", ["entropy", "kl", "logconf", "product", "window", "xent"])
@pytest.mark.parametrize("step_frac", [0.0, 0.05, 0.5, 1.0])
def test_finite_scalar_with_gradients(name: str, step_frac: float) -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 2, generator=gen, requires_grad=True)
    p1 = torch.rand(8, generator=gen)
    labels = torch.stack([1 - p1, p1], dim=1)
    out = build_loss(name, {"radius": 0.6} if name == "window" else None)(logits, labels, step_frac)
    assert out.ndim == 0 and torch.isfinite(out)
    out.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["entropy", "kl", "logconf", "product", "window", "xent"])
def test_low_precision_logits(name: str) -> None:
    logits = t([[0.0, LN3], [LN3, 0.0]]).to(torch.bfloat16)
    out = build_loss(name)(logits, t([[0.5, 0.5], [1.0, 0.0]]), 1.0)
    assert out.dtype == torch.float32 and torch.isfinite(out)


@pytest.mark.parametrize("name", ["entropy", "kl", "logconf", "product", "window", "xent"])
def test_shape_mismatch_is_value_error(name: str) -> None:
    with pytest.raises(ValueError, match="shape"):
        build_loss(name)(t([[0.0, 0.0]]), t([[1.0, 0.0], [0.0, 1.0]]), 0.0)
    with pytest.raises(ValueError, match="shape"):
        build_loss(name)(torch.zeros(2, 3), torch.zeros(2, 3), 0.0)


# --------------------------------------------------------------------------------------------- xent / kl


def test_xent_hand_value() -> None:
    # logits [0, ln 3] -> preds [1/4, 3/4]; labels [1/4, 3/4] -> the labels' own entropy.
    out = build_loss("xent")(t([[0.0, LN3]]), t([[0.25, 0.75]]), 0.3)
    assert close(out, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))


def test_xent_batch_mean() -> None:
    # Row 1: preds [1/4, 3/4], one-hot class 0 -> ln 4. Row 2: preds [1/2, 1/2] -> ln 2.
    out = build_loss("xent")(t([[0.0, LN3], [0.0, 0.0]]), t([[1.0, 0.0], [0.3, 0.7]]), 0.0)
    assert close(out, (math.log(4) + math.log(2)) / 2)


def test_kl_hand_values() -> None:
    kl = build_loss("kl")
    # preds [1/4, 3/4], labels [1/2, 1/2]: 1/2 ln(1/2 / 1/4) + 1/2 ln(1/2 / 3/4).
    assert close(kl(t([[0.0, LN3]]), t([[0.5, 0.5]]), 0.0), 0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    # One-hot labels (0 ln 0 = 0): KL = -ln(3/4) = xent.
    assert close(kl(t([[0.0, LN3]]), t([[0.0, 1.0]]), 0.0), -math.log(0.75))
    # Perfect fit -> 0, and batch mean over two rows.
    out = kl(t([[0.0, LN3], [0.0, LN3]]), t([[0.25, 0.75], [0.5, 0.5]]), 0.0)
    assert close(out, (0.0 + 0.5 * math.log(2) + 0.5 * math.log(2 / 3)) / 2)


def test_kl_direction_is_labels_to_student() -> None:
    # KL(labels || preds) != KL(preds || labels) here; check it is the former.
    preds, labels = (0.25, 0.75), (0.5, 0.5)
    forward = sum(p * math.log(p / q) for p, q in zip(labels, preds, strict=True))
    reverse = sum(q * math.log(q / p) for p, q in zip(labels, preds, strict=True))
    assert not math.isclose(forward, reverse)
    assert close(build_loss("kl")(t([[0.0, LN3]]), t([list(labels)]), 0.0), forward)


# --------------------------------------------------------------------------------------------- logconf

# Two examples where the student disagrees with the weak labels:
#   student preds [[3/4, 1/4], [1/4, 3/4]], weak labels [[0, 1], [1, 0]].
# mean weak label of class 1 = 1/2; quantile(preds[:,0] = [3/4, 1/4], 1/2) = 1/2 (linear interpolation),
# so the hardened student predictions are [[1, 0], [0, 1]].
DISAGREE_LOGITS = [[LN3, 0.0], [0.0, LN3]]
DISAGREE_LABELS = [[0.0, 1.0], [1.0, 0.0]]


def test_logconf_after_warmup_default_coef() -> None:
    loss = build_loss("logconf")  # aux_coef 0.5
    out = loss(t(DISAGREE_LOGITS), t(DISAGREE_LABELS), 0.5)
    # target = labels * 0.5 + hardened * 0.5 = [1/2, 1/2] for both rows.
    per_row = h((0.5, 0.75), (0.5, 0.25))
    assert close(out, per_row)


def test_logconf_after_warmup_custom_coef() -> None:
    loss = build_loss("logconf", {"aux_coef": 0.25, "warmup_frac": 0.2})
    out = loss(t(DISAGREE_LOGITS), t(DISAGREE_LABELS), 0.9)
    # Row 1: target = [0, 1] * 0.75 + [1, 0] * 0.25 = [1/4, 3/4] against preds [3/4, 1/4]; row 2 symmetric.
    assert close(out, h((0.25, 0.75), (0.75, 0.25)))


def test_logconf_quantile_threshold_three_examples() -> None:
    # preds[:,0] = [0.2, 0.5, 0.8]; weak labels put mass 1/3 on class 1 in total:
    # rows [[0.5, 0.5], [1, 0], [0.5, 0.5]] -> mean of class 1 = (0.5 + 0 + 0.5) / 3 = 1/3.
    # quantile at q=1/3 over 3 sorted values: position 2/3 -> 0.2 + (2/3)(0.5 - 0.2) = 0.4.
    # Hardened: 0.2 < 0.4 -> class 1; 0.5 >= 0.4 -> class 0; 0.8 -> class 0.
    logits = t([logit_for(0.2), logit_for(0.5), logit_for(0.8)])
    labels = t([[0.5, 0.5], [1.0, 0.0], [0.5, 0.5]])
    out = build_loss("logconf", {"aux_coef": 0.5})(logits, labels, 1.0)
    # Targets: [0.25, 0.75], [1, 0], [0.75, 0.25].
    rows = [h((0.25, 0.2), (0.75, 0.8)), h((1.0, 0.5)), h((0.75, 0.8), (0.25, 0.2))]
    assert close(out, sum(rows) / 3)


def test_logconf_step_zero_equals_xent() -> None:
    logits, labels = t(DISAGREE_LOGITS), t(DISAGREE_LABELS)
    out = build_loss("logconf", {"aux_coef": 0.9})(logits, labels, 0.0)
    assert close(out, math.log(4))  # pure cross entropy: -ln(1/4) for both rows
    assert close(out, float(build_loss("xent")(logits, labels, 0.0)))


def test_logconf_warmup_follows_openai_schedule() -> None:
    # openai: coef = aux_coef * (step_frac if step_frac <= warmup_frac else 1).
    logits, labels = t(DISAGREE_LOGITS), t(DISAGREE_LABELS)
    loss = build_loss("logconf", {"aux_coef": 0.5, "warmup_frac": 0.1})
    for step_frac, coef in [(0.05, 0.025), (0.1, 0.05), (0.1001, 0.5)]:
        # Row 1 target = [coef, 1 - coef] against preds [3/4, 1/4]; row 2 symmetric.
        expected = h((coef, 0.75), (1 - coef, 0.25))
        assert close(loss(logits, labels, step_frac), expected), step_frac


def test_logconf_hardened_target_is_detached() -> None:
    # Gradient of CE wrt logits is softmax - target; with target = [1/2, 1/2] per row (see above) and preds
    # [3/4, 1/4] / [1/4, 3/4], the gradient is (preds - target) / B.
    logits = t(DISAGREE_LOGITS).requires_grad_(True)
    build_loss("logconf")(logits, t(DISAGREE_LABELS), 1.0).backward()
    expected = torch.tensor([[0.25, -0.25], [-0.25, 0.25]]) / 2
    assert logits.grad is not None and torch.allclose(logits.grad, expected, atol=1e-6)


# --------------------------------------------------------------------------------------------- product


def test_product_alpha_beta_one() -> None:
    loss = build_loss("product")
    # preds [1/4, 3/4] x labels [1/2, 1/2] -> [1/8, 3/8] -> normalised [1/4, 3/4].
    assert close(loss(t([[0.0, LN3]]), t([[0.5, 0.5]]), 0.5), h((0.25, 0.25), (0.75, 0.75)))
    # preds [1/4, 3/4] x labels [3/4, 1/4] -> [3/16, 3/16] -> [1/2, 1/2].
    assert close(loss(t([[0.0, LN3]]), t([[0.75, 0.25]]), 0.5), h((0.5, 0.25), (0.5, 0.75)))


def test_product_exponents() -> None:
    logits, labels = t([[0.0, LN3]]), t([[0.75, 0.25]])
    # beta = 0: target = labels -> plain cross entropy.
    assert close(build_loss("product", {"beta": 0.0})(logits, labels, 0.0), h((0.75, 0.25), (0.25, 0.75)))
    # alpha = 2: [1/4 * 9/16, 3/4 * 1/16] = [9/64, 3/64] -> [3/4, 1/4].
    out = build_loss("product", {"alpha": 2.0})(logits, labels, 0.0)
    assert close(out, h((0.75, 0.25), (0.25, 0.75)))


def test_product_target_detached() -> None:
    # target [1/4, 3/4] equals preds, so the gradient (preds - target) is zero.
    logits = t([[0.0, LN3]]).requires_grad_(True)
    build_loss("product")(logits, t([[0.5, 0.5]]), 0.0).backward()
    assert logits.grad is not None and torch.allclose(logits.grad, torch.zeros(1, 2), atol=1e-6)


# --------------------------------------------------------------------------------------------- window


def test_window_only_uncertain_examples_divided_by_batch() -> None:
    # preds: [1/4, 3/4] (max 0.75), [1/2, 1/2] (max 0.5), [9/10, 1/10] (max 0.9).
    logits = t([[0.0, LN3], [0.0, 0.0], [LN9, 0.0]])
    labels = t([[1.0, 0.0], [0.2, 0.8], [0.0, 1.0]])
    # radius 0.15: only max < 0.65 -> row 2, CE = ln 2; divided by the batch of 3.
    assert close(build_loss("window")(logits, labels, 0.0), math.log(2) / 3)
    # radius 0.3: max < 0.8 -> rows 1 and 2: ln 4 + ln 2.
    out = build_loss("window", {"radius": 0.3})(logits, labels, 0.0)
    assert close(out, (math.log(4) + math.log(2)) / 3)
    # radius 0.51: every row: + ln 10.
    out = build_loss("window", {"radius": 0.51})(logits, labels, 0.0)
    assert close(out, (math.log(4) + math.log(2) + math.log(10)) / 3)


def test_window_all_confident_is_zero_with_graph() -> None:
    logits = t([[LN9, 0.0]]).requires_grad_(True)
    out = build_loss("window", {"radius": 0.0})(logits, t([[0.0, 1.0]]), 0.0)
    assert float(out.detach()) == 0.0
    out.backward()
    assert logits.grad is not None and torch.equal(logits.grad, torch.zeros(1, 2))


# --------------------------------------------------------------------------------------------- entropy


def test_entropy_after_warmup() -> None:
    # preds [1/4, 3/4], labels [1, 0], coef 0.5: target = [1/2, 0] + [1/8, 3/8] = [5/8, 3/8].
    out = build_loss("entropy")(t([[0.0, LN3]]), t([[1.0, 0.0]]), 0.5)
    assert close(out, h((0.625, 0.25), (0.375, 0.75)))


def test_entropy_linear_warmup() -> None:
    loss = build_loss("entropy", {"aux_coef": 0.5, "warmup_frac": 0.1})
    logits, labels = t([[0.0, LN3]]), t([[1.0, 0.0]])
    # step_frac 0 -> plain cross entropy -ln(1/4).
    assert close(loss(logits, labels, 0.0), math.log(4))
    # step_frac 0.05 = half the warm-up -> coef 0.25: target = [3/4, 0] + [1/16, 3/16] = [13/16, 3/16].
    assert close(loss(logits, labels, 0.05), h((13 / 16, 0.25), (3 / 16, 0.75)))
    # warmup_frac 0 -> full coefficient at once.
    no_warmup = build_loss("entropy", {"warmup_frac": 0.0})
    assert close(no_warmup(logits, labels, 0.0), h((0.625, 0.25), (0.375, 0.75)))
