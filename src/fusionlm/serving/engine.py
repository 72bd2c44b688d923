"""The engine: one thread that owns the model, a KV cache of ``slots`` rows and the decode
step, and runs every request on it (continuous batching).

Each cache row holds one running request (one choice of it) at its own length: a request
takes free rows when it is admitted and gives them back when it ends, while the others keep
decoding. Waiting requests are admitted in arrival order. A request's prompt is prefilled
alone, into its row (``CacheRows``), in chunks of ``prefill_chunk`` tokens between decode
steps, so that running requests stall by at most one chunk; with ``n > 1`` the prompt is
prefilled once and its row copied. Every decode step runs all ``slots`` rows (idle rows
masked out), so it is one graph of one shape, compiled once.

Output does not depend on the load: a row's numbers never depend on what the other rows
hold (the decode step computes each row on its own, over its own slots, always with the
full batch; a prompt's prefill runs alone), and each request samples with its own random
generator. A request with a seed gives the same text alone and among any others.

A row keeps the tokens it holds after its request ends; a later prompt that begins with
them (the next turn of a chat, a shared system prompt) is prefilled only from where they
differ, unless the request says ``cache_prompt=False``.

The asyncio front end talks to the engine through ``submit`` and ``cancel`` (thread-safe);
the engine answers through each request's ``sink``, called on the engine thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import queue
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from fusionlm.errors import InvalidInputError
from fusionlm.generation import PREFILL_CHUNK, SamplingParams, sample
from fusionlm.inference.decode_step import CompileMode, DecodeStep, stored_step_path
from fusionlm.modules.decoder import CacheRows, TransformerDecoder
from fusionlm.modules.kv_cache import KVCache

if TYPE_CHECKING:
    from fusionlm.serving.metrics import ServerMetrics


@dataclasses.dataclass(kw_only=True)
class Request:
    """What to generate.

    ``max_tokens`` must leave the prompt room in a row (the front end clamps it);
    ``logprobs``: how many alternatives to report per token (0: only the chosen token's
    log-probability), None for none; ``stop_ids``: tokens that end a choice (empty with
    ``ignore_eos``); ``seed``: choice ``i`` samples from a generator seeded ``seed + i``.
    """

    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    n: int = 1
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None
    cache_prompt: bool = True


@dataclasses.dataclass(frozen=True)
class Token:
    """A choice's next token, with its log-probability and the top alternatives when asked."""

    choice: int
    id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    """A choice ended: ``"stop"`` (a stop token) or ``"length"`` (``max_tokens``);
    ``completion_tokens`` counts its tokens, a stop token included."""

    choice: int
    reason: Literal["stop", "length"]
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    """The request ended without finishing (the server is shutting down, or broke)."""

    message: str


@dataclasses.dataclass(frozen=True)
class Started:
    """The request's prompt is in its rows: ``cached_tokens`` of it were reused."""

    prompt_tokens: int
    cached_tokens: int


Event = Token | Finished | Failed | Started


class QueueFull(Exception):
    """``submit`` refused: ``max_queue`` requests are waiting already."""


class NotAccepting(Exception):
    """``submit`` refused: the engine is loading, draining or stopped."""


class Ticket:
    """A submitted request, as the engine and the front end both see it."""

    _ids = itertools.count()

    def __init__(self, request: Request, sink: Callable[[Event], None]) -> None:
        self.id = next(self._ids)
        self.request = request
        self.sink = sink
        self.submitted = time.perf_counter()
        self.cancelled = False


@dataclasses.dataclass
class _Choice:
    """One choice of a running request, in its row."""

    ticket: Ticket
    index: int
    generator: torch.Generator
    output: list[int] = dataclasses.field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def request(self) -> Request:
        return self.ticket.request


@dataclasses.dataclass
class _Prefill:
    """A request whose prompt is being prefilled into ``rows[0]`` (copied to the rest)."""

    ticket: Ticket
    rows: list[int]
    position: int
    cached: int


class Engine:
    """Runs requests on ``model`` with ``slots`` rows of ``ctx`` tokens each.

    ``load`` makes the model (on the engine thread, so a server answers while it loads);
    ``compile`` picks the decode step as in ``generate`` (``True``: build it if it is not
    stored); ``build_step(slots, ctx)``, when given, builds a missing step in another process
    first, so this one never holds the compiler's memory (~1.2 GB for the default model, kept
    for the process's life); should that fail, the step is built here. ``cache_dtype``: the
    KV cache's (None: the model's; float16 halves its memory, and the attention's reads at
    long contexts, for keys and values rounded to fp16). ``max_queue`` bounds the requests
    waiting for a row.
    """

    def __init__(
        self,
        load: Callable[[], TransformerDecoder],
        *,
        slots: int,
        ctx: int,
        max_queue: int,
        compile: CompileMode = True,
        build_step: Callable[[int, int], None] | None = None,
        cache_dtype: torch.dtype | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
        metrics: ServerMetrics | None = None,
    ) -> None:
        if slots < 1 or ctx < 2 or max_queue < 0 or prefill_chunk < 1:
            raise InvalidInputError(
                f"slots ({slots}) and prefill_chunk ({prefill_chunk}) must be >= 1, ctx ({ctx}) "
                f">= 2 and max_queue ({max_queue}) >= 0"
            )
        self._load = load
        self.slots = slots
        self.ctx = ctx
        self.max_queue = max_queue
        self.compile = compile
        self.build_step = build_step
        self.cache_dtype = cache_dtype
        self.prefill_chunk = prefill_chunk
        self.metrics = metrics
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.compiled = False
        self._inbox: queue.SimpleQueue[tuple[str, Ticket | None, int | None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._accepting = False
        self._queued = 0  # submitted, not yet in rows (guarded by _lock)
        self._running = 0  # in rows or prefilling (engine thread only)
        self._thread = threading.Thread(target=self._run, name="fusionlm-engine", daemon=True)
        self._on_fatal: Callable[[BaseException], None] = lambda error: None

    # -- the front end's side (any thread) --------------------------------------------------

    def start(self, *, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        """Start the engine thread: it loads the model, sets up the caches and the decode
        step, then sets ``ready``. ``on_fatal`` is called (on that thread) if that fails."""
        if on_fatal is not None:
            self._on_fatal = on_fatal
        self._thread.start()

    def submit(self, request: Request, sink: Callable[[Event], None]) -> Ticket:
        """Queue ``request``; ``sink`` gets its events, on the engine thread.

        Raises:
            NotAccepting: loading, draining or stopped.
            QueueFull: ``max_queue`` requests are waiting.
        """
        ticket = Ticket(request, sink)
        with self._lock:
            if not self._accepting:
                raise NotAccepting("the server is not accepting requests now")
            if self._queued >= self.max_queue + self._free_rows_hint():
                raise QueueFull(f"{self._queued} requests are waiting; the queue is full")
            self._queued += 1
        self._inbox.put(("submit", ticket, None))
        return ticket

    def cancel(self, ticket: Ticket, *, choice: int | None = None) -> None:
        """Stop ``ticket`` (or one of its choices) at the next step and free its rows; a
        waiting request is dropped before it runs. Harmless once it has ended."""
        if choice is None:
            ticket.cancelled = True
        self._inbox.put(("cancel", ticket, choice))

    def stop_accepting(self) -> None:
        """Refuse new requests from now on (draining); running ones go on."""
        with self._lock:
            self._accepting = False

    def cancel_all(self) -> None:
        """End every request, waiting or running, with ``Failed`` (the end of a drain)."""
        self._inbox.put(("cancel_all", None, None))

    def stop(self) -> None:
        """Cancel everything and end the engine thread."""
        self.stop_accepting()
        self._inbox.put(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    @property
    def busy(self) -> bool:
        """Whether any request is waiting or running."""
        with self._lock:
            return self._queued > 0 or self._running > 0

    def _free_rows_hint(self) -> int:
        """Rows a burst may take at once without waiting (read under ``_lock``)."""
        return max(0, self.slots - self._running)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._set_up()
        except BaseException as error:  # the server cannot serve: say why and exit
            self.error = error
            self._on_fatal(error)
            return
        with self._lock:
            self._accepting = True
        self.ready.set()
        with torch.inference_mode():
            while self._iterate():
                pass

    def _set_up(self) -> None:
        model = self._load()
        if not isinstance(model, TransformerDecoder):
            raise TypeError(f"fusionlm serve runs text decoders, not {type(model).__name__}")
        if self.ctx > model.max_seq_len:
            raise InvalidInputError(
                f"ctx {self.ctx} exceeds the model's context of {model.max_seq_len}"
            )
        self.model = model
        model.setup_caches(
            self.slots,
            self.cache_dtype or model.dtype,
            decoder_max_seq_len=self.ctx,
            fixed_shape=True,
        )
        self.caches = [m for m in model.modules() if isinstance(m, KVCache)]
        self.cache_rows = CacheRows(model)
        self._build_step_elsewhere(model)
        self.step = DecodeStep(model, compile=self.compile)
        self.compiled = self.step.compiled
        self.rows: list[_Choice | None] = [None] * self.slots
        self.held: list[list[int]] = [[] for _ in range(self.slots)]  # tokens each row caches
        self.last_used = [0] * self.slots
        self.reserved: set[int] = set()  # rows of the request being prefilled
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.prefill: _Prefill | None = None
        self.lengths = torch.zeros(self.slots, dtype=torch.long)
        self.row_mask = torch.zeros(self.slots, 1, 1, self.ctx, dtype=torch.bool)
        self.steps = 0
        with torch.inference_mode():
            self._decode_step()  # the first step runs the compiled step once: warm from here
        self._sync_write_positions()

    def _build_step_elsewhere(self, model: TransformerDecoder) -> None:
        """Have ``build_step`` build the compiled step if it is missing (see ``Engine``)."""
        if self.compile is not True or self.build_step is None:
            return
        step = stored_step_path(
            model, batch_size=self.slots, cache_len=self.ctx, cache_dtype=self.cache_dtype
        )
        if not step.is_file():
            self.build_step(self.slots, self.ctx)

    def _iterate(self) -> bool:
        """One round: read messages, admit, prefill one chunk, decode one step. False once
        told to stop."""
        idle = self.prefill is None and not self.waiting and not any(self.rows)
        if not self._read_inbox(block=idle):
            return False
        try:
            if self.prefill is None:
                self._admit()
            if self.prefill is not None:
                self._prefill_chunk()
            if any(self.rows):
                self._decode()
        except Exception as error:  # a bug, not a client's mistake: fail what ran, go on
            self._fail_all(f"internal error: {type(error).__name__}: {error}")
        self._report()
        return True

    def _read_inbox(self, *, block: bool) -> bool:
        messages = [self._inbox.get()] if block else []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for kind, ticket, choice in messages:
            if kind == "submit":
                self.waiting.append(ticket)
            elif kind == "cancel":
                self._cancel(ticket, choice)
            elif kind == "cancel_all":
                self._fail_all("the server is shutting down")
            elif kind == "stop":
                self._fail_all("the server is shutting down")
                return False
        return True

    def _cancel(self, ticket: Ticket, choice: int | None) -> None:
        if ticket in self.waiting and choice is None:
            self.waiting.remove(ticket)
            self._dequeued()
            self._count_cancelled()
            return
        if self.prefill is not None and self.prefill.ticket is ticket and choice is None:
            self._end_prefill()
            self._count_cancelled()
            return
        rows = [
            r
            for r, c in enumerate(self.rows)
            if c is not None and c.ticket is ticket and choice in (None, c.index)
        ]
        for r in rows:
            self._free(r)
        if rows and choice is None:
            self._count_cancelled()

    def _fail_all(self, message: str) -> None:
        tickets = {c.ticket for c in self.rows if c is not None}
        tickets |= set(self.waiting)
        if self.prefill is not None:
            tickets.add(self.prefill.ticket)
            self._end_prefill()
        for r in range(self.slots):
            if self.rows[r] is not None:
                self._free(r)
        for _ in self.waiting:
            self._dequeued()
        self.waiting.clear()
        for ticket in tickets:
            ticket.sink(Failed(message))

    # -- admission and prefill --------------------------------------------------------------

    def _admit(self) -> None:
        """Start the first waiting request if it has its rows (arrival order: a request
        waits behind one that is waiting for rows)."""
        while self.waiting and self.waiting[0].cancelled:
            self.waiting.popleft()
            self._dequeued()
        if not self.waiting:
            return
        ticket = self.waiting[0]
        request = ticket.request
        free = [r for r in range(self.slots) if self.rows[r] is None and r not in self.reserved]
        if len(free) < request.n:
            return
        self.waiting.popleft()
        self._dequeued()
        self._running += 1
        prompt = request.prompt

        def reuse(r: int) -> int:
            if not request.cache_prompt:
                return 0
            held = self.held[r]
            shared = 0
            for a, b in zip(held, prompt[:-1], strict=False):  # keep a token to prefill
                if a != b:
                    break
                shared += 1
            return shared

        first = max(free, key=lambda r: (reuse(r), -self.last_used[r]))
        cached = reuse(first)
        others = sorted((r for r in free if r != first), key=lambda r: self.last_used[r])
        rows = [first, *others[: request.n - 1]]
        self.reserved.update(rows)
        del self.held[first][cached:]
        self.lengths[first] = cached
        self._sync_write_positions()
        self.prefill = _Prefill(ticket, rows, position=cached, cached=cached)
        if self.metrics is not None:
            self.metrics.queue_time.observe(time.perf_counter() - ticket.submitted)
        self._report()

    def _prefill_chunk(self) -> None:
        job = self.prefill
        request = job.ticket.request
        row = job.rows[0]
        chunk = request.prompt[job.position : job.position + self.prefill_chunk]
        tokens = torch.tensor([chunk], dtype=torch.long)
        positions = torch.arange(job.position, job.position + len(chunk))[None]
        with self.cache_rows.row(row):
            logits = self.model(tokens, input_pos=positions, logits_to_keep=1)[:, -1]
        self.held[row].extend(chunk)
        job.position += len(chunk)
        self.lengths[row] = job.position
        if job.position < len(request.prompt):
            return
        self.prefill = None
        self.reserved.difference_update(job.rows)
        for other in job.rows[1:]:
            for cache in self.caches:
                cache.copy_row(row, other)
            self.held[other] = list(self.held[row])
            self.lengths[other] = self.lengths[row]
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(request.prompt))
            self.metrics.cached_prompt_tokens.inc(job.cached)
        job.ticket.sink(Started(prompt_tokens=len(request.prompt), cached_tokens=job.cached))
        now = time.perf_counter()
        for index, r in enumerate(job.rows):
            choice = _Choice(job.ticket, index, _generator(request.seed, index))
            self.rows[r] = choice
            self.last_used[r] = self.steps
            self.row_mask[r] = True
            if self.metrics is not None:
                self.metrics.time_to_first_token.observe(now - job.ticket.submitted)
            self._take(r, logits)

    def _end_prefill(self) -> None:
        """Drop the request being prefilled; its row keeps the chunks already written."""
        self.reserved.difference_update(self.prefill.rows)
        self.prefill = None
        self._running -= 1

    # -- decoding ---------------------------------------------------------------------------

    def _decode(self) -> None:
        tokens = torch.zeros(self.slots, 1, dtype=torch.long)
        active = [r for r, c in enumerate(self.rows) if c is not None]
        for r in active:
            tokens[r, 0] = self.rows[r].output[-1]
        logits = self._decode_step(tokens)
        for r in active:
            self.held[r].append(int(tokens[r, 0]))
            self.lengths[r] += 1
        self._sync_write_positions()
        for r in active:
            self._take(r, logits[r : r + 1])

    def _decode_step(self, tokens: Tensor | None = None) -> Tensor:
        """All rows one token on, ``tokens [slots, 1]`` at the rows' lengths; idle rows
        compute under an empty mask (the caller sets their write positions back)."""
        if tokens is None:
            tokens = torch.zeros(self.slots, 1, dtype=torch.long)
        logits = self.step(
            tokens, mask=self.row_mask, encoder_mask=None, input_pos=self.lengths[:, None].clone()
        )
        self.steps += 1
        return logits

    def _sync_write_positions(self) -> None:
        """Every cache's per-row write position := the tokens the row holds."""
        for cache in self.caches:
            cache.set_lengths(self.lengths)

    def _take(self, row: int, logits: Tensor) -> None:
        """Sample row ``row``'s next token from ``logits [1, v]``, send it, end the choice
        if it is done."""
        choice = self.rows[row]
        request = choice.request
        params = request.sampling
        history = output = None
        if params.repetition_penalty != 1.0:
            history = torch.tensor([request.prompt + choice.output], dtype=torch.long)
        if params.penalizes_output:
            output = torch.tensor([choice.output], dtype=torch.long)
        token = int(
            sample(logits, params, history=history, output=output, generator=choice.generator)[0]
        )
        choice.output.append(token)
        now = time.perf_counter()
        if self.metrics is not None:
            self.metrics.generation_tokens.inc()
            if len(choice.output) > 1:
                self.metrics.inter_token_latency.observe(now - choice.last_token_at)
        choice.last_token_at = now
        if token in request.stop_ids:
            self._finish(row, "stop")
            return
        event = Token(choice.index, token)
        if request.logprobs is not None:
            event = _with_logprobs(event, logits[0], top=request.logprobs)
        choice.ticket.sink(event)
        if len(choice.output) >= request.max_tokens:
            self._finish(row, "length")

    def _finish(self, row: int, reason: Literal["stop", "length"]) -> None:
        choice = self.rows[row]
        choice.ticket.sink(Finished(choice.index, reason, len(choice.output)))
        self._free(row)

    def _free(self, row: int) -> None:
        """Give row ``row`` back; it keeps what it caches for a later prompt to reuse."""
        ticket = self.rows[row].ticket
        self.rows[row] = None
        self.row_mask[row] = False
        self.last_used[row] = self.steps
        if not any(c is not None and c.ticket is ticket for c in self.rows):
            self._running -= 1
            if self.metrics is not None:
                self.metrics.e2e_latency.observe(time.perf_counter() - ticket.submitted)
        self._report()

    # -- bookkeeping ------------------------------------------------------------------------

    def _dequeued(self) -> None:
        with self._lock:
            self._queued -= 1

    def _count_cancelled(self) -> None:
        if self.metrics is not None:
            self.metrics.cancelled.inc()

    def _report(self) -> None:
        """Set the gauges (when a request starts or ends, and after every round)."""
        if self.metrics is None:
            return
        with self._lock:
            self.metrics.waiting.set(self._queued)
        self.metrics.running.set(self._running)
        self.metrics.slots_in_use.set(sum(c is not None for c in self.rows) + len(self.reserved))


def _generator(seed: int | None, index: int) -> torch.Generator:
    """Choice ``index``'s random source: ``seed + index``, or fresh entropy without a seed."""
    value = secrets.randbits(63) if seed is None else seed + index
    return torch.Generator().manual_seed(value)


def _with_logprobs(event: Token, logits: Tensor, *, top: int) -> Token:
    """``event`` with the token's log-probability under ``logits [v]`` (the model's, before
    any penalty or temperature) and the ``top`` likeliest alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = ()
    if top > 0:
        values, ids = logprobs.topk(top)
        alternatives = tuple(zip(ids.tolist(), values.tolist(), strict=True))
    return dataclasses.replace(event, logprob=float(logprobs[event.id]), top_logprobs=alternatives)


__all__ = [
    "Engine",
    "Event",
    "Failed",
    "Finished",
    "NotAccepting",
    "QueueFull",
    "Request",
    "Started",
    "Ticket",
    "Token",
]
