#!/usr/bin/env bash
# PostgreSQL for kedit's servers, on 127.0.0.1 only: one cluster in DIR with the databases `prefect` and `mlflow`.
#
#   scripts/postgres.sh start DIR [PORT]   # initdb on first use, start, create the databases; prints the two URLs
#   scripts/postgres.sh stop DIR
#
# Uses Debian's `postgresql` package (its binaries under /usr/lib/postgresql/<version>/bin, or on PATH).
# Run as root, the cluster belongs to the `postgres` user (initdb refuses root). Local trust authentication:
# the cluster listens on 127.0.0.1 and a socket inside DIR, for one machine's tests and benchmarks; a shared
# deployment sets passwords (or certificates) and its own pg_hba.conf.
set -euo pipefail

cmd=${1:?usage: postgres.sh start|stop DIR [PORT]}
dir=$(realpath -m "${2:?usage: postgres.sh start|stop DIR [PORT]}")
port=${3:-5432}

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$bin" ] || bin=$(dirname "$(command -v initdb || true)")
[ -x "$bin/initdb" ] || { echo "postgres.sh: no PostgreSQL found (apt-get install postgresql)" >&2; exit 2; }

as_owner() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
start)
  mkdir -p "$dir"
  [ "$(id -u)" = 0 ] && chown postgres: "$dir"
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_owner "$bin/initdb" -D "$dir/data" -U kedit --auth=trust --encoding=UTF8 >"$dir/initdb.log"
  fi
  as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-h 127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null
  for db in prefect mlflow; do
    as_owner "$bin/psql" -h 127.0.0.1 -p "$port" -U kedit -d postgres -tAc "SELECT 1 FROM pg_database WHERE datname='$db'" \
      | grep -q 1 || as_owner "$bin/createdb" -h 127.0.0.1 -p "$port" -U kedit "$db"
  done
  echo "prefect postgresql+asyncpg://kedit@127.0.0.1:$port/prefect"
  echo "mlflow postgresql://kedit@127.0.0.1:$port/mlflow"
  ;;
stop)
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
  ;;
*)
  echo "usage: postgres.sh start|stop DIR [PORT]" >&2
  exit 2
  ;;
esac
