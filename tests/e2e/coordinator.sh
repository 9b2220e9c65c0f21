#!/usr/bin/env bash
# Coordinator + agents end-to-end: a real kip-coordinator following a ConfigMap-style directory
# and three real kip-agents, each on its own real containerd ("node"), on loopback. Checks that a
# ConfigMap change reaches every node (new image cached and pinned, dropped one unpinned), that
# agents keep working while the coordinator is down (also across an agent restart, from the
# state dir), that they resume when it is back, that a broken value is refused live (old list
# kept, error counted) and at start-up (exit non-zero naming the variable), and the uninstall's
# release: every pin kip set and every state file gone, images and an admin's pin kept, a node
# whose agent is down named by `kip-coordinator wait-release` and cleaned when it comes back.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

kip_binaries

kip_workdir
trap kip_cleanup EXIT
NODES=(node-1 node-2 node-3)

log "registry, images, three containerds"
start_registry REG public
OCI="$KIP_WORK/oci"
for img in alpha beta gamma; do
  build_image "$OCI" "$img" "$img.txt=$img" "etc/$img=second layer"
  push_image "$OCI" "$img" "$REG/kip-e2e/$img:1" >/dev/null
done
A="$REG/kip-e2e/alpha:1"; B="$REG/kip-e2e/beta:1"; C="$REG/kip-e2e/gamma:1"
declare -A SOCK
for n in "${NODES[@]}"; do
  CONTAINERD_NAME="containerd-$n" start_containerd "$REG"
  SOCK[$n]=$CONTAINERD_SOCK
done

CM="$KIP_WORK/configmap"
write_configmap "$CM" "IMAGES=alpha=$A;beta=$B;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
GRPC=$(free_port); HTTP=$(free_port)
COORD_URL="http://127.0.0.1:$HTTP"
start_coordinator() {
  KIP_RELEASE_TIMEOUT=10s "$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$GRPC" --listen "127.0.0.1:$HTTP" --agent-auth none --log-format json \
    >> "$KIP_WORK/coordinator.log" 2>&1 &
  COORD_PID=$!
  KIP_PIDS+=("$COORD_PID")
  wait_for 20 "coordinator /readyz" curl -sf "$COORD_URL/readyz"
}
declare -A AGENT_PID APORT
start_agent() {
  local n=$1
  [ -n "${APORT[$n]:-}" ] || APORT[$n]=$(free_port)
  # A short lease timeout: while the coordinator is down, vanished images come back within seconds.
  "$AGENT" --coordinator "http://127.0.0.1:$GRPC" --node-name "$n" --state-dir "$KIP_WORK/state-$n" \
    --cri-socket "${SOCK[$n]}" --listen "127.0.0.1:${APORT[$n]}" --lease-timeout 5s --log-format json >> "$KIP_WORK/agent-$n.log" 2>&1 &
  AGENT_PID[$n]=$!
  KIP_PIDS+=("${AGENT_PID[$n]}")
}
metric() { local m; m=$(curl -sf "$1/metrics") && awk -v m="$2" '$1 == m { print $2 }' <<<"$m"; }
metric_is() { [ "$(metric "$1" "$2")" = "$3" ]; }
# all nodes report generation G with every image in NAMES cached and pinned
status_has() {
  local gen=$1 names=$2
  json_check "$COORD_URL/status" "d['generation'] == $gen and len(d['nodes']) == 3 and all(n['generation'] == $gen and sorted(i['name'] for i in n['images'] if i['cached'] and i['pinned']) == sorted('$names'.split()) for n in d['nodes'].values())"
}

log "coordinator and three agents"
start_coordinator
for n in "${NODES[@]}"; do start_agent "$n"; done
wait_for 60 "all nodes to cache and pin alpha and beta (generation 1)" status_has 1 "alpha beta"
for n in "${NODES[@]}"; do
  # wait_for, not a snapshot: an agent's start-up refresh may be between containerd's re-pull
  # (which rewrites the record's labels) and kip putting them back.
  for ref in "$A" "$B"; do wait_for 10 "$ref pinned by kip on $n" pinned_by_kip_on "$n" "$ref"; done
  curl -sf "http://127.0.0.1:${APORT[$n]}/readyz" >/dev/null || fail "agent on $n not ready"
done
json_check "$COORD_URL/status" "[(i['name'], i['nodes_cached'], i['nodes_pinned']) for i in d['images']] == [('alpha', 3, 3), ('beta', 3, 3)]" \
  || fail "/status per-image node counts"
metric_is "$COORD_URL" kip_agents_connected 3 || fail "kip_agents_connected != 3"
metric_is "$COORD_URL" 'kip_image_nodes_pinned{name="alpha",image="'"$A"'"}' 3 || fail "kip_image_nodes_pinned alpha != 3"

log "a real Prometheus scrapes the coordinator and the three agents"
PROM="http://127.0.0.1:$(free_port)"
mkdir -p "$KIP_WORK/prometheus"
{
  echo "global: {scrape_interval: 1s, evaluation_interval: 1s}"
  echo "rule_files: ['$PWD/deploy/prometheus/kip-rules.yaml']"
  echo "scrape_configs:"
  echo "  - job_name: kip-coordinator"
  echo "    static_configs: [{targets: ['127.0.0.1:$HTTP']}]"
  echo "  - job_name: kip-agent"
  echo "    static_configs:"
  for n in "${NODES[@]}"; do echo "      - {targets: ['127.0.0.1:${APORT[$n]}'], labels: {node: '$n'}}"; done
} > "$KIP_WORK/prometheus/prometheus.yml"
promtool check config "$KIP_WORK/prometheus/prometheus.yml" >/dev/null || fail "prometheus config"
prometheus --config.file "$KIP_WORK/prometheus/prometheus.yml" --storage.tsdb.path "$KIP_WORK/prometheus/data" \
  --web.listen-address "${PROM#http://}" >> "$KIP_WORK/prometheus/log" 2>&1 &
KIP_PIDS+=($!)
wait_for 60 "Prometheus: all 4 targets up" json_check "$PROM/api/v1/targets" \
  "sorted((t['labels']['job'], t['health']) for t in d['data']['activeTargets']) == [('kip-agent', 'up')] * 3 + [('kip-coordinator', 'up')]"
wait_for 30 "Prometheus: kip_images_cached equals the list's length (2) on every node" json_check "$PROM/api/v1/query?query=kip_images_cached" \
  "sorted((r['metric']['node'], r['value'][1]) for r in d['data']['result']) == [('node-1', '2'), ('node-2', '2'), ('node-3', '2')]"
json_check "$PROM/api/v1/query?query=kip_image_nodes_pinned" "sorted((r['metric']['name'], r['value'][1]) for r in d['data']['result']) == [('alpha', '3'), ('beta', '3')]" \
  || fail "Prometheus: kip_image_nodes_pinned"
json_check "$PROM/api/v1/rules" "sum(len(g['rules']) for g in d['data']['groups']) == 8" || fail "Prometheus did not load kip's alerting rules"
# promtool check metrics only knows the classic text format; Prometheus itself parses OpenMetrics:
json_check "$PROM/api/v1/query?query=kip_build_info" "sorted(r['metric']['component'] for r in d['data']['result']) == ['agent'] * 3 + ['coordinator']" \
  || fail "Prometheus: kip_build_info of every component"

log "ConfigMap change: beta -> gamma reaches every node"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
wait_for 30 "generation 2 with alpha and gamma on every node" status_has 2 "alpha gamma"
for n in "${NODES[@]}"; do
  wait_for 10 "$C pinned by kip on $n" pinned_by_kip_on "$n" "$C"
  wait_for 10 "beta unpinned on $n" not_pinned_by_kip_on "$n" "$B"
done
grep -q '"message":"published a new image list".*"generation":2' "$KIP_WORK/coordinator.log" || fail "no summary line for generation 2"

log "a broken value live: refused, counted, old list kept"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;broken" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
wait_for 10 "kip_config_reload_errors_total 1" metric_is "$COORD_URL" kip_config_reload_errors_total 1
grep -qF "IMAGES: entry 3 \`broken\`: expected \`name=image\`" "$KIP_WORK/coordinator.log" || fail "reload error does not name IMAGES entry 3"
json_check "$COORD_URL/status" "d['generation'] == 2" || fail "a broken config changed the generation"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={bad json"
wait_for 10 "kip_config_reload_errors_total 2" metric_is "$COORD_URL" kip_config_reload_errors_total 2
grep -q 'NODE_SELECTOR: invalid JSON' "$KIP_WORK/coordinator.log" || fail "reload error does not name NODE_SELECTOR"
sleep 2
status_has 2 "alpha gamma" || fail "agents lost the last good list"

log "coordinator down: agents keep their images"
kill -TERM "$COORD_PID"; wait "$COORD_PID" || fail "coordinator exited non-zero on SIGTERM"
listing=$(kctr_on node-1 images ls)
digest=$(awk -v r="$A" '$1 == r { print $3 }' <<<"$listing")
mapfile -t recs < <(awk -v d="$digest" '$3 == d { print $1 }' <<<"$listing")
if [ -z "$digest" ] || [ "${#recs[@]}" -lt 2 ]; then fail "no records of $A on node-1"; fi
kctr_on node-1 images rm "${recs[@]}" >/dev/null
wait_for 30 "alpha back on node-1 without a coordinator" pinned_by_kip_on node-1 "$A"
log "restart node-2's agent while the coordinator is down: the state dir keeps its list"
kill -TERM "${AGENT_PID[node-2]}"; wait "${AGENT_PID[node-2]}" || fail "agent exited non-zero on SIGTERM"
start_agent node-2
wait_for 30 "node-2 ready from its saved list" curl -sf "http://127.0.0.1:${APORT[node-2]}/readyz"
wait_for 30 "node-2 to keep 2 pinned images" metric_is "http://127.0.0.1:${APORT[node-2]}" kip_images_pinned 2
for ref in "$A" "$C"; do wait_for 10 "$ref still pinned on node-2" pinned_by_kip_on node-2 "$ref"; done

log "start-up with a broken value: exit non-zero naming the variable"
set +e
out=$("$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$(free_port)" --listen "127.0.0.1:$(free_port)" 2>&1); rc=$?
set -e
if [ "$rc" -eq 0 ] || [[ $out != *"NODE_SELECTOR: invalid JSON"* ]]; then fail "broken start-up: rc=$rc $out"; fi
log "agent authentication is never assumed off: tokenreview (the default) needs the agents' ServiceAccount"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
set +e
out=$("$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$(free_port)" --listen "127.0.0.1:$(free_port)" 2>&1); rc=$?
set -e
if [ "$rc" -eq 0 ] || [[ $out != *"--agent-service-account"* ]]; then fail "start-up without agent auth settings: rc=$rc $out"; fi

log "coordinator back: agents resume"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
start_coordinator
wait_for 60 "all three agents reconnected" metric_is "$COORD_URL" kip_agents_connected 3
wait_for 30 "all nodes report alpha and gamma to the new coordinator" status_has 1 "alpha gamma"

log "coordinator restarted once more, same list and generation: agents report again on reconnect"
kill -TERM "$COORD_PID"; wait "$COORD_PID" || fail "coordinator exited non-zero on SIGTERM"
start_coordinator
wait_for 60 "all three agents reconnected again" metric_is "$COORD_URL" kip_agents_connected 3
wait_for 30 "all nodes in /status although nothing changed on them" status_has 1 "alpha gamma"

log "uninstall: KIP_RELEASE with node-3's agent down"
# An admin's own pin on an image kip no longer lists: a release must leave it alone.
kctr_on node-1 images label "$B" io.cri-containerd.pinned=pinned >/dev/null
kill -TERM "${AGENT_PID[node-3]}"; wait "${AGENT_PID[node-3]}" || fail "agent exited non-zero on SIGTERM"
for n in "${NODES[@]}"; do [ -f "$KIP_WORK/state-$n/image-list.json" ] || fail "no state file on $n before the release"; done
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}" "KIP_RELEASE=unpin"
started=$SECONDS
set +e
out=$("$COORD" wait-release --status-url "$COORD_URL/status" --timeout 60s 2>&1); rc=$?
set -e
echo "$out" >&2
[ "$rc" -eq 0 ] || fail "wait-release exited $rc"
# Bounded: the release timeout (10s) ends the wait for node-3, whose agent cannot answer.
[ $((SECONDS - started)) -lt 40 ] || fail "the release took $((SECONDS - started))s with one node down"
has_line "$out" "released nodes (2): node-1, node-2" || fail "wait-release: released nodes"
has_match "$out" '^left behind: node node-3: .*its agent is not connected' || fail "wait-release does not name node-3"
has_match "$out" '^left behind: no Kubernetes API' || fail "wait-release does not say the cluster was not touched"
set +e
"$COORD" wait-release --status-url "$COORD_URL/status" --timeout 5s --strict >/dev/null 2>&1; rc=$?
set -e
[ "$rc" -eq 1 ] || fail "wait-release --strict exited $rc with node-3 left behind"
kip_pins_on() { local ls; ls=$(kctr_on "$1" images ls) && has_match "$ls" 'kip\.eclipse\.dev/pinned-by=kip'; }
for n in node-1 node-2; do
  ! kip_pins_on "$n" || fail "a record on $n still carries kip's pin after the release"
  for ref in "$A" "$C"; do present_on "$n" "$ref" || fail "$ref was deleted from $n (unpin must keep images)"; done
  [ ! -e "$KIP_WORK/state-$n/image-list.json" ] || fail "the state file on $n survived the release"
done
[[ ",$(labels_on node-1 "$B")," == *",io.cri-containerd.pinned=pinned,"* ]] || fail "the admin's pin on $B was removed"
kip_pins_on node-3 || fail "node-3 (agent down) lost its pins: the test proves nothing"
metric_is "http://127.0.0.1:${APORT[node-1]}" kip_images_desired 0 || fail "node-1 still has a list"

log "node-3's agent comes back: it is released too"
start_agent node-3
wait_for 30 "node-3 released" json_check "$COORD_URL/status" "'node-3' in d['release']['released']"
! kip_pins_on node-3 || fail "node-3 kept kip's pins after its agent came back"
[ ! -e "$KIP_WORK/state-node-3/image-list.json" ] || fail "the state file on node-3 survived"
for ref in "$A" "$C"; do present_on node-3 "$ref" || fail "$ref was deleted from node-3"; done
log "a release is final for the process: taking KIP_RELEASE back publishes nothing new"
write_configmap "$CM" "IMAGES=alpha=$A;gamma=$C;" "CACHING_INTERVAL_HOURS=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
sleep 2
json_check "$COORD_URL/status" "len(d['release']['released']) == 3" || fail "the release was taken back"
! kip_pins_on node-1 || fail "node-1 pinned again after KIP_RELEASE was removed"

log "coordinator e2e passed"
