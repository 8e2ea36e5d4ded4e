"""The one sentence `./run demo` ends with, made from what the run wrote (never typed).

    python -m trainer.demo_summary DEMO_DIR

reads `DEMO_DIR/run/metrics.json`, `DEMO_DIR/run/config.json` and the `tench predict` lines in
`DEMO_DIR/predictions.tsv` (`path<TAB>class<TAB>probability`; an image's true class is its
folder's name) and prints the sentence the README quotes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def predictions_right(lines: list[str]) -> tuple[int, int, list[float]]:
    """(right, total, probabilities) of `tench predict`'s tab-separated lines."""
    right, probs = 0, []
    for line in lines:
        path, predicted, probability = line.rstrip("\n").split("\t")
        right += Path(path).parent.name == predicted
        probs.append(float(probability))
    return right, len(probs), probs


def summary(demo_dir: str | Path) -> str:
    demo_dir = Path(demo_dir)
    rows = json.loads((demo_dir / "run" / "metrics.json").read_text())
    config = json.loads((demo_dir / "run" / "config.json").read_text())
    lines = [ln for ln in (demo_dir / "predictions.tsv").read_text().splitlines() if ln.strip()]
    right, total, probs = predictions_right(lines)
    last = rows[-1]
    best = max(rows, key=lambda r: r["accuracy"])
    seconds = sum(r["seconds"] for r in rows)
    size = config["size"] if not config.get("size_start") else \
        f"{config['size_start']}:{config['size']}"
    tta = f" ({last['accuracy_tta']:.1%} with TTA)" if last.get("accuracy_tta") is not None \
        else ""
    return (f"demo: {config['arch']} at {size} px, {len(rows)} epochs in {seconds:.0f} s "
            f"(training + validation), validation accuracy {last['accuracy']:.1%}{tta}, best "
            f"{best['accuracy']:.1%} after epoch {best['epoch'] + 1}; tench predict: {right} of "
            f"{total} right, probabilities {min(probs):.2f}-{max(probs):.2f}")


if __name__ == "__main__":
    print(summary(sys.argv[1] if len(sys.argv) > 1 else "demo"))
