"""The baseline a user would write instead of Ray Serve: the same retrieval pipeline behind one FastAPI/uvicorn process.

One process holds the embedder and the :class:`~knowmap.models.retrieval.Retriever` (hybrid, as the service's
default) and answers ``POST /v1/retrieve`` (the same request schema and bearer key as the service); the env-KB and
experiential-KB actors are the same ones the service uses (a Milvus Lite file admits one process, so a monolith on
this store reaches it the same way). No batching, no replicas: FastAPI runs each request in its thread pool.

Started by ``benchmarks/serve_latency.py`` as a subprocess:

    python benchmarks/monolith_service.py --port P --address RAY_ADDRESS --namespace NS --config-json '{...}' --key K

No ``from __future__ import annotations``: FastAPI reads the route's annotations, defined inside ``main``.
"""

import argparse
import hmac
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pipeline(config: object) -> tuple[object, object]:
    """``(retriever, embedder)``: the service's retrieval pipeline in this process, on this Ray's KB actors: the
    embedder (the one model thread count the service's replica gets), hybrid fusion as configured. The
    benchmark's in-process baseline is the same object. Needs ``ray.init`` first."""
    import ray

    from knowmap.actors.env_kb import get_or_create_env_kb
    from knowmap.actors.experience import get_experience_kb
    from knowmap.models.embedder import Embedder
    from knowmap.models.retrieval import Retriever
    from knowmap.schemas import Fact, KnowledgeItem
    from knowmap.serve.deployments import use_model_threads

    use_model_threads(0)  # torch's own default, as a user's process gets it: every core (not the service's setting)
    embedder = Embedder("", device=config.models.device, batch_size=config.models.batch_size)
    experience = get_experience_kb(config)
    envs: dict[str, object] = {}  # env id -> its actor's handle

    def env_facts(env_id: str, step: int | None) -> list[Fact]:
        env = envs.get(env_id) or envs.setdefault(env_id, get_or_create_env_kb(env_id, config))
        rows = ray.get(env.current.remote() if step is None else env.as_of.remote(step))
        return [Fact.model_validate(r) for r in rows]

    def search(vector: object, k: int, task: str | None, where: dict | None) -> list[KnowledgeItem]:
        rows = ray.get(experience.search_vector.remote(vector, k, task, embedder.version, where=where))
        return [KnowledgeItem.model_validate(r) for r in rows]

    retriever = Retriever(embedder.encode, env_facts=env_facts, experience=search, settings=config.retrieval)
    return retriever, embedder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--address", required=True, help="the Ray cluster whose KB actors to use")
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--config-json", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args()

    import ray
    import uvicorn
    from fastapi import FastAPI, Header, HTTPException

    from knowmap.api_schemas import RetrieveRequest, RetrieveResponse
    from knowmap.config import KnowMapConfig
    from knowmap.tenancy import experience_filter

    config = KnowMapConfig.model_validate(json.loads(args.config_json))
    ray.init(address=args.address, namespace=args.namespace, log_to_driver=False)
    retriever, embedder = pipeline(config)
    app = FastAPI()

    @app.post("/v1/retrieve", response_model=RetrieveResponse)
    def retrieve(body: RetrieveRequest, authorization: str = Header(default="")) -> RetrieveResponse:
        if not hmac.compare_digest(authorization.encode(), f"Bearer {args.key}".encode()):
            raise HTTPException(401, "missing or wrong API key")
        items = retriever.retrieve(body.query, env_id=body.env_id, task=body.task, k=body.k, kbs=body.kbs,
                                   step=body.as_of_step, hybrid=body.hybrid,
                                   where=experience_filter("default", owner=body.owner, source=body.source,
                                                           split=body.split))
        return RetrieveResponse(items=items, embedder=embedder.version)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
