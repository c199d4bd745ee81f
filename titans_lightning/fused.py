"""The encoder's feed-forward as one fused CPU kernel (``csrc/feed_forward.cpp``).

Shape legend
    M  rows (tokens of all windows)    d  row width (16)    f  feed-forward width

``feed_forward(x, w1, b1, w2, b2, p)`` computes ``linear2(dropout(silu(linear1(x))))`` for rows x
(M, d), forward and backward, without ever writing the (M, f) activation to memory: each slice of
it lives in vector registers between the two matrix products, and the backward pass recomputes
it. Dropout is the same Bernoulli(p) process as ``F.dropout``; the draws come from a
counter-based hash of (seed, row, unit), the seed from torch's generator (``torch.manual_seed``
makes runs reproducible); the forward pass keeps the decisions as bits for the backward pass.

The kernel is compiled on first use with the machine's C++ compiler (``$CXX`` or ``c++``) for its
own vector instructions and cached (``$TITANS_LIGHTNING_CACHE``, default
``~/.cache/titans_lightning``). Where no compiler is found, the build fails, or
``TITANS_LIGHTNING_FUSED=0`` is set, :func:`supports` says no and the encoder uses its plain
PyTorch path, which computes the same function.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).parent / "csrc" / "feed_forward.cpp"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
# OpenMP, when the compiler has it: the kernel then shares PyTorch's CPU thread pool (the loaded
# libgomp.so.1), so the two never compete for cores as separately created threads would.
ROW_WIDTH = 16  # the kernel's d
_P, _I64, _U64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32


def supports(x: Tensor, f: int) -> bool:
    """Whether the fused kernel can compute the feed-forward of ``x`` (..., d) with width f."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.shape[-1] == ROW_WIDTH
            and f % 16 == 0 and library() is not None)


def feed_forward(x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, p: float) -> Tensor:
    """``linear2(dropout(silu(linear1(x)), p))`` for rows x (M, d); differentiable."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    seed = int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64)) if p > 0.0 else 0
    return _FusedFeedForward.apply(x, w1, b1, w2, b2, p, seed)


def keep_mask(seed: int, p: float, rows: int, f: int) -> Tensor:
    """The kernel's dropout decisions for a given seed, (rows, f) booleans (True = kept)."""
    keep = torch.empty(rows, f, dtype=torch.uint8)
    library().titans_ffn_keep(seed, _threshold(p), rows, f, keep.data_ptr())
    return keep.bool()


class _FusedFeedForward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, p: float, seed: int):
        x, w1, b1, w2, b2 = (t.detach().contiguous() for t in (x, w1, b1, w2, b2))
        M, f = x.shape[0], w1.shape[0]
        out = x.new_empty(M, ROW_WIDTH)
        # the keep decisions, 16 per int16, for the backward pass (cheaper than drawing again)
        bits = x.new_empty((M, f // 16) if p > 0.0 else (0,), dtype=torch.int16)
        failed = library().titans_ffn_forward(
            x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), b2.data_ptr(), f, seed,
            _threshold(p), _scale(p), bits.data_ptr() if p > 0.0 else None, out.data_ptr(),
            torch.get_num_threads())
        _check(failed)
        ctx.save_for_backward(x, w1, b1, w2, bits)
        ctx.p, ctx.seed = p, seed
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w1, b1, w2, bits = ctx.saved_tensors
        g = g.contiguous()
        M, f = x.shape[0], w1.shape[0]
        gx, gw1, gb1, gw2 = (torch.empty_like(x), torch.empty_like(w1), torch.empty_like(b1),
                             torch.empty_like(w2))
        failed = library().titans_ffn_backward(
            x.data_ptr(), M, w1.data_ptr(), b1.data_ptr(), w2.data_ptr(), f, g.data_ptr(),
            ctx.seed, _threshold(ctx.p), bits.data_ptr() if ctx.p > 0.0 else None, _scale(ctx.p),
            gx.data_ptr(), gw1.data_ptr(), gb1.data_ptr(), gw2.data_ptr(),
            torch.get_num_threads())
        _check(failed)
        return gx, gw1, gb1, gw2, g.sum(0), None, None


def _check(failed: int) -> None:
    if failed:
        raise MemoryError("the fused feed-forward could not allocate its scratch buffers")


def _threshold(p: float) -> int:
    """Drop when the 32-bit draw is below this: P(drop) = p to within 2^-32."""
    return min(round(p * 2.0**32), 2**32 - 1)


def _scale(p: float) -> float:
    return 1.0 / (1.0 - p)


@lru_cache(maxsize=1)
def library() -> ctypes.CDLL | None:
    """The compiled kernel, built once per machine and source version; None if unavailable."""
    if os.environ.get("TITANS_LIGHTNING_FUSED", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(f"the fused CPU feed-forward is unavailable ({err}); the encoder uses its "
                      "PyTorch path, which is slower. Install a C++ compiler (g++ or clang++) "
                      "or set CXX to use it; set TITANS_LIGHTNING_FUSED=0 to silence this.",
                      RuntimeWarning, stacklevel=2)
        return None
    lib.titans_ffn_forward.argtypes = [_P, _I64, _P, _P, _P, _P, _I64, _U64, _U32, ctypes.c_float,
                                       _P, _P, ctypes.c_int]
    lib.titans_ffn_forward.restype = ctypes.c_int
    lib.titans_ffn_backward.argtypes = [_P, _I64, _P, _P, _P, _I64, _P, _U64, _U32, _P,
                                        ctypes.c_float, _P, _P, _P, _P, ctypes.c_int]
    lib.titans_ffn_backward.restype = ctypes.c_int
    lib.titans_ffn_keep.argtypes = [_U64, _U32, _I64, _I64, _P]
    lib.titans_ffn_keep.restype = None
    return lib


def _build() -> Path:
    """Compile the kernel into the cache unless a build for this source and CPU is there."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(),
                                     _cpu_signature()])).hexdigest()[:16]
    cache = Path(os.environ.get("TITANS_LIGHTNING_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "titans_lightning")
    target = cache / f"feed_forward-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent builds never see half a file
        built = Path(tmp) / target.name
        for threading in (["-fopenmp"], []):  # without OpenMP the kernel runs on one thread
            result = subprocess.run([compiler, *FLAGS, *threading, str(SOURCE), "-o", str(built)],
                                    capture_output=True, text=True, timeout=300)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-500:]}")
        os.replace(built, target)
    return target


def _cpu_signature() -> bytes:
    """What ``-march=native`` depends on: a build is reused only on the same kind of CPU."""
    try:
        with open("/proc/cpuinfo", "rb") as info:
            lines = [ln for ln in info if ln.startswith((b"model name", b"flags"))][:2]
        return b"".join(lines)
    except OSError:
        return f"{platform.machine()} {platform.processor()} {sys.platform}".encode()
