"""The DICOM node the server starts: receiver + pipeline + spool + forwarder, stopped together."""
from __future__ import annotations

from dataclasses import dataclass

from core.config import PacsSection
from deploy.predictors import Predictor
from pacs.pipeline import InstancePipeline, ServerHooks
from pacs.receiver import Receiver, start_receiver
from pacs.report import ModelInfo
from pacs.sender import Forwarder
from pacs.spool import Spool


@dataclass
class PacsNode:
    receiver: Receiver
    pipeline: InstancePipeline
    forwarder: Forwarder | None  # None without a destination: predictions only, no results sent

    @property
    def port(self) -> int:
        return self.receiver.port

    def stop(self) -> None:
        """Stop taking images first, then the sender (what it has not sent stays in the spool)."""
        self.receiver.stop()
        if self.forwarder is not None:
            self.forwarder.stop(timeout=self.pipeline.settings.timeout_s)


def start_node(settings: PacsSection, predictor: Predictor, model: ModelInfo, hooks: ServerHooks | None = None,
               forward: bool = True) -> PacsNode:
    """Start the Storage SCP on settings.host:port and, with a destination, the sender of its spool (with
    `forward=False` results only queue until `node.forwarder.start()`)."""
    destination = settings.destination_peer
    forwarder = Forwarder(Spool(settings.spool_dir, destination), settings) if destination else None
    pipeline = InstancePipeline(predictor, model, settings, forwarder.spool if forwarder else None, hooks,
                                on_spooled=forwarder.kick if forwarder else None)
    if forwarder and forward:
        forwarder.start()  # before the receiver: the spool lock is taken before anything is queued
    try:
        receiver = start_receiver(settings, pipeline)
    except BaseException:
        if forwarder and forward:
            forwarder.stop()
        raise
    return PacsNode(receiver, pipeline, forwarder)
