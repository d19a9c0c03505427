"""Property test: 1,000+ mutated adapter folders thrown at load_adapter. Each one either raises
LoraError (model untouched) or loads correctly (the model holds exactly the file's tensors)."""

import json
import warnings
import tempfile
from pathlib import Path

import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import lorakit as lk
from tiny import tiny_llama

MODEL = tiny_llama(num_hidden_layers=1)
SRC = Path(tempfile.mkdtemp(prefix="lorakit-fuzz-"))
_donor = tiny_llama(num_hidden_layers=1)
lk.inject(_donor, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "embed_tokens"], init=False))
lk.save_adapter(_donor, SRC)
WEIGHTS = (SRC / "adapter_model.safetensors").read_bytes()
CONFIG = (SRC / "adapter_config.json").read_bytes()
N_KEYS = len(json.loads(WEIGHTS[8: 8 + int.from_bytes(WEIGHTS[:8], "little")])) - 1  # minus __metadata__
CLEAN = {k: v.clone() for k, v in MODEL.state_dict().items()}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 1000) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=5,
)
mutation = st.one_of(
    st.tuples(st.just("flip"), st.lists(st.integers(0, len(WEIGHTS) - 1), min_size=1, max_size=4), st.integers(1, 255)),
    st.tuples(st.just("header_len"), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("truncate"), st.integers(0, len(WEIGHTS) - 1)),
    st.tuples(st.just("dtype"), st.integers(0, N_KEYS - 1),
              st.sampled_from(["F16", "BF16", "F64", "I64", "I8", "U8", "BOOL", "F8_E4M3", "XX", 5, None])),
    st.tuples(st.just("shape"), st.integers(0, N_KEYS - 1), st.lists(st.integers(-1, 70), max_size=4)),
    st.tuples(st.just("rename"), st.integers(0, N_KEYS - 1), st.text(max_size=40)),
    st.tuples(st.just("offsets"), st.integers(0, N_KEYS - 1), st.lists(st.integers(-5, 5000), max_size=3)),
    st.tuples(st.just("drop_key"), st.integers(0, N_KEYS - 1)),
    st.tuples(st.just("swap_names"), st.integers(0, N_KEYS - 1), st.integers(0, N_KEYS - 1)),
    st.tuples(st.just("json_cut"), st.integers(0, len(CONFIG) - 1)),
    st.tuples(st.just("json_flip"), st.integers(0, len(CONFIG) - 1), st.integers(1, 255)),
    st.tuples(st.just("json_field"),
              st.sampled_from(["r", "lora_alpha", "target_modules", "lora_dropout", "use_rslora", "bias",
                               "modules_to_save", "rank_pattern", "alpha_pattern", "peft_type", "fan_in_fan_out",
                               "layers_to_transform", "exclude_modules", "use_dora", "init_lora_weights", "new_key"]),
              json_values),
    st.tuples(st.just("json_drop"), st.sampled_from(["r", "lora_alpha", "target_modules", "peft_type"])),
)


def _split(data: bytes):
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body: bytes) -> bytes:
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return len(h).to_bytes(8, "little") + h + body


def _mutate(weights: bytes, config: bytes, m) -> tuple[bytes, bytes]:
    op = m[0]
    if op == "flip":
        b = bytearray(weights)
        for pos in m[1]:
            if pos < len(b):
                b[pos] ^= m[2]
        return bytes(b), config
    if op == "header_len":
        return m[1].to_bytes(8, "little") + weights[8:], config
    if op == "truncate":
        return weights[: m[1]], config
    if op == "json_cut":
        return weights, config[: m[1]]
    if op == "json_flip":
        b = bytearray(config)
        if b:
            b[m[1] % len(b)] ^= m[2]
        return weights, bytes(b)
    if op in ("json_field", "json_drop"):
        try:
            cfg = json.loads(config)
        except ValueError:
            return weights, config
        if op == "json_drop":
            cfg.pop(m[1], None)
        else:
            cfg[m[1]] = m[2]
        return weights, json.dumps(cfg).encode()
    try:
        header, body = _split(weights)
    except (ValueError, UnicodeDecodeError):
        return weights, config
    keys = sorted(k for k in header if k != "__metadata__")
    if not keys:
        return weights, config
    key = keys[m[1] % len(keys)]
    if op == "dtype":
        header[key]["dtype"] = m[2]
    elif op == "shape":
        header[key]["shape"] = m[2]
    elif op == "rename":
        header[m[2]] = header.pop(key)
    elif op == "offsets":
        header[key]["data_offsets"] = m[2]
    elif op == "drop_key":
        del header[key]
    elif op == "swap_names":
        other = keys[m[2] % len(keys)]
        header[key], header[other] = header[other], header[key]
    return _join(header, body), config


def _check_loaded(folder: Path) -> None:
    """A load that succeeded must hold exactly the file's tensors (read by safetensors itself)."""
    file_tensors = load_file(folder / "adapter_model.safetensors")
    ours = lk.adapter_state_dict(MODEL, "fuzz")
    assert set(ours) == set(file_tensors)
    for k, v in file_tensors.items():
        assert torch.equal(ours[k], v.to(ours[k].dtype)), k


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_adapters_fail_cleanly_or_load_correctly(mutations):
    weights, config = WEIGHTS, CONFIG
    for m in mutations:
        weights, config = _mutate(weights, config, m)
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        (folder / "adapter_model.safetensors").write_bytes(weights)
        (folder / "adapter_config.json").write_bytes(config)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # unknown-key warnings are expected here
                lk.load_adapter(MODEL, folder, "fuzz")
        except lk.LoraError as e:
            event(f"refused: {str(e).split(': ', 1)[-1][:30]}")
            assert lk.list_adapters(MODEL) == []
            now = MODEL.state_dict()
            assert list(now) == list(CLEAN)
            assert all(torch.equal(now[k], v) for k, v in CLEAN.items())
            return
        event("loaded")
        try:
            _check_loaded(folder)
        finally:
            lk.delete_adapter(MODEL, "fuzz")
