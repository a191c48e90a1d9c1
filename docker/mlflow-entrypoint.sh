#!/bin/sh
# Migrate the backend store's schema as its own step, then serve.
#   MLFLOW_BACKEND_STORE_URI        postgresql+psycopg2://user:password@host:port/db (required)
#   MLFLOW_ARTIFACTS_DESTINATION    s3://bucket where the server puts artifacts (required)
#   MLFLOW_SERVER_ALLOWED_HOSTS     Host headers the server answers (required behind a name)
#   MLFLOW_S3_ENDPOINT_URL          S3-compatible endpoint; empty means AWS
#   MLFLOW_WORKERS                  server worker processes (default 2)
set -eu

: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI to the PostgreSQL URL}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION to s3://<bucket>}"
: "${MLFLOW_SERVER_ALLOWED_HOSTS:?set MLFLOW_SERVER_ALLOWED_HOSTS to the host names clients use}"

# An empty endpoint would be taken as a URL by boto3: unset means AWS's own.
if [ -z "${MLFLOW_S3_ENDPOINT_URL:-}" ]; then
    unset MLFLOW_S3_ENDPOINT_URL
fi

mlflow db upgrade "$MLFLOW_BACKEND_STORE_URI"

# The backend URI stays in the environment (mlflow reads it there), out of the process list.
exec mlflow server \
    --host 0.0.0.0 \
    --port 5000 \
    --workers "${MLFLOW_WORKERS:-2}" \
    --serve-artifacts \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS"
