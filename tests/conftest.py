"""Shared pytest fixtures: thread count, fresh interpreters and the two-rank launcher.

Test modules get these helpers as fixtures; they never import from each other.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# debug_launcher forks its ranks. Forking this pytest process after torch has started its thread
# pools can deadlock the children, so the launch happens in a fresh interpreter that imports the
# worker's module by path and forks from there.
_LAUNCH = """\
import importlib.util, sys
from accelerate import debug_launcher
spec = importlib.util.spec_from_file_location({module!r}, {path!r})
module = importlib.util.module_from_spec(spec)
sys.modules[{module!r}] = module
spec.loader.exec_module(module)
debug_launcher(getattr(module, {name!r}), args={args!r}, num_processes={processes})
"""


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tiny models on one thread: on shared CPUs this is many times faster than
    several threads fighting over the cores (Trainer steps: ~0.01 s instead of up to ~0.9 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _run_python(*arguments: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python *arguments`` in the repository root, importing this checkout's ``compress_callbacks``
    (not an installed copy); fails the test with the end of stderr unless it exits with 0."""
    environment = {**os.environ, **(env or {})}
    environment["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), environment.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, *arguments], cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"exit code {done.returncode}:\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="session")
def run_python() -> Callable[..., subprocess.CompletedProcess]:
    """``run_python(*arguments, env=None, timeout=300)``: a fresh interpreter (see ``_run_python``).

    The checkout is first on ``PYTHONPATH``, so the child imports the code under test even where
    another copy of the package is installed; a non-zero exit fails the test with its stderr.
    """
    return _run_python


def _launch_two_processes(worker: Callable[..., Any], *args: Any, timeout: float = 300) -> None:
    if not callable(worker) or "." in getattr(worker, "__qualname__", "."):
        raise TypeError(f"`worker` must be a function defined at a test module's top level, got {worker!r}")
    arguments = tuple(os.fspath(a) if isinstance(a, os.PathLike) else a for a in args)
    if not all(a is None or isinstance(a, (str, int, float, bool)) for a in arguments):
        raise TypeError(f"`args` must be paths, strings, numbers or None (they are written into a script), got {args!r}")
    code = _LAUNCH.format(module=worker.__module__, path=inspect.getsourcefile(worker), name=worker.__qualname__,
                          args=arguments, processes=2)
    # one OpenMP thread per rank: two ranks already fill the two cores of a CI runner
    _run_python("-c", code, env={"OMP_NUM_THREADS": "1"}, timeout=timeout)


@pytest.fixture(scope="session")
def launch_two_processes() -> Callable[..., None]:
    """``launch_two_processes(worker, *args, timeout=300)``: ``worker(*args)`` on two CPU ranks.

    ``accelerate.debug_launcher`` (gloo, a file rendezvous, no port) runs the worker, a function at
    a test module's top level, from a fresh interpreter. The worker reports through files (under a
    ``tmp_path`` passed in ``args``) or fails with an assertion: an exception on either rank fails
    the test with the child's stderr.
    """
    return _launch_two_processes
