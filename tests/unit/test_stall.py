"""The stall watch: output that stops for the bound is a stall; any growth, on any log, is not."""

from hpc_serve.node.stall import OutputWatch, node_logs, stall_reason

from .test_node_side import Clock


def test_output_that_stops_for_the_bound_is_a_stall_and_growth_anywhere_resets_it(tmp_path):
    (tmp_path / "node-0.log").write_text("loading\n")
    clock = Clock()
    watch = OutputWatch(node_logs(str(tmp_path)), 10, clock)
    clock.now += 9.5
    assert watch.silent_s() is None
    (tmp_path / "node-1.log").write_text("a follower's engine says something\n")  # another node's log
    clock.now += 5
    assert watch.silent_s() is None  # it grew: the silence starts again now
    clock.now += 9.5
    assert watch.silent_s() is None
    clock.now += 1.0
    assert watch.silent_s() == 10.5
    with open(tmp_path / "node-0.log", "a") as log:
        log.write("Loading safetensors checkpoint shards: 50%\n")
    clock.now += 1
    assert watch.silent_s() is None


def test_it_looks_at_most_once_a_second_and_never_with_a_bound_of_0(tmp_path):
    looks = []
    clock = Clock()

    def paths():
        looks.append(clock.now)
        return []

    watch = OutputWatch(paths, 5, clock)
    for _ in range(10):
        clock.now += 0.25
        watch.silent_s()
    assert len(looks) == 1 + 2  # the first look, then one a second
    off = OutputWatch(paths, 0, clock)
    clock.now += 3600
    assert off.silent_s() is None


def test_the_reason_names_the_time_the_setting_and_the_last_line():
    assert stall_reason(1200.4, 1200, "node 0 (n1)", "Loading weights...\n") == (
        "the start-up stalled: no new output from the engine on any node for 1200 s while loading "
        "(--stall-timeout 1200); the last line on node 0 (n1): Loading weights...")
