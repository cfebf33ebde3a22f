#!/usr/bin/env bash
# Start the MLflow tracking server + Model Registry UI on the store the scripts use:
# sqlite:///mlflow.db (runs and registry) and ./mlartifacts (artifacts), in the repository root.
#
#   ./start_mlflow_server.sh                     # http://127.0.0.1:5000 (this machine only)
#   ./start_mlflow_server.sh --port 5001
#   MLFLOW_PORT=5001 ./start_mlflow_server.sh
#   ./start_mlflow_server.sh --host 0.0.0.0 --expose   # reachable from the network: no authentication!
#
# Flags: --host HOST, --port PORT, --expose (required for a non-loopback host), --backend-store-uri URI,
#        --artifacts-destination DIR, -h/--help. Environment: MLFLOW_HOST, MLFLOW_PORT, MLFLOW_BACKEND_STORE_URI,
#        MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_WORKERS (default 1). Anything after `--` goes to `mlflow server` unchanged.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
WORKERS="${MLFLOW_WORKERS:-1}"  # one user, one local registry: one worker starts fastest
# MLflow's background job runner serves GenAI features this toolkit does not use (7 fewer processes).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
EXPOSE=0
EXTRA=()

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --backend-store-uri) BACKEND="${2:?--backend-store-uri needs a value}"; shift 2 ;;
    --artifacts-destination) ARTIFACTS="${2:?--artifacts-destination needs a value}"; shift 2 ;;
    --expose) EXPOSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( PORT < 1 || PORT > 65535 )); then
  echo "error: --port must be a number from 1 to 65535, got '$PORT'" >&2; exit 2
fi

case "$HOST" in
  127.*|localhost|::1) ;;
  *)
    if [[ "$EXPOSE" -ne 1 ]]; then
      echo "error: --host $HOST makes the server reachable from other machines; add --expose if you mean it" >&2
      exit 2
    fi
    echo "⚠️  WARNING: MLflow on $HOST:$PORT is reachable from the network WITHOUT authentication:" >&2
    echo "   anyone who can reach it can read, change and delete runs and registered models." >&2
    ;;
esac

# The project's virtual environment first, then whatever mlflow is on PATH.
if [[ -x "$ROOT/.venv/bin/mlflow" ]]; then
  MLFLOW="$ROOT/.venv/bin/mlflow"
elif command -v mlflow >/dev/null 2>&1; then
  MLFLOW="$(command -v mlflow)"
else
  echo "error: mlflow not found (pip install -r requirements.txt)" >&2; exit 2
fi

mkdir -p "$ARTIFACTS"
URL_HOST="$HOST"; [[ "$HOST" == "0.0.0.0" ]] && URL_HOST="127.0.0.1"
echo "🚀 MLflow server: backend $BACKEND, artifacts $ARTIFACTS"
echo "🌐 Open the UI at http://$URL_HOST:$PORT (Models tab: the registry)"
echo "   Scripts use it with: --set monitoring.mlflow.tracking_uri=http://$URL_HOST:$PORT   (Ctrl-C stops it)"
# --artifacts-destination: the server proxies artifact uploads/downloads (mlflow-artifacts:/) into this folder;
# experiments the scripts created without a server keep their file: artifact location under ./mlartifacts.
exec "$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" "${EXTRA[@]}"
