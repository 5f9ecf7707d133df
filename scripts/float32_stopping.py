"""How much of the release's stopping decision is float32 rounding: the measurement behind docs/api.md.

The release's class-oblivious loop (SGD, lr 0.5, 1000 iterations, its schedule) runs in float32, as
the release runs it, on resnet50 at layer4 (random weights, seed 0; their logits are large, so the
loss is well above 16) for a batch of random images, without stopping.  At every check (every 50
iterations) the script records the loss as the release computes it (float32) and the loss of the same
filter computed in float64.  The release stops at the first check where |loss_i - loss_(i-50)| < 1e-6
in float32.  Above 16, float32 numbers are 2^-19 = 1.9e-6 or more apart, so a float32 difference is
either 0 or at least that: the test only says whether two losses rounded to the same float32.

    python scripts/float32_stopping.py [--images 50]
"""

from __future__ import annotations

import argparse
import copy

import torch
import torchvision

from caffast.core.optimizers import polynomial_lr_decay

MIN_ERROR, CHECK_EVERY, MAX_ITER, LR = 1e-6, 50, 1000, 0.5


def checks(head32: torch.nn.Module, head64: torch.nn.Module, features: torch.Tensor) -> list[tuple[float, float]]:
    """(float32 loss, float64 loss) at every check of the release's loop, run in float32 to the end."""
    reference32, reference64 = head32(features), head64(features.double())
    filt = torch.ones(features.shape[-2:], requires_grad=True)
    found = []
    for step in range(MAX_ITER):
        loss = ((head32(features * (filt / filt.norm())) - reference32) ** 2).mean()
        (grad,) = torch.autograd.grad(loss, filt)
        with torch.no_grad():
            if step % CHECK_EVERY == 0:
                exact = filt.double() / filt.double().norm()
                found.append((loss, ((head64(features.double() * exact) - reference64) ** 2).mean().item()))
            filt -= polynomial_lr_decay(step, LR, MAX_ITER) * grad
    return found


def first_stop(losses: list, release: bool) -> int:
    """The iteration where the loop stops (MAX_ITER: it never does); release=True: its float32 test."""
    previous = torch.tensor(32767) if release else 32767.0
    for index, loss in enumerate(losses):
        if (torch.abs(loss.item() - previous) if release else abs(loss - previous)) < MIN_ERROR:
            return index * CHECK_EVERY
        previous = loss
    return MAX_ITER


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    store: list[torch.Tensor] = []
    handle = model.layer4.register_forward_hook(lambda module, inputs, output: store.append(output.detach()))
    with torch.no_grad():
        model(torch.randn(args.images, 3, 224, 224))
    handle.remove()
    head = torch.nn.Sequential(model.avgpool, torch.nn.Flatten(), model.fc).requires_grad_(False)
    head64 = copy.deepcopy(head).double()
    large = disagree = moved = 0
    different_stops, stops32, stops64, lowest = 0, [], [], float("inf")
    for n in range(args.images):
        found = checks(head, head64, store[0][n : n + 1])
        lowest = min(lowest, *(abs(l64) for _, l64 in found))
        for (l32_before, l64_before), (l32, l64) in zip(found, found[1:]):
            if abs(l64) <= 16:
                continue
            large += 1
            stop32 = bool(torch.abs(l32.item() - l32_before) < MIN_ERROR)  # the release's test, float32
            stop64 = abs(l64 - l64_before) < MIN_ERROR
            disagree += stop32 != stop64
            moved += abs(l64 - l64_before) >= MIN_ERROR
        stop32, stop64 = first_stop([l32 for l32, _ in found], True), first_stop([l64 for _, l64 in found], False)
        stops32.append(stop32)
        stops64.append(stop64)
        different_stops += stop32 != stop64
    print(f"resnet50 at layer4 (random weights, seed 0), class-oblivious, {args.images} images, "
          f"losses {lowest:.0f} and up: {large} checks after the first; the float64 loss moved by "
          f"1e-6 or more at {moved}; the release's float32 test decides otherwise than float64 at {disagree} "
          f"({100 * disagree / max(large, 1):.0f}%).")
    print(f"stopping iteration: float64 {sorted(set(stops64))}, the release's float32 {sorted(set(stops32))}; "
          f"different on {different_stops} of {args.images} images")


if __name__ == "__main__":
    main()
