from __future__ import annotations

import functools

import numpy as np
import pytest
from matplotlib.figure import Figure

from bonefrac import plots
from bonefrac.calibration import apply_temperature, fit_temperature
from bonefrac.metrics import bootstrap_ci, classification_metrics, predicted_labels

CASES = {
    "binary": (["fractured", "not_fractured"], 0),  # the positive class first, as bonefrac's labels sort
    "3-class": (["normal", "simple", "comminuted"], None),
}


def sample(n_classes: int, n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and logits of an informative (n_classes)-class model."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, n_classes, n)
    return y, 6.0 * np.eye(n_classes)[y] + rng.normal(scale=3, size=(n, n_classes))  # over-confident


def figures(labels, positive, y, logits):
    proba = apply_temperature(logits, fit_temperature(logits, y))
    intervals = bootstrap_ci(y, proba, functools.partial(classification_metrics, labels=labels, positive=positive),
                             n_resamples=20)
    y_pred = predicted_labels(proba, positive=positive)
    return {
        "confusion": lambda path: plots.plot_confusion_matrix(y, y_pred, labels, path=path),
        "roc": lambda path: plots.plot_roc(y, proba, labels, positive=positive, intervals=intervals,
                                           threshold=0.4 if positive is not None else None, path=path),
        "pr": lambda path: plots.plot_precision_recall(y, proba, labels, positive=positive, intervals=intervals,
                                                       path=path),
        "reliability": lambda path: plots.plot_reliability(y, proba, uncalibrated=apply_temperature(logits, 1.0),
                                                           path=path),
        "histogram": lambda path: plots.plot_score_histograms(y, proba, labels, positive=positive, threshold=0.3
                                                              if positive is not None else None, path=path),
    }


@pytest.mark.parametrize("case", CASES)
def test_every_plot_writes_a_png(tmp_path, case):
    labels, positive = CASES[case]
    y, logits = sample(len(labels))
    for name, draw in figures(labels, positive, y, logits).items():
        path = tmp_path / case / f"{name}.png"
        figure = draw(path)
        assert isinstance(figure, Figure)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000, name
        titles = [ax.get_title() for ax in figure.axes] + [figure.get_suptitle()]
        assert any(f"n = {y.size}" in t for t in titles), name


def test_plots_without_a_path_write_nothing(tmp_path):
    y, logits = sample(2)
    figure = plots.plot_roc(y, apply_temperature(logits, 1.0), ["a", "b"], positive=1)
    assert isinstance(figure, Figure) and not list(tmp_path.iterdir())
