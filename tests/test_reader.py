"""The native param reader (``triton_adadelta/reader.py``, ``csrc/read_params.cpp``).

It reads in one pass what each step needs from every param and grad. It must read
exactly what Python reads, leave every case it does not take to the Python reads
(which say what is wrong), and change no result: a step is bit-identical with it and
without it.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

import triton_adadelta.flat
import triton_adadelta.optimizer
import triton_adadelta.reader
from triton_adadelta import Adadelta, native_build
from triton_adadelta.flat import table_for_tensors
from triton_adadelta.native_build import BuildError, NotBuilt
from triton_adadelta.kernels.adadelta import ALIGNED_ROW, GRAD_ROW, N_TABLE_ROWS, PARAM_ROW, STATE_ALIGNMENT
from triton_adadelta.reader import (
    READ_IRREGULAR,
    READ_NEW_GRADS,
    READ_NEW_PARAMS,
    READ_SAME,
    param_reader,
    reader_status,
)


@pytest.fixture
def reader() -> Callable[[list[torch.Tensor], int, int], int]:
    function = param_reader(wait=True)
    if function is None:
        pytest.skip(f"the native reader is {reader_status()}")
    return function


def read(
    reader, params: list[torch.Tensor], with_versions: bool = True, out: torch.Tensor | None = None
) -> tuple[int, torch.Tensor]:
    status, out, _ = read_with_table(reader, params, with_versions, out)
    return status, out


def read_with_table(
    reader, params: list[torch.Tensor], with_versions: bool = True, out: torch.Tensor | None = None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    n = len(params)
    out = torch.full((3, n), -7, dtype=torch.int64) if out is None else out
    table = torch.full((N_TABLE_ROWS, 2 * n), -5, dtype=torch.int64)
    table[ALIGNED_ROW] = 0
    # Where each piece starts: the bulk at 0, the tail after its whole STATE_ALIGNMENT elements.
    element_bytes = params[0].element_size()
    tails = [param.numel() // STATE_ALIGNMENT * STATE_ALIGNMENT * element_bytes for param in params]
    piece_bytes = torch.tensor([[0, tail] for tail in tails], dtype=torch.int64)
    status = reader(
        params, out.data_ptr(), int(with_versions), table.data_ptr(), piece_bytes.data_ptr(), PARAM_ROW, GRAD_ROW,
        ALIGNED_ROW,
    )  # fmt: skip
    return status, out, table


@pytest.mark.skipif(os.environ.get("TRITON_ADADELTA_NATIVE_READER") == "0", reason="switched off")
def test_the_native_reader_builds_on_this_machine() -> None:
    # CI runs on a machine like the users': a failed build must fail here, not only
    # make steps slower.
    param_reader(wait=True)
    assert reader_status() == "native"


def test_it_reads_the_addresses_and_versions_that_python_reads(reader) -> None:
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in [(3,), (4, 5), (1,), (2, 3, 4)]]
    for param in params:
        param.grad = torch.randn_like(param)
    with torch.no_grad():
        params[1].mul_(2)
        params[1].add_(1)
    status, out = read(reader, params)
    assert status == READ_NEW_PARAMS
    assert out[0].tolist() == [param.data_ptr() for param in params]
    assert out[1].tolist() == [param.grad.data_ptr() for param in params]
    assert out[2].tolist() == [param._version for param in params]
    status, out = read(reader, params, with_versions=False)
    assert status == READ_NEW_PARAMS and out[2].tolist() == [-7] * len(params)


def test_it_says_whether_the_addresses_are_the_last_call_s(reader) -> None:
    params = [torch.nn.Parameter(torch.randn(4)) for _ in range(3)]
    for param in params:
        param.grad = torch.randn_like(param)
    status, out = read(reader, params)
    assert status == READ_NEW_PARAMS
    assert read(reader, params, out=out)[0] == READ_SAME
    kept = params[2].grad
    params[2].grad = kept.clone()  # (kept alive: another address)
    assert read(reader, params, out=out)[0] == READ_NEW_GRADS
    assert read(reader, params, out=out)[0] == READ_SAME
    params[0].data = params[0].data.clone()
    assert read(reader, params, out=out)[0] == READ_NEW_PARAMS
    assert out[0].tolist() == [param.data_ptr() for param in params]
    assert out[1].tolist() == [param.grad.data_ptr() for param in params]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_the_table_rows_it_writes_are_those_python_writes(reader, dtype: torch.dtype) -> None:
    storage = torch.randn(400).to(dtype)
    # Params at offsets off the 16-byte vector too, so that some bulks are not aligned.
    params = [torch.nn.Parameter(storage[start : start + numel]) for start, numel in [(0, 37), (40, 9), (53, 64), (130, 1)]]
    for param in params:
        param.grad = torch.randn(param.shape).to(dtype)
    status, _, table = read_with_table(reader, params)
    assert status == READ_NEW_PARAMS
    expected, _ = table_for_tensors(params, [param.grad for param in params])
    rows = [PARAM_ROW, GRAD_ROW, ALIGNED_ROW]
    assert torch.equal(table[rows], expected.pieces[rows])
    assert 0 < int(table[ALIGNED_ROW].sum()) < len(params)  # both branches are covered


def _grad_of_other_numel(param: torch.nn.Parameter) -> None:
    param.grad.data = torch.randn(2)  # `.data` skips the size check of `p.grad = ...`


def _grad_of_other_dtype(param: torch.nn.Parameter) -> None:
    param.grad.data = torch.randn(param.shape, dtype=torch.float64)


def _transposed_grad(param: torch.nn.Parameter) -> None:
    param.grad = torch.randn(param.shape[::-1]).t()


def _transposed_param(param: torch.nn.Parameter) -> None:
    param.data = torch.randn(param.shape[::-1]).t()


def _sparse_grad(param: torch.nn.Parameter) -> None:
    param.grad = torch.randn(param.shape).to_sparse()


def _param_of_other_dtype(param: torch.nn.Parameter) -> None:
    param.data = param.data.double()
    param.grad = torch.randn_like(param)


def _overlapping_grad(param: torch.nn.Parameter) -> None:
    param.grad = torch.randn(1, param.shape[1]).expand(param.shape)


IRREGULAR = {
    "no grad": lambda param: setattr(param, "grad", None),
    "a grad of another size (through .data)": _grad_of_other_numel,
    "a grad of another dtype (through .data)": _grad_of_other_dtype,
    "a transposed grad": _transposed_grad,
    "a transposed param": _transposed_param,
    "an expanded (overlapping) grad": _overlapping_grad,
    "a sparse grad": _sparse_grad,
    "a param of another dtype than the first": _param_of_other_dtype,
}


@pytest.mark.parametrize("case", list(IRREGULAR))
def test_it_leaves_each_case_it_does_not_take_to_python(reader, case: str) -> None:
    params = [torch.nn.Parameter(torch.randn(3, 4)) for _ in range(4)]
    for param in params:
        param.grad = torch.randn_like(param)
    assert read(reader, params)[0] == READ_NEW_PARAMS
    IRREGULAR[case](params[2])
    assert read(reader, params)[0] == READ_IRREGULAR + 2  # + the index of the param


def test_a_conjugated_complex_grad_is_left_to_python(reader) -> None:
    param = torch.nn.Parameter(torch.randn(4, dtype=torch.complex64))
    param.grad = torch.randn(4, dtype=torch.complex64).conj()  # a lazy conjugate view
    assert param.grad.is_conj()
    assert read(reader, [param])[0] == READ_IRREGULAR


# ----------------------------------------------------------- the step, either way
def _set_reader(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    if not on:
        monkeypatch.setattr(triton_adadelta.flat, "param_reader", lambda: None)


def _run(
    steps: list[Callable[[list[torch.nn.Parameter], int], None]], dtype: torch.dtype, **options
) -> tuple[list[torch.Tensor], dict]:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape).to(dtype)) for shape in [(5, 7), (33,), (4, 4), (1,)]]
    optimizer = Adadelta([{"params": params[:2]}, {"params": params[2:], "lr": 0.5, "weight_decay": 0.1}], **options)
    for index, edit in enumerate(steps):
        generator = torch.Generator().manual_seed(index)
        for param in params:
            param.grad = torch.randn(param.shape, generator=generator).to(dtype)
        edit(params, index)
        optimizer.step()
    return [param.detach().clone() for param in params], copy.deepcopy(optimizer.state_dict())


def _nothing(params: list[torch.nn.Parameter], index: int) -> None:
    pass


def _drop_a_grad(params: list[torch.nn.Parameter], index: int) -> None:
    params[index % len(params)].grad = None


def _transpose_a_square_param(params: list[torch.nn.Parameter], index: int) -> None:
    params[2].data = params[2].data.t().contiguous()


def _scale_a_param_in_place(params: list[torch.nn.Parameter], index: int) -> None:
    with torch.no_grad():
        params[0].mul_(0.5)  # the master copy must follow this write


def _transposed_grad_view(params: list[torch.nn.Parameter], index: int) -> None:
    params[2].grad = params[2].grad.t()


SEQUENCE = [_nothing, _nothing, _drop_a_grad, _nothing, _transpose_a_square_param, _scale_a_param_in_place,
            _transposed_grad_view, _nothing, _drop_a_grad, _nothing]  # fmt: skip


@pytest.mark.parametrize(
    "dtype, options",
    [(torch.float32, {}), (torch.float64, {"maximize": True}), (torch.bfloat16, {"master_weights": True})],
    ids=["fp32", "fp64", "bf16-master"],
)
def test_steps_are_bit_identical_with_and_without_the_reader(
    reader, cpu_path, monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype, options: dict
) -> None:
    with_reader = _run(SEQUENCE, dtype, **options)
    _set_reader(monkeypatch, on=False)
    without = _run(SEQUENCE, dtype, **options)
    for ours, theirs in zip(with_reader[0], without[0]):
        assert torch.equal(ours, theirs)
    for key, state in with_reader[1]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, without[1]["state"][key][name]), (key, name)


def _stepped_once(count: int, size: int) -> tuple[list[torch.nn.Parameter], Adadelta]:
    """``count`` params of ``size`` elements with grads, and an optimizer that stepped once."""
    params = [torch.nn.Parameter(torch.randn(size)) for _ in range(count)]
    for param in params:
        param.grad = torch.randn(size)
    optimizer = Adadelta(params)
    optimizer.step()
    return params, optimizer


def test_a_steady_loop_reuses_its_table_and_new_addresses_are_written_into_it(reader, cpu_path) -> None:
    params, optimizer = _stepped_once(count=3, size=10)
    (flat,) = optimizer.flat_states()
    table = flat.plan().table
    before = table.pieces.clone()
    optimizer.step()
    assert flat.plan().table is table and torch.equal(table.pieces, before)
    kept = params[1].grad
    params[1].grad = kept.clone()  # kept stays alive: the new grad has a new address
    plan = flat.plan()
    assert plan.table.pieces[triton_adadelta.flat.GRAD_ROW, 2].item() == params[1].grad.data_ptr()
    assert plan.table.pieces[triton_adadelta.flat.GRAD_ROW, 3].item() == params[1].grad.data_ptr() + 8 * 4
    # A param's new data (checked by the Python reads first) gets a new table object:
    # what is cached per table must not outlive the param addresses it was made for.
    params[0].data = params[0].data.clone()
    optimizer.step()
    assert flat.plan().table is not plan.table
    assert flat.plan().table.pieces[triton_adadelta.flat.PARAM_ROW, 0].item() == params[0].data_ptr()


def test_a_grad_resized_through_data_raises_with_the_reader_and_changes_nothing(reader, cpu_path) -> None:
    params, optimizer = _stepped_once(count=2, size=6)
    before = [param.detach().clone() for param in params]
    params[1].grad.data = torch.randn(2)
    with pytest.raises(ValueError):
        optimizer.step()
    assert all(torch.equal(param, old) for param, old in zip(params, before))


# ----------------------------------------------------------------- the build
_STEP_ONCE = (
    "import torch, triton_adadelta\n"
    "model = torch.nn.Linear(4, 2)\n"
    "optimizer = triton_adadelta.Adadelta(model.parameters())\n"
    "model(torch.randn(3, 4)).sum().backward()\n"
    "optimizer.step()\n"
    "from triton_adadelta.reader import param_reader, reader_status\n"
    "print(reader_status())\n"
)


def _python(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    # The C loop is off: in a fresh cache its 12 s build would run beside the reader's.
    environment = {
        **os.environ, "TRITON_ADADELTA_CACHE_DIR": str(cache), "TRITON_INTERPRET": "0",
        "TRITON_ADADELTA_NATIVE_CPU": "0", **env,
    }  # fmt: skip
    return subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)


def test_a_process_that_exits_during_the_build_leaves_it_to_finish_for_the_next(tmp_path: Path) -> None:
    first = _python(_STEP_ONCE, tmp_path)
    assert first.returncode == 0, first.stderr
    assert first.stdout.split()[-1] == "building"  # the step did not wait for the compile
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("read_params_*.so.sha256")) and time.monotonic() < deadline:
        time.sleep(1)
    assert list(tmp_path.glob("read_params_*.so.sha256")), "the build did not finish after its process exited"
    # The next process loads it from the cache at once.
    second = _python(_STEP_ONCE.replace("print(reader_status())", "print(param_reader(wait=True) is not None)"), tmp_path)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-1] == "True"


def test_a_failed_build_warns_once_and_steps_read_through_python(tmp_path: Path) -> None:
    code = _STEP_ONCE.replace(
        "print(reader_status())",
        "param_reader(wait=True)\noptimizer.step()\nprint(reader_status().splitlines()[0])",
    )
    # `false` as the C++ compiler: it exits 1 without a word.
    result = _python(code, tmp_path, CXX="false", PYTHONWARNINGS="always")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("failed: `false "), result.stdout
    assert result.stderr.count("read params and grads through Python") == 1, result.stderr


def test_the_build_waits_for_a_build_that_a_step_waits_for(monkeypatch) -> None:
    """In a fresh cache the first step builds the CPU path's loop; the reader's build,
    started in the background by the same step, must not compete with it for the cores."""
    reader_module = triton_adadelta.reader
    started = threading.Event()

    def not_built(*, cache_only: bool) -> None:
        raise NotBuilt("not in the cache")

    def build_detached() -> None:
        started.set()
        raise BuildError("stopped here by the test")

    monkeypatch.setattr(reader_module, "_load", not_built)
    monkeypatch.setattr(reader_module, "_build_detached", build_detached)
    monkeypatch.setattr(reader_module, "_failure", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with native_build.awaited_build():
            builder = threading.Thread(target=reader_module._build)
            builder.start()
            assert not started.wait(1.0), "the reader's compile started during the awaited build"
        assert started.wait(10.0), "the reader's compile never started after the awaited build"
        builder.join(10.0)
    assert reader_module._failure == "stopped here by the test"


# ------------------------------------------------------------------ zero_grad
# Once the reader's library is loaded, zero_grad takes one native pass (csrc/read_params.cpp)
# where it can. Each test compares with torch.optim.Adadelta doing the same.


def _twin_models(grad: Callable[[int], torch.Tensor]) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    ours = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(4)]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for i, (a, b) in enumerate(zip(ours, theirs)):
        a.grad, b.grad = grad(i), grad(i)
    return ours, theirs


@pytest.mark.parametrize("set_to_none", [True, False])
def test_native_zero_grad_does_what_torch_s_does(reader, set_to_none: bool) -> None:
    ours, theirs = _twin_models(lambda i: torch.full((5, 3), float(i + 1)))
    kept_ours, kept_theirs = [p.grad for p in ours], [p.grad for p in theirs]
    versions = [g._version for g in kept_ours]
    Adadelta(ours).zero_grad(set_to_none)
    torch.optim.Adadelta(theirs).zero_grad(set_to_none)
    for a, b, kept_a, kept_b, version in zip(ours, theirs, kept_ours, kept_theirs, versions):
        if set_to_none:
            assert a.grad is None and b.grad is None
            assert torch.equal(kept_a, kept_b)  # a grad the user holds is untouched
        else:
            assert a.grad is kept_a  # zeroed in place, the same tensor
            assert torch.equal(a.grad, b.grad) and not a.grad.any()
            assert a.grad._version - version == kept_b._version - version == 1


def test_native_zero_grad_zeroes_a_grad_that_shares_a_bucket_and_bumps_the_shared_version(reader) -> None:
    bucket = torch.arange(1.0, 13.0)
    params = [torch.nn.Parameter(torch.zeros(4)) for _ in range(3)]
    for i, param in enumerate(params):
        param.grad = bucket[4 * i : 4 * i + 4]  # DDP's gradient_as_bucket_view
    before = bucket._version
    Adadelta(params[:2]).zero_grad(set_to_none=False)
    assert bucket.tolist() == [0.0] * 8 + [9.0, 10.0, 11.0, 12.0]
    assert bucket._version == before + 2


@pytest.mark.parametrize(
    "grad",
    [
        lambda i: torch.full((3, 5), 2.0).t(),  # not contiguous
        lambda i: torch.full((5, 3), 2.0, requires_grad=True),  # a leaf that requires grad
        lambda i: (torch.full((5, 3), 2.0, requires_grad=True) * 1),  # autograd history
    ],
    ids=["transposed", "requires_grad", "grad_fn"],
)
def test_native_zero_grad_leaves_other_grads_to_torch_s_path(reader, grad: Callable[[int], torch.Tensor]) -> None:
    ours, theirs = _twin_models(lambda i: grad(i) if i == 2 else torch.full((5, 3), 2.0))
    with torch.no_grad():
        Adadelta(ours).zero_grad(set_to_none=False)
        torch.optim.Adadelta(theirs).zero_grad(set_to_none=False)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad) and not a.grad.any()
        assert (a.grad.requires_grad, a.grad.grad_fn is None) == (b.grad.requires_grad, b.grad.grad_fn is None)


class _TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass, as some libraries tag their params."""


class _LoggingMode(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_native_zero_grad_leaves_subclasses_and_torch_function_modes_to_torch_s_path(reader) -> None:
    params = [torch.nn.Parameter(torch.randn(3)), _TaggedParameter(torch.randn(3))]
    for param in params:
        param.grad = torch.ones(3)
    Adadelta(params).zero_grad()
    assert all(p.grad is None for p in params)

    ours, theirs = _twin_models(lambda i: torch.ones(5, 3))
    logs = []
    for params, optimizer_class in ((ours, Adadelta), (theirs, torch.optim.Adadelta)):
        optimizer = optimizer_class(params)
        with _LoggingMode() as mode:
            optimizer.zero_grad()
        logs.append(mode.calls.count("__set__"))
        assert all(p.grad is None for p in params)
    assert logs[0] == logs[1] == 4  # the mode saw each grad set, as under torch's zero_grad


def test_a_training_loop_is_bit_identical_with_and_without_native_zero_grad(
    reader, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    twin = copy.deepcopy(model)
    native, python = Adadelta(model.parameters(), lr=1.0), Adadelta(twin.parameters(), lr=1.0)
    data = torch.randn(16, 6)
    for step in range(6):
        set_to_none = step % 2 == 0
        for net, optimizer, zeroer in ((model, native, triton_adadelta.reader.grad_zeroer), (twin, python, None)):
            monkeypatch.setattr(triton_adadelta.optimizer, "grad_zeroer", lambda zeroer=zeroer: zeroer and zeroer())
            net(data).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
            if not set_to_none:
                assert all(not p.grad.any() for p in net.parameters())
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
        assert (a.grad is None) == (b.grad is None)


# ------------------------------------------------------- step's wrapper and profiling
# Our step() wrapper is torch's (Optimizer.profile_hook_step) with the profiler event
# recorded natively: the same hooks in the same order, the same events.


def _hooked_run(optimizer_class: type, calls: list[str]) -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.ones(3))]
    params[0].grad = torch.full((3,), 0.5)
    optimizer = optimizer_class(params, lr=1.0)

    def pre(opt, args, kwargs):
        calls.append(f"pre {type(opt).__module__.split('.')[0]} {args[1:]} {kwargs}")
        return (args[0],), {"closure": lambda: calls.append("closure") or 3.0}

    def post(opt, args, kwargs):
        calls.append(f"post {sorted(kwargs)}")

    handles = [
        optimizer.register_step_pre_hook(pre),
        optimizer.register_step_post_hook(post),
        register_optimizer_step_pre_hook(lambda opt, a, k: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, a, k: calls.append("global post")),
    ]
    try:
        calls.append(f"loss {optimizer.step()}")
    finally:
        for handle in handles:
            handle.remove()
    return params


def test_step_hooks_run_as_under_torch_s_wrapper(reader) -> None:
    ours: list[str] = []
    theirs: list[str] = []
    ours_params = _hooked_run(Adadelta, ours)
    theirs_params = _hooked_run(torch.optim.Adadelta, theirs)
    assert [call.replace("triton_adadelta", "torch") for call in ours] == theirs
    assert theirs == ["global pre", "pre torch () {}", "closure", "post ['closure']", "global post", "loss 3.0"]
    torch.testing.assert_close(ours_params[0], theirs_params[0])


def test_a_pre_hook_returning_something_else_raises_torch_s_error(reader) -> None:
    param = torch.nn.Parameter(torch.ones(2))
    param.grad = torch.ones(2)
    optimizer = Adadelta([param])
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: 5)
    with pytest.raises(RuntimeError, match="must return None or a tuple"):
        optimizer.step()


def test_the_profiler_sees_step_and_zero_grad_as_with_torch_s_optimizer(reader) -> None:
    names = {}
    for optimizer_class in (Adadelta, torch.optim.Adadelta):
        param = torch.nn.Parameter(torch.ones(4))
        param.grad = torch.ones(4)
        optimizer = optimizer_class([param])
        optimizer.step()  # the first step (layout, first-use checks) is not what is compared
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
            param.grad = torch.ones(4)
            optimizer.step()
            optimizer.zero_grad()
        names[optimizer_class] = {event.name for event in profile.events() if event.name.startswith("Optimizer.")}
    assert names[Adadelta] == {"Optimizer.step#Adadelta.step", "Optimizer.zero_grad#Adadelta.zero_grad"}
    assert names[torch.optim.Adadelta] == names[Adadelta]
