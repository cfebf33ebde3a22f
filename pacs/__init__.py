"""PACS integration: a DICOM Storage SCP that receives MR and secondary-capture images, the classification of
every frame, the results as DICOM (a Comprehensive SR and a burned-in secondary capture in the same study),
a persistent spool and a C-STORE sender that returns them to the PACS.

The HTTP server plugs this in through `pacs.node.start_node` (or `pacs.receiver.start_receiver` with its own
`on_instance`); what it needs from the server (audit record, worklist, refer rule) comes in as callables.

May import: core, data, models, evaluation, deploy.
"""
