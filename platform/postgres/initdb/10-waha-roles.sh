#!/usr/bin/env bash
# Creates Waha's roles and database in the docker-compose PostgreSQL.
#
# The postgres image runs the files of /docker-entrypoint-initdb.d once, when
# the container starts with an empty data volume, as the superuser
# (POSTGRES_USER) over the Unix socket. Changing the passwords later is an
# ALTER ROLE on the running database, not a change here.
#
#   waha      owns the database and the schema; the migrate service connects
#             as it. CREATEDB mirrors the development set-up (the test fixture
#             creates per-worker databases as waha).
#   waha_app  what the API and the worker connect as: no superuser, no
#             CREATEDB; it gets only what the migrations GRANT it (waha owns
#             the objects, so it may grant on them without role membership).
#
# No `set -u`: if this file ever loses its executable bit the entrypoint
# sources it instead of running it, and must not inherit that option.
set -eo pipefail

: "${WAHA_DB_OWNER_PASSWORD:?set WAHA_DB_OWNER_PASSWORD for the postgres service}"
: "${WAHA_DB_APP_PASSWORD:?set WAHA_DB_APP_PASSWORD for the postgres service}"

# The passwords travel as psql variables and are quoted by psql (:'name'), so
# no character in them can change the SQL.
psql -v ON_ERROR_STOP=1 --no-psqlrc \
  --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  -v owner_password="${WAHA_DB_OWNER_PASSWORD}" \
  -v app_password="${WAHA_DB_APP_PASSWORD}" <<'SQL'
CREATE ROLE waha LOGIN CREATEDB NOSUPERUSER NOCREATEROLE PASSWORD :'owner_password';
CREATE ROLE waha_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'app_password';
CREATE DATABASE waha OWNER waha;
SQL
