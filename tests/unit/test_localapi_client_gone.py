"""The LocalAPI server and a client that hung up before its answer (meshpi status
gives up after 30 s): one info line, no traceback in the agent's journal (the image
tier fails on any "Traceback" there)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from appliance.agent.localapi.server import LocalAPIServer, Router


def test_localapi_client_gone_is_one_line_not_a_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    server = LocalAPIServer(tmp_path / "local.sock", Router())
    try:
        with caplog.at_level(logging.INFO):
            try:
                raise BrokenPipeError(32, "Broken pipe")
            except BrokenPipeError:
                server.handle_error(None, "client")
            try:
                raise ValueError("a real bug")
            except ValueError:
                server.handle_error(None, "client")
    finally:
        server.server_close()
    assert any("the client left before its answer (Broken pipe)" in r.message for r in caplog.records)
    err = capsys.readouterr().err
    assert err.count("Traceback") == 1 and "a real bug" in err and "BrokenPipeError" not in err
