"""The seed's example: PuzzleLib's AdaDelta loop, in PyTorch.

Run it as it is (CPU or GPU)::

    python examples/seed_quickstart.py

It fits a small net to 16 random samples of 128 features with random class labels
and prints the error every 5 iterations; the error falls.
"""

from __future__ import annotations

import torch
from torch import nn

from triton_adadelta.puzzlelib import AdaDelta


def cross_entropy(predictions: torch.Tensor, target: torch.Tensor) -> tuple[float, torch.Tensor]:
    """PuzzleLib-style loss: the mean cross-entropy and its gradient w.r.t. ``predictions``."""
    logits = predictions.detach()
    probabilities = torch.softmax(logits, dim=1)
    error = -torch.log(probabilities[torch.arange(len(target)), target]).mean().item()
    # d(mean cross-entropy)/d(logits) = (softmax - one_hot) / batch size
    grad = probabilities.clone()
    grad[torch.arange(len(target)), target] -= 1.0
    return error, grad / len(target)


def main(iterations: int = 100, seed: int = 0) -> list[float]:
    """Train for ``iterations`` updates; return the error of every iteration."""
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = torch.randn(16, 128, device=device)
    target = torch.randint(0, 10, (16,), device=device)
    net = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10)).to(device)

    optimizer = AdaDelta()  # rho=0.95, epsilon=1e-6, nodeinfo=None
    optimizer.setupOn(net, useGlobalState=True)

    errors = []
    for i in range(iterations):
        predictions = net(data)
        error, grad = cross_entropy(predictions, target)
        optimizer.zeroGradParams()
        predictions.backward(grad)  # PuzzleLib: net.backward(grad)
        optimizer.update()
        errors.append(error)
        if (i + 1) % 5 == 0:
            print("Iteration #%d error: %s" % (i + 1, error))
    return errors


if __name__ == "__main__":
    main()
