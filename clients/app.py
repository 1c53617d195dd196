"""The Flower ClientApp: one app for simulation and deployment.

Handlers:
- query: tells the server which client this node is (its partition) and how much data it holds;
- train: loads the broadcast LoraState, trains what the message's config names (under DP-SGD
  at the noise multiplier and sample rate the server instructs when it carries dp-* settings),
  replies with the trained factors only, plus metrics (num-examples, train-loss, seconds,
  cumulative epsilon), its privacy ledger and the digest of the A it used; a client whose
  budget cannot afford the round, or whose data does not match the instructed sample rate,
  replies `refused` instead; under user-level DP with distributed noise (udp-* settings) it clips
  its update's change and adds its share of the noise before replying (fedlora/user_privacy.py).
  Factors the config's keep-factors names (FedSA-LoRA's B) stay in context.state instead of the
  reply, and replace the broadcast ones from the next round on;
- evaluate: accuracy and loss of the broadcast (global) state, with the factors the client
  keeps, on the client's held-out share of its examples (a causal LM's: exact match of greedy
  generations, token loss and perplexity; fedlora/task.py), which it never trains on; it exists
  only while `evaluation.clients` > 0 (fedlora/client_eval.py), else the client replies `refused`.

In simulation the experiment config comes from `build_client_app(config)`; deployed with
`flwr run`, the module-level `app` reads it from the run config (see pyproject.toml). A deployed
node's own data set and device come from its node config (data-path, device: fedlora/node.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clients.trainer import TrainPlan, train_local, train_local_private
from fedlora import workspace
from fedlora.attacks import flip_labels
from fedlora.client_eval import split_holdout
from fedlora.config import ExperimentConfig, experiment_from_run_config
from fedlora.lora import LoraState
from fedlora.model import seeded
from fedlora.node import node_experiment
from fedlora.privacy import DPInstruction, DPSettings, PrivacyLedger, sample_rate
from fedlora.rank_components import top_components
from fedlora.seeds import derive_seed
from fedlora.task import Encoded, evaluate
from fedlora.threads import client_cpus, use_threads
from fedlora.user_privacy import ShareInstruction

ARRAYS_KEY, CONFIG_KEY, METRICS_KEY, INFO_KEY = "arrays", "config", "metrics", "info"
# The client's DP accountant history: kept in context.state, reported in every reply; the
# server sends its own copy along, which wins when it holds more steps (a resumed run, a
# restarted node that lost its state).
LEDGER_KEY = "privacy-ledger"
# The factors a strategy has its clients keep between rounds and never send (FedSA-LoRA's B): in
# context.state only, so a client that has not trained yet (or lost its state) starts from the broadcast.
KEPT_KEY = "kept-factors"
APP_DIR = Path(__file__).resolve().parent.parent


def client_id_of(context: Context) -> int:
    """The client this node is: its simulation partition, or `client-id` in its node config."""
    for key in ("partition-id", "client-id"):
        if key in context.node_config:
            return int(context.node_config[key])
    raise ValueError("node config has neither partition-id nor client-id")


def own_examples(experiment: ExperimentConfig, client_id: int) -> tuple[Encoded, Encoded | None]:
    """What this client trains on (and declares), and its held-out share (None with evaluation off)."""
    return split_holdout(workspace.client_examples(experiment, client_id), experiment, client_id)


def handle_query(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Identify this client to the server."""
    client_id = client_id_of(context)
    examples, _ = own_examples(experiment, client_id)
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
    examples, _ = own_examples(experiment, client_id)
    if config.get("poison-labels", False):  # a simulated malicious client (label flipping)
        examples = replace(examples, labels=flip_labels(examples.labels, int(config["num-labels"])))
    # The adapter at this client's own rank (model.client_ranks); the server sends factors of that rank.
    model = workspace.lora_model(experiment, int(config["num-labels"]), experiment.model.rank_of(client_id))
    broadcast = LoraState.from_array_record(message.content[ARRAYS_KEY])
    plan = TrainPlan.from_config(config, seed=derive_seed(experiment.seed, client_id, server_round))
    with_kept_factors(broadcast, context).load_into(model)
    metrics: dict[str, float] = {"num-examples": len(examples)}
    info = ConfigRecord({"a-digest": broadcast.digest("A"), "client-id": client_id})
    settings = DPSettings.from_config(config)
    extra_records: dict[str, ConfigRecord] = {}
    with seeded(plan.seed):  # dropout and DP noise draw from the global generator
        if settings is None:
            result = train_local(model, examples, plan)
        else:
            instruction = DPInstruction.from_config(config)
            ledger = restore_ledger(context, message, settings, instruction)
            metrics.update(privacy_metrics(ledger, settings))
            problem = instruction_problem(instruction, settings, ledger, len(examples), plan)
            if problem:
                return refusal(message, metrics, info, ledger, problem)
            result = train_local_private(model, examples, plan, settings, ledger)
            context.state[LEDGER_KEY] = extra_records[LEDGER_KEY] = ledger.to_record()
            metrics.update(privacy_metrics(ledger, settings))
    metrics.update({"train-loss": result.loss, "train-steps": result.steps, "train-seconds": result.seconds})
    workspace.release_device_memory(model)
    if plan.keeps:
        context.state[KEPT_KEY] = result.state.select(plan.keeps, head=False).to_array_record()
    sent = result.state.select(plan.uploads, plan.train_head)
    share = ShareInstruction.from_config(config)
    if share is not None:  # distributed user-level noise: the server must see only a clipped, noised change
        sent = share.apply(sent, broadcast, derive_seed(experiment.seed, "user-dp-share", client_id, server_round))
    if "upload-rank" in config:  # LoRA-A2: only the most important rank components (fedlora/rank_components.py)
        sent = top_components(sent, broadcast, plan.uploads, int(config["upload-rank"]))
    content = RecordDict(
        {ARRAYS_KEY: sent.to_array_record(), METRICS_KEY: MetricRecord(metrics), INFO_KEY: info, **extra_records}
    )
    return Message(content, reply_to=message)


def with_kept_factors(broadcast: LoraState, context: Context) -> LoraState:
    """The broadcast state with the factors this client keeps (from its last round) in place of the broadcast ones."""
    record = context.state.array_records.get(KEPT_KEY)
    if record is None:
        return broadcast
    kept = LoraState.from_array_record(record)
    factors = {layer: {**parts, **kept.factors.get(layer, {})} for layer, parts in broadcast.factors.items()}
    return LoraState(factors=factors, head=broadcast.head)


def restore_ledger(context: Context, message: Message, settings: DPSettings, instruction: DPInstruction) -> PrivacyLedger:
    """This client's ledger from earlier rounds (its own, or the server's copy when that holds
    more steps), at the instructed noise and sample rate."""
    candidates = [PrivacyLedger(accountant=settings.accountant)]
    for record in (context.state.config_records.get(LEDGER_KEY), message.content.config_records.get(LEDGER_KEY)):
        if record is not None:
            candidates.append(PrivacyLedger.from_record(record))
    ledger = max(candidates, key=lambda candidate: candidate.steps)  # the first of equals: its own
    ledger.noise_multiplier, ledger.sample_rate = instruction.noise_multiplier, instruction.sample_rate
    return ledger


def instruction_problem(
    instruction: DPInstruction, settings: DPSettings, ledger: PrivacyLedger, num_examples: int, plan: TrainPlan
) -> str | None:
    """Why this client will not follow the server's DP instruction, or None."""
    own_rate = sample_rate(num_examples, plan.batch_size)
    if abs(instruction.sample_rate - own_rate) > 1e-12:
        return f"instructed sample rate {instruction.sample_rate:.6g}, but {num_examples} examples in batches of {plan.batch_size} give {own_rate:.6g}"
    if instruction.steps != plan.local_steps:
        return f"instructed {instruction.steps} DP steps but {plan.local_steps} local steps"
    if not ledger.can_afford(settings.epsilon, settings.delta, instruction.steps):
        after = ledger.epsilon(settings.delta, instruction.steps)
        return f"privacy budget: epsilon would reach {after:.3f} > {settings.epsilon:g}"
    return None


def privacy_metrics(ledger: PrivacyLedger, settings: DPSettings) -> dict[str, float]:
    """The client's cumulative privacy figures, for the reply."""
    return {
        "epsilon": ledger.epsilon(settings.delta),
        "delta": settings.delta,
        "noise-multiplier": ledger.noise_multiplier,
        "sample-rate": ledger.sample_rate,
        "dp-steps": ledger.steps,
    }


def refusal(message: Message, metrics: dict[str, float], info: ConfigRecord, ledger: PrivacyLedger, reason: str) -> Message:
    """Reply that this client will not train this round, and why."""
    info["refused-reason"] = reason
    metrics["refused"] = 1.0
    content = RecordDict({METRICS_KEY: MetricRecord(metrics), INFO_KEY: info, LEDGER_KEY: ledger.to_record()})
    return Message(content, reply_to=message)


def handle_evaluate(message: Message, context: Context, experiment: ExperimentConfig) -> Message:
    """Evaluate the broadcast state on this client's held-out share, or refuse where it holds none."""
    client_id = client_id_of(context)
    config = message.content[CONFIG_KEY]
    _, examples = own_examples(experiment, client_id)
    if examples is None:
        reason = "no held-out share: evaluation.clients is 0, or the client has a single example"
        content = RecordDict({METRICS_KEY: MetricRecord({"refused": 1.0}), INFO_KEY: ConfigRecord({"refused-reason": reason})})
        return Message(content, reply_to=message)
    model = workspace.lora_model(experiment, int(config["num-labels"]))
    # A client that keeps factors (FedSA-LoRA's B) evaluates its own model: its factors with the broadcast rest.
    with_kept_factors(LoraState.from_array_record(message.content[ARRAYS_KEY]), context).load_into(model)
    scores = evaluate(experiment, model, examples, workspace.tokenizer(experiment))
    workspace.release_device_memory(model)
    figures = {"num-examples": len(examples), "accuracy": scores.accuracy, "loss": scores.loss}
    if scores.perplexity is not None:
        figures["perplexity"] = scores.perplexity
    return Message(RecordDict({METRICS_KEY: MetricRecord(figures)}), reply_to=message)


def build_client_app(experiment: ExperimentConfig | None = None) -> ClientApp:
    """A ClientApp for an experiment; without one, each run's config says which experiment."""
    app = ClientApp()

    def resolve(context: Context) -> ExperimentConfig:
        shared = experiment or experiment_from_run_config(dict(context.run_config), APP_DIR)
        use_threads(client_cpus())  # an actor beside others: the cores Ray gave it, no more
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
