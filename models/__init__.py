"""Anomaly detection models: backbones, memory banks, the detector, metrics.

Nothing here imports Kafka, Faust or MinIO.
"""
