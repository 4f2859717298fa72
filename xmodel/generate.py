"""Text generation: KV cache, sampling, batched prompts with left padding, and a command line.

    python -m xmodel.generate --checkpoint DIR --prompt "Once upon a time" [--prompt ...] \
        [--max-new-tokens 64] [--temperature 0.8 --top-k 50 --top-p 0.95 --seed 0] [--device cuda] [--dtype bfloat16]

The tokenizer is ``DIR/tokenizer.json`` (read with ``tokenizers``); text is streamed for a single prompt.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from xmodel.model import Xmodel


class KVCache:
    """Keys and values of every layer, ``(batch, num_key_value_heads, length, head_dim)`` each.

    ``max_len`` given: static buffers of that many positions, written in place (no reallocation while decoding).
    ``max_len=None``: growing, concatenated per step.  The model calls ``update`` once per layer and ``advance``
    once per forward.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ):
        self.max_len = max_len
        self.length = 0
        if max_len is None:
            self.keys: list[torch.Tensor | None] = [None] * num_layers
            self.values: list[torch.Tensor | None] = [None] * num_layers
        else:
            shape = (batch_size, num_kv_heads, max_len, head_dim)
            self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]
            self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, model: Xmodel, batch_size: int, max_len: int | None = None) -> KVCache:
        cfg = model.config
        weight = model.model.embed_tokens.weight
        return cls(cfg.num_hidden_layers, batch_size, cfg.num_key_value_heads, cfg.head_dim, max_len,
                   weight.device, weight.dtype)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k, v`` (B, Hkv, T, D) after the cached positions; return all of this layer's keys/values."""
        start, end = self.length, self.length + k.shape[2]
        if self.max_len is None:
            if self.keys[layer] is None:
                self.keys[layer], self.values[layer] = k, v
            else:
                self.keys[layer] = torch.cat([self.keys[layer], k], dim=2)
                self.values[layer] = torch.cat([self.values[layer], v], dim=2)
            return self.keys[layer], self.values[layer]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; cannot write positions {start}..{end - 1}")
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, num_tokens: int) -> None:
        self.length += num_tokens


def sample_next_token(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick one token per row of ``logits`` (B, vocab).

    ``temperature <= 0``: greedy (argmax).  Otherwise sample from ``softmax(logits / temperature)`` restricted to
    the ``top_k`` largest logits and to the smallest set of tokens whose probability reaches ``top_p`` (nucleus).
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # mass before this token already reaches top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: Xmodel,
    prompts: Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    static_cache: bool = True,
    on_tokens: Callable[[list[int | None]], None] | None = None,
    stop_fn: Callable[[int, list[int]], bool] | None = None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids, or a (B, T) tensor) by up to ``max_new_tokens`` tokens.

    Prompts of different lengths are left-padded and masked.  Generation of a row stops at an EOS token
    (``eos_token_id``, default the config's) -- the EOS is not returned -- or after ``max_new_tokens``.
    ``on_tokens`` is called after each step with the new token of every row (None for finished rows).
    ``stop_fn(row, new_tokens)`` returning True also finishes a row (its last token is kept), e.g. on a stop string.
    Returns the new tokens of each prompt (prompt not included).
    """
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts tensor must have shape (batch, seq), got {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    prompts = [list(p) for p in prompts]
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    vocab = model.config.vocab_size
    if any(not 0 <= t < vocab for p in prompts for t in p):
        raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    if eos_token_id is None:
        eos = set(model.config.eos_token_ids)
    else:
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)

    device = model.model.embed_tokens.weight.device
    batch = len(prompts)
    lengths = [len(p) for p in prompts]
    width = max(lengths)
    total = width + max_new_tokens
    if total > model.config.max_position_embeddings:
        raise ValueError(
            f"prompt ({width}) + max_new_tokens ({max_new_tokens}) exceeds max_position_embeddings "
            f"({model.config.max_position_embeddings})"
        )
    ids = torch.tensor([[0] * (width - n) + p for p, n in zip(prompts, lengths)], device=device)
    padded = min(lengths) != width
    mask = None
    if padded:
        mask = torch.zeros(batch, total, dtype=torch.bool, device=device)
        for row, n in enumerate(lengths):
            mask[row, width - n:] = True
        positions = (mask[:, :width].long().cumsum(dim=1) - 1).clamp(min=0)
    else:
        positions = None
    next_pos = torch.tensor(lengths, device=device)[:, None]  # position of the first new token per row

    cache = KVCache.for_model(model, batch, total if static_cache else None)
    was_training = model.training
    model.eval()
    try:
        hidden = model.hidden_states(ids, positions, cache=cache, attention_mask=None if mask is None else mask[:, :width])
        logits = model.logits(hidden[:, -1])  # (B, vocab): only the last position is needed
        results: list[list[int]] = [[] for _ in range(batch)]
        done = [False] * batch
        for step in range(max_new_tokens):
            token = sample_next_token(logits, temperature, top_k, top_p, generator)
            step_tokens: list[int | None] = []
            for row, t in enumerate(token.tolist()):
                if done[row]:
                    step_tokens.append(None)
                elif t in eos:
                    done[row] = True
                    step_tokens.append(None)
                else:
                    results[row].append(t)
                    step_tokens.append(t)
                    if stop_fn is not None and stop_fn(row, results[row]):
                        done[row] = True
            if on_tokens is not None:
                on_tokens(step_tokens)
            if all(done) or step == max_new_tokens - 1:
                break
            step_mask = None if mask is None else mask[:, : width + step + 1]
            hidden = model.hidden_states(token[:, None], next_pos + step, cache=cache, attention_mask=step_mask)
            logits = model.logits(hidden[:, -1])
    finally:
        model.train(was_training)
    return results


# ------------------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------------------
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmodel.generate", description="Generate text with an Xmodel checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="HF checkpoint directory with tokenizer.json")
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--no-stream", action="store_true", help="print each completion when it is finished")
    args = parser.parse_args(argv)

    from tokenizers import Tokenizer

    checkpoint = Path(args.checkpoint)
    if not (checkpoint / "tokenizer.json").is_file():
        parser.error(f"no tokenizer.json in {checkpoint}")
    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = Xmodel.from_pretrained(checkpoint, device=args.device, dtype=dtype)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    prompts = [tokenizer.encode(p).ids for p in args.prompt]
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, generator=generator)

    if len(prompts) == 1 and not args.no_stream:
        shown = ""
        new: list[int] = []

        def stream(step_tokens: list[int | None]) -> None:
            nonlocal shown
            if step_tokens[0] is None:
                return
            new.append(step_tokens[0])
            text = tokenizer.decode(new)
            if text.startswith(shown) and not text.endswith("\ufffd"):  # wait for complete UTF-8 characters
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text

        sys.stdout.write(args.prompt[0])
        completion = generate(model, prompts, on_tokens=stream, **sampling)[0]
        sys.stdout.write(tokenizer.decode(completion)[len(shown):] + "\n")
        sys.stdout.flush()
        return 0

    for text, completion in zip(args.prompt, generate(model, prompts, **sampling)):
        print(text + tokenizer.decode(completion))
        print("-" * 40)
    return 0


if __name__ == "__main__":
    sys.exit(main())
