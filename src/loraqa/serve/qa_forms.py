"""A passage and a question in the shapes question-answering frameworks send by default.

The chat route's own shape is a passage as the system message and the question as the user's. The
frameworks people build question answering with send others, from their default prompts (recorded
by ``scripts/record_framework_requests.py``, replayed by ``tests/serve/test_qa_forms.py``):

- LangChain's RAG prompt (``rlm/rag-prompt``, its RAG tutorial): one user message, an instruction,
  then ``Question: ... \\nContext: ... \\nAnswer:``;
- LangChain's ``create_stuff_documents_chain`` (its retrieval docs): an instruction and the retrieved
  context in the system message, the question as the user's;
- LlamaIndex's query engine: its system prompt (an instruction, "You are an expert Q&A system ...")
  and ``text_qa_template`` (``Context information is below.`` ... ``Query: ...``) in the user message;
  its refine templates (completion and chat) for a context that did not fit one call (answered from
  the new context, or the existing answer where the new context does not answer);
- Haystack's RAG examples (``ChatPromptBuilder`` / ``PromptBuilder``): one message, an instruction,
  ``Context:`` or ``Documents:`` with the documents (indented by the template), ``Question: ...``;
- the generic ``Context: ... Question: ...`` (either order) in one message.

Known forms are matched by their own words; any other message is read by labels (``Context:``,
``Documents:``, ``Information:``, ``Passage:`` and ``Question:``, ``Query:``), and what has none
is a 400 that names the accepted shapes. Retrieved chunks are joined by a blank line: one passage,
read in windows where it is long (``inference.documents``).
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass

SHAPES = ("the passage as the system message and the question as the user's; or one message with "
          "'Context: ...' and 'Question: ...' (LangChain's, LlamaIndex's and Haystack's default "
          "question-answering prompts among them)")


@dataclass(frozen=True)
class QA:
    context: str
    question: str
    form: str                    # which shape it was read as (the log and /metrics say)
    existing: str | None = None  # LlamaIndex's refine: the answer to keep where the new context has none


_S = re.DOTALL
LLAMA_QA = re.compile(r"Context information is below\.\n-+\n(?P<context>.*)\n-+\nGiven the context information and "
                      r"not prior knowledge, answer the query\.\nQuery: (?P<question>.*?)\nAnswer: ?", _S)
LLAMA_REFINE = re.compile(r"The original query is as follows: (?P<question>.*?)\nWe have provided an existing answer: "
                          r"(?P<existing>.*?)\nWe have the opportunity to refine the existing answer \(only if "
                          r"needed\) with some more context below\.\n-+\n(?P<context>.*)\n-+\nGiven the new context, "
                          r"refine the original answer to better answer the query\. If the context isn't useful, "
                          r"return the original answer\.\nRefined Answer: ?", _S)
LLAMA_CHAT_REFINE = re.compile(r"You are an expert Q&A system that strictly operates in two modes when refining existing "
                               r"answers:.*?\nNew Context: (?P<context>.*)\nQuery: (?P<question>.*?)\nOriginal Answer: "
                               r"(?P<existing>.*?)\nNew Answer: ?", _S)
LANGCHAIN_RAG = re.compile(r"You are an assistant for question-answering tasks\..*?\nQuestion: (?P<question>.*?) ?\n"
                           r"Context: (?P<context>.*?) ?\nAnswer: ?", _S)
LANGCHAIN_STUFF = re.compile(r"You are an assistant for question-answering tasks\. Use the following pieces of "
                             r"retrieved context to answer the question\.[^\n]*\n\n(?P<context>.*)", _S)
HAYSTACK = re.compile(r"\s*Given (?:the following information|these documents), answer the question\.\s*\n"
                      r"(?:Context|Documents):\n(?P<context>.*?)\n\s*Question: (?P<question>.*?)\s*\nAnswer:\s*", _S)
FORMS = (("llama-index text_qa", LLAMA_QA), ("llama-index refine", LLAMA_REFINE),
         ("llama-index chat refine", LLAMA_CHAT_REFINE),
         ("langchain rag-prompt", LANGCHAIN_RAG), ("haystack rag", HAYSTACK))
# an instruction a framework puts in the system message, with the question-answering prompt in the user's
INSTRUCTIONS = ("You are an expert Q&A system",)
CONTEXT_LABEL = re.compile(r"^[ \t]*(?:Context(?: information)?|Documents?|Information|Passage|Text)\s*:[ \t]*", re.M | re.I)
QUESTION_LABEL = re.compile(r"^[ \t]*(?:Question|Query|Q)\s*:[ \t]*", re.M | re.I)
ANSWER_CUE = re.compile(r"\n[ \t]*(?:Answer|Refined Answer|A)\s*:\s*$", re.I)


def read_messages(system: str | None, user: str) -> QA | None:
    """The passage and question of a chat request (its system message, if any, and its last user
    message), or None where neither a passage nor a question can be found."""
    found = read_text(user)
    if found is not None:  # the user message holds both: the system message is an instruction
        return found
    if system and system.strip():
        stuffed = LANGCHAIN_STUFF.fullmatch(system.strip())
        if stuffed:
            return QA(stuffed["context"], user.strip(), "langchain stuff")
        if not system.lstrip().startswith(INSTRUCTIONS):
            return QA(system, user, "system passage")
    return None


def read_text(text: str) -> QA | None:
    """The passage and question of one message (or completion prompt) in a known form, or by its
    labels; None for a text with no context or no question label."""
    for form, pattern in FORMS:
        match = pattern.fullmatch(text)
        if match and match["context"].strip() and match["question"].strip():
            return QA(_documents(match["context"]) if form == "haystack rag" else match["context"],
                      match["question"].strip(), form, match.groupdict().get("existing"))
    return _by_labels(text)


def _documents(block: str) -> str:
    """Haystack's documents as its template lays them out (each indented, in blank lines): one passage,
    its documents a blank line apart."""
    chunks = [textwrap.dedent(c).strip() for c in re.split(r"\n[ \t]*\n", block)]
    return "\n\n".join(c for c in chunks if c)


def _by_labels(text: str) -> QA | None:
    """The text after the last context label (up to the question label) and the question after the
    last question label (up to an answer cue), in either order."""
    text = ANSWER_CUE.sub("", text.rstrip())
    contexts, questions = list(CONTEXT_LABEL.finditer(text)), list(QUESTION_LABEL.finditer(text))
    if not contexts or not questions:
        return None
    c, q = contexts[-1], questions[-1]
    if c.start() < q.start():
        context, question = text[c.end():q.start()], text[q.end():]
    else:
        question, context = text[q.end():c.start()], text[c.end():]
    context, question = context.strip(), question.strip()
    if not context or not question:
        return None
    return QA(context, question, "labels")
