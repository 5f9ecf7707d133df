"""The reference release's "fast" loop, restated: one image and one class at a time, autograd
through the head (`post_conv_subnet`) on the captured feature map.  This is the speed baseline."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from caffast import L2_CAF, polynomial_lr_decay


def reference_fast_loop(head, features, output, target=None, max_iter=1000, lr=0.5, min_error=1e-6):
    """features (1, C, H, W), output (1, K); returns the optimizer steps taken."""
    caf = L2_CAF(tuple(features.shape[-2:])).to(features.device)
    optimizer = torch.optim.SGD(caf.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: polynomial_lr_decay(step, lr, max_iter) / lr
    )
    signs = torch.ones_like(output)
    if target is not None:
        signs[0, target] = -1
    previous = torch.tensor(32767.0)
    iteration = 0
    while iteration < max_iter:
        filtered_output = head(caf(features))
        if target is None:
            loss = F.mse_loss(filtered_output, output)
        else:
            loss = (filtered_output * signs).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if iteration % 50 == 0:
            if torch.abs(loss.item() - previous) < min_error:
                return iteration + 1
            previous = loss.detach()
        iteration += 1
    return iteration
