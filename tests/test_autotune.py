"""The autotuner of the in-place kernel: what it restores, what it keys on, what it tries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from triton_adadelta.flat import hparams_table, table_for_tensors
from triton_adadelta.kernels import adadelta as kernel_module
from triton_adadelta.kernels.adadelta import (
    ALIGNED_ROW,
    AUTOTUNE_CONFIGS,
    _restore_written,
    _save_written,
    _tuning,
    adadelta_kernel,
    adadelta_step_,
    configs_for,
    default_config,
    size_bucket,
    state_dtype_for,
)

MODES = {
    # name: (param dtype, master weights, stochastic rounding)
    "fp32": (torch.float32, False, False),
    "bf16+master": (torch.bfloat16, True, False),
    "fp16+sr": (torch.float16, False, True),
    "fp64": (torch.float64, False, False),
}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes, so that comparisons are bit for bit (NaN and -0.0 included)."""
    return tensor.detach().contiguous().view(torch.uint8).clone()


class _Launch:
    """Params reached through a segment table, their state, and the kernel arguments of one step.

    The params are views into larger storages: one starts one element in (the
    unaligned branch), sizes leave tails (the unaligned branch) and bulks (the
    aligned one), so both branches write. The arguments are those ``adadelta_step_``
    passes the kernel, recorded from a real call.
    """

    def __init__(self, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
        dtype, master, stochastic_rounding = MODES[mode]
        generator = torch.Generator().manual_seed(0)
        offsets_and_sizes = [(0, 37), (1, 1030), (0, 4096 + 8), (3, 5)]
        self.storages = [torch.randn(offset + size + 2, generator=generator).to(dtype) for offset, size in offsets_and_sizes]
        self.params = [storage[offset : offset + size] for storage, (offset, size) in zip(self.storages, offsets_and_sizes)]
        self.grads = [torch.randn(size, generator=generator).to(dtype) for _, size in offsets_and_sizes]
        self.table, n_state = table_for_tensors(self.params, self.grads, groups=[0, 1, 0, 1])
        aligned = self.table.pieces[ALIGNED_ROW][self.table.numels > 0]
        assert aligned.any() and not aligned.all(), "both branches must run"
        state_dtype = state_dtype_for(dtype)
        self.square_avg = torch.rand(n_state, generator=generator).to(state_dtype)
        self.acc_delta = torch.rand(n_state, generator=generator).to(state_dtype) * 1e-3
        self.master = None
        if master:
            self.master = torch.zeros(n_state)
            for param, offset in zip(self.params, self.table.pieces[2, 0::2].tolist()):
                self.master[offset : offset + param.numel()] = param.float()
        self.hparams = hparams_table(((1.0, 0.9, 1e-6, 0.0, False), (0.5, 0.5, 1e-3, 0.1, True)), state_dtype, torch.device("cpu"))

        self.kwargs: dict = {}
        real_run = adadelta_kernel.fn.run
        monkeypatch.setattr(adadelta_kernel.fn, "run", lambda *args, **kwargs: self.kwargs.update(kwargs))
        adadelta_step_(
            self.table,
            self.square_avg,
            self.acc_delta,
            hparams=self.hparams,
            master=self.master,
            stochastic_rounding=stochastic_rounding,
            seed=1234,
        )
        monkeypatch.setattr(adadelta_kernel.fn, "run", real_run)
        assert self.kwargs, "the launcher launched the kernel"

    def buffers(self) -> list[torch.Tensor]:
        """Everything the launch can reach: the params' whole storages, grads, state, hyper-parameters."""
        state = [self.square_avg, self.acc_delta] + ([self.master] if self.master is not None else [])
        return [*self.storages, *self.grads, *state, self.hparams]

    def snapshot(self) -> list[torch.Tensor]:
        return [_bits(buffer) for buffer in self.buffers()]

    def trial(self) -> list[torch.Tensor]:
        """One tuning trial as the autotuner runs it: pre-hook, launch, post-hook.

        Returns:
            What the launch wrote, read before the post-hook.
        """
        adadelta_kernel.pre_hook(self.kwargs)
        adadelta_kernel.fn.run(**self.kwargs)
        written = self.snapshot()
        adadelta_kernel.post_hook(self.kwargs, exception=None)
        return written


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_the_tuning_hooks_are_the_ones_that_restore_and_nothing_is_zeroed():
    assert adadelta_kernel.pre_hook is _save_written
    assert adadelta_kernel.post_hook is _restore_written
    assert not adadelta_kernel.reset_to_zero
    # The params are not arguments (the table holds their addresses): the hooks, not
    # `restore_value`, put back what a trial writes.
    assert not adadelta_kernel.restore_value


@pytest.mark.parametrize("mode", list(MODES))
def test_tuning_trials_restore_every_buffer_the_kernel_writes(mode, monkeypatch):
    launch = _Launch(mode, monkeypatch)
    before = launch.snapshot()
    # What adadelta_step_ hands the hooks when it tunes: the tensors behind the table's addresses.
    monkeypatch.setattr(_tuning, "written", launch.table.written, raising=False)

    first = launch.trial()
    changed = [i for i, (a, b) in enumerate(zip(before, first)) if not torch.equal(a, b)]
    n_storages = len(launch.storages)
    # Every param (through the table) and the state were written...
    assert set(range(n_storages)) <= set(changed)
    assert {i for i in changed if i >= n_storages} == set(range(2 * n_storages, len(before) - 1))
    # ...and all of it is back, bit for bit.
    assert _same(launch.snapshot(), before)

    # So a second trial (another config, the same one again) starts alike and writes the same.
    assert _same(launch.trial(), first)
    assert _same(launch.snapshot(), before)
    assert getattr(_tuning, "saved", []) == []  # no copies held between trials


def test_a_failed_trial_is_restored_too(monkeypatch):
    launch = _Launch("fp32", monkeypatch)
    before = launch.snapshot()
    monkeypatch.setattr(_tuning, "written", launch.table.written, raising=False)
    adadelta_kernel.pre_hook(launch.kwargs)
    for param in launch.params:
        param.add_(1.0)  # what a launch that failed half-way may have left
    launch.square_avg.mul_(3.0)
    adadelta_kernel.post_hook(launch.kwargs, exception=RuntimeError("out of resources"))
    assert _same(launch.snapshot(), before)


def test_the_reset_only_call_after_tuning_changes_nothing(monkeypatch):
    # After choosing a config the autotuner calls the pre-hook with reset_only=True
    # (to zero `reset_to_zero` buffers) and no post-hook: nothing may be zeroed or kept.
    launch = _Launch("fp32", monkeypatch)
    before = launch.snapshot()
    monkeypatch.setattr(_tuning, "written", launch.table.written, raising=False)
    monkeypatch.setattr(_tuning, "saved", [], raising=False)
    adadelta_kernel.pre_hook(launch.kwargs, reset_only=True)
    assert _same(launch.snapshot(), before)
    assert _tuning.saved == []


def test_tuning_key_is_a_size_bucket_per_mode_so_a_run_tunes_once_per_bucket():
    # The mode is in the key: fp32, bf16 and fp16 params all have fp32 state, and
    # the dtypes of the tensor arguments alone would let one reuse another's config.
    assert adadelta_kernel.keys == ["size_bucket", "PARAM_DTYPE_NAME", "HAS_MASTER", "STOCHASTIC_ROUNDING"]
    sizes = [1, 100, 4096, 4097, 10**5, 10**6, 123_456_789, 2**31 + 5]
    buckets = [size_bucket(n) for n in sizes]
    assert buckets == sorted(buckets)
    for n, bucket in zip(sizes, buckets):
        assert bucket >= n and bucket & (bucket - 1) == 0
    # A model's many tensor sizes land in few buckets: every size up to 2**31 in 20.
    assert len({size_bucket(n) for n in range(1, 2**31, 9973)}) <= 20


def test_the_tuning_key_of_a_real_launch_is_plain_json_and_names_the_mode(monkeypatch):
    # With cache_results the autotuner writes its key with json.dumps before it times
    # a config: a tl.dtype in it raised TypeError at the first tuned step on a GPU.
    keys = {}
    for mode in MODES:
        kwargs = _Launch(mode, monkeypatch).kwargs
        key = [kwargs[name] for name in adadelta_kernel.keys]
        assert json.loads(json.dumps(key)) == key, mode
        keys[mode] = tuple(key[1:])
    assert len(set(keys.values())) == len(MODES), keys


@pytest.mark.parametrize("mode", ["fp32", "bf16", "fp16", "bf16+master", "fp16+sr", "fp64"])
@pytest.mark.parametrize("warp_size", [32, 64])
def test_configs_tried_keep_16_bytes_per_thread_and_the_spill_free_caps(mode, warp_size):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[mode.split("+")[0]]
    master, stochastic_rounding = mode.endswith("+master"), mode.endswith("+sr")
    configs = configs_for(dtype, warp_size, master=master, stochastic_rounding=stochastic_rounding)
    assert configs, "at least one config for every mode and warp size"
    assert all(c in AUTOTUNE_CONFIGS for c in configs)
    most = 8 if master or dtype == torch.float64 else 16 if stochastic_rounding else 32
    for config in configs:
        per_thread = config.kwargs["BLOCK_SIZE"] // (warp_size * config.num_warps)
        assert per_thread * torch.empty((), dtype=dtype).element_size() >= 16
        assert per_thread <= most
    # What runs untuned is one of them.
    assert default_config(dtype, warp_size, master=master, stochastic_rounding=stochastic_rounding) in configs


def test_the_untuned_launch_runs_the_default_config_of_its_mode(monkeypatch):
    launch = _Launch("bf16+master", monkeypatch)
    expected = default_config(torch.bfloat16, 32, master=True)
    assert (launch.kwargs["BLOCK_SIZE"], launch.kwargs["num_warps"]) == (expected.kwargs["BLOCK_SIZE"], expected.num_warps)
    assert kernel_module.interpreter_enabled()


def test_the_prune_hook_reads_the_launch_s_arguments_however_triton_hands_them(monkeypatch):
    # The launch passes keywords only. Triton 3.6 hands the hook an empty named_args and
    # the arguments in kwargs; later versions put them all in named_args. Both must
    # keep the configs of the launch's mode (fp32 params, fp32 state).
    launch = _Launch("fp32", monkeypatch)
    monkeypatch.setattr(kernel_module, "_current_warp_size", lambda: 32)
    arguments = {key: value for key, value in launch.kwargs.items() if key not in ("grid", "warmup")}
    expected = [(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in configs_for(torch.float32, 32)]
    assert expected != [(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in configs_for(torch.float32, 32, quantized_state=True)]
    for named_args, kwargs in ((arguments, {}), ({}, arguments)):
        kept = kernel_module._prune_configs(AUTOTUNE_CONFIGS, named_args, **kwargs)
        assert [(c.kwargs["BLOCK_SIZE"], c.num_warps) for c in kept] == expected


def test_the_seed_is_never_specialized_into_a_constant():
    # A seed of 1 specialized into a constant (triton 3.6 does, for an int argument
    # equal to 1) has no `.to()`, and its launch failed to compile on the GPU. The
    # interpreter keeps no specialization, so the compiled kernel's is read in a
    # process without it (creating the JIT function needs no GPU).
    probe = (
        "from triton_adadelta.kernels.adadelta import adadelta_kernel; "
        "print({p.name: p.do_not_specialize for p in adadelta_kernel.fn.params}['seed'])"
    )
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "TRITON_INTERPRET": "0"},
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "True"
