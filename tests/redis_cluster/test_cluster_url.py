"""The ``?cluster=true`` broker URL option (parsing only: no server needed)."""

from __future__ import annotations

import pytest

from conveyor.brokers import open_broker
from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis.connection import parse_url
from conveyor.errors import ConfigurationError


def test_the_cluster_option_is_read_and_kept_out_of_the_client_url() -> None:
    address = parse_url("redis://user:secret@node-1:7000/0?ssl_cert_reqs=none&cluster=true")
    assert address.cluster is True
    assert address.url == "redis://user:secret@node-1:7000/0?ssl_cert_reqs=none"
    assert address.redacted == "redis://user:***@node-1:7000/0?cluster=true"


@pytest.mark.parametrize("value", ["false", "no", "0", "off"])
def test_cluster_false_is_a_single_server(value: str) -> None:
    address = parse_url(f"redis://node-1:7000/0?cluster={value}")
    assert address.cluster is False
    assert address.url == "redis://node-1:7000/0"


def test_a_broker_on_a_cluster_url_goes_queue_by_queue_from_the_start() -> None:
    broker = open_broker("rediss://node-1:7000?cluster=yes")
    assert isinstance(broker, RedisBroker)
    assert broker.address.cluster
    assert broker.address.tls
    assert broker.multi_queue_commands is False
    assert "cluster=true" in repr(broker)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("redis://node-1:7000/1?cluster=true", "only database 0"),
        ("redis://node-1:7000/0?cluster=maybe", "cluster=true or cluster=false"),
    ],
)
def test_a_bad_cluster_url_names_the_problem(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        parse_url(url)
