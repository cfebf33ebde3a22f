"""Models: the zoo table (models/zoo.py), its builders and rebuilding a model from a checkpoint.
Kept import-free so that torch-free callers (config validation, ONNX inference) stay light.

May import: core, data.
"""
