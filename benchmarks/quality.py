"""solver="fast" against the reference loop's answer (gd, 1000 iterations, the release's stopping
rule) on the breakpoints of benchmarks/test_breakpoints.py: the objective each reaches and the tail
evaluations each uses, problem by problem, as a markdown table.

    python benchmarks/quality.py [--images 2] [--size 224] [--cases resnet50-layer3,vgg16-features]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import caffast  # noqa: E402
from test_breakpoints import BREAKPOINTS, build_model  # noqa: E402

FLOAT32_EPS = torch.finfo(torch.float32).eps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--cases", default=",".join(BREAKPOINTS))
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = torch.randn(args.images, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)).to(device)
    print("| breakpoint | mode | image | gd-1000 objective | gd steps | fast objective | fast evaluations | fast <= gd |")
    print("|---|---|---|---|---|---|---|---|")
    wins, evaluations = [], []
    for case in args.cases.split(","):
        arch, layer = BREAKPOINTS[case]
        model = build_model(arch, device)
        for mode in ("oblivious", "specific"):
            started = time.perf_counter()
            gd = caffast.explain(model, images, layer, mode=mode)
            fast = caffast.explain(model, images, layer, mode=mode, solver="fast")
            for n in range(args.images):
                reference, ours = gd.objective[n, 0].item(), fast.objective[n, 0].item()
                # float32 tails: objectives closer than float32 resolution are equal
                win = ours <= reference + 4 * FLOAT32_EPS * abs(reference)
                wins.append(win)
                evaluations.append(int(fast.evaluations[n, 0]))
                print(f"| {case} | {mode} | {n} | {reference:.6g} | {int(gd.iterations[n, 0])} | {ours:.6g} | "
                      f"{int(fast.evaluations[n, 0])} | {'yes' if win else 'NO'} |", flush=True)
            print(f"<!-- {case} {mode}: {time.perf_counter() - started:.1f} s -->", file=sys.stderr)
    print(f"\nfast <= gd-1000 on {sum(wins)} of {len(wins)} problems ({100 * sum(wins) / len(wins):.0f}%); "
          f"median evaluations {statistics.median(evaluations):g}")


if __name__ == "__main__":
    main()
