"""``make demo``: train one small model twice, with ours and with torch.optim.Adadelta.

Both runs start from the same seed and see the same batches. The demo prints the
losses side by side, the largest param difference at the end, each optimizer's
median step time, and which backend ran, and writes a PNG of both loss curves.

Run it with ``python -m triton_adadelta.demo [--steps N] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from . import Adadelta


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.GELU(), torch.nn.Linear(128, 128), torch.nn.GELU(), torch.nn.Linear(128, 1)
    )


def make_data(seed: int, n: int = 2048) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 32, generator=generator)
    # A smooth nonlinear target with a little noise.
    y = torch.sin(x[:, :8].sum(1, keepdim=True)) + 0.5 * x[:, 8:9] ** 2 + 0.05 * torch.randn(n, 1, generator=generator)
    return x, y


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int, seed: int) -> tuple[list[float], list[float]]:
    """Returns the loss of every step and the time of every ``optimizer.step()``."""
    generator = torch.Generator().manual_seed(seed)
    losses, step_times = [], []
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch,), generator=generator)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x[index]), y[index])
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        step_times.append(time.perf_counter() - start)
        losses.append(loss.item())
    return losses, step_times


def describe(backend: str) -> str:
    """A reader's name for a backend of :func:`triton_adadelta.backend_for`."""
    if backend == "torch":
        from .cpu import native_library

        return "CPU path, " + ("fused C loop" if native_library() is not None else "chunked torch ops")
    return {"triton": "Triton kernel", "triton-interpreter": "Triton kernel through Triton's interpreter"}.get(backend, backend)


def plot(losses: dict[str, list[float]], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # the demo extra installs it
        raise SystemExit(f"the loss plot needs matplotlib: pip install 'triton-adadelta[demo]' ({error})") from error
    figure, axis = plt.subplots(figsize=(7, 4))
    styles = {"triton_adadelta.Adadelta": {"linewidth": 3.0, "alpha": 0.6}, "torch.optim.Adadelta": {"linewidth": 1.2, "linestyle": "--", "color": "black"}}
    for name, curve in losses.items():
        axis.plot(range(1, len(curve) + 1), curve, label=name, **styles.get(name, {}))
    axis.set_yscale("log")
    axis.set_xlabel("step")
    axis.set_ylabel("training loss (MSE)")
    axis.set_title("Same model, same seed, same batches")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="demo_loss.png", help="where to write the loss curves")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1:
        parser.error("--steps and --batch must be positive")

    device = torch.device(args.device)
    x, y = make_data(seed=1)
    x, y = x.to(device), y.to(device)
    model = make_model(seed=0).to(device)
    reference = copy.deepcopy(model)
    ours = Adadelta(model.parameters(), lr=1.0, rho=0.9, weight_decay=1e-4)
    theirs = torch.optim.Adadelta(reference.parameters(), lr=1.0, rho=0.9, weight_decay=1e-4)

    our_losses, our_times = train(model, ours, x, y, args.steps, args.batch, seed=2)
    torch_losses, torch_times = train(reference, theirs, x, y, args.steps, args.batch, seed=2)

    print(f"backend: {', '.join(describe(name) for name in ours.backends())} on {device}")
    print(f"{'step':>6} {'triton_adadelta':>16} {'torch.optim':>14}")
    every = max(1, args.steps // 10)
    shown = sorted({0, args.steps - 1, *range(every - 1, args.steps, every)})
    for i in shown:
        print(f"{i + 1:>6} {our_losses[i]:>16.6f} {torch_losses[i]:>14.6f}")
    difference = max((a - b).abs().max().item() for a, b in zip(model.parameters(), reference.parameters()))
    print(f"largest param difference after {args.steps} steps: {difference:.3e}")
    # The first steps include one-time set-up (packing, compilation): report the median.
    print(
        f"median step time: triton_adadelta {statistics.median(our_times) * 1e3:.3f} ms, "
        f"torch.optim.Adadelta {statistics.median(torch_times) * 1e3:.3f} ms "
        f"(first step: {our_times[0] * 1e3:.1f} ms vs {torch_times[0] * 1e3:.1f} ms)"
    )
    plot({"triton_adadelta.Adadelta": our_losses, "torch.optim.Adadelta": torch_losses}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
