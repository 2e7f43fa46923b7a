"""Speed benchmark: where a run's time goes, Mosaic against FedAvg, and what the shortcuts buy.

Three parts, each printing ratios measured side by side in one invocation (absolute times drift
on shared machines; ratios much less):

``run``
    Mosaic and FedAvg on the same profile, clients, rounds and local work, one after the other
    through ``run_inprocess`` (the full server loop, ClientApps in this process, one at a time:
    no Ray start-up in either figure). Prints each run's phases, a profile of where Mosaic's
    time goes (client work timed around the ClientApp's calls, server work from the run's own
    figures) and the headline ratio Mosaic / FedAvg.
``teacher``
    Samples per second through ``K`` client CNNs as the teacher runs them (a loop of models,
    ``server_app.moe.ExpertEnsemble``) against the same models stacked into one network
    (grouped convolutions and batched matrix products, :class:`StackedSmallCNN`), with their
    outputs compared.
``scale``
    One Mosaic run per client count (``--scale-clients``, in-process, on ``--profile`` with
    ``--set``): its phases and the process's peak resident memory, side by side.
``kd``
    One distillation step's parts for a Mosaic teacher over ``K`` clients (experts read in full
    and the label-share prior: every client model on every sample, the costliest teacher), for
    each ``K`` asked: the teacher's labelling and the student's step, each per batch, and the
    KD phase at ``kd-steps`` built from them with and without the shortcuts
    (``kd-generators-per-step``, ``kd-pool-batches``).

Examples::

    python -m benchmarks.speed --part run                  # the default profile, 10 clients
    python -m benchmarks.speed --part run --profile conf/quick.toml --clients 3
    python -m benchmarks.speed --part teacher kd --kd-clients 10 30 100
    python -m benchmarks.speed --part scale --scale-clients 10 30 100 --set num-rounds=3 ...
    python -m benchmarks.speed --part tiers                # a client's time per width tier
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PROFILE = REPO / "conf" / "fmnist-dir0.1.toml"

# The ClientApp's calls timed in the ``run`` part: (module attribute, profile row).
CLIENT_CALLS = {
    "_local_data": "client: data loading",
    "train_local": "client: local training",
    "compute_prototypes": "client: prototypes",
    "train_generator": "client: generator training",
}


# --- run: Mosaic against FedAvg -------------------------------------------------------------
@contextlib.contextmanager
def timed_client_calls() -> Iterator[dict[str, float]]:
    """Time the ClientApp's calls of :data:`CLIENT_CALLS` (summed over clients and rounds)."""
    import client_app.app as client

    seconds = dict.fromkeys(CLIENT_CALLS.values(), 0.0)

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[CLIENT_CALLS[name]] += time.perf_counter() - started

        return wrapper

    with contextlib.ExitStack() as stack:
        for name in CLIENT_CALLS:
            stack.enter_context(mock.patch.object(client, name, timed(name, getattr(client, name))))
        yield seconds


def run_once(
    profile: Path, strategy: str, clients: int, sets: Sequence[str], out: Path
) -> dict[str, Any]:
    """One in-process run; its phases, client-call times and server figures."""
    from common.config import pyproject_defaults
    from deploy.run_config import build_run_config, check_runnable
    from server_app.inprocess import run_inprocess
    from server_app.results import RunResults

    assignments = [*sets, f"results-dir={json.dumps(str(out))}", f"min-nodes={clients}"]
    overrides, cfg = build_run_config(profile, strategy, assignments, f"speed-{strategy}")
    check_runnable(cfg, clients)
    config = {**pyproject_defaults(REPO / "pyproject.toml"), **overrides}
    with timed_client_calls() as client_seconds:
        started = time.perf_counter()
        run_inprocess(config, clients)
        total = time.perf_counter() - started
    results = RunResults.read(out / f"speed-{strategy}")
    figures: dict[str, float] = {}
    for values in results.teacher_rounds().values():
        for key in ("meta-seconds", "kd-seconds", "kd-teacher-seconds", "evaluation-seconds"):
            figures[key] = figures.get(key, 0.0) + float(values.get(key, 0.0))
    last = results.rounds[results.last_round]
    return {
        "total": total,
        "phases": results.phase_seconds,
        "client": client_seconds,
        "server": figures,
        "accuracy": last.get("accuracy"),
    }


def profile_rows(run: dict[str, Any]) -> list[tuple[str, float]]:
    """Where a run's time went: client calls, the server's teacher phases, and the rest."""
    server = run["server"]
    rows = [(name, seconds) for name, seconds in run["client"].items() if seconds]
    if server:
        kd, labelling = server.get("kd-seconds", 0.0), server.get("kd-teacher-seconds", 0.0)
        rows += [
            ("server: teacher (meta model)", server.get("meta-seconds", 0.0)),
            ("server: distillation, teacher labelling", labelling),
            ("server: distillation, student steps", kd - labelling),
            ("server: teacher and student evaluation", server.get("evaluation-seconds", 0.0)),
        ]
    rows.append(
        (
            "server evaluation, aggregation, checks, messages",
            run["total"] - sum(seconds for _, seconds in rows),
        )
    )
    return rows


def part_run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="mosaic-speed-") as folder:
        runs = {
            strategy: run_once(args.profile, strategy, args.clients, args.set, Path(folder))
            for strategy in ("mosaic", "fedavg")
        }
    print(f"\n## Mosaic against FedAvg: {args.profile.name}, {args.clients} clients, in-process")
    for strategy, run in runs.items():
        print(f"\n{strategy}: {run['total']:.1f} s, final accuracy {run['accuracy']:.4f}")
        for phase, seconds in run["phases"].items():
            print(f"  {phase:<58} {seconds:8.1f} s")
    mosaic = runs["mosaic"]
    print("\nwhere Mosaic's time goes:")
    for name, seconds in profile_rows(mosaic):
        print(f"  {name:<58} {seconds:8.1f} s  {100 * seconds / mosaic['total']:5.1f} %")
    ratio = mosaic["total"] / runs["fedavg"]["total"]
    print(f"\nMosaic / FedAvg wall time: {ratio:.2f}x (target: at most 2x)")


# --- tiers: a client's time per width tier -------------------------------------------------
def part_tiers(args: argparse.Namespace) -> None:
    """What one client of each tier spends on a round's local training (``local-steps`` SGD
    steps) and on its generator (``gen-steps``, at its tier's generator size), on the
    default profile's FashionMNIST-shaped inputs. Random pixels: the time does not depend on
    what the images show."""
    from common.config import load_profile, pyproject_defaults
    from common.data import dataset_info, generator_to_classifier_input
    from common.generator import train_generator
    from common.models import GeneratorSpec, build_classifier
    from common.tiers import parse_width_tiers, tier_rates
    from common.train import train_local

    cfg = load_profile(args.profile, pyproject_defaults(REPO / "pyproject.toml"))
    info = dataset_info(cfg.dataset)
    device = torch.device(args.device)
    images = torch.randn(2_000, *info.image_shape)
    labels = torch.randint(0, info.num_classes, (2_000,))
    local = cfg.local_training(len(labels), cfg.lr, 0.0)
    settings = replace(cfg.generator_training, steps=args.tier_gen_steps)
    print(
        f"\n## One client's time per width tier ({cfg.model}, {local.steps} local steps, "
        f"{settings.steps} generator steps, {_where(args.device)})"
    )
    print("| width | parameters | local training s | generator s | generator values |")
    print("| --- | --- | --- | --- | --- |")
    for rate in tier_rates(parse_width_tiers(args.tiers)):
        torch.manual_seed(0)
        model = build_classifier(
            cfg.model, num_classes=info.num_classes, in_shape=info.image_shape, width=rate
        ).to(device)
        started = time.perf_counter()
        train_local(model, images, labels, local, device=device, seed=0)
        _synchronize(device)
        local_seconds = time.perf_counter() - started
        spec = GeneratorSpec(cfg.gen_latent_dim, info.image_shape, cfg.gen_channels).at_rate(rate)
        started = time.perf_counter()
        trained = train_generator(
            model,
            images,
            settings,
            spec=spec,
            to_input=lambda x: generator_to_classifier_input(x, info),
            label_counts=[200] * info.num_classes,
            device=device,
        )
        _synchronize(device)
        generator_seconds = time.perf_counter() - started
        size = sum(t.numel() for t in trained.generator.state_dict().values())
        parameters = sum(p.numel() for p in model.parameters())
        print(
            f"| {rate:g} | {parameters:,} | {local_seconds:.2f} | {generator_seconds:.2f} "
            f"| {size:,} |"
        )


# --- scale: one run per client count --------------------------------------------------------
def part_scale(args: argparse.Namespace) -> None:
    from benchmarks import peak_rss_mb, reset_peak_rss

    runs: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mosaic-scale-") as folder:
        for clients in args.scale_clients:
            reset_peak_rss()
            run = run_once(args.profile, "mosaic", clients, args.set, Path(folder) / str(clients))
            run["peak-rss-mib"] = peak_rss_mb()
            runs[clients] = run
    print(f"\n## Mosaic as the clients grow: {args.profile.name} {' '.join(args.set)}, in-process")
    counts = sorted(runs)
    print(f"  {'phase':<58}" + "".join(f"{n:>9d} cl." for n in counts))
    phases = list(dict.fromkeys(p for n in counts for p in runs[n]["phases"]))
    for phase in phases:
        cells = "".join(f"{runs[n]['phases'].get(phase, 0.0):11.1f} s" for n in counts)
        print(f"  {phase:<58}{cells}")
    print(
        f"  {'peak resident memory':<58}"
        + "".join(f"{runs[n]['peak-rss-mib']:9.0f} MiB" for n in counts)
    )
    print(f"  {'final accuracy':<58}" + "".join(f"{runs[n]['accuracy']:13.4f}" for n in counts))


# --- teacher: a loop of client models against one stacked network ---------------------------
def _folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """An eval-mode conv + BatchNorm as one conv's weight and bias."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return conv.weight * scale[:, None, None, None], bn.bias - bn.running_mean * scale


class StackedSmallCNN(nn.Module):
    """``K`` eval-mode ``SmallCNN``s as one network: the first conv of all of them at once (one
    input, ``K x c1`` filters), the second a grouped conv (``groups=K``), the dense layers
    batched matrix products; BatchNorm folded into the convs. Output ``[B, K, C]``, as the
    loop's. The layer indices follow ``common.models.SmallCNN.body``."""

    def __init__(self, models: Sequence[nn.Module]) -> None:
        super().__init__()
        self.k = len(models)
        with torch.no_grad():
            w1, b1 = zip(*(_folded(m.body[0], m.body[1]) for m in models), strict=True)
            w2, b2 = zip(*(_folded(m.body[4], m.body[5]) for m in models), strict=True)
            layout = torch.channels_last
            tensors = {
                "w1": torch.cat(w1).contiguous(memory_format=layout),
                "w2": torch.cat(w2).contiguous(memory_format=layout),
                "b1": torch.cat(b1),
                "b2": torch.cat(b2),
                "dense": torch.stack([m.body[9].weight for m in models]),
                "dense_bias": torch.stack([m.body[9].bias for m in models]),
                "head": torch.stack([m.head.weight for m in models]),
                "head_bias": torch.stack([m.head.bias for m in models]),
            }
        for name, tensor in tensors.items():  # buffers: .to(device) moves them
            self.register_buffer(name, tensor)

    def forward(self, x: Tensor) -> Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        h = F.max_pool2d(F.relu(F.conv2d(x, self.w1, self.b1, padding=1)), 2)
        h = F.max_pool2d(F.relu(F.conv2d(h, self.w2, self.b2, padding=1, groups=self.k)), 2)
        h = h.reshape(len(x), self.k, -1)
        h = F.relu(torch.einsum("bki,khi->bkh", h, self.dense) + self.dense_bias)
        return torch.einsum("bkh,kch->bkc", h, self.head) + self.head_bias


def client_models(count: int, seed: int = 0) -> list[nn.Module]:
    """``count`` FashionMNIST-sized ``SmallCNN``s with random weights and BN statistics (speed
    does not depend on what they learnt)."""
    from common.models import build_classifier

    torch.manual_seed(seed)
    models = []
    for _ in range(count):
        model = build_classifier("cnn", num_classes=10, in_shape=(1, 28, 28)).eval()
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 2.0)
        models.append(model.requires_grad_(False))
    return models


def samples_per_second(function: Callable[[Tensor], Tensor], x: Tensor, repeats: int) -> float:
    with torch.no_grad():
        function(x)  # warm-up: kernels chosen, memory allocated
        _synchronize(x.device)
        started = time.perf_counter()
        for _ in range(repeats):
            function(x)
        _synchronize(x.device)
    return repeats * len(x) / (time.perf_counter() - started)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def part_teacher(args: argparse.Namespace) -> None:
    from server_app.moe import ExpertEnsemble

    models = client_models(args.models)
    loop = ExpertEnsemble(models[0], {k: m.state_dict() for k, m in enumerate(models)})
    stacked = StackedSmallCNN(models)
    loop.to(args.device)
    stacked.to(args.device)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    with torch.no_grad():
        difference = (loop(x) - stacked(x)).abs().max().item()
    loop_rate = samples_per_second(loop, x, args.repeats)
    stacked_rate = samples_per_second(stacked, x, args.repeats)
    print(
        f"\n## Teacher: {args.models} client CNNs, batches of {args.batch}, {_where(args.device)}"
    )
    print(f"  loop of models (ExpertEnsemble)   {loop_rate:10.0f} samples/s")
    print(f"  stacked (grouped conv, bmm)       {stacked_rate:10.0f} samples/s")
    print(f"  stacked / loop: {stacked_rate / loop_rate:.2f}x (outputs differ by {difference:.1e})")


# --- kd: the distillation phase as the clients grow -----------------------------------------
def kd_parts(
    clients: int,
    steps: int,
    batch_per_generator: int,
    meta_features: str = "experts",
    device: str = "cpu",
    prior_clients: int = 0,
) -> dict[str, float]:
    """Seconds per labelled batch and per student step with ``clients`` client models and
    generators, every generator sampled every step (the batch grows with the clients) and ten
    a step. The teacher is Mosaic's with the label-share prior, its experts and prior read in
    full (``meta_features="experts"``) or through their heads on one body's features
    (``"global"``); the prior keeps at most ``prior_clients`` client models
    (``meta-prior-clients``, 0: all)."""
    from common.config import Distillation
    from common.models import Generator, GeneratorSpec
    from server_app.distill import distill
    from server_app.meta import MetaModel, MosaicTeacher
    from server_app.moe import (
        ExpertEnsemble,
        ProbabilityMixture,
        build_experts,
        label_share_weights,
        strongest_holders,
    )

    models = client_models(clients)
    states = [m.state_dict() for m in models]
    counts = torch.randint(0, 500, (clients, 10)).numpy()
    experts = ExpertEnsemble(models[0], build_experts(states, counts))
    kept = strongest_holders(counts, prior_clients)
    prior = ProbabilityMixture(
        ExpertEnsemble(models[0], {k: states[k] for k in kept}), label_share_weights(counts[kept])
    )
    meta = MetaModel(experts.num_experts, 10)
    body = copy.deepcopy(models[0]) if meta_features == "global" else None
    teacher = MosaicTeacher(experts, meta, prior, body).eval()
    spec = GeneratorSpec(latent_dim=100, image_shape=(1, 28, 28))
    generators = [Generator(spec) for _ in range(clients)]
    parts: dict[str, float] = {}
    for label, per_step in (("all", 0), ("ten", 10)):
        student = copy.deepcopy(models[0]).requires_grad_(True)
        settings = Distillation(
            steps=steps, batch_per_generator=batch_per_generator, generators_per_step=per_step
        )
        warm_up = Distillation(steps=1, batch_per_generator=batch_per_generator)
        distill(
            copy.deepcopy(student), teacher, generators, warm_up, to_input=torch.tanh, device=device
        )
        result = distill(student, teacher, generators, settings, to_input=torch.tanh, device=device)
        parts[f"{label}: labelling"] = result.teacher_seconds / steps
        parts[f"{label}: student"] = (result.seconds - result.teacher_seconds) / steps
    return parts


def part_kd(args: argparse.Namespace) -> None:
    for meta_features in args.kd_meta_features:
        kd_table(args, meta_features)


def kd_table(args: argparse.Namespace, meta_features: str) -> None:
    reading = {"experts": "in full", "global": "as heads on one body's features"}[meta_features]
    bound = f"at most {args.kd_prior_clients}" if args.kd_prior_clients else "all"
    print(
        f"\n## Distillation phase at {args.kd_steps} steps, {args.batch_per_generator} samples per"
        f" generator; Mosaic's teacher, experts and label-share prior ({bound} client models)"
        f" read {reading} (meta-features {meta_features}); {_where(args.device)}"
    )
    print("  (measured per batch over a few steps; the phase = steps x student + batches labelled")
    print("   x labelling)")
    header = (
        "  clients  all gens/step   10 gens/step   + pool of {0}   labelling/batch  student/step"
    )
    print(header.format(args.pool))
    phases: dict[int, float] = {}
    for clients in args.kd_clients:
        parts = kd_parts(
            clients,
            args.probe_steps,
            args.batch_per_generator,
            meta_features,
            args.device,
            args.kd_prior_clients,
        )
        plain = args.kd_steps * (parts["all: labelling"] + parts["all: student"])
        capped = args.kd_steps * (parts["ten: labelling"] + parts["ten: student"])
        pooled = args.kd_steps * parts["ten: student"] + args.pool * parts["ten: labelling"]
        phases[clients] = pooled
        print(
            f"  {clients:7d} {plain:12.0f} s {capped:12.0f} s {pooled:12.0f} s"
            f" {parts['ten: labelling']:14.3f} s {parts['ten: student']:11.3f} s"
        )
    smallest = min(phases)
    for clients, seconds in sorted(phases.items()):
        if clients != smallest:
            print(
                f"  KD phase at {clients} clients / at {smallest} (10 gens a step, pool):"
                f" {seconds / phases[smallest]:.2f}x"
            )


def _where(device: str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU, {torch.get_num_threads()} torch threads"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--part",
        nargs="+",
        choices=["run", "teacher", "kd", "scale", "tiers"],
        default=["run", "teacher", "kd"],
    )
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--clients", type=int, default=10, help="clients of the run part")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="run part overrides"
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="teacher and kd parts (cpu | cuda | cuda:N); run part: --set",
    )
    parser.add_argument("--models", type=int, default=10, help="client models of the teacher")
    parser.add_argument("--batch", type=int, default=320, help="teacher batch")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kd-clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument(
        "--kd-meta-features",
        nargs="+",
        choices=["experts", "global"],
        default=["experts", "global"],
    )
    parser.add_argument(
        "--kd-prior-clients",
        type=int,
        default=0,
        help="kd part: the label-share prior's client models (meta-prior-clients; 0: all)",
    )
    parser.add_argument("--scale-clients", type=int, nargs="+", default=[10, 30, 100])
    parser.add_argument("--tiers", default="1:4,0.5:3,0.25:3", help="tiers part: the widths")
    parser.add_argument("--tier-gen-steps", type=int, default=100, help="tiers part")
    parser.add_argument("--kd-steps", type=int, default=300)
    parser.add_argument("--batch-per-generator", type=int, default=32)
    parser.add_argument("--pool", type=int, default=30, help="batches labelled, with the pool")
    parser.add_argument("--probe-steps", type=int, default=2, help="steps measured per case")
    args = parser.parse_args(argv)
    parts = {
        "run": part_run,
        "teacher": part_teacher,
        "kd": part_kd,
        "scale": part_scale,
        "tiers": part_tiers,
    }
    for part in args.part:
        parts[part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
