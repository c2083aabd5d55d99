"""The sqlite:// URL and the broker's settings: parsed without I/O, bad input refused clearly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conveyor.brokers import open_broker
from conveyor.brokers.sqlite import SQLiteBroker
from conveyor.brokers.sqlite.options import parse_url
from conveyor.clock import FakeClock
from conveyor.errors import ConfigurationError


def test_relative_and_absolute_paths() -> None:
    assert parse_url("sqlite:///rel/dir/x.db")["path"] == "rel/dir/x.db"
    assert parse_url("sqlite:////abs/x.db")["path"] == "/abs/x.db"
    assert parse_url("sqlite:///with%20space.db")["path"] == "with space.db"


def test_relative_path_is_resolved_against_the_working_directory_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    broker = open_broker("sqlite:///jobs.db")
    assert isinstance(broker, SQLiteBroker)
    assert broker.path == str(tmp_path / "jobs.db")


def test_query_parameters_become_settings() -> None:
    broker = SQLiteBroker.from_url(
        "sqlite:////tmp/x.db?synchronous=FULL&busy_timeout_ms=250&poll_interval_ms=20&mode=ro"
    )
    opts = broker.options
    assert (opts.synchronous, opts.busy_timeout_ms, opts.poll_interval_ms, opts.read_only) == (
        "full",
        250,
        20,
        True,
    )


def test_defaults() -> None:
    opts = SQLiteBroker.from_url("sqlite:////tmp/x.db").options
    assert (opts.synchronous, opts.busy_timeout_ms, opts.poll_interval_ms, opts.read_only) == (
        "normal",
        5000,
        50,
        False,
    )


def test_keyword_options_pass_through_and_must_agree_with_the_url() -> None:
    clock = FakeClock()
    broker = open_broker(
        "sqlite:////tmp/x.db?busy_timeout_ms=100", clock=clock, busy_timeout_ms=100
    )
    assert broker.clock is clock
    with pytest.raises(ConfigurationError, match="give it once"):
        open_broker("sqlite:////tmp/x.db?busy_timeout_ms=100", busy_timeout_ms=200)
    with pytest.raises(ConfigurationError, match="unknown SQLite broker option"):
        open_broker("sqlite:////tmp/x.db", timeout=3)


@pytest.mark.parametrize(
    ("url", "hint"),
    [
        ("sqlite://", "no file name"),
        ("sqlite:///", "no file name"),
        ("sqlite:///dir/", "no file name"),
        ("sqlite://host/x.db", "no host"),
        ("sqlite:///x.db#frag", "unexpected '#'"),
        ("sqlite:///x.db?synchronous=off", "use 'normal'"),
        ("sqlite:///x.db?busy_timeout_ms=soon", "whole number of milliseconds"),
        ("sqlite:///x.db?busy_timeout_ms=-1", ">= 0"),
        ("sqlite:///x.db?poll_interval_ms=0", ">= 1"),
        ("sqlite:///x.db?mode=rwc", "use rw or ro"),
        ("sqlite:///x.db?journal=wal", "unknown SQLite URL parameter"),
        ("sqlite:///x.db?synchronous", "malformed SQLite URL"),
        ("sqlite:///x.db?mode=ro&mode=ro", "given twice"),
        ("sqlite:///:memory:", "memory://"),
    ],
)
def test_malformed_urls_are_refused_with_a_hint_and_write_nothing(
    url: str, hint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigurationError, match=hint) as info:
        open_broker(url)
    assert "sqlite:///" in str(info.value) or hint in str(info.value)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("option", "value"),
    [("max_log_lines", 0), ("event_retention", 0), ("busy_timeout_ms", 1.5), ("read_only", 1)],
)
def test_bad_keyword_options_are_refused(option: str, value: object) -> None:
    with pytest.raises(ConfigurationError, match=option):
        SQLiteBroker("/tmp/x.db", **{option: value})  # type: ignore[arg-type]
