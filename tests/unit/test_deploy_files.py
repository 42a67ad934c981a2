"""The deployment files in deploy/ parse, and name what the code has: its services, settings,
subjects, NATS users and ports; the generated NATS cluster files are current; every `duban`
command in the operations guide exists with the options it is given.

Settings are found by reading the code (every ``"DUBAN_…"``, ``NATS_URL`` and ``DATABASE_URL``
string in services/ and contracts/, and the ``…_FILE`` variant of every secret the notifier
reads), so a setting added to the code and to no deployment file fails here, and so does a file
that sets a variable nothing reads.
"""

from __future__ import annotations

import ast
import configparser
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from typer.testing import CliRunner

from contracts import subjects as subjects_module
from contracts.programme import Programme, load_default_programme
from services.common import natsauth
from services.common.leader import LEADERS_BUCKET
from services.common.supervisor import GATEWAY, SERVICES

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CLUSTER_DIR = DEPLOY / "nats-cluster"
SYSTEMD = DEPLOY / "systemd"
K8S = DEPLOY / "k8s"
GUIDE = DEPLOY / "README.md"
REGENERATE = "regenerate with: duban deploy nats-config --cluster 3 --out deploy/nats-cluster"

ALL_SERVICES = (*SERVICES, GATEWAY)
REPLICAS = 3  # nodes of the NATS cluster = stream replicas
CLIENT_PORT, CLUSTER_PORT, MONITOR_PORT, OPS_PORT, HTTP_PORT = 4222, 6222, 8222, 9464, 8321
# Set for every duban process of a multi-machine deployment (else it starts its own servers, or
# declares the streams at R1 against the others' R3).
REQUIRED = ("NATS_URL", "DATABASE_URL", "DUBAN_STATE_DIR", "DUBAN_STREAM_REPLICAS")
ENV_NAME = re.compile(r"^(?:DUBAN_[A-Z0-9_]*[A-Z0-9]|NATS_URL|DATABASE_URL)$")


# -- what the code reads ---------------------------------------------------------------------------
def _python_files() -> Iterator[Path]:
    for top in ("services", "contracts"):
        yield from sorted((ROOT / top).rglob("*.py"))


def _call_name(node: ast.Call) -> str:
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _settings_in_code() -> set[str]:
    """Every environment variable name the code reads (see the module's docstring)."""
    # Stream names such as DUBAN_EVENTS; the route password, which only the NATS nodes read.
    not_settings = {value for value in vars(subjects_module).values() if isinstance(value, str)}
    not_settings.add(natsauth.ROUTE_PASSWORD_ENV)
    found: set[str] = set()
    for path in _python_files():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and ENV_NAME.match(node.value):
                found.add(node.value)
            # A secret is read from NAME or from the file NAME_FILE names (the notifier's _secret).
            if isinstance(node, ast.Call) and _call_name(node) in ("_secret", "from_env"):
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and ENV_NAME.match(arg.value):
                        found.add(arg.value + "_FILE")
    return found - not_settings


@pytest.fixture(scope="module")
def programme() -> Programme:
    return load_default_programme()


@pytest.fixture(scope="module")
def settings() -> set[str]:
    found = _settings_in_code()
    assert set(REQUIRED) <= found and "DUBAN_OPS_ADDR" in found and "DUBAN_SMTP_PASSWORD_FILE" in found
    return found


@pytest.fixture(scope="module")
def users(programme: Programme) -> dict[str, natsauth.NatsUser]:
    return {u.password_env: u for u in natsauth.users_for([programme])}


@pytest.fixture(scope="module")
def layout() -> natsauth.ClusterLayout:
    return natsauth.cluster_layout(REPLICAS)


def _known(settings: set[str], users: dict[str, natsauth.NatsUser]) -> set[str]:
    """Settings plus every NATS user's password variable."""
    return settings | set(users)


# -- parsing the files -----------------------------------------------------------------------------
def _yaml_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A systemd unit file: sections of (key, value), keys repeated as systemd allows."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert current is not None and sep and key.strip() == key and key, f"{path.name}:{number}: {raw!r}"
        current.append((key, value))
    return sections


def _values(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def _env_file(path: Path) -> dict[str, tuple[str, bool]]:
    """``NAME=value`` lines, active or commented out (``#NAME=value``): name -> (value, active)."""
    entries: dict[str, tuple[str, bool]] = {}
    for raw in path.read_text(encoding="utf-8").splitlines():
        active = not raw.startswith("#")
        match = re.match(r"^#?([A-Z][A-Z0-9_]*)=(.*)$", raw)
        if match:
            assert match[1] not in entries or not active or not entries[match[1]][1], f"{match[1]} set twice"
            if active or match[1] not in entries:
                entries[match[1]] = (match[2], active)
        else:
            assert not raw or raw.startswith("#"), f"{path.name}: {raw!r}"
    return entries


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = _yaml_documents(DEPLOY / "compose.yaml")
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def k8s_objects() -> list[dict[str, Any]]:
    kustomization = _yaml_documents(K8S / "kustomization.yaml")[0]
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        objects += _yaml_documents(K8S / name)
    return objects


@pytest.fixture(scope="module")
def helm_values() -> dict[str, Any]:
    (doc,) = _yaml_documents(K8S / "nats-values.yaml")
    assert isinstance(doc, dict)
    return doc


def test_every_deploy_file_parses() -> None:
    seen = 0
    for path in sorted(DEPLOY.rglob("*")):
        if not path.is_file():
            continue
        if path.suffix in (".yaml", ".yml"):
            assert _yaml_documents(path), path
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".service":
            assert {"Unit", "Service", "Install"} <= set(_unit(path)), path
            parser = configparser.ConfigParser(strict=False, interpolation=None)
            parser.read_string(path.read_text(encoding="utf-8"))
            assert parser.has_option("Service", "ExecStart"), path
        elif path.name.endswith(".env.example"):
            assert _env_file(path), path
        elif path.name == "Dockerfile":
            _dockerfile(path)
        else:
            continue
        seen += 1
    assert seen >= 15


def _dockerfile(path: Path) -> dict[str, list[str]]:
    """Instructions (continuation lines joined); the JSON forms must be JSON."""
    instructions: dict[str, list[str]] = {}
    text = re.sub(r"\\\n", " ", path.read_text(encoding="utf-8"))
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            word, _, rest = line.strip().partition(" ")
            instructions.setdefault(word.upper(), []).append(rest.strip())
    for word in ("ENTRYPOINT", "CMD", "VOLUME"):
        for rest in instructions.get(word, []):
            assert isinstance(json.loads(rest), list), f"{word} {rest}"
    return instructions


def test_dockerfile_installs_duban_on_python_311_slim() -> None:
    instructions = _dockerfile(DEPLOY / "Dockerfile")
    assert instructions["FROM"] == ["python:3.11-slim"]
    assert any(r.startswith("pip install .") for r in instructions["RUN"])
    assert json.loads(instructions["ENTRYPOINT"][0]) == ["duban"]
    assert instructions["USER"] == ["duban"]
    env = " ".join(instructions["ENV"])
    assert f"DUBAN_OPS_ADDR=0.0.0.0:{OPS_PORT}" in env  # reachable by probes in a container
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    for copied in ("pyproject.toml", "README.md", "contracts/", "services/"):
        assert f"!{copied}" in ignore


# -- the generated NATS cluster files --------------------------------------------------------------
def test_committed_cluster_files_match_the_generator(tmp_path: Path, programme: Programme) -> None:
    written = natsauth.write_cluster_files(tmp_path, [programme], out_label="deploy/nats-cluster")
    assert sorted(p.name for p in written) == sorted(
        ["auth.conf", "nats-1.conf", "nats-2.conf", "nats-3.conf", natsauth.CLUSTER_ENV_EXAMPLE]
    )
    committed = sorted(p.name for p in CLUSTER_DIR.iterdir() if p.is_file())
    assert committed == sorted(p.name for p in written), f"deploy/nats-cluster has other files; {REGENERATE}"
    for path in written:
        assert (CLUSTER_DIR / path.name).read_text(encoding="utf-8") == path.read_text(encoding="utf-8"), (
            f"deploy/nats-cluster/{path.name} is out of date with the programme or natsauth.py; {REGENERATE}"
        )


def test_the_cli_writes_the_committed_cluster_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from services.cli import main
    from services.common import runtime

    app = main.app
    # The command configures logging; not onto CliRunner's stream, closed after the call.
    monkeypatch.setattr(runtime, "configure_logging", lambda *args, **kwargs: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DUBAN_PROGRAMMES", raising=False)
    result = CliRunner().invoke(app, ["deploy", "nats-config", "--cluster", "3"])
    assert result.exit_code == 0, result.output
    for path in CLUSTER_DIR.iterdir():
        assert (tmp_path / "deploy" / "nats-cluster" / path.name).read_text(encoding="utf-8") == path.read_text(
            encoding="utf-8"
        ), path.name
    refused = CliRunner().invoke(app, ["deploy", "nats-config", "--cluster", "2", "--out", "x"])
    assert refused.exit_code == 2 and "at least 3 nodes" in refused.output
    refused = CliRunner().invoke(app, ["deploy", "nats-config", "--cluster", "3", "--client-port", "1,2"])
    assert refused.exit_code == 2 and "one per node" in refused.output


def test_node_configs_agree_with_each_other(layout: natsauth.ClusterLayout) -> None:
    texts = {node.name: (CLUSTER_DIR / node.config_name).read_text(encoding="utf-8") for node in layout.nodes}
    for node in layout.nodes:
        text = texts[node.name]
        assert f'server_name: "{node.name}"' in text
        assert f'listen: "0.0.0.0:{CLIENT_PORT}"' in text
        assert f'listen: "0.0.0.0:{CLUSTER_PORT}"' in text
        assert f'http: "127.0.0.1:{MONITOR_PORT}"' in text
        assert "sync_interval: always" in text and 'include "auth.conf"' in text
        assert f"password: ${natsauth.ROUTE_PASSWORD_ENV}" in text
        routes = re.search(r"routes: \[(.*?)\]", text, re.S)
        assert routes is not None
        assert routes[1].split() == [f"${n.route_url_env}" for n in layout.nodes]
    assert len({re.sub(r"nats-\d", "", t) for t in texts.values()}) == 1  # the same but for the name


def test_cluster_env_example_lists_exactly_what_the_nodes_read(
    layout: natsauth.ClusterLayout, users: dict[str, natsauth.NatsUser]
) -> None:
    env = _env_file(CLUSTER_DIR / natsauth.CLUSTER_ENV_EXAMPLE)
    expected = {natsauth.ROUTE_PASSWORD_ENV, *(n.route_url_env for n in layout.nodes), *users}
    assert set(env) == expected
    assert all(active and value == natsauth.SECRET_PLACEHOLDER for value, active in env.values())
    referenced = set()
    for path in CLUSTER_DIR.glob("*.conf"):
        referenced |= set(re.findall(r"\$(DUBAN_[A-Z0-9_]*[A-Z0-9])\b", path.read_text(encoding="utf-8")))
    assert referenced == expected


# -- systemd ---------------------------------------------------------------------------------------
def test_systemd_units_one_per_service() -> None:
    units = {p.name for p in SYSTEMD.glob("*.service")}
    assert units == {f"duban-{s}.service" for s in ALL_SERVICES} | {"duban-nats@.service"}
    ops_ports: set[str] = set()
    for name in ALL_SERVICES:
        unit = _unit(SYSTEMD / f"duban-{name}.service")
        assert _values(unit, "Service", "ExecStart") == [f"/opt/duban/venv/bin/duban up --services {name}"]
        assert _values(unit, "Service", "EnvironmentFile") == [
            "/etc/duban/duban.env",
            f"-/etc/duban/duban-{name}.env",
        ]
        assert _values(unit, "Service", "User") == ["duban"]
        assert _values(unit, "Service", "Restart") == ["on-failure"]
        for key, value in (
            ("NoNewPrivileges", "yes"),
            ("ProtectSystem", "strict"),
            ("ProtectHome", "yes"),
            ("PrivateTmp", "yes"),
            ("StateDirectory", "duban"),
            ("CapabilityBoundingSet", ""),
        ):
            assert _values(unit, "Service", key) == [value], (name, key)
        (environment,) = _values(unit, "Service", "Environment")
        key, _, ops = environment.partition("=")
        assert key == "DUBAN_OPS_ADDR" and ops.startswith("127.0.0.1:")
        ops_ports.add(ops)
        assert _values(unit, "Install", "WantedBy") == ["multi-user.target"]
    assert len(ops_ports) == len(ALL_SERVICES)  # all of them fit on one machine


def test_systemd_nats_unit_runs_a_generated_node() -> None:
    unit = _unit(SYSTEMD / "duban-nats@.service")
    assert _values(unit, "Service", "ExecStart") == ["/opt/duban/venv/bin/nats-server -c /etc/duban/nats/%i.conf"]
    assert _values(unit, "Service", "EnvironmentFile") == ["/etc/duban/nats.env"]
    assert _values(unit, "Service", "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _values(unit, "Service", "KillSignal") == ["SIGUSR2"]  # lame duck mode
    # The JetStream directory the generated node files name.
    (state,) = _values(unit, "Service", "StateDirectory")
    assert natsauth.cluster_layout().store_dir == f"/var/lib/{state}"
    assert _values(unit, "Service", "ProtectSystem") == ["strict"]


def test_duban_env_example_lists_every_setting(settings: set[str], users: dict[str, natsauth.NatsUser]) -> None:
    env = _env_file(SYSTEMD / "duban.env.example")
    assert set(env) - _known(settings, users) == set(), "set in duban.env.example but read by no code"
    assert settings - set(env) == set(), "read by the code but missing from deploy/systemd/duban.env.example"
    for name in REQUIRED:
        assert env[name][1], f"{name} must be set"
    assert env["DUBAN_STREAM_REPLICAS"] == (str(REPLICAS), True)
    # The units set the ops port: an EnvironmentFile= value would override theirs.
    assert not env["DUBAN_OPS_ADDR"][1]
    for name in ALL_SERVICES:
        var = natsauth.password_env_var(f"svc-{name}")
        assert var in users and env[var] == (natsauth.SECRET_PLACEHOLDER, True)
    hosts = [u.split("://")[1] for u in env["NATS_URL"][0].split(",")]
    assert hosts == [f"{n.host}:{n.client_port}" for n in natsauth.cluster_layout().nodes]


# -- Docker Compose --------------------------------------------------------------------------------
def _duban_services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in compose["services"].items() if str(svc.get("image", "")).startswith("duban")}


def test_compose_runs_every_service_twice_and_the_gateway(compose: dict[str, Any]) -> None:
    services = _duban_services(compose)
    assert set(services) == set(ALL_SERVICES)
    for name, svc in services.items():
        assert svc["command"] == ["up", "--services", name]
        assert svc["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / ".." / svc["build"]["dockerfile"]).resolve() == DEPLOY / "Dockerfile"
        assert f"{OPS_PORT}/readyz" in " ".join(svc["healthcheck"]["test"])
        if name in SERVICES:
            assert svc["deploy"]["replicas"] == 2, name
    assert services[GATEWAY]["ports"] == [f"{HTTP_PORT}:{HTTP_PORT}"]
    assert compose["services"]["postgres"]["image"].startswith("postgres:")


def test_compose_environment_is_what_the_code_reads(
    compose: dict[str, Any], settings: set[str], users: dict[str, natsauth.NatsUser], layout: natsauth.ClusterLayout
) -> None:
    nats_nodes = [name for name in compose["services"] if name.startswith("nats-")]
    for name, svc in _duban_services(compose).items():
        env: dict[str, str] = svc["environment"]
        assert set(env) <= _known(settings, users), name
        for required in REQUIRED:
            assert env.get(required), (name, required)
        assert env["DUBAN_STREAM_REPLICAS"] == str(REPLICAS) == str(len(nats_nodes))
        assert env["DUBAN_OPS_ADDR"] == f"0.0.0.0:{OPS_PORT}"
        assert env["NATS_URL"] == ",".join(f"nats://{n}:{CLIENT_PORT}" for n in nats_nodes)
        passwords = {k for k in env if k.startswith(natsauth.PASSWORD_ENV_PREFIX)}
        assert passwords == {natsauth.password_env_var(f"svc-{name}")}, "each service gets its own password only"
        assert env[next(iter(passwords))].startswith("${")  # from deploy/.env, never in the file
    assert _duban_services(compose)[GATEWAY]["environment"]["DUBAN_HTTP_ADDR"] == f"0.0.0.0:{HTTP_PORT}"


def test_compose_nats_nodes_are_the_generated_ones(compose: dict[str, Any], layout: natsauth.ClusterLayout) -> None:
    nodes = {name: svc for name, svc in compose["services"].items() if name.startswith("nats-")}
    assert sorted(nodes) == [n.name for n in layout.nodes]
    for node in layout.nodes:
        svc = nodes[node.name]
        assert svc["image"].startswith("nats:")
        assert svc["command"] == ["--config", f"/etc/duban/nats/{node.config_name}"]
        assert "./nats-cluster:/etc/duban/nats:ro" in svc["volumes"]
        assert f"{node.name}:{layout.store_dir}" in svc["volumes"]
        assert svc["ports"][0].endswith(f":{node.client_port}")
        assert f"http://127.0.0.1:{node.monitor_port}/healthz" in " ".join(svc["healthcheck"]["test"])
        assert svc["env_file"] == [".env"]
        routes = svc["environment"]
        assert set(routes) == {n.route_url_env for n in layout.nodes}
        for peer in layout.nodes:
            password = "${" + natsauth.ROUTE_PASSWORD_ENV + ":?set it in deploy/.env}"
            assert routes[peer.route_url_env] == peer.route_url(password)


# -- Kubernetes ------------------------------------------------------------------------------------
def _by_kind(objects: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in objects if o["kind"] == kind}


def test_k8s_deployments_two_of_each_with_probes_and_metrics(k8s_objects: list[dict[str, Any]]) -> None:
    deployments = _by_kind(k8s_objects, "Deployment")
    assert set(deployments) == {f"duban-{s}" for s in ALL_SERVICES}
    for name in ALL_SERVICES:
        deployment = deployments[f"duban-{name}"]
        assert deployment["spec"]["replicas"] == 2
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations == {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(OPS_PORT),
            "prometheus.io/path": "/metrics",
        }
        (container,) = template["spec"]["containers"]
        assert container["args"] == ["up", "--services", name]
        assert {"name": "ops", "containerPort": OPS_PORT} in container["ports"]
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "ops"}
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"configMapRef": {"name": "duban-config"}} in container["envFrom"]
    service = _by_kind(k8s_objects, "Service")["duban-gateway"]
    assert service["spec"]["selector"] == {"app.kubernetes.io/name": "duban-gateway"}
    assert service["spec"]["ports"] == [{"name": "http", "port": HTTP_PORT, "targetPort": "http"}]
    assert set(_by_kind(k8s_objects, "PodDisruptionBudget")) == {f"duban-{s}" for s in ALL_SERVICES}


def test_k8s_environment_is_what_the_code_reads(
    k8s_objects: list[dict[str, Any]], settings: set[str], users: dict[str, natsauth.NatsUser]
) -> None:
    config = _by_kind(k8s_objects, "ConfigMap")["duban-config"]["data"]
    assert set(config) <= settings
    assert config["DUBAN_STREAM_REPLICAS"] == str(REPLICAS)
    assert config["DUBAN_OPS_ADDR"] == f"0.0.0.0:{OPS_PORT}"
    for name, deployment in _by_kind(k8s_objects, "Deployment").items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= _known(settings, users), name
        for required in REQUIRED:
            assert required in env or config.get(required), (name, required)
        service = name.removeprefix("duban-")
        own = natsauth.password_env_var(f"svc-{service}")
        assert {k for k in env if k.startswith(natsauth.PASSWORD_ENV_PREFIX)} == {own}
        assert env[own]["valueFrom"]["secretKeyRef"] == {"name": "duban-nats-passwords", "key": own}
        assert env["DATABASE_URL"]["valueFrom"]["secretKeyRef"]["name"] == "duban-database"
        if service == GATEWAY:
            assert env["DUBAN_HTTP_ADDR"]["value"] == f"0.0.0.0:{HTTP_PORT}"
            assert {"name": "http", "containerPort": HTTP_PORT} in container["ports"]


def test_k8s_nats_values_make_the_cluster_the_services_expect(
    helm_values: dict[str, Any], k8s_objects: list[dict[str, Any]]
) -> None:
    config = helm_values["config"]
    replicas = config["cluster"]["replicas"]
    assert config["cluster"]["enabled"] is True and replicas == REPLICAS
    assert config["cluster"]["port"] == CLUSTER_PORT and config["nats"]["port"] == CLIENT_PORT
    jetstream = config["jetstream"]
    assert jetstream["enabled"] and jetstream["fileStore"]["enabled"] and jetstream["fileStore"]["pvc"]["enabled"]
    assert jetstream["merge"]["sync_interval"] == "always"
    assert Path(config["merge"]["$include"]).name == natsauth.AUTH_CONF
    name = helm_values["fullnameOverride"]
    pods = [f"{name}-{i}" for i in range(replicas)]
    route_vars = [natsauth.route_url_env_var(p) for p in pods]
    assert config["cluster"]["merge"]["routes"] == [f"<< ${v} >>" for v in route_vars]
    assert config["cluster"]["merge"]["authorization"]["password"] == f"<< ${natsauth.ROUTE_PASSWORD_ENV} >>"
    env = helm_values["container"]["env"]
    for pod, var in zip(pods, route_vars, strict=True):
        assert env[var] == f"nats-route://route:$({natsauth.ROUTE_PASSWORD_ENV})@{pod}.{name}-headless:{CLUSTER_PORT}"
    # The route URLs are built from a variable defined before them (Kubernetes expands earlier ones only).
    assert sorted(env).index(natsauth.ROUTE_PASSWORD_ENV) < min(sorted(env).index(v) for v in route_vars)
    assert helm_values["container"]["merge"]["envFrom"] == [{"secretRef": {"name": "duban-nats-passwords"}}]
    nats_url = _by_kind(k8s_objects, "ConfigMap")["duban-config"]["data"]["NATS_URL"]
    assert nats_url == ",".join(f"nats://{p}.{name}-headless:{CLIENT_PORT}" for p in pods)


# -- the operations guide --------------------------------------------------------------------------
def _guide_code() -> str:
    text = GUIDE.read_text(encoding="utf-8")
    return (
        "\n".join(re.findall(r"```(?:sh|python)?\n(.*?)```", text, re.S))
        + "\n"
        + " ".join(re.findall(r"`([^`\n]+)`", text))
    )


def _duban_invocations() -> Iterator[list[str]]:
    """The arguments of every `duban ...` command line of the guide (code blocks and inline code):
    ``duban`` (or ``…/bin/duban``) at the start of a command, after ``VAR=value`` assignments, or
    as the command of ``docker compose … exec <service>``."""
    text = GUIDE.read_text(encoding="utf-8")
    lines: list[str] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    lines += re.findall(r"`([^`\n]*\bduban [a-z][^`\n]*)`", text)
    for line in lines:
        words = shlex.split(line.split(" #", 1)[0].replace("$(date +%F)", "DATE"))
        for i, word in enumerate(words):
            if word != "duban" and not word.endswith("/bin/duban"):
                continue
            before = words[:i]
            starts = all(re.match(r"^[A-Z_][A-Z0-9_]*=", w) for w in before) or (
                len(before) >= 2 and before[-2] == "exec"
            )
            if starts and i + 1 < len(words) and re.match(r"^[a-z]", words[i + 1]):
                yield words[i + 1 :]
            break


def _subcommands(command: Any) -> dict[str, Any]:
    """A command group's commands (typer ships its own click: no isinstance against click's)."""
    found = getattr(command, "commands", None)
    return found if isinstance(found, dict) else {}


def test_every_duban_command_in_the_guide_exists() -> None:
    from services.cli.main import app

    root = typer.main.get_command(app)
    checked = 0
    for words in _duban_invocations():
        command: Any = root
        rest = list(words)
        path: list[str] = []
        while _subcommands(command) and rest and not rest[0].startswith("-"):
            sub = _subcommands(command).get(rest[0])
            assert sub is not None, f"`duban {' '.join(words)}`: no command {' '.join([*path, rest[0]])}"
            command, path = sub, [*path, rest.pop(0)]
        assert not _subcommands(command), f"`duban {' '.join(words)}` names a group, not a command"
        options = {"--help"} | {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]}
        if path == ["up"] and "--services" in rest:
            assert rest[rest.index("--services") + 1] in (*ALL_SERVICES, "<name>"), words
        for word in rest:
            if word.startswith("--"):
                assert word.split("=")[0] in options, f"`duban {' '.join(words)}`: {command.name} has no {word}"
        checked += 1
    assert checked >= 20


def test_guide_names_the_streams_subjects_and_bucket_of_the_code(
    settings: set[str], users: dict[str, natsauth.NatsUser]
) -> None:
    code = _guide_code()
    streams = {v for v in vars(subjects_module).values() if isinstance(v, str)}
    names = set(re.findall(r"\bDUBAN_[A-Z0-9_]*[A-Z0-9]\b", code))
    assert {"DUBAN_EVENTS", "DUBAN_REFUSALS"} <= names
    for name in names:
        # A stream of the code, a setting, or a NATS node's variable.
        nats_node = name.startswith((natsauth.PASSWORD_ENV_PREFIX, natsauth.ROUTE_URL_ENV_PREFIX))
        assert name in streams | _known(settings, users) or nats_node or name == natsauth.ROUTE_PASSWORD_ENV, name
    for subject in set(re.findall(r"\bduban\.(?:ops|query|submit|events)\.[a-z_.]+[a-z]", code)):
        assert _subject_defined(subject), subject
    assert LEADERS_BUCKET in code


def _subject_defined(subject: str) -> bool:
    """A subject the contracts define: one of their constants, or under one of their prefixes."""
    from contracts import escalation, ledger, notifier

    values = {
        v
        for module in (subjects_module, ledger, escalation, notifier)
        for v in vars(module).values()
        if isinstance(v, str) and v.startswith("duban.")
    }
    return subject in values or any(subject.startswith(v + ".") for v in values if not v.endswith(">"))
