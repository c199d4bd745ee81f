"""Compiling and loading the CPU kernels (``titans_lightning/csrc/``), once per machine.

The library is built on first use with the machine's C++ compiler (``$CXX``, else ``c++``,
``g++`` or ``clang++``) for its own vector instructions, and cached
(``$TITANS_LIGHTNING_CACHE``, default ``~/.cache/titans_lightning``) under a key of the sources,
the flags, the compiler and the CPU; ``$TITANS_LIGHTNING_CXXFLAGS`` adds compiler flags (for
example ``-mno-avx512f`` for the portable vector code). Nothing here runs at import: the first
float32 CPU tensor that reaches an operation the kernels could take loads it.
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

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SOURCES = sorted(CSRC.glob("*.cpp"))
HEADERS = sorted(CSRC.glob("*.h"))
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno"]
SWITCH = "TITANS_LIGHTNING_KERNELS"  # "0": the kernels are never chosen (and never built)
if "TITANS_LIGHTNING_FUSED" in os.environ:  # the switch's earlier name
    warnings.warn(f"TITANS_LIGHTNING_FUSED is not read any more: the kernels' switch is {SWITCH} "
                  f"(set {SWITCH}=0 to switch them off)", FutureWarning, stacklevel=2)

_P, _I64, _U64, _U32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32
_F32, _INT, _I64_OUT = ctypes.c_float, ctypes.c_int, ctypes.POINTER(ctypes.c_int64)
SIGNATURES = {  # every function returns a status (csrc/status.h)
    "titans_ffn_forward": [_P, _I64, _P, _P, _P, _P, _I64, _U64, _U32, _F32, _P, _P, _INT, _P,
                           _P, _F32],
    "titans_ffn_backward": [_P, _I64, _P, _P, _P, _I64, _P, _U64, _U32, _P, _F32, _P, _P, _P,
                            _P, _INT],
    "titans_dropout_keep": [_U64, _U32, _I64, _I64, _P],
    "titans_dropout_apply": [_P, _I64, _U64, _U32, _F32, _P, _INT],
    "titans_attention_padded": [_I64, _I64_OUT],
    "titans_attention_forward": [_P, _I64, _I64, _I64, _I64, _U64, _U32, _F32, _P, _P, _INT],
    "titans_attention_backward": [_P, _P, _P, _I64, _I64, _I64, _I64, _U64, _U32, _F32, _P,
                                  _INT],
    "titans_layer_norm_forward": [_P, _P, _P, _P, _I64, _F32, _P, _INT, _P, _P],
    "titans_layer_norm_backward": [_P, _P, _P, _P, _I64, _F32, _P, _P, _P, _INT],
    "titans_query_forward": [_P, _P, _P, _I64, _INT, _P, _INT],
    "titans_keys_values_forward": [_P, _P, _P, _I64, _P, _P, _INT],
    "titans_mlp_forward": [_P, _P, _I64, _I64, _I64, _I64, _P, _P, _P, _INT],
    "titans_mlp_backward": [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P],
    "titans_mlp_surprise_and_gradient": [_P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _INT],
    "titans_memory_commit": [_P, _P, _P, _P, _I64, _I64, _P, _P, _P, _P],
    "titans_momentum_step": [_P, _P, _P, _P, _I64, _I64, _F32, _F32, _F32, _P, _P, _P, _P, _P],
}


def switched_off() -> bool:
    return os.environ.get(SWITCH, "1") == "0"


def library() -> ctypes.CDLL | None:
    """The compiled kernels; None if they could not be built (:func:`failure` says why)."""
    return _load()[0]


def failure() -> str | None:
    """Why the library could not be built or loaded; None once it is loaded. Builds it if no
    attempt was made yet."""
    return _load()[1]


def known_failure() -> str | None:
    """:func:`failure` if a build was tried already, else None: it never starts one."""
    return _load()[1] if _load.cache_info().currsize else None


@lru_cache(maxsize=1)
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"titans-lightning's CPU kernels could not be built ({err}). float32 work on the "
            "CPU runs on PyTorch's operators instead: the same model, slower on the CPU; "
            "tensors on other devices never use these kernels. To have them, install a C++ "
            f"compiler (g++ or clang++) or set CXX; {SWITCH}=0 turns them off and silences "
            "this.", RuntimeWarning, stacklevel=4)
        return None, str(err)
    for name, argtypes in SIGNATURES.items():
        function = getattr(lib, name)
        function.argtypes, function.restype = argtypes, _INT
    return lib, None


def _build() -> Path:
    """Compile the kernels into the cache unless a build for this source and CPU is there."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") \
        or shutil.which("clang++")
    if compiler is None:
        raise RuntimeError("no C++ compiler found")
    flags = FLAGS + os.environ.get("TITANS_LIGHTNING_CXXFLAGS", "").split()
    code = [path.read_bytes() for path in SOURCES + HEADERS]
    key = hashlib.sha256(b"\0".join([*code, " ".join(flags).encode(), compiler.encode(),
                                     _cpu_signature()])).hexdigest()[:16]
    cache = Path(os.environ.get("TITANS_LIGHTNING_CACHE")
                 or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                 / "titans_lightning")
    target = cache / f"kernels-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"titans-lightning: compiling the CPU kernels into {target} (once per machine and "
          "source version, about 20 s)", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:  # concurrent builds never see half a file
        built = Path(tmp) / target.name
        # With OpenMP the kernels share PyTorch's CPU thread pool (the libgomp.so.1 already
        # loaded), so the two never compete for cores as separately created threads would;
        # without it they run on one thread.
        for threading in (["-fopenmp"], []):
            result = subprocess.run([compiler, *flags, *threading, *map(str, SOURCES), "-o",
                                     str(built)], capture_output=True, text=True, timeout=300)
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
