from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from bonefrac.calibration import (
    apply_temperature,
    choose_thresholds,
    expected_calibration_error,
    fit_temperature,
    level,
    levels_text,
    negative_log_likelihood,
    predictive_values,
    reliability_curve,
    three_levels,
)

pytestmark = pytest.mark.filterwarnings("error")


def calibrated_generator(n: int, seed: int, n_classes: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn from softmax(logits): a perfectly calibrated model, by construction."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=1.5, size=(n, n_classes))
    cumulative = np.cumsum(softmax(logits, axis=1), axis=1)
    y = (cumulative < rng.random((n, 1))).sum(axis=1)
    return logits, np.minimum(y, n_classes - 1)


@pytest.mark.parametrize(("scale", "expected"), [(3.0, 3.0), (0.4, 0.4)])
def test_temperature_undoes_over_and_under_confidence(scale, expected):
    # Logits x 3 of a calibrated generator are over-confident (T should come out near 3, > 1); x 0.4 under (< 1).
    val_logits, y_val = calibrated_generator(4000, seed=0)
    temperature = fit_temperature(scale * val_logits, y_val)
    assert (temperature > 1) == (scale > 1)
    assert temperature == pytest.approx(expected, rel=0.15)


def test_temperature_lowers_ece_and_nll_of_an_over_confident_model_on_held_out_data():
    val_logits, y_val = calibrated_generator(3000, seed=1)
    test_logits, y_test = calibrated_generator(3000, seed=2)
    temperature = fit_temperature(3 * val_logits, y_val)  # fitted on val only
    before = softmax(3 * test_logits, axis=1)
    after = apply_temperature(3 * test_logits, temperature)
    assert expected_calibration_error(y_test, after) < expected_calibration_error(y_test, before) / 3
    assert negative_log_likelihood(3 * test_logits, y_test, temperature) < negative_log_likelihood(
        3 * test_logits, y_test)
    assert (after.argmax(axis=1) == before.argmax(axis=1)).all()  # accuracy is untouched


def test_apply_temperature_gives_probabilities():
    logits = np.random.default_rng(3).normal(scale=4, size=(50, 4))
    for temperature in (0.3, 1.0, 2.5):
        proba = apply_temperature(logits, temperature)
        assert proba.shape == (50, 4) and (proba >= 0).all()
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(apply_temperature(logits, 1.0), softmax(logits, axis=1))


def test_ece_and_reliability_curve_on_a_hand_made_example():
    # Top-label confidences 0.95 (right), 0.92 (wrong), 0.75 (right), 0.65 (right), 0.55 (wrong); 5 bins of 0.2.
    proba = np.array([[0.95, 0.05], [0.08, 0.92], [0.25, 0.75], [0.65, 0.35], [0.45, 0.55]])
    y = np.array([0, 0, 1, 0, 0])
    # Bin (0.8, 1]: 2 cases, accuracy 0.5, confidence 0.935; (0.6, 0.8]: 2, 1.0, 0.70; (0.4, 0.6]: 1, 0.0, 0.55.
    expected = 2 / 5 * 0.435 + 2 / 5 * 0.30 + 1 / 5 * 0.55
    assert expected_calibration_error(y, proba, n_bins=5) == pytest.approx(expected)
    confidence, accuracy, count = reliability_curve(y, proba, n_bins=5)
    assert count.tolist() == [0, 0, 1, 2, 2]
    np.testing.assert_allclose(confidence[2:], [0.55, 0.70, 0.935])
    np.testing.assert_allclose(accuracy[2:], [0.0, 1.0, 0.5])
    assert np.isnan(confidence[:2]).all() and np.isnan(accuracy[:2]).all()


def test_ece_edges():
    certain = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(np.array([0, 1]), certain) == 0.0  # confidence 1 lands in the last bin
    assert reliability_curve(np.array([0, 1]), certain, n_bins=15)[2][-1] == 2
    assert expected_calibration_error(np.array([1, 0]), certain) == 1.0


P = np.array([0.95, 0.85, 0.80, 0.70, 0.60, 0.55, 0.45, 0.40, 0.30, 0.20, 0.10, 0.05])
Y = np.array([1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0])  # 5 fractures, 7 normals


def test_thresholds_on_a_hand_made_example():
    chosen = choose_thresholds(Y, P, min_sensitivity=0.8)
    # 0.5 flags 4 of 5 fractures and 2 of 7 normals (0.80, 0.55).
    assert chosen["default"] == {"threshold": 0.5, "sensitivity": 4 / 5, "specificity": 5 / 7}
    # J = 1 + 5/7 - 1 at 0.45 is the largest (0.60 gives 4/5 + 6/7 - 1).
    assert chosen["youden"] == {"threshold": 0.45, "sensitivity": 1.0, "specificity": 5 / 7}
    # 0.60 is the highest threshold that still finds 4 of 5 fractures; 0.70 finds 3.
    assert chosen["sensitivity>=0.8"] == {"threshold": 0.60, "sensitivity": 4 / 5, "specificity": 6 / 7}
    assert choose_thresholds(Y, P)["sensitivity>=0.95"]["threshold"] == 0.45
    # Every calibration names the targets 0.9 and 0.95 besides its own: 4 of 5 fractures is below 0.9.
    assert set(chosen) == {"default", "youden", "sensitivity>=0.8", "sensitivity>=0.9", "sensitivity>=0.95",
                           "specificity>=0.95"}
    assert chosen["sensitivity>=0.9"]["threshold"] == 0.45
    # 6 of 7 normals (0.857) is below 0.95: every normal must be under the threshold, and 0.85 is the lowest score
    # above the highest normal (0.80); it finds 2 of 5 fractures (0.95, 0.85).
    assert chosen["specificity>=0.95"] == {"threshold": 0.85, "sensitivity": 2 / 5, "specificity": 1.0}


@pytest.mark.parametrize("target", [0.9, 0.95])
def test_specificity_point_is_the_lowest_threshold_reaching_the_target(target, monkeypatch):
    import bonefrac.calibration

    monkeypatch.setattr(bonefrac.calibration, "SPECIFICITY_TARGETS", (target,))
    rng = np.random.default_rng(int(target * 100))
    y = rng.integers(0, 2, 400)
    p = np.round(1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(size=400)))), 2)  # rounded: ties
    point = choose_thresholds(y, p)[f"specificity>={target:g}"]
    specificity = (p[y == 0] < point["threshold"]).mean()
    assert specificity >= target and specificity == point["specificity"]
    assert point["sensitivity"] == (p[y == 1] >= point["threshold"]).mean()
    lower = p[p < point["threshold"]]  # the next lower observed score misses the target: the best sensitivity
    assert (p[y == 0] < lower.max()).mean() < target


def test_specificity_point_when_the_highest_score_is_a_normal():
    # One of two normals scores highest: no observed threshold clears 95 % of the normals, so nothing is flagged.
    point = choose_thresholds(np.array([0, 1, 0]), np.array([0.9, 0.5, 0.1]))["specificity>=0.95"]
    assert point == {"threshold": np.nextafter(0.9, 1), "sensitivity": 0.0, "specificity": 1.0}


def test_three_levels_on_the_hand_made_example():
    levels = three_levels(choose_thresholds(Y, P))
    assert levels == {"low": {"operating_point": "sensitivity>=0.95", "threshold": 0.45},
                      "high": {"operating_point": "specificity>=0.95", "threshold": 0.85}, "doubt_band": True}
    assert [level(p, levels) for p in (0.95, 0.85, 0.84, 0.45, 0.449, 0.0)] == [
        "fracture", "fracture", "doubt", "doubt", "no fracture", "no fracture"]
    assert levels_text(levels) == ("no fracture below 0.4500 (sensitivity>=0.95), fracture at or above 0.8500 "
                                   "(specificity>=0.95), doubt between")


def test_three_levels_without_a_doubt_band_or_without_both_points():
    # Separable: 0.6 reaches sensitivity 1 and specificity 1 at once, so the low threshold is above the high one.
    points = choose_thresholds(np.array([1, 1, 0, 0]), np.array([0.9, 0.6, 0.4, 0.1]))
    levels = three_levels(points)
    assert (levels["low"]["threshold"], levels["high"]["threshold"], levels["doubt_band"]) == (0.6, 0.6, False)
    assert [level(p, levels) for p in (0.6, 0.59)] == ["fracture", "no fracture"]
    assert levels_text(levels).startswith("no doubt band: 0.6000 (specificity>=0.95) is not above 0.6000")
    del points["specificity>=0.95"]  # a calibration.json from before specificity points
    assert three_levels(points) is None and levels_text(None).startswith("none (calibration.json lacks")


def test_predictive_values_by_bayes():
    # 1000 images at prevalence 0.1: 100 fractures, 90 found; 900 normals, 720 cleared, 180 flagged.
    ppv, npv = predictive_values(0.9, 0.8, 0.1)
    assert ppv == pytest.approx(90 / 270) and npv == pytest.approx(720 / 730)
    assert predictive_values(0.0, 1.0, 0.5) == (None, 0.5)  # nothing is flagged: no PPV
    for prevalence in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="strictly between 0 and 1"):
            predictive_values(0.9, 0.8, prevalence)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95, 0.99, 1.0])
def test_sensitivity_target_holds_on_the_data_it_was_chosen_on(target):
    rng = np.random.default_rng(int(target * 100))
    y = rng.integers(0, 2, 400)
    p = np.round(1 / (1 + np.exp(-(1.5 * (2 * y - 1) + rng.normal(size=400)))), 2)  # rounded: ties
    point = choose_thresholds(y, p, min_sensitivity=target)[f"sensitivity>={target:g}"]
    sensitivity = (p[y == 1] >= point["threshold"]).mean()
    assert sensitivity >= target and sensitivity == point["sensitivity"]
    assert point["specificity"] == (p[y == 0] < point["threshold"]).mean()
    higher = p[p > point["threshold"]]
    if higher.size:  # the next higher observed score misses the target: the best specificity was taken
        assert (p[y == 1] >= higher.min()).mean() < target


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="both positive and negative"):
        choose_thresholds(np.ones(4), np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="0/1"):
        choose_thresholds(np.array([0, 2, 0, 2]), np.linspace(0, 1, 4))
    with pytest.raises(ValueError, match=r"\(n, C\)"):
        fit_temperature(np.linspace(-1, 1, 4), np.array([0, 1, 0, 1]))
