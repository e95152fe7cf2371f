"""Print what an artifact holds; optionally plot it.

    python -m landermt.inspect ARTIFACT [--plot DIR]

Prints the selected layers, partition sizes per language and the c values; `--plot` writes
layer_differences.png (D per direction, eq. 2), awareness.png (neurons and Φ per language in the
selected layers) and car_ratios.png (c per pair and layer).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from landermt.artifact import FFN, load_artifact
from landermt.cli import user_errors


def summary(directory: str | Path) -> str:
    artifact = load_artifact(directory)
    m, part = artifact.manifest, artifact.partition
    weights = f"finetuned FFN of the selected layers ({FFN})" if artifact.ffn else "base (not finetuned)"
    lines = [
        f"artifact     {directory}",
        f"base model   {m.base_model.name} ({m.base_model.model_type}, {m.base_model.num_layers} layers × "
        f"{m.base_model.intermediate_size} FFN neurons, sha256 {m.base_model.sha256[:12]}…)",
        f"languages    {' '.join(m.languages)}",
        f"layers       {m.layers} (k={m.k}; {m.layer_rule})",
        f"partition    ε={m.epsilon}, CAR mode {m.car}, scoring objective {m.scoring.get('objective')}",
        f"weights      {weights}",
        "",
        "neurons per layer: general, then specific per language",
        "layer  general  " + "  ".join(f"{lang:>5}" for lang in m.languages),
    ]
    for i, layer in part.layers.items():
        counts = [int((layer.specific == index).sum()) for index in range(len(m.languages))]
        lines.append(f"{i:>5}  {int(layer.general.sum()):>7}  " + "  ".join(f"{n:>5}" for n in counts))
    lines += ["", "c (eqs. 6–7) per pair and layer", "pair   " + "  ".join(f"L{i:<5}" for i in m.layers)]
    for pair, by_layer in part.car_ratios().items():
        lines.append(f"{pair:<6} " + "  ".join(f"{by_layer[i]:.4f}" for i in m.layers))
    return "\n".join(lines)


def plot(directory: str | Path, out: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    artifact = load_artifact(directory)
    m, part = artifact.manifest, artifact.partition
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    if m.differences:  # absent when the layers were configured and detection skipped
        fig, ax = plt.subplots(figsize=(9, 4.5))
        diffs = torch.tensor(list(m.differences.values()))
        for name, values in m.differences.items():
            ax.plot(range(len(values)), values, alpha=0.45, linewidth=1, label=name)
        ax.plot(range(diffs.shape[1]), diffs.mean(0).numpy(), color="black", linewidth=2.5, label="mean")
        for i in m.layers:
            ax.axvline(i, color="red", linestyle=":", linewidth=1)
        ax.set(xlabel="layer i", ylabel="D_i = |Ā_i − Ā_{i+1}|", title=f"Layer detection (eq. 2); selected {m.layers}")
        ax.legend(fontsize=7, ncol=2)
        written.append(_save(fig, out / "layer_differences.png"))

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / len(m.languages)
    for index, lang in enumerate(m.languages):
        xs = [pos + index * width for pos in range(len(m.layers))]
        left.bar(xs, [int((layer.specific == index).sum()) for layer in part.layers.values()], width, label=lang)
        right.bar(xs, [layer.phi[index].mean().item() for layer in part.layers.values()], width, label=lang)
    for ax, ylabel in ((left, "language-specific neurons"), (right, "mean Φ (eq. 4)")):
        ax.set_xticks([pos + 0.4 - width / 2 for pos in range(len(m.layers))], [f"layer {i}" for i in m.layers])
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    left.set_title(f"Specific neurons per language (ε = {m.epsilon})")
    right.set_title("Awareness per language")
    written.append(_save(fig, out / "awareness.png"))

    ratios = part.car_ratios()
    grid = torch.tensor([[by_layer[i] for i in m.layers] for by_layer in ratios.values()])
    fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(m.layers), 0.35 * len(ratios) + 1.5))
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(m.layers)), [f"layer {i}" for i in m.layers])
    ax.set_yticks(range(len(ratios)), list(ratios))
    ax.set_title("CAR ratio c per pair (eqs. 6–7)")
    fig.colorbar(image, ax=ax)
    written.append(_save(fig, out / "car_ratios.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    from matplotlib import pyplot

    pyplot.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m landermt.inspect", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--plot", metavar="DIR", help="write PNG plots to DIR")
    args = parser.parse_args(argv)
    with user_errors(parser):
        print(summary(args.artifact))
        written = plot(args.artifact, args.plot) if args.plot else []
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
