"""X8: job text (log lines, progress, errors) is data everywhere the service returns it.

* The REST and JSON-RPC answers carrying it are JSON (``application/json``) and give the text back
  exactly, as a string.
* The event stream cannot be forged by a log line: text with CR/LF and ``event:``/``data:``
  fields stays inside one JSON ``data:`` line.
* The dashboard page puts job text into the DOM only as text: its script has no HTML sink, and
  its policy forbids inline script. (A real Chromium run of the same markup is in
  tests/browser/test_dashboard.py::test_job_text_is_shown_as_text_and_never_runs: error, args,
  logs, result and the dead-letter row are shown as text, no element or script is created.)
* Sizes: a progress description, an error message and its traceback, and each log line are
  capped, and so is a request body (tests/service).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx

from conveyor.service import dashboard

from .conftest import TOKEN, Live

XSS = '<script>window.__xss=1</script><img src=x onerror="alert(1)">'
#: A log line trying to end its SSE event and forge another one.
FORGERY = f'{XSS}\r\n\r\nevent: state\ndata: {{"state": "completed"}}\n\nid: 999\n'
APP_JS = Path(dashboard.__file__).with_name("app.js")


def _job_failed_with(live: Live, text: str) -> str:
    response = live.client.post("/jobs", json={"task": "t.shout", "args": [text]})
    assert response.status_code == 201, response.text
    job_id: str = response.json()["job_id"]
    live.wait_state(job_id, "failed")
    return job_id


def test_job_text_comes_back_as_exact_json_strings(live: Live) -> None:
    job_id = _job_failed_with(live, XSS)
    answers = {
        "job": live.client.get(f"/jobs/{job_id}"),
        "logs": live.client.get(f"/jobs/{job_id}/logs"),
        "dead": live.client.get("/dead-letters"),
        "rpc": live.client.post(
            "/rpc",
            json={
                "jsonrpc": "2.0",
                "method": "queue_get_job_status",
                "params": {"job_id": job_id},
                "id": 1,
            },
        ),
    }
    for name, response in answers.items():
        assert response.status_code == 200, (name, response.text)
        assert response.headers["content-type"] == "application/json", name
        json.loads(response.content)  # the whole body is one JSON document
    job = answers["job"].json()
    assert job["description"] == XSS
    assert job["error"] == f"ValueError: {XSS}"
    assert answers["logs"].json()["lines"] == [XSS]
    assert answers["rpc"].json()["result"]["error"] == f"ValueError: {XSS}"
    dead = [j for j in answers["dead"].json()["jobs"] if j["id"] == job_id]
    assert dead[0]["error"] == f"ValueError: {XSS}"


def test_a_log_line_cannot_forge_stream_events(live: Live) -> None:
    headers = {"authorization": f"Bearer {TOKEN}"}
    with (
        httpx.Client(base_url=live.url, timeout=10) as streamer,
        streamer.stream("GET", "/events", headers=headers) as stream,
    ):
        assert stream.headers["content-type"].startswith("text/event-stream")
        job_id = live.client.post("/jobs", json={"task": "t.shout", "args": [FORGERY]}).json()[
            "job_id"
        ]
        events: list[dict[str, str]] = []
        current: dict[str, str] = {}
        deadline = time.monotonic() + 10
        for line in stream.iter_lines():
            assert time.monotonic() < deadline, f"no final state event for {job_id}: {events}"
            if line == "":
                if current:
                    events.append(current)
                current = {}
                last = events[-1] if events else {}
                if json.loads(last.get("data", "{}")).get("state") == "failed":
                    break
                continue
            if line.startswith(":"):
                continue  # a comment (the server's keep-alives)
            field, _, value = line.partition(": ")
            assert field in ("id", "event", "data", "retry"), f"forged field {line!r}"
            current[field] = value
    ours = [e for e in events[1:] if json.loads(e["data"]).get("job_id") == job_id]
    # The server's own reconnection hint, once, as the stream's first block.
    assert [e for e in events if "retry" in e] == [{"retry": "2000"}] == events[:1]
    for event in events[1:]:  # whatever else the stream carried, each event is well-formed
        assert set(event) <= {"id", "event", "data"}
        assert event["event"] in ("state", "progress", "log", "deleted")
        assert isinstance(json.loads(event["data"]), dict)
    logs = [json.loads(e["data"])["line"] for e in ours if e["event"] == "log"]
    assert logs == [FORGERY]  # one event, the text intact inside its JSON
    assert "999" not in {e.get("id") for e in events}


def test_the_dashboard_script_has_no_html_sink_and_inline_script_is_forbidden(
    live: Live,
) -> None:
    source = APP_JS.read_text(encoding="utf-8")
    code = re.sub(r"//[^\n]*|/\*.*?\*/", "", source, flags=re.DOTALL)  # comments may name sinks
    sinks = [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "srcdoc",
        "createContextualFragment",
        "DOMParser",
        'setAttribute("on',  # an event-handler attribute (EventSource's .onerror is a property)
    ]
    assert [s for s in sinks if s in code] == []
    assert code.count("textContent") >= 10  # job text goes in as text
    page = live.client.get("/")
    assert page.status_code == 200
    policy = page.headers["content-security-policy"]
    assert "script-src 'self'" in policy
    assert "unsafe-inline" not in policy
    assert "unsafe-eval" not in policy
    assert page.headers["x-content-type-options"] == "nosniff"


def test_the_progress_description_is_capped(live: Live) -> None:
    job_id = _job_failed_with(live, "x" * 100_000)
    assert len(live.client.get(f"/jobs/{job_id}").json()["description"]) <= 1024


def test_error_text_and_log_lines_are_capped(live: Live) -> None:
    job_id = _job_failed_with(live, "y" * 900_000)  # under the 1 MiB request cap
    job = live.client.get(f"/jobs/{job_id}").json()
    lines = live.client.get(f"/jobs/{job_id}/logs").json()["lines"]
    assert len(job["error"]) <= 16 * 1024
    assert "more characters cut" in job["error"]
    assert len(job["traceback"] or "") <= 80 * 1024
    assert max(len(line) for line in lines) <= 16 * 1024 + 100
    assert any("more characters cut" in line for line in lines)
