"""One client attacks the run from inside the wire's rules: final accuracy, defences off and on.

    python -m benchmarks.attacks [--profile conf/quick.toml] [--clients 10] [--seeds 0]
                                 [--attacks NAME ...] [--defences off on] [--set KEY=VALUE]
                                 [--out benchmarks/results/attacks]

Each attack is a tamper on the train replies of one node (the last), applied to a run of the
profile on FashionMNIST in this process (``run_inprocess``, no Ray). Every attack runs twice:
with the defences at their defaults (``off``: only what is always on) and with the options on
(``on``: ``max-update-ratio``, ``max-weight-ratio`` and ``min-claim-agreement``, see
:data:`DEFENCES_ON`), against a clean run of the same seed and defence setting. The table
(``attacks.md`` in ``--out``, rewritten after every run) gives final accuracy, the drop against
the clean run, and the rules the server named (refusals, bounds and skipped rounds).

Clients compute honest replies and the tamper changes them on the way to the server, so the
runs of one seed share their client work wherever the server sent the same message: every
reply goes through the benchmarks' reply cache (``--cache``, :mod:`benchmarks.reply_cache`;
``--force`` recomputes). In one-shot runs that is all of it: one client pass per seed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ConfigRecord, Message, MetricRecord

from benchmarks.reply_cache import ReplyCache
from common.config import ConfigError, pyproject_defaults
from common.wire import ARRAYS, CLIENT, LABEL_COUNTS, METRICS
from deploy.run_config import parse_set
from server_app.results import RunResults

REPO = Path(__file__).resolve().parents[1]
DEFENCES_ON = {"max-update-ratio": 10.0, "max-weight-ratio": 3.0, "min-claim-agreement": 0.6}
INFLATION = 10**6
# Under Dirichlet 0.1 the default profile's accuracy swings by up to 8 points from one FedAvg
# round to the next, so the table also gives each run's mean over its last rounds.
LAST_ROUNDS = 3

Change = Callable[[Message], None]


def _inflate_held(reply: Message) -> None:
    """Claim 10^6 more samples of its largest class: own the weighted averages."""
    counts = list(reply.content[LABEL_COUNTS]["counts"])
    counts[int(np.argmax(counts))] += INFLATION
    reply.content[LABEL_COUNTS] = MetricRecord({"counts": counts})
    reply.content[METRICS]["num-examples"] = int(reply.content[METRICS]["num-examples"]) + INFLATION


def _inflate_missing(reply: Message) -> None:
    """Claim 10^5 samples of every class it barely holds (under 10 samples; Dirichlet splits
    leave a client one or two samples of most classes): own those classes' experts."""
    counts = list(reply.content[LABEL_COUNTS]["counts"])
    added = 0
    for label, count in enumerate(counts):
        if count < 10:
            counts[label] += INFLATION // 10
            added += INFLATION // 10
    reply.content[LABEL_COUNTS] = MetricRecord({"counts": counts})
    reply.content[METRICS]["num-examples"] = int(reply.content[METRICS]["num-examples"]) + added


def _negative_variance(reply: Message) -> None:
    """BatchNorm running variances of -1e30: finite, and NaN once averaged and normalised."""
    arrays = reply.content[ARRAYS]
    for key in [k for k in arrays if k.endswith("running_var")]:
        arrays[key] = Array(np.full(arrays[key].shape, -1e30, np.float32))


def _boosted(reply: Message) -> None:
    """Every trained weight times 100: an update far outside the round's spread."""
    arrays = reply.content[ARRAYS]
    for key in arrays:
        values = arrays[key].numpy()
        if values.dtype == np.float32 and not key.endswith(("running_mean", "running_var")):
            arrays[key] = Array((100.0 * values).astype(np.float32))


def _flipped_model(reply: Message) -> None:
    """The classifier's head rows rolled by one: the model a client trained on labels shifted
    by one (y -> y + 1) would be, with honest counts."""
    arrays = reply.content[ARRAYS]
    for key in ("head.weight", "head.bias"):
        arrays[key] = Array(np.roll(arrays[key].numpy(), 1, axis=0))


def _flipped_and_inflated(reply: Message) -> None:
    """The flipped model, owning the averages with inflated counts: the worst of both."""
    _flipped_model(reply)
    _inflate_held(reply)


def _claim_partition_0(reply: Message) -> None:
    """Answer as partition 0, which another node holds."""
    reply.content[CLIENT] = ConfigRecord({"partition-id": 0})


ATTACKS: dict[str, Change] = {
    "inflated-counts": _inflate_held,
    "counts-for-classes-barely-held": _inflate_missing,
    "negative-bn-variance": _negative_variance,
    "boosted-update": _boosted,
    "flipped-model": _flipped_model,
    "flipped-model-inflated-counts": _flipped_and_inflated,
    "claims-another-partition": _claim_partition_0,
}


def attacker(node: int, change: Change) -> Callable[[int, Message], Message]:
    """A tamper under which ``node``'s train replies are changed as ``change`` says."""

    def tamper(node_id: int, reply: Message) -> Message:
        if node_id == node and reply.metadata.message_type == "train" and not reply.has_error():
            change(reply)
        return reply

    return tamper


def run_one(
    config: dict[str, Any],
    clients: int,
    tamper: Callable[[int, Message], Message] | None,
    cache: ReplyCache | None = None,
) -> dict[str, Any]:
    """One in-process run; its final accuracy and the rules the server named. The clients
    answer from ``cache`` where they can: the tamper applies to the reply either way."""
    from client_app.app import app
    from server_app.inprocess import run_inprocess

    started = time.perf_counter()
    client_app = cache.wrap(app) if cache is not None else app
    run_inprocess(config, clients, tamper=tamper, client_app=client_app)
    results = RunResults.read(Path(config["results-dir"]) / config["run-name"])
    rules = sorted(
        {rule for entry in results.participation.values() for rule in entry["rejected"].values()}
        | {
            rule.split(":")[0]
            for entry in results.participation.values()
            for rule in entry.get("bounded", {}).values()
        }
        | {entry["skipped"].split(":")[0] for entry in results.participation.values()} - {""}
    )
    last = results.rounds[results.last_round]
    trained = sorted(r for r in results.rounds if int(r) > 0)  # round 0: the initial model
    tail = [results.rounds[r]["accuracy"] for r in trained[-LAST_ROUNDS:]]
    return {
        "accuracy": last["accuracy"],
        "last-rounds": sum(tail) / len(tail),
        "rules": rules,
        "seconds": round(time.perf_counter() - started, 1),
    }


def render(rows: list[dict[str, Any]], title: str) -> str:
    """The table: per attack, seed and defence setting, accuracy and drop against clean, at
    the last round and over the last :data:`LAST_ROUNDS` rounds."""
    lines = [
        f"# {title}",
        "",
        "| attack | seed | defences | clean | attacked | drop (points) |"
        f" drop, mean of the last {LAST_ROUNDS} rounds | rules named |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        drop = 100 * (row["clean"] - row["accuracy"])
        drop_late = 100 * (row["clean-last-rounds"] - row["last-rounds"])
        lines.append(
            f"| {row['attack']} | {row['seed']} | {row['defences']} | {100 * row['clean']:.2f} |"
            f" {100 * row['accuracy']:.2f} | {drop:+.2f} | {drop_late:+.2f} |"
            f" {', '.join(row['rules']) or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.attacks", description=__doc__)
    parser.add_argument("--profile", type=Path, default=REPO / "conf" / "quick.toml")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--attacks", nargs="+", choices=sorted(ATTACKS), default=list(ATTACKS))
    parser.add_argument(
        "--defences", nargs="+", choices=["off", "on"], default=["off", "on"], help="in this order"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one run-config key in every run, after the defences (TOML literal)",
    )
    parser.add_argument("--data-root", type=Path, default=REPO / "data")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "attacks")
    parser.add_argument(
        "--cache",
        type=Path,
        default=REPO / "benchmarks" / "results" / "client-replies",
        help="the client replies shared with the benchmark suites",
    )
    parser.add_argument("--force", action="store_true", help="recompute every client reply")
    args = parser.parse_args(argv)
    try:
        sets = parse_set(args.set)
    except ConfigError as error:
        parser.error(str(error))

    base = {
        **pyproject_defaults(REPO / "pyproject.toml"),
        **tomllib.loads(args.profile.read_text()),
        "data-root": str(args.data_root.resolve()),
        "results-dir": str((args.out / "runs").resolve()),
        "device": "cpu",
        "min-nodes": args.clients,
    }
    rows = []
    args.out.mkdir(parents=True, exist_ok=True)
    cache = ReplyCache(args.cache, read=not args.force)
    title = f"One attacker of {args.clients} clients, profile {args.profile.name}"
    for seed in args.seeds:
        for defences in args.defences:
            # "off" zeroes the options, whatever the profile sets (the default profile has them on)
            overrides = DEFENCES_ON if defences == "on" else dict.fromkeys(DEFENCES_ON, 0.0)
            config = {**base, **overrides, **sets, "seed": seed}
            clean_config = {**config, "run-name": f"clean-{defences}-s{seed}"}
            clean = run_one(clean_config, args.clients, None, cache)
            print(f"seed {seed}, defences {defences}: clean {clean['accuracy']:.4f}", flush=True)
            for name in args.attacks:
                tamper = attacker(args.clients, ATTACKS[name])
                run_name = f"{name}-{defences}-s{seed}"
                result = run_one({**config, "run-name": run_name}, args.clients, tamper, cache)
                rows.append(
                    {
                        "attack": name,
                        "seed": seed,
                        "defences": defences,
                        **result,
                        "clean": clean["accuracy"],
                        "clean-last-rounds": clean["last-rounds"],
                    }
                )
                print(render(rows[-1:], name).splitlines()[-1], flush=True)
                # after every run: a stopped benchmark keeps what it measured
                (args.out / "attacks.md").write_text(render(rows, title))
                (args.out / "attacks.json").write_text(json.dumps(rows, indent=2))
    print(f"client replies: {cache.reused} reused, {cache.computed} computed")
    print(f"wrote {args.out / 'attacks.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
