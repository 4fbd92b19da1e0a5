"""What a long job shows on the terminal: its own lines and a progress bar per stage; everything else to a log file.

A job on Ray prints a lot that is not meant for a person at the terminal: Ray's INFO lines from the driver and
from every worker (``log_to_driver``), Serve's, Ray Train's, weight-loading bars, the llama.cpp server's output.
:class:`Console` sends all of it, at the file-descriptor level (so child processes and C libraries follow), to a
log file, and keeps the terminal for the job's stage lines, progress bars and final table. With ``verbose`` it
redirects nothing and the terminal shows everything, as before.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from tqdm import tqdm


class Console:
    """The terminal of a job, with the process's own output sent to ``log_file`` (unless ``verbose``).

    Use as a context manager; :meth:`echo` and :meth:`bar` write to the terminal inside and outside it.

    Args:
        log_file: where stdout and stderr of this process (and of the processes it starts) go; None or
            ``verbose`` = nowhere else, the terminal shows them.
        verbose: show everything on the terminal.
    """

    def __init__(self, log_file: Path | None = None, *, verbose: bool = False) -> None:
        self.log_file = None if verbose else log_file
        self._saved: tuple[int, int] | None = None
        self._out: IO[str] = sys.stdout

    def __enter__(self) -> Console:
        if self.log_file is None:
            return self
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = (os.dup(1), os.dup(2))
        self._out = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)
        log = os.open(self.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is None:
            return
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(self._saved[0], 1)
        os.dup2(self._saved[1], 2)
        for fd in self._saved:
            os.close(fd)
        self._saved = None
        self._out.close()
        self._out = sys.stdout

    def echo(self, text: str) -> None:
        """A line on the terminal (and, when logging to a file, in the file too, to keep its story whole)."""
        print(text, file=self._out, flush=True)
        if self._saved is not None:
            print(text, flush=True)

    @staticmethod
    def episode_progress(bar: Any) -> Callable[[Any, int, int], None]:
        """A build-kb ``on_episode`` callback that moves ``bar`` one episode on, naming what it did."""
        def advance(episode: Any, number: int, total: int) -> None:
            bar.total = total
            bar.set_postfix_str(f"{episode.task}/{episode.variation}: {episode.steps} steps, {episode.facts} facts, "
                                f"{episode.subgoals} sub-goals")
            bar.update(1)
        return advance

    def bar(self, desc: str, total: int | None = None, unit: str = "it") -> Any:
        """A progress bar on the terminal: ``update(n)``, ``set_postfix_str(s)``, ``close()``."""
        return tqdm(total=total, desc=desc, unit=unit, file=self._out, leave=True, dynamic_ncols=True)
