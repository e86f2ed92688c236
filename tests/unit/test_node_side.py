"""Node-side helpers that need no cluster: the temp-dir sweep and the heartbeat watch."""

import threading
import time

from hpc_serve.node.engine import sweep_stale_tmp
from hpc_serve.node.heartbeat import Heartbeat
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


def test_slurm_durations():
    from hpc_serve.slurm import parse_duration

    assert parse_duration("1:50") == 110 and parse_duration("2:05:00\n") == 7500
    assert parse_duration("1-00:00:01") == 86401 and parse_duration("UNLIMITED") is None


def renewal_chain(tmp_path):
    """Deployment 1 handed over to 2 (READY); 3 is 2's successor, still loading."""
    registry = Registry(str(tmp_path))
    deps = [registry.deployment(str(i)).ensure() for i in (1, 2, 3)]
    deps[0].write("state.json", {"phase": "STOPPED", "successor": "2"})
    deps[1].write("state.json", {"phase": "READY", "successor": "3"})
    deps[1].write("endpoint.json", {"host": "10.0.0.2", "port": 2002, "url": "http://10.0.0.2:2002/v1"})
    deps[2].write("state.json", {"phase": "LOADING"})
    deps[2].write("job.json", {"predecessor": "2"})
    return registry, deps


def test_the_serving_deployment_of_a_renewal_chain(tmp_path):
    from hpc_serve.client.control import serving

    registry, deps = renewal_chain(tmp_path)
    assert [serving(registry, dep).id for dep in deps] == ["2", "2", "2"]
    deps[2].write("state.json", {"phase": "READY"})
    assert serving(registry, deps[2]).id == "3" and serving(registry, deps[0]).id == "2"


def test_the_tunnel_target_follows_a_hand_over(tmp_path):
    from hpc_serve.client.tunnel import endpoint_target

    registry, deps = renewal_chain(tmp_path)
    assert endpoint_target(deps[0].path)() == ("10.0.0.2", 2002)
    assert endpoint_target(deps[2].path)() is None  # still loading: the tunnel stays where it is
