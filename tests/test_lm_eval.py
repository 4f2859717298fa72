"""Evaluation: validation perplexity on a token file, and the lm-eval adapter on a local task (offline)."""

import inspect
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import xkernels
from xkernels.dispatch import interpreting
from xmodel.config import XmodelConfig
from xmodel.lm_eval_adapter import LM_EVAL_IMPORT_ERROR, PAPER_TASKS, evaluate_perplexity, load_tokens
from xmodel.model import Xmodel


@pytest.fixture(autouse=True)
def _reference_ops_under_interpreter():
    """Evaluation logic does not depend on the kernel backend (test_model.py checks kernel parity); the Triton
    interpreter would only make these many small forwards slow."""
    if interpreting():
        with xkernels.force_backend("torch"):
            yield
    else:
        yield


def tiny_model(vocab_size=97, **overrides) -> Xmodel:
    cfg = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, mup_base_width=32,
               bos_token_id=0, eos_token_id=1)
    return Xmodel(XmodelConfig(**{**cfg, **overrides})).eval()


def test_perplexity_of_token_file(tmp_path):
    model = tiny_model()
    tokens = np.random.default_rng(0).integers(0, 97, size=3 * 16 + 5).astype(np.uint16)
    tokens.tofile(tmp_path / "val.bin")
    np.save(tmp_path / "val.npy", tokens.astype(np.int32))
    assert np.array_equal(load_tokens(tmp_path / "val.npy"), tokens)
    result = evaluate_perplexity(model, tmp_path / "val.bin", seq_len=16, batch_size=2)
    windows = torch.as_tensor(tokens[: 3 * 16 + 1].astype(np.int64))
    losses = []
    with torch.no_grad():
        for w in range(3):
            chunk = windows[w * 16 : w * 16 + 17]
            logits = model(chunk[None, :-1]).logits[0]
            losses.append(F.cross_entropy(logits, chunk[1:], reduction="sum"))
    want = (sum(losses) / 48).item()
    assert result["tokens"] == 48
    assert result["loss"] == pytest.approx(want, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(want), rel=1e-5)
    with pytest.raises(ValueError, match="at least"):
        evaluate_perplexity(model, torch.arange(5), seq_len=16)


def test_paper_task_list():
    assert len(PAPER_TASKS) == 13
    assert PAPER_TASKS["arc_challenge"] == (25, "acc_norm") and PAPER_TASKS["gsm8k"] == (8, "exact_match")


# ------------------------------------------------------------------------------------------------------------
# lm-eval
# ------------------------------------------------------------------------------------------------------------
needs_lm_eval = pytest.mark.skipif(LM_EVAL_IMPORT_ERROR is not None, reason="lm-eval (optional extra 'eval') not installed")

QUESTIONS = [
    ("the quick brown fox jumps over the", ["lazy dog", "small model", "short story"], 0),
    ("once upon a time there was a", ["tiny transformer", "lazy dog", "quick brown fox"], 0),
    ("tokens flow through the", ["layers one by one", "story", "dog"], 0),
    ("a small model writes a", ["short story", "lazy fox", "layers"], 0),
]


def _checkpoint(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([q + " " + " ".join(c) for q, c, _ in QUESTIONS] * 3, trainer)
    model = tiny_model(vocab_size=tok.get_vocab_size(), tie_word_embeddings=False)  # untied: varied greedy text
    path = tmp_path / "ckpt"
    model.save_pretrained(path)
    tok.save(str(path / "tokenizer.json"))
    return path, model, tok


def _instance(request_type, args, idx=0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=request_type, doc={}, arguments=args, idx=idx)


@needs_lm_eval
def test_adapter_scores_match_the_model(tmp_path):
    from lm_eval.api.registry import get_model, model_registry

    path, model, tok = _checkpoint(tmp_path)
    lm = get_model("xmodel")(checkpoint=str(path), batch_size=3, device="cpu")
    assert "hf" in model_registry.keys()  # registering ours kept lm-eval's own models

    def direct(context_ids, cont_ids):
        ids = torch.tensor([context_ids + cont_ids])
        with torch.no_grad():
            logprobs = model(ids).logits[0].log_softmax(-1)
        n = len(cont_ids)
        picked = logprobs[-n - 1 : -1].gather(1, torch.tensor(cont_ids)[:, None])
        return picked.sum().item(), bool((logprobs[-n - 1 : -1].argmax(-1) == torch.tensor(cont_ids)).all())

    pairs = [(q, " " + c) for q, choices, _ in QUESTIONS for c in choices] + [("", "lazy dog")]
    got = lm.loglikelihood([_instance("loglikelihood", p, i) for i, p in enumerate(pairs)], disable_tqdm=True)
    for (context, cont), (score, greedy) in zip(pairs, got):
        if context:
            whole = tok.encode(context + cont, add_special_tokens=False).ids
            ctx = tok.encode(context, add_special_tokens=False).ids
            want = direct(ctx, whole[len(ctx):])
        else:
            want = direct([0], tok.encode(cont, add_special_tokens=False).ids)  # empty context -> BOS
        assert score == pytest.approx(want[0], rel=1e-5, abs=1e-5) and greedy == want[1]

    # Rolling loglikelihood: one window = log p of the whole text after BOS; small windows = sum over windows.
    text = " ".join(q for q, _, _ in QUESTIONS)
    ids = tok.encode(text, add_special_tokens=False).ids
    one = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)[0]
    assert one == pytest.approx(direct([0], ids)[0], rel=1e-5)
    lm.max_length = 8
    windowed = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)[0]
    assert len(ids) > 16 and math.isfinite(windowed) and windowed != pytest.approx(one, rel=1e-6)


@needs_lm_eval
def test_adapter_generate_until_cuts_at_stop_strings(tmp_path):
    from lm_eval.api.registry import get_model

    from xmodel.generate import generate

    path, model, tok = _checkpoint(tmp_path)
    lm = get_model("xmodel")(checkpoint=str(path), batch_size=2, device="cpu")
    contexts = ["once upon a time", "the quick brown fox jumps", "tokens"]
    free = [tok.decode(generate(model, [tok.encode(c, add_special_tokens=False).ids], max_new_tokens=12,
                                eos_token_id=1)[0]) for c in contexts]
    assert len(set(free[0])) > 4, free[0]
    stop = free[0][len(free[0]) // 2 :][:2]  # a string that occurs in the middle of the first completion
    requests = [_instance("generate_until", (c, {"until": [stop], "max_gen_toks": 12}), i)
                for i, c in enumerate(contexts)]
    got = lm.generate_until(requests, disable_tqdm=True)
    for text, full in zip(got, free):
        want = full[: full.index(stop)] if stop in full else full
        assert text == want
    assert 0 < len(got[0]) < len(free[0])


@needs_lm_eval
def test_simple_evaluate_on_local_multiple_choice_task(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    path, model, tok = _checkpoint(tmp_path)
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in QUESTIONS))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "xmodel_local_mc.yaml").write_text(
        "task: xmodel_local_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    # Indexing lm-eval's own ~thousands of task files takes ~10 s; newer versions can skip them.
    only_ours = {"include_defaults": False} if "include_defaults" in inspect.signature(TaskManager).parameters else {}
    results = lm_eval.simple_evaluate(
        model="xmodel", model_args={"checkpoint": str(path), "device": "cpu"}, tasks=["xmodel_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "tasks"), **only_ours), batch_size=4, log_samples=False,
        bootstrap_iters=0,
    )
    acc = results["results"]["xmodel_local_mc"]["acc,none"]

    correct = 0
    for q, choices, answer in QUESTIONS:
        scores = []
        for c in choices:
            whole = tok.encode(q + " " + c, add_special_tokens=False).ids
            ctx = tok.encode(q, add_special_tokens=False).ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                lp = model(ids).logits[0].log_softmax(-1)
            cont = whole[len(ctx):]
            scores.append(lp[len(ctx) - 1 : len(whole) - 1].gather(1, torch.tensor(cont)[:, None]).sum().item())
        correct += int(np.argmax(scores) == answer)
    assert acc == pytest.approx(correct / len(QUESTIONS))
