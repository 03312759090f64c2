#!/usr/bin/env python3
"""Compare the run directories of two revisions (called by compare-runs.sh).

Standard library only. For every run name both sides trained:

- results.json: every numeric leaf under `valid` and `test` (all groups, all
  metrics, `users`) must agree within an absolute --metric-tol (default
  1e-6); a metric present on one side only is a failure. `best_epoch` and
  `epochs_run` must be equal. The other keys (`long_tail`, `eval_mode`,
  `world_size`, ...) must be equal (numbers within --metric-tol); the
  timing keys `seconds`, `peak_rss_mib` are ignored. A key outside
  `valid`/`test` that one side lacks (e.g. a new `skipped_steps`) is a note,
  not a failure.
- metrics.jsonl: the same epochs; per epoch `loss` within a relative
  --loss-rtol (default 1e-5) and every `valid` metric within --metric-tol;
  `seconds` and `train_seconds` are ignored; keys on one side only are notes.

Prints a Markdown table (run, max |diff| of the metrics, max relative diff of
the loss, best epoch, verdict, notes), writes it to --markdown and a
machine-readable copy to --json; exit 0 only when every run passes.
"""

import argparse
import json
import math
import os
import sys

TIMING_KEYS = {"seconds", "peak_rss_mib", "train_seconds"}
EXACT_KEYS = ("best_epoch", "epochs_run")


def is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def leaves(tree, prefix=""):
    """(dotted path, value) for every leaf of nested dicts/lists."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from leaves(tree[k], f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from leaves(v, f"{prefix}[{i}]")
    else:
        yield prefix, tree


def abs_diff(a, b):
    if math.isnan(a) and math.isnan(b):
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return 0.0 if a == b else math.inf
    return abs(a - b)


def rel_diff(a, b):
    d = abs_diff(a, b)
    if d == 0.0:
        return 0.0
    scale = max(abs(a), abs(b))
    return d / scale if scale > 0 else math.inf


class RunCheck:
    def __init__(self, run, tol, rtol):
        self.run = run
        self.tol = tol
        self.rtol = rtol
        self.max_metric = 0.0
        self.max_metric_at = ""
        self.max_loss = 0.0
        self.max_loss_at = ""
        self.best = ""
        self.failures = []
        self.notes = []

    def metric(self, path, a, b):
        if not (is_number(a) and is_number(b)):
            if a != b:
                self.failures.append(f"{path}: {a!r} vs {b!r}")
            return
        d = abs_diff(float(a), float(b))
        if not math.isnan(d) and (not self.max_metric_at or d > self.max_metric):
            self.max_metric, self.max_metric_at = d, path
        if not d <= self.tol:
            self.failures.append(f"{path}: {a!r} vs {b!r} (|diff| {d:.3g})")

    def loss(self, path, a, b):
        if not (is_number(a) and is_number(b)):
            if a != b:
                self.failures.append(f"{path}: {a!r} vs {b!r}")
            return
        d = rel_diff(float(a), float(b))
        if not math.isnan(d) and (not self.max_loss_at or d > self.max_loss):
            self.max_loss, self.max_loss_at = d, path
        if not d <= self.rtol:
            self.failures.append(f"{path}: {a!r} vs {b!r} (rel diff {d:.3g})")

    def one_sided(self, where, only_ref, only_cand, fatal):
        for side, keys in (("reference", only_ref), ("candidate", only_cand)):
            for k in keys:
                msg = f"{where}{k}: only in {side}"
                if fatal:
                    self.failures.append(msg)
                else:
                    label = "new key" if side == "candidate" else "dropped key"
                    self.notes.append(f"{label} `{where}{k}`")


def compare_tree(check, ref, cand, where, fatal_missing, compare):
    """Leaf by leaf; keys on one side only are reported through one_sided."""
    r = dict(leaves(ref))
    c = dict(leaves(cand))
    check.one_sided(where, sorted(set(r) - set(c)), sorted(set(c) - set(r)), fatal_missing)
    for k in sorted(set(r) & set(c)):
        compare(f"{where}{k}", r[k], c[k])


def flat_yaml(path):
    """`a.b.c: value` lines of a block-style YAML file (what serde_yaml writes);
    list items are appended to their parent key. Enough to name changed keys."""
    out = {}
    stack = []  # (indent, key)
    with open(path, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            indent = len(line) - len(line.lstrip(" "))
            body = line.strip()
            if body == "-" or body.startswith("- "):
                # serde_yaml puts list items at their key's indentation.
                while stack and stack[-1][0] > indent:
                    stack.pop()
                parent = ".".join(k for _, k in stack)
                out[parent] = (out.get(parent, "") + " " + body).strip()
                continue
            while stack and stack[-1][0] >= indent:
                stack.pop()
            key, _, value = body.partition(":")
            path = ".".join([k for _, k in stack] + [key])
            value = value.strip()
            if value:
                out[path] = value
            else:
                stack.append((indent, key))
    return out


def config_notes(ref_run, cand_run):
    """Resolved configs that differ (output_dir aside) are noted by key."""
    a_path = os.path.join(ref_run, "config.resolved.yaml")
    b_path = os.path.join(cand_run, "config.resolved.yaml")
    if not (os.path.isfile(a_path) and os.path.isfile(b_path)):
        return []
    try:
        a, b = flat_yaml(a_path), flat_yaml(b_path)
    except OSError:
        return []
    notes = []
    for k in sorted(set(a) | set(b)):
        if k == "output_dir" or a.get(k) == b.get(k):
            continue
        if k not in a:
            notes.append(f"config `{k}` new ({b[k]})")
        elif k not in b:
            notes.append(f"config `{k}` dropped (was {a[k]})")
        else:
            notes.append(f"config `{k}`: {a[k]} -> {b[k]}")
    return notes


def load_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_epochs(path):
    out = {}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            v = json.loads(line)
            if not isinstance(v, dict) or "epoch" not in v:
                raise ValueError(f"{path}:{n}: not an epoch line")
            out[v["epoch"]] = v
    return out


def compare_run(run, ref_dir, cand_dir, tol, rtol):
    check = RunCheck(run, tol, rtol)
    rr = os.path.join(ref_dir, run)
    cr = os.path.join(cand_dir, run)
    missing = [p for p in (os.path.join(rr, "results.json"), os.path.join(cr, "results.json"))
               if not os.path.isfile(p)]
    if missing:
        check.failures.append("no results.json: " + ", ".join(missing))
        return check
    try:
        ref = load_json(os.path.join(rr, "results.json"))
        cand = load_json(os.path.join(cr, "results.json"))
        ref_ep = load_epochs(os.path.join(rr, "metrics.jsonl"))
        cand_ep = load_epochs(os.path.join(cr, "metrics.jsonl"))
    except (OSError, ValueError) as e:
        check.failures.append(f"unreadable: {e}")
        return check

    check.notes.extend(config_notes(rr, cr))

    # results.json
    for k in EXACT_KEYS:
        a, b = ref.get(k), cand.get(k)
        if a is None or b is None:
            check.failures.append(f"{k}: missing ({a!r} vs {b!r})")
        elif a != b:
            check.failures.append(f"{k}: {a!r} vs {b!r}")
    check.best = f"{ref.get('best_epoch')}/{ref.get('epochs_run')}"
    if (ref.get("best_epoch"), ref.get("epochs_run")) != (cand.get("best_epoch"), cand.get("epochs_run")):
        check.best += f" vs {cand.get('best_epoch')}/{cand.get('epochs_run')}"
    for split in ("valid", "test"):
        if split not in ref or split not in cand:
            check.failures.append(f"results.json {split}: missing on one side")
            continue
        compare_tree(check, ref[split], cand[split], f"{split}.", True, check.metric)
    rest = lambda d: {k: v for k, v in d.items()
                      if k not in ("valid", "test", "name") + EXACT_KEYS and k not in TIMING_KEYS}
    compare_tree(check, rest(ref), rest(cand), "", False, check.metric)

    # metrics.jsonl
    only_ref = sorted(set(ref_ep) - set(cand_ep))
    only_cand = sorted(set(cand_ep) - set(ref_ep))
    if only_ref or only_cand:
        check.failures.append(
            f"metrics.jsonl epochs differ: only in reference {only_ref}, only in candidate {only_cand}")
    seen_notes = set(check.notes)
    for ep in sorted(set(ref_ep) & set(cand_ep)):
        a, b = ref_ep[ep], cand_ep[ep]
        where = f"metrics.jsonl epoch {ep} "
        if "loss" not in a or "loss" not in b:
            check.failures.append(where + "loss: missing on one side")
        else:
            check.loss(where + "loss", a["loss"], b["loss"])
        compare_tree(check, a.get("valid", {}), b.get("valid", {}), where + "valid.", True, check.metric)
        skip = {"epoch", "loss", "valid"} | TIMING_KEYS
        # One-sided keys of the epoch lines are noted once, not per epoch.
        ra = {k: v for k, v in a.items() if k not in skip}
        cb = {k: v for k, v in b.items() if k not in skip}
        for k in sorted(set(ra) ^ set(cb)):
            label = "new key" if k in cb else "dropped key"
            note = f"{label} `metrics.jsonl {k}`"
            if note not in seen_notes:
                seen_notes.add(note)
                check.notes.append(note)
        for k in sorted(set(ra) & set(cb)):
            check.metric(where + k, ra[k], cb[k])
    return check


def fmt(x, seen=True):
    if not seen:
        return "-"
    if x == 0.0:
        return "0"
    if math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reference", required=True, help="run directory parent of the reference")
    ap.add_argument("--candidate", required=True, help="run directory parent of the candidate")
    ap.add_argument("--reference-label", default="reference")
    ap.add_argument("--candidate-label", default="candidate")
    ap.add_argument("--runs", required=True, help="comma-separated run names")
    ap.add_argument("--metric-tol", type=float, default=1e-6)
    ap.add_argument("--loss-rtol", type=float, default=1e-5)
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--json", help="write the per-run details here")
    args = ap.parse_args()

    checks = [compare_run(r, args.reference, args.candidate, args.metric_tol, args.loss_rtol)
              for r in args.runs.split(",") if r]
    lines = [
        f"Reference `{args.reference_label}` vs candidate `{args.candidate_label}`: "
        f"metrics (results.json valid/test and metrics.jsonl valid) within {args.metric_tol:g} absolute, "
        f"per-epoch loss within {args.loss_rtol:g} relative, best_epoch and epochs_run equal.",
        "",
        "| run | max abs diff metrics | max rel diff loss | best/epochs | verdict | notes |",
        "|---|---|---|---|---|---|",
    ]
    for c in checks:
        verdict = "pass" if not c.failures else f"FAIL ({len(c.failures)})"
        notes = "; ".join(c.notes) if c.notes else ""
        lines.append(f"| {c.run} | {fmt(c.max_metric, bool(c.max_metric_at))} | {fmt(c.max_loss, bool(c.max_loss_at))} | {c.best} | {verdict} | {notes} |")
    failed = [c for c in checks if c.failures]
    lines.append("")
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} runs pass.")
    for c in failed:
        lines.append("")
        lines.append(f"Differences in `{c.run}` (first 20 of {len(c.failures)}):")
        lines.extend(f"- {f}" for f in c.failures[:20])
    for c in checks:
        if c.max_metric_at and c.max_metric > 0:
            lines.append(f"\n`{c.run}`: largest metric diff at `{c.max_metric_at}`; "
                         f"largest loss diff at `{c.max_loss_at}`.")
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([{
                "run": c.run, "pass": not c.failures,
                "max_abs_diff_metrics": c.max_metric, "max_abs_diff_metrics_at": c.max_metric_at,
                "max_rel_diff_loss": c.max_loss, "max_rel_diff_loss_at": c.max_loss_at,
                "failures": c.failures, "notes": c.notes,
            } for c in checks], f, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
