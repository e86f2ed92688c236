"""Every layout rule of docs/concepts.md, each able to fail."""

import itertools

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.layout import resolve_layout


def test_tp8_pp2_on_two_nodes_derives_dp1():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2)
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (2, 8, 2, 1)
    assert any(note.startswith("dp=1") for note in lay.notes)


def test_tp8_dp2_derives_two_nodes():
    lay = resolve_layout(gpus_per_node=8, tp=8, dp=2)
    assert lay.nodes == 2 and lay.dp == 2
    assert any(note.startswith("nodes=2") for note in lay.notes)


def test_nodes_alone_fill_nodes_with_tp_and_derive_dp():
    lay = resolve_layout(gpus_per_node=8, nodes=4)
    assert (lay.tp, lay.pp, lay.dp) == (8, 1, 4)


def test_nothing_given_is_one_node_tp_fills_it():
    lay = resolve_layout(gpus_per_node=4)
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (1, 4, 1, 1)


def test_single_gpu():
    lay = resolve_layout(gpus_per_node=1)
    assert (lay.nodes, lay.tp, lay.dp, lay.launcher) == (1, 1, 1, "mp")


@pytest.mark.parametrize("nodes,expected", [(1, "mp"), (2, "ray")])
def test_auto_launcher_is_ray_across_nodes_mp_on_one(nodes, expected):
    assert resolve_layout(gpus_per_node=8, nodes=nodes).launcher == expected


def test_explicit_launcher_is_kept():
    assert resolve_layout(gpus_per_node=8, nodes=1, launcher="ray").launcher == "ray"
    assert resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2, launcher="mp").launcher == "mp"


def test_unknown_launcher():
    with pytest.raises(HpcServeError, match="Unknown launcher 'slurm'") as err:
        resolve_layout(gpus_per_node=8, launcher="slurm")
    assert "ray" in err.value.hint and "mp" in err.value.hint


def test_idle_gpus_are_an_error_that_names_the_fix():
    with pytest.raises(HpcServeError, match="8 paid GPUs would idle") as err:
        resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=1, dp=1)
    assert "--dp 2" in err.value.hint


def test_more_gpus_than_allocated_is_an_error():
    with pytest.raises(HpcServeError, match="= 32 GPUs, but 2 nodes x 8 GPUs = 16") as err:
        resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2, dp=2)
    assert "--nodes 4" in err.value.hint


def test_tp_larger_than_a_node():
    with pytest.raises(HpcServeError, match="larger than the 8 GPUs of a node") as err:
        resolve_layout(gpus_per_node=8, tp=16)
    assert "--pp 2" in err.value.hint and "--cross-node-tp" in err.value.hint


def test_cross_node_tp_when_asked_warns():
    lay = resolve_layout(gpus_per_node=1, nodes=2, tp=2, cross_node_tp=True)
    assert (lay.tp, lay.nodes) == (2, 2)
    assert any("spans 2 nodes" in w for w in lay.warnings)


def test_cross_node_tp_must_be_whole_nodes():
    with pytest.raises(HpcServeError, match="multiple of --gpus-per-node 4"):
        resolve_layout(gpus_per_node=4, tp=6, cross_node_tp=True, nodes=3, pp=2)


def test_gpus_per_node_not_divisible_by_tp():
    with pytest.raises(HpcServeError, match="not divisible by --tp 3") as err:
        resolve_layout(gpus_per_node=8, tp=3)
    assert "--tp" in err.value.hint


@pytest.mark.parametrize("name", ["gpus_per_node", "nodes", "tp", "pp", "dp"])
@pytest.mark.parametrize("value", [0, -1])
def test_zero_or_negative_sizes(name, value):
    kwargs = {"gpus_per_node": 8, name: value}
    with pytest.raises(HpcServeError, match="at least 1"):
        resolve_layout(**kwargs)


def test_underivable_nodes():
    with pytest.raises(HpcServeError, match="Cannot derive --nodes"):
        resolve_layout(gpus_per_node=8, tp=4, pp=1, dp=3)


def test_underivable_dp():
    with pytest.raises(HpcServeError, match="Cannot derive --dp"):
        resolve_layout(gpus_per_node=8, nodes=3, tp=8, pp=2)


def test_replica_that_straddles_nodes():
    # tp=2, pp=3: a replica of 6 GPUs on 4-GPU nodes would cross a node boundary mid-replica.
    with pytest.raises(HpcServeError, match="straddle nodes"):
        resolve_layout(gpus_per_node=4, nodes=3, tp=2, pp=3, dp=2)


def test_replica_that_does_not_pack():
    with pytest.raises(HpcServeError, match="does not pack"):
        resolve_layout(gpus_per_node=8, nodes=3, tp=2, pp=3, dp=4)


def test_mp_dp_whose_replicas_span_nodes_is_allowed():
    # vLLM runs it through --nnodes (config/parallel.py nnodes_within_dp): issue 12, defect 8.
    lay = resolve_layout(gpus_per_node=8, nodes=4, tp=8, pp=2, dp=2, launcher="mp")
    assert (lay.dp, lay.dp_local, lay.spans_nodes) == (2, 1, True)
    assert [lay.node_slots(r).dp_ranks for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert [lay.node_slots(r).stages for r in range(4)] == [(0,), (1,), (0,), (1,)]
    assert resolve_layout(gpus_per_node=8, nodes=4, tp=8, pp=2, dp=2, launcher="ray").dp == 2


def test_replicas_inside_a_node_do_not_span():
    assert not resolve_layout(gpus_per_node=8, nodes=2, tp=2, launcher="mp").spans_nodes


def test_ep_size_is_dp_times_tp():
    lay = resolve_layout(gpus_per_node=8, tp=8, dp=2, ep=True)
    assert lay.ep_size == 16
    assert resolve_layout(gpus_per_node=8, tp=8, dp=2).ep_size is None


def test_ep_with_pp_is_accepted_by_vllm_but_warned():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2, ep=True)
    assert any("not recommended" in w for w in lay.warnings)


def test_node_slots_for_pp_across_nodes():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2)
    assert lay.node_slots(0).stages == (0,) and lay.node_slots(1).stages == (1,)
    assert lay.node_slots(0).dp_ranks == lay.node_slots(1).dp_ranks == (0,)


def test_node_slots_for_dp_inside_nodes():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=2, pp=1)
    assert lay.dp == 8 and lay.dp_local == 4
    assert lay.node_slots(0).dp_ranks == (0, 1, 2, 3)
    assert lay.node_slots(1).dp_ranks == (4, 5, 6, 7)


def test_node_slots_for_pp_inside_a_node():
    lay = resolve_layout(gpus_per_node=8, nodes=1, tp=4, pp=2)
    assert lay.node_slots(0).stages == (0, 1)


@pytest.mark.parametrize("g,n,tp,pp", list(itertools.product([1, 2, 4, 8], [1, 2, 4], [1, 2, 4, 8], [1, 2, 4])))
def test_every_valid_layout_uses_every_gpu_exactly_once(g, n, tp, pp):
    try:
        lay = resolve_layout(gpus_per_node=g, nodes=n, tp=tp, pp=pp)
    except HpcServeError:
        return  # the error cases are covered one by one above
    assert lay.tp * lay.pp * lay.dp == lay.nodes * lay.gpus_per_node
    seen = {(rank, gpu) for rank in range(lay.nodes) for gpu in lay.node_slots(rank).gpus}
    assert len(seen) == lay.total_gpus
    ranks = set().union(*(lay.node_slots(r).dp_ranks for r in range(lay.nodes)))
    assert ranks == set(range(lay.dp))
