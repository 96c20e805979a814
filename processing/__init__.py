"""REAVL data side: knowledge bases, the knowledge index and its retriever, and the processor.

Importing this package registers `ReavlProcessor` for `AutoProcessor`: saved processor folders carry `auto_map`
(so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works without this package), and in-process
`AutoProcessor.from_pretrained(folder)` resolves REAVL folders to the local class.
"""

from transformers import AutoProcessor

from .knowledge_base import (
    KNOWLEDGE_COLUMNS,
    KNOWLEDGE_FEATURES,
    KNOWLEDGE_FORMATS,
    KnowledgeBaseError,
    entry_to_text,
    id_to_title_map,
    load_knowledge_base,
    validate_knowledge_base,
)
from .knowledge_index import build_knowledge_index, embed_knowledge_entries, knowledge_base_texts
from .processing_reavl import ReavlProcessor
from .retrieval_reavl import KNOWLEDGE_FORMAT_VERSION, KnowledgeIndexError, ReavlRetriever


ReavlProcessor.register_for_auto_class("AutoProcessor")


def _register_local_auto_processor() -> None:
    try:
        from modeling_reavl import ReavlConfig
    except ImportError:  # the model library is optional for pure data work
        return
    AutoProcessor.register(ReavlConfig, ReavlProcessor, exist_ok=True)


_register_local_auto_processor()

__all__ = [
    "KNOWLEDGE_COLUMNS",
    "KNOWLEDGE_FEATURES",
    "KNOWLEDGE_FORMATS",
    "KNOWLEDGE_FORMAT_VERSION",
    "KnowledgeBaseError",
    "KnowledgeIndexError",
    "ReavlProcessor",
    "ReavlRetriever",
    "build_knowledge_index",
    "embed_knowledge_entries",
    "entry_to_text",
    "id_to_title_map",
    "knowledge_base_texts",
    "load_knowledge_base",
    "validate_knowledge_base",
]
