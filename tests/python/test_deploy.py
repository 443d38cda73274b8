"""What ships under deploy/, tested with the real parts that run here: Debian's nginx with the
shipped config in front of the real gateway, offline Kubernetes schema validation, hadolint, and
checks that the image uses the same pins and scripts as `make setup`.
(A container engine does not run on these machines, so the image itself is not built here.)"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SMOLLM2, TINY, start_gateway

DEPLOY = ROOT / "deploy"
VENV_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin"


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "scripts" / "pins.env").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def k8s_docs(name: str = "streamgate") -> dict[str, dict]:
    """The objects named `name`, by kind."""
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc["metadata"]["name"] == name:
                docs[doc["kind"]] = doc
    return docs


def secrets() -> dict[str, dict]:
    docs = yaml.safe_load_all((DEPLOY / "k8s" / "secret.example.yaml").read_text())
    return {d["metadata"]["name"]: d for d in docs}


def test_every_yaml_parses():
    files = [p for p in DEPLOY.rglob("*.y*ml") if "node_modules" not in p.parts]
    assert len(files) >= 7
    for path in files:
        assert list(yaml.safe_load_all(path.read_text())), path


def test_kubernetes_objects_validate_against_the_api_schemas():
    files = sorted(str(p) for p in (DEPLOY / "k8s").glob("*.yaml"))
    done = subprocess.run([str(VENV_BIN / "kubernetes-validate"), "--strict", "--quiet", *files],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    kinds = set(k8s_docs())
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds


def test_grace_period_outlasts_prestop_and_drain():
    docs = k8s_docs()
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    drain = int(docs["ConfigMap"]["data"]["STREAMGATE_DRAIN_TIMEOUT_SECS"])
    pre_stop = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > drain + pre_stop
    assert any(e["valueFrom"]["secretKeyRef"]["name"] == "streamgate-api-keys" for e in container["env"])


def test_replicas_share_state_through_the_redis_of_the_manifests():
    container = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    state = next(e for e in container["env"] if e["name"] == "STREAMGATE_STATE")
    ref = state["valueFrom"]["secretKeyRef"]
    assert ref["optional"] is True, "without the Secret each pod keeps its own state"
    url = secrets()[ref["name"]]["stringData"][ref["key"]]
    redis = k8s_docs("streamgate-redis")
    port = redis["Service"]["spec"]["ports"][0]["port"]
    assert url == f"redis://{redis['Service']['metadata']['name']}:{port}"
    assert redis["Deployment"]["spec"]["replicas"] == 1


def test_compose_runs_two_replicas_sharing_one_redis():
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    replicas = [services["gateway-a"], services["gateway-b"]]
    assert replicas[0] == replicas[1], "two copies of one gateway"
    assert replicas[0]["environment"]["STREAMGATE_STATE"] == "redis://redis:6379"
    assert "redis-server" in services["redis"]["command"]
    assert set(services["nginx"]["depends_on"]) == {"gateway-a", "gateway-b"}
    assert "ports" not in replicas[0], "clients reach the replicas through nginx"


def test_probes_point_at_routes_that_exist(gateway):
    container = k8s_docs()["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    paths = {container[p]["httpGet"]["path"] for p in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert paths == {"/api/v1/health/ready", "/api/v1/health/live"}
    for path in paths:
        with urllib.request.urlopen(gateway + path, timeout=10) as response:
            assert response.status == 200
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "/api/v1/health/ready" in dockerfile  # the image's HEALTHCHECK


def test_dockerfile_lints_clean():
    done = subprocess.run([str(VENV_BIN / "hadolint"), str(DEPLOY / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_image_uses_the_same_pins_and_scripts_as_make_setup():
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    p = pins()
    assert "scripts/fetch_onnxruntime.sh" in dockerfile and "scripts/prepare_smollm2.sh" in dockerfile
    assert "COPY scripts scripts" in dockerfile and "scripts/requirements.txt" in dockerfile
    # No checksum or runtime version may be written into the Dockerfile apart from the pins.
    assert not re.search(r"\b[0-9a-f]{64}\b", dockerfile), "checksums belong in scripts/pins.env"
    versions = set(re.findall(r"libonnxruntime\.so\.([0-9.]+)", dockerfile))
    assert versions == {p["ORT_VERSION"]}
    # The Makefile and the binary's default look for the same library version.
    assert f"libonnxruntime.so.{p['ORT_VERSION']}" in (ROOT / "Makefile").read_text()
    runtime_rs = (ROOT / "crates" / "inference" / "src" / "runtime.rs").read_text()
    assert f'ORT_VERSION: &str = "{p["ORT_VERSION"]}"' in runtime_rs
    assert f"onnxruntime=={p['ORT_VERSION']}" in (ROOT / "scripts" / "requirements.txt").read_text()
    assert (ROOT / ".dockerignore").read_text().count("target/") == 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def shipped_nginx(upstreams: str):
    """Debian's nginx running the shipped deploy/nginx/streamgate.conf, with only the upstream
    line (`server 127.0.0.1:8000;` → `upstreams`) and the listen port substituted; yields the port."""
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        pytest.fail("nginx is missing: `make test` installs Debian's nginx")
    port = free_port()
    conf = (DEPLOY / "nginx" / "streamgate.conf").read_text()
    assert "server 127.0.0.1:8000;" in conf and "listen 8080;" in conf
    conf = conf.replace("server 127.0.0.1:8000;", upstreams).replace("listen 8080;", f"listen 127.0.0.1:{port};")
    prefix = Path(tempfile.mkdtemp(prefix="sg-nginx-"))
    (prefix / "logs").mkdir()
    (prefix / "streamgate.conf").write_text(conf)
    (prefix / "nginx.conf").write_text(
        "worker_processes 1; error_log logs/error.log warn; pid logs/nginx.pid;\n"
        "events { worker_connections 256; }\n"
        "http { access_log logs/access.log; client_body_temp_path tmp; proxy_temp_path tmp;\n"
        "       include streamgate.conf; }\n")
    (prefix / "tmp").mkdir()
    proc = subprocess.Popen([nginx, "-p", str(prefix), "-c", "nginx.conf", "-g", "daemon off;"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail(f"nginx did not start: {proc.stderr.read() if proc.stderr else ''}")
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(prefix, ignore_errors=True)


@pytest.fixture()
def nginx_in_front():
    """The real gateway (trusting 127.0.0.1 as its proxy) behind the shipped nginx config."""
    server = start_gateway("--model", f"v1={SMOLLM2}", "--model", f"v2={TINY}",
                           "--trusted-proxies", "127.0.0.1/32", "--rate-limit", "60/min:20")
    try:
        with shipped_nginx(f"server {server.address};") as port:
            yield server, port
    finally:
        server.stop()


def metric(base: str, prefix: str) -> float | None:
    with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_a_stream_through_nginx_arrives_token_by_token_from_the_forwarded_client(nginx_in_front):
    server, port = nginx_in_front
    body = json.dumps({"prompt": "Count from 1 to 300, separated by commas.", "chat": True,
                       "max_tokens": 48, "temperature": 0}).encode()
    # Connect from 127.0.0.2 (still loopback) and claim another address: nginx appends the real one.
    sock = socket.create_connection(("127.0.0.1", port), timeout=60, source_address=("127.0.0.2", 0))
    sock.sendall(b"POST /api/v1/inference/stream HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
                 b"X-Forwarded-For: 6.6.6.6\r\nX-Request-Id: through-nginx-1\r\nConnection: close\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    reader = sock.makefile("rb")
    status = reader.readline().decode()
    assert " 200 " in status, status
    headers = {}
    while (line := reader.readline().decode().strip()):
        k, v = line.split(":", 1)
        headers[k.strip().lower()] = v.strip()
    assert headers["content-type"] == "text/event-stream"
    assert headers["x-request-id"] == "through-nginx-1"
    assert "ratelimit-remaining" in headers

    events, first_while_generating = [], None
    raw = b""
    while True:
        chunk = reader.read1(65536)
        if not chunk:
            break
        raw += chunk
        data = [line[6:] for line in raw.decode(errors="replace").split("\n") if line.startswith("data: ")]
        if data and first_while_generating is None:
            # The first event came through nginx while the model was still generating: not buffered.
            first_while_generating = metric(server.base, 'streamgate_engine_active_generations{version="v1"}') == 1.0
        events = data
        if data and data[-1] == "[DONE]":
            break
    sock.close()
    assert first_while_generating, "the first event reached the client only after the generation ended"
    assert events[-1] == "[DONE]"
    assert len([e for e in events if e.startswith('{"index"')]) == 48

    lines = server.awaited_request_logs("/api/v1/inference/stream")
    assert lines and lines[0]["client"] == "127.0.0.2", "the gateway logs and limits the address nginx forwarded"
    assert lines[0]["request_id"] == "through-nginx-1"


@contextlib.contextmanager
def redis_server():
    """A real redis-server (Debian's package; `make test` installs it) on a free port."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: `make test` installs Debian's redis-server")
    port = free_port()
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready to accept connections" in line:
            break
    else:
        pytest.fail("redis-server did not start")
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=10)


def compose_upstreams(a: str, b: str) -> str:
    """The upstream line compose's nginx command writes, with the replicas' real addresses."""
    command = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["nginx"]["command"][-1]
    line = re.search(r"sed 's/server 127\.0\.0\.1:8000;/([^/]+)/'", command)
    assert line, command
    return line.group(1).replace("gateway-a:8000", a).replace("gateway-b:8000", b)


def get(port: int, path: str, headers: dict | None = None):
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers=headers or {})
    try:
        return urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as refused:
        return refused


def test_two_replicas_behind_the_shipped_nginx_share_one_quota_and_every_stream():
    """compose's layout on real parts: nginx (round-robin, as shipped) in front of two replicas
    that share a real Redis."""
    with redis_server() as url:
        args = ("--model", f"v1={TINY}", "--state", url, "--trusted-proxies", "127.0.0.1/32",
                "--rate-limit", "6/min:6")
        a, b = start_gateway(*args), start_gateway(*args)
        try:
            with shipped_nginx(compose_upstreams(a.address, b.address)) as port:
                statuses = [get(port, "/api/v1/models").status for _ in range(8)]
                assert statuses == [200] * 6 + [429] * 2, statuses
                assert a.awaited_request_logs("/api/v1/models") and b.awaited_request_logs("/api/v1/models"), \
                    "nginx spread the requests over both replicas, and they counted one quota"

                query = "/api/v1/inference/stream?prompt=Once+upon+a+time&max_tokens=16&temperature=0"
                with get(port, query) as first:
                    stream_id = first.headers["x-stream-id"]
                    events = first.read().decode().split("\n\n")
                whole = [e for e in events if "data: " in e]
                assert whole[-1].endswith("data: [DONE]")
                # Reconnects land on each replica in turn: both continue the stream after event 3.
                for _ in range(2):
                    with get(port, query, {"Last-Event-ID": f"{stream_id}-3"}) as again:
                        rest = [e for e in again.read().decode().split("\n\n") if "data: " in e]
                    assert rest == whole[3:]
                served = [r for g in (a, b) for r in g.logs if r.get("msg") == "request" and r["status"] >= 500]
                assert not served, served
        finally:
            a.stop()
            b.stop()
