from eagrl.evaluation.metrics import binary_metrics, bootstrap_metrics, calibration, subgroup_metrics

__all__ = ["binary_metrics", "bootstrap_metrics", "calibration", "subgroup_metrics"]
