"""serve.py under load: throughput and latency at N concurrent clients, beside two anchors from the same run.

  server       serve.py on loopback (the registered model, ONNX Runtime, micro-batching, audit log), one 512x512
               JPEG per request, N = 1, 4, 16, 64 clients on keep-alive connections (bounded in count and time)
  onnx_limit   (a) ONNX Runtime alone on preprocessed tensors, at its best batch size: the model's limit
  mlflow       (b) `mlflow models serve --env-manager local` on the same registered (ONNX) pyfunc model, fed the
               same images preprocessed by the client, as JSON tensors
  offline      inference_with_mlflow.py's path on one image (OnnxPredictor.predict_path), as bench_inference.py

The anchors are measured before and after the servers and averaged (the machine's load drifts). An anchor that
cannot be measured (`mlflow models serve` does not start) is a row with its reason; the other rows still run.
The clients send pre-built HTTP/1.1 requests on raw sockets and read the answers without parsing JSON, so that
the load generator takes as little of the CPU the server needs as possible. The server's memory (RSS) is read
after the first 1,000 requests and after the last.

    python benchmarks/bench_serving.py
    python benchmarks/bench_serving.py --clients 1,16 --requests 400
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

try:
    from benchmarks import bench_inference, harness
except ImportError:  # run as a file
    import bench_inference
    import harness

import numpy as np
import psutil
from sqlalchemy.engine import make_url

from core.hardware import usable_cpus
from deploy.predictors import OnnxPredictor
from tests.server_process import ServerProcess, free_port


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="serve.py throughput and latency vs ONNX Runtime alone vs mlflow models "
                                            "serve")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--jpeg-size", type=int, default=512)
    p.add_argument("--clients", default="1,4,16,64", help="concurrent clients, comma-separated")
    p.add_argument("--requests", default="200,400,800,800", help="requests per client count (comma-separated)")
    p.add_argument("--seconds", type=float, default=120, help="time bound per client count")
    p.add_argument("--mlflow-clients", default="1,16", help="client counts for anchor (b)")
    p.add_argument("--mlflow-requests", type=int, default=120)
    p.add_argument("--database", default=None, metavar="URL",
                   help="the server's audit database (default: sqlite in the benchmark's folder), e.g. "
                        "postgresql+psycopg://mri_ai@127.0.0.1/audit to measure PostgreSQL's commits")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-wait-ms", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the anchors (default: cores)")
    p.add_argument("--runs", type=int, default=40, help="timed calls per batch size of anchor (a) and offline")
    p.add_argument("--no-mlflow", action="store_true", help="skip anchor (b)")
    p.add_argument("--data-dir", default=str(harness.DEFAULT_DATA_DIR))
    p.add_argument("--smoke", action="store_true", help="tiny sizes: checks that the benchmark runs")
    return p


# ---- the registered model ---------------------------------------------------------------------------------

def registered_store(args, data_dir: Path) -> Path:
    """A temporary MLflow store holding the seeded benchmark model as version 1 (PyTorch + ONNX flavors)."""
    import mlflow

    from core.config import MlflowSection
    from deploy.export import write_contract_json
    from deploy.registry import ONNX_LINK_TAG, connect, log_flavors, register, registered_names

    store = data_dir / f"serving_{bench_inference.artifact_key(args)}"
    if (store / ".complete").is_file():
        return store
    store.mkdir(parents=True, exist_ok=True)
    model, onnx_path, contract = bench_inference.exported_model(args, data_dir / "onnx")
    client = connect(MlflowSection(tracking_uri=tracking_uri(store), artifact_location=str(store / "mlartifacts")))
    exp = mlflow.create_experiment(f"bench-{time.time_ns()}", artifact_location=str(store / "mlartifacts"))
    tags = {"semver": "1.0.0", "forced": "true", "medical_validation": "missing"}
    with mlflow.start_run(experiment_id=exp):
        example = np.random.default_rng(0).standard_normal((2, 3, args.img_size, args.img_size)).astype(np.float32)
        uris = log_flavors(model, onnx_path, example, [write_contract_json(contract, store)])
    names = registered_names(args.model)
    onnx_mv = register(client, uris["onnx"], names["onnx"], tags, "benchmark model (random weights)")
    register(client, uris["pytorch"], names["pytorch"], {**tags, ONNX_LINK_TAG: onnx_mv.version}, "benchmark model")
    (store / ".complete").write_text("1")
    return store


def tracking_uri(store: Path) -> str:
    return f"sqlite:///{store / 'registry.db'}"


# ---- a light HTTP/1.1 client ------------------------------------------------------------------------------

def multipart_request(path: str, jpeg: bytes, name: str) -> bytes:
    body = (b"--bench\r\nContent-Disposition: form-data; name=\"files\"; filename=\"" + name.encode() + b"\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + jpeg + b"\r\n--bench--\r\n")
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def json_request(path: str, payload: bytes) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


async def exchange(reader, writer, request: bytes) -> int:
    """One request on a keep-alive connection; the status code (the body is read, not parsed)."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    lines = head.lower().split(b"\r\n")
    await reader.readexactly(next(int(line.split(b":", 1)[1]) for line in lines if line.startswith(b"content-length:")))
    return status


class Load:
    """N clients sending `requests` round-robin until `total` answers or `seconds` pass."""

    def __init__(self, port: int, requests: list[bytes], on_answer=None):
        self.port, self.requests, self.on_answer = port, requests, on_answer or (lambda: None)

    async def _client(self, todo, deadline, out):
        reader = writer = None
        while (i := next(todo)) < out["total"] and time.monotonic() < deadline:
            try:
                if writer is None:
                    reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                start = time.perf_counter()
                status = await exchange(reader, writer, self.requests[i % len(self.requests)])
                out["latency"].append(time.perf_counter() - start)
                out["status"][status] += 1
                self.on_answer()
            except (OSError, asyncio.IncompleteReadError, ValueError, StopIteration):
                out["status"]["transport"] += 1
                writer = None
        if writer is not None:
            writer.close()

    async def run(self, clients: int, total: int, seconds: float) -> dict:
        out = {"total": total, "latency": [], "status": Counter()}
        todo, deadline = iter(range(10**9)), time.monotonic() + seconds
        start = time.perf_counter()
        await asyncio.gather(*(self._client(todo, deadline, out) for _ in range(clients)))
        wall = time.perf_counter() - start
        ok = out["status"].get(200, 0)
        ms = np.asarray(out["latency"]) * 1000
        return {"clients": clients, "answers": len(ms), "ok": ok, "per_s": ok / wall, "wall_s": wall,
                "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
                "p99_ms": float(np.percentile(ms, 99)), "errors": len(ms) - ok + out["status"]["transport"],
                "status": {str(k): v for k, v in out["status"].items()}}


# ---- the measurements -------------------------------------------------------------------------------------

def onnx_limit(onnx_path: Path, x: np.ndarray, threads: int, runs: int) -> dict:
    """(a): images/s of ONNX Runtime on preprocessed tensors, per batch size; the best is the limit."""
    predictor = OnnxPredictor(onnx_path, threads=threads)
    rates = {}
    for batch in (1, 2, 4, 8, 16, 32):
        xb = np.repeat(x, batch, axis=0)
        predictor.predict_array(xb)
        times = []
        for _ in range(max(3, runs // batch)):
            with harness.Stopwatch() as sw:
                predictor.predict_array(xb)
            times.append(sw.seconds)
        rates[batch] = batch / float(np.median(times))
    best = max(rates, key=rates.get)
    return {"per_batch": rates, "best_batch": best, "per_s": rates[best]}


def offline_latency(onnx_path: Path, image: Path, threads: int, runs: int) -> dict:
    """inference_with_mlflow.py's per-image path (decode, preprocess, ONNX Runtime), as bench_inference."""
    predictor = OnnxPredictor(onnx_path, threads=threads)
    for _ in range(5):
        predictor.predict_path(image)
    times = []
    for _ in range(runs):
        with harness.Stopwatch() as sw:
            predictor.predict_path(image)
        times.append(sw.seconds)
    return harness.latency_stats(times)


def drive_server(args, store: Path, jpegs: list[Path], workdir: Path) -> tuple[list[dict], dict]:
    """serve.py at each client count; (rows, memory) with the server's RSS after the first and the last 1,000."""
    srv = ServerProcess(["--set", f"monitoring.mlflow.tracking_uri={tracking_uri(store)}",
                         "--model", f"brain-cancer-{args.model}", "--version", "1", "--poll-seconds", "0",
                         "--database", args.database or f"sqlite:///{workdir / 'audit.db'}",
                         "--max-batch", args.max_batch, "--max-wait-ms", args.max_wait_ms, "--queue-size", "256"],
                        workdir)
    try:
        srv.wait_ready()
        rss = psutil.Process(srv.proc.pid)
        memory, done = {}, {"n": 0}

        def count():
            done["n"] += 1
            if done["n"] == 1000:
                memory["after_first_1000_mb"] = rss.memory_info().rss / 2**20

        requests = [multipart_request("/v1/predict", p.read_bytes(), p.name) for p in jpegs]
        asyncio.run(Load(srv.port, requests).run(4, 40, 60))  # warm-up, not counted
        rows = []
        for clients, total in zip(parse_ints(args.clients), parse_ints(args.requests)):
            rows.append(asyncio.run(Load(srv.port, requests, count).run(clients, total, args.seconds)))
            print(f"  server, {clients} clients: {rows[-1]['per_s']:.1f}/s, p50 {rows[-1]['p50_ms']:.1f} ms",
                  flush=True)
        memory["after_last_mb"] = rss.memory_info().rss / 2**20
        memory["requests"] = done["n"]
        if "after_first_1000_mb" in memory and done["n"] >= 2000:
            memory["last_vs_first"] = memory["after_last_mb"] / memory["after_first_1000_mb"]
        log = srv.log()
        memory["server_tracebacks"] = log.count("Traceback")
        return rows, memory
    finally:
        srv.stop()


def mlflow_anchor(args, store: Path, x: np.ndarray, workdir: Path) -> list[dict]:
    """Anchor (b)'s rows, or one row with the reason it could not be measured."""
    try:
        return drive_mlflow(args, store, x, workdir)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[0]
        print(f"  mlflow models serve: not measured ({reason})", flush=True)
        return [{"failed": reason, "log_tail": str(exc)[-2000:]}]


def interpreter_env(**extra: str) -> dict:
    """This interpreter's environment for a child: its bin/ first on PATH (mlflow starts uvicorn by name)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return {**os.environ, "PATH": path, **extra}


def drive_mlflow(args, store: Path, x: np.ndarray, workdir: Path) -> list[dict]:
    """(b): `mlflow models serve --env-manager local` on the registered ONNX pyfunc, fed JSON tensors."""
    port = free_port()
    env = interpreter_env(MLFLOW_TRACKING_URI=tracking_uri(store))
    cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/brain-cancer-{args.model}-onnx/1",
           "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)]
    log = (workdir / "mlflow.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_http(port, proc, workdir / "mlflow.log")
        payloads = [json_request("/invocations", json.dumps({"inputs": x[i:i + 1].tolist()}).encode())
                    for i in range(len(x))]
        asyncio.run(Load(port, payloads).run(2, 6, 60))  # warm-up
        rows = []
        for clients in parse_ints(args.mlflow_clients):
            rows.append(asyncio.run(Load(port, payloads).run(clients, args.mlflow_requests, args.seconds)))
            print(f"  mlflow models serve, {clients} clients: {rows[-1]['per_s']:.1f}/s", flush=True)
        return rows
    finally:
        with contextlib.suppress(ProcessLookupError):  # it may have exited on its own
            os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()


def wait_http(port: int, proc, log: Path, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited:\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError("mlflow models serve did not start")


def parse_ints(text: str) -> list[int]:
    return [int(v) for v in str(text).split(",") if v]


def run(args) -> dict:
    """The anchors before and after the servers (the machine's load drifts; their mean is the reference)."""
    data_dir = Path(args.data_dir)
    threads = args.threads or usable_cpus()
    store = registered_store(args, data_dir)
    root = harness.make_jpegs(data_dir / f"serve_{args.jpeg_size}px" / "images", 12, args.jpeg_size, 2)
    jpegs = harness.list_images(root)[0]
    onnx_path = next((store / "mlartifacts").rglob("*.onnx"))
    x = np.concatenate([OnnxPredictor(onnx_path, threads=1).preprocess(p) for p in jpegs[:4]])
    limits, offline = [], []
    with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
        limits.append(onnx_limit(onnx_path, x[:1], threads, args.runs))
        offline.append(offline_latency(onnx_path, jpegs[0], threads, args.runs))
        rows, memory = drive_server(args, store, jpegs, Path(tmp))
        mlflow_rows = [] if args.no_mlflow else mlflow_anchor(args, store, x, Path(tmp))
        limits.append(onnx_limit(onnx_path, x[:1], threads, args.runs))
        offline.append(offline_latency(onnx_path, jpegs[0], threads, args.runs))
    limit = {"per_s": float(np.mean([a["per_s"] for a in limits])), "runs": limits,
             "best_batch": max(limits, key=lambda a: a["per_s"])["best_batch"]}
    off = {"median_ms": float(np.mean([o["median_ms"] for o in offline])),
           "p95_ms": float(np.mean([o["p95_ms"] for o in offline])), "runs": offline}
    return {"server": rows, "onnx_limit": limit, "offline": off, "mlflow": mlflow_rows, "memory": memory,
            "targets": targets(rows, limit, off, mlflow_rows, memory)}


def targets(rows, limit, offline, mlflow_rows, memory) -> dict:
    by = {r["clients"]: r for r in rows}
    ml = {r["clients"]: r for r in mlflow_rows if "failed" not in r}
    out = {"errors": sum(r["errors"] for r in rows)}
    if 16 in by:
        out["16_clients_vs_onnx_limit"] = by[16]["per_s"] / limit["per_s"]
        if 16 in ml:
            out["16_clients_vs_mlflow"] = by[16]["per_s"] / ml[16]["per_s"]
    if 1 in by:
        out["1_client_p50_vs_offline"] = by[1]["p50_ms"] / offline["median_ms"]
    out["memory_last_vs_first"] = memory.get("last_vs_first")
    return out


def main(args) -> int:
    if args.smoke:
        args.img_size, args.jpeg_size, args.clients, args.requests = 32, 64, "1,4", "20,40"
        args.runs, args.mlflow_clients, args.mlflow_requests = 3, "2", 10
    results = run(args)
    settings = {k: getattr(args, k) for k in ("model", "img_size", "jpeg_size", "max_batch", "max_wait_ms")}
    settings["threads"] = args.threads or usable_cpus()
    settings["audit_db"] = make_url(args.database).get_backend_name() if args.database else "sqlite"
    limit = results["onnx_limit"]["per_s"]
    rows = [[f"server, {r['clients']} clients", r["per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"], str(r["errors"]),
             r["per_s"] / limit] for r in results["server"]]
    rows += [[f"mlflow models serve: not measured ({r['failed']})", "", "", "", "", "", ""] if "failed" in r else
             [f"mlflow models serve, {r['clients']} clients", r["per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"],
              str(r["errors"]), r["per_s"] / limit] for r in results["mlflow"]]
    rows.append([f"ONNX Runtime alone, best batch ({results['onnx_limit']['best_batch']})", limit, "", "", "", "", 1.0])
    off = results["offline"]
    rows.append(["offline predict_path, 1 image", 1000 / off["median_ms"], off["median_ms"], off["p95_ms"], "", "",
                 1000 / off["median_ms"] / limit])
    harness.report("bench_serving", settings, ["path", "images/s", "p50 ms", "p95 ms", "p99 ms", "errors", "x limit"],
                   rows, results)
    return 0


if __name__ == "__main__":
    main(get_args_parser().parse_args())
