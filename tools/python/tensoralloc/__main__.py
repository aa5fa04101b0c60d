# SPDX-License-Identifier: MIT
"""python -m tensoralloc: start a program with the preload library that
came with this package, as `memray run` does for its tracker.

    python -m tensoralloc run [OPTIONS] [--] script.py [ARGS...]
    python -m tensoralloc run [OPTIONS] [--] -m module [ARGS...]
    python -m tensoralloc run [OPTIONS] [--] COMMAND [ARGS...]
    python -m tensoralloc preload-path

The wheel's `tensoralloc-run` console script is `run` by itself. The
options are tools/tensoralloc-run's (the shell launcher of a meson
install); they become TENSORALLOC_* variables (docs/preload.md).
"""
import os
import sys

from . import parse_bytes, preload_path

USAGE = """\
usage: {prog} [OPTIONS] [--] PROGRAM [ARGS...]

Runs PROGRAM with tensoralloc replacing malloc (LD_PRELOAD of the preload
library that came with this package). PROGRAM is a Python script (*.py),
-m MODULE or -c CODE (run by this interpreter), or any command.

  --threshold SIZE   blocks of SIZE and up get their own mapping (default 256K)
  --retain SIZE      bytes of freed mappings kept for reuse (0: unmap at once)
  --retain-ms MS     how long a freed mapping may wait for reuse (default 500)
  --thp on|off|auto  transparent huge pages for blocks >= 2 MiB (default auto:
                     when the process writes its large blocks whole)
  --stats            print tensoralloc's statistics when the program exits
  --verbose          report option problems and decisions on stderr
  --library PATH     use this preload library instead of the package's
  -h, --help         show this help

SIZE accepts K, M, G suffixes (powers of 1024)."""

_VALUED = {"--threshold": "THRESHOLD", "--retain": "RETAIN_BYTES", "--retain-ms": "RETAIN_MS",
           "--thp": "THP"}
_FLAGS = {"--stats": "STATS", "--verbose": "VERBOSE"}
# The ranges of lib/base/options.c's table, where the library would ignore
# a value outside them (the Launcher test holds the two to each other).
_RANGES = {"--threshold": (16 << 10, 1 << 20), "--retain": (0, 1 << 50),
           "--retain-ms": (0, 3600 * 1000)}


class UsageError(Exception):
    pass


def _option_value(option, value):
    """The variable's value, checked here so that a typo is an error, not
    a default silently kept."""
    if option == "--thp":
        if value not in ("on", "off", "auto"):
            raise UsageError(f"--thp takes on, off or auto, not {value!r}")
        return value
    if option == "--retain-ms":
        if not (value.isascii() and value.isdigit()):
            raise UsageError(f"--retain-ms takes a number of milliseconds, not {value!r}")
        number = int(value)
    else:
        try:
            number = parse_bytes(value)
        except ValueError as e:
            raise UsageError(f"{option}: {e}") from None
    low, high = _RANGES[option]
    if not low <= number <= high:
        raise UsageError(f"{option} {value}: outside what tensoralloc accepts ({low} to {high})")
    return str(number)


def parse(argv):
    """(environment additions, preload library or None, command)."""
    env, library = {}, None
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            i += 1
            break
        if arg in _VALUED or arg == "--library":
            if i + 1 >= len(argv):
                raise UsageError(f"{arg} needs a value")
            if arg == "--library":
                library = argv[i + 1]
            else:
                env["TENSORALLOC_" + _VALUED[arg]] = _option_value(arg, argv[i + 1])
            i += 2
        elif arg in _FLAGS:
            env["TENSORALLOC_" + _FLAGS[arg]] = "1"
            i += 1
        elif arg in ("-h", "--help"):
            return None
        elif arg.startswith("-") and arg not in ("-m", "-c"):
            raise UsageError(f"unknown option {arg}")
        else:
            break
    command = argv[i:]
    if not command:
        raise UsageError("no program given")
    if command[0] in ("-m", "-c"):
        if len(command) < 2:
            raise UsageError(f"{command[0]} needs an argument")
        command = [sys.executable] + command
    elif command[0].endswith(".py"):
        command = [sys.executable] + command
    return env, library, command


def run(argv, prog):
    try:
        parsed = parse(argv)
    except UsageError as e:
        print(f"{prog}: {e}\n" + USAGE.format(prog=prog), file=sys.stderr)
        return 2
    if parsed is None:
        print(USAGE.format(prog=prog))
        return 0
    env_add, library, command = parsed
    try:
        library = os.path.abspath(library) if library else preload_path()
    except FileNotFoundError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 127
    if not os.path.isfile(library):
        print(f"{prog}: no preload library at {library}", file=sys.stderr)
        return 127
    if any(c in library for c in " :\t\n"):
        # The loader splits LD_PRELOAD at spaces and colons, with no escape.
        print(f"{prog}: the preload library's path {library!r} holds a space or a colon, "
              "which LD_PRELOAD cannot carry; install the package (or pass --library) "
              "in a folder without them", file=sys.stderr)
        return 2
    env = dict(os.environ, **env_add)
    env["LD_PRELOAD"] = library + (":" + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"{prog}: cannot run {command[0]}: {e.strerror}", file=sys.stderr)
        # as a shell: 127 not found, 126 found but not runnable
        return 127 if isinstance(e, FileNotFoundError) else 126


def run_main():
    """The tensoralloc-run console script."""
    sys.exit(run(sys.argv[1:], "tensoralloc-run"))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "run":
        return run(argv[1:], "python -m tensoralloc run")
    if argv == ["preload-path"]:
        try:
            print(preload_path())
        except FileNotFoundError as e:
            print(f"python -m tensoralloc preload-path: {e}", file=sys.stderr)
            return 1
        return 0
    out = sys.stdout if argv in ([], ["-h"], ["--help"]) else sys.stderr
    print("usage: python -m tensoralloc run [OPTIONS] [--] PROGRAM [ARGS...]\n"
          "       python -m tensoralloc preload-path\n\n"
          "python -m tensoralloc run --help says more.", file=out)
    return 0 if out is sys.stdout else 2


if __name__ == "__main__":
    sys.exit(main())
