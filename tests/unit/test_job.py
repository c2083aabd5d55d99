"""Job model: states, the transition table, names and priorities."""

from __future__ import annotations

import pytest

from conveyor.errors import InvalidJobError
from conveyor.job import (
    TRANSITIONS,
    JobState,
    Priority,
    Transition,
    can_transition,
    validate_queue_name,
    validate_task_name,
)


def test_every_transition_name_matches_its_value_and_is_in_the_table() -> None:
    assert set(TRANSITIONS) == set(Transition)
    for t in Transition:
        assert t.value == t.name.lower()


def test_finished_states_have_no_outgoing_transition_but_redrive() -> None:
    for transition, (sources, _targets) in TRANSITIONS.items():
        finished_sources = {s for s in sources if s is not None and s.is_finished}
        if finished_sources:
            assert transition is Transition.REDRIVE


@pytest.mark.parametrize(
    ("transition", "source", "target", "allowed"),
    [
        (Transition.RESERVE, JobState.QUEUED, JobState.RUNNING, True),
        (Transition.RESERVE, JobState.PENDING, JobState.RUNNING, False),
        (Transition.RESERVE, JobState.SCHEDULED, JobState.RUNNING, False),
        (Transition.ACK, JobState.RUNNING, JobState.COMPLETED, True),
        (Transition.ACK, JobState.QUEUED, JobState.COMPLETED, False),
        (Transition.RELEASE, JobState.RUNNING, JobState.QUEUED, True),
        (Transition.CANCEL, JobState.COMPLETED, JobState.STOPPED, False),
        (Transition.START, JobState.PENDING, JobState.QUEUED, True),
        (Transition.REDRIVE, JobState.FAILED, JobState.QUEUED, True),
    ],
)
def test_transition_table(
    transition: Transition, source: JobState, target: JobState, allowed: bool
) -> None:
    assert can_transition(transition, source, target) is allowed


def test_priority_ranks_order_high_first() -> None:
    assert sorted(Priority, key=lambda p: p.rank) == [Priority.HIGH, Priority.NORMAL, Priority.LOW]


def test_invalid_priority_message_lists_the_choices() -> None:
    with pytest.raises(InvalidJobError, match="high, normal, low"):
        Priority.parse("urgent")


@pytest.mark.parametrize("name", ["", " x", "a b", "{tag}", "x" * 129, "-lead", "q\n"])
def test_invalid_queue_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidJobError, match="invalid queue name"):
        validate_queue_name(name)


@pytest.mark.parametrize("name", ["default", "emails.high", "q-1", "Q_2"])
def test_valid_queue_names_pass(name: str) -> None:
    assert validate_queue_name(name) == name


def test_invalid_task_name_is_refused() -> None:
    with pytest.raises(InvalidJobError):
        validate_task_name("os.system; rm")
