"""Archive scoring (score_archive.py): a registered model over every image and DICOM frame of an archive, on Ray
Data. The file list is a Ray dataset; decoding (and the sha256 of each file) runs in parallel Ray tasks; the model
runs in a pool of actors, each building its ONNX Runtime session once from the registered artifact and its
contract; Ray's Parquet writer writes the table. A rerun skips what the output already holds, a bad file is a row
with its error, and a run is one record of the audit database (`archive_runs`).

Ray is optional (requirements-scale.txt): only `archive/engine.py` imports it.

May import: core, data, models, evaluation, training, deploy, serving, review, pacs.
"""
