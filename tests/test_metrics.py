"""Metrics on hand-made cases whose answers are worked out by hand in the comments."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoscan import LABELS
from pneumoscan.labels import decide
from pneumoscan.metrics import choose_threshold, compute_metrics, prior_shift

# true:   normal normal bact   bact   viral  viral
Y = np.array([0, 0, 1, 1, 2, 2])
P = np.array([
    [0.9, 0.05, 0.05],  # P(pneu)=0.1 -> normal    (right)
    [0.4, 0.4, 0.2],    # 0.6 -> bacterial         (wrong)
    [0.2, 0.7, 0.1],    # 0.8 -> bacterial         (right)
    [0.6, 0.3, 0.1],    # 0.4 -> normal            (wrong)
    [0.1, 0.2, 0.7],    # 0.9 -> viral             (right)
    [0.3, 0.5, 0.2],    # 0.7 -> bacterial         (wrong)
])

SCHEMA = {
    "n", "labels", "confusion_matrix", "three_class", "normal_vs_pneumonia", "bacterial_vs_rest", "viral_vs_rest",
    "bacterial_vs_viral"}
BINARY = {"accuracy", "sensitivity", "specificity", "f1", "auc"}


def test_decide_uses_one_rule():
    assert decide(P, 0.5).tolist() == [0, 1, 1, 0, 2, 1]
    assert decide(P, 0.95).tolist() == [0] * 6  # nothing reaches the threshold
    assert decide(P, 0.0).tolist() == [1, 1, 1, 1, 2, 1]


def test_compute_metrics_known_answers():
    m = compute_metrics(Y, P, 0.5, n_boot=0)
    assert SCHEMA <= set(m)
    assert m["n"] == 6 and m["labels"] == list(LABELS)
    assert m["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [0, 1, 1]]  # rows are true labels
    assert m["three_class"]["accuracy"] == pytest.approx(0.5)
    # per-class F1: normal 1/2, bacterial 2*(1/3*1/2)/(1/3+1/2) = 0.4, viral 2/3
    assert m["three_class"]["macro_f1"] == pytest.approx((0.5 + 0.4 + 2 / 3) / 3)
    nvp = m["normal_vs_pneumonia"]
    assert {*BINARY, "threshold", "ci95"} <= set(nvp)
    # pneumonia positive: tp=3 tn=1 fp=1 fn=1; AUC: 7 of 8 (pos, neg) pairs ordered right
    assert (nvp["accuracy"], nvp["sensitivity"], nvp["specificity"], nvp["f1"], nvp["auc"], nvp["threshold"]) == \
        pytest.approx((4 / 6, 3 / 4, 1 / 2, 6 / 8, 7 / 8, 0.5))
    bvr = m["bacterial_vs_rest"]  # tp=1 fp=2 fn=1 tn=2; AUC 6/8
    assert (bvr["accuracy"], bvr["sensitivity"], bvr["specificity"], bvr["f1"], bvr["auc"]) == \
        pytest.approx((0.5, 0.5, 0.5, 0.4, 0.75))
    vvr = m["viral_vs_rest"]  # tp=1 fp=0 fn=1 tn=4; AUC: 0.7 beats all 4, 0.2 beats three and ties one: 7.5/8
    assert (vvr["accuracy"], vvr["sensitivity"], vvr["specificity"], vvr["f1"], vvr["auc"]) == \
        pytest.approx((5 / 6, 0.5, 1.0, 2 / 3, 7.5 / 8))
    bv = m["bacterial_vs_viral"]  # pneumonia images only (4): bacterial positive, tp=2 fn=0 fp=1 tn=1
    assert bv["n"] == 4
    assert (bv["accuracy"], bv["sensitivity"], bv["specificity"], bv["f1"], bv["auc"]) == \
        pytest.approx((0.75, 1.0, 0.5, 0.8, 1.0))
    for key in ("normal_vs_pneumonia", "bacterial_vs_rest", "viral_vs_rest", "bacterial_vs_viral"):
        assert BINARY <= set(m[key])


def test_perfect_and_threshold_effect():
    p = np.eye(3)[Y] * 0.9 + 0.1 / 3
    m = compute_metrics(Y, p, 0.5, n_boot=0)
    assert m["confusion_matrix"] == [[2, 0, 0], [0, 2, 0], [0, 0, 2]]
    assert m["three_class"]["accuracy"] == 1.0 and m["normal_vs_pneumonia"]["auc"] == 1.0
    strict = compute_metrics(Y, P, 0.75, n_boot=0)["normal_vs_pneumonia"]  # higher threshold: fewer positives
    assert strict["specificity"] == 1.0 and strict["sensitivity"] == pytest.approx(0.5)


def test_youden_threshold():
    y = np.array([0, 0, 0, 1, 2, 1])
    score = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.8])
    probs = np.stack([1 - score, score / 2, score / 2], 1)
    t, how = choose_threshold(y, probs, "youden")
    assert 0.3 < t <= 0.6 and "Youden" in how
    assert (decide(probs, t) != 0).tolist() == [False, False, False, True, True, True]
    t2, _ = choose_threshold(y, probs, "sensitivity", target_sensitivity=1.0)
    # the lowest pneumonia score is 0.6 and the highest normal one 0.3: the threshold sits halfway
    assert t2 == pytest.approx(0.45)
    assert (decide(probs, t2) != 0).tolist() == (decide(probs, 0.6) != 0).tolist()
    t3, how3 = choose_threshold(np.zeros(4, int), probs[:4], "youden")
    assert t3 == 0.5 and "single class" in how3
    with pytest.raises(ValueError, match="unknown"):
        choose_threshold(y, probs, "magic")
    with pytest.raises(ValueError, match="target-sensitivity"):
        choose_threshold(y, probs, "sensitivity")


def test_bootstrap_ci_bounds():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    m = compute_metrics(y, probs, 0.5, n_boot=300, seed=1)
    nvp = m["normal_vs_pneumonia"]
    for k in ("accuracy", "auc", "sensitivity", "specificity"):
        lo, hi = nvp["ci95"][k]
        assert 0.0 <= lo <= nvp[k] <= hi <= 1.0, k
        assert hi - lo < 0.3
    assert compute_metrics(y, probs, 0.5, n_boot=300, seed=1)["normal_vs_pneumonia"]["ci95"] == nvp["ci95"]


def test_prior_shift():
    p = np.array([[0.5, 0.25, 0.25]])
    out = prior_shift(p, [0.25, 0.5, 0.25], [0.5, 0.25, 0.25])  # weights 2, 0.5, 1 -> [1, 0.125, 0.25] / 1.375
    np.testing.assert_allclose(out, [[1 / 1.375, 0.125 / 1.375, 0.25 / 1.375]])
    np.testing.assert_allclose(prior_shift(P, [0.3, 0.4, 0.3], [0.3, 0.4, 0.3]), P)  # same prior: unchanged
    np.testing.assert_allclose(prior_shift(P, [0.2, 0.5, 0.3], [0.6, 0.2, 0.2]).sum(1), 1.0)


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(Y, P[:, :2])
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(Y[:3], P)


def test_vectorised_bootstrap_equals_scikit_learn_per_resample():
    """The bootstrap's vectorised inner loop gives scikit-learn's figures on every resample (to 2e-16)."""
    from pneumoscan.metrics import _binary_batch, binary_metrics

    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 120)
    score = np.round(np.clip(y * 0.3 + rng.normal(0.4, 0.25, 120), 0, 1), 2)  # ties included
    pred = (score >= 0.5).astype(int)
    idx = rng.integers(0, 120, (60, 120))
    got = _binary_batch(y[idx], pred[idx], score[idx])
    for r in range(len(idx)):
        ref = binary_metrics(y[idx[r]], pred[idx[r]], score[idx[r]])
        for k in ("accuracy", "sensitivity", "specificity", "f1", "auc"):
            assert abs(got[k][r] - ref[k]) <= 2e-16, (k, r, got[k][r], ref[k])


def test_threshold_never_sits_on_a_validation_score():
    """The chosen threshold lies strictly between two neighbouring scores, so a float32 difference between
    two engines (feature cache vs full inference) cannot flip an image at the operating point."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    score = np.clip((y > 0) * 0.35 + rng.normal(0.35, 0.2, 300), 0, 1).astype(np.float32)
    probs = np.stack([1 - score, score * 0.6, score * 0.4], 1).astype(np.float64)
    for method, target in (("youden", None), ("sensitivity", 0.97)):
        t, _ = choose_threshold(y, probs, method, target)
        s = 1 - probs[:, 0]
        gap = np.abs(s - t).min()
        assert gap > 1e-6, (method, t, gap)
        nudged = probs.copy()
        nudged[:, 0] -= 1e-7  # float32-level noise
        assert (decide(nudged, t) != 0).tolist() == (decide(probs, t) != 0).tolist()


def test_missing_classes_give_undefined_figures_with_reasons_not_errors():
    """Normal images only: every figure that needs a pneumonia image is NaN (null in metrics.json) and says
    why; bacterial vs viral has no images at all; macro F1 averages the classes present, not absent zeros."""
    y = np.array([0, 0, 0])
    p = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.2, 0.2]])  # P(pneu) 0.1, 0.8, 0.4 at 0.5
    m = compute_metrics(y, p, 0.5, n_boot=50)
    nvp, bv = m["normal_vs_pneumonia"], m["bacterial_vs_viral"]
    assert nvp["specificity"] == pytest.approx(2 / 3) and nvp["accuracy"] == pytest.approx(2 / 3)
    assert all(np.isnan(nvp[k]) for k in ("sensitivity", "f1", "auc"))
    assert bv["n"] == 0 and all(np.isnan(bv[k]) for k in BINARY)
    assert m["three_class"]["macro_f1"] == pytest.approx(0.8) and m["three_class"]["macro_f1_classes"] == ["normal"]
    assert np.isnan(nvp["ci95"]["sensitivity"]).all() and not np.isnan(nvp["ci95"]["specificity"]).any()
    assert m["undefined"]["normal_vs_pneumonia"] == {"sensitivity": "no pneumonia images", "f1": "no pneumonia images",
                                                     "auc": "needs both pneumonia and normal images"}
    assert set(m["undefined"]["bacterial_vs_viral"]) == BINARY
    assert "three_class" not in m["undefined"]

    pn = compute_metrics(np.array([1, 1, 2, 2]), P[2:], 0.5, n_boot=0)  # pneumonia only
    assert pn["undefined"] == {"normal_vs_pneumonia": {"specificity": "no normal images",
                                                       "auc": "needs both pneumonia and normal images"}}
    assert compute_metrics(Y, P, 0.5, n_boot=0)["undefined"] == {}  # every class: nothing undefined
