"""``triton_adadelta.Adadelta``: a drop-in ``torch.optim.Adadelta`` on flat buffers."""

from __future__ import annotations

import functools
import numbers
import operator
from collections import defaultdict
from copy import deepcopy
from itertools import chain, repeat
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .flat import (
    FlatState,
    Relayout,
    StepPlan,
    check_param_state,
    dequantized,
    is_dtensor,
    local_tensor,
    saveable,
    state_key,
)
from . import compiled
from .reader import grad_zeroer, record_function
from .update import implementation, update_

__all__ = ["Adadelta"]


_GRAD = operator.attrgetter("grad")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
_GRAD_FN = operator.attrgetter("grad_fn")
_IS_SPARSE = operator.attrgetter("is_sparse")
_DTYPE = operator.attrgetter("dtype")
_GET_DEVICE = torch.Tensor.get_device


def _may_have_grad(param: torch.Tensor) -> bool:
    """Whether a param requires a grad or has one (a grad set by hand counts, as torch
    steps any param with a grad)."""
    return param.requires_grad or param.grad is not None


def _same_objects(current: list[Any], seen: list[Any]) -> bool:
    """Whether two lists hold the same objects (by identity: tensors' == is elementwise)."""
    return len(current) == len(seen) and all(map(operator.is_, current, seen))


# ---------------------------------------------------------- hyper-parameter checks
# The group values torch passes as an op's scalar (``alpha``), which ATen checks
# against the param's dtype ("value cannot be converted to type float without
# overflow"), in the order torch's update uses them. rho is in [0, 1]; eps is added
# unchecked by torch too (an eps past fp32's range gives NaN in both).
_SCALAR_HPARAMS = ("weight_decay", "lr")

# fp16's largest value, the smallest of any param dtype: a number within it fits
# every dtype, so step() probes nothing further.
_FITS_EVERY_DTYPE = torch.finfo(torch.float16).max

# What step() checks by exact type, for speed (bool is neither; a NumPy scalar is
# checked at construction and load only).
_PYTHON_NUMBERS = (float, int)


def _may_overflow(value: object) -> bool:
    """Whether a Python number is past the range of some param dtype (a tensor is not
    read here: at step() that would be a host sync)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    infinite = value in (float("inf"), float("-inf"))  # inf converts to inf: torch lets it through
    return value != 0 and not infinite and not -_FITS_EVERY_DTYPE <= value <= _FITS_EVERY_DTYPE


def _check_scalars_fit(group: dict[str, Any], dtypes: Iterable[torch.dtype], *, read_tensors: bool) -> None:
    """Raise what torch's update raises where lr or weight_decay is past the range of a
    param dtype of the group (RuntimeError, torch's message; OverflowError for an int
    past int64).

    Each dtype is probed by the very conversion torch makes, so the error and its
    message are torch's. Cheap unless a value is past fp16's range.

    Args:
        read_tensors: also check a tensor lr (a host read: at construction and load,
            never at ``step()``).
    """
    for name in _SCALAR_HPARAMS:
        value = group[name]
        if read_tensors and isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_meta:
            value = value.item()
        if _may_overflow(value):
            for dtype in set(dtypes):
                probe = torch.zeros((), dtype=dtype)
                probe.add_(probe, alpha=value)


def _check_step_scalars(param_groups: list[dict[str, Any]]) -> None:
    """At each step, before anything changes: torch's overflow error for an lr or
    weight_decay set in a group (``param_groups[0]["lr"] = 1e39``) past the range of
    the dtype of a param that has a grad, as torch's update raises it."""
    fits = _FITS_EVERY_DTYPE
    for group in param_groups:
        lr, weight_decay = group["lr"], group["weight_decay"]
        # The usual case in tens of ns: both within fp16's range, or not a Python number
        # (a tensor lr is not read; NaN goes on to the probe, which lets it through).
        if (type(lr) not in _PYTHON_NUMBERS or -fits <= lr <= fits) and (
            type(weight_decay) not in _PYTHON_NUMBERS or -fits <= weight_decay <= fits
        ):
            continue
        _check_scalars_fit(group, (p.dtype for p in group["params"] if p.grad is not None), read_tensors=False)


def _check_group_values(group: dict[str, Any], where: str) -> None:
    """The constructor's checks of a group's hyper-parameters (torch's messages).

    Raises:
        ValueError: a missing or invalid value, naming ``where`` it is.
    """
    missing = [name for name in ("params", "lr", "rho", "eps", "weight_decay") if name not in group]
    if missing:
        raise ValueError(f"{where} lacks {missing}")
    lr = group["lr"]
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or lr.is_complex() or lr.is_meta:
            raise ValueError(f"{where}: Tensor lr must be 1-element")
        lr = lr.item()
    checks = (
        ("lr", lr, "Invalid learning rate", lambda v: 0.0 <= v),
        ("rho", group["rho"], "Invalid rho value", lambda v: 0.0 <= v <= 1.0),
        ("eps", group["eps"], "Invalid epsilon value", lambda v: 0.0 <= v),
        ("weight_decay", group["weight_decay"], "Invalid weight_decay value", lambda v: 0.0 <= v),
    )
    for name, value, message, valid in checks:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not valid(value):
            raise ValueError(f"{where}: {message}: {value!r}")
    if group.get("differentiable", False):
        raise ValueError(f"{where}: differentiable=True is not supported by triton_adadelta.Adadelta")
    if group.get("master_weights", False) and group.get("stochastic_rounding", False):
        raise ValueError(f"{where}: master_weights and stochastic_rounding are exclusive")
    _check_state_dtype(group.get("state_dtype", torch.float32), where)


# The state dtypes a user may ask for: fp32 (fp64 for fp64 params), bf16 with
# stochastic rounding, and 8-bit block-quantized state (torch.uint8).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.uint8)


def _check_group_state_dtype(group: dict[str, Any], default: torch.dtype, where: str) -> None:
    """A group's ``state_dtype``, and that its params can have it (bf16 and 8-bit state
    are for real fp32/bf16/fp16 params)."""
    state_dtype = group.get("state_dtype", default)
    _check_state_dtype(state_dtype, where)
    if state_dtype == torch.float32:
        return
    for param in group["params"]:
        param = param[1] if isinstance(param, tuple) else param
        if not isinstance(param, torch.Tensor):
            continue
        if param.dtype == torch.float64 or param.is_complex():
            raise ValueError(
                f"{where}: state_dtype={state_dtype} is for real fp32, bf16 and fp16 params, not {param.dtype}: "
                "put such params in a param group of their own with state_dtype=torch.float32"
            )


# How a state_dict's groups name a state dtype: torch.distributed.checkpoint takes
# tensors, numbers, strings, lists and dicts only, so not a torch.dtype.
_STATE_DTYPE_NAMES = {str(dtype): dtype for dtype in STATE_DTYPES}


def _saveable_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` with each group's ``state_dtype`` as its name ("torch.uint8"), and
    the rounding keys in the first group whatever the mode (None and 0 where no launch
    rounds): torch.distributed.checkpoint loads a dict only into one with the same
    keys, so a checkpoint of fp32 state must have the keys that 8-bit state's has.
    DTensor state views become :func:`~triton_adadelta.flat.saveable` (new dicts:
    torch's packing hands out the optimizer's own)."""
    packed = state_dict["state"]
    for key, value in packed.items():
        if any(is_dtensor(tensor) for tensor in value.values()):
            packed[key] = {name: saveable(tensor) for name, tensor in value.items()}
    for group in state_dict["param_groups"]:
        if isinstance(group.get("state_dtype"), torch.dtype):
            group["state_dtype"] = str(group["state_dtype"])
    if state_dict["param_groups"]:
        first = state_dict["param_groups"][0]
        first.setdefault(ROUNDING_SEED, None)
        # The live launch count is a tensor (see _count_launch); saved, its value.
        first[ROUNDING_LAUNCHES] = operator.index(first.get(ROUNDING_LAUNCHES, 0))
    return state_dict


def _loaded_groups(groups: object) -> object:
    """Saved groups with a named ``state_dtype`` as the dtype (a dict saved before
    names were used holds the dtype itself); anything else is left to the checks."""
    if not isinstance(groups, (list, tuple)):
        return groups
    return [
        {**group, "state_dtype": _STATE_DTYPE_NAMES[group["state_dtype"]]}
        if isinstance(group, dict) and isinstance(group.get("state_dtype"), str) and group["state_dtype"] in _STATE_DTYPE_NAMES
        else group
        for group in groups
    ]


def _check_state_dtype(state_dtype: object, where: str) -> None:
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"{where}: state_dtype must be one of {STATE_DTYPES}, not {state_dtype!r}")


def _loaded_step(key: object, step: object) -> torch.Tensor:
    """A saved ``step`` as the 0-d fp32 tensor it is kept as; what torch accepts (a
    1-element tensor of any shape, an int, a float, a bool).

    Raises:
        ValueError: anything else (a string, None, a complex or empty tensor, ...).
    """
    if isinstance(step, torch.Tensor):
        if step.numel() != 1 or step.is_complex() or step.dtype == torch.bool or step.is_meta:
            raise ValueError(
                f"state 'step' of param {key} must be a 1-element real tensor, an int or a float; "
                f"it is a {step.dtype} tensor of shape {tuple(step.shape)}"
            )
        return step.detach().to("cpu", torch.float32).reshape(())
    if isinstance(step, numbers.Real):
        try:
            return torch.tensor(float(step), dtype=torch.float32)  # as torch: float(step)
        except OverflowError as error:
            raise ValueError(f"state 'step' of param {key} is past a float's range: {error}") from error
    raise ValueError(
        f"state 'step' of param {key} must be a 1-element tensor, an int or a float, not {type(step).__name__}"
    )


def _loaded_param_state(key: object, param: torch.Tensor, value: object) -> dict[str, Any]:
    """One param's saved state, checked and with its step as a 0-d fp32 tensor, ready to
    copy in without anything left that can fail.

    Raises:
        ValueError: naming the param (by its key in the state_dict) and the mismatch.
    """
    if not isinstance(value, dict):
        raise ValueError(f"state of param {key} is a {type(value).__name__}, not a dict")
    if "step" in value:
        value = {**value, "step": _loaded_step(key, value["step"])}
    check_param_state(key, param, value)  # the keys, shapes and dtypes
    for name in ("square_avg", "acc_delta", "master_param"):
        tensor = value.get(name)
        if tensor is not None and tensor.layout != torch.strided:
            raise ValueError(f"state '{name}' of param {key} is a {tensor.layout} tensor, not a dense one")
        if tensor is not None and tensor.is_meta:
            raise ValueError(f"state '{name}' of param {key} is on the meta device: it holds no values")
    return value


# The step between consecutive rounding seeds (a prime, so coprime to 2**31 - 2: the
# seeds repeat only after 2**31 - 2 launches). The kernel hashes each seed into its key.
_ROUNDING_SEED_STRIDE = 0x9E3779B1


# Where the rounding's seeds live: keys of the first param group, so that every
# wrapper that keeps a state_dict's groups (torch.distributed.checkpoint, ZeRO, HF,
# Lightning) keeps them too. The seed is None until drawn.
ROUNDING_SEED = "rounding_seed"
ROUNDING_LAUNCHES = "rounding_launches"

# The keys of 8-bit state's scales in a param's entry (beside its codes).
_SCALE_KEYS = frozenset({"square_avg_scale", "acc_delta_scale"})


def _checked_rounding(group: dict[str, Any], where: str) -> dict[str, Any]:
    """A saved first group's rounding keys as ints (numpy ints and 1-element integer
    tensors taken), or {} where it has none.

    Raises:
        ValueError: a seed outside [1, 2**31 - 2] or a negative launch count.
    """
    if group.get(ROUNDING_SEED) is None:
        return {}
    try:
        seed, launches = operator.index(group[ROUNDING_SEED]), operator.index(group.get(ROUNDING_LAUNCHES, 0))
    except TypeError as error:
        raise ValueError(f"{where}: {ROUNDING_SEED} and {ROUNDING_LAUNCHES} must be ints ({error})") from error
    if isinstance(group[ROUNDING_SEED], bool) or not 1 <= seed <= 2**31 - 2 or launches < 0:
        raise ValueError(
            f"{where}: {ROUNDING_SEED} must be an int in [1, 2**31 - 2] and {ROUNDING_LAUNCHES} an int >= 0, "
            f"not {group[ROUNDING_SEED]!r} and {group.get(ROUNDING_LAUNCHES)!r}"
        )
    return {ROUNDING_SEED: seed, ROUNDING_LAUNCHES: launches}


def _count_launch(group: dict[str, Any]) -> int:
    """The first group's launch count (an int, or a 1-element integer tensor), which
    the group then holds plus one, as a new 0-dim int64 tensor: an int that changed at
    every launch made ``torch.compile`` compile the step again at each (it guards on a
    param group's numbers, as on a float ``lr``; with ``dynamic=False`` at every step,
    until Dynamo gave up), and a tensor counted in place would change under whoever
    holds it (ZeroRedundancyOptimizer saves and loads its groups' values as they are)."""
    launches = operator.index(group.get(ROUNDING_LAUNCHES, 0))
    group[ROUNDING_LAUNCHES] = torch.tensor(launches + 1)
    return launches


def _group_rounds(group: dict[str, Any]) -> bool:
    """Whether a group's launches may round stochastically (and so need a seed)."""
    return bool(group.get("stochastic_rounding")) or group.get("state_dtype") in (torch.bfloat16, torch.uint8)


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

    Params and grads stay where the model put them: the optimizer never assigns
    ``p.data``, never writes a grad and keeps no view of either between steps. Its
    own state (``square_avg``, ``acc_delta`` and, with ``master_weights``, an fp32
    master copy) lives in flat buffers, one per (device, param dtype, mode), with a
    16-byte-aligned segment per param (with fp32 state and no stochastic rounding,
    per param that requires a grad, has one or has state). Each step
    reads the addresses of the params and grads into a segment table (reused while
    they do not move) and updates every param of every group that has a grad in one
    kernel launch per flat buffer. A param whose grad is None is skipped, exactly as
    torch skips it.

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
        state_dtype (torch.dtype, optional): ``torch.float32`` keeps ``square_avg``
            and ``acc_delta`` in fp32 (fp64 for fp64 params); ``torch.bfloat16``
            stores them in bf16, rounded stochastically (unbiased; the noise comes
            from the element's index and the launch's seed, the first drawn from
            torch's generator, all in :meth:`state_dict`), for
            4 B of state per param instead of 8. The math stays fp32, and
            :meth:`state_dict` gives fp32 state, as torch's does. ``torch.uint8``
            stores each as 8-bit codes with one fp32 scale per block of 256
            elements (2.03 B of state per param; rounded stochastically on the
            block's grid, see :mod:`triton_adadelta.quant`); :meth:`state_dict` gives the
            fp32 values, which load back to the same codes, and
            :meth:`compact_state_dict` the codes and scales themselves. Neither is
            for fp64 or complex params (default: torch.float32).
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
        state_dtype: torch.dtype = torch.float32,
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
        _check_state_dtype(state_dtype, "Adadelta")
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
            "state_dtype": state_dtype,
        }
        # True: a flat state (and a launch) per param, as PuzzleLib's per-tensor mode.
        self.state_per_param = False
        # The flat states, and each group's params when they were laid out.
        self._flat_states: list[FlatState] = []
        self._laid_out: list[list[torch.Tensor]] | None = None
        self._laid_out_state_dtypes: list[object] = []
        # The params of the groups left without a segment (see _lay_out).
        self._left_out: list[torch.Tensor] = []
        # `self.state` and its entries as of the last step, to notice edits from
        # outside (_follow_state_edits).
        self._state_seen: dict[Any, Any] | None = None
        self._state_entries: list[Any] = []
        # How the compiled step's op finds this optimizer (triton_adadelta/compiled.py).
        self._handle = compiled.register(self)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (see :meth:`torch.optim.Optimizer.add_param_group`).

        Raises:
            ValueError: for a param listed twice (torch only warns: here it would be
                updated twice), or one already in another group (torch's error).
            TypeError: for a tensor subclass param other than ``DTensor``, or a
                DTensor whose local tensor is a subclass.
        """
        params = param_group["params"]
        if isinstance(params, torch.Tensor):
            params = [params]
        elif not isinstance(params, set):  # torch refuses a set, with its own message
            param_group["params"] = params = list(params)
        tensors = [p[1] if isinstance(p, tuple) else p for p in params]
        if len({id(p) for p in tensors}) != len(tensors):
            raise ValueError(
                "a param group lists a parameter more than once; give each parameter once "
                "(tied weights are one parameter: model.parameters() lists them once)"
            )
        for param in tensors:
            if not isinstance(param, torch.Tensor):
                continue
            # A DTensor (FSDP2, tensor parallelism) is updated through its local shard.
            data = local_tensor(param.data)
            if type(data) is not torch.Tensor:
                raise TypeError(
                    f"triton_adadelta updates plain tensors and DTensors of plain local tensors, not a "
                    f"{type(data).__name__} param; use torch.optim.Adadelta there"
                )
        _check_group_state_dtype({"params": tensors, **param_group}, self.defaults["state_dtype"], "a param group")
        # torch raises this at the first step; here already (the group is not added).
        _check_scalars_fit(
            {**self.defaults, **param_group},
            (t.dtype for t in tensors if isinstance(t, torch.Tensor)),
            read_tensors=True,
        )
        super().add_param_group(param_group)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for name in ("foreach", "maximize", "differentiable", "capturable", "master_weights", "stochastic_rounding"):
                group.setdefault(name, self.defaults.get(name, False) if name != "foreach" else None)
            group.setdefault("state_dtype", self.defaults.get("state_dtype", torch.float32))
        self.defaults.setdefault("state_dtype", torch.float32)
        # A copy (deepcopy, pickle) carries `state`, views of the flat states, and lays
        # them out anew at its first step.
        self.__dict__.setdefault("state_per_param", False)
        self.__dict__.setdefault("_flat_states", [])
        self.__dict__.setdefault("_laid_out", None)
        self.__dict__.setdefault("_laid_out_state_dtypes", [])
        self.__dict__.setdefault("_left_out", [])
        self.__dict__.setdefault("_state_seen", None)
        self.__dict__.setdefault("_state_entries", [])
        self._handle = compiled.register(self)

    # ------------------------------------------------------------- flat states
    def _lay_out(self, loading: frozenset[int] | None = None) -> list[FlatState]:
        """Build the flat states of every group, carrying each param's state over.

        ``self.state`` is what is carried: views of the previous flat states, or the
        tensors a copy or ``load_state_dict`` left there. A param gets a segment where
        it requires a grad or has one, or has state: as torch makes no state for a
        frozen param, a frozen backbone passed in with the rest takes no memory here
        either. ``load_state_dict`` lays out (``loading``: the ids of the params it
        loads state for) only the params with a grad or state to load, so that a
        param frozen after a load before any grad (``accelerate.prepare`` does one)
        gets none. The others are :attr:`_left_out`, and the next step lays out again
        once one of them requires or has a grad. But in a group that rounds
        stochastically (bf16 or 8-bit state, stochastic rounding), every param gets its
        segment: the noise is keyed by the element's place in the flat state, which
        must not depend on what happens to be frozen when a checkpoint loads, or a
        resume would round otherwise.
        """
        # A group's state_dtype may have been set since (param_groups[0]["state_dtype"] = ...):
        # checked before anything changes.
        for g, group in enumerate(self.param_groups):
            _check_group_state_dtype(group, torch.float32, f"param group {g}")
        listed = [id(param) for group in self.param_groups for param in group["params"]]
        if len(set(listed)) != len(listed):
            # (The constructor and add_param_group refuse it; here the groups were edited.)
            raise ValueError(
                "a parameter is listed more than once in the param groups; give each parameter once "
                "(torch would update it once per listing)"
            )
        old = {id(param): (flat, i) for flat in self._flat_states for i, param in enumerate(flat.params)}
        by_key: dict[tuple[Any, ...], tuple[list[torch.Tensor], list[int]]] = {}
        left_out = []
        for g, group in enumerate(self.param_groups):
            every_param = _group_rounds(group)
            for param in group["params"]:
                may_need_state = param.requires_grad if loading is None else id(param) in loading
                if not (every_param or may_need_state or param.grad is not None or self.state.get(param)):
                    left_out.append(param)
                    continue
                key = state_key(param, group) + ((id(param),) if self.state_per_param else ())
                params, groups = by_key.setdefault(key, ([], []))
                params.append(param)
                groups.append(g)
        states = []
        for (_, _, master, stochastic, state_dtype, *_), (params, groups) in by_key.items():
            flat = FlatState(
                params, groups, master_weights=master, stochastic_rounding=stochastic, state_dtype=state_dtype
            )
            for i, param in enumerate(params):
                carried = self.state.get(param)
                if carried:
                    previous = old.get(id(param))
                    # A param whose data was replaced keeps its state, but new data wins
                    # over the master copy.
                    moved = previous is not None and previous[0].moved(previous[1])
                    flat.load_param_state(i, carried, with_master=not moved)
                    views = flat.param_state(i)
                    if previous is not None and carried is previous[0].handed_out[previous[1]]:
                        # The entry handed out before stays the entry (code that holds
                        # optimizer.state[p] keeps seeing the state), with the new views.
                        carried.clear()
                        carried.update(views)
                        flat.handed_out[i] = views = carried
                    self.state[param] = views
            states.append(flat)
        laid_out = {id(param) for flat in states for param in flat.params}
        for param_id, (flat, i) in old.items():
            entry = self.state.get(flat.params[i]) if param_id not in laid_out else None
            if entry is not None and entry is flat.handed_out[i]:
                # A param no longer in the groups keeps its entry, as with torch, but as
                # copies: views would keep the whole previous flat state alive.
                self.state[flat.params[i]] = {name: value.clone() for name, value in entry.items()}
        self._flat_states = states
        self._left_out = left_out
        self._laid_out = [list(group["params"]) for group in self.param_groups]
        self._laid_out_state_dtypes = [group.get("state_dtype") for group in self.param_groups]
        self._remember_state()
        return states

    def _current_states(self) -> list[FlatState]:
        """The flat states, laid out again if a group's params or state dtype changed,
        or a param left out may now have a grad (the state is carried over, rounded to
        nearest into bf16 state)."""
        laid_out = self._laid_out
        if (
            laid_out is None
            or any(map(_may_have_grad, self._left_out))
            or len(laid_out) != len(self.param_groups)
            or not all(_same_objects(group["params"], seen) for group, seen in zip(self.param_groups, laid_out))
            or any(group.get("state_dtype") is not dtype for group, dtype in zip(self.param_groups, self._laid_out_state_dtypes))
        ):
            return self._lay_out()
        return self._flat_states

    def flat_states(self) -> list[FlatState]:
        """The flat states (built on first use): one per (device, param dtype, mode)."""
        return list(self._current_states())

    def backends(self) -> list[str]:
        """The implementations that update the flat states, exactly as they run
        (``"triton"``, ``"triton-interpreter"``, ``"cpu-native"`` or ``"cpu-chunked"``)."""
        return sorted(
            {
                implementation(
                    flat.device, flat.dtype, master=flat.master is not None, stochastic_rounding=flat.stochastic_rounding,
                    state_dtype=flat.square_avg.dtype,
                )  # fmt: skip
                for flat in self.flat_states()
            }
        )

    def _follow_state_edits(self, states: list[FlatState]) -> None:
        """Follow ``optimizer.state`` edited from outside: replaced or cleared
        (``optimizer.state = defaultdict(dict)``, ``.clear()``), or a param's entry
        deleted or replaced. A param whose entry is gone or empty starts afresh, as
        with torch; one given a new entry continues from it.

        Noticed when the dict or any of its entries changed (checked at every step: a
        cleared state read back through the defaultdict, ``optimizer.state[p].get(...)``,
        holds new empty entries). Not noticed: a tensor replaced inside a param's
        entry; edit the entry's tensors in place instead.
        """
        if self._state_unchanged():
            return
        for flat in states:
            for i, param in enumerate(flat.params):
                entry = self.state.get(param)
                if entry is not None and entry is flat.handed_out[i]:
                    continue
                if not entry:
                    if flat.initialized[i]:
                        flat.reset_param_state(i)
                    self.state.pop(param, None)
                    continue
                check_param_state(i, param, entry)
                flat.load_param_state(i, entry)
                self.state[param] = flat.param_state(i)
        self._remember_state()

    def _remember_state(self) -> None:
        self._state_seen, self._state_entries = self.state, list(self.state.values())

    def _state_unchanged(self) -> bool:
        """Whether ``self.state`` is the dict, with the entries in the order, that
        :meth:`_remember_state` saw: one C-level pass over its values, no tensor
        hashed (a scratch timing: 20 us more a step for 1000 params, 165 -> 185 us)."""
        return (
            self.state is self._state_seen
            and len(self.state) == len(self._state_entries)
            and all(map(operator.is_, self.state.values(), self._state_entries))
        )

    def _plans(self) -> list[tuple[FlatState, StepPlan]]:
        """Every flat state's plan, checked before anything is updated."""
        for _ in range(2):
            try:
                states = self._current_states()
                self._follow_state_edits(states)
                return [(flat, plan) for flat in states if (plan := flat.plan()) is not None]
            except Relayout:
                # A param moved to another device or dtype (`model.to(...)`).
                self._lay_out()
        raise RuntimeError("the flat states could not be laid out")

    # -------------------------------------------------------------------- step
    @staticmethod
    def profile_hook_step(func: Callable[..., Any]) -> Callable[..., Any]:
        """torch's wrapper of ``step`` (``Optimizer.profile_hook_step``): the same
        pre- and post-hooks, global ones included, and the same profiler event, which
        :class:`~triton_adadelta.reader.record_function` records at a C call's cost
        when nothing listens (torch's costs 150-200 us of a cold 1000-param step)."""

        def hooked(self: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            for pre_hook in chain(_global_optimizer_pre_hooks.values(), self._optimizer_step_pre_hooks.values()):
                result = pre_hook(self, args, kwargs)
                if result is not None:
                    if isinstance(result, tuple) and len(result) == 2:
                        args, kwargs = result
                    else:
                        raise RuntimeError(
                            f"{func} must return None or a tuple of (new_args, new_kwargs), but got {result}."
                        )
            out = func(*args, **kwargs)
            self._optimizer_step_code()
            for post_hook in chain(self._optimizer_step_post_hooks.values(), _global_optimizer_post_hooks.values()):
                post_hook(self, args, kwargs)
            return out

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            name = f"Optimizer.step#{args[0].__class__.__name__}.step"
            if torch.compiler.is_compiling():
                # Dynamo traces torch's own profiler context in a `with` (as torch's
                # optimizers use it), not ours, whose __enter__ it would break the graph on.
                with torch.autograd.profiler.record_function(name):
                    return hooked(args[0], args, kwargs)
            with record_function(name):
                return hooked(args[0], args, kwargs)

        return wrapper

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
        if torch.compiler.is_compiling():
            params = [param for group in self.param_groups for param in group["params"]]
            if any(map(is_dtensor, params)):
                # A custom op takes no DTensor without sharding rules: run eagerly.
                self._eager_update(grad_scale, found_inf)
                return loss
            # One opaque op (triton_adadelta/compiled.py): nothing below is traced.
            compiled.step_(params, [param.grad for param in params], grad_scale, found_inf, self._handle)
            return loss
        self._update(self._plans(), grad_scale, found_inf, given=False)
        return loss

    @torch.compiler.disable
    def _eager_update(self, grad_scale: torch.Tensor | None, found_inf: torch.Tensor | None) -> None:
        self._update(self._plans(), grad_scale, found_inf, given=False)

    def _step_given(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
    ) -> None:
        """The step of ``triton_adadelta::step_``: ``params`` and ``grads`` are every
        param of the groups, in order, and its grad, as a compiled graph holds them.
        Where they are the params and grads themselves (the usual case: the graph
        updates its inputs in place), this is the eager step; else the given tensors
        are updated, from the same state."""
        own = [param for group in self.param_groups for param in group["params"]]
        if len(params) != len(own):
            raise ValueError(f"triton_adadelta::step_ got {len(params)} params for an optimizer of {len(own)}")
        own_grads = [param.grad for param in own]
        in_place = all(
            a.data_ptr() == b.data_ptr() and (g is None) == (h is None) and (g is None or g.data_ptr() == h.data_ptr())
            for a, b, g, h in zip(params, own, grads, own_grads)
        )
        if in_place:
            plans = self._plans()
        else:
            plans = []
            self._follow_state_edits(self._current_states())
        position = {id(param): k for k, param in enumerate(own)}
        for flat in self._flat_states:
            indices = [position[id(param)] for param in flat.params]
            # The graph bumps the params' versions: edits from outside are found by value.
            flat.sync_master_by_value([params[k] for k in indices])
            if not in_place:
                plan = flat.plan_given([params[k] for k in indices], [grads[k] for k in indices])
                if plan is not None:
                    plans.append((flat, plan))
        self._update(plans, grad_scale, found_inf, given=True)

    def _update(
        self,
        plans: list[tuple[FlatState, StepPlan]],
        grad_scale: torch.Tensor | None,
        found_inf: torch.Tensor | None,
        *,
        given: bool,
    ) -> None:
        """Launch the planned updates (every grad already checked, so a bad grad has
        changed nothing) and advance the step counts."""
        _check_step_scalars(self.param_groups)
        handed_out = False  # (else the state is as _plans found it, unchanged)
        for flat, plan in plans:
            device = flat.device
            if not given:
                flat.sync_master()
            for stand_in, source in plan.refresh:
                stand_in.copy_(source)
            stochastic = flat.stochastic_rounding
            rounds = stochastic or flat.compressed_state or flat.quantized_state
            seed = self._next_rounding_seed() if rounds else 0
            update_(
                plan.table,
                flat.square_avg,
                flat.acc_delta,
                hparams=flat.hparams(self.param_groups),
                master=flat.master,
                stochastic_rounding=stochastic,
                seed=seed,
                grad_scale=None if grad_scale is None else grad_scale.to(device, non_blocking=True),
                found_inf=None if found_inf is None else found_inf.to(device, non_blocking=True),
                square_avg_scale=flat.square_avg_scale,
                acc_delta_scale=flat.acc_delta_scale,
            )
            for param, stand_in in plan.write_back:
                param.copy_(stand_in)
            flat.note_written(plan, given=given)
            handed_out = self._advance_steps(flat, plan, found_inf) or handed_out
        if handed_out:
            self._remember_state()

    def _next_rounding_seed(self) -> int:
        """The seed of a launch that rounds stochastically: the first is drawn from
        torch's generator (so ``torch.manual_seed`` makes a run reproducible), each later
        one is the first plus the launches since times an odd stride, mod 2**31 - 2, in
        [1, 2**31 - 2]. Both numbers are keys of the first param group, so every
        checkpoint of the groups holds them: a resumed run rounds as the uninterrupted
        one would, whatever torch's RNG state, and no step after the first draws from
        torch's generator."""
        group = self._draw_rounding_seed()
        launches = _count_launch(group)
        return 1 + (group[ROUNDING_SEED] - 1 + launches * _ROUNDING_SEED_STRIDE) % (2**31 - 2)

    def _draw_rounding_seed(self) -> dict[str, Any]:
        """The first param group, with its rounding seed drawn if it had none."""
        group = self.param_groups[0]
        if group.get(ROUNDING_SEED) is None:
            group[ROUNDING_SEED] = int(torch.randint(1, 2**31 - 1, (1,)).item())
            group[ROUNDING_LAUNCHES] = torch.tensor(0)
        return group

    def _advance_steps(self, flat: FlatState, plan: StepPlan, found_inf: torch.Tensor | None) -> bool:
        """Advance the step counts of the params that had a grad (one small op), and give
        the params updated for the first time their state, as torch does at the first
        grad. Returns whether any was given its state."""
        # found_inf is never read on the host: the counts advance by (found_inf == 0).
        increment = 1 if found_inf is None else (found_inf.to(flat.device) == 0).to(torch.float32)
        if plan.steps_index is None:
            flat.steps.add_(increment)
        else:
            flat.steps.index_add_(
                0, plan.steps_index, torch.ones_like(plan.steps_index, dtype=torch.float32) * increment
            )
        if flat.all_initialized:
            return False
        initialized = flat.initialized
        handed_out = False
        for i in plan.segments:
            if not initialized[i]:
                initialized[i] = True
                self.state[flat.params[i]] = flat.param_state(i)
                handed_out = True
        flat.all_initialized = all(initialized)
        return handed_out

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all optimized params, as :meth:`torch.optim.Optimizer.zero_grad`.

        The same semantics, with C-level loops: ``set_to_none=True`` sets every grad
        to None; ``False`` zeroes the grads in place, one ``_foreach_zero_`` per
        (device, dtype), after detaching any that have autograd history. Once the
        native param reader is loaded, a group whose params are plain tensors (and,
        for ``False``, whose grads are contiguous CPU tensors with no autograd
        history) is done in one native pass instead: one memset and a version bump
        per grad, as ``grad.zero_()`` does.

        Args:
            set_to_none (bool): set grads to None instead of zeroing them
                (default: True). A param whose grad is None is skipped by ``step``.
        """
        if not hasattr(self, "_zero_grad_profile_name"):
            self._patch_step_function()
        # (Under a torch function mode, `param.grad = None` goes to the mode: not native.)
        zeroer = None if torch._C._is_torch_function_mode_enabled() else grad_zeroer()
        with record_function(self._zero_grad_profile_name):
            for group in self.param_groups:
                params = group["params"]
                # One native pass where every param and grad allows it; else nothing
                # changed, and the loops below do what torch's zero_grad does.
                if zeroer is not None and type(params) is list and zeroer(params, set_to_none) == 0:
                    continue
                if set_to_none:
                    list(map(setattr, params, repeat("grad"), repeat(None)))
                    continue
                grads = [grad for grad in map(_GRAD, params) if grad is not None]
                if any(map(_IS_SPARSE, grads)):
                    super().zero_grad(set_to_none)
                    return
                if any(map(_REQUIRES_GRAD, grads)) or any(map(_GRAD_FN, grads)):
                    for grad in grads:
                        if grad.grad_fn is not None:
                            grad.detach_()
                        else:
                            grad.requires_grad_(False)
                if len(set(map(_DTYPE, grads))) <= 1 and len(set(map(_GET_DEVICE, grads))) <= 1:
                    groups = [grads] if grads else []
                else:
                    by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
                    for grad in grads:
                        by_key.setdefault((grad.device, grad.dtype), []).append(grad)
                    groups = list(by_key.values())
                for same in groups:
                    torch._foreach_zero_(same)

    # --------------------------------------------------------------- state_dict
    def state_dict(self) -> dict[str, Any]:
        """The optimizer's state in :class:`torch.optim.Adadelta`'s format.

        bf16 state (``state_dtype=torch.bfloat16``) is given as fp32 copies, which
        hold its values exactly: torch's Adadelta loads the dict, and loading it back
        here stores the same bf16 values, so a save and load resumes bit for bit.
        """
        state_dict = self._packed_state_dict()
        packed = state_dict["state"]
        for key, value in packed.items():
            dtypes = {name: getattr(value.get(name), "dtype", None) for name in ("square_avg", "acc_delta")}
            if _SCALE_KEYS & value.keys():
                # 8-bit state: the codes' values, in the param's shape; not the scales.
                # (A tensor put in the entry in place of its codes is saved as its values.)
                fp32 = {
                    name: dequantized(value[name], value[f"{name}_scale"]) if dtype == torch.uint8 else value[name].float()
                    for name, dtype in dtypes.items()
                }
                packed[key] = {k: v for k, v in value.items() if k not in _SCALE_KEYS} | fp32
            elif torch.bfloat16 in dtypes.values():
                # A new dict: torch's packing hands out the optimizer's own per-param dicts.
                packed[key] = {**value, **{name: value[name].float() for name in dtypes}}
        return self._after_post_hooks(_saveable_state_dict(state_dict))

    def _packed_state_dict(self) -> dict[str, Any]:
        """``torch.optim.Optimizer.state_dict``'s pre hooks and packing, without its
        post hooks: those get the dict in its saved form, after this optimizer's
        conversion (:meth:`_after_post_hooks`), as torch hands its hooks the dict it
        returns. (Packed here, not by swapping the hooks out around torch's method: a
        hook registered by a pre hook, a pre hook that saves too, or another thread
        would then have found the swapped-in dict.)"""
        self._seed_before_saving()
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        # The groups as torch packs them: params by their index in the order of the groups.
        index: dict[int, int] = {}
        param_groups = []
        for group in self.param_groups:
            for param in group["params"]:
                index.setdefault(id(param), len(index))
            packed = {key: value for key, value in group.items() if key != "params"}
            packed["params"] = [index[id(param)] for param in group["params"]]
            param_groups.append(packed)
        state = {(index[id(key)] if isinstance(key, torch.Tensor) else key): value for key, value in self.state.items()}
        return {"state": state, "param_groups": param_groups}

    def _after_post_hooks(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """``state_dict`` passed through the state_dict post hooks, as torch's
        ``Optimizer.state_dict`` ends: a hook's result, where not None, replaces it."""
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            hook_result = post_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        return state_dict

    def _seed_before_saving(self) -> None:
        """A checkpoint taken before the first launch that rounds holds the seed too."""
        if self.param_groups and any(_group_rounds(group) for group in self.param_groups):
            self._draw_rounding_seed()

    def compact_state_dict(self) -> dict[str, Any]:
        """:meth:`state_dict` with 8-bit state as its codes and scales.

        For ``state_dtype=torch.uint8`` each param's ``square_avg`` and ``acc_delta``
        are its uint8 codes (1 B per element, in the param's shape) and
        ``square_avg_scale`` / ``acc_delta_scale`` one fp32 scale per 256 of them:
        2.03 B per param for both, against 8 in :meth:`state_dict`'s fp32 form.
        :meth:`load_state_dict` takes either form and restores the same codes; only
        this optimizer reads the compact one. Other state is as in :meth:`state_dict`.

        Raises:
            ValueError: for 8-bit state of DTensor params (FSDP2), whose scales belong
                to each rank's shard: save :meth:`state_dict` instead, which
                ``torch.distributed.checkpoint`` saves sharded and which resumes bit
                for bit.
        """
        for flat in self._flat_states:
            if flat.quantized_state and flat.sharded:
                raise ValueError(
                    "compact_state_dict() is for 8-bit state of plain params; the 8-bit state of DTensor (FSDP2) "
                    "params is saved through state_dict() (fp32 DTensors, which torch.distributed.checkpoint "
                    "saves sharded; loading them back restores the same values)"
                )
        state_dict = self._packed_state_dict()
        packed = state_dict["state"]
        for key, value in packed.items():
            if getattr(value.get("square_avg"), "dtype", None) == torch.bfloat16:
                packed[key] = {**value, **{name: value[name].float() for name in ("square_avg", "acc_delta")}}
        return self._after_post_hooks(_saveable_state_dict(state_dict))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load an optimizer state from ours or :class:`torch.optim.Adadelta`'s.

        Loading is atomic: the whole dict is checked first, and a dict that does not
        fit raises ``ValueError`` naming the mismatch and changes nothing (params,
        state, step counts and groups). A ``step`` may be what torch accepts: a
        1-element tensor of any shape, an int or a float. Group values are checked as
        the constructor checks them. fp32 state is never downcast: it is copied into
        the optimizer's own state buffers.

        Args:
            state_dict (dict): optimizer state, as returned by :meth:`state_dict`.

        Raises:
            ValueError: the dict does not fit this optimizer, saying why.
        """
        if not isinstance(state_dict, dict):
            raise ValueError(f"an optimizer state_dict is a dict, not a {type(state_dict).__name__}")
        state_dict = state_dict.copy()
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            hook_result = pre_hook(self, state_dict)
            if hook_result is not None:
                state_dict = hook_result
        new_groups, loaded = self._checked_state_dict(state_dict)
        # The saved rounding seeds, or (torch's dict) this optimizer's own, go on.
        for key in (ROUNDING_SEED, ROUNDING_LAUNCHES):
            new_groups[0].pop(key, None)
        rounding = _checked_rounding(state_dict["param_groups"][0], "param group 0 of the state_dict")
        new_groups[0].update(rounding or _checked_rounding(self.param_groups[0], "param group 0"))
        if ROUNDING_LAUNCHES in new_groups[0]:
            new_groups[0][ROUNDING_LAUNCHES] = torch.tensor(new_groups[0][ROUNDING_LAUNCHES])  # (see _count_launch)

        # Everything fits. Should laying the state out fail all the same (out of
        # memory), the optimizer is put back as it was.
        kept = {
            name: self.__dict__[name]
            for name in ("state", "param_groups", "_flat_states", "_laid_out", "_laid_out_state_dtypes", "_left_out",
                         "_state_seen", "_state_entries")  # fmt: skip
        }
        try:
            self.__setstate__({"state": defaultdict(dict), "param_groups": new_groups})
            for flat in self._lay_out(loading=frozenset(loaded)):
                for i, param in enumerate(flat.params):
                    value = loaded.get(id(param))
                    if value is None:
                        flat.reset_param_state(i)
                    else:
                        flat.load_param_state(i, value)
                        self.state[param] = flat.param_state(i)
        except BaseException:
            self.__dict__.update(kept)
            raise
        self._remember_state()
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def _checked_state_dict(self, state_dict: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[int, dict[str, Any]]]:
        """Check a whole state_dict against this optimizer, changing nothing.

        Returns:
            The new param groups (the saved ones, holding this optimizer's params) and
            each param's state to load, by ``id(param)`` (a step as a 0-d fp32 tensor).

        Raises:
            ValueError: the first mismatch found.
        """
        if "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError("an optimizer state_dict has the keys 'state' and 'param_groups'")
        saved_state, saved_groups = state_dict["state"], _loaded_groups(state_dict["param_groups"])
        if not isinstance(saved_state, dict):
            raise ValueError(f"'state' of a state_dict is a dict, not a {type(saved_state).__name__}")
        if not isinstance(saved_groups, (list, tuple)) or not all(isinstance(g, dict) for g in saved_groups):
            raise ValueError("'param_groups' of a state_dict is a list of dicts")
        groups = self.param_groups
        if len(groups) != len(saved_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        for index, (group, saved) in enumerate(zip(groups, saved_groups)):
            _check_group_values(saved, f"param group {index} of the state_dict")
            if not isinstance(saved["params"], (list, tuple)) or len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group"
                )
            try:
                _check_scalars_fit(saved, (p.dtype for p in group["params"]), read_tensors=True)
            except (RuntimeError, OverflowError) as error:
                raise ValueError(f"param group {index} of the state_dict: {error}") from error
        try:
            id_map = dict(
                zip(
                    chain.from_iterable(g["params"] for g in saved_groups),
                    chain.from_iterable(g["params"] for g in groups),
                )
            )
        except TypeError as error:  # an unhashable param id
            raise ValueError(f"the param ids of the state_dict's groups are not keys: {error}") from error
        loaded: dict[int, dict[str, Any]] = {}
        for key, value in saved_state.items():
            if key not in id_map:
                raise ValueError(f"loaded state dict has state for param {key!r}, which no param group lists")
            param = id_map[key]
            if isinstance(value, dict) and not value:
                continue  # an empty state: the param starts afresh, as with torch
            loaded[id(param)] = _loaded_param_state(key, param, value)
        try:
            copied_groups = deepcopy(list(saved_groups))
        except Exception as error:  # deepcopy raises what the object's own __deepcopy__ raises
            raise ValueError(f"the state_dict's param groups cannot be copied: {error}") from error
        new_groups = []
        for group, saved in zip(groups, copied_groups):
            saved["params"] = group["params"]
            if "param_names" in group and "param_names" not in saved:
                saved["param_names"] = group["param_names"]
            new_groups.append(saved)
        return new_groups, loaded
