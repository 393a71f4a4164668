"""Kafka records, the camera-station producer and the Faust worker.

Importing this package or :mod:`qcstream.streams.producer` does not import torch or
Faust, so a camera station installs only the base dependencies.
"""
