"""One bad client cannot hurt the others: isolation, body limits, timeouts, and readers during a big contribution.

Against a service on 127.0.0.1 (a local Ray, data in a temporary directory), each measurement with its baseline:

1. **Mixed batches**: 40 embedding requests with 3 unencodable ones (a lone surrogate) among them, and 30 retrieves
   with 2, at concurrency 16, ``--trials`` times; baseline: the same normal requests alone. Goal: 0 normal failed.
2. **Fuzz interleaved with normal traffic**: schemathesis cases (valid and invalid) for every operation of the
   OpenAPI schema, while 4 clients send normal retrieve, embedding and observation requests. Goal: 0 normal
   requests failed, 0 fuzz 5xx.
3. **Body limits**: over ``serve.max_body_bytes`` declared, declared with a trailing space, and chunked (no
   length). Goal: none accepted.
4. **Timeouts**: a connection that sends nothing, half a request head, a body that stops, and an idle kept-alive
   one; seconds each is held against its configured timeout (a head's, behind HAProxy: HAProxy's client timeout,
   ``knowmap.serve.proxy.client_timeout``). Goal: none held past it (+1 s).
5. **Readers during a maximum-size contribution**: ``/v1/retrieve`` latency, one client, steady against while a
   ``serve.max_trajectory_steps`` trajectory whose score rises at every step (observations filling the body
   limit) is contributed. Goal: p99 during <= 3 x steady p50.
6. **Log per 4xx**: bytes and lines the service's logs grow per refused request, against per accepted one.
7. **All attacks at once** (issue 40): ``--slow-headers`` (5,000) connections sending a head a byte every 10 s (no
   key), 200 bodies sent a byte every 8 s (a read key of another tenant) and 8 parallel maximum-size
   contributions (a write key of a third tenant), each kept up round after round, while an innocent client
   times ``/v1/retrieve`` and small contributions (kept-alive) and ``/healthz`` and embeddings (a new
   connection each). Goal: 0 innocent requests failed; retrieve p99 during the attack <= 3 x steady p50, with
   the steady p99 / p50 of the same run beside it (the machine's own tail: a ceiling no attack-free run beats).
8. **Deadlines**: every slow head, connection that sent nothing and half head (against
   ``serve.header_timeout_s``) and every slow body (against ``serve.body_timeout_s``) closed within 1 s of its
   deadline. Goal: 0 held longer.
9. **Deletion**: a unique marker's bytes in the data dir after ``DELETE /v1/trajectories/{id}`` returned.
   Goal: 0 (seconds the DELETE took beside it).
10. **MCP**: sessions opened by anonymous ``initialize`` requests; hostile ids (``../trajectories/x``) that reach
    a URL of the typed client the MCP tools call. Goal: 0 and 0.

The service runs with the configured defaults (head 10 s, body 30 s) unless ``--header-timeout-s`` /
``--body-timeout-s`` say otherwise, behind ``--frontend`` (``haproxy``, the default deployment, or
``serve-proxy``). Prints a table and writes ``benchmarks/results/service_robustness.json``.

    .venv/bin/python benchmarks/service_robustness.py [--frontend serve-proxy] [--slow-headers 5000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ray
import requests
from lib.attack_rows import all_at_once, attack_checks, head_deadlines, print_attack_rows, raise_descriptor_limit
from lib.results import Check, write_result
from lib.service import FIXTURES, local_service, pct
from lib.service_probes import deletion, hostile_ids, mcp_door

from knowmap.config import KnowMapConfig
from knowmap.config.service import ServeConfig
from knowmap.serve.client import KnowMapClient

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "service_robustness.json"
SERVE_DEFAULTS = ServeConfig.model_fields
BAD = {"input": ["\ud800"]}  # json.dumps escapes it: valid JSON, not Unicode


class Service:
    def __init__(self, url: str, key: str) -> None:
        self.url, self.key = url, key
        self.session = threading.local()

    def post(self, path: str, body: Any, timeout: float = 120) -> requests.Response:
        session = getattr(self.session, "s", None) or requests.Session()
        self.session.s = session
        return session.post(self.url + path, data=json.dumps(body), timeout=timeout,
                            headers={"Authorization": f"Bearer {self.key}", "Content-Type": "application/json"})


def populate(service: Service) -> None:
    records = json.loads((FIXTURES / "observations.json").read_text())["records"]
    observations = [{k: r[k] for k in ("step", "action", "text", "look", "inventory")} for r in records
                    if r["task"] == "boil" and r["variation"] == 0]
    assert service.post("/v1/envs/bench-boil/observations", {"observations": observations}).status_code == 200
    for path in sorted((FIXTURES / "trajectories").glob("*.json")):
        trajectory = json.loads(path.read_text())
        trajectory["episode_id"] = "bench-" + trajectory["episode_id"]
        assert service.post("/v1/trajectories", {"trajectory": trajectory}).status_code == 200


def mixed_batches(service: Service, trials: int) -> dict[str, Any]:
    normal_embed = [("/v1/embeddings", {"input": [f"heat the water {i}"]}) for i in range(40)]
    normal_retrieve = [("/v1/retrieve", {"query": f"boil water {i}", "env_id": "bench-boil", "k": 3})
                       for i in range(30)]
    bad = [("/v1/embeddings", BAD)] * 3 + [("/v1/retrieve", {"query": "\ud800 boil", "k": 3})] * 2
    out: dict[str, Any] = {"baseline_failed": 0, "mixed_failed": 0, "bad_statuses": [], "normal": 0}
    for _ in range(trials):
        for mixed in (False, True):
            work = normal_embed + normal_retrieve
            if mixed:  # the bad ones spread through the normal ones
                for i, item in enumerate(bad):
                    work.insert(7 + 13 * i, item)
            with ThreadPoolExecutor(16) as pool:
                statuses = list(pool.map(lambda w: service.post(*w).status_code, work))
            normal = [s for w, s in zip(work, statuses, strict=True) if w not in bad]
            out["normal"] += len(normal) if mixed else 0
            out["mixed_failed" if mixed else "baseline_failed"] += sum(s != 200 for s in normal)
            if mixed:
                out["bad_statuses"] += [s for w, s in zip(work, statuses, strict=True) if w in bad]
    return out


def fuzz_interleaved(service: Service, examples: int) -> dict[str, Any]:
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    headers = {"Authorization": f"Bearer {service.key}"}
    spec = requests.get(service.url + "/openapi.json", headers=headers, timeout=30).json()
    schema = schemathesis.openapi.from_dict(spec)
    stop = threading.Event()
    normal = {"sent": 0, "failed": 0, "failures": []}

    def traffic(worker: int) -> None:
        step = 0
        while not stop.is_set():
            for path, body in (("/v1/retrieve", {"query": "heat the water", "env_id": "bench-boil", "k": 3}),
                               ("/v1/embeddings", {"input": ["focus on the thermometer"]}),
                               (f"/v1/envs/normal-{worker}/observations",
                                {"observations": [{"step": step, "text": "You are in the kitchen."}]})):
                r = service.post(path, body)
                normal["sent"] += 1
                if r.status_code != 200:
                    normal["failed"] += 1
                    normal["failures"].append(f"{path} -> {r.status_code}: {r.text[:200]}")
            step += 1

    fuzz = {"sent": 0, "5xx": 0, "statuses": {}, "failures": []}
    workers = [threading.Thread(target=traffic, args=(w,)) for w in range(4)]
    for w in workers:
        w.start()
    started = time.perf_counter()
    try:
        for result in schema.get_all_operations():
            op = result.ok()
            cases = st.one_of(op.as_strategy(schemathesis.GenerationMode.POSITIVE),
                              op.as_strategy(schemathesis.GenerationMode.NEGATIVE))

            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=cases)
            def check(case) -> None:  # noqa: ANN001
                response = case.call(base_url=service.url, headers=headers, timeout=120)
                fuzz["sent"] += 1
                fuzz["statuses"][str(response.status_code)] = fuzz["statuses"].get(str(response.status_code), 0) + 1
                if response.status_code >= 500:
                    fuzz["5xx"] += 1
                    fuzz["failures"].append(f"{case.operation.method.upper()} {case.operation.path} -> "
                                            f"{response.status_code}: {response.text[:200]}")

            check()
    finally:
        stop.set()
        for w in workers:
            w.join()
    normal["failures"] = normal["failures"][:5]
    fuzz["failures"] = fuzz["failures"][:5]
    return {"normal": normal, "fuzz": fuzz, "seconds": time.perf_counter() - started}


def raw(url: str, payload: bytes, chunks: list[bytes] | None = None) -> tuple[float, bytes]:
    """Send ``payload`` (then ``chunks``), read until the server closes; seconds held and what came back."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        started, answer = time.monotonic(), b""
        sock.sendall(payload)
        for chunk in chunks or []:
            try:
                sock.sendall(chunk)
            except OSError:  # the server refused and closed while the body was still coming
                break
        while True:
            try:
                data = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not data:
                break
            answer += data
        return time.monotonic() - started, answer


def body_limits(service: Service, limit: int) -> dict[str, Any]:
    auth = f"Authorization: Bearer {service.key}\r\nContent-Type: application/json\r\n".encode()
    head = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + auth
    big = b'{"input": ["' + b"x" * (limit + 10) + b'"]}'
    cases = {
        "declared": (head + f"Content-Length: {len(big)}\r\n\r\n".encode(), [big]),
        "declared_trailing_space": (head + f"Content-Length: {len(big)} \r\n\r\n".encode(), [big]),
        "chunked": (head + b"Transfer-Encoding: chunked\r\n\r\n",
                    [f"{len(big[i:i + 65536]):x}\r\n".encode() + big[i:i + 65536] + b"\r\n"
                     for i in range(0, len(big), 65536)] + [b"0\r\n\r\n"]),
    }
    out = {}
    for name, (payload, chunks) in cases.items():
        _, answer = raw(service.url, payload, chunks)
        status = answer[9:12].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"
        out[name] = {"status": status, "accepted": status not in ("413", "closed", "400")}
    return out


def timeouts(service: Service, config: KnowMapConfig) -> dict[str, Any]:
    from knowmap.serve.proxy import client_timeout

    s = config.serve
    auth = f"Authorization: Bearer {service.key}\r\n".encode()
    request = b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    body = b'{"input": ["keep alive"]}'
    # HAProxy holds a request head until its client timeout (knowmap.serve.proxy.client_timeout); Serve's proxy,
    # until serve.header_timeout_s.
    head = client_timeout(config) if s.frontend == "haproxy" else s.header_timeout_s
    out = {}
    for name, payload, limit in (
            ("nothing", b"", head),
            ("half_head", request, head),
            ("stalled_body", request + auth + b"Content-Length: 100\r\n\r\n" + body[:10], s.body_timeout_s),
            ("idle_keep_alive", request + auth + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
             s.keep_alive_s)):
        held, answer = raw(service.url, payload)  # idle_keep_alive: answering the request takes milliseconds
        out[name] = {"held_s": held, "timeout_s": limit, "within": held <= limit + 1.0,
                     "answer": answer[:12].decode(errors="replace")}
    return out


def readers_during_contribution(service: Service, config: KnowMapConfig, steady_n: int) -> dict[str, Any]:
    client = KnowMapClient(service.url, service.key, timeout_s=600)
    queries = ["heat the water", "where is the thermometer", "focus on the substance", "boil water on the stove"]

    def retrieve(i: int) -> float:
        t0 = time.perf_counter()
        client.retrieve(queries[i % len(queries)], env_id="bench-boil", k=5)
        return (time.perf_counter() - t0) * 1000

    for i in range(5):
        retrieve(i)
    steady = [retrieve(i) for i in range(steady_n)]
    n = config.serve.max_trajectory_steps
    budget = config.serve.max_body_bytes * 0.9 / n - 120  # the body near the limit
    text_chars = int(min(config.serve.max_text_chars, max(64, budget)))
    steps = [{"step": i, "action": f"look at the thing number {i}", "score": round(100 * i / n, 3),
              "observation": (f"You see the thing number {i}. " * 200)[:text_chars]} for i in range(n)]
    body = {"trajectory": {"episode_id": "bench-max-size", "task": "boil", "variation": 0, "split": "train",
                           "steps": steps}}
    size = len(json.dumps(body).encode())
    result: dict[str, Any] = {}

    def contribute() -> None:
        t0 = time.perf_counter()
        r = service.post("/v1/trajectories", body, timeout=600)
        result.update(status=r.status_code, seconds=time.perf_counter() - t0, answer=r.json())

    writer = threading.Thread(target=contribute)
    writer.start()
    during, i = [], 0
    while writer.is_alive():
        latency = retrieve(i)
        if writer.is_alive():
            during.append(latency)
        i += 1
    writer.join()
    return {"steady_p50_ms": pct(steady, 50), "steady_p99_ms": pct(steady, 99), "during_p50_ms": pct(during, 50),
            "during_p99_ms": pct(during, 99), "steady_requests": len(steady), "during_requests": len(during),
            "contribution": {"steps": n, "body_bytes": size, "observation_chars": text_chars, **result}}


def log_size(root: Path) -> tuple[int, int]:
    files = [p for p in root.rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err")]
    data = [p.read_bytes() for p in files]
    return sum(len(d) for d in data), sum(d.count(b"\n") for d in data)


def log_per_request(service: Service, n: int) -> dict[str, Any]:
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    refusals = [("/v1/envs/nobody/observations", {"observations": [{"step": 1, "text": "x"}, {"step": 0}]}),
                ("/v1/retrieve", {"query": "x", "env_id": "../etc"}),
                ("/v1/trajectories", {"trajectory": {"episode_id": "bench-boil-0-expert", "task": "boil"}}),
                ("/v1/embeddings", {"input": ["x" * 9000]})]
    out = {}
    for name, work in (("accepted", [("/v1/embeddings", {"input": ["fine"]})]), ("refused", refusals)):
        time.sleep(1.0)
        before = log_size(logs)
        statuses = [service.post(*work[i % len(work)]).status_code for i in range(n)]
        time.sleep(2.0)  # other processes write their logs
        after = log_size(logs)
        out[name] = {"requests": n, "statuses": sorted(set(statuses)), "bytes_per_request": (after[0] - before[0]) / n,
                     "lines_per_request": (after[1] - before[1]) / n}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--fuzz-examples", type=int, default=25, help="schemathesis examples per operation")
    parser.add_argument("--steady", type=int, default=150, help="retrieves timed before a contribution or attack")
    parser.add_argument("--frontend", choices=["haproxy", "serve-proxy"], default="haproxy",
                        help="serve.frontend: what takes the connections")
    parser.add_argument("--header-timeout-s", type=float, default=SERVE_DEFAULTS["header_timeout_s"].default)
    parser.add_argument("--body-timeout-s", type=float, default=SERVE_DEFAULTS["body_timeout_s"].default)
    parser.add_argument("--slow-headers", type=int, default=5000, help="slow heads at once, no key")
    parser.add_argument("--slow-bodies", type=int, default=200, help="slow bodies at once, one key")
    parser.add_argument("--parallel", type=int, default=8, help="maximum-size contributions at once, another tenant")
    parser.add_argument("--window", type=float, default=60.0, help="seconds the innocent client is timed under attack")
    parser.add_argument("--idle-connections", type=int, default=500, help="connections that send nothing (and as "
                        "many half heads)")
    parser.add_argument("--mcp-attempts", type=int, default=300, help="anonymous MCP initialize requests")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    started = time.perf_counter()
    descriptors = raise_descriptor_limit()
    keys = {"innocent": "km-" + secrets.token_urlsafe(24), "slow": "km-" + secrets.token_urlsafe(24),
            "attacker": "km-" + secrets.token_urlsafe(24)}
    with local_service("robust-bench", frontend=args.frontend, header_timeout_s=args.header_timeout_s,
                       body_timeout_s=args.body_timeout_s, keep_alive_s=5, api_keys=[keys["innocent"]],
                       keys=[{"key": keys["slow"], "tenant": "slowpoke", "role": "read"},
                             {"key": keys["attacker"], "tenant": "heavy", "role": "write"}]) as (config, info):
        service = Service(info.url, info.api_key)
        populate(service)
        print("mixed batches ...", flush=True)
        mixed = mixed_batches(service, args.trials)
        print("fuzz interleaved with normal traffic ...", flush=True)
        fuzz = fuzz_interleaved(service, args.fuzz_examples)
        print("body limits, timeouts ...", flush=True)
        limits = body_limits(service, config.serve.max_body_bytes)
        held = timeouts(service, config)
        print("readers during a maximum-size contribution ...", flush=True)
        readers = readers_during_contribution(service, config, args.steady)
        print("log growth per request ...", flush=True)
        logs = log_per_request(service, 200)
        print(f"all attacks at once ({args.slow_headers} slow heads, {args.slow_bodies} slow bodies, "
              f"{args.parallel} maximum-size contributions) ...", flush=True)
        attack = all_at_once(info.url, keys, config, args)
        print("head deadlines: connections that send nothing, half heads ...", flush=True)
        heads = head_deadlines(info.url, config, args.idle_connections)
        print("deletion, MCP ...", flush=True)
        forget = deletion(info.url, keys["innocent"], config.data_dir)
        ids = hostile_ids(info.url, keys["innocent"], "bench-" + json.loads(
            (FIXTURES / "trajectories" / "boil-0.json").read_text())["episode_id"])
        door = mcp_door(info.url, keys["innocent"], args.mcp_attempts)

    ratio = readers["during_p99_ms"] / readers["steady_p50_ms"]
    checks = [
        Check("normal_requests_failed_by_mixed_batches", value=mixed["mixed_failed"], goal=0, direction="<=",
              baseline=mixed["baseline_failed"], result=mixed["mixed_failed"],
              conditions={"every bad request answered 422": all(s == 422 for s in mixed["bad_statuses"])}),
        Check("normal_requests_failed_during_fuzz", value=fuzz["normal"]["failed"], goal=0, direction="<=",
              baseline=0, result=fuzz["normal"]["failed"], conditions={"0 fuzz 5xx": fuzz["fuzz"]["5xx"] == 0}),
        Check("over_limit_bodies_accepted", value=sum(v["accepted"] for v in limits.values()), goal=0,
              direction="<=", baseline=len(limits), result=sum(v["accepted"] for v in limits.values())),
        Check("connections_held_past_timeout", value=sum(not v["within"] for v in held.values()), goal=0,
              direction="<=", baseline=len(held), result=sum(not v["within"] for v in held.values())),
        Check("retrieve_p99_during_contribution_vs_steady_p50", value=ratio, goal=3.0, direction="<=",
              baseline=readers["steady_p50_ms"], result=readers["during_p99_ms"],
              conditions={"the contribution answered 200": readers["contribution"].get("status") == 200}),
    ]
    print(f"\n{'measurement':<56}{'baseline':>10}{'result':>10}{'ratio':>8}  goal")
    print(f"{'normal requests failed (alone -> with bad ones)':<56}{mixed['baseline_failed']:>10}"
          f"{mixed['mixed_failed']:>10}{'':>8}  0 of {mixed['normal']}; bad ones: {sorted(set(mixed['bad_statuses']))}")
    print(f"{'normal requests failed during fuzzing':<56}{0:>10}{fuzz['normal']['failed']:>10}{'':>8}  0 of "
          f"{fuzz['normal']['sent']}; fuzz cases {fuzz['fuzz']['sent']}, 5xx {fuzz['fuzz']['5xx']}")
    print(f"{'over-limit bodies accepted (attempts -> accepted)':<56}{len(limits):>10}"
          f"{checks[2].result:>10}{'':>8}  0; " + ", ".join(f"{k} {v['status']}" for k, v in limits.items()))
    print(f"{'connections held past their timeout':<56}{len(held):>10}{checks[3].result:>10}{'':>8}  0; "
          + ", ".join(f"{k} {v['held_s']:.1f}/{v['timeout_s']} s" for k, v in held.items()))
    print(f"{'retrieve ms (steady p50 -> p99 during contribution)':<56}{readers['steady_p50_ms']:>10.1f}"
          f"{readers['during_p99_ms']:>10.1f}{ratio:>8.2f}  <= 3.0")
    print(f"  steady p99 {readers['steady_p99_ms']:.1f} ms, during p50 {readers['during_p50_ms']:.1f} ms over "
          f"{readers['during_requests']} requests; contribution of {readers['contribution']['steps']} steps "
          f"({readers['contribution']['body_bytes'] / 2**20:.1f} MiB): {readers['contribution'].get('status')} in "
          f"{readers['contribution'].get('seconds', float('nan')):.1f} s")
    print(f"{'log bytes per request (accepted -> refused)':<56}{logs['accepted']['bytes_per_request']:>10.0f}"
          f"{logs['refused']['bytes_per_request']:>10.0f}"
          f"{logs['refused']['bytes_per_request'] / max(1.0, logs['accepted']['bytes_per_request']):>8.2f}"
          f"  lines {logs['accepted']['lines_per_request']:.2f} -> {logs['refused']['lines_per_request']:.2f}")
    more = attack_checks(attack, heads, forget, ids, door)
    print_attack_rows(more, attack, heads, forget, door)
    result = {"metric": "normal_requests_failed_by_other_clients", "value": mixed["mixed_failed"]
              + fuzz["normal"]["failed"] + more[0].value, "goal": 0,
              "details": {"checks": checks + more, "mixed_batches": mixed, "fuzz": fuzz, "body_limits": limits,
                          "timeouts": held, "readers": readers, "logs": logs, "all_attacks": attack,
                          "head_deadlines": heads, "deletion": forget, "hostile_ids": ids, "mcp": door,
                          "frontend": args.frontend, "serve": config.serve.model_dump(mode="json", exclude={
                              "api_keys", "keys"}), "descriptor_limit": descriptors,
                          "seconds": time.perf_counter() - started, "load_average": os.getloadavg(),
                          "cpus": os.cpu_count()}}
    write_result(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
