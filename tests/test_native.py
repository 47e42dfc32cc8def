"""The optional native kernels (compress_callbacks/_native.py): the private cache, OpenMP teams
smaller than asked for, and the fallback without a compiler or with COMPRESS_CALLBACKS_NATIVE=0.

Every test holds on a machine without a C compiler too: there it checks the fallback instead.
"""

import json
import os
import shlex
import stat
import subprocess
import sys
import tempfile
import uuid
import warnings
from pathlib import Path

import pytest
import torch

from compress_callbacks import _native
from compress_callbacks.pruning import masks as M

REPO = Path(__file__).resolve().parents[1]


def has_compiler() -> bool:
    return _native.c_compiler() is not None


@pytest.fixture()
def fresh_native(monkeypatch, tmp_path):
    """A cache folder of this test's own, a private temp dir to watch, and a loader that runs afresh."""
    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "1")
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    _native._load.cache_clear()
    yield _native
    _native._load.cache_clear()


def load_warnings(native) -> tuple[bool, list[str]]:
    """Whether the kernels load (afresh), and the warnings that raised."""
    native._load.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = native.mask_multiply_kernel() is not None
    return loaded, [str(w.message) for w in caught]


def libraries(folder: Path) -> list[Path]:
    return sorted(folder.glob("masks_*.so")) if folder.exists() else []


# ---------------------------------------------------------------------------- the kernels and the cache
def test_native_kernel_builds_once_privately_and_matches_mul(fresh_native, tmp_path):
    kernel = fresh_native.mask_multiply_kernel()
    cache = tmp_path / "cache"
    assert (kernel is not None) == has_compiler()
    assert list((tmp_path / "tmp").iterdir()) == []  # no build folder left behind
    if kernel is None:
        assert not cache.exists()  # without a compiler nothing is written anywhere
        return
    (library,) = libraries(cache)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700 and stat.S_IMODE(library.stat().st_mode) == 0o700
    assert [p.name for p in cache.iterdir()] == [library.name]  # the private build folder is gone
    built = library.stat().st_mtime_ns
    fresh_native._load.cache_clear()
    assert fresh_native.mask_multiply_kernel() is not None and library.stat().st_mtime_ns == built  # cached
    g = torch.Generator().manual_seed(0)
    for n in (1, 7, 65536, 200_003):  # serial and OpenMP-parallel sizes
        t = torch.randn(n, generator=g)
        keep = (torch.rand(n, generator=g) > 0.5).to(torch.uint8)
        expected = t * keep
        version = t._version
        kernel(t, keep)
        assert torch.equal(t, expected) and t._version > version
    # apply_keep_ sends what the kernel cannot take (non-contiguous, float64) to the torch path
    tensors = [torch.randn(6, 4, generator=g).t(), torch.randn(9, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g)]
    keeps = [(torch.rand(t.shape, generator=g) > 0.5).to(torch.uint8) for t in tensors]
    expected = [t * k for t, k in zip(tensors, keeps)]
    M.apply_keep_(tensors, keeps, None, kernel)
    assert all(torch.equal(t, e) for t, e in zip(tensors, expected))


def give_away(path: Path, monkeypatch) -> str:
    """Make ``path`` another user's (as root: chown; otherwise this process pretends to be another
    user, to whom all of this user's files then belong); the reason the loader should give."""
    if os.getuid() == 0:
        os.chown(path, 4242, 4242)
        return "owned by uid 4242"
    monkeypatch.setattr(os, "getuid", lambda uid=os.getuid(): uid + 1)
    return "owned by uid"


def test_kernels_pickle_and_deepcopy_by_reference():
    """GMP keeps its kernel on the model: torch.save(model) and copy.deepcopy(model) must take it."""
    import copy
    import pickle

    kernels = [_native.mask_multiply_kernel(), _native.fake_quantize_rows_kernel(),
               *(_native.activation_kernels() or (None,)), *(_native.magnitude_select_kernels() or (None,))]
    assert all((k is not None) == has_compiler() for k in kernels)
    assert all(pickle.loads(pickle.dumps(k)) is k and copy.deepcopy(k) is k for k in kernels)


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, "another user's"])
def test_a_cache_folder_others_can_write_or_own_is_refused_and_the_kernels_built_privately(fresh_native, tmp_path,
                                                                                          monkeypatch, mode):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if mode == "another user's":
        reason = give_away(cache, monkeypatch)
    else:
        cache.chmod(mode)
        reason = "writable by group or others"
    loaded, messages = load_warnings(fresh_native)
    assert loaded == has_compiler()
    if loaded:  # built in a fresh private temp folder, loaded, and that folder removed
        assert len(messages) == 1 and reason in messages[0] and str(cache) in messages[0], messages
    assert libraries(cache) == [] and list((tmp_path / "tmp").iterdir()) == []


def test_a_folder_above_the_cache_others_can_write_is_refused_unless_sticky(fresh_native, tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could rename the cache folder away and put their own in its place
    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(shared / "cache"))
    loaded, messages = load_warnings(fresh_native)
    assert loaded == has_compiler() and libraries(shared / "cache") == []
    if loaded:
        assert len(messages) == 1 and str(shared) in messages[0]
    shared.chmod(0o1777)  # sticky, as /tmp: only the owner may rename or remove what is in it
    loaded, messages = load_warnings(fresh_native)
    assert loaded == has_compiler() and messages == []
    assert len(libraries(shared / "cache")) == int(loaded)


@pytest.mark.parametrize("how", ["writable by others", "owned by another user"])
def test_a_cached_library_another_user_could_have_written_is_rebuilt_not_loaded(fresh_native, tmp_path, monkeypatch, how):
    """A file that is not a library where the cached library goes (loading it would fail)."""
    if not has_compiler():
        assert fresh_native.mask_multiply_kernel() is None and not (tmp_path / "cache").exists()
        return
    # a compiler command of this test's own: a library name this process never loaded (dlopen
    # would hand back the library already loaded under a name, whatever the file holds now)
    monkeypatch.setenv("CC", shlex.join([*fresh_native.c_compiler(), f"-DCC_TEST_{uuid.uuid4().hex}"]))
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    library = cache / fresh_native._library_name(fresh_native.c_compiler())
    library.write_bytes(b"not a shared library")
    if how == "writable by others":
        library.chmod(0o646)
        reason = "writable by group or others"
    else:  # not as root, the cache folder is refused first (it is "another user's" too)
        reason = give_away(library, monkeypatch)
    loaded, messages = load_warnings(fresh_native)
    assert loaded, "the planted file was loaded (that fails) instead of a fresh build"
    assert len(messages) == 1 and reason in messages[0], messages
    if os.getuid() == 0 or how == "writable by others":  # rebuilt in place: ours, private, a real library
        assert library.stat().st_uid == os.getuid() and stat.S_IMODE(library.stat().st_mode) == 0o700
        assert library.read_bytes() != b"not a shared library"
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_cache_that_cannot_be_created_builds_privately_without_a_warning(fresh_native, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(blocker / "cache"))  # a folder under a regular file
    loaded, messages = load_warnings(fresh_native)
    assert loaded == has_compiler() and messages == []
    assert list((tmp_path / "tmp").iterdir()) == []  # the private build folder is removed once loaded


# ---------------------------------------------------------------------------- without the kernels
@pytest.fixture()
def reloaded_native():
    """The loader runs afresh (with the usual cache, so that the kernels are built once per machine)."""
    _native._load.cache_clear()
    yield _native
    _native._load.cache_clear()


def train_gmp_and_qat(steps: int = 3) -> dict[str, torch.Tensor]:
    """A few GMP + QAT steps on a model big enough for the OpenMP paths; the final state."""
    from compress_callbacks import CompressionManager, GradualMagnitudePruning, QuantizationAwareTraining

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 1200), torch.nn.ReLU(), torch.nn.Linear(1200, 8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gmp = GradualMagnitudePruning(0.75, start_step=0, end_step=2, update_every=1)
    CompressionManager(gmp, QuantizationAwareTraining(start_step=1)).attach(model, optimizer)
    x, y = torch.randn(64, 64), torch.randint(0, 8, (64,))
    for _ in range(steps):
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert [round(s, 4) for s in gmp.layer_sparsities().values()] == [0.75, 0.75]
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_off_switch_builds_nothing_and_gives_the_same_training(reloaded_native, tmp_path, monkeypatch):
    native = train_gmp_and_qat()
    monkeypatch.setenv("COMPRESS_CALLBACKS_NATIVE", "0")
    reloaded_native._load.cache_clear()
    (tmp_path / "off").mkdir()
    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(tmp_path / "off" / "cache"))
    assert reloaded_native.mask_multiply_kernel() is None and reloaded_native.activation_kernels() is None
    torch_only = train_gmp_and_qat()
    assert reloaded_native._load.cache_info().misses == 0  # the switch never even looks for a compiler
    assert not (tmp_path / "off" / "cache").exists()
    assert native.keys() == torch_only.keys() and all(torch.equal(native[k], torch_only[k]) for k in native)


@pytest.mark.parametrize("compiler", ["missing", "broken"])
def test_without_a_working_compiler_training_falls_back_without_warnings(reloaded_native, tmp_path, monkeypatch, caplog, compiler):
    """No compiler (CC names a program that does not exist) or one that fails (CC=false): the
    pure-PyTorch path, one INFO log line and no warning, the same training as with the kernels."""
    native = train_gmp_and_qat()
    monkeypatch.setenv("COMPRESS_CALLBACKS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc") if compiler == "missing" else "false")
    reloaded_native._load.cache_clear()
    assert (reloaded_native.c_compiler() is None) == (compiler == "missing")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO", logger=_native.__name__):
        warnings.simplefilter("always")
        fallback = train_gmp_and_qat()
    assert [str(w.message) for w in caught if "native" in str(w.message) or "compiler" in str(w.message)] == []
    assert reloaded_native.mask_multiply_kernel() is None and reloaded_native.magnitude_select_kernels() is None
    assert len([r for r in caplog.records if r.name == _native.__name__]) == 1  # asked many times, said once
    assert all(torch.equal(native[k], fallback[k]) for k in native)


def run_python(code: str, env: dict[str, str], drop: tuple[str, ...] = ()) -> dict:
    """``code`` in a fresh interpreter importing this checkout (``env`` added to this environment,
    ``drop`` removed from it); the JSON it prints last."""
    environment = {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": str(REPO), **env}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_no_compiler_on_the_path_falls_back(tmp_path):
    """Neither CC nor cc/gcc on the PATH: the package imports, prunes and quantizes, warning nothing."""
    code = f"""
import json, sys, warnings
sys.path.insert(0, {str(REPO / "tests")!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from compress_callbacks import _native
    from test_native import train_gmp_and_qat
    state = train_gmp_and_qat()
ours = [str(w.message) for w in caught if "compress_callbacks" in w.filename or "native" in str(w.message)]
print(json.dumps({{"compiler": _native.c_compiler(), "kernels": _native.mask_multiply_kernel() is not None,
                  "zeros": int((state["0.weight"] == 0).sum()), "warnings": ours}}))
"""
    empty = tmp_path / "bin"
    empty.mkdir()
    result = run_python(code, {"PATH": str(empty), "COMPRESS_CALLBACKS_CACHE": str(tmp_path / "cache")}, drop=("CC",))
    assert result == {"compiler": None, "kernels": False, "zeros": 57600, "warnings": []}
    assert not (tmp_path / "cache").exists()


# ---------------------------------------------------------------------------- OpenMP teams
@pytest.mark.parametrize("omp", [{"OMP_THREAD_LIMIT": "1"}, {"OMP_DYNAMIC": "true", "OMP_THREAD_LIMIT": "3"}])
def test_selection_with_a_smaller_openmp_team_than_asked_for(omp):
    """torch asks for 64 threads, OpenMP starts fewer: the tie counts (and so the global masks over
    several tie-heavy layers) still equal a stable sort's selection."""
    code = """
import json, torch
from compress_callbacks import _native
from compress_callbacks.pruning import masks as M
g = torch.Generator().manual_seed(0)
weights = [torch.randint(-3, 4, shape, generator=g).float() / 4 for shape in ((400, 500), (300, 300), (700, 100))]
keeps = [None, (torch.rand(300, 300, generator=g) > 0.2).to(torch.uint8), None]
keys = torch.cat([M.magnitude_keys(w, k).flatten() for w, k in zip(weights, keeps)])
mismatches, taken = [], []
for target in (0.3, 0.55, 0.8):
    torch.set_num_threads(64)  # what the kernels ask OpenMP for
    got = torch.cat([m.flatten() for m in M.unstructured_keep_masks(weights, target, keeps=keeps, scope="global")])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    expected = torch.cat([torch.ones(w.numel(), dtype=torch.uint8) if k is None else k.flatten() for w, k in zip(weights, keeps)])
    newly = M.count_to_prune(keys.numel(), target) - int((expected == 0).sum())  # already pruned keys sort last
    guarded, offset = keys.clone(), 0
    for w, k in zip(weights, keeps):  # each layer's largest kept weight (first of equals) is never selected
        scores = w.flatten().abs() if k is None else w.flatten().abs().masked_fill(k.flatten() == 0, -1.0)
        guarded[offset + int(scores.argmax())] = M.PRUNED_KEY
        offset += w.numel()
    expected[torch.sort(guarded, stable=True).indices[:newly]] = 0
    mismatches.append(int((got != expected).sum()))
kernels = _native.magnitude_select_kernels()
if kernels is not None:
    w = weights[0]
    threshold = int(M.magnitude_keys(w, None).flatten().kthvalue(100_000).values)
    n_equal = int((M.magnitude_keys(w, None) == threshold).sum())
    torch.set_num_threads(64)
    taken = [kernels[1](w, None, threshold, ties)[1] for ties in (0, 5, n_equal, n_equal + 7)] + [n_equal]
print(json.dumps({"threads": threads, "native": kernels is not None, "mismatches": mismatches,
                  "taken": taken}))
"""
    result = run_python(code, omp)  # the usual cache: built once per machine
    assert result["threads"] == 64 and result["native"] == has_compiler()
    assert result["mismatches"] == [0, 0, 0]
    if result["native"]:
        n_equal = result["taken"][-1]
        assert result["taken"] == [0, 5, n_equal, n_equal, n_equal]
