"""Client-side evaluation (`[evaluation]`): the held-out split, the server's checks of what clients
claim, the per-class figures of the server's held-out set, the records and the report."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from clients.app import handle_evaluate, handle_query, handle_train
from fedlora import workspace
from fedlora.client_eval import ClientEvaluation, claimed_figures, holdout_size, split_holdout
from fedlora.eval_figures import accuracy_spread, class_figures
from fedlora.model import classify, confusion_matrix, evaluate
from fedlora.report import ReportError, write_report
from fedlora.results import read_history, read_summary
from fedlora.server import run_federation
from tests.conftest import reply_from, tiny_config, without_timings

HANDLERS = {MessageType.QUERY: handle_query, MessageType.TRAIN: handle_train, MessageType.EVALUATE: handle_evaluate}


# --- the metrics ----------------------------------------------------------------------------


def fixed_predictions() -> tuple[torch.Tensor, torch.Tensor]:
    """60 labels of 5 classes and predictions: class 3 never occurs, class 4 is only predicted."""
    generator = torch.Generator().manual_seed(3)
    truths = torch.tensor([0, 1, 2] * 20)
    predictions = torch.where(torch.rand(60, generator=generator) < 0.6, truths, torch.randint(0, 5, (60,), generator=generator))
    predictions[predictions == 3] = 4
    return truths, predictions


def test_macro_f1_per_class_accuracy_and_confusion_matrix_equal_scikit_learns() -> None:
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import f1_score, recall_score

    truths, predictions = fixed_predictions()
    confusion = confusion_matrix(truths, predictions, 5).tolist()
    assert confusion == sk_confusion(truths, predictions, labels=range(5)).tolist()
    figures = class_figures(confusion, list("abcde"))
    assert figures["macro_f1"] == pytest.approx(f1_score(truths, predictions, average="macro"), abs=1e-12)
    recall = recall_score(truths, predictions, labels=[0, 1, 2], average=None)
    assert [figures["per_class_accuracy"][name] for name in "abc"] == pytest.approx(list(recall), abs=1e-12)
    assert figures["per_class_accuracy"]["d"] is None and figures["per_class_accuracy"]["e"] is None  # no examples
    assert figures["classes"] == list("abcde") and figures["class_examples"] == {"a": 20, "b": 20, "c": 20, "d": 0, "e": 0}


class TokenClassifier(torch.nn.Module):
    """Logits from each text's second token: predictions spread over the classes, unlike a random tiny BERT's."""

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        return SimpleNamespace(logits=self.table(input_ids[:, 1]))


def test_the_server_evaluation_counts_its_own_predictions_into_the_confusion_matrix(tiny) -> None:
    test = workspace.test_examples(tiny)
    torch.manual_seed(0)
    model = TokenClassifier(int(test.input_ids.max()) + 1, 8)
    scores = classify(model, test, batch_size=7)  # several batches
    batch = test.batch(torch.arange(len(test)))
    labels = batch.pop("labels").tolist()
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=-1).tolist()
    assert len(set(predicted)) > 3  # the matrix has something to get wrong
    brute = [[sum(1 for pair in zip(labels, predicted) if pair == (i, j)) for j in range(8)] for i in range(8)]
    assert scores.confusion == brute
    assert scores.accuracy == sum(t == p for t, p in zip(labels, predicted)) / len(test)
    assert (scores.accuracy, scores.loss) == evaluate(model, test, batch_size=7)


class MeanTokenClassifier(torch.nn.Module):
    """Logits from the mean of each text's own tokens (its mask): they depend on every token and
    on the text's length, and not at all on padding."""

    def __init__(self, vocab: int, classes: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, classes)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        mask = attention_mask[..., None].to(self.table.weight.dtype)
        return SimpleNamespace(logits=(self.table(input_ids) * mask).sum(dim=1) / mask.sum(dim=1))


def test_batches_of_similar_length_score_each_example_as_it_scores_alone(tiny) -> None:
    """classify batches the examples by length (less padding): each one's prediction and loss
    are still its own, as it gets them unpadded and alone."""
    test = workspace.test_examples(tiny)
    assert len(set(test.attention_mask.sum(dim=1).tolist())) > 3  # lengths that batching reorders
    torch.manual_seed(0)
    model = MeanTokenClassifier(int(test.input_ids.max()) + 1, 8)
    scores = classify(model, test, batch_size=7)
    truths, predicted, loss = [], [], 0.0
    with torch.no_grad():
        for i in range(len(test)):
            alone = test.batch(torch.tensor([i]))
            label = alone.pop("labels")
            logits = model(**alone).logits
            loss += float(torch.nn.functional.cross_entropy(logits, label, reduction="sum"))
            truths.append(int(label))
            predicted.append(int(logits.argmax()))
    assert len(set(predicted)) > 3
    brute = [[sum(1 for pair in zip(truths, predicted) if pair == (i, j)) for j in range(8)] for i in range(8)]
    assert scores.confusion == brute
    assert scores.loss == pytest.approx(loss / len(test), rel=1e-6)


def test_the_worst_decile_is_the_mean_of_the_worst_tenth_of_the_clients() -> None:
    accuracies = {str(c): 0.5 + c / 100 for c in range(20)}
    accuracies["7"] = 0.1
    spread = accuracy_spread(accuracies)
    assert spread["accuracy_worst_decile"] == pytest.approx((0.1 + 0.5) / 2)  # the worst 2 of 20
    assert spread["accuracy_min"] == 0.1 and spread["worst_client"] == "7" and spread["clients"] == 20
    assert spread["accuracy_mean"] == pytest.approx(sum(accuracies.values()) / 20)


# --- the split ------------------------------------------------------------------------------


def test_the_held_out_share_is_seeded_disjoint_and_only_taken_while_clients_evaluate(tiny) -> None:
    examples = workspace.client_examples(tiny, 1)
    assert split_holdout(examples, tiny, 1) == (examples, None)  # off: the very same examples
    on = tiny_config("evaluation.clients=1", "evaluation.holdout=0.25")
    train, held_out = split_holdout(examples, on, 1)
    assert len(held_out) == holdout_size(len(examples), 0.25) == len(examples) // 4 and len(train) + len(held_out) == len(
        examples
    )
    rows = {tuple(row) for row in examples.input_ids.tolist()}
    assert {tuple(r) for r in train.input_ids.tolist()} | {tuple(r) for r in held_out.input_ids.tolist()} == rows
    again, other_client = split_holdout(examples, on, 1)[1], split_holdout(examples, on, 2)[1]
    assert torch.equal(again.input_ids, held_out.input_ids) and not torch.equal(other_client.input_ids, held_out.input_ids)


@pytest.mark.parametrize("share", [0.05, 0.2, 0.5, 0.9])
def test_the_server_accepts_the_held_out_count_of_every_honest_client(share: float, flower_task) -> None:
    config = tiny_config("evaluation.clients=1", f"evaluation.holdout={share}")
    for total in range(2, 300):
        held = holdout_size(total, share)
        assert 1 <= held < total
        claim = claimed_figures(evaluation_reply(**{"num-examples": held, "accuracy": 0.0}), total - held, config)
        assert isinstance(claim, dict), (total, claim)
    assert holdout_size(1, share) == 0  # a client of one example trains on it and holds nothing out


# --- what the server trusts -----------------------------------------------------------------

EVAL_ON = tiny_config("evaluation.clients=1", "evaluation.holdout=0.2")  # a client training on 40 holds 10 out


def evaluation_reply(node: int = 10, **metrics: object) -> Message:
    figures = {"num-examples": 10, "accuracy": 0.7, "loss": 0.9} | metrics
    record = MetricRecord({k: v for k, v in figures.items() if v is not None})
    return reply_from(node, RecordDict({"metrics": record}), MessageType.EVALUATE)


HOSTILE = {
    "NaN accuracy": (dict(accuracy=math.nan), "accuracy is nan, not a finite number"),
    "accuracy above 1": (dict(accuracy=1.5), "accuracy 1.5 is not a whole number of correct answers"),
    "negative accuracy": (dict(accuracy=-0.1), "accuracy -0.1 is not"),
    "accuracy no count gives": (dict(accuracy=0.37), "accuracy 0.37 is not a whole number of correct answers out of the 10"),
    "infinite loss": (dict(loss=math.inf), "loss is inf, not a finite number"),
    "negative loss": (dict(loss=-1.0), "loss -1.0 is not a loss"),
    "loss beyond float32": (dict(loss=1e39), "loss is 1e+39, not a finite number within float32's range"),
    "a huge count": (dict(**{"num-examples": 10**400}), "num-examples is 1000000000"),
    "a fractional count": (dict(**{"num-examples": 2.5}), "num-examples 2.5 is not the held-out share"),
    "a count of all its data": (dict(**{"num-examples": 50}), "num-examples 50 is not the held-out share"),
    "no examples": (dict(**{"num-examples": 0}), "num-examples 0 is not the held-out share"),
    "a list": (dict(accuracy=[0.7, 0.9]), "accuracy is [0.7, 0.9], not a finite number"),
    "no loss": (dict(loss=None), "loss is None, not a finite number"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_client_figures_are_refused_with_their_reason(name: str, flower_task) -> None:
    metrics, reason = HOSTILE[name]
    claim = claimed_figures(evaluation_reply(**metrics), 40, EVAL_ON)
    assert isinstance(claim, str) and reason in claim, claim


def test_an_honest_claim_is_recorded_and_replies_that_are_no_figures_are_refused(flower_task) -> None:
    assert claimed_figures(evaluation_reply(), 40, EVAL_ON) == {"accuracy": 0.7, "loss": 0.9, "examples": 10}
    error = Message(metadata=evaluation_reply().metadata, error=Error(code=0, reason="client app crashed"))
    assert claimed_figures(error, 40, EVAL_ON) == "client error: client app crashed"
    no_metrics = reply_from(10, RecordDict({"metrics": ConfigRecord({"accuracy": "high"})}), MessageType.EVALUATE)
    assert claimed_figures(no_metrics, 40, EVAL_ON) == "reply has no metrics"
    refusal = RecordDict({"metrics": MetricRecord({"refused": 1.0}), "info": ConfigRecord({"refused-reason": "no data"})})
    assert claimed_figures(reply_from(10, refusal, MessageType.EVALUATE), 40, EVAL_ON) == "refused: no data"


def test_replies_from_nodes_not_asked_and_second_replies_are_refused_and_silent_clients_listed(flower_task) -> None:
    config = tiny_config("evaluation.clients=1", "evaluation.participants='sampled'")
    evaluation = ClientEvaluation(config, {10: 0, 11: 1, 12: 2}, {0: 40, 1: 40, 2: 40})
    replies = [evaluation_reply(10), evaluation_reply(10, accuracy=0.1), evaluation_reply(12), evaluation_reply(99)]
    figures, refused = evaluation._read(replies, asked={0, 1})
    assert figures == {"0": {"accuracy": 0.7, "loss": 0.9, "examples": 10}}
    reasons = {(r.get("client"), r.get("node")): r["reason"] for r in refused}
    assert "second evaluation reply from client 0" in reasons[(0, None)]
    assert "node 12, which was not asked" in reasons[(None, 12)] and "node 99, which was not asked" in reasons[(None, 99)]
    assert reasons[(1, None)] == "no evaluation reply before the round timeout"


# --- a federation in this process -----------------------------------------------------------


class InProcessGrid(InMemoryGrid):
    """The simulation's grid without an engine: each node's ClientApp handler runs here, in turn.

    `rewrite` may replace a node's reply (a hostile client)."""

    def __init__(self, config, rewrite: Callable[[Message], Message] | None = None) -> None:  # no Flower state behind it
        self.config, self.rewrite = config, rewrite
        self.contexts = {
            100 + c: Context(
                100 + c, 100 + c, {"partition-id": c, "num-partitions": config.federation.num_clients}, RecordDict(), {}
            )
            for c in range(config.federation.num_clients)
        }
        self.sent: list[str] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            kind = message.metadata.message_type
            self.sent.append(kind)
            reply = HANDLERS[kind](message, self.contexts[message.metadata.dst_node_id], self.config)
            replies.append(self.rewrite(reply) if self.rewrite else reply)
        return replies


def run_here(config, run_dir: Path, rewrite=None) -> InProcessGrid:
    grid = InProcessGrid(config, rewrite)
    run_federation(grid, config, run_dir)
    return grid


def test_with_evaluation_off_the_history_is_that_of_a_run_without_the_section(tmp_path: Path, flower_task) -> None:
    plain = run_here(tiny_config(), tmp_path / "plain")
    # A held-out share set but evaluation off: nothing is held out, nobody is asked to evaluate.
    off = run_here(tiny_config("evaluation.clients=0", "evaluation.holdout=0.5"), tmp_path / "off")
    history = read_history(tmp_path / "off")
    assert without_timings(history) == without_timings(read_history(tmp_path / "plain"))
    assert MessageType.EVALUATE not in off.sent + plain.sent
    assert all("client_eval" not in line["extra"] for line in history)
    summary = read_summary(tmp_path / "off")
    partitions = workspace.federated_task(tiny_config()).partitions
    assert summary["client_eval"] is None and summary["weights"] == read_summary(tmp_path / "plain")["weights"]
    assert [sum(counts) for counts in summary["label_mix"]["clients"].values()] == [len(p.labels) for p in partitions]


def lying_client(reply: Message) -> Message:
    """Node 101 (client 1) claims a perfect score on more examples than it holds."""
    if reply.metadata.message_type == MessageType.EVALUATE and reply.metadata.src_node_id == 101:
        reply.content["metrics"] = MetricRecord({"num-examples": 1000, "accuracy": 1.0, "loss": 0.0})
    return reply


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.conftest import task_identity

    run_dir = tmp_path_factory.mktemp("client-eval") / "run"
    with task_identity():
        run_here(tiny_config("evaluation.clients=2", "federation.rounds=3", "data.partition='dirichlet'"), run_dir, lying_client)
    return run_dir


def test_clients_evaluate_every_n_rounds_and_the_last_and_a_lying_client_is_refused(evaluated_run: Path) -> None:
    history = read_history(evaluated_run)
    assert [bool(line["extra"].get("client_eval")) for line in history] == [False, False, True, True]
    for line in history[2:]:
        assert set(line["extra"]["client_eval"]) == {"0", "2"}
        (refusal,) = line["extra"]["client_eval_refused"]
        assert refusal["client"] == 1 and "num-examples 1000 is not the held-out share" in refusal["reason"]
        assert line["extra"]["client_eval_bytes_down"] > 0
    summary = read_summary(evaluated_run)
    last = summary["client_eval"]
    assert last["round"] == 3 and last["clients"] == history[3]["extra"]["client_eval"]
    assert last["accuracy_min"] == min(f["accuracy"] for f in last["clients"].values())
    config = tiny_config("evaluation.clients=2", "federation.rounds=3", "data.partition='dirichlet'")
    partitions = workspace.federated_task(config).partitions
    for client, figures in last["clients"].items():
        whole = len(partitions[int(client)].labels)
        assert figures["examples"] == holdout_size(whole, 0.2)  # trained on the rest
        assert summary["label_mix"]["clients"][client] == [list(partitions[int(client)].labels).count(k) for k in range(8)]
    held_out = summary["held_out"]
    assert sum(map(sum, held_out["confusion_matrix"])) == 60
    assert held_out["macro_f1"] == class_figures(held_out["confusion_matrix"], held_out["classes"])["macro_f1"]


def test_the_report_shows_the_clients_spread_macro_f1_the_confusion_matrix_and_the_label_mix(evaluated_run: Path) -> None:
    files = write_report([evaluated_run], evaluated_run / "report")
    page = files.markdown.read_text()
    summary = read_summary(evaluated_run)
    assert "## Per-client and per-class evaluation" in page
    assert f"{summary['client_eval']['accuracy_worst_decile']:.4f}" in page and f"{summary['held_out']['macro_f1']:.4f}" in page
    assert "| true \\ predicted | sports | politics |" in page and "| sports (true) |" in page
    assert "refused: num-examples 1000" in page
    html = files.html.read_text()
    assert "Confusion matrix" in html and "worst decile" in html
    csv = files.csv.read_text()
    assert "macro_f1" in csv and "client_accuracy_worst_decile" in csv


# --- through the Ray simulation engine -----------------------------------------------------


@pytest.mark.e2e
@pytest.mark.usefixtures("one_ray")
def test_a_ray_simulation_records_each_clients_evaluation_and_reports_it(tmp_path: Path) -> None:
    from fedlora.simulation import simulate

    config = tiny_config("evaluation.clients=1", "data.partition='dirichlet'")
    summary = simulate(config, tmp_path / "run")
    history = read_history(tmp_path / "run")
    for line in history[1:]:
        figures = line["extra"]["client_eval"]
        assert set(figures) == {"0", "1", "2"} and "client_eval_refused" not in line["extra"]
        assert all(0 <= f["accuracy"] <= 1 and f["examples"] >= 1 for f in figures.values())
    assert summary["client_eval"]["clients"] == history[-1]["extra"]["client_eval"]
    assert summary["label_mix"]["classes"] == summary["held_out"]["classes"]
    page = write_report([tmp_path / "run"], tmp_path / "report").markdown.read_text()
    spread = summary["client_eval"]
    assert "## Per-client and per-class evaluation" in page and "| true \\ predicted |" in page
    for figure in (spread["accuracy_mean"], spread["accuracy_worst_decile"], summary["held_out"]["macro_f1"]):
        assert f"{figure:.4f}" in page


@pytest.mark.parametrize(
    ("file", "damage", "said"),
    [
        ("summary.json", lambda s: s["held_out"]["confusion_matrix"].pop(), "'held_out.confusion_matrix' is not a 8 x 8 table"),
        ("summary.json", lambda s: s["label_mix"]["clients"].update({"x": [1]}), "'label_mix.clients' is not 8 counts"),
        ("history.jsonl", lambda h: h["extra"]["client_eval"]["0"].update(accuracy=1.5), "'extra.client_eval.0' is"),
    ],
)
def test_a_damaged_evaluation_record_stops_the_report_in_one_line(
    evaluated_run: Path, tmp_path: Path, file, damage, said
) -> None:
    run = tmp_path / "run"
    shutil.copytree(evaluated_run, run)
    if file == "summary.json":
        summary = json.loads((run / file).read_text())
        damage(summary)
        (run / file).write_text(json.dumps(summary))
    else:
        lines = [json.loads(line) for line in (run / file).read_text().splitlines()]
        damage(lines[-1])
        (run / file).write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(ReportError) as raised:
        write_report([run], tmp_path / "report")
    assert said in str(raised.value) and "\n" not in str(raised.value) and str(run / file) in str(raised.value)
