"""Run every benchmark of the project and print all their tables, with the machine noted.

    python benchmarks/run_all.py            # full sizes
    python benchmarks/run_all.py --quick    # small sizes (each benchmark < 60 s)
    python benchmarks/run_all.py --only pruning --only qat   # a subset, by module-name substring

A benchmark is any ``benchmarks/<name>.py`` module (not starting with ``_``, not this file) that
defines ``main(argv=None)`` returning its table as a string. They are discovered, not listed here,
so a new benchmark file joins the run by existing. A benchmark that fails is reported and the
others still run; the exit status is then 1. What a benchmark prints itself is captured and shown
only when it fails (``--verbose`` shows it always), so the output is the tables.

>>> from pathlib import Path
>>> "run_all" in [m for m, _ in discover(Path(__file__).parent)]
False
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import sys
import time
import traceback
from pathlib import Path
from types import ModuleType
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def _load(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"benchmarks_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and pickling look the module up by name
    spec.loader.exec_module(module)
    return module


def discover(folder: Path = HERE) -> list[tuple[str, Path]]:
    """``(name, path)`` of every candidate benchmark module in ``folder``, sorted by name."""
    this = Path(__file__).resolve()
    return [
        (path.stem, path)
        for path in sorted(Path(folder).glob("*.py"))
        if not path.name.startswith("_") and path.resolve() != this
    ]


def machine_header() -> str:
    """One line naming the machine, so quoted numbers say where they come from."""
    import torch

    threads = torch.get_num_threads()
    cpu = platform.processor() or platform.machine()
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"machine: {platform.platform()} | CPU: {cpu}, {os.cpu_count()} cores (torch threads {threads}) | "
        f"{cuda} | Python {platform.python_version()} | torch {torch.__version__}"
    )


def run_benchmarks(
    folder: Path = HERE, *, quick: bool = False, only: list[str] | None = None,
    out: Callable[[str], None] = print, verbose: bool = False,
) -> list[tuple[str, str | None]]:
    """Run every discovered benchmark; returns ``(name, error or None)`` per benchmark."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the package in this checkout, without installing it
    out(f"# compress_callbacks benchmarks{' (--quick)' if quick else ''}")
    out(machine_header())
    outcomes: list[tuple[str, str | None]] = []
    import torch

    threads = torch.get_num_threads()
    for name, path in discover(folder):
        if only and not any(o in name for o in only):
            continue
        torch.set_num_threads(threads)  # a benchmark that sets its own thread count does not leak it
        out(f"\n## {name}")
        t0 = time.perf_counter()
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                module = _load(path)
                bench_main = getattr(module, "main", None)
                if not callable(bench_main):
                    out("(no main(argv=None): not a benchmark)")
                    continue
                table = bench_main(["--quick"] if quick else [])
            if not isinstance(table, str):
                raise TypeError(f"{name}.main() returned {type(table).__name__}, expected the table as a string")
            if verbose and printed.getvalue().strip():
                out(printed.getvalue().rstrip())
            out(table.rstrip())
            outcomes.append((name, None))
        except BaseException as err:  # noqa: BLE001  argparse exits and failures must not stop the others
            if isinstance(err, KeyboardInterrupt):
                raise
            if printed.getvalue().strip():
                out(printed.getvalue().rstrip()[-4000:])
            out(f"FAILED: {type(err).__name__}: {err}")
            out(traceback.format_exc().rstrip())
            outcomes.append((name, f"{type(err).__name__}: {err}"))
        out(f"({name}: {time.perf_counter() - t0:.1f} s)")
    failed = [name for name, error in outcomes if error]
    out(f"\n{len(outcomes) - len(failed)} benchmark(s) passed" + (f", failed: {', '.join(failed)}" if failed else ""))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: every benchmark in < 60 s")
    parser.add_argument("--only", action="append", default=None, metavar="NAME",
                        help="run only benchmarks whose module name contains NAME (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="also show what each benchmark prints itself")
    args = parser.parse_args(argv)
    outcomes = run_benchmarks(quick=args.quick, only=args.only, verbose=args.verbose)
    return 1 if any(error for _, error in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
