"""Source-to-source rewriting of ``__shared__`` declarations.

Static ``__shared__`` variables become function/namespace statics followed by
a registration (``IABN_EMU_SHARED(name)``) so the runtime can refill them with
a poison pattern before every block.  (A linker-section trick would avoid the
rewrite, but GCC silently ignores ``section`` attributes on statics inside
templates, and the kernels are templates.)

``extern __shared__ T name[];`` becomes ``extern T name[] __asm__(SYM);`` so
that every dynamic shared declaration, whatever its name or scope, aliases the
single dynamic buffer, as in CUDA.

Line structure is preserved exactly so ``#line`` directives keep pointing at
the right source lines.
"""

import re

DYN_SYMBOL = "iabn_emu_dyn_smem"
_IDENT = re.compile(r"[A-Za-z_]\w*")
_ALIGN = re.compile(r"__align__\s*\(\s*\d+\s*\)")


def _code_mask(src: str) -> list[bool]:
    """True for characters that are code (not comments, literals, or
    preprocessor lines), so keywords there are never rewritten."""
    mask = [True] * len(src)
    i, n = 0, len(src)
    line_start = True
    while i < n:
        c = src[i]
        if line_start and c == "#":
            j = i
            while j < n and src[j] != "\n":  # directive incl. continuations
                j += 2 if src[j] == "\\" else 1
            for k in range(i, min(j, n)):
                mask[k] = False
            i = j
            continue
        if c == "\n":
            line_start = True
            i += 1
            continue
        if c in " \t":
            i += 1
            continue
        line_start = False
        if src.startswith("//", i):
            j = src.find("\n", i)
            j = n if j < 0 else j
        elif src.startswith("/*", i):
            j = src.find("*/", i + 2)
            j = n if j < 0 else j + 2
        elif c in "\"'":
            j = i + 1
            while j < n and src[j] != c:
                j += 2 if src[j] == "\\" else 1
            j += 1
        else:
            i += 1
            continue
        for k in range(i, min(j, n)):
            mask[k] = False
        i = j
    return mask


def _split_top(text: str) -> list[str]:
    """Split a declaration at commas that are outside any brackets."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return parts


def _declarator_name(part: str) -> str | None:
    """Name declared by one declarator: the last identifier before any
    array bound or initializer."""
    head = re.split(r"[\[=]", part, maxsplit=1)[0]
    names = [m for m in _IDENT.findall(_ALIGN.sub("", head)) if m != "__shared__"]
    return names[-1] if names else None


def rewrite_shared(src: str) -> str:
    mask = _code_mask(src)
    out, pos = [], 0
    for m in re.finditer(r"\b__shared__\b", src):
        start = m.start()
        if start < pos or not mask[start]:
            continue
        # Statement bounds: back to the previous ; { } and forward to ;.
        s = start
        while s > 0 and not (mask[s - 1] and src[s - 1] in ";{}"):
            s -= 1
        e = start
        while e < len(src) and not (mask[e] and src[e] == ";"):
            e += 1
        if e >= len(src) or s < pos:
            continue
        # Skip whitespace, comments and directives (#line) before the decl.
        while s < start and (not mask[s] or src[s].isspace()):
            s += 1
        body = src[s:e]
        if re.match(r"extern\b", body):
            new = re.sub(r"\b__shared__\b", "", body) + f' __asm__("{DYN_SYMBOL}")'
        else:
            names = [_declarator_name(p) for p in _split_top(body.split("__shared__", 1)[1])]
            if not names or None in names:
                continue  # leave to the `#define __shared__ static` fallback
            new = body.replace("__shared__", "static", 1) + ";" + " ".join(
                f"IABN_EMU_SHARED({nm})" + (";" if i + 1 < len(names) else "")
                for i, nm in enumerate(names))
        out.append(src[pos:s])
        out.append(new)
        pos = e  # the original ';' is kept and terminates the last statement
    out.append(src[pos:])
    return "".join(out)
