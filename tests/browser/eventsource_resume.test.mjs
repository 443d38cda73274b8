// A browser's EventSource after a cut: the chat page at `/` in real headless Chromium streams a
// reply through a TCP proxy that ends the response and the connection after 5 events and sends every
// later connection to the other replica (the two share a real Redis). EventSource reconnects by
// itself with Last-Event-ID, and the page ends up with the whole reply, each event once.
import { test } from "node:test";
import assert from "node:assert/strict";
import { createServer, connect } from "node:net";
import { chromium } from "playwright-core";
import { SMOLLM2, startGateway, startRedis } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const CUT_AFTER = 5;

// The offset just past the `n`-th `data:` event in `text` and the CRLF that ends its HTTP chunk
// (the gateway writes one event per chunk: the cut falls between chunks), or -1 while that is not
// all there.
function endOfEvent(text, n) {
  const data = [...text.matchAll(/^data: /gm)];
  if (data.length < n) return -1;
  const blank = text.indexOf("\n\n", data[n - 1].index);
  if (blank < 0 || text.length < blank + 4) return -1;
  return text.startsWith("\r\n", blank + 2) ? blank + 4 : blank + 2;
}

// Proxies to `a` until it has cut one stream after CUT_AFTER events, then to `b`. Records each
// stream request's Last-Event-ID and the X-Stream-Id of the first stream.
async function cuttingProxy(a, b) {
  const seen = { streams: [], streamId: null, cut: false };
  const clients = new Set();
  const server = createServer((client) => {
    clients.add(client);
    client.on("close", () => clients.delete(client));
    const target = new URL(seen.cut ? b : a);
    const upstream = connect(Number(target.port), target.hostname);
    let response = "";
    let watching = false;
    let cutting = false; // this connection is being cut: it forwards nothing more
    client.on("data", (chunk) => {
      // The browser keeps connections alive: look for the stream's request in each chunk (a
      // browser's request head arrives whole).
      const text = chunk.toString("latin1");
      const at = text.indexOf("GET /api/v1/inference/stream");
      if (!watching && at >= 0) {
        watching = true;
        response = "";
        const head = text.slice(at).split("\r\n\r\n")[0];
        seen.streams.push((/^last-event-id: *(.*?)\r?$/im.exec(head) ?? [])[1] ?? null);
      }
      upstream.write(chunk);
    });
    upstream.on("data", (chunk) => {
      if (cutting) return;
      if (!watching || seen.cut) {
        client.write(chunk);
        return;
      }
      // latin1 keeps one character per byte, so an index into `response` is a byte offset.
      const before = response.length;
      response += chunk.toString("latin1");
      seen.streamId ??= (/^x-stream-id: *([0-9a-f]+)/im.exec(response) ?? [])[1] ?? null;
      const end = endOfEvent(response, CUT_AFTER);
      if (end < 0) {
        client.write(chunk);
        // Read in bursts, so the cut falls inside a read that holds several events (as it does
        // by chance on a loaded machine).
        upstream.pause();
        setTimeout(() => upstream.resume(), 60);
        return;
      }
      // One TCP read can hold several events: the browser gets exactly the first CUT_AFTER, then
      // the response's last chunk and the connection's end. (Destroying the socket instead raced
      // with Chromium's reading: it sometimes dropped the last event, on a fast machine.)
      // EventSource reconnects after a stream that ends as after one that fails.
      seen.cut = true;
      cutting = true;
      upstream.destroy();
      // The browser's idle keep-alive connections still lead to A: close them too, so that the
      // reconnect takes a new connection, to B.
      for (const other of clients) if (other !== client) other.end();
      client.end(Buffer.concat([chunk.subarray(0, end - before), Buffer.from("0\r\n\r\n")]));
    });
    const close = () => { client.destroy(); upstream.destroy(); };
    client.on("error", close);
    upstream.on("error", close);
    client.on("close", close);
    upstream.on("close", close);
  });
  await new Promise((listening) => server.listen(0, "127.0.0.1", listening));
  return { base: `http://127.0.0.1:${server.address().port}`, seen, close: () => server.close() };
}

test("EventSource reconnects after a cut and the page gets the whole reply from the other replica", async () => {
  const redis = await startRedis();
  const args = ["--model", `v1=${SMOLLM2}`, "--state", redis.url, "--intra-threads", "1"];
  const a = await startGateway(args);
  const b = await startGateway(args);
  const proxy = await cuttingProxy(a.base, b.base);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic"],
  });
  try {
    const page = await browser.newPage();
    await page.goto(proxy.base);
    await page.waitForSelector("#version option", { state: "attached" });
    // SmolLM2 answers this at length (no EOS within 400 tokens): the reply outlasts the reconnect.
    await page.fill("#prompt", "Write the numbers from 1 to 1000, separated by commas.");
    await page.fill("#max-tokens", "200");
    await page.click("#send");
    await page.waitForSelector("[data-testid=reply][data-done=true], .meta.error", { timeout: 120_000 });
    assert.equal(await page.locator(".meta.error").count(), 0, await page.locator(".meta").textContent());
    const shown = await page.locator("[data-testid=reply] span").textContent();

    assert.ok(proxy.seen.cut, "the first stream was cut");
    const id = proxy.seen.streamId;
    assert.match(id ?? "", /^[0-9a-f]{32}$/);
    assert.deepEqual(proxy.seen.streams, [null, `${id}-${CUT_AFTER}`], "one reconnect, from the last event seen");
    assert.match(await page.locator(".meta").textContent(), /^(length|stop) · \d+ tokens/, "the reply ran to its end");

    // The whole stream as the gateways recorded it: the page shows exactly its text.
    const log = await (await fetch(`${b.base}/api/v1/streams/${id}`)).text();
    const tokens = log.split("\n").filter((l) => l.startsWith("data: {")).map((l) => JSON.parse(l.slice(6)))
      .filter((e) => typeof e.text === "string");
    const text = tokens.map((e) => e.text).join("");
    assert.equal(shown, text, "no event repeated or skipped");
    // The page samples (no temperature: the native default), so the reply's length varies from run
    // to run; what matters is that it went on past the cut, through the other replica.
    assert.ok(tokens.length > CUT_AFTER, `only ${tokens.length} token events: ${text}`);

    const metrics = await (await fetch(`${b.base}/metrics`)).text();
    assert.match(metrics, /^streamgate_engine_admitted_requests\{version="v1"\} 0$/m, "B did not run the model");
    assert.match(metrics, /^streamgate_resumed_streams_total\{version="v1"\} 2$/m, "the reconnect and our read");
  } finally {
    await browser.close();
    proxy.close();
    a.stop();
    b.stop();
    redis.stop();
  }
});
