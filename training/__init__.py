"""Training: the recipe (optimizer, schedule, loss, precision), one step, the epoch loop, the run's progress
and resume state, early stopping, torchrun support and the console banner.

May import: core, data, models, evaluation.
"""
