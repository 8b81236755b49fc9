from loraqa.config import DEFAULT_TEMPLATE
from loraqa.data.prompt import context_span, cut_answer, format_prompt, format_target


def test_default_template_is_the_write_ups():
    assert format_prompt(DEFAULT_TEMPLATE, "C.", "Q?") == "Context: C.\nQuestion: Q?\nAnswer:"
    assert format_target(" Denver Broncos ") == " Denver Broncos"


def test_braces_and_placeholders_inside_text_are_left_alone():
    prompt = format_prompt(DEFAULT_TEMPLATE, "a {question} b {x}", "why {context}?")
    assert prompt == "Context: a {question} b {x}\nQuestion: why {context}?\nAnswer:"


def test_context_span_points_at_the_context_when_question_comes_first():
    template = "Q: {question}\nC: {context}\nA:"
    prompt = format_prompt(template, "the context", "what?")
    start, end = context_span(template, "the context", "what?")
    assert prompt[start:end] == "the context"


def test_cut_answer_keeps_the_first_line():
    assert cut_answer(" Denver Broncos\nQuestion: next") == "Denver Broncos"
    assert cut_answer("  1887 ") == "1887"
    assert cut_answer("\nlater") == ""
