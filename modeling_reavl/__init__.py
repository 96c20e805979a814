"""REAVL model library: config and models, importable without the training app (as open_clip keeps its library).

Importing this package registers REAVL with transformers' Auto classes for in-process use; saved folders carry
`auto_map` so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` works without this package.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForMultipleChoice,
    AutoModelForPreTraining,
    AutoModelForSequenceClassification,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
)

from .configuration_reavl import ReavlConfig
from .modeling_reavl import (
    ReavlForEntityLinking,
    ReavlForImageTextClassification,
    ReavlForImageTextRetrieval,
    ReavlForPreTraining,
    ReavlForQuestionAnswering,
    ReavlModel,
    ReavlPreTrainedModel,
)


# Every class has an Auto class, so a saved folder reloads with `Auto*.from_pretrained(..., trust_remote_code=True)`.
# Entity linking scores a mention against candidate entries, i.e. multiple choice over the candidates; pair
# classification classifies a statement (given its image), i.e. sequence classification. No closer Auto classes exist.
_AUTO_CLASSES = {
    ReavlModel: AutoModel,
    ReavlForPreTraining: AutoModelForPreTraining,
    ReavlForQuestionAnswering: AutoModelForVisualQuestionAnswering,
    ReavlForImageTextRetrieval: AutoModelForZeroShotImageClassification,
    ReavlForEntityLinking: AutoModelForMultipleChoice,
    ReavlForImageTextClassification: AutoModelForSequenceClassification,
}

ReavlConfig.register_for_auto_class()
AutoConfig.register("reavl", ReavlConfig, exist_ok=True)
for _model_class, _auto_class in _AUTO_CLASSES.items():
    _model_class.register_for_auto_class(_auto_class.__name__)
    _auto_class.register(ReavlConfig, _model_class, exist_ok=True)

# In-process `pipeline("knowledge-vqa" | "multimodal-entity-linking", model=..., processor=...)`; exported folders
# name their pipeline in config.json `custom_pipelines` instead (see pipeline_reavl.custom_pipelines_config).
from .pipeline_reavl import register_pipelines  # noqa: E402

register_pipelines()

__all__ = [
    "ReavlConfig",
    "ReavlModel",
    "ReavlForPreTraining",
    "ReavlForQuestionAnswering",
    "ReavlForEntityLinking",
    "ReavlForImageTextRetrieval",
    "ReavlForImageTextClassification",
    "ReavlPreTrainedModel",
]
