"""Loading emulated modules and launching kernels with strict argument checks."""

import contextlib
import contextvars
import ctypes
import os
import threading

import numpy as np

from . import build
from .errors import EmulatorError, LaunchConfigError

try:
    import ml_dtypes
    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - bf16 kernels just can't be called
    _BF16 = None

# Pointee / scalar C type -> the one NumPy dtype accepted for it.
_DTYPES = {
    "float": np.dtype(np.float32), "double": np.dtype(np.float64),
    "__half": np.dtype(np.float16),
    "int": np.dtype(np.int32), "unsigned int": np.dtype(np.uint32),
    "long long": np.dtype(np.int64), "unsigned long long": np.dtype(np.uint64),
    "long": np.dtype(np.int64), "unsigned long": np.dtype(np.uint64),
    "short": np.dtype(np.int16), "unsigned short": np.dtype(np.uint16),
    "signed char": np.dtype(np.int8), "char": np.dtype(np.int8),
    "unsigned char": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
}
if _BF16 is not None:
    _DTYPES["__nv_bfloat16"] = _BF16

MAX_DYN_SMEM = 227 * 1024
_reverse = contextvars.ContextVar("iabn_emulator_reverse", default=None)


@contextlib.contextmanager
def options(*, reverse: bool | None = None):
    """``with options(reverse=True):`` runs threads in reverse order within
    each scheduling round (default from env ``IABN_EMULATOR_REVERSE``)."""
    token = _reverse.set(reverse) if reverse is not None else None
    try:
        yield
    finally:
        if token is not None:
            _reverse.reset(token)


def reverse_enabled() -> bool:
    r = _reverse.get()
    if r is None:
        return os.environ.get("IABN_EMULATOR_REVERSE", "") not in ("", "0")
    return bool(r)


def asan_loaded() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return "libasan" in f.read()
    except OSError:
        return False


ASAN_HINT = ("ASAN_OPTIONS=detect_leaks=0 LD_PRELOAD=$(g++ -print-file-name=libasan.so) "
             "python -m pytest ...")


def _dim3(v, what):
    if isinstance(v, (int, np.integer)):
        v = (v,)
    if not isinstance(v, tuple) or not 1 <= len(v) <= 3:
        raise LaunchConfigError(f"{what} must be an int or a tuple of 1-3 ints, got {v!r}")
    dims = tuple(int(x) for x in v) + (1,) * (3 - len(v))
    if any(d < 1 for d in dims):
        raise LaunchConfigError(f"{what} dimensions must be >= 1, got {v!r}")
    return dims


class Kernel:
    def __init__(self, module, index, name):
        self.module = module
        self.name = name
        lib = module._lib
        self._launch = getattr(lib, f"iabn_emu_launch_{index}")
        self._launch.restype = ctypes.c_int
        self._launch.argtypes = [ctypes.POINTER(ctypes.c_uint), ctypes.POINTER(ctypes.c_uint),
                                 ctypes.c_ulonglong, ctypes.POINTER(ctypes.c_void_p)]
        sig = getattr(lib, f"iabn_emu_signature_{index}")
        sig.restype = ctypes.c_char_p
        text = sig().decode()
        self.signature = tuple(text.split(";")) if text else ()
        self.last_traffic = (0, 0)

    def __repr__(self):
        return f"<emulated kernel {self.name} {self.signature}>"

    def _marshal(self, i, ptype, arg, keep):
        """Return the address of storage holding argument i's value."""
        if ptype.endswith("*"):
            pointee = ptype[:-1].strip()
            const = pointee.startswith("const ")
            base = pointee[6:] if const else pointee
            if arg is None:
                cell = ctypes.c_void_p(None)
            elif isinstance(arg, np.ndarray):
                want = _DTYPES.get(base)
                if want is None:
                    raise TypeError(f"{self.name}: parameter {i} has unsupported type {ptype}")
                if arg.dtype != want:
                    raise TypeError(f"{self.name}: parameter {i} ({ptype}) expects an array of "
                                    f"dtype {want}, got {arg.dtype}")
                if not const and not arg.flags.writeable:
                    raise ValueError(f"{self.name}: parameter {i} ({ptype}) is written by the "
                                     f"kernel but the array is read-only")
                cell = ctypes.c_void_p(arg.ctypes.data)
            else:
                raise TypeError(f"{self.name}: parameter {i} ({ptype}) expects a numpy array "
                                f"or None, got {type(arg).__name__}")
            keep.append((cell, arg))
            return ctypes.addressof(cell)
        want = _DTYPES.get(ptype)
        if want is None:
            raise TypeError(f"{self.name}: parameter {i} has unsupported type {ptype}")
        if not isinstance(arg, np.generic) or arg.dtype != want:
            got = arg.dtype if isinstance(arg, np.generic) else type(arg).__name__
            raise TypeError(f"{self.name}: parameter {i} ({ptype}) expects a numpy scalar of "
                            f"dtype {want}, got {got}")
        buf = np.array(arg, dtype=want)
        keep.append(buf)
        return buf.ctypes.data

    def __call__(self, grid, block, args, shared_mem=0):
        g, b = _dim3(grid, "grid"), _dim3(block, "block")
        nthreads = b[0] * b[1] * b[2]
        if nthreads > 1024 or b[0] > 1024 or b[1] > 1024 or b[2] > 64:
            raise LaunchConfigError(f"block {b} has {nthreads} threads: CUDA allows at most "
                                    f"1024 (x, y <= 1024, z <= 64)")
        if g[0] > 2**31 - 1 or g[1] > 65535 or g[2] > 65535:
            raise LaunchConfigError(f"grid {g} exceeds CUDA limits")
        shared_mem = int(shared_mem)
        if not 0 <= shared_mem <= MAX_DYN_SMEM:
            raise LaunchConfigError(f"shared_mem={shared_mem} bytes: must be in "
                                    f"[0, {MAX_DYN_SMEM}] (227 KiB)")
        args = tuple(args)
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: expected {len(self.signature)} arguments "
                            f"{self.signature}, got {len(args)}")
        keep = []
        addrs = (ctypes.c_void_p * max(1, len(args)))()
        for i, (ptype, arg) in enumerate(zip(self.signature, args)):
            addrs[i] = self._marshal(i, ptype, arg, keep)
        self._launch_with(g, b, shared_mem, addrs)
        del keep

    def launch_packed(self, grid, block, shared_mem, params: int) -> None:
        """Launch with a driver-style `kernelParams` array at address `params` (one pointer
        per parameter, each to its value), as iabn_core.program packs it; no per-argument
        checks (`check_packed` makes them once, when the program is built)."""
        g, b = _dim3(tuple(grid), "grid"), _dim3(tuple(block), "block")
        self._launch_with(g, b, int(shared_mem),
                          ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p)))

    def check_packed(self, args) -> None:
        """Every argument a program will pack fits this kernel's parameter (pointers for
        pointer parameters, scalars of the exact dtype otherwise)."""
        if len(args) != len(self.signature):
            raise TypeError(f"{self.name}: expected {len(self.signature)} arguments "
                            f"{self.signature}, got {len(args)}")
        for i, (ptype, arg) in enumerate(zip(self.signature, args)):
            if ptype.endswith("*"):
                ok = not isinstance(arg, np.generic)
            else:
                ok = isinstance(arg, np.generic) and arg.dtype == _DTYPES.get(ptype)
                ok = ok or (not isinstance(arg, np.generic) and ptype in ("float", "double"))
            if not ok:
                raise TypeError(f"{self.name}: parameter {i} ({ptype}) cannot take {arg!r}")

    def _launch_with(self, g, b, shared_mem, addrs) -> None:
        gd, bd = (ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b)
        lib = self.module._lib
        with self.module._lock:  # runtime state in the .so is per module
            lib.iabn_emu_set_reverse(1 if reverse_enabled() else 0)
            rc = self._launch(gd, bd, shared_mem, addrs)
            traffic = (ctypes.c_ulonglong * 2)()
            lib.iabn_emu_traffic(traffic)
            self.last_traffic = (int(traffic[0]), int(traffic[1]))
            if rc != 0:
                msg = lib.iabn_emu_error().decode(errors="replace")
                raise EmulatorError(f"{self.name}: {msg}")


class Module:
    def __init__(self, path, name_expressions, asan):
        self.path = path
        self.asan = asan
        self._lib = ctypes.CDLL(str(path))
        self._lib.iabn_emu_error.restype = ctypes.c_char_p
        self._lock = threading.Lock()
        self._names = list(name_expressions)
        self._kernels = {}

    def get_function(self, name: str) -> Kernel:
        k = self._kernels.get(name)
        if k is None:
            try:
                idx = self._names.index(name)
            except ValueError:
                raise EmulatorError(f"{name!r} is not one of this module's name expressions: "
                                    f"{self._names}") from None
            k = self._kernels[name] = Kernel(self, idx, name)
        return k


_modules = {}
_modules_lock = threading.Lock()


def build_module(source: str, name_expressions, *, asan: bool | None = None) -> Module:
    """Compile (or fetch from cache) ``source`` and return a Module.

    ``asan`` defaults to env ``IABN_EMULATOR_ASAN``; an ASan module can only be
    loaded into a Python that has libasan preloaded."""
    if asan is None:
        asan = os.environ.get("IABN_EMULATOR_ASAN", "") not in ("", "0")
    names = list(name_expressions)
    if asan and not asan_loaded():
        raise EmulatorError("an AddressSanitizer build can only be loaded when libasan is "
                            "preloaded into Python; run e.g.\n  " + ASAN_HINT)
    path = build.build_library(source, names, bool(asan))
    key = (str(path), tuple(names))
    with _modules_lock:
        mod = _modules.get(key)
        if mod is None:
            mod = _modules[key] = Module(path, names, bool(asan))
    return mod


def clear_loaded_modules():
    """Forget loaded modules (tests use this to exercise the on-disk cache)."""
    with _modules_lock:
        _modules.clear()
