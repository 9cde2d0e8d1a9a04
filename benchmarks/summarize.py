"""Turn a pytest-benchmark JSON file into the markdown tables used in benchmarks/RESULTS.md.

    pytest benchmarks/ --benchmark-only --benchmark-json=bench.json
    python benchmarks/summarize.py bench.json [more.json ...]

One table per shape: rows are (mode, maps, impl) with median / min time, peak extra memory,
speedup vs eager (eager median / median) and memory vs eager (peak / eager's peak), both within the
same (mode, maps) row group. Nothing is estimated: rows
that were skipped (e.g. CUDA-only implementations on CPU) are simply absent.
"""
from __future__ import annotations

import json
import sys
from collections import OrderedDict

IMPL_ORDER = ["eager", "sdpa", "flex", "lfi_torch", "lfi_triton"]
MODE_ORDER = ["fwd", "fwd+bwd"]


def _fmt_ms(s: float) -> str:
    ms = s * 1e3
    return f"{ms:.3f}" if ms < 1 else (f"{ms:.2f}" if ms < 100 else f"{ms:.0f}")


def _fmt_mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f}"


def _ratio(a, b) -> str:
    if a is None or b in (None, 0):
        return "-"
    return f"{a / b:.2f}x"


def summarize(paths: list[str]) -> str:
    rows = []
    header = None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            e = b.get("extra_info", {})
            if "impl" not in e:
                continue
            rows.append((e, b["stats"]))
            if header is None:
                header = (e, data.get("datetime", "?"))
    if not rows:
        return "(no benchmark rows)\n"

    e0, when = header
    loads = [e.get("loadavg_1m") for e, _ in rows if e.get("loadavg_1m") is not None]
    out = [
        f"- device: {e0['device']} — {e0['device_name']}",
        f"- dtype: {e0['dtype']}; torch {e0.get('version_torch')}, triton {e0.get('version_triton')}, "
        f"lfi {e0.get('version_lfi')}, python {e0.get('version_python')}",
        f"- run: {when}",
        f"- memory: {e0.get('mem_method')}",
        f"- torch threads: {e0.get('torch_threads')}",
    ]
    if loads:
        out.append(f"- 1-minute load average during the run: {min(loads):.2f} .. {max(loads):.2f} "
                   "(includes this process)")
    out.append("")
    by_shape: "OrderedDict[str, list]" = OrderedDict()
    for e, st in rows:
        by_shape.setdefault(e["shape"], []).append((e, st))
    for shape, items in by_shape.items():
        e = items[0][0]
        out.append(f"### {shape}: B={e['B']}, H={e['H']}, M={e['M']}, N={e['N']}, D={e['D']} "
                   f"({e['kind']}-attention; one (B,H,M,N) map = {e['map_mib']:.1f} MiB)")
        out.append("")
        out.append("| mode | maps | impl | median ms | min ms | rounds | peak extra MiB | speedup vs eager "
                   "| mem vs eager |")
        out.append("|---|---|---|---:|---:|---:|---:|---:|---:|")
        eager = {(e["mode"], e["maps"]): (e, st) for e, st in items if e["impl"] == "eager"}

        def key(item):
            e = item[0]
            return (MODE_ORDER.index(e["mode"]) if e["mode"] in MODE_ORDER else 9, e["maps"],
                    IMPL_ORDER.index(e["impl"]) if e["impl"] in IMPL_ORDER else 9)

        for e, st in sorted(items, key=key):
            ref = eager.get((e["mode"], e["maps"]))
            t_ratio = _ratio(ref[1]["median"], st["median"]) if ref else "-"  # eager / impl
            m_ratio = _ratio(e.get("peak_mem_bytes"), ref[0].get("peak_mem_bytes")) if ref else "-"
            out.append(f"| {e['mode']} | {'yes' if e['maps'] else 'no'} | {e.get('label', e['impl'])} | "
                       f"{_fmt_ms(st['median'])} | {_fmt_ms(st['min'])} | {st['rounds']} | "
                       f"{_fmt_mib(e.get('peak_mem_bytes'))} | {t_ratio} | {m_ratio} |")
        out.append("")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    sys.stdout.write(summarize(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
