"""On-disk cache of the teacher's top-k logits, reused across runs.

For every packed training row (identified by its index in the deterministic data stream)
and every position, the cache keeps the teacher's k largest logits (float32), their token
ids (int32) and the log-sum-exp of logits / T (float32), in numpy memmaps:

    <cache_dir>/<key>/values.f32   (rows, seq_len, k)
                      indices.i32  (rows, seq_len, k)
                      lse.f32      (rows, seq_len)
                      filled.u8    (rows,)       1 once a row is written
                      meta.json

`key` hashes everything that determines those numbers: the teacher's weights, the
tokenizer, the data sources and their order (seed, shuffle buffer, seq_len, text field),
k and T. Another run with the same key reads rows instead of running the teacher; rows not
yet filled are computed and written. Capacity is fixed when the cache is created (the rows
of the run that creates it); rows beyond it are computed on the fly, uncached.

The loss then uses the top-k + remainder approximation documented in
`losses.DistillationLoss`.
"""

import hashlib
import json
from pathlib import Path
from typing import Tuple

import numpy as np
import torch

from retconvert.distill.config import DistillConfig


def teacher_digest(model) -> str:
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class TopKLogitCache:
    def __init__(self, folder: Path, rows: int, seq_len: int, k: int, temperature: float, teacher):
        self.folder, self.rows, self.seq_len, self.k, self.T = folder, rows, seq_len, k, temperature
        self.teacher = teacher
        mode = "r+"
        self.values = np.memmap(folder / "values.f32", np.float32, mode, shape=(rows, seq_len, k))
        self.indices = np.memmap(folder / "indices.i32", np.int32, mode, shape=(rows, seq_len, k))
        self.lse = np.memmap(folder / "lse.f32", np.float32, mode, shape=(rows, seq_len))
        self.filled = np.memmap(folder / "filled.u8", np.uint8, mode, shape=(rows,))
        self.hits = self.misses = 0

    @classmethod
    def open(cls, cfg: DistillConfig, teacher, tokenizer, dist, log=print) -> "TopKLogitCache":
        s2, d = cfg.stage2, cfg.data
        key_src = {
            "teacher": teacher_digest(teacher.model),
            "tokenizer": hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest(),
            "train": list(d.train), "text_field": d.text_field, "seq_len": d.seq_len, "seed": cfg.run.seed,
            "shuffle_buffer": d.shuffle_buffer, "k": s2.logit_cache_top_k, "temperature": s2.temperature,
        }
        key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(s2.logit_cache_dir) if s2.logit_cache_dir else Path(cfg.run.out_dir).parent / "logit-cache"
        folder = root / key
        rows = s2.steps * s2.micro_batch_size * s2.grad_accum * dist.world
        if dist.is_main and not (folder / "meta.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            k, T = s2.logit_cache_top_k, d.seq_len
            for name, dtype, shape in (("values.f32", np.float32, (rows, T, k)),
                                       ("indices.i32", np.int32, (rows, T, k)),
                                       ("lse.f32", np.float32, (rows, T)),
                                       ("filled.u8", np.uint8, (rows,))):
                np.memmap(folder / name, dtype, "w+", shape=shape).flush()
            (folder / "meta.json").write_text(json.dumps({"rows": rows, **key_src}, indent=2))
            log(f"logit cache: created {folder} ({rows} rows, top-{k})")
        dist.barrier()
        meta = json.loads((folder / "meta.json").read_text())
        cache = cls(folder, meta["rows"], d.seq_len, s2.logit_cache_top_k, s2.temperature, teacher.model)
        if dist.is_main:
            log(f"logit cache: {folder}, {int(cache.filled.sum())}/{cache.rows} rows filled")
        return cache

    @torch.no_grad()
    def _compute(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.teacher(input_ids=x, use_cache=False).logits.float()
        values, indices = logits.topk(self.k, dim=-1)
        lse = torch.logsumexp(logits / self.T, dim=-1)
        return values.cpu(), indices.int().cpu(), lse.cpu()

    def get(self, first_row: int, x: torch.Tensor):
        """Top-k teacher logits for rows first_row .. first_row + len(x) of the stream: (values, indices, lse)."""
        n = x.shape[0]
        rows = np.arange(first_row, first_row + n)
        inside = rows < self.rows
        if inside.all() and self.filled[rows].all():
            self.hits += n
            out = (torch.from_numpy(np.array(self.values[rows])), torch.from_numpy(np.array(self.indices[rows])),
                   torch.from_numpy(np.array(self.lse[rows])))
        else:
            self.misses += n
            out = self._compute(x)
            keep = rows[inside]
            if len(keep):
                sel = np.nonzero(inside)[0]
                self.values[keep] = out[0][sel].numpy()
                self.indices[keep] = out[1][sel].numpy()
                self.lse[keep] = out[2][sel].numpy()
                for m in (self.values, self.indices, self.lse):
                    m.flush()
                self.filled[keep] = 1
                self.filled.flush()
        device = x.device
        return tuple(t.to(device) for t in out)
