"""The job console: the process's own output (and its children's) goes to the log file; the job's lines and bars
stay on the terminal; --verbose redirects nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
    import logging, subprocess, sys
    from pathlib import Path
    from knowmap.jobs.console import Console

    with Console(Path(sys.argv[1]), verbose=sys.argv[2] == "1") as console:
        print("library print")
        logging.getLogger("ray").warning("ray INFO line")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child stderr\\\\n')"], check=True)
        console.echo("stage line")
        bar = console.bar("episodes", total=2, unit="episode")
        bar.update(2)
        bar.close()
    print("after the block")
""")


def run(tmp_path: Path, verbose: bool) -> tuple[str, str]:
    log = tmp_path / "logs" / "run.log"
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(log), "1" if verbose else "0"], capture_output=True,
                          text=True, timeout=60, check=True)
    return done.stdout + done.stderr, log.read_text() if log.exists() else ""


def test_console_keeps_the_terminal_for_the_jobs_own_lines(tmp_path: Path) -> None:
    terminal, log = run(tmp_path, verbose=False)
    assert "stage line" in terminal and "episodes" in terminal and "after the block" in terminal
    for noise in ("library print", "ray INFO line", "child stderr"):
        assert noise not in terminal and noise in log
    assert "stage line" in log  # the log tells the whole story


def test_verbose_shows_everything_and_writes_no_log(tmp_path: Path) -> None:
    terminal, log = run(tmp_path, verbose=True)
    for line in ("library print", "ray INFO line", "child stderr", "stage line"):
        assert line in terminal
    assert log == ""
