"""Reliability: bad input, params that change under the optimizer, checkpoints."""

from __future__ import annotations

import copy
import os

import pytest
import torch

from tolerances import TOLERANCES, fp64_conversion_tolerance
from triton_adadelta import Adadelta
from triton_adadelta.checkpoint import load_checkpoint, save_checkpoint


KERNEL_TOLERANCE = {"rtol": TOLERANCES["torch_parity_kernel_rtol"].value, "atol": TOLERANCES["torch_parity_kernel_atol"].value}


def snapshot(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    return {
        "params": [p.detach().clone() for p in model.parameters()],
        "state": {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()},
    }


def assert_unchanged(model: torch.nn.Module, optimizer: torch.optim.Optimizer, before: dict) -> None:
    for param, saved in zip(model.parameters(), before["params"]):
        assert torch.equal(param.detach(), saved)
    assert {id(p) for p in optimizer.state} == set(before["state"])
    for param, state in optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, before["state"][id(param)][key]), key


def trained(seed: int = 0, **options) -> tuple[torch.nn.Sequential, Adadelta]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    optimizer = Adadelta(model.parameters(), **options)
    model(torch.randn(4, 6)).sum().backward()
    optimizer.step()
    return model, optimizer


# ------------------------------------------------------------------ bad input
def test_sparse_grad_raises_torchs_error_and_changes_nothing(backend):
    model, optimizer = trained()
    before = snapshot(model, optimizer)
    model[0].weight.grad = torch.ones(8, 6)
    model[2].weight.grad = torch.eye(2, 8).to_sparse()
    with pytest.raises(RuntimeError, match="Adadelta does not support sparse gradients"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


def test_grad_whose_data_changed_shape_raises_and_changes_nothing(backend):
    model, optimizer = trained()
    before = snapshot(model, optimizer)
    model[0].weight.grad.data = torch.zeros(3, 3)  # torch allows this through .data
    with pytest.raises(ValueError, match=r"grad of shape \(3, 3\).*param of shape \(8, 6\)"):
        optimizer.step()
    assert_unchanged(model, optimizer, before)


def test_grad_whose_data_changed_dtype_raises(backend):
    model, optimizer = trained()
    model[2].bias.grad.data = torch.zeros(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="torch.float64.*torch.float32"):
        optimizer.step()


def test_grad_whose_data_was_replaced_is_used(backend):
    model, optimizer = trained()
    reference = copy.deepcopy(model)
    torch_optimizer = torch.optim.Adadelta(reference.parameters())
    torch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    for m, o in ((model, optimizer), (reference, torch_optimizer)):
        for p in m.parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.data = torch.full_like(p, 0.5)  # same shape, new storage
        o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, **KERNEL_TOLERANCE)


def test_params_on_several_devices_get_one_flat_state_per_device(backend):
    on_cpu = torch.nn.Parameter(torch.ones(4))
    on_meta = torch.nn.Parameter(torch.ones(4, device="meta"))
    optimizer = Adadelta([on_cpu, on_meta])
    on_cpu.grad = torch.ones(4)
    on_meta.grad = torch.ones(4, device="meta")
    optimizer.step()
    devices = sorted(str(flat.device) for flat in optimizer.flat_states())
    assert devices == ["cpu", "meta"]
    assert not torch.equal(on_cpu.detach(), torch.ones(4))


@pytest.mark.parametrize("options", [{"state_dtype": torch.bfloat16}, {"state_dtype": torch.uint8}])
def test_meta_params_step_in_compressed_state_as_torchs_do(backend, options):
    # torch steps meta params by shapes alone; 8-bit state's launch check read the meta table.
    param = torch.nn.Parameter(torch.ones(300, device="meta"))
    optimizer = Adadelta([param], **options)
    param.grad = torch.ones(300, device="meta")
    optimizer.step()
    assert optimizer.state[param]["square_avg"].shape == (300,)


@pytest.mark.parametrize(
    "dtype, options",
    [
        (torch.float32, {"state_dtype": torch.uint8}),
        (torch.bfloat16, {"master_weights": True}),
        (torch.bfloat16, {"master_weights": True, "state_dtype": torch.uint8}),
        (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.bfloat16}),
    ],
)
def test_a_flat_state_of_empty_params_only_steps_as_torchs_does(backend, dtype, options):
    # The empty param is alone in its flat state (the other param has another dtype):
    # its buffers have no address, which the C loop refused for a master copy or scales.
    other_dtype = torch.float64
    empty = torch.nn.Parameter(torch.empty(0, 3, dtype=dtype))
    other = torch.nn.Parameter(torch.ones(4, dtype=other_dtype))
    optimizer = Adadelta([{"params": [empty], **options}, {"params": [other]}], lr=1.0)
    reference = torch.nn.Parameter(torch.ones(4, dtype=other_dtype))
    torch_optimizer = torch.optim.Adadelta([reference], lr=1.0)
    for _ in range(2):
        empty.grad = torch.empty(0, 3, dtype=dtype)
        other.grad = reference.grad = torch.full((4,), 0.5, dtype=other_dtype)
        optimizer.step()
        torch_optimizer.step()
    assert empty.shape == (0, 3) and float(optimizer.state[empty]["step"]) == 2.0
    torch.testing.assert_close(other, reference, **KERNEL_TOLERANCE)


def test_state_dict_post_hooks_get_and_shape_the_dict_that_is_returned(backend):
    # torch runs the post hooks last and returns what they return; a hook that casts
    # the state for a smaller checkpoint, or drops group keys, must see the saved form.
    seen = []

    def to_bf16(optimizer, state_dict):
        seen.append({key: value.dtype for key, value in state_dict["state"][0].items()})
        for state in state_dict["state"].values():
            state["square_avg"] = state["square_avg"].to(torch.bfloat16)
        return state_dict

    def drop_keys(optimizer, state_dict):
        state_dict["param_groups"][0].pop("rounding_seed")
        return None  # (changed in place)

    for options in ({}, {"state_dtype": torch.bfloat16}, {"state_dtype": torch.uint8}):
        model, optimizer = trained(**options)
        expected = optimizer.state_dict()["state"][0]["square_avg"]
        optimizer.register_state_dict_post_hook(to_bf16)
        optimizer.register_state_dict_post_hook(drop_keys)
        for save in (optimizer.state_dict, optimizer.compact_state_dict):
            if save == optimizer.compact_state_dict and options:
                continue  # (compact 8-bit state is codes by design; bf16 state is as state_dict's)
            seen.clear()
            state_dict = save()
            assert seen == [{"step": torch.float32, "square_avg": torch.float32, "acc_delta": torch.float32}], options
            assert state_dict["state"][0]["square_avg"].dtype == torch.bfloat16
            torch.testing.assert_close(state_dict["state"][0]["square_avg"], expected.to(torch.bfloat16), rtol=0, atol=0)
            assert "rounding_seed" not in state_dict["param_groups"][0] and "square_avg_scale" not in state_dict["state"][0]


def test_state_dict_hooks_registered_or_saving_inside_a_pre_hook_behave_as_torchs(backend):
    # The post hooks once ran swapped out around torch's packing: a post hook that a
    # pre hook registered ran on the unconverted dict (8-bit codes) and was then lost,
    # and a pre hook that saved too got no post hooks.
    model, optimizer = trained(state_dtype=torch.uint8)
    seen = []

    def post_hook(optimizer, state_dict):
        seen.append(state_dict["state"][0]["square_avg"].dtype)

    def registering_pre_hook(optimizer):
        if not seen:
            optimizer.register_state_dict_post_hook(post_hook)

    optimizer.register_state_dict_pre_hook(registering_pre_hook)
    optimizer.state_dict()
    optimizer.state_dict()
    assert seen == [torch.float32, torch.float32] and len(optimizer._optimizer_state_dict_post_hooks) == 1

    inner: list[object] = []

    def saving_pre_hook(optimizer):
        if not inner:
            inner.append(None)  # (the inner call's pre hook must not save again)
            inner.append(optimizer.state_dict())

    model, optimizer = trained(state_dtype=torch.uint8)
    optimizer.register_state_dict_post_hook(lambda optimizer, state_dict: {**state_dict, "hooked": True})
    optimizer.register_state_dict_pre_hook(saving_pre_hook)
    assert optimizer.state_dict()["hooked"] and inner[1]["hooked"]


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16, torch.uint8])
def test_a_key_that_user_code_adds_to_an_entry_is_saved_as_torch_saves_it(backend, state_dtype):
    # torch saves whatever an entry holds; a key ending in "_scale" was once taken for
    # 8-bit state's scales and dropped.
    model, optimizer = trained(state_dtype=state_dtype)
    optimizer.state[model[0].weight]["lr_scale"] = torch.tensor(0.5)
    saved = optimizer.state_dict()["state"][0]
    assert torch.equal(saved["lr_scale"], torch.tensor(0.5))
    assert "square_avg_scale" not in saved and saved["square_avg"].dtype == torch.float32


def test_state_dict_of_another_model_names_the_mismatch_and_changes_nothing(backend):
    model, optimizer = trained()
    other = torch.nn.Sequential(torch.nn.Linear(6, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2))
    other_optimizer = Adadelta(other.parameters())
    other(torch.randn(2, 6)).sum().backward()
    other_optimizer.step()
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=r"param 0 has shape \(9, 6\) but the param has shape \(8, 6\)"):
        optimizer.load_state_dict(other_optimizer.state_dict())
    assert_unchanged(model, optimizer, before)
    assert optimizer.param_groups[0]["lr"] == 1.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_and_inf_grads_propagate_as_in_torch(backend, bad):
    model, optimizer = trained()
    reference = copy.deepcopy(model)
    torch_optimizer = torch.optim.Adadelta(reference.parameters())
    torch_optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
    grads = [torch.randn_like(p) for p in model.parameters()]
    for m, o in ((model, optimizer), (reference, torch_optimizer)):
        for p, grad in zip(m.parameters(), grads):
            p.grad = grad.clone()
        m[0].weight.grad[1, 2] = bad
        m[2].bias.grad[0] = bad
        o.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, equal_nan=True, **KERNEL_TOLERANCE)
    for a, b in zip(model.parameters(), reference.parameters()):
        for key in ("square_avg", "acc_delta"):
            torch.testing.assert_close(optimizer.state[a][key], torch_optimizer.state[b][key], equal_nan=True, **KERNEL_TOLERANCE)


# ------------------------------------------------- the model changes under us
def run_both(change, steps_before: int = 3, steps_after: int = 3, **options):
    """Train ours and torch's, apply ``change(model)`` to both models mid-run, train on."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = copy.deepcopy(model)
    optimizer, torch_optimizer = Adadelta(model.parameters(), **options), torch.optim.Adadelta(reference.parameters())
    x, y = torch.randn(16, 6), torch.randn(16, 2)

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x.to(next(m.parameters()).dtype)), y.to(next(m.parameters()).dtype)).backward()
            o.step()

    train(model, optimizer, steps_before)
    train(reference, torch_optimizer, steps_before)
    change(model)
    change(reference)
    train(model, optimizer, steps_after)
    train(reference, torch_optimizer, steps_after)
    return model, optimizer, reference, torch_optimizer


def assert_same_params(model, reference, **tolerance):
    for a, b in zip(model.parameters(), reference.parameters()):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, **(tolerance or KERNEL_TOLERANCE))


def test_model_to_dtype_is_noticed_and_rebuilt(backend):
    model, optimizer, reference, _ = run_both(lambda m: m.to(torch.float64))
    # torch keeps the fp32 state it had; ours carries it into fp64 state: the same
    # values, then each step in fp64 instead of fp32-rounded state.
    assert_same_params(model, reference, **fp64_conversion_tolerance())
    (flat,) = optimizer.flat_states()
    assert flat.dtype == torch.float64 and flat.square_avg.dtype == torch.float64
    # Each param keeps the storage model.to() gave it.
    assert all(p.untyped_storage().nbytes() == p.numel() * 8 for p in model.parameters())


def test_model_to_dtype_with_swap_tensors_is_followed(backend):
    """Under ``set_swap_module_params_on_conversion(True)``, ``model.to()`` swaps each
    param's TensorImpl (``torch.utils.swap_tensors``): the optimizer holds no view of
    the old one, so the swap goes through and the state follows, as with torch."""

    def swap_to_fp64(m):
        torch.__future__.set_swap_module_params_on_conversion(True)
        try:
            m.to(torch.float64)
        finally:
            torch.__future__.set_swap_module_params_on_conversion(False)

    model, optimizer, reference, _ = run_both(swap_to_fp64)
    assert_same_params(model, reference, **fp64_conversion_tolerance())
    assert [flat.dtype for flat in optimizer.flat_states()] == [torch.float64]


def test_swap_tensors_on_a_param_is_followed(backend):
    """``torch.utils.swap_tensors`` on a param (as ``model.to()`` does under
    ``set_swap_module_params_on_conversion``), called directly: the optimizer updates
    the swapped-in data from the param's state, as torch's does."""
    swapped = []

    def swap(m):
        torch.utils.swap_tensors(m[0].weight, torch.nn.Parameter(torch.full((8, 6), 0.25)))
        swapped.append(m[0].weight.data_ptr())

    model, _, reference, _ = run_both(swap)
    assert_same_params(model, reference)
    assert model[0].weight.data_ptr() == swapped[0]


def test_assigned_param_data_is_noticed(backend):
    assigned = []

    def change(m):
        m[0].weight.data = torch.full((8, 6), 0.25)
        assigned.append(m[0].weight.data_ptr())

    model, optimizer, reference, _ = run_both(change)
    assert_same_params(model, reference)
    # The optimizer updated the new data where the user put it.
    assert model[0].weight.data_ptr() == assigned[0]


def test_module_load_state_dict_is_used(backend):
    torch.manual_seed(5)
    weights = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).state_dict()
    model, _, reference, _ = run_both(lambda m: m.load_state_dict(weights))
    assert_same_params(model, reference)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_module_load_state_dict_reaches_the_master_weights(backend, dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 2).to(dtype)
    optimizer = Adadelta(model.parameters(), master_weights=True)
    model(torch.randn(3, 6).to(dtype)).sum().backward()
    optimizer.step()
    loaded = {k: torch.full_like(v, 0.5) for k, v in model.state_dict().items()}
    model.load_state_dict(loaded)
    optimizer.zero_grad(set_to_none=False)  # zero grads: params move only by weight decay (none)
    optimizer.step()
    for param in model.parameters():
        # A zero gradient leaves the loaded values in place; a stale master would
        # have put the pre-load values back.
        assert torch.equal(param.detach(), torch.full_like(param, 0.5))
        assert torch.equal(optimizer.state[param]["master_param"], torch.full_like(param, 0.5, dtype=torch.float32))


def test_frozen_and_unfrozen_params_follow_torch(backend):
    def freeze(m):
        m[0].weight.requires_grad_(False)
        m[0].weight.grad = None

    model, optimizer, reference, torch_optimizer = run_both(freeze)
    assert_same_params(model, reference)
    for m in (model, reference):
        m[0].weight.requires_grad_(True)
    x, y = torch.randn(16, 6), torch.randn(16, 2)
    for m, o in ((model, optimizer), (reference, torch_optimizer)):
        o.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        o.step()
    assert_same_params(model, reference)
    assert float(optimizer.state[model[0].weight]["step"]) == float(torch_optimizer.state[reference[0].weight]["step"]) == 4.0


@pytest.mark.parametrize("master_weights", [False, True])
def test_a_frozen_param_takes_no_state_until_it_can_have_a_grad(backend, master_weights):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Linear(300, 2))
    if master_weights:
        model.to(torch.bfloat16)
    frozen = model[0].weight
    frozen.requires_grad_(False)
    optimizer = Adadelta(model.parameters(), master_weights=master_weights)
    x = torch.randn(4, 6, dtype=frozen.dtype)

    def train() -> None:
        optimizer.zero_grad()
        model(x).square().sum().backward()
        optimizer.step()

    def laid_out() -> list[torch.Tensor]:
        return [param for flat in optimizer.flat_states() for param in flat.params]

    train()
    assert not any(param is frozen for param in laid_out()) and len(laid_out()) == 3
    assert sum(flat.n_elements for flat in optimizer.flat_states()) < frozen.numel()
    assert frozen not in optimizer.state
    # Loading state for it (a checkpoint from before it was frozen) keeps that state.
    saved = copy.deepcopy(optimizer.state_dict())
    saved["state"][0] = {key: value.clone() for key, value in saved["state"][2].items()}
    for name in ("square_avg", "acc_delta"):
        saved["state"][0][name] = torch.full_like(frozen, 0.25, dtype=torch.float32)
    if master_weights:
        saved["state"][0]["master_param"] = frozen.detach().float()
    optimizer.load_state_dict(saved)
    assert any(param is frozen for param in laid_out())
    assert torch.equal(optimizer.state_dict()["state"][0]["square_avg"], torch.full_like(frozen, 0.25, dtype=torch.float32))
    # Unfrozen, a frozen param without state gets a segment at its first grad.
    model[0].bias.requires_grad_(False)
    model[0].bias.grad = None
    optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()) | {"state": {}})
    assert len(laid_out()) == 2
    model[0].bias.requires_grad_(True)
    train()
    assert len(laid_out()) == 3 and float(optimizer.state[model[0].bias]["step"]) == 1.0
    assert frozen not in optimizer.state


def test_a_param_frozen_after_an_early_load_takes_no_state(backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 300), torch.nn.Linear(300, 2))
    optimizer = Adadelta(model.parameters())
    optimizer.load_state_dict(optimizer.state_dict())  # as accelerate.prepare does, before any grad
    model[0].weight.requires_grad_(False)  # then a callback freezes
    model(torch.randn(4, 6)).square().sum().backward()
    optimizer.step()
    laid_out = [param for flat in optimizer.flat_states() for param in flat.params]
    assert len(laid_out) == 3 and not any(param is model[0].weight for param in laid_out)
    assert model[0].weight not in optimizer.state


@pytest.mark.parametrize(
    "dtype,options",
    [
        (torch.float32, {"state_dtype": torch.bfloat16}),
        (torch.float32, {"state_dtype": torch.uint8}),
        (torch.bfloat16, {"stochastic_rounding": True}),
    ],
    ids=["bf16_state", "u8_state", "stochastic_rounding"],
)
def test_a_resume_rounds_alike_whatever_is_frozen_when_it_loads(backend, dtype, options):
    """Stochastic rounding's noise is keyed by the element's place in the flat state,
    so these modes lay out every param, frozen or not: a run that froze its first
    layer before its first step, resumed where the layer is frozen only after the
    load (a framework restores the optimizer before its callbacks freeze), rounds
    as the uninterrupted run does."""
    def model_and_optimizer():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 40), torch.nn.Linear(40, 2)).to(dtype)
        return model, Adadelta(model.parameters(), **options)

    def train(model, optimizer, steps):
        for k in range(steps):
            optimizer.zero_grad()
            generator = torch.Generator().manual_seed(k)
            model(torch.randn(4, 6, generator=generator).to(dtype)).square().sum().backward()
            optimizer.step()

    model, optimizer = model_and_optimizer()
    model[0].requires_grad_(False)
    train(model, optimizer, 2)
    checkpoint = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    train(model, optimizer, 3)
    resumed_model, resumed = model_and_optimizer()
    resumed_model.load_state_dict(checkpoint[0])
    resumed.load_state_dict(checkpoint[1])
    resumed_model[0].requires_grad_(False)
    train(resumed_model, resumed, 3)
    for mine, theirs in zip(model.parameters(), resumed_model.parameters()):
        assert torch.equal(mine, theirs)
    assert any(param is model[0].weight for flat in optimizer.flat_states() for param in flat.params)


def test_module_zero_grad_set_to_none_skips_like_torch(backend):
    def zero(m):
        m.zero_grad(set_to_none=True)

    model, optimizer, reference, _ = run_both(zero)
    assert_same_params(model, reference)


# ------------------------------------------------------------------ checkpoints
def test_interrupted_save_leaves_the_previous_checkpoint_usable(tmp_path, monkeypatch):
    model, optimizer = trained()
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    good = path.read_bytes()

    real_save = torch.save

    def dies_halfway(obj, file, *args, **kwargs):
        real_save(obj, file, *args, **kwargs)
        file.truncate(100)  # as if the process died mid-write
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert [f for f in os.listdir(tmp_path)] == ["checkpoint.pt"], "no partial file is left behind"
    checkpoint = load_checkpoint(path)
    fresh = Adadelta(model.parameters())
    fresh.load_state_dict(checkpoint["optimizer"])
