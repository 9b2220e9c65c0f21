#!/usr/bin/env python3
"""Reads docker-registry's JSON request log (level info) from a line number on, for the
registry e2e. Each request line has its method, URI, user agent, completion time and duration,
so the nodes (each containerd version sends its own user agent) and the coordinator are told
apart, and when each request ran is known to the microsecond.

  registry-log.py LOG FROM count [--method M] [--ua REGEX] [--uri REGEX]
      prints how many requests match
  registry-log.py LOG FROM per-ua [--uri REGEX]
      prints "UA METHOD KIND REPO COUNT" lines (KIND: manifests, blobs, other)
  registry-log.py LOG FROM exclusive --ua REGEX [--uri REGEX]
      exits 1 when the spans (first request's start to last request's end) of two user agents
      overlap: no two nodes pulled at the same time. Prints the spans.
"""
import argparse
import datetime
import json
import re
import sys

UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text):
    """Seconds in a Go duration string such as 1.5ms, 2m3.2s or 350\u00b5s."""
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(ns|us|\u00b5s|ms|s|m|h)", text):
        total += float(number) * UNITS[unit]
    return total


def timestamp(text):
    # 2026-11-26T17:33:51.176354531Z: Python keeps microseconds.
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z", text)
    if not m:
        raise ValueError(f"unexpected time {text!r}")
    base = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S").replace(tzinfo=datetime.timezone.utc)
    return base.timestamp() + float("0." + (m.group(2) or "0"))


def requests(log, first_line):
    with open(log, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if number < first_line or not line.startswith("{"):
                continue
            d = json.loads(line)
            if "http.request.method" not in d or "http.response.duration" not in d:
                continue
            end = timestamp(d["time"])
            yield {
                "method": d["http.request.method"],
                "uri": d["http.request.uri"],
                "ua": d.get("http.request.useragent", ""),
                "status": d.get("http.response.status", 0),
                "start": end - go_duration(d["http.response.duration"]),
                "end": end,
            }


def matching(args):
    for r in requests(args.log, args.first):
        if getattr(args, "method", None) and r["method"] != args.method:
            continue
        if getattr(args, "ua", None) and not re.search(args.ua, r["ua"]):
            continue
        if getattr(args, "uri", None) and not re.search(args.uri, r["uri"]):
            continue
        yield r


def main():
    p = argparse.ArgumentParser()
    p.add_argument("log")
    p.add_argument("first", type=int, help="first line to read (1-based)")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("count")
    c.add_argument("--method")
    c.add_argument("--ua")
    c.add_argument("--uri")
    u = sub.add_parser("per-ua")
    u.add_argument("--uri")
    e = sub.add_parser("exclusive")
    e.add_argument("--ua", required=True)
    e.add_argument("--uri")
    args = p.parse_args()

    if args.cmd == "count":
        print(sum(1 for _ in matching(args)))
        return 0
    if args.cmd == "per-ua":
        counts = {}
        for r in matching(args):
            m = re.match(r"/v2/(.+)/(manifests|blobs)/", r["uri"])
            kind, repo = (m.group(2), m.group(1)) if m else ("other", "-")
            key = (r["ua"].replace(" ", "_") or "-", r["method"], kind, repo)
            counts[key] = counts.get(key, 0) + 1
        for key in sorted(counts):
            print(*key, counts[key])
        return 0
    spans = {}
    for r in matching(args):
        s = spans.setdefault(r["ua"], [r["start"], r["end"], 0])
        s[0], s[1], s[2] = min(s[0], r["start"]), max(s[1], r["end"]), s[2] + 1
    ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
    for ua, (start, end, n) in ordered:
        print(f"{ua}: {n} requests from {start:.6f} to {end:.6f} ({(end - start) * 1000:.1f} ms)")
    for (ua1, s1), (ua2, s2) in zip(ordered, ordered[1:]):
        if s2[0] < s1[1]:
            print(f"overlap: {ua2} started {(s1[1] - s2[0]) * 1000:.1f} ms before {ua1} ended", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
