"""``torch.compile`` as users apply it: torch's recipe ``torch.compile(opt.step)``, and a
whole compiled train step, each against torch.optim.Adadelta run eagerly.

Dynamo breaks the graph where the step calls native code (the param reader, the
fused update), and runs those parts eagerly; nothing of the package is traced, and
any native build happens outside the trace. (Issue #11 asks for one custom op
instead, with fewer graph breaks; these tests hold the behaviour until then.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from tolerances import parity_tolerance
from triton_adadelta import Adadelta

STEPS = 15


def _pair() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    return model, copy.deepcopy(model)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 8, generator=generator), torch.randn(6, 3, generator=generator)) for _ in range(STEPS)]


def _assert_match(model: torch.nn.Module, reference: torch.nn.Module, optimizer, torch_optimizer) -> None:
    for ours, theirs in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(ours.detach(), theirs.detach(), **parity_tolerance())
    for ours, theirs in zip(optimizer.state_dict()["state"].values(), torch_optimizer.state_dict()["state"].values()):
        assert float(ours["step"]) == float(theirs["step"]) == STEPS
        for name in ("square_avg", "acc_delta"):
            torch.testing.assert_close(ours[name], theirs[name], **parity_tolerance())


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_compiled_step_matches_torch_from_the_first_step(cpu_path) -> None:
    model, reference = _pair()
    optimizer = Adadelta(model.parameters(), lr=0.5, weight_decay=0.01)
    torch_optimizer = torch.optim.Adadelta(reference.parameters(), lr=0.5, weight_decay=0.01)
    compiled_step = torch.compile(optimizer.step)
    for x, y in _batches():
        for net, opt, step in ((model, optimizer, compiled_step), (reference, torch_optimizer, torch_optimizer.step)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            step()
    _assert_match(model, reference, optimizer, torch_optimizer)


def test_a_compiled_whole_train_step_matches_torch(cpu_path) -> None:
    model, reference = _pair()
    optimizer = Adadelta(model.parameters(), lr=0.5)
    torch_optimizer = torch.optim.Adadelta(reference.parameters(), lr=0.5)

    @torch.compile
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    for x, y in _batches():
        train_step(x, y)
        torch_optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        torch_optimizer.step()
    _assert_match(model, reference, optimizer, torch_optimizer)
