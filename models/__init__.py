"""Models: the zoo table (models/zoo.py) and its builders. Kept import-free so that torch-free
callers (config validation, ONNX inference, monitoring) can read models/names.py cheaply."""
