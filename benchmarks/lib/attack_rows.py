"""The attacks of issue 40 as measured rows of ``benchmarks/service_robustness.py`` (its rows 7-10): all attacks at
once against an innocent tenant, the head and body deadlines, and the goal checks and table rows of these and of
the deletion and MCP probes (:mod:`lib.service_probes`). Imported as ``lib.attack_rows``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
from typing import Any

from knowmap.config import KnowMapConfig
from lib.contribution_attack import contribution_attack
from lib.results import Check
from lib.slow_clients import InnocentProbe, SlowClients, half_header, send_nothing, together


def raise_descriptor_limit() -> int:
    """Raise this process's soft descriptor limit to its hard one (the slow clients hold a socket each; Ray, and
    HAProxy's connection limit, inherit it) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):  # an unlimited hard limit the kernel will not grant as a soft one
        return soft
    return hard


def all_at_once(url: str, keys: dict[str, str], config: KnowMapConfig, args: argparse.Namespace) -> dict[str, Any]:
    """The innocent tenant's retrieves and small contributions (lib.contribution_attack), alone and then while the
    attacker tenant's maximum-size contributions, the slow heads and the slow bodies run, with a new-connection
    probe (``/healthz``, embeddings) beside them."""
    s = config.serve
    slow = SlowClients(url, keys["slow"], headers=args.slow_headers, bodies=args.slow_bodies,
                       head_deadline_s=s.header_timeout_s, body_deadline_s=s.body_timeout_s)
    probe = InnocentProbe(url, keys["innocent"])

    @contextlib.contextmanager
    def alongside() -> Any:
        with slow, probe:
            yield

    row = contribution_attack(url, keys["innocent"], keys["attacker"], parallel=args.parallel,
                              max_steps=s.max_trajectory_steps, max_body_bytes=s.max_body_bytes,
                              max_text_chars=s.max_text_chars, steady_n=args.steady, window_s=args.window,
                              alongside=alongside())
    return {**row, "new_connections": probe.summary(), **slow.results}


def head_deadlines(url: str, config: KnowMapConfig, connections: int) -> dict[str, Any]:
    """Connections that send nothing and half a head, ``connections`` of each at once, against the head deadline."""
    head_s = config.serve.header_timeout_s
    found = asyncio.run(together(send_nothing(url, connections, head_s), half_header(url, connections, head_s)))
    return {r["attack"]: r for r in found}


def attack_checks(attack: dict[str, Any], heads: dict[str, Any], forget: dict[str, Any], ids: dict[str, Any],
                  door: dict[str, Any]) -> list[Check]:
    """The goal checks of issue 40 (rows 7-10 of the module docstring)."""
    failed = attack["innocent_failed"] + attack["new_connections"]["failures"]
    steady_tail = attack["steady_retrieve_p99_ms"] / attack["steady_retrieve_p50_ms"]
    checks = [
        Check("innocent_requests_failed_during_all_attacks", value=failed, goal=0, direction="<=",
              baseline=attack["steady_failed"], result=failed,
              details={"retrieves_and_contributions": attack["innocent_failed"],
                       "new_connections": attack["new_connections"]["failures"]}),
        Check("retrieve_p99_during_all_attacks_vs_steady_p50", value=attack["retrieve_p99_over_steady_p50"],
              goal=3.0, direction="<=", baseline=attack["steady_retrieve_p50_ms"],
              result=attack["attack_retrieve_p99_ms"], details={"steady_p99_over_steady_p50": steady_tail}),
    ]
    for name, row in (("slow_header", attack["slow_header"]), ("send_nothing", heads["send_nothing"]),
                      ("half_header", heads["half_header"]), ("slow_body", attack["slow_body"])):
        checks.append(Check(f"{name}_connections_held_past_deadline_plus_1s", value=row["still_open"], goal=0,
                            direction="<=", baseline=row["connections"], result=row["still_open"],
                            conditions={"0 connections refused or timed out connecting": not row["connect_errors"]},
                            details={"deadline_s": row["deadline_s"],
                                     "close_after_deadline_s": row["close_after_deadline_s"]}))
    checks += [
        Check("deleted_marker_occurrences_in_data_dir", value=forget["left_after_wait"], goal=0, direction="<=",
              baseline=sum(forget["files_before"].values()), result=forget["right_after_delete"],
              conditions={"the DELETE answered 200": forget["delete_status"] == 200,
                          "the marker was on disk before it": bool(forget["files_before"])},
              details={"delete_s": forget["delete_s"], "gone_after_s": forget["gone_after_s"]}),
        Check("mcp_sessions_opened_by_anonymous_initialize", value=door["sessions_opened"], goal=0, direction="<=",
              baseline=door["attempts"], result=door["sessions_opened"],
              conditions={"the service's key opens a session": door["accepted_key_session"]}),
        Check("hostile_ids_sent_by_the_client", value=ids["sent"], goal=0, direction="<=", baseline=ids["calls"],
              result=ids["sent"], conditions={"the trajectory they aim at survives": ids["decoy_survived"]}),
    ]
    return checks


def print_attack_rows(checks: list[Check], attack: dict[str, Any], heads: dict[str, Any], forget: dict[str, Any],
                      door: dict[str, Any]) -> None:
    """Rows 7-10 of the table (``checks`` from :func:`attack_checks`, in its order)."""
    failed, ratio, *deadlines = checks[:6]
    tail = ratio.details["steady_p99_over_steady_p50"]
    print(f"{'innocent requests failed (steady -> all attacks)':<56}{failed.baseline:>10}{failed.result:>10}"
          f"{'':>8}  0 of {attack['attack_retrieves'] + len(attack['attack_small_contribution_ms'])} kept-alive, "
          f"{attack['new_connections']['requests']} new connections "
          f"{attack['new_connections']['failure_kinds'] or ''}")
    print(f"{'retrieve ms (steady p50 -> p99 under all attacks)':<56}{ratio.baseline:>10.1f}{ratio.result:>10.1f}"
          f"{ratio.value:>8.2f}  <= 3.0 (steady p99/p50 of this run, the ceiling: {tail:.2f})")
    print(f"  attacker contributions {attack['attacker_answers']}, stored in {attack['attacker_stored_s'][:4]} s; "
          f"innocent small contributions {attack['attack_small_contribution_ms']} ms "
          f"(steady {attack['steady_small_contribution_ms']})")
    rows = {"slow_header": attack["slow_header"], **heads, "slow_body": attack["slow_body"]}
    for check, (name, row) in zip(deadlines, rows.items(), strict=True):
        lag = row["close_after_deadline_s"] or {}
        print(f"{name + ' held past deadline + 1 s':<56}{check.baseline:>10}{check.result:>10}{'':>8}  0; "
              f"deadline {row['deadline_s']:g} s, closed at {lag.get('p50', float('nan')):+.2f} p50 / "
              f"{lag.get('max', float('nan')):+.2f} max s, {row.get('rounds', 1)} round(s), peak {row['held_peak']} "
              f"open, {row['statuses']}"
              + (f", connect errors {row['connect_errors']}" if row["connect_errors"] else ""))
    deleted, sessions, hostile = checks[6:]
    print(f"{'deleted marker in the data dir (before -> after)':<56}{deleted.baseline:>10}{deleted.result:>10}"
          f"{'':>8}  0; DELETE {forget['delete_status']} in {forget['delete_s']:.2f} s, "
          f"{forget['left_after_wait']} left after {forget['gone_after_s'] or 0:.0f} s more")
    print(f"{'MCP sessions by anonymous initialize (tries -> opened)':<56}{sessions.baseline:>10}"
          f"{sessions.result:>10}{'':>8}  0; {door['statuses']}, the key's: {door['accepted_key_status']}")
    print(f"{'hostile ids sent by the client (calls -> sent)':<56}{hostile.baseline:>10}{hostile.result:>10}{'':>8}"
          f"  0; the aimed-at trajectory survived: {hostile.conditions['the trajectory they aim at survives']}")
