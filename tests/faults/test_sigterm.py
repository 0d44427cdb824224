"""SIGTERM to a served gptload with 50 streams in flight: uvicorn stops taking new
connections and lets the streams run to their end within the graceful timeout
(SERVER_GRACEFUL_SHUTDOWN_TIMEOUT), the request log is flushed on the way out, and the
process exits 0. No stream may hang; each one is logged.
"""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path
from typing import Any

import openai

from proxy.tests.conftest import PROXY_KEY
from tests.fakeprovider import Behaviour, FakeProvider, full_text
from tests.faults.conftest import Gateway, eventually, private_env, start_gateway
from tests.faults.tally import Tally

STREAMS = 50
EVENTS, INTERVAL = 8, 0.25  # each stream lasts 2 s: well within the 10 s graceful timeout
GRACE = 10  # SERVER_GRACEFUL_SHUTDOWN_TIMEOUT (its least)


async def stream_all(base: str) -> list[str | BaseException]:
    client = openai.AsyncOpenAI(base_url=base, api_key=PROXY_KEY, max_retries=0, timeout=30)

    async def one() -> str:
        chunks = await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], stream=True
        )
        return "".join([(c.choices[0].delta.content or "") if c.choices else ""
                        async for c in chunks])  # fmt: skip

    async def bounded() -> str:
        return await asyncio.wait_for(one(), 3 * GRACE)  # a stream that hangs fails here

    try:
        return await asyncio.gather(*(bounded() for _ in range(STREAMS)), return_exceptions=True)
    finally:
        await client.close()


def test_sigterm_with_50_streams_in_flight_lets_them_finish_logs_them_and_exits_0(
    store_env: dict[str, str], fake: FakeProvider, gateway: Gateway, tmp_path: Path,
    tally: Tally,
) -> None:  # fmt: skip
    env = private_env(store_env, tmp_path, SERVER_GRACEFUL_SHUTDOWN_TIMEOUT=str(GRACE))
    stopping = start_gateway(env, tmp_path / "serve.log", fake)
    try:
        key = f"sk-term-{uuid.uuid4().hex[:12]}"
        group = stopping.group([key])
        fake.behave(key, Behaviour(events=EVENTS, event_interval=INTERVAL))
        before = len(fake.requests_for(key))

        async def scenario() -> list[Any]:
            streams = asyncio.ensure_future(stream_all(stopping.proxy(group) + "/v1"))
            in_flight = await asyncio.to_thread(
                fake.wait_until, lambda: len(fake.requests_for(key)) - before >= STREAMS, 20
            )
            assert in_flight, len(fake.requests_for(key)) - before
            stopping.server.process.send_signal(signal.SIGTERM)
            return await streams

        results = asyncio.run(scenario())
        exit_code = stopping.server.process.wait(GRACE + 20)
    finally:
        stopping.server.stop()
    failed = [r for r in results if not isinstance(r, str) or r != full_text(EVENTS)]
    tally.requests += STREAMS
    tally.errors_with_healthy_key += len(failed)
    tally.rows_expected += STREAMS
    assert failed == [], failed[:3]
    assert exit_code == 0, stopping.server.output()[-3000:]
    # Read through the run's other gateway: the stopped one flushed its rows on the way out.
    rows = gateway.wait_logs(group, STREAMS, 10)
    tally.rows_lost += max(0, STREAMS - len(rows))
    assert len(rows) == STREAMS
    assert all((row["status_code"], row["is_success"]) == (200, True) for row in rows)
    assert eventually(lambda: fake.in_progress == 0, 5)
