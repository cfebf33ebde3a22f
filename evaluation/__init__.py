"""Evaluation: opening a checkpoint with its split, the prediction loop, metrics with bootstrap intervals,
calibration, quality gates, timing, plots, reports and Grad-CAM.

May import: core, data, series, models.
"""
