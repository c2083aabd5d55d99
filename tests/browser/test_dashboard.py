"""The dashboard in a real browser: live progress and logs, stop, redrive, escaping, token."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from .conftest import TEST_TIMEOUT_S, Server

if TYPE_CHECKING:
    from playwright.sync_api import Page, Request, Route

pytestmark = pytest.mark.timeout(TEST_TIMEOUT_S)

Shot = Callable[["Page", str], Path]
StartServer = Callable[..., Server]
PANEL_BAR = "#p-progress [role=progressbar]"
XSS = '<img src=x onerror="window.__xss=1;alert(1)">'


def _expect():  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    expect.set_options(timeout=10_000)
    return expect


def _bar_value(page: Page) -> int:
    return int(page.locator(PANEL_BAR).get_attribute("aria-valuenow") or 0)


def test_progress_and_logs_arrive_live_and_stop_and_redrive_buttons_work(
    page: Page, start_server: StartServer, shot: Shot
) -> None:
    expect = _expect()
    server = start_server()
    page.goto(f"{server.url}/")
    expect(page.locator("#live")).to_have_text("live")
    shot(page, "empty")

    # -- a job that reports progress in steps and logs a line after each ---------------------
    steps_id = server.enqueue("t.steps", 6, 0.5)
    row = page.locator(f'#jobs tr[data-job-id="{steps_id}"]')
    row.click()  # waits for the row the event stream makes appear
    expect(page.locator("#panel")).to_be_visible()
    page.wait_for_function(
        f"() => {{ const v = +document.querySelector('{PANEL_BAR}').getAttribute('aria-valuenow');"
        " return v > 0 && v < 100; }"
    )
    expect(page.locator("#p-logs")).to_contain_text("step 1 of 6 done")
    first = _bar_value(page)
    # Seen while the job still runs: progress and logs come live, not on a reload.
    job = server.job(steps_id)
    assert job["state"] == "running", job
    assert job["progress"] < 100, job
    shot(page, "progress-and-logs")
    page.wait_for_function(
        f"v => +document.querySelector('{PANEL_BAR}').getAttribute('aria-valuenow') > v", arg=first
    )
    expect(row.locator("[role=progressbar]")).not_to_have_attribute("aria-valuenow", "0")
    expect(page.locator("#p-fields .state")).to_have_text("completed")
    expect(page.locator("#p-result")).to_have_text('"6 steps done"')
    assert _bar_value(page) == 100
    logs = page.locator("#p-logs").inner_text()
    assert [line for line in logs.splitlines() if line] == [
        f"step {i} of 6 done" for i in range(1, 7)
    ]  # each line once, in order, although lines came from both the API and the stream
    shot(page, "completed")

    # -- stop a running job with its button --------------------------------------------------
    long_id = server.enqueue("t.long", 30)
    page.locator(f'#jobs tr[data-job-id="{long_id}"]').click()
    expect(page.locator("#p-fields .state")).to_have_text("running")
    expect(page.locator("#p-retry")).to_be_disabled()
    shot(page, "long-running")
    page.locator("#p-stop").click()
    expect(page.locator("#p-fields .state")).to_have_text("stopped")
    expect(page.locator(f'#jobs tr[data-job-id="{long_id}"] .state')).to_have_text("stopped")
    expect(page.locator("#p-stop")).to_be_disabled()
    assert server.job(long_id)["state"] == "stopped"
    shot(page, "stopped")
    page.locator("#p-close").click()
    expect(page.locator("#panel")).to_be_hidden()

    # -- redrive a dead letter with its button -----------------------------------------------
    fail_id = server.enqueue("t.fail", "upstream refused the charge", 1.5)
    dead_row = page.locator(f'#dead tr[data-job-id="{fail_id}"]')
    expect(dead_row).to_contain_text("upstream refused the charge")
    expect(page.locator("#queues tbody tr", has_text="default")).to_contain_text("Redrive 1")
    shot(page, "dead-letter")
    dead_row.get_by_role("button", name="Redrive").click()
    state = page.locator(f'#jobs tr[data-job-id="{fail_id}"] .state')
    expect(state).to_have_text(re.compile("^(queued|running)$"))
    expect(dead_row).to_have_count(0)
    shot(page, "redriven")
    assert server.job(fail_id)["state"] in ("queued", "running")

    # It fails again (after 1.5 s): redrive it once more, this time the whole queue's.
    expect(dead_row).to_be_visible()
    page.locator("#queues tbody tr", has_text="default").get_by_role(
        "button", name="Redrive"
    ).click()
    expect(page.locator("#notice")).to_have_text("Redrove 1 dead letter")
    expect(state).to_have_text(re.compile("^(queued|running)$"))


def test_job_text_is_shown_as_text_and_never_runs(
    page: Page, start_server: StartServer, shot: Shot
) -> None:
    expect = _expect()
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    server = start_server()
    failed_id = server.enqueue("t.fail", XSS)
    echo_value = f"<script>window.__xss=2</script>{XSS}"
    echo_id = server.enqueue("t.echo", echo_value)
    server.wait_state(failed_id, "failed")
    server.wait_state(echo_id, "completed")

    page.goto(f"{server.url}/#job={failed_id}")
    expect(page.locator("#p-error")).to_contain_text(XSS)
    expect(page.locator("#p-args")).to_contain_text(XSS.replace('"', '\\"'))  # JSON-encoded
    expect(page.locator("#p-logs")).to_contain_text(XSS)
    expect(page.locator(f'#dead tr[data-job-id="{failed_id}"]')).to_contain_text(XSS)
    page.locator("#p-tb-box summary").click()
    expect(page.locator("#p-traceback")).to_contain_text("ValueError")
    shot(page, "failed-job-with-markup")
    page.locator(f'#jobs tr[data-job-id="{echo_id}"]').click()
    expect(page.locator("#p-result")).to_contain_text("<script>window.__xss=2</script>")
    expect(page.locator("#p-logs")).to_contain_text(echo_value)
    shot(page, "result-with-markup")

    assert page.locator("img").count() == 0  # the markup never became elements
    assert page.locator("script").count() == 1  # only the page's own app.js
    assert page.evaluate("() => window.__xss") is None
    assert dialogs == []


def test_with_a_token_the_page_asks_once_and_sends_it_as_a_bearer_header(
    page: Page, start_server: StartServer, shot: Shot
) -> None:
    expect = _expect()
    token = "dashboard-test-token"
    server = start_server(token=token)
    # The server guards the page itself too: only a proxy (here, this route) can add a header to
    # a browser's navigation. The page's own requests must carry the token it asked for.
    page_requests = ("document", "script", "stylesheet")

    def authenticate_the_page(route: Route, request: Request) -> None:
        if request.resource_type in page_requests:
            route.continue_(headers={**request.headers, "authorization": f"Bearer {token}"})
        else:
            route.continue_()

    page.route("**/*", authenticate_the_page)
    seen: list[Request] = []
    page.on("request", lambda request: seen.append(request))
    page.goto(f"{server.url}/")
    expect(page.locator("#token-form")).to_be_visible()
    shot(page, "asks-for-token")
    page.locator("#token-input").fill(token)
    seen.clear()  # from here on, every request the page makes must carry the token
    page.locator("#token-form button").click()
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("#live")).to_have_text("live")
    job_id = server.enqueue("t.echo", "hello")
    expect(page.locator(f'#jobs tr[data-job-id="{job_id}"] .state')).to_have_text("completed")
    shot(page, "with-token")
    assert page.evaluate("() => sessionStorage.getItem('conveyor.token')") == token

    api_calls = [r for r in seen if r.resource_type == "fetch"]
    assert len(api_calls) >= 3  # queues, jobs, dead letters at least
    assert all(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)
    streams = [r.url for r in seen if "/events" in r.url]
    assert len(streams) == 1
    assert f"token={token}" in streams[0]  # EventSource cannot send headers
    assert all("token=" not in r.url for r in api_calls)
    assert all(not r.headers.get("cookie") for r in seen)


def test_opening_the_dashboard_with_its_token_in_the_link_keeps_it_out_of_the_address_bar(
    page: Page, start_server: StartServer, shot: Shot
) -> None:
    expect = _expect()
    token = "link-token"
    server = start_server(token=token)
    seen: list[Request] = []
    page.on("request", lambda request: seen.append(request))
    page.goto(f"{server.url}/?token={token}")
    expect(page.locator("#live")).to_have_text("live")
    job_id = server.enqueue("t.echo", "via link")
    expect(page.locator(f'#jobs tr[data-job-id="{job_id}"] .state')).to_have_text("completed")
    shot(page, "opened-with-token-link")
    assert "token" not in page.url  # stripped from the address bar and the history
    assert page.evaluate("() => sessionStorage.getItem('conveyor.token')") == token
    api_calls = [r for r in seen if r.resource_type == "fetch"]
    assert api_calls
    assert all(r.headers.get("authorization") == f"Bearer {token}" for r in api_calls)
    expect(page.locator("#token-form")).to_be_hidden()


def test_the_dashboard_page_is_behind_the_token_and_its_code_is_public(
    start_server: StartServer,
) -> None:
    server = start_server(token="tok")
    refused = httpx.get(f"{server.url}/", timeout=5)
    assert refused.status_code == 401
    assert "/?token=" in refused.json()["error"]["message"]
    assert httpx.get(f"{server.url}/?token=wrong", timeout=5).status_code == 401
    assert httpx.get(f"{server.url}/?token=tok", timeout=5).status_code == 200
    # the page's script and style hold code only, no data: public, so a browser can load them
    assert httpx.get(f"{server.url}/static/app.js", timeout=5).status_code == 200
    assert httpx.get(f"{server.url}/static/style.css", timeout=5).status_code == 200
    page = server.client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    assert server.client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
    assert server.client.get("/static/style.css").status_code == 200
    for name in ("index.html", "missing.js", "..%2Fapp.py"):
        assert server.client.get(f"/static/{name}").status_code == 404
    assert "/" not in server.client.get("/openapi.json").json()["paths"]


def test_the_event_stream_resumes_from_the_last_event_id_after_a_drop(
    page: Page, start_server: StartServer, shot: Shot
) -> None:
    expect = _expect()
    first = start_server()
    streams: list[Request] = []
    page.on("request", lambda r: streams.append(r) if "/events" in r.url else None)
    page.goto(f"{first.url}/")
    expect(page.locator("#live")).to_have_text("live")
    before = first.enqueue("t.echo", "before the drop")
    expect(page.locator(f'#jobs tr[data-job-id="{before}"] .state')).to_have_text("completed")

    first.stop()  # the stream ends ("end" event), as when a server restarts
    expect(page.locator("#live")).not_to_have_text("live")
    shot(page, "reconnecting")
    second = start_server(port=first.port)  # same address, same SQLite file
    expect(page.locator("#live")).to_have_text("live")
    resumed = streams[-1]
    # The browser's own retry sends Last-Event-ID; the page's (after an HTTP error) sends ?after=.
    cursor = resumed.all_headers().get("last-event-id") or resumed.url.partition("after=")[2]
    assert cursor, resumed.url  # it asked for what came after the last event it saw

    after = second.enqueue("t.steps", 2, 0.2)
    expect(page.locator(f'#jobs tr[data-job-id="{after}"] .state')).to_have_text("completed")
    shot(page, "live-again")
