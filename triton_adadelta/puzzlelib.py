"""The seed's API: PuzzleLib-style ``AdaDelta``, a thin facade over :class:`~triton_adadelta.Adadelta`.

PuzzleLib users write::

    optimizer = AdaDelta()                    # rho=0.95, epsilon=1e-6, nodeinfo=None
    optimizer.setupOn(net, useGlobalState=True)
    for i in range(100):
        predictions = net(data)
        error, grad = loss(predictions, target)
        optimizer.zeroGradParams()
        predictions.backward(grad)
        optimizer.update()

This module gives them that loop on one :class:`triton_adadelta.Adadelta` (``lr=1``,
no weight decay): the same flat state, kernel, checks and state_dict; it holds no
math, packing or state code of its own.
"""

from __future__ import annotations

import operator
import os
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from .flat import FlatState
from .optimizer import Adadelta, _check_state_dtype

__all__ = ["AdaDelta"]

# Identifies a file written by AdaDelta.save; its "state"/"param_groups" keys are
# torch.optim.Adadelta's state_dict format, so torch can load it too.
_FORMAT = "triton_adadelta.puzzlelib.AdaDelta"
_FORMAT_VERSION = 1


def _check_rho(rho: float) -> float:
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")
    return rho


def _check_epsilon(epsilon: float) -> float:
    if not 0.0 <= epsilon:
        raise ValueError(f"Invalid epsilon value: {epsilon}")
    return epsilon


class AdaDelta:
    r"""PuzzleLib's AdaDelta: torch's Adadelta with ``lr=1``, on one fused launch.

    With :math:`g` the gradient, :math:`v` the running average of squared gradients
    and :math:`u` the running average of squared updates, one :meth:`update` is

    .. math::
       \begin{aligned}
            v_t &\leftarrow \rho v_{t-1} + (1 - \rho) g_t^2 \\
            \Delta x_t &\leftarrow \frac{\sqrt{u_{t-1} + \epsilon}}{\sqrt{v_t + \epsilon}} g_t \\
            u_t &\leftarrow \rho u_{t-1} + (1 - \rho) \Delta x_t^2 \\
            \theta_t &\leftarrow \theta_{t-1} - \Delta x_t
       \end{aligned}

    That is :class:`torch.optim.Adadelta` with ``lr=1`` and no weight decay
    (PuzzleLib computes :math:`\sqrt{(u+\epsilon)/(v+\epsilon)}`, the same quantity
    rounded differently; torch's form is the contract).

    :meth:`setupOn` builds one :class:`triton_adadelta.Adadelta` over the module's
    params, which stay where the module put them. :meth:`zeroGradParams` zeroes the
    grads, and :meth:`update` is one kernel launch per flat state. A param whose grad
    is None is skipped: its param and state stay untouched, as in torch.

    With ``nodeinfo``, a :mod:`torch.distributed` process group, every rank runs the
    same loop on its own data. :meth:`update` averages the grads across the group
    with one ``all_reduce`` per (device, dtype) of a flattened copy, written back
    into the grads as ``DistributedDataParallel`` does, then every rank applies the
    same update, so the ranks stay identical without exchanging optimizer state. A
    param that has a grad on any rank is updated on every rank (a rank without its
    grad contributes zeros, as DDP does); deciding that takes one small
    ``all_reduce`` of has-grad flags per update.

    Args:
        rho (float, optional): coefficient of the running averages (default: 0.95).
        epsilon (float, optional): term added inside both square roots
            (default: 1e-6).
        nodeinfo (ProcessGroup, optional): the group to average grads over; None
            trains in one process (default: None).
        state_dtype (torch.dtype, optional): the state's dtype, as
            :class:`triton_adadelta.Adadelta` takes it: ``torch.bfloat16`` stores the
            running averages in bf16, rounded stochastically (default: torch.float32).

    Attributes:
        rho, epsilon: the hyper-parameters, which may be changed between updates.
        t (int): the number of updates done.
        optimizer (Adadelta): the optimizer underneath (after :meth:`setupOn`).
    """

    def __init__(
        self,
        rho: float = 0.95,
        epsilon: float = 1e-6,
        nodeinfo: "dist.ProcessGroup | None" = None,
        *,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        self._rho = _check_rho(rho)
        _check_state_dtype(state_dtype, "AdaDelta")
        self.state_dtype = state_dtype
        self._epsilon = _check_epsilon(epsilon)
        if nodeinfo is not None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("nodeinfo needs torch.distributed: call init_process_group() first")
            if not isinstance(nodeinfo, dist.ProcessGroup):
                raise TypeError(f"nodeinfo must be a torch.distributed ProcessGroup or None, got {type(nodeinfo)}")
        self.nodeinfo = nodeinfo
        self.t = 0
        self.useGlobalState = True
        self._optimizer: Adadelta | None = None

    # ------------------------------------------------------------ hyper-parameters
    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = _check_rho(value)
        if self._optimizer is not None:
            self._optimizer.param_groups[0]["rho"] = value

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_epsilon(value)
        if self._optimizer is not None:
            self._optimizer.param_groups[0]["eps"] = value

    @property
    def optimizer(self) -> Adadelta:
        if self._optimizer is None:
            raise RuntimeError("call setupOn(module) before using the optimizer")
        return self._optimizer

    # ----------------------------------------------------------------------- setup
    def setupOn(self, module: torch.nn.Module, useGlobalState: bool = True) -> None:
        """Optimize ``module``'s params, from a fresh state.

        Args:
            module (nn.Module): the model (tied weights are one param).
            useGlobalState (bool, optional): ``True`` keeps the state of all params of
                one device and dtype in one flat state, updated by one launch;
                ``False`` gives every param a state and a launch of its own, as
                PuzzleLib's per-tensor mode (default: True).
        """
        params = list(module.parameters())
        if not params:
            raise ValueError("setupOn got a module without parameters")
        optimizer = Adadelta(params, lr=1.0, rho=self.rho, eps=self.epsilon, state_dtype=self.state_dtype)
        optimizer.state_per_param = not useGlobalState
        self.useGlobalState = bool(useGlobalState)
        self._optimizer = optimizer
        self.t = 0

    @property
    def states(self) -> list[FlatState]:
        """The flat states (one per device and dtype, or one per param)."""
        return self.optimizer.flat_states()

    # ------------------------------------------------------------------- training
    def zeroGradParams(self) -> None:
        """Zero every grad in place (``zero_grad(set_to_none=False)``).

        A grad that is None stays None (that param is skipped until a backward
        reaches it), and the next backward accumulates into the zeroed grads.
        """
        self.optimizer.zero_grad(set_to_none=False)

    @torch.no_grad()
    def update(self) -> None:
        """Apply one AdaDelta step to every param that has a grad.

        With ``nodeinfo``, the grads are first averaged across the group.

        Raises:
            RuntimeError: before :meth:`setupOn`, or for a sparse grad.
            ValueError: for a grad whose shape, dtype or device does not match its
                param. Nothing changes when it raises.
        """
        optimizer = self.optimizer
        if self.nodeinfo is not None:
            self._average_grads(optimizer.param_groups[0]["params"])
        optimizer.step()
        self.t += 1

    def _average_grads(self, params: list[torch.Tensor]) -> None:
        """Average the grads across ``nodeinfo``, giving a zero grad to each param that
        has a grad on another rank (without it, the ranks would drift apart)."""
        group = self.nodeinfo
        has_grad = torch.tensor([param.grad is not None for param in params], dtype=torch.int32)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=group)
        for param, present in zip(params, has_grad.tolist()):
            if present and param.grad is None:
                param.grad = torch.zeros_like(param)
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for param in params:
            if param.grad is not None:
                by_key.setdefault((param.device, param.dtype), []).append(param.grad)
        world_size = dist.get_world_size(group)
        for (device, _), grads in by_key.items():
            flat = _flatten_dense_tensors(grads)
            if device.type == "cuda" and "nccl" in str(dist.get_backend(group)):
                dist.all_reduce(flat, op=dist.ReduceOp.AVG, group=group)
            else:
                # gloo has no AVG: sum, then divide (exact for a power-of-two world size).
                dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
                flat.div_(world_size)
            torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))

    # ---------------------------------------------------------------- save / load
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: ``torch.optim.Adadelta``'s format, plus ``t``.

        ``state`` maps each param's index (in ``module.parameters()`` order) to its
        ``step``, ``square_avg`` and ``acc_delta`` (copies, shaped like the param;
        the state is fp32 for bf16/fp16 params). Params that never had a grad have
        no entry.
        """
        saved = self.optimizer.state_dict()
        state = {
            index: {name: value.detach().clone().cpu() for name, value in param_state.items()}
            for index, param_state in saved["state"].items()
        }
        return {
            "state": state,
            "param_groups": saved["param_groups"],
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "t": self.t,
            "useGlobalState": self.useGlobalState,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or a one-group ``torch.optim.Adadelta``'s).

        Loading is atomic: the whole dict is checked first (then by
        :meth:`triton_adadelta.Adadelta.load_state_dict`, itself atomic), and a dict
        that does not fit raises ``ValueError`` and changes nothing: params, state,
        ``rho``, ``epsilon`` and ``t``.

        Raises:
            ValueError: the dict does not fit, saying why.
        """
        optimizer = self.optimizer
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an AdaDelta state has the keys 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if not isinstance(groups, (list, tuple)) or len(groups) != 1 or not isinstance(groups[0], dict):
            raise ValueError("an AdaDelta state has one param group (a dict)")
        # PuzzleLib's own states may leave lr and weight decay out: they are 1 and 0.
        group = {"lr": 1.0, "weight_decay": 0.0, **groups[0]}
        n_params = len(optimizer.param_groups[0]["params"])
        if not isinstance(group.get("params"), (list, tuple)) or len(group["params"]) != n_params:
            raise ValueError(f"the state is not for the {n_params} params of the module")
        try:
            lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
            rho, epsilon = _check_rho(float(group["rho"])), _check_epsilon(float(group["eps"]))
            t = operator.index(state_dict.get("t", 0))
        except KeyError as error:
            raise ValueError(f"an AdaDelta state's param group has {error}") from error
        except (TypeError, ValueError, RuntimeError) as error:  # float() of a non-number, an invalid value
            raise ValueError(f"an AdaDelta state with invalid values: {error}") from error
        if lr != 1.0 or weight_decay != 0.0:
            raise ValueError("PuzzleLib's AdaDelta has lr=1 and no weight decay; the state has other values")
        if t < 0:
            raise ValueError(f"an AdaDelta state counts t={t} updates")
        optimizer.load_state_dict({"state": state_dict["state"], "param_groups": [group]})
        self._rho, self._epsilon, self.t = rho, epsilon, t

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the optimizer state to ``path`` with :func:`torch.save`."""
        torch.save(self.state_dict(), path)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Read a state written by :meth:`save` (safely: ``weights_only=True``).

        The module must have been set up with :meth:`setupOn` (with the same
        params). Loading is atomic: a file that does not fit raises and changes
        nothing.
        """
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
