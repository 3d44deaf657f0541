# shellcheck shell=bash disable=SC2034 # the settings here are used by the service files
# Shared helpers for scripts/stack: paths, ports, process control, Maven and apt.
# Sourced by scripts/stack; every service file (scripts/lib/stack/<service>.sh) relies on these.

# --- locations ---------------------------------------------------------------------------------
# Downloads live outside the checkout so fresh clones (CI) reuse them; runtime state lives apart
# from the cache so `rm -rf` of either is safe.
CACHE_DIR=${EVENTPIPE_CACHE_DIR:-$HOME/.cache/eventpipe}
STACK_DIR=${EVENTPIPE_STACK_DIR:-$HOME/.local/share/eventpipe/stack}
LOG_DIR=$STACK_DIR/logs
RUN_DIR=$STACK_DIR/run
M2_REPO=$CACHE_DIR/m2

# --- ports (defaults chosen to avoid the services' standard ports) -----------------------------
KAFKA_PORT=${EVENTPIPE_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${EVENTPIPE_KAFKA_CONTROLLER_PORT:-19093}
ES_PORT=${EVENTPIPE_ES_PORT:-19200}
ES_TRANSPORT_PORT=${EVENTPIPE_ES_TRANSPORT_PORT:-19300}
REGISTRY_PORT=${EVENTPIPE_REGISTRY_PORT:-18081}
REGISTRY_MANAGEMENT_PORT=${EVENTPIPE_REGISTRY_MANAGEMENT_PORT:-19001}
PG_PORT=${EVENTPIPE_PG_PORT:-15432}
PROMETHEUS_PORT=${EVENTPIPE_PROMETHEUS_PORT:-19090}
REDIS_PORT=${EVENTPIPE_REDIS_PORT:-16379}

# Seconds `up` waits for one service to become healthy, and `down` waits before SIGKILL.
START_TIMEOUT=${EVENTPIPE_STACK_TIMEOUT:-180}
STOP_TIMEOUT=${EVENTPIPE_STACK_STOP_TIMEOUT:-30}

# Elasticsearch and PostgreSQL refuse to run as root, so root runs them as this system user.
SERVICE_USER=${EVENTPIPE_SERVICE_USER:-eventpipe}

# The dependency plugin is pinned so Maven's default does not decide the behaviour. Single
# artifacts are copied with 2.8 because 3.x reads the artifact's POM first, and Apicurio
# 3.0.9's parent POM is not served (2.8 copies the file without it).
MVN_DEPENDENCY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:3.8.1
MVN_COPY_PLUGIN=org.apache.maven.plugins:maven-dependency-plugin:2.8

# --- output ------------------------------------------------------------------------------------
say() { printf 'stack: %s\n' "$*"; }
warn() { printf 'stack: %s\n' "$*" >&2; }
die() {
  printf 'stack: error: %s\n' "$*" >&2
  exit 1
}

# Prints the last lines of a log to stderr, indented, so a failure explains itself in CI output.
show_log_tail() {
  local log=$1 lines=${2:-40}
  [[ -f $log ]] || return 0
  printf 'stack: --- last %s lines of %s ---\n' "$lines" "$log" >&2
  tail -n "$lines" "$log" | sed 's/^/    /' >&2
  printf 'stack: --- end of %s ---\n' "$log" >&2
}

now_ms() { date +%s%3N; }
# Formats a duration in milliseconds as seconds with one decimal.
fmt_ms() { printf '%d.%ds' $(($1 / 1000)) $((($1 % 1000) / 100)); }

# --- privileges --------------------------------------------------------------------------------
is_root() { [[ $(id -u) -eq 0 ]]; }

# Runs a command as root: directly when we are root, else through sudo if there is one.
as_root() {
  if is_root; then
    "$@"
  elif command -v sudo >/dev/null; then
    sudo "$@"
  else
    die "needs root to run: $* (no sudo available)"
  fi
}

ensure_service_user() {
  is_root || return 0
  id -u "$SERVICE_USER" >/dev/null 2>&1 && return 0
  say "creating system user $SERVICE_USER (Elasticsearch and PostgreSQL refuse to run as root)"
  useradd --system --user-group --home-dir /nonexistent --no-create-home \
    --shell /usr/sbin/nologin "$SERVICE_USER"
}

# The command prefix that runs a program as the unprivileged service user when we are root
# (empty otherwise), as the array SERVICE_USER_PREFIX. setpriv execs (no extra parent process),
# so the pid we record is the service's own.
set_service_user_prefix() {
  if is_root; then
    SERVICE_USER_PREFIX=(setpriv --reuid="$SERVICE_USER" --regid="$SERVICE_USER" --init-groups --)
  else
    SERVICE_USER_PREFIX=()
  fi
}

as_service_user() {
  set_service_user_prefix
  "${SERVICE_USER_PREFIX[@]}" "$@"
}

# Hands a directory tree to the service user (root only; otherwise we already own it).
own_by_service_user() {
  is_root || return 0
  chown -R "$SERVICE_USER:$SERVICE_USER" "$@"
}

# The service user must be able to reach paths below $HOME, and root's home is usually 0700.
# Grant it search (x) permission only -- not read -- on each blocking ancestor, via an ACL so no
# one else gains anything.
grant_traverse() {
  is_root || return 0
  local path dir ancestors
  for path in "$@"; do
    # Top-down, so that once /root is opened the directories below it test as reachable.
    ancestors=()
    dir=$(readlink -f "$path")
    while [[ $dir != / ]]; do
      dir=$(dirname "$dir")
      ancestors=("$dir" "${ancestors[@]}")
    done
    for dir in "${ancestors[@]}"; do
      as_service_user test -x "$dir" && continue
      command -v setfacl >/dev/null || apt_install acl
      say "granting $SERVICE_USER search-only access to $dir (ACL u:$SERVICE_USER:x)"
      setfacl -m "u:$SERVICE_USER:x" "$dir" || chmod o+x "$dir"
    done
  done
}

# --- Java --------------------------------------------------------------------------------------
java_home() {
  if [[ -n ${JAVA_HOME:-} && -x ${JAVA_HOME}/bin/java ]]; then
    printf '%s\n' "$JAVA_HOME"
  else
    local java
    java=$(command -v java) || die "java not found (Java 17+ is required)"
    dirname "$(dirname "$(readlink -f "$java")")"
  fi
}

# --- packages ----------------------------------------------------------------------------------
# Installs Debian packages without starting their services: there may be no init system, and
# we run our own private instances on our own ports anyway.
apt_install() {
  local log=$LOG_DIR/provision-apt.log created_policy=0 rc=0
  mkdir -p "$LOG_DIR"
  say "installing Debian package(s): $* (log: $log)"
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  local apt=(env DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -y -q)
  if ! as_root "${apt[@]}" install --no-install-recommends "$@" >>"$log" 2>&1; then
    # Most often the package lists are missing or stale: refresh once and retry.
    as_root "${apt[@]}" update >>"$log" 2>&1 || true
    as_root "${apt[@]}" install --no-install-recommends "$@" >>"$log" 2>&1 || rc=$?
  fi
  ((created_policy)) && as_root rm -f /usr/sbin/policy-rc.d
  if ((rc)); then
    show_log_tail "$log"
    die "apt-get install $* failed"
  fi
}

# --- Maven -------------------------------------------------------------------------------------
# Runs Maven against the stack's own local repository inside the cache dir, so the cache is
# self-contained (deleting it gives a genuinely cold start) and ~/.m2 is left alone.
mvn_run() {
  local log=$1
  shift
  command -v mvn >/dev/null || die "mvn not found (Maven is needed to fetch Kafka, Elasticsearch, Apicurio)"
  mkdir -p "$M2_REPO"
  if ! mvn -B -q -Dstyle.color=never -Dmaven.repo.local="$M2_REPO" "$@" >>"$log" 2>&1; then
    show_log_tail "$log"
    die "mvn $* failed"
  fi
}

# Copies one artifact (G:A:V:type[:classifier]) from the Maven repository into a directory.
mvn_fetch() {
  local artifact=$1 dest=$2 log=$3
  mkdir -p "$dest"
  # Run from the (empty) destination so Maven does not pick up a pom.xml from the caller's cwd.
  (cd "$dest" && mvn_run "$log" "$MVN_COPY_PLUGIN:copy" -Dartifact="$artifact" \
    -DoutputDirectory="$dest" -Dmdep.overWriteReleases=true)
}

# --- processes ---------------------------------------------------------------------------------
pid_file() { printf '%s/%s.pid\n' "$RUN_DIR" "$1"; }
log_file() { printf '%s/%s.log\n' "$LOG_DIR" "$1"; }

# Prints the pid of a running service, or fails. A pid file is trusted only if that process
# is alive and its command line still looks like the service (guards against pid reuse).
service_pid() {
  local svc=$1 file pid
  file=$(pid_file "$svc")
  [[ -f $file ]] || return 1
  pid=$(<"$file")
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qE -- "$("${svc}_process_pattern")" || return 1
  printf '%s\n' "$pid"
}

# Starts a command detached from us: its own session (so it survives this script and its
# terminal), stdin from /dev/null, stdout+stderr appended to the service log (so it never holds
# the caller's stdout open, which would make CI wait for it). The pid is also the process group
# id, which `down` uses to stop helpers the service spawned (Elasticsearch's launcher + server).
start_detached() {
  local svc=$1 workdir=$2
  shift 2
  local log
  log=$(log_file "$svc")
  printf '\n===== %s starting at %s: %s\n' "$svc" "$(date -Is)" "$*" >>"$log"
  # Close every inherited descriptor above stderr: fd 9 is the stack lock (else the service would
  # hold it forever) and others may be pipes of whoever called us (a CI runner waiting for EOF).
  (
    cd "$workdir" || exit 1
    close_inherited_fds
    exec setsid "$@"
  ) </dev/null >>"$log" 2>&1 &
  printf '%s\n' "$!" >"$(pid_file "$svc")"
  now_ms >"$RUN_DIR/$svc.started"
}

close_inherited_fds() {
  local entry fd
  for entry in /proc/"$BASHPID"/fd/*; do
    fd=${entry##*/}
    # The glob's own directory handle is already gone by now; ignore it failing to close.
    ((fd > 2)) && { eval "exec $fd>&-" 2>/dev/null || true; }
  done
  return 0
}

# True if something accepts TCP connections on 127.0.0.1:port.
port_open() {
  timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
}

# True while any process of the service's process group is alive.
group_alive() { pgrep -g "$1" >/dev/null 2>&1; }
