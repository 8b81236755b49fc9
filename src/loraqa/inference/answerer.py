"""A model loaded to answer questions: what ``loraqa ask`` and ``loraqa serve`` share (one decoder),
and the precision answering runs in."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

import loraqa
from loraqa.config import Config
from loraqa.data.examples import Example
from loraqa.data.features import Feature, FeatureStats, build_eval_features
from loraqa.inference.documents import read, window_part
from loraqa.inference.generate import predict, prefill_probe
from loraqa.inference.paths import check_support, support_for
from loraqa.inference.settings import DecodeSettings
from loraqa.io import log
from loraqa.model.adapters import AdapterSet, ReadAdapter
from loraqa.model.load import load_base, resolve_max_length
from loraqa.model.lora import load_adapter, merge_for_answering
from loraqa.model.multilora import BASE
from loraqa.model.passage_store import PassageStore, keep_passage
from loraqa.model.precision import autocast, choose_precision, store_frozen_weights
from loraqa.model.recall import check_key
from loraqa.model.span import answer_spans
from loraqa.training.processes import Processes


PROBE_ROWS = 8


def prepare_for_answering(model, tokenizer, settings: DecodeSettings, setting: str, device: torch.device,
                          examples: list[Example], check: str | None = None) -> tuple[Any, str, str]:
    """(model, precision, why) for answering ``examples`` under the ``--precision`` ``setting``: a
    LoRA adapter merged into the weights (``merge_for_answering``) and every linear weight stored
    in the precision (nothing trains). A probe, where ``auto`` needs one, prefills a batch of
    their prompts. ``check``: the key its path check is kept under (``model.recall.check_key``)."""
    features, _ = build_eval_features(tokenizer, examples[:64], settings.template, settings.max_length,
                                      settings.max_new_tokens)
    if settings.method != "span":  # in float32, before the precision (inference.paths)
        check_support(model, features, tokenizer.pad_token_id, settings.max_new_tokens, check)
    # a few median prompts: the probe compares precisions, and six prefills of a whole batch take minutes on a CPU
    step = prefill_probe(model, features, min(settings.batch_size, PROBE_ROWS), tokenizer.pad_token_id,
                         device) if features else None
    precision, why = choose_precision(model, setting, device, step, everything=True, answering=True)
    model = merge_for_answering(model, precision)  # merged before the rest is stored: see merge_for_answering
    store_frozen_weights(model, precision, everything=True)
    log(f"precision {precision} ({why})")
    return model, precision, why


@dataclass
class Answerer:
    model: Any
    tokenizer: Any
    settings: DecodeSettings
    device: torch.device
    precision: str
    precision_reason: str
    name: str         # the model, as given (GET /health)
    base_params: int  # the base model's parameters
    adapters: AdapterSet | None = None  # several LoRA adapters, unmerged, answered together (serve)
    passages: PassageStore | None = None  # documents' windows kept from request to request (serve)

    def features(self, examples: list[Example]) -> tuple[list[Feature], FeatureStats]:
        """Prompts within the token budget; contexts cut from the end where too long (counted)."""
        return build_eval_features(self.tokenizer, examples, self.settings.template, self.settings.max_length,
                                   self.settings.max_new_tokens)

    def decode(self, features: list[Feature], contexts: dict[str, str], progress: bool = False,
               adapters: dict[str, str] | None = None, on_token=None,
               na_probs: dict[str, float] | None = None) -> dict[str, str]:
        """{feature id: answer}; questions on the same passage share its prefill. ``contexts``
        ({feature id: passage}) hold answers to spans under ``--constrain-to-context``; ``adapters``
        ({feature id: adapter handle, or ``BASE``}), ``on_token`` and ``na_probs`` as ``predict`` takes them."""
        return predict(self.model, self.tokenizer, features, self.settings, self.device, self.precision,
                       contexts=contexts, progress=progress, adapters=adapters, on_token=on_token, na_probs=na_probs,
                       passages=self.passages)

    def read_ahead(self, window: str, adapter: str | None) -> bool:
        """Keep a document window's keys and values (its part of every question's prompt, as ``adapter``
        computes it) in ``passages``, before a question asks it; False where there was nothing to do."""
        ids = window_part(self.tokenizer, self.settings.template, window)
        if ids is None or self.passages is None or not self.passages.has_room():  # it lets nothing go
            return False
        route = None if self.adapters is None else (adapter or BASE)
        with autocast(self.device, self.precision):
            kept = keep_passage(self.model, ids, route, self.passages, support_for(self.model))
        self.passages.ahead += kept
        return kept

    def attach(self, adapter: ReadAdapter) -> None:
        """Add a read adapter (``model.adapters``): on the decoding thread, between batches."""
        self.adapters.attach(adapter)


def load_answerer(config: Config, adapter: str | None, probe_examples: list[Example],
                  named: list[tuple[str, str]] | None = None) -> Answerer:
    """Model (+ adapter, merged) on this machine's device, in the precision ``prepare_for_answering`` picks
    (where ``auto`` needs a probe, it prefills a batch of ``probe_examples``' prompts). With ``named``
    adapters ([(name, path)], possibly none yet: a server that loads them later), they stay unmerged
    over the base's layers (``model.adapters``), each checked against the base, and a batch may mix them."""
    device = Processes.single().device
    began = time.perf_counter()
    model, tokenizer, base_params = load_base(config)
    settings = DecodeSettings.from_config(config, resolve_max_length(config, model, tokenizer))
    loaded = time.perf_counter()
    if adapter:
        model = load_adapter(model, adapter, config)
    model.to(device)
    adapted = time.perf_counter()
    model, precision, why = prepare_for_answering(model, tokenizer, settings, config.precision, device, probe_examples,
                                                  check_key(model, config, adapter, "decoding path"))
    ready = time.perf_counter()
    # what the start cost, from loraqa's import: what benchmarks/cold_start.py breaks a cold start down by
    log(f"start: {ready - loraqa.STARTED:.2f} s (imports and input {began - loraqa.STARTED:.2f}, model {loaded - began:.2f}, "
        f"adapter {adapted - loaded:.2f}, path check and precision {ready - adapted:.2f})")
    answerer = Answerer(model, tokenizer, settings, device, precision, why, config.model, base_params)
    if named is not None:
        answerer.adapters = AdapterSet(model, config, config.model)
        for name, path in named:
            answerer.attach(answerer.adapters.read(name, path))
    return answerer


def ask(config: Config, adapter: str | None, examples: list[Example], progress: bool = False,
        sources: dict | None = None) -> dict[str, str | None]:
    """{id: answer} for each example, decoded in batches, a passage longer than a window read in
    windows (``inference.documents``; ``sources``, when given, gets where each of those answers came
    from); None for a question that could not be asked (too long to fit the model's window even
    with no passage), counted and named in the log."""
    answerer = load_answerer(config, adapter, examples)
    settings = answerer.settings
    if settings.method == "span":
        answers, _ = answer_spans(answerer.model, answerer.tokenizer, examples, max_length=settings.max_length,
                                  doc_stride=settings.doc_stride, batch_size=settings.batch_size,
                                  device=answerer.device, precision=answerer.precision,
                                  allow_no_answer=settings.allow_unanswerable,
                                  max_answer_tokens=settings.max_new_tokens, progress=progress)
        return {ex.id: answers.get(ex.id, "") for ex in examples}
    done = read(answerer.model, answerer.tokenizer, examples, settings, answerer.device, answerer.precision,
                progress=progress)
    if done.stats.windowed:
        log(f"{done.stats.windowed} passages cut to fit {settings.max_length} tokens")
    if sources is not None:
        sources.update(done.sources)
    unasked = [ex.id for ex in examples if ex.id not in done.answers]
    if unasked:
        log(f"{len(unasked)} question(s) not answered: too long to fit in {settings.max_length} tokens with the "
            f"answer, even with no passage: {', '.join(unasked[:10])}{' ...' if len(unasked) > 10 else ''}")
    return {ex.id: done.answers.get(ex.id) for ex in examples}
