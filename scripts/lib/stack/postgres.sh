# shellcheck shell=bash
# PostgreSQL: Debian's server binaries, but a private cluster in the stack dir on its own port
# and socket dir, so any system cluster (5432) is left untouched.

PG_DIR=$STACK_DIR/postgres
PG_DATA=$PG_DIR/data
PG_SOCKET_DIR=$PG_DIR/run
PG_USER=eventpipe
PG_PASSWORD=eventpipe
PG_DATABASE=eventpipe

postgres_port() { printf '%s\n' "$PG_PORT"; }
postgres_process_pattern() { printf '%s\n' "postgres.* -D $PG_DATA"; }

# Newest installed server version's bin dir (EVENTPIPE_PG_VERSION picks another).
postgres_bin() {
  local dir
  if [[ -n ${EVENTPIPE_PG_VERSION:-} ]]; then
    dir=/usr/lib/postgresql/$EVENTPIPE_PG_VERSION/bin
  else
    dir=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin 2>/dev/null | sort -V | tail -n 1)
  fi
  [[ -n $dir && -x $dir/initdb && -x $dir/postgres ]] || return 1
  printf '%s\n' "$dir"
}

postgres_provision() {
  postgres_bin >/dev/null && return 0
  # Debian's package also creates a 'main' cluster on 5432; apt_install keeps it from starting.
  apt_install postgresql
  postgres_bin >/dev/null || die "postgres: no server binaries under /usr/lib/postgresql after install"
}

postgres_start() {
  ensure_service_user
  local bin
  bin=$(postgres_bin)
  mkdir -p "$PG_DIR" "$PG_SOCKET_DIR"
  own_by_service_user "$PG_DIR"
  grant_traverse "$PG_DIR"
  if [[ ! -f $PG_DATA/PG_VERSION ]]; then
    rm -rf "$PG_DATA"
    # The bootstrap superuser is 'eventpipe' itself; local socket connections are trusted (how
    # this script administers it), TCP connections need the password.
    local pwfile=$PG_DIR/.pwfile
    printf '%s\n' "$PG_PASSWORD" >"$pwfile"
    own_by_service_user "$pwfile"
    as_service_user "$bin/initdb" -D "$PG_DATA" -U "$PG_USER" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --no-locale \
      >>"$(log_file postgres)" 2>&1 ||
      {
        rm -f "$pwfile"
        show_log_tail "$(log_file postgres)"
        die "postgres: initdb failed"
      }
    rm -f "$pwfile"
  fi
  # Durability settings are off: this cluster holds disposable test data, and fsync dominates
  # the run time of database tests on small VMs.
  set_service_user_prefix
  start_detached postgres "$PG_DIR" "${SERVICE_USER_PREFIX[@]}" "$bin/postgres" -D "$PG_DATA" \
    -p "$PG_PORT" -k "$PG_SOCKET_DIR" -c listen_addresses=127.0.0.1 \
    -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
    -c max_connections=200
}

postgres_ready() {
  local bin
  bin=$(postgres_bin) || return 1
  "$bin/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT" -t 2 || return 1
  # First start: create the application database (idempotent, so it also repairs a dropped one).
  local psql=("$bin/psql" -X -q -h "$PG_SOCKET_DIR" -p "$PG_PORT" -U "$PG_USER" -d postgres -v ON_ERROR_STOP=1)
  if [[ -z $("${psql[@]}" -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'" 2>/dev/null) ]]; then
    "${psql[@]}" -c "CREATE DATABASE $PG_DATABASE OWNER $PG_USER" >>"$(log_file postgres)" 2>&1 || return 1
  fi
}

# SIGINT is PostgreSQL's "fast" shutdown; SIGTERM ("smart") would wait for clients to leave.
postgres_stop_signal() { printf 'INT\n'; }
