"""Size accounting: `python build.py check-size` holds dist/nodeagent and the node's initramfs to
[tool.nodeagent.size-budget] of pyproject.toml, prints where the binary's bytes come from (the linker map) and
guards the excluded modules (Nuitka's report)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from . import BuildError, pyproject
NOT_IN_FILE = (".bss", ".tbss", "COMMON", ".note.GNU-stack", ".comment", ".debug", ".stab", ".gnu.warning")


def parse_link_map(text: str) -> dict[str, int]:
    """Bytes each linked input file (an object, or an archive member "lib.a(member.o)") puts into the sections that
    occupy the executable file, from a GNU ld map (-Wl,-Map). Pure: takes the map's text."""
    sizes: dict[str, int] = {}
    lines = text.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith("Linker script and memory map"))
    except StopIteration:
        raise ValueError("not a GNU ld map (no 'Linker script and memory map')") from None
    pending = None  # an input section name whose address/size/file are on the next line
    for line in lines[start + 1:]:
        if not line.startswith(" ") or line.startswith(" *"):
            pending = None
            continue
        fields = line.split()
        if pending is None and line[1] not in " " and fields and fields[0].startswith("."):
            if len(fields) == 1:
                pending = fields[0]
                continue
            name, rest = fields[0], fields[1:]
        elif pending is not None:
            name, rest = pending, fields
            pending = None
        else:
            continue
        if len(rest) < 3 or not rest[0].startswith("0x") or not rest[1].startswith("0x"):
            continue
        if any(name.startswith(prefix) for prefix in NOT_IN_FILE):
            continue
        size = int(rest[1], 16)
        if size:
            path = " ".join(rest[2:])
            sizes[path] = sizes.get(path, 0) + size
    return sizes


def contributor_label(path: str) -> tuple[str, str]:
    """(group, item) for a linked file: archives by name with their member, Nuitka's compiled modules by module."""
    name = os.path.basename(path)
    if "(" in name and name.endswith(")"):
        archive, member = name[:-1].split("(", 1)
        return archive, member
    if name.startswith("module.") and name.endswith(".o"):
        return "compiled Python (Nuitka)", name[len("module."):-2]
    if name.startswith("__constants") or name.startswith("__bytecode"):
        return "constants and bytecode (Nuitka)", name[:-2]
    return "other objects", name


def size_budget() -> dict:
    """[tool.nodeagent.size-budget]: binary and initramfs byte limits, and the modules that must stay out."""
    return pyproject()["tool"]["nodeagent"]["size-budget"]


def excluded_modules_found(report_xml: str, excluded: list[str]) -> list[str]:
    """Modules of Nuitka's compilation report (--report) that are excluded modules or inside excluded packages."""
    import xml.etree.ElementTree as ET

    names = {m.get("name") for m in ET.fromstring(report_xml).iter("module") if m.get("name")}
    return sorted(n for n in names if any(n == ex or n.startswith(ex + ".") for ex in excluded))


def size_table(sizes: dict[str, int], top: int = 25) -> list[str]:
    """Lines of a table: totals by group (archive / kind), then the biggest single contributors."""
    groups: dict[str, int] = {}
    items: list[tuple[int, str]] = []
    for path, size in sizes.items():
        group, item = contributor_label(path)
        groups[group] = groups.get(group, 0) + size
        items.append((size, f"{group}: {item}"))
    total = sum(sizes.values()) or 1
    lines = [f"{'linked bytes by origin':<60} {'KiB':>8} {'share':>6}"]
    for group, size in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {group:<58} {size / 1024:8.0f} {100 * size / total:5.1f}%")
    lines.append(f"{'biggest contributors':<60} {'KiB':>8} {'share':>6}")
    for size, label in sorted(items, reverse=True)[:top]:
        lines.append(f"  {label[:58]:<58} {size / 1024:8.0f} {100 * size / total:5.1f}%")
    return lines


def check_size(binary: Path, top: int = 25) -> int:
    """Print the budget's table, the contributors and the excluded-modules check; 0 when all hold, 1 when not,
    2 without a binary."""
    from .node_initramfs import build_node_initramfs

    budget = size_budget()
    if not binary.is_file():
        print(f"check-size: no {binary} (build it: python build.py static)", file=sys.stderr)
        return 2
    failures = []
    try:
        node = build_node_initramfs(binary, binary.parent / "initramfs.cpio.xz")
    except BuildError as err:  # no kernel to take the modules from, a module missing from it, ...
        print(f"check-size: the node initramfs: {err}", file=sys.stderr)
        return 1
    rows = [("binary (stripped)", binary, binary.stat().st_size, budget["binary"]),
            (f"initramfs (.cpio.xz, {len(node.modules)} modules)", node.path, node.path.stat().st_size,
             budget["initramfs"])]
    print(f"{'what':<40} {'bytes':>11} {'budget':>11}  verdict")
    for what, path, size, limit in rows:
        ok = size <= limit
        print(f"{what:<40} {size:>11,} {limit:>11,}  {'ok' if ok else 'OVER by %d' % (size - limit)}")
        if not ok:
            failures.append(f"{path} is {size:,} bytes, over its budget of {limit:,}")
    # What a node loads over TFTP/HTTP at every boot: the kernel the modules come from, and the initramfs.
    if node.kernel is not None:
        kernel_size = node.kernel.stat().st_size
        print(f"{'kernel (' + node.kernel.name + ')':<40} {kernel_size:>11,}")
        print(f"{'PXE payload (kernel + initramfs)':<40} {kernel_size + node.path.stat().st_size:>11,}")
    link_map = binary.with_name(binary.name + ".map")
    if link_map.is_file():
        print()
        print("\n".join(size_table(parse_link_map(link_map.read_text(errors="replace")), top=top)))
    else:
        print(f"(no {link_map}: no table of contributors)")
    report = binary.with_name(binary.name + "-report.xml")
    if not report.is_file():
        failures.append(f"no {report}: cannot check that excluded modules stay out")
    else:
        found = excluded_modules_found(report.read_text(errors="replace"), budget["excluded-modules"])
        print(f"\nexcluded modules ({len(budget['excluded-modules'])} checked): "
              f"{'none included' if not found else 'INCLUDED: ' + ', '.join(found)}")
        if found:
            failures.append(f"excluded modules found their way into the binary: {', '.join(found)}")
    for failure in failures:
        print(f"check-size: {failure}", file=sys.stderr)
    return 1 if failures else 0

