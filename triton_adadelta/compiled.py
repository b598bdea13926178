"""The optimizer step as one opaque op for ``torch.compile``.

Under ``torch.compile(optimizer.step)``, or a compiled train step that calls it,
Dynamo traces :meth:`Adadelta.step <triton_adadelta.Adadelta.step>` down to one call
of ``triton_adadelta::step_``: a :func:`torch.library.custom_op` that takes every
param (mutated in place), its grad (or None), and GradScaler's ``grad_scale`` and
``found_inf``. Nothing inside it is traced: at run time it runs the eager step (the
segment table, the native reads, the one launch per state) on the tensors it is
given. So no native build or ctypes call is ever traced, and the graph holds the
step as one node. The optimizer's own flat state is hidden state of the op, as an
RNG's is: no other op reads or writes it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from .optimizer import Adadelta

__all__ = ["register", "step_"]

# Each optimizer by its handle (an int, so that it can be an argument of the op).
_optimizers: weakref.WeakValueDictionary[int, Adadelta] = weakref.WeakValueDictionary()


def register(optimizer: Adadelta) -> int:
    """The handle by which ``step_`` finds ``optimizer``."""
    handle = id(optimizer)
    _optimizers[handle] = optimizer
    return handle


@torch.library.custom_op("triton_adadelta::step_", mutates_args=("params",))
def step_(
    params: list[torch.Tensor],
    grads: list[Optional[torch.Tensor]],
    grad_scale: Optional[torch.Tensor],
    found_inf: Optional[torch.Tensor],
    handle: int,
) -> None:
    """One AdaDelta step of the optimizer ``handle`` over ``params`` (every param of
    its groups, in order) with ``grads``, updating the params in place."""
    optimizer = _optimizers.get(handle)
    if optimizer is None:
        raise RuntimeError("triton_adadelta::step_ called for an optimizer that no longer exists")
    optimizer._step_given(params, grads, grad_scale, found_inf)


# The op returns nothing and only mutates params: its fake (meta) function does nothing.
step_.register_fake(lambda *args: None)
