"""Deployment: export (ONNX, TorchScript, .pt2) with parity checks, int8 ONNX quantization with its gate, the
MLflow registry, the model card and the predictors (ONNX Runtime, PyTorch) that serve a registered model.

May import: core, data, models, evaluation.
"""
