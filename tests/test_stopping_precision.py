"""The stopping test is decided in float64: above |loss| = 16 float32 cannot resolve min_error 1e-6."""

import numpy as np
import torch

from caffast.core.loop import LoopSettings, solve


class Scripted:
    """A problem whose loss at evaluation k is losses[k] (a zero gradient: only the stopping rule acts)."""

    def __init__(self, losses):
        self.losses, self.calls = losses, 0

    def loss_and_grad(self, params, active):
        loss = torch.full((active.numel(),), self.losses[self.calls], dtype=torch.float64)
        self.calls += 1
        return loss, torch.zeros_like(params)


def release_test(a, b, min_error=1e-6):
    """The release's decision: loss.item() - prev_loss with float32 tensors, compared in float32."""
    return bool(torch.abs(torch.tensor(a, dtype=torch.float32).item() - torch.tensor(b, dtype=torch.float32))
                < min_error)  # fmt: skip


def steps_taken(losses):
    settings = LoopSettings(max_iter=len(losses), lr=0.1, min_error=1e-6, check_every=1, optimizer="sgd")
    return int(solve(Scripted(losses), torch.ones(1, 4, dtype=torch.float64), settings).iterations[0])


def test_float32_spacing_above_16_exceeds_min_error():
    assert np.spacing(np.float32(16.0)) == 2.0**-19 > 1e-6
    assert np.spacing(np.float32(15.99)) < 1e-6


def test_the_loop_decides_in_float64_where_float32_cannot():
    base = float(np.float32(20.0)) + 0.9e-6  # just below the midpoint to the next float32 (1.9e-6 away)
    # moved by 0.5e-6: float64 stops, while the release's float32 values differ by one spacing and go on
    moved_little = base + 0.5e-6
    assert not release_test(moved_little, base)
    assert steps_taken([base, moved_little, 0.0, 0.0]) == 2
    # moved by 1.5e-6 within one float32: float64 goes on, the release's test stops
    start = float(np.float32(20.0)) - 0.9e-6
    moved_more = start + 1.5e-6
    assert release_test(moved_more, start)
    assert steps_taken([start, moved_more, 5.0, 9.0]) == 4
