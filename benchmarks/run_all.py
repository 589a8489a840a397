"""Run every benchmark script, collect their JSON into benchmarks/results.json, print a table.

    python -m benchmarks                # all of them (minutes: each measures side by side)
    python -m benchmarks --only data_throughput,zero_memory
    python -m benchmarks --update-results  # also rewrite the table in benchmarks/RESULTS.md

Each script prints, as its last line, one JSON object (or a list of them) with name, value,
unit, goal and better. This runner adds the machine and date, and whether the goal is met.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SKIP = {"__init__.py", "__main__.py", "run_all.py", "fidelity.py"}
"""Not benchmark scripts, or (fidelity.py) one that needs a FULL `lvd demo` folder and ~20 min: run it alone."""
RESULTS_BEGIN = "<!-- performance:begin -->"
RESULTS_END = "<!-- performance:end -->"


def machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, no GPU"


def run_script(path: Path) -> list[dict[str, object]]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(path)], cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    elapsed = time.perf_counter() - start
    lines = [line for line in result.stdout.strip().splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        return [{"name": path.stem, "error": (result.stderr or result.stdout)[-1500:], "script": path.name}]
    try:
        payload = json.loads(lines[-1])
    except json.JSONDecodeError:
        return [{"name": path.stem, "error": f"last line is not JSON: {lines[-1][:200]}", "script": path.name}]
    entries = payload if isinstance(payload, list) else [payload]
    for entry in entries:
        if not {"name", "value", "goal", "better"} <= set(entry):
            return [{"name": path.stem, "error": f"does not follow the convention (name, value, unit, goal, better): {sorted(entry)}", "script": path.name}]
    for entry in entries:
        entry.update(script=path.name, seconds=round(elapsed, 1), machine=machine())
        entry["met"] = _met(entry)
    return entries


def _met(entry: dict[str, object]) -> bool | None:
    value, goal, better = entry.get("value"), entry.get("goal"), entry.get("better")
    if not isinstance(value, int | float) or not isinstance(goal, int | float):
        return None
    return value >= goal if better == "higher" else value <= goal


def table(entries: list[dict[str, object]]) -> str:
    rows = ["| benchmark | measured | goal | met |", "|---|---|---|---|"]
    for e in entries:
        if "error" in e:
            rows.append(f"| {e['name']} | error (see results.json) | | no |")
            continue
        sign = ">=" if e.get("better") == "higher" else "<="
        met = {True: "yes", False: "**no**", None: "n/a"}[e["met"]]
        rows.append(f"| {e['name']} | {_fmt(e['value'])} {e.get('unit', '')} | {sign} {_fmt(e['goal'])} | {met} |")
    return "\n".join(rows)


def _fmt(value: object) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def update_results(entries: list[dict[str, object]], date: str) -> None:
    """Replace the table between the performance markers of benchmarks/RESULTS.md (append if absent)."""
    results = HERE / "RESULTS.md"
    text = results.read_text()
    section = f"{RESULTS_BEGIN}\nMeasured {date} on {machine()} by `python -m benchmarks` (figures: `benchmarks/results.json`).\n\n{table(entries)}\n{RESULTS_END}"
    if RESULTS_BEGIN in text:
        head, rest = text.split(RESULTS_BEGIN, 1)
        text = head + section + rest.split(RESULTS_END, 1)[1]
    else:
        text += f"\n## Benchmarks\n\n{section}\n"
    results.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated script names (without .py)")
    parser.add_argument("--update-results", action="store_true", help="rewrite the table in benchmarks/RESULTS.md")
    args = parser.parse_args()
    scripts = sorted(p for p in HERE.glob("*.py") if p.name not in SKIP)
    if args.only:
        wanted = set(args.only.split(","))
        scripts = [p for p in scripts if p.stem in wanted]
    entries = []
    for script in scripts:
        print(f"running {script.name} ...", file=sys.stderr, flush=True)
        entries.extend(run_script(script))
    date = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    if args.only and (HERE / "results.json").is_file():  # keep the other scripts' figures
        ran = {p.name for p in scripts}
        previous = json.loads((HERE / "results.json").read_text())["results"]
        entries = [e for e in previous if e.get("script") not in ran] + entries
        entries.sort(key=lambda e: str(e.get("script")))
    (HERE / "results.json").write_text(json.dumps({"date": date, "machine": machine(), "results": entries}, indent=2) + "\n")
    print(table(entries))
    if args.update_results:
        update_results(entries, date)


if __name__ == "__main__":
    main()
