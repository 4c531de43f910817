"""What the terminal and web chats share: nanochat's chat prompt layout and streamed replies.

The layout: <|bos|>, then per message <|user_start|> text <|user_end|> or <|assistant_start|>
text <|assistant_end|>, and a final <|assistant_start|> that primes the reply. A reply streams
token by token until <|assistant_end|> (or <|bos|>); a character whose UTF-8 bytes span several
tokens is released once all of its bytes have arrived.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Iterable, Iterator

from nanochat_jax.engine import Engine


def render_prompt(tokenizer, messages: Iterable[dict[str, str]]) -> list[int]:
    """<|bos|>, each message between its role's start/end tokens, then <|assistant_start|>."""
    special = tokenizer.encode_special
    tokens = [tokenizer.get_bos_token_id()]
    for message in messages:
        start, end = f"<|{message['role']}_start|>", f"<|{message['role']}_end|>"
        tokens += [special(start), *tokenizer.encode(message["content"]), special(end)]
    tokens.append(special("<|assistant_start|>"))
    return tokens


def stream_text(
    tokens: Iterable[int], decode_bytes: Callable[[list[int]], bytes]
) -> Iterator[tuple[int, str]]:
    """(token, text) per token, where text is what can be shown now: the bytes of a character
    that spans several tokens are held back until it is complete (then shown whole)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in tokens:
        yield token, decoder.decode(decode_bytes([token]))


def stream_reply(
    engine: Engine,
    tokenizer,
    prompt: list[int],
    *,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
    seed: int,
) -> Iterator[tuple[int, str]]:
    """(token, printable text) of one sampled reply to `prompt`, up to its stop token (which is
    not yielded). At most `max_tokens`, and never past the context the model was trained on
    (deliberately: nanochat lets a chat run on into its 10x rotary table, where a model that never
    saw such positions degrades)."""
    room = engine.config.sequence_len - len(prompt)
    if room < 1:
        raise ValueError(
            f"the conversation is {len(prompt)} tokens but the model's context is "
            f"{engine.config.sequence_len}"
        )
    stop = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}
    columns = engine.generate(
        prompt,
        num_samples=1,
        max_tokens=min(max_tokens, room),
        temperature=temperature,
        top_k=top_k,
        seed=seed,
    )

    def until_stop() -> Iterator[int]:
        for column, _ in columns:
            if column[0] in stop:
                return
            yield column[0]

    try:
        yield from stream_text(until_stop(), tokenizer.decode_bytes)
    finally:
        columns.close()  # a client that goes away stops the decoding


def sample_answers(
    engine: Engine,
    tokenizer,
    conversation: dict,
    *,
    num_samples: int,
    max_tokens: int,
    temperature: float,
    top_k: int | None,
) -> list[str]:
    """The texts of `num_samples` answers to a task conversation (prompted up to its assistant
    turn), sampled with generate_batch's default seed as nanochat's evals do."""
    prompt = tokenizer.render_for_completion(conversation)
    results, _ = engine.generate_batch(
        prompt,
        num_samples=num_samples,
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
    )
    return [tokenizer.decode(tokens[len(prompt) :]) for tokens in results]
