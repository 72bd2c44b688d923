"""Fine-tuning: the ``finetune`` recipe, its config, data packing and resumable checkpoints.

```python
from fusionlm.training import FinetuneConfig, finetune, load_config

result = finetune(load_config("run.toml", ["lora=true", "max_steps=100"]))
```
"""

from fusionlm.training.config import FinetuneConfig, config_keys, load_config
from fusionlm.training.recipe import FinetuneResult, finetune

__all__ = ["FinetuneConfig", "FinetuneResult", "config_keys", "finetune", "load_config"]
