"""The Mosaic ServerApp: validate the config, build the strategy, run it, write the results.

The config is checked before anything else, so a bad run config fails the run before a single
client trains, with a message naming the key.

After every round the server's whole state goes into ``checkpoint.pt`` in the results folder
(see ``server_app.checkpoint``). With ``resume = true`` a run loads it and runs only the rounds
left. Flower's ``Strategy.start`` always counts rounds from 1, so rather than copy its loop the
resumed run calls it for the remaining rounds and the strategy's round counter
(``run_round``) adds the rounds already done in every hook; the server's RNG states are
restored last, so node sampling continues exactly where the stopped run left it.
"""

from __future__ import annotations

import copy
import random
import time
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord, UserConfig
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from common.architectures import global_model_of
from common.config import RunConfig
from common.data import dataset_info, evaluation_subset, load_dataset
from common.paths import data_root, results_root
from common.train import evaluate, resolve_device
from common.wire import record_to_state, state_to_record
from server_app.checkpoint import (
    check_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from server_app.report_page import write_report_page
from server_app.results import RunLog, RunReport, RunResults
from server_app.strategies import STRATEGIES, CheckedFedAvg, validate_run_config
from server_app.strategies.base import Evaluator
from server_app.strategies.teacher import TeacherStrategy

app = ServerApp()


def seed_everything(seed: int) -> None:
    """Seed every RNG the server touches (node sampling uses Python's ``random``)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# The server's own phases in a teacher round, each with the figure that times it ("teacher"
# stands for the strategy's ``teacher_phase``: the meta model for Mosaic).
_SERVER_PHASES = {
    "teacher": "meta-seconds",
    "teacher-and-student-evaluation": "evaluation-seconds",
    "distillation": "kd-seconds",
}


def phase_seconds(strategy: CheckedFedAvg) -> dict[str, float]:
    """Wall time per phase: federated rounds before/after distillation, generators, meta, KD."""
    phases: dict[str, float] = {}
    for server_round, round_log in strategy.rounds.items():
        phase = strategy.phase_of(server_round)
        mosaic = round_log.mosaic
        server_side = sum(mosaic.get(key, 0.0) for key in _SERVER_PHASES.values())
        phases[phase] = phases.get(phase, 0.0) + round_log.seconds - server_side
        if mosaic and isinstance(strategy, TeacherStrategy):
            for name, key in _SERVER_PHASES.items():
                name = strategy.teacher_phase if name == "teacher" else name
                if key in mosaic:
                    phases[name] = phases.get(name, 0.0) + mosaic[key]
    return {k: round(v, 1) for k, v in phases.items()}


class RoundRecorder:
    """Flower's ``evaluate_fn``: after every round, evaluate the global model on the test set,
    record the round in the results folder and write the checkpoint a resumed run starts from.
    """

    def __init__(
        self,
        strategy: CheckedFedAvg,
        report: RunReport,
        template: torch.nn.Module,
        evaluate_model: Evaluator,
        run_config: UserConfig,
    ) -> None:
        self.strategy = strategy
        self.report = report
        self.template = template
        self.evaluate_model = evaluate_model
        self.run_config = dict(run_config)
        self.resumed = strategy.rounds_done > 0

    def __call__(self, step: int, arrays: ArrayRecord) -> MetricRecord | None:
        if step == 0 and self.resumed:
            return None  # a resumed model was evaluated after its round, before the stop
        server_round = self.strategy.run_round(step)
        model = copy.deepcopy(self.template)
        model.load_state_dict(record_to_state(arrays))
        metrics = self.evaluate_model(model)
        metrics.update(self.strategy.sub_model_metrics(model))
        self.report.record_round(server_round, **metrics, **self._round_figures(server_round))
        self.report.write_participation(self.strategy.rounds)
        self.report.write_label_counts(self.strategy.label_counts)
        if server_round > 0:
            self._checkpoint(server_round, arrays)
        return MetricRecord(metrics)

    def _round_figures(self, server_round: int) -> dict[str, float]:
        """Wall time, who took part, and the teacher's figures of a round (none for round 0)."""
        round_log = self.strategy.rounds.get(server_round)
        if round_log is None:
            return {}
        return {
            "seconds": round_log.seconds,
            "replied": len(round_log.replied),
            "rejected": len(round_log.rejected),
            "failed": len(round_log.failed),
            "missing": len(round_log.missing),
            "skipped": int(bool(round_log.skipped)),
            **round_log.mosaic,
        }

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        """The state a resumed run starts from; the RNG states are taken last."""
        state = {
            "round": server_round,
            "run-config": self.run_config,
            "global-model": record_to_state(arrays),
            "strategy": self.strategy.state_dict(),
            "metrics": self.report.state_dict(),
        }
        save_checkpoint(self.report.folder, {**state, "rng": rng_state()})


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy for ``num-rounds`` rounds and write the results folder."""
    started = time.perf_counter()
    cfg = validate_run_config(context.run_config)
    seed_everything(cfg.seed)
    report = RunReport(results_root(cfg), cfg, dict(context.run_config))
    with RunLog(report.folder):  # the log goes to run.log too, while this run lasts
        try:
            run(grid, context, cfg, report)
        finally:
            report.close()
        report.add_phase_seconds("total", round(time.perf_counter() - started, 1))
        _log_summary(cfg, report)
        write_report_page(report.folder)


def run(grid: Grid, context: Context, cfg: RunConfig, report: RunReport) -> None:
    """Build the strategy (resuming it from a checkpoint when asked), run its rounds and write
    the final model and pictures."""
    device = resolve_device(cfg.device)
    log(INFO, "Results go to %s (device: %s)", report.folder, device)
    info = dataset_info(cfg.dataset)
    template = global_model_of(cfg)
    evaluate_model = _no_test_set
    if cfg.server_test_set:
        test_images, test_labels = load_dataset(cfg.dataset, data_root(cfg), train=False)
        whole = len(test_labels)
        test_images, test_labels = evaluation_subset(test_images, test_labels, cfg.test_samples)
        if len(test_labels) < whole:
            log(
                INFO,
                "Evaluating on %d of the %d test samples (test-samples)",
                len(test_labels),
                whole,
            )

        def evaluate_model(model: torch.nn.Module) -> dict[str, float]:
            result = evaluate(model, test_images, test_labels, device)
            return {"accuracy": result.accuracy, "loss": result.loss}
    else:
        log(INFO, "server-test-set = false: the nodes' held-out data is the only evaluation")

    strategy = STRATEGIES[cfg.strategy](
        cfg, template, info, device=device, evaluate_model=evaluate_model
    )
    strategy.on_federated_evaluation = report.record_round
    initial_arrays = state_to_record(template.state_dict())
    checkpoint = load_checkpoint(report.folder) if cfg.resume else None
    if checkpoint is not None:
        initial_arrays = resume(checkpoint, context.run_config, strategy, report)
    elif cfg.resume:
        log(WARNING, "resume: no checkpoint in %s, so the run starts at round 1", report.folder)

    result = strategy.start(
        grid=grid,
        initial_arrays=initial_arrays,
        num_rounds=cfg.num_rounds - strategy.rounds_done,
        timeout=cfg.round_timeout,
        evaluate_fn=RoundRecorder(strategy, report, template, evaluate_model, context.run_config),
    )
    # Flower's result holds the last aggregated model: none when every round it ran was skipped.
    final_arrays = result.arrays if len(result.arrays) else initial_arrays
    finish(report, strategy, record_to_state(final_arrays))


def _no_test_set(model: torch.nn.Module) -> dict[str, float]:
    """The server's evaluation without a test set: no figures (the nodes evaluate)."""
    return {}


def finish(report: RunReport, strategy: CheckedFedAvg, final_state: dict) -> None:
    """Write the final model, the plots, the generators' samples and the time per phase."""
    report.write_model(final_state)
    report.plot_accuracy()
    report.plot_partition(strategy.label_counts)
    if isinstance(strategy, TeacherStrategy) and strategy.generators:
        generators = {pid: strategy.generator_of(pid) for pid in strategy.generators}
        report.save_generator_samples(generators, strategy.info)
    for phase, phase_time in phase_seconds(strategy).items():
        report.add_phase_seconds(phase, phase_time)


def resume(
    checkpoint: dict, run_config: UserConfig, strategy: CheckedFedAvg, report: RunReport
) -> ArrayRecord:
    """Load a checkpoint into the strategy, the report and the RNGs; return its global model.

    Sets ``strategy.rounds_done`` to the checkpoint's round. Raises ``ConfigError`` when the
    run config differs from the checkpoint's in a key that changes what is computed.
    """
    check_resumable(checkpoint["run-config"], run_config)
    strategy.load_state_dict(checkpoint["strategy"])
    strategy.rounds_done = checkpoint["round"]
    report.load_state_dict(checkpoint["metrics"])
    set_rng_state(checkpoint["rng"])  # last, so that nothing above moves it
    log(INFO, "Resuming after round %d from %s", checkpoint["round"], report.folder)
    return state_to_record(checkpoint["global-model"])


def _log_summary(cfg: RunConfig, report: RunReport) -> None:
    """The run's summary, as the launchers print it (read back through ``RunResults``)."""
    log(INFO, "")
    header = f"==== {cfg.strategy} on {cfg.dataset} ({cfg.partitioning}, alpha={cfg.alpha}) ===="
    for line in [header, *RunResults.read(report.folder).summary_lines()]:
        log(INFO, "%s", line)
