#!/usr/bin/env bash
# Shared pieces of the node end-to-end test and the local demo: a throwaway containerd with
# its own root, state and socket, registries on 127.0.0.1, and test images built with umoci.
# Everything started here is recorded in KIP_PIDS and stopped by kip_cleanup.
# Source it; it needs root (containerd unpacks layers with real ownership).

KIP_PIDS=()
KIP_WORK=""

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }
fail() { printf '\033[31mFAIL: %s\033[0m\n' "$*" >&2; exit 1; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# kip_workdir: a fresh temp dir for everything this run creates.
# kip_binaries: AGENT and COORD (debug builds unless KIP_AGENT_BIN / KIP_COORDINATOR_BIN say
# otherwise) exist, and this runs as root (containerd needs it).
kip_binaries() {
  AGENT=${KIP_AGENT_BIN:-target/debug/kip-agent}
  COORD=${KIP_COORDINATOR_BIN:-target/debug/kip-coordinator}
  local b
  for b in "$AGENT" "$COORD"; do [ -x "$b" ] || fail "$b not built (cargo build --workspace)"; done
  [ "$(id -u)" = 0 ] || fail "run as root: containerd needs it"
}

kip_workdir() {
  KIP_WORK=$(mktemp -d "${TMPDIR:-/tmp}/kip-e2e.XXXXXX")
  export KIP_WORK
}

kip_cleanup() {
  local pid
  for pid in "${KIP_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${KIP_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ -n "$KIP_WORK" ] && [ -d "$KIP_WORK" ]; then
    # containerd may leave snapshot mounts behind when killed mid-unpack.
    grep -o " ${KIP_WORK}[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    if [ -n "${KIP_KEEP_WORKDIR:-}" ]; then log "kept $KIP_WORK"; else rm -rf "$KIP_WORK"; fi
  fi
}

# Checks match captured text, never `producer | grep -q`: under pipefail, grep's exit at the
# first match kills the producer with SIGPIPE and the pipeline fails although the text was there.
has_line() { # has_line TEXT LINE: LINE is one whole line of TEXT
  [[ $'\n'$1$'\n' == *$'\n'"$2"$'\n'* ]]
}
has_match() { # has_match TEXT ERE: a line of TEXT matches the extended regular expression
  grep -qE -- "$2" <<<"$1" # a here-string is written in full before grep starts: no SIGPIPE
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local secs=$1 what=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}

# start_registry VAR NAME [HTPASSWD_USER HTPASSWD_PASSWORD]: sets VAR to 127.0.0.1:PORT.
# (Not a command substitution: the registry's PID must be recorded in this shell.)
# KIP_REGISTRY_REQUEST_LOG=1: every request is logged as a JSON line to $KIP_WORK/registry-NAME/log
# (method, URI, user agent, completion time, duration) for tests/e2e/registry-log.py.
start_registry() {
  local var=$1 name=$2 user=${3:-} pass=${4:-} port dir level=warn
  [ -z "${KIP_REGISTRY_REQUEST_LOG:-}" ] || level=info
  port=$(free_port)
  dir="$KIP_WORK/registry-$name"
  mkdir -p "$dir/data"
  cat > "$dir/config.yml" <<YML
version: 0.1
log:
  level: $level
  formatter: json
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
YML
  if [ -n "$user" ]; then
    htpasswd -Bbn "$user" "$pass" > "$dir/htpasswd"
    cat >> "$dir/config.yml" <<YML
auth:
  htpasswd:
    realm: kip-e2e
    path: $dir/htpasswd
YML
  fi
  docker-registry serve "$dir/config.yml" > "$dir/log" 2>&1 &
  KIP_PIDS+=($!)
  wait_for 20 "registry $name on port $port" curl -s -o /dev/null "http://127.0.0.1:$port/v2/"
  printf -v "$var" '%s' "127.0.0.1:$port"
}

# The containerd to run: KIP_CONTAINERD=system (Debian bookworm's 1.6, the default), trixie (1.7.x)
# or sid (2.x), the latter two unpacked by tests/install-deps.sh beside the system package.
KIP_TOOLS=${KIP_TOOLS_DIR:-/opt/kip-tools}
containerd_bin_dir() {
  case ${KIP_CONTAINERD:-system} in
    system) echo /usr/bin ;;
    trixie | sid) echo "$KIP_TOOLS/containerd-$KIP_CONTAINERD/usr/bin" ;;
    *) fail "KIP_CONTAINERD=$KIP_CONTAINERD: expected system, trixie or sid" ;;
  esac
}
# containerd_major: 1 or 2, from `containerd --version` of the selected build.
containerd_major() {
  local v; v=$("$(containerd_bin_dir)/containerd" --version) || fail "no containerd in $(containerd_bin_dir)"
  [[ $v =~ \ v?([0-9]+)\.[0-9]+ ]] || fail "cannot read containerd's version from: $v"
  echo "${BASH_REMATCH[1]}"
}

# cri_reports_pins: true when the selected containerd reports pins through CRI `Image.pinned`
# (1.6.22, 1.7.3, 2.0 and later); Debian bookworm's 1.6.20 stores the label but says nothing.
cri_reports_pins() {
  local v; v=$("$(containerd_bin_dir)/containerd" --version)
  [[ $v =~ \ v?([0-9]+)\.([0-9]+)\.([0-9]+) ]] || return 1
  local major=${BASH_REMATCH[1]} minor=${BASH_REMATCH[2]} patch=${BASH_REMATCH[3]}
  ((major > 1 || minor > 7 || (minor == 7 && patch >= 3) || (minor == 6 && patch >= 22)))
}

# start_containerd REGISTRY... -> sets CONTAINERD_SOCK; plain-HTTP hosts.toml for each registry.
# CONTAINERD_NAME (default "containerd") names its directory, for several on one machine.
start_containerd() {
  local dir="$KIP_WORK/${CONTAINERD_NAME:-containerd}" reg
  mkdir -p "$dir/certs.d" "$dir/run"
  for reg in "$@"; do
    mkdir -p "$dir/certs.d/$reg"
    cat > "$dir/certs.d/$reg/hosts.toml" <<TOML
server = "http://$reg"
[host."http://$reg"]
  capabilities = ["pull", "resolve"]
TOML
  done
  local major; major=$(containerd_major)
  cat > "$dir/config.toml" <<TOML
version = $((major >= 2 ? 3 : 2))
root = "$dir/root"
state = "$dir/state"
[grpc]
  address = "$dir/containerd.sock"
[ttrpc]
  address = "$dir/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
TOML
  if [ "$major" -ge 2 ]; then
    cat >> "$dir/config.toml" <<TOML
[plugins.'io.containerd.internal.v1.opt']
  path = "$dir/opt"
[plugins.'io.containerd.grpc.v1.cri']
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
[plugins.'io.containerd.cri.v1.runtime'.cni]
  bin_dirs = ["$dir/cni/bin"]
  conf_dir = "$dir/cni/conf"
[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = "$dir/certs.d"
TOML
  else
    cat >> "$dir/config.toml" <<TOML
[plugins."io.containerd.internal.v1.opt"]
  path = "$dir/opt"
[plugins."io.containerd.grpc.v1.cri"]
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$dir/cni/bin"
    conf_dir = "$dir/cni/conf"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$dir/certs.d"
TOML
  fi
  CONTAINERD_SOCK="$dir/containerd.sock"
  CONTAINERD_CONFIG="$dir/config.toml"
  export CONTAINERD_SOCK CONTAINERD_CONFIG
  run_containerd
}

# Each containerd runs in a mount namespace of its own with a private /run (containerd >= 1.7
# writes under /run), its version's directory first in PATH (shims, runc).
run_containerd() {
  local dir bin
  dir=$(dirname "$CONTAINERD_CONFIG"); bin=$(containerd_bin_dir)
  # shellcheck disable=SC2016 # expanded by the inner shell
  PATH="$bin:${bin%/bin}/sbin:$PATH" unshare --mount --propagation private \
    sh -c 'mount --bind "$1/run" /run && exec containerd --config "$1/config.toml"' _ "$dir" >> "$dir/log" 2>&1 &
  CONTAINERD_PID=$!
  KIP_PIDS+=("$CONTAINERD_PID")
  wait_for 30 "containerd on $CONTAINERD_SOCK" "$bin/ctr" --address "$CONTAINERD_SOCK" version
}

stop_containerd() {
  kill "$CONTAINERD_PID"
  for _ in $(seq 100); do kill -0 "$CONTAINERD_PID" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$CONTAINERD_PID" 2>/dev/null || true
}

kctr() { "$(containerd_bin_dir)/ctr" --address "$CONTAINERD_SOCK" -n k8s.io "$@"; }
# kctr_run ARGS...: `ctr run` with its IO FIFOs beside containerd's files: the default
# (/run/containerd/fifo) is not the same directory inside containerd's private /run.
kctr_run() { kctr run --fifo-dir "$(dirname "$CONTAINERD_CONFIG")/fifo" "$@"; }
# ref_present REF: containerd (CONTAINERD_SOCK) has an image record named REF.
ref_present() { local refs; refs=$(kctr images ls -q) && has_line "$refs" "$1"; }

# build_image LAYOUT TAG FILE_SPEC... : one layer per FILE_SPEC ("path=content" pairs, comma-separated).
build_image() {
  local layout=$1 tag=$2; shift 2
  [ -d "$layout" ] || umoci init --layout "$layout"
  umoci new --image "$layout:$tag"
  local spec bundle pair
  for spec in "$@"; do
    bundle=$(mktemp -d "$KIP_WORK/bundle.XXXXXX")
    rmdir "$bundle"
    umoci unpack --image "$layout:$tag" "$bundle" >/dev/null
    IFS=',' read -r -a pairs <<< "$spec"
    for pair in "${pairs[@]}"; do
      mkdir -p "$(dirname "$bundle/rootfs/${pair%%=*}")"
      printf '%s\n' "${pair#*=}" > "$bundle/rootfs/${pair%%=*}"
    done
    umoci repack --image "$layout:$tag" "$bundle" >/dev/null
    rm -rf "$bundle"
  done
  umoci config --image "$layout:$tag" --config.cmd /bin/true >/dev/null
}

# push_image LAYOUT TAG DEST [CREDS] -> prints the pushed manifest digest
push_image() {
  local layout=$1 tag=$2 dest=$3 creds=${4:-} digestfile
  digestfile=$(mktemp "$KIP_WORK/digest.XXXXXX")
  skopeo copy --quiet --dest-tls-verify=false ${creds:+--dest-creds "$creds"} --digestfile "$digestfile" \
    "oci:$layout:$tag" "docker://$dest" >&2
  cat "$digestfile"
}

# write_pull_secret DIR SECRET_NAME REGISTRY USER PASSWORD: as Kubernetes mounts a dockerconfigjson secret.
write_pull_secret() {
  local dir=$1/$2
  mkdir -p "$dir"
  local auth
  auth=$(printf '%s:%s' "$4" "$5" | base64 -w0)
  printf '{"auths":{"%s":{"auth":"%s"}}}\n' "$3" "$auth" > "$dir/.dockerconfigjson"
}

# write_configmap DIR KEY=VALUE...: lays DIR out as kubelet mounts a ConfigMap (KEY -> ..data/KEY,
# ..data -> ..<timestamp>) and swaps ..data atomically, as kubelet does on an update.
write_configmap() {
  local dir=$1; shift
  mkdir -p "$dir"
  local ts; ts="..$(date +%Y_%m_%d_%H_%M_%S.%N)"
  mkdir "$dir/$ts"
  local kv
  for kv in "$@"; do
    printf '%s' "${kv#*=}" > "$dir/$ts/${kv%%=*}"
    [ -L "$dir/${kv%%=*}" ] || ln -s "..data/${kv%%=*}" "$dir/${kv%%=*}"
  done
  local old; old=$(readlink "$dir/..data" 2>/dev/null || true)
  ln -s "$ts" "$dir/..data_tmp"
  mv -T "$dir/..data_tmp" "$dir/..data"
  [ -z "$old" ] || rm -rf "${dir:?}/$old"
}

# json_check URL PYTHON_EXPR: true when the expression holds for the JSON document `d` at URL.
# The images of node N's containerd (the caller's SOCK[N] is its socket), as kip leaves them.
kctr_on() { local n=$1; shift; "$(containerd_bin_dir)/ctr" --address "${SOCK[$n]}" -n k8s.io "$@"; }
labels_on() { local ls; ls=$(kctr_on "$1" images ls) && awk -v r="$2" '$1 == r { print $NF }' <<<"$ls"; }
pinned_by_kip_on() { [[ ",$(labels_on "$1" "$2")," == *",kip.eclipse.dev/pinned-by=kip,"* && ",$(labels_on "$1" "$2")," == *",io.cri-containerd.pinned=pinned,"* ]]; }
present_on() { local refs; refs=$(kctr_on "$1" images ls -q) && has_line "$refs" "$2"; }
not_pinned_by_kip_on() { present_on "$1" "$2" && ! pinned_by_kip_on "$1" "$2"; }

json_check() {
  curl -sf "$1" | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if ($2) else 1)"
}
