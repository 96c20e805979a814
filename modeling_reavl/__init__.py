"""REAVL model library: config and models, importable without the training app (as open_clip keeps its library).

Importing this package registers REAVL with transformers' Auto classes for in-process use; saved folders carry
`auto_map` so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForPreTraining

from .configuration_reavl import ReavlConfig
from .modeling_reavl import ReavlForPreTraining, ReavlModel, ReavlPreTrainedModel


ReavlConfig.register_for_auto_class()
ReavlModel.register_for_auto_class("AutoModel")
ReavlForPreTraining.register_for_auto_class("AutoModelForPreTraining")

AutoConfig.register("reavl", ReavlConfig, exist_ok=True)
AutoModel.register(ReavlConfig, ReavlModel, exist_ok=True)
AutoModelForPreTraining.register(ReavlConfig, ReavlForPreTraining, exist_ok=True)

__all__ = ["ReavlConfig", "ReavlModel", "ReavlForPreTraining", "ReavlPreTrainedModel"]
