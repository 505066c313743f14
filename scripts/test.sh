#!/usr/bin/env bash
# Runs every check and test of herald — the one command `.ci/run` calls.
#   formatting, clippy's lints (deny warnings; inside the build), unit and integration tests
#   (release profile: the one profile tests and CI build; the shipped binary is `dist`), against
#   real peers: an SMTP server (aiosmtpd), HTTP receivers, pyarrow as an independent Parquet
#   reader, a Kafka-protocol broker (tansu, built and cached under ~/.cache/herald the first
#   time, beside herald's build), a Kafka client that is not herald (confluent-kafka), an S3
#   server (moto), a schema-driven API fuzzer (schemathesis) and the machine's PostgreSQL.
set -euo pipefail
cd "$(dirname "$0")/.."

# One target dir outside the clone, so a fresh clone reuses the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald/target}"
export CARGO_TERM_COLOR=never

if ! python3 -c "import aiosmtpd, pyarrow, confluent_kafka, moto.server, schemathesis" 2>/dev/null; then
  echo "installing the Python test peers (aiosmtpd, pyarrow, confluent-kafka, moto, schemathesis)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd pyarrow confluent-kafka \
    'moto[server]' schemathesis
fi

# PostgreSQL: the machine's server. Each test creates its own database; drop the last run's.
export HERALD_TEST_POSTGRES="${HERALD_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}"
psql "$HERALD_TEST_POSTGRES" -qAt -c \
  "SELECT datname FROM pg_database WHERE datname LIKE 'herald_test_%' OR datname LIKE 'herald_e2e_%'" |
  while read -r db; do psql "$HERALD_TEST_POSTGRES" -q -c "DROP DATABASE IF EXISTS $db" || true; done

# The Kafka-protocol broker, tansu: on a fresh machine it is built from crates.io while herald
# builds (little time is gained: herald's cold build keeps both cores busy almost throughout;
# but a fmt or clippy error stops the run without waiting for it), and started once herald is
# built.
export HERALD_TANSU="${HERALD_TANSU:-$HOME/.cache/herald/tansu/bin/tansu}"
TANSU_INSTALL_LOG="$HOME/.cache/herald/tansu-install.log"
mkdir -p "$(dirname "$TANSU_INSTALL_LOG")"
scripts/broker.sh install >"$TANSU_INSTALL_LOG" 2>&1 &
TANSU_INSTALL_PID=$!
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
# Clippy runs inside the test build, not as a build of its own: cargo hands herald's own crates
# to clippy-driver (rustc with clippy's lints), and CLIPPY_ARGS denies warnings — the two
# variables `cargo clippy -- -D warnings` sets before it runs `cargo check`. A separate
# `cargo clippy` would check every dependency once more (12–20 minutes on a fresh machine).
# Every target clippy's `--all-targets` would see is built here (libraries, binaries, tests;
# there are no benches or examples).
RUSTC_WORKSPACE_WRAPPER="$(rustup which clippy-driver 2>/dev/null || command -v clippy-driver || true)"
if [ -z "$RUSTC_WORKSPACE_WRAPPER" ]; then
  echo "test.sh: clippy-driver not found (rustup component add clippy)" >&2
  exit 1
fi
export RUSTC_WORKSPACE_WRAPPER
export CLIPPY_ARGS="-D__CLIPPY_HACKERY__warnings__CLIPPY_HACKERY__"
# CLIPPY_ARGS is clippy's own convention, not a documented interface: should a later clippy
# read it differently, its lints would come out as warnings, so any warning fails the run too.
BUILD_LOG="$CARGO_TARGET_DIR/test-build.log"
mkdir -p "$CARGO_TARGET_DIR" # a fresh machine has none yet, and tee would fail
cargo nextest run --release --workspace --no-run 2>&1 | tee "$BUILD_LOG"
if grep -q '^warning' "$BUILD_LOG"; then
  echo "test.sh: the build printed warnings (above; $BUILD_LOG); clippy's lints must stay clean" >&2
  exit 1
fi
if ! wait "$TANSU_INSTALL_PID"; then
  cat "$TANSU_INSTALL_LOG" >&2
  echo "test.sh: installing tansu failed (log: $TANSU_INSTALL_LOG)" >&2
  exit 1
fi

# One shared broker for the bus conformance tests; the end-to-end tests start their own from the
# same binary (they restart it, and herald's topic names are fixed).
export HERALD_BROKER_PORT="${HERALD_BROKER_PORT:-19092}"
export HERALD_BROKER_DIR="${HERALD_BROKER_DIR:-$HOME/.cache/herald/broker}"
scripts/broker.sh stop >/dev/null
scripts/broker.sh start
export HERALD_TEST_KAFKA="127.0.0.1:$HERALD_BROKER_PORT"

# The S3 server for the warehouse-on-object-store tests.
S3_PORT="${HERALD_S3_PORT:-19000}"
python3 -m moto.server -H 127.0.0.1 -p "$S3_PORT" >/dev/null 2>&1 &
S3_PID=$!
trap 'kill $S3_PID 2>/dev/null || true; scripts/broker.sh stop >/dev/null || true' EXIT
export HERALD_TEST_S3="http://127.0.0.1:$S3_PORT"
export AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test AWS_REGION=us-east-1 AWS_ALLOW_HTTP=true
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$S3_PORT") 2>/dev/null && break; sleep 0.1; done

cargo nextest run --release --workspace --no-fail-fast "$@"
