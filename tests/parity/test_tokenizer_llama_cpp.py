"""fusionlm's tokenizers against llama.cpp's on hypothesis-generated text, for every decoder
vocabulary llama.cpp tests its own tokenizer on (``ggml-vocab-*.gguf`` in its sources, which
``make peers`` unpacks; ``benchmarks/tokenizer_parity.py`` runs the fixed strings)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusionlm.checkpoint.gguf import read_gguf_metadata
from fusionlm.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a peer: make peers")

VOCAB_DIR = Path(__file__).resolve().parents[2] / "build/llama-server/vendor/llama.cpp/models"
ENCODERS = ("bert-bge", "nomic-bert-moe")  # llama.cpp's encoder vocabularies: not decoders
VOCABS = sorted(
    name
    for p in VOCAB_DIR.glob("ggml-vocab-*.gguf")
    if (name := p.name.removeprefix("ggml-vocab-").removesuffix(".gguf")) not in ENCODERS
)
# Whitespace runs, digits, punctuation, letters of several scripts, emoji, and the pieces of
# special-token text, mixed; and any text of assigned characters. Unassigned and private-use
# code points are left out: two of them side by side can split differently in StarCoder's
# rule (llama.cpp's Unicode tables against the regex engine's), 11 of 3000 random pairs.
WHITESPACE_AND_PUNCTUATION = [
    " ",
    "  ",
    "\t",
    "\n",
    "\n\n",
    "\r\n",
    ".",
    "'s",
    "<",
    ">",
    "/",
    "_",
    "-",
    "\u200d",
]
WORDS = [
    "0",
    "12",
    "345",
    "a",
    "Hello",
    "world",
    "é",
    "ß",
    "中文",
    "日本",
    "한",
    "ω",
    "😀",
    "👍🏽",
    "🇫🇷",
]
SPECIAL_TEXT = ["<s>", "</s>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PIECES = st.sampled_from([*WHITESPACE_AND_PUNCTUATION, *WORDS, *SPECIAL_TEXT])
ASSIGNED = st.characters(exclude_categories=("Cn", "Co", "Cs"))
TEXTS = st.one_of(st.lists(PIECES, max_size=12).map("".join), st.text(ASSIGNED, max_size=24))


@pytest.fixture(scope="module", params=VOCABS or [pytest.param(None, marks=pytest.mark.skip)])
def pair(request):
    path = VOCAB_DIR / f"ggml-vocab-{request.param}.gguf"
    theirs = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    return Tokenizer.from_gguf_metadata(read_gguf_metadata(path)), theirs


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=TEXTS, bos=st.booleans())
def test_token_ids_equal_llama_cpps(pair, text, bos):
    ours, theirs = pair
    expected = theirs.tokenize(text.encode("utf-8", "surrogatepass"), add_bos=bos, special=True)
    assert ours.encode(text, add_special_tokens=bos) == expected
