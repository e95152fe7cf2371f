"""Collect eval.json of finished runs into the method × direction table of docs/RESULTS.md.

    python bench/results_table.py runs/quick-tuned-* [--testset flores]

Rows already in bench/results/table_<testset>.json are kept (runs need not all live on one
machine); a run of the same name replaces its row. Writes that JSON and the "Methods on <testset>"
section of docs/RESULTS.md: BLEU per direction and mean; mean chrF, off-target rate, perplexity
change on held-out text (forgetting), and for finetuned runs seconds per step and peak training memory.
Plots BLEU per direction and method to docs/figures/methods_<testset>.png (`--table NAME`: a table of its
own, table_NAME.json, its section and methods_NAME.png). Each finetuned row also
keeps its loss curves (training loss per step, dev loss), so docs/figures/loss_curves.png plots
every row that has them, wherever its run was made.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
from pathlib import Path

import yaml
from report import update_section  # bench/report.py, beside this script

from training.config import NEURON_METHODS
from training.evaluate import mean_bleu_interval, paired_difference_interval

ROOT = Path(__file__).resolve().parent.parent


PAPER_EPSILON = 0.9
# the first delta preset's learning rate (noise factors): a delta row trained at another lr names its own
PRESET_LR = 1.0e-4


def row_name(method: str, config: dict, run: Path) -> str:
    """The method, plus the neuron settings that distinguish runs of it: layers, and for routed methods the CAR mode
    (rule mask), per-part update ranks, an attention update, trained factors, the factors' kind and rounds (re-warmed
    or not) and a learning rate other than the preset's (rule delta), and ε when it is not the paper's 0.9."""
    if method not in NEURON_METHODS:
        return method
    partition = json.loads((run / "artifact" / "manifest.json").read_text())
    layers = partition["layers"]
    span = f"{layers[0]}-{layers[-1]}" if layers == list(range(layers[0], layers[-1] + 1)) else str(layers)
    if method == "layers":
        return f"{method} (layers {span})"
    epsilon = "" if partition["epsilon"] == PAPER_EPSILON else f", ε {partition['epsilon']}"
    if partition.get("routing", "mask") == "delta":  # the delta rule scales nothing: CAR does not apply
        m, lr = config["method"], float(config["train"]["lr"])
        attention, factor, rounds = m.get("attention_rank"), m.get("update_factor", "random"), m.get("factor_rounds", 1)
        ranks = m.get("update_rank")
        extra = "".join([
            f", ranks up/gate/down {ranks['up']}/{ranks['gate']}/{ranks['down']}" if isinstance(ranks, dict) else "",
            f", attention r{attention}" if attention else "",
            ", trained factors" if m.get("train_factors") else "",
            f", {factor} factors" if factor != "random" else "",
            f" in {rounds} rounds" if rounds > 1 else "",
            ", re-warmed" if config["train"].get("rewarm_rounds") else "",
            f", lr {lr:g}" if lr != PRESET_LR else "",
        ])
        return f"{method} delta (layers {span}{epsilon}{extra})"
    return f"{method} (layers {span}, car {config['method']['car']}{epsilon})"


def interval(row: dict) -> str:
    bounds = row.get("mean_bleu_interval")
    return f" ({bounds[0]:.1f}–{bounds[1]:.1f})" if bounds else ""


def seconds_per_step(log: list[dict]) -> float | None:
    """Median wall time between consecutive steps: a run paused, resumed or slowed by a dev evaluation
    now and then still reads as its usual pace."""
    gaps = [b["seconds"] - a["seconds"] for a, b in itertools.pairwise(log) if b["step"] == a["step"] + 1]
    return round(statistics.median(gaps), 2) if gaps else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--testset", default="flores")
    parser.add_argument("--table", default=None, help="a table of its own, bench/results/table_TABLE.json and its "
                        "section (runs of another budget or sample size than the main table's); default: TESTSET")
    parser.add_argument("--against", type=Path, default=None, help="a run (one of RUN) every other row is compared "
                        "with: the paired bootstrap interval of the difference in mean BLEU on the same sentences")
    args = parser.parse_args()
    name = args.table or args.testset
    table = ROOT / "bench" / "results" / f"table_{name}.json"
    rows = json.loads(table.read_text()) if table.exists() else {}
    against = json.loads((args.against / "eval.json").read_text()) if args.against else None
    made = []  # this call's rows
    for run in args.runs:
        result = json.loads((run / "eval.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        scores = result["testsets"][args.testset]
        ppl = result["perplexity"]
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()] \
            if (run / "train_log.jsonl").exists() else []
        made.append(row_name(result["method"], config, run))
        if made[-1] in made[:-1]:
            raise SystemExit(f"{run}: its row would be named {made[-1]!r}, as an earlier run's: row_name tells them "
                             "apart by the settings it knows, so teach it this one")
        rows[made[-1]] = {
            "bleu": {d: s["bleu"] for d, s in scores.items()},
            "mean_bleu": sum(s["bleu"] for s in scores.values()) / len(scores),
            "mean_bleu_interval": mean_bleu_interval(scores),
            "mean_chrf": sum(s["chrf"] for s in scores.values()) / len(scores),
            "off_target": sum(s["off_target"] for s in scores.values()) / len(scores),
            "perplexity_change": sum(v["after"] / v["base"] - 1 for v in ppl.values()) / len(ppl),
            "sentences": next(iter(scores.values()))["sentences"],
            "steps": config["train"]["steps"] if result["method"] not in ("zero_shot", "few_shot") else 0,
            "seconds_per_step": seconds_per_step(log),
            "train_peak_rss_mib": max((e.get("peak_rss_mib") or 0 for e in log), default=None) or None,
            "train_loss": [e["loss"] for e in log],
            "dev_loss": {e["step"]: e["dev_loss"] for e in log if "dev_loss" in e},
            "run": str(run),
        }
        if against is not None and run != args.against:  # paired: the same sentences, the same resamples
            baseline = against["testsets"][args.testset]
            rows[made[-1]]["mean_bleu_difference"] = {
                "against": row_name(against["method"], yaml.safe_load((args.against / "config.yaml").read_text()),
                                    args.against),
                "difference": (sum(s["bleu"] for s in scores.values())
                               - sum(s["bleu"] for s in baseline.values())) / len(scores),
                "interval": paired_difference_interval(scores, baseline)}
    sample = {rows[row]["sentences"] for row in made}
    for row in [row for row, r in rows.items() if r["sentences"] not in sample]:  # one table, one sample of sentences
        print(f"dropped {row!r}: {rows.pop(row)['sentences']} sentences per direction, this table's {sample}; give "
              "it a table of its own (--table)", flush=True)
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(json.dumps(rows, indent=2) + "\n")
    directions = list(next(iter(rows.values()))["bleu"])
    lines = ["| method | steps | " + " | ".join(directions) + " | mean BLEU | mean chrF | off-target | Δ ppl | s/step "
             "| train peak MiB |", "|---|---:|" + "---:|" * (len(directions) + 6)]
    for row, r in rows.items():
        lines.append(f"| {row} | {r['steps']} | " + " | ".join(f"{r['bleu'][d]:.1f}" for d in directions)
                     + f" | **{r['mean_bleu']:.2f}**{interval(r)} | {r['mean_chrf']:.1f} | "
                     f"{100 * r['off_target']:.0f}% | {100 * r['perplexity_change']:+.0f}% | "
                     f"{r.get('seconds_per_step') or ''} | {r.get('train_peak_rss_mib') or ''} |")
    sentences = next(iter(rows.values()))["sentences"]
    section = "\n".join([
        f"## Methods on {name}",
        "",
        f"`python bench/results_table.py RUN...` (`bench/results/table_{name}.json`; runs: "
        + ", ".join(f"`{r['run']}`" for r in rows.values()) + ").",
        f"First {sentences} sentences per direction; BLEU is sacreBLEU 13a (zh for Chinese targets), the mean with its",
        "95% bootstrap interval where the run kept its sentence statistics (training/evaluate.py); Δ ppl is the mean",
        "relative change of perplexity on held-out FLORES dev text per language (forgetting).",
        "",
        *lines,
        "",
        *[f"* {row} − {d['against']}: {d['difference']:+.2f} mean BLEU, paired 95% bootstrap interval "
          f"[{d['interval'][0]:+.2f}, {d['interval'][1]:+.2f}]" for row, r in rows.items()
          if (d := r.get("mean_bleu_difference")) and d["interval"]],
        "",
        f"![BLEU per direction](figures/methods_{name}.png)",
        "",
    ])
    update_section(ROOT / "docs" / "RESULTS.md", f"## Methods on {name}", section, "Results")
    plot_bleu(rows, directions, ROOT / "docs" / "figures" / f"methods_{name}.png")
    if args.table is None:  # the loss-curve figure is the main table's
        plot_losses({row: r for row, r in rows.items() if r.get("train_loss")})
    print(section)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bleu(rows: dict[str, dict], directions: list[str], path: Path) -> None:
    """Grouped bars: BLEU of each method (row) per direction, and the mean."""
    plt = _pyplot()
    groups = [*directions, "mean"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(1.1 * len(groups) + 2, 5.5))
    for k, (name, row) in enumerate(rows.items()):
        values = [row["bleu"][d] for d in directions] + [row["mean_bleu"]]
        ax.bar([g + (k - (len(rows) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups)
    ax.set(ylabel="BLEU", title=f"BLEU per direction (first {next(iter(rows.values()))['sentences']} sentences)")
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_losses(rows: dict[str, dict]) -> None:
    """Training loss (moving average of 20 steps) and dev loss of each row that has them."""
    plt = _pyplot()
    fig, (train_ax, dev_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, row in rows.items():
        losses = row["train_loss"]
        smooth = [sum(losses[max(0, i - 19): i + 1]) / len(losses[max(0, i - 19): i + 1]) for i in range(len(losses))]
        line, = train_ax.plot(range(1, len(losses) + 1), smooth, label=name)
        dev = sorted((int(step), loss) for step, loss in row["dev_loss"].items())  # JSON keys are strings
        dev_ax.plot(*zip(*dev, strict=True), marker="o", color=line.get_color(), label=name)
    train_ax.set(title="training loss (20-step mean)", xlabel="step", ylabel="target-token loss")
    dev_ax.set(title="FLORES dev loss", xlabel="step")
    dev_ax.legend(fontsize=7)
    fig.tight_layout()
    (ROOT / "docs" / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(ROOT / "docs" / "figures" / "loss_curves.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
