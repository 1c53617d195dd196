"""The Flower ClientApp: one app for simulation and deployment.

Handlers:
- query: tells the server which client this node is (its partition) and how much data it holds;
- train: loads the broadcast LoraState, trains what the message's config names (under DP-SGD
  when it carries dp-* settings), replies with the trained factors only, plus metrics
  (num-examples, train-loss, seconds, cumulative epsilon) and the digest of the A it used; a
  client whose privacy budget cannot afford the round replies `refused` instead;
- evaluate: accuracy and loss of the broadcast state on the client's own examples.

In simulation the experiment config comes from `build_client_app(config)`; deployed with
`flwr run`, the module-level `app` reads it from the run config (see pyproject.toml). A deployed
node's own data set and device come from its node config (data-path, device: fedlora/node.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import TrainPlan, poisson_sample_rate, train_local, train_local_private
from fedlora import workspace
from fedlora.attacks import flip_labels
from fedlora.config import ExperimentConfig, experiment_from_run_config
from fedlora.lora import LoraState
from fedlora.model import evaluate, seeded
from fedlora.node import node_experiment
from fedlora.privacy import DPSettings, PrivacyLedger
from fedlora.seeds import derive_seed

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, INFO_KEY = "arrays", "config", "metrics", "info"
# The client's DP accountant history: kept in context.state, reported in every reply, and
# restored from the train message when context.state lost it (a resumed run, a restarted node).
LEDGER_KEY = "privacy-ledger"
APP_DIR = Path(__file__).resolve().parent.parent


def client_id_of(context: Context) -> int:
    """The client this node is: its simulation partition, or `client-id` in its node config."""
    for key in ("partition-id", "client-id"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError("node config has neither partition-id nor client-id")


def handle_query(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Identify this client to the server."""
    client_id = client_id_of(context)
    examples = workspace.client_examples(experiment, client_id)
    return Message(
        RecordDict(
            {
                INFO_KEY: ConfigRecord({"client-id": client_id}),
                METRICS_KEY: MetricRecord({"num-examples": len(examples)}),
            }
        ),
        reply_to=message,
    )


def handle_train(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Train the requested factors from the broadcast state and reply with them."""
    client_id = client_id_of(context)
    config = message.content[CONFIG_KEY]
    server_round = int(config["server-round"])
    examples = workspace.client_examples(experiment, client_id)
    if config.get("poison-labels", False):  # a simulated malicious client (label flipping)
        examples = replace(examples, labels=flip_labels(examples.labels, int(config["num-labels"])))
    model = workspace.lora_model(experiment, int(config["num-labels"]))
    broadcast = LoraState.from_array_record(message.content[ARRAYS_KEY])
    broadcast.load_into(model)
    plan = TrainPlan(
        trains=str(config["train-factors"]),
        train_head=bool(config["train-head"]),
        local_steps=int(config["local-steps"]),
        lr=float(config["lr"]),
        batch_size=int(config["batch-size"]),
        seed=derive_seed(experiment.seed, client_id, server_round),
    )
    metrics: dict[str, float] = {"num-examples": len(examples)}
    info = ConfigRecord({"a-digest": broadcast.digest("A"), "client-id": client_id})
    settings = DPSettings.from_config(config)
    extra_records: dict[str, ConfigRecord] = {}
    with seeded(plan.seed):  # dropout and DP noise draw from the global generator
        if settings is None:
            result = train_local(model, examples, plan)
        else:
            ledger = restore_ledger(context, message, settings, len(examples), plan.batch_size)
            metrics.update(privacy_metrics(ledger, settings))
            if not ledger.can_afford(settings, plan.local_steps):
                return refusal(message, metrics, info, ledger, settings, plan.local_steps)
            result = train_local_private(model, examples, plan, settings, ledger)
            context.state[LEDGER_KEY] = extra_records[LEDGER_KEY] = ledger.to_record()
            metrics.update(privacy_metrics(ledger, settings))
    metrics.update({"train-loss": result.loss, "train-steps": result.steps, "train-seconds": result.seconds})
    arrays = result.state.select(plan.trains, plan.train_head).to_array_record()
    content = RecordDict({ARRAYS_KEY: arrays, METRICS_KEY: MetricRecord(metrics), INFO_KEY: info, **extra_records})
    return Message(content, reply_to=message)


def restore_ledger(context: Context, message: Message, settings: DPSettings, num_examples: int, batch_size: int) -> PrivacyLedger:
    """This client's ledger from earlier rounds (its own, else the server's copy), or a new one
    calibrated for the planned steps."""
    record = context.state.config_records.get(LEDGER_KEY) or message.content.config_records.get(LEDGER_KEY)
    ledger = PrivacyLedger.from_record(record) if record is not None else PrivacyLedger(accountant=settings.accountant)
    if not ledger.calibrated:
        ledger.calibrate(settings, poisson_sample_rate(num_examples, batch_size))
        context.state[LEDGER_KEY] = ledger.to_record()
    return ledger


def privacy_metrics(ledger: PrivacyLedger, settings: DPSettings) -> dict[str, float]:
    """The client's cumulative privacy figures, for the reply."""
    return {
        "epsilon": ledger.epsilon(settings.delta),
        "delta": settings.delta,
        "noise-multiplier": ledger.noise_multiplier,
        "sample-rate": ledger.sample_rate,
        "dp-steps": ledger.steps,
    }


def refusal(
    message: Message, metrics: dict[str, float], info: ConfigRecord, ledger: PrivacyLedger, settings: DPSettings, steps: int
) -> Message:
    """Reply that this client will not train: another round would exceed its budget."""
    after = ledger.epsilon(settings.delta, steps)
    info["refused-reason"] = f"privacy budget: epsilon would reach {after:.3f} > {settings.epsilon:g}"
    metrics["refused"] = 1.0
    content = RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: info, LEDGER_KEY: ledger.to_record()})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Evaluate the broadcast state on this client's own examples."""
    client_id = client_id_of(context)
    config = message.content[CONFIG_KEY]
    examples = workspace.client_examples(experiment, client_id)
    if config.get("poison-labels", False):  # a simulated malicious client (label flipping)
        examples = replace(examples, labels=flip_labels(examples.labels, int(config["num-labels"])))
    model = workspace.lora_model(experiment, int(config["num-labels"]))
    LoraState.from_array_record(message.content[ARRAYS_KEY]).load_into(model)
    accuracy, loss = evaluate(model, examples)
    metrics = MetricRecord({"num-examples": len(examples), "accuracy": accuracy, "loss": loss})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def build_client_app(experiment: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for an experiment; without one, each run's config says which experiment."""
    app = ClientApp()

    def resolve(context: Context) -> ExperimentConfig:
        shared = experiment or experiment_from_run_config(dict(context.run_config), APP_DIR)
        return node_experiment(shared, context.node_config)  # a deployed node's data-path, device

    @app.query()
    def query(message: Message, context: Context) -> Message:
        return handle_query(message, context, resolve(context))

    @app.train()
    def train(message: Message, context: Context) -> Message:
        return handle_train(message, context, resolve(context))

    @app.evaluate()
    def evaluate_(message: Message, context: Context) -> Message:
        return handle_evaluate(message, context, resolve(context))

    return app


app = build_client_app()
