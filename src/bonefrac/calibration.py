"""Calibration and operating point: temperature scaling, calibration error, and decision thresholds.

Temperature and thresholds are fitted on the VALIDATION split and then frozen: choosing either on test data would
let the test set tune the model it is meant to judge, and the reported test numbers would be optimistic.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax

TEMPERATURE_BOUNDS = (0.05, 20.0)


# --- temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks") -----------------------------

YOUDEN = "youden"  # the name of the Youden's-J operating point in calibration.json


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities softmax(logits / T) of (n, C) logits; T > 1 softens over-confident outputs. Argmax unchanged."""
    return softmax(np.asarray(logits, dtype=float) / temperature, axis=1)


def negative_log_likelihood(logits: np.ndarray, y_true: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / T)."""
    log_proba = log_softmax(np.asarray(logits, dtype=float) / temperature, axis=1)
    return float(-log_proba[np.arange(len(log_proba)), np.asarray(y_true, dtype=int)].mean())


def fit_temperature(
    logits: np.ndarray, y_true: np.ndarray, *, bounds: tuple[float, float] = TEMPERATURE_BOUNDS
) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) on validation logits, within `bounds`.

    One parameter, so a bounded scalar search over log T suffices. The NLL is convex in 1/T, hence has one minimum
    along log T and Brent's method finds it. Perfectly separated validation data drive T towards the lower bound.
    """
    logits, y_true = np.asarray(logits, dtype=float), np.asarray(y_true, dtype=int)
    if logits.ndim != 2 or logits.shape[0] != y_true.size:
        raise ValueError(f"logits must be (n, C) with n = {y_true.size} labels, got shape {logits.shape}")
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(logits, y_true, np.exp(log_t)),
        bounds=(np.log(bounds[0]), np.log(bounds[1])),
        method="bounded",
        options={"xatol": 1e-6},
    )
    return float(np.exp(result.x))


# --- calibration error --------------------------------------------------------------------------------------------


def _confidence_bins(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Bin index of each confidence in n_bins equal-width bins (lo, hi] of [0, 1] (0 goes to the first bin)."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)


def reliability_curve(
    y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin: mean top-label confidence, accuracy, and case count (NaN confidence/accuracy if empty)."""
    proba = np.asarray(proba, dtype=float)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true, dtype=int)
    bins = _confidence_bins(confidence, n_bins)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_confidence = np.bincount(bins, weights=confidence, minlength=n_bins) / count
        accuracy = np.bincount(bins, weights=correct, minlength=n_bins) / count
    return mean_confidence, accuracy, count


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of (cases in bin / n) x |accuracy - mean confidence|."""
    proba = np.asarray(proba, dtype=float)
    confidence = proba.max(axis=1)
    correct = proba.argmax(axis=1) == np.asarray(y_true, dtype=int)
    bins = _confidence_bins(confidence, n_bins)
    # count/n * |correct/count - confidence/count| = |sum correct - sum confidence| / n, per bin.
    gap = np.bincount(bins, weights=correct, minlength=n_bins) - np.bincount(bins, weights=confidence, minlength=n_bins)
    return float(np.abs(gap).sum() / len(confidence))


# --- thresholds ---------------------------------------------------------------------------------------------------


# The sensitivity targets every calibration names an operating point for (a run's own min_sensitivity is added),
# and the specificity targets.
SENSITIVITY_TARGETS = (0.90, 0.95)
SPECIFICITY_TARGETS = (0.95,)


def sensitivity_point(target: float) -> str:
    """The name of the operating point with val sensitivity >= target: "sensitivity>=0.95"."""
    return f"sensitivity>={target:g}"


def specificity_point(target: float) -> str:
    """The name of the operating point with val specificity >= target: "specificity>=0.95"."""
    return f"specificity>={target:g}"


def choose_thresholds(
    y_true: np.ndarray, p_positive: np.ndarray, *, min_sensitivity: float = 0.95
) -> dict[str, dict[str, float]]:
    """Candidate operating points for the positive class, each {"threshold", "sensitivity", "specificity"}.

    Call it on validation data (probabilities after temperature scaling, as used at prediction time), never on
    test data. A case is called positive when p_positive >= threshold; thresholds are observed scores.

    - "default": 0.5.
    - "youden": the threshold maximising Youden's J = sensitivity + specificity - 1 (the highest one on ties).
    - "sensitivity>=T" for T in SENSITIVITY_TARGETS and min_sensitivity: the highest threshold whose sensitivity is
      at least T, i.e. the best specificity under that constraint. A screening aid must miss few fractures, so
      these are the operating points that matter; their sensitivity on new data is an estimate, and the CI of the
      test sensitivity says how far it may fall.
    - "specificity>=T" for T in SPECIFICITY_TARGETS: the lowest threshold whose specificity is at least T, i.e. the
      best sensitivity under that constraint (the rule-in threshold of the three-level answer, `three_levels`).
      When even the highest score flags too many negatives, a threshold just above it: nothing is flagged.

    The sensitivity and specificity given are those on the data passed in.
    """
    positive = np.asarray(y_true)
    if not np.isin(positive, (0, 1)).all():
        raise ValueError("y_true must be 0/1 (1 = the positive class); pass y == positive for class indices")
    positive = positive.astype(bool)
    p_positive = np.asarray(p_positive, dtype=float)
    if positive.all() or not positive.any():
        raise ValueError("choosing a threshold needs both positive and negative cases")
    if not 0 <= min_sensitivity <= 1:
        raise ValueError(f"min_sensitivity must be in [0, 1], got {min_sensitivity}")
    # Candidate thresholds: every distinct score, highest first. Counts from sorted scores give the exact fractions
    # (the same floats as counting flagged cases), which 1 - false-positive rate would not.
    thresholds = np.unique(p_positive)[::-1]
    scores_pos, scores_neg = np.sort(p_positive[positive]), np.sort(p_positive[~positive])
    sensitivity = (scores_pos.size - np.searchsorted(scores_pos, thresholds)) / scores_pos.size  # share >= t
    specificity = np.searchsorted(scores_neg, thresholds) / scores_neg.size  # share < t

    def operating_point(i: int) -> dict[str, float]:
        return {"threshold": float(thresholds[i]), "sensitivity": float(sensitivity[i]),
                "specificity": float(specificity[i])}

    flagged = p_positive >= 0.5
    best_j = int(np.argmax(sensitivity + specificity))  # the first is the highest threshold among ties
    points = {
        "default": {"threshold": 0.5, "sensitivity": float(flagged[positive].mean()),
                    "specificity": float((~flagged[~positive]).mean())},
        YOUDEN: operating_point(best_j),
    }
    for target in sorted({*SENSITIVITY_TARGETS, min_sensitivity}):
        reaching = int(np.flatnonzero(sensitivity >= target)[0])  # sensitivity rises as the threshold falls
        points[sensitivity_point(target)] = operating_point(reaching)
    for target in SPECIFICITY_TARGETS:
        reaching = np.flatnonzero(specificity >= target)  # specificity falls as the threshold falls
        points[specificity_point(target)] = operating_point(int(reaching[-1])) if reaching.size else {
            "threshold": float(np.nextafter(thresholds[0], np.inf)), "sensitivity": 0.0, "specificity": 1.0}
    return points


# --- the three-level answer ---------------------------------------------------------------------------------------

# Clinical decision aids answer in three levels from two thresholds: below a rule-out threshold chosen for high
# sensitivity few fractures are missed, at or above a rule-in threshold chosen for high specificity few normals are
# flagged, and between them the model does not know enough to say either.
FRACTURE, DOUBT, NO_FRACTURE = "fracture", "doubt", "no fracture"
LEVEL_POINTS = {"low": sensitivity_point(0.95), "high": specificity_point(0.95)}  # rule out below, rule in at/above


def three_levels(points: dict[str, dict[str, float]]) -> dict | None:
    """The three-level rule from choose_thresholds' points: {"low": {"operating_point", "threshold"}, "high": ...,
    "doubt_band": low < high}; None when either point of LEVEL_POINTS is missing (a run calibrated before
    specificity points existed).

    Without a doubt band (low >= high) one threshold, the high one, reaches both targets on val, and `level` is
    then a plain two-way answer at it.
    """
    if not all(name in points for name in LEVEL_POINTS.values()):
        return None
    levels = {side: {"operating_point": name, "threshold": float(points[name]["threshold"])}
              for side, name in LEVEL_POINTS.items()}
    return levels | {"doubt_band": levels["low"]["threshold"] < levels["high"]["threshold"]}


def level(p_positive: float, levels: dict) -> str:
    """FRACTURE at or above the high threshold, else NO_FRACTURE below the low one, else DOUBT."""
    if p_positive >= levels["high"]["threshold"]:
        return FRACTURE
    return NO_FRACTURE if p_positive < levels["low"]["threshold"] else DOUBT


def levels_text(levels: dict | None) -> str:
    """The rule in words, for the terminal and the model card."""
    if levels is None:
        return (f"none (calibration.json lacks {' or '.join(LEVEL_POINTS.values())}: calibrate again with "
                "bonefrac calibrate RUN)")
    low, high = levels["low"], levels["high"]
    if not levels["doubt_band"]:
        return (f"no doubt band: {high['threshold']:.4f} ({high['operating_point']}) is not above "
                f"{low['threshold']:.4f} ({low['operating_point']}), so one threshold reaches both on val: "
                f"{FRACTURE} at or above {high['threshold']:.4f}, {NO_FRACTURE} below")
    return (f"{NO_FRACTURE} below {low['threshold']:.4f} ({low['operating_point']}), {FRACTURE} at or above "
            f"{high['threshold']:.4f} ({high['operating_point']}), {DOUBT} between")


# --- predictive values --------------------------------------------------------------------------------------------


def predictive_values(sensitivity: float, specificity: float, prevalence: float) -> tuple[float | None, float | None]:
    """(PPV, NPV) by Bayes' rule at a prevalence in (0, 1); None where nothing is flagged (PPV) or cleared (NPV).

    Sensitivity and specificity do not depend on how common fractures are; the chance that a flagged image is a
    fracture does, so it is computed for the prevalence of the place the model is used in.
    """
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence {prevalence:g}: the share of fractures among the images, strictly between 0 "
                         "and 1 (e.g. 0.1)")
    flagged_true, flagged_false = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    cleared_true, cleared_false = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    ppv = flagged_true / (flagged_true + flagged_false) if flagged_true + flagged_false > 0 else None
    npv = cleared_true / (cleared_true + cleared_false) if cleared_true + cleared_false > 0 else None
    return ppv, npv
