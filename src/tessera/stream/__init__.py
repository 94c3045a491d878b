"""Streaming, layer-by-layer execution for parents that do not fit in memory (8B-class models on a 24 GiB box).

* `model`       `open_streamed(dir)`: the model built on the meta device with only the embedding, final norm and
                output head resident; each decoder layer is materialised from its memory-mapped safetensors shard
                when used. `should_stream` / `load_model`: the `--stream auto|on|off` choice every stage shares.
* `weights`     the shards' headers: where each tensor is, checked against config.json before any compute.
* `activations` a calibration set's hidden states between layers, in RAM or spilled to disk.
* `executor`    `run_layers`: each layer read once, every batch through it; observers (statistics) and branches
                (drop / replace one block) ride along.
* `writer`      `checkpoint_writer`: a child written shard by shard.

Stages call it: `tessera.importance` (statistics and drop scores), `tessera.prune.prune_to` (Minitron pruning of a
streamed parent, written streaming), `tessera.evaluate.kld` (parent logits by streaming). Peak memory is one layer
+ the calibration activations + the embedding and head, whatever the number of layers.
"""

from tessera.stream.activations import Activations, Budget
from tessera.stream.executor import Branch, Forward, LazyLogits, Observer, layer, run_layers
from tessera.stream.model import STREAM_MODES, describe, is_streamed, load_model, open_streamed, should_stream
from tessera.stream.writer import checkpoint_writer

__all__ = [
    "STREAM_MODES", "Activations", "Branch", "Budget", "Forward", "LazyLogits", "Observer", "checkpoint_writer",
    "describe", "is_streamed", "layer", "load_model", "open_streamed", "run_layers", "should_stream",
]
