#!/usr/bin/env bash
# Run the gateway benchmarks side by side (`make bench` calls this). Three servers take the same
# load, one after the other: streamgate (mock engine, everything on), a bare actix-web SSE handler
# over the same mock tokens (the floor for a Rust server on this machine), and the FastAPI pattern.
# Every server is pinned to core 0 and the load generator to core 1 with taskset, so all servers
# get the same single core; `concurrency-2cores` repeats the 10,000-stream run with two HTTP
# workers per server and nothing pinned; `state` compares `--state memory` with Redis (a local
# redis-server); `two-models` runs two model versions at once with ONNX Runtime's threads spinning and sleeping; `proxy` puts a second streamgate in front of one as its OpenAI-compatible upstream. Results: target/bench/*.json and *.svg; a table with ratios is printed at the end.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
. scripts/pins.env
ort_lib=${ORT_DYLIB_PATH:-$root/.cache/onnxruntime/libonnxruntime.so.$ORT_VERSION}
out=target/bench
mkdir -p "$out"
bin=target/release
py=.venv/bin
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
SERVER_CPU=${SERVER_CPU:-0}
CLIENT_CPU=${CLIENT_CPU:-1}
WORKERS=1
pids=()
cleanup() { for p in "${pids[@]:-}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

wait_port() { for _ in $(seq 1 300); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 did not open" >&2; return 1; }

# The start functions set $server_pid (not `$(...)`: a command substitution would wait for the
# background server, which inherits its pipe).
# streamgate as deployed: rate limiting (quotas raised, still checked per request), CORS, JSON
# logs at info (to a file) and metrics on.
start_streamgate() { # port, extra args...
  local port=$1; shift
  taskset -c "$SERVER_CPU" "$bin/streamgate" --port "$port" --http-workers "$WORKERS" --listen-backlog 16384 \
    --rate-limit 1000000/s:1000000 --max-streams-per-client 1000000 --queue-capacity 100000 \
    --allowed-origins https://app.example.com "$@" > "$out/streamgate-$port.log" 2>&1 &
  server_pid=$!; pids+=("$server_pid"); wait_port "$port"
}
start_bare() { # port, tokens, interval_ms
  taskset -c "$SERVER_CPU" "$bin/actix-bare-sse" --port "$1" --workers "$WORKERS" --listen-backlog 16384 \
    --mock-tokens "$2" --mock-interval-ms "$3" > "$out/bare-$1.log" 2>&1 &
  server_pid=$!; pids+=("$server_pid"); wait_port "$1"
}
start_fastapi() { # port, tokens, interval_ms
  MOCK_TOKENS=$2 MOCK_INTERVAL_MS=$3 taskset -c "$SERVER_CPU" "$root/$py/python" -m uvicorn \
    --app-dir benches/baselines/fastapi app:app --loop uvloop --http httptools --port "$1" --workers "$WORKERS" \
    --backlog 16384 --log-level warning > "$out/fastapi-$1.log" 2>&1 &
  server_pid=$!; pids+=("$server_pid"); wait_port "$1"
}
load() { # label, url, pid, args...
  local label=$1 url=$2 pid=$3; shift 3
  taskset -c "$CLIENT_CPU" "$bin/streamgate-bench" --url "$url" --server-pid "$pid" --label "$label" --quiet \
    --json "$out/$label.json" --svg "$out/$label.svg" "$@"
}
stop() { kill "$1" 2>/dev/null || true; sleep 0.5; }

# The same load against streamgate (mock engine), the bare actix-web handler and the FastAPI
# baseline, one after the other.
compare() { # name, port, tokens, interval_ms, load-generator args...
  local name=$1 port=$2 tokens=$3 interval=$4; shift 4
  start_streamgate "$port" --engine mock --mock-tokens "$tokens" --mock-interval-ms "$interval"
  load "$name-streamgate" "http://127.0.0.1:$port" "$server_pid" --max-tokens "$tokens" --threads 2 "$@"
  stop "$server_pid"
  start_bare $((port + 1)) "$tokens" "$interval"
  load "$name-bare" "http://127.0.0.1:$((port + 1))" "$server_pid" --max-tokens "$tokens" --threads 2 "$@"
  stop "$server_pid"
  start_fastapi $((port + 2)) "$tokens" "$interval"
  load "$name-fastapi" "http://127.0.0.1:$((port + 2))" "$server_pid" --max-tokens "$tokens" --threads 2 "$@"
  stop "$server_pid"
}

scenario=${1:-all}
if [[ $scenario == all || $scenario == gateway ]]; then
  echo "== 1. gateway cost: zero-delay mock, 64 tokens, 64 concurrent streams, 10 s"
  compare gateway 18200 64 0 --concurrency 64 --duration-secs 10
fi
if [[ $scenario == all || $scenario == concurrency ]]; then
  echo "== 2. concurrency: mock at 50 ms per token, 40 tokens, 10,000 concurrent streams"
  compare concurrency 18210 40 50 --concurrency 10000 --requests 10000 --ramp-up-secs 2 --duration-secs 10
fi
if [[ $scenario == all || $scenario == concurrency-2cores ]]; then
  echo "== 2b. the same 10,000 streams with both cores: two HTTP workers per server, nothing pinned"
  SERVER_CPU=0,1 CLIENT_CPU=0,1 WORKERS=2 \
    compare concurrency-2cores 18240 40 50 --concurrency 10000 --requests 10000 --ramp-up-secs 2 --duration-secs 10
fi
if [[ $scenario == all || $scenario == overhead ]]; then
  echo "== 3. overhead: 1,000 requests/s open loop, zero-delay mock, 8 tokens, 10 s"
  compare overhead 18220 8 0 --rate 1000 --duration-secs 10
fi
if [[ $scenario == all || $scenario == model ]]; then
  echo "== 4. real model: SmolLM2, 64 tokens per stream, both cores, 1 / 4 / 16 concurrent streams"
  for c in 1 4 16; do
    "$bin/streamgate" --port 18230 --max-active-sequences 16 --queue-capacity 64 --rate-limit off \
      --max-streams-per-client 0 --model v1=.cache/models/smollm2-135m-instruct > "$out/model-$c.log" 2>&1 &
    pid=$!; pids+=("$pid"); wait_port 18230
    "$bin/streamgate-bench" --url http://127.0.0.1:18230 --server-pid "$pid" --label "model-c$c" --quiet \
      --json "$out/model-c$c.json" --svg "$out/model-c$c.svg" --concurrency "$c" --duration-secs 15 --max-tokens 64 \
      --prompt "Write a short poem about the sea." --prompt "Count from 1 to 300, separated by commas." \
      --prompt "Explain what a KV cache is."
    stop "$pid"
  done
fi
if [[ $scenario == all || $scenario == batching ]]; then
  echo "== 5. continuous batching: SmolLM2, 1 vs 16 streams, a 2,000-token prompt admitted, a second turn"
  "$bin/streamgate" --port 18250 --max-active-sequences 16 --queue-capacity 64 --rate-limit off \
    --max-streams-per-client 0 --model v1=.cache/models/smollm2-135m-instruct > "$out/batching.log" 2>&1 &
  pid=$!; pids+=("$pid"); wait_port 18250
  "$bin/batching-bench" --url http://127.0.0.1:18250 --model .cache/models/smollm2-135m-instruct \
    --text tests/data/quality_text.txt --svg "$out/batching.svg" > "$out/batching.json"
  stop "$pid"
  # The same 1-vs-16 comparison in-process (no HTTP, no load generator on the cores): the engine's share.
  "$bin/engine-bench" --model .cache/models/smollm2-135m-instruct --ort "$ort_lib" --tokens 96 --runs 1 --streams 16 \
    --prompt "$(printf '<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n<|im_start|>assistant\n')" \
    > "$out/batching-engine.json"
fi
if [[ $scenario == all || $scenario == two-models ]]; then
  echo "== 5b. two model versions on the same cores (v1 and v2, both SmolLM2), 4 streams on each at once: ONNX Runtime's threads spinning (--ort-spinning on) vs sleeping (off, what auto picks here)"
  for round in 1 2; do
    for spin in on off; do
      "$bin/streamgate" --port 18255 --max-active-sequences 8 --queue-capacity 64 --rate-limit off --max-streams-per-client 0 \
        --model v1=.cache/models/smollm2-135m-instruct --model v2=.cache/models/smollm2-135m-instruct \
        --ort-spinning "$spin" > "$out/two-models-$spin.log" 2>&1 &
      pid=$!; pids+=("$pid"); wait_port 18255
      loads=()
      for v in v1 v2; do
        "$bin/streamgate-bench" --url http://127.0.0.1:18255 --version "$v" --server-pid "$pid" --quiet --threads 1 \
          --label "two-models-$spin$round-$v" --json "$out/two-models-$spin$round-$v.json" --concurrency 4 \
          --duration-secs 20 --max-tokens 64 --prompt "Write a short poem about the sea." \
          --prompt "Count from 1 to 300, separated by commas." --prompt "Explain what a KV cache is." &
        loads+=("$!")
      done
      wait "${loads[@]}"
      stop "$pid"
    done
  done
fi
if [[ $scenario == all || $scenario == resume ]]; then
  echo "== 6. resumable streams, on (the default) vs off: the scenario-1 load (CPU per event) and 10,000 open streams (memory)"
  off=(--disconnect-grace-secs 0 --stream-retention-secs 0)
  for mode in on off; do
    extra=(); [[ $mode == off ]] && extra=("${off[@]}")
    start_streamgate 18260 --engine mock --mock-tokens 64 --mock-interval-ms 0 "${extra[@]}"
    load "resume-$mode-cpu" http://127.0.0.1:18260 "$server_pid" --max-tokens 64 --threads 2 --concurrency 64 --duration-secs 10
    stop "$server_pid"
    start_streamgate 18261 --engine mock --mock-tokens 40 --mock-interval-ms 50 "${extra[@]}"
    load "resume-$mode-memory" http://127.0.0.1:18261 "$server_pid" --max-tokens 40 --threads 2 \
      --concurrency 10000 --requests 10000 --ramp-up-secs 2 --duration-secs 10
    stop "$server_pid"
  done
fi
if [[ $scenario == all || $scenario == state ]]; then
  echo "== 7. shared state: --state memory vs redis:// (a local redis-server on the load generator's core): the scenario-1 load (CPU per event, Redis' own CPU too) and 1,000 requests/s (added time to first token)"
  redis_port=18279
  taskset -c "$CLIENT_CPU" redis-server --bind 127.0.0.1 --port "$redis_port" --save "" --appendonly no > "$out/redis.log" 2>&1 &
  redis_pid=$!; pids+=("$redis_pid"); wait_port "$redis_port"
  cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
  for mode in memory redis; do
    state=memory; [[ $mode == redis ]] && state="redis://127.0.0.1:$redis_port"
    start_streamgate 18270 --engine mock --mock-tokens 64 --mock-interval-ms 0 --state "$state"
    before=$(cpu_ticks "$redis_pid")
    load "state-$mode-cpu" http://127.0.0.1:18270 "$server_pid" --max-tokens 64 --threads 2 --concurrency 64 --duration-secs 10
    echo "{\"redis_cpu_s\": $(( $(cpu_ticks "$redis_pid") - before ))e-2}" > "$out/state-$mode-cpu.redis"
    stop "$server_pid"
    start_streamgate 18271 --engine mock --mock-tokens 8 --mock-interval-ms 0 --state "$state"
    load "state-$mode-overhead" http://127.0.0.1:18271 "$server_pid" --max-tokens 8 --threads 2 --rate 1000 --duration-secs 10
    stop "$server_pid"
  done
  redis-cli -p "$redis_port" info memory | grep -E '^used_memory:' > "$out/redis-memory.txt" || true
fi
if [[ $scenario == all || $scenario == proxy ]]; then
  echo "== 8. proxying: 1,000 requests/s of 8-token OpenAI streams, to the upstream (streamgate, mock engine) alone, then through a second streamgate in front of it (both on the server core)"
  start_streamgate 18290 --engine mock --mock-tokens 8 --mock-interval-ms 0
  upstream_pid=$server_pid
  load proxy-upstream-alone http://127.0.0.1:18290 "$upstream_pid" --route openai --max-tokens 8 --threads 2 --rate 1000 --duration-secs 10
  start_streamgate 18291 --model "v1=openai+http://127.0.0.1:18290/v1?model=v1"
  load proxy-through-front http://127.0.0.1:18291 "$server_pid" --route openai --max-tokens 8 --threads 2 --rate 1000 --duration-secs 10
  stop "$server_pid"; stop "$upstream_pid"
fi
"$py/python" benches/python/summary.py "$out"
