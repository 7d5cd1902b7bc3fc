"""The signals that stop a run, and requeueing a SLURM job that its scheduler warned of the
end of its time.

SLURM sends a chosen signal before the time limit (`--signal=USR1@<s>`; the submitit launcher
asks for SIGUSR2); a job that saved its state asks to run again and resumes from it.
"""

from __future__ import annotations

import os
import signal
import subprocess

# save and stop; SIGHUP too (a closed terminal, a dropped ssh session), unless the command
# runs under `nohup`, which asks for it to be ignored
HANGUP = () if signal.getsignal(signal.SIGHUP) is signal.SIG_IGN else (signal.SIGHUP,)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, *HANGUP)
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def requeue(signum: int) -> bool:
    """`scontrol requeue` this job where `signum` is SLURM's warning inside a job; whether it
    asked."""
    job = os.environ.get("SLURM_JOB_ID")
    if signum not in REQUEUE_SIGNALS or not job:
        return False
    subprocess.run(["scontrol", "requeue", job], check=False)
    return True
