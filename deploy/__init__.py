"""Deployment: export (ONNX, TorchScript, .pt2) with parity checks, int8 ONNX quantization with its gate, the
MLflow registry, the model card, the predictors (ONNX Runtime, PyTorch) that serve a registered model, and the
refer rule every door of the server judges its predictions with (low confidence, or a slice unlike the training
data).

May import: core, data, models, evaluation.
"""
