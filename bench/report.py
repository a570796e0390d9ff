#!/usr/bin/env python
"""Every benchmark figure of the project in one page: ``bench/REPORT.md``.

By default it collects the latest committed results (``bench/results/*.json``); ``--run`` first runs every
benchmark on this machine (about 25 minutes, the fault-injection suite included). Each table puts the measured
ratio next to its target.

    python bench/report.py          # collect
    python bench/report.py --run    # measure everything again, then collect
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
BENCHMARKS = ("storage_bench.py", "model_bench.py", "server_bench.py", "engine_bench.py", "flow_bench.py",
              "engines_bench.py", "hf_bench.py", "delta_bench.py", "sync_tail.py", "chaos.py")
GiB, MiB = 1 << 30, 1 << 20


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def verdict(ok: bool | None) -> str:
    return "—" if ok is None else ("met" if ok else "**missed**")


def storage_section(d: dict) -> list[str]:
    rows = []
    for r in d["rows"]:
        if r.get("ratio") is None or r.get("skipped"):
            continue
        target = (f">= {r['at_least']}x" if r.get("at_least") else f"<= {r['at_most']}x" if r.get("at_most") else "—")
        rows.append([f"{r['size_gib']:g}", r["section"], r["method"], f"{r['ratio']:.2f}x vs {r['baseline']}",
                     target, verdict(r.get("meets_target")), r.get("note") or ""])
    return md_table(["GiB", "area", "method", "measured", "target", "", "note"], rows)


def model_section(d: dict) -> list[str]:
    rows = [[f"greedy decode {r['model']} {r['dtype']}", f"{r['cached_tok_s']:.1f} tok/s",
             f"{r['ratio']:.2f}x recompute-per-token" if "ratio" in r else "—", "—", "—"] for r in d["decode"]]
    for r in d["weight_apply"]:
        rows.append([f"cast_copy_ {r['params_bytes'] / GiB:.0f} GiB bf16 from f32, {r['tensor_bytes'] / MiB:.0f} MiB "
                     "tensors", f"{r['cast_copy_s']:.2f} s, peak +{r['cast_copy_peak_MiB']:.1f} MiB",
                     f"{r['speed_ratio']:.2f}x assign(astype) speed; its peak +{r['assign_astype_peak_MiB']:.0f} MiB",
                     "no full-size temporary",
                     verdict(r["cast_copy_peak_MiB"] < r["assign_astype_peak_MiB"] / 2)])
    return md_table(["measure", "figure", "ratio in the same run", "target", ""], rows)


def gpu_section(d: dict | None) -> list[str]:
    if d is None:
        return ["Not run: no GPU has been lent to this project yet. `python bench/gpu_check.py` is ready (it is "
                "smoke-tested under Triton's interpreter in CI); no GPU figure here is claimed."]
    rows = [[r["op"], "yes" if r["ok"] else "NO", f"{r['GB/s']:.0f} GB/s",
             f"{r['frac_of_rated']:.2f}" if r["frac_of_rated"] is not None else "n/a", ">= 0.7",
             verdict(r["frac_of_rated"] >= 0.7 if r["frac_of_rated"] is not None else None)] for r in d["kernels"]]
    return [f"Device: {d['device']}; oracle: {d['oracle']}.", ""] + md_table(
        ["kernel", "matches reference", "bandwidth", "of rated", "target", ""], rows) + [
        "", "Decode tokens/s (small): " + ", ".join(f"{k}: {v:,.0f}" for k, v in d["decode_tokens_per_s"].items())]


def server_section(d: dict) -> list[str]:
    rows = []
    for r in d["updates"]:
        rows.append([r["mode"], f"update {r['model']} ({r['snapshot_bytes'] / GiB:.2f} GiB)",
                     f"{r['ratio_to_bare_load']:.2f}x bare load_snapshot ({r['update_s_median']:.2f} s vs "
                     f"{r['bare_load_s']:.2f} s)", "~1x", verdict(r["ratio_to_bare_load"] <= 1.25)])
        rows.append([r["mode"], "peak RSS", f"{r['peak_in_models']:.2f}x the model",
                     "~1x in_place, ~2x double_buffer",
                     verdict(r["peak_in_models"] <= (1.25 if r["mode"] == "in_place" else 2.25))])
        rows.append([r["mode"], "back to the previous version", f"{r['rollback_wall_s']:.2f} s", "—", "—"])
    for r in d["completions"]:
        q, b = r["quiet"], r["during_updates"]
        rows.append([r["mode"], f"completions ({r['model']}, {r['clients']} clients)",
                     f"{b['req_s']:.2f} req/s during {r['updates_done']} updates vs {q['req_s']:.2f} quiet "
                     f"({r['req_s_ratio']:.2f}x); p99 {b['p99_s']:.2f} s vs {q['p99_s']:.2f} s",
                     "0 errors", verdict(q["errors"] + b["errors"] + r["update_failures"] == 0)])
    return md_table(["mode", "measure", "measured", "target", ""], rows)


def engine_section(d: dict) -> list[str]:
    hf = {r["batch"]: r for r in d["transformers"]}
    rows = [[r["path"], str(r["concurrency"]), f"{r['tokens_per_s']:.0f}",
             f"{r['ttft_s']['p50']:.3f} / {r['ttft_s']['p99']:.3f}", f"{r['burst_ttft_p99_s']:.3f}",
             f"{r['itl_s']['p50']:.3f} / {r['itl_s']['p99']:.3f}",
             f"{hf[r['concurrency']]['tokens_per_s']:.0f}" if r["concurrency"] in hf else "—"] for r in d["rows"]]
    checks = [[t["measure"], f"{t['value']:.2f}", t["target"], verdict(t["met"])] for t in d["targets"]]
    return [f"`{d['model']}` float32, {d['workload']}; transformers: same weights (logits within "
            f"{d['logit_max_abs_diff_vs_transformers']:.1e}), static batches.", ""] + md_table(
        ["path", "concurrency", "output tok/s", "TTFT p50 / p99 s (steady)", "start-up burst TTFT p99 s",
         "ITL p50 / p99 s", "transformers tok/s"], rows) + [
        ""] + md_table(["measure", "measured", "target", ""], checks)


def flow_section(d: dict) -> list[str]:
    rows = []
    for s in d["syncs"]:
        m = s["median"]
        rows.append([s["model"], f"{s['checkpoint_bytes'] / GiB:.2f}", str(len(s["runs"])), f"{m['raw_copy_s']:.2f}",
                     f"{m['flow_s']:.2f} ({s['flow_over_copy']:.2f}×)", f"{m['publish_s']:.2f}",
                     f"{m['server_load_s']:.2f}", f"{m['orchestration_s']:.2f}",
                     f"{s['seconds_per_gib']['publish_s']:.2f} / {s['seconds_per_gib']['server_load_s']:.2f}",
                     f"{s['first_sync_s']:.1f}"])
    g, v, dep = d["goals"], d["verdicts"], d["deployment"]
    return md_table(["model", "GiB", "runs", "raw copy s", "sync s (/ copy)", "publish s", "slower load s",
                     "orchestration s", "publish / load s per GiB", "first sync s"], rows) + [
        "", f"Deployment runs under `baton deploy` ({len(dep['runs'])}, created through the API): started "
            f"{dep['median']['start_s']:.2f} s after creation (median; max {dep['max_start_s']:.2f} s), ran "
            f"{dep['median']['run_s']:.2f} s.", "",
        *md_table(["goal", "target", ""], [
            ["orchestration of a warm sync", f"≤ {g['orchestration_s']} s", verdict(v["orchestration_s"])],
            [f"sync of {d['syncs'][0]['model']} vs raw copy", f"≤ {g['flow_over_copy']}×",
             verdict(v["flow_over_copy"])],
            ["deployment run start", f"≤ {g['deploy_start_s']} s", verdict(v["deploy_start_s"])]])]


def engines_section(d: dict) -> list[str]:
    rows = [[r["step"], f"{r['bytes'] / GiB:.2f}", f"{r['baton_s']:.3f}", f"{r['copy_s']:.3f}", f"{r['ratio']:.2f}×",
             f"{r['baton_cached_s']:.3f} / {r['copy_cached_s']:.3f} = {r['ratio_cached']:.2f}×"] for r in d["rows"]]
    return [f"{d['model']}, parts of {d['part_bytes'] >> 20} MiB, best of {d['repeats']}; the baseline is "
            "`shutil.copyfile` of the same part files, run in turns with Baton's step in the same run, each after "
            "`os.sync()` and timed until `os.sync()` returns again (bytes on disk); the last column stops the clock "
            "when the call returns (bytes in the page cache). FastDeploy's target is at most 1.3× the copy.",
            ""] + md_table(["step", "GiB", "Baton s", "copy s", "Baton / copy", "in page cache"], rows)


def hf_section(d: dict) -> list[str]:
    m = d["model"]
    rows = []
    for r in d["rows"]:
        for c in r["decode"]:
            rows.append([r["dtype"], f"{r['bytes'] / GiB:.2f}", f"{r['load_s']['transformers']:.2f}",
                         f"{r['load_s']['baton_snapshot']:.2f} ({r['load_ratio_snapshot']:.2f}×)",
                         f"{r['load_s']['baton_model_dir']:.2f} ({r['load_ratio_model_dir']:.2f}×)",
                         str(c["concurrency"]), f"{c['baton_tokens_per_s']:.1f}",
                         f"{c['transformers_tokens_per_s']:.1f}",
                         f"{c['ratio']:.2f}×", f"{c['same_greedy_tokens']}/{c['concurrency']}"])
    return [f"`{d['command']}`: Qwen2, {m['num_hidden_layers']} layers, hidden {m['hidden_size']}, vocabulary "
            f"{m['vocab_size']} (Qwen2.5-0.5B's shape), random weights saved by `transformers`. Load: seconds until "
            "the model has computed its first logits, each in a fresh process (ratio: `transformers` time over "
            "Baton's). Decode: greedy tokens/s, Baton's engine vs `transformers.generate` (one static batch).", ""] + \
        md_table(["dtype", "GiB", "load: transformers s", "Baton from snapshot s", "Baton from the dir s",
                  "concurrency", "Baton tok/s", "transformers tok/s", "ratio", "same greedy tokens"], rows)


def delta_rows(d: dict) -> list[list[str]]:
    """One row per learning rate (medians over the steps): also the README's table."""
    return [[f"{s['lr']:g}", f"{s['changed_elements']:.2%}", f"{s['deltas']}/{s['steps']}",
             f"{s['bytes_ratio']:.1%}", f"{s['server_read_ratio']:.1%}",
             f"{s['publish_full_s']:.2f} / {s['publish_delta_s']:.2f}",
             f"{s['update_full_s']:.2f} / {s['update_delta_s']:.2f}",
             f"{s['sync_full_s']:.2f} / {s['sync_delta_s']:.2f}", f"{s['sync_ratio']:.2f}×",
             f"{s['sync_ratio_total']:.2f}×"] for s in d["summary"]]


DELTA_HEADER = ["Adam lr", "bf16 elements changed", "deltas", "delta / full bytes", "server reads",
                "publish s full / delta", "server update s full / delta", "sync s full / delta",
                "delta / full sync (median step)", "over the trajectory"]


def delta_section(d: dict) -> list[str]:
    targets = [f"{k}: {v['value']:.3f} (≤ {v['target']}) {verdict(v['met'])}" for k, v in d["targets"].items()]
    return [f"`{d['command']}`: the demo's trainer on a Qwen2 of the {d['model']} sizes, float32 master weights "
            f"and Adam, publishing bf16 to {d['servers']} `baton serve` servers; {d['summary'][0]['steps']} real "
            "policy-gradient steps per learning rate. Every step is published in full (the baseline) and as a delta "
            "on the previous step in the same run, each synced to both servers by the `sync-weights` flow; every "
            "server's digest after each delta equals the full version's. Medians over the steps; sync = publish + "
            "the flow until both servers serve it. Ratios: the median over the steps of each step's delta sync over "
            "its full sync, and the trajectory's total time (its full versions, one every 8 by design, included).",
            ""] + md_table(DELTA_HEADER, delta_rows(d)) + \
        ["", "Targets: " + "; ".join(targets) + "."]


def sync_tail_section(d: dict) -> list[str]:
    rows = []
    for what, table in (("demo, 100 steps", d["demo"]), (f"back to back, {d['stress']['events_per_s_beside']} events/s "
                                                          "beside", d["stress"])):
        for r in table["rows"]:
            rows.append([what, r["what"], str(r["n"]), f"{r['median_s']:.3f}", f"{r['p90_s']:.3f}", f"{r['max_s']:.3f}",
                         f"{r['max_over_median']:.2f}×", str(r["over_1s"]), str(r["client_503_retries"])])
    return [f"`{d['command']}`: the seconds of each `sync-weights` call, in the same run with Baton's temporary "
            "Prefect server (`flows/local.py`: start-up heap frozen, SQLite's busy 503 retried inside the server) and "
            "with Prefect's own. Target: the slowest demo sync under 2× the median.", ""] + \
        md_table(["run", "server", "syncs", "median s", "p90 s", "max s", "max / median", "over 1 s",
                  "client 503 retries"], rows)


CHAOS_KINDS = ("succeeded", "refused_clean", "harmless", "partial", "bad")


def chaos_notes(notes: dict[str, int], limit: int = 12) -> str:
    """A scenario's notes (what each fault hit, which field a harmless flip changed, the statuses answered)."""
    items = [f"{k} ×{v}" if v > 1 else k for k, v in list(notes.items())[:limit]]
    return "; ".join(items) + (f"; … {len(notes) - limit} more in the JSON" if len(notes) > limit else "")


def chaos_section(d: dict) -> list[str]:
    t = d["totals"]
    rows = [[s["scenario"], str(s["faults"]), str(s["checks"]), *(str(s[k]) for k in CHAOS_KINDS)]
            for s in d["scenarios"]]
    rows.append(["**total**", str(t["faults"]), str(t["checks"]), *(str(t[k]) for k in CHAOS_KINDS[:-1]),
                 f"**{t['bad']}**"])
    out = [f"`{d['command']}`, {d['seconds']:.0f} s: {t['faults']} faults injected (SIGKILLs of real processes, "
           f"byte flips, storage and Prefect servers killed, racing writers), {t['checks']} checks after them. "
           f"Goal: nothing lost or corrupted, 0 BAD: **{verdict(t['bad'] == 0)}**.", "",
           "*succeeded*: bit-exact one published version (or the operation did what it should); *refused-clean*: "
           "an error, and the target or served weights are bit-identical to before; *harmless*: a flipped byte that "
           "changes nothing loaded; *detected-partial*: `PartialApplyError` naming every changed tensor, or a server "
           "that serves nothing rather than a torn model (the caller restores); *BAD*: a torn load, a lost version, "
           "weights changed under an error, or an error that is not a storage error.", ""]
    out += md_table(["scenario", "faults", "checks", "succeeded", "refused-clean", "harmless", "detected-partial",
                     "BAD"], rows)
    out += ["", "What the faults hit and what was answered:", ""]
    for s in d["scenarios"]:
        line = f"- {s['scenario']}: {chaos_notes(s['notes'])}"
        if s.get("statuses"):
            line += f"; HTTP statuses {s['statuses']}"
        out.append(line + ".")
        out += [f"  - BAD: {b}" for b in s["bad_examples"]]
    return out


def machine_line(docs: list[dict]) -> str:
    m = next(d["machine"] for d in docs if d and "machine" in d)
    return (f"Measured on this project's CI-class machine: {m['cpu']}, {m['usable_cpus']} usable cores, "
            f"{m['mem_total_gib']} GiB, Python {m['python']}, Paddle {m['paddle']}.")


def report() -> str:
    docs = {name: load(name) for name in ("storage", "model", "gpu", "server", "engine", "flow", "engines", "hf",
                                           "delta", "sync_tail", "chaos")}
    out = ["# Baton benchmark report", "", machine_line([d for d in docs.values() if d]),
           "Every figure is from a real run on that 2-core machine; each ratio's baseline ran in the same run.",
           "Regenerate with `python bench/report.py` (collect) or `--run` (measure again).", ""]
    sections = [("Storage: publish, load, memory, S3 (`bench/storage_bench.py`)", "storage", storage_section),
                ("Model and kernels on CPU (`bench/model_bench.py`)", "model", model_section),
                ("Kernels on GPU (`bench/gpu_check.py`)", "gpu", gpu_section),
                ("Inference server (`bench/server_bench.py`)", "server", server_section),
                ("Rollout engine (`bench/engine_bench.py`)", "engine", engine_section),
                ("Flow end to end (`bench/flow_bench.py`)", "flow", flow_section),
                ("Versions for FastDeploy and SGLang (`bench/engines_bench.py`)", "engines", engines_section),
                ("Real model families (`bench/hf_bench.py`)", "hf", hf_section),
                ("Delta versions on an RL trajectory (`bench/delta_bench.py`)", "delta", delta_section),
                ("Sync latency tail (`bench/sync_tail.py`)", "sync_tail", sync_tail_section),
                ("Fault injection (`bench/chaos.py`)", "chaos", chaos_section)]
    for title, name, render in sections:
        out += [f"## {title}", ""]
        if name == "gpu":
            out += render(docs[name])
        elif docs[name] is None:
            script = {"chaos": "chaos.py", "sync_tail": "sync_tail.py"}.get(name, f"{name}_bench.py")
            out += [f"No results yet: run `python bench/{script}`."]
        else:
            out += render(docs[name])
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", action="store_true", help="run every benchmark first (about 25 minutes)")
    args = ap.parse_args()
    if args.run:
        for script in BENCHMARKS:
            subprocess.run([sys.executable, str(BENCH / script)], check=True)
    text = report()
    (BENCH / "REPORT.md").write_text(text)
    print(text)
    print(f"wrote {BENCH / 'REPORT.md'}")


if __name__ == "__main__":
    main()
