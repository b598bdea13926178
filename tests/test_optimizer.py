"""triton_adadelta.Adadelta as a drop-in torch.optim.Adadelta, on both backends."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from tolerances import TOLERANCES, parity_tolerance
from triton_adadelta import Adadelta


def assert_matches(ours: torch.Tensor, theirs: torch.Tensor, tolerance: dict[str, float] | None = None) -> None:
    torch.testing.assert_close(ours, theirs, **(tolerance or parity_tolerance()))


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(7, 33)
        self.second = torch.nn.Linear(33, 5)
        self.unused = torch.nn.Linear(3, 3)  # never gets a grad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def make_pair(seed: int = 0) -> tuple[Net, Net]:
    torch.manual_seed(seed)
    model = Net()
    return model, copy.deepcopy(model)


def groups(model: Net) -> list[dict]:
    return [
        {"params": [*model.first.parameters(), *model.unused.parameters()], "lr": 0.5, "weight_decay": 1e-2},
        {"params": model.second.parameters(), "rho": 0.8, "eps": 1e-5, "maximize": False},
    ]


def train_step(model: Net, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, set_to_none: bool = True) -> float:
    optimizer.zero_grad(set_to_none=set_to_none)
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()


def assert_models_and_states_match(model, reference, optimizer, torch_optimizer, tolerance: dict[str, float] | None = None) -> None:
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert_matches(ours.detach(), theirs.detach(), tolerance)
        assert (ours in optimizer.state) == (theirs in torch_optimizer.state), name
        if ours in optimizer.state:
            for key in ("square_avg", "acc_delta"):
                assert_matches(optimizer.state[ours][key], torch_optimizer.state[theirs][key], tolerance)
            assert float(optimizer.state[ours]["step"]) == float(torch_optimizer.state[theirs]["step"])


def test_matches_torch_over_many_steps_with_groups_scheduler_and_a_param_without_grad(backend):
    model, reference = make_pair()
    optimizer = Adadelta(groups(model))
    torch_optimizer = torch.optim.Adadelta(groups(reference))
    schedulers = [torch.optim.lr_scheduler.StepLR(o, step_size=7, gamma=0.5) for o in (optimizer, torch_optimizer)]
    torch.manual_seed(1)
    x, y = torch.randn(32, 7), torch.randn(32, 5)
    for step in range(40):
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            train_step(m, o, x, y, set_to_none=step % 2 == 0)
        for scheduler in schedulers:
            scheduler.step()
        if step == 20:
            # Hyper-parameters changed between steps are honoured.
            for o in (optimizer, torch_optimizer):
                o.param_groups[1]["rho"] = 0.95
                o.param_groups[0]["weight_decay"] = 0.1
    assert model.unused.weight not in optimizer.state
    assert_models_and_states_match(model, reference, optimizer, torch_optimizer)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_interop_through_torch_save(backend, direction):
    model, reference = make_pair()
    optimizer = Adadelta(groups(model))
    torch_optimizer = torch.optim.Adadelta(groups(reference))
    torch.manual_seed(2)
    x, y = torch.randn(16, 7), torch.randn(16, 5)
    for _ in range(5):
        train_step(model, optimizer, x, y)
        train_step(reference, torch_optimizer, x, y)
    source, target = (optimizer, torch_optimizer) if direction == "ours_to_torch" else (torch_optimizer, optimizer)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    # Fresh optimizers: the loaded one must take its whole state from the dict.
    fresh_model, fresh_reference = copy.deepcopy(model), copy.deepcopy(reference)
    if direction == "ours_to_torch":
        target = torch.optim.Adadelta(groups(fresh_reference))
        target.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
        ours_model, ours_optimizer, torch_model, torch_opt = model, optimizer, fresh_reference, target
    else:
        target = Adadelta(groups(fresh_model))
        target.load_state_dict(torch.load(buffer, map_location="cpu", weights_only=True))
        ours_model, ours_optimizer, torch_model, torch_opt = fresh_model, target, reference, torch_optimizer
    for _ in range(5):
        train_step(ours_model, ours_optimizer, x, y)
        train_step(torch_model, torch_opt, x, y)
    assert_models_and_states_match(ours_model, torch_model, ours_optimizer, torch_opt)


def test_state_dict_has_torch_format(backend):
    model, reference = make_pair()
    optimizer, torch_optimizer = Adadelta(model.parameters()), torch.optim.Adadelta(reference.parameters())
    x, y = torch.randn(4, 7), torch.randn(4, 5)
    train_step(model, optimizer, x, y)
    train_step(reference, torch_optimizer, x, y)
    ours, theirs = optimizer.state_dict(), torch_optimizer.state_dict()
    assert ours["state"].keys() == theirs["state"].keys()
    for index, state in theirs["state"].items():
        assert ours["state"][index].keys() == state.keys()
        for key, value in state.items():
            assert ours["state"][index][key].shape == value.shape
            assert ours["state"][index][key].dtype == value.dtype
    for ours_group, torch_group in zip(ours["param_groups"], theirs["param_groups"]):
        for key, value in torch_group.items():
            assert ours_group[key] == value, key


INVALID = [
    {"lr": -1.0},
    {"lr": torch.tensor([1.0, 2.0])},
    {"rho": 1.1},
    {"rho": -0.1},
    {"eps": -1e-6},
    {"weight_decay": -1.0},
]


@pytest.mark.parametrize("kwargs", INVALID, ids=lambda k: ",".join(k))
def test_invalid_hyper_parameters_raise_torchs_error(kwargs):
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError) as torch_error:
        torch.optim.Adadelta(params, **kwargs)
    with pytest.raises(ValueError) as our_error:
        Adadelta(params, **kwargs)
    assert str(our_error.value) == str(torch_error.value)


def test_defaults_and_signature_match_torch():
    import inspect

    ours = inspect.signature(Adadelta.__init__).parameters
    theirs = inspect.signature(torch.optim.Adadelta.__init__).parameters
    for name, parameter in theirs.items():
        assert name in ours, name
        assert ours[name].default == parameter.default or name == "params", name
        assert ours[name].kind == parameter.kind, name


def test_differentiable_is_refused_clearly():
    with pytest.raises(ValueError, match="differentiable=True"):
        Adadelta([torch.nn.Parameter(torch.zeros(2))], differentiable=True)


def test_foreach_has_no_effect(backend):
    results = []
    for foreach in (None, True, False):
        torch.manual_seed(0)
        param = torch.nn.Parameter(torch.randn(100))
        optimizer = Adadelta([param], foreach=foreach)
        param.grad = torch.ones(100)
        optimizer.step()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


def test_zero_grad_set_to_none_skips_the_param_and_leaves_its_state_untouched(backend):
    first, second = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    optimizer = Adadelta([first, second])
    first.grad, second.grad = torch.ones(10), torch.ones(10)
    optimizer.step()
    before = {k: v.clone() for k, v in optimizer.state[second].items()}
    second_before = second.detach().clone()
    optimizer.zero_grad()  # set_to_none=True
    first.grad = torch.ones(10)
    optimizer.step()
    assert torch.equal(second.detach(), second_before)
    for key, value in before.items():
        assert torch.equal(optimizer.state[second][key], value), key
    assert float(optimizer.state[first]["step"]) == 2.0


def test_zeroed_grad_is_a_real_zero_gradient_and_decays_the_state(backend):
    param, reference = torch.nn.Parameter(torch.randn(10)), None
    reference = torch.nn.Parameter(param.detach().clone())
    optimizer, torch_optimizer = Adadelta([param]), torch.optim.Adadelta([reference])
    for p, o in ((param, optimizer), (reference, torch_optimizer)):
        p.grad = torch.ones(10)
        o.step()
        o.zero_grad(set_to_none=False)
        o.step()
    assert float(optimizer.state[param]["step"]) == 2.0
    assert_matches(optimizer.state[param]["square_avg"], torch_optimizer.state[reference]["square_avg"])
    # zero_grad(set_to_none=False) zeroed the user's grad in place; step() never replaced it.
    assert param.grad is not None and not param.grad.any()


def test_state_is_flat_with_aligned_segments_and_params_and_grads_stay_in_place():
    model, _ = make_pair()
    params = list(model.parameters())
    before = [(p.data_ptr(), p.untyped_storage().nbytes()) for p in params]
    optimizer = Adadelta(model.parameters())
    model(torch.randn(2, 7)).sum().backward()
    grads = [p.grad for p in params]
    grad_values = [None if g is None else g.clone() for g in grads]
    optimizer.step()
    assert [(p.data_ptr(), p.untyped_storage().nbytes()) for p in params] == before, "nothing is rebound"
    for param, grad, value in zip(params, grads, grad_values):
        assert param.grad is grad, "grads are never re-pointed"
        if grad is not None:
            assert torch.equal(grad, value), "grads are never written"
    (flat,) = optimizer.flat_states()
    covered = torch.zeros(flat.n_elements, dtype=torch.bool)
    for i, param in enumerate(flat.params):
        assert flat.offsets[i] * flat.square_avg.element_size() % 16 == 0, "segments start on a 16-byte boundary"
        covered[flat.offsets[i] : flat.offsets[i] + flat.numels[i]] = True
        if param.grad is not None:
            state = optimizer.state[param]["square_avg"]
            assert state.data_ptr() == flat.square_avg.data_ptr() + flat.offsets[i] * 4, "state is a view of the flat state"
    for buffer in (flat.square_avg, flat.acc_delta):
        assert torch.all(buffer[~covered] == 0), "padding is zero"


def test_new_grads_from_the_modules_zero_grad_loop_match_torch(backend):
    model, reference = make_pair()
    optimizer, torch_optimizer = Adadelta(model.parameters()), torch.optim.Adadelta(reference.parameters())
    x, y = torch.randn(8, 7), torch.randn(8, 5)
    for m, o in ((model, optimizer), (reference, torch_optimizer)):
        for _ in range(3):
            m.zero_grad()  # the module's zero_grad: grads become None, backward makes new ones
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    assert_models_and_states_match(model, reference, optimizer, torch_optimizer)


def test_tied_weights_are_one_param(backend):
    shared = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = Adadelta([{"params": [shared]}])
    shared.grad = torch.ones(4, 4)
    optimizer.step()
    (flat,) = optimizer.flat_states()
    assert len(flat.params) == 1
    embedding = torch.nn.Embedding(4, 4)
    head = torch.nn.Linear(4, 4, bias=False)
    head.weight = embedding.weight
    model = torch.nn.Sequential(embedding, head)
    optimizer = Adadelta(model.parameters())
    model(torch.tensor([0, 1])).sum().backward()
    optimizer.step()
    assert len(optimizer.flat_states()[0].params) == 1


def test_closure_is_evaluated_and_its_loss_returned(backend):
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = Adadelta([param])

    def closure():
        optimizer.zero_grad()
        loss = (param**2).sum()
        loss.backward()
        return loss

    assert optimizer.step(closure).item() == 3.0
    assert not torch.equal(param.detach(), torch.ones(3))


def test_add_param_group_and_named_parameters(backend):
    model, reference = make_pair()
    optimizer = Adadelta(model.first.named_parameters(), lr=0.3)
    torch_optimizer = torch.optim.Adadelta(reference.first.named_parameters(), lr=0.3)
    x, y = torch.randn(8, 7), torch.randn(8, 5)
    for m, o in ((model, optimizer), (reference, torch_optimizer)):
        train_step(m, o, x, y)
        o.add_param_group({"params": m.second.named_parameters(), "lr": 0.7})
        train_step(m, o, x, y)
        train_step(m, o, x, y)
    assert optimizer.state_dict()["param_groups"][0]["param_names"] == ["weight", "bias"]
    assert_models_and_states_match(model, reference, optimizer, torch_optimizer)


def test_tensor_lr_matches_float_lr(backend):
    results = []
    for lr in (0.25, torch.tensor(0.25)):
        param = torch.nn.Parameter(torch.linspace(-1, 1, 50))
        optimizer = Adadelta([param], lr=lr)
        for _ in range(3):
            param.grad = torch.linspace(1, 2, 50)
            optimizer.step()
        results.append(param.detach().clone())
    assert_matches(results[1], results[0])


def test_load_state_dict_that_does_not_fit_raises_and_changes_nothing(backend):
    model, _ = make_pair()
    optimizer = Adadelta(model.parameters())
    x, y = torch.randn(4, 7), torch.randn(4, 5)
    train_step(model, optimizer, x, y)
    saved = copy.deepcopy(optimizer.state_dict())
    before = {id(p): {k: v.clone() for k, v in s.items()} for p, s in optimizer.state.items()}
    bad = copy.deepcopy(saved)
    bad["state"][2]["square_avg"] = torch.zeros(5, 34)  # second.weight is 5x33
    bad["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=r"square_avg.*param 2.*\(5, 34\).*\(5, 33\)"):
        optimizer.load_state_dict(bad)
    assert optimizer.param_groups[0]["lr"] == 1.0
    for param, state in optimizer.state.items():
        for key, value in state.items():
            assert torch.equal(value, before[id(param)][key])
    missing = copy.deepcopy(saved)
    del missing["state"][0]["acc_delta"]
    with pytest.raises(ValueError, match="acc_delta"):
        optimizer.load_state_dict(missing)
    with pytest.raises(ValueError, match="parameter groups"):
        optimizer.load_state_dict({"state": {}, "param_groups": []})


def test_fp32_state_is_never_downcast_on_load(backend):
    param = torch.nn.Parameter(torch.randn(8).bfloat16())
    reference = torch.nn.Parameter(param.detach().clone())
    torch_optimizer = torch.optim.Adadelta([reference])
    reference.grad = torch.ones(8, dtype=torch.bfloat16)
    torch_optimizer.step()
    optimizer = Adadelta([param])
    optimizer.load_state_dict(torch_optimizer.state_dict())
    assert optimizer.state[param]["square_avg"].dtype == torch.float32
    torch.testing.assert_close(optimizer.state[param]["square_avg"], torch_optimizer.state[reference]["square_avg"].float())


def test_cpu_path_with_torchs_sqrt_is_bit_identical_to_torch(cpu_path, monkeypatch):
    monkeypatch.setenv("TRITON_ADADELTA_CPU_SQRT", "torch")
    model, reference = make_pair()
    optimizer = Adadelta(groups(model))
    torch_optimizer = torch.optim.Adadelta(groups(reference))
    torch.manual_seed(1)
    x, y = torch.randn(32, 7), torch.randn(32, 5)
    for step in range(20):
        for m, o in ((model, optimizer), (reference, torch_optimizer)):
            train_step(m, o, x, y, set_to_none=step % 2 == 0)
    exact = TOLERANCES["torch_parity_cpu_fp32_torch_sqrt"].value
    assert_models_and_states_match(model, reference, optimizer, torch_optimizer, {"rtol": exact, "atol": exact})


def test_every_step_count_of_a_flat_state_with_thousands_of_params_advances(cpu_path):
    """More params than a block of 4096 in one flat state: each count advances once per
    step with a grad, and a found_inf step advances none. (The counts are the
    optimizer's own small op, the same on every backend; the CPU path keeps it quick.)"""
    params = [torch.nn.Parameter(torch.ones(1)) for _ in range(5000)]
    optimizer = Adadelta(params)
    for param in params:
        param.grad = torch.ones(1)
    optimizer.step()
    # Every other param from 4095 on has no grad at the second step.
    for i in range(4095, 5000, 2):
        params[i].grad = None
    optimizer.step()
    optimizer.found_inf = torch.ones(1)
    optimizer.step()
    del optimizer.found_inf
    (flat,) = optimizer.flat_states()
    expected = torch.tensor([1.0 if i >= 4095 and (i - 4095) % 2 == 0 else 2.0 for i in range(5000)])
    assert torch.equal(flat.steps.cpu(), expected)
    assert all(float(optimizer.state[p]["step"]) == float(e) for p, e in zip(params, expected))


class _SubclassTensor(torch.Tensor):
    """A tensor subclass whose ops could do anything: not updated through its address."""


def test_a_tensor_subclass_param_other_than_dtensor_is_refused_with_a_type_error() -> None:
    plain = torch.nn.Parameter(torch.ones(3))
    subclass = torch.ones(3).as_subclass(_SubclassTensor).requires_grad_()
    with pytest.raises(TypeError, match="_SubclassTensor"):
        Adadelta([plain, subclass])
    optimizer = Adadelta([plain])
    with pytest.raises(TypeError, match="_SubclassTensor"):
        optimizer.add_param_group({"params": [subclass]})
    assert len(optimizer.param_groups) == 1
