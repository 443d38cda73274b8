"""The usual Python pattern streamgate is measured against: a FastAPI `StreamingResponse` over an
async generator yielding `data: {chunk}\\n\\n`, then `data: [DONE]\\n\\n`, served by uvicorn with
uvloop and httptools. Same mock token behaviour and wire format as `streamgate --engine mock`:
MOCK_TOKENS tokens (capped by max_tokens) every MOCK_INTERVAL_MS (0 = as fast as possible).

    MOCK_TOKENS=64 MOCK_INTERVAL_MS=0 uvicorn app:app --loop uvloop --http httptools --port 8001
"""

import asyncio
import json
import os

from fastapi import FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

TOKENS = int(os.environ.get("MOCK_TOKENS", "64"))
INTERVAL = float(os.environ.get("MOCK_INTERVAL_MS", "0")) / 1000.0
WORDS = [" stream", "ing", " tokens", " to", " the", " browser", ",", " fast"]

app = FastAPI()


class InferenceRequest(BaseModel):
    prompt: str
    max_tokens: int = 256


async def token_events(max_tokens: int):
    n = min(TOKENS, max_tokens)
    for index in range(n):
        if INTERVAL > 0:
            await asyncio.sleep(INTERVAL)
        yield f"data: {json.dumps({'index': index, 'text': WORDS[index % len(WORDS)]})}\n\n"
    yield f"data: {json.dumps({'finish_reason': 'length', 'usage': {'prompt_tokens': 1, 'completion_tokens': n}})}\n\n"
    yield "data: [DONE]\n\n"


@app.post("/api/v1/inference/stream")
async def stream(request: InferenceRequest):
    return StreamingResponse(token_events(request.max_tokens), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
