#!/bin/sh
# Runs once, when the Postgres container initialises its data directory: the roles and
# databases of sql/bootstrap.sql, with the passwords from the environment.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
  -v rest_password="$KAFKIFY_REST_PASSWORD" -v grpc_password="$KAFKIFY_GRPC_PASSWORD" \
  -v worker_password="$KAFKIFY_WORKER_PASSWORD" -v relay_password="$KAFKIFY_RELAY_PASSWORD" \
  -v registry_password="$KAFKIFY_REGISTRY_PASSWORD" -f /docker-entrypoint-initdb.d/bootstrap.sql
