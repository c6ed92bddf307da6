"""How well the champion does once a day's outcomes are known: metrics, calibration, drift.

Pure functions over arrays of delay probabilities and 0/1 outcomes (cancelled flights
already left out). numpy is imported inside the functions: the code location reaches this
module, and importing it must stay cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Probabilities are clipped this far from 0 and 1 in the log loss, so a confident miss
# costs a large, finite amount (about 34.5) rather than infinity.
LOG_LOSS_EPSILON = 1e-15
# Expected calibration error: 10 bins of (nearly) equal counts, by predicted probability.
CALIBRATION_BINS = 10
# A PSI bin the day left empty counts as this share, so its log term stays finite: an
# empty decile (expected 10%) then adds (0.1 - 1e-4) * ln(0.1 / 1e-4) ~ 0.69 on its own,
# far above the warning level, as an empty decile should.
PSI_FLOOR = 1e-4

# What a model version's metrics must hold for a day to be compared with it: its
# out-of-time validation (the weeks before the cutoff, held out of training).
VALIDATION_METRICS = (
    "oot_roc_auc",
    "oot_log_loss",
    "oot_brier_score",
    "oot_delay_rate",
    "oot_mean_probability",
    "oot_calibration_error",
)
DECILE_METRICS = tuple(f"oot_score_q{i}" for i in range(1, 10))
# The validation window's worst single days (optional: models trained before they existed).
DAY_METRICS = ("oot_day_min_roc_auc", "oot_day_max_calibration_error", "oot_day_max_psi")

# How far a day may fall from the champion's validation before a check warns (see
# drift_thresholds for why each rule is what it is).
AUC_DROP = 0.05
CALIBRATION_FACTOR = 2.0
CALIBRATION_FLOOR = 0.05
PSI_LIMIT = 0.2


def _arrays(probabilities: Sequence[float], outcomes: Sequence[float]):
    import numpy as np

    p = np.asarray(probabilities, dtype="float64")
    y = np.asarray(outcomes, dtype="float64")
    if p.ndim != 1 or p.shape != y.shape:
        raise ValueError(f"{p.shape} probabilities for {y.shape} outcomes")
    if len(p) == 0:
        raise ValueError("no flights to measure")
    if np.isnan(p).any() or np.isnan(y).any():
        raise ValueError("missing probabilities or outcomes (leave cancelled flights out)")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("outcomes must be 0 or 1")
    if ((p < 0) | (p > 1)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return p, y


def roc_auc(probabilities: Sequence[float], outcomes: Sequence[float]) -> float:
    """Area under the ROC curve: the chance a delayed flight scores above an on-time one
    (ties count half), from the rank sum (Mann-Whitney U) with average ranks for ties."""
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    positives = int(y.sum())
    negatives = len(y) - positives
    if positives == 0 or negatives == 0:
        raise ValueError("ROC AUC needs both delayed and on-time flights")
    _, inverse, counts = np.unique(p, return_inverse=True, return_counts=True)
    # The average of the 1-based ranks each group of equal scores occupies.
    average_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(average_rank[inverse][y == 1].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(probabilities: Sequence[float], outcomes: Sequence[float]) -> float:
    """Mean negative log-likelihood of the outcomes (probabilities clipped by 1e-15)."""
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    p = np.clip(p, LOG_LOSS_EPSILON, 1 - LOG_LOSS_EPSILON)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier_score(probabilities: Sequence[float], outcomes: Sequence[float]) -> float:
    """Mean squared difference between probability and outcome."""
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    return float(np.mean((p - y) ** 2))


def calibration_error(
    probabilities: Sequence[float], outcomes: Sequence[float], bins: int = CALIBRATION_BINS
) -> float:
    """Expected calibration error over ``bins`` bins of equal counts: flights sorted by
    probability and cut into ``bins`` groups whose sizes differ by at most one; the mean
    over flights of |mean probability - delay rate| of each flight's group.

    Equal counts, not equal widths: delay probabilities crowd below 0.3, and equal-width
    bins above it would hold a handful of flights each, all noise.
    """
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    order = np.argsort(p, kind="stable")
    total = 0.0
    for group in np.array_split(order, min(bins, len(p))):
        total += len(group) * abs(float(p[group].mean()) - float(y[group].mean()))
    return total / len(p)


def psi(scores: Sequence[float], reference_deciles: Sequence[float]) -> float:
    """Population stability index of a day's scores against the validation scores.

    The validation deciles q1..q9 cut the scores into 10 bins, (-inf, q1], (q1, q2], ...,
    (q9, inf), each holding 10% of the validation scores (scores are continuous). With the
    day's share a_i in bin i (at least PSI_FLOOR, so an empty bin stays finite):
    PSI = sum_i (a_i - 0.1) * ln(a_i / 0.1). 0 means the same distribution; the usual
    reading: below 0.1 stable, 0.1-0.2 a moderate shift, above 0.2 a significant one.
    """
    import numpy as np

    values = np.asarray(scores, dtype="float64")
    deciles = np.asarray(reference_deciles, dtype="float64")
    if deciles.shape != (9,):
        raise ValueError(f"PSI needs the 9 deciles q1..q9 of the reference, got {deciles.shape}")
    if (np.diff(deciles) < 0).any():
        raise ValueError("reference deciles must not decrease")
    if len(values) == 0 or np.isnan(values).any():
        raise ValueError("PSI needs scores, none of them missing")
    # side="left": a score equal to q_k falls in bin k-1, (q_{k-1}, q_k], as the quantiles do.
    counts = np.bincount(np.searchsorted(deciles, values, side="left"), minlength=10)
    actual = np.maximum(counts / len(values), PSI_FLOOR)
    expected = 0.1
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def day_performance(probabilities: Sequence[float], outcomes: Sequence[float]) -> dict[str, float]:
    """The day's metrics over its flights with known outcomes."""
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    return {
        "roc_auc": roc_auc(p, y),
        "log_loss": log_loss(p, y),
        "brier_score": brier_score(p, y),
        "predicted_delay_rate": float(np.mean(p)),
        "actual_delay_rate": float(np.mean(y)),
        "calibration_error": calibration_error(p, y),
        "flights": len(p),
    }


def reference_deciles(metrics: Mapping[str, float]) -> list[float]:
    """The validation deciles q1..q9 from a model version's metrics."""
    missing = [name for name in DECILE_METRICS if name not in metrics]
    if missing:
        raise ValueError(f"the model's metrics lack {', '.join(missing)}")
    return [float(metrics[name]) for name in DECILE_METRICS]


def drift_thresholds(champion_metrics: Mapping[str, float]) -> dict[str, float]:
    """The levels at which a day's figures warn, from the champion's out-of-time validation.

    - ``min_roc_auc = oot_roc_auc - 0.05``: a day of ~900 flights (~200 delayed) measures
      AUC with a standard error of about 0.02 (Hanley-McNeil at AUC 0.75), so a drop of
      0.05 is some 2.5 standard errors: a real loss of ranking, not a noisy day.
    - ``max_calibration_error = max(2 x oot_calibration_error, 0.05)``: twice the model's
      own validation level, because a model is never perfectly calibrated and the check
      asks whether it got worse; never below 0.05, because sampling alone puts a perfectly
      calibrated model's daily ECE at about 0.03 (10 bins of ~90 flights, each rate off by
      about 0.8 x sqrt(0.2 x 0.8 / 90)), above 0.05 on about 1 day in 50 (simulated).
    - ``max_psi = 0.2``: the conventional line between a moderate and a significant shift
      of a score distribution; it needs no outcomes, so it warns about inputs that changed
      even on a day whose outcomes happen to look fine.

    Single days swing with weather and congestion the model does not see: a day's error
    mostly measures that day's bias, while the rules above compare it with three pooled
    weeks. So where the champion recorded its validation window's days one by one
    (``oot_day_*``), a day warns only when it is also worse than every day of that window:
    the model already lived through those days and was judged good.
    """
    needed = ("oot_roc_auc", "oot_calibration_error")
    missing = [name for name in needed if name not in champion_metrics]
    if missing:
        raise ValueError(f"the champion's metrics lack {', '.join(missing)}")
    worst = {
        name: float(champion_metrics[name]) for name in DAY_METRICS if name in champion_metrics
    }
    return {
        "min_roc_auc": min(
            float(champion_metrics["oot_roc_auc"]) - AUC_DROP,
            worst.get("oot_day_min_roc_auc", 1.0),
        ),
        "max_calibration_error": max(
            CALIBRATION_FACTOR * float(champion_metrics["oot_calibration_error"]),
            CALIBRATION_FLOOR,
            worst.get("oot_day_max_calibration_error", 0.0),
        ),
        "max_psi": max(PSI_LIMIT, worst.get("oot_day_max_psi", 0.0)),
    }


def window_days(
    probabilities: Sequence[float], outcomes: Sequence[float], days: Sequence[object]
) -> dict[str, float]:
    """The validation window day by day: its worst day's AUC, calibration error and PSI
    against the window's own deciles (``drift_thresholds`` reads them)."""
    import numpy as np

    p, y = _arrays(probabilities, outcomes)
    day = np.asarray(days)
    deciles = np.quantile(p, np.linspace(0.1, 0.9, 9))
    figures = []
    for value in np.unique(day):
        mask = day == value
        if mask.sum() < 2 or len(np.unique(y[mask])) < 2:
            continue  # a day without both outcomes has no AUC
        figures.append(
            (roc_auc(p[mask], y[mask]), calibration_error(p[mask], y[mask]), psi(p[mask], deciles))
        )
    if not figures:
        return {}
    aucs, errors, shifts = zip(*figures, strict=True)
    return {
        "oot_day_min_roc_auc": float(min(aucs)),
        "oot_day_max_calibration_error": float(max(errors)),
        "oot_day_max_psi": float(max(shifts)),
    }
