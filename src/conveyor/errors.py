"""The conveyor error tree: every error a caller can see, each with a message that says what to do.

::

    ConveyorError
    ├── ConfigurationError            bad URL, option or argument given to conveyor itself
    │   ├── UnknownSchemeError        broker URL scheme is not memory://, sqlite:// or redis(s)://
    │   └── MissingDependencyError    an optional extra is not installed
    ├── PayloadError                  a job payload or result cannot be stored
    │   ├── UnencodablePayloadError   a value has no JSON (or msgpack) form
    │   └── PayloadTooLargeError      the encoded payload is over the size cap
    ├── InvalidJobError               bad queue name, priority, task name or option on a job
    ├── BrokerError                   the broker refused or could not do a transition
    │   ├── BrokerUnavailable         the broker cannot be reached (retry later)
    │   ├── BrokerReadOnly            the store is read-only or locked
    │   ├── JobNotFound               no job has that id
    │   ├── LeaseLost                 the presented lease token is stale (the job moved on)
    │   ├── InvalidTransition         the job is not in a state that allows this transition
    │   └── QueueLimitReached         the queue is at its configured size limit
    ├── TaskError                     task registry problems
    │   └── UnknownTask               no task is registered under that name
    ├── JobFailed                     awaiting a job's result: it ended failed or stopped
    └── JobTimeout                    awaiting a job's result: it did not finish in time

Each class's docstring is its default message. Brokers map their native failures (``redis.*``,
``sqlite3.*``) and script/query return codes (:class:`ErrorCode`) to these classes through
:func:`error_for_code`, so callers never see a driver exception.
"""

from __future__ import annotations

import enum
from typing import ClassVar


class ConveyorError(Exception):
    """Base class of every conveyor error."""

    default_message: ClassVar[str] = ""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__class__.__doc__ or self.__class__.__name__).strip())

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""


class ConfigurationError(ConveyorError):
    """conveyor was given an invalid setting; fix the argument named in this message."""


class UnknownSchemeError(ConfigurationError):
    """Unknown broker URL scheme; use memory://, sqlite:///PATH, redis://HOST:PORT/DB or rediss://."""


class MissingDependencyError(ConfigurationError):
    """An optional dependency is missing; install the extra named in this message."""


class PayloadError(ConveyorError):
    """The job payload cannot be stored; pass JSON-compatible values."""


class UnencodablePayloadError(PayloadError):
    """A value in the payload has no JSON form; pass str, int, float, bool, None, list or dict."""


class PayloadTooLargeError(PayloadError):
    """The encoded payload is over the size cap; store large data elsewhere and pass a reference."""


class InvalidJobError(ConveyorError):
    """The job has an invalid field; fix the field named in this message."""


class BrokerError(ConveyorError):
    """The broker could not perform the transition."""


class BrokerUnavailable(BrokerError):
    """The broker cannot be reached; check that it is running and reachable, then retry."""


class BrokerReadOnly(BrokerError):
    """The broker's store is read-only or locked; check file permissions and other writers."""


class JobNotFound(BrokerError):
    """No job has this id; it may have been deleted or cleaned up after its retention period."""


class LeaseLost(BrokerError):
    """The lease token is stale: the job's lease expired or the job moved on; do not retry this."""


class InvalidTransition(BrokerError):
    """The job's current state does not allow this transition; read the job's state first."""


class QueueLimitReached(BrokerError):
    """The queue is at its size limit; wait for jobs to finish, delete some, or raise the limit."""


class TaskError(ConveyorError):
    """A task could not be registered or resolved."""


class UnknownTask(TaskError):
    """No task is registered under this name; register it with @app.task or load its module."""


class JobFailed(ConveyorError):
    """The job ended without a result (failed or stopped); read its error and traceback."""


class JobTimeout(ConveyorError):
    """The job did not finish within the wait; it may still be running."""


class ErrorCode(enum.IntEnum):
    """Small negative codes returned by Lua scripts and SQL transitions, one table for all brokers.

    The JSON-RPC application error codes are derived from the same table (see :func:`rpc_code`).
    """

    JOB_NOT_FOUND = -1
    LEASE_LOST = -2
    INVALID_TRANSITION = -3
    QUEUE_FULL = -4
    INVALID_JOB = -5


_CODE_TO_ERROR: dict[ErrorCode, type[ConveyorError]] = {
    ErrorCode.JOB_NOT_FOUND: JobNotFound,
    ErrorCode.LEASE_LOST: LeaseLost,
    ErrorCode.INVALID_TRANSITION: InvalidTransition,
    ErrorCode.QUEUE_FULL: QueueLimitReached,
    ErrorCode.INVALID_JOB: InvalidJobError,
}


def error_for_code(code: int, *, action: str, job_id: str | None = None) -> ConveyorError:
    """Map a script/query return code to the exception to raise, naming the transition and job."""
    cls = _CODE_TO_ERROR.get(ErrorCode(code), BrokerError)
    base = (cls.__doc__ or "").strip()
    where = f"{action}({job_id})" if job_id else action
    return cls(f"{where}: {base}")


#: How each error surfaces at the service boundary: class -> (JSON-RPC application code, HTTP
#: status). The one table for both faces of the API; the nearest listed class in an exception's
#: MRO wins. The codes of the script/query errors are derived from :class:`ErrorCode`
#: (-32000 + code), so a Lua script, a SQL transition and a JSON-RPC reply agree.
API_ERRORS: dict[type[ConveyorError], tuple[int, int]] = {
    JobNotFound: (-32000 + ErrorCode.JOB_NOT_FOUND, 404),
    LeaseLost: (-32000 + ErrorCode.LEASE_LOST, 409),
    InvalidTransition: (-32000 + ErrorCode.INVALID_TRANSITION, 409),
    QueueLimitReached: (-32000 + ErrorCode.QUEUE_FULL, 429),
    InvalidJobError: (-32000 + ErrorCode.INVALID_JOB, 422),
    BrokerUnavailable: (-32010, 503),
    BrokerReadOnly: (-32000, 503),
    BrokerError: (-32000, 503),
    PayloadTooLargeError: (-32011, 413),
    PayloadError: (-32011, 422),
    ConfigurationError: (-32012, 422),
    TaskError: (-32012, 422),
    JobTimeout: (-32000, 504),
    JobFailed: (-32000, 409),
    ConveyorError: (-32000, 500),
}


def _api_error(exc: BaseException) -> tuple[int, int]:
    for cls in type(exc).__mro__:
        found = API_ERRORS.get(cls)
        if found is not None:
            return found
    return API_ERRORS[ConveyorError]


def rpc_code(exc: BaseException) -> int:
    """The JSON-RPC application error code for an exception (from :data:`API_ERRORS`)."""
    return _api_error(exc)[0]


def http_status(exc: BaseException) -> int:
    """The HTTP status for an exception (from :data:`API_ERRORS`); 500 for non-conveyor errors."""
    return _api_error(exc)[1]
