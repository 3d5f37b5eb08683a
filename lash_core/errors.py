"""The exception hierarchy of lash_core.

Exceptions are named by what the caller should do about them, not by where they came from:

* :class:`LeaseLost` - stop the work you are doing under that lease; someone else owns it now.
* :class:`Conflict` subclasses - the request contradicts durable state; do not retry it as is.
* :class:`Superseded` - your claim was taken over by a newer generation; abandon the turn.
* :class:`RetryableStoreError` - a transient backend failure; retrying the same call is safe.
* :class:`StoreUnavailable` - the backend cannot be reached; back off and retry later.
* :class:`InvalidRequest` - the caller passed something malformed; fix the call.

Adapters (PostgreSQL, providers, the broker) translate their driver errors into these.
"""

from __future__ import annotations


class LashError(Exception):
    """Base class of every error raised by lash_core."""

    code: str = "lash_error"


class InvalidRequest(LashError):
    """The request is malformed or names something that cannot exist."""

    code = "invalid_request"


class SessionMismatch(InvalidRequest):
    """A fence, claim or commit names a different session than the operation targets."""

    code = "session_binding_mismatch"


class LeaseLost(LashError):
    """The session execution lease is not (or no longer) held by the caller.

    Raised when a fence fails validation: wrong owner/incarnation, wrong token, wrong
    generation, released, or expired by the database clock. Whatever the caller was doing
    under that lease must stop without committing.
    """

    code = "session_execution_lease_lost"

    def __init__(self, session_id: str, detail: str = "") -> None:
        self.session_id = session_id
        self.detail = detail
        super().__init__(
            f"session execution lease lost for {session_id!r}{': ' + detail if detail else ''}"
        )


class SessionBusy(LashError):
    """Another live owner holds the session execution lease."""

    code = "session_execution_busy"

    def __init__(self, session_id: str, holder_owner_id: str | None = None) -> None:
        self.session_id = session_id
        self.holder_owner_id = holder_owner_id
        super().__init__(f"session {session_id!r} is busy (held by {holder_owner_id!r})")


class Conflict(LashError):
    """The request contradicts durable state. Retrying it unchanged will fail the same way."""

    code = "conflict"


class SourceKeyConflict(Conflict):
    """The idempotency key is already bound to different content."""

    code = "source_key_conflict"

    def __init__(self, session_id: str, source_key: str, existing_id: str) -> None:
        self.session_id = session_id
        self.source_key = source_key
        self.existing_id = existing_id
        super().__init__(
            f"source key {source_key!r} of session {session_id!r} is bound to {existing_id!r} "
            "with different content"
        )


class TurnCommitConflict(Conflict):
    """A final commit for this turn id already exists with a different content hash."""

    code = "turn_commit_conflict"

    def __init__(self, session_id: str, turn_id: str) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        super().__init__(f"turn {turn_id!r} of session {session_id!r} committed different content")


class HeadRevisionConflict(Conflict):
    """The optimistic head-revision check failed: a stale writer."""

    code = "head_revision_conflict"

    def __init__(self, session_id: str, expected: int | None, actual: int) -> None:
        self.session_id = session_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"session {session_id!r} head is {actual}, expected {expected}")


class Superseded(LashError):
    """A claim no longer owns its rows: a later claim (abandon or new generation) took them."""

    code = "claim_superseded"

    def __init__(self, session_id: str, claim_id: str, what: str = "turn_input") -> None:
        self.session_id = session_id
        self.claim_id = claim_id
        self.what = what
        super().__init__(f"{what} claim {claim_id!r} of session {session_id!r} was superseded")


class SteeringPending(LashError):
    """A final commit made at a steering checkpoint (``RuntimeCommit.steering_checkpoint``)
    found steering input the turn can still accept there. Nothing was written: the turn
    claims that input and goes on, then commits again."""

    code = "steering_pending"

    def __init__(self, session_id: str, turn_id: str) -> None:
        self.session_id = session_id
        self.turn_id = turn_id
        super().__init__(f"steering input is pending for turn {turn_id!r} of {session_id!r}")


class UnsettledClaim(InvalidRequest):
    """A final commit did not settle every claim that originated the turn."""

    code = "unsettled_claim"


class StoreError(LashError):
    """A backend failure that is neither a conflict nor a lease problem."""

    code = "store_commit_failed"


class RetryableStoreError(StoreError):
    """Transient: serialization failure, deadlock, dropped connection. Safe to retry."""

    code = "store_retryable"


class StoreUnavailable(RetryableStoreError):
    """The backend cannot be reached at all right now."""

    code = "store_unavailable"


class SchemaVersionError(StoreError):
    """The database schema is newer than this code understands."""

    code = "unsupported_schema_version"


class ProviderError(LashError):
    """The model provider failed. ``retryable`` says whether the same request may succeed."""

    code = "provider_error"

    def __init__(self, message: str, *, retryable: bool = False, status: int | None = None) -> None:
        self.retryable = retryable
        self.status = status
        super().__init__(message)


class ToolError(LashError):
    """A tool raised or rejected its arguments; becomes a typed tool outcome, not a crash."""

    code = "tool_error"
