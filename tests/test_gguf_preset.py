"""The demo's GGUF preset is converted strictly: a weight the GGUF lacks is an error, not a random weight."""

import pytest
import torch
from conftest import tiny_llama_config
from transformers import AutoTokenizer, LlamaForCausalLM

from lvf import models

PRESET = {"hub_id": "none/none", "gguf_package": "json", "gguf_file": "tiny.gguf"}  # json: any importable package


class GGUFStandIn:
    """What from_pretrained(..., gguf_file=...) returns, as far as the conversion reads it."""

    def __init__(self, leave_out):
        torch.manual_seed(0)
        self.model = LlamaForCausalLM(tiny_llama_config(vocab_size=300))
        self.config = self.model.config
        self.leave_out = leave_out

    def state_dict(self):
        return {key: value for key, value in self.model.state_dict().items() if key != self.leave_out}


@pytest.fixture
def gguf_returning(monkeypatch, tmp_path, llama3_tokenizer):
    monkeypatch.setenv("LVF_CACHE", str(tmp_path))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *a, **kw: llama3_tokenizer)

    def use(stand_in):
        monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", lambda *a, **kw: stand_in)
        return stand_in

    return use


def test_a_weight_missing_from_the_gguf_stops_the_conversion(gguf_returning, tmp_path):
    gguf_returning(GGUFStandIn(leave_out="model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(RuntimeError, match="down_proj"):
        models.convert_gguf_preset("tiny", PRESET)
    assert not (tmp_path / "tiny").exists()


def test_only_the_output_layer_tied_to_the_embedding_may_be_absent(gguf_returning):
    stand_in = gguf_returning(GGUFStandIn(leave_out="lm_head.weight"))
    converted = LlamaForCausalLM.from_pretrained(models.convert_gguf_preset("tiny", PRESET))
    for key, value in stand_in.model.state_dict().items():
        assert torch.equal(converted.state_dict()[key], value), key
