import os

# Tests never talk to wandb servers, and offline loggers must not leak a global mode.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")
