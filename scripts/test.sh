#!/usr/bin/env bash
# Runs every check and test of herald — the one command `.ci/run` calls.
#   formatting, clippy (deny warnings), unit and integration tests (release profile: the one
#   profile this project builds, shared with the benchmarks), against real peers: an SMTP server
#   (aiosmtpd), HTTP receivers, and pyarrow as an independent Parquet reader.
set -euo pipefail
cd "$(dirname "$0")/.."

# One target dir outside the clone, so a fresh clone reuses the build.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald/target}"
export CARGO_TERM_COLOR=never

if ! python3 -c "import aiosmtpd, pyarrow" 2>/dev/null; then
  echo "installing the Python test peers (aiosmtpd, pyarrow)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd pyarrow
fi
if ! command -v cargo-nextest >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi

cargo fmt --all -- --check
cargo clippy --release --workspace --all-targets -- -D warnings
cargo nextest run --release --workspace --no-fail-fast "$@"
