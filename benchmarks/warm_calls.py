"""Warm explain calls on googlenet, batch 1, both modes alternately, each beside a plain forward.

    python benchmarks/warm_calls.py

A check of the class-oblivious end-to-end rows of test_cpu.py outside the benchmark process.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import caffast  # noqa: E402
from conftest import build  # noqa: E402

model = build("googlenet")
images = torch.randn(1, 3, 224, 224)
caffast.explain(model, images, "inception5b", mode="oblivious", min_error=0)  # traces once
for mode in ["oblivious", "specific"] * 3:
    start = time.perf_counter()
    caffast.explain(model, images, "inception5b", mode=mode, min_error=0)
    middle = time.perf_counter()
    with torch.no_grad():
        model(images)
    print(f"{mode:9s} explain {middle - start:.3f} s   forward {time.perf_counter() - middle:.3f} s")
