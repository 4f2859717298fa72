"""Evaluation: an lm-evaluation-harness model class (registered as ``"xmodel"``) and validation perplexity.

lm-eval is an optional extra (``pip install -e .[eval]``).  lm-eval has no plugin discovery for models, so run it
through this module, which registers the class and then hands over to lm-eval's own command line::

    python -m xmodel.lm_eval_adapter --model xmodel --model_args checkpoint=DIR,dtype=bfloat16 \
        --tasks arc_challenge --num_fewshot 25 --batch_size 16 --device cuda

or from Python: ``import xmodel.lm_eval_adapter`` and then ``lm_eval.simple_evaluate(model="xmodel", ...)``.
The paper's 13 tasks and shot counts are ``PAPER_TASKS``.

:func:`evaluate_perplexity` (no lm-eval needed) computes the validation loss of a token file.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from xmodel.generate import generate
from xmodel.model import Xmodel

# Paper evaluation (arXiv 2511.19496): task -> (num_fewshot, metric).
PAPER_TASKS: dict[str, tuple[int, str]] = {
    "arc_challenge": (25, "acc_norm"),
    "arc_easy": (25, "acc_norm"),
    "piqa": (0, "acc_norm"),
    "hellaswag": (10, "acc_norm"),
    "winogrande": (5, "acc"),
    "bbh": (3, "exact_match"),
    "mmlu": (5, "acc"),
    "gsm8k": (8, "exact_match"),
    "minerva_math": (4, "exact_match"),
    "humaneval": (0, "pass@1"),
    "mbpp": (3, "pass@1"),
    "cmmlu": (5, "acc_norm"),
    "ceval-valid": (5, "acc_norm"),
}

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------------------
# Validation loss / perplexity (no lm-eval needed)
# ------------------------------------------------------------------------------------------------------------
def load_tokens(path: str | Path, dtype: str | np.dtype | None = None) -> np.ndarray:
    """A 1-D token array from ``.npy`` (memory-mapped) or a raw binary file of ``dtype`` (default uint16)."""
    path = Path(path)
    if path.suffix == ".npy":
        return np.load(path, mmap_mode="r").reshape(-1)
    return np.memmap(path, dtype=np.dtype(dtype or np.uint16), mode="r")


@torch.no_grad()
def evaluate_perplexity(
    model: Xmodel,
    tokens: np.ndarray | torch.Tensor | str | Path,
    seq_len: int = 1024,
    batch_size: int = 8,
    max_batches: int | None = None,
    token_dtype: str | None = None,
) -> dict[str, float]:
    """Mean next-token loss over ``tokens`` cut into non-overlapping windows of ``seq_len + 1`` tokens (each
    token after the first of a window is predicted once, from the window's earlier tokens).

    Returns ``{"loss", "perplexity", "tokens"}``.  A path is read with :func:`load_tokens`.
    """
    if isinstance(tokens, (str, Path)):
        tokens = load_tokens(tokens, token_dtype)
    flat = torch.as_tensor(np.asarray(tokens, dtype=np.int64)) if not isinstance(tokens, torch.Tensor) else tokens
    flat = flat.reshape(-1).long()
    n_windows = (flat.numel() - 1) // seq_len
    if n_windows < 1:
        raise ValueError(f"need at least seq_len + 1 = {seq_len + 1} tokens, got {flat.numel()}")
    device = model.model.embed_tokens.weight.device
    was_training = model.training
    model.eval()
    total_loss, total_tokens = 0.0, 0
    try:
        for b, start in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and b >= max_batches:
                break
            rows = [flat[w * seq_len : w * seq_len + seq_len + 1] for w in range(start, min(start + batch_size, n_windows))]
            batch = torch.stack(rows).to(device)
            out = model(batch[:, :-1], labels=batch[:, 1:])
            total_loss += out.loss.item() * out.num_tokens.item()
            total_tokens += out.num_tokens.item()
    finally:
        model.train(was_training)
    loss = total_loss / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": float(total_tokens)}


# ------------------------------------------------------------------------------------------------------------
# lm-eval model class
# ------------------------------------------------------------------------------------------------------------
try:
    import lm_eval.models  # noqa: F401  (fills the lazy registry first, so registering ours keeps the others)
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import model_registry, register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    LM_EVAL_IMPORT_ERROR: ImportError | None = None
except ImportError as error:  # lm-eval is optional
    LM_EVAL_IMPORT_ERROR = error


def _batched(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


if LM_EVAL_IMPORT_ERROR is None:

    class XmodelLM(TemplateLM):
        """lm-eval model over an Xmodel checkpoint directory (weights + ``tokenizer.json``).

        ``--model_args checkpoint=DIR[,dtype=bfloat16][,max_length=4096][,add_bos_token=False]``, ``--device cuda``
        (default: cuda when available), ``--batch_size N`` (``auto`` means ``max_batch_size`` or 8).  Contexts are encoded without special tokens
        (as lm-eval's HF model does for causal LMs) unless ``add_bos_token`` is set; an empty context is
        conditioned on BOS (EOS when the config has none).
        """

        def __init__(
            self,
            checkpoint: str,
            batch_size: int | str = 8,
            max_batch_size: int | None = None,
            device: str | None = None,
            dtype: str | None = None,
            max_length: int | None = None,
            add_bos_token: bool | str = False,
            **kwargs,
        ):
            super().__init__()
            from tokenizers import Tokenizer

            if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                # lm-eval's command line defaults to --device cuda, also on machines without one.
                device = "cuda" if torch.cuda.is_available() else "cpu"
            if dtype is None:
                torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
            elif dtype in _DTYPES:
                torch_dtype = _DTYPES[dtype]
            else:
                raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
            path = Path(checkpoint)
            if not (path / "tokenizer.json").is_file():
                raise FileNotFoundError(f"no tokenizer.json in {path}")
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
            self.model = Xmodel.from_pretrained(path, device=device, dtype=torch_dtype).eval()
            self._device = torch.device(device)
            cfg = self.model.config
            self.max_length = int(max_length) if max_length else min(cfg.max_position_embeddings, 8192)
            if str(batch_size).startswith("auto"):
                batch_size = max_batch_size or 8
            self.batch_size = int(batch_size)
            self.add_bos_token = str(add_bos_token).lower() in ("true", "1")
            eos = cfg.eos_token_ids
            if not eos:
                raise ValueError("the checkpoint config has no eos_token_id; lm-eval needs an end-of-text token")
            self._eot = eos[0]
            self._prefix = cfg.bos_token_id if cfg.bos_token_id is not None else self._eot

        # ---- tokenizer
        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def prefix_token_id(self) -> int:
            return self._prefix

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            ids = self.tokenizer.encode(string, add_special_tokens=False).ids
            if add_special_tokens or (add_special_tokens is None and self.add_bos_token):
                if not ids or ids[0] != self._prefix:
                    ids = [self._prefix] + ids
            return ids

        def tok_decode(self, tokens: list[int]) -> str:
            return self.tokenizer.decode(tokens, skip_special_tokens=False)

        # ---- scoring
        @torch.no_grad()
        def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
            """(sum of log p(continuation | context), continuation is the greedy one) per (context, cont) pair.

            The input is ``(context + continuation)[:-1]``, left-truncated to ``max_length``; rows are right-padded
            (causal attention keeps padding out of every scored position) and batched longest first.
            """
            rows = []
            for context, cont in pairs:
                if not cont:
                    raise ValueError("empty continuation")
                if len(cont) > self.max_length:
                    raise ValueError(f"continuation of {len(cont)} tokens exceeds max_length={self.max_length}")
                whole = (context + cont)[-(self.max_length + 1):]
                rows.append((whole[:-1], whole[-len(cont):]))
            order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
            results: list[tuple[float, bool] | None] = [None] * len(rows)
            for chunk in _batched(order, self.batch_size):
                width = len(rows[chunk[0]][0])
                ids = torch.zeros(len(chunk), width, dtype=torch.long)
                for r, i in enumerate(chunk):
                    inp = rows[i][0]
                    ids[r, : len(inp)] = torch.tensor(inp)
                hidden = self.model.hidden_states(ids.to(self._device))
                for r, i in enumerate(chunk):
                    inp, cont = rows[i]
                    n = len(cont)
                    logprobs = self.model.logits(hidden[r, len(inp) - n : len(inp)]).log_softmax(-1)  # (n, V)
                    target = torch.tensor(cont, device=logprobs.device)
                    score = logprobs.gather(1, target[:, None]).sum().item()
                    greedy = bool((logprobs.argmax(-1) == target).all())
                    results[i] = (score, greedy)
            return results  # type: ignore[return-value]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            results = self._score([(context, cont) for _, context, cont in requests])
            for (key, _, _), answer in zip(requests, results):
                if key is not None and key[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", key, answer)
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            windows, owners = [], []
            for n, request in enumerate(requests):
                (string,) = request.args
                for window in get_rolling_token_windows(
                    token_list=self.tok_encode(string, add_special_tokens=False),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ):
                    windows.append(make_disjoint_window(window))
                    owners.append(n)
            totals = [0.0] * len(requests)
            for owner, (score, _) in zip(owners, self._score(windows)):
                totals[owner] += score
            for request, total in zip(requests, totals):
                self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            return totals

        # ---- generation
        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            """Greedy (or sampled, per ``gen_kwargs``) continuation cut at the first stop string.

            Requests with the same ``gen_kwargs`` are batched (left padding); the context is left-truncated to
            leave room for ``max_gen_toks`` (default 256).
            """
            groups: dict[str, list[int]] = {}
            for i, request in enumerate(requests):
                groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
            outputs: list[str | None] = [None] * len(requests)
            for indices in groups.values():
                kwargs = dict(requests[indices[0]].args[1])
                until = kwargs.pop("until", None) or []
                until = [until] if isinstance(until, str) else list(until)
                eos_text = self.tok_decode([self._eot])
                max_new = int(kwargs.pop("max_gen_toks", 256))
                do_sample = bool(kwargs.pop("do_sample", False))
                temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
                top_k = kwargs.pop("top_k", None)
                top_p = kwargs.pop("top_p", None)
                budget = max(1, self.max_length - max_new)
                for chunk in _batched(indices, self.batch_size):
                    contexts = [self.tok_encode(requests[i].args[0])[-budget:] or [self._prefix] for i in chunk]

                    def stop(row: int, new: list[int]) -> bool:
                        text = self.tok_decode(new)
                        return any(s and s in text for s in until)

                    completions = generate(
                        self.model, contexts, max_new_tokens=max_new, temperature=temperature,
                        top_k=int(top_k) if top_k else None, top_p=float(top_p) if top_p else None,
                        eos_token_id=[self._eot], stop_fn=stop if until else None,
                    )
                    for i, new in zip(chunk, completions):
                        text = self.tok_decode(new)
                        for s in until + [eos_text]:
                            if s and s in text:
                                text = text[: text.index(s)]
                        outputs[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
            return outputs  # type: ignore[return-value]


    # Register once: running this file as __main__ defines a second XmodelLM class, and lm-eval refuses to
    # register a different class under a taken name.
    if model_registry.get("xmodel", None) is None:
        register_model("xmodel")(XmodelLM)


def main(argv: list[str] | None = None) -> None:
    """``python -m xmodel.lm_eval_adapter <lm_eval arguments>``: lm-eval's CLI with ``--model xmodel`` available."""
    if LM_EVAL_IMPORT_ERROR is not None:
        raise SystemExit(f"lm-eval is not installed ({LM_EVAL_IMPORT_ERROR}); pip install -e '.[eval]'")
    from lm_eval.__main__ import cli_evaluate

    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    from xmodel.lm_eval_adapter import main as _main  # the importable module registers the model class

    _main()
