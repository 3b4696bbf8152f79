"""Scenario processes that start as soon as pytest has collected the tests that need them.

Some checks need a process of their own (logical CPUs set before TensorFlow starts, or a
fresh process to compare with). Most of the suite runs in one thread of the pytest process,
so these run on the machine's other core while it does: ``start`` launches them, ``result``
waits for one and reads what it wrote.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RUNS: dict = {}
_DIR = None


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    return env


def start(name, module, *args):
    """Start ``python -m module OUT.json *args`` once, in the background."""
    global _DIR
    if name in _RUNS:
        return
    if _DIR is None:
        _DIR = Path(tempfile.mkdtemp(prefix="gradtrace_scenarios_"))
    out = _DIR / f"{name}.json"
    log = open(_DIR / f"{name}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", module, args[0], str(out), *args[1:]], cwd=ROOT, env=_env(),
                            stdout=log, stderr=subprocess.STDOUT)
    _RUNS[name] = (proc, out, log)


def result(name, timeout=900):
    """What the scenario ``name`` wrote, once it has finished (asserting it did not crash)."""
    proc, out, log = _RUNS[name]
    try:
        proc.wait(timeout=timeout)
    finally:
        log.close()
    text = (_DIR / f"{name}.log").read_text()
    assert out.exists(), f"scenario {name} wrote no result (exit {proc.returncode}); its output:\n{text[-4000:]}"
    res = json.loads(out.read_text())
    assert "crash" not in res, f"scenario {name} crashed:\n{res['crash']}"
    return res


def wait_all(timeout=900):
    """Wait until every scenario process started so far has finished (their results stay to be read)."""
    for proc, _, _ in _RUNS.values():
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass


def stop_all():
    for proc, _, log in _RUNS.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)
