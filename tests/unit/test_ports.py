"""Ports: every port Ray and vLLM bind comes from the job (issue 12, defect 4), and the node agent
checks exactly the ports each node's processes bind (defect 6)."""

import itertools

import pytest

from hpc_serve.planner.launch import make_plan, node_plan
from hpc_serve.planner.ports import job_ports
from hpc_serve.planner.spec import build_spec
from hpc_serve.planner.vllm_args import Runtime


def spec(**kwargs):
    return build_spec(**{"model": "org/m", "gpus_per_node": 8, **kwargs})


def named(ports):
    return [ports.api, ports.ray, ports.master, ports.dp_rpc, ports.ray_client, ports.ray_node_manager,
            ports.ray_object_manager, ports.ray_metrics_export, ports.ray_dashboard_agent_grpc,
            ports.ray_dashboard_agent_http, ports.ray_runtime_env_agent, ports.ray_autoscaler_metrics,
            ports.ray_dashboard_metrics, ports.preflight]


def workers(ports):
    return set(range(ports.ray_min_worker, ports.ray_max_worker + 1))


@pytest.mark.parametrize("job", [0, 1, 624, 625, 12345, 99999999])
def test_a_jobs_ports_are_distinct_and_in_the_band(job):
    ports = job_ports(job)
    assert len(set(named(ports))) == len(named(ports))
    assert all(20000 <= port < 30000 for port in named(ports))
    assert 30000 <= ports.ray_min_worker < ports.ray_max_worker <= 32767  # below the ephemeral range
    assert len(workers(ports)) == 64 and not workers(ports) & set(named(ports))


def test_jobs_on_one_node_get_disjoint_ports():
    for a, b in itertools.combinations(range(40), 2):  # 40 jobs in a row, pairwise
        pa, pb = job_ports(a), job_ports(b)
        assert not set(named(pa)) & set(named(pb)), (a, b)
        assert not workers(pa) & workers(pb), (a, b)


def test_no_ray_default_port_is_used():
    defaults = {6379, 8265, 10001, 52365, 44217, 44227} | set(range(10002, 20000))
    for job in range(0, 5000, 7):
        ports = job_ports(job)
        assert not (set(named(ports)) | workers(ports)) & defaults


def test_the_api_port_given_wins():
    assert job_ports(7, api_port=8000).api == 8000


def test_runtime_for_job_carries_every_port():
    ports = job_ports(3)
    rt = Runtime.for_job(ports, "10.0.0.2", "10.0.0.1", "/tmp/hs-3")
    values = [int(getattr(rt, f)) for f in rt.__dataclass_fields__ if f.endswith("_port")]
    assert sorted(values) == sorted(named(ports) + [ports.ray_min_worker, ports.ray_max_worker])


RT = Runtime.for_job(job_ports(3), "10.0.0.2", "10.0.0.1", "/tmp/hs-3")


def ray_process(plan):
    return [p for p in plan.processes if p.name == "ray"][0]


@pytest.mark.parametrize("rank", [0, 1])
def test_ray_start_gets_every_port_from_the_job(rank):
    ports = job_ports(3)
    ray = ray_process(node_plan(spec(nodes=2, tp=8, pp=2), rank, RT))
    argv = list(ray.argv)

    def flag(name):
        return int(argv[argv.index(name) + 1])

    assert flag("--node-manager-port") == ports.ray_node_manager
    assert flag("--object-manager-port") == ports.ray_object_manager
    assert flag("--metrics-export-port") == ports.ray_metrics_export
    assert flag("--dashboard-agent-grpc-port") == ports.ray_dashboard_agent_grpc
    assert flag("--dashboard-agent-listen-port") == ports.ray_dashboard_agent_http
    assert flag("--runtime-env-agent-port") == ports.ray_runtime_env_agent
    assert (flag("--min-worker-port"), flag("--max-worker-port")) == (ports.ray_min_worker, ports.ray_max_worker)
    env = dict(ray.env)
    assert env["RAY_prestart_worker_first_driver"] == "0"
    if rank == 0:
        assert flag("--port") == ports.ray and flag("--ray-client-server-port") == ports.ray_client
        assert int(env["AUTOSCALER_METRIC_PORT"]) == ports.ray_autoscaler_metrics
        assert int(env["DASHBOARD_METRIC_PORT"]) == ports.ray_dashboard_metrics


P = job_ports(3)
LAYOUTS = {
    "single node": ({"gpus_per_node": 8, "tp": 4, "dp": 2}, [[P.api]]),
    "mp tp/pp": ({"nodes": 2, "tp": 8, "pp": 2, "launcher": "mp"}, [[P.api, P.master], []]),
    "mp dp": ({"nodes": 2, "tp": 8, "dp": 2, "launcher": "mp"}, [[P.api, P.dp_rpc], []]),
    "mp dp spanning": ({"nodes": 4, "tp": 8, "pp": 2, "dp": 2, "launcher": "mp"},
                       [[P.api, P.master, P.dp_rpc], [], [], []]),
}


@pytest.mark.parametrize("name", LAYOUTS)
def test_mp_nodes_check_exactly_the_ports_they_bind(name):
    kwargs, expected = LAYOUTS[name]
    plan = make_plan(spec(**kwargs), RT)
    assert [sorted(map(int, node.ports)) for node in plan.nodes] == [sorted(e) for e in expected]


def test_ray_nodes_check_every_ray_port_and_not_the_dp_rpc_port():
    plan = make_plan(spec(tp=8, dp=2, launcher="ray"), RT)
    per_node = {P.ray_node_manager, P.ray_object_manager, P.ray_metrics_export,
                P.ray_dashboard_agent_grpc, P.ray_dashboard_agent_http, P.ray_runtime_env_agent}
    head = per_node | {P.api, P.ray, P.ray_client, P.ray_autoscaler_metrics, P.ray_dashboard_metrics}
    assert set(map(int, plan.nodes[0].ports)) == head and len(plan.nodes[0].ports) == len(head)
    assert set(map(int, plan.nodes[1].ports)) == per_node


@pytest.mark.parametrize("kwargs", [kw for kw, _ in LAYOUTS.values()] + [
    {"tp": 8, "dp": 2, "launcher": "ray"}, {"nodes": 2, "tp": 8, "pp": 2}])
def test_every_checked_port_is_one_the_nodes_processes_are_given(kwargs):
    for node in make_plan(spec(**kwargs), RT).nodes:
        given = {word for p in node.processes for word in (*p.argv, *(v for _, v in p.env))}
        assert set(node.ports) <= given, node.rank


def test_the_plan_ahead_shows_placeholder_ports():
    assert make_plan(spec(nodes=2, tp=8, pp=2)).nodes[1].ports[0] == "<ray-node-manager-port>"
