"""Fuzz: hostile replies against every strategy and defence.

Each example builds one registered strategy behind no defence, a registered defence or bucketing
in front of one, runs a round in which honest clients reply beside one to three hostile senders,
and checks what issue 24 asks of every round: `aggregate_train` never raises; every reply ends in
exactly one place (aggregated or dropped by the defence, refused with its reason, or refused by
the client itself); a reply that breaks a rule (a value NaN, Inf or beyond MAX_VALUE, a wrong
key, shape, dtype or payload, a metric that is no finite float32 number, a count other than the
declared one, a sender that was not asked, a second reply) is refused and a harmless one is not;
the state installed is finite and within MAX_VALUE, or the round is recorded as skipped; and
every number bound for the history is finite. tests/test_fuzz_handshakes.py fuzzes the handshake.

100 examples a test in `make test` (FEDLORA_FUZZ_EXAMPLES, as tests/test_fuzz_inputs.py); the longer run:
FEDLORA_FUZZ_EXAMPLES=10000 .venv/bin/python -m pytest -q tests/test_fuzz_replies.py tests/test_fuzz_handshakes.py
"""

from __future__ import annotations

import io
import math
from collections import Counter
from collections.abc import Callable
from enum import Enum

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from hypothesis import given
from hypothesis import strategies as st

from fedlora.lora import COMPONENT_INDEX, LoraState
from fedlora.roster import Roster
from strategies import DEFENCES, NO_DEFENCE, STRATEGIES
from strategies.base import ARRAYS_KEY, INFO_KEY, METRICS_KEY, LoraStrategy
from strategies.bucketing import BucketingDefence, bucket_phi
from strategies.ffa_lora import FFALoRA
from strategies.reply_values import MAX_METRIC, MAX_VALUE
from strategies.robust import Defence
from strategies.zprobe import ZProbeDefence
from tests.conftest import reply_from
from tests.test_fuzz_inputs import FUZZ
from tests.test_hostile_values import EXAMPLES, FLOAT32_MAX, assert_installable, honest_state, refusal_of
from tests.test_strategy_base import global_state

pytestmark = pytest.mark.usefixtures("flower_task")  # hand-made messages need a run id

# --- replies -----------------------------------------------------------------------------------

PHI_MAX = 0.25
# zPROBE screens 2 c replies at least: c = 3 clusters (its smallest) runs the same code as the
# paper's 7 on 6 honest clients instead of 14, which keeps an example cheap.
ZPROBE_CLUSTERS = 3
BUCKET_SIZE = 2
MOST_HONEST = 11  # bucketing is fuzzed in front of the rules that need no more honest replies than this
FIRST_NODE = 100  # node id of client 0 (as tests/test_hostile_values.py numbers them)
UNKNOWN_NODE = 99  # a node outside the federation


def make_defence(name: str, bucket_size: int) -> Defence | None:
    """The registered defence `name` (None for "none"), behind bucketing when bucket_size > 1."""
    if name == NO_DEFENCE:
        return None
    phi = bucket_phi(PHI_MAX, bucket_size) if bucket_size > 1 else PHI_MAX
    inner = ZProbeDefence(phi, clusters=ZPROBE_CLUSTERS) if name == ZProbeDefence.name else DEFENCES[name](phi)
    return BucketingDefence(inner, bucket_size, PHI_MAX) if bucket_size > 1 else inner


DEFENCE_SETUPS = [
    (NO_DEFENCE, 1),
    *((name, 1) for name in DEFENCES),
    *((name, BUCKET_SIZE) for name in DEFENCES if make_defence(name, BUCKET_SIZE).min_clients <= MOST_HONEST),
]


class Verdict(Enum):
    """What must become of one reply."""

    AGGREGATED = "aggregated or dropped by the defence"
    REJECTED = "refused by the server, with its reason"
    SELF_REFUSED = "refused by the client itself (its `refused` metric), recorded"
    SILENT = "no reply: recorded as none before the timeout"


Sender = tuple[str, int]  # ("client", client id) or ("node", node id): how the round log names a sender
Sent = tuple[Sender, Message | None, Verdict]  # None: the sender stays silent


# LoRA-A2 at a budget of 1 component a layer of the state's 2: a layer of a reply may hold 0, 1 or 2.
OPTIONS: dict[str, dict[str, object]] = {"lora_a2": {"upload_rank": 1}}


class Round:
    """A strategy's round (1 or 2: RoLoRA and LoRA-A2 train B, then A) over honest clients and hostile ones,
    one client never sampled; replies in the strategy's own form (`pack_reply`: LoRA-A2's selected components)."""

    def __init__(self, name: str, defence: tuple[str, int], hostile: int, server_round: int) -> None:
        screen = make_defence(*defence)
        self.honest_count = max(4, screen.min_clients if screen else 1)
        clients = self.honest_count + hostile + 1  # + 1 never sampled
        roster = Roster({FIRST_NODE + k: k for k in range(clients)}, dict.fromkeys(range(clients), EXAMPLES))
        options = OPTIONS.get(name, {})
        self.strategy: LoraStrategy = STRATEGIES[name](roster, clients_per_round=clients - 1, defence=screen, **options)
        self.start = self.strategy.initial_state(global_state())  # as the server starts: Fed-SB's and RAVAN's cores in it
        list(self.strategy.configure_train(server_round, self.start.to_array_record(), ConfigRecord(), grid=None))
        sampled = self.strategy.last_round.sampled
        self.honest, self.hostile = sampled[: self.honest_count], sampled[self.honest_count :]
        (self.idle,) = set(range(clients)) - set(sampled)

    def content(self, client: int) -> dict[str, object]:
        """An honest client's reply, record by record (what the hostile senders start from)."""
        return {
            ARRAYS_KEY: self.strategy.pack_reply(honest_state(self.strategy, client)).to_array_record(),
            METRICS_KEY: MetricRecord({"num-examples": EXAMPLES, "train-loss": 1.0}),
            INFO_KEY: ConfigRecord({"a-digest": self.strategy.global_state.digest("A")}),
        }

    def honest_replies(self) -> list[Sent]:
        return [(("client", c), message(FIRST_NODE + c, self.content(c)), Verdict.AGGREGATED) for c in self.honest]


def message(node: int, content: dict[str, object]) -> Message:
    """A train reply from `node` holding the records of `content` that are not None."""
    return reply_from(node, RecordDict({key: record for key, record in content.items() if record is not None}))


def record_of(arrays: dict[str, Array]) -> ArrayRecord:
    record = ArrayRecord()
    for key, array in arrays.items():
        record[key] = array
    return record


def array(tensor: torch.Tensor) -> Array:
    return Array(tensor.detach().contiguous().numpy())


def tensors_of(content: dict[str, object]) -> dict[str, torch.Tensor]:
    """The honest reply's tensors by record key, writable copies."""
    return LoraState.from_array_record(content[ARRAYS_KEY]).tensors()


def is_index(key: str) -> bool:
    """Whether a record key holds LoRA-A2's component indices (not values)."""
    return key.endswith("." + COMPONENT_INDEX)


# Values across float32's range: every float32 (subnormals, +-max, NaN, Inf) and the edges of the bound.
EDGES = [0.0, -0.0, 1e-45, 1.1754944e-38, 1.0, MAX_VALUE, -MAX_VALUE, 65536.0078125, 1e12, FLOAT32_MAX, -FLOAT32_MAX]
BELOW_THE_BOUND = st.floats(MAX_VALUE / 2, MAX_VALUE, width=32)
JUST_PAST_THE_BOUND = st.floats(MAX_VALUE, 2 * MAX_VALUE, exclude_min=True, width=32)
NEAR_THE_BOUND = (BELOW_THE_BOUND | JUST_PAST_THE_BOUND).flatmap(lambda v: st.sampled_from([v, -v]))
FLOAT32 = st.floats(width=32) | st.sampled_from([*EDGES, math.inf, -math.inf, math.nan]) | NEAR_THE_BOUND


def out_of_bounds(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The keys holding a value the aggregation cannot take (NaN, Inf or beyond MAX_VALUE)."""
    return [key for key, t in tensors.items() if t.numel() and (not torch.isfinite(t).all() or float(t.abs().max()) > MAX_VALUE)]


def hostile_values(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """The honest state with values across float32 changed: some coordinates, a whole tensor, or every step scaled;
    then sent in the strategy's form (LoRA-A2: the components its selection keeps, the others never seen)."""
    content = run.content(client)
    tensors = honest_state(run.strategy, client).tensors()
    keys = list(tensors)
    how = data.draw(st.sampled_from(["coordinates", "tensor", "scaled"]), label="how")
    if how == "coordinates":
        for key, index, value in data.draw(
            st.lists(st.tuples(st.sampled_from(keys), st.integers(0, 10**6), FLOAT32), min_size=1, max_size=6), label="edits"
        ):
            tensors[key].view(-1)[index % tensors[key].numel()] = value
    elif how == "tensor":
        tensors[data.draw(st.sampled_from(keys), label="key")].fill_(data.draw(FLOAT32, label="value"))
    else:  # what the scaling attack sends
        factor = data.draw(FLOAT32, label="factor")
        reference = run.strategy.global_state.select(run.strategy.uploads, head=True).tensors()
        tensors = {key: reference[key] + factor * (t - reference[key]) for key, t in tensors.items()}
    tensors = run.strategy.pack_reply(LoraState.from_tensors(tensors)).tensors()
    content[ARRAYS_KEY] = record_of({key: array(t) for key, t in tensors.items()})
    bad = out_of_bounds({key: t for key, t in tensors.items() if not is_index(key)})
    sent = message(FIRST_NODE + client, content)
    return [(("client", client), sent, Verdict.REJECTED if bad else Verdict.AGGREGATED)]


def reshaped(data: st.DataObject, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor in another shape: transposed, flattened, a dimension more, a row more or less, empty, a scalar."""
    changes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "extra dimension": lambda t: t.unsqueeze(0),
        "row more": lambda t: torch.cat([t, t[:1]]),
        "row less": lambda t: t[1:],
        "empty": lambda t: t.reshape(-1)[:0],
        "scalar": lambda t: t.reshape(-1)[0],
    }
    if tensor.ndim == 2:  # no tensor of the global state is square: transposing changes the shape
        changes |= {"transposed": lambda t: t.T, "flattened": lambda t: t.reshape(-1)}
    return changes[data.draw(st.sampled_from(sorted(changes)), label="reshape")](tensor)


WRONG_DTYPES = [torch.float16, torch.float64, torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool, torch.complex64]
KEY_TEXT = st.text(alphabet="ABhead.layer0129_x", max_size=14)


def hostile_arrays(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """The honest state with a tensor reshaped or of another dtype, keys missing, extra or garbled, or no arrays
    (LoRA-A2's indices among them; an empty tensor, a layer it sent nothing of, has no shape or dtype to break)."""
    content = run.content(client)
    tensors = tensors_of(content)
    keys = [key for key, t in tensors.items() if t.numel()]
    how = data.draw(st.sampled_from(["shape", "dtype", "missing", "extra", "no record"]), label="how")
    arrays = {key: array(t) for key, t in tensors.items()}
    key = data.draw(st.sampled_from(keys), label="key")
    if how == "shape":
        arrays[key] = array(reshaped(data, tensors[key]))
    elif how == "dtype":
        wrong = [dtype for dtype in WRONG_DTYPES if dtype != tensors[key].dtype]  # an index's own is int64
        arrays[key] = array(tensors[key].to(data.draw(st.sampled_from(wrong), label="dtype")))
    elif how == "missing":
        for gone in data.draw(st.lists(st.sampled_from(list(tensors)), min_size=1, unique=True), label="missing"):
            del arrays[gone]
    elif how == "extra":
        extra = data.draw((KEY_TEXT | st.sampled_from(EXTRA_KEYS)).filter(lambda k: k not in arrays), label="extra key")
        arrays[extra] = arrays[key]
    content[ARRAYS_KEY] = None if how == "no record" else record_of(arrays)
    return [(("client", client), message(FIRST_NODE + client, content), Verdict.REJECTED)]


# Keys a client was not asked for: a factor it does not train, a layer or head entry the model lacks.
EXTRA_KEYS = ["layer0.A", "layer0.B", "layer9.A", "head.extra", "layer0.C", "A", ".A", "head."]


def npy(tensor: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, tensor)
    return buffer.getvalue()


def npy_header(descr: str, shape: tuple[int, ...], fortran_order: bool) -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": fortran_order, "shape": shape})
    return buffer.getvalue()


def hostile_payload(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """One array's bytes replaced: random bytes, cut short, another header (dtype, shape), or Fortran order."""
    content = run.content(client)
    tensors = tensors_of(content)
    key = data.draw(st.sampled_from(list(tensors)), label="key")
    values = tensors[key].numpy()
    good = npy(values)
    how = data.draw(st.sampled_from(["random", "cut", "header", "fortran"]), label="how")
    verdict = Verdict.REJECTED
    if how == "random":
        payload = data.draw(st.binary(max_size=80) | st.binary(max_size=16).map(lambda b: b"\x93NUMPY" + b), label="bytes")
    elif how == "cut":
        payload = good[: data.draw(st.integers(0, len(good) - 1), label="length")]
    elif how == "header":
        descr = data.draw(st.sampled_from(["<f4", "<f2", "<f8", ">f4", "<i4", "|b1", "<c8", "<U2", "|O", "|V4"]), label="descr")
        shape = tuple(data.draw(st.lists(st.integers(0, 2**40), max_size=3), label="shape"))
        payload = npy_header(descr, shape, data.draw(st.booleans(), label="fortran")) + values.tobytes()
        # Harmless only as np.save writes it, or in Fortran order (the same honest values, read transposed).
        verdict = Verdict.AGGREGATED if (descr, shape) == (values.dtype.str, values.shape) else Verdict.REJECTED
    else:  # the same values written column-major: decoded as they are, harmless
        payload, verdict = npy(np.asfortranarray(values)), Verdict.AGGREGATED
    arrays = {k: array(t) for k, t in tensors.items()}
    arrays[key] = Array(dtype="float32", shape=values.shape, stype="numpy.ndarray", data=payload)
    content[ARRAYS_KEY] = record_of(arrays)
    return [(("client", client), message(FIRST_NODE + client, content), verdict)]


METRIC_NUMBERS = (
    st.integers(-(2**70), 2**70)
    | st.floats()
    | st.sampled_from([EXAMPLES, float(EXAMPLES), 0, -EXAMPLES, math.nan, math.inf, 1e308, FLOAT32_MAX, 3.5e38])
)
METRIC_VALUES = METRIC_NUMBERS | st.lists(st.integers(-5, 5), max_size=2) | st.lists(st.floats(), max_size=2)
METRIC_KEYS = st.sampled_from(["num-examples", "train-loss", "refused", "accuracy"]) | st.text(max_size=8)


def metric_is_usable(value: object) -> bool:
    """A finite number within float32's range (a list is no metric)."""
    return isinstance(value, (int, float)) and math.isfinite(value) and abs(value) <= MAX_METRIC


def hostile_metrics(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """The honest reply with its metrics changed, removed, added or in a record of the wrong kind."""
    content = run.content(client)
    metrics = dict(content[METRICS_KEY])
    for key in data.draw(st.lists(st.sampled_from(list(metrics)), unique=True), label="removed"):
        del metrics[key]
    metrics |= data.draw(st.dictionaries(METRIC_KEYS, METRIC_VALUES, max_size=3), label="set")
    kind = data.draw(st.sampled_from(["metrics", "config", "none"]), label="record")
    content[METRICS_KEY] = {"metrics": MetricRecord, "config": ConfigRecord, "none": lambda _: None}[kind](metrics)
    if kind != "metrics" or not all(metric_is_usable(v) for v in metrics.values()):
        verdict = Verdict.REJECTED
    elif metrics.get("refused", 0) != 0:
        verdict = Verdict.SELF_REFUSED
    else:
        verdict = Verdict.AGGREGATED if metrics.get("num-examples") == EXAMPLES else Verdict.REJECTED
    return [(("client", client), message(FIRST_NODE + client, content), verdict)]


CONFIG_VALUES = st.text(max_size=8) | st.binary(max_size=8) | st.booleans() | st.integers() | st.floats()


def hostile_info(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """The honest reply with its info record changed: the A digest wrong or missing, entries added, no record."""
    content = run.content(client)
    info = dict(content[INFO_KEY])
    if data.draw(st.booleans(), label="change the digest"):
        info["a-digest"] = data.draw(st.none() | CONFIG_VALUES, label="digest")
    info |= data.draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "a-digest"), CONFIG_VALUES, max_size=3))
    info = {k: v for k, v in info.items() if v is not None}
    content[INFO_KEY] = ConfigRecord(info) if data.draw(st.booleans(), label="keep the record") else None
    # Only FFA-LoRA reads the info: it refuses a reply trained against another A.
    digest = (content[INFO_KEY] or {}).get("a-digest")
    wrong_a = isinstance(run.strategy, FFALoRA) and digest != run.strategy.global_state.digest("A")
    return [(("client", client), message(FIRST_NODE + client, content), Verdict.REJECTED if wrong_a else Verdict.AGGREGATED)]


def hostile_sender(data: st.DataObject, run: Round, client: int) -> list[Sent]:
    """A reply from the wrong sender, a second reply, an error reply, or silence (the sampled client then says nothing)."""
    how = data.draw(st.sampled_from(["unknown node", "not sampled", "twice", "error", "silent"]), label="how")
    me: Sender = ("client", client)
    honest = message(FIRST_NODE + client, run.content(client))
    if how == "unknown node":
        return [
            (me, None, Verdict.SILENT),
            (("node", UNKNOWN_NODE), message(UNKNOWN_NODE, run.content(client)), Verdict.REJECTED),
        ]
    if how == "not sampled":
        idle = message(FIRST_NODE + run.idle, run.content(run.idle))
        return [(me, None, Verdict.SILENT), (("client", run.idle), idle, Verdict.REJECTED)]
    if how == "twice":  # the second is refused whatever it holds, even when the first was
        again = data.draw(st.sampled_from([None, *HOSTILE[:-1]]), label="second")  # None: the same reply again
        second = honest if again is None else again(data, run, client)[-1][1]
        return [(me, honest, Verdict.AGGREGATED), (me, second, Verdict.REJECTED)]
    if how == "error":
        return [(me, Message(metadata=honest.metadata, error=Error(code=0, reason="boom")), Verdict.REJECTED)]
    return [(me, None, Verdict.SILENT)]


HOSTILE = [hostile_values, hostile_arrays, hostile_payload, hostile_metrics, hostile_info, hostile_sender]


def interleaved(replies: list[tuple[Sender, Message]], order: list[int]) -> list[Message]:
    """The replies in `order`, except that each sender's keep the order it sent them in (a second stays second)."""
    queues: dict[Sender, list[Message]] = {}
    for sender, reply in replies:
        queues.setdefault(sender, []).append(reply)
    return [queues[replies[i][0]].pop(0) for i in order]


def assert_each_reply_accounted(run: Round, sent: list[Sent]) -> None:
    """Every reply ended where its verdict says, and the round log names every refusal with a reason."""
    log = run.strategy.last_round
    updates = [*log.accepted, *log.dropped]
    assert len(updates) == len(set(updates)), updates  # one update a client at most
    aggregated = {("client", c) for c in updates}
    rejected = Counter(("client", r["client"]) if "client" in r else ("node", r["node"]) for r in log.rejected)
    self_refused = Counter(("client", r["client"]) for r in log.refused)
    verdicts: dict[Sender, list[Verdict]] = {}
    for sender, _, verdict in sent:
        verdicts.setdefault(sender, []).append(verdict)
    for sender, theirs in verdicts.items():
        assert (sender in aggregated) == (Verdict.AGGREGATED in theirs), (sender, theirs)
        assert rejected[sender] == theirs.count(Verdict.REJECTED) + theirs.count(Verdict.SILENT), (sender, theirs)
        assert self_refused[sender] == theirs.count(Verdict.SELF_REFUSED), (sender, theirs)
    assert aggregated <= set(verdicts) and set(rejected) <= set(verdicts) and set(self_refused) <= set(verdicts)
    for entry in log.rejected:
        assert isinstance(entry["reason"], str) and entry["reason"].strip(), entry


def numbers_in(value: object) -> list[float]:
    """Every int and float in a nested structure of dicts, lists and tuples."""
    if isinstance(value, dict):
        return [n for item in value.values() for n in numbers_in(item)]
    if isinstance(value, (list, tuple)):
        return [n for item in value for n in numbers_in(item)]
    return [value] if isinstance(value, (int, float)) else []


def assert_installed_or_skipped(run: Round, arrays: ArrayRecord | None, metrics: MetricRecord | None) -> None:
    """A finite state within MAX_VALUE installed, or the round recorded as skipped; history numbers finite."""
    log = run.strategy.last_round
    if arrays is None:
        assert metrics is None and log.skipped
        assert torch.equal(run.strategy.global_state.flatten(), run.start.flatten())  # the previous state stays
    else:
        assert not log.skipped and log.accepted
        assert_installable(arrays)
        assert torch.equal(LoraState.from_array_record(arrays).flatten(), run.strategy.global_state.flatten())
        assert metrics["num-replies"] == len(log.accepted)
        assert all(math.isfinite(v) and abs(v) <= MAX_METRIC for v in numbers_in(dict(metrics)))
    recorded = numbers_in([log.client_metrics, log.extra, log.bytes_up, log.aggregate_seconds])
    assert all(math.isfinite(n) for n in recorded), (log.client_metrics, log.extra)
    assert all(abs(v) <= MAX_METRIC for v in numbers_in(log.client_metrics))


@FUZZ
@given(
    name=st.sampled_from(list(STRATEGIES)),
    defence=st.sampled_from(DEFENCE_SETUPS),
    server_round=st.integers(1, 2),
    data=st.data(),
)
def test_hostile_replies_are_refused_with_a_reason_and_the_round_installs_a_bounded_state(
    name: str, defence: tuple[str, int], server_round: int, data: st.DataObject
) -> None:
    kinds = data.draw(st.lists(st.sampled_from(HOSTILE), min_size=1, max_size=3), label="hostile senders")
    run = Round(name, defence, len(kinds), server_round)
    sent = run.honest_replies()
    for kind, client in zip(kinds, run.hostile):
        sent += kind(data, run, client)
    replies = [(sender, reply) for sender, reply, _ in sent if reply is not None]
    order = data.draw(st.permutations(range(len(replies))), label="order")
    arrays, metrics = run.strategy.aggregate_train(server_round, interleaved(replies, order))
    assert_each_reply_accounted(run, sent)
    assert_installed_or_skipped(run, arrays, metrics)


def test_an_array_header_too_large_for_memory_is_refused_not_raised() -> None:
    """Found by this fuzzer: a .npy header of shape (345026, 345100, 77462756) raised OverflowError
    out of aggregate_train (its size does not fit a C ssize_t); now the reply is refused."""
    run = Round("fedit", (NO_DEFENCE, 1), hostile=1, server_round=1)
    (client,) = run.hostile
    content = run.content(client)
    arrays = dict(content[ARRAYS_KEY])
    header = npy_header("<f4", (345026, 345100, 77462756), fortran_order=False)
    arrays["layer0.A"] = Array(dtype="float32", shape=(2, 5), stype="numpy.ndarray", data=header + bytes(40))
    content[ARRAYS_KEY] = record_of(arrays)
    replies = [reply for _, reply, _ in run.honest_replies()] + [message(FIRST_NODE + client, content)]
    new_state, _ = run.strategy.aggregate_train(1, replies)
    assert new_state is not None and "cannot be decoded" in str(refusal_of(run.strategy, client))
