"""The markdown of `make bench` (bench/run.py): performance.md (the README's tables) and summary.md (every table)
from the run's summary and detailed results."""

from __future__ import annotations

HTTP_ROUTES = ("adapters", "classify")  # the prefixes of bench.service's route keys
SIDES = ("on", "off")  # batching, as bench.service's servers "batching_on" and "batching_off"
BATCHING_FIELDS = ("requests_per_s", "p50_ms", "p95_ms", "rejected_429")


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
