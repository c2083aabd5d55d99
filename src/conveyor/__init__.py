"""conveyor: an asyncio-native job queue, embedded on SQLite by default and scaling out on Redis."""

from conveyor.brokers import open_broker
from conveyor.brokers.base import Broker, JobEvent
from conveyor.client import Conveyor, JobHandle, JobRequest
from conveyor.context import JobContext
from conveyor.errors import (
    BrokerUnavailable,
    ConfigurationError,
    ConveyorError,
    InvalidJobError,
    JobFailed,
    JobNotFound,
    JobTimeout,
    LeaseLost,
    PayloadError,
)
from conveyor.job import FailureReason, Job, JobState, Priority
from conveyor.retry import Retry, RetryPolicy
from conveyor.task import Task

__version__ = "0.1.0"

__all__ = [
    "Broker",
    "BrokerUnavailable",
    "ConfigurationError",
    "Conveyor",
    "ConveyorError",
    "FailureReason",
    "InvalidJobError",
    "Job",
    "JobContext",
    "JobEvent",
    "JobFailed",
    "JobHandle",
    "JobNotFound",
    "JobRequest",
    "JobState",
    "JobTimeout",
    "LeaseLost",
    "PayloadError",
    "Priority",
    "Retry",
    "RetryPolicy",
    "Task",
    "__version__",
    "open_broker",
]
