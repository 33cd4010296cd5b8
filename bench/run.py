"""All benchmarks in one run on one machine -> bench/results/summary.json, summary.md, performance.md and the
detailed adaptation.json, service.json, memory.json, growth.json (`make bench`).

    python -m bench.run --data data/demo --store model_store/demo [--full] [--out bench/results] [--quiet-load 2.5]
                        [--pin | --no-pin]

Quick mode (default) takes about 3 minutes on 2 cores (2026-12-01: 160 s at load 1.1-1.6, the HTTP part 37 s
of it); `--full` measures every location, more steps and sizes, and the memory of every smoke-pipeline
stage. Every number is stored with the 1-minute load average beside it: on shared cores, compare runs only
at similar load. `--quiet-load L --wait S` waits up to S seconds for the load to fall below L before starting.

The HTTP part (`bench.service`) starts a fresh server with cross-request batching on (the server's default)
and another with it off (WILDPDIFF_MAX_BATCH=1) and loads each with 1, 8 and 32 clients: /adapters as the
store's serving table chooses, /adapters with method=generate (DDIM), /classify with 16 frames. With >= 3
cores the clients run on the last core and the server on the others (`--pin` / `--no-pin` overrides that;
service.json's "pinning" says what was done). Where the server runs more than one torch thread, a third
server on one thread is measured too.

The targets (issues #7 and #17): speedup >= 10,000x (fine-tuning to the zoo's accuracy vs one generated adapter
per batch of 64); accuracy ratio >= 0.99 (generated / fine-tuned, test); generation <= 0.3 ms per adapter at
batch 64; /adapters p50 <= 30 ms (1 client, the server's defaults); /adapters requests/s at 32 clients >= 5 x
at 1 client (batching on, the server's defaults); /classify HTTP throughput >= 0.8 x the raw backbone's at
batch 16 (batching on, the best client count).
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from bench import adaptation, growth, memory, service
from bench.measure import clock, cpu_jiffies, load_average, machine, steal_share
from bench.tables import BATCHING_FIELDS, SIDES, performance_md, summary_md
from model_store.generator import GENERATOR_FILES
from model_store.store import Store

TARGETS = {  # name -> (target, "min" | "max")
    "speedup": (10_000, "min"),
    "accuracy_ratio": (0.99, "min"),
    "generate_ms_per_adapter_batch64": (0.3, "max"),
    "adapters_p50_ms": (30, "max"),
    "adapters_throughput_ratio_32v1": (5, "min"),
    "classify_http_vs_raw": (0.8, "min"),
}


def wait_for_quiet(limit: float, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while load_average() >= limit and time.monotonic() < deadline:
        time.sleep(10)
    if load_average() >= limit:
        print(f"warning: load average {load_average()} >= {limit}: timings will reflect the other work")


def targets(summary: dict) -> dict:
    table = {}
    for name, (target, kind) in TARGETS.items():
        value = summary[name]
        met = value >= target if kind == "min" else value <= target
        table[name] = {"target": target, "kind": kind, "value": value, "met": met, "value_over_target": value / target}
    return table


def throughput_ratio_32v1(levels: dict) -> float:
    """Requests/s at 32 clients over requests/s at 1 client."""
    return round(levels["32"]["requests_per_s"] / levels["1"]["requests_per_s"], 2)


def served(level: dict) -> str:
    """The method(s) the server said it served at a level (X-Method), e.g. knn_blend."""
    return ", ".join(sorted(level["x_method"])) or "?"


def summarise(meta: dict, adapt: dict, http: dict, mem: dict, grow: dict, sections: dict) -> dict:
    on, off = http["batching_on"], http["batching_off"]
    batch = f"classify_{service.CLASSIFY_BATCH}"
    best_clients, best = max(on[batch].items(), key=lambda item: item[1]["images_per_s"])
    best_off = max(off[batch].values(), key=lambda level: level["images_per_s"])
    # The raw reference is the backbone's best on this machine, whichever thread count gave it: with two
    # threads on busy shared cores a forward can be 100x slower than with one.
    raw_threads, raw_best = max(
        ((key, r["adapted_batch16"]) for key, r in adapt["raw_backbone"].items() if key.startswith("threads")),
        key=lambda item: item[1]["images_per_s"],
    )
    raw = raw_best["images_per_s"]
    recommended = adapt["recommended_steps"]
    summary = {
        **meta,
        "speedup": round(adapt["speedup"], 1),
        "speedup_batch1": round(adapt["speedup_batch1"], 1),
        "accuracy_ratio": round(adapt["accuracy_ratio"], 4),
        "adapters_p50_ms": on["adapters"]["1"]["p50_ms"],
        "adapters_method": served(on["adapters"]["1"]),
        "adapters_generate_p50_ms": on["adapters_generate"]["1"]["p50_ms"],
        "adapters_throughput_ratio_32v1": throughput_ratio_32v1(on["adapters"]),
        "adapters_generate_throughput_ratio_32v1": throughput_ratio_32v1(on["adapters_generate"]),
        "adapters_throughput_ratio_32v1_batching_off": throughput_ratio_32v1(off["adapters"]),
        "adapters_generate_throughput_ratio_32v1_batching_off": throughput_ratio_32v1(off["adapters_generate"]),
        "classify_http_vs_raw": round(best["images_per_s"] / raw, 3),
        "classify_http_vs_raw_batching_off": round(best_off["images_per_s"] / raw, 3),
        "steps": adapt["default_steps"],
        "recommended_steps": recommended,
        "finetune_seconds": round(adapt["finetune"]["seconds_mean_seen"], 3),
        "finetune_test_acc": round(adapt["finetune"]["test_acc_mean_seen"], 4),
        "generate_ms_batch1": adapt["generation"]["ms_batch1"],
        "generate_ms_per_adapter_batch64": adapt["generation"]["ms_per_adapter_batch64"],
        "generated_test_acc": round(adapt["generation"]["test_acc_mean_seen"], 4),
        "accuracy_ratio_vs_zoo": round(adapt["accuracy_ratio_vs_zoo"], 4),
        "at_recommended_steps": next(row for row in adapt["steps"] if row["steps"] == recommended),
        "classify_http_images_per_s": best["images_per_s"],
        "classify_http_clients": int(best_clients),
        "classify_http_vs_raw_1_client": round(on[batch]["1"]["images_per_s"] / raw, 3),
        "raw_images_per_s_batch16": raw,
        "raw_threads": int(raw_threads.removeprefix("threads")),
        "pinning": http["pinning"],
        "server_torch_threads": on["server"]["torch_threads"],
        "server_default_steps": on["server"]["default_steps"],  # DDIM steps of method=generate over HTTP
        "max_batch": on["server"]["max_batch"],
        "server_peak_rss_mib": round(on["server"]["peak_rss_mib"], 1),
        "generate_peak_rss_mib": mem["generate"]["peak_rss_mib"],
        "profile_share": adapt["profile"]["share"],
        "roles": adapt["roles"],
        "stage_peak_rss_mib": {name: r["peak_rss_mib"] for name, r in mem.get("smoke_pipeline", {}).items()},
        "growth": [
            {
                "params": r["params"],
                "checkpoints": r["checkpoints"],
                "vae_ms_per_step": r["vae"]["per_step_ms"],
                "fit_cpu_seconds_projected_demo_steps": r["fit_cpu_seconds_projected_demo_steps"],
                "generate_ms_batch1": r["generate_ms_batch1"],
            }
            for r in grow["adapter_size"] + grow["zoo_size"]
        ],
        "load": {  # the 1-minute load average when each headline figure was measured
            "speedup": next(row["load"] for row in adapt["steps"] if row["steps"] == adapt["default_steps"]),
            "adapters": on["adapters"]["1"]["load_before"],
            "adapters_32": on["adapters"]["32"]["load_before"],
            "classify": best["load_before"],
            "raw": raw_best["load_before"],
        },
        "sections": sections,
    }
    extra = f"adapters_generate_steps{recommended}"
    if extra in on:
        summary[f"adapters_generate_p50_ms_steps{recommended}"] = on[extra]["1"]["p50_ms"]
    if one := http.get("one_thread"):
        summary["adapters_p50_ms_one_thread"] = one["adapters"]["1"]["p50_ms"]
        summary["adapters_generate_p50_ms_one_thread"] = one["adapters_generate"]["1"]["p50_ms"]
        if extra in one:
            summary[f"adapters_generate_p50_ms_steps{recommended}_one_thread"] = one[extra]["1"]["p50_ms"]
        summary["server_one_thread_peak_rss_mib"] = one["server"]["peak_rss_mib"]
    # route -> clients -> batching "on" | "off" -> the figures of the README's batching table
    summary["batching"] = {
        route: {
            clients: {side: {f: http[f"batching_{side}"][route][clients][f] for f in BATCHING_FIELDS} for side in SIDES}
            for clients in on[route]
        }
        for route in ("adapters", "adapters_generate", batch)
    }
    summary["targets"] = targets(summary)
    summary["load_average"]["end"] = load_average()
    return summary


# -----------------------------------------------------------------------------
# markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="data/demo")
    parser.add_argument("--store", default="model_store/demo")
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--quiet-load", type=float, default=2.5, help="load average regarded as quiet")
    parser.add_argument("--wait", type=float, default=0, help="seconds to wait for a quiet machine first")
    parser.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        help="HTTP: server on all cores but the last, clients on the last (default: where there are >= 3 cores)",
    )
    args = parser.parse_args()
    store = Store(args.store)
    if missing := [f for f in GENERATOR_FILES if not store.has(f)]:
        raise SystemExit(f"error: {args.store} has no fitted generator ({missing[0]} missing): run `wildpdiff fit`")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wait_for_quiet(args.quiet_load, args.wait)

    def save(name: str, result: dict) -> dict:
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        return result

    meta = {
        "mode": "full" if args.full else "quick",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "store": args.store,
        "profile": store.manifest["profile"],
        "data": args.data,
        "load_average": {"start": load_average()},
    }
    jiffies = cpu_jiffies()
    pinning = service.plan_pinning(args.pin)
    server_threads = service.server_config({}, pinning)["torch_threads"]
    sections = {}
    with clock() as c:
        adapt = save("adaptation", adaptation.run(args.data, args.store, args.full, out, server_threads))
    sections["adaptation"] = c.to_dict()
    meta["store_id"] = adapt["store_id"]

    recommended = adapt["recommended_steps"]
    extra = (recommended,) if recommended != adapt["default_steps"] else ()
    n = 40 if args.full else 20  # requests per level, at least 3 per client
    with clock() as c:
        http = service.run(args.store, Path(args.data), n, out, pinning, extra_steps=extra)
    sections["service"] = c.to_dict()
    if server_threads > 1:
        # The same server on one torch thread: on shared cores, two threads can wait for each other.
        single = {"WILDPDIFF_TORCH_THREADS": "1"}
        with clock() as c:
            log = out / "server_one_thread.log"
            http["one_thread"] = service.measure_server(
                args.store, Path(args.data), n, log, single, pinning, clients=(1, 8), extra_steps=extra
            )
        sections["service_one_thread"] = c.to_dict()
    save("service", http)

    with clock() as c:
        mem = save("memory", memory.run(args.store, args.data, args.full, out))
    sections["memory"] = c.to_dict()
    with clock() as c:
        grow = save("growth", growth.run(args.store, args.full))
    sections["growth"] = c.to_dict()

    meta["cpu_steal_share"] = steal_share(jiffies, cpu_jiffies())
    summary = save("summary", summarise(meta, adapt, http, mem, grow, sections))
    (out / "performance.md").write_text(performance_md(summary))
    (out / "summary.md").write_text(summary_md(summary, adapt, http, mem, grow))
    print((out / "summary.md").read_text())


if __name__ == "__main__":
    main()
