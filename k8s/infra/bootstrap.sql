-- Cluster-level set-up, run by a superuser with psql before any migration:
--   psql -v ON_ERROR_STOP=1 -v rest_password=… -v grpc_password=… -v worker_password=… \
--        -v relay_password=… -v registry_password=… -f sql/bootstrap.sql
-- Safe to run again: it creates what is missing and re-asserts attributes and passwords.
--
-- One role per owner (DESIGN.md): each service owns its database and its tables; only the relay
-- has REPLICATION, and the migrations grant it SELECT on the outbox tables and nothing else.

SELECT format('CREATE ROLE %I LOGIN', r)
FROM unnest(ARRAY['kafkify_rest', 'kafkify_grpc', 'kafkify_worker', 'kafkify_relay',
                  'kafkify_registry']) AS r
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = r)
\gexec

ALTER ROLE kafkify_rest     LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'rest_password';
ALTER ROLE kafkify_grpc     LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'grpc_password';
ALTER ROLE kafkify_worker   LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'worker_password';
ALTER ROLE kafkify_registry LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION PASSWORD :'registry_password';
ALTER ROLE kafkify_relay    LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE REPLICATION   PASSWORD :'relay_password';

SELECT format('CREATE DATABASE %I OWNER %I', db, owner)
FROM (VALUES ('rest', 'kafkify_rest'), ('grpc', 'kafkify_grpc'), ('worker', 'kafkify_worker'),
             ('registry', 'kafkify_registry')) AS d(db, owner)
WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = db)
\gexec

-- Nobody but the owner (and, for the outbox databases, the relay) may even connect.
REVOKE ALL ON DATABASE rest, grpc, worker, registry FROM PUBLIC;
GRANT CONNECT ON DATABASE rest TO kafkify_rest, kafkify_relay;
GRANT CONNECT ON DATABASE grpc TO kafkify_grpc, kafkify_relay;
GRANT CONNECT ON DATABASE worker TO kafkify_worker, kafkify_relay;
GRANT CONNECT ON DATABASE registry TO kafkify_registry;
