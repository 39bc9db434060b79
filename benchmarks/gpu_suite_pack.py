"""Packing the GPU suite's results into what comes back from the machine, and unpacking them.

What comes back from a device run is limited: at most 8 files, 16 MiB each, no deeper than 2
folders, names of letters, digits, '.', '_' and '-' only. So the whole results folder travels
as one `results.tar.gz` (top folder = the device slug, as under benchmarks/results/), next to
a few loose files worth reading without unpacking (verdict.md, suite.log, summary.md). Every
file is written under a temporary name and renamed, so a kill mid-write leaves the previous
complete copy. If the archive would exceed the size limit, the largest text files inside it
are cut to head + tail (binary files that do not fit are left out), and PACKING.txt inside
the archive lists every cut.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import tarfile
from pathlib import Path

MAX_FILES = 8
MAX_BYTES = 16 * 2 ** 20
MAX_DEPTH = 2  # folders below the output folder
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
ARCHIVE = "results.tar.gz"
BINARY = {".png", ".jpg", ".gz", ".xz", ".zip", ".npy", ".pt"}
MIN_CAP = 16 * 1024


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) or "_"


def _cut(data: bytes, cap: int) -> bytes:
    half = cap // 2
    note = f"\n[... {len(data) - 2 * half} bytes cut by the GPU suite's packer ...]\n".encode()
    return data[:half] + note + data[-half:]


def _archive(results: Path, top: str, cap: int) -> tuple[bytes, list[str]]:
    """(tar.gz bytes, notes) with every file over `cap` bytes cut (text) or left out."""
    notes: list[str] = []
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=6) as tf:
        for path in sorted(p for p in results.rglob("*") if p.is_file()):
            rel = path.relative_to(results).as_posix()
            data = path.read_bytes()
            if len(data) > cap:
                if path.suffix.lower() in BINARY:
                    notes.append(f"left out {rel} ({len(data)} bytes, binary)")
                    continue
                notes.append(f"cut {rel} from {len(data)} to about {cap} bytes (head + tail)")
                data = _cut(data, cap)
            _add(tf, f"{top}/{rel}", data)
        if notes:
            _add(tf, f"{top}/PACKING.txt", ("\n".join(notes) + "\n").encode())
    return buf.getvalue(), notes


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), 0o644
    tf.addfile(info, io.BytesIO(data))


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def pack(results: Path, out: Path, top: str, extras=(), max_files: int = MAX_FILES,
         max_bytes: int = MAX_BYTES) -> list[str]:
    """Writes out/results.tar.gz (results/ under the folder `top`) and copies `extras` next
    to it, within the limits; returns notes on anything cut or left out."""
    out.mkdir(parents=True, exist_ok=True)
    top = safe_name(top)
    cap = max_bytes
    while True:
        data, notes = _archive(results, top, cap)
        if len(data) <= max_bytes or cap <= MIN_CAP:
            break
        cap = max(MIN_CAP, cap // 2)
    if len(data) > max_bytes:  # even minimal copies do not fit: keep the text summaries only
        keep = {p for p in results.rglob("*.md")}
        slim = results.parent / (results.name + "-slim")
        shutil.rmtree(slim, ignore_errors=True)
        for p in keep:
            dst = slim / p.relative_to(results)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        data, more = _archive(slim, top, MIN_CAP)
        notes = notes + more + ["archive over the size limit: only the .md files kept"]
        shutil.rmtree(slim, ignore_errors=True)
    _write(out / ARCHIVE, data)
    present = {p.name for p in out.iterdir() if p.is_file()}
    for src in extras:
        src = Path(src)
        name = safe_name(src.name)
        if not src.is_file():
            continue
        if name not in present and len(present) >= max_files:
            notes.append(f"left {name} out of the output folder (file limit {max_files})")
            continue
        body = src.read_bytes()
        if len(body) > max_bytes:
            body = _cut(body, max_bytes - 256)
            notes.append(f"cut {name} to {max_bytes} bytes")
        _write(out / name, body)
        present.add(name)
    return notes


def check_out(out: Path, max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
              max_depth: int = MAX_DEPTH) -> list[str]:
    """Every way the output folder breaks the limits of what comes back ([] when none)."""
    problems = []
    files = [p for p in out.rglob("*") if p.is_file()]
    if len(files) > max_files:
        problems.append(f"{len(files)} files (limit {max_files})")
    for p in out.rglob("*"):
        rel = p.relative_to(out)
        if any(not NAME_OK.match(part) for part in rel.parts):
            problems.append(f"bad name: {rel}")
        if p.is_file() and p.stat().st_size > max_bytes:
            problems.append(f"{rel}: {p.stat().st_size} bytes (limit {max_bytes})")
        if len(rel.parts) - (1 if p.is_file() else 0) > max_depth:
            problems.append(f"{rel}: deeper than {max_depth} folders")
    return problems


def unpack(archive: Path, dest: Path) -> Path:
    """Extracts a results.tar.gz into dest/<device>/ (replacing files of the same name) and
    returns that folder. Refuses archives that are not one top folder of plain files."""
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        tops = {m.name.split("/", 1)[0] for m in members}
        if len(tops) != 1 or not NAME_OK.match(next(iter(tops))):
            raise ValueError(f"{archive}: expected one top folder named like a device, got "
                             f"{sorted(tops)[:5]}")
        for m in members:
            if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in m.name.split("/"):
                raise ValueError(f"{archive}: refusing member {m.name!r}")
        dest.mkdir(parents=True, exist_ok=True)
        # extraction filters arrived in 3.10.12/3.11.4; on older patch releases the member
        # checks above are the guard
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tf.extractall(dest, members=members, **safe)
    return dest / next(iter(tops))
