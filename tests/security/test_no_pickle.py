"""X4: no pickle in the default install.

* Statically: no module of the package imports pickle or a relative (``dill``, ``shelve``,
  ``marshal``...), and nothing calls ``Connection.recv()`` (multiprocessing's unpickling read).
* At run time: a real worker process running async and thread jobs on the default (SQLite)
  broker never has ``pickle`` in ``sys.modules``, not even through a dependency.

The process executor is the documented exception: it is built on ``multiprocessing`` (``spawn``),
whose ``multiprocessing.reduction`` imports pickle in the parent, and whose child start-up
unpickles its bootstrap arguments. Job data still never goes through pickle there: the parent and
child exchange msgspec JSON frames over a socket (``send_bytes``/``recv_bytes`` framing), which the
static check pins. The test asserts exactly that split.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import conveyor

PACKAGE = Path(conveyor.__file__).parent
PICKLE_LIKE = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "shelve", "jsonpickle"}
#: marshal is fine for the interpreter's own code objects; conveyor has no use for it at all.
FORBIDDEN_IMPORTS = PICKLE_LIKE | {"marshal", "copyreg"}


def test_no_module_of_the_package_imports_pickle_or_unpickles() -> None:
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 50  # the whole package, not an empty glob
    found = []
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Call) and ast.unparse(node.func) == "__import__":
                names = [ast.unparse(node.args[0])] if node.args else []
            hit = [n for n in names if n.split(".")[0].strip("'\"") in FORBIDDEN_IMPORTS]
            if hit:
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {hit}")
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "recv"
                and not node.args
                and not node.keywords
            ):
                # multiprocessing's Connection.recv() unpickles what the other end sent.
                found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {ast.unparse(node)}")
    assert found == []


def _probe(tmp_path: Path, *options: str) -> dict[str, list[str]]:
    here = Path(__file__).parent
    url = f"sqlite:///{tmp_path / 'p.db'}"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(
        # Imported by name, not run as __main__: process children import the tasks by module.
        [sys.executable, "-c", "import pickle_probe; pickle_probe.main()", url, *options],
        capture_output=True,
        text=True,
        timeout=45,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    report: dict[str, list[str]] = json.loads(done.stdout)
    return report


def test_a_worker_with_async_and_thread_executors_never_imports_pickle(tmp_path: Path) -> None:
    report = _probe(tmp_path, "--process")
    # Seen from inside each job, after the worker ran, and by an import hook on every import.
    assert report["async_job"] == []
    assert report["thread_job"] == []
    assert report["after_worker"] == []
    assert report["importers_before_process"] == []
    # The process executor: pickle arrives with multiprocessing, in the parent and the child.
    assert "pickle" in report["parent_after_process"]
    assert "pickle" in report["process_job"]
    importers = set(report["importers_after_process"]) - PICKLE_LIKE  # pickle imports _pickle
    assert importers == {"multiprocessing.reduction"}
