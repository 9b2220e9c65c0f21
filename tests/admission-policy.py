"""Evaluates the chart's ValidatingAdmissionPolicy (rendered in RENDERED.yaml) against Node
updates, with cel-python (a CEL implementation apart from the API server's cel-go: the policy
uses plain CEL only, no Kubernetes extension): the coordinator's label and gate changes pass,
anything else it might send is refused, and other users are not matched at all.
The gate taint and the coordinator's ServiceAccount are read from the rendered Deployment.
The DaemonSets kip generates (the golden files, given after RENDERED.yaml) must pass the
DaemonSet policy as they are.
Usage: admission-policy.py RENDERED.yaml [DAEMONSET.yaml...]"""
import copy
import sys

import celpy
import yaml

docs = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d]
(coordinator,) = [d for d in docs if d["kind"] == "Deployment"]
namespace = coordinator["metadata"]["namespace"]
account = coordinator["spec"]["template"]["spec"]["serviceAccountName"]
(container,) = coordinator["spec"]["template"]["spec"]["containers"]
gate_taint = {e["name"]: e.get("value") for e in container["env"]}.get("KIP_GATE_TAINT") or ""
gate_key, gate_effect = gate_taint.rpartition(":")[0].partition("=")[0], gate_taint.rpartition(":")[2]
policies = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
bindings = {b["spec"]["policyName"]: b for b in docs if b["kind"] == "ValidatingAdmissionPolicyBinding"}
assert sorted(bindings) == sorted(p["metadata"]["name"] for p in policies), "every policy bound"
assert all(b["spec"]["validationActions"] == ["Deny"] for b in bindings.values())
for_resource = lambda r: [p for p in policies if p["spec"]["matchConstraints"]["resourceRules"][0]["resources"] == [r]]
(policy,) = for_resource("nodes")
(ds_policy,) = for_resource("daemonsets")
spec = policy["spec"]
assert spec["failurePolicy"] == "Fail"
(rule,) = spec["matchConstraints"]["resourceRules"]
assert rule["resources"] == ["nodes"] and rule["operations"] == ["UPDATE"], rule

env = celpy.Environment()
compiled = lambda expr: env.program(env.compile(expr))
(condition,) = spec["matchConditions"]
matches = compiled(condition["expression"])
checks = [(compiled(v["expression"]), v["message"]) for v in spec["validations"]]


def matched(username):
    return bool(matches.evaluate({"request": celpy.json_to_cel({"userInfo": {"username": username}})}))


def failing(rules, act):
    """The messages of the validations in `rules` that `act` fails (each must give a bool)."""
    out = []
    for program, message in rules:
        result = program.evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), f"{message}: evaluated to {result!r}"
        if not result:
            out.append(message)
    return out


def refusals(old, new):
    return failing(checks, {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old)})


# Without a configured gate, a taint of the default's shape stands for it: not to be removed.
gate = {"key": gate_key or "kip.eclipse.dev/images-pending", "effect": gate_effect or "NoSchedule"}
other_taint = {"key": "example.com/dedicated", "value": "gpu", "effect": "NoSchedule"}
node = {
    "metadata": {"name": "n1", "labels": {"kubernetes.io/hostname": "n1", "team": "a"}, "annotations": {"x": "y"}},
    "spec": {"podCIDR": "10.0.0.0/24", "providerID": "aws:///i-1", "taints": [other_taint, gate]},
}


def changed(edit):
    new = copy.deepcopy(node)
    edit(new)
    return new


allowed = {
    "the agent label added": lambda n: n["metadata"]["labels"].update({"kip.eclipse.dev/agent": "cri"}),
    "the gate removed": lambda n: n["spec"].update({"taints": [other_taint]}),
    "nothing changed": lambda n: None,
}
refused = {
    "another label changed": lambda n: n["metadata"]["labels"].update({"team": "b"}),
    "a label added": lambda n: n["metadata"]["labels"].update({"evil": "1"}),
    "a label removed": lambda n: n["metadata"]["labels"].pop("team"),
    "an annotation changed": lambda n: n["metadata"]["annotations"].update({"x": "z"}),
    "another taint removed": lambda n: n["spec"].update({"taints": [gate]}),
    "a taint added": lambda n: n["spec"]["taints"].append({"key": "evil", "effect": "NoExecute"}),
    "the gate's effect changed": lambda n: n["spec"].update({"taints": [other_taint, {**gate, "effect": "PreferNoSchedule"}]}),
    "cordoned": lambda n: n["spec"].update({"unschedulable": True}),
    "providerID changed": lambda n: n["spec"].update({"providerID": "aws:///i-2"}),
}
if not gate_taint:
    refused["the gate removed (none configured)"] = allowed.pop("the gate removed")
for what, edit in allowed.items():
    got = refusals(node, changed(edit))
    assert not got, f"{what}: refused: {got}"
for what, edit in refused.items():
    assert refusals(node, changed(edit)), f"{what}: allowed"
# Taking the agent label back (uninstall), from a node that has it.
labelled = changed(allowed["the agent label added"])
assert not refusals(labelled, node), "the agent label removed"
assert matched(f"system:serviceaccount:{namespace}:{account}")
assert not matched("system:serviceaccount:kube-system:node-controller") and not matched("kubernetes-admin")
print(f"admission policy ok: {len(allowed) + 1} coordinator changes allowed, {len(refused)} refused, other users not matched")

# DaemonSets: only kip's own kip-sleep ones, unprivileged, created, changed or deleted.
ds_spec = ds_policy["spec"]
assert ds_spec["failurePolicy"] == "Fail"
(ds_rule,) = ds_spec["matchConstraints"]["resourceRules"]
assert sorted(ds_rule["operations"]) == ["CREATE", "DELETE", "UPDATE"], ds_rule
assert [c["expression"] for c in ds_spec["matchConditions"]] == [condition["expression"]], "the coordinator only"
variables = [(v["name"], compiled(v["expression"])) for v in ds_spec.get("variables", [])]
ds_checks = [(compiled(v["expression"]), v["message"]) for v in ds_spec["validations"]]


def ds_refusals(operation, old, new):
    act = {"request": celpy.json_to_cel({"operation": operation}), "object": celpy.json_to_cel(new),
           "oldObject": celpy.json_to_cel(old)}
    act["variables"] = celpy.json_to_cel({})
    values = {}
    for name, program in variables:
        values[name] = program.evaluate(act)
    act["variables"] = celpy.celtypes.MapType({celpy.celtypes.StringType(k): v for k, v in values.items()})
    return failing(ds_checks, act)


kip_labels = {"app.kubernetes.io/name": "kip-sleep", "app.kubernetes.io/instance": "kip-set-0a1b2c3d4e",
              "app.kubernetes.io/managed-by": "kip", "kip.eclipse.dev/image-set": "0a1b2c3d4e"}
sleep_ds = {"metadata": {"name": "kip-set-0a1b2c3d4e", "labels": kip_labels},
            "spec": {"template": {"spec": {
                "initContainers": [{"name": "copy-sleep", "securityContext": {"allowPrivilegeEscalation": False}}],
                "containers": [{"name": "trainer", "securityContext": {"readOnlyRootFilesystem": True}}],
                "volumes": [{"name": "kip", "emptyDir": {}}]}}}}
agent_ds = {"metadata": {"name": "kip-agent", "labels": {"app.kubernetes.io/name": "kip", "app.kubernetes.io/managed-by": "Helm"}},
            "spec": {"template": {"spec": {"containers": [{"name": "agent", "securityContext": {"privileged": True}}],
                                           "volumes": [{"name": "sock", "hostPath": {"path": "/run/containerd"}}]}}}}


def ds_changed(base, edit):
    new = copy.deepcopy(base)
    edit(new)
    return new


ds_allowed = {
    "kip's sleep DaemonSet created": ("CREATE", None, sleep_ds),
    "kip's sleep DaemonSet changed": ("UPDATE", sleep_ds, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"]["containers"].append({"name": "more"}))),
    "kip's sleep DaemonSet deleted": ("DELETE", sleep_ds, None),
}
ds_refused = {
    "the agent's DaemonSet changed": ("UPDATE", agent_ds, ds_changed(agent_ds, lambda d: d["metadata"]["labels"].update({"x": "y"}))),
    "the agent's DaemonSet taken over by labels": ("UPDATE", agent_ds, ds_changed(agent_ds, lambda d: d["metadata"].update({"labels": kip_labels}))),
    "the agent's DaemonSet deleted": ("DELETE", agent_ds, None),
    "a privileged DaemonSet created": ("CREATE", None, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"]["containers"][0].update({"securityContext": {"privileged": True}}))),
    "a privileged init container": ("CREATE", None, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"]["initContainers"][0].update({"securityContext": {"privileged": True}}))),
    "a host path mounted": ("UPDATE", sleep_ds, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"]["volumes"].append({"name": "root", "hostPath": {"path": "/"}}))),
    "the host network": ("CREATE", None, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"].update({"hostNetwork": True}))),
    "the host PID namespace": ("CREATE", None, ds_changed(sleep_ds, lambda d: d["spec"]["template"]["spec"].update({"hostPID": True}))),
    "an unlabelled DaemonSet created": ("CREATE", None, ds_changed(sleep_ds, lambda d: d["metadata"].update({"labels": {}}))),
}
for path in sys.argv[2:]:
    (generated,) = [d for d in yaml.safe_load_all(open(path)) if d]
    ds_allowed[f"{path} created"] = ("CREATE", None, generated)
    ds_allowed[f"{path} changed"] = ("UPDATE", generated, generated)
for what, (op, old, new) in ds_allowed.items():
    got = ds_refusals(op, old, new)
    assert not got, f"{what}: refused: {got}"
for what, (op, old, new) in ds_refused.items():
    assert ds_refusals(op, old, new), f"{what}: allowed"
print(f"DaemonSet admission policy ok: {len(ds_allowed)} coordinator changes allowed, {len(ds_refused)} refused")
