#!/usr/bin/env bash
# Local contad services on 127.0.0.1: PostgreSQL, an MLflow tracking server on it (artifacts served by
# the tracking server) and a Prefect server on it. `make services` runs `infra/services.sh start`.
#
#   infra/services.sh start|stop|status|env
#
# Settings (environment; defaults in brackets):
#   CONTAD_SERVICES_DIR [runs/services]  state: pgdata/, logs, pid files, the generated database password
#   SERVICES ["postgres mlflow prefect"] which ones to start (postgres is needed by the other two)
#   PG_PORT [55432]  MLFLOW_PORT [5000]  PREFECT_PORT [4200]
#   MLFLOW_ARTIFACTS_DESTINATION [$CONTAD_SERVICES_DIR/mlartifacts]  where the tracking server stores
#       artifacts; an S3-compatible store when set to s3://bucket/prefix (then also set
#       MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, and install boto3)
#   VENV_BIN [.venv/bin of this checkout, else the directory of `python3`]  mlflow / prefect executables
# PostgreSQL binaries come from the Debian `postgresql` package (`make system-deps` installs it). As root,
# the database server runs as the `postgres` user (PostgreSQL refuses root); everything listens on
# 127.0.0.1 only and the database needs the password generated into $CONTAD_SERVICES_DIR/pg-password.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
DIR="${CONTAD_SERVICES_DIR:-$repo/runs/services}"
SERVICES="${SERVICES:-postgres mlflow prefect}"
PG_PORT="${PG_PORT:-55432}"
MLFLOW_PORT="${MLFLOW_PORT:-5000}"
PREFECT_PORT="${PREFECT_PORT:-4200}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$DIR/mlartifacts}"
if [[ -z "${VENV_BIN:-}" ]]; then
  if [[ -x "$repo/.venv/bin/mlflow" ]]; then VENV_BIN="$repo/.venv/bin"; else VENV_BIN="$(dirname "$(command -v python3)")"; fi
fi
PG_USER=contad
PGDATA="$DIR/pgdata"

die() { echo "services: $*" >&2; exit 1; }

pg_bin() {  # directory holding initdb/pg_ctl (Debian keeps them out of PATH)
  local found
  found="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
  if [[ -n "$found" && -x "$found/initdb" ]]; then echo "$found"; return; fi
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return; fi
  die "PostgreSQL server binaries not found: run 'make system-deps' as root (apt-get install postgresql)"
}

as_pg() {  # run a PostgreSQL server command as a non-root user
  if [[ "$(id -u)" == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}

password() { cat "$DIR/pg-password"; }
db_uri() { echo "postgresql+psycopg2://$PG_USER:$(password)@127.0.0.1:$PG_PORT/$1"; }

wait_http() {  # wait_http URL LOG PIDFILE
  local i
  for i in $(seq 1 360); do
    if curl -fsS -o /dev/null "$1" 2>/dev/null; then return 0; fi
    if ! kill -0 "$(cat "$3")" 2>/dev/null; then tail -n 40 "$2" >&2; die "$1: server exited (log: $2)"; fi
    sleep 0.5
  done
  tail -n 40 "$2" >&2; die "$1 not up after 180 s (log: $2)"
}

running() { [[ -f "$DIR/$1.pid" ]] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null; }

start_postgres() {
  local bin; bin="$(pg_bin)"
  mkdir -p "$DIR"
  if [[ ! -f "$DIR/pg-password" ]]; then
    (umask 077; head -c 18 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$DIR/pg-password")
  fi
  if [[ "$(id -u)" == 0 ]]; then
    id postgres >/dev/null 2>&1 || die "user 'postgres' missing (it comes with the Debian postgresql package)"
    mkdir -p "$PGDATA"; chown postgres "$PGDATA"; chmod 700 "$PGDATA"
    runuser -u postgres -- test -x "$PGDATA" || die "user postgres cannot reach $PGDATA: choose a CONTAD_SERVICES_DIR whose parents it can traverse"
    install -o postgres -m 600 "$DIR/pg-password" "$PGDATA/../.pg-pwfile"
  else
    mkdir -p "$PGDATA"; chmod 700 "$PGDATA"; install -m 600 "$DIR/pg-password" "$PGDATA/../.pg-pwfile"
  fi
  if [[ ! -f "$PGDATA/PG_VERSION" ]]; then
    as_pg "$bin/initdb" -D "$PGDATA" -U "$PG_USER" --pwfile="$PGDATA/../.pg-pwfile" --auth=scram-sha-256 -E UTF8 --locale=C >"$DIR/initdb.log" 2>&1 \
      || { cat "$DIR/initdb.log" >&2; die "initdb failed"; }
  fi
  rm -f "$PGDATA/../.pg-pwfile"
  if ! as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    touch "$DIR/postgres.log"; [[ "$(id -u)" == 0 ]] && chown postgres "$DIR/postgres.log"
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$DIR/postgres.log" -w -t 120 \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=''" start >/dev/null \
      || { tail -n 30 "$DIR/postgres.log" >&2; die "PostgreSQL did not start (log: $DIR/postgres.log)"; }
  fi
  local db
  for db in mlflow prefect; do
    if ! PGPASSWORD="$(password)" "$bin/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
      PGPASSWORD="$(password)" "$bin/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$db"
    fi
  done
  echo "postgres: 127.0.0.1:$PG_PORT (databases mlflow, prefect; data $PGDATA)"
}

start_mlflow() {
  running mlflow && { echo "mlflow: already running"; return; }
  mkdir -p "$DIR"
  [[ "$ARTIFACTS" == *"://"* ]] || mkdir -p "$ARTIFACTS"
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false MLFLOW_DISABLE_TELEMETRY=true setsid "$VENV_BIN/mlflow" server \
    --backend-store-uri "$(db_uri mlflow)" --serve-artifacts --artifacts-destination "$ARTIFACTS" \
    --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 >"$DIR/mlflow.log" 2>&1 < /dev/null &
  echo $! > "$DIR/mlflow.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" "$DIR/mlflow.log" "$DIR/mlflow.pid"
  echo "mlflow: http://127.0.0.1:$MLFLOW_PORT (backend PostgreSQL, artifacts $ARTIFACTS served through the server)"
}

start_prefect() {
  running prefect && { echo "prefect: already running"; return; }
  mkdir -p "$DIR/prefect_home"
  PREFECT_HOME="$DIR/prefect_home" PREFECT_SERVER_ANALYTICS_ENABLED=false \
    PREFECT_API_DATABASE_CONNECTION_URL="postgresql+asyncpg://$PG_USER:$(password)@127.0.0.1:$PG_PORT/prefect" \
    setsid "$VENV_BIN/prefect" server start --host 127.0.0.1 --port "$PREFECT_PORT" >"$DIR/prefect.log" 2>&1 < /dev/null &
  echo $! > "$DIR/prefect.pid"
  wait_http "http://127.0.0.1:$PREFECT_PORT/api/health" "$DIR/prefect.log" "$DIR/prefect.pid"
  echo "prefect: http://127.0.0.1:$PREFECT_PORT/api (database PostgreSQL)"
}

stop_one() {
  local pidfile="$DIR/$1.pid"
  [[ -f "$pidfile" ]] || return 0
  local pid; pid="$(cat "$pidfile")"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
  echo "$1: stopped"
}

print_env() {
  echo "export MLFLOW_TRACKING_URI=http://127.0.0.1:$MLFLOW_PORT PREFECT_API_URL=http://127.0.0.1:$PREFECT_PORT/api"
  echo "# contad overrides: tracking.uri=http://127.0.0.1:$MLFLOW_PORT"
}

case "${1:-start}" in
  start)
    for s in postgres mlflow prefect; do
      [[ " $SERVICES " == *" $s "* ]] && "start_$s"
    done
    print_env ;;
  stop)
    stop_one prefect; stop_one mlflow
    if [[ -f "$PGDATA/PG_VERSION" ]]; then
      as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null 2>&1 && echo "postgres: stopped" || true
    fi ;;
  status)
    for s in mlflow prefect; do running "$s" && echo "$s: running (pid $(cat "$DIR/$s.pid"))" || echo "$s: stopped"; done
    [[ -f "$PGDATA/PG_VERSION" ]] && as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status | head -n 1 || echo "postgres: no cluster" ;;
  env) print_env ;;
  *) die "usage: $0 start|stop|status|env" ;;
esac
