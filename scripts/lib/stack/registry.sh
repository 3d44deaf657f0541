# shellcheck shell=bash
# Schema registry: Apicurio Registry (Quarkus app) from Maven Central, serving the
# Confluent-compatible API at /apis/ccompat/v7, in-memory (H2) storage.
#
# Why 3.0.9 and not 3.3.x: 3.3.x is compiled for Java 21 (class file 65) and fails at start on
# the machine's Java 17 with UnsupportedClassVersionError. The registry serves 3.0.9, 3.3.2 and
# 3.3.3 of the 3.x app, so 3.0.9 is the newest that runs on Java 17. With Java 21 as JAVA_HOME,
# EVENTPIPE_REGISTRY_VERSION=3.3.3 should work too (its archive has quarkus-run.jar at the root).

REGISTRY_VERSION=${EVENTPIPE_REGISTRY_VERSION:-3.0.9}
REGISTRY_ARTIFACT=io.apicurio:apicurio-registry-app:$REGISTRY_VERSION:tar.gz:all
REGISTRY_HOME=$CACHE_DIR/apicurio-registry-$REGISTRY_VERSION
REGISTRY_DIR=$STACK_DIR/registry

registry_port() { printf '%s\n' "$REGISTRY_PORT"; }
registry_process_pattern() { printf '%s\n' "apicurio-registry"; }

registry_provision() {
  [[ -f $REGISTRY_HOME/.complete ]] && return 0
  local log=$LOG_DIR/provision-registry.log tmp=$CACHE_DIR/tmp/registry
  say "registry: fetching Apicurio Registry $REGISTRY_VERSION with Maven (log: $log)"
  rm -rf "$tmp" "$REGISTRY_HOME"
  mvn_fetch "$REGISTRY_ARTIFACT" "$tmp" "$log"
  mkdir -p "$REGISTRY_HOME"
  tar -xzf "$tmp/apicurio-registry-app-$REGISTRY_VERSION-all.tar.gz" -C "$REGISTRY_HOME"
  rm -rf "$tmp"
  rmdir "$CACHE_DIR/tmp" 2>/dev/null || true
  touch "$REGISTRY_HOME/.complete"
}

# 3.0.x ships a "*-runner.jar" + lib/; 3.3.x the quarkus-run.jar fast-jar layout.
registry_jar() {
  local jar
  for jar in "$REGISTRY_HOME/quarkus-run.jar" "$REGISTRY_HOME"/*-runner.jar; do
    [[ -f $jar ]] && {
      printf '%s\n' "$jar"
      return 0
    }
  done
  die "registry: no runnable jar in $REGISTRY_HOME"
}

registry_start() {
  mkdir -p "$REGISTRY_DIR"
  local jar heap
  jar=$(registry_jar)
  read -ra heap <<<"${EVENTPIPE_REGISTRY_HEAP:--Xms128m -Xmx512m}"
  # Deletion is off by default in Apicurio 3; tests clean up subjects, so allow it. The
  # management interface (health, metrics) is moved off Quarkus' default 9000.
  start_detached registry "$REGISTRY_DIR" "$(java_home)/bin/java" "${heap[@]}" \
    -Djava.awt.headless=true \
    -Dquarkus.http.host=127.0.0.1 -Dquarkus.http.port="$REGISTRY_PORT" \
    -Dquarkus.management.host=127.0.0.1 -Dquarkus.management.port="$REGISTRY_MANAGEMENT_PORT" \
    -Dapicurio.rest.deletion.group.enabled=true \
    -Dapicurio.rest.deletion.artifact.enabled=true \
    -Dapicurio.rest.deletion.artifact-version.enabled=true \
    -jar "$jar"
}

registry_ready() {
  curl -fsS -o /dev/null --max-time 5 "http://127.0.0.1:$REGISTRY_PORT/apis/ccompat/v7/subjects" 2>/dev/null
}

registry_stop_signal() { printf 'TERM\n'; }
