"""`lmforge convert to-onnx CKPT OUT`: a checkpoint as ONNX graphs that ONNX Runtime runs.

    to_onnx("ckpt", "onnx-dir")                    # model.onnx (or encoder.onnx + decoder.onnx), ...
    to_onnx("ckpt", "onnx-dir", quantize_int8=True)   # ... plus model.int8.onnx (onnxruntime dynamic int8)

OUT holds the graph(s) (`onnx_graphs.py` says which, with which inputs and outputs), the
checkpoint's config.json and tokenizer.json, `onnx_config.json` (each graph's file, role and the
names, element types and shapes of its inputs and outputs, read back from the written graph) and
summary.json (export time, bytes, and the largest difference between ONNX Runtime's and
PyTorch's outputs on check inputs of other sizes than the traced ones). It is built under a temp
name and swapped in whole: a failed export leaves nothing behind.

Exporter: torch.onnx.export with `dynamo=True` (torch.export + onnxscript's torchlib). The
TorchScript exporter is deprecated in torch 2.x and freezes Python-level branches and sizes at
trace time; torch.export keeps the batch, sequence and past lengths symbolic, so one decoder graph
serves prefill (past length 0) and decoding. The models run unchanged through the explicit-cache
wrappers of `onnx_wrappers.py`. Opsets below 18 are refused: torchlib writes opset-18 operators
(e.g. ReduceMean and Split with their axes/splits as inputs), which an older opset cannot express.

`--int8`: onnxruntime.quantization.quantize_dynamic (int8 weights, activations quantized per
call) on each exported graph, written beside it as `*.int8.onnx`. `onnx_runtime.py` runs the
result (greedy generation, encodings) the way the tests check it against lmforge.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.errors import UserError
from lmforge.export.onnx_graphs import SUPPORTED_ARCHS, GraphSpec, check_inputs, dense_moe_for_export, graph_specs
from lmforge.fsutil import atomic_dir, atomic_write_json, write_summary

MIN_OPSET = 18
LARGE_MODEL_BYTES = 1 << 30  # above this, weights go to an external-data file beside the graph (protobuf's 2 GB cap)


def check_opset(opset: int) -> None:
    """UserError unless `opset` is one the exporter can write and this onnx package knows."""
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET:
        raise UserError(f"--opset {opset} is too low to express the model: torch's ONNX exporter writes opset-"
                        f"{MIN_OPSET} operators (ReduceMean/Split with axes as inputs, LayerNormalization); "
                        f"use --opset {MIN_OPSET} or higher (up to {newest})")
    if opset > newest:
        raise UserError(f"--opset {opset} is newer than the installed onnx {onnx.__version__} knows "
                        f"(up to {newest}); use --opset {MIN_OPSET}..{newest}")


def load_for_export(ckpt: Path) -> tuple[nn.Module, Path | None]:
    """The checkpoint's model in eval mode (adapters applied as `load_pretrained` does) and its tokenizer file."""
    from lmforge.models import build_model
    from lmforge.models.config import ModelConfig
    from lmforge.train.checkpoint import load_pretrained, load_weights_into, read_model_config, read_weights

    raw = read_model_config(ckpt)
    if raw.get("arch", "gpt") not in SUPPORTED_ARCHS:
        raise UserError(f"{ckpt}/config.json: model.arch {raw.get('arch')!r} cannot be exported to ONNX; "
                        f"supported: {', '.join(SUPPORTED_ARCHS)}")
    if (ckpt / "quant_config.json").is_file():
        raise UserError(f"{ckpt} is a quantized checkpoint (quant_config.json); its packed kernels have no ONNX "
                        "form: export the float checkpoint it came from, with --int8 for ONNX Runtime's int8")
    ModelConfig.from_dict(raw).check_unpruned("convert to-onnx")  # one past-KV shape for every layer
    tokenizer = ckpt / "tokenizer.json"
    if tokenizer.is_file():
        model, _ = load_pretrained(ckpt)
    else:
        model = build_model(ModelConfig.from_dict(raw))
        load_weights_into(model, read_weights(ckpt), ckpt)
    return model.float().eval(), tokenizer if tokenizer.is_file() else None


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's and quantizer's step-by-step prints, warnings and log lines (the command
    reports what matters in one line and in summary.json)."""
    loggers = [logging.getLogger(), logging.getLogger("torch.onnx")]
    levels = [logger.level for logger in loggers]
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for logger, level in zip(loggers, levels):
                logger.setLevel(level)


def export_graph(spec: GraphSpec, path: Path, opset: int, external: bool) -> None:
    """torch.onnx.export (dynamo) of one graph, quietly."""
    with torch.no_grad(), quiet():
        torch.onnx.export(spec.module.eval(), spec.args, str(path), input_names=spec.input_names,
                          output_names=spec.output_names, dynamic_shapes=spec.dynamic_shapes,
                          opset_version=opset, dynamo=True, external_data=external, verbose=False)


def describe_graph(path: Path) -> dict[str, Any]:
    """Inputs and outputs of a written graph: {name: {"type": "float32", "shape": ["batch", 4, ...]}}."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def entry(value) -> dict[str, Any]:
        t = value.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else d.dim_value for d in t.shape.dim]
        return {"type": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name, "shape": shape}

    return {"inputs": {v.name: entry(v) for v in graph.input}, "outputs": {v.name: entry(v) for v in graph.output}}


def check_graph(spec: GraphSpec, path: Path) -> float:
    """Max |ONNX Runtime - PyTorch| over the outputs, on inputs of other sizes than the traced ones."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # e.g. an opset newer than this onnxruntime implements
        reason = str(e).replace(str(path), path.name).splitlines()[0][:200]
        raise UserError(f"onnxruntime {ort.__version__} cannot load the exported {path.name} ({reason}); "
                        "try a lower --opset") from None
    worst = 0.0
    for args in check_inputs(spec):
        with torch.no_grad():
            expected = spec.module(*args)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, dict(zip(spec.input_names, (a.numpy() for a in args))))
        worst = max(worst, *(float((torch.from_numpy(g) - e).abs().max()) for g, e in zip(got, expected)))
    return worst


def quantize_graph(src: Path, dst: Path, external: bool) -> None:
    """onnxruntime's dynamic int8 quantization (int8 weights; activations quantized per call) of one graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with quiet():
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, use_external_data_format=external)


def _export_all(model: nn.Module, tmp: Path, opset: int, quantize_int8: bool) -> dict[str, Any]:
    """Export (and optionally quantize) every graph of `model` into tmp; the onnx_config graphs and metrics."""
    from tqdm import tqdm

    external = sum(p.numel() * p.element_size() for p in model.parameters()) > LARGE_MODEL_BYTES
    graphs, metrics = {}, {"export_seconds": {}, "bytes": {}, "max_abs_diff": {}}
    specs = graph_specs(model)
    for spec in tqdm(specs, desc="to-onnx", unit="graph", disable=len(specs) < 2):
        name, path = spec.file.removesuffix(".onnx"), tmp / spec.file
        t0 = time.perf_counter()
        try:
            export_graph(spec, path, opset, external)
        except UserError:
            raise
        except Exception as e:
            raise UserError(f"torch.onnx.export cannot express this model's {name} graph "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200]})") from None
        metrics["export_seconds"][name] = round(time.perf_counter() - t0, 3)
        metrics["max_abs_diff"][name] = check_graph(spec, path)
        graphs[name] = {"file": spec.file, "role": spec.role, **describe_graph(path), **spec.extra}
        if quantize_int8:
            int8 = tmp / f"{name}.int8.onnx"
            quantize_graph(path, int8, external)
            graphs[name]["int8_file"] = int8.name
        metrics["bytes"].update({f.name: f.stat().st_size for f in tmp.iterdir() if f.name.startswith(name + ".")})
    return {"graphs": graphs, "metrics": metrics}


def to_onnx(ckpt: str | Path, out: str | Path, *, opset: int = 18, quantize_int8: bool = False,
            overwrite: bool = False) -> dict[str, Any]:
    """Export a checkpoint (or a run dir's best checkpoint) to an ONNX dir `out`; returns the summary."""
    from lmforge.export.hf import check_output
    from lmforge.train.checkpoint import resolve_checkpoint

    t0 = time.perf_counter()
    ckpt, out = resolve_checkpoint(ckpt), Path(out)
    check_opset(opset)
    check_output(out, [("checkpoint", ckpt)], overwrite=overwrite)
    model, tokenizer = load_for_export(ckpt)
    moe_layers = dense_moe_for_export(model)
    c = model.config
    with atomic_dir(out) as tmp:
        exported = _export_all(model, tmp, opset, quantize_int8)
        atomic_write_json(tmp / "config.json", c.to_dict())
        if tokenizer is not None:
            (tmp / "tokenizer.json").write_bytes(tokenizer.read_bytes())
        layers = c.decoder_layers if c.arch == "encdec" else c.n_layer
        onnx_config = {"format": "lmforge-onnx", "arch": c.arch, "opset": opset, "int8": quantize_int8,
                       "num_layers": layers, "num_kv_heads": c.kv_heads, "head_dim": c.head_dim,
                       "vocab_size": c.vocab_size, "block_size": c.block_size, "graphs": exported["graphs"]}
        atomic_write_json(tmp / "onnx_config.json", onnx_config)
        metrics = {**exported["metrics"], "arch": c.arch, "opset": opset, "int8": quantize_int8,
                   "dense_moe_layers": moe_layers, "tokenizer": tokenizer is not None,
                   "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"}
        summary = write_summary(tmp, "convert to-onnx", config=c.to_dict(), inputs={"checkpoint": ckpt},
                                metrics=metrics, wall_time_s=time.perf_counter() - t0)
    return summary
