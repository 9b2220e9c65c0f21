#!/usr/bin/env bash
# What the registry sees: a real kip-coordinator resolving tags and three real kip-agents on three
# containerd versions at once (node-1 on 1.6, node-2 on 1.7, node-3 on 2.x: each sends its own
# user agent, so the registry's request log tells the nodes apart), four tagged images, a refresh
# interval of 3s and a pull budget of one node. Counted from docker-registry's request log:
#  - the first pulls: one node at a time (the spans of the nodes' requests do not overlap);
#  - steady state over several intervals: no manifest GET, no request from any node, one HEAD per
#    image per interval from the coordinator;
#  - a moved tag: each node pulls it once (one manifest GET per node), one node at a time, and
#    reports the new digest;
#  - the coordinator killed mid-rollout: the nodes that had not pulled yet finish on their own
#    (lease timeout), and report the digest to the next coordinator;
#  - before, for comparison: the same cluster with resolution off (every node refreshes every tag);
#  - a private registry: the coordinator resolves with the pull secret; with a wrong password it
#    says "unauthorized" (never the password) and agents refresh the tag on their own.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

kip_binaries

kip_workdir
trap kip_cleanup EXIT
NODES=(node-1 node-2 node-3)
declare -A VERSION=([node-1]=system [node-2]=trixie [node-3]=sid)
INTERVAL=3

log "a registry that logs every request, a private one, images, three containerd versions"
KIP_REGISTRY_REQUEST_LOG=1 start_registry REG public
KIP_REGISTRY_REQUEST_LOG=1 start_registry PRIV private kip-user 's3cret-Pa55'
RLOG="$KIP_WORK/registry-public/log"
PLOG="$KIP_WORK/registry-private/log"
OCI="$KIP_WORK/oci"
declare -A DIGEST
for img in alpha beta gamma delta; do
  build_image "$OCI" "$img" "$img.txt=$img" "etc/$img=second layer of $img"
  DIGEST[$img]=$(push_image "$OCI" "$img" "$REG/kip-e2e/$img:1")
done
build_image "$OCI" private "private.txt=private"
DIGEST[private]=$(push_image "$OCI" private "$PRIV/kip-e2e/private:1" "kip-user:s3cret-Pa55")
SECRETS="$KIP_WORK/pull-secrets"
write_pull_secret "$SECRETS" regcred "$PRIV" kip-user 's3cret-Pa55'
declare -A SOCK UA
for n in "${NODES[@]}"; do
  KIP_CONTAINERD=${VERSION[$n]} CONTAINERD_NAME="containerd-$n" start_containerd "$REG" "$PRIV"
  SOCK[$n]=$CONTAINERD_SOCK
  # containerd's user agent is containerd/<its version string>
  UA[$n]="containerd/$(KIP_CONTAINERD=${VERSION[$n]} "$(KIP_CONTAINERD=${VERSION[$n]} containerd_bin_dir)/containerd" --version | awk '{print $3}')"
  log "$n: ${UA[$n]}"
done
[ "$(printf '%s\n' "${UA[@]}" | sort -u | wc -l)" = 3 ] || fail "the three containerds do not send three user agents: ${UA[*]}"

IMAGES="alpha=$REG/kip-e2e/alpha:1;beta=$REG/kip-e2e/beta:1;gamma=$REG/kip-e2e/gamma:1;delta=$REG/kip-e2e/delta:1;private=$PRIV/kip-e2e/private:1;"
CM="$KIP_WORK/configmap"
write_configmap "$CM" "IMAGES=$IMAGES" "KIP_REFRESH_INTERVAL=${INTERVAL}s" "KIP_MAX_NODES_PULLING=1" "KIP_CHECK_INTERVAL=1s" "NODE_SELECTOR={}"
GRPC=$(free_port); HTTP=$(free_port)
COORD_URL="http://127.0.0.1:$HTTP"
start_coordinator() {
  KIP_RESOLVE_TAGS=${RESOLVE:-true} "$COORD" --config-dir "$CM" --grpc-listen "127.0.0.1:$GRPC" --listen "127.0.0.1:$HTTP" --agent-auth none \
    --plain-http-registries "$REG,$PRIV" --pull-secrets-dir "$SECRETS" --log-format json \
    >> "$KIP_WORK/coordinator.log" 2>&1 &
  COORD_PID=$!
  KIP_PIDS+=("$COORD_PID")
  wait_for 20 "coordinator /readyz" curl -sf "$COORD_URL/readyz"
}
declare -A AGENT_PID APORT
start_agent() {
  local n=$1
  [ -n "${APORT[$n]:-}" ] || APORT[$n]=$(free_port)
  "$AGENT" --coordinator "http://127.0.0.1:$GRPC" --node-name "$n" --state-dir "$KIP_WORK/state-$n" \
    --cri-socket "${SOCK[$n]}" --listen "127.0.0.1:${APORT[$n]}" --pull-secrets-dir "$SECRETS" \
    --lease-timeout 3s --log-format json >> "$KIP_WORK/agent-$n.log" 2>&1 &
  AGENT_PID[$n]=$!
  KIP_PIDS+=("${AGENT_PID[$n]}")
}
lines() { wc -l < "$1"; }
metric() { local m; m=$(curl -sf "$1/metrics") && awk -v m="$2" '$1 == m { print $2 }' <<<"$m"; }
# ua_re NODE: an anchored regular expression matching exactly NODE's user agent (2.x has a "+").
ua_re() { python3 -c 'import re, sys; print("^" + re.escape(sys.argv[1]) + "$")' "${UA[$1]}"; }
rlog() { python3 tests/e2e/registry-log.py "$@"; }
# digest_on NODE REF: the digest containerd on NODE has for REF.
digest_on() {
  local ls; ls=$(KIP_CONTAINERD=${VERSION[$1]} "$(KIP_CONTAINERD=${VERSION[$1]} containerd_bin_dir)/ctr" --address "${SOCK[$1]}" -n k8s.io images ls) \
    && awk -v r="$2" '$1 == r { print $3 }' <<<"$ls"
}
has_digest() { [ "$(digest_on "$1" "$2")" = "$3" ]; }
metric_is() { [ "$(metric "$1" "$2")" = "$3" ]; }
# every node reports NAME cached with DIGEST
nodes_report() {
  json_check "$COORD_URL/status" "len(d['nodes']) == 3 and all(any(i['name'] == '$1' and i['cached'] and i['digest'] == '$2' for i in n['images']) for n in d['nodes'].values())"
}
resolved() {
  json_check "$COORD_URL/status" "any(i['name'] == '$1' and i['resolved_by'] == 'coordinator' and i['digest'] == '$2' for i in d['images'])"
}
# pulls NODE NAME REASON: how many pulls of the image named NAME node NODE started for REASON
pulls() { grep -c "\"message\":\"pulling\".*\"image\":\"[^\"]*/kip-e2e/$2:1\".*\"reason\":\"$3\"" "$KIP_WORK/agent-$1.log" || true; }

log "coordinator and three agents, budget 1: first pulls"
start_coordinator
for n in "${NODES[@]}"; do start_agent "$n"; done
for img in alpha beta gamma delta private; do
  wait_for 60 "$img resolved by the coordinator" resolved "$img" "${DIGEST[$img]}"
  wait_for 90 "every node reports $img at ${DIGEST[$img]}" nodes_report "$img" "${DIGEST[$img]}"
done
rlog "$RLOG" 1 per-ua >&2
rlog "$RLOG" 1 exclusive --ua '^containerd/' --uri '^/v2/kip-e2e/' >&2 || fail "two nodes pulled at the same time with a budget of 1"
for n in "${NODES[@]}"; do
  got=$(rlog "$RLOG" 1 count --method GET --ua "$(ua_re "$n")" --uri '^/v2/kip-e2e/[a-z]+/manifests/')
  [ "$got" = 4 ] || fail "$n sent $got manifest GETs for 4 images"
done
[ "$(metric "$COORD_URL" "kip_registry_requests_total{registry=\"$PRIV\",method=\"HEAD\",result=\"ok\"}")" -ge 1 ] \
  || fail "no successful HEAD to the private registry counted"
wait_for 10 "node-1's agent counted one GET per pull" \
  metric_is "http://127.0.0.1:${APORT[node-1]}" "kip_registry_requests_total{registry=\"$REG\",method=\"GET\",result=\"success\"}" 4

log "steady state: $((4 * INTERVAL))s of nothing moving"
from=$(($(lines "$RLOG") + 1)); pfrom=$(($(lines "$PLOG") + 1))
sleep $((4 * INTERVAL))
rlog "$RLOG" "$from" per-ua >&2
[ "$(rlog "$RLOG" "$from" count --method GET --uri '/manifests/')" = 0 ] || fail "manifest GETs in steady state"
steady_nodes=$(rlog "$RLOG" "$from" count --ua '^containerd/')
[ "$steady_nodes" = 0 ] || fail "a node talked to the registry in steady state ($steady_nodes requests)"
steady_heads=$(rlog "$RLOG" "$from" count --method HEAD --ua '^kip-coordinator/')
for img in alpha beta gamma delta; do
  heads=$(rlog "$RLOG" "$from" count --method HEAD --ua '^kip-coordinator/' --uri "^/v2/kip-e2e/$img/manifests/1\$")
  # 4 intervals: 4 HEADs, give or take the one in flight at either end.
  if [ "$heads" -lt 3 ] || [ "$heads" -gt 5 ]; then fail "$heads HEADs for $img in 4 intervals (expected one per interval)"; fi
done
# The private registry (the coordinator authenticates with the pull secret): the same.
[ "$(rlog "$PLOG" "$pfrom" count --ua '^containerd/')" = 0 ] || fail "a node talked to the private registry in steady state"
heads=$(rlog "$PLOG" "$pfrom" count --method HEAD --ua '^kip-coordinator/' --uri '^/v2/kip-e2e/private/manifests/1$')
if [ "$heads" -lt 3 ] || [ "$heads" -gt 5 ]; then fail "$heads HEADs for private in 4 intervals"; fi

log "a moved tag: every node pulls it once, one at a time, and reports the new digest"
build_image "$OCI" alpha2 "alpha.txt=alpha, second version"
from=$(($(lines "$RLOG") + 1))
NEW=$(push_image "$OCI" alpha2 "$REG/kip-e2e/alpha:1")
[ "$NEW" != "${DIGEST[alpha]}" ] || fail "the new alpha has the old digest"
wait_for 30 "the coordinator resolves alpha to $NEW" resolved alpha "$NEW"
wait_for 60 "every node reports alpha at $NEW" nodes_report alpha "$NEW"
sleep $((2 * INTERVAL))
rlog "$RLOG" "$from" per-ua >&2
rlog "$RLOG" "$from" exclusive --ua '^containerd/' --uri '^/v2/kip-e2e/' >&2 || fail "two nodes pulled the moved tag at the same time"
for n in "${NODES[@]}"; do
  got=$(rlog "$RLOG" "$from" count --method GET --ua "$(ua_re "$n")" --uri '/manifests/')
  [ "$got" = 1 ] || fail "$n sent $got manifest GETs for one moved tag"
  [ "$(pulls "$n" alpha moved)" = 1 ] || fail "$n pulled alpha $(pulls "$n" alpha moved) times for the move"
  [ "$(digest_on "$n" "$REG/kip-e2e/alpha:1")" = "$NEW" ] || fail "containerd on $n does not have alpha at $NEW"
done
[ "$(rlog "$RLOG" "$from" count --ua '^containerd/' --uri '^/v2/kip-e2e/(beta|gamma|delta)/')" = 0 ] || fail "a node pulled a tag that did not move"

log "the coordinator killed mid-rollout: the nodes finish on their own"
kill -STOP "${AGENT_PID[node-2]}" "${AGENT_PID[node-3]}"
build_image "$OCI" beta2 "beta.txt=beta, second version"
NEW=$(push_image "$OCI" beta2 "$REG/kip-e2e/beta:1")
wait_for 30 "node-1 reports beta at $NEW" json_check "$COORD_URL/status" \
  "any(i['name'] == 'beta' and i['digest'] == '$NEW' for i in d['nodes']['node-1']['images'])"
# node-2 and node-3 have the new digest in their socket buffers, not yet read.
kill -9 "$COORD_PID"; wait "$COORD_PID" 2>/dev/null || true
kill -CONT "${AGENT_PID[node-2]}" "${AGENT_PID[node-3]}"
for n in node-2 node-3; do
  wait_for 40 "$n pulls beta at $NEW without a coordinator" has_digest "$n" "$REG/kip-e2e/beta:1" "$NEW"
  grep -q '"message":"pulling without a lease from the coordinator.*"how":"coordinator_unreachable"' "$KIP_WORK/agent-$n.log" \
    || fail "$n did not say it pulled without a lease"
done
start_coordinator
wait_for 60 "every node reports beta at $NEW to the next coordinator" nodes_report beta "$NEW"

log "a wrong password: unauthorized, said without the password; agents keep the image"
write_pull_secret "$SECRETS" regcred "$PRIV" kip-user 'wrong-Pa55word'
wait_for 30 "private no longer resolved by the coordinator" json_check "$COORD_URL/status" \
  "any(i['name'] == 'private' and i['resolved_by'] == 'agents' and 'unauthorized' in i['why'] for i in d['images'])"
[ "$(metric "$COORD_URL" "kip_image_resolved{name=\"private\",image=\"$PRIV/kip-e2e/private:1\"}")" = 0 ] || fail "kip_image_resolved for private"
[ "$(metric "$COORD_URL" "kip_registry_requests_total{registry=\"$PRIV\",method=\"HEAD\",result=\"unauthorized\"}")" -ge 1 ] \
  || fail "no unauthorized HEAD counted"
for f in "$KIP_WORK"/coordinator.log "$KIP_WORK"/agent-*.log; do
  ! grep -qF -e 'wrong-Pa55word' -e 's3cret-Pa55' "$f" || fail "a password is in $f"
done
for path in status metrics; do
  text=$(curl -sf "$COORD_URL/$path")
  [[ $text != *wrong-Pa55word* && $text != *s3cret-Pa55* ]] || fail "a password is in /$path"
done
grep -q '"message":"tag not resolved: agents refresh it on their own interval".*private' "$KIP_WORK/coordinator.log" \
  || fail "no log line says why private is not resolved"
for n in "${NODES[@]}"; do
  [ "$(digest_on "$n" "$PRIV/kip-e2e/private:1")" = "${DIGEST[private]}" ] || fail "private lost on $n"
done

log "before: the same cluster without tag resolution (every node refreshes every tag)"
kill -TERM "$COORD_PID"; wait "$COORD_PID" || fail "coordinator exited non-zero on SIGTERM"
RESOLVE=false start_coordinator
wait_for 30 "all three agents reconnected" metric_is "$COORD_URL" kip_agents_connected 3
from=$(($(lines "$RLOG") + 1))
sleep $((4 * INTERVAL))
rlog "$RLOG" "$from" per-ua >&2
before=$(rlog "$RLOG" "$from" count --ua '^containerd/' --uri '^/v2/kip-e2e/[a-z]+/manifests/')
before_gets=$(rlog "$RLOG" "$from" count --method GET --ua '^containerd/' --uri '/manifests/')
# 3 nodes x 4 tags x 4 intervals, give or take the refreshes in flight at either end. containerd
# has the manifest of an unchanged tag already: its re-pull is one HEAD, no GET (all 3 versions).
if [ "$before" -lt 36 ] || [ "$before" -gt 60 ]; then fail "$before manifest requests in 4 intervals without resolution (expected about 48)"; fi
echo "manifest requests in 4 intervals of 3s, 3 nodes x 4 tags: every node refreshing: $before from the nodes" \
  "($before_gets GETs); the coordinator resolving: 0 from the nodes, $steady_heads HEADs from the coordinator" >&2
# For tests/bench/run.sh, which reports these figures:
echo "registry-bench nodes=3 tags=4 intervals=4 before=$before before_gets=$before_gets after_nodes=$steady_nodes after_heads=$steady_heads"
RESOLVE=true

log "HTTPS: the coordinator checks the registry's certificate against the CA store (SSL_CERT_FILE)"
TLS="$KIP_WORK/registry-tls"
mkdir -p "$TLS/data"
openssl req -x509 -newkey rsa:2048 -nodes -keyout "$TLS/ca.key" -out "$TLS/ca.pem" -days 1 -subj "/CN=kip e2e CA" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -keyout "$TLS/key.pem" -out "$TLS/req.csr" -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > "$TLS/ext"
openssl x509 -req -in "$TLS/req.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" -CAcreateserial -out "$TLS/cert.pem" \
  -days 1 -extfile "$TLS/ext" 2>/dev/null
TPORT=$(free_port)
cat > "$TLS/config.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $TLS/data
http:
  addr: 127.0.0.1:$TPORT
  tls:
    certificate: $TLS/cert.pem
    key: $TLS/key.pem
YML
docker-registry serve "$TLS/config.yml" > "$TLS/log" 2>&1 &
KIP_PIDS+=($!)
wait_for 20 "the HTTPS registry" curl -sf --cacert "$TLS/ca.pem" "https://127.0.0.1:$TPORT/v2/"
TDIGEST=$(push_image "$OCI" gamma "127.0.0.1:$TPORT/kip-e2e/tls:1")
write_configmap "$KIP_WORK/tls-cm" "IMAGES=tls=127.0.0.1:$TPORT/kip-e2e/tls:1;" "NODE_SELECTOR={}"
# tls_status CA_FILE: /status of a coordinator that trusts CA_FILE, once it has looked at the tag.
tls_status() {
  local http; http=$(free_port)
  SSL_CERT_FILE=$1 "$COORD" --config-dir "$KIP_WORK/tls-cm" --grpc-listen "127.0.0.1:$(free_port)" --listen "127.0.0.1:$http" \
    --agent-auth none --log-format json >> "$KIP_WORK/coordinator-tls.log" 2>&1 &
  local pid=$!
  KIP_PIDS+=("$pid")
  wait_for 20 "a coordinator that trusts $1 to look at the tag" \
    json_check "http://127.0.0.1:$http/status" "d['images'][0].get('why') != 'not resolved yet'"
  curl -sf "http://127.0.0.1:$http/status"
  kill "$pid"
}
out=$(tls_status "$TLS/ca.pem")
python3 -c "import json, sys; i = json.loads(sys.argv[1])['images'][0]; sys.exit(0 if (i['resolved_by'], i['digest']) == ('coordinator', '$TDIGEST') else 1)" "$out" \
  || fail "not resolved over HTTPS with the registry's CA trusted: $out"
out=$(tls_status /etc/ssl/certs/ca-certificates.crt)
python3 -c "import json, sys; i = json.loads(sys.argv[1])['images'][0]; sys.exit(0 if i['resolved_by'] == 'agents' and 'certificate' in i['why'].lower() else 1)" "$out" \
  || fail "an untrusted certificate was accepted or not named: $out"

log "registry e2e passed"
