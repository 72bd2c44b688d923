"""The decode step compiled ahead of time: the eager loop's greedy tokens, stored once and
reused, keyed by what changes it, and never run when the stored file is not the step asked
for."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import weakref
import zipfile

import pytest
import torch

import fusionlm
import fusionlm.inference.attention
from fusionlm.generation import generate
from fusionlm.inference import decode_step
from fusionlm.inference.quantize import quantize
from fusionlm.inference.threads import ThreadPlanner
from fusionlm.modules.kv_cache import KVCache
from tests.helpers import empty_cache, tiny

pytestmark = [pytest.mark.compiled, pytest.mark.slow]

PROMPTS = [[5, 17, 3, 88, 41, 9, 60], [70, 2, 33], [11, 12, 13, 14, 15]]


def model() -> torch.nn.Module:
    return tiny("sdpa_cpu", max_position_embeddings=512)


def stored(step_cache) -> set[str]:
    return {path.name for path in step_cache.glob("decode-steps/*.pt2")}


def test_compiled_greedy_tokens_equal_eager(step_cache):
    """Padded batch and lone prompts; prompts whose length plus new tokens round up to the
    same cache length share one stored step per batch size."""
    decoder = model()
    before = stored(step_cache)
    eager = generate(decoder, PROMPTS, max_new_tokens=24, compile=False)
    assert generate(decoder, PROMPTS, max_new_tokens=24, compile=True) == eager
    assert [generate(decoder, [p], max_new_tokens=24, compile=True)[0] for p in PROMPTS] == eager
    steps = {
        decode_step.stored_step_path(decoder, batch_size=b, cache_len=256).name for b in (3, 1)
    }
    assert steps <= stored(step_cache)
    assert stored(step_cache) - before <= steps


def test_a_stored_step_computes_with_the_models_current_weights(step_cache):
    """The weights are bound to the step per token loop, not baked into it: new values
    (same layout) reuse the stored step and give the new model's tokens."""
    decoder = model()
    generate(decoder, PROMPTS[:1], max_new_tokens=8, compile=True)
    before = stored(step_cache)
    with torch.no_grad():
        for parameter in decoder.parameters():
            parameter.mul_(-1.5)
    eager = generate(decoder, PROMPTS[:1], max_new_tokens=24, compile=False)
    assert generate(decoder, PROMPTS[:1], max_new_tokens=24, compile=True) == eager
    assert stored(step_cache) == before


def step_logits(
    decoder, prompt: list[int], continuation: list[int], *, compile, cache_dtype=torch.float32
):
    """Next-token logits ``[len(continuation), v]`` of decode steps fed ``continuation``."""
    decoder.setup_caches(1, cache_dtype, decoder_max_seq_len=256, fixed_shape=True)
    try:
        with torch.inference_mode():
            decoder(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))
            step = decode_step.DecodeStep(decoder, compile=compile)
            assert step.compiled == (compile is True)
            return torch.cat(
                [
                    step(
                        torch.tensor([[token]]),
                        mask=None,
                        encoder_mask=None,
                        input_pos=torch.tensor([[len(prompt) + i]]),
                    )
                    for i, token in enumerate(continuation)
                ]
            )
    finally:
        decoder.remove_caches()


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs two threads")
def test_a_compiled_step_gives_the_same_logits_on_one_thread(monkeypatch):
    """The thread planner may run any step on one thread: every kernel computes each output
    element on one thread, so the count changes who works, not the sums."""
    decoder = model()
    continuation = generate(decoder, [PROMPTS[0]], max_new_tokens=12, compile=False)[0]
    two = step_logits(decoder, PROMPTS[0], continuation, compile=True)
    monkeypatch.setattr(ThreadPlanner, "next_threads", lambda self: 1)
    one = step_logits(decoder, PROMPTS[0], continuation, compile=True)
    assert torch.equal(one, two)


def test_a_compiled_steps_own_kernels_run_on_one_thread():
    """Inductor's kernels (norms, rope, cache writes) stay on the calling thread: at its
    default it runs a 32-row step's in OpenMP regions, and may split a norm's sum across
    threads, whose result would then change with the thread count the planner picks."""
    path = decode_step.compile_decode_step(model(), batch_size=32, cache_len=64)
    with zipfile.ZipFile(path) as package:
        (kernels,) = [name for name in package.namelist() if name.endswith(".kernel.cpp")]
        source = package.read(kernels).decode()
    assert "cpp_fused" in source and "omp parallel" not in source


def test_a_compiled_step_runs_as_a_dispatcher_op():
    """A stored step runs as ``fusionlm::run_step``, which PyTorch's dispatcher calls with the
    GIL released, so other threads (a server's event loop) run Python meanwhile; torch's own
    binding of the loader (``torch._C._aoti``) held the GIL for the whole step."""
    decoder = model()
    decoder.setup_caches(1, torch.float32, decoder_max_seq_len=256, fixed_shape=True)
    try:
        with torch.inference_mode():
            step = decode_step.DecodeStep(decoder, compile=True)
            assert step.compiled
            token, position = torch.tensor([[5]]), torch.tensor([[0]])
            with torch.profiler.profile() as profile:
                step(token, mask=None, encoder_mask=None, input_pos=position)
    finally:
        decoder.remove_caches()
    assert "fusionlm::run_step" in {event.name for event in profile.events()}


def test_a_float16_cache_has_its_own_step_with_the_eager_logits(step_cache):
    """A float16 KV cache is another step (its key names the cache's dtype), which computes
    what the eager steps compute over the same cache."""
    decoder = model()
    keys = {
        dtype: decode_step.step_key(decoder, batch_size=1, cache_len=256, cache_dtype=dtype)
        for dtype in (None, torch.float32, torch.float16)
    }
    assert keys[None] == keys[torch.float32] != keys[torch.float16]
    continuation = generate(decoder, [PROMPTS[0]], max_new_tokens=8, compile=False)[0]
    logits = {
        compile: step_logits(
            decoder, PROMPTS[0], continuation, compile=compile, cache_dtype=torch.float16
        )
        for compile in (True, False)
    }
    torch.testing.assert_close(logits[True], logits[False], atol=1e-5, rtol=0)
    assert f"{keys[torch.float16]}.pt2" in stored(step_cache)


def test_token_loops_reuse_the_caches_their_step_is_bound_to(step_cache, monkeypatch):
    """AOTInductor keeps every tensor a step is bound to for good: three token loops must
    leave one set of KV caches alive, not three, and decode as the first did."""
    decoder = model()
    created = []
    make_cache = KVCache.__init__

    def recording(self, *args, **kwargs):
        make_cache(self, *args, **kwargs)
        created.append(weakref.ref(self.k_cache))

    monkeypatch.setattr(KVCache, "__init__", recording)
    outputs = [generate(decoder, PROMPTS[:1], max_new_tokens=12, compile=True) for _ in range(3)]
    gc.collect()
    assert outputs[0] == outputs[1] == outputs[2]
    assert len(created) == 3 * len(decoder.layers)
    assert sum(ref() is not None for ref in created) == len(decoder.layers)


@pytest.mark.parametrize("format", ["bf16", "int8", "int4", "w8a8"])
def test_compiled_weight_only_steps_equal_eager(format):
    """The kernels are custom ops, opaque to inductor: the compiled step runs the same
    kernels in fp32, so its logits equal eager's up to the order of inductor's fused fp32
    ops, and the greedy tokens are the same."""
    decoder = quantize(tiny("sdpa_cpu", max_position_embeddings=512, intermediate_size=128), format)
    continuation = generate(decoder, [PROMPTS[0]], max_new_tokens=24, compile=False)[0]
    eager = step_logits(decoder, PROMPTS[0], continuation, compile=False)
    compiled = step_logits(decoder, PROMPTS[0], continuation, compile=True)
    assert eager.abs().max() > 1.0
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)
    assert generate(decoder, [PROMPTS[0]], max_new_tokens=24, compile=True) == [continuation]


def test_the_key_covers_what_changes_the_step():
    decoder = model()

    def key(batch_size: int = 1, cache_len: int = 256) -> str:
        return decode_step.step_key(decoder, batch_size=batch_size, cache_len=cache_len)

    base = key()
    assert key() == base
    assert key(batch_size=2) != base
    assert key(cache_len=512) != base
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert key() != base
    finally:
        torch.set_num_threads(threads)
    decoder.layers[0].attn.scale *= 2.0  # a Python number the graph bakes in
    assert key() != base
    decoder.layers[0].attn.scale /= 2.0
    up = decoder.layers[0].mlp.w1
    up.weight = torch.nn.Parameter(up.weight.detach().t().contiguous().t())  # new strides
    assert key() != base
    decoder.setup_caches(1, torch.float32, decoder_max_seq_len=256, fixed_shape=True)
    assert key() == decode_step.step_key(decoder, batch_size=1, cache_len=256)
    wider = tiny("sdpa_cpu", max_position_embeddings=512, intermediate_size=128)
    fp32 = decode_step.step_key(wider, batch_size=1, cache_len=256)
    assert decode_step.step_key(quantize(wider, "int8"), batch_size=1, cache_len=256) != fp32


def test_a_second_process_loads_the_stored_step_and_a_new_thread_count_rebuilds(
    hf_llama_dir, tmp_path
):
    directory, _ = hf_llama_dir
    script = (
        "import sys, torch, fusionlm\n"
        "torch.set_num_threads(int(sys.argv[1]))\n"
        f"model = fusionlm.load_model({str(directory)!r})\n"
        "print(fusionlm.generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=12, compile=True))\n"
    )
    env = {**os.environ, "FUSIONLM_CACHE_DIR": str(empty_cache(tmp_path))}

    def run(threads: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", script, str(threads)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )

    first, second, other = run(1), run(1), run(2)
    assert "compiling the decode step" in first.stderr
    assert "compiling the decode step" not in second.stderr
    assert second.stdout == first.stdout
    assert "compiling the decode step" in other.stderr
    assert other.stdout == first.stdout
    assert len(list(tmp_path.glob("decode-steps/*.pt2"))) == 2


def put_in_place_of(tmp_path, monkeypatch, decoder, *, content: bytes):
    """A cache of its own in which ``decoder``'s batch-1 step is the file ``content``."""
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(tmp_path))
    path = decode_step.stored_step_path(decoder, batch_size=1, cache_len=256)
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def any_stored_step(step_cache) -> bytes:
    return sorted(step_cache.glob("decode-steps/*.pt2"))[0].read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_or_foreign_step_is_not_run(damage, step_cache, tmp_path, monkeypatch):
    """A truncated file, or a whole step built for another model or torch (what a copied or
    renamed file would be), under this model's name: one warning, the file is removed so a
    later build replaces it, and the tokens are the eager loop's."""
    decoder = model()
    generate(decoder, PROMPTS[:1], max_new_tokens=4, compile=True)  # some step is stored
    other = tiny("sdpa_cpu", max_position_embeddings=512, intermediate_size=128)
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    generate(other, PROMPTS[:1], max_new_tokens=4, compile=True)
    monkeypatch.undo()
    own = decode_step.stored_step_path(decoder, batch_size=1, cache_len=256).name
    foreign = next(p for p in step_cache.glob("decode-steps/*.pt2") if p.name != own)
    content = foreign.read_bytes()
    if damage == "truncated":
        content = any_stored_step(step_cache)[:5000]
    path = put_in_place_of(tmp_path, monkeypatch, decoder, content=content)
    eager = generate(decoder, PROMPTS[:1], max_new_tokens=12, compile=False)
    expected = "unreadable" if damage == "truncated" else "built for other settings"
    with pytest.warns(RuntimeWarning, match=expected):
        assert generate(decoder, PROMPTS[:1], max_new_tokens=12) == eager
    assert not path.exists()


def test_an_unwritable_cache_falls_back_to_eager_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(blocker))
    decoder = model()
    eager = generate(decoder, PROMPTS, max_new_tokens=8, compile=False)
    with pytest.warns(RuntimeWarning, match="decoding eagerly") as caught:
        assert generate(decoder, PROMPTS, max_new_tokens=8, compile=True) == eager
    assert len(caught) == 1


def test_a_compiler_failure_falls_back_to_eager(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(tmp_path))

    def fail(*args, **kwargs):
        raise RuntimeError("C++ compile error: g++ not found")

    monkeypatch.setattr(decode_step, "_build", fail)
    decoder = model()
    with pytest.warns(RuntimeWarning, match="(?s)decoding eagerly.*g\\+\\+ not found"):
        tokens = generate(decoder, PROMPTS, max_new_tokens=8, compile=True)
    assert tokens == generate(decoder, PROMPTS, max_new_tokens=8, compile=False)


def test_default_model_compiled_greedy_tokens_equal_eager():
    """fp32, batch 1: the compiled step (fp32 matvecs through the streaming kernel, the
    decode-attention kernel) gives the eager loop's tokens on the real model too."""
    decoder, tokenizer = fusionlm.load_model(), fusionlm.load_tokenizer()
    for question in ("What is the capital of France?", "Write a haiku about the sea."):
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        prompt = tokenizer.encode(text, add_special_tokens=False)
        eager = generate(decoder, [prompt], max_new_tokens=24, compile=False)
        assert generate(decoder, [prompt], max_new_tokens=24, compile=True) == eager


def test_the_cache_directory_is_overridable(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSIONLM_CACHE_DIR", str(tmp_path))
    assert decode_step.cache_dir() == tmp_path / "decode-steps"
    monkeypatch.delenv("FUSIONLM_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert decode_step.cache_dir() == tmp_path / "xdg" / "fusionlm" / "decode-steps"


def test_bad_compile_settings_are_refused():
    decoder = model()
    with pytest.raises(ValueError, match="compile must be 'auto', True or False, got 'yes'"):
        generate(decoder, PROMPTS, max_new_tokens=2, compile="yes")
    with pytest.raises(ValueError, match=r"cache_len must be in \[1, 512\], got 513"):
        decode_step.compile_decode_step(decoder, cache_len=513)
    with pytest.raises(TypeError, match=r"only a TransformerDecoder's decode step .* not Linear"):
        decode_step.compile_decode_step(torch.nn.Linear(2, 2))
