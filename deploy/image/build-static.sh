#!/usr/bin/env bash
# Builds kip's binaries fully static (glibc, crt-static) and stripped into target/static/, so they
# run in a FROM-scratch image. Usage: deploy/image/build-static.sh [kip-agent kip-coordinator kip-sleep]
set -euo pipefail
cd "$(dirname "$0")/../.."
bins=("$@")
[ ${#bins[@]} -gt 0 ] || bins=(kip-agent kip-coordinator kip-sleep)
mkdir -p target/static
for bin in "${bins[@]}"; do
  # `cargo rustc` gives these flags to the final binary only: std links statically either way.
  cargo rustc --quiet --locked --release -p "$bin" --bin "$bin" -- -C target-feature=+crt-static -C strip=symbols
  cp "target/release/$bin" "target/static/$bin"
  if ! [[ $(file "target/static/$bin") =~ static(-pie)?\ linked|statically\ linked ]]; then
    echo "build-static: target/static/$bin is not statically linked: $(file "target/static/$bin")" >&2
    exit 1
  fi
  echo "target/static/$bin"
done
