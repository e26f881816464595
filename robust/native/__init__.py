"""Native CPU kernels, compiled on first use for the host CPU and loaded with ctypes.

PyTorch's CPU generator draws N(0, 1) numbers serially (about 190 million per
second on the development machine), which made fresh per-element feature noise
cost 16% of a resnet20 training step.  ``noise.cpp`` draws them from a
counter-based generator (Philox4x32-10 and Box-Muller) on all threads, fused
with the injection, and regenerates them in the backward pass instead of storing
them (see BENCHMARKS.md for the measured effect).

The library is built with the system C++ compiler (``$CXX``, else ``g++``) into
``$ROBUST_NATIVE_CACHE`` (default ``~/.cache/robust-runner/native``), in a folder
named by a hash of the source, the compiler's version, the flags and the CPU's
feature flags, so that a shared home directory never hands one CPU a build made
for another.  The build is written under a temporary name and renamed, so
concurrent workers never load a half-written file.  Where no compiler is found or
the build fails, :func:`library` returns None once with a warning and callers
keep their PyTorch path; ``ROBUST_NATIVE=0`` selects that path on purpose.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch  # noqa: F401  (loaded first: the kernels' libgomp.so.1 must resolve to PyTorch's)

SOURCE = Path(__file__).with_name("noise.cpp")
FLAGS = ("-O3", "-std=c++17", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC", "-pthread")
#: Flag sets tried in order: host-CPU code generation and OpenMP (the threads of the
#: libgomp.so.1 that PyTorch has loaded), then without the host CPU, then serial.
VARIANTS = (("-march=native", "-fopenmp"), ("-fopenmp",), ())

_lock = threading.Lock()
_library: Optional[ctypes.CDLL] = None
_tried = False


def enabled() -> bool:
    """False when ``ROBUST_NATIVE`` is set to 0/false/no/off."""
    return os.environ.get("ROBUST_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.split(":")[0].strip() in ("flags", "Features"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _cache_root() -> Path:
    """``$ROBUST_NATIVE_CACHE``, else ``~/.cache/robust-runner/native``, else (a home that
    cannot be written, as on some cluster images) a folder in the system's temp directory."""
    root = os.environ.get("ROBUST_NATIVE_CACHE")
    if root:
        return Path(root)
    home = Path.home() / ".cache" / "robust-runner" / "native"
    try:
        home.mkdir(parents=True, exist_ok=True)
        if os.access(home, os.W_OK):
            return home
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"robust-runner-native-{os.getuid()}"


def _compile(compiler: str, flags: tuple, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".build-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], check=True, capture_output=True, text=True,
                       timeout=300)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> Path:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    errors = []
    for variant in VARIANTS:
        flags = (*variant, *FLAGS)
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(flags), platform.machine(),
                                        _cpu_flags()]).encode()).hexdigest()[:16]
        target = _cache_root() / key / "noise.so"
        if target.exists():
            return target
        try:
            _compile(compiler, flags, target)
            return target
        except subprocess.CalledProcessError as exc:
            errors.append(exc.stderr.strip().splitlines()[-1] if exc.stderr.strip() else str(exc))
    raise RuntimeError("; ".join(errors))


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, u64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
    signatures = {
        "robust_philox4x32_10": [p, p, p],
        "robust_normal": [p, i64, u64, i32],
        "robust_noise_forward": [p, p, p, i64, i64, u64, i32],
        "robust_noise_grad_theta": [p, p, i64, i64, u64, i32],
    }
    for name, args in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes = args
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them on the first call; None where they are
    disabled (``ROBUST_NATIVE=0``) or cannot be built here (warned once)."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if not _tried:
            try:
                _library = _declare(ctypes.CDLL(str(_build())))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                warnings.warn(f"native noise kernels unavailable, using PyTorch's generator instead: {exc}",
                              RuntimeWarning, stacklevel=2)
                _library = None
            _tried = True
    return _library
