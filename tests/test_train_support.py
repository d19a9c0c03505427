"""Builders for the training tests: tiny real-architecture model folders with a real (small)
byte-level BPE tokenizer, and small learnable datasets. No tests live here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

WORDS = {
    "sport": "match goal team player coach league score win cup season",
    "tech": "software chip computer phone internet code data robot network app",
    "money": "bank market shares profit price trade economy stock firm deal",
}


def tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [" ".join(WORDS.values())] * 4 + ["topic: the answer is sport tech money yes no"] * 4
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def bert_folder(path: Path, seed: int = 0) -> Path:
    """A tiny BERT encoder saved WITHOUT a classifier head (as MiniLM is): the head is new."""
    from transformers import BertConfig, BertModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, pad_token_id=tok.pad_token_id)
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def llama_folder(path: Path, seed: int = 0) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
                      # large enough output rows that a LoRA (which leaves lm_head and the final norm
                      # frozen) can reach confident logits: with 0.02, |logit| < 0.7 whatever it learns
                      initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def topic_records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        words = WORDS[label].split()
        out.append({"text": " ".join(rng.choice(words) for _ in range(rng.randint(3, 8))), "label": label})
    return out


def prompt_records(n: int, seed: int = 0) -> list[dict]:
    return [{"prompt": f"topic: {r['text']} the answer is", "completion": " " + r["label"]}
            for r in topic_records(n, seed)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_exact_match_normalises_case_space_and_punctuation():
    from lorakit.train.metrics import same_answer

    assert same_answer(" Sports.", "sports")
    assert same_answer("tech\n", "Tech")
    assert not same_answer("sports news", "sports")
    assert not same_answer("politics", "sports")
