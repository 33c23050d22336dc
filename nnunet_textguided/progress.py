"""Child commands run with their whole output in a log file and a short account on the terminal (the demo).

What reaches the terminal while a command runs:
- nnU-Net's training epochs, one line each: epoch i/N, train and validation loss, pseudo-Dice per label, the
  epoch's time and an ETA (nnU-Net writes five log lines per epoch; ``EpochSummary`` folds them);
- progress bars (tqdm: extraction, prediction), their latest state at most every ``BAR_INTERVAL_S``;
- nnU-Net's per-case prediction lines;
- otherwise a "still running" line whenever nothing was shown for ``HEARTBEAT_S``, so a person never waits
  more than that without a sign of life.
"""
from __future__ import annotations

import os
import re
import select
import shlex
import subprocess
import time

HEARTBEAT_S = 20.0
BAR_INTERVAL_S = 5.0

_TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: ")
_BAR = re.compile(r"\d+%\|.*\| *\d+/\d+")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


class EpochSummary:
    """Folds nnU-Net's per-epoch log lines into one terminal line (None until an epoch is complete)."""

    def __init__(self, epochs: int | None = None):
        self.epochs, self.current, self.times = epochs, {}, []

    def feed(self, line: str) -> str | None:
        line = _TIMESTAMP.sub("", line).strip()
        if line.startswith("Epoch time:"):
            self.times.append(float(_NUMBER.findall(line)[0]))
            return self._summary()
        for key in ("Epoch ", "train_loss", "val_loss", "Pseudo dice"):
            if line.startswith(key):
                if key == "Epoch ":
                    self.current = {}
                # numpy scalars print as np.float32(0.5): keep the values, not the type names
                values = _NUMBER.findall(line.replace("float32", "").replace("float64", ""))
                self.current[key] = values
        return None

    def _summary(self) -> str:
        c = self.current
        epoch = int(c["Epoch "][0]) + 1 if c.get("Epoch ") else len(self.times)
        parts = [f"epoch {epoch}" + (f"/{self.epochs}" if self.epochs else "")]
        if c.get("train_loss"):
            parts.append(f"train loss {float(c['train_loss'][0]):.3f}")
        if c.get("val_loss"):
            parts.append(f"val loss {float(c['val_loss'][0]):.3f}")
        if c.get("Pseudo dice"):
            parts.append("pseudo-Dice " + " ".join(f"{float(v):.2f}" for v in c["Pseudo dice"]))
        mean = sum(self.times[-5:]) / len(self.times[-5:])
        parts.append(f"{self.times[-1]:.1f} s/epoch")
        if self.epochs:
            parts.append(f"ETA {max(self.epochs - epoch, 0) * mean:.0f} s")
        self.current = {}
        return "  " + ", ".join(parts)


def run_logged(cmd: list[str], env: dict, log, epochs: int | None = None, echo=print,
               timeout: float | None = None) -> int:
    """Run ``cmd`` with stdout and stderr appended to ``log`` (a text file); show the account above through
    ``echo``. Returns the exit code; past ``timeout`` seconds the command is killed (subprocess.TimeoutExpired)."""
    started = time.time()
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    # unbuffered: a Python child writing into a pipe would otherwise hold its lines back in 8 KiB blocks
    proc = subprocess.Popen(cmd, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    fd = proc.stdout.fileno()
    summary, pending, last_shown, last_bar, bar = EpochSummary(epochs), b"", time.time(), 0.0, None
    while True:
        ready, _, _ = select.select([fd], [], [], 1.0)
        now = time.time()
        if timeout is not None and now - started > timeout:
            proc.kill()
            proc.wait()
            raise subprocess.TimeoutExpired(cmd, timeout)
        if ready:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            log.write(chunk.decode(errors="replace"))
            log.flush()
            *lines, pending = re.split(rb"[\r\n]", pending + chunk)
            for raw in lines:
                line = raw.decode(errors="replace").strip()
                shown = summary.feed(line)
                if shown is None and _BAR.search(line):
                    bar = line
                    if now - last_bar >= BAR_INTERVAL_S:
                        shown, last_bar, bar = f"  {line}", now, None
                elif shown is None and line.startswith(("Predicting ", "done with ")):
                    shown = f"  {line}"
                if shown:
                    echo(shown)
                    last_shown = now
        if now - last_shown >= HEARTBEAT_S:
            echo(f"  {bar}" if bar else f"  ... still running ({now - started:.0f} s; output in {log.name})")
            last_shown, bar = now, None
    if bar:
        echo(f"  {bar}")
    return proc.wait()
