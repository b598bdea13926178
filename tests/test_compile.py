"""``torch.compile`` as users apply it: torch's recipe ``torch.compile(opt.step)``, and a
whole compiled train step, each against torch.optim.Adadelta run eagerly.

Dynamo traces our ``step()`` down to one custom op, ``triton_adadelta::step_``
(``triton_adadelta/compiled.py``), which runs the eager step at run time: nothing of
the package is traced, so no native build or ctypes call is, and the compiled step
has no graph break (torch's own Adadelta has none either, here).
"""

from __future__ import annotations

import copy
from typing import Callable

import pytest
import torch

from tolerances import parity_tolerance
from triton_adadelta import Adadelta

STEP_OP = torch.ops.triton_adadelta.step_.default

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


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> Callable[..., torch.Tensor]:
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return train_step


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

    train_step = torch.compile(_train_step(model, optimizer))
    for x, y in _batches():
        train_step(x, y)
        torch_optimizer.zero_grad()
        torch.nn.functional.mse_loss(reference(x), y).backward()
        torch_optimizer.step()
    _assert_match(model, reference, optimizer, torch_optimizer)


def _stepped_model(optimizer_class: type, **hparams) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model, _ = _pair()
    optimizer = optimizer_class(model.parameters(), **hparams)
    x, y = _batches()[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    return model, optimizer


def test_the_compiled_step_is_one_op_with_no_graph_break(cpu_path) -> None:
    breaks = {}
    for name, optimizer_class in (("ours", Adadelta), ("torch", torch.optim.Adadelta)):
        _, optimizer = _stepped_model(optimizer_class, lr=0.5)
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(optimizer.step)()
        breaks[name] = (explanation.graph_count, explanation.graph_break_count)
    assert breaks["ours"] == (1, 0)
    assert breaks["ours"][1] <= breaks["torch"][1]

    graphs: list[torch.fx.GraphModule] = []

    def capture(graph: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        graphs.append(graph)
        return graph

    torch._dynamo.reset()
    model, optimizer = _stepped_model(Adadelta, lr=0.5)
    torch.compile(optimizer.step, backend=capture)()
    (graph,) = graphs
    # (The step's no_grad shows as grad-mode switches around it: no computation.)
    calls = [node for node in graph.graph.nodes if node.op == "call_function" and node.target is not torch._C._set_grad_enabled]
    assert [node.target for node in calls] == [STEP_OP]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8])
def test_compiling_a_fresh_optimizers_step_as_users_do_breaks_no_graph(cpu_path, state_dtype) -> None:
    # As a user writes it: torch.compile(optimizer.step) from the first step on (the
    # state made in the first), counted by dynamo's own counters. Our step's profiler
    # event once broke the graph here (its __enter__, called by hand), which
    # dynamo.explain on a stepped optimizer did not show; and the first step's trace
    # of sys.modules (the DTensor check) failed now and then under fullgraph.
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = torch.nn.Linear(16, 4)
    optimizer = Adadelta(model.parameters(), lr=1.0, state_dtype=state_dtype)
    step = torch.compile(optimizer.step, fullgraph=True)  # (raises at a graph break)
    for _ in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 16)).sum().backward()
        step()
    assert not counters["graph_break"], list(counters["graph_break"])


@pytest.mark.parametrize("options", [{"state_dtype": torch.bfloat16}, {"state_dtype": torch.uint8}])
def test_a_step_that_rounds_compiles_once_also_with_dynamic_false(cpu_path, options) -> None:
    # The launch count in the first group changes at every launch that rounds; as an
    # int, dynamo guarded on it and compiled again at every step (with dynamic=False
    # until its recompile limit, then the step ran eagerly). It is a tensor now, as
    # torch advises for a scheduled lr. The key is there after one eager step, or in
    # any resumed run (every state_dict holds it).
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 4)
    twin = copy.deepcopy(model)
    optimizer, eager = Adadelta(model.parameters(), lr=1.0, **options), Adadelta(twin.parameters(), lr=1.0, **options)
    batches = [torch.randn(8, 16) for _ in range(12)]
    for net, opt in ((model, optimizer), (twin, eager)):
        opt.zero_grad()
        net(batches[0]).sum().backward()
        opt.step()
    eager.load_state_dict(optimizer.state_dict())  # (the same seed, and a loaded launch count)
    optimizer.load_state_dict(optimizer.state_dict())
    step = torch.compile(optimizer.step, dynamic=False)
    for x in batches[1:]:
        for net, opt, run in ((model, optimizer, step), (twin, eager, eager.step)):
            opt.zero_grad()
            net(x).sum().backward()
            run()
    assert counters["stats"]["unique_graphs"] == 1
    launches = optimizer.state_dict()["param_groups"][0]["rounding_launches"]
    assert type(launches) is int and launches == 12  # (saved as torch's groups save numbers)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_a_whole_compiled_train_step_breaks_no_more_than_torch_s(cpu_path) -> None:
    counts = {}
    for name, optimizer_class in (("ours", Adadelta), ("torch", torch.optim.Adadelta)):
        model, _ = _pair()
        train_step = _train_step(model, optimizer_class(model.parameters(), lr=0.5))
        torch._dynamo.reset()
        counts[name] = torch._dynamo.explain(train_step)(*_batches()[0]).graph_break_count
    assert counts["ours"] <= counts["torch"], counts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_compiled_step_is_bit_identical_to_the_eager_step(cpu_path, dtype: torch.dtype) -> None:
    hparams = {"lr": 0.5, "master_weights": dtype == torch.bfloat16}
    model, twin = (net.to(dtype) for net in _pair())
    compiled_optimizer, eager = Adadelta(model.parameters(), **hparams), Adadelta(twin.parameters(), **hparams)
    compiled_step = torch.compile(compiled_optimizer.step)
    for index, (x, y) in enumerate(_batches()[:6]):
        for net, optimizer, step in ((model, compiled_optimizer, compiled_step), (twin, eager, eager.step)):
            if index == 3:
                # An edit from outside between steps: the master copy must follow it.
                with torch.no_grad():
                    net[0].weight.mul_(0.5)
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x.to(dtype)), y.to(dtype)).backward()
            step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(compiled_optimizer.state.values(), eager.state.values()):
        assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_op_updates_the_tensors_it_is_given_when_they_are_copies(cpu_path, dtype: torch.dtype) -> None:
    # What a graph that cannot update its inputs in place passes: copies of the params.
    hparams = {"lr": 0.5, "master_weights": dtype == torch.bfloat16}
    model, twin = (net.to(dtype) for net in _pair())
    optimizer, eager = Adadelta(model.parameters(), **hparams), Adadelta(twin.parameters(), **hparams)
    params = list(model.parameters())
    copies = [param.detach().clone() for param in params]
    for x, y in _batches()[:4]:
        for net, opt in ((model, optimizer), (twin, eager)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(net(x.to(dtype)), y.to(dtype)).backward()
        before = [param.detach().clone() for param in params]
        STEP_OP(copies, [param.grad for param in params], None, None, optimizer._handle)
        eager.step()
        assert all(torch.equal(a, b) for a, b in zip(params, before))  # the params themselves: untouched
        with torch.no_grad():
            for param, copy_ in zip(params, copies):
                param.copy_(copy_)  # as the graph's epilogue copies them back
    for a, b in zip(copies, twin.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), eager.state.values()):
        assert all(torch.equal(a[name], b[name]) for name in a)
