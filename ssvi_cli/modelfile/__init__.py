"""The model file (format ``ssvi`` versions 1 and 2, spec in docs/FORMAT.md): index codes (``codec``), the
model card and the one model builder (``card``), the header (``header``), writing (``writer``) and
reading with validation (``reader``); ``ssvi_cli.save`` (``module_io``) and ``ssvi_cli.load``
(``loading``) for any converted module, and whether a module is a given architecture
(``structure``). Nothing here imports the training code.
"""

from ssvi_cli.modelfile.card import (NO_DATASET, Architecture, CardError, ModelCard, Training, build_model,
                                     with_attention_of)
from ssvi_cli.modelfile.codec import INDEX_CODES, encode_index, gap8_decode, gap8_encode, gap8_size
from ssvi_cli.modelfile.header import (DTYPES, FORMAT_NAME, FORMAT_VERSION, LAYOUTS, ModelFileError,
                                       dense_equivalent_bytes, read_header, size_totals)
from ssvi_cli.modelfile.reader import FileInfo, LoadedModel, read_model_file
from ssvi_cli.modelfile.writer import model_tensors, write_model_file

__all__ = [
    "Architecture", "CardError", "DTYPES", "FORMAT_NAME", "FORMAT_VERSION", "FileInfo", "INDEX_CODES",
    "LAYOUTS", "LoadedModel", "ModelCard", "ModelFileError", "NO_DATASET", "Training", "build_model",
    "dense_equivalent_bytes", "encode_index", "gap8_decode", "gap8_encode", "gap8_size", "model_tensors",
    "read_header", "read_model_file", "size_totals", "with_attention_of", "write_model_file",
]
