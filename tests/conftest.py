import os

import pytest

# Tests never talk to wandb servers, and offline loggers must not leak a global mode.
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory):
    """Small `prep-sample` shards (64 px crops), built once per test session."""
    from data_prep.sample import prep_sample

    out = tmp_path_factory.mktemp("sample")
    assert prep_sample(str(out), crop=64, train_crops=16, val_crops=2, seed=0, overwrite=False) == 0
    return out
