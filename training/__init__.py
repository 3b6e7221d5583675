"""Offline training of RNN, LSTM and GRU models on long-time-lag problems, and their ONNX export.

This package needs torch (the ``training`` extra). The serving path (``service``) never imports it.
"""
