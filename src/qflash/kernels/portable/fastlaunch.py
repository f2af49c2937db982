"""A cheaper way to relaunch an already-compiled Triton kernel.

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

import torch

from ..common import cdiv, next_pow2  # noqa: F401  (re-exported)

__all__ = ["FastLauncher"]

_MAX_ENTRIES = 4096  # distinct (shape, stride, flag) combinations kept per kernel


def _hooked(hook) -> bool:
    """Whether a Triton launch hook (a ``HookChain`` in 3.6, a callable or None before) is set."""
    if hook is None:
        return False
    calls = getattr(hook, "calls", None)
    return bool(calls) if calls is not None else True


def _arg_key(a):
    if isinstance(a, torch.Tensor):
        return (a.dtype, a.data_ptr() & 15 == 0)
    if hasattr(a, "block_shape"):  # a host-side triton TensorDescriptor (an unhashable dataclass)
        return ("desc", a.base.dtype, tuple(a.shape), tuple(a.strides), tuple(a.block_shape), a.padding)
    return a


class FastLauncher:
    """Launch ``fn`` (a ``triton.jit`` function) with every parameter passed positionally.

    ``launcher(grid, pointers, scalars, num_warps=, num_stages=)``: ``pointers`` are the leading
    parameters of ``fn`` (tensors, tensor descriptors or None), ``scalars`` every parameter after
    them in order, constexprs included (ints, floats, bools); ``grid`` is a tuple of 1–3 ints.
    Keeping the two apart makes the key cheap: the scalars are hashed as one tuple.
    """

    def __init__(self, fn):
        self.fn = fn
        self.names = list(fn.arg_names)
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
                return
        if len(pointers) + len(scalars) != len(self.names):
            raise TypeError(f"{self.fn.__name__} takes {len(self.names)} arguments, "
                            f"got {len(pointers) + len(scalars)}")
        kwargs = dict(zip(self.names, (*pointers, *scalars)))
        with torch.cuda.device(dev) if dev.type == "cuda" else _nullcontext():
            kernel = self.fn[grid](**kwargs, num_warps=num_warps, num_stages=num_stages)
        if fast and kernel is not None and hasattr(kernel, "packed_metadata"):
            if len(self._cache) >= _MAX_ENTRIES:
                self._cache.clear()
            self._cache[key] = kernel

    def clear(self) -> None:
        self._cache.clear()


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
