#!/usr/bin/env bash
# Start the MLflow tracking server + Model Registry UI on the store the scripts use:
# sqlite:///mlflow.db (runs and registry) and ./mlartifacts (artifacts), in the repository root.
#
#   ./start_mlflow_server.sh                     # http://127.0.0.1:5000 (this machine only)
#   ./start_mlflow_server.sh --port 5001
#   MLFLOW_PORT=5001 ./start_mlflow_server.sh
#   ./start_mlflow_server.sh --host 0.0.0.0 --expose --allowed-hosts mlflow.site.local:5000
#                                                # reachable from the network: no authentication!
#
# Flags: --host HOST, --port PORT, --expose (required for a host that is not loopback: 127.0.0.0/8, ::1,
#        localhost), --allowed-hosts LIST (required with --expose: the Host names clients use, comma-separated,
#        e.g. mlflow.site.local:5000,10.1.2.3:5000), --cors-allowed-origins LIST (web pages that may call the API),
#        --backend-store-uri URI, --artifacts-destination DIR, -h/--help.
# Environment: MLFLOW_HOST, MLFLOW_PORT, MLFLOW_BACKEND_STORE_URI, MLFLOW_ARTIFACTS_DESTINATION, MLFLOW_WORKERS
#        (default 1), MLFLOW_SERVER_ALLOWED_HOSTS, MLFLOW_SERVER_CORS_ALLOWED_ORIGINS.
# Anything after `--` goes to `mlflow server` unchanged, except what would switch its host/CORS checks off
# (--disable-security-middleware, --gunicorn-opts, --waitress-opts) or bypass the checks here (--host,
# --allowed-hosts, --cors-allowed-origins): those are refused. MLflow's telemetry is off unless
# MLFLOW_DISABLE_TELEMETRY=false. Runs on bash 3.2 (macOS) and later.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$ROOT"

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
WORKERS="${MLFLOW_WORKERS:-1}"  # one user, one local registry: one worker starts fastest
ALLOWED_HOSTS="${MLFLOW_SERVER_ALLOWED_HOSTS:-}"
CORS_ORIGINS="${MLFLOW_SERVER_CORS_ALLOWED_ORIGINS:-}"
# MLflow's background job runner serves GenAI features this toolkit does not use (7 fewer processes).
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"
EXPOSE=0
EXTRA=()

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
refuse() { echo "error: $*" >&2; exit 2; }

lower() { printf '%s' "$1" | tr '[:upper:]' '[:lower:]'; }

# Loopback only: localhost, ::1, and 127.0.0.0/8 written as four decimal octets (127.evil.com is not).
is_loopback() {
  local host octet
  host="$(lower "$1")"
  case "$host" in
    localhost|::1) return 0 ;;
  esac
  [[ "$host" =~ ^127\.([0-9]{1,3})\.([0-9]{1,3})\.([0-9]{1,3})$ ]] || return 1
  for octet in "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" "${BASH_REMATCH[3]}"; do
    (( 10#$octet <= 255 )) || return 1
  done
  return 0
}

# A list of names: no empty entry and no bare "*" (which would accept anything).
check_list() {
  local what="$1" list="$2" item rest
  rest="$list,"
  while [[ -n "$rest" ]]; do
    item="${rest%%,*}"
    rest="${rest#*,}"
    item="$(printf '%s' "$item" | tr -d '[:space:]')"
    [[ -n "$item" ]] || refuse "$what has an empty entry: '$list'"
    [[ "$item" != "*" ]] || refuse "$what '*' accepts anyone; name the hosts or origins instead"
  done
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --host) HOST="${2:?--host needs a value}"; shift 2 ;;
    --port) PORT="${2:?--port needs a value}"; shift 2 ;;
    --backend-store-uri) BACKEND="${2:?--backend-store-uri needs a value}"; shift 2 ;;
    --artifacts-destination) ARTIFACTS="${2:?--artifacts-destination needs a value}"; shift 2 ;;
    --allowed-hosts) ALLOWED_HOSTS="${2:?--allowed-hosts needs a value}"; shift 2 ;;
    --cors-allowed-origins) CORS_ORIGINS="${2:?--cors-allowed-origins needs a value}"; shift 2 ;;
    --expose) EXPOSE=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) refuse "unknown option $1 (see --help)" ;;
  esac
done

for arg in ${EXTRA[@]+"${EXTRA[@]}"}; do
  case "$arg" in
    --disable-security-middleware|--disable-security-middleware=*)
      refuse "--disable-security-middleware is not passed on: the server's host and CORS checks stay on" ;;
    --gunicorn-opts|--gunicorn-opts=*|--waitress-opts|--waitress-opts=*)
      refuse "$arg runs MLflow without its host and CORS checks; not passed on" ;;
    --host|--host=*|--allowed-hosts|--allowed-hosts=*|--cors-allowed-origins|--cors-allowed-origins=*)
      refuse "${arg%%=*} goes before --, where it is checked" ;;
    -[!-]*h*|-h*)  # -h, -h0.0.0.0, -wh0.0.0.0: click reads each as --host
      refuse "-h (--host) goes before --, where it is checked" ;;
  esac
done
if [[ "$(lower "${MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE:-false}")" != "false" ]]; then
  refuse "MLFLOW_SERVER_DISABLE_SECURITY_MIDDLEWARE is set: the server's host and CORS checks stay on; unset it"
fi

if ! [[ "$PORT" =~ ^[0-9]+$ ]] || (( 10#$PORT < 1 || 10#$PORT > 65535 )); then
  refuse "--port must be a number from 1 to 65535, got '$PORT'"
fi
[[ -z "$ALLOWED_HOSTS" ]] || check_list "--allowed-hosts" "$ALLOWED_HOSTS"
[[ -z "$CORS_ORIGINS" ]] || check_list "--cors-allowed-origins" "$CORS_ORIGINS"

if ! is_loopback "$HOST"; then
  if [[ "$EXPOSE" -ne 1 ]]; then
    refuse "--host $HOST makes the server reachable from other machines; add --expose if you mean it"
  fi
  if [[ -z "$ALLOWED_HOSTS" ]]; then
    refuse "--expose needs --allowed-hosts: the names clients reach this server by (e.g. mlflow.site.local:$PORT)"
  fi
  ALLOWED_HOSTS="$ALLOWED_HOSTS,localhost:$PORT,127.0.0.1:$PORT"  # scripts on this machine keep working
  echo "⚠️  WARNING: MLflow on $HOST:$PORT is reachable from the network WITHOUT authentication:" >&2
  echo "   anyone who can reach it can read, change and delete runs and registered models." >&2
fi

# The mlflow on PATH (an activated environment is the one the user chose), else the project's .venv.
if command -v mlflow >/dev/null 2>&1; then
  MLFLOW="$(command -v mlflow)"
elif [[ -x "$ROOT/.venv/bin/mlflow" ]]; then
  MLFLOW="$ROOT/.venv/bin/mlflow"
else
  refuse "mlflow not found (pip install -r requirements.txt, or activate the environment that has it)"
fi

SECURITY=()
[[ -z "$ALLOWED_HOSTS" ]] || SECURITY+=(--allowed-hosts "$ALLOWED_HOSTS")
[[ -z "$CORS_ORIGINS" ]] || SECURITY+=(--cors-allowed-origins "$CORS_ORIGINS")

mkdir -p "$ARTIFACTS"
URL_HOST="$HOST"; [[ "$HOST" == "0.0.0.0" ]] && URL_HOST="127.0.0.1"
echo "🚀 MLflow server: backend $BACKEND, artifacts $ARTIFACTS"
echo "🌐 Open the UI at http://$URL_HOST:$PORT (Models tab: the registry)"
echo "   Scripts use it with: --set monitoring.mlflow.tracking_uri=http://$URL_HOST:$PORT   (Ctrl-C stops it)"
# --artifacts-destination: the server proxies artifact uploads/downloads (mlflow-artifacts:/) into this folder;
# experiments the scripts created without a server keep their file: artifact location under ./mlartifacts.
exec "$MLFLOW" server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" \
  ${SECURITY[@]+"${SECURITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
