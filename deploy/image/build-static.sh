#!/usr/bin/env bash
# Builds kip's binaries fully static (glibc with crt-static; kip-sleep without any C library) and
# stripped into target/static/, so they
# run in a FROM-scratch image. Usage: deploy/image/build-static.sh [kip-agent kip-coordinator kip-sleep]
set -euo pipefail
cd "$(dirname "$0")/../.."
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kip-agent kip-coordinator kip-sleep)
mkdir -p target/static
for bin in "${bins[@]}"; do
  if [ "$bin" = kip-sleep ]; then
    # No C library at all: its own workspace links it static (sleep/build.rs, sleep/.cargo).
    (cd sleep && cargo build --quiet --locked --release)
    cp target/sleep/release/kip-sleep target/static/kip-sleep
  else
    # `cargo rustc` gives these flags to the final binary only: std links statically either way.
    cargo rustc --quiet --locked --release -p "$bin" --bin "$bin" -- -C target-feature=+crt-static -C strip=symbols
    cp "target/release/$bin" "target/static/$bin"
  fi
  if ! [[ $(file "target/static/$bin") =~ static(-pie)?\ linked|statically\ linked ]]; then
    echo "build-static: target/static/$bin is not statically linked: $(file "target/static/$bin")" >&2
    exit 1
  fi
  echo "target/static/$bin"
done
