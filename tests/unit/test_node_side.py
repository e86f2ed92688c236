"""Node-side helpers that need no cluster: the temp-dir sweep and the heartbeat watch."""

import threading
import time

from hpc_serve.engine import sweep_stale_tmp
from hpc_serve.heartbeat import Heartbeat
from hpc_serve.registry import Registry


def test_sweep_removes_only_our_dirs_of_jobs_that_are_not_live(tmp_path):
    tmp_path = tmp_path / "tmp"
    tmp_path.mkdir()
    for name in ("hs-12", "hs-13", "hs-x", "other"):
        (tmp_path / name).mkdir()
    (tmp_path / "hs-14").write_text("a file, not a dir")
    removed = sweep_stale_tmp({"13"}, root=str(tmp_path))
    assert removed == [str(tmp_path / "hs-12")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hs-13", "hs-14", "hs-x", "other"]


def test_a_beat_that_stops_moving_is_reported_after_the_silence(tmp_path, monkeypatch):
    dep = Registry(str(tmp_path)).deployment("7").ensure()
    stop = threading.Event()
    watcher = Heartbeat(dep, 0, stop, silent_s=0.5)
    dep.write("beats/1.json", {"beat": 1})
    assert watcher.silent([1, 2]) == []  # rank 2 never beat: not judged
    watcher._checked_at = -1.0
    time.sleep(0.6)
    assert watcher.silent([1]) == [1]
    dep.write("beats/1.json", {"beat": 2})
    watcher._checked_at = -1.0
    assert watcher.silent([1]) == []
    assert watcher.reason(1, "node2").startswith("node 1 (node2) stopped reporting: no sign of life for 0 s")
