"""`lorakit inspect DIR`: the report against dense SVDs of s*B@A, effective rank on known spectra,
the PNG, JSON output and errors."""

import json

import pytest
import torch

import lorakit as lk
from lorakit.cli import main
from lorakit.cli.inspect import effective_rank, spectrum
from lorakit.layer import lora_layers
from tiny import tiny_llama


@pytest.fixture
def adapter(tmp_path):
    m = tiny_llama()
    torch.manual_seed(0)
    lk.inject(m, lk.LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"], init=False,
                               rank_pattern={"v_proj": 2}, use_dora=True))
    lk.save_adapter(m, tmp_path / "ad")
    return m, tmp_path / "ad"


def test_inspect_table_and_png(adapter, tmp_path, capsys):
    m, folder = adapter
    png = tmp_path / "plots" / "spec.png"
    assert main(["inspect", str(folder), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    n_params = sum(t.numel() for t in lk.adapter_state_dict(m).values())
    assert f"{n_params:,}" in out
    for path, layer in lora_layers(m):
        assert path in out
        line = next(l for l in out.splitlines() if l.strip().startswith(path))
        assert f" {layer.rank('default')} " in line and "(DoRA)" in line
    assert "use_dora" in out and "rank_pattern" in out
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert not list(png.parent.glob(".*"))  # no temp files left


def test_inspect_json_matches_dense_svd(adapter, tmp_path, capsys):
    m, folder = adapter
    assert main(["inspect", str(folder), "--json", "--no-plot"]) == 0
    report = json.loads(capsys.readouterr().out)
    layers = {l["path"]: l for l in report["layers"]}
    assert set(layers) == {p for p, _ in lora_layers(m)} == set(report["targets"])
    assert report["ranks"] == [2, 4]
    for path, layer in lora_layers(m):
        dense = layer.scaling["default"] * layer.lora_B["default"].double() @ layer.lora_A["default"].double()
        want = torch.linalg.svdvals(dense)[: layer.rank("default")]
        assert torch.allclose(torch.tensor(layers[path]["singular_values"]).double(), want, rtol=1e-4)
        assert layers[path]["scaling"] == layer.scaling["default"]
        assert tuple(layers[path]["shape"]) == tuple(dense.shape)


def test_effective_rank_known_spectra():
    g = torch.Generator().manual_seed(0)
    Q1, _ = torch.linalg.qr(torch.randn(20, 4, generator=g))
    Q2, _ = torch.linalg.qr(torch.randn(30, 4, generator=g))
    equal = spectrum(Q2.T.contiguous(), Q1, 3.0)  # dW = 3 * Q1 @ Q2^T: four singular values of 3
    assert torch.allclose(equal, torch.full((4,), 3.0), atol=1e-5)
    assert effective_rank(equal) == pytest.approx(4.0, abs=1e-4)
    one = spectrum(Q2.T.contiguous(), Q1 * torch.tensor([1.0, 0, 0, 0]), 1.0)
    assert effective_rank(one) == pytest.approx(1.0, abs=1e-4)
    assert effective_rank(torch.zeros(3)) == 0.0


def test_inspect_errors(tmp_path, capsys):
    assert main(["inspect", str(tmp_path / "nope"), "--no-plot"]) == 2
    assert "no such adapter folder" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"junk")
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    assert main(["inspect", str(tmp_path / "bad"), "--no-plot"]) == 2
    assert "safetensors" in capsys.readouterr().err
