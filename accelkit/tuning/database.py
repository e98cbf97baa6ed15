"""The tuning database: what `accelkit tune` measured, stored beside the compile cache, per target.

    <cache dir>/tuning/<target key>/
        target.json      the target string (the key is its sha256)
        ms/              meta-schedule's JSONDatabase: workloads and tuning records (traces)
        trials.jsonl     every measured candidate of a TVM-generated function:
                         {"workload", "candidate", "secs" | null, "error"}  (resume skips these)
        kernels.jsonl    every measured kernel config: {"task", "kernels", "config", "secs"}
        decisions.json   per function, what compile applies: {"tir": {workload: {...}},
                         "kernels": {"<task> @<library>+<isa>": {"task": ..., ...}}}; only
                         entries with "use": "tuned" change code
        lock             held by the one `tune` writing here

Workloads are keyed by TVM's structural hash of the unscheduled PrimFunc and kernel call sites
by kernel + argument shapes + attributes, so models that share a layer share its tuning. The
cache key of a compiled model includes `digest()`: tuning changes what compile produces.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from typing import Any

from accelkit.errors import OptionError


def target_key(target) -> str:
    return hashlib.sha256(str(target).encode()).hexdigest()[:16]


def tuning_root() -> str:
    from accelkit.cache import cache_dir

    return os.path.join(cache_dir(), "tuning")


class TuningDB:
    def __init__(self, target, root: str | None = None):
        self.target = target
        self.path = os.path.join(root or tuning_root(), target_key(target))
        self._ms = None

    # -- files ---------------------------------------------------------------------------
    def _file(self, name: str) -> str:
        return os.path.join(self.path, name)

    def create(self) -> None:
        os.makedirs(self._file("ms"), mode=0o700, exist_ok=True)
        target_file = self._file("target.json")
        if not os.path.exists(target_file):
            _write_atomic(target_file, json.dumps({"target": str(self.target)}, indent=1))

    def exists(self) -> bool:
        return os.path.isfile(self._file("decisions.json"))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive: one tuning run per target database at a time (a second one is refused
        rather than left waiting for minutes)."""
        self.create()
        fd = os.open(self._file("lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise OptionError(
                    f"another `accelkit tune` is writing the tuning database {self.path}; wait "
                    f"for it to finish (or stop it) and run this again") from None
            yield
        finally:
            os.close(fd)

    def ms_database(self):
        """meta-schedule's JSONDatabase (traces of every measured candidate)."""
        if self._ms is None:
            from tvm.s_tir import meta_schedule as ms

            self.create()
            self._ms = ms.database.JSONDatabase(
                path_workload=self._file("ms/database_workload.json"),
                path_tuning_record=self._file("ms/database_tuning_record.json"),
                allow_missing=True)
        return self._ms

    # -- measured candidates (append-only logs) -----------------------------------------
    def trials(self) -> dict[str, dict[str, dict[str, Any]]]:
        """workload -> candidate hash -> {"secs", "error"}."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for row in _read_jsonl(self._file("trials.jsonl")):
            out.setdefault(row["workload"], {})[row["candidate"]] = row
        return out

    def add_trials(self, rows: list[dict[str, Any]]) -> None:
        _append_jsonl(self._file("trials.jsonl"), rows)

    def kernel_trials(self, kernels_digest: str) -> dict[str, dict[int, float | None]]:
        out: dict[str, dict[int, float | None]] = {}
        for row in _read_jsonl(self._file("kernels.jsonl")):
            if row.get("kernels") == kernels_digest:  # a rebuilt kernel library starts over
                out.setdefault(row["task"], {})[int(row["config"])] = row["secs"]
        return out

    def add_kernel_trials(self, rows: list[dict[str, Any]]) -> None:
        _append_jsonl(self._file("kernels.jsonl"), rows)

    # -- decisions -------------------------------------------------------------------------
    def decisions(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self._file("decisions.json")) as f:
                data = json.load(f)
        except FileNotFoundError:
            return {"tir": {}, "kernels": {}}
        except (OSError, ValueError) as exc:
            raise OptionError(f"the tuning database {self.path} is damaged ({exc}); delete that "
                              f"folder to start tuning over") from exc
        data.setdefault("tir", {})
        data.setdefault("kernels", {})
        return data

    def save_decisions(self, decisions: dict[str, dict[str, Any]]) -> None:
        self.create()
        _write_atomic(self._file("decisions.json"), json.dumps(decisions, indent=1, sort_keys=True))

    def digest(self) -> str | None:
        """sha256 of what compile applies (None when nothing tuned is applied)."""
        data = self.decisions()
        used = {kind: {k: v for k, v in entries.items() if v.get("use") == "tuned"}
                for kind, entries in data.items()}
        if not any(used.values()):
            return None
        blob = json.dumps(used, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except ValueError:  # a line cut short by a kill: skip it, keep the rest
                    continue
    except FileNotFoundError:
        pass
    return rows


def _append_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with open(path, "a") as f:
        f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        f.flush()
        os.fsync(f.fileno())


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
