"""X5: a job naming ``os.system`` (or any importable callable) cannot run it.

Tasks resolve only through the worker's registry: a name is never imported. A real
``conveyor worker`` process serves jobs that name dangerous callables as their task, as their
``on_success``/``on_failure`` callbacks, and inside their arguments; each such callable would
create a marker file if it ran. The jobs end dead-lettered (unknown task) or completed as plain
data, and no marker ever appears. A name that is not even a valid task name is refused at enqueue,
by the client and by the HTTP API.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import httpx
import pytest

from conveyor.client import Conveyor
from conveyor.errors import InvalidJobError
from conveyor.job import JobState
from conveyor.service import ServiceSettings, create_app

from .conftest import conveyor_env

TASKS = textwrap.dedent(
    """
    import os

    from conveyor import Conveyor

    app = Conveyor(os.environ["PROBE_URL"])


    @app.task(name="t.ok")
    async def ok(ctx, value):
        return value


    @app.task(name="t.fail", max_attempts=1)
    async def fail(ctx, value):
        raise ValueError("failing on purpose")
    """
)
#: Valid task names (``module:function`` spellings included): accepted, then never resolved.
DANGEROUS = [
    "os.system",
    "os:system",
    "subprocess.call",
    "subprocess:getoutput",
    "posix.system",
    "builtins.exec",
]
#: Not task names at all: refused at enqueue.
INVALID = ["os.system; rm", "__import__('os').system", 'os.system("id")', " os.system"]


async def test_names_of_importable_callables_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    url = f"sqlite:///{tmp_path / 'x5.db'}"
    (tmp_path / "x5_tasks.py").write_text(TASKS)
    app = Conveyor(url)
    async with app:
        as_task = [await app.enqueue(name, args=[command]) for name in DANGEROUS]
        as_task.append(await app.enqueue("builtins.exec", args=[f"open({str(marker)!r}, 'w')"]))
        as_callback = [
            await app.enqueue("t.ok", args=[command], on_success=name, on_failure=name)
            for name in DANGEROUS
        ] + [await app.enqueue("t.fail", args=[command], on_failure="os.system")]
        in_args = await app.enqueue(
            "t.ok", args=[{"task": "os.system", "callable": "os:system", "args": [command]}]
        )
        for name in INVALID:
            with pytest.raises(InvalidJobError, match="invalid task name"):
                await app.enqueue(name, args=[command])
        # The HTTP API (same broker) refuses invalid names, and queues the valid ones as data.
        api = create_app(app, settings=ServiceSettings(rate_limit_per_s=None))
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            for name in INVALID:
                response = await client.post("/jobs", json={"task": name, "args": [command]})
                assert response.status_code == 422, (name, response.text)
            response = await client.post("/jobs", json={"task": "os.system", "args": [command]})
            assert response.status_code == 201
            as_task.append(app.handle(response.json()["job_id"]))

        worker = subprocess.run(
            [
                str(Path(sys.executable).with_name("conveyor")),
                "--broker",
                url,
                "worker",
                "x5_tasks:app",
                "--queues",
                "default",
                "--burst",
                "--log-level",
                "warning",
            ],
            cwd=tmp_path,
            env=conveyor_env(PYTHONPATH=str(tmp_path), PROBE_URL=url),
            capture_output=True,
            text=True,
            timeout=45,
        )
        assert worker.returncode == 0, worker.stderr

        for handle in as_task:
            job = await app.get_job(handle.id)
            assert job is not None
            assert job.state is JobState.FAILED, job  # dead-lettered at once, never run
            assert job.error is not None
            assert "UnknownTask" in job.error, job.error
        for handle in as_callback:
            job = await app.get_job(handle.id)
            assert job is not None
            assert job.state in (JobState.COMPLETED, JobState.FAILED)
        job = await app.get_job(in_args.id)
        assert job is not None
        assert job.state is JobState.COMPLETED
        assert job.result == {"task": "os.system", "callable": "os:system", "args": [command]}
        assert "not a registered task" in worker.stderr  # the callbacks were skipped, and said so
    assert not marker.exists()
