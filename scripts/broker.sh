#!/usr/bin/env bash
# A local Kafka-protocol broker (tansu) for herald's Kafka tests and for trying the distributed
# deployment on one machine.
#
#   scripts/broker.sh install   install tansu if missing (a cold build from crates.io)
#   scripts/broker.sh start     install tansu if missing, start it, wait until it accepts connections
#   scripts/broker.sh stop      stop the broker this script started
#   scripts/broker.sh restart   stop, then start (with file-backed storage the data survives)
#   scripts/broker.sh status    exit 0 if it is running, 3 if not
#
# Settings (environment):
#   HERALD_BROKER_PORT     port on 127.0.0.1 (default 19092)
#   HERALD_BROKER_STORAGE  sqlite (default: a file in the state dir, kept across restarts),
#                          memory (lost on stop), or any tansu storage URL (postgres://...)
#   HERALD_BROKER_DIR      state dir for the pid, log and sqlite file (default ~/.cache/herald/broker)
#   HERALD_TANSU           tansu binary (default: installed under ~/.cache/herald/tansu)
#
# Tests find the broker through HERALD_TEST_KAFKA=127.0.0.1:$HERALD_BROKER_PORT.
#
# Why sqlite by default: tansu 0.6.0's memory engine answers ListOffsets(latest) with the base
# offset of the newest batch plus one (so high watermarks and lag are wrong once a batch holds
# several records), and a Fetch from an offset inside a batch returns nothing (records after a
# mid-batch commit are never delivered). The sqlite engine has neither problem. To start
# afresh, stop the broker and delete the state dir.
set -euo pipefail

TANSU_VERSION=0.6.0
TANSU_ROOT="$HOME/.cache/herald/tansu"
TANSU="${HERALD_TANSU:-$TANSU_ROOT/bin/tansu}"
PORT="${HERALD_BROKER_PORT:-19092}"
STORAGE="${HERALD_BROKER_STORAGE:-sqlite}"
DIR="${HERALD_BROKER_DIR:-$HOME/.cache/herald/broker}"
PID_FILE="$DIR/tansu.pid"
SETTINGS_FILE="$DIR/tansu.settings"
LOG_FILE="$DIR/tansu.log"
START_TIMEOUT=30

die() {
  echo "broker.sh: $*" >&2
  exit 1
}

storage_url() {
  case "$STORAGE" in
    memory) echo "memory://tansu/" ;;
    # tansu resolves sqlite:// paths against its working directory, the state dir.
    sqlite) echo "sqlite://tansu.db" ;;
    *://*) echo "$STORAGE" ;;
    *) die "HERALD_BROKER_STORAGE must be memory, sqlite or a storage URL, not '$STORAGE'" ;;
  esac
}

# The pid of the running broker this script started, or nothing.
running_pid() {
  [[ -f "$PID_FILE" ]] || return 0
  local pid
  pid="$(cat "$PID_FILE")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && kill -0 "$pid" 2>/dev/null &&
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q tansu; then
    echo "$pid"
  fi
}

port_open() {
  (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null
}

install_tansu() {
  [[ -x "$TANSU" ]] && return 0
  # A binary named elsewhere is the user's to provide; the default one is installed here.
  [[ "$TANSU" != "$TANSU_ROOT/bin/tansu" ]] && die "HERALD_TANSU=$TANSU is not an executable"
  echo "installing tansu $TANSU_VERSION into $TANSU_ROOT (takes a while the first time)"
  CARGO_TARGET_DIR="$HOME/.cache/herald/tansu-build" \
    cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql \
    --root "$TANSU_ROOT"
}

start() {
  local settings pid
  settings="port=$PORT storage=$(storage_url)"
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    if [[ "$(cat "$SETTINGS_FILE" 2>/dev/null)" != "$settings" ]]; then
      die "a broker with other settings is running (pid $pid, $(cat "$SETTINGS_FILE" 2>/dev/null));" \
        "run '$0 restart' to replace it"
    fi
    echo "broker already running on 127.0.0.1:$PORT (pid $pid)"
    return 0
  fi
  port_open && die "127.0.0.1:$PORT is already in use by another process"
  install_tansu
  mkdir -p "$DIR"
  (
    cd "$DIR"
    exec setsid "$TANSU" broker \
      --listener-url "tcp://127.0.0.1:$PORT" \
      --advertised-listener-url "tcp://127.0.0.1:$PORT" \
      --storage-engine "$(storage_url)" \
      </dev/null >>"$LOG_FILE" 2>&1
  ) &
  pid=$!
  echo "$pid" >"$PID_FILE"
  echo "$settings" >"$SETTINGS_FILE"
  local waited=0
  until port_open; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PID_FILE"
      tail -n 20 "$LOG_FILE" >&2 || true
      die "tansu exited during startup (log: $LOG_FILE)"
    fi
    ((waited++ < START_TIMEOUT * 10)) || die "tansu did not open port $PORT in ${START_TIMEOUT}s (log: $LOG_FILE)"
    sleep 0.1
  done
  echo "broker running on 127.0.0.1:$PORT (pid $pid, storage $(storage_url), log $LOG_FILE)"
  echo "export HERALD_TEST_KAFKA=127.0.0.1:$PORT"
}

stop() {
  local pid
  pid="$(running_pid)"
  if [[ -z "$pid" ]]; then
    rm -f "$PID_FILE"
    echo "broker not running"
    return 0
  fi
  kill -TERM "$pid"
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    echo "tansu (pid $pid) ignored SIGTERM for 10s; killing it"
    kill -KILL "$pid"
  fi
  rm -f "$PID_FILE"
  echo "broker stopped (pid $pid)"
}

status() {
  local pid
  pid="$(running_pid)"
  if [[ -n "$pid" ]]; then
    echo "broker running (pid $pid, $(cat "$SETTINGS_FILE" 2>/dev/null), log $LOG_FILE)"
  else
    echo "broker not running"
    exit 3
  fi
}

case "${1:-}" in
  install) install_tansu ;;
  start) start ;;
  stop) stop ;;
  restart)
    stop
    start
    ;;
  status) status ;;
  *)
    echo "usage: $0 install|start|stop|restart|status" >&2
    exit 2
    ;;
esac
