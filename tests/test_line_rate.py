"""What keeps a batch-1 line fast on a small CPU: the scoring heads' onnxruntime threads do not
busy-wait after a run (they took the cores from the next encoder run), while the encoder's do."""

from __future__ import annotations

import pytest

from clipinspect.runtime import Inspector

SPINNING = "session.intra_op.allow_spinning"


def test_heads_do_not_spin_and_the_encoder_does(tiny_bundle_path):
    backend = Inspector.open(tiny_bundle_path).backend
    for name, session in backend.heads.items():
        assert session.get_session_options().get_session_config_entry(SPINNING) == "0", name
    # The encoder keeps onnxruntime's default (spinning on): nothing set.
    with pytest.raises(RuntimeError, match="does not have configuration"):
        backend.encoder.get_session_options().get_session_config_entry(SPINNING)
