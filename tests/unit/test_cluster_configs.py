"""The `ray up` configs in cluster/ pass Ray's own cluster-config validation and agree with KnowMap's config."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from knowmap.config import load_config

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
CONFIGS = sorted(CLUSTER.glob("*.yaml"))
RAY_UP_CONFIGS = [p for p in CONFIGS if p.name != "knowmap.yaml"]


def ray_up_config(path: Path) -> dict:
    """What `ray up` validates: the file merged with the provider's defaults."""
    return prepare_config(copy.deepcopy(yaml.safe_load(path.read_text())))


def test_there_is_a_config_per_cloud() -> None:
    assert {p.stem for p in RAY_UP_CONFIGS} >= {"aws", "gcp"}


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_ray_up_config_is_valid(path: Path) -> None:
    validate_config(ray_up_config(path))  # raises jsonschema.ValidationError with the offending field


def test_validation_rejects_a_typo() -> None:
    config = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    config["available_node_types"]["rollout"]["min_wrkers"] = 1
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_custom_resources_knowmap_asks_for_exist_and_the_package_is_installed(path: Path) -> None:
    cluster = ray_up_config(path)
    knowmap = load_config(CLUSTER / "knowmap.yaml")
    offered = {name for node in cluster["available_node_types"].values() for name in node.get("resources", {})}
    asked = set(knowmap.ray.agent_resources) | set(knowmap.training.worker_resources)
    assert asked and asked <= offered, f"{path.name} offers {sorted(offered)}, knowmap.yaml asks for {sorted(asked)}"
    assert knowmap.ray.address == "auto" and knowmap.store.uri.startswith("http")
    setup = " ".join(cluster["setup_commands"])
    assert "pip install -q -e /home/ray/knowmap" in setup and "torch==2.13.0" in setup and "openjdk-17" in setup
    assert "/home/ray/knowmap" in cluster["file_mounts"]


@pytest.mark.parametrize("path", RAY_UP_CONFIGS, ids=lambda p: p.name)
def test_every_node_starts_ray_with_the_services_environment(path: Path) -> None:
    cluster = ray_up_config(path)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = " ".join(cluster[key])
        assert 'eval "$(knowmap config --ray-env)"' in start and start.index("--ray-env") < start.index("ray start")


def test_ray_env_prints_the_frontend_of_the_cluster_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from knowmap.jobs.cli import app
    from knowmap.serve.proxy import proxy_environment

    monkeypatch.setenv("KNOWMAP_CONFIG", str(CLUSTER / "knowmap.yaml"))
    result = CliRunner().invoke(app, ["config", "--ray-env"])
    assert result.exit_code == 0, result.output
    exported = dict(line.removeprefix("export ").split("=", 1) for line in result.output.splitlines())
    config = load_config(CLUSTER / "knowmap.yaml")
    assert exported == proxy_environment(config) and exported["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
    assert config.serve.host == "0.0.0.0"  # HAProxy on one node reaches ingress replicas on the others
