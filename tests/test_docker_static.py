"""docker/ checked without a Docker engine: the compose file against the Compose Specification's
JSON schema, the deployment's wiring (GPU reservations, Postgres, the shared store, the Spark
driver address), and every version the images install against the project's lock.

The schema is vendored (docker/compose-spec.schema.json, see docker/README.md for its source and
commit) because nothing can be downloaded at test time.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import stat
import subprocess
from importlib import metadata
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKER = os.path.join(ROOT, "docker")
COMPOSE = os.path.join(DOCKER, "docker-compose.yml")
COMPOSE_NFS = os.path.join(DOCKER, "docker-compose.nfs.yml")
DOCKERFILE = os.path.join(DOCKER, "Dockerfile")
STORE_MOUNT = "/data"
DISCOVERY_IN_IMAGE = "/opt/cerebro/docker/gpu-discovery.sh"
# Packages the images may install beyond the lock, each for a stated reason (docker/requirements-*.txt).
POSTGRES_STACK = {"apache-airflow-providers-postgres", "asyncpg", "psycopg", "psycopg-binary", "psycopg2-binary"}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: str) -> dict[str, tuple[str, str]]:
    """name -> (version, requirement as written), following `-r` includes; every line must pin."""
    pins: dict[str, tuple[str, str]] = {}
    with open(path) as f:
        for raw in f:
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.startswith("-r "):
                pins.update(read_pins(os.path.join(os.path.dirname(path), line[3:].strip())))
                continue
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[A-Za-z0-9_,.-]+\])?==([A-Za-z0-9_.+!-]+)", line)
            assert m, f"{path}: {line!r} is not an exact pin (name==version)"
            pins[norm(m.group(1))] = (m.group(3), line)
    return pins


LOCK = {k: v for k, (v, _) in read_pins(os.path.join(ROOT, "constraints.txt")).items()}


def env_example() -> dict[str, str]:
    values = {}
    with open(os.path.join(DOCKER, ".env.example")) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                key, _, value = line.partition("=")
                values[key] = value
    # the secrets are empty on purpose (each deployment generates its own): fill them for the check
    return {k: (v or f"dummy-{k.lower()}") for k, v in values.items()}


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(node: Any, env: dict[str, str], used: set[str] | None = None) -> Any:
    """Compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and $$ substitution."""
    if isinstance(node, dict):
        return {k: interpolate(v, env, used) for k, v in node.items()}
    if isinstance(node, list):
        return [interpolate(v, env, used) for v in node]
    if not isinstance(node, str):
        return node

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if used is not None:
            used.add(name)
        value = env.get(name)
        if op and op.startswith(":") and not value:
            value = None
        if value is None:
            if op and op.endswith("?"):
                raise KeyError(f"${{{name}}} is required: {arg}")
            return arg or ""
        return value

    return _VAR.sub(sub, node)


def load(path: str) -> dict[str, Any]:
    with open(path) as f:
        return yaml.safe_load(f)  # resolves the x-* anchors and `<<` merge keys, as Compose does


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    with open(os.path.join(DOCKER, "compose-spec.schema.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(load(COMPOSE), env_example())


def services_running(compose: dict[str, Any], needle: str) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if needle in " ".join(s.get("command") or [])}


def dockerfile_runs() -> list[str]:
    """Each RUN instruction of the Dockerfile, continuation lines joined."""
    with open(DOCKERFILE) as f:
        text = f.read().replace("\\\n", " ")
    return [line[4:].strip() for line in text.splitlines() if line.startswith("RUN ")]


def dockerfile_args() -> dict[str, str]:
    with open(DOCKERFILE) as f:
        return dict(re.findall(r"^ARG ([A-Z_]+)=(\S+)$", f.read(), re.M))


# ------------------------------------------------------------------------------------------------
# compose
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [COMPOSE, COMPOSE_NFS], ids=os.path.basename)
def test_compose_files_match_the_compose_spec(schema, path):
    validator = jsonschema.Draft201909Validator(schema)
    raw = load(path)
    for doc in (raw, interpolate(raw, env_example())):  # as written, and as Compose will read it
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_really_rejects_mistakes(schema):
    """A control: the vendored schema is strict enough to catch a typo and a wrong device entry."""
    validator = jsonschema.Draft201909Validator(schema)
    doc = interpolate(load(COMPOSE), env_example())
    doc["services"]["spark-master"]["imagee"] = "x"
    assert not validator.is_valid(doc)
    doc = interpolate(load(COMPOSE), env_example())
    del doc["services"]["spark-worker-0"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"]
    assert not validator.is_valid(doc)


def test_every_variable_is_documented_in_env_example():
    used: set[str] = set()
    for path in (COMPOSE, COMPOSE_NFS):
        interpolate(load(path), env_example(), used)
    assert used and used <= set(env_example()), f"not in docker/.env.example: {sorted(used - set(env_example()))}"


def test_gpu_workers_reserve_their_own_nvidia_gpu(compose):
    workers = services_running(compose, "org.apache.spark.deploy.worker.Worker")
    assert len(workers) >= 2
    seen: list[str] = []
    for name, svc in workers.items():
        devices = svc["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        dev = devices[0]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"], name
        ids = dev["device_ids"]
        seen += ids
        opts = dict(re.findall(r"-D(spark\.worker\.resource\.gpu\.\w+)=(\S+)", svc["environment"]["SPARK_WORKER_OPTS"]))
        # Spark's GPU count matches what Docker reserves, and it discovers them with nvidia-smi
        assert int(opts["spark.worker.resource.gpu.amount"]) == len(ids), name
        assert opts["spark.worker.resource.gpu.discoveryScript"] == DISCOVERY_IN_IMAGE, name
        assert svc["command"][-1] == "spark://spark-master:7077"
        assert svc["build"]["target"] == "spark"
    assert len(seen) == len(set(seen)), f"two workers reserve the same GPU: {seen}"


def test_airflow_runs_on_postgres(compose):
    svcs = compose["services"]
    airflow = {n: s for n, s in svcs.items() if (s.get("command") or [""])[0] == "airflow"}
    assert {"airflow-init", "airflow-apiserver", "airflow-scheduler", "airflow-dag-processor"} <= set(airflow)
    assert svcs["postgres"]["image"].startswith("postgres:")
    pg = svcs["postgres"]["environment"]
    for name, svc in airflow.items():
        env = svc["environment"]
        url = env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
        assert url == (f"postgresql+psycopg2://{pg['POSTGRES_USER']}:{pg['POSTGRES_PASSWORD']}@postgres:5432/"
                       f"{pg['POSTGRES_DB']}"), name
        assert svc["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert env["AIRFLOW__CORE__EXECUTOR"] == "LocalExecutor"
        assert svc["build"]["target"] == "airflow"
        if name != "airflow-init":
            assert svc["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully", name
    assert airflow["airflow-init"]["command"] == ["airflow", "db", "migrate"]
    # the Postgres driver stack the URL needs is installed in the Airflow image
    assert {"psycopg2-binary", "asyncpg"} <= set(read_pins(os.path.join(DOCKER, "requirements-airflow.txt")))


def test_the_spark_connection_points_at_the_master(compose):
    svcs = compose["services"]
    master = svcs["spark-master"]["command"]
    port = master[master.index("--port") + 1]
    for name, svc in svcs.items():
        conn = svc.get("environment", {}).get("AIRFLOW_CONN_SPARK_DEFAULT")
        if conn is not None:
            assert json.loads(conn) == {"conn_type": "spark", "host": f"spark://spark-master:{port}"}, name


def test_store_volume_is_shared_by_airflow_and_spark(compose):
    svcs = compose["services"]
    assert "store" in compose["volumes"]
    users = {n for n, s in svcs.items() if f"store:{STORE_MOUNT}" in (s.get("volumes") or [])}
    assert {"airflow-scheduler", "airflow-apiserver", "airflow-dag-processor"} <= users
    assert set(services_running(compose, "deploy.worker.Worker")) <= users
    for name in users:
        if (svcs[name].get("command") or [""])[0] == "airflow":
            assert svcs[name]["environment"]["CEREBRO_HOME"] == STORE_MOUNT  # the DAG's default paths
    nfs = interpolate(load(COMPOSE_NFS), env_example())
    assert nfs["volumes"]["store"]["driver_opts"]["type"] == "nfs"


def test_spark_client_settings_fit_the_workers(compose):
    conf: dict[str, str] = {}
    with open(os.path.join(DOCKER, "spark-defaults.conf")) as f:
        for line in f:
            if line.strip() and not line.lstrip().startswith("#"):
                key, value = line.split(None, 1)
                conf[key] = value.strip()
    svcs = compose["services"]
    # the drivers run in the scheduler's container (LocalExecutor): executors call back its name
    assert svcs["airflow-scheduler"].get("hostname") == conf["spark.driver.host"] == "airflow-scheduler"
    assert conf["spark.executor.cores"] == conf["spark.task.cpus"]  # one MOP worker owns an executor
    worker = next(iter(services_running(compose, "deploy.worker.Worker").values()))
    assert int(conf["spark.executor.cores"]) <= int(worker["environment"]["SPARK_WORKER_CORES"])
    assert conf["spark.executor.resource.gpu.amount"] == conf["spark.task.resource.gpu.amount"] == "1"
    assert conf["spark.executor.resource.gpu.discoveryScript"] == DISCOVERY_IN_IMAGE
    assert conf["spark.pyspark.python"] == "/usr/local/bin/python"  # the same path in both images
    mounts = svcs["airflow-scheduler"]["volumes"]
    assert "./spark-defaults.conf:/opt/spark-conf/spark-defaults.conf:ro" in mounts
    assert svcs["airflow-scheduler"]["environment"]["SPARK_CONF_DIR"] == "/opt/spark-conf"


# ------------------------------------------------------------------------------------------------
# images against the lock
# ------------------------------------------------------------------------------------------------
def test_pip_installs_use_the_lock_and_pinned_files():
    installs = [r for run in dockerfile_runs() for r in run.split("&&") if "pip install" in r]
    assert len(installs) == 4  # per image: dependencies from the lock, then the project itself
    for cmd in installs:
        tokens = shlex.split(cmd.strip())
        args = tokens[tokens.index("install") + 1:]
        if "--no-deps" in args:
            assert args == ["--no-deps", "."], cmd  # the project alone: every dependency came from the lock
            continue
        opts = dict(zip(args[::2], args[1::2]))
        assert len(args) == 4 and set(opts) == {"-r", "-c"}, f"only -r <file> -c constraints.txt: {cmd}"
        assert opts["-c"] == "constraints.txt"
        assert opts["-r"] in ("docker/requirements-airflow.txt", "docker/requirements-spark.txt")


@pytest.mark.parametrize("name", ["requirements-airflow.txt", "requirements-spark.txt"])
def test_image_pins_match_the_lock(name):
    tf_cuda = _tensorflow_cuda_pins()
    for pkg, (version, line) in read_pins(os.path.join(DOCKER, name)).items():
        if pkg in LOCK:
            assert version == LOCK[pkg], f"{name}: {line} but constraints.txt has {LOCK[pkg]}"
        elif pkg == "tensorflow":
            # the CUDA build of the very TensorFlow the lock holds as tensorflow-cpu
            assert line == f"tensorflow[and-cuda]=={LOCK['tensorflow-cpu']}", line
            assert version == dockerfile_args()["TENSORFLOW_VERSION"]
        elif pkg.startswith("nvidia-"):
            assert tf_cuda.get(pkg) == version, f"{line}: tensorflow's [and-cuda] pins {tf_cuda.get(pkg)}"
        else:
            assert pkg in POSTGRES_STACK and name == "requirements-airflow.txt", f"{name}: {line} is not in the lock"


def _tensorflow_cuda_pins() -> dict[str, str]:
    """The CUDA wheels TensorFlow's [and-cuda] extra pins, from the installed TensorFlow's metadata
    (tensorflow-cpu and tensorflow of one version declare the same extra)."""
    pins = {}
    for req in metadata.requires("tensorflow-cpu") or []:
        m = re.match(r"(nvidia-[a-z0-9-]+)\s*\(?==\s*([0-9.]+)\)?\s*;\s*extra\s*==\s*['\"]and-cuda['\"]", req)
        if m:
            pins[norm(m.group(1))] = m.group(2)
    assert pins, "the installed tensorflow-cpu declares no [and-cuda] pins"
    assert metadata.version("tensorflow-cpu") == LOCK["tensorflow-cpu"]
    return pins


def test_spark_image_installs_the_project_requirements_with_cuda_tensorflow():
    """requirements-spark.txt = ../requirements.txt - Airflow - tensorflow-cpu + tensorflow[and-cuda]."""
    project = read_pins(os.path.join(ROOT, "requirements.txt"))
    spark = read_pins(os.path.join(DOCKER, "requirements-spark.txt"))
    expected = {k: v for k, (v, _) in project.items() if not k.startswith("apache-airflow") and k != "tensorflow-cpu"}
    assert {k: v for k, (v, _) in spark.items() if k in expected} == expected
    assert set(spark) - set(expected) == {"tensorflow"} | {k for k in spark if k.startswith("nvidia-")}
    assert spark["tensorflow"][0] == project["tensorflow-cpu"][0] == "2.19.1"
    airflow = read_pins(os.path.join(DOCKER, "requirements-airflow.txt"))
    assert {k: v for k, (v, _) in airflow.items() if k in project} == {k: v for k, (v, _) in project.items()}


def test_images_run_python_java_and_spark_of_the_project():
    args = dockerfile_args()
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        requires = re.search(r'requires-python\s*=\s*"([^"]+)"', f.read()).group(1)
    assert requires == ">=3.11,<3.12" and args["PYTHON_VERSION"] == "3.11"
    assert args["SPARK_VERSION"] == LOCK["pyspark"] == "3.5.9"  # Spark = the pyspark package's own
    with open(DOCKERFILE) as f:
        text = f.read()
    assert "FROM python:${PYTHON_VERSION}-slim-bookworm AS base" in text
    assert "openjdk-17-jre-headless" in text
    assert "site-packages/pyspark" in text and "python3.11" in text  # SPARK_HOME in this Python
    # no second Spark or TensorFlow from anywhere else
    assert not re.search(r"spark-\d\.\d\.\d-bin|archive\.apache\.org|curl |wget ", text)
    assert set(re.findall(r"^FROM \S+ AS (\w+)$", text, re.M)) == {"base", "airflow", "spark"}


def test_copied_files_exist_and_reach_the_build_context():
    with open(DOCKERFILE) as f:
        text = f.read()
    sources = [s for line in re.findall(r"^COPY (.+)$", text, re.M) for s in line.split()[:-1]]
    with open(os.path.join(DOCKER, "Dockerfile.dockerignore")) as f:
        allowed = [line[1:].rstrip("/") for line in f.read().split() if line.startswith("!")]
    for src in sources:
        assert os.path.exists(os.path.join(ROOT, src)), f"COPY {src}: no such file in the repository"
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"COPY {src}: excluded by the dockerignore"
    assert os.access(os.path.join(DOCKER, "gpu-discovery.sh"), os.X_OK)


# ------------------------------------------------------------------------------------------------
# discovery scripts
# ------------------------------------------------------------------------------------------------
def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([script], env=env, capture_output=True, text=True, timeout=30)


def test_gpu_discovery_reports_nvidia_smi_indices(tmp_path):
    fake = tmp_path / "nvidia-smi"
    script = os.path.join(DOCKER, "gpu-discovery.sh")
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin"}
    for printed, addresses in (("0\n1\n", ["0", "1"]), ("3\n", ["3"]), ("", [])):
        fake.write_text(f"#!/bin/sh\nprintf '{printed.encode('unicode_escape').decode()}'\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        proc = _run(script, env)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"name": "gpu", "addresses": addresses}
    fake.unlink()
    proc = _run(script, env)  # no nvidia-smi: the worker must fail to start, loudly
    assert proc.returncode != 0 and "nvidia-smi not found" in proc.stderr


def test_fake_gpu_discovery(tmp_path):
    from tests.support.cluster import _FAKE_SCRIPT_TEXT

    copy = tmp_path / "fake"  # the fallback copy in tests.support.cluster must behave the same
    copy.write_text(_FAKE_SCRIPT_TEXT)
    copy.chmod(0o755)
    for script in (os.path.join(ROOT, "scripts", "fake-gpu-discovery"), str(copy)):
        base = {"PATH": "/usr/bin:/bin"}
        for value, addresses in (("0", ["0"]), ("0,1", ["0", "1"]), ("", [])):
            proc = _run(script, {**base, "CEREBRO_FAKE_GPU_ADDRESSES": value})
            assert proc.returncode == 0, proc.stderr
            assert json.loads(proc.stdout) == {"name": "gpu", "addresses": addresses}
    proc = _run(os.path.join(ROOT, "scripts", "fake-gpu-discovery"),
                {"PATH": "/usr/bin:/bin", "CEREBRO_FAKE_GPU_ADDRESSES": '0","x'})
    assert proc.returncode != 0
