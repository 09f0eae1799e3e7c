"""Contracts shared by every layer: message formats, topic names and the site-state codec.

Nothing here imports Kafka, Faust, onnxruntime or torch.
"""
