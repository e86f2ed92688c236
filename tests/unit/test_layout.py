"""Every layout rule of docs/concepts.md, each able to fail.

A grid of inputs is judged twice: by resolve_layout, and by an oracle written here from the rules
alone (a search for the missing sizes instead of division, a map of every single GPU to its replica
and stage instead of one GPU per TP group). Each input the oracle accepts must resolve to exactly
its layout; each one it rejects must raise the error of the first rule it breaks, word for word.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

import pytest

from hpc_serve.errors import HpcServeError
from hpc_serve.planner.layout import NodeSlots, resolve_layout


@dataclass(frozen=True)
class Case:
    """One input of the grid (None: left for resolve_layout to derive)."""

    gpus_per_node: int
    nodes: int | None
    tp: int | None
    pp: int | None
    dp: int | None
    cross_node_tp: bool = False

    @property
    def kwargs(self) -> dict:
        return {"gpus_per_node": self.gpus_per_node, "nodes": self.nodes, "tp": self.tp,
                "pp": self.pp, "dp": self.dp, "cross_node_tp": self.cross_node_tp}

    def __str__(self) -> str:
        return (f"g{self.gpus_per_node}-n{self.nodes}-tp{self.tp}-pp{self.pp}-dp{self.dp}"
                + ("-cross" if self.cross_node_tp else ""))


@dataclass(frozen=True)
class Valid:
    nodes: int
    tp: int
    pp: int
    dp: int


@dataclass(frozen=True)
class Broken:
    """The error of the first rule broken; ``hint_starts`` when the hint's fix is pinned below."""

    rule: str
    problem: str
    hint: str
    hint_starts: bool = False


RULES = ("tp inside a node", "cross-node tp of whole nodes", "tp divides a node", "nodes derivable",
         "dp derivable", "no idle GPU", "no GPU beyond the allocation", "replica packs",
         "replica spans whole nodes")


def oracle(case: Case) -> Valid | Broken:
    """What the rules say of ``case``, in the order docs/concepts.md gives them."""
    g = case.gpus_per_node
    tp = g if case.tp is None else case.tp
    pp = 1 if case.pp is None else case.pp
    if tp > g and not case.cross_node_tp:
        return Broken("tp inside a node",
                      f"--tp {tp} is larger than the {g} GPUs of a node: TP belongs inside a node.",
                      f"Use --tp {g} with --pp {max(1, tp * pp // g)} across nodes, or --cross-node-tp "
                      "if you really want TP over the network.")
    if tp > g and tp % g:
        return Broken("cross-node tp of whole nodes",
                      f"--tp {tp} across nodes must be a multiple of --gpus-per-node {g}.",
                      f"Use --tp {tp // g * g}.")
    if tp <= g and g % tp:
        divisor = max(d for d in range(1, tp + 1) if g % d == 0)
        return Broken("tp divides a node",
                      f"--gpus-per-node {g} is not divisible by --tp {tp}: some GPUs of each node would idle.",
                      f"Use a --tp that divides {g} (e.g. {divisor}).")
    # Search, not division: the sizes that use every GPU, with what was given kept.
    node_choices = [case.nodes] if case.nodes else range(1, 257)
    dp_choices = [case.dp] if case.dp else [1] if case.nodes is None else range(1, 257)
    fits = [(n, d) for n in node_choices for d in dp_choices if tp * pp * d == n * g]
    if not fits:
        if case.nodes is None:
            used = tp * pp * (case.dp or 1)
            return Broken("nodes derivable",
                          f"Cannot derive --nodes: {used} GPUs do not split into groups of {g}.",
                          f"tp*pp*dp = {used} is not a multiple of {g} GPUs per node: "
                          "change --tp/--pp/--dp or --gpus-per-node.")
        total = case.nodes * g
        if case.dp is None:
            return Broken("dp derivable",
                          f"Cannot derive --dp: {total} GPUs do not split into groups of {tp * pp}.",
                          f"{case.nodes} nodes x {g} GPUs = {total} is not a multiple of tp*pp = "
                          f"{tp * pp}: change --nodes, --tp or --pp.")
        used = tp * pp * case.dp
        sizes = f"tp*pp*dp = {tp}*{pp}*{case.dp} = {used} GPUs, but {case.nodes} nodes x {g} GPUs = {total}"
        if used < total:
            return Broken("no idle GPU", f"{sizes}: {total - used} paid GPUs would idle.",
                          "To use them all, ", hint_starts=True)
        return Broken("no GPU beyond the allocation", f"{sizes}.", "Use --nodes ", hint_starts=True)
    (nodes, dp), = fits
    replica = tp * pp
    if replica < g and g % replica:
        return Broken("replica packs",
                      f"A replica of tp*pp = {replica} GPUs does not pack into a {g}-GPU node.",
                      "Choose --tp/--pp whose product divides --gpus-per-node, or spans whole nodes.")
    if replica > g and replica % g:
        return Broken("replica spans whole nodes",
                      f"A replica of tp*pp = {replica} GPUs would straddle nodes ({g} GPUs each).",
                      "Choose --tp/--pp whose product is a multiple of --gpus-per-node.")
    return Valid(nodes, tp, pp, dp)


def grid() -> list[Case]:
    cases = []
    sizes = itertools.product((1, 2, 4, 8), (None, 1, 2, 3, 4), (None, 1, 2, 3, 4, 8, 16),
                              (None, 1, 2, 3), (None, 1, 2, 3, 4))
    for g, nodes, tp, pp, dp in sizes:
        cases.append(Case(g, nodes, tp, pp, dp))
        if tp is not None and tp > g:  # --cross-node-tp changes nothing else
            cases.append(Case(g, nodes, tp, pp, dp, cross_node_tp=True))
    return cases


JUDGED = [(case, oracle(case)) for case in grid()]
VALID = [pytest.param(case, want, id=str(case)) for case, want in JUDGED if isinstance(want, Valid)]
#: One input per distinct error (inputs that differ only in sizes the broken rule ignores say the same).
FIRST_INPUT = {want: case for case, want in reversed(JUDGED) if isinstance(want, Broken)}
BROKEN = [pytest.param(case, want, id=str(case)) for want, case in FIRST_INPUT.items()]


def test_the_grid_holds_valid_layouts_and_breaks_every_rule():
    assert len(VALID) > 300
    assert {expected.rule for _, expected in JUDGED if isinstance(expected, Broken)} == set(RULES)


def gpu_map(nodes: int, g: int, tp: int, pp: int) -> list[NodeSlots]:
    """Each node's stages and replicas, from every one of its GPUs (global index = rank*g + gpu)."""
    out = []
    for rank in range(nodes):
        indices = [rank * g + gpu for gpu in range(g)]
        stages = sorted({index % (tp * pp) // tp for index in indices})
        replicas = sorted({index // (tp * pp) for index in indices})
        out.append(NodeSlots(rank, tuple(range(g)), tuple(stages), tuple(replicas)))
    return out


def expected_notes(case: Case, want: Valid) -> tuple[str, ...]:
    g, notes = case.gpus_per_node, []
    if case.tp is None:
        notes.append(f"tp={want.tp}: fills a node (gpus_per_node={g})")
    if case.nodes is None:
        notes.append(f"nodes={want.nodes}: tp*pp*dp / gpus_per_node = {want.tp * want.pp * want.dp}/{g}")
    elif case.dp is None:
        notes.append(f"dp={want.dp}: nodes*gpus_per_node / (tp*pp) = {want.nodes * g}/{want.tp * want.pp}")
    return tuple(notes)


@pytest.mark.parametrize("case,want", VALID)
def test_a_valid_layout_is_exactly_what_the_rules_give(case, want):
    g = case.gpus_per_node
    lay = resolve_layout(**case.kwargs)
    assert (lay.nodes, lay.gpus_per_node, lay.tp, lay.pp, lay.dp) == (want.nodes, g, want.tp, want.pp, want.dp)
    assert lay.tp * lay.pp * lay.dp == lay.nodes * g  # every paid GPU serves
    assert g % lay.tp == 0 if lay.tp <= g else (case.cross_node_tp and lay.tp % g == 0)
    replica = lay.tp * lay.pp
    assert lay.replica_gpus == replica and lay.spans_nodes == (replica > g)
    assert lay.dp_local == (g // replica if replica <= g else 1)
    assert [lay.node_slots(rank) for rank in range(lay.nodes)] == gpu_map(lay.nodes, g, lay.tp, lay.pp)
    launcher = "ray" if lay.nodes > 1 else "mp"
    how = "Ray across nodes" if lay.nodes > 1 else "one node needs no Ray"
    assert lay.launcher == launcher
    assert lay.notes == (*expected_notes(case, want), f"launcher={launcher}: {how}")
    cross = (f"TP={lay.tp} spans {lay.tp // g} nodes: every layer talks over the network, expect it slow.",)
    assert lay.warnings == (cross if lay.tp > g else ())
    assert lay.ep is False and lay.ep_size is None


@pytest.mark.parametrize("case,want", VALID)
def test_ep_and_an_explicit_launcher_change_only_their_own_fields(case, want):
    plain = resolve_layout(**case.kwargs)
    other = "mp" if plain.launcher == "ray" else "ray"
    lay = resolve_layout(**case.kwargs, ep=True, launcher=other)
    assert (lay.nodes, lay.tp, lay.pp, lay.dp, lay.launcher) == (want.nodes, want.tp, want.pp, want.dp, other)
    assert lay.ep_size == want.dp * want.tp  # vLLM's own EP size: dp * tp
    assert lay.notes == plain.notes[:-1]  # no launcher note: it was given
    ep_pp = ("EP with PP > 1 is accepted by vLLM but not recommended by its serving guide: prefer --tp and "
             "--dp (EP size = dp*tp).",)
    assert lay.warnings == plain.warnings + (ep_pp if want.pp > 1 else ())


@pytest.mark.parametrize("case,broken", BROKEN)
def test_an_invalid_layout_names_the_first_rule_it_breaks(case, broken):
    with pytest.raises(HpcServeError) as err:
        resolve_layout(**case.kwargs)
    assert err.value.problem == broken.problem
    if broken.hint_starts:
        assert err.value.hint.startswith(broken.hint), err.value.hint
    else:
        assert err.value.hint == broken.hint


# Each class of error once, problem and hint written out (the fixes the grid leaves to a prefix too).
ERRORS = {
    "idle, fix dp": ({"gpus_per_node": 8, "nodes": 2, "tp": 8, "pp": 1, "dp": 1},
                     "tp*pp*dp = 8*1*1 = 8 GPUs, but 2 nodes x 8 GPUs = 16: 8 paid GPUs would idle.",
                     "To use them all, use --dp 2; or ask for fewer nodes or --gpus-per-node."),
    "idle, fix nodes": ({"gpus_per_node": 8, "nodes": 3, "tp": 8, "pp": 2, "dp": 1},
                        "tp*pp*dp = 8*2*1 = 16 GPUs, but 3 nodes x 8 GPUs = 24: 8 paid GPUs would idle.",
                        "To use them all, use --nodes 2; or ask for fewer nodes or --gpus-per-node."),
    "idle, no single fix": ({"gpus_per_node": 8, "nodes": 1, "tp": 2, "pp": 3, "dp": 1},
                            "tp*pp*dp = 2*3*1 = 6 GPUs, but 1 nodes x 8 GPUs = 8: 2 paid GPUs would idle.",
                            "To use them all, change --tp/--pp/--dp; or ask for fewer nodes or --gpus-per-node."),
    "too many, whole nodes": ({"gpus_per_node": 8, "nodes": 2, "tp": 8, "pp": 2, "dp": 2},
                              "tp*pp*dp = 8*2*2 = 32 GPUs, but 2 nodes x 8 GPUs = 16.",
                              "Use --nodes 4 or lower --tp/--pp/--dp."),
    "too many, part nodes": ({"gpus_per_node": 8, "nodes": 1, "tp": 4, "pp": 3, "dp": 1},
                             "tp*pp*dp = 4*3*1 = 12 GPUs, but 1 nodes x 8 GPUs = 8.",
                             "Use --nodes 2 and adjust --gpus-per-node or lower --tp/--pp/--dp."),
    "tp over a node": ({"gpus_per_node": 8, "tp": 16},
                       "--tp 16 is larger than the 8 GPUs of a node: TP belongs inside a node.",
                       "Use --tp 8 with --pp 2 across nodes, or --cross-node-tp if you really want TP over "
                       "the network."),
    "cross-node tp of part nodes": ({"gpus_per_node": 4, "nodes": 3, "tp": 10, "pp": 2, "cross_node_tp": True},
                                    "--tp 10 across nodes must be a multiple of --gpus-per-node 4.",
                                    "Use --tp 8."),
    "tp not dividing a node": ({"gpus_per_node": 8, "tp": 3},
                               "--gpus-per-node 8 is not divisible by --tp 3: some GPUs of each node would idle.",
                               "Use a --tp that divides 8 (e.g. 2)."),
    "underivable nodes": ({"gpus_per_node": 8, "tp": 4, "pp": 1, "dp": 3},
                          "Cannot derive --nodes: 12 GPUs do not split into groups of 8.",
                          "tp*pp*dp = 12 is not a multiple of 8 GPUs per node: change --tp/--pp/--dp or "
                          "--gpus-per-node."),
    "underivable dp": ({"gpus_per_node": 8, "nodes": 3, "tp": 8, "pp": 2},
                       "Cannot derive --dp: 24 GPUs do not split into groups of 16.",
                       "3 nodes x 8 GPUs = 24 is not a multiple of tp*pp = 16: change --nodes, --tp or --pp."),
    # tp=2, pp=3: a replica of 6 GPUs on 4-GPU nodes would cross a node boundary mid-replica.
    "replica straddles nodes": ({"gpus_per_node": 4, "nodes": 3, "tp": 2, "pp": 3, "dp": 2},
                                "A replica of tp*pp = 6 GPUs would straddle nodes (4 GPUs each).",
                                "Choose --tp/--pp whose product is a multiple of --gpus-per-node."),
    "replica does not pack": ({"gpus_per_node": 8, "nodes": 3, "tp": 2, "pp": 3, "dp": 4},
                              "A replica of tp*pp = 6 GPUs does not pack into a 8-GPU node.",
                              "Choose --tp/--pp whose product divides --gpus-per-node, or spans whole nodes."),
    "unknown launcher": ({"gpus_per_node": 8, "launcher": "slurm"},
                         "Unknown launcher 'slurm'.", "Use one of: auto, ray, mp."),
}


@pytest.mark.parametrize("kwargs,problem,hint", ERRORS.values(), ids=ERRORS.keys())
def test_each_error_says_what_is_wrong_and_the_fix(kwargs, problem, hint):
    with pytest.raises(HpcServeError) as err:
        resolve_layout(**kwargs)
    assert (err.value.problem, err.value.hint) == (problem, hint)


@pytest.mark.parametrize("name", ["gpus_per_node", "nodes", "tp", "pp", "dp"])
@pytest.mark.parametrize("value", [0, -1, True, 2.5])
def test_sizes_must_be_whole_numbers_of_at_least_one(name, value):
    flag = name.replace("_", "-")
    with pytest.raises(HpcServeError) as err:
        resolve_layout(**{"gpus_per_node": 8, name: value})
    assert (err.value.problem, err.value.hint) == (
        f"--{flag} must be a whole number of at least 1 (got {value!r}).", f"Give a positive size, e.g. --{flag} 1.")


def test_cross_node_tp_where_tp_fits_a_node_changes_nothing_but_the_flag():
    asked = resolve_layout(gpus_per_node=8, nodes=2, tp=8, cross_node_tp=True)
    plain = resolve_layout(gpus_per_node=8, nodes=2, tp=8)
    assert asked == replace(plain, cross_node_tp=True)
    assert (asked.notes, asked.warnings) == (plain.notes, ())


# Worked examples from docs/concepts.md, readable on their own.

def test_tp8_pp2_on_two_nodes_derives_dp1():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=8, pp=2)
    assert (lay.nodes, lay.tp, lay.pp, lay.dp) == (2, 8, 2, 1)


def test_single_gpu():
    lay = resolve_layout(gpus_per_node=1)
    assert (lay.nodes, lay.tp, lay.dp, lay.launcher) == (1, 1, 1, "mp")


def test_mp_dp_whose_replicas_span_nodes_is_allowed():
    # vLLM runs it through --nnodes (config/parallel.py nnodes_within_dp): issue 12, defect 8.
    lay = resolve_layout(gpus_per_node=8, nodes=4, tp=8, pp=2, dp=2, launcher="mp")
    assert (lay.dp, lay.dp_local, lay.spans_nodes) == (2, 1, True)
    assert [lay.node_slots(r).dp_ranks for r in range(4)] == [(0,), (0,), (1,), (1,)]
    assert [lay.node_slots(r).stages for r in range(4)] == [(0,), (1,), (0,), (1,)]


def test_node_slots_for_dp_inside_nodes():
    lay = resolve_layout(gpus_per_node=8, nodes=2, tp=2, pp=1)
    assert lay.dp == 8 and lay.dp_local == 4
    assert lay.node_slots(0).dp_ranks == (0, 1, 2, 3)
    assert lay.node_slots(1).dp_ranks == (4, 5, 6, 7)


def test_node_slots_for_pp_inside_a_node():
    assert resolve_layout(gpus_per_node=8, nodes=1, tp=4, pp=2).node_slots(0).stages == (0, 1)
