"""Metrics: JSON lines (always), TensorBoard scalars (when tensorboard is installed), tqdm progress."""

import json
import time
from pathlib import Path
from typing import Optional


class MetricsLogger:
    """Rank 0 writes `<out_dir>/metrics.jsonl` and `<out_dir>/tensorboard/`; other ranks write nothing."""

    def __init__(self, out_dir: Path, enabled: bool, tensorboard: bool = True, log=print):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.writer = None
        self.log = log
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(out_dir) / "tensorboard"))
            except Exception as e:  # tensorboard not installed: JSON lines only
                log(f"tensorboard unavailable ({type(e).__name__}); metrics go to {self.path} only")

    def write(self, record: dict, step: Optional[int] = None):
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None and step is not None:
            tag = record.get("event", "train")
            for key, value in record.items():
                if key not in ("time", "step", "event") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def read_metrics(path: Path, event: str = "train"):
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("event") == event]


def progress_bar(total: int, initial: int, enabled: bool, desc: str):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, dynamic_ncols=True,
                unit="step", mininterval=1.0)
