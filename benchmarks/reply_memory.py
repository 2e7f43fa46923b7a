"""What one train reply makes the server hold before it is accepted or rejected.

    python -m benchmarks.reply_memory [--mib 256] [--cases NAME ...]

Target (issue "one bad client"): no reply makes the server hold more than twice the reply's own
size before it is rejected. Each case builds one reply at the default profile's sizes
(FashionMNIST, the CNN, 10 classes, a generator and prototypes), sends it through Flower's own
serialization (``recorddict_to_proto`` and back: the objects a ServerApp holds for a reply), and
then runs what the server does with every reply before deciding on it
(``BaseStrategy.validate_replies``): :func:`server_app.traffic.record_bytes` (the uplink
figures) and :func:`common.wire.validate_train_reply`. The attacks carry ``--mib`` MiB each.

Per case, in a fresh process (``fork``): the reply's wire size, the memory it occupies as
Flower's objects (*held*: resident memory after decoding, less before), the peak on top of that
while the server handles it (*extra*: the kernel's high-water mark, reset with
``/proc/self/clear_refs`` just before), and ``(held + extra) / held``: what the reply costs the
server against its own size. Linux only (``/proc``); a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import multiprocessing
import re
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from common.data import dataset_info
from common.models import GeneratorSpec, build_classifier, build_generator
from common.train import Prototypes
from common.wire import (
    ARRAYS,
    CLIENT,
    LABEL_COUNTS,
    METRICS,
    PROTOTYPES,
    MalformedReplyError,
    pack_train_reply,
    state_signature,
    validate_train_reply,
)
from server_app.traffic import record_bytes

MIB = 1 << 20
PROTOS_PER_CLASS = 5
INFO = dataset_info("fashion-mnist")
Case = Callable[[RecordDict, int], None]  # changes an honest reply to carry about N bytes


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = build_classifier("cnn", num_classes=INFO.num_classes, in_shape=INFO.image_shape)
    generator = build_generator(GeneratorSpec(100, INFO.image_shape, 64))
    return model, generator


def honest_reply(model: torch.nn.Module, generator: torch.nn.Module) -> RecordDict:
    """What a client sends in the generator round: weights, counts, prototypes, generator."""
    counts = [600] * INFO.num_classes
    classes = torch.arange(INFO.num_classes).repeat_interleave(PROTOS_PER_CLASS)
    prototypes = Prototypes(torch.randn(len(classes), model.feature_dim), classes)
    return pack_train_reply(
        model.state_dict(),
        num_examples=sum(counts),
        train_loss=0.5,
        partition_id=3,
        label_counts=counts,
        prototypes=prototypes,
        generator_state=generator.state_dict(),
    )


def _floats(size: int) -> np.ndarray:
    return np.ones(size // 4, dtype=np.float32)


def _nan_in_last_weight(content: RecordDict, size: int) -> None:
    """Every shape right, a NaN in the last weight: the latest a weight rule can fire."""
    arrays = content[ARRAYS]
    key = [k for k, a in arrays.items() if a.dtype == "float32"][-1]
    values = arrays[key].numpy().copy()
    values.flat[-1] = np.nan
    arrays[key] = Array(values)


def _extra_weight(content: RecordDict, size: int) -> None:
    content[ARRAYS]["smuggled"] = Array(_floats(size))


def _oversized_weight(content: RecordDict, size: int) -> None:
    arrays = content[ARRAYS]
    key = next(k for k, a in arrays.items() if a.dtype == "float32")
    arrays[key] = Array(_floats(size))


def _oversized_prototype_bank(content: RecordDict, size: int) -> None:
    rows = size // (4 * 128)
    content[PROTOTYPES] = ArrayRecord(
        {
            "features": Array(np.ones((rows, 128), dtype=np.float32)),
            "classes": Array(np.zeros(rows, dtype=np.int64)),
        }
    )


def _long_label_counts(content: RecordDict, size: int) -> None:
    content[LABEL_COUNTS] = MetricRecord({"counts": list(range(size // 8))})


def _list_as_num_examples(content: RecordDict, size: int) -> None:
    content[METRICS] = MetricRecord(
        {"num-examples": [float(i) for i in range(size // 8)], "train-loss": 0.5}
    )


def _string_as_partition_id(content: RecordDict, size: int) -> None:
    content[CLIENT] = ConfigRecord({"partition-id": "7" * size, "width": 1.0})


def _extra_client_key(content: RecordDict, size: int) -> None:
    content[CLIENT] = ConfigRecord({"partition-id": 3, "width": 1.0, "note": b"\0" * size})


def _bytes_as_width(content: RecordDict, size: int) -> None:
    content[CLIENT] = ConfigRecord({"partition-id": 3, "width": b"\1" * size})


CASES: dict[str, Case | None] = {
    "honest": None,
    "nan-in-last-weight": _nan_in_last_weight,
    "extra-weight": _extra_weight,
    "oversized-weight": _oversized_weight,
    "oversized-prototype-bank": _oversized_prototype_bank,
    "long-label-counts": _long_label_counts,
    "list-as-num-examples": _list_as_num_examples,
    "string-as-partition-id": _string_as_partition_id,
    "extra-client-key": _extra_client_key,
    "bytes-as-width": _bytes_as_width,
}


def _resident_kib() -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB."""
    status = Path("/proc/self/status").read_text()
    return tuple(
        int(re.search(rf"{name}:\s+(\d+) kB", status).group(1)) for name in ("VmRSS", "VmHWM")
    )


def _release() -> None:
    """Collect, and hand freed heap back to the kernel (glibc), so resident memory is what is
    alive."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def handle(content: RecordDict, model: torch.nn.Module, generator: torch.nn.Module) -> str:
    """What ``BaseStrategy.validate_replies`` does with a reply, in its order: validate (and
    decode), and size a well-formed one for the uplink figures. The verdict: ``accepted`` or
    the rule broken."""
    try:
        validate_train_reply(
            content,
            model_signature=state_signature(model.state_dict()),
            num_classes=INFO.num_classes,
            feature_dim=model.feature_dim,
            protos_per_class=PROTOS_PER_CLASS,
            prototypes_expected=True,
            generator_signature=state_signature(generator.state_dict()),
        )
    except MalformedReplyError as error:
        return error.rule
    record_bytes(content)
    return "accepted"


def measure(name: str, size: int, folder: Path) -> dict[str, Any]:
    """One case: wire bytes, memory held by the decoded reply, the peak on top of it while the
    server handles it, and the verdict."""
    small = build_classifier(
        "cnn", num_classes=INFO.num_classes, in_shape=INFO.image_shape, width=0.25
    )
    tiny = build_generator(GeneratorSpec(8, INFO.image_shape, 4))
    handle(honest_reply(small, tiny), small, tiny)  # lazy set-up, out of the figures
    model, generator = _models()
    content = honest_reply(model, generator)
    change = CASES[name]
    if change is not None:
        change(content, size)
    wire_file = folder / f"{name}.bin"
    wire_file.write_bytes(recorddict_to_proto(content).SerializeToString())
    del content
    _release()
    before, _ = _resident_kib()
    proto = ProtoRecordDict()
    proto.ParseFromString(wire_file.read_bytes())
    received = recorddict_from_proto(proto)
    del proto
    _release()
    held, _ = _resident_kib()
    _reset_peak()
    verdict = handle(received, model, generator)
    _, peak = _resident_kib()
    held_bytes = max(held - before, 4) * 1024
    extra_bytes = max(peak - held, 0) * 1024
    return {
        "case": name,
        "wire": wire_file.stat().st_size,
        "held": held_bytes,
        "extra": extra_bytes,
        "ratio": (held_bytes + extra_bytes) / held_bytes,
        "verdict": verdict,
    }


def _in_child(name: str, size: int, folder: Path, pipe: Any) -> None:
    torch.set_num_threads(1)  # no OpenMP team inherited half-made from the parent
    pipe.send(measure(name, size, folder))


def run_case(name: str, size: int, folder: Path) -> dict[str, Any]:
    """:func:`measure` in a forked process, so no case sees another's freed memory."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=_in_child, args=(name, size, folder, sender))
    process.start()
    sender.close()  # the child's end only: a child that dies ends recv() with EOFError
    try:
        result = receiver.recv()
    except EOFError:
        process.join()
        raise RuntimeError(
            f"case {name}: the measuring process died ({process.exitcode})"
        ) from None
    process.join()
    return result


def render(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| reply | wire MiB | held MiB | extra MiB, handling | (held + extra) / held | verdict |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| {row['case']} | {row['wire'] / MIB:.1f} | {row['held'] / MIB:.1f} |"
            f" {row['extra'] / MIB:.1f} | {row['ratio']:.2f} | {row['verdict']} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reply_memory", description=__doc__)
    parser.add_argument("--mib", type=int, default=256, help="MiB each attack carries")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        print("needs Linux's /proc/self/clear_refs", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="reply-memory-") as folder:
        rows = [run_case(name, args.mib * MIB, Path(folder)) for name in args.cases]
    print(render(rows))
    rejected = [row for row in rows if row["verdict"] != "accepted"]
    if rejected:
        worst = max(rejected, key=lambda row: row["ratio"])
        print(
            f"\nworst rejected reply: {worst['case']}, {worst['ratio']:.2f}x its own size"
            " (target: at most 2x before it is rejected)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
