"""Independent oracle for caffast: the official L2-CAF PyTorch loop, one problem at a time.

This module deliberately does NOT import caffast.  It restates the reference release
(ahmdtaha/l2_caf_pytorch, class_oblivious.py / class_specific.py) as plainly as possible:
one image, one target, a fresh filter, torch.optim + LambdaLR(polynomial decay), autograd
through the *whole* model, the breakpoint output replaced by a forward hook.  It is slow
but obviously right.  The filter has the breakpoint map's grid: (H, W), or (D, H, W) for a clip or
a volume, normalized over all its cells.
"""

import math

import torch
import torch.nn.functional as F

MAX_INT16 = 32767  # np.iinfo(np.int16).max, the reference's initial "previous loss"


def polynomial_lr_decay(global_step, init_learning_rate, max_iter, min_learning_rate=1e-5):
    """utils/lr_utils.py of the reference (power 1)."""
    power = 1
    return (init_learning_rate - min_learning_rate) * ((1 - global_step / max_iter) ** power) \
        + min_learning_rate


class TF1Adam(torch.optim.Optimizer):
    """TensorFlow 1's AdamOptimizer, restated from its documentation (beta1 0.9, beta2 0.999, eps 1e-8):
    t <- t + 1; lr_t <- lr * sqrt(1 - beta2^t) / (1 - beta1^t); m <- beta1 m + (1 - beta1) g;
    v <- beta2 v + (1 - beta2) g^2; variable <- variable - lr_t * m / (sqrt(v) + eps)."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state.update(t=0, m=torch.zeros_like(p), v=torch.zeros_like(p))
                state["t"] += 1
                t, g = state["t"], p.grad
                lr_t = group["lr"] * math.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
                state["m"] = 0.9 * state["m"] + (1 - 0.9) * g
                state["v"] = 0.999 * state["v"] + (1 - 0.999) * g * g
                p -= lr_t * state["m"] / (torch.sqrt(state["v"]) + 1e-8)


def get_module(model, layer):
    if isinstance(layer, torch.nn.Module):
        return layer
    return model.get_submodule(layer)


def gaussian_multiplier(mu, *grid):
    """exp(-((x - mu0)^2 + (y - mu1)^2) / 2) normalized to sum 1, on an (H, W) grid; on a (D, H, W)
    grid exp(-((x - mu0)^2 + (y - mu1)^2 + (z - mu2)^2) / 2).

    x_j = j - (W - 1) / 2 for column j, y_i = i - (H - 1) / 2 for row i, z_k = k - (D - 1) / 2 for
    slice k.
    """
    *depth, H, W = grid
    x = torch.arange(W, dtype=mu.dtype, device=mu.device) - (W - 1) / 2.0
    y = torch.arange(H, dtype=mu.dtype, device=mu.device) - (H - 1) / 2.0
    if not depth:
        g = torch.exp(-((x[None, :] - mu[0]) ** 2 + (y[:, None] - mu[1]) ** 2) / 2.0)
    else:
        z = torch.arange(depth[0], dtype=mu.dtype, device=mu.device) - (depth[0] - 1) / 2.0
        g = torch.exp(-((x[None, None, :] - mu[0]) ** 2 + (y[None, :, None] - mu[1]) ** 2
                        + (z[:, None, None] - mu[2]) ** 2) / 2.0)
    return g / g.sum()


def multiplier_of(param, constraint, *grid):
    """The forward multiplier applied to A (broadcast over channels); grid is H, W or D, H, W."""
    if constraint == "l2norm":
        return F.normalize(param, dim=list(range(param.dim())))
    if constraint == "softmax":
        return torch.softmax(param.flatten(), dim=0).view(*grid)
    if constraint == "gauss":
        return gaussian_multiplier(param, *grid)
    raise ValueError(constraint)


def final_map(param, constraint, *grid):
    """normalize_filter of the reference for l2norm; the softmax / gaussian for the others."""
    with torch.no_grad():
        if constraint == "l2norm":
            a = param.abs()
            return a / torch.linalg.norm(a)
        return multiplier_of(param, constraint, *grid)


def capture(model, layer, image):
    """One no-grad forward: NT (the unfiltered output) and A (the breakpoint output)."""
    module = get_module(model, layer)
    store = []
    h = module.register_forward_hook(lambda m, i, o: store.append(o.detach()))
    try:
        with torch.no_grad():
            NT = model(image)
    finally:
        h.remove()
    assert len(store) == 1, "breakpoint module must run exactly once per forward"
    return NT.detach(), store[0]


def reference_l2caf(model, image, layer, target=None, *, mode="oblivious", objective=None,
                    max_iter=1000, lr=0.5, min_error=1e-6, check_every=50, optimizer="sgd",
                    constraint="l2norm", init=None, end_lr=1e-5):
    """Solve ONE L2-CAF problem exactly as the reference loop does.

    image: (C, H, W) or (1, C, H, W), or a clip or a volume (1, C, D, H, W): the filter has the
    breakpoint map's grid, (H, W) or (D, H, W).  target: int class (mode="specific").
    objective: optional callable(FT, NT) -> per-sample loss (shape (1,)); replaces the built-in
    loss (the problem's loss is its sum).
    init: optional initial parameter (the grid's shape for l2norm/softmax, (2,) or (3,) for gauss);
    default ones / zeros (gauss).  end_lr: where the schedule ends (the TensorFlow release's: 0).
    Returns a dict: param (raw optimized variable), filter (raw filter; gaussian multiplier for
    gauss), map, iterations, loss (last computed loss), history [(i, loss_i)] at check iterations,
    NT, A, target.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    assert image.shape[0] == 1
    module = get_module(model, layer)
    NT, A = capture(model, layer, image)
    grid = tuple(A.shape[2:])
    dtype = A.dtype

    if constraint == "gauss":
        p0 = torch.zeros(len(grid), dtype=dtype) if init is None else init
    else:
        p0 = torch.ones(grid, dtype=dtype) if init is None else init
    param = torch.nn.Parameter(p0.detach().clone().to(dtype=dtype, device=A.device))

    if objective is not None:
        def loss_fn(FT):
            return objective(FT, NT).sum()
    elif mode == "oblivious":
        mse = torch.nn.MSELoss()

        def loss_fn(FT):
            return mse(FT, NT)
    elif mode == "specific":
        assert target is not None
        s = torch.ones_like(NT)
        s[0, int(target)] = -1

        def loss_fn(FT):
            return torch.sum(FT * s)
    else:
        raise ValueError(mode)

    if optimizer == "sgd":
        opt = torch.optim.SGD([param], lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam([param], lr=lr)
    elif optimizer == "adam_tf1":
        opt = TF1Adam([param], lr=lr)
    else:
        raise ValueError(optimizer)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_lambda=lambda step: polynomial_lr_decay(step, lr, max_iter, end_lr) / lr)

    current = {}
    hook = module.register_forward_hook(lambda m, i, o: A * current["mult"])
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in saved_flags:
        p.requires_grad_(False)
    history = []
    last_loss = None
    taken = 0
    try:
        prev_loss = float(MAX_INT16)
        i = 0
        while i < max_iter:
            current["mult"] = multiplier_of(param, constraint, *grid)
            FT = model(image)
            loss = loss_fn(FT)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            last_loss = loss.item()
            taken = i + 1
            if i % check_every == 0:
                history.append((i, last_loss))
                if abs(last_loss - prev_loss) < min_error:
                    break
                prev_loss = last_loss
            i += 1
    finally:
        hook.remove()
        for p, flag in saved_flags:
            p.requires_grad_(flag)

    param = param.detach()
    with torch.no_grad():
        filt = gaussian_multiplier(param, *grid) if constraint == "gauss" else param.clone()
    return {
        "param": param,
        "filter": filt,
        "map": final_map(param, constraint, *grid),
        "iterations": taken,
        "loss": last_loss,
        "history": history,
        "NT": NT,
        "A": A,
        "target": target,
    }


def min_check_delta(history):
    """Smallest |loss_i - loss_(i - check_every)| over the checks after the first one."""
    d = [abs(b[1] - a[1]) for a, b in zip(history, history[1:])]
    return min(d) if d else math.inf
