"""Durable state behind one interface: in-memory and PostgreSQL implementations."""

from lash_core.store.base import (
    AdmissionStatus,
    CommandAdmission,
    EventPage,
    InputAdmission,
    Notification,
    Residency,
    SessionState,
    SessionView,
    Store,
    TenureStart,
    TurnStart,
    VacuumReport,
)

__all__ = [
    "AdmissionStatus",
    "CommandAdmission",
    "EventPage",
    "InputAdmission",
    "Notification",
    "Residency",
    "SessionState",
    "SessionView",
    "Store",
    "TenureStart",
    "TurnStart",
    "VacuumReport",
]
