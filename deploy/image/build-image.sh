#!/usr/bin/env bash
# Builds kip's image without a Docker engine, the same layout as deploy/image/Dockerfile: the static
# binaries in /usr/local/bin of an empty (FROM scratch) image, user 65532, entrypoint the
# coordinator. Result: an OCI layout at target/image/oci, tag $1 (default "dev").
# Push it with: skopeo copy oci:target/image/oci:TAG docker://REGISTRY/kip:TAG
set -euo pipefail
cd "$(dirname "$0")/../.."
TAG=${1:-dev}
deploy/image/build-static.sh >/dev/null
OCI=target/image/oci
mkdir -p target/image
[ -d "$OCI" ] || umoci init --layout "$OCI"
umoci new --image "$OCI:$TAG"
BUNDLE=$(mktemp -d target/image/bundle.XXXXXX)
rmdir "$BUNDLE"
umoci unpack --image "$OCI:$TAG" "$BUNDLE" >/dev/null
mkdir -p "$BUNDLE/rootfs/usr/local/bin"
install -m 0755 target/static/kip-agent target/static/kip-coordinator target/static/kip-sleep "$BUNDLE/rootfs/usr/local/bin/"
# The CA bundle the coordinator verifies registries with (its tag HEADs go over HTTPS).
install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$BUNDLE/rootfs/etc/ssl/certs/ca-certificates.crt"
umoci repack --image "$OCI:$TAG" "$BUNDLE" >/dev/null
rm -rf "$BUNDLE"
umoci config --image "$OCI:$TAG" --config.user 65532:65532 \
  --config.entrypoint /usr/local/bin/kip-coordinator \
  --config.label org.opencontainers.image.title=kip \
  --config.label org.opencontainers.image.source=deploy/image/Dockerfile >/dev/null
umoci gc --layout "$OCI"
echo "$OCI:$TAG"
