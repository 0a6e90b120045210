"""One lock for every model load of the process: transformers loads a model under class-wide patches.

transformers 5.24's ``from_pretrained`` and ``from_config`` build the model inside context managers that swap
process-wide functions for no-ops and restore them afterwards: ``PreTrainedModel.tie_weights`` and
``init_weights``, and ``torch.nn.init``'s functions in several torch modules. Two loads in two threads at once
interleave those swaps, and one of them can restore the other's no-op: from then on every load of a model with
tied embeddings leaves its ``lm_head`` uninitialised on the meta device ("Cannot copy out of meta tensor"), for
the whole life of the process. The app loads models in several threads (the training job, chat, export,
evaluation, the memory estimate), so each load in autotuning holds :data:`MODEL_LOADING`.
"""

from __future__ import annotations

import threading

__all__ = ["MODEL_LOADING"]

# Re-entrant: a load may load another (a base model under an adapter, a packaged model's dequantization).
MODEL_LOADING = threading.RLock()
