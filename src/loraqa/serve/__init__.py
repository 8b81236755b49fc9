"""Serving over HTTP: the app and its routes (``/answer``, OpenAI's API, loading adapters, metrics),
who may ask, what a request may hold, and the batcher that puts concurrent requests into one decoding
batch. The answering itself is ``inference``'s: a server is a thin layer over what ``loraqa ask`` runs."""
