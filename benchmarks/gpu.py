"""Every GPU check in one command: install, the GPU tests, the GPU benchmarks, a markdown table.

    python benchmarks/gpu.py [--out DIR] [--skip-install] [--skip-tests] [--quick]

1. installs caffast with `pip install --no-build-isolation --no-deps -e .` (first the wheels under
   .gpu-wheels/, if any: a machine without pybind11 or torchvision gets them from there; fill it with
   `pip download --no-deps -d .gpu-wheels pybind11 torchvision==VERSION` beforehand);
2. runs the GPU tests: every Triton kernel compiled (not interpreted) against its twin, explain on
   the triton backend, the CUDA-graph loop against the eager one;
3. times, with CUDA events around synchronized regions (median of repeats): the fused solver for 256
   problems x 1000 iterations in one launch against its torch twin; explain against Grad-CAM at
   batch 1 and 64 on resnet50, googlenet and densenet169; every breakpoint of
   benchmarks/test_breakpoints.py at batch 1 and 8 (gd 1000 iterations, fast, Grad-CAM, and the
   reference loop restated with a hook at batch 1); the trained EfficientNet-Lite0 of the real tier
   (caffast.eval.real) at bn2 and blocks.5, each class-specific loss, against Grad-CAM;
4. writes DIR/gpu_results.md ($OUT when set, else benchmarks/) and prints it.

Without a CUDA device it says so and exits 0, having measured nothing.  Grad-CAM is pytorch-grad-cam's
where it is installed, else caffast.eval.gradcam (the same one forward and one backward pass).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/backends/test_triton.py", "tests/backends/test_triton_explain.py", "tests/backends/test_cuda_graphs.py", "tests/core/test_losses.py"]


def install() -> str:
    wheels = ROOT / ".gpu-wheels"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps"]
    if wheels.is_dir() and any(wheels.iterdir()):
        subprocess.run(pip + ["--no-index", *map(str, sorted(wheels.glob("*.whl")))], cwd=ROOT, check=False)
    result = subprocess.run(pip + ["-e", "."], cwd=ROOT, capture_output=True, text=True)
    return "installed" if result.returncode == 0 else f"install failed ({result.stderr.strip().splitlines()[-1:]})"


def run_tests() -> str:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *GPU_TESTS],
                            cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    lines = result.stdout.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    return "\n".join([f"`pytest {' '.join(GPU_TESTS)}`: {lines[-1] if lines else result.stderr[-500:]}", *failures])


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` synchronized runs after one warm-up, and the last result."""
    import torch

    result = fn()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        result = fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times), result


def fused_solver_rows(repeats: int) -> list[str]:
    import torch

    from caffast.backends.triton import solve_fused
    from caffast.core.constraints import CONSTRAINTS
    from caffast.core.heads import FusedHead
    from caffast.core.loop import LoopSettings, solve
    from caffast.core.problems import FusedProblem

    rows = []
    generator = torch.Generator().manual_seed(0)
    problems, cells, classes = 256, 49, 1000
    settings = LoopSettings(max_iter=1000, lr=0.5, min_error=0.0, check_every=50, optimizer="sgd")
    for mode in ("oblivious", "specific"):
        m = torch.randn(problems, 1, classes, cells, generator=generator, dtype=torch.float64).cuda()
        signs = torch.ones(problems, classes, dtype=torch.float64, device="cuda")
        signs[:, 0] = -1
        gram = torch.einsum("naki,nbkj->nabij", m, m) if mode == "oblivious" else None
        linear = torch.einsum("pskj,pk->psj", m, signs) if mode == "specific" else None
        constant = torch.zeros(problems, dtype=torch.float64, device="cuda") if mode == "specific" else None
        image = torch.arange(problems, device="cuda")
        head = FusedHead(gram, linear, constant, image, mode, classes, (7, 7))
        params = torch.ones(problems, cells, dtype=torch.float64, device="cuda")
        kernel, _ = timed(lambda: solve_fused(head, CONSTRAINTS["l2norm"], params, settings), repeats)
        twin, _ = timed(lambda: solve(FusedProblem(head, CONSTRAINTS["l2norm"]), params, settings), 1)
        rows.append(f"| fused solver, {problems} problems x 1000 iterations, {mode} | triton {kernel * 1e3:.2f} ms | "
                    f"torch twin {twin * 1e3:.1f} ms | {twin / kernel:.0f}x |")
    return rows


def time_grad_cam(model, layer: str, images, repeats: int) -> tuple[str, float]:
    """The Grad-CAM baseline at `layer`: its name and median seconds (its hooks removed afterwards)."""
    try:
        import pytorch_grad_cam
    except ImportError:
        from caffast.eval.gradcam import grad_cam

        return "caffast grad_cam", timed(lambda: grad_cam(model, images, layer), repeats)[0]
    with pytorch_grad_cam.GradCAM(model=model, target_layers=[model.get_submodule(layer)]) as cam:
        return "pytorch-grad-cam GradCAM", timed(lambda: cam(input_tensor=images, targets=None), repeats)[0]


def explain_rows(cases: dict[str, tuple[str, str]], batches: tuple[int, ...], solvers: dict, repeats: int,
                 reference: bool) -> list[str]:  # fmt: skip
    import torch
    import torchvision

    import caffast

    rows, baseline_name = [], "Grad-CAM"
    images = torch.randn(max(batches), 3, 224, 224, generator=torch.Generator().manual_seed(1)).cuda()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from test_breakpoints import build_model

    for case, (arch, layer) in cases.items():
        if arch == "googlenet":
            torch.manual_seed(0)
            model = torchvision.models.googlenet(aux_logits=False, init_weights=True).eval().cuda()
        else:
            model = build_model(arch, torch.device("cuda"))
        for batch in batches:
            x = images[:batch]
            baseline_name, gradcam = time_grad_cam(model, layer, x, repeats)
            for mode in ("oblivious", "specific"):
                for label, options in solvers.items():
                    seconds, result = timed(lambda: caffast.explain(model, x, layer, mode=mode, **options), repeats)
                    rows.append(f"| {case} | {batch} | {mode} | {label} | {result.path} | {seconds * 1e3:.1f} | "
                                f"{gradcam * 1e3:.1f} | {seconds / gradcam:.2f} | {result.objective.mean().item():.5g} | "
                                f"{result.evaluations.float().mean().item():.0f} |")
                if reference and batch == 1:
                    rows.append(reference_row(model, x, layer, mode, case, gradcam))
        torch.cuda.empty_cache()
    return [f"| breakpoint | batch | mode | caffast | path | ms | {baseline_name} ms | / Grad-CAM | objective | "
            "evaluations |", "|---|---|---|---|---|---|---|---|---|---|", *rows]


def reference_row(model, x, layer: str, mode: str, case: str, gradcam: float) -> str:
    """The release's loop restated with a hook, 100 iterations, scaled to 1000 (its cost per
    iteration is constant: one forward and backward pass of the whole model)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from reference_hook import reference_hook_loop

    target = int(model(x).argmax()) if mode == "specific" else None
    flags = [p.requires_grad for p in model.parameters()]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        seconds, _ = timed(lambda: reference_hook_loop(model, x, layer, target, max_iter=100, min_error=0.0), 1)
    finally:
        for parameter, flag in zip(model.parameters(), flags):
            parameter.requires_grad_(flag)
    seconds *= 10
    return (f"| {case} | 1 | {mode} | reference loop (hook), 1000 iterations (100 timed x 10) | hook | "
            f"{seconds * 1e3:.1f} | {gradcam * 1e3:.1f} | {seconds / gradcam:.2f} | | 1000 |")


def real_tier_rows(repeats: int) -> list[str]:
    """The trained EfficientNet-Lite0 on the real tier's photos: class-specific explain (solver fast,
    each loss) against Grad-CAM at the fused bn2 and the generic blocks.5, batch 1 and 8."""
    import torch

    import caffast
    from caffast.eval.real import efficientnet_lite0, prepare, real_tier

    model = efficientnet_lite0().cuda()
    photos = torch.stack([prepare(photo)[0] for photo in real_tier()[:8]]).cuda()
    rows = []
    for layer in ("bn2", "blocks.5"):
        for batch in (1, 8):
            x = photos[:batch]
            targets = model(x).argmax(1, keepdim=True)
            baseline_name, gradcam = time_grad_cam(model, layer, x, repeats)
            for loss in ("margin", "log_softmax", "release"):
                options = dict(mode="specific", targets=targets, solver="fast", loss=loss)
                seconds, result = timed(lambda: caffast.explain(model, x, layer, **options), repeats)
                rows.append(f"| {layer} | {batch} | {loss} | {result.path} | {seconds * 1e3:.1f} | {gradcam * 1e3:.1f} | "
                            f"{seconds / gradcam:.2f} | {result.evaluations.float().median().item():.0f} |")
    return ["| layer | batch | loss | path | fast ms | Grad-CAM ms | / Grad-CAM | evaluations |",
            "|---|---|---|---|---|---|---|---|", *rows]


def main() -> int:
    parser = argparse.ArgumentParser(description="caffast's GPU tests and benchmarks in one command")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks"))
    parser.add_argument("--skip-install", action="store_true")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--quick", action="store_true", help="fewer repeats and cases (a smoke run)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (run this on a machine with a GPU)")
        return 0
    started = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    device = torch.cuda.get_device_name()
    lines = [f"# GPU results: {device}", "",
             f"torch {torch.__version__}; " + (install() if not args.skip_install else "not reinstalled"), ""]
    if not args.skip_tests:
        lines += ["## Tests", "", run_tests(), ""]
    repeats = 2 if args.quick else 5
    lines += ["## The fused solver in one launch", "", "| what | kernel | twin | speed-up |", "|---|---|---|---|",
              *fused_solver_rows(repeats), ""]
    try:
        import torchvision  # noqa: F401 (the model benchmarks need it)
    except ImportError:
        lines += ["(torchvision is not installed: no model benchmarks)"]
    else:
        sys.path.insert(0, str(ROOT / "benchmarks"))
        from test_breakpoints import BREAKPOINTS

        heads = {"resnet50-layer4": ("resnet50", "layer4"), "googlenet-inception5b": ("googlenet", "inception5b"),
                 "densenet169-features": ("densenet169", "features")}  # fmt: skip
        solvers = {"gd 1000 iterations": dict(max_iter=1000, min_error=0.0), "exact": dict(solver="exact")}
        lines += ["## Fused heads: explain against Grad-CAM", "",
                  *explain_rows(heads, (1, 64), solvers, repeats, reference=False), ""]
        cases = dict(list(BREAKPOINTS.items())[:3]) if args.quick else BREAKPOINTS
        solvers = {"gd 1000 iterations": dict(max_iter=1000, min_error=0.0), "fast": dict(solver="fast")}
        lines += ["## Any breakpoint", "", *explain_rows(cases, (1, 8), solvers, 1, reference=True), ""]
    try:
        lines += ["## A trained network on real photos (the real tier)", "", *real_tier_rows(repeats), ""]
    except ImportError as error:  # timm or the weights package missing
        lines += [f"(the real tier is not installed: {error})", ""]
    lines += [f"total {time.perf_counter() - started:.0f} s"]
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_results.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
