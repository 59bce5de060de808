"""Chat prompts for instruct models: render with the tokenizer's own chat template, stop at its end of turn.

The end-of-turn token is read from the template, not assumed: an assistant message with a sentinel content
is rendered and the first special token after the sentinel is the template's end of turn (``<|im_end|>``
for ChatML, ``<|eot_id|>`` for Llama 3, ``<end_of_turn>`` for Gemma).
"""

from __future__ import annotations

from card.errors import CardError

_SENTINEL = "\u2063card-end-of-turn-probe\u2063"


def messages(user: str, system: str | None = None) -> list[dict[str, str]]:
    """One user turn, after an optional system message."""
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]


def check_chat_template(tokenizer, what: str = "the tokenizer") -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise CardError(f"{what} has no chat template; drop --chat (or use a checkpoint converted from an instruct "
                        "model, whose tokenizer carries one)")


def render_ids(tokenizer, conversation: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``conversation`` rendered with the chat template (the template adds any BOS itself)."""
    check_chat_template(tokenizer)
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def chat_prompt_ids(tokenizer, user: str, system: str | None = None) -> list[int]:
    """``user`` (after ``system``) as a chat prompt that ends where the assistant's answer starts."""
    return render_ids(tokenizer, messages(user, system), add_generation_prompt=True)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token(s) the chat template puts after an assistant message, plus the tokenizer's EOS."""
    check_chat_template(tokenizer)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _SENTINEL}]
    text = tokenizer.apply_chat_template(conv, tokenize=False)
    after = text[text.index(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in text else ""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)}
    ids = [i for i in tokenizer(after, add_special_tokens=False)["input_ids"] if i in special][:1]
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise CardError("the chat template marks no end of turn and the tokenizer has no EOS token; cannot tell "
                        "where an answer ends")
    return ids


def render_with_spans(tokenizer, conversation: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation rendered with the chat template, and the character spans of the assistant turns.

    An assistant turn's span runs from the end of the conversation before it rendered with the generation
    prompt (``<|im_start|>assistant\\n`` in ChatML) to the end of the conversation rendered up to and including
    it, so it holds the answer and the template's end of turn: what a model must learn to produce.
    """
    check_chat_template(tokenizer)
    render = lambda conv, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        conv, tokenize=False, add_generation_prompt=gen)
    text = render(conversation)
    spans = []
    for i, m in enumerate(conversation):
        if m["role"] != "assistant":
            continue
        before = render(conversation[:i], True) if i else ""
        upto = render(conversation[:i + 1])
        if not (text.startswith(upto) and upto.startswith(before)):
            raise CardError("the chat template does not render a conversation as the concatenation of its turns; "
                            "cannot find the assistant turns")
        spans.append((len(before), len(upto)))
    return text, spans
