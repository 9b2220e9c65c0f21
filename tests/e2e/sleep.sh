#!/usr/bin/env bash
# kip-sleep for real: built static (proved with `file`), its size and resident set printed, then
# run through a real containerd as the fallback DaemonSet runs it: a FROM-scratch image holding
# only kip-sleep copies itself into a shared `kip` directory (`--copy-to`, no shell), and a
# FROM-scratch image with no binary at all runs `/kip/sleep 720h` as PID 1, which SIGTERM ends
# at once with status 0. Needs root; stops everything it starts.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh
[ "$(id -u)" = 0 ] || fail "run as root: containerd needs it"
command -v file >/dev/null || fail "the file command is missing (apt-get install file)"

log "static build"
SLEEP=$(deploy/image/build-static.sh kip-sleep)
file "$SLEEP"
file "$SLEEP" | grep -Eq 'static-pie linked|statically linked' || fail "kip-sleep is not static"
size=$(stat -c %s "$SLEEP")
"$SLEEP" 5s & pid=$!
sleep 0.3
rss=$(awk '/^VmRSS/ { print $2 }' "/proc/$pid/status")
kill -TERM "$pid"; wait "$pid" || fail "kip-sleep exited non-zero on SIGTERM"
printf 'kip-sleep: %d bytes on disk, %d kB resident while sleeping\n' "$size" "$rss"

kip_workdir
trap kip_cleanup EXIT
start_registry REG public
start_containerd "$REG"

log "FROM-scratch images: one with only kip-sleep (as KIP_IMAGE), one with no binary at all"
OCI="$KIP_WORK/oci"
umoci init --layout "$OCI"
umoci new --image "$OCI:kip"
B="$KIP_WORK/bundle"; umoci unpack --image "$OCI:kip" "$B" >/dev/null
mkdir -p "$B/rootfs/usr/local/bin" && cp "$SLEEP" "$B/rootfs/usr/local/bin/kip-sleep"
umoci repack --image "$OCI:kip" "$B" >/dev/null; rm -rf "$B"
build_image "$OCI" app "data/readme.txt=an image without any executable"
push_image "$OCI" kip "$REG/kip/kip:test" >/dev/null
push_image "$OCI" app "$REG/kip/app:test" >/dev/null
kctr images pull --plain-http "$REG/kip/kip:test" >/dev/null
kctr images pull --plain-http "$REG/kip/app:test" >/dev/null

VOL="$KIP_WORK/kip-volume"; mkdir -p "$VOL"
MOUNT="type=bind,src=$VOL,dst=/kip,options=rbind:rw"
log "initContainer step: kip-sleep --copy-to /kip/sleep"
kctr run --rm --mount "$MOUNT" "$REG/kip/kip:test" copy-sleep /usr/local/bin/kip-sleep --copy-to /kip/sleep
[ "$(stat -c %a "$VOL/sleep")" = 755 ] || fail "copied kip-sleep is not mode 0755"
cmp -s "$VOL/sleep" "$SLEEP" || fail "copied kip-sleep differs from the original"

log "cached-image container: /kip/sleep 720h as PID 1, then SIGTERM"
kctr run --rm --mount "$MOUNT" "$REG/kip/app:test" cached /kip/sleep 720h &
run_pid=$!
KIP_PIDS+=("$run_pid")
wait_for 20 "the container to run" bash -c "ctr --address '$CONTAINERD_SOCK' -n k8s.io task ls | grep -q '^cached .*RUNNING'"
task_pid=$(kctr task ls | awk '$1 == "cached" { print $2 }')
[ "$(awk '/^NSpid/ { print $NF }' "/proc/$task_pid/status")" = 1 ] || fail "kip-sleep is not PID 1 in its container"
start=$(date +%s%N)
kctr task kill -s SIGTERM cached
rc=0; wait "$run_pid" || rc=$?
ms=$(( ($(date +%s%N) - start) / 1000000 ))
[ "$rc" = 0 ] || fail "kip-sleep as PID 1 exited $rc on SIGTERM"
[ "$ms" -lt 2000 ] || fail "SIGTERM took ${ms} ms"
echo "kip-sleep as PID 1 in a FROM-scratch container: SIGTERM -> exit 0 in ${ms} ms (ctr round trip included)"
log "kip-sleep e2e passed"
