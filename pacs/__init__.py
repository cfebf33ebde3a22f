"""PACS integration: a DICOM Storage SCP that receives MR and secondary-capture images, the classification of
every frame, the results as DICOM (a Comprehensive SR and a burned-in secondary capture in the same study),
a persistent spool and a C-STORE sender that returns them to the PACS.

The node itself (`pacs.node.start_node`, or `pacs.receiver.start_receiver` with its own `on_instance`) takes
what it needs from a server (audit record, worklist, refer rule) as callables; `pacs.extension` is the one
module that wires it into serve.py (`--dicom-port`): the served model, the audit database, the review station.

May import: core, data, series, models, evaluation, deploy, serving, review (serving and review: pacs.extension
only).
"""
