"""The synthetic model of the workers (no ``--upstream``, ``--generator`` or ``--replay``):
deterministic text derived from the prompt, paced at ``--tokens-per-s`` after an optional
``--prefill-s``, honouring ``max_tokens``.
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import AsyncIterator, Iterator

from ringcast.server.config import ServeConfig
from ringcast.server.plugin import GenerateFn, JobContext

VOCAB = (
    "the a ring of bytes keeps every token so readers can come back later and resume "
    "from an offset while the producer never waits for anyone slow lighthouse keeper "
    "watched ships pass through fog at night sea wind stone lamp shore quiet bright old "
    "small story once upon time stream resumes cleanly across processes shared memory"
).split()


def synthetic_tokens(prompt: str, n: int) -> Iterator[str]:
    """Deterministic text for a prompt: the same prompt always gives the same tokens.

    Made one at a time: ``max_tokens`` comes from the client, and ``10**9`` must cost no more
    memory or work up front than ``16``.
    """
    rng = random.Random(zlib.crc32(prompt.encode("utf-8", "surrogatepass")))
    for i in range(n):
        yield (" " if i else "") + rng.choice(VOCAB)


def synthetic_model(cfg: ServeConfig) -> GenerateFn:
    async def generate(ctx: JobContext) -> AsyncIterator[str | bytes]:
        mt = ctx.max_tokens
        n = cfg.default_max_tokens if mt is None else mt
        loop = asyncio.get_running_loop()
        if cfg.prefill_s > 0:
            await asyncio.sleep(cfg.prefill_s)
        t0 = loop.time()
        tps = cfg.tokens_per_s
        for i, tok in enumerate(synthetic_tokens(ctx.prompt_text(), n)):
            if tps > 0 and (delay := t0 + i / tps - loop.time()) > 0:
                await asyncio.sleep(delay)
            elif i % 32 == 31:
                # Unpaced, or behind the pace (a fast --tokens-per-s): a long generation still
                # lets the worker's other jobs and its cancellation poll run.
                await asyncio.sleep(0)
            yield tok
        ctx.finish_reason = "length"

    return generate
