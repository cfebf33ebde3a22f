"""How a server process is put together. serve.py --workers N: each worker process builds its app from the
options serve.py resolved, handed over in the environment, and must work with them as given: the database URL
with its credentials (redacted only where it is logged or stored) and the images: limits every decoder of the
process keeps. The extensions are wired in code, and two that would keep uploaded files are refused."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
from PIL import Image

from conftest import ROOT

WORKER = """
import json, sys
from serving.app import app_from_environment
from serving.options import ServeOptions
from data.images import ImageReadError, load_gray

app_from_environment()
try:
    load_gray(sys.argv[1], 32)
    decoded = "decoded"
except ImageReadError as exc:
    decoded = str(exc)
print(json.dumps({"database_url": ServeOptions.from_env().cfg.serving.database_url, "decoded": decoded}))
"""


def worker(options, *argv) -> dict:
    """What a worker process sees: `options` from the environment, as uvicorn's factory builds its app."""
    from serving.options import ENV_VAR

    env = {**os.environ, ENV_VAR: json.dumps(asdict(options))}
    done = subprocess.run([sys.executable, "-c", WORKER, *map(str, argv)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_a_worker_gets_the_database_credentials_and_the_image_limits(tmp_path):
    import serve

    image = tmp_path / "large.png"
    Image.new("L", (64, 64), 128).save(image)  # 4096 pixels
    stores = ["--set", f"monitoring.mlflow.tracking_uri=sqlite:///{tmp_path / 'registry.db'}"]
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    args = serve.get_args_parser().parse_args([*stores, "--model", "m", "--workers", "2", "--database", url,
                                               "--set", "images.max_pixels=1000"])
    seen = worker(serve.options_from_args(args), image)
    assert seen["database_url"] == url
    assert "over the limit of 1000" in seen["decoded"]  # the configured bound, not the default 50 Mpx

    secret = "postgresql+psycopg://mri_ai:s3cr%40t@db.hospital.example/audit"  # the docs' form, with a password
    args = serve.get_args_parser().parse_args([*stores, "--model", "m", "--workers", "2", "--database", secret])
    options = serve.options_from_args(args)
    assert options.cfg.serving.database_url == secret  # what the workers connect with
    assert "s3cr" not in json.dumps(options.cfg.to_dict())  # what is logged or stored


def test_a_second_pixel_store_is_refused_not_dropped(tmp_path):
    from core.config import load_config
    from core.errors import UserError
    from serving.app import Extension, create_app
    from serving.options import ServeOptions

    cfg = load_config(sets=[f"serving.database_url=sqlite:///{tmp_path / 'audit.db'}"])
    def keep(decoded, data, ctx):
        return None

    with pytest.raises(UserError, match="review, archive each keep uploaded files: a server has one pixel store"):
        create_app(ServeOptions(cfg.to_values(), "m"), [Extension("review", pixel_store=keep),
                                                        Extension("archive", pixel_store=keep)])


def test_serve_py_wires_the_dicom_node_to_the_worklist_of_its_own_process(tmp_path):
    import serve
    from review.station import ReviewStation

    base = ["--model", "m", "--set", f"review.store_dir={tmp_path / 'store'}"]
    parse = serve.get_args_parser().parse_args
    both = serve.options_from_args(parse([*base, "--review", "--dicom-port", "0"]))
    review, dicom = serve.build_extensions(both)
    station = review.pixel_store.__self__
    assert isinstance(station, ReviewStation) and review.name == "review" and dicom.name == "dicom"
    assert dicom.on_startup.__self__.worklist == station.add_case  # the same process's station
    alone = serve.build_extensions(serve.options_from_args(parse([*base, "--dicom-port", "0"])))
    assert [e.name for e in alone] == ["dicom"] and alone[0].on_startup.__self__.worklist is None


def test_the_temp_folders_of_servers_killed_with_9_are_removed_by_the_next_server(tmp_path, monkeypatch):
    """A server keeps its uploads and model copies (and with --workers N the workers' Prometheus samples) in temp
    folders named for its pid; one that died by kill -9 could not remove them, so the next server does, and
    never a living server's."""
    import tempfile

    from core.fileio import process_temp_dir
    from serving.runner import METRICS_PREFIX
    from serving.service import SERVICE_PREFIX

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    for prefix in (SERVICE_PREFIX, METRICS_PREFIX):
        stale = [tmp_path / f"{prefix}{dead.stdout.strip()}-abc", tmp_path / f"{prefix}x1y2z3"]
        living = tmp_path / f"{prefix}{os.getppid()}-def"
        for folder in (*stale, living):
            (folder / "models").mkdir(parents=True)
            (folder / "models" / "model.onnx").write_bytes(b"\0" * 16)
        made = process_temp_dir(prefix)
        assert [p.exists() for p in stale] == [False, False] and living.is_dir()
        assert made.name.startswith(f"{prefix}{os.getpid()}-") and made.stat().st_mode & 0o077 == 0
