#!/usr/bin/env bash
# Make sure the local services that `make run` and `make test` need are up:
#   - PostgreSQL, with Waha's roles (waha, waha_app) and database (waha);
#   - Redis (Celery broker and cache).
# Development and tests only: a server this script has to install or create is
# configured for trust authentication on the loopback interface.
#
# Idempotent: services that already answer are used as they are, so a second
# run only checks (well under a second). Safe to run on every `make run` /
# `make test`.
#
# Inputs (environment):
#   WAHA_PG_HOST      (default 127.0.0.1)
#   WAHA_PG_PORT      (default 5432)
#   WAHA_REDIS_PORT   (default 6379; Redis is always looked for on 127.0.0.1)
#   WAHA_SERVICES_WAIT  seconds to wait for a service to come up (default 30)
#   WAHA_BENCH_TOOLS  set to 1 (by `make bench`) to also install the HTTP load
#                     generator the benchmarks drive the API with (wrk)
#
# Output: one line per service on stdout saying what was used or started;
# progress of long steps (package installs) and errors go to stderr.
set -euo pipefail

PG_HOST="${WAHA_PG_HOST:-127.0.0.1}"
PG_PORT="${WAHA_PG_PORT:-5432}"
REDIS_HOST="127.0.0.1"
REDIS_PORT="${WAHA_REDIS_PORT:-6379}"
WAIT_SECONDS="${WAHA_SERVICES_WAIT:-30}"
PG_SUPERUSER="postgres"

say() { echo "$*"; }
note() { echo "ensure-services: $*" >&2; }
die() {
  echo "ensure-services: ERROR: $*" >&2
  exit 1
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
  if [[ ${EUID} -eq 0 ]]; then
    "$@"
  elif command -v sudo >/dev/null 2>&1; then
    sudo "$@"
  else
    die "root is needed to run '$*', and this is neither root nor has sudo. Run this script as root once, or start the service yourself."
  fi
}

apt_install() {
  command -v apt-get >/dev/null 2>&1 ||
    die "apt-get not found: install $* yourself (this script only knows Debian-like systems)."
  note "installing $* with apt-get (first run only; takes a minute)"
  # noninteractive: no debconf prompts; -qq and >/dev/null keep the log short,
  # apt-get's errors still reach stderr and set -e stops us.
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq ||
    die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null ||
    die "apt-get install $* failed"
}

is_loopback() {
  case "$1" in
    127.0.0.1 | localhost | ::1) return 0 ;;
    *) return 1 ;;
  esac
}

# wait_until COMMAND...: poll COMMAND every 0.2 s until it succeeds, or fail
# after WAIT_SECONDS.
wait_until() {
  local deadline=$((SECONDS + WAIT_SECONDS))
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

# ---------------------------------------------------------------- PostgreSQL

pg_ready() {
  pg_isready -q -h "${PG_HOST}" -p "${PG_PORT}" -t 2
}

# pg_isready exits 1 while a server is starting up or in recovery: it exists,
# so it should be waited for, not started a second time.
pg_starting() {
  local rc=0
  pg_isready -q -h "${PG_HOST}" -p "${PG_PORT}" -t 2 || rc=$?
  [[ ${rc} -eq 1 ]]
}

pg_server_installed() {
  command -v pg_lsclusters >/dev/null 2>&1 &&
    compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}

# The cluster (as "version name status") that listens on PG_PORT, if any.
pg_cluster_on_port() {
  pg_lsclusters -h 2>/dev/null | awk -v port="${PG_PORT}" '$3 == port { print $1, $2, $4; exit }'
}

# Trust on loopback so that `psql -U postgres -h 127.0.0.1` and the dev URLs
# work without passwords. Only applied to clusters this script installed or
# created: an existing cluster's authentication is its owner's business.
pg_trust_loopback() {
  local ver="$1" name="$2"
  local hba="/etc/postgresql/${ver}/${name}/pg_hba.conf"
  [[ -f ${hba} ]] || die "${hba} not found"
  # as_root: pg_hba.conf is readable by postgres only.
  if ! as_root grep -q '^# waha-dev: trust on loopback' "${hba}"; then
    # Inserted at the top: pg_hba.conf is first-match, and the package's own
    # loopback lines (scram-sha-256) come later.
    as_root sed -i '1i # waha-dev: trust on loopback (development only; added by platform/scripts/ensure-services.sh)\nhost all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "${hba}"
  fi
}

start_local_postgres() {
  local action="started"
  local fresh=0
  if ! pg_server_installed; then
    apt_install postgresql
    action="installed and started"
    fresh=1
  fi

  local cluster ver name status
  cluster="$(pg_cluster_on_port)"
  if [[ -z ${cluster} ]]; then
    # The package's post-install creates "main" on the first free port
    # (normally 5432); a different WAHA_PG_PORT gets a cluster of its own.
    ver="$(find /usr/lib/postgresql -mindepth 1 -maxdepth 1 -printf '%f\n' | sort -V | tail -n 1)"
    name="main"
    if [[ -d /etc/postgresql/${ver}/main ]]; then
      name="waha${PG_PORT}"
    fi
    note "creating PostgreSQL cluster ${ver}/${name} on port ${PG_PORT}"
    as_root pg_createcluster --port "${PG_PORT}" "${ver}" "${name}" >/dev/null ||
      die "pg_createcluster ${ver} ${name} failed"
    fresh=1
    action="created and started"
    cluster="${ver} ${name} down"
  fi
  read -r ver name status <<<"${cluster}"

  if [[ ${fresh} -eq 1 ]]; then
    pg_trust_loopback "${ver}" "${name}"
  fi
  if [[ ${status} == online* ]]; then
    # Running (perhaps just started by the package) but not answering yet, or
    # we just changed pg_hba.conf: reload so the trust lines apply.
    as_root pg_ctlcluster --skip-systemctl-redirect "${ver}" "${name}" reload >/dev/null 2>&1 || true
    [[ ${fresh} -eq 1 ]] || action="waited for"
  else
    # --skip-systemctl-redirect: start it directly, also where systemd is not
    # PID 1 (containers, CI machines).
    as_root pg_ctlcluster --skip-systemctl-redirect "${ver}" "${name}" start ||
      die "could not start PostgreSQL cluster ${ver}/${name}; see /var/log/postgresql/postgresql-${ver}-${name}.log"
  fi
  wait_until pg_ready ||
    die "PostgreSQL cluster ${ver}/${name} did not answer at ${PG_HOST}:${PG_PORT} within ${WAIT_SECONDS}s; see /var/log/postgresql/postgresql-${ver}-${name}.log"
  PG_HOW="${action} local cluster ${ver}/${name}"
}

# PSQL_SUPER: the command that runs psql as the superuser. Over TCP first
# (works under trust, and for a server in a container); then, for a local
# server, as the postgres OS user over the Unix socket (peer authentication,
# which is what a fresh Debian package install allows).
choose_superuser_psql() {
  local tcp=(psql -X -q -w -h "${PG_HOST}" -p "${PG_PORT}" -U "${PG_SUPERUSER}" -d postgres)
  if "${tcp[@]}" -Atc 'SELECT 1' >/dev/null 2>&1; then
    PSQL_SUPER=("${tcp[@]}")
    return 0
  fi
  is_loopback "${PG_HOST}" ||
    die "cannot connect to ${PG_HOST}:${PG_PORT} as ${PG_SUPERUSER} without a password. Create the roles waha and waha_app and the database waha yourself, or allow that connection."
  local sock=(psql -X -q -p "${PG_PORT}" -d postgres)
  if [[ ${EUID} -eq 0 ]] && command -v runuser >/dev/null 2>&1; then
    PSQL_SUPER=(runuser -u postgres -- "${sock[@]}")
  elif [[ ${EUID} -eq 0 ]]; then
    # No runuser (older systems): su hands everything after "--" and the
    # user name to the shell, which runs psql with those arguments.
    # shellcheck disable=SC2016  # $0 and $@ are for that shell, not this one
    PSQL_SUPER=(su -s /bin/sh -- postgres -c 'exec "$0" "$@"' "${sock[@]}")
  elif command -v sudo >/dev/null 2>&1; then
    PSQL_SUPER=(sudo -u postgres "${sock[@]}")
  else
    die "cannot connect to PostgreSQL as ${PG_SUPERUSER} (no trust over TCP, and neither root nor sudo to use the postgres OS account)."
  fi
  "${PSQL_SUPER[@]}" -Atc 'SELECT 1' >/dev/null ||
    die "cannot connect to PostgreSQL as ${PG_SUPERUSER}, neither over TCP nor as the postgres OS user."
}

# Roles and database. Idempotent: creates what is missing, and puts back the
# attributes the rest of Waha relies on if someone changed them.
#   waha      owns the schema and runs the migrations; CREATEDB because the
#             test fixture creates per-worker test databases as waha.
#   waha_app  what the API and the worker connect as: no superuser, no
#             CREATEDB, only what the migrations GRANT it.
# waha can grant privileges on its objects to waha_app without any role
# membership: in PostgreSQL an object's owner may GRANT on it to any role, and
# waha owns the database (and so, from PostgreSQL 15 on, its public schema,
# which belongs to pg_database_owner) and everything the migrations create.
# The passwords are set only when a role is created; trust authentication
# ignores them, they exist so that the dev URLs also work against a server
# that asks for passwords.
ensure_roles_and_database() {
  "${PSQL_SUPER[@]}" -v ON_ERROR_STOP=1 >/dev/null <<'SQL'
DO $$
BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha') THEN
    CREATE ROLE waha LOGIN CREATEDB NOSUPERUSER NOCREATEROLE PASSWORD 'waha';
  ELSIF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha'
                AND NOT (rolcanlogin AND rolcreatedb AND NOT rolsuper)) THEN
    ALTER ROLE waha LOGIN CREATEDB NOSUPERUSER;
  END IF;
  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app') THEN
    CREATE ROLE waha_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD 'waha_app';
  ELSIF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'waha_app'
                AND NOT (rolcanlogin AND NOT rolcreatedb AND NOT rolsuper AND NOT rolcreaterole)) THEN
    ALTER ROLE waha_app LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE;
  END IF;
END
$$;
-- CREATE DATABASE cannot run inside a DO block (it refuses transactions),
-- hence \gexec: the statement is produced only when it is needed.
SELECT 'CREATE DATABASE waha OWNER waha'
 WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = 'waha') \gexec
SELECT 'ALTER DATABASE waha OWNER TO waha'
  FROM pg_database d JOIN pg_roles r ON r.oid = d.datdba
 WHERE d.datname = 'waha' AND r.rolname <> 'waha' \gexec
SQL
}

ensure_postgres() {
  PG_HOW=""
  # The client tools come first: without pg_isready a server that already
  # answers (in a container, say) would look absent.
  if ! command -v pg_isready >/dev/null 2>&1 || ! command -v psql >/dev/null 2>&1; then
    apt_install postgresql-client
  fi
  if pg_ready; then
    PG_HOW="using the server already answering"
  elif pg_starting; then
    wait_until pg_ready ||
      die "PostgreSQL at ${PG_HOST}:${PG_PORT} is starting but did not accept connections within ${WAIT_SECONDS}s"
    PG_HOW="waited for the server starting"
  elif ! is_loopback "${PG_HOST}"; then
    die "no PostgreSQL answers at ${PG_HOST}:${PG_PORT}, and a remote host cannot be started from here. Start it, or unset WAHA_PG_HOST to use a local one."
  else
    start_local_postgres
  fi
  choose_superuser_psql
  ensure_roles_and_database ||
    die "could not create the roles waha/waha_app and the database waha at ${PG_HOST}:${PG_PORT}"
  say "postgres: ${PG_HOW} at ${PG_HOST}:${PG_PORT}; roles waha, waha_app and database waha are in place"
}

# ---------------------------------------------------------------------- Redis

redis_ping() {
  if command -v redis-cli >/dev/null 2>&1; then
    [[ "$(redis-cli -h "${REDIS_HOST}" -p "${REDIS_PORT}" ping 2>/dev/null)" == "PONG" ]]
  else
    # No client installed (Redis may run elsewhere, e.g. in a container):
    # speak the protocol through bash's /dev/tcp.
    local reply=""
    {
      exec 3<>"/dev/tcp/${REDIS_HOST}/${REDIS_PORT}" &&
        printf 'PING\r\n' >&3 &&
        IFS= read -r -t 2 reply <&3
    } 2>/dev/null || true
    exec 3>&- 2>/dev/null || true
    [[ ${reply} == "+PONG"* ]]
  fi
}

ensure_redis() {
  if redis_ping; then
    say "redis: using the server already answering at ${REDIS_HOST}:${REDIS_PORT}"
    return 0
  fi
  local action="started"
  if ! command -v redis-server >/dev/null 2>&1; then
    apt_install redis-server
    action="installed and started"
    # The package may have started its own server on 6379 from its init
    # script; if that is the port we want, use it.
    if redis_ping; then
      say "redis: installed the package; its server answers at ${REDIS_HOST}:${REDIS_PORT}"
      return 0
    fi
  fi
  # A throwaway server: loopback only, nothing persisted (tests flush it at
  # will), the log next to other temporary files for when it will not start.
  local logfile="${TMPDIR:-/tmp}/waha-redis-${REDIS_PORT}.log"
  redis-server --daemonize yes --bind "${REDIS_HOST}" --port "${REDIS_PORT}" \
    --save "" --appendonly no --dir "${TMPDIR:-/tmp}" --logfile "${logfile}" ||
    die "redis-server failed to start on ${REDIS_HOST}:${REDIS_PORT}; see ${logfile}"
  wait_until redis_ping ||
    die "Redis did not answer at ${REDIS_HOST}:${REDIS_PORT} within ${WAIT_SECONDS}s; see ${logfile}"
  say "redis: ${action} redis-server at ${REDIS_HOST}:${REDIS_PORT} (log ${logfile})"
}

ensure_bench_tools() {
  if command -v wrk >/dev/null 2>&1; then
    return 0
  fi
  # A load generator in C, so the clients do not take the CPU the API is measured on.
  apt_install wrk
  say "wrk: installed (benchmark load generator)"
}

ensure_postgres
ensure_redis
if [[ "${WAHA_BENCH_TOOLS:-0}" == "1" ]]; then
  ensure_bench_tools
fi
