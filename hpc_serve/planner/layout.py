"""Layout rules: how TP, PP and DP map onto nodes and GPUs. Pure and exhaustively tested.

The rules (see docs/concepts.md):
- TP lives inside a node: ``tp <= gpus_per_node`` and ``gpus_per_node % tp == 0``
  (TP across nodes only with ``cross_node_tp``, which warns).
- Every allocated GPU is used: ``tp * pp * dp == nodes * gpus_per_node``.
- A DP replica holds ``tp * pp`` GPUs and either packs whole into a node or spans whole nodes
  (with ``mp``, vLLM runs replicas that span nodes through ``--nnodes``: ``nnodes_within_dp``).
- EP reuses the GPUs of DP x TP: ``ep = dp * tp`` (vLLM computes it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import HpcServeError

LAUNCHERS = ("auto", "ray", "mp")


@dataclass(frozen=True)
class NodeSlots:
    """What one node holds: its local GPUs, the PP stages and DP ranks those GPUs serve."""

    rank: int
    gpus: tuple[int, ...]
    stages: tuple[int, ...]
    dp_ranks: tuple[int, ...]


@dataclass(frozen=True)
class Layout:
    """A validated layout. ``notes`` says which values were derived and how."""

    nodes: int
    gpus_per_node: int
    tp: int
    pp: int
    dp: int
    ep: bool
    launcher: str
    cross_node_tp: bool = False
    notes: tuple[str, ...] = field(default=(), compare=False)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def replica_gpus(self) -> int:
        """GPUs one DP replica (one full copy of the model) spans."""
        return self.tp * self.pp

    @property
    def ep_size(self) -> int | None:
        """Expert-parallel size vLLM will use, or None without EP."""
        return self.dp * self.tp if self.ep else None

    @property
    def spans_nodes(self) -> bool:
        """Whether one DP replica spans several nodes."""
        return self.replica_gpus > self.gpus_per_node

    @property
    def dp_local(self) -> int:
        """DP ranks per node (1 when a replica spans several nodes)."""
        return max(1, self.gpus_per_node // self.replica_gpus)

    def node_slots(self, rank: int) -> NodeSlots:
        """The GPUs, PP stages and DP ranks of node ``rank``."""
        g, tp = self.gpus_per_node, self.tp
        start, end, replica = rank * g, (rank + 1) * g, tp * self.pp
        # A TP group never straddles a node boundary (or fills whole nodes), so one GPU per group will do.
        stages = sorted({(index % replica) // tp for index in range(start, end, tp)})
        dp_ranks = range(start // replica, (end - 1) // replica + 1)
        return NodeSlots(rank, tuple(range(g)), tuple(stages), tuple(dp_ranks))


def _check_size(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise HpcServeError(
            f"--{name.replace('_', '-')} must be a whole number of at least 1 (got {value!r}).",
            f"Give a positive size, e.g. --{name.replace('_', '-')} 1.",
        )


def _derive(what: str, numerator: int, denominator: int, hint: str) -> int:
    if numerator % denominator:
        raise HpcServeError(
            f"Cannot derive {what}: {numerator} GPUs do not split into groups of {denominator}.",
            hint,
        )
    return numerator // denominator


def resolve_layout(
    *,
    gpus_per_node: int,
    nodes: int | None = None,
    tp: int | None = None,
    pp: int | None = None,
    dp: int | None = None,
    ep: bool = False,
    launcher: str = "auto",
    cross_node_tp: bool = False,
) -> Layout:
    """Fill in what is missing and check every layout rule; raise HpcServeError naming the fix.

    Defaults: ``tp`` fills a node, ``pp`` is 1; of ``nodes`` and ``dp`` a missing one is derived
    (``dp = 1`` when both are missing). ``launcher='auto'`` is Ray across nodes, mp on one node.
    """
    for name, value in (("gpus_per_node", gpus_per_node), ("nodes", nodes), ("tp", tp),
                        ("pp", pp), ("dp", dp)):
        _check_size(name, value)
    if launcher not in LAUNCHERS:
        raise HpcServeError(
            f"Unknown launcher {launcher!r}.", f"Use one of: {', '.join(LAUNCHERS)}."
        )
    g = gpus_per_node
    notes: list[str] = []
    if tp is None:
        tp = g
        notes.append(f"tp={tp}: fills a node (gpus_per_node={g})")
    warnings: list[str] = []
    if tp > g:
        if not cross_node_tp:
            raise HpcServeError(
                f"--tp {tp} is larger than the {g} GPUs of a node: TP belongs inside a node.",
                f"Use --tp {g} with --pp {max(1, tp * (pp or 1) // g)} across nodes, or --cross-node-tp "
                "if you really want TP over the network.",
            )
        if tp % g:
            raise HpcServeError(
                f"--tp {tp} across nodes must be a multiple of --gpus-per-node {g}.",
                f"Use --tp {tp - tp % g or g}.",
            )
        warnings.append(
            f"TP={tp} spans {tp // g} nodes: every layer talks over the network, expect it slow."
        )
    elif g % tp:
        raise HpcServeError(
            f"--gpus-per-node {g} is not divisible by --tp {tp}: some GPUs of each node would idle.",
            f"Use a --tp that divides {g} (e.g. {max(d for d in range(1, g + 1) if g % d == 0 and d <= tp)}).",
        )

    if pp is None:
        pp = 1
    if nodes is None and dp is None:
        dp = 1
    if nodes is None:
        assert dp is not None
        nodes = _derive(
            "--nodes", tp * pp * dp, g,
            f"tp*pp*dp = {tp * pp * dp} is not a multiple of {g} GPUs per node: "
            "change --tp/--pp/--dp or --gpus-per-node.",
        )
        notes.append(f"nodes={nodes}: tp*pp*dp / gpus_per_node = {tp * pp * dp}/{g}")
    if dp is None:
        dp = _derive(
            "--dp", nodes * g, tp * pp,
            f"{nodes} nodes x {g} GPUs = {nodes * g} is not a multiple of tp*pp = {tp * pp}: "
            "change --nodes, --tp or --pp.",
        )
        notes.append(f"dp={dp}: nodes*gpus_per_node / (tp*pp) = {nodes * g}/{tp * pp}")

    total, used = nodes * g, tp * pp * dp
    if used != total:
        if used < total:
            fix = (f"use --dp {total // (tp * pp)}" if total % (tp * pp) == 0 else
                   f"use --nodes {max(1, used // g)}" if used % g == 0 else "change --tp/--pp/--dp")
            raise HpcServeError(
                f"tp*pp*dp = {tp}*{pp}*{dp} = {used} GPUs, but {nodes} nodes x {g} GPUs = {total}: "
                f"{total - used} paid GPUs would idle.",
                f"To use them all, {fix}; or ask for fewer nodes or --gpus-per-node.",
            )
        raise HpcServeError(
            f"tp*pp*dp = {tp}*{pp}*{dp} = {used} GPUs, but {nodes} nodes x {g} GPUs = {total}.",
            f"Use --nodes {-(-used // g)}" + (" " if used % g == 0 else " and adjust --gpus-per-node ")
            + "or lower --tp/--pp/--dp.",
        )

    replica = tp * pp
    if replica < g and g % replica:
        raise HpcServeError(
            f"A replica of tp*pp = {replica} GPUs does not pack into a {g}-GPU node.",
            "Choose --tp/--pp whose product divides --gpus-per-node, or spans whole nodes.",
        )
    if replica > g and replica % g:
        raise HpcServeError(
            f"A replica of tp*pp = {replica} GPUs would straddle nodes ({g} GPUs each).",
            "Choose --tp/--pp whose product is a multiple of --gpus-per-node.",
        )

    if launcher == "auto":
        launcher = "ray" if nodes > 1 else "mp"
        notes.append(f"launcher={launcher}: " + ("Ray across nodes" if nodes > 1 else
                                                   "one node needs no Ray"))
    if ep and pp > 1:
        # vLLM's own validation (0.32) accepts EP with PP; its serving guide advises against it.
        warnings.append("EP with PP > 1 is accepted by vLLM but not recommended by its serving "
                        "guide: prefer --tp and --dp (EP size = dp*tp).")
    return Layout(nodes, g, tp, pp, dp, ep, launcher, cross_node_tp, tuple(notes), tuple(warnings))
