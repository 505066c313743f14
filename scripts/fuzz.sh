#!/usr/bin/env bash
# Runs one fuzz target (fuzz/fuzz_targets/) for a while, then minimises its corpus in the repo.
#   scripts/fuzz.sh <target> [seconds, default 300] [extra libFuzzer flags]
#   targets: send, send_batch, kafka_record, policy, template, campaign_file
# On the pinned stable toolchain: RUSTC_BOOTSTRAP=1 makes it accept the -Z flags cargo-fuzz
# passes. The fuzzer starts from fuzz/seeds/<target>/ (hand-written inputs and past findings,
# never pruned) and fuzz/corpus/<target>/ (what earlier runs found), and adds new inputs to the
# latter, which `cargo fuzz cmin` then shrinks to the inputs that each reach a new edge. A crash
# or hang is written to fuzz/artifacts/<target>/ (not in git) and replayed with
# `cargo fuzz run --sanitizer none <target> <file>`. Seeds and corpus are replayed on every
# `scripts/test.sh` by the test `fuzz_corpus_replays_without_a_finding`.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

target=${1:?usage: scripts/fuzz.sh <target> [seconds] [libFuzzer flags]}
seconds=${2:-300}
shift $(($# < 2 ? $# : 2))

export RUSTC_BOOTSTRAP=1
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/herald/target-fuzz}"
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked

# No sanitizer: herald forbids unsafe code, so AddressSanitizer would find little, and it slows
# every run down.
cargo fuzz build --sanitizer none "$target"
mkdir -p "corpus/$target"
# -timeout: an input taking longer than 10 s is reported as a hang.
cargo fuzz run --sanitizer none "$target" "corpus/$target" "seeds/$target" -- \
  -max_total_time="$seconds" -timeout=10 -dict=herald.dict -print_final_stats=1 "$@"
# Edges only (no hit counts): a corpus of a few hundred files instead of thousands.
cargo fuzz cmin --sanitizer none "$target" "corpus/$target" -- -use_counters=0
