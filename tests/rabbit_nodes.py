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
    """One RabbitMQ node on 127.0.0.1 with a port of its own; guest may log in over loopback."""

    def __init__(self, name: str) -> None:
        self.node = f"{name}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.base = Path(tempfile.mkdtemp(prefix=f"jobflow-{name}-"))
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self._pid: int | None = None

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

    def stop_app(self) -> None:
        self._ctl("stop_app")

    def start_app(self) -> None:
        self._ctl("start_app")
        self.await_startup()

    def freeze(self) -> None:
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

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
