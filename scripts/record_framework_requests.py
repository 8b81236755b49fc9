"""Record the exact requests LangChain, LlamaIndex and Haystack send to an OpenAI-compatible server
when their default question-answering chains ask a question about a passage; written as the fixtures
``tests/fixtures/frameworks/*.json`` that the tests replay against ``loraqa serve`` without the
frameworks installed.

    pip install -e '.[frameworks]'
    python scripts/record_framework_requests.py --output tests/fixtures/frameworks

A recording server on 127.0.0.1 answers every chat request with a fixed answer and keeps its body;
each framework runs its own default chain (its documented RAG prompt) over two tiny passages.
"""

from __future__ import annotations

import argparse
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from importlib.metadata import version
from pathlib import Path

PASSAGES = [
    ("The mill on the Wey was rebuilt in 1887 by the Muller family, after the flood of 1886 had carried "
     "its wheel away.", "When was the mill rebuilt?"),
    ("Steam engines use a boiler to raise steam, which pushes a piston; the condenser returns the "
     "working fluid to the boiler as a liquid.", "What pushes the piston?"),
]
RECORDED: list[dict] = []


class Recorder(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - the standard library's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        RECORDED.append({"path": self.path, "body": body})
        reply = {"id": "r", "object": "chat.completion", "created": 0, "model": body.get("model", "m"),
                 "choices": [{"index": 0, "finish_reason": "stop",
                              "message": {"role": "assistant", "content": "1887"}}],
                 "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        data = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def langchain(base: str, passage: str, question: str) -> None:
    """The LangChain RAG tutorial's prompt (its hub prompt ``rlm/rag-prompt``, written out: the hub is
    not reachable) through ``ChatOpenAI``."""
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    prompt = ChatPromptTemplate.from_messages([("human", RAG_PROMPT)])
    llm = ChatOpenAI(model="m", base_url=base, api_key="none", temperature=0)
    (prompt | llm).invoke({"context": passage, "question": question})


def langchain_stuff(base: str, passage: str, question: str) -> None:
    """LangChain's ``create_stuff_documents_chain`` with the system prompt of its retrieval docs."""
    try:
        from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    except ImportError:  # LangChain before 1.0
        from langchain.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.documents import Document
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    prompt = ChatPromptTemplate.from_messages([("system", STUFF_SYSTEM), ("human", "{input}")])
    chain = create_stuff_documents_chain(ChatOpenAI(model="m", base_url=base, api_key="none", temperature=0), prompt)
    chain.invoke({"context": [Document(page_content=passage)], "input": question})


def llama_index(base: str, passage: str, question: str, refine: bool = False) -> None:
    """LlamaIndex's default query engine (``text_qa_template`` and its system prompt) over one document;
    with ``refine``, its refine mode over the passage and another document (the last request: its
    refine template, the passage as the new context)."""
    from llama_index.core import Document, Settings, SummaryIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.llms.openai_like import OpenAILike

    Settings.embed_model = MockEmbedding(embed_dim=8)
    Settings.tokenizer = str.split  # its default, tiktoken, downloads its tables
    llm = OpenAILike(model="m", api_base=base, api_key="none", is_chat_model=True, temperature=0)
    documents = [Document(text=OTHER), Document(text=passage)] if refine else [Document(text=passage)]
    engine = SummaryIndex.from_documents(documents).as_query_engine(llm=llm, response_mode="refine" if refine else
                                                                     "compact")
    engine.query(question)


def haystack(base: str, passage: str, question: str, system: bool = False) -> None:
    """Haystack's RAG tutorial: ``ChatPromptBuilder`` with its template, ``OpenAIChatGenerator``; with
    ``system``, its get-started page's (the documents and question in one system message)."""
    from haystack import Document, Pipeline
    from haystack.components.builders import ChatPromptBuilder
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.dataclasses import ChatMessage
    from haystack.utils import Secret

    template = [ChatMessage.from_system(HAYSTACK_START)] if system else [ChatMessage.from_user(HAYSTACK_TEMPLATE)]
    pipe = Pipeline()
    pipe.add_component("prompt_builder", ChatPromptBuilder(template=template, required_variables="*"))
    pipe.add_component("llm", OpenAIChatGenerator(api_key=Secret.from_token("none"), model="m", api_base_url=base))
    pipe.connect("prompt_builder.prompt", "llm.messages")
    pipe.run({"prompt_builder": {"documents": [Document(content=passage)], "question": question}})


# LangChain hub's rlm/rag-prompt, the RAG tutorial's prompt
RAG_PROMPT = ("You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
              "answer the question. If you don't know the answer, just say that you don't know. Use three sentences "
              "maximum and keep the answer concise.\nQuestion: {question} \nContext: {context} \nAnswer:")
# LangChain's retrieval docs (create_stuff_documents_chain + create_retrieval_chain)
STUFF_SYSTEM = ("You are an assistant for question-answering tasks. Use the following pieces of retrieved context to "
                "answer the question. If you don't know the answer, say that you don't know. Use three sentences "
                "maximum and keep the answer concise.\n\n{context}")
# Haystack's "Creating Your First QA Pipeline with Retrieval-Augmentation" tutorial
HAYSTACK_TEMPLATE = """
Given the following information, answer the question.

Context:
{% for document in documents %}
    {{ document.content }}
{% endfor %}

Question: {{question}}
Answer:
"""

# Haystack's "Get Started" page
HAYSTACK_START = """
Given these documents, answer the question.
Documents:
{% for doc in documents %}
    {{ doc.content }}
{% endfor %}
Question: {{question}}
Answer:
"""

OTHER = "The valley's roads were paved in 1902."

FRAMEWORKS = {"langchain-rag": (langchain, "langchain-openai"), "langchain-stuff": (langchain_stuff, "langchain"),
              "llama-index": (llama_index, "llama-index-core"), "haystack": (haystack, "haystack-ai"),
              "llama-index-refine": (lambda *a: llama_index(*a, refine=True), "llama-index-core"),
              "haystack-get-started": (lambda *a: haystack(*a, system=True), "haystack-ai")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tests/fixtures/frameworks")
    args = parser.parse_args()
    server = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}/v1"
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    for name, (run, package) in FRAMEWORKS.items():
        RECORDED.clear()
        cases = []
        for passage, question in PASSAGES:
            run(base, passage, question)
            chats = [r for r in RECORDED if r["path"].endswith("/chat/completions")]
            cases.append({"passage": passage, "question": question, "request": chats[-1]["body"]})
            RECORDED.clear()
        (out / f"{name}.json").write_text(json.dumps({"framework": package, "version": version(package),
                                                      "cases": cases}, indent=2) + "\n")
        print(f"{name}: {package} {version(package)}, {len(cases)} requests")
    server.shutdown()


if __name__ == "__main__":
    main()
