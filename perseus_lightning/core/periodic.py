"""The periodic LP of long synchronous-1F1B pipelines: the relaxation folded to one period.

In 1F1B's steady state every rank repeats one forward-backward pair per microbatch. The periodic
LP restricts the steady state, except ``margin`` pairs at each end, to be periodic: every such
pair of a rank takes the same durations and starts one period ``P`` after the previous one. The
DAG then folds into one representative pair per rank plus the warm-up, the cool-down and the
margins: about ``S * (S + 2 * margin)`` instructions whatever the number of microbatches, with
``P`` as one more variable. Each edge ``u -> v`` of the full DAG, between instances ``k_u`` and
``k_v`` of their representatives, becomes ``s_u + d_u + (k_u - k_v) * P <= s_v`` (head and tail
instructions are instance 0); only the tightest row per pair of representatives is kept.

Periodic plans are a subset of all plans, so the LP's optimum is an estimate from above of the
full relaxation's, not a lower bound. The planner uses its durations exactly as it uses the full
relaxation's: it rounds them, reclaims slack and simulates the plan on the full DAG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from perseus_lightning.core.dag import InstructionDAG
from perseus_lightning.core.options import ClockOptions
from perseus_lightning.core.relaxation import SegmentLP
from perseus_lightning.core.slack import DEADLINE_TOLERANCE

MARGIN = 2
"""The fewest steady-state pairs at each end of a rank's steady state that keep their own durations."""
MARGIN_PER_STAGE = 0.5
"""Margin per pipeline stage that :meth:`PeriodicRelaxation.fitting` starts from. The full LP's
optimum settles into its period only about as many pairs into the steady state as there are stages:
at 16 x 128 and 32 x 256 (synthetic A100-like profiles, smooth and noisy) and 8 x 512 (measured A40),
margins of half the stages put the folded LP within 0.03 % of the full LP's optimum (0.000 % at as
many as the stages), where a margin of 2 was up to 0.56 % above it at 16 x 128."""


@dataclass(frozen=True)
class SteadyStateFolding:
    """How the full DAG's nodes map onto the folded one."""

    representative: np.ndarray
    """Per full node, its folded node (0-based, in ascending full-node order of representatives)."""
    instance: np.ndarray
    """Per full node, the period it repeats its representative in (0 outside the folded steady state)."""
    nodes: np.ndarray
    """Full node id of each folded node."""

    @classmethod
    def of(cls, dag: InstructionDAG, margin: int = MARGIN) -> SteadyStateFolding | None:
        """The folding of a synchronous-1F1B ``dag``; ``None`` for other schedules or when no rank
        has a steady state longer than its two margins."""
        schedule = dag.schedule
        if schedule.name != "1f1b" or schedule.num_stages != dag.num_ranks:
            return None
        representative = np.arange(dag.num_nodes)
        instance = np.zeros(dag.num_nodes, dtype=np.int64)
        for rank in range(dag.num_ranks):
            nodes = np.asarray(dag.rank_nodes(rank))
            warmup = min(dag.num_ranks - rank - 1, schedule.num_microbatches)
            folded = np.arange(margin, schedule.num_microbatches - warmup - margin)  # steady pairs that repeat
            if len(folded) < 2:
                continue
            for offset in (0, 1):  # the pair's forward, then its backward
                members = nodes[warmup + 2 * folded + offset]
                representative[members] = members[0]
                instance[members] = folded - folded[0]
        if not instance.any():
            return None
        kept = np.unique(representative)
        local = np.full(dag.num_nodes, -1)
        local[kept] = np.arange(len(kept))
        return cls(local[representative], instance, kept)


class PeriodicRelaxation(SegmentLP):
    """The periodic LP of one 1F1B DAG, re-solvable at any deadline, like
    :class:`~perseus_lightning.core.relaxation.HullRelaxation` but with no lower bound."""

    bounds = False

    def __init__(self, dag: InstructionDAG, folding: SteadyStateFolding, options: list[ClockOptions], p2p_power: float) -> None:
        self._folding = folding
        m = len(folding.nodes)
        sources, targets, edge_lags = _tightest(
            folding.representative[dag.edge_sources], folding.representative[dag.edge_targets],
            folding.instance[dag.edge_sources] - folding.instance[dag.edge_targets], m,
        )
        sinks, sink_lags = _tightest(folding.representative[dag.sinks], None, folding.instance[dag.sinks], m)
        self._load(
            [options[node].lower_hull() for node in folding.nodes.tolist()], np.bincount(folding.representative, minlength=m),
            sources, targets, sinks, p2p_power * dag.num_ranks, np.concatenate([edge_lags, sink_lags]),
        )

    @classmethod
    def fitting(
        cls, dag: InstructionDAG, options: list[ClockOptions], p2p_power: float, t_min: float
    ) -> PeriodicRelaxation | None:
        """The periodic LP with the smallest margin (``MARGIN_PER_STAGE`` times the stages, at least
        ``MARGIN``, doubled as needed) that admits a plan finishing by ``t_min``: the steady state of
        the all-max-clock schedule must have settled into its period within the margin. ``None``
        when no folding of ``dag`` does."""
        margin = max(MARGIN, int(MARGIN_PER_STAGE * dag.num_ranks))
        while (folding := SteadyStateFolding.of(dag, margin)) is not None:
            relaxation = cls(dag, folding, options, p2p_power)
            if relaxation.admits(t_min * (1 + DEADLINE_TOLERANCE)):
                return relaxation
            margin *= 2
        return None

    def _unfold(self, durations: np.ndarray) -> np.ndarray:
        return durations[self._folding.representative]


def _tightest(
    sources: np.ndarray, targets: np.ndarray | None, lags: np.ndarray, m: int
) -> tuple[np.ndarray, ...]:
    """The rows with the largest lag per (source, target) pair (per source when ``targets`` is None):
    with ``P >= 0`` they imply all others."""
    key = sources * m + (targets if targets is not None else 0)
    order = np.lexsort((-lags, key))
    first = order[np.concatenate([[True], np.diff(key[order]) != 0])]
    if targets is None:
        return sources[first], lags[first]
    return sources[first], targets[first], lags[first]
