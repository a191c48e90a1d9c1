#!/bin/bash
# Runs once, when the PostgreSQL container initialises an empty data folder: a role and a
# database each for Airflow and MLflow, passwords from the environment (never from a file here).
set -euo pipefail

: "${AIRFLOW_DB_PASSWORD:?set AIRFLOW_DB_PASSWORD}"
: "${MLFLOW_DB_PASSWORD:?set MLFLOW_DB_PASSWORD}"
AIRFLOW_DB_USER="${AIRFLOW_DB_USER:-airflow}"
AIRFLOW_DB_NAME="${AIRFLOW_DB_NAME:-airflow}"
MLFLOW_DB_USER="${MLFLOW_DB_USER:-mlflow}"
MLFLOW_DB_NAME="${MLFLOW_DB_NAME:-mlflow}"

# psql fills :"name" (an identifier) and :'name' (a literal) itself, quoted, so no value is
# ever spliced into SQL text by the shell.
psql --no-psqlrc -v ON_ERROR_STOP=1 \
    --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
    -v airflow_user="$AIRFLOW_DB_USER" -v airflow_db="$AIRFLOW_DB_NAME" \
    -v airflow_password="$AIRFLOW_DB_PASSWORD" \
    -v mlflow_user="$MLFLOW_DB_USER" -v mlflow_db="$MLFLOW_DB_NAME" \
    -v mlflow_password="$MLFLOW_DB_PASSWORD" <<'SQL'
CREATE ROLE :"airflow_user" LOGIN PASSWORD :'airflow_password';
CREATE DATABASE :"airflow_db" OWNER :"airflow_user";
CREATE ROLE :"mlflow_user" LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE :"mlflow_db" OWNER :"mlflow_user";
SQL
