"""The HTTP routes, the typed client and the MCP tools cover the same operations: a route added to one and not the
others fails here (read from the OpenAPI schema and the MCP server's tool list, nothing started)."""

from __future__ import annotations

import asyncio

from knowmap.serve.api import app
from knowmap.serve.client import KnowMapClient
from knowmap.serve.mcp_tools import build_mcp_server

# (method, path) -> (client method, MCP tool or None where an MCP tool makes no sense)
SURFACE = {
    ("GET", "/healthz"): ("health", None),
    ("GET", "/readyz"): ("ready", None),
    ("POST", "/v1/embeddings"): ("embed", "embed"),
    ("POST", "/v1/rerank"): ("rerank", "rerank"),
    ("GET", "/v1/models"): ("models", "models"),
    ("POST", "/v1/retrieve"): ("retrieve", "retrieve"),
    ("GET", "/v1/envs"): ("envs", "list_envs"),
    ("DELETE", "/v1/envs/{env_id}"): ("delete_env", "delete_env"),
    ("POST", "/v1/envs/{env_id}/observations"): ("add_observations", "add_observations"),
    ("POST", "/v1/envs/{env_id}/facts"): ("add_facts", "add_facts"),
    ("GET", "/v1/envs/{env_id}/facts"): ("facts", "facts"),
    ("GET", "/v1/envs/{env_id}/facts/history"): ("history", "fact_history"),
    ("POST", "/v1/trajectories"): ("add_trajectory", "contribute_trajectory"),
    ("GET", "/v1/trajectories"): ("trajectories", "list_trajectories"),
    ("DELETE", "/v1/trajectories/{episode_id}"): ("delete_trajectory", "delete_trajectory"),
}


def test_every_route_has_a_client_method_and_an_mcp_tool() -> None:
    routes = {(method.upper(), path) for path, methods in app.openapi()["paths"].items() for method in methods}
    assert routes == set(SURFACE)
    assert all(callable(getattr(KnowMapClient, method, None)) for method, _ in SURFACE.values())
    tools = {t.name for t in asyncio.run(build_mcp_server("http://127.0.0.1:1", "k").list_tools())}
    assert tools == {tool for _, tool in SURFACE.values() if tool}
