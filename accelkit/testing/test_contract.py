"""The Backend contract: name, availability, precisions, options, target and fingerprint, as
accelkit's compiler, cache and artifact loader rely on them."""
from __future__ import annotations

import re

import accelkit
from accelkit.compiler import PRECISIONS


def test_name_matches_the_registry(backend, backend_name):
    assert isinstance(backend, accelkit.Backend)
    assert backend.name == backend_name
    assert re.fullmatch(r"[a-z][a-z0-9_]*", backend.name)
    assert backend_name in accelkit.list_backends()
    assert accelkit.get_backend(backend_name) is backend, "get_backend returns one instance"


def test_declarations_have_the_documented_types(backend):
    assert backend.is_available() is True  # (False skips the kit)
    assert isinstance(backend.description, str) and backend.description.strip(), \
        "description: one line shown by `accelkit backends`"
    assert isinstance(backend.options, dict)
    for option, help_text in backend.options.items():
        assert isinstance(option, str) and isinstance(help_text, str), (option, help_text)


def test_precisions_include_fp32(backend):
    assert isinstance(backend.precisions, (tuple, list)) and backend.precisions
    assert "fp32" in backend.precisions
    unknown = set(backend.precisions) - set(PRECISIONS)
    assert not unknown, f"precisions {sorted(unknown)} are not accelkit precisions {PRECISIONS}"


def test_fingerprint_is_a_stable_string(backend, mlp_compiled):
    first = backend.fingerprint()
    assert isinstance(first, str) and first, "fingerprint() must be a non-empty str"
    assert all(backend.fingerprint() == first for _ in range(3)), \
        "fingerprint() changes between calls: the compile cache could never hit"
    assert mlp_compiled.manifest["backend_fingerprint"] == first


def test_target_is_recorded(backend, mlp_compiled):
    target = mlp_compiled.manifest.get("target")
    assert isinstance(target, str) and target, "compile() must return a 'target' manifest entry"
    if isinstance(backend, accelkit.TVMBackend):
        import tvm

        tvm_target = backend.target(accelkit.CompileOptions())
        assert isinstance(tvm_target, tvm.target.Target)
        assert str(tvm_target) == target
        assert str(backend.target(accelkit.CompileOptions())) == target, "target() is stable"


def test_accepts_its_own_build(backend, mlp_compiled):
    assert backend.check_artifact(mlp_compiled.manifest) is None
    assert mlp_compiled.backend == backend.name
    assert mlp_compiled.precision == "fp32"
