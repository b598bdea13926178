"""Triton kernels of triton-adadelta, installed as ``triton_adadelta.kernels``."""

from .adadelta import AUTOTUNE_CONFIGS, adadelta_kernel, adadelta_step_, size_bucket

__all__ = ["AUTOTUNE_CONFIGS", "adadelta_kernel", "adadelta_step_", "size_bucket"]
