"""The fine-tuning recipe: full or LoRA, one process or many (FSDP2), resumable.

Everything that decides a step's numbers is a function of the config and the step: the rows
(``StepSampler``), the learning rate (the scheduler), and the RNG (restored from checkpoints).
That is what lets a resumed run repeat an uninterrupted one exactly, and a 2-process run match
a 1-process run with the same global batch.

Loss normalisation: a step's loss is the mean over every labelled token the step sees on all
processes. Each process back-propagates ``its summed loss * world_size / global label count``;
FSDP averages gradients over processes, which gives the gradient of that global mean.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fusionlm.checkpoint.peft import save_peft_adapter
from fusionlm.errors import InvalidInputError
from fusionlm.loading import load_model, load_tokenizer, save_hf
from fusionlm.models.llama import LlamaConfig
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.lora import apply_lora, merge_lora
from fusionlm.modules.loss import LinearCrossEntropyLoss
from fusionlm.training.compiled import compile_layers, is_compile_failure, uncompile_layers
from fusionlm.training.config import FinetuneConfig
from fusionlm.training.data import (
    IGNORE_INDEX,
    Batch,
    PackedRows,
    StepSampler,
    load_documents,
    pack_documents,
    select_rows,
    shard_for_eval,
)
from fusionlm.training.distributed import (
    DistributedEnv,
    all_reduce_sum,
    barrier,
    init_distributed,
    shard_model,
    shutdown,
)
from fusionlm.training.plot import write_loss_png
from fusionlm.training.precision import hold_frozen_in_bf16, native_bf16
from fusionlm.training.state import (
    CHECKPOINTS,
    check_fingerprint,
    latest_checkpoint,
    load_checkpoint,
    read_state,
    save_checkpoint,
)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
_ARCHITECTURE_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "tie_word_embeddings",
)


@dataclasses.dataclass
class FinetuneResult:
    """What a run did.

    Attributes:
        output_dir: where everything was written.
        steps: optimizer steps completed in total (including those before a resume).
        losses: the training loss of each step this call ran, in order; the first is step
            ``first_step`` (1-based).
        first_step: the step number of ``losses[0]``.
        val_loss, val_perplexity: the final validation figures (None without ``val_data``).
        model_dir: the transformers directory written (full, or LoRA merged), if any.
        adapter_dir: the PEFT adapter directory (LoRA only).
        metrics_path, plot_path: the metrics JSONL and the loss-curve PNG (None without
            matplotlib, the ``plot`` extra).
        tokens_per_s: training tokens per second over this call's steps (the median step,
            leaving out the first, which compiles, when there are others).
        peak_memory_mib: the process's peak memory while training and evaluating (resident set
            on CPU, allocated device memory on CUDA).
    """

    output_dir: Path
    steps: int
    losses: list[float]
    first_step: int
    val_loss: float | None
    val_perplexity: float | None
    model_dir: Path | None
    adapter_dir: Path | None
    metrics_path: Path
    plot_path: Path | None
    tokens_per_s: float
    peak_memory_mib: float


def finetune(
    config: FinetuneConfig,
    *,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune ``config.model`` on ``config.train_data``; see ``FinetuneConfig``.

    Under ``torchrun`` every process calls this; the model is sharded with FSDP2 and only
    process 0 writes files. Every user error is raised before the first step.

    Args:
        config: the run.
        on_step: called on every process after each step (and its evaluation and checkpoint)
            with the 1-based step number and its metrics record; an exception stops the run.

    Raises:
        FileNotFoundError: a missing data file, model, or (with ``resume``) checkpoint.
        ValueError: a malformed data line (``path:line`` in the message), ``seq_len`` above the
            model's context, a checkpoint of another model or dataset, an ``output_dir`` that
            already holds checkpoints without ``resume``, a diverging loss.
    """
    env = init_distributed(config.device)
    try:
        return _Run(config, env, on_step).run()
    finally:
        shutdown(env)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """The learning-rate multiplier of ``step`` (0-based): linear warmup, then cosine."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return min_ratio + (1.0 - min_ratio) * cosine


class _Run:
    def __init__(
        self,
        config: FinetuneConfig,
        env: DistributedEnv,
        on_step: Callable[[int, dict[str, Any]], None] | None,
    ) -> None:
        self.config = config
        self.env = env
        self.on_step = on_step
        self.out = Path(config.output_dir)
        self.bf16 = native_bf16(env.device) if config.bf16 is None else config.bf16

    def log(self, message: str) -> None:
        if self.env.is_main:
            tqdm.write(f"finetune: {message}", file=sys.stderr)

    # -- setup: every user error is raised here, before a step runs ---------------------------

    def prepare(self) -> None:
        """Check the run's input and set it up: data, model, optimizer, and the state of the
        checkpoint it resumes from."""
        self._check_paths()
        documents, truncated = self._prepare_data()
        model = self._prepare_model()
        trained = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
        self.sampler = StepSampler(
            len(self.train_rows),
            batch_size=self.config.batch_size,
            accumulation=self.config.gradient_accumulation_steps,
            world_size=self.env.world_size,
            seed=self.config.seed,
            shuffle=self.config.shuffle,
        )
        self.total_steps = self.config.max_steps or self.sampler.steps_for_epochs(
            self.config.epochs
        )
        self.fingerprint = self._fingerprint(model, trained)
        n_total = sum(p.numel() for p in model.parameters())
        model.to(self.env.device)
        self.model = shard_model(model, self.env)
        self._prepare_optimizer()
        self.start = self._resume() if self.checkpoint else 0  # a checkpoint: resume=true
        self._log_plan(
            documents=documents,
            truncated=truncated,
            n_trained=sum(math.prod(shape) for shape in trained.values()),
            n_total=n_total,
        )

    def _check_paths(self) -> None:
        """The data files exist; the output directory holds no run this one would overwrite
        (a finished one, or one with checkpoints, unless resuming it)."""
        config = self.config
        for key in ("train_data", "val_data"):
            path = getattr(config, key)
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{key}: data file {path} does not exist")
        self.checkpoint = latest_checkpoint(self.out)
        # A finished run's outputs, or the checkpoint a stopped run can go on from.
        kept = [self.checkpoint] if self.checkpoint else []
        kept += [self.out / name for name in (MODEL_DIR, ADAPTER_DIR) if (self.out / name).exists()]
        stopped_early = not kept and (self.out / METRICS_FILE).exists()
        if kept and not (config.resume and self.checkpoint):
            raise InvalidInputError(
                f"{self.out} already holds a run ({kept[0].name}); pass resume=true to "
                "continue from its checkpoints, or choose another output_dir"
            )
        if stopped_early:  # nothing to lose: a run that stopped before its first checkpoint
            self.log(
                f"{self.out} holds a run that stopped before its first checkpoint; starting "
                "again from step 0 in its place"
            )
        elif config.resume and self.checkpoint is None:
            raise FileNotFoundError(
                f"resume=true, but {self.out / CHECKPOINTS} holds no checkpoint to resume from"
            )

    def _prepare_data(self) -> tuple[list, int]:
        """Tokenize and pack the training (and validation) data; returns the training
        documents and how many were truncated."""
        config = self.config
        self.tokenizer = load_tokenizer(config.tokenizer or config.model)
        docs, truncated = load_documents(
            config.train_data, self.tokenizer, seq_len=config.seq_len, truncate=config.truncate
        )
        pad_id = next(
            (i for i in (self.tokenizer.pad_id, self.tokenizer.eos_id) if i is not None), 0
        )
        pack = partial(
            pack_documents, seq_len=config.seq_len, pad_id=pad_id, packing=config.packing
        )
        self.train_rows = pack(docs)
        self.val_rows: PackedRows | None = None
        if config.val_data is not None:
            val_docs, _ = load_documents(
                config.val_data, self.tokenizer, seq_len=config.seq_len, truncate=config.truncate
            )
            self.val_rows = pack(val_docs)
        return docs, truncated

    def _prepare_model(self) -> TransformerDecoder:
        """The model to train, checked against the data, with LoRA applied (or every weight
        trainable), gradient checkpointing and the fused output projection and loss set up."""
        config = self.config
        torch.manual_seed(config.seed)
        model = load_model(config.model, dtype=torch.float32, attn_backend=config.attn_backend)
        if not isinstance(model, TransformerDecoder) or not isinstance(model.config, LlamaConfig):
            raise InvalidInputError(
                f"{config.model}: fine-tuning supports Llama-family decoders only"
            )
        if config.seq_len > model.max_seq_len:
            raise InvalidInputError(
                f"seq_len={config.seq_len} exceeds the model's context of {model.max_seq_len} tokens"
            )
        if not config.lora or config.save_merged:  # the run ends writing a transformers directory
            try:
                model.config.to_hf()
            except InvalidInputError as e:
                raise InvalidInputError(
                    f"{config.model}: the fine-tuned model could not be written at the end: {e}"
                    + ("" if config.lora else "; train LoRA with save_merged=false instead")
                ) from None
        for rows in (self.train_rows, self.val_rows):
            if rows is not None and int(rows.tokens.max()) >= model.vocab_size:
                raise InvalidInputError(
                    f"the tokenizer produced id {int(rows.tokens.max())}, outside the model's "
                    f"vocabulary of {model.vocab_size}; is the tokenizer the model's?"
                )
        self.base_hash = _weights_hash(model)
        torch.manual_seed(config.seed)  # LoRA's initialisation must not depend on loading
        if config.lora:
            _apply_lora(model, config)
        else:
            model.requires_grad_(True)
        # Every process initialised the same adapters; from here on (dropout) their draws differ.
        torch.manual_seed(config.seed + self.env.rank)
        model.set_gradient_checkpointing(config.gradient_checkpointing)
        self.frozen_in_bf16 = self.bf16 and hold_frozen_in_bf16(model) > 0
        model.skip_output_layer = True
        self.loss_fn = LinearCrossEntropyLoss(chunk_tokens=config.loss_chunk_tokens)
        self.loss_fn.set_model_output(model)
        self.compiled = config.compile
        if self.compiled:
            compile_layers(model)
        return model

    def _fingerprint(self, model: TransformerDecoder, trained: dict[str, list[int]]) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        config = self.config
        return {
            "architecture": {k: getattr(model.config, k) for k in _ARCHITECTURE_FIELDS},
            "base_weights": self.base_hash,
            "trainable": trained,
            "lora": [config.lora_rank, config.lora_alpha, sorted(config.lora_targets)]
            if config.lora
            else None,
            "data": self.train_rows.fingerprint(),
            "data_order": [self.sampler.global_batch, config.seed, config.shuffle],
        }

    def _prepare_optimizer(self) -> None:
        """AdamW over the trained parameters, and the warmup-then-cosine schedule."""
        config = self.config
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_eps,
            weight_decay=config.weight_decay,
            fused=True,
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            partial(
                lr_factor,
                warmup_steps=config.warmup_steps,
                total_steps=self.total_steps,
                min_ratio=config.min_lr_ratio,
            ),
        )

    def _resume(self) -> int:
        """Load the latest checkpoint into model, optimizer and schedule; returns its step."""
        state = read_state(self.checkpoint)
        check_fingerprint(state["fingerprint"], self.fingerprint, path=self.checkpoint)
        if state["step"] >= self.total_steps:
            raise InvalidInputError(
                f"{self.checkpoint} is at step {state['step']} of a {self.total_steps}-step "
                "run; raise max_steps to train further"
            )
        load_checkpoint(
            self.checkpoint,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            env=self.env,
        )
        self._continue_schedule(state["step"])
        return state["step"]

    def _log_plan(self, *, documents: list, truncated: int, n_trained: int, n_total: int) -> None:
        config = self.config
        real = int((self.train_rows.document_ids >= 0).sum())
        fill = real / self.train_rows.tokens.numel()
        method = (
            f"LoRA r={config.lora_rank} on {','.join(config.lora_targets)}"
            if config.lora
            else "full"
        )
        self.log(
            f"{len(documents)} examples -> {len(self.train_rows)} rows of {config.seq_len} "
            f"tokens ({fill:.0%} filled{f', {truncated} truncated' if truncated else ''}); "
            f"{self.total_steps} steps of {self.sampler.global_batch} rows; {method}: "
            f"{n_trained / 1e6:.3g} M of {n_total / 1e6:.1f} M parameters trained; "
            f"{self.env.world_size} process(es) on {self.env.device.type}"
            + (f"; resuming after step {self.start}" if self.start else "")
        )

    def _continue_schedule(self, step: int) -> None:
        """Set the learning rates of ``step`` on this run's schedule. A checkpoint holds the
        rates its run had reached: a run extended past that run's end (a larger
        ``max_steps``) must go on along its own, longer schedule."""
        factor = self.scheduler.lr_lambdas[0](step)
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs, strict=True):
            group["lr"] = base * factor
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    # -- the loop ----------------------------------------------------------------------------

    def forward_loss_sum(self, batch: Batch) -> Tensor:
        config = self.config
        mask = batch.attention_mask(config.attn_backend) if config.packing else None
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.model(batch.tokens, mask=mask, input_pos=batch.positions)
            return self.loss_fn.loss_sum(hidden, batch.labels)

    def train_step(self, step: int) -> dict[str, Any]:
        started = time.perf_counter()
        env = self.env
        self.model.train()
        batches = [
            self.train_rows.select(index) for index in self.sampler.micro_batches(step, env.rank)
        ]
        counts = torch.tensor(
            [sum(b.num_labels() for b in batches), sum(b.num_tokens() for b in batches)],
            dtype=torch.float64,
            device=env.device,
        )
        n_labels, n_tokens = all_reduce_sum(counts, env).tolist()
        scale = env.world_size / max(1.0, n_labels)
        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        for i, batch in enumerate(batches):
            if env.world_size > 1:
                # Reduce-scatter gradients once per step, after the last micro-batch.
                self.model.set_requires_gradient_sync(i == len(batches) - 1)
            part = self.forward_loss_sum(batch.to(env.device))
            (part * scale).backward()
            loss_sum += part.detach()
        max_norm = self.config.max_grad_norm or float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss = float(all_reduce_sum(loss_sum, env)) / max(1.0, n_labels)
        if not math.isfinite(loss):
            raise InvalidInputError(
                f"training diverged: the loss is {loss} at step {step + 1}; lower learning_rate"
            )
        elapsed = time.perf_counter() - started
        return {
            "step": step + 1,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens": int(n_tokens),
            "trained_tokens": int(n_labels),
            "tokens_per_s": n_tokens / elapsed,
            "step_s": elapsed,
        }

    def first_step(self, step: int) -> dict[str, Any]:
        """The run's first step, which compiles the layers (``compile=true``). Where compiling
        fails, the step runs again eagerly from the same state and RNG, and so do the rest."""
        if not self.compiled:
            return self.train_step(step)
        device = self.env.device
        rng = torch.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        try:
            record = self.train_step(step)
        except Exception as error:
            if not is_compile_failure(error):
                raise
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            self.log(f"compile=true: could not compile the layers ({reason}); running eagerly")
            uncompile_layers(self.model)
            self.compiled = False
            self.optimizer.zero_grad(set_to_none=True)
            torch.set_rng_state(rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
            return self.train_step(step)
        self.log(f"compiled the decoder layers: the first step took {record['step_s']:.1f} s")
        return record

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """Validation loss (mean over labelled tokens) and perplexity."""
        assert self.val_rows is not None
        self.model.eval()
        env = self.env
        totals = torch.zeros(2, dtype=torch.float64, device=env.device)
        for index in shard_for_eval(
            len(self.val_rows),
            batch_size=self.config.batch_size,
            rank=env.rank,
            world_size=env.world_size,
        ):
            batch = select_rows(self.val_rows, index).to(env.device)
            totals[0] += self.forward_loss_sum(batch).double()
            totals[1] += int((batch.labels != IGNORE_INDEX).sum())
        loss_sum, count = all_reduce_sum(totals, env).tolist()
        loss = loss_sum / max(1.0, count)
        return loss, math.exp(min(loss, 700.0))

    def run(self) -> FinetuneResult:
        self.prepare()
        config, env = self.config, self.env
        metrics_path = self.out / METRICS_FILE
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            _truncate_metrics(metrics_path, after_step=self.start)
        barrier(env)
        losses: list[float] = []
        speeds: list[float] = []
        val: tuple[float, float] | None = None
        evaluated_at = -1
        bar = tqdm(
            total=self.total_steps,
            initial=self.start,
            disable=not (env.is_main and config.progress),
            unit="step",
            dynamic_ncols=True,
            file=sys.stderr,
        )
        try:
            for step in range(self.start, self.total_steps):
                record = self.first_step(step) if step == self.start else self.train_step(step)
                losses.append(record["loss"])
                speeds.append(record["tokens_per_s"])
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
                done = step + 1
                last = done == self.total_steps
                if done % config.log_every == 0 or last:
                    self.write_metrics(metrics_path, record)
                if self.val_rows is not None and (
                    last or (config.eval_every and done % config.eval_every == 0)
                ):
                    val = self.evaluate()
                    evaluated_at = done
                    val_record = {"step": done, "val_loss": val[0], "val_perplexity": val[1]}
                    self.write_metrics(metrics_path, val_record)
                    record = {**record, **val_record}
                    self.log(f"step {done}: val loss {val[0]:.4f}, perplexity {val[1]:.2f}")
                if config.save_every and (done % config.save_every == 0 or last):
                    save_checkpoint(
                        self.out,
                        step=done,
                        model=self.model,
                        optimizer=self.optimizer,
                        scheduler=self.scheduler,
                        fingerprint=self.fingerprint,
                        env=env,
                        keep=config.keep_checkpoints,
                    )
                if self.on_step is not None:
                    self.on_step(done, record)
        finally:
            bar.close()
        if self.val_rows is not None and evaluated_at != self.total_steps:
            val = self.evaluate()
            self.write_metrics(
                metrics_path,
                {"step": self.total_steps, "val_loss": val[0], "val_perplexity": val[1]},
            )
        plot_path: Path | None = self.out / PLOT_FILE
        if env.is_main:
            train, val_points = _read_curves(metrics_path)
            try:
                write_loss_png(plot_path, train, val_points)
            except ImportError as e:  # the run's results stand without their picture
                self.log(f"no loss curve: {e}")
                plot_path = None
        peak = peak_memory_mib(env.device)  # training's, before the export reloads the base
        model_dir, adapter_dir = self.export()
        tokens_per_s = statistics.median(speeds[1:] or speeds) if speeds else 0.0
        summary = f"done: {self.total_steps} steps"
        if losses:
            summary += f", last loss {losses[-1]:.4f}"
        if val is not None:
            summary += f", val loss {val[0]:.4f} (perplexity {val[1]:.2f})"
        summary += f"; {tokens_per_s:.0f} tokens/s, peak memory {peak:.0f} MiB"
        self.log(f"{summary}; wrote {self.out}")
        return FinetuneResult(
            output_dir=self.out,
            steps=self.total_steps,
            losses=losses,
            first_step=self.start + 1,
            val_loss=None if val is None else val[0],
            val_perplexity=None if val is None else val[1],
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            metrics_path=metrics_path,
            plot_path=plot_path,
            tokens_per_s=tokens_per_s,
            peak_memory_mib=peak,
        )

    def write_metrics(self, path: Path, record: dict[str, Any]) -> None:
        if self.env.is_main:
            with path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def export(self) -> tuple[Path | None, Path | None]:
        """Write the final model (and adapter). A sharded model's trained weights are gathered
        to process 0, and frozen weights held in bf16 are read again in full precision: both
        put the trained weights into a fresh copy of the base model."""
        config, env = self.config, self.env
        model = self.model
        if env.world_size > 1 or self.frozen_in_bf16:
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            trained = get_model_state_dict(
                model,
                options=StateDictOptions(
                    full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
                ),
            )
            if env.is_main:
                model = load_model(config.model, dtype=torch.float32)
                if config.lora:
                    _apply_lora(model, config)
                missing, unexpected = model.load_state_dict(trained, strict=False)
                frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
                if unexpected or set(missing) - frozen:
                    raise RuntimeError(
                        f"trained weights do not fit the base model: missing "
                        f"{sorted(set(missing) - frozen)}, unexpected {sorted(unexpected)}"
                    )
        model_dir = adapter_dir = None
        if env.is_main:
            model = model.to("cpu").eval()
            model.skip_output_layer = False
            model.set_gradient_checkpointing(False)
            if config.lora:
                adapter_dir = save_peft_adapter(
                    model, self.out / ADAPTER_DIR, base_model_name_or_path=config.model
                )
                if config.save_merged:
                    merge_lora(model)
                    model_dir = save_hf(model, self.out / MODEL_DIR, tokenizer=self.tokenizer)
            else:
                model_dir = save_hf(model, self.out / MODEL_DIR, tokenizer=self.tokenizer)
        barrier(env)
        if config.lora:
            adapter_dir = self.out / ADAPTER_DIR
            model_dir = self.out / MODEL_DIR if config.save_merged else None
        else:
            model_dir = self.out / MODEL_DIR
        return model_dir, adapter_dir


def _apply_lora(model: TransformerDecoder, config: FinetuneConfig) -> None:
    """The run's LoRA adapters on ``model``."""
    apply_lora(
        model,
        targets=config.lora_targets,
        rank=config.lora_rank,
        alpha=config.lora_alpha,
        dropout=config.lora_dropout,
    )


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: device memory allocated on CUDA, else the peak
    resident set (``ru_maxrss``: KiB on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def _weights_hash(model: nn.Module) -> str:
    """A short hash of a few pretrained tensors: tells two models of one architecture apart."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if name in ("tok_embeddings.weight", "norm.weight", "layers.0.attn.q_proj.weight"):
            digest.update(tensor.detach().float().flatten()[:4096].numpy().tobytes())
    return digest.hexdigest()[:16]


def _truncate_metrics(path: Path, *, after_step: int) -> None:
    """Keep the records of steps up to ``after_step`` (those a resumed run will not redo)."""
    if after_step == 0 or not path.is_file():
        path.write_text("")
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= after_step:
                kept.append(line)
        except json.JSONDecodeError:
            continue
    path.write_text("".join(line + "\n" for line in kept))


def _read_curves(path: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train, val = [], []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            train.append((record["step"], record["loss"]))
        if "val_loss" in record:
            val.append((record["step"], record["val_loss"]))
    return train, val


__all__ = ["FinetuneResult", "finetune", "lr_factor"]
