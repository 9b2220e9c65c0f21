#!/usr/bin/env bash
# Every repository path the README names in backticks exists: a path alone (`sleep/src/lib.rs`),
# the first word of a command (`deploy/image/build-static.sh kip-sleep`), or a glob
# (`deploy/helm/ci/*.yaml`, which must match something). A renamed file breaks the README here,
# not in a newcomer's shell.
set -euo pipefail
cd "$(dirname "$0")/.."
check() {
  python3 - "$1" <<'PY'
import glob, os, re, sys
text = open(sys.argv[1]).read()
roots = ("agent/", "coordinator/", "sleep/", "proto/", "deploy/", "tests/", ".ci/")
files = {"Cargo.toml", "Cargo.lock", "build.rs", "README.md", "rustfmt.toml", "clippy.toml"}
checked, missing = 0, []
for span in re.findall(r"`([^`\n]+)`", text):
    word = span.split()[0] if span.split() else ""
    word = word.rstrip(".,;:)")
    word = re.sub(r":\d+(-\d+)?$", "", word)  # file:line
    if not (word.startswith(roots) or word in files):
        continue
    checked += 1
    found = glob.glob(word) if any(c in word for c in "*?[") else os.path.exists(word)
    if not found:
        missing.append(word)
if missing:
    sys.exit("check-readme: the README names paths that do not exist: " + ", ".join(sorted(set(missing))))
print(f"check-readme: {checked} backticked paths in {sys.argv[1]} exist")
PY
}
# The check must be able to fail.
probe=$(mktemp); trap 'rm -f "$probe"' EXIT
# shellcheck disable=SC2016 # the backticks are the README's, not the shell's
echo 'Run `tests/e2e/sleep.sh` and `coordinator/tests/*.nope`.' > "$probe"
if check "$probe" >/dev/null 2>&1; then echo "check-readme: a missing path went unnoticed" >&2; exit 1; fi
check README.md
# The coordinator's layout table names every file and directory of coordinator/src, and nothing
# that is not there: the table is how a newcomer finds where a job lives.
python3 - <<'PY'
import os, re, sys
text = open("README.md").read()
start = text.index("Inside `coordinator/src`")
table = text[start:text.index("\n\n", text.index("| path |", start))]
named = set()
for cell in (line.split("|")[1] for line in table.splitlines() if line.startswith("| `")):
    named.update(re.findall(r"`([^`]+)`", cell))
present = {e + "/" if os.path.isdir(f"coordinator/src/{e}") else e for e in os.listdir("coordinator/src")}
if named != present:
    sys.exit(f"check-readme: the coordinator's layout table and coordinator/src differ: "
             f"not in the table {sorted(present - named)}, not in the tree {sorted(named - present)}")
print(f"check-readme: the coordinator's layout table names all {len(present)} entries of coordinator/src")
PY
