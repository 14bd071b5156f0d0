"""tandem's planner: SLO-driven autoscaling of the prefill and decode tiers.

The core is pure (:class:`planner.core.Planner`: an :class:`planner.observations.Observation` in,
a :class:`planner.decision.Decision` out) and imports neither torch nor the engine; adapters read
etcd and act through a launcher. Profiles (:mod:`planner.profile`) are written by
``deploy/profiler.py``.
"""

from planner.config import PlannerConfig
from planner.core import Planner
from planner.decision import Action, ActionKind, Decision, Reason
from planner.observations import Observation, RouterWindow, WorkerState, WorkerStep
from planner.profile import Profile

__all__ = ["Action", "ActionKind", "Decision", "Observation", "Planner", "PlannerConfig", "Profile", "Reason",
           "RouterWindow", "WorkerState", "WorkerStep"]
