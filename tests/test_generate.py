"""KV-cache decoding, sampling, batched left-padded generation and the command line."""

import pytest
import torch

import xkernels
from xkernels.dispatch import interpreting
from xmodel.config import XmodelConfig
from xmodel.generate import KVCache, generate, main, sample_next_token
from xmodel.model import Xmodel


KERNEL_PATH_TESTS = {"test_cached_decoding_equals_full_recompute"}


@pytest.fixture(autouse=True)
def _reference_ops_under_interpreter(request):
    """Under the Triton interpreter every decode step is slow; the generation logic does not depend on the
    backend, so only the static-cache parity test runs the kernels here (test_model.py covers kernel parity)."""
    kernels = request.function.__name__ in KERNEL_PATH_TESTS and "static" in request.node.name
    if interpreting() and not kernels:
        with xkernels.force_backend("torch"):
            yield
    else:
        yield


def tiny_model(**overrides) -> Xmodel:
    base = dict(vocab_size=97, hidden_size=96, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
                num_key_value_heads=2, max_position_embeddings=128, mup_base_width=32, eos_token_id=None)
    model = Xmodel(XmodelConfig(**{**base, **overrides}))
    return model.eval()


@pytest.mark.parametrize("static", [True, False], ids=["static", "growing"])
def test_cached_decoding_equals_full_recompute(static):
    model = tiny_model()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 2, 12 if static else None)
        steps = [model(ids[:, :5], cache=cache).logits]  # prefill 5, then one token at a time
        steps += [model(ids[:, t : t + 1], cache=cache).logits for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_cached_chunked_prefill_equals_full():
    """A multi-token chunk after a non-empty cache needs the offset causal mask."""
    model = tiny_model()
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        cache = KVCache.for_model(model, 1, 10)
        got = torch.cat([model(ids[:, :4], cache=cache).logits, model(ids[:, 4:], cache=cache).logits], 1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_static_cache_overflow():
    model = tiny_model()
    cache = KVCache.for_model(model, 1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.randint(0, 97, (1, 5)), cache=cache)


def _greedy_by_recompute(model, prompt, n):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_greedy_generation_matches_recompute_and_is_deterministic():
    model = tiny_model()
    prompt = torch.randint(0, 97, (7,)).tolist()
    want = _greedy_by_recompute(model, prompt, 10)
    assert generate(model, [prompt], max_new_tokens=10)[0] == want
    assert generate(model, [prompt], max_new_tokens=10, static_cache=False)[0] == want
    assert generate(model, torch.tensor([prompt]), max_new_tokens=10)[0] == want


def test_left_padded_batch_equals_single_prompts():
    model = tiny_model()
    prompts = [torch.randint(0, 97, (n,)).tolist() for n in (3, 9, 6)]
    batched = generate(model, prompts, max_new_tokens=8)
    for prompt, got in zip(prompts, batched):
        assert got == _greedy_by_recompute(model, prompt, 8)


def test_stops_at_eos():
    model = tiny_model()
    prompt = torch.randint(0, 97, (5,)).tolist()
    free = generate(model, [prompt], max_new_tokens=6)[0]
    stop = free[3]
    first = free.index(stop)
    assert generate(model, [prompt], max_new_tokens=6, eos_token_id=stop)[0] == free[:first]
    seen = []
    generate(model, [prompt, prompt], max_new_tokens=6, eos_token_id=[stop], on_tokens=seen.append)
    assert len(seen) == first + 1 and seen[-1] == [None, None]


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]]).repeat(400, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits[:2]), torch.tensor([1, 1]))
    top2 = sample_next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 2}
    probs = logits[0].softmax(-1)  # p1 ~ 0.47, p2 ~ 0.43: the nucleus at top_p 0.5 holds tokens 1 and 2 only
    assert probs[1] < 0.5 < probs[1] + probs[2]
    nucleus = sample_next_token(logits, temperature=1.0, top_p=0.5, generator=g)
    assert set(nucleus.tolist()) == {1, 2}
    tiny_p = sample_next_token(logits, temperature=1.0, top_p=1e-6, generator=g)
    assert set(tiny_p.tolist()) == {1}
    everything = sample_next_token(logits, temperature=1.0, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    prompt = torch.randint(0, 97, (4,)).tolist()
    runs = [generate(model, [prompt], max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9,
                     generator=torch.Generator().manual_seed(3))[0] for _ in range(2)]
    assert runs[0] == runs[1] and len(runs[0]) == 12


def test_bad_generate_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [[]])
    with pytest.raises(ValueError, match="token ids"):
        generate(model, [[97]])
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(model, [[1, 2]], max_new_tokens=200)


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<bos>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["the quick brown fox jumps over the lazy dog", "a small model writes a short story",
            "once upon a time there was a tiny transformer", "tokens flow through the layers one by one"] * 4
    tok.train_from_iterator(text, trainer)
    return tok


def test_command_line_streams_greedy_text(tmp_path, capsys):
    tok = _train_tokenizer(320)
    model = tiny_model(vocab_size=tok.get_vocab_size(), eos_token_id=1, bos_token_id=0)
    model.save_pretrained(tmp_path)
    tok.save(str(tmp_path / "tokenizer.json"))
    prompt = "once upon a time"
    want = generate(model, [tok.encode(prompt).ids], max_new_tokens=6)[0]

    assert main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == prompt + tok.decode(want) + "\n"
    main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--prompt", "the", "--max-new-tokens", "6"])
    batch_out = capsys.readouterr().out
    assert batch_out.startswith(prompt + tok.decode(want) + "\n")
    main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0.9",
          "--top-k", "40", "--seed", "1", "--no-stream"])
    sampled_a = capsys.readouterr().out
    main(["--checkpoint", str(tmp_path), "--prompt", prompt, "--max-new-tokens", "6", "--temperature", "0.9",
          "--top-k", "40", "--seed", "1", "--no-stream"])
    assert capsys.readouterr().out == sampled_a


def test_command_line_needs_tokenizer(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(tmp_path), "--prompt", "hi"])
