"""RabbitMQ nodes of the tests' own, beside the machine's broker, for faults no shared broker may suffer.

Each node has its own node name, AMQP and distribution ports, data and log directories (owned by
the ``rabbitmq`` user: root-owned ones make the node die silently) and the open-files limit raised
to the hard limit (Debian's ``rabbitmq-server`` wrapper would reset it through ``su``). The faults
are real: ``rabbitmqctl stop_app``, SIGSTOP, SIGKILL, a memory alarm.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def missing_tools() -> str | None:
    """Why private nodes cannot run here, or None."""
    for tool in ("rabbitmqctl", "setpriv"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    if not Path(SERVER).exists():
        return f"{SERVER} is not installed"
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return "there is no rabbitmq user"
    if os.geteuid() != 0:
        return "starting a node as the rabbitmq user needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _raise_nofile() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class RabbitNode:
    """One RabbitMQ node on 127.0.0.1 with a port of its own; guest may log in over loopback.

    ``advanced`` is an ``advanced.config`` term list for the ``rabbit`` application (Erlang terms,
    e.g. ``{dead_letter_worker_publisher_confirm_timeout, 2000}``), for settings rabbitmq.conf lacks.
    """

    def __init__(self, name: str, *, advanced: str | None = None) -> None:
        self.node = f"{name}@localhost"
        self.advanced = advanced
        self.port = _free_port()
        self.dist_port = _free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"jobflow-{name}-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._pid: int | None = None
        self.frozen = False

    def _ctl(self, *args: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-q", "-n", self.node, *args], capture_output=True, text=True, timeout=timeout, check=check
        )

    def start(self, timeout: float = 90) -> None:
        """First start: the node's files, then the node."""
        (self.base / "mnesia").mkdir()
        (self.base / "log").mkdir()
        (self.base / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.base / "enabled_plugins").write_text("[].\n")
        (self.base / "advanced.config").write_text(f"[{{rabbit, [{self.advanced or ''}]}}].\n")
        user = pwd.getpwnam("rabbitmq")
        for path in [self.base, *self.base.rglob("*")]:
            os.chown(path, user.pw_uid, user.pw_gid)
        self.restart(timeout)

    def restart(self, timeout: float = 90) -> None:
        """Start the node on the data it has (after :meth:`kill`, say)."""
        user = pwd.getpwnam("rabbitmq")
        env = {
            **os.environ,
            "HOME": user.pw_dir,  # the shared Erlang cookie, so rabbitmqctl may talk to the node
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.base / "log"),
            "RABBITMQ_PID_FILE": str(self.base / "pid"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.base / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.base / "advanced.config"),
        }
        subprocess.run(
            ["setpriv", "--reuid", "rabbitmq", "--regid", "rabbitmq", "--init-groups", SERVER, "-detached"],
            env=env,
            cwd=self.base,
            check=True,
            timeout=60,
            preexec_fn=_raise_nofile,
        )
        self.await_startup(timeout)

    def await_startup(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while self._ctl("await_startup", "--timeout", "10", timeout=30, check=False).returncode != 0:
            if time.monotonic() > deadline:
                log = "\n".join(p.read_text()[-2000:] for p in (self.base / "log").glob("*.log"))
                raise RuntimeError(f"RabbitMQ node {self.node} did not start within {timeout:.0f} s:\n{log}")
            time.sleep(1)
        self._pid = int((self.base / "pid").read_text().strip())

    @property
    def pid(self) -> int:
        assert self._pid is not None, "the node is not running"
        return self._pid

    def join(self, other: RabbitNode) -> None:
        """Join ``other``'s cluster (the Erlang cookie is shared: every node runs as ``rabbitmq``)."""
        self._ctl("stop_app")
        self._ctl("join_cluster", other.node)
        self.start_app()

    def eval(self, expression: str, timeout: float = 30) -> str:
        """An Erlang expression evaluated on the node (``rabbitmqctl eval``): its printed result."""
        return self._ctl("eval", expression, timeout=timeout).stdout.strip()

    @property
    def running(self) -> bool:
        return self._pid is not None

    def stop_app(self) -> None:
        self._ctl("stop_app")

    def start_app(self) -> None:
        self._ctl("start_app")
        self.await_startup()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)
        self.frozen = False

    def block_publishers(self) -> None:
        """A memory alarm: RabbitMQ blocks every publishing connection until it clears."""
        self._ctl("set_vm_memory_high_watermark", "0")

    def unblock_publishers(self) -> None:
        self._ctl("set_vm_memory_high_watermark", "0.4")

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        self._pid = None

    def destroy(self) -> None:
        """Stop the node however it is (frozen, killed, running) and delete its files."""
        if self._pid is not None:
            try:
                os.kill(self._pid, signal.SIGCONT)
                os.kill(self._pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        # Its helper processes (erl_child_setup, inet_gethost) and epmd registration end with it.
        shutil.rmtree(self.base, ignore_errors=True)


#: Every node of the tests' clusters: quorum dead-lettering retries a hop after 2 s, not 180 s
#: (deploy/rabbitmq/advanced.config; rabbitmq-server issue 12625).
CLUSTER_ADVANCED = "{dead_letter_worker_publisher_confirm_timeout, 2000}"


class RabbitCluster:
    """Three (or ``size``) nodes of the tests' own, clustered with ``join_cluster``."""

    def __init__(self, name: str, size: int = 3) -> None:
        self.nodes = [RabbitNode(f"{name}{i + 1}", advanced=CLUSTER_ADVANCED) for i in range(size)]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    def start(self) -> None:
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start()
            node.join(first)

    def up(self) -> list[RabbitNode]:
        return [n for n in self.nodes if n.running and not n.frozen]

    def ctl_node(self) -> RabbitNode:
        """A node that answers ``rabbitmqctl`` now."""
        return self.up()[0]

    def leaders(self, vhost: str = "/") -> dict[str, str]:
        """Each quorum queue's leader node: ``{queue: node}``."""
        node = self.ctl_node()
        out = node._ctl("list_queues", "-p", vhost, "name", "type", "leader", "--no-table-headers", timeout=60).stdout
        leaders: dict[str, str] = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) >= 3 and parts[1] == "quorum":
                leaders[parts[0]] = parts[2]
        return leaders

    def node_named(self, node: str) -> RabbitNode:
        return next(n for n in self.nodes if n.node == node)

    def destroy(self) -> None:
        for node in self.nodes:
            node.destroy()
