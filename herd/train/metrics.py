"""Training metrics: one JSON line per logged step (metrics.jsonl), a loss-curve PNG (loss.png)
redrawn as training runs, and a progress bar with loss, tokens/s and ETA."""

from __future__ import annotations

import json
import os
from pathlib import Path

_PLOT_EVERY = 25  # logged steps between redraws of loss.png (and at every evaluation)


class Metrics:
    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.png, self.enabled = run_dir / "metrics.jsonl", run_dir / "loss.png", enabled
        self._since_plot = 0

    def truncate(self, step: int) -> None:
        """Drop lines after ``step`` (a resumed run rewrites them)."""
        if not self.enabled or not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        self.path.write_text("".join(line + "\n" for line in keep))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self._since_plot += 1
        if self._since_plot >= _PLOT_EVERY or "eval_loss" in row:
            self.plot()

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line]

    def plot(self) -> None:
        """Training and held-out loss against step, written atomically to loss.png."""
        if not self.enabled:
            return
        all_rows = self.rows()
        rows = [r for r in all_rows if "loss" in r]
        if not rows:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="training loss", lw=1)
        ev = [r for r in all_rows if "eval_loss" in r]
        if ev:
            ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="held-out loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats / token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = self.png.with_suffix(".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        os.replace(tmp, self.png)
        self._since_plot = 0

    def progress(self, start: int, total: int, enabled: bool) -> "Progress":
        return Progress(start, total, enabled and self.enabled)


class Progress:
    def __init__(self, start: int, total: int, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, initial=start, desc="training", unit="step", disable=not enabled,
                        dynamic_ncols=True)

    def update(self, row: dict) -> None:
        post = {"loss": f"{row['loss']:.4f}", "tok/s": f"{row['tokens_per_s']:.0f}"}
        if "eval_loss" in row:
            post["eval"] = f"{row['eval_loss']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
