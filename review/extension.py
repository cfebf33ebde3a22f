"""serve.py --review: the review station as a serving.app.Extension.

Building it starts nothing (each worker process builds its own); the station attaches to the service at startup.
"""
from __future__ import annotations

from review.pages import Pages
from review.schema import MIGRATIONS
from review.station import ReviewStation
from review.urls import PREFIX
from serving.app import Extension


def review_extension(station: ReviewStation) -> Extension:
    return Extension("review", router=Pages(station).router, on_startup=station.attach, on_shutdown=station.close,
                     migrations=MIGRATIONS, pixel_store=station.keep_upload,
                     exempt_prefixes=(PREFIX + "/",), exempt_paths=("/", PREFIX),  # the page has its own login
                     admitted_prefixes=(PREFIX + "/upload", PREFIX + "/heatmap/"))  # these run the model
