"""What a training job's train_and_evaluate logs, in the shape the real component writes
(ml_platform/pipelines/model.py: Evaluation.as_dict and evaluate_out_of_time), with figures
of the size the real data gives: for tests that stand in a training job."""

TRAINING_METRICS = {
    # the test split (random flights of the earlier days)
    "test_rows": 47000.0,
    "train_rows": 188000.0,
    "delay_rate": 0.2131,
    "roc_auc": 0.7782,
    "log_loss": 0.4412,
    "brier_score": 0.1411,
    "baseline_roc_auc": 0.6936,
    "baseline_log_loss": 0.4921,
    "baseline_brier_score": 0.1583,
    # the out-of-time window (the 21 days before the cutoff)
    "oot_rows": 18000.0,
    "oot_delay_rate": 0.1622,
    "oot_mean_probability": 0.2093,
    "oot_calibration_error": 0.0521,
    "oot_roc_auc": 0.6613,
    "oot_log_loss": 0.4433,
    "oot_brier_score": 0.1321,
    "oot_baseline_roc_auc": 0.6011,
    "oot_baseline_log_loss": 0.4712,
    "oot_baseline_brier_score": 0.1389,
    "oot_day_min_roc_auc": 0.5395,
    "oot_day_max_calibration_error": 0.1702,
    "oot_day_max_psi": 1.2293,
    **{f"oot_score_q{i}": round(0.05 + 0.04 * i, 4) for i in range(1, 10)},
}
