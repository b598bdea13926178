"""The compiled change watch: each change sets its bit, and it holds params safely."""

from __future__ import annotations

import copy
import gc
import statistics
import time
import weakref

import pytest
import torch

from conftest import require_watch_library
from tolerances import parity_tolerance
from triton_adadelta import Adadelta
from triton_adadelta.update import apply_update_
from triton_adadelta.watch import DATA, GRAD, VERSION, ParamWatch

ALL = DATA | GRAD | VERSION


@pytest.fixture
def watched(monkeypatch):
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1")
    library = require_watch_library()
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(3)]
    for param in params:
        param.grad = torch.randn(5)
    watch = ParamWatch(library, params, versions=True)
    assert watch.snapshot()
    return params, watch


def test_nothing_changed_sets_no_bit(watched):
    params, watch = watched
    params[0].grad.add_(1)  # in-place writes to a grad are the common path
    assert watch.changes(ALL) == 0


def test_replaced_param_data_sets_data(watched):
    params, watch = watched
    params[1].data = torch.zeros(5)
    assert watch.changes(ALL) == DATA


@pytest.mark.parametrize(
    "change",
    [
        lambda p: setattr(p, "grad", None),
        lambda p: setattr(p, "grad", torch.zeros(5)),
        lambda p: setattr(p.grad, "data", torch.zeros(5)),
    ],
    ids=["grad_set_to_none", "grad_replaced", "grad_data_replaced"],
)
def test_grad_changes_set_grad(watched, change):
    params, watch = watched
    change(params[2])
    assert watch.changes(ALL) == GRAD
    assert watch.changes(DATA) == 0, "only the bits asked for are checked"


def test_a_grad_given_to_a_param_without_one_sets_grad(watched):
    params, watch = watched
    params[0].grad = None
    assert watch.snapshot()
    params[0].grad = torch.ones(5)
    assert watch.changes(GRAD) == GRAD


def test_in_place_write_sets_version(watched):
    params, watch = watched
    with torch.no_grad():
        params[0].mul_(2)
    assert watch.changes(ALL) == VERSION
    assert watch.snapshot() and watch.changes(ALL) == 0


def test_optimizer_builds_the_watch(cpu_path, monkeypatch):
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1")
    require_watch_library()
    param = torch.nn.Parameter(torch.randn(4))
    param.grad = torch.randn(4)
    optimizer = Adadelta([param])
    optimizer.step()
    (buffer,) = optimizer.flat_buffers()
    assert buffer.watch is not None


def test_swap_tensors_is_refused_while_watched_and_params_are_released_after(cpu_path, monkeypatch):
    """The watch reads TensorImpls directly: none may be swapped away or freed under it."""
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1")
    require_watch_library()
    model = torch.nn.Linear(3, 2)
    optimizer = Adadelta(model.parameters())
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    assert optimizer.flat_buffers()[0].watch is not None
    with pytest.raises(RuntimeError):
        torch.utils.swap_tensors(model.weight, torch.nn.Parameter(torch.zeros(2, 3)))
    # Dropping the optimizer lets go of the params: nothing keeps them alive after.
    weight = weakref.ref(model.weight)
    del optimizer, model
    gc.collect()
    assert weight() is None


def test_fresh_grads_every_step_follow_torch(cpu_path, change_check):
    """zero_grad() (set_to_none) before each backward: grads are new tensors every step,
    some params get none, and one grad is non-contiguous (the Python path takes it)."""
    torch.manual_seed(0)
    model = torch.nn.ModuleDict({"a": torch.nn.Linear(6, 8), "b": torch.nn.Linear(8, 2), "unused": torch.nn.Linear(3, 3)})
    reference = copy.deepcopy(model)
    optimizer = Adadelta(model.parameters(), weight_decay=0.1)
    torch_optimizer = torch.optim.Adadelta(reference.parameters(), weight_decay=0.1)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for step in range(4):
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m["b"](torch.tanh(m["a"](x))), y).backward()
            if step == 2:
                m["a"].weight.grad = m["a"].weight.grad.t().contiguous().t()  # same values, transposed strides
            o.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, **parity_tolerance())
        assert model["unused"].weight.grad is None and model["unused"].weight not in optimizer.state
    # After zero_grad() the new grads are copied in and left where backward put them
    # (zero_grad() drops them next). Later steps without zero_grad() go on reading
    # them (backward accumulates into them); a grad the user assigns is re-pointed.
    (buffer,) = optimizer.flat_buffers()
    in_flat_buffer = lambda: model["a"].weight.grad.untyped_storage().data_ptr() == buffer.grad.untyped_storage().data_ptr()  # noqa: E731
    assigned = False
    for assign in (False, False, True, False):
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            if assign:
                m["a"].weight.grad = torch.full_like(m["a"].weight, 0.01)
            torch.nn.functional.mse_loss(m["b"](torch.tanh(m["a"](x))), y).backward()
            o.step()
        for ours, theirs in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(ours, theirs, **parity_tolerance())
        assigned = assigned or assign
        assert in_flat_buffer() == assigned


def test_a_bad_grad_among_fresh_ones_changes_no_grad_view(cpu_path, change_check):
    model = torch.nn.Linear(4, 3)
    optimizer = Adadelta(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    bias_view = model.bias.grad
    saved = bias_view.clone()
    model.bias.grad = torch.full((3,), 7.0)  # a plain fresh grad, which would be copied in
    model.weight.grad = torch.eye(3, 4).to_sparse()  # refused
    with pytest.raises(RuntimeError, match="sparse"):
        optimizer.step()
    assert torch.equal(bias_view, saved), "nothing is copied when a grad is refused"


def test_zero_grad_without_set_to_none_zeroes_every_grad_as_torch_does(cpu_path, change_check):
    """One fill zeroes the grads that are views; a user's own grad tensor is zeroed too."""
    model = torch.nn.Linear(4, 3)
    optimizer = Adadelta(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=False)
    assert all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())

    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    mine = torch.ones(3)
    model.bias.grad = mine
    optimizer.zero_grad(set_to_none=False)
    assert model.bias.grad is mine and torch.count_nonzero(mine) == 0
    assert torch.count_nonzero(model.weight.grad) == 0


def test_zero_grad_without_set_to_none_drops_a_grads_autograd_history(cpu_path, change_check):
    model = torch.nn.Linear(4, 3)
    optimizer = Adadelta(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    model.weight.grad.requires_grad_(True)  # the grad is still the flat buffer's view
    optimizer.zero_grad(set_to_none=False)
    assert not model.weight.grad.requires_grad, "torch's zero_grad turns requires_grad off"


def test_a_zero_tensor_grad_is_taken_like_torch(cpu_path, change_check):
    """torch's efficient zero tensors have no data pointer: copied by torch, not memmove."""
    param, reference = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    reference.data.copy_(param.data)
    optimizer, torch_optimizer = Adadelta([param]), torch.optim.Adadelta([reference])
    for p, o in ((param, optimizer), (reference, torch_optimizer)):
        p.grad = torch.ones(10)
        o.step()
        o.zero_grad()
        p.grad = torch._efficientzerotensor((10,))
        o.step()
    torch.testing.assert_close(param, reference, **parity_tolerance())


def test_a_grad_that_is_another_params_view_is_read_before_it_is_overwritten(cpu_path, change_check):
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    references = [torch.nn.Parameter(torch.zeros(4)) for _ in range(2)]
    optimizer, torch_optimizer = Adadelta(params), torch.optim.Adadelta(references)
    for (a, b), o in ((params, optimizer), (references, torch_optimizer)):
        a.grad, b.grad = torch.ones(4), torch.full((4,), 2.0)
        o.step()
        b.grad = a.grad  # ours: a's view of the flat grad buffer
        a.grad = torch.full((4,), 5.0)  # copied into that view at the next step
        o.step()
    for ours, theirs in zip(params, references):
        torch.testing.assert_close(ours, theirs, **parity_tolerance())


def test_a_sparse_grad_at_the_first_step_gets_torchs_error(cpu_path, change_check):
    param = torch.nn.Parameter(torch.randn(3, 3))
    param.grad = torch.eye(3).to_sparse()
    with pytest.raises(RuntimeError, match="Adadelta does not support sparse gradients"):
        Adadelta([param]).step()


def test_the_watch_keeps_the_grad_views_it_reads_alive(cpu_path, monkeypatch):
    """A failed gather may replace some views: the watch must not read freed ones."""
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1")
    require_watch_library()
    a, b = torch.nn.Parameter(torch.randn(2, 3)), torch.nn.Parameter(torch.randn(2, 3))
    a.grad, b.grad = torch.ones(2, 3), torch.ones(2, 3)
    optimizer = Adadelta([a, b])
    optimizer.step()
    (buffer,) = optimizer.flat_buffers()
    a.grad.data = torch.full((2, 3), 2.0)  # a's view is replaced at the next gather
    b.grad = torch.ones(2, 3)
    b.data = b.data.view(6)  # same memory, new shape: b's grad cannot be re-pointed
    with pytest.raises(RuntimeError):
        optimizer.step()
    kept = {view._cdata for view in buffer.watch._view_refs}
    assert all(address in kept for address in buffer.watch._views)


def test_noticing_costs_a_small_fraction_of_the_update(cpu_path, monkeypatch):
    """On 1000 small params (the worst case for per-param checks), the checks of a
    step where nothing changed take well under half the update's time; the Python
    checks take more than twice the update's time, so this fails without the watch.
    (perf/bench_step.py reports the same parts; 18 us against 81 us there.)"""
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_WATCH", "1")
    require_watch_library()
    params = [torch.nn.Parameter(torch.randn(100)) for _ in range(1000)]
    for param in params:
        param.grad = torch.randn(100)
    optimizer = Adadelta(params)
    optimizer.step()
    (buffer,) = optimizer.flat_buffers()

    runs = buffer.gather_grads()

    def update() -> None:
        apply_update_(buffer, runs, lr=1.0, rho=0.9, eps=1e-6, weight_decay=0.0)

    def notice() -> None:
        assert not buffer.is_stale()
        buffer.gather_grads()

    def median_seconds(fn, repeats: int = 101) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    noticing, updating = median_seconds(notice), median_seconds(update)
    assert noticing < 0.5 * updating, f"noticing {noticing * 1e6:.0f} us, update {updating * 1e6:.0f} us"


def test_a_grad_left_in_place_stays_the_users_and_is_read_at_every_step(cpu_path, change_check):
    """After zero_grad() the new grad stays p.grad; a later step does not re-point it,
    so an edit through a reference taken after a step still counts, as in torch."""

    def run(optimizer_class) -> torch.Tensor:
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(4, dtype=torch.float64))
        optimizer = optimizer_class([param])
        weights = torch.tensor([1.0, -2.0, 3.0, 0.5], dtype=torch.float64)
        (param * weights).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        (param * weights).sum().backward()
        optimizer.step()
        held = param.grad
        optimizer.step()
        held.add_(10.0)
        assert param.grad is held
        optimizer.step()
        return param.detach()

    torch.testing.assert_close(run(Adadelta), run(torch.optim.Adadelta), rtol=1e-12, atol=1e-14)
