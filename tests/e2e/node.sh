#!/usr/bin/env bash
# Node end-to-end test of kip-agent against a real containerd (its own root, state, socket and
# /run), two real registries on 127.0.0.1 (one behind htpasswd) and images built here with umoci.
# KIP_CONTAINERD picks the containerd: system (1.6), trixie (1.7.x) or sid (2.x) — see lib.sh.
# Checks with containerd's own `ctr` that images are present and pinned (and, where containerd
# reports pins, with CRI ImageStatus as kubelet sees them), that an admin's labels and pins survive
# kip's pin, re-pull and unpin, that a removed image comes back, /metrics, runtime restarts, that
# containerd is alive at the end, and that a wrong password gives a clear error without the secret.
# Needs root; stops everything it starts.
set -euo pipefail
cd "$(dirname "$0")/../.."
. tests/e2e/lib.sh

AGENT=${KIP_AGENT_BIN:-target/debug/kip-agent}
CRI_INSPECT=${KIP_CRI_INSPECT_BIN:-target/debug/examples/cri-inspect}
[ -x "$AGENT" ] || fail "$AGENT not built (cargo build -p kip-agent)"
[ -x "$CRI_INSPECT" ] || fail "$CRI_INSPECT not built (cargo build -p kip-agent --examples)"
[ "$(id -u)" = 0 ] || fail "run as root: containerd needs it"

kip_workdir
trap kip_cleanup EXIT

log "registries, containerd, test images"
start_registry REG public
start_registry PRIV private kip 'right-Pa55word'
start_containerd "$REG" "$PRIV"
log "containerd $(kctr version | awk '/Version:/ { print $2; exit }') (KIP_CONTAINERD=${KIP_CONTAINERD:-system}); reports pins through the CRI: $(cri_reports_pins && echo yes || echo no)"

OCI="$KIP_WORK/oci"
build_image "$OCI" multi "etc/one.txt=one" "etc/two.txt=two,usr/share/three.txt=three" "four.txt=four"
build_image "$OCI" scratch "hello.txt=hello from scratch"
build_image "$OCI" pinned-elsewhere "x.txt=someone else pins me"
build_image "$OCI" private "secret-app.txt=private"
push_image "$OCI" multi "$REG/kip-e2e/multi:1" >/dev/null
push_image "$OCI" scratch "$REG/kip-e2e/scratch:1" >/dev/null
push_image "$OCI" pinned-elsewhere "$REG/kip-e2e/other:1" >/dev/null
# The same content under a second repository, referenced by digest only.
DIGEST=$(push_image "$OCI" scratch "$REG/kip-e2e/bydigest:unused")
push_image "$OCI" private "$PRIV/kip-e2e/private:1" 'kip:right-Pa55word' >/dev/null
push_image "$OCI" private "$PRIV/kip-e2e/private:2" 'kip:right-Pa55word' >/dev/null
layers=$(skopeo inspect --tls-verify=false --raw "docker://$REG/kip-e2e/multi:1" | python3 -c 'import json,sys; print(len(json.load(sys.stdin)["layers"]))')
[ "$layers" -ge 3 ] || fail "multi-layer image has $layers layers"

SECRETS="$KIP_WORK/secrets"
write_pull_secret "$SECRETS" regcred "$PRIV" kip 'right-Pa55word'

MULTI="$REG/kip-e2e/multi:1"
SCRATCH="$REG/kip-e2e/scratch:1"
BYDIGEST="$REG/kip-e2e/bydigest@$DIGEST"
OTHER="$REG/kip-e2e/other:1"
PRIVATE="$PRIV/kip-e2e/private:1"
IMAGES="multi=$MULTI; scratch=$SCRATCH; bydigest=$BYDIGEST; other=$OTHER; private=$PRIVATE;"

# ref_labels REF: the LABELS column of `ctr images ls` for exactly that record.
ref_labels() { local ls; ls=$(kctr images ls) && awk -v r="$1" '$1 == r { print $NF }' <<<"$ls"; }
is_pinned_by_kip() {
  local l; l=$(ref_labels "$1")
  [[ ",$l," == *",io.cri-containerd.pinned=pinned,"* && ",$l," == *",kip.eclipse.dev/pinned-by=kip,"* ]]
}
# records_of REF: every record (tag, digest, ID) that points at the same manifest as REF.
records_of() {
  local ls digest; ls=$(kctr images ls) || return 1
  digest=$(awk -v r="$1" '$1 == r { print $3 }' <<<"$ls")
  [ -n "$digest" ] && awk -v d="$digest" '$3 == d { print $1 }' <<<"$ls"
}

log "an admin pinned $OTHER (pulled through the CRI) before kip managed it"
# Pulled through the CRI as kubelet would (a ctr pull lacks the CRI's `managed` label, and
# containerd 1.6 then replaces all labels on the next CRI pull, pins included).
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "other=$OTHER" --once >/dev/null 2>&1 || fail "pulling $OTHER"
for rec in $(records_of "$OTHER"); do
  kctr images label "$rec" io.cri-containerd.pinned=pinned kip.eclipse.dev/pinned-by= >/dev/null
done

log "kip-agent --once caches and pins all five images"
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "$IMAGES" --pull-secrets-dir "$SECRETS" --once > "$KIP_WORK/once.out" 2> "$KIP_WORK/once.err" \
  || { cat "$KIP_WORK/once.out" "$KIP_WORK/once.err" >&2; fail "--once exited non-zero"; }
cat "$KIP_WORK/once.out"
grep -q "^5 of 5 images cached and pinned" "$KIP_WORK/once.out" || fail "summary does not report 5 of 5"
for ref in "$MULTI" "$SCRATCH" "$BYDIGEST" "$PRIVATE"; do
  ref_present "$ref" || { kctr images ls >&2; fail "$ref not in ctr images ls"; }
  for rec in $(records_of "$ref"); do
    is_pinned_by_kip "$rec" || fail "$rec (record of $ref) lacks kip's pin labels: $(ref_labels "$rec")"
  done
done
is_pinned_by_kip "$OTHER" && fail "kip claimed the pin an admin set on $OTHER"
[[ $(ref_labels "$OTHER") == *io.cri-containerd.pinned=pinned* ]] || fail "admin's pin on $OTHER lost"
# cri_pin REF: what the CRI tells kubelet (pinned, unpinned or absent).
cri_pin() { "$CRI_INSPECT" "$CONTAINERD_SOCK" "$1"; }
cri_pinned() { [ "$(cri_pin "$1")" = pinned ]; }
if cri_reports_pins; then
  for ref in "$MULTI" "$SCRATCH" "$BYDIGEST" "$PRIVATE" "$OTHER"; do
    [ "$(cri_pin "$ref")" = pinned ] || fail "CRI ImageStatus does not report $ref pinned: $(cri_pin "$ref")"
  done
  echo "CRI ImageStatus: every listed image pinned: true"
fi

log "an admin's label on a record kip pinned survives kip's re-pulls and its unpin"
ADMIN_LABEL=example.com/owner=admin
kctr images label "$SCRATCH" "$ADMIN_LABEL" >/dev/null
has_label() { [[ ",$(ref_labels "$1")," == *",$2,"* ]]; }
REFRESH_PORT=$(free_port)
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "scratch=$SCRATCH" --refresh-interval 1s --check-interval 1s \
  --listen "127.0.0.1:$REFRESH_PORT" >> "$KIP_WORK/refresh.log" 2>&1 &
REFRESH_PID=$!
KIP_PIDS+=("$REFRESH_PID")
scratch_pulls() {
  local m; m=$(curl -sf "http://127.0.0.1:$REFRESH_PORT/metrics") || return 1
  awk -v m="kip_image_pulls_total{name=\"scratch\",image=\"$SCRATCH\",result=\"success\"}" '$1 == m { print $2 }' <<<"$m"
}
three_refreshes() { [ "$(scratch_pulls)" -ge 3 ] 2>/dev/null; }
# containerd rewrites a record's labels when the CRI pulls it again (1.6, 1.7 and 2.x alike);
# kip puts back what the pull dropped, so after every refresh the labels are as before.
labels_intact() {
  three_refreshes && has_label "$SCRATCH" "$ADMIN_LABEL" && has_label "$SCRATCH" io.cri-containerd.image=managed \
    && is_pinned_by_kip "$SCRATCH"
}
wait_for 30 "three refresh pulls of $SCRATCH with the admin's label, the CRI's and kip's pin still on it" labels_intact
echo "after $(scratch_pulls) pulls of $SCRATCH: $(ref_labels "$SCRATCH")"
kill -TERM "$REFRESH_PID"; wait "$REFRESH_PID" || fail "agent exited non-zero on SIGTERM"
# SIGTERM may cut a refresh between the pull and the restore: set the label again (idempotent)
# so the unpin check below tests the unpin alone.
kctr images label "$SCRATCH" "$ADMIN_LABEL" >/dev/null

log "the daemon: /metrics, /readyz"
PORT=$(free_port)
start_agent() {
  "$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "$1" --pull-secrets-dir "$SECRETS" \
    --listen "127.0.0.1:$PORT" --check-interval 1s --log-format json >> "$KIP_WORK/agent.log" 2>&1 &
  AGENT_PID=$!
  KIP_PIDS+=("$AGENT_PID")
}
metric() { local m; m=$(curl -sf "http://127.0.0.1:$PORT/metrics") && awk -v m="$1" '$1 == m { print $2 }' <<<"$m"; }
metric_is() { [ "$(metric "$1")" = "$2" ]; }
start_agent "$IMAGES"
wait_for 30 "/readyz to answer 200" curl -sf "http://127.0.0.1:$PORT/readyz"
# Ready means cached. A starting agent refreshes its tags at once, and containerd rewrites a
# record's labels in a re-pull until kip puts them back (milliseconds; CRI learns of it through
# events): wait for the pins to settle rather than catch that moment.
wait_for 30 "kip_images_pinned 5" metric_is kip_images_pinned 5
[ "$(curl -sf "http://127.0.0.1:$PORT/healthz")" = ok ] || fail "/healthz"
curl -sf "http://127.0.0.1:$PORT/metrics" > "$KIP_WORK/metrics.txt"
has_match "$(curl -sfI "http://127.0.0.1:$PORT/metrics")" '^[Cc]ontent-[Tt]ype: application/openmetrics-text' || fail "/metrics content type"
for want in "kip_images_desired 5" "kip_images_cached 5" "kip_images_pinned 5" "kip_cri_up 1" \
  "kip_image_cached{name=\"private\",image=\"$PRIVATE\"} 1" "kip_image_pinned{name=\"multi\",image=\"$MULTI\"} 1"; do
  grep -qF "$want" "$KIP_WORK/metrics.txt" || { cat "$KIP_WORK/metrics.txt" >&2; fail "/metrics lacks '$want'"; }
done
grep -q '^kip_build_info{.*version="' "$KIP_WORK/metrics.txt" || fail "kip_build_info missing"
grep -q '^kip_runtime{runtime="containerd"' "$KIP_WORK/metrics.txt" || fail "kip_runtime missing"
grep -q '^# EOF$' "$KIP_WORK/metrics.txt" || fail "/metrics is not OpenMetrics (no # EOF)"

log "remove $MULTI (every record) with ctr: it must come back, pinned"
mapfile -t recs < <(records_of "$MULTI")
kctr images rm "${recs[@]}" >/dev/null
ref_present "$MULTI" && fail "ctr images rm did not remove $MULTI"
wait_for 30 "$MULTI to be pulled again" ref_present "$MULTI"
wait_for 10 "$MULTI to be pinned again" is_pinned_by_kip "$MULTI"
wait_for 10 "kip_image_repulls_total for multi" metric_is "kip_image_repulls_total{name=\"multi\",image=\"$MULTI\"}" 1
wait_for 10 "kip_images_cached back to 5" metric_is kip_images_cached 5

log "strip the pin label from every record of $SCRATCH by hand: kip puts it back"
mapfile -t recs < <(records_of "$SCRATCH")
for rec in "${recs[@]}"; do kctr images label "$rec" io.cri-containerd.pinned= >/dev/null; done
wait_for 10 "$SCRATCH to be pinned again" is_pinned_by_kip "$SCRATCH"
if cri_reports_pins; then wait_for 10 "CRI to report $SCRATCH pinned again" cri_pinned "$SCRATCH"; fi

log "runtime restart is not fatal"
stop_containerd
wait_for 20 "kip_cri_up 0" metric_is kip_cri_up 0
[ "$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT/readyz")" = 503 ] || fail "/readyz not 503 while the runtime is down"
kill -0 "$AGENT_PID" || fail "agent died when the runtime went away"
run_containerd
wait_for 60 "kip_cri_up 1 after restart" metric_is kip_cri_up 1
wait_for 10 "/readyz 200 after restart" curl -sf "http://127.0.0.1:$PORT/readyz"

log "SIGTERM stops the agent cleanly"
kill -TERM "$AGENT_PID"
wait "$AGENT_PID" || fail "agent exited non-zero on SIGTERM"

log "drop scratch and other from the list: kip removes its own pin only"
start_agent "multi=$MULTI; bydigest=$BYDIGEST; private=$PRIVATE"
not_pinned_by_kip() { ref_present "$1" && ! is_pinned_by_kip "$1"; }
wait_for 30 "$SCRATCH to lose kip's pin" not_pinned_by_kip "$SCRATCH"
ref_present "$SCRATCH" || fail "unlisted $SCRATCH was deleted without --remove-unlisted"
[[ $(ref_labels "$OTHER") == *io.cri-containerd.pinned=pinned* ]] || { kctr images ls >&2; grep -i other "$KIP_WORK/agent.log" | tail -5 >&2; fail "kip removed the admin's pin on $OTHER"; }
# bydigest has the same content (same image ID) as scratch: its own records stay pinned.
is_pinned_by_kip "$BYDIGEST" || fail "$BYDIGEST of a still-listed image was unpinned"
has_label "$SCRATCH" "$ADMIN_LABEL" || fail "kip's unpin removed the admin's label on $SCRATCH: $(ref_labels "$SCRATCH")"
if cri_reports_pins; then [ "$(cri_pin "$OTHER")" = pinned ] || fail "CRI no longer reports the admin's pin on $OTHER"; fi
id_record=$(records_of "$BYDIGEST" | grep '^sha256:')
is_pinned_by_kip "$id_record" || fail "image ID record $id_record shared with a listed image was unpinned"
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || fail "agent exited non-zero on SIGTERM"

log "--remove-unlisted: an image kip pinned that left the list is deleted, unless it has a name kip does not own"
# An admin's name for multi's content (as \`ctr images tag\` makes it): multi leaves the list with
# private, but only private (named by kip alone) may go; multi stays under both names.
KEEP=docker.io/admin/keep:1
kctr images tag "$MULTI" "$KEEP" >/dev/null
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "bydigest=$BYDIGEST" --remove-unlisted \
  --listen "127.0.0.1:$PORT" --check-interval 1s >> "$KIP_WORK/agent.log" 2>&1 &
AGENT_PID=$!
KIP_PIDS+=("$AGENT_PID")
absent() { local refs; refs=$(kctr images ls -q) && ! has_line "$refs" "$1"; }
wait_for 30 "$PRIVATE to be removed" absent "$PRIVATE"
not_kips() { ! is_pinned_by_kip "$1"; }
wait_for 30 "$MULTI to lose kip's pin" not_kips "$MULTI"
ref_present "$KEEP" || { kctr images ls >&2; fail "--remove-unlisted deleted the admin's $KEEP (the same content as kip's $MULTI)"; }
ref_present "$MULTI" || fail "--remove-unlisted deleted $MULTI although the admin's $KEEP names its content"
agent_log=$(cat "$KIP_WORK/agent.log")
has_match "$agent_log" "not removed: it is not only kip's" || fail "the agent did not say why $MULTI stayed"
ref_present "$BYDIGEST" || fail "--remove-unlisted removed a listed image"
ref_present "$OTHER" || fail "--remove-unlisted removed an image kip never pinned"
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" || fail "agent exited non-zero on SIGTERM"

log "a wrong password: clear error naming the image, no secret anywhere"
BAD="$KIP_WORK/bad-secrets"
write_pull_secret "$BAD" regcred "$PRIV" kip 'Wr0ng-pa55-xyzzy'
BAD_B64=$(printf 'kip:Wr0ng-pa55-xyzzy' | base64 -w0)
PRIVATE2="$PRIV/kip-e2e/private:2"
set +e
"$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "private2=$PRIVATE2" --pull-secrets-dir "$BAD" --once --log-format json \
  > "$KIP_WORK/bad.out" 2> "$KIP_WORK/bad.err"
rc=$?
set -e
cat "$KIP_WORK/bad.out"; grep 'error:' "$KIP_WORK/bad.err" || true
[ "$rc" -ne 0 ] || fail "--once exited 0 with a wrong password"
grep -q "error: image \`private2\` ($PRIVATE2):.*PullImage" "$KIP_WORK/bad.err" || fail "error does not name the image"
grep -qi "401\|unauthorized" "$KIP_WORK/bad.err" || fail "error does not say why (401 Unauthorized)"
grep -q "^0 of 1 images cached and pinned" "$KIP_WORK/bad.out" || fail "summary does not report the failure"
for f in "$KIP_WORK"/*.out "$KIP_WORK"/*.err "$KIP_WORK"/agent.log "$KIP_WORK"/metrics.txt; do
  if grep -qF -e 'Wr0ng-pa55-xyzzy' -e "$BAD_B64" -e 'right-Pa55word' "$f"; then fail "a secret leaked into $f"; fi
done

log "bad input: malformed IMAGES and an unreachable socket"
set +e
out=$("$AGENT" --cri-socket "$CONTAINERD_SOCK" --images "ok=$MULTI;broken" --once 2>&1); rc=$?
set -e
if [ "$rc" -eq 0 ] || [[ $out != *"IMAGES entry 2 \`broken\`: expected \`name=image\`"* ]]; then fail "malformed IMAGES: rc=$rc $out"; fi
set +e
out=$("$AGENT" --cri-socket "$KIP_WORK/nothing.sock" --images "ok=$MULTI" --once 2>&1); rc=$?
set -e
if [ "$rc" -eq 0 ] || [[ $out != *"CRI socket $KIP_WORK/nothing.sock does not answer Version"* ]]; then fail "unreachable socket: rc=$rc $out"; fi

log "containerd is alive at the end"
kill -0 "$CONTAINERD_PID" 2>/dev/null || { tail -20 "$(dirname "$CONTAINERD_CONFIG")/log" >&2; fail "containerd died"; }
kctr version >/dev/null || fail "containerd does not answer"
if grep -q "panic:" "$(dirname "$CONTAINERD_CONFIG")/log"; then fail "containerd logged a panic"; fi

log "node e2e passed (containerd ${KIP_CONTAINERD:-system})"
