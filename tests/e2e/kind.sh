#!/usr/bin/env bash
# kind end-to-end test, for machines with Docker, kind, kubectl, helm, jq and internet (it cannot
# run on kip's CI machines, which have no Docker engine; .github/workflows/kind-e2e.yml runs it).
# Creates a 3-node kind cluster, builds and loads kip's image, installs the chart, and checks on
# every node with `crictl images -o json` (through `docker exec`) that the images are present and
# pinned. Then checks the fallback: on one worker the agent gets no runtime socket, so in auto
# mode that node is labelled kip.eclipse.dev/agent=none at once and the classic sleep DaemonSet
# runs there, and only there. Last, `helm uninstall`: no kip label on any node, no image pinned by
# kip (images still cached), no state file on the hosts, nothing of kip's left in the cluster.
# KIP_KIND_KEEP=1 keeps the cluster.
set -euo pipefail
cd "$(dirname "$0")/../.."

CLUSTER=${KIP_KIND_CLUSTER:-kip-e2e}
IMAGE=kip:kind-e2e
NS=kip
IMAGES="busybox=docker.io/library/busybox:1.36;pause=registry.k8s.io/pause:3.10;"
NAMES=(docker.io/library/busybox:1.36 registry.k8s.io/pause:3.10)

log() { printf '==> %s\n' "$*" >&2; }
fail() { printf 'FAIL: %s\n' "$*" >&2; exit 1; }
for tool in docker kind kubectl helm jq; do
  command -v "$tool" >/dev/null || fail "$tool is required"
done

cleanup() {
  if [ -z "${KIP_KIND_KEEP:-}" ]; then kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

log "kind cluster $CLUSTER (1 control plane, 2 workers)"
kind create cluster --name "$CLUSTER" --wait 120s --config - <<'KIND'
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
nodes:
  - role: control-plane
  - role: worker
  - role: worker
KIND

log "build and load $IMAGE"
docker build -f deploy/image/Dockerfile -t "$IMAGE" .
kind load docker-image "$IMAGE" --name "$CLUSTER"

log "helm install"
helm install kip deploy/helm -n "$NS" --create-namespace \
  --set image.repository=kip --set image.tag=kind-e2e --set image.pullPolicy=Never \
  --set-string configMap.images="$IMAGES" --set agent.checkInterval=5s --wait --timeout 5m
kubectl -n "$NS" rollout status deployment/kubernetes-image-puller --timeout 120s
kubectl -n "$NS" rollout status daemonset/kubernetes-image-puller-agent --timeout 300s

# pinned_on NODE REF: crictl on the node reports the image present and pinned.
pinned_on() {
  docker exec "$1" crictl images -o json |
    jq -e --arg ref "$2" '[.images[] | select(.repoTags | index($ref)) | .pinned] | any' >/dev/null
}
wait_until() { # wait_until SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2 deadline
  shift 2
  deadline=$((SECONDS + secs))
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || fail "timed out waiting for $what"
    sleep 2
  done
}

mapfile -t NODES < <(kind get nodes --name "$CLUSTER")
log "every node has the images, pinned (crictl images -o json)"
for node in "${NODES[@]}"; do
  for ref in "${NAMES[@]}"; do
    wait_until 300 "$ref pinned on $node" pinned_on "$node" "$ref"
  done
  echo "$node: ${NAMES[*]} present and pinned"
done

log "the coordinator resolves both tags over HTTPS (the image's CA bundle) and every node reports that digest"
# resolved_everywhere: /status has a coordinator digest for every image and every node reports it.
resolved_everywhere() {
  local status
  status=$(kubectl -n "$NS" get --raw "/api/v1/namespaces/$NS/services/kubernetes-image-puller:8080/proxy/status") &&
    jq -e '(.images | length == 2 and all(.resolved_by == "coordinator"))
      and ((.images | map({(.name): .digest}) | add) as $d | [.nodes[] | .images[] | .digest == $d[.name]] | all)' \
      >/dev/null <<<"$status"
}
wait_until 120 "tags resolved by the coordinator and reported by every node" resolved_everywhere

log "agents authenticate (TokenReview) and the startup gate opens a node whose images are cached"
kubectl -n "$NS" get deployment kubernetes-image-puller -o json |
  jq -e '[.spec.template.spec.containers[0].env[] | select(.name == "KIP_AGENT_AUTH") | .value] == ["tokenreview"]' >/dev/null ||
  fail "the chart does not turn agent authentication on"
GATED=${NODES[-1]}
kubectl taint node "$GATED" kip.eclipse.dev/images-pending=true:NoSchedule example.com/keep=me:NoSchedule
gate_gone() { ! kubectl get node "$GATED" -o json | jq -e '(.spec.taints // []) | map(.key) | index("kip.eclipse.dev/images-pending")' >/dev/null; }
wait_until 60 "the gate on $GATED removed" gate_gone
kubectl get node "$GATED" -o json | jq -e '(.spec.taints // []) | map(.key) | index("example.com/keep")' >/dev/null ||
  fail "removing the gate removed another taint"
kubectl taint node "$GATED" example.com/keep- >/dev/null
kubectl -n "$NS" get events.events.k8s.io -o json |
  jq -e --arg n "$GATED" '[.items[] | select(.reason == "GateOpened" and (.note | contains($n)))] | length > 0' >/dev/null ||
  fail "no GateOpened Event for $GATED"

log "fallback: the agent on one worker gets no runtime socket"
mapfile -t WORKERS < <(kubectl get nodes -o name -l '!node-role.kubernetes.io/control-plane')
WORKER=${WORKERS[0]#node/}
# The regular agents stay off that node...
kubectl -n "$NS" patch daemonset kubernetes-image-puller-agent --type merge -p "$(jq -n --arg n "$WORKER" '{spec: {template: {spec: {affinity: {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchFields: [{key: "metadata.name", operator: "NotIn", values: [$n]}]}]}}}}}}}')"
# ...and a copy of the agent runs there with a socket path that does not exist.
kubectl -n "$NS" get daemonset kubernetes-image-puller-agent -o json | jq --arg n "$WORKER" '
  .metadata = {name: "kip-agent-nosocket", namespace: .metadata.namespace}
  | .spec.selector.matchLabels["kip-e2e"] = "nosocket"
  | .spec.template.metadata.labels["kip-e2e"] = "nosocket"
  | .spec.template.spec.affinity = {nodeAffinity: {requiredDuringSchedulingIgnoredDuringExecution: {nodeSelectorTerms: [{matchFields: [{key: "metadata.name", operator: "In", values: [$n]}]}]}}}
  | .spec.template.spec.containers[0].env |= (map(select(.name != "KIP_CRI_SOCKET"))
      + [{name: "KIP_CRI_SOCKET", value: "/host/run/kip-no-runtime/containerd.sock"}])
  | del(.status)' | kubectl apply -f -

label_of() { kubectl get node "$1" -o json | jq -r '.metadata.labels["kip.eclipse.dev/agent"] // "(unset)"'; }
fallback_label() { [ "$(label_of "$WORKER")" = none ]; }
# The agent there reports no runtime: evidence, so no grace period applies.
wait_until 120 "$WORKER to be labelled for the fallback" fallback_label
for node in $(kubectl get nodes -o name | cut -d/ -f2); do
  [ "$node" = "$WORKER" ] && continue
  [ "$(label_of "$node")" = cri ] || fail "$node lost its agent label"
done
fallback_nodes() {
  kubectl -n "$NS" get pods -l app.kubernetes.io/name=kip-sleep -o json | jq -r '[.items[] | select(.status.phase == "Running") | .spec.nodeName] | unique | join(",")'
}
only_on_worker() { [ "$(fallback_nodes)" = "$WORKER" ]; }
wait_until 300 "the fallback sleep DaemonSet running on $WORKER only" only_on_worker
pod=$(kubectl -n "$NS" get pods -l app.kubernetes.io/name=kip-sleep -o jsonpath='{.items[0].metadata.name}')
kubectl -n "$NS" get pod "$pod" -o json | jq -e '[.spec.containers[].command == ["/kip/sleep", "720h"]] | all' >/dev/null || fail "fallback containers do not run /kip/sleep 720h"
kubectl -n "$NS" get pod "$pod" -o json | jq -e '.spec.initContainers[0].name == "copy-sleep"' >/dev/null || fail "no copy-sleep initContainer"
log "helm uninstall: the pre-delete hook releases every node"
helm uninstall kip -n "$NS" --wait --timeout 5m
for node in $(kubectl get nodes -o name | cut -d/ -f2); do
  [ "$(label_of "$node")" = "(unset)" ] || fail "$node still carries kip.eclipse.dev/agent"
done
for node in "${NODES[@]}"; do
  listing=$(docker exec "$node" ctr -n k8s.io images ls)
  if grep -F 'kip.eclipse.dev/pinned-by=kip' <<<"$listing" >/dev/null; then fail "$node: a record still pinned by kip"; fi
  docker exec "$node" crictl images -o json |
    jq -e '[.images[] | select(.repoTags | index("docker.io/library/busybox:1.36"))] | length == 1 and (.[0].pinned | not)' >/dev/null ||
    fail "$node: busybox should be cached and unpinned"
  docker exec "$node" test ! -e /var/lib/kip/image-list.json || fail "$node: the state file is left"
done
left=$(kubectl get all,configmaps,roles,rolebindings,serviceaccounts -n "$NS" -l app.kubernetes.io/instance=kip -o name)
[ -z "$left" ] || fail "left in the cluster: $left"
if kubectl -n "$NS" get daemonset kubernetes-image-puller >/dev/null 2>&1; then fail "the fallback DaemonSet is left"; fi
left=$(kubectl get clusterroles,clusterrolebindings -o name | grep -F "$NS-kubernetes-image-puller" || true)
[ -z "$left" ] || fail "left in the cluster: $left"
log "kind e2e passed"
