"""Each framework's default question-answering chain, given passages and a question, against any
OpenAI-compatible server (``loraqa serve``): what ``scripts/record_framework_requests.py`` records,
``benchmarks/frameworks.py`` scores and the recipes beside this file (``*_qa.py``) run over a folder.

Offline as they stand: no embedding model (LlamaIndex's mock embedding is never called by a summary
index), LlamaIndex's tokenizer a whitespace split (its default, tiktoken, downloads its tables),
Haystack's telemetry off. The prompts are the frameworks' own: LlamaIndex's and the stuff chain's
come with the libraries; LangChain's RAG prompt (its hub's ``rlm/rag-prompt``, which the RAG tutorial
pulls) and Haystack's (its tutorial's and its get-started page's) are written out here, as the hub and
the pages are not reachable offline.
"""

from __future__ import annotations

import os

os.environ.setdefault("HAYSTACK_TELEMETRY_ENABLED", "False")
os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

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


def langchain_rag(base: str, model: str, passages: list[str], question: str) -> str:
    """The RAG tutorial's prompt through ``ChatOpenAI`` (its chunks joined by a blank line, as the tutorial's
    ``format_docs`` does)."""
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    prompt = ChatPromptTemplate.from_messages([("human", RAG_PROMPT)])
    llm = ChatOpenAI(model=model, base_url=base, api_key="none", temperature=0)
    return (prompt | llm).invoke({"context": "\n\n".join(passages), "question": question}).content


def langchain_stuff(base: str, model: str, passages: list[str], question: str) -> str:
    """``create_stuff_documents_chain`` with the system prompt of LangChain's retrieval docs."""
    try:
        from langchain_classic.chains.combine_documents import create_stuff_documents_chain
    except ImportError:  # LangChain before 1.0
        from langchain.chains.combine_documents import create_stuff_documents_chain
    from langchain_core.documents import Document
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_openai import ChatOpenAI

    prompt = ChatPromptTemplate.from_messages([("system", STUFF_SYSTEM), ("human", "{input}")])
    chain = create_stuff_documents_chain(ChatOpenAI(model=model, base_url=base, api_key="none", temperature=0), prompt)
    return chain.invoke({"context": [Document(page_content=p) for p in passages], "input": question})


def llama_index(base: str, model: str, passages: list[str], question: str, refine: bool = False) -> str:
    """LlamaIndex's default query engine over the passages (``text_qa_template``; ``refine``: its refine mode)."""
    from llama_index.core import Document, Settings, SummaryIndex
    from llama_index.core.embeddings import MockEmbedding
    from llama_index.llms.openai_like import OpenAILike

    Settings.embed_model = MockEmbedding(embed_dim=8)
    Settings.tokenizer = str.split
    llm = OpenAILike(model=model, api_base=base, api_key="none", is_chat_model=True, temperature=0)
    index = SummaryIndex.from_documents([Document(text=p) for p in passages])
    return str(index.as_query_engine(llm=llm, response_mode="refine" if refine else "compact").query(question))


def haystack(base: str, model: str, passages: list[str], question: str, system: bool = False) -> str:
    """Haystack's RAG tutorial (``ChatPromptBuilder`` + ``OpenAIChatGenerator``); with ``system``, its
    get-started page's prompt (one system message)."""
    from haystack import Document, Pipeline
    from haystack.components.builders import ChatPromptBuilder
    from haystack.components.generators.chat import OpenAIChatGenerator
    from haystack.dataclasses import ChatMessage
    from haystack.utils import Secret

    template = [ChatMessage.from_system(HAYSTACK_START)] if system else [ChatMessage.from_user(HAYSTACK_TEMPLATE)]
    pipe = Pipeline()
    pipe.add_component("prompt_builder", ChatPromptBuilder(template=template, required_variables="*"))
    pipe.add_component("llm", OpenAIChatGenerator(api_key=Secret.from_token("none"), model=model, api_base_url=base))
    pipe.connect("prompt_builder.prompt", "llm.messages")
    out = pipe.run({"prompt_builder": {"documents": [Document(content=p) for p in passages], "question": question}})
    return out["llm"]["replies"][0].text


CHAINS = {"langchain-rag": (langchain_rag, "langchain-openai"), "langchain-stuff": (langchain_stuff, "langchain"),
          "llama-index": (llama_index, "llama-index-core"),
          "llama-index-refine": (lambda *a: llama_index(*a, refine=True), "llama-index-core"),
          "haystack": (haystack, "haystack-ai"),
          "haystack-get-started": (lambda *a: haystack(*a, system=True), "haystack-ai")}
