"""A deployment's code version covers every module its replicas run: a change in any subpackage (``knowmap/models``,
``knowmap/kb``, one added later) restarts the replicas, while unchanged code keeps the version (no Ray)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from knowmap.serve import app
from knowmap.serve.app import source_digest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A small package tree: a top-level module and two subpackages."""
    for relative, text in {"__init__.py": "", "config.py": "A = 1\n", "models/__init__.py": "",
                           "models/retrieval.py": "def rank(): return 1\n", "kb/store.py": "ROWS = []\n"}.items():
        path = tmp_path / "knowmap" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "serve").mkdir()
    (tmp_path / "serve" / "api.py").write_text("ROUTES = []\n")
    return {"knowmap": tmp_path / "knowmap", "knowmap.serve": tmp_path / "serve"}


def test_a_change_in_a_subpackage_module_changes_the_digest(tree: dict[str, Path]) -> None:
    before = source_digest(tree)
    assert source_digest(tree) == before  # the same code: the same version, the replicas are reconfigured
    retrieval = tree["knowmap"] / "models" / "retrieval.py"
    retrieval.write_text("def rank(): return 2\n")
    changed = source_digest(tree)
    assert changed != before
    retrieval.write_text("def rank(): return 1\n")
    assert source_digest(tree) == before


def test_a_new_subpackage_a_renamed_module_and_moved_bytes_change_the_digest(tree: dict[str, Path]) -> None:
    before = source_digest(tree)
    judge = tree["knowmap"] / "evaluation" / "judge.py"
    judge.parent.mkdir()
    judge.write_text("GOLD = 1\n")
    assert source_digest(tree) != before
    judge.unlink()
    assert source_digest(tree) == before
    shutil.move(tree["knowmap"] / "kb" / "store.py", tree["knowmap"] / "kb" / "rows.py")
    assert source_digest(tree) != before  # same bytes under another name
    shutil.move(tree["knowmap"] / "kb" / "rows.py", tree["knowmap"] / "kb" / "store.py")
    (tree["knowmap"] / "config.py").write_text("")
    (tree["knowmap"] / "__init__.py").write_text("A = 1\n")
    assert source_digest(tree) != before  # the same bytes in other files


def test_files_other_than_python_sources_do_not_change_the_digest(tree: dict[str, Path]) -> None:
    before = source_digest(tree)
    (tree["knowmap"] / "models" / "__pycache__").mkdir()
    (tree["knowmap"] / "models" / "__pycache__" / "retrieval.cpython-311.pyc").write_bytes(b"\0compiled")
    (tree["knowmap"] / "README.md").write_text("notes\n")
    assert source_digest(tree) == before


def test_a_file_under_two_roots_counts_once(tree: dict[str, Path]) -> None:
    # An installed knowmap/ holds serve/ too: hashing both roots must give what one root gives.
    nested = tree["knowmap"] / "serve"
    shutil.copytree(tree["knowmap.serve"], nested)
    assert source_digest({"knowmap": tree["knowmap"], "knowmap.serve": nested}) == source_digest(
        {"knowmap": tree["knowmap"]})


def test_the_deployment_version_hashes_every_module_of_the_service_packages(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[dict[str, Path]] = []

    def recording(roots: dict[str, Path]) -> str:
        seen.append(roots)
        return source_digest(roots)

    monkeypatch.setattr(app, "source_digest", recording)
    version = app._code_version("Ingress", 1, 0.5)
    assert version == app._code_version("Ingress", 1, 0.5) != app._code_version("Ingress", 2, 0.5)
    hashed = {p.resolve() for root in seen[0].values() for p in root.rglob("*.py")}
    for folder in ("knowmap", "actors", "serve"):  # the folders of knowmap, knowmap.actors, knowmap.serve
        modules = set((ROOT / folder).rglob("*.py"))
        assert modules and {p.resolve() for p in modules} <= hashed, folder
    assert (ROOT / "knowmap" / "models" / "retrieval.py").resolve() in hashed
    assert (ROOT / "knowmap" / "kb" / "experience_versions.py").resolve() in hashed
