"""Inference tasks on trained checkpoints: embeddings (`task=embed`), variant effects
(`task=vep`), and what they share with `task=score` (chunked exact forwards, sharding).
"""
