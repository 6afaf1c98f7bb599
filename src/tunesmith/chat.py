"""Chat examples as they are served: the model's chat template rendered over the whole
conversation, with the same ``apply_chat_template`` call generation and the server make and
the same tokenization (no extra special tokens), and a loss mask over the assistant's messages.

The assistant's spans are found by rendering prefixes of the conversation: a span starts where
generation would start writing (the conversation before it, rendered with the generation prompt)
and ends with its end-of-turn token. Hugging Face's ``return_assistant_tokens_mask`` needs
``{% generation %}`` markers in the template, which most templates (SmolLM2's included) lack.
"""

from __future__ import annotations

from .errors import TunesmithError

CHAT_LOSS = ("assistant", "all")


def render_chat(messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The chat template over ``messages``, as generation and the server render it."""
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt)


def chat_spans(messages: list[dict], tokenizer) -> tuple[str, list[tuple[int, int, bool]]]:
    """The rendered conversation and, for each assistant message, its character span and whether
    it is learned (OpenAI's ``weight``: 0 leaves it out).

    A span runs from the end of the conversation before it rendered with the generation prompt
    (where generation would start writing) to the end of the conversation through it, without the
    whitespace the template puts after the end-of-turn token. Found by rendering prefixes, so it
    works for any template that renders a conversation as the concatenation of its turns.
    """
    full = render_chat(messages, tokenizer)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(messages[:i], tokenizer, add_generation_prompt=True)
        through = render_chat(messages[: i + 1], tokenizer).rstrip()
        if not (full.startswith(before) and full.startswith(through) and len(before) <= len(through)):
            raise TunesmithError(
                f"the chat template does not render message {i} as a continuation of the messages before it, "
                "so the assistant's tokens cannot be found", field=f"messages[{i}]",
                hint="use a base model whose chat template renders each turn after the last, or prompt/completion rows",
            )
        spans.append((len(before), len(through), message.get("weight", 1) != 0))
    return full, spans


def encode_chat(messages: list[dict], tokenizer, loss: str = "assistant") -> tuple[list[int], list[bool]]:
    """Token ids and loss mask of a conversation rendered with the chat template.

    ``loss="assistant"`` learns the tokens of the assistant's messages (each ending with the
    end-of-turn token), ``"all"`` every token; either way an assistant message with ``weight`` 0
    is not learned. The text is tokenized piece by piece, cut at the spans' edges, so a mask edge
    never falls inside a token; for templates that separate turns with special tokens the ids
    are those of tokenizing the rendered text in one go.
    """
    if loss not in CHAT_LOSS:
        raise TunesmithError(f"must be one of {', '.join(CHAT_LOSS)}, not {loss!r}", field="chat_loss")
    full, spans = chat_spans(messages, tokenizer)
    ids: list[int] = []
    mask: list[bool] = []
    at = 0
    for start, end, learned in spans:
        for piece, target in ((full[at:start], loss == "all"), (full[start:end], learned)):
            piece_ids = tokenizer.encode(piece, add_special_tokens=False) if piece else []
            ids.extend(piece_ids)
            mask.extend([target] * len(piece_ids))
        at = end
    tail = tokenizer.encode(full[at:], add_special_tokens=False) if full[at:] else []
    ids.extend(tail)
    mask.extend([loss == "all"] * len(tail))
    return ids, mask
