"""Scenario processes that start as soon as pytest has collected the tests that need them.

Some checks need a process of their own (logical CPUs set before TensorFlow starts, or a
fresh process to compare with). Most of the suite runs in one thread of the pytest process,
so these run on the machine's other core while it does, one at a time, in the order they were
asked for: ``start`` queues one, ``result`` waits for it and reads what it wrote. (Started all at
once, six TensorFlow processes and the suite shared 2 cores, and some tests ran 10-50x slower than
alone.)
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_RUNS: dict = {}  # name -> Run
_QUEUE: list = []  # names not started yet, in order
_LOCK = threading.Condition()
_DIR = None
_STOPPED = False
RUN_LIMIT = 900  # seconds one scenario process may run before it is killed (its result then fails its tests)


class Run:
    def __init__(self, cmd, out, log):
        self.cmd, self.out, self.log = cmd, out, log
        self.proc = None
        self.done = threading.Event()


def _env():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    return env


def start(name, module, *args):
    """Queue ``python -m module OUT.json *args`` once; it runs in the background when those queued before
    it have finished."""
    global _DIR
    with _LOCK:
        if name in _RUNS:
            return
        if _DIR is None:
            _DIR = Path(tempfile.mkdtemp(prefix="gradtrace_scenarios_"))
            threading.Thread(target=_runner, name="gradtrace-scenarios", daemon=True).start()
        out = _DIR / f"{name}.json"
        _RUNS[name] = Run([sys.executable, "-m", module, args[0], str(out), *args[1:]], out, _DIR / f"{name}.log")
        _QUEUE.append(name)
        _LOCK.notify_all()


def _runner():
    while True:
        with _LOCK:
            while not _QUEUE and not _STOPPED:
                _LOCK.wait()
            if _STOPPED:
                return
            run = _RUNS[_QUEUE.pop(0)]
            with open(run.log, "w") as log:
                run.proc = subprocess.Popen(run.cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:  # one that hangs must not keep those queued behind it from running
            run.proc.wait(timeout=RUN_LIMIT)
        except subprocess.TimeoutExpired:
            run.proc.kill()
            run.proc.wait()
        run.done.set()


def result(name, timeout=900):
    """What the scenario ``name`` wrote, once it has finished (asserting it did not crash). ``timeout``
    counts from when it started running (it may wait behind others)."""
    run = _RUNS[name]
    while run.proc is None and not run.done.is_set():
        run.done.wait(1.0)
    assert run.done.wait(timeout), f"scenario {name} did not finish within {timeout} s"
    text = run.log.read_text()
    assert run.out.exists(), f"scenario {name} wrote no result (exit {run.proc.returncode}); its output:\n{text[-4000:]}"
    res = json.loads(run.out.read_text())
    assert "crash" not in res, f"scenario {name} crashed:\n{res['crash']}"
    return res


def wait_all(timeout=1800):
    """Wait until every scenario queued so far has finished (their results stay to be read)."""
    for run in list(_RUNS.values()):
        run.done.wait(timeout)


def stop_all():
    global _STOPPED
    with _LOCK:
        _STOPPED = True
        _LOCK.notify_all()
        running = [r for r in _RUNS.values() if r.proc is not None and r.proc.poll() is None]
    for run in running:
        run.proc.kill()
        run.proc.wait()
    if _DIR is not None:
        shutil.rmtree(_DIR, ignore_errors=True)
