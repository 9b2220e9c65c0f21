"""Evaluates the chart's ValidatingAdmissionPolicy (rendered in RENDERED.yaml) against Node
updates, with cel-python (a CEL implementation apart from the API server's cel-go: the policy
uses plain CEL only, no Kubernetes extension): the coordinator's label and gate changes pass,
anything else it might send is refused, and other users are not matched at all.
The gate taint and the coordinator's ServiceAccount are read from the rendered Deployment.
Usage: admission-policy.py RENDERED.yaml"""
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
(policy,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicy"]
(binding,) = [d for d in docs if d["kind"] == "ValidatingAdmissionPolicyBinding"]
assert binding["spec"]["policyName"] == policy["metadata"]["name"]
assert binding["spec"]["validationActions"] == ["Deny"]
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


def refusals(old, new):
    act = {"object": celpy.json_to_cel(new), "oldObject": celpy.json_to_cel(old)}
    out = []
    for program, message in checks:
        result = program.evaluate(act)
        assert isinstance(result, celpy.celtypes.BoolType), f"{message}: evaluated to {result!r}"
        if not result:
            out.append(message)
    return out


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
