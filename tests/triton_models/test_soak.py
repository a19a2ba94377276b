"""64 concurrent gRPC streaming clients for 60 s against the served model: nothing lost, nothing failed."""

from __future__ import annotations

import threading
import time

import pytest

from trtcompress.client import generate_grpc


@pytest.mark.slow
def test_64_streaming_clients_for_60_seconds(server):
    import tritonclient.grpc as grpcclient

    deadline = time.monotonic() + 60
    done, failures, lock = [], [], threading.Lock()

    def client(i: int) -> None:
        conn = grpcclient.InferenceServerClient(server.endpoints.grpc)
        try:
            while time.monotonic() < deadline:
                try:
                    out = generate_grpc(server.endpoints.grpc, "tensorrt_llm", f"request {i} of the river",
                                        client=conn, max_tokens=8 + i % 8, end_id=-1)  # fmt: skip
                    ok = out.finish_reason == "length" and len(out.pieces) >= 1
                    with lock:
                        (done if ok else failures).append(out.finish_reason)
                except Exception as exc:
                    with lock:
                        failures.append(repr(exc))
        finally:
            conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not failures, failures[:5]
    assert len(done) >= 64
