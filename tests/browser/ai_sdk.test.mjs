// The AI SDK UI message stream (`POST /api/v1/chat`) read by the `ai` package's own client code:
// DefaultChatTransport (what useChat uses to call a backend) parses and validates the stream
// parts, and readUIMessageStream assembles them into the assistant message.
import { test } from "node:test";
import assert from "node:assert/strict";
import { DefaultChatTransport, readUIMessageStream } from "ai";
import { SMOLLM2, startGateway } from "./gateway.mjs";

test("useChat's transport reads a streamed reply from the real model", async () => {
  const gateway = await startGateway(["--model", `v1=${SMOLLM2}`]);
  try {
    const transport = new DefaultChatTransport({ api: `${gateway.base}/api/v1/chat`, body: { max_tokens: 32, temperature: 0 } });
    const chunks = await transport.sendMessages({
      chatId: "test-chat",
      trigger: "submit-message",
      messageId: undefined,
      abortSignal: undefined,
      messages: [{ id: "m1", role: "user", parts: [{ type: "text", text: "What is the capital of Germany?" }] }],
    });
    const seen = [];
    const [forParts, forMessage] = chunks.tee();
    const reading = (async () => { for await (const part of forParts) seen.push(part); })();
    let last;
    for await (const message of readUIMessageStream({ stream: forMessage })) last = message;
    await reading;

    assert.equal(last.role, "assistant");
    const text = last.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
    assert.match(text, /Berlin/);
    const types = seen.map((p) => p.type);
    assert.deepEqual(types.slice(0, 3), ["start", "start-step", "text-start"]);
    assert.deepEqual(types.slice(-3), ["text-end", "finish-step", "finish"]);
    assert.ok(types.filter((t) => t === "text-delta").length >= 3, "the reply streamed as several deltas");
    assert.equal(seen.at(-1).finishReason, "stop");
  } finally {
    gateway.stop();
  }
});

test("the protocol header and [DONE] are on the wire", async () => {
  const gateway = await startGateway(["--model", `v1=${SMOLLM2}`]);
  try {
    const response = await fetch(`${gateway.base}/api/v1/chat`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: [{ id: "m1", role: "user", parts: [{ type: "text", text: "Hi" }] }], max_tokens: 4 }),
    });
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("x-vercel-ai-ui-message-stream"), "v1");
    assert.equal(response.headers.get("content-type"), "text/event-stream");
    assert.equal(response.headers.get("x-accel-buffering"), "no");
    const body = await response.text();
    assert.ok(body.trimEnd().endsWith("data: [DONE]"), body);
    assert.ok(!/^\d:/m.test(body), "no v4 data-stream lines");
  } finally {
    gateway.stop();
  }
});
