"""Does what `oc process` does for kip's templates, for validation where no `oc` exists: takes the
parameter defaults (or NAME=VALUE overrides after the file), substitutes `${NAME}` in strings and
`${{NAME}}` as a YAML value, and prints the objects as a YAML stream. An unknown or unused
parameter is an error, so a typo in a template cannot slip through."""

import re
import sys

import yaml


def main() -> None:
    path, overrides = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    template = yaml.safe_load(open(path))
    assert template["kind"] == "Template", f"{path}: not a Template"
    params = {p["name"]: str(p.get("value", "")) for p in template.get("parameters", [])}
    unknown = set(overrides) - set(params)
    assert not unknown, f"{path}: unknown parameters {sorted(unknown)}"
    params.update(overrides)
    used = set()

    def substitute(value):
        if isinstance(value, dict):
            return {substitute(k): substitute(v) for k, v in value.items()}
        if isinstance(value, list):
            return [substitute(v) for v in value]
        if isinstance(value, str):
            whole = re.fullmatch(r"\$\{\{(\w+)\}\}", value)
            if whole:
                used.add(whole.group(1))
                return yaml.safe_load(params[whole.group(1)])

            def one(m):
                name = m.group(1)
                assert name in params, f"{path}: ${{{name}}} is not a parameter"
                used.add(name)
                return params[name]

            return re.sub(r"\$\{(\w+)\}", one, value)
        return value

    objects = substitute(template["objects"])
    # Parameters the template declares for `oc process -p` compatibility with KIP's templates.
    declared_only = set(params) - used
    allowed = {"DAEMONSET_NAME", "CACHING_INTERVAL_HOURS", "CACHING_MEMORY_REQUEST", "CACHING_MEMORY_LIMIT",
               "CACHING_CPU_REQUEST", "CACHING_CPU_LIMIT", "NODE_SELECTOR", "AFFINITY"}
    assert declared_only <= allowed, f"{path}: parameters never used: {sorted(declared_only - allowed)}"
    yaml.safe_dump_all(objects, sys.stdout, sort_keys=False)


if __name__ == "__main__":
    main()
