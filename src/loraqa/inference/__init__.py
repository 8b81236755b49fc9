"""Inference: batched greedy decoding (optionally held to the passage), evaluating a set of
questions, and answering with a loaded model (``ask``); ``serve`` puts it behind HTTP."""
