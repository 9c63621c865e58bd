"""The sandbox survives anything (issue 12 item 12): every request, however odd, gets an
answer, and the sandbox goes on answering the next one."""

from __future__ import annotations

import socket

import pytest

from harvester.sandbox import SandboxConfig, running_sandbox
from tests.conftest import KEY

ODD_TARGETS = [
    b"/fal-ai/flux/requests/%E2%9C%93",  # a check mark, echoed into a latin-1 header
    b"/fal-ai/flux/requests/%E2%9C%93/status",
    b"/fal-ai/flux/requests/a%0D%0AX-Injected:%20yes",  # CR LF in the id
    b"/fal-ai/flux/requests/%FF%FE",  # not UTF-8 once decoded
    b"/fal-ai/flux/requests/%00",
    b"/fal-ai/flux/requests/%",
    b"/media/%E2%9C%93",
    b"/%E2%9C%93/%E2%9C%93/requests/x",
    b"//////",
    b"/fal-ai/flux/requests/" + b"x" * 6000,
]


def exchange(port: int, target: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"GET "
            + target
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: Key "
            + KEY.encode()
            + b"\r\nConnection: close\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("target", ODD_TARGETS, ids=range(len(ODD_TARGETS)))
def test_every_odd_request_gets_an_answer_and_the_sandbox_lives_on(target: bytes) -> None:
    with running_sandbox(SandboxConfig(key=KEY)) as sb:
        port = int(sb.base_url.rsplit(":", 1)[1])
        answer = exchange(port, target)
        head = answer.partition(b"\r\n\r\n")[0]
        assert head.startswith(b"HTTP/1.1 "), answer[:200]
        assert b"\r\nX-Injected" not in head
        head.decode("ascii")  # every header byte is plain ASCII
        again = exchange(port, b"/__sandbox/stats")
        assert again.startswith(b"HTTP/1.1 200 "), again[:200]
