#!/usr/bin/env bash
# The main job on a local default: a throwaway containerd and registry on 127.0.0.1 with a few
# sample images, and kip-agent keeping them cached and pinned. Prints what containerd shows
# and the agent's /metrics, then runs until Ctrl-C (KIP_DEMO_EXIT=1: stop right away).
# Run as root on Debian; installs the packages it needs if they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/install-deps.sh
. tests/e2e/lib.sh

cargo build --quiet -p kip-agent
AGENT=target/debug/kip-agent

kip_workdir
trap kip_cleanup EXIT

log "starting a registry and a throwaway containerd under $KIP_WORK"
start_registry REG demo
start_containerd "$REG"

log "building sample images and pushing them to $REG"
OCI="$KIP_WORK/oci"
build_image "$OCI" tools "etc/motd=kip demo tools" "usr/share/doc/readme=layer two"
build_image "$OCI" runtime "app/config=runtime image"
build_image "$OCI" ide "ide/settings.json={}" "ide/plugins/a=plugin a" "ide/plugins/b=plugin b"
push_image "$OCI" tools "$REG/demo/tools:1.0" >/dev/null
push_image "$OCI" runtime "$REG/demo/runtime:latest" >/dev/null
IDE_DIGEST=$(push_image "$OCI" ide "$REG/demo/ide:2024")
IMAGES="tools=$REG/demo/tools:1.0; runtime=$REG/demo/runtime; ide=$REG/demo/ide@$IDE_DIGEST;"

PORT=${KIP_DEMO_PORT:-$(free_port)}
log "starting kip-agent: IMAGES=\"$IMAGES\""
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "$IMAGES" --listen "127.0.0.1:$PORT" --check-interval 5s &
KIP_PIDS+=($!)
wait_for 60 "the agent to be ready" curl -sf "http://127.0.0.1:$PORT/readyz"

log "containerd's view (ctr -n k8s.io images ls): cached, with the pin label"
kctr images ls | awk '{ print $1, $NF }' | column -t
log "the agent's /metrics (kip_* lines)"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^kip_(images|image_cached|image_pinned|cri_up|runtime)'

if [ -n "${KIP_DEMO_EXIT:-}" ]; then
  kctr images ls | grep -q 'kip.eclipse.dev/pinned-by=kip' || fail "demo: nothing pinned"
  log "demo done"
  exit 0
fi
log "try: ctr --address $CONTAINERD_SOCK -n k8s.io images rm $REG/demo/tools:1.0   (it comes back within 5s)"
log "     curl http://127.0.0.1:$PORT/metrics ; Ctrl-C to stop and clean up"
wait
