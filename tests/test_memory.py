"""Memory: no copy of params or grads; the state is 2x params in fp32, in bf16 with
``state_dtype=torch.bfloat16``, or 8-bit codes and a scale per 256 with
``state_dtype=torch.uint8`` (plus the master copy only when asked); construction
allocates nothing.

Peak resident memory is read from Linux's /proc (VmHWM, reset through clear_refs),
on buffers large enough (128 MiB of params) that allocator noise does not matter.
"""

from __future__ import annotations

import ctypes
import gc
import os
import sys

import pytest
import torch

from triton_adadelta import Adadelta

MIB = 1 << 20
# Allocator and bookkeeping headroom: the CPU path's chunk scratch (a few MiB) and
# malloc's own slack; small against the hundreds of MiB measured.
SLACK_BYTES = 24 * MIB

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.access("/proc/self/clear_refs", os.W_OK),
    reason="peak memory is read from Linux's /proc",
)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _fix_malloc_threshold() -> None:
    """Make glibc return every large freed block to the OS at once.

    glibc raises its mmap threshold (up to 32 MiB) after large frees, and then keeps
    later freed blocks resident: a storage we freed would still count as resident.
    Fixing the threshold at 1 MiB keeps the measurement about our allocations.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def peak_increase(fn) -> int:
    """Bytes by which the peak resident memory during ``fn()`` exceeds the start."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak (VmHWM) to the current RSS
    start = _status("VmRSS")
    fn()
    return _status("VmHWM") - start


@pytest.mark.parametrize(
    "dtype,options,state_bytes_per_param,n",
    [
        (torch.float32, {}, 8, 1 << 25),
        (torch.bfloat16, {}, 8, 1 << 25),
        (torch.bfloat16, {"master_weights": True}, 12, 1 << 25),
        # bf16 state (issue 15), on 64M params: 4 B per param, nothing kept in fp32.
        (torch.float32, {"state_dtype": torch.bfloat16}, 4, 1 << 26),
        (torch.bfloat16, {"state_dtype": torch.bfloat16}, 4, 1 << 26),
        # 8-bit state: 2 B of codes and 2 fp32 scales per 256 params.
        (torch.float32, {"state_dtype": torch.uint8}, 2 + 8 / 256, 1 << 26),
        (torch.bfloat16, {"state_dtype": torch.uint8}, 2 + 8 / 256, 1 << 26),
    ],
    ids=["fp32", "bf16", "bf16_master", "fp32_bf16_state", "bf16_bf16_state", "fp32_u8_state", "bf16_u8_state"],
)
def test_peak_memory_of_construction_and_steps(cpu_path, dtype, options, state_bytes_per_param, n):
    _fix_malloc_threshold()
    Adadelta([torch.nn.Parameter(torch.zeros(8))]).step()  # one-time set-up out of the way
    params = [torch.nn.Parameter(torch.randn(n // 4).to(dtype)) for _ in range(4)]
    for param in params:
        param.grad = torch.randn_like(param)
    holder: list[Adadelta] = []

    construction = peak_increase(lambda: holder.append(Adadelta(params, **options)))
    assert construction <= SLACK_BYTES, f"construction allocated {construction / MIB:.0f} MiB"

    # First step: it allocates the flat state; params and grads stay where they are,
    # so the peak grows by the state alone.
    first_step = peak_increase(holder[0].step)
    state = n * state_bytes_per_param
    assert first_step <= state + SLACK_BYTES, f"first step: +{first_step / MIB:.0f} MiB, state is {state / MIB:.0f} MiB"
    assert first_step >= state - SLACK_BYTES, "the state is allocated at the first step"

    later_step = peak_increase(holder[0].step)
    assert later_step <= SLACK_BYTES, f"a later step allocated {later_step / MIB:.0f} MiB"

    # No second copy and nothing rebound: every param and grad keeps its own storage.
    for param in params:
        assert param.untyped_storage().nbytes() == param.numel() * param.element_size()
        assert param.grad.untyped_storage().nbytes() == param.grad.numel() * param.grad.element_size()


@pytest.mark.parametrize("n_params", [1, 16])
def test_8bit_state_dicts_take_no_more_than_what_they_hold(cpu_path, n_params):
    """state_dict() of 8-bit state decodes into the fp32 it returns (8 B per param),
    and loading an fp32 dict quantizes into the new codes (2.03 B per param): chunk by
    chunk, not through int64 copies of the whole state (51 B per param before, on one
    32M param)."""
    _fix_malloc_threshold()
    n = 1 << 25
    params = [torch.nn.Parameter(torch.randn(n // n_params)) for _ in range(n_params)]
    for param in params:
        param.grad = torch.randn_like(param)
    optimizer = Adadelta(params, state_dtype=torch.uint8)
    optimizer.step()
    saved: list[dict] = []
    saving = peak_increase(lambda: saved.append(optimizer.state_dict()))
    assert saving <= n * 8 + SLACK_BYTES, f"state_dict(): +{saving / MIB:.0f} MiB for {n * 8 / MIB:.0f} MiB of fp32 state"
    loading = peak_increase(lambda: optimizer.load_state_dict(saved[0]))
    codes = n * (2 + 8 / 256)
    assert loading <= codes + SLACK_BYTES, f"load_state_dict(): +{loading / MIB:.0f} MiB for {codes / MIB:.0f} MiB of codes"


@pytest.mark.parametrize("dtype,options", [(torch.float32, {}), (torch.bfloat16, {"master_weights": True})], ids=["fp32", "bf16_master"])
def test_a_frozen_param_takes_no_state(cpu_path, dtype, options):
    """A frozen 32M param passed in with a small trainable one (``model.parameters()``
    of a fine-tune): the first step allocates the trainable one's state only, as torch
    does (it took 266 MiB for the frozen one's fp32 state before). (Modes that round
    stochastically lay out every param: tests/test_reliability.py.)"""
    _fix_malloc_threshold()
    frozen = torch.nn.Parameter(torch.randn(1 << 25).to(dtype), requires_grad=False)
    trained = torch.nn.Parameter(torch.randn(1000).to(dtype))
    trained.grad = torch.randn_like(trained)
    optimizer = Adadelta([frozen, trained], **options)
    first_step = peak_increase(optimizer.step)
    assert first_step <= SLACK_BYTES, f"first step: +{first_step / MIB:.0f} MiB for 1000 trained params"
    assert frozen not in optimizer.state and float(optimizer.state[trained]["step"]) == 1.0
