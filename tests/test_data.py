"""Training data is validated before training starts; every error names the file and line."""

from __future__ import annotations

import json

import pytest

from test_train_support import tiny_tokenizer

from lorakit import LoraError
from lorakit.train import data


def _jsonl(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))
    return p


@pytest.mark.parametrize("lines, task, pattern", [
    ([{"text": "a", "label": "x"}, {"text": "b"}], "classification", r"train.jsonl:2: missing column 'label'"),
    ([{"text": "a", "label": "x"}, "{not json"], "classification", r"train.jsonl:2: not valid JSON"),
    ([{"text": "a", "label": "x"}, "[1, 2]"], "classification", r"train.jsonl:2: expected a JSON object"),
    ([{"text": "", "label": "x"}], "classification", r"train.jsonl:1: 'text' is empty"),
    ([{"text": 3, "label": "x"}], "classification", r"train.jsonl:1: 'text' must be a string"),
    ([{"text": "a", "label": True}], "classification", r"train.jsonl:1: 'label' must be"),
    ([{"prompt": "q"}], "causal-lm", r"train.jsonl:1: missing column 'completion'"),
    ([{"prompt": "q", "completion": "a"}, {"question": "q"}], "causal-lm", r"train.jsonl:2: missing column 'text'"),
])
def test_bad_records_name_file_and_line(tmp_path, lines, task, pattern):
    path = _jsonl(tmp_path, "train.jsonl", lines)
    with pytest.raises(LoraError, match=pattern):
        data.load_examples(path, task)


def test_blank_lines_keep_true_line_numbers(tmp_path):
    path = _jsonl(tmp_path, "d.jsonl", [{"text": "a", "label": 1}, "", {"text": "b"}])
    with pytest.raises(LoraError, match=r"d.jsonl:3: missing column 'label'"):
        data.load_examples(path, "classification")


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(LoraError, match="empty.jsonl: empty file"):
        data.load_examples(tmp_path / "empty.jsonl", "classification")
    with pytest.raises(LoraError, match="nope.jsonl: no such data file"):
        data.load_examples(tmp_path / "nope.jsonl", "classification")
    (tmp_path / "h.csv").write_text("text,label\n")
    with pytest.raises(LoraError, match="h.csv: has a header but no examples"):
        data.load_examples(tmp_path / "h.csv", "classification")


def test_csv_lines_and_columns(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"hello, world",pos\n"multi\nline",neg\n,neg\n')
    with pytest.raises(LoraError, match=r"d.csv:5: 'text' is empty"):  # line 5: the record after a 2-line one
        data.load_examples(p, "classification")
    p.write_text("sentence,label\nhi,pos\n")
    with pytest.raises(LoraError, match=r"d.csv:2: missing column 'text'.*'sentence'"):
        data.load_examples(p, "classification")
    p.write_text('text,label\n"hello, world",pos\n"multi\nline",neg\n')
    ex = data.load_examples(p, "classification")
    assert [(e.text, e.label) for e in ex] == [("hello, world", "pos"), ("multi\nline", "neg")]


def test_eval_label_never_seen_in_training(tmp_path):
    train = data.load_examples(_jsonl(tmp_path, "t.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}]),
                               "classification")
    ev = data.load_examples(_jsonl(tmp_path, "e.jsonl", [{"text": "a", "label": "x"}, {"text": "c", "label": "z"}]),
                            "classification")
    with pytest.raises(LoraError, match=r"e.jsonl:2: label 'z' never appears in the training data .*t.jsonl"):
        data.check_eval_labels(ev, data.label_names(train), tmp_path / "t.jsonl")


def test_label_order_is_numeric_for_integers():
    ex = [data.Example("f:1", text="a", label=str(v)) for v in (10, 2, 1)]
    assert data.label_names(ex) == ["1", "2", "10"]


def test_causal_lm_loss_only_on_completion_tokens():
    tok = tiny_tokenizer()
    ex = [data.Example("f:1", prompt="topic: goal win the answer is", completion=" sport"),
          data.Example("f:2", text="chip code data")]
    enc = data.encode(ex, "causal-lm", tok, max_length=64)
    p = tok("topic: goal win the answer is")["input_ids"]
    c = tok(" sport", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert enc.input_ids[0] == p + c
    assert enc.labels[0] == [data.IGNORE] * len(p) + c  # prompt masked, completion and EOS learned
    assert enc.labels[1] == enc.input_ids[1]  # a "text" record: every token
    batch = data.collate(enc, [0, 1], tok.pad_token_id, "causal-lm")
    assert batch["input_ids"].shape == batch["labels"].shape
    short = len(enc.input_ids[1])
    assert (batch["labels"][1, short:] == data.IGNORE).all() and (batch["attention_mask"][1, short:] == 0).all()
    # too long: the prompt is cut from the left, the completion kept whole
    cut = data.encode(ex[:1], "causal-lm", tok, max_length=len(c) + 2)
    assert cut.input_ids[0] == p[-2:] + c


def test_packaged_datasets_load_offline():
    """The demo's real data: BBC News (5 topics), tweets (3 sentiments), drug reviews."""
    from lorakit.train import datasets

    bbc = datasets.bbc_news()
    assert len(bbc) == 2225 and sorted({r["label"] for r in bbc}) == ["business", "entertainment", "politics",
                                                                        "sports", "tech"]
    train, test = datasets.split(bbc, 400, 250, seed=0)
    assert len(train) == 400 and len(test) == 250
    assert not {r["text"] for r in train} & {r["text"] for r in test}
    assert {sum(r["label"] == lab for r in train) for lab in {r["label"] for r in bbc}} == {80}
    tw = datasets.tweets()
    assert len(tw) > 38000 and {r["label"] for r in tw} == {"negative", "neutral", "positive"}
    dtrain, dtest = datasets.drug_reviews()
    assert (len(dtrain), len(dtest)) == (600, 379)
