"""Dataset validation throughput and peak memory, side by side with a baseline and a ceiling.

    .venv/bin/python bench/validation.py [--sizes 10,100] [--repeat 3] [--no-tokens] [--keep DIR]
    make bench-validation

Generates chat JSONL files (ultrachat-shaped rows, deterministic) of each size in a temp dir,
then runs every variant in its own child process and reads that child's peak RSS from
``os.wait4`` (``ru_maxrss``), so no variant inherits another's memory:

* ``tunedrop``   : ``shared.datasets.validate_path`` (structural checks, stats, duplicates), within the
                   dataset limits of the default settings, as ``check_dataset`` validates;
* ``tunedrop+tok``: the same with token counting (SmolLM2's fast tokenizer, batched, one counting
                   thread per core beside the parsing), when the tokenizer is in the model cache;
* ``tok-serial`` : its baseline, counting as before issue 18 part 6: batches of 2048 texts counted one
                   after the other on the validator's thread (``len(e.ids)``, every text encoded);
* ``tok-rayon``  : the baseline with the tokenizer's own Rust thread pool switched on
                   (TOKENIZERS_PARALLELISM=true), which the app keeps off (see shared/tokens.py);
* ``pandas``     : the baseline, ``pandas.read_json(lines=True)`` then the same structural checks
                   in plain Python;
* ``bare-parse`` : the ceiling, a loop that only parses each line with the JSON parser the
                   validator uses (msgspec, into the row's typed shape as the validator does);
* ``bare-orjson`` : the same loop with orjson (the other fast parser), when installed, as a
                   second, stricter ceiling; the validator's time is shown as a ratio to each.

Every token variant runs with TOKENIZERS_PARALLELISM=false, as the app sets it, but ``tok-rayon``.
The runs are interleaved (each round runs every variant once, every other round in reverse order), so
that load from other processes falls on all of them alike; the best time of the rounds is shown, with
the CPU seconds the child used, and the speed-up of ``tunedrop+tok`` round by round as well.
Figures are printed, never asserted (they depend on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORDS = ("the a of to and in is it you that he was for on are with as I his they be at one have this from "
         "or had by hot word but what some we can out other were all there when up use your how said an each "
         "she which do their time if will way about many then them write would like so these her long make "
         "thing see him two has look more day could go come did number sound no most people my over know "
         "water than call first who may down side been now find any new work part take get place made live "
         "where after back little only round man year came show every good me give our under name very "
         "through just form sentence great think say help low line differ turn cause much mean before move "
         "right boy old too same tell does set three want air well also play small end put home read hand "
         "port large spell add even land here must big high such follow act why ask men change went light "
         "kind off need house picture try us again animal point mother world near build self earth father "
         "Note: see https://example.com/a?b=c café naïve 東京 😀 \"quoted\" back\\slash tab\tnew\nline").split(" ")


def generate(path: Path, size_mb: int, seed: int = 7) -> int:
    """Write ultrachat-shaped rows until the file reaches size_mb MB; returns the row count."""
    rng = random.Random(seed)
    target = size_mb * 1_000_000
    rows = 0
    written = 0

    def text(n: int) -> str:
        return " ".join(rng.choices(WORDS, k=n))

    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            turns = rng.randint(1, 4)
            messages = []
            if rng.random() < 0.2:
                messages.append({"role": "system", "content": text(rng.randint(5, 30))})
            for _ in range(turns):
                messages.append({"role": "user", "content": text(rng.randint(8, 80))})
                messages.append({"role": "assistant", "content": text(rng.randint(30, 300))})
            prompt = messages[1 if messages[0]["role"] == "system" else 0]["content"]
            line = json.dumps({"prompt": prompt, "prompt_id": f"{rng.getrandbits(256):064x}", "messages": messages},
                              ensure_ascii=rng.random() < 0.5) + "\n"
            f.write(line)
            written += len(line.encode())
            rows += 1
    return rows


# -- the variants, each run as `python bench/validation.py --child VARIANT FILE` -----------------------


class SerialCount:
    """Token counting as it was before issue 18 part 6: no ``threads`` attribute, so the validator counts
    each batch of 2048 texts on its own thread, every text is encoded, and the ids of every encoding are
    built to be counted."""

    def __init__(self, fast) -> None:
        self.fast, self.method, self.exact = fast, fast.method, True

    def count(self, texts) -> list[int]:
        return [len(e.ids) for e in self.fast._encode(list(texts), add_special_tokens=False)]


def child_tunedrop(path: str, tokens: bool, serial: bool = False) -> dict:
    sys.path.insert(0, str(ROOT))
    from shared.datasets import validate_path

    try:
        from shared.datasets import reading_limits
        from shared.settings import Settings

        limits = reading_limits(Settings())
    except ImportError:  # a tunedrop from before the dataset limits, measured side by side
        limits = {}
    tokenizer = None
    if tokens:
        from shared.tokens import find_tokenizer

        tokenizer = find_tokenizer("smollm2-135m-instruct", Path(os.environ.get(
            "TUNEDROP_MODEL_CACHE", Path.home() / ".cache" / "tunedrop")))
        if tokenizer is None:
            return {"skipped": "no SmolLM2 tokenizer in the model cache"}
        if serial:
            from shared.datasets import token_count

            tokenizer, token_count.TOKEN_BATCH = SerialCount(tokenizer), 2048
    start = time.perf_counter()
    report = validate_path(path, tokenizer=tokenizer, **limits) if tokens else validate_path(path, **limits)
    elapsed = time.perf_counter() - start
    assert report.accepted, report.summary()
    return {"seconds": elapsed, "examples": report.stats["examples"],
            "tokens": (report.stats.get("tokens") or {}).get("total")}


def _checks(messages) -> bool:
    """The structural checks of the baseline, in plain Python."""
    if not isinstance(messages, list) or not messages:
        return False
    prev = None
    has_assistant = False
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return False
        role, content = m.get("role"), m.get("content")
        if role not in ("system", "user", "assistant") or not isinstance(content, str) or not content.strip():
            return False
        if role == "system" and i != 0:
            return False
        if role == prev and role != "system":
            return False
        has_assistant |= role == "assistant"
        prev = role
    return has_assistant


def child_pandas(path: str) -> dict:
    import pandas as pd

    start = time.perf_counter()
    frame = pd.read_json(path, lines=True)
    good = sum(1 for messages in frame["messages"] if _checks(messages))
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "examples": good}


def child_bare(path: str, parser: str) -> dict:
    if parser == "orjson":
        try:
            from orjson import loads
        except ImportError:
            return {"skipped": "orjson is not installed (pip install -r requirements-bench.txt)"}
    else:
        sys.path.insert(0, str(ROOT))
        from shared.datasets.rows import typed_loads as loads
    start = time.perf_counter()
    n = 0
    with open(path, "rb") as f:
        for line in f:
            loads(line)
            n += 1
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "examples": n, "parser": parser}


def run_child(variant: str, path: Path) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="true" if variant == "tok-rayon" else "false")
    proc = subprocess.Popen([sys.executable, __file__, "--child", variant, str(path)], stdout=subprocess.PIPE,
                            cwd=ROOT, env=env)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}"}
    result = json.loads(out)
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # KiB on Linux
    result["cpu_seconds"] = usage.ru_utime + usage.ru_stime
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="10,100", help="file sizes in MB, comma-separated")
    parser.add_argument("--no-tokens", action="store_true", help="skip the token-counting variant")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds, each running every variant once (every other round in reverse order); "
                             "the best time is shown")
    parser.add_argument("--keep", type=Path, help="generate the files into this folder and keep them")
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        variant, path = args.child
        result = {"tunedrop": lambda: child_tunedrop(path, False), "tunedrop+tok": lambda: child_tunedrop(path, True),
                  "tok-serial": lambda: child_tunedrop(path, True, serial=True),
                  "tok-rayon": lambda: child_tunedrop(path, True, serial=True),
                  "pandas": lambda: child_pandas(path), "bare-parse": lambda: child_bare(path, "msgspec"),
                  "bare-orjson": lambda: child_bare(path, "orjson")}[variant]()
        print(json.dumps(result))
        return 0

    variants = ["bare-parse", "bare-orjson", "tunedrop", "pandas"] + (
        [] if args.no_tokens else ["tunedrop+tok", "tok-serial", "tok-rayon"])
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for size in sizes:
            path = folder / f"chat-{size}mb.jsonl"
            if not path.exists():
                t0 = time.perf_counter()
                count = generate(path, size)
                print(f"generated {path.name}: {count:,} rows, {path.stat().st_size / 1e6:.1f} MB "
                      f"in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
            mb = path.stat().st_size / 1e6
            results = {}
            rounds = [{v: run_child(v, path) for v in (variants if k % 2 == 0 else variants[::-1])}  # interleaved
                      for k in range(args.repeat)]
            for v in variants:  # best time of --repeat runs (each its own process), highest peak RSS
                tries = [r[v] for r in rounds]
                ok = [r for r in tries if "seconds" in r]
                results[v] = (dict(min(ok, key=lambda r: r["seconds"]), peak_rss_mb=max(r["peak_rss_mb"] for r in ok),
                                   rounds=[r.get("seconds") for r in tries]) if ok else tries[0])
            for v in variants:
                r = results[v]
                if "seconds" not in r:
                    rows.append((size, v, None, None, None, r.get("skipped") or r.get("error")))
                    continue
                rows.append((size, v, r["seconds"], mb / r["seconds"], r["peak_rss_mb"], r))
        print()
        print(f"{'file':>7} {'variant':<13} {'seconds':>8} {'MB/s':>8} {'peak RSS MB':>12}  notes")
        by = {(s, v): r for s, v, *r in rows}
        for size, v, secs, rate, rss, extra in rows:
            if secs is None:
                print(f"{size:>5}MB {v:<13} {'-':>8} {'-':>8} {'-':>12}  {extra}")
                continue
            notes = []
            if v == "tunedrop":
                for b, what in (("bare-parse", "the bare parse with our parser"), ("bare-orjson", "bare orjson")):
                    bare = (by.get((size, b)) or [None])[0]
                    if bare:
                        notes.append(f"{secs / bare:.2f}x {what}")
                pandas = by.get((size, "pandas"))
                if pandas and pandas[0]:
                    notes.append(f"{pandas[0] / secs:.1f}x faster than pandas")
            if v.startswith("bare-"):
                notes.append(f"parser: {extra.get('parser')}")
            if v == "tunedrop+tok":
                for b in ("tok-serial", "tok-rayon"):
                    base = by.get((size, b)) or [None]
                    if base[0]:
                        pairs = ", ".join(f"{x / y:.2f}" for x, y in zip(base[-1]["rounds"], extra["rounds"], strict=True)
                                          if x and y)
                        notes.append(f"{base[0] / secs:.2f}x faster than {b} (round by round: {pairs})")
                        if base[-1].get("tokens") != extra.get("tokens"):
                            notes.append(f"TOKEN COUNTS DIFFER from {b}")
            if v in ("tunedrop+tok", "tok-serial", "tok-rayon") and extra.get("tokens"):
                notes.append(f"{extra['tokens']:,} tokens, {extra['cpu_seconds']:.1f} s CPU")
            print(f"{size:>5}MB {v:<13} {secs:>8.2f} {rate:>8.1f} {rss:>12.1f}  {'; '.join(notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
