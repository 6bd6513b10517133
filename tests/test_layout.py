"""The table of all-Linear architectures agrees with transformers' own modules (built on the meta device)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, CONFIG_MAPPING

from exporter.layout import LINEAR_ARCHITECTURES


@pytest.mark.parametrize("model_type", sorted(LINEAR_ARCHITECTURES))
def test_linear_architecture_table_matches_transformers(model_type):
    config = CONFIG_MAPPING[model_type](num_hidden_layers=1)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    input_embed, output_embed = LINEAR_ARCHITECTURES[model_type]
    assert names[id(model.get_input_embeddings())] == input_embed
    assert names[id(model.get_output_embeddings())] == output_embed
    weights = [n for n, m in model.named_modules() if hasattr(m, "weight") and getattr(m, "weight") is not None
               and m.weight.ndim == 2 and n != input_embed]
    assert weights and all(isinstance(model.get_submodule(n), nn.Linear) for n in weights), model_type


def test_every_source_of_an_output_tensor_has_a_way_to_stream():
    """A new Source without a stream would surface only when a run first meets such a tensor."""
    from exporter.layout import Source
    from exporter.stages.merge import STREAMS

    assert set(STREAMS) == set(Source)
