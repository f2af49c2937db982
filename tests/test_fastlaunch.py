"""FastLauncher's cache logic with a stand-in kernel (no GPU needed; the GPU path is in test_kernels)."""

from __future__ import annotations

import contextlib

import pytest
import torch

pytest.importorskip("triton")

from qflash.kernels import fastlaunch  # noqa: E402
from qflash.kernels.fastlaunch import FastLauncher, cdiv, next_pow2  # noqa: E402


class _FakeDevTensor:
    """Stands in for a CUDA tensor: only ``.device`` is read for non-Tensor arguments."""

    device = torch.device("cuda", 0)

    def data_ptr(self):  # what makes Triton (and FastLauncher's record check) see a pointer
        return 0


class _FakeCompiled:
    function = "fn-handle"
    packed_metadata = ("meta",)

    def __init__(self):
        self.launches = []

    def run(self, *args):
        self.launches.append(args)


class _FakeJit:
    arg_names = ["X", "n", "FLAG"]
    __name__ = "fake_kernel"

    def __init__(self):
        self.slow_calls = 0
        self.compiled = _FakeCompiled()

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.slow_calls += 1
            return self.compiled
        return launch


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch._C, "_cuda_getCurrentRawStream", lambda i: 1234, raising=False)


def test_second_launch_skips_the_binder(fake_cuda):
    fn = _FakeJit()
    launcher = FastLauncher(fn)
    x = _FakeDevTensor()
    launcher((4, 2), (x,), (7, True), num_warps=4, num_stages=2)
    assert fn.slow_calls == 1 and not fn.compiled.launches
    launcher((4, 2), (x,), (7, True), num_warps=4, num_stages=2)
    assert fn.slow_calls == 1
    (g0, g1, g2, stream, function, meta, *rest), = fn.compiled.launches
    assert (g0, g1, g2, stream, function, meta) == (4, 2, 1, 1234, "fn-handle", ("meta",))
    assert rest == [None, None, None, x, 7, True]


def test_new_values_and_options_miss_the_cache(fake_cuda):
    fn = _FakeJit()
    launcher = FastLauncher(fn)
    x = _FakeDevTensor()
    launcher((1,), (x,), (7, True), num_warps=4, num_stages=2)
    launcher((1,), (x,), (8, True), num_warps=4, num_stages=2)  # another int value: another key
    launcher((1,), (x,), (7, True), num_warps=8, num_stages=2)  # another launch option
    assert fn.slow_calls == 3 and not fn.compiled.launches


def test_launch_hooks_force_the_slow_path(fake_cuda, monkeypatch):
    fn = _FakeJit()
    launcher = FastLauncher(fn)
    monkeypatch.setattr(fastlaunch, "_hooked", lambda hook: True)
    x = _FakeDevTensor()
    for _ in range(2):
        launcher((1,), (x,), (7, True), num_warps=4, num_stages=2)
    assert fn.slow_calls == 2 and not fn.compiled.launches


def test_wrong_argument_count_is_an_error(fake_cuda):
    with pytest.raises(TypeError, match="takes 3 arguments, got 2"):
        FastLauncher(_FakeJit())((1,), (_FakeDevTensor(),), (7,), num_warps=4, num_stages=2)


def test_host_helpers():
    assert [cdiv(a, 4) for a in (0, 1, 4, 5)] == [0, 1, 1, 2]
    assert [next_pow2(n) for n in (1, 2, 3, 64, 65)] == [1, 2, 4, 64, 128]


def test_launch_records_are_checked(fake_cuda):
    """A record with a pointer too many or too few, a tensor among the scalars, or a scalar whose
    Python type changed since the first launch (the value-keyed cache would alias True and 1)
    fails loudly before it reaches the binder or the fast cache (checked on every miss; a hit
    is a record already checked, up to that aliasing)."""
    fn = _FakeJit()
    launcher = FastLauncher(fn, n_pointers=1)
    x = _FakeDevTensor()
    with pytest.raises(TypeError, match="pointers"):
        launcher((1,), (x, x), (True,), num_warps=4, num_stages=2)
    with pytest.raises(TypeError, match="Python scalar"):
        launcher((1,), (x,), (torch.zeros(1), True), num_warps=4, num_stages=2)
    launcher((1,), (x,), (7, True), num_warps=4, num_stages=2)
    with pytest.raises(TypeError, match="FLAG.*bool.*int"):
        launcher((1,), (x,), (8, 1), num_warps=4, num_stages=2)
    assert fn.slow_calls == 1
