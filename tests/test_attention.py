"""Query-chunked attention (export/attention.py): the ONNX Scan equals the direct computation for every chunking,
and exported graphs hold no whole score tensor outside the per-chunk loop."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from paligemma_edge.export.attention import CUSTOM_TRANSLATIONS, attend, expand_chunked_attention
from paligemma_edge.export.shortlisted_head import head_node
from paligemma_edge.runtime.export_format import load_manifest

from .helpers import QUERY_CHUNKS, run_cli

NAMES = ["query", "key", "value", "past_key", "past_value", "mask"]


def direct_attention(query, key, value, past_key, past_value, mask, scale, softcap):
    """Written out independently of the module: one score tensor for all queries."""
    batch, kv_heads, groups, seq, dim = query.shape
    keys, values = torch.cat([past_key, key], 2), torch.cat([past_value, value], 2)
    scores = torch.einsum("bkgsd,bktd->bkgst", query, keys) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask[:, :, None], torch.finfo(scores.dtype).min)
    return torch.einsum("bkgst,bktd->bkgsd", torch.softmax(scores, -1), values)


class Attention(torch.nn.Module):
    def __init__(self, chunk: int, softcap: float | None):
        super().__init__()
        self.chunk, self.softcap = chunk, softcap

    def forward(self, query, key, value, past_key, past_value, mask):
        return attend(query, key, value, past_key, past_value, mask, scale=0.3, softcap=self.softcap, chunk=self.chunk)


def random_inputs(batch: int, seq: int, past: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(batch, 2, 3, seq, 8), (batch, 2, seq, 8), (batch, 2, seq, 8), (batch, 2, past, 8), (batch, 2, past, 8)]
    tensors = [torch.randn(*shape, generator=g) * 2 for shape in shapes]
    mask = torch.rand(batch, 1, seq, past + seq, generator=g) > 0.3
    mask[..., -1] = True  # every query sees at least one key
    return [*tensors, mask]


@pytest.fixture(scope="module", params=[None, 5.0], ids=["no-softcap", "softcap"])
def chunked_graph(request, tmp_path_factory):
    softcap = request.param
    path = tmp_path_factory.mktemp("attention") / "attention.onnx"
    b, s, p = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past")
    mask = {0: b, 2: s, 3: torch.export.Dim.AUTO}
    dynamic = ({0: b, 3: s}, {0: b, 2: s}, {0: b, 2: s}, {0: b, 2: p}, {0: b, 2: p}, mask)
    program = torch.onnx.export(
        Attention(chunk=7, softcap=softcap),
        tuple(random_inputs(2, 5, 3, seed=0)),
        dynamo=True,
        input_names=NAMES,
        dynamic_shapes=dynamic,
        custom_translation_table=CUSTOM_TRANSLATIONS,
    )
    model = program.model_proto
    assert expand_chunked_attention(model) == 1
    onnx.save(model, str(path))
    return ort.InferenceSession(str(path)), softcap


# (batch, queries, past): one row (a decode step), fewer rows than a chunk, exact multiples, a remainder, no past
@pytest.mark.parametrize("batch,seq,past", [(1, 1, 40), (2, 5, 3), (1, 14, 0), (3, 22, 9), (1, 50, 7)])
def test_scan_over_query_chunks_equals_direct_attention(chunked_graph, batch, seq, past):
    session, softcap = chunked_graph
    inputs = random_inputs(batch, seq, past, seed=seq)
    expected = direct_attention(*inputs, scale=0.3, softcap=softcap)
    (out,) = session.run(None, {name: t.numpy() for name, t in zip(NAMES, inputs)})
    np.testing.assert_allclose(out, expected.numpy(), rtol=0, atol=2e-5)
    eager = Attention(chunk=7, softcap=softcap)(*inputs)
    np.testing.assert_allclose(eager.numpy(), expected.numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("graph", ["vision.onnx", "decoder.onnx"])
def test_exported_graphs_compute_scores_only_inside_the_chunk_loop(exported, graph):
    """No Softmax (hence no whole [heads, S, T] score tensor) in the main graph: per layer, an If runs the
    attention on the whole query when it is one chunk (a decode step) and a Scan over chunks otherwise."""
    model = onnx.load(str(exported.export_dir / graph), load_external_data=False)
    nodes = model.graph.node
    config = exported.manifest["vision" if graph == "vision.onnx" else "language_model"]
    assert "Softmax" not in [node.op_type for node in nodes]
    head = head_node(model.graph) if graph == "decoder.onnx" else None  # the shortlisted LM head's If
    branches = [node for node in nodes if node.op_type == "If" and node is not head]
    assert len(branches) == config["num_layers"]
    for node in branches:
        chunked = next(attr.g for attr in node.attribute if attr.name == "else_branch")
        assert [n.op_type for n in chunked.node].count("Scan") == 1
    entry = exported.manifest["graphs"][graph.removesuffix(".onnx")]
    assert entry["source"] == {"attention": "query-chunked", "query_chunk": QUERY_CHUNKS[exported.name]}


def uses_shared_arena(session_options) -> bool:
    try:
        return session_options.get_session_config_entry("session.use_env_allocators") == "1"
    except RuntimeError:  # onnxruntime: "does not have configuration with key"
        return False


@pytest.mark.parametrize("image_tokens,shrink", [(256, False), (4096, True)])
def test_long_context_memory_defaults(exports, image_tokens, shrink):
    """At 896 px (4,096 image tokens) the vision call and a long prefill hand the arena's memory back when they
    end and every session draws from the process's shared arena that grows by what is asked; at 224 px each
    session keeps its own; without an arena there is nothing to hand back or share."""
    from dataclasses import replace

    from paligemma_edge.runtime.backends import BACKENDS, BackendOptions, OnnxOptions
    from paligemma_edge.runtime.export_format import DecoderBackend

    manifest = replace(load_manifest(exports["pg1"].export_dir), num_image_tokens=image_tokens)
    vision, decoder = BACKENDS[DecoderBackend.ONNXRUNTIME].load(manifest, BackendOptions())
    for session in (vision.session, decoder.session):
        session_options = session.get_session_options()
        assert session_options.enable_cpu_mem_arena
        assert uses_shared_arena(session_options) == shrink
    assert (vision.run_options is not None) == shrink
    assert decoder._run_options(2047) is None and decoder._run_options(4110) is not None
    options = BackendOptions(onnx=OnnxOptions(memory_arena=False))
    vision, decoder = BACKENDS[DecoderBackend.ONNXRUNTIME].load(manifest, options)
    session_options = vision.session.get_session_options()
    assert not session_options.enable_cpu_mem_arena and vision.run_options is None
    assert not uses_shared_arena(session_options)
    assert decoder._run_options(4110) is None


@pytest.mark.slow
def test_cli_query_chunk_is_recorded_and_validated(exports, tmp_path):
    done = run_cli("export", str(exports["pg1"].checkpoint), str(tmp_path / "out"), "--query-chunk", "64", "--json")
    assert done.returncode == 0, done.stderr
    manifest = json.loads(done.stdout)
    assert manifest["verification"]["passed"]
    assert manifest["graphs"]["vision"]["source"]["query_chunk"] == 64  # 256 image tokens: four chunks
    refused = run_cli("export", str(exports["pg1"].checkpoint), str(tmp_path / "bad"), "--query-chunk", "0")
    assert refused.returncode == 2 and "query-chunk" in refused.stderr and not (tmp_path / "bad").exists()
