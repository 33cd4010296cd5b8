"""All benchmarks in one run on one machine -> bench/results/summary.json, summary.md, performance.md and the
detailed adaptation.json, service.json, memory.json, growth.json (`make bench`).

    python -m bench.run --data data/demo --store model_store/demo [--full] [--out bench/results] [--quiet-load 2.5]

Quick mode (default) fits in about 5 minutes on 2 idle cores; `--full` measures every location, more steps
and sizes, and the memory of every smoke-pipeline stage. Every number is stored with the 1-minute load
average beside it: on shared cores, compare runs only at similar load. `--quiet-load L --wait S` waits up to
S seconds for the load to fall below L before starting.

The targets (issue #7): speedup >= 10,000x (fine-tuning to the zoo's accuracy vs one generated adapter per
batch of 64), accuracy ratio >= 0.99 (generated / fine-tuned, test), /adapters p50 <= 50 ms (1 client,
the server's default steps), /classify HTTP throughput >= 0.8 x the raw backbone's at batch 16.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from pathlib import Path

from app.settings import Settings
from bench import adaptation, growth, memory, service
from bench.measure import clock, cpu_jiffies, load_average, machine, steal_share
from model_store.generator import GENERATOR_FILES
from model_store.store import Store

TARGETS = {  # name -> (target, "min" | "max")
    "speedup": (10_000, "min"),
    "accuracy_ratio": (0.99, "min"),
    "adapters_p50_ms": (50, "max"),
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


def summarise(meta: dict, adapt: dict, http: dict, mem: dict, grow: dict, sections: dict) -> dict:
    batch = f"classify_{service.CLASSIFY_BATCH}"
    best_clients, best = max(http[batch].items(), key=lambda item: item[1]["images_per_s"])
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
        "adapters_p50_ms": http["adapters"]["1"]["p50_ms"],
        "classify_http_vs_raw": round(best["images_per_s"] / raw, 3),
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
        "classify_http_vs_raw_1_client": round(http[batch]["1"]["images_per_s"] / raw, 3),
        "raw_images_per_s_batch16": raw,
        "raw_threads": int(raw_threads.removeprefix("threads")),
        "server_peak_rss_mib": round(http["server"]["peak_rss_mib"], 1),
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
            "adapters": http["adapters"]["1"]["load_before"],
            "classify": best["load_before"],
            "raw": raw_best["load_before"],
        },
        "sections": sections,
    }
    one = http["one_thread"]
    summary["adapters_p50_ms_one_thread"] = one["adapters"]["1"]["p50_ms"]
    if f"adapters_steps{recommended}" in http:
        summary[f"adapters_p50_ms_steps{recommended}"] = http[f"adapters_steps{recommended}"]["1"]["p50_ms"]
        summary[f"adapters_p50_ms_steps{recommended}_one_thread"] = one[f"adapters_steps{recommended}"]["1"]["p50_ms"]
    summary["server_one_thread_peak_rss_mib"] = one["server"]["peak_rss_mib"]
    summary["targets"] = targets(summary)
    summary["load_average"]["end"] = load_average()
    return summary


# -----------------------------------------------------------------------------
# markdown


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def performance_md(s: dict) -> str:
    """The README's short table."""
    t, m, load = s["targets"], s["machine"], s["load"]
    steps, recommended = s["steps"], s["recommended_steps"]
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
            "test accuracy, generated / fine-tuned (seen locations)",
            f"{s['accuracy_ratio']:.3f} ({s['generated_test_acc']:.3f} / {s['finetune_test_acc']:.3f})",
            ">= 0.99",
            yes(t["accuracy_ratio"]),
            "",
        ),
        (
            f"`/adapters` p50, 1 client, {steps} steps",
            f"{s['adapters_p50_ms']:.0f} ms (1 torch thread: {s['adapters_p50_ms_one_thread']:.0f} ms)",
            "<= 50 ms",
            yes(t["adapters_p50_ms"]),
            load["adapters"],
        ),
    ]
    if f"adapters_p50_ms_steps{recommended}" in s:
        value = f"{s[f'adapters_p50_ms_steps{recommended}']:.0f} ms"
        value += f" (1 torch thread: {s[f'adapters_p50_ms_steps{recommended}_one_thread']:.0f} ms)"
        rows.append((f"`/adapters` p50, 1 client, {recommended} steps (recommended)", value, "", "", load["adapters"]))
    rows += [
        (
            f"`/classify` 16 frames: HTTP ({s['classify_http_clients']} clients) / raw backbone "
            f"({s['raw_threads']} thread{'s' if s['raw_threads'] > 1 else ''})",
            f"{s['classify_http_vs_raw']:.2f} ({s['classify_http_images_per_s']:.0f} vs "
            f"{s['raw_images_per_s_batch16']:.0f} images/s)",
            ">= 0.8",
            yes(t["classify_http_vs_raw"]),
            f"{load['classify']} / {load['raw']}",
        ),
        ("server peak RSS", f"{s['server_peak_rss_mib']:.0f} MiB", "", "", ""),
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
    return "\n".join([intro, "", *table(("measure", "value", "target", "met", "load"), rows)])


def yes(target: dict) -> str:
    return "yes" if target["met"] else "no"


def table(header: tuple, rows: list[tuple]) -> list[str]:
    return [row(*header), row(*["---"] * len(header)), *(row(*r) for r in rows), ""]


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

    lines += ["## HTTP (real server, asyncio clients on the same cores)", ""]
    header = ("server", "route", "clients", "p50 ms", "p95 ms", "p99 ms", "req/s", "429s", "load")
    rows = []
    for server, routes in (("default", http), ("WILDPDIFF_TORCH_THREADS=1", http["one_thread"])):
        for route in (k for k in routes if k.startswith(("adapters", "classify"))):
            for clients, r in routes[route].items():
                rows.append((server, route, clients, r["p50_ms"], r["p95_ms"], r["p99_ms"], r["requests_per_s"]))
                rows[-1] += (r["rejected_429"], r["load_before"])
    lines += table(header, rows)

    raw = adapt["raw_backbone"]
    lines += [f"Raw backbone, images/s (the server runs {raw['server_threads']} torch threads):", ""]
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
        (f"{name} (whole HTTP run)", usage["peak_rss_mib"], usage["cpu_seconds"], "", "")
        for name, usage in (("server", http["server"]), ("server, 1 thread", http["one_thread"]["server"]))
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
    server_threads = Settings().intra_op_threads()
    sections = {}
    with clock() as c:
        adapt = save("adaptation", adaptation.run(args.data, args.store, args.full, out, server_threads))
    sections["adaptation"] = c.to_dict()
    meta["store_id"] = adapt["store_id"]

    recommended = adapt["recommended_steps"]
    extra = (recommended,) if recommended != adapt["default_steps"] else ()
    n = 40 if args.full else 20
    http: dict = {"server": {}}
    with clock() as c, service.serve(args.store, out / "server.log", http["server"]) as url:
        http |= service.measure(url, Path(args.data), n, extra_steps=extra)
    sections["service"] = c.to_dict()
    # The same server on one torch thread: on shared cores, two threads can wait for each other.
    http["one_thread"] = {"server": {}}
    single = {"WILDPDIFF_TORCH_THREADS": "1"}
    with clock() as c, service.serve(args.store, out / "server1.log", http["one_thread"]["server"], single) as url:
        http["one_thread"] |= service.measure(url, Path(args.data), n, clients=(1, 8), extra_steps=extra)
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
