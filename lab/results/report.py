"""Human-facing text for the terminal: the comparison table and the run summary lines.

Reads only summary/comparison dicts; the HTML report with the plots is html_report.py.
"""

from __future__ import annotations

from typing import Any


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _snic_util(summary: dict[str, Any], node: str) -> float | None:
    nic = summary.get("nics", {}).get(node, {}).get("snic")
    return None if nic is None else nic.get("ingress_util")


def engine_nodes(summary: dict[str, Any]) -> list[str]:
    return sorted(n for n in summary.get("nics", {}) if n.startswith(("prefill", "decode")))


def _online_lines(s: dict[str, Any]) -> list[str]:
    arrival, slo = s.get("arrival", {}), s.get("slo", {})
    if arrival.get("mode") != "poisson" or slo.get("attained") is None:
        return []
    return [
        f"  online: {arrival['agents_per_s']:g} agents/s (real); "
        f"{100 * slo['attained']:.1f}% of turns within the SLO "
        f"(TTFT <= {slo['ttft_s']:g} s, TPOT <= {slo['tpot_ms']:g} ms, real-equivalent)"
    ]


def _ttft_lines(s: dict[str, Any]) -> list[str]:
    b = s.get("ttft_breakdown") or {}
    if not b.get("num_turns"):
        return []
    parts = "  ".join(
        f"{label} {_fmt(b[f'{key}_mean_s'], '.3f')} s ({100 * (b[f'{key}_share'] or 0):.0f}%)"
        for key, label in (("queue", "queued"), ("load", "KV load"), ("prefill", "prefill"))
    )
    return [f"  TTFT mean = {parts}"]


VERDICT_WORDS = {"healthy": "healthy", "host-bound": "HOST-BOUND", "unknown": "unknown"}
MAX_REASONS_SHOWN = 4


def health_lines(s: dict[str, Any]) -> list[str]:
    """One line with the emulation-health verdict, the worst timeline's step lateness p99 and
    the host's CPU use and pressure; a second with the reasons unless the run was healthy."""
    eh = s.get("emulation_health")
    if not isinstance(eh, dict):
        return []
    verdict = str(eh.get("verdict", "unknown"))
    head = VERDICT_WORDS.get(verdict, verdict)
    if s.get("allowed_host_bound"):
        head += " (accepted: --allow-host-bound)"
    parts = []
    worst = eh.get("worst") or {}
    if worst.get("rel_late_p99") is not None:
        parts.append(
            f"worst step lateness p99 {100 * worst['rel_late_p99']:.1f}% of the step "
            f"({str(worst['process']).replace('/', ' ')})"
        )
    host = eh.get("host") or {}
    busy = host.get("cpu_busy_pct") or {}
    if busy.get("mean") is not None:
        cpus = f" of {host['num_cpus']} CPUs" if host.get("num_cpus") else ""
        parts.append(f"host CPU {busy['mean']:.0f}% busy{cpus} (p90 {_fmt(busy['p90'], '.0f')}%)")
    if host.get("psi_cpu_some_share") is not None:
        parts.append(f"CPU pressure {100 * host['psi_cpu_some_share']:.0f}% of the time")
    lines = [f"  emulation: {head}" + (f"; {', '.join(parts)}" if parts else "")]
    reasons = [str(r) for r in eh.get("reasons") or ()]
    if verdict != "healthy" and reasons:
        more = len(reasons) - MAX_REASONS_SHOWN
        shown = "; ".join(reasons[:MAX_REASONS_SHOWN]) + (f"; {more} more" if more > 0 else "")
        lines.append(f"    {shown}")
    return lines


def _scaling_lines(s: dict[str, Any]) -> list[str]:
    sc = s.get("scaling")
    if not sc:
        return []
    how = f"auto ({', '.join(sc['auto'])})" if sc.get("auto") else "from the config"
    return [
        f"  scaling k {sc['bandwidth_scale']:g}, tau {sc['time_dilation']:g}: {how}",
    ]


def _fault_lines(s: dict[str, Any]) -> list[str]:
    """What the injected faults cost: bytes on pairs with a killed or restarted end, and the
    errors nodes recorded about lost peers."""
    ledger = s.get("byte_ledger") or {}
    lines = []
    if ledger.get("restarted"):
        lines.append(
            f"  restarted: {', '.join(ledger['restarted'])}; "
            f"{ledger['bytes_lost_to_faults']:,} bytes lost in flight or unreported on "
            f"{len(ledger['fault_pairs'])} pairs with a restarted end; every other pair balances"
            if ledger.get("balanced")
            else f"  restarted: {', '.join(ledger['restarted'])}"
        )
    if not ledger.get("balanced", True):
        bad = [*ledger.get("mismatched", []), *ledger.get("unmatched", [])]
        lines.append(f"  pairs that do not balance ({len(bad)}): {bad[0] if bad else ''}")
    rec = s.get("recovery")
    if rec:
        gaps = "  ".join(
            f"{n} {g:g} s" for n, g in rec["longest_read_gap_s"].items() if g is not None
        )
        lines.append(
            f"  after the first fault: longest read gap {gaps or '-'}; longest time without a "
            f"finished turn {_fmt(rec['longest_gap_between_turns_done_s'], 'g')} s"
        )
    faults = s.get("fault_errors") or {}
    if faults.get("count"):
        lines.append(f"  lost-peer errors caused by the faults: {faults['count']}")
    return lines


def summary_lines(s: dict[str, Any]) -> list[str]:
    lines = [
        f"policy {s['policy']} on {s['backend']}: {s['turns_done']} turns done, "
        f"{s['turns_failed']} failed",
        f"  JCT {s['jct_s']:.2f} s (real-equivalent {s['real_jct_s']:.3f} s), "
        f"{s['throughput_tokens_per_s'] / 1000:.1f}k tokens/s",
        *_scaling_lines(s),
        f"  TTFT p50 {_fmt(s['ttft_s']['p50'], '.3f')} s  p99 {_fmt(s['ttft_s']['p99'], '.3f')} s"
        f"   TTST p50 {_fmt(s['ttst_s']['p50'], '.3f')} s"
        f"   TPOT p50 {_fmt(s['tpot_ms']['p50'], '.1f')} ms",
        *_ttft_lines(s),
        *_online_lines(s),
        f"  KV bytes: {s['bytes_storage_read']:,} read from storage + {s['bytes_relayed']:,} "
        f"relayed; {s['bytes_verified']:,} verified "
        f"({'all accounted' if s['bytes_accounted'] else 'MISMATCH'})",
        *_fault_lines(s),
    ]
    lines += [*_balance_lines(s), *_nic_lines(s), *health_lines(s)]
    if s["errors"]:
        lines.append(f"  errors ({len(s['errors'])}): {s['errors'][0]}")
    return lines


def _balance_lines(s: dict[str, Any]) -> list[str]:
    """The storage-NIC read balance and the prefill attention balance, when measured."""
    lines = []
    bal = s.get("snic_balance", {})
    if bal.get("whole_run") is not None:
        lines.append(
            f"  snic read balance (max/avg over {bal['num_nodes']} engine nodes): "
            f"{bal['whole_run']:.2f} over the run, {_fmt(bal['mean_interval'])} per interval"
        )
        if bal.get("mean_window") is not None:
            lines.append(
                f"    busy part ({_fmt(bal['busy_s'], '.1f')} s to "
                f"{100 * bal['busy_fraction']:.0f}% of the reads): "
                f"{_fmt(bal['mean_window'])} mean over {bal['num_windows']} windows of "
                f"{bal['window_s']:g} s (worst {_fmt(bal['max_window'])}), "
                f"{_fmt(bal['busy'])} over the busy part"
            )
    att = s.get("attention_balance", {})
    if att.get("mean") is not None:
        lines.append(
            f"  prefill attention max/avg across GPUs per step: early "
            f"{_fmt(att['early_all_busy_mean'])} (all GPUs busy; median "
            f"{_fmt(att.get('early_all_busy_p50'))}) / {_fmt(att['early_mean'])} "
            f"(all steps), whole run {_fmt(att['all_busy_mean'])} / {_fmt(att['mean'])}"
        )
    return lines


def _nic_lines(s: dict[str, Any]) -> list[str]:
    """Each engine node's shaped NICs' utilisation, in and out."""
    lines = []
    for node in engine_nodes(s):
        nics = s["nics"][node]
        parts = []
        for nic in ("snic", "cnic"):
            n = nics.get(nic)
            if n and n.get("rate_mbit"):
                parts.append(
                    f"{nic} in {100 * (n['ingress_util'] or 0):5.1f}% "
                    f"out {100 * (n['egress_util'] or 0):5.1f}% of {n['rate_mbit']:g} Mbit/s"
                )
        if parts:
            lines.append(f"  {node:10s} " + "   ".join(parts))
    return lines


def comparison_table(cmp: dict[str, Any]) -> str:
    runs = cmp["runs"]
    nodes = engine_nodes(runs["basic"])
    head = ["policy", "JCT s", "speedup", "tok/s", "TTFT p50 s", "TPOT p50 ms"]
    head += [f"{n} snic" for n in nodes]
    head += ["verified", "errors", "emulation"]
    rows = [head]
    base = runs["basic"]["jct_s"]
    for policy in [p for p in ("basic", "dualpath", "oracle") if p in runs]:
        s = runs[policy]
        row = [
            policy,
            f"{s['jct_s']:.2f}",
            f"{base / s['jct_s']:.2f}x",
            f"{s['throughput_tokens_per_s']:.0f}",
            _fmt(s["ttft_s"]["p50"], ".3f"),
            _fmt(s["tpot_ms"]["p50"], ".1f"),
        ]
        for n in nodes:
            u = _snic_util(s, n)
            row.append("-" if u is None else f"{100 * u:.0f}%")
        row.append("ok" if s["bytes_accounted"] else "MISMATCH")
        row.append(str(len(s["errors"])))
        verdict = (s.get("emulation_health") or {}).get("verdict", "unknown")
        accepted = " (accepted)" if s.get("allowed_host_bound") else ""
        row.append(VERDICT_WORDS.get(verdict, str(verdict)) + accepted)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    out = []
    for i, r in enumerate(rows):
        out.append(
            "  ".join(
                c.rjust(w) if j else c.ljust(w)
                for j, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    names = {
        "dualpath_over_basic": "DualPath over Basic",
        "oracle_over_basic": "Oracle over Basic",
        "oracle_over_dualpath": "Oracle over DualPath",
    }
    out.append("")
    out.append("   ".join(f"{names[k]}: {v:.2f}x" for k, v in cmp["speedup"].items() if k in names))
    return "\n".join(out)
