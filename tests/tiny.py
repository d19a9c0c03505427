"""Small configs of real architectures for tests (built offline from transformers configs)."""

import torch


def tiny_llama(seed: int = 0, **kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg.update(kw)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_gpt2(seed: int = 0, **kw):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    cfg.update(kw)
    return GPT2LMHeadModel(GPT2Config(**cfg)).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, **kw):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=64, num_labels=num_labels)
    cfg.update(kw)
    return BertForSequenceClassification(BertConfig(**cfg)).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}



def randomize(model, name: str, std: float) -> None:
    """Give adapter `name` random A and B (init leaves B = 0: no visible effect per adapter)."""
    import lorakit as lk

    with torch.no_grad():
        for p in lk.adapter_parameters(model, name):
            p.normal_(0, std)
