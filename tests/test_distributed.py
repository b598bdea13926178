"""Multi-process training: 2 ranks on gloo over loopback, on CPU.

Each test starts two worker processes (this file, run as a script) that train the
same small model on different data. Every rank must end with exactly the same
params, and those must match one process running ``torch.optim.Adadelta`` on the
averaged gradient. Combinations that cannot work must be refused with a clear
error, never silently wrong.

The workers inherit ``TRITON_INTERPRET=1`` from conftest, so they run the Triton
kernel through the interpreter. Each run has a wall-clock limit, and its process
group is killed on the way out, so no worker outlives its test.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tolerances import TOLERANCES

WORLD_SIZE = 2
STEPS = 5
# A run is two interpreters importing torch and triton, then a few tiny steps.
RUN_TIMEOUT_S = 90
# gloo's own limit on a collective: a rank that raised leaves the other waiting.
COLLECTIVE_TIMEOUT_S = 30

PUZZLELIB_HPARAMS = {"lr": 1.0, "rho": 0.95, "eps": 1e-6}
TORCH_HPARAMS = {"lr": 1.0, "rho": 0.9, "eps": 1e-6, "weight_decay": 0.01}


# --------------------------------------------------------------------- the model
def make_model() -> nn.Module:
    """The same initial model on every rank; 5 output rows shard unevenly over 2."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s data at ``step``: different on every rank."""
    generator = torch.Generator().manual_seed(1000 * step + rank)
    return torch.randn(8, 12, generator=generator), torch.randn(8, 5, generator=generator)


def loss_of(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    inputs, target = batch(rank, step)
    return nn.functional.mse_loss(model(inputs), target)


class PartlyUsedNet(nn.Module):
    """A layer only rank 0 uses, and one that no rank uses."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5))
        self.rank0_only = nn.Linear(12, 5)
        self.unused = nn.Linear(3, 3)
        self.rank = 0

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.body(inputs)
        return out + self.rank0_only(inputs) if self.rank == 0 else out


def loss_of_partly_used(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    model.rank = rank
    return loss_of(model, rank, step)


def reference_params(
    hparams: dict[str, float],
    make: Callable[[], nn.Module] = make_model,
    loss: Callable[[nn.Module, int, int], torch.Tensor] = loss_of,
) -> list[torch.Tensor]:
    """One process, ``torch.optim.Adadelta`` on the gradient averaged over the ranks.

    A rank that has no grad for a param contributes zeros (as DDP does); a param
    that no rank has a grad for keeps a None grad and is skipped.
    """
    model = make()
    optimizer = torch.optim.Adadelta(model.parameters(), **hparams)
    for step in range(STEPS):
        grads = []
        for rank in range(WORLD_SIZE):
            model.zero_grad()
            loss(model, rank, step).backward()
            grads.append([None if p.grad is None else p.grad.clone() for p in model.parameters()])
        for param, *rank_grads in zip(model.parameters(), *grads):
            present = [grad for grad in rank_grads if grad is not None]
            param.grad = sum(present) / WORLD_SIZE if present else None
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


# ------------------------------------------------- what each rank runs (workers)
def train_puzzlelib(rank: int) -> list[torch.Tensor]:
    from triton_adadelta.puzzlelib import AdaDelta

    model = make_model()
    optimizer = AdaDelta(rho=PUZZLELIB_HPARAMS["rho"], epsilon=PUZZLELIB_HPARAMS["eps"], nodeinfo=dist.group.WORLD)
    optimizer.setupOn(model, useGlobalState=True)
    for step in range(STEPS):
        optimizer.zeroGradParams()
        loss_of(model, rank, step).backward()
        optimizer.update()
    return [p.detach().clone() for p in model.parameters()]


def train_puzzlelib_partly_used(rank: int) -> list[torch.Tensor]:
    from triton_adadelta.puzzlelib import AdaDelta

    model = PartlyUsedNet()
    optimizer = AdaDelta(rho=PUZZLELIB_HPARAMS["rho"], epsilon=PUZZLELIB_HPARAMS["eps"], nodeinfo=dist.group.WORLD)
    optimizer.setupOn(model)
    for step in range(STEPS):
        optimizer.zeroGradParams()
        loss_of_partly_used(model, rank, step).backward()
        optimizer.update()
    assert model.unused.weight.grad is None
    return [p.detach().clone() for p in model.parameters()]


def train_ddp(rank: int, optimizer_first: bool, gradient_as_bucket_view: bool) -> list[torch.Tensor]:
    from torch.nn.parallel import DistributedDataParallel

    from triton_adadelta import Adadelta

    model = make_model()
    if optimizer_first:
        optimizer = Adadelta(model.parameters(), **TORCH_HPARAMS)
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=gradient_as_bucket_view)
    else:
        ddp = DistributedDataParallel(model, gradient_as_bucket_view=gradient_as_bucket_view)
        optimizer = Adadelta(ddp.parameters(), **TORCH_HPARAMS)
    for step in range(STEPS):
        # Alternate: grads set to None, then zeroed views, so both paths are covered.
        optimizer.zero_grad(set_to_none=step % 2 == 0)
        loss_of(ddp, rank, step).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def make_balanced_model() -> nn.Module:
    """Four params that ZeRO splits two and two, so every rank packs a shared bucket."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 12))


def loss_of_balanced(model: nn.Module, rank: int, step: int) -> torch.Tensor:
    inputs, target = batch(rank, step)
    return nn.functional.mse_loss(model(inputs)[:, : target.shape[1]], target)


def train_zero(rank: int, parameters_as_bucket_view: bool) -> list[torch.Tensor]:
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel

    from triton_adadelta import Adadelta

    model = make_balanced_model() if parameters_as_bucket_view else make_model()
    ddp = DistributedDataParallel(model)
    optimizer = ZeroRedundancyOptimizer(
        ddp.parameters(),
        optimizer_class=Adadelta,
        parameters_as_bucket_view=parameters_as_bucket_view,
        **TORCH_HPARAMS,
    )
    for step in range(STEPS):
        optimizer.zero_grad()
        (loss_of_balanced if parameters_as_bucket_view else loss_of)(ddp, rank, step).backward()
        optimizer.step()
    return [p.detach().clone() for p in model.parameters()]


def train_fsdp2(rank: int) -> list[torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    from triton_adadelta import Adadelta

    model = make_model()
    fully_shard(model)
    optimizer = Adadelta(model.parameters(), **TORCH_HPARAMS)
    for step in range(STEPS):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()
    model.reshard()
    return [p.full_tensor().detach().clone() for p in model.parameters()]


SCENARIOS: dict[str, Callable[[int], list[torch.Tensor]]] = {
    "puzzlelib": train_puzzlelib,
    "puzzlelib_partly_used": train_puzzlelib_partly_used,
    "ddp": lambda rank: train_ddp(rank, optimizer_first=False, gradient_as_bucket_view=False),
    "ddp_optimizer_first": lambda rank: train_ddp(rank, optimizer_first=True, gradient_as_bucket_view=False),
    "ddp_bucket_view": lambda rank: train_ddp(rank, optimizer_first=False, gradient_as_bucket_view=True),
    "ddp_bucket_view_optimizer_first": lambda rank: train_ddp(rank, optimizer_first=True, gradient_as_bucket_view=True),
    "zero": lambda rank: train_zero(rank, parameters_as_bucket_view=False),
    "zero_bucket_view": lambda rank: train_zero(rank, parameters_as_bucket_view=True),
    "fsdp2": train_fsdp2,
}


def worker(scenarios: list[str], rank: int, port: int, out_dir: Path) -> None:
    """One rank: run each scenario in turn and save its params, or the error it raised."""
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    for scenario in scenarios:
        result: dict[str, Any]
        try:
            result = {"params": SCENARIOS[scenario](rank)}
        except Exception as error:  # reported to the test, which decides
            result = {"error_type": type(error).__name__, "error": str(error), "traceback": traceback.format_exc()}
        torch.save(result, out_dir / f"{scenario}-rank{rank}.pt")
        dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------- the test driver
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(scenarios: list[str], out_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Run ``scenarios`` in one launch of every rank; return each scenario's per-rank results."""
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    processes = [
        subprocess.Popen(
            [sys.executable, __file__, ",".join(scenarios), str(rank), str(port), str(out_dir)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, so it can be killed whole
        )
        for rank in range(WORLD_SIZE)
    ]
    outputs = []
    try:
        for process in processes:
            output, _ = process.communicate(timeout=RUN_TIMEOUT_S)
            outputs.append(output)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{scenarios}: the ranks did not finish within {RUN_TIMEOUT_S} s")
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    results: dict[str, list[dict[str, Any]]] = {}
    for scenario in scenarios:
        results[scenario] = []
        for rank, (process, output) in enumerate(zip(processes, outputs)):
            path = out_dir / f"{scenario}-rank{rank}.pt"
            assert path.exists(), f"{scenario}: rank {rank} exited with {process.returncode}:\n{output}"
            results[scenario].append(torch.load(path, weights_only=True))
    return results


def launch(scenarios: list[str]) -> Callable[[pytest.TempPathFactory], dict[str, list[dict[str, Any]]]]:
    """A module fixture that runs ``scenarios`` in one launch: one start-up for all."""

    @pytest.fixture(scope="module")
    def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
        return run_ranks(scenarios, tmp_path_factory.mktemp("ranks"))

    return results


def assert_ranks_match_reference(
    results: list[dict[str, Any]], hparams: dict[str, float], expected: list[torch.Tensor] | None = None
) -> None:
    for rank, result in enumerate(results):
        assert "params" in result, f"rank {rank} raised:\n{result['traceback']}"
    # Every rank applied the same update to the same averaged gradient: same bits.
    for rank, result in enumerate(results[1:], start=1):
        for index, (param, param0) in enumerate(zip(result["params"], results[0]["params"])):
            assert torch.equal(param, param0), f"rank {rank} differs from rank 0 in param {index}"
    if expected is None:
        expected = reference_params(hparams)
    assert len(results[0]["params"]) == len(expected)
    for param, reference in zip(results[0]["params"], expected):
        torch.testing.assert_close(
            param,
            reference,
            rtol=TOLERANCES["torch_parity_kernel_rtol"].value,
            atol=TOLERANCES["torch_parity_kernel_atol"].value,
        )


def assert_refused(results: list[dict[str, Any]], error_type: str, *words: str) -> None:
    for rank, result in enumerate(results):
        assert "error" in result, f"rank {rank} trained instead of refusing"
        assert result["error_type"] == error_type, f"rank {rank}: {result['traceback']}"
        for word in words:
            assert word in result["error"], f"rank {rank}: {result['error']!r} lacks {word!r}"


pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo"
)

DDP_SCENARIOS = ["ddp", "ddp_optimizer_first", "ddp_bucket_view", "ddp_bucket_view_optimizer_first"]
puzzlelib_results = launch(["puzzlelib", "puzzlelib_partly_used"])
ddp_results = launch(DDP_SCENARIOS)
sharded_results = launch(["zero", "zero_bucket_view", "fsdp2"])


def test_puzzlelib_nodeinfo_averages_grads_and_ranks_stay_identical(puzzlelib_results):
    assert_ranks_match_reference(puzzlelib_results["puzzlelib"], PUZZLELIB_HPARAMS)


def test_puzzlelib_nodeinfo_updates_a_param_that_only_one_rank_has_a_grad_for(puzzlelib_results):
    # Rank 1 contributes zeros for rank0_only; `unused` has no grad anywhere: skipped.
    expected = reference_params(PUZZLELIB_HPARAMS, PartlyUsedNet, loss_of_partly_used)
    assert_ranks_match_reference(puzzlelib_results["puzzlelib_partly_used"], PUZZLELIB_HPARAMS, expected)
    initial = PartlyUsedNet()
    for rank_result in puzzlelib_results["puzzlelib_partly_used"]:
        assert torch.equal(rank_result["params"][-2], initial.unused.weight.detach())


@pytest.mark.parametrize("scenario", DDP_SCENARIOS)
def test_ddp_matches_single_process_on_averaged_grad(scenario, ddp_results):
    # Either construction order, and DDP's grads as bucket views or not.
    assert_ranks_match_reference(ddp_results[scenario], TORCH_HPARAMS)


def test_zero_redundancy_optimizer_matches_single_process(sharded_results):
    assert_ranks_match_reference(sharded_results["zero"], TORCH_HPARAMS)


def test_zero_parameters_as_bucket_view_matches_single_process(sharded_results):
    # ZeRO's buckets own the params' storage; the optimizer updates the params where
    # they are, inside the buckets, so ZeRO broadcasts the updated values.
    expected = reference_params(TORCH_HPARAMS, make_balanced_model, loss_of_balanced)
    assert_ranks_match_reference(sharded_results["zero_bucket_view"], TORCH_HPARAMS, expected)


def test_fsdp2_dtensor_params_are_refused(sharded_results):
    # FSDP2 all-gathers from its own padded copy of each local shard, so params
    # rebound into a flat buffer would never reach the forward pass.
    assert_refused(sharded_results["fsdp2"], "TypeError", "DTensor")


if __name__ == "__main__":
    worker(sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
