"""A harness run's files and loop: ResultStore's merge lock (a lock left by a process killed while
merging is taken over; a lock held by a live process, or one this host cannot judge, is respected
and reported) and HarnessRun.run_passes, the loop every harness runs its work through."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from scope_kv.eval.common import Shard
from scope_kv.eval.runs import HarnessRun, Pass, ResultStore


def _key(r):
    return r["i"]


def _two_rank_parts(tmp_path):
    """Both ranks of a 2-process run wrote their parts; rank 1 has finished."""
    stores = [ResultStore(tmp_path, "res", Shard(rank, 2), {"m": 1}) for rank in (0, 1)]
    for rank, store in enumerate(stores):
        for i in range(rank, 6, 2):
            store.append({"i": i})
    assert stores[1].finish(_key, _key) is False  # rank 0 has not finished yet
    return stores[0]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    store = _two_rank_parts(tmp_path)
    lock = tmp_path / "res.merge.lock"
    lock.write_text(f"{socket.gethostname()} {_dead_pid()}\n")
    with caplog.at_level(logging.WARNING):
        assert store.finish(_key, _key) is True
    assert [r["i"] for r in store.records()] == list(range(6))
    assert not list(tmp_path.glob("res.part-*")) and not lock.exists()
    assert "no longer runs" in caplog.text


def test_empty_lock_older_than_a_minute_is_taken_over(tmp_path):
    store = _two_rank_parts(tmp_path)
    lock = tmp_path / "res.merge.lock"
    lock.write_text("")
    old = time.time() - 120
    os.utime(lock, (old, old))
    assert store.finish(_key, _key) is True
    assert (tmp_path / "res.jsonl").exists() and not lock.exists()


def test_lock_of_a_live_process_is_respected(tmp_path):
    store = _two_rank_parts(tmp_path)
    lock = tmp_path / "res.merge.lock"
    lock.write_text(f"{socket.gethostname()} {os.getpid()}\n")  # alive: this very process
    assert store.finish(_key, _key) is False
    assert lock.exists() and len(list(tmp_path.glob("res.part-*"))) == 2
    assert not (tmp_path / "res.jsonl").exists()


def test_lock_from_another_host_is_reported(tmp_path, caplog):
    store = _two_rank_parts(tmp_path)
    lock = tmp_path / "res.merge.lock"
    lock.write_text(f"{socket.gethostname()}-elsewhere 123\n")
    with caplog.at_level(logging.WARNING):
        assert store.finish(_key, _key) is False
    assert "res.merge.lock" in caplog.text and "delete that file" in caplog.text
    lock.unlink()  # what the message tells the user to do; the same command then merges
    assert store.finish(_key, _key) is True
    assert [r["i"] for r in store.records()] == list(range(6))


def test_merge_writes_its_holder_into_the_lock(tmp_path, monkeypatch):
    store = _two_rank_parts(tmp_path)
    seen = []
    merge = ResultStore.merge

    def spy(self, key, order):
        seen.append((tmp_path / "res.merge.lock").read_text().split())
        return merge(self, key, order)

    monkeypatch.setattr(ResultStore, "merge", spy)
    assert store.finish(_key, _key) is True
    assert seen == [[socket.gethostname(), str(os.getpid())]]


@dataclass(frozen=True)
class _Settings:
    n: int = 1


def _pass_key(r):
    return (r["i"],)


def _pass(i: int, log: list, fail: bool = False) -> Pass:
    def work(bars):
        log.append(i)
        if fail:
            raise RuntimeError("stopped")
        bars.step(3)
        return [{"i": i}, {"i": 100 + i}], {"last": i}

    return Pass(f"pass {i}", 3, work)


def test_run_passes_keeps_each_pass_as_it_ends_and_never_twice(tmp_path):
    """Passes run in order; the records a pass returns are kept when it ends (a run that stops
    keeps the passes before), and records already in the directory are not written again."""
    log: list[int] = []
    run = HarnessRun(tmp_path, "res", None, _Settings(), None, _pass_key)
    with pytest.raises(RuntimeError, match="stopped"):
        run.run_passes([_pass(0, log), _pass(1, log, fail=True), _pass(2, log)], True, 3, "test")
    assert log == [0, 1]
    assert [r["i"] for r in run.new] == [0, 100]

    again = HarnessRun(tmp_path, "res", None, _Settings(), None, _pass_key)
    assert again.is_done(0) and again.is_done(100) and not again.is_done(1)
    log.clear()
    again.run_passes([_pass(0, log), _pass(1, log)], False, 3, "test")  # pass 0's records are there
    assert log == [0, 1] and [r["i"] for r in again.new] == [1, 101]
    rows = again.finish(_pass_key)
    assert rows is not None and sorted(r["i"] for r in rows) == [0, 1, 100, 101]
