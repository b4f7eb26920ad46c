"""The offline batch runner behind ``lmforge batches run`` (like ``vllm run-batch``): a batch input
file through an in-process app, no server, no store; one output file with every line's record,
in input order (errors included, as vLLM writes them)."""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from lmforge.jobs.batch_lines import BatchLine, LineResult, run_line
from lmforge.jobs.worker import in_process_client


@dataclass
class Summary:
    """What a run did: line counts and token usage; ``seconds`` of wall time."""

    succeeded: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0

    def add(self, result: LineResult) -> None:
        if result.ok:
            self.succeeded += 1
        else:
            self.failed += 1
        self.input_tokens += result.usage[0]
        self.output_tokens += result.usage[2]

    def __str__(self) -> str:
        rate = self.output_tokens / self.seconds if self.seconds else 0.0
        return (f"{self.succeeded + self.failed} requests: {self.succeeded} succeeded, "
                f"{self.failed} failed; {self.input_tokens} prompt tokens, "
                f"{self.output_tokens} completion tokens in {self.seconds:.1f} s "
                f"({rate:.1f} completion tokens/s)")


async def run_lines(app: Any, lines: list[BatchLine], concurrency: int,
                    progress: bool = True) -> tuple[list[LineResult], Summary]:
    """Run ``lines`` through the ASGI ``app`` with up to ``concurrency`` in flight; returns the
    results in input order and the summary. The app's engine must be started."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    results: list[LineResult | None] = [None] * len(lines)
    summary = Summary()
    pending = iter(enumerate(lines))
    in_flight: dict[asyncio.Future, int] = {}
    with tqdm(total=len(lines), desc="batch", unit="req", disable=not progress) as bar:
        async with in_process_client(app) as client:
            while True:
                for i, line in itertools.islice(pending, concurrency - len(in_flight)):
                    in_flight[asyncio.ensure_future(run_line(client, line))] = i
                if not in_flight:
                    break
                finished, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    result = task.result()
                    results[in_flight.pop(task)] = result
                    summary.add(result)
                    bar.update(1)
    summary.seconds = loop.time() - start
    return [r for r in results if r is not None], summary
