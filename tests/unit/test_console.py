"""Console: a tqdm bar on a terminal, plain lines otherwise, nothing when disabled."""

import fcntl
import io
import os
import pty
import select
import struct
import termios

from unmask.train.console import Console, fmt, fmt_duration

ROW = {"step": 10, "loss": 3.21234, "tokens_per_s": 1534.2, "mfu": 0.0123, "lr": 1e-3, "model_tflops": 0.1}


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    c = Console(100, True, stream=out)
    c.update(ROW)
    c.note("unmask: saved runs/x/step-10")
    c.update({"step": 20, "val_nelbo": 3.1, "val_ppl_bound": 22.2})
    c.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 10/100 loss=3.212 tokens_per_s=1.53k mfu=1.2% lr=0.001 eta=")
    assert lines[1] == "unmask: saved runs/x/step-10"
    assert lines[2] == "step 20/100 val_nelbo=3.1 val_ppl_bound=22.2"


def test_disabled_prints_nothing():
    out = io.StringIO()
    c = Console(100, False, stream=out)
    c.update(ROW)
    c.note("x")
    c.close()
    assert out.getvalue() == ""


def read_all(fd: int) -> str:
    """Everything written so far: one read of a pty may return only part of it (seen under load)."""
    data = b""
    while select.select([fd], [], [], 0.5)[0]:
        data += os.read(fd, 100_000)
    return data.decode()


def test_bar_on_a_terminal():
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    with os.fdopen(slave, "w") as term:
        c = Console(100, True, initial_step=5, stream=term)  # a resumed run starts at step 5
        c.update(ROW)
        c.note("hello")
        c.close()
        term.flush()
        text = read_all(master)
    os.close(master)
    assert "10/100" in text and "loss=3.21" in text and "tok/s=1.53k" in text and "mfu=1.2%" in text
    assert "hello" in text and "<" in text  # tqdm's elapsed<remaining (the ETA)


def test_formats():
    assert fmt("mfu", 0.4) == "40.0%"
    assert fmt("tokens_per_s", 512.4) == "512"
    assert fmt_duration(3725) == "1h02m" and fmt_duration(65) == "1m05s"
    c = Console(10, True, stream=io.StringIO())
    assert c.eta(0) is None and c.eta(5) >= 0
