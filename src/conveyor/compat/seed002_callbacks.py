"""Seed 002's callbacks: a callback task that calls the user's function with the seed's dict.

Conveyor's worker calls a job's ``on_success`` / ``on_failure`` task with its outcome payload
(``job_id``, ``task``, ``queue``, ``state``, ``result``, ``error``, ``attempts``, ``args``,
``kwargs``) once the outcome is stored. The adapter registered here turns that into the dict the
seed's callbacks read (``data["result"]``, ``data["entity"]`` ...) and calls the user's function,
on the loop for ``async def`` and in a thread for a plain function (the worker decides by the
adapter's kind, which follows the user's function).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from conveyor.task import is_coroutine_callable

#: Attribute of an adapter naming the user's callback (not ``__wrapped__``: conveyor reads a
#: task's signature through ``__wrapped__``, and the adapter's own signature is what it takes).
ORIGINAL_ATTR = "__seed002_callback__"


def seed_data(payload: Mapping[str, Any]) -> dict[str, Any]:
    """The seed's callback dict from conveyor's outcome payload.

    Keys: ``operation_id``, ``entity`` (the processor's argument), ``result`` (None after a
    failure), ``status`` (``completed`` or ``failed``), ``error`` (``"Type: message"`` or None),
    ``queue``, ``processor`` (its task name) and ``attempts`` (runs made).
    """
    args = payload.get("args") or []
    return {
        "operation_id": payload.get("job_id"),
        "entity": args[0] if args else None,
        "result": payload.get("result"),
        "status": payload.get("state"),
        "error": payload.get("error"),
        "queue": payload.get("queue"),
        "processor": payload.get("task"),
        "attempts": payload.get("attempts"),
    }


def callback_task_function(callback: Callable[..., Any]) -> Callable[[Mapping[str, Any]], Any]:
    """The function registered as the callback task: builds the seed's dict, calls ``callback``."""
    if is_coroutine_callable(callback):
        async_callback = cast(Callable[[dict[str, Any]], Awaitable[Any]], callback)

        async def async_adapter(payload: Mapping[str, Any]) -> None:
            await async_callback(seed_data(payload))

        adapter: Callable[[Mapping[str, Any]], Any] = async_adapter
    else:

        def sync_adapter(payload: Mapping[str, Any]) -> None:
            callback(seed_data(payload))

        adapter = sync_adapter
    setattr(adapter, ORIGINAL_ATTR, callback)
    adapter.__doc__ = getattr(callback, "__doc__", None)
    return adapter
