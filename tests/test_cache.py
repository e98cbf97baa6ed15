"""The compile cache (accelkit.cache): the key covers everything that changes what compile
produces, N processes compiling one model compile it once, damaged entries are never loaded
(removed and rebuilt, with a CacheWarning), an unwritable or full cache never breaks compile,
and `accelkit cache ls|verify|clear|prune` behave. Tiny models: every compile is ~0.1 s."""
import copy
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import types
import warnings

import numpy as np
import onnx
import pytest

import accelkit
from accelkit import artifact, compiler
from accelkit import cache as cache_mod
from accelkit.backends import CompileOptions, get_backend
from accelkit.cache import Cache, CacheWarning
from conftest import mlp_model, random_feeds, relative_l2


def tiny(seed=0, dims=(8, 16, 4)):
    return mlp_model(batch=2, dims=dims, seed=seed)


def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "accelkit", *args], capture_output=True,
                          text=True, timeout=timeout)


def assert_clean_failure(done, *fragments):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("accelkit cache: error:"), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, (fragment, done.stderr)


def expected_outputs(model, seed=0):
    ref = accelkit.compile(model, backend="reference", cache=False)
    return ref.run(random_feeds(ref, seed))


def assert_correct(compiled, expected, seed=0):
    outputs = compiled.run(random_feeds(compiled, seed))
    assert len(outputs) == len(expected)
    for got, want in zip(outputs, expected):
        assert got.shape == want.shape
        assert relative_l2(got, want) < 1e-5
    return outputs


def entry_keys(root):
    entries = os.path.join(root, "entries")
    return sorted(os.listdir(entries)) if os.path.isdir(entries) else []


def tmp_leftovers(root):
    tmp = os.path.join(root, "tmp")
    return sorted(os.listdir(tmp)) if os.path.isdir(tmp) else []


def no_cache_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, CacheWarning)]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("ACCELKIT_CACHE_DIR", str(path))
    return str(path)


# -- 1. the key --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def base_components():
    return compiler._key_components(tiny(), None, get_backend("cpu"), CompileOptions())


def _changed(value):
    if value is None:
        return "sha256:0123abcd"
    if isinstance(value, str):
        return value + "-other"
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(f"no way to change {value!r}")


KEY_CHANGES = {
    "model": lambda c: c.update(model=_changed(c["model"])),
    "input_shapes": lambda c: c.update(input_shapes={"x": [3, 8]}),
    "backend": lambda c: c.update(backend="reference"),
    "backend_fingerprint": lambda c: c.update(backend_fingerprint=_changed(c["backend_fingerprint"])),
    "target": lambda c: c.update(target=c["target"].replace("llvm", "llvm -opt-level=1")),
    "precision": lambda c: c.update(precision="fp16"),
    "calibration": lambda c: c.update(calibration=_changed(c["calibration"])),
    "tuning_db": lambda c: c.update(tuning_db=_changed(c["tuning_db"])),
    "options": lambda c: c.update(options={"opt_level": 2}),
}
VERSIONED = ("accelkit", "tvm", "tvm_ffi", "onnx")


def test_key_components_are_all_covered(base_components):
    """Adding a key component (or a version) without a test below fails here."""
    assert set(base_components) - {"source"} == set(KEY_CHANGES) | {"versions"}
    assert set(base_components["versions"]) == set(VERSIONED)
    assert base_components["backend"] == "cpu" and base_components["precision"] == "fp32"
    assert base_components["target"] and "llvm" in base_components["target"]


@pytest.mark.parametrize("component", [*KEY_CHANGES, *(f"versions.{v}" for v in VERSIONED)])
def test_each_key_component_changes_the_key(base_components, component):
    changed = copy.deepcopy(base_components)
    if component.startswith("versions."):
        name = component.split(".", 1)[1]
        changed["versions"][name] = changed["versions"][name] + ".post1"
    else:
        KEY_CHANGES[component](changed)
    assert changed != base_components
    assert compiler.cache_key(changed) != compiler.cache_key(base_components)
    assert compiler.cache_key(copy.deepcopy(base_components)) == compiler.cache_key(base_components)


def test_cache_format_is_part_of_the_key(base_components, monkeypatch):
    before = compiler.cache_key(base_components)
    monkeypatch.setattr(cache_mod, "CACHE_FORMAT", cache_mod.CACHE_FORMAT + 1)
    assert compiler.cache_key(base_components) != before


def test_source_is_not_part_of_the_key(base_components):
    moved = {**base_components, "source": "/somewhere/else/model.onnx"}
    assert compiler.cache_key(moved) == compiler.cache_key(base_components)


def _vary_fingerprint(mp):
    mp.setattr(type(get_backend("cpu")), "fingerprint", lambda self: "cpu;kernels=patched")


def _vary_target(mp):
    import tvm

    other = {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64"}
    mp.setattr(type(get_backend("cpu")), "target", lambda self, options: tvm.target.Target(other))


def _vary_versions(mp):
    real = artifact.versions
    mp.setattr(artifact, "versions", lambda: {**real(), "tvm": "0.99"})


# (component(s) that must differ, how the compile call differs) - the components are taken from
# compile's real arguments, not written by hand
DERIVED = {
    "model": (["model"], dict(model=tiny(seed=1))),
    "input_shapes": (["input_shapes"], dict(input_shapes={"x": [3, 8]})),
    "backend": (["backend", "backend_fingerprint", "target"], dict(backend="reference")),
    "precision": (["precision"], dict(options=CompileOptions(precision="fp16"))),
    "options": (["options"], dict(options=CompileOptions(extra={"opt_level": 2}))),
    "backend_fingerprint": (["backend_fingerprint"], dict(patch=_vary_fingerprint)),
    "target": (["target", "backend_fingerprint"], dict(patch=_vary_target)),
    "versions": (["versions"], dict(patch=_vary_versions)),
}


@pytest.mark.parametrize("case", DERIVED)
def test_key_components_follow_compile_arguments(base_components, case, monkeypatch):
    differ, how = DERIVED[case]
    if "patch" in how:
        how["patch"](monkeypatch)
    components = compiler._key_components(how.get("model", tiny()), how.get("input_shapes"),
                                          get_backend(how.get("backend", "cpu")),
                                          how.get("options", CompileOptions()))
    for name in base_components:
        if name != "source":
            assert (components[name] != base_components[name]) == (name in differ), name
    assert compiler.cache_key(components) != compiler.cache_key(base_components)


def test_compiling_twice_hits_and_key_changes_miss(cache_dir, monkeypatch):
    model = tiny(seed=1)
    expected = expected_outputs(model)
    first = accelkit.compile(model)
    assert first.cache_status == "miss"
    out1 = assert_correct(first, expected)
    assert len(entry_keys(cache_dir)) == 1
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        second = accelkit.compile(model)
    assert second.cache_status == "hit" and not no_cache_warnings(record)
    out2 = assert_correct(second, expected)
    assert all(np.array_equal(a, b) for a, b in zip(out1, out2))
    assert second._directory == os.path.join(cache_dir, "entries", entry_keys(cache_dir)[0])

    reshaped = accelkit.compile(model, input_shapes={"x": [3, 8]})
    assert reshaped.cache_status == "miss" and reshaped.inputs[0].shape == (3, 8)
    assert accelkit.compile(model, input_shapes={"x": [3, 8]}).cache_status == "hit"
    assert len(entry_keys(cache_dir)) == 2

    _vary_fingerprint(monkeypatch)
    assert accelkit.compile(model).cache_status == "miss"
    assert len(entry_keys(cache_dir)) == 3
    monkeypatch.undo()
    monkeypatch.setenv("ACCELKIT_CACHE_DIR", cache_dir)
    assert accelkit.compile(model).cache_status == "hit"
    assert tmp_leftovers(cache_dir) == []


def test_path_bytes_and_modelproto_of_one_model_share_an_entry(cache_dir, tmp_path):
    """The key hashes the model's bytes, not where they came from: the same ONNX file given as a
    path, as bytes or as the ModelProto onnx.load returns compiles once."""
    path = str(tmp_path / "model.onnx")
    onnx.save(tiny(seed=2), path)
    expected = expected_outputs(path)
    assert accelkit.compile(path).cache_status == "miss"
    with open(path, "rb") as f:
        raw = f.read()
    assert_correct(accelkit.compile(raw), expected)
    assert accelkit.compile(raw).cache_status == "hit"
    assert accelkit.compile(onnx.load(path)).cache_status == "hit"
    (key,) = entry_keys(cache_dir)
    with open(os.path.join(cache_dir, "entries", key, cache_mod.ENTRY_INFO)) as f:
        assert json.load(f)["model"] == os.path.abspath(path)
    # and a different model in the same place is a different entry
    onnx.save(tiny(seed=3), path)
    assert accelkit.compile(path).cache_status == "miss"
    assert len(entry_keys(cache_dir)) == 2


def test_cache_false_never_reads_or_writes(cache_dir, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("cache=False touched the cache")

    for name in ("load", "publish", "lock", "list", "remove"):
        monkeypatch.setattr(Cache, name, forbidden)
    model = tiny(seed=4)
    compiled = accelkit.compile(model, cache=False)
    assert compiled.cache_status == "off"
    assert_correct(compiled, expected_outputs(model))
    assert not os.path.exists(cache_dir)


def test_external_data_models_are_not_cached(cache_dir, tmp_path):
    """The key hashes the .onnx file only, so weights kept beside it must never be cached."""
    path = str(tmp_path / "ext" / "model.onnx")
    os.makedirs(os.path.dirname(path))
    onnx.save(tiny(seed=5), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    for _ in range(2):
        compiled = accelkit.compile(path)
        assert compiled.cache_status == "off (external data)"
    assert_correct(compiled, expected_outputs(tiny(seed=5)))
    assert entry_keys(cache_dir) == [] and tmp_leftovers(cache_dir) == []


@pytest.mark.parametrize("shapes", [{"x": "ab"}, {"x": None}, [("x", 3)], {1: [2], "x": [2, 8]}])
def test_bad_input_shapes_same_error_with_cache_on(cache_dir, shapes):
    """Computing the key must not turn a bad input_shapes into a raw TypeError/ValueError."""
    for cache in (False, True):
        with pytest.raises(accelkit.InputShapeError, match="input_shapes"):
            accelkit.compile(tiny(), input_shapes=shapes, cache=cache)
    assert entry_keys(cache_dir) == []


# -- 2. concurrent compiles -----------------------------------------------------------------------

WORKER = r"""
import json, os, sys, time, warnings
import numpy as np
import tvm  # heavy imports before the start line, so the 4 really compile at once
import accelkit
from accelkit import artifact
from accelkit.backends import get_backend

model_path, feeds_path, ready, go, result = sys.argv[1:6]
backend = get_backend("cpu")
artifact.versions()
real_compile = type(backend).compile

def counted_compile(self, graph, options, out_dir):
    with open(result + ".compiled", "w"):
        pass
    time.sleep(0.5)  # widen the window in which the others arrive
    return real_compile(self, graph, options, out_dir)

type(backend).compile = counted_compile
open(ready, "w").close()
deadline = time.time() + 120
while not os.path.exists(go):
    if time.time() > deadline:
        sys.exit("never started")
    time.sleep(0.002)
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model = accelkit.compile(model_path)
with np.load(feeds_path) as feeds:
    outputs = model.run({k: feeds[k] for k in feeds.files})
np.save(result + ".npy", outputs[0])
with open(result + ".json", "w") as f:
    json.dump({"status": model.cache_status, "warnings": [str(w.message) for w in record]}, f)
"""


def test_four_processes_compile_once(cache_dir, tmp_path):
    model = tiny(seed=6, dims=(16, 24, 8))
    path = str(tmp_path / "model.onnx")
    onnx.save(model, path)
    ref = accelkit.compile(model, backend="reference", cache=False)
    feeds = random_feeds(ref)
    expected = ref.run(feeds)[0]
    np.savez(tmp_path / "feeds.npz", **feeds)
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    go = str(tmp_path / "go")
    procs = []
    for i in range(4):
        args = [path, str(tmp_path / "feeds.npz"), str(tmp_path / f"ready{i}"), go,
                str(tmp_path / f"result{i}")]
        procs.append(subprocess.Popen([sys.executable, str(worker), *args],
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    try:
        deadline = time.time() + 120
        while not all(os.path.exists(tmp_path / f"ready{i}") for i in range(4)):
            assert time.time() < deadline, "workers did not start"
            assert all(p.poll() is None for p in procs), [p.communicate()[0] for p in procs]
            time.sleep(0.01)
        open(go, "w").close()
        logs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert all(p.returncode == 0 for p in procs), logs
    results = []
    for i in range(4):
        with open(tmp_path / f"result{i}.json") as f:
            results.append(json.load(f))
        assert relative_l2(np.load(tmp_path / f"result{i}.npy"), expected) < 1e-5
    assert sorted(r["status"] for r in results) == ["hit", "hit", "hit", "miss"], results
    assert all(r["warnings"] == [] for r in results), results
    compiled = [i for i in range(4) if os.path.exists(tmp_path / f"result{i}.compiled")]
    assert len(compiled) == 1, "more than one process compiled the model"
    assert len(entry_keys(cache_dir)) == 1
    assert tmp_leftovers(cache_dir) == []
    assert all(problem is None for _, problem in Cache().verify())


# -- 3. damaged entries ---------------------------------------------------------------------------

DAMAGED_MODEL = dict(seed=7, dims=(8, 12, 4))


@pytest.fixture(scope="module")
def pristine_entry(tmp_path_factory):
    """(key, directory) of a good cache entry of tiny(**DAMAGED_MODEL), kept outside any cache."""
    root = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ACCELKIT_CACHE_DIR", str(root / "cache"))
        assert accelkit.compile(tiny(**DAMAGED_MODEL)).cache_status == "miss"
    (key,) = entry_keys(str(root / "cache"))
    shutil.copytree(root / "cache" / "entries" / key, root / "entry")
    return key, str(root / "entry")


def _library(entry):
    with open(os.path.join(entry, artifact.MANIFEST)) as f:
        return os.path.join(entry, json.load(f)["library"])


def _edit_manifest(entry, edit):
    path = os.path.join(entry, artifact.MANIFEST)
    with open(path) as f:
        manifest = json.load(f)
    edit(manifest)
    with open(path, "w") as f:
        json.dump(manifest, f)


def _truncate(entry):
    lib = _library(entry)
    size = os.path.getsize(lib)
    os.truncate(lib, size // 2)


def _bitflip(entry):
    lib = _library(entry)
    with open(lib, "r+b") as f:
        f.seek(os.path.getsize(lib) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x04]))


def _no_library(entry):
    os.unlink(_library(entry))


def _no_manifest(entry):
    os.unlink(os.path.join(entry, artifact.MANIFEST))


def _garbage_manifest(entry):
    with open(os.path.join(entry, artifact.MANIFEST), "wb") as f:
        f.write(b"\x00\xff{ not json at all")


def _other_tvm(entry):
    _edit_manifest(entry, lambda m: m["versions"].update(tvm="0.0.1-other"))


def _other_format(entry):
    _edit_manifest(entry, lambda m: m.update(format_version=99))


def _escaping_file_name(entry):
    _edit_manifest(entry, lambda m: m.update(files={"../../model.so": m["files"]["model.so"]}))


DAMAGES = {
    "truncated library": (_truncate, "corrupted"),
    "bit-flipped library": (_bitflip, "corrupted"),
    "missing library": (_no_library, "incomplete"),
    "missing manifest": (_no_manifest, "unreadable"),
    "garbage manifest": (_garbage_manifest, "malformed"),
    "other tvm version": (_other_tvm, "tvm 0.0.1-other"),
    "other format version": (_other_format, "format 99"),
    "escaping file name": (_escaping_file_name, "invalid file name"),
}


@pytest.fixture(scope="module")
def damaged_expected():
    return expected_outputs(tiny(**DAMAGED_MODEL))


@pytest.mark.parametrize("damage", DAMAGES)
def test_damaged_entry_is_never_loaded_and_is_rebuilt(cache_dir, pristine_entry, damaged_expected,
                                                      damage, monkeypatch):
    import tvm

    key, pristine = pristine_entry
    entry = os.path.join(cache_dir, "entries", key)
    shutil.copytree(pristine, entry)
    damage_fn, fragment = DAMAGES[damage]
    damage_fn(entry)

    real_load = tvm.runtime.load_module
    loads = []

    def guarded_load(path, *args, **kwargs):
        loads.append(os.path.abspath(path))
        if os.path.abspath(path).startswith(os.path.abspath(cache_dir) + os.sep):
            raise AssertionError(f"native code loaded from the cache: {path}")
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tvm.runtime, "load_module", guarded_load)
    with pytest.warns(CacheWarning) as record:
        compiled = accelkit.compile(tiny(**DAMAGED_MODEL))
    messages = no_cache_warnings(record)
    assert len(messages) == 1, messages
    assert fragment in messages[0] and key in messages[0], messages[0]
    assert compiled.cache_status == "miss"
    assert not any(p.startswith(os.path.abspath(cache_dir) + os.sep) for p in loads), loads
    assert_correct(compiled, damaged_expected)

    # rebuilt: one valid entry under the same key, nothing left of the damaged one
    assert entry_keys(cache_dir) == [key] and tmp_leftovers(cache_dir) == []
    with open(os.path.join(entry, artifact.MANIFEST)) as f:
        manifest = json.load(f)
    for name, sha in manifest["files"].items():
        assert artifact.sha256_file(os.path.join(entry, name)) == sha
    assert [problem for _, problem in Cache().verify()] == [None]

    # the guard sees loads from the cache: the rebuilt entry is what the next compile loads
    def recording_load(path, *args, **kwargs):
        loads.append(os.path.abspath(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(tvm.runtime, "load_module", recording_load)
    loads.clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        hit = accelkit.compile(tiny(**DAMAGED_MODEL))
    assert hit.cache_status == "hit" and not no_cache_warnings(record)
    assert loads == [os.path.abspath(_library(entry))]
    assert_correct(hit, damaged_expected)


def test_cli_verify_reports_bad_entries(cache_dir, pristine_entry):
    key, pristine = pristine_entry
    entries = os.path.join(cache_dir, "entries")
    shutil.copytree(pristine, os.path.join(entries, key))
    done = cli("cache", "verify")
    assert done.returncode == 0, (done.stdout, done.stderr)
    assert "1 of 1 entries OK" in done.stdout and "BAD" not in done.stdout

    fake_keys = {}
    for i, (name, (damage_fn, fragment)) in enumerate(DAMAGES.items()):
        fake = f"{i:02d}" + "b" * 62
        shutil.copytree(pristine, os.path.join(entries, fake))
        damage_fn(os.path.join(entries, fake))
        fake_keys[fake] = (name, fragment)
    done = cli("cache", "verify")
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr == ""
    bad_lines = [line for line in done.stdout.splitlines() if "BAD" in line]
    assert len(bad_lines) == len(DAMAGES), done.stdout
    for fake, (name, fragment) in fake_keys.items():
        (line,) = [line for line in bad_lines if f"BAD {fake[:12]}:" in line]
        assert fragment in line, (name, line)
    assert f"BAD {key[:12]}" not in done.stdout
    assert f"1 of {len(DAMAGES) + 1} entries OK" in done.stdout
    # verify only reports: nothing was removed
    assert len(entry_keys(cache_dir)) == len(DAMAGES) + 1


# -- 4. unwritable / full cache -------------------------------------------------------------------

def test_unwritable_cache_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a regular file\n")
    monkeypatch.setenv("ACCELKIT_CACHE_DIR", str(blocker / "cache"))
    model = tiny(seed=8)
    expected = expected_outputs(model)
    for _ in range(2):  # and again: an unwritable cache is never a hit, never an error
        with pytest.warns(CacheWarning, match="cannot write the compile cache") as record:
            compiled = accelkit.compile(model)
        assert str(blocker / "cache") in no_cache_warnings(record)[0]
        assert compiled.cache_status == "unwritable"
        assert_correct(compiled, expected)
    assert blocker.read_text() == "a regular file\n"


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize("failing", ["copyfile", "write", "fsync"])
def test_full_disk_leaves_nothing_partial(cache_dir, monkeypatch, failing):
    model = tiny(seed=9)
    expected = expected_outputs(model)
    with monkeypatch.context() as mp:
        if failing == "copyfile":  # the library copy fails
            mp.setattr(cache_mod, "shutil",
                       types.SimpleNamespace(copyfile=_enospc, rmtree=shutil.rmtree))
        elif failing == "write":  # the library is in tmp/, the manifest write fails
            mp.setattr(cache_mod, "_write", _enospc)
        else:  # everything is written, flushing it fails
            mp.setattr(cache_mod, "_fsync_file", _enospc)
        with pytest.warns(CacheWarning, match="No space left on device"):
            compiled = accelkit.compile(model)
    assert compiled.cache_status == "unwritable"
    assert_correct(compiled, expected)
    assert entry_keys(cache_dir) == [] and tmp_leftovers(cache_dir) == []
    # once there is room again, the next compile caches it
    assert accelkit.compile(model).cache_status == "miss"
    assert accelkit.compile(model).cache_status == "hit"


def test_read_only_entry_still_serves_hits(cache_dir, monkeypatch):
    """The LRU clock (utime of last_used) failing does not turn a hit into an error."""
    model = tiny(seed=10)
    assert accelkit.compile(model).cache_status == "miss"

    def erofs(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(cache_mod.os, "utime", erofs)
    hit = accelkit.compile(model)
    assert hit.cache_status == "hit"
    assert_correct(hit, expected_outputs(model))


# -- 5. permissions -------------------------------------------------------------------------------

def test_cache_dir_is_private(tmp_path, monkeypatch):
    root = tmp_path / "deep" / "er" / "cache"
    monkeypatch.setenv("ACCELKIT_CACHE_DIR", str(root))
    old = os.umask(0)  # the mode must come from accelkit, not from a strict umask
    try:
        assert accelkit.compile(tiny(seed=11)).cache_status == "miss"
    finally:
        os.umask(old)
    for path in (root, root / "entries", root / "locks", root / "tmp"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700, path


# -- 6. the `accelkit cache` command --------------------------------------------------------------

def test_cli_ls_prune_clear(cache_dir, tmp_path):
    from accelkit.cli import _size

    paths = {}
    for name, seed in (("a", 20), ("b", 21), ("c", 22)):
        paths[name] = str(tmp_path / f"{name}.onnx")
        onnx.save(tiny(seed=seed), paths[name])
        assert accelkit.compile(paths[name]).cache_status == "miss"
    by_model = {e.info["model"]: e for e in Cache().list()}
    keys = {name: by_model[os.path.abspath(p)].key for name, p in paths.items()}
    assert len(set(keys.values())) == 3
    for name, stamp in (("a", 1_000_000_000), ("b", 1_000_000_100), ("c", 1_000_000_200)):
        os.utime(os.path.join(cache_dir, "entries", keys[name], cache_mod.LAST_USED), (stamp, stamp))
    assert accelkit.compile(paths["a"]).cache_status == "hit"  # a: now the most recently used

    entries = {e.key: e for e in Cache().list()}
    assert entries[keys["a"]].last_used > time.time() - 600
    done = cli("cache", "ls")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"3 entries in {cache_dir}")
    assert [line.split()[0] for line in lines[1:]] == [keys[n][:12] for n in ("a", "c", "b")]
    for name in "abc":
        (line,) = [line for line in lines if keys[name][:12] in line]
        e = entries[keys[name]]
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        for fragment in ("cpu", "fp32", _size(e.size), f"last used {used}",
                         os.path.abspath(paths[name])):
            assert fragment in line, (fragment, line)

    sizes = {name: entries[keys[name]].size for name in "abc"}
    done = cli("cache", "prune", "--max-size", str(sizes["a"] + sizes["c"]))
    assert done.returncode == 0, done.stderr
    assert "removed 1 least recently used" in done.stdout and "2 left" in done.stdout
    assert entry_keys(cache_dir) == sorted([keys["a"], keys["c"]])
    done = cli("cache", "prune", "--max-size", f"{sizes['a']}B")
    assert done.returncode == 0, done.stderr
    assert entry_keys(cache_dir) == [keys["a"]]
    assert cli("cache", "prune", "--max-size", "1G").stdout.startswith("removed 0 ")
    assert entry_keys(cache_dir) == [keys["a"]]

    done = cli("cache", "clear")
    assert done.returncode == 0 and "removed 1 entries" in done.stdout, done
    assert entry_keys(cache_dir) == [] and tmp_leftovers(cache_dir) == []
    assert cli("cache", "ls").stdout.startswith("0 entries")
    assert accelkit.compile(paths["a"]).cache_status == "miss"


def test_cli_ignores_stray_files_in_the_cache(cache_dir, pristine_entry):
    """A file that is not an entry (or an entry removed while listing) is no internal error."""
    key, pristine = pristine_entry
    shutil.copytree(pristine, os.path.join(cache_dir, "entries", key))
    with open(os.path.join(cache_dir, "entries", "notes.txt"), "w") as f:
        f.write("not an entry\n")
    assert [e.key for e in Cache().list()] == [key]
    done = cli("cache", "ls")
    assert done.returncode == 0 and done.stdout.startswith("1 entry in"), (done.stdout, done.stderr)
    done = cli("cache", "prune", "--max-size", "0")
    assert done.returncode == 0 and "removed 1 " in done.stdout, (done.stdout, done.stderr)
    assert [e.key for e in Cache().list()] == []


def test_cli_cache_dir(cache_dir):
    done = cli("cache", "dir")
    assert done.returncode == 0 and done.stdout.strip() == cache_dir


@pytest.mark.parametrize("size", ["abc", "-5", "12Q", "G", "1.2.3", "nan", "inf", "1e400"])
def test_cli_prune_bad_max_size(cache_dir, size):
    assert_clean_failure(cli("cache", "prune", "--max-size", size), repr(size))


def test_cli_prune_needs_max_size(cache_dir):
    assert_clean_failure(cli("cache", "prune"), "--max-size")


@pytest.mark.parametrize("text, size", [("1024", 1024), ("10K", 10 << 10), ("10KB", 10 << 10),
                                        ("500M", 500 << 20), ("1.5GiB", 3 << 29), ("2g", 2 << 30),
                                        (" 0 ", 0)])
def test_parse_size(text, size):
    assert cache_mod.parse_size(text) == size


def test_model_file_digest_is_memoised_but_sees_every_edit(tmp_path, monkeypatch):
    """An unchanged file is not re-hashed on a hit; an edit is seen even when the editor puts
    the size and the modification time back (ctime changes anyway)."""
    import hashlib

    from accelkit.cache import model_digest

    memo = str(tmp_path / "digests")
    path = tmp_path / "m.onnx"
    path.write_bytes(b"A" * 1000)
    first, _ = model_digest(str(path), memo_dir=memo)
    assert first == hashlib.sha256(b"A" * 1000).hexdigest()
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        if str(file) == str(path):
            reads.append(file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    assert model_digest(str(path), memo_dir=memo)[0] == first
    assert reads == []  # served from the memo
    monkeypatch.undo()
    stat = path.stat()
    path.write_bytes(b"B" * 1000)  # same size ...
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # ... and the old mtime
    assert model_digest(str(path), memo_dir=memo)[0] == hashlib.sha256(b"B" * 1000).hexdigest()
