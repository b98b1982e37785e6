"""Every fine-tuning setting, as dataclasses that document and check themselves (sections.py), and the one way
from YAML, flags or a nested dict to a checked FinetuneConfig (parsing.py).

Each field's docstring is what `skip2lora finetune --help` shows; each `__post_init__` rejects an impossible
value with one `UserError` line that says what to change.
"""

from ..errors import one_line
from ..paths import read_yaml
from .parsing import (CONFIG_EXTENSIONS, FLAG_ALIASES, build_finetune_config, config_sections, field_names,
                      finetune_config_class, finetune_config_from_dict, finetune_parser, register_config_extension,
                      to_plain_dict)
from .sections import (DATASET_NAMES, SECTIONS, DataConfig, EvalConfig, FinetuneConfig, LoRAConfig, Skip2LoRAConfig,
                       TrainConfig, _at_least, _positive, register_dataset_name)

__all__ = ["CONFIG_EXTENSIONS", "DATASET_NAMES", "FLAG_ALIASES", "SECTIONS", "DataConfig", "EvalConfig", "FinetuneConfig",
           "LoRAConfig", "Skip2LoRAConfig", "TrainConfig", "_at_least", "_positive", "build_finetune_config",
           "config_sections", "field_names", "finetune_config_class", "finetune_config_from_dict", "finetune_parser",
           "one_line", "read_yaml", "register_config_extension", "register_dataset_name", "to_plain_dict"]
