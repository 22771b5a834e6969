"""``sparkserve replicas``: N local ``sparkserve serve`` replicas behind ``vllm-router`` on one machine.

    sparkserve replicas --num-replicas 2 --router-policy cache_aware --port 8000 \\
        --threads-per-replica 1 -- --drafter none

Everything after ``--`` goes to each ``sparkserve serve`` unchanged (the launcher sets ``--host``,
``--port`` and, with ``--threads-per-replica``, ``--num-threads``; replica i listens on
``--replica-base-port + i``). The router (PyPI ``vllm-router``, pinned in the ``test`` extra) starts once
every replica answers ``/health`` and listens on ``--port``.

With ``--router-policy kv_aware`` replica i also publishes its KV-cache events on
``tcp://HOST:(--kv-events-base-port + i)`` (``sparkserve serve --kv-events-endpoint``) and serves missed
batches again on ``--kv-events-base-port + N + i`` (``--kv-events-replay-endpoint``, N replicas); the router
subscribes to each (``--kv-event-source URL=ENDPOINT``, ``--kv-event-replay-source URL=ENDPOINT``,
``--kv-event-model`` the replicas' model name, ``--kv-event-block-size`` their ``--block-size``): see
docs/scale_out.md.

Processes: each child runs in its own session, so a terminal's Ctrl-C reaches only the launcher, which
then stops them all: SIGTERM to the router, then to the replicas (each drains, see
:mod:`sparkserve.cli`), SIGKILL to any still alive after ``--stop-timeout`` seconds. SIGTERM to
the launcher does the same; if a child exits on its own, the launcher stops the rest and exits 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from sparkserve.server.launch import ServerProcess, environ_with, spawn, stop_all, wait_ready

logger = logging.getLogger("sparkserve.replicas")

DEFAULT_BLOCK_SIZE = 16
"""``sparkserve serve``'s default ``--block-size`` (``EngineArgs.block_size``; the server layer does not import
the engine's config, a test keeps the two equal)."""

ROUTER_POLICIES = ("cache_aware", "power_of_two", "round_robin", "random", "consistent_hash", "kv_aware")


def router_binary() -> str:
    """Path of the ``vllm-router`` launcher: next to this interpreter, else on ``PATH``.

    Raises:
        FileNotFoundError: when it is not installed (``pip install 'vllm-router==0.1.17'``).
    """
    beside = Path(sys.executable).parent / "vllm-router"
    found = str(beside) if beside.exists() else shutil.which("vllm-router")
    if found is None:
        raise FileNotFoundError("vllm-router is not installed: pip install 'vllm-router==0.1.17'")
    return found


@dataclass(frozen=True)
class ReplicaSetConfig:
    """What to start.

    Attributes:
        num_replicas: replicas to start (>= 1).
        serve_args: extra ``sparkserve serve`` arguments for every replica.
        policy: the router's ``--policy``.
        host: address the router and the replicas bind.
        port: the router's port.
        replica_base_port: replica i listens on ``replica_base_port + i``.
        threads_per_replica: each replica's ``--num-threads`` (None: not set).
        router_args: extra ``vllm-router`` arguments.
        replica_command: the command that serves one replica (default: this interpreter running
            ``python -m sparkserve serve``; tests pass the fake-engine server).
        startup_timeout_s: seconds for every replica to answer ``/health``, and then the router.
        kv_events_base_port: under ``kv_aware``, replica i publishes KV events on this port + i and
            serves their replay on this port + num_replicas + i.
    """

    num_replicas: int
    serve_args: tuple[str, ...] = ()
    policy: str = "cache_aware"
    host: str = "127.0.0.1"
    port: int = 8000
    replica_base_port: int = 8100
    threads_per_replica: int | None = None
    router_args: tuple[str, ...] = ()
    replica_command: tuple[str, ...] = (sys.executable, "-m", "sparkserve", "serve")
    startup_timeout_s: float = 300.0
    kv_events_base_port: int = 5557

    def __post_init__(self) -> None:
        if self.num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {self.num_replicas}")
        if self.policy not in ROUTER_POLICIES:
            raise ValueError(f"policy must be one of {ROUTER_POLICIES}, got {self.policy!r}")
        if self.threads_per_replica is not None and self.threads_per_replica < 1:
            raise ValueError("threads_per_replica must be >= 1")

    @property
    def replica_urls(self) -> list[str]:
        return [f"http://{self.host}:{self.replica_base_port + i}" for i in range(self.num_replicas)]

    @property
    def router_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def kv_events(self) -> bool:
        """Whether the replicas publish KV events (the router's ``kv_aware`` policy reads them)."""
        return self.policy == "kv_aware"

    @property
    def kv_event_endpoints(self) -> list[str]:
        """ZMQ endpoint of replica i's KV events (where the router connects)."""
        return [f"tcp://{self.host}:{self.kv_events_base_port + i}" for i in range(self.num_replicas)]

    @property
    def kv_event_replay_endpoints(self) -> list[str]:
        """ZMQ endpoint where replica i serves missed KV event batches again."""
        base = self.kv_events_base_port + self.num_replicas
        return [f"tcp://{self.host}:{base + i}" for i in range(self.num_replicas)]

    @property
    def block_size(self) -> int:
        """The replicas' KV block size: their ``--block-size`` flag, else the engine's default."""
        value = serve_flag(self.serve_args, "--block-size")
        return int(value) if value is not None else DEFAULT_BLOCK_SIZE


def serve_flag(args: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``sparkserve serve`` arguments (``--flag V`` or ``--flag=V``), None if absent."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith(f"{flag}="):
            return arg.split("=", 1)[1]
    return None


@dataclass
class ReplicaSet:
    """Running processes: ``replicas[i]`` serves ``config.replica_urls[i]``; ``router`` fronts them."""

    config: ReplicaSetConfig
    replicas: list[ServerProcess] = field(default_factory=list)
    router: ServerProcess | None = None

    def processes(self) -> list[ServerProcess]:
        return ([self.router] if self.router is not None else []) + self.replicas

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM the router, then the replicas; SIGKILL whatever is alive after ``timeout_s``."""
        stop_all(self.processes(), timeout_s)


def replica_argv(config: ReplicaSetConfig, index: int) -> list[str]:
    argv = [*config.replica_command, *config.serve_args, "--host", config.host,
            "--port", str(config.replica_base_port + index)]
    if config.threads_per_replica is not None:
        argv += ["--num-threads", str(config.threads_per_replica)]
    if config.kv_events:
        argv += ["--kv-events-endpoint", config.kv_event_endpoints[index],
                 "--kv-events-replay-endpoint", config.kv_event_replay_endpoints[index]]
    return argv


def router_argv(config: ReplicaSetConfig, model: str | None = None) -> list[str]:
    """The router's command line; under ``kv_aware`` one static ``--kv-event-source`` per replica,
    the block size and ``model`` (the replicas' served model name: 0.1.17 refuses static sources
    without ``--kv-event-model``)."""
    argv = [router_binary(), "--worker-urls", *config.replica_urls, "--policy", config.policy,
            "--host", config.host, "--port", str(config.port)]
    if config.kv_events:
        for url, endpoint, replay in zip(config.replica_urls, config.kv_event_endpoints,
                                         config.kv_event_replay_endpoints, strict=True):
            argv += ["--kv-event-source", f"{url}={endpoint}", "--kv-event-replay-source", f"{url}={replay}"]
        argv += ["--kv-event-block-size", str(config.block_size)]
        if model is not None:
            argv += ["--kv-event-model", model]
    return argv + list(config.router_args)


def served_model(replica_url: str, api_key: str | None = None, timeout_s: float = 10.0) -> str:
    """The model name a replica serves (its ``/v1/models``; ``api_key`` when the replicas require one)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{replica_url}/v1/models", headers=headers)
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return str(json.load(response)["data"][0]["id"])


@contextmanager
def launch(config: ReplicaSetConfig, log_dir: Path | None = None) -> Iterator[ReplicaSet]:
    """Start the replicas, wait for their ``/health``, start the router, wait for its ``/health``;
    stop everything on exit (also on an exception, e.g. a start-up timeout).

    Each child's stdout and stderr go to ``log_dir/<name>.log`` (None: inherited). With
    ``threads_per_replica`` set, ``OMP_NUM_THREADS`` is set to it as well. Started, waited for and
    stopped by :mod:`.launch`.

    Raises:
        LaunchError: a replica or the router exited during start-up or did not answer ``/health`` within
            ``config.startup_timeout_s`` seconds.
    """
    env = environ_with({"OMP_NUM_THREADS": str(config.threads_per_replica)}
                       if config.threads_per_replica is not None else None)
    running = ReplicaSet(config)

    def start(argv: list[str], name: str, url: str) -> ServerProcess:
        log_path = None if log_dir is None else log_dir / f"{name}.log"
        return spawn(name, argv, url, env=env, log_path=log_path, new_session=True)

    try:
        for i, url in enumerate(config.replica_urls):
            running.replicas.append(start(replica_argv(config, i), f"replica{i}", url))
        wait_ready(running.replicas, config.startup_timeout_s, path="/health")
        api_key = serve_flag(config.serve_args, "--api-key")
        model = served_model(config.replica_urls[0], api_key) if config.kv_events else None
        running.router = start(router_argv(config, model), "router", config.router_url)
        wait_ready([running.router], config.startup_timeout_s, path="/health")
        yield running
    finally:
        running.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``sparkserve replicas`` flags (argparse only: no torch)."""
    parser.add_argument("--num-replicas", type=int, default=2, help="replicas to start (default: %(default)s)")
    parser.add_argument("--router-policy", default="cache_aware", choices=ROUTER_POLICIES,
                        help="vllm-router --policy (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address of the router and the replicas")
    parser.add_argument("--port", type=int, default=8000, help="the router's port (default: %(default)s)")
    parser.add_argument("--replica-base-port", type=int, default=8100,
                        help="replica i listens on this port + i (default: %(default)s)")
    parser.add_argument("--threads-per-replica", type=int, default=None,
                        help="each replica's --num-threads and OMP_NUM_THREADS (default: not set)")
    parser.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                        help="extra vllm-router argument (repeatable; e.g. --router-arg=--prometheus-port=29001)")
    parser.add_argument("--replica-command", default=None,
                        help="command serving one replica, before its flags (default: this Python running "
                             "`sparkserve serve`; e.g. 'numactl --interleave=all sparkserve serve')")
    parser.add_argument("--log-dir", default=None, help="write each process's output to DIR/<name>.log")
    parser.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to become healthy")
    parser.add_argument("--kv-events-base-port", type=int, default=5557,
                        help="under kv_aware, replica i publishes KV events on this port + i and their replay on "
                             "this port + N + i (default: %(default)s)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER,
                        help="after --: arguments for every `sparkserve serve` (e.g. -- --drafter none)")


def run(ns: argparse.Namespace) -> int:
    """Start the replica set and wait until a signal or a child's exit; returns the exit status
    (0 after SIGINT / SIGTERM, 1 when a child exited on its own)."""
    serve_args = list(ns.serve_args)
    if serve_args[:1] == ["--"]:
        serve_args = serve_args[1:]
    config = ReplicaSetConfig(
        num_replicas=ns.num_replicas, serve_args=tuple(serve_args), policy=ns.router_policy, host=ns.host,
        port=ns.port, replica_base_port=ns.replica_base_port, threads_per_replica=ns.threads_per_replica,
        router_args=tuple(ns.router_arg), startup_timeout_s=ns.startup_timeout,
        kv_events_base_port=ns.kv_events_base_port,
        **({"replica_command": tuple(shlex.split(ns.replica_command))} if ns.replica_command else {}),
    )
    stop = {"signal": None}

    def on_signal(sig: int, frame: FrameType | None) -> None:
        stop["signal"] = sig

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log_dir = Path(ns.log_dir) if ns.log_dir else None
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
    try:
        with launch(config, log_dir) as running:
            print(f"router on {config.router_url} ({config.policy}) -> {' '.join(config.replica_urls)}",
                  flush=True)
            while stop["signal"] is None:
                exited = [p for p in running.processes() if not p.alive()]
                if exited:
                    logger.error("%s exited (status %s): stopping the others", exited[0].name,
                                 exited[0].proc.returncode)
                    return 1
                time.sleep(0.2)
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
