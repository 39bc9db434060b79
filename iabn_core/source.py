"""Kernel sources as compilable text: quoted includes inlined, so one string is the whole program.

CuPy's disk cache keys on the source string, options, arch and NVRTC version, but not on headers
reached through -I. Inlining our own headers puts every byte of kernel code into the key, so a
changed header can never be served stale. `#line` directives keep compiler and emulator messages
pointing at the original file and line.
"""
from __future__ import annotations

import functools
import os
import re
from pathlib import Path

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$', re.M)


def kernel_dir() -> Path:
    """The folder holding the .cu/.cuh files: $IABN_KERNEL_DIR (to try modified kernels), the
    checkout's kernels/, or the installed copy."""
    override = os.environ.get("IABN_KERNEL_DIR")
    if override:
        return Path(override)
    here = Path(__file__).resolve().parent.parent / "kernels"
    if (here / "common.cuh").is_file():
        return here
    import iabn_kernels  # installed as package data by setup.cfg

    return Path(iabn_kernels.__file__).resolve().parent


def _expand(path: Path, seen: set[str]) -> str:
    out = []
    text = path.read_text()
    pos = 0
    line = 1
    for m in _INCLUDE.finditer(text):
        chunk = text[pos:m.start()]
        out.append(chunk)
        line += chunk.count("\n")
        name = m.group(1)
        if name not in seen:  # every header is `#pragma once`; inline each at most once
            seen.add(name)
            out.append(f'#line 1 "kernels/{name}"\n')
            out.append(_expand(path.parent / name, seen))
            out.append(f'\n#line {line + 1} "kernels/{path.name}"\n')
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


@functools.lru_cache(maxsize=None)
def assembled(filename: str) -> str:
    """Full translation unit for kernels/<filename> with our headers inlined."""
    path = kernel_dir() / filename
    return f'#line 1 "kernels/{filename}"\n' + _expand(path, set())

