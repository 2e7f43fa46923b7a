"""Run Mosaic as a real federation on this machine: one SuperLink and N SuperNodes, each its own
process, talking over loopback with TLS and SuperNode authentication; leave nothing up.

    python -m deploy.local --clients N [--profile conf/X.toml] [--strategy mosaic|fedavg|fedprox]
                           [--set key=value ...] [--name RUN_NAME] [--timeout SEC]
                           [--widths R,R,...] [--archs A,A,...] [--node-data DIR]
                           [--workdir DIR] [--insecure]

What it does, in order:

1. Merge and validate the run config exactly as ``deploy.simulation`` does (same helpers: a bad
   key exits 2 before anything starts), and check that the run's messages fit the transport
   (:func:`server_app.traffic.check_payload_limits`).
2. Credentials, unless ``--insecure``: ``deploy.certs`` makes whatever is missing in
   ``<workdir>/certs`` (a throwaway CA, the SuperLink's certificate, one ECDSA key per SuperNode).
3. ``flower-superlink`` on a free 127.0.0.1 port with TLS and ``--enable-supernode-auth`` (and
   no runtime dependency installation: the app runs in this venv); wait until it listens.
4. A connection named ``mosaic-local`` in ``<workdir>/flwr-home/config.toml`` (``FLWR_HOME`` of
   every ``flwr`` command here): the address and the CA as ``root-certificates``.
5. Each node's public key registered with ``flwr supernode register``, then N
   ``flower-supernode`` processes, each with its own ``--port``, its key, and
   ``--node-config "partition-id=i num-partitions=N data-root=..."`` (and ``width=r`` with
   ``--widths``: that node trains a width-r sub-model whatever ``width-tiers`` assigns; and
   ``arch="name"`` with ``--archs``: that node runs that architecture of ``architectures``). With
   ``--node-data DIR`` node i reads only its own folder instead, ``--node-config
   "data-dir=DIR/node-<i>"``, with no partition id (``common.node_data``; write the folders
   with ``mosaic-node-data DIR --partitions N``). Then wait until ``flwr supernode list`` shows
   all N online (bounded by ``--startup-timeout``). Each SuperNode, and each ClientApp it
   starts, gets ``OMP_NUM_THREADS`` = cores // N unless the environment sets it.
6. ``flwr run <repo> mosaic-local --stream --run-config <merged.toml>``, then the run's status
   from ``flwr ls`` (``flwr run --stream`` exits 0 even when the run failed).
7. Always (also on Ctrl-C, SIGTERM, a timeout, a failure): stop the SuperNodes, then the
   SuperLink, each with everything it spawned, by PID.
8. Print the final report and the bytes each client sent and received per round.

``--insecure`` is for development only: no TLS and no SuperNode authentication, so anyone who
can reach the port may join the federation and read the model updates.

Logs: ``<workdir>/logs/superlink.log`` and ``supernode-<i>.log``. The default workdir,
``<repo>/.flwr/deploy``, is ignored by git (it holds private keys).

Exit status: 0 run completed, 1 run failed (or the federation did not come up), 2 invalid
config or missing data, 124 timed out, 128 + signal number when interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any, get_args

import tomli_w

from common.config import ConfigError, RunConfig, Strategy
from common.node_data import LAYOUT, TRAIN
from common.tiers import tier_rates
from deploy.certs import Credentials, ensure_credentials
from deploy.flwr_cli import (
    EXIT_CONFIG,
    EXIT_FAILED,
    flower_env,
    guarded_run,
    report_run_end,
    run_status,
    stream_flwr_run,
)
from deploy.processes import free_ports, stop_processes
from deploy.run_config import REPO, build_run_config, check_runnable
from deploy.simulation import print_report
from server_app.results import RunResults
from server_app.strategies import uploads_of
from server_app.traffic import DOWNLINK, TOTAL, UPLINK, check_payload_limits

CONNECTION = "mosaic-local"
DEFAULT_WORKDIR = REPO / ".flwr" / "deploy"
STARTUP_TIMEOUT = 180.0  # seconds for the SuperLink and all SuperNodes to come up
CLI_TIMEOUT = 60.0  # seconds for one short flwr command (register, list)


class DeploymentError(RuntimeError):
    """The federation did not come up; the message says which part and where its log is."""


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalFederation:
    """One SuperLink and its SuperNodes on 127.0.0.1, as processes of this user.

    Use as a context manager (or call :meth:`stop`): every process it started is stopped, with
    whatever it spawned (SuperExec, ServerApp, ClientApps), even when the body raises. Each
    process leads its own session, which is how its children are found.
    """

    def __init__(
        self,
        workdir: Path,
        clients: int,
        data_root: str | Path,
        *,
        secure: bool = True,
        widths: Sequence[float] | None = None,
        archs: Sequence[str] | None = None,
        node_data: Path | None = None,
    ) -> None:
        self.workdir = workdir.expanduser().resolve()
        self.clients = clients
        self.widths = list(widths) if widths else None  # per node, its node-config `width`
        self.archs = list(archs) if archs else None  # per node, its node-config `arch`
        self.node_data = node_data  # node i reads node_data/node-<i> (its own data) if set
        self.data_root = str(data_root)
        self.secure = secure
        self.flwr_home = self.workdir / "flwr-home"
        self.logs = self.workdir / "logs"
        self.flwr = str(Path(sys.executable).with_name("flwr"))
        self.port, *self.node_ports = free_ports(clients + 1)
        self.address = f"127.0.0.1:{self.port}"
        # flower_env's local-SuperLink ports only matter if `flwr run` had no connection to use:
        # free ones, so that even then it could never reach somebody else's SuperLink.
        self.env = flower_env(self.flwr_home, *free_ports(2))
        self.credentials: Credentials | None = None
        self.superlink: subprocess.Popen[bytes] | None = None
        self.supernodes: dict[int, subprocess.Popen[bytes]] = {}
        self.node_ids: dict[int, int] = {}  # index -> node id given at registration
        self._log_files: list[IO[bytes]] = []

    # --- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> LocalFederation:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """SuperLink, connection, registered keys, N SuperNodes; return when all are online."""
        deadline = time.monotonic() + timeout
        self.logs.mkdir(parents=True, exist_ok=True)
        if self.secure:
            self.credentials = ensure_credentials(self.workdir / "certs", self.clients)
        self.start_superlink()
        self.write_connection()
        self.wait_listening(deadline)
        for index in range(self.clients):
            self.start_supernode(index)
        self.wait_online(self.clients, deadline)

    def _spawn(
        self, command: list[str], log_name: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log_file = (self.logs / log_name).open("wb")
        self._log_files.append(log_file)
        return subprocess.Popen(
            command,
            env=dict(env or self.env),
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session: stop() finds its children through it
        )

    def start_superlink(self) -> None:
        command = [
            str(Path(sys.executable).with_name("flower-superlink")),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--disable-runtime-dependency-installation",
        ]
        if self.credentials is None:
            command.append("--insecure")
        else:
            command += [
                "--ssl-ca-certfile",
                str(self.credentials.ca_cert),
                "--ssl-certfile",
                str(self.credentials.server_cert),
                "--ssl-keyfile",
                str(self.credentials.server_key),
                "--enable-supernode-auth",
            ]
        self.superlink = self._spawn(command, "superlink.log")

    def write_connection(self) -> None:
        """The ``mosaic-local`` connection, also the default for ``flwr ls`` and friends."""
        connection: dict[str, Any] = {"address": self.address}
        if self.credentials is None:
            connection["insecure"] = True
        else:
            connection["root-certificates"] = str(self.credentials.ca_cert)
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        config = {"superlink": {"default": CONNECTION, CONNECTION: connection}}
        (self.flwr_home / "config.toml").write_text(tomli_w.dumps(config))

    def wait_listening(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.5)
        raise DeploymentError(
            f"the SuperLink did not listen on {self.address} in time; see "
            f"{self.logs / 'superlink.log'}:\n{_tail(self.logs / 'superlink.log')}"
        )

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key; return the node id the SuperLink gave it."""
        result = self.cli("supernode", "register", str(public_key), CONNECTION, "--format", "json")
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError, ValueError):
            raise DeploymentError(
                f"flwr supernode register {public_key} failed:\n{result.stdout}{result.stderr}"
            ) from None

    def start_supernode(
        self,
        index: int,
        *,
        private_key: Path | None = None,
        register: bool = True,
        port: int | None = None,
    ) -> subprocess.Popen[bytes]:
        """SuperNode ``index`` (its partition id), with its own key unless ``private_key``.

        ``register=False`` starts it with a key the SuperLink does not know (tests use it).
        """
        if self.node_data is not None:  # a TOML string, quoted and escaped
            node_config = f"data-dir={json.dumps(str(node_folder(self.node_data, index)))}"
        else:
            data_root = json.dumps(self.data_root)
            node_config = (
                f"partition-id={index} num-partitions={self.clients} data-root={data_root}"
            )
        if self.widths is not None:
            node_config += f" width={float(self.widths[index])!r}"
        if self.archs is not None:
            node_config += f" arch={json.dumps(self.archs[index])}"
        command = [
            str(Path(sys.executable).with_name("flower-supernode")),
            "--superlink",
            self.address,
            "--port",
            str(port if port is not None else self.node_ports[index]),
            "--node-config",
            node_config,
        ]
        if self.credentials is None:
            command.append("--insecure")
        else:
            key = private_key or self.credentials.node_keys[index]
            if register:
                self.node_ids[index] = self.register(key.with_name(key.name + ".pub"))
            command += [
                "--root-certificates",
                str(self.credentials.ca_cert),
                "--auth-supernode-private-key",
                str(key),
            ]
        process = self._spawn(command, f"supernode-{index}.log", self.node_env())
        self.supernodes[index] = process
        return process

    def node_env(self) -> dict[str, str]:
        """A SuperNode's environment, inherited by the ClientApps it starts: its share of this
        machine's cores as ``OMP_NUM_THREADS`` (unless the environment sets it), so that N
        ClientApps training at once do not each start a full OpenMP team and fight over the
        cores (2 cores, 3 nodes, conf/quick.toml: the generator round took 20.1 s with 2
        threads per ClientApp, 14.5 s with 1)."""
        env = dict(self.env)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // self.clients)))
        return env

    def cli(self, *args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """One short ``flwr`` command against this federation (its FLWR_HOME and env)."""
        return subprocess.run(
            [self.flwr, *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def online_nodes(self) -> list[int]:
        """Node ids the SuperLink reports online ([] while it cannot say)."""
        try:
            result = self.cli("supernode", "list", CONNECTION, "--format", "json")
            nodes = json.loads(result.stdout)["nodes"]
        except (subprocess.TimeoutExpired, json.JSONDecodeError, KeyError):
            return []
        return [int(node["node-id"]) for node in nodes if node.get("status") == "online"]

    def wait_online(self, count: int, deadline: float) -> None:
        online: list[int] = []
        while time.monotonic() < deadline:
            self._check_alive()
            online = self.online_nodes()
            if len(online) >= count:
                print(f"Federation up: SuperLink {self.address}, {len(online)} SuperNodes online")
                return
            time.sleep(1)
        raise DeploymentError(
            f"{len(online)} of {count} SuperNodes came online in time; logs in {self.logs}"
        )

    def _check_alive(self) -> None:
        """Raise when the SuperLink or a SuperNode exited while the federation is coming up."""
        parts = {"superlink": self.superlink} | {
            f"supernode-{i}": p for i, p in self.supernodes.items()
        }
        for name, process in parts.items():
            if process is not None and process.poll() is not None:
                log = self.logs / f"{name}.log"
                raise DeploymentError(
                    f"{name} exited with {process.returncode}; {log}:\n{_tail(log)}"
                )

    def run(self, overrides: Mapping[str, Any], timeout: float | None) -> tuple[str, str, str]:
        """``flwr run`` with these run-config overrides; (run id, status, status details)."""
        run_config = self.workdir / "run-config.toml"
        run_config.write_text(tomli_w.dumps(dict(overrides)))
        command = [self.flwr, "run", str(REPO), CONNECTION, "--stream"]
        command += ["--run-config", str(run_config)]
        print("$ " + " ".join(command), flush=True)
        run_id = stream_flwr_run(command, self.env, timeout)
        status, details = run_status(self.flwr, self.env, run_id)
        return run_id, status, details

    def stop(self) -> None:
        """SuperNodes first, then the SuperLink, each with all it spawned (SIGTERM, then KILL)."""
        survivors = []
        nodes = [p.pid for p in self.supernodes.values()]
        if nodes:
            survivors += stop_processes(nodes)
        if self.superlink is not None:
            survivors += stop_processes([self.superlink.pid])
        for process in [*self.supernodes.values(), *([self.superlink] if self.superlink else [])]:
            if process.poll() is None:  # reap, so no zombie is left behind
                process.wait(timeout=5)
        for log_file in self._log_files:
            log_file.close()
        self._log_files.clear()
        if survivors:
            print(f"warning: could not stop processes {survivors}", file=sys.stderr)


# --- report -----------------------------------------------------------------------------------


def _megabytes(value: float) -> str:
    return f"{value / 1e6:.2f} MB"


def print_traffic(folder: Path) -> None:
    """Bytes per round per client, from participation.json (per-record means over clients)."""
    participation = RunResults.read(folder).participation
    if not participation:
        return
    print("bytes per client per round (downlink = server to client, uplink = client to server):")
    for server_round, round_log in sorted(participation.items()):
        parts = []
        for direction in (DOWNLINK, UPLINK):
            sizes = [t[direction] for t in round_log.get("traffic", {}).values() if direction in t]
            if not sizes:
                continue
            records = sorted({name for s in sizes for name in s} - {TOTAL})
            mean = {name: sum(s.get(name, 0) for s in sizes) / len(sizes) for name in records}
            detail = ", ".join(f"{name} {_megabytes(v)}" for name, v in mean.items() if v >= 5e3)
            total = sum(s[TOTAL] for s in sizes) / len(sizes)
            parts.append(f"{direction} {_megabytes(total)} x{len(sizes)} ({detail})")
        print(f"  round {server_round}: " + "; ".join(parts))


# --- command line -----------------------------------------------------------------------------


def _widths(text: str) -> list[float]:
    try:
        return [float(item) for item in text.split(",")]
    except ValueError:
        message = f"{text!r} is not a comma-separated list of rates"
        raise argparse.ArgumentTypeError(message) from None


def check_widths(cfg: RunConfig, widths: Sequence[float] | None, clients: int) -> None:
    """``--widths``: one rate per SuperNode, each a rate of ``width-tiers``."""
    if widths is None:
        return
    if len(widths) != clients:
        raise ConfigError(f"--widths: {len(widths)} rates for {clients} SuperNodes (--clients)")
    allowed = tier_rates(cfg.tiers)
    if any(width not in allowed for width in widths):
        raise ConfigError(f"--widths: {widths} has a rate outside width-tiers {allowed}")


def check_archs(cfg: RunConfig, archs: Sequence[str] | None, clients: int) -> None:
    """``--archs``: one architecture per SuperNode, each one of ``architectures``."""
    if archs is None:
        return
    if len(archs) != clients:
        raise ConfigError(f"--archs: {len(archs)} names for {clients} SuperNodes (--clients)")
    allowed = [name for name, _ in cfg.architecture_rule]
    if any(name not in allowed for name in archs):
        raise ConfigError(f"--archs: {list(archs)} names one outside architectures {allowed}")


def node_folder(node_data: Path, index: int) -> Path:
    return (node_data / f"node-{index}").expanduser().resolve()


def check_node_data(node_data: Path | None, clients: int) -> None:
    """``--node-data``: a folder per SuperNode, each with its training file."""
    if node_data is None:
        return
    missing = [
        str(node_folder(node_data, i) / TRAIN)
        for i in range(clients)
        if not (node_folder(node_data, i) / TRAIN).is_file()
    ]
    if missing:
        raise ConfigError(
            f"--node-data: no {', '.join(missing)}; write the folders with "
            f"`mosaic-node-data {node_data} --partitions {clients}` ({LAYOUT})"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local",
        description=(
            "Run Mosaic on a local federation: 1 SuperLink + N SuperNodes as separate processes, "
            "TLS and SuperNode authentication on; print a final report."
        ),
    )
    parser.add_argument("--clients", type=int, default=3, help="SuperNodes (default 3)")
    parser.add_argument("--profile", type=Path, help="a run-config TOML, e.g. conf/quick.toml")
    parser.add_argument("--strategy", choices=get_args(Strategy))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key (TOML literal); repeatable",
    )
    parser.add_argument(
        "--widths",
        type=_widths,
        help="each SuperNode's width, in order (e.g. 1,0.5,0.25): its node config's `width`, "
        "which overrides the width-tiers rule; every rate must be one of width-tiers",
    )
    parser.add_argument(
        "--archs",
        type=lambda text: [name.strip() for name in text.split(",")],
        help="each SuperNode's architecture, in order (e.g. cnn,mlp,resnet8): its node "
        "config's `arch`, which overrides the architectures rule; each must be one of it",
    )
    parser.add_argument(
        "--node-data",
        type=Path,
        help="SuperNode i reads only DIR/node-<i> (train.npz, test.npz: common/node_data.py), "
        "with no partition id",
    )
    parser.add_argument("--name", help="run name: the results folder's name")
    parser.add_argument("--timeout", type=float, help="stop the run after SEC seconds")
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=STARTUP_TIMEOUT,
        help=f"seconds for the federation to come up (default {STARTUP_TIMEOUT:g})",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="certificates, keys, FLWR_HOME and logs (default: <repo>/.flwr/deploy)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help=(
            "DEVELOPMENT ONLY: no TLS and no SuperNode authentication; anyone who can reach "
            "the port may join and read the model updates"
        ),
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        overrides, cfg = build_run_config(args.profile, args.strategy, args.set, args.name)
        check_runnable(cfg, args.clients, args.node_data is None or cfg.server_test_set)
        check_widths(cfg, args.widths, args.clients)
        check_archs(cfg, args.archs, args.clients)
        check_node_data(args.node_data, args.clients)
        check_payload_limits(cfg, uploads_of(cfg.strategy))
    except (ConfigError, OSError, tomllib.TOMLDecodeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_CONFIG
    if not Path(sys.executable).with_name("flwr").is_file():
        print("error: flwr is not installed in this venv: run `make setup`", file=sys.stderr)
        return EXIT_CONFIG
    if args.insecure:
        print("WARNING: --insecure: no TLS, no SuperNode authentication (development only)")

    folder = Path(cfg.results_dir) / cfg.run_name
    print(
        f"Running {cfg.strategy} on {cfg.dataset} with {args.clients} SuperNodes "
        f"(profile: {args.profile or 'none'}, {'insecure' if args.insecure else 'TLS + auth'})"
        f"\n  results: {folder}\n  data:    {cfg.data_root}\n  workdir: {args.workdir}",
        flush=True,
    )
    started = time.monotonic()
    federation = LocalFederation(
        args.workdir,
        args.clients,
        cfg.data_root,
        secure=not args.insecure,
        widths=args.widths,
        archs=args.archs,
        node_data=args.node_data,
    )

    def stop() -> None:
        if federation.superlink is not None:
            federation.stop()
            print(f"Stopped the SuperLink and {len(federation.supernodes)} SuperNodes")

    with guarded_run("federation", args.timeout, stop) as early:
        try:
            federation.start(args.startup_timeout)
            run_id, status, details = federation.run(overrides, args.timeout)
        except DeploymentError as error:
            print(f"error: {error}", file=sys.stderr)
            early.code = EXIT_FAILED
    if early.code is not None:
        return early.code
    seconds = time.monotonic() - started
    if code := report_run_end(
        run_id, status, details, federation.logs, seconds, " (start-up included)"
    ):
        return code
    print_report(folder)
    print_traffic(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
