"""``ringcast trace synth|info``: synthetic traces shaped like llama-server's streams, and a
trace's summary.

>>> trace = synthesize(SynthParams(streams=2, seed=1))
>>> trace.streams[0].events[-1].data
'data: [DONE]\\n\\n'
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import string
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from ringcast._args import HelpFormatter
from ringcast.trace import (
    FORMAT_NAME,
    FORMAT_VERSION,
    Event,
    Stream,
    Trace,
    TraceError,
    TraceHeader,
    load_trace,
    write_trace,
)

__all__ = ["SynthParams", "register", "stream_summary", "synth_stream", "synthesize"]

# Defaults measured on the llama-server capture in shared/data/llama-server (8 chat streams,
# ~50 tokens/s on CPU): time to first token 48-103 ms (median ~81 ms); inter-token gaps
# lognormal with median 19.8 ms and log-sd 0.10; 46-145 tokens; content events 235-250 bytes.


class SynthParams(msgspec.Struct, kw_only=True):
    streams: int = 100
    ttft_ms: float = 80.0
    """Median time to first token (lognormal)."""
    ttft_sigma: float = 0.25
    """Log-space standard deviation of the time to first token."""
    itl_ms: float = 19.8
    """Median gap between tokens (lognormal)."""
    itl_sigma: float = 0.10
    tokens_min: int = 40
    tokens_max: int = 150
    """Completion length, uniform in [tokens_min, tokens_max]."""
    model: str = "synthetic"
    usage: bool = False
    """Add a usage chunk before ``[DONE]`` (``stream_options.include_usage``)."""
    seed: int = 0


_PIECES = (
    " the",
    " a",
    " of",
    " and",
    " to",
    " in",
    " is",
    " light",
    "house",
    " keeper",
    " storm",
    " wave",
    " night",
    " lamp",
    " ship",
    " rock",
    " sea",
    ",",
    ".",
    " she",
    " he",
    " it",
    " was",
    " watched",
    " through",
    " every",
    " cold",
    " bright",
    " beam",
    " har",
    "bour",
    " synchron",
    "ized",
    " hash",
    " map",
    " bucket",
    " key",
    " value",
    " futex",
    " kernel",
)
_ID_CHARS = string.ascii_letters + string.digits


def _chunk(cid: str, created: int, model: str, choices: str, extra: str = "") -> str:
    return (
        f'data: {{"choices":[{choices}],"created":{created},"id":"{cid}","model":"{model}",'
        f'"system_fingerprint":"b1-ringcast","object":"chat.completion.chunk"{extra}}}\n\n'
    )


def _content(text: str) -> str:
    return msgspec.json.encode(text).decode()


def synth_stream(index: int, p: SynthParams, rng: random.Random, created: int) -> Stream:
    cid = "chatcmpl-" + "".join(rng.choice(_ID_CHARS) for _ in range(32))
    n = rng.randint(p.tokens_min, p.tokens_max)
    prompt_n = rng.randint(12, 48)
    ttft = rng.lognormvariate(math.log(p.ttft_ms / 1000), p.ttft_sigma)
    model = p.model
    # llama-server sends the role chunk and the first token in one write, at the first token.
    events = [
        Event(
            ttft,
            _chunk(
                cid,
                created,
                model,
                '{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}',
            ),
        )
    ]
    t = ttft
    for k in range(n):
        if k:
            t += rng.lognormvariate(math.log(p.itl_ms / 1000), p.itl_sigma)
        text = _content(rng.choice(_PIECES))
        events.append(
            Event(
                t,
                _chunk(
                    cid,
                    created + int(t),
                    model,
                    f'{{"finish_reason":null,"index":0,"delta":{{"content":{text}}}}}',
                ),
            )
        )
    t_end = t + 0.0004
    predicted_ms = (t - ttft) * 1000
    timings = (
        f',"timings":{{"cache_n":0,"prompt_n":{prompt_n},"prompt_ms":{ttft * 1000:.3f},'
        f'"prompt_per_token_ms":{ttft * 1000 / prompt_n:.6f},'
        f'"prompt_per_second":{prompt_n / ttft:.6f},"predicted_n":{n},'
        f'"predicted_ms":{predicted_ms:.3f},'
        f'"predicted_per_token_ms":{predicted_ms / n:.6f},'
        f'"predicted_per_second":{n * 1000 / max(predicted_ms, 1e-3):.6f}}}'
    )
    final = '{"finish_reason":"length","index":0,"delta":{}}'
    created_end = created + int(t_end)
    if p.usage:
        events.append(Event(t_end, _chunk(cid, created_end, model, final)))
        usage = (
            f',"usage":{{"completion_tokens":{n},"prompt_tokens":{prompt_n},'
            f'"total_tokens":{n + prompt_n}}}'
        )
        events.append(Event(t_end, _chunk(cid, created_end, model, "", usage + timings)))
    else:
        events.append(Event(t_end, _chunk(cid, created_end, model, final, timings)))
    events.append(Event(t_end + 0.00005, "data: [DONE]\n\n"))
    request = {
        "model": model,
        "stream": True,
        "max_tokens": n,
        "messages": [{"role": "user", "content": f"synthetic request {index}"}],
    }
    return Stream(
        index=index,
        request=request,
        status=200,
        headers=["Content-Type: text/event-stream"],
        ttfb=ttft,
        duration=t_end + 0.00005,
        events=events,
    )


MAX_STREAMS = 1_000_000
"""The most streams a synthetic trace holds (a trace is made in memory first)."""
MAX_TOKENS = 1_000_000
"""The most tokens a synthetic stream has."""


def check_params(p: SynthParams) -> str | None:
    """What is wrong with ``p``, naming the parameter as its option (``--tokens-min``), or
    None."""
    if not 1 <= p.streams <= MAX_STREAMS:
        return f"--streams must be between 1 and {MAX_STREAMS} (got {p.streams})"
    if p.tokens_min < 1:
        return f"--tokens-min must be at least 1 (got {p.tokens_min})"
    if p.tokens_max > MAX_TOKENS:
        return f"--tokens-max must be at most {MAX_TOKENS} (got {p.tokens_max})"
    if p.tokens_max < p.tokens_min:
        return f"--tokens-max ({p.tokens_max}) must be at least --tokens-min ({p.tokens_min})"
    for flag, value in (("--ttft-ms", p.ttft_ms), ("--itl-ms", p.itl_ms)):
        if not 0 < value < math.inf:  # also NaN
            return f"{flag} must be a number of milliseconds > 0 (got {value})"
    for flag, value in (("--ttft-sigma", p.ttft_sigma), ("--itl-sigma", p.itl_sigma)):
        if not 0 <= value < math.inf:
            return f"{flag} must be a number >= 0 (got {value})"
    return None


def synthesize(p: SynthParams) -> Trace:
    """A trace of ``p.streams`` chat completion streams with lognormal timing."""
    problem = check_params(p)
    if problem is not None:
        raise ValueError(problem)
    rng = random.Random(p.seed)
    created = 1_795_000_000 + p.seed
    streams = [synth_stream(i, p, rng, created + i) for i in range(p.streams)]
    header = TraceHeader(
        format=FORMAT_NAME,
        version=FORMAT_VERSION,
        source="synth",
        streams=len(streams),
        created=time.time(),
        params=msgspec.structs.asdict(p),
    )
    return Trace(header, streams)


def stream_summary(streams: Iterable[Stream]) -> dict[str, float]:
    """Counts and medians of a trace, for ``ringcast trace info``: ``streams`` counts every
    stream of it (a failed request's too, as its header does), the medians those with
    events."""
    every = list(streams)
    ss = [s for s in every if s.events]
    ttft = sorted(s.events[0].t for s in ss)
    gaps = sorted(b.t - a.t for s in ss for a, b in itertools.pairwise(s.events[1:-2]))
    nbytes = sum(len(b) for s in ss for b in s.event_bytes())
    nevents = sum(len(s.events) for s in ss)

    def med(xs: list[float]) -> float:
        return xs[len(xs) // 2] if xs else 0.0

    return {
        "streams": len(every),
        "events": nevents,
        "bytes": nbytes,
        "ttft_median_ms": med(ttft) * 1000,
        "gap_median_ms": med(gaps) * 1000,
        "duration_max_s": max((s.events[-1].t for s in ss), default=0.0),
    }


# --------------------------------------------------------------------------------------------
# Command line

_SYNTH_DESCRIPTION = (
    "Write a trace of chat.completion.chunk streams shaped like llama-server's, with "
    "lognormal time to first token and inter-token gaps (defaults measured on a real "
    "llama-server capture: ~80 ms TTFT, ~20 ms between tokens, 40-150 tokens). For machines "
    "with no model."
)


def configure_trace(ap: argparse.ArgumentParser) -> None:
    """Arguments of ``ringcast trace synth|info``."""
    d = SynthParams()
    sub = ap.add_subparsers(dest="trace_cmd", required=True, metavar="<synth|info>")
    sp = sub.add_parser(
        "synth",
        formatter_class=HelpFormatter,
        help="write a synthetic trace with realistic timing",
        description=_SYNTH_DESCRIPTION,
        epilog="example: ringcast trace synth --streams 100 --out trace.jsonl",
    )
    sp.add_argument("--streams", type=int, required=True, help="number of streams")
    sp.add_argument("--out", required=True, help="trace file to write")
    sp.add_argument(
        "--ttft-ms", type=float, default=d.ttft_ms, help="median TTFT, ms (default: %(default)s)"
    )
    sp.add_argument(
        "--ttft-sigma",
        type=float,
        default=d.ttft_sigma,
        help="log-sd of TTFT (default: %(default)s)",
    )
    sp.add_argument(
        "--itl-ms",
        type=float,
        default=d.itl_ms,
        help="median inter-token gap, ms (default: %(default)s)",
    )
    sp.add_argument(
        "--itl-sigma",
        type=float,
        default=d.itl_sigma,
        help="log-sd of the gap (default: %(default)s)",
    )
    sp.add_argument("--tokens-min", type=int, default=d.tokens_min, help="fewest tokens")
    sp.add_argument("--tokens-max", type=int, default=d.tokens_max, help="most tokens")
    sp.add_argument("--model", default=d.model, help="model name in the chunks")
    sp.add_argument("--usage", action="store_true", help="add a usage chunk before [DONE]")
    sp.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    sp.set_defaults(func=run_trace_synth)
    ip = sub.add_parser(
        "info",
        formatter_class=HelpFormatter,
        help="check a trace and print its summary",
        description="Validate a trace file and print counts and median timings as JSON. A "
        "missing, truncated, corrupt or wrong-version file exits with status 2 and names "
        "the line.",
    )
    ip.add_argument("trace", help="trace file")
    ip.set_defaults(func=run_trace_info)


def run_trace_info(args: argparse.Namespace) -> int:
    try:
        tr = load_trace(args.trace, require_events=False)
    except TraceError as exc:
        print(f"ringcast trace info: {exc}", file=sys.stderr)
        return 2
    info: dict[str, Any] = {
        "format": tr.header.format,
        "version": tr.header.version,
        "source": tr.header.source,
        **stream_summary(tr.streams),
        "failed": sum(1 for s in tr.streams if s.error or s.status != 200),
    }
    print(msgspec.json.encode(info).decode())
    return 0


def run_trace_synth(args: argparse.Namespace) -> int:
    try:
        params = SynthParams(
            streams=args.streams,
            ttft_ms=args.ttft_ms,
            ttft_sigma=args.ttft_sigma,
            itl_ms=args.itl_ms,
            itl_sigma=args.itl_sigma,
            tokens_min=args.tokens_min,
            tokens_max=args.tokens_max,
            model=args.model,
            usage=args.usage,
            seed=args.seed,
        )
        trace = synthesize(params)
    except ValueError as exc:
        print(f"ringcast trace synth: {exc}", file=sys.stderr)
        return 2
    write_trace(args.out, trace)
    s = stream_summary(trace.streams)
    print(
        f"wrote {args.out}: {s['streams']} streams, {s['events']} events, {s['bytes']} bytes",
        file=sys.stderr,
    )
    return 0


def register(p: argparse.ArgumentParser) -> None:
    """``ringcast trace synth|info`` (see ``ringcast.cli``)."""
    p.description = "Make and inspect stream traces (format: docs/REPLAY.md)."
    configure_trace(p)
