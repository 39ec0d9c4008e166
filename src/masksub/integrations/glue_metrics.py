"""The GLUE metrics, by hand with numpy, so ``masksub glue`` does not need ``evaluate``.

scipy is used for the Spearman correlation when installed (it handles ties the same way);
the fallback ranks with averaged ties as well.
"""

from __future__ import annotations

import warnings

import numpy as np


def accuracy(pred: np.ndarray, labels: np.ndarray) -> float:
    return float((np.asarray(pred) == np.asarray(labels)).mean())


def f1_binary(pred: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC / QQP F1)."""
    p, y = np.asarray(pred) == positive, np.asarray(labels) == positive
    tp = float((p & y).sum())
    denom = float(p.sum() + y.sum())
    return 0.0 if denom == 0 else 2 * tp / denom


def matthews(pred: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA); 0 when a row or column of the confusion matrix is empty."""
    p, y = np.asarray(pred).astype(np.int64), np.asarray(labels).astype(np.int64)
    classes = np.union1d(p, y)
    c = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(c, (np.searchsorted(classes, y), np.searchsorted(classes, p)), 1.0)
    t, s = c.sum(1), c.sum(0)  # true counts, predicted counts
    n, correct = c.sum(), np.trace(c)
    num = correct * n - t @ s
    den = np.sqrt(n * n - s @ s) * np.sqrt(n * n - t @ t)
    return 0.0 if den == 0 else float(num / den)


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    xc, yc = x - x.mean(), y - y.mean()
    den = np.sqrt((xc * xc).sum() * (yc * yc).sum())
    return 0.0 if den == 0 else float((xc * yc).sum() / den)


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    try:
        from scipy.stats import spearmanr
    except ImportError:
        return pearson(_ranks(x), _ranks(y))
    with warnings.catch_warnings():  # constant input: scipy warns and returns nan
        warnings.simplefilter("ignore")
        r = spearmanr(x, y).statistic
    return 0.0 if np.isnan(r) else float(r)


METRICS = {"accuracy": accuracy, "f1": f1_binary, "matthews": matthews, "pearson": pearson,
           "spearman": spearman}


def compute(names: tuple[str, ...], predictions: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The named metrics of one task; classification takes class ids, regression the scores."""
    return {n: METRICS[n](predictions, labels) for n in names}
