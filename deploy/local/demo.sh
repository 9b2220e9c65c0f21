#!/usr/bin/env bash
# The main job on a local default: a throwaway containerd and registry on 127.0.0.1 with a few
# sample images, kip-coordinator publishing the list from a ConfigMap-style directory, and
# kip-agent keeping the images cached and pinned. Prints what containerd shows, the agent's
# /metrics and the coordinator's /status, then runs until Ctrl-C (KIP_DEMO_EXIT=1: stop at once).
# Run as root on Debian; installs the packages it needs if they are missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash tests/install-deps.sh
. tests/e2e/lib.sh

cargo build --quiet -p kip-agent -p kip-coordinator
AGENT=target/debug/kip-agent
COORD=target/debug/kip-coordinator

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

CM="$KIP_WORK/configmap"
write_configmap "$CM" "IMAGES=$IMAGES" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=5s"
GRPC=$(free_port); CPORT=$(free_port); PORT=${KIP_DEMO_PORT:-$(free_port)}
log "starting kip-coordinator (config dir $CM): IMAGES=\"$IMAGES\""
# The registry speaks plain HTTP (as the containerd's hosts.toml says): the coordinator resolves the
# tags there with one HEAD each, and the agent pulls only what it does not have.
"$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$GRPC" --listen "127.0.0.1:$CPORT" --agent-auth none \
  --plain-http-registries "$REG" &
KIP_PIDS+=($!)
wait_for 20 "the coordinator" curl -sf "http://127.0.0.1:$CPORT/readyz"
log "starting kip-agent for node demo-node"
"$AGENT" --coordinator "http://127.0.0.1:$GRPC" --node-name demo-node --state-dir "$KIP_WORK/agent-state" \
  --cri-socket "$CONTAINERD_SOCK" --listen "127.0.0.1:$PORT" &
KIP_PIDS+=($!)
wait_for 60 "the agent to be ready" curl -sf "http://127.0.0.1:$PORT/readyz"
wait_for 10 "the coordinator to hear from the agent" json_check "http://127.0.0.1:$CPORT/status" "all(i['nodes_pinned'] == 1 for i in d['images'])"
wait_for 10 "the coordinator to resolve the two tags" json_check "http://127.0.0.1:$CPORT/status" \
  "sorted(i['resolved_by'] for i in d['images']) == ['coordinator', 'coordinator', 'digest']"

log "containerd's view (ctr -n k8s.io images ls): cached, with the pin label"
kctr images ls | awk '{ print $1, $NF }' | column -t
log "the agent's /metrics (kip_* lines)"
curl -sf "http://127.0.0.1:$PORT/metrics" | grep -E '^kip_(images|image_cached|image_pinned|cri_up|runtime)'

log "the coordinator's /status"
curl -sf "http://127.0.0.1:$CPORT/status"

if [ -n "${KIP_DEMO_EXIT:-}" ]; then
  has_match "$(kctr images ls)" 'kip\.eclipse\.dev/pinned-by=kip' || fail "demo: nothing pinned"
  log "demo done"
  exit 0
fi
log "try: ctr --address $CONTAINERD_SOCK -n k8s.io images rm $REG/demo/tools:1.0   (it comes back within 5s)"
log "     edit $CM/..data/IMAGES (or: . tests/e2e/lib.sh; write_configmap $CM IMAGES=...) and watch the agent follow"
log "     curl http://127.0.0.1:$PORT/metrics ; curl http://127.0.0.1:$CPORT/status ; Ctrl-C to stop and clean up"
wait
