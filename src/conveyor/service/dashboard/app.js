// conveyor dashboard: plain JS, no build step. It reads the REST API and follows GET /events.
//
// Rule: text that comes from jobs (task names, args, results, errors, log lines) reaches the page
// only through textContent / text nodes, never as markup, so a job cannot inject HTML or script.
(() => {
  "use strict";

  const STATES = ["pending", "queued", "scheduled", "running", "completed", "failed", "stopped"];
  const ACTIVE = new Set(["pending", "queued", "scheduled", "running"]);
  const TOKEN_KEY = "conveyor.token";
  const JOBS_PER_PAGE = 25;
  const DEAD_PER_PAGE = 10;
  const $ = (id) => document.getElementById(id);

  // Session storage, not local storage or a cookie: the token leaves with the tab, and the
  // browser never attaches it to a request by itself (no CSRF surface).
  let token = sessionStorage.getItem(TOKEN_KEY);
  // Opened as /?token=...: keep the token for this tab and take it out of the address bar (and so
  // out of the history and of any link copied from it).
  {
    const params = new URLSearchParams(location.search);
    if (params.has("token")) {
      token = params.get("token");
      sessionStorage.setItem(TOKEN_KEY, token);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(null, "", location.pathname + (rest ? `?${rest}` : "") + location.hash);
    }
  }

  /** An element with properties (textContent, className, title, ...) and children. */
  function el(tag, props = {}, ...children) {
    const node = Object.assign(document.createElement(tag), props);
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child); // strings become text nodes
    }
    return node;
  }

  // -- the API ---------------------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function url(path, query = {}) {
    // Relative to the page, so the dashboard also works when the service is mounted under a prefix.
    const u = new URL(path, document.baseURI);
    for (const [key, value] of Object.entries(query)) {
      if (value !== null && value !== undefined && value !== "") u.searchParams.append(key, value);
    }
    return u;
  }

  async function api(path, { method = "GET", query, body } = {}) {
    const headers = { Accept: "application/json" };
    if (token) headers.Authorization = `Bearer ${token}`;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url(path, query), {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      credentials: "omit",
      cache: "no-store",
    });
    if (response.status === 401) {
      askToken();
      throw new ApiError(401, "this server needs its bearer token");
    }
    const data = await response.json().catch(() => null);
    if (!response.ok) {
      throw new ApiError(response.status, data?.error?.message || `HTTP ${response.status}`);
    }
    return data;
  }

  function enc(id) {
    return encodeURIComponent(id);
  }

  // -- token and notices -----------------------------------------------------------------------

  function askToken() {
    $("token-form").hidden = false;
    $("token-input").focus();
  }

  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    token = $("token-input").value.trim();
    sessionStorage.setItem(TOKEN_KEY, token);
    $("token-input").value = "";
    $("token-form").hidden = true;
    $("forget-token").hidden = false;
    refreshAll();
    connectEvents();
  });

  $("forget-token").hidden = !token;
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    token = null;
    $("forget-token").hidden = true;
    if (source) source.close();
    askToken();
  });

  let noticeTimer = null;
  function notify(message, kind = "info") {
    const box = $("notice");
    box.textContent = message;
    box.className = kind;
    box.hidden = false;
    clearTimeout(noticeTimer);
    noticeTimer = setTimeout(() => (box.hidden = true), 6000);
  }

  function failed(error) {
    // A 401 already shows the token form: no second message for it.
    if (!(error instanceof ApiError && error.status === 401)) notify(error.message, "error");
  }

  // -- small renderers -------------------------------------------------------------------------

  function stateBadge(state) {
    return el("span", { className: `state s-${state}`, textContent: state });
  }

  function progressBar(percent, state) {
    const bar = el("div", { className: "progress" }, el("span", { className: "fill" }));
    bar.setAttribute("role", "progressbar");
    bar.setAttribute("aria-valuemin", "0");
    bar.setAttribute("aria-valuemax", "100");
    setProgress(bar, percent, state);
    return bar;
  }

  function setProgress(bar, percent, state) {
    const value = state === "completed" ? 100 : Math.max(0, Math.min(100, percent || 0));
    bar.setAttribute("aria-valuenow", String(value));
    bar.dataset.state = state;
    bar.title = `${value}%`;
    bar.firstChild.style.width = `${value}%`; // CSSOM, which the style policy allows
  }

  function when(ms) {
    if (!ms) return "";
    const date = new Date(ms);
    const today = date.toDateString() === new Date().toDateString();
    return today ? date.toLocaleTimeString() : date.toLocaleString();
  }

  function shortId(id) {
    return el("code", { textContent: id.length > 14 ? `${id.slice(0, 12)}…` : id, title: id });
  }

  /** JSON on one line when short, indented when not. */
  function json(value) {
    const line = JSON.stringify(value) ?? "null";
    return line.length <= 80 ? line : JSON.stringify(value, null, 2);
  }

  // -- queues ----------------------------------------------------------------------------------

  $("queues").tHead.append(
    el("tr", {}, el("th", { textContent: "queue" }),
      ...STATES.map((s) => el("th", { className: `num s-${s}-text`, textContent: s })),
      el("th")));

  function countCells(counts) {
    return STATES.map((s) =>
      el("td", { className: counts[s] ? "num" : "num zero", textContent: String(counts[s] ?? 0) }));
  }

  async function loadQueues() {
    const data = await api("queues");
    const names = Object.keys(data.queues).sort();
    const rows = names.map((name) => {
      const counts = data.queues[name];
      const pick = el("button", { type: "button", className: "link", textContent: name,
        title: "show this queue's jobs" });
      pick.addEventListener("click", () => {
        $("filters").elements.queue.value = name;
        jobs.reset();
      });
      const redrive = counts.failed
        ? button(`Redrive ${counts.failed}`, () => redriveDead({ queue: name }))
        : null;
      return el("tr", {}, el("td", {}, pick), ...countCells(counts), el("td", {}, redrive));
    });
    $("queues").tBodies[0].replaceChildren(...rows);
    if (!names.length) {
      $("queues").tBodies[0].append(
        el("tr", {}, el("td", { colSpan: STATES.length + 2, className: "empty",
          textContent: "no jobs yet" })));
    }
    $("queues").tFoot.replaceChildren(
      el("tr", {}, el("th", { textContent: "total" }), ...countCells(data.totals), el("td")));
    const select = $("filters").elements.queue;
    const chosen = select.value;
    if (select.dataset.names === names.join("\n")) return; // rebuilding would close an open list
    select.dataset.names = names.join("\n");
    select.replaceChildren(el("option", { value: "", textContent: "all queues" }),
      ...names.map((n) => el("option", { value: n, textContent: n })));
    if (chosen && !names.includes(chosen)) {
      select.append(el("option", { value: chosen, textContent: chosen }));
    }
    select.value = chosen;
  }

  function button(label, onClick) {
    const b = el("button", { type: "button", textContent: label });
    b.addEventListener("click", (event) => {
      event.stopPropagation(); // a button inside a row must not also open the row's job
      onClick();
    });
    return b;
  }

  async function redriveDead(body) {
    try {
      const done = await api("dead-letters/redrive", { method: "POST", body });
      notify(`Redrove ${done.redriven} dead letter${done.redriven === 1 ? "" : "s"}`);
      refreshAll();
    } catch (error) {
      failed(error);
    }
  }

  // -- paged tables: jobs and dead letters ------------------------------------------------------

  /** A table fed by a cursor-paged endpoint; "back" replays the cursors seen so far. */
  function pagedTable({ table, pagerId, load, render }) {
    const view = { cursor: null, history: [], next: null, rows: new Map() };
    const pager = $(pagerId);
    view.reload = async () => {
      const page = await load(view.cursor);
      view.next = page.next_cursor;
      view.rows.clear();
      const rows = page.jobs.map((job) => render(job, view.rows));
      $(table).tBodies[0].replaceChildren(...rows);
      if (!rows.length) {
        const cols = $(table).tHead.rows[0].cells.length;
        const empty = el("td", { colSpan: cols, className: "empty", textContent: "nothing here" });
        $(table).tBodies[0].append(el("tr", {}, empty));
      }
      pager.querySelector("[data-page=next]").disabled = !view.next;
      pager.querySelector("[data-page=back]").disabled = !view.history.length;
      pager.querySelector("[data-page=first]").disabled = !view.history.length;
    };
    view.reset = () => {
      view.cursor = null;
      view.history = [];
      view.reload().catch(failed);
    };
    pager.addEventListener("click", (event) => {
      const where = event.target.dataset?.page;
      if (where === "next" && view.next) {
        view.history.push(view.cursor);
        view.cursor = view.next;
      } else if (where === "back" && view.history.length) {
        view.cursor = view.history.pop();
      } else if (where === "first") {
        view.cursor = null;
        view.history = [];
      } else {
        return;
      }
      view.reload().catch(failed);
    });
    return view;
  }

  function jobRow(job, cells) {
    const row = el("tr", { tabIndex: 0, title: "open this job" }, ...cells);
    row.dataset.jobId = job.id;
    row.addEventListener("click", () => openJob(job.id));
    row.addEventListener("keydown", (event) => event.key === "Enter" && openJob(job.id));
    return row;
  }

  for (const s of STATES) {
    $("filters").elements.state.append(el("option", { value: s, textContent: s }));
  }

  const jobs = pagedTable({
    table: "jobs",
    pagerId: "jobs-pager",
    load: (cursor) => {
      const f = $("filters").elements;
      const query = { queue: f.queue.value, state: f.state.value, task: f.task.value.trim(),
        limit: JOBS_PER_PAGE, cursor };
      return api("jobs", { query });
    },
    render: (job, rows) => {
      const state = el("td", {}, stateBadge(job.state));
      const bar = progressBar(job.progress, job.state);
      rows.set(job.id, { state, bar });
      return jobRow(job, [
        el("td", {}, shortId(job.id)), el("td", { textContent: job.task }),
        el("td", { textContent: job.queue }), state, el("td", {}, bar),
        el("td", { className: "num", textContent: `${job.attempts}/${job.max_attempts}` }),
        el("td", { textContent: when(job.enqueued_ms) }),
      ]);
    },
  });

  const dead = pagedTable({
    table: "dead",
    pagerId: "dead-pager",
    load: (cursor) => api("dead-letters", { query: { limit: DEAD_PER_PAGE, cursor } }),
    render: (job) => jobRow(job, [
      el("td", {}, shortId(job.id)), el("td", { textContent: job.task }),
      el("td", { textContent: job.queue }),
      el("td", { className: "error clip", textContent: job.error ?? "", title: job.error ?? "" }),
      el("td", { className: "num", textContent: `${job.attempts}/${job.max_attempts}` }),
      el("td", { textContent: when(job.finished_ms) }),
      el("td", {}, button("Redrive", () => redriveDead({ job_ids: [job.id] }))),
    ]),
  });

  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    jobs.reset();
  });
  $("filters").addEventListener("change", () => jobs.reset());
  $("filters").addEventListener("reset", () => setTimeout(() => jobs.reset()));

  function refreshAll() {
    return Promise.all([loadQueues(), jobs.reload(), dead.reload()]).catch(failed);
  }

  // Bursts of events (a batch finishing) cost one re-read, not one per event.
  let refreshTimer = null;
  function scheduleRefresh() {
    if (refreshTimer === null) {
      refreshTimer = setTimeout(() => {
        refreshTimer = null;
        refreshAll();
      }, 300);
    }
  }

  // -- the job panel ---------------------------------------------------------------------------

  let current = null; // { id, seen: log lines received (absolute), logs: in flight, again }
  const panelBar = progressBar(0, "pending");
  $("p-progress").append(panelBar);

  async function openJob(id) {
    current = { id, seen: 0, logs: null, again: false, deleted: false };
    history.replaceState(null, "", `#job=${enc(id)}`);
    $("p-id").textContent = id;
    $("p-logs").replaceChildren();
    $("p-logs-note").textContent = "";
    $("panel").hidden = false;
    document.body.classList.add("with-panel");
    await Promise.all([loadJob(), loadLogs()]);
  }

  function closeJob() {
    current = null;
    $("panel").hidden = true;
    document.body.classList.remove("with-panel");
    history.replaceState(null, "", location.pathname + location.search);
  }

  async function loadJob() {
    const id = current?.id;
    if (!id) return;
    try {
      const job = await api(`jobs/${enc(id)}`);
      if (current?.id === id) renderJob(job);
    } catch (error) {
      if (error.status === 404 && current?.id === id) markDeleted();
      else failed(error);
    }
  }

  function markDeleted() {
    current.deleted = true;
    $("p-fields").replaceChildren(el("dt", { textContent: "state" }),
      el("dd", { textContent: "deleted" }));
    for (const b of ["p-stop", "p-retry", "p-delete"]) $(b).disabled = true;
  }

  function renderJob(job) {
    setProgress(panelBar, job.progress, job.state);
    $("p-desc").textContent = job.description || "";
    const fields = [
      ["state", stateBadge(job.state)], ["task", job.task], ["queue", job.queue],
      ["priority", job.priority], ["attempts", `${job.attempts}/${job.max_attempts}`],
      ["enqueued", when(job.enqueued_ms)], ["started", when(job.started_ms)],
      ["finished", when(job.finished_ms)], ["worker", job.worker_id],
      ["failure", job.failure_reason],
    ];
    $("p-fields").replaceChildren(...fields.filter(([, v]) => v).flatMap(([k, v]) =>
      [el("dt", { textContent: k }), el("dd", {}, v)]));
    $("p-args").textContent = `args: ${json(job.args)}\nkwargs: ${json(job.kwargs)}`;
    $("p-result-box").hidden = job.state !== "completed";
    $("p-result").textContent = json(job.result);
    $("p-error-box").hidden = !job.error;
    $("p-error").textContent = job.error ?? "";
    $("p-tb-box").hidden = !job.traceback;
    $("p-traceback").textContent = job.traceback ?? "";
    $("p-stop").disabled = !ACTIVE.has(job.state);
    $("p-retry").disabled = !(job.state === "failed" || job.state === "stopped");
    $("p-delete").disabled = false;
  }

  /** Fetch the log lines not shown yet; one request at a time, re-run if more arrived meanwhile. */
  async function loadLogs() {
    const job = current;
    if (!job || job.deleted) return;
    if (job.logs) {
      job.again = true;
      return job.logs;
    }
    job.logs = (async () => {
      do {
        job.again = false;
        // Offsets count kept lines; `dropped` older lines were removed by the cap. Track the
        // absolute count (kept + dropped) so a line is never shown twice or skipped silently.
        const query = { offset: Math.max(0, job.seen - (job.dropped || 0)) };
        const page = await api(`jobs/${enc(job.id)}/logs`, { query });
        if (current !== job) return;
        job.dropped = page.dropped;
        const start = page.dropped + page.offset;
        const fresh = page.lines.slice(Math.max(0, job.seen - start));
        const pre = $("p-logs");
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        pre.append(...fresh.map((line) => document.createTextNode(`${line}\n`)));
        if (atBottom) pre.scrollTop = pre.scrollHeight;
        job.seen = Math.max(job.seen, start + page.lines.length);
        $("p-logs-note").textContent = page.dropped ? `(${page.dropped} older lines dropped)` : "";
      } while (job.again && current === job);
    })()
      .catch((error) => (error.status === 404 ? undefined : failed(error)))
      .finally(() => (job.logs = null));
    return job.logs;
  }

  async function act(path, method, message) {
    const id = current?.id;
    if (!id) return;
    try {
      const job = await api(`jobs/${enc(id)}${path}`, { method });
      notify(message);
      if (method === "DELETE") closeJob();
      else if (current?.id === id) renderJob(job);
      scheduleRefresh();
    } catch (error) {
      failed(error);
    }
  }

  $("p-close").addEventListener("click", closeJob);
  $("p-stop").addEventListener("click", () => act("/stop", "POST", "Stop requested"));
  $("p-retry").addEventListener("click", () => act("/retry", "POST", "Sent back to its queue"));
  $("p-delete").addEventListener("click", () => {
    if (current && confirm(`Delete job ${current.id} and its logs?`)) {
      act("", "DELETE", "Job deleted");
    }
  });
  document.addEventListener("keydown", (event) => event.key === "Escape" && current && closeJob());

  // -- live events -----------------------------------------------------------------------------

  let source = null;
  let lastEventId = null;
  let retryMs = 1000;

  function setLive(on, text) {
    $("live").textContent = text || (on ? "live" : "reconnecting");
    $("live").className = on ? "live on" : "live";
  }

  function onEvent(message) {
    lastEventId = message.lastEventId || lastEventId;
    const event = JSON.parse(message.data);
    const row = jobs.rows.get(event.job_id);
    const mine = current?.id === event.job_id;
    if (event.kind === "progress") {
      // An event may carry only a new description: keep the bar where it is then.
      const bars = [row?.bar, mine ? panelBar : null].filter(Boolean);
      if (event.progress != null) {
        for (const bar of bars) setProgress(bar, event.progress, bar.dataset.state);
      }
      if (mine && event.description != null) $("p-desc").textContent = event.description;
    } else if (event.kind === "log") {
      if (mine) loadLogs();
    } else {
      if (row && event.state) {
        row.state.replaceChildren(stateBadge(event.state));
        setProgress(row.bar, Number(row.bar.getAttribute("aria-valuenow")), event.state);
      }
      if (mine) {
        loadJob();
        loadLogs(); // a process job's captured output is stored when its run ends
      }
      scheduleRefresh();
    }
  }

  function connectEvents() {
    if (source) source.close();
    // EventSource cannot send headers: the token travels as ?token= (the server strips it
    // before logging). ?after= resumes where the last stream stopped, missing nothing.
    source = new EventSource(url("events", { token, after: lastEventId }));
    source.onopen = () => {
      retryMs = 1000;
      setLive(true);
      scheduleRefresh(); // whatever happened while disconnected
    };
    for (const kind of ["state", "progress", "log", "deleted"]) {
      source.addEventListener(kind, onEvent);
    }
    // "dropped" (too slow) and "end" (server stopping) close the stream; the browser reconnects
    // by itself, sending Last-Event-ID.
    source.addEventListener("dropped", () => setLive(false, "catching up"));
    source.addEventListener("end", () => setLive(false));
    source.onerror = () => {
      setLive(false);
      if (source.readyState === EventSource.CLOSED) {
        // An HTTP error (401, 503) makes the browser give up: retry with backoff, resuming.
        const stale = source;
        setTimeout(() => stale === source && connectEvents(), retryMs);
        retryMs = Math.min(retryMs * 2, 30000);
      }
    };
  }

  function openFromHash() {
    const match = /^#job=(.+)$/.exec(location.hash);
    if (match) openJob(decodeURIComponent(match[1]));
  }

  window.addEventListener("hashchange", openFromHash);
  refreshAll();
  connectEvents();
  openFromHash();
})();
