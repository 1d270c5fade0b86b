"""An example third-party vlkit plugin: one vision encoder and one fusion, registered by entry points.

* ``patch_cnn`` (:class:`~vlkit_plugin_example.patch_cnn.PatchCNNEncoder`): a small convolutional encoder
  that turns an image into a grid of patch tokens, stream ``tokens`` ``(B, (S/P)**2, width)``.
* ``attn_pool`` (:class:`~vlkit_plugin_example.attn_pool.AttentionPoolFusion`): a Perceiver-resampler-style
  fusion: a fixed number of learned queries cross-attend to every selected stream.

Nothing here imports vlkit's registries: the entry points in ``pyproject.toml`` name the classes, and vlkit
registers them under the entry-point names the first time a recipe or ``vlkit list`` looks a part up.
"""

from vlkit_plugin_example.attn_pool import AttentionPoolFusion
from vlkit_plugin_example.patch_cnn import PatchCNNEncoder

__all__ = ["AttentionPoolFusion", "PatchCNNEncoder"]
__version__ = "0.1.0"
