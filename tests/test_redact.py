"""Masking the key: every part that is a secret, and nothing that is not."""

from __future__ import annotations

from harvester.redact import redact, secret_parts


def test_fal_id_secret_form_masks_both_the_key_and_its_secret() -> None:
    key = "3f1c0a7e-1111-2222-3333-444455556666:9a8b7c6d5e4f3a2b1c0d"
    parts = secret_parts(key)
    assert parts == (key, "9a8b7c6d5e4f3a2b1c0d")
    text = f"echo {key} and the secret 9a8b7c6d5e4f3a2b1c0d alone"
    assert redact(text, parts) == "echo *** and the secret *** alone"


def test_a_tiny_key_does_not_mangle_messages() -> None:
    assert secret_parts("x") == ()
    assert redact("cannot write: File exists", secret_parts("x")) == "cannot write: File exists"
