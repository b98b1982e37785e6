"""How an example becomes prompt text: the chat template, the Alpaca template or plain text."""

from __future__ import annotations

from ..errors import UserError
from .examples import Example

PROMPT_STYLES = ("auto", "alpaca", "chat", "plain")

_ALPACA_HEADER = "Read the task below and write a response that completes it.\n\n"


def format_prompt(example: Example, tokenizer, style: str) -> str:
    """The prompt text without the response. "auto" means chat when the tokenizer has a chat
    template, else alpaca. Plain-text examples (no instruction, no input) have an empty prompt."""
    if style not in PROMPT_STYLES:
        raise UserError(f"data.prompt_style must be one of {', '.join(PROMPT_STYLES)}, got {style!r}")
    if not example.instruction and not example.input:
        return ""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        style = "chat" if has_template else "alpaca"
    if style == "chat":
        if not has_template:
            raise UserError(
                "data.prompt_style='chat' needs a tokenizer with a chat template; use 'alpaca' or 'plain'"
            )
        content = example.instruction + (f"\n\n{example.input}" if example.input else "")
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if style == "alpaca":
        task = f"### Task:\n{example.instruction}\n\n"
        extra = f"### Input:\n{example.input}\n\n" if example.input else ""
        return f"{_ALPACA_HEADER}{task}{extra}### Response:\n"
    return example.instruction + (f"\n{example.input}" if example.input else "") + "\n"
