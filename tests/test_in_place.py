"""Params and grads stay where the model put them (issue #10).

The optimizer owns its flat state buffers only: it never rebinds ``p.data``, never
re-points or writes into ``p.grad``, and keeps no view of a param's or grad's storage.
So whatever the PyTorch world does with a model that torch.optim.Adadelta trained
works the same after ours: safetensors, a submodule's ``torch.save``, deepcopy and
pickle of model+optimizer, grads the user keeps, a grad tensor shared by two params,
and ``p.data`` re-viewed. Each test does the same thing with torch.optim.Adadelta
wherever there is something to compare with.
"""

from __future__ import annotations

import copy
import io
import operator
import pickle
from pathlib import Path
from typing import Any, Callable

import pytest
import safetensors.torch
import torch

from tolerances import parity_tolerance
from triton_adadelta import Adadelta

Trained = tuple[torch.nn.Module, torch.optim.Optimizer]


class Net(torch.nn.Module):
    """A body a good deal bigger than its small head, and a layer that never gets a grad."""

    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(24, 24)
        self.head = torch.nn.Linear(24, 3)
        self.unused = torch.nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)))


def make_pair(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    model = Net()
    return model, copy.deepcopy(model)


def groups(model: Net) -> list[dict[str, Any]]:
    # Two groups with their own hyper-parameters, so a copy must keep both.
    return [
        {"params": [*model.body.parameters(), *model.unused.parameters()], "lr": 0.5, "weight_decay": 1e-2},
        {"params": list(model.head.parameters()), "rho": 0.8},
    ]


def batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(8, 24, generator=generator), torch.randn(8, 3, generator=generator)


def train(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    """torch's default loop: ``zero_grad()`` (set to None), backward, step."""
    for step in range(steps):
        x, y = batch(seed + step)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()


def trained_pair(steps: int = 3) -> tuple[Trained, Trained]:
    """(model, ours) and (reference, torch's), trained alike from identical models."""
    model, reference = make_pair()
    optimizer, torch_optimizer = Adadelta(groups(model)), torch.optim.Adadelta(groups(reference))
    train(model, optimizer, steps, seed=1)
    train(reference, torch_optimizer, steps, seed=1)
    return (model, optimizer), (reference, torch_optimizer)


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(ours, theirs, **parity_tolerance(), msg=lambda m: f"{what}: {m}")


def assert_models_and_states_match(ours: Trained, theirs: Trained) -> None:
    (model, optimizer), (reference, torch_optimizer) = ours, theirs
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert_matches(p.detach(), q.detach(), name)
        assert (p in optimizer.state) == (q in torch_optimizer.state), f"{name}: state in one only"
        if p in optimizer.state:
            assert float(optimizer.state[p]["step"]) == float(torch_optimizer.state[q]["step"]), f"{name}.step"
            for key in ("square_avg", "acc_delta"):
                assert_matches(optimizer.state[p][key], torch_optimizer.state[q][key], f"{name}.{key}")


def assert_models_and_states_equal(ours: Trained, theirs: Trained) -> None:
    """Bit for bit: the same optimizer, the same inputs, so the same results."""
    (model, optimizer), (other, other_optimizer) = ours, theirs
    for (name, p), q in zip(model.named_parameters(), other.parameters(), strict=True):
        # The state first: a lost state (step back to 0) is the telling failure.
        assert (p in optimizer.state) == (q in other_optimizer.state), f"{name}: state in one only"
        if p in optimizer.state:
            state, other_state = optimizer.state[p], other_optimizer.state[q]
            assert state.keys() == other_state.keys(), name
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(other_state[key])), f"{name}.{key}"
        assert torch.equal(p.detach(), q.detach()), name


# ------------------------------------------------------------------ safetensors
def test_safetensors_save_model_and_load_model_round_trip_the_trained_params(backend: str, tmp_path: Path) -> None:
    (model, _), (reference, _) = trained_pair()
    # Today's flat storage made this raise: "None is covering the entire storage".
    safetensors.torch.save_model(model, str(tmp_path / "ours.safetensors"))
    safetensors.torch.save_model(reference, str(tmp_path / "torch.safetensors"))
    fresh, torch_fresh = Net(), Net()
    missing, unexpected = safetensors.torch.load_model(fresh, tmp_path / "ours.safetensors")
    assert not missing and not unexpected, (missing, unexpected)
    safetensors.torch.load_model(torch_fresh, tmp_path / "torch.safetensors")
    for (name, p), q, r in zip(model.named_parameters(), fresh.parameters(), torch_fresh.parameters(), strict=True):
        assert torch.equal(q.detach(), p.detach()), name
        assert_matches(q.detach(), r.detach(), name)


def test_safetensors_save_file_of_the_state_dict_round_trips_every_tensor(backend: str, tmp_path: Path) -> None:
    (model, _), _ = trained_pair()
    # save_file refuses tensors that share memory; a param owns its storage.
    safetensors.torch.save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    loaded = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == model.state_dict().keys()
    for name, value in model.state_dict().items():
        assert torch.equal(loaded[name], value), name


# ---------------------------------------------------------------- partial saves
def saved_bytes(obj: Any) -> int:
    file = io.BytesIO()
    torch.save(obj, file)
    return len(file.getvalue())


def test_saving_one_small_layer_writes_as_many_bytes_as_with_torch(backend: str) -> None:
    # One group, the usual case: the head shares the group (and today the flat buffer) with the body.
    model, reference = make_pair()
    untouched = copy.deepcopy(model)
    train(model, Adadelta(model.parameters()), steps=3, seed=1)
    train(reference, torch.optim.Adadelta(reference.parameters()), steps=3, seed=1)
    ours, theirs = saved_bytes(model.head.state_dict()), saved_bytes(reference.head.state_dict())
    # torch.save writes whole storages: a head that views the model's storage drags it all along.
    assert ours == theirs, f"head state_dict: ours {ours} B, torch {theirs} B"
    assert ours == saved_bytes(untouched.head.state_dict())
    assert ours < saved_bytes(model.body.state_dict()), "the small head is smaller than the body"


# ------------------------------------------------------- whole-object round trips
def via_deepcopy(obj: dict[str, Any]) -> dict[str, Any]:
    return copy.deepcopy(obj)


def via_pickle(obj: dict[str, Any]) -> dict[str, Any]:
    return pickle.loads(pickle.dumps(obj))


def via_torch_save(obj: Any) -> Any:
    file = io.BytesIO()
    torch.save(obj, file)
    file.seek(0)
    return torch.load(file, weights_only=False)


ROUND_TRIPS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "deepcopy": via_deepcopy,
    "pickle": via_pickle,
    "torch_save": via_torch_save,
}


@pytest.mark.parametrize("round_trip", ROUND_TRIPS.values(), ids=ROUND_TRIPS.keys())
def test_model_and_optimizer_round_trip_keeps_the_state_and_trains_on(
    backend: str, round_trip: Callable[[dict[str, Any]], dict[str, Any]]
) -> None:
    (model, optimizer), (reference, torch_optimizer) = trained_pair()
    copied = round_trip({"model": model, "opt": optimizer})
    torch_copied = round_trip({"model": reference, "opt": torch_optimizer})
    ours_copy: Trained = (copied["model"], copied["opt"])
    torch_copy: Trained = (torch_copied["model"], torch_copied["opt"])

    # The copy's optimizer updates the copy's params, not the original's.
    copy_params = {id(p) for p in ours_copy[0].parameters()}
    for group in ours_copy[1].param_groups:
        assert all(id(p) in copy_params for p in group["params"])
    assert [g["lr"] for g in ours_copy[1].param_groups] == [g["lr"] for g in optimizer.param_groups]
    # Today's deepcopy silently reset step to 0 and square_avg to zero.
    assert_models_and_states_equal(ours_copy, (model, optimizer))

    # Both copies and both originals go on with the same batches.
    for pair in (ours_copy, torch_copy, (model, optimizer), (reference, torch_optimizer)):
        train(*pair, steps=3, seed=10)
    assert_models_and_states_equal(ours_copy, (model, optimizer))
    assert_models_and_states_match(ours_copy, torch_copy)
    assert_models_and_states_match((model, optimizer), (reference, torch_optimizer))


def test_a_new_optimizer_on_a_model_loaded_with_torch_load_trains_as_torch(backend: str) -> None:
    (model, _), (reference, _) = trained_pair()
    loaded, torch_loaded = via_torch_save(model), via_torch_save(reference)
    # Today the new optimizer refused the loaded params: views into a larger storage.
    optimizer, torch_optimizer = Adadelta(groups(loaded)), torch.optim.Adadelta(groups(torch_loaded))
    train(loaded, optimizer, steps=3, seed=10)
    train(torch_loaded, torch_optimizer, steps=3, seed=10)
    assert_models_and_states_match((loaded, optimizer), (torch_loaded, torch_optimizer))


# ----------------------------------------------------------- grads the user keeps
GRAD_SOURCES = ["assigned", "backward_after_model_zero_grad", "backward_after_optimizer_zero_grad"]


def fresh_grads(model: Net, optimizer: torch.optim.Optimizer, source: str, step: int) -> None:
    """New grad tensors for this step, as a user's loop makes them."""
    if source == "assigned":
        for p in model.parameters():
            p.grad = torch.full_like(p, float(step))
        return
    (model if source == "backward_after_model_zero_grad" else optimizer).zero_grad()
    x, y = batch(step)
    torch.nn.functional.mse_loss(model(x), y).backward()


@pytest.mark.parametrize("source", GRAD_SOURCES)
def test_grads_kept_after_each_step_hold_their_own_values_as_with_torch(backend: str, source: str) -> None:
    model, reference = make_pair()
    optimizer, torch_optimizer = Adadelta(groups(model)), torch.optim.Adadelta(groups(reference))
    kept: list[list[torch.Tensor]] = []
    torch_kept: list[list[torch.Tensor]] = []
    for step in (1, 2, 3):
        for m, o, store in ((model, optimizer, kept), (reference, torch_optimizer, torch_kept)):
            fresh_grads(m, o, source, step)
            o.step()
            # For logging or gradient statistics: the grads of this step, by reference.
            store.append([p.grad for p in m.parameters()])
    for step, (grads, torch_grads) in enumerate(zip(kept, torch_kept), start=1):
        for (name, _), g, h in zip(model.named_parameters(), grads, torch_grads, strict=True):
            assert (g is None) == (h is None), f"step {step} {name}"
            if g is None:
                continue
            # Today later grads were copied into the first one's view: [3], [3], [3].
            if source == "assigned":
                assert torch.equal(g, torch.full_like(g, float(step))), f"step {step} {name}"
            assert_matches(g, h, f"step {step} {name}.grad")
    assert_models_and_states_match((model, optimizer), (reference, torch_optimizer))


@pytest.mark.parametrize("source", GRAD_SOURCES)
def test_step_never_writes_into_or_rebinds_a_grad(backend: str, source: str) -> None:
    model, _ = make_pair()
    # maximize and weight_decay change g in the update: never in the grad itself.
    optimizer = Adadelta(groups(model), maximize=True)
    for step in (1, 2, 3):
        fresh_grads(model, optimizer, source, step)
        before = [(p, p.grad, p.grad.clone(), p.grad.data_ptr()) for p in model.parameters() if p.grad is not None]
        optimizer.step()
        for p, grad, values, address in before:
            assert p.grad is grad, "the grad is the same tensor object"
            assert grad.data_ptr() == address, "the grad's data was not replaced"
            assert torch.equal(grad, values), "the grad's values are unchanged"


def test_params_keep_their_own_storage_through_construction_and_steps(backend: str) -> None:
    model, _ = make_pair()
    where = {name: (p.data_ptr(), p.untyped_storage().nbytes()) for name, p in model.named_parameters()}
    identity = {name: id(p) for name, p in model.named_parameters()}

    def assert_in_place(when: str) -> None:
        for name, p in model.named_parameters():
            assert id(p) == identity[name], f"{when}: {name} is the same Parameter"
            assert (p.data_ptr(), p.untyped_storage().nbytes()) == where[name], f"{when}: {name} was rebound"
            # No param is a view into a larger storage.
            assert p.untyped_storage().nbytes() == p.numel() * p.element_size(), f"{when}: {name}"

    optimizer = Adadelta(groups(model))
    assert_in_place("after construction")
    for step, source in enumerate(GRAD_SOURCES, start=1):
        fresh_grads(model, optimizer, source, step)
        optimizer.step()
        assert_in_place(f"after a step with grads {source}")
    optimizer.zero_grad(set_to_none=False)
    optimizer.step()
    assert_in_place("after a step with zeroed grads")
    optimizer.load_state_dict(optimizer.state_dict())
    assert_in_place("after load_state_dict")


# ------------------------------------------------------ a grad shared by two groups
def test_a_grad_tensor_shared_across_two_param_groups_matches_torch(backend: str) -> None:
    torch.manual_seed(0)
    first, second = torch.randn(4, 3), torch.randn(4, 3)
    params = [torch.nn.Parameter(first.clone()), torch.nn.Parameter(second.clone())]
    torch_params = [torch.nn.Parameter(first.clone()), torch.nn.Parameter(second.clone())]

    def two_groups(a: torch.Tensor, b: torch.Tensor) -> list[dict[str, Any]]:
        return [{"params": [a]}, {"params": [b], "lr": 0.5, "rho": 0.8}]

    optimizer, torch_optimizer = Adadelta(two_groups(*params)), torch.optim.Adadelta(two_groups(*torch_params))
    generator = torch.Generator().manual_seed(1)
    for step in range(4):
        grad = torch.randn(4, 3, generator=generator)
        for (a, b), o, g in ((params, optimizer, grad.clone()), (torch_params, torch_optimizer, grad.clone())):
            if step == 2:
                # Accumulated in place into the one shared tensor: both params see it.
                a.grad.add_(g)
            else:
                a.grad = b.grad = g  # one tensor object, the grad of both params
            o.step()
        for name, p, q in zip(("first", "second"), params, torch_params):
            assert_matches(p.detach(), q.detach(), f"step {step}: {name}")
            for key in ("square_avg", "acc_delta"):
                assert_matches(optimizer.state[p][key], torch_optimizer.state[q][key], f"step {step}: {name}.{key}")
            assert_matches(p.grad, q.grad, f"step {step}: {name}.grad")
    assert params[0].grad is params[1].grad, "the two params still share one grad tensor"


# ------------------------------------------------------------ p.data re-viewed
@pytest.mark.parametrize("source", ["assigned", "backward"])
def test_a_square_weight_whose_data_is_transposed_between_steps_matches_torch(backend: str, source: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))
    reference = copy.deepcopy(model)
    optimizer, torch_optimizer = Adadelta(model.parameters()), torch.optim.Adadelta(reference.parameters())
    generator = torch.Generator().manual_seed(1)
    # Transposed after the first step, and back after the third.
    for step in range(5):
        if step in (1, 3):
            for m in (model, reference):
                m[0].weight.data = m[0].weight.data.t()
        x, y = torch.randn(4, 5, generator=generator), torch.randn(4, 2, generator=generator)
        grads = [torch.randn(p.shape, generator=generator) for p in model.parameters()]
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            o.zero_grad()
            if source == "assigned":
                # Contiguous grads for a transposed param: element [i, j] goes to p[i, j].
                for p, g in zip(m.parameters(), grads):
                    p.grad = g.clone()
            else:
                # autograd gives the transposed param a grad with the param's strides.
                torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
        assert_models_and_states_match((model, optimizer), (reference, torch_optimizer))


# ------------------------------------------------------------ a param listed twice
def test_a_param_listed_twice_raises_value_error() -> None:
    w, v = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    # torch only warns ("in future, this will cause an error"); a duplicate cannot be
    # given two segments of state, so ours refuses it now.
    with pytest.raises(ValueError):
        Adadelta([w, w])
    with pytest.raises(ValueError):
        Adadelta([{"params": [v]}, {"params": [w, w], "lr": 0.5}])
    optimizer = Adadelta([v])
    with pytest.raises(ValueError):
        optimizer.add_param_group({"params": [w, w]})
    assert len(optimizer.param_groups) == 1, "a refused group changes nothing"


def test_a_param_in_two_groups_raises_value_error_as_torch() -> None:
    w, v = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    for make in (torch.optim.Adadelta, Adadelta):
        with pytest.raises(ValueError, match="more than one parameter group"):
            make([{"params": [w]}, {"params": [v, w]}])
        optimizer = make([{"params": [w]}])
        with pytest.raises(ValueError, match="more than one parameter group"):
            optimizer.add_param_group({"params": [v, w]})
        assert len(optimizer.param_groups) == 1, "a refused group changes nothing"


# ------------------------------------------------------------- mixed precision
def test_bf16_master_weights_survive_deepcopy_bit_for_bit(backend: str) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(9, 17), torch.nn.Tanh(), torch.nn.Linear(17, 3)).bfloat16()
    optimizer = Adadelta(model.parameters(), master_weights=True)

    def train_bf16(m: torch.nn.Module, o: torch.optim.Optimizer, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(3):
            x, y = torch.randn(16, 9, generator=generator), torch.randn(16, 3, generator=generator)
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x.bfloat16()).float(), y).backward()
            o.step()

    train_bf16(model, optimizer, seed=1)
    copied = copy.deepcopy({"model": model, "opt": optimizer})
    ours_copy: Trained = (copied["model"], copied["opt"])
    # The state, master copy included, came along.
    assert_models_and_states_equal(ours_copy, (model, optimizer))
    train_bf16(*ours_copy, seed=2)
    train_bf16(model, optimizer, seed=2)
    # Without its fp32 master the copy would resume from the rounded bf16 params.
    assert_models_and_states_equal(ours_copy, (model, optimizer))


@pytest.mark.parametrize(
    "dtype,options",
    [(torch.float32, {}), (torch.bfloat16, {}), (torch.bfloat16, {"master_weights": True})],
    ids=["fp32", "bf16", "bf16_master"],
)
def test_the_optimizer_keeps_no_grad_alive_after_zero_grad(backend, dtype, options) -> None:
    """A grad the user and ``zero_grad()`` let go of is freed, as with torch: the optimizer
    holds no reference to a grad between steps (on a GPU it would hold its memory). The
    bf16 modes take the CPU path's chunked implementation, which keeps views per table."""
    import weakref

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2)).to(dtype)
    optimizer = Adadelta(model.parameters(), **options)
    for _ in range(3):
        model(torch.randn(5, 4, dtype=dtype)).sum().backward()
        kept = [weakref.ref(p.grad) for p in model.parameters()]
        optimizer.step()
        optimizer.zero_grad()
        assert all(ref() is None for ref in kept), "a grad outlived zero_grad()"


def test_a_transposed_grad_at_the_address_of_the_last_grad_matches_torch(backend) -> None:
    """A new grad object at the last grad's address but laid out otherwise (a transposed
    view of the same buffer) is read in its own index order, as torch reads it."""
    torch.manual_seed(0)
    ours = torch.nn.Parameter(torch.randn(4, 4))
    theirs = torch.nn.Parameter(ours.detach().clone())
    optimizer, torch_optimizer = Adadelta([ours]), torch.optim.Adadelta([theirs])
    buffer = torch.randn(4, 4)
    ours.grad, theirs.grad = buffer, buffer.clone()
    optimizer.step()
    torch_optimizer.step()
    ours.grad, theirs.grad = buffer.t(), buffer.clone().t()
    optimizer.step()
    torch_optimizer.step()
    torch.testing.assert_close(ours.detach(), theirs.detach(), **parity_tolerance())


@pytest.mark.parametrize(
    "edit", ["clear", "new dict", "del one", "clear, then read", "del one, then read", "one set to {}"]
)
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.uint8])
def test_optimizer_state_cleared_or_replaced_from_outside_is_followed_as_torch(
    backend, edit: str, state_dtype: torch.dtype
) -> None:
    """Resetting the optimizer's state the ways users do (``optimizer.state.clear()``,
    ``optimizer.state = defaultdict(dict)``, ``del optimizer.state[p]``,
    ``optimizer.state[p] = {}``) starts those params afresh, as torch does; the flat
    state is not silently used on. Also where a read through the defaultdict
    (``optimizer.state[p].get("step")``) put empty entries back, leaving the dict as
    long as before. (8-bit state: the step counts and the saved entries.)"""
    from collections import defaultdict

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    reference = copy.deepcopy(model)
    optimizer = Adadelta(model.parameters(), state_dtype=state_dtype)
    torch_optimizer = torch.optim.Adadelta(reference.parameters())
    x = torch.randn(6, 4)
    for step in range(5):
        if step == 3:
            for m, o in ((model, optimizer), (reference, torch_optimizer)):
                if edit.startswith("clear"):
                    o.state.clear()
                elif edit == "new dict":
                    o.state = defaultdict(dict)
                elif edit.startswith("del one"):
                    del o.state[m[0].weight]
                else:
                    o.state[m[0].weight] = {}
                if edit.endswith("then read"):
                    [o.state[p].get("step") for p in m.parameters()]  # (a logging loop, say)
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            o.zero_grad()
            m(x).pow(2).sum().backward()
            o.step()
    if state_dtype == torch.float32:
        for a, b in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(a.detach(), b.detach(), **parity_tolerance())
    ours_state, torch_state = optimizer.state_dict()["state"], torch_optimizer.state_dict()["state"]
    assert sorted(ours_state) == sorted(torch_state)
    for key in torch_state:
        assert sorted(ours_state[key]) == sorted(torch_state[key])
        assert float(ours_state[key]["step"]) == float(torch_state[key]["step"])
    for flat in optimizer.flat_states():
        every = edit.startswith("clear") or edit == "new dict"
        assert flat.steps.tolist() == [2.0 if every or p is model[0].weight else 5.0 for p in flat.params]


def test_an_entry_held_by_user_code_stays_live_when_the_state_is_laid_out_again(backend) -> None:
    """``entry = optimizer.state[p]`` (for logging, say) is the entry the optimizer
    updates and reads, also after a re-layout (here: a frozen layer unfrozen), as a
    torch optimizer's entry always is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model[0].requires_grad_(False)
    optimizer = Adadelta(model.parameters())
    x = torch.randn(6, 4)

    def step() -> None:
        optimizer.zero_grad()
        model(x).pow(2).sum().backward()
        optimizer.step()

    step()
    entry = optimizer.state[model[2].weight]
    layouts = optimizer.flat_states()
    model[0].requires_grad_(True)
    step()
    assert not any(map(operator.is_, optimizer.flat_states(), layouts))  # (laid out again)
    assert optimizer.state[model[2].weight] is entry and float(entry["step"]) == 2.0
    entry["square_avg"].zero_()
    entry["acc_delta"].zero_()
    (flat,) = optimizer.flat_states()
    i = next(k for k, param in enumerate(flat.params) if param is model[2].weight)
    assert not flat.square_avg[flat.offsets[i] : flat.offsets[i] + flat.numels[i]].any()


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_a_param_taken_out_of_the_groups_keeps_its_own_state_not_the_old_flat_buffer(
    backend, state_dtype: torch.dtype
) -> None:
    """A param removed from the groups keeps its entry, as torch keeps it, but as
    copies: views would hold the whole previous flat state in memory."""
    torch.manual_seed(0)
    body, head = torch.nn.Linear(64, 64), torch.nn.Linear(64, 2)
    optimizer = Adadelta([*body.parameters(), *head.parameters()], state_dtype=state_dtype)
    (body(torch.randn(3, 64)).sum() + head(torch.randn(3, 64)).sum()).backward()
    optimizer.step()
    kept = {name: value.clone() for name, value in optimizer.state[head.weight].items()}
    new_head = torch.nn.Linear(64, 2)
    optimizer.param_groups[0]["params"] = [*body.parameters(), *new_head.parameters()]
    (body(torch.randn(3, 64)).sum() + new_head(torch.randn(3, 64)).sum()).backward()
    optimizer.step()
    entry = optimizer.state[head.weight]
    assert sorted(entry) == sorted(kept)
    for name, value in entry.items():
        assert torch.equal(value, kept[name]), name
        assert value.untyped_storage().nbytes() == value.numel() * value.element_size(), name


def test_a_param_listed_twice_by_editing_the_groups_raises_and_changes_nothing(backend) -> None:
    param = torch.nn.Parameter(torch.ones(4))
    optimizer = Adadelta([param])
    param.grad = torch.ones(4)
    optimizer.step()
    before = param.detach().clone()
    optimizer.param_groups[0]["params"].append(param)
    with pytest.raises(ValueError, match="listed more than once"):
        optimizer.step()
    assert torch.equal(param.detach(), before) and float(optimizer.state[param]["step"]) == 1.0
