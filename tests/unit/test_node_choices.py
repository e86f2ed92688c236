"""Pure choices the node agent makes: its address, the GPUs of a local job, the compile cache, why
a run ended, and which leftover processes to end (real processes, our own logic)."""

import os
import subprocess
import sys
import time

import pytest

from hpc_serve.node.ending import judge, note_signal
from hpc_serve.node.engine import end_leftovers, marked_processes
from hpc_serve.node.environment import cache_env
from hpc_serve.errors import HpcServeError
from hpc_serve.node.netaddr import Interface, choose_address, interfaces
from hpc_serve.planner.spec import check_network
from hpc_serve.registry import Registry
from hpc_serve.job.submission import local_gpus

LO = Interface("lo", "127.0.0.1", True, True)
ETH = Interface("eth0", "10.0.0.5", True, False)
IB = Interface("ib0", "10.1.2.3", True, False)
DOWN = Interface("eth1", "10.2.0.1", False, False)


def test_a_cidr_or_an_interface_name_picks_that_network():
    found = [LO, ETH, IB]
    assert choose_address("10.1.0.0/16", found=found).ip == "10.1.2.3"
    assert choose_address("10.1.0.0/16", found=found).interface == "ib0"
    assert choose_address("ib0", found=found).ip == "10.1.2.3"
    with pytest.raises(HpcServeError, match=r"has an address in --network 10\.9\.0\.0/16 \(it has: lo 127"):
        choose_address("10.9.0.0/16", found=found)
    with pytest.raises(HpcServeError, match="no interface 'ib1'"):
        choose_address("ib1", found=found)
    with pytest.raises(HpcServeError, match="has an address"):
        choose_address("10.2.0.0/16", found=[LO, DOWN])  # a down interface is never chosen


def test_by_default_never_loopback_when_a_global_address_exists():
    # the hostname resolves to loopback (Debian's /etc/hosts): the first global interface wins
    chosen = choose_address(None, hostname="localhost", found=[LO, DOWN, ETH, IB])
    assert (chosen.ip, chosen.interface) == ("10.0.0.5", "eth0")
    assert choose_address(None, hostname="localhost", found=[LO]).ip == "127.0.0.1"


def test_by_default_a_hostname_that_names_one_of_our_addresses_is_used():
    real = [i for i in interfaces() if i.up and not i.loopback]
    if not real:
        pytest.skip("this machine has no global interface")
    chosen = choose_address(None, hostname=real[-1].ip, found=real)
    assert chosen.ip == real[-1].ip and chosen.how == "the hostname"


def test_a_follower_takes_the_address_its_route_to_node_0_leaves_from():
    real = [i for i in interfaces() if i.up and not i.loopback]
    if not real:
        pytest.skip("this machine has no global interface")
    chosen = choose_address(None, head_ip=real[0].ip, hostname="localhost", found=[LO, *real])
    assert chosen.ip == real[0].ip and chosen.how.startswith("the route to node 0")


@pytest.mark.parametrize("bad", ["10.0.0.0/99", "eth0; rm", "a" * 16, ""])
def test_a_network_setting_that_is_neither_is_refused(bad):
    with pytest.raises(HpcServeError, match="--network"):
        check_network(bad)
    check_network("ib0")
    check_network("10.1.0.0/16")


def test_local_gpus_follow_the_users_visible_devices():
    assert local_gpus(2, {"CUDA_VISIBLE_DEVICES": "3,5,7"}) == ["3", "5"]
    assert local_gpus(1, {"CUDA_VISIBLE_DEVICES": "GPU-1a2b,GPU-3c4d"}) == ["GPU-1a2b"]
    with pytest.raises(HpcServeError, match=r"needs 4 GPU\(s\) on this machine, but CUDA_VISIBLE_DEVICES='3,5' gives 2"):
        local_gpus(4, {"CUDA_VISIBLE_DEVICES": "3,5"})
    with pytest.raises(HpcServeError, match="gives 0"):
        local_gpus(1, {"CUDA_VISIBLE_DEVICES": ""})
    if not os.path.isdir("/proc/driver/nvidia/gpus"):  # a CPU machine: numbered placeholders
        assert local_gpus(3, {}) == ["0", "1", "2"]


def test_the_compile_cache_is_per_user_and_honours_the_users_choice(tmp_path):
    home = {"HOME": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert cache_env(None, home) == {"VLLM_CACHE_ROOT": str(tmp_path / "xdg" / "vllm"),
                                     "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "xdg" / "vllm" / "inductor")}
    mine = {**home, "VLLM_CACHE_ROOT": str(tmp_path / "mine")}
    assert cache_env(None, mine)["VLLM_CACHE_ROOT"] == str(tmp_path / "mine")
    assert cache_env(str(tmp_path / "setting"), mine)["VLLM_CACHE_ROOT"] == str(tmp_path / "setting")
    both = {**mine, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "ind")}
    assert cache_env(None, both)["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "ind")
    assert (tmp_path / "mine" / "inductor").is_dir()


def start_marked(marker: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                            env={**os.environ, "HPC_SERVE_PROCESS": marker})


def test_leftovers_of_ended_jobs_are_ended_and_live_ones_kept():
    # job ids of this test alone (the machine may run real deployments at the same time): each
    # call is limited to markers with this test's prefix
    base = f"9{os.getpid()}"
    dead, live, own = start_marked(f"{base}1/0"), start_marked(f"{base}2/1"), start_marked(f"{base}3/0")
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    local_live = start_marked(f"local-{controller.pid}/0")
    local_dead = start_marked(f"local-{gone.pid}/0")
    try:
        deadline = time.monotonic() + 10
        while len(marked_processes(base)) < 3 or not marked_processes(f"local-{gone.pid}/"):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert end_leftovers(None, f"{base}3", prefix=base) == {}  # Slurm cannot say: no Slurm job is touched
        ended = end_leftovers({f"{base}2"}, f"{base}3", prefix=base)
        assert ended == {f"{base}1/0": [dead.pid]}
        assert end_leftovers(None, f"{base}3", prefix=f"local-{controller.pid}/") == {}
        assert end_leftovers(None, f"{base}3", prefix=f"local-{gone.pid}/") == {f"local-{gone.pid}/0": [local_dead.pid]}
        assert dead.wait(5) is not None and local_dead.wait(5) is not None
        assert live.poll() is None and own.poll() is None and local_live.poll() is None
    finally:
        for process in (dead, live, own, controller, local_live, local_dead):
            process.kill()
            process.wait()


@pytest.fixture
def dep(tmp_path):
    dep = Registry(str(tmp_path)).deployment("77").ensure()
    for rank, host in enumerate(("n1", "n2", "n3")):
        dep.write(f"nodes/{rank}.json", {"rank": rank, "hostname": host, "restart": 0})
    dep.init_phase("LOADING")
    return dep


def test_a_sigterm_with_every_agent_noting_it_is_a_plain_stop(dep):
    for rank in (1, 2):
        note_signal(dep, rank, 0, "SIGTERM")
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=0, note_wait_s=0.2).reason == "received SIGTERM"


def test_a_node_whose_agent_never_notes_the_signal_vanished(dep):
    note_signal(dep, 1, 0, "SIGTERM")
    verdict = judge(dep, "local-1", 0, 0, "SIGTERM", since=0, note_wait_s=0.2)
    assert verdict.phase == "FAILED" and verdict.reason.startswith("node 2 (n3): its agent vanished")
    note_signal(dep, 2, 1, "SIGTERM")  # a note of another run does not count
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=0, note_wait_s=0.2).phase == "FAILED"


def test_the_users_cancel_the_time_limit_and_a_failure_win(dep):
    assert judge(dep, "local-1", 0, 0, "SIGUSR1", since=0).phase == "TIMEOUT"
    started = time.time()
    dep.mark_cancel()
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=started - 1).reason == "cancelled (hpc-serve cancel)"
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=started + 60, note_wait_s=0.1).phase == "FAILED"  # an old mark
    dep.write("nodes/1.json", {"rank": 1, "hostname": "n2", "restart": 0, "failed": "vllm on node 1 exited"})
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=started + 60, note_wait_s=0.1).reason == "vllm on node 1 exited"


def test_node_1_decides_only_when_node_0_vanished(dep):
    assert judge(dep, "local-1", 2, 0, "SIGTERM", since=0) is None  # never node 2's to record
    note_signal(dep, 0, 0, "SIGTERM")
    assert judge(dep, "local-1", 1, 0, "SIGTERM", since=0, note_wait_s=0.2) is None
    dep.remove("ends/0.json")
    verdict = judge(dep, "local-1", 1, 0, "SIGTERM", since=0, note_wait_s=0.2)
    assert verdict.phase == "FAILED" and verdict.reason.startswith("node 0 (n1): its agent vanished")
    dep.set_phase("STOPPED", "cancelled")
    assert judge(dep, "local-1", 0, 0, "SIGTERM", since=0) is None  # already recorded


MAPPER = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 4096)
view = mmap.mmap(fd, 4096)
print("mapped", flush=True)
time.sleep(60)
"""


def test_the_cleanup_keeps_the_shm_files_a_live_process_still_uses(tmp_path):
    from hpc_serve.node.cleanup import clean_node, shm_files, shm_in_use

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    ours_file, theirs_file = f"/dev/shm/vllm-test-ours-{tag}", f"/dev/shm/vllm-test-theirs-{tag}"
    before = shm_files()

    def mapper(path: str, marker: str) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", MAPPER, path], stdout=subprocess.PIPE, text=True,
                                   env={**os.environ, "HPC_SERVE_PROCESS": marker})
        assert process.stdout.readline() == "mapped\n"
        return process

    ours, theirs = mapper(ours_file, "8001/0"), mapper(theirs_file, "8002/0")  # a neighbour's deployment
    try:
        seen = shm_in_use([ours.pid])
        assert seen == {ours_file}, seen
        ours.kill()
        ours.wait()
        (tmp_path / "job").mkdir()
        clean_node(str(tmp_path / "job"), before)
        assert not os.path.exists(ours_file) and os.path.exists(theirs_file)  # in use by a live process
        assert not (tmp_path / "job").exists()
    finally:
        for process in (ours, theirs):
            process.kill()
            process.wait()
        for path in (ours_file, theirs_file):
            if os.path.exists(path):
                os.unlink(path)


def test_the_job_folder_must_be_this_users_own(tmp_path):
    from hpc_serve.node.cleanup import private_dir

    made = private_dir(str(tmp_path / "hs-1"))
    assert os.stat(made).st_mode & 0o777 == 0o700
    assert private_dir(made) == made  # ours already: fine
    (tmp_path / "hs-2").mkdir(mode=0o755)
    with pytest.raises(RuntimeError, match="is not this user's private folder"):
        private_dir(str(tmp_path / "hs-2"))  # e.g. made first by another user, readable by all
    (tmp_path / "hs-3").symlink_to(tmp_path / "hs-1")
    with pytest.raises(RuntimeError, match="is not this user's private folder"):
        private_dir(str(tmp_path / "hs-3"))
    if os.geteuid() == 0:  # as root: a folder another user made first, private to them
        (tmp_path / "hs-4").mkdir(mode=0o700)
        os.chown(tmp_path / "hs-4", 65534, 65534)
        with pytest.raises(RuntimeError, match="owner uid 65534"):
            private_dir(str(tmp_path / "hs-4"))


def test_the_sweep_removes_stale_shm_files_nobody_holds_and_keeps_the_rest():
    from hpc_serve.node.cleanup import STALE_SHM_S, remove_unused_shm, stale_shm_files

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    old, held, young = (f"/dev/shm/vllm-test-{kind}-{tag}" for kind in ("old", "held", "young"))
    holder = subprocess.Popen([sys.executable, "-c", MAPPER, held], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "mapped\n"
        for path in (old, young):
            with open(path, "wb") as handle:
                handle.write(b"x")
        long_ago = time.time() - STALE_SHM_S - 30
        for path in (old, held):
            os.utime(path, (long_ago, long_ago))
        stale = stale_shm_files()
        assert {old, held} <= stale and young not in stale
        removed = remove_unused_shm(stale)
        assert old in removed and held not in removed
        assert not os.path.exists(old) and os.path.exists(held) and os.path.exists(young)
    finally:
        holder.kill()
        holder.wait()
        for path in (old, held, young):
            if os.path.exists(path):
                os.unlink(path)
