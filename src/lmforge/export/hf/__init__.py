"""Hugging Face interop: HF model directories (decoders, BERT, T5) to lmforge checkpoints and back.

    from_hf("gpt2-dir", "ckpt")      # config.json + model.safetensors (+ tokenizer.json) -> checkpoint
    to_hf("ckpt", "hf-dir")          # checkpoint -> a dir transformers' `from_pretrained` loads
                                     # (AutoModelForCausalLM, a BERT class, T5ForConditionalGeneration)

A registry (`ARCHITECTURES`) maps an HF `model_type` to an `HFArch`: how its config.json becomes
our `ModelConfig` and back, and a table of `TensorRule`s pairing each of our tensors with the
HF tensor(s) it is made of. The one table serves both directions, so from-hf and to-hf cannot
drift apart, and every shape check can name the HF tensor at fault.

Supported: GPT-2 (`gpt2`), Llama incl. grouped-query attention (`llama`), dense Mistral
(`mistral`, without a sliding window), Mixtral (`mixtral`: Mistral with top-k MoE MLPs) and BERT
(`bert`: BertModel, BertForMaskedLM, BertForPreTraining, BertForNextSentencePrediction,
BertForSequenceClassification) and T5 (`t5`: T5ForConditionalGeneration, v1.0 and v1.1).
Everything else is a one-line `UserError` naming the config field and what is allowed.

The package, in the order a conversion uses it (each module's docstring says more):

    rules.py     `TensorRule`, `HFArch` and the config.json field checks every mapping uses
    decoders.py  GPT-2, Llama / dense Mistral, Mixtral: config.json <-> `ModelConfig`, tensor rules
    encoders.py  BERT and T5: the same, plus which heads a file holds
    registry.py  `ARCHITECTURES`; `arch_for` (model_type -> layout), `hf_layout_for` (config -> layout)
    tensors.py   `state_from_hf` / `state_to_hf`: a layout applied to tensors, shape-checked
    convert.py   the directories: reading HF files, `check_output`, `from_hf`, `to_hf`, tokenizer
                 and sentence-transformers metadata (outputs written atomically, never over the input)
"""

from lmforge.export.hf.convert import check_output, from_hf, read_hf_config, read_hf_weights, to_hf
from lmforge.export.hf.registry import ARCHITECTURES, arch_for, hf_layout_for
from lmforge.export.hf.rules import HFArch, TensorRule
from lmforge.export.hf.tensors import dropped_in_hf, state_from_hf, state_to_hf

__all__ = ["ARCHITECTURES", "HFArch", "TensorRule", "arch_for", "check_output", "dropped_in_hf", "from_hf",
           "hf_layout_for", "read_hf_config", "read_hf_weights", "state_from_hf", "state_to_hf", "to_hf"]
