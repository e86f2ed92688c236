"""Node-side helpers that need no cluster: the temp-dir sweep and the heartbeat watch."""

import threading

from hpc_serve.node.cleanup import sweep_stale_tmp
from hpc_serve.node.heartbeat import Heartbeat
from hpc_serve.node.polling import wait_until
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


class Clock:
    """The watching node's clock, moved by the test (the watch compares only its own readings)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_beat_that_stops_moving_is_reported_after_the_silence(tmp_path):
    dep = Registry(str(tmp_path)).deployment("7").ensure()
    clock = Clock()
    watcher = Heartbeat(dep, 0, threading.Event(), silent_s=10, clock=clock)
    dep.write("beats/1.json", {"beat": 1})
    assert watcher.silent([1, 2]) == []  # rank 1 first seen; rank 2 never beat: not judged
    clock.now += 9.5
    assert watcher.silent([1, 2]) == []  # not silent for 10 s yet
    clock.now += 1.0
    assert watcher.silent([1, 2]) == [1]  # 10.5 s without a move
    clock.now += 0.3
    assert watcher.silent([1]) == []  # read at most once a second (a shared filesystem): not read
    dep.write("beats/1.json", {"beat": 2})
    clock.now += 0.7
    assert watcher.silent([1]) == []  # it moved: alive again, judged from now on
    clock.now += 9.5
    assert watcher.silent([1]) == []
    clock.now += 1.0
    assert watcher.silent([1]) == [1]
    assert watcher.reason(1, "node2").startswith("node 1 (node2) stopped reporting: no sign of life for 10 s")


def test_the_beat_is_written_at_once_and_ends_with_the_run(tmp_path):
    dep = Registry(str(tmp_path)).deployment("8").ensure()
    stop = threading.Event()
    Heartbeat(dep, 3, stop).start()
    assert wait_until(lambda: (dep.read("beats/3.json", {}) or {}).get("beat") == 1, 5)
    stop.set()
    assert wait_until(lambda: not any(t.name == "heartbeat" for t in threading.enumerate()), 5)


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
