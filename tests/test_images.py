"""Image files and conversions; `fusionlm generate --image` on a tiny Llama 3.2 Vision."""

from __future__ import annotations

import sys

import pytest
import torch
from tokenizers import AddedToken, models, pre_tokenizers
from tokenizers import Tokenizer as Backend

import fusionlm
from fusionlm.cli import main
from fusionlm.images import load_image, to_pil, to_tensor
from tests.helpers import CONFIGS, IMAGE, make_hf_llama, make_hf_mllama

PIL = pytest.importorskip("PIL.Image")

# A Llama 3.2 Vision-like chat template: an image content part becomes <|image|>.
TEMPLATE = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>"
    "{% if m.content is string %} {{ m.content }}{% else %}{% for part in m.content %}"
    "{% if part.type == 'image' %}<|image|>{% else %} {{ part.text }}{% endif %}{% endfor %}"
    "{% endif %}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>{% endif %}"
)
SPECIALS = ["<pad>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"]


def save_tokenizer(directory) -> fusionlm.Tokenizer:
    """Words w5..w95 and the specials above, <|image|> as id 96."""
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab |= {f"w{i}": i for i in range(len(SPECIALS), IMAGE)}
    vocab["<|image|>"] = IMAGE
    backend = Backend(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens([AddedToken(t, special=True) for t in [*SPECIALS, "<|image|>"]])
    tokenizer = fusionlm.Tokenizer(
        backend,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<pad>",
        chat_template=TEMPLATE,
    )
    tokenizer.save(directory)
    return tokenizer


@pytest.fixture(scope="module")
def mllama_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("mllama_cli")
    make_hf_mllama(directory, CONFIGS["gqa-2tiles"])
    save_tokenizer(directory)
    return directory


@pytest.fixture
def png(tmp_path):
    path = tmp_path / "picture.png"
    pixels = torch.randint(0, 256, (20, 30, 3), dtype=torch.uint8).numpy()
    PIL.fromarray(pixels).save(path)
    return path


# -- files and conversions ---------------------------------------------------------------------


def test_load_image_gives_rgb_of_any_mode(tmp_path):
    for mode in ("RGB", "L", "RGBA", "P"):
        path = tmp_path / f"{mode}.png"
        PIL.new(mode, (5, 4)).save(path)
        image = load_image(path)
        assert image.mode == "RGB" and image.size == (5, 4)
    with pytest.raises(FileNotFoundError, match="no image file"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match="cannot read image"):
        load_image(tmp_path / "text.png")


def test_tensors_and_pillow_images_convert_both_ways():
    pixels = torch.randint(0, 256, (3, 4, 6), dtype=torch.uint8)
    image = to_pil(pixels)
    assert image.mode == "RGB" and image.size == (6, 4)
    assert torch.equal(to_tensor(image), pixels.float() / 255)
    assert torch.equal(to_tensor(pixels), pixels.float() / 255)
    assert torch.equal(to_tensor(to_pil(pixels.float() / 255)), pixels.float() / 255)
    assert to_pil(pixels[:1]).mode == "L" and to_pil(torch.zeros(4, 2, 2)).mode == "RGBA"
    with pytest.raises(ValueError, match="1, 3 or 4 channels"):
        to_pil(torch.zeros(2, 3, 3))
    with pytest.raises(ValueError, match=r"\[c, h, w\]"):
        to_tensor(torch.zeros(3, 3))
    with pytest.raises(TypeError, match="uint8 or floating point"):
        to_tensor(torch.zeros(3, 3, 3, dtype=torch.long))


def test_without_pillow_the_error_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(ImportError, match=r"pip install 'fusionlm\[vision\]'"):
        load_image(tmp_path / "x.png")


# -- the command -------------------------------------------------------------------------------


def test_generate_with_an_image(mllama_dir, png, capsys):
    argv = ["generate", "w7 w8 w9", "--model", str(mllama_dir), "--max-new-tokens", "6"]
    assert main([*argv, "--image", str(png)]) == 0
    out = capsys.readouterr().out.strip()

    model, tokenizer = fusionlm.load_model(mllama_dir), fusionlm.load_tokenizer(mllama_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w7 w8 w9"}]}]
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert ids.count(IMAGE) == 1
    new = fusionlm.generate(
        model, [ids], images=[[load_image(png)]], max_new_tokens=6, stop_tokens=tokenizer.stop_ids
    )
    assert out == tokenizer.decode(new[0]).strip()

    # Two images; a raw prompt without image tokens gets them in front.
    assert main([*argv, "--image", str(png), "--image", str(png)]) == 0
    assert main([*argv, "--raw", "--image", str(png)]) == 0


def one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusionlm: error:"), err
    assert message in lines[0]


def test_image_errors_are_one_line(mllama_dir, png, tmp_path, capsys, monkeypatch):
    base = ["generate", "w7", "--model", str(mllama_dir), "--max-new-tokens", "2"]
    one_line_error(capsys, [*base, "--image", str(tmp_path / "none.png")], "no image file")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG not really")
    one_line_error(capsys, [*base, "--image", str(bad)], "cannot read image")
    two_tokens = ["generate", "w7 <|image|> <|image|>", "--model", str(mllama_dir), "--raw"]
    one_line_error(capsys, [*two_tokens, "--image", str(png)], "2 <|image|> token(s)")

    text_dir = tmp_path / "llama"
    make_hf_llama(text_dir)
    save_tokenizer(text_dir)
    capsys.readouterr()  # transformers' progress bar
    one_line_error(
        capsys,
        ["generate", "w7", "--model", str(text_dir), "--image", str(png)],
        "is a text-only model; --image needs a vision model",
    )

    monkeypatch.setitem(sys.modules, "PIL", None)
    one_line_error(capsys, [*base, "--image", str(png)], "pip install 'fusionlm[vision]'")
