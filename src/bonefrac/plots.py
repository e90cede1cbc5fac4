"""Figures: learning curves, and for evaluation confusion matrix, ROC, precision-recall, reliability, score histograms.

Each function takes arrays, returns a matplotlib Figure drawn on the Agg canvas (no display, no pyplot state to
leak between calls) and writes it when given a path (the format follows the suffix). Every title states n, so a
figure cut out of a report still says how much data it rests on. `title` is the caller's: name the split there,
and "synthetic" when the data are phantoms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from sklearn.metrics import precision_recall_curve, roc_curve

from bonefrac.atomic import atomic_open
from bonefrac.calibration import expected_calibration_error, reliability_curve
from bonefrac.metrics import binary_average_precision, binary_roc_auc

DPI = 110


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _finish(figure: Figure, path: str | Path | None) -> Figure:
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(path, "wb") as handle:  # a run's plots are run files: whole or not at all
            figure.savefig(handle, format=Path(path).suffix.lstrip(".") or "png")
    return figure


def _n_text(y_true: np.ndarray, labels: Sequence[str], positive: int | None) -> str:
    """'n = 350, 120 fractured' for a task with a positive class, else 'n = 350'."""
    if positive is None:
        return f"n = {y_true.size}"
    return f"n = {y_true.size}, {int(np.sum(y_true == positive))} {labels[positive]}"


def _curves(y_true: np.ndarray, labels: Sequence[str], positive: int | None) -> list[tuple[int, str]]:
    """The (class index, key suffix) of each curve: the positive class of a binary task, else one per class."""
    if positive is not None and len(labels) == 2:
        return [(positive, "")]
    return [(k, f"/{label}") for k, label in enumerate(labels)]


def _area_text(name: str, value: float, intervals: Mapping[str, Sequence[float]] | None, key: str) -> str:
    """'AUC 0.912 [95% CI 0.884, 0.938]' when intervals hold key (bootstrap_ci output), else 'AUC 0.912'."""
    if intervals is not None and key in intervals:
        point, low, high = intervals[key][:3]
        return f"{name} {point:.3f} [95% CI {low:.3f}, {high:.3f}]"
    return f"{name} {value:.3f}"


def plot_confusion_matrix(
    y_true: np.ndarray,
    y_pred: np.ndarray,
    labels: Sequence[str],
    *,
    title: str = "Confusion matrix",
    path: str | Path | None = None,
) -> Figure:
    """Counts and row-normalised shares (recall on the diagonal) side by side, N x N with the label names."""
    y_true, y_pred = np.asarray(y_true, dtype=int), np.asarray(y_pred, dtype=int)
    n_classes = len(labels)
    counts = np.bincount(n_classes * y_true + y_pred, minlength=n_classes**2).reshape(n_classes, n_classes)
    rows = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)

    side = 2.2 + 0.7 * n_classes
    figure = _figure(2 * side + 0.6, side)
    panels = (
        (counts, [[f"{c}" for c in row] for row in counts], max(counts.max(), 1), "counts"),
        (shares, [[f"{s:.0%}" for s in row] for row in shares], 1.0, "share of true class"),
    )
    for ax, (values, text, vmax, name) in zip(figure.subplots(1, 2), panels, strict=True):
        image = ax.imshow(values, cmap="Blues", vmin=0, vmax=vmax)
        for i, j in np.ndindex(values.shape):
            dark = values[i, j] > 0.6 * vmax
            ax.text(j, i, text[i][j], ha="center", va="center", color="white" if dark else "black", fontsize=9)
        tilt = n_classes > 2  # long names side by side overlap
        ax.set_xticks(range(n_classes), labels, rotation=30 if tilt else 0, ha="right" if tilt else "center",
                      fontsize=8)
        ax.set_yticks(range(n_classes), labels, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(name, fontsize=9)
        figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(f"{title} ({_n_text(y_true, labels, None)})", fontsize=10)
    return _finish(figure, path)


def _roc_axes(ax) -> None:
    """The axes every ROC plot shares: rates from 0 to 1, square, a light grid."""
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)


def plot_roc(
    y_true: np.ndarray,
    proba: np.ndarray,
    labels: Sequence[str],
    *,
    positive: int | None = None,
    intervals: Mapping[str, Sequence[float]] | None = None,
    threshold: float | None = None,
    title: str = "ROC curve",
    path: str | Path | None = None,
) -> Figure:
    """ROC of the positive class (binary) or one-vs-rest per class, AUC [95 % CI] in the legend.

    intervals is `bootstrap_ci` output (keys "roc_auc", "roc_auc/<label>"); threshold marks an operating point on
    a binary curve.
    """
    y_true, proba = np.asarray(y_true, dtype=int), np.asarray(proba, dtype=float)
    figure = _figure(4.8, 4.4)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="chance")
    for k, suffix in _curves(y_true, labels, positive):
        fpr, tpr, _ = roc_curve(y_true == k, proba[:, k])
        auc = binary_roc_auc(y_true == k, proba[:, k])
        name = f"{labels[k]} vs rest" if len(labels) > 2 else labels[k]
        ax.plot(fpr, tpr, linewidth=1.6, label=f"{name}: {_area_text('AUC', auc, intervals, 'roc_auc' + suffix)}")
    if threshold is not None and positive is not None and len(labels) == 2:
        flagged = proba[:, positive] >= threshold
        is_case = y_true == positive
        ax.plot(flagged[~is_case].mean(), flagged[is_case].mean(), "o", color="black", markersize=5,
                label=f"threshold {threshold:.2f}")
    _roc_axes(ax)
    ax.legend(loc="lower right", fontsize=7.5)
    ax.set_title(f"{title} ({_n_text(y_true, labels, positive)})", fontsize=10)
    return _finish(figure, path)


def plot_roc_folds(
    folds: Mapping[str, tuple[np.ndarray, np.ndarray]],
    pooled: tuple[np.ndarray, np.ndarray],
    *,
    pooled_auc: Mapping[str, float | None] | None = None,
    title: str = "ROC curves per fold",
    path: str | Path | None = None,
) -> Figure:
    """Cross-validation: each fold's ROC curve (thin) and the pooled out-of-fold one (thick, AUC [95 % CI]).

    folds: name -> (is_positive, score) of the fold's test images; pooled: the same over every image;
    pooled_auc: {"point", "low", "high"} of the pooled AUC.
    """
    figure = _figure(4.8, 4.4)
    ax = figure.add_subplot()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="chance")
    for name, (is_case, score) in folds.items():
        if 0 < np.sum(is_case) < len(is_case):
            fpr, tpr, _ = roc_curve(is_case, score)
            ax.plot(fpr, tpr, linewidth=0.9, alpha=0.7,
                    label=f"{name}: AUC {binary_roc_auc(is_case, score):.3f} (n {len(is_case)})")
    is_case, score = pooled
    fpr, tpr, _ = roc_curve(is_case, score)
    text = f"{binary_roc_auc(is_case, score):.3f}"
    if pooled_auc and pooled_auc.get("low") is not None:
        text += f" [{pooled_auc['low']:.3f}, {pooled_auc['high']:.3f}]"
    ax.plot(fpr, tpr, color="black", linewidth=2, label=f"pooled: AUC {text}")
    _roc_axes(ax)
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(f"{title} ({len(is_case)} images)", fontsize=10)
    return _finish(figure, path)


def plot_precision_recall(
    y_true: np.ndarray,
    proba: np.ndarray,
    labels: Sequence[str],
    *,
    positive: int | None = None,
    intervals: Mapping[str, Sequence[float]] | None = None,
    title: str = "Precision-recall",
    path: str | Path | None = None,
) -> Figure:
    """Precision-recall curve(s) with average precision [95 % CI]; the dotted line is the prevalence (chance)."""
    y_true, proba = np.asarray(y_true, dtype=int), np.asarray(proba, dtype=float)
    figure = _figure(4.8, 4.4)
    ax = figure.add_subplot()
    for k, suffix in _curves(y_true, labels, positive):
        precision, recall, _ = precision_recall_curve(y_true == k, proba[:, k])
        ap = binary_average_precision(y_true == k, proba[:, k])
        (line,) = ax.plot(recall, precision, drawstyle="steps-post", linewidth=1.6,
                          label=f"{labels[k]}: {_area_text('AP', ap, intervals, 'pr_auc' + suffix)}")
        ax.axhline(np.mean(y_true == k), color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision (positive predictive value)")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=7.5)
    ax.set_title(f"{title} ({_n_text(y_true, labels, positive)})", fontsize=10)
    return _finish(figure, path)


def plot_reliability(
    y_true: np.ndarray,
    proba: np.ndarray,
    *,
    n_bins: int = 15,
    uncalibrated: np.ndarray | None = None,
    title: str = "Reliability diagram",
    path: str | Path | None = None,
) -> Figure:
    """Accuracy against top-label confidence per bin, ECE in the legend, and the cases per bin below.

    `uncalibrated` (probabilities before temperature scaling) is drawn dashed for comparison when given.
    """
    y_true = np.asarray(y_true, dtype=int)
    figure = _figure(4.8, 5.2)
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1, label="perfect calibration")
    centres = (np.arange(n_bins) + 0.5) / n_bins
    curves = [("after temperature scaling" if uncalibrated is not None else "model", np.asarray(proba, dtype=float),
               "-")]
    if uncalibrated is not None:
        curves.append(("before", np.asarray(uncalibrated, dtype=float), "--"))
    for offset, (name, p, style) in enumerate(curves):
        confidence, accuracy, count = reliability_curve(y_true, p, n_bins)
        ece = expected_calibration_error(y_true, p, n_bins)
        filled = count > 0
        (line,) = top.plot(confidence[filled], accuracy[filled], style, marker="o", markersize=3.5, linewidth=1.4,
                           label=f"{name}: ECE {ece:.3f}")
        bar_width = 0.9 / n_bins / len(curves)
        bottom.bar(centres + (offset - (len(curves) - 1) / 2) * bar_width, count, width=bar_width,
                   color=line.get_color(), alpha=0.7)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.grid(alpha=0.3)
    top.legend(loc="upper left", fontsize=7.5)
    bottom.set_xlabel(f"top-label confidence ({n_bins} bins)")
    bottom.set_ylabel("cases")
    top.set_title(f"{title} (n = {y_true.size})", fontsize=10)
    return _finish(figure, path)


def plot_score_histograms(
    y_true: np.ndarray,
    proba: np.ndarray,
    labels: Sequence[str],
    *,
    positive: int | None = None,
    threshold: float | None = None,
    title: str = "Scores by true class",
    path: str | Path | None = None,
) -> Figure:
    """Histograms of predicted probability split by the true class, with the decision threshold.

    Binary with a positive class: p(positive) for each true class in one panel, the threshold (default 0.5) as a
    line. Otherwise one panel per class: p(class) for cases of that class against all others.
    """
    y_true, proba = np.asarray(y_true, dtype=int), np.asarray(proba, dtype=float)
    bins = np.linspace(0, 1, 21)
    if positive is not None and len(labels) == 2:
        figure = _figure(5.2, 3.6)
        ax = figure.add_subplot()
        for k in (positive, 1 - positive):
            ax.hist(proba[y_true == k, positive], bins=bins, alpha=0.55, label=f"true {labels[k]} "
                    f"(n = {int(np.sum(y_true == k))})")
        cut = 0.5 if threshold is None else threshold
        ax.axvline(cut, color="black", linestyle="--", linewidth=1.2, label=f"threshold {cut:.2f}")
        ax.set_xlabel(f"p({labels[positive]})")
        ax.set_ylabel("cases")
        ax.legend(fontsize=7.5)
        ax.set_title(f"{title} ({_n_text(y_true, labels, positive)})", fontsize=10)
        return _finish(figure, path)

    figure = _figure(2.6 * len(labels) + 0.6, 3.2)
    axes = figure.subplots(1, len(labels), sharey=True)
    for k, (ax, label) in enumerate(zip(axes, labels, strict=True)):
        ax.hist(proba[y_true == k, k], bins=bins, alpha=0.55, label=f"{label} (n = {int(np.sum(y_true == k))})")
        ax.hist(proba[y_true != k, k], bins=bins, alpha=0.55, label=f"others (n = {int(np.sum(y_true != k))})")
        ax.set_xlabel(f"p({label})")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("cases")
    figure.suptitle(f"{title} ({_n_text(y_true, labels, None)})", fontsize=10)
    return _finish(figure, path)


def plot_learning_curves(
    history: Sequence[Mapping[str, float]], path: str | Path, *, notes: Sequence[str] = ()
) -> Figure:
    """Loss and accuracy per epoch, train vs val (and val AUROC); `notes` go in the title."""
    figure = _figure(10, 4)
    loss, accuracy = figure.subplots(1, 2)
    epochs = [row["epoch"] for row in history]
    for axes, metric, title in ((loss, "loss", "loss"), (accuracy, "acc", "accuracy and val AUROC")):
        axes.plot(epochs, [row[f"train_{metric}"] for row in history], "o-", label="train")
        axes.plot(epochs, [row[f"val_{metric}"] for row in history], "o-", label="val")
        axes.set(title=title, xlabel="epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    accuracy.plot(epochs, [row["val_auroc"] for row in history], "s--", label="val AUROC")
    accuracy.set_ylim(0, 1.02)
    loss.legend()
    accuracy.legend()
    if notes:
        figure.suptitle("; ".join(notes))
    return _finish(figure, path)
