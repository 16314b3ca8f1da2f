"""The targets, checked on one run's results, and the table the bench prints."""

from __future__ import annotations

from typing import Any


def _ratio(numerator: float, denominator: float) -> float | None:
    # An added cost at or below zero is noise larger than the cost (a short run): no ratio.
    return numerator / denominator if numerator >= 0 and denominator > 0 else None


def check_targets(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target: the measured value (a ratio where the issue states one), its bound, met or not."""
    hook, ratio, e2e = results["hook_us"], results["server_rps_ratio"], results["e2e_events_per_s"]
    cpu = results["server_cpu_us_per_event"]
    checks = {
        "server CPU per event ours/floor <= 3": (_ratio(cpu["ours"], cpu["floor"]), "<=", 3.0),
        "hook ours/segment p50 <= 1 (aim 0.5)": (_ratio(hook["ours"]["p50"], hook["segment"]["p50"]), "<=", 1.0),
        "hook ours/segment p99 <= 1": (_ratio(hook["ours"]["p99"], hook["segment"]["p99"]), "<=", 1.0),
        "server rps enabled/disabled >= 0.97": (ratio["enabled"], ">=", 0.97),
        "server rps broker_down/disabled >= 0.95": (ratio["broker_down"], ">=", 0.95),
        "e2e ours/segment >= 1.26": (_ratio(e2e["ours"], e2e["segment"]), ">=", 1.26),
        "delivery latency p50 < 1000 ms": (results["delivery_latency_ms"]["p50"], "<", 1000.0),
        "worker RSS < 150 MB": (results["worker_rss_mb"], "<", 150.0),
    }
    met = {"<=": lambda v, b: v <= b, ">=": lambda v, b: v >= b, "<": lambda v, b: v < b}
    # A value that could not be measured is no target met.
    return {name: {"value": None if value is None else round(value, 3), "bound": f"{op} {bound:g}",
                   "met": value is not None and met[op](value, bound)}
            for name, (value, op, bound) in checks.items()}


def format_table(results: dict[str, Any]) -> str:
    hook, rps, e2e = results["hook_us"], results["server_rps"], results["e2e_events_per_s"]
    latency = results["delivery_latency_ms"]
    cpu = results["server_cpu_us_per_event"]
    rows = [
        ("server_cpu_us_per_event off (the loop itself)", f"{cpu['off']:.1f} µs"),
        ("server_cpu_us_per_event added: ours / segment / floor",
         f"{cpu['ours']:.1f} / {cpu['segment']:.1f} / {cpu['floor']:.1f} µs"),
        ("hook_us ours p50 / p99", f"{hook['ours']['p50']:.1f} / {hook['ours']['p99']:.1f} µs"),
        ("hook_us segment p50 / p99", f"{hook['segment']['p50']:.1f} / {hook['segment']['p99']:.1f} µs"),
        ("hook_us apply_async p50 / p99", f"{hook['apply_async']['p50']:.1f} / {hook['apply_async']['p99']:.1f} µs"),
        ("server_rps disabled / enabled / broker_down (half a CPU each)",
         f"{rps['disabled']:.0f} / {rps['enabled']:.0f} / {rps['broker_down']:.0f} req/s"),
        *((f"server_rps_ratio {name} / disabled, same moments", f"{value:.3f}")
          for name, value in results["server_rps_ratio"].items()),
        ("e2e_events_per_s ours", f"{e2e['ours']:.0f} events/s"),
        ("e2e_events_per_s segment", f"{e2e['segment']:.0f} events/s"),
        ("delivery_latency_ms p50 / p99", f"{latency['p50']:.0f} / {latency['p99']:.0f} ms"),
        ("worker_rss_mb", f"{results['worker_rss_mb']:.1f} MB"),
        ("machine", results["machine"]),
    ]
    details = results.get("details", {})
    cpu = details.get("server_cpu_us_per_request", {})
    rows += [(f"extra: server CPU per request, {name}", f"{value:.0f} µs") for name, value in cpu.items()]
    rows += [(f"extra: server_rps {name}", f"{value:.0f} req/s")
             for name, value in details.get("server_rps_all", {}).items() if name not in rps]
    rows += [(f"extra: e2e_events_per_s {name}", f"{value:.0f} events/s")
             for name, value in details.get("e2e_events_per_s_all", {}).items() if name not in e2e]
    width = max(len(name) for name, _ in rows)
    lines = [f"| {'measure':<{width}} | value |", f"|{'-' * (width + 2)}|-------|"]
    lines += [f"| {name:<{width}} | {value} |" for name, value in rows]
    lines += ["", f"| {'target':<44} | value | met |", f"|{'-' * 46}|-------|-----|"]
    lines += [f"| {name:<44} | {'n/a' if check['value'] is None else format(check['value'], 'g')} | "
              f"{'yes' if check['met'] else 'NO'} |"
              for name, check in results.get("targets", {}).items()]
    return "\n".join(lines)
