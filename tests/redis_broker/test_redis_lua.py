"""The Lua layer: file layout, headers, no KEYS/SCAN, and every return code exercised directly."""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import pytest

from conveyor.brokers.redis import RedisBroker
from conveyor.brokers.redis.records import as_str, pack
from conveyor.brokers.redis.scripts import SCRIPT_NAMES, load_sources
from conveyor.clock import FakeClock
from conveyor.errors import ErrorCode
from conveyor.job import Job, JobState, Lease, new_job_id

pytestmark = pytest.mark.redis

LUA = resources.files("conveyor.brokers.redis").joinpath("lua")


def script_files() -> set[str]:
    return {p.name[:-4] for p in LUA.iterdir() if p.name.endswith(".lua")}


def test_every_script_has_a_file_named_after_its_transition_and_no_file_is_unused() -> None:
    assert script_files() == set(SCRIPT_NAMES)


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_script_header_documents_keys_argv_events_and_output(name: str) -> None:
    source = LUA.joinpath(f"{name}.lua").read_text()
    header = source.split("]]", 1)[0]
    assert source.startswith("--[[")
    assert header.lstrip("-[ \n").startswith(f"{name}:"), "the header starts with the name"
    for section in ("Input:", "KEYS[", "ARGV[", "Events:", "Output:"):
        assert section in header, f"{name}.lua header lacks {section}"


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_no_script_lists_or_scans_keys_or_builds_key_names(name: str) -> None:
    source = load_sources()[name]  # includes resolved
    code = re.sub(r"--\[\[.*?\]\]|--[^\n]*", "", source, flags=re.DOTALL)  # drop comments
    calls = re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'", code)
    assert calls, "a script that calls nothing?"
    forbidden = {"KEYS", "SCAN", "HSCAN", "SSCAN", "ZSCAN", "RANDOMKEY"}
    assert not forbidden & {c.upper() for c in calls}
    # Every key comes through KEYS: no script spells a key name or a hash tag itself.
    literals = re.findall(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"", code)
    assert literals
    assert not [s for s in literals if "{" in s or "conveyor" in s]


#: What a script may pass as the key of a command: a KEYS entry or a name bound to one.
DECLARED = re.compile(r"^(KEYS\[[^\]]+\]|K_[A-Z]+|K_STATE(\.[a-z]+|\[[^\]]+\])|log_key|key)$")
KEYLESS = {"TIME"}


@pytest.mark.parametrize("name", SCRIPT_NAMES)
def test_every_command_of_a_script_names_a_declared_key(name: str) -> None:
    code = re.sub(r"--\[\[.*?\]\]|--[^\n]*", "", load_sources()[name], flags=re.DOTALL)
    for command, key in re.findall(r"redis\.p?call\(\s*'([A-Za-z]+)'\s*,?\s*([^,)]*)", code):
        if command.upper() in KEYLESS:
            continue
        if command == "cmd" or key == "key":  # call_many(cmd, key, ...): checked at its callers
            continue
        assert DECLARED.match(key.strip()), f"{name}: {command} on {key!r}"
    for key in re.findall(r"call_many\(\s*'[A-Z]+'\s*,\s*([^,)]*)", code):
        assert DECLARED.match(key.strip()), f"{name}: call_many on {key!r}"


def test_lua_error_codes_match_the_error_code_enum() -> None:
    prelude = LUA.joinpath("includes", "queue.lua").read_text()
    names, values = re.search(r"local (JOB_NOT_FOUND[^=]*)=([^\n]*)", prelude).groups()  # type: ignore[union-attr]
    table = dict(
        zip(
            [n.strip() for n in names.split(",")],
            [int(v) for v in values.split(",")],
            strict=True,
        )
    )
    assert table == {
        "JOB_NOT_FOUND": ErrorCode.JOB_NOT_FOUND,
        "LEASE_LOST": ErrorCode.LEASE_LOST,
        "INVALID_TRANSITION": ErrorCode.INVALID_TRANSITION,
    }
    for name in ("includes/enqueue_batch", "index_jobs"):
        assert (
            f"INVALID_JOB = {int(ErrorCode.INVALID_JOB)}" in LUA.joinpath(f"{name}.lua").read_text()
        )


# -- return codes, straight from the scripts -------------------------------------------------------


def common(clock: FakeClock) -> list[Any]:
    return [clock.now_ms(), 10_000]


async def run(broker: RedisBroker, name: str, args: list[Any], *extra_keys: str) -> Any:
    keys = (*broker.queue_keys("q").script_keys, *extra_keys)
    return await broker.run_script(name, keys, args)


async def running_job(broker: RedisBroker) -> Job:
    await broker.enqueue([Job(id=new_job_id(), task="t", queue="q")])
    [job] = await broker.reserve("q", 1, lease_s=30)
    return job


LEASE_SCRIPTS = {
    "retry": lambda now: [now, "=err", ""],
    "dead_letter": lambda now: ["exhausted", "=err", ""],
    "release": lambda now: [],
    "set_progress": lambda now: [50, ""],
}


@pytest.mark.parametrize("name", sorted(LEASE_SCRIPTS))
async def test_a_stale_token_gets_lease_lost_and_a_missing_job_job_not_found(
    rbroker: RedisBroker, clock: FakeClock, name: str
) -> None:
    job = await running_job(rbroker)
    extra = LEASE_SCRIPTS[name](clock.now_ms())

    stale = await run(rbroker, name, [*common(clock), job.id, "forged", *extra])
    missing = await run(rbroker, name, [*common(clock), "no-such-job", "t", *extra])

    assert stale == ErrorCode.LEASE_LOST
    assert missing == ErrorCode.JOB_NOT_FOUND
    assert (await rbroker.get(job.id)).state == JobState.RUNNING  # type: ignore[union-attr]


async def test_ack_reports_a_code_per_item(rbroker: RedisBroker, clock: FakeClock) -> None:
    job = await running_job(rbroker)
    items = [
        (job.id, "forged", ""),
        ("no-such-job", "t", ""),
        (job.id, job.lease_token, as_str(b'{"ok":1}')),
        (job.id, job.lease_token, ""),  # the same lease twice in one batch: only once
    ]

    codes = await run(rbroker, "ack", [*common(clock), pack(items)])

    assert codes == [ErrorCode.LEASE_LOST, ErrorCode.JOB_NOT_FOUND, 1, ErrorCode.LEASE_LOST]
    stored = await rbroker.get(job.id)
    assert stored is not None
    assert (stored.state, stored.attempts, stored.result) == (JobState.COMPLETED, 1, {"ok": 1})


async def test_extend_lease_reports_zero_for_leases_not_held(
    rbroker: RedisBroker, clock: FakeClock
) -> None:
    job = await running_job(rbroker)
    leases = [(job.id, "forged"), ("no-such-job", "t"), (job.id, job.lease_token)]

    assert await run(rbroker, "extend_lease", [*common(clock), 5000, pack(leases)]) == [0, 0, 1]


async def test_start_and_cancel_report_missing_jobs_and_invalid_transitions(
    rbroker: RedisBroker, clock: FakeClock
) -> None:
    job = await running_job(rbroker)

    assert await run(rbroker, "start", [*common(clock), "no-such-job"]) == ErrorCode.JOB_NOT_FOUND
    assert await run(rbroker, "start", [*common(clock), job.id]) == ErrorCode.INVALID_TRANSITION
    assert await run(rbroker, "cancel", [*common(clock), "no-such-job"]) == ErrorCode.JOB_NOT_FOUND
    await rbroker.ack(job.lease)
    assert await run(rbroker, "cancel", [*common(clock), job.id]) == ErrorCode.INVALID_TRANSITION


async def test_delete_and_append_log_report_missing_jobs(
    rbroker: RedisBroker, clock: FakeClock
) -> None:
    log_key = rbroker.queue_keys("q").log("no-such-job")
    assert (
        await run(rbroker, "delete", [*common(clock), "no-such-job"], log_key)
        == ErrorCode.JOB_NOT_FOUND
    )
    assert (
        await run(rbroker, "append_log", [*common(clock), "no-such-job", 10, "line"], log_key)
        == ErrorCode.JOB_NOT_FOUND
    )


async def test_enqueue_refuses_an_id_in_use_and_writes_nothing(
    rbroker: RedisBroker, clock: FakeClock, raw: Any
) -> None:
    job = await running_job(rbroker)
    before = raw.hlen(rbroker.queue_keys("q").meta)
    columns = [
        [1, 2],
        [1, 2],
        [new_job_id(), job.id],
        ["queued", "queued"],
        ["", ""],
        ["t", "t"],
        [as_str(b"{}"), as_str(b"{}")],
        [as_str(b"{}"), as_str(b"{}")],
    ]

    reply = await run(rbroker, "enqueue", [*common(clock), *(pack(c) for c in columns)])

    assert reply == [ErrorCode.INVALID_JOB, job.id.encode()]
    assert raw.hlen(rbroker.queue_keys("q").meta) == before


async def test_index_jobs_refuses_an_id_of_another_queue(rbroker: RedisBroker) -> None:
    job = await running_job(rbroker)
    keys = rbroker.global_keys.script_keys

    reply = await rbroker.run_script("index_jobs", keys, [pack([job.id]), pack(["other"])])
    same_batch = await rbroker.run_script("index_jobs", keys, [pack(["x", "x"]), pack(["a", "b"])])

    assert reply == [ErrorCode.INVALID_JOB, job.id.encode(), b"q"]
    assert same_batch == [ErrorCode.INVALID_JOB, b"x", b""]


async def test_the_broker_maps_codes_to_errors(rbroker: RedisBroker) -> None:
    from conveyor.errors import InvalidTransition, JobNotFound, LeaseLost

    job = await running_job(rbroker)
    with pytest.raises(LeaseLost, match=f"ack\\({job.id}\\)"):
        await rbroker.ack(Lease(job_id=job.id, queue="q", token="forged"))
    with pytest.raises(JobNotFound):
        await rbroker.release(Lease(job_id="nope", queue="q", token="t"))
    with pytest.raises(InvalidTransition):
        await rbroker.start(job.id)


async def test_scripts_are_reloaded_after_the_server_forgets_them(
    rbroker: RedisBroker, raw: Any
) -> None:
    raw.script_flush()  # as after a restart or failover: EVALSHA gets NOSCRIPT

    [job_id] = await rbroker.enqueue([Job(id=new_job_id(), task="t", queue="q")])
    [reserved] = await rbroker.reserve("q", 1, lease_s=30)

    assert reserved.id == job_id
    used = [rbroker._scripts.sha(n) for n in ("index_and_enqueue", "reserve")]  # type: ignore[union-attr]
    assert all(raw.script_exists(*used))  # loaded again on NOSCRIPT, lazily


def test_the_lane_packs_commands_exactly_as_redis_py_does() -> None:
    from redis.asyncio.connection import Connection

    from conveyor.brokers.redis.scripts import Scripts

    conn = Connection()
    scripts = Scripts.__new__(Scripts)
    scripts._heads = {}
    keys = ["{conveyor:q}:jobs", "{conveyor:q}:meta"]
    args: list[Any] = [1_700_000_000_000, 10_000, b"\x92\xa1x\xc0", "w\u00e9", 2.5, -3, ""]
    for _ in range(2):  # the second time from the cached head
        mine = scripts._pack(conn, "EVALSHA", "ab" * 20, keys, args)
        theirs = b"".join(conn.pack_command("EVALSHA", "ab" * 20, len(keys), *keys, *args))
        assert mine == theirs
