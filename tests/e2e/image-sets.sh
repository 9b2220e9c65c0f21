#!/usr/bin/env bash
# Image sets end to end on real parts where this machine has them: the real kip-coordinator and
# kip-agent binaries, a real containerd, a real registry that wants a login, and — standing in
# for a control plane, which this machine has not — the tests' fake Kubernetes API as a process
# (coordinator/examples/fake-api.rs), driven with curl as kubectl would drive a real one. A loop
# copies the coordinator's copy of the sets' pull secrets into a directory as the kubelet fills a
# mounted Secret. Checks:
#  - two sets with different node selectors: the node gets the one its labels select, with the
#    private image pulled with the set's pull secret (never on kip's API, never logged), cached
#    and pinned by kip; the set's status says Ready 1/1 (what `kubectl wait` waits for);
#  - the node's labels change: it gets the other set, and the first set's pin is released (the
#    image stays); the first set's status says 0/0, NoNodesSelected;
#  - a set deleted: its pin released on the node, an admin's own pin untouched.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

kip_binaries
FAKE_API=${KIP_FAKE_API_BIN:-target/debug/examples/fake-api}
[ -x "$FAKE_API" ] || fail "$FAKE_API not built (cargo build --workspace --all-targets)"

if [ ! -d ../shared/rig/k8s ]; then
  log "no ../shared/rig/k8s here: the real API server and kubelet part is SKIPPED; the fake API stands in for them"
fi

kip_workdir
trap kip_cleanup EXIT
N=node-1
USER_NAME=team-robot PASSWORD='t3am-Pa55-e2e'

log "a public and a private registry, images, a containerd"
start_registry REG public
start_registry PRIV private "$USER_NAME" "$PASSWORD"
OCI="$KIP_WORK/oci"
build_image "$OCI" model "model.txt=weights"
build_image "$OCI" tools "tools.txt=tools"
build_image "$OCI" base "base.txt=base"
build_image "$OCI" admin "admin.txt=admin"
MODEL="$PRIV/ml/model:1"; TOOLS="$REG/ci/tools:1"; BASE="$REG/kip-e2e/base:1"; ADMIN="$REG/ci/admin:1"
push_image "$OCI" model "$MODEL" "$USER_NAME:$PASSWORD" >/dev/null
push_image "$OCI" tools "$TOOLS" >/dev/null
push_image "$OCI" base "$BASE" >/dev/null
push_image "$OCI" admin "$ADMIN" >/dev/null
declare -A SOCK
start_containerd "$REG" "$PRIV"
SOCK[$N]=$CONTAINERD_SOCK

log "the fake Kubernetes API, a node labelled pool=gpu, a pull secret and two image sets"
KUBECONFIG="$KIP_WORK/kubeconfig"
export KUBECONFIG
"$FAKE_API" "$KUBECONFIG" > "$KIP_WORK/fake-api.url" 2> "$KIP_WORK/fake-api.log" &
KIP_PIDS+=($!)
wait_for 20 "the fake API" test -s "$KIP_WORK/fake-api.url"
API=$(cat "$KIP_WORK/fake-api.url")
api() { # api METHOD PATH [JSON [CONTENT-TYPE]]
  curl -sf -X "$1" -H "Content-Type: ${4:-application/json}" ${3:+--data "$3"} "$API$2"
}
SETS_ML=/apis/kip.eclipse.dev/v1alpha1/namespaces/ml/imagesets
SETS_CI=/apis/kip.eclipse.dev/v1alpha1/namespaces/ci/imagesets
api POST /api/v1/nodes "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$N\",\"labels\":{\"pool\":\"gpu\"},\"creationTimestamp\":\"2026-01-01T00:00:00Z\"}}" >/dev/null
DOCKERCONFIG=$(printf '{"auths":{"%s":{"auth":"%s"}}}' "$PRIV" "$(printf '%s:%s' "$USER_NAME" "$PASSWORD" | base64 -w0)")
api POST /api/v1/namespaces/ml/secrets "{\"apiVersion\":\"v1\",\"kind\":\"Secret\",\"metadata\":{\"name\":\"team\",\"namespace\":\"ml\"},\"type\":\"kubernetes.io/dockerconfigjson\",\"data\":{\".dockerconfigjson\":\"$(printf '%s' "$DOCKERCONFIG" | base64 -w0)\"}}" >/dev/null
api POST "$SETS_ML" "{\"apiVersion\":\"kip.eclipse.dev/v1alpha1\",\"kind\":\"ImageSet\",\"metadata\":{\"name\":\"training\",\"namespace\":\"ml\",\"generation\":1},\"spec\":{\"images\":[{\"name\":\"model\",\"image\":\"$MODEL\"}],\"imagePullSecrets\":[{\"name\":\"team\"}],\"nodeSelector\":{\"matchLabels\":{\"pool\":\"gpu\"}}}}" >/dev/null
api POST "$SETS_CI" "{\"apiVersion\":\"kip.eclipse.dev/v1alpha1\",\"kind\":\"ImageSet\",\"metadata\":{\"name\":\"builders\",\"namespace\":\"ci\",\"generation\":1},\"spec\":{\"images\":[{\"name\":\"tools\",\"image\":\"$TOOLS\"}],\"nodeSelector\":{\"matchLabels\":{\"pool\":\"ci\"}}}}" >/dev/null

log "the coordinator (image sets on, its copy of the sets' pull secrets) and the agent"
CM="$KIP_WORK/configmap"
write_configmap "$CM" "IMAGES=base=$BASE;" "KIP_CHECK_INTERVAL=1s" "KIP_MODE=cri"
GRPC=$(free_port); HTTP=$(free_port); APORT=$(free_port)
"$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$GRPC" --listen "127.0.0.1:$HTTP" --agent-auth none \
  --image-sets true --pod-namespace kip --set-pull-secrets kip-set-pull-secrets \
  --plain-http-registries "$REG,$PRIV" --log-format json >> "$KIP_WORK/coordinator.log" 2>&1 &
KIP_PIDS+=($!)
wait_for 20 "coordinator /readyz" curl -sf "http://127.0.0.1:$HTTP/readyz"
MOUNTED="$KIP_WORK/set-pull-secrets"
mkdir -p "$MOUNTED"
# The kubelet's part: the copy's keys as files, replaced atomically, every half second.
kubelet_mounts() {
  while true; do
    curl -sf "$API/api/v1/namespaces/kip/secrets/kip-set-pull-secrets" 2>/dev/null | python3 -c '
import base64, json, os, sys
dir = sys.argv[1]
for key, value in (json.load(sys.stdin).get("data") or {}).items():
    tmp = os.path.join(dir, "." + key + ".tmp")
    with open(tmp, "wb") as f:
        f.write(base64.b64decode(value))
    os.replace(tmp, os.path.join(dir, key))
' "$MOUNTED" 2>/dev/null || true
    sleep 0.5
  done
}
kubelet_mounts &
KIP_PIDS+=($!)
"$AGENT" --coordinator "http://127.0.0.1:$GRPC" --node-name "$N" --state-dir "$KIP_WORK/state" \
  --cri-socket "${SOCK[$N]}" --listen "127.0.0.1:$APORT" --set-pull-secrets-dir "$MOUNTED" \
  --log-format json >> "$KIP_WORK/agent.log" 2>&1 &
KIP_PIDS+=($!)

set_status() { # set_status PATH NAME PYTHON-CONDITION-ON-s
  api GET "$1/$2" | python3 -c "import json,sys; s=json.load(sys.stdin).get('status') or {}; c={x['type']: x for x in s.get('conditions', [])}; sys.exit(0 if ($3) else 1)"
}
log "pool=gpu: the training set's private image, pulled with the set's pull secret, pinned by kip"
wait_for 90 "$MODEL pinned by kip" pinned_by_kip_on "$N" "$MODEL"
wait_for 30 "$BASE (the ConfigMap's) pinned by kip" pinned_by_kip_on "$N" "$BASE"
present_on "$N" "$TOOLS" && fail "$TOOLS pulled on a node its set does not select"
wait_for 30 "training Ready 1/1 (what kubectl wait --for=condition=Ready waits for)" \
  set_status "$SETS_ML" training "s.get('ready') == '1/1' and c['Ready']['status'] == 'True'"
set_status "$SETS_CI" builders "s.get('ready') == '0/0' and c['Ready']['reason'] == 'NoNodesSelected'" \
  || fail "builders status with no node selected"
for f in "$KIP_WORK/coordinator.log" "$KIP_WORK/agent.log"; do
  if grep -qF -- "$PASSWORD" "$f"; then fail "the set's password in $(basename "$f")"; fi
done
[ -f "$MOUNTED/ml.team" ] || fail "the copy has no ml.team key"

log "relabelled pool=ci: the builders set comes, the training set's pin is released (the image stays)"
api PATCH "/api/v1/nodes/$N" '{"metadata":{"labels":{"pool":"ci"}}}' application/merge-patch+json >/dev/null
wait_for 60 "$TOOLS pinned by kip" pinned_by_kip_on "$N" "$TOOLS"
wait_for 30 "$MODEL no longer pinned by kip (kept)" not_pinned_by_kip_on "$N" "$MODEL"
pinned_by_kip_on "$N" "$BASE" || fail "$BASE lost its pin"
wait_for 30 "builders Ready 1/1" set_status "$SETS_CI" builders "s.get('ready') == '1/1' and c['Ready']['status'] == 'True'"
wait_for 30 "training 0/0 with no node selected" \
  set_status "$SETS_ML" training "s.get('ready') == '0/0' and c['Ready']['reason'] == 'NoNodesSelected'"

log "an admin's pin, then the builders set deleted: its pin released, the admin's kept"
"$(containerd_bin_dir)/ctr" --address "${SOCK[$N]}" -n k8s.io images pull --plain-http "$ADMIN" >/dev/null
kctr_on "$N" images label "$ADMIN" io.cri-containerd.pinned=pinned >/dev/null
api DELETE "$SETS_CI/builders" >/dev/null
wait_for 30 "$TOOLS no longer pinned by kip (kept)" not_pinned_by_kip_on "$N" "$TOOLS"
[[ ",$(labels_on "$N" "$ADMIN")," == *",io.cri-containerd.pinned=pinned,"* ]] || fail "the admin's pin on $ADMIN was removed"
pinned_by_kip_on "$N" "$BASE" || fail "$BASE lost its pin"
log "image sets e2e passed"
