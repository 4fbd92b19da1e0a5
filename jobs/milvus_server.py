"""A Milvus server on this machine: the server path of the vector store (``store.uri: http://...``) without Docker.

The PyPI package ``milvus`` (the ``milvus-server`` extra) ships Milvus standalone as one binary with its own etcd
and local storage. :func:`milvus_server` runs it for the life of a ``with`` block: ``knowmap milvus serve`` for a
laptop whose processes (several Ray nodes, a notebook beside the service) must share one experiential KB, and the
test suite's fixture, which runs the store tests against the server as well as against Milvus Lite. A cluster
runs a real deployment instead (``cluster/README.md``). One such server runs per machine: its embedded etcd's peer
port (2380) is fixed.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from knowmap.errors import KnowMapError

log = logging.getLogger(__name__)
_ETCD_PEER_PORT = 2380  # one embedded server per machine: its etcd always listens here


@contextmanager
def milvus_server(base_dir: str | Path, port: int = 0) -> Iterator[str]:
    """Start a Milvus server keeping its data under ``base_dir``; yields its URI, ``http://127.0.0.1:PORT``.

    Args:
        base_dir: its data, logs and config (kept after it stops: the next start serves the same collections).
        port: the gRPC port; 0 = 19530, or the next free port after it.

    Raises:
        KnowMapError: the ``milvus`` package is not installed, or the server did not start (its log says why).
    """
    try:
        from milvus import MilvusServer
    except ImportError as e:
        raise KnowMapError("the Milvus server needs the `milvus` package: pip install 'knowmap[milvus-server]'") from e
    with socket.socket() as probe:  # the package resolves every port but its embedded etcd's peer port
        if probe.connect_ex(("127.0.0.1", _ETCD_PEER_PORT)) == 0:
            raise KnowMapError(f"port {_ETCD_PEER_PORT} (the embedded etcd's peer port, fixed in the milvus package) "
                               "is taken: another Milvus server runs on this machine; point store.uri at it instead")
    base = Path(base_dir).expanduser().absolute()
    base.mkdir(parents=True, exist_ok=True)
    server = MilvusServer()
    server.set_base_dir(str(base))
    if port:
        server.listen_port = port
    try:
        server.start()  # waits until it answers (up to 180 s; ~10 s here)
    except Exception as e:  # noqa: BLE001 - the package raises bare Exception/TimeoutError alike
        server.stop()
        raise KnowMapError(f"the Milvus server did not start: {e}; see {base / 'logs'}") from e
    uri = f"http://{server.server_address}:{server.listen_port}"
    log.info("Milvus server at %s, data in %s", uri, base)
    try:
        yield uri
    finally:
        server.stop()
