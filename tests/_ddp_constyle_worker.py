"""Run by tests/test_constyle.py: 3 steps of the constyle stage on 2 CPU ranks (gloo DDP), then each
rank saves its queue, pointer and the codes it enqueued last, for the test to compare.

Usage: python tests/_ddp_constyle_worker.py CONFIG OUT_DIR
"""

import sys

import lightning as L
import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.utils.data import DataLoader, Dataset

from lit_restore.config import load_config
from lit_restore.stages.constyle import ConStyleStage


class RandomImages(Dataset):
    """Different images per index; the distributed sampler gives each rank different indices."""

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"gt": torch.randint(0, 256, (3, 32, 32), generator=g, dtype=torch.uint8), "key": f"img{i:03d}"}


class RecordingStage(ConStyleStage):
    """Keeps the codes this rank enqueues (enqueue=query: the normalised z2 of its lq)."""

    def training_step(self, batch, batch_idx):
        with torch.no_grad():
            self.last_code = self.moco.code(self.moco.encoder_q(batch["lq"]).z2)
        return super().training_step(batch, batch_idx)


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    cfg = load_config(config, [f"out_dir={out}", "logger=none", "data.batch_size=4", "model.queue_size=32",
                               "model.enqueue=query", "model.cls_weight=1.0"])
    stage = RecordingStage(cfg)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        # Without buffer broadcasts: the queues must agree because every rank writes the same block.
        strategy=DDPStrategy(broadcast_buffers=False, process_group_backend="gloo"),
    )
    trainer.fit(stage, train_dataloaders=DataLoader(RandomImages(), batch_size=4, drop_last=True))
    torch.save(
        {
            "queue": stage.moco.queue.clone(),
            "ptr": stage.moco.queue_ptr.clone(),
            "code": stage.last_code.clone(),
            "world": trainer.world_size,
        },
        f"{out}/rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
