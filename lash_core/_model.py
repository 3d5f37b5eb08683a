"""Shared pydantic base classes for the domain types."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Frozen(BaseModel):
    """An immutable value object. Unknown fields are ignored (forward compatible)."""

    model_config = ConfigDict(frozen=True, extra="ignore")
