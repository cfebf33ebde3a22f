"""PACS integration: a DICOM Storage SCP that receives MR and secondary-capture images, the classification of
every frame, series assembly with selection rules, the results as DICOM in the same study (per series: one
Comprehensive SR, one Key Object Selection of the key slices and one burned-in secondary capture; per instance
with `pacs.results: slice`: an SR and a capture per frame), a persistent spool and a C-STORE sender.

The node itself (`pacs.node.start_node`, or `pacs.receiver.start_receiver` with its own `on_instance`) takes
what it needs from a server (audit record, worklist, refer rule) as callables; `pacs.extension` is the one
module that wires it into serve.py (`--dicom-port`): the served model, the audit database, the worklist.

May import: core, data, series, models, evaluation, deploy, serving (serving: pacs.extension only); never
review (the worklist is reached through the service, so the node runs without the review page).
"""
