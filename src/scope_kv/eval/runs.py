"""One harness run in one results directory: resume, sharding, progress bars, the merge of the
ranks' parts, and the loop every harness runs its work through (:meth:`HarnessRun.run_passes`).

Result files are JSON lines, one record per (example, method). Each process (rank) of a
sharded run appends to its own part file, ``<name>.part-<rank>-of-<world>.jsonl``; when every
rank has finished, one of them merges the parts into ``<name>.jsonl`` (ordered, duplicates
dropped), which is the file a single-process run writes too. A run started again over the
same directory skips the (example, method) pairs already recorded in either kind of file.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import pathlib
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .common import Shard

logger = logging.getLogger(__name__)

__all__ = ["ConfigMismatchError", "HarnessRun", "Pass", "Progress", "ResultStore", "read_results", "write_csv"]


# -- progress bars ------------------------------------------------------------------------------
class Progress:
    """Two tqdm bars, runs done and steps of the current run; every call is a no-op when disabled.

    Parameters
    ----------
    enabled : bool
        Show the bars (tqdm is imported only then).
    runs : int
        Total runs (e.g. examples x methods) for the outer bar.
    steps : int
        Steps per run (tokens) for the inner bar.
    label : str
        Description of the outer bar.
    """

    def __init__(self, enabled: bool, runs: int, steps: int, label: str):
        self.enabled = enabled
        if not enabled:
            return
        from tqdm.auto import tqdm

        self.outer = tqdm(total=runs, desc=label, unit="run", position=0)
        self.inner = tqdm(total=steps, desc="steps", unit="tok", position=1, leave=False)

    def start(self, label: str, steps: int | None = None) -> None:
        """A new run begins: reset the inner bar (to ``steps`` when given)."""
        if self.enabled:
            self.inner.reset(total=steps)
            self.inner.set_description(label)

    def step(self, n: int = 1) -> None:
        if self.enabled:
            self.inner.update(n)

    def done(self, **postfix: Any) -> None:
        """A run finished; ``postfix`` is shown next to the outer bar."""
        if self.enabled:
            self.outer.update(1)
            if postfix:
                self.outer.set_postfix(**postfix)

    def close(self) -> None:
        if self.enabled:
            self.inner.close()
            self.outer.close()


def write_csv(rows: Sequence[dict[str, Any]], path: str | pathlib.Path) -> None:
    """Write summary rows (dicts with the same keys) as CSV."""
    path = pathlib.Path(path)
    if not rows:
        path.write_text("", encoding="utf-8")
        return
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


# -- result files -----------------------------------------------------------------------------
class ConfigMismatchError(ValueError):
    """The output directory holds results of a run with other settings."""


def _read_jsonl(path: pathlib.Path) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return rows
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # A run killed mid-write leaves a torn last line; that record is simply redone.
                logger.warning("%s: skipping unreadable line %d", path, n + 1)
    return rows


def read_results(
    directory: str | pathlib.Path,
    name: str,
    key: Callable[[dict[str, Any]], Any],
    order: Callable[[dict[str, Any]], Any],
) -> list[dict[str, Any]]:
    """Every record of harness ``name`` in ``directory``: the merged file and any part files,
    the first record of each ``key`` kept, sorted by ``order``."""
    directory = pathlib.Path(directory)
    seen: dict[Any, dict[str, Any]] = {}
    for path in [directory / f"{name}.jsonl", *sorted(directory.glob(f"{name}.part-*-of-*.jsonl"))]:
        for row in _read_jsonl(path):
            seen.setdefault(key(row), row)
    return sorted(seen.values(), key=order)


def _end_torn_line(path: pathlib.Path) -> None:
    """A run killed mid-write leaves a last line without its newline: end it, so that the next
    record appended starts a line of its own (the torn line stays unreadable and is redone)."""
    if path.exists() and path.stat().st_size:
        with path.open("rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


class ResultStore:
    """Resumable, shardable JSON-lines results for one harness in one directory.

    Parameters
    ----------
    out_dir : path
        The run's directory (created).
    name : str
        File stem: results go to ``<name>.jsonl``, the run's settings to ``<name>.config.json``.
    shard : Shard
        This process's rank and the number of processes.
    config : dict
        Settings that must match for results to be combined (model, lengths, ...); a directory
        holding results of other settings is refused.
    """

    def __init__(self, out_dir: str | pathlib.Path, name: str, shard: Shard, config: dict[str, Any]):
        self.dir = pathlib.Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.shard = shard
        self.path = self.dir / f"{name}.jsonl"
        self.part = self.dir / f"{name}.part-{shard.rank}-of-{shard.world_size}.jsonl"
        self._check_config(config)
        _end_torn_line(self.part)

    def _check_config(self, config: dict[str, Any]) -> None:
        path = self.dir / f"{self.name}.config.json"
        config = json.loads(json.dumps(config))  # normalise tuples etc.
        if path.exists():
            old = json.loads(path.read_text(encoding="utf-8"))
            diff = {k: (old.get(k), config.get(k)) for k in set(old) | set(config) if old.get(k) != config.get(k)}
            if diff:
                details = "; ".join(f"{k}: was {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
                raise ConfigMismatchError(
                    f"{self.dir} holds {self.name} results of a run with other settings ({details}). "
                    "Use another output directory, or repeat the earlier settings to resume."
                )
            return
        tmp = path.with_suffix(f".tmp{self.shard.rank}")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def _all_paths(self) -> list[pathlib.Path]:
        return [self.path, *sorted(self.dir.glob(f"{self.name}.part-*-of-*.jsonl"))]

    def records(self) -> list[dict[str, Any]]:
        """Every record written so far (merged file and any part files)."""
        rows = []
        for path in self._all_paths():
            rows.extend(_read_jsonl(path))
        return rows

    def done(self, key: Callable[[dict[str, Any]], Any]) -> set[Any]:
        return {key(r) for r in self.records()}

    def append(self, record: dict[str, Any]) -> None:
        with self.part.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def finish(self, key: Callable[[dict[str, Any]], Any], order: Callable[[dict[str, Any]], Any]) -> bool:
        """Mark this rank finished; merge the parts when every rank is. Returns True if merged here."""
        marker = self.dir / f"{self.name}.done-{self.shard.rank}-of-{self.shard.world_size}"
        marker.touch()
        self.shard.barrier()
        if self.shard.state is not None and not self.shard.is_main:
            return False
        world = self.shard.world_size
        if not all((self.dir / f"{self.name}.done-{r}-of-{world}").exists() for r in range(world)):
            return False  # another rank merges when it finishes
        lock = self.dir / f"{self.name}.merge.lock"
        if not _take_lock(lock):
            return False
        try:
            self.merge(key, order)
            for r in range(world):
                (self.dir / f"{self.name}.done-{r}-of-{world}").unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
        return True

    def merge(
        self, key: Callable[[dict[str, Any]], Any], order: Callable[[dict[str, Any]], Any]
    ) -> list[dict[str, Any]]:
        """Combine every part into ``<name>.jsonl`` (first record of each key kept, sorted)."""
        parts = self._all_paths()[1:]
        rows = read_results(self.dir, self.name, key, order)
        tmp = self.path.with_suffix(f".merging{self.shard.rank}")
        with tmp.open("w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, self.path)
        for path in parts:
            path.unlink(missing_ok=True)
        return rows


@dataclass(frozen=True)
class Pass:
    """One unit of a harness's work, one step of the outer progress bar.

    Attributes
    ----------
    label : str
        What the inner bar shows while it runs.
    steps : int or None
        The inner bar's length (tokens); ``None``: not known.
    run : callable
        ``run(bars) -> (records, postfix)``: does the work (advancing ``bars`` by its tokens) and
        returns its records and what the outer bar shows next to it.
    """

    label: str
    steps: int | None
    run: Callable[[Progress], tuple[list[dict[str, Any]], dict[str, Any]]]


class HarnessRun:
    """One harness's run in one results directory: what every harness shares -- resume (the records
    already there), sharding, progress bars and the merge of the ranks' parts.

    Parameters
    ----------
    out_dir : path
        The results directory.
    name : str
        The harness's results name (file stem).
    shard : Shard or None
        This process's share (all of it by default).
    settings : dataclass
        The harness's settings; with ``run_info`` they must match to resume.
    run_info : dict or None
        More settings recorded with the run (model, data...).
    key : callable
        A record's identity (what resuming skips).

    A harness lists its work as :class:`Pass` es, leaving out what :meth:`is_done`; runs them
    with :meth:`run_passes`, the one loop of every harness; and ends with :meth:`finish`.
    """

    def __init__(
        self,
        out_dir: str | pathlib.Path,
        name: str,
        shard: Shard | None,
        settings: Any,
        run_info: dict[str, Any] | None,
        key: Callable[[dict[str, Any]], Any],
    ):
        self.shard = shard or Shard()
        self.key = key
        config = {"harness": name, **dataclasses.asdict(settings), **(run_info or {})}
        self.store = ResultStore(out_dir, name, self.shard, config)
        self.done = self.store.done(key)
        self.new: list[dict[str, Any]] = []

    def is_done(self, *key: Any) -> bool:
        """Whether a record of this key is in the directory already."""
        return key in self.done

    @contextmanager
    def progress(self, enabled: bool, runs: int, steps: int, label: str) -> Iterator[Progress]:
        """The run's :class:`Progress` bars, closed when the block ends (an exception included)."""
        bars = Progress(enabled, runs, steps, label)
        try:
            yield bars
        finally:
            bars.close()

    def run_passes(self, passes: Sequence[Pass], progress: bool, steps: int, label: str) -> None:
        """Run every pass in order under the progress bars (``steps``: the inner bar's length at
        first), keeping each pass's new records as it ends: a run that stops keeps what finished,
        and a record already in the directory is not written again."""
        with self.progress(progress, len(passes), steps, label) as bars:
            for work in passes:
                bars.start(work.label, work.steps)
                records, postfix = work.run(bars)
                for record in records:
                    if self.key(record) not in self.done:
                        self.keep(record)
                bars.done(**postfix)

    def keep(self, record: dict[str, Any]) -> None:
        """Store a new record (at once: a run that stops keeps it)."""
        self.store.append(record)
        self.new.append(record)

    def finish(
        self,
        order: Callable[[dict[str, Any]], Any],
        summarize: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None,
    ) -> list[dict[str, Any]] | None:
        """Mark this rank done and merge the parts when every rank is.

        Returns every record when this process merged them (writing ``summarize``'s rows to
        ``<name>_summary.csv``), else ``None``."""
        if not self.store.finish(self.key, order):
            return None
        rows = self.store.records()
        if summarize is not None:
            write_csv(summarize(rows), self.store.dir / f"{self.store.name}_summary.csv")
        return rows


def _take_lock(lock: pathlib.Path) -> bool:
    """Create ``lock`` holding this host and pid; False when a live process holds it.

    A lock left behind by a process that died while merging (same host, pid gone) is taken
    over: the merge is idempotent (records are deduplicated by key; parts are removed only after
    the merged file is in place). A lock this host cannot judge is reported, not ignored.
    """
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = _lock_holder(lock)
            if holder == "dead":
                logger.warning("%s was left by a process that no longer runs; merging now.", lock)
                lock.unlink(missing_ok=True)
                continue
            if holder != "alive":
                logger.warning(
                    "%s is held by %s, so this process does not merge the part files. If no run is "
                    "active, delete that file and run the same command again to merge.",
                    lock,
                    holder,
                )
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()}\n")
        return True
    return False


def _lock_holder(lock: pathlib.Path) -> str:
    """ "alive", "dead", or a description of a holder on another host / of an unreadable lock."""
    try:
        text = lock.read_text(encoding="utf-8").split()
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return "dead"  # released meanwhile: try again
    if len(text) != 2 or not text[1].isdigit():
        # Empty: its creator has not written it yet -- or was killed before it could.
        return "dead" if age > 60 else "alive"
    host, pid = text[0], int(text[1])
    if host != socket.gethostname():
        return f"process {pid} on host {host}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        return "alive"
    return "alive"
