"""Turn a pytest-benchmark JSON file into the markdown tables of RESULTS.md.

    python benchmarks/report.py bench.json
"""

import json
import sys
from collections import defaultdict


def main(path: str) -> None:
    with open(path) as handle:
        data = json.load(handle)
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores; {data['datetime']}\n")
    for group in sorted(groups):
        rows = sorted(groups[group], key=lambda b: b["stats"]["mean"])
        baseline = next((b for b in rows if "GradCAM" in b["name"] or "reference" in b["name"]), None)
        print(f"### {group}\n")
        print("| what | mean (s) | min (s) | rounds | iterations | speed-up over " + (baseline["name"] if baseline else "-") + " |")
        print("|---|---|---|---|---|---|")
        for bench in rows:
            stats = bench["stats"]
            ratio = f"{baseline['stats']['mean'] / stats['mean']:.1f}x" if baseline else "-"
            iterations = bench.get("extra_info", {}).get("iterations", "")
            print(f"| {bench['name']} | {stats['mean']:.4f} | {stats['min']:.4f} | {stats['rounds']} | {iterations} | {ratio} |")
        print()


if __name__ == "__main__":
    main(sys.argv[1])
