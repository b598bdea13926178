"""Flat buffers: pack params into one contiguous buffer and map views back.

A :class:`FlatBuffer` holds the params of one (param group, device, dtype) as one
1-D tensor. Each param's ``.data`` is rebound to a view of it, so the model keeps
working and no second copy exists. Grads live in a matching flat grad buffer as
views, and the AdaDelta state is kept as flat buffers beside them, so one kernel
launch updates every param of the buffer.

Segments start on a 16-byte boundary (128-bit accesses); the padding between them
is zero in every buffer and an AdaDelta step keeps it zero.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from itertools import compress
from typing import Iterator

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .watch import DATA, GRAD, GRAD_REQUIRES_GRAD, UNKNOWN, VERSION, param_watch

ALIGN_BYTES = 16

# Attribute readers for the per-step checks, applied with map() at C speed.
_DATA_PTR = torch.Tensor.data_ptr
_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")

# Statuses of ParamWatch.gather().
_NO_GRAD = 0
_COPIED = 2
_COPIED_AGAIN = 3

# The storage each param was rebound to by a FlatBuffer: a param that lives inside a
# larger storage is ours to rebind again only if that storage is one of ours.
_BOUND_STORAGE: WeakIdKeyDictionary = WeakIdKeyDictionary()


def check_packable(param: torch.Tensor) -> None:
    """Refuse a param that cannot be rebound as a view of a flat buffer.

    Raises:
        TypeError: for a tensor subclass such as ``DTensor`` (FSDP2's ``fully_shard``,
            tensor parallelism). FSDP2 all-gathers each param from its own padded
            copy of the local shard, so a shard rebound into a flat buffer would
            never reach the forward pass: the update would be silently lost.
        ValueError: for a param that is a view into a larger storage someone else
            owns (``ZeroRedundancyOptimizer(parameters_as_bucket_view=True)``, FSDP1
            flat params, a Parameter made from a slice). Rebinding would detach it
            from that storage, and its owner would go on reading stale values.
    """
    data = param.data
    if type(data) is not torch.Tensor:
        raise TypeError(
            f"triton_adadelta packs plain tensors into flat buffers and cannot rebind a "
            f"{type(data).__name__} param (FSDP2 fully_shard and tensor parallelism give DTensor "
            "params, whose local shards FSDP2 keeps in its own buffers); use torch.optim.Adadelta there"
        )
    storage = data.untyped_storage()
    if storage.nbytes() > data.numel() * data.element_size() and _BOUND_STORAGE.get(param) != storage.data_ptr():
        raise ValueError(
            f"a param of shape {tuple(data.shape)} is a view into a larger storage that something else owns "
            "(e.g. ZeroRedundancyOptimizer(parameters_as_bucket_view=True), FSDP1, or a Parameter made from a "
            "slice); rebinding it into a flat buffer would detach it from that storage. Give each param its "
            "own storage (for ZeroRedundancyOptimizer: parameters_as_bucket_view=False, the default)"
        )


def state_dtype_for(param_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``square_avg``/``acc_delta``: fp32, or fp64 for fp64 params."""
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Complex params are stored as their real and imaginary parts, as torch does."""
    return torch.empty((), dtype=dtype).real.dtype if dtype.is_complex else dtype


def buffer_key(param: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Params with the same key share a flat buffer.

    Complex params get buffers of their own (stored as real and imaginary parts):
    one storage viewed both as real and as complex tensors cannot be saved by
    ``torch.save``, in a model's state_dict or in the optimizer's.
    """
    return param.device, param.dtype


@dataclass
class Segment:
    """Where one param lives in its flat buffer (offsets in real elements)."""

    param: torch.nn.Parameter
    offset: int
    numel: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def end(self) -> int:
        return self.offset + self.numel


def _shaped_view(flat: torch.Tensor, segment: Segment) -> torch.Tensor:
    """The segment of ``flat`` viewed with the param's shape (and complex dtype)."""
    piece = flat[segment.offset : segment.end]
    if segment.dtype.is_complex:
        return torch.view_as_complex(piece.view(*segment.shape, 2))
    return piece.view(segment.shape)


def _real_flat(tensor: torch.Tensor) -> torch.Tensor:
    """A 1-D real view (or copy, if non-contiguous) of ``tensor``."""
    if tensor.is_complex():
        tensor = torch.view_as_real(tensor)
    return tensor.reshape(-1)


def _runs_with_grads(has_grad: list[bool]) -> list[tuple[int, int]]:
    """Runs ``(first, stop)`` of consecutive segments whose param has a grad."""
    runs: list[tuple[int, int]] = []
    for i, present in enumerate(has_grad):
        if not present:
            continue
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def _grad_mismatch(grad: torch.Tensor, segment: Segment, device: torch.device) -> Exception | None:
    """Why ``grad`` cannot be copied into ``segment``'s view (None: it can)."""
    if grad.is_sparse:
        return RuntimeError("Adadelta does not support sparse gradients")
    if grad.shape != segment.shape or grad.dtype != segment.dtype or grad.device != device:
        return ValueError(
            f"grad of shape {tuple(grad.shape)}, {grad.dtype} on {grad.device} does not match "
            f"its param of shape {tuple(segment.shape)}, {segment.dtype} on {device}"
        )
    return None


STATE_KEYS = ("step", "square_avg", "acc_delta")


def check_param_state(key: object, param: torch.Tensor, value: object) -> None:
    """Check that ``value`` is an Adadelta state for ``param`` (torch's or ours).

    Raises:
        ValueError: naming the param (by its key in the state_dict) and the mismatch.
    """
    if not isinstance(value, dict):
        raise ValueError(f"state of param {key} is a {type(value).__name__}, not a dict")
    missing = [name for name in STATE_KEYS if name not in value]
    if missing:
        raise ValueError(f"state of param {key} lacks {missing}: not an Adadelta state_dict")
    for name in ("square_avg", "acc_delta", "master_param"):
        if name not in value:
            continue
        tensor = value[name]
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"state '{name}' of param {key} is a {type(tensor).__name__}, not a tensor")
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(
                f"state '{name}' of param {key} has shape {tuple(tensor.shape)} "
                f"but the param has shape {tuple(param.shape)}"
            )
        if tensor.is_complex() != param.is_complex() or not (tensor.is_floating_point() or tensor.is_complex()):
            raise ValueError(f"state '{name}' of param {key} is {tensor.dtype} but the param is {param.dtype}")
    if torch.as_tensor(value["step"]).numel() != 1:
        raise ValueError(f"state 'step' of param {key} must be a scalar")


class FlatBuffer:
    """Params of one group, device and dtype, packed with their grads and state.

    Args:
        params: the params, each at most once (tied weights are one param).
        master_weights: keep an fp32 master copy (for bf16/fp16 params).
    """

    def __init__(self, params: list[torch.nn.Parameter], *, master_weights: bool = False) -> None:
        if not params:
            raise ValueError("a FlatBuffer needs at least one param")
        key = buffer_key(params[0])
        self.device, self.dtype = key[0], real_dtype_of(key[1])
        for param in params:
            check_packable(param)
            if buffer_key(param) != key:
                raise ValueError("all params of a FlatBuffer must share device and dtype")
        align = max(1, ALIGN_BYTES // torch.empty((), dtype=self.dtype).element_size())
        self.segments: list[Segment] = []
        offset = 0
        for param in params:
            numel = param.numel() * (2 if param.is_complex() else 1)
            self.segments.append(Segment(param, offset, numel, param.shape, param.dtype))
            offset += -(-numel // align) * align
        self.n_elements = offset
        self.index = {id(segment.param): i for i, segment in enumerate(self.segments)}
        self.params: list[torch.nn.Parameter] = [segment.param for segment in self.segments]

        # Allocation order keeps the peak at the steady state (params, grads, state):
        # each old param or grad storage is freed as soon as it is rebound, before
        # the next flat buffer is allocated.
        make = lambda dtype: torch.zeros(self.n_elements, dtype=dtype, device=self.device)  # noqa: E731
        self.param = make(self.dtype)
        self.data_ptrs: list[int] = []
        self.versions: list[int] = []
        for segment in self.segments:
            param = segment.param
            self.param[segment.offset : segment.end].copy_(_real_flat(param.data))
            param.data = _shaped_view(self.param, segment)
            _BOUND_STORAGE[param] = self.param.untyped_storage().data_ptr()
            self.data_ptrs.append(param.data_ptr())
            # In-place writes through the param (not through the flat buffer) bump
            # this; with master weights they must reach the master copy.
            self.versions.append(param._version)

        self.grad = make(self.dtype)
        self.grad_views: list[torch.Tensor] = []
        self.grad_ptrs: list[int] = []
        for segment in self.segments:
            param = segment.param
            grad_view = _shaped_view(self.grad, segment)
            grad = param.grad
            # A grad that does not fit (sparse, another shape, dtype or device) stays
            # where it is, for gather_grads to refuse with a clear error.
            if grad is not None and _grad_mismatch(grad, segment, self.device) is None:
                grad_view.copy_(grad)
                param.grad = grad_view
            del grad  # the old grad's storage is freed now, not at the next param
            self.grad_views.append(grad_view)
            self.grad_ptrs.append(grad_view.data_ptr())

        state_dtype = state_dtype_for(self.dtype)
        self.square_avg = make(state_dtype)
        self.acc_delta = make(state_dtype)
        self.master = self.param.float() if master_weights else None
        # Per-param step counts (torch keeps one per param); advanced by the update.
        self.steps = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        # Whether a param has state yet: torch creates it at the param's first grad.
        self.initialized = [False] * len(params)
        self.all_initialized = False
        # The compiled change check (None: the checks below run in Python), and the
        # runs of the last full gather, valid while the watch sees no change.
        self.watch = param_watch(self.params, versions=self.master is not None)
        if self.watch is not None:
            self.watch.set_views(self.grad_views, self.grad_ptrs)
        self._runs: list[tuple[int, int]] | None = None
        # Set by the optimizer's zero_grad(set_to_none=True): the next grads are new
        # tensors made by backward, copied in but not re-pointed (see gather_grads).
        self.grads_dropped = False
        # id() of each grad left in place at the last gather (0: none), for the
        # Python path; the compiled watch compares with its snapshot instead.
        self._left_grad_ids = [0] * len(params)

    def __getstate__(self) -> dict[str, object]:
        # A copy watches from Python: the compiled watch holds this buffer's params.
        return {**self.__dict__, "watch": None, "_runs": None}

    def is_stale(self) -> bool:
        """Whether a param's data was replaced (``p.data = ...``, ``model.to(...)``).

        Every step asks, so it compares one list built by a C-level ``map`` (about
        50 ns a param) rather than looping in Python. New data, a new dtype or a new
        device always comes with a new data pointer. (A param reshaped onto the same
        memory is not stale: the flat update stays right, and a grad of the new shape
        is refused by :meth:`gather_grads` with a clear error.)

        With the compiled watch (:mod:`triton_adadelta.watch`), one C++ loop reads
        the data pointers instead (5 us for 1000 params in ``perf/bench_step.py``).
        """
        if self.watch is not None:
            changed = self.watch.changes(DATA)
            if not changed & UNKNOWN:
                return bool(changed)
        return list(map(_DATA_PTR, self.params)) != self.data_ptrs

    def gather_grads(self) -> list[tuple[int, int]]:
        """Bring the params' grads into the flat grad buffer.

        Grads that are views already cost nothing. Any other grad is copied in. A grad
        new since the last step is re-pointed at its view, so that backward
        accumulates in place from then on; except right after the optimizer's
        ``zero_grad(set_to_none=True)`` (:attr:`grads_dropped`), when the grads are new
        tensors from backward that the next ``zero_grad()`` drops again: they stay
        where they are, since re-pointing (and later dropping) a grad costs more than
        copying it. A grad left in place is never re-pointed later (the user may hold
        it, as torch lets them): it is copied in again at every step.

        Returns:
            Runs ``(first, stop)`` of consecutive segments whose param has a grad.
            Params whose grad is None are skipped, as torch skips them.

        Raises:
            RuntimeError: for a sparse grad (torch's message); ValueError for a grad
                whose shape, dtype or device does not match its param. Nothing is
                changed when it raises.
        """
        # The common case: every grad is its view (or None) and nothing changed since
        # the last gather (the compiled watch asks every param in one pass).
        if self.watch is not None and self._runs is not None:
            if self.watch.changes(GRAD | VERSION if self.master is not None else GRAD) == 0:
                return self._runs
        self._runs = None
        if self.master is not None:
            self._sync_master()
        gathered = self._gather_grads_compiled() if self.watch is not None else None
        if gathered is None:
            gathered = self._gather_grads()
            if self.watch is not None:
                self.watch.set_views(self.grad_views, self.grad_ptrs)
        runs, all_views = gathered
        self.grads_dropped = False
        if self.watch is not None and not self.watch.snapshot():
            self.watch = None  # a param it cannot read: check from Python from now on
        # Grads left in place may change in place: copy them again at every step.
        self._runs = runs if all_views else None
        return runs

    def grads_are_views(self) -> bool:
        """Whether every grad is still its view of the flat grad buffer (or None), as at
        the last gather, with no autograd history: zeroing the flat buffer then zeroes
        every grad. False where it is not known (no compiled watch)."""
        return (
            self.watch is not None
            and self._runs is not None
            and self.watch.changes(GRAD | GRAD_REQUIRES_GRAD) == 0
        )

    def _gather_grads_compiled(self) -> tuple[list[tuple[int, int]], bool] | None:
        """New CPU grads (after ``zero_grad()`` and a backward) copied in one C++ pass.

        Returns:
            The runs, and whether every grad is now its view (or None); None, having
            changed nothing, where a grad needs :meth:`_gather_grads`.
        """
        copied, status = self.watch.gather()
        if copied < 0:
            return None
        all_views = not copied
        if copied and not self.grads_dropped:
            params, views = self.params, self.grad_views
            for i in compress(range(len(status)), map(_COPIED.__eq__, status)):
                params[i].grad = views[i]
            all_views = _COPIED_AGAIN not in status
        if status.count(_NO_GRAD) == 0:
            return [(0, len(self.segments))], all_views
        return _runs_with_grads([code != _NO_GRAD for code in status]), all_views

    def _gather_grads(self) -> tuple[list[tuple[int, int]], bool]:
        """The Python path of :meth:`gather_grads`: the runs, and whether every grad is
        now its view (or None)."""
        grads = list(map(_GRAD, self.params))
        # Every grad still our view: one C-level comparison each.
        if all(map(operator.is_, grads, self.grad_views)) and list(map(_DATA_PTR, grads)) == self.grad_ptrs:
            return [(0, len(self.segments))], True
        to_copy: list[int] = []
        for i, (segment, grad) in enumerate(zip(self.segments, grads)):
            # Our view, unless it was replaced or its `.data` was.
            if grad is not None and (grad is not self.grad_views[i] or grad.data_ptr() != self.grad_ptrs[i]):
                mismatch = _grad_mismatch(grad, segment, self.device)
                if mismatch is not None:
                    raise mismatch
                to_copy.append(i)
        runs = _runs_with_grads([grad is not None for grad in grads])
        if to_copy:
            # One batched copy (on a GPU, a few launches rather than one per grad).
            views = [self._intact_grad_view(i) for i in to_copy]
            flat_start = self.grad.data_ptr()
            flat_end = flat_start + self.grad.numel() * self.grad.element_size()
            # A grad inside the flat grad buffer (another param's view) would be read
            # after an earlier copy overwrote it: copy from a clone.
            sources = [
                grad.clone() if flat_start <= grad.data_ptr() < flat_end else grad
                for grad in (grads[i] for i in to_copy)
            ]
            torch._foreach_copy_(views, sources)
            all_views = True
            for i, grad_view in zip(to_copy, views):
                self.grad_views[i] = grad_view
                self.grad_ptrs[i] = grad_view.data_ptr()
                grad = grads[i]
                left_before = id(grad) == self._left_grad_ids[i] or (
                    self.watch is not None and grad._cdata == self.watch.seen_grad(i)
                )
                if self.grads_dropped or left_before:
                    self._left_grad_ids[i] = id(grad)
                    all_views = False
                else:
                    self.segments[i].param.grad = grad_view
                    self._left_grad_ids[i] = 0
            return runs, all_views
        return runs, True

    def _intact_grad_view(self, i: int) -> torch.Tensor:
        """Segment ``i``'s view of the flat grad buffer: the one made before, unless its
        ``.data`` was replaced since (``p.grad.data = ...`` while it was the grad)."""
        view = self.grad_views[i]
        segment = self.segments[i]
        if view.data_ptr() == self.grad_ptrs[i] and view.shape == segment.shape and view.dtype == segment.dtype:
            return view
        return _shaped_view(self.grad, segment)

    def _sync_master(self) -> None:
        """Copy into the master any param written in place from outside.

        ``model.load_state_dict``, an init function or ``p.mul_()`` write the
        low-precision param; the master copy must follow it, or the next step would
        undo the write.
        """
        versions = list(map(_VERSION, self.params))
        if versions == self.versions:
            return
        for i, segment in enumerate(self.segments):
            version = versions[i]
            if version != self.versions[i]:
                self.master[segment.offset : segment.end].copy_(_real_flat(segment.param.data))
                self.versions[i] = version

    def run_range(self, first: int, stop: int) -> tuple[int, int]:
        """Element range of segments ``first..stop-1``, with the padding after them."""
        end = self.segments[stop].offset if stop < len(self.segments) else self.n_elements
        return self.segments[first].offset, end

    def param_state(self, i: int) -> dict[str, torch.Tensor]:
        """torch's per-param state of segment ``i``, as live views of the flat state."""
        segment = self.segments[i]
        state = {
            "step": self.steps[i],
            "square_avg": _shaped_view(self.square_avg, segment),
            "acc_delta": _shaped_view(self.acc_delta, segment),
        }
        if self.master is not None:
            state["master_param"] = _shaped_view(self.master, segment)
        return state

    def load_param_state(self, i: int, state: dict[str, torch.Tensor]) -> None:
        """Copy one param's state in (shapes checked by the caller); fp32 is never downcast."""
        segment = self.segments[i]
        self.steps[i].copy_(torch.as_tensor(state["step"], dtype=torch.float32))
        for name in ("square_avg", "acc_delta"):
            flat = getattr(self, name)
            flat[segment.offset : segment.end].copy_(_real_flat(state[name].to(self.device)))
        if self.master is not None and "master_param" in state:
            self.master[segment.offset : segment.end].copy_(_real_flat(state["master_param"].to(self.device)))
        self.initialized[i] = True

    def carried_state(self) -> dict[int, dict[str, torch.Tensor]]:
        """Copies of every initialized param's state, by ``id(param)``, for a re-pack.

        A param whose data was replaced drops its master copy: the new data wins.
        """
        carried = {}
        for i, segment in enumerate(self.segments):
            if not self.initialized[i]:
                continue
            state = {key: value.detach().clone() for key, value in self.param_state(i).items()}
            if segment.param.data_ptr() != self.data_ptrs[i]:
                state.pop("master_param", None)
            carried[id(segment.param)] = state
        return carried

    def reset_param_state(self, i: int) -> None:
        """Forget one param's state, as a param that never had a grad."""
        segment = self.segments[i]
        self.steps[i].zero_()
        self.square_avg[segment.offset : segment.end].zero_()
        self.acc_delta[segment.offset : segment.end].zero_()
        if self.master is not None:
            self.master[segment.offset : segment.end].copy_(self.param[segment.offset : segment.end])
        self.initialized[i] = False
        self.all_initialized = False

    def __iter__(self) -> Iterator[Segment]:
        return iter(self.segments)
