"""Text generation: one sampling function, one token loop, batched or streamed.

The loop left-pads a batch of prompts into one KV cache: each row gets its own positions
(``0..len-1`` after its padding) and a padding mask, so a batch gives the same tokens as
each prompt alone. Policy when a prompt plus ``max_new_tokens`` exceeds the model's
context: a ``ValueError`` before any work, naming both numbers; nothing is truncated
silently.

The fast path: the prompt runs eagerly (one large forward, already efficient), and each
decode step runs as one graph compiled ahead of time (``fusionlm.inference.decode_step``)
over a fixed-shape cache (``KVCache(fixed_shape=True)``), whose length is rounded up to a
multiple of ``CACHE_LENGTH_MULTIPLE`` so that nearby prompt lengths share one graph.
``compile="auto"`` (the default) uses a compiled step stored on disk for this model and
these settings and otherwise decodes eagerly: a call never waits on a compile it did not
ask for. ``compile=True`` builds the step first if it is not stored (tens of seconds,
said on stderr); ``fusionlm compile`` builds it ahead. The math is the same either way:
the tests hold the greedy tokens equal.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from fusionlm.errors import InvalidInputError
from fusionlm.inference.decode_step import CompileMode, DecodeStep
from fusionlm.modules import masks

CACHE_LENGTH_MULTIPLE = 256
"""Compiled decoding rounds the KV cache length up to a multiple of this (see the module doc)."""
PREFILL_CHUNK = 256
"""Prompt tokens run through the model at a time: the activations' memory is bounded whatever
the prompt's length. A 512-token prompt of the default model with int4 weights, against one
pass: peak RSS 441 -> 424-428 MB, 533 instead of 569 tok/s (128 tokens: 481 tok/s).
``fusionlm serve`` prefills in chunks of this size too."""


class Decoder(Protocol):
    """What generation needs of a model: ``TransformerDecoder`` and ``DeepFusionModel``
    (whose ``encoder_input`` carries images) both are one."""

    config: Any

    @property
    def max_seq_len(self) -> int: ...

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def device(self) -> torch.device: ...

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: int | None = None,
        decoder_max_seq_len: int | None = None,
        fixed_shape: bool = False,
    ) -> None: ...

    def remove_caches(self) -> None: ...

    def __call__(
        self,
        tokens: Tensor,
        *,
        mask: Tensor | None = None,
        encoder_input: Any = None,
        encoder_mask: Tensor | None = None,
        input_pos: Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> Tensor:
        """``tokens [b, s]`` -> logits ``[b, s or logits_to_keep, v]``."""


if TYPE_CHECKING:
    from fusionlm.images import ImageLike
    from fusionlm.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How the next token is chosen.

    First the logits are adjusted, in this order: a ``repetition_penalty`` > 1 makes tokens
    already in the sequence (prompt and output) less likely (as in transformers: positive
    logits divided, negative multiplied); ``presence_penalty`` and ``frequency_penalty`` are
    OpenAI's (subtracted once per token that occurs in the output, and once per occurrence);
    ``logit_bias`` adds its value to its token's logit. Then ``temperature == 0`` is greedy
    (argmax); otherwise logits are divided by the temperature and filtered by ``top_k``,
    then ``top_p`` (nucleus), then ``min_p`` (tokens below ``min_p`` times the top
    probability), then sampled.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise InvalidInputError(
                f"temperature must be >= 0 (0 = greedy), got {self.temperature}"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InvalidInputError(f"top_k must be an integer >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0.0 <= self.min_p <= 1.0:
            raise InvalidInputError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0.0:
            raise InvalidInputError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}"
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidInputError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        for token, bias in (self.logit_bias or {}).items():
            if not isinstance(token, int) or token < 0 or not -100.0 <= bias <= 100.0:
                raise InvalidInputError(
                    f"logit_bias maps token ids (>= 0) to biases in [-100, 100], got "
                    f"{token!r}: {bias!r}"
                )

    @property
    def penalizes_output(self) -> bool:
        """Whether sampling reads the output so far (presence or frequency penalty)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclasses.dataclass
class GenerationStats:
    """Counts and timings of one generation, filled in as it runs.

    The prefill produces the first new token; the first decode step (where compilation, if
    any, happens) the second; ``decode_s`` times the steps after that.
    """

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    first_step_s: float = 0.0
    decode_s: float = 0.0

    def record(self, elapsed: float) -> None:
        """Count a new token that arrived ``elapsed`` seconds after the generation began."""
        if self.new_tokens == 0:
            self.prefill_s = elapsed
        elif self.new_tokens == 1:
            self.first_step_s = elapsed - self.prefill_s
        else:
            self.decode_s = elapsed - self.prefill_s - self.first_step_s
        self.new_tokens += 1

    @property
    def decode_tok_s(self) -> float:
        """Tokens per second of the decode steps after the first."""
        steps = self.new_tokens - 2
        return steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0

    def summary(self) -> str:
        return (
            f"prompt {self.prompt_tokens} tok in {self.prefill_s:.2f} s | first step "
            f"{self.first_step_s:.2f} s | {self.new_tokens} new tok, {self.decode_tok_s:.1f} tok/s"
        )


def sample(
    logits: Tensor,
    params: SamplingParams,
    *,
    history: Tensor | None = None,
    output: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Choose the next token of each row.

    Args:
        logits: ``[b, v]``.
        params: the sampling rule.
        history: ``[b, t]`` token ids seen so far (prompt and output), for the repetition
            penalty.
        output: ``[b, t_o]`` token ids generated so far, for the presence and frequency
            penalties.
        generator: the random source, for reproducible sampling.

    Returns:
        ``[b]`` token ids.

    Raises:
        ValueError: a ``logit_bias`` token outside the vocabulary.
    """
    logits = logits.float()
    if params.repetition_penalty != 1.0 and history is not None and history.numel():
        seen = logits.gather(-1, history)
        seen = torch.where(
            seen > 0, seen / params.repetition_penalty, seen * params.repetition_penalty
        )
        logits = logits.scatter(-1, history, seen)
    if params.penalizes_output and output is not None and output.numel():
        counts = torch.zeros_like(logits).scatter_add_(
            -1, output, torch.ones_like(logits[:, :1]).expand_as(output)
        )
        logits = logits - counts * params.frequency_penalty - (counts > 0) * params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), dtype=torch.long, device=logits.device)
        if int(ids.max()) >= logits.shape[-1]:
            raise InvalidInputError(
                f"logit_bias names token {int(ids.max())}, beyond the vocabulary of "
                f"{logits.shape[-1]} tokens"
            )
        bias = torch.tensor(list(params.logit_bias.values()), device=logits.device)
        logits = logits.index_add(-1, ids, bias.expand(logits.shape[0], -1))
    if params.temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(dim=-1)
    if params.top_p is not None and params.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Drop a token when the tokens more likely than it already reach top_p; keeps >= 1.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= params.top_p
        probs = probs.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), 0.0)
    if params.min_p is not None and params.min_p > 0.0:
        threshold = params.min_p * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_tokens(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int | None = None,
    stop_tokens: Iterable[int] = (),
    pad_id: int = 0,
    encoder_input: Mapping[str, Tensor] | None = None,
    encoder_mask: Tensor | None = None,
    compile: CompileMode = "auto",
) -> Iterator[list[int | None]]:
    """The token loop: yields, per step, each row's new token (None once a row has stopped).

    A row stops after emitting a stop token (which is yielded, so callers see why) or when
    the loop ends; the loop ends when every row has stopped or after ``max_new_tokens``.
    The loop sets up KV caches sized for this batch and removes them when it ends. Prompts
    run through the model ``PREFILL_CHUNK`` tokens at a time.

    A fusion model (``DeepFusionModel``) reads ``encoder_input`` at the prefill only: its
    cross-attention keys and values are cached, and decode steps pass no encoder input.
    ``encoder_mask`` (bool ``[b, longest prompt, s_e]``, row i's prompt in its last
    ``len(prompt_i)`` columns, as the batch is left-padded) says which encoder positions each
    prompt token sees; each generated token sees what its row's last prompt token sees.
    ``fusionlm.models.fusion.image_inputs`` makes both from images.

    ``compile`` picks the decode step (``CompileMode``, see the module doc); unless False,
    the cache has a fixed shape (see ``cache_length``), else it is trimmed to its filled
    slots.

    Raises:
        ValueError: an unknown ``compile``, no prompts, an empty prompt, ids outside the
            vocabulary, a prompt plus ``max_new_tokens`` longer than the model's context, or
            an encoder input without an encoder mask of shape ``[b, longest prompt, s_e]``
            (or the reverse).
    """
    if not prompts:
        raise InvalidInputError("generate needs at least one prompt")
    if max_new_tokens < 1:
        raise InvalidInputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if compile not in ("auto", True, False):
        raise InvalidInputError(f"compile must be 'auto', True or False, got {compile!r}")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise InvalidInputError("a prompt is empty: every prompt needs at least one token")
    longest = max(lengths)
    total = longest + max_new_tokens
    if total > model.max_seq_len:
        raise InvalidInputError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {total} exceeds the "
            f"model's context of {model.max_seq_len} tokens; shorten the prompt or lower max_new_tokens"
        )
    device = model.device
    b = len(prompts)
    tokens = torch.full((b, longest), pad_id, dtype=torch.long, device=device)
    # A compiled step's cache length is rounded so steps serve many lengths; a loop that
    # takes no decode step (one new token: the prefill's) needs only its own.
    steps = compile is not False and max_new_tokens > 1
    cache_len = cache_length(total, model.max_seq_len) if steps else total
    keep = torch.zeros(b, cache_len, dtype=torch.bool, device=device)
    keep[:, longest:] = True
    for i, prompt in enumerate(prompts):
        tokens[i, longest - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        keep[i, longest - len(prompt) : longest] = True
    positions = (keep[:, :longest].cumsum(-1) - 1).clamp(min=0)
    padded = min(lengths) != longest
    encoder_input, encoder_mask = _check_encoder_input(
        encoder_input, encoder_mask, shape=(b, longest), device=device
    )

    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(sorted(set(stop_tokens)), dtype=torch.long, device=device)
    model.setup_caches(
        b,
        model.dtype,
        # Cross-attention layers of a fusion model given no encoder input get an empty cache.
        encoder_max_seq_len=encoder_mask.shape[-1] if encoder_mask is not None else 0,
        decoder_max_seq_len=cache_len,
        fixed_shape=compile is not False,
    )
    # Padding must not count as "seen" for the repetition penalty: stand in each row's last
    # prompt token, which is in its history anyway.
    history = torch.where(keep[:, :longest], tokens, tokens[:, -1:])
    prefill_mask = None
    if padded:
        predicate = masks.and_masks(masks.causal(), masks.padding(keep))
        prefill_mask = masks.to_bool_mask(
            predicate, batch_size=b, q_len=longest, kv_len=cache_len, device=device
        )
    # A decode step attends to every filled slot except padding; the cache itself hides the
    # unfilled ones (by trimming, or by a mask when its shape is fixed).
    step_mask = keep[:, None, None, :] if padded else None
    step: DecodeStep | None = None  # made once a step is needed: after the first token is out
    step_encoder_mask = encoder_mask[:, -1:] if encoder_mask is not None else None

    done = torch.zeros(b, dtype=torch.bool, device=device)
    try:
        with torch.inference_mode():
            for start in range(0, longest, PREFILL_CHUNK):
                chunk = slice(start, start + PREFILL_CHUNK)
                logits = model(
                    tokens[:, chunk],
                    mask=None if prefill_mask is None else prefill_mask[:, :, chunk],
                    # The cross-attention caches keep the encoder's keys after the first chunk.
                    encoder_input=encoder_input if start == 0 else None,
                    encoder_mask=None if encoder_mask is None else encoder_mask[:, chunk],
                    input_pos=positions[:, chunk],
                    logits_to_keep=1,
                )[:, -1]
            position = positions[:, -1:]
            for emitted in range(1, max_new_tokens + 1):
                next_tokens = sample(
                    logits,
                    sampling,
                    history=history,
                    output=history[:, longest:],
                    generator=generator,
                )
                yield [
                    None if d else t
                    for t, d in zip(next_tokens.tolist(), done.tolist(), strict=True)
                ]
                done |= torch.isin(next_tokens, stop)
                if emitted == max_new_tokens or bool(done.all()):
                    return
                history = torch.cat([history, next_tokens[:, None]], dim=1)
                position = position + 1
                if step is None:
                    step = DecodeStep(model, compile=compile)
                logits = step(
                    next_tokens[:, None],
                    mask=step_mask,
                    encoder_mask=step_encoder_mask,
                    input_pos=position,
                )
    finally:
        # The caches belong to this call; the model goes back to plain forward passes.
        model.remove_caches()


def cache_length(total: int, max_seq_len: int) -> int:
    """The fixed cache length for ``total`` tokens (prompt + new): ``total`` rounded up to a
    multiple of ``CACHE_LENGTH_MULTIPLE``, within the context ``max_seq_len``."""
    return min(max_seq_len, math.ceil(total / CACHE_LENGTH_MULTIPLE) * CACHE_LENGTH_MULTIPLE)


def _check_encoder_input(
    encoder_input: Mapping[str, Tensor] | None,
    encoder_mask: Tensor | None,
    *,
    shape: tuple[int, int],
    device: torch.device,
) -> tuple[dict[str, Tensor] | None, Tensor | None]:
    """The encoder input and mask on ``device``, checked against the padded prompts ``[b, s]``."""
    if encoder_input is None and encoder_mask is None:
        return None, None
    if encoder_input is None or encoder_mask is None:
        raise InvalidInputError(
            "encoder_input and encoder_mask go together: the mask [b, longest prompt, s_e] says "
            "which encoder positions each prompt token sees"
        )
    if not isinstance(encoder_input, Mapping):
        raise TypeError(
            "encoder_input must be a dict of the encoder's keyword arguments, got "
            f"{type(encoder_input).__name__}"
        )
    fits = encoder_mask.dim() == 3 and tuple(encoder_mask.shape[:2]) == shape
    if encoder_mask.dtype != torch.bool or not fits:
        raise InvalidInputError(
            f"encoder_mask must be bool [b, longest prompt, s_e] = [{shape[0]}, {shape[1]}, s_e], "
            f"got {encoder_mask.dtype} {tuple(encoder_mask.shape)}"
        )
    moved = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in encoder_input.items()}
    return moved, encoder_mask.to(device)


def _image_inputs(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    images: Sequence[Sequence[ImageLike]] | None,
) -> tuple[dict[str, Tensor] | None, Tensor | None]:
    if images is None:
        return None, None
    # Imported here: the model families' image preparation is not needed for text.
    from fusionlm.models.fusion import image_inputs

    prepared = image_inputs(model, prompts, images)
    return prepared if prepared is not None else (None, None)


def generate(
    model: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    logit_bias: Mapping[int, float] | None = None,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Tokenizer | None = None,
    images: Sequence[Sequence[ImageLike]] | None = None,
    compile: CompileMode = "auto",
) -> list[list[int]]:
    """Generate continuations of a batch of token-id prompts.

    Args:
        model: a decoder, or a fusion model (``DeepFusionModel``) for ``images``.
        prompts: token ids per prompt; lengths may differ (left-padded internally).
        max_new_tokens: the most tokens to add per prompt.
        temperature, top_k, top_p, min_p, repetition_penalty, presence_penalty,
            frequency_penalty, logit_bias: see ``SamplingParams``.
        seed: makes sampling reproducible.
        stop_tokens: ids that end a row; the stop token is not included in the result.
        stop_strings: texts that end a row once its decoded output contains one; the result
            keeps the tokens up to and including the one completing the string. Needs
            ``tokenizer``.
        tokenizer: decodes outputs for ``stop_strings``.
        images: one list of images per prompt (Pillow images or ``[c, h, w]`` tensors; an
            empty list for a prompt without), encoded once at the prefill. For Llama 3.2
            Vision each image needs its ``<|image|>`` token in the prompt (see
            ``fusionlm.models.fusion.image_inputs``).
        compile: ``"auto"``: the stored compiled step if there is one, else eager; True:
            build it first if needed; False: eager (see the module doc).

    Returns:
        the new tokens of each prompt (not the prompt).
    """
    if stop_strings and tokenizer is None:
        raise InvalidInputError("stop_strings need a tokenizer to decode the output")
    encoder_input, encoder_mask = _image_inputs(model, prompts, images)
    sampling = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        repetition_penalty=repetition_penalty,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        logit_bias=logit_bias,
    )
    stop_ids = set(stop_tokens or ())
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    # Each row's output is decoded incrementally; a stop string is looked for in the text the
    # newest token completed plus the tail before it that a stop string could start in.
    decoders = [tokenizer.stream_decoder() for _ in prompts] if stop_strings else []
    tails = [""] * len(prompts)
    lookback = max((len(s) for s in stop_strings or ()), default=0)
    for step in generate_tokens(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_tokens=stop_ids,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        compile=compile,
    ):
        for i, token in enumerate(step):
            if token is None or finished[i]:
                continue
            if token in stop_ids:
                finished[i] = True
                continue
            outputs[i].append(token)
            if decoders:
                window = tails[i] + decoders[i].push(token)
                tails[i] = window[max(0, len(window) - lookback) :]
                finished[i] = any(s in window for s in stop_strings)
        if all(finished):
            break
    return outputs


def generate_stream(
    model: Decoder,
    tokenizer: Tokenizer,
    prompt: Sequence[int],
    *,
    max_new_tokens: int = 256,
    sampling: SamplingParams | None = None,
    seed: int | None = None,
    stop_tokens: Iterable[int] | None = None,
    stop_strings: Sequence[str] = (),
    stats: GenerationStats | None = None,
    images: Sequence[ImageLike] = (),
    compile: CompileMode = "auto",
) -> Iterator[str]:
    """Yield the text of one prompt's continuation as it is generated.

    Multi-byte characters are never split; text that might be the start of a stop string is
    held back until it is not, and a stop string itself is never yielded. ``stop_tokens``
    defaults to the tokenizer's end-of-turn ids. ``stats``, if given, is filled in.
    ``images`` are the prompt's images and ``compile`` picks the decode step, as for
    ``generate``.
    """
    encoder_input, encoder_mask = _image_inputs(model, [prompt], [list(images)])
    text = TextStream(tokenizer, stop_strings=stop_strings)
    stop_ids = set(tokenizer.stop_ids if stop_tokens is None else stop_tokens)
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = len(prompt)
    started = time.perf_counter()
    for (token,) in generate_tokens(
        model,
        [prompt],
        max_new_tokens=max_new_tokens,
        sampling=sampling or SamplingParams(),
        seed=seed,
        stop_tokens=stop_ids,
        encoder_input=encoder_input,
        encoder_mask=encoder_mask,
        compile=compile,
    ):
        stats.record(time.perf_counter() - started)
        if token is None or token in stop_ids:
            break
        if emit := text.push(token):
            yield emit
        if text.stopped:
            return
    if emit := text.finish():
        yield emit


class TextStream:
    """The text of a stream of token ids, safe to show as it grows: ``push`` an id, get the
    text it completes. A multi-byte character is never split; text that might be the start
    of a stop string is held back until it is not, and a stop string (and anything after it)
    is never returned: once one is complete, ``stopped`` is True and the stream is over.
    """

    def __init__(self, tokenizer: Tokenizer, *, stop_strings: Sequence[str] = ()) -> None:
        self.decoder = tokenizer.stream_decoder()
        self.stop_strings = tuple(stop_strings)
        self.pending = ""
        self.stopped = False

    def push(self, token: int) -> str:
        """Add one id; return the text now safe to show (often "")."""
        if self.stopped:
            return ""
        self.pending += self.decoder.push(token)
        emit, self.pending, self.stopped = _split_at_stop_strings(self.pending, self.stop_strings)
        return emit

    def finish(self) -> str:
        """The rest, at the end of the stream (what was held back, up to a stop string)."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        emit, self.pending, self.stopped = _split_at_stop_strings(
            self.pending, self.stop_strings, final=True
        )
        return emit


def _split_at_stop_strings(
    text: str, stop_strings: Sequence[str], *, final: bool = False
) -> tuple[str, str, bool]:
    """(text safe to emit, text held back, whether a stop string was found)."""
    cut = min((text.find(s) for s in stop_strings if s in text), default=-1)
    if cut >= 0:
        return text[:cut], "", True
    if final:
        return text, "", False
    hold = max(
        (k for s in stop_strings for k in range(1, len(s)) if text.endswith(s[:k])), default=0
    )
    return text[: len(text) - hold], text[len(text) - hold :], False
