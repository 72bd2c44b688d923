"""The fusionlm command: generate, info, convert, and one-line errors with exit status 2."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import fusionlm
from fusionlm import cli
from fusionlm.cli import main
from fusionlm.inference import decode_step
from fusionlm.inference.decode_step import stored_step_path
from fusionlm.models.registry import DEFAULT_MODEL, MODELS
from tests.helpers import CONFIGS, empty_cache, make_hf_mllama


@pytest.mark.slow
def test_generate_streams_an_answer(capsys):
    assert (
        main(
            [
                "generate",
                "What is the capital of France?",
                "--max-new-tokens",
                "12",
                "--threads",
                "2",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "Paris" in out
    assert "tok/s" in err and "load" in err


@pytest.mark.parametrize(
    "argv",
    [
        ["generate", "hi"],
        ["chat"],
        ["info"],
        ["convert", "out"],
        ["bench"],
        ["compile"],
        ["serve"],
        ["eval", "--perplexity", "text.txt"],
    ],
)
def test_every_command_names_its_model_with_model(argv):
    """(``finetune`` names it in its config file.)"""
    assert cli.build_parser().parse_args([*argv, "--model", "m.gguf"]).model == "m.gguf"


def test_info_describes_the_default_model(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "llama: 30 layers, hidden 576, 9 heads (3 kv), vocab 49152" in out
    assert "gpt2 (pre-tokenizer smollm), 49152 tokens" in out
    assert "Q4_1" in out and "134.5 M" in out and "8192 tokens" in out


def test_info_describes_an_mllama_directory(tmp_path, capsys):
    """generate loads a Llama 3.2 Vision directory; info describes it (3 self-attention layers
    of the 5, with 2 cross-attention layers fused in)."""
    make_hf_mllama(tmp_path / "mllama", CONFIGS["gqa-2tiles"])
    assert main(["info", "--model", str(tmp_path / "mllama")]) == 0
    out = capsys.readouterr().out
    assert "mllama: 3 layers" in out and "+ 2 cross-attention layers" in out
    assert "image encoder (mllama)" in out


@pytest.mark.slow
def test_convert_gives_a_directory_transformers_loads_with_equal_logits(tmp_path, capsys):
    import transformers

    out = tmp_path / "hf"
    umask = os.umask(0o022)
    try:
        assert main(["convert", "--model", DEFAULT_MODEL, str(out)]) == 0
    finally:
        os.umask(umask)
    # the mode a plain write gives, not a temporary file's 0600
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = fusionlm.load_model(DEFAULT_MODEL)
    tok = fusionlm.load_tokenizer(DEFAULT_MODEL)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello there!"}])
    assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(
        text, add_special_tokens=False
    )
    tokens = torch.tensor([tok.encode(text, add_special_tokens=False)])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, ours(tokens), atol=1e-4, rtol=0)
    assert fusionlm.load_model(out)(tokens).shape == (1, tokens.shape[1], 49152)
    assert main(["convert", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err


def one_line_error(capsys, argv: list[str], message: str) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusionlm: error:"), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "   "], "the prompt is empty"),
        (["generate", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        (["generate", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
        (["generate", "hi", "--top-k", "0"], "top_k must be an integer >= 1"),
        (["generate", "hi", "--threads", "0"], "--threads must be >= 1"),
        (["generate", "hi", "--model", "/no/such/model.gguf"], "no model at /no/such/model.gguf"),
        (["info", "--model", "/no/such/dir"], "no model at"),
        (["compile", "--model", "/no/such/model.gguf"], "no model at /no/such/model.gguf"),
        (["compile", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["compile", "--cache-len", "0"], "cache_len must be in [1, 8192], got 0"),
    ],
)
def test_user_errors_print_one_line(capsys, argv, message):
    one_line_error(capsys, argv, message)


def test_a_bug_is_an_internal_error_with_its_traceback_in_a_file(capsys, monkeypatch):
    """A TypeError or ValueError from a bug is not the user's mistake: exit status 1, one
    line that says so, the traceback in a file; FUSIONLM_DEBUG=1 raises it."""

    def broken(args):
        raise TypeError("unsupported operand type(s)")

    monkeypatch.setattr(cli, "run_info", broken)
    assert main(["info"]) == 1
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fusionlm: internal error: TypeError: unsupported operand type(s)")
    path = Path(line.split("the traceback is in ")[1].split(",")[0])
    assert "in broken" in path.read_text()
    path.unlink()
    monkeypatch.setenv("FUSIONLM_DEBUG", "1")
    with pytest.raises(TypeError):
        main(["info"])


def test_truncated_gguf_is_one_line(capsys, tmp_path):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(MODELS[DEFAULT_MODEL].path().read_bytes()[:100_000])
    one_line_error(capsys, ["generate", "hi", "--model", str(broken)], "truncated or corrupt")


def test_prompt_longer_than_context_is_one_line(capsys, tmp_path, hf_llama_dir):
    directory, _ = hf_llama_dir
    model_dir = tmp_path / "m"
    shutil.copytree(directory, model_dir)
    tok = fusionlm.load_tokenizer(DEFAULT_MODEL)
    tok.save(model_dir)  # the tiny model's vocabulary is smaller; --raw ids stay < 96 for this text
    one_line_error(
        capsys,
        ["generate", "a " * 200, "--raw", "--model", str(model_dir)],
        "exceeds the model's context",
    )


def test_python_dash_m_runs_the_command():
    result = subprocess.run(
        [sys.executable, "-m", "fusionlm", "info", "--model", "/nope"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and result.stderr.startswith("fusionlm: error:")


def test_bench_prints_one_json_object(capsys):
    import json

    argv = [
        "bench",
        "--json",
        "--prompt-len",
        "4",
        "--new-tokens",
        "3",
        "--prefill-len",
        "8",
        "--repeats",
        "1",
        "--quant",
        "int8",
        "--no-compile",
    ]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"load_s", "warmup_s", "prefill_tok_s", "decode_tok_s", "peak_rss_mb"} <= set(result)
    assert result["quant"] == "int8" and all(
        result[k] > 0 for k in ("prefill_tok_s", "decode_tok_s")
    )


def test_eval_perplexity(capsys, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    assert main(["eval", "--perplexity", str(text), "--window", "16"]) == 0
    assert capsys.readouterr().out.startswith("perplexity ")
    binary = tmp_path / "b.bin"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    one_line_error(capsys, ["eval", "--perplexity", str(binary)], "is not UTF-8 text")
    one_line_error(capsys, ["eval", "--perplexity", str(tmp_path / "none.txt")], "No such file")
    one_line_error(capsys, ["bench", "--new-tokens", "1"], "--new-tokens must be >= 2")


@pytest.mark.slow
@pytest.mark.compiled
def test_a_run_without_a_stored_step_decodes_eagerly_and_builds_it_for_the_next(
    capsys, monkeypatch
):
    """The default policy: never wait on a compile; start ``fusionlm compile`` detached for
    the step this run lacked; the next run loads what that command stored."""
    started = []
    monkeypatch.setenv("FUSIONLM_BACKGROUND_COMPILE", "1")
    monkeypatch.setattr(cli, "start_detached", lambda command, log: started.append(command))
    argv = ["generate", "What is the capital of France?", "--max-new-tokens", "8"]
    argv += ["--threads", "2", "--model", DEFAULT_MODEL]
    torch.set_num_threads(2)
    step = stored_step_path(fusionlm.load_model(quant="auto"), batch_size=1, cache_len=256)
    step.unlink(missing_ok=True)  # another test may have built it in this session's cache
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "| eager decode |" in err
    assert "building the compiled decode step in the background" in err
    (command,) = started
    assert command[command.index("--cache-len") + 1] == "256"
    assert main(command[command.index("compile") :]) == 0  # what the detached process runs
    capsys.readouterr()
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "Paris" in out and "| compiled decode |" in err
    assert "background" not in err


def test_a_server_builds_its_missing_step_with_fusionlm_compile(capsys, monkeypatch):
    """The server waits on ``fusionlm compile`` for its slots and context, with its own model,
    dtype, quantization, KV cache dtype and threads (the step's key has them all), so it never
    imports the
    compiler itself; a build that fails there is said, and the server builds it itself."""
    ran = []

    def failing_run(command, **options):
        ran.append(command)
        return subprocess.CompletedProcess(command, 1)

    monkeypatch.setattr(cli.subprocess, "run", failing_run)
    torch.set_num_threads(2)
    args = cli.build_parser().parse_args(
        ["serve", "--quant", "int8", "--dtype", "bfloat16", "--kv-cache-dtype", "float16"]
    )
    cli._step_builder(args)(8, 2048)
    (command,) = ran
    assert command[:4] == [sys.executable, "-m", "fusionlm.cli", "compile"]
    assert cli.build_parser().parse_args(command[3:]).__dict__ | {"run": None} == {
        **cli.build_parser().parse_args(["compile"]).__dict__,
        "model": args.model,
        "dtype": "bfloat16",
        "quant": "int8",
        "threads": 2,
        "batch_size": 8,
        "cache_len": 2048,
        "kv_cache_dtype": "float16",
        "run": None,
    }
    assert "building the decode step in another process failed (exit status 1)" in (
        capsys.readouterr().err
    )


@pytest.mark.parametrize("command", ["serve", "compile"])
def test_an_unknown_kv_cache_dtype_is_refused(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--kv-cache-dtype", "bfloat16"])
    assert exit_info.value.code == 2
    assert "argument --kv-cache-dtype: invalid choice: 'bfloat16'" in capsys.readouterr().err


def test_a_failed_background_build_is_not_started_again(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(empty_cache(tmp_path)))
    monkeypatch.setenv("FUSIONLM_BACKGROUND_COMPILE", "1")
    started = []

    def failing_build(command: list[str], log) -> None:
        started.append(command)
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text("fusionlm: error: g++ not found\n")

    monkeypatch.setattr(cli, "start_detached", failing_build)
    argv = ["generate", "Hi", "--max-new-tokens", "2", "--threads", "2"]
    assert main(argv) == 0
    assert main(argv) == 0
    assert len(started) == 1
    assert "the last build of the compiled decode step failed" in capsys.readouterr().err


def test_chat_answers_each_turn_and_starts_one_build_of_the_missing_step(
    capsys, monkeypatch, tmp_path
):
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(empty_cache(tmp_path)))
    monkeypatch.setenv("FUSIONLM_BACKGROUND_COMPILE", "1")
    lines = iter(["What is the capital of France?", "/reset", "What is the capital of France?"])

    def typed(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    started = []
    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr(cli, "start_detached", lambda command, log: started.append(command))
    monkeypatch.setattr(decode_step, "build_in_progress", lambda step: bool(started))
    assert main(["chat", "--max-new-tokens", "12", "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    first, second = out.strip().splitlines()
    assert "Paris" in first and second == first  # /reset: the same question, the same context
    assert "(history cleared)" in err
    assert len(started) == 1  # the second turn finds the build under way
