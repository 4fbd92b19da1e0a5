"""Tenants' namespaces and what a tenant may see, as pure logic (the store applies the filter in
tests/integration/test_experience_kb.py, the service in tests/serve/test_tenants.py)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from knowmap.api_schemas import TrajectoryRequest
from knowmap.errors import KnowMapError
from knowmap.kb.store_rows import build_filter
from knowmap.tenancy import allows, check_tenant, experience_filter, owns, scoped, unscoped


def test_ids_are_scoped_by_tenant_and_no_client_id_reaches_another_namespace() -> None:
    assert scoped("default", "env-1") == "env-1" and scoped("acme", "env-1") == "acme@env-1"
    assert unscoped("acme", "acme@env-1") == "env-1" and unscoped("beta", "acme@env-1") == "acme@env-1"
    assert owns("acme", "acme@env-1") and not owns("beta", "acme@env-1") and not owns("acme", "env-1")
    assert owns("default", "env-1") and not owns("default", "acme@env-1")
    assert not owns("acme", "acme-2@env-1")  # a tenant whose name extends another's is not it


def test_roles_are_ordered_and_tenant_names_checked() -> None:
    assert allows("admin", "write") and allows("write", "read") and not allows("read", "write")
    assert not allows("", "read") and not allows("root", "read")
    assert check_tenant("acme-2") == "acme-2"
    for bad in ("", "Acme", "a@b", "-x", "x" * 33, None):
        with pytest.raises(KnowMapError, match="invalid tenant name"):
            check_tenant(bad)


def test_the_visibility_filter_never_names_another_tenant() -> None:
    assert build_filter(experience_filter("acme")) == (
        '((source == "expert") or (meta["tenant"] == "") or (source == "agent" and meta["tenant"] == "acme"))')
    assert build_filter(experience_filter("acme", owner="mine", source="agent", split="train")) == (
        '((source == "agent" and meta["tenant"] == "acme")) and source == "agent" and meta["split"] == "train"')
    assert build_filter(experience_filter("acme", owner="shared")) == (
        '((source == "expert") or (meta["tenant"] == ""))')
    injected = build_filter(experience_filter('beta" or meta["tenant"] == "acme'))
    assert 'meta["tenant"] == "acme"' not in injected  # the quote is escaped: one string value, not a clause


def test_episode_ids_are_trimmed_and_lower_cased_before_any_check() -> None:
    body = {"trajectory": {"episode_id": "  Boil-Train-0 ", "task": "boil", "variation": 0, "split": "train"}}
    assert TrajectoryRequest.model_validate(body).trajectory.episode_id == "boil-train-0"
    for bad in ("a b", "x@y", "..", "../up"):
        with pytest.raises(ValidationError, match="cannot name a stored trajectory"):
            TrajectoryRequest.model_validate({"trajectory": {**body["trajectory"], "episode_id": bad}})
