# shellcheck shell=bash
# Prometheus (and promtool) from Debian's package, run as our own instance with the repo's
# deploy/prometheus.yml; the package's own service (9090) is never started.

PROMETHEUS_DIR=$STACK_DIR/prometheus
PROMETHEUS_CONFIG=$REPO_ROOT/deploy/prometheus.yml

prometheus_port() { printf '%s\n' "$PROMETHEUS_PORT"; }
prometheus_process_pattern() { printf '%s\n' "prometheus.*--storage.tsdb.path=$PROMETHEUS_DIR/data"; }

prometheus_provision() {
  command -v prometheus >/dev/null && command -v promtool >/dev/null && return 0
  apt_install prometheus
}

prometheus_start() {
  mkdir -p "$PROMETHEUS_DIR/data"
  [[ -f $PROMETHEUS_CONFIG ]] || die "prometheus: $PROMETHEUS_CONFIG is missing"
  local config=$PROMETHEUS_CONFIG
  # deploy/prometheus.yml names the default self-scrape address; on another port, scrape a copy
  # that points at the port in use.
  if [[ $PROMETHEUS_PORT != 19090 ]]; then
    config=$PROMETHEUS_DIR/prometheus.yml
    sed "s/127\.0\.0\.1:19090/127.0.0.1:$PROMETHEUS_PORT/g" "$PROMETHEUS_CONFIG" >"$config"
  fi
  promtool check config "$config" >>"$(log_file prometheus)" 2>&1 || {
    show_log_tail "$(log_file prometheus)" 20
    die "prometheus: promtool rejects $config"
  }
  start_detached prometheus "$PROMETHEUS_DIR" prometheus --config.file="$config" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" \
    --storage.tsdb.path="$PROMETHEUS_DIR/data" --storage.tsdb.retention.time=2d \
    --web.enable-lifecycle
}

prometheus_ready() {
  curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 2>/dev/null
}

prometheus_stop_signal() { printf 'TERM\n'; }
