"""The DICOM node the server starts: receiver, pipeline, result makers (per series, or per instance with
`pacs.results: slice`) and sender, stopped together."""
from __future__ import annotations

from dataclasses import dataclass, replace

from core.config import PacsSection
from deploy.predictors import Predictor
from deploy.refer import ReferRule
from pacs.pipeline import HeatMaps, InstancePipeline, ResultWorker, ServerHooks
from pacs.receiver import Receiver, start_receiver
from pacs.report import ModelInfo
from pacs.sender import Forwarder
from pacs.series_reader import SeriesReader
from pacs.spool import Spool
from series.rule import SeriesRule


@dataclass
class PacsNode:
    receiver: Receiver
    pipeline: InstancePipeline
    results: ResultWorker | None  # per-instance results (pacs.results: slice) for a destination
    forwarder: Forwarder | None
    series: SeriesReader | None = None  # per-series results (the default); without a destination: audit rows only

    @property
    def port(self) -> int:
        return self.receiver.port

    def use_model(self, predictor: Predictor, model: ModelInfo, heatmaps: HeatMaps | None = None,
                  refer: ReferRule | None = None) -> None:
        """After a model update: the next instances are classified (and heat-mapped, and judged by `refer` when
        given) by the new model; results always name the model that classified their instance."""
        self.pipeline.use_model(predictor, model, refer)
        self.pipeline.hooks = replace(self.pipeline.hooks, heatmaps=heatmaps)
        if self.results is not None:
            self.results.img_size = predictor.contract.img_size
            self.results.hooks = replace(self.results.hooks, heatmaps=heatmaps)

    def stop(self) -> None:
        """Stop taking images, then the workers after their current step; what is left stays in the spool."""
        self.receiver.stop()
        for worker in (self.series, self.results, self.forwarder):
            if worker is not None:
                worker.stop(timeout=self.pipeline.settings.timeout_s)


def start_node(settings: PacsSection, predictor: Predictor, model: ModelInfo, hooks: ServerHooks | None = None,
               rule: SeriesRule | None = None) -> PacsNode:
    """Start the Storage SCP on settings.host:port, the series reader (`rule`: the config's series: section,
    default its defaults) or, per instance, the result maker, and with a destination the sender (each first takes
    up what an earlier run left in the spool)."""
    destination = settings.destination_peer
    spool = Spool(settings.spool_dir, destination) if destination is not None else None
    forwarder = Forwarder(spool, settings).start() if spool is not None else None  # first: it takes the lock
    kick = forwarder.kick if forwarder is not None else None
    workers: list = [forwarder]
    try:
        pipeline = InstancePipeline(predictor, model, settings, spool, hooks)
        pipeline.store.recover()
        series = results = None
        if settings.results == "series":
            series = SeriesReader(pipeline, spool, rule or SeriesRule(), on_queued=kick).start()
            workers.append(series)
        elif spool is not None:
            results = ResultWorker(spool, predictor.contract.img_size, hooks, on_queued=kick).start()
            workers.append(results)
        pipeline.on_queued = (series or results).kick if (series or results) else None
        receiver = start_receiver(settings, pipeline, on_release=pipeline.released)
    except BaseException:
        for worker in workers:
            if worker is not None:
                worker.stop()
        raise
    return PacsNode(receiver, pipeline, results, forwarder, series)
