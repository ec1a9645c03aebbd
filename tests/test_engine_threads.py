"""One engine, several threads: concurrent prefills/generations and plain calls of the wrapped model.

The engine never switches the language model's attention implementation during a call: the model's
config names a dispatcher (``autoselect_fast.attention.install_dispatch``) that runs the varlen backend
only inside the calling thread's packed prefill. Here several threads run many prefills (pruned, of
different batches) and generations on one engine while other threads call the unmodified model on
padded batches; every result must equal the serial one, and the model must behave as before afterwards.
"""
import threading

import torch
from test_engine_qwen import batch_requests, engine_for, processed, scorer, tiny_qwen  # noqa: F401 (processed, scorer: fixtures)

from autoselect_fast.attention import DISPATCH_PREFIX, original_implementation
from autoselect_fast.engine import AutoSelectEngine

THREADS, ROUNDS = 6, 5


def padded_text_batch():
    """Two text-only prompts of different lengths, left-padded: exercises the model's own mask creation."""
    a, b = [240, 2, 16, 17, 18, 241, 240, 3], [240, 2, 20, 241, 240, 3]
    ids = torch.tensor([a, [0, 0] + b])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    return {"input_ids": ids, "attention_mask": mask}


def plain_logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[:, -1]


def run_threads(workers):
    barrier = threading.Barrier(len(workers))
    failures = []

    def wrap(fn):
        def target():
            barrier.wait()
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - reported by the test below
                failures.append(repr(exc))
        return target

    threads = [threading.Thread(target=wrap(fn)) for fn in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def test_concurrent_prefills_and_plain_calls(scorer, processed):  # noqa: F811
    model = tiny_qwen(seed=5)
    plain = padded_text_batch()
    before = plain_logits(model, plain)  # before any engine touched the model
    assert model.model.language_model.config._attn_implementation == "sdpa"
    engine = engine_for(model, scorer, keep_ratio=0.3)
    assert model.model.language_model.config._attn_implementation == DISPATCH_PREFIX + "sdpa"
    requests = batch_requests(processed)
    batches = [requests, requests[:2], requests[2:], [requests[3], requests[0]]]
    serial = [engine.prefill(b).logits for b in batches]
    serial_generated = engine.generate(requests[2:], max_new_tokens=4).token_ids
    mismatches = []

    def prefills(offset):
        def fn():
            for i in range(ROUNDS):
                k = (offset + i) % len(batches)
                got = engine.prefill(batches[k]).logits
                if not torch.allclose(got, serial[k], rtol=1e-5, atol=1e-5):
                    mismatches.append(("prefill", k, float((got - serial[k]).abs().max())))
        return fn

    def generations():
        for _ in range(2):
            got = engine.generate(requests[2:], max_new_tokens=4).token_ids
            if got != serial_generated:
                mismatches.append(("generate", got, serial_generated))

    def plain_calls():
        for _ in range(ROUNDS):
            got = plain_logits(model, plain)
            if not torch.allclose(got, before, rtol=1e-5, atol=1e-5):
                mismatches.append(("plain", float((got - before).abs().max())))

    workers = [prefills(t) for t in range(THREADS - 3)] + [generations, plain_calls, plain_calls]
    failures = run_threads(workers)
    assert failures == [], failures
    assert mismatches == [], mismatches
    # The wrapped model still works normally: same logits, its own generate, its own implementation.
    torch.testing.assert_close(plain_logits(model, plain), before, rtol=1e-5, atol=1e-5)
    assert original_implementation(model.model.language_model.config) == "sdpa"
    with torch.no_grad():
        out = model.generate(**plain, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 11)


def test_engine_follows_a_later_switch_of_the_models_implementation(scorer, processed):  # noqa: F811
    model = tiny_qwen(seed=6)
    engine = engine_for(model, scorer, keep=4)
    requests = batch_requests(processed)[:2]
    first = engine.prefill(requests).logits
    plain = padded_text_batch()
    sdpa = plain_logits(model, plain)
    model.model.language_model.config._attn_implementation = "eager"  # the user switches implementation
    torch.testing.assert_close(plain_logits(model, plain), sdpa, rtol=1e-5, atol=1e-5)  # eager now
    torch.testing.assert_close(engine.prefill(requests).logits, first, rtol=1e-5, atol=1e-5)
    assert model.model.language_model.config._attn_implementation == DISPATCH_PREFIX + "eager"
    torch.testing.assert_close(plain_logits(model, plain), sdpa, rtol=1e-5, atol=1e-5)
    # A second engine on the same model shares the dispatcher.
    other = AutoSelectEngine(model, scorer, keep=4, image_processor=engine.image_processor)
    torch.testing.assert_close(other.prefill(requests).logits, first, rtol=1e-5, atol=1e-5)


def test_each_generate_call_returns_its_own_prefill(scorer, processed):  # noqa: F811
    """Two threads generate on different batches and only then look at their results (a barrier between
    the calls and the checks): each must hold its own prefill. An engine-wide "latest prefill" attribute,
    read back after the call, would hand one thread the other's."""
    model = tiny_qwen(seed=7)
    engine = engine_for(model, scorer, keep_ratio=0.3)
    requests = batch_requests(processed)
    batches = {"first": requests[:2], "last": requests[2:]}
    serial = {name: engine.generate(b, max_new_tokens=3) for name, b in batches.items()}
    assert serial["first"].prefill.kept_tokens != serial["last"].prefill.kept_tokens  # the two are told apart
    both_done = threading.Barrier(len(batches))
    results = {}

    def worker(name):
        def fn():
            out = engine.generate(batches[name], max_new_tokens=3)
            both_done.wait()  # the other thread's call has finished too before this one reads anything
            results[name] = out
        return fn

    assert run_threads([worker(name) for name in batches]) == []
    assert not hasattr(engine, "last_prefill")
    for name, want in serial.items():
        got = results[name]
        assert got.token_ids == want.token_ids
        assert got.prefill.kept_tokens == want.prefill.kept_tokens
        assert got.prefill.sequence_lengths == want.prefill.sequence_lengths
        assert [k.tolist() for k in got.prefill.kept_indices] == [k.tolist() for k in want.prefill.kept_indices]
        torch.testing.assert_close(got.prefill.logits, want.prefill.logits, rtol=1e-5, atol=1e-5)
        assert got.prefill.timings_ms == {}
