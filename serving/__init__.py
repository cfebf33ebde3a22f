"""Serving: the registered model behind an HTTP API (FastAPI + uvicorn). The model slot (load, warm up, swap
on a new version), dynamic micro-batching into ONNX Runtime, upload decoding with its caps, bearer-token
access, Prometheus metrics, and the audit database every prediction is written to before it is answered.
The review page and the DICOM receiver plug into the same app and database (serving.app.Extension).

May import: core, data, series, models, evaluation, training, deploy.
"""
