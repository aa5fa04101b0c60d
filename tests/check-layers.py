#!/usr/bin/env python3
# SPDX-License-Identifier: MIT
"""The layer check: lib/README.md's table is the map, and the code must
agree with it.

  check-layers.py SOURCE_ROOT BUILD_DIR      check (the `layers` test)
  check-layers.py SOURCE_ROOT --write-docs   copy the table into docs/design.md

Checked, with no allowance outside the table:
- every file under lib/ has a row, every row a file, every layer is known;
- the "may call" column names files or folders that exist, never a file of
  a higher layer, and has no circle (files; a folder stands for its files);
- every object the build compiled from lib/ (every variant: the shipped
  layers, the preload and test builds, the tracer): each symbol it takes
  from another object, function or data, is defined by itself or a file
  its row may call; each one no object defines (the C library's) is in the
  common sets below or in the row's own list;
- every #include "..." of a lib/ file names a header of its own folder or
  a header its row may call, and a header of another folder only if that
  header is its folder's way in (layer column "... (way in)");
- docs/design.md shows the same table.
"""
import os
import re
import subprocess
import sys
from fnmatch import fnmatch

# What any file may use of the C library and the compiler's runtime: memory
# and string functions that touch only their arguments, and formatting into
# a buffer. Everything else is named in the file's row, with the reason (a
# row whose cell starts with "only" gets no common set: exactly its list).
COMMON = {
    "runtime": ["_GLOBAL_OFFSET_TABLE_", "__tls_get_addr", "__errno_location",
                "__stack_chk_fail", "__popcountdi2"],
    "string": ["memcpy", "memset", "memmove", "memcmp", "strlen", "strcmp", "strncmp",
               "strcasecmp", "strncat", "strcpy", "strchr", "strrchr", "strstr"],
    "format": ["snprintf", "vsnprintf", "__isoc99_sscanf"],
}
COMMON_NAMES = {n for names in COMMON.values() for n in names}

# The files that define C library names (malloc and the rest) to replace
# the C library's: a use of such a name elsewhere is a use of the C library,
# whoever serves it in the process. Every other global is ta_ or _ta_.
LIBC_NAMES_DEFINED_BY = {"preload/preload.c", "core/alloc.c", "trace/trace.c"}

BEGIN = "<!-- layers: begin (generated from lib/README.md by tests/check-layers.py --write-docs) -->"
END = "<!-- layers: end -->"


def fail(problems):
    for p in problems:
        print("FAIL: " + p)
    sys.exit(1)


def read_table(root):
    text = open(os.path.join(root, "lib", "README.md")).read()
    order = re.search(r"^Layers, bottom to top: (.*)\.$", text, re.M)
    layers = [w.strip() for w in order.group(1).split(",")]
    block = text[text.index(BEGIN.split(" (")[0]):text.index(END)]
    rows = {}
    for line in block.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 5 or not cells[0].startswith("`"):
            continue
        name, layer, owns, calls, libc = cells
        only = libc.startswith("only ")
        libc = libc[len("only "):] if only else libc
        rows[name.strip("`")] = {
            "layer": layer.replace(" (way in)", ""),
            "way_in": layer.endswith("(way in)"),
            "calls": [c.strip("` ") for c in calls.split(",") if c.strip() not in ("", "—")],
            "libc": [c.strip("` ") for c in re.sub(r"\([^)]*\)", "", libc).split(",")
                     if c.strip() not in ("", "—")],
            "only": only,
        }
    return text, block, layers, rows


def expand(root, rows, targets):
    """Files named by a "may call" list (a folder stands for its files)."""
    out = set()
    for t in targets:
        if t.endswith("/"):
            out |= {f for f in rows if f.startswith(t)}
        else:
            out.add(t)
    return out


def check_table(root, layers, rows):
    problems = []
    lib = os.path.join(root, "lib")
    files = {os.path.relpath(os.path.join(d, f), lib)
             for d, _, fs in os.walk(lib) for f in fs if f != "README.md"}
    for f in sorted(files - rows.keys()):
        problems.append(f"lib/{f} has no row in lib/README.md")
    for f in sorted(rows.keys() - files):
        problems.append(f"lib/README.md names lib/{f}, which does not exist")
    rank = {l: i for i, l in enumerate(layers)}
    for f, r in rows.items():
        if r["layer"] not in rank:
            problems.append(f"lib/{f}: unknown layer {r['layer']}")
            continue
        for t in r["calls"]:
            if t.endswith("/"):
                if not any(g.startswith(t) for g in rows):
                    problems.append(f"lib/{f} may call {t}, which has no files")
                    continue
            elif t not in rows:
                problems.append(f"lib/{f} may call {t}, which has no row")
                continue
            for g in expand(root, rows, [t]):
                if rank.get(rows[g]["layer"], -1) > rank[r["layer"]]:
                    problems.append(f"lib/{f} ({r['layer']}) may call lib/{g}, "
                                    f"of the higher layer {rows[g]['layer']}")
    # No circle: depth-first search over files.
    state = {}

    def visit(f, path):
        state[f] = 1
        for g in sorted(expand(root, rows, rows[f]["calls"])):
            if g == f or g not in rows:
                continue
            if state.get(g) == 1:
                problems.append("a circle in the table: " + " -> ".join(path + [f, g]))
            elif g not in state:
                visit(g, path + [f])
        state[f] = 2

    for f in sorted(rows):
        if f not in state:
            visit(f, [])
    return problems


def objects(build):
    """Every object compiled from lib/, with the file it came from."""
    out = []
    for d, _, fs in os.walk(build):
        for f in fs:
            m = re.match(r"lib_(.+)\.(c|cpp)\.o$", f)
            if m and d.endswith(".p") and not os.path.basename(d).startswith(("fuzz", "test")):
                # lib_core_alloc.c.o is lib/core/alloc.c (a file of an older,
                # flat lib/ becomes a name without a row, reported as such)
                out.append((os.path.join(d, f),
                            m.group(1).replace("_", "/", 1) + "." + m.group(2)))
    return out


def nm(path, *args):
    lines = subprocess.run(["nm", *args, path], capture_output=True, text=True,
                           check=True).stdout.splitlines()
    return [l.split()[-2:] for l in lines if l.strip()]


def check_objects(root, build, rows):
    problems = []
    objs = objects(build)
    if not objs:
        return [f"no object of lib/ found under {build}"]
    definer = {}
    for path, src in objs:
        if src not in rows:
            problems.append(f"{path}: compiled from lib/{src}, which has no row")
            continue
        for kind, sym in nm(path, "--defined-only"):
            # Weak and unique definitions (W, V, u) are C++'s inline functions,
            # templates and type information from the headers: not the file's.
            if not kind.isupper() or kind in "WV":
                continue
            # C++ names live in namespace tensoralloc (_ZN11tensoralloc...).
            if sym.startswith(("ta_", "_ta_", "_ZN11tensoralloc")):
                definer.setdefault(sym, set()).add(src)
            elif src not in LIBC_NAMES_DEFINED_BY:
                problems.append(f"lib/{src} defines {sym}, outside the ta_, _ta_ and "
                                "tensoralloc:: names")
    for path, src in objs:
        if src not in rows:
            continue
        r = rows[src]
        allowed = expand(root, rows, r["calls"]) | {src}
        for _, sym in nm(path, "-u"):
            owners = definer.get(sym)
            if owners:
                if not owners & allowed:
                    problems.append(f"lib/{src} uses {sym} of lib/{'/'.join(sorted(owners))}, "
                                    "not in its row's \"may call\"")
            elif (r["only"] or sym not in COMMON_NAMES) and \
                    not any(fnmatch(sym, p) for p in r["libc"]):
                problems.append(f"lib/{src} uses {sym} of the C library, not in its row" +
                                ("" if r["only"] else " nor in the common sets"))
    return sorted(set(problems))


def check_includes(root, rows):
    problems = []
    for f, r in rows.items():
        if not f.endswith((".c", ".cpp", ".h")):
            continue
        folder = f.split("/")[0]
        allowed = expand(root, rows, r["calls"])
        for inc in re.findall(r'^#include "([^"]+)"', open(os.path.join(root, "lib", f)).read(),
                              re.M):
            if inc.startswith("tensoralloc") or inc.startswith("tensoralloc_"):
                continue  # the public headers (include/)
            target = inc if "/" in inc else folder + "/" + inc
            if target not in rows:
                problems.append(f"lib/{f} includes {inc}, which has no row")
            elif target not in allowed:
                problems.append(f"lib/{f} includes lib/{target}, not in its row's \"may call\"")
            elif target.split("/")[0] != folder and not rows[target]["way_in"]:
                problems.append(f"lib/{f} includes lib/{target}, which is not its folder's way in")
    return problems


def main():
    root = sys.argv[1]
    text, block, layers, rows = read_table(root)
    design = os.path.join(root, "docs", "design.md")
    doc = open(design).read()
    start, end = doc.find(BEGIN), doc.find(END)
    if len(sys.argv) > 2 and sys.argv[2] == "--write-docs":
        if start < 0 or end < 0:
            fail([f"{design} has no {BEGIN} ... {END} block"])
        new = doc[:start] + BEGIN + block[block.index("\n"):] + doc[end:]
        open(design, "w").write(new)
        return
    problems = check_table(root, layers, rows)
    problems += check_includes(root, rows)
    problems += check_objects(root, sys.argv[2], rows)
    if start < 0 or end < 0 or doc[start:end].split("\n", 1)[1] != block.split("\n", 1)[1]:
        problems.append("docs/design.md's map differs from lib/README.md's table "
                        "(tests/check-layers.py SOURCE_ROOT --write-docs)")
    if problems:
        fail(problems)
    print(f"PASS: {len(rows)} files of lib/ in the table; every object's symbols, every "
          "include and docs/design.md agree with it; no circle")


if __name__ == "__main__":
    main()
