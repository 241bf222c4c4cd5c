"""Named fault points, so crash and preemption tests are deterministic instead of racing a timer.

`UNMASK_FAULTS="POINT@STEP=ACTION[,...]"` (read at each point; unset in normal runs, where a point costs one
dictionary lookup). Points:
- `step.end`: after a training step's logging and validation, before the preemption check and the save;
- `save.written`: inside a checkpoint save, every file written but the folder not yet renamed into place.
Actions:
- `kill`: SIGKILL this process (what an OOM killer or a lost node does);
- `term`: SIGTERM this process (what SLURM and torchrun send before a kill): the preemption handler runs;
- `pause`: print `unmask: fault: paused at POINT@STEP` and wait for SIGTERM/SIGUSR1/SIGINT (a test sends one).
`POINT@STEP:RANK=ACTION` limits a fault to one global rank.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "UNMASK_FAULTS"
POINTS = ("step.end", "save.written")
ACTIONS = ("kill", "term", "pause")


def parse(spec: str) -> dict[tuple[str, int, int | None], str]:
    """"step.end@3=term,save.written@5:1=kill" -> {(point, step, rank or None): action}."""
    faults = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        where, _, action = item.partition("=")
        point, _, at = where.partition("@")
        step, _, rank = at.partition(":")
        if point not in POINTS or action not in ACTIONS or not step.isdigit() or (rank and not rank.isdigit()):
            raise ValueError(f"{ENV}={spec!r}: {item!r} is not POINT@STEP[:RANK]=ACTION with POINT in {list(POINTS)}"
                             f" and ACTION in {list(ACTIONS)}")
        faults[(point, int(step), int(rank) if rank else None)] = action
    return faults


def hit(point: str, step: int) -> None:
    """Run the fault configured for `point` at `step` on this rank, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    faults = parse(spec)
    rank = int(os.environ.get("RANK", "0"))
    action = faults.get((point, step, rank)) or faults.get((point, step, None))
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "term":
        os.kill(os.getpid(), signal.SIGTERM)
    elif action == "pause":
        pause_until_signal(f"unmask: fault: paused at {point}@{step}")


def pause_until_signal(message: str) -> None:
    """Print `message`, then wait for SIGTERM, SIGUSR1 or SIGINT and pass it to the handler in place. The waiting
    handler is installed before the message, so a signal sent as soon as it is read is never lost."""
    got: list[int] = []
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}

    def note(signum, frame):
        got.append(signum)
        if callable(previous[signum]):
            previous[signum](signum, frame)

    for s in previous:
        signal.signal(s, note)
    print(message, flush=True)
    while not got:
        time.sleep(0.01)
    for s, handler in previous.items():
        signal.signal(s, handler)
