"""ONNX Runtime GenAI loads `export_genai`'s folder and generates the same greedy tokens as `OnnxVLM` (the text path:
GenAI's own image processor cannot compute the vision graph's grid inputs)."""

import json

import numpy as np
import onnx
import onnxruntime_genai as og
import pytest
from onnx_helpers import tiny_export, tiny_model_and_processor

from vlmheads.onnx_export import OnnxVLM
from vlmheads.onnx_export.genai import GENAI_CONFIG, GENAI_DECODER, export_genai

pytestmark = pytest.mark.slow
NEW_TOKENS = 10


# One family in the lowest-versions job: onnxruntime-genai>=0.18 loads and runs the exported folder.
@pytest.mark.parametrize("name", ["qwen2_vl", pytest.param("qwen2_5_vl", marks=pytest.mark.floors)])
def test_genai_generates_the_same_greedy_tokens_as_onnxvlm(name, tmp_path):
    model, processor = tiny_model_and_processor(name)
    config_path = export_genai(model, processor, tmp_path / "genai", image_size=(56, 56))
    config = json.loads(config_path.read_text())
    assert config_path.name == GENAI_CONFIG and config["model"]["type"] == "qwen2_5_vl"
    assert not config["search"]["past_present_share_buffer"]
    decoder = onnx.load(str(tmp_path / "genai" / GENAI_DECODER), load_external_data=False).graph
    names = {value.name for value in (*decoder.input, *decoder.output)}
    inputs, outputs = config["model"]["decoder"]["inputs"], config["model"]["decoder"]["outputs"]
    assert {inputs["inputs_embeds"], inputs["position_ids"], outputs["logits"]} <= names
    assert inputs["past_key_names"] % 0 in names and outputs["present_value_names"] % 1 in names

    genai_model = og.Model(str(tmp_path / "genai"))
    prompt = np.random.default_rng(0).integers(10, 400, (1, 12))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(do_sample=False, max_length=prompt.shape[1] + NEW_TOKENS, batch_size=1)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(prompt.astype(np.int32))
    for _ in range(NEW_TOKENS):
        generator.generate_next_token()
    expected = OnnxVLM(tiny_export(name)).generate(prompt, max_new_tokens=NEW_TOKENS, eos_token_id=[])
    np.testing.assert_array_equal(np.asarray(generator.get_sequence(0)), expected[0])


def test_genai_export_refuses_families_without_mrope(tmp_path):
    model, processor = tiny_model_and_processor("smolvlm")
    with pytest.raises(ValueError, match="takes Qwen models .* smolvlm has '1d' positions"):
        export_genai(model, processor, tmp_path / "genai")
