"""libFuzzer (atheris) harness for the JSON-RPC envelope: ``python fuzz/atheris_jsonrpc.py``.

Each input is a whole ``POST /rpc`` body handed to :func:`conveyor.service.jsonrpc.handle` of a
real service (memory broker, lifespan running, in one event loop). It must answer 200, 204 (with
nothing) or 400, with JSON-RPC 2.0 reply objects whose error codes are -32700/-32600/-32601/
-32602 or an application code in -32099..-32000, never -32603 (an internal error) and never an
exception. A dictionary of JSON-RPC tokens (``fuzz/jsonrpc.dict``) and seed envelopes
(``fuzz/seeds/jsonrpc``) help it build envelopes.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import atheris

with atheris.instrument_imports(include=["conveyor"]):
    from conveyor.client import Conveyor
    from conveyor.service import ServiceSettings, create_app
    from conveyor.service.jsonrpc import handle
    from conveyor.service.operations import Service

ALLOWED = {-32700, -32600, -32601, -32602, *range(-32099, -31999)}
LOOP = asyncio.new_event_loop()
API = create_app(Conveyor("memory://"), settings=ServiceSettings(rate_limit_per_s=None))
SERVICE: Service = API.state.service


def check_reply(reply: Any) -> None:
    """One reply object has the 2.0 shape and an allowed code."""
    assert isinstance(reply, dict), reply
    assert reply.get("jsonrpc") == "2.0", reply
    assert ("result" in reply) != ("error" in reply), reply
    if "error" in reply:
        assert reply["error"]["code"] in ALLOWED, reply


def test_one_input(data: bytes) -> None:
    """One body through the envelope handler."""
    status, document = LOOP.run_until_complete(handle(SERVICE, data))
    if status == 204:
        assert document is None
        return
    assert status in (200, 400), status
    for reply in document if isinstance(document, list) else [document]:
        check_reply(reply)


def main() -> None:
    """Start the app's lifespan, then run libFuzzer with the command line's options."""
    lifespan = API.router.lifespan_context(API)
    LOOP.run_until_complete(lifespan.__aenter__())
    argv = list(sys.argv)
    here = Path(__file__).parent
    if not any(arg.startswith("-dict=") for arg in argv):
        argv.append(f"-dict={here / 'jsonrpc.dict'}")
    with tempfile.TemporaryDirectory(prefix="conveyor-rpc-corpus-") as corpus:
        if not any(not arg.startswith("-") for arg in argv[1:]):
            # libFuzzer writes what it finds into its first corpus directory: a scratch copy of
            # the seeds keeps the checked-in ones as they are.
            for seed in (here / "seeds" / "jsonrpc").iterdir():
                shutil.copy(seed, corpus)
            argv.append(corpus)
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()


if __name__ == "__main__":
    main()
