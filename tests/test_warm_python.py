"""The CLI tests' warm interpreter (`tests.warm_python`) runs a script as a fresh `python` would."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli import Project, base_env, warm_socket

PROBE = """\
import json, os, sys
warm = "torch" in sys.modules  # (imported by the server, never by this script)
seed = sys.modules["torch"].initial_seed() if warm else None
print(json.dumps({"warm": warm, "name": __name__, "argv": sys.argv, "path0": sys.path[0],
                  "cwd": os.getcwd(), "executable": sys.executable, "stdin": sys.stdin.read(),
                  "probe": os.environ.get("ADVARCH_PROBE"), "pythonpath": sys.path[1],
                  "file": __file__, "seed": seed}))
sys.stderr.write("to stderr\\n")
sys.exit(int(os.environ.get("ADVARCH_PROBE_EXIT", "0")))
"""


@pytest.fixture
def probe(project: Project) -> Project:
    (project.root / "probe.py").write_text(PROBE)
    deadline = time.monotonic() + 120
    while not Path(warm_socket()).exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # (the server imports torch and Lightning before it listens)
    return project


def run_probe(project: Project, *, env: dict[str, str] | None = None) -> tuple[dict, object]:
    import json

    done = subprocess.run(["python", "probe.py", "a b", "c"], cwd=project.root,
                          env={**project.env(), "ADVARCH_PROBE": "x", **(env or {})}, input="in",
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    return json.loads(done.stdout), done


def test_a_script_runs_warm_as_a_fresh_python_would(probe: Project) -> None:
    seen, done = run_probe(probe)
    assert seen["warm"] and seen["name"] == "__main__"
    assert seen["argv"] == ["probe.py", "a b", "c"] and seen["stdin"] == "in"
    assert seen["path0"] == str(probe.root.resolve()) and seen["cwd"] == str(probe.root)
    assert seen["pythonpath"] == str(probe.root)  # PYTHONPATH, before site-packages
    assert seen["executable"] == str(probe.root / ".venv" / "bin" / "python")
    assert seen["probe"] == "x" and done.stderr == "to stderr\n" and done.returncode == 0
    assert seen["file"] == str(probe.root / "probe.py")  # absolute, as python makes it
    again, done = run_probe(probe, env={"ADVARCH_PROBE_EXIT": "3"})
    assert done.returncode == 3
    assert again["seed"] != seen["seed"]  # torch seeded afresh, as in a new process (review 31)


def test_a_spawned_process_finds_the_script_from_its_own_folder(probe: Project) -> None:
    # multiprocessing's spawn re-imports __main__ from the folder python started in: it was
    # the server's, and a DDP worker ran another copy of train.py (review 31)
    (probe.root / "spawn.py").write_text(
        "import multiprocessing as mp\n"
        "def square(x):\n    return x * x\n"
        "if __name__ == '__main__':\n"
        "    with mp.get_context('spawn').Pool(1) as pool:\n"
        "        print(pool.map(square, [3]))\n"
    )
    done = probe.shell("python spawn.py")
    assert done.rc == 0 and done.stdout == "[9]\n", done.output


def test_a_variable_read_at_import_time_runs_it_cold(probe: Project) -> None:
    seen, done = run_probe(probe, env={"OMP_NUM_THREADS": "2"})  # (read as torch loads)
    assert not seen["warm"] and seen["argv"] == ["probe.py", "a b", "c"] and done.returncode == 0


def test_signals_reach_the_script_and_its_death_is_the_launchers(probe: Project) -> None:
    (probe.root / "wait.py").write_text(
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *_: sys.exit(7))\n"
        "print('ready', flush=True)\ntime.sleep(60)\n"
    )
    for signum, code in [(signal.SIGUSR1, 7), (signal.SIGTERM, -signal.SIGTERM)]:
        proc = subprocess.Popen(["python", "wait.py"], cwd=probe.root, env=probe.env(),
                                stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert proc.stdout.readline() == "ready\n"
        proc.send_signal(signum)
        assert proc.wait(timeout=30) == code


def test_an_uncaught_exception_prints_its_traceback_and_exits_1(probe: Project) -> None:
    (probe.root / "fail.py").write_text("import atexit\natexit.register(print, 'atexit')\n1 / 0\n")
    done = probe.shell("python fail.py")
    assert done.rc == 1 and done.stderr.rstrip().endswith("ZeroDivisionError: division by zero")
    assert done.stderr.count('  File "') == 1  # the script's frame alone, as python shows it
    assert done.stdout == "atexit\n" and os.path.basename(done.command) == "python fail.py"


def test_a_cold_fallback_has_the_environments_packages(probe: Project) -> None:
    # a fallback outside a project (run_python) ran a python without the venv: no torch
    for python, env in [(Path(warm_socket()).with_name("venv") / "bin" / "python", base_env()),
                        (probe.root / ".venv" / "bin" / "python", probe.env())]:  # fmt: skip
        done = subprocess.run([str(python), "-c", "import torch, sys; print(sys.prefix)"],
                              env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == str(python.parent.parent)  # (flags: always cold)
