"""The command line as a user runs it: a temporary copy of the project layout, defaults untouched.

`Project` is a fresh folder holding the repository's files (symlinked) and its own `outputs/`,
so `python train.py ...` writes the real run folder `outputs/runs/<run_name>/<time>_<id>`
(real `${unique:}`, real `run_name`), logs CSV + W&B offline (the default logger) and reads
the tokenised corpus from `outputs/cache`, which points at the test session's shared cache.
Its `.venv/bin/python` runs a script in a warm interpreter (`tests.warm_python`): the same
run, without the seconds of imports. `read_metrics` is the one reader of a run's CSV metrics.
"""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.warm_python import SOCKET_ENV, launcher_source

ROOT = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent  # the environment running the tests
# Repository entries a user's clone has besides the code we symlink wholesale.
SKIP = {".git", ".venv", "outputs", "tests", ".pytest_cache", ".ruff_cache", "__pycache__"}
INTERPRETER = re.compile(r"python(3(\.\d+)?)?")  # the names .venv/bin/ gives python


os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# What commands inherit: the session's environment as it starts, not what in-process runs add
# to it later (Lightning's PL_GLOBAL_SEED, W&B's service socket).
SESSION_ENV = dict(os.environ)


def base_env() -> dict[str, str]:
    """The environment of every command: the session's, W&B offline, one thread."""
    env = {**SESSION_ENV, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    return env


def make_venv(venv: Path) -> None:
    """A virtual environment at `venv` over the one running the tests: its `python` the warm
    launcher, its `activate` pointing at itself, the rest linked."""
    (venv / "bin").mkdir(parents=True)
    for entry in (VENV / "bin").iterdir():
        made = venv / "bin" / entry.name
        if INTERPRETER.fullmatch(entry.name):
            made.write_text(launcher_source(sys.executable, str(ROOT / "tests")))
            made.chmod(0o755)
        elif entry.name == "activate":
            made.write_text(entry.read_text().replace(str(VENV), str(venv)))
        else:
            made.symlink_to(entry)
    for name in ("lib", "pyvenv.cfg"):
        (venv / name).symlink_to(VENV / name)


_WARM_SOCKET: list[str] = []
_WARM_SERVER: list[subprocess.Popen] = []  # (held, so it is never collected while it runs)


def warm_socket() -> str:
    """The socket of this test process's warm-python server, started on first use; it ends
    when this process does (its stdin closes). Until it has imported, commands run cold."""
    if not _WARM_SOCKET:
        folder = Path(tempfile.mkdtemp(prefix="advarch-warm-"))
        env = {k: v for k, v in base_env().items() if k != "PYTHONPATH"}
        with (folder / "log").open("wb") as log:
            server = subprocess.Popen(  # noqa: S603
                [sys.executable, str(ROOT / "tests" / "warm_python.py"), str(folder / "socket")],
                env=env, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        make_venv(folder / "venv")  # (its python for `run_python`)
        _WARM_SERVER.append(server)
        _WARM_SOCKET.append(str(folder / "socket"))
    return _WARM_SOCKET[0]


def run_python(
    args: list[str], cwd: Path, timeout: float = 600, warm: bool = True
) -> subprocess.CompletedProcess:
    """`python <script> <args>` from `cwd` outside a project in `base_env()`; `warm=False`: a
    cold interpreter (its own hash seed: for runs whose equality across processes is tested)."""
    env = base_env()
    python = [sys.executable]
    if warm:
        env[SOCKET_ENV] = warm_socket()
        python = [str(Path(env[SOCKET_ENV]).with_name("venv") / "bin" / "python")]
    return subprocess.run(  # noqa: S603
        [*python, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@dataclass
class CliResult:
    """One command's exit code, output and the run folders it created."""

    command: str
    rc: int
    stdout: str
    stderr: str
    new_runs: list[Path] = field(default_factory=list)  # outputs/runs/<run_name>/<time>_<id>
    new_sweeps: list[Path] = field(default_factory=list)  # outputs/multiruns/<time>_<id>

    @property
    def run_dir(self) -> Path:
        """The single run folder this command created."""
        assert len(self.new_runs) == 1, f"{self.command}: new run folders {self.new_runs}"
        return self.new_runs[0]

    @property
    def sweep_dir(self) -> Path:
        """The single multirun folder this command created."""
        assert len(self.new_sweeps) == 1, f"{self.command}: new sweep folders {self.new_sweeps}"
        return self.new_sweeps[0]

    def check(self) -> CliResult:
        """Assert exit 0, showing the end of the output otherwise."""
        assert self.rc == 0, f"{self.command} exited {self.rc}:\n{self.output[-4000:]}"
        return self

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


class Project:
    """A fresh clone's layout in `root`: code symlinked, `outputs/` its own, `.venv` usable."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        for entry in ROOT.iterdir():
            if entry.name not in SKIP and not (root / entry.name).exists():
                (root / entry.name).symlink_to(entry)
        (root / "outputs").mkdir(exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        if not (root / "outputs" / "cache").exists():
            (root / "outputs" / "cache").symlink_to(cache)  # the session's tokenised corpora
        self._make_venv()

    def _make_venv(self) -> None:
        """`.venv` as `make setup` leaves it (installed stamp newer than pyproject.toml)."""
        venv = self.root / ".venv"
        if not venv.exists():
            make_venv(venv)
            (venv / ".installed").touch()

    def env(self, warm: bool = True) -> dict[str, str]:
        """The command's environment; `warm=False`: a cold interpreter, for tests of the
        process itself (its start, kill -9, its pid)."""
        env = base_env()
        env.update(
            PYTHONPATH=str(self.root),  # the clone's own package, as `pip install -e .` gives
            PATH=f"{self.root / '.venv' / 'bin'}:{env.get('PATH', '')}",
        )
        if warm:
            env[SOCKET_ENV] = warm_socket()
        return env

    def runs(self) -> set[Path]:
        return set((self.root / "outputs" / "runs").glob("*/*"))

    def sweeps(self) -> set[Path]:
        return set((self.root / "outputs" / "multiruns").glob("*"))

    def run(self, *args: str, script: str = "train.py", timeout: float = 600) -> CliResult:
        """`python <script> <args>` in the project folder."""
        return self.shell(shlex.join(["python", script, *args]), timeout=timeout)

    def shell(self, command: str, timeout: float = 600) -> CliResult:
        """A shell command line exactly as a user types it, from the project folder."""
        runs, sweeps = self.runs(), self.sweeps()
        done = subprocess.run(
            ["bash", "-c", command],
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        return CliResult(
            command,
            done.returncode,
            done.stdout,
            done.stderr,
            sorted(self.runs() - runs),
            sorted(self.sweeps() - sweeps),
        )


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    """Rows of a run's CSV metrics (latest logger version), empty cells left out."""
    versions = sorted(
        (run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])
    )
    assert versions, f"no csv/version_*/metrics.csv in {run_dir}"
    with versions[-1].open() as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def series(rows: list[dict[str, float]], key: str) -> list[float]:
    """Every logged value of `key`, in order."""
    return [r[key] for r in rows if key in r]
