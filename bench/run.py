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


HTTP_ROUTES = ("adapters", "classify")  # the prefixes of bench.service's route keys
SIDES = ("on", "off")  # batching, as bench.service's servers "batching_on" and "batching_off"
BATCHING_FIELDS = ("requests_per_s", "p50_ms", "p95_ms", "rejected_429")


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


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def performance_md(s: dict) -> str:
    """The README's short tables: the targets, then batching on / off per route and client count."""
    t, m, load = s["targets"], s["machine"], s["load"]
    steps, recommended, method = s["steps"], s["recommended_steps"], s["adapters_method"]
    http_steps = s["server_default_steps"]
    one_thread = "adapters_p50_ms_one_thread" in s
    rows = [
        (
            f"adapter: fine-tuning to the zoo's val accuracy vs generating ({steps} DDIM steps, batch 64)",
            f"{s['speedup']:,.0f}x ({s['finetune_seconds']:.2f} s vs {s['generate_ms_per_adapter_batch64']:.2f} ms)",
            ">= 10,000x",
            yes(t["speedup"]),
            load["speedup"],
        ),
        (
            "same, one adapter per call (batch 1)",
            f"{s['speedup_batch1']:,.0f}x ({s['generate_ms_batch1']:.1f} ms)",
            "",
            "",
            load["speedup"],
        ),
        (
            f"generation, ms per adapter at batch 64 ({steps} steps, 1 thread)",
            f"{s['generate_ms_per_adapter_batch64']:.3f} ms",
            "<= 0.3 ms",
            yes(t["generate_ms_per_adapter_batch64"]),
            load["speedup"],
        ),
        (
            "test accuracy, generated / fine-tuned (seen locations)",
            f"{s['accuracy_ratio']:.3f} ({s['generated_test_acc']:.3f} / {s['finetune_test_acc']:.3f})",
            ">= 0.99",
            yes(t["accuracy_ratio"]),
            "",
        ),
        (
            f"`/adapters` p50, 1 client, the store's serving table (served: {method})",
            f"{s['adapters_p50_ms']:.0f} ms"
            + (f" (1 torch thread: {s['adapters_p50_ms_one_thread']:.0f} ms)" if one_thread else ""),
            "<= 30 ms",
            yes(t["adapters_p50_ms"]),
            load["adapters"],
        ),
        (
            f"`/adapters` method=generate p50, 1 client, {http_steps} steps",
            f"{s['adapters_generate_p50_ms']:.0f} ms"
            + (f" (1 torch thread: {s['adapters_generate_p50_ms_one_thread']:.0f} ms)" if one_thread else ""),
            "",
            "",
            load["adapters"],
        ),
    ]
    if f"adapters_generate_p50_ms_steps{recommended}" in s:
        value = f"{s[f'adapters_generate_p50_ms_steps{recommended}']:.0f} ms"
        if one_thread:
            value += f" (1 torch thread: {s[f'adapters_generate_p50_ms_steps{recommended}_one_thread']:.0f} ms)"
        label = f"`/adapters` method=generate p50, 1 client, {recommended} steps (recommended)"
        rows.append((label, value, "", "", load["adapters"]))
    on = s["batching"]
    rows += [
        (
            f"`/adapters` ({method}) requests/s, 32 clients / 1 client, batching on",
            f"{s['adapters_throughput_ratio_32v1']:.2f} ({on['adapters']['32']['on']['requests_per_s']:.0f} vs "
            f"{on['adapters']['1']['on']['requests_per_s']:.0f}); batching off: "
            f"{s['adapters_throughput_ratio_32v1_batching_off']:.2f}",
            ">= 5",
            yes(t["adapters_throughput_ratio_32v1"]),
            load["adapters_32"],
        ),
        (
            f"same, method=generate ({http_steps} steps)",
            f"{s['adapters_generate_throughput_ratio_32v1']:.2f} "
            f"({on['adapters_generate']['32']['on']['requests_per_s']:.0f} vs "
            f"{on['adapters_generate']['1']['on']['requests_per_s']:.0f}); batching off: "
            f"{s['adapters_generate_throughput_ratio_32v1_batching_off']:.2f}",
            "",
            "",
            "",
        ),
        (
            f"`/classify` 16 frames: HTTP ({s['classify_http_clients']} clients, batching on) / raw backbone "
            f"({plural(s['raw_threads'], 'thread')})",
            f"{s['classify_http_vs_raw']:.2f} ({s['classify_http_images_per_s']:.0f} vs "
            f"{s['raw_images_per_s_batch16']:.0f} images/s); "
            f"batching off: {s['classify_http_vs_raw_batching_off']:.2f}",
            ">= 0.8",
            yes(t["classify_http_vs_raw"]),
            f"{load['classify']} / {load['raw']}",
        ),
        ("server peak RSS (batching on)", f"{s['server_peak_rss_mib']:.0f} MiB", "", "", ""),
    ]
    intro = (
        f"`make bench` ({s['mode']} mode, {s['created'][:10]}) on {m['cores']} x {m['cpu']}, torch {m['torch']}, "
        f"store `{s['store']}` ({s['profile']} profile). Load = the 1-minute load average when the figure was "
        f"taken (run: {s['load_average']['start']} at the start, {s['load_average']['end']} at the end)."
    )
    if s["cpu_steal_share"] is not None:
        intro += (
            f" The hypervisor stole {s['cpu_steal_share']:.0%} of the CPU time during the run: wall times are "
            f"about {1 / max(1e-3, 1 - s['cpu_steal_share']):.1f}x what the cores alone would give."
        )
    batching = [
        (
            route_label(route, method, http_steps),
            clients,
            *(f"{cell[side][f]:g}" for f in BATCHING_FIELDS for side in SIDES),
        )
        for route, levels in s["batching"].items()
        for clients, cell in levels.items()
    ]
    header = ("route", "clients", "req/s on", "req/s off", "p50 ms on", "p50 ms off", "p95 ms on", "p95 ms off")
    header += ("429s on", "429s off")
    return "\n".join(
        [
            intro,
            "",
            *table(("measure", "value", "target", "met", "load"), rows),
            f"Cross-request batching on (max_batch {s['max_batch']}) and off (WILDPDIFF_MAX_BATCH=1), each on a "
            f"fresh server with {plural(s['server_torch_threads'], 'torch thread')}; {pinning_sentence(s['pinning'])}",
            "",
            *table(header, batching),
        ]
    )


def route_label(route: str, method: str, steps: int) -> str:
    """A bench.service route key, e.g. adapters_generate_steps5, in words."""
    if route == "adapters":
        return f"`/adapters` (serving table: {method})"
    if route.startswith("adapters_generate"):
        route_steps = route.removeprefix("adapters_generate").removeprefix("_steps") or steps
        return f"`/adapters` method=generate ({route_steps} steps)"
    frames = int(route.removeprefix("classify_"))
    return f"`/classify` {frames} frame{'s' if frames > 1 else ''}"


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'s' if count != 1 else ''}"


def cores(numbers: list[int]) -> str:
    return f"core{'s' if len(numbers) > 1 else ''} {','.join(map(str, numbers))}"


def pinning_sentence(pinning: dict) -> str:
    if pinning["applied"]:
        return (
            f"the server ran on {cores(pinning['server_cores'])} (taskset), the clients on "
            f"{cores(pinning['client_cores'])} ({pinning['reason']})."
        )
    return f"server and clients shared the cores, not pinned ({pinning['reason']})."


def yes(target: dict) -> str:
    return "yes" if target["met"] else "no"


def table(header: tuple, rows: list[tuple]) -> list[str]:
    return [row(*header), row(*["---"] * len(header)), *(row(*r) for r in rows), ""]


def http_servers(http: dict) -> dict[str, dict]:
    """service.json's servers by their name in the tables."""
    servers = {"batching on": http["batching_on"], "batching off": http["batching_off"]}
    if "one_thread" in http:
        servers["batching on, 1 torch thread"] = http["one_thread"]
    return servers


def server_line(server: dict) -> str:
    return (
        f"{cores(server['cores'])}, {plural(server['torch_threads'], 'torch thread')}, max_batch "
        f"{server['max_batch']}, max_batch_wait_ms {server['max_batch_wait_ms']:g}, max_pending {server['max_pending']}"
    )


def summary_md(s: dict, adapt: dict, http: dict, mem: dict, grow: dict) -> str:
    lines = ["# Benchmarks", "", performance_md(s)]

    lines += ["## DDIM steps (seen locations)", ""]
    header = ("steps", "ms batch 1", "ms/adapter batch 64", "val acc", "test acc", "ratio", "speedup", "load")
    lines += table(
        header,
        [
            (r["steps"], r["ms_batch1"], r["ms_per_adapter_batch64"], f"{r['val_acc']:.4f}", f"{r['test_acc']:.4f}")
            + (f"{r['accuracy_ratio']:.4f}", f"{r['speedup']:,.0f}", r["load"])
            for r in adapt["steps"]
        ],
    )
    lines += [f"Recommended: {s['recommended_steps']} steps (the fewest within 0.5 points of {s['steps']} on val).", ""]

    lines += ["## Roles (test accuracy; fine-tuned = stopped at the zoo's val accuracy)", ""]
    header = ("role", "locations", "fine-tuned", "zoo mean", "generated", "reached target")
    lines += table(
        header,
        [
            (role, r["locations"], f"{r['finetune_test_acc']:.4f}", f"{r['zoo_test_acc']:.4f}")
            + (f"{r['generated_test_acc']:.4f}", f"{r['finetune_reached']}/{r['locations']}")
            for role, r in adapt["roles"].items()
        ],
    )

    lines += ["## HTTP (real servers, asyncio clients)", ""]
    servers = http_servers(http)
    lines += [f"- {name}: {server_line(report['server'])}" for name, report in servers.items()]
    pinning = pinning_sentence(http["pinning"])
    lines += ["", f"{pinning[0].upper()}{pinning[1:]} Requests per model call: the server's wildpdiff_batch_size.", ""]
    header = ("route", "clients", "server", "req/s", "p50 ms", "p95 ms", "p99 ms", "429s", "requests per model call")
    header += ("load",)
    rows = []
    routes = dict.fromkeys(route for report in servers.values() for route in report if route.startswith(HTTP_ROUTES))
    for route in routes:
        label = route_label(route, s["adapters_method"], s["server_default_steps"])
        for clients in dict.fromkeys(c for report in servers.values() for c in report.get(route, {})):
            for name, report in servers.items():
                if r := report.get(route, {}).get(clients):
                    calls = ", ".join(f"{kind} {mean:g}" for kind, mean in r["requests_per_model_call"].items())
                    rows.append((label, clients, name, r["requests_per_s"], r["p50_ms"], r["p95_ms"], r["p99_ms"]))
                    rows[-1] += (r["rejected_429"], calls, r["load_before"])
    lines += table(header, rows)

    raw = adapt["raw_backbone"]
    lines += [f"Raw backbone, images/s (the server runs {plural(raw['server_threads'], 'torch thread')}):", ""]
    decode = f"Decoding the 16 uploaded frames of a request (PNG -> uint8 batch) takes {raw['decode_batch16_ms']} ms."
    header = ("threads", "adapted batch 16", "plain batch 16", "adapted batch 1", "load")
    keys = ("adapted_batch16", "plain_batch16", "adapted_batch1")
    lines += table(
        header,
        [
            (key.removeprefix("threads"), *(r[k]["images_per_s"] for k in keys), r[keys[0]]["load_before"])
            for key, r in raw.items()
            if key.startswith("threads")
        ],
    )
    lines += [decode, ""]

    lines += ["## Peak memory (largest process of each stage)", ""]
    rows = [
        (f"server, {name} (whole HTTP run)", report["server"]["peak_rss_mib"], report["server"]["cpu_seconds"], "", "")
        for name, report in servers.items()
    ]
    stages = {
        "imports only": mem["imports"],
        "generate (store)": mem["generate"],
        **{f"smoke {k}": v for k, v in mem.get("smoke_pipeline", {}).items()},
    }
    rows += [(name, r["peak_rss_mib"], r["cpu_seconds"], r["seconds"], r["load_before"]) for name, r in stages.items()]
    lines += table(("stage", "peak RSS MiB", "CPU s", "wall s", "load"), rows)

    lines += ["## Growth (random vectors, 1 thread)", ""]
    header = ("rank x blocks", "params", "checkpoints", "VAE ms/step", "denoiser ms/step", "fit CPU s (demo steps)")
    header += ("gen ms batch 1", "gen ms/adapter b64", "load")
    lines += table(
        header,
        [
            (f"{r['rank']} x {r['blocks']}", r["params"], r["checkpoints"], r["vae"]["per_step_ms"])
            + (r["denoiser"]["per_step_ms"], r["fit_cpu_seconds_projected_demo_steps"], r["generate_ms_batch1"])
            + (r["generate_ms_per_adapter_batch64"], r["load_before"])
            for r in grow["adapter_size"] + grow["zoo_size"]
        ],
    )

    lines += [f"## Where one generation's time goes ({s['steps']} steps, batch 1, cProfile)", ""]
    lines += table(("part", "share"), [(name, f"{share:.0%}") for name, share in s["profile_share"].items()])
    lines += ["Top entries: profile_generation.txt.", ""]
    return "\n".join(lines)


# -----------------------------------------------------------------------------


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
