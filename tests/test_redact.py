"""Masking the key: every part that is a secret, and nothing that is not."""

from __future__ import annotations

from harvester.redact import clip, contains_secret, redact, secret_parts


def test_fal_id_secret_form_masks_both_the_key_and_its_secret() -> None:
    key = "3f1c0a7e-1111-2222-3333-444455556666:9a8b7c6d5e4f3a2b1c0d"
    parts = secret_parts(key)
    assert parts == (key, "9a8b7c6d5e4f3a2b1c0d", "3f1c0a7e-1111-2222-3333-444455556666")
    text = f"echo {key} and the secret 9a8b7c6d5e4f3a2b1c0d alone"
    assert redact(text, parts) == "echo *** and the secret *** alone"
    assert redact("key 3f1c0a7e-1111-2222-3333-444455556666", parts) == "key ***"


def test_a_tiny_key_does_not_mangle_messages() -> None:
    assert secret_parts("x") == ()
    assert redact("cannot write: File exists", secret_parts("x")) == "cannot write: File exists"


def test_clip_redacts_before_it_cuts() -> None:
    parts = secret_parts("3f1c0a7e-1111-2222-3333-444455556666:9a8b7c6d5e4f3a2b1c0d")
    text = "e" * 110 + " 9a8b7c6d5e4f3a2b1c0d"
    assert clip(text, 120, parts) == "e" * 110 + " ***"
    # The head of something longer: a secret cut at its end is dropped, not shown in part.
    assert "9a8b" not in clip("e" * 50 + "9a8b7c6d5e4f", 120, parts, cut=True)


def test_a_secret_percent_encoded_is_still_found() -> None:
    parts = secret_parts("3f1c0a7e-1111-2222-3333-444455556666:9a8b7c6d5e4f3a2b1c0d")
    assert contains_secret("https://cdn.test/a.png?s=%39a8b7c6d5e4f3a2b1c0d", parts)
    assert not contains_secret("https://cdn.test/a.png?s=9a8b7c", parts)
