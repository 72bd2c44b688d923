"""Text <-> token ids for the models fusionlm runs, by job:

vocabulary.py  ``Tokenizer``: encode, decode, special tokens, saving, transformers directories
gguf.py        the ``tokenizers`` pipeline a GGUF file's metadata describes (llama.cpp's vocabularies)
chat.py        chat templates, in a sandbox
stream.py      ``StreamDecoder``: streaming decode
"""

from fusionlm.tokenizer.stream import StreamDecoder
from fusionlm.tokenizer.vocabulary import Tokenizer

__all__ = ["StreamDecoder", "Tokenizer"]
