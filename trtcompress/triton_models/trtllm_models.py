"""Python-backend tokenizer / detokenizer models of the `trtllm` repository's ensemble.

Only importable inside tritonserver's python stub. Batched (`max_batch_size` > 0): each request holds
a batch of rows.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np


def _pb() -> Any:
    import triton_python_backend_utils as pb_utils

    return pb_utils


def _tokenizer(args: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    from trtcompress.triton_models.stub_paths import StubPaths

    params = json.loads(args["model_config"])["parameters"]
    paths = StubPaths()  # the stub's file-system encoding is ASCII: a directory named with é / 中 is linked
    try:
        return AutoTokenizer.from_pretrained(paths(params["tokenizer_dir"]["string_value"]))
    finally:
        paths.close()


class Preprocessing:
    def initialize(self, args: dict[str, Any]) -> None:
        self.tokenizer = _tokenizer(args)
        self.end_id = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.end_id

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        responses = []
        for request in requests:
            queries = pb.get_input_tensor_by_name(request, "QUERY").as_numpy().reshape(-1)
            out_len = pb.get_input_tensor_by_name(request, "REQUEST_OUTPUT_LEN").as_numpy().reshape(-1, 1)
            ids = [self.tokenizer.encode(q.decode("utf-8")) for q in queries]
            width = max(len(i) for i in ids)
            padded = np.array([i + [self.pad_id] * (width - len(i)) for i in ids], dtype=np.int32)
            rows = len(ids)

            def column(name: str, default: int, rows: int = rows, request: Any = request) -> np.ndarray:
                t = pb.get_input_tensor_by_name(request, name)
                return (
                    t.as_numpy().reshape(-1, 1).astype(np.int32)
                    if t is not None
                    else np.full((rows, 1), default, np.int32)
                )

            responses.append(
                pb.InferenceResponse(
                    output_tensors=[
                        pb.Tensor("INPUT_ID", padded),
                        pb.Tensor("REQUEST_INPUT_LEN", np.array([[len(i)] for i in ids], dtype=np.int32)),
                        pb.Tensor("REQUEST_OUTPUT_LEN", out_len.astype(np.int32)),
                        pb.Tensor("OUT_END_ID", column("END_ID", self.end_id)),
                        pb.Tensor("OUT_PAD_ID", column("PAD_ID", self.pad_id)),
                    ]
                )
            )
        return responses


class Postprocessing:
    def initialize(self, args: dict[str, Any]) -> None:
        self.tokenizer = _tokenizer(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        pb = _pb()
        responses = []
        for request in requests:
            tokens = pb.get_input_tensor_by_name(request, "TOKENS_BATCH").as_numpy()  # (B, beams, T)
            lengths = pb.get_input_tensor_by_name(request, "SEQUENCE_LENGTH").as_numpy()  # (B, beams)
            texts = [
                [
                    self.tokenizer.decode(row[beam, : lengths[b, beam]], skip_special_tokens=True).encode()
                    for beam in range(row.shape[0])
                ]
                for b, row in enumerate(tokens)
            ]
            responses.append(
                pb.InferenceResponse(output_tensors=[pb.Tensor("OUTPUT", np.array(texts, dtype=np.object_))])
            )
        return responses
