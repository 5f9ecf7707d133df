"""Peak memory: explain against the plain forward pass and Grad-CAM, each in a fresh process.

    pytest benchmarks/test_memory.py --benchmark-group-by=group -s

Each child builds the model and the batch, then runs one call; extra_info records the process's
peak resident memory before the call and after it (ru_maxrss), so the growth is what the call
itself needed on top of the model and the inputs.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ARCHITECTURES

CHILD = r"""
import json, resource, sys
import torch
sys.path.insert(0, {here!r})
from conftest import ARCHITECTURES, build
import caffast
from caffast.eval.gradcam import grad_cam

arch, batch, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
model = build(arch)
images = torch.randn(batch, 3, 224, 224)
with torch.no_grad():
    model(images[:1])  # allocator and kernels warmed on a small batch
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if kind == "forward":
    with torch.no_grad():
        model(images)
elif kind == "explain":
    caffast.explain(model, images, ARCHITECTURES[arch], mode="specific", max_iter=1000)
else:
    grad_cam(model, images, ARCHITECTURES[arch])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"before_mb": before / 1024, "after_mb": after / 1024}}))
"""


def run_child(arch: str, batch: int, kind: str) -> dict:
    code = CHILD.format(here=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", code, arch, str(batch), kind], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["forward", "explain", "grad_cam"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_peak_memory(benchmark, arch, batch, kind):
    benchmark.group = f"memory-{arch}-b{batch}"
    benchmark.name = kind
    peaks = benchmark.pedantic(run_child, args=(arch, batch, kind), rounds=1, iterations=1)
    benchmark.extra_info.update(peaks, growth_mb=peaks["after_mb"] - peaks["before_mb"])
    print(f"\n{arch} b{batch} {kind}: peak {peaks['after_mb']:.0f} MB (+{peaks['after_mb'] - peaks['before_mb']:.0f} MB)")
