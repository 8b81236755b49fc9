"""Inference: batched greedy decoding (optionally held to the passage), evaluating a set of
questions, answering with a loaded model (``ask``), and the HTTP server (``serve``)."""
