"""The seed's API: PuzzleLib-style ``AdaDelta`` on the same flat buffers and kernel.

PuzzleLib users write::

    optimizer = AdaDelta()                    # rho=0.95, epsilon=1e-6, nodeinfo=None
    optimizer.setupOn(net, useGlobalState=True)
    for i in range(100):
        predictions = net(data)
        error, grad = loss(predictions, target)
        optimizer.zeroGradParams()
        predictions.backward(grad)
        optimizer.update()

This module gives them that loop on top of :class:`~triton_adadelta.flat.FlatBuffer`
and the update functions of :class:`triton_adadelta.Adadelta`; it holds no math of
its own.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import torch
import torch.distributed as dist

from .flat import FlatBuffer, buffer_key, check_param_state
from .update import apply_update_

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
    r"""PuzzleLib's AdaDelta: torch's Adadelta with ``lr=1``, on fused flat buffers.

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

    :meth:`setupOn` packs the module's params into flat buffers and rebinds them as
    views, so the model keeps working. Grads live in a flat grad buffer as views:
    :meth:`zeroGradParams` is one fill per buffer, and :meth:`update` is one kernel
    launch per buffer (per run of params that have a grad). A param whose grad is
    None is skipped: its param and state stay untouched, as in torch.

    With ``nodeinfo``, a :mod:`torch.distributed` process group, every rank runs the
    same loop on its own data. :meth:`update` averages each flat grad buffer across
    the group with one ``all_reduce`` per buffer, then every rank applies the same
    update, so the ranks stay identical without exchanging optimizer state. A param
    that has a grad on any rank is updated on every rank (a rank without its grad
    contributes zeros, as ``DistributedDataParallel`` does); deciding that takes one
    small ``all_reduce`` of has-grad flags per update.

    Args:
        rho (float, optional): coefficient of the running averages (default: 0.95).
        epsilon (float, optional): term added inside both square roots
            (default: 1e-6).
        nodeinfo (ProcessGroup, optional): the group to average grads over; None
            trains in one process (default: None).

    Attributes:
        rho, epsilon: the hyper-parameters, which may be changed between updates.
        t (int): the number of updates done.
    """

    def __init__(
        self,
        rho: float = 0.95,
        epsilon: float = 1e-6,
        nodeinfo: "dist.ProcessGroup | None" = None,
    ) -> None:
        self.rho = rho
        self.epsilon = epsilon
        if nodeinfo is not None:
            if not dist.is_available() or not dist.is_initialized():
                raise RuntimeError("nodeinfo needs torch.distributed: call init_process_group() first")
            if not isinstance(nodeinfo, dist.ProcessGroup):
                raise TypeError(f"nodeinfo must be a torch.distributed ProcessGroup or None, got {type(nodeinfo)}")
        self.nodeinfo = nodeinfo
        self.t = 0
        self.useGlobalState = True
        self._buffers: list[FlatBuffer] = []
        self._params: list[torch.nn.Parameter] = []

    # ------------------------------------------------------------ hyper-parameters
    @property
    def rho(self) -> float:
        return self._rho

    @rho.setter
    def rho(self, value: float) -> None:
        self._rho = _check_rho(value)

    @property
    def epsilon(self) -> float:
        return self._epsilon

    @epsilon.setter
    def epsilon(self, value: float) -> None:
        self._epsilon = _check_epsilon(value)

    # ----------------------------------------------------------------------- setup
    def setupOn(self, module: torch.nn.Module, useGlobalState: bool = True) -> None:
        """Pack ``module``'s params into flat buffers and start from a fresh state.

        Args:
            module (nn.Module): the model; its params are rebound as views of the
                flat buffers (tied weights are one param).
            useGlobalState (bool, optional): ``True`` packs all params of one
                device and dtype into one buffer, updated by one launch; ``False``
                gives every param its own buffer and launch, as PuzzleLib's
                per-tensor mode (default: True).
        """
        params = list(module.parameters())
        if not params:
            raise ValueError("setupOn got a module without parameters")
        for param in params:
            if type(param.data) is not torch.Tensor:
                raise TypeError(
                    f"AdaDelta packs plain tensors into flat buffers; got a {type(param.data).__name__} "
                    "param (e.g. a DTensor from fully_shard), which cannot be rebound as a view"
                )
        self.useGlobalState = bool(useGlobalState)
        self._params = params
        self._buffers = self._pack({})
        self.t = 0

    def _pack(self, carried: dict[int, dict[str, torch.Tensor]]) -> list[FlatBuffer]:
        """Build the flat buffers of ``self._params``, loading any carried state."""
        if self.useGlobalState:
            by_key: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
            for param in self._params:
                by_key.setdefault(buffer_key(param), []).append(param)
            groups = list(by_key.values())
        else:
            groups = [[param] for param in self._params]
        buffers = [FlatBuffer(group) for group in groups]
        for buffer in buffers:
            for i, segment in enumerate(buffer.segments):
                if id(segment.param) in carried:
                    buffer.load_param_state(i, carried[id(segment.param)])
        return buffers

    def _live_buffers(self) -> list[FlatBuffer]:
        """The flat buffers, repacked (keeping the state) if a param's data was replaced."""
        if not self._buffers:
            raise RuntimeError("call setupOn(module) before using the optimizer")
        if any(buffer.is_stale() for buffer in self._buffers):
            # e.g. `net.to(...)` or `p.data = ...`: pack the new data, keep the state.
            carried = {}
            for buffer in self._buffers:
                carried.update(buffer.carried_state())
            self._buffers = self._pack(carried)
        return self._buffers

    @property
    def buffers(self) -> list[FlatBuffer]:
        """The flat buffers (one per device and dtype, or one per param)."""
        return list(self._live_buffers())

    def _segments(self) -> Iterator[tuple[FlatBuffer, int]]:
        for buffer in self._live_buffers():
            for i in range(len(buffer.segments)):
                yield buffer, i

    # ------------------------------------------------------------------- training
    def zeroGradParams(self) -> None:
        """Zero every grad with one fill of each flat grad buffer.

        Grads stay views of the flat grad buffer, so the next backward accumulates
        in place with no copy. A grad that is None stays None (that param is
        skipped until a backward reaches it), as ``zero_grad(set_to_none=False)``.
        """
        for buffer in self._live_buffers():
            buffer.grad.zero_()
            if buffer.grads_are_views():
                continue  # the fill zeroed every grad
            for i, segment in enumerate(buffer.segments):
                param = segment.param
                if param.grad is not None and param.grad is not buffer.grad_views[i]:
                    # A grad the user assigned: replace it by its (zeroed) view.
                    param.grad = buffer.grad_views[i]

    @torch.no_grad()
    def update(self) -> None:
        """Apply one AdaDelta step to every param that has a grad.

        With ``nodeinfo``, the flat grad buffers are first averaged across the
        group (one ``all_reduce`` per buffer).

        Raises:
            RuntimeError: before :meth:`setupOn`, or for a sparse grad.
            ValueError: for a grad whose shape, dtype or device does not match its
                param. Nothing changes when it raises.
        """
        buffers = self._live_buffers()
        # Gather (and check) every grad before anything changes.
        plans = [(buffer, buffer.gather_grads()) for buffer in buffers]
        if self.nodeinfo is not None:
            self._sync_grad_presence(buffers)
            plans = [(buffer, buffer.gather_grads()) for buffer in buffers]
            for buffer in buffers:
                self._average_(buffer.grad)
        for buffer, runs in plans:
            apply_update_(buffer, runs, lr=1.0, rho=self.rho, eps=self.epsilon, weight_decay=0.0)
        self.t += 1

    def _sync_grad_presence(self, buffers: list[FlatBuffer]) -> None:
        """Give a zero grad (its view) to each param that has a grad on another rank.

        Without this, a param reached by backward on one rank only would be
        updated there and skipped elsewhere, and the ranks would drift apart.
        """
        params = [segment.param for buffer in buffers for segment in buffer.segments]
        has_grad = torch.tensor([param.grad is not None for param in params], dtype=torch.int32)
        dist.all_reduce(has_grad, op=dist.ReduceOp.MAX, group=self.nodeinfo)
        index = 0
        for buffer in buffers:
            for i, segment in enumerate(buffer.segments):
                if has_grad[index] and segment.param.grad is None:
                    buffer.grad_views[i].zero_()
                    segment.param.grad = buffer.grad_views[i]
                index += 1

    def _average_(self, flat_grad: torch.Tensor) -> None:
        """Average ``flat_grad`` across ``nodeinfo`` in place, with one all_reduce."""
        group = self.nodeinfo
        backend = str(dist.get_backend(group))
        if flat_grad.device.type == "cuda" and "nccl" in backend:
            dist.all_reduce(flat_grad, op=dist.ReduceOp.AVG, group=group)
        else:
            # gloo has no AVG: sum, then divide (exact for a power-of-two world size).
            dist.all_reduce(flat_grad, op=dist.ReduceOp.SUM, group=group)
            flat_grad.div_(dist.get_world_size(group))

    # ---------------------------------------------------------------- save / load
    def state_dict(self) -> dict[str, Any]:
        """The optimizer state: ``torch.optim.Adadelta``'s format, plus ``t``.

        ``state`` maps each param's index (in ``module.parameters()`` order) to its
        ``step``, ``square_avg`` and ``acc_delta`` (copies, shaped like the param;
        the state is fp32 for bf16/fp16 params). Params that never had a grad have
        no entry.
        """
        state: dict[int, dict[str, torch.Tensor]] = {}
        index = {id(param): n for n, param in enumerate(self._params)}
        for buffer, i in self._segments():
            if buffer.initialized[i]:
                n = index[id(buffer.segments[i].param)]
                state[n] = {k: v.detach().clone().cpu() for k, v in buffer.param_state(i).items()}
        group = {
            "lr": 1.0,
            "rho": self.rho,
            "eps": self.epsilon,
            "weight_decay": 0.0,
            "foreach": None,
            "maximize": False,
            "capturable": False,
            "differentiable": False,
            "params": list(range(len(self._params))),
        }
        return {
            "state": state,
            "param_groups": [group],
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "t": self.t,
            "useGlobalState": self.useGlobalState,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or a one-group ``torch.optim.Adadelta``'s).

        Loading is atomic: the whole dict is checked first, and a dict that does not
        fit raises ``ValueError`` and changes nothing.
        """
        buffers = self._live_buffers()
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an AdaDelta state has the keys 'state' and 'param_groups'")
        groups = state_dict["param_groups"]
        if len(groups) != 1:
            raise ValueError(f"an AdaDelta state has one param group, this one has {len(groups)}")
        group = groups[0]
        if len(group["params"]) != len(self._params):
            raise ValueError(
                f"the state is for {len(group['params'])} params but the module has {len(self._params)}"
            )
        if float(group.get("lr", 1.0)) != 1.0 or float(group.get("weight_decay", 0.0)) != 0.0:
            raise ValueError("PuzzleLib's AdaDelta has lr=1 and no weight decay; the state has other values")
        rho = _check_rho(float(group["rho"]))
        epsilon = _check_epsilon(float(group["eps"]))
        position = {key: n for n, key in enumerate(group["params"])}
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state_dict["state"].items():
            if key not in position:
                raise ValueError(f"the state has an entry for param {key!r}, which its param group does not list")
            param = self._params[position[key]]
            check_param_state(key, param, value)
            loaded[id(param)] = value

        # Everything fits: from here on nothing raises for the dict's sake.
        for buffer in buffers:
            for i, segment in enumerate(buffer.segments):
                value = loaded.get(id(segment.param))
                if value is None:
                    buffer.reset_param_state(i)
                else:
                    buffer.load_param_state(i, value)
        self._rho, self._epsilon = rho, epsilon
        self.t = int(state_dict.get("t", 0))

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
