"""A real two-process DDP run (gloo, CPU, 2 loader workers per rank) over uneven shards.

The run happens in a subprocess with a timeout, so a hang fails the test instead of blocking.
"""

import json
import subprocess
import sys
import textwrap
from collections import Counter

from test_datamodule import clean_samples, png, write_shard

import numpy as np

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    import torch.distributed as dist
    from lit_restore.config import DataConfig, Source
    from lit_restore.data.datamodule import ShardDataModule

    spec = json.load(open(sys.argv[1]))

    class Counting(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.train_counts, self.val_counts, self.val_keys = [], [], []
            self.n = 0

        def training_step(self, batch, i):
            self.n += 1
            assert batch["gt"].dtype == torch.uint8 and batch["valid"].all()
            return (self.w * batch["gt"].float().mean()) ** 2  # a gradient all-reduce every step

        def on_train_epoch_end(self):
            self.train_counts.append(self.all_gather(torch.tensor(self.n)).tolist())
            self.n = 0

        def on_validation_epoch_start(self):
            self.keys, self.v = [], 0

        def validation_step(self, batch, i):
            self.v += 1
            self.keys += [k for k, ok in zip(batch["key"], batch["valid"].tolist()) if ok]
            self.all_gather(batch["gt"])  # a collective per val batch: unequal counts would hang

        def on_validation_epoch_end(self):
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, self.keys)
            self.val_keys.append(gathered)
            self.val_counts.append(self.all_gather(torch.tensor(self.v)).tolist())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cfg = DataConfig(train=[Source(u, w) for u, w in spec["train"]], val=[Source(u) for u in spec["val"]],
                     batch_size=3, val_batch_size=4, crop=8, num_workers=2, steps_per_epoch=5, shuffle_buffer=8)
    model = Counting()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=2, num_sanity_val_steps=0,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, datamodule=ShardDataModule(cfg, seed=0))
    if trainer.global_rank == 0:
        json.dump({"train": model.train_counts, "val": model.val_counts, "keys": model.val_keys,
                   "steps": trainer.global_step}, open(spec["out"], "w"))
    """
)


def test_ddp_two_ranks_equal_batches_and_val_exactly_once(tmp_path):
    # Uneven sources: one tiny shard (3 samples) vs shards of 40 and 5; one paired sample source.
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
    paired = [{"__key__": "p0", "gt.png": png(gt), "lq.png": png(255 - gt),
               "json": json.dumps({"dataset": "p", "task": "haze"}).encode()}]
    tiny = write_shard(tmp_path / "tiny.tar", clean_samples("t", 3) + paired)
    write_shard(tmp_path / "big-0.tar", clean_samples("b", 40))
    write_shard(tmp_path / "big-1.tar", clean_samples("c", 5))
    v0 = write_shard(tmp_path / "val-0.tar", clean_samples("v", 7))
    v1 = write_shard(tmp_path / "val-1.tar", clean_samples("w", 4))  # 11 val samples: not a multiple of 2
    spec = {"train": [[tiny, 1.0], [str(tmp_path / "big-{0..1}.tar"), 2.0]], "val": [v0, v1],
            "out": str(tmp_path / "result.json")}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    (tmp_path / "run.py").write_text(SCRIPT)

    proc = subprocess.run([sys.executable, str(tmp_path / "run.py"), str(tmp_path / "spec.json")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())

    assert result["train"] == [[5, 5], [5, 5]]  # steps_per_epoch on each rank, each epoch
    assert result["steps"] == 10
    assert [c for c in result["val"]] == [[2, 2], [2, 2]]  # ceil(ceil(11/2)/4) batches per rank
    expected = sorted([f"v{i:04d}" for i in range(7)] + [f"w{i:04d}" for i in range(4)])
    for per_rank in result["keys"]:
        assert sorted(k for keys in per_rank for k in keys) == expected
        assert max(Counter(k for keys in per_rank for k in keys).values()) == 1
