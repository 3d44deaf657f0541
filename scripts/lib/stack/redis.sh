# shellcheck shell=bash
# Redis: Debian's redis-server, run as our own instance on its own port with its data dir in the
# stack dir; the package's own service (6379) is never started. A cache, so nothing is persisted.

REDIS_DIR=$STACK_DIR/redis
# The cache's memory ceiling and what goes when it is reached (least recently used, any key):
# the gateway keeps only re-creatable copies there, so eviction is always safe.
REDIS_MAXMEMORY=${EVENTPIPE_REDIS_MAXMEMORY:-256mb}

redis_port() { printf '%s\n' "$REDIS_PORT"; }
# redis-server rewrites its process title to "redis-server 127.0.0.1:PORT".
redis_process_pattern() { printf '%s\n' "redis-server.*:$REDIS_PORT"; }

redis_provision() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null && return 0
  apt_install redis-server
}

redis_start() {
  mkdir -p "$REDIS_DIR/data"
  # No config file: every setting on the command line, so what runs is what this file says.
  start_detached redis "$REDIS_DIR" redis-server --bind 127.0.0.1 --port "$REDIS_PORT" \
    --dir "$REDIS_DIR/data" --save "" --appendonly no --daemonize no \
    --maxmemory "$REDIS_MAXMEMORY" --maxmemory-policy allkeys-lru
}

redis_ready() {
  [[ $(redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]]
}

# SIGTERM: Redis closes its clients and exits at once (nothing to save).
redis_stop_signal() { printf 'TERM\n'; }
