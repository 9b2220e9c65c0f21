#!/usr/bin/env bash
# Checks every manifest kip generates or ships: `helm lint` and `helm template` of the chart with
# several values files (defaults, a KIP user's values file unchanged, every feature on, cri mode),
# the OpenShift templates with their parameters substituted, and the fallback DaemonSets the
# coordinator generates; each document through `kubernetes-validate --strict` for several
# Kubernetes versions, and each rendered ConfigMap through `kip-coordinator --check-config`.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=${KIP_TOOLS_DIR:-/opt/kip-tools}
KV="$TOOLS/venv/bin/kubernetes-validate"
HELM="$TOOLS/helm/helm"
PY="$TOOLS/venv/bin/python"
COORD=${KIP_COORDINATOR_BIN:-target/debug/kip-coordinator}
for t in "$KV" "$HELM" "$COORD"; do [ -x "$t" ] || { echo "validate-manifests: $t missing (tests/install-deps.sh, cargo build)" >&2; exit 1; }; done
read -r -a VERSIONS <<< "${KIP_K8S_VERSIONS:-1.30.0 1.31.0 1.32.0 1.33.0 1.34.0 1.35.0}"
WORK=$(mktemp -d); trap 'rm -rf "$WORK"' EXIT

validate() { # validate FILE...: every resource, every version; CRD kinds are checked by check_monitors
  local v out
  for v in "${VERSIONS[@]}"; do
    if ! out=$("$KV" --strict -k "$v" "$@" 2>&1); then
      echo "$out" >&2
      echo "validate-manifests: $* invalid for Kubernetes $v" >&2
      return 1
    fi
    if grep -v "monitoring.coreos.com" <<<"$out" | grep "WARN" >/dev/null; then # not -q: no SIGPIPE
      echo "$out" >&2
      echo "validate-manifests: $* has a resource without a schema" >&2
      return 1
    fi
  done
}

# The check must be able to fail: a DaemonSet with an unknown field is refused.
sed 's/terminationGracePeriodSeconds:/terminationGracePeriodSecond:/' coordinator/tests/golden/daemonset-mode.yaml > "$WORK/bad.yaml"
if "$KV" --strict -k "${VERSIONS[0]}" "$WORK/bad.yaml" >/dev/null 2>&1; then
  echo "validate-manifests: kubernetes-validate accepted an unknown field; the check proves nothing" >&2
  exit 1
fi

# check_configmap RENDERED.yaml: the ConfigMap the chart renders is one the coordinator accepts.
check_configmap() {
  local dir
  dir="$WORK/cm-$(basename "$1" .yaml)"
  mkdir -p "$dir"
  "$PY" - "$1" "$dir" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
hook = lambda d: "helm.sh/hook" in (d["metadata"].get("annotations") or {})
cms = [d for d in docs if d["kind"] == "ConfigMap" and not hook(d)]
assert len(cms) == 1, f"expected one ConfigMap, found {len(cms)}"
for key, value in cms[0]["data"].items():
    open(f"{sys.argv[2]}/{key}", "w").write(value)
PY
  "$COORD" --check-config --config-dir "$dir"
}

# check_monitors RENDERED.yaml: ServiceMonitor/PodMonitor select what the chart labels.
check_monitors() {
  "$PY" - "$1" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
by_kind = {}
for d in docs:
    by_kind.setdefault(d["kind"], []).append(d)
def subset(sel, labels): return all(labels.get(k) == v for k, v in sel.items())
for sm in by_kind.get("ServiceMonitor", []):
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    svcs = [s for s in by_kind["Service"] if subset(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(svcs) == 1, "ServiceMonitor must select the coordinator Service"
    ports = {p["name"] for p in svcs[0]["spec"]["ports"]}
    assert all(e["port"] in ports for e in sm["spec"]["endpoints"]), "ServiceMonitor port not on the Service"
for pm in by_kind.get("PodMonitor", []):
    ds = [d for d in by_kind["DaemonSet"] if subset(pm["spec"]["selector"]["matchLabels"], d["spec"]["template"]["metadata"]["labels"])]
    assert len(ds) == 1, "PodMonitor must select the agent pods"
    ports = {p["name"] for c in ds[0]["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
    assert all(e["port"] in ports for e in pm["spec"]["podMetricsEndpoints"]), "PodMonitor port not on the pods"
print(f"monitors ok: {len(by_kind.get('ServiceMonitor', []))} ServiceMonitor, {len(by_kind.get('PodMonitor', []))} PodMonitor")
PY
}

# check_agent RENDERED.yaml SOCKET CRIO_PINNING: the agent's runtime wiring. SOCKET empty means
# autodetection (the runtimes' socket directories read-only, never the node's whole /run).
check_agent() {
  "$PY" - "$@" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
socket, crio = sys.argv[2], sys.argv[3] == "true"
ds = [d for d in docs if d["kind"] == "DaemonSet" and d["metadata"]["name"].endswith("-agent")]
assert len(ds) == 1, "one agent DaemonSet"
pod = ds[0]["spec"]["template"]["spec"]
(c,) = pod["containers"]
env = {e["name"]: e.get("value") for e in c["env"]}
mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
vols = {v["name"]: v for v in pod["volumes"]}
host = {mounts[p]["name"]: vols[mounts[p]["name"]]["hostPath"] for p in mounts if "hostPath" in vols[mounts[p]["name"]]}
if socket:
    assert env.get("KIP_CRI_SOCKET") == socket and "KIP_HOST_PREFIX" not in env, env
    assert host["runtime-socket"] == {"path": socket.rsplit("/", 1)[0], "type": "Directory"}, host
else:
    assert env.get("KIP_HOST_PREFIX") == "/host" and "KIP_CRI_SOCKET" not in env, env
    # The runtimes' socket directories only, read-only; never the node's whole /run.
    dirs = {p[len("/host"):]: m for p, m in mounts.items() if p.startswith("/host/")}
    assert sorted(dirs) == ["/run/containerd", "/run/crio", "/run/k3s/containerd"], sorted(dirs)
    assert all(m.get("readOnly") is True for m in dirs.values()), dirs
    assert all(host[m["name"]] == {"path": d, "type": "DirectoryOrCreate"} for d, m in dirs.items()), host
    assert not any(h["path"] in ("/run", "/var/run", "/") for h in host.values()), host
assert pod.get("hostPID", False) == crio, "hostPID exactly when CRI-O pinning is on"
if crio:
    assert mounts["/etc/crio"]["readOnly"] is True and host["crio-config"]["type"] == "Directory"
    assert env["KIP_CRIO_CONFIG_DIR"] in mounts and not mounts[env["KIP_CRIO_CONFIG_DIR"]].get("readOnly")
else:
    assert "/etc/crio" not in mounts and "KIP_CRIO_CONFIG_DIR" not in env
assert c["securityContext"]["capabilities"]["drop"] == ["ALL"] and not c["securityContext"].get("privileged")
if len(sys.argv) > 4:  # the coordinator address, extra env and volume the values set
    assert env["KIP_COORDINATOR"] == sys.argv[4] and env["KIP_REFRESH_INTERVAL"] == "30m", env
    assert mounts["/etc/ssl/kip-registry-ca"]["name"] in vols
else:
    assert env["KIP_COORDINATOR"].endswith(".svc:50051"), env
print(f"agent wiring ok: socket {socket or 'autodetected in the runtime directories'}, CRI-O pinning {'on' if crio else 'off'}")
PY
}

# check_uninstall RENDERED.yaml: the pre-delete hook asks for a release the coordinator accepts,
# waits on the coordinator's own Service, and everything the coordinator needs to undo its work
# (RBAC, the Service) is an ordinary object, deleted only after the hooks have run.
check_uninstall() {
  "$PY" - "$1" "$WORK/release-cm" <<'PY'
import os, sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
ann = lambda d: d["metadata"].get("annotations") or {}
hooks = [d for d in docs if "helm.sh/hook" in ann(d)]
assert {d["kind"] for d in hooks} == {"ConfigMap", "Job"}, [d["kind"] for d in hooks]
for d in hooks:
    assert ann(d)["helm.sh/hook"] == "pre-delete", ann(d)
    assert "hook-succeeded" in ann(d)["helm.sh/hook-delete-policy"], "hook objects must not stay behind"
(cm,) = [d for d in hooks if d["kind"] == "ConfigMap"]
(job,) = [d for d in hooks if d["kind"] == "Job"]
assert int(ann(cm)["helm.sh/hook-weight"]) < int(ann(job)["helm.sh/hook-weight"]), "the ConfigMap comes before the Job"
main = [d for d in docs if d["kind"] == "ConfigMap" and d not in hooks][0]
assert cm["metadata"]["name"] == main["metadata"]["name"] + "-release"
assert cm["data"]["KIP_RELEASE"] in ("unpin", "remove"), cm["data"]
# The coordinator follows both ConfigMaps by name, with read-only RBAC for just those two.
(dep,) = [d for d in docs if d["kind"] == "Deployment"]
env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
assert env["KIP_CONFIG_MAP"] == main["metadata"]["name"], env
# The coordinator's own Role (Roles in the image sets' namespaces only read their pull secrets).
(role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == dep["metadata"]["name"]]
rule = [r for r in role["rules"] if "configmaps" in r["resources"]][0]
assert sorted(rule["resourceNames"]) == sorted([main["metadata"]["name"], cm["metadata"]["name"]]), rule
assert sorted(rule["verbs"]) == ["get", "list", "watch"], rule
# DaemonSets: the fallback one by name only (never the agent's), create apart (RBAC cannot name it).
ds_rules = [r for r in role["rules"] if "daemonsets" in r["resources"]]
named = [r for r in ds_rules if r.get("resourceNames")]
assert len(named) == 1 and named[0]["resourceNames"] == [main["data"]["DAEMONSET_NAME"]], ds_rules
# (Beyond create only with image sets' own fallbacks: check_set_fallbacks.)
set_fallbacks = env.get("KIP_IMAGE_SET_FALLBACK") == "true"
assert all(r["verbs"] == ["create"] or set_fallbacks for r in ds_rules if not r.get("resourceNames")), ds_rules
agent_ds = [d["metadata"]["name"] for d in docs if d["kind"] == "DaemonSet"]
assert main["data"]["DAEMONSET_NAME"] not in agent_ds, "the coordinator may not touch the agent DaemonSet"
(cr,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"].endswith("-nodes")]
assert cr["rules"][0] == {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "patch"]}, cr["rules"]
# Image sets: the coordinator reads them and writes their status only; who may create one is
# `admin` (aggregated), never `edit`; `view` may read them.
aggregated = {l: r for r in docs if r["kind"] == "ClusterRole"
              for l, v in r["metadata"]["labels"].items() if l.startswith("rbac.authorization.k8s.io/aggregate-to-") and v == "true"}
sets_rules = [r for r in cr["rules"] if "kip.eclipse.dev" in r["apiGroups"]]
if sets_rules:
    assert {tuple(r["resources"]): sorted(r["verbs"]) for r in sets_rules} == {("imagesets",): ["get", "list", "watch"], ("imagesets/status",): ["patch", "update"]}, sets_rules
    # The KIP operator's resources, where followed, are read only.
    assert all(sorted(r["verbs"]) == ["get", "list", "watch"] for r in cr["rules"] if "che.eclipse.org" in r["apiGroups"]), cr["rules"]
    assert set(aggregated) == {"rbac.authorization.k8s.io/aggregate-to-admin", "rbac.authorization.k8s.io/aggregate-to-view"}, aggregated
    assert "create" in aggregated["rbac.authorization.k8s.io/aggregate-to-admin"]["rules"][0]["verbs"]
    assert all(v in ("get", "list", "watch") for r in aggregated["rbac.authorization.k8s.io/aggregate-to-view"]["rules"] for v in r["verbs"])
else:
    assert not aggregated, "image sets off: no role for them"
assert not any("helm.sh/hook" in ann(d) for d in docs if d["kind"] in ("Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding", "Service", "Deployment"))
# The Job reads /status from the coordinator's Service on its metrics port.
(svc,) = [d for d in docs if d["kind"] == "Service"]
cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
assert cmd[:2] == ["/usr/local/bin/kip-coordinator", "wait-release"], cmd
url = cmd[cmd.index("--status-url") + 1]
ns = svc["metadata"]["namespace"]
assert url == f"http://{svc['metadata']['name']}.{ns}.svc:8080/status", url
assert any(p["port"] == 8080 for p in svc["spec"]["ports"])
assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
os.makedirs(sys.argv[2], exist_ok=True)
for key, value in {**main["data"], **cm["data"]}.items():
    open(f"{sys.argv[2]}/{key}", "w").write(value)
print(f"uninstall hook ok: KIP_RELEASE={cm['data']['KIP_RELEASE']}, waits on {url}")
PY
  "$COORD" --check-config --config-dir "$WORK/release-cm"
  rm -rf "$WORK/release-cm"
}

# check_access RENDERED.yaml: agent authentication and the startup gate are wired end to end —
# the coordinator names the agents' ServiceAccount, the agent sends a projected token for
# audience kip, RBAC grants exactly what they need, the agent tolerates the gate, and the
# NetworkPolicy (when on) admits the agent pods to gRPC. Prints the gate taint for --check-config.
# With `any-toleration` the agent may tolerate the gate through a catch-all toleration.
check_access() {
  "$PY" - "$@" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
own_toleration = sys.argv[2:] != ["any-toleration"]  # the chart adds its own; OpenShift's agent tolerates all
kind = lambda k: [d for d in docs if d["kind"] == k]
(dep,) = kind("Deployment")
env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
ns = dep["metadata"]["namespace"]
(agent,) = [d for d in kind("DaemonSet") if d["metadata"]["name"].endswith("-agent")]
pod = agent["spec"]["template"]["spec"]
(c,) = pod["containers"]
aenv = {e["name"]: e.get("value") for e in c["env"]}
(cr,) = [r for r in kind("ClusterRole") if not any(l.startswith("rbac.authorization.k8s.io/aggregate-to-") for l in r["metadata"].get("labels", {}))]
(role,) = [r for r in kind("Role") if r["metadata"]["name"] == dep["metadata"]["name"]]
reviews = [r for r in cr["rules"] if "tokenreviews" in r["resources"]]
assert [r for r in role["rules"] if "pods" in r["resources"]] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}]
assert env["KIP_AGENT_AUTH"] in ("tokenreview", "none"), env
if env["KIP_AGENT_AUTH"] == "tokenreview":
    assert env["KIP_AGENT_SERVICE_ACCOUNT"] == f"{ns}:{pod['serviceAccountName']}", env
    assert pod["serviceAccountName"] in [s["metadata"]["name"] for s in kind("ServiceAccount")]
    assert reviews == [{"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]}], cr["rules"]
    mount = [m for m in c["volumeMounts"] if aenv["KIP_TOKEN_FILE"].startswith(m["mountPath"] + "/")][0]
    (vol,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    (src,) = vol["projected"]["sources"]
    tok = src["serviceAccountToken"]
    assert tok["audience"] == "kip" and 600 <= tok["expirationSeconds"] <= 3600, tok
    assert aenv["KIP_TOKEN_FILE"] == mount["mountPath"] + "/" + tok["path"] and mount["readOnly"] is True
else:
    assert not reviews and "KIP_TOKEN_FILE" not in aenv, (cr["rules"], aenv)
# The coordinator's tag HEADs use the credentials the agents pull with.
def secret_mounts(spec, container):
    vols = {v["name"]: v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
    return sorted((vols[m["name"]], m["mountPath"]) for m in container.get("volumeMounts", []) if m["name"] in vols)
dpod = dep["spec"]["template"]["spec"]
# (The copy of the image sets' pull secrets is the agents' alone: the coordinator reads the sets'
# Secrets through the API.)
agent_mounts = [m for m in secret_mounts(pod, c) if m[1] != aenv.get("KIP_SET_PULL_SECRETS_DIR")]
assert secret_mounts(dpod, dpod["containers"][0]) == agent_mounts, "the coordinator mounts the agents' pull secrets"
assert env.get("KIP_PULL_SECRETS_DIR") == aenv.get("KIP_PULL_SECRETS_DIR"), (env, aenv)
assert env.get("KIP_RESOLVE_TAGS", "true") in ("true", "false"), env
gate = env["KIP_GATE_TAINT"]
if gate:
    key, effect = gate.split("=")[0].split(":")[0], gate.rsplit(":", 1)[1]
    tol = pod.get("tolerations", [])
    assert any(t.get("operator") == "Exists" and t.get("key") in (None, key) and t.get("effect") in (None, effect) for t in tol), tol
    if own_toleration:
        assert {"key": key, "operator": "Exists", "effect": effect} in tol, "the gate toleration stays when agent.tolerations is changed"
    # The coordinator opens the gates: on a pool where every node is gated it must still run,
    # and so must the uninstall Job that waits for it.
    for what, spec in [("coordinator", dep["spec"]["template"]["spec"])] + [
            ("uninstall Job", j["spec"]["template"]["spec"]) for j in kind("Job")]:
        ctol = spec.get("tolerations", [])
        assert any(t.get("operator") == "Exists" and t.get("key") == key and t.get("effect") in (None, effect) for t in ctol), (what, ctol)
for np in kind("NetworkPolicy"):
    sel = np["spec"]["podSelector"]["matchLabels"]
    assert all(dep["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel.items()), "selects the coordinator"
    (grpc,) = [r for r in np["spec"]["ingress"] if any(p["port"] == 50051 for p in r["ports"])]
    (peer,) = grpc["from"]
    labels = agent["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in peer["podSelector"]["matchLabels"].items()), "admits the agent pods"
    assert any(p["port"] == 8080 for r in np["spec"]["ingress"] for p in r["ports"]), "metrics and the hook stay reachable"
print(gate)
PY
}

# check_leader RENDERED.yaml: the coordinator takes part in the leader election; with more than
# one replica the Service has no selector and the leader may publish its EndpointSlice, with one
# the Service selects the coordinator pod.
check_leader() {
  "$PY" - "$1" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kind = lambda k: [d for d in docs if d["kind"] == k]
(dep,) = [d for d in kind("Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
(svc,) = [s for s in kind("Service") if s["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
(c,) = dep["spec"]["template"]["spec"]["containers"]
env = {e["name"]: e for e in c["env"]}
name = dep["metadata"]["name"]
assert env["KIP_LEADER_LEASE"]["value"] == name, env["KIP_LEADER_LEASE"]
rules = [r for role in kind("Role") if role["metadata"]["name"] == name for r in role["rules"]]
def allowed(group, resource, verb, object_name=None):
    return any(group in r["apiGroups"] and resource in r["resources"] and verb in r["verbs"]
               and (object_name is None or "resourceNames" not in r or object_name in r["resourceNames"]) for r in rules)
assert allowed("coordination.k8s.io", "leases", "create") and allowed("coordination.k8s.io", "leases", "patch", name), rules
replicas = dep["spec"]["replicas"]
slice_name = svc["metadata"]["name"] + "-leader"
if replicas > 1:
    assert "selector" not in svc["spec"], "the Service sends agents to the leader only"
    assert env["KIP_LEADER_SERVICE"]["value"] == svc["metadata"]["name"], env
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", env
    assert allowed("discovery.k8s.io", "endpointslices", "patch", slice_name), rules
    ports = {p["name"] for p in c["ports"]}
    assert {p["name"] for p in svc["spec"]["ports"]} <= ports, "the leader's EndpointSlice names the Service's ports"
else:
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items()), "the Service selects the coordinator"
    assert "KIP_LEADER_SERVICE" not in env and not allowed("discovery.k8s.io", "endpointslices", "patch"), "no EndpointSlice with one replica"
print(f"leader election ok: {replicas} replica(s)", file=sys.stderr)
PY
}

# check_set_pull_secrets RENDERED.yaml: with image sets' pull secrets on, the coordinator is told
# its copy, may read and write that one Secret (rendered empty in the release namespace), reads
# the sets' Secrets with `get` only (a Role per allowed namespace, else cluster-wide), and the
# agent mounts the copy where it is told to look; off, no Secret is readable at all.
check_set_pull_secrets() {
  "$PY" - "$1" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
kind = lambda k: [d for d in docs if d["kind"] == k]
(dep,) = [d for d in kind("Deployment") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
pod = dep["spec"]["template"]["spec"]
env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
ns = dep["metadata"]["namespace"]
sa = pod["serviceAccountName"]
def secret_rules(role):
    return [r for r in role["rules"] if "" in r["apiGroups"] and "secrets" in r["resources"]]
bound = {(b["metadata"].get("namespace"), b["roleRef"]["name"]) for b in kind("RoleBinding") + kind("ClusterRoleBinding")
         if any(s["name"] == sa and s["namespace"] == ns for s in b["subjects"])}
readers = [r for role in kind("Role") + kind("ClusterRole") if (role["metadata"].get("namespace"), role["metadata"]["name"]) in bound
           for r in secret_rules(role)]
copy = env.get("KIP_SET_PULL_SECRETS")
if not copy:
    assert not readers, f"no Secret readable without sets' pull secrets: {readers}"
    print("set pull secrets: off, no Secret access", file=sys.stderr)
    sys.exit(0)
assert any(s["metadata"]["name"] == copy and s["metadata"]["namespace"] == ns and not s.get("data") for s in kind("Secret")), "the copy is rendered, empty"
own = [r for r in readers if r.get("resourceNames")]
assert own and all(r["resourceNames"] == [copy] and set(r["verbs"]) == {"get", "patch"} for r in own), own
wide = [r for r in readers if not r.get("resourceNames")]
assert wide and all(r["verbs"] == ["get"] for r in wide), f"the sets' Secrets: get only, never list or watch: {wide}"
allowed = [n for n in (env.get("KIP_IMAGE_SET_NAMESPACES") or "").split(",") if n]
cluster_wide = [r for role in kind("ClusterRole") for r in secret_rules(role) if (None, role["metadata"]["name"]) in bound]
if allowed:
    assert not cluster_wide, "with an allow-list, no cluster-wide Secret access"
    per_ns = {role["metadata"]["namespace"] for role in kind("Role") if secret_rules(role) and (role["metadata"]["namespace"], role["metadata"]["name"]) in bound and role["metadata"]["namespace"] != ns}
    assert per_ns == set(allowed), (per_ns, allowed)
else:
    assert cluster_wide == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}], cluster_wide
(ds,) = [d for d in kind("DaemonSet") if d["metadata"]["labels"].get("app.kubernetes.io/component") == "agent"]
agent = ds["spec"]["template"]["spec"]
(c,) = [c for c in agent["containers"]]
agent_env = {e["name"]: e.get("value") for e in c["env"]}
(vol,) = [v for v in agent["volumes"] if v.get("secret", {}).get("secretName") == copy]
assert vol["secret"].get("optional") is True, vol
(mount,) = [m for m in c["volumeMounts"] if m["name"] == vol["name"]]
assert mount["mountPath"] == agent_env["KIP_SET_PULL_SECRETS_DIR"] and mount.get("readOnly"), (mount, agent_env)
print(f"set pull secrets ok: copy {copy}, read {'in ' + ','.join(allowed) if allowed else 'cluster-wide'} (get only)", file=sys.stderr)
PY
}

# check_set_fallbacks RENDERED.yaml: image sets' own fallback DaemonSets come with DaemonSet
# rights beyond the one name only when the coordinator is told to make them, and never `update`.
check_set_fallbacks() {
  "$PY" - "$1" <<'PY'
import sys, yaml
docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
(dep,) = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["labels"].get("app.kubernetes.io/component") == "coordinator"]
env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
(role,) = [d for d in docs if d["kind"] == "Role" and d["metadata"]["name"] == dep["metadata"]["name"]]
ds_rules = [r for r in role["rules"] if "daemonsets" in r["resources"]]
unnamed = [r for r in ds_rules if "resourceNames" not in r and r["verbs"] != ["create"]]
on = env.get("KIP_IMAGE_SET_FALLBACK") == "true"
if on:
    assert unnamed == [{"apiGroups": ["apps"], "resources": ["daemonsets"], "verbs": ["get", "list", "watch", "patch", "delete"]}], unnamed
else:
    assert not unnamed, f"DaemonSet rights beyond the fallback's name without set fallbacks: {unnamed}"
print(f"set fallbacks {'on' if on else 'off'}: DaemonSet rights {'in the namespace' if on else 'by name only'}", file=sys.stderr)
PY
}

echo "==> helm chart" >&2
"$HELM" lint --strict deploy/helm >&2
for values in "" deploy/helm/ci/*.yaml; do
  name=$(basename "${values:-defaults}" .yaml)
  out="$WORK/helm-$name.yaml"
  "$HELM" lint --quiet deploy/helm ${values:+-f "$values"} >/dev/null
  "$HELM" template kip deploy/helm -n kip ${values:+-f "$values"} --api-versions monitoring.coreos.com/v1 \
    --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy > "$out"
  echo "helm template ($name): $(grep -c '^kind:' "$out") resources" >&2
  validate "$out"
  check_configmap "$out"
  check_monitors "$out"
  check_uninstall "$out"
  check_leader "$out"
  check_set_pull_secrets "$out"
  check_set_fallbacks "$out"
  gate=$(check_access "$out")
  "$PY" tests/admission-policy.py "$out" coordinator/tests/golden/*.yaml >&2
  KIP_GATE_TAINT="$gate" "$COORD" --check-config --config-dir "$WORK/cm-$(basename "$out" .yaml)" >/dev/null
  echo "access ok: agent auth and gate ${gate:-(none)}" >&2
  case $name in
    all-features-values) check_agent "$out" /run/k3s/containerd/containerd.sock true \
      http://kip-coordinator.platform.svc.cluster.local:50051 ;;
    *) check_agent "$out" "" false ;;
  esac
done
# Sets' pull secrets off: no Secret access at all; on with an allow-list of one namespace.
"$HELM" template kip deploy/helm -n kip --set imageSets.pullSecrets=false > "$WORK/no-set-secrets.yaml"
check_set_pull_secrets "$WORK/no-set-secrets.yaml"
"$HELM" template kip deploy/helm -n kip --set 'imageSets.namespaces={ml}' > "$WORK/set-secrets-ml.yaml"
check_set_pull_secrets "$WORK/set-secrets-ml.yaml"
"$HELM" template kip deploy/helm -n kip --set imageSets.fallback=false > "$WORK/no-set-fallbacks.yaml"
check_set_fallbacks "$WORK/no-set-fallbacks.yaml"
# Without the prometheus-operator CRDs no monitor is rendered, even when enabled.
"$HELM" template kip deploy/helm -n kip -f deploy/helm/ci/all-features-values.yaml > "$WORK/no-crd.yaml"
if grep -q 'kind: \(ServiceMonitor\|PodMonitor\)' "$WORK/no-crd.yaml"; then echo "monitors rendered without their CRDs" >&2; exit 1; fi
# Where the API has no ValidatingAdmissionPolicy (before 1.30), none is rendered; nor when disabled.
"$HELM" template kip deploy/helm -n kip > "$WORK/no-vap.yaml"
"$HELM" template kip deploy/helm -n kip --api-versions admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy \
  --set admissionPolicy.enabled=false >> "$WORK/no-vap.yaml"
if grep -q 'kind: ValidatingAdmissionPolicy' "$WORK/no-vap.yaml"; then echo "an admission policy rendered without the API or disabled" >&2; exit 1; fi
# uninstall.release=false renders no hook at all.
"$HELM" template kip deploy/helm -n kip --set uninstall.release=false > "$WORK/no-hook.yaml"
if grep -q 'helm.sh/hook' "$WORK/no-hook.yaml"; then echo "a hook rendered with uninstall.release=false" >&2; exit 1; fi
# values.schema.json rejects wrong types at install time.
if "$HELM" template kip deploy/helm --set agent.maxParallelPulls=lots >/dev/null 2>&1; then
  echo "values.schema.json accepted agent.maxParallelPulls=lots" >&2; exit 1
fi
if "$HELM" template kip deploy/helm --set mode=sometimes >/dev/null 2>&1; then
  echo "values.schema.json accepted mode=sometimes" >&2; exit 1
fi
for bad in gate.taint=kip.eclipse.dev/images-pending coordinator.agentAuth=maybe; do
  if "$HELM" template kip deploy/helm --set "$bad" >/dev/null 2>&1; then
    echo "values.schema.json accepted $bad" >&2; exit 1
  fi
done

echo "==> the ImageSet CRD (deploy/helm/crds/imagesets.yaml)" >&2
validate deploy/helm/crds/imagesets.yaml
# The README's ImageSets against the CRD's schema (OpenAPI v3 through jsonschema; the CEL rules
# are evaluated by the coordinator's unit tests with kube's CEL), and malformed ones refused.
"$PY" - deploy/helm/crds/imagesets.yaml README.md <<'PY'
import copy, re, sys, yaml, jsonschema
crd = yaml.safe_load(open(sys.argv[1]))
(version,) = crd["spec"]["versions"]
assert version["subresources"] == {"status": {}}, "status through its subresource"
assert [c["name"] for c in version["additionalPrinterColumns"]] == ["Images", "Ready", "Age"]
def plain(s):
  # OpenAPI's `nullable` as JSON Schema's null type; Kubernetes' extensions dropped.
  if isinstance(s, dict):
      s = {k: plain(v) for k, v in s.items() if not k.startswith("x-kubernetes")}
      if s.pop("nullable", False) and "type" in s:
          s["type"] = [s["type"], "null"]
      return s
  return [plain(v) for v in s] if isinstance(s, list) else s
schema = plain(version["schema"]["openAPIV3Schema"])
text = open(sys.argv[2]).read()
examples = [d for block in re.findall(r"```yaml\n(.*?)```", text, re.S) for d in yaml.safe_load_all(block)
          if d and d.get("kind") == "ImageSet"]
assert examples, "the README shows an ImageSet"
for e in examples:
  jsonschema.validate(e, schema)
bad = copy.deepcopy(examples[0]); bad["spec"]["images"] = []
bad_name = copy.deepcopy(examples[0]); bad_name["spec"]["images"][0]["name"] = "Not_A_Label"
for b in (bad, bad_name):
  try:
      jsonschema.validate(b, schema)
  except jsonschema.ValidationError:
      continue
  sys.exit(f"the CRD's schema accepts {b['spec']['images']}")
print(f"ImageSet CRD ok: {len(examples)} README example(s) valid, malformed ones refused", file=sys.stderr)
PY
if [ -d deploy/openshift ]; then
  echo "==> OpenShift templates" >&2
  for t in deploy/openshift/*.yaml; do
    out="$WORK/openshift-$(basename "$t")"
    "$PY" tests/openshift-process.py "$t" > "$out"
    echo "$t: $(grep -c '^kind:' "$out") objects" >&2
    validate "$out"
  done
  check_agent "$WORK/openshift-app.yaml" /var/run/crio/crio.sock true
  cat "$WORK/openshift-app.yaml" <(echo ---) "$WORK/openshift-serviceaccount.yaml" > "$WORK/openshift-all.yaml"
  gate=$(check_access "$WORK/openshift-all.yaml" any-toleration)
  echo "OpenShift access ok: agent auth and gate $gate" >&2
  "$PY" tests/openshift-process.py deploy/openshift/configmap.yaml > "$WORK/os-cm.yaml"
  check_configmap "$WORK/os-cm.yaml"
  # release.yaml's ConfigMap is the companion the coordinator watches (KIP_CONFIG_MAP + -release).
  "$PY" - "$WORK/os-cm.yaml" "$WORK/openshift-release.yaml" "$WORK/openshift-app.yaml" "$WORK/openshift-serviceaccount.yaml" <<'PY'
import sys, yaml
load = lambda f: [d for d in yaml.safe_load_all(open(f)) if d]
(main,) = load(sys.argv[1])
rel = [d for d in load(sys.argv[2]) if d["kind"] == "ConfigMap"][0]
assert rel["metadata"]["name"] == main["metadata"]["name"] + "-release" and rel["data"]["KIP_RELEASE"] == "unpin"
dep = [d for d in load(sys.argv[3]) if d["kind"] == "Deployment"][0]
env = {e["name"]: e.get("value") for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
assert env["KIP_CONFIG_MAP"] == main["metadata"]["name"], env
role = [d for d in load(sys.argv[4]) if d["kind"] == "Role"][0]
names = [r for r in role["rules"] if "configmaps" in r["resources"]][0]["resourceNames"]
assert sorted(names) == sorted([main["metadata"]["name"], rel["metadata"]["name"]]), names
gate = env["KIP_GATE_TAINT"].split("=")[0].split(":")[0]
job = [d for d in load(sys.argv[2]) if d["kind"] == "Job"][0]
for what, spec in [("coordinator", dep["spec"]["template"]["spec"]), ("release Job", job["spec"]["template"]["spec"])]:
    assert {"key": gate, "operator": "Exists"} in spec.get("tolerations", []), (what, spec.get("tolerations"))
cm_name = main["data"]["DAEMONSET_NAME"]
ds_rules = [r for r in role["rules"] if "daemonsets" in r["resources"]]
assert [r["resourceNames"] for r in ds_rules if r.get("resourceNames")] == [[cm_name]], ds_rules
assert all(r["verbs"] == ["create"] for r in ds_rules if not r.get("resourceNames")), ds_rules
print("OpenShift release template ok")
PY
fi

echo "==> fallback DaemonSets generated by the coordinator (golden files)" >&2
validate coordinator/tests/golden/*.yaml
echo "validate-manifests: all valid for Kubernetes ${VERSIONS[*]}" >&2
