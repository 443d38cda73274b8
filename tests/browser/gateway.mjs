// Start the real streamgate binary on 127.0.0.1:0 and read its bound address from the JSON
// "listening" log line. Shared by the browser and client-library tests.
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { resolve } from "node:path";

export const ROOT = resolve(import.meta.dirname, "../..");
export const BIN = process.env.STREAMGATE_BIN ?? resolve(ROOT, "target/debug/streamgate");
export const SMOLLM2 = resolve(ROOT, ".cache/models/smollm2-135m-instruct");
export const TINY = resolve(ROOT, "models/tiny-llama");

export async function startGateway(args = []) {
  const child = spawn(BIN, ["--host", "127.0.0.1", "--port", "0", ...args], {
    cwd: ROOT,
    stdio: ["ignore", "pipe", "pipe"],
  });
  const logs = [];
  let stderr = "";
  child.stderr.on("data", (d) => { stderr += d; });
  const lines = createInterface({ input: child.stdout });
  const address = await new Promise((resolveAddress, reject) => {
    const timer = setTimeout(() => reject(new Error(`gateway did not start: ${stderr}`)), 120_000);
    child.on("exit", (code) => reject(new Error(`gateway exited with ${code}: ${stderr}`)));
    lines.on("line", (line) => {
      const record = JSON.parse(line);
      logs.push(record);
      if (record.msg === "listening") {
        clearTimeout(timer);
        resolveAddress(record.address);
      }
    });
  });
  return {
    base: `http://${address}`,
    logs,
    stop() { child.kill("SIGKILL"); },
  };
}

// A real redis-server (Debian's package; `make test` installs it) on a free loopback port, for
// replicas that share state (`--state redis://…`). Resolves once it accepts connections.
export async function startRedis() {
  const { createServer } = await import("node:net");
  const port = await new Promise((resolvePort, reject) => {
    const probe = createServer();
    probe.on("error", reject);
    probe.listen(0, "127.0.0.1", () => {
      const { port } = probe.address();
      probe.close(() => resolvePort(port));
    });
  });
  const child = spawn("redis-server", ["--bind", "127.0.0.1", "--port", String(port), "--save", "", "--appendonly", "no"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  await new Promise((ready, reject) => {
    const timer = setTimeout(() => reject(new Error(`redis-server did not start: ${output}`)), 20_000);
    child.on("error", (e) => reject(new Error(`redis-server could not run (make test installs it): ${e.message}`)));
    child.on("exit", (code) => reject(new Error(`redis-server exited with ${code}: ${output}`)));
    child.stdout.on("data", (d) => {
      output += d;
      if (output.includes("Ready to accept connections")) {
        clearTimeout(timer);
        ready();
      }
    });
  });
  return {
    url: `redis://127.0.0.1:${port}`,
    stop() { child.kill("SIGKILL"); },
  };
}
