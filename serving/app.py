"""The FastAPI app: the API's routes over one Service, and the seam where the review page and the DICOM
receiver plug in (an Extension: a router, startup/shutdown hooks, database migrations, a pixel store).

    create_app(options, [Extension(...)])   # in-process
    app_from_environment(build)             # uvicorn's factory in each worker process (serve.py --workers N)

The extensions are built in code by the caller (serve.py's build_extensions), never looked up by name.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import APIRouter, FastAPI, HTTPException, Query, Request
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline
from starlette.datastructures import UploadFile
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from core.errors import UserError
from data.images import configure_limits
from serving.audit import (
    FILTERS,
    AuditLog,
    AuditUnavailable,
    Migration,
    find_predictions,
    find_series,
    make_engine,
    migrate,
)
from serving.guard import Guard, GuardPolicy, read_token
from serving.metrics import Metrics, MetricsMiddleware
from serving.options import ServeOptions
from serving.service import NotReady, PixelStore, RequestContext, Service
from serving.uploads import Upload, UploadError

log = logging.getLogger("serving")
PREDICTION_PATHS = ("/v1/predict", "/v1/explain")
MULTIPART_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["files"],
    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"},
                             "description": "JPEG/PNG/BMP/TIFF images or DICOM files"}}}}}}}


@dataclass
class Extension:
    """What a component above serving adds to the server (review page, DICOM receiver)."""
    name: str
    router: APIRouter | None = None
    on_startup: Callable[[Service], object] | None = None   # may be async
    on_shutdown: Callable[[Service], object] | None = None
    migrations: dict[str, Sequence[Migration]] = field(default_factory=dict)  # its tables, by component
    pixel_store: PixelStore | None = None                   # keep uploaded files (default: never stored)
    exempt_prefixes: tuple[str, ...] = ()    # paths that authenticate themselves (a login), not by bearer token
    exempt_paths: tuple[str, ...] = ()       # the same, for exact paths (e.g. "/", which as a prefix is every path)
    admitted_prefixes: tuple[str, ...] = ()  # its paths that run the model: they take a place in the queue
    preflight: Callable[[], object] | None = None  # checks before the port opens (raise UserError: one line)


async def _call(hook, service: Service) -> None:
    if hook is not None:
        result = hook(service)
        if inspect.isawaitable(result):
            await result


# The extensions of one server process, built from its options (serve.py's build_extensions).
ExtensionBuilder = Callable[[ServeOptions], Sequence[Extension]]


def app_from_environment(build: ExtensionBuilder | None = None) -> FastAPI:
    """uvicorn factory: each worker process builds its app (and, with `build`, its extensions) from the options
    serve.py put in the environment."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # pydicom logs each failed decoder with a traceback; the upload's 4xx already says why, in one line
    import pydicom.config  # its import sets the level: quieten it afterwards

    pydicom.config.logger.setLevel(logging.CRITICAL)
    options = ServeOptions.from_env()
    return create_app(options, build(options) if build else ())


def create_app(options: ServeOptions, extensions: Sequence[Extension] = ()) -> FastAPI:
    extensions = list(extensions)
    stores = [ext for ext in extensions if ext.pixel_store]
    if len(stores) > 1:  # which one keeps an upload would be a matter of order: refused, not guessed
        raise UserError(f"extensions {', '.join(ext.name for ext in stores)} each keep uploaded files: a server "
                        "has one pixel store")
    configure_limits(options.cfg)  # a worker process never loaded the config: its uploads get the images: limits too
    settings = options.cfg.serving
    engine = make_engine(settings.database_url, settings.audit_fsync)
    migrate(engine, {k: v for ext in extensions for k, v in ext.migrations.items()})
    metrics, audit = Metrics(), AuditLog(engine)
    service = Service(options, audit, metrics, stores[0].pixel_store if stores else None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.start()
        for ext in extensions:
            await _call(ext.on_startup, service)
        yield {"header_timeout_s": settings.header_timeout_s}  # read by serving.http's protocol
        for ext in reversed(extensions):
            await _call(ext.on_shutdown, service)
        await service.stop()
        audit.close()
        engine.dispose()

    # Swagger UI and ReDoc from the installed package, not a CDN (they work in an air-gapped site); off unless
    # serving.api_docs: less script on the review page's origin
    app = FastAPIOffline(title="Brain MRI classifier", version="1", lifespan=lifespan,
                         docs_url="/docs" if settings.api_docs else None,
                         redoc_url="/redoc" if settings.api_docs else None,
                         description="Predictions of a registered brain MRI slice classifier; every prediction is "
                                     "recorded in an audit log. Decision support only, not a diagnosis.")
    app.state.service = service
    add_routes(app, service, read_token(settings.token_file))
    for ext in extensions:
        if ext.router is not None:
            app.include_router(ext.router)
    add_error_handlers(app, service)
    policy = GuardPolicy(read_token(settings.token_file), int(settings.max_upload_mb * 2**20),
                         settings.request_timeout_s,
                         PREDICTION_PATHS + tuple(p for ext in extensions for p in ext.admitted_prefixes),
                         tuple(p for ext in extensions for p in ext.exempt_prefixes),
                         tuple(p for ext in extensions for p in ext.exempt_paths),
                         host_policy(settings), tuple(settings.cors_origins))
    app.add_middleware(Guard, policy=policy, admission=service.admission())
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: refusals are counted too
    return app


def host_policy(settings) -> tuple[str, ...] | None:
    """The Host names served besides loopback ones: checked without a token (a browser on this machine is the
    caller to fear) or when the site names them; None: any Host (a token server reached by its address)."""
    names = tuple(h.lower() for h in settings.allowed_hosts)
    return names if names or not settings.token_file else None


def add_error_handlers(app: FastAPI, service: Service) -> None:
    def count(kind: str) -> None:
        service.metrics.errors.labels(kind).inc()

    @app.exception_handler(UploadError)
    async def upload_error(request: Request, exc: UploadError):
        return JSONResponse({"detail": exc.reason}, exc.status)

    @app.exception_handler(NotReady)
    async def not_ready(request: Request, exc: NotReady):
        count("not_ready")
        return JSONResponse({"detail": f"no model loaded yet ({exc})"}, 503, {"Retry-After": "5"})

    @app.exception_handler(AuditUnavailable)
    async def audit_down(request: Request, exc: AuditUnavailable):
        return JSONResponse({"detail": f"{exc}: nothing was recorded, retry later"}, 503, {"Retry-After": "5"})

    @app.exception_handler(UserError)
    async def user_error(request: Request, exc: UserError):  # e.g. a reload to an alias that no longer exists
        return JSONResponse({"detail": str(exc)}, 409)

    @app.exception_handler(ClientDisconnect)
    async def gone(request: Request, exc: ClientDisconnect):
        count("client_disconnect")
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception):  # a bug: logged here, answered without details
        count("internal")
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error (see the server log)"}, 500)


async def read_uploads(request: Request, max_files: int) -> list[Upload]:
    """The files of a multipart request (any field name), with their bytes; 4xx with a reason otherwise."""
    return (await read_form(request, max_files))[0]


async def read_form(request: Request, max_files: int) -> tuple[list[Upload], dict[str, str]]:
    """(the files, the other fields) of a multipart request, with the API's caps; 4xx with a reason otherwise."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        request.app.state.service.metrics.errors.labels("bad_content_type").inc()
        raise HTTPException(415, "send the files as multipart/form-data, field 'files'")
    form = await request.form(max_files=max_files, max_fields=max_files + 16)
    try:
        files = [v for _, v in form.multi_items() if isinstance(v, UploadFile)]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        if not files:
            raise HTTPException(422, "no file in the request (multipart field 'files')")
        return [Upload(f.filename or "", await f.read()) for f in files], fields
    finally:
        await form.close()


def context(request: Request, source: str = "api") -> RequestContext:
    return RequestContext(request.client.host if request.client else None, source, started=time.perf_counter())


def add_routes(app: FastAPI, service: Service, token: str | None) -> None:
    add_prediction_routes(app, service)
    add_operation_routes(app, service, token)


def add_prediction_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    @app.post("/v1/predict", tags=["predict"], openapi_extra=MULTIPART_BODY)
    async def predict(request: Request):
        """Predict every image in one or more files (one record per frame of a multi-frame DICOM).
        Each record: class, confidence, every probability, input sha256; the answer names the model version."""
        ctx = context(request)
        answer = await service.predict(await read_uploads(request, settings.max_files), ctx)
        return JSONResponse(answer.body, answer.status)

    @app.post("/v1/explain", tags=["predict"], openapi_extra=MULTIPART_BODY,
              responses={200: {"content": {"image/png": {}}, "description": "the slice and its Grad-CAM overlay"}})
    async def explain(request: Request, frame: int = Query(1, ge=1, description="frame of a multi-frame DICOM")):
        """Grad-CAM of the predicted class for one image (PNG); the prediction is in the X-* headers."""
        ctx = context(request)
        uploads = await read_uploads(request, 1)
        png, record = await service.explain(uploads[0], frame, ctx)
        headers = {"X-Model": record["model"], "X-Model-Version": record["version"],
                   "X-Model-Alias": str(record["alias"]), "X-Predicted-Class": record["predicted_class"],
                   "X-Confidence": f"{record['confidence']:.6f}", "X-Record-Id": record["record_id"],
                   "X-Request-Id": record["request_id"]}
        return Response(png, media_type="image/png", headers=headers)

    @app.post("/v1/series", tags=["predict"], openapi_extra=MULTIPART_BODY)
    async def predict_series(request: Request):
        """The files of one DICOM series (several parts, or one zip): the series result (class, probabilities, key
        slices, refer flag and reasons, by the series rule) and every slice's record in reading order."""
        ctx = context(request)
        answer = await service.predict_series(await read_uploads(request, settings.max_files), ctx)
        return JSONResponse(answer.body, answer.status)

    @app.get("/v1/series", tags=["audit"])
    async def recorded_series(study_uid: str = Query(...), series_uid: str | None = None,
                              limit: int = Query(1000, ge=1, le=10000)):
        """The recorded series results of a study (or one series), oldest first: from the API and the DICOM node,
        amended results and series the node left out (with the reason) included."""
        filters = {"study_uid": study_uid, **({"series_uid": series_uid} if series_uid else {})}
        return {"series": await asyncio.to_thread(find_series, service.audit.engine, filters, limit)}

    @app.get("/v1/predictions", tags=["audit"])
    async def recorded(request: Request, limit: int = Query(1000, ge=1, le=10000)):
        """The recorded predictions of a study, series, instance or review case (at least one filter:
        study_uid, series_uid, sop_instance_uid, case_id), oldest first: from the API, the review page and the
        DICOM receiver alike."""
        filters = {k: v for k, v in request.query_params.items() if k in FILTERS and v}
        unknown = sorted(set(request.query_params) - set(FILTERS) - {"limit"})
        if unknown or not filters:
            raise HTTPException(422, f"filter by one or more of {', '.join(FILTERS)}"
                                     + (f" (not {', '.join(unknown)})" if unknown else ""))
        found = await asyncio.to_thread(find_predictions, service.audit.engine, filters, limit)
        return {"predictions": found}

    @app.get("/v1/model", tags=["model"])
    async def model_card():
        """The served version: identity, validation status, contract, model card, evaluation figures with their
        confidence intervals, and the gates."""
        model = service.model
        if model is None:
            raise NotReady(service.failure or "loading")
        return {**model.identity(), "contract": model.contract(), **model.evidence,
                "batching": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms}}


def add_operation_routes(app: FastAPI, service: Service, token: str | None) -> None:
    @app.get("/healthz", tags=["health"])
    async def healthz():
        """Alive: the process answers (no token needed)."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    async def readyz():
        """Ready: a model version is loaded and warmed up (503 while loading)."""
        status = service.status()
        return JSONResponse(status, 200 if status["ready"] else 503, None if status["ready"] else {"Retry-After": "5"})

    @app.post("/admin/reload", tags=["admin"])
    async def reload():
        """Load the version the alias points at now, warm it up and swap it in; answers once it serves."""
        if token is None:
            raise HTTPException(403, "admin endpoints need a token: start the server with --token-file")
        try:
            identity, changed = await service.reload()
        except UserError:
            raise
        except Exception as exc:  # a download or a load failed: the old version goes on serving
            log.error("reload failed", exc_info=exc)
            current = service.model.version if service.model else "none"
            raise HTTPException(503, f"the new version could not be loaded ({type(exc).__name__}); still serving "
                                     f"v{current}") from None
        return {"model": identity["model"], "version": identity["version"], "alias": identity["alias"],
                "changed": changed}

    @app.get("/metrics", tags=["health"])
    async def metrics():
        """Prometheus metrics."""
        body, content_type = service.metrics.exposition()
        return Response(body, media_type=content_type)
