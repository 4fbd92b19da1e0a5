"""Test helpers for the vector store's two backends (Milvus Lite and a Milvus server)."""

from __future__ import annotations

from collections.abc import Iterator


def server_database(server_uri: str) -> Iterator[str]:
    """A fresh database on the Milvus server, dropped afterwards: yields its URI (``http://host:port/db``), so
    tests sharing the session's server never see each other's collections."""
    import uuid

    from pymilvus import MilvusClient

    name = f"t{uuid.uuid4().hex[:16]}"
    admin = MilvusClient(uri=server_uri)
    admin.create_database(name)
    try:
        yield f"{server_uri}/{name}"
    finally:
        scoped = MilvusClient(uri=f"{server_uri}/{name}")
        for collection in scoped.list_collections():
            scoped.drop_collection(collection)
        admin.drop_database(name)
