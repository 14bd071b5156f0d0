"""What the planner core decides at one tick: data, not effects. An adapter carries it out
(the launcher starts, drains or switches workers) and publishes it (etcd, Prometheus).

A :class:`Decision` always says why, as :class:`Reason` codes with the numbers behind them, so
a dashboard or a test reads the same facts the core acted on.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class ActionKind(enum.Enum):
    START = "start"  # start a new worker in ``role`` (the launcher names it)
    DRAIN = "drain"  # stop routing to ``worker_id``; it finishes its in-flight requests, then exits
    SWITCH = "switch"  # ``worker_id`` drains its role and re-registers in ``role``, same process and weights
    ABANDON = "abandon"  # give up a start that never became ready (no GPU came free); free its slot


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    role: str  # START: the tier to start in; SWITCH: the tier it goes to; DRAIN/ABANDON: its tier
    worker_id: str = ""  # empty for START


@dataclass(frozen=True)
class Reason:
    """Why: a stable ``code`` (tests and dashboards match on it), the tier it is about ("" for
    both), and the figures (seconds, tokens, replicas) it was decided from."""

    code: str
    role: str = ""
    values: dict[str, float] = field(default_factory=dict)

    def __str__(self) -> str:
        figures = ", ".join(f"{k}={v:.4g}" for k, v in self.values.items())
        return f"{self.code}[{self.role or 'all'}]" + (f"({figures})" if figures else "")


@dataclass(frozen=True)
class Decision:
    """The tick's outcome. ``num_prefill``/``num_decode``: the replicas each tier should serve
    with once the ``actions`` are done (equal to today's count where nothing changes)."""

    now_s: float
    mode: str
    num_prefill: int
    num_decode: int
    actions: tuple[Action, ...] = ()
    reasons: tuple[Reason, ...] = ()

    @property
    def changes(self) -> bool:
        return any(a.kind is not ActionKind.ABANDON for a in self.actions)

    def replicas(self, role: str) -> int:
        return self.num_prefill if role == "prefill" else self.num_decode

    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]
