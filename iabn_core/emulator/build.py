"""Compile a CUDA C++ translation unit into a host shared library.

The .so is cached under ``<root>/emulator``, root being the first of
``$IABN_CACHE_DIR``, ``$XDG_CACHE_HOME/iabn`` and ``~/.cache/iabn``, keyed by
everything that affects the binary. It is published with an atomic rename so
concurrent processes never see a partial file, and built under a per-key lock
so the threads of one process compile it once.
"""

import functools
import hashlib
import os
import subprocess
import tempfile
import threading
from pathlib import Path

from .errors import EmulatorError
from .rewrite import rewrite_shared

INCLUDE_DIR = Path(__file__).resolve().parent / "include"
CXX = os.environ.get("IABN_EMULATOR_CXX", "g++")
BASE_FLAGS = ["-std=c++17", "-O1", "-fno-strict-aliasing", "-shared", "-fPIC",
              # One private copy of the runtime per .so; no STB_GNU_UNIQUE
              # symbols that would merge statics across loaded modules.
              "-fvisibility=hidden", "-fno-gnu-unique", "-fno-threadsafe-statics",
              "-w"]
ASAN_FLAGS = ["-fsanitize=address", "-fno-omit-frame-pointer", "-g"]

# Number of real compiler invocations in this process (lets tests prove a
# cache hit).
compile_count = 0


# One lock per cache key: a second thread asking for a module being compiled waits for it
# instead of compiling it again (processes are kept apart by the atomic publish only).
_build_locks: dict[str, threading.Lock] = {}
_build_locks_guard = threading.Lock()


def cache_dir() -> Path:
    root = os.environ.get("IABN_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        # XDG says a relative value is invalid and must be ignored.
        base = (Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache") / "iabn"
    return base / "emulator"


@functools.lru_cache(maxsize=None)
def _compiler_version() -> str:
    try:
        return subprocess.run([CXX, "--version"], capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise EmulatorError(f"cannot run C++ compiler {CXX!r}: {e}") from None


def _headers_digest() -> str:
    h = hashlib.sha256()
    for p in sorted(INCLUDE_DIR.glob("*.h")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()


def flags_for(asan: bool) -> list[str]:
    flags = BASE_FLAGS + (ASAN_FLAGS if asan else [])
    # The portable swapcontext fallback is used automatically off x86_64;
    # this lets it be exercised (and tested) on x86_64 too.
    if os.environ.get("IABN_EMULATOR_UCONTEXT", "") not in ("", "0"):
        flags = flags + ["-DIABN_EMU_FORCE_UCONTEXT"]
    return flags


def _wrappers(name_expressions: list[str]) -> str:
    # Generated at the end of the TU: per kernel, a launcher and a signature
    # query, both deduced from the function pointer type.
    lines = ['\n#line 1 "<iabn-emulator-wrappers>"']
    for i, expr in enumerate(name_expressions):
        lines.append(
            f"IABN_EMU_EXPORT int iabn_emu_launch_{i}(const unsigned* g, const unsigned* b, "
            f"unsigned long long smem, void** args) {{ "
            f"return ::iabn_emu::launch(&{expr}, g, b, smem, args); }}")
        lines.append(
            f"IABN_EMU_EXPORT const char* iabn_emu_signature_{i}() {{ "
            f"return ::iabn_emu::signature(&{expr}); }}")
    return "\n".join(lines) + "\n"


def translation_unit(source: str, name_expressions: list[str]) -> str:
    return '#line 1 "<source>"\n' + rewrite_shared(source) + _wrappers(name_expressions)


def build_library(source: str, name_expressions: list[str], asan: bool) -> Path:
    """Return the path of the cached .so for this source, compiling if needed."""
    for expr in name_expressions:
        if not isinstance(expr, str) or not expr.strip() or "\n" in expr:
            raise ValueError(f"bad name expression: {expr!r}")
    flags = flags_for(asan)
    key = hashlib.sha256("\0".join(
        [source, "\x01".join(name_expressions), _headers_digest(), _compiler_version(),
         CXX, " ".join(flags)]).encode()).hexdigest()
    out_dir = cache_dir()
    so_path = out_dir / f"{key[:40]}{'-asan' if asan else ''}.so"
    if so_path.exists():
        return so_path
    with _build_locks_guard:
        lock = _build_locks.setdefault(str(so_path), threading.Lock())
    with lock:
        if so_path.exists():  # built by another thread while this one waited
            return so_path
        return _compile(source, name_expressions, flags, out_dir, so_path)


def _compile(source, name_expressions, flags, out_dir: Path, so_path: Path) -> Path:
    global compile_count
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=out_dir) as tmp:
        cpp = Path(tmp) / "kernel.cpp"
        cpp.write_text(translation_unit(source, name_expressions))
        tmp_so = Path(tmp) / "kernel.so"
        cmd = [CXX, *flags, "-I", str(INCLUDE_DIR), "-include", "emu_cuda.h",
               str(cpp), "-o", str(tmp_so)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        with _build_locks_guard:
            compile_count += 1
        if proc.returncode != 0:
            raise EmulatorError(
                f"compilation failed ({' '.join(cmd)}):\n{proc.stdout}{proc.stderr}")
        os.replace(tmp_so, so_path)  # atomic publish
    return so_path
