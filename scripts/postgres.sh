#!/usr/bin/env bash
# A throwaway PostgreSQL server for the tests (Debian's postgresql package), in a temporary
# directory, reachable only on a Unix socket there.
#
#   eval "$(scripts/postgres.sh start)"   # prints: export LMFORGE_TEST_DATABASE_URL=... PG_DIR=...
#   scripts/postgres.sh stop "$PG_DIR"
#
# The server binaries come from /usr/lib/postgresql/<version>/bin; when they are missing and we
# are root with apt-get, the package is installed first. When PostgreSQL cannot be had, `start`
# prints nothing (and says why on stderr): the PostgreSQL variants of tests/jobs then skip.
# initdb refuses to run as root, so as root the cluster belongs to the `postgres` user.
set -euo pipefail

find_bin() {
  ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1
}

as_owner() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}

start() {
  local bin
  bin="$(find_bin)"
  if [ -z "$bin" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "postgres.sh: installing Debian's postgresql package" >&2
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } \
      >/dev/null 2>&1 || true
    bin="$(find_bin)"
  fi
  if [ -z "$bin" ]; then
    echo "postgres.sh: no PostgreSQL here; its tests will skip" >&2
    return 0
  fi
  local dir port=55432
  dir="$(mktemp -d /tmp/lmforge-pg.XXXXXX)"
  chmod 755 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres "$dir"
  as_owner "'$bin/initdb' -D '$dir/data' -U postgres -A trust --no-sync" >"$dir/initdb.log" 2>&1
  as_owner "'$bin/pg_ctl' -D '$dir/data' -l '$dir/server.log' -w -t 60 \
    -o \"-k '$dir' -p $port -c listen_addresses='' -c fsync=off\" start" >/dev/null
  as_owner "'$bin/createdb' -h '$dir' -p $port -U postgres lmforge_test"
  echo "export PG_DIR='$dir'"
  echo "export LMFORGE_TEST_DATABASE_URL='postgresql+psycopg://postgres@/lmforge_test?host=$dir&port=$port'"
}

stop() {
  local dir="${1:?usage: postgres.sh stop DIR}" bin
  bin="$(find_bin)"
  as_owner "'$bin/pg_ctl' -D '$dir/data' -m fast -w stop" >/dev/null 2>&1 || true
  rm -rf "$dir"
}

case "${1:-}" in
  start) start ;;
  stop) stop "${2:-}" ;;
  *) echo "usage: $0 start | stop DIR" >&2; exit 2 ;;
esac
