"""Deployment files: the image, docker compose and the Kubernetes overlays.

Run by `./kafkify test` (it builds the binaries and the compose checker first):
    .cache/venv/bin/pytest -q tests/deployment

What is checked, offline:
  - every kustomize overlay renders, and each object validates against the Kubernetes 1.31
    schemas (kubernetes-validate, strict: unknown fields fail);
  - both compose files load with compose-go, the library behind `docker compose config`;
  - every setting a binary needs in a container is set for it, in compose and in every overlay:
    the settings `--help` lists without a default, or with a loopback default (127.0.0.1 cannot
    work in a container), plus OTLP export and JSON logs;
  - every probe, health check and scrape path is a route the binaries serve, on the port the
    container's HTTP_ADDR listens on;
  - the Kubernetes copy of sql/bootstrap.sql is identical to it;
  - the image builds where a Docker engine answers; elsewhere that one test is skipped, saying why.
"""

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BINARIES = ["api-rest", "api-grpc", "cdc-relay", "worker"]
K8S_VERSION = "1.31.0"
OVERLAYS = ["dev", "prod"]
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.test.yml"]
# What every deployment sets although the binaries have a default: traces leave the pod, logs
# are JSON lines (DESIGN.md: JSON in deployments).
DEPLOYMENT_SETTINGS = {"OTEL_EXPORTER_OTLP_ENDPOINT", "LOG_FORMAT"}
# Settings without a default that a deployment may leave out: API_KEYS_FILE is the mounted
# file form of API_KEYS, which the deployments set; the Kafka TLS and SASL files and
# credentials matter only with KAFKA_SECURITY_PROTOCOL other than plaintext.
ALTERNATIVES = {
    "API_KEYS_FILE",
    "KAFKA_SSL_CA_LOCATION",
    "KAFKA_SSL_CERTIFICATE_LOCATION",
    "KAFKA_SSL_KEY_LOCATION",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
}


def binary(name):
    profile = os.environ.get("KAFKIFY_BIN_PROFILE", "debug")
    path = ROOT / "target" / profile / name
    if not path.exists():
        pytest.fail(f"{path} is missing: build the workspace first (cargo build --workspace)")
    return path


def required_settings(name):
    """Settings of `name` that a container must set: no default, or a loopback default."""
    out = subprocess.run([binary(name), "--help"], capture_output=True, text=True, check=True).stdout
    # One block per option (clap wraps long help, so [env] and [default] may be lines apart).
    blocks = re.split(r"\n(?=\s+(?:-\w, )?--[a-z])", out)
    required = set()
    for block in blocks:
        # A secret's value is hidden: `[env: API_KEYS]`, without `=`.
        env = re.search(r"\[env: ([A-Z0-9_]+)(?:=[^\]]*)?\]", block)
        if env is None:
            continue
        default = re.search(r"\[default: ([^\]]*)\]", block)
        if default is None or "127.0.0.1" in default.group(1) or "localhost" in default.group(1):
            required.add(env.group(1))
    return (required - ALTERNATIVES) | DEPLOYMENT_SETTINGS


# What serving needs and `migrate` does not: the API keys.
SERVING_ONLY = {"API_KEYS"}


def needed(name, command):
    """The required settings of a container that runs `command` (binary name first)."""
    required = required_settings(name)
    return required - SERVING_ONLY if "migrate" in command[1:] else required


def served_paths():
    """The routes of the ops router every binary serves (platform/src/ops.rs)."""
    source = (ROOT / "platform/src/ops.rs").read_text()
    paths = set(re.findall(r'\.route\(\s*"(/[a-z]*)"', source))
    assert {"/health", "/ready", "/metrics"} <= paths, paths
    return paths


def test_required_settings_are_read_from_help():
    # The parser must find what we know: a test that finds nothing proves nothing.
    assert {"DATABASE_URL", "KAFKA_BROKERS", "SCHEMA_REGISTRY_URL"} <= required_settings("worker")
    assert {"DATABASE_URL", "API_KEYS"} <= required_settings("api-rest")
    assert "KAFKA_BROKERS" not in required_settings("api-rest")
    assert "HTTP_ADDR" not in required_settings("api-rest")
    # The relay's help wraps: its defaults sit on lines of their own.
    relay = required_settings("cdc-relay")
    assert {"DATABASE_URL", "KAFKA_BROKERS"} <= relay
    assert not {"RELAY_DELIVERY", "LOG_LEVEL", "RELAY_BATCH_LINGER"} & relay


# ------------------------------------------------------------------------------------------
# Kubernetes


def kubectl():
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.fail("kubectl is needed to render the overlays (kubectl kustomize)")
    return exe


def render(overlay):
    out = subprocess.run(
        [kubectl(), "kustomize", str(ROOT / "k8s/overlays" / overlay)],
        capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_objects_validate_against_kubernetes_schemas(overlay):
    objects = render(overlay)
    assert len(objects) > 15
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {e.message} at {list(e.path)}")


def test_a_broken_object_is_refused():
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
           "spec": {"replicas": "two", "selector": {}, "template": {}}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def pod_spec(obj):
    if obj["kind"] in ("Deployment", "StatefulSet", "Job"):
        return obj["spec"]["template"]["spec"]
    return None


def kafkify_containers(objects):
    """(object, container, binary) for every container running one of our binaries."""
    for obj in objects:
        spec = pod_spec(obj)
        if spec is None:
            continue
        for c in spec.get("initContainers", []) + spec["containers"]:
            image = c["image"].split("@")[0].rsplit(":", 1)[0]
            if image.endswith("kafkify"):
                yield obj, c, c["args"][0]


def container_env(c, objects):
    """The variable names a container gets: env, plus every key of its envFrom sources."""
    names = {e["name"] for e in c.get("env", [])}
    by_name = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    for source in c.get("envFrom", []):
        if "configMapRef" in source:
            ref = by_name[("ConfigMap", source["configMapRef"]["name"])]
        else:
            ref = by_name[("Secret", source["secretRef"]["name"])]
        names |= set(ref.get("data", {})) | set(ref.get("stringData", {}))
    return names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_required_setting_is_set_in_kubernetes(overlay):
    objects = render(overlay)
    seen = set()
    for obj, c, name in kafkify_containers(objects):
        assert name in BINARIES, c["args"]
        seen.add(name)
        missing = needed(name, c["args"]) - container_env(c, objects)
        assert not missing, f"{overlay}: {obj['metadata']['name']}/{c['name']} lacks {sorted(missing)}"
        # Secret references point at keys that exist.
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                secret = next(o for o in objects if o["kind"] == "Secret" and o["metadata"]["name"] == ref["name"])
                assert ref["key"] in set(secret.get("data", {})) | set(secret.get("stringData", {})), ref
    assert seen == set(BINARIES)


def http_port(c):
    addr = next(e["value"] for e in c["env"] if e["name"] == "HTTP_ADDR")
    return int(addr.rsplit(":", 1)[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_scrape_annotations_hit_served_paths_and_ports(overlay):
    objects = render(overlay)
    paths = served_paths()
    checked = 0
    for obj, c, name in kafkify_containers(objects):
        if obj["kind"] == "Job":
            continue
        port = http_port(c)
        named = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert named["http"] == port, f"{name}: containerPort http != HTTP_ADDR"
        for probe in ("readinessProbe", "livenessProbe"):
            get = c[probe]["httpGet"]
            assert get["path"] in paths, (name, probe, get)
            assert named.get(get["port"], get["port"]) == port, (name, probe, get)
            checked += 1
        annotations = obj["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/path"] in paths
        assert int(annotations["prometheus.io/port"]) == port
    assert checked == 8


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_locked_down(overlay):
    for obj, c, name in kafkify_containers(render(overlay)):
        sc = c["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"]["drop"] == ["ALL"], name
        assert pod_spec(obj)["securityContext"]["runAsNonRoot"] is True, name
        assert {"requests", "limits"} <= set(c["resources"]), name


def test_relay_runs_two_replicas_and_everything_scalable_has_an_autoscaler_and_a_budget():
    objects = render("prod")
    kinds = {(o["kind"], o["metadata"]["name"]): o for o in objects}
    assert kinds[("Deployment", "cdc-relay")]["spec"]["replicas"] == 2
    for name in ("api-rest", "api-grpc", "worker"):
        assert ("HorizontalPodAutoscaler", name) in kinds, name
    for name in BINARIES:
        assert ("PodDisruptionBudget", name) in kinds, name
    assert ("NetworkPolicy", "default-deny") in kinds
    assert ("Job", "kafkify-migrate") in kinds
    # Prod brings no databases of its own.
    assert not any(o["kind"] == "StatefulSet" for o in objects)


def test_bootstrap_copy_matches_sql():
    assert (ROOT / "k8s/infra/bootstrap.sql").read_text() == (ROOT / "sql/bootstrap.sql").read_text()


# ------------------------------------------------------------------------------------------
# docker compose


def compose_config(*files):
    checker = ROOT / ".cache/bin" / f"composecheck-{os.environ.get('COMPOSECHECK_VERSION', 'v2.9.1')}"
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        cmd = ["docker", "compose"] + sum((["-f", f] for f in files), []) + ["config", "--format", "json"]
    else:
        assert checker.exists(), f"{checker} is missing: ./kafkify test builds it"
        cmd = [str(checker)] + sum((["-f", f] for f in files), [])
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT / "compose")
    return out.returncode, out.stdout, out.stderr


@pytest.mark.parametrize("file", COMPOSE_FILES)
def test_compose_file_loads(file):
    code, out, err = compose_config(file)
    assert code == 0, err
    project = json.loads(out)
    assert project["services"]


def test_a_broken_compose_file_is_refused(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("services:\n  x:\n    image: a\n    ports: {not: a list}\n    depends_on: [nowhere]\n")
    code, _, err = compose_config(str(bad))
    assert code != 0 and err


def compose_services():
    code, out, err = compose_config("docker-compose.yml")
    assert code == 0, err
    return json.loads(out)["services"]


def test_every_required_setting_is_set_in_compose():
    seen = set()
    for svc_name, svc in compose_services().items():
        if not svc.get("image", "").startswith("kafkify"):
            continue
        name = svc["command"][0]
        seen.add(name)
        missing = needed(name, svc["command"]) - set(svc.get("environment", {}))
        assert not missing, f"{svc_name} lacks {sorted(missing)}"
    assert seen == set(BINARIES)


def test_compose_health_checks_and_scrape_targets_hit_served_paths():
    services = compose_services()
    paths = served_paths()
    for svc_name, svc in services.items():
        if not svc.get("image", "").startswith("kafkify") or "migrate" in svc["command"]:
            continue
        port = int(svc["environment"]["HTTP_ADDR"].rsplit(":", 1)[1])
        url = svc["healthcheck"]["test"][-1]
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}(/[a-z]+)", url), url
        assert url.rsplit("/", 1)[0] and "/" + url.rsplit("/", 1)[1] in paths
    prometheus = yaml.safe_load((ROOT / "compose/prometheus.yml").read_text())
    for job in prometheus["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") in paths
        (target,) = job["static_configs"][0]["targets"]
        host, port = target.split(":")
        assert host in services, target
        assert services[host]["environment"]["HTTP_ADDR"].endswith(f":{port}"), target


# ------------------------------------------------------------------------------------------
# The image


def test_image_builds():
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker client on this machine: the image build cannot run here")
    info = subprocess.run([docker, "info"], capture_output=True, text=True)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["no answer"])[-1]
        pytest.skip(f"no Docker engine answers ({reason}): the image build cannot run here")
    out = subprocess.run([docker, "build", "-t", "kafkify:test", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    for name in BINARIES:
        run = subprocess.run([docker, "run", "--rm", "kafkify:test", name, "--version"], capture_output=True, text=True)
        assert run.returncode == 0 and name in run.stdout, run.stderr
