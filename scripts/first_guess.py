"""How often a guess from the answer's first token (``inference.lookup``) starts at the right place:
for each answer of several tokens that copies its paragraph, whether the first place its first
token appears in the prompt is followed by the rest of it; beside two other choices (the place
with most question tokens within 10 tokens of it; the first 2 or 3 places that continue
differently, as if each were checked). Tokenizer only: no model runs.

    python scripts/first_guess.py --model $(../shared/tools/get-smollm2) \\
        --eval-file ../shared/data/squad/proxy-dev-v1.1.json --predictions RUN/predictions.json

``--predictions``: a paragraph-level ``loraqa evaluate`` run's answers (default template).
"""

from __future__ import annotations

import argparse
import json

from loraqa.data.prompt import DEFAULT_TEMPLATE, format_prompt
from loraqa.model.load import load_tokenizer

NEAR = 10  # tokens either side of a place that count its question tokens


def places(prompt: list[int], first: int) -> list[int]:
    """Where ``first`` appears with something after it."""
    return [i for i in range(len(prompt) - 1) if prompt[i] == first]


def distinct(prompt: list[int], found: list[int], k: int) -> list[int]:
    """The first ``k`` places whose next tokens differ."""
    seen, out = set(), []
    for i in found:
        if prompt[i + 1] not in seen:
            seen.add(prompt[i + 1])
            out.append(i)
    return out[:k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the model whose tokenizer guesses")
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--predictions", required=True)
    args = parser.parse_args()
    tok = load_tokenizer(args.model)
    predictions = json.loads(open(args.predictions).read())
    space = tok(" 1", add_special_tokens=False)["input_ids"][0]
    counts = {"first": 0, "question": 0, "first 2": 0, "first 3": 0}
    answers = numbers = numbers_first = numbers_3 = 0
    for article in json.loads(open(args.eval_file).read())["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                answer = predictions.get(qa["id"], "")
                target = tok(" " + answer, add_special_tokens=False)["input_ids"] if answer else []
                if len(target) < 2:
                    continue
                prompt = tok(format_prompt(DEFAULT_TEMPLATE, paragraph["context"], qa["question"]))["input_ids"]
                found = places(prompt, target[0])
                right = {i for i in found if prompt[i + 1:i + len(target)] == target[1:]}
                if not right:
                    continue  # not a copy of its paragraph as tokenised there
                answers += 1
                asked = set(tok(" " + qa["question"], add_special_tokens=False)["input_ids"])
                near = max(found, key=lambda i: (len(asked & set(prompt[max(0, i - NEAR):i + NEAR])), -i))
                hits = {"first": found[0] in right, "question": near in right,
                        "first 2": bool(right & set(distinct(prompt, found, 2))),
                        "first 3": bool(right & set(distinct(prompt, found, 3)))}
                for name, hit in hits.items():
                    counts[name] += hit
                if target[0] == space:
                    numbers += 1
                    numbers_first += hits["first"]
                    numbers_3 += hits["first 3"]
    print(f"{answers} answers of several tokens that copy their paragraph; right place:")
    for name, n in counts.items():
        print(f"  {name}: {n} ({100 * n / answers:.0f}%)")
    print(f"numbers (a lone ' ' first): {numbers}; the first place right {numbers_first}, "
          f"one of the first 3 {numbers_3}")


if __name__ == "__main__":
    main()
