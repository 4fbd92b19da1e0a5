"""The retrieval service's section of the configuration: where it listens, who may call it, limits, replicas."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from knowmap.config.sections import ConfigSection
from knowmap.tenancy import DEFAULT_TENANT, TENANT_PATTERN, Role


class KeyConfig(ConfigSection):
    """One API key of a tenant: the key itself or its SHA-256 digest (so the config need not hold the secret)."""

    key: str = Field(default="", repr=False, description="the bearer key")
    sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$", description="or the key's SHA-256 hex digest")
    tenant: str = Field(default=DEFAULT_TENANT, pattern=TENANT_PATTERN, description="whose data the key reaches; "
                        "'default' is the deployment's own namespace")
    role: Role = Field(default="write", description="read (retrieve, read facts), write (also add observations, "
                       "facts, trajectories, delete its own), admin (also overwrite or delete any of its tenant's)")

    @model_validator(mode="after")
    def _one_secret(self) -> KeyConfig:
        if bool(self.key.strip()) == bool(self.sha256):
            raise ValueError("give exactly one of key and sha256")
        return self


_MOVED_TO_RETRIEVAL = {"hybrid", "hybrid_candidates", "rerank", "rerank_candidates"}  # serve.* until 0.2


class ServeConfig(ConfigSection):
    """The retrieval service on Ray Serve: where it listens, who may call it, request limits, replicas.

    Authentication is on by default: with no ``api_keys`` configured, ``knowmap serve`` generates one key and keeps
    it in ``<data_dir>/serve/api_key`` (mode 0600), so the service is never left open by accident.
    """

    @model_validator(mode="before")
    @classmethod
    def _moved_to_retrieval(cls, data: Any) -> Any:
        moved = sorted(set(data) & _MOVED_TO_RETRIEVAL) if isinstance(data, dict) else []
        if moved:
            raise ValueError(f"{', '.join('serve.' + m for m in moved)} moved to the retrieval section: set "
                             + ", ".join(f"retrieval.{m} (KNOWMAP_RETRIEVAL__{m.upper()})" for m in moved)
                             + "; the service, the agent, evaluation and the retrain gate all rank with them")
        return data

    host: str = Field(default="127.0.0.1", description="HTTP bind address; 0.0.0.0 exposes the API to the network")
    port: int = Field(default=8000, ge=1, le=65_535)
    api_keys: list[str] = Field(default_factory=list, description="accepted bearer keys of the default tenant "
                                "(admin); with no key configured anywhere, a generated key kept in "
                                "<data_dir>/serve/api_key")
    keys: list[KeyConfig] = Field(default_factory=list, description="keys of tenants, each with its role")
    api_key_file: str = Field(default="", description="file holding accepted keys, one a line: `KEY [TENANT "
                              "[ROLE]]` (default tenant, admin); empty = <data_dir>/serve/api_key")
    public_docs: bool = Field(default=False, description="serve /docs and /openapi.json without a key (the API's "
                              "description only, never data)")
    max_texts: int = Field(default=256, ge=1, le=100_000, description="texts (or documents) per request")
    max_text_chars: int = Field(default=8_192, ge=16, le=1_000_000, description="characters per text")
    max_body_bytes: int = Field(default=4 << 20, ge=1024, description="request body size")
    max_k: int = Field(default=100, ge=1, le=10_000, description="items per KB a retrieve may ask for")
    max_trajectory_steps: int = Field(default=2_000, ge=1, le=100_000)
    max_step: int = Field(default=1_000_000, ge=1, le=2**31 - 1, description="the largest step number an "
                          "observation or trajectory step may carry (ScienceWorld episodes have a few hundred)")
    header_timeout_s: float = Field(default=10.0, gt=0, le=600, description="a connection that has not sent a "
                                    "whole request head this long after connecting (or after its next request's "
                                    "first byte) is answered 408 (HAProxy) or closed (uvicorn), whatever the pace "
                                    "of its bytes: slow heads sent a byte every 10 s filled HAProxy's connection "
                                    "limit without it; read when Ray starts (knowmap.serve.proxy)")
    body_timeout_s: float = Field(default=30.0, gt=0, le=600, description="the whole request body must arrive "
                                  "within this long of its head (not just some byte of it now and then: 70 bodies "
                                  "sent a byte every 8 s held every slot of a replica without it); past it 408 "
                                  "`body_timeout` and the connection closed. 30 s lets a 4 MiB body arrive at "
                                  "140 kB/s")
    drain_s: float = Field(default=30.0, ge=0, le=600, description="a stopping ingress replica (a `knowmap serve "
                           "stop`, a code upgrade, a scale-down) keeps answering this long, so that HAProxy's health "
                           "checks take it out of rotation before it refuses connections; every stop waits it out. "
                           "Ray's RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S (default 30 s; the HAProxy frontend "
                           "only); read when Ray starts (knowmap.serve.proxy)")
    keep_alive_s: int = Field(default=5, ge=1, le=3_600, description="an idle keep-alive connection is closed "
                              "after this long")
    request_timeout_s: float = Field(default=120.0, gt=0, le=3_600, description="every request's deadline once "
                                     "its body is read: past it the route is cancelled and the answer is 504")
    max_env_actors: int = Field(default=32, ge=1, le=100_000, description="env-KB actors the service keeps alive "
                                "(per retriever replica, ~65 MB each); beyond it the least recently used idle one "
                                "is snapshotted and ended, and revived from disk on its next request")
    env_idle_s: float = Field(default=600.0, gt=0, description="an env-KB actor unused this long is ended the "
                              "same way")
    ingress_replicas: int = Field(default=1, ge=1, description="replicas of the HTTP ingress, each with its own "
                                  "embedder (a hop to a separate embedder deployment cost as much as embedding a "
                                  "query here) and its own env-KB actor handles")
    reranker_replicas: int = Field(default=1, ge=1)
    ingress_num_cpus: float = Field(default=1.0, ge=0, description="CPUs reserved per ingress replica (it runs "
                                    "the embedder)")
    reranker_num_cpus: float = Field(default=0.5, ge=0)
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs per ingress (embedder) and reranker replica")
    model_threads: int = Field(default=0, ge=0, le=1024, description="torch threads per embedder and reranker "
                               "replica; 0 = this node's CPU count (torch's default outside Ray: Ray itself would "
                               "give a replica of num_cpus < 2 one thread). Set it to a replica's share of the cores "
                               "when several model replicas share a node. The embedder uses them for calls of 4 "
                               "texts or more (batches under load); smaller calls run on one thread, which waits for "
                               "no second core")
    max_batch_size: int = Field(default=32, ge=1, le=4096, description="requests the embedder/reranker batch "
                                "together (@serve.batch); 1 = no batching")
    batch_wait_timeout_s: float = Field(default=0.0, ge=0, le=10, description="how long a batch waits to fill "
                                        "once the model is idle: what a lone request pays, per model call. 0 still "
                                        "batches: requests that arrive while a batch runs join the next one")
    max_ongoing_requests: int = Field(default=64, ge=1, description="requests in flight per replica")
    max_ongoing_per_key: int = Field(default=16, ge=1, description="requests one API key may have in flight per "
                                     "ingress replica, from its head to its answer; past it 429 `too_many_requests` "
                                     "with Retry-After. A quarter of max_ongoing_requests by default, so one key "
                                     "(slow bodies, or just many requests) leaves three quarters of the slots to "
                                     "the others")
    max_connections: int = Field(default=8_192, ge=64, le=1_000_000, description="HAProxy's connection limit per "
                                 "node (RAY_SERVE_HAPROXY_MAXCONN; HAProxy needs 2.5 file descriptors a connection, "
                                 "so it is lowered to what the node's hard limit allows): "
                                 "connections past it wait unaccepted, innocent ones too. Ray's default, 4,096, was "
                                 "filled by 4,200 slow heads; 8,192 holds the 5,000 the benchmark sends; read when "
                                 "Ray starts (knowmap.serve.proxy)")
    frontend: Literal["haproxy", "serve-proxy"] = Field(
        default="haproxy", description="what takes HTTP connections: `haproxy` (Ray Serve's high-throughput mode: "
        "HAProxy on every node in front of replicas that serve HTTP themselves) or `serve-proxy` (Serve's Python "
        "proxy actor, which hands each request to a replica as an actor call); read when Ray starts "
        "(knowmap.serve.proxy)")
    haproxy_stats_port: int = Field(default=8404, ge=1, le=65_535, description="HAProxy's statistics page, on "
                                    "127.0.0.1 of every node (RAY_SERVE_HAPROXY_STATS_PORT); a second service on "
                                    "one machine needs ports of its own; read when Ray starts")
    haproxy_metrics_port: int = Field(default=9101, ge=1, le=65_535, description="HAProxy's Prometheus exporter, on "
                                      "127.0.0.1 of every node (RAY_SERVE_HAPROXY_METRICS_PORT); read when Ray starts")
    contribution_workers: int = Field(default=2, ge=1, le=64, description="experiential-KB writes "
                                      "(contributions, deletions) that run at once per ingress replica, and threads "
                                      "of the experiential-KB actor's write group. A tenant runs one write at a "
                                      "time, so with 2 or more one busy tenant never holds them all: measured, 4 "
                                      "parallel 2,000-step trajectories of one tenant behind one lock made another "
                                      "tenant's 2-step one wait 120 s (issue 40); more than the cores only slices "
                                      "them thinner")
    contribution_queue_per_tenant: int = Field(default=4, ge=1, le=10_000, description="writes one tenant may have "
                                               "queued or running per replica; one more is answered 429 with "
                                               "Retry-After (the recent duration of its writes), not queued "
                                               "without bound")
    contribution_queue_total: int = Field(default=64, ge=1, le=100_000, description="writes all tenants may have "
                                          "queued or running per replica (429 beyond); at least "
                                          "contribution_queue_per_tenant")
    contribution_timeout_s: float = Field(default=60.0, gt=0, le=3_600, description="a write not begun this long "
                                          "after it arrived (waiting for its turn, segmenting) is cancelled and "
                                          "answered 504: nothing is stored. A begun write is awaited to its end "
                                          "(a 2,000-step one embeds in seconds to tens of seconds on 2 cores), so it "
                                          "must be below request_timeout_s")

    @model_validator(mode="after")
    def _limits(self) -> ServeConfig:
        ports = {"serve.port": self.port, "serve.haproxy_stats_port": self.haproxy_stats_port,
                 "serve.haproxy_metrics_port": self.haproxy_metrics_port}
        if len(set(ports.values())) < len(ports):
            raise ValueError("serve.port, serve.haproxy_stats_port and serve.haproxy_metrics_port must differ, got "
                             + ", ".join(f"{k}={v}" for k, v in ports.items()))
        if self.contribution_queue_total < self.contribution_queue_per_tenant:
            raise ValueError(f"serve.contribution_queue_total ({self.contribution_queue_total}) must be at least "
                             f"serve.contribution_queue_per_tenant ({self.contribution_queue_per_tenant})")
        if self.contribution_timeout_s >= self.request_timeout_s:
            raise ValueError(f"serve.contribution_timeout_s ({self.contribution_timeout_s}) must be below "
                             f"serve.request_timeout_s ({self.request_timeout_s}): a begun write needs the rest of "
                             "the request's time to finish")
        return self
