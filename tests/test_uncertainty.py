"""Known answers for knowing when not to answer: temperature scaling, conformal sets, the OOD score."""
from __future__ import annotations

import numpy as np
import pytest

from pneumoscan.evaluate.calibrate import conformal_check, fit_bias_corrected, fit_ood, fit_temperature
from pneumoscan.labels import LABELS
from pneumoscan.uncertainty import (
    UNCERTAIN,
    OODScorer,
    aps_scores,
    conformal_quantile,
    conformity_scores,
    prediction_sets,
    set_verdict,
    temperature_scale,
)


def _softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_temperature_scaling_known_values():
    p = np.array([[0.7, 0.2, 0.1]])
    assert temperature_scale(p, 1.0) == pytest.approx(p)
    soft = temperature_scale(p, 2.0)[0]
    want = np.sqrt(p[0]) / np.sqrt(p[0]).sum()  # softmax(log p / 2) = sqrt(p) normalised
    assert soft == pytest.approx(want) and soft.argmax() == 0 and soft[0] < 0.7
    assert temperature_scale(temperature_scale(p, 2.5), 1 / 2.5) == pytest.approx(p)  # 1/T undoes T


def test_fit_temperature_recovers_the_overconfidence():
    """Labels drawn from softmax(z / 2): a model that reports softmax(z) is over-confident by T = 2."""
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20000, 3))
    y = np.array([rng.choice(3, p=p) for p in _softmax(z / 2.0)])
    assert fit_temperature(_softmax(z), y) == pytest.approx(2.0, rel=0.06)
    assert fit_temperature(_softmax(z / 2.0), y) == pytest.approx(1.0, rel=0.06)  # calibrated already: T = 1


def test_bias_corrected_scaling_recovers_temperature_and_class_bias():
    """Labels drawn from softmax(z / 2 + b): a model reporting softmax(z) is over-confident by T = 2 and
    off in its base rates by b; temperature alone cannot fix the second."""
    from pneumoscan.metrics import calibration_error

    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, (20000, 3))
    b = np.array([0.6, -0.2, -0.4])  # centred
    y = np.array([rng.choice(3, p=p) for p in _softmax(z / 2.0 + b)])
    t, bias = fit_bias_corrected(_softmax(z), y)
    assert t == pytest.approx(2.0, rel=0.06) and bias == pytest.approx(b, abs=0.06) and abs(sum(bias)) < 1e-9
    fixed = temperature_scale(_softmax(z), t, bias)
    assert fixed == pytest.approx(_softmax(z / 2.0 + b), abs=0.02)
    t_only = temperature_scale(_softmax(z), fit_temperature(_softmax(z), y))
    assert calibration_error(y, fixed) < calibration_error(y, t_only)
    scaled = temperature_scale(_softmax(z), 2.0, b)  # the inverse the evaluation uses to recover raw outputs
    assert temperature_scale(scaled, 1 / 2.0, -2.0 * b) == pytest.approx(_softmax(z), abs=1e-9)


def test_prediction_sets_known_answers():
    p = np.array([[0.6, 0.3, 0.1], [0.05, 0.15, 0.8], [0.34, 0.33, 0.33]])
    assert prediction_sets(p, 0.85, "aps") == [["normal"], ["viral"], ["normal", "bacterial"]]
    assert prediction_sets(p, 0.95, "aps") == [["normal", "bacterial"], ["bacterial", "viral"], ["normal", "bacterial"]]
    assert prediction_sets(p, 1.0, "aps") == [list(LABELS)] * 3
    assert aps_scores(p, np.array([1, 2, 2])) == pytest.approx([0.9, 0.8, 1.0])
    # lac: every class with p >= 1 - q, the most probable always
    assert prediction_sets(p, 0.75) == [["normal", "bacterial"], ["viral"], list(LABELS)]
    assert prediction_sets(p, 0.1) == [["normal"], ["viral"], ["normal"]]
    assert conformity_scores(p, np.array([1, 2, 2])) == pytest.approx([0.7, 0.2, 0.67])


def test_conformal_quantile_is_the_finite_sample_rank():
    scores = np.arange(1, 11, dtype=float)  # n = 10
    assert conformal_quantile(scores, 0.1) == 10.0  # ceil(11 * 0.9) = 10th of 10
    assert conformal_quantile(scores, 0.2) == 9.0  # ceil(11 * 0.8) = 9th
    assert conformal_quantile(np.arange(1, 101, dtype=float), 0.1) == 91.0  # ceil(101 * 0.9) = 91st
    assert conformal_quantile(np.arange(1, 6, dtype=float), 0.1) == float("inf")  # 5 scores cannot give 90 %


def test_conformal_sets_cover_a_calibrated_classifier_at_the_nominal_rate():
    """A synthetic classifier whose probabilities are the truth: coverage is 90 % within sampling error."""
    rng = np.random.default_rng(1)

    def sample(n):
        p = rng.dirichlet([0.7, 0.7, 0.7], n)
        return p, np.array([rng.choice(3, p=pi) for pi in p])

    pc, yc = sample(2000)
    pt, yt = sample(20000)
    for method in ("lac", "aps"):
        sets = prediction_sets(pt, conformal_quantile(conformity_scores(pc, yc, method), 0.1), method)
        coverage = np.mean([LABELS[t] in s for s, t in zip(sets, yt)])
        assert 0.88 <= coverage <= 0.92, method
    check = conformal_check(pc, yc, 0.1)
    assert abs(check["coverage"] - 0.9) < 0.03 and set(check["by_class"]) == set(LABELS)
    assert 1.0 <= check["mean_set_size"] <= 3.0


def test_verdict_is_uncertain_only_when_normal_meets_pneumonia():
    assert set_verdict("viral", ["normal", "viral"]) == UNCERTAIN
    assert set_verdict("normal", ["normal", "bacterial"]) == UNCERTAIN
    assert set_verdict("viral", ["bacterial", "viral"]) == "viral"  # pneumonia either way: an answer
    assert set_verdict("normal", ["normal"]) == "normal"


def test_ood_scorer_flags_far_features_and_lets_in_distribution_through(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 3, (3, 40))
    y = rng.integers(0, 3, 3000)
    train = centres[y] + rng.normal(0, 1, (3000, 40))
    val = centres[rng.integers(0, 3, 500)] + rng.normal(0, 1, (500, 40))
    scorer, threshold = fit_ood(train, y, val, quantile=0.98, pca_dim=16)
    assert (scorer.score(val) > threshold).mean() == pytest.approx(0.02, abs=0.005)  # 98 % of validation pass
    new = centres[rng.integers(0, 3, 500)] + rng.normal(0, 1, (500, 40))
    assert (scorer.score(new) > threshold).mean() < 0.06  # fresh in-distribution data: few false alarms
    far = rng.normal(0, 1, (200, 40)) * 4 + 12  # another distribution altogether
    assert (scorer.score(far) > threshold).all()
    path = tmp_path / "ood.safetensors"
    path.write_bytes(scorer.to_bytes())
    again = OODScorer.load(path)
    assert again.score(far[:5]) == pytest.approx(scorer.score(far[:5]), rel=1e-4)  # float32 on disk
