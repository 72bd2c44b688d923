"""The fine-tuning recipe on a tiny model: outputs, exact resume, crash-safe checkpoints, bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import PIL.Image
import pytest
import torch

import fusionlm
from fusionlm.checkpoint.peft import load_peft_adapter
from fusionlm.cli import main
from fusionlm.errors import InvalidInputError
from fusionlm.models.llama import LlamaConfig
from fusionlm.training import FinetuneConfig, finetune
from fusionlm.training import state as state_module
from fusionlm.training.recipe import _Run, lr_factor
from fusionlm.training.state import latest_checkpoint
from tests.helpers import arithmetic, make_tiny_model_dir, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data")
    train = write_jsonl(directory / "train.jsonl", arithmetic(48))
    val = write_jsonl(directory / "val.jsonl", arithmetic(10, start=100))
    return train, val


def _config(tiny_dir, data, out, **overrides) -> FinetuneConfig:
    values = {
        "model": str(tiny_dir),
        "train_data": str(data[0]),
        "output_dir": str(out),
        "seq_len": 64,
        "batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 6,
        "learning_rate": 3e-3,
        "warmup_steps": 2,
        "progress": False,
        **overrides,
    }
    return FinetuneConfig(**values)


def test_lora_run_writes_metrics_curve_adapter_and_merged_model(tiny_dir, data, tmp_path):
    config = _config(
        tiny_dir,
        data,
        tmp_path / "out",
        lora=True,
        lora_rank=4,
        lora_targets=["q_proj", "v_proj", "w2"],
        val_data=str(data[1]),
        eval_every=3,
        max_steps=8,
        learning_rate=1e-2,
    )
    result = finetune(config)
    assert len(result.losses) == 8 and result.first_step == 1
    assert result.tokens_per_s > 0 and result.peak_memory_mib > 100  # a process with torch
    assert sum(result.losses[-3:]) < sum(result.losses[:3])  # it learns
    records = [json.loads(line) for line in result.metrics_path.read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6, 8]
    assert all(r["tokens_per_s"] > 0 and r["trained_tokens"] > 0 for r in records if "loss" in r)
    assert result.val_perplexity == pytest.approx(torch.tensor(result.val_loss).exp().item())
    with PIL.Image.open(result.plot_path) as picture:
        assert (picture.format, picture.size) == ("PNG", (1280, 800))

    tokens = torch.randint(0, 256, (1, 20))
    merged = fusionlm.load_model(result.model_dir)
    base_plus_adapter = fusionlm.load_model(tiny_dir)
    load_peft_adapter(base_plus_adapter, result.adapter_dir)
    with torch.no_grad():
        expected = base_plus_adapter(tokens)
        torch.testing.assert_close(merged(tokens), expected, atol=1e-4, rtol=1e-4)
        assert (fusionlm.load_model(tiny_dir)(tokens) - expected).abs().max() > 1e-3
    assert fusionlm.load_tokenizer(result.model_dir).chat_template is not None
    with pytest.raises(ValueError, match=r"already holds a run \(model\)"):
        finetune(config)


class Stop(Exception):
    pass


def _stop_at(step: int):
    def on_step(done: int, record: dict) -> None:
        if done == step:
            raise Stop

    return on_step


@pytest.mark.parametrize("lora", [False, True])
def test_resume_repeats_the_uninterrupted_run_step_for_step(tiny_dir, data, tmp_path, lora):
    # LoRA dropout draws random numbers every step: the RNG state must be restored too.
    extra = {"lora": True, "lora_dropout": 0.2, "lora_rank": 4} if lora else {}
    full = finetune(_config(tiny_dir, data, tmp_path / "a", **extra))
    with pytest.raises(Stop):
        finetune(
            _config(tiny_dir, data, tmp_path / "b", save_every=3, **extra), on_step=_stop_at(4)
        )
    assert latest_checkpoint(tmp_path / "b").name == "step_00000003"
    resumed = finetune(_config(tiny_dir, data, tmp_path / "b", save_every=3, resume=True, **extra))
    assert resumed.first_step == 4
    assert resumed.losses == full.losses[3:]
    steps = [
        json.loads(line)["step"]
        for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def _metrics(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("resume", [False, True])  # a rerun, or a resume with nothing to resume
def test_a_run_that_stopped_before_its_first_checkpoint_starts_again_in_place(
    tiny_dir, data, tmp_path, capsys, resume
):
    out = tmp_path / "o"
    with pytest.raises(Stop):
        finetune(_config(tiny_dir, data, out, save_every=3), on_step=_stop_at(2))
    assert latest_checkpoint(out) is None and (out / "metrics.jsonl").is_file()
    again = finetune(_config(tiny_dir, data, out, max_steps=2, resume=resume))
    assert again.first_step == 1
    assert "stopped before its first checkpoint" in capsys.readouterr().err
    assert [record["step"] for record in _metrics(out)] == [1, 2]


def test_an_extended_run_goes_on_along_its_longer_schedule(tiny_dir, data, tmp_path):
    """Six steps, then resume=true max_steps=9: every step's learning rate is that step's on
    the schedule of its run (steps 7-9: a fresh 9-step run's, not the 6-step one's end)."""
    config = _config(tiny_dir, data, tmp_path / "o", save_every=3)
    finetune(config)
    finetune(_config(tiny_dir, data, tmp_path / "o", save_every=3, max_steps=9, resume=True))

    def schedule(total: int) -> list[float]:
        return [
            config.learning_rate
            * lr_factor(step, warmup_steps=2, total_steps=total, min_ratio=config.min_lr_ratio)
            for step in range(total)
        ]

    lrs = [record["lr"] for record in _metrics(tmp_path / "o")]
    assert lrs == pytest.approx(schedule(6) + schedule(9)[6:], rel=1e-12)


def test_a_crash_while_saving_leaves_the_previous_checkpoint(tiny_dir, data, tmp_path, monkeypatch):
    full = finetune(_config(tiny_dir, data, tmp_path / "a"))
    real_save = state_module.save_file
    calls = []

    def failing_save(tensors, filename, *args, **kwargs):
        calls.append(filename)
        if "step_00000004" in filename and filename.endswith("optimizer.safetensors"):
            with open(filename, "wb") as f:
                f.write(b"half a file")
            raise OSError("disk full")
        return real_save(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(state_module, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        finetune(_config(tiny_dir, data, tmp_path / "b", save_every=2))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path / "b").name == "step_00000002"
    resumed = finetune(_config(tiny_dir, data, tmp_path / "b", save_every=2, resume=True))
    assert resumed.losses == full.losses[2:]
    names = sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir())
    assert names == ["latest", "step_00000004", "step_00000006"]  # stale temp dir cleaned


@pytest.fixture
def no_training(monkeypatch):
    def fail(self, step):
        raise AssertionError("training started")

    monkeypatch.setattr(_Run, "train_step", fail)


def test_bad_data_and_seq_len_fail_before_training(tiny_dir, data, tmp_path, no_training):
    with pytest.raises(
        FileNotFoundError, match=r"train_data: data file .*missing.jsonl does not exist"
    ):
        finetune(
            _config(tiny_dir, data, tmp_path / "o", train_data=str(tmp_path / "missing.jsonl"))
        )
    with pytest.raises(FileNotFoundError, match="val_data: data file"):
        finetune(_config(tiny_dir, data, tmp_path / "o", val_data=str(tmp_path / "missing.jsonl")))
    bad = write_jsonl(tmp_path / "bad.jsonl", [*arithmetic(3), '{"prompt": "1+1="'])
    with pytest.raises(ValueError, match=r"bad.jsonl:4: malformed JSON"):
        finetune(_config(tiny_dir, data, tmp_path / "o", train_data=str(bad)))
    with pytest.raises(ValueError, match="seq_len=256 exceeds the model's context of 128 tokens"):
        finetune(_config(tiny_dir, data, tmp_path / "o", seq_len=256))
    with pytest.raises(FileNotFoundError, match=r"resume=true, but .* holds no checkpoint"):
        finetune(_config(tiny_dir, data, tmp_path / "o", resume=True))


def test_a_model_no_config_json_describes_is_refused_before_training(
    tiny_dir, data, tmp_path, no_training, monkeypatch
):
    """A full run would end unable to write what it trained: it does not start."""

    def no_config(self):
        raise InvalidInputError("no config.json describes it")

    monkeypatch.setattr(LlamaConfig, "to_hf", no_config)
    with pytest.raises(ValueError, match=r"could not be written at the end: no config\.json"):
        finetune(_config(tiny_dir, data, tmp_path / "o"))
    with pytest.raises(AssertionError, match="training started"):  # writes an adapter only
        finetune(_config(tiny_dir, data, tmp_path / "o", lora=True, save_merged=False))


@pytest.mark.parametrize(
    ("other", "message"),
    [
        ({"num_hidden_layers": 1}, "differs in architecture \\(num_hidden_layers: 2 vs 1\\)"),
        ({}, "differs in base_weights"),
    ],
)
def test_resuming_from_another_models_checkpoint_is_refused(
    tiny_dir, data, tmp_path, monkeypatch, other, message
):
    finetune(_config(tiny_dir, data, tmp_path / "o", max_steps=2, save_every=2))
    other_dir = make_tiny_model_dir(tmp_path / "other_model", **other)
    monkeypatch.setattr(_Run, "train_step", lambda self, step: pytest.fail("training started"))
    with pytest.raises(ValueError, match=f"cannot resume from .*step_00000002.*{message}"):
        finetune(_config(other_dir, data, tmp_path / "o", max_steps=4, resume=True))
    with pytest.raises(
        ValueError, match=r"already holds a run \(step_00000002\); pass resume=true"
    ):
        finetune(_config(tiny_dir, data, tmp_path / "o", max_steps=4))
    changed = write_jsonl(tmp_path / "changed.jsonl", arithmetic(40))
    with pytest.raises(ValueError, match="differs in data"):
        finetune(
            _config(
                tiny_dir, data, tmp_path / "o", max_steps=4, resume=True, train_data=str(changed)
            )
        )


def test_cli_errors_are_one_line_and_python_dash_m_trains(tiny_dir, data, tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text(
        f'model = "{tiny_dir}"\ntrain_data = "{data[0]}"\noutput_dir = "{tmp_path / "out"}"\n'
        "seq_len = 64\nmax_steps = 2\nlora = true\nsave_merged = false\n"
    )
    assert main(["finetune", str(config), "lerning_rate=1"]) == 2
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and "unknown config key 'lerning_rate'" in err
        and "learning_rate" in err
    )
    assert main(["finetune", str(config), "seq_len=4096"]) == 2
    assert "exceeds the model's context of 128" in capsys.readouterr().err
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fusionlm",
            "finetune",
            str(config),
            "progress=false",
            "batch_size=2",
            "compile=false",  # compiling is tested in-process; here the command is
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "done: 2 steps" in done.stderr
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "model").exists()


def _losses(tiny_dir, data, out, **overrides) -> list[float]:
    return finetune(_config(tiny_dir, data, out, max_steps=5, **overrides)).losses


def test_compiled_layers_give_the_eager_losses(tiny_dir, data, tmp_path):
    eager = _losses(tiny_dir, data, tmp_path / "eager", compile=False, bf16=False)
    compiled = _losses(tiny_dir, data, tmp_path / "compiled", compile=True, bf16=False)
    assert compiled == pytest.approx(eager, rel=1e-5)


def test_a_failed_compile_runs_eagerly_after_one_warning(tiny_dir, data, tmp_path, capsys):
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    eager = _losses(tiny_dir, data, tmp_path / "eager", compile=False, bf16=False)
    torch._dynamo.reset()  # no graph compiled by another test may be reused
    capsys.readouterr()
    # No C++ compiler, and no compiled graph from a cache.
    no_compiler = {"cpp.cxx": ("no-such-compiler",), "fx_graph_cache": False}
    with inductor_config.patch(no_compiler), functorch_config.patch(enable_autograd_cache=False):
        fallen_back = _losses(tiny_dir, data, tmp_path / "fallback", compile=True, bf16=False)
    torch._dynamo.reset()
    assert fallen_back == eager
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "could not compile" in line]
    assert len(warnings) == 1 and "no-such-compiler" in warnings[0], err
    assert "Traceback" not in err


def test_frozen_weights_held_in_bf16_change_nothing_under_autocast(tiny_dir):
    from fusionlm.modules.lora import apply_lora
    from fusionlm.training.precision import hold_frozen_in_bf16

    models = [fusionlm.load_model(tiny_dir) for _ in range(2)]
    for model in models:
        torch.manual_seed(0)
        apply_lora(model, targets=["q_proj", "v_proj"], rank=4, alpha=8.0)
    assert hold_frozen_in_bf16(models[1]) > 0
    assert models[1].layers[0].attn.q_proj.weight.dtype == torch.bfloat16
    assert models[1].tok_embeddings.weight.dtype == torch.float32  # the tied output matrix
    tokens = torch.randint(0, 256, (2, 12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [model(tokens) for model in models]
    assert torch.equal(outputs[0], outputs[1])


def test_fused_adamw_gives_the_per_tensor_losses(tiny_dir):
    """The recipe's AdamW runs fused (one kernel over all parameters): the same losses over 5
    steps as torch's per-tensor loop, within fp32 rounding."""
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(0))
    losses = {}
    for fused in (False, True):
        model = fusionlm.load_model(tiny_dir).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, fused=fused)
        losses[fused] = []
        for _ in range(5):
            logits = model(tokens[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses[fused].append(loss.item())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[True][-1] < losses[True][0]
