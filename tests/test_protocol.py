from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.generation import protocol
from bot.core.config import ModelSettings, WorkerSettings
from bot.core.errors import GenerationError
from bot.generation.client import GenerationResult, ModelInfo
from bot.core.types import ChatMessage, GenerationSettings

EXAMPLES = [
    protocol.Configure(
        ModelSettings(model="/models/x", gguf_file="x.gguf", quantization="8bit", device="cpu", context_window=512),
        WorkerSettings(max_batch=3, ready_timeout=12.5, threads=2),
    ),
    protocol.Submit(
        7,
        (ChatMessage("system", "be brief"), ChatMessage("user", "héllo 🌍 世界\n\"quoted\"")),
        GenerationSettings(temperature=0.0, top_p=0.5, max_new_tokens=9),
    ),
    protocol.Cancel(7),
    protocol.Ping(3),
    protocol.Shutdown(),
    protocol.Progress("loading", "loading the model"),
    protocol.Ready(ModelInfo("tiny", "none", "cpu", "float32", 2048, 4, 1.25)),
    protocol.Fatal("set [model] model"),
    protocol.Started(7, 31, 2, batch=5, batch_size=3),
    protocol.Deltas({7: "Hi", 8: " 🌍", 12: ""}),
    protocol.Done(7, GenerationResult("length", 31, 9, 2)),
    protocol.JobError(8, "the message is too long"),
    protocol.Pong(3),
]


@pytest.mark.parametrize("message", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(message) -> None:
    line = protocol.encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    line.decode("ascii")  # ASCII only: no line can be cut inside a character
    assert json.loads(line)["type"] == message.TYPE
    assert protocol.decode(line) == message
    assert protocol.decode(line.decode("ascii")) == message


def test_every_message_type_has_an_example() -> None:
    assert {m.TYPE for m in EXAMPLES} == set(protocol._MESSAGE_TYPES)


def test_deltas_are_keyed_by_int_job_ids() -> None:
    decoded = protocol.decode(protocol.encode(protocol.Deltas({1: "a", 22: "b"})))
    assert dict(decoded.texts) == {1: "a", 22: "b"}
    assert all(isinstance(key, int) for key in decoded.texts)


def test_ready_carries_model_info() -> None:
    info = ModelInfo("m", "4bit", "cuda", "bfloat16", 8192, 8, 3.5)
    assert protocol.decode(protocol.encode(protocol.Ready(info))).info == info


@settings(max_examples=200, deadline=None)
@given(
    job_id=st.integers(-(2**40), 2**40),
    texts=st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]), st.text()), max_size=5),
    temperature=st.floats(0, 2),
    top_p=st.floats(0.01, 1),
    max_new_tokens=st.integers(1, 4096),
)
def test_submit_round_trips_any_text(job_id, texts, temperature, top_p, max_new_tokens) -> None:
    message = protocol.Submit(
        job_id,
        tuple(ChatMessage(role, content) for role, content in texts),
        GenerationSettings(temperature, top_p, max_new_tokens),
    )
    assert protocol.decode(protocol.encode(message)) == message


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.integers(0, 10**9), st.text(), max_size=8))
def test_deltas_round_trip_any_text(texts) -> None:
    assert protocol.decode(protocol.encode(protocol.Deltas(texts))).texts == texts


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        (b"", "not a JSON"),
        (b"{not json", "not a JSON"),
        (b"\xff\xfe", "not a JSON"),
        (b"[1, 2]", "JSON object"),
        (b'{"job_id": 1}', "unknown message type None"),
        (b'{"type": "explode"}', "unknown message type 'explode'"),
        (b'{"type": "cancel"}', "lacks field 'job_id'"),
        (b'{"type": "cancel", "job_id": 1, "extra": 2}', "unknown fields ['extra']"),
        (b'{"type": "cancel", "job_id": "1"}', "cancel.job_id must be an integer"),
        (b'{"type": "cancel", "job_id": true}', "cancel.job_id must be an integer"),
        (b'{"type": "cancel", "job_id": 1.5}', "cancel.job_id must be an integer"),
        (b'{"type": "deltas", "texts": {"x": "a"}}', "keys must be job ids"),
        (b'{"type": "deltas", "texts": {"1": 5}}', "deltas.texts[1] must be a string"),
        (b'{"type": "deltas", "texts": []}', "must be an object"),
        (b'{"type": "fatal", "message": null}', "fatal.message must be a string"),
        (
            b'{"type": "submit", "job_id": 1, "messages": [{"role": "user"}], '
            b'"settings": {"temperature": 0, "top_p": 1, "max_new_tokens": 5}}',
            "must have exactly role and content",
        ),
        (
            b'{"type": "submit", "job_id": 1, "messages": "hi", '
            b'"settings": {"temperature": 0, "top_p": 1, "max_new_tokens": 5}}',
            "must be a list of messages",
        ),
        (
            b'{"type": "submit", "job_id": 1, "messages": [], "settings": {"temperature": 0}}',
            "must have exactly temperature, top_p and max_new_tokens",
        ),
        (b'{"type": "configure", "model": {"colour": "red"}, "worker": {}}', "unknown keys ['colour']"),
    ],
)
def test_malformed_lines_raise_a_clear_error(line: bytes, complaint: str) -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(line)
    assert complaint in str(caught.value)
    assert isinstance(caught.value, GenerationError)


def test_long_bad_lines_are_shortened_in_the_error() -> None:
    with pytest.raises(protocol.ProtocolError) as caught:
        protocol.decode(b'{"type": "nope", "pad": "' + b"x" * 10_000 + b'"}')
    assert len(str(caught.value)) < 400
