"""Flat state: the optimizer's own buffers, and the segment table of each step.

A :class:`FlatState` holds the AdaDelta state (``square_avg``, ``acc_delta`` and,
with master weights, the fp32 master copy) of the params of one (device, dtype,
mode) as flat buffers, one segment per param. Params and grads are never touched
here: they stay where the model, autograd, DDP or ZeRO put them. Each step,
:meth:`FlatState.plan` reads their addresses into a
:class:`~triton_adadelta.kernels.adadelta.SegmentTable`, cached while the addresses
stay the same, so that one launch updates every param that has a grad.

Segments start on a 16-byte vector of the param dtype (so the state's are 16-byte
aligned too); the padding between them is zero and no update touches it.
"""

from __future__ import annotations

import array
import operator
import sys
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import torch

from .kernels.adadelta import (
    ALIGNED_ROW,
    GRAD_ROW,
    GROUP_ROW,
    LOW_PRECISION,
    LR,
    N_HPARAMS,
    N_TABLE_ROWS,
    NUMEL_ROW,
    PARAM_ROW,
    QUANT_BLOCK,
    STATE_ALIGNMENT,
    STATE_ROW,
    SegmentTable,
    state_dtype_for,
)
from .quant import dequantize, quantize_
from .reader import READ_NEW_GRADS, READ_NEW_PARAMS, READ_SAME, ParamReader, param_reader

__all__ = ["FlatState", "StepPlan", "check_param_state", "hparams_table", "state_key", "table_for_tensors"]

# Attribute readers for the per-step checks, applied with map() at C speed.
_DATA_PTR = torch.Tensor.data_ptr
_IS_CONTIGUOUS = torch.Tensor.is_contiguous
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_DTYPE = operator.attrgetter("dtype")
_GET_DEVICE = torch.Tensor.get_device
_NUMEL = torch.Tensor.numel

STATE_KEYS = ("step", "square_avg", "acc_delta")


# DTensor's class, once an eager call has seen torch.distributed.tensor imported.
_dtensor_class: type | None = None


def dtensor_type_of(tensor: object) -> type | None:
    """``torch.distributed.tensor.DTensor`` where ``tensor`` is one, else None.

    Eagerly, the class comes from ``sys.modules`` (no DTensor exists before that module
    is imported) and is remembered. A step compiled by torch.compile reads only the
    remembered class: dynamo's trace of ``sys.modules`` failed ("dictionary changed size
    during iteration") while the compile itself imported modules. The constructor and
    ``add_param_group`` see every param eagerly first.
    """
    global _dtensor_class
    if not torch.compiler.is_compiling() and _dtensor_class is None:
        _dtensor_class = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return _dtensor_class if _dtensor_class is not None and isinstance(tensor, _dtensor_class) else None


def is_dtensor(tensor: object) -> bool:
    """Whether ``tensor`` is a DTensor (FSDP2's and tensor parallelism's params)."""
    return dtensor_type_of(tensor) is not None


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard, the plain tensor its in-place ops write; else ``tensor``."""
    return tensor._local_tensor if is_dtensor(tensor) else tensor  # type: ignore[attr-defined]


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Complex params are updated as their real and imaginary parts, as torch does."""
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def state_key(
    param: torch.Tensor, group: dict[str, Any]
) -> tuple[torch.device, torch.dtype, bool, bool, torch.dtype, bool]:
    """Params with the same key share a :class:`FlatState` and a launch.

    The key is (device, dtype, master weights, stochastic rounding, state dtype,
    DTensor): the two modes apply to bf16/fp16 params only. Complex params have states
    of their own, and so do DTensor params (their state is handed out as DTensors).
    """
    low_precision = param.dtype in LOW_PRECISION
    return (
        param.device,
        param.dtype,
        bool(group["master_weights"]) and low_precision,
        bool(group["stochastic_rounding"]) and low_precision,
        group.get("state_dtype", torch.float32),
        is_dtensor(param),
    )


def _shaped_view(flat: torch.Tensor, offset: int, numel: int, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """A segment of ``flat`` viewed with a param's shape (and complex dtype)."""
    piece = flat[offset : offset + numel]
    if dtype.is_complex:
        return torch.view_as_complex(piece.view(*shape, 2))
    return piece.view(shape)


def _real_flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D real view (or copy, if non-contiguous) of ``tensor``."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.reshape(-1)


def check_param_state(key: object, param: torch.Tensor, value: object) -> None:
    """Check that ``value`` is an Adadelta state for ``param`` (torch's or ours).

    Raises:
        ValueError: naming the param (by its key in the state_dict) and the mismatch.
    """
    if not isinstance(value, dict):
        raise ValueError(f"state of param {key} is a {type(value).__name__}, not a dict")
    sharded = is_dtensor(param)
    missing = [name for name in STATE_KEYS if name not in value]
    if missing:
        raise ValueError(f"state of param {key} lacks {missing}: not an Adadelta state_dict")
    for name in ("square_avg", "acc_delta", "master_param"):
        if name not in value:
            continue
        tensor = value[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state '{name}' of param {key} is a {type(tensor).__name__}, not a tensor")
        if is_dtensor(tensor) != sharded:
            raise ValueError(
                f"state '{name}' of param {key} is a {type(tensor).__name__} but the param is a "
                f"{type(param).__name__}: a DTensor param (FSDP2) takes DTensor state, as "
                "torch.distributed.checkpoint's get_optimizer_state_dict gives it"
            )
        if sharded and (tensor.device_mesh != param.device_mesh or tensor.placements != param.placements):
            raise ValueError(
                f"state '{name}' of param {key} is sharded as {tensor.placements} but the param as "
                f"{param.placements}; load it through torch.distributed.checkpoint's set_optimizer_state_dict"
            )
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"state '{name}' of param {key} has shape {tuple(tensor.shape)} "
                f"but the param has shape {tuple(param.shape)}"
            )
        if tensor.dtype == torch.uint8 and name != "master_param":
            if sharded:
                # Each rank's scales cover its own shard's blocks: no DTensor holds them.
                raise ValueError(
                    f"state '{name}' of param {key} holds 8-bit codes of a DTensor param: load "
                    "state_dict()'s fp32 form (torch.distributed.checkpoint saves it sharded)"
                )
            # 8-bit state's own form (Adadelta.compact_state_dict): codes and their scales.
            _check_scales(key, name, tensor, value.get(f"{name}_scale"))
            continue
        if name != "master_param" and f"{name}_scale" in value:
            # Codes cast to another dtype (a tool that upcasts every tensor) would load
            # as values, far from the state's: 8-bit codes are only read as uint8.
            raise ValueError(
                f"state '{name}' of param {key} comes with '{name}_scale', so it should hold 8-bit codes "
                f"(compact_state_dict's form), but it is {tensor.dtype}, not torch.uint8: cast the codes "
                f"back to uint8, or load state_dict()'s fp32 form"
            )
        if tensor.is_complex() != param.is_complex() or not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"state '{name}' of param {key} is {tensor.dtype} but the param is {param.dtype}")
    if torch.as_tensor(value["step"]).numel() != 1:
        raise ValueError(f"state 'step' of param {key} must be a scalar")


def _check_scales(key: object, name: str, codes: torch.Tensor, scales: object) -> None:
    """8-bit codes come with one fp32 scale per QUANT_BLOCK of them, under ``{name}_scale``,
    each one the encoder can write: 0, NaN, or a power of two from 2**-126 to 2**127."""
    n_blocks = -(-codes.numel() // QUANT_BLOCK)
    if not isinstance(scales, torch.Tensor) or scales.dtype != torch.float32 or scales.numel() != n_blocks:
        given = (f"{scales.dtype} of {scales.numel()} elements" if isinstance(scales, torch.Tensor)
                 else "nothing" if scales is None else type(scales).__name__)  # fmt: skip
        raise ValueError(
            f"state '{name}' of param {key} holds 8-bit codes, which need '{name}_scale': "
            f"{n_blocks} fp32 scales (one per {QUANT_BLOCK} codes), not {given}"
        )
    bits = scales.detach().reshape(-1).view(torch.int32)
    power_of_two = (bits & 0x7FFFFF == 0) & (bits >= 1 << 23) & (bits < 255 << 23)
    invalid = ~(power_of_two | (bits == 0) | scales.detach().reshape(-1).isnan())
    if bool(invalid.any()):
        first = int(invalid.nonzero()[0, 0])
        raise ValueError(
            f"state '{name}_scale' of param {key} holds {int(invalid.sum())} scales that no 8-bit state has, "
            f"the first {scales.reshape(-1)[first].item()!r} (block {first}): a scale is 0, NaN or a power "
            "of two from 2**-126 to 2**127"
        )


def _dtensor_like(local: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A DTensor of ``like``'s mesh, placements, shape and stride over ``local``."""
    return dtensor_type_of(like).from_local(  # type: ignore[union-attr]
        local, like.device_mesh, like.placements, run_check=False, shape=like.shape, stride=like.stride()
    )


def saveable(value: object) -> object:
    """``value``, or for a DTensor over a view at a storage offset (a DTensor param's
    fp32 state or master copy) the same DTensor with its wrapper at offset 0.

    torch pickles a DTensor whose own storage offset is not 0 (taken from its local
    tensor) through the wrapper's storage, which it does not have, so ``torch.save``
    and ``copy.deepcopy`` of a state_dict of such views failed ("invalid python
    storage"; torch 2.13). The new wrapper is made over a stand-in at offset 0, then
    given the view: DCP, ``to_local()`` and eager DTensor ops read the view. Only
    state_dicts hold them: ``optimizer.state`` keeps consistent DTensors, which
    ``torch.compile`` can trace (it cannot trace these).
    """
    if not is_dtensor(value) or value._local_tensor.storage_offset() == 0:  # type: ignore[attr-defined]
        return value
    local = value._local_tensor  # type: ignore[attr-defined]
    tensor = _dtensor_like(local.new_zeros(()).expand(local.shape), value)  # a stand-in at offset 0
    tensor._local_tensor = local
    return tensor


def dequantized(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """8-bit codes' fp32 values in the codes' shape; a DTensor of codes gives a DTensor
    of its mesh and placements, each rank decoding its own shard with its own scales."""
    local = local_tensor(codes)
    values = dequantize(local.reshape(-1), scales).view(local.shape)
    return _dtensor_like(values, codes) if is_dtensor(codes) else values


def _state_values(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A param's saved ``square_avg`` or ``acc_delta`` as a flat real tensor: 8-bit codes
    (with their ``_scale``) dequantized, anything else as it is."""
    tensor = local_tensor(state[name].detach())
    if tensor.dtype == torch.uint8:
        scales = state[f"{name}_scale"].detach()
        return dequantize(tensor.reshape(-1), scales.to(tensor.device).reshape(-1))
    return _real_flat(tensor)


def grad_mismatch(grad: torch.Tensor, param: torch.Tensor) -> Exception | None:
    """Why ``grad`` cannot update ``param`` (None: it can)."""
    if grad.is_sparse:
        return RuntimeError("Adadelta does not support sparse gradients")
    if grad.layout != torch.strided:
        return ValueError(f"grad of layout {grad.layout} is not supported; use a strided (dense) grad")
    if grad.shape != param.shape or grad.dtype != param.dtype or grad.device != param.device:
        return ValueError(
            f"grad of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} does not match "
            f"its param of shape {tuple(param.shape)}, {param.dtype} on {param.device}"
        )
    return None


def hparams_table(
    groups: tuple[tuple[float | None, float, float, float, bool], ...], dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """The hyper-parameter table: a row per group of ``(lr, rho, eps, weight_decay, maximize)``.

    ``lr`` None stands for a tensor lr, copied into the ``LR`` column on the device
    at each step. Python floats are rounded to ``dtype`` once, as ATen rounds a
    scalar; ``1 - rho`` is formed in double first, as torch does.
    """
    rows = [
        [lr or 0.0, rho, 1.0 - rho, eps, weight_decay, float(maximize), float(lr is None), 0.0]
        for lr, rho, eps, weight_decay, maximize in groups
    ]
    return torch.tensor(rows, dtype=dtype).reshape(-1, N_HPARAMS).to(device)


class Relayout(Exception):
    """A param moved to another device or dtype: the optimizer must lay its state out again."""


@dataclass
class _Pieces:
    """The parts of a table that depend only on which segments have a grad."""

    segments: list[int]
    static: torch.Tensor  # int64 [N_TABLE_ROWS, 2 * len(segments)], address rows empty
    piece_bytes: torch.Tensor  # int64 [len(segments), 2]: where each bulk and tail starts
    numels: torch.Tensor  # int64 [2 * len(segments)], on the host
    steps_index: torch.Tensor | None  # segments on the state's device (None: all)
    cache: dict[str, Any] = field(default_factory=dict)  # shared by its tables: the block map


def _static_pieces(
    segments: list[int],
    offsets: torch.Tensor,
    numels: torch.Tensor,
    groups: torch.Tensor,
    dtype: torch.dtype,
    device: torch.device,
    n_segments: int,
    alignment: int = STATE_ALIGNMENT,
) -> _Pieces:
    """Split each segment into its bulk, a multiple of ``alignment`` elements (STATE_ALIGNMENT,
    or QUANT_BLOCK for 8-bit state), and its short tail (two pieces)."""
    index = torch.tensor(segments, dtype=torch.int64)
    numel = numels[index]
    bulk = numel - numel % alignment
    static = torch.zeros(N_TABLE_ROWS, 2 * len(segments), dtype=torch.int64)
    static[STATE_ROW, 0::2] = offsets[index]
    static[STATE_ROW, 1::2] = offsets[index] + bulk
    static[NUMEL_ROW, 0::2] = bulk
    static[NUMEL_ROW, 1::2] = numel - bulk
    static[GROUP_ROW, 0::2] = groups[index]
    static[GROUP_ROW, 1::2] = groups[index]
    all_segments = len(segments) == n_segments
    return _Pieces(
        segments=segments,
        static=static,
        piece_bytes=torch.stack([torch.zeros_like(bulk), bulk * torch.empty((), dtype=dtype).element_size()], 1),
        numels=static[NUMEL_ROW].clone(),
        steps_index=None if all_segments else index.to(device),
    )


def _int64_tensor(values: list[int]) -> torch.Tensor:
    # array -> frombuffer: a third of the time torch.tensor takes on a list of ints.
    return torch.frombuffer(array.array("q", values), dtype=torch.int64)


def _make_table(
    pieces: _Pieces,
    param_ptrs: list[int],
    grad_ptrs: list[int],
    written: list[torch.Tensor],
    read: list[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> SegmentTable:
    """Fill the address rows of ``pieces`` (one entry per segment with a grad)."""
    # Few ops, each writing its rows in place: this runs whenever an address changes.
    table = pieces.static.clone()
    param, grad = _int64_tensor(param_ptrs), _int64_tensor(grad_ptrs)
    torch.add(param.unsqueeze(1), pieces.piece_bytes, out=table[PARAM_ROW].view(-1, 2))
    torch.add(grad.unsqueeze(1), pieces.piece_bytes, out=table[GRAD_ROW].view(-1, 2))
    # The bulk takes the hinted (128-bit) branch when param and grad are 16-byte
    # aligned; the tail, shorter than a vector, never does.
    torch.eq(torch.bitwise_or(param, grad).bitwise_and_(15), 0, out=table[ALIGNED_ROW, 0::2])
    return _segment_table(pieces, table, written, read, dtype, device)


def _segment_table(
    pieces: _Pieces,
    table: torch.Tensor,
    written: list[torch.Tensor],
    read: list[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> SegmentTable:
    # (On the CPU the table is the host table itself, not a copy.)
    return SegmentTable(
        pieces=table if device.type == "cpu" else table.to(device),
        numels=pieces.numels,
        param_dtype=dtype,
        written=written,
        read=read,
        cache=pieces.cache,
    )


def table_for_tensors(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    *,
    offsets: list[int] | None = None,
    groups: list[int] | None = None,
    alignment: int = STATE_ALIGNMENT,
) -> tuple[SegmentTable, int]:
    """A segment table over contiguous ``params`` and ``grads`` (for tests and benchmarks).

    Args:
        params, grads: contiguous tensors of one device and real dtype, pairwise the same size.
        offsets: each param's offset in the flat state (default: packed, aligned).
        groups: each param's row of the hyper-parameter table (default: 0).
        alignment: where segments start and bulks end, in elements: ``STATE_ALIGNMENT``,
            or ``QUANT_BLOCK`` for 8-bit state.

    Returns:
        The table, and the number of flat state elements it needs.
    """
    dtype, device = params[0].dtype, params[0].device
    numels = [param.numel() for param in params]
    if offsets is None:
        offsets, end = [], 0
        for numel in numels:
            offsets.append(end)
            end += -(-numel // alignment) * alignment
    elif any(offset % alignment for offset in offsets):
        # The kernel's aligned branch promises 16-byte-aligned state (bf16 state
        # included) and whole words of the params' noise for each piece; 8-bit state,
        # whole quant blocks.
        raise ValueError(f"state offsets must be multiples of {alignment} elements")
    n_state = max((offset + numel for offset, numel in zip(offsets, numels)), default=0)
    pieces = _static_pieces(
        list(range(len(params))),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(numels, dtype=torch.int64),
        torch.tensor(groups or [0] * len(params), dtype=torch.int64),
        dtype,
        device,
        len(params),
        alignment,
    )
    table = _make_table(
        pieces, [p.data_ptr() for p in params], [g.data_ptr() for g in grads], list(params), list(grads), dtype, device
    )
    return table, n_state


@dataclass
class StepPlan:
    """What one step of a :class:`FlatState` launches, valid while nothing moves.

    A plan outlives its step but holds no grad: :meth:`FlatState.plan` binds the
    step's grads (``table.read``, ``refresh``) and :meth:`release` drops them, so a
    grad the user or ``zero_grad()`` lets go of is freed, as with torch.

    Args:
        table: the pieces of the params that have a grad.
        segments: those params' segment indices.
        steps_index: the same indices on the state's device (None: every segment).
        param_stand_ins: ``(k, stand-in)``: a contiguous stand-in for the ``k``-th
            param of the table, whose data is not contiguous.
        grad_stand_ins: the same for grads.
        refresh: this step's ``(stand-in, source)`` pairs, copied before the launch.
        write_back: this step's ``(param, stand-in)`` pairs, copied after the launch.
    """

    table: SegmentTable
    segments: list[int]
    steps_index: torch.Tensor | None
    param_stand_ins: list[tuple[int, torch.Tensor]]
    grad_stand_ins: list[tuple[int, torch.Tensor]]
    refresh: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    def bind(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> None:
        """Point this step's table at the grads (and stand-ins) to update from."""
        table = self.table
        table.read = grads if self.steps_index is None else [grads[i] for i in self.segments]
        self.refresh, self.write_back = [], []
        for k, stand_in in self.grad_stand_ins:
            self.refresh.append((stand_in, table.read[k]))
            table.read[k] = stand_in
        for k, stand_in in self.param_stand_ins:
            param = params[self.segments[k]]
            self.refresh.append((stand_in, param))
            self.write_back.append((param, stand_in))

    def release(self) -> None:
        """Drop the step's grads: the next step binds its own."""
        self.table.read = []
        self.refresh = []


class FlatState:
    """The AdaDelta state of the params of one (device, dtype, mode), in flat buffers.

    Args:
        params: the params, each once, all of one device and dtype. Their state
            starts at zero; the optimizer loads what it carries with
            :meth:`load_param_state`.
        groups: each param's param group index: its row of the hyper-parameter table.
        master_weights: keep an fp32 master copy (bf16/fp16 params).
        stochastic_rounding: round the param stores stochastically (bf16/fp16 params).
        state_dtype: ``torch.float32`` (fp64 for fp64 params); ``torch.bfloat16``
            for ``square_avg`` and ``acc_delta`` stored in bf16, rounded stochastically;
            or ``torch.uint8`` for 8-bit codes with one fp32 scale per ``QUANT_BLOCK``
            (:mod:`triton_adadelta.quant`), in ``square_avg_scale``/``acc_delta_scale``.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        groups: list[int],
        *,
        master_weights: bool = False,
        stochastic_rounding: bool = False,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not params:
            raise ValueError("a FlatState needs at least one param")
        self.device, self.param_dtype = params[0].device, params[0].dtype
        self.dtype = real_dtype_of(self.param_dtype)
        self.params = list(params)
        self.groups = list(groups)
        # DTensor params (FSDP2): the state holds each param's local shard only, and
        # the kernel updates the shard in place; state is handed out as DTensors.
        self.sharded = is_dtensor(params[0])
        local = self.local_tensors()
        self.shapes = [tensor.shape for tensor in local]
        self._param_numels = [tensor.numel() for tensor in local]
        # In real elements: a complex param is its real and imaginary parts.
        self.numels = [numel * (2 if param.is_complex() else 1) for numel, param in zip(self._param_numels, params)]
        # 8-bit state: segments on whole quant blocks, and each bulk too (see _static_pieces).
        self.quantized_state = state_dtype == torch.uint8
        self.alignment = QUANT_BLOCK if self.quantized_state else STATE_ALIGNMENT
        self.offsets: list[int] = []
        end = 0
        for numel in self.numels:
            self.offsets.append(end)
            end += -(-numel // self.alignment) * self.alignment
        self.n_elements = end
        self.index = {id(param): i for i, param in enumerate(params)}
        self._all_segments = list(range(len(params)))
        self._device_index = params[0].get_device()
        self.stochastic_rounding = stochastic_rounding

        if state_dtype in (torch.bfloat16, torch.uint8) and (self.dtype == torch.float64 or self.param_dtype.is_complex):
            # (The optimizer says so before anything changes; this guards the class itself.)
            raise ValueError(f"state_dtype={state_dtype} is for real fp32, bf16 and fp16 params, not {self.param_dtype}")
        if state_dtype not in (torch.bfloat16, torch.uint8):
            state_dtype = state_dtype_for(self.dtype)
        # bf16 state: rounded stochastically, so a step needs a seed.
        self.compressed_state = state_dtype == torch.bfloat16
        self.square_avg = torch.zeros(self.n_elements, dtype=state_dtype, device=self.device)
        self.acc_delta = torch.zeros(self.n_elements, dtype=state_dtype, device=self.device)
        # 8-bit state's scales, one per quant block (zero: a fresh block reads zeros).
        self.square_avg_scale: torch.Tensor | None = None
        self.acc_delta_scale: torch.Tensor | None = None
        if self.quantized_state:
            self.square_avg_scale = torch.zeros(self.n_elements // QUANT_BLOCK, dtype=torch.float32, device=self.device)
            self.acc_delta_scale = torch.zeros(self.n_elements // QUANT_BLOCK, dtype=torch.float32, device=self.device)
        self.master: torch.Tensor | None = None
        if master_weights:
            self.master = torch.zeros(self.n_elements, dtype=torch.float32, device=self.device)
            for i in range(len(params)):
                self._copy_param_to_master(i)
        # Per-param step counts (torch keeps one per param), advanced by each step.
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        # Whether a param has state yet: torch creates it at the param's first grad.
        self.initialized = [False] * len(params)
        self.all_initialized = False
        # The state dict given to `optimizer.state` for each param (None: none yet).
        self.handed_out: list[dict[str, torch.Tensor] | None] = [None] * len(params)

        self._offsets_t = torch.tensor(self.offsets, dtype=torch.int64)
        self._numels_t = torch.tensor(self.numels, dtype=torch.int64)
        self._groups_t = torch.tensor(self.groups, dtype=torch.int64)
        self._reset_caches()

    def _reset_caches(self) -> None:
        # What the last plan was made from: any change makes a new plan.
        self._plan: StepPlan | None = None
        # ids, not the grads themselves: holding a grad would keep it from being freed.
        self._seen_grad_ids: list[int] = []
        self._seen_ptrs: tuple[list[int], list[int], list[bool]] | None = None
        self._seen_grad_contiguous: list[bool] = []
        self._pieces: dict[tuple[int, ...], _Pieces] = {}
        # The native reader's output buffer; whether it holds the addresses the
        # current plan was made from; and the params' version counters it read.
        self._read_out: torch.Tensor | None = None
        self._read_table: torch.Tensor | None = None
        self._read_args: tuple[int, ...] = ()
        self._read_valid = False
        self._read_versions: list[int] | None = None
        self._hparams: torch.Tensor | None = None
        self._hparams_key: Any = None
        # The params' version counters as of the master copy (None: no master).
        local = self.local_tensors()
        self._versions = list(map(_VERSION, local)) if self.master is not None else None
        self._param_ptrs = list(map(_DATA_PTR, local))

    def __getstate__(self) -> dict[str, Any]:
        # A copy (deepcopy, pickle) has other addresses: it plans afresh.
        state = dict(self.__dict__)
        for name in (
            "_plan", "_seen_grad_ids", "_seen_ptrs", "_seen_grad_contiguous", "_pieces", "_hparams", "_hparams_key",
            "_read_out", "_read_table", "_read_args", "_read_valid", "_read_versions",
        ):  # fmt: skip
            state.pop(name, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_caches()

    def local_tensors(self) -> list[torch.Tensor]:
        """The tensors the kernel writes: the params, or their local shards (read
        afresh each time: FSDP2 may give a param a new local tensor)."""
        if not self.sharded:
            return self.params
        return [param._local_tensor for param in self.params]  # type: ignore[attr-defined]

    def local_grads(self) -> list[torch.Tensor | None]:
        """Each param's grad, or for DTensor params its local shard.

        Raises:
            ValueError: a DTensor param's grad that is not a DTensor of its mesh and
                placements (nothing is changed).
        """
        grads = list(map(_GRAD, self.params))
        if not self.sharded:
            return grads
        local: list[torch.Tensor | None] = []
        for param, grad in zip(self.params, grads):
            if grad is None:
                local.append(None)
            elif not is_dtensor(grad) or grad.device_mesh != param.device_mesh or grad.placements != param.placements:
                raise ValueError(
                    f"the grad of a DTensor param sharded as {param.placements} is a "
                    f"{type(grad).__name__}{' sharded as ' + str(grad.placements) if is_dtensor(grad) else ''}: "
                    "it must be a DTensor of the param's mesh and placements, as FSDP2 gives"
                )
            else:
                local.append(grad._local_tensor)
        return local

    # ------------------------------------------------------------------ state views
    def param_state(self, i: int) -> dict[str, torch.Tensor]:
        """torch's per-param state of segment ``i``, as live views of the flat state.

        The dict is remembered (:attr:`handed_out`), so that the optimizer can tell
        when ``optimizer.state`` no longer holds it. For a DTensor param the views are
        DTensors of its mesh and placements, whose local tensors are the views.
        """
        view = lambda flat: _shaped_view(flat, self.offsets[i], self.numels[i], self.shapes[i], self.param_dtype)  # noqa: E731
        if self.sharded:
            param, local_view = self.params[i], view
            view = lambda flat: _dtensor_like(local_view(flat), param)  # noqa: E731
        state = {"step": self.steps[i], "square_avg": view(self.square_avg), "acc_delta": view(self.acc_delta)}
        if self.quantized_state:
            # The codes (above, in the param's shape) and their scales: 8-bit state's own
            # form. A DTensor param's scales are its local shard's, as a plain tensor.
            state["square_avg_scale"] = self.square_avg_scale[self._scale_range(i)]
            state["acc_delta_scale"] = self.acc_delta_scale[self._scale_range(i)]
        if self.master is not None:
            state["master_param"] = view(self.master)
        self.handed_out[i] = state
        return state

    def _scale_range(self, i: int) -> slice:
        """Where segment ``i``'s quant blocks' scales are (8-bit state)."""
        first = self.offsets[i] // QUANT_BLOCK
        return slice(first, first + -(-self.numels[i] // QUANT_BLOCK))

    def load_param_state(self, i: int, state: dict[str, torch.Tensor], *, with_master: bool = True) -> None:
        """Copy one param's state in (shapes checked by the caller); fp32 is never
        downcast, except into bf16 state (rounded to nearest) or 8-bit state
        (quantized). 8-bit codes with their scales are stored as they are into 8-bit
        state, and taken as their values into any other."""
        start, end = self.offsets[i], self.offsets[i] + self.numels[i]
        self.steps[i].copy_(torch.as_tensor(state["step"], dtype=torch.float32))
        for name in ("square_avg", "acc_delta"):
            saved = local_tensor(state[name].detach())
            if self.quantized_state and saved.dtype == torch.uint8:
                # compact_state_dict's codes and scales (checked): stored as they are.
                # Requantizing their values could move a block one binade down (quant.py).
                getattr(self, name)[start:end].copy_(saved.reshape(-1))
                getattr(self, f"{name}_scale")[self._scale_range(i)].copy_(state[f"{name}_scale"].detach().reshape(-1))
                continue
            values = _state_values(state, name).to(self.device)
            if self.quantized_state:
                quantize_(values.float(), getattr(self, name)[start:end], getattr(self, f"{name}_scale")[self._scale_range(i)])
            else:
                getattr(self, name)[start:end].copy_(values)
        if self.master is not None and with_master and "master_param" in state:
            self.master[start:end].copy_(_real_flat(local_tensor(state["master_param"].detach()).to(self.device)))
            # The next step merges the param in (sync_master): a param that is the
            # master's rounding keeps the loaded master, one that differs wins, as an
            # edit does (a model not loaded from the same checkpoint, or a
            # torch.distributed.checkpoint partial load, whose master_param is the
            # optimizer's own, not the checkpoint's).
            self._versions[i] = -1
        self.initialized[i] = True
        self.all_initialized = all(self.initialized)

    def reset_param_state(self, i: int) -> None:
        """Forget one param's state, as a param that never had a grad."""
        start, end = self.offsets[i], self.offsets[i] + self.numels[i]
        self.steps[i].zero_()
        self.square_avg[start:end].zero_()
        self.acc_delta[start:end].zero_()
        if self.quantized_state:
            self.square_avg_scale[self._scale_range(i)].zero_()
            self.acc_delta_scale[self._scale_range(i)].zero_()
        if self.master is not None:
            self._copy_param_to_master(i)
        self.initialized[i] = False
        self.all_initialized = False

    def moved(self, i: int) -> bool:
        """Whether param ``i``'s data was replaced since this state last saw it."""
        return local_tensor(self.params[i]).data_ptr() != self._param_ptrs[i]

    def _copy_param_to_master(self, i: int, param: torch.Tensor | None = None) -> None:
        """Param ``i`` (or ``param``, a compiled graph's tensor in its place) into the master copy."""
        start, end = self.offsets[i], self.offsets[i] + self.numels[i]
        self.master[start:end].copy_(_real_flat(local_tensor(self.params[i] if param is None else param).detach()))

    def _merge_param_into_master(self, i: int, param: torch.Tensor | None = None) -> None:
        """A write to param ``i`` from outside, into the master copy, element by element.

        An element the write left at the master's rounding (the value the optimizer
        stored) keeps the master's fp32 value; any other takes the param's. So
        ``model.load_state_dict`` of the checkpoint that ``optimizer.load_state_dict``
        came from keeps the checkpoint's master copy, in whichever order they are
        called, and a real edit still wins.
        """
        start, end = self.offsets[i], self.offsets[i] + self.numels[i]
        master = self.master[start:end]
        flat = _real_flat(local_tensor(self.params[i] if param is None else param).detach())
        torch.where(flat == master.to(flat.dtype), master, flat.to(master.dtype), out=master)

    # --------------------------------------------------------------- each step
    def hparams(self, param_groups: list[dict[str, Any]]) -> torch.Tensor:
        """The hyper-parameter table of the groups, on the device (rebuilt when one changes).

        A tensor ``lr`` is copied in at every step, on the device: no host read.
        """
        key = tuple(
            (
                None if isinstance(group["lr"], torch.Tensor) else group["lr"],
                group["rho"],
                group["eps"],
                group["weight_decay"],
                bool(group["maximize"]),
            )
            for group in param_groups
        )
        if key != self._hparams_key or self._hparams is None:
            self._hparams = hparams_table(key, state_dtype_for(self.dtype), self.device)
            self._hparams_key = key
        for row, group in enumerate(param_groups):
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                self._hparams[row, LR].copy_(lr.reshape(()), non_blocking=True)
        return self._hparams

    def plan(self) -> StepPlan | None:
        """The table of this step: every param that has a grad, checked.

        Reads each param's grad and the data pointers of params and grads; when they
        are the objects and addresses of the last step, the last table is reused and
        nothing is uploaded.

        Returns:
            The plan, or None when no param has a grad.

        Raises:
            RuntimeError: for a sparse grad (torch's message); ValueError for a grad
                whose shape, dtype or device does not match its param, or a param
                whose shape no longer fits its state. Nothing is changed when it raises.
            Relayout: a param moved to another device or dtype.
        """
        reader = None if self.sharded else param_reader()
        if reader is not None:
            plan = self._plan_by_reader(reader)
            if plan is not None:
                return plan
        # Read in Python: the reader is not built, or this step has a case it leaves
        # to Python (a missing or non-contiguous grad, a moved param, a bad grad), or
        # the params are DTensors.
        self._read_valid, self._read_versions = False, None
        return self._plan_from(self.local_tensors(), self.local_grads(), follow_moves=True)

    def plan_given(self, params: list[torch.Tensor], grads: list[torch.Tensor | None]) -> StepPlan | None:
        """:meth:`plan` over tensors given in place of the params and their grads (a
        compiled graph's copies of them, of the same shapes, dtypes and device): they
        are checked and updated, and the params' own addresses and versions, by which
        the master copy follows outside edits, are left as they are."""
        self._read_valid, self._read_versions = False, None
        return self._plan_from(params, grads, follow_moves=False)

    def _plan_from(
        self, params: list[torch.Tensor], grads: list[torch.Tensor | None], *, follow_moves: bool
    ) -> StepPlan | None:
        param_ptrs = list(map(_DATA_PTR, params))
        contiguous = list(map(_IS_CONTIGUOUS, params))
        if not follow_moves or param_ptrs != self._param_ptrs or not all(contiguous):
            self._check_params(params, param_ptrs, follow_moves=follow_moves)
        try:
            grad_ptrs = list(map(_DATA_PTR, grads))
        except TypeError:  # some grads are None
            grad_ptrs = [0 if grad is None else grad.data_ptr() for grad in grads]
        except RuntimeError:  # a grad without a storage (sparse): say what is wrong
            self._raise_grad_mismatch(grads)
            raise
        grad_ids = list(map(id, grads))
        seen = (param_ptrs, grad_ptrs, contiguous)
        if grad_ids != self._seen_grad_ids or seen != self._seen_ptrs:
            # New grads (or a grad whose `.data` was replaced): check them. Their
            # addresses are often the last step's (the allocator reuses the memory
            # zero_grad() freed): then the table stands as it is.
            segments = self._check_grads(grads)
            # A new grad at an old address may be laid out otherwise (a transposed grad).
            grad_contiguous = (
                list(map(_IS_CONTIGUOUS, grads)) if len(segments) == len(grads) else
                [grads[i].is_contiguous() for i in segments]
            )  # fmt: skip
            if (
                seen != self._seen_ptrs
                or self._plan is None
                or self._plan.segments != segments
                or grad_contiguous != self._seen_grad_contiguous
            ):
                self._plan = (
                    self._make_plan(params, grads, segments, contiguous, param_ptrs, grad_ptrs) if segments else None
                )
            self._seen_grad_ids = grad_ids
            self._seen_ptrs = seen
            self._seen_grad_contiguous = grad_contiguous
        if self._plan is not None:
            self._plan.bind(params, grads)
        return self._plan

    def _plan_by_reader(self, reader: ParamReader) -> StepPlan | None:
        """The plan of a step in which every param has a contiguous grad that fits it,
        from one native pass (:mod:`triton_adadelta.reader`); None in any other case.

        The pass writes the addresses into a host table of its own, which on the CPU
        is the plan's table: a step whose grads moved runs no torch op to re-plan.
        """
        n = len(self.params)
        with_versions = self._versions is not None
        if self._read_out is None:
            pieces = self._pieces_for(self._all_segments)
            self._read_out = torch.zeros(3 if with_versions else 2, n, dtype=torch.int64)
            self._read_table = pieces.static.clone()
            self._read_args = (
                self._read_out.data_ptr(), int(with_versions), self._read_table.data_ptr(),
                pieces.piece_bytes.data_ptr(), PARAM_ROW, GRAD_ROW, ALIGNED_ROW,
            )  # fmt: skip
        found = reader(self.params, *self._read_args)
        if found == READ_SAME and self._read_valid:
            pass  # the addresses of the last plan: every steady step
        elif found in (READ_SAME, READ_NEW_GRADS, READ_NEW_PARAMS):
            if (found == READ_NEW_PARAMS or not self._read_valid) and self._read_out[0].tolist() != self._param_ptrs:
                self._read_valid = False
                return None  # a param's data was replaced: _check_params decides what follows
            if found == READ_NEW_GRADS and self._read_valid:
                # Only grads moved (torch's default zero_grad() loop, where the allocator
                # hands out other blocks): the pass rewrote the table in place.
                if self.device.type != "cpu":
                    self._plan.table.pieces = self._read_table.to(self.device)
            else:
                # A new table object: what is cached per table (the chunked path's
                # param views) must not outlive the param addresses it was made for.
                table = _segment_table(
                    self._pieces_for(self._all_segments), self._read_table, list(self.params), [], self.dtype,
                    self.device,
                )  # fmt: skip
                self._plan = StepPlan(table, self._all_segments, None, [], [])
            self._read_valid = True
            self._seen_ptrs = None  # the Python reads' record no longer describes the plan
        else:
            self._read_valid = False
            return None
        if with_versions:
            self._read_versions = self._read_out[2].tolist()
        # table.read stays empty: each grad is the grad of its param (table.written).
        return self._plan

    def _pieces_for(self, segments: list[int]) -> _Pieces:
        key = tuple(segments) if len(segments) != len(self.params) else ()
        pieces = self._pieces.get(key)
        if pieces is None:
            pieces = _static_pieces(
                segments, self._offsets_t, self._numels_t, self._groups_t, self.dtype, self.device, len(self.params),
                self.alignment,
            )  # fmt: skip
            self._pieces[key] = pieces
        return pieces

    def _check_params(self, params: list[torch.Tensor], param_ptrs: list[int], *, follow_moves: bool) -> None:
        """A param whose data was replaced (``p.data = ...``, ``model.to(...)``) still fits
        (with ``follow_moves``, the master copy takes its new data)."""
        if not follow_moves and len(params) != len(self.params):
            raise ValueError(f"{len(params)} tensors given for the {len(self.params)} params of a state")
        for i, param in enumerate(params):
            if param.device != self.device or param.dtype != self.param_dtype:
                raise Relayout()
            if param.shape != self.shapes[i]:
                raise ValueError(
                    f"a param of shape {tuple(self.shapes[i])} now has shape {tuple(param.shape)}, which its "
                    "optimizer state no longer fits; build a new optimizer (torch's would fail at this step too)"
                )
            if follow_moves and param_ptrs[i] != self._param_ptrs[i] and self.master is not None:
                # New data wins over the master copy.
                self._copy_param_to_master(i)
                self._versions[i] = param._version
        if follow_moves:
            self._param_ptrs = param_ptrs

    def _check_grads(self, grads: list[torch.Tensor | None]) -> list[int]:
        """Every grad can update its param: one C-level pass per property, then details.

        Returns:
            The segments whose param has a grad.
        """
        # (`None in grads` would compare tensors with ==: slow.)
        if any(map(operator.is_, grads, repeat(None))):
            segments = [i for i, grad in enumerate(grads) if grad is not None]
            present = [grads[i] for i in segments]
            numels = [self._param_numels[i] for i in segments]
        else:
            segments, present, numels = list(range(len(grads))), grads, self._param_numels
        # (A sparse grad has already failed at its data_ptr; get_device is an int, cheaper
        # to compare than a device.)
        if (
            all(map(operator.is_, map(_DTYPE, present), repeat(self.param_dtype)))
            and list(map(_NUMEL, present)) == numels
            and list(map(_GET_DEVICE, present)) == [self._device_index] * len(present)
        ):
            return segments
        self._raise_grad_mismatch(grads)
        return segments

    def _raise_grad_mismatch(self, grads: list[torch.Tensor | None]) -> None:
        """Raise the error of the first grad that cannot update its param, if any."""
        for param, grad in zip(self.params, grads):
            if grad is not None:
                mismatch = grad_mismatch(grad, local_tensor(param))
                if mismatch is not None:
                    raise mismatch

    def _make_plan(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor | None],
        segments: list[int],
        contiguous: list[bool],
        param_ptrs: list[int],
        grad_ptrs: list[int],
    ) -> StepPlan:
        subset = len(segments) != len(self.params)
        pieces = self._pieces_for(segments)
        written = [params[i] for i in segments] if subset else list(params)
        read = [grads[i] for i in segments] if subset else grads
        written_ptrs = [param_ptrs[i] for i in segments] if subset else param_ptrs
        read_ptrs = [grad_ptrs[i] for i in segments] if subset else grad_ptrs
        param_stand_ins: list[tuple[int, torch.Tensor]] = []
        grad_stand_ins: list[tuple[int, torch.Tensor]] = []
        if not all(contiguous) or not all(map(_IS_CONTIGUOUS, read)):
            written, read, written_ptrs, read_ptrs = list(written), list(read), list(written_ptrs), list(read_ptrs)
            for k, i in enumerate(segments):
                if not contiguous[i]:
                    # The state is laid out in the param's logical (row-major) order, as
                    # torch's: a non-contiguous param is updated through a contiguous stand-in.
                    written[k] = written[k].contiguous()
                    written_ptrs[k] = written[k].data_ptr()
                    param_stand_ins.append((k, written[k]))
                if not read[k].is_contiguous():
                    read[k] = read[k].contiguous()
                    read_ptrs[k] = read[k].data_ptr()
                    grad_stand_ins.append((k, read[k]))
        table = _make_table(pieces, written_ptrs, read_ptrs, written, [], self.dtype, self.device)
        return StepPlan(table, segments, pieces.steps_index, param_stand_ins, grad_stand_ins)

    def sync_master(self) -> None:
        """Merge into the master any param written in place from outside.

        ``model.load_state_dict``, an init function or ``p.mul_()`` write the
        low-precision param; the master copy must follow it, or the next step would
        undo the write (:meth:`_merge_param_into_master`). The optimizer's own writes
        do not bump the version counter.
        """
        if self._versions is None:
            return
        versions = self._read_versions if self._read_versions is not None else list(map(_VERSION, self.local_tensors()))
        self._read_versions = None
        if versions == self._versions:
            return
        for i, version in enumerate(versions):
            if version != self._versions[i]:
                self._merge_param_into_master(i)
        self._versions = versions

    def sync_master_by_value(self, params: list[torch.Tensor]) -> None:
        """:meth:`sync_master` for a compiled step, where the graph bumps the params'
        version counters itself: a param whose value is not its master's rounding was
        written from outside, and the master copy takes it. Then the versions are
        taken as they are, so that an eager step after it sees no edit."""
        if self.master is None:
            return
        for i, param in enumerate(params):
            start, end = self.offsets[i], self.offsets[i] + self.numels[i]
            flat = _real_flat(param.detach())
            if not torch.equal(flat, self.master[start:end].to(flat.dtype)):
                self._merge_param_into_master(i, param)
        self._versions = list(map(_VERSION, self.local_tensors()))
        self._read_versions = None

    def note_written(self, plan: StepPlan, *, given: bool = False) -> None:
        """Record the version counters after the step's own write-backs (not for
        :meth:`plan_given`'s tensors), and let the step's grads go."""
        if self._versions is not None and plan.write_back and not given:
            self._versions = list(map(_VERSION, self.local_tensors()))
        plan.release()
