#!/usr/bin/env bash
# Validates the Grafana dashboard: well-formed JSON with the fields Grafana needs, unique panel
# ids, and every panel query a valid PromQL expression (promtool checks them as recording rules)
# that uses only metrics kip exports (names listed in the README's metric tables).
set -euo pipefail
cd "$(dirname "$0")/.."
rules=$(mktemp); trap 'rm -f "$rules"' EXIT
python3 - deploy/prometheus/kip-dashboard.json README.md "$rules" <<'PY'
import json, re, sys
dash = json.load(open(sys.argv[1]))
for key in ("title", "uid", "panels", "schemaVersion"):
    assert key in dash, f"dashboard lacks {key}"
ids = [p["id"] for p in dash["panels"]]
assert len(ids) == len(set(ids)), "duplicate panel ids"
known = set(re.findall(r"^\| `(kip_[a-z_]+)`", open(sys.argv[2]).read(), re.M))
exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
for e in exprs:
    for m in re.findall(r"\bkip_[a-z_]+", e):
        base = re.sub(r"_(bucket|count|sum)$", "", m)
        assert m in known or base in known, f"{m} (in `{e}`) is not a metric kip exports"
with open(sys.argv[3], "w") as f:
    f.write("groups:\n  - name: dashboard\n    rules:\n")
    for i, e in enumerate(exprs):
        f.write(f"      - record: dashboard:panel_{i}\n        expr: {json.dumps(e)}\n")
print(f"dashboard: {len(dash['panels'])} panels, {len(exprs)} queries")
PY
promtool check rules "$rules" >/dev/null
echo "dashboard queries: valid PromQL"
