#!/usr/bin/env bash
# Runs every test (as root, on Debian): installs what is missing, then the unit and integration
# tests of the workspace, the end-to-end tests against a real containerd and registries, the
# manifest, Prometheus and shell checks, and a smoke run of the local demo.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tests/install-deps.sh

echo "==> cargo fmt --check; clippy with -D warnings and the workspace lints" >&2
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo build" >&2
cargo build --workspace --locked --all-targets
echo "==> cargo test" >&2
# The real CRI-O (agent/tests/crio_rig.rs) where the rig is beside the clone, as in CI: there a
# test that cannot start it fails instead of saying it skipped.
if [ -x ../shared/rig/crio/bin/crio ]; then
  export KIP_CRIO_RIG=$PWD/../shared/rig/crio KIP_REQUIRE_CRIO_RIG=1
else
  echo "==> no CRI-O rig at ../shared/rig/crio: the real-CRI-O tests say SKIPPED" >&2
fi
cargo test --workspace --locked
# kip-sleep is a workspace of its own (no_std, panic = "abort"); its cargo config puts its
# target directory under target/sleep.
echo "==> kip-sleep (no_std): fmt, clippy, tests" >&2
(cd sleep && cargo fmt --check && cargo clippy --lib --bins --tests --locked -- -D warnings && cargo test --locked)
# The runtime matrix: Debian bookworm's containerd 1.6, trixie's 1.7.x and sid's 2.x (the newer two
# unpacked beside the system package by tests/install-deps.sh), each in its own mount namespace.
for containerd in system trixie sid; do
  echo "==> node e2e on containerd $containerd (real containerd, real registries)" >&2
  KIP_CONTAINERD=$containerd bash tests/e2e/node.sh
done
# The coordinator with three agents, and the uninstall's release, on each containerd of the matrix.
for containerd in system trixie sid; do
  echo "==> coordinator + agents e2e (real processes, three containerds: $containerd)" >&2
  KIP_CONTAINERD=$containerd bash tests/e2e/coordinator.sh
done
echo "==> registry e2e (what the registry sees: tag HEADs, pulls on a moved tag, the pull budget; containerd 1.6, 1.7 and 2.x at once)" >&2
bash tests/e2e/registry.sh
for containerd in system trixie sid; do
  echo "==> image sets e2e (real coordinator and agent, containerd $containerd, a private registry; the fake Kubernetes API as a process)" >&2
  KIP_CONTAINERD=$containerd bash tests/e2e/image-sets.sh
done
echo "==> image e2e (static binaries, image without Docker, FROM-scratch containers on a real containerd)" >&2
bash tests/e2e/image.sh
echo "==> helm lint/template, OpenShift templates, manifests against the Kubernetes schema" >&2
bash tests/validate-manifests.sh
echo "==> Prometheus rules (promtool check + unit tests)" >&2
promtool check rules deploy/prometheus/kip-rules.yaml
(cd deploy/prometheus && promtool test rules kip-rules.test.yaml)
bash tests/check-dashboard.sh
echo "==> README: every path it names exists" >&2
bash tests/check-readme.sh
echo "==> shellcheck" >&2
shellcheck -x tests/*.sh tests/e2e/*.sh tests/bench/*.sh deploy/local/demo.sh deploy/image/*.sh .ci/run
echo "==> local demo smoke run" >&2
KIP_DEMO_EXIT=1 bash deploy/local/demo.sh
echo "==> all tests passed" >&2
