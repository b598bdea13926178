"""The seed's PuzzleLib-style API: ``triton_adadelta.puzzlelib.AdaDelta``.

PuzzleLib's AdaDelta is ``torch.optim.Adadelta`` with ``lr=1`` and its own
defaults (rho=0.95, epsilon=1e-6); its ``zeroGradParams`` zeroes grads in place,
which is torch's ``zero_grad(set_to_none=False)``. Every test runs on the Triton
kernel (interpreter) and on the CPU path through the ``backend`` fixture.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tolerances import parity_tolerance
from triton_adadelta.puzzlelib import AdaDelta

REPO = Path(__file__).resolve().parents[1]
STEPS = 20
RHO, EPSILON = 0.95, 1e-6


class Net(nn.Module):
    """fp32 and fp64 layers (two flat buffers), and a layer backward never reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = nn.Linear(12, 16)
        self.out = nn.Linear(16, 5).double()
        self.unused = nn.Linear(3, 3)  # its grad stays None: skipped, as torch skips it

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(inputs)).double())


def make_net(seed: int = 0) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randn(8, 12, generator=generator), torch.randn(8, 5, generator=generator, dtype=torch.float64)


def backward(net: nn.Module, step: int) -> None:
    inputs, target = batch(step)
    nn.functional.mse_loss(net(inputs), target).backward()


def train(optimizer: AdaDelta, net: nn.Module, steps: range) -> None:
    for step in steps:
        optimizer.zeroGradParams()
        backward(net, step)
        optimizer.update()


def train_reference(reference: torch.optim.Adadelta, net: nn.Module, steps: range) -> None:
    for step in steps:
        reference.zero_grad(set_to_none=False)
        backward(net, step)
        reference.step()


def assert_params_match(actual: nn.Module, expected: nn.Module, backend: str) -> None:
    """Within the drift bound of the tolerance table, on either backend."""
    rtol, atol = parity_tolerance()["rtol"], parity_tolerance()["atol"]
    for (name, param), reference in zip(actual.named_parameters(), expected.parameters()):
        torch.testing.assert_close(param, reference, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("use_global_state", [True, False], ids=["global", "per_tensor"])
def test_matches_torch_adadelta_with_lr_1(backend, use_global_state):
    net, reference_net = make_net(), make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net, useGlobalState=use_global_state)
    reference = torch.optim.Adadelta(reference_net.parameters(), lr=1.0, rho=RHO, eps=EPSILON)

    train(optimizer, net, range(STEPS))
    train_reference(reference, reference_net, range(STEPS))

    assert_params_match(net, reference_net, backend)
    assert net.unused.weight.grad is None
    assert torch.equal(net.unused.weight, reference_net.unused.weight)


def test_global_state_is_one_flat_state_per_dtype_and_per_tensor_one_per_param():
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net, useGlobalState=True)
    assert sorted(str(flat.dtype) for flat in optimizer.states) == ["torch.float32", "torch.float64"]
    optimizer.setupOn(net, useGlobalState=False)
    assert len(optimizer.states) == len(list(net.parameters()))


def test_defaults_are_puzzlelibs():
    optimizer = AdaDelta()
    assert (optimizer.rho, optimizer.epsilon, optimizer.nodeinfo, optimizer.t) == (0.95, 1e-6, None, 0)


def test_rho_and_epsilon_changed_between_steps_take_effect(backend):
    net, reference_net = make_net(), make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    reference = torch.optim.Adadelta(reference_net.parameters(), lr=1.0, rho=RHO, eps=EPSILON)
    for start, rho, epsilon in ((0, 0.95, 1e-6), (4, 0.5, 1e-3), (8, 0.99, 1e-8)):
        optimizer.rho, optimizer.epsilon = rho, epsilon
        reference.param_groups[0].update(rho=rho, eps=epsilon)
        train(optimizer, net, range(start, start + 4))
        train_reference(reference, reference_net, range(start, start + 4))
    assert_params_match(net, reference_net, backend)


def test_t_counts_updates_and_setup_restarts_it():
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    train(optimizer, net, range(3))
    assert optimizer.t == 3
    # Per-param step counts follow torch: the unused layer has none.
    state = optimizer.state_dict()["state"]
    assert all(entry["step"].item() == 3 for entry in state.values())
    assert len(state) == 4
    optimizer.setupOn(net)
    assert optimizer.t == 0 and optimizer.state_dict()["state"] == {}


def test_save_load_resumes_bit_identically(backend, tmp_path):
    net = make_net()
    optimizer = AdaDelta(rho=0.9, epsilon=1e-5)
    optimizer.setupOn(net)
    train(optimizer, net, range(5))
    optimizer.save(tmp_path / "optimizer.pt")
    torch.save(net.state_dict(), tmp_path / "net.pt")
    train(optimizer, net, range(5, 10))

    resumed_net = make_net(seed=1)  # other weights and hyper-parameters: all must be loaded
    resumed_net.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))
    resumed = AdaDelta()
    resumed.setupOn(resumed_net)
    resumed.load(tmp_path / "optimizer.pt")
    assert (resumed.t, resumed.rho, resumed.epsilon) == (5, 0.9, 1e-5)
    train(resumed, resumed_net, range(5, 10))

    for param, expected in zip(resumed_net.parameters(), net.parameters()):
        assert torch.equal(param, expected)
    assert resumed.t == optimizer.t == 10


def test_load_of_a_state_that_does_not_fit_raises_and_changes_nothing(tmp_path):
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    train(optimizer, net, range(3))
    before = optimizer.state_dict()
    bad = optimizer.state_dict()
    bad["t"], bad["param_groups"][0]["rho"] = 99, 0.5
    bad["state"][0]["step"].fill_(99.0)  # a fitting entry, loaded only if everything fits
    bad["state"][3]["acc_delta"] = torch.zeros(4, 3)  # the last entry does not fit
    torch.save(bad, tmp_path / "bad.pt")

    with pytest.raises(ValueError, match="shape"):
        optimizer.load(tmp_path / "bad.pt")
    after = optimizer.state_dict()
    assert (optimizer.t, optimizer.rho) == (3, RHO)
    assert after["state"].keys() == before["state"].keys()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(after["state"][key][name], value)


def test_saved_state_loads_into_torch_adadelta(tmp_path):
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    train(optimizer, net, range(3))
    optimizer.save(tmp_path / "optimizer.pt")
    reference = torch.optim.Adadelta(make_net().parameters())
    reference.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    assert reference.param_groups[0]["rho"] == RHO and reference.param_groups[0]["lr"] == 1.0
    assert len(reference.state) == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rho": 1.1}, "Invalid rho value: 1.1"),
        ({"rho": -0.1}, "Invalid rho value: -0.1"),
        ({"epsilon": -1}, "Invalid epsilon value: -1"),
    ],
)
def test_invalid_hyper_parameters_raise_torchs_messages(kwargs, message):
    torch_kwargs = {"eps" if name == "epsilon" else name: value for name, value in kwargs.items()}
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adadelta([nn.Parameter(torch.zeros(1))], **torch_kwargs)
    assert str(torch_error.value) == message
    with pytest.raises(ValueError) as error:
        AdaDelta(**kwargs)
    assert str(error.value) == message


def test_invalid_hyper_parameter_set_between_steps_raises_and_keeps_the_old_value():
    optimizer = AdaDelta()
    with pytest.raises(ValueError, match=r"^Invalid rho value: 1.1$"):
        optimizer.rho = 1.1
    with pytest.raises(ValueError, match=r"^Invalid epsilon value: -1$"):
        optimizer.epsilon = -1
    assert (optimizer.rho, optimizer.epsilon) == (0.95, 1e-6)


def test_zero_grad_params_zeroes_the_grads_in_place_and_backward_accumulates_into_them():
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    train(optimizer, net, range(2))
    params = list(net.parameters())
    grads = [param.grad for param in params]
    optimizer.zeroGradParams()
    assert all(param.grad is grad for param, grad in zip(params, grads)), "the same grad tensors"
    assert all(grad is None or not grad.any() for grad in grads)
    backward(net, 3)  # accumulates in place: no new grad tensors
    assert all(param.grad is grad for param, grad in zip(params, grads))
    optimizer.zeroGradParams()
    assert net.unused.weight.grad is None


def test_assigned_grad_is_zeroed_in_place():
    net = make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    grad = torch.ones(3, 3)
    net.unused.weight.grad = grad
    optimizer.zeroGradParams()
    assert net.unused.weight.grad is grad and not grad.any()


def test_replaced_param_data_is_followed_and_state_kept(backend):
    net, reference_net = make_net(), make_net()
    optimizer = AdaDelta()
    optimizer.setupOn(net)
    reference = torch.optim.Adadelta(reference_net.parameters(), lr=1.0, rho=RHO, eps=EPSILON)
    train(optimizer, net, range(3))
    train_reference(reference, reference_net, range(3))
    net.hidden.weight.data = net.hidden.weight.data.clone()  # e.g. what model.to() does
    train(optimizer, net, range(3, 6))
    train_reference(reference, reference_net, range(3, 6))
    assert_params_match(net, reference_net, backend)


def test_use_before_setup_raises():
    with pytest.raises(RuntimeError, match="setupOn"):
        AdaDelta().update()


def test_nodeinfo_needs_an_initialized_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        AdaDelta(nodeinfo=object())


def test_seed_quickstart_runs_as_is_and_its_error_falls():
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(REPO / "examples" / "seed_quickstart.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    lines = result.stdout.splitlines()
    assert [line.split(" error:")[0] for line in lines] == [f"Iteration #{i}" for i in range(5, 101, 5)]
    errors = [float(line.split("error: ")[1]) for line in lines]
    assert errors[-1] < errors[0] / 10
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:]))
