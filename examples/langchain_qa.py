"""Question answering over a folder of text files with LangChain: its BM25 retriever, its RAG tutorial's
chain, and ``loraqa serve`` as the model (offline: no embedding model).

    loraqa serve --model M --adapter RUN/adapter &        # http://127.0.0.1:8000
    python examples/langchain_qa.py --folder my-notes/ --question "When was the mill rebuilt?"
"""

from __future__ import annotations

from _folder import read_folder, recipe_args, served_model
from chains import RAG_PROMPT


def main() -> None:
    args = recipe_args(__doc__)

    from langchain_community.retrievers import BM25Retriever
    from langchain_core.documents import Document
    from langchain_core.output_parsers import StrOutputParser
    from langchain_core.prompts import ChatPromptTemplate
    from langchain_core.runnables import RunnablePassthrough
    from langchain_openai import ChatOpenAI
    from langchain_text_splitters import RecursiveCharacterTextSplitter

    files = [Document(page_content=text, metadata={"source": name}) for name, text in read_folder(args.folder)]
    chunks = RecursiveCharacterTextSplitter(chunk_size=1000, chunk_overlap=100).split_documents(files)
    retriever = BM25Retriever.from_documents(chunks, k=args.k)
    llm = ChatOpenAI(model=served_model(args.url), base_url=args.url, api_key="none", temperature=0)
    prompt = ChatPromptTemplate.from_messages([("human", RAG_PROMPT)])
    found = retriever.invoke(args.question)
    chain = ({"context": lambda _: "\n\n".join(d.page_content for d in found), "question": RunnablePassthrough()}
             | prompt | llm | StrOutputParser())
    print(chain.invoke(args.question) or "(not found in the retrieved chunks)")
    print("sources:", ", ".join(dict.fromkeys(d.metadata["source"] for d in found)))


if __name__ == "__main__":
    main()
