"""Every path under ``data_dir``, in one place: :class:`DataLayout`, reached as ``config.paths``.

A module that reads or writes under the data dir asks the layout for the path instead of joining names itself,
so the tree below is the whole list of what KnowMap keeps on disk::

    <data_dir>/
      env_kb/<env_id>/          one durable env KB per environment instance (snapshot + write-ahead log)
      trajectories/<id>.json    every finished trajectory, expert and agent
      experience.db             the experiential KB (Milvus Lite), unless store.uri names a server
      build_summary.json        what the last build-kb did
      episode_cache/            gold trajectories replayed for training and evaluation
      models/                   fine-tuned embedders and rerankers; models/latest.json the newest
      training/                 pair counts and loss curves of the last `knowmap train`
      retrain/                  the retrain controller: state.json (serving models, decisions), cycle reports
      serve/api_key             the generated API key (mode 0600)
      report/                   the main job's report (Markdown, JSON, plots)
      logs/                     the main job's log file; llm_server.log, the local LLM server's
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict


class DataLayout(BaseModel):
    """The files and folders of one data dir. Paths only: nothing is created here.

    Args:
        root: the data dir (absolute, so actors in other working directories agree on it).
    """

    model_config = ConfigDict(frozen=True)

    root: Path

    @property
    def env_kb(self) -> Path:
        """Env KBs, one folder (snapshot + log) per env id."""
        return self.root / "env_kb"

    @property
    def trajectories(self) -> Path:
        """Finished trajectories as JSON, one file per episode."""
        return self.root / "trajectories"

    def trajectory(self, episode_id: str) -> Path:
        return self.trajectories / f"{episode_id}.json"

    @property
    def experience_db(self) -> Path:
        """The Milvus Lite file of the experiential KB (when ``store.uri`` is empty)."""
        return self.root / "experience.db"

    @property
    def build_summary(self) -> Path:
        return self.root / "build_summary.json"

    @property
    def episode_cache(self) -> Path:
        return self.root / "episode_cache"

    @property
    def models(self) -> Path:
        """Fine-tuned models, one folder each."""
        return self.root / "models"

    @property
    def traced_models(self) -> Path:
        """Embedders traced into TorchScript, one file per version, torch version and device: a process that loads
        a model another one traced skips the trace (:class:`knowmap.models.embedder.Embedder`)."""
        return self.root / "cache" / "traced"

    @property
    def latest_models(self) -> Path:
        """The model registry's record of the newest models (:mod:`knowmap.models.registry`)."""
        return self.models / "latest.json"

    @property
    def training(self) -> Path:
        return self.root / "training"

    @property
    def retrain(self) -> Path:
        """The retrain controller's state and its cycles' pairs, loss curves and reports."""
        return self.root / "retrain"

    @property
    def retrain_state(self) -> Path:
        return self.retrain / "state.json"

    @property
    def api_key(self) -> Path:
        return self.root / "serve" / "api_key"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def llm_log(self) -> Path:
        return self.root / "llm_server.log"
