"""`cti-bridge render` as a user runs it: files in, the exact request out as JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cti_bridge", "render", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_render_prints_the_request(tmp_path: Path) -> None:
    mapping = {
        "xelionEvent": "callHungUpEvent",
        "crmResourceUri": 'https://crm.example.org/Call?initiation=${(initiation=="outgoing")?"calldialed":"callreceived"}'
        "&to=${calleePhoneNumber}",
        "crmResourcePayload": {
            "callId": "${callId}",
            "duration": "${duration}",
            "who": "${user.xelionUsername}",
        },
    }
    frame = {
        "notificationType": "callHungUpEvent",
        "notification": {
            "callId": "1732443153.1021",
            "initiation": "incoming",
            "calleePhoneNumber": "+31152511411",
            "calleeUser": "anne",
            "duration": 89,
        },
    }
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    (tmp_path / "e.json").write_text(json.dumps(frame))
    (tmp_path / "t.json").write_text(
        json.dumps({"access_token": "tok-secret-123", "instance_url": "https://x"})
    )
    proc = run(
        "--mapping", "m.json", "--event", "e.json", "--user", "anne", "--token", "t.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["method"] == "POST"
    assert out["url"] == "https://crm.example.org/Call?initiation=callreceived&to=%2B31152511411"
    assert out["body"] == {"callId": "1732443153.1021", "duration": 89, "who": "anne"}
    assert out["condition"] is True
    assert "tok-secret-123" not in proc.stdout


def test_render_reports_a_malformed_file_with_line_and_column(tmp_path: Path) -> None:
    (tmp_path / "m.json").write_text('{\n  "xelionEvent": "newCallEvent",\n  "crmResourceUri": "a" "b"\n}')
    (tmp_path / "e.json").write_text('{"callId": "1"}')
    proc = run("--mapping", "m.json", "--event", "e.json", cwd=tmp_path)
    assert proc.returncode == 1
    assert "m.json" in proc.stderr and "line 3" in proc.stderr and "column" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_render_reads_the_event_as_the_daemon_does(tmp_path: Path) -> None:
    """A number beyond a double is kept as the text Xelion sent (README, Templates); the command
    read the event file as floats and refused ``1e400`` ("not a finite number") that the daemon
    renders (an integrator review's finding)."""
    mapping = {
        "xelionEvent": "callHungUpEvent",
        "crmResourceUri": "https://x.example/a?b=${big}",
        "crmResourcePayload": {"big": "${big}", "nan": "${odd}"},
    }
    (tmp_path / "m.json").write_text(json.dumps(mapping))
    (tmp_path / "e.json").write_text('{"callId": "1", "big": 1e400, "odd": NaN}')
    proc = run("--mapping", "m.json", "--event", "e.json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["url"] == "https://x.example/a?b=1e400"
    assert out["body"] == {"big": "1e400", "nan": "NaN"}
