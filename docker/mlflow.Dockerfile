# The MLflow tracking server: PostgreSQL backend store, artifacts proxied to S3.
# Build from the repository root:  docker build -f docker/mlflow.Dockerfile -t tirelib-mlflow .
FROM python:3.11-slim-bookworm

# The same versions as requirements.txt (the test suite checks that they agree).
ARG MLFLOW_VERSION=3.17.2
ARG PSYCOPG2_VERSION=2.9.13
ARG BOTO3_VERSION=1.44.5

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install --no-cache-dir \
        "mlflow==${MLFLOW_VERSION}" \
        "psycopg2-binary==${PSYCOPG2_VERSION}" \
        "boto3==${BOTO3_VERSION}" \
    && useradd --system --uid 10001 --create-home --home-dir /home/mlflow mlflow

COPY --chmod=0755 docker/mlflow-entrypoint.sh /usr/local/bin/mlflow-entrypoint.sh

USER 10001
WORKDIR /home/mlflow
EXPOSE 5000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
ENTRYPOINT ["/usr/local/bin/mlflow-entrypoint.sh"]
