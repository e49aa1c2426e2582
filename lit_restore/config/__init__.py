"""Typed run configuration: dataclasses merged by OmegaConf from YAML plus `key=value` overrides.

Every stage config has the same top level (`RunConfig`); `model` is the stage's own dataclass,
chosen by `stage`. Unknown keys, wrong types and values outside a field's `choices` fail at
load time with one line naming the full key path and what is allowed.
"""

from lit_restore.config.base import ConfigError, UserError, choice
from lit_restore.config.data import SAMPLE_DIR, DataConfig, Source
from lit_restore.config.degrade import DegradeConfig, check_degrade
from lit_restore.config.load import load_config, load_model_config, schema_for, to_dict, to_yaml
from lit_restore.config.models import (AutoencoderModelConfig, BIQAModelConfig, CLIPTextConfig, ConStyleModelConfig,
                                       ConStyleNetConfig, LDMModelConfig, RestorerModelConfig, SCMModelConfig)
from lit_restore.config.run import STAGES, CheckpointConfig, OptimConfig, RunConfig, WandbConfig

__all__ = [
    "AutoencoderModelConfig", "BIQAModelConfig", "CLIPTextConfig", "CheckpointConfig", "ConStyleModelConfig",
    "ConStyleNetConfig", "ConfigError", "DataConfig", "DegradeConfig", "LDMModelConfig", "OptimConfig", "RestorerModelConfig",
    "RunConfig", "SAMPLE_DIR", "SCMModelConfig", "STAGES", "Source", "UserError", "WandbConfig", "check_degrade",
    "choice", "load_config", "load_model_config", "schema_for", "to_dict", "to_yaml",
]
