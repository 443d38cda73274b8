// useChat's resume (`resume: true` → `GET {api}/{chatId}/stream`), driven by the `ai` package's own
// DefaultChatTransport against two real replicas that share a real Redis: the reply starts on
// replica A, the client drops the connection after 5 parts, and reconnectToStream on replica B
// gets the same reply (the AI SDK replays a resumed stream from its start).
import { test } from "node:test";
import assert from "node:assert/strict";
import { DefaultChatTransport, readUIMessageStream } from "ai";
import { SMOLLM2, startGateway, startRedis } from "./gateway.mjs";

const MESSAGES = [{ id: "m1", role: "user", parts: [{ type: "text", text: "Write the numbers from 1 to 1000, separated by commas." }] }];
// SmolLM2 answers this at length (400 tokens, no EOS, checked): still running when B is asked.
const BODY = { max_tokens: 240, temperature: 0 };

async function textOf(stream) {
  let last;
  for await (const message of readUIMessageStream({ stream })) last = message;
  return { text: last.parts.filter((p) => p.type === "text").map((p) => p.text).join(""), message: last };
}

function send(base, chatId, abortSignal) {
  return new DefaultChatTransport({ api: `${base}/api/v1/chat`, body: BODY }).sendMessages({
    chatId, trigger: "submit-message", messageId: undefined, abortSignal, messages: MESSAGES,
  });
}

test("a chat reply started on one replica resumes on another through Redis", async () => {
  const redis = await startRedis();
  const args = ["--model", `v1=${SMOLLM2}`, "--state", redis.url, "--intra-threads", "1"];
  const a = await startGateway(args);
  const b = await startGateway(args);
  try {
    const whole = await textOf(await send(a.base, "uninterrupted"));
    assert.ok(whole.text.length > 40, whole.text);

    // Read 5 parts of a new reply, then drop the connection.
    const abort = new AbortController();
    const reader = (await send(a.base, "resumed-chat", abort.signal)).getReader();
    const firstParts = [];
    while (firstParts.length < 5) {
      const { value, done } = await reader.read();
      assert.ok(!done, "the stream is longer than 5 parts");
      firstParts.push(value);
    }
    abort.abort();
    await reader.cancel().catch(() => {});
    assert.deepEqual(firstParts.slice(0, 3).map((p) => p.type), ["start", "start-step", "text-start"]);

    // The page reloads and useChat resumes; the load balancer sends it to replica B.
    const resumed = await new DefaultChatTransport({ api: `${b.base}/api/v1/chat` }).reconnectToStream({ chatId: "resumed-chat" });
    assert.ok(resumed, "B found the chat's reply in progress (not 204)");
    const again = await textOf(resumed);
    assert.equal(again.text, whole.text, "the same reply as an uninterrupted run");
    assert.equal(again.message.role, "assistant");

    // B never ran the model: the reply came from A through Redis.
    const metrics = await (await fetch(`${b.base}/metrics`)).text();
    assert.match(metrics, /^streamgate_engine_admitted_requests\{version="v1"\} 0$/m);
    assert.match(metrics, /^streamgate_resumed_streams_total\{version="v1"\} 1$/m);

    // A chat with no reply in progress anywhere: 204, which the transport reads as "nothing to resume".
    const none = await new DefaultChatTransport({ api: `${b.base}/api/v1/chat` }).reconnectToStream({ chatId: "no-such-chat" });
    assert.equal(none, null);
  } finally {
    a.stop();
    b.stop();
    redis.stop();
  }
});
