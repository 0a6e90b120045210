"""autotuning: fine-tune Hugging Face causal language models end to end (config, data, LoRA/QLoRA training,
evaluation, verified exports). The library never imports gradio; the app in ``ui/`` sits on top of it."""

from .config import Config, load_config
from .errors import ConfigError, DataError, ExportError, ModelError, UserError

__version__ = "0.1.0"

__all__ = ["Config", "load_config", "UserError", "ConfigError", "DataError", "ModelError", "ExportError", "__version__"]
