#!/bin/sh
# The image's command: serve.py, its settings from the environment (the Dockerfile's ENV lists them), extra flags
# from the container's command (e.g. --review, --dicom-port 11112). The token is a mounted file, never a variable.
set -eu
set -- --model "$BRAIN_MRI_MODEL" --alias "$BRAIN_MRI_ALIAS" --host "$BRAIN_MRI_HOST" --port "$BRAIN_MRI_PORT" \
    --database "$BRAIN_MRI_DATABASE" --set "monitoring.mlflow.tracking_uri=$MLFLOW_TRACKING_URI" \
    --set review.store_dir=/data/review_store --set pacs.spool_dir=/data/pacs_spool "$@"
if [ -n "${BRAIN_MRI_TOKEN_FILE:-}" ]; then
    set -- "$@" --token-file "$BRAIN_MRI_TOKEN_FILE"
fi
exec python /app/serve.py "$@"
