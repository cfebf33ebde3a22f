"""serve.py --review: the review station as a serving.app.Extension ("review.extension:review_extension").

The factory starts nothing (each worker process builds it); the station attaches to the service at startup.
"""
from __future__ import annotations

from review.pages import PREFIX, Pages
from review.schema import MIGRATIONS
from review.station import ReviewStation
from series.rule import SeriesRule
from serving.app import Extension
from serving.options import ServeOptions

SPEC = "review.extension:review_extension"


def review_extension(options: ServeOptions) -> Extension:
    station = ReviewStation(options.cfg.review, SeriesRule.from_config(options.cfg.series),
                            options.cfg.pacs.keep_patient_identity)
    return Extension("review", router=Pages(station).router, on_startup=station.attach, on_shutdown=station.close,
                     migrations=MIGRATIONS, pixel_store=station.keep_upload,
                     exempt_prefixes=(PREFIX + "/",), exempt_paths=("/", PREFIX),  # the page has its own login
                     admitted_prefixes=(PREFIX + "/upload", PREFIX + "/heatmap/"))  # these run the model
