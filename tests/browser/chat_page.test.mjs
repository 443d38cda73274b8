// The chat page at `/` in a real headless Chromium: type a prompt, watch the reply stream in
// through EventSource, and save a screenshot.
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import { dirname, resolve } from "node:path";
import { chromium } from "playwright-core";
import { ROOT, SMOLLM2, startGateway } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const SCREENSHOT = process.env.SCREENSHOT ?? resolve(ROOT, "target/screenshots/chat-page.png");

test("the chat page streams a reply from the real model", async () => {
  const gateway = await startGateway(["--model", `v1=${SMOLLM2}`]);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--disable-quic"],
  });
  try {
    const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
    await page.goto(gateway.base);
    await page.waitForSelector("#version option", { state: "attached" }); // versions from /api/models
    await page.fill("#prompt", "Write a short poem about the sea.");
    await page.fill("#max-tokens", "64");
    await page.click("#send");

    // Record the reply's length as it grows: streamed text appears piece by piece.
    const reply = page.locator("[data-testid=reply] span");
    const lengths = new Set();
    const deadline = Date.now() + 120_000;
    while (Date.now() < deadline) {
      lengths.add((await reply.textContent()).length);
      if (await page.locator("[data-testid=reply][data-done=true]").count()) break;
      await page.waitForTimeout(20);
    }
    const text = await reply.textContent();
    assert.ok(await page.locator("[data-testid=reply][data-done=true]").count(), "the stream finished with [DONE]");
    assert.ok(text.trim().length > 20, `a reply appeared: ${JSON.stringify(text)}`);
    const partial = [...lengths].filter((n) => n > 0 && n < text.length);
    assert.ok(partial.length >= 2, `text grew incrementally (saw lengths ${[...lengths].join(",")})`);
    assert.match(await page.locator(".meta").textContent(), /tokens/);

    mkdirSync(dirname(SCREENSHOT), { recursive: true });
    await page.screenshot({ path: SCREENSHOT, fullPage: true });
  } finally {
    await browser.close();
    gateway.stop();
  }
});
