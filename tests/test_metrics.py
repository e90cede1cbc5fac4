from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm
from sklearn import metrics as sk
from sklearn.preprocessing import label_binarize

from bonefrac.metrics import (
    Interval,
    binary_average_precision,
    binary_roc_auc,
    bootstrap_ci,
    bootstrap_indices,
    classification_metrics,
    classification_report_text,
    delong_test,
    paired_bootstrap_auc_difference,
    predicted_labels,
)

# Our metrics must never warn (0/0 and empty means are handled as NaN on purpose).
pytestmark = pytest.mark.filterwarnings("error")

BINARY = ["fractured", "not_fractured"]
THREE = ["normal", "simple", "comminuted"]


def binary_sample(n: int, seed: int, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and (n, 2) probabilities of an informative binary model; class 1 scores higher."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = expit(separation * (2 * y - 1) + rng.normal(size=n))
    return y, np.column_stack([1 - p, p])


def tied_binary(seed: int = 0, n: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Binary probabilities on a 0.05 grid, so many scores tie across classes."""
    y, proba = binary_sample(n, seed)
    p = np.round(proba[:, 1] * 20) / 20
    return y, np.column_stack([1 - p, p])


def tied_three_class(seed: int = 0, n: int = 90) -> tuple[np.ndarray, np.ndarray]:
    """3-class probabilities from a few prototype rows blended towards the true class: informative, with ties."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    prototypes = rng.dirichlet([1, 1, 1], size=5)
    weight = rng.choice([0.0, 0.5, 1.0], size=(n, 1))
    proba = (prototypes[rng.integers(0, 5, n)] + weight * np.eye(3)[y]) / (1 + weight)
    return y, proba


# --- metrics equal scikit-learn's ---------------------------------------------------------------------------------


def assert_label_metrics_match_sklearn(metrics: dict[str, float], y, y_pred, labels) -> None:
    k = range(len(labels))
    assert metrics["accuracy"] == pytest.approx(sk.accuracy_score(y, y_pred))
    assert metrics["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(y, y_pred))
    assert metrics["cohen_kappa"] == pytest.approx(sk.cohen_kappa_score(y, y_pred))
    per_class = sk.precision_recall_fscore_support(y, y_pred, labels=k, zero_division=0)
    for name, values in zip(("precision", "recall", "f1"), per_class, strict=False):
        assert [metrics[f"{name}/{label}"] for label in labels] == pytest.approx(values)
    for average in ("macro", "weighted"):
        p, r, f, _ = sk.precision_recall_fscore_support(y, y_pred, labels=k, average=average, zero_division=0)
        assert (metrics[f"precision/{average}"], metrics[f"recall/{average}"], metrics[f"f1/{average}"]) == (
            pytest.approx(p), pytest.approx(r), pytest.approx(f))


@pytest.mark.parametrize(("positive", "threshold"), [(1, None), (0, None), (0, 0.3), (1, 0.7)])
def test_binary_metrics_equal_sklearn(positive, threshold):
    y, proba = tied_binary()
    metrics = classification_metrics(y, proba, labels=BINARY, positive=positive, threshold=threshold)
    y_pred = predicted_labels(proba, positive=positive, threshold=threshold)
    assert_label_metrics_match_sklearn(metrics, y, y_pred, BINARY)
    is_positive, score = y == positive, proba[:, positive]
    assert metrics["roc_auc"] == pytest.approx(sk.roc_auc_score(is_positive, score))
    assert metrics["pr_auc"] == pytest.approx(sk.average_precision_score(is_positive, score))
    assert metrics["brier"] == pytest.approx(sk.brier_score_loss(is_positive, score))
    assert metrics["sensitivity"] == pytest.approx(sk.recall_score(is_positive, y_pred == positive))
    assert metrics["specificity"] == pytest.approx(sk.recall_score(~is_positive, y_pred != positive))


def test_three_class_metrics_equal_sklearn():
    y, proba = tied_three_class()
    metrics = classification_metrics(y, proba, labels=THREE, positive=None)
    assert_label_metrics_match_sklearn(metrics, y, proba.argmax(axis=1), THREE)
    assert metrics["roc_auc"] == pytest.approx(sk.roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    one_hot = label_binarize(y, classes=[0, 1, 2])
    assert metrics["pr_auc"] == pytest.approx(sk.average_precision_score(one_hot, proba, average="macro"))
    for k, label in enumerate(THREE):
        assert metrics[f"roc_auc/{label}"] == pytest.approx(sk.roc_auc_score(y == k, proba[:, k]))
        assert metrics[f"pr_auc/{label}"] == pytest.approx(sk.average_precision_score(y == k, proba[:, k]))
    assert metrics["brier"] == pytest.approx(sk.brier_score_loss(y, proba, labels=[0, 1, 2]))
    assert "sensitivity" not in metrics


def test_three_class_positive_gives_one_vs_rest_sensitivity():
    y, proba = tied_three_class(seed=1)
    metrics = classification_metrics(y, proba, labels=THREE, positive=2)
    y_pred = proba.argmax(axis=1)
    assert metrics["sensitivity"] == pytest.approx(sk.recall_score(y == 2, y_pred == 2))
    assert metrics["specificity"] == pytest.approx(sk.recall_score(y != 2, y_pred != 2))
    with pytest.raises(ValueError, match="threshold"):
        classification_metrics(y, proba, labels=THREE, positive=2, threshold=0.4)


@pytest.mark.parametrize(("seed", "grid"), list(itertools.product(range(4), (None, 10, 3))))
def test_rank_auc_and_average_precision_equal_sklearn_with_ties(seed, grid):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 57)
    score = rng.random(57) + 0.4 * y
    if grid:
        score = np.round(score * grid) / grid
    assert binary_roc_auc(y, score) == pytest.approx(sk.roc_auc_score(y, score))
    assert binary_average_precision(y, score) == pytest.approx(sk.average_precision_score(y, score))


def test_sensitivity_and_specificity_exact_on_a_hand_made_example():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.5, 0.4, 0.2, 0.1, 0.05])
    proba = np.column_stack([1 - p, p])
    # At 0.5: 3 of 4 fractures found; negatives 0.7 and 0.5 (a tie counts positive) are false alarms.
    at_half = classification_metrics(y, proba, labels=["no", "yes"], positive=1)
    assert (at_half["sensitivity"], at_half["specificity"]) == (3 / 4, 4 / 6)
    at_065 = classification_metrics(y, proba, labels=["no", "yes"], positive=1, threshold=0.65)
    assert (at_065["sensitivity"], at_065["specificity"]) == (2 / 4, 5 / 6)
    # The same cases with the positive class in column 0 give the same numbers.
    flipped = classification_metrics(1 - y, proba[:, ::-1], labels=["yes", "no"], positive=0, threshold=0.65)
    assert (flipped["sensitivity"], flipped["specificity"]) == (2 / 4, 5 / 6)


def test_one_class_only_gives_nan_for_undefined_metrics():
    y = np.ones(5, dtype=int)
    proba = np.column_stack([np.full(5, 0.2), np.full(5, 0.8)])
    metrics = classification_metrics(y, proba, labels=BINARY, positive=1)
    assert metrics["accuracy"] == 1.0 and metrics["sensitivity"] == 1.0
    for key in ("roc_auc", "specificity", "balanced_accuracy", "recall/fractured", "f1/macro"):
        assert np.isnan(metrics[key]), key
    assert metrics["precision/fractured"] == 0.0  # never predicted: scikit-learn's zero_division=0


def test_bad_input_is_refused():
    y, proba = tied_binary()
    with pytest.raises(ValueError, match="proba must be"):
        classification_metrics(y, proba, labels=THREE, positive=None)
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(y + 1, proba, labels=BINARY, positive=1)


# --- bootstrap ----------------------------------------------------------------------------------------------------

binary_metrics = functools.partial(classification_metrics, labels=BINARY, positive=1)


def width(interval: Interval) -> float:
    return interval.high - interval.low


def test_ci_contains_the_point_estimate():
    y, proba = binary_sample(300, seed=1)
    intervals = bootstrap_ci(y, proba, binary_metrics, n_resamples=400)
    assert intervals.keys() == binary_metrics(y, proba).keys()
    for key, interval in intervals.items():
        assert interval.low <= interval.point <= interval.high, key
        assert interval.n_valid == 400


def test_ci_narrows_as_n_grows():
    small = bootstrap_ci(*binary_sample(100, seed=2), binary_metrics, n_resamples=300)
    large = bootstrap_ci(*binary_sample(2000, seed=2), binary_metrics, n_resamples=300)
    for key in ("roc_auc", "accuracy", "sensitivity", "brier"):
        assert width(large[key]) < width(small[key]) / 2, key  # sqrt(20) = 4.5 expected


def near_copy_groups(n_groups: int = 40, size: int = 10, seed: int = 3):
    """n_groups groups of `size` near-identical scores (one label each): like duplicates of one radiograph."""
    rng = np.random.default_rng(seed)
    y_group = rng.integers(0, 2, n_groups)
    logit_group = (2 * y_group - 1) + rng.normal(size=n_groups)
    y = np.repeat(y_group, size)
    p = expit(np.repeat(logit_group, size) + rng.normal(scale=0.01, size=n_groups * size))
    groups = np.repeat([f"g{i}" for i in range(n_groups)], size)
    return y, np.column_stack([1 - p, p]), groups


def test_group_bootstrap_is_wider_than_file_bootstrap_on_near_copies():
    y, proba, groups = near_copy_groups()
    by_file = bootstrap_ci(y, proba, binary_metrics, n_resamples=400)
    by_group = bootstrap_ci(y, proba, binary_metrics, groups=groups, n_resamples=400)
    for key in ("roc_auc", "accuracy", "brier"):
        assert by_group[key].point == by_file[key].point
        assert width(by_group[key]) > 2 * width(by_file[key]), key  # sqrt(10) = 3.2 expected


def test_group_bootstrap_draws_whole_groups():
    groups = np.array(["a", "b", "b", "c", "c", "c", "d"])
    for idx in bootstrap_indices(groups.size, groups=groups, n_resamples=50, seed=0):
        drawn = np.bincount(idx, minlength=groups.size)
        for group in "abcd":
            members = drawn[groups == group]
            assert (members == members[0]).all()  # every file of a drawn group, as often as the group
        assert sum(np.unique(drawn[groups == g])[0] for g in "abcd") == 4  # 4 groups drawn


def test_bootstrap_is_deterministic_for_a_seed():
    y, proba, groups = near_copy_groups(n_groups=20, size=3)
    first = bootstrap_ci(y, proba, binary_metrics, groups=groups, n_resamples=100, seed=5)
    assert first == bootstrap_ci(y, proba, binary_metrics, groups=groups, n_resamples=100, seed=5)
    assert first != bootstrap_ci(y, proba, binary_metrics, groups=groups, n_resamples=100, seed=6)


def test_resamples_with_one_class_are_skipped_and_counted():
    y = np.array([0, 0, 0, 0, 0, 0, 0, 1])  # a resample misses the positive with probability (7/8)^8 = 0.34
    p = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.2, 0.1, 0.7])
    intervals = bootstrap_ci(y, np.column_stack([1 - p, p]), binary_metrics, n_resamples=500)
    assert intervals["accuracy"].n_valid == 500
    assert 250 < intervals["roc_auc"].n_valid < 400 and intervals["sensitivity"].n_valid < 400
    assert np.isfinite([intervals["roc_auc"].low, intervals["roc_auc"].high]).all()

    only_negatives = bootstrap_ci(np.zeros(6, int), np.tile([0.7, 0.3], (6, 1)), binary_metrics, n_resamples=50)
    assert np.isnan(only_negatives["roc_auc"].point) and only_negatives["roc_auc"].n_valid == 0
    assert np.isnan(only_negatives["roc_auc"].low) and only_negatives["specificity"].n_valid == 50


def test_report_has_the_classification_report_shape():
    y, proba = tied_three_class()
    metrics = classification_metrics(y, proba, labels=THREE, positive=None)
    support = np.bincount(y, minlength=3)
    text = classification_report_text(metrics, THREE, support)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[2].split() == ["normal", f"{metrics['precision/normal']:.3f}", f"{metrics['recall/normal']:.3f}",
                                f"{metrics['f1/normal']:.3f}", str(support[0])]
    assert any(line.split() == ["accuracy", f"{metrics['accuracy']:.3f}", "90"] for line in lines)
    assert any(line.split()[:2] == ["macro", "avg"] for line in lines)
    assert any(line.split()[:2] == ["roc_auc", f"{metrics['roc_auc']:.3f}"] for line in lines)

    intervals = bootstrap_ci(y, proba, functools.partial(classification_metrics, labels=THREE, positive=None),
                             n_resamples=50)
    with_ci = classification_report_text(intervals, THREE, support)
    f1 = intervals["f1/weighted"]
    assert f"{f1.point:.3f} [{f1.low:.3f}, {f1.high:.3f}]" in with_ci


# --- DeLong and the paired bootstrap ------------------------------------------------------------------------------


def brute_force_delong(y, score_a, score_b):
    """DeLong et al. (1988) from the definitions, with explicit loops: z, p and the variance of AUC_a - AUC_b."""
    positives = [i for i in range(len(y)) if y[i] == 1]
    negatives = [j for j in range(len(y)) if y[j] == 0]
    m, n = len(positives), len(negatives)

    def psi(x, w):
        return 1.0 if x > w else 0.5 if x == w else 0.0

    v10, v01, auc = [], [], []
    for s in (score_a, score_b):
        v10.append([sum(psi(s[i], s[j]) for j in negatives) / n for i in positives])
        v01.append([sum(psi(s[i], s[j]) for i in positives) / m for j in negatives])
        auc.append(sum(v10[-1]) / m)

    def cov(v, r, t, size):
        return sum((v[r][i] - auc[r]) * (v[t][i] - auc[t]) for i in range(size)) / (size - 1)

    s = [[cov(v10, r, t, m) / m + cov(v01, r, t, n) / n for t in range(2)] for r in range(2)]
    variance = s[0][0] + s[1][1] - 2 * s[0][1]
    z = (auc[0] - auc[1]) / variance**0.5
    return auc, variance, z, 2 * norm.sf(abs(z))


@pytest.mark.parametrize("seed", range(5))
def test_delong_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 23)
    y[:2] = [0, 1]
    score_a = np.round(rng.random(23) + 0.5 * y, 1)  # rounded: ties within and across classes
    score_b = np.round(rng.random(23) + 0.2 * y + 0.3 * score_a, 1)
    result = delong_test(y, score_a, score_b)
    auc, variance, z, p = brute_force_delong(y, score_a, score_b)
    assert (result["auc_a"], result["auc_b"]) == (pytest.approx(auc[0]), pytest.approx(auc[1]))
    assert result["auc_a"] == pytest.approx(sk.roc_auc_score(y, score_a))
    assert result["auc_b"] == pytest.approx(sk.roc_auc_score(y, score_b))
    assert result["z"] == pytest.approx(z) and result["p_value"] == pytest.approx(p)
    half_width = 1.959964 * variance**0.5
    assert result["difference_low"] == pytest.approx(auc[0] - auc[1] - half_width, abs=1e-6)
    assert result["difference_high"] == pytest.approx(auc[0] - auc[1] + half_width, abs=1e-6)


def test_identical_scores_give_no_difference():
    y, proba = binary_sample(200, seed=4)
    delong = delong_test(y, proba[:, 1], proba[:, 1])
    assert delong["difference"] == 0 and delong["p_value"] == 1
    paired = paired_bootstrap_auc_difference(y, proba[:, 1], proba[:, 1], n_resamples=200)
    assert paired["difference"] == 0 and paired["p_value"] == 1
    assert paired["difference_low"] == paired["difference_high"] == 0


def test_a_clearly_better_model_gives_a_small_p():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    good = 2.0 * y + rng.normal(size=300)
    weak = 0.3 * y + rng.normal(size=300)
    delong = delong_test(y, good, weak)
    assert delong["difference"] > 0.2 and delong["p_value"] < 1e-6 and delong["difference_low"] > 0
    paired = paired_bootstrap_auc_difference(y, good, weak, n_resamples=500)
    assert paired["difference"] == pytest.approx(delong["difference"])
    assert paired["p_value"] < 1e-6 and paired["difference_low"] > 0
    # The two tests agree on the size of the uncertainty.
    assert paired["difference_high"] - paired["difference_low"] == pytest.approx(
        delong["difference_high"] - delong["difference_low"], rel=0.25)


def test_paired_bootstrap_resamples_groups():
    rng = np.random.default_rng(6)
    y, proba, groups = near_copy_groups(seed=6)
    other = np.clip(proba[:, 1] + rng.normal(scale=0.2, size=y.size), 0, 1)
    by_file = paired_bootstrap_auc_difference(y, proba[:, 1], other, n_resamples=400)
    by_group = paired_bootstrap_auc_difference(y, proba[:, 1], other, groups=groups, n_resamples=400)
    assert by_group["difference"] == by_file["difference"]
    assert (by_group["difference_high"] - by_group["difference_low"]) > (
        by_file["difference_high"] - by_file["difference_low"])
    assert by_group["n_valid"] == 400


def test_delong_needs_both_classes_as_0_1():
    with pytest.raises(ValueError, match="at least 2 positive"):
        delong_test(np.array([1, 0, 0, 0]), np.arange(4.0), np.arange(4.0))
    with pytest.raises(ValueError, match="0/1"):
        delong_test(np.array([2, 0, 2, 0]), np.arange(4.0), np.arange(4.0))
    with pytest.raises(ValueError, match="0/1"):
        paired_bootstrap_auc_difference(np.array([2, 0, 2, 0]), np.arange(4.0), np.arange(4.0))
