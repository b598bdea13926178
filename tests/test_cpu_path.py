"""The CPU path over a segment table: the fused C loop and the chunked torch ops.

Params stay where the model put them: a table gives their addresses, and the state
lives in the optimizer's flat buffers, one vector-aligned segment per param with
zero padding between segments. These tests build such tables directly (as
``FlatState.plan`` does) and check every element against ``torch.optim.Adadelta``
(bit for bit, with ``TRITON_ADADELTA_CPU_SQRT=torch``) or the fp64 oracle.
"""

from __future__ import annotations

import dataclasses
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import oracle
from test_capturable import no_host_reads
from test_oracle_properties import Mode, check_within
from tolerances import TOLERANCES
from triton_adadelta import cpu
from triton_adadelta.flat import hparams_table, table_for_tensors
from triton_adadelta.kernels.adadelta import GROUP_ROW, LR, STATE_ALIGNMENT, state_dtype_for
from triton_adadelta.kernels.adadelta import adadelta_step_ as update_kernel_
from triton_adadelta.native_build import find_compiler

CPU = torch.device("cpu")

# (lr, rho, eps, weight_decay, maximize): plain, and maximize with weight decay.
GROUPS = ((0.5, 0.9, 1e-6, 0.0, False), (1.0, 0.95, 1e-5, 0.1, True))

EXACT = {
    torch.float32: TOLERANCES["torch_parity_cpu_fp32_torch_sqrt"].value,
    torch.float64: TOLERANCES["torch_parity_cpu_fp64_torch_sqrt"].value,
}


def require_native() -> None:
    """Skip where there is no C compiler; fail where there is one and the loop is off."""
    if find_compiler("c") is None:
        pytest.skip("no C compiler: the native CPU loop cannot be built")
    assert cpu.native_library() is not None, "a C compiler is present but the native CPU loop is off"


def use(monkeypatch, implementation: str) -> None:
    """Run the CPU path's ``"native"`` loop or its ``"chunked"`` torch ops, with torch's sqrt."""
    monkeypatch.setenv("TRITON_ADADELTA_CPU_SQRT", "torch")
    if implementation == "native":
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1")
        require_native()
    else:
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "0")


def assert_exact(actual: torch.Tensor, expected: torch.Tensor, message: str = "") -> None:
    exact = EXACT[expected.real.dtype if expected.is_complex() else expected.dtype]
    torch.testing.assert_close(
        actual, expected, rtol=exact, atol=exact, equal_nan=True, msg=lambda details: f"{message}: {details}"
    )


@dataclass
class Layout:
    """The flat state of some params, laid out as FlatState does: segments aligned to STATE_ALIGNMENT."""

    offsets: list[int]
    n_state: int

    @staticmethod
    def of(params: list[torch.Tensor]) -> Layout:
        real = [torch.view_as_real(p) if p.is_complex() else p for p in params]
        offsets, end = [], 0
        for param in real:
            offsets.append(end)
            end += -(-param.numel() // STATE_ALIGNMENT) * STATE_ALIGNMENT
        return Layout(offsets, end)

    def padding(self, params: list[torch.Tensor]) -> torch.Tensor:
        """True at the state elements that belong to no segment."""
        mask = torch.ones(self.n_state, dtype=torch.bool)
        for offset, param in zip(self.offsets, params):
            mask[offset : offset + param.numel() * (2 if param.is_complex() else 1)] = False
        return mask

    def segment(self, flat: torch.Tensor, i: int, param: torch.Tensor) -> torch.Tensor:
        numel = param.numel() * (2 if param.is_complex() else 1)
        piece = flat[self.offsets[i] : self.offsets[i] + numel]
        return torch.view_as_complex(piece.view(*param.shape, 2)) if param.is_complex() else piece.view(param.shape)


def table_of(params, grads, layout: Layout, selected: list[int], groups: list[int]):
    """The table of the ``selected`` params (the others have no grad this step)."""
    real = lambda t: torch.view_as_real(t) if t.is_complex() else t  # noqa: E731
    table, _ = table_for_tensors(
        [real(params[i]) for i in selected],
        [real(grads[i]) for i in selected],
        offsets=[layout.offsets[i] for i in selected],
        groups=[groups[i] for i in selected],
    )
    # Complex params are handed over as they are, as FlatState does.
    return dataclasses.replace(table, written=[params[i] for i in selected], read=[grads[i] for i in selected])


def hparams_of(groups, dtype: torch.dtype, tensor_lr: dict[int, float] | None = None) -> torch.Tensor:
    """The hyper-parameter table; groups in ``tensor_lr`` get a tensor lr of that value."""
    tensor_lr = tensor_lr or {}
    rows = tuple((None if g in tensor_lr else lr, *rest) for g, (lr, *rest) in enumerate(groups))
    hparams = hparams_table(rows, state_dtype_for(dtype), CPU)
    for g, value in tensor_lr.items():
        hparams[g, LR] = value
    return hparams


def torch_reference(params, selected_groups, groups, dtype_kwargs=None):
    """torch.optim.Adadelta over clones of ``params``, one param group per hyper-parameter row."""
    clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
    param_groups = [
        {"params": [c for c, g in zip(clones, selected_groups) if g == row], "lr": lr, "rho": rho, "eps": eps,
         "weight_decay": weight_decay, "maximize": maximize}
        for row, (lr, rho, eps, weight_decay, maximize) in enumerate(groups)
    ]  # fmt: skip
    return clones, torch.optim.Adadelta([g for g in param_groups if g["params"]], foreach=False)


# ------------------------------------------------------------------ (a) many pieces

# Awkward sizes: one element, around a 16-byte vector, around a 256-element block, a
# prime, an empty param; "skip" params have no grad and stay out of the table.
SIZES = [1, 3, 4, 5, 255, 257, 1000, 7919, 0, 6, 300, 2]
SKIPPED = {9, 10, 11}


@pytest.mark.parametrize("implementation", ["native", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_many_awkward_pieces_in_two_groups_match_torch_bit_for_bit(cpu_path, monkeypatch, implementation, dtype):
    use(monkeypatch, implementation)
    torch.manual_seed(0)
    # The params without grads sit between the others, so their segments and the
    # padding lie between the table's pieces.
    order = [0, 9, 1, 2, 3, 10, 4, 5, 6, 11, 7, 8]
    params = [torch.randn(SIZES[i], dtype=dtype) for i in order]
    skipped = [i for i, k in enumerate(order) if k in SKIPPED]
    selected = [i for i in range(len(params)) if i not in skipped]
    groups = [i % 2 for i in range(len(params))]
    layout = Layout.of(params)
    reference, torch_optimizer = torch_reference([params[i] for i in selected], [groups[i] for i in selected], GROUPS)
    square_avg = torch.zeros(layout.n_state, dtype=dtype)
    acc_delta = torch.zeros(layout.n_state, dtype=dtype)
    # The params outside the table have state from earlier steps: it must stay.
    for i in skipped:
        layout.segment(square_avg, i, params[i]).uniform_(1, 2)
        layout.segment(acc_delta, i, params[i]).uniform_(1, 2)
    skipped_before = [params[i].clone() for i in skipped], square_avg.clone(), acc_delta.clone()
    hparams = hparams_of(GROUPS, dtype)
    assert cpu.implementation(CPU, dtype, master=False, stochastic_rounding=False) == f"cpu-{implementation}"

    for _ in range(5):
        # Gradients over many magnitudes, new tensors at every step (new addresses).
        grads = [torch.randn_like(p) * 10.0 ** torch.randint(-8, 8, p.shape, dtype=dtype) for p in params]
        for r, i in zip(reference, selected):
            r.grad = grads[i].clone()
        torch_optimizer.step()
        table = table_of(params, grads, layout, selected, groups)
        cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams)

    for r, i in zip(reference, selected):
        assert_exact(params[i], r.detach(), f"param {i} ({params[i].numel()} elements)")
        state = torch_optimizer.state[r]
        assert_exact(layout.segment(square_avg, i, params[i]), state["square_avg"], f"square_avg of param {i}")
        assert_exact(layout.segment(acc_delta, i, params[i]), state["acc_delta"], f"acc_delta of param {i}")
    padding = layout.padding(params)
    assert padding.any(), "the sizes leave padding between segments"
    assert not square_avg[padding].any() and not acc_delta[padding].any(), "the padding stays zero"
    for before, i in zip(skipped_before[0], skipped):
        assert torch.equal(params[i], before), f"param {i} has no grad: untouched"
        for flat, flat_before in zip((square_avg, acc_delta), skipped_before[1:]):
            segment = layout.segment(flat, i, params[i])
            assert torch.equal(segment, layout.segment(flat_before, i, params[i])), f"state of param {i} untouched"


@pytest.mark.parametrize("implementation", ["native", "chunked"])
def test_padding_and_state_outside_the_table_are_never_written(cpu_path, monkeypatch, implementation):
    """Stronger than staying zero: a sentinel in the padding survives, even with eps = 0
    (where an update run over the padding would write 0 / 0)."""
    use(monkeypatch, implementation)
    torch.manual_seed(1)
    params = [torch.randn(n) for n in (5, 7, 1, 300, 3, 9)]
    grads = [torch.randn_like(p) for p in params]
    layout = Layout.of(params)
    square_avg, acc_delta = torch.rand(layout.n_state), torch.rand(layout.n_state)
    padding = layout.padding(params)
    square_avg[padding], acc_delta[padding] = 7.0, 7.0
    before = square_avg.clone(), acc_delta.clone(), params[3].clone()
    selected = [0, 1, 2, 4, 5]  # param 3 has no grad
    hparams = hparams_of(((1.0, 0.9, 0.0, 0.0, False),), torch.float32)
    cpu.adadelta_step_cpu_(table_of(params, grads, layout, selected, [0] * 6), square_avg, acc_delta, hparams=hparams)
    outside = padding.clone()
    outside[layout.offsets[3] : layout.offsets[3] + 300] = True
    assert torch.equal(square_avg[outside], before[0][outside])
    assert torch.equal(acc_delta[outside], before[1][outside])
    assert torch.equal(params[3], before[2])
    assert not torch.equal(square_avg[~outside], before[0][~outside]), "the others were updated"


@pytest.mark.parametrize("implementation", ["native", "chunked"])
def test_complex_params_are_updated_as_their_real_parts_like_torch(cpu_path, monkeypatch, implementation):
    use(monkeypatch, implementation)
    torch.manual_seed(2)
    # Complex params have a state of their own (a real dtype's table would not hold them).
    complex_params = [torch.randn(3, 5, dtype=torch.complex64), torch.randn(4, dtype=torch.complex64)]
    layout = Layout.of(complex_params)
    groups = ((0.5, 0.9, 1e-6, 0.0, True),)  # no weight decay: torch's complex add(alpha=) is not an fma
    reference, torch_optimizer = torch_reference(complex_params, [0, 0], groups)
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in complex_params]
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        torch_optimizer.step()
        table = table_of(complex_params, grads, layout, [0, 1], [0, 0])
        cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams_of(groups, torch.float32))
    for i, (p, r) in enumerate(zip(complex_params, reference)):
        assert_exact(p, r.detach(), f"complex param {i}")
        assert_exact(layout.segment(square_avg, i, p), torch_optimizer.state[r]["square_avg"], f"square_avg {i}")


# ------------------------------------------------------- (b) split across threads

# Five params of about 310K elements in all, more than NATIVE_PARALLEL_MIN_ELEMENTS:
# with 2, 3 or 4 threads every share after the first starts inside a param.
THREADED_SIZES = [100_003, 7, 90_001, 120_011, 5]


@pytest.mark.parametrize("n_threads", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_a_table_split_across_threads_updates_every_element_like_torch(cpu_path, monkeypatch, n_threads, dtype):
    use(monkeypatch, "native")
    assert sum(THREADED_SIZES) >= cpu.NATIVE_PARALLEL_MIN_ELEMENTS
    torch.manual_seed(3)
    params = [torch.randn(n, dtype=dtype) for n in THREADED_SIZES]
    groups = [0, 1, 0, 1, 0]
    layout = Layout.of(params)
    reference, torch_optimizer = torch_reference(params, groups, GROUPS)
    square_avg = torch.zeros(layout.n_state, dtype=dtype)
    acc_delta = torch.zeros(layout.n_state, dtype=dtype)
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        for _ in range(3):
            grads = [torch.randn_like(p) for p in params]
            for r, g in zip(reference, grads):
                r.grad = g.clone()
            torch_optimizer.step()
            table = table_of(params, grads, layout, list(range(len(params))), groups)
            cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams_of(GROUPS, dtype))
    finally:
        torch.set_num_threads(previous)
    for i, (p, r) in enumerate(zip(params, reference)):
        # Every element: a share's first element is where a split goes wrong.
        assert_exact(p, r.detach(), f"param {i}")
        assert_exact(layout.segment(square_avg, i, p), torch_optimizer.state[r]["square_avg"], f"square_avg {i}")
        assert_exact(layout.segment(acc_delta, i, p), torch_optimizer.state[r]["acc_delta"], f"acc_delta {i}")


# ------------------------------------------------------------ (c) chunked fallback


def _mixed_table_case(dtype: torch.dtype, seed: int):
    """Many small params (gathered into shared chunks), gaps, and params of their own chunks."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [int(n) for n in torch.randint(1, 700, (300,), generator=generator)] + [40_000, 70_001, 3]
    params = [torch.randn(n, generator=generator, dtype=dtype) for n in sizes]
    selected = [i for i in range(len(params)) if i % 17 != 5]  # some without grads
    # Runs of groups, as the param groups of a model list their params.
    groups = [(i // 50) % 3 for i in range(len(params))]
    return params, selected, groups


@pytest.mark.parametrize("with_scale", [False, True], ids=["unscaled", "grad_scale"])
def test_chunked_path_gives_the_native_loops_bits(cpu_path, monkeypatch, with_scale):
    require_native()
    monkeypatch.setenv("TRITON_ADADELTA_CPU_SQRT", "torch")
    params, selected, groups = _mixed_table_case(torch.float32, seed=4)
    layout = Layout.of(params)
    # Three groups: plain, maximize with weight decay, and a tensor lr.
    rows = (*GROUPS, (0.25, 0.5, 1e-3, 1e-2, False))
    hparams = hparams_of(rows, torch.float32, tensor_lr={2: 0.25})
    grad_scale = torch.tensor([8.0]) if with_scale else None
    results = {}
    for implementation in ("native", "chunked"):
        monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1" if implementation == "native" else "0")
        ours = [p.clone() for p in params]
        square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
        generator = torch.Generator().manual_seed(5)
        for _ in range(3):
            grads = [torch.randn(p.shape, generator=generator) for p in ours]
            table = table_of(ours, grads, layout, selected, groups)
            cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams, grad_scale=grad_scale)
        results[implementation] = ours, square_avg, acc_delta
    (native, *native_state), (chunked, *chunked_state) = results["native"], results["chunked"]
    for i, (a, b) in enumerate(zip(chunked, native)):
        assert_exact(a, b, f"param {i}")
    for a, b, name in zip(chunked_state, native_state, ("square_avg", "acc_delta")):
        assert_exact(a, b, name)


LOW_PRECISION_MODES = [
    Mode("bf16", torch.bfloat16),
    Mode("fp16", torch.float16),
    Mode("bf16_master", torch.bfloat16, master=True),
    Mode("fp16_master", torch.float16, master=True),
    Mode("bf16_stochastic", torch.bfloat16, stochastic_rounding=True),
]


@pytest.mark.parametrize("implementation", ["native", "chunked"])
@pytest.mark.parametrize("mode", LOW_PRECISION_MODES, ids=lambda m: m.name)
def test_low_precision_modes_within_roundoff_of_fp64_oracle(cpu_path, monkeypatch, mode, implementation):
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1" if implementation == "native" else "0")
    if implementation == "native":
        require_native()
    params, selected, groups = _mixed_table_case(mode.param_dtype, seed=6)
    layout = Layout.of(params)
    rows = (*GROUPS, (0.25, 0.5, 1e-3, 1e-2, False))
    hparams = hparams_of(rows, mode.param_dtype, tensor_lr={2: 0.25})
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    master = None
    if mode.master:
        master = torch.zeros(layout.n_state)
        for i, p in enumerate(params):
            layout.segment(master, i, p).copy_(p.float() + 1e-3 * torch.randn(p.shape))  # off the bf16 grid
    options = {"master": mode.master, "stochastic_rounding": mode.stochastic_rounding}
    assert cpu.implementation(CPU, mode.param_dtype, **options) == f"cpu-{implementation}"
    f32 = lambda x: float(np.float32(x))  # noqa: E731  the hyper-parameters act as fp32 scalars
    generator = torch.Generator().manual_seed(7)
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator).to(mode.param_dtype) for p in params]
        weights = [
            (layout.segment(master, i, p) if master is not None else p).double().numpy().copy()
            for i, p in enumerate(params)
        ]
        state_in = square_avg.double().numpy().copy(), acc_delta.double().numpy().copy()
        table = table_of(params, grads, layout, selected, groups)
        cpu.adadelta_step_cpu_(
            table, square_avg, acc_delta, hparams=hparams, master=master,
            stochastic_rounding=mode.stochastic_rounding, seed=step,
        )  # fmt: skip
        for i in selected:
            lr, rho, eps, weight_decay, maximize = rows[groups[i]]
            p = params[i]
            start, end = layout.offsets[i], layout.offsets[i] + p.numel()
            exact = oracle.adadelta_step(
                weights[i], grads[i].double().numpy(), state_in[0][start:end], state_in[1][start:end],
                lr=f32(lr), rho=f32(rho), one_minus_rho=f32(1 - rho), eps=f32(eps), weight_decay=f32(weight_decay),
                maximize=maximize,
            )  # fmt: skip
            v, u = square_avg[start:end], acc_delta[start:end]
            check_within(f"square_avg {i}", v, exact.square_avg, exact.square_avg_magnitude, mode, torch.float32)
            check_within(f"acc_delta {i}", u, exact.acc_delta, exact.acc_delta_magnitude, mode, torch.float32)
            if master is not None:
                check_within(f"master {i}", master[start:end], exact.param, exact.param_magnitude, mode, torch.float32)
                # The param is the master rounded to nearest, exactly.
                assert torch.equal(p, master[start:end].to(mode.param_dtype)), f"param {i} is its master rounded"
            else:
                stochastic = mode.stochastic_rounding
                check_within(f"param {i}", p, exact.param, exact.param_magnitude, mode, mode.param_dtype, stochastic)


# The native loop's low-precision modes: (name, param dtype, master, stochastic rounding).
NATIVE_LOW_PRECISION = [
    ("bf16", torch.bfloat16, False, False),
    ("fp16", torch.float16, False, False),
    ("bf16_master", torch.bfloat16, True, False),
    ("fp16_master", torch.float16, True, False),
    ("bf16_stochastic", torch.bfloat16, False, True),
    ("fp16_stochastic", torch.float16, False, True),
]


def _low_precision_steps(monkeypatch, backend: str, dtype, master: bool, stochastic: bool, sizes=None, steps=3):
    """Three steps of a mixed table (small params in shared blocks, big ones, gaps,
    three groups with weight decay, maximize and a tensor lr, a grad scale) on
    ``backend``: "kernel" (Triton's interpreter), "native" or "chunked" (with torch's
    sqrt for the last two when TRITON_ADADELTA_CPU_SQRT is set by the caller)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1" if backend == "kernel" else "0")
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "0" if backend == "chunked" else "1")
    if sizes is None:
        params, selected, groups = _mixed_table_case(dtype, seed=21)
    else:
        generator = torch.Generator().manual_seed(21)
        params = [torch.randn(n, generator=generator).to(dtype) for n in sizes]
        selected, groups = list(range(len(params))), [i % 3 for i in range(len(params))]
    layout = Layout.of(params)
    hparams = hparams_of((*GROUPS, (0.25, 0.5, 1e-3, 1e-2, False)), dtype, tensor_lr={2: 0.25})
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    generator = torch.Generator().manual_seed(22)
    master_buffer = None
    if master:  # off the low-precision grid
        master_buffer = torch.zeros(layout.n_state)
        for i, p in enumerate(params):
            layout.segment(master_buffer, i, p).copy_(p.float() + 1e-3 * torch.randn(p.shape, generator=generator))
    for step in range(steps):
        # Grads over many magnitudes: some overflow fp16 to inf, and their params to NaN.
        grads = [
            (torch.randn(p.shape, generator=generator) * 10.0 ** (step * 2 - 2)).to(dtype) for p in params
        ]
        table = table_of(params, grads, layout, selected, groups)
        step_ = update_kernel_ if backend == "kernel" else cpu.adadelta_step_cpu_
        step_(
            table, square_avg, acc_delta, hparams=hparams, master=master_buffer, stochastic_rounding=stochastic,
            seed=1000 + step, grad_scale=torch.tensor([2.0]),
        )  # fmt: skip
    return [*params, square_avg, acc_delta, *([] if master_buffer is None else [master_buffer])]


def assert_same_bits(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for i, (a, b) in enumerate(zip(actual, expected)):
        assert torch.equal(a.isnan(), b.isnan()), f"buffer {i}: NaN at other places"
        assert torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0)), f"buffer {i} differs"


@pytest.mark.parametrize("name,dtype,master,stochastic", NATIVE_LOW_PRECISION, ids=[m[0] for m in NATIVE_LOW_PRECISION])
def test_native_low_precision_loop_gives_the_kernels_bits(monkeypatch, name, dtype, master, stochastic):
    """The native loop rounds, and draws stochastic rounding's noise (a hash of the state
    index), as the Triton kernel does: the same bits, NaNs included."""
    require_native()
    monkeypatch.delenv("TRITON_ADADELTA_CPU_SQRT", raising=False)  # the kernel's IEEE sqrt
    # Fewer pieces than the mixed table: the interpreter takes ~0.1 s per block.
    sizes = [1, 3, 5, 8, 9, 31, 255, 257, 1031, 4099, 20_011]
    kernel = _low_precision_steps(monkeypatch, "kernel", dtype, master, stochastic, sizes=sizes)
    native = _low_precision_steps(monkeypatch, "native", dtype, master, stochastic, sizes=sizes)
    assert cpu.implementation(CPU, dtype, master=master, stochastic_rounding=stochastic) == "cpu-native"
    assert_same_bits(native, kernel)


@pytest.mark.parametrize(
    "name,dtype,master,stochastic", NATIVE_LOW_PRECISION[:4], ids=[m[0] for m in NATIVE_LOW_PRECISION[:4]]
)
def test_native_low_precision_loop_gives_the_chunked_ops_bits_with_torch_sqrt(monkeypatch, name, dtype, master, stochastic):
    """With torch's sqrt, the native loop's nearest-rounding modes are the torch ops'
    bits (the chunked path rounds as torch does)."""
    require_native()
    monkeypatch.setenv("TRITON_ADADELTA_CPU_SQRT", "torch")
    chunked = _low_precision_steps(monkeypatch, "chunked", dtype, master, stochastic)
    native = _low_precision_steps(monkeypatch, "native", dtype, master, stochastic)
    assert_same_bits(native, chunked)


@pytest.mark.parametrize("implementation", ["native", "chunked"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_stochastic_rounding_stores_an_exact_value_as_it_is(cpu_path, monkeypatch, implementation, dtype):
    """A new weight that the param dtype holds exactly is stored unchanged, whatever
    the noise: over 2M elements every noise value occurs (a rounding off by one
    noise step, 1 in 65536, would show)."""
    use(monkeypatch, implementation)
    monkeypatch.delenv("TRITON_ADADELTA_CPU_SQRT", raising=False)
    generator = torch.Generator().manual_seed(3)
    params = [torch.randn(1 << 21, generator=generator).to(dtype)]
    before = params[0].clone()
    layout = Layout.of(params)
    square_avg, acc_delta = torch.ones(layout.n_state), torch.ones(layout.n_state)
    # Zero grads: the update is exactly 0, so each new weight is the param's value.
    table = table_of(params, [torch.zeros_like(params[0])], layout, [0], [0])
    cpu.adadelta_step_cpu_(
        table, square_avg, acc_delta, hparams=hparams_of(GROUPS[:1], dtype), stochastic_rounding=True, seed=5
    )
    assert torch.equal(params[0], before)


def test_a_big_master_weights_step_streams_the_params_and_keeps_the_bits(monkeypatch):
    """Steps of at least 2M elements store master-weight params with non-temporal
    stores (csrc/adadelta_cpu.c, STREAMING_MIN_ELEMENTS), on unaligned params too."""
    require_native()
    monkeypatch.setenv("TRITON_ADADELTA_CPU_SQRT", "torch")
    sizes = [1_500_001, 3, 700_013, 64]  # 2.2M elements; odd sizes shift the params' alignment
    chunked = _low_precision_steps(monkeypatch, "chunked", torch.bfloat16, True, False, sizes=sizes, steps=2)
    native = _low_precision_steps(monkeypatch, "native", torch.bfloat16, True, False, sizes=sizes, steps=2)
    assert_same_bits(native, chunked)


def test_stochastic_rounding_draws_distinct_noise_for_every_element(cpu_path):
    # 50 params of the same values and grads: each element is one rounding of the same
    # fp32 value (0.999), between the bf16 neighbours 0.99609375 and 1.
    params = [torch.ones(64, dtype=torch.bfloat16) for _ in range(50)]
    grads = [torch.full((64,), 1e3, dtype=torch.bfloat16) for _ in params]
    layout = Layout.of(params)
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    table = table_of(params, grads, layout, list(range(50)), [0] * 50)
    hparams = hparams_of(((1.0, 0.0, 1e-6, 0.0, False),), torch.bfloat16)
    cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams, stochastic_rounding=True, seed=11)
    patterns = {tuple(p.tolist()) for p in params}
    assert all(len(set(pattern)) == 2 for pattern in patterns), "both neighbours in every param"
    assert len(patterns) == 50, "no two params share a noise stream"


def test_a_new_table_over_the_same_pieces_reads_its_own_grads(cpu_path, monkeypatch):
    """The chunk plan is shared by the tables of the same pieces; the views are each table's."""
    use(monkeypatch, "chunked")
    params = [torch.randn(n) for n in (5, 6, 7)]
    layout = Layout.of(params)
    hparams = hparams_of(GROUPS[:1], torch.float32)
    reference, torch_optimizer = torch_reference(params, [0, 0, 0], GROUPS[:1])
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    first = table_of(params, [torch.randn_like(p) for p in params], layout, [0, 1, 2], [0, 0, 0])
    for step in range(3):
        grads = [torch.randn_like(p) for p in params]
        table = dataclasses.replace(table_of(params, grads, layout, [0, 1, 2], [0, 0, 0]), cache=first.cache)
        for r, g in zip(reference, grads):
            r.grad = g.clone()
        torch_optimizer.step()
        cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams)
    assert "cpu_chunk_plan" in first.cache
    for p, r in zip(params, reference):
        assert_exact(p, r.detach(), "param")


# --------------------------------------------------------------- (d) found_inf

FOUND_INF_CASES = [
    ("native", torch.float32, {}),
    ("native", torch.float64, {}),
    ("chunked", torch.float32, {}),
    ("chunked", torch.bfloat16, {"master": True}),
    ("chunked", torch.bfloat16, {"stochastic_rounding": True}),
    ("native", torch.bfloat16, {}),
    ("native", torch.float16, {"master": True}),
    ("native", torch.bfloat16, {"stochastic_rounding": True}),
]


@pytest.mark.parametrize("implementation,dtype,mode", FOUND_INF_CASES, ids=lambda x: str(x))
def test_found_inf_changes_nothing(cpu_path, monkeypatch, implementation, dtype, mode):
    use(monkeypatch, implementation)
    params, selected, groups = _mixed_table_case(dtype, seed=8)
    layout = Layout.of(params)
    state_dtype = state_dtype_for(dtype)
    square_avg = torch.rand(layout.n_state, dtype=state_dtype)
    acc_delta = torch.rand(layout.n_state, dtype=state_dtype)
    master = torch.randn(layout.n_state) if mode.get("master") else None
    grads = [torch.randn_like(p) for p in params]
    hparams = hparams_of((*GROUPS, (0.25, 0.5, 1e-3, 1e-2, False)), dtype, tensor_lr={2: 0.25})
    arguments = dict(hparams=hparams, master=master, stochastic_rounding=mode.get("stochastic_rounding", False))
    buffers = [*params, square_avg, acc_delta] + ([master] if master is not None else [])
    before = [b.clone() for b in buffers]
    table = table_of(params, grads, layout, selected, groups)
    scale = torch.tensor([4.0])
    cpu.adadelta_step_cpu_(table, square_avg, acc_delta, **arguments, grad_scale=scale, found_inf=torch.tensor([1.0]))
    for i, (a, b) in enumerate(zip(buffers, before)):
        assert torch.equal(a, b), f"buffer {i} changed although found_inf is set"
    cpu.adadelta_step_cpu_(table, square_avg, acc_delta, **arguments, grad_scale=scale, found_inf=torch.tensor([0.0]))
    assert not torch.equal(square_avg, before[len(params)]), "found_inf = 0: the step runs"


# ---------------------------------------------------------------- the rest


@pytest.mark.parametrize("implementation", ["native", "chunked"])
def test_a_step_reads_no_tensor_on_the_host(cpu_path, monkeypatch, implementation):
    use(monkeypatch, implementation)
    params, selected, groups = _mixed_table_case(torch.float32, seed=9)
    layout = Layout.of(params)
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    table = table_of(params, [torch.randn_like(p) for p in params], layout, selected, groups)
    hparams = hparams_of((*GROUPS, GROUPS[0]), torch.float32, tensor_lr={2: 0.5})
    step = lambda: cpu.adadelta_step_cpu_(  # noqa: E731
        table, square_avg, acc_delta, hparams=hparams, grad_scale=torch.tensor([2.0]), found_inf=torch.tensor([0.0])
    )
    step()  # the first step of a table reads its layout once
    before = square_avg.clone()
    with no_host_reads(monkeypatch) as reads:
        step()
    assert reads == [], f"the step read tensors on the host: {reads}"
    assert not torch.equal(square_avg, before)


@pytest.mark.parametrize("implementation", ["native", "chunked"])
def test_a_table_that_does_not_fit_raises_and_changes_nothing(cpu_path, monkeypatch, implementation):
    use(monkeypatch, implementation)
    params = [torch.randn(n) for n in (5, 300)]
    layout = Layout.of(params)
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    table = table_of(params, [torch.randn_like(p) for p in params], layout, [0, 1], [0, 0])
    table.pieces[GROUP_ROW, 2:] = 1  # a group the one-row hyper-parameter table lacks
    before = [p.clone() for p in params]
    with pytest.raises(ValueError, match="does not fit"):
        cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams_of(GROUPS[:1], torch.float32))
    assert all(torch.equal(a, b) for a, b in zip(params, before)) and not square_avg.any()


@pytest.mark.parametrize(
    "implementation,dtype",
    [("native", torch.float32), ("chunked", torch.float32), ("chunked", torch.bfloat16), ("native", torch.bfloat16)],
)
def test_a_step_leaves_the_params_version_counters_as_they_were(cpu_path, monkeypatch, implementation, dtype):
    """The optimizer reads a changed counter as a write from outside (its master copy
    follows such writes): its own writes, through addresses or torch ops, bump none."""
    use(monkeypatch, implementation)
    generator = torch.Generator().manual_seed(0)
    # Params near 0.01: a first step moves each by about 1e-3 * lr, which a bf16 param
    # near 1 (spacing 2**-7) would mostly round away.
    params = [(0.01 * torch.randn(n, generator=generator)).to(dtype) for n in (5, 300, 40_000)]
    layout = Layout.of(params)
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    table = table_of(params, [torch.randn_like(p) for p in params], layout, [0, 1, 2], [0, 0, 0])
    versions = [p._version for p in params]
    before = [p.clone() for p in params]
    cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams_of(GROUPS[:1], dtype))
    assert [p._version for p in params] == versions
    assert not any(torch.equal(a, b) for a, b in zip(params, before)), "the params were written"


CASES = [
    (torch.float32, False, False, "cpu-native"),
    (torch.float64, False, False, "cpu-native"),
    (torch.complex64, False, False, "cpu-native"),
    (torch.bfloat16, False, False, "cpu-native"),
    (torch.float16, True, False, "cpu-native"),
    (torch.bfloat16, False, True, "cpu-native"),
    (torch.float16, False, True, "cpu-native"),
]


@pytest.mark.parametrize("dtype,master,stochastic_rounding,expected", CASES, ids=lambda x: str(x))
def test_implementation_names_what_runs(cpu_path, monkeypatch, dtype, master, stochastic_rounding, expected):
    require_native()
    ran = []
    for name in ("_native_step_", "_chunked_step_"):
        original = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _n=name, _o=original, **k: (ran.append(_n), _o(*a, **k)))
    real_dtype = torch.empty((), dtype=dtype).real.dtype
    params = [torch.randn(9, dtype=dtype)]
    layout = Layout.of(params)
    state_dtype = state_dtype_for(real_dtype)
    state = torch.zeros(layout.n_state, dtype=state_dtype), torch.zeros(layout.n_state, dtype=state_dtype)
    table = table_of(params, [torch.randn_like(params[0])], layout, [0], [0])
    hparams = hparams_of(GROUPS[:1], real_dtype)
    master_buffer = torch.zeros(layout.n_state) if master else None
    name = cpu.implementation(CPU, dtype, master=master, stochastic_rounding=stochastic_rounding)
    options = {"master": master_buffer, "stochastic_rounding": stochastic_rounding}
    cpu.adadelta_step_cpu_(table, *state, hparams=hparams, **options)
    assert name == expected
    assert ran == ["_native_step_" if expected == "cpu-native" else "_chunked_step_"]
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "0")
    assert cpu.implementation(CPU, dtype, master=master, stochastic_rounding=stochastic_rounding) == "cpu-chunked"


def test_a_failed_build_says_why_once_and_falls_back(cpu_path, monkeypatch, tmp_path):
    compiler = tmp_path / "cc"
    compiler.write_text("#!/bin/sh\necho 'adadelta_cpu.c:1:1: error: this compiler is broken' >&2\nexit 1\n")
    compiler.chmod(compiler.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("TRITON_ADADELTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_ADADELTA_NATIVE_CPU", "1")
    # A fresh process as far as the loop is concerned (restored after the test).
    monkeypatch.setattr(cpu, "_native_library", None)
    monkeypatch.setattr(cpu, "_native_tried", False)
    monkeypatch.setattr(cpu, "_native_f16", False)
    monkeypatch.setattr(cpu, "_torch_sqrt_checked", None)
    params = [torch.randn(10)]
    layout = Layout.of(params)
    reference, torch_optimizer = torch_reference(params, [0], GROUPS[:1])
    square_avg, acc_delta = torch.zeros(layout.n_state), torch.zeros(layout.n_state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert cpu.implementation(CPU, torch.float32, master=False, stochastic_rounding=False) == "cpu-chunked"
        for _ in range(2):
            grads = [torch.randn(10)]
            reference[0].grad = grads[0].clone()
            torch_optimizer.step()
            table = table_of(params, grads, layout, [0], [0])
            cpu.adadelta_step_cpu_(table, square_avg, acc_delta, hparams=hparams_of(GROUPS[:1], torch.float32))
    messages = [str(w.message) for w in caught if "native CPU loop" in str(w.message)]
    assert len(messages) == 1, messages
    assert "this compiler is broken" in messages[0] and "exit code 1" in messages[0]
    assert_exact(params[0], reference[0].detach(), "the chunked fallback, with torch's sqrt")
