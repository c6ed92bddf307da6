"""The monitoring metrics against scikit-learn's own, on random data; PSI and thresholds."""

import math

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import brier_score_loss, roc_auc_score
from sklearn.metrics import log_loss as sklearn_log_loss

from ml_platform import monitoring


def random_day(seed: int, flights: int = 1000):
    rng = np.random.default_rng(seed)
    probabilities = rng.beta(1.5, 5.0, flights)
    outcomes = (rng.random(flights) < probabilities).astype(int)
    return probabilities, outcomes


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_sklearns(seed):
    p, y = random_day(seed)
    assert monitoring.roc_auc(p, y) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert monitoring.log_loss(p, y) == pytest.approx(sklearn_log_loss(y, p), abs=1e-12)
    assert monitoring.brier_score(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)


def test_roc_auc_counts_ties_half_as_sklearn_does():
    p, y = random_day(3)
    coarse = np.round(p, 1)  # a handful of distinct scores: many ties across classes
    assert len(np.unique(coarse)) < 10
    assert monitoring.roc_auc(coarse, y) == pytest.approx(roc_auc_score(y, coarse), abs=1e-12)


def test_calibration_error_is_the_mean_gap_of_sklearns_quantile_bins():
    # 10,000 distinct scores: sklearn's quantile bins and our equal-count bins are the same
    # 10 groups of 1,000, so the ECE is the plain mean of sklearn's per-bin gaps.
    p, y = random_day(4, flights=10_000)
    observed, predicted = calibration_curve(y, p, n_bins=10, strategy="quantile")
    assert len(observed) == 10
    expected = float(np.mean(np.abs(observed - predicted)))
    assert monitoring.calibration_error(p, y) == pytest.approx(expected, abs=1e-12)


def test_calibration_error_sees_miscalibration():
    p, y = random_day(5, flights=10_000)
    calibrated = monitoring.calibration_error(p, y)
    doubled = monitoring.calibration_error(np.clip(2 * p, 0, 1), y)
    assert calibrated < 0.02 < 0.15 < doubled


def test_psi_is_zero_for_the_reference_itself_and_large_for_a_shifted_one():
    reference, _ = random_day(6, flights=10_000)
    deciles = np.quantile(reference, np.arange(1, 10) / 10)
    assert monitoring.psi(reference, deciles) == pytest.approx(0.0, abs=1e-12)
    # Another day from the same distribution: stable.
    same, _ = random_day(7, flights=1000)
    assert monitoring.psi(same, deciles) < 0.05
    assert monitoring.psi(np.clip(2 * same, 0, 1), deciles) > 0.5


def test_psi_floors_empty_bins():
    deciles = np.arange(1, 10) / 10
    everything_low = np.full(100, 0.05)  # all in the first bin, nine bins empty
    expected = (1 - 0.1) * math.log(1 / 0.1) + 9 * (1e-4 - 0.1) * math.log(1e-4 / 0.1)
    assert monitoring.psi(everything_low, deciles) == pytest.approx(expected)
    with pytest.raises(ValueError, match="9 deciles"):
        monitoring.psi(everything_low, deciles[:5])


def test_day_performance():
    p, y = random_day(8)
    day = monitoring.day_performance(p, y)
    assert set(day) == {
        "roc_auc", "log_loss", "brier_score", "predicted_delay_rate", "actual_delay_rate",
        "calibration_error", "flights",
    }  # fmt: skip
    assert day["flights"] == 1000
    assert day["predicted_delay_rate"] == pytest.approx(p.mean())
    assert day["actual_delay_rate"] == pytest.approx(y.mean())
    assert day["roc_auc"] == pytest.approx(roc_auc_score(y, p))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="both delayed and on-time"):
        monitoring.roc_auc([0.2, 0.3], [1, 1])
    with pytest.raises(ValueError, match="missing"):
        monitoring.brier_score([0.2, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="0 or 1"):
        monitoring.log_loss([0.2, 0.3], [0, 2])
    with pytest.raises(ValueError, match="probabilities"):
        monitoring.day_performance([0.2, 0.3], [0])


def test_drift_thresholds_follow_the_champions_validation():
    thresholds = monitoring.drift_thresholds({"oot_roc_auc": 0.78, "oot_calibration_error": 0.04})
    assert thresholds == pytest.approx(
        {"min_roc_auc": 0.73, "max_calibration_error": 0.08, "max_psi": 0.2}
    )
    # A champion calibrated better than the noise of one day: the floor holds.
    floor = monitoring.drift_thresholds({"oot_roc_auc": 0.78, "oot_calibration_error": 0.01})
    assert floor["max_calibration_error"] == 0.05
    with pytest.raises(ValueError, match="oot_calibration_error"):
        monitoring.drift_thresholds({"oot_roc_auc": 0.78})
