"""Print the benchmark table (markdown) from target/bench/*.json, with ratios to the FastAPI and bare actix-web baselines."""

import json
import sys
from pathlib import Path

out = Path(sys.argv[1] if len(sys.argv) > 1 else "target/bench")
runs = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem not in ("engine", "batching", "batching-engine")}


def row(name: str) -> str:
    r = runs[name]
    cpu = r.get("server_cpu_us_per_event")
    kib = r.get("server_kib_per_open_stream")
    client = r.get("client_cpu_us_per_event")
    if cpu is None or kib is None:
        return f"| {name} | … |"
    return (f"| {name} | {r['streams']} | {r['completed']} | {r['status_503'] + r['status_429'] + r['other_status']} | "
            f"{r['events_per_s']:.0f} | {cpu:.2f} | {'–' if client is None else f'{client:.2f}'} | "
            f"{r['ttft_ms']['p50']:.1f} / {r['ttft_ms']['p99']:.1f} | "
            f"{r['inter_token_ms']['p50']:.1f} / {r['inter_token_ms']['p99']:.1f} | "
            f"{r['max_open_streams']} | {kib:.1f} |")


print("| run | streams | completed [DONE] | refused | events/s | server CPU µs/event | load generator CPU µs/event "
      "| TTFT p50 / p99 ms | gap p50 / p99 ms | max open | server KiB/open stream |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
for name in runs:
    print(row(name))
print()
for scenario in ("gateway", "concurrency", "concurrency-2cores", "overhead"):
    sg, bare, fa = (runs.get(f"{scenario}-{server}") for server in ("streamgate", "bare", "fastapi"))
    if not (sg and sg.get("server_cpu_us_per_event")):
        continue
    parts = []
    if fa and fa.get("server_cpu_us_per_event"):
        parts.append(f"server CPU per event FastAPI/streamgate = "
                     f"{fa['server_cpu_us_per_event'] / sg['server_cpu_us_per_event']:.1f}x; events/s streamgate/FastAPI = "
                     f"{sg['events_per_s'] / max(fa['events_per_s'], 1e-9):.2f}x; p99 TTFT FastAPI/streamgate = "
                     f"{fa['ttft_ms']['p99'] / max(sg['ttft_ms']['p99'], 1e-9):.1f}x")
    if bare and bare.get("server_cpu_us_per_event"):
        parts.append(f"server CPU per event streamgate/bare actix-web = "
                     f"{sg['server_cpu_us_per_event'] / bare['server_cpu_us_per_event']:.2f}x")
    if parts:
        print(f"- {scenario}: " + "; ".join(parts))
on, off = runs.get("resume-on-cpu"), runs.get("resume-off-cpu")
if on and off and on.get("server_cpu_us_per_event") and off.get("server_cpu_us_per_event"):
    print(f"- resume: server CPU per event on/off = {on['server_cpu_us_per_event'] / off['server_cpu_us_per_event']:.2f}x "
          f"({on['server_cpu_us_per_event']:.2f} / {off['server_cpu_us_per_event']:.2f} µs)")
on, off = runs.get("resume-on-memory"), runs.get("resume-off-memory")
if on and off and on.get("server_kib_per_open_stream") and off.get("server_kib_per_open_stream"):
    print(f"- resume: server memory per open stream on/off = {on['server_kib_per_open_stream']:.1f} / "
          f"{off['server_kib_per_open_stream']:.1f} KiB")
for spin in ("on", "off"):
    totals = [sum(runs[f"two-models-{spin}{r}-{v}"]["events_per_s"] for v in ("v1", "v2"))
              for r in (1, 2) if all(f"two-models-{spin}{r}-{v}" in runs for v in ("v1", "v2"))]
    if totals:
        print(f"- two models at once, --ort-spinning {spin}: " + ", ".join(f"{t:.1f}" for t in totals)
              + " tokens/s in all (v1 + v2)")
mem, red = runs.get("state-memory-cpu"), runs.get("state-redis-cpu")
if mem and red and mem.get("server_cpu_us_per_event") and red.get("server_cpu_us_per_event"):
    redis_file = out / "state-redis-cpu.redis"
    redis_cpu = json.loads(redis_file.read_text())["redis_cpu_s"] if redis_file.exists() else None
    events = red["token_events"]
    extra = (f"; redis-server's own CPU {redis_cpu * 1e6 / max(events, 1):.2f} µs/event"
             if redis_cpu is not None else "")
    print(f"- shared state: server CPU per event redis/memory = "
          f"{red['server_cpu_us_per_event'] / mem['server_cpu_us_per_event']:.2f}x "
          f"({red['server_cpu_us_per_event']:.2f} / {mem['server_cpu_us_per_event']:.2f} µs){extra}")
mem, red = runs.get("state-memory-overhead"), runs.get("state-redis-overhead")
if mem and red:
    print(f"- shared state at 1,000 requests/s: TTFT p50 / p99 redis {red['ttft_ms']['p50']:.2f} / "
          f"{red['ttft_ms']['p99']:.2f} ms vs memory {mem['ttft_ms']['p50']:.2f} / {mem['ttft_ms']['p99']:.2f} ms "
          f"(added p99 {red['ttft_ms']['p99'] - mem['ttft_ms']['p99']:.2f} ms)")
alone, front = runs.get("proxy-upstream-alone"), runs.get("proxy-through-front")
if alone and front:
    print(f"- proxying at 1,000 requests/s: TTFT p50 / p99 through the front {front['ttft_ms']['p50']:.2f} / "
          f"{front['ttft_ms']['p99']:.2f} ms vs the upstream alone {alone['ttft_ms']['p50']:.2f} / "
          f"{alone['ttft_ms']['p99']:.2f} ms: added p99 {front['ttft_ms']['p99'] - alone['ttft_ms']['p99']:.2f} ms "
          f"(target < 1 ms); the front's own CPU per event {front.get('server_cpu_us_per_event') or 0:.2f} µs "
          f"(the upstream's {alone.get('server_cpu_us_per_event') or 0:.2f} µs); completed {front['completed']} / {alone['completed']}")

batching = out / "batching.json"
if batching.exists():
    b = json.loads(batching.read_text())
    a, c = b["admission"], b["conversation"]
    print()
    print("| continuous batching (SmolLM2, gateway) | measured | ratio | target |")
    print("| --- | --- | --- | --- |")
    tokens = (f"; tokens {b['solo_tokens']} vs {b['batched_tokens']} of {b['tokens_per_stream']} per stream"
              if "solo_tokens" in b else "")
    print(f"| tokens/s, 1 stream vs {b['streams']} streams | {b['solo_tok_s']:.1f} vs {b['batched_tok_s']:.1f}{tokens} "
          f"| {b['aggregate_ratio']:.2f}x | >= 5x |")
    engine = out / "batching-engine.json"
    if engine.exists():
        e = json.loads(engine.read_text().splitlines()[0])
        print(f"| the same in-process (engine alone, no HTTP) | {e['solo_tok_s']:.1f} vs {e['batched_tok_s']:.1f}; "
              f"tokens {e['batched_tokens']} | {e['aggregate_ratio']:.2f}x | >= 5x |")
    print(f"| p99 inter-token gap, 1 vs {b['streams']} streams (ms) | {b['solo_gap_ms']['p99']:.1f} vs "
          f"{b['batched_gap_ms']['p99']:.1f} | {b['gap_p99_ratio']:.2f}x | <= 3x |")
    newcomer_ttft = f"{a['newcomer_ttft_ms'] / 1000:.1f} s" if a.get("newcomer_ttft_ms") else "failed"
    print(f"| p99 gap of a running stream without / while a {a['prompt_tokens']}-token prompt is admitted (ms) "
          f"| {a['gap_before_ms']['p99']:.1f} / {a['gap_during_ms']['p99']:.1f} (that prompt's TTFT "
          f"{newcomer_ttft}; {a.get('running_stream_tokens', '?')} tokens streamed) | {a['gap_p99_ratio']:.2f}x | <= 2x |")
    print(f"| TTFT, first turn ({c['first_turn_doc_tokens']}-token document) vs second turn (ms) "
          f"| {c['ttft_first_ms']:.0f} vs {c['ttft_second_ms']:.0f} | {c['ratio'] * 100:.1f} % | <= 25 % |")
    print(f"| failed streams | {b['errors']} | | 0 |")
