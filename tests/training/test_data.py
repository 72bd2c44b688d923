"""Training data: formats, response-only labels, line-numbered errors, packing, sampling."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fusionlm
from fusionlm.modules.loss import CEWithChunkedOutputLoss
from fusionlm.training.data import (
    IGNORE_INDEX,
    StepSampler,
    load_documents,
    pack_documents,
    select_rows,
    shard_for_eval,
)
from tests.helpers import write_jsonl


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return fusionlm.load_tokenizer(tiny_dir)


def _trained_text(tok, doc) -> str:
    return tok.decode([label for label in doc.labels if label != IGNORE_INDEX])


def test_each_format_trains_on_the_right_tokens(tok, tmp_path):
    conversation = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "ok"},
    ]
    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "2+2=", "response": "4", "id": 7},
            {"prompt": "p", "response": "r", "system": "sys"},
            "",
            {"messages": conversation},
            {"text": "plain words"},
        ],
    )
    docs, truncated = load_documents(path, tok, seq_len=128)
    assert truncated == 0 and [d.line for d in docs] == [1, 2, 4, 5]
    full = tok.decode(docs[0].tokens)
    assert full == "<|im_start|>user\n2+2=<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n"
    assert full == tok.apply_chat_template(
        [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
        add_generation_prompt=False,
    )
    assert _trained_text(tok, docs[0]) == "4<|im_end|>\n"
    assert tok.decode(docs[1].tokens).startswith("<|im_start|>system\nsys<|im_end|>")
    assert _trained_text(tok, docs[2]) == "yo<|im_end|>\nok<|im_end|>\n"
    # plain text: every token but the first is a target, and the document ends with EOS
    assert _trained_text(tok, docs[3]) == "lain words<|im_end|>"
    for doc in docs:
        assert len(doc.tokens) == len(doc.labels) and doc.labels[-1] == IGNORE_INDEX
        # labels are the next tokens wherever they are set
        for i, label in enumerate(doc.labels[:-1]):
            assert label in (IGNORE_INDEX, doc.tokens[i + 1])


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "a", "response": "b"', "d.jsonl:2: malformed JSON"),
        ("[1, 2]", "d.jsonl:2: expected a JSON object, got list"),
        ('{"prompt": "a"}', "d.jsonl:2: has 'prompt' without 'response'"),
        ('{"response": "a"}', "d.jsonl:2: has 'response' without 'prompt'"),
        ('{"question": "a", "answer": "b"}', "d.jsonl:2: needs exactly one of"),
        ('{"text": "a", "prompt": "b", "response": "c"}', "d.jsonl:2: needs exactly one of"),
        ('{"text": 5}', "d.jsonl:2: 'text' must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "d.jsonl:2: has no assistant message"),
        (
            '{"messages": [{"role": "assistant", "content": "x"}]}',
            "d.jsonl:2: starts with an assistant",
        ),
        ('{"messages": "hi"}', "d.jsonl:2: 'messages' must be a non-empty list"),
        (
            '{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}',
            "d.jsonl:2: messages\\[0\\] has no 'content'",
        ),
        (
            '{"prompt": "' + "x" * 200 + '", "response": "y"}',
            "d.jsonl:2: 2.. tokens do not fit seq_len=128",
        ),
    ],
)
def test_a_bad_line_is_named(tok, tmp_path, line, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine"}, line, {"text": "fine"}])
    with pytest.raises(ValueError, match=message):
        load_documents(path, tok, seq_len=128)


def test_missing_empty_and_binary_files(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_documents(tmp_path / "nope.jsonl", tok, seq_len=64)
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="holds no examples"):
        load_documents(tmp_path / "empty.jsonl", tok, seq_len=64)
    (tmp_path / "bin.jsonl").write_bytes(b'{"text": "a"}\n\xff\xfe\n')
    with pytest.raises(ValueError, match=r"bin.jsonl:2: not UTF-8"):
        load_documents(tmp_path / "bin.jsonl", tok, seq_len=64)


def test_truncation_is_opt_in_and_counted(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "y" * 100}, {"text": "short"}])
    docs, truncated = load_documents(path, tok, seq_len=40, truncate=True)
    assert truncated == 1 and len(docs[0].tokens) == 40 and len(docs[1].tokens) == 6
    long_prompt = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "x" * 100, "response": "y"}])
    with pytest.raises(ValueError, match=r"p.jsonl:1: no token to train on after truncation"):
        load_documents(long_prompt, tok, seq_len=40, truncate=True)


def _docs(tok, tmp_path, n=8):
    rows = [{"prompt": "q" * (1 + 2 * i), "response": "a" * (1 + i)} for i in range(n)]
    rows += [{"text": "some plain text"}]
    docs, _ = load_documents(write_jsonl(tmp_path / "d.jsonl", rows), tok, seq_len=64)
    return docs


def test_packing_keeps_documents_whole_and_restarts_positions(tok, tmp_path):
    docs = _docs(tok, tmp_path)
    rows = pack_documents(docs, seq_len=64, pad_id=tok.pad_id)
    assert len(rows) < len(docs)
    seen = []
    for r in range(len(rows)):
        ids = rows.document_ids[r]
        for d in range(int(ids.max()) + 1):
            slots = (ids == d).nonzero().flatten()
            assert torch.equal(slots, torch.arange(slots[0], slots[0] + len(slots)))  # contiguous
            assert rows.positions[r, slots].tolist() == list(range(len(slots)))
            seen.append(rows.tokens[r, slots].tolist())
        pad = ids == -1
        assert (rows.labels[r, pad] == IGNORE_INDEX).all() and (
            rows.tokens[r, pad] == tok.pad_id
        ).all()
    assert seen == [d.tokens for d in docs]
    unpacked = pack_documents(docs, seq_len=64, pad_id=0, packing=False)
    assert len(unpacked) == len(docs)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
def test_packed_loss_equals_the_loss_of_the_documents_alone(tiny_dir, tok, tmp_path, backend):
    model = fusionlm.load_model(tiny_dir, attn_backend=backend)
    docs = _docs(tok, tmp_path)
    rows = pack_documents(docs, seq_len=128, pad_id=tok.pad_id)
    batch = select_rows(rows, torch.arange(len(rows)))
    assert int(batch.document_ids.max()) >= 3  # several documents share a row
    loss_fn = CEWithChunkedOutputLoss(4)
    model.set_num_output_chunks(4)
    with torch.no_grad():
        logits = model(batch.tokens, mask=batch.attention_mask(backend), input_pos=batch.positions)
        packed = loss_fn(logits, batch.labels).item()
        model.set_num_output_chunks(0)
        total, count = 0.0, 0
        for doc in docs:
            out = model(torch.tensor([doc.tokens]))[0]
            labels = torch.tensor(doc.labels)
            total += F.cross_entropy(
                out.double(), labels, ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((labels != IGNORE_INDEX).sum())
    assert count == batch.num_labels()
    assert abs(packed - total / count) < 1e-5


def test_sampler_rows_do_not_depend_on_how_the_batch_is_split():
    one = StepSampler(10, batch_size=4, accumulation=1, world_size=1, seed=3)
    two = StepSampler(10, batch_size=1, accumulation=2, world_size=2, seed=3)
    for step in range(6):
        a = torch.cat(list(one.micro_batches(step, 0)))
        b = torch.cat([torch.cat(list(two.micro_batches(step, r))) for r in range(2)])
        assert torch.equal(a, b)
    # an epoch visits every row once; epochs differ in order
    stream = torch.cat([torch.cat(list(one.micro_batches(s, 0))) for s in range(5)])
    assert sorted(stream[:10].tolist()) == list(range(10)) == sorted(stream[10:20].tolist())
    assert stream[:10].tolist() != stream[10:20].tolist()
    assert one.steps_for_epochs(2) == 5


def test_eval_shards_cover_every_row_once_with_fillers():
    shards = [shard_for_eval(7, batch_size=2, rank=r, world_size=2) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 2
    flat = torch.cat([torch.cat(s) for s in shards]).tolist()
    assert sorted(i for i in flat if i >= 0) == list(range(7)) and flat.count(-1) == 1
