"""Evaluation: test errors, calibration and depth ensembles, and the plots of runs and schedules."""
