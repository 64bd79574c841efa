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


# --- the INT8 guard: which answers of a noisier graph must be checked by the exact one ---

from pneumoscan.export.int8 import _verdicts  # noqa: E402
from pneumoscan.uncertainty import GUARD_BOUNDARIES, Int8Guard, boundary_distances  # noqa: E402


def _guard_conf(method: str = "lac") -> dict:
    return {"threshold": 0.6, "calibration": {"temperature": 0.5, "bias": [0.2, -0.1, 0.0]},
            "conformal": {"method": method, "qhat": 0.7 if method == "lac" else 0.93}}


class _Scorer:  # the OOD scorer's interface: a score per row (here: the first feature)
    def score(self, f):
        return np.asarray(f)[:, 0]


def _distances(p, f, conf, t):
    c = conf["conformal"]
    return boundary_distances(temperature_scale(p, 0.5, [0.2, -0.1, 0.0]), conf["threshold"], c["qhat"], c["method"],
                              f[:, 0], t)


def test_boundary_distances_have_the_sign_of_the_verdict():
    rng = np.random.default_rng(0)
    p = _softmax(rng.normal(size=(2000, 3)) * 2)
    s = rng.uniform(5, 15, 2000)
    d = boundary_distances(p, 0.6, 0.7, "lac", s, 10.0)
    assert d.shape == (2000, len(GUARD_BOUNDARIES))
    assert ((d[:, 0] > 0) == (1 - p[:, 0] >= 0.6)).all()
    assert ((d[:, 1] > 0) == (p[:, 1] > p[:, 2])).all()
    assert ((d[:, 2] > 0) == (p[:, 0] >= 0.3)).all() and ((d[:, 3] > 0) == (p[:, 1:].max(1) >= 0.3)).all()
    assert ((d[:, 4] > 0) == (s > 10.0)).all()
    assert np.isnan(boundary_distances(p, 0.6)[:, 2:]).all()  # no sets, no gate: nothing to guard there


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_the_guard_keeps_every_verdict_when_the_error_stays_within_its_margins(method):
    """INT8 = fp32 + noise; margins fitted as the largest error (quantile 1) on the same images: every image the
    guard leaves to INT8 must get fp32's verdict (class, "uncertain: refer", out of scope), and the guard must
    still leave most images to INT8."""
    rng = np.random.default_rng(1)
    conf = _guard_conf(method)
    z32 = rng.normal(size=(4000, 3)) * 1.5
    f32 = rng.uniform(0, 20, (4000, 1))
    p32, p8 = _softmax(z32), _softmax(z32 + rng.normal(scale=0.05, size=z32.shape))
    f8 = np.sqrt(f32 ** 2 + 1.0 + rng.normal(scale=0.5, size=f32.shape).clip(-0.9, None))
    t32 = 12.0
    t8 = float(np.sqrt(t32 ** 2 + np.mean(f8 ** 2 - f32 ** 2)))
    d32, d8 = _distances(p32, f32, conf, t32), _distances(p8, f8, conf, t8)
    guard = Int8Guard.fit(d32, d8, 1.0, min_scope=t8 ** 2 - t32 ** 2)
    redo = guard.needs_fp32(d8)
    v32 = _verdicts(p32, f32, conf, _Scorer(), t32, sets=True)
    v8 = _verdicts(p8, f8, conf, _Scorer(), t32, sets=True)  # the guard's scope margin covers fp32's threshold
    assert (v8[~redo] == v32[~redo]).all()
    assert (v8 != v32).sum() > 10  # INT8 alone would have changed verdicts: the guard had work to do
    assert 0.02 < redo.mean() < 0.5


def test_the_guard_sends_back_only_what_a_boundary_is_near():
    g = Int8Guard((1.0, 1.0, 1.0, 1.0, 4.0))
    far = [-5.0, 3.0, -5.0, 5.0, -20.0]
    rows = np.array([far,
                     [0.5, 3.0, -5.0, 5.0, -20.0],    # near the pneumonia threshold
                     [-5.0, 0.1, -5.0, 5.0, -20.0],   # bacterial vs viral undecided, but clearly normal
                     [5.0, 0.1, -5.0, 5.0, -20.0],    # bacterial vs viral undecided in a pneumonia
                     [-5.0, 3.0, 0.5, 5.0, -20.0],    # near a set edge that makes "uncertain: refer"
                     [-5.0, 3.0, -5.0, 5.0, 2.0],     # near the out-of-scope threshold
                     [0.0, 0.0, 0.0, 0.0, 30.0]])     # clearly out of scope: no class is shown
    assert g.needs_fp32(rows).tolist() == [False, True, False, True, True, True, False]
    nan = Int8Guard((1.0, 1.0, float("nan"), float("nan"), float("nan")))
    assert nan.needs_fp32(np.array([[-5.0, 3.0, 0.1, 0.1, 0.1]])).tolist() == [False]  # unguarded boundaries
    assert Int8Guard.from_dict(g.to_dict()) == g and nan.to_dict()["scope"] is None
    fitted = Int8Guard.fit(np.zeros((100, 5)), np.tile(np.arange(100.0)[:, None], (1, 5)), 0.9, min_scope=95.0)
    assert fitted.margins[0] == pytest.approx(89.1) and fitted.margins[4] == 95.0


def test_ood_score_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 600)
    train = rng.normal(0, 3, (3, 20))[y] + rng.normal(0, 1, (600, 20))
    scorer, _ = fit_ood(train, y, train[:100], quantile=0.98, pca_dim=8)
    x = rng.normal(0, 2, (7, 20))
    z = (x - scorer.mean) @ scorer.components.T
    want = [min(float(np.sqrt((zi - c) @ scorer.precision @ (zi - c))) for c in scorer.class_means) for zi in z]
    assert scorer.score(x) == pytest.approx(want, rel=1e-12)
