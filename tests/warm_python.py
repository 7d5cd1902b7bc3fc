"""A warm interpreter for the command-line tests: `python <script> …` without seconds of imports.

A test's `python train.py …` spends about 7 of its 10 seconds importing torch, Lightning, Hydra
and datasets. `serve` imports those libraries once per test process (never advarch) and waits on
a Unix socket. A test project's `.venv/bin/python` is a launcher (`launcher_source`): it hands
the server its arguments, folder, environment and standard streams; the server forks a child
that runs the script as `__main__` as `python <script>` would there (its own `sys.path`,
`sys.argv`, environment, streams; exit code, signals, `atexit`), and the launcher relays the
signals it gets to that child and exits as the child did.

What a fork cannot reproduce runs in a cold interpreter (`exec` of the real python): flags
instead of a script path, an environment that differs in a variable libraries read as they are
imported (`differs`), no server. A fork shares the server's hash seed (torch, numpy and
`random` are reseeded), its umask, limits and niceness, and gets no descriptor above 2; the
script's pid is not the launcher's. So tests of the process itself (signals while it imports,
its pid) and of equality between runs in separate processes ask for a cold interpreter
(`Project.env(warm=False)`, `run_python(warm=False)`).

The launcher runs under `python -IS`, so this module imports nothing beyond the standard library.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys

SOCKET_ENV = "ADVARCH_TEST_WARM_PYTHON"  # the server's socket, for the launcher
# Variables read when a script runs rather than when the preloaded libraries are imported: a
# request may differ from the server's environment in these alone.
RUNTIME_ENV = {
    "PATH", "PYTHONPATH", "PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "PS1", SOCKET_ENV,
    "VIRTUAL_ENV", "VIRTUAL_ENV_PROMPT",  # (`source .venv/bin/activate`)
    "MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES", "ARGS",  # (`make train ARGS=…`)
    "PL_GLOBAL_SEED", "PL_SEED_WORKERS",  # (not LOCAL_RANK &c.: Lightning reads them on import)
}  # fmt: skip
RUNTIME_PREFIXES = ("WANDB_", "PYTEST_", "ADVARCH_")
PRELOAD = [  # what train.py, eval.py and scripts/ import besides advarch itself
    "torch", "lightning.pytorch", "torchmetrics", "omegaconf", "hydra", "hydra.main",
    "hydra.utils", "hydra._internal.utils", "hydra._internal.hydra",
    "hydra._internal.core_plugins.basic_launcher", "hydra._internal.core_plugins.basic_sweeper",
    "hydra.core.override_parser.overrides_parser", "datasets", "rich.console", "rich.progress",
    "rich.table", "matplotlib.figure", "matplotlib.backends.backend_agg", "wandb", "yaml",
]  # fmt: skip
RELAYED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
           signal.SIGUSR2)  # fmt: skip
HEADER = struct.Struct("!Q")  # the request's length


def launcher_source(real_python: str, tests_dir: str) -> str:
    """The `.venv/bin/python` of a test project: warm when it can be, else the real python."""
    return (
        f"#!{real_python} -IS\n"
        f"import sys\nsys.path.insert(0, {tests_dir!r})\n"
        f"from warm_python import launch\nlaunch({real_python!r})\n"
    )


def differs(env: dict[str, str], base: dict[str, str]) -> list[str]:
    """The variables, read at import time, in which `env` differs from the server's `base`."""
    keys = set(env) | set(base)
    import_time = {k for k in keys if k not in RUNTIME_ENV and not k.startswith(RUNTIME_PREFIXES)}
    return sorted(k for k in import_time if env.get(k) != base.get(k))


# --- the launcher ---------------------------------------------------------------------------


def launch(real_python: str) -> None:
    """Run `python <args>` warm through the server, or exec the real python."""
    args = sys.argv[1:]
    path = os.environ.get(SOCKET_ENV)
    if path and args and not args[0].startswith("-") and os.path.isfile(args[0]):
        status = _run_warm(path, args)
        if status is not None:
            _exit_as(status)
    os.execv(real_python, [os.path.abspath(sys.argv[0]), *args])  # (its venv: the project's)


def _run_warm(path: str, args: list[str]) -> int | None:
    """The child's wait status, or None where the server is absent or declines."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
    except OSError:
        return None
    request = json.dumps(
        {
            "args": args,
            "executable": os.path.abspath(sys.argv[0]),
            "cwd": os.getcwd(),
            "env": dict(os.environ),
        }
    ).encode()
    socket.send_fds(conn, [HEADER.pack(len(request))], [0, 1, 2])
    conn.sendall(request)
    child: list[int] = []  # its pid, once known
    held: list[int] = []  # signals that came before it

    def relay(signum: int, _frame: object) -> None:
        if not child:
            held.append(signum)
            return
        with contextlib.suppress(ProcessLookupError):  # (it has just ended)
            os.kill(child[0], signum)

    for signum in RELAYED:
        signal.signal(signum, relay)
    replies = conn.makefile("r")
    first = replies.readline().split()
    if first[:1] != ["pid"]:
        for signum in RELAYED:
            signal.signal(signum, signal.SIG_DFL)
        for signum in held:
            os.kill(os.getpid(), signum)
        return None  # "cold"
    child.append(int(first[1]))
    for signum in held:
        os.kill(child[0], signum)
    last = replies.readline().split()
    if last[:1] != ["exit"]:
        sys.stderr.write("warm python: the server went away\n")
        return 1 << 8
    return int(last[1])


def _exit_as(status: int) -> None:
    """Exit as a child with wait status `status` did: its code, or killed by its signal."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        if signum != signal.SIGKILL:  # (its handler cannot be set, nor need be)
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    os._exit(os.waitstatus_to_exitcode(status))


# --- the server -----------------------------------------------------------------------------


def serve(socket_path: str) -> None:
    """Import PRELOAD, then fork a child for each request on `socket_path`, forever."""
    import importlib
    import shutil

    base_env = dict(os.environ)
    for name in PRELOAD:
        importlib.import_module(name)
    imports_set = {k: v for k, v in os.environ.items() if base_env.get(k) != v}  # (Lightning's)
    base_path = sys.path[1:]  # (this file's folder is the first entry)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the managers
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".new")
    listener.listen(16)
    os.rename(socket_path + ".new", socket_path)  # appears once it accepts
    while True:
        ready, _, _ = select.select([listener, sys.stdin], [], [])
        if sys.stdin in ready:  # the test process that started it has ended
            shutil.rmtree(os.path.dirname(socket_path), ignore_errors=True)  # (socket, log)
            os._exit(0)
        conn, _ = listener.accept()
        sys.stdout.flush()
        sys.stderr.flush()
        if os.fork() == 0:
            listener.close()
            _manage(conn, base_env, imports_set, base_path)
        conn.close()


def _manage(
    conn: socket.socket, base_env: dict[str, str], imports_set: dict[str, str], base_path: list[str]
) -> None:
    """Fork the child for one request, tell the launcher its pid, then its wait status; kill it
    if the launcher goes away (its caller killed it or timed it out)."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    head, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
    (size,) = HEADER.unpack(head)
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:  # the launcher went away mid-request
            os._exit(0)
        data += chunk
    request = json.loads(data)
    if changed := differs(request["env"], base_env):
        print(f"cold: {' '.join(request['args'])}: {', '.join(changed)} differ", flush=True)
        conn.sendall(b"cold\n")
        os._exit(0)
    child = os.fork()
    if child == 0:
        conn.close()
        _run(request, fds, imports_set, base_path)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {child}\n".encode())
    exited = os.pidfd_open(child)
    ready, _, _ = select.select([conn, exited], [], [])
    if exited not in ready:  # the launcher is gone
        os.kill(child, signal.SIGKILL)
    _, status = os.waitpid(child, 0)
    if exited in ready:
        conn.sendall(f"exit {status}\n".encode())
    os._exit(0)


def _run(request: dict, fds: list[int], imports_set: dict[str, str], base_path: list[str]) -> None:
    """Become `python <args>` started in the request's folder, environment and streams, with
    the variables the preloaded imports set, as they would have set them."""
    import atexit
    import builtins
    import importlib
    import importlib.machinery
    import threading
    import types

    for signum in RELAYED + (signal.SIGCHLD,):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    _stdio_as_python_sets_it()
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update({**request["env"], **imports_set})
    script, args = request["args"][0], request["args"]
    extra = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [os.path.dirname(os.path.realpath(script)), *extra, *base_path]
    sys.path_importer_cache.clear()
    importlib.invalidate_caches()
    sys.argv = list(args)
    sys.orig_argv = [request["executable"], *args]
    sys.executable = request["executable"]
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()  # (a fresh process seeds from the OS)
    if "torch" in sys.modules:
        sys.modules["torch"].seed()  # (so does torch's default generator)
    if "multiprocessing.process" in sys.modules:  # (spawn finds __main__ from it)
        sys.modules["multiprocessing.process"].ORIGINAL_DIR = os.getcwd()
    path = os.path.abspath(script)  # (python's __main__.__file__, its code's file name)
    main = types.ModuleType("__main__")
    loader = importlib.machinery.SourceFileLoader("__main__", path)
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins, __loader__=loader)
    sys.modules["__main__"] = main
    code = 0
    try:
        with open(path, "rb") as f:
            source = f.read()
        exec(compile(source, path, "exec", dont_inherit=True), main.__dict__)
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except BaseException as err:  # noqa: BLE001  (python prints it and exits 1, or by SIGINT)
        err.with_traceback(err.__traceback__.tb_next)  # (from the script's frame, as python)
        sys.excepthook(type(err), err, err.__traceback__)
        code = -signal.SIGINT if isinstance(err, KeyboardInterrupt) else 1
    threading._shutdown()  # as the interpreter ends: threads, atexit, the script's objects
    atexit._run_exitfuncs()
    main.__dict__.clear()  # (a file it left open is flushed as it is freed)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            code = code or 120  # python's code when it cannot flush its output
    if code == -signal.SIGINT:  # python ends an uncaught Ctrl-C by the signal itself
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _exit_code(code: object) -> int:
    """Python's exit status for `sys.exit(code)`."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def _stdio_as_python_sets_it() -> None:
    """The server's own stdio objects, now on the request's fds 0-2 (kept, not replaced:
    imports bound logging handlers and W&B's console capture to them), line-buffered where
    python would make them so: a terminal, or stderr (not under `python -u`)."""
    for fd, stream in ((1, sys.stdout), (2, sys.stderr)):
        if not stream.write_through:
            stream.reconfigure(line_buffering=os.isatty(fd) or fd == 2)


if __name__ == "__main__":
    serve(sys.argv[1])
