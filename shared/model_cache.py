"""The local model cache's layout: which models live there and how a finished entry is marked.

Read by the local backend, which fills the cache (shared/backends/local/models.py), and by token
counting at ingest (shared/tokens.py), which only looks: so the layout sits in the core, and the
core never imports a backend to learn it.
"""

from __future__ import annotations

from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
#: The local backend's base models.
CHOICES = (SMOLLM2, TINY_RANDOM)
#: Cache entry holding only SmolLM2's tokenizer (converted from the gguf once, reused by tiny-random).
TOKENIZER_ENTRY = "smollm2-tokenizer"
#: Written last into a cache entry; an entry without it is never used.
MARKER = ".tunedrop-complete"


def tokenizer_folders(base_model: str, cache_dir: Path | str | None) -> list[Path]:
    """Cache entries that may hold ``base_model``'s tokenizer.json, best first (none for other models)."""
    if base_model not in CHOICES or not cache_dir:
        return []
    cache = Path(cache_dir).expanduser()
    return [cache / SMOLLM2, cache / TOKENIZER_ENTRY, cache / TINY_RANDOM]
