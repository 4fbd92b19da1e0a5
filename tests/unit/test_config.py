"""Config: file formats, precedence, and errors that name the field and the allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from knowmap.config import KnowMapConfig, load_config
from knowmap.errors import ConfigError


def test_defaults_run_without_keys_or_network(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    config = load_config()
    assert config.data_dir == tmp_path / "knowmap-data"  # absolute, so actors elsewhere write here too
    assert config.store_uri == str(tmp_path / "knowmap-data" / "experience.db")
    assert config.ray.address == "" and config.llm.base_url == "" and config.models.embedder == ""


def test_yaml_and_toml_files(tmp_path: Path) -> None:
    (tmp_path / "c.yaml").write_text("scienceworld:\n  tasks: [melt]\n  step_limit: 30\n")
    (tmp_path / "c.toml").write_text('[scienceworld]\ntasks = ["freeze"]\n[store]\nflat_max_rows = 5\n')
    assert load_config(tmp_path / "c.yaml").scienceworld.step_limit == 30
    toml = load_config(tmp_path / "c.toml")
    assert toml.scienceworld.tasks == ["freeze"] and toml.store.flat_max_rows == 5


def test_precedence_overrides_then_env_then_file(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("scienceworld:\n  step_limit: 30\n  variations: 4\n")
    monkeypatch.setenv("KNOWMAP_SCIENCEWORLD__STEP_LIMIT", "40")
    config = load_config(path)
    assert (config.scienceworld.step_limit, config.scienceworld.variations) == (40, 4)
    monkeypatch.setenv("KNOWMAP_CONFIG", str(path))
    assert load_config(scienceworld={"step_limit": 50}).scienceworld.step_limit == 50


def test_invalid_values_name_the_field_and_what_is_allowed(monkeypatch) -> None:
    with pytest.raises(ConfigError, match=r"llm\.constraint_style: Input should be 'json_schema', 'llama_cpp_json'"):
        load_config(llm={"constraint_style": "xml"})
    monkeypatch.setenv("KNOWMAP_SCIENCEWORLD__STEP_LIMIT", "-4")
    with pytest.raises(ConfigError, match=r"scienceworld\.step_limit: .*greater than or equal to 1 \(got '-4'\)"):
        load_config()
    monkeypatch.delenv("KNOWMAP_SCIENCEWORLD__STEP_LIMIT")
    with pytest.raises(ConfigError, match=r"unknown simplification\(s\) \['fast'\]; allowed: "):
        load_config(scienceworld={"simplifications": "easy,fast"})
    with pytest.raises(ConfigError, match=r"scienceworld\.stepLimit: Extra inputs are not permitted"):
        load_config(scienceworld={"stepLimit": 3})


def test_ranking_settings_live_in_the_retrieval_section(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("retrieval:\n  hybrid: false\n  rerank_candidates: 7\n  joint_facts: 2\n")
    retrieval = load_config(path).retrieval
    assert (retrieval.hybrid, retrieval.rerank_candidates, retrieval.joint_facts) == (False, 7, 2)
    assert load_config().retrieval.hybrid  # the measured default
    # The keys that moved out of serve say where they went, from a file and from the environment alike.
    path.write_text("serve:\n  hybrid: false\n  rerank_candidates: 7\n")
    with pytest.raises(ConfigError, match=r"serve\.hybrid, serve\.rerank_candidates moved to the retrieval section: "
                                          r"set retrieval\.hybrid \(.*\), retrieval\.rerank_candidates"):
        load_config(path)
    monkeypatch.setenv("KNOWMAP_SERVE__HYBRID_CANDIDATES", "10")
    with pytest.raises(ConfigError, match=r"retrieval\.hybrid_candidates \(KNOWMAP_RETRIEVAL__HYBRID_CANDIDATES\)"):
        load_config()


def test_bad_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "c.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"must end in .yaml, .yml or .toml"):
        load_config(tmp_path / "c.json")
    (tmp_path / "bad.yaml").write_text("scienceworld: [unclosed\n")
    with pytest.raises(ConfigError, match="does not parse"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_round_trips_across_ray_as_a_dict() -> None:
    config = load_config(scienceworld={"tasks": ["boil"]})
    assert KnowMapConfig.model_validate(config.model_dump(mode="json")) == config
