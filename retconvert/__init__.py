"""retconvert: turn a pretrained Transformer language model into a Retentive Network.

Importing the package registers the RetNet classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` works without `trust_remote_code` here.
Checkpoints also carry their own code (`auto_map`) for Pythons without retconvert.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from retconvert.models import RetNetConfig, RetNetForCausalLM, RetNetModel

__version__ = "0.1.0"

AutoConfig.register("retnet", RetNetConfig, exist_ok=True)
AutoModel.register(RetNetConfig, RetNetModel, exist_ok=True)
AutoModelForCausalLM.register(RetNetConfig, RetNetForCausalLM, exist_ok=True)
# save_pretrained() then writes auto_map and copies the modeling files into the checkpoint.
RetNetConfig.register_for_auto_class()
RetNetModel.register_for_auto_class("AutoModel")
RetNetForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["RetNetConfig", "RetNetModel", "RetNetForCausalLM", "__version__"]
