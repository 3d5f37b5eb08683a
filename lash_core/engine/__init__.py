"""The turn engine: the turn loop, the lease guard and the session driver."""

from lash_core.engine.agent import AgentConfig, ToolBox, ToolOutcome
from lash_core.engine.driver import ActivitySink, SessionDriver
from lash_core.engine.reports import DrainReport, TurnReport

__all__ = [
    "ActivitySink",
    "AgentConfig",
    "DrainReport",
    "SessionDriver",
    "ToolBox",
    "ToolOutcome",
    "TurnReport",
]
