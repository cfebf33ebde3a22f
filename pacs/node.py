"""The DICOM node the server starts: receiver, pipeline, result maker and sender, stopped together."""
from __future__ import annotations

from dataclasses import dataclass, replace

from core.config import PacsSection
from deploy.predictors import Predictor
from deploy.refer import ReferRule
from pacs.pipeline import HeatMaps, InstancePipeline, ResultWorker, ServerHooks
from pacs.receiver import Receiver, start_receiver
from pacs.report import ModelInfo
from pacs.sender import Forwarder
from pacs.spool import Spool


@dataclass
class PacsNode:
    receiver: Receiver
    pipeline: InstancePipeline
    results: ResultWorker | None  # None without a destination: predictions only, no results
    forwarder: Forwarder | None

    @property
    def port(self) -> int:
        return self.receiver.port

    def use_model(self, predictor: Predictor, model: ModelInfo, heatmaps: HeatMaps | None = None,
                  refer: ReferRule | None = None) -> None:
        """After a model update: the next instances are classified (and heat-mapped, and judged by `refer` when
        given) by the new model; results always name the model that classified their instance."""
        self.pipeline.use_model(predictor, model, refer)
        if self.results is not None:
            self.results.img_size = predictor.contract.img_size
            self.results.hooks = replace(self.results.hooks, heatmaps=heatmaps)

    def stop(self) -> None:
        """Stop taking images, then the workers after their current step; what is left stays in the spool."""
        self.receiver.stop()
        for worker in (self.results, self.forwarder):
            if worker is not None:
                worker.stop(timeout=self.pipeline.settings.timeout_s)


def start_node(settings: PacsSection, predictor: Predictor, model: ModelInfo,
               hooks: ServerHooks | None = None) -> PacsNode:
    """Start the Storage SCP on settings.host:port and, with a destination, the result maker and the sender
    (each first takes up what an earlier run left in the spool)."""
    destination = settings.destination_peer
    if destination is None:
        pipeline = InstancePipeline(predictor, model, settings, None, hooks)
        return PacsNode(start_receiver(settings, pipeline), pipeline, None, None)
    spool = Spool(settings.spool_dir, destination)
    forwarder = Forwarder(spool, settings).start()  # first: it takes the spool's lock
    results = ResultWorker(spool, predictor.contract.img_size, hooks, on_queued=forwarder.kick).start()
    pipeline = InstancePipeline(predictor, model, settings, spool, hooks, on_queued=results.kick)
    try:
        receiver = start_receiver(settings, pipeline)
    except BaseException:
        results.stop()
        forwarder.stop()
        raise
    return PacsNode(receiver, pipeline, results, forwarder)
