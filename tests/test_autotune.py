"""The autotuner of the in-place kernel: what it restores, what it keys on, what it tries."""

from __future__ import annotations

import inspect
import re

import pytest
import torch

from triton_adadelta.kernels.adadelta import AUTOTUNE_CONFIGS, adadelta_kernel, configs_for, size_bucket


def test_every_buffer_the_kernel_writes_is_restored_between_trials():
    source = inspect.getsource(adadelta_kernel.fn.fn if hasattr(adadelta_kernel.fn, "fn") else adadelta_kernel.fn)
    written = set(re.findall(r"tl\.store\((\w+_ptr)", source))
    assert written == {"param_ptr", "square_avg_ptr", "acc_delta_ptr", "master_ptr", "step_ptr"}
    assert set(adadelta_kernel.restore_value) == written
    assert not adadelta_kernel.reset_to_zero


def test_tuning_key_is_a_size_bucket_so_a_run_tunes_once_per_bucket():
    assert adadelta_kernel.keys == ["size_bucket"]
    sizes = [1, 100, 4096, 4097, 10**5, 10**6, 123_456_789, 2**31 + 5]
    buckets = [size_bucket(n) for n in sizes]
    assert buckets == sorted(buckets)
    for n, bucket in zip(sizes, buckets):
        assert bucket >= n and bucket & (bucket - 1) == 0
    # A model's many tensor sizes land in few buckets: every size up to 2**31 in 20.
    assert len({size_bucket(n) for n in range(1, 2**31, 9973)}) <= 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("warp_size", [32, 64])
def test_configs_tried_keep_16_bytes_per_thread(dtype, warp_size):
    configs = configs_for(dtype, warp_size)
    assert configs, "at least one config for every dtype and warp size"
    assert all(c in AUTOTUNE_CONFIGS for c in configs)
    for config in configs:
        per_thread = config.kwargs["BLOCK_SIZE"] // (warp_size * config.num_warps)
        assert per_thread * torch.empty((), dtype=dtype).element_size() >= 16
