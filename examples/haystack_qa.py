"""Question answering over a folder of text files with Haystack: ``InMemoryBM25Retriever``, its RAG
tutorial's ``ChatPromptBuilder`` template, ``OpenAIChatGenerator(api_base_url=...)`` pointed at
``loraqa serve`` (offline: no embedding model; telemetry off).

    loraqa serve --model M --adapter RUN/adapter &        # http://127.0.0.1:8000
    python examples/haystack_qa.py --folder my-notes/ --question "When was the mill rebuilt?"
"""

from __future__ import annotations

from _folder import read_folder, recipe_args, served_model
from chains import HAYSTACK_TEMPLATE


def main() -> None:
    args = recipe_args(__doc__)

    from haystack import Document, Pipeline
    from haystack.components.builders import ChatPromptBuilder
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.components.preprocessors import DocumentSplitter
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.dataclasses import ChatMessage
    from haystack.document_stores.in_memory import InMemoryDocumentStore
    from haystack.utils import Secret

    store = InMemoryDocumentStore()
    files = [Document(content=text, meta={"source": name}) for name, text in read_folder(args.folder)]
    splitter = DocumentSplitter(split_by="word", split_length=150, split_overlap=15)
    store.write_documents(splitter.run(files)["documents"])
    pipe = Pipeline()
    pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=args.k))
    pipe.add_component("prompt_builder", ChatPromptBuilder(template=[ChatMessage.from_user(HAYSTACK_TEMPLATE)],
                                                           required_variables="*"))
    pipe.add_component("llm", OpenAIChatGenerator(api_key=Secret.from_token("none"), model=served_model(args.url),
                                                  api_base_url=args.url))
    pipe.connect("retriever", "prompt_builder.documents")
    pipe.connect("prompt_builder.prompt", "llm.messages")
    out = pipe.run({"retriever": {"query": args.question}, "prompt_builder": {"question": args.question}},
                   include_outputs_from={"retriever"})
    print(out["llm"]["replies"][0].text or "(not found in the retrieved chunks)")
    print("sources:", ", ".join(dict.fromkeys(d.meta["source"] for d in out["retriever"]["documents"])))


if __name__ == "__main__":
    main()
