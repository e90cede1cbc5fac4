"""Classification metrics with bootstrap confidence intervals, and paired tests of an AUC difference.

Pure functions, arrays in and numbers out; loading a run directory is the caller's job. Conventions:

- `y_true` holds class indices into `labels`; `proba` is (n, C) probabilities (rows sum to 1).
- A metric that is undefined on the data (an AUC or a recall without cases of a needed class) is NaN, never a
  made-up 0 or 1; the bootstrap skips NaN resamples for that metric and says how many it used (`Interval.n_valid`).
  The one exception follows scikit-learn's `zero_division=0`: a class the model never predicts has precision 0.
- Every number is computed by numpy here, not by calling scikit-learn, because a bootstrap calls the metrics a
  thousand times: one scikit-learn call costs about 1-4 ms in argument checking, so the full set per resample
  costs ~16 ms (16 s for 1,000 resamples) against ~0.8 ms here. tests/test_metrics.py checks every value against
  scikit-learn's on fixed arrays, ties included.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy.stats import norm, rankdata

from bonefrac.calibration import expected_calibration_error

MetricFn = Callable[[np.ndarray, np.ndarray], Mapping[str, float]]


# --- metrics of one sample ----------------------------------------------------------------------------------------


def predicted_labels(proba: np.ndarray, *, positive: int | None = None, threshold: float | None = None) -> np.ndarray:
    """Predicted class per row: binary with a positive class, p[positive] >= threshold (0.5); else the argmax.

    A score exactly at the threshold counts as positive, as in scikit-learn's roc_curve.
    """
    proba = np.asarray(proba, dtype=float)
    n_classes = proba.shape[1]
    if positive is not None and n_classes == 2:
        cut = 0.5 if threshold is None else threshold
        return np.where(proba[:, positive] >= cut, positive, 1 - positive)
    if threshold is not None:
        raise ValueError("a threshold needs a binary task and a positive class; multi-class predictions are argmax")
    return proba.argmax(axis=1)


def binary_roc_auc(y_true: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of `score` for the cases where y_true is 1, by the rank (Mann-Whitney) formula; NaN for one class.

    Ties between a positive and a negative count one half, which equals the trapezoid area scikit-learn computes.
    """
    positive = np.asarray(y_true).astype(bool)
    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)  # average ranks of tied scores
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    """Average precision (area under the step PR curve, as scikit-learn's) for y_true == 1; NaN without positives.

    AP = sum over distinct thresholds, highest first, of (recall gained) x (precision there).
    """
    positive = np.asarray(y_true).astype(bool)
    if not positive.any():
        return float("nan")
    order = np.argsort(-np.asarray(score, dtype=float), kind="stable")
    score_sorted = np.asarray(score, dtype=float)[order]
    hits = np.cumsum(positive[order])
    # Tied scores form one threshold: keep the last position of each run of equal scores.
    last_of_tie = np.r_[np.flatnonzero(np.diff(score_sorted)), score_sorted.size - 1]
    true_pos = hits[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall_gained = np.diff(true_pos, prepend=0) / true_pos[-1]
    return float(np.sum(recall_gained * precision))


def classification_metrics(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    labels: Sequence[str],
    positive: int | None,
    threshold: float | None = None,
    y_pred: np.ndarray | None = None,
) -> dict[str, float]:
    """All metrics of one sample, flat and named: "accuracy", "f1/macro", "precision/<label>", "roc_auc", ...

    Label-based metrics use `predicted_labels` (binary: p[positive] >= threshold, default 0.5; else argmax), or
    y_pred when the decisions were made elsewhere (out-of-fold predictions, each by its own fold's threshold).
    `positive` (an index into labels) makes a binary task's "roc_auc" and "pr_auc" those of the positive class and
    adds "sensitivity" and "specificity" (for more classes: of positive-vs-rest under argmax). Without a binary
    positive class, "roc_auc" and "pr_auc" are one-vs-rest macro averages, with "roc_auc/<label>" per class.
    "brier" follows scikit-learn: mean squared error against one-hot, halved for binary (= mean (p - y)^2 of one
    column), the full sum over classes for more. "ece" is top-label, 15 equal-width bins.
    """
    y = np.asarray(y_true).astype(int)
    proba = np.asarray(proba, dtype=float)
    n_classes = len(labels)
    if proba.ndim != 2 or proba.shape != (y.size, n_classes):
        raise ValueError(f"proba must be (n, {n_classes}) for {n_classes} labels and n = {y.size}, got {proba.shape}")
    if y.size == 0 or y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y_true must be a non-empty array of class indices in [0, {n_classes})")
    if positive is not None and not 0 <= positive < n_classes:
        raise ValueError(f"positive must be a class index in [0, {n_classes}), got {positive}")
    n = y.size
    if y_pred is None:
        y_pred = predicted_labels(proba, positive=positive, threshold=threshold)
    elif np.shape(y_pred) != (n,):
        raise ValueError(f"y_pred must hold one class index per case ({n}), got shape {np.shape(y_pred)}")
    y_pred = np.asarray(y_pred).astype(int)

    confusion = np.bincount(n_classes * y + y_pred, minlength=n_classes * n_classes).reshape(n_classes, n_classes)
    true_pos = np.diag(confusion).astype(float)
    support = confusion.sum(axis=1)  # true cases per class
    predicted = confusion.sum(axis=0)  # predictions per class
    precision = np.divide(true_pos, predicted, out=np.zeros(n_classes), where=predicted > 0)
    recall = np.divide(true_pos, support, out=np.full(n_classes, np.nan), where=support > 0)
    # 2TP / (2TP + FP + FN) = 2PR / (P + R), and 0 (not 0/0) when TP = 0 but the class has cases.
    f1 = np.divide(2 * true_pos, support + predicted, out=np.full(n_classes, np.nan), where=support > 0)

    out: dict[str, float] = {"accuracy": float(true_pos.sum() / n), "balanced_accuracy": float(recall.mean())}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        for label, value in zip(labels, values, strict=True):
            out[f"{name}/{label}"] = float(value)
        out[f"{name}/macro"] = float(values.mean())
        out[f"{name}/weighted"] = float(np.sum(np.where(support > 0, values, 0.0) * support) / n)

    chance = float(support @ predicted) / n**2  # agreement expected from the marginals alone
    out["cohen_kappa"] = (out["accuracy"] - chance) / (1 - chance) if chance < 1 else float("nan")

    one_hot = np.eye(n_classes)[y]
    squared_error = np.sum((proba - one_hot) ** 2, axis=1).mean()
    out["brier"] = float(squared_error / 2 if n_classes == 2 else squared_error)
    out["ece"] = expected_calibration_error(y, proba)

    if positive is not None and n_classes == 2:
        out["roc_auc"] = binary_roc_auc(y == positive, proba[:, positive])
        out["pr_auc"] = binary_average_precision(y == positive, proba[:, positive])
    else:
        aucs = [binary_roc_auc(y == k, proba[:, k]) for k in range(n_classes)]
        precisions = [binary_average_precision(y == k, proba[:, k]) for k in range(n_classes)]
        out["roc_auc"] = float(np.mean(aucs))
        out["pr_auc"] = float(np.mean(precisions))
        for label, auc, ap in zip(labels, aucs, precisions, strict=True):
            out[f"roc_auc/{label}"] = auc
            out[f"pr_auc/{label}"] = ap

    if positive is not None:
        is_case, flagged = y == positive, y_pred == positive
        n_cases = int(is_case.sum())
        out["sensitivity"] = float(flagged[is_case].sum() / n_cases) if n_cases else float("nan")
        out["specificity"] = float((~flagged[~is_case]).sum() / (n - n_cases)) if n_cases < n else float("nan")
    return out


# --- bootstrap ----------------------------------------------------------------------------------------------------


class Interval(NamedTuple):
    """A metric's value on the full data with a percentile bootstrap interval.

    n_valid counts the resamples in which the metric was defined (e.g. both classes present for an AUC); the
    interval comes from those alone, and is NaN when there were none.
    """

    point: float
    low: float
    high: float
    n_valid: int


def bootstrap_indices(
    n_cases: int, *, groups: np.ndarray | None = None, n_resamples: int = 1000, seed: int = 0
) -> Iterator[np.ndarray]:
    """Case indices of each bootstrap resample: n_cases drawn with replacement, or whole groups when given.

    With groups (one sortable id per case), G groups are drawn with replacement from the G there are, and every case
    of a drawn group comes along (a cluster bootstrap), so near-copies of one image never pose as independent
    evidence. The resample size then varies with the sizes of the drawn groups.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        yield from rng.integers(0, n_cases, size=(n_resamples, n_cases))
        return
    groups = np.asarray(groups)
    if groups.shape != (n_cases,):
        raise ValueError(f"groups must hold one id per case ({n_cases}), got shape {groups.shape}")
    _, group_of = np.unique(groups, return_inverse=True)
    by_group = np.argsort(group_of, kind="stable")  # case indices, sorted so each group is one contiguous run
    sizes = np.bincount(group_of)
    starts = np.cumsum(sizes) - sizes
    for drawn in rng.integers(0, sizes.size, size=(n_resamples, sizes.size)):
        lengths = sizes[drawn]
        # Position p of the resample, inside drawn group j placed at offset o_j, is case by_group[start_j + p - o_j].
        shift = np.repeat(starts[drawn] - (np.cumsum(lengths) - lengths), lengths)
        yield by_group[shift + np.arange(lengths.sum())]


def _bootstrap_values(
    y_true: np.ndarray,
    scores: np.ndarray,
    metric_fn: MetricFn,
    *,
    groups: np.ndarray | None,
    n_resamples: int,
    seed: int,
) -> tuple[dict[str, float], np.ndarray]:
    """metric_fn on the full data, and a (n_resamples, n_metrics) array of its values per resample (NaN: undefined)."""
    y_true, scores = np.asarray(y_true), np.asarray(scores)
    point = {key: float(value) for key, value in metric_fn(y_true, scores).items()}
    values = np.full((n_resamples, len(point)), np.nan)
    for b, idx in enumerate(bootstrap_indices(y_true.size, groups=groups, n_resamples=n_resamples, seed=seed)):
        resampled = metric_fn(y_true[idx], scores[idx])
        values[b] = [resampled.get(key, np.nan) for key in point]
    return point, values


def bootstrap_ci(
    y_true: np.ndarray,
    proba: np.ndarray,
    metric_fn: MetricFn,
    *,
    groups: np.ndarray | None = None,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Interval]:
    """Percentile bootstrap interval of every metric metric_fn(y_true, proba) returns, resampling groups when given.

    metric_fn is usually `functools.partial(classification_metrics, labels=..., positive=..., threshold=...)`.
    Deterministic for a seed. Resamples where a metric is NaN are left out of that metric's interval only.
    """
    point, values = _bootstrap_values(y_true, proba, metric_fn, groups=groups, n_resamples=n_resamples, seed=seed)
    tail = (1 - confidence) / 2
    out = {}
    for key, column in zip(point, values.T, strict=True):
        valid = column[~np.isnan(column)]
        low, high = np.quantile(valid, [tail, 1 - tail]) if valid.size else (np.nan, np.nan)
        out[key] = Interval(point[key], float(low), float(high), int(valid.size))
    return out


# --- report -------------------------------------------------------------------------------------------------------

# The headline metrics in the order reports, the model card and the API show them, with their names in words.
METRIC_NAMES = (
    ("roc_auc", "ROC AUC"),
    ("pr_auc", "PR AUC (average precision)"),
    ("sensitivity", "sensitivity"),
    ("specificity", "specificity"),
    ("accuracy", "accuracy"),
    ("balanced_accuracy", "balanced accuracy"),
    ("f1/macro", "F1, macro average"),
    ("cohen_kappa", "Cohen's kappa"),
    ("brier", "Brier score (lower is better)"),
    ("ece", "expected calibration error (lower is better)"),
)


def format_number(value: float | None, digits: int = 4) -> str:
    """A metric for a sentence or a log line: 'n/a' when it is undefined (None or NaN)."""
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def format_interval(entry: Mapping | None, digits: int = 3) -> str:
    """A metrics.json entry as '0.912 [0.861, 0.955]' ('[CI n/a]' without an interval, 'n/a' without a value)."""
    if not entry or entry.get("point") is None:
        return "n/a"
    if entry.get("low") is None:
        return f"{entry['point']:.{digits}f} [CI n/a]"
    return f"{entry['point']:.{digits}f} [{entry['low']:.{digits}f}, {entry['high']:.{digits}f}]"


def classification_report_text(
    metrics: Mapping[str, float | Sequence[float]], labels: Sequence[str], support: Sequence[int], *, digits: int = 3
) -> str:
    """scikit-learn's classification-report table from `classification_metrics` (or `bootstrap_ci`) output.

    When the values are intervals, each cell reads "0.912 [0.884, 0.938]" (point [95 % CI]). The metrics that do not
    fit the table (AUCs, kappa, Brier, ECE, sensitivity, ...) follow it, one per line.
    """

    def cell(key: str) -> str:
        value = metrics[key]
        if isinstance(value, int | float | np.floating):
            return f"{value:.{digits}f}"
        point, low, high = value[:3]
        return f"{point:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"

    columns = ("precision", "recall", "f1")
    total = int(sum(support))
    rows: list[tuple[str, list[str], int] | None] = [
        (label, [cell(f"{m}/{label}") for m in columns], int(count))
        for label, count in zip(labels, support, strict=True)
    ]
    rows.append(None)  # a blank line, as scikit-learn's
    rows.append(("accuracy", ["", "", cell("accuracy")], total))
    for average in ("macro", "weighted"):
        rows.append((f"{average} avg", [cell(f"{m}/{average}") for m in columns], total))

    name_width = max(len(row[0]) for row in rows if row)
    width = max(len("f1-score"), *(len(c) for row in rows if row for c in row[1])) + 2
    header = "".join(h.rjust(width) for h in ("precision", "recall", "f1-score"))
    lines = [" " * name_width + header + "support".rjust(9), ""]
    for row in rows:
        if row is None:
            lines.append("")
        else:
            name, cells, count = row
            lines.append(name.rjust(name_width) + "".join(c.rjust(width) for c in cells) + str(count).rjust(9))

    in_table = {"accuracy"} | {f"{m}/{c}" for m in columns for c in (*labels, "macro", "weighted")}
    rest = [key for key in metrics if key not in in_table]
    if rest:
        lines.append("")
        key_width = max(len(key) for key in rest)
        lines.extend(f"{key.rjust(key_width)}  {cell(key)}" for key in rest)
    return "\n".join(lines) + "\n"


# --- comparing two models on the same cases -----------------------------------------------------------------------


def _binary_target(y_true: np.ndarray) -> np.ndarray:
    """y_true as booleans (True = positive class), refusing anything but 0/1 or booleans."""
    y = np.asarray(y_true)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("y_true must be 0/1 (1 = the positive class); pass y == positive for class indices")
    return y.astype(bool)


def _delong_structural_components(y_true: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, ...]:
    """AUC per model and DeLong's structural components, by the midrank algorithm of Sun & Xu (2014).

    scores is (k models, n cases). V10[r, i] is the fraction of negatives that positive i outranks under model r
    (ties count 1/2), V01[r, j] the fraction of positives that outrank negative j; AUC_r is the mean of either.
    Midranks of the pooled, positive-only and negative-only scores give all of them in O(n log n).
    """
    positive = np.asarray(y_true).astype(bool)
    pos, neg = scores[:, positive], scores[:, ~positive]
    m, n = pos.shape[1], neg.shape[1]
    pooled = rankdata(np.concatenate([pos, neg], axis=1), axis=1)  # midranks: ties get the average rank
    within_pos, within_neg = rankdata(pos, axis=1), rankdata(neg, axis=1)
    auc = (pooled[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (pooled[:, :m] - within_pos) / n
    v01 = 1 - (pooled[:, m:] - within_neg) / m
    return auc, v10, v01


def delong_test(
    y_true: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, *, confidence: float = 0.95
) -> dict[str, float]:
    """DeLong's test that two models' ROC AUCs on the same cases differ (binary; y_true 1 = positive class).

    Returns auc_a, auc_b, difference (a - b) with its normal-theory interval (difference_low, difference_high),
    z and the two-sided p_value, and the case counts. The variance is DeLong, DeLong & Clarke-Pearson (1988),
    computed by the fast algorithm of Sun & Xu (2014, IEEE Signal Processing Letters 21:1389). It assumes
    independent cases: with duplicate groups use `paired_bootstrap_auc_difference(..., groups=...)`.
    """
    positive = _binary_target(y_true)
    m, n = int(positive.sum()), int((~positive).sum())
    if m < 2 or n < 2:
        raise ValueError(f"DeLong's test needs at least 2 positive and 2 negative cases, got {m} and {n}")
    scores = np.vstack([np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)])
    auc, v10, v01 = _delong_structural_components(positive, scores)
    covariance = np.cov(v10) / m + np.cov(v01) / n  # 2 x 2: Var(AUC_a), Var(AUC_b) and their covariance
    contrast = np.array([1.0, -1.0])
    variance = float(contrast @ covariance @ contrast)
    difference = float(auc[0] - auc[1])
    half_width = norm.ppf(0.5 + confidence / 2) * np.sqrt(max(variance, 0.0))
    # Identical (or identically ranking) models: no variance and no difference, so nothing to reject.
    if variance <= 1e-15:
        z = 0.0 if abs(difference) < 1e-12 else float(np.copysign(np.inf, difference))
    else:
        z = difference / np.sqrt(variance)
    return {
        "auc_a": float(auc[0]),
        "auc_b": float(auc[1]),
        "difference": difference,
        "difference_low": difference - half_width,
        "difference_high": difference + half_width,
        "z": float(z),
        "p_value": float(2 * norm.sf(abs(z))),
        "n_positive": m,
        "n_negative": n,
    }


def _auc_pair(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    auc_a, auc_b = binary_roc_auc(y_true, scores[:, 0]), binary_roc_auc(y_true, scores[:, 1])
    return {"auc_a": auc_a, "auc_b": auc_b, "difference": auc_a - auc_b}


def paired_bootstrap_auc_difference(
    y_true: np.ndarray,
    score_a: np.ndarray,
    score_b: np.ndarray,
    *,
    groups: np.ndarray | None = None,
    n_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Paired bootstrap of the AUC difference a - b on the same cases (binary; y_true 1 = positive class).

    Both models are scored on each resample, so their correlation is kept; with groups, whole groups are drawn.
    The interval is the percentile interval of the resampled differences; z is the difference over their standard
    deviation and p_value its two-sided normal p (as pROC's roc.test(method="bootstrap")). Same keys as
    `delong_test`, plus n_valid (resamples with both classes).
    """
    scores = np.column_stack([np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)])
    positive = _binary_target(y_true)
    point, values = _bootstrap_values(
        positive, scores, _auc_pair, groups=groups, n_resamples=n_resamples, seed=seed
    )
    differences = values[:, 2][~np.isnan(values[:, 2])]
    if differences.size < 2:
        raise ValueError("fewer than 2 bootstrap resamples held both classes; the data need positives and negatives")
    tail = (1 - confidence) / 2
    low, high = np.quantile(differences, [tail, 1 - tail])
    spread = float(np.std(differences, ddof=1))
    if spread <= 1e-15:
        z = 0.0 if abs(point["difference"]) < 1e-12 else float(np.copysign(np.inf, point["difference"]))
    else:
        z = point["difference"] / spread
    return {
        **point,
        "difference_low": float(low),
        "difference_high": float(high),
        "z": float(z),
        "p_value": float(2 * norm.sf(abs(z))),
        "n_positive": int(positive.sum()),
        "n_negative": int((~positive).sum()),
        "n_valid": int(differences.size),
    }
