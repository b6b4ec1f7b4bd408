"""What every round of one run shares, and what one round is asked to do.

``RoundContext`` holds the run-wide parts (the grid, the run's configuration, the strategy, the
privacy plan, the run id) that the plain, DP and SecAgg+ round code all need; ``RoundPlan`` holds
one round's inputs (its number, the global weights it starts from, the sampled sites and how to
reach them). Round functions take these two instead of a dozen loose parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from flwr.app import ArrayRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedgov.config import RunConfig
from server.privacy_round import PrivacyRound


@dataclass
class RoundContext:
    """The run-wide parts every round uses."""

    grid: Grid
    cfg: RunConfig
    strategy: Strategy
    privacy: PrivacyRound | None = None
    run_id: str = ""

    @property
    def timeout(self) -> float:
        """Seconds a round waits for replies (``federation.round_timeout``)."""
        return self.cfg.federation.round_timeout


@dataclass
class RoundPlan:
    """One round's inputs: its number, the weights it starts from and the sampled sites."""

    server_round: int
    arrays: ArrayRecord
    view: Grid  # the grid narrowed to the sampled sites' nodes
    node_of: Mapping[str, int]  # site id → Flower node id, of every connected site
    chosen: list[str] = field(default_factory=list)  # the sampled site ids
