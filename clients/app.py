"""The Flower ClientApp: one app for simulation and deployment.

Handlers:
- query: tells the server which client this node is (its partition) and how much data it holds;
- train: loads the broadcast LoraState, trains what the message's config names, replies with
  the trained factors only, plus metrics (num-examples, train-loss, seconds) and the digest of
  the A factors it trained with;
- evaluate: accuracy and loss of the broadcast state on the client's own examples.

In simulation the experiment config comes from `build_client_app(config)`; deployed with
`flwr run`, the module-level `app` reads it from the run config (see pyproject.toml).
"""

from __future__ import annotations

from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import TrainPlan, train_local
from fedlora import workspace
from fedlora.config import ExperimentConfig, derive_seed, experiment_from_run_config
from fedlora.lora import LoraState
from fedlora.model import evaluate, seeded

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, INFO_KEY = "arrays", "config", "metrics", "info"
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
    with seeded(plan.seed):  # dropout draws from the global generator
        result = train_local(model, examples, plan)
    trained = LoraState.from_model(model).select(plan.trains, plan.train_head)
    metrics = MetricRecord(
        {
            "num-examples": len(examples),
            "train-loss": result.loss,
            "train-steps": result.steps,
            "train-seconds": result.seconds,
        }
    )
    info = ConfigRecord({"a-digest": broadcast.digest("A"), "client-id": client_id})
    content = RecordDict({ARRAYS_KEY: trained.to_array_record(), METRICS_KEY: metrics, INFO_KEY: info})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Evaluate the broadcast state on this client's own examples."""
    client_id = client_id_of(context)
    config = message.content[CONFIG_KEY]
    examples = workspace.client_examples(experiment, client_id)
    model = workspace.lora_model(experiment, int(config["num-labels"]))
    LoraState.from_array_record(message.content[ARRAYS_KEY]).load_into(model)
    accuracy, loss = evaluate(model, examples)
    metrics = MetricRecord({"num-examples": len(examples), "accuracy": accuracy, "loss": loss})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=message)


def build_client_app(experiment: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for an experiment; without one, each run's config says which experiment."""
    app = ClientApp()

    def resolve(context: Context) -> ExperimentConfig:
        return experiment or experiment_from_run_config(dict(context.run_config), APP_DIR)

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
