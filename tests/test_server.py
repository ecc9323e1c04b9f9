"""The REST service (issue 13): a real `virtpolicy serve` on loopback, and the in-process ASGI app.

End to end: a server process on a free port answers the CLI's documents as JSON, problem details for
bad input (400 with a location), unknown hosts and profiles (404), over-size bodies (413), conflicts
(422 with `conflicts` and `corrections`), missing tokens (401) and a full queue (429 with Retry-After).
Every what-if and planning command runs as a job whose result is the CLI's --format json document. A
worker killed under a request answers 503 and the next requests succeed. The load test sends
$VIRTPOLICY_LOAD_REQUESTS solves (default 2,000; benchmarks/bench_server.py runs the issue's 10,000)
at 32 concurrent and reports p50/p99. In process: a request that runs past its time bound or loses
its worker answers 503 and the next one succeeds; schemathesis checks every endpoint against the
OpenAPI document.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from virtpolicy.inputs.host import EMBEDDED_BUNDLE  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
BUNDLE = EMBEDDED_BUNDLE
PROBLEM_JSON = "application/problem+json"
HOSTILE = (
    '<?xml version="1.0"?>\n<!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">'
    '<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>\n'
    "<domain type='kvm'><name>&lol3;</name><memory>1</memory></domain>"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *extra: str, env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        command = [sys.executable, "-m", "virtpolicy.cli", "serve", "--port", str(self.port), *extra]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"virtpolicy serve exited: {self.process.stdout.read().decode()}")  # type: ignore[union-attr]
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "virtpolicy serve did not answer /healthz within 60 s"
            time.sleep(0.1)
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> str:
        self.client.close()
        self.process.send_signal(signal.SIGTERM)
        try:
            out, _ = self.process.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            out, _ = self.process.communicate()
        return out.decode(errors="replace")

    def workers(self) -> list[int]:
        """The worker processes: the zygote's children (the zygote is the server's child)."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(ppid, []).append(int(entry.name))
        return sorted(w for z in children.get(self.process.pid, []) for w in children.get(z, []))


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    running = Server("--workers", "2")
    try:
        yield running
    finally:
        log = running.stop()
        assert "Traceback" not in log, log


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    token = "s3cret-token-for-the-test"
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(token + "\n")
    running = Server("--workers", "1", "--token-file", str(path))
    try:
        yield running, token
    finally:
        running.stop()


def _example(name: str) -> str:
    return (EXAMPLES / name).read_text()


def _problem(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text[:2000]
    assert response.headers["content-type"] == PROBLEM_JSON
    body = response.json()
    assert body["status"] == status and body["title"] and body["type"]
    assert "Traceback" not in response.text
    return body


# --- end to end ---------------------------------------------------------------------------------
def test_rhel6_on_q35_is_virtio_transitional(server: Server) -> None:
    response = server.client.post("/v1/solve", json={"domain": _example("rhel6-on-q35.xml")})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    document = response.json()
    decided = {d["variable"]: d["value"] for d in document["decisions"]}
    assert decided["disk[0].model"] == "virtio-transitional"
    assert decided["interface[0].model"] == "virtio-transitional"
    assert document["status"] == "solved" and document["xml"].startswith("<")


def test_solve_answers_the_cli_json(server: Server) -> None:
    """The answer is exactly `virtpolicy solve --format json`."""
    cli = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "solve", "--format", "json", "examples/rhel6-on-q35.xml"],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    expected = json.loads(cli.stdout)
    answer = server.client.post("/v1/solve", json={"domain": _example("rhel6-on-q35.xml")}).json()
    for document in (expected, answer):
        document.pop("elapsed_ms", None)
    assert answer == expected


def test_rhel5_on_q35_is_a_conflict(server: Server) -> None:
    response = server.client.post("/v1/solve", json={"domain": _example("rhel5-on-q35-conflict.xml")})
    body = _problem(response, 422)
    [conflict] = body["conflicts"]
    kinds = sorted((m["provenance"]["kind"], m["provenance"]["where"]) for m in conflict["members"])
    assert kinds == [("app", "/domain/os/type/@machine"), ("guest", "rhel5.11 (http://redhat.com/rhel/5.11)")]
    assert [k["drop"] for k in body["corrections"]] == [["guest:machine:q35"], ["app:/domain/os/type/@machine"]]
    assert body["result"]["status"] == "conflict"
    assert body["result"]["conflict"] == conflict["members"]  # the same Requirement objects as the CLI's JSON


def test_explain_and_check(server: Server) -> None:
    why = server.client.post("/v1/explain", json={"domain": _example("rhel5-on-q35-conflict.xml")})
    assert why.status_code == 200, why.text
    assert why.json()["schema"] == "virtpolicy-explain/1" and why.json()["conflicts"]
    laid_out = server.client.post("/v1/solve", json={"domain": _example("windows10.xml")}).json()["xml"]
    verdict = server.client.post("/v1/check", json={"domain": laid_out})
    assert verdict.status_code == 200, verdict.text
    assert verdict.json()["status"] == "fits"
    nic = "<interface type='network'><source network='default'/></interface>"
    added = server.client.post("/v1/devices/add", json={"domain": laid_out, "device": nic})
    assert added.status_code == 200, added.text
    assert '<address type="pci"' in added.json()["device"]


@pytest.mark.parametrize(
    ("domain", "needle"),
    [
        ("<domain type='kvm'>\n<name>x</name\n", "malformed"),
        (HOSTILE, "entit"),
        ("not xml at all", None),
    ],
    ids=["malformed", "entity-expansion", "not-xml"],
)
def test_bad_xml_is_400_with_a_location(server: Server, domain: str, needle: str | None) -> None:
    body = _problem(server.client.post("/v1/solve", json={"domain": domain}), 400)
    assert body["location"], body
    assert body["input"] == "domain"
    if needle:
        assert needle in body["detail"].lower()


def test_bad_members_are_400(server: Server) -> None:
    body = _problem(server.client.post("/v1/solve", json={"domain": "<domain/>", "colour": "red"}), 400)
    assert body["location"] == "body.colour"
    body = _problem(
        server.client.post("/v1/solve", content=b"{not json", headers={"content-type": "application/json"}), 400
    )
    assert body["location"]
    path = _problem(server.client.post("/v1/solve", json={"domain": "<domain/>", "profiles": ["/etc/passwd"]}), 400)
    assert path["location"] == "profiles[0]"
    unknown_os = {"domain": _example("rhel6-on-q35.xml"), "os": "no-such-os-1.0"}
    assert _problem(server.client.post("/v1/solve", json=unknown_os), 400)["location"] == "os"


def test_unknown_host_and_profile_are_404(server: Server) -> None:
    domain = _example("rhel6-on-q35.xml")
    assert (
        _problem(server.client.post("/v1/solve", json={"domain": domain, "host": "nowhere"}), 404)["location"] == "host"
    )
    body = _problem(server.client.post("/v1/solve", json={"domain": domain, "profiles": ["no-such-profile"]}), 404)
    assert body["location"] == "profiles[0]"
    _problem(server.client.get("/v1/profiles/no-such-profile"), 404)
    _problem(server.client.delete("/v1/hosts/nowhere"), 404)
    _problem(server.client.get("/v1/no-such-endpoint"), 404)


def test_over_size_body_is_413(server: Server) -> None:
    big = b'{"domain": "' + b"x" * (16 * 1024 * 1024) + b'"}'
    _problem(server.client.post("/v1/solve", content=big, headers={"content-type": "application/json"}), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"domain": "'
        for _ in range(17):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    _problem(server.client.post("/v1/solve", content=chunks(), headers={"content-type": "application/json"}), 413)


def test_profiles(server: Server) -> None:
    listing = server.client.get("/v1/profiles")
    assert listing.status_code == 200
    names = {p["name"] for p in listing.json()}
    assert {"modern-q35", "legacy-pc"} <= names
    shown = server.client.get("/v1/profiles/modern-q35").json()
    assert shown["name"] == "modern-q35" and shown["rules"] >= 1 and shown["summary"]
    solved = server.client.post("/v1/solve", json={"domain": _example("windows10.xml"), "profiles": ["modern-q35"]})
    assert solved.status_code == 200, solved.text
    assert [p["name"] for p in solved.json()["profiles"]] == ["modern-q35"]


def test_profiles_check(server: Server) -> None:
    library = _library()
    texts = {p.name: p.read_text() for p in (library["modern-q35"], library["legacy-pc"])}
    texts["broken.toml"] = "this is = = not toml"
    response = server.client.post("/v1/profiles/check", json={"profiles": texts})
    assert response.status_code == 200, response.text
    lint = response.json()
    assert lint["status"] == "errors"
    assert any(f["where"].startswith("broken.toml") and f["level"] == "error" for f in lint["findings"]), lint
    assert [sorted(pair["profiles"]) for pair in lint["incompatible"]] == [["legacy-pc", "modern-q35"]]
    assert "virtpolicy-server-" not in response.text  # the server's directory stays hidden
    _problem(server.client.post("/v1/profiles/check", json={"profiles": {"../x.toml": ""}}), 400)


def _typical(rng: random.Random, i: int) -> bytes:
    """A request body: benchmarks/typical.xml varied (name, memory, vCPUs, guest OS), never the same twice."""
    text = (REPO / "benchmarks" / "typical.xml").read_text()
    os_id = rng.choice(
        ("fedoraproject.org/fedora/37", "redhat.com/rhel/9.0", "debian.org/debian/11", "ubuntu.com/ubuntu/22.04")
    )
    text = text.replace("fedoraproject.org/fedora/37", os_id).replace("<name>bench</name>", f"<name>vm-{i}</name>")
    text = text.replace(">2048<", f">{rng.choice((1024, 2048, 4096))}<").replace(
        "<vcpu>2<", f"<vcpu>{rng.choice((1, 2, 4))}<"
    )
    return json.dumps({"domain": text}).encode()


async def _solve_many(port: int, bodies: list[bytes], concurrency: int) -> tuple[list[float], dict[int, int]]:
    """POST /v1/solve for every body over `concurrency` keep-alive connections (a small HTTP/1.1 client,
    lighter than httpx, so the load generator leaves the cores to the server): latencies, statuses."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    pending = iter(bodies)

    async def connection() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for body in pending:
                start = time.perf_counter()
                head = "POST /v1/solve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                writer.write(f"{head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
                status = int((await reader.readline()).split()[1])
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                answer = await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if status == 200 and b'"status":"solved"' not in answer:
                    status = -200  # a 200 that is not a solved document
                statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(connection() for _ in range(concurrency)))
    return latencies, statuses


def test_load(server: Server) -> None:
    """The issue's load test, bounded: $VIRTPOLICY_LOAD_REQUESTS solves (default 2,000; the benchmark runs
    10,000) at 32 concurrent on 2 workers, every one a different typical VM: no errors; p50/p99 reported."""
    count = int(os.environ.get("VIRTPOLICY_LOAD_REQUESTS", "2000"))
    rng = random.Random(13)
    bodies = [_typical(rng, i) for i in range(count)]
    load = os.getloadavg()[0]
    started = time.perf_counter()
    latencies, statuses = asyncio.run(_solve_many(server.port, bodies, 32))
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50, p99 = latencies[len(latencies) // 2], latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    print(
        f"\n{count} solves at 32 concurrent on 2 workers: {count / elapsed:.0f}/s, p50 {p50 * 1000:.0f} ms, "
        f"p99 {p99 * 1000:.0f} ms (load average {load:.2f} before, {os.getloadavg()[0]:.2f} after)"
    )
    assert statuses == {200: count}


def test_a_killed_worker_answers_503_and_the_next_succeed(server: Server) -> None:
    """On the real server: the request in flight when its worker is killed gets 503; the worker is
    replaced and the next requests succeed."""
    library = {"profiles": {p.name: p.read_text() for p in sorted(_library().values())[:16]}}
    workers = server.workers()
    assert len(workers) >= 2, workers

    async def run() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            pending = asyncio.create_task(client.post("/v1/profiles/check", json=library))  # seconds of work
            deadline = time.monotonic() + 30
            while (await client.get("/v1")).json()["load"]["in_flight"] < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            return await pending

    before = server.client.get("/v1").json()["load"]["workers_replaced"]
    body = _problem(asyncio.run(run()), 503)
    assert "worker" in body["detail"] and body["type"].endswith("worker-lost")
    for i in range(4):
        solved = server.client.post("/v1/solve", json={"domain": _example("windows10.xml")})
        assert solved.status_code == 200, (i, solved.text)
    assert server.client.get("/v1").json()["load"]["workers_replaced"] >= before + 1
    assert not set(server.workers()) & set(workers)


def _library() -> dict[str, Path]:
    from virtpolicy import Engine

    return Engine().profiles()


def _wait_for(server: Server, location: str) -> dict:
    deadline = time.monotonic() + 120
    while True:
        job = server.client.get(location)
        assert job.status_code == 200, job.text
        if job.json()["status"] in ("done", "failed"):
            return job.json()
        assert time.monotonic() < deadline, job.json()
        time.sleep(0.1)


def test_whatif_and_plan_jobs(server: Server) -> None:
    """202 Accepted with Location: /v1/jobs/{id}; the job ends with the CLI's JSON document."""
    body = {"profiles": ["legacy-pc", "modern-q35", "secure-boot"], "oses": ["fedora37"]}
    accepted = server.client.post("/v1/whatif/combinations", json=body)
    assert accepted.status_code == 202, accepted.text
    location = accepted.headers["location"]
    assert location == f"/v1/jobs/{accepted.json()['id']}"
    plan = server.client.post("/v1/plan/hosts", json={"domain": _example("rhel6-on-q35.xml")})
    assert plan.status_code == 202, plan.text
    job = _wait_for(server, location)
    assert job["status"] == "done" and job["progress"] == {"done": 1, "total": 1}, job
    pairs = [p["profiles"] for p in job["result"]["summary"]["infeasible_pairs"]]
    assert ["legacy-pc", "modern-q35"] in pairs and ["legacy-pc", "secure-boot"] in pairs
    planned = _wait_for(server, plan.headers["location"])
    assert planned["status"] == "done", planned
    assert planned["result"]["runs_on"] == planned["result"]["hosts_total"] >= 1
    failed = server.client.post("/v1/whatif/combinations", json={"profiles": ["legacy-pc"], "oses": ["no-such-os"]})
    problem = _wait_for(server, failed.headers["location"])["problem"]
    assert problem["status"] == 400 and problem["location"] == "os"
    _problem(server.client.post("/v1/whatif/combinations", json={"profiles": ["nope"]}), 404)
    _problem(server.client.post("/v1/plan/hosts", json={"domain": "<domain/>", "hosts": ["nowhere"]}), 404)
    _problem(server.client.get("/v1/jobs/no-such-job"), 404)


def _cli_json(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", *args, "--format", "json"], cwd=REPO, capture_output=True
    )
    assert done.returncode in (0, 2), done.stderr.decode()
    return json.loads(done.stdout)


def _bundle_json(bundle: Path) -> dict:
    return {
        "capabilities": (bundle / "capabilities.xml").read_text(),
        "domcapabilities": {p.name: p.read_text() for p in sorted(bundle.glob("domcaps-*.xml"))},
        "nodedev": (bundle / "nodedev-pci.xml").read_text(),
    }


def test_every_whatif_and_plan_command_is_a_job_with_the_cli_json(server: Server, tmp_path: Path) -> None:
    """whatif compare, plan common, plan migrate and plan capacity: 202 with Location, progress, and the
    result `virtpolicy ... --format json` prints for the same hosts (named by id here, by bundle there)."""
    default = server.client.get("/v1").json()["default_host"]
    assert server.client.put("/v1/hosts/zz-rack-b", json=_bundle_json(BUNDLE)).status_code == 201
    fleet = tmp_path / "fleet"
    for name in (default, "zz-rack-b"):
        shutil.copytree(BUNDLE, fleet / name)
    laid_out = tmp_path / "running.xml"
    laid_out.write_text(server.client.post("/v1/solve", json={"domain": _example("windows10.xml")}).json()["xml"])
    try:
        names = ["rhel6-on-q35.xml", "windows10.xml", "rhel5-on-q35-conflict.xml"]
        compare = {"domains": {n: _example(n) for n in names}, "after": {"os": "rhel9.0"}}
        typical = (REPO / "benchmarks" / "typical.xml").read_text()
        cli_compare = ["whatif", "compare", *[f"examples/{n}" for n in names], "--after-os", "rhel9.0"]
        common = ["plan", "common", "examples/rhel6-on-q35.xml", "--fleet", str(fleet), "--min-hosts", "1"]
        migrate = ["plan", "migrate", str(laid_out), "--from", str(BUNDLE), "--to", str(fleet / "zz-rack-b")]
        capacity = ["plan", "capacity", "benchmarks/typical.xml", "--fleet", str(fleet), "--cpu-ratio", "4"]
        jobs = {
            "whatif/compare": (compare, cli_compare),
            "plan/common": ({"domain": _example("rhel6-on-q35.xml"), "min_hosts": 1}, common),
            "plan/migrate": ({"domain": laid_out.read_text(), "from": default, "to": ["zz-rack-b"]}, migrate),
            "plan/capacity": ({"templates": {"typical.xml": typical}, "cpu_ratio": 4.0}, capacity),
        }
        accepted = {}
        for path, (body, _cli) in jobs.items():
            response = server.client.post(f"/v1/{path}", json=body)
            assert response.status_code == 202, (path, response.text)
            assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
            assert response.json()["kind"] == path
            accepted[path] = response.headers["location"]
        for path, (_body, cli) in jobs.items():
            job = _wait_for(server, accepted[path])
            assert job["status"] == "done", (path, job)
            assert job["progress"]["done"] == job["progress"]["total"] >= 1, job["progress"]
            expected, result = _cli_json(*cli), job["result"]
            if path == "whatif/compare":  # the CLI names domains by path, the request by name
                assert job["progress"]["total"] == 3
                for row in expected["domains"]:
                    row["source"] = Path(row["source"]).name
                    row["error"] = row["error"].replace("examples/", "")
            elif path == "plan/migrate":
                expected["domain"] = result["domain"]
            elif path == "plan/capacity":
                for row in expected["templates"]:
                    row["template"] = Path(row["template"]).name
            assert result == expected, path
    finally:
        server.client.delete("/v1/hosts/zz-rack-b")


def test_job_requests_are_checked_before_they_are_queued(server: Server) -> None:
    same = {"domains": {"a.xml": _example("windows10.xml")}, "before": {"os": "win10"}, "after": {"os": "win10"}}
    assert _problem(server.client.post("/v1/whatif/compare", json=same), 400)["location"] == "body.after"
    nowhere = {"domains": {"a.xml": "<domain/>"}, "after": {"host": "nowhere"}}
    assert _problem(server.client.post("/v1/whatif/compare", json=nowhere), 404)["location"] == "after.host"
    path = {"domains": {"../etc/passwd": "<domain/>"}, "after": {"os": "win10"}}
    _problem(server.client.post("/v1/whatif/compare", json=path), 400)
    many = {"domain": "<domain/>", "min_hosts": 5}
    assert _problem(server.client.post("/v1/plan/common", json=many), 400)["location"] == "body.min_hosts"
    assert _problem(server.client.post("/v1/plan/migrate", json={"domain": "<domain/>", "from": "x"}), 404)
    usage = {"templates": {"t.xml": "<domain/>"}, "usage": {"nowhere": {"cpus": 1}}}
    assert _problem(server.client.post("/v1/plan/capacity", json=usage), 404)["location"] == "usage.nowhere"
    ratio = {"templates": {"t.xml": "<domain/>"}, "cpu_ratio": 0}
    _problem(server.client.post("/v1/plan/capacity", json=ratio), 400)
    bad = server.client.post("/v1/plan/common", json={"domain": "<domain><name>x</name"})
    problem = _wait_for(server, bad.headers["location"])["problem"]
    assert problem["status"] == 400 and problem["location"], problem


def test_saturated_server_answers_429_with_retry_after() -> None:
    """A real server with a queue of one waiting request and two unfinished jobs: the next request and
    the next job are refused at once (429, Retry-After), and what was accepted still completes."""
    running = Server("--workers", "1", env={"VIRTPOLICY_SERVE_QUEUE": "1", "VIRTPOLICY_SERVE_JOB_QUEUE": "2"})
    library = {"profiles": {p.name: p.read_text() for p in sorted(_library().values())[:16]}}
    domain = {"domain": _example("rhel6-on-q35.xml")}

    async def run() -> tuple[list[httpx.Response], httpx.Response]:
        async with httpx.AsyncClient(base_url=running.url, timeout=120) as client:

            async def load() -> dict:
                return (await client.get("/v1")).json()["load"]

            async def until(key: str, value: int) -> None:
                deadline = time.monotonic() + 60
                while (await load())[key] < value:
                    assert time.monotonic() < deadline, await load()
                    await asyncio.sleep(0.01)

            slow = asyncio.create_task(client.post("/v1/profiles/check", json=library))  # seconds in the worker
            await until("in_flight", 1)
            queued = asyncio.create_task(client.post("/v1/solve", json=domain))
            await until("waiting", 1)
            refused = await client.post("/v1/solve", json=domain)
            assert (await load())["in_flight"] == 1  # the slow one still runs: the refusal was the queue's
            return [await slow, await queued], refused

    try:
        accepted, refused = asyncio.run(run())
        body = _problem(refused, 429)
        assert body["type"] == "urn:virtpolicy:problem:saturated"
        assert int(refused.headers["retry-after"]) >= 1
        assert [r.status_code for r in accepted] == [200, 200], [r.text[:300] for r in accepted]
        combos = {"oses": ["fedora37", "rhel6.10", "win10"]}
        jobs = [running.client.post("/v1/whatif/combinations", json=combos) for _ in range(3)]
        assert [j.status_code for j in jobs] == [202, 202, 429], [j.text[:300] for j in jobs]
        assert int(jobs[2].headers["retry-after"]) >= 1
        _problem(jobs[2], 429)
        assert _wait_for(running, jobs[0].headers["location"])["status"] == "done"
    finally:
        log = running.stop()
    assert "Traceback" not in log, log


def test_host_upload_solve_delete(server: Server) -> None:
    from virtpolicy.plan.fleet import fingerprint

    bundle = {
        "capabilities": (BUNDLE / "capabilities.xml").read_text(),
        "domcapabilities": {p.name: p.read_text() for p in sorted(BUNDLE.glob("domcaps-*.xml"))},
        "nodedev": (BUNDLE / "nodedev-pci.xml").read_text(),
    }
    put = server.client.put("/v1/hosts/lab-1", json=bundle)
    assert put.status_code == 201, put.text
    assert put.headers["location"] == "/v1/hosts/lab-1"
    assert put.json()["fingerprint"] == fingerprint(BUNDLE)  # the same digest as the captured bundle
    assert "lab-1" in {h["id"] for h in server.client.get("/v1/hosts").json()}
    assert "lab-1" in {h["id"] for h in server.client.get("/v1").json()["hosts"]}
    for _ in range(3):  # every worker gets the uploaded host
        solved = server.client.post("/v1/solve", json={"domain": _example("rhel6-on-q35.xml"), "host": "lab-1"})
        assert solved.status_code == 200, solved.text
        assert "lab-1" not in solved.json()["xml"]  # no server path leaks into the domain
    listed = [p["domcapabilities"] for p in [bundle]][0]
    again = server.client.put("/v1/hosts/lab-1", json={**bundle, "domcapabilities": list(listed.values())})
    assert again.status_code == 200, again.text  # replaced
    assert server.client.delete("/v1/hosts/lab-1").status_code == 204
    assert _problem(server.client.post("/v1/solve", json={"domain": "<domain/>", "host": "lab-1"}), 404)


def test_bad_host_bundles_are_400(server: Server) -> None:
    caps = (BUNDLE / "capabilities.xml").read_text()
    hostile = _problem(
        server.client.put("/v1/hosts/bad", json={"capabilities": HOSTILE, "domcapabilities": [caps]}), 400
    )
    assert hostile["location"] and "virtpolicy-server-" not in hostile["detail"]  # the server's directory stays hidden
    broken = {"capabilities": caps, "domcapabilities": ["<domainCapabilities>"]}
    assert "virtpolicy-server-" not in _problem(server.client.put("/v1/hosts/bad", json=broken), 400)["detail"]
    for bad_id in (".hidden", "-x", "%2E%2E"):
        _problem(server.client.put(f"/v1/hosts/{bad_id}", json={"capabilities": caps, "domcapabilities": [caps]}), 400)
    traversal = {"capabilities": caps, "domcapabilities": {"../../x.xml": caps}}
    _problem(server.client.put("/v1/hosts/bad", json=traversal), 400)
    assert "bad" not in {h["id"] for h in server.client.get("/v1/hosts").json()}
    _problem(server.client.delete(f"/v1/hosts/{server.client.get('/v1').json()['default_host']}"), 409)


def test_service_and_openapi(server: Server) -> None:
    info = server.client.get("/v1").json()
    assert info["version"] and info["profile_library_digest"] and info["hosts"]
    document = server.client.get("/openapi.json").json()
    assert document["openapi"].startswith("3.1.")
    operations = {(path, method) for path, item in document["paths"].items() for method in item}
    assert operations >= {
        ("/v1/solve", "post"),
        ("/v1/explain", "post"),
        ("/v1/check", "post"),
        ("/v1/devices/add", "post"),
        ("/v1/profiles", "get"),
        ("/v1/profiles/{name}", "get"),
        ("/v1/profiles/check", "post"),
        ("/v1/whatif/combinations", "post"),
        ("/v1/whatif/compare", "post"),
        ("/v1/plan/hosts", "post"),
        ("/v1/plan/common", "post"),
        ("/v1/plan/migrate", "post"),
        ("/v1/plan/capacity", "post"),
        ("/v1/jobs/{job_id}", "get"),
        ("/v1/hosts", "get"),
        ("/v1/hosts/{host_id}", "put"),
        ("/v1/hosts/{host_id}", "delete"),
        ("/v1", "get"),
        ("/healthz", "get"),
    }
    schemathesis = pytest.importorskip("schemathesis")
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.1 meta-schema


def test_token(token_server: tuple[Server, str]) -> None:
    server, token = token_server
    domain = {"domain": _example("rhel6-on-q35.xml")}
    body = _problem(server.client.post("/v1/solve", json=domain), 401)
    assert "bearer" in body["detail"]
    _problem(server.client.post("/v1/solve", json=domain, headers={"Authorization": "Bearer wrong"}), 401)
    _problem(server.client.get("/openapi.json"), 401)
    good = {"Authorization": f"Bearer {token}"}
    assert server.client.post("/v1/solve", json=domain, headers=good).status_code == 200
    assert server.client.get("/healthz").status_code == 200  # liveness needs no token
    document = server.client.get("/openapi.json", headers=good).json()
    assert "401" in document["paths"]["/v1/solve"]["post"]["responses"]


def test_serve_without_fastapi_is_one_line(tmp_path: Path) -> None:
    """A missing extra is bad input: one line naming the extra to install."""
    blocker = tmp_path / "fastapi"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('no fastapi here', name='fastapi')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "virtpolicy.cli", "serve", "--port", "1"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0
    assert "pip install 'virtpolicy[server]'" in done.stderr


# --- in process ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    from virtpolicy.server.app import Settings, create_app

    application = create_app(Settings(workers=1, timeout=30))
    try:
        yield application
    finally:
        application.state.virtpolicy.shutdown()


def _post(app, path: str, body: dict) -> httpx.Response:
    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            return await client.post(path, json=body)

    return asyncio.run(run())


def test_fleet_hosts_are_loaded_by_name(tmp_path: Path) -> None:
    import shutil

    from virtpolicy.server.app import Settings, create_app

    for name in ("rack1-a", "rack1-b"):
        shutil.copytree(BUNDLE, tmp_path / name)
    application = create_app(Settings(workers=1, fleet=tmp_path))
    try:

        async def run() -> list[httpx.Response]:
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
                solve = {"domain": _example("windows10.xml"), "host": "rack1-b"}
                return [await client.get("/v1/hosts"), await client.post("/v1/solve", json=solve)]

        hosts, solved = asyncio.run(run())
        assert [h["id"] for h in hosts.json()] == ["rack1-a", "rack1-b"]
        assert len({h["fingerprint"] for h in hosts.json()}) == 1
        assert solved.status_code == 200, solved.text
    finally:
        application.state.virtpolicy.shutdown()


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_time_bound_answers_503_and_replaces_the_worker(app) -> None:
    pool = app.state.virtpolicy.pool
    domain = {"domain": _example("windows10.xml")}
    assert _post(app, "/v1/solve", domain).status_code == 200
    before = pool.replaced
    old_workers = pool.pids()
    pool.timeout = 0.001
    try:
        body = _problem(_post(app, "/v1/solve", domain), 503)
    finally:
        pool.timeout = 30
    assert "time bound" in body["detail"]
    deadline = time.monotonic() + 10
    while not all(_gone(pid) for pid in old_workers):
        assert time.monotonic() < deadline, "the overrunning worker still runs"
        time.sleep(0.02)
    assert _post(app, "/v1/solve", domain).status_code == 200
    assert pool.replaced == before + 1
    assert not set(pool.pids()) & set(old_workers)


def test_a_dead_worker_answers_503_and_is_replaced(app) -> None:
    pool = app.state.virtpolicy.pool
    domain = {"domain": _example("windows10.xml")}
    assert _post(app, "/v1/solve", domain).status_code == 200
    library = {"profiles": {p.name: p.read_text() for p in sorted(_library().values())[:16]}}

    async def run() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://in-process") as client:
            pending = asyncio.create_task(client.post("/v1/profiles/check", json=library))  # seconds of work
            deadline = time.monotonic() + 30
            while pool.in_flight < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            for pid in pool.pids():
                os.kill(pid, signal.SIGKILL)
            return await pending

    body = _problem(asyncio.run(run()), 503)
    assert "worker" in body["detail"]
    assert _post(app, "/v1/solve", domain).status_code == 200


def test_a_dead_zygote_is_started_again(app) -> None:
    """The zygote and every worker killed: the next request waits for a new zygote's worker and succeeds."""
    state = app.state.virtpolicy
    domain = {"domain": _example("rhel6-on-q35.xml")}
    assert _post(app, "/v1/solve", domain).status_code == 200
    zygote = state.zygote.process.pid
    for pid in [zygote, *state.pool.pids()]:
        os.kill(pid, signal.SIGKILL)
    state.zygote.process.wait(10)
    solved = _post(app, "/v1/solve", domain)
    assert solved.status_code == 200, solved.text
    assert state.zygote.process.pid != zygote


def test_schemathesis_every_endpoint(app) -> None:
    """Generated requests to every operation: no 5xx, and every answer as the OpenAPI document says."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis.checks import (
        content_type_conformance,
        not_a_server_error,
        response_headers_conformance,
        response_schema_conformance,
        status_code_conformance,
    )
    from schemathesis.generation import GenerationMode

    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_headers_conformance,
        response_schema_conformance,
    ]
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 19
    failures = []
    started = time.monotonic()
    for operation, mode in itertools.product(operations, (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)):

        @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case) -> None:
            case.call_and_validate(checks=checks)

        try:
            run()
        except Unsatisfiable:  # negative mode: an operation without parameters or body has no invalid input
            assert mode is GenerationMode.NEGATIVE
        except Exception as exc:  # collect every operation's failure, then report them together
            failures.append(f"{operation.method.upper()} {operation.path} ({mode.value}): {exc}")
    assert not failures, "\n\n".join(failures)
    assert time.monotonic() - started < 60
