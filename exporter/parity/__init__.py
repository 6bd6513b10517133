"""Parity: each artifact run in its users' runtime and compared with the unmerged model (base + adapter on the fly).

    reference.py   the unmerged model: the base with the adapter applied by hooks, read by its own code
    layerwise.py   transformers models run whole or module by module (weights loaded just before each module)
    probes.py      what the models are run on: texts, a chat turn, random ids, added-token rows
    runtimes.py    running an artifact: a Hugging Face folder in transformers, a GGUF in llama.cpp
    figures.py     logits compared (max |Δ|, KL, top-1), judged against a tolerance, the human table
    tolerances.py  the declared tolerances' shape and the shared margins

The parity stage (exporter/stages/parity.py) drives them; each format says how its artifact runs
(exporter/formats/).
"""
