"""Start uvicorn on the app: the checks a server makes before it opens a port, then one or N worker processes."""
from __future__ import annotations

import os
import shutil

from sqlalchemy.engine import make_url

from core.fileio import process_temp_dir
from deploy.registry import connect, resolve_version
from serving.app import ExtensionBuilder
from serving.audit import make_engine, migrate
from serving.guard import check_bind, read_token
from serving.options import ServeOptions

METRICS_PREFIX = "brain-mri-metrics-"  # the workers' Prometheus samples, one folder per server


def preflight(options: ServeOptions, build: ExtensionBuilder) -> None:
    """Fail before the port opens, with one line: an exposed bind without a token, an unreadable token, an
    extension's own check (a DICOM port in use), a model or alias the registry does not have, an audit database
    that cannot be opened or migrated."""
    cfg = options.cfg
    check_bind(cfg.serving.host, cfg.serving.token_file)
    read_token(cfg.serving.token_file)
    extensions = build(options)
    for ext in extensions:
        if ext.preflight is not None:
            ext.preflight()
    spec = options.spec
    resolve_version(connect(cfg.monitoring.mlflow), spec.name, spec.alias, spec.version)
    engine = make_engine(cfg.serving.database_url, cfg.serving.audit_fsync)
    try:  # once here, so N workers do not race to create the tables
        migrate(engine, {k: v for ext in extensions for k, v in ext.migrations.items()})
    finally:
        engine.dispose()


def run_server(options: ServeOptions, build: ExtensionBuilder, factory: str) -> None:
    """`factory`: the import string of the app factory each worker process calls (uvicorn starts workers by
    name), e.g. "serve:worker_app", which builds its extensions with `build`."""
    import uvicorn

    s = options.cfg.serving
    preflight(options, build)
    options.to_env()
    metrics_dir = None
    if s.workers > 1:  # the workers' Prometheus samples meet in one folder
        metrics_dir = str(process_temp_dir(METRICS_PREFIX))
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    where = f"@{options.spec.alias}" if options.spec.alias else f"v{options.spec.version}"
    print(f"🧠 Serving {options.model} {where} on http://{s.host}:{s.port} (API schema: /openapi.json; "
          f"{s.workers} worker(s); token: {'required' if s.token_file else 'none, loopback only'})", flush=True)
    print(f"🗄️  Audit log: {make_url(s.database_url).render_as_string(hide_password=True)}", flush=True)
    try:
        uvicorn.run(factory, factory=True, host=s.host, port=s.port, workers=s.workers,
                    http="serving.http:HeaderTimeoutProtocol", ws="none", lifespan="on", server_header=False,
                    timeout_keep_alive=5, timeout_graceful_shutdown=30, log_level="info",
                    # uvicorn believes X-Forwarded-For from 127.0.0.1 by default: any local client could forge
                    # the audit trail's client address
                    proxy_headers=bool(s.trusted_proxies), forwarded_allow_ips=",".join(s.trusted_proxies) or None)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
