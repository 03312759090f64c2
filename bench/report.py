"""Summarises the raw outputs of `scripts/bench.sh` (one JSON line per round,
key and side) into docs/benchmarks.json and the generated section of
docs/benchmarks.md (between the markers; the rest of the file is kept).
Standard library only."""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess

BEGIN, END = "<!-- bench.sh:begin -->", "<!-- bench.sh:end -->"

# key -> (work, units, our field, reference field)
KEYS = {
    "sasrec_step_L50": ("plain SASRec training step, batch 128, hidden 64, 2 blocks, 1 head, dropout 0.5, padded to L = 50", "ms", "median_step_ms", "median_ms"),
    "sasrec_step_L200": ("the same, padded to L = 200", "ms", "median_step_ms", "median_ms"),
    "llmesr_step_faithful": (
        "LLM-ESR-SASRec training step, official work: padded to 200, 1536-d LLM table, adapter at every position (reference), "
        "student pass, 10 teachers per user encoded in the step; ours: configs/beauty5_llmesr_sasrec_faithful.yaml",
        "ms",
        "median_step_ms",
        "median_ms",
    ),
    "llmesr_epoch_default": (
        "LLM-ESR-SASRec epoch estimate (steps per epoch x median step, training only): ours the default config at max_len 50, "
        "the reference the official work as shipped (the faithful step)",
        "s",
        "epoch_estimate_s",
        None,
    ),
    "embed_users": ("all-MiniLM-L6-v2 encoding of the first N users' prompts (the prompts `embed` builds, cap 256 tokens)", "ms", "median_ms", "median_ms"),
    "eval_pass": ("one validation pass of plain SASRec, 22,363 users x 101 candidates, padded to L = 50", "ms", "median_pass_ms", "median_ms"),
}


def read_json(path):
    try:
        with open(path) as f:
            return json.loads(f.read())
    except (OSError, ValueError):
        return None


def ref_value(key, out):
    if key == "llmesr_epoch_default":
        return out["median_ms"] * out["steps_per_epoch"] / 1e3
    return out[KEYS[key][3]]


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision():
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # The files this script writes do not make the tree dirty.
        status = ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!docs/benchmarks.md", ":!docs/benchmarks.json"]
        dirty = subprocess.run(status, capture_output=True, text=True).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def median_or_none(xs):
    return statistics.median(xs) if xs else None


def summarise(args):
    loads = [float(open(os.path.join(args.raw, f"load-{r}")).read()) for r in range(1, args.rounds + 1) if os.path.exists(os.path.join(args.raw, f"load-{r}"))]
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "git_revision": git_revision(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "threads_each_side": args.threads,
        "rounds": args.rounds,
        "quick": bool(args.quick),
        "under_load": bool(args.under_load),
        "load_averages": loads,
        "embed_users": args.embed_users,
    }
    keys = {}
    for key in args.keys.split(","):
        work, units, ours_field, _ = KEYS[key]
        ours, ref, ours_rss, ref_rss, versions = [], [], [], [], set()
        for r in range(1, args.rounds + 1):
            o = read_json(os.path.join(args.raw, f"{r}-{key}-ours.json"))
            b = read_json(os.path.join(args.raw, f"{r}-{key}-ref.json"))
            if o:
                ours.append(o[ours_field])
                ours_rss.append(o.get("peak_rss_mib"))
            if b:
                ref.append(ref_value(key, b))
                ref_rss.append(b.get("peak_rss_mib"))
                versions.add(b.get("torch"))
        om, rm = median_or_none(ours), median_or_none(ref)
        keys[key] = {
            "work": work,
            "ours_median": om,
            "reference_median": rm,
            "ratio": om / rm if om and rm else None,
            "units": units,
            "rounds": args.rounds,
            "ours_rounds": ours,
            "reference_rounds": ref,
            "ours_peak_rss_mib": max((x for x in ours_rss if x), default=None),
            "reference_peak_rss_mib": max((x for x in ref_rss if x), default=None),
            "reference_torch": sorted(v for v in versions if v),
            "load_averages": loads,
            "cpu_model": meta["cpu_model"],
            "threads_each_side": args.threads,
            "under_load": meta["under_load"],
            "quick": meta["quick"],
            "date": meta["date"],
            "git_revision": meta["git_revision"],
        }
    return {"meta": meta, "keys": keys}


def fmt(x, digits=3):
    if x is None:
        return "failed"
    return f"{x:,.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown(summary):
    m = summary["meta"]
    lines = [
        BEGIN,
        "## Ours against PyTorch (`scripts/bench.sh`, generated)",
        "",
        "Generated by `bash scripts/bench.sh`; do not edit between the markers. "
        "Ratio = ours / reference (lower is better), median over rounds of each side's median; "
        "the two sides alternate within every round. Reference: `bench/reference.py`, the official "
        "code's structure in PyTorch; its inputs are the beauty5 sequences and random 1536-d item "
        "vectors (the same file for both sides).",
        "",
    ]
    if m["quick"] or m["under_load"]:
        why = []
        if m["quick"]:
            why.append("a `--quick` smoke run (one round, few steps)")
        if m["under_load"]:
            why.append("taken under load (`--force`: load average above 0.5, other jobs on the cores)")
        lines += [f"**Not a measurement to quote: {' and '.join(why)}. Retake with `bash scripts/bench.sh` on a quiet machine.**", ""]
    lines += [
        f"- date {m['date']}, revision `{m['git_revision']}`, CPU {m['cpu_model']} ({m['cpus']} logical CPUs)",
        f"- {m['threads_each_side']} thread(s) each side, {m['rounds']} round(s), 1-minute load average before each round: "
        + ", ".join(f"{x:.2f}" for x in m["load_averages"]),
        f"- `embed_users`: {m['embed_users']} user prompts",
        "",
        "| key | ours | reference | ratio | units | peak RSS ours / ref (MiB) |",
        "|---|---|---|---|---|---|",
    ]
    for key, v in summary["keys"].items():
        rss = f"{fmt(v['ours_peak_rss_mib'], 4)} / {fmt(v['reference_peak_rss_mib'], 4)}"
        lines.append(f"| `{key}` | {fmt(v['ours_median'])} | {fmt(v['reference_median'])} | {fmt(v['ratio'])} | {v['units']} | {rss} |")
    lines += ["", "Work of each key:", ""]
    lines += [f"- `{key}`: {v['work']}." for key, v in summary["keys"].items()]
    lines += [END]
    return "\n".join(lines)


def write_markdown(path, section):
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        text = head + section + tail
    else:
        # Before the first second-level heading, or at the end.
        at = text.find("\n## ")
        text = text + "\n" + section + "\n" if at < 0 else text[: at + 1] + section + "\n\n" + text[at + 1 :]
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--raw", required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--keys", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--quick", type=int, default=0)
    p.add_argument("--under-load", type=int, default=0)
    p.add_argument("--embed-users", type=int, required=True)
    p.add_argument("--json", required=True)
    p.add_argument("--markdown", required=True)
    args = p.parse_args()
    summary = summarise(args)
    with open(args.json + ".tmp", "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    os.replace(args.json + ".tmp", args.json)
    write_markdown(args.markdown, markdown(summary))


if __name__ == "__main__":
    main()
