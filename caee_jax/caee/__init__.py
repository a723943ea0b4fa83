"""Cost-Aware Expert Execution: the calibrated cost model (tables, prediction, calibration) and, next, the policy."""
