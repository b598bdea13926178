"""``triton_adadelta.Adadelta``: a drop-in ``torch.optim.Adadelta`` on flat buffers."""

from __future__ import annotations

import operator
from collections import defaultdict
from copy import deepcopy
from itertools import chain
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from .flat import FlatBuffer, buffer_key, check_packable, check_param_state
from .update import apply_update_, backend_for

__all__ = ["Adadelta"]


def _same_objects(current: list[Any], seen: list[Any]) -> bool:
    """Whether two lists hold the same objects (by identity: tensors' == is elementwise)."""
    return len(current) == len(seen) and all(map(operator.is_, current, seen))


class Adadelta(Optimizer):
    r"""Implements the Adadelta algorithm as one fused Triton kernel per flat buffer.

    A drop-in replacement for :class:`torch.optim.Adadelta`: same signature,
    defaults, validation messages, update and ``state_dict`` format.

    .. math::
       \begin{aligned}
            &\textbf{input}: \gamma \text{ (lr)}, \: \theta_0 \text{ (params)},
                \: \rho \text{ (decay)}, \: \lambda \text{ (weight decay)}, \: \epsilon \\
            &\textbf{initialize}: v_0 \leftarrow 0 \text{ (square avg)},
                \: u_0 \leftarrow 0 \text{ (accumulate variables)} \\
            &\textbf{for} \: t=1 \: \textbf{to} \: \ldots \: \textbf{do} \\
            &\hspace{5mm}g_t \leftarrow \nabla_{\theta} f_t (\theta_{t-1})
                \quad (-g_t \text{ if maximize}) \\
            &\hspace{5mm}g_t \leftarrow g_t + \lambda \theta_{t-1} \\
            &\hspace{5mm} v_t \leftarrow v_{t-1} \rho + g^2_t (1 - \rho) \\
            &\hspace{5mm}\Delta x_t \leftarrow \frac{\sqrt{u_{t-1} + \epsilon }}
                {\sqrt{v_t + \epsilon} }g_t \\
            &\hspace{5mm} u_t \leftarrow u_{t-1} \rho + \Delta x^2_t (1 - \rho) \\
            &\hspace{5mm}\theta_t \leftarrow \theta_{t-1} - \gamma \Delta x_t \\
       \end{aligned}

    The params of each (param group, device, dtype) are packed into one flat buffer
    and rebound as views of it; grads and the state live in matching flat buffers,
    and one kernel launch updates the whole buffer. A param whose grad is None is
    skipped, exactly as torch skips it.

    Args:
        params (iterable): params or named params to optimize, or dicts defining
            param groups.
        lr (float, Tensor, optional): coefficient that scales delta before it is
            applied to the parameters (default: 1.0).
        rho (float, optional): coefficient used for computing a running average of
            squared gradients (default: 0.9).
        eps (float, optional): term added to the denominator to improve numerical
            stability (default: 1e-6).
        weight_decay (float, optional): weight decay (L2 penalty) (default: 0).
        foreach (bool, optional): accepted for compatibility; it has no effect, since
            every buffer is updated by one fused launch (default: None).
        capturable (bool, optional): keep ``step`` on the params' device and accept a
            device tensor ``lr``, so that ``step()`` needs no host sync
            (default: False).
        maximize (bool, optional): maximize the objective instead of minimizing it
            (default: False).
        differentiable (bool, optional): not supported; ``True`` raises
            ``ValueError`` (use :class:`torch.optim.Adadelta`) (default: False).
        master_weights (bool, optional): for bf16/fp16 params, keep an fp32 master
            copy that the update is applied to (default: False).
        stochastic_rounding (bool, optional): for bf16/fp16 params without master
            weights, round the param store stochastically (default: False).

    The state (``square_avg``, ``acc_delta``) is fp32 whatever the param dtype
    (fp64 for fp64 params).
    """

    _step_supports_amp_scaling = True

    def __init__(
        self,
        params: Iterable[Any],
        lr: float | torch.Tensor = 1.0,
        rho: float = 0.9,
        eps: float = 1e-6,
        weight_decay: float = 0,
        foreach: bool | None = None,
        *,
        capturable: bool = False,
        maximize: bool = False,
        differentiable: bool = False,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
    ) -> None:
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"Invalid rho value: {rho}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if differentiable:
            raise ValueError(
                "triton_adadelta.Adadelta does not support differentiable=True: its fused kernel "
                "updates params in place outside autograd; use torch.optim.Adadelta for that"
            )
        if master_weights and stochastic_rounding:
            raise ValueError("master_weights and stochastic_rounding are exclusive: choose one")
        defaults = {
            "lr": lr,
            "rho": rho,
            "eps": eps,
            "weight_decay": weight_decay,
            "maximize": maximize,
            "capturable": capturable,
            "foreach": foreach,
            "differentiable": differentiable,
            "master_weights": master_weights,
            "stochastic_rounding": stochastic_rounding,
        }
        self._group_buffers: list[list[FlatBuffer]] = []
        # Each group's params when its buffers were built, to notice a changed list.
        self._group_params: list[list[torch.Tensor]] = []
        super().__init__(params, defaults)
        for group in self.param_groups:
            for param in group["params"]:
                # Refuse DTensor (FSDP2) params here, not at the first step.
                check_packable(param)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name in ("foreach", "maximize", "differentiable", "capturable", "master_weights", "stochastic_rounding"):
                group.setdefault(name, self.defaults.get(name, False) if name != "foreach" else None)
        self.__dict__.setdefault("_group_buffers", [])
        self.__dict__.setdefault("_group_params", [])

    # ----------------------------------------------------------------- buffers
    def _build_group(self, group: dict[str, Any], old_buffers: list[FlatBuffer]) -> list[FlatBuffer]:
        """Pack a group's params into flat buffers, carrying over existing state."""
        carried: dict[int, dict[str, torch.Tensor]] = {}
        for buffer in old_buffers:
            carried.update(buffer.carried_state())
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
        seen: set[int] = set()
        for param in group["params"]:
            if id(param) in seen:  # tied weights are one param
                continue
            seen.add(id(param))
            by_key.setdefault(buffer_key(param), []).append(param)
        buffers = []
        for (_, dtype), params in by_key.items():
            master = bool(group["master_weights"]) and dtype in (torch.bfloat16, torch.float16)
            buffer = FlatBuffer(params, master_weights=master)
            for i, segment in enumerate(buffer.segments):
                self.state.pop(segment.param, None)
                if id(segment.param) in carried:
                    buffer.load_param_state(i, carried[id(segment.param)])
                    self.state[segment.param] = buffer.param_state(i)
            buffers.append(buffer)
        return buffers

    def _ensure_buffers(self) -> list[list[FlatBuffer]]:
        """Build the flat buffers, or rebuild those whose params changed under us."""
        if len(self._group_buffers) > len(self.param_groups):
            del self._group_buffers[len(self.param_groups) :]
            del self._group_params[len(self.param_groups) :]
        for g, group in enumerate(self.param_groups):
            params = group["params"]
            if g == len(self._group_buffers):
                self._group_buffers.append(self._build_group(group, []))
                self._group_params.append(list(params))
            elif not _same_objects(params, self._group_params[g]) or any(b.is_stale() for b in self._group_buffers[g]):
                self._group_buffers[g] = self._build_group(group, self._group_buffers[g])
                self._group_params[g] = list(params)
        return self._group_buffers

    def flat_buffers(self) -> list[FlatBuffer]:
        """The flat buffers of every group (built on first use)."""
        return list(chain.from_iterable(self._ensure_buffers()))

    def backends(self) -> list[str]:
        """The backend that updates each flat buffer (see :func:`backend_for`)."""
        return sorted({backend_for(buffer.device) for buffer in self.flat_buffers()})

    # -------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Perform a single optimization step.

        Args:
            closure (Callable, optional): A closure that reevaluates the model
                and returns the loss.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        grad_scale: torch.Tensor | None = getattr(self, "grad_scale", None)
        found_inf: torch.Tensor | None = getattr(self, "found_inf", None)
        group_buffers = self._ensure_buffers()
        # Gather (and check) every grad before any update, so a bad grad changes nothing.
        plans = [
            (group, buffer, buffer.gather_grads())
            for group, buffers in zip(self.param_groups, group_buffers)
            for buffer in buffers
        ]
        for group, buffer, runs in plans:
            initialized = apply_update_(
                buffer,
                runs,
                lr=group["lr"],
                rho=group["rho"],
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                maximize=group["maximize"],
                stochastic_rounding=group["stochastic_rounding"],
                grad_scale=grad_scale,
                found_inf=found_inf,
            )
            for i in initialized:
                self.state[buffer.segments[i].param] = buffer.param_state(i)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized params.

        With ``set_to_none=False`` the flat grad buffers are zeroed with one fill
        each; grads stay views, so the next backward accumulates in place.

        Args:
            set_to_none (bool): set grads to None instead of zeroing them
                (default: True). A param whose grad is None is skipped by ``step``.
        """
        if set_to_none:
            super().zero_grad(set_to_none)
            for buffer in chain.from_iterable(self._group_buffers):
                buffer.grads_dropped = True
            return
        buffers_cover_groups = len(self._group_buffers) == len(self.param_groups) and all(
            _same_objects(group["params"], seen) for group, seen in zip(self.param_groups, self._group_params)
        )
        if not buffers_cover_groups:
            super().zero_grad(set_to_none)
            return
        for buffer in chain.from_iterable(self._group_buffers):
            buffer.grad.zero_()
            if buffer.grads_are_views():
                continue  # the fill zeroed every grad
            for param in buffer.params:
                if param.grad is not None and param.grad.grad_fn is not None:
                    param.grad.detach_()
                if param.grad is not None:
                    param.grad.requires_grad_(False)
                    param.grad.zero_()

    # --------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state from ours or :class:`torch.optim.Adadelta`'s.

        Loading is atomic: the whole dict is checked first, and a dict that does not
        fit raises ``ValueError`` naming the mismatch and changes nothing. fp32 state
        is never downcast: it is copied into the optimizer's own state buffers.

        Args:
            state_dict (dict): optimizer state, as returned by :meth:`state_dict`.
        """
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an optimizer state_dict has the keys 'state' and 'param_groups'")
        groups = self.param_groups
        saved_groups = deepcopy(state_dict["param_groups"])
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved_groups)):
            raise ValueError(
                "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
            )
        id_map = dict(
            zip(
                chain.from_iterable(g["params"] for g in saved_groups),
                chain.from_iterable(g["params"] for g in groups),
            )
        )
        loaded: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in state_dict["state"].items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for param {key!r}, which no param group lists")
            param = id_map[key]
            check_param_state(key, param, value)
            loaded[id(param)] = value

        # Everything fits: from here on nothing raises for the dict's sake.
        new_groups = []
        for group, saved in zip(groups, saved_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        self.__setstate__({"state": defaultdict(dict), "param_groups": new_groups})
        for buffer in self.flat_buffers():
            for i, segment in enumerate(buffer.segments):
                self.state.pop(segment.param, None)
                value = loaded.get(id(segment.param))
                if value is None:
                    buffer.reset_param_state(i)
                else:
                    buffer.load_param_state(i, value)
                    self.state[segment.param] = buffer.param_state(i)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
