"""The review station (serve.py --review): the page where a radiologist checks the model's reading.

Reviewers and their sessions, cases (uploads kept for review, and predictions made elsewhere such as the DICOM
receiver's) judged by the refer rule (deploy.refer), verdicts that are never overwritten, the worklist,
the monitoring panel, and export-reviews (the verdicts as a new training set). It plugs into the server as a
serving.app.Extension and keeps its tables in the audit database.

May import: core, data, models, evaluation, training, deploy, serving.
"""
