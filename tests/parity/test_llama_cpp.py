"""fusionlm against llama.cpp itself (llama-cpp-python, behind ``make peers``): tiny random
GGUF files of each architecture, with the default model's real vocabulary, run by both."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fusionlm.generation import generate
from fusionlm.loading import load_model, load_tokenizer
from tests.helpers import tiny_gguf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a peer: make peers")

PROMPT = "The quick brown fox jumps over the lazy dog. 1234 + 5678 = 6912!"


@pytest.fixture(scope="module", params=["llama", "mistral3", "qwen2", "qwen3"])
def pair(request, tmp_path_factory):
    path = tiny_gguf(tmp_path_factory.mktemp("gguf") / f"{request.param}.gguf", arch=request.param)
    theirs = llama_cpp.Llama(
        model_path=str(path),
        n_ctx=256,
        n_threads=2,
        verbose=False,
        logits_all=True,
        type_k=0,
        type_v=0,  # fp32 KV cache (GGML_TYPE_F32), as ours
    )
    return load_model(str(path)), load_tokenizer(str(path)), theirs


def test_tokens_and_last_logits_equal_llama_cpps(pair):
    ours, tokenizer, theirs = pair
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert ids == theirs.tokenize(PROMPT.encode(), add_bos=False, special=True)
    theirs.reset()
    theirs.eval(ids)
    expected = torch.from_numpy(np.array(theirs.scores[theirs.n_tokens - 1]))
    with torch.no_grad():
        logits = ours(torch.tensor([ids]))[0, -1]
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_32_greedy_tokens_equal_llama_cpps(pair):
    ours, tokenizer, theirs = pair
    ids = tokenizer.encode(PROMPT, add_special_tokens=False)
    theirs.reset()
    theirs.eval(ids)
    expected = []
    for _ in range(32):
        token = int(np.argmax(theirs.scores[theirs.n_tokens - 1]))
        expected.append(token)
        theirs.eval([token])
    (tokens,) = generate(ours, [ids], max_new_tokens=32, stop_tokens=())
    assert tokens == expected
