"""Turn a pytest-benchmark JSON file into the markdown tables of RESULTS.md.

    python benchmarks/report.py bench.json             # one table per group
    python benchmarks/report.py --summary bench.json   # test_breakpoints.py: one row per group

The summary puts each group's methods side by side: time over GradCAM's, the speed-up of gd over the
reference loop, and the objective and tail evaluations of each solver.
"""

import argparse
import json
from collections import defaultdict


def _groups(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for bench in data["benchmarks"]:
        groups[bench["group"]].append(bench)
    return groups


def tables(data: dict) -> None:
    for group, rows in sorted(_groups(data).items()):
        rows = sorted(rows, key=lambda b: b["stats"]["mean"])
        baseline = next((b for b in rows if "GradCAM" in b["name"] or "reference" in b["name"]), None)
        # the extra column: images per second for whole runs (test_throughput.py), else iterations
        rated = any("images_per_second" in b.get("extra_info", {}) for b in rows)
        print(f"### {group}\n")
        print(f"| what | mean (s) | min (s) | rounds | {'images/s' if rated else 'iterations'} | speed-up over "
              + (baseline["name"] if baseline else "-") + " |")
        print("|---|---|---|---|---|---|")
        for bench in rows:
            stats = bench["stats"]
            ratio = f"{baseline['stats']['mean'] / stats['mean']:.1f}x" if baseline else "-"
            info = bench.get("extra_info", {})
            extra = f"{info['images_per_second']:.2f}" if rated and "images_per_second" in info else info.get("iterations", "")
            print(f"| {bench['name']} | {stats['mean']:.4f} | {stats['min']:.4f} | {stats['rounds']} | {extra} | {ratio} |")
        print()


def summary(data: dict) -> None:
    print("| group | GradCAM (s) | reference (s) | gd (s) | fast (s) | exact (s) | gd / GradCAM | fast / GradCAM "
          "| exact / GradCAM | gd over reference | objective gd / fast / exact | fast evaluations |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for group, rows in sorted(_groups(data).items()):
        by_kind = {}
        for bench in rows:
            name = bench["name"]
            words = name.split()  # "caffast fast", "caffast gd 100 iterations", "pytorch-grad-cam GradCAM", ...
            kind = next((k for k in ("GradCAM", "reference", "gd", "fast", "exact") if k in words), name)
            by_kind[kind] = bench
        seconds = {kind: bench["stats"]["min"] for kind, bench in by_kind.items()}

        def shown(kind):
            return f"{seconds[kind]:.3f}" if kind in seconds else "-"

        def ratio(a, b):
            return f"{seconds[a] / seconds[b]:.2f}" if a in seconds and b in seconds else "-"

        objectives = " / ".join(
            f"{by_kind[k]['extra_info']['objective']:.4g}" if k in by_kind else "-" for k in ("gd", "fast", "exact")
        )
        evaluations = by_kind.get("fast", {}).get("extra_info", {}).get("evaluations", "-")
        print(f"| {group} | {shown('GradCAM')} | {shown('reference')} | {shown('gd')} | {shown('fast')} | {shown('exact')} "
              f"| {ratio('gd', 'GradCAM')} | {ratio('fast', 'GradCAM')} | {ratio('exact', 'GradCAM')} "
              f"| {ratio('reference', 'gd')} | {objectives} | {evaluations} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path")
    parser.add_argument("--summary", action="store_true", help="one row per group (test_breakpoints.py)")
    args = parser.parse_args()
    with open(args.path) as handle:
        data = json.load(handle)
    print(f"machine: {data['machine_info'].get('cpu', {}).get('brand_raw', '?')}, "
          f"{data['machine_info'].get('cpu', {}).get('count', '?')} cores; {data['datetime']}\n")
    (summary if args.summary else tables)(data)


if __name__ == "__main__":
    main()
