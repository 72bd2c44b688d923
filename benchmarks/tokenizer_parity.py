"""fusionlm's tokenizers against llama.cpp's, on the vocabularies llama.cpp tests its own on.

    make peers                                         # llama-cpp-python, and its sources
    .venv/bin/python benchmarks/tokenizer_parity.py [--random 300] [--vocab PATTERN]

The vocab-only GGUF files (``ggml-vocab-*.gguf``) ship in llama.cpp's sources, vendored in
llama-cpp-python's source distribution, which ``make peers`` unpacks under
``build/llama-server``. For every vocabulary: the test strings llama.cpp keeps beside it
(``.inp``), hand-picked hard strings (whitespace runs, digits, CJK, emoji, special-token text)
and ``--random`` generated ones, each tokenized by llama.cpp (``Llama(vocab_only=True)
.tokenize``, special-token text parsed) and by fusionlm (``Tokenizer.from_gguf_metadata``),
without and with the BOS/EOS the vocabulary asks for, and decoded back by fusionlm.
The table counts identical results; a vocabulary fusionlm refuses says why.
"""

from __future__ import annotations

import argparse
import fnmatch
import random
import sys
from pathlib import Path

VOCAB_DIR = Path(__file__).resolve().parents[1] / "build/llama-server/vendor/llama.cpp/models"
SEPARATOR = "\n__ggml_vocab_test__\n"
HARD = [
    "",
    " ",
    "  ",
    "   ",
    "\t",
    "\n",
    "\n\n\n",
    " \n \t ",
    "Hello world",
    " Hello world",
    "Hello  world",
    "Hello\n\nworld  ",
    "1",
    "12",
    "123",
    "1234567890",
    "3.14159 and 2,718",
    "don't won't it's we'll they're I'm",
    "DON'T YOU'LL",
    "中文测试：你好，世界！",
    "日本語のテキスト",
    "한국어 텍스트",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧",
    "ẞ Ω ñ ü é ç",
    "<s> </s> <unk> <|endoftext|> <|im_start|>user\nhi<|im_end|>",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>",
    "def f(x):\n    return x  # comment\n",
    "    indented\n\tand tabs",
    "http://example.com/path?q=1&r=2",
    "a" * 100,
    " " * 33 + "x",
]
POOL = " \t\n0123456789abcXYZ.,'!?-_()<>|/\\é中ω😀🇫"


def random_texts(count: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 24))) for _ in range(count)]


def compare(path: Path, texts: list[str]) -> dict:
    import llama_cpp

    from fusionlm.checkpoint.gguf import read_gguf_metadata
    from fusionlm.tokenizer import Tokenizer

    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    metadata = read_gguf_metadata(path)
    row = {
        "vocabulary": path.name.removeprefix("ggml-vocab-").removesuffix(".gguf"),
        "kind": f"{metadata.get('tokenizer.ggml.model')}/{metadata.get('tokenizer.ggml.pre', '-')}",
        "cases": len(texts),
    }
    try:
        ours = Tokenizer.from_gguf_metadata(metadata)
    except ValueError as e:
        return {**row, "refused": str(e).splitlines()[0]}
    for bos in (False, True):
        same, first = 0, None
        for text in texts:
            theirs = llm.tokenize(text.encode(), add_bos=bos, special=True)
            mine = ours.encode(text, add_special_tokens=bos)
            if mine == theirs:
                same += 1
            elif first is None:
                first = f"{text!r}: llama.cpp {theirs[:12]}, fusionlm {mine[:12]}"
        row["with BOS" if bos else "no BOS"] = same
        row.setdefault("first difference", first)
    # Decoding is the inverse (llama-cpp-python's detokenize keeps sentencepiece's prefix
    # space, so it is no reference): fusionlm's decode of its own ids gives the text back.
    row["round trip"] = sum(
        ours.decode(ours.encode(text, add_special_tokens=False)) == text for text in texts
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab-dir", type=Path, default=VOCAB_DIR)
    parser.add_argument("--vocab", default="*", help="a glob over the vocabulary names")
    parser.add_argument("--random", type=int, default=300, help="generated strings per vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = sorted(
        p
        for p in args.vocab_dir.glob("ggml-vocab-*.gguf")
        if fnmatch.fnmatch(p.name.removeprefix("ggml-vocab-").removesuffix(".gguf"), args.vocab)
    )
    if not files:
        print(f"no ggml-vocab-*.gguf in {args.vocab_dir}: run `make peers` first", file=sys.stderr)
        return 2
    print(
        "| vocabulary | model/pre | cases | identical, no BOS | identical, with BOS | "
        "round trip | first difference |"
    )
    print("|---|---|---|---|---|---|---|")
    for path in files:
        inp = path.with_name(path.name + ".inp")
        texts = inp.read_text(encoding="utf-8").split(SEPARATOR)[:-1] if inp.is_file() else []
        texts += HARD
        texts += random_texts(args.random, random.Random(args.seed))
        row = compare(path, texts)
        if "refused" in row:
            cells = f"refused | | | {row['refused']}"
        else:
            cells = (
                f"{row['no BOS']} | {row['with BOS']} | {row['round trip']} | "
                f"{row['first difference'] or ''}"
            )
        print(f"| {row['vocabulary']} | {row['kind']} | {row['cases']} | {cells} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
