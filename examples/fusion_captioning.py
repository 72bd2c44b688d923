"""Teach a frozen language model to see: caption synthetic images through deep fusion.

Deep fusion joins a pretrained vision encoder to a pretrained decoder; this script makes
both halves and then fuses them, in two stages:

1. A stand-in for a pretrained encoder: a small convolutional encoder (ShapeEncoder) learns
   to classify the shape, colour and position of synthetic images through a linear probe,
   which is then thrown away (about a minute on 2 cores).
2. Fusion: SmolLM2-135M-Instruct (fusionlm's default model) stays frozen, gated
   cross-attention layers are fused into every 6th decoder layer, and ``DeepFusionModel``
   with its default flags trains only the fusion parameters (the cross-attention layers and
   the encoder's projection head) to caption the images through the model's chat template.

The images are drawn on the fly: a red, green, blue or yellow circle, square or triangle on
the left, right, top or bottom of a 48x48 picture, captioned "a red circle on the left".
After training, the model captions held-out images with ``fusionlm.generate(...,
images=...)``; the script prints the accuracy of each attribute and saves a grid of images
with their captions.

    .venv/bin/python examples/fusion_captioning.py --out captions.png   # 430-470 s on 2 cores

(``make install`` includes Pillow, for the PNG grid; elsewhere ``pip install
'fusionlm[vision]'``.)

Seeded, so a run repeats exactly on the same machine (and number of threads).
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import fusionlm
from fusionlm.images import pillow, to_pil
from fusionlm.models.fusion import fuse_decoder
from fusionlm.modules.decoder import TransformerDecoder
from fusionlm.modules.fusion import DeepFusionModel, register_fusion_module
from fusionlm.modules.layers import TanhGate

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.85, 0.12, 0.12),
    "green": (0.15, 0.7, 0.2),
    "blue": (0.15, 0.3, 0.9),
    "yellow": (0.95, 0.85, 0.15),
}
POSITIONS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
}
# Every attribute a caption names, with its possible values.
ATTRIBUTES = {"shape": list(SHAPES), "colour": list(COLOURS), "position": list(POSITIONS)}
BACKGROUND = 0.5
# One encoder token per 4x4 patch: a shape (16 to 21 pixels across) spans four or five.
PATCH_SIZE = 4
SYSTEM = "You caption images."
QUESTION = "Describe the image."


# -- data ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    image: torch.Tensor  # [3, size, size], values in [0, 1]
    shape: str
    colour: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} {POSITIONS[self.position]}"


def draw(rng: np.random.Generator, *, size: int) -> Example:
    """One random image: a coloured shape of random size and place on a grey background."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    position = list(POSITIONS)[rng.integers(len(POSITIONS))]
    # Centres of different positions are apart: "left" is near the left edge and mid-height.
    along, across = rng.uniform(0.24, 0.3), rng.uniform(0.38, 0.62)
    cx, cy = {
        "left": (along, across),
        "right": (1 - along, across),
        "top": (across, along),
        "bottom": (across, 1 - along),
    }[position]
    r = rng.uniform(0.17, 0.22)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    x, y = (x + 0.5) / size - cx, (y + 0.5) / size - cy
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":
        inside = np.maximum(np.abs(x), np.abs(y)) <= 0.85 * r
    else:  # an upright triangle
        inside = (y <= 0.75 * r) & (np.abs(x) <= 0.6 * (y + r))
    image = np.full((size, size, 3), BACKGROUND, dtype=np.float32)
    image[inside] = np.asarray(COLOURS[colour]) + rng.uniform(-0.08, 0.08, 3)
    tensor = torch.from_numpy(image.clip(0.0, 1.0)).permute(2, 0, 1).contiguous()
    return Example(tensor, shape, colour, position)


MESSAGES = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]


def prompt_ids(tokenizer: fusionlm.Tokenizer) -> list[int]:
    """The chat-template prompt every image is captioned from."""
    return tokenizer.encode(tokenizer.apply_chat_template(MESSAGES), add_special_tokens=False)


def answer_ids(tokenizer: fusionlm.Tokenizer, caption: str) -> list[int]:
    """The assistant's turn as the chat template writes it, up to its end-of-turn token."""
    turn = [*MESSAGES, {"role": "assistant", "content": caption}]
    text = tokenizer.apply_chat_template(turn, add_generation_prompt=False)
    ids = tokenizer.encode(text, add_special_tokens=False)[len(prompt_ids(tokenizer)) :]
    end = next(i for i, token in enumerate(ids) if token in tokenizer.stop_ids)
    return ids[: end + 1]


def training_batch(
    examples: list[Example], tokenizer: fusionlm.Tokenizer, prompt: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tokens ``[b, s]`` (prompt + caption + end of turn, right-padded), the targets of the
    last ``t`` positions ``[b, t]`` (-100 where nothing is predicted), images ``[b, 1, 3, h, w]``."""
    answers = [answer_ids(tokenizer, e.caption) for e in examples]
    end = answers[0][-1]
    longest = max(len(a) for a in answers)
    tokens = torch.full((len(examples), len(prompt) + longest), end, dtype=torch.long)
    targets = torch.full((len(examples), longest), -100, dtype=torch.long)
    for i, answer in enumerate(answers):
        tokens[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        targets[i, : len(answer)] = torch.tensor(answer)
    images = torch.stack([e.image for e in examples])[:, None]
    return tokens, targets, images


# -- model -----------------------------------------------------------------------------------


class ShapeEncoder(nn.Module):
    """A small convolutional vision encoder: what differs from a blank picture, and where.

    Five 3x3 convolutions (two of stride 2) give one feature vector per 4x4 patch; a
    convolution learns outlines from a few thousand images, where a ViT of the same cost
    needs many times more. The tokens are ``f(x) - f(blank)``: a fusion layer reading them
    reads the image, not what every image shares. Cross-attention pools its keys as a set,
    so every token also gets a learned position vector scaled by how much its patch differs
    from the blank picture (the mean over its pixels of the largest absolute channel
    difference): nothing on the background and, pooled over a shape, a vector for where it
    is. A projection head (a fusion module) maps the tokens to the decoder's width.

    Args:
        image_size: height and width of the images; a multiple of ``PATCH_SIZE``.
        width: channels of the last convolution.
        out_dim: the decoder's width.
        background: the blank picture's value in every channel.
        position_scale: the standard deviation of the position vectors at initialisation.
    """

    def __init__(
        self,
        *,
        image_size: int,
        width: int,
        out_dim: int,
        background: float,
        position_scale: float = 0.2,
    ) -> None:
        super().__init__()
        if image_size % PATCH_SIZE:
            raise ValueError(f"image_size {image_size} is not a multiple of {PATCH_SIZE}")
        self.image_size = image_size
        self.background = background
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 4, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 4, width // 2, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width // 2, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(width // 2, width, 3, stride=2, padding=1),
            nn.GELU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GELU(),
        )
        self.tokens_per_image = (image_size // PATCH_SIZE) ** 2
        self.position = nn.Parameter(torch.randn(self.tokens_per_image, width) * position_scale)
        self.projection = nn.Linear(width, out_dim)
        register_fusion_module(self.projection)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, n, 3, h, w] -> [b, n * tokens_per_image, out_dim]``.

        Raises:
            ValueError: images not ``[b, n, 3, image_size, image_size]``.
        """
        expected = (3, self.image_size, self.image_size)
        if images.dim() != 5 or tuple(images.shape[2:]) != expected:
            raise ValueError(
                f"expected images [b, n, {', '.join(map(str, expected))}], "
                f"got shape {tuple(images.shape)}"
            )
        b, n = images.shape[:2]
        tokens = self.patch_tokens(images.flatten(0, 1))
        return self.projection(tokens).reshape(b, n * self.tokens_per_image, -1)

    def patch_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """The tokens before the projection head: ``[m, 3, h, w] -> [m, patches, width]``."""
        blank = torch.full_like(images[:1], self.background)
        tokens = (self.features(images) - self.features(blank)).flatten(2).transpose(1, 2)
        change = (images - self.background).abs().amax(dim=1)  # [m, h, w]
        weight = F.avg_pool2d(change[:, None], PATCH_SIZE).flatten(1)  # [m, patches]
        return tokens + weight[..., None] * self.position


def build_model(
    decoder: TransformerDecoder,
    encoder: ShapeEncoder,
    *,
    every_n_layers: int,
    train_encoder: bool,
) -> DeepFusionModel:
    """The pretrained decoder with cross-attention every ``every_n_layers`` layers, reading
    ``encoder``; DeepFusionModel sets what trains (the fusion layers and the encoder's
    projection head, and the rest of the encoder if ``train_encoder``)."""
    width = decoder.tok_embeddings.embedding_dim
    fused = fuse_decoder(decoder, every_n_layers=every_n_layers, intermediate_size=2 * width)
    return DeepFusionModel(
        fused,
        encoder,
        decoder_trainable=False,
        encoder_trainable=train_encoder,
        fusion_trainable=True,
    )


# -- training and evaluation -----------------------------------------------------------------


def optimise(
    loss_of_a_batch: Callable[[], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int,
    label: str,
    log_every: int,
    max_grad_norm: float | None = None,
) -> list[float]:
    """``steps`` steps of ``optimizer`` on fresh batches, the learning rate warming up
    linearly over the first tenth and then decaying (cosine) to a tenth; prints the mean
    loss every ``log_every`` steps and returns every step's loss."""
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: (
            min(1.0, (step + 1) / warmup)
            * (0.1 + 0.45 * (1 + math.cos(math.pi * min(step, steps) / steps)))
        ),
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    losses = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_of_a_batch()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps:
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(
                f"{label} {step:4d}/{steps}  loss {recent:.3f}  "
                f"{time.perf_counter() - started:.0f} s",
                flush=True,
            )
    return losses


def pretrain_encoder(
    encoder: ShapeEncoder,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    image_size: int,
    seed: int,
    log_every: int = 50,
) -> list[float]:
    """Stage 1, standing in for a pretrained vision encoder: train ``encoder`` with a linear
    probe on its patch tokens (their largest and mean value in every feature) to classify
    each image's shape, colour and position, one cross-entropy per attribute. The probe is
    thrown away, and the projection head is left for stage 2. Returns the losses."""
    rng = np.random.default_rng(seed)
    probe = nn.Linear(2 * encoder.position.shape[1], sum(map(len, ATTRIBUTES.values())))
    params = [*encoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def loss_of_a_batch() -> torch.Tensor:
        examples = [draw(rng, size=image_size) for _ in range(batch_size)]
        tokens = encoder.patch_tokens(torch.stack([e.image for e in examples]))
        logits = probe(torch.cat([tokens.amax(dim=1), tokens.mean(dim=1)], dim=-1)).split(
            [len(v) for v in ATTRIBUTES.values()], -1
        )
        return sum(
            F.cross_entropy(scores, torch.tensor([names.index(getattr(e, key)) for e in examples]))
            for scores, (key, names) in zip(logits, ATTRIBUTES.items(), strict=True)
        )

    return optimise(
        loss_of_a_batch, optimizer, steps=steps, label="encoder step", log_every=log_every
    )


def train(
    model: DeepFusionModel,
    tokenizer: fusionlm.Tokenizer,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    image_size: int,
    seed: int,
    log_every: int = 25,
) -> list[float]:
    """AdamW on the trainable parameters, linear warm-up then cosine decay; returns the losses."""
    rng = np.random.default_rng(seed)
    prompt = prompt_ids(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    # The tanh gates start at zero (a fresh fusion layer changes nothing) and everything
    # upstream of them learns only once they open: they get a 10x learning rate.
    gates = {id(m.scale) for m in model.modules() if isinstance(m, TanhGate)}
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in params if id(p) not in gates], "lr": lr},
            {"params": [p for p in params if id(p) in gates], "lr": 10 * lr},
        ],
        weight_decay=0.0,
    )

    def loss_of_a_batch() -> torch.Tensor:
        examples = [draw(rng, size=image_size) for _ in range(batch_size)]
        tokens, targets, images = training_batch(examples, tokenizer, prompt)
        t = targets.shape[1]
        # Only the answer is learnt: logits for the position before each answer token.
        logits = model(tokens, encoder_input={"images": images}, logits_to_keep=t + 1)[:, :-1]
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    model.train()
    losses = optimise(
        loss_of_a_batch,
        optimizer,
        steps=steps,
        label="step",
        log_every=log_every,
        max_grad_norm=1.0,
    )
    model.eval()
    return losses


def parse(caption: str) -> dict[str, str | None]:
    """The shape, colour and position a caption names (None where it names none)."""
    words = caption.lower().replace(".", " ").split()

    def first(options) -> str | None:
        return next((w for w in words if w in options), None)

    return {key: first(values) for key, values in ATTRIBUTES.items()}


def attribute_hits(example: Example, caption: str) -> dict[str, bool]:
    """For each attribute, whether ``caption`` names the example's."""
    found = parse(caption)
    return {key: found[key] == getattr(example, key) for key in ATTRIBUTES}


def evaluate(
    model: DeepFusionModel,
    tokenizer: fusionlm.Tokenizer,
    *,
    count: int,
    image_size: int,
    seed: int,
    batch_size: int = 32,
) -> tuple[dict[str, float], list[tuple[Example, str]]]:
    """Caption ``count`` new images; accuracy per attribute, their mean and all-three-right."""
    rng = np.random.default_rng(seed)
    examples = [draw(rng, size=image_size) for _ in range(count)]
    prompt = prompt_ids(tokenizer)
    captions = []
    for start in range(0, count, batch_size):
        chunk = examples[start : start + batch_size]
        new = fusionlm.generate(
            model,
            [prompt] * len(chunk),
            images=[[e.image] for e in chunk],
            max_new_tokens=12,
            stop_tokens=tokenizer.stop_ids,
        )
        captions += [tokenizer.decode(ids).strip() for ids in new]
    right = dict.fromkeys([*ATTRIBUTES, "all three"], 0)
    for example, caption in zip(examples, captions, strict=True):
        hits = attribute_hits(example, caption)
        for key, hit in hits.items():
            right[key] += hit
        right["all three"] += all(hits.values())
    accuracy = {k: v / count for k, v in right.items()}
    accuracy["attributes (mean)"] = sum(accuracy[k] for k in ATTRIBUTES) / len(ATTRIBUTES)
    return accuracy, list(zip(examples, captions, strict=True))


def save_grid(results: list[tuple[Example, str]], path: str, *, columns: int = 6) -> None:
    """A PNG of images (scaled up) with their generated captions: green when all three
    attributes are right, red otherwise."""
    Image = pillow()
    from PIL import ImageDraw

    cell, text_height = 160, 34
    rows = math.ceil(len(results) / columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + text_height)), "white")
    draw_text = ImageDraw.Draw(grid)
    for i, (example, caption) in enumerate(results):
        x, y = (i % columns) * cell, (i // columns) * (cell + text_height)
        picture = to_pil(example.image).resize((cell - 8, cell - 8), Image.Resampling.NEAREST)
        grid.paste(picture, (x + 4, y + 4))
        ok = all(attribute_hits(example, caption).values())
        words = caption.split()
        lines = [" ".join(words[:3]), " ".join(words[3:])]
        for j, line in enumerate(lines):
            draw_text.text(
                (x + 4, y + cell + 2 + 15 * j), line, fill=(0, 120, 0) if ok else (200, 0, 0)
            )
    grid.save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0].rstrip(".")
        + ": trains a small image encoder, fuses it into "
        "the frozen default model and prints its captioning accuracy; 430-470 s on 2 "
        "cores. Writes one PNG grid of held-out images and their captions (--out)."
    )
    parser.add_argument("--encoder-steps", type=int, default=300, help="stage 1 (default 300)")
    parser.add_argument("--encoder-batch-size", type=int, default=32)
    parser.add_argument("--encoder-lr", type=float, default=3e-3)
    parser.add_argument("--steps", type=int, default=250, help="stage 2 (default 250)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--every-n-layers", type=int, default=6, help="fusion layer spacing")
    parser.add_argument(
        "--train-encoder",
        action="store_true",
        help="stage 2 also trains the encoder (by default only the fusion parameters train)",
    )
    parser.add_argument("--eval-images", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch's default)")
    parser.add_argument("--out", default="fusion_captioning.png", help="the PNG grid to write")
    args = parser.parse_args(argv)

    pillow()  # fail now, not after training, if the grid cannot be written
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    tokenizer = fusionlm.load_tokenizer()
    decoder = fusionlm.load_model()
    encoder = ShapeEncoder(
        image_size=args.image_size,
        width=128,
        out_dim=decoder.tok_embeddings.embedding_dim,
        background=BACKGROUND,
    )
    pretrain_encoder(
        encoder,
        steps=args.encoder_steps,
        batch_size=args.encoder_batch_size,
        lr=args.encoder_lr,
        image_size=args.image_size,
        seed=args.seed + 2,
    )
    model = build_model(
        decoder, encoder, every_n_layers=args.every_n_layers, train_encoder=args.train_encoder
    )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"training {trainable / 1e6:.1f} M of {total / 1e6:.1f} M parameters")

    train(
        model,
        tokenizer,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        image_size=args.image_size,
        seed=args.seed,
    )
    accuracy, results = evaluate(
        model, tokenizer, count=args.eval_images, image_size=args.image_size, seed=args.seed + 1
    )
    for example, caption in results[:6]:
        print(f"  {example.caption!r:36} -> {caption!r}")
    print("held-out accuracy: " + ", ".join(f"{k} {v:.1%}" for k, v in accuracy.items()))
    save_grid(results[:24], args.out)
    print(f"wrote {args.out}; took {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
