"""Prints bench/results.json (or the file given) as the markdown table of docs/performance.md."""

import json
import os
import sys

PHASES = ("cold", "unchanged", "changed")


def table(results):
    lines = ["| N backends | run | fleet | Ansible | fleet / Ansible | fleet peak memory |",
             "|---|---|---|---|---|---|"]
    for n, row in results["runs"].items():
        for phase in PHASES:
            fleet = row["fleet"][phase]
            ansible = row.get("ansible", {}).get(phase)
            if ansible:
                theirs = f"{ansible['seconds']:.2f} s"
                ratio = f"{fleet['seconds'] / ansible['seconds']:.3f} (1/{ansible['seconds'] / fleet['seconds']:.1f})"
            else:
                theirs = ratio = "-"
            lines.append(f"| {n} | {phase} | {fleet['seconds']:.2f} s | {theirs} | {ratio} | "
                         f"{fleet['peak_mb']:.0f} MB |")
    return "\n".join(lines)


if __name__ == "__main__":
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                "results.json")
    with open(path) as f:
        print(table(json.load(f)))
