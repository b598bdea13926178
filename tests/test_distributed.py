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


FSDP2_STEPS = 20
# Where a scenario may write files (a checkpoint): set by the worker.
SCRATCH = Path(".")


def _fsdp2_model_and_optimizer(optimizer_class: type, **options: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    fully_shard(model)
    return model, optimizer_class(model.parameters(), **TORCH_HPARAMS, **options)


def _fsdp2_steps(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: range) -> None:
    for step in steps:
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        optimizer.step()


def _local_shards_and_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """This rank's local shards, then each param's state (DTensors: their local tensors)."""
    out = [p.to_local().detach().clone() for p in model.parameters()]
    for p in model.parameters():
        state = optimizer.state[p]
        out += [state["square_avg"].to_local().clone(), state["acc_delta"].to_local().clone(), state["step"].clone()]
    return out


def _state_dict_layout(optimizer: torch.optim.Optimizer) -> list[str]:
    """What a state_dict looks like: its group keys, then each value's type and placements."""
    state_dict = optimizer.state_dict()
    layout = sorted(state_dict["param_groups"][0])
    for index, state in sorted(state_dict["state"].items()):
        for name, value in sorted(state.items()):
            placements = getattr(value, "placements", None)
            layout.append(f"{index} {name} {type(value).__name__} {placements} {tuple(value.shape)} {value.dtype}")
    return layout


def train_fsdp2(rank: int, optimizer_class_name: str) -> dict[str, Any]:
    from triton_adadelta import Adadelta

    optimizer_class = {"ours": Adadelta, "torch": torch.optim.Adadelta}[optimizer_class_name]
    model, optimizer = _fsdp2_model_and_optimizer(optimizer_class)
    _fsdp2_steps(model, optimizer, rank, range(FSDP2_STEPS))
    result = {"params": _local_shards_and_state(model, optimizer), "layout": _state_dict_layout(optimizer)}
    if optimizer_class is torch.optim.Adadelta:  # (which takes anything, to fail at its next step)
        return result
    # A state_dict of full (plain) tensors for DTensor params: refused, nothing changed.
    saved = optimizer.state_dict()
    full = {
        "param_groups": saved["param_groups"],
        "state": {
            index: {**state, "square_avg": state["square_avg"].full_tensor(), "acc_delta": state["acc_delta"].full_tensor()}
            for index, state in saved["state"].items()
        },
    }
    try:
        optimizer.load_state_dict(full)
    except ValueError as error:
        result["full_state_refused"] = str(error)
    result["after_refusal"] = _local_shards_and_state(model, optimizer)
    return result


def train_fsdp2_checkpoint(rank: int, state_dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Half the steps, a save through torch.distributed.checkpoint, the other half;
    then a fresh model and optimizer load the save and take the second half again.
    It is also resumed from a full (gathered) state_dict, as
    ``StateDictOptions(full_state_dict=True)`` gives and takes it; torch's generator is
    reseeded before each resume, as a new process would find it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    from triton_adadelta import Adadelta

    half = FSDP2_STEPS // 2
    checkpoint = SCRATCH / f"fsdp2_checkpoint_{str(state_dtype).removeprefix('torch.')}"
    model, optimizer = _fsdp2_model_and_optimizer(Adadelta, state_dtype=state_dtype)
    _fsdp2_steps(model, optimizer, rank, range(half))
    dcp.save(
        {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)},
        checkpoint_id=checkpoint,
    )
    full = StateDictOptions(full_state_dict=True)
    full_checkpoint = checkpoint.with_suffix(".pt")
    torch.save(
        {"model": get_model_state_dict(model, options=full), "optim": get_optimizer_state_dict(model, optimizer, options=full)},
        full_checkpoint,
    )  # fmt: skip
    _fsdp2_steps(model, optimizer, rank, range(half, FSDP2_STEPS))
    result = {"params": _local_shards_and_state(model, optimizer)}

    torch.manual_seed(1000 + rank)
    resumed_model, resumed_optimizer = _fsdp2_model_and_optimizer(Adadelta, state_dtype=state_dtype)
    state = {
        "model": get_model_state_dict(resumed_model),
        "optim": get_optimizer_state_dict(resumed_model, resumed_optimizer),
    }
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(resumed_model, state["model"])
    set_optimizer_state_dict(resumed_model, resumed_optimizer, state["optim"])
    _fsdp2_steps(resumed_model, resumed_optimizer, rank, range(half, FSDP2_STEPS))
    result["resumed"] = _local_shards_and_state(resumed_model, resumed_optimizer)
    torch.manual_seed(2000 + rank)
    resumed_model, resumed_optimizer = _fsdp2_model_and_optimizer(Adadelta, state_dtype=state_dtype)
    loaded = torch.load(full_checkpoint, weights_only=True)
    set_model_state_dict(resumed_model, loaded["model"], options=full)
    set_optimizer_state_dict(resumed_model, resumed_optimizer, loaded["optim"], options=full)
    _fsdp2_steps(resumed_model, resumed_optimizer, rank, range(half, FSDP2_STEPS))
    result["resumed_from_full"] = _local_shards_and_state(resumed_model, resumed_optimizer)
    return result


def _low_precision_steps(model: nn.Module, optimizer: torch.optim.Optimizer, rank: int, steps: range) -> None:
    """:func:`_fsdp2_steps` for a model of any dtype (the data in the model's dtype)."""
    dtype = next(model.parameters()).dtype
    for step in steps:
        optimizer.zero_grad()
        inputs, target = batch(rank, step)
        nn.functional.mse_loss(model(inputs.to(dtype)), target.to(dtype)).backward()
        optimizer.step()


def train_fsdp2_saving(rank: int) -> dict[str, Any]:
    """torch.save and deepcopy of the state_dict of DTensor params (fp32 state and the
    master copy are live views of the flat state, at offsets), a compiled read of
    ``optimizer.state``, and torch's checkpoint
    of a bf16 model loaded into ours with master weights through DCP's partial load."""
    import copy
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict, set_state_dict
    from torch.distributed.fsdp import fully_shard

    from triton_adadelta import Adadelta

    def sharded_model(dtype: torch.dtype, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 5)).to(dtype)
        fully_shard(model)
        return model

    def locals_of(state_dict: dict[str, Any]) -> list[torch.Tensor]:
        return [
            value.to_local() if hasattr(value, "to_local") else value
            for _, state in sorted(state_dict["state"].items()) for _, value in sorted(state.items())
        ]  # fmt: skip

    result: dict[str, Any] = {}
    for name, dtype, options in (("fp32", torch.float32, {}), ("bf16, master weights", torch.bfloat16, {"master_weights": True})):
        model = sharded_model(dtype)
        optimizer = Adadelta(model.parameters(), **TORCH_HPARAMS, **options)
        _low_precision_steps(model, optimizer, rank, range(3))
        for source, state_dict in (("state_dict", optimizer.state_dict()), ("dcp", get_optimizer_state_dict(model, optimizer))):
            buffer = io.BytesIO()
            torch.save(state_dict, buffer)
            buffer.seek(0)
            copies = {"torch.save": torch.load(buffer, weights_only=True), "deepcopy": copy.deepcopy(state_dict)}
            for how, saved in copies.items():
                result[f"{name}: {source} through {how}"] = all(
                    torch.equal(a, b) for a, b in zip(locals_of(saved), locals_of(state_dict))
                )  # fmt: skip
        # optimizer.state keeps DTensors that torch.compile traces (the saveable wrappers
        # of state_dict() it cannot: dynamo's fake copy of one failed).
        state = optimizer.state[list(model.parameters())[-1]]  # at an offset of the flat state
        compiled = torch.compile(lambda tensor: (tensor * 2).to_local().sum(), backend="eager")
        result[f"{name}: compiled read of optimizer.state"] = bool(
            compiled(state["square_avg"]) == (state["square_avg"].to_local() * 2).sum()
        )

    # torch's checkpoint holds no master_param: the template's (ours, of a fresh model) stays.
    checkpoint = SCRATCH / "fsdp2_torch_bf16"
    model = sharded_model(torch.bfloat16)
    optimizer = torch.optim.Adadelta(model.parameters(), **TORCH_HPARAMS)
    _low_precision_steps(model, optimizer, rank, range(3))
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=checkpoint)
    saved_params = [p.to_local().detach().clone() for p in model.parameters()]
    fresh = sharded_model(torch.bfloat16, seed=5)
    ours = Adadelta(fresh.parameters(), **TORCH_HPARAMS, master_weights=True)
    fresh_params = [p.to_local().detach().clone() for p in fresh.parameters()]
    model_state, optimizer_state = get_state_dict(fresh, ours)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, checkpoint_id=checkpoint, planner=DefaultLoadPlanner(allow_partial_load=True))
    set_state_dict(fresh, ours, model_state_dict=state["model"], optim_state_dict=state["optim"])
    _low_precision_steps(fresh, ours, rank, range(3, 4))
    after = [p.to_local().detach().float() for p in fresh.parameters()]
    result["partial load: from the checkpoint"] = max((a - b.float()).abs().max().item() for a, b in zip(after, saved_params))
    result["partial load: from the fresh model"] = max((a - b.float()).abs().max().item() for a, b in zip(after, fresh_params))
    result["params"] = after
    return result


def _compressed_state(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each param's stored state as it is (codes, bf16 values), DTensors' local tensors,
    and 8-bit state's scales."""
    out = []
    for param in params:
        state = optimizer.state[param]
        for name in ("square_avg", "acc_delta", "square_avg_scale", "acc_delta_scale"):
            if name in state:
                value = state[name]
                out.append((value.to_local() if hasattr(value, "to_local") else value).clone())
    return out


def train_fsdp2_compressed(rank: int, state_dtype: torch.dtype) -> dict[str, Any]:
    """FSDP2 with compressed state, beside a plain optimizer over copies of this rank's
    shards given the same grads and rounding seed: the same state layout, so the same
    bits are expected of both."""
    from triton_adadelta import Adadelta

    model, optimizer = _fsdp2_model_and_optimizer(Adadelta, state_dtype=state_dtype)
    params = list(model.parameters())
    twins = [nn.Parameter(p.to_local().detach().clone()) for p in params]
    twin_optimizer = Adadelta(twins, **TORCH_HPARAMS, state_dtype=state_dtype)
    for each in (optimizer, twin_optimizer):
        each.param_groups[0]["rounding_seed"] = 12345
    for step in range(FSDP2_STEPS):
        optimizer.zero_grad()
        loss_of(model, rank, step).backward()
        for param, twin in zip(params, twins):
            twin.grad = param.grad.to_local().detach().clone()
        optimizer.step()
        twin_optimizer.step()
    result = {
        "params": [p.to_local().detach().clone() for p in params] + _compressed_state(optimizer, params),
        "twin": [p.detach().clone() for p in twins] + _compressed_state(twin_optimizer, twins),
        "layout": _state_dict_layout(optimizer),
    }
    # The state_dict's fp32 DTensors hold the stored state's values, shard by shard.
    saved = optimizer.state_dict()["state"]
    twin_saved = twin_optimizer.state_dict()["state"]
    result["state_dict_values_match"] = all(
        torch.equal(saved[index][name].to_local(), twin_saved[index][name])
        for index in saved for name in ("square_avg", "acc_delta")
    )  # fmt: skip
    try:
        optimizer.compact_state_dict()
    except ValueError as error:
        result["compact_refused"] = str(error)
    return result


def run_readme_snippet(name: str) -> dict[str, Any]:
    """README's "Use with" snippet ``name``, as it stands, on this rank."""
    from readme_snippets import run_snippet

    namespace = run_snippet(name)
    model, optimizer = namespace["model"], namespace["optimizer"]
    # ZeroRedundancyOptimizer keeps the state of this rank's params in its own optimizer.
    inner = getattr(optimizer, "optim", optimizer)
    params = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    state = namespace.get("state")
    return {
        "params": [p.detach().clone() for p in params],
        "steps": [float(entry["step"]) for entry in inner.state.values()],
        "optimizer": type(inner).__module__,
        "state_types": sorted({type(v).__name__ for entry in state["state"].values() for v in entry.values()})
        if isinstance(state, dict) else [],
    }


SCENARIOS: dict[str, Callable[[int], list[torch.Tensor]]] = {
    "puzzlelib": train_puzzlelib,
    "puzzlelib_partly_used": train_puzzlelib_partly_used,
    "ddp": lambda rank: train_ddp(rank, optimizer_first=False, gradient_as_bucket_view=False),
    "ddp_optimizer_first": lambda rank: train_ddp(rank, optimizer_first=True, gradient_as_bucket_view=False),
    "ddp_bucket_view": lambda rank: train_ddp(rank, optimizer_first=False, gradient_as_bucket_view=True),
    "ddp_bucket_view_optimizer_first": lambda rank: train_ddp(rank, optimizer_first=True, gradient_as_bucket_view=True),
    "zero": lambda rank: train_zero(rank, parameters_as_bucket_view=False),
    "zero_bucket_view": lambda rank: train_zero(rank, parameters_as_bucket_view=True),
    "fsdp2": lambda rank: train_fsdp2(rank, "ours"),
    "fsdp2_torch": lambda rank: train_fsdp2(rank, "torch"),
    "fsdp2_checkpoint": train_fsdp2_checkpoint,
    "fsdp2_saving": train_fsdp2_saving,
    "fsdp2_bf16_state": lambda rank: train_fsdp2_compressed(rank, torch.bfloat16),
    "fsdp2_8_bit_state": lambda rank: train_fsdp2_compressed(rank, torch.uint8),
    "fsdp2_checkpoint_bf16_state": lambda rank: train_fsdp2_checkpoint(rank, torch.bfloat16),
    "fsdp2_checkpoint_8_bit_state": lambda rank: train_fsdp2_checkpoint(rank, torch.uint8),
    "readme_ddp": lambda rank: run_readme_snippet("ddp"),
    "readme_zero": lambda rank: run_readme_snippet("zero"),
    "readme_fsdp2": lambda rank: run_readme_snippet("fsdp2"),
}


def worker(scenarios: list[str], rank: int, port: int, out_dir: Path) -> None:
    """One rank: run each scenario in turn and save its params, or the error it raised."""
    global SCRATCH
    SCRATCH = out_dir
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
            outcome = SCENARIOS[scenario](rank)
            result = outcome if isinstance(outcome, dict) else {"params": outcome}
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
sharded_results = launch(["zero", "zero_bucket_view"])
fsdp2_results = launch(["fsdp2", "fsdp2_torch", "fsdp2_checkpoint", "fsdp2_saving"])
readme_results = launch(["readme_ddp", "readme_zero", "readme_fsdp2"])
COMPRESSED_STATES = ["bf16_state", "8_bit_state"]
fsdp2_compressed_results = launch(
    [f"fsdp2_{state}" for state in COMPRESSED_STATES] + [f"fsdp2_checkpoint_{state}" for state in COMPRESSED_STATES]
)


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


def _assert_trained(results: list[dict[str, Any]]) -> None:
    for rank, result in enumerate(results):
        assert "params" in result, f"rank {rank} raised:\n{result['traceback']}"


def test_fsdp2_updates_each_rank_s_shards_as_torch_does(fsdp2_results):
    ours, theirs = fsdp2_results["fsdp2"], fsdp2_results["fsdp2_torch"]
    _assert_trained(ours)
    _assert_trained(theirs)
    for rank in range(WORLD_SIZE):
        # Local shards, then square_avg, acc_delta and step of every param.
        assert len(ours[rank]["params"]) == len(theirs[rank]["params"]) == 4 * 4
        for index, (a, b) in enumerate(zip(ours[rank]["params"], theirs[rank]["params"])):
            assert a.shape == b.shape, f"rank {rank}, tensor {index}"
            torch.testing.assert_close(
                a, b,
                rtol=TOLERANCES["torch_parity_kernel_rtol"].value,
                atol=TOLERANCES["torch_parity_kernel_atol"].value,
                msg=lambda message: f"rank {rank}, tensor {index}: {message}",
            )  # fmt: skip
    # The 5 output rows shard unevenly: rank 1 holds 2 of them.
    assert ours[1]["params"][2].shape == (2, 16)


def test_fsdp2_refuses_full_tensor_state_for_dtensor_params_and_changes_nothing(fsdp2_results):
    for rank, result in enumerate(fsdp2_results["fsdp2"]):
        assert "DTensor" in result.get("full_state_refused", ""), f"rank {rank}: {result.get('full_state_refused')}"
        assert "set_optimizer_state_dict" in result["full_state_refused"] or "get_optimizer_state_dict" in (
            result["full_state_refused"]
        )
        assert all(torch.equal(a, b) for a, b in zip(result["params"], result["after_refusal"]))


def test_fsdp2_state_dict_looks_like_torch_s(fsdp2_results):
    _assert_trained(fsdp2_results["fsdp2"])
    for rank in range(WORLD_SIZE):
        ours, theirs = fsdp2_results["fsdp2"][rank]["layout"], fsdp2_results["fsdp2_torch"][rank]["layout"]
        # Our groups carry torch's keys and our own (master_weights, stochastic_rounding,
        # state_dtype, and the rounding's seeds, whatever the mode).
        assert set(theirs) - set(ours) == set()
        assert set(ours) - set(theirs) == {
            "master_weights", "stochastic_rounding", "state_dtype", "rounding_seed", "rounding_launches"
        }  # fmt: skip
        states = [line for line in ours if line[0].isdigit()]
        assert states == [line for line in theirs if line[0].isdigit()] and len(states) == 4 * 3
        assert "0 square_avg DTensor (Shard(dim=0),) (16, 12) torch.float32" in states


def test_fsdp2_resumes_bit_identically_through_distributed_checkpoint(fsdp2_results):
    # Sharded (dcp.save) and full (full_state_dict=True) state dicts alike.
    results = fsdp2_results["fsdp2_checkpoint"]
    _assert_trained(results)
    for rank, result in enumerate(results):
        for resume in ("resumed", "resumed_from_full"):
            for index, (a, b) in enumerate(zip(result["params"], result[resume])):
                assert torch.equal(a, b), f"rank {rank}, tensor {index} differs after the {resume} run"


def test_fsdp2_state_of_live_views_saves_copies_and_compiles(fsdp2_results):
    # torch pickled a DTensor over a view at an offset through the wrapper's absent
    # storage: torch.save and deepcopy of the state_dict failed in fp32 and with
    # master weights ("invalid python storage").
    results = fsdp2_results["fsdp2_saving"]
    _assert_trained(results)
    for rank, result in enumerate(results):
        checks = {key: value for key, value in result.items() if key.startswith(("fp32", "bf16"))}
        assert len(checks) == 2 * (2 * 2 + 1)
        assert all(checks.values()), f"rank {rank}: {checks}"


def test_fsdp2_partial_load_of_torch_s_checkpoint_keeps_the_checkpoint_s_params_with_master_weights(fsdp2_results):
    # The template's master_param (the fresh model's) no longer wins over the loaded params.
    for rank, result in enumerate(fsdp2_results["fsdp2_saving"]):
        assert result["partial load: from the checkpoint"] < 0.1, f"rank {rank}: {result}"
        assert result["partial load: from the fresh model"] > 0.5, f"rank {rank}: {result}"


@pytest.mark.parametrize("state", COMPRESSED_STATES)
def test_fsdp2_compressed_state_is_a_plain_optimizer_s_on_each_rank_s_shards(
    fsdp2_results, fsdp2_compressed_results, state: str
):
    results = fsdp2_compressed_results[f"fsdp2_{state}"]
    _assert_trained(results)
    for rank, result in enumerate(results):
        # Shards, then the stored state (8-bit: codes and scales) of every param, bit for bit.
        assert len(result["params"]) == len(result["twin"]) == 4 * (5 if state == "8_bit_state" else 3)
        for index, (ours, twin) in enumerate(zip(result["params"], result["twin"])):
            assert ours.dtype == twin.dtype and torch.equal(ours, twin), f"rank {rank}, tensor {index}"
        assert result["params"][4].dtype == (torch.uint8 if state == "8_bit_state" else torch.bfloat16)
        assert result["state_dict_values_match"], f"rank {rank}"
        # torch's format: fp32 DTensors of the params' placements, as torch's Adadelta saves.
        states = [line for line in result["layout"] if line[0].isdigit()]
        assert states == [line for line in fsdp2_results["fsdp2_torch"][rank]["layout"] if line[0].isdigit()]
    if state == "8_bit_state":
        for result in results:
            assert "state_dict()" in result.get("compact_refused", ""), result.get("compact_refused")
    # An unevenly sharded param: rank 1 holds 2 of the 5 output rows.
    assert results[1]["params"][2].shape == (2, 16)


@pytest.mark.parametrize("state", COMPRESSED_STATES)
def test_fsdp2_compressed_state_resumes_bit_for_bit_from_sharded_and_full_checkpoints(fsdp2_compressed_results, state: str):
    results = fsdp2_compressed_results[f"fsdp2_checkpoint_{state}"]
    _assert_trained(results)
    for rank, result in enumerate(results):
        for resume in ("resumed", "resumed_from_full"):
            for index, (a, b) in enumerate(zip(result["params"], result[resume])):
                assert torch.equal(a, b), f"rank {rank}, tensor {index} differs after the {resume} run"


@pytest.mark.parametrize("name", ["readme_ddp", "readme_zero", "readme_fsdp2"])
def test_readme_s_distributed_snippets_run_on_two_ranks(readme_results, name: str):
    results = readme_results[name]
    _assert_trained(results)
    for rank, result in enumerate(results):
        assert result["optimizer"] == "triton_adadelta.optimizer"
        # ZeRO: each rank holds the state of its own share of the params.
        assert result["steps"] and set(result["steps"]) == {3.0}, f"rank {rank}: {result['steps']}"
        assert all(torch.isfinite(p).all() for p in result["params"])
    if name != "readme_fsdp2":  # DDP and ZeRO: every rank ends with the same params
        for a, b in zip(results[0]["params"], results[1]["params"]):
            assert torch.equal(a, b)
    else:
        assert results[0]["state_types"] == ["DTensor", "Tensor"]


if __name__ == "__main__":
    worker(sys.argv[1].split(","), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))


# A resume through torch.distributed.checkpoint's state_dict helpers (FSDP2, Lightning's
# ModelParallelStrategy, Accelerate) and through ZeroRedundancyOptimizer, whose state
# dicts keep only 'state' and 'param_groups': the rounding's seeds must live there. In
# a process of its own (one gloo rank), with torch's generator reseeded before the
# resume, as a new process would find it.
_RESUME_SCRIPT = r"""
import io, os, sys, tempfile, torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.optim import ZeroRedundancyOptimizer
from triton_adadelta import Adadelta

os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
dist.init_process_group("gloo", rank=0, world_size=1)
data = torch.randn(8, 32, 20, generator=torch.Generator().manual_seed(0))

def make(wrapper):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    if wrapper == "zero":
        return model, ZeroRedundancyOptimizer(model.parameters(), optimizer_class=Adadelta, lr=1.0, state_dtype=torch.uint8)
    return model, Adadelta(model.parameters(), lr=1.0, state_dtype=torch.uint8)

def train(model, optimizer, steps):
    for x in steps:
        optimizer.zero_grad()
        model(data[x]).square().mean().backward()
        optimizer.step()

for wrapper in ("dcp", "zero"):
    model, optimizer = make(wrapper)
    torch.manual_seed(123)
    train(model, optimizer, range(8))
    expected = [p.detach().clone() for p in model.parameters()]
    model, optimizer = make(wrapper)
    torch.manual_seed(123)
    train(model, optimizer, range(4))
    resumed_model, resumed = make(wrapper)
    if wrapper == "dcp":
        directory = tempfile.mkdtemp()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optim": optimizer_state}, checkpoint_id=directory)
        torch.manual_seed(999)
        model_state, optimizer_state = get_state_dict(resumed_model, resumed)
        loaded = {"model": model_state, "optim": optimizer_state}
        dcp.load(loaded, checkpoint_id=directory)
        set_state_dict(resumed_model, resumed, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    else:
        optimizer.consolidate_state_dict(to=0)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, buffer)
        buffer.seek(0)
        checkpoint = torch.load(buffer, weights_only=True)
        torch.manual_seed(999)
        resumed_model.load_state_dict(checkpoint["model"])
        resumed.load_state_dict(checkpoint["optim"])
    train(resumed_model, resumed, range(4, 8))
    same = all(torch.equal(a, b) for a, b in zip(expected, resumed_model.parameters()))
    print(wrapper, "identical" if same else "DIFFERENT")
dist.destroy_process_group()
"""


def test_8_bit_state_resumes_bit_for_bit_through_dcp_and_zero_without_the_rng_state(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _RESUME_SCRIPT, str(free_port())],
        capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "0"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["dcp", "identical", "zero", "identical"], result.stdout + result.stderr[-2000:]
