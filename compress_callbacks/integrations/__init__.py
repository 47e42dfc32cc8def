"""Adapters for existing trainers, imported only when used.

- ``compress_callbacks.integrations.transformers``: ``CompressionCallback``, ``DistillationTrainer``
- ``compress_callbacks.integrations.lightning``: ``CompressionCallback``
"""
