"""The host fast path every kernel family launches through: a cheaper relaunch of compiled Triton
kernels (``FastLauncher``) and replays of whole single-launch calls (``PlanCache``).

Family-agnostic: it knows kernels only by their parameter list. A family's launcher builds the
(pointers, scalars) record in the kernel's parameter order; the record is checked against the
kernel's signature (count, pointer vs scalar vs constexpr positions) before it is first launched
and before it enters the fast cache, so a shifted argument fails loudly instead of binding to
the wrong parameter. (Keyword launches were measured instead: a 62-keyword call costs ~7 µs of
CPU per launch against ~0.4 µs for the tuple, as much as the whole fast path.)

``kernel[grid](...)`` costs 30–60 µs of CPU per launch in Triton 3.6: the binder specialises
every one of ~50 arguments (48 ``native_specialize_impl`` calls) before it finds the compiled
kernel. At the seed's single-head shapes the GPU work is ~5 µs, so that CPU time *is* the
latency. ``FastLauncher`` keys its own cache on the exact argument values instead (ints, floats
and bools as they are; a tensor by dtype and 16-byte alignment, the two things Triton
specialises a pointer on), so a repeated call with the same shapes and strides is one dict lookup
and a direct call of the compiled kernel's launcher. A miss, the interpreter, or a registered
launch hook (profilers) goes through ``kernel[grid](...)`` as usual.

The value key is at least as fine as Triton's own specialisation key (equal values specialise
equally), so a hit launches exactly the binary Triton would have picked — provided each
parameter position always receives one Python type (``True == 1 == 1.0`` compare equal but
Triton types them u1 / i32 / fp32; qflash's launchers pass fixed types per position). Triton's
debug and instrumentation knobs and a JIT function's ``pre_run_hooks`` are not part of the key:
the fast path assumes they stay as they were when the kernel was first launched.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .common import cdiv, next_pow2  # noqa: F401  (re-exported)

__all__ = ["FastLauncher", "Plan", "PlanCache", "check_args"]

_MAX_ENTRIES = 4096  # distinct (shape, stride, flag) combinations kept per kernel


def _hooked(hook) -> bool:
    """Whether a Triton launch hook (a ``HookChain`` in 3.6, a callable or None before) is set."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _constexpr_flags(fn) -> tuple[bool, ...] | None:
    """Per parameter of a ``triton.jit`` function: whether it is a constexpr (None: unknown)."""
    params = getattr(fn, "params", None)  # JITFunction
    if params is not None:
        return tuple(bool(p.is_constexpr) for p in params)
    inner = getattr(fn, "fn", None)  # the interpreter's InterpretedFunction wraps the Python function
    if inner is None:
        return None
    try:
        sig = inspect.signature(inner)
    except (TypeError, ValueError):
        return None
    flags = []
    for p in sig.parameters.values():
        ann = p.annotation
        flags.append(ann == "tl.constexpr" or getattr(ann, "__name__", "") == "constexpr")
    return tuple(flags)


def _is_pointer(a) -> bool:
    """What Triton binds to a pointer parameter: a tensor (anything with ``data_ptr``), a host
    tensor descriptor, or None."""
    return a is None or hasattr(a, "data_ptr") or hasattr(a, "block_shape")


def check_args(fn, names, flags, n_pointers: int | None, pointers: tuple, scalars: tuple,
               types: tuple | None = None) -> None:
    """TypeError naming the parameter unless (pointers, scalars) fits ``fn``'s signature: the
    count, ``n_pointers`` tensors / descriptors / None first, then Python scalars only (bool / int /
    float; constexprs may also be str), each scalar of the type ``types`` recorded for its position
    by an earlier launch (the fast cache keys on values: ``True == 1`` but Triton types them apart)."""
    name = getattr(fn, "__name__", "kernel")
    if len(pointers) + len(scalars) != len(names):
        raise TypeError(f"{name} takes {len(names)} arguments, got {len(pointers) + len(scalars)}")
    if n_pointers is not None and len(pointers) != n_pointers:
        raise TypeError(f"{name}: the record has {len(pointers)} pointers, the kernel's first {n_pointers} "
                        f"parameters ({', '.join(names[:n_pointers])}) are its pointers")
    for i, a in enumerate(pointers):
        if not _is_pointer(a) or (flags is not None and flags[i]):
            raise TypeError(f"{name}: argument {i} ({names[i]}) got {type(a).__name__} in the pointer part of the record")
    for j, a in enumerate(scalars):
        i = len(pointers) + j
        const = flags is not None and flags[i]
        if not isinstance(a, (bool, int, float)) and not (const and isinstance(a, str)):
            raise TypeError(f"{name}: argument {i} ({names[i]}) must be a Python scalar, got {type(a).__name__}")
        if types is not None and type(a) is not types[j]:
            raise TypeError(f"{name}: argument {i} ({names[i]}) was {types[j].__name__} in an earlier launch, "
                            f"now {type(a).__name__}")


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if hasattr(a, "block_shape"):  # a host-side triton TensorDescriptor (an unhashable dataclass)
        return ("desc", a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding)
    return a


class FastLauncher:
    """Launch ``fn`` (a ``triton.jit`` function) with every parameter passed positionally.

    ``n_pointers``: how many leading parameters are pointers (tensors, descriptors); the records
    are checked against it (``check_args``).

    ``launcher(grid, pointers, scalars, num_warps=, num_stages=)``: ``pointers`` are the leading
    parameters of ``fn`` (tensors, tensor descriptors or None), ``scalars`` every parameter after
    them in order, constexprs included (ints, floats, bools); ``grid`` is a tuple of 1–3 ints.
    Keeping the two apart makes the key cheap: the scalars are hashed as one tuple.

    A kernel with a ``USE_PDL`` constexpr is compiled with Triton's ``launch_pdl`` option set to
    that argument (programmatic dependent launch, ``kernels.pdl``): the launch attribute lives in
    the compiled kernel, so the flag and the attribute cannot disagree, in a replay neither.
    """

    def __init__(self, fn, n_pointers: int | None = None):
        self.fn = fn
        self.names = list(fn.arg_names)
        self.n_pointers = n_pointers
        self._flags = _constexpr_flags(fn)
        self._types: tuple | None = None  # Python type of each scalar position, from the first launch
        # index of USE_PDL among the scalars (None: the kernel has no such parameter)
        self._pdl_at = (self.names.index("USE_PDL") - (n_pointers or 0)
                        if "USE_PDL" in self.names and n_pointers is not None else None)
        self._cache: dict = {}
        self._knobs = None
        try:
            from triton import knobs

            self._knobs = knobs.runtime
        except ImportError:  # older Triton: no hooks object, fast path off
            self._knobs = None

    def fast_ok(self, dev: torch.device) -> bool:
        """Whether a cached kernel may be launched directly on ``dev`` now (no hooks, current device)."""
        return (self._knobs is not None and dev.type == "cuda" and not _hooked(self._knobs.launch_enter_hook)
                and not _hooked(self._knobs.launch_exit_hook) and dev.index == torch.cuda.current_device())

    def cached(self, dev: torch.device, pointers: tuple, scalars: tuple, num_warps: int, num_stages: int):
        """The compiled kernel a previous launch with these arguments left in the cache, or None."""
        return self._cache.get((dev.index, num_warps, num_stages, scalars, tuple(map(_arg_key, pointers))))

    @staticmethod
    def launch_compiled(kernel, grid, dev_index: int, pointers: tuple, scalars: tuple) -> None:
        """Launch a compiled kernel on the current stream of device ``dev_index`` (see ``fast_ok``)."""
        g = (*grid, 1, 1)
        stream = torch._C._cuda_getCurrentRawStream(dev_index)
        kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                   *pointers, *scalars)

    def __call__(self, grid, pointers: tuple, scalars: tuple, *, num_warps: int, num_stages: int):
        dev = pointers[0].device
        fast = self.fast_ok(dev)
        if fast:
            key = (dev.index, num_warps, num_stages, scalars, tuple(map(_arg_key, pointers)))
            kernel = self._cache.get(key)
            if kernel is not None:
                self.launch_compiled(kernel, grid, dev.index, pointers, scalars)
                if _Recorder.active is not None:
                    _launch_record(self, grid, pointers, scalars, num_warps, num_stages)
                return
        if fast or self._types is None:  # before a record enters the fast cache, and on the first launch
            check_args(self.fn, self.names, self._flags, self.n_pointers, pointers, scalars, self._types)
            self._types = tuple(map(type, scalars))
        elif len(pointers) + len(scalars) != len(self.names):
            raise TypeError(f"{self.fn.__name__} takes {len(self.names)} arguments, "
                            f"got {len(pointers) + len(scalars)}")
        kwargs = dict(zip(self.names, (*pointers, *scalars)))
        if self._pdl_at is not None and scalars[self._pdl_at]:
            kwargs["launch_pdl"] = True  # a compile option (metadata.launch_pdl), keyed by USE_PDL itself
        with torch.cuda.device(dev) if dev.type == "cuda" else _nullcontext():
            kernel = self.fn[grid](**kwargs, num_warps=num_warps, num_stages=num_stages)
        if fast and kernel is not None and hasattr(kernel, "packed_metadata"):
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = kernel
        if _Recorder.active is not None:
            _launch_record(self, grid, pointers, scalars, num_warps, num_stages)

    def clear(self) -> None:
        self._cache.clear()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@dataclass(frozen=True)
class Plan:
    """A whole call with everything but the tensors fixed: its launches in order, each as
    (compiled kernel, grid, pointer slots, scalar record), and the bytes of scratch it needs.

    A pointer slot is None, ``(i, 0)`` for the call's own tensor ``src[i]``, or ``(WS, offset)``
    for a byte offset into the scratch workspace (the quantiser's codes and scales: buffers the
    call allocated and only kernels of the call read and wrote)."""

    launches: tuple
    ws_bytes: int


WS = -1  # slot index of the workspace in a plan's pointer slots
_WS_ALIGN = 256  # workspace regions keep every pointer's alignment class (Triton specialises on % 16)


class _Recorder:
    """Collects the launches ``FastLauncher`` makes while active (``PlanCache.record``), and the
    last plan a ``PlanCache`` replayed (``take_replayed``: the API's call cache learns from it)."""

    active: list | None = None
    replayed: Plan | None = None


_CACHES: list = []  # every PlanCache and call cache, cleared together by ``forget_plans``


def forget_plans() -> None:
    """Drop every recorded plan (tuning data changed: the next calls re-pick their tiles)."""
    for cache in _CACHES:
        cache.clear()


def register_cache(cache) -> None:
    """Have ``forget_plans`` clear ``cache`` (anything with ``clear()``) too."""
    _CACHES.append(cache)


def note_host_op() -> None:
    """A launcher ran a torch op (not a recorded kernel) in the call being recorded: no plan."""
    if _Recorder.active is not None:
        _Recorder.active.append(None)


def take_replayed() -> Plan | None:
    """The plan replayed since the last call of this function, or None (and forget it)."""
    plan, _Recorder.replayed = _Recorder.replayed, None
    return plan


def replay_ready(dev: torch.device) -> bool:
    """Whether a plan may be replayed on ``dev`` now: its current CUDA device, no launch hooks."""
    if dev.index != torch.cuda.current_device():
        return False
    knobs = _runtime_knobs()
    return knobs is not None and not _hooked(knobs.launch_enter_hook) and not _hooked(knobs.launch_exit_hook)


def _launch_record(launcher, grid, pointers, scalars, num_warps, num_stages) -> None:
    if _Recorder.active is not None:
        _Recorder.active.append((launcher, grid, pointers, scalars, num_warps, num_stages))


class PlanCache:
    """Replays of whole calls keyed by the launcher (shapes, strides, dtypes, options, aliasing,
    alignment: whatever fixes the launches), so a repeated call skips the launcher's config logic,
    its allocations of intermediate buffers and ``FastLauncher``'s key: one ``torch.empty`` for
    the scratch, then each compiled kernel launched with integer pointers. Only on CUDA.

    Recording (``with cache.record() as rec: ...`` then ``cache.remember(key, rec, src)``) keeps a
    plan only when every pointer of every launch is one of the call's tensors ``src`` (by
    identity), None, or lies in a buffer that none of ``src`` shares; the launcher must record only
    call paths whose intermediate buffers are written by the recorded kernels alone (no torch op
    in between)."""

    def __init__(self, max_plans: int = 1024):
        self.max_plans = max_plans
        self._plans: dict = {}
        register_cache(self)

    def get(self, key, dev: torch.device) -> Plan | None:
        """The plan stored under ``key`` if it may be replayed on ``dev`` now."""
        plan = self._plans.get(key)
        if plan is None or dev.type != "cuda" or not replay_ready(dev):
            return None
        return plan

    @staticmethod
    def replay(plan: Plan, dev: torch.device, src: tuple) -> torch.Tensor | None:
        """Launch the plan's kernels on ``src``'s data; returns the scratch (keep it until the
        kernels are queued; the caching allocator orders its reuse on the stream)."""
        ws = torch.empty(plan.ws_bytes, dtype=torch.uint8, device=dev) if plan.ws_bytes else None
        bases = [0 if t is None else t.data_ptr() for t in src]
        bases.append(ws.data_ptr() if ws is not None else 0)  # index WS (-1)
        stream = torch._C._cuda_getCurrentRawStream(dev.index)
        for launch, grid, slots, scalars in plan.launches:
            launch(grid, stream, tuple(None if s is None else bases[s[0]] + s[1] for s in slots), scalars)
        _Recorder.replayed = plan
        return ws

    @staticmethod
    def record():
        """Context manager collecting ``FastLauncher`` launches (a list of records)."""
        return _Recording()

    def remember(self, key, records: list, src: tuple) -> bool:
        """Store the recorded launches as a plan (see the class doc); whether it was stored."""
        if not records or any(r is None for r in records):
            return False  # nothing launched, or a torch op between the launches (note_host_op)
        regions: dict[int, int] = {}  # storage base pointer -> workspace offset
        ws_bytes = 0
        src_storages = {t.untyped_storage().data_ptr() for t in src if t is not None}
        launches = []
        for launcher, grid, pointers, scalars, num_warps, num_stages in records:
            kernel = launcher.cached(src[0].device, pointers, scalars, num_warps, num_stages)
            if kernel is None:
                return False
            slots = []
            for p in pointers:
                if p is None:
                    slots.append(None)
                    continue
                if not isinstance(p, torch.Tensor):
                    return False  # a tensor descriptor holds its base address: not replayable
                idx = next((i for i, t in enumerate(src) if t is p), None)
                if idx is not None:
                    slots.append((idx, 0))
                    continue
                storage = p.untyped_storage()
                base = storage.data_ptr()
                if base in src_storages:
                    return False  # a view or copy of the caller's tensors made inside the call
                off = regions.get(base)
                if off is None:
                    off = regions[base] = ws_bytes
                    ws_bytes += -(-storage.nbytes() // _WS_ALIGN) * _WS_ALIGN
                slots.append((WS, off + p.data_ptr() - base))
            launches.append((_direct_launch(kernel), tuple(grid) + (1,) * (3 - len(grid)), tuple(slots), scalars))
        if len(self._plans) >= self.max_plans:
            self._plans.clear()
        self._plans[key] = Plan(tuple(launches), ws_bytes)
        return True

    def __len__(self) -> int:
        return len(self._plans)

    def clear(self) -> None:
        self._plans.clear()


def _direct_launch(kernel):
    """``launch(grid3, stream, pointers, scalars)`` for a compiled kernel: the generated C launcher
    called directly when the kernel needs no scratch memory (what ``CompiledKernel.run`` does then,
    minus two Python frames), else through ``run``."""
    run = kernel.run
    c_launch = getattr(run, "launch", None)
    if (c_launch is None or getattr(run, "global_scratch_size", 1) or getattr(run, "profile_scratch_size", 1)
            or not hasattr(run, "launch_cooperative_grid")):
        def launch(grid, stream, pointers, scalars):
            run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None, None, None,
                *pointers, *scalars)
        return launch
    fixed = (kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None, kernel.packed_metadata,
             None, None, None)

    def launch(grid, stream, pointers, scalars):
        c_launch(grid[0], grid[1], grid[2], stream, *fixed, *pointers, *scalars)
    return launch


class _Recording:
    def __enter__(self) -> list:
        self.prev = _Recorder.active
        _Recorder.active = []
        return _Recorder.active

    def __exit__(self, *exc):
        _Recorder.active = self.prev
        return False


_KNOBS: list = []


def _runtime_knobs():
    """``triton.knobs.runtime`` (launch hooks), looked up once; None on a Triton without it."""
    if not _KNOBS:
        try:
            from triton import knobs

            _KNOBS.append(knobs.runtime)
        except ImportError:
            _KNOBS.append(None)
    return _KNOBS[0]
