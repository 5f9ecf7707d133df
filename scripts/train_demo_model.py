"""Train caffast.eval.demo_model.DemoCNN on procedural scenes and save its weights into caffast/eval/assets.

Seeded and CPU-only: about 4 CPU-minutes (one thread, the default, gives the same weights bit for bit).
Training mixes one-object scenes (one-hot targets) with two-object scenes (probability 1/2 on each
class), so class-specific maps of a pair are meaningful.
Held-out scenes use seeds from caffast.eval.scenes.HELDOUT_START up, which training never touches.

    python scripts/train_demo_model.py [--singles 6000 --pairs 3000 --epochs 4 --threads 1]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from caffast.eval.scenes import HELDOUT_START, SceneDataset
from caffast.eval.demo_model import WEIGHTS, DemoCNN

ASSETS = Path(__file__).resolve().parents[1] / "caffast" / "eval" / "assets"


def render(seeds: range, objects: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized images (N, 3, 64, 64) and target distributions (N, K) of the scenes of `seeds`."""
    images, targets = zip(*SceneDataset(seeds, objects))
    return torch.stack(images), torch.stack(targets)


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random flip and quarter turn per batch: neither changes the class of a shape."""
    turns = int(torch.randint(4, (1,), generator=generator))
    flipped = images.flip(-1) if torch.rand(1, generator=generator) < 0.5 else images
    return torch.rot90(flipped, turns, dims=(-2, -1))


@torch.no_grad()
def accuracy(model: DemoCNN, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of scenes whose k classes are exactly the model's top k (k = objects per scene)."""
    model.eval()
    logits = torch.cat([model(chunk) for chunk in images.split(256)])
    k = int((targets[0] > 0).sum())
    predicted = logits.topk(k, dim=1).indices.sort(dim=1).values
    truth = targets.topk(k, dim=1).indices.sort(dim=1).values
    return float((predicted == truth).all(dim=1).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--singles", type=int, default=6000, help="one-object training scenes")
    parser.add_argument("--pairs", type=int, default=3000, help="two-object training scenes")
    parser.add_argument("--heldout", type=int, default=500, help="held-out scenes of each kind")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="one thread gives bit-for-bit the same weights")
    parser.add_argument("--out", type=Path, default=ASSETS / WEIGHTS)
    args = parser.parse_args()
    assert max(args.singles, args.pairs) <= HELDOUT_START, "training seeds must stay below HELDOUT_START"

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()

    single_x, single_y = render(range(args.singles), 1)
    pair_x, pair_y = render(range(args.pairs), 2)
    images, targets = torch.cat([single_x, pair_x]), torch.cat([single_y, pair_y])
    heldout = range(HELDOUT_START, HELDOUT_START + args.heldout)
    test_single, test_pair = render(heldout, 1), render(heldout, 2)
    print(f"rendered {len(images)} training scenes in {time.perf_counter() - start:.1f} s")

    model = DemoCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * -(-len(images) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator)
        total = 0.0
        for batch in order.split(args.batch):
            loss = F.cross_entropy(model(augment(images[batch], generator)), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        print(
            f"epoch {epoch + 1}/{args.epochs}: loss {total / len(images):.4f}, "
            f"held-out single {accuracy(model, *test_single):.3f}, pair top-2 {accuracy(model, *test_pair):.3f}, "
            f"{time.perf_counter() - start:.0f} s"
        )

    print(
        f"train: single {accuracy(model, single_x, single_y):.4f}, pair top-2 {accuracy(model, pair_x, pair_y):.4f}; "
        f"held-out ({args.heldout} each): single {accuracy(model, *test_single):.4f}, "
        f"pair top-2 {accuracy(model, *test_pair):.4f}"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
