"""The issue's targets, checked against the records a suite holds.

The benchmark reports them (they are not timed tests): each target reads the cell records of
the settings it is about and says *met*, *missed* or *not run*, with the figures behind the
verdict, so a missed target is stated in the table itself, never left to the reader.

Comparisons between two methods are paired by seed (only the seeds both have run count), so a
method run on one more seed than another cannot move the verdict. A row tied with Mosaic is
not "above" it (in one-shot runs the mosaic-no-meta ablation is the same run, see
docs/results.md); the verdict lists the ties.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

Record = Mapping[str, Any]

# The one-shot targets of the issue, per dataset: Mosaic's global model at least this (in %).
ONE_SHOT_FLOOR = {"fashion-mnist": 78.0, "mnist": 95.0}
STUDENT_GAP_POINTS = 5.0  # the distilled student within this many points of label-share
MULTI_ROUND_LEAD_POINTS = 5.0  # Mosaic this many points above FedAvg at the same rounds
ARCH_LEAD_POINTS = 5.0  # architectures: the student this far above FedDF and the best family
TIER_LEAD_POINTS = 5.0  # width tiers: Mosaic's full model this far above HeteroFL/FedRolex and
# the exclusive baseline
QUICK_SUITE_MINUTES = 20.0


@dataclass(frozen=True)
class Verdict:
    """One target: what it asks, what was measured, and whether it holds."""

    target: str
    measured: str
    status: str  # "met", "missed" or "not run"


def _ok(records: Sequence[Record], **cell: Any) -> dict[int, Record]:
    """The ``ok`` records whose cell matches every given field, by seed."""
    return {
        r["cell"]["seed"]: r
        for r in records
        if r.get("status") == "ok"
        and all(r["cell"].get(k, "" if k == "variant" else None) == v for k, v in cell.items())
    }


def final(record: Record) -> float | None:
    """The global model's accuracy at the end of the run."""
    return record.get("final_accuracy")


def teacher(record: Record) -> float | None:
    """The teacher's accuracy at the kd-round."""
    return record.get("teacher_accuracy")


def _pct(values: Sequence[float]) -> float:
    return 100 * float(np.mean(values))


def _paired(
    a: Mapping[int, Record],
    b: Mapping[int, Record],
    value_a: Callable[[Record], float | None],
    value_b: Callable[[Record], float | None],
) -> tuple[list[int], float, float] | None:
    """Mean of ``value_a`` over ``a`` and ``value_b`` over ``b`` (in %) on their common seeds."""
    seeds = sorted(s for s in a.keys() & b.keys() if value_a(a[s]) is not None)
    seeds = [s for s in seeds if value_b(b[s]) is not None]
    if not seeds:
        return None
    return (
        seeds,
        _pct([value_a(a[s]) for s in seeds]),
        _pct([value_b(b[s]) for s in seeds]),
    )


def _seeds(seeds: Sequence[int]) -> str:
    return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''}"


def one_shot_verdicts(
    records: Sequence[Record],
    method_accuracy: Callable[[Record], float | None],
    teacher_only: frozenset[str] = frozenset(),
) -> list[Verdict]:
    """The one-shot targets (5 clients, alpha 0.1) for every dataset the records hold.

    Rows in ``teacher_only`` are judged by a teacher that is never distilled into a global
    model; the "above every other row" verdict counts them (the issue asks for every row) and
    marks them, so a reader sees when only teachers are above Mosaic's global model.
    """
    verdicts = []
    for dataset, floor in ONE_SHOT_FLOOR.items():
        setting = {
            "protocol": "one-shot",
            "dataset": dataset,
            "alpha": 0.1,
            "num_clients": 5,
            "variant": "",
        }
        where = f"one-shot {dataset} a=0.1"
        mosaic = _ok(records, strategy="mosaic", **setting)
        label_share = _ok(records, strategy="label-share", **setting)

        name = f"{where}: Mosaic's global model ≥ {floor:.0f}%"
        if mosaic:
            mean = _pct([final(r) for r in mosaic.values()])
            verdicts.append(
                Verdict(name, f"{mean:.2f} ({_seeds(list(mosaic))})", _met(mean >= floor))
            )
        else:
            verdicts.append(Verdict(name, "-", "not run"))

        name = f"{where}: Mosaic above every other row"
        strategies = sorted({r["cell"]["strategy"] for r in records} - {"mosaic"})
        rivals = {s: _ok(records, strategy=s, **setting) for s in strategies}
        others = {s: runs for s, runs in rivals.items() if runs}
        above: dict[str, str] = {}  # rival -> "name acc > ours"
        tied = []
        for other, runs in others.items():
            pair = _paired(mosaic, runs, final, method_accuracy)
            if pair and pair[2] > pair[1] + 1e-6:
                kind = " (teacher, not distilled)" if other in teacher_only else ""
                above[other] = f"{other} {pair[2]:.2f} > {pair[1]:.2f}{kind}"
            elif pair and pair[2] >= pair[1] - 1e-6:
                tied.append(f"{other} {pair[2]:.2f}")
        if mosaic and others:
            measured = "; ".join(above.values()) if above else f"none of {len(others)} others above"
            if above and set(others) - teacher_only and set(above) <= teacher_only:
                measured += "; no global model above"
            if tied:
                measured += f" (tied: {', '.join(tied)})"
            verdicts.append(Verdict(name, measured, _met(not above)))
        else:
            verdicts.append(Verdict(name, "-", "not run"))

        verdicts.append(
            _versus_label_share(
                f"{where}: Mosaic's teacher reaches the label-share ensemble",
                _paired(mosaic, label_share, teacher, teacher),
                holds=lambda ours, reference: ours >= reference - 1e-6,
            )
        )
        verdicts.append(
            _versus_label_share(
                f"{where}: Mosaic's student within {STUDENT_GAP_POINTS:.0f} points of label-share",
                _paired(mosaic, label_share, final, teacher),
                holds=lambda ours, reference: reference - ours <= STUDENT_GAP_POINTS,
                show_gap=True,
            )
        )
    return verdicts


def _versus_label_share(
    name: str,
    pair: tuple[list[int], float, float] | None,
    holds: Callable[[float, float], bool],
    show_gap: bool = False,
) -> Verdict:
    """A Mosaic figure against the label-share ensemble's, from :func:`_paired`."""
    if pair is None:
        return Verdict(name, "-", "not run")
    seeds, ours, reference = pair
    gap = f": {reference - ours:+.2f} below" if show_gap else ""
    return Verdict(
        name,
        f"{ours:.2f} vs {reference:.2f}{gap} ({_seeds(seeds)})",
        _met(holds(ours, reference)),
    )


def multi_round_verdict(records: Sequence[Record]) -> Verdict:
    """Multi-round FashionMNIST alpha 0.1: Mosaic ≥ FedAvg + 5 points at every round from the
    kd-round on (mean over their common seeds, round by round).

    The verdict also gives Mosaic's teacher at the kd-round against FedAvg's model at that
    round: distillation moves the student towards its teacher, so a teacher less than 5 points
    above FedAvg's model says the lead cannot come from that distillation, whatever its steps.
    """
    setting = {"protocol": "multi-round", "dataset": "fashion-mnist", "alpha": 0.1, "variant": ""}
    name = (
        f"multi-round fashion-mnist a=0.1: Mosaic ≥ FedAvg + {MULTI_ROUND_LEAD_POINTS:.0f} "
        "points at the same rounds"
    )
    mosaic, fedavg = (_ok(records, strategy=s, **setting) for s in ("mosaic", "fedavg"))
    seeds = sorted(mosaic.keys() & fedavg.keys())
    if not seeds:
        return Verdict(name, "-", "not run")
    kd_round = int(mosaic[seeds[0]]["config"]["kd-round"])

    def curve(runs: Mapping[int, Record]) -> dict[int, float]:
        per_round = [
            {int(k): v for k, v in runs[s]["accuracy_per_round"].items() if v is not None}
            for s in seeds
        ]
        common = set.intersection(*(set(c) for c in per_round))
        return {k: _pct([c[k] for c in per_round]) for k in sorted(common) if k >= kd_round}

    ours, theirs = curve(mosaic), curve(fedavg)
    gaps = {k: ours[k] - theirs[k] for k in ours.keys() & theirs.keys()}
    if not gaps:
        return Verdict(name, "-", "not run")
    last = max(gaps)
    measured = (
        f"round {last}: {ours[last]:.2f} vs {theirs[last]:.2f} ({gaps[last]:+.2f}); "
        f"rounds {min(gaps)}-{last}: mean {np.mean(list(gaps.values())):+.2f}, "
        f"min {min(gaps.values()):+.2f} ({_seeds(seeds)})"
    )
    teachers = [teacher(mosaic[s]) for s in seeds]
    if kd_round in theirs and None not in teachers:
        lift = _pct(teachers) - theirs[kd_round]
        measured += (
            f"; Mosaic's teacher at round {kd_round}: {_pct(teachers):.2f} vs FedAvg's model"
            f" {theirs[kd_round]:.2f} ({lift:+.2f})"
        )
    return Verdict(name, measured, _met(min(gaps.values()) >= MULTI_ROUND_LEAD_POINTS))


def tier_verdicts(records: Sequence[Record]) -> list[Verdict]:
    """The width-tier targets, per protocol (FashionMNIST alpha 0.1, 10 clients, tiers 4/3/3):
    Mosaic's full model at least 5 points above HeteroFL (FedRolex in multi-round) and above
    exclusive FedAvg, and every smaller tier's sub-model of it above that tier trained alone.
    In multi-round runs the same targets are also judged for the label-share prior distilled
    after every round (``mosaic-no-meta``, ``tiers-rolling-redistilled``), named as what it is:
    across tiers the meta model does not beat its prior (docs/results.md)."""
    verdicts = []
    for protocol, tiers, width_method in (
        ("one-shot", "tiers", "HeteroFL"),
        ("multi-round", "tiers-rolling", "FedRolex"),
    ):
        setting = {"protocol": protocol, "dataset": "fashion-mnist", "alpha": 0.1}
        contenders = {"Mosaic": _ok(records, strategy="mosaic", variant=tiers, **setting)}
        if protocol == "multi-round":
            contenders["Mosaic's prior, distilled every round"] = _ok(
                records, strategy="mosaic-no-meta", variant=f"{tiers}-redistilled", **setting
            )
        rivals = {
            width_method: _ok(records, strategy="fedavg", variant=tiers, **setting),
            "exclusive FedAvg": _ok(
                records, strategy="fedavg-exclusive", variant="tiers", **setting
            ),
        }
        for name, ours in contenders.items():
            for rival, runs in rivals.items():
                verdicts.append(
                    _lead(
                        f"{protocol} tiers: {name} ≥ {rival} + {TIER_LEAD_POINTS:.0f} points",
                        _paired(ours, runs, final, final),
                        TIER_LEAD_POINTS,
                    )
                )
            for width in ("0.5", "0.25"):
                alone = _ok(
                    records, strategy="fedavg-exclusive", variant=f"tier-{width}-alone", **setting
                )

                def sub_model(record: Record, width: str = width) -> float | None:
                    return (record.get("sub_model_accuracy") or {}).get(width)

                verdicts.append(
                    _lead(
                        f"{protocol} tiers: {name}: width-{width} sub-model above that tier alone",
                        _paired(ours, alone, sub_model, sub_model),
                        1e-6,
                    )
                )
    return verdicts


def architecture_verdicts(records: Sequence[Record]) -> list[Verdict]:
    """The mixed-architecture targets, per protocol (FashionMNIST alpha 0.1, 10 clients, CNN /
    ResNet-8 / MLP): the student at least 5 points above FedDF and above the best family
    trained alone (the best ``arch_accuracy`` of FedAvg within families, per seed), and the
    teacher at or above the label-share teacher. Judged for Mosaic and, named as what it is,
    for its prior distilled (``mosaic-no-meta``)."""
    verdicts = []
    for protocol in ("one-shot", "multi-round"):
        setting = {"protocol": protocol, "dataset": "fashion-mnist", "alpha": 0.1}
        of = {"variant": "archs", **setting}
        contenders = {
            "Mosaic": _ok(records, strategy="mosaic", **of),
            "Mosaic's prior, distilled": _ok(records, strategy="mosaic-no-meta", **of),
        }
        families = _ok(records, strategy="fedavg", **of)

        def best_family(record: Record) -> float | None:
            return max((record.get("arch_accuracy") or {}).values(), default=None)

        for name, ours in contenders.items():
            verdicts.append(
                _lead(
                    f"{protocol} archs: {name} ≥ FedDF + {ARCH_LEAD_POINTS:.0f} points",
                    _paired(ours, _ok(records, strategy="feddf", **of), final, final),
                    ARCH_LEAD_POINTS,
                )
            )
            verdicts.append(
                _lead(
                    f"{protocol} archs: {name} ≥ the best family alone + "
                    f"{ARCH_LEAD_POINTS:.0f} points",
                    _paired(ours, families, final, best_family),
                    ARCH_LEAD_POINTS,
                )
            )
        verdicts.append(
            _lead(
                f"{protocol} archs: Mosaic's teacher ≥ the label-share teacher",
                _paired(
                    contenders["Mosaic"],
                    _ok(records, strategy="label-share", **of),
                    teacher,
                    teacher,
                ),
                0.0,
            )
        )
    return verdicts


def _lead(name: str, pair: tuple[list[int], float, float] | None, points: float) -> Verdict:
    """Ours at least ``points`` above theirs, from :func:`_paired`."""
    if pair is None:
        return Verdict(name, "-", "not run")
    seeds, ours, theirs = pair
    return Verdict(
        name,
        f"{ours:.2f} vs {theirs:.2f} ({ours - theirs:+.2f}, {_seeds(seeds)})",
        _met(ours - theirs >= points),
    )


def quick_suite_verdict(records: Sequence[Record]) -> Verdict:
    """The quick suite's cells, run one after another, take under 20 minutes in all."""
    name = f"quick suite under {QUICK_SUITE_MINUTES:.0f} minutes"
    walls = [r["wall_seconds"] for r in records if r.get("status") == "ok"]
    if not walls:
        return Verdict(name, "-", "not run")
    minutes = sum(walls) / 60
    return Verdict(
        name,
        f"{minutes:.1f} min over {len(walls)} cells (sum of their wall times)",
        _met(minutes < QUICK_SUITE_MINUTES),
    )


def render_standing(
    records: Sequence[Record],
    method_accuracy: Callable[[Record], float | None],
    teacher_only: frozenset[str] = frozenset(),
) -> str:
    """Markdown section: in every setting Mosaic ran, its global model against the best other
    global model and the best undistilled teacher, each paired by seed.

    The targets judge alpha 0.1 only; this answers "does it beat the others, and where?" for
    every setting the records hold, milder skews and multi-round included. Empty without a
    Mosaic record.
    """
    settings: dict[tuple, dict[str, Any]] = {}  # in the records' order (the suite's)
    for r in records:
        if r.get("status") == "ok" and r["cell"]["strategy"] == "mosaic":
            where = {k: v for k, v in r["cell"].items() if k not in ("strategy", "seed")}
            settings.setdefault(tuple(sorted(where.items())), where)
    rows = []
    strategies = sorted({r["cell"]["strategy"] for r in records} - {"mosaic"})
    for where in settings.values():
        mosaic = _ok(records, strategy="mosaic", **where)
        best: dict[bool, tuple[float, str]] = {}  # is a teacher -> (lead, "text")
        for other in strategies:
            pair = _paired(mosaic, _ok(records, strategy=other, **where), final, method_accuracy)
            if pair is None:
                continue
            seeds, ours, theirs = pair
            if abs(ours - theirs) < 1e-6:
                continue  # a tie is the same run (one-shot mosaic-no-meta), not a rival
            lead = (ours - theirs, f"{other} {theirs:.2f}: {ours - theirs:+.2f} ({_seeds(seeds)})")
            is_teacher = other in teacher_only
            if is_teacher not in best or lead[0] < best[is_teacher][0]:
                best[is_teacher] = lead
        mean = _pct([final(r) for r in mosaic.values()])
        rows.append(
            f"| {where['protocol']} {where['dataset']} a={where['alpha']} "
            f"n={where['num_clients']} | {mean:.2f} ({_seeds(list(mosaic))}) "
            f"| {best[False][1] if False in best else '-'} "
            f"| {best[True][1] if True in best else '-'} |"
        )
    if not rows:
        return ""
    lines = [
        "## Mosaic against the best other row, per setting",
        "",
        "Mosaic's global model against the strongest other global model and the strongest "
        "undistilled teacher of the setting; the lead is Mosaic's minus theirs, on the seeds "
        "both ran (a negative lead: that row is above Mosaic). Exact ties are left out: in "
        "one-shot runs mosaic-no-meta is the same run as Mosaic.",
        "",
        "| setting | Mosaic | best other global model: lead | best teacher row: lead |",
        "|---|---|---|---|",
        *rows,
    ]
    return "\n".join(lines) + "\n"


def _met(condition: bool) -> str:
    return "met" if condition else "missed"


def render_targets(
    records: Sequence[Record],
    suite_name: str,
    method_accuracy: Callable[[Record], float | None],
    teacher_only: frozenset[str] = frozenset(),
) -> str:
    """Markdown section: one row per target of the issue that applies to ``suite_name``."""
    if suite_name == "quick":
        verdicts = [quick_suite_verdict(records)]
    elif suite_name == "tiers":
        verdicts = tier_verdicts(records)
    elif suite_name == "archs":
        verdicts = architecture_verdicts(records)
    else:
        verdicts = [
            *one_shot_verdicts(records, method_accuracy, teacher_only),
            multi_round_verdict(records),
        ]
    lines = ["## Targets", "", "| target | measured | status |", "|---|---|---|"]
    lines += [f"| {v.target} | {v.measured} | {v.status} |" for v in verdicts]
    return "\n".join(lines) + "\n"
