"""The deployment files (deploy/, compose.yaml, .dockerignore), checked without Docker or RabbitMQ.

No YAML parser is a dependency, so compose.yaml is read as text: a service's block, with the
blocks its ``<<: *anchor`` merges, is searched for the keys a test needs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from jobflow import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
RABBITMQ_CONF = DEPLOY / "rabbitmq" / "rabbitmq.conf"
CLUSTER_CONF = DEPLOY / "rabbitmq" / "cluster.conf"
ADVANCED_CONFIG = DEPLOY / "rabbitmq" / "advanced.config"

#: rabbitmq.conf keys checked to exist, with these values' types, in deps/rabbit/priv/schema/rabbit.schema
#: of RabbitMQ v4.0.9, v4.1.8, v4.2.9 and v4.3.5 (``$user``/``$node`` are the schema's wildcards).
KNOWN_KEYS = {
    "default_queue_type",
    "consumer_timeout",
    "vm_memory_high_watermark.relative",
    "vm_memory_high_watermark.absolute",
    "total_memory_available_override_value",
    "disk_free_limit.absolute",
    "loopback_users.$user",
    "cluster_formation.peer_discovery_backend",
    "cluster_formation.classic_config.nodes.$node",
    "cluster_formation.target_cluster_size_hint",
    "cluster_partition_handling",
    "quorum_queue.continuous_membership_reconciliation.enabled",
    "quorum_queue.continuous_membership_reconciliation.target_group_size",
}
CONF_LINE = re.compile(r"^(?P<key>[a-z0-9_.$]+) = (?P<value>\S.*)$")


# --- rabbitmq.conf and cluster.conf ----------------------------------------------------------------


def conf_settings(path: Path) -> dict[str, str]:
    """``key = value`` lines (comments on lines of their own), refusing anything else and repeated keys."""
    settings: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = CONF_LINE.match(line)
        assert match, f"{path.name}:{number}: not a `key = value` line: {line!r}"
        key, value = match["key"], match["value"]
        assert key not in settings, f"{path.name}:{number}: {key} is set twice"
        settings[key] = value
    return settings


def schema_key(key: str) -> str:
    if key.startswith("loopback_users."):
        return "loopback_users.$user"
    if key.startswith("cluster_formation.classic_config.nodes."):
        return "cluster_formation.classic_config.nodes.$node"
    return key


@pytest.mark.parametrize("path", [RABBITMQ_CONF, CLUSTER_CONF], ids=lambda p: p.name)
def test_conf_files_use_only_keys_that_rabbitmq_4_knows(path: Path) -> None:
    unknown = [key for key in conf_settings(path) if schema_key(key) not in KNOWN_KEYS]
    assert not unknown, f"{path.name}: keys not verified against RabbitMQ 4's schema: {unknown}"


def test_rabbitmq_conf_values() -> None:
    settings = conf_settings(RABBITMQ_CONF)
    assert settings["default_queue_type"] == "quorum"
    assert 0 < float(settings["vm_memory_high_watermark.relative"]) < 1
    assert re.fullmatch(r"\d+(GB|GiB|MB|MiB)", settings["disk_free_limit.absolute"])
    assert settings["loopback_users.guest"] == "true", "guest must stay loopback-only"


def test_consumer_timeout_outlasts_the_default_time_limit() -> None:
    """RabbitMQ closes a channel whose delivery stays unacknowledged past consumer_timeout."""
    import jobflow

    timeout = timedelta(milliseconds=int(conf_settings(RABBITMQ_CONF)["consumer_timeout"]))
    assert timeout > jobflow.default_registry.time_limit
    assert timeout >= timedelta(hours=1)


def test_advanced_config_lowers_the_dead_letter_confirm_timeout() -> None:
    text = ADVANCED_CONFIG.read_text()
    terms = "\n".join(line.split("%", 1)[0] for line in text.splitlines())  # Erlang comments start with %
    assert re.search(r"\{\s*rabbit\s*,\s*\[\s*\{\s*dead_letter_worker_publisher_confirm_timeout\s*,\s*2000\s*\}", terms)
    assert terms.strip().endswith("]."), "advanced.config is one Erlang list ending with `].`"
    for opening, closing in ("[]", "{}"):
        assert terms.count(opening) == terms.count(closing), f"unbalanced {opening}{closing}"


@pytest.mark.skipif(shutil.which("erl") is None, reason="no Erlang (erl) on PATH to read advanced.config with")
def test_advanced_config_is_read_by_erlang() -> None:
    expression = f'{{ok, Terms}} = file:consult("{ADVANCED_CONFIG}"), io:format("~p", [Terms]), halt().'
    out = subprocess.run(
        ["erl", "-noshell", "-eval", expression], check=False, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert re.sub(r"\s", "", out.stdout) == "[[{rabbit,[{dead_letter_worker_publisher_confirm_timeout,2000}]}]]"


# --- compose.yaml ----------------------------------------------------------------------------------


def top_level_block(name: str, indent: int = 0) -> str:
    """The lines of the mapping entry ``name:`` at ``indent`` spaces, up to the next entry at that indent."""
    lines = COMPOSE.read_text().splitlines()
    head = re.compile(rf"^ {{{indent}}}{re.escape(name)}:(\s|$)")
    for start, line in enumerate(lines):
        if head.match(line):
            block = [line]
            for following in lines[start + 1 :]:
                stripped = following.lstrip()
                if stripped and not stripped.startswith("#") and len(following) - len(stripped) <= indent:
                    break
                block.append(following)
            return "\n".join(block)
    raise AssertionError(f"compose.yaml has no {name!r} at indent {indent}")


def anchors() -> dict[str, str]:
    """Top-level extension fields (``x-name: &anchor``) by anchor name."""
    found = re.findall(r"^(x-[\w-]+): &([\w-]+)", COMPOSE.read_text(), re.MULTILINE)
    return {anchor: top_level_block(key) for key, anchor in found}


def service(name: str) -> str:
    """A service's block followed by the blocks it merges with ``<<: *anchor``."""
    block = top_level_block(name, indent=2)
    merged = [anchors()[a] for a in re.findall(r"^ {4}<<: \*([\w-]+)", block, re.MULTILINE)]
    return "\n".join([block, *merged])


def services() -> list[str]:
    return re.findall(r"^ {2}([\w-]+):\s*$", top_level_block("services"), re.MULTILINE)


def duration(text: str) -> timedelta:
    """A compose duration such as ``11m``, ``90s`` or ``1h30m``."""
    parts = re.findall(r"(\d+)(h|m|s)", text)
    assert parts, f"unexpected duration {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"unexpected duration {text!r}"
    unit = {"h": 3600, "m": 60, "s": 1}
    return timedelta(seconds=sum(int(n) * unit[u] for n, u in parts))


def test_compose_has_rabbitmq_and_a_worker() -> None:
    names = services()
    assert {"rabbitmq", "worker"} <= set(names)
    assert {"rabbit1", "rabbit2", "rabbit3", "cluster-worker"} <= set(names)


def test_every_file_compose_mounts_exists() -> None:
    mounts = re.findall(r"^\s*- \./([^:\s]+):", COMPOSE.read_text(), re.MULTILINE)
    assert mounts, "compose.yaml mounts the RabbitMQ configuration"
    missing = [m for m in mounts if not (ROOT / m).is_file()]
    assert not missing, f"compose.yaml mounts files that do not exist: {missing}"


@pytest.mark.parametrize("name", ["rabbitmq", "rabbit1", "rabbit2", "rabbit3"])
def test_rabbitmq_nodes(name: str) -> None:
    block = service(name)
    assert re.search(r"^\s+image: rabbitmq:4[.\w-]*management\s*$", block, re.MULTILINE)
    assert re.search(r"^\s+nofile: (\d+)\s*$", block, re.MULTILINE)
    assert all(int(n) >= 65536 for n in re.findall(r"nofile:\s*(\d+)", block))
    assert '"rabbitmq-diagnostics"' in block, "a healthcheck the worker's depends_on can wait for"
    # The image's conf.d/10-defaults.conf would override /etc/rabbitmq/rabbitmq.conf: mount it later.
    assert "./deploy/rabbitmq/rabbitmq.conf:/etc/rabbitmq/conf.d/90-jobflow.conf:ro" in block
    assert "./deploy/rabbitmq/advanced.config:/etc/rabbitmq/advanced.config:ro" in block
    assert re.search(rf"^\s+hostname: {name}\s*$", block, re.MULTILINE), "the node's name must not change"
    assert re.search(r"^\s+- [\w-]+-data:/var/lib/rabbitmq\s*$", block, re.MULTILINE), "a named data volume"


@pytest.mark.parametrize(
    ("name", "brokers"), [("worker", ["rabbitmq"]), ("cluster-worker", ["rabbit1", "rabbit2", "rabbit3"])]
)
def test_workers(name: str, brokers: list[str]) -> None:
    block = service(name)
    assert re.search(r"^\s+dockerfile: deploy/Dockerfile\s*$", block, re.MULTILINE)
    grace = re.search(r"^\s+stop_grace_period: (\S+)\s*$", block, re.MULTILINE)
    assert grace, f"{name} needs a stop_grace_period, or docker kills running jobs after 10 s"
    # A stopping worker drains for JOBFLOW_SHUTDOWN_TIMEOUT (10 minutes, as jobflow's time limit).
    assert duration(grace[1]) > timedelta(seconds=Settings.model_fields["shutdown_timeout"].default)
    url = re.search(r"JOBFLOW_BROKER_URL: (?:>-\s*)?(\S+)", block)
    assert url, f"{name} sets JOBFLOW_BROKER_URL"
    assert [u.rsplit("@", 1)[1] for u in url[1].split(",")] == [f"{b}:5672/" for b in brokers]
    for broker in brokers:
        assert re.search(rf"^\s+{broker}:\s*\n\s+condition: service_healthy\s*$", block, re.MULTILINE)


def test_cluster_conf_names_the_cluster_nodes() -> None:
    nodes = {k: v for k, v in conf_settings(CLUSTER_CONF).items() if k.startswith("cluster_formation.classic_config.")}
    with_cluster_conf = [s for s in services() if "deploy/rabbitmq/cluster.conf:" in service(s)]
    assert sorted(nodes.values()) == sorted(f"rabbit@{s}" for s in with_cluster_conf)
    assert conf_settings(CLUSTER_CONF)["cluster_formation.peer_discovery_backend"] == "classic_config"


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    checker = Path(sys.executable).with_name("check-jsonschema")
    command = [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)]
    return subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)


def test_compose_validates_against_the_compose_specification() -> None:
    """The compose-spec JSON schema (vendored by check-jsonschema) needs neither Docker nor a network."""
    out = check_compose_schema(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path: Path) -> None:
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("    depends_on:\n", "    depends_onn:\n", 1))
    out = check_compose_schema(broken)
    assert out.returncode != 0
    assert "depends_onn" in out.stdout + out.stderr


def test_the_producer_runs_the_demo_once_against_the_worker() -> None:
    block = top_level_block("producer", indent=2)
    assert '["python", "-m", "actors.produce"]' in block
    assert (ROOT / "actors" / "produce.py").is_file()
    assert re.search(r'^\s+restart: "no"\s*$', block, re.MULTILINE)
    assert "JOBFLOW_BROKER_URL: amqp://jobflow:${RABBITMQ_PASSWORD}@rabbitmq:5672/" in block
    assert re.search(r"^\s+worker:\s*\n\s+condition: service_started\s*$", block, re.MULTILINE)


def test_the_worker_serves_metrics() -> None:
    block = service("worker")
    port = re.search(r'JOBFLOW_METRICS_PORT: "(\d+)"', block)
    assert port, "the worker serves /metrics"
    assert re.search(rf'- "127\.0\.0\.1:\d+-\d+:{port[1]}"', block), "published on loopback, a port per replica"


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], check=False, capture_output=True, timeout=30).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_config_is_valid() -> None:
    """`config` needs no Docker engine, only the compose client: it parses, merges and interpolates."""
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed: compose.yaml not validated")
    env = {**os.environ, "RABBITMQ_PASSWORD": "test-password"}
    for profile in ([], ["--profile", "cluster"]):
        args = [*command, "-f", str(COMPOSE), *profile, "config", "--quiet"]
        out = subprocess.run(args, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)
        assert out.returncode == 0, out.stderr
    if (ROOT / ".env").exists():
        return  # compose reads RABBITMQ_PASSWORD from .env: the refusal below cannot be seen here
    missing = {k: v for k, v in os.environ.items() if k != "RABBITMQ_PASSWORD"}
    args = [*command, "-f", str(COMPOSE), "config", "--quiet"]
    out = subprocess.run(args, check=False, capture_output=True, text=True, env=missing, cwd=ROOT, timeout=60)
    assert out.returncode != 0, "compose.yaml must refuse to run without RABBITMQ_PASSWORD"


# --- the Dockerfile --------------------------------------------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined; heredoc bodies left out."""
    result: list[tuple[str, str]] = []
    lines = iter(DOCKERFILE.read_text().splitlines())
    for first in lines:
        if not first.strip() or first.lstrip().startswith("#"):
            continue
        line = first
        while line.endswith("\\"):
            line = line[:-1] + " " + next(lines).strip()
        word, _, rest = line.strip().partition(" ")
        result.append((word.upper(), rest.strip()))
        heredoc = re.search(r"<<-?'?(\w+)'?", rest)
        if heredoc:
            for body in lines:
                if body == heredoc[1]:
                    break
    return result


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def test_dockerfile_is_multi_stage_on_a_slim_python() -> None:
    steps = instructions()
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2, "a builder stage and a final stage"
    assert any(" AS builder" in f for f in froms[:-1])
    base = dict(re.findall(r"(\w+)=(\S+)", " ".join(args for word, args in steps if word == "ARG")))
    final = froms[-1].split()[0]
    final = re.sub(r"\$\{(\w+)\}", lambda m: base[m[1]], final)
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", final), final
    assert any(word == "COPY" and args.startswith("--from=builder") for word, args in final_stage())


def test_dockerfile_runs_dramatiq_as_a_non_root_user() -> None:
    stage = final_stage()
    words = [word for word, _ in stage]
    users = [args for word, args in stage if word == "USER"]
    assert users, "the final stage sets USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert words.index("USER") < words.index("CMD")
    assert words.index("USER") < words.index("ENTRYPOINT")
    entrypoint = [args for word, args in stage if word == "ENTRYPOINT"][-1]
    cmd = [args for word, args in stage if word == "CMD"][-1]
    assert entrypoint == '["dramatiq"]'
    assert cmd == '["jobflow.actors", "actors"]'


def test_dockerfile_environment_and_healthcheck() -> None:
    stage = final_stage()
    env = " ".join(args for word, args in stage if word == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "JOBFLOW_LOG_FORMAT=json" in env
    healthchecks = [args for word, args in stage if word == "HEALTHCHECK"]
    assert len(healthchecks) == 1
    assert healthchecks[0].endswith('CMD ["python", "/usr/local/bin/jobflow-healthcheck"]')


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", ".env", "**/__pycache__"} <= ignored
    sources = []
    for word, args in instructions():
        if word == "COPY" and not args.startswith("--from") and "<<" not in args:
            sources += args.split()[:-1]
    assert sources, "the Dockerfile copies the project in"
    for source in sources:
        assert (ROOT / source).exists(), source
        assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore leaves it out"


# --- the health check script -----------------------------------------------------------------------


def healthcheck_script() -> str:
    text = DOCKERFILE.read_text()
    match = re.search(r"^COPY <<'EOF' /usr/local/bin/jobflow-healthcheck\n(.*?)^EOF$", text, re.MULTILINE | re.DOTALL)
    assert match, "the Dockerfile writes the health check with a heredoc"
    return match[1]


@pytest.fixture
def healthcheck(tmp_path: Path) -> Path:
    path = tmp_path / "jobflow-healthcheck"
    path.write_text(healthcheck_script())
    return path


DRAMATIQ = ["/opt/venv/bin/python", "/opt/venv/bin/dramatiq", "jobflow.actors", "actors"]
DASH_M = ["python3.11", "-m", "dramatiq", "jobflow.actors", "actors"]


def fake_proc(root: Path, processes: dict[int, tuple[int, list[str], str]]) -> Path:
    """A /proc with ``pid: (ppid, argv, state)`` entries (a zombie's cmdline is empty, as in Linux)."""
    for pid, (ppid, argv, state) in processes.items():
        directory = root / str(pid)
        directory.mkdir(parents=True)
        cmdline = b"" if state == "Z" else b"".join(a.encode() + b"\0" for a in argv)
        (directory / "cmdline").write_bytes(cmdline)
        name = os.path.basename(argv[0])[:15] if argv else "x"
        (directory / "stat").write_text(f"{pid} ({name}) {state} {ppid} {pid} {pid} 0 -1 4194560 0 0 0\n")
    (root / "self").mkdir(exist_ok=True)  # not a pid: skipped
    return root


def run_healthcheck(script: Path, proc: Path | None = None) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, str(script), *([str(proc)] if proc else [])]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)


INIT = ["/sbin/docker-init", "--", "dramatiq", "jobflow.actors", "actors"]
SCENARIOS = {
    "master as PID 1 with two workers": ({1: (0, DRAMATIQ, "S"), 7: (1, DRAMATIQ, "S"), 8: (1, DRAMATIQ, "S")}, 0),
    "python -m dramatiq": (
        {1: (0, ["python", "-m", "dramatiq", "m"], "S"), 9: (1, ["python", "-m", "dramatiq", "m"], "S")},
        0,
    ),
    "under docker-init": ({1: (0, INIT, "S"), 7: (1, DRAMATIQ, "S"), 9: (7, DRAMATIQ, "S")}, 0),
    "master without workers": ({1: (0, DRAMATIQ, "S")}, 1),
    "docker-init is not a master": ({1: (0, INIT, "S"), 7: (1, DRAMATIQ, "S")}, 1),
    "a zombie worker": ({1: (0, DRAMATIQ, "S"), 7: (1, DRAMATIQ, "Z")}, 1),
    "no dramatiq": ({1: (0, ["/bin/sh", "-c", "dramatiq"], "S"), 5: (1, ["sleep", "9"], "S")}, 1),
}


@pytest.mark.parametrize(("processes", "status"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_healthcheck_logic(
    healthcheck: Path, tmp_path: Path, processes: dict[int, tuple[int, list[str], str]], status: int
) -> None:
    out = run_healthcheck(healthcheck, fake_proc(tmp_path / "proc", processes))
    assert out.returncode == status, out.stdout + out.stderr
    assert out.stdout.startswith("dramatiq master" if status == 0 else "unhealthy:")


@pytest.fixture
def fake_dramatiq(tmp_path: Path) -> Iterator[subprocess.Popen[str]]:
    """A process whose command line is `python …/dramatiq`, with one forked child, like dramatiq's master."""
    script = tmp_path / "bin" / "dramatiq"
    script.parent.mkdir()
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            child = os.fork()
            if child == 0:
                time.sleep(60)
                os._exit(0)
            print(child, flush=True)
            sys.stdin.read()
            os.kill(child, 9)
            os.waitpid(child, 0)
            """
        )
    )
    process = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip().isdigit()
        yield process
    finally:
        process.communicate(timeout=30)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_healthcheck_finds_a_real_master_and_worker(healthcheck: Path, fake_dramatiq: subprocess.Popen[str]) -> None:
    out = run_healthcheck(healthcheck)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("dramatiq master")
