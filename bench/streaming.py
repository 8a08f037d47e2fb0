"""Time to first token: a chat completion streamed (`stream: true`) against the same one unstreamed, where the
first token arrives with the whole answer, through the OpenAI-compatible Function (`/api/v1`, the local
host) and directly from the model server, interleaved in one run so all four see the same machine. Trains
a tiny adapter on SmolLM2 first (a few steps, bench/scoring.py's `deploy`) so a real endpoint serves; then
loads the status page as a browser would (the HTML, then its first JSON calls). Printed, never asserted.

    .venv/bin/python bench/streaming.py [--base-model smollm2-135m-instruct] [--requests 10] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scoring import deploy  # noqa: E402

QUESTION = [{"role": "user", "content": "Write a short story about a dragon who learns to paint."}]


def first_and_last(client, url: str, headers: dict, body: dict) -> tuple[float, float, int]:
    """(seconds to the first piece of text, seconds to the end, text length) of one request."""
    started = time.perf_counter()
    first, text = None, ""
    with client.stream("POST", url, json=body, headers=headers, timeout=300) as reply:
        reply.raise_for_status()
        if not body.get("stream"):
            data = json.loads(reply.read())
            first = time.perf_counter() - started
            text = data["choices"][0]["message"]["content"]
        else:
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                piece = chunk["choices"][0]["delta"].get("content") if chunk.get("choices") else None
                if piece:
                    first = first if first is not None else time.perf_counter() - started
                    text += piece
    return first if first is not None else float("nan"), time.perf_counter() - started, len(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    import httpx

    from shared.openai_api import model_id

    with tempfile.TemporaryDirectory(prefix="tunedrop-bench-stream-") as tmp:
        azurite, host, settings, run = deploy(args.base_model, Path(tmp) / "state")
        try:
            from shared.backends.local import LocalBackend

            target = LocalBackend(settings).scoring_target(run.endpoint_name)
            direct = target.url.rsplit("/", 1)[0] + "/v1/chat/completions"
            function = f"{host.base_url}/api/v1/chat/completions"
            targets = {"Function": (function, {"Authorization": f"Bearer {host.function_key}"}),
                       "model server": (direct, {"Authorization": f"Bearer {target.key}"})}
            body = {"model": model_id(run), "messages": QUESTION, "max_tokens": args.tokens, "temperature": 0}
            results: dict[str, list] = {}
            with httpx.Client() as client:
                for url, headers in targets.values():  # warm-up
                    first_and_last(client, url, headers, body)
                for _ in range(args.requests):
                    for name, (url, headers) in targets.items():
                        for stream in (False, True):
                            key = f"{name}, {'streamed' if stream else 'whole'}"
                            results.setdefault(key, []).append(
                                first_and_last(client, url, headers, {**body, "stream": stream}))
                page = []
                for _ in range(args.requests):
                    started = time.perf_counter()
                    client.get(f"{host.base_url}/api/status").raise_for_status()
                    headers = {"x-functions-key": host.function_key}
                    client.get(f"{host.base_url}/api/runs", headers=headers).raise_for_status()
                    client.get(f"{host.base_url}/api/runs/{run.run_id}", headers=headers).raise_for_status()
                    client.get(f"{host.base_url}/api/runs/{run.run_id}/progress", headers=headers).raise_for_status()
                    page.append(time.perf_counter() - started)
        finally:
            host.stop()
            LocalBackend(settings).stop_all()
            azurite.stop()
    print(f"{args.base_model}, {args.tokens} tokens greedy, {args.requests} requests each, interleaved")
    print(f"{'':28} {'first text p50':>15} {'whole answer p50':>17} {'chars':>6}")
    for key, samples in results.items():
        firsts, lasts = [s[0] for s in samples], [s[1] for s in samples]
        print(f"{key:28} {statistics.median(firsts) * 1000:12.0f} ms {statistics.median(lasts) * 1000:14.0f} ms "
              f"{statistics.median(s[2] for s in samples):6.0f}")
    for name in targets:
        whole, streamed = results[f"{name}, whole"], results[f"{name}, streamed"]
        ratio = statistics.median(s[0] for s in whole) / statistics.median(s[0] for s in streamed)
        print(f"{name}: the first text arrives {ratio:.1f}x sooner streamed")
    print(f"status page (HTML + its three JSON calls, as one refresh): p50 {statistics.median(page) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
