"""Operations: the GPU dashboard and its advice, and multi-model experiments run as child processes.

May import: every package below it (core, data, models, evaluation, training, deploy).
"""
