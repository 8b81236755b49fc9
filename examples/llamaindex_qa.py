"""Question answering over a folder of text files with LlamaIndex: its BM25 retriever
(``llama-index-retrievers-bm25``), its default query engine and prompts, and ``loraqa serve`` as the
model (offline: no embedding model; the tokenizer a word split, as tiktoken downloads its tables).

    loraqa serve --model M --adapter RUN/adapter &        # http://127.0.0.1:8000
    python examples/llamaindex_qa.py --folder my-notes/ --question "When was the mill rebuilt?"
"""

from __future__ import annotations

from _folder import read_folder, recipe_args, served_model


def main() -> None:
    args = recipe_args(__doc__)

    from llama_index.core import Document, Settings
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.query_engine import RetrieverQueryEngine
    from llama_index.llms.openai_like import OpenAILike
    from llama_index.retrievers.bm25 import BM25Retriever

    Settings.tokenizer = str.split
    documents = [Document(text=text, metadata={"source": name}) for name, text in read_folder(args.folder)]
    # metadata kept out of the text the model reads: the passage is the files' own words
    for d in documents:
        d.excluded_llm_metadata_keys = ["source"]
    nodes = SentenceSplitter(chunk_size=200, chunk_overlap=20).get_nodes_from_documents(documents)
    retriever = BM25Retriever.from_defaults(nodes=nodes, similarity_top_k=args.k)
    llm = OpenAILike(model=served_model(args.url), api_base=args.url, api_key="none", is_chat_model=True,
                     temperature=0)
    engine = RetrieverQueryEngine.from_args(retriever, llm=llm)
    response = engine.query(args.question)
    print(str(response))
    print("sources:", ", ".join(dict.fromkeys(n.node.metadata["source"] for n in response.source_nodes)))


if __name__ == "__main__":
    main()
