"""dragrt.runtime.cache: content-addressed caches (inversions, LoRAs, reference features).

- :func:`content_hash`: SHA-256 of structured values (tensors, arrays, images, configs).
- :func:`module_fingerprint`: SHA-256 of a network's class, config and exact weights, cheap to repeat.
- :class:`TensorCache`: memory LRU + optional safetensors files, ``key -> dict[str, Tensor]``.
"""

from dragrt.runtime.cache.store import CacheWarning, TensorCache, content_hash, metadata_json, module_fingerprint

__all__ = ["CacheWarning", "TensorCache", "content_hash", "metadata_json", "module_fingerprint"]
